//! Reading what the connector wrote: a service's slices, its endpoints with their
//! readiness, its ports; waits on those. Shared by the end-to-end tests of every source.

use std::collections::BTreeMap;

use anyhow::Result;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::{Api, Client};
use testenv::wait_for;

use super::WAIT;

/// The EndpointSlices of `svc` (by the `kubernetes.io/service-name` label).
pub async fn slices_of(client: &Client, ns: &str, svc: &str) -> Option<Vec<EndpointSlice>> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={svc}"));
    api.list(&lp).await.ok().map(|l| l.items)
}

/// Address → ready of every endpoint in `slices`.
pub fn readiness(slices: &[EndpointSlice]) -> BTreeMap<String, bool> {
    slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .map(|e| {
            (
                e.addresses[0].clone(),
                e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false),
            )
        })
        .collect()
}

/// Waits until the slices of `svc` show exactly these (address, ready) endpoints.
pub async fn wait_endpoints(
    client: &Client,
    ns: &str,
    svc: &str,
    want: &[(&str, bool)],
) -> Result<Vec<EndpointSlice>> {
    let want: BTreeMap<String, bool> = want.iter().map(|(a, r)| (a.to_string(), *r)).collect();
    wait_for(&format!("{svc} endpoints {want:?}"), WAIT, || async {
        let slices = slices_of(client, ns, svc).await?;
        (readiness(&slices) == want).then_some(slices)
    })
    .await
}

/// Waits until the Service `svc` no longer exists.
pub async fn wait_service_gone(client: &Client, ns: &str, svc: &str) -> Result<()> {
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    wait_for(&format!("{svc} deleted"), WAIT, || async {
        matches!(api.get_opt(svc).await, Ok(None)).then_some(())
    })
    .await
}

/// (name, port, appProtocol) of the Service's ports, sorted.
pub fn port_specs(svc: &Service) -> Vec<(String, i32, Option<String>)> {
    let mut ports: Vec<(String, i32, Option<String>)> = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|p| (p.name.unwrap_or_default(), p.port, p.app_protocol))
        .collect();
    ports.sort();
    ports
}

/// The names of the Services in `ns`, sorted.
pub async fn service_names(client: &Client, ns: &str) -> Result<Vec<String>> {
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    let mut names: Vec<String> = api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .collect();
    names.sort();
    Ok(names)
}

/// Waits for an event with `reason` about the object `name` in `ns`.
pub async fn wait_event(
    client: &Client,
    ns: &str,
    reason: &str,
    name: &str,
) -> Result<k8s_openapi::api::events::v1::Event> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    wait_for(&format!("a {reason} event on {name}"), WAIT, || {
        let events = events.clone();
        async move {
            events
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                })
        }
    })
    .await
}
