//! Failover between Eureka peers, as a client's comma-separated `defaultZone` lists
//! them: two private servers from the environment's jar hold the same registrations
//! (as replicating peers would), the connector reads the first, and when that one dies
//! it moves to the second without deleting anything and keeps following changes there.

mod common;

use anyhow::Result;
use common::objects::{service_names, wait_endpoints};
use common::process::Connector;
use common::WAIT;
use testenv::eureka::{instance_json, EurekaClient, EurekaProcess};
use testenv::{unique_name, wait_for, TestEnv};

#[tokio::test]
async fn a_dead_peer_is_skipped_and_nothing_is_deleted() -> Result<()> {
    let env = TestEnv::shared();
    let logs = env.dir().join("logs");
    let (first, second) = tokio::try_join!(
        EurekaProcess::start(env.eureka_jar()?, &logs, &[]),
        EurekaProcess::start(env.eureka_jar()?, &logs, &[]),
    )?;
    let app = unique_name("failover");
    let one = instance_json(&app, "f-1", "192.0.2.121", Some(8080), None, "UP", &[]);
    // Both peers hold the registration, as a replicating pair would.
    let peers = [
        EurekaClient::new(&first.url())?,
        EurekaClient::new(&second.url())?,
    ];
    for peer in &peers {
        peer.register(&app, &one).await?;
    }

    let client = env.client().await?;
    let ns = env.namespace("eureka-failover").await?;
    let urls = format!("{},{}", first.url(), second.url());
    let connector = Connector::builder(env, ns.name())
        .eureka(Some(&urls))
        .args(["--eureka-poll-interval", "1s"])
        .start()?;
    wait_endpoints(&client, ns.name(), &app, &[("192.0.2.121", true)]).await?;
    connector.wait_ready().await?;
    let writes_before = connector.writes().await?;

    // The first peer dies; a second instance registers on the survivor.
    drop(first);
    let two = instance_json(&app, "f-2", "192.0.2.122", Some(8080), None, "UP", &[]);
    peers[1].register(&app, &two).await?;
    wait_endpoints(
        &client,
        ns.name(),
        &app,
        &[("192.0.2.121", true), ("192.0.2.122", true)],
    )
    .await
    .map_err(|e| e.context(format!("log: {}", connector.log_tail())))?;
    let failed = connector.registry_errors().await?;
    assert!(failed >= 1.0, "the dead peer was tried: {failed} errors");
    let full_reads = |reason: &'static str| {
        let connector = &connector;
        async move {
            connector
                .metric_where(
                    "registry_connector_eureka_full_fetches_total",
                    &[("reason", reason)],
                )
                .await
        }
    };
    // The survivor is read whole once (peers may disagree in ways the hash code does
    // not show), and its hash code describes what it sends.
    assert_eq!(full_reads("failover").await?, 1.0);
    assert_eq!(full_reads("unverifiable").await?, 0.0);
    assert_eq!(service_names(&client, ns.name()).await?, vec![app.clone()]);
    // Only the new endpoint was written: one EndpointSlice and one Endpoints update.
    let writes = || async { connector.writes().await.map(|w| w - writes_before) };
    wait_for("the Endpoints write", WAIT, || async {
        (writes().await.ok()? >= 2.0).then_some(())
    })
    .await?;
    assert_eq!(writes().await?, 2.0, "writes after the failover");

    // Readiness holds through the failover: the survivor's answers are complete.
    assert_eq!(connector.readyz().await, Some(200));
    Ok(())
}
