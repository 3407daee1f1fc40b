//! Splitting a service's endpoints into EndpointSlices, stably.
//!
//! This module owns which endpoint goes into which slice and what the slices are called.
//! Slices are grouped by address family (a slice has one `addressType`) and by port set
//! (a slice has one `ports` list, and registry instances of one service may listen on
//! different ports). The placement is *stable*: an endpoint stays in the slice it is
//! already in, so one instance added, removed or changing health rewrites exactly one slice,
//! and a resync with nothing changed plans exactly the slices that exist. Fragmentation is
//! bounded by repacking a group that has grown more than one slice beyond what its size
//! needs. The planner is pure: it reads the cached slices it is given and returns the
//! complete desired set plus the names to delete; comparing with the cache and writing is
//! the sink's job ([`crate::diff::endpoint_slice_matches`]).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use crate::labels::{
    ENDPOINTSLICE_CONTROLLER_NAME, ENDPOINTSLICE_MANAGED_BY_LABEL, SERVICE_NAME_LABEL,
};
use crate::model::{AddressFamily, MicroEndpoint, MicroEndpointAddr, MicroSvcMeta, MicroSvcPort};
use crate::naming::short_hash;
use crate::render::{
    base_labels, group_endpoints, object_meta, port_specs, RenderConfig, PORT_PROTOCOL,
};

/// Hex digits of the port-set hash in slice names.
const GROUP_HASH_LEN: usize = 6;

/// Hex digits used instead when two port sets of one family share the short hash, so that
/// their names (and the grouping of existing slices by name) stay apart.
const GROUP_HASH_LEN_ON_COLLISION: usize = 16;

/// What the planner needs to know of one existing EndpointSlice: its name, whether it is
/// ours, and its endpoints' addresses in the order the slice lists them. The sink's cache
/// keeps exactly this of each slice (see `sink::project`), not the slice.
#[derive(Clone, Copy, Debug)]
pub struct ExistingSlice<'a> {
    pub name: &'a str,
    /// Both ownership labels with our values ([`crate::labels::is_owned`]).
    pub owned: bool,
    pub addresses: &'a [MicroEndpointAddr],
}

/// The addresses of a slice's endpoints, in order; addresses that do not parse are left
/// out (they cannot be one of ours, so they never keep an endpoint in place).
pub fn slice_addresses(slice: &EndpointSlice) -> Vec<MicroEndpointAddr> {
    slice
        .endpoints
        .iter()
        .flat_map(|e| e.addresses.iter())
        .filter_map(|text| text.parse().ok())
        .collect()
}

/// What the sink should make true for one service's EndpointSlices.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlicePlan {
    /// Every slice that should exist, sorted by name, whether or not it differs from the
    /// cached one. The sink writes those that do not match.
    pub desired: Vec<EndpointSlice>,
    /// Names of existing (owned) slices that should no longer exist, sorted.
    pub delete: Vec<String>,
}

/// Plans the EndpointSlices for `meta`.
///
/// `existing` is what the cache holds for this Service (listed by its service-name
/// label). Only slices we own (see [`crate::labels::is_owned`]) are reused or deleted; a
/// foreign slice is never touched, and its name is never chosen for a new slice.
///
/// Rules, per group of (address family, port set):
/// - slices are named `<kube_name>-<v4|v6>-<6 hex of the port-set hash>-<index>`; an
///   existing slice belongs to the group whose prefix its name carries;
/// - an endpoint already in an existing slice of its group stays there (its conditions
///   and zone are refreshed); endpoints that are gone leave their slice;
/// - new endpoints fill existing slices of the group that have room, lowest index first
///   (including slices that lost all their endpoints, so a replaced instance reuses its
///   slice), then new slices with the smallest unused index;
/// - slices left empty, slices of groups that no longer exist and slices whose names follow
///   no group are deleted;
/// - when a group holds more than `ceil(n / max) + 1` slices it is repacked from scratch
///   in address order into the lowest-indexed of its current slices.
///
/// ExternalName Services have no endpoints: nothing is desired and every owned slice is
/// deleted.
pub fn plan_endpoint_slices(
    cfg: &RenderConfig,
    kube_name: &str,
    meta: &MicroSvcMeta,
    existing: &[ExistingSlice<'_>],
    owner: Option<OwnerReference>,
) -> SlicePlan {
    let owned: Vec<&ExistingSlice<'_>> = existing.iter().filter(|s| s.owned).collect();
    let foreign_names: BTreeSet<&str> = existing
        .iter()
        .filter(|s| !s.owned)
        .map(|s| s.name)
        .collect();

    let groups = if cfg.service_mode.has_endpoints() {
        group_endpoints(meta, |e| (e.addr.family(), e.port_set()))
    } else {
        BTreeMap::new()
    };
    let tags = group_tags(groups.keys());
    let service_ports = meta.ports();
    let capacity = cfg.slice_capacity();

    let mut desired = Vec::new();
    for ((family, port_set), members) in &groups {
        let tag = tags
            .get(&(*family, port_set.clone()))
            .cloned()
            .unwrap_or_else(|| port_set_hash(port_set, GROUP_HASH_LEN));
        let prefix = format!("{kube_name}-{}-{tag}-", family.tag());
        let existing_slots: BTreeMap<usize, &ExistingSlice<'_>> = owned
            .iter()
            .filter_map(|s| slice_index(s, &prefix).map(|i| (i, *s)))
            .collect();
        let is_free = |index: usize| {
            !existing_slots.contains_key(&index)
                && !foreign_names.contains(format!("{prefix}{index}").as_str())
        };
        let slots = place(members, &existing_slots, is_free, capacity);

        let fallback = members
            .values()
            .next()
            .map(|e| e.ports.clone())
            .unwrap_or_default();
        let ports: Vec<EndpointPort> = port_specs(port_set, &service_ports, &fallback)
            .into_iter()
            .map(|spec| EndpointPort {
                name: Some(spec.name),
                port: Some(spec.port),
                protocol: Some(PORT_PROTOCOL.to_owned()),
                app_protocol: spec.app_protocol,
            })
            .collect();
        for (index, addrs) in slots {
            desired.push(render_slice(
                cfg,
                kube_name,
                &format!("{prefix}{index}"),
                *family,
                &ports,
                addrs.iter().filter_map(|a| members.get(a)),
                owner.clone(),
            ));
        }
    }
    desired.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));

    let wanted: BTreeSet<&str> = desired
        .iter()
        .filter_map(|s| s.metadata.name.as_deref())
        .collect();
    let mut delete: Vec<String> = owned
        .iter()
        .map(|s| s.name)
        .filter(|name| !wanted.contains(name))
        .map(str::to_owned)
        .collect();
    delete.sort();
    delete.dedup();
    SlicePlan { desired, delete }
}

/// The hash part of slice names for each group: 6 hex digits of the port set's hash, or 16
/// for groups whose 6 digits collide with another group of the same family.
fn group_tags<'a>(
    keys: impl Iterator<Item = &'a (AddressFamily, BTreeSet<MicroSvcPort>)>,
) -> BTreeMap<(AddressFamily, BTreeSet<MicroSvcPort>), String> {
    let short: BTreeMap<(AddressFamily, BTreeSet<MicroSvcPort>), String> = keys
        .map(|key| (key.clone(), port_set_hash(&key.1, GROUP_HASH_LEN)))
        .collect();
    let mut uses: BTreeMap<(AddressFamily, &str), usize> = BTreeMap::new();
    for ((family, _), hash) in &short {
        *uses.entry((*family, hash.as_str())).or_default() += 1;
    }
    short
        .iter()
        .map(|(key, hash)| {
            let tag = if uses.get(&(key.0, hash.as_str())).copied().unwrap_or(0) > 1 {
                port_set_hash(&key.1, GROUP_HASH_LEN_ON_COLLISION)
            } else {
                hash.clone()
            };
            (key.clone(), tag)
        })
        .collect()
}

/// Hash of a port set, independent of the ports' protocols, so that a protocol change
/// updates slices in place instead of renaming them.
fn port_set_hash(port_set: &BTreeSet<MicroSvcPort>, len: usize) -> String {
    let text: Vec<String> = port_set.iter().map(ToString::to_string).collect();
    short_hash(&text.join(","), len)
}

/// The index of a slice named `<prefix><index>`, with `index` in canonical decimal form.
fn slice_index(slice: &ExistingSlice<'_>, prefix: &str) -> Option<usize> {
    let rest = slice.name.strip_prefix(prefix)?;
    let canonical = !rest.is_empty()
        && rest.bytes().all(|b| b.is_ascii_digit())
        && (rest == "0" || !rest.starts_with('0'));
    if canonical {
        rest.parse().ok()
    } else {
        None
    }
}

/// Assigns a group's endpoints to slice indices following the stability rules of
/// [`plan_endpoint_slices`]. Returns only non-empty slices, each with sorted addresses.
fn place(
    members: &BTreeMap<MicroEndpointAddr, MicroEndpoint>,
    existing: &BTreeMap<usize, &ExistingSlice<'_>>,
    is_free: impl Fn(usize) -> bool,
    capacity: usize,
) -> BTreeMap<usize, Vec<MicroEndpointAddr>> {
    let mut unplaced: BTreeSet<MicroEndpointAddr> = members.keys().copied().collect();

    // Endpoints stay where they are (an address listed twice is kept where first seen).
    let mut slots: BTreeMap<usize, Vec<MicroEndpointAddr>> = BTreeMap::new();
    for (index, slice) in existing {
        let mut kept = Vec::new();
        for addr in slice.addresses {
            if kept.len() < capacity && unplaced.remove(addr) {
                kept.push(*addr);
            }
        }
        slots.insert(*index, kept);
    }

    // New endpoints fill existing slices with room, lowest index first...
    let mut pool = unplaced.into_iter().peekable();
    for kept in slots.values_mut() {
        while kept.len() < capacity {
            match pool.next() {
                Some(addr) => kept.push(addr),
                None => break,
            }
        }
    }
    // ...then new slices at the smallest unused indices.
    let mut index = 0;
    while pool.peek().is_some() {
        while !is_free(index) || slots.contains_key(&index) {
            index += 1;
        }
        slots.insert(index, pool.by_ref().take(capacity).collect());
    }

    slots.retain(|_, addrs| !addrs.is_empty());
    let needed = members.len().div_ceil(capacity);
    if slots.len() > needed + 1 {
        let indices: Vec<usize> = slots.keys().copied().take(needed).collect();
        let all: Vec<MicroEndpointAddr> = members.keys().copied().collect();
        slots = indices
            .into_iter()
            .zip(all.chunks(capacity).map(<[MicroEndpointAddr]>::to_vec))
            .collect();
    }
    for addrs in slots.values_mut() {
        addrs.sort();
    }
    slots
}

fn render_slice<'a>(
    cfg: &RenderConfig,
    kube_name: &str,
    name: &str,
    family: AddressFamily,
    ports: &[EndpointPort],
    members: impl Iterator<Item = &'a MicroEndpoint>,
    owner: Option<OwnerReference>,
) -> EndpointSlice {
    let mut labels = base_labels(cfg);
    labels.insert(SERVICE_NAME_LABEL.to_owned(), kube_name.to_owned());
    labels.insert(
        ENDPOINTSLICE_MANAGED_BY_LABEL.to_owned(),
        ENDPOINTSLICE_CONTROLLER_NAME.to_owned(),
    );
    EndpointSlice {
        metadata: object_meta(cfg, name, labels, BTreeMap::new(), owner),
        address_type: family.as_slice_address_type().to_owned(),
        endpoints: members.map(endpoint).collect(),
        ports: (!ports.is_empty()).then(|| ports.to_vec()),
    }
}

/// One endpoint: `ready` from registry health; `serving` the same (a registry has no
/// separate notion of "serving while terminating"); never `terminating`, since a
/// deregistered instance simply disappears.
fn endpoint(member: &MicroEndpoint) -> Endpoint {
    Endpoint {
        addresses: vec![member.addr.to_string()],
        conditions: Some(EndpointConditions {
            ready: Some(member.ready),
            serving: Some(member.ready),
            terminating: Some(false),
        }),
        zone: member.zone.clone().filter(|z| !z.is_empty()),
        ..Endpoint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::{CLOUD_SOURCED_SERVICE_LABEL, CONNECTOR_INSTANCE_LABEL, MANAGED_BY_LABEL};
    use crate::naming::is_dns1123_subdomain;
    use crate::render::test_support::{cfg, ep, meta, port, service_with_uid};
    use crate::render::{owner_reference, ServiceMode};

    const NAME: &str = "orders";

    fn v4(i: usize) -> String {
        format!("10.0.{}.{}", i / 200, i % 200 + 1)
    }

    fn v4_endpoints(range: std::ops::Range<usize>, ready: bool) -> Vec<MicroEndpoint> {
        range
            .map(|i| ep(&v4(i), &[(8080, "http")], ready))
            .collect()
    }

    /// The planner fed with what the sink's cache keeps of `existing`.
    fn plan_with(
        c: &RenderConfig,
        kube_name: &str,
        m: &MicroSvcMeta,
        existing: &[EndpointSlice],
        owner: Option<OwnerReference>,
    ) -> SlicePlan {
        let kept: Vec<(String, bool, Vec<MicroEndpointAddr>)> = existing
            .iter()
            .map(|s| {
                (
                    s.metadata.name.clone().unwrap_or_default(),
                    crate::labels::is_owned(&s.metadata, &c.connector_id),
                    slice_addresses(s),
                )
            })
            .collect();
        let views: Vec<ExistingSlice<'_>> = kept
            .iter()
            .map(|(name, owned, addresses)| ExistingSlice {
                name,
                owned: *owned,
                addresses,
            })
            .collect();
        plan_endpoint_slices(c, kube_name, m, &views, owner)
    }

    fn plan(m: &MicroSvcMeta, existing: &[EndpointSlice]) -> SlicePlan {
        plan_with(&cfg(ServiceMode::Headless), NAME, m, existing, None)
    }

    fn names(slices: &[EndpointSlice]) -> Vec<String> {
        slices
            .iter()
            .map(|s| s.metadata.name.clone().unwrap_or_default())
            .collect()
    }

    fn addrs(slice: &EndpointSlice) -> Vec<String> {
        slice
            .endpoints
            .iter()
            .flat_map(|e| e.addresses.clone())
            .collect()
    }

    fn sizes(slices: &[EndpointSlice]) -> Vec<usize> {
        slices.iter().map(|s| s.endpoints.len()).collect()
    }

    /// The slices that differ between two plans' desired sets, plus deletions: what the sink
    /// would write.
    fn writes(before: &[EndpointSlice], after: &SlicePlan) -> usize {
        let changed = after
            .desired
            .iter()
            .filter(|d| {
                !before
                    .iter()
                    .any(|b| b.metadata.name == d.metadata.name && *b == **d)
            })
            .count();
        changed + after.delete.len()
    }

    fn prefix_v4_8080() -> String {
        format!(
            "{NAME}-v4-{}-",
            port_set_hash(&BTreeSet::from([port(8080)]), 6)
        )
    }

    #[test]
    fn splits_250_into_three_slices() {
        let m = meta(v4_endpoints(0..250, true));
        let p = plan(&m, &[]);
        let prefix = prefix_v4_8080();
        assert_eq!(names(&p.desired), [0, 1, 2].map(|i| format!("{prefix}{i}")));
        assert_eq!(sizes(&p.desired), [100, 100, 50]);
        assert!(p.delete.is_empty());
        // Sorted by address across slices.
        assert_eq!(addrs(&p.desired[0])[0], "10.0.0.1");
        assert_eq!(addrs(&p.desired[2])[49], v4(249));
    }

    #[test]
    fn slice_shape() {
        let mut zoned = ep("10.0.0.9", &[(8080, "http"), (9090, "grpc")], false);
        zoned.zone = Some("zone-a".into());
        let m = meta(vec![
            ep("10.0.0.1", &[(8080, "http"), (9090, "grpc")], true),
            zoned,
        ]);
        let owner = owner_reference(&service_with_uid(NAME, "u-1"));
        let p = plan_with(&cfg(ServiceMode::Headless), NAME, &m, &[], owner.clone());
        assert_eq!(p.desired.len(), 1);
        let s = &p.desired[0];
        assert_eq!(s.address_type, "IPv4");
        assert_eq!(s.metadata.namespace.as_deref(), Some("cloud"));
        assert_eq!(s.metadata.resource_version, None);
        assert_eq!(s.metadata.owner_references, owner.map(|o| vec![o]));
        let labels = s.metadata.labels.as_ref().expect("labels");
        assert_eq!(labels[SERVICE_NAME_LABEL], NAME);
        assert_eq!(
            labels[ENDPOINTSLICE_MANAGED_BY_LABEL],
            "registry-connector.flomesh.io"
        );
        assert_eq!(labels[MANAGED_BY_LABEL], "registry-connector");
        assert_eq!(labels[CONNECTOR_INSTANCE_LABEL], "c1");
        assert_eq!(labels[CLOUD_SOURCED_SERVICE_LABEL], "true");
        assert_eq!(
            s.ports,
            Some(vec![
                EndpointPort {
                    name: Some("http8080".into()),
                    port: Some(8080),
                    protocol: Some("TCP".into()),
                    app_protocol: Some("http".into()),
                },
                EndpointPort {
                    name: Some("grpc9090".into()),
                    port: Some(9090),
                    protocol: Some("TCP".into()),
                    app_protocol: Some("grpc".into()),
                },
            ])
        );
        assert_eq!(
            s.endpoints,
            vec![
                Endpoint {
                    addresses: vec!["10.0.0.1".into()],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        serving: Some(true),
                        terminating: Some(false),
                    }),
                    ..Endpoint::default()
                },
                Endpoint {
                    addresses: vec!["10.0.0.9".into()],
                    conditions: Some(EndpointConditions {
                        ready: Some(false),
                        serving: Some(false),
                        terminating: Some(false),
                    }),
                    zone: Some("zone-a".into()),
                    ..Endpoint::default()
                },
            ]
        );
        assert!(is_dns1123_subdomain(
            s.metadata.name.as_deref().unwrap_or_default()
        ));
    }

    #[test]
    fn one_slice_per_family_and_port_set() {
        let m = meta(vec![
            ep("10.0.0.1", &[(8080, "http")], true),
            ep("2001:db8::1", &[(8080, "http")], true),
            ep("10.0.0.2", &[(8080, "http"), (9090, "grpc")], true),
            ep("10.0.0.3", &[], true),
        ]);
        let p = plan(&m, &[]);
        assert_eq!(p.desired.len(), 4);
        let mut kinds: Vec<(String, usize, Vec<String>)> = p
            .desired
            .iter()
            .map(|s| {
                (
                    s.address_type.clone(),
                    s.ports.as_ref().map_or(0, Vec::len),
                    addrs(s),
                )
            })
            .collect();
        kinds.sort();
        assert_eq!(
            kinds,
            vec![
                ("IPv4".into(), 0, vec!["10.0.0.3".into()]),
                ("IPv4".into(), 1, vec!["10.0.0.1".into()]),
                ("IPv4".into(), 2, vec!["10.0.0.2".into()]),
                ("IPv6".into(), 1, vec!["2001:db8::1".into()]),
            ]
        );
        for s in &p.desired {
            let name = s.metadata.name.as_deref().unwrap_or_default();
            let tag = if s.address_type == "IPv6" {
                "-v6-"
            } else {
                "-v4-"
            };
            assert!(name.starts_with(NAME) && name.contains(tag), "{name}");
            assert!(name.ends_with("-0"), "{name}");
        }
    }

    #[test]
    fn no_change_plans_exactly_the_existing_slices() {
        let m = meta(v4_endpoints(0..250, true));
        let first = plan(&m, &[]);
        let second = plan(&m, &first.desired);
        assert_eq!(second.desired, first.desired);
        assert!(second.delete.is_empty());
        assert_eq!(writes(&first.desired, &second), 0);
    }

    #[test]
    fn adding_one_instance_writes_one_slice() {
        let before = plan(&meta(v4_endpoints(0..250, true)), &[]);
        let after = plan(&meta(v4_endpoints(0..251, true)), &before.desired);
        assert_eq!(writes(&before.desired, &after), 1);
        assert_eq!(sizes(&after.desired), [100, 100, 51]);
    }

    #[test]
    fn adding_to_full_slices_creates_one_new_slice() {
        let before = plan(&meta(v4_endpoints(0..200, true)), &[]);
        let after = plan(&meta(v4_endpoints(0..201, true)), &before.desired);
        assert_eq!(writes(&before.desired, &after), 1);
        assert_eq!(sizes(&after.desired), [100, 100, 1]);
        assert_eq!(names(&after.desired)[..2], names(&before.desired)[..]);
    }

    #[test]
    fn removing_one_instance_writes_one_slice() {
        let before = plan(&meta(v4_endpoints(0..250, true)), &[]);
        let mut endpoints = v4_endpoints(0..250, true);
        endpoints.remove(10); // from the first slice
        let after = plan(&meta(endpoints), &before.desired);
        assert_eq!(writes(&before.desired, &after), 1);
        assert_eq!(sizes(&after.desired), [99, 100, 50]);
    }

    #[test]
    fn flipping_health_writes_one_slice() {
        let before = plan(&meta(v4_endpoints(0..250, true)), &[]);
        let mut endpoints = v4_endpoints(0..250, true);
        endpoints[150].ready = false;
        let after = plan(&meta(endpoints), &before.desired);
        assert_eq!(writes(&before.desired, &after), 1);
        let flipped = &after.desired[1];
        let e = flipped
            .endpoints
            .iter()
            .find(|e| e.addresses == [v4(150)])
            .expect("endpoint stays in its slice");
        assert_eq!(e.conditions.as_ref().and_then(|c| c.ready), Some(false));
        assert_eq!(e.conditions.as_ref().and_then(|c| c.serving), Some(false));
    }

    #[test]
    fn new_endpoints_fill_the_gap_left_by_removed_ones() {
        let before = plan(&meta(v4_endpoints(0..250, true)), &[]);
        // Replace an instance of the first slice with a new address that sorts last.
        let mut endpoints = v4_endpoints(0..250, true);
        endpoints.remove(5);
        endpoints.push(ep("10.9.9.9", &[(8080, "http")], true));
        let after = plan(&meta(endpoints), &before.desired);
        assert_eq!(writes(&before.desired, &after), 1);
        assert!(addrs(&after.desired[0]).contains(&"10.9.9.9".to_owned()));
        assert_eq!(sizes(&after.desired), [100, 100, 50]);
    }

    #[test]
    fn replaced_single_instance_reuses_its_slice() {
        let before = plan(&meta(vec![ep("10.0.0.1", &[(8080, "http")], true)]), &[]);
        let after = plan(
            &meta(vec![ep("10.0.0.2", &[(8080, "http")], true)]),
            &before.desired,
        );
        assert_eq!(names(&after.desired), names(&before.desired));
        assert!(after.delete.is_empty());
        assert_eq!(writes(&before.desired, &after), 1);
    }

    #[test]
    fn emptied_slices_are_deleted() {
        let before = plan(&meta(v4_endpoints(0..250, true)), &[]);
        let after = plan(&meta(v4_endpoints(0..200, true)), &before.desired);
        assert_eq!(after.delete, [names(&before.desired)[2].clone()]);
        assert_eq!(sizes(&after.desired), [100, 100]);
        assert_eq!(writes(&before.desired, &after), 1);
    }

    #[test]
    fn all_instances_gone_deletes_every_slice() {
        let before = plan(&meta(v4_endpoints(0..250, true)), &[]);
        let after = plan(&meta(Vec::new()), &before.desired);
        assert!(after.desired.is_empty());
        assert_eq!(after.delete, names(&before.desired));
    }

    #[test]
    fn port_change_moves_endpoints_to_a_new_group() {
        let before = plan(&meta(vec![ep("10.0.0.1", &[(8080, "http")], true)]), &[]);
        let after = plan(
            &meta(vec![ep("10.0.0.1", &[(8081, "http")], true)]),
            &before.desired,
        );
        assert_eq!(after.delete, names(&before.desired));
        assert_eq!(after.desired.len(), 1);
        assert_ne!(names(&after.desired), names(&before.desired));
    }

    #[test]
    fn protocol_change_keeps_slice_names() {
        let before = plan(&meta(vec![ep("10.0.0.1", &[(8080, "http")], true)]), &[]);
        let after = plan(
            &meta(vec![ep("10.0.0.1", &[(8080, "grpc")], true)]),
            &before.desired,
        );
        assert_eq!(names(&after.desired), names(&before.desired));
        assert!(after.delete.is_empty());
        let ports = after.desired[0].ports.clone().unwrap_or_default();
        assert_eq!(ports[0].name.as_deref(), Some("grpc8080"));
    }

    #[test]
    fn fragmented_groups_are_repacked() {
        let before = plan(&meta(v4_endpoints(0..300, true)), &[]);
        assert_eq!(sizes(&before.desired), [100, 100, 100]);
        // Keep 10 per slice: 30 endpoints need 1 slice; 3 > 1 + 1.
        let kept: Vec<MicroEndpoint> = (0..300)
            .filter(|i| i % 100 < 10)
            .map(|i| ep(&v4(i), &[(8080, "http")], true))
            .collect();
        let after = plan(&meta(kept), &before.desired);
        assert_eq!(sizes(&after.desired), [30]);
        assert_eq!(names(&after.desired), [names(&before.desired)[0].clone()]);
        assert_eq!(after.delete, names(&before.desired)[1..]);
        let a = addrs(&after.desired[0]);
        let mut sorted = a.clone();
        sorted.sort_by_key(|s| s.parse::<std::net::Ipv4Addr>().ok());
        assert_eq!(a, sorted);
    }

    #[test]
    fn mild_fragmentation_is_tolerated() {
        let before = plan(&meta(v4_endpoints(0..300, true)), &[]);
        // 150 endpoints in 3 slices: needed 2, 3 <= 2 + 1: no repack.
        let kept: Vec<MicroEndpoint> = (0..300)
            .filter(|i| i % 2 == 0)
            .map(|i| ep(&v4(i), &[(8080, "http")], true))
            .collect();
        let after = plan(&meta(kept), &before.desired);
        assert_eq!(sizes(&after.desired), [50, 50, 50]);
        assert!(after.delete.is_empty());
    }

    #[test]
    fn deleted_slice_is_recreated_under_its_name() {
        let before = plan(&meta(v4_endpoints(0..250, true)), &[]);
        let mut cache = before.desired.clone();
        let lost = cache.remove(1);
        let after = plan(&meta(v4_endpoints(0..250, true)), &cache);
        // The lost endpoints first fill the slice with room (index 2), the rest come back
        // under the lost slice's name: every endpoint is published again, in two writes.
        assert_eq!(names(&after.desired), names(&before.desired));
        assert_eq!(sizes(&after.desired), [100, 50, 100]);
        assert_eq!(after.desired[0], before.desired[0]);
        assert_ne!(after.desired[1], lost);
        let total: BTreeSet<String> = after.desired.iter().flat_map(addrs).collect();
        assert_eq!(total.len(), 250);
        assert!(after.delete.is_empty());
        assert_eq!(writes(&cache, &after), 2);
    }

    #[test]
    fn smaller_capacity_splits_existing_slices() {
        let before = plan(&meta(v4_endpoints(0..250, true)), &[]);
        let mut small = cfg(ServiceMode::Headless);
        small.max_endpoints_per_slice = 50;
        let after = plan_with(
            &small,
            NAME,
            &meta(v4_endpoints(0..250, true)),
            &before.desired,
            None,
        );
        assert!(after.desired.iter().all(|s| s.endpoints.len() <= 50));
        let total: usize = sizes(&after.desired).iter().sum();
        assert_eq!(total, 250);
        assert!(after.delete.is_empty());
    }

    #[test]
    fn capacity_zero_is_treated_as_one() {
        let mut c = cfg(ServiceMode::Headless);
        c.max_endpoints_per_slice = 0;
        let p = plan_with(&c, NAME, &meta(v4_endpoints(0..3, true)), &[], None);
        assert_eq!(sizes(&p.desired), [1, 1, 1]);
    }

    #[test]
    fn external_name_deletes_everything() {
        let m = meta(v4_endpoints(0..5, true));
        let before = plan(&m, &[]);
        let p = plan_with(
            &cfg(ServiceMode::ExternalName),
            NAME,
            &m,
            &before.desired,
            None,
        );
        assert!(p.desired.is_empty());
        assert_eq!(p.delete, names(&before.desired));
    }

    #[test]
    fn foreign_slices_are_never_reused_or_deleted() {
        let m = meta(v4_endpoints(0..1, true));
        let mut foreign = plan(&m, &[]).desired.remove(0);
        if let Some(labels) = foreign.metadata.labels.as_mut() {
            labels.remove(CONNECTOR_INSTANCE_LABEL);
        }
        let p = plan(&m, std::slice::from_ref(&foreign));
        assert!(p.delete.is_empty());
        assert_eq!(names(&p.desired), [format!("{}1", prefix_v4_8080())]);
    }

    #[test]
    fn stray_owned_slices_are_deleted() {
        let m = meta(v4_endpoints(0..1, true));
        let mut stray = plan(&m, &[]).desired.remove(0);
        stray.metadata.name = Some(format!("{NAME}-legacy-abc"));
        let mut odd_index = stray.clone();
        odd_index.metadata.name = Some(format!("{}01", prefix_v4_8080()));
        let p = plan(&m, &[stray, odd_index]);
        assert_eq!(
            p.delete,
            [
                format!("{NAME}-legacy-abc"),
                format!("{}01", prefix_v4_8080())
            ]
        );
        assert_eq!(names(&p.desired), [format!("{}0", prefix_v4_8080())]);
    }

    #[test]
    fn duplicated_addresses_in_cache_are_kept_once() {
        let m = meta(v4_endpoints(0..3, true));
        let first = plan(&m, &[]).desired;
        let mut copy = first[0].clone();
        copy.metadata.name = Some(format!("{}1", prefix_v4_8080()));
        let p = plan(&m, &[first[0].clone(), copy]);
        assert_eq!(sizes(&p.desired), [3]);
        assert_eq!(p.delete, [format!("{}1", prefix_v4_8080())]);
    }

    #[test]
    fn unparsable_cached_addresses_are_dropped() {
        let m = meta(v4_endpoints(0..2, true));
        let mut cached = plan(&m, &[]).desired;
        cached[0].endpoints.push(Endpoint {
            addresses: vec!["not-an-ip".into()],
            ..Endpoint::default()
        });
        let p = plan(&m, &cached);
        assert_eq!(addrs(&p.desired[0]), [v4(0), v4(1)]);
    }

    #[test]
    fn hash_collisions_lengthen_the_tag() {
        let a = (AddressFamily::Ipv4, BTreeSet::from([port(1)]));
        let b = (AddressFamily::Ipv6, BTreeSet::from([port(1)]));
        let tags = group_tags([&a, &b].into_iter());
        assert_eq!(tags[&a].len(), 6, "same hash in different families is fine");
        assert_eq!(tags[&b].len(), 6);

        // Find two port sets whose 6-digit hashes collide (birthday bound: a few thousand).
        let mut seen: BTreeMap<String, u16> = BTreeMap::new();
        let mut pair = None;
        for p in 1..=u16::MAX {
            let hash = port_set_hash(&BTreeSet::from([port(p)]), 6);
            if let Some(q) = seen.insert(hash, p) {
                pair = Some((q, p));
                break;
            }
        }
        let (q, p) = pair.expect("a 24-bit collision among 65535 single-port sets");
        let x = (AddressFamily::Ipv4, BTreeSet::from([port(q)]));
        let y = (AddressFamily::Ipv4, BTreeSet::from([port(p)]));
        let tags = group_tags([&x, &y].into_iter());
        assert_eq!(tags[&x].len(), 16);
        assert_ne!(tags[&x], tags[&y]);
    }

    #[test]
    fn slice_names_are_bounded() {
        let long = "a".repeat(63);
        let p = plan_with(
            &cfg(ServiceMode::Headless),
            &long,
            &meta(v4_endpoints(0..1, true)),
            &[],
            None,
        );
        let name = p.desired[0].metadata.name.clone().unwrap_or_default();
        assert!(name.len() <= 253 && is_dns1123_subdomain(&name), "{name}");
    }
}
