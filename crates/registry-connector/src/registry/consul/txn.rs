//! The Consul transaction a batch of export writes becomes, and what Consul's answer
//! says about each write when it rolls the transaction back. Pure functions.
//!
//! `/v1/txn` is all or nothing: when one operation fails, Consul answers 409 with
//! `{"Errors": [{"OpIndex": N, "What": "..."}], "Results": null}`, one entry per failing
//! operation (Consul runs them all before rolling back), `OpIndex` counting the
//! operations as sent. One instance Consul refuses (a name it rejects, an ACL that
//! denies one service) must not keep every other instance of the batch out, so the
//! writer maps each index back to the write it came from, drops those writes and sends
//! the rest again. The map is kept beside the operations because it is not one to one:
//! the node's registration may come first (shifting every index by one), and a critical
//! instance is a service and a check operation.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_json::{json, Value};

use super::writer::ConsulWriterConfig;
use crate::export::model::meta_keys;
use crate::export::{Health, Instance, Write};

/// The name of the readiness check in Consul's UI.
const CHECK_NAME: &str = "Kubernetes readiness";

/// Consul's text for an operation on a node that is not registered (its state store's
/// `ErrMissingNode`): what every operation of a transaction says when the node went
/// away behind the writer's back.
const MISSING_NODE: &str = "Missing node registration";

/// The id of an instance's readiness check.
pub fn check_id(instance_id: &str) -> String {
    format!("{instance_id}:ready")
}

/// Where one operation of a transaction comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// The node's own registration.
    Node,
    /// The write at this index of the batch.
    Write(usize),
}

/// The operations of one transaction, and where each comes from.
#[derive(Debug)]
pub struct Txn {
    pub ops: Vec<Value>,
    origins: Vec<Origin>,
}

impl Txn {
    /// The operations for `writes`, the node's registration first when `with_node`.
    pub fn new(
        writes: &[Write],
        cfg: &ConsulWriterConfig,
        with_node: bool,
        has_check: impl Fn(&str) -> bool,
    ) -> Self {
        let node = cfg.node_name.as_str();
        let mut txn = Self {
            ops: Vec::with_capacity(writes.len() + 1),
            origins: Vec::with_capacity(writes.len() + 1),
        };
        if with_node {
            txn.push(
                Origin::Node,
                json!({"Node": {"Verb": "set", "Node": {
                    "Node": node,
                    // Loopback, as consul-k8s: the node is a placeholder, never
                    // contacted; the instances carry their own addresses.
                    "Address": "127.0.0.1",
                    "Meta": {meta_keys::SOURCE: meta_keys::SOURCE_VALUE},
                }}}),
            );
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
        for (index, write) in writes.iter().enumerate() {
            let origin = Origin::Write(index);
            match write {
                Write::Register(i) => {
                    txn.push(
                        origin,
                        json!({"Service": {"Verb": "set", "Node": node, "Service": service_body(i, cfg)}}),
                    );
                    if i.health == Health::Critical || has_check(&i.id) {
                        txn.push(origin, check(i));
                    }
                }
                Write::SetHealth(i) => txn.push(origin, check(i)),
                Write::Deregister(i) => txn.push(
                    origin,
                    json!({"Service": {"Verb": "delete", "Node": node, "Service": {"ID": i.id, "Service": i.service}}}),
                ),
            }
        }
        txn
    }

    fn push(&mut self, origin: Origin, op: Value) {
        self.ops.push(op);
        self.origins.push(origin);
    }

    /// Whether the node's registration is the first operation.
    pub fn registers_node(&self) -> bool {
        self.origins.first() == Some(&Origin::Node)
    }

    /// Which writes the rollback `errors` blame, by index in the batch, with Consul's
    /// reasons. An error naming the missing node blames no write when this transaction
    /// did not register the node (the writer thought it was there): registering the
    /// node is the cure, not dropping the write. Nothing can be dropped when Consul
    /// refused the node itself, or gave no usable index: the whole batch failed.
    pub fn blame(&self, errors: &TxnErrors) -> Result<BTreeMap<usize, String>, Unattributed> {
        if errors.ops.is_empty() {
            return Err(Unattributed::NoIndex);
        }
        let mut blamed: BTreeMap<usize, String> = BTreeMap::new();
        for error in &errors.ops {
            let index = error.op_index.ok_or(Unattributed::NoIndex)?;
            match self.origins.get(index) {
                None => return Err(Unattributed::OutOfRange(index)),
                Some(Origin::Node) => return Err(Unattributed::Node),
                Some(Origin::Write(_))
                    if !self.registers_node() && error.what.contains(MISSING_NODE) => {}
                Some(Origin::Write(write)) => {
                    let reason = blamed.entry(*write).or_default();
                    if !reason.is_empty() {
                        reason.push_str("; ");
                    }
                    reason.push_str(&error.what);
                }
            }
        }
        Ok(blamed)
    }
}

/// Why the rollback blames no particular write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unattributed {
    /// The answer had no operation index (not Consul's document, or none in it).
    #[error("the answer names no operation")]
    NoIndex,
    /// An index past the operations sent.
    #[error("the answer names operation {0}, which was not sent")]
    OutOfRange(usize),
    /// Consul refused the node's registration, which every other operation needs.
    #[error("Consul refused the node's registration")]
    Node,
}

/// The body of a service registration.
pub fn service_body(i: &Instance, cfg: &ConsulWriterConfig) -> Value {
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

/// One failing operation of a rolled-back transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TxnOpError {
    /// The operation's index in the transaction as sent (absent: not attributable).
    #[serde(default)]
    pub op_index: Option<usize>,
    #[serde(default)]
    pub what: String,
}

/// What a 409 of `/v1/txn` says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxnErrors {
    pub ops: Vec<TxnOpError>,
    /// The body, shortened, when it is not Consul's document (a proxy's page).
    pub raw: Option<String>,
}

impl TxnErrors {
    /// Decodes a 409 body; never fails (what does not decode is kept as text).
    pub fn decode(body: &[u8]) -> Self {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Answer {
            #[serde(default, deserialize_with = "super::api::null_as_default")]
            errors: Vec<TxnOpError>,
        }
        match serde_json::from_slice::<Answer>(body) {
            Ok(a) if !a.errors.is_empty() => Self {
                ops: a.errors,
                raw: None,
            },
            _ => Self {
                ops: Vec::new(),
                raw: Some(crate::registry::error_body(body)),
            },
        }
    }
}

impl fmt::Display for TxnErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(raw) = &self.raw {
            return f.write_str(raw);
        }
        for (n, e) in self.ops.iter().enumerate() {
            if n > 0 {
                f.write_str("; ")?;
            }
            match e.op_index {
                Some(index) => write!(f, "operation {index}: {}", e.what)?,
                None => write!(f, "operation ?: {}", e.what)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::ServiceKey;

    fn inst(id: &str, health: Health) -> Instance {
        Instance {
            id: id.into(),
            service: "web".into(),
            source: ServiceKey::new("shop", "web"),
            address: "192.0.2.1".into(),
            port: 8080,
            ports: BTreeMap::new(),
            health,
            tags: vec![],
            meta: BTreeMap::new(),
        }
    }

    fn errors(body: &str) -> TxnErrors {
        TxnErrors::decode(body.as_bytes())
    }

    #[test]
    fn consuls_409_body_decodes() {
        let e = errors(
            r#"{"Errors":[{"OpIndex":2,"What":"Invalid service name"},{"OpIndex":0,"What":"x"}],"Results":null}"#,
        );
        assert_eq!(e.ops.len(), 2);
        assert_eq!(e.ops[0].op_index, Some(2));
        assert_eq!(e.ops[0].what, "Invalid service name");
        assert_eq!(
            e.to_string(),
            "operation 2: Invalid service name; operation 0: x"
        );
        let proxy = errors("<html>conflict</html>");
        assert!(proxy.ops.is_empty());
        assert_eq!(proxy.to_string(), "<html>conflict</html>");
        assert!(errors(r#"{"Errors":null,"Results":null}"#).ops.is_empty());
    }

    /// A ready instance, a critical one (a service and a check) and another ready one.
    fn writes() -> Vec<Write> {
        vec![
            Write::Register(inst("a", Health::Passing)),
            Write::Register(inst("b", Health::Critical)),
            Write::Register(inst("c", Health::Passing)),
        ]
    }

    #[test]
    fn indices_map_back_to_writes_past_the_node_registration() {
        let cfg = ConsulWriterConfig::default();
        // node, a, b, b's check, c
        let txn = Txn::new(&writes(), &cfg, true, |_| false);
        assert_eq!(txn.ops.len(), 5);
        let blamed = txn
            .blame(&errors(
                r#"{"Errors":[{"OpIndex":2,"What":"denied"},{"OpIndex":3,"What":"no service"}]}"#,
            ))
            .expect("attributable");
        assert_eq!(
            blamed,
            BTreeMap::from([(1, "denied; no service".to_string())])
        );
        // Without the node, the same write is one index earlier.
        let txn = Txn::new(&writes(), &cfg, false, |_| false);
        let blamed = txn
            .blame(&errors(r#"{"Errors":[{"OpIndex":3,"What":"denied"}]}"#))
            .expect("attributable");
        assert_eq!(blamed, BTreeMap::from([(2, "denied".to_string())]));
    }

    #[test]
    fn what_blames_no_write_fails_the_whole_batch() {
        let cfg = ConsulWriterConfig::default();
        let txn = Txn::new(&writes(), &cfg, true, |_| false);
        assert_eq!(
            txn.blame(&errors(r#"{"Errors":[{"OpIndex":0,"What":"bad node"}]}"#)),
            Err(Unattributed::Node)
        );
        assert_eq!(
            txn.blame(&errors(r#"{"Errors":[{"OpIndex":5,"What":"?"}]}"#)),
            Err(Unattributed::OutOfRange(5))
        );
        assert_eq!(
            txn.blame(&errors(r#"{"Errors":[{"What":"?"}]}"#)),
            Err(Unattributed::NoIndex)
        );
        assert_eq!(txn.blame(&errors("busy")), Err(Unattributed::NoIndex));
    }

    #[test]
    fn a_missing_node_blames_no_write_unless_it_was_registered() {
        let cfg = ConsulWriterConfig::default();
        let body = r#"{"Errors":[{"OpIndex":0,"What":"Missing node registration"},{"OpIndex":1,"What":"Missing node registration"}]}"#;
        let assumed = Txn::new(&writes(), &cfg, false, |_| false);
        assert!(!assumed.registers_node());
        assert_eq!(assumed.blame(&errors(body)), Ok(BTreeMap::new()));
        let registered = Txn::new(&writes(), &cfg, true, |_| false);
        assert_eq!(
            registered.blame(&errors(
                r#"{"Errors":[{"OpIndex":1,"What":"Missing node registration"}]}"#
            )),
            Ok(BTreeMap::from([(
                0,
                "Missing node registration".to_string()
            )]))
        );
    }
}
