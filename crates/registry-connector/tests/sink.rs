//! The sink against a real apiserver and controller-manager, fed by an in-process test
//! source. Every assertion is on objects read back from the apiserver or on the
//! connector's own write counters.

mod common;

use std::collections::BTreeMap;

use anyhow::Result;
use common::*;
use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use registry_connector::sink::metrics::Kind;
use serde_json::json;
use testenv::wait_for;

fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("test object literal is valid")
}

/// Waits for an events.k8s.io Event with `reason` regarding the object `name`.
async fn wait_for_event(
    h: &Harness,
    reason: &str,
    name: &str,
) -> Result<k8s_openapi::api::events::v1::Event> {
    common::objects::wait_event(&h.client, h.ns.name(), reason, name).await
}

fn versions(slices: &[k8s_openapi::api::discovery::v1::EndpointSlice]) -> BTreeMap<String, String> {
    slices
        .iter()
        .map(|s| {
            (
                s.metadata.name.clone().unwrap_or_default(),
                s.metadata.resource_version.clone().unwrap_or_default(),
            )
        })
        .collect()
}

/// Three services: dual-stack, 250 instances, two protocols.
fn three_services() -> Vec<registry_connector::model::MicroSvcMeta> {
    vec![
        svc(
            "mixed",
            vec![
                ep("192.0.2.1", &[(8080, "http")], true),
                ep("2001:db8::1", &[(8080, "http")], true),
                ep("192.0.2.2", &[(8080, "http")], false),
            ],
        ),
        svc("big", many(250)),
        svc(
            "multi",
            vec![
                ep("192.0.2.10", &[(8080, "http"), (9090, "grpc")], true),
                ep("192.0.2.11", &[(8080, "http"), (9090, "grpc")], true),
            ],
        ),
    ]
}

#[tokio::test]
async fn renders_services_slices_and_endpoints_without_mirroring() -> Result<()> {
    let h = Harness::start("render").await?;
    h.catalog.replace_all(three_services());
    h.wait_for_endpoint_count("big", 250).await?;
    h.wait_for_endpoint_count("mixed", 3).await?;
    h.wait_for_endpoint_count("multi", 2).await?;

    // Services: seed labels and annotations, no selector, headless, named ports.
    let multi = h.services().get("multi").await?;
    let labels = labels_of(&multi);
    assert_eq!(
        labels.get("cloud-sourced-service").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        labels
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("registry-connector")
    );
    assert_eq!(
        labels
            .get("connector.flomesh.io/instance")
            .map(String::as_str),
        Some("test")
    );
    let annotations = annotations_of(&multi);
    assert_eq!(
        annotations
            .get("flomesh.io/mesh-service-sync")
            .map(String::as_str),
        Some("false")
    );
    assert_eq!(
        annotations
            .get("flomesh.io/cloud-service-inherited-from")
            .map(String::as_str),
        Some("multi")
    );
    let spec = multi.spec.clone().expect("spec");
    assert!(spec.selector.unwrap_or_default().is_empty(), "no selector");
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    let mut ports: Vec<(String, i32, Option<String>)> = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .map(|p| (p.name.unwrap_or_default(), p.port, p.app_protocol))
        .collect();
    ports.sort();
    assert_eq!(
        ports,
        vec![
            ("grpc9090".to_string(), 9090, Some("grpc".to_string())),
            ("http8080".to_string(), 8080, Some("http".to_string())),
        ]
    );

    // 250 instances: three slices of at most 100, owned by the Service.
    let big = h.services().get("big").await?;
    let big_slices = h.slices_of("big").await?;
    let mut sizes: Vec<usize> = big_slices.iter().map(|s| s.endpoints.len()).collect();
    sizes.sort();
    assert_eq!(sizes, vec![50, 100, 100]);
    for slice in &big_slices {
        assert_eq!(slice.address_type, "IPv4");
        let owner = &slice.metadata.owner_references.clone().unwrap_or_default()[0];
        assert_eq!(Some(&owner.uid), big.metadata.uid.as_ref());
        assert_eq!(
            labels_of(slice)
                .get("endpointslice.kubernetes.io/managed-by")
                .map(String::as_str),
            Some("registry-connector.flomesh.io")
        );
    }

    // Dual stack: one slice per family; readiness from registry health.
    let mixed = h.slices_of("mixed").await?;
    let mut families: Vec<(String, usize)> = mixed
        .iter()
        .map(|s| (s.address_type.clone(), s.endpoints.len()))
        .collect();
    families.sort();
    assert_eq!(families, vec![("IPv4".into(), 2), ("IPv6".into(), 1)]);
    let not_ready: Vec<String> = mixed
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(false))
        .flat_map(|e| e.addresses.clone())
        .collect();
    assert_eq!(not_ready, vec!["192.0.2.2".to_string()]);

    // Legacy Endpoints: present, not mirrored.
    let eps: Endpoints = h.endpoints().get("mixed").await?;
    assert_eq!(
        labels_of(&eps)
            .get("endpointslice.kubernetes.io/skip-mirror")
            .map(String::as_str),
        Some("true")
    );
    let subsets = eps.subsets.unwrap_or_default();
    let ready: usize = subsets
        .iter()
        .map(|s| s.addresses.as_ref().map_or(0, Vec::len))
        .sum();
    let unready: usize = subsets
        .iter()
        .map(|s| s.not_ready_addresses.as_ref().map_or(0, Vec::len))
        .sum();
    assert_eq!((ready, unready), (2, 1));

    // The mirroring controller is alive (it mirrors a control Endpoints object) and yet
    // left ours alone.
    h.services()
        .create(
            &PostParams::default(),
            &from_json(json!({
                "metadata": {"name": "control"},
                "spec": {"ports": [{"port": 80}]}
            })),
        )
        .await?;
    h.endpoints()
        .create(
            &PostParams::default(),
            &from_json(json!({
                "metadata": {"name": "control"},
                "subsets": [{"addresses": [{"ip": "192.0.2.99"}], "ports": [{"port": 80}]}]
            })),
        )
        .await?;
    let mirrored_selector = ListParams::default()
        .labels("endpointslice.kubernetes.io/managed-by=endpointslicemirroring-controller.k8s.io");
    let mirrored = wait_for("the control object to be mirrored", WAIT, || {
        let slices = h.slices();
        let lp = mirrored_selector.clone();
        async move {
            let items = slices.list(&lp).await.ok()?.items;
            (!items.is_empty()).then_some(items)
        }
    })
    .await?;
    let mirrored_services: Vec<String> = mirrored
        .iter()
        .filter_map(|s| labels_of(s).get("kubernetes.io/service-name").cloned())
        .collect();
    assert_eq!(mirrored_services, vec!["control".to_string()]);
    Ok(())
}

#[tokio::test]
async fn one_new_instance_rewrites_one_slice_and_a_resync_writes_nothing() -> Result<()> {
    let h = Harness::start_with("stable", |cfg| {
        cfg.resync_period = std::time::Duration::from_secs(1);
    })
    .await?;
    h.catalog.replace_all([svc("big", many(250))]);
    let before = versions(&h.wait_for_endpoint_count("big", 250).await?);
    h.sink.wait_for(|s| s.initial_sync_done).await;
    let writes_before = h.sink.metrics.successful_writes(Kind::EndpointSlice);
    let endpoints_before = h.sink.metrics.successful_writes(Kind::Endpoints);

    h.catalog.upsert(svc("big", many(251)));
    let after = versions(&h.wait_for_endpoint_count("big", 251).await?);
    let rewritten: Vec<&String> = after
        .iter()
        .filter(|(name, rv)| before.get(*name) != Some(*rv))
        .map(|(name, _)| name)
        .collect();
    assert_eq!(
        rewritten.len(),
        1,
        "exactly one slice changed: {rewritten:?}"
    );
    assert_eq!(before.len(), after.len(), "no slice added or removed");
    assert_eq!(
        h.sink.metrics.successful_writes(Kind::EndpointSlice) - writes_before,
        1
    );

    // The legacy Endpoints follow the slice in the same reconcile: wait for that write
    // too, so that it is not taken for a resync's.
    wait_for("the Endpoints update", WAIT, || async {
        (h.sink.metrics.successful_writes(Kind::Endpoints) > endpoints_before).then_some(())
    })
    .await?;
    // Resyncs (every second here) compare everything again and write nothing.
    let total = h.sink.metrics.total_successful_writes();
    let reconciles = h.sink.metrics.reconciles.get();
    wait_for("two more resyncs", WAIT, || async {
        (h.sink.metrics.reconciles.get() >= reconciles + 2).then_some(())
    })
    .await?;
    assert_eq!(
        h.sink.metrics.total_successful_writes(),
        total,
        "a resync without changes writes nothing"
    );
    assert_eq!(versions(&h.slices_of("big").await?), after);
    Ok(())
}

#[tokio::test]
async fn an_unowned_service_of_the_same_name_is_left_alone() -> Result<()> {
    let h = Harness::start("clash").await?;
    let theirs = h
        .services()
        .create(
            &PostParams::default(),
            &from_json(json!({
                "metadata": {"name": "taken", "labels": {"team": "payments"}},
                "spec": {"selector": {"app": "taken"}, "ports": [{"port": 80}]}
            })),
        )
        .await?;
    h.catalog.replace_all([
        svc("taken", vec![ep("192.0.2.40", &[(8080, "http")], true)]),
        svc("free", many(1)),
    ]);
    h.wait_for_endpoint_count("free", 1).await?;
    wait_for("the clash to be reported", WAIT, || async {
        (h.sink.metrics.name_clashes.get() >= 1).then_some(())
    })
    .await?;
    let now = h.services().get("taken").await?;
    assert_eq!(
        now.metadata.resource_version, theirs.metadata.resource_version,
        "untouched"
    );
    assert!(!labels_of(&now).contains_key("app.kubernetes.io/managed-by"));
    let ours = ListParams::default()
        .labels("kubernetes.io/service-name=taken,app.kubernetes.io/managed-by=registry-connector");
    assert!(
        h.slices().list(&ours).await?.items.is_empty(),
        "no endpoints attached to their service"
    );
    // Their Service has a selector, so the endpoints controller owns its Endpoints.
    if let Some(eps) = h.endpoints().get_opt("taken").await? {
        assert!(
            !labels_of(&eps).contains_key("app.kubernetes.io/managed-by"),
            "not ours"
        );
    }
    let event = wait_for_event(&h, "NameClash", "taken").await?;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(
        event.regarding.as_ref().and_then(|r| r.uid.clone()),
        theirs.metadata.uid,
        "the event is on their object"
    );
    Ok(())
}

#[tokio::test]
async fn an_empty_snapshot_is_held_and_released_by_the_operator() -> Result<()> {
    let h = Harness::start_with("guard", |cfg| cfg.guard.hold_for = None).await?;
    h.catalog.replace_all(three_services());
    h.wait_for_endpoint_count("big", 250).await?;
    h.sink.wait_for(|s| s.initial_sync_done).await;

    h.catalog.replace_all(Vec::new());
    let status =
        tokio::time::timeout(WAIT, h.sink.wait_for(|s| s.held_deletions.len() == 3)).await?;
    assert_eq!(
        status.held_deletions.into_iter().collect::<Vec<_>>(),
        vec!["big", "mixed", "multi"]
    );
    assert_eq!(h.sink.metrics.held_deletions.get(), 3);
    let names = common::objects::service_names(&h.client, h.ns.name()).await?;
    for name in ["big", "mixed", "multi"] {
        assert!(names.contains(&name.to_string()), "{name} kept while held");
    }

    wait_for_event(&h, "DeletionHeld", "big").await?;

    h.sink.allow_held_deletions();
    wait_for("the allowed deletions", WAIT, || async {
        let left = h
            .services()
            .list(&ListParams::default().labels("app.kubernetes.io/managed-by=registry-connector"))
            .await
            .ok()?;
        left.items.is_empty().then_some(())
    })
    .await?;
    assert!(h.slices_of("big").await?.is_empty());
    assert!(h.endpoints().get_opt("big").await?.is_none());
    Ok(())
}

#[tokio::test]
async fn nothing_is_deleted_before_the_first_snapshot() -> Result<()> {
    let mut h = Harness::start("first-snapshot").await?;
    h.catalog.replace_all(three_services());
    h.wait_for_endpoint_count("big", 250).await?;

    // A new connector process whose source has only reported one service so far.
    h.restart_with(|_| {}).await?;
    h.catalog.upsert(svc(
        "multi",
        vec![ep("192.0.2.10", &[(8080, "http")], true)],
    ));
    h.wait_for_endpoint_count("multi", 1).await?;
    for name in ["big", "mixed"] {
        assert!(h.services().get_opt(name).await?.is_some(), "{name} kept");
    }
    assert_eq!(endpoint_count(&h.slices_of("big").await?), 250);
    assert!(!h.sink.status().initial_sync_done);
    Ok(())
}

#[tokio::test]
async fn drift_is_healed() -> Result<()> {
    let h = Harness::start("drift").await?;
    h.catalog.replace_all(three_services());
    let slices = h.wait_for_endpoint_count("multi", 2).await?;
    let victim = slices[0].metadata.name.clone().expect("name");

    h.slices().delete(&victim, &DeleteParams::default()).await?;
    h.services()
        .patch(
            "multi",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"ports": [{"name": "oops", "port": 1234}]}})),
        )
        .await?;

    wait_for("the slice and the ports to be restored", WAIT, || async {
        let slice = h.slices().get_opt(&victim).await.ok()??;
        let svc: Service = h.services().get("multi").await.ok()?;
        let mut ports: Vec<i32> = svc.spec?.ports?.iter().map(|p| p.port).collect();
        ports.sort();
        (ports == vec![8080, 9090] && slice.endpoints.len() == 2).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn registry_names_become_valid_kubernetes_names() -> Result<()> {
    let h = Harness::start("naming").await?;
    h.catalog.replace_all([svc("Orders_Service.v2", many(2))]);
    h.wait_for_endpoint_count("orders-service-v2", 2).await?;
    let svc = h.services().get("orders-service-v2").await?;
    assert_eq!(
        annotations_of(&svc)
            .get("flomesh.io/cloud-service-inherited-from")
            .map(String::as_str),
        Some("Orders_Service.v2")
    );
    Ok(())
}
