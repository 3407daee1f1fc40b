//! The registry instances one Kubernetes Service should have: pure, from the Service,
//! its EndpointSlices and the Nodes they run on.
//!
//! What is registered follows the Service's type, as consul-k8s users expect:
//! - ClusterIP (and headless): one instance per endpoint address, at the endpoint's
//!   port; with `cluster_ip` the Service's cluster IPs instead (one per IP family).
//! - NodePort: one instance per Node that runs an endpoint, at the Node's address
//!   ([`NodePortSync`]) and the node port.
//! - LoadBalancer: one instance per ingress IP or hostname, at the Service port; with
//!   `lb_endpoints`, the endpoints as for ClusterIP.
//! - ExternalName: one instance at the external name.
//!
//! Health is the endpoint's `ready` condition (absent counts as ready, as the API
//! defines it; a terminating endpoint is never ready): ready is passing, anything else
//! critical. An instance that gathers several endpoints (a Node, a cluster IP) passes
//! when any of them is ready.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use sha2::{Digest, Sha256};

use super::model::{meta_keys, Health, Instance, ServiceKey};

/// The main port of the Service (a port name or number).
pub const PORT_ANNOTATION: &str = "connector.flomesh.io/registry-port";
/// consul-k8s's [`PORT_ANNOTATION`].
pub const CONSUL_PORT_ANNOTATION: &str = "consul.hashicorp.com/service-port";
/// Extra registry tags, comma-separated.
pub const TAGS_ANNOTATION: &str = "connector.flomesh.io/registry-tags";
/// consul-k8s's [`TAGS_ANNOTATION`].
pub const CONSUL_TAGS_ANNOTATION: &str = "consul.hashicorp.com/service-tags";
/// Prefix of annotations that become registry metadata (`...-meta-team: shop`).
pub const META_ANNOTATION_PREFIX: &str = "connector.flomesh.io/registry-meta-";
/// consul-k8s's [`META_ANNOTATION_PREFIX`].
pub const CONSUL_META_ANNOTATION_PREFIX: &str = "consul.hashicorp.com/service-meta-";

/// Which Node address a NodePort Service is registered at (consul-k8s's
/// `-node-port-sync-type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum NodePortSync {
    /// The Node's ExternalIP; a Node without one is left out.
    #[default]
    ExternalOnly,
    /// The ExternalIP, else the InternalIP.
    ExternalFirst,
    /// The InternalIP.
    InternalOnly,
}

/// How Services become instances.
#[derive(Clone, Debug, Default)]
pub struct DesiredConfig {
    /// Register a ClusterIP Service's cluster IPs, not its endpoints.
    pub cluster_ip: bool,
    pub node_port: NodePortSync,
    /// Register a LoadBalancer Service's endpoints, not its ingress addresses.
    pub lb_endpoints: bool,
    /// The `--connector-id`, hashed into every instance id: two connectors sharing one
    /// Consul node (the default `k8s-sync`) and overlapping Pod ranges must never
    /// compute the same id, or each would overwrite the other's entry.
    pub connector_id: String,
}

/// Something left out of a Service's instances, reported (once while it lasts) by the
/// engine with the Service's name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Problem {
    /// The port annotation names no port of the Service; the first port is used.
    UnknownPort(String),
    /// An endpoint address that is not an IP (FQDN slices are not registered).
    BadAddress(String),
    /// A NodePort Service's main port has no node port yet.
    NoNodePort,
    /// A Node the Service runs on has no address of the configured kind.
    NodeWithoutAddress(String),
    /// An EndpointSlice without the main port.
    SliceWithoutPort(String),
}

impl Problem {
    /// The `reason` label value.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownPort(_) => "unknown_port",
            Self::BadAddress(_) => "bad_address",
            Self::NoNodePort => "no_node_port",
            Self::NodeWithoutAddress(_) => "node_without_address",
            Self::SliceWithoutPort(_) => "slice_without_port",
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnknownPort(p) => write!(
                f,
                "the port annotation names no port of the Service ({p:?}); using the first port"
            ),
            Self::BadAddress(a) => write!(f, "endpoint address {a:?} is not an IP address"),
            Self::NoNodePort => write!(f, "the main port has no node port yet"),
            Self::NodeWithoutAddress(n) => {
                write!(f, "node {n:?} has no address of the configured kind")
            }
            Self::SliceWithoutPort(s) => write!(f, "EndpointSlice {s:?} lacks the main port"),
        }
    }
}

/// The instances of one Service and what was left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub instances: Vec<Instance>,
    pub problems: Vec<Problem>,
}

/// The instances `svc` (registered as `registry_name`) should have. `slices` are the
/// Service's EndpointSlices; `node` looks a Node up by name.
pub fn desired_instances<'a, 'n>(
    svc: &Service,
    registry_name: &str,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: impl Fn(&str) -> Option<&'n Node>,
    cfg: &DesiredConfig,
) -> Desired {
    let key = ServiceKey::new(
        svc.metadata.namespace.clone().unwrap_or_default(),
        svc.metadata.name.clone().unwrap_or_default(),
    );
    let spec = svc.spec.clone().unwrap_or_default();
    let ports = spec.ports.clone().unwrap_or_default();
    let mut problems = Vec::new();
    let main = main_port(svc, &ports, &mut problems);
    let base = Base {
        connector: cfg.connector_id.clone(),
        key,
        service: registry_name.to_string(),
        tags: annotation_tags(svc),
        meta: annotation_meta(svc),
    };
    let slices: Vec<&EndpointSlice> = slices.into_iter().collect();
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    let mut out = Vec::new();
    match kind {
        "ExternalName" => {
            if let Some(name) = spec.external_name.as_deref().filter(|n| !n.is_empty()) {
                let port = main.map(|p| p.port).unwrap_or(0);
                out.push(base.instance(
                    name.to_string(),
                    clamp(port),
                    service_ports(&ports, |p| Some(p.port)),
                    Health::Passing,
                ));
            }
        }
        "NodePort" => node_port_instances(
            &base,
            main,
            &ports,
            &slices,
            node,
            cfg.node_port,
            &mut out,
            &mut problems,
        ),
        "LoadBalancer" if !cfg.lb_endpoints => {
            let port = main.map(|p| clamp(p.port)).unwrap_or(0);
            let named = service_ports(&ports, |p| Some(p.port));
            let ingress = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref());
            for entry in ingress.into_iter().flatten() {
                let address = entry
                    .ip
                    .as_deref()
                    .and_then(canonical_ip)
                    .or_else(|| entry.hostname.clone().filter(|h| !h.is_empty()));
                if let Some(address) = address {
                    out.push(base.instance(address, port, named.clone(), Health::Passing));
                }
            }
        }
        _ => {
            let cluster_ips = cluster_ips(&spec);
            if cfg.cluster_ip && kind == "ClusterIP" && !cluster_ips.is_empty() {
                let ready = slices.iter().any(|s| s.endpoints.iter().any(is_ready));
                let health = if ready {
                    Health::Passing
                } else {
                    Health::Critical
                };
                let port = main.map(|p| clamp(p.port)).unwrap_or(0);
                let named = service_ports(&ports, |p| Some(p.port));
                for ip in cluster_ips {
                    out.push(base.instance(ip, port, named.clone(), health));
                }
            } else {
                endpoint_instances(&base, main, &slices, &mut out, &mut problems);
            }
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out.dedup_by(|a, b| a.id == b.id);
    problems.sort();
    problems.dedup();
    Desired {
        instances: out,
        problems,
    }
}

/// What every instance of one Service shares.
struct Base {
    connector: String,
    key: ServiceKey,
    service: String,
    tags: Vec<String>,
    meta: BTreeMap<String, String>,
}

impl Base {
    fn instance(
        &self,
        address: String,
        port: u16,
        ports: BTreeMap<String, u16>,
        health: Health,
    ) -> Instance {
        Instance {
            id: instance_id(&self.connector, &self.service, &self.key, &address, port),
            service: self.service.clone(),
            source: self.key.clone(),
            address,
            port,
            ports,
            health,
            tags: self.tags.clone(),
            meta: self.meta.clone(),
        }
    }
}

/// `<registry name>-<12 hex digits>`: stable across restarts and releases (SHA-256 of
/// the source Service, address and port), unique per address and port, readable in the
/// registry's UI. Characters a registry id should not hold become `-`.
pub fn instance_id(
    connector: &str,
    service: &str,
    key: &ServiceKey,
    address: &str,
    port: u16,
) -> String {
    let mut hasher = Sha256::new();
    for part in [
        connector,
        key.namespace.as_str(),
        key.name.as_str(),
        address,
    ] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    hasher.update(port.to_be_bytes());
    let digest = hasher.finalize();
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    let name: String = service
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{name}-{hex}")
}

fn main_port<'p>(
    svc: &Service,
    ports: &'p [ServicePort],
    problems: &mut Vec<Problem>,
) -> Option<&'p ServicePort> {
    let annotations = svc.metadata.annotations.as_ref();
    let wanted = annotations
        .and_then(|a| {
            a.get(PORT_ANNOTATION)
                .or_else(|| a.get(CONSUL_PORT_ANNOTATION))
        })
        .map(|v| v.trim())
        .filter(|v| !v.is_empty());
    if let Some(wanted) = wanted {
        let found = ports.iter().find(|p| {
            p.name.as_deref() == Some(wanted) || wanted.parse::<i32>().is_ok_and(|n| n == p.port)
        });
        match found {
            Some(p) => return Some(p),
            None => problems.push(Problem::UnknownPort(wanted.to_string())),
        }
    }
    ports.first()
}

fn clamp(port: i32) -> u16 {
    u16::try_from(port).unwrap_or(0)
}

/// Named ports, `value` picking the number each registers at.
fn service_ports(
    ports: &[ServicePort],
    value: impl Fn(&ServicePort) -> Option<i32>,
) -> BTreeMap<String, u16> {
    ports
        .iter()
        .filter_map(|p| {
            let name = p.name.clone().filter(|n| !n.is_empty())?;
            let port = u16::try_from(value(p)?).ok().filter(|p| *p > 0)?;
            Some((name, port))
        })
        .collect()
}

fn cluster_ips(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Vec<String> {
    let mut ips: Vec<String> = spec
        .cluster_ips
        .clone()
        .filter(|ips| !ips.is_empty())
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
        .unwrap_or_default()
        .iter()
        .filter_map(|ip| canonical_ip(ip))
        .collect();
    ips.dedup();
    ips
}

fn canonical_ip(text: &str) -> Option<String> {
    text.trim().parse::<IpAddr>().ok().map(|ip| ip.to_string())
}

fn is_ready(ep: &k8s_openapi::api::discovery::v1::Endpoint) -> bool {
    let conditions = ep.conditions.as_ref();
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    !terminating && conditions.and_then(|c| c.ready).unwrap_or(true)
}

fn endpoint_instances(
    base: &Base,
    main: Option<&ServicePort>,
    slices: &[&EndpointSlice],
    out: &mut Vec<Instance>,
    problems: &mut Vec<Problem>,
) {
    // (address, port) -> (named ports, any endpoint ready)
    let mut found: BTreeMap<(String, u16), (BTreeMap<String, u16>, bool)> = BTreeMap::new();
    for slice in slices {
        if slice.address_type == "FQDN" {
            continue;
        }
        let slice_ports: Vec<(String, u16)> = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    u16::try_from(p.port?).ok()?,
                ))
            })
            .collect();
        let port = match main {
            None => Some(0),
            Some(main) => {
                let name = main.name.clone().unwrap_or_default();
                slice_ports
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, p)| *p)
            }
        };
        let Some(port) = port else {
            if !slice.endpoints.is_empty() {
                problems.push(Problem::SliceWithoutPort(
                    slice.metadata.name.clone().unwrap_or_default(),
                ));
            }
            continue;
        };
        let named: BTreeMap<String, u16> = slice_ports
            .into_iter()
            .filter(|(n, _)| !n.is_empty())
            .collect();
        for ep in &slice.endpoints {
            let ready = is_ready(ep);
            for address in &ep.addresses {
                let Some(ip) = canonical_ip(address) else {
                    problems.push(Problem::BadAddress(address.clone()));
                    continue;
                };
                let entry = found
                    .entry((ip, port))
                    .or_insert_with(|| (named.clone(), false));
                entry.1 |= ready;
            }
        }
    }
    for ((address, port), (named, ready)) in found {
        let health = if ready {
            Health::Passing
        } else {
            Health::Critical
        };
        out.push(base.instance(address, port, named, health));
    }
}

#[allow(clippy::too_many_arguments)]
fn node_port_instances<'n>(
    base: &Base,
    main: Option<&ServicePort>,
    ports: &[ServicePort],
    slices: &[&EndpointSlice],
    node: impl Fn(&str) -> Option<&'n Node>,
    sync: NodePortSync,
    out: &mut Vec<Instance>,
    problems: &mut Vec<Problem>,
) {
    let Some(port) = main
        .and_then(|p| p.node_port)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p > 0)
    else {
        problems.push(Problem::NoNodePort);
        return;
    };
    let named = service_ports(ports, |p| p.node_port);
    // Node name -> any endpoint on it ready.
    let mut nodes: BTreeMap<&str, bool> = BTreeMap::new();
    for slice in slices {
        for ep in &slice.endpoints {
            if let Some(name) = ep.node_name.as_deref() {
                *nodes.entry(name).or_default() |= is_ready(ep);
            }
        }
    }
    let mut seen = BTreeSet::new();
    for (name, ready) in nodes {
        let Some(address) = node_address(node(name), sync) else {
            problems.push(Problem::NodeWithoutAddress(name.to_string()));
            continue;
        };
        if !seen.insert(address.clone()) {
            continue;
        }
        let health = if ready {
            Health::Passing
        } else {
            Health::Critical
        };
        out.push(base.instance(address, port, named.clone(), health));
    }
}

/// A Node's address of the configured kind.
fn node_address(node: Option<&Node>, sync: NodePortSync) -> Option<String> {
    let addresses = node?.status.as_ref()?.addresses.as_ref()?;
    let of = |kind: &str| {
        addresses
            .iter()
            .filter(|a| a.type_ == kind)
            .find_map(|a| canonical_ip(&a.address))
    };
    match sync {
        NodePortSync::ExternalOnly => of("ExternalIP"),
        NodePortSync::ExternalFirst => of("ExternalIP").or_else(|| of("InternalIP")),
        NodePortSync::InternalOnly => of("InternalIP"),
    }
}

fn annotation_tags(svc: &Service) -> Vec<String> {
    let Some(annotations) = svc.metadata.annotations.as_ref() else {
        return Vec::new();
    };
    let mut tags: Vec<String> = [TAGS_ANNOTATION, CONSUL_TAGS_ANNOTATION]
        .iter()
        .filter_map(|k| annotations.get(*k))
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    tags.sort();
    tags.dedup();
    tags
}

fn annotation_meta(svc: &Service) -> BTreeMap<String, String> {
    let Some(annotations) = svc.metadata.annotations.as_ref() else {
        return BTreeMap::new();
    };
    let mut meta = BTreeMap::new();
    // consul-k8s's first, so that ours win on the same key.
    for prefix in [CONSUL_META_ANNOTATION_PREFIX, META_ANNOTATION_PREFIX] {
        for (k, v) in annotations {
            if let Some(key) = k.strip_prefix(prefix) {
                if !key.is_empty() && !meta_keys::is_reserved(key) {
                    meta.insert(key.to_string(), v.clone());
                }
            }
        }
    }
    meta
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        LoadBalancerIngress, LoadBalancerStatus, NodeAddress, NodeStatus, ServiceSpec,
        ServiceStatus,
    };
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn port(name: &str, port: i32, node_port: Option<i32>) -> ServicePort {
        ServicePort {
            name: (!name.is_empty()).then(|| name.to_string()),
            port,
            node_port,
            ..Default::default()
        }
    }

    fn service(type_: &str, ports: Vec<ServicePort>, annotations: &[(&str, &str)]) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some("shop".into()),
                name: Some("web".into()),
                annotations: (!annotations.is_empty()).then(|| {
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect()
                }),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some(type_.into()),
                ports: Some(ports),
                cluster_ip: Some("10.96.0.10".into()),
                cluster_ips: Some(vec!["10.96.0.10".into(), "fd00::a".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn endpoint(ip: &str, ready: Option<bool>, terminating: Option<bool>, node: &str) -> Endpoint {
        Endpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions {
                ready,
                serving: ready,
                terminating,
            }),
            node_name: (!node.is_empty()).then(|| node.to_string()),
            ..Default::default()
        }
    }

    fn slice(
        name: &str,
        family: &str,
        ports: &[(&str, i32)],
        endpoints: Vec<Endpoint>,
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                ..Default::default()
            },
            address_type: family.into(),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| EndpointPort {
                        name: Some(n.to_string()),
                        port: Some(*p),
                        ..Default::default()
                    })
                    .collect(),
            ),
            endpoints,
        }
    }

    fn no_nodes<'a>(_: &str) -> Option<&'a Node> {
        None
    }

    fn summary(d: &Desired) -> Vec<(String, u16, Health)> {
        let mut v: Vec<_> = d
            .instances
            .iter()
            .map(|i| (i.address.clone(), i.port, i.health))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn endpoints_become_instances_with_their_readiness() {
        let svc = service(
            "ClusterIP",
            vec![port("http", 80, None), port("admin", 9000, None)],
            &[],
        );
        let s = slice(
            "web-abc",
            "IPv4",
            &[("http", 8080), ("admin", 9090)],
            vec![
                endpoint("192.0.2.1", Some(true), Some(false), "n1"),
                endpoint("192.0.2.2", None, None, "n1"),
                endpoint("192.0.2.3", Some(false), Some(false), "n1"),
                endpoint("192.0.2.4", Some(false), Some(true), "n1"),
            ],
        );
        let d = desired_instances(&svc, "web", [&s], no_nodes, &DesiredConfig::default());
        assert_eq!(
            summary(&d),
            vec![
                ("192.0.2.1".into(), 8080, Health::Passing),
                ("192.0.2.2".into(), 8080, Health::Passing),
                ("192.0.2.3".into(), 8080, Health::Critical),
                ("192.0.2.4".into(), 8080, Health::Critical),
            ]
        );
        let first = &d
            .instances
            .iter()
            .find(|i| i.address == "192.0.2.1")
            .unwrap();
        assert_eq!(first.ports.get("admin"), Some(&9090));
        assert_eq!(first.source, ServiceKey::new("shop", "web"));
        assert!(first.id.starts_with("web-"));
        assert!(d.problems.is_empty());
    }

    #[test]
    fn dual_stack_slices_and_an_endpoint_in_two_slices() {
        let svc = service("ClusterIP", vec![port("http", 80, None)], &[]);
        let v4 = slice(
            "a",
            "IPv4",
            &[("http", 8080)],
            vec![endpoint("192.0.2.1", Some(false), None, "")],
        );
        let v4_again = slice(
            "b",
            "IPv4",
            &[("http", 8080)],
            vec![endpoint("192.0.2.1", Some(true), None, "")],
        );
        let v6 = slice(
            "c",
            "IPv6",
            &[("http", 8080)],
            vec![endpoint("2001:db8:0:0::1", Some(true), None, "")],
        );
        let fqdn = slice(
            "d",
            "FQDN",
            &[("http", 8080)],
            vec![endpoint("db.example.com", Some(true), None, "")],
        );
        let d = desired_instances(
            &svc,
            "web",
            [&v4, &v4_again, &v6, &fqdn],
            no_nodes,
            &DesiredConfig::default(),
        );
        assert_eq!(
            summary(&d),
            vec![
                ("192.0.2.1".into(), 8080, Health::Passing),
                ("2001:db8::1".into(), 8080, Health::Passing)
            ]
        );
    }

    #[test]
    fn the_port_annotation_picks_the_main_port() {
        let ports = vec![port("admin", 9000, None), port("http", 80, None)];
        let s = slice(
            "a",
            "IPv4",
            &[("admin", 9090), ("http", 8080)],
            vec![endpoint("192.0.2.1", None, None, "")],
        );
        let by_name = service("ClusterIP", ports.clone(), &[(PORT_ANNOTATION, "http")]);
        let d = desired_instances(&by_name, "web", [&s], no_nodes, &DesiredConfig::default());
        assert_eq!(d.instances[0].port, 8080);
        let by_number = service(
            "ClusterIP",
            ports.clone(),
            &[(CONSUL_PORT_ANNOTATION, "80")],
        );
        let d = desired_instances(&by_number, "web", [&s], no_nodes, &DesiredConfig::default());
        assert_eq!(d.instances[0].port, 8080);
        let unknown = service("ClusterIP", ports, &[(PORT_ANNOTATION, "grpc")]);
        let d = desired_instances(&unknown, "web", [&s], no_nodes, &DesiredConfig::default());
        assert_eq!(d.instances[0].port, 9090);
        assert_eq!(d.problems, vec![Problem::UnknownPort("grpc".into())]);
    }

    #[test]
    fn bad_addresses_and_slices_without_the_port_are_reported() {
        let svc = service("ClusterIP", vec![port("http", 80, None)], &[]);
        let bad = slice(
            "a",
            "IPv4",
            &[("http", 8080)],
            vec![endpoint("not-an-ip", Some(true), None, "")],
        );
        let portless = slice(
            "b",
            "IPv4",
            &[("other", 1)],
            vec![endpoint("192.0.2.9", Some(true), None, "")],
        );
        let d = desired_instances(
            &svc,
            "web",
            [&bad, &portless],
            no_nodes,
            &DesiredConfig::default(),
        );
        assert!(d.instances.is_empty());
        assert_eq!(
            d.problems,
            vec![
                Problem::BadAddress("not-an-ip".into()),
                Problem::SliceWithoutPort("b".into())
            ]
        );
    }

    #[test]
    fn cluster_ip_mode_registers_each_family_once() {
        let svc = service("ClusterIP", vec![port("http", 80, None)], &[]);
        let s = slice(
            "a",
            "IPv4",
            &[("http", 8080)],
            vec![endpoint("192.0.2.1", Some(false), None, "")],
        );
        let cfg = DesiredConfig {
            cluster_ip: true,
            ..Default::default()
        };
        let d = desired_instances(&svc, "web", [&s], no_nodes, &cfg);
        assert_eq!(
            summary(&d),
            vec![
                ("10.96.0.10".into(), 80, Health::Critical),
                ("fd00::a".into(), 80, Health::Critical)
            ]
        );
        let ready = slice(
            "a",
            "IPv4",
            &[("http", 8080)],
            vec![endpoint("192.0.2.1", Some(true), None, "")],
        );
        let d = desired_instances(&svc, "web", [&ready], no_nodes, &cfg);
        assert!(d.instances.iter().all(|i| i.health == Health::Passing));
    }

    #[test]
    fn node_ports_register_the_nodes_that_run_endpoints() {
        let node = |name: &str, addrs: &[(&str, &str)]| Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            status: Some(NodeStatus {
                addresses: Some(
                    addrs
                        .iter()
                        .map(|(t, a)| NodeAddress {
                            type_: t.to_string(),
                            address: a.to_string(),
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        let n1 = node(
            "n1",
            &[
                ("InternalIP", "198.51.100.1"),
                ("ExternalIP", "203.0.113.1"),
            ],
        );
        let n2 = node("n2", &[("InternalIP", "198.51.100.2")]);
        let nodes: BTreeMap<String, Node> = [("n1".to_string(), n1), ("n2".to_string(), n2)].into();
        let lookup = |name: &str| nodes.get(name);
        let svc = service("NodePort", vec![port("http", 80, Some(30080))], &[]);
        let s = slice(
            "a",
            "IPv4",
            &[("http", 8080)],
            vec![
                endpoint("192.0.2.1", Some(false), None, "n1"),
                endpoint("192.0.2.2", Some(true), None, "n1"),
                endpoint("192.0.2.3", Some(false), None, "n2"),
            ],
        );
        let external = desired_instances(&svc, "web", [&s], lookup, &DesiredConfig::default());
        assert_eq!(
            summary(&external),
            vec![("203.0.113.1".into(), 30080, Health::Passing)]
        );
        assert_eq!(
            external.problems,
            vec![Problem::NodeWithoutAddress("n2".into())]
        );
        let first = DesiredConfig {
            node_port: NodePortSync::ExternalFirst,
            ..Default::default()
        };
        let d = desired_instances(&svc, "web", [&s], lookup, &first);
        assert_eq!(
            summary(&d),
            vec![
                ("198.51.100.2".into(), 30080, Health::Critical),
                ("203.0.113.1".into(), 30080, Health::Passing)
            ]
        );
        let internal = DesiredConfig {
            node_port: NodePortSync::InternalOnly,
            ..Default::default()
        };
        let d = desired_instances(&svc, "web", [&s], lookup, &internal);
        assert_eq!(
            summary(&d),
            vec![
                ("198.51.100.1".into(), 30080, Health::Passing),
                ("198.51.100.2".into(), 30080, Health::Critical)
            ]
        );
        let unassigned = service("NodePort", vec![port("http", 80, None)], &[]);
        let d = desired_instances(&unassigned, "web", [&s], lookup, &DesiredConfig::default());
        assert_eq!(d.problems, vec![Problem::NoNodePort]);
    }

    #[test]
    fn load_balancers_register_their_ingress_or_endpoints() {
        let mut svc = service("LoadBalancer", vec![port("http", 80, Some(30080))], &[]);
        svc.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![
                    LoadBalancerIngress {
                        ip: Some("203.0.113.7".into()),
                        ..Default::default()
                    },
                    LoadBalancerIngress {
                        hostname: Some("lb.example.net".into()),
                        ..Default::default()
                    },
                ]),
            }),
            ..Default::default()
        });
        let s = slice(
            "a",
            "IPv4",
            &[("http", 8080)],
            vec![endpoint("192.0.2.1", Some(true), None, "")],
        );
        let d = desired_instances(&svc, "web", [&s], no_nodes, &DesiredConfig::default());
        assert_eq!(
            summary(&d),
            vec![
                ("203.0.113.7".into(), 80, Health::Passing),
                ("lb.example.net".into(), 80, Health::Passing)
            ]
        );
        let cfg = DesiredConfig {
            lb_endpoints: true,
            ..Default::default()
        };
        let d = desired_instances(&svc, "web", [&s], no_nodes, &cfg);
        assert_eq!(
            summary(&d),
            vec![("192.0.2.1".into(), 8080, Health::Passing)]
        );
    }

    #[test]
    fn external_names_register_the_name() {
        let mut svc = service("ExternalName", vec![port("http", 80, None)], &[]);
        svc.spec.as_mut().unwrap().external_name = Some("db.example.org".into());
        let d = desired_instances(
            &svc,
            "db",
            Vec::<&EndpointSlice>::new(),
            no_nodes,
            &DesiredConfig::default(),
        );
        assert_eq!(
            summary(&d),
            vec![("db.example.org".into(), 80, Health::Passing)]
        );
    }

    #[test]
    fn tags_and_meta_from_annotations_never_the_reserved_keys() {
        let svc = service(
            "ClusterIP",
            vec![port("http", 80, None)],
            &[
                (TAGS_ANNOTATION, "b, a,,a"),
                (CONSUL_TAGS_ANNOTATION, "c"),
                ("connector.flomesh.io/registry-meta-team", "shop"),
                ("consul.hashicorp.com/service-meta-team", "old"),
                ("consul.hashicorp.com/service-meta-tier", "web"),
                (
                    "connector.flomesh.io/registry-meta-registry-connector-id",
                    "evil",
                ),
                ("connector.flomesh.io/registry-meta-port-http", "1"),
            ],
        );
        let s = slice(
            "a",
            "IPv4",
            &[("http", 8080)],
            vec![endpoint("192.0.2.1", None, None, "")],
        );
        let d = desired_instances(&svc, "web", [&s], no_nodes, &DesiredConfig::default());
        let i = &d.instances[0];
        assert_eq!(i.tags, vec!["a", "b", "c"]);
        assert_eq!(
            i.meta,
            BTreeMap::from([
                ("team".to_string(), "shop".to_string()),
                ("tier".to_string(), "web".to_string())
            ])
        );
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        let key = ServiceKey::new("shop", "web");
        let a = instance_id("c", "web", &key, "192.0.2.1", 8080);
        assert_eq!(a, instance_id("c", "web", &key, "192.0.2.1", 8080));
        assert_ne!(a, instance_id("c", "web", &key, "192.0.2.1", 8081));
        assert_ne!(
            a,
            instance_id(
                "c",
                "web",
                &ServiceKey::new("shop2", "web"),
                "192.0.2.1",
                8080
            )
        );
        assert_ne!(
            a,
            instance_id("other-connector", "web", &key, "192.0.2.1", 8080)
        );
        assert_eq!(a.len(), "web-".len() + 12);
        assert!(instance_id("c", "a b/c", &key, "x", 1).starts_with("a-b-c-"));
    }
}
