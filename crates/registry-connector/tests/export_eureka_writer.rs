//! The Kubernetes → Eureka writer against the test environment's real Spring Cloud
//! Netflix Eureka server, driven directly (no Kubernetes): registrations read back equal
//! (so an unchanged instance costs no write), health as status overrides in both
//! directions and across re-registrations, an instance of somebody else in the same
//! application reported and never touched, and lease renewals that register again an
//! instance the server forgot. Every test uses its own application names and connector
//! id, so they can share the server and run in parallel. Addresses are documentation
//! ranges: nothing ever contacts them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use registry_connector::export::desired::instance_id;
use registry_connector::export::plan::plan;
use registry_connector::export::{Health, Instance, RegistryWriter, ServiceKey, Write};
use registry_connector::registry::eureka::metrics::{Endpoint, HeartbeatResult};
use registry_connector::registry::eureka::{EurekaConfig, EurekaWriter, EurekaWriterConfig};
use serde_json::Value;
use testenv::eureka::{instance_json, EurekaClient};
use testenv::{unique_name, wait_for, TestEnv};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

fn writer(url: &str, connector_id: &str, renewal: Duration, lease: Duration) -> EurekaWriter {
    EurekaWriter::new(
        &EurekaConfig::new(url),
        EurekaWriterConfig {
            connector_id: connector_id.to_string(),
            renewal_interval: renewal,
            lease_duration: lease,
        },
    )
    .expect("a valid writer configuration")
}

/// A desired instance of the Service `shop/<service>`, normalized as the engine does.
fn desired(
    writer: &EurekaWriter,
    service: &str,
    address: &str,
    port: u16,
    health: Health,
) -> Instance {
    let source = ServiceKey::new("shop", service);
    let mut instance = Instance {
        id: instance_id("export-eureka-writer-test", service, &source, address, port),
        service: service.to_string(),
        source,
        address: address.to_string(),
        port,
        ports: [("http".to_string(), port), ("admin".to_string(), 9090)]
            .into_iter()
            .collect(),
        health,
        tags: vec!["blue".into(), "canary".into()],
        meta: [("team".to_string(), "shop".to_string())]
            .into_iter()
            .collect(),
    };
    writer.normalize(&mut instance);
    instance
}

fn as_list(value: &Value) -> Vec<Value> {
    match value {
        Value::Array(items) => items.clone(),
        Value::Object(_) => vec![value.clone()],
        _ => Vec::new(),
    }
}

/// The instances of `app` in `GET /apps`, by instance id.
async fn app_instances(eureka: &EurekaClient, app: &str) -> Result<BTreeMap<String, Value>> {
    let apps = eureka.apps().await?;
    let mut out = BTreeMap::new();
    for application in as_list(&apps["applications"]["application"]) {
        if application["name"].as_str() != Some(app) {
            continue;
        }
        for instance in as_list(&application["instance"]) {
            let id = instance["instanceId"]
                .as_str()
                .context("an instance without instanceId")?
                .to_string();
            out.insert(id, instance);
        }
    }
    Ok(out)
}

async fn statuses(eureka: &EurekaClient, app: &str) -> Result<BTreeMap<String, String>> {
    Ok(app_instances(eureka, app)
        .await?
        .into_iter()
        .map(|(id, i)| (id, i["status"].as_str().unwrap_or_default().to_string()))
        .collect())
}

async fn apply_all(writer: &EurekaWriter, writes: Vec<Write>) -> Result<()> {
    for write in writes {
        writer
            .apply(std::slice::from_ref(&write))
            .await
            .with_context(|| format!("{write}"))?;
    }
    Ok(())
}

fn sorted(mut instances: Vec<Instance>) -> Vec<Instance> {
    instances.sort_by(|a, b| a.id.cmp(&b.id));
    instances
}

async fn expect_statuses(
    eureka: &EurekaClient,
    app: &str,
    want: &[(&Instance, &str)],
) -> Result<()> {
    let got = statuses(eureka, app).await?;
    for (instance, status) in want {
        if got.get(&instance.id).map(String::as_str) != Some(*status) {
            bail!(
                "{app}/{} should be {status}; /apps shows {got:?}",
                instance.id
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn registers_reads_back_flips_health_and_leaves_others_alone() -> Result<()> {
    let env = TestEnv::shared();
    let url = env.eureka_url()?;
    let eureka = EurekaClient::new(url)?;
    let connector = unique_name("rc");
    let w = writer(
        url,
        &connector,
        Duration::from_secs(30),
        Duration::from_secs(90),
    );
    let service = unique_name("exp");
    let app = service.to_uppercase();

    let a = desired(&w, &service, "192.0.2.10", 8080, Health::Passing);
    let b = desired(&w, &service, "2001:db8::20", 8080, Health::Passing);
    let c = desired(&w, &service, "198.51.100.30", 8080, Health::Critical);
    let want = vec![a.clone(), b.clone(), c.clone()];
    apply_all(&w, want.iter().cloned().map(Write::Register).collect()).await?;

    // Read back exactly, so that a pass over unchanged instances writes nothing.
    let read = w.read().await?;
    assert_eq!(sorted(read.instances.clone()), sorted(want.clone()));
    assert!(plan(&want, &read.instances).is_empty(), "nothing to write");
    assert!(read.shared_names.is_empty());
    expect_statuses(
        &eureka,
        &app,
        &[(&a, "UP"), (&b, "UP"), (&c, "OUT_OF_SERVICE")],
    )
    .await?;
    let served = app_instances(&eureka, &app).await?;
    assert_eq!(served[&a.id]["vipAddress"], service.as_str());
    assert_eq!(served[&a.id]["metadata"]["external-source"], "kubernetes");
    assert_eq!(
        served[&a.id]["metadata"]["registry-connector-id"],
        connector.as_str()
    );

    // Health both ways, through the status override.
    let a_down = Instance {
        health: Health::Critical,
        ..a.clone()
    };
    let c_up = Instance {
        health: Health::Passing,
        ..c.clone()
    };
    let writes = plan(&[a_down.clone(), b.clone(), c_up.clone()], &read.instances);
    assert_eq!(
        writes,
        vec![
            Write::SetHealth(a_down.clone()),
            Write::SetHealth(c_up.clone())
        ]
    );
    apply_all(&w, writes).await?;
    expect_statuses(&eureka, &app, &[(&a, "OUT_OF_SERVICE"), (&c, "UP")]).await?;
    let read = w.read().await?;
    assert!(plan(&[a_down.clone(), b.clone(), c_up.clone()], &read.instances).is_empty());
    apply_all(&w, vec![Write::SetHealth(a.clone())]).await?;
    expect_statuses(&eureka, &app, &[(&a, "UP")]).await?;
    apply_all(&w, vec![Write::SetHealth(a_down.clone())]).await?;
    expect_statuses(&eureka, &app, &[(&a, "OUT_OF_SERVICE")]).await?;

    // Re-registrations (a changed tag) keep each instance's status: the server keeps
    // what it holds, the writer sets what it wants.
    let retag = |i: &Instance| Instance {
        tags: vec!["green".into()],
        ..i.clone()
    };
    apply_all(
        &w,
        vec![
            Write::Register(retag(&a_down)),
            Write::Register(retag(&c_up)),
        ],
    )
    .await?;
    expect_statuses(&eureka, &app, &[(&a, "OUT_OF_SERVICE"), (&c, "UP")]).await?;
    // Flipped by a registration, in both directions.
    apply_all(
        &w,
        vec![Write::Register(retag(&a)), Write::Register(retag(&c))],
    )
    .await?;
    expect_statuses(&eureka, &app, &[(&a, "UP"), (&c, "OUT_OF_SERVICE")]).await?;

    // A restarted connector (nothing remembered) finds everything in place, and a
    // critical registration over an instance the server holds `UP` still ends
    // `OUT_OF_SERVICE`.
    let restarted = writer(
        url,
        &connector,
        Duration::from_secs(30),
        Duration::from_secs(90),
    );
    let current = vec![retag(&a), b.clone(), retag(&c)];
    assert!(plan(&current, &restarted.read().await?.instances).is_empty());
    let fresh = writer(
        url,
        &connector,
        Duration::from_secs(30),
        Duration::from_secs(90),
    );
    apply_all(
        &fresh,
        vec![Write::Register(Instance {
            health: Health::Critical,
            ..b.clone()
        })],
    )
    .await?;
    expect_statuses(&eureka, &app, &[(&b, "OUT_OF_SERVICE"), (&a, "UP")]).await?;
    let current = vec![
        retag(&a),
        Instance {
            health: Health::Critical,
            ..b.clone()
        },
        retag(&c),
    ];
    assert!(plan(&current, &w.read().await?.instances).is_empty());

    // Somebody else's instance in the same application: reported, never touched.
    let vm = instance_json(
        &app,
        "vm-1",
        "203.0.113.5",
        Some(8080),
        None,
        "UP",
        &[("team", "vm")],
    );
    eureka.register(&app, &vm).await?;
    let before = app_instances(&eureka, &app)
        .await?
        .remove("vm-1")
        .context("vm-1 registered")?;
    let read = w.read().await?;
    assert_eq!(read.instances.len(), 3, "only ours");
    assert!(read.shared_names.contains(&app), "{:?}", read.shared_names);
    // Another connector's view: none of ours is its own.
    let other = writer(
        url,
        &unique_name("rc"),
        Duration::from_secs(30),
        Duration::from_secs(90),
    );
    let theirs = other.read().await?;
    assert!(theirs.instances.iter().all(|i| i.service != app));

    let gone: Vec<Write> = read.instances.into_iter().map(Write::Deregister).collect();
    apply_all(&w, gone.clone()).await?;
    let left = app_instances(&eureka, &app).await?;
    assert_eq!(left.keys().collect::<Vec<_>>(), vec!["vm-1"]);
    assert_eq!(
        serde_json::to_string(&left["vm-1"])?,
        serde_json::to_string(&before)?,
        "byte for byte untouched"
    );
    let read = w.read().await?;
    assert!(read.instances.is_empty());
    assert!(read.shared_names.is_empty());
    // Already gone: a deregistration is still a success.
    apply_all(&w, gone).await?;

    // The requests were counted under the write endpoints.
    let m = w.metrics();
    assert!(m.ok_requests(Endpoint::Register) >= 7);
    assert!(m.ok_requests(Endpoint::StatusOverride) >= 4);
    assert!(m.ok_requests(Endpoint::StatusOverrideDelete) >= 2);
    assert!(m.ok_requests(Endpoint::Cancel) >= 6);
    assert_eq!(
        w.writer_metrics().heartbeats(HeartbeatResult::Ok),
        0,
        "no maintain, no heartbeat"
    );

    eureka.cancel(&app, "vm-1").await?;
    Ok(())
}

#[tokio::test]
async fn renewals_are_spread_counted_and_register_forgotten_instances_again() -> Result<()> {
    let env = TestEnv::shared();
    let url = env.eureka_url()?;
    let eureka = EurekaClient::new(url)?;
    let renewal = Duration::from_secs(2);
    let w = Arc::new(writer(
        url,
        &unique_name("rc"),
        renewal,
        Duration::from_secs(30),
    ));
    let service = unique_name("beat");
    let app = service.to_uppercase();
    let instances: Vec<Instance> = (0..10u8)
        .map(|i| {
            let health = if i == 0 {
                Health::Critical
            } else {
                Health::Passing
            };
            desired(&w, &service, &format!("192.0.2.{}", 100 + i), 8080, health)
        })
        .collect();
    apply_all(&w, instances.iter().cloned().map(Write::Register).collect()).await?;
    let lease = app_instances(&eureka, &app).await?[&instances[1].id]["leaseInfo"].clone();
    assert_eq!(lease["renewalIntervalInSecs"], 2);
    assert_eq!(lease["durationInSecs"], 30);

    let beats = w.writer_metrics();
    let stop = CancellationToken::new();
    let started = Instant::now();
    let maintain = tokio::spawn({
        let (w, stop) = (w.clone(), stop.clone());
        async move { w.maintain(stop).await }
    });

    // Spread over the interval, not a burst: a quarter into the first round, about a
    // quarter of the instances have been renewed.
    tokio::time::sleep(renewal / 4).await;
    let early = beats.heartbeats(HeartbeatResult::Ok);
    if started.elapsed() < renewal / 2 {
        assert!(
            early <= 6,
            "{early} of 10 renewed within {:?}",
            started.elapsed()
        );
    }
    wait_for("two rounds of renewals", WAIT, || async {
        (beats.heartbeats(HeartbeatResult::Ok) >= 20).then_some(())
    })
    .await?;
    assert!(w.metrics().ok_requests(Endpoint::Heartbeat) >= 20);

    // The server forgets two instances (as after an eviction): the next renewals find
    // them gone, register them again with their status, and tell the engine.
    let changed = tokio::spawn({
        let w = w.clone();
        async move { tokio::time::timeout(WAIT, w.changed()).await.is_ok() }
    });
    let (critical, passing) = (&instances[0], &instances[5]);
    eureka.cancel(&app, &critical.id).await?;
    eureka.cancel(&app, &passing.id).await?;
    wait_for("both registered again", WAIT, || async {
        let s = statuses(&eureka, &app).await.ok()?;
        (beats.reregistrations() >= 2
            && s.get(&critical.id).map(String::as_str) == Some("OUT_OF_SERVICE")
            && s.get(&passing.id).map(String::as_str) == Some("UP"))
        .then_some(())
    })
    .await?;
    assert!(beats.heartbeats(HeartbeatResult::NotFound) >= 2);
    assert!(
        changed.await?,
        "changed() resolved after the re-registrations"
    );
    assert_eq!(statuses(&eureka, &app).await?.len(), 10);

    // The renewals are the writer's own metrics, apart from the engine's writes.
    let mut registry = prometheus_client::registry::Registry::with_prefix("registry_connector");
    w.register_metrics(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    for name in [
        "registry_connector_eureka_heartbeats_total{result=\"ok\"}",
        "registry_connector_eureka_heartbeats_total{result=\"not_found\"}",
        "registry_connector_eureka_reregistrations_total",
        "registry_connector_registry_requests_total{source=\"eureka\",endpoint=\"heartbeat\",result=\"ok\"}",
    ] {
        assert!(text.contains(name), "{name} missing in\n{text}");
    }

    stop.cancel();
    tokio::time::timeout(WAIT, maintain).await??;
    assert_eq!(w.owned_count(), 0, "a stopped term forgets what it owned");
    let read = w.read().await?;
    assert_eq!(read.instances.len(), 10);
    apply_all(
        &w,
        read.instances.into_iter().map(Write::Deregister).collect(),
    )
    .await?;
    assert!(statuses(&eureka, &app).await?.is_empty());
    Ok(())
}
