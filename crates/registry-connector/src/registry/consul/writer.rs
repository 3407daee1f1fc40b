//! The Kubernetes → Consul writer: registers Kubernetes Services as Consul services on
//! one synthetic node per connector, in batched transactions.
//!
//! - **One node** (`--consul-node-name`, `k8s-sync` by default, as consul-k8s): every
//!   instance this connector registers is a service on it, so reading what we own is
//!   one request (`/v1/catalog/node/<node>`) and watching it is one blocking query.
//! - **Ownership** is in each service: the `--k8s-tag` tag and the meta
//!   `external-source=kubernetes` and `registry-connector-id=<id>`. A service on the node
//!   without them (another connector's, an operator's) is never read as ours, so never
//!   modified or removed. Instances of the same name on other nodes (the VMs' own) are
//!   a different set of entries of the same Consul service: left alone, and the name is
//!   reported as shared.
//! - **Writes** go through `/v1/txn`: up to 64 operations per request, all or nothing.
//!   A ready instance is one operation (a service without checks is healthy in Consul);
//!   an instance that is or was not ready also carries a readiness check (passing or
//!   critical) with no definition: Consul never runs it, the connector sets its status.
//!   Removing a service removes its check with it.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::api::{self, NodeServices};
use super::config::ConsulConfig;
use super::error::ConsulError;
use super::http::ConsulHttp;
use super::metrics::ConsulMetrics;
use crate::export::model::meta_keys;
use crate::export::{Health, Instance, Registered, RegistryWriter, ServiceKey, Write};

/// Consul 1.8's limit of operations in one transaction.
pub const MAX_TXN_OPS: usize = 64;

/// The name of the readiness check in Consul's UI.
const CHECK_NAME: &str = "Kubernetes readiness";

/// Settings of the writer beyond the Consul connection.
#[derive(Clone, Debug)]
pub struct ConsulWriterConfig {
    /// The `--connector-id` written into every registration.
    pub connector_id: String,
    /// The synthetic node every instance is registered on.
    pub node_name: String,
    /// The tag on every registration (the Consul → Kubernetes direction skips it).
    pub k8s_tag: String,
    /// The `wait` of the blocking query that watches the node.
    pub wait: Duration,
}

impl Default for ConsulWriterConfig {
    fn default() -> Self {
        Self {
            connector_id: "default".into(),
            node_name: "k8s-sync".into(),
            k8s_tag: "k8s".into(),
            wait: Duration::from_secs(300),
        }
    }
}

/// The writer (see the module documentation).
pub struct ConsulWriter {
    http: ConsulHttp,
    cfg: ConsulWriterConfig,
    /// Whether the node is registered (a transaction registers it first when not).
    node_exists: AtomicBool,
    /// Instances that carry a readiness check.
    checks: Mutex<HashSet<String>>,
    /// What we own as last read or written, for telling our own writes from changes
    /// behind our back.
    known: Mutex<BTreeMap<String, Instance>>,
    /// The node watch's index, kept across calls of `changed`.
    watch_index: Mutex<u64>,
    /// `/v1/internal/ui/services` refused once (ACL, a proxy): not asked again.
    no_ui_services: AtomicBool,
}

impl ConsulWriter {
    /// A writer on its own HTTP client, counting into `metrics` (shared with the source
    /// in a `--sync both` process, so that each Consul metric is registered once).
    pub fn new(
        consul: &ConsulConfig,
        cfg: ConsulWriterConfig,
        metrics: Arc<ConsulMetrics>,
    ) -> Result<Self, ConsulError> {
        if cfg.node_name.trim().is_empty() {
            return Err(ConsulError::Config(
                "--consul-node-name must not be empty".into(),
            ));
        }
        if cfg.k8s_tag.trim().is_empty() {
            return Err(ConsulError::Config(
                "--k8s-tag must not be empty when syncing to Consul: it marks the registrations that must never come back into Kubernetes".into(),
            ));
        }
        Ok(Self {
            http: ConsulHttp::new(consul, metrics)?,
            cfg,
            node_exists: AtomicBool::new(false),
            checks: Mutex::new(HashSet::new()),
            known: Mutex::new(BTreeMap::new()),
            watch_index: Mutex::new(0),
            no_ui_services: AtomicBool::new(false),
        })
    }

    fn has_check(&self, id: &str) -> bool {
        lock(&self.checks).contains(id)
    }

    /// Names of `owned` services that also have instances on other nodes.
    async fn shared_names(&self, owned: &BTreeSet<String>) -> BTreeSet<String> {
        if owned.is_empty() || self.no_ui_services.load(Ordering::Relaxed) {
            return BTreeSet::new();
        }
        match self.http.ui_services().await {
            Ok(answer) => answer
                .value
                .into_iter()
                .filter(|s| {
                    owned.contains(&s.name) && s.nodes.iter().any(|n| *n != self.cfg.node_name)
                })
                .map(|s| s.name)
                .collect(),
            Err(
                e @ ConsulError::Status {
                    status: 401 | 403 | 404,
                    ..
                },
            ) => {
                self.no_ui_services.store(true, Ordering::Relaxed);
                warn!(error = %crate::registry::error_chain(&e), "cannot list which nodes each Consul service runs on; shared service names are not reported");
                BTreeSet::new()
            }
            Err(e) => {
                debug!(error = %crate::registry::error_chain(&e), "shared service names not read this time");
                BTreeSet::new()
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RegistryWriter for ConsulWriter {
    const NAME: &'static str = "consul";
    type Error = ConsulError;

    /// The requests are counted in the Consul metrics the runtime registers once.
    fn register_metrics(&self, _registry: &mut prometheus_client::registry::Registry) {}

    /// One operation is kept for the node's own registration.
    fn max_ops_per_request(&self) -> usize {
        MAX_TXN_OPS - 1
    }

    fn cost(&self, write: &Write) -> usize {
        match write {
            Write::Register(i) if i.health == Health::Critical || self.has_check(&i.id) => 2,
            _ => 1,
        }
    }

    /// The tags are compared without the ownership tag, which the writer adds.
    fn normalize(&self, instance: &mut Instance) {
        instance.tags.retain(|t| *t != self.cfg.k8s_tag);
    }

    async fn read(&self) -> Result<Registered, ConsulError> {
        let node = self
            .http
            .catalog_node(&self.cfg.node_name, 0, Duration::ZERO)
            .await?;
        let checks = self.http.health_node(&self.cfg.node_name).await?;
        self.node_exists
            .store(node.value.is_some(), Ordering::Relaxed);
        let owned = owned_instances(node.value.as_ref(), &checks.value, &self.cfg);
        *lock(&self.checks) = owned.with_check.clone();
        *lock(&self.known) = owned
            .instances
            .iter()
            .map(|i| (i.id.clone(), i.clone()))
            .collect();
        let names: BTreeSet<String> = owned.instances.iter().map(|i| i.service.clone()).collect();
        let mut shared = self.shared_names(&names).await;
        shared.extend(owned.foreign_names);
        Ok(Registered {
            instances: owned.instances,
            shared_names: shared,
        })
    }

    async fn apply(&self, writes: &[Write]) -> Result<(), ConsulError> {
        let node_exists = self.node_exists.load(Ordering::Relaxed);
        let ops = {
            let checks = lock(&self.checks);
            txn_ops(writes, &self.cfg, node_exists, |id| checks.contains(id))
        };
        let body = serde_json::to_vec(&ops)
            .map_err(|e| ConsulError::Config(format!("cannot encode a transaction: {e}")))?;
        if let Err(e) = self.http.txn(body.into()).await {
            // The node may be gone (an operator, a Consul that lost its state): the
            // next transaction registers it again (a Node set is idempotent).
            self.node_exists.store(false, Ordering::Relaxed);
            return Err(e);
        }
        self.node_exists.store(true, Ordering::Relaxed);
        let mut checks = lock(&self.checks);
        let mut known = lock(&self.known);
        for write in writes {
            match write {
                Write::Register(i) | Write::SetHealth(i) => {
                    if i.health == Health::Critical || matches!(write, Write::SetHealth(_)) {
                        checks.insert(i.id.clone());
                    }
                    known.insert(i.id.clone(), i.clone());
                }
                Write::Deregister(i) => {
                    checks.remove(&i.id);
                    known.remove(&i.id);
                }
            }
        }
        Ok(())
    }

    /// A blocking query on the node: resolves when its services differ from what this
    /// writer last read or wrote (an operator's deregistration, a Consul that lost its
    /// state), or when Consul's index went backwards (a restarted or restored server).
    async fn changed(&self) {
        let mut failures = 0u32;
        let mut recovering = false;
        loop {
            let index = *lock(&self.watch_index);
            match self
                .http
                .catalog_node(&self.cfg.node_name, index.max(1), self.cfg.wait)
                .await
            {
                Ok(answer) => {
                    failures = 0;
                    let backwards = answer.index < index;
                    *lock(&self.watch_index) = api::next_index(index, answer.index);
                    if backwards {
                        debug!(node = %self.cfg.node_name, "Consul's index went backwards");
                        return;
                    }
                    if index == 0 {
                        if recovering {
                            // Consul answered again after failing: whatever it lost
                            // while down must be read and written back now, not after
                            // the next wait.
                            return;
                        }
                        continue;
                    }
                    if self.differs(answer.value.as_ref()) {
                        // Our own transaction may have been answered after the watch:
                        // give it a moment before calling it a change behind our back.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        if self.differs(answer.value.as_ref()) {
                            return;
                        }
                    }
                }
                Err(e) => {
                    failures += 1;
                    let delay = Duration::from_millis(500 * u64::from(failures.min(20)));
                    debug!(error = %crate::registry::error_chain(&e), retry_in = ?delay, "node watch failed");
                    tokio::time::sleep(delay).await;
                    if failures == 1 {
                        // After an outage, read everything again: Consul may have lost it.
                        *lock(&self.watch_index) = 0;
                        recovering = true;
                    }
                }
            }
        }
    }

    async fn maintain(&self, stop: CancellationToken) {
        stop.cancelled().await
    }
}

impl ConsulWriter {
    /// Whether the node's services (registrations, not health) differ from `known`.
    fn differs(&self, node: Option<&NodeServices>) -> bool {
        let seen = owned_instances(node, &[], &self.cfg).instances;
        let known = lock(&self.known);
        seen.len() != known.len()
            || seen
                .iter()
                .any(|s| known.get(&s.id).is_none_or(|k| !k.same_registration(s)))
    }
}

/// The instances this connector owns on its node, read back into the neutral shape.
#[derive(Debug, Default)]
struct Owned {
    instances: Vec<Instance>,
    /// Owned instances that carry a readiness check.
    with_check: HashSet<String>,
    /// Names of services on our node that are not ours.
    foreign_names: BTreeSet<String>,
}

fn check_id(instance_id: &str) -> String {
    format!("{instance_id}:ready")
}

fn owned_instances(
    node: Option<&NodeServices>,
    checks: &[api::Check],
    cfg: &ConsulWriterConfig,
) -> Owned {
    let mut out = Owned::default();
    let Some(node) = node else { return out };
    for svc in node.services.values() {
        let meta = &svc.meta;
        let ours = meta.get(meta_keys::CONNECTOR) == Some(&cfg.connector_id)
            && meta.get(meta_keys::SOURCE).map(String::as_str) == Some(meta_keys::SOURCE_VALUE)
            && svc.tags.contains(&cfg.k8s_tag);
        let source = match (meta.get(meta_keys::NAMESPACE), meta.get(meta_keys::SERVICE)) {
            (Some(ns), Some(name)) if ours => ServiceKey::new(ns.clone(), name.clone()),
            _ => {
                out.foreign_names.insert(svc.service.clone());
                continue;
            }
        };
        let check = checks
            .iter()
            .find(|c| c.service_id == svc.id && c.check_id == check_id(&svc.id));
        if check.is_some() {
            out.with_check.insert(svc.id.clone());
        }
        let health = match check {
            Some(c) if !c.is_passing() => Health::Critical,
            _ => Health::Passing,
        };
        let mut tags: Vec<String> = svc
            .tags
            .iter()
            .filter(|t| **t != cfg.k8s_tag)
            .cloned()
            .collect();
        tags.sort();
        tags.dedup();
        let ports = meta
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    k.strip_prefix(meta_keys::PORT_PREFIX)?.to_string(),
                    v.parse().ok()?,
                ))
            })
            .collect();
        out.instances.push(Instance {
            id: svc.id.clone(),
            service: svc.service.clone(),
            source,
            address: svc.address.clone(),
            port: u16::try_from(svc.port).unwrap_or(0),
            ports,
            health,
            tags,
            meta: meta
                .iter()
                .filter(|(k, _)| !meta_keys::is_reserved(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        });
    }
    out.instances.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// The transaction operations for `writes`, the node's registration first when it is
/// missing.
fn txn_ops(
    writes: &[Write],
    cfg: &ConsulWriterConfig,
    node_exists: bool,
    has_check: impl Fn(&str) -> bool,
) -> Vec<Value> {
    let node = cfg.node_name.as_str();
    let mut ops = Vec::with_capacity(writes.len() + 1);
    if !node_exists {
        ops.push(json!({"Node": {"Verb": "set", "Node": {
            "Node": node,
            // Loopback, as consul-k8s: the node is a placeholder, never contacted; the
            // instances carry their own addresses.
            "Address": "127.0.0.1",
            "Meta": {meta_keys::SOURCE: meta_keys::SOURCE_VALUE},
        }}}));
    }
    let check = |i: &Instance| {
        json!({"Check": {"Verb": "set", "Check": {
            "Node": node,
            "CheckID": check_id(&i.id),
            "Name": CHECK_NAME,
            "Status": i.health.as_str(),
            "ServiceID": i.id,
            "Notes": "the Kubernetes endpoint's ready condition, set by registry-connector (never run by Consul)",
        }}})
    };
    for write in writes {
        match write {
            Write::Register(i) => {
                ops.push(json!({"Service": {"Verb": "set", "Node": node, "Service": service_body(i, cfg)}}));
                if i.health == Health::Critical || has_check(&i.id) {
                    ops.push(check(i));
                }
            }
            Write::SetHealth(i) => ops.push(check(i)),
            Write::Deregister(i) => {
                ops.push(json!({"Service": {"Verb": "delete", "Node": node, "Service": {"ID": i.id, "Service": i.service}}}))
            }
        }
    }
    ops
}

fn service_body(i: &Instance, cfg: &ConsulWriterConfig) -> Value {
    let mut tags = vec![cfg.k8s_tag.clone()];
    tags.extend(i.tags.iter().filter(|t| **t != cfg.k8s_tag).cloned());
    let mut meta: BTreeMap<String, String> = i.meta.clone();
    meta.insert(meta_keys::SOURCE.into(), meta_keys::SOURCE_VALUE.into());
    meta.insert(meta_keys::NAMESPACE.into(), i.source.namespace.clone());
    meta.insert(meta_keys::SERVICE.into(), i.source.name.clone());
    meta.insert(meta_keys::CONNECTOR.into(), cfg.connector_id.clone());
    for (name, port) in &i.ports {
        meta.insert(
            format!("{}{name}", meta_keys::PORT_PREFIX),
            port.to_string(),
        );
    }
    json!({
        "ID": i.id,
        "Service": i.service,
        "Tags": tags,
        "Address": i.address,
        "Port": i.port,
        "Meta": meta,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ConsulWriterConfig {
        ConsulWriterConfig::default()
    }

    fn inst(id: &str, health: Health) -> Instance {
        Instance {
            id: id.into(),
            service: "web".into(),
            source: ServiceKey::new("shop", "web"),
            address: "192.0.2.1".into(),
            port: 8080,
            ports: BTreeMap::from([("http".to_string(), 8080), ("admin".to_string(), 9090)]),
            health,
            tags: vec!["blue".into()],
            meta: BTreeMap::from([("team".to_string(), "shop".to_string())]),
        }
    }

    /// What Consul would hold after `ops`: services by ID and checks, as its answers
    /// decode.
    fn apply_locally(ops: &[Value]) -> (NodeServices, Vec<api::Check>) {
        let mut services = serde_json::Map::new();
        let mut checks = Vec::new();
        for op in ops {
            if let Some(s) = op.get("Service") {
                let body = s["Service"].clone();
                let id = body["ID"].as_str().unwrap().to_string();
                match s["Verb"].as_str() {
                    Some("set") => {
                        services.insert(id, body);
                    }
                    _ => {
                        services.remove(&id);
                    }
                }
            }
            if let Some(c) = op.get("Check") {
                let body = &c["Check"];
                checks.push(json!({"CheckID": body["CheckID"], "ServiceID": body["ServiceID"], "Status": body["Status"]}));
            }
        }
        let node: NodeServices = serde_json::from_value(json!({"Services": services})).unwrap();
        let checks: Vec<api::Check> = serde_json::from_value(Value::Array(checks)).unwrap();
        (node, checks)
    }

    #[test]
    fn registrations_read_back_equal() {
        let writes = vec![
            Write::Register(inst("web-1", Health::Passing)),
            Write::Register(inst("web-2", Health::Critical)),
        ];
        let ops = txn_ops(&writes, &cfg(), false, |_| false);
        // The node, a service for the ready one, a service and a check for the other.
        assert_eq!(ops.len(), 4);
        assert_eq!(ops[0]["Node"]["Node"]["Node"], "k8s-sync");
        let (node, checks) = apply_locally(&ops);
        let owned = owned_instances(Some(&node), &checks, &cfg());
        assert_eq!(
            owned.instances,
            vec![
                inst("web-1", Health::Passing),
                inst("web-2", Health::Critical)
            ]
        );
        assert_eq!(owned.with_check, HashSet::from(["web-2".to_string()]));
        // So the plan from this state to the same desired state is empty.
        let desired = [
            inst("web-1", Health::Passing),
            inst("web-2", Health::Critical),
        ];
        assert!(crate::export::plan::plan(&desired, &owned.instances).is_empty());
    }

    #[test]
    fn health_changes_are_one_check_operation() {
        let ops = txn_ops(
            &[Write::SetHealth(inst("web-1", Health::Critical))],
            &cfg(),
            true,
            |_| false,
        );
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0]["Check"]["Check"]["Status"], "critical");
        // A re-registration of an instance that has a check keeps it in step.
        let ops = txn_ops(
            &[Write::Register(inst("web-1", Health::Passing))],
            &cfg(),
            true,
            |id| id == "web-1",
        );
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[1]["Check"]["Check"]["Status"], "passing");
        // Removal names the service too (Consul requires it) and carries no check.
        let ops = txn_ops(
            &[Write::Deregister(inst("web-1", Health::Passing))],
            &cfg(),
            true,
            |_| true,
        );
        assert_eq!(
            ops,
            vec![
                json!({"Service": {"Verb": "delete", "Node": "k8s-sync", "Service": {"ID": "web-1", "Service": "web"}}})
            ]
        );
    }

    #[test]
    fn only_our_registrations_are_owned() {
        let ours = service_body(&inst("web-1", Health::Passing), &cfg());
        let other_connector = service_body(
            &inst("web-2", Health::Passing),
            &ConsulWriterConfig {
                connector_id: "other".into(),
                ..cfg()
            },
        );
        let untagged = json!({"ID": "web-3", "Service": "web", "Tags": [], "Meta": ours["Meta"].clone(), "Port": 1});
        let hand_made = json!({"ID": "db", "Service": "db", "Port": 5432});
        let node: NodeServices = serde_json::from_value(json!({"Services": {
            "web-1": ours, "web-2": other_connector, "web-3": untagged, "db": hand_made
        }}))
        .unwrap();
        let owned = owned_instances(Some(&node), &[], &cfg());
        assert_eq!(
            owned
                .instances
                .iter()
                .map(|i| i.id.as_str())
                .collect::<Vec<_>>(),
            vec!["web-1"]
        );
        assert_eq!(
            owned.foreign_names,
            BTreeSet::from(["web".to_string(), "db".to_string()])
        );
        assert!(owned_instances(None, &[], &cfg()).instances.is_empty());
    }

    #[test]
    fn the_ownership_tag_is_added_once_and_never_compared() {
        let mut i = inst("web-1", Health::Passing);
        i.tags = vec!["k8s".into(), "blue".into()];
        let body = service_body(&i, &cfg());
        assert_eq!(body["Tags"], json!(["k8s", "blue"]));
        assert_eq!(body["Meta"]["registry-connector-id"], "default");
        assert_eq!(body["Meta"]["port-admin"], "9090");
    }
}
