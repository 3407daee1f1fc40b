//! Errors of the Consul source.
//!
//! Configuration errors are returned by [`super::ConsulSource::new`]; request errors are
//! logged and retried by the watch loops, never returned from `run`. No variant carries
//! the ACL token: it travels in a header, never in a URL, and file errors name the path
//! only.

use std::path::PathBuf;

/// Everything that can go wrong talking to Consul.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    /// The Consul address could not be turned into a URL.
    #[error("invalid Consul address {address:?}: {reason}")]
    InvalidAddress { address: String, reason: String },

    /// A file named in the configuration (token, CA, client certificate or key) could not
    /// be read.
    #[error("cannot read the Consul {what} file {path}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The TLS material is not usable (not PEM, key not matching, ...).
    #[error("invalid Consul {what}")]
    Tls {
        what: &'static str,
        #[source]
        source: reqwest::Error,
    },

    /// A configuration value that cannot work.
    #[error("invalid Consul configuration: {0}")]
    Config(String),

    /// The HTTP client could not be built.
    #[error("cannot build the Consul HTTP client")]
    Client(#[source] reqwest::Error),

    /// The request did not get an answer (connection refused or reset, timeout, ...).
    #[error("request to {path} failed")]
    Request {
        path: String,
        #[source]
        source: reqwest::Error,
    },

    /// No connection to the agent (refused, reset, TLS handshake failed, timed out).
    #[error("cannot connect to Consul at {address}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },

    /// The agent's TLS listener did not agree to HTTP/2 (ALPN), though it did when probed.
    #[error("Consul at {address} does not speak HTTP/2 any more")]
    NoHttp2 { address: String },

    /// An HTTP/2 stream or connection failed (reset, closed, protocol error).
    #[error("request to {path} failed over HTTP/2")]
    Http2 {
        path: String,
        #[source]
        source: h2::Error,
    },

    /// No whole answer within the request's timeout.
    #[error("request to {path} timed out")]
    Timeout { path: String },

    /// The TLS configuration of the HTTP/2 long polls could not be built.
    #[error("invalid Consul {what}: {reason}")]
    TlsSetup { what: &'static str, reason: String },

    /// Consul refused the request because this client holds too many connections.
    #[error(
        "{path}: Consul answered 429: too many connections from this address; raise the \
         agent's limits.http_max_conns_per_client or lower max_connections"
    )]
    TooManyConnections { path: String },

    /// Consul answered with an error status (403: the token lacks `service:read` /
    /// `node:read`; 500: no leader, unknown datacenter, ...).
    #[error("{path}: Consul answered {status}: {body}")]
    Status {
        path: String,
        status: u16,
        body: String,
    },

    /// The answer was not the JSON this endpoint documents.
    #[error("{path}: cannot decode the answer")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },

    /// A blocking endpoint answered without a usable `X-Consul-Index` header (a proxy in
    /// between that strips headers, or not a Consul server at all).
    #[error("{path}: the answer carries no valid X-Consul-Index header")]
    MissingIndex { path: String },

    /// Consul rolled a transaction back (`/v1/txn` answered 409): nothing of it applied.
    /// Carries the failing operations, so that the writer can drop those and send the
    /// rest again.
    #[error("Consul rolled the transaction back: {errors}")]
    TxnRolledBack { errors: super::txn::TxnErrors },
}

impl From<crate::registry::tls::TlsFileError> for ConsulError {
    fn from(e: crate::registry::tls::TlsFileError) -> Self {
        use crate::registry::tls::TlsFileError;
        match e {
            TlsFileError::Read { what, path, source } => Self::ReadFile { what, path, source },
            TlsFileError::Invalid { what, source } => Self::Tls { what, source },
            TlsFileError::Config(message) => Self::Config(message),
        }
    }
}
