//! Kubernetes → Consul through a Consul outage: the agent stops while Pods change, and
//! when it is back the registry converges to what Kubernetes says, with nothing lost.
//!
//! Its own test binary: stopping the shared Consul agent would fail the other Consul
//! tests if they ran beside it (cargo runs test binaries one after another).

mod common;

use std::time::Duration;

use anyhow::Result;
use common::export::{Scenario, WAIT};
use testenv::{unique_name, wait_for};

#[tokio::test(flavor = "multi_thread")]
async fn a_consul_outage_loses_nothing_and_converges_after() -> Result<()> {
    let s = Scenario::new("k2c-outage").await?;
    let web = unique_name("web");
    s.service("web", &web).await?;
    s.pod("web", "web-0", "192.0.2.61", true).await?;
    s.pod("web", "web-1", "192.0.2.62", true).await?;
    let connector = s.connector(&[])?;
    connector.wait_ready().await?;
    s.wait_instances(
        &web,
        &[("192.0.2.61", "passing"), ("192.0.2.62", "passing")],
    )
    .await?;
    let before = s.modify_indexes_by_address().await?;
    assert_eq!(before.len(), 2, "{before:?}");

    s.env.stop_component("consul")?;
    let errors = || async {
        connector
            .metric_where(
                "registry_connector_registry_requests_total",
                &[("result", "error")],
            )
            .await
            .unwrap_or(0.0)
    };
    let errors_at_stop = errors().await;
    // Kubernetes moves on while Consul is away: one Pod more, one Pod not ready.
    s.pod("web", "web-2", "192.0.2.63", true).await?;
    s.set_ready("web-0", "192.0.2.61", false).await?;
    wait_for("the connector to meet the outage", WAIT, || async {
        (errors().await > errors_at_stop).then_some(())
    })
    .await?;
    let names = s.instances(&web).await;
    assert!(names.is_err(), "Consul is down: {names:?}");

    s.env.start_component("consul")?;
    s.wait_instances(
        &web,
        &[
            ("192.0.2.61", "critical"),
            ("192.0.2.62", "passing"),
            ("192.0.2.63", "passing"),
        ],
    )
    .await?;
    // The instance that did not change was never deregistered and registered again.
    let after = s.modify_indexes_by_address().await?;
    assert_eq!(
        after.get("192.0.2.62"),
        before.get("192.0.2.62"),
        "web-1's registration is untouched: before {before:?}, after {after:?}"
    );
    // And it stays converged: nothing more is written once it is.
    let writes = connector
        .metric_sum("registry_connector_export_writes_total")
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        connector
            .metric_sum("registry_connector_export_writes_total")
            .await?,
        writes,
        "{}",
        connector.log_tail()
    );
    connector.terminate().await?;
    Ok(())
}
