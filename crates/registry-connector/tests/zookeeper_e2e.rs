//! End to end against the test environment's real ZooKeeper 3.9 server, the real control
//! plane and the real binary. Each scenario writes below a base path of its own (as
//! Dubbo's and Curator's clients write: persistent directories, ephemeral nodes of the
//! scenario's session), so the tests share the server and run in parallel.

mod common;

use std::time::{Duration, Instant};

use anyhow::Result;
use common::objects::{port_specs, service_names, wait_endpoints, wait_service_gone};
use common::process::Connector;
use common::zookeeper::{spring_instance, url_encode, Provider, ZkScenario};
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use testenv::{unique_name, wait_for};

const REQUESTS: &str = "registry_connector_registry_requests_total";
const REJECTED: &str = "registry_connector_registry_rejected_entries_total";
/// How long one change may take to reach Kubernetes here (an event, a 100 ms quiet
/// period, the writes): generous for a loaded machine; each change prints its time.
const CHANGE_BOUND: Duration = Duration::from_secs(10);
const INHERITED_FROM: &str = "flomesh.io/cloud-service-inherited-from";

fn annotation(svc: &Service, key: &str) -> Option<String> {
    svc.metadata.annotations.as_ref()?.get(key).cloned()
}

fn zk(key: &str) -> String {
    format!("zookeeper.connector.flomesh.io/{key}")
}

/// 8 hex digits, for names Java would accept (no `-`).
fn tag() -> String {
    unique_name("t")[2..].to_string()
}

/// Successful ZooKeeper reads so far (both kinds).
async fn reads(c: &Connector) -> Result<f64> {
    let mut n = 0.0;
    for endpoint in ["get_children", "get_data"] {
        n += c
            .metric_where(REQUESTS, &[("endpoint", endpoint), ("result", "ok")])
            .await?;
    }
    Ok(n)
}

async fn wait_rejected(c: &Connector, reason: &str) -> Result<()> {
    wait_for(&format!("a {reason} rejection"), common::WAIT, || async {
        let n = c.metric_where(REJECTED, &[("reason", reason)]).await.ok()?;
        (n >= 1.0).then_some(())
    })
    .await
    .map_err(|e| e.context(c.log_tail()))
}

fn took(what: &str, started: Instant) {
    let took = started.elapsed();
    println!("{what}: in Kubernetes after {took:?}");
    assert!(took < CHANGE_BOUND, "{what} took {took:?}");
}

#[tokio::test]
async fn dubbo_providers_become_services_and_changes_cost_no_reads() -> Result<()> {
    let s = ZkScenario::new("zk-dubbo").await?;
    let all_ns = s.env.namespace("zk-dubbo-all").await?;
    let by_app_ns = s.env.namespace("zk-dubbo-app").await?;
    let (ns, all, by_app) = (
        s.ns().to_string(),
        all_ns.name().to_string(),
        by_app_ns.name().to_string(),
    );
    let t = tag();
    let orders = format!("com.example.Orders{t}");
    let pay = format!("com.example.Pay{t}");
    let (shop, payments) = (format!("shop-{t}"), format!("pay-{t}"));
    let v1_kube = format!("com-example-orders{t}-1-0-0");
    let v2_kube = format!("blue-com-example-orders{t}-2-0-0");
    let pay_kube = format!("com-example-pay{t}");
    let orders_kube = format!("com-example-orders{t}");

    let v1 = Provider {
        version: "1.0.0",
        application: &shop,
        ..Provider::new(&orders, "192.0.2.91", 20880)
    };
    let v1_ipv6 = Provider {
        host: "[2001:db8::91]",
        ..v1.clone()
    };
    let v2 = Provider {
        version: "2.0.0",
        group: "blue",
        ..Provider::new(&orders, "192.0.2.92", 20880)
    };
    let v2 = Provider {
        application: &shop,
        ..v2
    };
    let tri = Provider {
        protocol: "tri",
        application: &payments,
        ..Provider::new(&pay, "198.51.100.91", 50051)
    };
    for p in [&v1, &v1_ipv6, &v2, &tri] {
        s.register(p).await?;
    }
    // Beside the providers, what Dubbo also writes there, none of it an endpoint; and a
    // node that is no provider URL.
    let consumer = format!("consumer://192.0.2.99/{orders}?application=web&category=consumers&side=consumer&version=1.0.0");
    s.register_raw(&orders, "consumers", &url_encode(&consumer))
        .await?;
    let override_url =
        format!("override://0.0.0.0/{orders}?category=configurators&disabled=true&dynamic=false");
    s.register_raw(&orders, "configurators", &url_encode(&override_url))
        .await?;
    s.register_raw(&pay, "providers", "not-a-provider-url")
        .await?;

    // `passing` splits an interface by version and group; `everything` keeps the
    // default, one Service per interface.
    let passing = s.connector_in(
        &ns,
        "dubbo",
        &[
            "--dubbo-service-by",
            "service-key",
            "--metadata-annotations",
            "release",
        ],
    )?;
    let everything = s.connector_in(&all, "dubbo", &["--passing-only=false"])?;
    let apps = s.connector_in(&by_app, "dubbo", &["--dubbo-service-by", "application"])?;
    for c in [&passing, &everything, &apps] {
        c.wait_ready().await?;
    }

    let both = [("192.0.2.91", true), ("2001:db8::91", true)];
    wait_endpoints(&s.client, &ns, &v1_kube, &both).await?;
    wait_endpoints(&s.client, &ns, &v2_kube, &[("192.0.2.92", true)]).await?;
    let every_version = [
        ("192.0.2.91", true),
        ("192.0.2.92", true),
        ("2001:db8::91", true),
    ];
    wait_endpoints(&s.client, &all, &orders_kube, &every_version).await?;
    for namespace in [&ns, &all] {
        wait_endpoints(&s.client, namespace, &pay_kube, &[("198.51.100.91", true)]).await?;
    }
    let mut want = vec![v1_kube.clone(), v2_kube.clone(), pay_kube.clone()];
    want.sort();
    assert_eq!(
        service_names(&s.client, &ns).await?,
        want,
        "one Service per interface version and group; no consumer, configurator or bad node"
    );
    let mut want = vec![orders_kube.clone(), pay_kube.clone()];
    want.sort();
    assert_eq!(
        service_names(&s.client, &all).await?,
        want,
        "by default one Service per interface"
    );
    let all_services: Api<Service> = Api::namespaced(s.client.clone(), &all);
    let orders_svc = all_services.get(&orders_kube).await?;
    assert_eq!(
        annotation(&orders_svc, &zk("interface")),
        Some(orders.clone())
    );
    assert_eq!(
        annotation(&orders_svc, &zk("version")).as_deref(),
        Some("1.0.0,2.0.0"),
        "the versions its providers export"
    );
    assert_eq!(
        annotation(&orders_svc, &zk("group")).as_deref(),
        Some("blue")
    );
    assert_eq!(
        annotation(&orders_svc, INHERITED_FROM),
        Some(orders.clone())
    );
    let services: Api<Service> = Api::namespaced(s.client.clone(), &ns);
    let v1_svc = services.get(&v1_kube).await?;
    assert_eq!(
        port_specs(&v1_svc),
        [("dubbo20880".to_string(), 20880, Some("dubbo".to_string()))]
    );
    assert_eq!(annotation(&v1_svc, &zk("interface")), Some(orders.clone()));
    assert_eq!(
        annotation(&v1_svc, &zk("version")).as_deref(),
        Some("1.0.0")
    );
    assert_eq!(annotation(&v1_svc, &zk("group")), None);
    assert_eq!(annotation(&v1_svc, &zk("application")), Some(shop.clone()));
    assert_eq!(
        annotation(&v1_svc, INHERITED_FROM),
        Some(format!("{orders}:1.0.0")),
        "the Dubbo service key is kept"
    );
    assert_eq!(
        annotation(&v1_svc, "release").as_deref(),
        Some("3.2.11"),
        "URL parameters are the allow-listed metadata"
    );
    let v2_svc = services.get(&v2_kube).await?;
    assert_eq!(annotation(&v2_svc, &zk("group")).as_deref(), Some("blue"));
    assert_eq!(
        annotation(&v2_svc, &zk("version")).as_deref(),
        Some("2.0.0")
    );
    let pay_svc = services.get(&pay_kube).await?;
    assert_eq!(
        port_specs(&pay_svc),
        [("tri50051".to_string(), 50051, Some("tri".to_string()))]
    );
    wait_rejected(&passing, "invalid_url").await?;

    // By application: the processes, whatever they export.
    wait_endpoints(
        &s.client,
        &by_app,
        &shop,
        &[
            ("192.0.2.91", true),
            ("192.0.2.92", true),
            ("2001:db8::91", true),
        ],
    )
    .await?;
    wait_endpoints(&s.client, &by_app, &payments, &[("198.51.100.91", true)]).await?;
    let mut apps_want = vec![payments.clone(), shop.clone()];
    apps_want.sort();
    assert_eq!(service_names(&s.client, &by_app).await?, apps_want);

    // From here on a change costs no read at all: the provider's URL is its name.
    let reads_before = reads(&passing).await?;
    let events_before = passing
        .metric_sum("registry_connector_zookeeper_events_total")
        .await?;

    // A provider that starts (a session of its own) and then exits: its session closes
    // and ZooKeeper removes its node.
    let extra = Provider {
        host: "192.0.2.93",
        ..v1.clone()
    };
    let provider_session = ZkScenario::session(&s.addr).await?;
    let started = Instant::now();
    s.create_ephemeral(&provider_session, &s.provider_path(&extra), b"")
        .await?;
    let three = [
        ("192.0.2.91", true),
        ("192.0.2.93", true),
        ("2001:db8::91", true),
    ];
    wait_endpoints(&s.client, &ns, &v1_kube, &three).await?;
    took("a provider registered", started);
    let started = Instant::now();
    drop(provider_session);
    wait_endpoints(&s.client, &ns, &v1_kube, &both).await?;
    took("a provider that exited", started);

    // Deregistered (Dubbo's unregister on a graceful shutdown).
    let started = Instant::now();
    s.delete(&s.provider_path(&v1_ipv6)).await?;
    wait_endpoints(&s.client, &ns, &v1_kube, &[("192.0.2.91", true)]).await?;
    took("a provider deregistered", started);

    // Disabled: the provider's URL is written again with enabled=false.
    s.register(&Provider {
        host: "192.0.2.95",
        ..v1.clone()
    })
    .await?;
    wait_endpoints(
        &s.client,
        &ns,
        &v1_kube,
        &[("192.0.2.91", true), ("192.0.2.95", true)],
    )
    .await?;
    let disabled = Provider {
        host: "192.0.2.95",
        params: vec![("enabled", "false")],
        ..v1.clone()
    };
    let started = Instant::now();
    s.register(&disabled).await?;
    s.delete(&s.provider_path(&Provider {
        host: "192.0.2.95",
        ..v1.clone()
    }))
    .await?;
    wait_endpoints(&s.client, &ns, &v1_kube, &[("192.0.2.91", true)]).await?;
    took("a provider disabled", started);

    // Weight 0: not ready; left out with --passing-only (the default).
    let started = Instant::now();
    s.register(&Provider {
        host: "192.0.2.96",
        params: vec![("weight", "0")],
        ..v1.clone()
    })
    .await?;
    wait_endpoints(
        &s.client,
        &all,
        &orders_kube,
        &[
            ("192.0.2.91", true),
            ("192.0.2.92", true),
            ("192.0.2.96", false),
        ],
    )
    .await?;
    took("a weight-0 provider", started);
    wait_endpoints(&s.client, &ns, &v1_kube, &[("192.0.2.91", true)]).await?;

    // The last provider of a version goes: so does its Service.
    let started = Instant::now();
    s.delete(&s.provider_path(&v2)).await?;
    wait_service_gone(&s.client, &ns, &v2_kube).await?;
    took("the last provider of a version", started);
    // By interface, the Service stays with the other version's providers.
    wait_endpoints(
        &s.client,
        &all,
        &orders_kube,
        &[("192.0.2.91", true), ("192.0.2.96", false)],
    )
    .await?;
    let orders_svc = all_services.get(&orders_kube).await?;
    assert_eq!(
        annotation(&orders_svc, &zk("version")).as_deref(),
        Some("1.0.0")
    );
    assert_eq!(annotation(&orders_svc, &zk("group")), None);

    assert_eq!(
        reads(&passing).await?,
        reads_before,
        "a Dubbo change costs no ZooKeeper read"
    );
    let events = passing
        .metric_sum("registry_connector_zookeeper_events_total")
        .await?
        - events_before;
    assert!(events >= 7.0, "{events} events");
    assert_eq!(
        passing
            .metric_sum("registry_connector_zookeeper_tree_reads_total")
            .await?,
        1.0,
        "one complete read, at start"
    );
    Ok(())
}

#[tokio::test]
async fn curator_instances_become_services_and_bad_ones_are_reported() -> Result<()> {
    let s = ZkScenario::new("zk-curator").await?;
    let orders = unique_name("orders");
    let shop = unique_name("shop");
    let i1 = s
        .register_instance(
            &orders,
            "5e1c0a4d-1",
            &spring_instance(
                &orders,
                "5e1c0a4d-1",
                "192.0.2.101",
                8080,
                Some(8443),
                &[("instance_status", "UP")],
            ),
        )
        .await?;
    let i2 = s
        .register_instance(
            &orders,
            "5e1c0a4d-2",
            &spring_instance(
                &orders,
                "5e1c0a4d-2",
                "2001:db8::101",
                8080,
                Some(8443),
                &[],
            ),
        )
        .await?;
    // Spring Cloud Zookeeper registers the host name unless told to prefer the IP.
    s.register_instance(
        &orders,
        "5e1c0a4d-3",
        &spring_instance(&orders, "5e1c0a4d-3", "orders-3.example", 8080, None, &[]),
    )
    .await?;
    // Dubbo 3's application-level discovery: the protocols in `dubbo.endpoints`.
    let endpoints = r#"[{"port":20880,"protocol":"dubbo"},{"port":50051,"protocol":"tri"}]"#;
    s.register_instance(
        &shop,
        "198.51.100.101:20880",
        &spring_instance(
            &shop,
            "198.51.100.101:20880",
            "198.51.100.101",
            20880,
            None,
            &[("dubbo.endpoints", endpoints)],
        ),
    )
    .await?;
    let broken = unique_name("broken");
    s.register_instance(&broken, "1", b"{\"address\": ").await?;

    let c = s.connector_in(s.ns(), "curator", &[])?;
    c.wait_ready().await?;
    let both = [("192.0.2.101", true), ("2001:db8::101", true)];
    wait_endpoints(&s.client, s.ns(), &orders, &both).await?;
    wait_endpoints(&s.client, s.ns(), &shop, &[("198.51.100.101", true)]).await?;
    let services: Api<Service> = Api::namespaced(s.client.clone(), s.ns());
    let orders_svc = services.get(&orders).await?;
    assert_eq!(
        port_specs(&orders_svc),
        [
            ("http8080".to_string(), 8080, Some("http".to_string())),
            ("https8443".to_string(), 8443, Some("https".to_string()))
        ]
    );
    assert_eq!(
        annotation(&orders_svc, &zk("service")),
        Some(orders.clone())
    );
    assert_eq!(
        port_specs(&services.get(&shop).await?),
        [
            ("dubbo20880".to_string(), 20880, Some("dubbo".to_string())),
            ("tri50051".to_string(), 50051, Some("tri".to_string()))
        ]
    );
    let mut want = vec![orders.clone(), shop.clone()];
    want.sort();
    assert_eq!(service_names(&s.client, s.ns()).await?, want);
    wait_rejected(&c, "not_an_ip").await?;
    wait_rejected(&c, "invalid_instance").await?;

    // A change costs one getData (of the node that changed), a deletion none.
    let reads_before = reads(&c).await?;
    let started = Instant::now();
    s.set_data(
        &i2,
        &spring_instance(
            &orders,
            "5e1c0a4d-2",
            "2001:db8::101",
            8080,
            Some(8443),
            &[("instance_status", "OUT_OF_SERVICE")],
        ),
    )
    .await?;
    wait_endpoints(&s.client, s.ns(), &orders, &[("192.0.2.101", true)]).await?;
    took("an instance out of service", started);
    let started = Instant::now();
    s.delete(&i1).await?;
    wait_endpoints(&s.client, s.ns(), &orders, &[]).await?;
    took("an instance deregistered", started);
    assert_eq!(
        reads(&c).await? - reads_before,
        1.0,
        "one read for the change"
    );
    Ok(())
}

#[tokio::test]
async fn a_restarted_connector_with_nothing_changed_writes_nothing() -> Result<()> {
    let s = ZkScenario::new("zk-restart").await?;
    let t = tag();
    let names: Vec<String> = (0..4).map(|i| format!("com.example.S{i}x{t}")).collect();
    for (i, name) in names.iter().enumerate() {
        let host = format!("192.0.2.{}", 110 + i);
        s.register(&Provider::new(name, &host, 20880)).await?;
        let host = format!("2001:db8::{}", 110 + i);
        s.register(&Provider::new(name, &format!("[{host}]"), 20880))
            .await?;
    }
    let first = s.connector_in(s.ns(), "dubbo", &[])?;
    first.wait_ready().await?;
    for i in 0..4 {
        let kube = format!("com-example-s{i}x{t}");
        let v4 = format!("192.0.2.{}", 110 + i);
        let v6 = format!("2001:db8::{}", 110 + i);
        wait_endpoints(&s.client, s.ns(), &kube, &[(&v4, true), (&v6, true)]).await?;
    }
    assert!(first.writes().await? >= 12.0, "services, slices, endpoints");
    first.kill().await?;

    let second = s.connector_in(s.ns(), "dubbo", &[])?;
    second.wait_ready().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reconciles = second
        .metric_sum("registry_connector_reconciles_total")
        .await?;
    assert!(
        reconciles >= 4.0,
        "the restart compared every service: {reconciles}"
    );
    assert_eq!(second.writes().await?, 0.0, "log: {}", second.log_tail());
    let status = second.terminate().await?;
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert_eq!(
        service_names(&s.client, s.ns()).await?.len(),
        4,
        "shutdown deletes nothing"
    );
    Ok(())
}

#[tokio::test]
async fn digest_authentication_reads_a_protected_tree() -> Result<()> {
    use zookeeper_client::{Acls, CreateMode};
    let s = ZkScenario::new("zk-digest").await?;
    let (user, password) = ("rc-reader", unique_name("pw"));
    // A tree only this user may read: created by a session authenticated as it, with
    // the creator's ACL (`auth::`, which the server turns into digest:user:hash).
    let owner = ZkScenario::session(&s.addr).await?;
    owner
        .auth("digest", format!("{user}:{password}").as_bytes())
        .await?;
    let t = tag();
    let iface = format!("com.example.Secret{t}");
    let p = Provider::new(&iface, "192.0.2.121", 20880);
    let path = s.provider_path(&p);
    let parent = path.rsplit_once('/').expect("a parent").0;
    owner
        .mkdir(
            parent,
            &CreateMode::Persistent.with_acls(Acls::creator_all()),
        )
        .await?;
    owner
        .create(
            &path,
            b"",
            &CreateMode::Ephemeral.with_acls(Acls::creator_all()),
        )
        .await?;
    let file = s.env.dir().join(format!("zk-password-{t}"));
    std::fs::write(&file, format!("{password}\n"))?;
    let kube = format!("com-example-secret{t}");

    let anonymous = s.connector_in(s.ns(), "dubbo", &[])?;
    let other_ns = s.env.namespace("zk-digest-ok").await?;
    let authed = s.connector_in(
        other_ns.name(),
        "dubbo",
        &[
            "--zookeeper-digest-user",
            user,
            "--zookeeper-digest-password-file",
            &file.to_string_lossy(),
        ],
    )?;
    wait_endpoints(&s.client, other_ns.name(), &kube, &[("192.0.2.121", true)]).await?;
    anonymous.wait_registry_errors(1.0).await?;
    assert!(service_names(&s.client, s.ns()).await?.is_empty());
    let log = std::fs::read_to_string(&authed.log)?;
    assert!(!log.contains(&password), "the password is never logged");
    drop(owner);
    Ok(())
}
