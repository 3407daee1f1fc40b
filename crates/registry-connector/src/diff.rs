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

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Endpoints, Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::labels::CONDITIONAL_ANNOTATIONS;
use crate::render::service::{CLUSTER_IP_NONE, TYPE_CLUSTER_IP, TYPE_EXTERNAL_NAME};
use crate::render::PORT_PROTOCOL;

/// Whether the live Service has everything the desired one sets: our labels and
/// annotations with equal values, the same type, the same headlessness, the same
/// `externalName`, the same ports (as a set of name, port, protocol, appProtocol,
/// targetPort) and no selector.
pub fn service_matches(desired: &Service, live: &Service) -> bool {
    let default_spec = ServiceSpec::default();
    let d = desired.spec.as_ref().unwrap_or(&default_spec);
    let l = live.spec.as_ref().unwrap_or(&default_spec);
    metadata_matches(&desired.metadata, &live.metadata, CONDITIONAL_ANNOTATIONS)
        && service_type(d) == service_type(l)
        && is_headless(d) == is_headless(l)
        && non_empty(&d.external_name) == non_empty(&l.external_name)
        && service_ports(d) == service_ports(l)
        && selector(d) == selector(l)
}

/// Whether the desired Service can only replace the live one by deleting and recreating
/// it: the apiserver never changes a ClusterIP Service between headless (`clusterIP:
/// None`) and an allocated virtual IP in place. Changes to or from ExternalName are
/// allowed in place (the apiserver clears or allocates the IP itself).
pub fn service_needs_recreate(desired: &Service, live: &Service) -> bool {
    let default_spec = ServiceSpec::default();
    let d = desired.spec.as_ref().unwrap_or(&default_spec);
    let l = live.spec.as_ref().unwrap_or(&default_spec);
    service_type(d) != TYPE_EXTERNAL_NAME
        && service_type(l) != TYPE_EXTERNAL_NAME
        && is_headless(d) != is_headless(l)
}

/// Whether the live EndpointSlice has everything the desired one sets: our labels, the
/// same `addressType`, the same ports and endpoints (each as a set; an endpoint compared by
/// addresses, conditions and zone) and owner references to the same uids.
pub fn endpoint_slice_matches(desired: &EndpointSlice, live: &EndpointSlice) -> bool {
    metadata_matches(&desired.metadata, &live.metadata, &[])
        && owner_uids(&desired.metadata) == owner_uids(&live.metadata)
        && desired.address_type == live.address_type
        && slice_ports(desired) == slice_ports(live)
        && slice_endpoints(desired) == slice_endpoints(live)
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
    metadata_matches(&desired.metadata, &live.metadata, CONDITIONAL_ANNOTATIONS)
        && owner_uids(&desired.metadata) == owner_uids(&live.metadata)
        && endpoints_addresses(desired) == endpoints_addresses(live)
}

/// Every desired label and annotation is on the live object with the same value, and each
/// of `conditional_annotations` the desired object lacks is absent from the live one.
fn metadata_matches(
    desired: &ObjectMeta,
    live: &ObjectMeta,
    conditional_annotations: &[&str],
) -> bool {
    let empty = BTreeMap::new();
    let live_annotations = live.annotations.as_ref().unwrap_or(&empty);
    let desired_annotations = desired.annotations.as_ref().unwrap_or(&empty);
    contains_all(desired.labels.as_ref(), live.labels.as_ref())
        && contains_all(desired.annotations.as_ref(), live.annotations.as_ref())
        && conditional_annotations
            .iter()
            .filter(|key| !desired_annotations.contains_key(**key))
            .all(|key| !live_annotations.contains_key(*key))
}

fn contains_all(
    desired: Option<&BTreeMap<String, String>>,
    live: Option<&BTreeMap<String, String>>,
) -> bool {
    desired
        .into_iter()
        .flatten()
        .all(|(k, v)| live.and_then(|l| l.get(k)) == Some(v))
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
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
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
            assert!(service_matches(&desired, &desired), "{mode}");
            assert!(
                service_matches(&desired, &as_stored(desired.clone())),
                "{mode}"
            );
            assert!(!service_needs_recreate(
                &desired,
                &as_stored(desired.clone())
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
        assert!(service_matches(&desired, &live));
        let live = edit_spec(&desired, |s| s.type_ = None);
        assert!(
            service_matches(&desired, &live),
            "type defaults to ClusterIP"
        );
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
        assert!(service_matches(&tracked, &live));
        let plain = service(ServiceMode::Headless);
        assert!(
            !service_matches(&plain, &live),
            "the tracked label must be removed"
        );
        with_metadata
            .metadata
            .labels
            .insert("version".into(), "2".into());
        let changed = desired_service(&cfg(ServiceMode::Headless), "orders", &with_metadata);
        assert!(!service_matches(&changed, &live));
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
            assert!(!service_matches(&desired, &case), "{what} should mismatch");
        }
    }

    #[test]
    fn external_name_target_mismatch() {
        let desired = service(ServiceMode::ExternalName);
        let live = edit_spec(&desired, |s| s.external_name = Some("other.consul".into()));
        assert!(!service_matches(&desired, &live));
        let live = edit_spec(&desired, |s| s.type_ = Some("ClusterIP".into()));
        assert!(!service_matches(&desired, &live));
    }

    #[test]
    fn recreate_only_between_headless_and_virtual_ip() {
        let headless = as_stored(service(ServiceMode::Headless));
        let cluster_ip = as_stored(service(ServiceMode::ClusterIp));
        let external = as_stored(service(ServiceMode::ExternalName));
        let desired_headless = service(ServiceMode::Headless);
        let desired_cluster_ip = service(ServiceMode::ClusterIp);
        let desired_external = service(ServiceMode::ExternalName);

        assert!(service_needs_recreate(&desired_headless, &cluster_ip));
        assert!(service_needs_recreate(&desired_cluster_ip, &headless));
        assert!(!service_needs_recreate(&desired_headless, &headless));
        assert!(!service_needs_recreate(&desired_cluster_ip, &cluster_ip));
        assert!(!service_needs_recreate(&desired_external, &headless));
        assert!(!service_needs_recreate(&desired_external, &cluster_ip));
        assert!(!service_needs_recreate(&desired_headless, &external));
        assert!(!service_needs_recreate(&desired_cluster_ip, &external));
        assert!(!service_matches(&desired_cluster_ip, &headless));
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
        assert!(endpoint_slice_matches(&desired, &desired));
        assert!(endpoint_slice_matches(
            &desired,
            &slice_as_stored(desired.clone())
        ));
        assert!(!endpoint_slice_needs_recreate(&desired, &desired));
    }

    #[test]
    fn slice_defaulted_port_fields_do_not_mismatch() {
        let desired = slice();
        let mut live = desired.clone();
        for p in live.ports.iter_mut().flatten() {
            p.protocol = None;
        }
        assert!(endpoint_slice_matches(&desired, &live));

        let mut unnamed_desired = desired.clone();
        for p in unnamed_desired.ports.iter_mut().flatten() {
            p.name = None;
        }
        let mut defaulted = unnamed_desired.clone();
        for p in defaulted.ports.iter_mut().flatten() {
            p.name = Some(String::new());
        }
        assert!(endpoint_slice_matches(&unnamed_desired, &defaulted));

        let mut empty_ports = desired.clone();
        empty_ports.ports = None;
        let mut stored_empty = empty_ports.clone();
        stored_empty.ports = Some(Vec::new());
        assert!(endpoint_slice_matches(&empty_ports, &stored_empty));
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
            assert!(
                !endpoint_slice_matches(&desired, &case),
                "{what} should mismatch"
            );
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
        assert!(endpoint_slice_matches(&desired, &live));
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
        assert!(endpoints_matches(&desired, &desired));

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
        assert!(endpoints_matches(&desired, &live));
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
        assert!(endpoints_matches(&desired, &live));
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
            assert!(
                !endpoints_matches(&desired, &case),
                "{what} should mismatch"
            );
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
        assert!(endpoints_matches(&desired, &live));
        live.metadata.annotations = None;
        assert!(!endpoints_matches(&desired, &live));
    }
}
