//! A counting HTTP proxy in front of the Consul agent, for a connector that does not
//! count its own Consul requests (consul-k8s has no such metric): every request is
//! forwarded as it came, and counted once its answer is complete, by endpoint (the
//! first two path segments after `/v1/`, joined with `_`, the label values of
//! `registry_connector_registry_requests_total`: `catalog_register`, `catalog_node`,
//! `health_service`, `txn`, ...), with the writes (any method but GET) apart.
//!
//! Blocking queries pass through unchanged (the upstream client waits as long as
//! Consul's longest wait). Each request in flight holds one upstream connection, as it
//! would have held one to the agent directly, so the agent's per-client limit sees
//! about what it would without the proxy.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Router;

/// Longest request body forwarded (a Consul transaction is far smaller).
const MAX_BODY: usize = 16 << 20;
/// Consul's longest blocking wait is 10 minutes.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(11 * 60);
/// Headers that belong to one connection, not to the request or answer.
const HOP_BY_HOP: [&str; 5] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "upgrade",
];

/// What the proxy has counted since it started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProxyCounts {
    /// Completed requests by endpoint, any method.
    pub by_endpoint: BTreeMap<String, f64>,
    /// Completed writes (not GET) by endpoint.
    pub writes: BTreeMap<String, f64>,
    /// Requests that got no answer or an error status.
    pub failed: f64,
}

impl ProxyCounts {
    pub fn total(&self) -> f64 {
        self.by_endpoint.values().fold(0.0, |a, b| a + b)
    }

    pub fn writes_to(&self, endpoint: &str) -> f64 {
        self.writes.get(endpoint).copied().unwrap_or(0.0)
    }

    pub fn write_total(&self) -> f64 {
        self.writes.values().fold(0.0, |a, b| a + b)
    }
}

struct Inner {
    upstream: String,
    http: reqwest::Client,
    counts: Mutex<ProxyCounts>,
}

/// A running proxy; it stops when dropped.
pub struct CountingProxy {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for CountingProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountingProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.inner.upstream)
            .finish()
    }
}

/// The endpoint label of a request path (`/v1/catalog/node/x` → `catalog_node`).
pub fn endpoint_of(path: &str) -> String {
    let rest = path.trim_start_matches('/');
    let rest = rest.strip_prefix("v1/").unwrap_or(rest);
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).take(2).collect();
    if parts.is_empty() {
        "root".into()
    } else {
        parts.join("_")
    }
}

impl CountingProxy {
    /// Listens on a free loopback port and forwards to `upstream` (`127.0.0.1:PORT`,
    /// plain HTTP).
    pub async fn start(upstream: &str) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(UPSTREAM_TIMEOUT)
            .no_proxy()
            .build()
            .context("building the proxy's upstream client")?;
        let inner = Arc::new(Inner {
            upstream: format!("http://{}", upstream.trim_start_matches("http://")),
            http,
            counts: Mutex::new(ProxyCounts::default()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the Consul proxy")?;
        let addr = listener.local_addr().context("the proxy's address")?;
        let app = Router::new()
            .fallback(forward)
            .with_state(Arc::clone(&inner));
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                crate::say(format!("the Consul proxy stopped: {e}"));
            }
        });
        Ok(Self { addr, inner, task })
    }

    /// The counts so far.
    pub fn counts(&self) -> ProxyCounts {
        lock(&self.inner.counts).clone()
    }
}

fn lock(m: &Mutex<ProxyCounts>) -> std::sync::MutexGuard<'_, ProxyCounts> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Forwards one request and counts it.
async fn forward(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let method = req.method().clone();
    let endpoint = endpoint_of(req.uri().path());
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let mut headers = req.headers().clone();
    for h in HOP_BY_HOP.iter().chain(["host"].iter()) {
        headers.remove(*h);
    }
    let result = match to_bytes(req.into_body(), MAX_BODY).await {
        Ok(body) => inner
            .http
            .request(method.clone(), format!("{}{path}", inner.upstream))
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let response = match result {
        Ok(resp) => relay(resp).await,
        Err(e) => Err(e),
    };
    let ok = matches!(&response, Ok(r) if r.status().is_success());
    {
        let mut c = lock(&inner.counts);
        *c.by_endpoint.entry(endpoint.clone()).or_insert(0.0) += 1.0;
        if method != axum::http::Method::GET {
            *c.writes.entry(endpoint).or_insert(0.0) += 1.0;
        }
        if !ok {
            c.failed += 1.0;
        }
    }
    response.unwrap_or_else(|e| {
        let mut r = Response::new(Body::from(format!("bench proxy: {e}")));
        *r.status_mut() = StatusCode::BAD_GATEWAY;
        r
    })
}

/// The upstream answer as the proxy's answer.
async fn relay(resp: reqwest::Response) -> std::result::Result<Response, String> {
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.map_err(|e| e.to_string())?;
    let mut out = Response::new(Body::from(body));
    *out.status_mut() = status;
    for (k, v) in headers.iter() {
        if !HOP_BY_HOP.contains(&k.as_str()) {
            out.headers_mut().append(k.clone(), v.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_match_the_connectors_labels() {
        assert_eq!(endpoint_of("/v1/catalog/node/k8s-sync"), "catalog_node");
        assert_eq!(endpoint_of("/v1/catalog/register"), "catalog_register");
        assert_eq!(endpoint_of("/v1/health/service/web"), "health_service");
        assert_eq!(endpoint_of("/v1/txn"), "txn");
        assert_eq!(endpoint_of("/"), "root");
    }

    #[tokio::test]
    async fn forwards_and_counts() {
        // An upstream that answers every request with 200 and a Consul index.
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let up = upstream.local_addr().expect("addr");
        let app = Router::new().fallback(|| async {
            let mut r = Response::new(Body::from("[]"));
            r.headers_mut()
                .insert("X-Consul-Index", "42".parse().expect("header"));
            r
        });
        tokio::spawn(async move {
            let _ = axum::serve(upstream, app).await;
        });
        let proxy = CountingProxy::start(&up.to_string()).await.expect("proxy");
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let base = format!("http://{}", proxy.addr);
        let resp = http
            .get(format!("{base}/v1/catalog/node/n?index=1"))
            .send()
            .await
            .expect("get");
        assert_eq!(resp.headers()["x-consul-index"], "42");
        http.put(format!("{base}/v1/catalog/register"))
            .body("{}")
            .send()
            .await
            .expect("put");
        let c = proxy.counts();
        assert_eq!(c.total(), 2.0);
        assert_eq!(c.writes_to("catalog_register"), 1.0);
        assert_eq!(c.write_total(), 1.0);
        assert_eq!(c.failed, 0.0);
    }
}
