//! The JSON bodies of the Nacos 2.x requests this client sends and the responses and
//! server requests it reads, with the Java class names that go into `Metadata.type`.
//!
//! Requests are built as JSON values (the server ignores fields it does not know and
//! fills the ones left out); responses are decoded leniently: every field has a default,
//! and an instance that does not decode is kept as an error for the selection to report
//! ([`HostEntry`]), so one odd entry never loses its service. Instances are decoded into
//! typed values as the answer is read: no JSON tree of a service is kept or cloned.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};

/// The request kinds, by the Java simple class name the server dispatches on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    ServerCheck,
    HealthCheck,
    Subscribe,
    Unsubscribe,
    ServiceList,
    ServiceQuery,
}

impl Kind {
    /// `Metadata.type` of the request.
    pub fn type_name(self) -> &'static str {
        match self {
            Self::ServerCheck => "ServerCheckRequest",
            Self::HealthCheck => "HealthCheckRequest",
            Self::Subscribe | Self::Unsubscribe => "SubscribeServiceRequest",
            Self::ServiceList => "ServiceListRequest",
            Self::ServiceQuery => "ServiceQueryRequest",
        }
    }

    /// The `endpoint` label of `registry_requests_total`.
    pub fn as_label(self) -> &'static str {
        match self {
            Self::ServerCheck => "server_check",
            Self::HealthCheck => "health_check",
            Self::Subscribe => "subscribe",
            Self::Unsubscribe => "unsubscribe",
            Self::ServiceList => "service_list",
            Self::ServiceQuery => "service_query",
        }
    }
}

/// `ConnectionSetupRequest`, the first message on the bi stream. An (empty)
/// `abilityTable` marks a client that negotiates abilities: the server then answers with
/// a `SetupAckRequest` once it registered the connection, which is how the client knows
/// requests may start (and, grpc-java sending headers only with a first message, what
/// makes the stream's response start at all). No ability is needed for reading.
pub const CONNECTION_SETUP: &str = "ConnectionSetupRequest";
/// Server → client requests this client understands.
pub const NOTIFY_SUBSCRIBER: &str = "NotifySubscriberRequest";
pub const CLIENT_DETECTION: &str = "ClientDetectionRequest";
pub const CONNECT_RESET: &str = "ConnectResetRequest";
pub const SETUP_ACK: &str = "SetupAckRequest";
/// What the server answers a request with when it failed before any handler ran.
pub const ERROR_RESPONSE: &str = "ErrorResponse";
/// `errorCode` of a request on a connection the server has not (yet, or any more)
/// registered (`NacosException.UN_REGISTER`).
pub const UNREGISTERED: i64 = 301;

/// The version string the server logs and shows for this client.
pub const CLIENT_VERSION: &str = concat!("registry-connector:v", env!("CARGO_PKG_VERSION"));

pub fn server_check() -> Value {
    json!({"headers": {}, "module": "internal"})
}

pub fn health_check() -> Value {
    json!({"headers": {}, "module": "internal"})
}

pub fn connection_setup(namespace: &str) -> Value {
    json!({
        "headers": {},
        "clientVersion": CLIENT_VERSION,
        "tenant": namespace,
        "labels": {"source": "sdk", "module": "naming"},
        "abilityTable": {},
        "module": "internal",
    })
}

/// `SubscribeServiceRequest` (`subscribe: false` ends the subscription). Clusters stay
/// empty: the whole service is read and clusters are filtered locally.
pub fn subscribe(namespace: &str, group: &str, service: &str, subscribe: bool) -> Value {
    json!({
        "headers": {},
        "namespace": namespace,
        "groupName": group,
        "serviceName": service,
        "subscribe": subscribe,
        "clusters": "",
        "module": "naming",
    })
}

/// `ServiceListRequest`; `page_no` is 1-based.
pub fn service_list(namespace: &str, group: &str, page_no: u32, page_size: u32) -> Value {
    json!({
        "headers": {},
        "namespace": namespace,
        "groupName": group,
        "pageNo": page_no,
        "pageSize": page_size,
        "module": "naming",
    })
}

/// `ServiceQueryRequest`: one read of a service without subscribing (`healthyOnly`
/// false: the connector decides readiness).
pub fn service_query(namespace: &str, group: &str, service: &str) -> Value {
    json!({
        "headers": {},
        "namespace": namespace,
        "groupName": group,
        "serviceName": service,
        "cluster": "",
        "healthyOnly": false,
        "udpPort": 0,
        "module": "naming",
    })
}

/// The answer to a server request: `{resultCode: 200, requestId}` under the type
/// `response_type` (`NotifySubscriberResponse`, ...).
pub fn ack(request_id: &str) -> Value {
    json!({"resultCode": 200, "errorCode": 0, "success": true, "requestId": request_id})
}

/// The response type that answers the server request `request_type`.
pub fn response_type(request_type: &str) -> Option<&'static str> {
    match request_type {
        NOTIFY_SUBSCRIBER => Some("NotifySubscriberResponse"),
        CLIENT_DETECTION => Some("ClientDetectionResponse"),
        CONNECT_RESET => Some("ConnectResetResponse"),
        _ => None,
    }
}

/// The fields every Nacos response has.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Status {
    pub result_code: i64,
    pub error_code: i64,
    pub message: Option<String>,
    pub request_id: Option<String>,
}

impl Status {
    pub fn is_ok(&self) -> bool {
        self.result_code == 200
    }
}

/// `ServerCheckResponse`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServerCheckResponse {
    pub connection_id: String,
}

/// `SubscribeServiceResponse`, `QueryServiceResponse`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceInfoResponse {
    pub service_info: Option<ServiceInfo>,
}

/// `ServiceListResponse`. Its `count` is the group's total at the time of that request
/// (Nacos 2.3.2 sets it to the size of the set the page is cut from); pages are read
/// until one comes back short all the same, the set changing between two requests.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceListResponse {
    pub count: i64,
    pub service_names: Vec<String>,
}

/// A server request's own fields (`requestId`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServerRequest {
    pub request_id: String,
}

/// `NotifySubscriberRequest`: a whole service after a change.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NotifySubscriber {
    pub request_id: String,
    pub namespace: Option<String>,
    pub service_name: Option<String>,
    pub group_name: Option<String>,
    pub service_info: Option<ServiceInfo>,
}

/// A service as Nacos sends it: always every instance (the server already dropped the
/// disabled ones; with `reachProtectionThreshold` it reports unhealthy ones as healthy).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceInfo {
    /// `GROUP@@name` or `name`.
    pub name: String,
    pub group_name: Option<String>,
    pub clusters: Option<String>,
    pub hosts: Vec<HostEntry>,
    pub last_ref_time: i64,
    pub reach_protection_threshold: bool,
}

/// One element of `hosts`: the instance, or why it did not decode (with the start of
/// its JSON). Decoding it never fails, so one odd element does not lose the service.
#[derive(Debug, Clone, PartialEq)]
pub struct HostEntry(pub Result<Host, String>);

impl<'de> Deserialize<'de> for HostEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // The element's tree lives only while its own instance is decoded from it.
        let value = Value::deserialize(d)?;
        Ok(Self(Host::deserialize(&value).map_err(|e| {
            let text = value.to_string();
            let cut: String = text.chars().take(120).collect();
            format!("{e} in {cut}")
        })))
    }
}

/// One instance of a [`ServiceInfo`].
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Host {
    pub instance_id: Option<String>,
    pub ip: Option<String>,
    pub port: Option<i64>,
    pub weight: Option<f64>,
    pub healthy: Option<bool>,
    pub enabled: Option<bool>,
    pub ephemeral: Option<bool>,
    pub cluster_name: Option<String>,
    #[serde(deserialize_with = "string_map")]
    pub metadata: BTreeMap<String, String>,
}

impl Host {
    /// What names the instance in logs: its id, else `ip#port#cluster`.
    pub fn id(&self) -> String {
        match &self.instance_id {
            Some(id) if !id.is_empty() => id.clone(),
            _ => format!(
                "{}#{}#{}",
                self.ip.as_deref().unwrap_or(""),
                self.port.unwrap_or(0),
                self.cluster_name.as_deref().unwrap_or("")
            ),
        }
    }

    pub fn cluster(&self) -> &str {
        self.cluster_name
            .as_deref()
            .filter(|c| !c.is_empty())
            .unwrap_or("DEFAULT")
    }
}

/// Metadata values as strings: Nacos's are, but a number or `null` sent by an odd
/// client is kept as its JSON text rather than losing the instance.
fn string_map<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let raw: Option<BTreeMap<String, Value>> = Option::deserialize(d)?;
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s,
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (k, v)
        })
        .collect())
}

impl ServiceInfo {
    /// The instances, each decoded on its own: `Err` for one that is not an instance.
    pub fn instances(&self) -> impl Iterator<Item = Result<&Host, &str>> + '_ {
        self.hosts
            .iter()
            .map(|entry| entry.0.as_ref().map_err(String::as_str))
    }

    /// Group and plain name, from `groupName` and `name` (`GROUP@@name`).
    pub fn group_and_name(&self) -> (Option<&str>, &str) {
        match self.name.split_once("@@") {
            Some((group, name)) => (Some(group), name),
            None => (self.group_name.as_deref(), self.name.as_str()),
        }
    }
}

/// The plain service name of a listed `GROUP@@name` (Nacos 2.x lists grouped names).
pub fn plain_name(listed: &str) -> &str {
    listed.split_once("@@").map_or(listed, |(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_the_fields_the_server_reads() {
        assert_eq!(
            subscribe("public", "G1", "orders", true),
            json!({"headers": {}, "namespace": "public", "groupName": "G1", "serviceName": "orders",
                   "subscribe": true, "clusters": "", "module": "naming"})
        );
        assert_eq!(subscribe("ns", "G", "s", false)["subscribe"], json!(false));
        assert_eq!(
            service_list("public", "DEFAULT_GROUP", 2, 500),
            json!({"headers": {}, "namespace": "public", "groupName": "DEFAULT_GROUP", "pageNo": 2,
                   "pageSize": 500, "module": "naming"})
        );
        let q = service_query("public", "G", "s");
        assert_eq!(q["healthyOnly"], json!(false));
        assert_eq!(q["serviceName"], json!("s"));
        let setup = connection_setup("dev");
        assert_eq!(setup["tenant"], json!("dev"));
        assert_eq!(
            setup["labels"],
            json!({"source": "sdk", "module": "naming"})
        );
        assert!(setup["clientVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("registry-connector:v")));
        assert_eq!(server_check()["module"], json!("internal"));
        assert_eq!(health_check()["module"], json!("internal"));
        assert_eq!(
            ack("42"),
            json!({"resultCode": 200, "errorCode": 0, "success": true, "requestId": "42"})
        );
        assert_eq!(
            response_type(NOTIFY_SUBSCRIBER),
            Some("NotifySubscriberResponse")
        );
        assert_eq!(
            response_type(CLIENT_DETECTION),
            Some("ClientDetectionResponse")
        );
        assert_eq!(response_type(CONNECT_RESET), Some("ConnectResetResponse"));
        assert_eq!(
            response_type(SETUP_ACK),
            None,
            "the setup ack is not answered"
        );
        assert_eq!(Kind::Unsubscribe.type_name(), "SubscribeServiceRequest");
    }

    #[test]
    fn responses_decode_with_their_status() {
        let check: ServerCheckResponse = serde_json::from_str(
            r#"{"resultCode":200,"errorCode":0,"message":null,"requestId":null,
                "connectionId":"1796349500123_127.0.0.1_40000","supportAbilityNegotiation":true,"success":true}"#,
        )
        .expect("decodes");
        assert_eq!(check.connection_id, "1796349500123_127.0.0.1_40000");
        let status: Status = serde_json::from_str(
            r#"{"resultCode":500,"errorCode":301,"message":"Connection is unregistered.","requestId":null,"success":false}"#,
        )
        .expect("decodes");
        assert!(!status.is_ok());
        assert_eq!(status.error_code, UNREGISTERED);
        let list: ServiceListResponse = serde_json::from_str(
            r#"{"resultCode":200,"errorCode":0,"count":2,"serviceNames":["G1@@a","b"],"success":true}"#,
        )
        .expect("decodes");
        let names: Vec<&str> = list.service_names.iter().map(|n| plain_name(n)).collect();
        assert_eq!(names, ["a", "b"]);
    }

    /// A push as the test environment's Nacos 2.3.2 sent it (the bi stream's body,
    /// captured with `RUST_LOG=registry_connector::registry::nacos=trace`).
    pub const CAPTURED_PUSH: &str = r#"{"headers":{},"requestId":"2","serviceInfo":{"name":"orders","groupName":"G1","clusters":"","cacheMillis":10000,"hosts":[{"instanceId":"192.0.2.16#8080#DEFAULT#G1@@orders","ip":"192.0.2.16","port":8080,"weight":1.0,"healthy":true,"enabled":true,"ephemeral":true,"clusterName":"DEFAULT","serviceName":"G1@@orders","metadata":{"preserved.heart.beat.timeout":"3600000","preserved.ip.delete.timeout":"3600000"},"instanceHeartBeatInterval":5000,"instanceHeartBeatTimeOut":3600000,"ipDeleteTimeout":3600000}],"lastRefTime":1796350945377,"checksum":"","allIPs":false,"reachProtectionThreshold":false,"valid":true},"module":"naming"}"#;

    #[test]
    fn a_captured_push_decodes_whole() {
        let push: NotifySubscriber = serde_json::from_str(CAPTURED_PUSH).expect("decodes");
        assert_eq!(push.request_id, "2");
        let info = push.service_info.expect("service info");
        assert_eq!(info.group_and_name(), (Some("G1"), "orders"));
        assert_eq!(info.last_ref_time, 1796350945377);
        let hosts: Vec<&Host> = info.instances().map(|h| h.expect("host")).collect();
        assert_eq!(hosts.len(), 1);
        let h = &hosts[0];
        assert_eq!(h.ip.as_deref(), Some("192.0.2.16"));
        assert_eq!(h.port, Some(8080));
        assert_eq!(h.weight, Some(1.0));
        assert_eq!((h.healthy, h.enabled), (Some(true), Some(true)));
        assert_eq!(h.cluster(), "DEFAULT");
        assert_eq!(h.id(), "192.0.2.16#8080#DEFAULT#G1@@orders");
        assert_eq!(
            h.metadata
                .get("preserved.ip.delete.timeout")
                .map(String::as_str),
            Some("3600000")
        );
    }

    #[test]
    fn odd_instances_are_errors_of_their_own() {
        let info: ServiceInfo = serde_json::from_str(
            r#"{"name":"G@@s","hosts":[{"ip":"192.0.2.1","port":"eighty"},{"ip":"192.0.2.2","port":80,"metadata":{"n":1,"z":null}}, 7]}"#,
        )
        .expect("the service decodes");
        let all: Vec<Result<&Host, &str>> = info.instances().collect();
        assert!(all[0].is_err_and(|why| why.contains("eighty")));
        let ok = all[1].expect("decodes");
        assert_eq!(ok.metadata.get("n").map(String::as_str), Some("1"));
        assert_eq!(ok.metadata.get("z").map(String::as_str), Some(""));
        assert!(all[2].is_err());
        assert_eq!(info.group_and_name(), (Some("G"), "s"));
    }
}
