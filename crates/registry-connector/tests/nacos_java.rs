//! End to end with Nacos's official Java client: instances registered the way a Spring
//! Cloud Alibaba or Dubbo application registers them (`com.alibaba.nacos:nacos-client`
//! 2.3.2 over gRPC, ephemeral, tied to the client's connection; the fixture is
//! `testenv/nacos/register`, run by `scripts/lib/nacos-java-register`), against the test
//! environment's real Nacos 2.3.2, the real control plane and the real binary. The
//! client is then killed: Nacos removes a disconnected client's instances, and so must
//! Kubernetes. Documentation addresses only; Nacos never contacts ephemeral instances.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::nacos::{Instance, JavaClient, JavaInstance, NacosScenario};
use common::objects::{port_specs, wait_endpoints, wait_service_gone};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use testenv::unique_name;

/// How long the removal of a killed client's instances may take to reach Kubernetes:
/// Nacos sees the connection close at once and pushes; a service left empty is deleted
/// after the connector's two confirming reads, 5 s and 10 s later
/// (`--nacos-empty-confirm-delay`). Generous for a loaded machine.
const GONE_BOUND: Duration = Duration::from_secs(30);

fn annotation(svc: &Service, key: &str) -> Option<String> {
    svc.metadata.annotations.as_ref()?.get(key).cloned()
}

/// A slice's port: (name, port, protocol, appProtocol).
type PortView = (String, i32, String, String);
/// Per slice: (addressType, its ports, [(address, ready)]), sorted.
type SliceView = (String, Vec<PortView>, Vec<(String, bool)>);

fn slice_views(slices: &[EndpointSlice]) -> Vec<SliceView> {
    let mut out: Vec<SliceView> = slices
        .iter()
        .filter(|s| !s.endpoints.is_empty())
        .map(|s| {
            let mut ports: Vec<PortView> = s
                .ports
                .iter()
                .flatten()
                .map(|p| {
                    (
                        p.name.clone().unwrap_or_default(),
                        p.port.unwrap_or_default(),
                        p.protocol.clone().unwrap_or_default(),
                        p.app_protocol.clone().unwrap_or_default(),
                    )
                })
                .collect();
            ports.sort();
            let mut endpoints: Vec<(String, bool)> = s
                .endpoints
                .iter()
                .map(|e| {
                    (
                        e.addresses.join(","),
                        e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false),
                    )
                })
                .collect();
            endpoints.sort();
            (s.address_type.clone(), ports, endpoints)
        })
        .collect();
    out.sort();
    out
}

/// A slice with one TCP port, named `<protocol><port>`, and ready endpoints.
fn view(address_type: &str, protocol: &str, port: i32, endpoints: &[&str]) -> SliceView {
    (
        address_type.to_string(),
        vec![(
            format!("{protocol}{port}"),
            port,
            "TCP".to_string(),
            protocol.to_string(),
        )],
        endpoints.iter().map(|a| (a.to_string(), true)).collect(),
    )
}

#[tokio::test]
async fn instances_of_the_java_client_are_published_and_leave_with_it() -> Result<()> {
    let s = NacosScenario::new("nacos-java").await?;
    let ns = s.ns().to_string();
    let g1 = s.group.clone();
    let g2 = unique_name("G");
    let orders = unique_name("orders");
    let pay = unique_name("pay");
    let iface = unique_name("Svc");
    let dubbo = format!("providers:com.example.{iface}:1.0.0:");
    let dubbo_kube = format!("providers-com-example-{iface}-1-0-0").to_lowercase();

    // The application: two instances of orders (IPv4 in DEFAULT, IPv6 in SH: one
    // batch registration, as Nacos 2.x keeps one instance per service and connection
    // otherwise), a Dubbo provider, and pay in a second group.
    let java = JavaClient::start(
        &s,
        &[
            JavaInstance {
                metadata: vec![("version", "2")],
                ..JavaInstance::new(&orders, &g1, "192.0.2.91", 8080)
            },
            JavaInstance {
                cluster: "SH",
                metadata: vec![("version", "2")],
                ..JavaInstance::new(&orders, &g1, "2001:db8::91", 8080)
            },
            JavaInstance {
                metadata: vec![("protocol", "dubbo"), ("side", "provider")],
                ..JavaInstance::new(&dubbo, &g1, "203.0.113.91", 20880)
            },
            JavaInstance::new(&pay, &g2, "198.51.100.91", 9000),
        ],
    )
    .await?;
    // Beside it, instances registered over HTTP that outlive it (so that the client's
    // exit removes one service of three, below the connector's mass-deletion guard).
    let orders_http = Instance::new(&orders, &g1, "192.0.2.92", 8080);
    let pay_http = Instance::new(&pay, &g2, "198.51.100.92", 9000);
    s.register(&orders_http).await?;
    s.register(&pay_http).await?;

    let groups = format!("{g1},{g2}");
    let connector = s.connector_in(&ns, &groups, &["--metadata-labels", "version"])?;
    connector.wait_ready().await?;

    let orders_slices = wait_endpoints(
        &s.client,
        &ns,
        &orders,
        &[
            ("192.0.2.91", true),
            ("192.0.2.92", true),
            ("2001:db8::91", true),
        ],
    )
    .await?;
    assert_eq!(
        slice_views(&orders_slices),
        vec![
            view("IPv4", "http", 8080, &["192.0.2.91", "192.0.2.92"]),
            view("IPv6", "http", 8080, &["2001:db8::91"]),
        ],
        "orders: one slice per address family"
    );
    let dubbo_slices =
        wait_endpoints(&s.client, &ns, &dubbo_kube, &[("203.0.113.91", true)]).await?;
    assert_eq!(
        slice_views(&dubbo_slices),
        vec![view("IPv4", "dubbo", 20880, &["203.0.113.91"])],
        "the Dubbo provider's port is named by its protocol"
    );
    wait_endpoints(
        &s.client,
        &ns,
        &pay,
        &[("198.51.100.91", true), ("198.51.100.92", true)],
    )
    .await?;

    let services: Api<Service> = Api::namespaced(s.client.clone(), &ns);
    let orders_svc = services.get(&orders).await?;
    let expect = |svc: &Service, key: &str, want: &str| {
        assert_eq!(
            annotation(svc, key).as_deref(),
            Some(want),
            "{key} of {:?}",
            svc.metadata.name
        )
    };
    expect(&orders_svc, "nacos.connector.flomesh.io/group", &g1);
    expect(&orders_svc, "nacos.connector.flomesh.io/service", &orders);
    expect(
        &orders_svc,
        "nacos.connector.flomesh.io/clusters",
        "DEFAULT,SH",
    );
    assert_eq!(
        orders_svc
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("version"))
            .map(String::as_str),
        Some("2"),
        "allow-listed metadata from the Java client becomes a label"
    );
    assert_eq!(
        port_specs(&orders_svc),
        [("http8080".to_string(), 8080, Some("http".to_string()))]
    );
    let dubbo_svc = services.get(&dubbo_kube).await?;
    expect(&dubbo_svc, "nacos.connector.flomesh.io/group", &g1);
    expect(&dubbo_svc, "nacos.connector.flomesh.io/service", &dubbo);
    expect(
        &dubbo_svc,
        "flomesh.io/cloud-service-inherited-from",
        &dubbo,
    );
    assert_eq!(
        port_specs(&dubbo_svc),
        [("dubbo20880".to_string(), 20880, Some("dubbo".to_string()))]
    );
    let pay_svc = services.get(&pay).await?;
    expect(&pay_svc, "nacos.connector.flomesh.io/group", &g2);

    // The application crashes (SIGKILL: no deregistration). Nacos drops its
    // connection's instances and pushes; the HTTP-registered ones stay.
    let reconnects = connector
        .metric_sum("registry_connector_nacos_reconnects_total")
        .await?;
    let log = java.log.clone();
    let started = Instant::now();
    java.kill().await.context("killing the Java client")?;
    wait_endpoints(&s.client, &ns, &orders, &[("192.0.2.92", true)])
        .await
        .with_context(|| format!("Java client log: {}", log.display()))?;
    wait_endpoints(&s.client, &ns, &pay, &[("198.51.100.92", true)]).await?;
    let endpoints_gone = started.elapsed();
    wait_service_gone(&s.client, &ns, &dubbo_kube).await?;
    let service_gone = started.elapsed();
    println!(
        "Java client killed: its endpoints left Kubernetes after {endpoints_gone:?}, \
         its only service after {service_gone:?}"
    );
    assert!(service_gone < GONE_BOUND, "took {service_gone:?}");

    let orders_svc = services.get(&orders).await?;
    expect(
        &orders_svc,
        "nacos.connector.flomesh.io/clusters",
        "DEFAULT",
    );
    let mut want = vec![orders.clone(), pay.clone()];
    want.sort();
    assert_eq!(
        common::objects::service_names(&s.client, &ns).await?,
        want,
        "the services with instances left stay"
    );
    assert_eq!(
        connector
            .metric_sum("registry_connector_nacos_reconnects_total")
            .await?,
        reconnects,
        "the client's exit is a push, not a reconnect of the connector"
    );
    Ok(())
}
