//! Mapping registry names to Kubernetes names, and the Kubernetes name grammars we must meet.
//!
//! Registries allow names Kubernetes refuses (`Orders_Service.v2`, 80-character names,
//! names starting with a digit); this module turns them into valid, stable names so the
//! same registry name always yields the same object. The mapping is many-to-one (`orders`
//! and `Orders` collide): detecting and reporting collisions is the caller's job, since it
//! needs the whole set of names. Port names and `appProtocol` values are built here too.
//! Pure string functions only; nothing here knows about objects.

use sha2::{Digest, Sha256};

use crate::model::{MicroSvcAppProtocol, MicroSvcPort};

/// Longest DNS-1035 / DNS-1123 label (Service names, port names).
pub const MAX_LABEL_LEN: usize = 63;

/// Longest IANA service name (the port-name grammar kube-proxy and containers use).
pub const MAX_IANA_SVC_NAME_LEN: usize = 15;

/// Longest DNS-1123 subdomain (EndpointSlice names, ExternalName targets).
pub const MAX_SUBDOMAIN_LEN: usize = 253;

/// Prefix that makes a name start with a letter, and the whole name when nothing of the
/// registry name survives sanitisation.
const FALLBACK_PREFIX: &str = "svc";

/// Hex digits of the hash suffix appended to truncated names.
const HASH_LEN: usize = 8;

/// The first `len` hex digits of the SHA-256 of `input`; a stable, well-spread suffix.
pub fn short_hash(input: &str, len: usize) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let mut hex = String::with_capacity(digest.len() * 2);
    for byte in digest {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex.truncate(len);
    hex
}

/// Lowercases ASCII letters, turns every other character (including `_`, `.` and any
/// non-ASCII character) into `-`, collapses runs of `-` and trims them from both ends.
fn sanitize(input: &str) -> String {
    let mut out = String::with_capacity(input.len());
    for c in input.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    out
}

/// The first `max` bytes of an ASCII string, without trailing `-`.
fn truncate_label(input: &str, max: usize) -> &str {
    input
        .get(..max.min(input.len()))
        .unwrap_or(input)
        .trim_end_matches('-')
}

/// Maps a registry service name to a valid Service name (a DNS-1035 label).
///
/// Lowercase; every character outside `[a-z0-9]` becomes `-`; runs of `-` collapse and are
/// trimmed; a leading digit gets the `svc-` prefix; a name with nothing left becomes
/// `svc-<hash>`; a name over 63 characters is cut and ends with `-<8 hex digits of the
/// SHA-256 of the original name>`, so two long names sharing a prefix stay distinct and the
/// result never changes between runs. Names that are already valid pass through unchanged.
pub fn kube_service_name(registry_name: &str) -> String {
    let clean = sanitize(registry_name);
    if clean.is_empty() {
        return format!("{FALLBACK_PREFIX}-{}", short_hash(registry_name, HASH_LEN));
    }
    let name = if clean.starts_with(|c: char| c.is_ascii_digit()) {
        format!("{FALLBACK_PREFIX}-{clean}")
    } else {
        clean
    };
    if name.len() <= MAX_LABEL_LEN {
        return name;
    }
    let head = truncate_label(&name, MAX_LABEL_LEN - HASH_LEN - 1);
    format!("{head}-{}", short_hash(registry_name, HASH_LEN))
}

/// Whether `name` is a DNS-1035 label: 1-63 characters of `[a-z0-9-]`, starting with a
/// letter, ending with a letter or digit. Service names must be.
pub fn is_dns1035_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_LABEL_LEN
        && bytes[0].is_ascii_lowercase()
        && bytes[bytes.len() - 1] != b'-'
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// Whether `name` is a DNS-1123 label: like DNS-1035, but may start with a digit. Port
/// names in Services, EndpointSlices and Endpoints must be.
pub fn is_dns1123_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_LABEL_LEN
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// Whether `name` is a DNS-1123 subdomain as Kubernetes checks it: at most 253
/// characters, dot-separated parts of `[a-z0-9-]` that start and end with a letter or
/// digit (the parts are not limited to 63 characters). EndpointSlice names and
/// ExternalName targets must be.
pub fn is_dns1123_subdomain(name: &str) -> bool {
    name.len() <= MAX_SUBDOMAIN_LEN
        && name.split('.').all(|part| {
            let bytes = part.as_bytes();
            !bytes.is_empty()
                && bytes[0] != b'-'
                && bytes[bytes.len() - 1] != b'-'
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        })
}

/// Whether `target` is accepted as an ExternalName Service's `externalName`: a DNS-1123
/// subdomain, optionally with a trailing dot. The renderer lowercases the registry's
/// domain but cannot repair it otherwise (a `_` in a DNS name is the source's problem);
/// the sink can use this to report such a service instead of failing its write.
pub fn is_valid_external_name(target: &str) -> bool {
    let name = target.strip_suffix('.').unwrap_or(target);
    !name.is_empty() && is_dns1123_subdomain(name)
}

/// Whether `name` is an IANA service name as Kubernetes checks it: 1-15 characters of
/// `[a-z0-9-]`, at least one letter, no leading, trailing or doubled `-`.
pub fn is_iana_svc_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_IANA_SVC_NAME_LEN
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.iter().any(u8::is_ascii_lowercase)
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
        && !name.contains("--")
}

/// Whether `value` is a Kubernetes qualified name (`name` or `prefix/name`, the prefix a
/// DNS-1123 subdomain, the name 1-63 alphanumerics with `-`, `_`, `.` inside). The
/// apiserver validates `appProtocol` with this rule.
pub fn is_qualified_name(value: &str) -> bool {
    let name = match value.split_once('/') {
        None => value,
        Some((prefix, name)) => {
            if prefix.is_empty() || !is_dns1123_subdomain(prefix) {
                return false;
            }
            name
        }
    };
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_LABEL_LEN
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether `value` is a valid label value: empty, or 1-63 alphanumerics with `-`, `_`,
/// `.` inside.
pub fn is_label_value(value: &str) -> bool {
    value.is_empty() || (!value.contains('/') && is_qualified_name(value))
}

/// The port name `<protocol><port>` (seed convention: `http8080`, `grpc9090`), made a valid
/// IANA service name so that it is valid in every object that carries it.
///
/// The port number is always kept whole; the protocol part is sanitised (lowercase, other
/// characters to `-`) and cut to fit 15 characters. A protocol that ends in a digit is
/// separated from the port by `-` (`h2-8080`, not `h28080`), and one with no letter left
/// becomes `port`. Because the name therefore always ends in exactly the port's digits after
/// a letter or `-`, two different ports of one Service always get different names, which
/// Kubernetes requires and kube-proxy relies on to match Service and slice ports.
pub fn port_name(protocol: &MicroSvcAppProtocol, port: MicroSvcPort) -> String {
    let digits = port.get().to_string();
    let budget = MAX_IANA_SVC_NAME_LEN - digits.len();
    let clean = sanitize(protocol.as_str());
    let mut head = truncate_label(&clean, budget);
    if head.ends_with(|c: char| c.is_ascii_digit()) {
        head = truncate_label(&clean, budget - 1);
    }
    if !head.bytes().any(|b| b.is_ascii_lowercase()) {
        head = "port";
    }
    let separator = if head.ends_with(|c: char| c.is_ascii_digit()) {
        "-"
    } else {
        ""
    };
    format!("{head}{separator}{digits}")
}

/// The `appProtocol` for a port: `http` and `grpc` as is, other names passed through when
/// the apiserver would accept them (an IANA-style name or a domain-prefixed one such as
/// `kubernetes.io/h2c`), otherwise none: a port without `appProtocol` is better than a
/// Service the apiserver rejects.
pub fn app_protocol(protocol: &MicroSvcAppProtocol) -> Option<String> {
    match protocol {
        MicroSvcAppProtocol::Http | MicroSvcAppProtocol::Grpc => Some(protocol.as_str().to_owned()),
        MicroSvcAppProtocol::Other(name) => is_qualified_name(name).then(|| name.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(p: u16) -> MicroSvcPort {
        MicroSvcPort::new(p).expect("non-zero test port")
    }

    fn other(name: &str) -> MicroSvcAppProtocol {
        MicroSvcAppProtocol::Other(name.to_owned())
    }

    #[test]
    fn seed_example() {
        assert_eq!(kube_service_name("Orders_Service.v2"), "orders-service-v2");
    }

    #[test]
    fn valid_names_pass_through() {
        for name in ["orders", "a", "orders-v2", "x1"] {
            assert_eq!(kube_service_name(name), name);
        }
    }

    #[test]
    fn sanitises_characters() {
        assert_eq!(kube_service_name("ORDERS"), "orders");
        assert_eq!(kube_service_name("a__b..c--d"), "a-b-c-d");
        assert_eq!(kube_service_name("__orders__"), "orders");
        assert_eq!(kube_service_name("-orders-"), "orders");
        assert_eq!(kube_service_name("my service/api"), "my-service-api");
        assert_eq!(kube_service_name("café"), "caf");
        assert_eq!(kube_service_name("naïve-svc"), "na-ve-svc");
        // The Kelvin sign lowercases to an ASCII `k` in Unicode; we do not follow it.
        assert_eq!(kube_service_name("\u{212a}v"), "v");
    }

    #[test]
    fn leading_digit_gets_prefix() {
        assert_eq!(kube_service_name("3scale"), "svc-3scale");
        assert_eq!(kube_service_name("_9_lives"), "svc-9-lives");
    }

    #[test]
    fn empty_names_get_hash() {
        let empty = kube_service_name("");
        let underscores = kube_service_name("___");
        assert!(empty.starts_with("svc-") && empty.len() == 12, "{empty}");
        assert!(is_dns1035_label(&empty));
        assert!(is_dns1035_label(&underscores));
        assert_ne!(empty, underscores, "hash of the original name");
        assert_eq!(kube_service_name("___"), underscores, "stable");
    }

    #[test]
    fn long_names_are_truncated_with_stable_distinct_hash() {
        let base = "a".repeat(70);
        let one = kube_service_name(&format!("{base}-one"));
        let two = kube_service_name(&format!("{base}-two"));
        assert_eq!(one.len(), 63);
        assert_eq!(two.len(), 63);
        assert!(is_dns1035_label(&one), "{one}");
        assert_ne!(one, two);
        assert_eq!(one, kube_service_name(&format!("{base}-one")), "stable");
        assert_eq!(&one[..54], &base[..54]);
        assert_eq!(&one[54..55], "-");
        assert_eq!(&one[55..], short_hash(&format!("{base}-one"), 8));
    }

    #[test]
    fn exactly_63_is_kept() {
        let name = "b".repeat(63);
        assert_eq!(kube_service_name(&name), name);
        let long = "b".repeat(64);
        assert_ne!(kube_service_name(&long), long);
    }

    #[test]
    fn truncation_does_not_leave_double_dash() {
        // Position 54 falls right after a `-`.
        let name = format!("{}-{}", "c".repeat(53), "d".repeat(20));
        let out = kube_service_name(&name);
        assert!(is_dns1035_label(&out), "{out}");
        assert!(!out.contains("--"), "{out}");
        assert!(out.len() <= 63);
    }

    #[test]
    fn prefixed_long_digit_names_fit() {
        let out = kube_service_name(&"7".repeat(80));
        assert!(out.starts_with("svc-7"), "{out}");
        assert_eq!(out.len(), 63);
        assert!(is_dns1035_label(&out));
    }

    #[test]
    fn results_are_always_dns1035() {
        let inputs = [
            "",
            "-",
            "0",
            "Z",
            "UPPER_lower.9",
            "a.b.c",
            "  spaced  ",
            "日本語",
            "x--y",
            "svc-",
            "-1-",
        ];
        for input in inputs {
            let out = kube_service_name(input);
            assert!(is_dns1035_label(&out), "{input:?} -> {out:?}");
        }
    }

    #[test]
    fn short_hash_is_sha256_prefix() {
        // sha256("") = e3b0c442...
        assert_eq!(short_hash("", 8), "e3b0c442");
        assert_eq!(short_hash("", 6), "e3b0c4");
        assert_eq!(short_hash("abc", 64).len(), 64);
    }

    #[test]
    fn dns1035_grammar() {
        assert!(is_dns1035_label("a"));
        assert!(is_dns1035_label("a-1"));
        assert!(!is_dns1035_label(""));
        assert!(!is_dns1035_label("1a"));
        assert!(!is_dns1035_label("a-"));
        assert!(!is_dns1035_label("-a"));
        assert!(!is_dns1035_label("A"));
        assert!(!is_dns1035_label("a_b"));
        assert!(!is_dns1035_label("a.b"));
        assert!(is_dns1035_label(&"a".repeat(63)));
        assert!(!is_dns1035_label(&"a".repeat(64)));
    }

    #[test]
    fn dns1123_grammars() {
        assert!(is_dns1123_label("1a"));
        assert!(!is_dns1123_label("-1"));
        assert!(is_dns1123_subdomain("orders.service.consul"));
        assert!(is_dns1123_subdomain("a"));
        assert!(!is_dns1123_subdomain("orders..consul"));
        assert!(!is_dns1123_subdomain("Orders.consul"));
        assert!(!is_dns1123_subdomain(""));
        assert!(is_dns1123_subdomain(&format!("{}.b", "a".repeat(100))));
        assert!(is_dns1123_subdomain(&"a".repeat(253)));
        assert!(!is_dns1123_subdomain(&"a".repeat(254)));
        assert!(!is_dns1123_subdomain("a.-b"));
        assert!(!is_dns1123_subdomain("a."));
    }

    #[test]
    fn external_name_targets() {
        assert!(is_valid_external_name("orders.service.consul"));
        assert!(is_valid_external_name("orders.service.consul."));
        assert!(!is_valid_external_name(""));
        assert!(!is_valid_external_name("."));
        assert!(!is_valid_external_name("orders_v2.service.consul"));
        assert!(!is_valid_external_name("Orders.service.consul"));
    }

    #[test]
    fn seed_port_names() {
        assert_eq!(
            port_name(&MicroSvcAppProtocol::Http, port(8080)),
            "http8080"
        );
        assert_eq!(
            port_name(&MicroSvcAppProtocol::Grpc, port(9090)),
            "grpc9090"
        );
        assert_eq!(port_name(&other("tcp"), port(1)), "tcp1");
    }

    #[test]
    fn port_names_are_sanitised_and_truncated() {
        assert_eq!(
            port_name(&other("Thrift_Compact"), port(9000)),
            "thrift-comp9000"
        );
        assert_eq!(
            port_name(&other("kubernetes.io/h2c"), port(65535)),
            "kubernetes65535"
        );
        assert_eq!(port_name(&other("h2"), port(8080)), "h2-8080");
        assert_eq!(port_name(&other(""), port(80)), "port80");
        assert_eq!(port_name(&other("123"), port(80)), "port80");
        assert_eq!(port_name(&other("___"), port(80)), "port80");
        // Cutting at the budget would end in a digit; the separator must still fit.
        assert_eq!(
            port_name(&other("abcdefghi1x"), port(65535)),
            "abcdefghi65535"
        );
        assert_eq!(
            port_name(&other("abcdefgh12x"), port(65535)),
            "abcdefgh1-65535"
        );
        // Cutting would leave no letter at all.
        assert_eq!(port_name(&other("1234567890abc"), port(12345)), "port12345");
    }

    #[test]
    fn port_names_are_always_iana_and_distinct_per_port() {
        let protocols = [
            MicroSvcAppProtocol::Http,
            MicroSvcAppProtocol::Grpc,
            other(""),
            other("h2"),
            other("h2c"),
            other("ab1"),
            other("ab12"),
            other("a-"),
            other("-a-"),
            other("x9y8z7w6v5u4"),
            other("mycompany.com/my-custom-protocol"),
            other("日本"),
        ];
        let ports = [1, 3, 23, 80, 123, 8080, 9090, 12345, 65535].map(port);
        for protocol in &protocols {
            for p in ports {
                let name = port_name(protocol, p);
                assert!(is_iana_svc_name(&name), "{protocol:?}/{p} -> {name:?}");
                assert!(is_dns1123_label(&name));
            }
        }
        // Distinct ports never share a name, whatever protocols they carry.
        let mut seen = std::collections::BTreeMap::new();
        for protocol in &protocols {
            for p in ports {
                let name = port_name(protocol, p);
                if let Some(previous) = seen.insert(name.clone(), p) {
                    assert_eq!(previous, p, "{name} used for two ports");
                }
            }
        }
        assert_ne!(
            port_name(&other("ab1"), port(23)),
            port_name(&other("ab12"), port(3))
        );
    }

    #[test]
    fn iana_grammar() {
        assert!(is_iana_svc_name("http"));
        assert!(is_iana_svc_name("h2-8080"));
        assert!(!is_iana_svc_name("8080"));
        assert!(!is_iana_svc_name(""));
        assert!(!is_iana_svc_name("a--b"));
        assert!(!is_iana_svc_name("-a"));
        assert!(!is_iana_svc_name("a-"));
        assert!(!is_iana_svc_name("Http"));
        assert!(!is_iana_svc_name("abcdefghijklmnop"));
    }

    #[test]
    fn app_protocols() {
        assert_eq!(
            app_protocol(&MicroSvcAppProtocol::Http).as_deref(),
            Some("http")
        );
        assert_eq!(
            app_protocol(&MicroSvcAppProtocol::Grpc).as_deref(),
            Some("grpc")
        );
        assert_eq!(app_protocol(&other("h2c")).as_deref(), Some("h2c"));
        assert_eq!(
            app_protocol(&other("kubernetes.io/h2c")).as_deref(),
            Some("kubernetes.io/h2c")
        );
        assert_eq!(
            app_protocol(&other("mycompany.com/my_proto.v1")).as_deref(),
            Some("mycompany.com/my_proto.v1")
        );
        assert_eq!(app_protocol(&other("")), None);
        assert_eq!(app_protocol(&other("has space")), None);
        assert_eq!(app_protocol(&other("/x")), None);
        assert_eq!(app_protocol(&other("a/b/c")), None);
        assert_eq!(app_protocol(&other("Bad_Prefix/x")), None);
        assert_eq!(app_protocol(&other("-x")), None);
        assert_eq!(app_protocol(&other(&"a".repeat(64))), None);
    }
}
