//! "Does the live object already match what we want?": the check that lets a resync with
//! nothing changed make no API call at all.
//!
//! Only the fields the renderers set are compared, after normalising the values the
//! apiserver defaults (a port's `protocol` to TCP, a Service port's `targetPort` to its
//! `port`, an EndpointSlice port's missing `name` to `""`, an absent list to an empty one)
//! and ignoring everything else it fills in (`clusterIP` allocation, `clusterIPs`,
//! `ipFamilies`, `sessionAffinity`, `internalTrafficPolicy`, `resourceVersion`, status,
//! managed fields, labels and annotations added by other tools). Lists whose order carries
//! no meaning are compared as sets. A `false` answer means "write the desired object";
//! [`service_needs_recreate`] and [`endpoint_slice_needs_recreate`] say when that write has
//! to be a delete and create because the apiserver refuses the change in place.
//!
//! The normalisation happens in one place per kind: the object's *owned content* (private
//! `*_content` functions). Two objects match when their owned contents are equal, and a
//! [`Fingerprint`] is a hash of the owned content. That is what lets the sink's caches keep
//! eight bytes per object instead of the object (see `sink::project`): the fingerprint of a
//! live object, taken when its watch event arrives, equals the fingerprint of the rendered
//! object exactly when [`Owned::matches`] would say they match.
//!
//! Labels and annotations belong to the owned content only for the keys we set on that
//! kind: the ones its renderer always sets, the conditional annotations
//! ([`CONDITIONAL_ANNOTATIONS`], which must be absent when we do not set them), and on a
//! Service the registry-metadata keys its own `connector.flomesh.io/metadata-keys`
//! annotation lists. Restricting both sides to those keys makes "every desired entry is
//! on the live object and no stale conditional one is" an equality, so it can be hashed.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use k8s_openapi::api::core::v1::{Endpoints, Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::labels::{
    parse_metadata_keys, CLOUD_SERVICE_INHERITED_FROM_ANNOTATION, CLOUD_SOURCED_SERVICE_LABEL,
    CONDITIONAL_ANNOTATIONS, CONNECTOR_INSTANCE_LABEL, ENDPOINTSLICE_MANAGED_BY_LABEL,
    MANAGED_BY_LABEL, MESH_SERVICE_SYNC_ANNOTATION, METADATA_KEYS_ANNOTATION, SERVICE_NAME_LABEL,
    SKIP_MIRROR_LABEL,
};
use crate::render::service::{CLUSTER_IP_NONE, TYPE_CLUSTER_IP, TYPE_EXTERNAL_NAME};
use crate::render::PORT_PROTOCOL;

/// A hash of an object's owned content. Equal contents give equal fingerprints; different
/// contents give different ones except with probability 2⁻⁶⁴ per comparison (SipHash over
/// the normalised fields), which would at worst leave one edited object unrepaired until
/// its next change. Only ever compared within one process, so the hash function need not
/// be stable across builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint(u64);

impl Fingerprint {
    fn of(content: &impl Hash) -> Self {
        let mut hasher = DefaultHasher::new();
        content.hash(&mut hasher);
        Self(hasher.finish())
    }
}

/// The kinds the sink writes, compared on the fields we own.
pub trait Owned {
    /// Whether `live` already has everything `self` (the desired object) sets.
    fn matches(&self, live: &Self) -> bool;
    /// The hash of the owned content: `a.fingerprint() == b.fingerprint()` exactly when
    /// `a.matches(b)` (up to hash collisions).
    fn fingerprint(&self) -> Fingerprint;
}

impl Owned for Service {
    fn matches(&self, live: &Self) -> bool {
        service_matches(self, live)
    }
    fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&service_content(self))
    }
}

impl Owned for EndpointSlice {
    fn matches(&self, live: &Self) -> bool {
        endpoint_slice_matches(self, live)
    }
    fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&slice_content(self))
    }
}

impl Owned for Endpoints {
    fn matches(&self, live: &Self) -> bool {
        endpoints_matches(self, live)
    }
    fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&endpoints_content(self))
    }
}

/// Whether the live Service has everything the desired one sets: our labels and
/// annotations with equal values, the same type, the same headlessness, the same
/// `externalName`, the same ports (as a set of name, port, protocol, appProtocol,
/// targetPort) and no selector.
pub fn service_matches(desired: &Service, live: &Service) -> bool {
    service_content(desired) == service_content(live)
}

/// What [`service_needs_recreate`] needs to know of the live Service; small enough to
/// keep in the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceShape {
    pub external_name: bool,
    pub headless: bool,
}

impl ServiceShape {
    pub fn of(service: &Service) -> Self {
        let default_spec = ServiceSpec::default();
        let spec = service.spec.as_ref().unwrap_or(&default_spec);
        Self {
            external_name: service_type(spec) == TYPE_EXTERNAL_NAME,
            headless: is_headless(spec),
        }
    }
}

/// Whether the desired Service can only replace the live one by deleting and recreating
/// it: the apiserver never changes a ClusterIP Service between headless (`clusterIP:
/// None`) and an allocated virtual IP in place. Changes to or from ExternalName are
/// allowed in place (the apiserver clears or allocates the IP itself).
pub fn service_needs_recreate(desired: &Service, live: ServiceShape) -> bool {
    let desired = ServiceShape::of(desired);
    !desired.external_name && !live.external_name && desired.headless != live.headless
}

/// Whether the live EndpointSlice has everything the desired one sets: our labels, the
/// same `addressType`, the same ports and endpoints (each as a set; an endpoint compared by
/// addresses, conditions and zone) and owner references to the same uids.
pub fn endpoint_slice_matches(desired: &EndpointSlice, live: &EndpointSlice) -> bool {
    slice_content(desired) == slice_content(live)
}

/// Whether the desired EndpointSlice can only replace the live one by deleting and
/// recreating it: `addressType` is immutable.
pub fn endpoint_slice_needs_recreate(desired: &EndpointSlice, live: &EndpointSlice) -> bool {
    desired.address_type != live.address_type
}

/// Whether the live Endpoints has everything the desired one sets: our labels and
/// annotations (and not the over-capacity annotation when we no longer set it), owner
/// references to the same uids, and the same addresses. Subsets are compared as the set of
/// (port set, address, ready) they describe, so a different split into subsets or order of
/// addresses is not a difference.
pub fn endpoints_matches(desired: &Endpoints, live: &Endpoints) -> bool {
    endpoints_content(desired) == endpoints_content(live)
}

/// Label keys every rendered object carries (`render::base_labels`).
const BASE_LABELS: [&str; 3] = [
    MANAGED_BY_LABEL,
    CONNECTOR_INSTANCE_LABEL,
    CLOUD_SOURCED_SERVICE_LABEL,
];

/// The label and annotation keys one kind's renderer sets on every object, besides the
/// conditional annotations and (on Services) the listed registry-metadata keys. A key
/// here that the renderer did not always set would never match (the writer keeps labels
/// it does not own), so this lists exactly what the renderers set; a unit test checks
/// each renderer against it.
struct OwnedKeys {
    labels: &'static [&'static str],
    annotations: &'static [&'static str],
    /// Whether the object's metadata-keys annotation adds keys (Services only).
    metadata_keys: bool,
}

const SERVICE_KEYS: OwnedKeys = OwnedKeys {
    labels: &BASE_LABELS,
    annotations: &[
        MESH_SERVICE_SYNC_ANNOTATION,
        CLOUD_SERVICE_INHERITED_FROM_ANNOTATION,
    ],
    metadata_keys: true,
};

const SLICE_KEYS: OwnedKeys = OwnedKeys {
    labels: &[
        MANAGED_BY_LABEL,
        CONNECTOR_INSTANCE_LABEL,
        CLOUD_SOURCED_SERVICE_LABEL,
        SERVICE_NAME_LABEL,
        ENDPOINTSLICE_MANAGED_BY_LABEL,
    ],
    annotations: &[],
    metadata_keys: false,
};

const ENDPOINTS_KEYS: OwnedKeys = OwnedKeys {
    labels: &[
        MANAGED_BY_LABEL,
        CONNECTOR_INSTANCE_LABEL,
        CLOUD_SOURCED_SERVICE_LABEL,
        SERVICE_NAME_LABEL,
        SKIP_MIRROR_LABEL,
    ],
    annotations: &[],
    metadata_keys: false,
};

/// Our labels and annotations of one object, restricted to the keys we set on its kind.
#[derive(Debug, PartialEq, Eq, Hash)]
struct MetaContent<'a> {
    labels: BTreeMap<&'a str, &'a str>,
    annotations: BTreeMap<&'a str, &'a str>,
}

fn meta_content<'a>(
    meta: &'a ObjectMeta,
    keys: &OwnedKeys,
    conditional_annotations: &[&str],
) -> MetaContent<'a> {
    let (tracked_labels, tracked_annotations) = if keys.metadata_keys {
        meta.annotations
            .as_ref()
            .and_then(|a| a.get(METADATA_KEYS_ANNOTATION))
            .map(|v| parse_metadata_keys(v))
            .unwrap_or_default()
    } else {
        Default::default()
    };
    let restrict = |map: &'a Option<BTreeMap<String, String>>,
                    fixed: &[&str],
                    conditional: &[&str],
                    tracked: &[String]| {
        map.iter()
            .flatten()
            .filter(|(key, _)| {
                let key = key.as_str();
                fixed.contains(&key)
                    || conditional.contains(&key)
                    || tracked.iter().any(|t| t == key)
            })
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    };
    MetaContent {
        labels: restrict(&meta.labels, keys.labels, &[], &tracked_labels),
        annotations: restrict(
            &meta.annotations,
            keys.annotations,
            conditional_annotations,
            &tracked_annotations,
        ),
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct ServiceContent<'a> {
    meta: MetaContent<'a>,
    type_: &'a str,
    headless: bool,
    external_name: Option<&'a str>,
    ports: BTreeSet<ServicePortKey<'a>>,
    selector: Option<&'a BTreeMap<String, String>>,
}

fn service_content(service: &Service) -> ServiceContent<'_> {
    let meta = meta_content(&service.metadata, &SERVICE_KEYS, CONDITIONAL_ANNOTATIONS);
    match service.spec.as_ref() {
        Some(spec) => ServiceContent {
            meta,
            type_: service_type(spec),
            headless: is_headless(spec),
            external_name: non_empty(&spec.external_name),
            ports: service_ports(spec),
            selector: selector(spec),
        },
        // What an empty spec normalises to.
        None => ServiceContent {
            meta,
            type_: TYPE_CLUSTER_IP,
            headless: false,
            external_name: None,
            ports: BTreeSet::new(),
            selector: None,
        },
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct SliceContent<'a> {
    meta: MetaContent<'a>,
    owners: BTreeSet<&'a str>,
    address_type: &'a str,
    ports: BTreeSet<PortKey<'a>>,
    endpoints: BTreeSet<EndpointKey<'a>>,
}

fn slice_content(slice: &EndpointSlice) -> SliceContent<'_> {
    SliceContent {
        meta: meta_content(&slice.metadata, &SLICE_KEYS, &[]),
        owners: owner_uids(&slice.metadata),
        address_type: &slice.address_type,
        ports: slice_ports(slice),
        endpoints: slice_endpoints(slice),
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct EndpointsContent<'a> {
    meta: MetaContent<'a>,
    owners: BTreeSet<&'a str>,
    addresses: BTreeSet<AddressKey<'a>>,
}

fn endpoints_content(endpoints: &Endpoints) -> EndpointsContent<'_> {
    EndpointsContent {
        meta: meta_content(
            &endpoints.metadata,
            &ENDPOINTS_KEYS,
            CONDITIONAL_ANNOTATIONS,
        ),
        owners: owner_uids(&endpoints.metadata),
        addresses: endpoints_addresses(endpoints),
    }
}

fn owner_uids(meta: &ObjectMeta) -> BTreeSet<&str> {
    meta.owner_references
        .iter()
        .flatten()
        .map(|o| o.uid.as_str())
        .collect()
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.is_empty())
}

fn service_type(spec: &ServiceSpec) -> &str {
    non_empty(&spec.type_).unwrap_or(TYPE_CLUSTER_IP)
}

/// The selector, with an empty map and no map meaning the same: no selector.
fn selector(spec: &ServiceSpec) -> Option<&BTreeMap<String, String>> {
    spec.selector.as_ref().filter(|s| !s.is_empty())
}

fn is_headless(spec: &ServiceSpec) -> bool {
    spec.cluster_ip.as_deref() == Some(CLUSTER_IP_NONE)
}

/// A port's `targetPort`, comparable.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Target<'a> {
    Number(i32),
    Name(&'a str),
}

type ServicePortKey<'a> = (&'a str, i32, &'a str, Option<&'a str>, Target<'a>);

fn service_ports(spec: &ServiceSpec) -> BTreeSet<ServicePortKey<'_>> {
    spec.ports
        .iter()
        .flatten()
        .map(|p| {
            let target = match &p.target_port {
                None => Target::Number(p.port),
                Some(IntOrString::Int(0)) => Target::Number(p.port),
                Some(IntOrString::Int(n)) => Target::Number(*n),
                Some(IntOrString::String(s)) if s.is_empty() => Target::Number(p.port),
                Some(IntOrString::String(s)) => Target::Name(s),
            };
            (
                p.name.as_deref().unwrap_or_default(),
                p.port,
                non_empty(&p.protocol).unwrap_or(PORT_PROTOCOL),
                p.app_protocol.as_deref(),
                target,
            )
        })
        .collect()
}

type PortKey<'a> = (&'a str, Option<i32>, &'a str, Option<&'a str>);

fn slice_ports(slice: &EndpointSlice) -> BTreeSet<PortKey<'_>> {
    slice
        .ports
        .iter()
        .flatten()
        .map(|p| {
            (
                p.name.as_deref().unwrap_or_default(),
                p.port,
                non_empty(&p.protocol).unwrap_or(PORT_PROTOCOL),
                p.app_protocol.as_deref(),
            )
        })
        .collect()
}

type EndpointKey<'a> = (
    BTreeSet<&'a str>,
    Option<bool>,
    Option<bool>,
    Option<bool>,
    Option<&'a str>,
);

fn slice_endpoints(slice: &EndpointSlice) -> BTreeSet<EndpointKey<'_>> {
    slice
        .endpoints
        .iter()
        .map(|e| {
            let conditions = e.conditions.as_ref();
            (
                e.addresses.iter().map(String::as_str).collect(),
                conditions.and_then(|c| c.ready),
                conditions.and_then(|c| c.serving),
                conditions.and_then(|c| c.terminating),
                e.zone.as_deref(),
            )
        })
        .collect()
}

type AddressKey<'a> = (BTreeSet<PortKey<'a>>, &'a str, bool);

fn endpoints_addresses(endpoints: &Endpoints) -> BTreeSet<AddressKey<'_>> {
    let mut out = BTreeSet::new();
    for subset in endpoints.subsets.iter().flatten() {
        let ports: BTreeSet<PortKey<'_>> = subset
            .ports
            .iter()
            .flatten()
            .map(|p| {
                (
                    p.name.as_deref().unwrap_or_default(),
                    Some(p.port),
                    non_empty(&p.protocol).unwrap_or(PORT_PROTOCOL),
                    p.app_protocol.as_deref(),
                )
            })
            .collect();
        for (list, ready) in [
            (&subset.addresses, true),
            (&subset.not_ready_addresses, false),
        ] {
            for address in list.iter().flatten() {
                out.insert((ports.clone(), address.ip.as_str(), ready));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::{
        CLOUD_SERVICE_INHERITED_FROM_ANNOTATION, CONNECTOR_INSTANCE_LABEL,
        ENDPOINTS_OVER_CAPACITY_ANNOTATION,
    };
    use crate::model::MicroEndpoint;
    use crate::render::test_support::{cfg, ep, meta, service_with_uid};
    use crate::render::{desired_endpoints, desired_service, owner_reference, ServiceMode};
    use crate::slicing::plan_endpoint_slices;
    use k8s_openapi::api::core::v1::{EndpointAddress, EndpointSubset, ServicePort};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, OwnerReference};

    /// The comparison, checked two ways: the owned contents are equal exactly when the
    /// fingerprints are. Every case below therefore also says whether a change moves
    /// the fingerprint (fields we own) or not (fields others own, apiserver defaults).
    fn same<K: Owned>(desired: &K, live: &K) -> bool {
        let matches = desired.matches(live);
        assert_eq!(
            matches,
            desired.fingerprint() == live.fingerprint(),
            "matches and fingerprints disagree"
        );
        matches
    }

    fn instances() -> Vec<MicroEndpoint> {
        vec![
            ep("10.0.0.1", &[(8080, "http"), (9090, "grpc")], true),
            ep("10.0.0.2", &[(8080, "http"), (9090, "grpc")], false),
            ep("10.0.1.1", &[(8080, "http")], true),
        ]
    }

    fn service(mode: ServiceMode) -> Service {
        desired_service(&cfg(mode), "orders", &meta(instances()))
    }

    /// What the apiserver returns for a Service we created: defaults, allocations,
    /// bookkeeping, and fields we never send.
    fn as_stored(mut svc: Service) -> Service {
        let meta = &mut svc.metadata;
        meta.resource_version = Some("42".into());
        meta.uid = Some("u-1".into());
        meta.generation = Some(1);
        meta.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        meta.labels
            .get_or_insert_with(BTreeMap::new)
            .insert("team".into(), "payments".into());
        meta.annotations.get_or_insert_with(BTreeMap::new).insert(
            "kubectl.kubernetes.io/last-applied-configuration".into(),
            "{}".into(),
        );
        if let Some(spec) = svc.spec.as_mut() {
            if spec.cluster_ip.is_none() && spec.type_.as_deref() == Some("ClusterIP") {
                spec.cluster_ip = Some("10.96.0.10".into());
                spec.cluster_ips = Some(vec!["10.96.0.10".into()]);
            }
            spec.session_affinity = Some("None".into());
            spec.internal_traffic_policy = Some("Cluster".into());
            spec.ip_families = Some(vec!["IPv4".into()]);
            spec.ip_family_policy = Some("SingleStack".into());
            spec.selector = Some(BTreeMap::new());
            if let Some(ports) = spec.ports.as_mut() {
                ports.reverse();
            }
        }
        svc.status = Some(Default::default());
        svc
    }

    fn edit_spec(svc: &Service, f: impl FnOnce(&mut ServiceSpec)) -> Service {
        let mut out = svc.clone();
        if let Some(spec) = out.spec.as_mut() {
            f(spec);
        }
        out
    }

    fn edit_port(svc: &Service, f: impl FnOnce(&mut ServicePort)) -> Service {
        edit_spec(svc, |s| {
            if let Some(p) = s.ports.as_mut().and_then(|p| p.first_mut()) {
                f(p);
            }
        })
    }

    #[test]
    fn service_matches_itself_and_its_stored_form() {
        for mode in [
            ServiceMode::Headless,
            ServiceMode::ClusterIp,
            ServiceMode::ExternalName,
        ] {
            let desired = service(mode);
            assert!(same(&desired, &desired), "{mode}");
            assert!(same(&desired, &as_stored(desired.clone())), "{mode}");
            assert!(!service_needs_recreate(
                &desired,
                ServiceShape::of(&as_stored(desired.clone()))
            ));
        }
    }

    #[test]
    fn service_defaulted_port_fields_do_not_mismatch() {
        let desired = service(ServiceMode::Headless);
        let live = edit_spec(&desired, |s| {
            for p in s.ports.iter_mut().flatten() {
                p.protocol = None;
                p.target_port = None;
            }
        });
        assert!(same(&desired, &live));
        let live = edit_spec(&desired, |s| s.type_ = None);
        assert!(same(&desired, &live), "type defaults to ClusterIP");
    }

    #[test]
    fn metadata_keys_that_went_away_mismatch() {
        let mut with_metadata = meta(instances());
        with_metadata
            .metadata
            .labels
            .insert("version".into(), "1".into());
        let tracked = desired_service(&cfg(ServiceMode::Headless), "orders", &with_metadata);
        let live = as_stored(tracked.clone());
        assert!(same(&tracked, &live));
        let plain = service(ServiceMode::Headless);
        assert!(!same(&plain, &live), "the tracked label must be removed");
        with_metadata
            .metadata
            .labels
            .insert("version".into(), "2".into());
        let changed = desired_service(&cfg(ServiceMode::Headless), "orders", &with_metadata);
        assert!(!same(&changed, &live));
    }

    #[test]
    fn service_owned_fields_mismatch() {
        let desired = service(ServiceMode::Headless);
        let live = as_stored(desired.clone());
        let mut cases: Vec<(&str, Service)> = vec![
            (
                "type",
                edit_spec(&live, |s| s.type_ = Some("NodePort".into())),
            ),
            (
                "headless",
                edit_spec(&live, |s| s.cluster_ip = Some("10.96.0.1".into())),
            ),
            (
                "externalName",
                edit_spec(&live, |s| s.external_name = Some("x.example".into())),
            ),
            (
                "selector",
                edit_spec(&live, |s| {
                    s.selector = Some(BTreeMap::from([("app".into(), "orders".into())]))
                }),
            ),
            (
                "port name",
                edit_port(&live, |p| p.name = Some("web".into())),
            ),
            ("port number", edit_port(&live, |p| p.port = 81)),
            (
                "protocol",
                edit_port(&live, |p| p.protocol = Some("UDP".into())),
            ),
            ("appProtocol", edit_port(&live, |p| p.app_protocol = None)),
            (
                "targetPort",
                edit_port(&live, |p| p.target_port = Some(IntOrString::Int(1))),
            ),
            (
                "named targetPort",
                edit_port(&live, |p| {
                    p.target_port = Some(IntOrString::String("http".into()))
                }),
            ),
            (
                "missing port",
                edit_spec(&live, |s| {
                    if let Some(p) = s.ports.as_mut() {
                        p.pop();
                    }
                }),
            ),
            (
                "extra port",
                edit_spec(&live, |s| {
                    s.ports.get_or_insert_with(Vec::new).push(ServicePort {
                        port: 1,
                        ..ServicePort::default()
                    })
                }),
            ),
            (
                "no spec",
                Service {
                    spec: None,
                    ..live.clone()
                },
            ),
        ];
        let mut relabelled = live.clone();
        relabelled
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(CONNECTOR_INSTANCE_LABEL.into(), "other".into());
        cases.push(("label", relabelled));
        let mut unannotated = live.clone();
        if let Some(a) = unannotated.metadata.annotations.as_mut() {
            a.remove(CLOUD_SERVICE_INHERITED_FROM_ANNOTATION);
        }
        cases.push(("annotation", unannotated));
        let mut no_labels = live.clone();
        no_labels.metadata.labels = None;
        cases.push(("no labels", no_labels));

        for (what, case) in cases {
            assert!(!same(&desired, &case), "{what} should mismatch");
        }
    }

    #[test]
    fn external_name_target_mismatch() {
        let desired = service(ServiceMode::ExternalName);
        let live = edit_spec(&desired, |s| s.external_name = Some("other.consul".into()));
        assert!(!same(&desired, &live));
        let live = edit_spec(&desired, |s| s.type_ = Some("ClusterIP".into()));
        assert!(!same(&desired, &live));
    }

    #[test]
    fn recreate_only_between_headless_and_virtual_ip() {
        let headless = as_stored(service(ServiceMode::Headless));
        let cluster_ip = as_stored(service(ServiceMode::ClusterIp));
        let external = as_stored(service(ServiceMode::ExternalName));
        let (headless_shape, cluster_ip_shape, external_shape) = (
            ServiceShape::of(&headless),
            ServiceShape::of(&cluster_ip),
            ServiceShape::of(&external),
        );
        let desired_headless = service(ServiceMode::Headless);
        let desired_cluster_ip = service(ServiceMode::ClusterIp);
        let desired_external = service(ServiceMode::ExternalName);

        assert!(service_needs_recreate(&desired_headless, cluster_ip_shape));
        assert!(service_needs_recreate(&desired_cluster_ip, headless_shape));
        assert!(!service_needs_recreate(&desired_headless, headless_shape));
        assert!(!service_needs_recreate(
            &desired_cluster_ip,
            cluster_ip_shape
        ));
        assert!(!service_needs_recreate(&desired_external, headless_shape));
        assert!(!service_needs_recreate(&desired_external, cluster_ip_shape));
        assert!(!service_needs_recreate(&desired_headless, external_shape));
        assert!(!service_needs_recreate(&desired_cluster_ip, external_shape));
        assert!(!same(&desired_cluster_ip, &headless));
    }

    fn slice() -> EndpointSlice {
        let owner = owner_reference(&service_with_uid("orders", "u-1"));
        plan_endpoint_slices(
            &cfg(ServiceMode::Headless),
            "orders",
            &meta(instances()),
            &[],
            owner,
        )
        .desired
        .remove(0)
    }

    fn slice_as_stored(mut s: EndpointSlice) -> EndpointSlice {
        s.metadata.resource_version = Some("7".into());
        s.metadata.generation = Some(3);
        s.metadata.uid = Some("s-1".into());
        s.metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert("extra".into(), "x".into());
        s.endpoints.reverse();
        if let Some(p) = s.ports.as_mut() {
            p.reverse();
        }
        s
    }

    fn edit_endpoint(s: &EndpointSlice, f: impl FnOnce(&mut Endpoint)) -> EndpointSlice {
        let mut out = s.clone();
        if let Some(e) = out.endpoints.first_mut() {
            f(e);
        }
        out
    }

    #[test]
    fn slice_matches_itself_and_its_stored_form() {
        let desired = slice();
        assert!(same(&desired, &desired));
        assert!(same(&desired, &slice_as_stored(desired.clone())));
        assert!(!endpoint_slice_needs_recreate(&desired, &desired));
    }

    #[test]
    fn slice_defaulted_port_fields_do_not_mismatch() {
        let desired = slice();
        let mut live = desired.clone();
        for p in live.ports.iter_mut().flatten() {
            p.protocol = None;
        }
        assert!(same(&desired, &live));

        let mut unnamed_desired = desired.clone();
        for p in unnamed_desired.ports.iter_mut().flatten() {
            p.name = None;
        }
        let mut defaulted = unnamed_desired.clone();
        for p in defaulted.ports.iter_mut().flatten() {
            p.name = Some(String::new());
        }
        assert!(same(&unnamed_desired, &defaulted));

        let mut empty_ports = desired.clone();
        empty_ports.ports = None;
        let mut stored_empty = empty_ports.clone();
        stored_empty.ports = Some(Vec::new());
        assert!(same(&empty_ports, &stored_empty));
    }

    #[test]
    fn slice_owned_fields_mismatch() {
        let desired = slice();
        let live = slice_as_stored(desired.clone());
        let mut cases: Vec<(&str, EndpointSlice)> = Vec::new();

        let mut c = live.clone();
        c.address_type = "IPv6".into();
        assert!(endpoint_slice_needs_recreate(&desired, &c));
        cases.push(("addressType", c));

        let mut c = live.clone();
        if let Some(p) = c.ports.as_mut().and_then(|p| p.first_mut()) {
            p.app_protocol = Some("h2c".into());
        }
        cases.push(("port appProtocol", c));

        let mut c = live.clone();
        if let Some(p) = c.ports.as_mut().and_then(|p| p.first_mut()) {
            p.port = Some(1);
        }
        cases.push(("port number", c));

        let mut c = live.clone();
        if let Some(p) = c.ports.as_mut().and_then(|p| p.first_mut()) {
            p.name = Some("x".into());
        }
        cases.push(("port name", c));

        let mut c = live.clone();
        c.ports = None;
        cases.push(("ports removed", c));

        cases.push((
            "ready",
            edit_endpoint(&live, |e| {
                if let Some(c) = e.conditions.as_mut() {
                    c.ready = c.ready.map(|r| !r);
                }
            }),
        ));
        cases.push((
            "serving",
            edit_endpoint(&live, |e| {
                if let Some(c) = e.conditions.as_mut() {
                    c.serving = None;
                }
            }),
        ));
        cases.push((
            "terminating",
            edit_endpoint(&live, |e| {
                if let Some(c) = e.conditions.as_mut() {
                    c.terminating = Some(true);
                }
            }),
        ));
        cases.push(("conditions", edit_endpoint(&live, |e| e.conditions = None)));
        cases.push(("zone", edit_endpoint(&live, |e| e.zone = Some("z".into()))));
        cases.push((
            "address",
            edit_endpoint(&live, |e| e.addresses = vec!["10.9.9.9".into()]),
        ));

        let mut c = live.clone();
        c.endpoints.pop();
        cases.push(("missing endpoint", c));

        let mut c = live.clone();
        c.endpoints.push(Endpoint {
            addresses: vec!["10.8.8.8".into()],
            conditions: Some(EndpointConditions::default()),
            ..Endpoint::default()
        });
        cases.push(("extra endpoint", c));

        let mut c = live.clone();
        c.metadata.owner_references = None;
        cases.push(("owner", c));

        let mut c = live.clone();
        if let Some(o) = c.metadata.owner_references.as_mut() {
            o.push(OwnerReference {
                uid: "u-2".into(),
                ..OwnerReference::default()
            });
        }
        cases.push(("extra owner", c));

        let mut c = live.clone();
        if let Some(l) = c.metadata.labels.as_mut() {
            l.remove(crate::labels::SERVICE_NAME_LABEL);
        }
        cases.push(("service-name label", c));

        for (what, case) in cases {
            assert!(!same(&desired, &case), "{what} should mismatch");
        }
    }

    #[test]
    fn slice_owner_is_compared_by_uid_only() {
        let desired = slice();
        let mut live = desired.clone();
        if let Some(o) = live
            .metadata
            .owner_references
            .as_mut()
            .and_then(|o| o.first_mut())
        {
            o.block_owner_deletion = None;
            o.name = "renamed".into();
        }
        assert!(same(&desired, &live));
    }

    fn endpoints() -> Endpoints {
        desired_endpoints(
            &cfg(ServiceMode::Headless),
            "orders",
            &meta(instances()),
            owner_reference(&service_with_uid("orders", "u-1")),
        )
        .expect("legacy endpoints on")
    }

    #[test]
    fn endpoints_match_regardless_of_subset_layout() {
        let desired = endpoints();
        assert!(same(&desired, &desired));

        // The same addresses, split one subset per address, in reverse order, with the
        // protocol defaulted and an annotation someone else added.
        let mut live = desired.clone();
        let mut split = Vec::new();
        for subset in desired.subsets.iter().flatten().rev() {
            let ports = subset.ports.clone().map(|ps| {
                ps.into_iter()
                    .map(|mut p| {
                        p.protocol = None;
                        p
                    })
                    .rev()
                    .collect()
            });
            for a in subset.addresses.iter().flatten() {
                split.push(EndpointSubset {
                    addresses: Some(vec![a.clone()]),
                    not_ready_addresses: None,
                    ports: ports.clone(),
                });
            }
            for a in subset.not_ready_addresses.iter().flatten() {
                split.push(EndpointSubset {
                    addresses: Some(Vec::new()),
                    not_ready_addresses: Some(vec![a.clone()]),
                    ports: ports.clone(),
                });
            }
        }
        live.subsets = Some(split);
        live.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(
                "endpoints.kubernetes.io/last-change-trigger-time".into(),
                "t".into(),
            );
        live.metadata.resource_version = Some("9".into());
        assert!(same(&desired, &live));
    }

    #[test]
    fn empty_endpoints_match_empty_subsets() {
        let desired = desired_endpoints(
            &cfg(ServiceMode::Headless),
            "orders",
            &meta(Vec::new()),
            None,
        )
        .expect("legacy endpoints on");
        let mut live = desired.clone();
        live.subsets = Some(Vec::new());
        assert!(same(&desired, &live));
    }

    #[test]
    fn endpoints_owned_fields_mismatch() {
        let desired = endpoints();
        let mut cases: Vec<(&str, Endpoints)> = Vec::new();

        let mut c = desired.clone();
        if let Some(s) = c.subsets.as_mut().and_then(|s| s.last_mut()) {
            let moved = s.not_ready_addresses.take();
            assert!(moved.is_some(), "the last subset holds a not-ready address");
            s.addresses
                .get_or_insert_with(Vec::new)
                .extend(moved.into_iter().flatten());
        }
        cases.push(("readiness", c));

        let mut c = desired.clone();
        if let Some(s) = c.subsets.as_mut().and_then(|s| s.first_mut()) {
            s.addresses = None;
        }
        cases.push(("missing address", c));

        let mut c = desired.clone();
        if let Some(s) = c.subsets.as_mut().and_then(|s| s.first_mut()) {
            s.addresses
                .get_or_insert_with(Vec::new)
                .push(EndpointAddress {
                    ip: "10.7.7.7".into(),
                    ..EndpointAddress::default()
                });
        }
        cases.push(("extra address", c));

        let mut c = desired.clone();
        if let Some(p) = c
            .subsets
            .as_mut()
            .and_then(|s| s.first_mut())
            .and_then(|s| s.ports.as_mut())
            .and_then(|p| p.first_mut())
        {
            p.name = Some("other".into());
        }
        cases.push(("port name", c));

        let mut c = desired.clone();
        c.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(
                ENDPOINTS_OVER_CAPACITY_ANNOTATION.into(),
                "truncated".into(),
            );
        cases.push(("stale over-capacity annotation", c));

        let mut c = desired.clone();
        if let Some(l) = c.metadata.labels.as_mut() {
            l.remove(crate::labels::SKIP_MIRROR_LABEL);
        }
        cases.push(("skip-mirror label", c));

        let mut c = desired.clone();
        c.metadata.owner_references = None;
        cases.push(("owner", c));

        let mut c = desired.clone();
        c.subsets = None;
        cases.push(("no subsets", c));

        for (what, case) in cases {
            assert!(!same(&desired, &case), "{what} should mismatch");
        }
    }

    #[test]
    fn over_capacity_annotation_is_required_when_desired() {
        let mut desired = endpoints();
        desired
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(
                ENDPOINTS_OVER_CAPACITY_ANNOTATION.into(),
                "truncated".into(),
            );
        let mut live = desired.clone();
        assert!(same(&desired, &live));
        live.metadata.annotations = None;
        assert!(!same(&desired, &live));
    }

    /// Registry metadata copied onto the Service, and more than 1000 addresses so that the
    /// Endpoints carry the over-capacity annotation: every conditional key is set.
    fn everything_rendered() -> (Service, EndpointSlice, Endpoints) {
        let mut m = meta(
            (0..1001)
                .map(|i| {
                    ep(
                        &format!("10.1.{}.{}", i / 200, i % 200 + 1),
                        &[(8080, "http")],
                        i % 2 == 0,
                    )
                })
                .collect(),
        );
        m.metadata.labels.insert("version".into(), "1".into());
        m.metadata.annotations.insert("owner".into(), "jane".into());
        let c = cfg(ServiceMode::Headless);
        let svc = desired_service(&c, "orders", &m);
        let owner = owner_reference(&service_with_uid("orders", "u-1"));
        let slice = plan_endpoint_slices(&c, "orders", &m, &[], owner.clone())
            .desired
            .remove(0);
        let eps = desired_endpoints(&c, "orders", &m, owner).expect("legacy endpoints on");
        (svc, slice, eps)
    }

    #[test]
    fn every_key_the_renderers_set_is_owned_content() {
        let (svc, slice, eps) = everything_rendered();
        let len = |m: &Option<BTreeMap<String, String>>| m.as_ref().map_or(0, BTreeMap::len);
        let content = service_content(&svc);
        assert_eq!(content.meta.labels.len(), len(&svc.metadata.labels));
        assert_eq!(
            content.meta.annotations.len(),
            len(&svc.metadata.annotations)
        );
        assert!(content.meta.labels.contains_key("version"));
        assert!(content.meta.annotations.contains_key("owner"));
        let content = slice_content(&slice);
        assert_eq!(content.meta.labels.len(), len(&slice.metadata.labels));
        assert_eq!(len(&slice.metadata.annotations), 0);
        let content = endpoints_content(&eps);
        assert_eq!(content.meta.labels.len(), len(&eps.metadata.labels));
        assert_eq!(
            content.meta.annotations.len(),
            len(&eps.metadata.annotations)
        );
        assert!(content
            .meta
            .annotations
            .contains_key(ENDPOINTS_OVER_CAPACITY_ANNOTATION));
    }

    #[test]
    fn fingerprints_change_with_every_rendered_value() {
        let (svc, slice, eps) = everything_rendered();
        let relabel = |meta: &ObjectMeta| {
            let field = |m: &mut ObjectMeta, label: bool| {
                if label {
                    m.labels.get_or_insert_with(BTreeMap::new).clone()
                } else {
                    m.annotations.get_or_insert_with(BTreeMap::new).clone()
                }
            };
            let mut variants = Vec::new();
            for label in [true, false] {
                let keys: Vec<String> = field(&mut meta.clone(), label).into_keys().collect();
                for key in keys {
                    let what = if label { "label" } else { "annotation" };
                    for removed in [false, true] {
                        let mut edited = meta.clone();
                        let mut map = field(&mut edited, label);
                        if removed {
                            map.remove(&key);
                        } else if let Some(v) = map.get_mut(&key) {
                            v.push('x');
                        }
                        if label {
                            edited.labels = Some(map);
                        } else {
                            edited.annotations = Some(map);
                        }
                        variants.push((format!("{what} {key} (removed: {removed})"), edited));
                    }
                }
            }
            variants
        };
        for (what, meta) in relabel(&svc.metadata) {
            let case = Service {
                metadata: meta,
                ..svc.clone()
            };
            assert_ne!(svc.fingerprint(), case.fingerprint(), "Service {what}");
        }
        for (what, meta) in relabel(&slice.metadata) {
            let case = EndpointSlice {
                metadata: meta,
                ..slice.clone()
            };
            assert_ne!(slice.fingerprint(), case.fingerprint(), "slice {what}");
        }
        for (what, meta) in relabel(&eps.metadata) {
            let case = Endpoints {
                metadata: meta,
                ..eps.clone()
            };
            assert_ne!(eps.fingerprint(), case.fingerprint(), "Endpoints {what}");
        }
        // Spec, ports, endpoints and subsets: the mismatch tests above run every case
        // through `same`, which checks the fingerprint as well.
    }

    #[test]
    fn fingerprints_ignore_what_others_own() {
        let (svc, slice, eps) = everything_rendered();
        let bookkeeping = |meta: &mut ObjectMeta| {
            meta.resource_version = Some("99".into());
            meta.uid = Some("other-uid".into());
            meta.generation = Some(7);
            meta.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
            meta.finalizers = Some(vec!["example.com/keep".into()]);
            meta.labels
                .get_or_insert_with(BTreeMap::new)
                .insert("team".into(), "payments".into());
            meta.annotations
                .get_or_insert_with(BTreeMap::new)
                .insert("mesh.example/inject".into(), "true".into());
        };

        let mut live = as_stored(svc.clone());
        bookkeeping(&mut live.metadata);
        if let Some(spec) = live.spec.as_mut() {
            spec.publish_not_ready_addresses = Some(true);
            spec.session_affinity = Some("ClientIP".into());
        }
        assert_eq!(svc.fingerprint(), live.fingerprint(), "Service");

        let mut live = slice_as_stored(slice.clone());
        bookkeeping(&mut live.metadata);
        for e in &mut live.endpoints {
            e.hostname = Some("h".into());
            e.node_name = Some("n".into());
        }
        assert_eq!(slice.fingerprint(), live.fingerprint(), "EndpointSlice");

        let mut live = eps.clone();
        bookkeeping(&mut live.metadata);
        for subset in live.subsets.iter_mut().flatten() {
            for a in subset.addresses.iter_mut().flatten() {
                a.hostname = Some("h".into());
            }
            if let Some(ports) = subset.ports.as_mut() {
                ports.reverse();
            }
        }
        assert_eq!(eps.fingerprint(), live.fingerprint(), "Endpoints");
    }
}
