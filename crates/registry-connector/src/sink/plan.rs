//! Dry runs: the writes a sync would make, recorded instead of sent.
//!
//! In plan mode the [`super::writer::Writer`] records each create, update and delete
//! (with `--diff`, each update with the fields it would change) and answers as if the
//! apiserver had accepted it; the reconcile logic runs unchanged, so the plan is exactly
//! what a real run would do first.

use std::fmt;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::metrics::{Kind, Verb};

/// One write that would be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedWrite {
    pub verb: Verb,
    pub kind: Kind,
    pub name: String,
    /// For updates: `path: live -> desired` for every field we own that differs.
    pub changes: Vec<String>,
}

impl fmt::Display for PlannedWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = match self.verb {
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Delete => "delete",
        };
        write!(f, "{verb:<6} {:<13} {}", self.kind.as_str(), self.name)
    }
}

/// The recorded plan, shared between the writer and whoever prints it.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    writes: Arc<Mutex<Vec<PlannedWrite>>>,
    /// Whether updates list the fields that would change (`--diff`). The caches keep no
    /// whole objects, so each listed update costs a read of the live object.
    changes: bool,
}

impl Plan {
    /// A plan whose updates list the fields that would change.
    pub fn with_changes() -> Self {
        Self {
            changes: true,
            ..Self::default()
        }
    }

    pub fn shows_changes(&self) -> bool {
        self.changes
    }

    pub fn record(&self, write: PlannedWrite) {
        self.writes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(write);
    }

    /// The writes, in a stable order (kind, name, verb).
    pub fn writes(&self) -> Vec<PlannedWrite> {
        let mut writes = self
            .writes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        writes.sort_by(|a, b| {
            (a.kind.as_str(), &a.name, a.verb.as_str()).cmp(&(
                b.kind.as_str(),
                &b.name,
                b.verb.as_str(),
            ))
        });
        writes.dedup();
        writes
    }
}

/// The fields of `desired` whose value differs in `live`, as `path: live -> desired`.
/// Only paths present in `desired` are compared: the apiserver adds defaults and other
/// managers add fields, none of which a sync would change. Lists are compared whole.
pub fn changed_fields(desired: &Value, live: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk("", desired, live, &mut out);
    out
}

fn walk(path: &str, desired: &Value, live: &Value, out: &mut Vec<String>) {
    match (desired, live) {
        (Value::Object(want), Value::Object(have)) => {
            for (key, want_value) in want {
                let sub = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                walk(&sub, want_value, have.get(key).unwrap_or(&Value::Null), out);
            }
        }
        (want, have) if want != have => out.push(format!("{path}: {have} -> {want}")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_differing_owned_fields_are_listed() {
        let desired = json!({"metadata": {"labels": {"a": "1"}}, "spec": {"ports": [{"port": 80}], "type": "ClusterIP"}});
        let live = json!({"metadata": {"labels": {"a": "1", "other": "x"}, "uid": "u"},
                          "spec": {"ports": [{"port": 81}], "type": "ClusterIP", "sessionAffinity": "None"}});
        assert_eq!(
            changed_fields(&desired, &live),
            vec![r#"spec.ports: [{"port":81}] -> [{"port":80}]"#.to_string()]
        );
    }

    #[test]
    fn a_missing_field_shows_as_null() {
        let desired = json!({"metadata": {"annotations": {"k": "v"}}});
        let live = json!({"metadata": {}});
        assert_eq!(
            changed_fields(&desired, &live),
            vec![r#"metadata.annotations: null -> {"k":"v"}"#.to_string()]
        );
    }

    #[test]
    fn the_plan_is_sorted_and_deduplicated() {
        let plan = Plan::default();
        let w = |verb, name: &str| PlannedWrite {
            verb,
            kind: Kind::Service,
            name: name.into(),
            changes: vec![],
        };
        plan.record(w(Verb::Create, "b"));
        plan.record(w(Verb::Delete, "a"));
        plan.record(w(Verb::Create, "b"));
        let names: Vec<String> = plan.writes().iter().map(|w| w.to_string()).collect();
        assert_eq!(
            names,
            vec!["delete service       a", "create service       b"]
        );
    }
}
