//! The shapes of Eureka's JSON answers to `GET /apps` and `GET /apps/delta`, decoded
//! leniently.
//!
//! Eureka servers and the proxies in front of them are not strict about types: a port
//! number may come as `8080` or `"8080"`, a flag as `"true"` or `true`, a list of one
//! element as the element itself (the XStream-style JSON of older servers), and an empty
//! metadata map as `{"@class": "java.util.Collections$EmptyMap"}`. Everything here
//! accepts all of those, so that one oddly encoded instance does not make the whole
//! registry unreadable. Only the fields the connector uses are decoded (by the source,
//! and by the export writer reading back what it registered); leases and timestamps
//! other than `lastDirtyTimestamp` are ignored.

use std::fmt;

use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::registry::metadata::{compact_metadata, CompactMetadata};

/// An instance's status, as Eureka's `InstanceStatus`. Names Eureka does not know decode
/// as `Unknown`, which is what Eureka itself does with them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    Up,
    Down,
    Starting,
    OutOfService,
    #[default]
    Unknown,
}

impl Status {
    /// Eureka's spelling, which is also the key of the reconcile hash code.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "UP",
            Self::Down => "DOWN",
            Self::Starting => "STARTING",
            Self::OutOfService => "OUT_OF_SERVICE",
            Self::Unknown => "UNKNOWN",
        }
    }

    /// Parses a status name without regard to case or surrounding space.
    pub fn parse(name: &str) -> Self {
        match name.trim().to_ascii_uppercase().as_str() {
            "UP" => Self::Up,
            "DOWN" => Self::Down,
            "STARTING" => Self::Starting,
            "OUT_OF_SERVICE" => Self::OutOfService,
            _ => Self::Unknown,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Status {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::String(s) => Self::parse(&s),
            _ => Self::Unknown,
        })
    }
}

/// What a delta says happened to an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActionType {
    Added,
    Modified,
    Deleted,
    /// A value this connector does not know: the entry is ignored (as Eureka clients
    /// ignore it) instead of failing the whole answer; a real change it hides shows as
    /// a hash mismatch and a full read.
    Other,
}

impl<'de> Deserialize<'de> for ActionType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::String(s) => match s.trim().to_ascii_uppercase().as_str() {
                "ADDED" => Self::Added,
                "MODIFIED" => Self::Modified,
                "DELETED" => Self::Deleted,
                _ => Self::Other,
            },
            _ => Self::Other,
        })
    }
}

/// `port` or `securePort`: `{"$": 8080, "@enabled": "true"}`, or a bare number as some
/// Eureka-compatible servers write it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortInfo {
    /// The number as given; it may be out of range (checked when instances are selected).
    pub number: Option<i64>,
    /// Absent means Eureka's default for the field (see [`Instance::http_port`]).
    pub enabled: Option<bool>,
}

/// Read with a visitor, not through a `Value`: two ports per instance, 60,000 small
/// maps built and dropped in a full read of 30,000 instances otherwise.
impl<'de> Deserialize<'de> for PortInfo {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PortVisitor;

        impl<'de> serde::de::Visitor<'de> for PortVisitor {
            type Value = PortInfo;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port object or number")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<PortInfo, A::Error> {
                let mut port = PortInfo::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match &*key {
                        "$" => port.number = i64_of(map.next_value()?),
                        "@enabled" => port.enabled = bool_of(map.next_value()?),
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(port)
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<PortInfo, E> {
                Ok(PortInfo {
                    number: Some(n),
                    enabled: None,
                })
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<PortInfo, E> {
                Ok(PortInfo {
                    number: i64::try_from(n).ok(),
                    enabled: None,
                })
            }

            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<PortInfo, E> {
                Ok(PortInfo::default())
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<PortInfo, E> {
                Ok(PortInfo {
                    number: s.trim().parse().ok(),
                    enabled: None,
                })
            }

            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<PortInfo, E> {
                Ok(PortInfo::default())
            }

            fn visit_unit<E: serde::de::Error>(self) -> Result<PortInfo, E> {
                Ok(PortInfo::default())
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<PortInfo, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(PortInfo::default())
            }
        }

        d.deserialize_any(PortVisitor)
    }
}

/// One registered instance, with the fields the connector reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    #[serde(default, deserialize_with = "lenient_string")]
    pub instance_id: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    pub host_name: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    pub app: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    pub ip_addr: Option<String>,
    #[serde(default)]
    pub status: Status,
    #[serde(default)]
    pub port: Option<PortInfo>,
    #[serde(default)]
    pub secure_port: Option<PortInfo>,
    #[serde(default, deserialize_with = "lenient_string")]
    pub vip_address: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    pub secure_vip_address: Option<String>,
    #[serde(default, deserialize_with = "metadata_map")]
    pub metadata: CompactMetadata,
    /// Set in deltas; in full answers it tells the last change and is ignored.
    #[serde(default)]
    pub action_type: Option<ActionType>,
    /// When the instance's registration last changed, as its registrant said: the
    /// export writer sends it back with each renewal (and registers anew only with a
    /// newer one). The source direction ignores it (its mirror clears it, like
    /// `action_type`: it tells when, not what).
    #[serde(default, deserialize_with = "lenient_i64")]
    pub last_dirty_timestamp: Option<i64>,
}

impl Instance {
    /// The key Eureka files the instance under: `instanceId`, else `hostName` (Eureka's
    /// `InstanceInfo.getId()` outside AWS). `None` when the instance has neither.
    pub fn id(&self) -> Option<&str> {
        [&self.instance_id, &self.host_name]
            .into_iter()
            .filter_map(|v| v.as_deref())
            .map(str::trim)
            .find(|v| !v.is_empty())
    }

    /// The plain port when enabled (Eureka enables it unless told otherwise).
    pub fn http_port(&self) -> Option<i64> {
        self.port
            .as_ref()
            .filter(|p| p.enabled.unwrap_or(true))
            .and_then(|p| p.number)
    }

    /// The secure port when enabled (Eureka disables it unless told otherwise).
    pub fn https_port(&self) -> Option<i64> {
        self.secure_port
            .as_ref()
            .filter(|p| p.enabled.unwrap_or(false))
            .and_then(|p| p.number)
    }
}

/// One application with its instances.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Application {
    #[serde(default)]
    pub name: String,
    #[serde(rename = "instance", default, deserialize_with = "one_or_many")]
    pub instances: Vec<Instance>,
}

/// The body of `GET /apps` and `GET /apps/delta`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Applications {
    /// The reconcile hash code of the server's whole registry (`UP_3_DOWN_1_`, sorted by
    /// status); after a delta is applied, the local copy must hash to the same.
    #[serde(
        rename = "apps__hashcode",
        default,
        deserialize_with = "lenient_string"
    )]
    pub apps_hashcode: Option<String>,
    #[serde(rename = "application", default, deserialize_with = "one_or_many")]
    pub applications: Vec<Application>,
}

#[derive(Deserialize)]
struct Envelope {
    applications: Applications,
}

/// Decodes a `GET /apps` or `GET /apps/delta` body.
pub fn decode_applications(body: &[u8]) -> Result<Applications, serde_json::Error> {
    serde_json::from_slice::<Envelope>(body).map(|e| e.applications)
}

/// A list, a single element standing for a list of one, or null. Streams the elements
/// (a visitor, not an intermediate `Value` tree): the application and instance lists
/// hold the whole registry, which can be tens of megabytes.
pub(crate) fn one_or_many<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct OneOrMany<T>(std::marker::PhantomData<T>);

    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for OneOrMany<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list, a single object or null")
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Vec<T>, E> {
            Ok(Vec::new())
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Vec<T>, E> {
            Ok(Vec::new())
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element()? {
                items.push(item);
            }
            Ok(items)
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Vec<T>, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(|one| vec![one])
        }
    }

    d.deserialize_any(OneOrMany(std::marker::PhantomData))
}

pub(crate) fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    })
}

pub(crate) fn lenient_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Ok(i64_of(Value::deserialize(d)?))
}

fn i64_of(value: Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn bool_of(value: Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(b),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// Metadata values as text; Jackson's `@class` type hints and values that are not
/// scalars are dropped. Read with a visitor straight into the compact map (no `Value`
/// map per instance on the way).
pub(crate) fn metadata_map<'de, D: Deserializer<'de>>(d: D) -> Result<CompactMetadata, D::Error> {
    struct MetadataVisitor;

    impl<'de> serde::de::Visitor<'de> for MetadataVisitor {
        type Value = CompactMetadata;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a metadata map")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<CompactMetadata, A::Error> {
            let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
            while let Some(key) = map.next_key::<String>()? {
                let value = match map.next_value::<Value>()? {
                    Value::String(s) => s,
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => continue,
                };
                if !key.starts_with('@') {
                    entries.push((key, value));
                }
            }
            Ok(compact_metadata(entries))
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<CompactMetadata, E> {
            Ok(CompactMetadata::new())
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<CompactMetadata, E> {
            Ok(CompactMetadata::new())
        }

        fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<CompactMetadata, E> {
            Ok(CompactMetadata::new())
        }

        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<CompactMetadata, E> {
            Ok(CompactMetadata::new())
        }

        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<CompactMetadata, E> {
            Ok(CompactMetadata::new())
        }

        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<CompactMetadata, E> {
            Ok(CompactMetadata::new())
        }

        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<CompactMetadata, E> {
            Ok(CompactMetadata::new())
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<CompactMetadata, A::Error> {
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(CompactMetadata::new())
        }
    }

    d.deserialize_any(MetadataVisitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `GET /apps` answer as the Spring Cloud Netflix Eureka server of the test
    /// environment writes it (trimmed to two instances).
    const FULL: &str = r#"{"applications":{"versions__delta":"1","apps__hashcode":"OUT_OF_SERVICE_1_UP_1_","application":[{"name":"ORDERS","instance":[
        {"instanceId":"orders-2","hostName":"orders-2.example","app":"ORDERS","ipAddr":"2001:db8::10","status":"UP","overriddenStatus":"UNKNOWN",
         "port":{"$":8080,"@enabled":"true"},"securePort":{"$":7002,"@enabled":"false"},"countryId":1,
         "dataCenterInfo":{"@class":"com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo","name":"MyOwn"},
         "leaseInfo":{"renewalIntervalInSecs":30,"durationInSecs":90},"metadata":{"@class":"java.util.Collections$EmptyMap"},
         "vipAddress":"orders","isCoordinatingDiscoveryServer":"false","lastUpdatedTimestamp":"1796192314265","actionType":"ADDED"},
        {"instanceId":"orders-1","hostName":"orders-1.example","app":"ORDERS","ipAddr":"192.0.2.10","status":"OUT_OF_SERVICE",
         "port":{"$":8080,"@enabled":"true"},"securePort":{"$":8443,"@enabled":"true"},
         "metadata":{"zone":"a","weight":3},"vipAddress":"orders","secureVipAddress":"orders","actionType":"MODIFIED"}]}]}}"#;

    #[test]
    fn decodes_what_the_server_writes() {
        let apps = decode_applications(FULL.as_bytes()).expect("decodes");
        assert_eq!(
            apps.apps_hashcode.as_deref(),
            Some("OUT_OF_SERVICE_1_UP_1_")
        );
        assert_eq!(apps.applications.len(), 1);
        let orders = &apps.applications[0];
        assert_eq!(orders.name, "ORDERS");
        let [two, one] = &orders.instances[..] else {
            panic!("two instances expected");
        };
        assert_eq!(two.id(), Some("orders-2"));
        assert_eq!(two.status, Status::Up);
        assert_eq!(two.http_port(), Some(8080));
        assert_eq!(two.https_port(), None, "securePort disabled");
        assert!(two.metadata.is_empty(), "the @class hint is not metadata");
        assert_eq!(one.status, Status::OutOfService);
        assert_eq!(one.https_port(), Some(8443));
        assert_eq!(
            one.metadata,
            compact_metadata([("weight".into(), "3".into()), ("zone".into(), "a".into())])
        );
        assert_eq!(one.action_type, Some(ActionType::Modified));
        assert_eq!(two.last_dirty_timestamp, None, "not in this answer");
    }

    /// What the export writer reads back, in the same type: `lastDirtyTimestamp` as
    /// the server writes it (a string) or as a number.
    #[test]
    fn the_dirty_timestamp_decodes_as_string_or_number() {
        let apps = decode_applications(
            br#"{"applications":{"application":{"name":"WEB","instance":[
                {"instanceId":"w-1","lastDirtyTimestamp":"1796244877035"},
                {"instanceId":"w-2","lastDirtyTimestamp":1796244877036},
                {"instanceId":"w-3","lastDirtyTimestamp":"soon"}]}}}"#,
        )
        .expect("decodes");
        let stamps: Vec<Option<i64>> = apps.applications[0]
            .instances
            .iter()
            .map(|i| i.last_dirty_timestamp)
            .collect();
        assert_eq!(
            stamps,
            [Some(1_796_244_877_035), Some(1_796_244_877_036), None]
        );
    }

    #[test]
    fn accepts_single_elements_strings_for_numbers_and_missing_fields() {
        let body = br#"{"applications":{"application":{"name":"A","instance":
            {"hostName":"h1","status":"weird","port":{"$":"9000"},"securePort":{"$":443,"@enabled":true}}}}}"#;
        let apps = decode_applications(body).expect("decodes");
        assert_eq!(apps.apps_hashcode, None);
        let instance = &apps.applications[0].instances[0];
        assert_eq!(
            instance.id(),
            Some("h1"),
            "hostName stands in for instanceId"
        );
        assert_eq!(instance.status, Status::Unknown);
        assert_eq!(
            instance.http_port(),
            Some(9000),
            "enabled unless told otherwise"
        );
        assert_eq!(instance.https_port(), Some(443));

        let empty =
            decode_applications(br#"{"applications":{"apps__hashcode":"","application":[]}}"#)
                .expect("decodes");
        assert!(empty.applications.is_empty());
        assert_eq!(empty.apps_hashcode.as_deref(), Some(""));

        let null = decode_applications(
            br#"{"applications":{"application":[{"name":"A","instance":null}]}}"#,
        )
        .expect("decodes");
        assert!(null.applications[0].instances.is_empty());
        assert!(
            decode_applications(br#"{"applications":{"application":"A"}}"#).is_err(),
            "a string is neither a list nor an element"
        );
    }

    #[test]
    fn refuses_what_is_not_an_applications_document() {
        assert!(decode_applications(b"<applications/>").is_err());
        assert!(decode_applications(br#"{"apps":[]}"#).is_err());
    }

    #[test]
    fn one_odd_instance_does_not_fail_the_document() {
        let apps = decode_applications(
            br#"{"applications":{"application":[{"name":"A","instance":[
                {"instanceId":"a-1","actionType":"EXPLODED","port":8080,"securePort":"8443"},
                {"instanceId":"a-2","actionType":7}]}]}}"#,
        )
        .expect("decodes");
        let instances = &apps.applications[0].instances;
        assert_eq!(instances[0].action_type, Some(ActionType::Other));
        assert_eq!(instances[1].action_type, Some(ActionType::Other));
        assert_eq!(instances[0].http_port(), Some(8080), "a bare port number");
        assert_eq!(
            instances[0].secure_port.as_ref().and_then(|p| p.number),
            Some(8443)
        );
    }

    #[test]
    fn odd_metadata_and_ports_are_read_without_failing() {
        let apps = decode_applications(
            br#"{"applications":{"application":{"name":"A","instance":[
                {"instanceId":"a-1","metadata":{"@class":"x","zone":"a","n":3,"on":true,"nested":{"k":"v"},"list":[1]},
                 "port":{"$":"8080","@enabled":"false","extra":{}},"securePort":null},
                {"instanceId":"a-2","metadata":"","port":[8080],"securePort":true},
                {"instanceId":"a-3","metadata":null,"port":{"@enabled":"true"}}]}}}"#,
        )
        .expect("decodes");
        let [one, two, three] = &apps.applications[0].instances[..] else {
            panic!("three instances");
        };
        assert_eq!(
            one.metadata,
            compact_metadata([
                ("n".into(), "3".into()),
                ("on".into(), "true".into()),
                ("zone".into(), "a".into()),
            ]),
            "type hints and values that are not scalars are left out"
        );
        assert_eq!(
            one.port,
            Some(PortInfo {
                number: Some(8080),
                enabled: Some(false)
            })
        );
        assert_eq!(one.http_port(), None, "disabled");
        assert!(one.secure_port.is_none());
        assert!(two.metadata.is_empty());
        assert_eq!(two.port, Some(PortInfo::default()));
        assert_eq!(two.secure_port, Some(PortInfo::default()));
        assert!(three.metadata.is_empty());
        assert_eq!(three.http_port(), None, "no number");
    }

    #[test]
    fn status_names_parse_like_eureka() {
        for status in [
            Status::Up,
            Status::Down,
            Status::Starting,
            Status::OutOfService,
            Status::Unknown,
        ] {
            assert_eq!(Status::parse(status.as_str()), status);
        }
        assert_eq!(Status::parse(" out_of_service "), Status::OutOfService);
        assert_eq!(Status::parse("SLEEPING"), Status::Unknown);
    }
}
