//! The HTTP side of the Consul source: one pooled client, the two GET endpoints it reads,
//! blocking-query parameters, authentication, TLS, and the connection budget.
//!
//! Owns: the base URL, the `X-Consul-Token` header (marked sensitive so that it never
//! shows in debug output), `dc=` and `stale`, the `index` / `wait` parameters, timeouts
//! that outlast a blocking query, counting every request in [`ConsulMetrics`], and the
//! semaphore that keeps the number of open connections under Consul's per-client limit.
//! Does not: retry (the watch loops do, with their pacing), interpret indexes beyond
//! reading them, or decide anything about services.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{StatusCode, Url};
use tokio::sync::Semaphore;

use super::api::{self, CatalogServices, HealthEntry};
use super::config::ConsulConfig;
use super::error::ConsulError;
use super::metrics::{ConsulMetrics, Endpoint};

/// Timeout of a request that does not block (the first read of a watch).
const PLAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Keepalive probes find a Consul server that vanished without closing its connections
/// (host down, network partition) long before a 5-minute blocking query times out.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// An answer of a blocking endpoint with its `X-Consul-Index`.
#[derive(Debug)]
pub struct Indexed<T> {
    pub index: u64,
    pub value: T,
}

/// The Consul HTTP client shared by all watch loops of one source.
#[derive(Debug, Clone)]
pub struct ConsulHttp {
    client: reqwest::Client,
    base: Url,
    datacenter: Option<String>,
    allow_stale: bool,
    permits: Option<Arc<Semaphore>>,
    metrics: Arc<ConsulMetrics>,
}

impl ConsulHttp {
    /// Builds the client; reads the token file and the TLS files.
    pub fn new(cfg: &ConsulConfig, metrics: Arc<ConsulMetrics>) -> Result<Self, ConsulError> {
        let tls = cfg.ca_file.is_some() || cfg.client_cert_file.is_some();
        let base = base_url(&cfg.address, tls)?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .tcp_keepalive(TCP_KEEPALIVE)
            // Each long poll holds its own HTTP/1.1 connection; keep every one of them
            // reusable instead of reopening thousands after each wake-up.
            .pool_max_idle_per_host(usize::MAX)
            .user_agent(concat!("registry-connector/", env!("CARGO_PKG_VERSION")));
        if let Some(token) = resolve_token(cfg)? {
            let mut value = HeaderValue::from_str(&token).map_err(|_| {
                ConsulError::Config(
                    "the ACL token contains characters not allowed in a header".into(),
                )
            })?;
            value.set_sensitive(true);
            let mut headers = HeaderMap::new();
            headers.insert("X-Consul-Token", value);
            builder = builder.default_headers(headers);
        }
        builder = crate::registry::tls::with_tls_files(
            builder,
            cfg.ca_file.as_deref(),
            cfg.client_cert_file.as_deref(),
            cfg.client_key_file.as_deref(),
        )?;
        let client = builder.build().map_err(ConsulError::Client)?;
        let permits =
            (cfg.max_connections > 0).then(|| Arc::new(Semaphore::new(cfg.max_connections)));
        Ok(Self {
            client,
            base,
            datacenter: cfg.datacenter.clone().filter(|dc| !dc.trim().is_empty()),
            allow_stale: cfg.allow_stale,
            permits,
            metrics,
        })
    }

    /// The URL requests go to (no secrets in it).
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// `/v1/catalog/services`, blocking when `index > 0`.
    pub async fn catalog_services(
        &self,
        index: u64,
        wait: Duration,
    ) -> Result<Indexed<CatalogServices>, ConsulError> {
        self.get(
            Endpoint::CatalogServices,
            &["v1", "catalog", "services"],
            index,
            &|| wait,
            api::decode_catalog_services,
        )
        .await
    }

    /// `/v1/health/service/<name>` (every instance, with its checks), blocking when
    /// `index > 0`. `wait` is asked once the request holds a connection, so that a
    /// watcher that queued for one uses the wait in force when it goes out.
    pub async fn health_service(
        &self,
        name: &str,
        index: u64,
        wait: &(dyn Fn() -> Duration + Sync),
    ) -> Result<Indexed<Vec<HealthEntry>>, ConsulError> {
        self.get(
            Endpoint::HealthService,
            &["v1", "health", "service", name],
            index,
            wait,
            api::decode_health_service,
        )
        .await
    }

    fn url(&self, segments: &[&str], index: u64, wait: Duration) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            // Pushing segments percent-encodes them: a service name with `/` or `?`
            // stays one segment.
            path.pop_if_empty().extend(segments);
        }
        {
            let mut query = url.query_pairs_mut();
            if let Some(dc) = &self.datacenter {
                query.append_pair("dc", dc);
            }
            if self.allow_stale {
                query.append_key_only("stale");
            }
            if index > 0 {
                query.append_pair("index", &index.to_string());
                query.append_pair("wait", &format!("{}ms", wait.as_millis().max(1)));
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        url
    }

    async fn get<T>(
        &self,
        endpoint: Endpoint,
        segments: &[&str],
        index: u64,
        wait: &(dyn Fn() -> Duration + Sync),
        decode: fn(&[u8]) -> Result<T, serde_json::Error>,
    ) -> Result<Indexed<T>, ConsulError> {
        // Held for the whole request, body included: that is when the connection is busy.
        let _permit = match &self.permits {
            Some(permits) => Some(
                permits
                    .acquire()
                    .await
                    .map_err(|_| ConsulError::Config("the connection budget was closed".into()))?,
            ),
            None => None,
        };
        let wait = wait();
        let url = self.url(segments, index, wait);
        let path = url.path().to_string();
        let result = self.fetch(&path, url, index, wait, decode).await;
        self.metrics.record(endpoint, result.is_ok());
        result
    }

    async fn fetch<T>(
        &self,
        path: &str,
        url: Url,
        index: u64,
        wait: Duration,
        decode: fn(&[u8]) -> Result<T, serde_json::Error>,
    ) -> Result<Indexed<T>, ConsulError> {
        let timeout = if index > 0 {
            blocking_timeout(wait)
        } else {
            PLAIN_TIMEOUT
        };
        let request_error = |source| ConsulError::Request {
            path: path.to_string(),
            source,
        };
        let response = self
            .client
            .get(url)
            .timeout(timeout)
            .send()
            .await
            .map_err(request_error)?;
        let status = response.status();
        let header_index = response
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let body = response.bytes().await.map_err(request_error)?;
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Err(ConsulError::TooManyConnections {
                path: path.to_string(),
            });
        }
        if !status.is_success() {
            return Err(ConsulError::Status {
                path: path.to_string(),
                status: status.as_u16(),
                body: crate::registry::error_body(&body),
            });
        }
        let index = header_index.ok_or_else(|| ConsulError::MissingIndex {
            path: path.to_string(),
        })?;
        let value = decode(&body).map_err(|source| ConsulError::Decode {
            path: path.to_string(),
            source,
        })?;
        Ok(Indexed { index, value })
    }
}

/// How long to wait for a blocking query: Consul adds up to `wait / 16` of random jitter
/// to spread wake-ups, and the answer still has to travel.
pub fn blocking_timeout(wait: Duration) -> Duration {
    wait + wait / 16 + Duration::from_secs(10)
}

/// Parses the configured address into the base URL: `host:port` gets `https://` when TLS
/// material is configured and `http://` otherwise; an explicit scheme must be one of
/// those two.
pub fn base_url(address: &str, tls: bool) -> Result<Url, ConsulError> {
    let invalid = |reason: &str| ConsulError::InvalidAddress {
        address: address.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = address.trim();
    if trimmed.is_empty() {
        return Err(invalid("empty"));
    }
    let with_scheme = if trimmed.contains("://") {
        trimmed.to_string()
    } else if tls {
        format!("https://{trimmed}")
    } else {
        format!("http://{trimmed}")
    };
    let url = Url::parse(&with_scheme).map_err(|e| invalid(&e.to_string()))?;
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Err(invalid(&format!(
                "scheme {other:?} is not supported (use http or https)"
            )))
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "credentials in the address are not supported; use the token",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("no query or fragment allowed"));
    }
    Ok(url)
}

/// The token from the configuration: the value wins over the file, as in the `consul`
/// CLI. An empty token means none.
fn resolve_token(cfg: &ConsulConfig) -> Result<Option<String>, ConsulError> {
    if let Some(token) = cfg
        .token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        return Ok(Some(token.to_string()));
    }
    let Some(path) = &cfg.token_file else {
        return Ok(None);
    };
    let bytes = read_file("token", path)?;
    let text = String::from_utf8(bytes).map_err(|_| {
        ConsulError::Config(format!("the token file {} is not UTF-8", path.display()))
    })?;
    let token = text.trim();
    Ok((!token.is_empty()).then(|| token.to_string()))
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, ConsulError> {
    Ok(crate::registry::tls::read_file(what, path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(f: impl FnOnce(&mut ConsulConfig)) -> ConsulHttp {
        let mut cfg = ConsulConfig::new("127.0.0.1:8500");
        f(&mut cfg);
        ConsulHttp::new(&cfg, Arc::default()).expect("client builds")
    }

    #[test]
    fn addresses_with_and_without_scheme() {
        assert_eq!(
            base_url("127.0.0.1:8500", false).unwrap().as_str(),
            "http://127.0.0.1:8500/"
        );
        assert_eq!(
            base_url("consul:8501", true).unwrap().as_str(),
            "https://consul:8501/"
        );
        assert_eq!(
            base_url("https://consul:8501", false).unwrap().scheme(),
            "https"
        );
        assert_eq!(
            base_url(" http://[::1]:8500/ ", true).unwrap().scheme(),
            "http"
        );
        assert_eq!(
            base_url("http://proxy/consul/", false).unwrap().as_str(),
            "http://proxy/consul/"
        );
        for bad in [
            "",
            "unix:///var/run/consul.sock",
            "ftp://x",
            "http://",
            "http://u:p@h:1",
            "h:1/?x=1",
        ] {
            assert!(
                matches!(
                    base_url(bad, false),
                    Err(ConsulError::InvalidAddress { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn urls_carry_blocking_parameters() {
        let h = http(|c| c.datacenter = Some("dc2".into()));
        let url = h.url(&["v1", "catalog", "services"], 0, Duration::from_secs(300));
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8500/v1/catalog/services?dc=dc2&stale"
        );
        let url = h.url(
            &["v1", "health", "service", "a/b c"],
            42,
            Duration::from_secs(300),
        );
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8500/v1/health/service/a%2Fb%20c?dc=dc2&stale&index=42&wait=300000ms"
        );
        let h = http(|c| c.allow_stale = false);
        let url = h.url(&["v1", "catalog", "services"], 0, Duration::from_secs(1));
        assert_eq!(url.as_str(), "http://127.0.0.1:8500/v1/catalog/services");
    }

    #[test]
    fn urls_keep_a_path_prefix() {
        let h = http(|c| c.address = "http://proxy:80/consul".into());
        let url = h.url(&["v1", "catalog", "services"], 0, Duration::from_secs(1));
        assert_eq!(url.path(), "/consul/v1/catalog/services");
    }

    #[test]
    fn token_value_wins_over_the_file_and_files_are_checked() {
        let dir = std::env::temp_dir().join(testenv_free_name("consul-token"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("token");
        std::fs::write(&file, "  from-file\n").expect("write token");
        let mut cfg = ConsulConfig {
            token_file: Some(file.clone()),
            ..ConsulConfig::default()
        };
        assert_eq!(resolve_token(&cfg).unwrap().as_deref(), Some("from-file"));
        cfg.token = Some("from-flag".into());
        assert_eq!(resolve_token(&cfg).unwrap().as_deref(), Some("from-flag"));
        cfg.token = Some(String::new());
        assert_eq!(resolve_token(&cfg).unwrap().as_deref(), Some("from-file"));
        cfg.token = None;
        cfg.token_file = Some(dir.join("missing"));
        let err = resolve_token(&cfg).unwrap_err();
        assert!(err.to_string().contains("token file"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_tls_material_fails_at_build() {
        let dir = std::env::temp_dir().join(testenv_free_name("consul-tls"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a pem").expect("write");
        let cfg = ConsulConfig {
            ca_file: Some(junk.clone()),
            ..ConsulConfig::default()
        };
        assert!(ConsulHttp::new(&cfg, Arc::default()).is_err());
        let cfg = ConsulConfig {
            client_cert_file: Some(junk),
            ..ConsulConfig::default()
        };
        assert!(matches!(
            ConsulHttp::new(&cfg, Arc::default()),
            Err(ConsulError::Config(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn blocking_timeout_outlasts_consuls_jitter() {
        let wait = Duration::from_secs(300);
        assert!(blocking_timeout(wait) > wait + wait / 16);
    }

    #[test]
    fn error_bodies_are_truncated() {
        assert_eq!(
            crate::registry::error_body(b" ACL not found \n"),
            "ACL not found"
        );
        let long = "x".repeat(2000);
        assert_eq!(crate::registry::error_body(long.as_bytes()).len(), 512 + 3);
    }

    fn testenv_free_name(prefix: &str) -> String {
        format!(
            "{prefix}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        )
    }
}
