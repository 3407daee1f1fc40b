//! Which ZooKeeper nodes are published, under which name, with which ports, readiness
//! and annotations. Pure functions: a node (its directory, its name, its data) becomes an
//! [`Entry`] when it is read; the entries of one service become a [`MicroSvcMeta`].
//!
//! The rules, **Dubbo** layout (`<base>/<interface>/providers/<URL>`):
//! - a provider takes part unless it is disabled (`enabled=false`, or `disabled=true`,
//!   which wins when both are given, as in Dubbo's own registry directory), is not a
//!   provider (`side` other than `provider`, a `category` other than `providers`, the
//!   `empty` protocol), was registered from Kubernetes (`external-source=kubernetes`),
//!   or lacks a `--filter-metadata` pair among its URL parameters;
//! - by default (`--dubbo-service-by interface`) its service is its interface
//!   (`com.example.OrderService` → `com-example-orderservice`), whatever its version and
//!   group: the versions and groups of the providers are listed in annotations. With
//!   `--dubbo-service-by service-key` its service is Dubbo's service key,
//!   `group/interface:version` without the empty parts
//!   (`blue/com.example.OrderService:1.0.0` → `blue-com-example-orderservice-1-0-0`),
//!   for clients that must not reach a provider of another version or group. With
//!   `--dubbo-service-by application` its service is its `application` (a provider
//!   without one is left out and reported);
//! - the endpoint is the URL's host and port, the port named by the URL's protocol
//!   (`dubbo`, `tri`, `rest`...: the port's name and `appProtocol`); a provider with
//!   `weight=0` (or below) is not ready: left out with `passing_only`, else published not
//!   ready;
//! - annotations: the interface, versions and groups (interface and service-key modes),
//!   the applications of the providers (each comma-separated, sorted); the URL parameters are the metadata
//!   the allow-lists copy (`--metadata-annotations methods`, say).
//!
//! **Curator** layout (`<base>/<name>/<id>`, a JSON instance):
//! - an instance takes part unless `enabled` is false, it came from Kubernetes or lacks
//!   a filter pair, both looked up in its `payload.metadata`;
//! - its service is the directory's name;
//! - the address must be an IP: Spring Cloud Zookeeper registers the host name unless
//!   told to prefer the IP, and a host name is left out with the shared "not an IP"
//!   reason (an EndpointSlice holds addresses only);
//! - ports: Dubbo 3's `dubbo.endpoints` metadata when present (each protocol and port),
//!   else `port` as `http` and `sslPort` as `https`; neither is a skip;
//! - ready unless Spring's `instance_status` metadata says other than `UP`.
//!
//! Both: the service is published while one entry takes part, even when none is ready
//! or every one has a bad address (a failing service empties its endpoints instead of
//! losing its Service); two entries at one address and port set are one endpoint, ready
//! if either is ([`MicroSvcMeta::new`]).

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{
    MicroEndpoint, MicroEndpointAddr, MicroSvcAppProtocol, MicroSvcDomainName, MicroSvcMeta,
    MicroSvcName, MicroSvcPort,
};
use crate::naming::kube_service_name;
use crate::registry::metadata::{
    compact_metadata, is_from_kubernetes, matches_filter, CompactMetadata, MetadataAllowList,
    MetadataIssue,
};
use crate::registry::SkipReason;

use super::api::{self, DubboUrl, InstanceError, UrlError};
use super::config::{DubboServiceBy, Layout};

/// The prefix of this source's annotations.
const PREFIX: &str = "zookeeper.connector.flomesh.io/";
/// The Dubbo interface of a service (interface mode).
pub const INTERFACE_ANNOTATION: &str = "zookeeper.connector.flomesh.io/interface";
/// The Dubbo version, when the providers have one (interface mode).
pub const VERSION_ANNOTATION: &str = "zookeeper.connector.flomesh.io/version";
/// The Dubbo group, when the providers have one (interface mode).
pub const GROUP_ANNOTATION: &str = "zookeeper.connector.flomesh.io/group";
/// The Dubbo applications of the providers, comma-separated and sorted.
pub const APPLICATION_ANNOTATION: &str = "zookeeper.connector.flomesh.io/application";
/// The Curator service name, as registered (without the prefix).
pub const SERVICE_ANNOTATION: &str = "zookeeper.connector.flomesh.io/service";

/// Why a node was left out (reported, once while it lasts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// What every source shares: no or a bad address (a host name), port.
    Shared(SkipReason),
    /// A Dubbo provider node whose name is not a URL.
    Url(UrlError),
    /// A Curator node whose data is not an instance.
    Instance(InstanceError),
    /// `--dubbo-service-by application` and the provider names no application.
    NoApplication,
}

impl Skip {
    /// The `reason` label of `registry_rejected_entries_total`.
    pub fn as_label(&self) -> &'static str {
        match self {
            Self::Shared(reason) => reason.as_label(),
            Self::Url(_) => "invalid_url",
            Self::Instance(_) => "invalid_instance",
            Self::NoApplication => "no_application",
        }
    }
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Shared(reason) => reason.fmt(f),
            Self::Url(e) => write!(f, "not a Dubbo provider URL: {e}"),
            Self::Instance(e) => e.fmt(f),
            Self::NoApplication => f.write_str("no application parameter"),
        }
    }
}

/// A node that takes part in a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The service it belongs to (before the prefix): a Dubbo service key, an
    /// application, a Curator name.
    pub service: Box<str>,
    /// Its endpoint, or why it has none (then it still keeps its service published).
    pub endpoint: Result<MicroEndpoint, SkipReason>,
    /// Its allow-listed metadata (the rest is not kept).
    pub metadata: CompactMetadata,
    /// Annotation values it contributes, by key.
    pub facts: Vec<(&'static str, Box<str>)>,
}

/// What one node is to the source, decided when it is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Member(Member),
    /// Left out on purpose (a consumer, disabled, from Kubernetes, filtered): silent.
    Ignored,
    /// Left out for bad data: reported.
    Skipped(Skip),
}

impl Entry {
    /// The service this entry belongs to, if it takes part.
    pub fn service(&self) -> Option<&str> {
        match self {
            Self::Member(m) => Some(&m.service),
            _ => None,
        }
    }

    /// Why it is left out or has no endpoint, if it is (to report).
    pub fn problem(&self) -> Option<Skip> {
        match self {
            Self::Member(Member {
                endpoint: Err(reason),
                ..
            }) => Some(Skip::Shared(reason.clone())),
            Self::Skipped(skip) => Some(skip.clone()),
            _ => None,
        }
    }
}

/// The selection rules of the ZooKeeper source.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub layout: Layout,
    pub dubbo_service_by: DubboServiceBy,
    pub filter_metadata: Vec<(String, String)>,
    pub passing_only: bool,
    pub service_prefix: String,
    pub metadata: MetadataAllowList,
}

/// What one service publishes.
#[derive(Debug, Clone, Default)]
pub struct Built {
    /// `None` when no entry takes part.
    pub service: Option<MicroSvcMeta>,
    pub metadata_issues: Vec<MetadataIssue>,
}

impl Selection {
    /// The registry name `service` is published under.
    pub fn published_name(&self, service: &str) -> MicroSvcName {
        MicroSvcName(format!("{}{service}", self.service_prefix))
    }

    fn takes_part(&self, metadata: &BTreeMap<String, String>) -> bool {
        !is_from_kubernetes(metadata) && matches_filter(metadata, &self.filter_metadata)
    }

    fn kept_metadata(&self, metadata: BTreeMap<String, String>) -> CompactMetadata {
        if self.metadata.is_empty() {
            return CompactMetadata::new();
        }
        compact_metadata(metadata.into_iter().filter(|(k, _)| self.metadata.wants(k)))
    }

    /// The entry of a Dubbo provider node `node` (its encoded name) in the directory of
    /// `interface_dir`.
    pub fn dubbo_entry(&self, interface_dir: &str, node: &str) -> Entry {
        let url = match api::parse_dubbo_url(node) {
            Ok(url) => url,
            Err(e) => return Entry::Skipped(Skip::Url(e)),
        };
        if !is_provider(&url) || !self.takes_part(&url.params) {
            return Entry::Ignored;
        }
        let interface = url
            .interface()
            .map(str::to_string)
            .or_else(|| api::decode_component(interface_dir).ok())
            .unwrap_or_else(|| interface_dir.to_string());
        let version = url.param("version").unwrap_or("").to_string();
        let group = url.param("group").unwrap_or("").to_string();
        let application = url.param("application").map(str::to_string);
        let (service, mut facts): (String, Vec<(&'static str, Box<str>)>) =
            match self.dubbo_service_by {
                DubboServiceBy::Interface | DubboServiceBy::ServiceKey => {
                    let mut facts = vec![(INTERFACE_ANNOTATION, interface.as_str().into())];
                    if !version.is_empty() {
                        facts.push((VERSION_ANNOTATION, version.as_str().into()));
                    }
                    if !group.is_empty() {
                        facts.push((GROUP_ANNOTATION, group.as_str().into()));
                    }
                    let service = if self.dubbo_service_by == DubboServiceBy::ServiceKey {
                        service_key(&interface, &version, &group)
                    } else {
                        interface
                    };
                    (service, facts)
                }
                DubboServiceBy::Application => match &application {
                    Some(app) => (app.clone(), Vec::new()),
                    None => return Entry::Skipped(Skip::NoApplication),
                },
            };
        if let Some(app) = application {
            facts.push((APPLICATION_ANNOTATION, app.into()));
        }
        let endpoint = dubbo_endpoint(&url);
        Entry::Member(Member {
            service: service.into(),
            endpoint,
            metadata: self.kept_metadata(url.params),
            facts,
        })
    }

    /// The entry of a Curator instance node of the service `name`, from its data.
    pub fn curator_entry(&self, name: &str, data: &[u8]) -> Entry {
        let instance = match api::parse_curator_instance(data) {
            Ok(i) => i,
            Err(e) => return Entry::Skipped(Skip::Instance(e)),
        };
        let metadata = instance.metadata();
        if instance.enabled == Some(false) || !self.takes_part(&metadata) {
            return Entry::Ignored;
        }
        let endpoint = curator_endpoint(&instance, &metadata);
        Entry::Member(Member {
            service: name.into(),
            endpoint,
            facts: vec![(SERVICE_ANNOTATION, name.into())],
            metadata: self.kept_metadata(metadata),
        })
    }

    /// What `service` publishes from the entries that belong to it.
    pub fn build<'a>(&self, service: &str, members: impl IntoIterator<Item = &'a Member>) -> Built {
        let members: Vec<&Member> = members.into_iter().collect();
        if members.is_empty() {
            return Built::default();
        }
        let endpoints: Vec<MicroEndpoint> = members
            .iter()
            .filter_map(|m| m.endpoint.as_ref().ok())
            .filter(|e| e.ready || !self.passing_only)
            .cloned()
            .collect();
        let (mut metadata, metadata_issues) =
            self.metadata.apply(members.iter().map(|m| &m.metadata));
        let mut facts: BTreeMap<&'static str, BTreeSet<&str>> = BTreeMap::new();
        for (key, value) in members.iter().flat_map(|m| m.facts.iter()) {
            facts.entry(key).or_default().insert(value);
        }
        for (key, values) in facts {
            debug_assert!(key.starts_with(PREFIX));
            let values: Vec<&str> = values.into_iter().collect();
            metadata
                .annotations
                .insert(key.to_string(), values.join(","));
        }
        let name = self.published_name(service);
        let domain = MicroSvcDomainName(kube_service_name(name.as_str()));
        Built {
            service: Some(MicroSvcMeta::new(name, domain, endpoints).with_metadata(metadata)),
            metadata_issues,
        }
    }
}

/// Dubbo's service key: `group/interface:version`, without the empty parts.
pub fn service_key(interface: &str, version: &str, group: &str) -> String {
    let mut key = String::with_capacity(interface.len() + version.len() + group.len() + 2);
    if !group.is_empty() {
        key.push_str(group);
        key.push('/');
    }
    key.push_str(interface);
    if !version.is_empty() {
        key.push(':');
        key.push_str(version);
    }
    key
}

fn is_provider(url: &DubboUrl) -> bool {
    let disabled = match url.param("disabled") {
        Some(d) => d.eq_ignore_ascii_case("true"),
        None => url
            .param("enabled")
            .is_some_and(|e| e.eq_ignore_ascii_case("false")),
    };
    !disabled
        && url.protocol != "empty"
        && url.param("side").is_none_or(|s| s == "provider")
        && url.param("category").is_none_or(|c| c == api::PROVIDERS)
}

fn address(host: Option<&str>) -> Result<MicroEndpointAddr, SkipReason> {
    let host = host
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .ok_or(SkipReason::NoAddress)?;
    Ok(host.parse::<MicroEndpointAddr>()?)
}

fn port(number: i64) -> Result<MicroSvcPort, SkipReason> {
    u16::try_from(number)
        .ok()
        .and_then(|p| MicroSvcPort::new(p).ok())
        .ok_or(SkipReason::Port(number))
}

fn dubbo_endpoint(url: &DubboUrl) -> Result<MicroEndpoint, SkipReason> {
    let addr = address(Some(&url.host))?;
    let port = port(i64::from(url.port.ok_or(SkipReason::NoPort)?))?;
    // Dubbo's weight is an integer (default 100); a value that is no number is not
    // Dubbo's, and does not make a provider unready.
    let ready = url
        .param("weight")
        .and_then(|w| w.parse::<f64>().ok())
        .is_none_or(|w| w > 0.0);
    Ok(MicroEndpoint {
        addr,
        ports: BTreeMap::from([(port, MicroSvcAppProtocol::new(&url.protocol))]),
        ready,
        zone: None,
    })
}

fn curator_endpoint(
    instance: &api::CuratorInstance,
    metadata: &BTreeMap<String, String>,
) -> Result<MicroEndpoint, SkipReason> {
    let addr = address(instance.address.as_deref())?;
    let mut ports = BTreeMap::new();
    match api::dubbo_endpoints(metadata) {
        Some(list) => {
            for (number, protocol) in list {
                ports.insert(port(number)?, MicroSvcAppProtocol::new(&protocol));
            }
        }
        None => {
            if let Some(number) = instance.port {
                ports.insert(port(number)?, MicroSvcAppProtocol::Http);
            }
            if let Some(number) = instance.ssl_port {
                ports.insert(port(number)?, MicroSvcAppProtocol::new("https"));
            }
        }
    }
    if ports.is_empty() {
        return Err(SkipReason::NoPort);
    }
    let ready = metadata
        .get("instance_status")
        .is_none_or(|s| s.trim().eq_ignore_ascii_case("up"));
    Ok(MicroEndpoint {
        addr,
        ports,
        ready,
        zone: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AddrErrorReason;

    fn encode(url: &str) -> String {
        percent_encoding::utf8_percent_encode(url, percent_encoding::NON_ALPHANUMERIC).to_string()
    }

    fn provider(host_port: &str, iface: &str, params: &str) -> String {
        encode(&format!(
            "dubbo://{host_port}/{iface}?application=shop&interface={iface}&side=provider&{params}"
        ))
    }

    fn sel() -> Selection {
        Selection {
            passing_only: true,
            ..Selection::default()
        }
    }

    fn member(entry: Entry) -> Member {
        match entry {
            Entry::Member(m) => m,
            other => panic!("not a member: {other:?}"),
        }
    }

    fn built(s: &Selection, entries: &[Entry]) -> MicroSvcMeta {
        let members: Vec<&Member> = entries
            .iter()
            .filter_map(|e| match e {
                Entry::Member(m) => Some(m),
                _ => None,
            })
            .collect();
        let service = members[0].service.clone();
        s.build(&service, members).service.expect("published")
    }

    fn addresses(meta: &MicroSvcMeta) -> Vec<(String, bool)> {
        meta.endpoints
            .iter()
            .map(|e| (e.addr.to_string(), e.ready))
            .collect()
    }

    fn annotation<'a>(meta: &'a MicroSvcMeta, key: &str) -> Option<&'a str> {
        meta.metadata.annotations.get(key).map(String::as_str)
    }

    #[test]
    fn by_default_one_service_per_interface_lists_its_versions_and_groups() {
        let s = sel();
        let iface = "com.example.OrderService";
        let entries = [
            s.dubbo_entry(iface, &provider("192.0.2.1:20880", iface, "")),
            s.dubbo_entry(iface, &provider("192.0.2.2:20880", iface, "version=1.0.0")),
            s.dubbo_entry(
                iface,
                &provider("192.0.2.3:20880", iface, "version=2.0.0&group=blue"),
            ),
            // One process exporting two versions at one address: one endpoint.
            s.dubbo_entry(iface, &provider("192.0.2.2:20880", iface, "version=2.0.0")),
        ];
        for e in &entries {
            let Entry::Member(m) = e else {
                panic!("not a member: {e:?}")
            };
            assert_eq!(&*m.service, iface, "every version and group: one service");
        }
        let meta = built(&s, &entries);
        assert_eq!(meta.domain.as_str(), "com-example-orderservice");
        assert_eq!(
            addresses(&meta),
            [
                ("192.0.2.1".to_string(), true),
                ("192.0.2.2".to_string(), true),
                ("192.0.2.3".to_string(), true)
            ]
        );
        assert_eq!(annotation(&meta, INTERFACE_ANNOTATION), Some(iface));
        assert_eq!(annotation(&meta, VERSION_ANNOTATION), Some("1.0.0,2.0.0"));
        assert_eq!(annotation(&meta, GROUP_ANNOTATION), Some("blue"));
        assert_eq!(annotation(&meta, APPLICATION_ANNOTATION), Some("shop"));
        let ports: Vec<String> = meta
            .ports()
            .iter()
            .map(|(p, proto)| format!("{proto}/{p}"))
            .collect();
        assert_eq!(ports, ["dubbo/20880"]);
    }

    #[test]
    fn by_service_key_each_version_and_group_is_a_service_of_its_own() {
        let s = Selection {
            dubbo_service_by: DubboServiceBy::ServiceKey,
            ..sel()
        };
        let iface = "com.example.OrderService";
        let plain = member(s.dubbo_entry(iface, &provider("192.0.2.1:20880", iface, "")));
        assert_eq!(&*plain.service, "com.example.OrderService");
        let v1 = member(s.dubbo_entry(iface, &provider("192.0.2.2:20880", iface, "version=1.0.0")));
        assert_eq!(&*v1.service, "com.example.OrderService:1.0.0");
        let blue = member(s.dubbo_entry(
            iface,
            &provider("192.0.2.3:20880", iface, "version=2.0.0&group=blue"),
        ));
        assert_eq!(&*blue.service, "blue/com.example.OrderService:2.0.0");
        assert_eq!(
            kube_service_name(s.published_name(&blue.service).as_str()),
            "blue-com-example-orderservice-2-0-0"
        );
        let meta = s.build(&blue.service, [&blue]).service.expect("published");
        assert_eq!(annotation(&meta, INTERFACE_ANNOTATION), Some(iface));
        assert_eq!(annotation(&meta, VERSION_ANNOTATION), Some("2.0.0"));
        assert_eq!(annotation(&meta, GROUP_ANNOTATION), Some("blue"));
        assert_eq!(annotation(&meta, APPLICATION_ANNOTATION), Some("shop"));
        let meta = s
            .build(&plain.service, [&plain])
            .service
            .expect("published");
        assert_eq!(
            annotation(&meta, VERSION_ANNOTATION),
            None,
            "no empty version"
        );
        assert_eq!(meta.domain.as_str(), "com-example-orderservice");
    }

    #[test]
    fn the_protocol_names_the_port_and_ipv6_providers_are_endpoints() {
        let s = sel();
        let iface = "com.example.Pay";
        let tri = encode(&format!("tri://[2001:db8::5]:50051/{iface}?side=provider"));
        let dubbo = provider("192.0.2.5:20880", iface, "");
        let entries = [s.dubbo_entry(iface, &tri), s.dubbo_entry(iface, &dubbo)];
        let meta = built(&s, &entries);
        assert_eq!(
            addresses(&meta),
            [("192.0.2.5".into(), true), ("2001:db8::5".into(), true)]
        );
        let ports: Vec<String> = meta
            .ports()
            .iter()
            .map(|(p, proto)| format!("{proto}/{p}"))
            .collect();
        assert_eq!(ports, ["dubbo/20880", "tri/50051"]);
        assert_eq!(
            annotation(&meta, APPLICATION_ANNOTATION),
            Some("shop"),
            "the tri provider names no application"
        );
    }

    #[test]
    fn disabled_consumers_exported_and_filtered_providers_do_not_take_part() {
        let iface = "com.example.A";
        let s = Selection {
            filter_metadata: vec![("team".into(), "blue".into())],
            ..sel()
        };
        for params in [
            "team=blue&enabled=false",
            "team=blue&disabled=true",
            "team=blue&enabled=true&disabled=true",
            "team=red",
            "",
            "team=blue&external-source=kubernetes",
            "team=blue&category=configurators",
        ] {
            assert_eq!(
                s.dubbo_entry(iface, &provider("192.0.2.1:1", iface, params)),
                Entry::Ignored,
                "{params}"
            );
        }
        let consumer = encode(&format!(
            "consumer://192.0.2.1/{iface}?side=consumer&team=blue"
        ));
        assert_eq!(s.dubbo_entry(iface, &consumer), Entry::Ignored);
        let empty = encode(&format!("empty://192.0.2.1/{iface}?team=blue"));
        assert_eq!(s.dubbo_entry(iface, &empty), Entry::Ignored);
        // disabled=false wins over enabled=false, as in Dubbo.
        assert!(matches!(
            s.dubbo_entry(
                iface,
                &provider(
                    "192.0.2.1:1",
                    iface,
                    "team=blue&enabled=false&disabled=false"
                )
            ),
            Entry::Member(_)
        ));
    }

    #[test]
    fn weight_zero_is_not_ready_left_out_or_published_not_ready() {
        let iface = "com.example.W";
        let nodes = [
            provider("192.0.2.1:20880", iface, "weight=100"),
            provider("192.0.2.2:20880", iface, "weight=0"),
            provider("192.0.2.3:20880", iface, "weight=x"),
        ];
        let passing = sel();
        let entries: Vec<Entry> = nodes
            .iter()
            .map(|n| passing.dubbo_entry(iface, n))
            .collect();
        assert_eq!(
            addresses(&built(&passing, &entries)),
            [("192.0.2.1".into(), true), ("192.0.2.3".into(), true)]
        );
        let all = Selection {
            passing_only: false,
            ..sel()
        };
        assert_eq!(
            addresses(&built(&all, &entries)),
            [
                ("192.0.2.1".into(), true),
                ("192.0.2.2".into(), false),
                ("192.0.2.3".into(), true)
            ]
        );
        // Only weight-0 providers: the Service stays, with no ready endpoint.
        let only = [passing.dubbo_entry(iface, &nodes[1])];
        assert!(built(&passing, &only).endpoints.is_empty());
    }

    #[test]
    fn bad_nodes_are_skipped_with_their_reason() {
        let s = sel();
        let iface = "com.example.Bad";
        let reason = |node: &str| s.dubbo_entry(iface, node).problem().map(|p| p.as_label());
        assert_eq!(reason("garbage"), Some("invalid_url"));
        assert_eq!(
            reason(&provider("192.0.2.1:x", iface, "")),
            Some("invalid_url")
        );
        assert_eq!(
            reason(&provider("127.0.0.1:1", iface, "")),
            Some("loopback_address")
        );
        assert_eq!(
            reason(&provider("host.example:1", iface, "")),
            Some("not_an_ip")
        );
        assert_eq!(
            reason(&provider("192.0.2.1:0", iface, "")),
            Some("invalid_port")
        );
        assert_eq!(
            reason(&encode(&format!("dubbo://192.0.2.1/{iface}?side=provider"))),
            Some("no_enabled_port")
        );
        assert_eq!(reason(&provider("192.0.2.1:1", iface, "")), None);
        // A member with a bad address still keeps its service published, empty.
        let e = s.dubbo_entry(iface, &provider("host.example:1", iface, ""));
        assert_eq!(e.service(), Some(iface));
        assert!(built(&s, &[e]).endpoints.is_empty());
    }

    #[test]
    fn by_application_one_service_per_app_and_a_provider_without_one_is_reported() {
        let s = Selection {
            dubbo_service_by: DubboServiceBy::Application,
            ..sel()
        };
        let a = s.dubbo_entry(
            "com.example.A",
            &provider("192.0.2.1:20880", "com.example.A", ""),
        );
        let b = s.dubbo_entry(
            "com.example.B",
            &provider("192.0.2.1:20880", "com.example.B", ""),
        );
        assert_eq!(a.service(), Some("shop"));
        assert_eq!(b.service(), Some("shop"));
        let meta = built(&s, &[a, b]);
        assert_eq!(
            addresses(&meta),
            [("192.0.2.1".into(), true)],
            "one process"
        );
        assert_eq!(annotation(&meta, INTERFACE_ANNOTATION), None);
        assert_eq!(annotation(&meta, APPLICATION_ANNOTATION), Some("shop"));
        let anonymous = encode("dubbo://192.0.2.1:1/com.example.C?side=provider");
        assert_eq!(
            s.dubbo_entry("com.example.C", &anonymous),
            Entry::Skipped(Skip::NoApplication)
        );
    }

    #[test]
    fn url_parameters_are_the_metadata_the_allow_list_copies() {
        let s = Selection {
            metadata: MetadataAllowList::new(["release".to_string()], ["methods".to_string()])
                .expect("valid"),
            ..sel()
        };
        let iface = "com.example.M";
        let m = member(s.dubbo_entry(
            iface,
            &provider(
                "192.0.2.1:1",
                iface,
                "release=3.2.0&methods=a,b&timestamp=1",
            ),
        ));
        assert_eq!(m.metadata.len(), 2, "only the allow-listed keys are kept");
        let meta = s.build(&m.service, [&m]).service.expect("published");
        assert_eq!(
            meta.metadata.labels.get("release").map(String::as_str),
            Some("3.2.0")
        );
        assert_eq!(annotation(&meta, "methods"), Some("a,b"));
    }

    #[test]
    fn curator_instances_become_endpoints() {
        let s = Selection {
            layout: Layout::Curator,
            ..sel()
        };
        let spring =
            br#"{"name":"orders","id":"1","address":"192.0.2.20","port":8080,"sslPort":8443,
            "payload":{"@class":"x","metadata":{"instance_status":"UP"}},"serviceType":"DYNAMIC"}"#;
        let down = br#"{"name":"orders","id":"2","address":"2001:db8::20","port":8080,
            "payload":{"metadata":{"instance_status":"OUT_OF_SERVICE"}}}"#;
        let entries = [
            s.curator_entry("orders", spring),
            s.curator_entry("orders", down),
        ];
        let meta = built(&s, &entries);
        assert_eq!(addresses(&meta), [("192.0.2.20".into(), true)]);
        let ports: Vec<String> = meta
            .ports()
            .iter()
            .map(|(p, proto)| format!("{proto}/{p}"))
            .collect();
        assert_eq!(ports, ["http/8080", "https/8443"]);
        assert_eq!(annotation(&meta, SERVICE_ANNOTATION), Some("orders"));
        let all = Selection {
            passing_only: false,
            ..s.clone()
        };
        assert_eq!(
            addresses(&built(&all, &entries)),
            [("192.0.2.20".into(), true), ("2001:db8::20".into(), false)]
        );
    }

    #[test]
    fn curator_dubbo_3_instances_take_their_protocols_and_bad_ones_are_reported() {
        let s = sel();
        let dubbo3 = br#"{"name":"shop","id":"192.0.2.30:20880","address":"192.0.2.30","port":20880,
            "payload":{"metadata":{"dubbo.endpoints":"[{\"port\":20880,\"protocol\":\"dubbo\"},{\"port\":50051,\"protocol\":\"tri\"}]"}}}"#;
        let meta = built(&s, &[s.curator_entry("shop", dubbo3)]);
        let ports: Vec<String> = meta
            .ports()
            .iter()
            .map(|(p, proto)| format!("{proto}/{p}"))
            .collect();
        assert_eq!(ports, ["dubbo/20880", "tri/50051"]);
        let problem = |data: &[u8]| s.curator_entry("x", data).problem();
        assert_eq!(
            problem(br#"{"port":80}"#),
            Some(Skip::Shared(SkipReason::NoAddress))
        );
        assert!(matches!(
            problem(br#"{"address":"app-1.example","port":80}"#),
            Some(Skip::Shared(SkipReason::Address(a))) if a.reason == AddrErrorReason::NotAnIp
        ));
        assert_eq!(
            problem(br#"{"address":"192.0.2.1"}"#),
            Some(Skip::Shared(SkipReason::NoPort))
        );
        assert_eq!(
            problem(br#"{"address":"192.0.2.1","port":70000}"#),
            Some(Skip::Shared(SkipReason::Port(70000)))
        );
        assert_eq!(
            problem(b"{oops").map(|p| p.as_label()),
            Some("invalid_instance")
        );
        assert_eq!(
            s.curator_entry("x", br#"{"address":"192.0.2.1","port":1,"enabled":false}"#),
            Entry::Ignored
        );
        assert_eq!(
            s.curator_entry(
                "x",
                br#"{"address":"192.0.2.1","port":1,"payload":{"metadata":{"external-source":"kubernetes"}}}"#
            ),
            Entry::Ignored
        );
    }

    #[test]
    fn names_take_the_prefix() {
        let s = Selection {
            service_prefix: "zk-".into(),
            ..sel()
        };
        assert_eq!(
            s.published_name("com.example.A").as_str(),
            "zk-com.example.A"
        );
        assert_eq!(service_key("I", "", ""), "I");
        assert_eq!(service_key("I", "1", ""), "I:1");
        assert_eq!(service_key("I", "", "g"), "g/I");
    }
}
