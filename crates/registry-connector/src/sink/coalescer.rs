//! Coalesces change notifications into batches: the seed's quiet period / max period.
//!
//! A batch is released once no new name has arrived for `quiet` or, under a steady
//! stream of changes, once the oldest pending name has waited `max`. Names are
//! de-duplicated, so a service that changes ten times in a burst is reconciled once.
//!
//! kube-runtime's `debounced_scheduler` debounces each key on its own; what the seed
//! asks for is a debounce of the whole set (one quiet period across all services, a
//! bound on the oldest change), so this small state machine is written here.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

#[derive(Default)]
struct Pending {
    names: HashSet<String>,
    first: Option<Instant>,
    last: Option<Instant>,
}

/// A set of pending service names with quiet/max release timing.
pub struct Coalescer {
    quiet: Duration,
    max: Duration,
    pending: Mutex<Pending>,
    wake: Notify,
}

impl Coalescer {
    pub fn new(quiet: Duration, max: Duration) -> Self {
        Self {
            quiet,
            max: max.max(quiet),
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
        }
    }

    /// Adds names to the pending batch.
    pub fn push<I>(&self, names: I)
    where
        I: IntoIterator<Item = String>,
    {
        let now = Instant::now();
        let mut pending = self.lock();
        let before = pending.names.len();
        pending.names.extend(names);
        if pending.names.len() == before && pending.first.is_some() {
            // Nothing new (all already pending): do not extend the quiet period.
            return;
        }
        if pending.names.is_empty() {
            return;
        }
        pending.first.get_or_insert(now);
        pending.last = Some(now);
        drop(pending);
        self.wake.notify_one();
    }

    /// Number of names waiting.
    pub fn len(&self) -> usize {
        self.lock().names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until a batch is due and takes it. Cancel-safe: names stay pending until
    /// this returns.
    pub async fn next_batch(&self) -> Vec<String> {
        loop {
            let notified = self.wake.notified();
            let due = {
                let mut pending = self.lock();
                match (pending.first, pending.last) {
                    (Some(first), Some(last)) => {
                        let due = (last + self.quiet).min(first + self.max);
                        if due <= Instant::now() {
                            let names = std::mem::take(&mut pending.names);
                            pending.first = None;
                            pending.last = None;
                            let mut names: Vec<String> = names.into_iter().collect();
                            names.sort();
                            return names;
                        }
                        Some(due)
                    }
                    _ => None,
                }
            };
            match due {
                Some(due) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn releases_after_the_quiet_period() {
        let c = Coalescer::new(Duration::from_secs(1), Duration::from_secs(5));
        let start = Instant::now();
        c.push(names(&["b", "a", "a"]));
        let batch = c.next_batch().await;
        assert_eq!(batch, names(&["a", "b"]));
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert!(c.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn new_names_extend_the_quiet_period_up_to_the_max() {
        let c = std::sync::Arc::new(Coalescer::new(
            Duration::from_secs(1),
            Duration::from_secs(5),
        ));
        let start = Instant::now();
        let feeder = {
            let c = c.clone();
            tokio::spawn(async move {
                for i in 0..20 {
                    c.push([format!("svc-{i}")]);
                    tokio::time::sleep(Duration::from_millis(400)).await;
                }
            })
        };
        let batch = c.next_batch().await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert_eq!(batch.len(), 13, "names pushed at 0, 0.4, ..., 4.8 s");
        feeder.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_names_do_not_extend_the_quiet_period() {
        let c = std::sync::Arc::new(Coalescer::new(
            Duration::from_secs(1),
            Duration::from_secs(5),
        ));
        let start = Instant::now();
        c.push(names(&["a"]));
        let repeater = {
            let c = c.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(600)).await;
                c.push(names(&["a"]));
            })
        };
        let batch = c.next_batch().await;
        assert_eq!(batch, names(&["a"]));
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        repeater.await.expect("repeater");
    }

    #[tokio::test(start_paused = true)]
    async fn waits_while_nothing_is_pending() {
        let c = Coalescer::new(Duration::from_millis(100), Duration::from_secs(1));
        let res = tokio::time::timeout(Duration::from_secs(60), c.next_batch()).await;
        assert!(res.is_err(), "no batch without names");
    }
}
