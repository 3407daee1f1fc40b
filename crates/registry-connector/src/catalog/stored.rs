//! The catalog's own compact copy of a [`MicroSvcMeta`].
//!
//! The catalog holds every published service for the life of the process, while a
//! `MicroSvcMeta` is shaped for building and rendering: each endpoint carries its ports
//! in a `BTreeMap`, whose first node reserves room for eleven entries (about 300 bytes
//! for a one-port instance), and the instances of one service nearly always listen on
//! the same ports. [`StoredMeta`] keeps the same information with boxed slices, one
//! shared port list per distinct port set of a service, and no metadata maps when there
//! is no metadata. The conversion is lossless both ways, so the catalog still hands out
//! exactly the `MicroSvcMeta` it was given, and equality of stored values is equality
//! of the metas (which is how the catalog decides what changed).

use std::sync::Arc;

use crate::model::{
    MicroEndpoint, MicroEndpointAddr, MicroSvcAppProtocol, MicroSvcDomainName, MicroSvcMeta,
    MicroSvcName, MicroSvcPort, ServiceMetadata,
};

/// One instance's ports, sorted by port, shared by the instances of a service that
/// listen on the same ones.
type Ports = Arc<[(MicroSvcPort, MicroSvcAppProtocol)]>;

#[derive(Clone, Debug, PartialEq, Eq)]
struct StoredEndpoint {
    addr: MicroEndpointAddr,
    ready: bool,
    zone: Option<Box<str>>,
    ports: Ports,
}

/// A [`MicroSvcMeta`] as the catalog keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct StoredMeta {
    pub(super) registry_name: MicroSvcName,
    domain: Box<str>,
    endpoints: Box<[StoredEndpoint]>,
    /// `None` when the service has no metadata (nearly always).
    metadata: Option<Box<ServiceMetadata>>,
}

impl StoredMeta {
    pub(super) fn new(meta: MicroSvcMeta) -> Self {
        let mut shared: Vec<Ports> = Vec::new();
        let endpoints = meta
            .endpoints
            .into_iter()
            .map(|e| {
                let ports: Vec<(MicroSvcPort, MicroSvcAppProtocol)> = e.ports.into_iter().collect();
                let ports = match shared.iter().find(|p| p[..] == ports[..]) {
                    Some(same) => same.clone(),
                    None => {
                        let new: Ports = ports.into();
                        shared.push(new.clone());
                        new
                    }
                };
                StoredEndpoint {
                    addr: e.addr,
                    ready: e.ready,
                    zone: e.zone.map(String::into_boxed_str),
                    ports,
                }
            })
            .collect();
        Self {
            registry_name: meta.registry_name,
            domain: meta.domain.0.into_boxed_str(),
            endpoints,
            metadata: (!meta.metadata.is_empty()).then(|| Box::new(meta.metadata)),
        }
    }

    /// The meta this was made from.
    pub(super) fn to_meta(&self) -> MicroSvcMeta {
        MicroSvcMeta {
            registry_name: self.registry_name.clone(),
            domain: MicroSvcDomainName(self.domain.to_string()),
            endpoints: self
                .endpoints
                .iter()
                .map(|e| MicroEndpoint {
                    addr: e.addr,
                    ports: e.ports.iter().cloned().collect(),
                    ready: e.ready,
                    zone: e.zone.as_deref().map(str::to_owned),
                })
                .collect(),
            metadata: self.metadata.as_deref().cloned().unwrap_or_default(),
        }
    }

    pub(super) fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn endpoint(addr: &str, ports: &[(u16, MicroSvcAppProtocol)], ready: bool) -> MicroEndpoint {
        MicroEndpoint {
            addr: addr.parse().expect("test address"),
            ports: ports
                .iter()
                .map(|(p, proto)| (MicroSvcPort::new(*p).expect("port"), proto.clone()))
                .collect(),
            ready,
            zone: None,
        }
    }

    fn orders() -> MicroSvcMeta {
        let web = [
            (8080, MicroSvcAppProtocol::Http),
            (9090, MicroSvcAppProtocol::Grpc),
        ];
        let mut zoned = endpoint("2001:db8::7", &web, true);
        zoned.zone = Some("zone-a".into());
        MicroSvcMeta::new(
            MicroSvcName("Orders_Service.v2".into()),
            MicroSvcDomainName("orders.service.consul".into()),
            vec![
                endpoint("192.0.2.1", &web, true),
                endpoint("192.0.2.2", &web, false),
                endpoint(
                    "192.0.2.3",
                    &[(8081, MicroSvcAppProtocol::new("h2c"))],
                    true,
                ),
                zoned,
            ],
        )
    }

    #[test]
    fn the_round_trip_gives_back_the_same_meta() {
        let plain = orders();
        assert_eq!(StoredMeta::new(plain.clone()).to_meta(), plain);
        let with_metadata = orders().with_metadata(ServiceMetadata {
            labels: BTreeMap::from([("tier".into(), "web".into())]),
            annotations: BTreeMap::from([("owner".into(), "jane".into())]),
        });
        let stored = StoredMeta::new(with_metadata.clone());
        assert_eq!(stored.to_meta(), with_metadata);
        assert_eq!(stored.endpoint_count(), 4);
        assert_eq!(
            StoredMeta::new(MicroSvcMeta::new(
                MicroSvcName("empty".into()),
                MicroSvcDomainName("empty.service.consul".into()),
                Vec::new(),
            ))
            .to_meta()
            .endpoints
            .len(),
            0
        );
    }

    #[test]
    fn instances_with_the_same_ports_share_one_port_list() {
        let stored = StoredMeta::new(orders());
        let lists: Vec<&Ports> = stored.endpoints.iter().map(|e| &e.ports).collect();
        assert_eq!(lists.len(), 4);
        let distinct = lists
            .iter()
            .enumerate()
            .filter(|(i, p)| !lists[..*i].iter().any(|q| Arc::ptr_eq(p, q)))
            .count();
        assert_eq!(distinct, 2, "two port sets among four instances");
        assert!(stored.metadata.is_none(), "no metadata, no maps");
    }

    #[test]
    fn stored_values_are_equal_exactly_when_the_metas_are() {
        let a = orders();
        let mut b = orders();
        assert_eq!(StoredMeta::new(a.clone()), StoredMeta::new(b.clone()));
        b.endpoints[1].ready = true;
        assert_ne!(StoredMeta::new(a.clone()), StoredMeta::new(b));
        let mut c = orders();
        c.endpoints[0].ports.insert(
            MicroSvcPort::new(1).expect("port"),
            MicroSvcAppProtocol::Http,
        );
        assert_ne!(StoredMeta::new(a), StoredMeta::new(c));
    }
}
