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
//! - **A rolled-back transaction** (409) names its failing operations: those writes
//!   are dropped (returned as rejected, for the engine to report) and the rest is sent
//!   once more, so that one instance Consul refuses never keeps its batch out
//!   ([`super::txn`] maps the operations back to the writes).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::api::{self, NodeServices};
use super::config::ConsulConfig;
use super::error::ConsulError;
use super::http::ConsulHttp;
use super::metrics::ConsulMetrics;
use super::txn::{check_id, Txn};
use crate::export::model::meta_keys;
use crate::export::{
    Applied, Health, Instance, Registered, RegistryWriter, Rejected, ServiceKey, Write,
};

/// Consul 1.8's limit of operations in one transaction.
pub const MAX_TXN_OPS: usize = 64;

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

    async fn apply(&self, writes: &[Write]) -> Result<Applied, ConsulError> {
        self.apply_with(writes, |body| self.http.txn(body)).await
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
    /// [`RegistryWriter::apply`] through `send` (one `/v1/txn` request per call).
    ///
    /// A transaction Consul rolls back (409) names its failing operations: their
    /// writes are dropped and returned as rejected, and the rest is sent once more, the
    /// node's registration first (idempotent, and the cure when the node is what went
    /// missing). Anything else, or a rollback that blames no write, or a second
    /// failure, fails the whole batch as before: the engine reads the registry again
    /// and retries.
    async fn apply_with<F, Fut>(&self, writes: &[Write], send: F) -> Result<Applied, ConsulError>
    where
        F: Fn(bytes::Bytes) -> Fut,
        Fut: Future<Output = Result<(), ConsulError>>,
    {
        let first = self.txn(writes, !self.node_exists.load(Ordering::Relaxed));
        let errors = match send(encode(&first)?).await {
            Ok(()) => {
                self.applied(writes.iter());
                return Ok(Applied::default());
            }
            Err(ConsulError::TxnRolledBack { errors }) => errors,
            Err(e) => return Err(self.failed(e)),
        };
        let blamed = match first.blame(&errors) {
            Ok(blamed) => blamed,
            Err(why) => {
                debug!(%why, "a rolled-back transaction that blames no single write");
                return Err(self.failed(ConsulError::TxnRolledBack { errors }));
            }
        };
        let rest: Vec<Write> = writes
            .iter()
            .enumerate()
            .filter(|(i, _)| !blamed.contains_key(i))
            .map(|(_, w)| w.clone())
            .collect();
        let rejected: Vec<Rejected> = blamed
            .into_iter()
            .map(|(index, reason)| Rejected { index, reason })
            .collect();
        debug!(
            rejected = rejected.len(),
            retried = rest.len(),
            "Consul rolled a transaction back: sending it again without the refused writes"
        );
        if !rest.is_empty() {
            let retry = self.txn(&rest, true);
            if let Err(e) = send(encode(&retry)?).await {
                return Err(self.failed(e));
            }
            self.applied(rest.iter());
        }
        Ok(Applied { rejected })
    }

    fn txn(&self, writes: &[Write], with_node: bool) -> Txn {
        let checks = lock(&self.checks);
        Txn::new(writes, &self.cfg, with_node, |id| checks.contains(id))
    }

    /// A transaction that did not go through: the node may be gone (an operator, a
    /// Consul that lost its state), so the next one registers it again (a Node set is
    /// idempotent).
    fn failed(&self, e: ConsulError) -> ConsulError {
        self.node_exists.store(false, Ordering::Relaxed);
        e
    }

    /// Keeps the checks and the known registrations in step with writes Consul took.
    fn applied<'a>(&self, writes: impl Iterator<Item = &'a Write>) {
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
    }

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

fn encode(txn: &Txn) -> Result<bytes::Bytes, ConsulError> {
    serde_json::to_vec(&txn.ops)
        .map(bytes::Bytes::from)
        .map_err(|e| ConsulError::Config(format!("cannot encode a transaction: {e}")))
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

#[cfg(test)]
mod tests {
    use super::super::txn::{service_body, TxnErrors};
    use super::*;
    use serde_json::{json, Value};

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
        let ops = Txn::new(&writes, &cfg(), true, |_| false).ops;
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
        let ops = Txn::new(
            &[Write::SetHealth(inst("web-1", Health::Critical))],
            &cfg(),
            false,
            |_| false,
        )
        .ops;
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0]["Check"]["Check"]["Status"], "critical");
        // A re-registration of an instance that has a check keeps it in step.
        let ops = Txn::new(
            &[Write::Register(inst("web-1", Health::Passing))],
            &cfg(),
            false,
            |id| id == "web-1",
        )
        .ops;
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[1]["Check"]["Check"]["Status"], "passing");
        // Removal names the service too (Consul requires it) and carries no check.
        let ops = Txn::new(
            &[Write::Deregister(inst("web-1", Health::Passing))],
            &cfg(),
            false,
            |_| true,
        )
        .ops;
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

    /// A fake `/v1/txn`: answers the requests in turn and records the operations sent.
    #[derive(Default)]
    struct FakeTxn {
        answers: Mutex<std::collections::VecDeque<Result<(), ConsulError>>>,
        sent: Mutex<Vec<Vec<Value>>>,
    }

    impl FakeTxn {
        fn answering(answers: Vec<Result<(), ConsulError>>) -> Self {
            Self {
                answers: Mutex::new(answers.into()),
                sent: Mutex::default(),
            }
        }

        async fn send(&self, body: bytes::Bytes) -> Result<(), ConsulError> {
            let ops: Vec<Value> = serde_json::from_slice(&body).expect("a JSON array");
            lock(&self.sent).push(ops);
            lock(&self.answers)
                .pop_front()
                .expect("an answer per request")
        }

        fn sent(&self) -> Vec<Vec<Value>> {
            lock(&self.sent).clone()
        }
    }

    fn rolled_back(body: &str) -> Result<(), ConsulError> {
        Err(ConsulError::TxnRolledBack {
            errors: TxnErrors::decode(body.as_bytes()),
        })
    }

    fn writer() -> ConsulWriter {
        let consul = ConsulConfig::new("127.0.0.1:8500");
        ConsulWriter::new(&consul, cfg(), Arc::default()).expect("builds")
    }

    /// What each operation of a transaction is: `node`, `svc:<id>`, `check:<id>`.
    fn shape(ops: &[Value]) -> Vec<String> {
        ops.iter()
            .map(|op| {
                if op.get("Node").is_some() {
                    "node".to_string()
                } else if let Some(s) = op.get("Service") {
                    format!("svc:{}", s["Service"]["ID"].as_str().unwrap_or("?"))
                } else {
                    format!(
                        "check:{}",
                        op["Check"]["Check"]["ServiceID"].as_str().unwrap_or("?")
                    )
                }
            })
            .collect()
    }

    /// A ready instance, a critical one (a service and a check), another ready one.
    fn three() -> Vec<Write> {
        vec![
            Write::Register(inst("a", Health::Passing)),
            Write::Register(inst("b", Health::Critical)),
            Write::Register(inst("c", Health::Passing)),
        ]
    }

    #[tokio::test]
    async fn a_rolled_back_transaction_is_sent_again_without_the_refused_writes() {
        let writer = writer();
        // Consul's 409 for the critical instance: its service (2) and check (3), one
        // past the node's registration (0), which this first transaction carries.
        let txn = FakeTxn::answering(vec![
            rolled_back(
                r#"{"Errors":[{"OpIndex":2,"What":"Permission denied"},{"OpIndex":3,"What":"Unknown service ID"}],"Results":null}"#,
            ),
            Ok(()),
        ]);
        let applied = writer
            .apply_with(&three(), |body| txn.send(body))
            .await
            .expect("the rest is written");
        assert_eq!(
            applied.rejected,
            vec![Rejected {
                index: 1,
                reason: "Permission denied; Unknown service ID".into()
            }]
        );
        let sent = txn.sent();
        assert_eq!(
            sent.iter().map(|ops| shape(ops)).collect::<Vec<_>>(),
            vec![
                vec!["node", "svc:a", "svc:b", "check:b", "svc:c"],
                vec!["node", "svc:a", "svc:c"],
            ]
        );
        assert_eq!(
            lock(&writer.known).keys().collect::<Vec<_>>(),
            ["a", "c"],
            "only what Consul took is known"
        );
        assert!(!writer.has_check("b"));
        assert!(writer.node_exists.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn without_the_node_registration_the_indices_are_not_shifted() {
        let writer = writer();
        writer.node_exists.store(true, Ordering::Relaxed);
        // a (0), b (1), b's check (2), c (3).
        let txn = FakeTxn::answering(vec![
            rolled_back(
                r#"{"Errors":[{"OpIndex":3,"What":"Invalid service address"}],"Results":null}"#,
            ),
            Ok(()),
        ]);
        let applied = writer
            .apply_with(&three(), |body| txn.send(body))
            .await
            .expect("the rest is written");
        assert_eq!(
            applied.rejected,
            vec![Rejected {
                index: 2,
                reason: "Invalid service address".into()
            }]
        );
        let sent = txn.sent();
        assert_eq!(shape(&sent[0]), ["svc:a", "svc:b", "check:b", "svc:c"]);
        assert_eq!(shape(&sent[1]), ["node", "svc:a", "svc:b", "check:b"]);
    }

    #[tokio::test]
    async fn a_node_gone_behind_our_back_drops_nothing() {
        let writer = writer();
        writer.node_exists.store(true, Ordering::Relaxed);
        let missing = r#"{"Errors":[{"OpIndex":0,"What":"Missing node registration"},{"OpIndex":1,"What":"Missing node registration"},{"OpIndex":2,"What":"Missing node registration"},{"OpIndex":3,"What":"Missing node registration"}],"Results":null}"#;
        let txn = FakeTxn::answering(vec![rolled_back(missing), Ok(())]);
        let applied = writer
            .apply_with(&three(), |body| txn.send(body))
            .await
            .expect("written with the node");
        assert!(applied.rejected.is_empty());
        assert_eq!(
            shape(&txn.sent()[1]),
            ["node", "svc:a", "svc:b", "check:b", "svc:c"]
        );
    }

    #[tokio::test]
    async fn a_rollback_that_blames_no_write_or_a_second_one_fails_the_batch() {
        // Consul refused the node's own registration: nothing can go without it.
        let writer = writer();
        let txn = FakeTxn::answering(vec![rolled_back(
            r#"{"Errors":[{"OpIndex":0,"What":"Invalid node name"}],"Results":null}"#,
        )]);
        let err = writer
            .apply_with(&three(), |body| txn.send(body))
            .await
            .expect_err("the batch fails");
        assert!(matches!(err, ConsulError::TxnRolledBack { .. }), "{err}");
        assert_eq!(txn.sent().len(), 1, "not sent again");
        assert!(lock(&writer.known).is_empty());

        // The retry is tried once only.
        let writer = self::writer();
        let txn = FakeTxn::answering(vec![
            rolled_back(r#"{"Errors":[{"OpIndex":1,"What":"Permission denied"}],"Results":null}"#),
            rolled_back(r#"{"Errors":[{"OpIndex":1,"What":"Permission denied"}],"Results":null}"#),
        ]);
        assert!(writer
            .apply_with(&three(), |body| txn.send(body))
            .await
            .is_err());
        assert_eq!(txn.sent().len(), 2);
        assert!(!writer.node_exists.load(Ordering::Relaxed));
        assert!(lock(&writer.known).is_empty());
    }
}
