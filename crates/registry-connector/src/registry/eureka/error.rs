//! Errors of the Eureka source and writer. Configuration errors come from
//! [`super::EurekaSource::new`] and [`super::writer::EurekaWriter::new`]; request errors
//! are logged and retried by the poll loop or the export engine, never returned from
//! `run`. No variant carries a password: URLs in errors are redacted.

/// Everything that can go wrong talking to Eureka.
#[derive(Debug, thiserror::Error)]
pub enum EurekaError {
    /// A service URL could not be used.
    #[error("invalid Eureka service URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },

    /// A file named in the configuration (password, TLS material) is missing or
    /// unusable.
    #[error(transparent)]
    Files(#[from] crate::registry::tls::TlsFileError),

    /// A configuration value that cannot work.
    #[error("invalid Eureka configuration: {0}")]
    Config(String),

    /// The HTTP client could not be built.
    #[error("cannot build the Eureka HTTP client")]
    Client(#[source] reqwest::Error),

    /// No answer (connection refused or reset, timeout, ...).
    #[error("{method} {url} failed")]
    Request {
        method: &'static str,
        url: String,
        #[source]
        source: reqwest::Error,
    },

    /// An error status: 401/403 (credentials; also 403 while a freshly started server
    /// waits for its peers), 5xx, ...
    #[error("{method} {url}: Eureka answered {status}: {body}")]
    Status {
        method: &'static str,
        url: String,
        status: u16,
        body: String,
    },

    /// The answer was not an applications document.
    #[error("GET {url}: cannot decode the answer")]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },

    /// The decoding of an answer as it arrived was cut short (the runtime is stopping).
    #[error("GET {url}: decoding the answer was cut short")]
    DecodeCancelled { url: String },

    /// A registration body could not be encoded.
    #[error("{url}: cannot encode the registration")]
    Encode {
        url: String,
        #[source]
        source: serde_json::Error,
    },

    /// A status change for an instance the server does not hold (404): it was
    /// deregistered or evicted meanwhile; the export engine reads the registry again.
    #[error("{app}/{id} is not registered in Eureka (404 on {what})")]
    NotRegistered {
        app: String,
        id: String,
        what: &'static str,
    },
}

impl EurekaError {
    /// Whether the server refused the request itself (rather than failing): a delta path
    /// switched off or blocked answers one of these while `/apps` may still work.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::Status {
                status: 403 | 404 | 405 | 501,
                ..
            }
        )
    }
}
