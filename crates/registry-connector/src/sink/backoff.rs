//! Per-service retry with capped exponential backoff.
//!
//! The seed retried an item five times and then dropped it, which leaves a service
//! unsynced until something else touches it. Here a failing service is retried for as
//! long as it fails, with a delay that doubles up to a cap, and a success resets it.
//! kube-runtime has no per-key error backoff (its issue #1916), so this is written here:
//! a map of attempt counts plus a `DelayQueue` of due retries.

use std::collections::HashMap;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio_util::time::{delay_queue, DelayQueue};

/// Retry timing: the first retry waits `base`, each further one twice as long, never
/// more than `max`, with up to 10 % jitter so that services failing together do not
/// retry in lockstep.
#[derive(Debug, Clone, Copy)]
pub struct BackoffPolicy {
    pub base: Duration,
    pub max: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(250),
            max: Duration::from_secs(60),
        }
    }
}

impl BackoffPolicy {
    /// The delay before retry number `attempt` (1-based), without jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(31));
        self.base.saturating_mul(factor).min(self.max)
    }
}

/// Pending retries keyed by service name.
pub struct RetryQueue {
    policy: BackoffPolicy,
    attempts: HashMap<String, u32>,
    queued: HashMap<String, delay_queue::Key>,
    due: DelayQueue<String>,
}

impl RetryQueue {
    pub fn new(policy: BackoffPolicy) -> Self {
        Self {
            policy,
            attempts: HashMap::new(),
            queued: HashMap::new(),
            due: DelayQueue::new(),
        }
    }

    /// Records a failure of `name` and schedules its retry; returns the delay chosen.
    pub fn failed(&mut self, name: &str) -> Duration {
        let attempt = self.attempts.entry(name.to_string()).or_insert(0);
        *attempt = attempt.saturating_add(1);
        let base = self.policy.delay(*attempt);
        let jitter = base.mul_f64(rand::random::<f64>() * 0.1);
        let delay = base + jitter;
        match self.queued.get(name) {
            Some(key) => self.due.reset(key, delay),
            None => {
                let key = self.due.insert(name.to_string(), delay);
                self.queued.insert(name.to_string(), key);
            }
        }
        delay
    }

    /// Forgets `name` after a success: its next failure starts from `base` again.
    pub fn succeeded(&mut self, name: &str) {
        self.attempts.remove(name);
        if let Some(key) = self.queued.remove(name) {
            self.due.remove(&key);
        }
    }

    /// Consecutive failures of `name` so far.
    pub fn attempts(&self, name: &str) -> u32 {
        self.attempts.get(name).copied().unwrap_or(0)
    }

    /// Number of services waiting for a retry.
    pub fn len(&self) -> usize {
        self.queued.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }
}

impl Stream for RetryQueue {
    type Item = String;

    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<String>> {
        match self.due.poll_expired(cx) {
            Poll::Ready(Some(expired)) => {
                let name = expired.into_inner();
                self.queued.remove(&name);
                Poll::Ready(Some(name))
            }
            // An empty DelayQueue reports the end of the stream; this queue lives for
            // the whole run, so it just has nothing due yet.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::time::Instant;

    #[test]
    fn delay_doubles_up_to_the_cap() {
        let p = BackoffPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let delays: Vec<u128> = (1..=6).map(|a| p.delay(a).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.delay(u32::MAX), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_name_comes_back_after_its_delay() {
        let mut q = RetryQueue::new(BackoffPolicy {
            base: Duration::from_secs(1),
            max: Duration::from_secs(10),
        });
        let start = Instant::now();
        let d1 = q.failed("a");
        assert!(d1 >= Duration::from_secs(1) && d1 <= Duration::from_millis(1100));
        assert_eq!(q.next().await.as_deref(), Some("a"));
        // DelayQueue rounds to its millisecond wheel.
        let waited = start.elapsed();
        assert!(
            waited >= d1 && waited <= d1 + Duration::from_millis(2),
            "{waited:?} vs {d1:?}"
        );
        let d2 = q.failed("a");
        assert!(
            d2 >= Duration::from_secs(2),
            "second failure waits longer: {d2:?}"
        );
        assert_eq!(q.attempts("a"), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn success_cancels_the_retry_and_resets_the_count() {
        let mut q = RetryQueue::new(BackoffPolicy::default());
        q.failed("a");
        q.failed("a");
        q.succeeded("a");
        assert_eq!(q.attempts("a"), 0);
        assert!(q.is_empty());
        let next = tokio::time::timeout(Duration::from_secs(120), q.next()).await;
        assert!(next.is_err(), "nothing due after success");
    }
}
