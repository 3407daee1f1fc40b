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

/// `scripts/lib/zookeeper-java-register lookup ARGS...`: the lines between the JVM's
/// start and its `done`.
async fn java_lookup(args: &[&str]) -> Result<Vec<String>> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts/lib/zookeeper-java-register");
    let out = tokio::time::timeout(
        // A fresh machine may build the fixture with Maven first.
        std::time::Duration::from_secs(300),
        tokio::process::Command::new("bash")
            .arg(&script)
            .arg("lookup")
            .args(args)
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .context("the Java lookup did not finish within 300 s")??;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(
        out.status.success() && stdout.lines().last() == Some("done"),
        "lookup {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines: Vec<String> = stdout
        .lines()
        .filter(|l| *l != "done")
        .map(str::to_string)
        .collect();
    lines.sort();
    Ok(lines)
}

#[tokio::test(flavor = "multi_thread")]
async fn dubbo_and_spring_consumers_find_what_was_written() -> Result<()> {
    let s = Scenario::new("k2z-java").await?;
    let zs = ZkScenario::new("k2z-java-zk").await?;
    let t = &unique_name("t")[2..];
    let pay = format!("com.example.K2zPay{t}");
    // Version 2.0.0 as a registry meta annotation: what Dubbo consumers match on.
    s.service("pay", &pay).await?;
    let services: kube::Api<k8s_openapi::api::core::v1::Service> =
        kube::Api::namespaced(s.client.clone(), s.ns.name());
    let patch = serde_json::json!({"metadata": {"annotations": {"connector.flomesh.io/registry-meta-version": "2.0.0"}}});
    services
        .patch(
            "pay",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await?;
    s.pod("pay", "pay-0", "192.0.2.70", true).await?;
    s.pod("pay", "pay-1", "192.0.2.71", false).await?;

    let (dubbo_base, curator_base) = (zs.dubbo_base(), zs.curator_base());
    let start = |layout: &str, base: &str, id: &str| {
        Connector::builder(s.env, s.ns.name())
            .zookeeper()
            .args([
                "--zookeeper-layout",
                layout,
                "--zookeeper-base-path",
                base,
                "--sync",
                "to-registry",
                "--k8s-allow-namespaces",
                s.ns.name(),
                "--connector-id",
                id,
            ])
            .start()
    };
    let dubbo = start("dubbo", &dubbo_base, &format!("{}-d", s.connector_id))?;
    let curator = start("curator", &curator_base, &format!("{}-c", s.connector_id))?;
    let dir = format!("{dubbo_base}/{}/providers", url_encode(&pay));
    wait_providers(
        &zs.zk,
        &dir,
        &[("192.0.2.70", "true"), ("192.0.2.71", "false")],
    )
    .await
    .map_err(|e| e.context(dubbo.log_tail()))?;
    let curator_dir = format!("{curator_base}/{pay}");
    wait_for("two Curator instances", WAIT, || async {
        (zs.zk.list_children(&curator_dir).await.ok()?.len() == 2).then_some(())
    })
    .await
    .map_err(|e| e.context(curator.log_tail()))?;

    // Dubbo's own parsing and matching: a consumer of 2.0.0 matches the ready Pod's
    // provider and not the disabled one (Dubbo's `isMatch` drops `enabled=false`); a
    // consumer of 1.0.0 matches neither. The port named `http` names no Dubbo protocol:
    // `dubbo`.
    let v2 = java_lookup(&[&zs.addr, "dubbo", &dubbo_base, &pay, "2.0.0"]).await?;
    assert_eq!(
        v2,
        [
            "provider dubbo 192.0.2.70 8080 enabled=true match=true",
            "provider dubbo 192.0.2.71 8080 enabled=false match=false",
        ]
    );
    let v1 = java_lookup(&[&zs.addr, "dubbo", &dubbo_base, &pay, "1.0.0"]).await?;
    assert!(v1.iter().all(|l| l.ends_with("match=false")), "{v1:?}");

    // Curator's ServiceDiscovery with Spring's payload class decodes both.
    let spring = java_lookup(&[&zs.addr, "curator", &curator_base, &pay]).await?;
    assert_eq!(
        spring,
        [
            "instance 192.0.2.70 8080 status=UP uri=http://192.0.2.70:8080",
            "instance 192.0.2.71 8080 status=OUT_OF_SERVICE uri=http://192.0.2.71:8080",
        ]
    );
    dubbo.terminate().await?;
    curator.terminate().await?;
    Ok(())
}
