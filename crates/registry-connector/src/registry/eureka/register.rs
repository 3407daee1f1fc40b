//! The Eureka form of an exported instance, both ways: the registration body built from
//! an [`Instance`], and the [`Instance`] read back from `GET /apps`. Pure functions.
//!
//! Both directions live side by side because they must agree exactly: the export engine
//! compares what it wants with what [`decode`] returns, so any field written here and
//! read back differently would make every resync write again. What is read back is
//! decoded into the source's own [`api::Instance`] (one type for one payload, so that
//! both directions read Eureka's answers alike, leniently); only its mapping to the
//! neutral [`Instance`] is here. Eureka has no tags and
//! no per-instance port list, so those go into the metadata map under the reserved
//! [`meta_keys`], together with the ownership proof (this connector's id and
//! `external-source=kubernetes`), which is how [`owned`] tells our entries from everybody
//! else's.
//!
//! Addresses: for an IP, `ipAddr` and `hostName` are both the IP. For a DNS name
//! (ExternalName Services, load balancers with a hostname) `hostName` is the name and
//! `ipAddr` is the name too: Eureka stores `ipAddr` as plain text, and whichever field a
//! client connects to (`hostName` by default, `ipAddr` with `preferIpAddress`) then
//! reaches the right target. No IP would be right: the name's addresses change without
//! the connector seeing it, and a placeholder such as `0.0.0.0` sends traffic to the
//! client's own host. This connector's own Eureka source never reads these entries back
//! (it skips `external-source=kubernetes`).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};

use super::api::{self, Application, Status};
use crate::export::model::{meta_keys, Health, Instance, ServiceKey};
use crate::registry::metadata::MetadataLookup;

/// Eureka's data-center class for instances outside AWS.
pub const DATA_CENTER_CLASS: &str = "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo";

/// The lease a registration asks for, in whole seconds as Eureka stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// How often this connector renews (`leaseInfo.renewalIntervalInSecs`).
    pub renewal_secs: u64,
    /// After how long without a renewal the server evicts (`leaseInfo.durationInSecs`).
    pub duration_secs: u64,
}

/// The application an instance goes to: Eureka upper-cases application names.
pub fn app_name(service: &str) -> String {
    service.to_uppercase()
}

/// The VIP address clients look the application up by (Spring Cloud's
/// `DiscoveryClient.getInstances(serviceId)` asks for it): the lowercased name.
pub fn vip_address(service: &str) -> String {
    service.to_lowercase()
}

/// The Eureka status shown for `health`.
pub fn status(health: Health) -> Status {
    match health {
        Health::Passing => Status::Up,
        Health::Critical => Status::OutOfService,
    }
}

/// The health read back from a status: only `UP` serves traffic (Eureka clients filter
/// on it), so every other status reads as critical.
pub fn health(status: Status) -> Health {
    match status {
        Status::Up => Health::Passing,
        _ => Health::Critical,
    }
}

/// Whether an instance came from Kubernetes (registered by any registry-connector):
/// the Eureka source skips these, so that `both` mode does not loop.
pub fn is_exported(metadata: &impl MetadataLookup) -> bool {
    crate::registry::metadata::is_from_kubernetes(metadata)
}

/// Whether an instance is this connector's: exported, and naming `connector_id`.
pub fn is_owned(metadata: &impl MetadataLookup, connector_id: &str) -> bool {
    is_exported(metadata) && metadata.value(meta_keys::CONNECTOR) == Some(connector_id)
}

/// The metadata map of a registration: the instance's own entries, the ownership keys,
/// one `port-<name>` per port and the tags comma-joined (when there are any).
pub fn metadata(instance: &Instance, connector_id: &str) -> BTreeMap<String, String> {
    let mut out = instance.meta.clone();
    out.insert(meta_keys::SOURCE.into(), meta_keys::SOURCE_VALUE.into());
    out.insert(
        meta_keys::NAMESPACE.into(),
        instance.source.namespace.clone(),
    );
    out.insert(meta_keys::SERVICE.into(), instance.source.name.clone());
    out.insert(meta_keys::CONNECTOR.into(), connector_id.into());
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

/// The body of `POST /apps/{APP}`: `{"instance": {...}}`.
///
/// A critical instance is registered `OUT_OF_SERVICE` *with* an `overriddenStatus` of
/// `OUT_OF_SERVICE`: the server then keeps the override across re-registrations and
/// lease renewals, and removing it (`DELETE .../status?value=UP`) is what brings the
/// instance up. `last_dirty` must be newer than the server's copy, or the server keeps
/// its copy and ignores the registration.
pub fn registration(
    instance: &Instance,
    connector_id: &str,
    lease: Lease,
    last_dirty: i64,
) -> Value {
    let service = &instance.service;
    let status = status(instance.health);
    let metadata: Map<String, Value> = metadata(instance, connector_id)
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let mut body = json!({
        "instanceId": instance.id,
        "app": app_name(service),
        "hostName": instance.address,
        "ipAddr": instance.address,
        "status": status.as_str(),
        "port": {"$": instance.port, "@enabled": "true"},
        "securePort": {"$": 443, "@enabled": "false"},
        "vipAddress": vip_address(service),
        "secureVipAddress": vip_address(service),
        "dataCenterInfo": {"@class": DATA_CENTER_CLASS, "name": "MyOwn"},
        "leaseInfo": {
            "renewalIntervalInSecs": lease.renewal_secs,
            "durationInSecs": lease.duration_secs,
        },
        "metadata": metadata,
        "lastDirtyTimestamp": last_dirty.to_string(),
    });
    if instance.health == Health::Critical {
        if let Some(object) = body.as_object_mut() {
            object.insert(
                "overriddenStatus".into(),
                Value::String(Status::OutOfService.as_str().into()),
            );
        }
    }
    json!({ "instance": body })
}

/// The [`Instance`] an entry of `app` stands for, `None` without an id. Fields that do
/// not decode (a port out of range, a missing source key) come back as values no
/// desired instance has, so that the entry is written again rather than kept broken.
pub fn decode(app: &str, entry: &api::Instance) -> Option<Instance> {
    let id = entry.id()?.to_string();
    let meta = &entry.metadata;
    let text = |key: &str| meta.value(key).unwrap_or_default().to_string();
    let address = [&entry.host_name, &entry.ip_addr]
        .into_iter()
        .filter_map(|v| v.as_deref())
        .map(str::trim)
        .find(|v| !v.is_empty())
        .unwrap_or_default()
        .to_string();
    let port = entry
        .http_port()
        .and_then(|n| u16::try_from(n).ok())
        .unwrap_or(0);
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
        .filter(|(k, _)| !meta_keys::is_reserved(k))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Some(Instance {
        id,
        service: app.to_string(),
        source: ServiceKey::new(text(meta_keys::NAMESPACE), text(meta_keys::SERVICE)),
        address,
        port,
        ports,
        health: health(entry.status),
        tags,
        meta: extra,
    })
}

/// An instance this connector owns, as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owned {
    /// The application (as the server spells it).
    pub app: String,
    pub instance: Instance,
    /// The server's `lastDirtyTimestamp`, sent back with every renewal.
    pub last_dirty: Option<i64>,
}

/// The instances `connector_id` owns in `apps`, and the applications that also hold
/// instances it does not own (left untouched, reported).
pub fn owned(apps: &[Application], connector_id: &str) -> (Vec<Owned>, BTreeSet<String>) {
    let mut out = Vec::new();
    let mut shared = BTreeSet::new();
    for app in apps {
        let mut ours = 0usize;
        let mut theirs = 0usize;
        for entry in &app.instances {
            if !is_owned(&entry.metadata, connector_id) {
                theirs += 1;
                continue;
            }
            // An owned entry without an id cannot be addressed (nor renewed, nor
            // removed): Eureka itself files instances under an id.
            let Some(instance) = decode(&app.name, entry) else {
                theirs += 1;
                continue;
            };
            ours += 1;
            out.push(Owned {
                app: app.name.clone(),
                instance,
                last_dirty: entry.last_dirty_timestamp,
            });
        }
        if ours > 0 && theirs > 0 {
            shared.insert(app.name.clone());
        }
    }
    (out, shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONNECTOR: &str = "rc-test";

    fn instance(health: Health) -> Instance {
        Instance {
            id: "web-0123456789ab".into(),
            service: "WEB".into(),
            source: ServiceKey::new("shop", "web"),
            address: "192.0.2.10".into(),
            port: 8080,
            ports: [("http".to_string(), 8080), ("admin".to_string(), 9090)]
                .into_iter()
                .collect(),
            health,
            tags: vec!["blue".into(), "v2".into()],
            meta: [("team".to_string(), "shop".to_string())]
                .into_iter()
                .collect(),
        }
    }

    const LEASE: Lease = Lease {
        renewal_secs: 30,
        duration_secs: 90,
    };

    /// What the server answers in `GET /apps` for a registration body: the body's
    /// instance with the fields the server adds.
    fn as_served(body: &Value, status: &str) -> api::Instance {
        let mut instance = body["instance"].clone();
        let object = instance.as_object_mut().expect("an object");
        object.insert("status".into(), json!(status));
        object.insert("countryId".into(), json!(1));
        object.insert("actionType".into(), json!("ADDED"));
        object.insert("lastUpdatedTimestamp".into(), json!("1796244877053"));
        serde_json::from_value(instance).expect("decodes")
    }

    #[test]
    fn the_registration_body_is_what_eureka_expects() {
        let body = registration(
            &instance(Health::Passing),
            CONNECTOR,
            LEASE,
            1_700_000_000_123,
        );
        let i = &body["instance"];
        assert_eq!(i["instanceId"], "web-0123456789ab");
        assert_eq!(i["app"], "WEB");
        assert_eq!(i["hostName"], "192.0.2.10");
        assert_eq!(i["ipAddr"], "192.0.2.10");
        assert_eq!(i["status"], "UP");
        assert!(i.get("overriddenStatus").is_none());
        assert_eq!(i["port"], json!({"$": 8080, "@enabled": "true"}));
        assert_eq!(i["securePort"]["@enabled"], "false");
        assert_eq!(i["vipAddress"], "web");
        assert_eq!(i["dataCenterInfo"]["name"], "MyOwn");
        assert_eq!(i["dataCenterInfo"]["@class"], DATA_CENTER_CLASS);
        assert_eq!(
            i["leaseInfo"],
            json!({"renewalIntervalInSecs": 30, "durationInSecs": 90})
        );
        assert_eq!(i["lastDirtyTimestamp"], "1700000000123");
        assert_eq!(
            i["metadata"],
            json!({
                "team": "shop",
                "external-source": "kubernetes",
                "external-k8s-ns": "shop",
                "external-k8s-name": "web",
                "registry-connector-id": CONNECTOR,
                "port-http": "8080",
                "port-admin": "9090",
                "external-k8s-tags": "blue,v2",
            })
        );

        let critical = registration(&instance(Health::Critical), CONNECTOR, LEASE, 1);
        assert_eq!(critical["instance"]["status"], "OUT_OF_SERVICE");
        assert_eq!(critical["instance"]["overriddenStatus"], "OUT_OF_SERVICE");

        let untagged = Instance {
            tags: vec![],
            ..instance(Health::Passing)
        };
        let body = registration(&untagged, CONNECTOR, LEASE, 1);
        assert!(body["instance"]["metadata"].get(meta_keys::TAGS).is_none());
    }

    /// The whole body Eureka receives, byte for byte as serialized: any change to it
    /// is a change to what every Eureka server and client sees.
    #[test]
    fn the_registration_json_is_pinned() {
        let up = registration(
            &instance(Health::Passing),
            CONNECTOR,
            LEASE,
            1_700_000_000_123,
        );
        assert_eq!(
            serde_json::to_string(&up).expect("serializes"),
            concat!(
                r#"{"instance":{"app":"WEB","dataCenterInfo":{"@class":"com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo","name":"MyOwn"},"#,
                r#""hostName":"192.0.2.10","instanceId":"web-0123456789ab","ipAddr":"192.0.2.10","#,
                r#""lastDirtyTimestamp":"1700000000123","leaseInfo":{"durationInSecs":90,"renewalIntervalInSecs":30},"#,
                r#""metadata":{"external-k8s-name":"web","external-k8s-ns":"shop","external-k8s-tags":"blue,v2","#,
                r#""external-source":"kubernetes","port-admin":"9090","port-http":"8080","registry-connector-id":"rc-test","team":"shop"},"#,
                r#""port":{"$":8080,"@enabled":"true"},"securePort":{"$":443,"@enabled":"false"},"#,
                r#""secureVipAddress":"web","status":"UP","vipAddress":"web"}}"#,
            )
        );
        let critical = registration(&instance(Health::Critical), CONNECTOR, LEASE, 7);
        let text = serde_json::to_string(&critical).expect("serializes");
        assert!(
            text.contains(r#""overriddenStatus":"OUT_OF_SERVICE","port""#)
                && text.contains(r#""status":"OUT_OF_SERVICE","vipAddress""#),
            "{text}"
        );
    }

    #[test]
    fn what_is_registered_reads_back_equal() {
        for health in [Health::Passing, Health::Critical] {
            for address in ["192.0.2.10", "2001:db8::10", "legacy.example.com"] {
                let want = Instance {
                    address: address.into(),
                    ..instance(health)
                };
                let body = registration(&want, CONNECTOR, LEASE, 42);
                let served = as_served(&body, status(health).as_str());
                assert_eq!(served.last_dirty_timestamp, Some(42));
                let got = decode("WEB", &served).expect("has an id");
                assert_eq!(got, want, "{address} {health:?}");
            }
        }
        // No tags, no ports, no metadata of its own.
        let bare = Instance {
            tags: vec![],
            ports: BTreeMap::new(),
            meta: BTreeMap::new(),
            ..instance(Health::Passing)
        };
        let served = as_served(&registration(&bare, CONNECTOR, LEASE, 1), "UP");
        assert_eq!(decode("WEB", &served), Some(bare));
    }

    #[test]
    fn the_server_json_decodes_leniently() {
        let body = br#"{"applications":{"versions__delta":"1","apps__hashcode":"UP_1_",
            "application":{"name":"WEB","instance":{
                "instanceId":"web-1","hostName":"192.0.2.1","app":"WEB","ipAddr":"192.0.2.1",
                "status":"OUT_OF_SERVICE","overriddenStatus":"OUT_OF_SERVICE",
                "port":{"$":"8080","@enabled":"true"},
                "metadata":{"external-source":"kubernetes","registry-connector-id":"rc-test",
                    "external-k8s-ns":"shop","external-k8s-name":"web","port-http":"8080"},
                "lastDirtyTimestamp":"1796244877035"}}}}"#;
        let apps = api::decode_applications(body)
            .expect("decodes")
            .applications;
        assert_eq!(apps.len(), 1);
        let entry = &apps[0].instances[0];
        assert_eq!(entry.last_dirty_timestamp, Some(1_796_244_877_035));
        let got = decode("WEB", entry).expect("decodes");
        assert_eq!(got.health, Health::Critical);
        assert_eq!(got.port, 8080);
        assert_eq!(got.source, ServiceKey::new("shop", "web"));
        // An empty registry.
        let empty =
            br#"{"applications":{"versions__delta":"1","apps__hashcode":"","application":[]}}"#;
        assert!(api::decode_applications(empty)
            .expect("decodes")
            .applications
            .is_empty());
        // Statuses other than UP and OUT_OF_SERVICE serve no traffic either.
        let down = api::Instance {
            status: Status::Down,
            ..entry.clone()
        };
        assert_eq!(
            decode("WEB", &down).map(|i| i.health),
            Some(Health::Critical)
        );
    }

    fn entry(id: &str, meta: &[(&str, &str)]) -> api::Instance {
        api::Instance {
            instance_id: Some(id.into()),
            host_name: Some("192.0.2.1".into()),
            ip_addr: Some("192.0.2.1".into()),
            status: Status::Up,
            port: Some(api::PortInfo {
                number: Some(80),
                enabled: Some(true),
            }),
            metadata: crate::registry::metadata::compact_metadata(
                meta.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            ),
            last_dirty_timestamp: Some(7),
            ..api::Instance::default()
        }
    }

    #[test]
    fn only_entries_naming_this_connector_are_owned() {
        let ours: &[(&str, &str)] = &[
            ("external-source", "kubernetes"),
            ("registry-connector-id", CONNECTOR),
            ("external-k8s-ns", "shop"),
            ("external-k8s-name", "web"),
        ];
        let other_connector: &[(&str, &str)] = &[
            ("external-source", "kubernetes"),
            ("registry-connector-id", "someone-else"),
        ];
        let not_from_kubernetes: &[(&str, &str)] = &[
            ("external-source", "vm"),
            ("registry-connector-id", CONNECTOR),
        ];
        let apps = vec![
            Application {
                name: "WEB".into(),
                instances: vec![entry("w-1", ours), entry("w-2", &[])],
            },
            Application {
                name: "PAY".into(),
                instances: vec![entry("p-1", ours), entry("p-2", ours)],
            },
            Application {
                name: "VM".into(),
                instances: vec![
                    entry("v-1", &[]),
                    entry("v-2", other_connector),
                    entry("v-3", not_from_kubernetes),
                ],
            },
        ];
        let (owned, shared) = owned(&apps, CONNECTOR);
        let ids: Vec<(&str, &str)> = owned
            .iter()
            .map(|o| (o.app.as_str(), o.instance.id.as_str()))
            .collect();
        assert_eq!(ids, vec![("WEB", "w-1"), ("PAY", "p-1"), ("PAY", "p-2")]);
        assert!(owned.iter().all(|o| o.last_dirty == Some(7)));
        assert_eq!(shared, BTreeSet::from(["WEB".to_string()]));

        assert!(is_exported(&entry("x", other_connector).metadata));
        assert!(!is_exported(&entry("x", not_from_kubernetes).metadata));
        assert!(!is_owned(&entry("x", other_connector).metadata, CONNECTOR));
    }

    #[test]
    fn names_follow_eureka() {
        assert_eq!(app_name("web-api"), "WEB-API");
        assert_eq!(vip_address("WEB-API"), "web-api");
        assert_eq!(status(Health::Passing).as_str(), "UP");
        assert_eq!(status(Health::Critical).as_str(), "OUT_OF_SERVICE");
    }
}
