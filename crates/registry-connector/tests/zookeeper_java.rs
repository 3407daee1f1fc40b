//! End to end with nodes written by the real client libraries: Apache Dubbo 3.3.6
//! providers with Dubbo's ZooKeeper registry (which writes the interface-level
//! `/dubbo/<interface>/providers/<URL>` and the application-level
//! `/services/<application>/<host:port>`) and Apache Curator 5.9's service discovery as
//! Spring Cloud Zookeeper uses it (`scripts/lib/zookeeper-java-register`, the fixture in
//! `testenv/zookeeper/register`). They write below the global roots `/dubbo` and
//! `/services`, so each test names its own interfaces and applications and filters on a
//! marker parameter of its own.

mod common;

use std::time::Instant;

use anyhow::Result;
use common::objects::{port_specs, service_names, wait_endpoints};
use common::process::Connector;
use common::zookeeper::{JavaApps, ZkScenario};
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use testenv::unique_name;

fn annotation(svc: &Service, key: &str) -> Option<String> {
    svc.metadata.annotations.as_ref()?.get(key).cloned()
}

fn zk(key: &str) -> String {
    format!("zookeeper.connector.flomesh.io/{key}")
}

fn connector(s: &ZkScenario, ns: &str, layout: &str, extra: &[&str]) -> Result<Connector> {
    Connector::builder(s.env, ns)
        .zookeeper()
        .args(["--zookeeper-layout", layout])
        .args(extra)
        .start()
}

#[tokio::test]
async fn dubbo_and_curator_registrations_of_real_clients_are_published() -> Result<()> {
    let s = ZkScenario::new("zk-java").await?;
    let curator_ns = s.env.namespace("zk-java-curator").await?;
    let apps_ns = s.env.namespace("zk-java-apps").await?;
    let t = unique_name("t")[2..].to_string();
    let marker = format!("rc-test={t}");
    let (orders, users) = (
        format!("com.example.Order{t}"),
        format!("com.example.User{t}"),
    );
    let (order_app, user_app, spare_app) = (
        format!("order-{t}"),
        format!("user-{t}"),
        format!("spare-{t}"),
    );
    let billing = format!("billing-{t}");
    let stays = JavaApps::start(
        &s,
        &[
            format!("dubbo|{order_app}|{orders}|1.0.0||192.0.2.141|20880||{marker}"),
            format!("dubbo|{order_app}|{orders}|2.0.0|blue|192.0.2.141|20880||{marker}"),
            format!("dubbo|{user_app}|{users}|||2001:db8::141|50051|tri|{marker}"),
            format!(
                "curator|{billing}|{billing}-1|198.51.100.141|8080|{marker},instance_status=UP"
            ),
        ],
    )
    .await?;
    // A second application providing OrderService 1.0.0 from another address: the one
    // that exits below.
    let exits = JavaApps::start(
        &s,
        &[format!(
            "dubbo|{spare_app}|{orders}|1.0.0||192.0.2.142|20880||{marker}"
        )],
    )
    .await?;

    let filter = ["--filter-metadata", &marker];
    // By service key: each version and group of OrderService apart, as a Dubbo consumer
    // sees them (the default, by interface, is covered by zookeeper_e2e).
    let dubbo = connector(
        &s,
        s.ns(),
        "dubbo",
        &[filter[0], filter[1], "--dubbo-service-by", "service-key"],
    )?;
    let curator = connector(&s, curator_ns.name(), "curator", &filter)?;
    // Dubbo 3's application-level instances carry no URL parameter: no filter, and only
    // this test's applications are looked at.
    let apps = connector(&s, apps_ns.name(), "curator", &[])?;
    for c in [&dubbo, &curator, &apps] {
        c.wait_ready().await?;
    }

    let v1 = format!("com-example-order{t}-1-0-0");
    let v2 = format!("blue-com-example-order{t}-2-0-0");
    let user = format!("com-example-user{t}");
    wait_endpoints(
        &s.client,
        s.ns(),
        &v1,
        &[("192.0.2.141", true), ("192.0.2.142", true)],
    )
    .await?;
    wait_endpoints(&s.client, s.ns(), &v2, &[("192.0.2.141", true)]).await?;
    wait_endpoints(&s.client, s.ns(), &user, &[("2001:db8::141", true)]).await?;
    let mut want = vec![v1.clone(), v2.clone(), user.clone()];
    want.sort();
    assert_eq!(service_names(&s.client, s.ns()).await?, want);
    let services: Api<Service> = Api::namespaced(s.client.clone(), s.ns());
    let v1_svc = services.get(&v1).await?;
    assert_eq!(
        port_specs(&v1_svc),
        [("dubbo20880".to_string(), 20880, Some("dubbo".to_string()))]
    );
    assert_eq!(annotation(&v1_svc, &zk("interface")), Some(orders.clone()));
    assert_eq!(
        annotation(&v1_svc, &zk("version")).as_deref(),
        Some("1.0.0")
    );
    let mut apps_of_v1 = [order_app.clone(), spare_app.clone()];
    apps_of_v1.sort();
    assert_eq!(
        annotation(&v1_svc, &zk("application")),
        Some(apps_of_v1.join(","))
    );
    let v2_svc = services.get(&v2).await?;
    assert_eq!(annotation(&v2_svc, &zk("group")).as_deref(), Some("blue"));
    assert_eq!(
        port_specs(&services.get(&user).await?),
        [("tri50051".to_string(), 50051, Some("tri".to_string()))]
    );

    // Curator, as Spring Cloud Zookeeper registers.
    wait_endpoints(
        &s.client,
        curator_ns.name(),
        &billing,
        &[("198.51.100.141", true)],
    )
    .await?;
    assert_eq!(
        service_names(&s.client, curator_ns.name()).await?,
        [billing.as_str()]
    );
    let curator_services: Api<Service> = Api::namespaced(s.client.clone(), curator_ns.name());
    assert_eq!(
        port_specs(&curator_services.get(&billing).await?),
        [("http8080".to_string(), 8080, Some("http".to_string()))]
    );
    // Dubbo 3's application-level discovery in the same tree: the protocols from its
    // `dubbo.endpoints`, an IPv6 address in brackets.
    wait_endpoints(
        &s.client,
        apps_ns.name(),
        &order_app,
        &[("192.0.2.141", true)],
    )
    .await?;
    wait_endpoints(
        &s.client,
        apps_ns.name(),
        &user_app,
        &[("2001:db8::141", true)],
    )
    .await?;
    let app_services: Api<Service> = Api::namespaced(s.client.clone(), apps_ns.name());
    assert_eq!(
        port_specs(&app_services.get(&user_app).await?),
        [("tri50051".to_string(), 50051, Some("tri".to_string()))]
    );

    // The spare application exits (its shutdown hook unregisters, its session closes):
    // its provider leaves OrderService 1.0.0, the rest stays.
    let started = Instant::now();
    exits.stop().await?;
    wait_endpoints(&s.client, s.ns(), &v1, &[("192.0.2.141", true)]).await?;
    println!(
        "a real Dubbo provider that exited: gone from Kubernetes after {:?} (shutdown included)",
        started.elapsed()
    );
    wait_endpoints(&s.client, s.ns(), &user, &[("2001:db8::141", true)]).await?;
    stays.stop().await?;
    Ok(())
}
