//! What the Consul source is told: where Consul is, how to authenticate, what to select
//! and how to name it, and how hard to poll.
//!
//! Plain data with defaults; the command line (clap, environment variables) maps onto it
//! elsewhere. Reading the token file and the TLS files happens when the source is built
//! ([`super::ConsulSource::new`]), so a typo fails at start, not at the first request. The
//! token is a secret: `Debug` prints `<redacted>` in its place and nothing in this module
//! logs it.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::registry::PacerConfig;

use super::budget::MaxConnections;

/// Configuration of the Consul source. Build it with [`ConsulConfig::new`] and change the
/// fields that differ from the defaults.
#[derive(Clone)]
pub struct ConsulConfig {
    /// `host:port`, `http://host:port` or `https://host:port` (`CONSUL_HTTP_ADDR`). Without
    /// a scheme, `https` is used when a CA file or a client certificate is given, else
    /// `http`.
    pub address: String,
    /// ACL token sent as `X-Consul-Token`. Wins over `token_file` when both are given (as
    /// in the `consul` CLI). Never logged.
    pub token: Option<String>,
    /// File holding the ACL token (surrounding whitespace ignored). Read once at start.
    pub token_file: Option<PathBuf>,
    /// PEM file with the CA certificate(s) that signed Consul's HTTPS certificate; when
    /// given, only these roots are trusted.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (`verify_incoming`); needs `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
    /// Datacenter to read (`dc=`); the agent's own when `None`.
    pub datacenter: Option<String>,
    /// Keep only services carrying this tag (on any instance); all when `None`.
    pub filter_tag: Option<String>,
    /// Publish only instances whose checks all pass (the seed's default). When `false`,
    /// failing instances are published as not ready.
    pub passing_only: bool,
    /// Name of the instance tag giving the prefix of a derived service (`<tag>=<p>`).
    pub prefix_tag: Option<String>,
    /// Name of the instance tag giving the suffix of a derived service (`<tag>=<s>`).
    pub suffix_tag: Option<String>,
    /// Prepended to every published name, derived ones included.
    pub service_prefix: String,
    /// Services carrying this tag were written to Consul by a Kubernetes-to-Consul sync:
    /// publishing them back would loop, so they are skipped.
    pub k8s_tag: String,
    /// Consul's DNS domain, for the published domain `<name>.service.<domain>`.
    pub consul_domain: String,
    /// The `wait` of blocking queries: how long Consul holds a request when nothing
    /// changes. Consul's own default, 5 minutes: an idle watcher costs one request per
    /// `wait` (10,000 services cost 33 requests per second at 5 minutes, 166 at 1 minute),
    /// and Consul itself caps it at 10 minutes. Lower it when a proxy between the
    /// connector and Consul closes idle connections sooner.
    pub wait: Duration,
    /// The wait of the per-service long polls over HTTP/2. Consul's maximum (10
    /// minutes) by default, and `wait` when the operator set one: each idle long poll
    /// costs one request per wait (10,000 services: 17 requests per second instead of 33),
    /// and the connection's HTTP/2 pings, not the requests, keep it alive through proxies
    /// that close idle connections. Over HTTP/1.1 the long polls use `wait`.
    pub http2_poll_wait: Duration,
    /// Let any Consul server answer (`stale`), not only the leader: spreads the load of
    /// thousands of long polls over the servers, at the price of answers that may lag the
    /// leader by a few milliseconds (consul-k8s makes the same choice).
    pub allow_stale: bool,
    /// Health requests in flight at once while fetching the first complete snapshot.
    pub initial_fetch_concurrency: usize,
    /// Most connections open to the agent at once. [`MaxConnections::Auto`] (the
    /// default) reads the agent's `limits.http_max_conns_per_client` and takes half of
    /// it, so that a restarted connector fits beside the long polls its predecessor left
    /// open (see [`super::budget`]). Over HTTP/2 each connection carries up to 200 long
    /// polls; over HTTP/1.1 one, and the services beyond the budget are watched through
    /// catalog-wide blocking queries instead (the shared mode).
    pub max_connections: MaxConnections,
    /// Long polls per HTTP/2 connection (HTTPS): below the stream limit of whatever
    /// answers (Consul: 250; a proxy in front of it may allow fewer).
    pub http2_streams: usize,
    /// Pacing of every watch loop (minimum interval between requests, error backoff).
    pub pacing: PacerConfig,
    /// Connect timeout of one TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Service meta keys copied onto the Service as labels or annotations.
    pub metadata: crate::registry::metadata::MetadataAllowList,
}

impl ConsulConfig {
    /// The defaults of the seed: all services, passing instances only, tag `k8s` skipped,
    /// domain `consul`.
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            token: None,
            token_file: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            datacenter: None,
            filter_tag: None,
            passing_only: true,
            prefix_tag: None,
            suffix_tag: None,
            service_prefix: String::new(),
            k8s_tag: "k8s".to_string(),
            consul_domain: "consul".to_string(),
            wait: Duration::from_secs(300),
            http2_poll_wait: Duration::from_secs(600),
            allow_stale: true,
            initial_fetch_concurrency: 32,
            max_connections: MaxConnections::Auto,
            http2_streams: super::budget::STREAMS_PER_CONNECTION,
            pacing: PacerConfig::default(),
            connect_timeout: Duration::from_secs(5),
            metadata: Default::default(),
        }
    }
}

impl Default for ConsulConfig {
    /// The local agent's default address.
    fn default() -> Self {
        Self::new("127.0.0.1:8500")
    }
}

impl fmt::Debug for ConsulConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulConfig")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("ca_file", &self.ca_file)
            .field("client_cert_file", &self.client_cert_file)
            .field("client_key_file", &self.client_key_file)
            .field("datacenter", &self.datacenter)
            .field("filter_tag", &self.filter_tag)
            .field("passing_only", &self.passing_only)
            .field("prefix_tag", &self.prefix_tag)
            .field("suffix_tag", &self.suffix_tag)
            .field("service_prefix", &self.service_prefix)
            .field("k8s_tag", &self.k8s_tag)
            .field("consul_domain", &self.consul_domain)
            .field("wait", &self.wait)
            .field("http2_poll_wait", &self.http2_poll_wait)
            .field("allow_stale", &self.allow_stale)
            .field("initial_fetch_concurrency", &self.initial_fetch_concurrency)
            .field("max_connections", &self.max_connections)
            .field("http2_streams", &self.http2_streams)
            .field("pacing", &self.pacing)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_the_token() {
        let mut cfg = ConsulConfig {
            token: Some("s3cr3t-token-value".into()),
            ..ConsulConfig::new("127.0.0.1:8500")
        };
        let text = format!("{cfg:?}");
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
        cfg.token = None;
        assert!(format!("{cfg:?}").contains("token: None"));
    }

    #[test]
    fn defaults_are_the_seeds() {
        let cfg = ConsulConfig::default();
        assert!(cfg.passing_only);
        assert_eq!(cfg.k8s_tag, "k8s");
        assert_eq!(cfg.consul_domain, "consul");
        assert_eq!(cfg.filter_tag, None);
        assert_eq!(cfg.service_prefix, "");
        assert_eq!(cfg.wait, Duration::from_secs(300));
        assert_eq!(cfg.http2_poll_wait, Duration::from_secs(600));
    }
}
