//! The two protobuf messages of Nacos 2.x's gRPC API (`nacos_grpc_service.proto`), by hand.
//!
//! Nacos wraps every request and response in one `Payload`: `metadata.type` names the Java
//! class (`SubscribeServiceRequest`), `body.value` holds its JSON (the `Any`'s `type_url`
//! stays empty), and `metadata.headers` carries what the Java client keeps in the request's
//! headers (the `accessToken`). Three RPCs, none in a proto package:
//! `/Request/request` (unary), `/BiRequestStream/requestBiStream` (the connection's
//! push channel) and `/RequestStream/requestStream` (unused). Written out here so that the
//! build needs no `protoc` and no generated code for two messages of three fields.

use std::collections::HashMap;

use http::uri::PathAndQuery;

/// `/Request/request`: one request, one response.
pub const UNARY_PATH: &str = "/Request/request";
/// `/BiRequestStream/requestBiStream`: the connection's bidirectional stream.
pub const BI_STREAM_PATH: &str = "/BiRequestStream/requestBiStream";

/// `Metadata`: the body's type and the request headers.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metadata {
    #[prost(string, tag = "3")]
    pub r#type: String,
    #[prost(string, tag = "8")]
    pub client_ip: String,
    #[prost(map = "string, string", tag = "7")]
    pub headers: HashMap<String, String>,
}

/// `google.protobuf.Any`, inlined: Nacos leaves `type_url` empty and puts JSON in `value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Any {
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// `Payload`: what every Nacos RPC sends and receives.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<Metadata>,
    #[prost(message, optional, tag = "3")]
    pub body: Option<Any>,
}

impl Payload {
    /// A payload of type `kind` with the JSON `body` and `headers`.
    pub fn new(kind: &str, body: &serde_json::Value, headers: HashMap<String, String>) -> Self {
        Self {
            metadata: Some(Metadata {
                r#type: kind.to_string(),
                client_ip: String::new(),
                headers,
            }),
            body: Some(Any {
                type_url: String::new(),
                value: serde_json::to_vec(body).unwrap_or_default(),
            }),
        }
    }

    /// The Java class name of the body (`""` when the server sent none).
    pub fn kind(&self) -> &str {
        self.metadata.as_ref().map_or("", |m| m.r#type.as_str())
    }

    /// The body's JSON bytes.
    pub fn json(&self) -> &[u8] {
        self.body.as_ref().map_or(&[], |b| b.value.as_slice())
    }
}

/// The codec of every Nacos RPC.
pub fn codec() -> tonic_prost::ProstCodec<Payload, Payload> {
    tonic_prost::ProstCodec::default()
}

pub fn path(path: &'static str) -> PathAndQuery {
    PathAndQuery::from_static(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn a_payload_encodes_as_nacos_expects() {
        let p = Payload::new(
            "HealthCheckRequest",
            &serde_json::json!({"module": "internal"}),
            HashMap::from([("accessToken".to_string(), "t".to_string())]),
        );
        let bytes = p.encode_to_vec();
        // Field 2 (metadata) first, then field 3 (body), both length-delimited.
        assert_eq!(bytes[0], 2 << 3 | 2);
        let back = Payload::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(back.kind(), "HealthCheckRequest");
        assert_eq!(back.json(), br#"{"module":"internal"}"#);
        assert_eq!(back, p);
        // An empty payload is harmless.
        assert_eq!(Payload::default().kind(), "");
        assert!(Payload::default().json().is_empty());
    }

    #[test]
    fn decodes_bytes_as_protoc_would_write_them() {
        // metadata { type: "X" (3), headers {"k": "v"} (7), clientIp "1" (8) }, body { value "{}" (2) }
        let metadata: &[u8] = &[
            0x1a, 1, b'X', 0x3a, 6, 0x0a, 1, b'k', 0x12, 1, b'v', 0x42, 1, b'1',
        ];
        let mut bytes = vec![0x12, metadata.len() as u8];
        bytes.extend_from_slice(metadata);
        bytes.extend_from_slice(&[0x1a, 4, 0x12, 2, b'{', b'}']);
        let p = Payload::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(p.kind(), "X");
        let m = p.metadata.as_ref().expect("metadata");
        assert_eq!(m.client_ip, "1");
        assert_eq!(m.headers.get("k").map(String::as_str), Some("v"));
        assert_eq!(p.json(), b"{}");
    }
}
