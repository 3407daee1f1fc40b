//! Eureka goes away and comes back empty, as a restarted Eureka server does (it keeps
//! its registry in memory): nothing may be deleted while it is down, and the empty
//! answer after the restart must be held by the mass-deletion guard, not applied. Its
//! own test binary, because it restarts the shared server.

mod common;

use anyhow::Result;
use common::eureka::{EurekaScenario, Instance};
use common::objects::{service_names, wait_endpoints, wait_event};
use common::WAIT;
use testenv::{unique_name, wait_for};

const HELD: &str = "registry_connector_held_deletions";

#[tokio::test]
async fn a_restarted_empty_eureka_deletes_nothing() -> Result<()> {
    let s = EurekaScenario::new("eureka-outage").await?;
    let apps: Vec<String> = (0..3).map(|i| unique_name(&format!("app{i}"))).collect();
    let ips = ["192.0.2.61", "192.0.2.62", "192.0.2.63"];
    for (app, ip) in apps.iter().zip(ips) {
        s.register(Instance::up(app, &format!("{app}-1"), ip, 8080))
            .await?;
    }
    let connector = s.connector(&[])?;
    connector.wait_ready().await?;
    let (client, ns) = (&s.client, s.ns());
    for (app, ip) in apps.iter().zip(ips) {
        wait_endpoints(client, ns, app, &[(ip, true)]).await?;
    }
    let mut expected = apps.clone();
    expected.sort();

    // 1. Down: the connector keeps failing and keeps everything.
    s.env.stop_component("eureka")?;
    connector.wait_registry_errors(3.0).await?;
    assert_eq!(
        service_names(client, ns).await?,
        expected,
        "nothing deleted while down"
    );
    for (app, ip) in apps.iter().zip(ips) {
        wait_endpoints(client, ns, app, &[(ip, true)]).await?;
    }

    // 2. Back, empty: the hash code no longer matches, the full read finds nothing,
    //    and the guard holds the deletion of every managed service.
    s.env.start_component("eureka")?;
    wait_for("the deletions to be held", WAIT, || async {
        let held = connector.metric_where(HELD, &[]).await.ok()?;
        (held == 3.0).then_some(())
    })
    .await
    .map_err(|e| e.context(connector.log_tail()))?;
    assert!(
        connector
            .metric_where(
                "registry_connector_eureka_full_fetches_total",
                &[("reason", "hash_mismatch")]
            )
            .await?
            >= 1.0
    );
    let event = wait_event(client, ns, "DeletionHeld", &apps[0]).await?;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(
        service_names(client, ns).await?,
        expected,
        "held, not deleted"
    );
    for (app, ip) in apps.iter().zip(ips) {
        wait_endpoints(client, ns, app, &[(ip, true)]).await?;
    }

    // 3. The instances register again, one after another (as Eureka clients do over
    //    their heartbeat period when their renewals are refused): the hold lasts until
    //    all are back. Releasing it as soon as fewer than half are missing would delete
    //    the application that happens to come back last.
    for (app, ip) in apps.iter().zip(ips).take(2) {
        s.register(Instance::up(app, &format!("{app}-1"), ip, 8080))
            .await?;
    }
    wait_for("two of three back, one still held", WAIT, || async {
        let held = connector.metric_where(HELD, &[]).await.ok()?;
        (held == 1.0).then_some(())
    })
    .await
    .map_err(|e| e.context(connector.log_tail()))?;
    tokio::time::sleep(2 * common::eureka::POLL_INTERVAL).await;
    assert_eq!(
        service_names(client, ns).await?,
        expected,
        "one missing of three is under the threshold, but the hold is not over"
    );
    s.register(Instance::up(
        &apps[2],
        &format!("{}-1", apps[2]),
        ips[2],
        8080,
    ))
    .await?;
    wait_for("the hold to clear", WAIT, || async {
        let held = connector.metric_where(HELD, &[]).await.ok()?;
        (held == 0.0).then_some(())
    })
    .await?;
    assert_eq!(service_names(client, ns).await?, expected);
    s.cleanup().await;
    Ok(())
}
