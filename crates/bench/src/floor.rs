//! The apiserver's write floor: the objects the connector would write for N services,
//! written by a plain concurrent kube client with no connector logic (no cache, no
//! diff, no rate limit, no coalescing), `concurrency` services at a time.
//!
//! Per service: create the Service, then its EndpointSlice (owner reference to the
//! Service's UID from the create answer, as the connector does). A second pass creates
//! the legacy Endpoints objects, so the floor is known both for the object set the issue
//! names (Services + EndpointSlices) and for the connector's default set (+ Endpoints).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, Namespace, Service, ServicePort,
    ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointPort as SlicePort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use crate::model::Service as Svc;

/// What the floor measured.
#[derive(Debug, Clone, Copy)]
pub struct Floor {
    /// N Services + N EndpointSlices.
    pub services_and_slices: Duration,
    /// N legacy Endpoints (second pass).
    pub endpoints: Duration,
    pub writes: usize,
}

fn labels(service: &str, slice: bool) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_string(),
            "bench-floor".to_string(),
        ),
        ("cloud-sourced-service".to_string(), "true".to_string()),
    ]);
    if slice {
        l.insert("kubernetes.io/service-name".into(), service.into());
        l.insert(
            "endpointslice.kubernetes.io/managed-by".into(),
            "bench-floor.example".into(),
        );
    }
    l
}

fn service(ns: &str, name: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some(labels(name, false)),
            annotations: Some(BTreeMap::from([(
                "flomesh.io/mesh-service-sync".to_string(),
                "false".to_string(),
            )])),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            ports: Some(vec![ServicePort {
                name: Some("http8080".into()),
                port: 8080,
                target_port: Some(IntOrString::Int(8080)),
                protocol: Some("TCP".into()),
                app_protocol: Some("http".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn owner(svc: &Service) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: "v1".into(),
        kind: "Service".into(),
        name: svc.metadata.name.clone()?,
        uid: svc.metadata.uid.clone()?,
        controller: Some(false),
        block_owner_deletion: Some(false),
    })
}

fn slice(ns: &str, svc: &Svc, owner: Option<OwnerReference>) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{}-v4-000000-0", svc.name)),
            namespace: Some(ns.into()),
            labels: Some(labels(&svc.name, true)),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: svc
            .instances
            .iter()
            .map(|i| Endpoint {
                addresses: vec![i.address.clone()],
                conditions: Some(EndpointConditions {
                    ready: Some(i.ready),
                    serving: Some(i.ready),
                    terminating: Some(false),
                }),
                ..Default::default()
            })
            .collect(),
        ports: Some(vec![SlicePort {
            name: Some("http8080".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            app_protocol: Some("http".into()),
        }]),
    }
}

fn endpoints(ns: &str, svc: &Svc, owner: Option<OwnerReference>) -> Endpoints {
    let mut l = labels(&svc.name, false);
    l.insert(
        "endpointslice.kubernetes.io/skip-mirror".into(),
        "true".into(),
    );
    l.insert("kubernetes.io/service-name".into(), svc.name.clone());
    Endpoints {
        metadata: ObjectMeta {
            name: Some(svc.name.clone()),
            namespace: Some(ns.into()),
            labels: Some(l),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        subsets: Some(vec![EndpointSubset {
            addresses: Some(
                svc.instances
                    .iter()
                    .map(|i| EndpointAddress {
                        ip: i.address.clone(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ports: Some(vec![EndpointPort {
                name: Some("http8080".into()),
                port: 8080,
                protocol: Some("TCP".into()),
                app_protocol: Some("http".into()),
            }]),
            ..Default::default()
        }]),
    }
}

pub async fn create_namespace(client: &Client, name: &str) -> Result<()> {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(())
}

/// Writes the floor's objects for `services` into `ns` (which must exist).
pub async fn run(client: &Client, ns: &str, services: &[Svc], concurrency: usize) -> Result<Floor> {
    let pp = PostParams::default();
    let svc_api: Api<Service> = Api::namespaced(client.clone(), ns);
    let slice_api: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let eps_api: Api<Endpoints> = Api::namespaced(client.clone(), ns);

    let started = Instant::now();
    let created: Vec<(usize, Service)> = futures::stream::iter(services.iter().enumerate())
        .map(|(i, s)| {
            let (svc_api, slice_api, pp) = (&svc_api, &slice_api, &pp);
            async move {
                let live = svc_api
                    .create(pp, &service(ns, &s.name))
                    .await
                    .with_context(|| format!("floor: creating Service {}", s.name))?;
                slice_api
                    .create(pp, &slice(ns, s, owner(&live)))
                    .await
                    .with_context(|| format!("floor: creating EndpointSlice of {}", s.name))?;
                anyhow::Ok((i, live))
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await?;
    let services_and_slices = started.elapsed();

    let started = Instant::now();
    futures::stream::iter(created.iter())
        .map(|(i, live)| {
            let (eps_api, pp) = (&eps_api, &pp);
            let s = &services[*i];
            async move {
                eps_api
                    .create(pp, &endpoints(ns, s, owner(live)))
                    .await
                    .with_context(|| format!("floor: creating Endpoints {}", s.name))?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    let endpoints_time = started.elapsed();
    Ok(Floor {
        services_and_slices,
        endpoints: endpoints_time,
        writes: services.len() * 3,
    })
}

/// Deletes namespace `name` and waits (bounded by `max`) until the apiserver no longer
/// has it, so that the namespace controller's deletions are over before the next
/// measurement. Returns the wait and whether the namespace is gone.
pub async fn delete_namespace(client: &Client, name: &str, max: Duration) -> Result<(f64, bool)> {
    let api = Api::<Namespace>::all(client.clone());
    let started = Instant::now();
    match api
        .delete(name, &kube::api::DeleteParams::background())
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok((0.0, true)),
        Err(e) => return Err(e).with_context(|| format!("deleting namespace {name}")),
    }
    while started.elapsed() < max {
        if api.get_opt(name).await?.is_none() {
            return Ok((started.elapsed().as_secs_f64(), true));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok((started.elapsed().as_secs_f64(), false))
}
