//! The Kubernetes side of this direction: watches on Services, EndpointSlices and Nodes
//! feeding one in-memory index, and the names of the Services each event touches. Knows
//! nothing of registries.
//!
//! kube-runtime's reflector `Store` has no secondary index, and the question asked on
//! every change is "the slices of this Service", so the watcher events are applied here
//! to maps keyed by Service, with the same Init / InitApply / InitDone buffering the
//! reflector uses: a relist replaces a map whole, and every Service it may have changed
//! is reported. The objects the connector itself wrote from a registry are excluded by
//! the watches' label selectors, so they cost no memory here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::model::ServiceKey;
use crate::labels::{
    CLOUD_SOURCED_SERVICE_LABEL, ENDPOINTSLICE_CONTROLLER_NAME, ENDPOINTSLICE_MANAGED_BY_LABEL,
    SERVICE_NAME_LABEL,
};

/// What a watcher event means for the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// These Services (may) need their instances computed again.
    Services(Vec<ServiceKey>),
    /// A Node's addresses changed, appeared or vanished: NodePort Services need a look.
    Nodes,
    /// One of the three watches has its first complete list.
    Ready(Watched),
}

/// The three watched kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Watched {
    Services,
    EndpointSlices,
    Nodes,
}

/// Services, their EndpointSlices, and Nodes, as the watches last saw them.
#[derive(Debug, Default)]
pub struct ClusterIndex {
    services: HashMap<ServiceKey, Arc<Service>>,
    slices: HashMap<ServiceKey, BTreeMap<String, Arc<EndpointSlice>>>,
    /// Which Service each slice belongs to, by (namespace, slice name), so that a slice
    /// whose service label changed leaves its old Service.
    slice_owner: HashMap<(String, String), ServiceKey>,
    nodes: HashMap<String, Arc<Node>>,
    relist_services: Option<Vec<Service>>,
    relist_slices: Option<Vec<EndpointSlice>>,
    relist_nodes: Option<Vec<Node>>,
}

fn service_key(svc: &Service) -> Option<ServiceKey> {
    Some(ServiceKey::new(
        svc.namespace()?,
        svc.metadata.name.clone()?,
    ))
}

fn slice_key(slice: &EndpointSlice) -> Option<((String, String), ServiceKey)> {
    let ns = slice.namespace()?;
    let name = slice.metadata.name.clone()?;
    let service = slice.labels().get(SERVICE_NAME_LABEL)?.clone();
    Some(((ns.clone(), name), ServiceKey::new(ns, service)))
}

/// What the instances are computed from: fields the watch delivers but no rule reads
/// (managed fields above all, often the largest part of an object) are dropped.
fn slim<K: Resource>(mut obj: K) -> K {
    obj.meta_mut().managed_fields = None;
    obj
}

impl ClusterIndex {
    pub fn service(&self, key: &ServiceKey) -> Option<Arc<Service>> {
        self.services.get(key).cloned()
    }

    /// The EndpointSlices labelled with `key`'s Service.
    pub fn slices(&self, key: &ServiceKey) -> Vec<Arc<EndpointSlice>> {
        self.slices
            .get(key)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The same slices, borrowed (for a computation under the read lock).
    pub fn slices_ref<'a>(
        &'a self,
        key: &ServiceKey,
    ) -> impl Iterator<Item = &'a EndpointSlice> + 'a {
        self.slices
            .get(key)
            .into_iter()
            .flat_map(|m| m.values().map(|s| s.as_ref()))
    }

    pub fn node(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes.get(name).cloned()
    }

    pub fn node_ref(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name).map(|n| n.as_ref())
    }

    /// Every Service key the index knows.
    pub fn service_keys(&self) -> Vec<ServiceKey> {
        self.services.keys().cloned().collect()
    }

    /// The NodePort Services (a Node change may move their instances).
    pub fn node_port_services(&self) -> Vec<ServiceKey> {
        self.services
            .iter()
            .filter(|(_, s)| s.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("NodePort"))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Applies one Service event; returns the Services it touches.
    pub fn apply_service(&mut self, event: Event<Service>) -> Vec<ServiceKey> {
        match event {
            Event::Apply(svc) => service_key(&svc)
                .map(|key| {
                    self.services.insert(key.clone(), Arc::new(slim(svc)));
                    vec![key]
                })
                .unwrap_or_default(),
            Event::Delete(svc) => service_key(&svc)
                .map(|key| {
                    self.services.remove(&key);
                    vec![key]
                })
                .unwrap_or_default(),
            Event::Init => {
                self.relist_services = Some(Vec::new());
                Vec::new()
            }
            Event::InitApply(svc) => {
                self.relist_services
                    .get_or_insert_with(Vec::new)
                    .push(slim(svc));
                Vec::new()
            }
            Event::InitDone => {
                let listed = self.relist_services.take().unwrap_or_default();
                let mut touched: BTreeSet<ServiceKey> = self.services.keys().cloned().collect();
                self.services = listed
                    .into_iter()
                    .filter_map(|s| Some((service_key(&s)?, Arc::new(s))))
                    .collect();
                touched.extend(self.services.keys().cloned());
                touched.into_iter().collect()
            }
        }
    }

    /// Applies one EndpointSlice event; returns the Services it touches.
    pub fn apply_slice(&mut self, event: Event<EndpointSlice>) -> Vec<ServiceKey> {
        match event {
            Event::Apply(slice) => {
                let mut touched = self.remove_slice(&slice);
                if let Some((id, key)) = slice_key(&slice) {
                    self.slices
                        .entry(key.clone())
                        .or_default()
                        .insert(id.1.clone(), Arc::new(slim(slice)));
                    self.slice_owner.insert(id, key.clone());
                    touched.push(key);
                }
                touched.dedup();
                touched
            }
            Event::Delete(slice) => self.remove_slice(&slice),
            Event::Init => {
                self.relist_slices = Some(Vec::new());
                Vec::new()
            }
            Event::InitApply(slice) => {
                self.relist_slices
                    .get_or_insert_with(Vec::new)
                    .push(slim(slice));
                Vec::new()
            }
            Event::InitDone => {
                let listed = self.relist_slices.take().unwrap_or_default();
                let mut touched: BTreeSet<ServiceKey> = self.slices.keys().cloned().collect();
                self.slices.clear();
                self.slice_owner.clear();
                for slice in listed {
                    if let Some((id, key)) = slice_key(&slice) {
                        self.slices
                            .entry(key.clone())
                            .or_default()
                            .insert(id.1.clone(), Arc::new(slice));
                        self.slice_owner.insert(id, key);
                    }
                }
                touched.extend(self.slices.keys().cloned());
                touched.into_iter().collect()
            }
        }
    }

    /// Removes the slice (by namespace and name) from whichever Service held it.
    fn remove_slice(&mut self, slice: &EndpointSlice) -> Vec<ServiceKey> {
        let (Some(ns), Some(name)) = (slice.namespace(), slice.metadata.name.clone()) else {
            return Vec::new();
        };
        let Some(key) = self.slice_owner.remove(&(ns, name.clone())) else {
            return Vec::new();
        };
        if let Some(map) = self.slices.get_mut(&key) {
            map.remove(&name);
            if map.is_empty() {
                self.slices.remove(&key);
            }
        }
        vec![key]
    }

    /// Applies one Node event; true when an address set changed (a Node's status is
    /// rewritten often for conditions no rule reads).
    pub fn apply_node(&mut self, event: Event<Node>) -> bool {
        let addresses = |n: &Node| n.status.as_ref().and_then(|s| s.addresses.clone());
        match event {
            Event::Apply(node) => {
                let name = node.name_any();
                let changed =
                    self.nodes.get(&name).map(|old| addresses(old)) != Some(addresses(&node));
                self.nodes.insert(name, Arc::new(slim_node(node)));
                changed
            }
            Event::Delete(node) => self.nodes.remove(&node.name_any()).is_some(),
            Event::Init => {
                self.relist_nodes = Some(Vec::new());
                false
            }
            Event::InitApply(node) => {
                self.relist_nodes
                    .get_or_insert_with(Vec::new)
                    .push(slim_node(node));
                false
            }
            Event::InitDone => {
                let listed = self.relist_nodes.take().unwrap_or_default();
                self.nodes = listed
                    .into_iter()
                    .map(|n| (n.name_any(), Arc::new(n)))
                    .collect();
                true
            }
        }
    }
}

/// A Node keeps only its name and addresses: images, conditions and capacity are most
/// of its size and no rule reads them.
fn slim_node(node: Node) -> Node {
    Node {
        metadata: kube::api::ObjectMeta {
            name: node.metadata.name,
            ..Default::default()
        },
        spec: None,
        status: node.status.map(|s| k8s_openapi::api::core::v1::NodeStatus {
            addresses: s.addresses,
            ..Default::default()
        }),
    }
}

/// The shared index and the watch tasks that feed it.
pub type SharedIndex = Arc<RwLock<ClusterIndex>>;

/// Starts the three watches (cluster-wide; the selection filters namespaces) feeding
/// `index` and sending what they touch on `tx`, until `stop`.
pub fn spawn_watches(
    client: Client,
    index: SharedIndex,
    tx: mpsc::UnboundedSender<Change>,
    stop: CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    // Never our own registry-sourced objects: they are never registered back, and at
    // 10,000 registry services they would double this index.
    let services = watcher::Config::default().labels(&format!("!{CLOUD_SOURCED_SERVICE_LABEL}"));
    let slices = watcher::Config::default().labels(&format!(
        "{ENDPOINTSLICE_MANAGED_BY_LABEL}!={ENDPOINTSLICE_CONTROLLER_NAME}"
    ));
    vec![
        spawn_one(
            Api::<Service>::all(client.clone()),
            services,
            Watched::Services,
            index.clone(),
            tx.clone(),
            stop.clone(),
            |ix, e| Some(Change::Services(ix.apply_service(e))),
        ),
        spawn_one(
            Api::<EndpointSlice>::all(client.clone()),
            slices,
            Watched::EndpointSlices,
            index.clone(),
            tx.clone(),
            stop.clone(),
            |ix, e| Some(Change::Services(ix.apply_slice(e))),
        ),
        spawn_one(
            Api::<Node>::all(client),
            watcher::Config::default(),
            Watched::Nodes,
            index,
            tx,
            stop,
            |ix, e| ix.apply_node(e).then_some(Change::Nodes),
        ),
    ]
}

fn spawn_one<K, F>(
    api: Api<K>,
    config: watcher::Config,
    kind: Watched,
    index: SharedIndex,
    tx: mpsc::UnboundedSender<Change>,
    stop: CancellationToken,
    apply: F,
) -> tokio::task::JoinHandle<()>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default,
    F: Fn(&mut ClusterIndex, Event<K>) -> Option<Change> + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
        let mut ready = false;
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => return,
                event = stream.next() => event,
            };
            let event = match event {
                Some(Ok(event)) => event,
                Some(Err(e)) => {
                    // The backoff retries; the index keeps its last view meanwhile.
                    warn!(kind = ?kind, error = %e, "watch failed; retrying");
                    continue;
                }
                None => return,
            };
            let done = matches!(event, Event::InitDone);
            let change = {
                let mut ix = index.write().unwrap_or_else(|e| e.into_inner());
                apply(&mut ix, event)
            };
            if let Some(change) = change {
                if !matches!(&change, Change::Services(keys) if keys.is_empty())
                    && tx.send(change).is_err()
                {
                    return;
                }
            }
            if done && !ready {
                ready = true;
                debug!(kind = ?kind, "watch listed");
                if tx.send(Change::Ready(kind)).is_err() {
                    return;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    fn svc(ns: &str, name: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn slice(ns: &str, name: &str, service: &str) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                labels: Some([(SERVICE_NAME_LABEL.to_string(), service.to_string())].into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: vec![],
            ports: None,
        }
    }

    fn key(ns: &str, name: &str) -> ServiceKey {
        ServiceKey::new(ns, name)
    }

    #[test]
    fn slices_are_indexed_by_their_service() {
        let mut ix = ClusterIndex::default();
        assert_eq!(
            ix.apply_slice(Event::Apply(slice("a", "web-1", "web"))),
            vec![key("a", "web")]
        );
        ix.apply_slice(Event::Apply(slice("a", "web-2", "web")));
        ix.apply_slice(Event::Apply(slice("b", "web-1", "web")));
        assert_eq!(ix.slices(&key("a", "web")).len(), 2);
        assert_eq!(ix.slices(&key("b", "web")).len(), 1);
        // A slice relabelled to another Service leaves the first one.
        let touched = ix.apply_slice(Event::Apply(slice("a", "web-2", "api")));
        assert_eq!(touched, vec![key("a", "web"), key("a", "api")]);
        assert_eq!(ix.slices(&key("a", "web")).len(), 1);
        assert_eq!(
            ix.apply_slice(Event::Delete(slice("a", "web-1", "web"))),
            vec![key("a", "web")]
        );
        assert!(ix.slices(&key("a", "web")).is_empty());
    }

    #[test]
    fn a_relist_replaces_and_reports_both_sides() {
        let mut ix = ClusterIndex::default();
        ix.apply_service(Event::Apply(svc("a", "old")));
        ix.apply_service(Event::Init);
        ix.apply_service(Event::InitApply(svc("a", "new")));
        // Nothing changes before the list is complete.
        assert!(ix.service(&key("a", "old")).is_some());
        let touched = ix.apply_service(Event::InitDone);
        assert_eq!(touched, vec![key("a", "new"), key("a", "old")]);
        assert!(ix.service(&key("a", "old")).is_none());
        assert_eq!(ix.service_keys(), vec![key("a", "new")]);

        ix.apply_slice(Event::Apply(slice("a", "gone-1", "gone")));
        ix.apply_slice(Event::Init);
        ix.apply_slice(Event::InitApply(slice("a", "new-1", "new")));
        let touched = ix.apply_slice(Event::InitDone);
        assert_eq!(touched, vec![key("a", "gone"), key("a", "new")]);
        assert!(ix.slices(&key("a", "gone")).is_empty());
    }

    #[test]
    fn nodes_report_only_address_changes() {
        use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};
        let node = |addr: &str, ready: &str| Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                ..Default::default()
            },
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: addr.into(),
                }]),
                phase: Some(ready.into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut ix = ClusterIndex::default();
        assert!(ix.apply_node(Event::Apply(node("198.51.100.1", "a"))));
        assert!(!ix.apply_node(Event::Apply(node("198.51.100.1", "b"))));
        assert!(ix.apply_node(Event::Apply(node("198.51.100.2", "b"))));
        assert!(ix
            .node("n1")
            .and_then(|n| n.status.clone())
            .and_then(|s| s.phase)
            .is_none());
        assert!(ix.apply_node(Event::Delete(node("198.51.100.2", "b"))));
        assert!(!ix.apply_node(Event::Delete(node("198.51.100.2", "b"))));
    }
}
