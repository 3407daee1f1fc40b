//! The seed's selection rules: which Consul services are published, under which names,
//! with which instances, ports and readiness.
//!
//! Pure functions from decoded Consul answers to [`MicroSvcMeta`] values; no I/O, no
//! logging (what was left out is returned, so the caller logs it with its context and
//! counts it), no Kubernetes naming (the catalog maps registry names to Kubernetes names).
//!
//! The rules, in order:
//! - the `consul` service (the servers themselves) is never published;
//! - services tagged with the k8s tag came from Kubernetes and are skipped (loop
//!   prevention);
//! - with a filter tag, only services carrying it are kept. Both tag rules look at the
//!   service's tags as `/v1/catalog/services` reports them: the union over its instances;
//! - an instance's address is its service address, else its node's address; its port
//!   is the service port, published as `http`; each tag `gRPC.port=<n>` (key matched
//!   without regard to case) adds port `n` as `grpc` (on the same number as the service
//!   port, the explicit `grpc` wins); an invalid address or port skips the instance, an
//!   invalid `gRPC.port` value skips only that tag;
//! - an instance is ready when every check it reports passes (its own and its node's, as
//!   Consul's `?passing` filter counts them); with `passing_only` the others are left
//!   out, otherwise published as not ready;
//! - an instance tagged `<prefix_tag>=<p>` and/or `<suffix_tag>=<s>` is also published
//!   under the derived service `<p>-<name>-<s>`; when only one of the two tags is
//!   configured or present on the instance, the missing part and its dash are left out
//!   (`<p>-<name>`, `<name>-<s>`). A derived service exists while any registered instance
//!   carries its tags, healthy or not, so that a failing instance empties it instead of
//!   deleting it;
//! - every published name gets the service prefix in front; the domain is
//!   `<consul name>.service.<consul domain>`, also for derived services (Consul's DNS has
//!   no name for them, so an ExternalName of a derived service resolves to all instances
//!   of its base service).

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{
    MicroEndpoint, MicroEndpointAddr, MicroSvcAppProtocol, MicroSvcDomainName, MicroSvcMeta,
    MicroSvcName, MicroSvcPort,
};

use super::api::{CatalogServices, HealthEntry};
use super::config::ConsulConfig;
use crate::registry::metadata::{MetadataAllowList, MetadataIssue};

/// The service Consul registers for its own servers.
const CONSUL_SERVICE: &str = "consul";

/// The instance tag key that adds a gRPC port.
const GRPC_PORT_TAG: &str = "grpc.port";

/// The selection rules, extracted from [`ConsulConfig`].
#[derive(Debug, Clone)]
pub struct Selection {
    filter_tag: Option<String>,
    k8s_tag: Option<String>,
    passing_only: bool,
    prefix_tag: Option<String>,
    suffix_tag: Option<String>,
    service_prefix: String,
    consul_domain: String,
    metadata: MetadataAllowList,
}

pub use crate::registry::SkipReason;

/// An instance that was left out, with enough context to find it in Consul.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedInstance {
    pub service: String,
    pub instance_id: String,
    pub node: String,
    pub reason: SkipReason,
}

/// A tag that looked like one of ours but whose value is unusable; the instance is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredTag {
    pub service: String,
    pub instance_id: String,
    pub tag: String,
}

/// The services one Consul service publishes: its own and the derived ones.
#[derive(Debug, Clone, Default)]
pub struct Built {
    /// The base service first, then derived services by name.
    pub services: Vec<MicroSvcMeta>,
    pub skipped: Vec<SkippedInstance>,
    pub ignored_tags: Vec<IgnoredTag>,
    /// Allow-listed metadata left out, by published registry name.
    pub metadata_issues: Vec<(MicroSvcName, MetadataIssue)>,
}

impl Built {
    /// The registry names published, sorted, each once. A boxed slice, not a set: a
    /// service almost always publishes one name, and 10,000 of these are kept (a B-tree
    /// node for one name is ten times its size).
    pub fn names(&self) -> Box<[MicroSvcName]> {
        let mut names: Vec<MicroSvcName> = self
            .services
            .iter()
            .map(|m| m.registry_name.clone())
            .collect();
        names.sort();
        names.dedup();
        names.into_boxed_slice()
    }
}

impl Selection {
    pub fn from_config(cfg: &ConsulConfig) -> Self {
        let non_empty = |s: &Option<String>| {
            s.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        Self {
            filter_tag: non_empty(&cfg.filter_tag),
            k8s_tag: non_empty(&Some(cfg.k8s_tag.clone())),
            passing_only: cfg.passing_only,
            prefix_tag: non_empty(&cfg.prefix_tag),
            suffix_tag: non_empty(&cfg.suffix_tag),
            service_prefix: cfg.service_prefix.clone(),
            consul_domain: cfg.consul_domain.trim().trim_matches('.').to_string(),
            metadata: cfg.metadata.clone(),
        }
    }

    /// Whether the Consul service `name`, whose instances carry `tags`, is published.
    pub fn selects(&self, name: &str, tags: &[String]) -> bool {
        if name == CONSUL_SERVICE {
            return false;
        }
        if let Some(k8s) = &self.k8s_tag {
            if tags.iter().any(|t| t == k8s) {
                return false;
            }
        }
        match &self.filter_tag {
            Some(filter) => tags.iter().any(|t| t == filter),
            None => true,
        }
    }

    /// The selected Consul service names of a `/v1/catalog/services` answer.
    pub fn selected(&self, services: &CatalogServices) -> BTreeSet<String> {
        services
            .iter()
            .filter(|(name, tags)| self.selects(name, tags))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The registry name a Consul name (or derived name) is published under.
    pub fn published_name(&self, name: &str) -> MicroSvcName {
        MicroSvcName(format!("{}{}", self.service_prefix, name))
    }

    /// The domain of the Consul service `name`.
    pub fn domain(&self, name: &str) -> MicroSvcDomainName {
        MicroSvcDomainName(format!("{name}.service.{}", self.consul_domain))
    }

    /// Builds everything the Consul service `service` publishes from its
    /// `/v1/health/service/<service>` answer.
    pub fn build(&self, service: &str, entries: &[HealthEntry]) -> Built {
        let mut built = Built::default();
        let mut base = Vec::new();
        let mut derived: BTreeMap<String, Vec<MicroEndpoint>> = BTreeMap::new();
        // Every registered instance's meta counts, healthy or not, so that labels do
        // not flap with health.
        let mut derived_meta: BTreeMap<String, Vec<&BTreeMap<String, String>>> = BTreeMap::new();
        for entry in entries {
            let derived_name = self.derived_name(service, &entry.service.tags);
            if let Some(name) = &derived_name {
                derived.entry(name.clone()).or_default();
                derived_meta
                    .entry(name.clone())
                    .or_default()
                    .push(&entry.service.meta);
            }
            let endpoint = match self.endpoint(service, entry, &mut built.ignored_tags) {
                Ok(endpoint) => endpoint,
                Err(reason) => {
                    built.skipped.push(SkippedInstance {
                        service: service.to_string(),
                        instance_id: entry.service.id.clone(),
                        node: entry.node.node.clone(),
                        reason,
                    });
                    continue;
                }
            };
            if self.passing_only && !endpoint.ready {
                continue;
            }
            if let Some(name) = derived_name {
                derived.entry(name).or_default().push(endpoint.clone());
            }
            base.push(endpoint);
        }
        let domain = self.domain(service);
        let base_meta = entries.iter().map(|e| &e.service.meta);
        let service_meta = self.with_metadata(
            MicroSvcMeta::new(self.published_name(service), domain.clone(), base),
            base_meta,
            &mut built.metadata_issues,
        );
        built.services.push(service_meta);
        for (name, endpoints) in derived {
            // A derived name equal to the base name (both tags empty) adds nothing.
            if name != service {
                let metas = derived_meta.remove(&name).unwrap_or_default();
                let meta = self.with_metadata(
                    MicroSvcMeta::new(self.published_name(&name), domain.clone(), endpoints),
                    metas,
                    &mut built.metadata_issues,
                );
                built.services.push(meta);
            }
        }
        built
    }

    /// `meta` with the allow-listed metadata of its instances; what was left out goes to
    /// `issues`.
    fn with_metadata<'a>(
        &self,
        meta: MicroSvcMeta,
        instances: impl IntoIterator<Item = &'a BTreeMap<String, String>>,
        issues: &mut Vec<(MicroSvcName, MetadataIssue)>,
    ) -> MicroSvcMeta {
        let (metadata, found) = self.metadata.apply(instances);
        issues.extend(
            found
                .into_iter()
                .map(|issue| (meta.registry_name.clone(), issue)),
        );
        meta.with_metadata(metadata)
    }

    /// `<p>-<name>-<s>` from the instance's prefix and suffix tags, `None` when it has
    /// neither.
    fn derived_name(&self, service: &str, tags: &[String]) -> Option<String> {
        let prefix = self
            .prefix_tag
            .as_deref()
            .and_then(|key| tag_value(tags, key));
        let suffix = self
            .suffix_tag
            .as_deref()
            .and_then(|key| tag_value(tags, key));
        if prefix.is_none() && suffix.is_none() {
            return None;
        }
        let mut name = String::new();
        if let Some(p) = prefix {
            name.push_str(p);
            name.push('-');
        }
        name.push_str(service);
        if let Some(s) = suffix {
            name.push('-');
            name.push_str(s);
        }
        Some(name)
    }

    fn endpoint(
        &self,
        service: &str,
        entry: &HealthEntry,
        ignored: &mut Vec<IgnoredTag>,
    ) -> Result<MicroEndpoint, SkipReason> {
        let address = if entry.service.address.trim().is_empty() {
            entry.node.address.as_str()
        } else {
            entry.service.address.as_str()
        };
        if address.trim().is_empty() {
            return Err(SkipReason::NoAddress);
        }
        let addr: MicroEndpointAddr = address.parse()?;
        let port = u16::try_from(entry.service.port)
            .ok()
            .and_then(|p| MicroSvcPort::new(p).ok())
            .ok_or(SkipReason::Port(entry.service.port))?;
        let mut ports = BTreeMap::from([(port, MicroSvcAppProtocol::Http)]);
        for tag in &entry.service.tags {
            let Some((key, value)) = tag.split_once('=') else {
                continue;
            };
            if !key.trim().eq_ignore_ascii_case(GRPC_PORT_TAG) {
                continue;
            }
            match value.parse::<MicroSvcPort>() {
                Ok(grpc) => {
                    ports.insert(grpc, MicroSvcAppProtocol::Grpc);
                }
                Err(_) => ignored.push(IgnoredTag {
                    service: service.to_string(),
                    instance_id: entry.service.id.clone(),
                    tag: tag.clone(),
                }),
            }
        }
        Ok(MicroEndpoint {
            addr,
            ports,
            ready: entry.checks.iter().all(|c| c.is_passing()),
            zone: None,
        })
    }
}

/// The value of the first tag `<key>=<value>` with a non-empty value.
fn tag_value<'a>(tags: &'a [String], key: &str) -> Option<&'a str> {
    tags.iter()
        .filter_map(|t| t.split_once('='))
        .find(|(k, v)| *k == key && !v.trim().is_empty())
        .map(|(_, v)| v.trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AddrErrorReason;
    use crate::registry::consul::api::{decode_catalog_services, decode_health_service};

    const SERVICES: &str = include_str!("../../../tests/fixtures/consul/catalog_services.json");
    const ORDERS: &str = include_str!("../../../tests/fixtures/consul/health_service_orders.json");
    const BILLING: &str =
        include_str!("../../../tests/fixtures/consul/health_service_billing.json");

    fn selection(f: impl FnOnce(&mut ConsulConfig)) -> Selection {
        let mut cfg = ConsulConfig::default();
        f(&mut cfg);
        Selection::from_config(&cfg)
    }

    fn orders() -> Vec<HealthEntry> {
        decode_health_service(ORDERS.as_bytes()).expect("fixture")
    }

    fn port(p: u16) -> MicroSvcPort {
        MicroSvcPort::new(p).expect("non-zero")
    }

    fn addrs(meta: &MicroSvcMeta) -> Vec<(String, bool)> {
        meta.endpoints
            .iter()
            .map(|e| (e.addr.to_string(), e.ready))
            .collect()
    }

    #[test]
    fn allow_listed_service_meta_goes_to_the_base_and_derived_services() {
        let sel = selection(|c| {
            c.prefix_tag = Some("pfx".into());
            c.metadata =
                MetadataAllowList::new(["version".to_string()], []).expect("valid allow-list");
        });
        let built = sel.build("orders", &orders());
        let version = |name: &str| {
            built
                .services
                .iter()
                .find(|m| m.registry_name.as_str() == name)
                .and_then(|m| m.metadata.labels.get("version").cloned())
        };
        // Only orders-1 carries `version`; the instances without the key do not veto it.
        assert_eq!(version("orders").as_deref(), Some("1"));
        assert_eq!(version("canary-orders").as_deref(), Some("1"));
        assert_eq!(version("blue-orders"), None);
        assert!(built.metadata_issues.is_empty());
    }

    #[test]
    fn selects_all_but_consul_and_k8s_tagged() {
        let services = decode_catalog_services(SERVICES.as_bytes()).expect("fixture");
        let sel = selection(|_| {});
        let names: Vec<String> = sel.selected(&services).into_iter().collect();
        assert_eq!(names, ["billing", "orders"]);
    }

    #[test]
    fn filter_tag_keeps_only_tagged_services() {
        let services = decode_catalog_services(SERVICES.as_bytes()).expect("fixture");
        let sel = selection(|c| c.filter_tag = Some("internal".into()));
        let names: Vec<String> = sel.selected(&services).into_iter().collect();
        assert_eq!(names, ["billing"]);
        // The filter never brings back the consul or k8s-tagged services.
        let sel = selection(|c| c.filter_tag = Some("k8s".into()));
        assert!(sel.selected(&services).is_empty());
        // An empty filter tag means no filter.
        let sel = selection(|c| c.filter_tag = Some(" ".into()));
        assert_eq!(sel.selected(&services).len(), 2);
    }

    #[test]
    fn custom_and_empty_k8s_tag() {
        let services = decode_catalog_services(SERVICES.as_bytes()).expect("fixture");
        let sel = selection(|c| c.k8s_tag = "internal".into());
        let names: Vec<String> = sel.selected(&services).into_iter().collect();
        assert_eq!(names, ["from-k8s", "orders"]);
        let sel = selection(|c| c.k8s_tag = String::new());
        assert_eq!(sel.selected(&services).len(), 3);
    }

    #[test]
    fn passing_only_publishes_healthy_instances_with_http_and_grpc_ports() {
        let sel = selection(|_| {});
        let built = sel.build("orders", &orders());
        let meta = &built.services[0];
        assert_eq!(meta.registry_name.as_str(), "orders");
        assert_eq!(meta.domain.as_str(), "orders.service.consul");
        // orders-3 (no address, node is loopback) and orders-4 (port 0) are skipped;
        // orders-5 (warning) is not passing.
        assert_eq!(
            addrs(meta),
            [
                ("192.0.2.10".to_string(), true),
                ("203.0.113.5".to_string(), true),
                ("2001:db8::2".to_string(), true),
            ]
        );
        let with_grpc = &meta.endpoints[0];
        assert_eq!(
            with_grpc.ports,
            BTreeMap::from([
                (port(8080), MicroSvcAppProtocol::Http),
                (port(9090), MicroSvcAppProtocol::Grpc)
            ])
        );
        let from_node = &meta.endpoints[1];
        assert_eq!(
            from_node.ports,
            BTreeMap::from([(port(8082), MicroSvcAppProtocol::Http)])
        );
    }

    #[test]
    fn skipped_instances_are_reported_with_reasons() {
        let built = selection(|_| {}).build("orders", &orders());
        let mut skipped: Vec<(String, SkipReason)> = built
            .skipped
            .iter()
            .map(|s| (s.instance_id.clone(), s.reason.clone()))
            .collect();
        skipped.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert_eq!(skipped[0].0, "orders-3");
        assert!(matches!(
            &skipped[0].1,
            SkipReason::Address(e) if e.reason == AddrErrorReason::Loopback
        ));
        assert_eq!(skipped[1], ("orders-4".to_string(), SkipReason::Port(0)));
        assert!(built
            .skipped
            .iter()
            .all(|s| s.service == "orders" && s.node == "scratch"));
        // The invalid gRPC.port tag is on the port-0 instance, which is skipped first.
        assert!(built.ignored_tags.is_empty());
    }

    #[test]
    fn not_passing_instances_are_published_not_ready_without_passing_only() {
        let built = selection(|c| c.passing_only = false).build("orders", &orders());
        assert_eq!(
            addrs(&built.services[0]),
            [
                ("192.0.2.10".to_string(), true),
                ("198.51.100.5".to_string(), false),
                ("203.0.113.5".to_string(), true),
                ("2001:db8::2".to_string(), true),
            ]
        );
    }

    #[test]
    fn prefix_and_suffix_tags_derive_services() {
        let sel = selection(|c| {
            c.prefix_tag = Some("pfx".into());
            c.suffix_tag = Some("sfx".into());
            c.passing_only = false;
        });
        let built = sel.build("orders", &orders());
        let names: Vec<&str> = built
            .services
            .iter()
            .map(|m| m.registry_name.as_str())
            .collect();
        // orders-1 has both tags, orders-5 only a prefix.
        assert_eq!(names, ["orders", "blue-orders", "canary-orders-v2"]);
        assert_eq!(
            addrs(&built.services[1]),
            [("198.51.100.5".to_string(), false)]
        );
        assert_eq!(
            addrs(&built.services[2]),
            [("192.0.2.10".to_string(), true)]
        );
        assert_eq!(built.services[2].domain.as_str(), "orders.service.consul");

        // With passing only, the derived service of a failing instance stays, empty.
        let sel = selection(|c| {
            c.prefix_tag = Some("pfx".into());
            c.suffix_tag = Some("sfx".into());
        });
        let built = sel.build("orders", &orders());
        assert_eq!(built.services[1].registry_name.as_str(), "blue-orders");
        assert!(built.services[1].endpoints.is_empty());
    }

    #[test]
    fn only_a_suffix_tag_configured() {
        let sel = selection(|c| c.suffix_tag = Some("sfx".into()));
        let built = sel.build("orders", &orders());
        let names: Vec<&str> = built
            .services
            .iter()
            .map(|m| m.registry_name.as_str())
            .collect();
        assert_eq!(names, ["orders", "orders-v2"]);
    }

    #[test]
    fn no_derived_services_without_tag_names() {
        let built = selection(|_| {}).build("orders", &orders());
        assert_eq!(built.services.len(), 1);
    }

    #[test]
    fn service_prefix_and_domain_apply_to_every_name() {
        let sel = selection(|c| {
            c.service_prefix = "cloud-".into();
            c.prefix_tag = Some("pfx".into());
            c.consul_domain = "example.internal.".into();
        });
        let built = sel.build("orders", &orders());
        let names: Vec<&str> = built
            .services
            .iter()
            .map(|m| m.registry_name.as_str())
            .collect();
        assert_eq!(
            names,
            ["cloud-orders", "cloud-blue-orders", "cloud-canary-orders"]
        );
        assert!(built
            .services
            .iter()
            .all(|m| m.domain.as_str() == "orders.service.example.internal"));
    }

    #[test]
    fn an_instance_without_checks_is_ready() {
        let entries = decode_health_service(BILLING.as_bytes()).expect("fixture");
        let built = selection(|_| {}).build("billing", &entries);
        assert_eq!(
            addrs(&built.services[0]),
            [("198.51.100.9".to_string(), true)]
        );
    }

    #[test]
    fn an_absent_service_publishes_an_empty_service() {
        let built = selection(|_| {}).build("gone", &[]);
        assert_eq!(built.services.len(), 1);
        assert!(built.services[0].endpoints.is_empty());
    }

    fn entry(json: &str) -> HealthEntry {
        serde_json::from_str(json).expect("test entry")
    }

    #[test]
    fn grpc_tags_are_lenient_and_bad_ones_ignored() {
        let e = entry(
            r#"{"Node":{"Node":"n","Address":"198.51.100.1"},
                "Service":{"ID":"i","Service":"s","Tags":["GRPC.PORT=50051","gRPC.port=oops","grpc.port=8080"],"Address":"","Port":8080},
                "Checks":[{"CheckID":"serfHealth","Status":"passing"}]}"#,
        );
        let built = selection(|_| {}).build("s", &[e]);
        let ep = &built.services[0].endpoints[0];
        assert_eq!(ep.addr.to_string(), "198.51.100.1");
        assert_eq!(
            ep.ports,
            BTreeMap::from([
                (port(8080), MicroSvcAppProtocol::Grpc),
                (port(50051), MicroSvcAppProtocol::Grpc)
            ])
        );
        assert_eq!(built.ignored_tags.len(), 1);
        assert_eq!(built.ignored_tags[0].tag, "gRPC.port=oops");
    }

    #[test]
    fn invalid_addresses_and_ports_skip_the_instance() {
        let cases = [
            (r#""Address":"","Port":80"#, "", SkipReason::NoAddress),
            (
                r#""Address":"not-an-ip","Port":80"#,
                "198.51.100.1",
                SkipReason::Port(0),
            ),
            (
                r#""Address":"198.51.100.2","Port":70000"#,
                "",
                SkipReason::Port(70000),
            ),
            (
                r#""Address":"198.51.100.2","Port":-1"#,
                "",
                SkipReason::Port(-1),
            ),
        ];
        for (i, (service, node_addr, expected)) in cases.into_iter().enumerate() {
            let e = entry(&format!(
                r#"{{"Node":{{"Node":"n","Address":"{node_addr}"}},"Service":{{"ID":"i","Service":"s",{service}}}}}"#
            ));
            let built = selection(|_| {}).build("s", &[e]);
            assert!(built.services[0].endpoints.is_empty(), "case {i}");
            let reason = &built.skipped[0].reason;
            if i == 1 {
                assert!(
                    matches!(reason, SkipReason::Address(a) if a.reason == AddrErrorReason::NotAnIp)
                );
            } else {
                assert_eq!(reason, &expected, "case {i}");
            }
        }
    }
}
