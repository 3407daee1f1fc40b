//! What the Eureka source is told: where the servers are, how to authenticate, what to
//! select, and how often to poll.
//!
//! Plain data with defaults; the command line maps onto it in `runtime::eureka_args`.
//! Files (password, TLS material) are read when the source is built, so a typo fails at
//! start. The password is a secret: `Debug` prints `<redacted>` in its place.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::registry::PacerConfig;

/// Configuration of the Eureka source.
#[derive(Clone)]
pub struct EurekaConfig {
    /// Service URLs as a Eureka client's `defaultZone` writes them
    /// (`http://host:8761/eureka`), comma-separated for several peers, tried in order.
    /// Credentials may be given in the URL (`http://user:pass@host:8761/eureka`), as
    /// Eureka clients accept them.
    pub service_urls: String,
    /// Basic-auth user (wins over credentials in the URL).
    pub username: Option<String>,
    /// Basic-auth password. Never logged.
    pub password: Option<String>,
    /// File holding the basic-auth password (surrounding whitespace ignored).
    pub password_file: Option<PathBuf>,
    /// PEM CA bundle that signed the servers' certificates; only these roots are trusted.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS; needs `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
    /// How often the registry is read (a delta each time; a full fetch when the delta
    /// does not reconcile). Eureka clients use 30 s; seconds keep changes prompt at the
    /// cost of one small request per interval.
    pub poll_interval: Duration,
    /// How often the whole registry is read even when deltas reconcile: a safety net
    /// for changes a status-count hash code cannot see. Zero turns it off.
    pub full_fetch_interval: Duration,
    /// Timeout of one request.
    pub request_timeout: Duration,
    /// Connect timeout of one TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Publish only `UP` instances; with `false`, the others are published not ready.
    pub passing_only: bool,
    /// Only instances carrying all these metadata entries are published.
    pub filter_metadata: Vec<(String, String)>,
    /// Prepended to every published name.
    pub service_prefix: String,
    /// Error backoff (its `min_interval` is unused: the poll interval paces the loop).
    pub pacing: PacerConfig,
    /// Metadata keys copied onto the Service as labels or annotations.
    pub metadata: crate::registry::metadata::MetadataAllowList,
}

impl EurekaConfig {
    /// The defaults: poll every 5 s, `UP` instances only, no filter.
    pub fn new(service_urls: impl Into<String>) -> Self {
        Self {
            service_urls: service_urls.into(),
            username: None,
            password: None,
            password_file: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            poll_interval: Duration::from_secs(5),
            full_fetch_interval: Duration::from_secs(600),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            passing_only: true,
            filter_metadata: Vec::new(),
            service_prefix: String::new(),
            pacing: PacerConfig {
                min_interval: Duration::ZERO,
                ..PacerConfig::default()
            },
            metadata: Default::default(),
        }
    }
}

impl Default for EurekaConfig {
    fn default() -> Self {
        Self::new("http://127.0.0.1:8761/eureka")
    }
}

impl fmt::Debug for EurekaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EurekaConfig")
            .field(
                "service_urls",
                &super::http::redact_urls(&self.service_urls),
            )
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .field("client_cert_file", &self.client_cert_file)
            .field("client_key_file", &self.client_key_file)
            .field("poll_interval", &self.poll_interval)
            .field("full_fetch_interval", &self.full_fetch_interval)
            .field("request_timeout", &self.request_timeout)
            .field("passing_only", &self.passing_only)
            .field("filter_metadata", &self.filter_metadata)
            .field("service_prefix", &self.service_prefix)
            .field("metadata", &self.metadata)
            .finish_non_exhaustive()
    }
}

pub use crate::registry::metadata::parse_metadata_filter;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_password_in_fields_and_urls() {
        let cfg = EurekaConfig {
            service_urls: "http://svc:url-secret@eureka:8761/eureka".into(),
            password: Some("field-secret".into()),
            ..EurekaConfig::default()
        };
        let text = format!("{cfg:?}");
        assert!(!text.contains("field-secret"), "{text}");
        assert!(!text.contains("url-secret"), "{text}");
    }
}
