//! What a source has already reported as left out (an invalid instance, metadata that
//! cannot be copied), per service and kind of report, so that an entry that stays invalid is logged and
//! counted once rather than at every rebuild of its service: Eureka rebuilds every
//! application on each full read, and Consul each service on every blocking-query
//! return, wanted or spurious.
//!
//! Written by hand: a map of sets with a prune is not worth a dependency.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Reported keys by service and kind of report; shared by a source's tasks.
#[derive(Debug, Default)]
pub struct Reported {
    by_service: Mutex<HashMap<String, HashMap<&'static str, BTreeSet<String>>>>,
}

impl Reported {
    /// Makes `items` (keyed by `key`) the current report of `kind` for `service` and
    /// returns those whose key it did not hold before: the ones to log and count. An
    /// entry that goes and comes back is new again.
    pub fn fresh<'a, T>(
        &self,
        service: &str,
        kind: &'static str,
        items: &'a [T],
        key: impl Fn(&T) -> String,
    ) -> Vec<&'a T> {
        let keyed: Vec<(String, &T)> = items.iter().map(|item| (key(item), item)).collect();
        let mut map = self.lock();
        let previous = map.get(service).and_then(|kinds| kinds.get(kind));
        let fresh = keyed
            .iter()
            .filter(|(k, _)| previous.is_none_or(|p| !p.contains(k)))
            .map(|(_, item)| *item)
            .collect();
        let current: BTreeSet<String> = keyed.into_iter().map(|(k, _)| k).collect();
        let kinds = map.entry(service.to_string()).or_default();
        if current.is_empty() {
            kinds.remove(kind);
        } else {
            kinds.insert(kind, current);
        }
        if kinds.is_empty() {
            map.remove(service);
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

    fn lock(&self) -> MutexGuard<'_, HashMap<String, HashMap<&'static str, BTreeSet<String>>>> {
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

    /// `fresh` for instance reports, keyed by themselves.
    fn fresh(reported: &Reported, service: &str, items: &[&str]) -> Vec<String> {
        let items: Vec<String> = items.iter().map(|i| i.to_string()).collect();
        reported
            .fresh(service, "instance", &items, Clone::clone)
            .into_iter()
            .cloned()
            .collect()
    }

    #[test]
    fn an_entry_is_reported_once_while_it_lasts() {
        let reported = Reported::default();
        assert_eq!(fresh(&reported, "A", &["a1/loopback"]), ["a1/loopback"]);
        assert!(
            fresh(&reported, "A", &["a1/loopback"]).is_empty(),
            "not again"
        );
        assert_eq!(
            fresh(&reported, "B", &["a1/loopback"]),
            ["a1/loopback"],
            "per service"
        );
        assert_eq!(
            fresh(&reported, "A", &["a1/loopback", "a2/no_port"]),
            ["a2/no_port"],
            "only what is new"
        );
        let other_kind = reported.fresh("A", "metadata", &["a1/loopback"], |k| k.to_string());
        assert_eq!(other_kind, [&"a1/loopback"], "per kind of report");
        assert!(
            fresh(&reported, "A", &["a1/loopback"]).is_empty(),
            "another kind leaves this one alone"
        );

        // Fixed, then broken again: reported again.
        assert!(fresh(&reported, "A", &[]).is_empty());
        assert_eq!(fresh(&reported, "A", &["a1/loopback"]), ["a1/loopback"]);

        // The service leaves the registry and comes back: reported again.
        reported.forget("A");
        assert_eq!(fresh(&reported, "A", &["a1/loopback"]), ["a1/loopback"]);
        reported.retain(|service| service != "A");
        assert_eq!(fresh(&reported, "A", &["a1/loopback"]), ["a1/loopback"]);
    }
}
