//! End to end: a real Consul agent, the real control plane and the real binary as a
//! child process. Each test isolates itself with its own namespace, its own service
//! names and its own `--filter-tag`.

mod common;

use anyhow::Result;
use common::objects::{self, port_specs};
use common::process::Connector;
use common::*;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::Api;
use serde_json::{json, Value};
use testenv::consul::ConsulClient;
use testenv::{unique_name, wait_for, TestEnv};

struct Scenario {
    env: &'static TestEnv,
    ns: testenv::TestNamespace,
    consul: ConsulClient,
    tag: String,
    client: kube::Client,
    registered: Vec<String>,
}

impl Scenario {
    async fn new(prefix: &str) -> Result<Self> {
        let env = TestEnv::shared();
        Ok(Self {
            env,
            ns: env.namespace(prefix).await?,
            consul: ConsulClient::new(env.consul_addr()?)?,
            tag: unique_name("t"),
            client: env.client().await?,
            registered: Vec::new(),
        })
    }

    fn connector(&self, extra: &[&str]) -> Result<Connector> {
        let mut args = vec!["--filter-tag", self.tag.as_str()];
        args.extend_from_slice(extra);
        Connector::consul(self.env, self.ns.name(), &args)
    }

    /// Registers one instance with a TTL check (never an active check: the addresses
    /// are documentation ranges and are never contacted).
    async fn register(
        &mut self,
        id: &str,
        name: &str,
        addr: &str,
        port: u16,
        tags: &[&str],
        passing: bool,
    ) -> Result<()> {
        let mut all_tags: Vec<Value> = tags.iter().map(|t| json!(t)).collect();
        all_tags.push(json!(self.tag));
        self.consul
            .put(
                "/v1/agent/service/register",
                &json!({
                    "ID": id, "Name": name, "Address": addr, "Port": port, "Tags": all_tags,
                    "Check": {"CheckID": format!("service:{id}"), "TTL": "30m",
                              "Status": if passing { "passing" } else { "critical" }}
                }),
            )
            .await?;
        self.registered.push(id.to_string());
        Ok(())
    }

    async fn deregister(&self, id: &str) -> Result<()> {
        self.consul
            .put(&format!("/v1/agent/service/deregister/{id}"), &json!(null))
            .await
    }

    async fn check(&self, id: &str, status: &str) -> Result<()> {
        self.consul
            .put(
                &format!("/v1/agent/check/{status}/service:{id}"),
                &json!(null),
            )
            .await
    }

    fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), self.ns.name())
    }

    async fn slices_of(&self, svc: &str) -> Option<Vec<EndpointSlice>> {
        objects::slices_of(&self.client, self.ns.name(), svc).await
    }

    /// Waits until the service's slices show exactly these (address, ready) endpoints.
    async fn wait_endpoints(&self, svc: &str, want: &[(&str, bool)]) -> Result<Vec<EndpointSlice>> {
        objects::wait_endpoints(&self.client, self.ns.name(), svc, want).await
    }

    async fn wait_gone(&self, svc: &str) -> Result<()> {
        objects::wait_service_gone(&self.client, self.ns.name(), svc).await
    }

    async fn cleanup(&self) {
        for id in &self.registered {
            let _ = self.deregister(id).await;
        }
    }
}

#[tokio::test]
async fn syncs_services_with_their_ports_protocols_and_addresses() -> Result<()> {
    let mut s = Scenario::new("e2e-sync").await?;
    let api = unique_name("api");
    let pay = unique_name("pay");
    let dual = unique_name("dual");
    s.register(
        &format!("{api}-1"),
        &api,
        "192.0.2.1",
        8080,
        &["gRPC.port=9090"],
        true,
    )
    .await?;
    s.register(
        &format!("{pay}-1"),
        &pay,
        "192.0.2.2",
        8443,
        &["zone=blue"],
        true,
    )
    .await?;
    s.register(&format!("{dual}-1"), &dual, "198.51.100.3", 7000, &[], true)
        .await?;
    s.register(&format!("{dual}-2"), &dual, "2001:db8::3", 7000, &[], true)
        .await?;
    let connector = s.connector(&["--prefix-tag", "zone"])?;

    s.wait_endpoints(&api, &[("192.0.2.1", true)]).await?;
    s.wait_endpoints(&dual, &[("198.51.100.3", true), ("2001:db8::3", true)])
        .await?;
    s.wait_endpoints(&pay, &[("192.0.2.2", true)]).await?;

    let svc = s.services().get(&api).await?;
    assert_eq!(
        port_specs(&svc),
        vec![
            ("grpc9090".to_string(), 9090, Some("grpc".to_string())),
            ("http8080".to_string(), 8080, Some("http".to_string())),
        ]
    );
    let families: Vec<String> = s
        .slices_of(&dual)
        .await
        .unwrap_or_default()
        .iter()
        .map(|x| x.address_type.clone())
        .collect();
    assert_eq!(families.len(), 2, "{families:?}");
    assert!(families.contains(&"IPv6".to_string()));
    // The instance tagged zone=blue is also published under `blue-<name>` (prefix tag
    // only, no suffix tag configured).
    s.wait_endpoints(&format!("blue-{pay}"), &[("192.0.2.2", true)])
        .await?;
    connector.wait_ready().await?;
    drop(connector);
    s.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn failing_checks_leave_the_ready_set_or_become_not_ready() -> Result<()> {
    let mut s = Scenario::new("e2e-health").await?;
    let web = unique_name("web");
    s.register(&format!("{web}-1"), &web, "192.0.2.11", 80, &[], true)
        .await?;
    s.register(&format!("{web}-2"), &web, "192.0.2.12", 80, &[], true)
        .await?;
    let other_ns = s.env.namespace("e2e-health-all").await?;
    let passing_only = s.connector(&[])?;
    let all = Connector::consul(
        s.env,
        other_ns.name(),
        &["--filter-tag", s.tag.as_str(), "--passing-only=false"],
    )?;
    s.wait_endpoints(&web, &[("192.0.2.11", true), ("192.0.2.12", true)])
        .await?;

    s.check(&format!("{web}-2"), "fail").await?;
    s.wait_endpoints(&web, &[("192.0.2.11", true)]).await?;
    let api: Api<EndpointSlice> = Api::namespaced(s.client.clone(), other_ns.name());
    wait_for(
        "the failing instance to be published not ready",
        WAIT,
        || async {
            let slices = api
                .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={web}")))
                .await
                .ok()?;
            let not_ready: Vec<String> = slices
                .items
                .iter()
                .flat_map(|x| x.endpoints.iter())
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(false))
                .map(|e| e.addresses[0].clone())
                .collect();
            (not_ready == vec!["192.0.2.12".to_string()]).then_some(())
        },
    )
    .await?;

    s.check(&format!("{web}-2"), "pass").await?;
    s.wait_endpoints(&web, &[("192.0.2.11", true), ("192.0.2.12", true)])
        .await?;
    drop((passing_only, all));
    s.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn deregistration_removes_endpoints_then_the_service() -> Result<()> {
    let mut s = Scenario::new("e2e-dereg").await?;
    let keep = unique_name("keep");
    let a = unique_name("a");
    let b = unique_name("b");
    s.register(&format!("{keep}-1"), &keep, "192.0.2.20", 80, &[], true)
        .await?;
    s.register(&format!("{keep}-2"), &keep, "192.0.2.21", 80, &[], true)
        .await?;
    s.register(&format!("{a}-1"), &a, "192.0.2.22", 80, &[], true)
        .await?;
    s.register(&format!("{b}-1"), &b, "192.0.2.23", 80, &[], true)
        .await?;
    let _connector = s.connector(&[])?;
    s.wait_endpoints(&keep, &[("192.0.2.20", true), ("192.0.2.21", true)])
        .await?;
    s.wait_endpoints(&a, &[("192.0.2.22", true)]).await?;
    s.wait_endpoints(&b, &[("192.0.2.23", true)]).await?;

    s.deregister(&format!("{keep}-2")).await?;
    s.wait_endpoints(&keep, &[("192.0.2.20", true)]).await?;
    // One service of three: under the mass-deletion threshold, deleted at once.
    s.deregister(&format!("{a}-1")).await?;
    s.wait_gone(&a).await?;
    assert!(s.slices_of(&a).await.unwrap_or_default().is_empty());
    assert!(s.services().get_opt(&b).await?.is_some());
    s.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn filter_tag_and_k8s_tag_select_services() -> Result<()> {
    let mut s = Scenario::new("e2e-select").await?;
    let synced = unique_name("synced");
    let from_k8s = unique_name("fromk8s");
    let untagged = unique_name("untagged");
    s.register(&format!("{synced}-1"), &synced, "192.0.2.30", 80, &[], true)
        .await?;
    s.register(
        &format!("{from_k8s}-1"),
        &from_k8s,
        "192.0.2.31",
        80,
        &["k8s"],
        true,
    )
    .await?;
    // Not carrying the filter tag: registered directly, without the scenario's tag.
    s.consul
        .put(
            "/v1/agent/service/register",
            &json!({"ID": untagged, "Name": untagged, "Address": "192.0.2.32", "Port": 80,
              "Check": {"TTL": "30m", "Status": "passing"}}),
        )
        .await?;
    let connector = s.connector(&[])?;
    s.wait_endpoints(&synced, &[("192.0.2.30", true)]).await?;
    connector.wait_ready().await?;
    let names: Vec<String> = s
        .services()
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|x| x.metadata.name)
        .collect();
    assert_eq!(
        names,
        vec![synced.clone()],
        "only the tagged, non-k8s service"
    );
    s.deregister(&untagged).await?;
    s.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_restart_without_changes_writes_nothing() -> Result<()> {
    let mut s = Scenario::new("e2e-restart").await?;
    for i in 0..5 {
        let name = format!("{}-svc{i}", s.tag);
        s.register(
            &format!("{name}-1"),
            &name,
            &format!("192.0.2.{}", 40 + i),
            80,
            &["gRPC.port=9000"],
            true,
        )
        .await?;
    }
    let first = s.connector(&[])?;
    first.wait_ready().await?;
    assert!(
        first.writes().await? >= 15.0,
        "first run created services, slices, endpoints"
    );
    first.kill().await?;

    let second = s.connector(&[])?;
    second.wait_ready().await?;
    // Let a few coalescing periods pass with the loop running, then count.
    let reconciles = second
        .metric_sum("registry_connector_reconciles_total")
        .await?;
    assert!(
        reconciles >= 5.0,
        "the restart compared every service: {reconciles}"
    );
    assert_eq!(second.writes().await?, 0.0, "log: {}", second.log_tail());
    let status = second.terminate().await?;
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert_eq!(
        s.services().list(&ListParams::default()).await?.items.len(),
        5,
        "shutdown deletes nothing"
    );
    s.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn allow_listed_service_meta_becomes_labels_and_annotations() -> Result<()> {
    let mut s = Scenario::new("e2e-meta").await?;
    let name = unique_name("meta");
    let id = format!("{name}-1");
    // Registered directly: the scenario's helper sends no Meta.
    s.consul
        .put(
            "/v1/agent/service/register",
            &json!({"ID": id, "Name": name, "Address": "192.0.2.80", "Port": 80,
                    "Tags": [s.tag], "Meta": {"version": "3.1", "owner": "team blue", "other": "x"},
                    "Check": {"TTL": "30m", "Status": "passing"}}),
        )
        .await?;
    s.registered.push(id.clone());
    let _connector = s.connector(&[
        "--metadata-labels",
        "version",
        "--metadata-annotations",
        "owner",
    ])?;
    s.wait_endpoints(&name, &[("192.0.2.80", true)]).await?;
    let svc = s.services().get(&name).await?;
    let labels = svc.metadata.labels.unwrap_or_default();
    let annotations = svc.metadata.annotations.unwrap_or_default();
    assert_eq!(labels.get("version").map(String::as_str), Some("3.1"));
    assert_eq!(
        annotations.get("owner").map(String::as_str),
        Some("team blue")
    );
    assert!(!labels.contains_key("other") && !annotations.contains_key("other"));
    s.cleanup().await;
    Ok(())
}
