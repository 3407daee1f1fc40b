//! One gRPC connection to a Nacos server, as Nacos 2.x clients open it:
//!
//! 1. a unary `ServerCheckRequest` (the server answers with the connection id);
//! 2. the bi stream, whose first message is a `ConnectionSetupRequest`; the server
//!    registers the connection and says so with a `SetupAckRequest`;
//! 3. unary requests on the same HTTP/2 connection (the server finds the registered
//!    connection by it: requests on any other get error 301).
//!
//! A reader task answers what the server sends on the bi stream at once: a push
//! (`NotifySubscriberRequest`) is acknowledged before it is handed on (the server resends
//! an unacknowledged push after 5 s), `ClientDetectionRequest` is answered, and
//! `ConnectResetRequest` is answered and ends the connection. The connection ends with
//! the stream; the caller opens a new one, which starts with no subscription: they live
//! on the server side of the connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::channel::mpsc as fmpsc;
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tonic::client::Grpc;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, warn};

use super::api::{self, Kind};
use super::error::NacosError;
use super::metrics::NacosMetrics;
use super::proto::{self, Payload};

/// The access token the requests carry (`accessToken` header), shared with the login.
pub type TokenSlot = Arc<RwLock<Option<SecretString>>>;

/// How long `open` waits for the server's `SetupAckRequest` before going on (requests
/// sent before the registration are retried on error 301 anyway).
const SETUP_ACK_WAIT: Duration = Duration::from_secs(3);
/// Retries of a request answered with error 301, 100 ms apart: the short window between
/// the setup request and the server's registration of the connection.
const UNREGISTERED_RETRIES: u32 = 10;
/// The largest message accepted by default. Nacos sends up to 10 MiB (its Java client
/// accepts that much; tonic's own default is 4 MiB): a big service's answer or push must
/// fit, or its subscription fails for good and a push of it kills the stream.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// What the reader hands on.
#[derive(Debug)]
pub enum Inbound {
    /// A whole service after a change (already acknowledged).
    Push(Box<api::NotifySubscriber>),
    /// The stream ended; the connection is gone.
    Closed(String),
}

/// An open, registered connection. Dropping it closes the stream.
pub struct Connection {
    grpc: Grpc<Channel>,
    server: String,
    id: String,
    token: TokenSlot,
    metrics: Arc<NacosMetrics>,
    timeout: Duration,
    last_active: Arc<Mutex<Instant>>,
    /// Cancelled when the stream ends: requests in flight stop at once instead of
    /// retrying error 301 or waiting their timeout on a dead connection.
    closed: CancellationToken,
    reader: tokio::task::JoinHandle<()>,
    /// Kept so the stream stays open while the connection lives.
    _outbound: fmpsc::UnboundedSender<Payload>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.closed.cancel();
        self.reader.abort();
    }
}

impl Connection {
    /// Opens a connection to `server` (`host:grpc_port`) in `namespace`; its pushes and
    /// its end arrive on the returned receiver.
    pub async fn open(
        server: &str,
        namespace: &str,
        token: TokenSlot,
        metrics: Arc<NacosMetrics>,
        timeout: Duration,
        max_message_size: usize,
    ) -> Result<(Self, mpsc::UnboundedReceiver<Inbound>), NacosError> {
        let connect_error = |source| NacosError::Connect {
            server: server.to_string(),
            source,
        };
        let endpoint = Endpoint::from_shared(format!("http://{server}"))
            .map_err(connect_error)?
            .connect_timeout(timeout)
            .tcp_nodelay(true);
        let channel = tokio::time::timeout(timeout, endpoint.connect())
            .await
            .map_err(|_| NacosError::Timeout {
                kind: "connect",
                timeout,
            })?
            .map_err(connect_error)?;
        let (outbound, outbound_rx) = fmpsc::unbounded();
        let (events, events_rx) = mpsc::unbounded_channel();
        let mut conn = Self {
            grpc: Grpc::new(channel).max_decoding_message_size(max_message_size),
            server: server.to_string(),
            id: String::new(),
            token,
            metrics,
            timeout,
            last_active: Arc::new(Mutex::new(Instant::now())),
            closed: CancellationToken::new(),
            reader: tokio::spawn(async {}),
            _outbound: outbound.clone(),
        };
        let check: api::ServerCheckResponse =
            conn.request(Kind::ServerCheck, api::server_check()).await?;
        conn.id = check.connection_id;

        let setup = Payload::new(
            api::CONNECTION_SETUP,
            &api::connection_setup(namespace),
            conn.headers(),
        );
        let _ = outbound.unbounded_send(setup);
        // The stream is opened by the reader: grpc-java sends the response headers only
        // with the server's first message, so awaiting them here would wait for it.
        let (ack_tx, ack_rx) = oneshot::channel();
        conn.reader = tokio::spawn(read(
            conn.grpc.clone(),
            outbound_rx,
            outbound,
            events,
            ack_tx,
            Shared {
                metrics: Arc::clone(&conn.metrics),
                last_active: Arc::clone(&conn.last_active),
                closed: conn.closed.clone(),
            },
        ));
        match tokio::time::timeout(SETUP_ACK_WAIT, ack_rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(why))) => return Err(NacosError::Closed(why)),
            Ok(Err(_)) => return Err(NacosError::Closed("the reader stopped".into())),
            Err(_) => debug!(server, "no SetupAckRequest from Nacos yet; going on"),
        }
        Ok((conn, events_rx))
    }

    /// The server's id of this connection.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    /// Time since the server last sent or answered anything.
    pub fn idle_for(&self) -> Duration {
        self.last_active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }

    /// Completes when the stream has ended (the connection is gone).
    pub fn closed(&self) -> WaitForCancellationFuture<'_> {
        self.closed.cancelled()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Sends one request and decodes its answer, counted under `kind`. Error 301 right
    /// after the setup is retried briefly; beyond that it means the server lost the
    /// connection ([`NacosError::Unregistered`]). Once the stream has ended, requests
    /// (also those in flight) fail at once with [`NacosError::Closed`].
    pub async fn request<T: DeserializeOwned>(
        &self,
        kind: Kind,
        body: Value,
    ) -> Result<T, NacosError> {
        tokio::select! {
            biased;
            _ = self.closed.cancelled() => Err(NacosError::Closed("the stream ended".into())),
            result = self.request_retrying(kind, &body) => result,
        }
    }

    async fn request_retrying<T: DeserializeOwned>(
        &self,
        kind: Kind,
        body: &Value,
    ) -> Result<T, NacosError> {
        let mut attempt = 0;
        loop {
            let result = self.request_once(kind, body).await;
            match result {
                Err(NacosError::Unregistered) if attempt < UNREGISTERED_RETRIES => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => {
                    self.metrics.record(kind.as_label(), other.is_ok());
                    if other.is_ok() {
                        *self.last_active.lock().unwrap_or_else(|e| e.into_inner()) =
                            Instant::now();
                        // An answer other than the server check's proves the server
                        // registered the connection, for a server that sends no ack.
                        if kind != Kind::ServerCheck && !self.is_closed() {
                            self.metrics.connected.set(1);
                        }
                    }
                    return other;
                }
            }
        }
    }

    async fn request_once<T: DeserializeOwned>(
        &self,
        kind: Kind,
        body: &Value,
    ) -> Result<T, NacosError> {
        let payload = Payload::new(kind.type_name(), body, self.headers());
        let mut grpc = self.grpc.clone();
        let call = async {
            grpc.ready()
                .await
                .map_err(|e| NacosError::rpc(kind, tonic::Status::from_error(e.into())))?;
            grpc.unary(
                tonic::Request::new(payload),
                proto::path(proto::UNARY_PATH),
                proto::codec(),
            )
            .await
            .map_err(|e| NacosError::rpc(kind, e))
        };
        let answer = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| NacosError::Timeout {
                kind: kind.as_label(),
                timeout: self.timeout,
            })??
            .into_inner();
        decode(kind, &answer)
    }

    fn headers(&self) -> HashMap<String, String> {
        let mut headers = HashMap::new();
        if let Some(token) = self
            .token
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            headers.insert("accessToken".to_string(), token.expose_secret().to_string());
        }
        headers
    }
}

/// A response payload as `T`, or the error it reports.
pub fn decode<T: DeserializeOwned>(kind: Kind, answer: &Payload) -> Result<T, NacosError> {
    let label = kind.as_label();
    let status: api::Status =
        serde_json::from_slice(answer.json()).map_err(|source| NacosError::Decode {
            kind: label,
            source,
        })?;
    if answer.kind() == api::ERROR_RESPONSE || !status.is_ok() {
        if status.error_code == api::UNREGISTERED {
            return Err(NacosError::Unregistered);
        }
        return Err(NacosError::Server {
            kind: label,
            code: status.error_code,
            message: status.message.unwrap_or_default(),
        });
    }
    serde_json::from_slice(answer.json()).map_err(|source| NacosError::Decode {
        kind: label,
        source,
    })
}

/// What the reader shares with its [`Connection`].
struct Shared {
    metrics: Arc<NacosMetrics>,
    last_active: Arc<Mutex<Instant>>,
    /// Cancelled when the reader ends, however it ends.
    closed: CancellationToken,
}

/// The bi stream: opens it, answers the server and hands pushes on, until it ends.
/// `setup_ack` learns when the server registered the connection, or why the stream
/// ended before.
async fn read(
    mut grpc: Grpc<Channel>,
    requests: fmpsc::UnboundedReceiver<Payload>,
    outbound: fmpsc::UnboundedSender<Payload>,
    events: mpsc::UnboundedSender<Inbound>,
    setup_ack: oneshot::Sender<Result<(), String>>,
    shared: Shared,
) {
    let Shared {
        metrics,
        last_active,
        closed,
    } = shared;
    let _closed = closed.drop_guard();
    let mut setup_ack = Some(setup_ack);
    let opened = async {
        grpc.ready().await.map_err(|e| e.to_string())?;
        grpc.streaming(
            tonic::Request::new(requests),
            proto::path(proto::BI_STREAM_PATH),
            proto::codec(),
        )
        .await
        .map_err(|status| format!("opening the stream failed: {status}"))
    };
    let mut inbound = match opened.await {
        Ok(response) => response.into_inner(),
        Err(why) => {
            if let Some(ack) = setup_ack.take() {
                let _ = ack.send(Err(why.clone()));
            }
            let _ = events.send(Inbound::Closed(why));
            return;
        }
    };
    let reply = |request_type: &str, request_id: &str| {
        if let Some(kind) = api::response_type(request_type) {
            let _ =
                outbound.unbounded_send(Payload::new(kind, &api::ack(request_id), HashMap::new()));
        }
    };
    let closed = loop {
        let message = match inbound.message().await {
            Ok(Some(message)) => message,
            Ok(None) => break "the server ended the stream".to_string(),
            Err(status) => break format!("the stream failed: {status}"),
        };
        *last_active.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        match message.kind() {
            api::NOTIFY_SUBSCRIBER => {
                metrics.pushes_received.inc();
                tracing::trace!(body = %String::from_utf8_lossy(message.json()), "Nacos push");
                match serde_json::from_slice::<api::NotifySubscriber>(message.json()) {
                    Ok(push) => {
                        reply(api::NOTIFY_SUBSCRIBER, &push.request_id);
                        metrics.pushes_acked.inc();
                        let _ = events.send(Inbound::Push(Box::new(push)));
                    }
                    Err(e) => {
                        // Acknowledged all the same: a resend would not decode either.
                        let id = serde_json::from_slice::<api::ServerRequest>(message.json())
                            .map(|r| r.request_id)
                            .unwrap_or_default();
                        reply(api::NOTIFY_SUBSCRIBER, &id);
                        metrics.pushes_acked.inc();
                        metrics.reject("invalid_payload");
                        warn!(error = %e, "a Nacos push did not decode; left out");
                    }
                }
            }
            kind @ (api::CLIENT_DETECTION | api::CONNECT_RESET) => {
                let id = serde_json::from_slice::<api::ServerRequest>(message.json())
                    .map(|r| r.request_id)
                    .unwrap_or_default();
                reply(kind, &id);
                if kind == api::CONNECT_RESET {
                    break "the server asked for a new connection (ConnectResetRequest)".into();
                }
            }
            api::SETUP_ACK => {
                // Connected means registered: before the ack the server answers 301.
                metrics.connected.set(1);
                if let Some(ack) = setup_ack.take() {
                    let _ = ack.send(Ok(()));
                }
            }
            other => debug!(
                kind = other,
                "Nacos sent a request this client does not handle"
            ),
        }
    };
    metrics.connected.set(0);
    if let Some(ack) = setup_ack.take() {
        let _ = ack.send(Err(closed.clone()));
    }
    let _ = events.send(Inbound::Closed(closed));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(kind: &str, json: &str) -> Payload {
        Payload::new(
            kind,
            &serde_json::from_str::<Value>(json).unwrap(),
            HashMap::new(),
        )
    }

    #[test]
    fn answers_decode_or_say_why_not() {
        let ok: api::ServerCheckResponse = decode(
            Kind::ServerCheck,
            &payload(
                "ServerCheckResponse",
                r#"{"resultCode":200,"errorCode":0,"connectionId":"c1","success":true}"#,
            ),
        )
        .expect("ok");
        assert_eq!(ok.connection_id, "c1");
        let unregistered = decode::<api::ServerCheckResponse>(
            Kind::Subscribe,
            &payload(
                "ErrorResponse",
                r#"{"resultCode":500,"errorCode":301,"message":"Connection is unregistered.","success":false}"#,
            ),
        );
        assert!(matches!(unregistered, Err(NacosError::Unregistered)));
        assert!(unregistered.unwrap_err().is_connection_lost());
        let refused = decode::<api::ServiceListResponse>(
            Kind::ServiceList,
            &payload(
                "ErrorResponse",
                r#"{"resultCode":500,"errorCode":403,"message":"no right","success":false}"#,
            ),
        )
        .unwrap_err();
        assert!(
            matches!(&refused, NacosError::Server { code: 403, message, .. } if message == "no right")
        );
        assert!(!refused.is_connection_lost());
        assert!(matches!(
            decode::<api::ServiceListResponse>(Kind::ServiceList, &payload("X", "7")),
            Err(NacosError::Decode { .. })
        ));
    }
}
