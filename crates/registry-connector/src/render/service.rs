//! The desired Service for one registry service.
//!
//! The Service carries the seed's contract (the `cloud-sourced-service` label, the
//! `mesh-service-sync: "false"` and `cloud-service-inherited-from` annotations, ports named
//! `<protocol><port>` with `appProtocol`) and **no selector**: with a selector, the built-in
//! endpoints and EndpointSlice controllers would manage its endpoints from Pods and fight
//! the connector (one of the original's defects). Only fields we own are set; the apiserver
//! fills in the rest (`clusterIP` allocation, `ipFamilies`, `sessionAffinity`, ...), and
//! [`crate::diff`] ignores them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    base_labels, object_meta, port_specs, PortSpec, RenderConfig, ServiceMode, PORT_PROTOCOL,
};
use crate::labels::{
    metadata_keys_value, parse_metadata_keys, CLOUD_SERVICE_INHERITED_FROM_ANNOTATION,
    CLOUD_SOURCED_SERVICE_LABEL, CONNECTOR_INSTANCE_LABEL, MANAGED_BY_LABEL,
    MESH_SERVICE_SYNC_ANNOTATION, METADATA_KEYS_ANNOTATION,
};
use crate::model::MicroSvcMeta;

/// Service `type` for headless and ClusterIP modes.
pub const TYPE_CLUSTER_IP: &str = "ClusterIP";
/// Service `type` for ExternalName mode.
pub const TYPE_EXTERNAL_NAME: &str = "ExternalName";
/// The `clusterIP` value that makes a Service headless.
pub const CLUSTER_IP_NONE: &str = "None";

/// The Service that should exist for `meta`, named `kube_name` (see
/// [`crate::naming::kube_service_name`]).
///
/// Ports are [`MicroSvcMeta::ports`], each with `targetPort` equal to `port` (there is no
/// Pod to translate to), protocol TCP and the `appProtocol` of
/// [`crate::naming::app_protocol`].
///
/// A service with no ports (no instances, or instances without ports) still renders:
/// headless and ExternalName Services may have no ports. A non-headless ClusterIP Service
/// may not (the apiserver answers `spec.ports: Required value`), so in ClusterIp mode a
/// port-less service renders headless; use [`desired_service_with_live`] to keep an
/// existing virtual IP instead.
pub fn desired_service(cfg: &RenderConfig, kube_name: &str, meta: &MicroSvcMeta) -> Service {
    desired_service_with_live(cfg, kube_name, meta, None)
}

/// What rendering needs to know of the live Service, kept in the sink's cache instead
/// of the Service itself (see `sink::project`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LiveService {
    /// Label keys the live Service carries that are not ours (neither set by every
    /// render nor listed in its metadata-keys annotation): registry metadata never takes
    /// them over. Usually empty, so nothing is allocated.
    taken_labels: Box<[Box<str>]>,
    /// The same for annotation keys.
    taken_annotations: Box<[Box<str>]>,
    /// The live ports, reduced to the fields we own, when the Service has a virtual IP
    /// (see [`desired_service_with_live`]); empty otherwise.
    virtual_ip_ports: Vec<ServicePort>,
}

impl LiveService {
    /// The projection of a live Service.
    pub fn of(live: &Service) -> Self {
        let (ours_labels, ours_annotations) = live
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(METADATA_KEYS_ANNOTATION))
            .map(|v| parse_metadata_keys(v))
            .unwrap_or_default();
        // Keys every render sets are never copied from registry metadata (`copy_absent`
        // skips them), so whether the live Service has them does not matter.
        let taken = |map: Option<&BTreeMap<String, String>>, ours: &[String], always: &[&str]| {
            map.into_iter()
                .flat_map(BTreeMap::keys)
                .filter(|key| !always.contains(&key.as_str()) && !ours.contains(key))
                .map(|key| Box::from(key.as_str()))
                .collect()
        };
        Self {
            taken_labels: taken(
                live.metadata.labels.as_ref(),
                &ours_labels,
                &[
                    MANAGED_BY_LABEL,
                    CONNECTOR_INSTANCE_LABEL,
                    CLOUD_SOURCED_SERVICE_LABEL,
                ],
            ),
            taken_annotations: taken(
                live.metadata.annotations.as_ref(),
                &ours_annotations,
                &[
                    MESH_SERVICE_SYNC_ANNOTATION,
                    CLOUD_SERVICE_INHERITED_FROM_ANNOTATION,
                ],
            ),
            virtual_ip_ports: live_virtual_ip_ports(live),
        }
    }
}

/// Like [`desired_service`], but when ClusterIp mode finds no ports and the live Service
/// already has a virtual IP and ports, keeps the live ports instead of falling back to
/// headless. Without this, a service whose instances all disappear for a moment would
/// have to be deleted and recreated (the apiserver does not switch a Service between
/// headless and a virtual IP in place) and would come back with a different IP. The kept
/// ports are harmless: with no instances there is nothing to route to anyway.
pub fn desired_service_with_live(
    cfg: &RenderConfig,
    kube_name: &str,
    meta: &MicroSvcMeta,
    live: Option<&LiveService>,
) -> Service {
    let service_ports = meta.ports();
    let all_ports = service_ports.keys().copied().collect();
    let mut ports: Vec<ServicePort> = port_specs(&all_ports, &service_ports, &BTreeMap::new())
        .into_iter()
        .map(service_port)
        .collect();

    let mut spec = ServiceSpec::default();
    match cfg.service_mode {
        ServiceMode::Headless => make_headless(&mut spec),
        ServiceMode::ClusterIp => {
            if ports.is_empty() {
                match live.map(|l| l.virtual_ip_ports.clone()).unwrap_or_default() {
                    kept if kept.is_empty() => make_headless(&mut spec),
                    kept => {
                        ports = kept;
                        spec.type_ = Some(TYPE_CLUSTER_IP.to_owned());
                    }
                }
            } else {
                spec.type_ = Some(TYPE_CLUSTER_IP.to_owned());
            }
        }
        ServiceMode::ExternalName => {
            spec.type_ = Some(TYPE_EXTERNAL_NAME.to_owned());
            // The apiserver requires a lowercase DNS-1123 subdomain here; DNS is
            // case-insensitive, so lowercasing loses nothing. Anything else invalid (a `_`)
            // is left for the apiserver to refuse: see `naming::is_valid_external_name`.
            spec.external_name = Some(meta.domain.as_str().trim().to_ascii_lowercase());
        }
    }
    spec.ports = (!ports.is_empty()).then_some(ports);

    let mut annotations = BTreeMap::from([
        (MESH_SERVICE_SYNC_ANNOTATION.to_owned(), "false".to_owned()),
        (
            CLOUD_SERVICE_INHERITED_FROM_ANNOTATION.to_owned(),
            meta.registry_name.as_str().to_owned(),
        ),
    ]);
    let mut labels = base_labels(cfg);
    // Registry metadata never overrides the contract (the allow-list refuses those keys
    // already; this keeps the renderer safe on its own), and only the keys really set
    // are listed as ours.
    let (metadata_labels, metadata_annotations) = metadata_not_foreign(meta, live);
    let copied_labels = copy_absent(&mut labels, &metadata_labels);
    let copied_annotations = copy_absent(&mut annotations, &metadata_annotations);
    if let Some(keys) = metadata_keys_value(&copied_labels, &copied_annotations) {
        annotations.insert(METADATA_KEYS_ANNOTATION.to_owned(), keys);
    }
    Service {
        metadata: object_meta(cfg, kube_name, labels, annotations, None),
        spec: Some(spec),
        status: None,
    }
}

/// The registry metadata to copy, without the keys another tool already set on the live
/// Service (present there but not listed as ours): the connector never takes over, and
/// so never later removes, somebody else's label or annotation.
fn metadata_not_foreign(
    meta: &MicroSvcMeta,
    live: Option<&LiveService>,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let Some(live) = live else {
        return (
            meta.metadata.labels.clone(),
            meta.metadata.annotations.clone(),
        );
    };
    let keep = |wanted: &BTreeMap<String, String>, taken: &[Box<str>]| {
        wanted
            .iter()
            .filter(|(key, _)| !taken.iter().any(|t| **t == ***key))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    (
        keep(&meta.metadata.labels, &live.taken_labels),
        keep(&meta.metadata.annotations, &live.taken_annotations),
    )
}

/// Inserts the entries of `from` whose keys `into` lacks; returns those keys.
fn copy_absent(
    into: &mut BTreeMap<String, String>,
    from: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut copied = Vec::new();
    for (key, value) in from {
        if !into.contains_key(key) {
            into.insert(key.clone(), value.clone());
            copied.push(key.clone());
        }
    }
    copied
}

fn make_headless(spec: &mut ServiceSpec) {
    spec.type_ = Some(TYPE_CLUSTER_IP.to_owned());
    spec.cluster_ip = Some(CLUSTER_IP_NONE.to_owned());
}

fn service_port(spec: PortSpec) -> ServicePort {
    ServicePort {
        name: Some(spec.name),
        port: spec.port,
        protocol: Some(PORT_PROTOCOL.to_owned()),
        app_protocol: spec.app_protocol,
        target_port: Some(IntOrString::Int(spec.port)),
        node_port: None,
    }
}

/// The ports of a live Service that has a virtual IP, reduced to the fields we own; empty
/// when it is headless, of another type, or has no ports.
fn live_virtual_ip_ports(live: &Service) -> Vec<ServicePort> {
    let Some(spec) = live.spec.as_ref() else {
        return Vec::new();
    };
    let is_cluster_ip = spec.type_.as_deref().unwrap_or(TYPE_CLUSTER_IP) == TYPE_CLUSTER_IP;
    let is_headless = spec.cluster_ip.as_deref() == Some(CLUSTER_IP_NONE);
    if !is_cluster_ip || is_headless {
        return Vec::new();
    }
    spec.ports
        .iter()
        .flatten()
        .map(|p| ServicePort {
            name: p.name.clone(),
            port: p.port,
            protocol: Some(PORT_PROTOCOL.to_owned()),
            app_protocol: p.app_protocol.clone(),
            target_port: Some(IntOrString::Int(p.port)),
            node_port: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::{
        is_owned, CLOUD_SOURCED_SERVICE_LABEL, CONNECTOR_INSTANCE_LABEL, MANAGED_BY_LABEL,
    };
    use crate::render::test_support::{cfg, ep, meta};

    fn ports_of(svc: &Service) -> Vec<(String, i32, String, Option<String>, i32)> {
        svc.spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .map(|p| {
                let target = match &p.target_port {
                    Some(IntOrString::Int(t)) => *t,
                    other => panic!("unexpected targetPort {other:?}"),
                };
                (
                    p.name.clone().unwrap_or_default(),
                    p.port,
                    p.protocol.clone().unwrap_or_default(),
                    p.app_protocol.clone(),
                    target,
                )
            })
            .collect()
    }

    fn spec(svc: &Service) -> &ServiceSpec {
        svc.spec.as_ref().expect("rendered services have a spec")
    }

    #[test]
    fn headless_service_with_seed_contract() {
        let m = meta(vec![
            ep("10.0.0.1", &[(8080, "http"), (9090, "grpc")], true),
            ep("10.0.0.2", &[(8080, "http")], false),
        ]);
        let svc = desired_service(&cfg(ServiceMode::Headless), "orders-service-v2", &m);

        assert_eq!(svc.metadata.name.as_deref(), Some("orders-service-v2"));
        assert_eq!(svc.metadata.namespace.as_deref(), Some("cloud"));
        assert_eq!(svc.metadata.resource_version, None);
        assert_eq!(svc.status, None);
        let labels = svc.metadata.labels.as_ref().expect("labels");
        assert_eq!(labels[CLOUD_SOURCED_SERVICE_LABEL], "true");
        assert_eq!(labels[MANAGED_BY_LABEL], "registry-connector");
        assert_eq!(labels[CONNECTOR_INSTANCE_LABEL], "c1");
        assert_eq!(labels.len(), 3);
        assert!(is_owned(&svc.metadata, "c1"));
        let annotations = svc.metadata.annotations.as_ref().expect("annotations");
        assert_eq!(annotations[MESH_SERVICE_SYNC_ANNOTATION], "false");
        assert_eq!(
            annotations[CLOUD_SERVICE_INHERITED_FROM_ANNOTATION],
            "Orders_Service.v2"
        );
        assert_eq!(svc.metadata.owner_references, None);

        let s = spec(&svc);
        assert_eq!(s.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(s.cluster_ip.as_deref(), Some("None"));
        assert_eq!(s.selector, None, "no selector, ever");
        assert_eq!(s.external_name, None);
        assert_eq!(
            ports_of(&svc),
            vec![
                (
                    "http8080".into(),
                    8080,
                    "TCP".into(),
                    Some("http".into()),
                    8080
                ),
                (
                    "grpc9090".into(),
                    9090,
                    "TCP".into(),
                    Some("grpc".into()),
                    9090
                ),
            ]
        );
    }

    #[test]
    fn cluster_ip_service_leaves_ip_to_the_apiserver() {
        let m = meta(vec![ep("10.0.0.1", &[(80, "http")], true)]);
        let svc = desired_service(&cfg(ServiceMode::ClusterIp), "orders", &m);
        let s = spec(&svc);
        assert_eq!(s.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(s.cluster_ip, None);
        assert_eq!(s.cluster_ips, None);
        assert_eq!(s.selector, None);
        assert_eq!(ports_of(&svc).len(), 1);
    }

    #[test]
    fn registry_metadata_becomes_labels_and_annotations_with_their_list() {
        let mut m = meta(vec![ep("10.0.0.1", &[(80, "http")], true)]);
        m.metadata.labels.insert("version".into(), "2.1".into());
        m.metadata.labels.insert(
            crate::labels::MANAGED_BY_LABEL.into(),
            "someone-else".into(),
        );
        m.metadata
            .annotations
            .insert("owner".into(), "team a".into());
        let svc = desired_service(&cfg(ServiceMode::Headless), "orders", &m);
        let labels = svc.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get("version").map(String::as_str), Some("2.1"));
        assert!(
            is_owned(&svc.metadata, "c1"),
            "the contract is never overridden"
        );
        let annotations = svc.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(annotations.get("owner").map(String::as_str), Some("team a"));
        assert_eq!(
            annotations
                .get(crate::labels::METADATA_KEYS_ANNOTATION)
                .map(String::as_str),
            Some("labels=version;annotations=owner")
        );
        let plain = desired_service(&cfg(ServiceMode::Headless), "orders", &meta(vec![]));
        assert!(!plain
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key(crate::labels::METADATA_KEYS_ANNOTATION));
    }

    #[test]
    fn metadata_never_takes_over_a_key_another_tool_set() {
        let mut m = meta(vec![ep("10.0.0.1", &[(80, "http")], true)]);
        m.metadata.labels.insert("team".into(), "registry".into());
        m.metadata.labels.insert("version".into(), "2".into());
        let first = desired_service(&cfg(ServiceMode::Headless), "orders", &m);
        // Live: `version` is ours (tracked), `team` was set by someone else.
        let mut live = first.clone();
        let labels = live.metadata.labels.get_or_insert_with(BTreeMap::new);
        labels.insert("team".into(), "theirs".into());
        live.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(
                crate::labels::METADATA_KEYS_ANNOTATION.into(),
                "labels=version;annotations=".into(),
            );
        let next = desired_service_with_live(
            &cfg(ServiceMode::Headless),
            "orders",
            &m,
            Some(&LiveService::of(&live)),
        );
        let labels = next.metadata.labels.unwrap_or_default();
        assert_eq!(labels.get("version").map(String::as_str), Some("2"));
        assert_eq!(labels.get("team"), None, "theirs, not rendered");
        assert_eq!(
            next.metadata
                .annotations
                .unwrap_or_default()
                .get(crate::labels::METADATA_KEYS_ANNOTATION)
                .map(String::as_str),
            Some("labels=version;annotations=")
        );
    }

    #[test]
    fn external_name_points_at_registry_domain() {
        let mut m = meta(vec![ep("10.0.0.1", &[(80, "http")], true)]);
        m.domain = "Orders.Service.Consul".into();
        let svc = desired_service(&cfg(ServiceMode::ExternalName), "orders", &m);
        let s = spec(&svc);
        assert_eq!(s.type_.as_deref(), Some("ExternalName"));
        assert_eq!(s.external_name.as_deref(), Some("orders.service.consul"));
        assert_eq!(s.cluster_ip, None);
        assert_eq!(
            ports_of(&svc).len(),
            1,
            "ports are documentation for clients"
        );
    }

    #[test]
    fn service_without_ports_renders_without_ports() {
        let m = meta(Vec::new());
        for mode in [ServiceMode::Headless, ServiceMode::ExternalName] {
            let svc = desired_service(&cfg(mode), "orders", &m);
            assert_eq!(spec(&svc).ports, None, "{mode}");
        }
        let headless = desired_service(&cfg(ServiceMode::Headless), "orders", &m);
        assert_eq!(spec(&headless).cluster_ip.as_deref(), Some("None"));
    }

    #[test]
    fn cluster_ip_without_ports_falls_back_to_headless() {
        let m = meta(Vec::new());
        let svc = desired_service(&cfg(ServiceMode::ClusterIp), "orders", &m);
        assert_eq!(spec(&svc).cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec(&svc).ports, None);
    }

    #[test]
    fn cluster_ip_without_ports_keeps_live_virtual_ip_ports() {
        let cfg = cfg(ServiceMode::ClusterIp);
        let with_ports = meta(vec![ep("10.0.0.1", &[(80, "http")], true)]);
        let mut live = desired_service(&cfg, "orders", &with_ports);
        // What the apiserver adds.
        if let Some(s) = live.spec.as_mut() {
            s.cluster_ip = Some("10.96.0.10".into());
            s.session_affinity = Some("None".into());
        }
        let empty = meta(Vec::new());
        let svc = desired_service_with_live(&cfg, "orders", &empty, Some(&LiveService::of(&live)));
        assert_eq!(spec(&svc).cluster_ip, None);
        assert_eq!(spec(&svc).type_.as_deref(), Some("ClusterIP"));
        assert_eq!(
            ports_of(&svc),
            vec![("http80".into(), 80, "TCP".into(), Some("http".into()), 80)]
        );

        // A headless live Service has no virtual IP to keep.
        let headless_live = desired_service(
            &crate::render::test_support::cfg(ServiceMode::Headless),
            "orders",
            &with_ports,
        );
        let svc = desired_service_with_live(
            &cfg,
            "orders",
            &empty,
            Some(&LiveService::of(&headless_live)),
        );
        assert_eq!(spec(&svc).cluster_ip.as_deref(), Some("None"));

        // With ports known, the live Service does not matter.
        let svc = desired_service_with_live(
            &cfg,
            "orders",
            &with_ports,
            Some(&LiveService::of(&headless_live)),
        );
        assert_eq!(spec(&svc).cluster_ip, None);
    }

    #[test]
    fn unusual_protocols_render_valid_ports() {
        let m = meta(vec![ep(
            "10.0.0.1",
            &[(8443, "kubernetes.io/h2c"), (7000, "my proto")],
            true,
        )]);
        let svc = desired_service(&cfg(ServiceMode::Headless), "orders", &m);
        assert_eq!(
            ports_of(&svc),
            vec![
                ("my-proto7000".into(), 7000, "TCP".into(), None, 7000),
                (
                    "kubernetes8443".into(),
                    8443,
                    "TCP".into(),
                    Some("kubernetes.io/h2c".into()),
                    8443
                ),
            ]
        );
    }

    #[test]
    fn rendering_is_deterministic() {
        let a = meta(vec![
            ep("10.0.0.2", &[(80, "grpc")], true),
            ep("10.0.0.1", &[(80, "http")], true),
        ]);
        let b = meta(vec![
            ep("10.0.0.1", &[(80, "http")], true),
            ep("10.0.0.2", &[(80, "grpc")], true),
        ]);
        let cfg = cfg(ServiceMode::Headless);
        assert_eq!(
            desired_service(&cfg, "orders", &a),
            desired_service(&cfg, "orders", &b)
        );
    }
}
