//! One published name per Nacos service name across groups: `orders` in `DEFAULT_GROUP`
//! and `orders` in `PAY` would be one Kubernetes Service, so only one of them is
//! published and the other is reported, not merged. The winner is the group listed
//! first in `--nacos-groups` (for `*`, the smallest group name), so it does not flap with
//! arrival order; when it goes, the runner-up is published. With
//! `--nacos-group-as-suffix` names never meet here.
//!
//! (The catalog reports names that meet only after sanitising; these meet before it,
//! under one registry name, where the catalog would replace one with the other.)

use std::collections::{BTreeMap, HashMap};

use crate::model::{MicroSvcMeta, MicroSvcName};

use super::config::Groups;
use super::select::ServiceKey;

/// Built services by key, and which key holds each published name.
#[derive(Debug)]
pub struct Claims {
    groups: Groups,
    by_name: HashMap<MicroSvcName, BTreeMap<(usize, String), MicroSvcMeta>>,
}

/// What the catalog should now hold for one name.
#[derive(Debug, Clone, PartialEq)]
pub struct NameState {
    pub name: MicroSvcName,
    /// The winner's meta, or `None` when no group publishes the name.
    pub publish: Option<MicroSvcMeta>,
    /// The groups left out under this name.
    pub rejected: Vec<String>,
    pub winner: Option<String>,
}

impl Claims {
    pub fn new(groups: Groups) -> Self {
        Self {
            groups,
            by_name: HashMap::new(),
        }
    }

    /// Sets what `key` publishes under `name` (`None`: nothing) and returns the name's
    /// new state.
    pub fn set(
        &mut self,
        key: &ServiceKey,
        name: &MicroSvcName,
        meta: Option<MicroSvcMeta>,
    ) -> NameState {
        let (rank, _) = self.groups.rank(&key.group);
        let slot = (rank, key.group.clone());
        match meta {
            Some(meta) => {
                self.by_name
                    .entry(name.clone())
                    .or_default()
                    .insert(slot, meta);
            }
            None => {
                if let Some(claims) = self.by_name.get_mut(name) {
                    claims.remove(&slot);
                    if claims.is_empty() {
                        self.by_name.remove(name);
                    }
                }
            }
        }
        self.state(name)
    }

    /// The state of `name`.
    pub fn state(&self, name: &MicroSvcName) -> NameState {
        let claims = self.by_name.get(name);
        let mut iter = claims.into_iter().flat_map(|c| c.iter());
        let first = iter.next();
        NameState {
            name: name.clone(),
            publish: first.map(|(_, meta)| meta.clone()),
            winner: first.map(|((_, group), _)| group.clone()),
            rejected: iter.map(|((_, group), _)| group.clone()).collect(),
        }
    }

    /// Every winner: a complete snapshot for the catalog.
    pub fn winners(&self) -> Vec<MicroSvcMeta> {
        self.by_name
            .values()
            .filter_map(|claims| claims.values().next().cloned())
            .collect()
    }

    /// Names held by more than one group.
    pub fn collisions(&self) -> Vec<NameState> {
        self.by_name
            .iter()
            .filter(|(_, claims)| claims.len() > 1)
            .map(|(name, _)| self.state(name))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MicroSvcDomainName;

    fn meta(name: &str, marker: &str) -> MicroSvcMeta {
        MicroSvcMeta::new(
            MicroSvcName::new(name),
            MicroSvcDomainName::new(marker),
            Vec::new(),
        )
    }

    #[test]
    fn the_first_listed_group_wins_whatever_the_order_and_the_runner_up_follows() {
        let groups = Groups::Named(vec!["B".into(), "A".into()]);
        let name = MicroSvcName::new("orders");
        for order in [["A", "B"], ["B", "A"]] {
            let mut claims = Claims::new(groups.clone());
            let mut last = None;
            for group in order {
                last = Some(claims.set(
                    &ServiceKey::new(group, "orders"),
                    &name,
                    Some(meta("orders", group)),
                ));
            }
            let state = last.expect("set");
            assert_eq!(state.winner.as_deref(), Some("B"));
            assert_eq!(state.rejected, ["A"]);
            assert_eq!(state.publish.expect("published").domain.as_str(), "B");
            assert_eq!(claims.collisions().len(), 1);
            assert_eq!(claims.winners().len(), 1);

            let state = claims.set(&ServiceKey::new("B", "orders"), &name, None);
            assert_eq!(
                state.winner.as_deref(),
                Some("A"),
                "the runner-up is published"
            );
            assert!(state.rejected.is_empty());
            let state = claims.set(&ServiceKey::new("A", "orders"), &name, None);
            assert_eq!(state.publish, None);
            assert!(claims.winners().is_empty());
        }
    }

    #[test]
    fn every_group_ranks_by_name() {
        let mut claims = Claims::new(Groups::All);
        let name = MicroSvcName::new("s");
        claims.set(
            &ServiceKey::new("ZETA", "s"),
            &name,
            Some(meta("s", "ZETA")),
        );
        let state = claims.set(
            &ServiceKey::new("DEFAULT_GROUP", "s"),
            &name,
            Some(meta("s", "DEFAULT_GROUP")),
        );
        assert_eq!(state.winner.as_deref(), Some("DEFAULT_GROUP"));
    }
}
