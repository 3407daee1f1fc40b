//! Kubernetes → ZooKeeper end to end: the real binary with `--sync both` against the
//! real control plane and ZooKeeper 3.9. Pods become Dubbo providers with their
//! readiness as `enabled`; a VM's provider becomes a Kubernetes Service; neither comes
//! back the other way; and a restarted connector takes its providers over with the
//! same names (a consumer's listing never changes). Addresses are documentation ranges.

mod common;

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use common::export::{Scenario, WAIT};
use common::objects::{service_names, wait_endpoints};
use common::process::Connector;
use common::zookeeper::{url_encode, Provider, ZkScenario};
use registry_connector::registry::zookeeper::api::parse_dubbo_url;
use testenv::{unique_name, wait_for};

/// address → `enabled` of our providers below `dir` (the VM's excluded by address).
async fn providers(zk: &zookeeper_client::Client, dir: &str) -> Result<BTreeMap<String, String>> {
    let names = match zk.list_children(dir).await {
        Ok(names) => names,
        Err(zookeeper_client::Error::NoNode) => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("listing {dir}")),
    };
    let mut out = BTreeMap::new();
    for name in names {
        let url = parse_dubbo_url(&name)?;
        out.insert(
            url.host.clone(),
            url.param("enabled").unwrap_or("true").to_string(),
        );
    }
    Ok(out)
}

async fn wait_providers(
    zk: &zookeeper_client::Client,
    dir: &str,
    want: &[(&str, &str)],
) -> Result<()> {
    let want: BTreeMap<String, String> = want
        .iter()
        .map(|(a, e)| (a.to_string(), e.to_string()))
        .collect();
    wait_for(&format!("providers {want:?} below {dir}"), WAIT, || async {
        (providers(zk, dir).await.ok()? == want).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_become_dubbo_providers_and_nothing_loops() -> Result<()> {
    let s = Scenario::new("k2z").await?;
    let zs = ZkScenario::new("k2z-zk").await?;
    let t = &unique_name("t")[2..];
    let orders = format!("com.example.K2zOrders{t}");
    let vm_iface = format!("com.example.K2zVm{t}");
    let base = zs.dubbo_base();
    let orders_dir = format!("{base}/{}/providers", url_encode(&orders));
    let vm_dir = format!("{base}/{}/providers", url_encode(&vm_iface));

    // A VM's provider, and a Kubernetes Service of two Pods, one not ready.
    zs.register(&Provider::new(&vm_iface, "198.51.100.60", 20880))
        .await?;
    s.service("orders", &orders).await?;
    s.pod("orders", "orders-0", "192.0.2.60", true).await?;
    s.pod("orders", "orders-1", "192.0.2.61", false).await?;

    let start = |id: &str| {
        Connector::builder(s.env, s.ns.name())
            .zookeeper()
            .args([
                "--zookeeper-layout",
                "dubbo",
                "--zookeeper-base-path",
                &base,
                "--sync",
                "both",
                "--k8s-allow-namespaces",
                s.ns.name(),
                "--connector-id",
                id,
            ])
            .start()
    };
    let connector = start(&s.connector_id)?;
    connector.wait_ready().await?;
    wait_providers(
        &zs.zk,
        &orders_dir,
        &[("192.0.2.60", "true"), ("192.0.2.61", "false")],
    )
    .await
    .map_err(|e| e.context(connector.log_tail()))?;

    // The VM's provider in Kubernetes, in the same namespace the exporter watches.
    let vm_kube = format!("com-example-k2zvm{t}");
    wait_endpoints(&s.client, s.ns.name(), &vm_kube, &[("198.51.100.60", true)])
        .await
        .map_err(|e| e.context(connector.log_tail()))?;
    // No loop: the source skips our providers, the exporter skips the Service the
    // source created.
    let names = service_names(&s.client, s.ns.name()).await?;
    assert!(!names.iter().any(|n| n.contains("k2zorders")), "{names:?}");
    assert_eq!(
        providers(&zs.zk, &vm_dir).await?.len(),
        1,
        "only the VM's own provider"
    );

    // Readiness flips `enabled`.
    s.set_ready("orders-1", "192.0.2.61", true).await?;
    wait_providers(
        &zs.zk,
        &orders_dir,
        &[("192.0.2.60", "true"), ("192.0.2.61", "true")],
    )
    .await?;

    // A restart: the successor takes the nodes over, with the same names.
    let mut before = zs.zk.list_children(&orders_dir).await?;
    before.sort();
    connector.terminate().await?;
    assert_eq!(
        zs.zk.list_children(&orders_dir).await?.len(),
        2,
        "still there after the stop"
    );
    let connector = start(&s.connector_id)?;
    connector.wait_ready().await?;
    wait_for(
        "the restarted connector to take over both providers",
        WAIT,
        || async {
            let n = connector
                .metric_sum("registry_connector_zookeeper_writer_takeovers_total")
                .await
                .ok()?;
            (n >= 2.0).then_some(())
        },
    )
    .await
    .map_err(|e| e.context(connector.log_tail()))?;
    let mut after = zs.zk.list_children(&orders_dir).await?;
    after.sort();
    assert_eq!(after, before, "a consumer's listing did not change");
    let multis = connector
        .metric_where(
            "registry_connector_registry_requests_total",
            &[("endpoint", "multi"), ("result", "ok")],
        )
        .await?;
    assert_eq!(
        multis, 1.0,
        "one multi took both over, nothing else was written"
    );
    connector.terminate().await?;
    Ok(())
}
