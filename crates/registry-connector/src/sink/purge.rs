//! Purge: delete exactly the objects one connector instance owns in a namespace.
//!
//! Used by `registry-connector purge` and `--purge-on-exit`. The list is label-selected
//! on both ownership labels and every object is checked again client-side before it is
//! deleted, with a UID precondition, so an object that merely looks similar (the same
//! labels with another connector id, or a name re-created by someone else meanwhile)
//! is never touched.

use std::fmt::Debug;

use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{DeleteParams, ListParams, Preconditions};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tracing::info;

use crate::labels::{is_owned, owner_selector};

/// Objects deleted, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    pub services: usize,
    pub endpoint_slices: usize,
    pub endpoints: usize,
}

impl Purged {
    pub fn total(&self) -> usize {
        self.services + self.endpoint_slices + self.endpoints
    }
}

/// Deletes every Service, EndpointSlice and Endpoints object in `namespace` that
/// carries both ownership labels of `connector_id`.
pub async fn purge(
    client: &Client,
    namespace: &str,
    connector_id: &str,
) -> Result<Purged, kube::Error> {
    // Slices and Endpoints first: deleting the Service first would leave them to the
    // garbage collector, and a purge should be complete when it returns.
    let endpoint_slices = purge_kind::<EndpointSlice>(client, namespace, connector_id).await?;
    let endpoints = purge_kind::<Endpoints>(client, namespace, connector_id).await?;
    let services = purge_kind::<Service>(client, namespace, connector_id).await?;
    let purged = Purged {
        services,
        endpoint_slices,
        endpoints,
    };
    info!(
        namespace,
        connector_id,
        ?purged,
        "purged the objects this connector owns"
    );
    Ok(purged)
}

async fn purge_kind<K>(
    client: &Client,
    namespace: &str,
    connector_id: &str,
) -> Result<usize, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let owned = api
        .list(&ListParams::default().labels(&owner_selector(connector_id)))
        .await?;
    let mut deleted = 0;
    for obj in owned
        .items
        .iter()
        .filter(|o| is_owned(o.meta(), connector_id))
    {
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: obj.uid(),
                resource_version: None,
            }),
            ..DeleteParams::background()
        };
        match api.delete(&obj.name_any(), &dp).await {
            Ok(_) => deleted += 1,
            // Gone already, or replaced by an object that is not the one we listed.
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}
