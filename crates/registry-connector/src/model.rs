//! The registry-neutral model: what every registry source produces and every renderer reads.
//!
//! The names are the seed's (`MicroSvcName`, `MicroSvcDomainName`, `MicroEndpointAddr`,
//! `MicroSvcPort`, `MicroSvcAppProtocol`, `MicroSvcMeta`), with one change of shape: the
//! seed kept one port map per service, this model keeps ports per endpoint, because the
//! instances of one registry service may listen on different ports and EndpointSlices carry
//! ports per slice. Values are validated when they are built (an address Kubernetes would
//! reject never gets into the model), so the renderers need no error paths. This module
//! knows nothing about Kubernetes objects or about any particular registry.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU16;
use std::str::FromStr;

/// A service's name as the registry spells it (seed: `MicroSvcName`). Not a Kubernetes
/// name: see [`crate::naming::kube_service_name`] for the mapping.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MicroSvcName(pub String);

impl MicroSvcName {
    /// Wraps a registry name as is.
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    /// The registry's spelling.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MicroSvcName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for MicroSvcName {
    fn from(name: &str) -> Self {
        Self::new(name)
    }
}

impl From<String> for MicroSvcName {
    fn from(name: String) -> Self {
        Self(name)
    }
}

/// The DNS name the registry serves the service under, e.g. `orders.service.consul`
/// (seed: `MicroSvcDomainName`). ExternalName Services point at it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MicroSvcDomainName(pub String);

impl MicroSvcDomainName {
    /// Wraps a domain name as is.
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    /// The domain as the source gave it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MicroSvcDomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for MicroSvcDomainName {
    fn from(name: &str) -> Self {
        Self::new(name)
    }
}

impl From<String> for MicroSvcDomainName {
    fn from(name: String) -> Self {
        Self(name)
    }
}

/// Why an address cannot be an endpoint. These are exactly the ranges the apiserver's
/// `ValidateEndpointIP` rejects in Endpoints and EndpointSlices, plus all multicast (a
/// multicast group is never a service instance); catching them here keeps one bad registry
/// instance from failing the write of a whole slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddrErrorReason {
    /// Not parseable as an IPv4 or IPv6 address.
    NotAnIp,
    /// `0.0.0.0` or `::`.
    Unspecified,
    /// `127.0.0.0/8` or `::1`.
    Loopback,
    /// `169.254.0.0/16` or `fe80::/10`.
    LinkLocalUnicast,
    /// `224.0.0.0/24` or `ff02::/16`.
    LinkLocalMulticast,
    /// Any other multicast: `224.0.0.0/4` or `ff00::/8`.
    Multicast,
}

impl AddrErrorReason {
    /// A short metric label value (`loopback`, `not_an_ip`, ...).
    pub fn as_label(self) -> &'static str {
        match self {
            Self::NotAnIp => "not_an_ip",
            Self::Unspecified => "unspecified_address",
            Self::Loopback => "loopback_address",
            Self::LinkLocalUnicast => "link_local_address",
            Self::LinkLocalMulticast => "link_local_multicast_address",
            Self::Multicast => "multicast_address",
        }
    }
}

impl fmt::Display for AddrErrorReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotAnIp => "not an IP address",
            Self::Unspecified => "unspecified address",
            Self::Loopback => "loopback address (127.0.0.0/8, ::1)",
            Self::LinkLocalUnicast => "link-local address (169.254.0.0/16, fe80::/10)",
            Self::LinkLocalMulticast => "link-local multicast address (224.0.0.0/24, ff02::/16)",
            Self::Multicast => "multicast address",
        })
    }
}

/// An address rejected as an endpoint, with the input that was given and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid endpoint address {input:?}: {reason}")]
pub struct AddrError {
    /// The text (or formatted address) that was rejected.
    pub input: String,
    /// Which rule rejected it.
    pub reason: AddrErrorReason,
}

/// An IP address family; EndpointSlices hold one family each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddressFamily {
    /// IPv4.
    Ipv4,
    /// IPv6.
    Ipv6,
}

impl AddressFamily {
    /// The EndpointSlice `addressType` for this family.
    pub fn as_slice_address_type(self) -> &'static str {
        match self {
            Self::Ipv4 => "IPv4",
            Self::Ipv6 => "IPv6",
        }
    }

    /// A short tag for object names (`v4`/`v6`).
    pub fn tag(self) -> &'static str {
        match self {
            Self::Ipv4 => "v4",
            Self::Ipv6 => "v6",
        }
    }
}

/// A validated endpoint address (seed: `MicroEndpointAddr`, which was an unchecked string).
///
/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are normalised to IPv4, so that one
/// instance reported both ways is one endpoint and lands in the IPv4 slice where clients
/// expect it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MicroEndpointAddr(IpAddr);

impl MicroEndpointAddr {
    /// Validates and normalises an address; see [`AddrErrorReason`] for what is refused.
    pub fn new(ip: IpAddr) -> Result<Self, AddrError> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match rejection(ip) {
            None => Ok(Self(ip)),
            Some(reason) => Err(AddrError {
                input: ip.to_string(),
                reason,
            }),
        }
    }

    /// The address.
    pub fn ip(&self) -> IpAddr {
        self.0
    }

    /// The IPv4 address, or `None` for an IPv6 address (as Go's `To4` returns nil).
    pub fn to4(&self) -> Option<Ipv4Addr> {
        match self.0 {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        }
    }

    /// The 16-byte form; IPv4 addresses become IPv4-mapped IPv6 (as Go's `To16`).
    pub fn to16(&self) -> Ipv6Addr {
        match self.0 {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        }
    }

    /// The family, which decides the slice the endpoint goes to.
    pub fn family(&self) -> AddressFamily {
        match self.0 {
            IpAddr::V4(_) => AddressFamily::Ipv4,
            IpAddr::V6(_) => AddressFamily::Ipv6,
        }
    }
}

fn rejection(ip: IpAddr) -> Option<AddrErrorReason> {
    if ip.is_unspecified() {
        return Some(AddrErrorReason::Unspecified);
    }
    if ip.is_loopback() {
        return Some(AddrErrorReason::Loopback);
    }
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            if v4.is_link_local() {
                Some(AddrErrorReason::LinkLocalUnicast)
            } else if (a, b, c) == (224, 0, 0) {
                Some(AddrErrorReason::LinkLocalMulticast)
            } else if v4.is_multicast() {
                Some(AddrErrorReason::Multicast)
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            if first & 0xffc0 == 0xfe80 {
                Some(AddrErrorReason::LinkLocalUnicast)
            } else if first & 0xff0f == 0xff02 {
                // Go's IsLinkLocalMulticast: ff02::/16 with any flags nibble.
                Some(AddrErrorReason::LinkLocalMulticast)
            } else if v6.is_multicast() {
                Some(AddrErrorReason::Multicast)
            } else {
                None
            }
        }
    }
}

impl FromStr for MicroEndpointAddr {
    type Err = AddrError;

    /// Parses an address as registries write it: surrounding whitespace and, for IPv6,
    /// surrounding brackets are accepted. Zone suffixes (`%eth0`) are not: they only make
    /// sense on link-local addresses, which are refused anyway.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let trimmed = input.trim();
        let bare = trimmed
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .unwrap_or(trimmed);
        let ip: IpAddr = bare.parse().map_err(|_| AddrError {
            input: input.to_owned(),
            reason: AddrErrorReason::NotAnIp,
        })?;
        Self::new(ip).map_err(|e| AddrError {
            input: input.to_owned(),
            reason: e.reason,
        })
    }
}

impl TryFrom<IpAddr> for MicroEndpointAddr {
    type Error = AddrError;

    fn try_from(ip: IpAddr) -> Result<Self, Self::Error> {
        Self::new(ip)
    }
}

impl fmt::Display for MicroEndpointAddr {
    /// The canonical text form (RFC 5952 for IPv6), which is what the apiserver stores.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A port number that cannot be zero (seed: `MicroSvcPort`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MicroSvcPort(NonZeroU16);

/// A port a registry reported that no Kubernetes object can carry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// Port 0 means "any port" to sockets and is invalid in Services and EndpointSlices.
    #[error("port 0 is not a valid service port")]
    Zero,
    /// The text was not a decimal number in 1..=65535.
    #[error("invalid port {input:?}: expected a number in 1..=65535")]
    Invalid {
        /// The rejected text.
        input: String,
    },
}

impl MicroSvcPort {
    /// Refuses port 0.
    pub fn new(port: u16) -> Result<Self, PortError> {
        NonZeroU16::new(port).map(Self).ok_or(PortError::Zero)
    }

    /// The port number.
    pub fn get(self) -> u16 {
        self.0.get()
    }
}

impl From<NonZeroU16> for MicroSvcPort {
    fn from(port: NonZeroU16) -> Self {
        Self(port)
    }
}

impl FromStr for MicroSvcPort {
    type Err = PortError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let port: u16 = input.trim().parse().map_err(|_| PortError::Invalid {
            input: input.to_owned(),
        })?;
        Self::new(port)
    }
}

impl fmt::Display for MicroSvcPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The application protocol spoken on a port (seed: `MicroSvcAppProtocol`).
///
/// The derived order (`Http` < `Grpc` < `Other` alphabetically) is the documented tie-break
/// when instances of one service disagree about a port's protocol; see
/// [`MicroSvcMeta::ports`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MicroSvcAppProtocol {
    /// `http`.
    Http,
    /// `grpc`.
    Grpc,
    /// Any other protocol name, trimmed and lowercased.
    Other(String),
}

impl MicroSvcAppProtocol {
    /// Recognises `http` and `grpc` in any case. Other names are trimmed and lowercased
    /// (protocol names are case-insensitive, and two instances writing `H2C` and `h2c` must
    /// not be treated as a conflict).
    pub fn new(name: &str) -> Self {
        let name = name.trim().to_ascii_lowercase();
        match name.as_str() {
            "http" => Self::Http,
            "grpc" => Self::Grpc,
            _ => Self::Other(name),
        }
    }

    /// The protocol name.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Http => "http",
            Self::Grpc => "grpc",
            Self::Other(name) => name,
        }
    }
}

impl FromStr for MicroSvcAppProtocol {
    type Err = Infallible;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(name))
    }
}

impl From<&str> for MicroSvcAppProtocol {
    fn from(name: &str) -> Self {
        Self::new(name)
    }
}

impl fmt::Display for MicroSvcAppProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One registry instance: where it is, what it listens on, and whether it is healthy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MicroEndpoint {
    /// The instance's address.
    pub addr: MicroEndpointAddr,
    /// The ports this instance listens on, with their protocols.
    pub ports: BTreeMap<MicroSvcPort, MicroSvcAppProtocol>,
    /// Registry health; becomes the endpoint's `ready` (and `serving`) condition.
    pub ready: bool,
    /// Topology zone, where the registry knows it.
    pub zone: Option<String>,
}

impl MicroEndpoint {
    /// The port numbers, without protocols: the key EndpointSlices are grouped by (together
    /// with the address family).
    pub fn port_set(&self) -> BTreeSet<MicroSvcPort> {
        self.ports.keys().copied().collect()
    }
}

/// Labels and annotations a registry service asks for on its Service: registry metadata
/// that passed the operator's allow-list (`--metadata-labels`, `--metadata-annotations`),
/// already validated by the source (see [`crate::registry::metadata`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceMetadata {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

impl ServiceMetadata {
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.annotations.is_empty()
    }
}

/// Everything the renderers need to know about one registry service (seed: `MicroSvcMeta`).
///
/// Build it with [`MicroSvcMeta::new`], which normalises the endpoint list; the fields are
/// public for reading and for tests, and every renderer in this crate tolerates an
/// unnormalised list (it regroups and sorts on its own), but equality of two metas is only
/// meaningful between normalised values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MicroSvcMeta {
    /// The name in the registry (kept in the Service's inherited-from annotation).
    pub registry_name: MicroSvcName,
    /// The registry's DNS name for the service (the ExternalName target).
    pub domain: MicroSvcDomainName,
    /// The instances, sorted, one per (address, port set).
    pub endpoints: Vec<MicroEndpoint>,
    /// Registry metadata to copy onto the Service (empty unless allow-listed).
    pub metadata: ServiceMetadata,
}

impl MicroSvcMeta {
    /// Sorts the endpoints and merges duplicates. Two endpoints are duplicates when they
    /// have the same address and the same port numbers (a registry may list one instance
    /// twice, e.g. once per health check); the ready one wins, so that an instance is
    /// served if any report says it is healthy, and among equally ready ones the smallest
    /// (by the derived order) wins, so the result does not depend on input order.
    pub fn new(
        registry_name: MicroSvcName,
        domain: MicroSvcDomainName,
        endpoints: Vec<MicroEndpoint>,
    ) -> Self {
        Self {
            registry_name,
            domain,
            endpoints: normalize_endpoints(endpoints),
            metadata: ServiceMetadata::default(),
        }
    }

    /// The same service with `metadata` for its Service.
    pub fn with_metadata(mut self, metadata: ServiceMetadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// The ports the Service exposes: the union of the endpoints' ports. When instances
    /// disagree about one port's protocol, the smallest protocol in [`MicroSvcAppProtocol`]'s
    /// order wins (`http`, then `grpc`, then other names alphabetically), so the choice is
    /// deterministic and the same everywhere the port is rendered.
    pub fn ports(&self) -> BTreeMap<MicroSvcPort, MicroSvcAppProtocol> {
        let mut ports: BTreeMap<MicroSvcPort, MicroSvcAppProtocol> = BTreeMap::new();
        for (port, protocol) in self.endpoints.iter().flat_map(|e| e.ports.iter()) {
            match ports.get(port) {
                Some(existing) if existing <= protocol => {}
                _ => {
                    ports.insert(*port, protocol.clone());
                }
            }
        }
        ports
    }
}

/// Sorts endpoints and merges duplicates as [`MicroSvcMeta::new`] documents. Public so the
/// renderers can apply the same rule to a meta built by hand.
pub fn normalize_endpoints(
    endpoints: impl IntoIterator<Item = MicroEndpoint>,
) -> Vec<MicroEndpoint> {
    let mut all: Vec<(BTreeSet<MicroSvcPort>, MicroEndpoint)> =
        endpoints.into_iter().map(|e| (e.port_set(), e)).collect();
    // Within one (addr, port set), ready first, then the derived order.
    all.sort_by(|(ports_a, a), (ports_b, b)| {
        a.addr
            .cmp(&b.addr)
            .then_with(|| ports_a.cmp(ports_b))
            .then_with(|| b.ready.cmp(&a.ready))
            .then_with(|| a.cmp(b))
    });
    all.dedup_by(|(ports_later, later), (ports_kept, kept)| {
        later.addr == kept.addr && ports_later == ports_kept
    });
    let mut merged: Vec<MicroEndpoint> = all.into_iter().map(|(_, e)| e).collect();
    merged.sort_by(Ord::cmp);
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> MicroEndpointAddr {
        s.parse().expect("valid test address")
    }

    fn port(p: u16) -> MicroSvcPort {
        MicroSvcPort::new(p).expect("non-zero test port")
    }

    fn ep(a: &str, ports: &[(u16, &str)], ready: bool) -> MicroEndpoint {
        MicroEndpoint {
            addr: addr(a),
            ports: ports
                .iter()
                .map(|(p, proto)| (port(*p), MicroSvcAppProtocol::new(proto)))
                .collect(),
            ready,
            zone: None,
        }
    }

    fn reason(input: &str) -> AddrErrorReason {
        input
            .parse::<MicroEndpointAddr>()
            .expect_err("address should be rejected")
            .reason
    }

    #[test]
    fn parses_ipv4_and_ipv6() {
        let v4 = addr("10.1.2.3");
        assert_eq!(v4.family(), AddressFamily::Ipv4);
        assert_eq!(v4.to4(), Some(Ipv4Addr::new(10, 1, 2, 3)));
        assert_eq!(v4.to16(), "::ffff:10.1.2.3".parse::<Ipv6Addr>().unwrap());
        assert_eq!(v4.to_string(), "10.1.2.3");

        let v6 = addr("2001:DB8:0:0::1");
        assert_eq!(v6.family(), AddressFamily::Ipv6);
        assert_eq!(v6.to4(), None);
        assert_eq!(v6.to16(), "2001:db8::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(v6.to_string(), "2001:db8::1", "canonical form");
    }

    #[test]
    fn accepts_whitespace_and_brackets() {
        assert_eq!(addr(" 10.0.0.1\n"), addr("10.0.0.1"));
        assert_eq!(addr("[2001:db8::1]"), addr("2001:db8::1"));
    }

    #[test]
    fn ipv4_mapped_ipv6_becomes_ipv4() {
        let mapped = addr("::ffff:192.0.2.7");
        assert_eq!(mapped, addr("192.0.2.7"));
        assert_eq!(mapped.family(), AddressFamily::Ipv4);
        assert_eq!(mapped.to_string(), "192.0.2.7");
        let via_new = MicroEndpointAddr::new("::ffff:192.0.2.7".parse().unwrap()).unwrap();
        assert_eq!(via_new, mapped);
        // The mapped loopback is still loopback.
        assert_eq!(reason("::ffff:127.0.0.1"), AddrErrorReason::Loopback);
    }

    #[test]
    fn rejects_what_kubernetes_rejects() {
        assert_eq!(reason("not-an-ip"), AddrErrorReason::NotAnIp);
        assert_eq!(reason(""), AddrErrorReason::NotAnIp);
        assert_eq!(reason("10.0.0.1:8080"), AddrErrorReason::NotAnIp);
        assert_eq!(reason("fe80::1%eth0"), AddrErrorReason::NotAnIp);
        assert_eq!(reason("0.0.0.0"), AddrErrorReason::Unspecified);
        assert_eq!(reason("::"), AddrErrorReason::Unspecified);
        assert_eq!(reason("127.0.0.1"), AddrErrorReason::Loopback);
        assert_eq!(reason("127.255.0.9"), AddrErrorReason::Loopback);
        assert_eq!(reason("::1"), AddrErrorReason::Loopback);
        assert_eq!(reason("169.254.169.254"), AddrErrorReason::LinkLocalUnicast);
        assert_eq!(reason("fe80::1"), AddrErrorReason::LinkLocalUnicast);
        assert_eq!(reason("febf::1"), AddrErrorReason::LinkLocalUnicast);
        assert_eq!(reason("224.0.0.251"), AddrErrorReason::LinkLocalMulticast);
        assert_eq!(reason("ff02::fb"), AddrErrorReason::LinkLocalMulticast);
        assert_eq!(reason("ff12::1"), AddrErrorReason::LinkLocalMulticast);
        assert_eq!(reason("239.1.1.1"), AddrErrorReason::Multicast);
        assert_eq!(reason("224.0.1.1"), AddrErrorReason::Multicast);
        assert_eq!(reason("ff05::2"), AddrErrorReason::Multicast);
    }

    #[test]
    fn accepts_boundaries_of_rejected_ranges() {
        for ok in [
            "126.255.255.255",
            "128.0.0.1",
            "169.253.255.255",
            "169.255.0.1",
            "223.255.255.255",
            "240.0.0.1",
            "fec0::1",
            "fe7f::1",
            "::2",
            "100.64.0.1",
            "192.168.1.1",
        ] {
            assert!(
                ok.parse::<MicroEndpointAddr>().is_ok(),
                "{ok} should be accepted"
            );
        }
    }

    #[test]
    fn addr_error_names_input_and_reason() {
        let err = "127.0.0.1".parse::<MicroEndpointAddr>().unwrap_err();
        assert_eq!(err.input, "127.0.0.1");
        let text = err.to_string();
        assert!(text.contains("\"127.0.0.1\""), "{text}");
        assert!(text.contains("loopback"), "{text}");
    }

    #[test]
    fn address_family_strings() {
        assert_eq!(AddressFamily::Ipv4.as_slice_address_type(), "IPv4");
        assert_eq!(AddressFamily::Ipv6.as_slice_address_type(), "IPv6");
        assert_eq!(AddressFamily::Ipv4.tag(), "v4");
        assert_eq!(AddressFamily::Ipv6.tag(), "v6");
    }

    #[test]
    fn ports() {
        assert_eq!(MicroSvcPort::new(0), Err(PortError::Zero));
        assert_eq!(MicroSvcPort::new(8080).unwrap().get(), 8080);
        assert_eq!("65535".parse::<MicroSvcPort>().unwrap().get(), 65535);
        assert_eq!(" 80 ".parse::<MicroSvcPort>().unwrap().to_string(), "80");
        assert_eq!("0".parse::<MicroSvcPort>(), Err(PortError::Zero));
        assert!(matches!(
            "65536".parse::<MicroSvcPort>(),
            Err(PortError::Invalid { .. })
        ));
        assert!(matches!(
            "http".parse::<MicroSvcPort>(),
            Err(PortError::Invalid { .. })
        ));
        assert!(matches!(
            "-1".parse::<MicroSvcPort>(),
            Err(PortError::Invalid { .. })
        ));
    }

    #[test]
    fn app_protocols() {
        assert_eq!(MicroSvcAppProtocol::new("HTTP"), MicroSvcAppProtocol::Http);
        assert_eq!(MicroSvcAppProtocol::new("http"), MicroSvcAppProtocol::Http);
        assert_eq!(MicroSvcAppProtocol::new("gRPC"), MicroSvcAppProtocol::Grpc);
        assert_eq!(
            MicroSvcAppProtocol::new(" H2C "),
            MicroSvcAppProtocol::Other("h2c".into())
        );
        assert_eq!(
            "grpc".parse::<MicroSvcAppProtocol>(),
            Ok(MicroSvcAppProtocol::Grpc)
        );
        assert_eq!(MicroSvcAppProtocol::Http.as_str(), "http");
        assert_eq!(MicroSvcAppProtocol::Grpc.as_str(), "grpc");
        assert_eq!(MicroSvcAppProtocol::new("Thrift").as_str(), "thrift");
        assert_eq!(MicroSvcAppProtocol::Grpc.to_string(), "grpc");
    }

    #[test]
    fn protocol_order_is_http_grpc_others() {
        let mut all = [
            MicroSvcAppProtocol::new("zmq"),
            MicroSvcAppProtocol::Grpc,
            MicroSvcAppProtocol::new("amqp"),
            MicroSvcAppProtocol::Http,
        ];
        all.sort();
        let names: Vec<&str> = all.iter().map(MicroSvcAppProtocol::as_str).collect();
        assert_eq!(names, ["http", "grpc", "amqp", "zmq"]);
    }

    #[test]
    fn meta_sorts_endpoints() {
        let meta = MicroSvcMeta::new(
            "orders".into(),
            "orders.service.consul".into(),
            vec![
                ep("10.0.0.3", &[(80, "http")], true),
                ep("2001:db8::1", &[(80, "http")], true),
                ep("10.0.0.1", &[(80, "http")], false),
            ],
        );
        let addrs: Vec<String> = meta.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.1", "10.0.0.3", "2001:db8::1"]);
        assert_eq!(meta.registry_name.as_str(), "orders");
        assert_eq!(meta.domain.as_str(), "orders.service.consul");
    }

    #[test]
    fn meta_dedups_keeping_ready() {
        let meta = MicroSvcMeta::new(
            "a".into(),
            "a.service.consul".into(),
            vec![
                ep("10.0.0.1", &[(80, "http")], false),
                ep("10.0.0.1", &[(80, "http")], true),
                ep("10.0.0.1", &[(80, "http")], false),
            ],
        );
        assert_eq!(meta.endpoints, vec![ep("10.0.0.1", &[(80, "http")], true)]);
    }

    #[test]
    fn meta_dedup_ignores_input_order() {
        let mut with_zone = ep("10.0.0.1", &[(80, "http")], true);
        with_zone.zone = Some("z1".into());
        let plain = ep("10.0.0.1", &[(80, "http")], true);
        let a = MicroSvcMeta::new(
            "a".into(),
            "d".into(),
            vec![with_zone.clone(), plain.clone()],
        );
        let b = MicroSvcMeta::new("a".into(), "d".into(), vec![plain.clone(), with_zone]);
        assert_eq!(a, b);
        assert_eq!(a.endpoints, vec![plain], "the smallest (no zone) wins");
    }

    #[test]
    fn meta_keeps_same_addr_with_different_ports() {
        let meta = MicroSvcMeta::new(
            "a".into(),
            "d".into(),
            vec![
                ep("10.0.0.1", &[(80, "http")], true),
                ep("10.0.0.1", &[(81, "http")], true),
                ep("10.0.0.1", &[(80, "http"), (81, "http")], true),
            ],
        );
        assert_eq!(meta.endpoints.len(), 3);
    }

    #[test]
    fn meta_merges_same_ports_with_different_protocols() {
        let meta = MicroSvcMeta::new(
            "a".into(),
            "d".into(),
            vec![
                ep("10.0.0.1", &[(80, "grpc")], false),
                ep("10.0.0.1", &[(80, "http")], true),
            ],
        );
        assert_eq!(meta.endpoints, vec![ep("10.0.0.1", &[(80, "http")], true)]);
    }

    #[test]
    fn meta_ports_union_with_deterministic_conflicts() {
        let meta = MicroSvcMeta::new(
            "a".into(),
            "d".into(),
            vec![
                ep("10.0.0.1", &[(80, "grpc"), (9000, "zmq")], true),
                ep("10.0.0.2", &[(80, "http"), (9000, "amqp")], true),
                ep("10.0.0.3", &[(9090, "grpc")], false),
            ],
        );
        let ports = meta.ports();
        let ports: Vec<(u16, &str)> = ports
            .iter()
            .map(|(p, proto)| (p.get(), proto.as_str()))
            .collect();
        assert_eq!(ports, [(80, "http"), (9000, "amqp"), (9090, "grpc")]);
    }

    #[test]
    fn meta_without_endpoints_has_no_ports() {
        let meta = MicroSvcMeta::new("a".into(), "d".into(), Vec::new());
        assert!(meta.ports().is_empty());
        assert!(meta.endpoints.is_empty());
    }

    #[test]
    fn port_set_drops_protocols() {
        let e = ep("10.0.0.1", &[(80, "http"), (9090, "grpc")], true);
        assert_eq!(e.port_set(), BTreeSet::from([port(80), port(9090)]));
    }
}
