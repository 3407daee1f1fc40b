//! Consul as the benchmark drives it: synthetic catalog entries written through the
//! catalog API (`PUT /v1/catalog/register`, `PUT /v1/catalog/deregister`), and the
//! release of the blocking queries a stopped connector leaves behind.
//!
//! A data set's instances live on three synthetic nodes (`<set>-node-{a,b,c}`), one per
//! documentation range, so removing a data set is three node deregistrations and no
//! address is ever contacted. Health is a passing (or critical) check entry registered
//! in the same call: nothing runs an active check.
//!
//! The connector reads the agent over plain HTTP or over its HTTPS API (see
//! [`ConnectorLink`]); the harness's own writes always go over plain HTTP (what they
//! cost does not depend on the connector's transport).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use serde_json::{json, Value};

use super::consul_link::{port_of, ConnectorLink};
use super::DataSets;
use crate::model::{Instance, Service, PORT, RANGES};

/// The per-client connection limit of the Consul agent (`limits.http_max_conns_per_client`,
/// 200 by default) counts every connection from 127.0.0.1: the connector's long polls
/// and the harness's own. The harness keeps one connection of its own open for the
/// whole run (the reserve, see [`Consul::new`]): the agent may be full of a stopped
/// connector's long polls, and the call that ends them must still get through.
const IDLE_CONNECTIONS: usize = 1;
/// How often the reserve connection is used, so that it stays open.
const RESERVE_PING: Duration = Duration::from_secs(5);
/// Idle connections of the bulk clients are closed at once.
const BULK_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

/// Calls in flight while a stopped connector's long polls may still hold most of the
/// agent's per-client limit (see [`Consul::release`]): bulk loads, when no connector
/// has run on the data set, use the caller's concurrency.
const CONCURRENCY_NEAR_LIMIT: usize = 4;

/// How long one harness call is retried while the agent refuses it at the connection
/// level (its per-client limit resets a connection beyond it) or answers 429: past
/// Consul's longest blocking wait (5 min), after which a stopped connector's long polls
/// have ended by themselves.
const RETRY_FOR: Duration = Duration::from_secs(330);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

const NODE_SUFFIXES: [&str; 3] = ["a", "b", "c"];

/// Connections the Consul agent kept for a stopped connector (see [`Consul::touch_all`]).
#[derive(Debug, Clone, Serialize)]
pub struct ConnRelease {
    pub when: String,
    pub held_after_stop: usize,
    pub left_after_release: usize,
    pub release_s: f64,
}

/// A Consul HTTP client restricted to what the benchmark does.
#[derive(Debug)]
pub struct Consul {
    base: String,
    port: u16,
    /// One connection, kept open (the reserve).
    http: reqwest::Client,
    reserve: tokio::task::JoinHandle<()>,
    link: ConnectorLink,
    sets: DataSets,
}

impl Drop for Consul {
    fn drop(&mut self) {
        self.reserve.abort();
    }
}

/// Whether a failed call may be the agent refusing one more connection from this
/// address (reset, closed before the answer, timed out): anything but an HTTP status.
fn refused(e: &reqwest::Error) -> bool {
    e.status().is_none()
}

fn node_name(set: &str, node: usize) -> String {
    format!("{set}-node-{}", NODE_SUFFIXES[node])
}

fn node_address(node: usize) -> String {
    format!("{}.250", RANGES[node])
}

fn node_of(inst: &Instance) -> usize {
    inst.j % RANGES.len()
}

/// A client keeping at most `idle` idle connections, for `idle_timeout` (`None`: for
/// as long as the agent keeps them).
fn client(idle: usize, idle_timeout: Option<Duration>) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(idle)
        .pool_idle_timeout(idle_timeout)
        .no_proxy()
        .build()
        .context("building the Consul HTTP client")
}

/// A bulk client: its connections close as soon as it is done.
fn bulk() -> Result<reqwest::Client> {
    client(0, Some(BULK_IDLE_TIMEOUT))
}

/// Uses the reserve connection every [`RESERVE_PING`] so that neither side drops it.
fn keep_reserve(http: reqwest::Client, base: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let _ = http.get(format!("{base}/v1/status/leader")).send().await;
            tokio::time::sleep(RESERVE_PING).await;
        }
    })
}

impl Consul {
    /// `addr` is `127.0.0.1:PORT` (or an http URL on the loopback) of the plain HTTP
    /// API, which the harness writes through. Starts the task that keeps the reserve
    /// connection open (must run inside the Tokio runtime).
    pub fn new(addr: &str, link: ConnectorLink) -> Result<Self> {
        let base = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", addr.trim_end_matches('/'))
        };
        if !(base.starts_with("http://127.") || base.starts_with("http://localhost")) {
            bail!("the benchmark only talks to a Consul agent on the loopback, not {base}");
        }
        let port = port_of(&base)?;
        link.check()?;
        let http = client(IDLE_CONNECTIONS, None)?;
        Ok(Self {
            reserve: keep_reserve(http.clone(), base.clone()),
            base,
            port,
            http,
            link,
            sets: DataSets::default(),
        })
    }

    /// Whether the connectors read the agent over HTTPS.
    pub fn tls(&self) -> bool {
        self.link.tls.is_some()
    }

    /// The port the connectors connect to (HTTP or HTTPS API).
    pub fn connector_port(&self) -> u16 {
        match &self.link.tls {
            Some(tls) => tls.port().unwrap_or(self.port),
            None => self.port,
        }
    }

    /// The connector's flags that make it reach this agent (plain HTTP, or HTTPS with
    /// the environment's client certificate).
    pub fn address_flags(&self) -> Vec<String> {
        match &self.link.tls {
            Some(tls) => tls.flags(),
            None => vec!["--consul-http-addr".into(), self.http_addr().to_string()],
        }
    }

    /// The agent's plain HTTP address (`127.0.0.1:PORT`), which the harness uses.
    pub fn http_addr(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// The connector's flags that make it read this agent and only data set `set`.
    pub fn selection_flags(&self, set: &str) -> Vec<String> {
        let mut flags = self.address_flags();
        flags.extend(["--filter-tag".into(), set.into()]);
        flags
    }

    /// Consul-specific tuning of every connector: none unless the harness was given
    /// `--consul-max-connections` (the figures are those of the connector's own budget).
    pub fn tuning_flags(&self) -> Vec<String> {
        match self.link.max_connections {
            Some(n) => vec!["--consul-max-connections".into(), n.to_string()],
            None => Vec::new(),
        }
    }

    /// The agent's `limits.http_max_conns_per_client`, from `GET /v1/agent/self`.
    pub async fn conn_limit(&self) -> Result<u64> {
        let v: Value = self
            .http
            .get(format!("{}/v1/agent/self", self.base))
            .send()
            .await
            .context("GET /v1/agent/self")?
            .error_for_status()
            .context("GET /v1/agent/self")?
            .json()
            .await
            .context("decoding GET /v1/agent/self")?;
        v["DebugConfig"]["HTTPMaxConnsPerClient"]
            .as_u64()
            .context("no DebugConfig.HTTPMaxConnsPerClient in /v1/agent/self")
    }

    /// One PUT, retried (for at most [`RETRY_FOR`], with backoff) while the agent
    /// refuses the connection or answers 429: a stopped connector's long polls may fill
    /// its per-client limit.
    async fn put_with(&self, http: &reqwest::Client, path: &str, body: &Value) -> Result<()> {
        let deadline = Instant::now() + RETRY_FOR;
        let mut backoff = Duration::from_millis(100);
        loop {
            let last = Instant::now() + backoff > deadline;
            let resp = match http
                .put(format!("{}{}", self.base, path))
                .json(body)
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) if !last && refused(&e) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
                Err(e) => return Err(e).with_context(|| format!("PUT {path}")),
            };
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            if status == reqwest::StatusCode::TOO_MANY_REQUESTS && !last {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            if !status.is_success() {
                bail!("PUT {path}: {status}: {text}");
            }
            if text.trim() == "false" {
                bail!("PUT {path}: Consul answered false");
            }
            return Ok(());
        }
    }

    /// Registers (or re-registers) one instance with its check, in one catalog call.
    pub async fn register(&self, svc: &Service, inst: &Instance) -> Result<()> {
        self.register_with(&self.http, svc, inst).await
    }

    async fn register_with(
        &self,
        http: &reqwest::Client,
        svc: &Service,
        inst: &Instance,
    ) -> Result<()> {
        let node = node_of(inst);
        let status = if inst.ready { "passing" } else { "critical" };
        let body = json!({
            "Node": node_name(&svc.set, node),
            "Address": node_address(node),
            "SkipNodeUpdate": true,
            "Service": {
                "ID": inst.id,
                "Service": svc.name,
                "Tags": [svc.set],
                "Address": inst.address,
                "Port": PORT,
            },
            "Check": {
                "CheckID": format!("service:{}", inst.id),
                "Name": "bench synthetic check",
                "Status": status,
                "ServiceID": inst.id,
            },
        });
        self.put_with(http, "/v1/catalog/register", &body).await
    }

    /// Changes only the check of one instance (passing ↔ critical).
    pub async fn set_ready(&self, svc: &Service, inst: &Instance, ready: bool) -> Result<()> {
        self.check_with(&self.http, svc, inst, ready, "").await
    }

    async fn check_with(
        &self,
        http: &reqwest::Client,
        svc: &Service,
        inst: &Instance,
        passing: bool,
        output: &str,
    ) -> Result<()> {
        let node = node_of(inst);
        let body = json!({
            "Node": node_name(&svc.set, node),
            "Address": node_address(node),
            "SkipNodeUpdate": true,
            "Check": {
                "CheckID": format!("service:{}", inst.id),
                "Name": "bench synthetic check",
                "Status": if passing { "passing" } else { "critical" },
                "Output": output,
                "ServiceID": inst.id,
            },
        });
        self.put_with(http, "/v1/catalog/register", &body).await
    }

    /// Removes one instance (and its check).
    pub async fn deregister(&self, svc: &Service, inst: &Instance) -> Result<()> {
        let body = json!({ "Node": node_name(&svc.set, node_of(inst)), "ServiceID": inst.id });
        self.put_with(&self.http, "/v1/catalog/deregister", &body)
            .await
    }

    /// Registers every instance of `services`, `concurrency` calls at a time, over a
    /// client of its own that is dropped at the end, so that its connections are
    /// closed before a connector starts.
    pub async fn register_all(&self, services: &[Service], concurrency: usize) -> Result<()> {
        self.sets.add(services);
        let bulk = bulk()?;
        let calls = services
            .iter()
            .flat_map(|s| s.instances.iter().map(move |i| (s, i)));
        futures::stream::iter(calls)
            .map(|(s, i)| self.register_with(&bulk, s, i))
            .buffer_unordered(concurrency.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Moves the index of every service (a check's output changes, nothing the
    /// connector reads) and of the service list, without changing what is published.
    ///
    /// Consul 1.8 does not notice that the client of a blocking query went away: the
    /// query holds its connection (CLOSE_WAIT), which still counts against the
    /// per-client limit, until its wait runs out or its index moves. A connector that
    /// was stopped leaves one such connection per watched service for up to 5 minutes,
    /// and the next connector on 127.0.0.1 may be refused meanwhile; touching every
    /// service ends them.
    async fn touch_all(&self, services: &[Service], concurrency: usize) -> Result<()> {
        let bulk = bulk()?;
        futures::stream::iter(services.iter().filter(|s| !s.instances.is_empty()))
            .map(|s| {
                let inst = &s.instances[0];
                self.check_with(&bulk, s, inst, inst.ready, "touched")
            })
            .buffer_unordered(concurrency.clamp(1, CONCURRENCY_NEAR_LIMIT))
            .try_collect::<Vec<()>>()
            .await?;
        if let Some(s) = services.first() {
            // The service list: register and remove a throwaway service.
            let mut probe = Service::new(format!("{}-touch", s.name), s.set.clone(), 1);
            probe.instances[0].address = node_address(0);
            let inst = probe.instances[0].clone();
            self.register_with(&bulk, &probe, &inst).await?;
            let body = json!({ "Node": node_name(&probe.set, 0), "ServiceID": inst.id });
            self.put_with(&bulk, "/v1/catalog/deregister", &body)
                .await?;
        }
        Ok(())
    }

    /// After a connector stopped: counts the connections the agent still holds for it,
    /// ends its abandoned blocking queries (touching `services`, or removing their data
    /// set when `remove`), and waits until the agent has let go of them, so that the
    /// next connector is not refused by the per-client connection limit.
    pub async fn release(
        &self,
        services: &[Service],
        remove: bool,
        when: &str,
        concurrency: usize,
    ) -> Result<ConnRelease> {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let held = self.open_connections();
        let t = Instant::now();
        if remove {
            if let Some(s) = services.first() {
                self.remove_set(&s.set).await?;
            }
        } else {
            self.touch_all(services, concurrency).await?;
        }
        let left = self
            .wait_connections_below(4, Duration::from_secs(60))
            .await;
        let release = ConnRelease {
            when: when.to_string(),
            held_after_stop: held,
            left_after_release: left,
            release_s: t.elapsed().as_secs_f64(),
        };
        crate::say(format!(
            "Consul still held {held} connections {when}; {left} after releasing them ({:.1} s)",
            release.release_s
        ));
        Ok(release)
    }

    /// Removes one data set (its three nodes and every instance on them).
    pub async fn remove_set(&self, set: &str) -> Result<()> {
        for i in 0..NODE_SUFFIXES.len() {
            self.put_with(
                &self.http,
                "/v1/catalog/deregister",
                &json!({ "Node": node_name(set, i) }),
            )
            .await?;
        }
        self.sets.remove(set);
        Ok(())
    }

    /// Removes every data set this run registered and did not remove yet.
    pub async fn cleanup(&self) -> Result<()> {
        for set in self.sets.all() {
            self.remove_set(&set).await?;
        }
        Ok(())
    }

    /// Server-side TCP connections of the Consul agent's HTTP (and, with TLS, HTTPS)
    /// port that are open or half-closed (ESTABLISHED, CLOSE_WAIT): what its per-client
    /// limit counts.
    pub fn open_connections(&self) -> usize {
        let mut ports = vec![format!(":{:04X}", self.port)];
        if self.link.tls.is_some() {
            ports.push(format!(":{:04X}", self.connector_port()));
        }
        ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .map(|t| {
                t.lines()
                    .skip(1)
                    .filter(|l| {
                        let cols: Vec<&str> = l.split_whitespace().collect();
                        cols.len() > 3
                            && ports.iter().any(|p| cols[1].ends_with(p.as_str()))
                            && (cols[3] == "01" || cols[3] == "08")
                    })
                    .count()
            })
            .sum()
    }

    /// Waits (bounded) until at most `max` connections to the agent are open.
    async fn wait_connections_below(&self, max: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.open_connections();
            if n <= max || Instant::now() >= deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Number of instances Consul reports for `service` (any health), for sanity checks.
    pub async fn instance_count(&self, service: &str) -> Result<usize> {
        let path = format!("/v1/catalog/service/{service}");
        let v: Value = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .with_context(|| format!("GET {path}"))?
            .error_for_status()
            .with_context(|| format!("GET {path}"))?
            .json()
            .await
            .with_context(|| format!("decoding GET {path}"))?;
        Ok(v.as_array().map(|a| a.len()).unwrap_or(0))
    }
}
