//! The shared mode's re-read queue: services named by a catalog-wide watch (or by the
//! sweep) are read once, plainly, by a few workers on the reads lane.
//!
//! Coalesced: a service is queued at most once, and one named again while its read is in
//! flight is read once more afterwards (the change may have come after the read left), so
//! a burst of changes to one service costs at most two reads. Named services go before
//! the sweep's. Nothing here decides what a read publishes (the watch loop does, under
//! the service's own lock); this module only orders the work.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use tokio::sync::Notify;

/// Why a service is re-read (the `cause` label of `consul_rereads_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The check watch named it.
    Check,
    /// The service list named it (new, or its tags changed).
    List,
    /// The background sweep came by.
    Sweep,
    /// An earlier read of it failed.
    Retry,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Check => "check",
            Self::List => "list",
            Self::Sweep => "sweep",
            Self::Retry => "retry",
        }
    }

    fn is_urgent(self) -> bool {
        self != Self::Sweep
    }
}

#[derive(Debug, Default)]
struct State {
    urgent: VecDeque<(String, Cause)>,
    background: VecDeque<(String, Cause)>,
    /// Queued, in either queue.
    queued: HashSet<String>,
    in_flight: HashSet<String>,
    /// Named again while in flight: read again when the read in flight ends.
    again: HashSet<String>,
    /// The least `X-Consul-Index` a read must show, by service (from the check watch).
    min_index: HashMap<String, u64>,
}

/// The queue; shared by the watches that fill it and the workers that drain it.
#[derive(Debug, Default)]
pub struct RefreshQueue {
    state: Mutex<State>,
    ready: Notify,
}

impl RefreshQueue {
    /// Asks for one read of `service`.
    pub fn request(&self, service: &str, cause: Cause) {
        self.request_at(service, cause, 0);
    }

    /// Asks for one read of `service` that shows at least `min_index` (0: any).
    pub fn request_at(&self, service: &str, cause: Cause, min_index: u64) {
        let mut state = self.lock();
        if min_index > 0 {
            let min = state.min_index.entry(service.to_string()).or_default();
            *min = (*min).max(min_index);
        }
        if state.in_flight.contains(service) {
            if cause.is_urgent() {
                state.again.insert(service.to_string());
            }
            return;
        }
        if state.queued.contains(service) {
            if cause.is_urgent() {
                // Promote a sweep entry: move it to the urgent queue.
                if let Some(at) = state.background.iter().position(|(s, _)| s == service) {
                    state.background.remove(at);
                    state.urgent.push_back((service.to_string(), cause));
                }
            }
            return;
        }
        state.queued.insert(service.to_string());
        let entry = (service.to_string(), cause);
        if cause.is_urgent() {
            state.urgent.push_back(entry);
        } else {
            state.background.push_back(entry);
        }
        drop(state);
        self.ready.notify_one();
    }

    /// The next service to read, urgent ones first, with the least index its read must
    /// show; waits while there is none.
    pub async fn next(&self) -> (String, Cause, u64) {
        loop {
            let notified = self.ready.notified();
            if let Some(item) = self.try_next() {
                return item;
            }
            notified.await;
        }
    }

    fn try_next(&self) -> Option<(String, Cause, u64)> {
        let mut state = self.lock();
        let (name, cause) = state
            .urgent
            .pop_front()
            .or_else(|| state.background.pop_front())?;
        state.queued.remove(&name);
        state.in_flight.insert(name.clone());
        let min = state.min_index.remove(&name).unwrap_or(0);
        let more = !state.urgent.is_empty() || !state.background.is_empty();
        drop(state);
        if more {
            // Wake another worker for the rest.
            self.ready.notify_one();
        }
        Some((name, cause, min))
    }

    /// The read of `service` ended; queues it again if it was named meanwhile.
    pub fn done(&self, service: &str) {
        let again = {
            let mut state = self.lock();
            state.in_flight.remove(service);
            state.again.remove(service)
        };
        if again {
            self.request(service, Cause::Check);
        }
    }

    /// Forgets a service that is gone (queued reads of it are dropped).
    pub fn forget(&self, service: &str) {
        let mut state = self.lock();
        if state.queued.remove(service) {
            state.urgent.retain(|(s, _)| s != service);
            state.background.retain(|(s, _)| s != service);
        }
        state.again.remove(service);
        state.min_index.remove(service);
    }

    /// Services waiting (both queues), for the metrics and the tests.
    pub fn pending(&self) -> usize {
        self.lock().queued.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain collections: a panic elsewhere leaves them usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_is_queued_once_and_urgent_ones_go_first() {
        let q = RefreshQueue::default();
        q.request("swept", Cause::Sweep);
        q.request("a", Cause::Check);
        q.request("a", Cause::List);
        q.request("b", Cause::List);
        assert_eq!(q.pending(), 3);
        assert_eq!(q.try_next().unwrap().0, "a");
        assert_eq!(q.try_next().unwrap().0, "b");
        assert_eq!(q.try_next().unwrap(), ("swept".into(), Cause::Sweep, 0));
        assert!(q.try_next().is_none());
    }

    #[test]
    fn named_while_in_flight_is_read_once_more() {
        let q = RefreshQueue::default();
        q.request("a", Cause::Check);
        let (name, _, _) = q.try_next().unwrap();
        q.request("a", Cause::Check);
        q.request("a", Cause::Check);
        // The sweep does not ask for another read of a service being read.
        q.request("a", Cause::Sweep);
        assert_eq!(q.pending(), 0);
        q.done(&name);
        assert_eq!(q.try_next().unwrap().0, "a");
        q.done("a");
        assert!(q.try_next().is_none());
    }

    #[test]
    fn a_named_service_overtakes_its_sweep_entry() {
        let q = RefreshQueue::default();
        q.request("x", Cause::Sweep);
        q.request("y", Cause::Sweep);
        q.request("y", Cause::Check);
        assert_eq!(q.try_next().unwrap(), ("y".into(), Cause::Check, 0));
        assert_eq!(q.try_next().unwrap().0, "x");
    }

    #[test]
    fn forgotten_services_are_not_read() {
        let q = RefreshQueue::default();
        q.request("gone", Cause::Check);
        q.request("kept", Cause::Sweep);
        q.forget("gone");
        assert_eq!(q.try_next().unwrap().0, "kept");
        assert!(q.try_next().is_none());
    }

    #[tokio::test]
    async fn next_waits_for_work() {
        let q = std::sync::Arc::new(RefreshQueue::default());
        let waiter = {
            let q = std::sync::Arc::clone(&q);
            tokio::spawn(async move { q.next().await })
        };
        tokio::task::yield_now().await;
        q.request("late", Cause::List);
        let (name, cause, _) = waiter.await.expect("worker");
        assert_eq!((name.as_str(), cause), ("late", Cause::List));
    }

    #[test]
    fn the_least_index_to_show_is_the_highest_asked_for() {
        let q = RefreshQueue::default();
        q.request_at("a", Cause::Check, 40);
        q.request_at("a", Cause::Check, 30);
        q.request("a", Cause::Sweep);
        assert_eq!(q.try_next().unwrap(), ("a".into(), Cause::Check, 40));
        // Asked again while in flight: the next read must show the new index.
        q.request_at("a", Cause::Check, 55);
        q.done("a");
        assert_eq!(q.try_next().unwrap(), ("a".into(), Cause::Check, 55));
    }
}
