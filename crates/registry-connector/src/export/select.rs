//! Which Kubernetes Services are registered, and under which registry name.
//!
//! consul-k8s's semantics where it has them (allow and deny lists of namespaces with
//! `*`, deny winning; a default with a per-Service opt-in or opt-out annotation; a
//! per-Service name annotation), with its annotations honoured beside ours so that its
//! users can switch without editing every Service. Pure: one Service in, one decision
//! out.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Service;

use crate::labels::{CLOUD_SOURCED_SERVICE_LABEL, MESH_SERVICE_SYNC_ANNOTATION};

/// Opt a Service in (`"true"`) or out (`"false"`).
pub const SYNC_ANNOTATION: &str = "connector.flomesh.io/sync";
/// consul-k8s's [`SYNC_ANNOTATION`].
pub const CONSUL_SYNC_ANNOTATION: &str = "consul.hashicorp.com/service-sync";
/// The registry name of the Service (wins over the Service's own name and prefix).
pub const REGISTRY_NAME_ANNOTATION: &str = "connector.flomesh.io/registry-name";
/// consul-k8s's [`REGISTRY_NAME_ANNOTATION`].
pub const CONSUL_NAME_ANNOTATION: &str = "consul.hashicorp.com/service-name";

/// A set of namespaces: names, or every namespace with `*`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceSet {
    all: bool,
    names: BTreeSet<String>,
}

impl NamespaceSet {
    /// From flag values (`*` for all); empty entries are ignored.
    pub fn new<I, S>(values: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut set = Self::default();
        for value in values {
            let value = value.as_ref().trim();
            if value == "*" {
                set.all = true;
            } else if !value.is_empty() {
                set.names.insert(value.to_string());
            }
        }
        set
    }

    /// Every namespace.
    pub fn all() -> Self {
        Self {
            all: true,
            names: BTreeSet::new(),
        }
    }

    pub fn contains(&self, namespace: &str) -> bool {
        self.all || self.names.contains(namespace)
    }

    /// The listed namespaces, when the set is not `*` (the watcher could narrow to them).
    pub fn names(&self) -> Option<&BTreeSet<String>> {
        (!self.all).then_some(&self.names)
    }
}

/// The selection flags.
#[derive(Clone, Debug)]
pub struct SelectionConfig {
    pub allow: NamespaceSet,
    pub deny: NamespaceSet,
    /// Whether a Service without a sync annotation is registered.
    pub default_sync: bool,
    /// Prepended to every registry name that no annotation sets.
    pub prefix: String,
    /// Append `-<namespace>` to the registry name (two namespaces' `web` stay apart).
    pub namespace_suffix: bool,
}

impl Default for SelectionConfig {
    fn default() -> Self {
        Self {
            allow: NamespaceSet::all(),
            deny: NamespaceSet::default(),
            default_sync: true,
            prefix: String::new(),
            namespace_suffix: false,
        }
    }
}

/// Why a Service is not registered (the `reason` label of the skipped count).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Skip {
    /// The `kubernetes` Service of the `default` namespace (the apiserver itself).
    ApiServer,
    /// Created by this connector (or a peer) from a registry: registering it back would
    /// loop.
    FromRegistry,
    /// Its namespace is not in the allow list, or is in the deny list.
    Namespace,
    /// An annotation says no, or none says yes while the default is off.
    OptedOut,
    /// Its annotation names an empty registry name.
    EmptyName,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ApiServer => "apiserver",
            Self::FromRegistry => "from_registry",
            Self::Namespace => "namespace",
            Self::OptedOut => "opted_out",
            Self::EmptyName => "empty_name",
        }
    }
}

impl SelectionConfig {
    /// The registry name of `svc` when it is selected.
    pub fn decide(&self, svc: &Service) -> Result<String, Skip> {
        let meta = &svc.metadata;
        let namespace = meta.namespace.as_deref().unwrap_or_default();
        let name = meta.name.as_deref().unwrap_or_default();
        if namespace == "default" && name == "kubernetes" {
            return Err(Skip::ApiServer);
        }
        let label = |k: &str| meta.labels.as_ref().and_then(|l| l.get(k));
        let annotation = |k: &str| meta.annotations.as_ref().and_then(|a| a.get(k));
        if label(CLOUD_SOURCED_SERVICE_LABEL).is_some()
            || annotation(MESH_SERVICE_SYNC_ANNOTATION).is_some_and(|v| is_false(v))
        {
            return Err(Skip::FromRegistry);
        }
        if self.deny.contains(namespace) || !self.allow.contains(namespace) {
            return Err(Skip::Namespace);
        }
        let opted = annotation(SYNC_ANNOTATION)
            .or_else(|| annotation(CONSUL_SYNC_ANNOTATION))
            .and_then(|v| parse_bool(v));
        if !opted.unwrap_or(self.default_sync) {
            return Err(Skip::OptedOut);
        }
        let named =
            annotation(REGISTRY_NAME_ANNOTATION).or_else(|| annotation(CONSUL_NAME_ANNOTATION));
        let registry_name = match named {
            Some(v) if v.trim().is_empty() => return Err(Skip::EmptyName),
            Some(v) => v.trim().to_string(),
            None => format!("{}{name}", self.prefix),
        };
        Ok(if self.namespace_suffix {
            format!("{registry_name}-{namespace}")
        } else {
            registry_name
        })
    }
}

/// Kubernetes annotations are strings; accept what `strconv.ParseBool` accepts (as
/// consul-k8s does), anything else counts as absent.
fn parse_bool(v: &str) -> Option<bool> {
    match v.trim() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

fn is_false(v: &str) -> bool {
    parse_bool(v) == Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn svc(ns: &str, name: &str, annotations: &[(&str, &str)], labels: &[(&str, &str)]) -> Service {
        let map = |kv: &[(&str, &str)]| {
            (!kv.is_empty()).then(|| {
                kv.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
        };
        Service {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                annotations: map(annotations),
                labels: map(labels),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn default_selects_every_service_by_its_name() {
        let cfg = SelectionConfig::default();
        assert_eq!(cfg.decide(&svc("shop", "web", &[], &[])), Ok("web".into()));
    }

    #[test]
    fn never_the_apiserver_nor_what_came_from_a_registry() {
        let cfg = SelectionConfig::default();
        assert_eq!(
            cfg.decide(&svc("default", "kubernetes", &[], &[])),
            Err(Skip::ApiServer)
        );
        assert_eq!(
            cfg.decide(&svc(
                "shop",
                "web",
                &[],
                &[(CLOUD_SOURCED_SERVICE_LABEL, "true")]
            )),
            Err(Skip::FromRegistry)
        );
        assert_eq!(
            cfg.decide(&svc(
                "shop",
                "web",
                &[(MESH_SERVICE_SYNC_ANNOTATION, "false")],
                &[]
            )),
            Err(Skip::FromRegistry)
        );
        // Even an explicit opt-in does not bring a registry-sourced Service back.
        assert_eq!(
            cfg.decide(&svc(
                "shop",
                "web",
                &[(SYNC_ANNOTATION, "true")],
                &[(CLOUD_SOURCED_SERVICE_LABEL, "true")]
            )),
            Err(Skip::FromRegistry)
        );
        // `kubernetes` elsewhere is an ordinary name.
        assert!(cfg.decide(&svc("shop", "kubernetes", &[], &[])).is_ok());
    }

    #[test]
    fn deny_wins_over_allow() {
        let cfg = SelectionConfig {
            allow: NamespaceSet::new(["*"]),
            deny: NamespaceSet::new(["kube-system"]),
            ..Default::default()
        };
        assert_eq!(
            cfg.decide(&svc("kube-system", "dns", &[], &[])),
            Err(Skip::Namespace)
        );
        assert!(cfg.decide(&svc("shop", "web", &[], &[])).is_ok());
        let both = SelectionConfig {
            allow: NamespaceSet::new(["shop"]),
            deny: NamespaceSet::new(["*"]),
            ..Default::default()
        };
        assert_eq!(
            both.decide(&svc("shop", "web", &[], &[])),
            Err(Skip::Namespace)
        );
        let listed = SelectionConfig {
            allow: NamespaceSet::new(["shop", " "]),
            ..Default::default()
        };
        assert!(listed.decide(&svc("shop", "web", &[], &[])).is_ok());
        assert_eq!(
            listed.decide(&svc("other", "web", &[], &[])),
            Err(Skip::Namespace)
        );
        assert_eq!(listed.allow.names().map(|n| n.len()), Some(1));
    }

    #[test]
    fn annotations_opt_in_and_out() {
        let off = SelectionConfig {
            default_sync: false,
            ..Default::default()
        };
        assert_eq!(
            off.decide(&svc("shop", "web", &[], &[])),
            Err(Skip::OptedOut)
        );
        assert!(off
            .decide(&svc("shop", "web", &[(SYNC_ANNOTATION, "true")], &[]))
            .is_ok());
        assert!(off
            .decide(&svc("shop", "web", &[(CONSUL_SYNC_ANNOTATION, "t")], &[]))
            .is_ok());
        // Garbage counts as absent: the default decides.
        assert_eq!(
            off.decide(&svc("shop", "web", &[(SYNC_ANNOTATION, "yes please")], &[])),
            Err(Skip::OptedOut)
        );
        let on = SelectionConfig::default();
        assert_eq!(
            on.decide(&svc(
                "shop",
                "web",
                &[(CONSUL_SYNC_ANNOTATION, "false")],
                &[]
            )),
            Err(Skip::OptedOut)
        );
        // Ours wins over consul-k8s's when both are set.
        assert!(on
            .decide(&svc(
                "shop",
                "web",
                &[(SYNC_ANNOTATION, "true"), (CONSUL_SYNC_ANNOTATION, "false")],
                &[]
            ))
            .is_ok());
    }

    #[test]
    fn names_from_annotations_prefix_and_suffix() {
        let cfg = SelectionConfig {
            prefix: "k8s-".into(),
            namespace_suffix: true,
            ..Default::default()
        };
        assert_eq!(
            cfg.decide(&svc("shop", "web", &[], &[])),
            Ok("k8s-web-shop".into())
        );
        assert_eq!(
            cfg.decide(&svc(
                "shop",
                "web",
                &[(CONSUL_NAME_ANNOTATION, "frontend")],
                &[]
            )),
            Ok("frontend-shop".into())
        );
        assert_eq!(
            cfg.decide(&svc(
                "shop",
                "web",
                &[
                    (REGISTRY_NAME_ANNOTATION, "storefront"),
                    (CONSUL_NAME_ANNOTATION, "frontend")
                ],
                &[]
            )),
            Ok("storefront-shop".into())
        );
        assert_eq!(
            cfg.decide(&svc("shop", "web", &[(REGISTRY_NAME_ANNOTATION, " ")], &[])),
            Err(Skip::EmptyName)
        );
    }
}
