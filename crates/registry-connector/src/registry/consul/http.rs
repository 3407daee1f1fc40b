//! The HTTP side of the Consul source: the clients, the endpoints it reads,
//! blocking-query parameters, authentication, TLS, and the lanes that keep the number of
//! connections inside the budget ([`super::budget`]).
//!
//! Requests travel on three lanes, each its own connection pool, so that no kind of
//! request can starve another:
//! - **reads**: plain GETs (the first snapshot, re-reads of changed services, the agent
//!   probe), a bounded number in flight, a bounded number of idle connections kept;
//! - **watches**: the catalog-wide blocking queries (service list, check state);
//! - **polls**: the per-service blocking queries. Over HTTP/2 they are spread over
//!   several connections ("shards", each its own client, filled one after the other up to
//!   [`super::budget::STREAMS_PER_CONNECTION`] streams): one pool would put every stream
//!   on one connection and queue those beyond the server's stream limit. Over HTTP/2
//!   they are spoken with the `h2` crate directly (`super::h2` says why: a fraction of
//!   the memory per waiting long poll). Over HTTP/1.1 each long poll keeps its own
//!   connection.
//!
//! The agent probe speaks HTTP/1.1 first (its TLS errors then name their cause: over
//! HTTP/2 a refused client certificate only shows as a closed connection), then, over
//! TLS, asks again with HTTP/2 only; when that works the lanes are built with HTTP/2
//! prior knowledge, so that a pool opens one connection and lets concurrent requests wait
//! for it instead of racing to open one each. Consul has no cleartext HTTP/2, so plain
//! `http://` stays HTTP/1.1.
//!
//! Owns: the base URL, the `X-Consul-Token` header (marked sensitive so that it never
//! shows in debug output), `dc=` and `stale`, the `index` / `wait` parameters, timeouts
//! that outlast a blocking query, counting every request in [`ConsulMetrics`]. Does not:
//! retry (the watch loops do, with their pacing), interpret indexes beyond reading them,
//! or decide anything about services.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{StatusCode, Url};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use super::api::{self, CatalogServices, CheckState, HealthEntry};
use super::budget::{Plan, Transport};
use super::config::ConsulConfig;
use super::error::ConsulError;
use super::h2::{DialerSettings, H2Dialer, H2Shard};
use super::metrics::{ConsulMetrics, Endpoint};

/// Timeout of a request that does not block.
const PLAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Keepalive probes find a Consul server that vanished without closing its connections
/// (host down, network partition) long before a 5-minute blocking query times out.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// HTTP/2 pings on an idle connection: a blocking query sends nothing for minutes, and a
/// dead peer must not hold 200 long polls hostage until their timeouts.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// An answer of a blocking endpoint with its `X-Consul-Index`.
#[derive(Debug)]
pub struct Indexed<T> {
    pub index: u64,
    pub value: T,
    /// From the answer's headers to the decoded value: what the answer itself cost
    /// (the blocking wait before the headers is not in it).
    pub transfer: Duration,
    /// Size of the body.
    pub bytes: usize,
}

/// A long poll's answer: the same index it blocked on (nothing to decode), or a new one
/// with the service's instances.
#[derive(Debug)]
pub enum PollAnswer {
    Unchanged(u64),
    Changed(Indexed<Vec<HealthEntry>>),
}

impl PollAnswer {
    pub fn index(&self) -> u64 {
        match self {
            Self::Unchanged(index) => *index,
            Self::Changed(answer) => answer.index,
        }
    }
}

/// What the agent says about itself: the protocol it speaks to us and its per-client
/// connection limit (`None` when it would not say: `/v1/agent/self` needs `agent:read`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentFacts {
    pub transport: Transport,
    pub conns_per_client: Option<usize>,
}

/// How the clients are built (kept to build the lanes after the probe).
#[derive(Debug, Clone)]
struct ClientSettings {
    connect_timeout: Duration,
    headers: HeaderMap,
    ca_file: Option<PathBuf>,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
}

impl ClientSettings {
    /// The dialer of the HTTP/2 long polls, with the same TLS files and headers.
    fn h2_dialer(&self, base: &Url) -> Result<H2Dialer, ConsulError> {
        H2Dialer::new(DialerSettings {
            base,
            connect_timeout: self.connect_timeout,
            headers: &self.headers,
            ca_file: self.ca_file.as_deref(),
            client_cert_file: self.client_cert_file.as_deref(),
            client_key_file: self.client_key_file.as_deref(),
        })
    }

    fn build(&self, http2: bool, max_idle: usize) -> Result<reqwest::Client, ConsulError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .tcp_keepalive(TCP_KEEPALIVE)
            .pool_max_idle_per_host(max_idle)
            // Consul never redirects (and a redirect would carry the token elsewhere);
            // the watch loops retry with backoff and jitter, so reqwest's own immediate
            // retries would only add a copy of every request in flight (10,000 long polls).
            .redirect(reqwest::redirect::Policy::none())
            .retry(reqwest::retry::never())
            .default_headers(self.headers.clone())
            .user_agent(concat!("registry-connector/", env!("CARGO_PKG_VERSION")));
        if !http2 {
            builder = builder.http1_only();
        } else {
            builder = builder
                .http2_prior_knowledge()
                // The pool would evict a shared HTTP/2 connection 90 s after its last
                // checkout even while its streams are open (a shard whose long polls all
                // wait minutes), and the next request would open a second connection.
                // The pings find dead connections instead.
                .pool_idle_timeout(None)
                .http2_keep_alive_interval(H2_PING_INTERVAL)
                .http2_keep_alive_timeout(H2_PING_TIMEOUT)
                .http2_keep_alive_while_idle(true);
        }
        builder = crate::registry::tls::with_tls_files(
            builder,
            self.ca_file.as_deref(),
            self.client_cert_file.as_deref(),
            self.client_key_file.as_deref(),
        )?;
        builder.build().map_err(ConsulError::Client)
    }
}

/// A client with an optional bound on its requests in flight.
#[derive(Debug, Clone)]
struct Lane {
    client: reqwest::Client,
    permits: Option<Arc<Semaphore>>,
}

impl Lane {
    fn unbounded(client: reqwest::Client) -> Self {
        Self {
            client,
            permits: None,
        }
    }
}

/// What one shard of the poll lane sends with.
#[derive(Debug, Clone)]
enum PollClient {
    /// HTTP/1.1: a pool whose connections are the long polls' own.
    Http1(reqwest::Client),
    /// HTTP/2: one connection, its streams the long polls.
    Http2(Arc<H2Shard>),
}

/// The per-service long polls' clients and how many streams each carries.
#[derive(Debug)]
struct PollShards {
    settings: ClientSettings,
    transport: Transport,
    /// Opens the HTTP/2 shards' connections (HTTP/2 only).
    dialer: Option<Arc<H2Dialer>>,
    /// Most clients (connections, over HTTP/2) to build.
    max_shards: usize,
    per_shard: usize,
    shards: Mutex<Vec<(PollClient, usize)>>,
    /// Held while a new HTTP/2 connection is set up: one set-up at a time, each checked
    /// with a plain request before any long poll is put on it, so that a start with
    /// 10,000 services opens its 50 connections one after another instead of 50 TLS
    /// handshakes at once with 200 requests queued behind each.
    setup: tokio::sync::Mutex<()>,
    /// A cheap plain request (`/v1/status/leader`) that opens a new connection.
    warm_url: Url,
    /// Connections carrying long polls (HTTP/2: shards with a stream; HTTP/1.1: one per
    /// long poll), kept current as places are taken and given back.
    connections: prometheus_client::metrics::gauge::Gauge,
}

/// A long poll's place on the poll lane; gives the place back when dropped.
#[derive(Debug)]
pub struct PollSlot {
    shards: Arc<PollShards>,
    shard: usize,
    client: PollClient,
}

impl PollSlot {
    /// The HTTP/2 connection this place is on (`None` over HTTP/1.1).
    pub(super) fn h2_shard(&self) -> Option<&Arc<H2Shard>> {
        match &self.client {
            PollClient::Http2(shard) => Some(shard),
            PollClient::Http1(_) => None,
        }
    }
}

impl Drop for PollSlot {
    fn drop(&mut self) {
        let mut shards = lock(&self.shards.shards);
        if let Some(entry) = shards.get_mut(self.shard) {
            entry.1 = entry.1.saturating_sub(1);
        }
        self.shards.publish_connections(&shards);
    }
}

impl PollShards {
    /// The first shard with a free stream, a new one when all are full (first fit:
    /// 400 services over HTTP/2 use two connections, not one per shard allowed).
    async fn slot(self: &Arc<Self>) -> Result<PollSlot, ConsulError> {
        loop {
            if let Some(slot) = self.take_free() {
                return Ok(slot);
            }
            let _setup = self.setup.lock().await;
            if let Some(slot) = self.take_free() {
                return Ok(slot);
            }
            if lock(&self.shards).len() >= self.max_shards {
                return Ok(self.take_least_loaded());
            }
            // Boxed: opening a connection (TCP, TLS, HTTP/2) is a future of kilobytes;
            // inline, every long poll's task would carry it for its whole life, and at a
            // start every one of the 10,000 waiting here would hold a copy.
            let client = Box::pin(self.open()).await?;
            lock(&self.shards).push((client, 0));
        }
    }

    /// A new shard: over HTTP/2 a connection checked with one plain request before any
    /// long poll is put on it; over HTTP/1.1 a pool whose connections are the polls' own.
    async fn open(&self) -> Result<PollClient, ConsulError> {
        Ok(match &self.dialer {
            Some(dialer) => {
                let shard = H2Shard::open(Arc::clone(dialer)).await?;
                shard.get(&self.warm_url, PLAIN_TIMEOUT).await?;
                PollClient::Http2(Arc::new(shard))
            }
            None => PollClient::Http1(self.settings.build(false, usize::MAX)?),
        })
    }

    fn take_free(self: &Arc<Self>) -> Option<PollSlot> {
        let mut shards = lock(&self.shards);
        let shard = shards.iter().position(|(_, load)| *load < self.per_shard)?;
        Some(self.take(&mut shards, shard))
    }

    /// Over budget: share the least loaded shard (the watch loop keeps the number of
    /// long polls inside the plan, so this is only a safety net).
    fn take_least_loaded(self: &Arc<Self>) -> PollSlot {
        let mut shards = lock(&self.shards);
        let shard = shards
            .iter()
            .enumerate()
            .min_by_key(|(_, (_, load))| *load)
            .map(|(i, _)| i)
            .unwrap_or(0);
        self.take(&mut shards, shard)
    }

    fn take(self: &Arc<Self>, shards: &mut [(PollClient, usize)], shard: usize) -> PollSlot {
        shards[shard].1 += 1;
        self.publish_connections(shards);
        PollSlot {
            shards: Arc::clone(self),
            shard,
            client: shards[shard].0.clone(),
        }
    }

    fn publish_connections(&self, shards: &[(PollClient, usize)]) {
        let in_use: usize = match self.transport {
            Transport::Http2 => shards.iter().filter(|(_, load)| *load > 0).count(),
            Transport::Http1 => shards.iter().map(|(_, load)| *load).sum(),
        };
        self.connections.set(in_use as i64);
    }
}

/// Where a per-service read goes.
#[derive(Clone, Copy, Debug)]
pub enum Via<'a> {
    /// A plain read on the reads lane (no blocking).
    Read,
    /// A blocking query on the long poll's own place.
    Poll(&'a PollSlot),
}

/// The Consul HTTP client shared by all watch loops of one source.
#[derive(Debug, Clone)]
pub struct ConsulHttp {
    base: Url,
    datacenter: Option<String>,
    allow_stale: bool,
    metrics: Arc<ConsulMetrics>,
    settings: ClientSettings,
    reads: Lane,
    watches: Lane,
    polls: Arc<PollShards>,
}

impl ConsulHttp {
    /// Builds the client; reads the token file and the TLS files. Until
    /// [`ConsulHttp::with_plan`], every request goes over one HTTP/1.1 client.
    pub fn new(cfg: &ConsulConfig, metrics: Arc<ConsulMetrics>) -> Result<Self, ConsulError> {
        let tls = cfg.ca_file.is_some() || cfg.client_cert_file.is_some();
        let base = base_url(&cfg.address, tls)?;
        let mut headers = HeaderMap::new();
        if let Some(token) = resolve_token(cfg)? {
            let mut value = HeaderValue::from_str(&token).map_err(|_| {
                ConsulError::Config(
                    "the ACL token contains characters not allowed in a header".into(),
                )
            })?;
            value.set_sensitive(true);
            headers.insert("X-Consul-Token", value);
        }
        let settings = ClientSettings {
            connect_timeout: cfg.connect_timeout,
            headers,
            ca_file: cfg.ca_file.clone(),
            client_cert_file: cfg.client_cert_file.clone(),
            client_key_file: cfg.client_key_file.clone(),
        };
        let probe = Lane::unbounded(settings.build(false, 4)?);
        let polls = Arc::new(PollShards {
            settings: settings.clone(),
            transport: Transport::Http1,
            dialer: None,
            max_shards: 1,
            per_shard: usize::MAX,
            shards: Mutex::new(vec![(PollClient::Http1(probe.client.clone()), 0)]),
            setup: tokio::sync::Mutex::new(()),
            warm_url: base.clone(),
            connections: metrics.poll_connections.clone(),
        });
        Ok(Self {
            base,
            datacenter: cfg.datacenter.clone().filter(|dc| !dc.trim().is_empty()),
            allow_stale: cfg.allow_stale,
            metrics,
            settings,
            reads: probe.clone(),
            watches: probe,
            polls,
        })
    }

    /// The same client with its lanes built for `plan`.
    pub fn with_plan(&self, plan: &Plan) -> Result<Self, ConsulError> {
        let http2 = plan.transport == Transport::Http2;
        let reads_client = self.settings.build(http2, plan.reads)?;
        let watches = if http2 {
            // One HTTP/2 connection carries the reads and both catalog-wide watches.
            Lane::unbounded(reads_client.clone())
        } else {
            Lane::unbounded(self.settings.build(false, 2)?)
        };
        let reads = Lane {
            client: reads_client,
            permits: Some(Arc::new(Semaphore::new(plan.snapshot_reads))),
        };
        let dialer = if http2 {
            Some(Arc::new(self.settings.h2_dialer(&self.base)?))
        } else {
            None
        };
        let polls = Arc::new(PollShards {
            settings: self.settings.clone(),
            transport: plan.transport,
            dialer,
            max_shards: if http2 {
                plan.poll_connections.max(1)
            } else {
                1
            },
            per_shard: if http2 {
                plan.streams_per_connection()
            } else {
                usize::MAX
            },
            shards: Mutex::new(Vec::new()),
            setup: tokio::sync::Mutex::new(()),
            warm_url: self.url(&["v1", "status", "leader"], 0, Duration::ZERO),
            connections: self.metrics.poll_connections.clone(),
        });
        Ok(Self {
            reads,
            watches,
            polls,
            ..self.clone()
        })
    }

    /// After the first snapshot: fewer plain reads in flight (the long polls now hold
    /// the rest of the budget).
    pub fn narrow_reads(&self, to: usize) {
        if let Some(permits) = &self.reads.permits {
            let now = permits.available_permits();
            if now > to {
                permits.forget_permits(now - to);
            }
        }
    }

    /// A place for one more long poll.
    pub async fn poll_slot(&self) -> Result<PollSlot, ConsulError> {
        self.polls.slot().await
    }

    /// The URL requests go to (no secrets in it).
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// `/v1/agent/self`: the agent's per-client limit and, over TLS, whether it speaks
    /// HTTP/2. A 403 (no `agent:read`) leaves the limit unknown.
    pub async fn agent_facts(&self) -> Result<AgentFacts, ConsulError> {
        let conns_per_client = self.agent_self(&self.reads).await?;
        let transport = if self.base.scheme() == "https" && self.speaks_http2().await {
            Transport::Http2
        } else {
            Transport::Http1
        };
        Ok(AgentFacts {
            transport,
            conns_per_client,
        })
    }

    /// Whether an HTTP/2-only client gets an HTTP/2 answer (a proxy in front of the agent
    /// may not speak it). Failures mean "no": the HTTP/1.1 probe already succeeded.
    async fn speaks_http2(&self) -> bool {
        let client = match self.settings.build(true, 1) {
            Ok(client) => client,
            Err(e) => {
                warn!(error = %crate::registry::error_chain(&e), "cannot build an HTTP/2 client; using HTTP/1.1");
                return false;
            }
        };
        let url = self.url(&["v1", "agent", "self"], 0, Duration::ZERO);
        let path = url.path().to_string();
        let lane = Lane::unbounded(client);
        match self.send(&lane, &path, url, PLAIN_TIMEOUT, None).await {
            Ok(answer) if answer.version == reqwest::Version::HTTP_2 => {
                self.metrics.record(Endpoint::AgentSelf, true);
                true
            }
            Ok(_) => false,
            Err(e) => {
                self.metrics.record(Endpoint::AgentSelf, false);
                info!(error = %crate::registry::error_chain(&e), "the Consul agent does not answer over HTTP/2; long polls use one HTTP/1.1 connection each");
                false
            }
        }
    }

    async fn agent_self(&self, lane: &Lane) -> Result<Option<usize>, ConsulError> {
        let url = self.url(&["v1", "agent", "self"], 0, Duration::ZERO);
        let path = url.path().to_string();
        let result = async {
            let answer = self.send(lane, &path, url, PLAIN_TIMEOUT, None).await?;
            if answer.status == StatusCode::FORBIDDEN {
                return Ok(None);
            }
            answer.check_status(&path)?;
            api::decode_agent_conn_limit(&answer.body).map_err(|source| ConsulError::Decode {
                path: path.clone(),
                source,
            })
        }
        .await;
        self.metrics.record(Endpoint::AgentSelf, result.is_ok());
        result
    }

    /// Where a catalog-wide query goes: a blocking one on the watches lane (it holds its
    /// connection for minutes), a plain one on the bounded reads lane.
    fn catalog_lane(&self, index: u64) -> &Lane {
        if index > 0 {
            &self.watches
        } else {
            &self.reads
        }
    }

    /// `/v1/catalog/services`, blocking when `index > 0`.
    pub async fn catalog_services(
        &self,
        index: u64,
        wait: Duration,
    ) -> Result<Indexed<CatalogServices>, ConsulError> {
        self.get(
            self.catalog_lane(index),
            Endpoint::CatalogServices,
            &["v1", "catalog", "services"],
            index,
            wait,
            api::decode_catalog_services,
        )
        .await
    }

    /// `/v1/health/state/any`: every check of the datacenter, blocking when `index > 0`.
    /// Its index moves on any check change, and each check names its service.
    pub async fn health_state(
        &self,
        index: u64,
        wait: Duration,
    ) -> Result<Indexed<Vec<CheckState>>, ConsulError> {
        self.get(
            self.catalog_lane(index),
            Endpoint::HealthState,
            &["v1", "health", "state", "any"],
            index,
            wait,
            api::decode_health_state,
        )
        .await
    }

    /// `/v1/health/service/<name>` (every instance, with its checks): a plain read, or a
    /// blocking query on a long poll's place when `index > 0`.
    pub async fn health_service(
        &self,
        name: &str,
        index: u64,
        wait: Duration,
        via: Via<'_>,
    ) -> Result<Indexed<Vec<HealthEntry>>, ConsulError> {
        let segments = &["v1", "health", "service", name];
        let decode = api::decode_health_service;
        match via {
            // Boxed, the reads and the HTTP/1.1 long polls: a watcher holds this future for
            // minutes, 10,000 of them, and inline every watcher would carry the size of
            // reqwest's request future whichever path it takes.
            Via::Read => {
                Box::pin(self.get(
                    &self.reads,
                    Endpoint::HealthService,
                    segments,
                    index,
                    wait,
                    decode,
                ))
                .await
            }
            Via::Poll(slot) => match &slot.client {
                PollClient::Http1(client) => {
                    let lane = Lane::unbounded(client.clone());
                    Box::pin(self.get(
                        &lane,
                        Endpoint::HealthService,
                        segments,
                        index,
                        wait,
                        decode,
                    ))
                    .await
                }
                PollClient::Http2(shard) => {
                    self.get_h2(
                        shard,
                        Endpoint::HealthService,
                        segments,
                        index,
                        wait,
                        decode,
                    )
                    .await
                }
            },
        }
    }

    /// The URL of a blocking query on `/v1/health/service/<name>`, for a long poll that
    /// is sent through [`H2Shard::exchange`] (the multiplexed long polls).
    pub(super) fn health_service_url(&self, name: &str, index: u64, wait: Duration) -> String {
        self.url(&["v1", "health", "service", name], index, wait)
            .into()
    }

    /// The outcome of such a long poll that blocked on `sent`: counted, its errors
    /// naming the path, and decoded only when its index moved (a blocking query that
    /// waited out its wait answers the same body again: at rest that is every answer).
    pub(super) fn health_service_answer(
        &self,
        name: &str,
        sent: u64,
        exchanged: Result<super::h2::H2Answer, super::h2::Failure>,
    ) -> Result<PollAnswer, ConsulError> {
        // At rest every answer is this one: nothing to decode and no path to name.
        if let Ok(answer) = &exchanged {
            if sent > 1 && answer.status.is_success() && answer.index == Some(sent) {
                self.metrics.record(Endpoint::HealthService, true);
                return Ok(PollAnswer::Unchanged(sent));
            }
        }
        let url = self.url(&["v1", "health", "service", name], 0, Duration::ZERO);
        let path = url.path();
        let result = exchanged
            .map_err(|failure| failure.into_error(path))
            .and_then(|answer| {
                let answer = Answer {
                    status: answer.status,
                    version: reqwest::Version::HTTP_2,
                    index: answer.index,
                    body: answer.body,
                    headers_at: answer.headers_at,
                };
                answer
                    .indexed(path, api::decode_health_service)
                    .map(PollAnswer::Changed)
            });
        self.metrics.record(Endpoint::HealthService, result.is_ok());
        result
    }

    /// `/v1/catalog/node/<node>`: the node and its services (`None`: no such node),
    /// blocking when `index > 0`.
    pub async fn catalog_node(
        &self,
        node: &str,
        index: u64,
        wait: Duration,
    ) -> Result<Indexed<Option<api::NodeServices>>, ConsulError> {
        self.get(
            self.catalog_lane(index),
            Endpoint::CatalogNode,
            &["v1", "catalog", "node", node],
            index,
            wait,
            api::decode_node_services,
        )
        .await
    }

    /// `/v1/health/node/<node>`: every check of one node.
    pub async fn health_node(&self, node: &str) -> Result<Indexed<Vec<api::Check>>, ConsulError> {
        self.get(
            &self.reads,
            Endpoint::HealthNode,
            &["v1", "health", "node", node],
            0,
            Duration::ZERO,
            api::decode_checks,
        )
        .await
    }

    /// `/v1/internal/ui/services`: every service with the nodes it runs on, in one
    /// answer (the UI's own endpoint; the public API needs one request per service).
    pub async fn ui_services(&self) -> Result<Indexed<Vec<api::UiService>>, ConsulError> {
        self.get(
            &self.reads,
            Endpoint::UiServices,
            &["v1", "internal", "ui", "services"],
            0,
            Duration::ZERO,
            api::decode_ui_services,
        )
        .await
    }

    /// `PUT /v1/txn` with `body` (a JSON array of operations): all applied, or none
    /// (409, with Consul's reasons).
    pub async fn txn(&self, body: bytes::Bytes) -> Result<(), ConsulError> {
        let url = self.url(&["v1", "txn"], 0, Duration::ZERO);
        let path = url.path().to_string();
        let result = async {
            let answer = self
                .send(&self.reads, &path, url, PLAIN_TIMEOUT, Some(body))
                .await?;
            if answer.status == StatusCode::CONFLICT {
                return Err(ConsulError::TxnRolledBack {
                    errors: super::txn::TxnErrors::decode(&answer.body),
                });
            }
            answer.check_status(&path)
        }
        .await;
        self.metrics.record(Endpoint::Txn, result.is_ok());
        result
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
        lane: &Lane,
        endpoint: Endpoint,
        segments: &[&str],
        index: u64,
        wait: Duration,
        decode: fn(&[u8]) -> Result<T, serde_json::Error>,
    ) -> Result<Indexed<T>, ConsulError> {
        let url = self.url(segments, index, wait);
        let path = url.path().to_string();
        let result = async {
            let answer = self
                .send(lane, &path, url, request_timeout(index, wait), None)
                .await?;
            answer.indexed(&path, decode)
        }
        .await;
        self.metrics.record(endpoint, result.is_ok());
        result
    }

    /// [`Self::get`] on an HTTP/2 shard of the poll lane. Its own function, not a branch
    /// of `get`: every waiting long poll's future would then carry reqwest's request
    /// future too (see `a_waiting_long_poll_stays_small`).
    async fn get_h2<T>(
        &self,
        shard: &H2Shard,
        endpoint: Endpoint,
        segments: &[&str],
        index: u64,
        wait: Duration,
        decode: fn(&[u8]) -> Result<T, serde_json::Error>,
    ) -> Result<Indexed<T>, ConsulError> {
        let url = self.url(segments, index, wait);
        let path = url.path();
        let result = async {
            let answer = shard.get(&url, request_timeout(index, wait)).await?;
            Answer {
                status: answer.status,
                version: reqwest::Version::HTTP_2,
                index: answer.index,
                body: answer.body,
                headers_at: answer.headers_at,
            }
            .indexed(path, decode)
        }
        .await;
        self.metrics.record(endpoint, result.is_ok());
        result
    }

    /// Sends one GET (or, with a `body`, one PUT) on `lane` (holding one of its permits
    /// for the whole exchange, body included: that is when the connection is busy) and
    /// reads the whole answer.
    async fn send(
        &self,
        lane: &Lane,
        path: &str,
        url: Url,
        timeout: Duration,
        body: Option<bytes::Bytes>,
    ) -> Result<Answer, ConsulError> {
        let _permit = match &lane.permits {
            Some(permits) => Some(
                permits
                    .acquire()
                    .await
                    .map_err(|_| ConsulError::Config("the connection budget was closed".into()))?,
            ),
            None => None,
        };
        let request_error = |source| ConsulError::Request {
            path: path.to_string(),
            source,
        };
        let request = match body {
            Some(body) => lane
                .client
                .put(url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body),
            None => lane.client.get(url),
        };
        let response = request
            .timeout(timeout)
            .send()
            .await
            .map_err(request_error)?;
        let headers_at = std::time::Instant::now();
        let status = response.status();
        let version = response.version();
        let index = consul_index(response.headers());
        let body = response.bytes().await.map_err(request_error)?;
        Ok(Answer {
            status,
            version,
            index,
            body,
            headers_at,
        })
    }
}

/// One whole answer.
struct Answer {
    status: StatusCode,
    version: reqwest::Version,
    index: Option<u64>,
    body: bytes::Bytes,
    headers_at: std::time::Instant,
}

impl Answer {
    /// The decoded body of a successful answer of a blocking endpoint, with its index.
    fn indexed<T>(
        self,
        path: &str,
        decode: fn(&[u8]) -> Result<T, serde_json::Error>,
    ) -> Result<Indexed<T>, ConsulError> {
        self.check_status(path)?;
        let index = self.index.ok_or_else(|| ConsulError::MissingIndex {
            path: path.to_string(),
        })?;
        let value = decode(&self.body).map_err(|source| ConsulError::Decode {
            path: path.to_string(),
            source,
        })?;
        Ok(Indexed {
            index,
            value,
            transfer: self.headers_at.elapsed(),
            bytes: self.body.len(),
        })
    }

    fn check_status(&self, path: &str) -> Result<(), ConsulError> {
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            return Err(ConsulError::TooManyConnections {
                path: path.to_string(),
            });
        }
        if !self.status.is_success() {
            return Err(ConsulError::Status {
                path: path.to_string(),
                status: self.status.as_u16(),
                body: crate::registry::error_body(&self.body),
            });
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain counters: a panic elsewhere leaves them usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `X-Consul-Index` of an answer, when it has a readable one.
pub(super) fn consul_index(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("X-Consul-Index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// The timeout of a request: a blocking one outlasts its wait.
pub(super) fn request_timeout(index: u64, wait: Duration) -> Duration {
    if index > 0 {
        blocking_timeout(wait)
    } else {
        PLAIN_TIMEOUT
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

    fn answer(status: u16, index: Option<u64>, body: &str) -> super::super::h2::H2Answer {
        super::super::h2::H2Answer {
            status: StatusCode::from_u16(status).unwrap(),
            index,
            body: bytes::Bytes::copy_from_slice(body.as_bytes()),
            headers_at: std::time::Instant::now(),
        }
    }

    /// At rest a long poll answers the index it blocked on with the same body: it is
    /// not decoded (a body that would not decode shows it), while a moved index, a first
    /// read or a refusal are read as any answer.
    #[test]
    fn a_long_poll_answer_is_decoded_only_when_its_index_moved() {
        let http = http(|_| {});
        let garbage = "not json";
        let unchanged = http.health_service_answer("web", 7, Ok(answer(200, Some(7), garbage)));
        assert!(
            matches!(unchanged, Ok(PollAnswer::Unchanged(7))),
            "{unchanged:?}"
        );
        let moved = http.health_service_answer("web", 6, Ok(answer(200, Some(7), garbage)));
        assert!(
            matches!(moved, Err(ConsulError::Decode { .. })),
            "{moved:?}"
        );
        let first = http.health_service_answer("web", 1, Ok(answer(200, Some(1), "[]")));
        assert!(
            matches!(&first, Ok(PollAnswer::Changed(a)) if a.index == 1 && a.value.is_empty()),
            "{first:?}"
        );
        let refused = http.health_service_answer("web", 7, Ok(answer(403, Some(7), "denied")));
        assert!(
            matches!(refused, Err(ConsulError::Status { status: 403, .. })),
            "{refused:?}"
        );
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
