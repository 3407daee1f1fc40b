//! The shapes of Consul's answers this source reads, and the blocking-query index rule.
//!
//! Only the fields the selection rules need are decoded; everything else Consul sends
//! (tagged addresses, proxy and connect settings, weights, ...) is ignored, and fields
//! Consul may send as `null` (`Tags`, `Meta`, `Checks`) decode as empty. Decoding never
//! validates: an instance with port 0 or a loopback address decodes fine and is judged by
//! [`super::select`], which can name the instance in its log line.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

/// `/v1/catalog/services`: every service name with the union of its instances' tags.
pub type CatalogServices = BTreeMap<String, Vec<String>>;

/// Decodes `/v1/catalog/services`, where a service's tag list may be `null`.
pub fn decode_catalog_services(body: &[u8]) -> Result<CatalogServices, serde_json::Error> {
    let raw: BTreeMap<String, Option<Vec<String>>> = serde_json::from_slice(body)?;
    Ok(raw
        .into_iter()
        .map(|(name, tags)| (name, tags.unwrap_or_default()))
        .collect())
}

/// Decodes `/v1/health/service/<name>` (all instances, with their checks).
pub fn decode_health_service(body: &[u8]) -> Result<Vec<HealthEntry>, serde_json::Error> {
    let raw: Option<Vec<HealthEntry>> = serde_json::from_slice(body)?;
    Ok(raw.unwrap_or_default())
}

/// Decodes `/v1/health/state/any` (every check of the datacenter).
pub fn decode_health_state(body: &[u8]) -> Result<Vec<CheckState>, serde_json::Error> {
    let raw: Option<Vec<CheckState>> = serde_json::from_slice(body)?;
    Ok(raw.unwrap_or_default())
}

/// The agent's `limits.http_max_conns_per_client` from `/v1/agent/self`
/// (`DebugConfig.HTTPMaxConnsPerClient`, Consul 1.6+); `None` when the answer does not
/// carry it (an older agent). A negative value is treated as absent.
pub fn decode_agent_conn_limit(body: &[u8]) -> Result<Option<usize>, serde_json::Error> {
    #[derive(Deserialize)]
    struct AgentSelf {
        #[serde(rename = "DebugConfig", default)]
        debug_config: Option<DebugConfig>,
    }
    #[derive(Deserialize)]
    struct DebugConfig {
        #[serde(rename = "HTTPMaxConnsPerClient", default)]
        http_max_conns_per_client: Option<i64>,
    }
    let agent: AgentSelf = serde_json::from_slice(body)?;
    Ok(agent
        .debug_config
        .and_then(|c| c.http_max_conns_per_client)
        .and_then(|n| usize::try_from(n).ok()))
}

/// One check as `/v1/health/state/any` reports it: what names the service whose state
/// it is part of, what the source publishes of it (status, instance, tags), and the index
/// of its last change. The output and the definition are not decoded: they change
/// without changing anything the source publishes.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "PascalCase")]
pub struct CheckState {
    #[serde(default)]
    pub node: String,
    #[serde(rename = "CheckID", default)]
    pub check_id: String,
    #[serde(default)]
    pub status: String,
    /// Empty for a node's own checks (`serfHealth`, node maintenance).
    #[serde(rename = "ServiceID", default)]
    pub service_id: String,
    #[serde(default)]
    pub service_name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub service_tags: Vec<String>,
    #[serde(default)]
    pub modify_index: u64,
}

/// One instance of a service as `/v1/health/service/<name>` reports it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthEntry {
    #[serde(default, deserialize_with = "null_as_default")]
    pub node: Node,
    pub service: Service,
    #[serde(default, deserialize_with = "null_as_default")]
    pub checks: Vec<Check>,
}

/// The node an instance runs on.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Node {
    /// The node's name.
    #[serde(default)]
    pub node: String,
    /// The node's address: the instance's address when the service gives none.
    #[serde(default)]
    pub address: String,
}

/// The service instance itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Service {
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(default)]
    pub service: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub tags: Vec<String>,
    /// The instance's service meta (`Meta`), for the metadata allow-list.
    #[serde(default, deserialize_with = "null_as_default")]
    pub meta: std::collections::BTreeMap<String, String>,
    /// Empty when the instance was registered without one.
    #[serde(default)]
    pub address: String,
    /// Kept wide: Consul stores an `int`, and a nonsense value must skip one instance,
    /// not fail the decoding of the whole service.
    #[serde(default)]
    pub port: i64,
}

/// One health check of an instance: the node's own checks (`serfHealth`, node
/// maintenance) and the instance's.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Check {
    #[serde(rename = "CheckID", default)]
    pub check_id: String,
    /// The instance the check belongs to; empty for a node's own checks.
    #[serde(rename = "ServiceID", default)]
    pub service_id: String,
    /// `passing`, `warning`, `critical` (maintenance mode is a critical check).
    #[serde(default)]
    pub status: String,
}

impl Check {
    pub fn is_passing(&self) -> bool {
        self.status == "passing"
    }
}

impl HealthEntry {
    /// Whether the instance has a check of its own. An instance without one is invisible
    /// to `/v1/health/state/any` (its registration moves no check), so the shared mode
    /// gives its service a long poll first.
    pub fn has_own_check(&self) -> bool {
        self.checks.iter().any(|c| !c.service_id.is_empty())
    }
}

/// `/v1/catalog/node/<node>`: the node's services by ID (`null` when the node is not
/// registered).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NodeServices {
    #[serde(default, deserialize_with = "null_as_default")]
    pub services: std::collections::BTreeMap<String, Service>,
}

/// Decodes a `/v1/catalog/node/<node>` body.
pub fn decode_node_services(body: &[u8]) -> Result<Option<NodeServices>, serde_json::Error> {
    serde_json::from_slice(body)
}

/// Decodes a `/v1/health/node/<node>` body.
pub fn decode_checks(body: &[u8]) -> Result<Vec<Check>, serde_json::Error> {
    Ok(
        Option::<Vec<Check>>::deserialize(&mut serde_json::Deserializer::from_slice(body))?
            .unwrap_or_default(),
    )
}

/// One entry of `/v1/internal/ui/services`: a service and the nodes it has instances on.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UiService {
    #[serde(default)]
    pub name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub nodes: Vec<String>,
}

/// Decodes a `/v1/internal/ui/services` body.
pub fn decode_ui_services(body: &[u8]) -> Result<Vec<UiService>, serde_json::Error> {
    Ok(
        Option::<Vec<UiService>>::deserialize(&mut serde_json::Deserializer::from_slice(body))?
            .unwrap_or_default(),
    )
}

pub(crate) fn null_as_default<'de, D, T>(de: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(de)?.unwrap_or_default())
}

/// The index to send with the next blocking query, given the one sent (`sent`) and the
/// `X-Consul-Index` that came back (`returned`), as Consul's blocking-query guidance
/// says:
///
/// - an index that went backwards (a server restored from a snapshot, a stale read from
///   another server) resets the watch to 0, a plain read that returns the current state;
/// - an index below 1 is raised to 1: index 0 makes Consul answer at once without
///   blocking, so a buggy 0 would turn the watch into a busy loop, while 1 blocks as soon
///   as Consul's real index is 1 and otherwise returns the current state once.
///
/// Together: a backwards index continues from 1, which is the same "read the current
/// state, then block" as a reset, and the answer that carried it is still used (it is a
/// complete, valid state). The caller's pacing bounds the cost of an index that does not
/// advance.
pub fn next_index(sent: u64, returned: u64) -> u64 {
    let next = if returned < sent { 0 } else { returned };
    next.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICES: &str = include_str!("../../../tests/fixtures/consul/catalog_services.json");
    const ORDERS: &str = include_str!("../../../tests/fixtures/consul/health_service_orders.json");
    const ABSENT: &str = include_str!("../../../tests/fixtures/consul/health_service_absent.json");
    // Captured from the test environment's Consul 1.8.7 (a dev agent with three
    // services registered through the catalog: two with a check, one without).
    const STATE: &str = include_str!("../../../tests/fixtures/consul/health_state_any.json");
    const AGENT_SELF: &str = include_str!("../../../tests/fixtures/consul/agent_self.json");

    #[test]
    fn decodes_the_check_state() {
        let checks = decode_health_state(STATE.as_bytes()).expect("fixture decodes");
        assert_eq!(checks.len(), 3);
        let orders = checks
            .iter()
            .find(|c| c.check_id == "service:orders-1")
            .expect("orders' check");
        assert_eq!(orders.service_name, "orders");
        assert_eq!(orders.node, "node-a");
        assert!(orders.modify_index > 0);
        // The agent's own node check names no service.
        assert!(checks
            .iter()
            .any(|c| c.check_id == "serfHealth" && c.service_name.is_empty()));
        assert!(decode_health_state(b"null").expect("null").is_empty());
    }

    #[test]
    fn reads_the_agents_connection_limit() {
        assert_eq!(
            decode_agent_conn_limit(AGENT_SELF.as_bytes()).expect("fixture decodes"),
            Some(200)
        );
        assert_eq!(decode_agent_conn_limit(b"{}").expect("older agent"), None);
        assert_eq!(
            decode_agent_conn_limit(br#"{"DebugConfig":{"HTTPMaxConnsPerClient":-1}}"#)
                .expect("negative"),
            None
        );
        assert!(decode_agent_conn_limit(b"\"x\"").is_err());
    }

    #[test]
    fn instances_without_a_check_of_their_own() {
        let with_node_check_only = decode_health_service(
            br#"[{"Node":{"Node":"n"},"Service":{"ID":"x","Service":"s","Port":1},
                 "Checks":[{"CheckID":"serfHealth","ServiceID":"","Status":"passing"}]}]"#,
        )
        .expect("decodes");
        assert!(!with_node_check_only[0].has_own_check());
        let entries = decode_health_service(ORDERS.as_bytes()).expect("fixture decodes");
        let first = entries.iter().find(|e| e.service.id == "orders-1").unwrap();
        assert!(first.has_own_check());
    }

    #[test]
    fn decodes_catalog_services() {
        let services = decode_catalog_services(SERVICES.as_bytes()).expect("fixture decodes");
        assert_eq!(services["consul"], Vec::<String>::new());
        assert_eq!(services["from-k8s"], vec!["k8s".to_string()]);
        assert!(services["orders"].contains(&"gRPC.port=9090".to_string()));
    }

    #[test]
    fn decodes_null_tags() {
        let services = decode_catalog_services(br#"{"a":null,"b":["x"]}"#).expect("decodes");
        assert!(services["a"].is_empty());
    }

    #[test]
    fn decodes_health_entries() {
        let entries = decode_health_service(ORDERS.as_bytes()).expect("fixture decodes");
        assert_eq!(entries.len(), 6);
        let first = entries
            .iter()
            .find(|e| e.service.id == "orders-1")
            .expect("orders-1 in fixture");
        assert_eq!(first.service.service, "orders");
        assert_eq!(first.service.address, "192.0.2.10");
        assert_eq!(first.service.port, 8080);
        assert_eq!(first.node.address, "127.0.0.1");
        assert_eq!(first.checks.len(), 2);
        assert!(first.checks.iter().all(Check::is_passing));
        let ext = entries
            .iter()
            .find(|e| e.service.id == "orders-ext")
            .expect("orders-ext in fixture");
        assert_eq!(ext.service.address, "");
        assert_eq!(ext.node.address, "203.0.113.5");
    }

    #[test]
    fn decodes_an_absent_service_and_nulls() {
        assert!(decode_health_service(ABSENT.as_bytes())
            .expect("[]")
            .is_empty());
        assert!(decode_health_service(b"null").expect("null").is_empty());
        let entries = decode_health_service(
            br#"[{"Node":null,"Service":{"ID":"x","Service":"s","Tags":null,"Port":1},"Checks":null}]"#,
        )
        .expect("nulls decode");
        assert!(entries[0].service.tags.is_empty());
        assert!(entries[0].checks.is_empty());
        assert_eq!(entries[0].node.address, "");
    }

    #[test]
    fn rejects_what_is_not_json_of_that_shape() {
        assert!(decode_health_service(b"{\"error\":1}").is_err());
        assert!(decode_catalog_services(b"[]").is_err());
        assert!(decode_health_service(b"<html>").is_err());
    }

    #[test]
    fn index_rules() {
        // Normal progress, and a timeout that returns the same index.
        assert_eq!(next_index(0, 11), 11);
        assert_eq!(next_index(11, 42), 42);
        assert_eq!(next_index(42, 42), 42);
        // Backwards: reset (then held at 1, which never busy-loops).
        assert_eq!(next_index(42, 7), 1);
        // A zero index is never sent back as "block on 0".
        assert_eq!(next_index(0, 0), 1);
        assert_eq!(next_index(5, 0), 1);
    }
}
