//! The ZooKeeper form of an exported instance, both ways: the node (path and data) built
//! from an [`Instance`] in either layout, and the [`Instance`] read back from a node.
//! Pure functions.
//!
//! Both directions live side by side because they must agree exactly: the export engine
//! compares what it wants with what [`decode_dubbo`] and [`decode_curator`] return, so a
//! field written here and read back differently would make every resync write again.
//!
//! **Dubbo**: one provider node `<base>/<service>/providers/<URL>` named by its URL,
//! encoded as Java's `URLEncoder` does (what Dubbo's own registry writes and this
//! crate's source reads): `dubbo://192.0.2.1:20880/<service>?enabled=true&interface=
//! <service>&side=provider&...`. The URL's parameters carry everything: the ownership
//! keys ([`meta_keys`]), the instance id ([`INSTANCE_KEY`]), one `port-<name>` per port,
//! the tags, the Service's extra metadata (a `version` or `group` there is what Dubbo
//! consumers match on). Health is `enabled`: Dubbo's consumer matching (`UrlUtils.isMatch`)
//! drops a provider with `enabled=false`, and it stays listed for people to see. Because the name is the
//! data, a changed instance is a new node: the old one is deleted and the new one
//! created in one multi-operation, atomically.
//!
//! **Curator**: `<base>/<service>/<id>` holding a `ServiceInstance` as Curator's JSON
//! serializer writes it, with Spring Cloud Zookeeper's payload class so that its
//! `DiscoveryClient` decodes it; the metadata map carries the same keys as Dubbo's
//! parameters, and health is Spring's `instance_status` (`UP` / `OUT_OF_SERVICE`),
//! which its load balancer filters on.

use std::collections::BTreeMap;
use std::net::IpAddr;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};
use serde_json::{json, Value};

use super::api::{self, DubboUrl, PROVIDERS};
use crate::export::model::{meta_keys, Health, Instance, ServiceKey};
use crate::registry::metadata::{is_from_kubernetes, MetadataLookup};

/// The parameter (Dubbo) or metadata key (Curator) holding the instance's id: the id
/// is derived from the source Service, address and port, so the same instance keeps
/// it across restarts, and the node is found again.
pub const INSTANCE_KEY: &str = "registry-connector-instance";
/// Spring Cloud Zookeeper's health key and values.
pub const STATUS_KEY: &str = "instance_status";
const STATUS_UP: &str = "UP";
const STATUS_OUT_OF_SERVICE: &str = "OUT_OF_SERVICE";
/// The payload class Spring Cloud Zookeeper's Jackson mapper needs to decode a payload.
pub const SPRING_PAYLOAD_CLASS: &str =
    "org.springframework.cloud.zookeeper.discovery.ZookeeperInstance";

/// Dubbo URL parameters the writer sets itself: the Service's metadata cannot set them.
const DUBBO_OWN_PARAMS: [&str; 4] = ["interface", "side", "enabled", INSTANCE_KEY];
/// Port names that name a Dubbo protocol: the main port's name becomes the URL's
/// protocol when it is one of them (`triple` is spelled `tri`), else `dubbo`. Not
/// `http`: that is any web port's name, and Dubbo's `http` protocol is not plain HTTP.
const DUBBO_PROTOCOLS: [&str; 7] = [
    "dubbo", "tri", "triple", "rest", "grpc", "hessian", "thrift",
];

/// Java's `URLEncoder`: everything but `[A-Za-z0-9.*_-]` is `%XX` (a space too, where
/// Java writes `+`; both decode alike).
const JAVA_URL_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'.')
    .remove(b'*')
    .remove(b'_')
    .remove(b'-');

/// `text` as Java's `URLEncoder` writes it.
pub fn java_url_encode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, JAVA_URL_ENCODE).to_string()
}

/// One node the writer creates: its path and data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub path: String,
    pub data: Vec<u8>,
}

/// Why an instance cannot be written in ZooKeeper.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unwritable {
    #[error("service name {0:?} cannot be a ZooKeeper node name (empty, `.`, `..`, or holding `/` or a control character)")]
    ServiceName(String),
    #[error("instance id {0:?} cannot be a ZooKeeper node name")]
    InstanceId(String),
}

/// Whether `name` can be one segment of a ZooKeeper path.
pub fn valid_segment(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.chars().any(char::is_control)
}

/// Whether a Dubbo URL can carry `key=value` as a parameter: Dubbo's parser splits the
/// query on `&` and each part on its first `=`, and does not decode values.
fn dubbo_safe(key: &str, value: &str) -> bool {
    !key.trim().is_empty() && !key.contains(['&', '=']) && !value.contains('&')
}

/// Puts a desired instance in the form [`decode_dubbo`] / [`decode_curator`] return:
/// extra metadata the layout cannot carry (a key the writer sets itself, a Dubbo
/// parameter with `&` in it) is left out, so that an unchanged instance compares equal.
pub fn normalize(layout: super::Layout, instance: &mut Instance) {
    match layout {
        super::Layout::Dubbo => instance
            .meta
            .retain(|k, v| !DUBBO_OWN_PARAMS.contains(&k.as_str()) && dubbo_safe(k, v)),
        super::Layout::Curator => instance
            .meta
            .retain(|k, _| k != INSTANCE_KEY && k != STATUS_KEY),
    }
    if layout == super::Layout::Dubbo {
        instance.tags.retain(|t| !t.contains('&'));
    }
}

/// The keys every node carries besides the instance's own metadata: ownership, the
/// source Service, the id, the ports and the tags.
fn common_meta(instance: &Instance, connector_id: &str) -> BTreeMap<String, String> {
    let mut out = instance.meta.clone();
    out.insert(meta_keys::SOURCE.into(), meta_keys::SOURCE_VALUE.into());
    out.insert(
        meta_keys::NAMESPACE.into(),
        instance.source.namespace.clone(),
    );
    out.insert(meta_keys::SERVICE.into(), instance.source.name.clone());
    out.insert(meta_keys::CONNECTOR.into(), connector_id.into());
    out.insert(INSTANCE_KEY.into(), instance.id.clone());
    for (name, port) in &instance.ports {
        out.insert(
            format!("{}{name}", meta_keys::PORT_PREFIX),
            port.to_string(),
        );
    }
    if !instance.tags.is_empty() {
        out.insert(meta_keys::TAGS.into(), instance.tags.join(","));
    }
    out
}

/// The Dubbo protocol of an instance: its main port's name when that names one.
fn dubbo_protocol(instance: &Instance) -> &'static str {
    let main = instance
        .ports
        .iter()
        .find(|(_, port)| **port == instance.port)
        .map(|(name, _)| name.to_ascii_lowercase());
    match main.as_deref() {
        Some("triple") => "tri",
        Some(name) => DUBBO_PROTOCOLS
            .iter()
            .find(|p| **p == name)
            .copied()
            .unwrap_or("dubbo"),
        None => "dubbo",
    }
}

/// The provider URL of an instance (not yet encoded as a node name).
pub fn dubbo_url(instance: &Instance, connector_id: &str) -> String {
    let mut params = common_meta(instance, connector_id);
    params.insert("interface".into(), instance.service.clone());
    params.insert("side".into(), "provider".into());
    let enabled = instance.health == Health::Passing;
    params.insert("enabled".into(), enabled.to_string());
    let host = match instance.address.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
        _ => instance.address.clone(),
    };
    let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(
        "{}://{host}:{}/{}?{}",
        dubbo_protocol(instance),
        instance.port,
        instance.service,
        query.join("&")
    )
}

/// The Dubbo provider node of an instance.
pub fn dubbo_node(base: &str, instance: &Instance, connector_id: &str) -> Result<Node, Unwritable> {
    // The interface is the URL's path too: the query must start after it.
    if !valid_segment(&instance.service) || instance.service.contains(['?', '&', '=', '#']) {
        return Err(Unwritable::ServiceName(instance.service.clone()));
    }
    let url = dubbo_url(instance, connector_id);
    let name = java_url_encode(&url);
    // Dubbo encodes the interface's directory name too (an identity for Java names).
    Ok(Node {
        path: api::join(
            base,
            &[&java_url_encode(&instance.service), PROVIDERS, &name],
        ),
        data: Vec::new(),
    })
}

/// The Curator instance node of an instance.
pub fn curator_node(
    base: &str,
    instance: &Instance,
    connector_id: &str,
    registered_at_ms: u64,
) -> Result<Node, Unwritable> {
    if !valid_segment(&instance.service) {
        return Err(Unwritable::ServiceName(instance.service.clone()));
    }
    if !valid_segment(&instance.id) {
        return Err(Unwritable::InstanceId(instance.id.clone()));
    }
    let mut metadata = common_meta(instance, connector_id);
    let status = match instance.health {
        Health::Passing => STATUS_UP,
        Health::Critical => STATUS_OUT_OF_SERVICE,
    };
    metadata.insert(STATUS_KEY.into(), status.into());
    // Curator's `ServiceInstance` as its JsonInstanceSerializer writes it; the `uriSpec`
    // is Spring Cloud Zookeeper's default `{scheme}://{address}:{port}`.
    let body = json!({
        "name": instance.service,
        "id": instance.id,
        "address": instance.address,
        "port": instance.port,
        "sslPort": Value::Null,
        "payload": {
            "@class": SPRING_PAYLOAD_CLASS,
            "id": instance.service,
            "name": instance.service,
            "metadata": metadata,
        },
        "registrationTimeUTC": registered_at_ms,
        "serviceType": "DYNAMIC",
        "uriSpec": {"parts": [
            {"value": "scheme", "variable": true},
            {"value": "://", "variable": false},
            {"value": "address", "variable": true},
            {"value": ":", "variable": false},
            {"value": "port", "variable": true},
        ]},
    });
    Ok(Node {
        path: api::join(base, &[&instance.service, &instance.id]),
        data: serde_json::to_vec(&body).expect("a JSON value always serializes"),
    })
}

/// Whether metadata names `connector_id` as its owner (and says it came from
/// Kubernetes).
pub fn is_owned(metadata: &impl MetadataLookup, connector_id: &str) -> bool {
    is_from_kubernetes(metadata) && metadata.value(meta_keys::CONNECTOR) == Some(connector_id)
}

/// The instance fields every layout stores in its metadata map, read back.
fn from_meta(
    id: String,
    service: String,
    address: String,
    port: u16,
    health: Health,
    meta: &BTreeMap<String, String>,
    own_keys: &[&str],
) -> Instance {
    let text = |key: &str| meta.get(key).cloned().unwrap_or_default();
    let ports = meta
        .iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix(meta_keys::PORT_PREFIX)?;
            Some((name.to_string(), v.trim().parse::<u16>().ok()?))
        })
        .collect();
    let tags = meta
        .get(meta_keys::TAGS)
        .map(|t| {
            t.split(',')
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let extra = meta
        .iter()
        .filter(|(k, _)| !meta_keys::is_reserved(k) && !own_keys.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Instance {
        id,
        service,
        source: ServiceKey::new(text(meta_keys::NAMESPACE), text(meta_keys::SERVICE)),
        address,
        port,
        ports,
        health,
        tags,
        meta: extra,
    }
}

/// The instance a provider node of `interface_dir` (as ZooKeeper names it, encoded)
/// stands for, when `connector_id` owns it; `None` for anybody else's provider (or a
/// name that does not parse).
pub fn decode_dubbo(interface_dir: &str, node_name: &str, connector_id: &str) -> Option<Instance> {
    let url: DubboUrl = api::parse_dubbo_url(node_name).ok()?;
    let interface = api::decode_component(interface_dir).ok()?;
    if !is_owned(&url.params, connector_id) {
        return None;
    }
    let id = url.param(INSTANCE_KEY)?.to_string();
    let health = if url.param("enabled") == Some("false") {
        Health::Critical
    } else {
        Health::Passing
    };
    Some(from_meta(
        id,
        interface,
        url.host.clone(),
        url.port.unwrap_or(0),
        health,
        &url.params,
        &DUBBO_OWN_PARAMS,
    ))
}

/// Whether a provider node was written by anybody but `connector_id` (a name that does
/// not parse is somebody else's too).
pub fn dubbo_is_foreign(node_name: &str, connector_id: &str) -> bool {
    api::parse_dubbo_url(node_name).map_or(true, |url| !is_owned(&url.params, connector_id))
}

/// What a Curator node's data says about ownership.
pub enum CuratorRead {
    /// Ours, read back.
    Owned(Instance),
    /// Anybody else's (or not an instance at all).
    Foreign,
}

/// The instance a Curator node of `service_dir` stands for.
pub fn decode_curator(service_dir: &str, data: &[u8], connector_id: &str) -> CuratorRead {
    let Ok(parsed) = api::parse_curator_instance(data) else {
        return CuratorRead::Foreign;
    };
    let meta = parsed.metadata();
    if !is_owned(&meta, connector_id) {
        return CuratorRead::Foreign;
    }
    let Some(id) = parsed
        .id
        .clone()
        .or_else(|| meta.get(INSTANCE_KEY).cloned())
    else {
        return CuratorRead::Foreign;
    };
    let health = match meta.get(STATUS_KEY).map(String::as_str) {
        None | Some(STATUS_UP) => Health::Passing,
        Some(_) => Health::Critical,
    };
    let port = parsed.port.and_then(|p| u16::try_from(p).ok()).unwrap_or(0);
    CuratorRead::Owned(from_meta(
        id,
        service_dir.to_string(),
        parsed.address.unwrap_or_default(),
        port,
        health,
        &meta,
        &[INSTANCE_KEY, STATUS_KEY],
    ))
}

#[cfg(test)]
mod tests {
    use super::super::Layout;
    use super::*;

    const CONNECTOR: &str = "rc-test";

    fn instance(health: Health) -> Instance {
        Instance {
            id: "web-0123456789ab".into(),
            service: "com.example.Web".into(),
            source: ServiceKey::new("shop", "web"),
            address: "192.0.2.10".into(),
            port: 20880,
            ports: BTreeMap::from([("dubbo".into(), 20880), ("metrics".into(), 9090)]),
            health,
            tags: vec!["blue".into(), "canary".into()],
            meta: BTreeMap::from([("version".into(), "1.0.0".into())]),
        }
    }

    fn name_of(node: &Node) -> &str {
        node.path.rsplit('/').next().unwrap()
    }

    #[test]
    fn a_dubbo_provider_reads_back_as_it_was_written() {
        for health in [Health::Passing, Health::Critical] {
            let want = instance(health);
            let node = dubbo_node("/dubbo", &want, CONNECTOR).unwrap();
            assert!(node
                .path
                .starts_with("/dubbo/com.example.Web/providers/dubbo%3A%2F%2F"));
            assert!(node.data.is_empty());
            let got = decode_dubbo("com.example.Web", name_of(&node), CONNECTOR).unwrap();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn a_dubbo_provider_is_what_dubbo_and_our_source_read() {
        let node = dubbo_node("/dubbo", &instance(Health::Critical), CONNECTOR).unwrap();
        let url = api::parse_dubbo_url(name_of(&node)).unwrap();
        assert_eq!(url.protocol, "dubbo");
        assert_eq!((url.host.as_str(), url.port), ("192.0.2.10", Some(20880)));
        assert_eq!(url.interface(), Some("com.example.Web"));
        assert_eq!(url.param("side"), Some("provider"));
        assert_eq!(url.param("enabled"), Some("false"));
        assert_eq!(url.param("version"), Some("1.0.0"));
        // The source skips it: no loop in `both` mode.
        assert!(is_from_kubernetes(&url.params));
    }

    #[test]
    fn ipv6_hosts_are_bracketed_and_the_port_name_picks_the_protocol() {
        let mut v6 = instance(Health::Passing);
        v6.address = "2001:db8::10".into();
        v6.ports = BTreeMap::from([("triple".into(), 20880)]);
        let node = dubbo_node("/dubbo", &v6, CONNECTOR).unwrap();
        let url = api::parse_dubbo_url(name_of(&node)).unwrap();
        assert_eq!(url.protocol, "tri");
        assert_eq!((url.host.as_str(), url.port), ("2001:db8::10", Some(20880)));
        assert_eq!(
            decode_dubbo("com.example.Web", name_of(&node), CONNECTOR),
            Some(v6)
        );
    }

    #[test]
    fn somebody_elses_provider_is_not_ours() {
        let node = dubbo_node("/dubbo", &instance(Health::Passing), CONNECTOR).unwrap();
        assert_eq!(
            decode_dubbo("com.example.Web", name_of(&node), "other"),
            None
        );
        assert!(dubbo_is_foreign(name_of(&node), "other"));
        assert!(!dubbo_is_foreign(name_of(&node), CONNECTOR));
        let vm = "dubbo%3A%2F%2F192.0.2.1%3A20880%2Fcom.example.Web%3Fside%3Dprovider";
        assert_eq!(decode_dubbo("com.example.Web", vm, CONNECTOR), None);
        assert!(dubbo_is_foreign(vm, CONNECTOR));
        assert!(dubbo_is_foreign("%%not a url", CONNECTOR));
    }

    #[test]
    fn normalize_drops_what_a_dubbo_url_cannot_carry() {
        let mut want = instance(Health::Passing);
        want.meta.insert("side".into(), "consumer".into());
        want.meta.insert("team".into(), "a&b".into());
        want.meta.insert("owner".into(), "x=y".into());
        normalize(Layout::Dubbo, &mut want);
        assert_eq!(
            want.meta.keys().collect::<Vec<_>>(),
            ["owner", "version"],
            "a value may hold `=`, not `&`; own keys are the writer's"
        );
        let node = dubbo_node("/dubbo", &want, CONNECTOR).unwrap();
        assert_eq!(
            decode_dubbo("com.example.Web", name_of(&node), CONNECTOR),
            Some(want)
        );
    }

    #[test]
    fn a_curator_instance_reads_back_as_it_was_written() {
        for health in [Health::Passing, Health::Critical] {
            let want = instance(health);
            let node = curator_node("/services", &want, CONNECTOR, 1).unwrap();
            assert_eq!(node.path, "/services/com.example.Web/web-0123456789ab");
            let CuratorRead::Owned(got) = decode_curator("com.example.Web", &node.data, CONNECTOR)
            else {
                panic!("not read back as ours")
            };
            assert_eq!(got, want);
            assert!(matches!(
                decode_curator("com.example.Web", &node.data, "other"),
                CuratorRead::Foreign
            ));
        }
    }

    #[test]
    fn a_curator_instance_is_what_spring_cloud_zookeeper_reads() {
        let node = curator_node("/services", &instance(Health::Critical), CONNECTOR, 7).unwrap();
        let body: Value = serde_json::from_slice(&node.data).unwrap();
        assert_eq!(body["payload"]["@class"], SPRING_PAYLOAD_CLASS);
        assert_eq!(body["payload"]["metadata"][STATUS_KEY], "OUT_OF_SERVICE");
        assert_eq!(body["serviceType"], "DYNAMIC");
        assert_eq!(body["registrationTimeUTC"], 7);
        let parsed = api::parse_curator_instance(&node.data).unwrap();
        assert_eq!(parsed.address.as_deref(), Some("192.0.2.10"));
        assert!(is_from_kubernetes(&parsed.metadata()));
    }

    #[test]
    fn names_that_cannot_be_nodes_are_refused() {
        let mut bad = instance(Health::Passing);
        bad.service = "a/b".into();
        assert!(matches!(
            dubbo_node("/dubbo", &bad, CONNECTOR),
            Err(Unwritable::ServiceName(_))
        ));
        bad.service = "..".into();
        assert!(curator_node("/services", &bad, CONNECTOR, 0).is_err());
        let mut bad_id = instance(Health::Passing);
        bad_id.id = "x/y".into();
        assert!(matches!(
            curator_node("/services", &bad_id, CONNECTOR, 0),
            Err(Unwritable::InstanceId(_))
        ));
    }
}
