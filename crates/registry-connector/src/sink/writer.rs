//! The only place that writes to Kubernetes: create, server-side apply, delete.
//!
//! Every write waits for the client-side rate limiter and is counted by kind, verb and
//! result. Ownership is checked before anything is changed:
//! - an object missing from our cache is created with a plain POST, which fails with
//!   409 AlreadyExists instead of adopting an object someone else made; the object is
//!   then read back, applied if it is ours (our cache was only behind) or reported as a
//!   clash and left untouched if it is not;
//! - an object in our cache (hence carrying our labels) is updated by server-side apply
//!   with our field manager and `force`, which restores the fields we own after drift
//!   and leaves fields others added alone;
//! - deletes carry a UID precondition, so only the object we saw (ours) is deleted.

use std::fmt::Debug;
use std::sync::Arc;

use governor::DefaultDirectRateLimiter;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::metrics::{Kind, Outcome, SinkMetrics, Verb};
use super::plan::{changed_fields, Plan, PlannedWrite};
use crate::labels::{is_owned, FIELD_MANAGER};

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

/// What `ensure` did.
#[derive(Debug)]
pub enum Ensured<K> {
    /// The live object already matched; no API call was made.
    Unchanged(K),
    /// The object was created or updated; this is the apiserver's answer.
    Written(K),
}

impl<K> Ensured<K> {
    pub fn object(&self) -> &K {
        match self {
            Ensured::Unchanged(k) | Ensured::Written(k) => k,
        }
    }

    pub fn wrote(&self) -> bool {
        matches!(self, Ensured::Written(_))
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
        if *self.leader.borrow() {
            Ok(())
        } else {
            Err(WriteError::NotLeader {
                kind,
                name: name.to_string(),
            })
        }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Makes the live object match `desired`, writing only when `matches` says it
    /// does not.
    pub async fn ensure<K>(
        &self,
        kind: Kind,
        desired: &K,
        live: Option<&K>,
        matches: fn(&K, &K) -> bool,
    ) -> Result<Ensured<K>, WriteError>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + Serialize
            + DeserializeOwned
            + Debug,
    {
        if let Some(plan) = &self.plan {
            return Ok(plan_ensure(plan, kind, desired, live, matches));
        }
        match live {
            Some(live) if matches(desired, live) => Ok(Ensured::Unchanged(live.clone())),
            Some(_) => self.apply(kind, desired).await.map(Ensured::Written),
            None => self
                .create_or_adopt(kind, desired)
                .await
                .map(Ensured::Written),
        }
    }

    async fn create_or_adopt<K>(&self, kind: Kind, desired: &K) -> Result<K, WriteError>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + Serialize
            + DeserializeOwned
            + Debug,
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
                let existing =
                    self.api::<K>()
                        .get_opt(&name)
                        .await
                        .map_err(|source| WriteError::Api {
                            kind,
                            verb: Verb::Create,
                            name: name.clone(),
                            source,
                        })?;
                match existing {
                    Some(obj) if is_owned(obj.meta(), &self.connector_id) => {
                        // Ours, and our cache had not seen it yet.
                        self.apply(kind, desired).await
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

    async fn apply<K>(&self, kind: Kind, desired: &K) -> Result<K, WriteError>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + Serialize
            + DeserializeOwned
            + Debug,
    {
        let name = desired.name_any();
        self.permit(kind, &name).await?;
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match self
            .api::<K>()
            .patch(&name, &params, &Patch::Apply(desired))
            .await
        {
            Ok(obj) => {
                self.metrics
                    .record_write(kind, Verb::Apply, Outcome::Success);
                debug!(?kind, %name, "applied");
                Ok(obj)
            }
            Err(source) => {
                let result = match &source {
                    kube::Error::Api(s) if s.code == 409 => Outcome::Conflict,
                    _ => Outcome::Error,
                };
                self.metrics.record_write(kind, Verb::Apply, result);
                Err(WriteError::Api {
                    kind,
                    verb: Verb::Apply,
                    name,
                    source,
                })
            }
        }
    }

    /// Replaces the whole object (PUT, with the resourceVersion `obj` carries as the
    /// optimistic-concurrency precondition). Only for the rare case server-side apply
    /// cannot express: removing entries that another field manager added to a list we
    /// must own entirely (a Service's ports).
    pub async fn replace<K>(&self, kind: Kind, obj: &K) -> Result<K, WriteError>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + Serialize
            + DeserializeOwned
            + Debug,
    {
        let name = obj.name_any();
        if let Some(plan) = &self.plan {
            plan.record(PlannedWrite {
                verb: Verb::Replace,
                kind,
                name,
                changes: Vec::new(),
            });
            return Ok(obj.clone());
        }
        if !is_owned(obj.meta(), &self.connector_id) {
            self.metrics.name_clashes.inc();
            return Err(WriteError::Clash {
                kind,
                name,
                object: Some(obj.object_ref(&())),
            });
        }
        self.permit(kind, &name).await?;
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            dry_run: false,
        };
        match self.api::<K>().replace(&name, &pp, obj).await {
            Ok(obj) => {
                self.metrics
                    .record_write(kind, Verb::Replace, Outcome::Success);
                debug!(?kind, %name, "replaced");
                Ok(obj)
            }
            Err(source) => {
                let result = match &source {
                    kube::Error::Api(s) if s.code == 409 => Outcome::Conflict,
                    _ => Outcome::Error,
                };
                self.metrics.record_write(kind, Verb::Replace, result);
                Err(WriteError::Api {
                    kind,
                    verb: Verb::Replace,
                    name,
                    source,
                })
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
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Debug,
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

/// A dry run's `ensure`: record what would be written and answer as the apiserver would
/// (keeping the live object's UID, so owner references render as they would for real).
fn plan_ensure<K>(
    plan: &Plan,
    kind: Kind,
    desired: &K,
    live: Option<&K>,
    matches: fn(&K, &K) -> bool,
) -> Ensured<K>
where
    K: Resource + Clone + Serialize,
{
    let to_json = |k: &K| serde_json::to_value(k).unwrap_or(serde_json::Value::Null);
    match live {
        Some(live) if matches(desired, live) => Ensured::Unchanged(live.clone()),
        Some(live) => {
            plan.record(PlannedWrite {
                verb: Verb::Apply,
                kind,
                name: desired.name_any(),
                changes: changed_fields(&to_json(desired), &to_json(live)),
            });
            let mut answer = desired.clone();
            answer.meta_mut().uid = live.meta().uid.clone();
            Ensured::Written(answer)
        }
        None => {
            plan.record(PlannedWrite {
                verb: Verb::Create,
                kind,
                name: desired.name_any(),
                changes: Vec::new(),
            });
            let mut answer = desired.clone();
            answer.meta_mut().uid = Some(format!("dry-run-{}", desired.name_any()));
            Ensured::Written(answer)
        }
    }
}
