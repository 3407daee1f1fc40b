//! The Kubernetes → ZooKeeper writer against the test environment's real ZooKeeper 3.9,
//! driven directly (no Kubernetes): nodes in both layouts read back equal (so an
//! unchanged instance costs no write), health flips (a Dubbo provider renamed in one
//! `multi`, a Curator instance's data rewritten), a provider of somebody else in the
//! same interface reported and never touched, and a successor that takes the nodes of a
//! stopped writer over without a gap. Every test writes below a base path of its own.
//! Addresses are documentation ranges: nothing ever contacts them.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result};
use common::zookeeper::{url_encode, Provider, ZkScenario};
use registry_connector::export::desired::instance_id;
use registry_connector::export::plan::plan;
use registry_connector::export::{Health, Instance, RegistryWriter, ServiceKey, Write};
use registry_connector::registry::zookeeper::api::parse_dubbo_url;
use registry_connector::registry::zookeeper::writer::ZookeeperWriter;
use registry_connector::registry::zookeeper::{Layout, ZookeeperConfig};
use testenv::{unique_name, wait_for};
use tokio_util::sync::CancellationToken;
use zookeeper_client::Client;

const WAIT: Duration = Duration::from_secs(30);

fn writer(
    addr: &str,
    base: &str,
    layout: Layout,
    connector: &str,
    timeout: Duration,
) -> ZookeeperWriter {
    let cfg = ZookeeperConfig {
        base_path: base.to_string(),
        layout,
        session_timeout: timeout,
        ..ZookeeperConfig::new(addr)
    };
    ZookeeperWriter::new(&cfg, connector).expect("a valid writer configuration")
}

/// A desired instance of the Service `shop/<service>`, normalized as the engine does.
fn desired(
    w: &ZookeeperWriter,
    service: &str,
    address: &str,
    port: u16,
    health: Health,
) -> Instance {
    let source = ServiceKey::new("shop", "orders");
    let mut instance = Instance {
        id: instance_id(
            "export-zookeeper-writer-test",
            service,
            &source,
            address,
            port,
        ),
        service: service.to_string(),
        source,
        address: address.to_string(),
        port,
        ports: [("dubbo".to_string(), port), ("metrics".to_string(), 9090)]
            .into_iter()
            .collect(),
        health,
        tags: vec!["blue".into()],
        meta: [("version".to_string(), "1.0.0".to_string())]
            .into_iter()
            .collect(),
    };
    w.normalize(&mut instance);
    instance
}

fn sorted(mut instances: Vec<Instance>) -> Vec<Instance> {
    instances.sort_by(|a, b| a.id.cmp(&b.id));
    instances
}

/// The provider URLs (decoded) below `dir`.
async fn providers(zk: &Client, dir: &str) -> Result<Vec<String>> {
    let names = match zk.list_children(dir).await {
        Ok(names) => names,
        Err(zookeeper_client::Error::NoNode) => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("listing {dir}")),
    };
    Ok(names)
}

/// `ephemeralOwner` of every node below `dir`.
async fn owners(zk: &Client, dir: &str) -> Result<BTreeSet<i64>> {
    let mut out = BTreeSet::new();
    for name in providers(zk, dir).await? {
        if let Some(stat) = zk.check_stat(&format!("{dir}/{name}")).await? {
            out.insert(stat.ephemeral_owner);
        }
    }
    Ok(out)
}

#[tokio::test]
async fn dubbo_providers_read_back_flip_health_and_leave_others_alone() -> Result<()> {
    let s = ZkScenario::new("zkw-dubbo").await?;
    let connector = unique_name("rc");
    let base = s.dubbo_base();
    let w = writer(
        &s.addr,
        &base,
        Layout::Dubbo,
        &connector,
        Duration::from_secs(30),
    );
    let iface = format!("com.example.Orders{}", &unique_name("t")[2..]);
    let dir = format!("{base}/{iface}/providers");

    // Somebody else's provider of the same interface, registered first.
    let vm = Provider::new(&iface, "192.0.2.200", 20880);
    let vm_path = s.register(&vm).await?;

    let a = desired(&w, &iface, "192.0.2.10", 20880, Health::Passing);
    let b = desired(&w, &iface, "2001:db8::20", 20880, Health::Passing);
    let c = desired(&w, &iface, "198.51.100.30", 20880, Health::Critical);
    let want = vec![a.clone(), b.clone(), c.clone()];
    let writes: Vec<Write> = want.iter().cloned().map(Write::Register).collect();
    let applied = w.apply(&writes).await?;
    assert!(applied.rejected.is_empty(), "{applied:?}");

    // Read back exactly, so that a pass over unchanged instances writes nothing.
    let read = w.read().await?;
    assert_eq!(sorted(read.instances.clone()), sorted(want.clone()));
    assert!(plan(&want, &read.instances).is_empty(), "nothing to write");
    assert_eq!(
        read.shared_names,
        BTreeSet::from([iface.clone()]),
        "the VM's provider is reported"
    );

    // What a Dubbo consumer lists: four providers, ours as ephemerals of the writer's
    // session, the critical one disabled.
    let names = providers(&s.zk, &dir).await?;
    assert_eq!(names.len(), 4, "{names:?}");
    let session = w.session_id().await.context("the writer has a session")?;
    let mut enabled = Vec::new();
    for name in &names {
        let url = parse_dubbo_url(name)?;
        if url.host == "192.0.2.200" {
            continue;
        }
        let stat =
            s.zk.check_stat(&format!("{dir}/{name}"))
                .await?
                .context("the node")?;
        assert_eq!(
            stat.ephemeral_owner, session,
            "{name}: an ephemeral node of the writer's session"
        );
        assert_eq!(url.param("side"), Some("provider"));
        assert_eq!(url.param("version"), Some("1.0.0"));
        assert_eq!(url.param("registry-connector-id"), Some(connector.as_str()));
        enabled.push((url.host.clone(), url.param("enabled").map(str::to_string)));
    }
    enabled.sort();
    assert_eq!(
        enabled,
        vec![
            ("192.0.2.10".into(), Some("true".into())),
            ("198.51.100.30".into(), Some("false".into())),
            ("2001:db8::20".into(), Some("true".into())),
        ]
    );

    // Health both ways: the provider renamed, atomically.
    let a_down = Instance {
        health: Health::Critical,
        ..a.clone()
    };
    let c_up = Instance {
        health: Health::Passing,
        ..c.clone()
    };
    let now = vec![a_down.clone(), b.clone(), c_up.clone()];
    let writes = plan(&now, &read.instances);
    assert_eq!(
        writes,
        vec![
            Write::SetHealth(a_down.clone()),
            Write::SetHealth(c_up.clone())
        ]
    );
    w.apply(&writes).await?;
    let read = w.read().await?;
    assert!(plan(&now, &read.instances).is_empty());
    assert_eq!(providers(&s.zk, &dir).await?.len(), 4, "renamed, not added");

    // Deregistering all of ours leaves the VM's provider.
    let writes: Vec<Write> = read
        .instances
        .iter()
        .cloned()
        .map(Write::Deregister)
        .collect();
    w.apply(&writes).await?;
    let left = providers(&s.zk, &dir).await?;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(format!("{dir}/{}", left[0]), vm_path);
    let read = w.read().await?;
    assert!(read.instances.is_empty());
    assert!(
        read.shared_names.is_empty(),
        "only the VM's provider is left"
    );
    Ok(())
}

#[tokio::test]
async fn curator_instances_read_back_and_change_in_place() -> Result<()> {
    let s = ZkScenario::new("zkw-curator").await?;
    let connector = unique_name("rc");
    let base = s.curator_base();
    let w = writer(
        &s.addr,
        &base,
        Layout::Curator,
        &connector,
        Duration::from_secs(30),
    );
    let service = unique_name("orders");

    let a = desired(&w, &service, "192.0.2.11", 8080, Health::Passing);
    let b = desired(&w, &service, "2001:db8::21", 8080, Health::Critical);
    w.apply(&[Write::Register(a.clone()), Write::Register(b.clone())])
        .await?;
    let read = w.read().await?;
    assert_eq!(
        sorted(read.instances.clone()),
        sorted(vec![a.clone(), b.clone()])
    );
    assert!(read.shared_names.is_empty());

    // Spring Cloud Zookeeper's payload, health as `instance_status`.
    let (data, stat) = s.zk.get_data(&format!("{base}/{service}/{}", b.id)).await?;
    let body: serde_json::Value = serde_json::from_slice(&data)?;
    assert_eq!(body["address"], "2001:db8::21");
    assert_eq!(
        body["payload"]["@class"],
        "org.springframework.cloud.zookeeper.discovery.ZookeeperInstance"
    );
    assert_eq!(
        body["payload"]["metadata"]["instance_status"],
        "OUT_OF_SERVICE"
    );
    assert_eq!(
        stat.ephemeral_owner,
        w.session_id().await.context("a session")?
    );

    // A health flip rewrites the node's data in place (same node, version + 1).
    let b_up = Instance {
        health: Health::Passing,
        ..b.clone()
    };
    w.apply(&plan(&[a.clone(), b_up.clone()], &read.instances))
        .await?;
    let (data, after) = s.zk.get_data(&format!("{base}/{service}/{}", b.id)).await?;
    let body: serde_json::Value = serde_json::from_slice(&data)?;
    assert_eq!(body["payload"]["metadata"]["instance_status"], "UP");
    assert_eq!((after.czxid, after.version), (stat.czxid, stat.version + 1));
    let read = w.read().await?;
    assert!(plan(&[a.clone(), b_up.clone()], &read.instances).is_empty());
    Ok(())
}

#[tokio::test]
async fn a_successor_takes_the_nodes_over_without_a_gap() -> Result<()> {
    let s = ZkScenario::new("zkw-takeover").await?;
    let connector = unique_name("rc");
    let base = s.dubbo_base();
    // The server's shortest session (2 ticks): the first writer's nodes would be gone
    // 4 s after it stopped, were they not taken over.
    let short = Duration::from_secs(4);
    let first = writer(&s.addr, &base, Layout::Dubbo, &connector, short);
    let iface = format!("com.example.Pay{}", &unique_name("t")[2..]);
    let dir = format!("{base}/{}/providers", url_encode(&iface));
    let want: Vec<Instance> = ["192.0.2.40", "192.0.2.41", "2001:db8::42"]
        .iter()
        .map(|ip| desired(&first, &iface, ip, 50051, Health::Passing))
        .collect();
    first
        .apply(
            &want
                .iter()
                .cloned()
                .map(Write::Register)
                .collect::<Vec<_>>(),
        )
        .await?;
    let first_session = first.session_id().await.context("a session")?;
    let names_before = providers(&s.zk, &dir).await?;
    assert_eq!(names_before.len(), 3);
    // Stopped without closing its session (detached): the nodes stay for now.
    drop(first);

    let second = writer(&s.addr, &base, Layout::Dubbo, &connector, short);
    let read = second.read().await?;
    assert!(
        plan(&want, &read.instances).is_empty(),
        "the successor finds everything in place"
    );
    let stop = CancellationToken::new();
    let maintain = {
        let stop = stop.clone();
        let second = std::sync::Arc::new(second);
        let w = second.clone();
        (tokio::spawn(async move { w.maintain(stop).await }), second)
    };
    let (task, second) = maintain;
    let second_session = second.session_id().await.context("a session")?;
    wait_for(
        "the nodes to belong to the successor's session",
        WAIT,
        || async {
            (owners(&s.zk, &dir).await.ok()? == BTreeSet::from([second_session])).then_some(())
        },
    )
    .await?;
    assert_eq!(second.writer_metrics().takeovers.get(), 3);
    // The same names: a consumer's listing never changed.
    let mut names_after = providers(&s.zk, &dir).await?;
    let mut names_before = names_before;
    names_before.sort();
    names_after.sort();
    assert_eq!(names_after, names_before);
    // Once the first session is gone for good, everything is still there.
    tokio::time::sleep(short * 2).await;
    assert_eq!(providers(&s.zk, &dir).await?.len(), 3);
    assert_ne!(first_session, second_session);
    let read = second.read().await?;
    assert!(plan(&want, &read.instances).is_empty());
    stop.cancel();
    task.await?;
    Ok(())
}
