//! The ZooKeeper server stopped and started again, twice: once briefly (the connector's
//! session survives, the client reconnects within it, and the tree is read again since
//! a persistent watch misses what happened meanwhile), once for longer than the
//! connector's session timeout (its session expires: a new session, a new watch, a
//! complete read). Neither deletes anything, neither writes anything when nothing
//! changed, and the connector follows changes afterwards. The providers' own session
//! (the scenario's, 30 s) outlives both outages, as a Dubbo provider's does: the server
//! keeps sessions and znodes across a restart. A binary of its own: it restarts the
//! shared server, which no other test binary uses meanwhile (test binaries run one at a
//! time).

mod common;

use std::time::Duration;

use anyhow::Result;
use common::objects::wait_endpoints;
use common::process::Connector;
use common::zookeeper::{Provider, ZkScenario};
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use testenv::{unique_name, wait_for};

/// The connector's session timeout: the client gives a session up after 7/5 of it
/// without the server.
const SESSION_TIMEOUT: &str = "8s";

async fn metric(c: &Connector, name: &str) -> f64 {
    c.metric_sum(&format!("registry_connector_zookeeper_{name}"))
        .await
        .unwrap_or(-1.0)
}

async fn wait_metric(c: &Connector, name: &str, at_least: f64, within: Duration) -> Result<()> {
    wait_for(&format!("{name} >= {at_least}"), within, || async {
        (metric(c, name).await >= at_least).then_some(())
    })
    .await
    .map_err(|e| e.context(c.log_tail()))
}

#[tokio::test]
async fn a_restarted_zookeeper_deletes_nothing_and_is_followed_again() -> Result<()> {
    let s = ZkScenario::new("zk-server-restart").await?;
    let t = unique_name("t")[2..].to_string();
    let a = format!("com.example.Alpha{t}");
    let b = format!("com.example.Beta{t}");
    let (a_kube, b_kube) = (
        format!("com-example-alpha{t}"),
        format!("com-example-beta{t}"),
    );
    for p in [
        Provider::new(&a, "192.0.2.131", 20880),
        Provider::new(&a, "192.0.2.132", 20880),
        Provider::new(&b, "198.51.100.131", 20880),
    ] {
        s.register(&p).await?;
    }
    let c = s.connector_in(
        s.ns(),
        "dubbo",
        &["--zookeeper-session-timeout", SESSION_TIMEOUT],
    )?;
    c.wait_ready().await?;
    let two = [("192.0.2.131", true), ("192.0.2.132", true)];
    wait_endpoints(&s.client, s.ns(), &a_kube, &two).await?;
    wait_endpoints(&s.client, s.ns(), &b_kube, &[("198.51.100.131", true)]).await?;
    let services: Api<Service> = Api::namespaced(s.client.clone(), s.ns());
    let uid = |svc: Service| svc.metadata.uid.unwrap_or_default();
    let (uid_a, uid_b) = (
        uid(services.get(&a_kube).await?),
        uid(services.get(&b_kube).await?),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let writes = c.writes().await?;

    // 1. A brief outage: the session survives, the tree is read again, nothing written.
    s.env.stop_component("zookeeper")?;
    s.env.start_component("zookeeper")?;
    wait_metric(&c, "reconnects_total", 1.0, Duration::from_secs(30)).await?;
    wait_metric(&c, "tree_reads_total", 2.0, Duration::from_secs(30)).await?;
    assert_eq!(metric(&c, "sessions_total").await, 1.0, "the same session");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        c.writes().await?,
        writes,
        "a re-read that changes nothing writes nothing"
    );

    // 2. A long outage: the connector's session expires (its client gives up after 7/5
    // of the timeout); nothing is deleted meanwhile.
    s.env.stop_component("zookeeper")?;
    wait_metric(
        &c,
        "session_expirations_total",
        1.0,
        Duration::from_secs(40),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        uid(services.get(&a_kube).await?),
        uid_a,
        "nothing deleted while ZooKeeper is down"
    );
    assert_eq!(uid(services.get(&b_kube).await?), uid_b);
    s.env.start_component("zookeeper")?;
    wait_metric(&c, "sessions_total", 2.0, Duration::from_secs(60)).await?;
    wait_metric(&c, "tree_reads_total", 3.0, Duration::from_secs(30)).await?;
    assert_eq!(metric(&c, "connected").await, 1.0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        c.writes().await?,
        writes,
        "the new session's snapshot equals what is published"
    );

    // 3. Followed again: a provider moves (the scenario's session kept its nodes).
    s.register(&Provider::new(&a, "192.0.2.133", 20880)).await?;
    s.delete(&s.provider_path(&Provider::new(&a, "192.0.2.132", 20880)))
        .await?;
    wait_endpoints(
        &s.client,
        s.ns(),
        &a_kube,
        &[("192.0.2.131", true), ("192.0.2.133", true)],
    )
    .await?;
    wait_endpoints(&s.client, s.ns(), &b_kube, &[("198.51.100.131", true)]).await?;
    assert_eq!(uid(services.get(&a_kube).await?), uid_a, "never deleted");
    assert_eq!(uid(services.get(&b_kube).await?), uid_b, "never deleted");
    Ok(())
}
