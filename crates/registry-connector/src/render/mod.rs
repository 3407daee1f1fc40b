//! Desired-state rendering: one registry service ([`MicroSvcMeta`]) in, the Kubernetes
//! objects that should exist for it out.
//!
//! This module owns the rendering configuration ([`RenderConfig`], [`ServiceMode`]), the
//! metadata every rendered object shares (name, namespace, ownership labels; never a
//! resourceVersion or status, which belong to the apiserver), the owner reference that ties
//! slices and Endpoints to their Service, and the port and grouping rules shared by the
//! Service ([`service`]), the legacy Endpoints ([`endpoints`]) and the EndpointSlices
//! ([`crate::slicing`]). Rendering is pure and total: every [`MicroSvcMeta`] renders to
//! objects the apiserver accepts, so there is no error path here. Nothing in this module
//! reads the cluster or decides whether a write is needed (see [`crate::diff`]).

pub mod endpoints;
pub mod service;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::labels::{owner_labels, CLOUD_SOURCED_SERVICE_LABEL};
use crate::model::{
    normalize_endpoints, MicroEndpoint, MicroEndpointAddr, MicroSvcAppProtocol, MicroSvcMeta,
    MicroSvcPort,
};
use crate::naming::{app_protocol, port_name};

pub use endpoints::desired_endpoints;
pub use service::{desired_service, desired_service_with_live, LiveService};

/// Endpoints per EndpointSlice unless configured otherwise; the same default as the
/// built-in EndpointSlice controller (`--max-endpoints-per-slice`).
pub const DEFAULT_MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// The apiserver refuses EndpointSlices with more endpoints than this.
pub const MAX_ENDPOINTS_PER_SLICE_LIMIT: usize = 1000;

/// The only transport protocol a registry instance is assumed to speak. Registries do not
/// report UDP/SCTP; TCP is also what the apiserver would default.
pub const PORT_PROTOCOL: &str = "TCP";

/// How the rendered objects look; fixed for the life of the process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderConfig {
    /// The namespace every object is written to (the seed's sync namespace).
    pub namespace: String,
    /// This connector's instance id; becomes the value of the instance label.
    pub connector_id: String,
    /// Which kind of Service to render.
    pub service_mode: ServiceMode,
    /// Also render legacy `v1/Endpoints` for consumers that have not moved to slices.
    pub legacy_endpoints: bool,
    /// Endpoints per EndpointSlice; clamped to `1..=1000` when used.
    pub max_endpoints_per_slice: usize,
}

impl RenderConfig {
    /// The defaults: headless Services, legacy Endpoints on, 100 endpoints per slice.
    pub fn new(namespace: impl Into<String>, connector_id: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            connector_id: connector_id.into(),
            service_mode: ServiceMode::default(),
            legacy_endpoints: true,
            max_endpoints_per_slice: DEFAULT_MAX_ENDPOINTS_PER_SLICE,
        }
    }

    /// The slice capacity actually used: 0 would never place an endpoint and over 1000 the
    /// apiserver rejects the slice, so the configured value is clamped to `1..=1000`.
    pub fn slice_capacity(&self) -> usize {
        self.max_endpoints_per_slice
            .clamp(1, MAX_ENDPOINTS_PER_SLICE_LIMIT)
    }
}

/// The kind of Service rendered for each registry service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ServiceMode {
    /// `clusterIP: None`: DNS returns the instance addresses directly; no virtual IP, no
    /// kube-proxy rules. The default, as in the seed.
    #[default]
    Headless,
    /// A virtual IP balanced by kube-proxy (or the mesh) over the EndpointSlices.
    ClusterIp,
    /// A CNAME to the registry's own DNS name (`externalName`); no endpoints at all.
    ExternalName,
}

impl ServiceMode {
    /// The flag spelling: `headless`, `cluster-ip` or `external-name`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Headless => "headless",
            Self::ClusterIp => "cluster-ip",
            Self::ExternalName => "external-name",
        }
    }

    /// Whether this mode publishes endpoints (slices and Endpoints); ExternalName does not,
    /// since DNS resolves to the registry's name instead.
    pub fn has_endpoints(self) -> bool {
        !matches!(self, Self::ExternalName)
    }
}

impl fmt::Display for ServiceMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `--service-mode` value that is none of the accepted spellings.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown service mode {input:?}: expected headless, cluster-ip or external-name")]
pub struct ParseServiceModeError {
    /// The rejected value.
    pub input: String,
}

impl FromStr for ServiceMode {
    type Err = ParseServiceModeError;

    /// Accepts `headless`, `cluster-ip` and `external-name`, case-insensitively, and the
    /// Kubernetes spellings `ClusterIP` / `ExternalName` that operators type by habit.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        match input.trim().to_ascii_lowercase().as_str() {
            "headless" => Ok(Self::Headless),
            "cluster-ip" | "clusterip" => Ok(Self::ClusterIp),
            "external-name" | "externalname" => Ok(Self::ExternalName),
            _ => Err(ParseServiceModeError {
                input: input.to_owned(),
            }),
        }
    }
}

/// The owner reference that makes the garbage collector delete a Service's slices and
/// Endpoints with it. `None` until the Service has a uid (it has not been created yet);
/// render without an owner then and add it on the next reconcile.
///
/// `controller` is false because the Service does not control these objects, this
/// connector does: a controller reference would invite other controllers and tools that
/// follow `GetControllerOf` to treat the Service's (non-existent) controller as their
/// manager. `blockOwnerDeletion` is false because setting it to true requires permission
/// to update the Service's `finalizers` subresource when the apiserver runs the
/// `OwnerReferencesPermissionEnforcement` admission plugin, which a least-privilege role
/// does not grant, and because nothing is gained by making a foreground deletion of the
/// Service wait for its slices.
pub fn owner_reference(service: &Service) -> Option<OwnerReference> {
    owner_reference_to(
        service.metadata.name.as_deref()?,
        service.metadata.uid.as_deref()?,
    )
}

/// [`owner_reference`] for the Service `name` with `uid`, when only those are known (the
/// sink's cache keeps no whole Service).
pub fn owner_reference_to(name: &str, uid: &str) -> Option<OwnerReference> {
    if name.is_empty() || uid.is_empty() {
        return None;
    }
    Some(OwnerReference {
        api_version: "v1".to_owned(),
        kind: "Service".to_owned(),
        name: name.to_owned(),
        uid: uid.to_owned(),
        controller: Some(false),
        block_owner_deletion: Some(false),
    })
}

/// Labels on every rendered object: `cloud-sourced-service: "true"` and the two ownership
/// labels.
pub fn base_labels(cfg: &RenderConfig) -> BTreeMap<String, String> {
    let mut labels = owner_labels(&cfg.connector_id);
    labels.insert(CLOUD_SOURCED_SERVICE_LABEL.to_owned(), "true".to_owned());
    labels
}

/// Metadata of a rendered object: only what we own. Empty maps and lists are left out, as
/// the apiserver would return them.
pub(crate) fn object_meta(
    cfg: &RenderConfig,
    name: &str,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    owner: Option<OwnerReference>,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(cfg.namespace.clone()),
        labels: (!labels.is_empty()).then_some(labels),
        annotations: (!annotations.is_empty()).then_some(annotations),
        owner_references: owner.map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// One port as every object renders it; the three port types are built from this so that
/// names and `appProtocol` agree everywhere (kube-proxy matches Service ports to slice
/// ports by name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PortSpec {
    pub(crate) name: String,
    pub(crate) port: i32,
    pub(crate) app_protocol: Option<String>,
}

/// The rendered ports for a set of port numbers, in port order, each with the protocol the
/// Service chose for it (so an instance that disagrees about a port's protocol still gets
/// the Service's port name). A port missing from `service_ports` (only possible for a meta
/// built by hand) keeps `fallback`'s protocol.
pub(crate) fn port_specs(
    port_set: &BTreeSet<MicroSvcPort>,
    service_ports: &BTreeMap<MicroSvcPort, MicroSvcAppProtocol>,
    fallback: &BTreeMap<MicroSvcPort, MicroSvcAppProtocol>,
) -> Vec<PortSpec> {
    port_set
        .iter()
        .filter_map(|port| {
            let protocol = service_ports.get(port).or_else(|| fallback.get(port))?;
            Some(PortSpec {
                name: port_name(protocol, *port),
                port: i32::from(port.get()),
                app_protocol: app_protocol(protocol),
            })
        })
        .collect()
}

/// Endpoints grouped by a key (port set, or family and port set), each group keyed by
/// address. Duplicates are merged by [`normalize_endpoints`] first, so that within a group
/// an address appears once.
pub(crate) fn group_endpoints<K: Ord>(
    meta: &MicroSvcMeta,
    key: impl Fn(&MicroEndpoint) -> K,
) -> BTreeMap<K, BTreeMap<MicroEndpointAddr, MicroEndpoint>> {
    let mut groups: BTreeMap<K, BTreeMap<MicroEndpointAddr, MicroEndpoint>> = BTreeMap::new();
    for endpoint in normalize_endpoints(meta.endpoints.iter().cloned()) {
        groups
            .entry(key(&endpoint))
            .or_default()
            .entry(endpoint.addr)
            .or_insert(endpoint);
    }
    groups
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Builders shared by the rendering, slicing and diff tests.

    use super::*;

    pub(crate) fn cfg(mode: ServiceMode) -> RenderConfig {
        RenderConfig {
            service_mode: mode,
            ..RenderConfig::new("cloud", "c1")
        }
    }

    pub(crate) fn port(p: u16) -> MicroSvcPort {
        MicroSvcPort::new(p).expect("non-zero test port")
    }

    pub(crate) fn ep(addr: &str, ports: &[(u16, &str)], ready: bool) -> MicroEndpoint {
        MicroEndpoint {
            addr: addr.parse().expect("valid test address"),
            ports: ports
                .iter()
                .map(|(p, proto)| (port(*p), MicroSvcAppProtocol::new(proto)))
                .collect(),
            ready,
            zone: None,
        }
    }

    pub(crate) fn meta(endpoints: Vec<MicroEndpoint>) -> MicroSvcMeta {
        MicroSvcMeta::new(
            "Orders_Service.v2".into(),
            "orders.service.consul".into(),
            endpoints,
        )
    }

    pub(crate) fn service_with_uid(name: &str, uid: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                uid: Some(uid.to_owned()),
                ..ObjectMeta::default()
            },
            ..Service::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use crate::labels::{is_owned, CONNECTOR_INSTANCE_LABEL, MANAGED_BY_LABEL};

    #[test]
    fn config_defaults() {
        let cfg = RenderConfig::new("default", "c1");
        assert_eq!(cfg.service_mode, ServiceMode::Headless);
        assert!(cfg.legacy_endpoints);
        assert_eq!(cfg.max_endpoints_per_slice, 100);
        assert_eq!(cfg.slice_capacity(), 100);
    }

    #[test]
    fn slice_capacity_is_clamped() {
        let mut cfg = RenderConfig::new("default", "c1");
        cfg.max_endpoints_per_slice = 0;
        assert_eq!(cfg.slice_capacity(), 1);
        cfg.max_endpoints_per_slice = 5000;
        assert_eq!(cfg.slice_capacity(), 1000);
        cfg.max_endpoints_per_slice = 7;
        assert_eq!(cfg.slice_capacity(), 7);
    }

    #[test]
    fn service_mode_parses_flag_spellings() {
        assert_eq!("headless".parse(), Ok(ServiceMode::Headless));
        assert_eq!("cluster-ip".parse(), Ok(ServiceMode::ClusterIp));
        assert_eq!("external-name".parse(), Ok(ServiceMode::ExternalName));
        assert_eq!("ClusterIP".parse(), Ok(ServiceMode::ClusterIp));
        assert_eq!("ExternalName".parse(), Ok(ServiceMode::ExternalName));
        assert_eq!(" Headless ".parse(), Ok(ServiceMode::Headless));
        let err = "nodeport".parse::<ServiceMode>().unwrap_err();
        assert_eq!(err.input, "nodeport");
        assert!(err.to_string().contains("cluster-ip"));
        assert_eq!(ServiceMode::default(), ServiceMode::Headless);
    }

    #[test]
    fn service_mode_round_trips() {
        for mode in [
            ServiceMode::Headless,
            ServiceMode::ClusterIp,
            ServiceMode::ExternalName,
        ] {
            assert_eq!(mode.to_string().parse(), Ok(mode));
        }
        assert!(ServiceMode::Headless.has_endpoints());
        assert!(ServiceMode::ClusterIp.has_endpoints());
        assert!(!ServiceMode::ExternalName.has_endpoints());
    }

    #[test]
    fn owner_reference_needs_name_and_uid() {
        let owner = owner_reference(&service_with_uid("orders", "u-1")).expect("owner");
        assert_eq!(owner.api_version, "v1");
        assert_eq!(owner.kind, "Service");
        assert_eq!(owner.name, "orders");
        assert_eq!(owner.uid, "u-1");
        assert_eq!(owner.controller, Some(false));
        assert_eq!(owner.block_owner_deletion, Some(false));

        assert_eq!(owner_reference(&service_with_uid("orders", "")), None);
        assert_eq!(owner_reference(&service_with_uid("", "u-1")), None);
        assert_eq!(owner_reference(&Service::default()), None);
    }

    #[test]
    fn base_labels_prove_ownership() {
        let cfg = cfg(ServiceMode::Headless);
        let labels = base_labels(&cfg);
        assert_eq!(labels[CLOUD_SOURCED_SERVICE_LABEL], "true");
        assert_eq!(labels[MANAGED_BY_LABEL], "registry-connector");
        assert_eq!(labels[CONNECTOR_INSTANCE_LABEL], "c1");
        let meta = object_meta(&cfg, "x", labels, BTreeMap::new(), None);
        assert!(is_owned(&meta, "c1"));
        assert_eq!(meta.annotations, None);
        assert_eq!(meta.owner_references, None);
        assert_eq!(meta.resource_version, None);
        assert_eq!(meta.namespace.as_deref(), Some("cloud"));
    }

    #[test]
    fn port_specs_use_the_service_protocol() {
        let m = meta(vec![
            ep("10.0.0.1", &[(80, "http")], true),
            ep("10.0.0.2", &[(80, "grpc"), (9090, "grpc")], true),
        ]);
        let service_ports = m.ports();
        let specs = port_specs(
            &m.endpoints[1].port_set(),
            &service_ports,
            &m.endpoints[1].ports,
        );
        assert_eq!(
            specs,
            vec![
                PortSpec {
                    name: "http80".into(),
                    port: 80,
                    app_protocol: Some("http".into())
                },
                PortSpec {
                    name: "grpc9090".into(),
                    port: 9090,
                    app_protocol: Some("grpc".into())
                },
            ]
        );
    }

    #[test]
    fn grouping_merges_duplicates_of_hand_built_metas() {
        let m = MicroSvcMeta {
            registry_name: "a".into(),
            domain: "a.consul".into(),
            endpoints: vec![
                ep("10.0.0.2", &[(80, "http")], false),
                ep("10.0.0.1", &[(80, "http")], true),
                ep("10.0.0.2", &[(80, "http")], true),
            ],
            metadata: Default::default(),
        };
        let groups = group_endpoints(&m, MicroEndpoint::port_set);
        let group = &groups[&BTreeSet::from([port(80)])];
        assert_eq!(group.len(), 2);
        assert!(group.values().all(|e| e.ready));
    }
}
