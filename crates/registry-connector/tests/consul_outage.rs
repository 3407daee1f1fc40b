//! Consul goes away: nothing may be deleted while it is down, and the connector catches
//! up when it is back. Its own test binary, because it stops the shared Consul agent.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::objects::service_names;
use common::process::Connector;
use common::WAIT;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::Api;
use serde_json::json;
use testenv::consul::ConsulClient;
use testenv::{unique_name, wait_for, TestEnv};

async fn register(
    consul: &ConsulClient,
    tag: &str,
    id: &str,
    name: &str,
    addr: &str,
) -> Result<()> {
    consul
        .put(
            "/v1/agent/service/register",
            &json!({"ID": id, "Name": name, "Address": addr, "Port": 80, "Tags": [tag],
                    "Check": {"CheckID": format!("service:{id}"), "TTL": "30m", "Status": "passing"}}),
        )
        .await
}

async fn endpoint_addresses(api: &Api<EndpointSlice>, svc: &str) -> Option<Vec<String>> {
    let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={svc}"));
    let mut addrs: Vec<String> = api
        .list(&lp)
        .await
        .ok()?
        .items
        .into_iter()
        .flat_map(|s| s.endpoints.into_iter().flat_map(|e| e.addresses))
        .collect();
    addrs.sort();
    Some(addrs)
}

/// Both scenarios run in one test, one after the other: they stop the shared agent.
#[tokio::test]
async fn consul_outages_delete_nothing_and_are_caught_up() -> Result<()> {
    let env = TestEnv::shared();
    let consul = ConsulClient::new(env.consul_addr()?)?;
    let client = env.client().await?;

    // 1. Consul stops for a while and comes back with the same data.
    let ns = env.namespace("outage").await?;
    let tag = unique_name("t");
    let a = unique_name("a");
    let b = unique_name("b");
    register(&consul, &tag, &format!("{a}-1"), &a, "192.0.2.50").await?;
    register(&consul, &tag, &format!("{b}-1"), &b, "192.0.2.51").await?;
    let connector = Connector::consul(env, ns.name(), &["--filter-tag", &tag])?;
    connector.wait_ready().await?;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns.name());
    assert_eq!(
        endpoint_addresses(&slices, &a).await,
        Some(vec!["192.0.2.50".into()])
    );

    env.stop_component("consul")?;
    let failures_before = connector
        .metric_sum("registry_connector_registry_requests_total")
        .await?;
    // While it is down the connector keeps retrying; give it several retry rounds.
    wait_for("the connector to notice Consul is down", WAIT, || async {
        let m = connector.metrics().await.ok()?;
        let errors: f64 = m
            .iter()
            .filter(|(k, _)| {
                k.starts_with("registry_connector_registry_requests_total{")
                    && k.contains("result=\"error\"")
            })
            .map(|(_, v)| v)
            .sum();
        (errors >= 2.0).then_some(())
    })
    .await?;
    let _ = failures_before;
    let names = service_names(&client, ns.name()).await?;
    assert_eq!(
        names.len(),
        2,
        "nothing deleted while Consul is down: {names:?}"
    );

    env.start_component("consul")?;
    // A restarted agent brings its TTL checks back critical until their services report
    // again, as a real service would after an agent restart.
    for id in [format!("{a}-1"), format!("{b}-1")] {
        consul
            .put(&format!("/v1/agent/check/pass/service:{id}"), &json!(null))
            .await?;
    }
    // A change made after the restart shows that the connector caught up.
    register(&consul, &tag, &format!("{a}-2"), &a, "192.0.2.52").await?;
    wait_for(
        "the post-restart change",
        Duration::from_secs(60),
        || async {
            let got = endpoint_addresses(&slices, &a).await?;
            (got == vec!["192.0.2.50".to_string(), "192.0.2.52".to_string()]).then_some(())
        },
    )
    .await?;
    assert_eq!(
        endpoint_addresses(&slices, &b).await,
        Some(vec!["192.0.2.51".into()])
    );
    drop(connector);

    // 2. The connector starts while Consul is down: it waits, deletes nothing, and
    //    syncs when Consul comes up.
    let late = unique_name("late");
    register(&consul, &tag, &format!("{late}-1"), &late, "192.0.2.60").await?;
    env.stop_component("consul")?;
    let connector = Connector::consul(env, ns.name(), &["--filter-tag", &tag])?;
    wait_for("the admin server", WAIT, || async {
        connector.readyz().await
    })
    .await?;
    assert_eq!(
        connector.readyz().await,
        Some(503),
        "not ready without the registry"
    );
    let names = service_names(&client, ns.name()).await?;
    assert_eq!(
        names.len(),
        2,
        "nothing deleted or created while Consul is down: {names:?}"
    );
    env.start_component("consul")?;
    for id in [
        format!("{a}-1"),
        format!("{a}-2"),
        format!("{b}-1"),
        format!("{late}-1"),
    ] {
        consul
            .put(&format!("/v1/agent/check/pass/service:{id}"), &json!(null))
            .await?;
    }
    connector.wait_ready().await?;
    wait_for("the late service", WAIT, || async {
        (endpoint_addresses(&slices, &late).await? == vec!["192.0.2.60".to_string()]).then_some(())
    })
    .await?;
    // The checks were passed one after another: the first snapshot may have caught `a`
    // with one passing instance, and the second follows as a change.
    wait_for("both instances of a", WAIT, || async {
        (endpoint_addresses(&slices, &a).await?.len() == 2).then_some(())
    })
    .await?;

    for id in [
        format!("{a}-1"),
        format!("{a}-2"),
        format!("{b}-1"),
        format!("{late}-1"),
    ] {
        let _ = consul
            .put(&format!("/v1/agent/service/deregister/{id}"), &json!(null))
            .await;
    }
    Ok(())
}
