//! End to end against the test environment's real Nacos 2.3.2 server, the real control
//! plane and the real binary. Each scenario registers in groups of its own and filters
//! on its own metadata marker, so the tests share the server and run in parallel.

mod common;

use std::time::{Duration, Instant};

use anyhow::Result;
use common::nacos::{Instance, NacosScenario};
use common::objects::{port_specs, service_names, wait_endpoints, wait_service_gone};
use common::process::Connector;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use testenv::unique_name;

const REQUESTS: &str = "registry_connector_registry_requests_total";
const PUSHES: &str = "registry_connector_nacos_pushes_received_total";
/// How long one change may take to reach Kubernetes (a push, a 100 ms quiet period):
/// generous for a loaded machine.
const CHANGE_BOUND: Duration = Duration::from_secs(15);
/// The default `--nacos-empty-confirm-delay`: an emptied service stays this long.
const EMPTY_CONFIRM_DELAY: Duration = Duration::from_secs(10);

fn annotation(svc: &Service, key: &str) -> Option<String> {
    svc.metadata.annotations.as_ref()?.get(key).cloned()
}

async fn requests(c: &Connector, endpoint: &str) -> Result<f64> {
    c.metric_where(REQUESTS, &[("endpoint", endpoint), ("result", "ok")])
        .await
}

/// (namespace, service, the endpoints it must show).
type Check<'a> = (&'a str, &'a str, &'a [(&'a str, bool)]);

/// Waits for both connectors' views and checks the change took at most [`CHANGE_BOUND`].
async fn expect_change(
    s: &NacosScenario,
    what: &str,
    started: Instant,
    checks: &[Check<'_>],
) -> Result<()> {
    for (ns, svc, want) in checks {
        wait_endpoints(&s.client, ns, svc, want).await?;
    }
    let took = started.elapsed();
    println!("{what}: in Kubernetes after {took:?}");
    assert!(took < CHANGE_BOUND, "{what} took {took:?}");
    Ok(())
}

#[tokio::test]
async fn publishes_services_and_follows_every_change_through_pushes() -> Result<()> {
    let s = NacosScenario::new("nacos-sync").await?;
    let all_ns = s.env.namespace("nacos-sync-all").await?;
    let (ns, all) = (s.ns().to_string(), all_ns.name().to_string());
    let g1 = s.group.clone();
    let g2 = unique_name("G");
    let orders = unique_name("orders");
    let pay = unique_name("pay");
    let dubbo_iface = unique_name("Svc");
    let dubbo = format!("providers:com.example.{dubbo_iface}:1.0.0:");
    let dubbo_kube = format!("providers-com-example-{dubbo_iface}-1-0-0").to_lowercase();
    let consumer = format!("consumers:com.example.{dubbo_iface}:1.0.0:");

    let v4 = Instance {
        metadata: vec![("version", "1")],
        ..Instance::new(&orders, &g1, "192.0.2.61", 8080)
    };
    let v6 = Instance {
        metadata: vec![("version", "1")],
        ..Instance::new(&orders, &g1, "2001:db8::61", 8080)
    };
    let pay_1 = Instance {
        cluster: "SH",
        ..Instance::new(&pay, &g2, "198.51.100.61", 9000)
    };
    let provider = Instance {
        metadata: vec![("protocol", "dubbo")],
        ..Instance::new(&dubbo, &g1, "203.0.113.61", 20880)
    };
    for i in [
        &v4,
        &v6,
        &pay_1,
        &provider,
        &Instance::new(&consumer, &g1, "203.0.113.62", 1),
    ] {
        s.register(i).await?;
    }
    let groups = format!("{g1},{g2}");
    let passing = s.connector_in(&ns, &groups, &["--metadata-labels", "version"])?;
    let everything = s.connector_in(&all, &groups, &["--passing-only=false"])?;
    passing.wait_ready().await?;
    everything.wait_ready().await?;

    let both = [("192.0.2.61", true), ("2001:db8::61", true)];
    for namespace in [&ns, &all] {
        wait_endpoints(&s.client, namespace, &orders, &both).await?;
        wait_endpoints(&s.client, namespace, &pay, &[("198.51.100.61", true)]).await?;
        wait_endpoints(&s.client, namespace, &dubbo_kube, &[("203.0.113.61", true)]).await?;
    }
    let services: Api<Service> = Api::namespaced(s.client.clone(), &ns);
    let orders_svc = services.get(&orders).await?;
    assert_eq!(
        orders_svc
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("version"))
            .map(String::as_str),
        Some("1"),
        "allow-listed metadata becomes a label"
    );
    assert_eq!(
        annotation(&orders_svc, "nacos.connector.flomesh.io/group").as_deref(),
        Some(g1.as_str())
    );
    let pay_svc = services.get(&pay).await?;
    assert_eq!(
        annotation(&pay_svc, "nacos.connector.flomesh.io/group").as_deref(),
        Some(g2.as_str())
    );
    assert_eq!(
        annotation(&pay_svc, "nacos.connector.flomesh.io/clusters").as_deref(),
        Some("SH")
    );
    let dubbo_svc = services.get(&dubbo_kube).await?;
    assert_eq!(
        annotation(&dubbo_svc, "flomesh.io/cloud-service-inherited-from").as_deref(),
        Some(dubbo.as_str()),
        "the Dubbo name is kept"
    );
    assert_eq!(port_specs(&dubbo_svc).first().map(|p| p.1), Some(20880));
    let mut want = vec![orders.clone(), pay.clone(), dubbo_kube.clone()];
    want.sort();
    assert_eq!(
        service_names(&s.client, &ns).await?,
        want,
        "no consumer service"
    );

    // From here on every change must come as a push: no subscription, no read.
    let subscribes = requests(&passing, "subscribe").await?;
    let queries = requests(&passing, "service_query").await?;
    let pushes = passing.metric_sum(PUSHES).await?;

    let started = Instant::now();
    s.update(&Instance {
        weight: 0.0,
        ..v6.clone()
    })
    .await?;
    expect_change(
        &s,
        "weight 0",
        started,
        &[
            (&ns, &orders, &[("192.0.2.61", true)]),
            (
                &all,
                &orders,
                &[("192.0.2.61", true), ("2001:db8::61", false)],
            ),
        ],
    )
    .await?;

    let started = Instant::now();
    s.update(&v6).await?;
    expect_change(
        &s,
        "weight 1",
        started,
        &[(&ns, &orders, &both), (&all, &orders, &both)],
    )
    .await?;

    let added = Instance::new(&orders, &g1, "192.0.2.64", 8080);
    let three = [
        ("192.0.2.61", true),
        ("192.0.2.64", true),
        ("2001:db8::61", true),
    ];
    let started = Instant::now();
    s.register(&added).await?;
    expect_change(
        &s,
        "registered",
        started,
        &[(&ns, &orders, &three), (&all, &orders, &three)],
    )
    .await?;

    let started = Instant::now();
    s.deregister(&added).await?;
    expect_change(
        &s,
        "deregistered",
        started,
        &[(&ns, &orders, &both), (&all, &orders, &both)],
    )
    .await?;

    let started = Instant::now();
    s.update(&Instance {
        enabled: false,
        ..v4.clone()
    })
    .await?;
    let v6_only = [("2001:db8::61", true)];
    expect_change(
        &s,
        "disabled",
        started,
        &[(&ns, &orders, &v6_only), (&all, &orders, &v6_only)],
    )
    .await?;

    // An instance whose heartbeats stop turns unhealthy in Nacos (5 s checks): left out
    // with --passing-only, published not ready without it; the healthy one stays ready.
    s.register(&Instance {
        short_lease: true,
        ..Instance::new(&orders, &g1, "192.0.2.63", 8080)
    })
    .await?;
    wait_endpoints(
        &s.client,
        &all,
        &orders,
        &[("192.0.2.63", false), ("2001:db8::61", true)],
    )
    .await?;
    wait_endpoints(&s.client, &ns, &orders, &v6_only).await?;

    // The last instance of a service goes: after the two confirming reads (the
    // confirmation delay), the Service goes.
    let started = Instant::now();
    s.deregister(&pay_1).await?;
    for namespace in [&ns, &all] {
        wait_service_gone(&s.client, namespace, &pay).await?;
    }
    let took = started.elapsed();
    println!("scale to zero: Service deleted after {took:?}");
    assert!(took >= EMPTY_CONFIRM_DELAY, "held only {took:?}");
    assert!(took < EMPTY_CONFIRM_DELAY + CHANGE_BOUND, "took {took:?}");

    assert_eq!(
        requests(&passing, "subscribe").await?,
        subscribes,
        "no subscription per change"
    );
    assert_eq!(
        requests(&passing, "service_query").await?,
        queries + 2.0,
        "two reads, confirming the emptied service"
    );
    let pushed = passing.metric_sum(PUSHES).await? - pushes;
    assert!(pushed >= 7.0, "{pushed} pushes");
    assert_eq!(
        passing
            .metric_sum("registry_connector_nacos_reconnects_total")
            .await?,
        0.0
    );
    Ok(())
}

#[tokio::test]
async fn one_name_in_two_groups_is_one_service_unless_the_group_is_a_suffix() -> Result<()> {
    let s = NacosScenario::new("nacos-groups").await?;
    let suffix_ns = s.env.namespace("nacos-groups-suffix").await?;
    let g1 = s.group.clone();
    let g2 = unique_name("G");
    let name = unique_name("shared");
    s.register(&Instance::new(&name, &g1, "192.0.2.71", 8080))
        .await?;
    s.register(&Instance::new(&name, &g2, "192.0.2.72", 8080))
        .await?;
    // The second group is listed first: it wins the name.
    let groups = format!("{g2},{g1}");
    let one = s.connector_in(s.ns(), &groups, &[])?;
    let suffixed = s.connector_in(suffix_ns.name(), &groups, &["--nacos-group-as-suffix"])?;
    wait_endpoints(&s.client, s.ns(), &name, &[("192.0.2.72", true)]).await?;
    assert_eq!(service_names(&s.client, s.ns()).await?, [name.as_str()]);
    testenv::wait_for("the collision to be counted", common::WAIT, || async {
        let n = one
            .metric_where(
                "registry_connector_registry_rejected_entries_total",
                &[("reason", "group_collision")],
            )
            .await
            .ok()?;
        (n >= 1.0).then_some(())
    })
    .await?;
    let a = format!("{name}-{}", g1.to_lowercase());
    let b = format!("{name}-{}", g2.to_lowercase());
    wait_endpoints(&s.client, suffix_ns.name(), &a, &[("192.0.2.71", true)]).await?;
    wait_endpoints(&s.client, suffix_ns.name(), &b, &[("192.0.2.72", true)]).await?;

    // The winner's instance goes: the other group's service takes the name.
    s.deregister(&Instance::new(&name, &g2, "192.0.2.72", 8080))
        .await?;
    wait_endpoints(&s.client, s.ns(), &name, &[("192.0.2.71", true)]).await?;
    drop(suffixed);
    Ok(())
}
