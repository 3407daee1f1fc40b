//! What a source has already reported as left out (an invalid instance, metadata that
//! cannot be copied), per service, so that an entry that stays invalid is logged and
//! counted once rather than at every rebuild of its service: Eureka rebuilds every
//! application on each full read, and Consul each service on every blocking-query
//! return, wanted or spurious.
//!
//! Written by hand: a map of sets with a prune is not worth a dependency.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Reported entries by service; shared by a source's tasks.
#[derive(Debug, Default)]
pub struct Reported {
    by_service: Mutex<HashMap<String, BTreeSet<String>>>,
}

impl Reported {
    /// Makes `keys` the current report of `service` and returns the keys it did not
    /// hold before: those to log and count. An entry that goes and comes back is new
    /// again.
    pub fn update(&self, service: &str, keys: BTreeSet<String>) -> BTreeSet<String> {
        let mut map = self.lock();
        let fresh = match map.get(service) {
            Some(previous) => keys.difference(previous).cloned().collect(),
            None => keys.clone(),
        };
        if keys.is_empty() {
            map.remove(service);
        } else {
            map.insert(service.to_string(), keys);
        }
        fresh
    }

    /// Forgets a service that left the registry.
    pub fn forget(&self, service: &str) {
        self.lock().remove(service);
    }

    /// Forgets every service for which `present` is false.
    pub fn retain(&self, present: impl Fn(&str) -> bool) {
        self.lock().retain(|service, _| present(service));
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, BTreeSet<String>>> {
        // Each critical section is one map operation: a poisoned lock still holds a
        // consistent map.
        self.by_service
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn an_entry_is_reported_once_while_it_lasts() {
        let reported = Reported::default();
        assert_eq!(
            reported.update("A", keys(&["a1/loopback"])),
            keys(&["a1/loopback"])
        );
        assert!(
            reported.update("A", keys(&["a1/loopback"])).is_empty(),
            "not again"
        );
        assert_eq!(
            reported.update("B", keys(&["a1/loopback"])),
            keys(&["a1/loopback"]),
            "per service"
        );
        assert_eq!(
            reported.update("A", keys(&["a1/loopback", "a2/no_port"])),
            keys(&["a2/no_port"]),
            "only what is new"
        );

        // Fixed, then broken again: reported again.
        assert!(reported.update("A", BTreeSet::new()).is_empty());
        assert_eq!(
            reported.update("A", keys(&["a1/loopback"])),
            keys(&["a1/loopback"])
        );

        // The service leaves the registry and comes back: reported again.
        reported.forget("A");
        assert_eq!(
            reported.update("A", keys(&["a1/loopback"])),
            keys(&["a1/loopback"])
        );
        reported.retain(|service| service != "A");
        assert_eq!(
            reported.update("A", keys(&["a1/loopback"])),
            keys(&["a1/loopback"])
        );
    }
}
