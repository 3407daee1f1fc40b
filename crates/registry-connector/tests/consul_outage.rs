//! Consul goes away: nothing may be deleted while it is down, and the connector catches
//! up when it is back. Its own test binary, because it stops the shared Consul agent.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::objects::service_names;
use common::process::Connector;
use common::{tls, WAIT};
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

/// Waits until the connector has counted `at_least` failed Consul requests.
async fn wait_for_failures(connector: &Connector, at_least: f64) -> Result<()> {
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
        (errors >= at_least).then_some(())
    })
    .await
}

/// A restarted agent brings its TTL checks back critical until their services report
/// again, as a real service would after an agent restart.
async fn pass_checks(consul: &ConsulClient, ids: &[String]) -> Result<()> {
    for id in ids {
        consul
            .put(&format!("/v1/agent/check/pass/service:{id}"), &json!(null))
            .await?;
    }
    Ok(())
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
    // While it is down the connector keeps retrying; give it several retry rounds.
    wait_for_failures(&connector, 2.0).await?;
    let names = service_names(&client, ns.name()).await?;
    assert_eq!(
        names.len(),
        2,
        "nothing deleted while Consul is down: {names:?}"
    );

    env.start_component("consul")?;
    pass_checks(&consul, &[format!("{a}-1"), format!("{b}-1")]).await?;
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
    let ids = [
        format!("{a}-1"),
        format!("{a}-2"),
        format!("{b}-1"),
        format!("{late}-1"),
    ];
    pass_checks(&consul, &ids).await?;
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

    drop(connector);

    // 3. Over HTTPS, where the long polls are streams of HTTP/2 connections held by one
    //    task: the agent restarts under them; the connections are dialled again and a
    //    change made after the restart reaches Kubernetes.
    let https = format!("https://{}", env.consul_https_addr()?);
    let pki = env.pki();
    let tls_ns = env.namespace("outage-tls").await?;
    let connector = Connector::builder(env, tls_ns.name())
        .consul_addr(&https)
        .args(["--filter-tag", tag.as_str()])
        .args(tls::flags("consul", &pki, tls::FULL))
        .start()?;
    connector.wait_ready().await?;
    let tls_slices: Api<EndpointSlice> = Api::namespaced(client.clone(), tls_ns.name());
    wait_for("b over HTTPS", WAIT, || async {
        (endpoint_addresses(&tls_slices, &b).await? == vec!["192.0.2.51".to_string()]).then_some(())
    })
    .await?;
    let multiplexed = connector
        .metric_where(
            "registry_connector_consul_watch_mode",
            &[("mode", "multiplexed")],
        )
        .await?;
    assert_eq!(multiplexed, 1.0, "long polls over HTTP/2");
    env.stop_component("consul")?;
    wait_for_failures(&connector, 2.0).await?;
    env.start_component("consul")?;
    pass_checks(&consul, &ids).await?;
    register(&consul, &tag, &format!("{b}-2"), &b, "192.0.2.53").await?;
    wait_for(
        "the post-restart change over HTTPS",
        Duration::from_secs(60),
        || async {
            let got = endpoint_addresses(&tls_slices, &b).await?;
            (got == vec!["192.0.2.51".to_string(), "192.0.2.53".to_string()]).then_some(())
        },
    )
    .await
    .map_err(|e| e.context(format!("log: {}", connector.log_tail())))?;
    let names = service_names(&client, tls_ns.name()).await?;
    assert_eq!(names.len(), 3, "every service still there: {names:?}");

    for id in ids.iter().cloned().chain([format!("{b}-2")]) {
        let _ = consul
            .put(&format!("/v1/agent/service/deregister/{id}"), &json!(null))
            .await;
    }
    Ok(())
}
