//! The Kubernetes → registry tests' scenario: a namespace, a Node object to bind Pods
//! to (there is no kubelet: Pod IPs and readiness are set through the status
//! subresource, and kube-controller-manager builds the EndpointSlices), a Consul node
//! name and a connector id of its own.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;
use testenv::consul::ConsulClient;
use testenv::{unique_name, wait_for, TestEnv};

use super::process::Connector;

pub const WAIT: Duration = Duration::from_secs(60);

pub struct Scenario {
    pub env: &'static TestEnv,
    pub ns: testenv::TestNamespace,
    pub client: kube::Client,
    pub consul: ConsulClient,
    pub node: String,
    pub consul_node: String,
    pub connector_id: String,
}

impl Scenario {
    pub async fn new(prefix: &str) -> Result<Self> {
        let env = TestEnv::shared();
        let client = env.client().await?;
        let node = unique_name("node");
        let s = Self {
            env,
            ns: env.namespace(prefix).await?,
            client,
            // Only the Consul scenarios use it; a client sends nothing until asked, so
            // a ZooKeeper scenario runs without Consul in the environment.
            consul: ConsulClient::new(env.consul_addr().unwrap_or("127.0.0.1:9"))?,
            node,
            consul_node: unique_name("k8s-sync"),
            connector_id: unique_name("c"),
        };
        s.create_node().await?;
        Ok(s)
    }

    async fn create_node(&self) -> Result<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": self.node, "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        }))?;
        nodes
            .create(&PostParams::default(), &node)
            .await
            .context("creating the Node")?;
        Ok(())
    }

    pub fn connector(&self, extra: &[&str]) -> Result<Connector> {
        let mut args = vec![
            "--sync",
            "to-registry",
            "--k8s-allow-namespaces",
            self.ns.name(),
            "--consul-node-name",
            &self.consul_node,
            "--connector-id",
            &self.connector_id,
        ];
        args.extend_from_slice(extra);
        Connector::consul(self.env, self.ns.name(), &args)
    }

    pub fn eureka_connector(&self) -> Result<Connector> {
        Connector::builder(self.env, self.ns.name())
            .eureka(None)
            .args([
                "--sync",
                "to-registry",
                "--k8s-allow-namespaces",
                self.ns.name(),
                "--connector-id",
                &self.connector_id,
            ])
            .start()
    }

    /// The instances of Eureka application `app`: address → status.
    pub async fn eureka_instances(&self, app: &str) -> Result<BTreeMap<String, String>> {
        let url = format!(
            "{}/apps/{}",
            self.env.eureka_url()?.trim_end_matches('/'),
            app.to_uppercase()
        );
        let resp = reqwest::Client::new()
            .get(url)
            .header("Accept", "application/json")
            .send()
            .await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(BTreeMap::new());
        }
        let body: serde_json::Value = resp.error_for_status()?.json().await?;
        let instances = match &body["application"]["instance"] {
            serde_json::Value::Array(a) => a.clone(),
            serde_json::Value::Null => Vec::new(),
            one => vec![one.clone()],
        };
        Ok(instances
            .iter()
            .map(|i| {
                (
                    i["ipAddr"].as_str().unwrap_or_default().to_string(),
                    i["status"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect())
    }

    pub async fn wait_eureka(&self, app: &str, want: &[(&str, &str)]) -> Result<()> {
        let want: BTreeMap<String, String> = want
            .iter()
            .map(|(a, s)| (a.to_string(), s.to_string()))
            .collect();
        wait_for(&format!("{app} in Eureka to be {want:?}"), WAIT, || async {
            (self.eureka_instances(app).await.ok()? == want).then_some(())
        })
        .await
    }

    /// A selector Service `name` (registry name `registry`) on port 80 → 8080.
    pub async fn service(&self, name: &str, registry: &str) -> Result<()> {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": {"connector.flomesh.io/registry-name": registry}},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        }))?;
        Api::<Service>::namespaced(self.client.clone(), self.ns.name())
            .create(&PostParams::default(), &svc)
            .await
            .context("creating the Service")?;
        Ok(())
    }

    /// A Pod of `app` bound to the node, running at `ip`, ready or not.
    pub async fn pod(&self, app: &str, name: &str, ip: &str, ready: bool) -> Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), self.ns.name());
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": app}},
            "spec": {"nodeName": self.node, "containers": [{"name": "app", "image": "example.invalid/app:1", "ports": [{"containerPort": 8080, "name": "http"}]}]},
        }))?;
        // The namespace's default ServiceAccount, which admission requires, appears
        // shortly after the namespace.
        wait_for("the Pod to be admitted", WAIT, || async {
            pods.create(&PostParams::default(), &pod)
                .await
                .ok()
                .map(|_| ())
        })
        .await?;
        self.set_ready(name, ip, ready).await
    }

    pub async fn set_ready(&self, name: &str, ip: &str, ready: bool) -> Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), self.ns.name());
        let status = if ready { "True" } else { "False" };
        let patch = json!({"status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [
                {"type": "Ready", "status": status},
                {"type": "ContainersReady", "status": status},
            ],
        }});
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .context("setting a Pod's status")?;
        Ok(())
    }

    /// The instances of `service` in Consul: address → (port, node, aggregated status).
    pub async fn instances(
        &self,
        service: &str,
    ) -> Result<BTreeMap<String, (u64, String, String)>> {
        let (body, _) = self
            .consul
            .get(&format!("/v1/health/service/{service}"))
            .await?;
        let mut out = BTreeMap::new();
        for entry in body.as_array().cloned().unwrap_or_default() {
            let svc = &entry["Service"];
            let checks = entry["Checks"].as_array().cloned().unwrap_or_default();
            let status = if checks.iter().all(|c| c["Status"] == "passing") {
                "passing"
            } else {
                "critical"
            };
            out.insert(
                svc["Address"].as_str().unwrap_or_default().to_string(),
                (
                    svc["Port"].as_u64().unwrap_or(0),
                    entry["Node"]["Node"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    status.to_string(),
                ),
            );
        }
        Ok(out)
    }

    pub async fn wait_instances(&self, service: &str, want: &[(&str, &str)]) -> Result<()> {
        let want: BTreeMap<String, String> = want
            .iter()
            .map(|(a, s)| (a.to_string(), s.to_string()))
            .collect();
        wait_for(
            &format!("{service} in Consul to be {want:?}"),
            WAIT,
            || async {
                let got = self.instances(service).await.ok()?;
                let ours: BTreeMap<String, String> = got
                    .into_iter()
                    .filter(|(_, (_, node, _))| *node == self.consul_node)
                    .map(|(a, (port, _, s))| {
                        assert_eq!(port, 8080, "the endpoint's port");
                        (a, s)
                    })
                    .collect();
                (ours == want).then_some(())
            },
        )
        .await
    }

    /// This scenario's registrations on its Consul node: (id, address, `ModifyIndex`).
    async fn node_services(&self) -> Result<Vec<(String, String, u64)>> {
        let (body, _) = self
            .consul
            .get(&format!("/v1/catalog/node/{}", self.consul_node))
            .await?;
        Ok(body["Services"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(id, s)| {
                        (
                            id.clone(),
                            s["Address"].as_str().unwrap_or_default().to_string(),
                            s["ModifyIndex"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The `ModifyIndex` of each of this scenario's registrations, by instance id.
    pub async fn service_modify_indexes(&self) -> Result<BTreeMap<String, u64>> {
        Ok(self
            .node_services()
            .await?
            .into_iter()
            .map(|(id, _, index)| (id, index))
            .collect())
    }

    /// The `ModifyIndex` of each of this scenario's registrations, by instance address.
    pub async fn modify_indexes_by_address(&self) -> Result<BTreeMap<String, u64>> {
        Ok(self
            .node_services()
            .await?
            .into_iter()
            .map(|(_, address, index)| (address, index))
            .collect())
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        let client = self.client.clone();
        let node = self.node.clone();
        // Best effort: the Node is cluster-scoped and would outlive the namespace.
        tokio::spawn(async move {
            let _ = Api::<Node>::all(client)
                .delete(&node, &DeleteParams::default())
                .await;
        });
    }
}
