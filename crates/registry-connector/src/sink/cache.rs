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
//! The cache holds no whole object: every event's object is projected at once into a
//! [`Cached`] entry (name, UID, ownership, the fingerprint of our fields and the few
//! facts a reconcile reads; see [`super::project`]) and dropped, so a relist
//! buffers projections, not objects.
//!
//! Every event reports the affected service name, which is how drift (someone editing
//! or deleting a managed object) reaches the reconcile queue.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::coalescer::Coalescer;
use super::project::{project, Cached, Project};

/// One cached object, shared with the reconciles that read it.
pub type Entry<K> = Arc<Cached<<K as Project>::Facts>>;

/// Objects of one kind, by service name; each service's objects sorted by name (most
/// services have one object of each kind, so a vector beats a map here).
type Index<K> = HashMap<String, Vec<Entry<K>>>;

/// The index plus, for kinds not filed under their own name (slices), the service each
/// object is filed under, so that a relabelled object is moved without scanning every
/// service.
struct Indexed<K: Project> {
    by_service: Index<K>,
    service_of_object: HashMap<Box<str>, Box<str>>,
}

impl<K: Project> Indexed<K> {
    fn from_index(by_service: Index<K>) -> Self {
        let service_of_object = if K::FILED_BY_OWN_NAME {
            HashMap::new()
        } else {
            by_service
                .iter()
                .flat_map(|(svc, objs)| {
                    objs.iter()
                        .map(move |o| (o.name.clone(), svc.as_str().into()))
                })
                .collect()
        };
        Self {
            by_service,
            service_of_object,
        }
    }
}

/// One kind's cache.
pub struct ObjectCache<K: Project> {
    index: RwLock<Indexed<K>>,
    /// The namespace watched, for references to cached objects.
    namespace: String,
    /// Whose ownership labels make an object ours.
    connector_id: String,
    ready: watch::Sender<bool>,
}

struct Relist<K: Project> {
    buffer: Option<Index<K>>,
}

impl<K: Project> Relist<K> {
    fn new() -> Self {
        Self { buffer: None }
    }
}

impl<K> ObjectCache<K>
where
    K: Project + Send + Sync + 'static,
{
    pub fn new(namespace: impl Into<String>, connector_id: impl Into<String>) -> Self {
        Self {
            index: RwLock::new(Indexed::from_index(HashMap::new())),
            namespace: namespace.into(),
            connector_id: connector_id.into(),
            ready: watch::channel(false).0,
        }
    }

    /// The objects cached for one service, sorted by name.
    pub fn get(&self, service: &str) -> Vec<Entry<K>> {
        self.read()
            .by_service
            .get(service)
            .cloned()
            .unwrap_or_default()
    }

    /// One object by service and object name.
    pub fn get_named(&self, service: &str, name: &str) -> Option<Entry<K>> {
        let index = self.read();
        let objs = index.by_service.get(service)?;
        objs.binary_search_by(|o| (*o.name).cmp(name))
            .ok()
            .map(|i| objs[i].clone())
    }

    /// A reference to one cached object, for an Event about it.
    pub fn reference(&self, service: &str, name: &str) -> Option<ObjectReference> {
        let cached = self.get_named(service, name)?;
        Some(ObjectReference {
            api_version: Some(K::api_version(&()).into_owned()),
            kind: Some(K::kind(&()).into_owned()),
            name: Some(cached.name.to_string()),
            namespace: Some(self.namespace.clone()),
            uid: cached.uid(),
            ..ObjectReference::default()
        })
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

    /// Applies one watcher event; returns the service names it affects. The event's
    /// object is projected and dropped here.
    fn apply(&self, relist: &mut Relist<K>, event: Event<K>) -> Vec<String> {
        match event {
            Event::Apply(obj) => self.upsert(&obj).into_iter().collect(),
            Event::Delete(obj) => self.remove(&obj).into_iter().collect(),
            Event::Init => {
                relist.buffer = Some(HashMap::new());
                Vec::new()
            }
            Event::InitApply(obj) => {
                if let (Some(buffer), Some(service)) = (relist.buffer.as_mut(), obj.service_key()) {
                    let cached = Arc::new(project(&obj, &self.connector_id));
                    insert_sorted(buffer.entry(service).or_default(), cached);
                }
                Vec::new()
            }
            Event::InitDone => {
                let fresh = relist.buffer.take().unwrap_or_default();
                let mut index = self.write();
                let changed = changed_services::<K>(&index.by_service, &fresh);
                *index = Indexed::from_index(fresh);
                drop(index);
                self.ready.send_replace(true);
                changed
            }
        }
    }

    fn upsert(&self, obj: &K) -> Option<String> {
        let service = obj.service_key()?;
        let cached = Arc::new(project(obj, &self.connector_id));
        let mut index = self.write();
        if !K::FILED_BY_OWN_NAME {
            // An object moves between services only by a relabel: drop its stale entry.
            if let Some(previous) = index
                .service_of_object
                .insert(cached.name.clone(), service.as_str().into())
            {
                if *previous != *service {
                    remove_entry::<K>(&mut index.by_service, &previous, &cached.name);
                }
            }
        }
        insert_sorted(index.by_service.entry(service.clone()).or_default(), cached);
        Some(service)
    }

    fn remove(&self, obj: &K) -> Option<String> {
        let service = obj.service_key()?;
        let name = obj.meta().name.as_deref().unwrap_or_default();
        let mut index = self.write();
        index.service_of_object.remove(name);
        remove_entry::<K>(&mut index.by_service, &service, name);
        Some(service)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Indexed<K>> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Indexed<K>> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Inserts or replaces (by name) one entry of a service's sorted list.
fn insert_sorted<F>(objs: &mut Vec<Arc<Cached<F>>>, cached: Arc<Cached<F>>) {
    match objs.binary_search_by(|o| o.name.cmp(&cached.name)) {
        Ok(i) => objs[i] = cached,
        Err(i) => objs.insert(i, cached),
    }
}

fn remove_entry<K: Project>(index: &mut Index<K>, service: &str, name: &str) {
    if let Some(objs) = index.get_mut(service) {
        objs.retain(|o| &*o.name != name);
        if objs.is_empty() {
            index.remove(service);
        }
    }
}

fn changed_services<K: Project>(old: &Index<K>, new: &Index<K>) -> Vec<String> {
    let differs = |a: Option<&Vec<Entry<K>>>, b: Option<&Vec<Entry<K>>>| match (a, b) {
        (Some(a), Some(b)) => a.len() != b.len() || a.iter().zip(b).any(|(x, y)| x != y),
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
    K: Project + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let config = watcher::Config::default().labels(&selector);
    let stream = watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    let mut relist = Relist::new();
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
    use crate::diff::Owned;
    use crate::labels::owner_labels;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
    use kube::api::ObjectMeta;

    fn slice(service: &str, name: &str, rv: &str) -> EndpointSlice {
        let mut labels = owner_labels("c1");
        labels.insert("kubernetes.io/service-name".into(), service.into());
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                uid: Some(format!("uid-{name}")),
                resource_version: Some(rv.into()),
                labels: Some(labels),
                managed_fields: Some(vec![Default::default()]),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: vec![Endpoint {
                addresses: vec!["192.0.2.1".into()],
                ..Default::default()
            }],
            ports: None,
        }
    }

    fn cache() -> ObjectCache<EndpointSlice> {
        ObjectCache::new("ns", "c1")
    }

    #[test]
    fn events_are_indexed_by_service_and_report_it() {
        let cache = cache();
        let mut relist = Relist::new();
        assert_eq!(
            cache.apply(&mut relist, Event::Apply(slice("a", "a-2", "2"))),
            vec!["a"]
        );
        assert_eq!(
            cache.apply(&mut relist, Event::Apply(slice("a", "a-1", "1"))),
            vec!["a"]
        );
        let names: Vec<String> = cache.get("a").iter().map(|o| o.name.to_string()).collect();
        assert_eq!(names, ["a-1", "a-2"], "sorted by name");
        let one = cache.get_named("a", "a-1").expect("cached");
        assert_eq!(one.uid(), Some("uid-a-1".to_string()));
        assert!(one.owned);
        assert_eq!(one.facts.addresses.len(), 1);
        let reference = cache.reference("a", "a-1").expect("reference");
        assert_eq!(reference.kind.as_deref(), Some("EndpointSlice"));
        assert_eq!(reference.namespace.as_deref(), Some("ns"));
        assert_eq!(reference.uid.as_deref(), Some("uid-a-1"));

        // A newer version replaces the entry.
        let mut edited = slice("a", "a-1", "5");
        edited.endpoints.clear();
        cache.apply(&mut relist, Event::Apply(edited.clone()));
        let one = cache.get_named("a", "a-1").expect("cached");
        assert_eq!(one.fingerprint, edited.fingerprint());
        assert_eq!(cache.get("a").len(), 2);

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
        let cache = cache();
        let mut relist = Relist::new();
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
        let cache = cache();
        let mut relist = Relist::new();
        cache.apply(&mut relist, Event::Apply(slice("a", "x", "1")));
        cache.apply(&mut relist, Event::Apply(slice("b", "x", "2")));
        assert!(!cache.contains("a"));
        assert_eq!(cache.get("b").len(), 1);
    }
}
