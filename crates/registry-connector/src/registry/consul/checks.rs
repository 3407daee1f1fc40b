//! The shared mode's catalog-wide check watch: one blocking query on
//! `/v1/health/state/any`, whose index moves on any check change in the datacenter, and
//! the diff of its answers that names the services whose checks changed.
//!
//! Why this endpoint: Consul 1.8 has no multi-service watch, and over HTTP/1.1 a blocking
//! query per service costs a connection per service. Every check carries the name and
//! instance of its service, so comparing two answers by `(node, check)` → a digest of
//! what the source publishes of the check (status, instance, service, tags) names exactly
//! the services to re-read: a check that appeared (an instance registered), vanished (an
//! instance deregistered) or changed (health flipped). A node's own check (`serfHealth`,
//! node maintenance) names every service with a check on that node. The digest leaves out
//! the check's output, which agents update without anything published changing (its
//! `ModifyIndex` moves then too). What it cannot see: an instance without checks, a
//! re-registration that changes an address, port or meta but no check, a node
//! re-registered with another address; the watch loop gives long polls to services with
//! check-less instances first, and the sweep catches the rest (see
//! [`super::budget::WatchMode::Shared`]).
//!
//! Cost: every answer is the whole check table (with the checks' output and definition:
//! 350 bytes to several KB per check), and its index moves on any check write, even one
//! that changes nothing; the loop paces itself by what an answer takes. [`CheckIndex`]
//! keeps about 100 bytes per check.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::Arc;

use super::api::CheckState;

/// What the last answer said about one check.
#[derive(Debug, Clone)]
struct Seen {
    /// Hash of what the source publishes of the check.
    digest: u64,
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

    fn digest(&self, check: &CheckState) -> u64 {
        self.hasher.hash_one((
            check.status.as_str(),
            check.service_id.as_str(),
            check.service_name.as_str(),
            &check.service_tags,
        ))
    }

    /// Takes `answer` as the new state and returns the services whose checks changed
    /// since the previous one (checks added, removed or changed in what is published,
    /// and every service with a check on a node whose own check changed), each with the
    /// highest `ModifyIndex` among its changed checks: a read of the service older than
    /// that (a lagging server answering a stale read) does not show the change yet. 0
    /// when no index is known (a check vanished).
    pub fn update(&mut self, answer: &[CheckState]) -> BTreeMap<String, u64> {
        let mut changed: BTreeMap<String, u64> = BTreeMap::new();
        let mut changed_nodes: HashMap<u64, u64> = HashMap::new();
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
            let digest = self.digest(check);
            let moved = old.as_ref().is_none_or(|seen| seen.digest != digest);
            if moved {
                let at = check.modify_index;
                mark(&mut changed, &mut changed_nodes, &service, node, at);
                if let Some(seen) = &old {
                    // A check that moved to another service names both.
                    if seen.service != service {
                        mark(
                            &mut changed,
                            &mut changed_nodes,
                            &seen.service,
                            seen.node,
                            0,
                        );
                    }
                }
            }
            next.insert(
                key,
                Seen {
                    digest,
                    service,
                    node,
                },
            );
        }
        // What is left of the old state vanished.
        for seen in self.checks.values() {
            mark(
                &mut changed,
                &mut changed_nodes,
                &seen.service,
                seen.node,
                0,
            );
        }
        if !changed_nodes.is_empty() {
            for seen in next.values() {
                if let Some(at) = changed_nodes.get(&seen.node) {
                    if !seen.service.is_empty() {
                        mark(
                            &mut changed,
                            &mut HashMap::new(),
                            &seen.service,
                            seen.node,
                            *at,
                        );
                    }
                }
            }
        }
        self.checks = next;
        changed
    }
}

fn mark(
    changed: &mut BTreeMap<String, u64>,
    nodes: &mut HashMap<u64, u64>,
    service: &str,
    node: u64,
    at: u64,
) {
    if service.is_empty() {
        let entry = nodes.entry(node).or_default();
        *entry = (*entry).max(at);
    } else if let Some(index) = changed.get_mut(service) {
        *index = (*index).max(at);
    } else {
        changed.insert(service.to_string(), at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(node: &str, id: &str, service: &str, modify: u64) -> CheckState {
        CheckState {
            node: node.into(),
            check_id: id.into(),
            status: "passing".into(),
            service_id: if service.is_empty() {
                String::new()
            } else {
                format!("{service}-1")
            },
            service_name: service.into(),
            service_tags: Vec::new(),
            modify_index: modify,
        }
    }

    fn names(set: &BTreeMap<String, u64>) -> Vec<&str> {
        set.keys().map(String::as_str).collect()
    }

    fn flip(check: &mut CheckState, modify: u64) {
        check.status = if check.status == "passing" {
            "critical".into()
        } else {
            "passing".into()
        };
        check.modify_index = modify;
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
        flip(&mut next[2], 20);
        let changed = index.update(&next);
        assert_eq!(names(&changed), ["b"]);
        // The index to expect in a read of b.
        assert_eq!(changed["b"], 20);
    }

    #[test]
    fn output_only_changes_name_nothing() {
        let mut index = CheckIndex::default();
        index.update(&base());
        let mut next = base();
        // Consul moves ModifyIndex when only the output changed; nothing published did.
        next[1].modify_index = 99;
        assert!(index.update(&next).is_empty());
        // Tags carried by the check do count.
        next[1].service_tags = vec!["v2".into()];
        assert_eq!(names(&index.update(&next)), ["a"]);
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
        flip(&mut next[0], 40); // n1's serfHealth flipped
        let changed = index.update(&next);
        assert_eq!(names(&changed), ["a", "b"]);
        assert_eq!(changed["a"], 40);
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
        let mut next = vec![check("n1", "web", "a", 1), check("n2", "web", "b", 1)];
        flip(&mut next[1], 2);
        assert_eq!(names(&index.update(&next)), ["b"]);
    }
}
