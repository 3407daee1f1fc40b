//! Which Nacos instances are published, under which name, with which ports and
//! readiness. Pure functions from a [`ServiceInfo`] to a [`MicroSvcMeta`]; what is left
//! out is returned for the caller to log and count.
//!
//! The rules:
//! - an instance takes part when it is `enabled`, belongs to one of `--nacos-clusters`
//!   (all when none is given), carries every `--filter-metadata` pair and was not
//!   registered from Kubernetes (`external-source=kubernetes`, so that a later
//!   Kubernetes → Nacos direction is never published back);
//! - it is ready when `healthy` and its weight is above 0 (Nacos sends no traffic to
//!   weight 0); with `passing_only` the others are left out, otherwise published not
//!   ready (never the inverse: the healthy ones stay ready);
//! - a service is published while at least one instance takes part, even if none is
//!   ready; Dubbo `consumers:` services (subscribers, not endpoints) never are;
//! - the name is the Nacos service name behind the prefix (with `group_as_suffix`,
//!   `name-GROUP`); the catalog sanitises it (`providers:com.example.OrderService:1.0.0:`
//!   → `providers-com-example-orderservice-1-0-0`) and keeps the original;
//! - the port is `port`, named by the instance's protocol: `https` when its metadata says
//!   `secure=true` (Spring Cloud Alibaba), else its `protocol` metadata (Dubbo), else
//!   `http`; an instance without a usable address or port is skipped;
//! - two instances at one address and port (two clusters, a re-registration) are one
//!   endpoint, ready if either is ([`MicroSvcMeta::new`]);
//! - the group, the Nacos name and the clusters of the instances taking part go into
//!   annotations; allow-listed metadata as for every source.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{
    MicroEndpoint, MicroEndpointAddr, MicroSvcAppProtocol, MicroSvcDomainName, MicroSvcMeta,
    MicroSvcName, MicroSvcPort,
};
use crate::naming::{is_valid_external_name, kube_service_name};
use crate::registry::metadata::{
    is_from_kubernetes, matches_filter, MetadataAllowList, MetadataIssue,
};
use crate::registry::SkipReason;

use super::api::{Host, ServiceInfo};

/// The Nacos group of a published service.
pub const GROUP_ANNOTATION: &str = "nacos.connector.flomesh.io/group";
/// The Nacos service name, as registered (without prefix or group suffix).
pub const SERVICE_ANNOTATION: &str = "nacos.connector.flomesh.io/service";
/// The clusters of the published instances, comma-separated and sorted.
pub const CLUSTERS_ANNOTATION: &str = "nacos.connector.flomesh.io/clusters";

/// One Nacos service: its group and its name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub group: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(group: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            group: group.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@@{}", self.group, self.name)
    }
}

/// Whether a service is a Dubbo consumer registration (`consumers:...`): who calls a
/// service, not where it runs.
pub fn is_consumer(name: &str) -> bool {
    name.starts_with("consumers:")
}

/// The selection rules of the Nacos source.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub filter_metadata: Vec<(String, String)>,
    pub passing_only: bool,
    pub service_prefix: String,
    pub metadata: MetadataAllowList,
    /// Only these clusters; empty means all.
    pub clusters: Vec<String>,
    pub group_as_suffix: bool,
}

/// Why an instance was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// What every source shares (address, port).
    Shared(SkipReason),
    /// The entry is not an instance (a field of the wrong type).
    Undecodable(String),
}

impl Skip {
    pub fn as_label(&self) -> &'static str {
        match self {
            Self::Shared(reason) => reason.as_label(),
            Self::Undecodable(_) => "invalid_instance",
        }
    }
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Shared(reason) => reason.fmt(f),
            Self::Undecodable(why) => write!(f, "not an instance: {why}"),
        }
    }
}

/// An instance left out, with what finds it in Nacos.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedInstance {
    pub instance_id: String,
    pub reason: Skip,
}

/// What one service publishes.
#[derive(Debug, Clone, Default)]
pub struct Built {
    /// `None` when no instance takes part.
    pub service: Option<MicroSvcMeta>,
    pub skipped: Vec<SkippedInstance>,
    pub metadata_issues: Vec<MetadataIssue>,
}

impl Selection {
    /// The registry name `key` is published under.
    pub fn published_name(&self, key: &ServiceKey) -> MicroSvcName {
        if self.group_as_suffix {
            MicroSvcName(format!("{}{}-{}", self.service_prefix, key.name, key.group))
        } else {
            MicroSvcName(format!("{}{}", self.service_prefix, key.name))
        }
    }

    /// Whether `host` takes part (see the module documentation).
    pub fn takes_part(&self, host: &Host) -> bool {
        host.enabled != Some(false)
            && (self.clusters.is_empty() || self.clusters.iter().any(|c| c == host.cluster()))
            && !is_from_kubernetes(&host.metadata)
            && matches_filter(&host.metadata, &self.filter_metadata)
    }

    /// What the service `key` publishes, from its whole instance list `info`.
    pub fn build(&self, key: &ServiceKey, info: &ServiceInfo) -> Built {
        let mut built = Built::default();
        if is_consumer(&key.name) {
            return built;
        }
        let mut members = Vec::new();
        for (i, host) in info.instances().enumerate() {
            match host {
                Ok(host) if self.takes_part(host) => members.push(host),
                Ok(_) => {}
                Err(why) => built.skipped.push(SkippedInstance {
                    instance_id: format!("#{i}"),
                    reason: Skip::Undecodable(why.to_string()),
                }),
            }
        }
        if members.is_empty() {
            return built;
        }
        let mut endpoints = Vec::new();
        for host in &members {
            match endpoint(host) {
                Ok(endpoint) if self.passing_only && !endpoint.ready => {}
                Ok(endpoint) => endpoints.push(endpoint),
                Err(reason) => built.skipped.push(SkippedInstance {
                    instance_id: host.id(),
                    reason: Skip::Shared(reason),
                }),
            }
        }
        let (mut metadata, issues) = self.metadata.apply(members.iter().map(|h| &h.metadata));
        built.metadata_issues = issues;
        let clusters: BTreeSet<&str> = members.iter().map(|h| h.cluster()).collect();
        let clusters: Vec<&str> = clusters.into_iter().collect();
        for (k, v) in [
            (GROUP_ANNOTATION, key.group.clone()),
            (SERVICE_ANNOTATION, key.name.clone()),
            (CLUSTERS_ANNOTATION, clusters.join(",")),
        ] {
            metadata.annotations.insert(k.to_string(), v);
        }
        built.service = Some(
            MicroSvcMeta::new(
                self.published_name(key),
                MicroSvcDomainName(domain(&key.name)),
                endpoints,
            )
            .with_metadata(metadata),
        );
        built
    }
}

fn endpoint(host: &Host) -> Result<MicroEndpoint, SkipReason> {
    let ip = host
        .ip
        .as_deref()
        .map(str::trim)
        .filter(|ip| !ip.is_empty())
        .ok_or(SkipReason::NoAddress)?;
    let addr: MicroEndpointAddr = ip.parse()?;
    let number = host.port.ok_or(SkipReason::NoPort)?;
    let port = u16::try_from(number)
        .ok()
        .and_then(|p| MicroSvcPort::new(p).ok())
        .ok_or(SkipReason::Port(number))?;
    let weight = host.weight.unwrap_or(1.0);
    Ok(MicroEndpoint {
        addr,
        ports: BTreeMap::from([(port, protocol(&host.metadata))]),
        ready: host.healthy == Some(true) && weight > 0.0,
        zone: None,
    })
}

fn protocol(metadata: &BTreeMap<String, String>) -> MicroSvcAppProtocol {
    if metadata.get("secure").map(|s| s.trim()) == Some("true") {
        return MicroSvcAppProtocol::new("https");
    }
    match metadata
        .get("protocol")
        .map(|p| p.trim().to_ascii_lowercase())
    {
        Some(p) if !p.is_empty() => MicroSvcAppProtocol::new(&p),
        _ => MicroSvcAppProtocol::Http,
    }
}

/// The ExternalName target: the lowercased name when it is a DNS name, else the
/// sanitised Service name (a Dubbo name has colons).
fn domain(name: &str) -> String {
    let lower = name.trim().to_ascii_lowercase();
    if is_valid_external_name(&lower) {
        lower
    } else {
        kube_service_name(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::naming::kube_service_name;
    use serde_json::{json, Value};

    fn host(ip: &str, healthy: bool) -> Value {
        json!({"instanceId": format!("{ip}#8080"), "ip": ip, "port": 8080, "weight": 1.0,
               "healthy": healthy, "enabled": true, "ephemeral": true, "clusterName": "DEFAULT",
               "metadata": {}})
    }

    fn with(mut h: Value, field: &str, value: Value) -> Value {
        h[field] = value;
        h
    }

    fn info(hosts: Vec<Value>) -> ServiceInfo {
        ServiceInfo {
            name: "G@@orders".into(),
            hosts: hosts
                .into_iter()
                .map(|h| serde_json::from_value(h).expect("an entry always decodes"))
                .collect(),
            ..ServiceInfo::default()
        }
    }

    fn sel(passing_only: bool) -> Selection {
        Selection {
            passing_only,
            ..Selection::default()
        }
    }

    fn key() -> ServiceKey {
        ServiceKey::new("G", "orders")
    }

    fn addresses(meta: &MicroSvcMeta) -> Vec<(String, bool)> {
        meta.endpoints
            .iter()
            .map(|e| (e.addr.to_string(), e.ready))
            .collect()
    }

    #[test]
    fn healthy_instances_are_ready_and_the_others_left_out_or_not_ready() {
        let i = info(vec![
            host("192.0.2.1", true),
            host("192.0.2.2", false),
            with(host("192.0.2.3", true), "weight", json!(0.0)),
            host("2001:db8::4", true),
        ]);
        let meta = sel(true).build(&key(), &i).service.expect("published");
        assert_eq!(
            addresses(&meta),
            [("192.0.2.1".into(), true), ("2001:db8::4".into(), true)]
        );
        // passing-only off: the unhealthy and the weight-0 instance are published not
        // ready, and the healthy ones stay ready (not the inverse).
        let meta = sel(false).build(&key(), &i).service.expect("published");
        assert_eq!(
            addresses(&meta),
            [
                ("192.0.2.1".into(), true),
                ("192.0.2.2".into(), false),
                ("192.0.2.3".into(), false),
                ("2001:db8::4".into(), true)
            ]
        );
    }

    #[test]
    fn a_service_with_no_ready_instance_stays_published_and_empty() {
        let meta = sel(true)
            .build(&key(), &info(vec![host("192.0.2.1", false)]))
            .service
            .expect("still published");
        assert!(meta.endpoints.is_empty());
        assert!(sel(true).build(&key(), &info(vec![])).service.is_none());
    }

    #[test]
    fn disabled_other_cluster_filtered_and_exported_instances_do_not_take_part() {
        let i = info(vec![
            with(host("192.0.2.1", true), "enabled", json!(false)),
            with(host("192.0.2.2", true), "clusterName", json!("BJ")),
            with(
                with(host("192.0.2.3", true), "clusterName", json!("SH")),
                "metadata",
                json!({"team": "blue"}),
            ),
            with(
                host("192.0.2.4", true),
                "metadata",
                json!({"external-source": "kubernetes", "team": "blue"}),
            ),
            with(host("192.0.2.5", true), "metadata", json!({"team": "blue"})),
        ]);
        let s = Selection {
            passing_only: true,
            clusters: vec!["SH".into(), "DEFAULT".into()],
            filter_metadata: vec![("team".into(), "blue".into())],
            ..Selection::default()
        };
        let meta = s.build(&key(), &i).service.expect("published");
        assert_eq!(
            addresses(&meta),
            [("192.0.2.3".into(), true), ("192.0.2.5".into(), true)]
        );
        assert_eq!(
            meta.metadata
                .annotations
                .get(CLUSTERS_ANNOTATION)
                .map(String::as_str),
            Some("DEFAULT,SH")
        );
        assert_eq!(
            meta.metadata
                .annotations
                .get(GROUP_ANNOTATION)
                .map(String::as_str),
            Some("G")
        );
    }

    #[test]
    fn one_address_and_port_twice_is_one_endpoint_ready_if_either_is() {
        let i = info(vec![
            with(host("192.0.2.1", false), "clusterName", json!("A")),
            with(host("192.0.2.1", true), "clusterName", json!("B")),
        ]);
        let reversed = ServiceInfo {
            hosts: i.hosts.iter().rev().cloned().collect(),
            ..i.clone()
        };
        for order in [i, reversed] {
            let meta = sel(false).build(&key(), &order).service.expect("published");
            assert_eq!(addresses(&meta), [("192.0.2.1".into(), true)]);
        }
    }

    #[test]
    fn bad_instances_are_skipped_with_their_reason() {
        let i = info(vec![
            with(host("192.0.2.1", true), "ip", json!(" ")),
            host("127.0.0.1", true),
            with(host("192.0.2.3", true), "port", json!(70000)),
            with(host("192.0.2.4", true), "port", json!(0)),
            with(host("192.0.2.5", true), "port", json!("x")),
            host("192.0.2.6", true),
        ]);
        let built = sel(true).build(&key(), &i);
        let mut reasons: Vec<&str> = built.skipped.iter().map(|s| s.reason.as_label()).collect();
        reasons.sort();
        assert_eq!(
            reasons,
            [
                "invalid_instance",
                "invalid_port",
                "invalid_port",
                "loopback_address",
                "no_address"
            ]
        );
        assert_eq!(
            addresses(&built.service.expect("published")),
            [("192.0.2.6".into(), true)]
        );
    }

    #[test]
    fn dubbo_names_become_stable_kubernetes_names_and_consumers_are_left_out() {
        let provider =
            ServiceKey::new("DEFAULT_GROUP", "providers:com.example.OrderService:1.0.0:");
        let mut h = host("192.0.2.1", true);
        h["port"] = json!(20880);
        h["metadata"] = json!({"protocol": "dubbo"});
        let meta = sel(true)
            .build(&provider, &info(vec![h.clone()]))
            .service
            .expect("published");
        assert_eq!(
            meta.registry_name.as_str(),
            "providers:com.example.OrderService:1.0.0:",
            "the original name is kept"
        );
        assert_eq!(
            kube_service_name(meta.registry_name.as_str()),
            "providers-com-example-orderservice-1-0-0"
        );
        assert_eq!(
            meta.domain.as_str(),
            "providers-com-example-orderservice-1-0-0"
        );
        let ports: Vec<String> = meta.ports().values().map(|p| p.to_string()).collect();
        assert_eq!(ports, ["dubbo"]);
        let consumer =
            ServiceKey::new("DEFAULT_GROUP", "consumers:com.example.OrderService:1.0.0:");
        assert!(sel(true).build(&consumer, &info(vec![h])).service.is_none());
    }

    #[test]
    fn names_take_the_prefix_and_optionally_the_group() {
        let mut s = sel(true);
        s.service_prefix = "n-".into();
        assert_eq!(s.published_name(&key()).as_str(), "n-orders");
        s.group_as_suffix = true;
        assert_eq!(s.published_name(&key()).as_str(), "n-orders-G");
        let mut secure = host("192.0.2.1", true);
        secure["metadata"] = json!({"secure": "true", "protocol": "grpc"});
        let meta = s
            .build(&key(), &info(vec![secure]))
            .service
            .expect("published");
        let ports: Vec<String> = meta.ports().values().map(|p| p.to_string()).collect();
        assert_eq!(ports, ["https"]);
    }

    #[test]
    fn allow_listed_metadata_is_copied_beside_the_nacos_annotations() {
        let s = Selection {
            passing_only: true,
            metadata: MetadataAllowList::new(["version".to_string()], []).expect("valid"),
            ..Selection::default()
        };
        let mut a = host("192.0.2.1", true);
        a["metadata"] = json!({"version": "2"});
        let mut b = host("192.0.2.2", false);
        b["metadata"] = json!({"version": "2"});
        let meta = s
            .build(&key(), &info(vec![a, b]))
            .service
            .expect("published");
        assert_eq!(
            meta.metadata.labels.get("version").map(String::as_str),
            Some("2")
        );
        assert_eq!(
            meta.metadata
                .annotations
                .get(SERVICE_ANNOTATION)
                .map(String::as_str),
            Some("orders")
        );
    }
}
