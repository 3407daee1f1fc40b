//! The registry side of the benchmark: synthetic catalog entries written through
//! Consul's catalog API (`PUT /v1/catalog/register`, `PUT /v1/catalog/deregister`).
//!
//! Instances live on three synthetic nodes, one per documentation range (RFC 5737),
//! so no address is ever contacted. Health is a passing (or critical) check entry
//! registered in the same call: nothing runs an active check. Every instance of every
//! service gets a distinct address within its service: instance `j` of any service is
//! `RANGE[j % 3].(1 + j / 3)`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use serde_json::{json, Value};

/// The three documentation ranges (TEST-NET-1, -2, -3).
pub const RANGES: [&str; 3] = ["192.0.2", "198.51.100", "203.0.113"];
/// The port every synthetic instance listens on.
pub const PORT: u16 = 8080;
/// Highest host part used for instances; the nodes themselves sit at `.250`.
const MAX_HOST: usize = 249;

/// The per-client connection limit of the Consul agent (`limits.http_max_conns_per_client`,
/// 200 by default) counts every connection from 127.0.0.1: the connector's long polls
/// (up to 180) and the harness's own. The harness therefore keeps at most a couple of
/// connections open while a connector runs.
const IDLE_CONNECTIONS: usize = 2;

/// One synthetic instance.
#[derive(Debug, Clone)]
pub struct Instance {
    pub j: usize,
    pub id: String,
    pub address: String,
    pub passing: bool,
}

impl Instance {
    pub fn node(&self) -> usize {
        self.j % RANGES.len()
    }
}

/// One synthetic service and the instances the harness believes are registered.
#[derive(Debug, Clone)]
pub struct Service {
    /// Registry name, also the Kubernetes name (already a DNS label).
    pub name: String,
    pub tag: String,
    /// Node names are `<nodes>-a`, `-b`, `-c`: one set per data set, so that removing
    /// a data set is three node deregistrations.
    pub nodes: String,
    pub instances: Vec<Instance>,
    pub next_j: usize,
}

impl Service {
    pub fn new(name: String, tag: String, nodes: String, m: usize) -> Self {
        let mut s = Service {
            name,
            tag,
            nodes,
            instances: Vec::new(),
            next_j: 0,
        };
        for _ in 0..m {
            let inst = s.make_instance();
            s.instances.push(inst);
        }
        s
    }

    /// A new instance (not yet registered or recorded).
    pub fn make_instance(&mut self) -> Instance {
        let j = self.next_j;
        self.next_j += 1;
        let host = 1 + (j / RANGES.len()) % MAX_HOST;
        Instance {
            j,
            id: format!("{}-{j}", self.name),
            address: format!("{}.{host}", RANGES[j % RANGES.len()]),
            passing: true,
        }
    }

    /// Addresses that should appear as ready endpoints.
    pub fn ready_addresses(&self) -> BTreeSet<String> {
        self.instances
            .iter()
            .filter(|i| i.passing)
            .map(|i| i.address.clone())
            .collect()
    }

    pub fn passing_count(&self) -> usize {
        self.instances.iter().filter(|i| i.passing).count()
    }
}

/// A Consul HTTP client restricted to what the benchmark does.
#[derive(Debug)]
pub struct Registry {
    base: String,
    port: u16,
    http: reqwest::Client,
    /// Node-name prefixes of the data sets registered, for the cleanup.
    datasets: std::sync::Mutex<Vec<String>>,
}

const NODE_SUFFIXES: [&str; 3] = ["a", "b", "c"];

fn node_name(prefix: &str, node: usize) -> String {
    format!("{prefix}-{}", NODE_SUFFIXES[node])
}

fn client(idle: usize) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(idle)
        .no_proxy()
        .build()
        .context("http client")
}

impl Registry {
    pub fn new(addr: &str) -> Result<Self> {
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
            datasets: Default::default(),
        })
    }

    fn node_address(&self, node: usize) -> String {
        format!("{}.250", RANGES[node])
    }

    async fn put(&self, path: &str, body: &Value) -> Result<()> {
        self.put_with(&self.http, path, body).await
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
        let node = inst.node();
        let status = if inst.passing { "passing" } else { "critical" };
        let body = json!({
            "Node": node_name(&svc.nodes, node),
            "Address": self.node_address(node),
            "SkipNodeUpdate": true,
            "Service": {
                "ID": inst.id,
                "Service": svc.name,
                "Tags": [svc.tag],
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

    /// Changes only the check of one instance (a health flip).
    pub async fn set_health(&self, svc: &Service, inst: &Instance, passing: bool) -> Result<()> {
        self.check_with(&self.http, svc, inst, passing, "").await
    }

    async fn check_with(
        &self,
        http: &reqwest::Client,
        svc: &Service,
        inst: &Instance,
        passing: bool,
        output: &str,
    ) -> Result<()> {
        let node = inst.node();
        let body = json!({
            "Node": node_name(&svc.nodes, node),
            "Address": self.node_address(node),
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
        let body = json!({ "Node": node_name(&svc.nodes, inst.node()), "ServiceID": inst.id });
        self.put("/v1/catalog/deregister", &body).await
    }

    /// Registers every instance of `services`, `concurrency` calls at a time.
    /// Returns the wall time taken.
    /// Its own client, dropped at the end, so that its connections are closed
    /// before a connector starts.
    pub async fn register_all(&self, services: &[Service], concurrency: usize) -> Result<Duration> {
        let started = Instant::now();
        {
            let mut d = self.datasets.lock().unwrap_or_else(|e| e.into_inner());
            for s in services {
                if !d.contains(&s.nodes) {
                    d.push(s.nodes.clone());
                }
            }
        }
        let bulk = client(0)?;
        let calls = services
            .iter()
            .flat_map(|s| s.instances.iter().map(move |i| (s, i)));
        futures::stream::iter(calls)
            .map(|(s, i)| self.register_with(&bulk, s, i))
            .buffer_unordered(concurrency.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        Ok(started.elapsed())
    }

    /// Moves the index of every service (a check's output changes, nothing the
    /// connector reads) and of the service list, without changing what is published.
    ///
    /// Consul 1.8 does not notice that the client of a blocking query went away: the
    /// query holds its connection (CLOSE_WAIT), which still counts against the
    /// per-client limit, until its wait runs out or its index moves. A connector that
    /// was stopped leaves up to 180 such connections for up to 5 minutes, and the next
    /// connector on 127.0.0.1 is refused meanwhile; touching every service ends them.
    pub async fn touch_all(&self, services: &[Service], concurrency: usize) -> Result<()> {
        let bulk = client(0)?;
        futures::stream::iter(services.iter())
            .map(|s| {
                let inst = &s.instances[0];
                self.check_with(&bulk, s, inst, inst.passing, "touched")
            })
            .buffer_unordered(concurrency.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        if let Some(s) = services.first() {
            // The service list: register and remove a throwaway service.
            let mut probe = Service::new(
                format!("{}-touch", s.name),
                "bench-touch".into(),
                s.nodes.clone(),
                1,
            );
            probe.instances[0].address = format!("{}.250", RANGES[0]);
            let inst = probe.instances[0].clone();
            self.register_with(&bulk, &probe, &inst).await?;
            let body = json!({ "Node": node_name(&probe.nodes, 0), "ServiceID": inst.id });
            self.put_with(&bulk, "/v1/catalog/deregister", &body)
                .await?;
        }
        Ok(())
    }

    /// Removes one data set (its three nodes and every instance on them).
    pub async fn remove_dataset(&self, nodes: &str) -> Result<()> {
        for i in 0..NODE_SUFFIXES.len() {
            self.put(
                "/v1/catalog/deregister",
                &json!({ "Node": node_name(nodes, i) }),
            )
            .await?;
        }
        self.datasets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|d| d != nodes);
        Ok(())
    }

    /// Removes every data set this run registered.
    pub async fn cleanup(&self) -> Result<()> {
        let sets = self
            .datasets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for nodes in sets {
            self.remove_dataset(&nodes).await?;
        }
        Ok(())
    }

    /// Server-side TCP connections of the Consul agent's HTTP port that are open or
    /// half-closed (ESTABLISHED, CLOSE_WAIT): what its per-client limit counts.
    pub fn open_connections(&self) -> usize {
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
    pub async fn wait_connections_below(&self, max: usize, timeout: Duration) -> usize {
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
        let resp = self
            .http
            .get(format!("{}/v1/catalog/service/{service}", self.base))
            .send()
            .await?
            .error_for_status()?;
        let v: Value = resp.json().await?;
        Ok(v.as_array().map(|a| a.len()).unwrap_or(0))
    }
}

/// `n` services named `<prefix>-<i>` tagged `tag`, `m` instances each, on the nodes
/// `<prefix>-node-{a,b,c}`.
pub fn make_services(prefix: &str, tag: &str, n: usize, m: usize) -> Vec<Service> {
    let nodes = format!("{prefix}-node");
    (0..n)
        .map(|i| {
            Service::new(
                format!("{prefix}-{i:05}"),
                tag.to_string(),
                nodes.clone(),
                m,
            )
        })
        .collect()
}
