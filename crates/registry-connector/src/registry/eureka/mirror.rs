//! The local copy of the Eureka registry, kept as a Eureka client keeps it: filled by a
//! full fetch, then moved forward by deltas, and checked against the server's reconcile
//! hash code after each delta.
//!
//! The mirror holds every instance the server reports, whatever the connector later
//! selects: the hash code covers the whole registry, so a filtered copy could never be
//! checked. Pure data, no I/O.

use std::collections::{BTreeMap, BTreeSet};

use super::api::{ActionType, Applications, Instance, Status};
use super::delta::DeltaMemo;

/// Instances of one application, sorted by instance id. A sorted vector, not a B-tree:
/// an application has a handful of instances, and a B-tree leaf keeps room for eleven
/// (about 3 KB per application: 29 MiB of the mirror at 10,000 applications).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppInstances {
    entries: Vec<(Box<str>, Instance)>,
}

impl AppInstances {
    fn position(&self, id: &str) -> Result<usize, usize> {
        self.entries.binary_search_by(|(key, _)| (**key).cmp(id))
    }

    pub fn get(&self, id: &str) -> Option<&Instance> {
        self.position(id).ok().map(|i| &self.entries[i].1)
    }

    /// Inserts or replaces the instance filed under `id`.
    pub fn insert(&mut self, id: &str, instance: Instance) {
        match self.position(id) {
            Ok(i) => self.entries[i].1 = instance,
            Err(i) => {
                // One more place, not double: the mirror holds every application.
                self.entries.reserve_exact(1);
                self.entries.insert(i, (id.into(), instance));
            }
        }
    }

    /// Removes the instance filed under `id`; whether there was one.
    pub fn remove(&mut self, id: &str) -> bool {
        match self.position(id) {
            Ok(i) => {
                self.entries.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    /// `(id, instance)` in id order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Instance)> {
        self.entries.iter().map(|(id, i)| (&**id, i))
    }

    pub fn values(&self) -> impl Iterator<Item = &Instance> {
        self.entries.iter().map(|(_, i)| i)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Built from `(id, instance)` pairs in any order; of two with one id the last wins (as
/// inserting them one after the other would), in one sort instead of an insertion each.
impl FromIterator<(String, Instance)> for AppInstances {
    fn from_iter<T: IntoIterator<Item = (String, Instance)>>(pairs: T) -> Self {
        let mut entries: Vec<(Box<str>, Instance)> = pairs
            .into_iter()
            .map(|(id, instance)| (id.into_boxed_str(), instance))
            .collect();
        // Stable: among equal ids the order of arrival stays, and the last is kept.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries.reverse();
        entries.dedup_by(|later, earlier| later.0 == earlier.0);
        entries.reverse();
        entries.shrink_to_fit();
        Self { entries }
    }
}

/// What the server holds, by application name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mirror {
    apps: BTreeMap<String, AppInstances>,
    /// Instances without an id (neither `instanceId` nor `hostName`): they cannot be
    /// tracked by deltas, so they are counted and left out.
    unkeyed: usize,
    /// The entries of the last answer applied to this copy, full read or delta.
    delta_memo: std::sync::Arc<DeltaMemo>,
}

impl Mirror {
    /// The registry as a full fetch reports it. Takes the answer by value: its instances
    /// move into the copy, so that the registry is not held twice while it is built
    /// (30,000 instances are tens of MiB).
    pub fn from_full(answer: Applications) -> Self {
        let mut mirror = Self::default();
        let mut by_app: BTreeMap<String, Vec<(String, Instance)>> = BTreeMap::new();
        for app in answer.applications {
            let mut keyed = Vec::with_capacity(app.instances.len());
            for instance in app.instances {
                match instance.id() {
                    Some(id) => keyed.push((id.to_string(), into_stored(instance))),
                    None => mirror.unkeyed += 1,
                }
            }
            if !keyed.is_empty() {
                by_app.entry(app.name).or_default().append(&mut keyed);
            }
        }
        mirror.apps = by_app
            .into_iter()
            .map(|(app, instances)| (app, instances.into_iter().collect()))
            .collect();
        mirror
    }

    /// Applies a delta as Eureka clients do: `ADDED` and `MODIFIED` replace the instance,
    /// `DELETED` removes it, an entry without a known `actionType` is ignored, and an
    /// application left without instances is gone. Returns
    /// the applications whose instances changed.
    pub fn apply_delta(&mut self, delta: &Applications) -> BTreeSet<String> {
        let mut changed = BTreeSet::new();
        for app in &delta.applications {
            for instance in &app.instances {
                let did_change = match instance.action_type {
                    Some(ActionType::Deleted) => self.delete(&app.name, instance),
                    Some(ActionType::Added | ActionType::Modified) => self.put(&app.name, instance),
                    // As Eureka clients do: an entry that says nothing about what happened
                    // is not guessed at (the hash check catches what it hid).
                    Some(ActionType::Other) | None => false,
                };
                if did_change {
                    changed.insert(app.name.clone());
                }
            }
        }
        changed
    }

    /// What the last delta applied held (see [`DeltaMemo`]).
    pub fn delta_memo(&self) -> std::sync::Arc<DeltaMemo> {
        self.delta_memo.clone()
    }

    /// Remembers the entries of the delta just applied.
    pub fn remember_delta(&mut self, memo: DeltaMemo) {
        self.delta_memo = std::sync::Arc::new(memo);
    }

    /// Eureka's reconcile hash code of this copy: `<STATUS>_<count>_` for each status
    /// present, in status-name order (`DOWN_1_UP_3_`); empty for an empty registry.
    pub fn reconcile_hash(&self) -> String {
        let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
        for instance in self.apps.values().flat_map(|a| a.values()) {
            *counts.entry(instance.status.as_str()).or_default() += 1;
        }
        counts
            .into_iter()
            .map(|(status, count)| format!("{status}_{count}_"))
            .collect()
    }

    /// The instances of `app`, if it has any.
    pub fn app(&self, app: &str) -> Option<&AppInstances> {
        self.apps.get(app)
    }

    /// Every application with its instances.
    pub fn apps(&self) -> impl Iterator<Item = (&str, &AppInstances)> {
        self.apps
            .iter()
            .map(|(name, instances)| (name.as_str(), instances))
    }

    /// Instances in the copy.
    pub fn instance_count(&self) -> usize {
        self.apps.values().map(AppInstances::len).sum()
    }

    /// Instances of `status` in the copy.
    pub fn count_of(&self, status: Status) -> usize {
        self.apps
            .values()
            .flat_map(|a| a.values())
            .filter(|i| i.status == status)
            .count()
    }

    /// Instances left out because they had no id.
    pub fn unkeyed(&self) -> usize {
        self.unkeyed
    }

    fn put(&mut self, app: &str, instance: &Instance) -> bool {
        let Some(id) = instance.id() else {
            self.unkeyed += 1;
            return false;
        };
        let stored = stored(instance);
        let instances = self.apps.entry(app.to_string()).or_default();
        match instances.get(id) {
            Some(existing) if *existing == stored => false,
            _ => {
                instances.insert(id, stored);
                true
            }
        }
    }

    fn delete(&mut self, app: &str, instance: &Instance) -> bool {
        let Some(id) = instance.id() else {
            return false;
        };
        let Some(instances) = self.apps.get_mut(app) else {
            return false;
        };
        let removed = instances.remove(id);
        if instances.is_empty() {
            self.apps.remove(app);
        }
        removed
    }
}

/// An instance as the mirror keeps it. The action type tells how the instance got
/// here, and the dirty timestamp when, not what it is: two copies of one instance must
/// compare equal whichever answer they came from.
fn stored(instance: &Instance) -> Instance {
    into_stored(instance.clone())
}

/// [`stored`] of an instance the caller gives up.
///
/// Fields the mirror never reads are dropped too (four strings per instance, 120,000
/// allocations at 10,000 applications × 3): the id, which is the instance's key in its
/// application, the host name it may come from, the application, which is the key of
/// the instance list, and the secure VIP (the published domain comes from the VIP).
fn into_stored(mut instance: Instance) -> Instance {
    instance.action_type = None;
    instance.last_dirty_timestamp = None;
    instance.instance_id = None;
    instance.host_name = None;
    instance.app = None;
    instance.secure_vip_address = None;
    instance
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::eureka::api::Application;

    fn instance(id: &str, status: Status, action: Option<ActionType>) -> Instance {
        Instance {
            instance_id: Some(id.to_string()),
            ip_addr: Some("192.0.2.1".into()),
            status,
            action_type: action,
            ..Instance::default()
        }
    }

    fn answer(apps: &[(&str, Vec<Instance>)], hash: &str) -> Applications {
        Applications {
            apps_hashcode: Some(hash.to_string()),
            applications: apps
                .iter()
                .map(|(name, instances)| Application {
                    name: name.to_string(),
                    instances: instances.clone(),
                })
                .collect(),
        }
    }

    #[test]
    fn app_instances_stay_sorted_and_the_last_of_one_id_wins() {
        let up = instance("b", Status::Up, None);
        let down = instance("b", Status::Down, None);
        let mut apps: AppInstances = [
            ("b".to_string(), up.clone()),
            ("a".to_string(), up.clone()),
            ("b".to_string(), down.clone()),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            apps.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(apps.get("b"), Some(&down));
        apps.insert("c", up.clone());
        apps.insert("0", up.clone());
        apps.insert("b", up.clone());
        assert_eq!(
            apps.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            ["0", "a", "b", "c"]
        );
        assert_eq!(apps.get("b"), Some(&up));
        assert!(apps.remove("a") && !apps.remove("a"));
        assert_eq!(apps.len(), 3);
        assert_eq!(apps.get("zzz"), None);
    }

    #[test]
    fn hash_code_matches_eurekas_format() {
        let full = answer(
            &[
                (
                    "A",
                    vec![
                        instance("a1", Status::Up, None),
                        instance("a2", Status::OutOfService, None),
                    ],
                ),
                (
                    "B",
                    vec![
                        instance("b1", Status::Up, None),
                        instance("b2", Status::Down, None),
                    ],
                ),
            ],
            "",
        );
        let mirror = Mirror::from_full(full.clone());
        assert_eq!(mirror.reconcile_hash(), "DOWN_1_OUT_OF_SERVICE_1_UP_2_");
        assert_eq!(Mirror::default().reconcile_hash(), "");
        assert_eq!(mirror.instance_count(), 4);
        assert_eq!(mirror.count_of(Status::Up), 2);
    }

    /// The instance type carries the writer's `lastDirtyTimestamp` too: a copy that
    /// differs only in it (a client re-registering unchanged) is no change for the
    /// source, which would otherwise rebuild the application for nothing.
    #[test]
    fn a_new_dirty_timestamp_alone_is_no_change() {
        let dirty = |at: i64, action| Instance {
            last_dirty_timestamp: Some(at),
            ..instance("a1", Status::Up, action)
        };
        let mut mirror = Mirror::from_full(answer(&[("A", vec![dirty(1, None)])], "UP_1_"));
        let changed = mirror.apply_delta(&answer(
            &[("A", vec![dirty(2, Some(ActionType::Modified))])],
            "UP_1_",
        ));
        assert!(changed.is_empty(), "{changed:?}");
        let changed = mirror.apply_delta(&answer(
            &[(
                "A",
                vec![Instance {
                    status: Status::Down,
                    ..dirty(3, Some(ActionType::Modified))
                }],
            )],
            "DOWN_1_",
        ));
        assert_eq!(changed, BTreeSet::from(["A".into()]));
    }

    #[test]
    fn deltas_add_modify_and_delete() {
        let mut mirror = Mirror::from_full(answer(
            &[("A", vec![instance("a1", Status::Up, None)])],
            "UP_1_",
        ));
        let changed = mirror.apply_delta(&answer(
            &[
                (
                    "A",
                    vec![
                        instance("a1", Status::OutOfService, Some(ActionType::Modified)),
                        instance("a2", Status::Up, Some(ActionType::Added)),
                    ],
                ),
                (
                    "B",
                    vec![instance("b1", Status::Up, Some(ActionType::Added))],
                ),
            ],
            "OUT_OF_SERVICE_1_UP_2_",
        ));
        assert_eq!(changed, BTreeSet::from(["A".into(), "B".into()]));
        assert_eq!(mirror.reconcile_hash(), "OUT_OF_SERVICE_1_UP_2_");

        let changed = mirror.apply_delta(&answer(
            &[(
                "B",
                vec![instance("b1", Status::Up, Some(ActionType::Deleted))],
            )],
            "OUT_OF_SERVICE_1_UP_1_",
        ));
        assert_eq!(changed, BTreeSet::from(["B".into()]));
        assert!(
            mirror.app("B").is_none(),
            "an app without instances is gone"
        );
        assert_eq!(mirror.app("A").map(AppInstances::len), Some(2));
    }

    #[test]
    fn replaying_a_delta_changes_nothing() {
        // A delta lists the changes of the last few minutes, so changes already seen in
        // the full fetch come again; applying them again must be a no-op.
        let full = answer(&[("A", vec![instance("a1", Status::Up, None)])], "UP_1_");
        let delta = answer(
            &[
                (
                    "A",
                    vec![instance("a1", Status::Up, Some(ActionType::Added))],
                ),
                (
                    "C",
                    vec![instance("c1", Status::Up, Some(ActionType::Deleted))],
                ),
            ],
            "UP_1_",
        );
        let mut mirror = Mirror::from_full(full.clone());
        assert!(mirror.apply_delta(&delta).is_empty());
        assert_eq!(mirror, Mirror::from_full(full.clone()));
    }

    #[test]
    fn delta_entries_without_a_known_action_are_ignored() {
        let full = answer(&[("A", vec![instance("a1", Status::Up, None)])], "UP_1_");
        let mut mirror = Mirror::from_full(full.clone());
        let changed = mirror.apply_delta(&answer(
            &[(
                "A",
                vec![
                    instance("a1", Status::Down, None),
                    instance("a2", Status::Up, Some(ActionType::Other)),
                ],
            )],
            "UP_1_",
        ));
        assert!(changed.is_empty());
        assert_eq!(mirror, Mirror::from_full(full.clone()));
    }

    #[test]
    fn instances_without_an_id_are_counted_not_kept() {
        let nameless = Instance {
            status: Status::Up,
            ..Instance::default()
        };
        let mirror = Mirror::from_full(answer(
            &[("A", vec![nameless, instance("a1", Status::Up, None)])],
            "UP_2_",
        ));
        assert_eq!(mirror.instance_count(), 1);
        assert_eq!(mirror.unkeyed(), 1);
        assert_ne!(
            mirror.reconcile_hash(),
            "UP_2_",
            "so the hash check sees the copy is not the server's registry"
        );
    }
}
