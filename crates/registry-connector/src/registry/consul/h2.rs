//! The per-service long polls over HTTP/2, spoken with the `h2` crate directly.
//!
//! Why not reqwest here, as everywhere else: a request held open for minutes through
//! reqwest costs ~8-10 KB (reqwest's pending future, hyper-util's pooled `call`, hyper's
//! task per HTTP/2 request piping the response back), measured with heaptrack at 10,000
//! long polls. Straight on an `h2::client::SendRequest` a waiting long poll is the
//! stream's state inside the connection and a small response future polled by the
//! watcher itself: no pool, no extra task, no channel. Everything else (reads, catalog
//! watches, transactions, the probe) stays on reqwest.
//!
//! Owns: one TLS + HTTP/2 connection per shard ([`H2Shard`]), dialled again (one at a
//! time) when it closed; HTTP/2 pings that find a dead peer; the ALPN check (`h2` or
//! nothing); reading an answer whole with flow control released as it arrives. Does not:
//! retry (the watch loops do, with their pacing) or know any Consul endpoint.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use reqwest::header::HeaderMap;
use reqwest::Url;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, warn};

use super::error::ConsulError;

/// HTTP/2 pings on a connection whose streams wait for minutes: a dead peer must not
/// hold 200 long polls hostage until their timeouts.
const PING_INTERVAL: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Flow-control windows: a service with a thousand instances answers ~1 MB; with h2's
/// 64 KiB defaults that answer would crawl in window updates. Nothing is reserved by a
/// window: data is buffered only as it arrives, and read at once.
const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 4 << 20;

/// TLS material and the address of the agent: what opens a connection.
pub(super) struct H2Dialer {
    tls: TlsConnector,
    server_name: ServerName<'static>,
    /// `host:port` to connect to.
    address: String,
    connect_timeout: Duration,
    headers: HeaderMap,
}

impl std::fmt::Debug for H2Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Dialer")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// The files and settings the dialer is built from (the same as the reqwest clients').
pub(super) struct DialerSettings<'a> {
    pub base: &'a Url,
    pub connect_timeout: Duration,
    pub headers: &'a HeaderMap,
    pub ca_file: Option<&'a std::path::Path>,
    pub client_cert_file: Option<&'a std::path::Path>,
    pub client_key_file: Option<&'a std::path::Path>,
}

impl H2Dialer {
    pub(super) fn new(settings: DialerSettings<'_>) -> Result<Self, ConsulError> {
        let base = settings.base;
        let host = base.host_str().unwrap_or_default();
        let port = base.port_or_known_default().unwrap_or(443);
        // `host_str` keeps the brackets of an IPv6 address; a server name does not.
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(bare_host.to_string())
            .map_err(|_| ConsulError::Config(format!("{host:?} is not a valid TLS server name")))?;
        let config = client_config(&settings)?;
        Ok(Self {
            tls: TlsConnector::from(Arc::new(config)),
            server_name,
            address: format!("{host}:{port}"),
            connect_timeout: settings.connect_timeout,
            headers: settings.headers.clone(),
        })
    }

    /// One new connection: TCP, TLS with ALPN `h2`, the HTTP/2 handshake, and a task that
    /// drives it (and pings) until it closes.
    async fn dial(&self) -> Result<Connection, ConsulError> {
        let connect_error = |source| ConsulError::Connect {
            address: self.address.clone(),
            source,
        };
        let timed_out = || {
            connect_error(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timeout",
            ))
        };
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.address))
            .await
            .map_err(|_| timed_out())?
            .map_err(connect_error)?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(
            self.connect_timeout,
            self.tls.connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| timed_out())?
        .map_err(connect_error)?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(ConsulError::NoHttp2 {
                address: self.address.clone(),
            });
        }
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| ConsulError::Http2 {
                path: "(handshake)".into(),
                source,
            })?;
        let closed = Arc::new(AtomicBool::new(false));
        let ping = connection.ping_pong();
        tokio::spawn(drive(connection, ping, Arc::clone(&closed)));
        Ok(Connection { send, closed })
    }
}

/// Drives one connection until it ends or stops answering pings; then every stream on it
/// fails and the shard dials again on its next request.
async fn drive(
    connection: h2::client::Connection<tokio_rustls::client::TlsStream<TcpStream>, Bytes>,
    ping: Option<h2::PingPong>,
    closed: Arc<AtomicBool>,
) {
    let keepalive = async {
        let Some(mut ping) = ping else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(PING_INTERVAL).await;
            match tokio::time::timeout(PING_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return format!("ping failed: {e}"),
                Err(_) => return format!("no answer to a ping within {PING_TIMEOUT:?}"),
            }
        }
    };
    tokio::select! {
        result = connection => {
            if let Err(e) = result {
                debug!(error = %e, "a Consul HTTP/2 connection ended");
            }
        }
        reason = keepalive => warn!(%reason, "closing a Consul HTTP/2 connection that carries long polls"),
    }
    closed.store(true, Ordering::Release);
}

struct Connection {
    send: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

/// After a failed dial, the shard's other long polls fail at once for this long instead
/// of each dialling again in turn (200 connect timeouts in a row to a black hole).
const REDIAL_AFTER: Duration = Duration::from_secs(1);

/// One HTTP/2 connection's worth of long polls; dialled again when it closed.
pub(super) struct H2Shard {
    dialer: Arc<H2Dialer>,
    state: tokio::sync::Mutex<ShardState>,
}

struct ShardState {
    connection: Connection,
    /// When the last dial failed (cleared by a successful one).
    failed_at: Option<std::time::Instant>,
}

impl std::fmt::Debug for H2Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Shard")
            .field("address", &self.dialer.address)
            .finish_non_exhaustive()
    }
}

/// One whole answer of a GET.
pub(super) struct H2Answer {
    pub status: reqwest::StatusCode,
    pub index: Option<u64>,
    pub body: Bytes,
    pub headers_at: std::time::Instant,
}

impl H2Shard {
    /// A new shard with its connection open.
    pub(super) async fn open(dialer: Arc<H2Dialer>) -> Result<Self, ConsulError> {
        let connection = dialer.dial().await?;
        Ok(Self {
            dialer,
            state: tokio::sync::Mutex::new(ShardState {
                connection,
                failed_at: None,
            }),
        })
    }

    /// A handle to send on: the open connection's, or a new connection's when it closed
    /// (the lock makes the long polls of a shard wait for one dial, not dial each).
    async fn sender(&self) -> Result<(SendRequest<Bytes>, Arc<AtomicBool>), ConsulError> {
        let mut state = self.state.lock().await;
        if state.connection.closed.load(Ordering::Acquire) {
            if let Some(at) = state.failed_at.filter(|at| at.elapsed() < REDIAL_AFTER) {
                return Err(ConsulError::Connect {
                    address: self.dialer.address.clone(),
                    source: std::io::Error::other(format!(
                        "the connection attempt {:?} ago failed",
                        at.elapsed()
                    )),
                });
            }
            // Boxed: a TLS handshake's state is kilobytes, and inline it would be part of
            // every waiting long poll's future.
            match Box::pin(self.dialer.dial()).await {
                Ok(connection) => {
                    state.connection = connection;
                    state.failed_at = None;
                }
                Err(e) => {
                    state.failed_at = Some(std::time::Instant::now());
                    return Err(e);
                }
            }
        }
        Ok((
            state.connection.send.clone(),
            Arc::clone(&state.connection.closed),
        ))
    }

    fn request(&self, url: &str) -> Result<http::Request<()>, ConsulError> {
        let mut request = http::Request::get(url)
            .body(())
            .map_err(|e| ConsulError::Config(format!("cannot build a request: {e}")))?;
        request.headers_mut().extend(self.dialer.headers.clone());
        request.headers_mut().insert(
            reqwest::header::USER_AGENT,
            reqwest::header::HeaderValue::from_static(concat!(
                "registry-connector/",
                env!("CARGO_PKG_VERSION")
            )),
        );
        Ok(request)
    }

    /// GETs `url` and reads the whole answer, all within `timeout`.
    pub(super) async fn get(&self, url: &Url, timeout: Duration) -> Result<H2Answer, ConsulError> {
        tokio::time::timeout(timeout, self.exchange(url.as_str().to_owned()))
            .await
            .map_err(|_| ConsulError::Timeout {
                path: url.path().to_string(),
            })?
            .map_err(|failure| failure.into_error(url.path()))
    }

    /// GETs `url` and reads the whole answer, with no timeout of its own: the caller
    /// bounds it (the long polls keep one deadline queue, not a timer per request). The
    /// URL is a `String` and the errors carry no path, so that a future waiting minutes
    /// for its answer holds as little as possible (10,000 of them wait at once).
    pub(super) async fn exchange(&self, url: String) -> Result<H2Answer, Failure> {
        let (send, closed) = self.sender().await.map_err(Failure::Consul)?;
        // A connection the server is leaving (GOAWAY) or that broke takes no new
        // streams, yet its driver runs on while its old streams finish (minutes, for
        // long polls): mark it closed so that the next request dials a new one.
        let refused = |e: h2::Error| {
            if e.is_go_away() || e.is_io() {
                closed.store(true, Ordering::Release);
            }
            Failure::Http2(e)
        };
        let mut send = send.ready().await.map_err(refused)?;
        // Built once the stream can be sent, and the URL dropped with it: neither is
        // held across the wait for the answer.
        let request = self.request(&url);
        drop(url);
        let (response, _) = send
            .send_request(request.map_err(Failure::Consul)?, true)
            .map_err(refused)?;
        drop(send);
        let response = response.await.map_err(Failure::Http2)?;
        let headers_at = std::time::Instant::now();
        let status = response.status();
        let index = super::http::consul_index(response.headers());
        let mut body = response.into_body();
        let mut buffer = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(Failure::Http2)?;
            let _ = body.flow_control().release_capacity(chunk.len());
            buffer.extend_from_slice(&chunk);
        }
        Ok(H2Answer {
            status,
            index,
            body: buffer.freeze(),
            headers_at,
        })
    }
}

/// Why an exchange failed, before the caller names the path it was for.
#[derive(Debug)]
pub(super) enum Failure {
    Consul(ConsulError),
    Http2(h2::Error),
}

impl Failure {
    pub(super) fn into_error(self, path: &str) -> ConsulError {
        match self {
            Self::Consul(e) => e,
            Self::Http2(source) => ConsulError::Http2 {
                path: path.to_string(),
                source,
            },
        }
    }
}

/// The TLS client configuration: the CA file's certificates only when one is given (as
/// the reqwest clients do), else the platform's verifier; the client certificate when
/// given; ALPN `h2` only.
fn client_config(settings: &DialerSettings<'_>) -> Result<rustls::ClientConfig, ConsulError> {
    let tls_error = |what: &'static str| {
        move |e: rustls::Error| ConsulError::TlsSetup {
            what,
            reason: e.to_string(),
        }
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_error("protocol versions"))?;
    let builder = match settings.ca_file {
        Some(path) => {
            let pem = crate::registry::tls::read_file("CA", path)?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| ConsulError::TlsSetup {
                    what: "CA file",
                    reason: e.to_string(),
                })?;
                roots.add(cert).map_err(tls_error("CA file"))?;
            }
            builder.with_root_certificates(roots)
        }
        None => {
            use rustls_platform_verifier::BuilderVerifierExt;
            builder
                .with_platform_verifier()
                .map_err(tls_error("system roots"))?
        }
    };
    let mut config = match (settings.client_cert_file, settings.client_key_file) {
        (Some(cert), Some(key)) => {
            let pem = crate::registry::tls::read_file("client certificate", cert)?;
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ConsulError::TlsSetup {
                    what: "client certificate",
                    reason: e.to_string(),
                })?;
            let pem = crate::registry::tls::read_file("client key", key)?;
            let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| ConsulError::TlsSetup {
                what: "client key",
                reason: e.to_string(),
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(tls_error("client certificate or key"))?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings<'a>(base: &'a Url, headers: &'a HeaderMap) -> DialerSettings<'a> {
        DialerSettings {
            base,
            connect_timeout: Duration::from_secs(1),
            headers,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }

    #[test]
    fn dialer_addresses_keep_the_port_and_ipv6_brackets() {
        let headers = HeaderMap::new();
        let base = Url::parse("https://[::1]:8501").unwrap();
        let dialer = H2Dialer::new(settings(&base, &headers)).unwrap();
        assert_eq!(dialer.address, "[::1]:8501");
        assert!(matches!(dialer.server_name, ServerName::IpAddress(_)));
        let base = Url::parse("https://consul.example").unwrap();
        let dialer = H2Dialer::new(settings(&base, &headers)).unwrap();
        assert_eq!(dialer.address, "consul.example:443");
        assert!(matches!(dialer.server_name, ServerName::DnsName(_)));
    }

    #[test]
    fn unreadable_or_empty_tls_files_are_named() {
        let headers = HeaderMap::new();
        let base = Url::parse("https://127.0.0.1:8501").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let mut s = settings(&base, &headers);
        s.ca_file = Some(&missing);
        let err = H2Dialer::new(s).unwrap_err().to_string();
        assert!(err.contains("CA"), "{err}");
        let garbage = dir.path().join("key.pem");
        std::fs::write(&garbage, "not a key").unwrap();
        let mut s = settings(&base, &headers);
        s.client_cert_file = Some(&garbage);
        s.client_key_file = Some(&garbage);
        let err = H2Dialer::new(s).unwrap_err().to_string();
        assert!(err.contains("client"), "{err}");
    }
}
