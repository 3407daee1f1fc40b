//! End to end against a real Spring Cloud Netflix Eureka server, the real control plane
//! and the real binary. Every scenario filters on its own metadata marker, so the tests
//! can share the server and run in parallel.

mod common;

use std::time::{Duration, Instant};

use anyhow::Result;
use common::eureka::{EurekaScenario, Instance, POLL_INTERVAL};
use common::objects::{
    port_specs, readiness, service_names, slices_of, wait_endpoints, wait_service_gone,
};
use common::WAIT;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use testenv::{unique_name, wait_for};

const DELTAS: &str = "registry_connector_registry_requests_total";
const FULL_FETCHES: &str = "registry_connector_eureka_full_fetches_total";

#[tokio::test]
async fn syncs_applications_with_their_ports_and_addresses() -> Result<()> {
    let s = EurekaScenario::new("eureka-sync").await?;
    let orders = unique_name("orders");
    let pay = unique_name("pay");
    let stock = unique_name("stock");
    s.register(Instance::up(&orders, "orders-1", "192.0.2.10", 8080))
        .await?;
    s.register(Instance::up(&orders, "orders-2", "2001:db8::10", 8080))
        .await?;
    s.register(Instance {
        secure_port: Some(8443),
        ..Instance::up(&pay, "pay-1", "192.0.2.20", 8080)
    })
    .await?;
    s.register(Instance::up(&stock, "stock-1", "198.51.100.30", 9000))
        .await?;
    s.register(Instance {
        status: "DOWN",
        ..Instance::up(&stock, "stock-2", "198.51.100.31", 9000)
    })
    .await?;
    let connector = s.connector(&[])?;
    connector.wait_ready().await?;

    let (client, ns) = (&s.client, s.ns());
    wait_endpoints(
        client,
        ns,
        &orders,
        &[("192.0.2.10", true), ("2001:db8::10", true)],
    )
    .await?;
    wait_endpoints(client, ns, &pay, &[("192.0.2.20", true)]).await?;
    // The DOWN instance is left out (--passing-only defaults to true).
    wait_endpoints(client, ns, &stock, &[("198.51.100.30", true)]).await?;

    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let orders_svc = services.get(&orders).await?;
    assert_eq!(
        port_specs(&orders_svc),
        [("http8080".to_string(), 8080, Some("http".to_string()))]
    );
    assert_eq!(
        orders_svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("flomesh.io/cloud-service-inherited-from"))
            .map(String::as_str),
        Some(orders.to_uppercase().as_str()),
        "the registry's own spelling is kept"
    );
    let mut families: Vec<String> = slices_of(client, ns, &orders)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|x| x.address_type)
        .collect();
    families.sort();
    assert_eq!(families, ["IPv4", "IPv6"]);
    assert_eq!(
        port_specs(&services.get(&pay).await?),
        [
            ("http8080".to_string(), 8080, Some("http".to_string())),
            ("https8443".to_string(), 8443, Some("https".to_string())),
        ]
    );
    assert_eq!(
        service_names(client, ns).await?,
        {
            let mut all = vec![orders.clone(), pay.clone(), stock.clone()];
            all.sort();
            all
        },
        "exactly the three applications, nothing else"
    );
    s.cleanup().await;
    Ok(())
}

/// Both instances of the status scenario, ready.
const BOTH_READY: &[(&str, bool)] = &[("192.0.2.41", true), ("192.0.2.42", true)];

#[tokio::test]
async fn out_of_service_instances_leave_the_ready_set_and_come_back() -> Result<()> {
    let mut s = EurekaScenario::new("eureka-status").await?;
    // A longer interval than the other scenarios', so that "within two intervals"
    // measures the connector, not the load of the tests running beside it.
    s.poll_interval = Duration::from_secs(2);
    let interval = s.poll_interval;
    let app = unique_name("api");
    // Ids of this run only: Eureka keeps a status override by instance id, even across
    // applications, so an id a failed run left OUT_OF_SERVICE would start so here.
    let (one, two) = (format!("{app}-1"), format!("{app}-2"));
    s.register(Instance::up(&app, &one, "192.0.2.41", 8080))
        .await?;
    s.register(Instance::up(&app, &two, "192.0.2.42", 8080))
        .await?;
    let passing_only = s.connector(&[])?;
    // A second connector publishing every instance, ready or not, in its own namespace.
    let all_ns = s.env.namespace("eureka-status-all").await?;
    let all = s.connector_in(all_ns.name(), &["--passing-only=false"])?;
    let (client, ns) = (&s.client, s.ns());
    for namespace in [ns, all_ns.name()] {
        wait_endpoints(client, namespace, &app, BOTH_READY).await?;
    }

    s.set_status(&app, &two, "OUT_OF_SERVICE").await?;
    let started = Instant::now();
    wait_endpoints(client, ns, &app, &[("192.0.2.41", true)]).await?;
    let took = started.elapsed();
    wait_endpoints(
        client,
        all_ns.name(),
        &app,
        &[("192.0.2.41", true), ("192.0.2.42", false)],
    )
    .await?;
    println!("OUT_OF_SERVICE left the ready set after {took:?} (poll interval {interval:?})");
    // Two poll intervals; the coalescing period (100 ms quiet, 500 ms max) and the
    // test's own polling fit in the second.
    assert!(took < 2 * interval, "took {took:?}");

    s.set_status(&app, &two, "UP").await?;
    for namespace in [ns, all_ns.name()] {
        wait_endpoints(client, namespace, &app, BOTH_READY).await?;
    }
    drop((passing_only, all));
    s.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn cancelled_instances_and_applications_are_removed() -> Result<()> {
    let s = EurekaScenario::new("eureka-cancel").await?;
    let gone = unique_name("gone");
    let stays = unique_name("stays");
    let also = unique_name("also");
    s.register(Instance::up(&gone, "gone-1", "192.0.2.51", 8080))
        .await?;
    s.register(Instance::up(&gone, "gone-2", "192.0.2.52", 8080))
        .await?;
    s.register(Instance::up(&stays, "stays-1", "192.0.2.53", 8080))
        .await?;
    s.register(Instance::up(&also, "also-1", "192.0.2.54", 8080))
        .await?;
    let _connector = s.connector(&[])?;
    let (client, ns) = (&s.client, s.ns());
    wait_endpoints(
        client,
        ns,
        &gone,
        &[("192.0.2.51", true), ("192.0.2.52", true)],
    )
    .await?;
    wait_endpoints(client, ns, &also, &[("192.0.2.54", true)]).await?;

    s.cancel(&gone, "gone-1").await?;
    wait_endpoints(client, ns, &gone, &[("192.0.2.52", true)]).await?;
    s.cancel(&gone, "gone-2").await?;
    wait_service_gone(client, ns, &gone).await?;
    wait_for("the slices of the removed service to go", WAIT, || async {
        slices_of(client, ns, &gone)
            .await
            .filter(|slices| slices.is_empty())
    })
    .await?;
    let mut left = vec![also.clone(), stays.clone()];
    left.sort();
    assert_eq!(service_names(client, ns).await?, left);
    s.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn at_rest_nothing_is_written_and_deltas_carry_the_changes() -> Result<()> {
    let s = EurekaScenario::new("eureka-steady").await?;
    let a = unique_name("rest-a");
    let b = unique_name("rest-b");
    s.register(Instance::up(&a, "a-1", "203.0.113.1", 8080))
        .await?;
    s.register(Instance::up(&b, "b-1", "203.0.113.2", 8080))
        .await?;
    let connector = s.connector(&[])?;
    connector.wait_ready().await?;
    let (client, ns) = (&s.client, s.ns());
    wait_endpoints(client, ns, &a, &[("203.0.113.1", true)]).await?;
    wait_endpoints(client, ns, &b, &[("203.0.113.2", true)]).await?;
    // Let the writes of the initial sync come back through the watches.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let writes = connector.writes().await?;
    let deltas = connector
        .metric_where(DELTAS, &[("endpoint", "apps_delta"), ("result", "ok")])
        .await?;
    tokio::time::sleep(4 * POLL_INTERVAL).await;
    let writes_at_rest = connector.writes().await? - writes;
    let deltas_at_rest = connector
        .metric_where(DELTAS, &[("endpoint", "apps_delta"), ("result", "ok")])
        .await?
        - deltas;
    println!(
        "at rest for {:?}: {writes_at_rest} writes, {deltas_at_rest} deltas",
        4 * POLL_INTERVAL
    );
    assert_eq!(
        writes_at_rest, 0.0,
        "no Kubernetes writes while nothing changes"
    );
    assert!(
        deltas_at_rest >= 3.0,
        "polled with deltas: {deltas_at_rest}"
    );

    // One change travels as a delta: one slice and one Endpoints written, no full read.
    s.register(Instance::up(&a, "a-2", "203.0.113.3", 8080))
        .await?;
    wait_endpoints(
        client,
        ns,
        &a,
        &[("203.0.113.1", true), ("203.0.113.3", true)],
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let writes_for_change = connector.writes().await? - writes;
    assert_eq!(
        writes_for_change, 2.0,
        "one EndpointSlice and one Endpoints"
    );
    assert_eq!(
        connector
            .metric_where(FULL_FETCHES, &[("reason", "start")])
            .await?,
        1.0
    );
    assert_eq!(
        connector
            .metric_where(FULL_FETCHES, &[("reason", "hash_mismatch")])
            .await?,
        0.0,
        "the delta reconciled with the server's hash code"
    );
    assert_eq!(
        readiness(&slices_of(client, ns, &b).await.unwrap_or_default()).len(),
        1
    );
    s.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn allow_listed_metadata_is_copied_and_removed_when_dropped() -> Result<()> {
    let s = EurekaScenario::new("eureka-metadata").await?;
    let app = unique_name("meta");
    let owner = "Team Blue <blue@example.com>";
    let with_version = || Instance {
        metadata: vec![("version", "1.4"), ("owner", owner), ("secret", "s3cr3t")],
        ..Instance::up(&app, "meta-1", "192.0.2.71", 8080)
    };
    s.register(with_version()).await?;
    let _connector = s.connector(&[
        "--metadata-labels",
        "version",
        "--metadata-annotations",
        "owner",
    ])?;
    let services: Api<Service> = Api::namespaced(s.client.clone(), s.ns());
    let labelled = wait_for("the version label", WAIT, || async {
        let svc = services.get_opt(&app).await.ok()??;
        let labels = svc.metadata.labels.clone().unwrap_or_default();
        (labels.get("version").map(String::as_str) == Some("1.4")).then_some(svc)
    })
    .await?;
    let annotations = labelled.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(annotations.get("owner").map(String::as_str), Some(owner));
    let labels = labelled.metadata.labels.clone().unwrap_or_default();
    assert!(!labels.contains_key("secret") && !annotations.contains_key("secret"));

    // Another tool labels the Service; then the instance re-registers without `version`.
    let patch = serde_json::json!({"metadata": {"labels": {"team": "blue"}}});
    services
        .patch(
            &app,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await?;
    s.register(Instance {
        metadata: vec![("owner", owner)],
        ..Instance::up(&app, "meta-1", "192.0.2.71", 8080)
    })
    .await?;
    let svc = wait_for("the version label to go", WAIT, || async {
        let svc = services.get_opt(&app).await.ok()??;
        let labels = svc.metadata.labels.clone().unwrap_or_default();
        (!labels.contains_key("version")).then_some(svc)
    })
    .await?;
    let labels = svc.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("team").map(String::as_str),
        Some("blue"),
        "not ours: kept"
    );
    let annotations = svc.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(annotations.get("owner").map(String::as_str), Some(owner));
    s.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn an_invalid_instance_is_reported_once_while_it_stays() -> Result<()> {
    let s = EurekaScenario::new("eureka-reported").await?;
    let app = unique_name("bad");
    s.register(Instance::up(&app, "good-1", "203.0.113.21", 8080))
        .await?;
    // Loopback is no endpoint Kubernetes accepts: left out, logged, counted.
    s.register(Instance::up(&app, "loop-1", "127.0.0.1", 8080))
        .await?;
    // A full read every poll: the application is rebuilt each time.
    let connector = s.connector(&["--eureka-full-fetch-interval", "1ms"])?;
    wait_endpoints(&s.client, s.ns(), &app, &[("203.0.113.21", true)]).await?;
    let rejected = || async {
        connector
            .metric_where(
                "registry_connector_registry_rejected_entries_total",
                &[("source", "eureka")],
            )
            .await
    };
    let full_reads = || async {
        connector
            .metric_where(FULL_FETCHES, &[("reason", "periodic")])
            .await
    };
    let first = full_reads().await?;
    wait_for("three more full reads", WAIT, || async {
        (full_reads().await.ok()? >= first + 3.0).then_some(())
    })
    .await?;
    assert_eq!(
        rejected().await?,
        1.0,
        "counted once over several full reads"
    );
    let log = std::fs::read_to_string(&connector.log)?;
    assert_eq!(
        log.matches("Eureka instance left out").count(),
        1,
        "logged once: {}",
        connector.log_tail()
    );
    s.cleanup().await;
    Ok(())
}
