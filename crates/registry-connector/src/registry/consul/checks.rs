//! The shared mode's catalog-wide check watch: one blocking query on
//! `/v1/health/state/any`, whose index moves on any check change in the datacenter, and
//! the diff of its answers that names the services whose checks changed.
//!
//! Why this endpoint: Consul 1.8 has no multi-service watch, and over HTTP/1.1 a blocking
//! query per service costs a connection per service. Every check carries the name of its
//! service and a `ModifyIndex` that moves when the check changes (status, output,
//! definition), so comparing two answers by `(node, check)` → `ModifyIndex` names exactly
//! the services to re-read: a check that appeared (an instance registered), vanished (an
//! instance deregistered) or changed (health flipped). A node's own check (`serfHealth`,
//! node maintenance) names every service with a check on that node. What it cannot see:
//! an instance without checks, and a re-registration that changes an address but no
//! check; the watch loop gives long polls to services with check-less instances first,
//! and the sweep catches the rest (see [`super::budget::WatchMode::Shared`]).
//!
//! Cost: every answer is the whole check table (about 350 bytes per check), so the loop
//! paces itself by the time an answer takes ([`CheckIndex`] keeps 24 bytes of state per
//! check: a hash of the key, the index and a shared service name).

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::Arc;

use super::api::CheckState;

/// What the last answer said about one check.
#[derive(Debug, Clone)]
struct Seen {
    modify_index: u64,
    /// The service the check belongs to; empty for a node check.
    service: Arc<str>,
    /// Hash of the node name, to find the services of a node whose own check changed.
    node: u64,
}

/// The checks of the last answer, by a 64-bit hash of `(node, check ID)`. A hash instead
/// of the two strings keeps 30,000 checks in about a megabyte; two keys colliding (odds
/// about 1 in 10^10 at 30,000 checks) would hide a change of one of them until the sweep.
#[derive(Debug, Default)]
pub struct CheckIndex {
    hasher: RandomState,
    checks: HashMap<u64, Seen>,
}

impl CheckIndex {
    /// Number of checks in the last answer.
    pub fn len(&self) -> usize {
        self.checks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.checks.is_empty()
    }

    fn key(&self, check: &CheckState) -> u64 {
        self.hasher
            .hash_one((check.node.as_str(), check.check_id.as_str()))
    }

    fn node_key(&self, node: &str) -> u64 {
        self.hasher.hash_one(node)
    }

    /// Takes `answer` as the new state and returns the services whose checks changed
    /// since the previous one: checks added, removed or modified, and every service with
    /// a check on a node whose own check changed.
    pub fn update(&mut self, answer: &[CheckState]) -> BTreeSet<String> {
        let mut changed: BTreeSet<String> = BTreeSet::new();
        let mut changed_nodes: HashSet<u64> = HashSet::new();
        let mut next: HashMap<u64, Seen> = HashMap::with_capacity(answer.len());
        for check in answer {
            let key = self.key(check);
            let node = self.node_key(&check.node);
            let old = self.checks.remove(&key);
            let service = match &old {
                // Reuse the shared name: most checks keep their service.
                Some(seen) if *seen.service == *check.service_name => Arc::clone(&seen.service),
                _ => Arc::from(check.service_name.as_str()),
            };
            let moved = old
                .as_ref()
                .is_none_or(|seen| seen.modify_index != check.modify_index);
            if moved {
                mark(&mut changed, &mut changed_nodes, &service, node);
                if let Some(seen) = &old {
                    // A check that moved to another service names both.
                    if seen.service != service {
                        mark(&mut changed, &mut changed_nodes, &seen.service, seen.node);
                    }
                }
            }
            next.insert(
                key,
                Seen {
                    modify_index: check.modify_index,
                    service,
                    node,
                },
            );
        }
        // What is left of the old state vanished.
        for seen in self.checks.values() {
            mark(&mut changed, &mut changed_nodes, &seen.service, seen.node);
        }
        if !changed_nodes.is_empty() {
            for seen in next.values() {
                if !seen.service.is_empty() && changed_nodes.contains(&seen.node) {
                    changed.insert(seen.service.to_string());
                }
            }
        }
        self.checks = next;
        changed
    }
}

fn mark(changed: &mut BTreeSet<String>, nodes: &mut HashSet<u64>, service: &str, node: u64) {
    if service.is_empty() {
        nodes.insert(node);
    } else if !changed.contains(service) {
        changed.insert(service.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(node: &str, id: &str, service: &str, modify: u64) -> CheckState {
        CheckState {
            node: node.into(),
            check_id: id.into(),
            service_name: service.into(),
            modify_index: modify,
        }
    }

    fn names(set: &BTreeSet<String>) -> Vec<&str> {
        set.iter().map(String::as_str).collect()
    }

    fn base() -> Vec<CheckState> {
        vec![
            check("n1", "serfHealth", "", 5),
            check("n1", "service:a-1", "a", 10),
            check("n1", "service:b-1", "b", 11),
            check("n2", "serfHealth", "", 6),
            check("n2", "service:c-1", "c", 12),
        ]
    }

    #[test]
    fn the_first_answer_names_everything_and_an_unchanged_one_nothing() {
        let mut index = CheckIndex::default();
        assert_eq!(names(&index.update(&base())), ["a", "b", "c"]);
        assert!(index.update(&base()).is_empty());
        assert_eq!(index.len(), 5);
    }

    #[test]
    fn a_modified_check_names_its_service_only() {
        let mut index = CheckIndex::default();
        index.update(&base());
        let mut next = base();
        next[2].modify_index = 20;
        assert_eq!(names(&index.update(&next)), ["b"]);
    }

    #[test]
    fn added_and_removed_checks_name_their_services() {
        let mut index = CheckIndex::default();
        index.update(&base());
        let mut next = base();
        next.remove(4); // c's instance deregistered
        next.push(check("n2", "service:d-1", "d", 30)); // d registered
        assert_eq!(names(&index.update(&next)), ["c", "d"]);
    }

    #[test]
    fn a_node_check_names_every_service_on_that_node() {
        let mut index = CheckIndex::default();
        index.update(&base());
        let mut next = base();
        next[0].modify_index = 40; // n1's serfHealth flipped
        assert_eq!(names(&index.update(&next)), ["a", "b"]);
        // A node check that vanishes (node deregistered) too.
        let mut gone = next.clone();
        gone.remove(3);
        assert_eq!(names(&index.update(&gone)), ["c"]);
    }

    #[test]
    fn a_check_moved_to_another_service_names_both() {
        let mut index = CheckIndex::default();
        index.update(&base());
        let mut next = base();
        next[1] = check("n1", "service:a-1", "z", 50);
        assert_eq!(names(&index.update(&next)), ["a", "z"]);
    }

    #[test]
    fn checks_with_the_same_id_on_two_nodes_are_distinct() {
        let mut index = CheckIndex::default();
        let answer = vec![check("n1", "web", "a", 1), check("n2", "web", "b", 1)];
        index.update(&answer);
        let next = vec![check("n1", "web", "a", 1), check("n2", "web", "b", 2)];
        assert_eq!(names(&index.update(&next)), ["b"]);
    }
}
