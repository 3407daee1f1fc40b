//! The Consul source against the real Consul agent of the test environment: services are
//! registered through the agent API (TTL checks only, documentation addresses that are
//! never contacted), a source runs against a fresh catalog, and the tests assert on what
//! the catalog publishes and on the source's request counters.
//!
//! The agent is shared by every test of this binary. Each test uses its own service
//! names and its own filter tag, so a source only ever selects its own test's services;
//! the tests also take one lock, because the service-list index is global to the agent
//! and the request-count test must not see other tests' registrations.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use registry_connector::catalog::{Aggregator, Catalog, CatalogEvent};
use registry_connector::model::{MicroSvcAppProtocol, MicroSvcMeta};
use registry_connector::registry::consul::{ConsulConfig, ConsulMetrics, ConsulSource};
use registry_connector::registry::RegistrySource;
use serde_json::{json, Value};
use testenv::consul::ConsulClient;
use testenv::{unique_name, wait_for, TestEnv};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);

/// Serialises the tests of this binary (see the module doc).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn consul() -> Result<(ConsulClient, String)> {
    let addr = TestEnv::shared().consul_addr()?.to_string();
    Ok((ConsulClient::new(&addr)?, addr))
}

/// One instance to register with the local agent.
struct Instance<'a> {
    id: &'a str,
    name: &'a str,
    tags: &'a [&'a str],
    address: &'a str,
    port: u16,
}

async fn register(client: &ConsulClient, i: &Instance<'_>) -> Result<()> {
    client
        .put(
            "/v1/agent/service/register",
            &json!({
                "ID": i.id,
                "Name": i.name,
                "Tags": i.tags,
                "Address": i.address,
                "Port": i.port,
                "Check": {
                    "CheckID": format!("service:{}", i.id),
                    "TTL": "10m",
                    "Status": "passing",
                },
            }),
        )
        .await
        .with_context(|| format!("registering {}", i.id))
}

async fn deregister(client: &ConsulClient, id: &str) -> Result<()> {
    client
        .put(&format!("/v1/agent/service/deregister/{id}"), &Value::Null)
        .await
}

async fn set_check(client: &ConsulClient, id: &str, verb: &str) -> Result<()> {
    client
        .put(
            &format!("/v1/agent/check/{verb}/service:{id}"),
            &Value::Null,
        )
        .await
}

/// A running source and what the test reads from it.
struct Running {
    catalog: Arc<Catalog>,
    events: UnboundedReceiver<CatalogEvent>,
    metrics: Arc<ConsulMetrics>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), registry_connector::registry::consul::ConsulError>>,
}

impl Running {
    fn start(cfg: ConsulConfig) -> Result<Self> {
        let (catalog, events) = Catalog::new();
        let catalog = Arc::new(catalog);
        let source = ConsulSource::new(cfg)?;
        let metrics = source.metrics();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(source.run(Arc::clone(&catalog), shutdown.clone()));
        Ok(Self {
            catalog,
            events,
            metrics,
            shutdown,
            task,
        })
    }

    async fn stop(self) -> Result<Arc<Catalog>> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .context("the source did not stop on shutdown")???;
        Ok(self.catalog)
    }

    async fn until<T>(&self, what: &str, f: impl Fn(&Catalog) -> Option<T>) -> Result<T> {
        wait_for(what, DEADLINE, || async { f(&self.catalog) }).await
    }

    async fn synced(&self) -> Result<()> {
        self.until("the first snapshot", |c| c.is_synced().then_some(()))
            .await
    }

    /// Waits until no request has completed for a while: every watcher is parked in its
    /// blocking query.
    async fn settle(&self) -> Result<u64> {
        let quiet = Duration::from_millis(1500);
        let deadline = Instant::now() + DEADLINE;
        let mut last = self.metrics.requests_total();
        let mut since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.metrics.requests_total();
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return Ok(now);
            }
            anyhow::ensure!(Instant::now() < deadline, "requests never settled");
        }
    }
}

fn config(addr: &str, filter_tag: &str) -> ConsulConfig {
    ConsulConfig {
        filter_tag: Some(filter_tag.to_string()),
        ..ConsulConfig::new(addr)
    }
}

/// `(address, ready)` of every endpoint, and the union of ports.
fn endpoints(meta: &MicroSvcMeta) -> Vec<(String, bool)> {
    meta.endpoints
        .iter()
        .map(|e| (e.addr.to_string(), e.ready))
        .collect()
}

fn ports(meta: &MicroSvcMeta) -> BTreeMap<u16, String> {
    meta.ports()
        .into_iter()
        .map(|(p, proto)| (p.get(), proto.as_str().to_string()))
        .collect()
}

#[tokio::test]
async fn publishes_selected_services_with_ports_protocols_and_addresses() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (client, addr) = consul()?;
    let tag = unique_name("sel");
    let web = unique_name("web");
    let nodeaddr = unique_name("nodeaddr");
    let looped = unique_name("looped");
    let other = unique_name("other");
    let (w1, w2, n1, l1, o1) = (
        format!("{web}-1"),
        format!("{web}-2"),
        format!("{nodeaddr}-1"),
        format!("{looped}-1"),
        format!("{other}-1"),
    );
    register(
        &client,
        &Instance {
            id: &w1,
            name: &web,
            tags: &[&tag, "gRPC.port=9090"],
            address: "192.0.2.10",
            port: 8080,
        },
    )
    .await?;
    register(
        &client,
        &Instance {
            id: &w2,
            name: &web,
            tags: &[&tag],
            address: "2001:db8::10",
            port: 8080,
        },
    )
    .await?;
    // No service address: the node's (127.0.0.1 on the test agent) is used, and refused.
    register(
        &client,
        &Instance {
            id: &n1,
            name: &nodeaddr,
            tags: &[&tag],
            address: "",
            port: 8080,
        },
    )
    .await?;
    // Written by a Kubernetes-to-Consul sync: never published back.
    register(
        &client,
        &Instance {
            id: &l1,
            name: &looped,
            tags: &[&tag, "k8s"],
            address: "198.51.100.7",
            port: 80,
        },
    )
    .await?;
    // Without the filter tag.
    register(
        &client,
        &Instance {
            id: &o1,
            name: &other,
            tags: &["unrelated"],
            address: "198.51.100.8",
            port: 80,
        },
    )
    .await?;

    let running = Running::start(config(&addr, &tag))?;
    running.synced().await?;
    // The first snapshot already holds everything registered before the start.
    let meta = running.catalog.aggregate(&web).context("web published")?;
    assert_eq!(meta.domain.as_str(), format!("{web}.service.consul"));
    assert_eq!(
        endpoints(&meta),
        [
            ("192.0.2.10".to_string(), true),
            ("2001:db8::10".to_string(), true)
        ]
    );
    assert_eq!(
        ports(&meta),
        BTreeMap::from([(8080, "http".to_string()), (9090, "grpc".to_string())])
    );
    let v4 = &meta.endpoints[0];
    assert_eq!(
        v4.ports
            .values()
            .filter(|p| **p == MicroSvcAppProtocol::Grpc)
            .count(),
        1
    );
    let v6 = &meta.endpoints[1];
    assert_eq!(
        v6.ports.len(),
        1,
        "the gRPC tag is on the IPv4 instance only"
    );

    let skipped = running
        .catalog
        .aggregate(&nodeaddr)
        .context("nodeaddr published")?;
    assert!(
        skipped.endpoints.is_empty(),
        "the loopback node address is refused"
    );
    assert!(running.metrics.rejected_total() >= 1);
    assert!(
        running.catalog.aggregate(&looped).is_none(),
        "k8s-tagged service skipped"
    );
    assert!(
        running.catalog.aggregate(&other).is_none(),
        "filter tag applies"
    );
    assert!(running.catalog.aggregate("consul").is_none());
    assert_eq!(running.catalog.len(), 2);

    // A service registered later is picked up by the watchers.
    let late = unique_name("late");
    let late1 = format!("{late}-1");
    register(
        &client,
        &Instance {
            id: &late1,
            name: &late,
            tags: &[&tag],
            address: "203.0.113.20",
            port: 7000,
        },
    )
    .await?;
    let meta = running
        .until("the late service", |c| c.aggregate(&late))
        .await?;
    assert_eq!(endpoints(&meta), [("203.0.113.20".to_string(), true)]);

    let catalog = running.stop().await?;
    assert_eq!(
        catalog.len(),
        3,
        "shutdown removes nothing from the catalog"
    );
    for id in [&w1, &w2, &n1, &l1, &o1, &late1] {
        deregister(&client, id).await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_critical_check_drops_the_instance_or_marks_it_not_ready() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (client, addr) = consul()?;
    let tag = unique_name("health");
    let svc = unique_name("pay");
    let (a, b) = (format!("{svc}-a"), format!("{svc}-b"));
    register(
        &client,
        &Instance {
            id: &a,
            name: &svc,
            tags: &[&tag],
            address: "198.51.100.1",
            port: 80,
        },
    )
    .await?;
    register(
        &client,
        &Instance {
            id: &b,
            name: &svc,
            tags: &[&tag],
            address: "198.51.100.2",
            port: 80,
        },
    )
    .await?;

    let passing_only = Running::start(config(&addr, &tag))?;
    let all = Running::start(ConsulConfig {
        passing_only: false,
        ..config(&addr, &tag)
    })?;
    for running in [&passing_only, &all] {
        running.synced().await?;
        let meta = running.catalog.aggregate(&svc).context("published")?;
        assert_eq!(meta.endpoints.len(), 2);
    }

    set_check(&client, &b, "fail").await?;
    let meta = passing_only
        .until("the failing instance to leave", |c| {
            c.aggregate(&svc).filter(|m| m.endpoints.len() == 1)
        })
        .await?;
    assert_eq!(endpoints(&meta), [("198.51.100.1".to_string(), true)]);
    let meta = all
        .until("the failing instance to become not ready", |c| {
            c.aggregate(&svc)
                .filter(|m| m.endpoints.iter().any(|e| !e.ready))
        })
        .await?;
    assert_eq!(
        endpoints(&meta),
        [
            ("198.51.100.1".to_string(), true),
            ("198.51.100.2".to_string(), false)
        ]
    );

    // And back.
    set_check(&client, &b, "pass").await?;
    passing_only
        .until("the instance to come back", |c| {
            c.aggregate(&svc).filter(|m| m.endpoints.len() == 2)
        })
        .await?;

    passing_only.stop().await?;
    all.stop().await?;
    deregister(&client, &a).await?;
    deregister(&client, &b).await?;
    Ok(())
}

#[tokio::test]
async fn prefix_and_suffix_tags_derive_a_service() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (client, addr) = consul()?;
    let tag = unique_name("derive");
    let svc = unique_name("cart");
    let (a, b) = (format!("{svc}-a"), format!("{svc}-b"));
    let running = Running::start(ConsulConfig {
        prefix_tag: Some("pfx".into()),
        suffix_tag: Some("sfx".into()),
        service_prefix: "cloud-".into(),
        ..config(&addr, &tag)
    })?;
    running.synced().await?;

    register(
        &client,
        &Instance {
            id: &a,
            name: &svc,
            tags: &[&tag, "pfx=canary", "sfx=v2"],
            address: "192.0.2.30",
            port: 8080,
        },
    )
    .await?;
    register(
        &client,
        &Instance {
            id: &b,
            name: &svc,
            tags: &[&tag],
            address: "192.0.2.31",
            port: 8080,
        },
    )
    .await?;
    let base = format!("cloud-{svc}");
    let derived = format!("cloud-canary-{svc}-v2");
    let meta = running
        .until("the base service with both instances", |c| {
            c.aggregate(&base).filter(|m| m.endpoints.len() == 2)
        })
        .await?;
    assert_eq!(meta.registry_name.as_str(), base);
    let meta = running
        .until("the derived service", |c| c.aggregate(&derived))
        .await?;
    assert_eq!(endpoints(&meta), [("192.0.2.30".to_string(), true)]);
    assert_eq!(meta.domain.as_str(), format!("{svc}.service.consul"));

    // The instance loses its tags: the derived service goes, the base stays.
    register(
        &client,
        &Instance {
            id: &a,
            name: &svc,
            tags: &[&tag],
            address: "192.0.2.30",
            port: 8080,
        },
    )
    .await?;
    running
        .until("the derived service to go", |c| {
            c.aggregate(&derived).is_none().then_some(())
        })
        .await?;
    assert_eq!(
        running.catalog.aggregate(&base).map(|m| m.endpoints.len()),
        Some(2)
    );

    running.stop().await?;
    deregister(&client, &a).await?;
    deregister(&client, &b).await?;
    Ok(())
}

#[tokio::test]
async fn deregistration_removes_instances_then_the_service() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (client, addr) = consul()?;
    let tag = unique_name("dereg");
    let svc = unique_name("inv");
    let (a, b) = (format!("{svc}-a"), format!("{svc}-b"));
    register(
        &client,
        &Instance {
            id: &a,
            name: &svc,
            tags: &[&tag],
            address: "203.0.113.1",
            port: 80,
        },
    )
    .await?;
    register(
        &client,
        &Instance {
            id: &b,
            name: &svc,
            tags: &[&tag],
            address: "203.0.113.2",
            port: 80,
        },
    )
    .await?;
    let mut running = Running::start(config(&addr, &tag))?;
    running.synced().await?;
    assert_eq!(
        running.catalog.aggregate(&svc).map(|m| m.endpoints.len()),
        Some(2)
    );

    deregister(&client, &a).await?;
    let meta = running
        .until("one instance left", |c| {
            c.aggregate(&svc).filter(|m| m.endpoints.len() == 1)
        })
        .await?;
    assert_eq!(endpoints(&meta), [("203.0.113.2".to_string(), true)]);

    deregister(&client, &b).await?;
    running
        .until("the service to be removed", |c| {
            (!c.contains(&svc)).then_some(())
        })
        .await?;
    // The sink heard about it.
    let mut named = false;
    while let Ok(event) = running.events.try_recv() {
        if let CatalogEvent::Changed(names) = event {
            named |= names.contains(&svc);
        }
    }
    assert!(named, "the removal was announced on the change channel");
    running.stop().await?;
    Ok(())
}

#[tokio::test]
async fn one_instance_change_costs_a_constant_number_of_requests() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (client, addr) = consul()?;
    let tag = unique_name("cost");
    const SERVICES: usize = 30;
    let names: Vec<String> = (0..SERVICES).map(|i| format!("{tag}-svc{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let id = format!("{name}-a");
        let address = format!("198.51.100.{}", 10 + i);
        register(
            &client,
            &Instance {
                id: &id,
                name,
                tags: &[&tag],
                address: &address,
                port: 80,
            },
        )
        .await?;
    }
    let running = Running::start(config(&addr, &tag))?;
    running.synced().await?;
    assert_eq!(running.catalog.len(), SERVICES);
    let initial = running.settle().await?;
    // The snapshot: one list, one read per service (retries aside), then nothing.
    assert!(
        initial > SERVICES as u64 && initial <= SERVICES as u64 + 5,
        "initial sync cost {initial} requests"
    );

    // A check change: only that service's blocking query returns.
    let target = &names[SERVICES / 2];
    let target_id = format!("{target}-a");
    set_check(&client, &target_id, "fail").await?;
    running
        .until("the failing instance to leave", |c| {
            c.aggregate(target).filter(|m| m.endpoints.is_empty())
        })
        .await?;
    let after_check = running.settle().await?;
    let cost = after_check - initial;
    eprintln!("requests for one check change among {SERVICES} services: {cost}");
    assert!(
        (1..=3).contains(&cost),
        "one check change cost {cost} requests"
    );

    // A new instance: its service's query and the service-list query return.
    let new_id = format!("{target}-b");
    register(
        &client,
        &Instance {
            id: &new_id,
            name: target,
            tags: &[&tag],
            address: "192.0.2.99",
            port: 80,
        },
    )
    .await?;
    running
        .until("the new instance", |c| {
            c.aggregate(target).filter(|m| m.endpoints.len() == 1)
        })
        .await?;
    let after_register = running.settle().await?;
    let cost = after_register - after_check;
    eprintln!("requests for one registration among {SERVICES} services: {cost}");
    assert!(
        (1..=3).contains(&cost),
        "one registration cost {cost} requests"
    );
    assert_eq!(running.metrics.watched_services.get(), SERVICES as i64);

    running.stop().await?;
    for name in &names {
        deregister(&client, &format!("{name}-a")).await?;
    }
    deregister(&client, &new_id).await?;
    Ok(())
}

#[tokio::test]
async fn waits_for_an_unreachable_consul_without_syncing() -> Result<()> {
    // A port nothing listens on: connections are refused at once.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    drop(listener);
    let running = Running::start(ConsulConfig::new(addr))?;
    let metrics = Arc::clone(&running.metrics);
    wait_for("a failed request", DEADLINE, || async {
        (metrics.requests_total() >= 2).then_some(())
    })
    .await?;
    assert!(
        !running.catalog.is_synced(),
        "nothing is synced while Consul is away"
    );
    assert!(running.catalog.is_empty());
    running.stop().await?;
    Ok(())
}
