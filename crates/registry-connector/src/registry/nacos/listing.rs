//! When a service counts as gone from the service list.
//!
//! Nacos cuts pages from an unordered set (a Java `HashSet` built per request): a
//! service registered between two page reads can shift the others, so one pass may miss
//! a service that never left. A service is therefore declared gone only after two
//! consecutive complete passes without it, and a pass that failed part-way (a page
//! error) deletes nothing. New services count at once: subscribing one more is cheap,
//! deleting one wrongly is not.

use std::collections::{BTreeSet, HashMap};

use super::select::ServiceKey;

/// Complete passes a service must be missing from before it is gone.
pub const MISSES_BEFORE_GONE: u32 = 2;

/// Consecutive complete passes each known service was missing from.
#[derive(Debug, Default)]
pub struct Listing {
    misses: HashMap<ServiceKey, u32>,
}

/// What one pass changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PassOutcome {
    /// Listed now and not known before.
    pub added: Vec<ServiceKey>,
    /// Known and now gone.
    pub gone: Vec<ServiceKey>,
}

impl Listing {
    /// Takes one pass (`listed`) against the services tracked now (`known`).
    /// `complete` is false when some page could not be read.
    pub fn observe<'a>(
        &mut self,
        known: impl IntoIterator<Item = &'a ServiceKey>,
        listed: &BTreeSet<ServiceKey>,
        complete: bool,
    ) -> PassOutcome {
        let known: BTreeSet<&ServiceKey> = known.into_iter().collect();
        let added = listed
            .iter()
            .filter(|k| !known.contains(k))
            .cloned()
            .collect();
        self.misses.retain(|k, _| known.contains(k));
        let mut gone = Vec::new();
        for key in known {
            if listed.contains(key) {
                self.misses.remove(key);
            } else if complete {
                let misses = self.misses.entry(key.clone()).or_default();
                *misses += 1;
                if *misses >= MISSES_BEFORE_GONE {
                    gone.push(key.clone());
                }
            }
        }
        for key in &gone {
            self.misses.remove(key);
        }
        PassOutcome { added, gone }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(names: &[&str]) -> BTreeSet<ServiceKey> {
        names.iter().map(|n| ServiceKey::new("G", *n)).collect()
    }

    #[test]
    fn a_service_is_gone_only_after_two_complete_passes_without_it() {
        let mut listing = Listing::default();
        let mut known = keys(&["a", "b"]);
        let out = listing.observe(&known, &keys(&["a", "b", "c"]), true);
        assert_eq!(out.added, Vec::from_iter(keys(&["c"])));
        known.extend(out.added);

        // A pass that missed `b` (pages shifted): nothing is gone yet.
        assert!(listing
            .observe(&known, &keys(&["a", "c"]), true)
            .gone
            .is_empty());
        // `b` shows again: its count starts over.
        assert!(listing
            .observe(&known, &keys(&["a", "b", "c"]), true)
            .gone
            .is_empty());
        assert!(listing
            .observe(&known, &keys(&["a", "c"]), true)
            .gone
            .is_empty());
        // A failed pass neither counts nor deletes.
        assert!(listing.observe(&known, &keys(&[]), false).gone.is_empty());
        let out = listing.observe(&known, &keys(&["a", "c"]), true);
        assert_eq!(out.gone, Vec::from_iter(keys(&["b"])));
        known.remove(&ServiceKey::new("G", "b"));
        assert!(listing
            .observe(&known, &keys(&["a", "c"]), true)
            .gone
            .is_empty());
    }

    #[test]
    fn a_partial_pass_still_adds() {
        let mut listing = Listing::default();
        let out = listing.observe(&keys(&["a"]), &keys(&["b"]), false);
        assert_eq!(out.added, Vec::from_iter(keys(&["b"])));
        assert!(out.gone.is_empty());
    }
}
