//! One service's reconcile: render what the catalog says, compare it with the cache,
//! write only the difference.
//!
//! Order matters: the Service first (its UID is the slices' and Endpoints' owner, and
//! a clash on the Service stops everything, so that no endpoint is ever attached to a
//! Service we do not own), then the EndpointSlices, then the legacy Endpoints. Deletion
//! goes the other way round.

use std::sync::Arc;

use super::cache::ObjectCache;
use super::metrics::Kind;
use super::project::Project;
use super::writer::{WriteError, Writer};
use crate::catalog::Aggregator;
use crate::diff;
use crate::render::{self, RenderConfig};
use crate::slicing::{plan_endpoint_slices, ExistingSlice};
use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Everything a reconcile reads and writes.
pub struct ReconcileContext {
    pub catalog: Arc<dyn Aggregator>,
    pub render: RenderConfig,
    pub services: Arc<ObjectCache<Service>>,
    pub slices: Arc<ObjectCache<EndpointSlice>>,
    pub endpoints: Arc<ObjectCache<Endpoints>>,
    pub writer: Writer,
}

/// What a reconcile did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconciled {
    /// Objects match the catalog; `writes` API writes were needed for that.
    Synced { writes: usize },
    /// The service is gone from the catalog and its objects were deleted.
    Deleted { writes: usize },
    /// The service is gone from the catalog but deleting is not allowed now.
    DeletionDeferred,
}

impl ReconcileContext {
    /// Whether this connector has any object for `name`.
    pub fn has_objects(&self, name: &str) -> bool {
        self.services.contains(name) || self.slices.contains(name) || self.endpoints.contains(name)
    }

    pub async fn reconcile(&self, name: &str, may_delete: bool) -> Result<Reconciled, WriteError> {
        match self.catalog.aggregate(name) {
            Some(meta) => self.sync(name, &meta).await,
            None if may_delete => self.delete_all(name).await,
            None => Ok(Reconciled::DeletionDeferred),
        }
    }

    async fn sync(
        &self,
        name: &str,
        meta: &crate::model::MicroSvcMeta,
    ) -> Result<Reconciled, WriteError> {
        let mut writes = 0;
        let live_svc = self.services.get_named(name, name);
        let desired_svc = render::service::desired_service_with_live(
            &self.render,
            name,
            meta,
            live_svc.as_ref().map(|live| &live.facts.live),
        );
        let live_svc = match live_svc {
            Some(live) if diff::service_needs_recreate(&desired_svc, live.facts.shape) => {
                // clusterIP cannot change in place (headless <-> virtual IP).
                self.writer
                    .delete::<Service>(Kind::Service, name, live.uid())
                    .await?;
                writes += 1;
                None
            }
            other => other,
        };
        let svc = self
            .writer
            .ensure(Kind::Service, &desired_svc, live_svc.as_deref())
            .await?;
        writes += usize::from(svc.wrote());
        let owner = svc
            .uid()
            .and_then(|uid| render::owner_reference_to(name, uid));

        let live_slices = self.slices.get(name);
        let existing: Vec<ExistingSlice<'_>> = live_slices.iter().map(|s| s.existing()).collect();
        let plan = plan_endpoint_slices(&self.render, name, meta, &existing, owner.clone());

        // Once the Service exists, its slices and Endpoints do not depend on each other:
        // write them concurrently (one round trip per service instead of one per object).
        let slice_writes = plan.desired.iter().map(|desired| {
            let live = live_slices
                .iter()
                .find(|s| Some(&*s.name) == desired.metadata.name.as_deref());
            async move {
                self.writer
                    .ensure(Kind::EndpointSlice, desired, live.map(|l| &**l))
                    .await
                    .map(|e| usize::from(e.wrote()))
            }
        });
        let slice_deletes = plan.delete.iter().map(|stale| {
            let uid = live_slices
                .iter()
                .find(|s| *s.name == **stale)
                .and_then(|s| s.uid());
            async move {
                self.writer
                    .delete::<EndpointSlice>(Kind::EndpointSlice, stale, uid)
                    .await
                    .map(|()| 1)
            }
        });
        let (slices, deletes, endpoints) = futures::join!(
            futures::future::try_join_all(slice_writes),
            futures::future::try_join_all(slice_deletes),
            self.sync_endpoints(name, meta, owner),
        );
        writes += slices?.iter().sum::<usize>() + deletes?.iter().sum::<usize>() + endpoints?;
        Ok(Reconciled::Synced { writes })
    }

    /// The legacy Endpoints object: written when enabled, deleted when it is not.
    async fn sync_endpoints(
        &self,
        name: &str,
        meta: &crate::model::MicroSvcMeta,
        owner: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
    ) -> Result<usize, WriteError> {
        let live = self.endpoints.get_named(name, name);
        match render::endpoints::desired_endpoints(&self.render, name, meta, owner) {
            Some(desired) => self
                .writer
                .ensure(Kind::Endpoints, &desired, live.as_deref())
                .await
                .map(|e| usize::from(e.wrote())),
            None => match live {
                Some(live) => self
                    .writer
                    .delete::<Endpoints>(Kind::Endpoints, name, live.uid())
                    .await
                    .map(|()| 1),
                None => Ok(0),
            },
        }
    }

    /// Deletes every object of `name`: slices and Endpoints first (together), then the
    /// Service, so that nothing is left to the garbage collector's timing.
    async fn delete_all(&self, name: &str) -> Result<Reconciled, WriteError> {
        let (slices, endpoints) = futures::join!(
            self.delete_cached(Kind::EndpointSlice, &self.slices, name),
            self.delete_cached(Kind::Endpoints, &self.endpoints, name),
        );
        let services = self
            .delete_cached(Kind::Service, &self.services, name)
            .await?;
        Ok(Reconciled::Deleted {
            writes: slices? + endpoints? + services,
        })
    }

    /// Deletes the cached objects of one kind for `name`; returns how many.
    async fn delete_cached<K: super::writer::Object + Project + Send + Sync + 'static>(
        &self,
        kind: Kind,
        cache: &ObjectCache<K>,
        name: &str,
    ) -> Result<usize, WriteError> {
        let objs = cache.get(name);
        for obj in &objs {
            self.writer.delete::<K>(kind, &obj.name, obj.uid()).await?;
        }
        Ok(objs.len())
    }
}
