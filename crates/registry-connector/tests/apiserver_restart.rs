//! The apiserver goes away mid-run and comes back: the sink must converge without
//! duplicates. Its own test binary, because it stops the shared apiserver.

mod common;

use anyhow::Result;
use common::*;
use kube::api::ListParams;
use testenv::{wait_for, TestEnv};

#[tokio::test]
async fn converges_without_duplicates_after_an_apiserver_restart() -> Result<()> {
    let h = Harness::start("restart").await?;
    h.catalog.replace_all([svc("before", many(120))]);
    h.wait_for_endpoint_count("before", 120).await?;

    let env = TestEnv::shared();
    env.stop_component("kube-apiserver")?;
    // Changes while the apiserver is down: a new service and a changed one.
    h.catalog
        .replace_all([svc("before", many(130)), svc("during", many(3))]);
    let failures = h.sink.metrics.reconcile_failures.get();
    wait_for("the sink to hit the missing apiserver", WAIT, || async {
        (h.sink.metrics.reconcile_failures.get() > failures).then_some(())
    })
    .await?;
    env.start_component("kube-apiserver")?;

    // Fresh clients: the old connection pool may hold dead connections.
    let slices_of = |svc: &'static str| {
        let ns = h.ns.name().to_string();
        async move {
            let client = env.client().await.ok()?;
            let api: kube::Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
                kube::Api::namespaced(client, &ns);
            api.list(&ListParams::default().labels(&format!("kubernetes.io/service-name={svc}")))
                .await
                .ok()
                .map(|l| l.items)
        }
    };
    wait_for(
        "convergence after the restart",
        std::time::Duration::from_secs(90),
        || async {
            let before = slices_of("before").await?;
            let during = slices_of("during").await?;
            (endpoint_count(&before) == 130 && endpoint_count(&during) == 3).then_some(())
        },
    )
    .await?;
    let before = slices_of("before").await.expect("list");
    assert_eq!(before.len(), 2, "two slices (100 + 30), no duplicates");
    let mut addresses: Vec<String> = before
        .iter()
        .flat_map(|s| s.endpoints.iter().flat_map(|e| e.addresses.clone()))
        .collect();
    let total = addresses.len();
    addresses.sort();
    addresses.dedup();
    assert_eq!(addresses.len(), total, "no address twice");
    Ok(())
}
