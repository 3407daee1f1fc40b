//! What the two layouts store in ZooKeeper, decoded: pure functions from node names and
//! node data to typed values, and from a path to what it is in the layout.
//!
//! **Dubbo** writes one node per provider under `<base>/<interface>/providers/`, named
//! by the provider's whole URL, URL-encoded as Java's `URLEncoder` does (`%XX`, and `+`
//! for a space): `dubbo%3A%2F%2F192.0.2.1%3A20880%2Fcom.example.OrderService%3Fapplication%3Dshop%26version%3D1.0.0...`.
//! Decoded: `protocol://[user[:password]@]host[:port]/path?key=value&...`. The host may
//! be an IPv6 address in brackets; without brackets the last `:` separates the port, as
//! Dubbo's own parser takes it. Parameter values are used as they stand once the name is
//! decoded (Dubbo encodes the URL once, as a whole).
//!
//! **Curator** (`ServiceDiscovery`, used by Spring Cloud Zookeeper and by Dubbo 3's
//! application-level discovery) writes `<base>/<name>/<id>` holding Jackson's JSON of a
//! `ServiceInstance`: `name`, `id`, `address`, `port`, `sslPort`, `payload` (for Spring
//! and Dubbo an object with a `metadata` map), `serviceType`, `enabled`, `uriSpec`...
//! Fields this source does not use are ignored; a field of the wrong type makes the
//! whole instance undecodable.

use std::collections::BTreeMap;

use serde::Deserialize;

/// A Dubbo provider URL that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("the decoded node name is not UTF-8")]
    NotUtf8,
    #[error("no protocol (`protocol://` missing)")]
    NoProtocol,
    #[error("no host")]
    NoHost,
    #[error("an IPv6 host without its closing bracket")]
    UnclosedBracket,
    #[error("port {0:?} is not a number in 0..=65535")]
    BadPort(String),
}

/// One Dubbo provider, as its node name says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DubboUrl {
    /// `dubbo`, `tri`, `rest`, ... lowercased.
    pub protocol: String,
    /// As written, without IPv6 brackets.
    pub host: String,
    /// `None` when the URL has no port.
    pub port: Option<u16>,
    /// The path without its leading `/` (the interface, for a provider).
    pub path: String,
    pub params: BTreeMap<String, String>,
}

impl DubboUrl {
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .get(key)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    /// The interface: the `interface` parameter, else the path.
    pub fn interface(&self) -> Option<&str> {
        self.param("interface")
            .or(Some(self.path.trim()).filter(|p| !p.is_empty()))
    }
}

/// Decodes a node name the way Java's `URLDecoder` does: `+` is a space, `%XX` a byte.
/// A `%` not followed by two hex digits is kept as it is (Dubbo never writes one; a
/// lenient reading loses nothing).
pub fn decode_component(name: &str) -> Result<String, UrlError> {
    let spaced = name.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| UrlError::NotUtf8)
}

/// Parses a provider node's name (still URL-encoded) into its URL.
pub fn parse_dubbo_url(node_name: &str) -> Result<DubboUrl, UrlError> {
    let url = decode_component(node_name)?;
    let url = url.trim();
    let (protocol, rest) = url.split_once("://").ok_or(UrlError::NoProtocol)?;
    let protocol = protocol.trim().to_ascii_lowercase();
    if protocol.is_empty()
        || !protocol
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    {
        return Err(UrlError::NoProtocol);
    }
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    // `user:password@host`: the host is what follows the last `@`.
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = split_host_port(hostport)?;
    if host.is_empty() {
        return Err(UrlError::NoHost);
    }
    let params = query
        .split('&')
        .filter(|part| !part.is_empty())
        .map(|part| match part.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            // Dubbo's parser: a key without a value stands for itself.
            None => (part.to_string(), part.to_string()),
        })
        .collect();
    Ok(DubboUrl {
        protocol,
        host: host.to_string(),
        port,
        path: path.to_string(),
        params,
    })
}

fn split_host_port(hostport: &str) -> Result<(&str, Option<u16>), UrlError> {
    let port = |text: &str| -> Result<Option<u16>, UrlError> {
        if text.is_empty() {
            return Ok(None);
        }
        text.parse::<u16>()
            .map(Some)
            .map_err(|_| UrlError::BadPort(text.to_string()))
    };
    if let Some(bracketed) = hostport.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or(UrlError::UnclosedBracket)?;
        return match after {
            "" => Ok((host, None)),
            p => match p.strip_prefix(':') {
                Some(p) => Ok((host, port(p)?)),
                None => Err(UrlError::BadPort(p.to_string())),
            },
        };
    }
    match hostport.rsplit_once(':') {
        Some((host, p)) => Ok((host, port(p)?)),
        None => Ok((hostport, None)),
    }
}

/// A Curator `ServiceInstance`, as far as this source reads it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CuratorInstance {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub port: Option<i64>,
    #[serde(default)]
    pub ssl_port: Option<i64>,
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    #[serde(default)]
    pub service_type: Option<String>,
    /// Curator 4.1+; absent means enabled.
    #[serde(default)]
    pub enabled: Option<bool>,
}

impl CuratorInstance {
    /// `payload.metadata` (Spring Cloud Zookeeper's `ZookeeperInstance`, Dubbo 3's), its
    /// values as text: strings as they are, numbers and booleans written out, others left
    /// out.
    pub fn metadata(&self) -> BTreeMap<String, String> {
        let Some(serde_json::Value::Object(map)) =
            self.payload.as_ref().and_then(|p| p.get("metadata"))
        else {
            return BTreeMap::new();
        };
        map.iter()
            .filter_map(|(k, v)| {
                let text = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::Bool(b) => b.to_string(),
                    _ => return None,
                };
                Some((k.clone(), text))
            })
            .collect()
    }
}

/// A Curator node's data that is not an instance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstanceError {
    #[error("no data")]
    Empty,
    #[error("not a Curator instance: {0}")]
    Json(String),
}

/// Decodes a Curator instance node's data.
pub fn parse_curator_instance(data: &[u8]) -> Result<CuratorInstance, InstanceError> {
    if data.iter().all(u8::is_ascii_whitespace) {
        return Err(InstanceError::Empty);
    }
    serde_json::from_slice(data).map_err(|e| InstanceError::Json(e.to_string()))
}

/// Dubbo 3's `dubbo.endpoints` instance metadata: the protocols the instance serves,
/// `[{"port":20880,"protocol":"dubbo"},{"port":50051,"protocol":"tri"}]`. `None` when
/// absent or unreadable (then the instance's `port` stands alone).
pub fn dubbo_endpoints(metadata: &BTreeMap<String, String>) -> Option<Vec<(i64, String)>> {
    #[derive(Deserialize)]
    struct Endpoint {
        port: i64,
        protocol: String,
    }
    let text = metadata.get("dubbo.endpoints")?;
    let list: Vec<Endpoint> = serde_json::from_str(text).ok()?;
    (!list.is_empty()).then(|| list.into_iter().map(|e| (e.port, e.protocol)).collect())
}

/// Where a path lies below the base path: its first one to three segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Below<'a> {
    /// The base path itself.
    Base,
    /// `<base>/a`
    One(&'a str),
    /// `<base>/a/b`
    Two(&'a str, &'a str),
    /// `<base>/a/b/c`
    Three(&'a str, &'a str, &'a str),
    /// Deeper, or not below the base path at all.
    Elsewhere,
}

/// Splits `path` relative to `base` (normalised: `/` or without a trailing `/`).
pub fn below<'a>(base: &str, path: &'a str) -> Below<'a> {
    let rest = if base == "/" {
        path.strip_prefix('/')
    } else {
        match path.strip_prefix(base) {
            Some("") => return Below::Base,
            Some(rest) => rest.strip_prefix('/'),
            None => None,
        }
    };
    let Some(rest) = rest else {
        return Below::Elsewhere;
    };
    if rest.is_empty() {
        return Below::Base;
    }
    let mut parts = rest.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(a), None, _, _) => Below::One(a),
        (Some(a), Some(b), None, _) => Below::Two(a, b),
        (Some(a), Some(b), Some(c), None) => Below::Three(a, b, c),
        _ => Below::Elsewhere,
    }
}

/// `base` joined with `segments`.
pub fn join(base: &str, segments: &[&str]) -> String {
    let mut out = if base == "/" {
        String::new()
    } else {
        base.to_string()
    };
    for s in segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// The category directory of Dubbo providers (the others, `consumers`, `configurators`
/// and `routers`, are not read).
pub const PROVIDERS: &str = "providers";

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(url: &str) -> String {
        // As Java's URLEncoder: everything but [A-Za-z0-9.*_-] is %XX, space is '+'.
        let mut out = String::new();
        for b in url.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'*' | b'_' | b'-' => {
                    out.push(b as char)
                }
                b' ' => out.push('+'),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
        out
    }

    #[test]
    fn a_dubbo_provider_url_is_read_from_its_encoded_node_name() {
        let url = "dubbo://192.0.2.10:20880/com.example.OrderService?anyhost=true&application=shop\
                   &dubbo=2.0.2&group=blue&interface=com.example.OrderService&methods=get,list\
                   &side=provider&version=1.0.0&weight=100&timestamp=1700000000000";
        let name = encode(url);
        assert!(!name.contains('/'), "a node name holds no slash");
        let u = parse_dubbo_url(&name).expect("parses");
        assert_eq!(u.protocol, "dubbo");
        assert_eq!(u.host, "192.0.2.10");
        assert_eq!(u.port, Some(20880));
        assert_eq!(u.path, "com.example.OrderService");
        assert_eq!(u.param("application"), Some("shop"));
        assert_eq!(u.param("methods"), Some("get,list"));
        assert_eq!(u.param("version"), Some("1.0.0"));
        assert_eq!(u.param("group"), Some("blue"));
        assert_eq!(u.interface(), Some("com.example.OrderService"));
    }

    #[test]
    fn ipv6_hosts_user_info_spaces_and_bare_keys() {
        let u = parse_dubbo_url(&encode(
            "tri://[2001:db8::7]:50051/com.example.Pay?side=provider",
        ))
        .expect("bracketed IPv6");
        assert_eq!((u.host.as_str(), u.port), ("2001:db8::7", Some(50051)));
        assert_eq!(u.protocol, "tri");
        // Unbracketed: the last colon separates the port, as Dubbo's parser takes it.
        let u = parse_dubbo_url(&encode("dubbo://2001:db8::8:20880/x")).expect("bare IPv6");
        assert_eq!((u.host.as_str(), u.port), ("2001:db8::8", Some(20880)));
        let u =
            parse_dubbo_url(&encode("DUBBO://admin:pw@192.0.2.1:1/x?k&a=b c")).expect("user info");
        assert_eq!(u.protocol, "dubbo");
        assert_eq!(u.host, "192.0.2.1");
        assert_eq!(u.param("k"), Some("k"));
        assert_eq!(u.param("a"), Some("b c"));
        let u = parse_dubbo_url(&encode("rest://192.0.2.1/x")).expect("no port");
        assert_eq!(u.port, None);
        // A + in the name is a space; an encoded + is a plus.
        assert_eq!(decode_component("a+b%2Bc").unwrap(), "a b+c");
        let u = parse_dubbo_url(&encode("dubbo://192.0.2.1:2/Svc")).expect("path interface");
        assert_eq!(u.interface(), Some("Svc"));
    }

    #[test]
    fn bad_urls_say_why() {
        for (name, want) in [
            ("not-a-url", UrlError::NoProtocol),
            (&encode("://192.0.2.1:1/x")[..], UrlError::NoProtocol),
            (&encode("dubbo:///x")[..], UrlError::NoHost),
            (&encode("dubbo://:20880/x")[..], UrlError::NoHost),
            (
                &encode("dubbo://[2001:db8::1:20880/x")[..],
                UrlError::UnclosedBracket,
            ),
            (
                &encode("dubbo://192.0.2.1:port/x")[..],
                UrlError::BadPort("port".into()),
            ),
            (
                &encode("dubbo://192.0.2.1:70000/x")[..],
                UrlError::BadPort("70000".into()),
            ),
            ("dubbo%3A%2F%2F%FF%FE", UrlError::NotUtf8),
        ] {
            assert_eq!(parse_dubbo_url(name), Err(want), "{name}");
        }
    }

    #[test]
    fn curator_instances_decode_with_their_payload_metadata() {
        let spring = br#"{"name":"orders","id":"5f0c","address":"192.0.2.20","port":8080,
            "sslPort":null,"payload":{"@class":"org.springframework.cloud.zookeeper.discovery.ZookeeperInstance",
            "id":"orders-1","name":"orders","metadata":{"instance_status":"UP","zone":"a","n":3,"o":{}}},
            "registrationTimeUTC":1700000000000,"serviceType":"DYNAMIC",
            "uriSpec":{"parts":[{"value":"scheme","variable":true}]}}"#;
        let i = parse_curator_instance(spring).expect("decodes");
        assert_eq!(i.address.as_deref(), Some("192.0.2.20"));
        assert_eq!(i.port, Some(8080));
        assert_eq!(i.ssl_port, None);
        assert_eq!(i.service_type.as_deref(), Some("DYNAMIC"));
        let m = i.metadata();
        assert_eq!(m.get("instance_status").map(String::as_str), Some("UP"));
        assert_eq!(m.get("n").map(String::as_str), Some("3"));
        assert!(!m.contains_key("o"));
        assert_eq!(parse_curator_instance(b" "), Err(InstanceError::Empty));
        assert!(matches!(
            parse_curator_instance(b"{not json"),
            Err(InstanceError::Json(_))
        ));
        assert!(matches!(
            parse_curator_instance(br#"{"address":"192.0.2.1","port":"80"}"#),
            Err(InstanceError::Json(_))
        ));
        let bare = parse_curator_instance(br#"{"address":"192.0.2.1"}"#).expect("decodes");
        assert!(bare.metadata().is_empty());
    }

    #[test]
    fn dubbo_3_instances_list_their_protocols() {
        let mut m = BTreeMap::new();
        m.insert(
            "dubbo.endpoints".to_string(),
            r#"[{"port":20880,"protocol":"dubbo"},{"port":50051,"protocol":"tri"}]"#.to_string(),
        );
        assert_eq!(
            dubbo_endpoints(&m),
            Some(vec![(20880, "dubbo".into()), (50051, "tri".into())])
        );
        m.insert("dubbo.endpoints".into(), "[]".into());
        assert_eq!(dubbo_endpoints(&m), None);
        m.insert("dubbo.endpoints".into(), "garbage".into());
        assert_eq!(dubbo_endpoints(&m), None);
    }

    #[test]
    fn paths_split_below_the_base() {
        assert_eq!(below("/dubbo", "/dubbo"), Below::Base);
        assert_eq!(below("/dubbo", "/dubbo/a"), Below::One("a"));
        assert_eq!(
            below("/dubbo", "/dubbo/a/providers"),
            Below::Two("a", "providers")
        );
        assert_eq!(
            below("/dubbo", "/dubbo/a/providers/u"),
            Below::Three("a", "providers", "u")
        );
        assert_eq!(below("/dubbo", "/dubbo/a/b/c/d"), Below::Elsewhere);
        assert_eq!(below("/dubbo", "/dubbox/a"), Below::Elsewhere);
        assert_eq!(below("/dubbo", "/other"), Below::Elsewhere);
        assert_eq!(below("/", "/"), Below::Base);
        assert_eq!(below("/", "/a/b"), Below::Two("a", "b"));
        assert_eq!(join("/dubbo", &["a", "providers"]), "/dubbo/a/providers");
        assert_eq!(join("/", &["a"]), "/a");
        assert_eq!(join("/", &[]), "/");
    }
}
