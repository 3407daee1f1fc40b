//! The only place that writes to Kubernetes: create, update, delete.
//!
//! Every write waits for the client-side rate limiter, checks leadership, and is counted
//! by kind, verb and result. Ownership is checked before anything is changed:
//! - an object missing from our cache is created with a plain POST, which fails with
//!   409 AlreadyExists instead of adopting an object someone else made; the object is
//!   then read back, updated if it is ours (our cache was only behind) or reported as a
//!   clash and left untouched if it is not;
//! - an object in our cache whose fingerprint differs from the desired one is read
//!   (the cache keeps only a projection, see `sink::project`), checked for our labels
//!   again, and updated with a PUT of the live object with our content laid over it
//!   (see [`overlay`]), with the resourceVersion just read as precondition: what we own
//!   is restored exactly (extra ports someone added are removed), labels and
//!   annotations others added are kept, and a concurrent change makes the write fail
//!   and retry instead of being lost. When the read shows the object already matches
//!   (the cache was behind), nothing is written;
//! - deletes carry a UID precondition, so only the object we saw (ours) is deleted.
//!
//! Why not server-side apply: objects are created with POST (to never adopt), and
//! fields set by a create belong to an "Update" manager that a later apply cannot
//! remove (a port dropped by the registry would stay), so apply would need a managed-
//! fields migration after every create. A whole-object update has no such subtlety.

use std::fmt::Debug;
use std::sync::Arc;

use governor::DefaultDirectRateLimiter;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::metrics::{Kind, Outcome, SinkMetrics, Verb};
use super::plan::{changed_fields, Plan, PlannedWrite};
use super::project::Cached;
use crate::diff::Owned;
use crate::labels::{is_owned, FIELD_MANAGER};

/// What the writer can write: a namespaced built-in kind (Service, EndpointSlice,
/// Endpoints) that serialises both ways.
pub trait Object:
    Resource<Scope = NamespaceResourceScope, DynamicType = ()>
    + Clone
    + Serialize
    + DeserializeOwned
    + Debug
{
}

impl<K> Object for K where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Serialize
        + DeserializeOwned
        + Debug
{
}

/// A write that did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The name is taken by an object this connector does not own.
    #[error("{kind:?} {name} exists and is not managed by this connector; left untouched")]
    Clash {
        kind: Kind,
        name: String,
        /// The foreign object, when it was read (for an event on it).
        object: Option<k8s_openapi::api::core::v1::ObjectReference>,
    },
    /// This process does not hold the leader lease: it must not write.
    #[error("not the leader; {kind:?} {name} left to the lease holder")]
    NotLeader { kind: Kind, name: String },
    /// The update body could not be built (a bug, not a cluster condition).
    #[error("building the update of {kind:?} {name}")]
    Encode {
        kind: Kind,
        name: String,
        #[source]
        source: serde_json::Error,
    },
    /// The apiserver refused or could not be reached.
    #[error("{verb:?} {kind:?} {name}")]
    Api {
        kind: Kind,
        verb: Verb,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl WriteError {
    pub fn is_clash(&self) -> bool {
        matches!(self, WriteError::Clash { .. })
    }

    pub fn is_not_leader(&self) -> bool {
        matches!(self, WriteError::NotLeader { .. })
    }
}

/// What `ensure` did, with the UID of the object now in place (a Service's UID is the
/// owner of its slices and Endpoints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    /// The live object already matched; nothing was written.
    Unchanged { uid: Option<String> },
    /// The object was created or updated.
    Written { uid: Option<String> },
}

impl Ensured {
    pub fn uid(&self) -> Option<&str> {
        match self {
            Ensured::Unchanged { uid } | Ensured::Written { uid } => uid.as_deref(),
        }
    }

    pub fn wrote(&self) -> bool {
        matches!(self, Ensured::Written { .. })
    }

    fn written<K: Resource>(obj: K) -> Self {
        Ensured::Written {
            uid: obj.meta().uid.clone(),
        }
    }
}

/// Writes objects of the sync namespace.
#[derive(Clone)]
pub struct Writer {
    client: Client,
    namespace: String,
    connector_id: String,
    limiter: Arc<DefaultDirectRateLimiter>,
    metrics: Arc<SinkMetrics>,
    leader: watch::Receiver<bool>,
    /// Dry run: record writes here instead of sending them.
    plan: Option<Plan>,
}

impl Writer {
    pub fn new(
        client: Client,
        namespace: String,
        connector_id: String,
        limiter: Arc<DefaultDirectRateLimiter>,
        metrics: Arc<SinkMetrics>,
        leader: watch::Receiver<bool>,
    ) -> Self {
        Self {
            client,
            namespace,
            connector_id,
            limiter,
            metrics,
            leader,
            plan: None,
        }
    }

    /// Records writes in `plan` instead of sending them (a dry run).
    pub fn with_plan(mut self, plan: Plan) -> Self {
        self.plan = Some(plan);
        self
    }

    /// Waits for the rate limiter, then checks leadership: a replica that lost the
    /// lease stops writing at once, even in the middle of a reconcile.
    async fn permit(&self, kind: Kind, name: &str) -> Result<(), WriteError> {
        self.limiter.until_ready().await;
        match self.not_leader(kind, name) {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Makes the live object match `desired`, writing only when the cached fingerprint
    /// of `live` differs from `desired`'s.
    ///
    /// The cache keeps no whole object, and an update is a PUT of the live object with
    /// our fields laid over it, so a difference first reads the object: if it already
    /// matches (the cache was behind) nothing is written, if it is gone it is created,
    /// otherwise it is updated with the resourceVersion just read as precondition.
    pub async fn ensure<K, F>(
        &self,
        kind: Kind,
        desired: &K,
        live: Option<&Cached<F>>,
    ) -> Result<Ensured, WriteError>
    where
        K: Object + Owned,
    {
        if let Some(plan) = &self.plan {
            return Ok(self.plan_ensure(plan, kind, desired, live).await);
        }
        match live {
            Some(live) if live.fingerprint == desired.fingerprint() => {
                Ok(Ensured::Unchanged { uid: live.uid() })
            }
            Some(_) => self.refresh_and_update(kind, desired).await,
            None => self
                .create_or_adopt(kind, desired)
                .await
                .map(Ensured::written),
        }
    }

    /// Reads the live object and updates it unless it already matches.
    async fn refresh_and_update<K>(&self, kind: Kind, desired: &K) -> Result<Ensured, WriteError>
    where
        K: Object + Owned,
    {
        let name = desired.name_any();
        // A standby must not even read on the way to a write it may not make.
        if let Some(err) = self.not_leader(kind, &name) {
            return Err(err);
        }
        match self.read::<K>(kind, &name, Verb::Update).await? {
            Some(live) if is_owned(live.meta(), &self.connector_id) && desired.matches(&live) => {
                Ok(Ensured::Unchanged {
                    uid: live.meta().uid.clone(),
                })
            }
            Some(live) => self
                .update(kind, desired, &live)
                .await
                .map(Ensured::written),
            // Deleted since the cache saw it.
            None => self
                .create_or_adopt(kind, desired)
                .await
                .map(Ensured::written),
        }
    }

    /// One GET, counted; `None` when the object does not exist.
    async fn read<K>(&self, kind: Kind, name: &str, verb: Verb) -> Result<Option<K>, WriteError>
    where
        K: Object,
    {
        self.metrics.record_read(kind);
        self.api::<K>()
            .get_opt(name)
            .await
            .map_err(|source| WriteError::Api {
                kind,
                verb,
                name: name.to_string(),
                source,
            })
    }

    /// The error to answer with when this process may not write (it lost the lease).
    fn not_leader(&self, kind: Kind, name: &str) -> Option<WriteError> {
        (!*self.leader.borrow()).then(|| WriteError::NotLeader {
            kind,
            name: name.to_string(),
        })
    }

    async fn create_or_adopt<K>(&self, kind: Kind, desired: &K) -> Result<K, WriteError>
    where
        K: Object + Owned,
    {
        let name = desired.name_any();
        self.permit(kind, &name).await?;
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            dry_run: false,
        };
        match self.api::<K>().create(&pp, desired).await {
            Ok(created) => {
                self.metrics
                    .record_write(kind, Verb::Create, Outcome::Success);
                debug!(?kind, %name, "created");
                Ok(created)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                self.metrics
                    .record_write(kind, Verb::Create, Outcome::Conflict);
                let existing = self.read::<K>(kind, &name, Verb::Create).await?;
                match existing {
                    // Ours, and our cache had not seen it yet.
                    Some(obj) if is_owned(obj.meta(), &self.connector_id) => {
                        if desired.matches(&obj) {
                            Ok(obj)
                        } else {
                            self.update(kind, desired, &obj).await
                        }
                    }
                    Some(foreign) => {
                        self.metrics.name_clashes.inc();
                        warn!(?kind, %name, namespace = %self.namespace,
                            "name clash: an object of this name exists without our ownership labels; not touching it");
                        Err(WriteError::Clash {
                            kind,
                            name,
                            object: Some(foreign.object_ref(&())),
                        })
                    }
                    // Deleted in between: the retry will create it.
                    None => Err(WriteError::Api {
                        kind,
                        verb: Verb::Create,
                        name,
                        source: kube::Error::Api(status),
                    }),
                }
            }
            Err(source) => {
                self.metrics
                    .record_write(kind, Verb::Create, Outcome::Error);
                Err(WriteError::Api {
                    kind,
                    verb: Verb::Create,
                    name,
                    source,
                })
            }
        }
    }

    /// PUTs `desired` laid over `live`, with `live`'s resourceVersion as precondition.
    async fn update<K>(&self, kind: Kind, desired: &K, live: &K) -> Result<K, WriteError>
    where
        K: Object,
    {
        let name = desired.name_any();
        if !is_owned(live.meta(), &self.connector_id) {
            self.metrics.name_clashes.inc();
            return Err(WriteError::Clash {
                kind,
                name,
                object: Some(live.object_ref(&())),
            });
        }
        let body = overlay(desired, live).map_err(|source| WriteError::Encode {
            kind,
            name: name.clone(),
            source,
        })?;
        self.permit(kind, &name).await?;
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            dry_run: false,
        };
        match self.api::<K>().replace(&name, &pp, &body).await {
            Ok(obj) => {
                self.metrics
                    .record_write(kind, Verb::Update, Outcome::Success);
                debug!(?kind, %name, "updated");
                Ok(obj)
            }
            Err(source) => {
                let result = match &source {
                    kube::Error::Api(s) if s.code == 409 => Outcome::Conflict,
                    _ => Outcome::Error,
                };
                self.metrics.record_write(kind, Verb::Update, result);
                Err(WriteError::Api {
                    kind,
                    verb: Verb::Update,
                    name,
                    source,
                })
            }
        }
    }

    /// A dry run's `ensure`: record what would be written and answer as the apiserver
    /// would (keeping the live object's UID, so owner references render as they would
    /// for real). With [`Plan::with_changes`] an update reads the live object to list
    /// the fields that would change; that read is the only API call a dry run makes
    /// besides the watches.
    async fn plan_ensure<K, F>(
        &self,
        plan: &Plan,
        kind: Kind,
        desired: &K,
        live: Option<&Cached<F>>,
    ) -> Ensured
    where
        K: Object + Owned,
    {
        let name = desired.name_any();
        match live {
            Some(live) if live.fingerprint == desired.fingerprint() => {
                Ensured::Unchanged { uid: live.uid() }
            }
            Some(live) => {
                let changes = if plan.shows_changes() {
                    match self.read::<K>(kind, &name, Verb::Update).await {
                        Ok(Some(obj)) => changed_fields(&to_json(desired), &to_json(&obj)),
                        Ok(None) => vec!["(deleted meanwhile: would be created)".to_string()],
                        Err(err) => vec![format!("(could not read the live object: {err})")],
                    }
                } else {
                    Vec::new()
                };
                plan.record(PlannedWrite {
                    verb: Verb::Update,
                    kind,
                    name,
                    changes,
                });
                Ensured::Written { uid: live.uid() }
            }
            None => {
                plan.record(PlannedWrite {
                    verb: Verb::Create,
                    kind,
                    name: name.clone(),
                    changes: Vec::new(),
                });
                Ensured::Written {
                    uid: Some(format!("dry-run-{name}")),
                }
            }
        }
    }

    /// Deletes the object `name` only if it still has `uid` (the object we cached,
    /// which carries our labels). Already gone, or replaced by another object: nothing
    /// to do.
    pub async fn delete<K>(
        &self,
        kind: Kind,
        name: &str,
        uid: Option<String>,
    ) -> Result<(), WriteError>
    where
        K: Object,
    {
        let Some(uid) = uid else {
            // Never delete blind: without a UID there is no proof of ownership.
            return Ok(());
        };
        if let Some(plan) = &self.plan {
            plan.record(PlannedWrite {
                verb: Verb::Delete,
                kind,
                name: name.to_string(),
                changes: Vec::new(),
            });
            return Ok(());
        }
        self.permit(kind, name).await?;
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::background()
        };
        match self.api::<K>().delete(name, &dp).await {
            Ok(_) => {
                self.metrics
                    .record_write(kind, Verb::Delete, Outcome::Success);
                debug!(?kind, %name, "deleted");
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.code == 404 => {
                self.metrics
                    .record_write(kind, Verb::Delete, Outcome::Success);
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                // UID precondition failed: the name now belongs to another object.
                self.metrics
                    .record_write(kind, Verb::Delete, Outcome::Conflict);
                Ok(())
            }
            Err(source) => {
                self.metrics
                    .record_write(kind, Verb::Delete, Outcome::Error);
                Err(WriteError::Api {
                    kind,
                    verb: Verb::Delete,
                    name: name.to_string(),
                    source,
                })
            }
        }
    }
}

fn to_json<K: Serialize>(obj: &K) -> serde_json::Value {
    serde_json::to_value(obj).unwrap_or(serde_json::Value::Null)
}

/// The object to PUT: `live` with `desired`'s content laid over it.
///
/// - `metadata`: `desired`'s labels and annotations are merged into the live ones (those
///   others added stay); `ownerReferences` are `desired`'s; everything else (uid,
///   resourceVersion as the update's precondition, finalizers) is the live object's.
/// - every other top-level field of `desired` (`spec`, `endpoints`, `ports`, `subsets`,
///   ...) replaces the live one key by key at its first level: for a Service this sets
///   type, ports, clusterIP (when we set it) and externalName and keeps what the
///   apiserver allocated (clusterIPs, ipFamilies, ...); a `selector` is always removed,
///   since a selector makes the endpoints controller fight us over the Endpoints.
/// - the over-capacity annotation of Endpoints is removed when `desired` lacks it: it
///   is ours to set and to clear.
pub fn overlay<K: Serialize + DeserializeOwned>(
    desired: &K,
    live: &K,
) -> Result<K, serde_json::Error> {
    use serde_json::Value;
    let want = serde_json::to_value(desired)?;
    let mut out = serde_json::to_value(live)?;
    let (Value::Object(want), Value::Object(out_map)) = (want, &mut out) else {
        return serde_json::from_value(out);
    };
    for (key, value) in want {
        match key.as_str() {
            "metadata" => {
                let meta = out_map
                    .entry("metadata")
                    .or_insert_with(|| Value::Object(Default::default()));
                merge_metadata(meta, &value);
            }
            "apiVersion" | "kind" | "status" => {}
            "spec" => {
                let spec = out_map
                    .entry("spec")
                    .or_insert_with(|| Value::Object(Default::default()));
                if let (Value::Object(spec), Value::Object(want_spec)) = (spec, value) {
                    spec.remove("selector");
                    for (k, v) in want_spec {
                        spec.insert(k, v);
                    }
                }
            }
            _ => {
                out_map.insert(key, value);
            }
        }
    }
    serde_json::from_value(out)
}

fn merge_metadata(live: &mut serde_json::Value, desired: &serde_json::Value) {
    use serde_json::Value;
    let Value::Object(live) = live else { return };
    live.remove("managedFields");
    // Keys copied from registry metadata last time are ours: drop them, so that the
    // ones the registry no longer has go, and the desired ones come back below.
    let tracked = live
        .get("annotations")
        .and_then(|a| a.get(crate::labels::METADATA_KEYS_ANNOTATION))
        .and_then(Value::as_str)
        .map(crate::labels::parse_metadata_keys);
    if let Some((labels, annotations)) = tracked {
        for (field, keys) in [("labels", labels), ("annotations", annotations)] {
            if let Some(Value::Object(map)) = live.get_mut(field) {
                for key in keys {
                    map.remove(&key);
                }
            }
        }
    }
    for field in ["labels", "annotations"] {
        let entry = live
            .entry(field)
            .or_insert_with(|| Value::Object(Default::default()));
        if entry.is_null() {
            *entry = Value::Object(Default::default());
        }
        if let Value::Object(map) = entry {
            if field == "annotations" {
                let wanted = desired.get("annotations");
                for key in crate::labels::CONDITIONAL_ANNOTATIONS {
                    if wanted.and_then(|a| a.get(*key)).is_none() {
                        map.remove(*key);
                    }
                }
            }
            if let Some(Value::Object(want)) = desired.get(field) {
                for (k, v) in want {
                    map.insert(k.clone(), v.clone());
                }
            }
        }
    }
    match desired.get("ownerReferences") {
        Some(refs) => {
            live.insert("ownerReferences".into(), refs.clone());
        }
        None => {
            live.remove("ownerReferences");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).expect("valid service")
    }

    #[test]
    fn overlay_removes_metadata_keys_the_registry_dropped_and_keeps_others() {
        let desired = svc(json!({
            "metadata": {"name": "a", "labels": {"app.kubernetes.io/managed-by": "registry-connector", "tier": "web"},
                         "annotations": {"connector.flomesh.io/metadata-keys": "labels=tier;annotations="}},
            "spec": {"type": "ClusterIP", "clusterIP": "None"}
        }));
        let live = svc(json!({
            "metadata": {"name": "a", "resourceVersion": "3",
                         "labels": {"app.kubernetes.io/managed-by": "registry-connector",
                                    "version": "1", "tier": "db", "team": "x"},
                         "annotations": {"owner": "jane", "mesh.example/inject": "true",
                                         "connector.flomesh.io/metadata-keys": "labels=version,tier;annotations=owner"}},
            "spec": {"type": "ClusterIP", "clusterIP": "None"}
        }));
        let out = overlay(&desired, &live).expect("overlay");
        let labels = out.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get("version"), None, "dropped by the registry");
        assert_eq!(labels.get("tier").map(String::as_str), Some("web"));
        assert_eq!(
            labels.get("team").map(String::as_str),
            Some("x"),
            "not ours"
        );
        let annotations = out.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(annotations.get("owner"), None);
        assert_eq!(
            annotations.get("mesh.example/inject").map(String::as_str),
            Some("true")
        );
        assert_eq!(
            annotations
                .get("connector.flomesh.io/metadata-keys")
                .map(String::as_str),
            Some("labels=tier;annotations=")
        );

        let plain = svc(json!({
            "metadata": {"name": "a", "labels": {"app.kubernetes.io/managed-by": "registry-connector"}},
            "spec": {"type": "ClusterIP", "clusterIP": "None"}
        }));
        let out = overlay(&plain, &live).expect("overlay");
        let annotations = out.metadata.annotations.unwrap_or_default();
        assert!(!annotations.contains_key("connector.flomesh.io/metadata-keys"));
        assert_eq!(out.metadata.labels.unwrap_or_default().get("tier"), None);
    }

    #[test]
    fn overlay_restores_our_fields_and_keeps_others() {
        let desired = svc(json!({
            "metadata": {"name": "a", "labels": {"app.kubernetes.io/managed-by": "registry-connector"},
                         "annotations": {"flomesh.io/mesh-service-sync": "false"}},
            "spec": {"type": "ClusterIP", "clusterIP": "None", "ports": [{"name": "http80", "port": 80}]}
        }));
        let live = svc(json!({
            "metadata": {"name": "a", "uid": "u1", "resourceVersion": "7",
                         "labels": {"app.kubernetes.io/managed-by": "registry-connector", "team": "x"},
                         "annotations": {"mesh.example/inject": "true"},
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"type": "ClusterIP", "clusterIP": "None", "clusterIPs": ["None"], "selector": {"app": "a"},
                     "ports": [{"name": "http80", "port": 80}, {"name": "oops", "port": 1234}],
                     "sessionAffinity": "None"}
        }));
        let out = overlay(&desired, &live).expect("overlay");
        let meta = &out.metadata;
        assert_eq!(
            meta.resource_version.as_deref(),
            Some("7"),
            "precondition kept"
        );
        assert_eq!(meta.uid.as_deref(), Some("u1"));
        assert!(meta.managed_fields.is_none());
        let labels = meta.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get("team").map(String::as_str),
            Some("x"),
            "others' label kept"
        );
        let annotations = meta.annotations.clone().unwrap_or_default();
        assert_eq!(annotations.len(), 2);
        let spec = out.spec.expect("spec");
        assert!(spec.selector.is_none(), "selector removed");
        assert_eq!(
            spec.ports.unwrap_or_default().len(),
            1,
            "foreign port removed"
        );
        assert_eq!(
            spec.session_affinity.as_deref(),
            Some("None"),
            "defaults kept"
        );
        assert_eq!(
            spec.cluster_ips,
            Some(vec!["None".to_string()]),
            "allocations kept"
        );
    }

    #[test]
    fn overlay_clears_the_over_capacity_annotation_we_no_longer_set() {
        use k8s_openapi::api::core::v1::Endpoints;
        let desired: Endpoints =
            serde_json::from_value(json!({"metadata": {"name": "a"}, "subsets": []})).expect("eps");
        let live: Endpoints = serde_json::from_value(json!({
            "metadata": {"name": "a", "annotations": {"endpoints.kubernetes.io/over-capacity": "truncated"}},
            "subsets": [{"addresses": [{"ip": "192.0.2.1"}]}]
        }))
        .expect("eps");
        let out = overlay(&desired, &live).expect("overlay");
        assert!(out.metadata.annotations.unwrap_or_default().is_empty());
        assert!(out.subsets.unwrap_or_default().is_empty());
    }
}
