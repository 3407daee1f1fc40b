//! The desired legacy `v1/Endpoints` object for one registry service.
//!
//! Kept (on by default, switchable off) for consumers that still read Endpoints rather than
//! EndpointSlices. It is labelled `endpointslice.kubernetes.io/skip-mirror: "true"` so the
//! mirroring controller does not copy it into slices that would duplicate ours. Like the
//! built-in endpoints controller, it holds at most 1000 addresses and says so with the
//! `endpoints.kubernetes.io/over-capacity: truncated` annotation when it had to cut.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{EndpointAddress, EndpointPort, EndpointSubset, Endpoints};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use super::{base_labels, group_endpoints, object_meta, port_specs, RenderConfig, PORT_PROTOCOL};
use crate::labels::{
    ENDPOINTS_OVER_CAPACITY_ANNOTATION, ENDPOINTS_OVER_CAPACITY_TRUNCATED, SERVICE_NAME_LABEL,
    SKIP_MIRROR_LABEL,
};
use crate::model::{MicroEndpoint, MicroEndpointAddr, MicroSvcMeta, MicroSvcPort};

/// Most addresses one Endpoints object holds; the built-in endpoints controller's limit,
/// past which readers are expected to use EndpointSlices.
pub const MAX_ENDPOINTS_ADDRESSES: usize = 1000;

/// The Endpoints object that should exist for `meta`, or `None` when legacy Endpoints are
/// switched off or the Service is an ExternalName (which has no endpoints).
///
/// One subset per port set (instances with different ports cannot share a subset), ready
/// instances in `addresses`, the others in `notReadyAddresses`, each sorted. Over 1000
/// addresses, ready ones are kept first and each subset keeps a share proportional to its
/// size, as the built-in endpoints controller does, so no port set disappears entirely.
pub fn desired_endpoints(
    cfg: &RenderConfig,
    kube_name: &str,
    meta: &MicroSvcMeta,
    owner: Option<OwnerReference>,
) -> Option<Endpoints> {
    if !cfg.legacy_endpoints || !cfg.service_mode.has_endpoints() {
        return None;
    }
    let service_ports = meta.ports();
    let mut groups: Vec<Group> = group_endpoints(meta, MicroEndpoint::port_set)
        .into_iter()
        .map(|(port_set, members)| Group::new(port_set, members))
        .collect();
    let truncated = truncate(&mut groups, MAX_ENDPOINTS_ADDRESSES);

    let subsets: Vec<EndpointSubset> = groups
        .into_iter()
        .filter(|g| !g.ready.is_empty() || !g.not_ready.is_empty())
        .map(|g| {
            let fallback = g.fallback_ports;
            let ports: Vec<EndpointPort> = port_specs(&g.port_set, &service_ports, &fallback)
                .into_iter()
                .map(|spec| EndpointPort {
                    name: Some(spec.name),
                    port: spec.port,
                    protocol: Some(PORT_PROTOCOL.to_owned()),
                    app_protocol: spec.app_protocol,
                })
                .collect();
            EndpointSubset {
                addresses: addresses(&g.ready),
                not_ready_addresses: addresses(&g.not_ready),
                ports: (!ports.is_empty()).then_some(ports),
            }
        })
        .collect();

    let mut labels = base_labels(cfg);
    labels.insert(SKIP_MIRROR_LABEL.to_owned(), "true".to_owned());
    labels.insert(SERVICE_NAME_LABEL.to_owned(), kube_name.to_owned());
    let mut annotations = BTreeMap::new();
    if truncated {
        annotations.insert(
            ENDPOINTS_OVER_CAPACITY_ANNOTATION.to_owned(),
            ENDPOINTS_OVER_CAPACITY_TRUNCATED.to_owned(),
        );
    }
    Some(Endpoints {
        metadata: object_meta(cfg, kube_name, labels, annotations, owner),
        subsets: (!subsets.is_empty()).then_some(subsets),
    })
}

/// One future subset: its port set and its addresses split by readiness, each sorted.
struct Group {
    port_set: BTreeSet<MicroSvcPort>,
    fallback_ports: BTreeMap<MicroSvcPort, crate::model::MicroSvcAppProtocol>,
    ready: Vec<MicroEndpointAddr>,
    not_ready: Vec<MicroEndpointAddr>,
}

impl Group {
    fn new(
        port_set: BTreeSet<MicroSvcPort>,
        members: BTreeMap<MicroEndpointAddr, MicroEndpoint>,
    ) -> Self {
        let fallback_ports = members
            .values()
            .next()
            .map(|e| e.ports.clone())
            .unwrap_or_default();
        let (ready, not_ready): (Vec<&MicroEndpoint>, Vec<&MicroEndpoint>) =
            members.values().partition(|e| e.ready);
        Self {
            port_set,
            fallback_ports,
            ready: ready.into_iter().map(|e| e.addr).collect(),
            not_ready: not_ready.into_iter().map(|e| e.addr).collect(),
        }
    }
}

fn addresses(addrs: &[MicroEndpointAddr]) -> Option<Vec<EndpointAddress>> {
    (!addrs.is_empty()).then(|| {
        addrs
            .iter()
            .map(|a| EndpointAddress {
                ip: a.to_string(),
                ..EndpointAddress::default()
            })
            .collect()
    })
}

/// Cuts the groups down to `capacity` addresses in total, the way the endpoints controller
/// does: when the ready addresses alone exceed the capacity, only ready ones are kept;
/// otherwise all ready ones are kept and the not-ready ones fill the rest. The kept kind is
/// shared among groups in proportion to their size (rounded up, the last groups taking
/// what is left), and each group keeps its first addresses in sorted order, so the result
/// is deterministic. Returns whether anything was cut.
fn truncate(groups: &mut [Group], capacity: usize) -> bool {
    let total_ready: usize = groups.iter().map(|g| g.ready.len()).sum();
    let total_not_ready: usize = groups.iter().map(|g| g.not_ready.len()).sum();
    if total_ready + total_not_ready <= capacity {
        return false;
    }
    let truncate_ready = total_ready > capacity;
    let (budget, total) = if truncate_ready {
        (capacity, total_ready)
    } else {
        (capacity - total_ready, total_not_ready)
    };
    let mut left = budget;
    for group in groups.iter_mut() {
        let list = if truncate_ready {
            group.not_ready.clear();
            &mut group.ready
        } else {
            &mut group.not_ready
        };
        // ceil(len * budget / total); total > 0 here since something must be cut.
        let share = (list.len() * budget).div_ceil(total).min(left);
        list.truncate(share);
        left -= list.len();
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::{is_owned, CLOUD_SOURCED_SERVICE_LABEL};
    use crate::render::test_support::{cfg, ep, meta, service_with_uid};
    use crate::render::{owner_reference, ServiceMode};

    type Subset = (Vec<String>, Vec<String>, Vec<(String, i32, Option<String>)>);

    fn subsets(e: &Endpoints) -> Vec<Subset> {
        e.subsets
            .iter()
            .flatten()
            .map(|s| {
                let ips = |list: &Option<Vec<EndpointAddress>>| {
                    list.iter()
                        .flatten()
                        .map(|a| a.ip.clone())
                        .collect::<Vec<_>>()
                };
                let ports = s
                    .ports
                    .iter()
                    .flatten()
                    .map(|p| {
                        assert_eq!(p.protocol.as_deref(), Some("TCP"));
                        (
                            p.name.clone().unwrap_or_default(),
                            p.port,
                            p.app_protocol.clone(),
                        )
                    })
                    .collect();
                (ips(&s.addresses), ips(&s.not_ready_addresses), ports)
            })
            .collect()
    }

    fn many(prefix: &str, n: usize, ports: &[(u16, &str)], ready: bool) -> Vec<MicroEndpoint> {
        (0..n)
            .map(|i| {
                ep(
                    &format!("{prefix}.{}.{}", i / 250, i % 250 + 1),
                    ports,
                    ready,
                )
            })
            .collect()
    }

    #[test]
    fn off_when_disabled_or_external_name() {
        let m = meta(vec![ep("10.0.0.1", &[(80, "http")], true)]);
        let mut c = cfg(ServiceMode::Headless);
        c.legacy_endpoints = false;
        assert_eq!(desired_endpoints(&c, "orders", &m, None), None);
        let c = cfg(ServiceMode::ExternalName);
        assert_eq!(desired_endpoints(&c, "orders", &m, None), None);
        let c = cfg(ServiceMode::ClusterIp);
        assert!(desired_endpoints(&c, "orders", &m, None).is_some());
    }

    #[test]
    fn metadata_labels_and_owner() {
        let m = meta(vec![ep("10.0.0.1", &[(80, "http")], true)]);
        let owner = owner_reference(&service_with_uid("orders", "u-1"));
        let e = desired_endpoints(&cfg(ServiceMode::Headless), "orders", &m, owner.clone())
            .expect("endpoints");
        assert_eq!(e.metadata.name.as_deref(), Some("orders"));
        assert_eq!(e.metadata.namespace.as_deref(), Some("cloud"));
        assert_eq!(e.metadata.resource_version, None);
        let labels = e.metadata.labels.as_ref().expect("labels");
        assert_eq!(labels[SKIP_MIRROR_LABEL], "true");
        assert_eq!(labels[SERVICE_NAME_LABEL], "orders");
        assert_eq!(labels[CLOUD_SOURCED_SERVICE_LABEL], "true");
        assert!(is_owned(&e.metadata, "c1"));
        assert_eq!(e.metadata.annotations, None, "not truncated");
        assert_eq!(e.metadata.owner_references, owner.map(|o| vec![o]));
    }

    #[test]
    fn subsets_by_port_set_with_readiness() {
        let m = meta(vec![
            ep("10.0.0.3", &[(8080, "http")], true),
            ep("10.0.0.1", &[(8080, "http")], false),
            ep("10.0.0.2", &[(8080, "http")], true),
            ep("2001:db8::1", &[(8080, "http")], true),
            ep("10.0.1.1", &[(8080, "http"), (9090, "grpc")], true),
        ]);
        let e =
            desired_endpoints(&cfg(ServiceMode::Headless), "orders", &m, None).expect("endpoints");
        assert_eq!(
            subsets(&e),
            vec![
                (
                    vec!["10.0.0.2".into(), "10.0.0.3".into(), "2001:db8::1".into()],
                    vec!["10.0.0.1".into()],
                    vec![("http8080".into(), 8080, Some("http".into()))],
                ),
                (
                    vec!["10.0.1.1".into()],
                    vec![],
                    vec![
                        ("http8080".into(), 8080, Some("http".into())),
                        ("grpc9090".into(), 9090, Some("grpc".into())),
                    ],
                ),
            ]
        );
    }

    #[test]
    fn port_names_follow_the_service_protocol() {
        let m = meta(vec![
            ep("10.0.0.1", &[(8080, "grpc")], true),
            ep("10.0.0.2", &[(8080, "http"), (1, "tcp")], true),
        ]);
        let e =
            desired_endpoints(&cfg(ServiceMode::Headless), "orders", &m, None).expect("endpoints");
        let names: Vec<String> = subsets(&e)
            .into_iter()
            .flat_map(|(_, _, ports)| ports.into_iter().map(|(n, _, _)| n))
            .collect();
        assert_eq!(names, ["tcp1", "http8080", "http8080"]);
    }

    #[test]
    fn no_endpoints_means_no_subsets() {
        let e = desired_endpoints(&cfg(ServiceMode::Headless), "orders", &meta(vec![]), None)
            .expect("endpoints");
        assert_eq!(e.subsets, None);
    }

    #[test]
    fn endpoints_without_ports_render_a_portless_subset() {
        let m = meta(vec![ep("10.0.0.1", &[], true)]);
        let e =
            desired_endpoints(&cfg(ServiceMode::Headless), "orders", &m, None).expect("endpoints");
        assert_eq!(subsets(&e), vec![(vec!["10.0.0.1".into()], vec![], vec![])]);
        assert_eq!(e.subsets.as_ref().map(|s| s[0].ports.clone()), Some(None));
    }

    #[test]
    fn exactly_1000_is_not_truncated() {
        let m = meta(many("10.1", 1000, &[(80, "http")], true));
        let e =
            desired_endpoints(&cfg(ServiceMode::Headless), "orders", &m, None).expect("endpoints");
        assert_eq!(e.metadata.annotations, None);
        assert_eq!(subsets(&e)[0].0.len(), 1000);
    }

    #[test]
    fn over_capacity_keeps_ready_first() {
        let mut endpoints = many("10.1", 900, &[(80, "http")], true);
        endpoints.extend(many("10.2", 300, &[(80, "http")], false));
        let m = meta(endpoints);
        let e =
            desired_endpoints(&cfg(ServiceMode::Headless), "orders", &m, None).expect("endpoints");
        let annotations = e.metadata.annotations.as_ref().expect("annotated");
        assert_eq!(annotations[ENDPOINTS_OVER_CAPACITY_ANNOTATION], "truncated");
        let s = subsets(&e);
        assert_eq!(s[0].0.len(), 900, "all ready kept");
        assert_eq!(s[0].1.len(), 100, "not-ready fill the rest");
        assert_eq!(s[0].1[0], "10.2.0.1", "first in sorted order kept");
    }

    #[test]
    fn over_capacity_of_ready_drops_not_ready_and_shares_proportionally() {
        let mut endpoints = many("10.1", 1500, &[(80, "http")], true);
        endpoints.extend(many("10.2", 500, &[(81, "http")], true));
        endpoints.extend(many("10.3", 10, &[(82, "http")], false));
        let m = meta(endpoints);
        let e =
            desired_endpoints(&cfg(ServiceMode::Headless), "orders", &m, None).expect("endpoints");
        let s = subsets(&e);
        let counts: Vec<(usize, usize)> = s.iter().map(|(r, n, _)| (r.len(), n.len())).collect();
        assert_eq!(counts, [(750, 0), (250, 0)], "port 82 held only not-ready");
        let total: usize = counts.iter().map(|(r, n)| r + n).sum();
        assert_eq!(total, 1000);
    }

    #[test]
    fn truncation_rounds_up_and_never_exceeds_capacity() {
        let mut groups: Vec<Group> = (0..3)
            .map(|g| Group {
                port_set: BTreeSet::from([crate::render::test_support::port(80 + g)]),
                fallback_ports: BTreeMap::new(),
                ready: (0..7u8)
                    .map(|i| format!("10.{g}.0.{}", i + 1).parse().expect("addr"))
                    .collect(),
                not_ready: Vec::new(),
            })
            .collect();
        assert!(truncate(&mut groups, 10));
        let counts: Vec<usize> = groups.iter().map(|g| g.ready.len()).collect();
        // ceil(7 * 10 / 21) = 4, 4, then what is left: 2.
        assert_eq!(counts, [4, 4, 2]);
    }
}
