//! Consul as the benchmark drives it: synthetic catalog entries written through the
//! catalog API (`PUT /v1/catalog/register`, `PUT /v1/catalog/deregister`), and the
//! release of the blocking queries a stopped connector leaves behind.
//!
//! A data set's instances live on three synthetic nodes (`<set>-node-{a,b,c}`), one per
//! documentation range, so removing a data set is three node deregistrations and no
//! address is ever contacted. Health is a passing (or critical) check entry registered
//! in the same call: nothing runs an active check.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use serde_json::{json, Value};

use super::DataSets;
use crate::model::{Instance, Service, PORT, RANGES};

/// The per-client connection limit of the Consul agent (`limits.http_max_conns_per_client`,
/// 200 by default) counts every connection from 127.0.0.1: the connector's long polls
/// and the harness's own. The harness therefore keeps at most a couple of connections
/// open while a connector runs.
const IDLE_CONNECTIONS: usize = 2;

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
    http: reqwest::Client,
    /// The connector's `--consul-max-connections`.
    max_connections: usize,
    sets: DataSets,
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

fn client(idle: usize) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(idle)
        .no_proxy()
        .build()
        .context("building the Consul HTTP client")
}

impl Consul {
    /// `addr` is `127.0.0.1:PORT` (or an http URL on the loopback).
    pub fn new(addr: &str, max_connections: usize) -> Result<Self> {
        let base = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", addr.trim_end_matches('/'))
        };
        if !(base.starts_with("http://127.") || base.starts_with("http://localhost")) {
            bail!("the benchmark only talks to a Consul agent on the loopback, not {base}");
        }
        let port = base
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse().ok())
            .context("no port in the Consul address")?;
        Ok(Self {
            base,
            port,
            http: client(IDLE_CONNECTIONS)?,
            max_connections,
            sets: DataSets::default(),
        })
    }

    /// The connector's flags that make it read this agent and only data set `set`.
    pub fn selection_flags(&self, set: &str) -> Vec<String> {
        vec![
            "--consul-http-addr".into(),
            self.base.trim_start_matches("http://").to_string(),
            "--filter-tag".into(),
            set.into(),
        ]
    }

    /// Consul-specific tuning of every connector: `--consul-max-connections` above the
    /// number of services lets every watched service keep its own long poll.
    pub fn tuning_flags(&self) -> Vec<String> {
        vec![
            "--consul-max-connections".into(),
            self.max_connections.to_string(),
        ]
    }

    async fn put_with(&self, http: &reqwest::Client, path: &str, body: &Value) -> Result<()> {
        let resp = http
            .put(format!("{}{}", self.base, path))
            .json(body)
            .send()
            .await
            .with_context(|| format!("PUT {path}"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("PUT {path}: {status}: {text}");
        }
        if text.trim() == "false" {
            bail!("PUT {path}: Consul answered false");
        }
        Ok(())
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
        let bulk = client(0)?;
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
        let bulk = client(0)?;
        futures::stream::iter(services.iter().filter(|s| !s.instances.is_empty()))
            .map(|s| {
                let inst = &s.instances[0];
                self.check_with(&bulk, s, inst, inst.ready, "touched")
            })
            .buffer_unordered(concurrency.max(1))
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

    /// Server-side TCP connections of the Consul agent's HTTP port that are open or
    /// half-closed (ESTABLISHED, CLOSE_WAIT): what its per-client limit counts.
    fn open_connections(&self) -> usize {
        let port = format!(":{:04X}", self.port);
        ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .map(|t| {
                t.lines()
                    .skip(1)
                    .filter(|l| {
                        let cols: Vec<&str> = l.split_whitespace().collect();
                        cols.len() > 3
                            && cols[1].ends_with(&port)
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
