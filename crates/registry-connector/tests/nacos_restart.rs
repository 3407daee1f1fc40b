//! The Nacos server stopped and started again (empty of ephemeral instances, as a real
//! restart leaves it): the connector deletes nothing while Nacos is down, reconnects,
//! subscribes again, reads every service empty and holds them, and converges once the
//! instances are registered again, as Nacos's own clients do some seconds after they
//! reconnect. The registrations come only 5 s after the connector's reconnection, so
//! that its empty reads and its service-list passes without the services fall inside
//! the reconnect grace: a Service deleted meanwhile would come back with a new UID. A binary of its own: it restarts the shared
//! server, which no other test binary uses meanwhile (test binaries run one at a time).

mod common;

use std::time::Duration;

use anyhow::Result;
use common::nacos::{Instance, NacosScenario};
use common::objects::wait_endpoints;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use testenv::{unique_name, wait_for};

#[tokio::test]
async fn a_restarted_nacos_is_reconnected_without_deleting_anything() -> Result<()> {
    let s = NacosScenario::new("nacos-restart").await?;
    let g = s.group.clone();
    let a = unique_name("alpha");
    let b = unique_name("beta");
    let instances = [
        Instance::new(&a, &g, "192.0.2.81", 8080),
        Instance::new(&a, &g, "192.0.2.82", 8080),
        Instance::new(&b, &g, "198.51.100.81", 9000),
    ];
    for i in &instances {
        s.register(i).await?;
    }
    let connector = s.connector_in(s.ns(), &g, &[])?;
    connector.wait_ready().await?;
    wait_endpoints(
        &s.client,
        s.ns(),
        &a,
        &[("192.0.2.81", true), ("192.0.2.82", true)],
    )
    .await?;
    wait_endpoints(&s.client, s.ns(), &b, &[("198.51.100.81", true)]).await?;
    let services: Api<Service> = Api::namespaced(s.client.clone(), s.ns());
    let uid = |svc: Service| svc.metadata.uid.unwrap_or_default();
    let (uid_a, uid_b) = (uid(services.get(&a).await?), uid(services.get(&b).await?));

    s.env.stop_component("nacos")?;
    wait_for(
        "the connector to see Nacos gone",
        Duration::from_secs(30),
        || async {
            let up = connector
                .metric_sum("registry_connector_nacos_connected")
                .await
                .ok()?;
            (up == 0.0).then_some(())
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        services.get_opt(&a).await?.is_some(),
        "nothing deleted while Nacos is down"
    );
    assert!(services.get_opt(&b).await?.is_some());

    s.env.start_component("nacos")?;
    wait_for(
        "the connector to reconnect",
        Duration::from_secs(60),
        || async {
            let n = connector
                .metric_sum("registry_connector_nacos_reconnects_total")
                .await
                .ok()?;
            let up = connector
                .metric_sum("registry_connector_nacos_connected")
                .await
                .ok()?;
            (n >= 1.0 && up == 1.0).then_some(())
        },
    )
    .await
    .map_err(|e| e.context(connector.log_tail()))?;
    // The restarted Nacos knows neither service: both read empty and are held.
    wait_for(
        "both services held as emptied",
        Duration::from_secs(30),
        || async {
            let held = connector
                .metric_sum("registry_connector_nacos_empty_holds")
                .await
                .ok()?;
            (held == 2.0).then_some(())
        },
    )
    .await
    .map_err(|e| e.context(connector.log_tail()))?;
    // The clients register again only after a while (a Java client's redo delay, a
    // loaded node): meanwhile the service list lacks both services for two passes.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        uid(services.get(&a).await?),
        uid_a,
        "nothing deleted while the restarted Nacos is empty"
    );
    assert_eq!(uid(services.get(&b).await?), uid_b);
    // One of them moved.
    s.register(&instances[0]).await?;
    s.register(&Instance::new(&a, &g, "192.0.2.83", 8080))
        .await?;
    s.register(&instances[2]).await?;
    wait_endpoints(
        &s.client,
        s.ns(),
        &a,
        &[("192.0.2.81", true), ("192.0.2.83", true)],
    )
    .await?;
    wait_endpoints(&s.client, s.ns(), &b, &[("198.51.100.81", true)]).await?;
    assert_eq!(
        uid(services.get(&a).await?),
        uid_a,
        "the Service was never deleted"
    );
    assert_eq!(
        uid(services.get(&b).await?),
        uid_b,
        "the Service was never deleted"
    );
    assert!(
        connector
            .metric_where(
                "registry_connector_registry_requests_total",
                &[("endpoint", "subscribe"), ("result", "ok")]
            )
            .await?
            >= 4.0,
        "both services subscribed again on the new connection"
    );
    wait_for("the holds to end", Duration::from_secs(30), || async {
        let held = connector
            .metric_sum("registry_connector_nacos_empty_holds")
            .await
            .ok()?;
        (held == 0.0).then_some(())
    })
    .await?;
    Ok(())
}
