//! The cost of one change among 500 Eureka applications: what the connector reads and
//! writes when one instance of one application registers. The reads are one delta per
//! poll interval whatever happens (the whole registry is read only at start), and the
//! writes must be those of the changed application only. Its own test binary: it adds
//! 500 applications to the shared server for a while.

mod common;

use std::time::{Duration, Instant};

use anyhow::Result;
use common::eureka::{EurekaScenario, Instance, POLL_INTERVAL};
use common::objects::{service_names, wait_endpoints};
use testenv::{unique_name, wait_for};

const APPS: usize = 500;
const FULL_FETCHES: &str = "registry_connector_eureka_full_fetches_total";
const REQUESTS: &str = "registry_connector_registry_requests_total";

#[tokio::test]
async fn one_change_among_500_applications_costs_a_constant() -> Result<()> {
    let s = EurekaScenario::new("eureka-cost").await?;
    let prefix = unique_name("c");
    let names: Vec<String> = (0..APPS).map(|i| format!("{prefix}-a{i}")).collect();
    for (i, app) in names.iter().enumerate() {
        let ip = format!("198.51.100.{}", 1 + i % 250);
        s.register(Instance::up(app, &format!("{app}-1"), &ip, 8080))
            .await?;
    }
    let connector = s.connector(&["--kube-write-qps", "1000", "--kube-write-burst", "1000"])?;
    let started = Instant::now();
    wait_for(
        &format!("{APPS} services"),
        Duration::from_secs(120),
        || async {
            let n = service_names(&s.client, s.ns()).await.ok()?.len();
            (n == APPS).then_some(())
        },
    )
    .await?;
    connector.wait_ready().await?;
    let initial = started.elapsed();
    // Let the initial sync's writes come back through the watches.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let writes_before = connector.writes().await?;
    let requests_before = connector
        .metric_where(REQUESTS, &[("source", "eureka")])
        .await?;
    let target = &names[7];
    s.register(Instance::up(
        target,
        &format!("{target}-2"),
        "192.0.2.200",
        8080,
    ))
    .await?;
    let changed = Instant::now();
    wait_endpoints(
        &s.client,
        s.ns(),
        target,
        &[("198.51.100.8", true), ("192.0.2.200", true)],
    )
    .await?;
    let propagation = changed.elapsed();
    // Two more intervals for anything late, then count.
    tokio::time::sleep(2 * POLL_INTERVAL).await;
    let writes = connector.writes().await? - writes_before;
    let requests = connector
        .metric_where(REQUESTS, &[("source", "eureka")])
        .await?
        - requests_before;
    let elapsed = changed.elapsed();
    println!(
        "with {APPS} applications: initial sync {initial:?}; one new instance: visible in the \
         EndpointSlice after {propagation:?}, {writes} Kubernetes writes, {requests} Eureka \
         requests in the {elapsed:?} after the change (poll interval {POLL_INTERVAL:?})"
    );
    assert_eq!(writes, 2.0, "one EndpointSlice and one Endpoints write");
    assert_eq!(
        connector
            .metric_where(FULL_FETCHES, &[("reason", "start")])
            .await?,
        1.0
    );
    assert_eq!(
        connector.metric_sum(FULL_FETCHES).await?,
        1.0,
        "the change travelled as a delta; the registry was read whole only at start"
    );
    // One request per interval, and nothing else: the change costs no extra read.
    let intervals = elapsed.as_secs_f64() / POLL_INTERVAL.as_secs_f64();
    assert!(
        requests <= intervals.ceil() + 1.0,
        "{requests} requests in {intervals:.1} intervals"
    );
    s.cleanup().await;
    Ok(())
}
