//! What the export workload reads from Consul: the registrations on the connector's
//! node, and the health of one service, each through Consul's blocking queries so that
//! a change is seen when Consul commits it, not at the next poll; and the removal of
//! the node at the end.
//!
//! Every instance the connector registers is a service on its node
//! (`--consul-node-name`): `/v1/catalog/node/<node>` lists them, with their
//! `ModifyIndex`. A ready instance carries no check (healthy in Consul), an instance
//! that is or was not ready carries the connector's readiness check: an instance is
//! passing when every check on it is.
//!
//! The harness's client keeps at most 2 idle connections (closed after 2 s), since they
//! count against the agent's per-client connection limit like the connector's.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use testenv::consul::ConsulClient;

/// The `wait` of every blocking query: short, so that a deadline is checked often.
const BLOCKING_WAIT: &str = "10s";

/// How often a refused request is tried before the step fails. A client that holds
/// the agent's whole per-client connection budget (consul-k8s with one long poll per
/// Service, all from 127.0.0.1 like the harness) makes the agent refuse the harness's
/// reads for a while; the harness retries rather than losing a measurement to it.
const ATTEMPTS: u32 = 30;
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// One registration on the node (the fields the workload reads; the map key is its id).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NodeService {
    #[serde(default)]
    pub modify_index: u64,
    /// `null` in some answers.
    #[serde(default)]
    pub meta: Option<BTreeMap<String, String>>,
}

impl NodeService {
    /// The connector id in its meta, if any.
    pub fn connector_id(&self) -> Option<&str> {
        self.meta
            .as_ref()?
            .get("registry-connector-id")
            .map(String::as_str)
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NodeServices {
    #[serde(default)]
    services: Option<BTreeMap<String, NodeService>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Check {
    #[serde(default)]
    status: String,
    #[serde(rename = "ServiceID", default)]
    service_id: String,
}

/// Consul as the export workload reads it, for one connector node.
#[derive(Debug, Clone)]
pub struct ExportConsul {
    consul: ConsulClient,
    pub node: String,
}

/// The node's registrations at one index.
#[derive(Debug, Clone, Default)]
pub struct NodeState {
    pub index: u64,
    /// Instance id → registration.
    pub services: BTreeMap<String, NodeService>,
}

impl NodeState {
    /// Instance id → `ModifyIndex`.
    pub fn modify_indexes(&self) -> BTreeMap<String, u64> {
        self.services
            .iter()
            .map(|(id, s)| (id.clone(), s.modify_index))
            .collect()
    }
}

impl ExportConsul {
    /// `addr` is the agent's plain HTTP address (`127.0.0.1:PORT`).
    pub fn new(addr: &str, node: &str) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(2)
            .pool_idle_timeout(Duration::from_secs(2))
            .no_proxy()
            .build()
            .context("building the Consul HTTP client")?;
        Ok(Self {
            consul: ConsulClient::with_http(addr, http),
            node: node.into(),
        })
    }

    /// The node's registrations; with `index` > 0 a blocking query that returns when
    /// the node's index moves past it (or after [`BLOCKING_WAIT`]).
    pub async fn node(&self, index: u64) -> Result<NodeState> {
        let path = if index > 0 {
            format!(
                "/v1/catalog/node/{}?index={index}&wait={BLOCKING_WAIT}",
                self.node
            )
        } else {
            format!("/v1/catalog/node/{}", self.node)
        };
        let (body, index) = self.get(&path).await?;
        // A node that does not exist yet answers `null`.
        let services = if body.is_null() {
            BTreeMap::new()
        } else {
            serde_json::from_value::<NodeServices>(body)
                .context("decoding /v1/catalog/node")?
                .services
                .unwrap_or_default()
        };
        Ok(NodeState { index, services })
    }

    /// Instance ids on the node with a check that is not passing.
    pub async fn not_passing(&self) -> Result<Vec<String>> {
        let (body, _) = self.get(&format!("/v1/health/node/{}", self.node)).await?;
        let checks: Vec<Check> = if body.is_null() {
            Vec::new()
        } else {
            serde_json::from_value(body).context("decoding /v1/health/node")?
        };
        Ok(checks
            .into_iter()
            .filter(|c| c.status != "passing")
            .map(|c| c.service_id)
            .collect())
    }

    /// Waits until the node holds at least `want` registrations of connector `id` (with
    /// `None`: any) and none has a check that is not passing; returns the instant the
    /// answer that showed it arrived and that state. Watches the node with blocking
    /// queries.
    pub async fn wait_registered(
        &self,
        id: Option<&str>,
        want: usize,
        deadline: Instant,
    ) -> Result<(Instant, NodeState)> {
        let mut index = 0;
        loop {
            let state = self.node(index).await?;
            let at = Instant::now();
            let ours = state
                .services
                .values()
                .filter(|s| id.is_none() || s.connector_id() == id)
                .count();
            if ours >= want && self.not_passing().await?.is_empty() {
                return Ok((at, state));
            }
            if at > deadline {
                anyhow::bail!(
                    "Consul holds {ours} of the {want} instances on node {} at the deadline",
                    self.node
                );
            }
            // An index that went backwards (a Consul restart) starts over.
            index = if state.index < index { 0 } else { state.index };
        }
    }

    /// The aggregated status (`passing`, `critical`) of the instance at `ip` of
    /// `service` on this node, and the service's health index; `None` when absent.
    /// With `index` > 0 a blocking query.
    pub async fn instance_status(
        &self,
        service: &str,
        ip: &str,
        index: u64,
    ) -> Result<(Option<String>, u64)> {
        let path = if index > 0 {
            format!("/v1/health/service/{service}?index={index}&wait={BLOCKING_WAIT}")
        } else {
            format!("/v1/health/service/{service}")
        };
        let (body, index) = self.get(&path).await?;
        Ok((status_of(&body, &self.node, ip), index))
    }

    /// Removes the node and every registration on it (`/v1/catalog/deregister`).
    pub async fn deregister_node(&self) -> Result<()> {
        let body = json!({ "Node": self.node });
        let mut attempt = 1;
        loop {
            match self.consul.put("/v1/catalog/deregister", &body).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < ATTEMPTS => {
                    eprintln!(
                        "bench: deregistering node {} (attempt {attempt}): {e:#}",
                        self.node
                    );
                    attempt += 1;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A GET of `path`, tried again after a pause when it fails (see [`ATTEMPTS`]).
    async fn get(&self, path: &str) -> Result<(Value, u64)> {
        let mut attempt = 1;
        loop {
            match self.consul.get(path).await {
                Ok(answer) => return Ok(answer),
                Err(e) if attempt < ATTEMPTS => {
                    eprintln!("bench: GET {path} (attempt {attempt}): {e:#}");
                    attempt += 1;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The status of the entry at `ip` on `node` in a `/v1/health/service` answer: passing
/// when every check of the entry is (a ready instance has none).
fn status_of(body: &Value, node: &str, ip: &str) -> Option<String> {
    let entry = body.as_array()?.iter().find(|e| {
        e["Node"]["Node"].as_str() == Some(node) && e["Service"]["Address"].as_str() == Some(ip)
    })?;
    let checks = entry["Checks"].as_array().cloned().unwrap_or_default();
    let passing = checks.iter().all(|c| c["Status"] == "passing");
    Some(if passing { "passing" } else { "critical" }.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_of_reads_our_entry_only() {
        let body = json!([
            {"Node": {"Node": "vm"}, "Service": {"Address": "192.0.2.1"}, "Checks": [{"Status": "critical"}]},
            {"Node": {"Node": "k8s"}, "Service": {"Address": "192.0.2.1"}, "Checks": []},
            {"Node": {"Node": "k8s"}, "Service": {"Address": "192.0.2.2"},
             "Checks": [{"Status": "passing"}, {"Status": "critical"}]},
        ]);
        assert_eq!(
            status_of(&body, "k8s", "192.0.2.1").as_deref(),
            Some("passing")
        );
        assert_eq!(
            status_of(&body, "k8s", "192.0.2.2").as_deref(),
            Some("critical")
        );
        assert_eq!(status_of(&body, "k8s", "192.0.2.3"), None);
    }

    #[test]
    fn node_services_decode() {
        let body = json!({"Node": {"Node": "k8s"}, "Services": {
            "a": {"ID": "a", "Service": "web", "Address": "192.0.2.1", "ModifyIndex": 7,
                  "Meta": {"registry-connector-id": "c1"}, "Port": 8080, "Tags": ["k8s"]}
        }});
        let s: NodeServices = serde_json::from_value(body).expect("decodes");
        let st = NodeState {
            index: 9,
            services: s.services.unwrap_or_default(),
        };
        assert_eq!(st.modify_indexes(), BTreeMap::from([("a".to_string(), 7)]));
        assert_eq!(st.services["a"].connector_id(), Some("c1"));
    }
}
