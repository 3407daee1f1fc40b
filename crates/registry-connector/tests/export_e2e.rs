//! Kubernetes → registry end to end: the real binary with `--sync to-registry`, the real
//! apiserver and kube-controller-manager (which build the EndpointSlices from Pods
//! bound to a Node object: there is no kubelet, so the test sets each Pod's IP and
//! readiness through the status subresource), a real Consul agent and a real Eureka
//! server.
//!
//! Every test has its own namespace, Consul node name and connector id. Pod IPs are in
//! documentation ranges and never contacted.

mod common;

use std::time::Duration;

use anyhow::{Context, Result};
use common::export::{Scenario, WAIT};
use k8s_openapi::api::core::v1::Service;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::Api;
use serde_json::json;
use testenv::{unique_name, wait_for};

#[tokio::test(flavor = "multi_thread")]
async fn pods_become_consul_instances_with_their_readiness() -> Result<()> {
    let s = Scenario::new("k2c").await?;
    let web = unique_name("web");
    let api = unique_name("api");
    // A VM instance of the same name on another node: never touched.
    s.consul
        .put(
            "/v1/catalog/register",
            &json!({"Node": unique_name("vm"), "Address": "198.51.100.50",
                    "Service": {"ID": "vm-web", "Service": web, "Address": "198.51.100.50", "Port": 8080}}),
        )
        .await?;
    let vm_before = s.instances(&web).await?;
    assert_eq!(vm_before.len(), 1);

    s.service("web", &web).await?;
    s.service("api", &api).await?;
    for (i, ip) in ["192.0.2.11", "192.0.2.12", "192.0.2.13"]
        .iter()
        .enumerate()
    {
        s.pod("web", &format!("web-{i}"), ip, true).await?;
    }
    s.pod("api", "api-0", "192.0.2.21", true).await?;
    let connector = s.connector(&[])?;
    connector.wait_ready().await?;
    s.wait_instances(
        &web,
        &[
            ("192.0.2.11", "passing"),
            ("192.0.2.12", "passing"),
            ("192.0.2.13", "passing"),
        ],
    )
    .await?;

    // A fourth Pod: one more instance.
    s.pod("web", "web-3", "192.0.2.14", true).await?;
    s.wait_instances(
        &web,
        &[
            ("192.0.2.11", "passing"),
            ("192.0.2.12", "passing"),
            ("192.0.2.13", "passing"),
            ("192.0.2.14", "passing"),
        ],
    )
    .await?;
    // Not ready: critical, still registered.
    s.set_ready("web-1", "192.0.2.12", false).await?;
    s.wait_instances(
        &web,
        &[
            ("192.0.2.11", "passing"),
            ("192.0.2.12", "critical"),
            ("192.0.2.13", "passing"),
            ("192.0.2.14", "passing"),
        ],
    )
    .await?;
    s.set_ready("web-1", "192.0.2.12", true).await?;
    s.wait_instances(
        &web,
        &[
            ("192.0.2.11", "passing"),
            ("192.0.2.12", "passing"),
            ("192.0.2.13", "passing"),
            ("192.0.2.14", "passing"),
        ],
    )
    .await?;

    // Batched: far fewer transactions than instance writes.
    let txns = connector
        .metric_where(
            "registry_connector_registry_requests_total",
            &[("endpoint", "txn")],
        )
        .await?;
    let writes = connector
        .metric_sum("registry_connector_export_writes_total")
        .await?;
    assert!(writes >= 7.0, "writes {writes}");
    assert!(
        txns >= 1.0 && txns < writes,
        "{txns} transactions for {writes} writes"
    );

    // Restart with nothing changed: zero writes, every ModifyIndex unchanged.
    let before = s.service_modify_indexes().await?;
    assert_eq!(before.len(), 5, "{before:?}");
    connector.terminate().await?;
    let vm_during = s.instances(&web).await?;
    assert_eq!(
        vm_during.len(),
        5,
        "a stop deregisters nothing: {vm_during:?}"
    );
    let connector = s.connector(&[])?;
    connector.wait_ready().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        connector
            .metric_sum("registry_connector_export_writes_total")
            .await?,
        0.0,
        "{}",
        connector.log_tail()
    );
    assert_eq!(s.service_modify_indexes().await?, before);

    // An instance removed behind the connector's back (an operator, a Consul that lost
    // its state) comes back: the node watch sees the difference and the engine reads
    // Consul again.
    let (api_id, _) = before
        .iter()
        .find(|(id, _)| id.starts_with(&api))
        .context("the api instance")?;
    s.consul
        .put(
            "/v1/catalog/deregister",
            &json!({"Node": s.consul_node, "ServiceID": api_id}),
        )
        .await?;
    wait_for("the deregistered instance to come back", WAIT, || async {
        s.service_modify_indexes()
            .await
            .ok()?
            .contains_key(api_id)
            .then_some(())
    })
    .await?;

    // The Service deleted: its instances go, the other Service and the VM stay.
    Api::<Service>::namespaced(s.client.clone(), s.ns.name())
        .delete("web", &DeleteParams::default())
        .await?;
    s.wait_instances(&web, &[]).await?;
    let vm_after = s.instances(&web).await?;
    assert_eq!(
        vm_after, vm_before,
        "the VM's instance is left exactly as it was"
    );
    let api_instances = s.instances(&api).await?;
    assert_eq!(api_instances.len(), 1);
    connector.terminate().await?;
    Ok(())
}

/// Consul refuses a service whose metadata key has a dot (its transaction rolls back
/// with 409 naming that operation): the other Service's instance is written all the
/// same, the refused one is reported on its Service as an Event with Consul's reason
/// and counted, and once the annotation is fixed it is registered.
#[tokio::test(flavor = "multi_thread")]
async fn an_instance_consul_refuses_is_reported_and_keeps_nothing_else_out() -> Result<()> {
    let s = Scenario::new("k2c-409").await?;
    let good = unique_name("good");
    let bad = unique_name("bad");
    s.service("good", &good).await?;
    s.service("bad", &bad).await?;
    let services: Api<Service> = Api::namespaced(s.client.clone(), s.ns.name());
    let invalid_meta = "connector.flomesh.io/registry-meta-owner.team";
    services
        .patch(
            "bad",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {invalid_meta: "shop"}}})),
        )
        .await?;
    s.pod("good", "good-0", "192.0.2.31", true).await?;
    s.pod("bad", "bad-0", "192.0.2.32", true).await?;
    let connector = s.connector(&[])?;
    connector.wait_ready().await?;
    s.wait_instances(&good, &[("192.0.2.31", "passing")])
        .await?;

    let event =
        common::objects::wait_event(&s.client, s.ns.name(), "RegistryRejected", "bad").await?;
    let note = event.note.unwrap_or_default();
    assert!(
        note.contains("owner.team") && note.contains("invalid characters"),
        "the Event carries Consul's reason: {note}"
    );
    assert!(
        s.instances(&bad).await?.is_empty(),
        "nothing of the refused Service is registered"
    );
    let rejected = connector
        .metric_sum("registry_connector_export_rejected_writes_total")
        .await?;
    assert!(rejected >= 1.0, "rejected writes counted: {rejected}");

    // The annotation fixed: the Service's next pass registers it.
    services
        .patch(
            "bad",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                invalid_meta: null, "connector.flomesh.io/registry-meta-owner-team": "shop"}}})),
        )
        .await?;
    s.wait_instances(&bad, &[("192.0.2.32", "passing")]).await?;
    s.wait_instances(&good, &[("192.0.2.31", "passing")])
        .await?;
    connector.terminate().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn selection_by_namespace_and_annotation() -> Result<()> {
    let s = Scenario::new("k2c-sel").await?;
    let kept = unique_name("kept");
    let opted_out = unique_name("out");
    s.service("kept", &kept).await?;
    s.service("out", &opted_out).await?;
    Api::<Service>::namespaced(s.client.clone(), s.ns.name())
        .patch(
            "out",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"consul.hashicorp.com/service-sync": "false"}}})),
        )
        .await?;
    s.pod("kept", "kept-0", "192.0.2.31", true).await?;
    s.pod("out", "out-0", "192.0.2.32", true).await?;
    let connector = s.connector(&[])?;
    connector.wait_ready().await?;
    s.wait_instances(&kept, &[("192.0.2.31", "passing")])
        .await?;
    assert!(s.instances(&opted_out).await?.is_empty());

    // The same namespace denied: the deny list wins, and the registrations go.
    connector.terminate().await?;
    let denied = s.connector(&[
        "--k8s-deny-namespaces",
        s.ns.name(),
        "--mass-deletion-threshold",
        "1",
    ])?;
    denied.wait_ready().await?;
    // Removing every managed Service is always held by the guard: nothing goes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.instances(&kept).await?.len(), 1, "held by the guard");
    let held = denied
        .metric_sum("registry_connector_export_held_deletions")
        .await?;
    assert_eq!(held, 1.0, "{}", denied.log_tail());
    denied.terminate().await?;
    // --purge removes this connector's registrations and nothing else.
    let out = common::process::run_once(
        &[
            "consul",
            "--consul-http-addr",
            s.env.consul_addr()?,
            "--kubeconfig",
            &s.env.kubeconfig().to_string_lossy(),
            "--namespace",
            s.ns.name(),
            "--sync",
            "to-registry",
            "--consul-node-name",
            &s.consul_node,
            "--connector-id",
            &s.connector_id,
            "--leader-elect=false",
            "--admin-addr",
            "off",
            "--purge",
        ],
        Duration::from_secs(60),
    )
    .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("deregistered 1 "),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(s.instances(&kept).await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_become_eureka_instances_with_their_readiness() -> Result<()> {
    let s = Scenario::new("k2e").await?;
    let app = unique_name("shop");
    s.service("shop", &app).await?;
    s.pod("shop", "shop-0", "192.0.2.41", true).await?;
    s.pod("shop", "shop-1", "192.0.2.42", true).await?;
    let connector = s.eureka_connector()?;
    connector.wait_ready().await?;
    s.wait_eureka(&app, &[("192.0.2.41", "UP"), ("192.0.2.42", "UP")])
        .await?;
    s.set_ready("shop-1", "192.0.2.42", false).await?;
    s.wait_eureka(
        &app,
        &[("192.0.2.41", "UP"), ("192.0.2.42", "OUT_OF_SERVICE")],
    )
    .await?;
    s.set_ready("shop-1", "192.0.2.42", true).await?;
    s.wait_eureka(&app, &[("192.0.2.41", "UP"), ("192.0.2.42", "UP")])
        .await?;
    // A restart with nothing changed: no instance write (heartbeats are counted apart).
    connector.terminate().await?;
    let connector = s.eureka_connector()?;
    connector.wait_ready().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        connector
            .metric_sum("registry_connector_export_writes_total")
            .await?,
        0.0,
        "{}",
        connector.log_tail()
    );
    s.wait_eureka(&app, &[("192.0.2.41", "UP"), ("192.0.2.42", "UP")])
        .await?;
    connector.terminate().await?;
    Ok(())
}
