//! The catalog: what the registry currently holds, keyed by Kubernetes service name.
//!
//! A registry source writes registry-named services into it (a complete snapshot with
//! [`Catalog::replace_all`], then single changes with [`Catalog::upsert`] and
//! [`Catalog::remove`]); the sink reads it with [`Aggregator::aggregate`] at reconcile
//! time, so the sync path never calls the registry. Every write reports the Kubernetes
//! names whose content really changed on the change channel, which is how one registry
//! change becomes one reconcile.
//!
//! This is also where registry names become Kubernetes names: two registry names that
//! map to one Kubernetes name are reported, not merged. The winner is chosen
//! deterministically (the registry name that already is the Kubernetes name, else the
//! smallest), so it does not flap with arrival order.
//!
//! It holds every published service for the life of the process, so it keeps them in a
//! compact form ([`stored`]) and builds a `MicroSvcMeta` only when one is asked for.

mod stored;

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use tokio::sync::mpsc;
use tracing::warn;

use crate::model::{MicroSvcMeta, MicroSvcName};
use crate::naming::kube_service_name;
use stored::StoredMeta;

/// Answers "what are this service's instances, ports and protocols" from the watched
/// cache: the seed's `Aggregator`, keyed by the Kubernetes service name.
pub trait Aggregator: Send + Sync {
    fn aggregate(&self, kube_name: &str) -> Option<MicroSvcMeta>;
}

/// What the catalog tells the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogEvent {
    /// These Kubernetes service names have new content (or are gone).
    Changed(Vec<String>),
    /// The source delivered its first complete snapshot: deletions may now be planned.
    Synced,
}

/// A registry name that lost a Kubernetes name to another registry name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameCollision {
    pub kube_name: String,
    pub winner: MicroSvcName,
    pub rejected: MicroSvcName,
}

/// The registry services that claim one Kubernetes name, sorted by registry name, without
/// duplicates, each in its compact stored form. Nearly always exactly one: a vector of one
/// costs one allocation the size of one service, where a `BTreeMap` node reserves room
/// for eleven (about 1.5 KB per service, most of the catalog's own memory at 10,000
/// services).
#[derive(Debug, Default)]
struct Claims(Vec<StoredMeta>);

impl Claims {
    /// Adds `meta`, or replaces the claim of the same registry name.
    fn insert(&mut self, meta: MicroSvcMeta) {
        let meta = StoredMeta::new(meta);
        match self
            .0
            .binary_search_by(|m| m.registry_name.cmp(&meta.registry_name))
        {
            Ok(i) => self.0[i] = meta,
            Err(i) => {
                self.0.reserve_exact(1);
                self.0.insert(i, meta);
            }
        }
    }

    fn remove(&mut self, registry_name: &MicroSvcName) {
        self.0.retain(|m| m.registry_name != *registry_name);
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = &StoredMeta> {
        self.0.iter()
    }
}

#[derive(Default)]
struct State {
    /// Every registry service that claims a Kubernetes name, by that name.
    claims: HashMap<String, Claims>,
    synced: bool,
    /// Endpoints of all published services, kept up to date on every write.
    endpoints: usize,
}

impl State {
    fn published(&self, kube_name: &str) -> Option<&StoredMeta> {
        let claims = self.claims.get(kube_name)?;
        claims
            .iter()
            .find(|meta| meta.registry_name.as_str() == kube_name)
            .or_else(|| claims.iter().next())
    }

    /// Updates the endpoint total after `kube_name`'s published meta changed from `before`.
    fn recount(&mut self, before: Option<&StoredMeta>, kube_name: &str) {
        let was = before.map_or(0, StoredMeta::endpoint_count);
        let now = self
            .published(kube_name)
            .map_or(0, StoredMeta::endpoint_count);
        self.endpoints = (self.endpoints + now).saturating_sub(was);
    }

    fn collisions(&self, kube_name: &str) -> Vec<NameCollision> {
        let Some(claims) = self.claims.get(kube_name) else {
            return Vec::new();
        };
        let Some(winner) = self.published(kube_name).map(|m| m.registry_name.clone()) else {
            return Vec::new();
        };
        claims
            .iter()
            .map(|meta| &meta.registry_name)
            .filter(|name| **name != winner)
            .map(|rejected| NameCollision {
                kube_name: kube_name.to_string(),
                winner: winner.clone(),
                rejected: rejected.clone(),
            })
            .collect()
    }
}

/// The registry-neutral catalog shared by one source and the sink.
pub struct Catalog {
    state: Mutex<State>,
    events: mpsc::UnboundedSender<CatalogEvent>,
}

impl Catalog {
    /// A new empty catalog and the receiving end of its change channel.
    pub fn new() -> (Self, mpsc::UnboundedReceiver<CatalogEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        (
            Self {
                state: Mutex::new(State::default()),
                events,
            },
            rx,
        )
    }

    /// Replaces the whole content with a complete snapshot from the source: the seed's
    /// `SetServices`. The first call marks the catalog synced.
    pub fn replace_all(&self, services: impl IntoIterator<Item = MicroSvcMeta>) {
        let mut next: HashMap<String, Claims> = HashMap::new();
        for meta in services {
            next.entry(kube_service_name(meta.registry_name.as_str()))
                .or_default()
                .insert(meta);
        }
        let mut state = self.lock();
        let before: BTreeSet<String> = state.claims.keys().cloned().collect();
        let old = std::mem::replace(
            &mut *state,
            State {
                claims: next,
                synced: true,
                endpoints: 0,
            },
        );
        state.endpoints = state
            .claims
            .keys()
            .filter_map(|name| state.published(name))
            .map(StoredMeta::endpoint_count)
            .sum();
        let names: BTreeSet<String> = before
            .into_iter()
            .chain(state.claims.keys().cloned())
            .collect();
        let changed: Vec<String> = names
            .into_iter()
            .filter(|name| old.published(name) != state.published(name))
            .collect();
        let collisions: Vec<NameCollision> = state
            .claims
            .iter()
            .filter(|(_, claims)| claims.len() > 1)
            .flat_map(|(name, _)| state.collisions(name))
            .collect();
        let first_sync = !old.synced;
        drop(state);
        report_collisions(&collisions);
        self.emit(changed);
        if first_sync {
            let _ = self.events.send(CatalogEvent::Synced);
        }
    }

    /// Adds or replaces one registry service.
    pub fn upsert(&self, meta: MicroSvcMeta) {
        let kube_name = kube_service_name(meta.registry_name.as_str());
        let mut state = self.lock();
        let before = state.published(&kube_name).cloned();
        state
            .claims
            .entry(kube_name.clone())
            .or_default()
            .insert(meta);
        let changed = before.as_ref() != state.published(&kube_name);
        state.recount(before.as_ref(), &kube_name);
        let collisions = state.collisions(&kube_name);
        drop(state);
        report_collisions(&collisions);
        if changed {
            self.emit(vec![kube_name]);
        }
    }

    /// Removes one registry service (its instances are all gone from the registry).
    pub fn remove(&self, registry_name: &MicroSvcName) {
        let kube_name = kube_service_name(registry_name.as_str());
        let mut state = self.lock();
        let before = state.published(&kube_name).cloned();
        if let Some(claims) = state.claims.get_mut(&kube_name) {
            claims.remove(registry_name);
            if claims.is_empty() {
                state.claims.remove(&kube_name);
            }
        }
        let changed = before.as_ref() != state.published(&kube_name);
        state.recount(before.as_ref(), &kube_name);
        drop(state);
        if changed {
            self.emit(vec![kube_name]);
        }
    }

    /// Endpoints of all published services.
    pub fn endpoint_count(&self) -> usize {
        self.lock().endpoints
    }

    /// Whether the source has delivered a complete snapshot.
    pub fn is_synced(&self) -> bool {
        self.lock().synced
    }

    /// Every Kubernetes name the catalog publishes (used for full passes only).
    pub fn kube_names(&self) -> Vec<String> {
        self.lock().claims.keys().cloned().collect()
    }

    /// Whether `kube_name` is published.
    pub fn contains(&self, kube_name: &str) -> bool {
        self.lock().claims.contains_key(kube_name)
    }

    /// Number of published Kubernetes services.
    pub fn len(&self) -> usize {
        self.lock().claims.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registry names currently refused because another one holds their Kubernetes name.
    pub fn collisions(&self) -> Vec<NameCollision> {
        let state = self.lock();
        state
            .claims
            .iter()
            .filter(|(_, claims)| claims.len() > 1)
            .flat_map(|(name, _)| state.collisions(name))
            .collect()
    }

    fn emit(&self, changed: Vec<String>) {
        if !changed.is_empty() {
            // A closed channel means the sink has stopped; the catalog stays readable.
            let _ = self.events.send(CatalogEvent::Changed(changed));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind, still consistent
        // enough to read: recover instead of poisoning every later call.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Aggregator for Catalog {
    fn aggregate(&self, kube_name: &str) -> Option<MicroSvcMeta> {
        self.lock().published(kube_name).map(StoredMeta::to_meta)
    }
}

fn report_collisions(collisions: &[NameCollision]) {
    for c in collisions {
        warn!(
            kube_name = %c.kube_name,
            winner = %c.winner,
            rejected = %c.rejected,
            "two registry services map to one Kubernetes name; keeping the winner, skipping the other"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MicroEndpoint, MicroSvcDomainName};

    fn svc(name: &str, addrs: &[&str]) -> MicroSvcMeta {
        MicroSvcMeta::new(
            MicroSvcName(name.to_string()),
            MicroSvcDomainName(format!("{name}.service.consul")),
            addrs
                .iter()
                .map(|a| MicroEndpoint {
                    addr: a.parse().expect("test address"),
                    ports: Default::default(),
                    ready: true,
                    zone: None,
                })
                .collect(),
        )
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<CatalogEvent>) -> Vec<CatalogEvent> {
        let mut out = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            out.push(ev);
        }
        out
    }

    #[test]
    fn first_snapshot_reports_every_service_then_synced() {
        let (catalog, mut rx) = Catalog::new();
        assert!(!catalog.is_synced());
        catalog.replace_all([svc("a", &["192.0.2.1"]), svc("b", &["192.0.2.2"])]);
        assert!(catalog.is_synced());
        assert_eq!(
            drain(&mut rx),
            vec![
                CatalogEvent::Changed(vec!["a".into(), "b".into()]),
                CatalogEvent::Synced
            ]
        );
    }

    #[test]
    fn a_snapshot_reports_only_what_changed() {
        let (catalog, mut rx) = Catalog::new();
        catalog.replace_all([svc("a", &["192.0.2.1"]), svc("b", &["192.0.2.2"])]);
        drain(&mut rx);
        catalog.replace_all([svc("a", &["192.0.2.1"]), svc("c", &["192.0.2.3"])]);
        assert_eq!(
            drain(&mut rx),
            vec![CatalogEvent::Changed(vec!["b".into(), "c".into()])]
        );
    }

    #[test]
    fn an_unchanged_upsert_is_silent() {
        let (catalog, mut rx) = Catalog::new();
        catalog.upsert(svc("a", &["192.0.2.1"]));
        assert_eq!(
            drain(&mut rx),
            vec![CatalogEvent::Changed(vec!["a".into()])]
        );
        catalog.upsert(svc("a", &["192.0.2.1"]));
        assert!(drain(&mut rx).is_empty());
        catalog.upsert(svc("a", &["192.0.2.1", "192.0.2.9"]));
        assert_eq!(
            drain(&mut rx),
            vec![CatalogEvent::Changed(vec!["a".into()])]
        );
    }

    #[test]
    fn registry_names_are_sanitised_and_kept() {
        let (catalog, _rx) = Catalog::new();
        catalog.upsert(svc("Orders_Service.v2", &["192.0.2.1"]));
        let meta = catalog.aggregate("orders-service-v2").expect("published");
        assert_eq!(meta.registry_name.as_str(), "Orders_Service.v2");
    }

    #[test]
    fn colliding_names_are_reported_not_merged() {
        let (catalog, _rx) = Catalog::new();
        catalog.upsert(svc("orders_service", &["192.0.2.1"]));
        catalog.upsert(svc("orders.service", &["192.0.2.2"]));
        let published = catalog.aggregate("orders-service").expect("published");
        // Neither is the Kubernetes name itself: the smallest registry name wins.
        assert_eq!(published.registry_name.as_str(), "orders.service");
        assert_eq!(published.endpoints.len(), 1);
        let collisions = catalog.collisions();
        assert_eq!(collisions.len(), 1);
        assert_eq!(collisions[0].rejected.as_str(), "orders_service");

        // The exact name beats both, whatever the arrival order.
        catalog.upsert(svc("orders-service", &["192.0.2.3"]));
        let published = catalog.aggregate("orders-service").expect("published");
        assert_eq!(published.registry_name.as_str(), "orders-service");
        assert_eq!(catalog.collisions().len(), 2);
    }

    #[test]
    fn removing_the_winner_publishes_the_runner_up() {
        let (catalog, mut rx) = Catalog::new();
        catalog.upsert(svc("orders.service", &["192.0.2.1"]));
        catalog.upsert(svc("orders_service", &["192.0.2.2"]));
        drain(&mut rx);
        catalog.remove(&MicroSvcName("orders.service".into()));
        assert_eq!(
            drain(&mut rx),
            vec![CatalogEvent::Changed(vec!["orders-service".into()])]
        );
        let published = catalog.aggregate("orders-service").expect("runner-up");
        assert_eq!(published.registry_name.as_str(), "orders_service");
        catalog.remove(&MicroSvcName("orders_service".into()));
        assert!(catalog.aggregate("orders-service").is_none());
        assert!(catalog.is_empty());
        assert_eq!(catalog.endpoint_count(), 0);
    }

    #[test]
    fn the_endpoint_total_follows_every_write() {
        let (catalog, _rx) = Catalog::new();
        catalog.replace_all([
            svc("a", &["192.0.2.1", "192.0.2.2"]),
            svc("b", &["192.0.2.3"]),
        ]);
        assert_eq!(catalog.endpoint_count(), 3);
        catalog.upsert(svc("a", &["192.0.2.1"]));
        assert_eq!(catalog.endpoint_count(), 2);
        catalog.upsert(svc("c", &["192.0.2.4", "192.0.2.5"]));
        assert_eq!(catalog.endpoint_count(), 4);
        catalog.remove(&MicroSvcName("b".into()));
        assert_eq!(catalog.endpoint_count(), 3);
    }

    #[test]
    fn claims_stay_sorted_and_unique_and_hold_no_spare_room() {
        let mut claims = Claims::default();
        claims.insert(svc("b", &[]));
        assert_eq!(claims.0.capacity(), 1, "one claim, one slot");
        claims.insert(svc("a", &[]));
        claims.insert(svc("b", &["192.0.2.1"]));
        let names: Vec<&str> = claims.iter().map(|m| m.registry_name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(claims.0[1].endpoint_count(), 1, "the same name replaces");
        claims.remove(&MicroSvcName("a".into()));
        assert_eq!(claims.len(), 1);
    }
}
