//! Watched caches of the objects this connector owns, indexed by service name.
//!
//! Each cache is fed by a kube-runtime `watcher` (label-selected on our ownership
//! labels, with its standard reconnect backoff). kube-runtime's reflector `Store` has no
//! secondary index, and the sink needs "all slices of service S" on every reconcile; a
//! scan of every slice per reconcile would make one change cost O(all services). So the
//! watcher's events are applied here to a map keyed by service name, with the same
//! Init / InitApply / InitDone buffering the reflector uses: a relist replaces the
//! content atomically when it is complete, and the services whose objects differ
//! between the old and new content are reported as changed.
//!
//! Every event reports the affected service name, which is how drift (someone editing
//! or deleting a managed object) reaches the reconcile queue.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::coalescer::Coalescer;

/// Objects of one kind, by service name, then object name.
type Index<K> = HashMap<String, BTreeMap<String, Arc<K>>>;

/// The index plus, per object name, the service it is filed under (so that a relabelled
/// object is moved without scanning every service).
struct Indexed<K> {
    by_service: Index<K>,
    service_of_object: HashMap<String, String>,
}

impl<K> Indexed<K> {
    fn from_index(by_service: Index<K>) -> Self {
        let service_of_object = by_service
            .iter()
            .flat_map(|(svc, objs)| objs.keys().map(move |name| (name.clone(), svc.clone())))
            .collect();
        Self {
            by_service,
            service_of_object,
        }
    }
}

/// How an object names the service it belongs to.
pub type ServiceKeyFn<K> = fn(&K) -> Option<String>;

/// One kind's cache.
pub struct ObjectCache<K> {
    index: RwLock<Indexed<K>>,
    service_of: ServiceKeyFn<K>,
    ready: watch::Sender<bool>,
}

struct Relist<K> {
    buffer: Option<Index<K>>,
}

impl<K> ObjectCache<K>
where
    K: Resource + Clone + Send + Sync + 'static,
{
    pub fn new(service_of: ServiceKeyFn<K>) -> Self {
        Self {
            index: RwLock::new(Indexed::from_index(HashMap::new())),
            service_of,
            ready: watch::channel(false).0,
        }
    }

    /// The objects cached for one service.
    pub fn get(&self, service: &str) -> Vec<Arc<K>> {
        self.read()
            .by_service
            .get(service)
            .map(|objs| objs.values().cloned().collect())
            .unwrap_or_default()
    }

    /// One object by service and object name.
    pub fn get_named(&self, service: &str, name: &str) -> Option<Arc<K>> {
        self.read().by_service.get(service)?.get(name).cloned()
    }

    /// Every service name with at least one cached object.
    pub fn service_names(&self) -> Vec<String> {
        self.read().by_service.keys().cloned().collect()
    }

    /// Whether any object is cached for `service`.
    pub fn contains(&self, service: &str) -> bool {
        self.read().by_service.contains_key(service)
    }

    /// Number of services with cached objects.
    pub fn service_count(&self) -> usize {
        self.read().by_service.len()
    }

    /// Waits for the first complete list.
    pub async fn wait_ready(&self) {
        let mut rx = self.ready.subscribe();
        // The sender lives in self, so this only errs if self is gone.
        let _ = rx.wait_for(|ready| *ready).await;
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Applies one watcher event; returns the service names it affects.
    fn apply(&self, relist: &mut Relist<K>, event: Event<K>) -> Vec<String> {
        match event {
            Event::Apply(obj) => self.upsert(obj).into_iter().collect(),
            Event::Delete(obj) => self.remove(&obj).into_iter().collect(),
            Event::Init => {
                relist.buffer = Some(HashMap::new());
                Vec::new()
            }
            Event::InitApply(obj) => {
                if let (Some(buffer), Some(service)) =
                    (relist.buffer.as_mut(), (self.service_of)(&obj))
                {
                    buffer
                        .entry(service)
                        .or_default()
                        .insert(obj.name_any(), Arc::new(strip(obj)));
                }
                Vec::new()
            }
            Event::InitDone => {
                let fresh = relist.buffer.take().unwrap_or_default();
                let mut index = self.write();
                let changed = changed_services(&index.by_service, &fresh);
                *index = Indexed::from_index(fresh);
                drop(index);
                self.ready.send_replace(true);
                changed
            }
        }
    }

    fn upsert(&self, obj: K) -> Option<String> {
        let service = (self.service_of)(&obj)?;
        let name = obj.name_any();
        let mut index = self.write();
        // An object moves between services only by a relabel: drop its stale entry.
        if let Some(previous) = index
            .service_of_object
            .insert(name.clone(), service.clone())
        {
            if previous != service {
                remove_entry(&mut index.by_service, &previous, &name);
            }
        }
        index
            .by_service
            .entry(service.clone())
            .or_default()
            .insert(name, Arc::new(strip(obj)));
        Some(service)
    }

    fn remove(&self, obj: &K) -> Option<String> {
        let service = (self.service_of)(obj)?;
        let name = obj.name_any();
        let mut index = self.write();
        index.service_of_object.remove(&name);
        remove_entry(&mut index.by_service, &service, &name);
        Some(service)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Indexed<K>> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Indexed<K>> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn remove_entry<K>(index: &mut Index<K>, service: &str, name: &str) {
    if let Some(objs) = index.get_mut(service) {
        objs.remove(name);
        if objs.is_empty() {
            index.remove(service);
        }
    }
}

/// Drops `managedFields`: they are most of an object's size and the sink never reads
/// them, so memory stays proportional to what we manage.
fn strip<K: Resource>(mut obj: K) -> K {
    obj.meta_mut().managed_fields = None;
    obj
}

fn changed_services<K: Resource>(old: &Index<K>, new: &Index<K>) -> Vec<String> {
    let version = |o: &Arc<K>| o.meta().resource_version.clone();
    let differs =
        |a: Option<&BTreeMap<String, Arc<K>>>, b: Option<&BTreeMap<String, Arc<K>>>| match (a, b) {
            (Some(a), Some(b)) => {
                a.len() != b.len()
                    || a.iter()
                        .any(|(name, o)| b.get(name).map(version) != Some(version(o)))
            }
            (None, None) => false,
            _ => true,
        };
    let mut names: Vec<String> = old
        .keys()
        .chain(new.keys())
        .filter(|svc| differs(old.get(*svc), new.get(*svc)))
        .cloned()
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Runs the watcher for one cache until the stream ends (it does not: watcher errors
/// are retried with kube-runtime's default backoff), pushing affected names into the
/// coalescer.
pub async fn run_cache<K>(
    api: Api<K>,
    selector: String,
    cache: Arc<ObjectCache<K>>,
    changes: Arc<Coalescer>,
) where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let config = watcher::Config::default().labels(&selector);
    let stream = watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    let mut relist = Relist { buffer: None };
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                let affected = cache.apply(&mut relist, event);
                if !affected.is_empty() {
                    debug!(kind = %K::kind(&()), count = affected.len(), "managed objects changed");
                    changes.push(affected);
                }
            }
            Err(err) => {
                warn!(kind = %K::kind(&()), error = %err, "watch failed; retrying with backoff")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::api::ObjectMeta;

    fn slice(service: &str, name: &str, rv: &str) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                resource_version: Some(rv.into()),
                labels: Some(
                    [(
                        "kubernetes.io/service-name".to_string(),
                        service.to_string(),
                    )]
                    .into(),
                ),
                managed_fields: Some(vec![Default::default()]),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: vec![],
            ports: None,
        }
    }

    fn service_of(s: &EndpointSlice) -> Option<String> {
        s.metadata
            .labels
            .as_ref()?
            .get("kubernetes.io/service-name")
            .cloned()
    }

    #[test]
    fn events_are_indexed_by_service_and_report_it() {
        let cache = ObjectCache::new(service_of as ServiceKeyFn<EndpointSlice>);
        let mut relist = Relist { buffer: None };
        assert_eq!(
            cache.apply(&mut relist, Event::Apply(slice("a", "a-1", "1"))),
            vec!["a"]
        );
        assert_eq!(
            cache.apply(&mut relist, Event::Apply(slice("a", "a-2", "2"))),
            vec!["a"]
        );
        assert_eq!(cache.get("a").len(), 2);
        assert!(
            cache.get("a")[0].metadata.managed_fields.is_none(),
            "managedFields dropped"
        );
        assert_eq!(
            cache.apply(&mut relist, Event::Delete(slice("a", "a-1", "3"))),
            vec!["a"]
        );
        assert_eq!(cache.get("a").len(), 1);
        cache.apply(&mut relist, Event::Delete(slice("a", "a-2", "4")));
        assert!(!cache.contains("a"));
    }

    #[test]
    fn a_relist_swaps_atomically_and_reports_only_differences() {
        let cache = ObjectCache::new(service_of as ServiceKeyFn<EndpointSlice>);
        let mut relist = Relist { buffer: None };
        for ev in [
            Event::Init,
            Event::InitApply(slice("a", "a-1", "1")),
            Event::InitApply(slice("b", "b-1", "1")),
            Event::InitDone,
        ] {
            cache.apply(&mut relist, ev);
        }
        assert!(cache.is_ready());
        // During a relist the old content stays visible.
        cache.apply(&mut relist, Event::Init);
        cache.apply(&mut relist, Event::InitApply(slice("a", "a-1", "1")));
        cache.apply(&mut relist, Event::InitApply(slice("c", "c-1", "5")));
        assert!(cache.contains("b"));
        let changed = cache.apply(&mut relist, Event::InitDone);
        assert_eq!(changed, vec!["b", "c"]);
        assert!(!cache.contains("b"));
        assert!(cache.contains("c"));
    }

    #[test]
    fn a_relabelled_object_moves_between_services() {
        let cache = ObjectCache::new(service_of as ServiceKeyFn<EndpointSlice>);
        let mut relist = Relist { buffer: None };
        cache.apply(&mut relist, Event::Apply(slice("a", "x", "1")));
        cache.apply(&mut relist, Event::Apply(slice("b", "x", "2")));
        assert!(!cache.contains("a"));
        assert_eq!(cache.get("b").len(), 1);
    }
}
