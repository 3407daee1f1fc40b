//! The cost of one registry change with 500 services: Consul requests and Kubernetes
//! writes caused by one instance of one service changing. The figure must be a small
//! constant, independent of the 500 (the seed re-read every service on every change).

mod common;

use std::time::{Duration, Instant};

use anyhow::Result;
use common::process::Connector;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::Api;
use serde_json::json;
use testenv::consul::ConsulClient;
use testenv::{unique_name, wait_for, TestEnv};

const SERVICES: usize = 500;

/// Registers `name` with one instance on a synthetic node through the catalog API
/// (no agent, no active check: a passing check entry is written with it).
async fn catalog_register(
    consul: &ConsulClient,
    node: &str,
    tag: &str,
    name: &str,
    id: &str,
    addr: &str,
) -> Result<()> {
    consul
        .put(
            "/v1/catalog/register",
            &json!({
                "Node": node, "Address": "203.0.113.250",
                "Service": {"ID": id, "Service": name, "Address": addr, "Port": 8080, "Tags": [tag]},
                "Check": {"CheckID": format!("check-{id}"), "Name": "synthetic", "Status": "passing", "ServiceID": id}
            }),
        )
        .await
}

/// Consul requests and Kubernetes writes once every watcher that woke up has settled:
/// read until two readings 1.5 s apart agree (at most 20 rounds).
async fn at_rest(connector: &Connector) -> Result<(f64, f64)> {
    let read = || async {
        anyhow::Ok((
            connector
                .metric_sum("registry_connector_registry_requests_total")
                .await?,
            connector.writes().await?,
        ))
    };
    let mut last = read().await?;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = read().await?;
        if now == last {
            break;
        }
        last = now;
    }
    Ok(last)
}

#[tokio::test]
async fn one_change_among_500_services_costs_a_constant() -> Result<()> {
    let env = TestEnv::shared();
    let consul = ConsulClient::new(env.consul_addr()?)?;
    let ns = env.namespace("cost").await?;
    let tag = unique_name("t");
    let node = unique_name("node");
    for i in 0..SERVICES {
        let name = format!("{tag}-s{i}");
        let addr = format!("198.51.100.{}", 1 + i % 250);
        catalog_register(&consul, &node, &tag, &name, &format!("{name}-1"), &addr).await?;
    }
    let connector = Connector::consul(
        env,
        ns.name(),
        &[
            "--filter-tag",
            &tag,
            "--consul-max-connections",
            "0",
            "--kube-write-qps",
            "1000",
            "--kube-write-burst",
            "1000",
        ],
    )?;
    let services: Api<Service> = Api::namespaced(env.client().await?, ns.name());
    let slices: Api<EndpointSlice> = Api::namespaced(env.client().await?, ns.name());
    let started = Instant::now();
    wait_for("500 services", Duration::from_secs(120), || async {
        (services
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .len()
            == SERVICES)
            .then_some(())
    })
    .await?;
    connector.wait_ready().await?;
    let initial = started.elapsed();
    // At rest first: each watcher's first blocking query waits only 10-15 s (a short first
    // wait, so that a poll lost in the start-up burst is retried soon); those 500 returns
    // belong to the start, not to the change.
    tokio::time::sleep(Duration::from_secs(16)).await;
    let (consul_before, writes_before) = at_rest(&connector).await?;
    let target = format!("{tag}-s7");
    catalog_register(
        &consul,
        &node,
        &tag,
        &target,
        &format!("{target}-2"),
        "192.0.2.200",
    )
    .await?;
    let changed = Instant::now();
    wait_for("the new instance", Duration::from_secs(30), || async {
        let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={target}"));
        let n: usize = slices
            .list(&lp)
            .await
            .ok()?
            .items
            .iter()
            .map(|s| s.endpoints.len())
            .sum();
        (n == 2).then_some(())
    })
    .await?;
    let propagation = changed.elapsed();
    let last = at_rest(&connector).await?;
    let consul_requests = last.0 - consul_before;
    let kube_writes = last.1 - writes_before;
    println!(
        "with {SERVICES} services: initial sync {initial:?}; one new instance: {consul_requests} Consul requests, \
         {kube_writes} Kubernetes writes, visible in the EndpointSlice after {propagation:?}"
    );
    assert!(
        consul_requests <= 4.0,
        "O(1) Consul requests per change, got {consul_requests}"
    );
    assert_eq!(
        kube_writes, 2.0,
        "one EndpointSlice and one Endpoints write"
    );

    let _ = consul
        .put("/v1/catalog/deregister", &json!({"Node": node}))
        .await;
    Ok(())
}
