//! The real `registry-connector` binary as a child process, with its admin endpoints.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

/// A running connector process; killed when dropped.
pub struct Connector {
    child: Option<Child>,
    pub admin: String,
    pub log: PathBuf,
    http: reqwest::Client,
}

/// A free loopback port (bound then released: good enough on a quiet machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Leader-election settings of a [`ConnectorBuilder`].
#[derive(Debug, Clone, Default)]
struct LeaderElection {
    lease_namespace: String,
    lease_name: String,
    holder: Option<String>,
    duration: Option<String>,
    renew_interval: Option<String>,
}

/// Which registry command the process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Registry {
    Consul,
    Eureka,
    Nacos,
    Zookeeper,
}

/// Options of a connector process; `start` spawns it.
pub struct ConnectorBuilder<'a> {
    env: &'a testenv::TestEnv,
    namespace: String,
    kubeconfig: Option<PathBuf>,
    registry: Registry,
    /// Another registry address than the environment's.
    registry_addr: Option<String>,
    leader_election: Option<LeaderElection>,
    /// Keep the shipped coalescing periods instead of the tests' short ones.
    shipped_timing: bool,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl ConnectorBuilder<'_> {
    /// Another kubeconfig file than the environment's admin one (e.g. a ServiceAccount's).
    pub fn kubeconfig(mut self, path: impl Into<PathBuf>) -> Self {
        self.kubeconfig = Some(path.into());
        self
    }

    /// Another Consul address than the environment's agent (`host:port` or a URL).
    pub fn consul_addr(mut self, addr: impl Into<String>) -> Self {
        self.registry = Registry::Consul;
        self.registry_addr = Some(addr.into());
        self
    }

    /// Runs `registry-connector nacos` against the environment's Nacos server.
    pub fn nacos(mut self) -> Self {
        self.registry = Registry::Nacos;
        self.registry_addr = None;
        self
    }

    /// Runs `registry-connector zookeeper` against the environment's ZooKeeper server.
    pub fn zookeeper(mut self) -> Self {
        self.registry = Registry::Zookeeper;
        self.registry_addr = None;
        self
    }

    /// Runs `registry-connector zookeeper` against another server than the environment's.
    pub fn zookeeper_at(mut self, addr: impl Into<String>) -> Self {
        self.registry = Registry::Zookeeper;
        self.registry_addr = Some(addr.into());
        self
    }

    /// Runs `registry-connector eureka` against the environment's Eureka server (or the
    /// given service URL) instead of the Consul command.
    pub fn eureka(mut self, url: Option<&str>) -> Self {
        self.registry = Registry::Eureka;
        self.registry_addr = url.map(str::to_string);
        self
    }

    /// `--leader-elect=true` on the Lease `namespace/name`.
    pub fn leader_elect(mut self, lease_namespace: &str, lease_name: &str) -> Self {
        self.leader_election = Some(LeaderElection {
            lease_namespace: lease_namespace.to_string(),
            lease_name: lease_name.to_string(),
            ..Default::default()
        });
        self
    }

    /// `--lease-holder`; needs [`Self::leader_elect`] first.
    pub fn lease_holder(mut self, holder: &str) -> Self {
        if let Some(le) = self.leader_election.as_mut() {
            le.holder = Some(holder.to_string());
        }
        self
    }

    /// `--lease-duration` and `--lease-renew-interval` (e.g. "4s", "1s"); needs
    /// [`Self::leader_elect`] first.
    pub fn lease_timing(mut self, duration: &str, renew_interval: &str) -> Self {
        if let Some(le) = self.leader_election.as_mut() {
            le.duration = Some(duration.to_string());
            le.renew_interval = Some(renew_interval.to_string());
        }
        self
    }

    /// Leaves `--quiet-period` and `--max-period` at their shipped defaults (1s, 5s)
    /// instead of the tests' 100ms/500ms: for tests that hold the connector to what an
    /// operator gets without flags.
    pub fn shipped_timing(mut self) -> Self {
        self.shipped_timing = true;
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<S: AsRef<str>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// An environment variable of the child process (e.g. `POD_NAME`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    /// Spawns the process; it is killed when the returned [`Connector`] drops.
    pub fn start(self) -> Result<Connector> {
        let env = self.env;
        let port = free_port();
        let admin = format!("127.0.0.1:{port}");
        let log = env
            .dir()
            .join("logs")
            .join(format!("connector-{}-{port}.log", self.namespace));
        let out = std::fs::File::create(&log).context("connector log file")?;
        let err = out.try_clone()?;
        let kubeconfig = self
            .kubeconfig
            .unwrap_or_else(|| env.kubeconfig().to_path_buf());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_registry-connector"));
        match self.registry {
            Registry::Consul => {
                let addr = match self.registry_addr {
                    Some(addr) => addr,
                    None => env.consul_addr()?.to_string(),
                };
                cmd.arg("consul").args(["--consul-http-addr", &addr]);
            }
            Registry::Eureka => {
                let url = match self.registry_addr {
                    Some(url) => url,
                    None => env.eureka_url()?.to_string(),
                };
                cmd.arg("eureka").args(["--eureka-url", &url]);
            }
            Registry::Nacos => {
                let addr = match self.registry_addr {
                    Some(addr) => addr,
                    None => env.nacos_addr()?.to_string(),
                };
                cmd.arg("nacos").args(["--nacos-addr", &addr]);
            }
            Registry::Zookeeper => {
                let addr = match self.registry_addr {
                    Some(addr) => addr,
                    None => env.zookeeper_addr()?.to_string(),
                };
                cmd.arg("zookeeper").args(["--zookeeper-addr", &addr]);
            }
        }
        cmd.args(["--kubeconfig", &kubeconfig.to_string_lossy()])
            .args(["--namespace", &self.namespace])
            .args(["--admin-addr", &admin]);
        if !self.shipped_timing {
            cmd.args(["--quiet-period", "100ms", "--max-period", "500ms"]);
        }
        match &self.leader_election {
            None => {
                cmd.arg("--leader-elect=false");
            }
            Some(le) => {
                cmd.arg("--leader-elect=true")
                    .args(["--lease-namespace", &le.lease_namespace])
                    .args(["--lease-name", &le.lease_name]);
                if let Some(holder) = &le.holder {
                    cmd.args(["--lease-holder", holder]);
                }
                if let Some(d) = &le.duration {
                    cmd.args(["--lease-duration", d]);
                }
                if let Some(r) = &le.renew_interval {
                    cmd.args(["--lease-renew-interval", r]);
                }
            }
        }
        cmd.args(&self.args)
            .env("RUST_LOG", "info,registry_connector=debug")
            .env_remove("CONSUL_HTTP_TOKEN")
            .env_remove("EUREKA_PASSWORD")
            .env_remove("NACOS_PASSWORD")
            .env_remove("ZOOKEEPER_DIGEST_PASSWORD")
            // The test runner's own pod identity (if any) must not leak into the lease.
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        let child = cmd.spawn().context("starting registry-connector")?;
        Ok(Connector {
            child: Some(child),
            admin,
            log,
            http: reqwest::Client::new(),
        })
    }
}

impl Connector {
    /// Starts `registry-connector consul` with the test environment's kubeconfig and
    /// Consul, short coalescing periods, no leader election, and `extra` flags.
    pub fn consul(env: &testenv::TestEnv, namespace: &str, extra: &[&str]) -> Result<Self> {
        Self::builder(env, namespace).args(extra).start()
    }

    /// A connector to configure before starting it: the defaults are those of
    /// [`Connector::consul`] (admin kubeconfig, the environment's Consul, 100ms/500ms
    /// coalescing, `--leader-elect=false`, an admin server on a free loopback port).
    pub fn builder<'a>(env: &'a testenv::TestEnv, namespace: &str) -> ConnectorBuilder<'a> {
        ConnectorBuilder {
            env,
            namespace: namespace.to_string(),
            kubeconfig: None,
            registry: Registry::Consul,
            registry_addr: None,
            leader_election: None,
            shipped_timing: false,
            args: Vec::new(),
            envs: Vec::new(),
        }
    }

    /// `/readyz` status code, or None when the server does not answer yet.
    pub async fn readyz(&self) -> Option<u16> {
        let resp = self
            .http
            .get(format!("http://{}/readyz", self.admin))
            .send()
            .await
            .ok()?;
        Some(resp.status().as_u16())
    }

    pub async fn wait_ready(&self) -> Result<()> {
        testenv::wait_for(
            "the connector to be ready",
            Duration::from_secs(60),
            || async { (self.readyz().await == Some(200)).then_some(()) },
        )
        .await
        .with_context(|| format!("log: {}", self.log_tail()))
    }

    /// The `/metrics` page as served.
    pub async fn metrics_text(&self) -> Result<String> {
        let resp = self
            .http
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("/metrics answered {}", resp.status());
        }
        Ok(resp.text().await?)
    }

    /// The `/metrics` page, parsed into `name{labels}` → value.
    pub async fn metrics(&self) -> Result<BTreeMap<String, f64>> {
        Ok(parse_metrics(&self.metrics_text().await?))
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Sum of all series of one metric family (all label values).
    pub async fn metric_sum(&self, name: &str) -> Result<f64> {
        Ok(self
            .metrics()
            .await?
            .iter()
            .filter(|(k, _)| k.split('{').next() == Some(name))
            .map(|(_, v)| v)
            .sum())
    }

    /// Sum of the series of `name` whose labels include every `(label, value)` pair.
    pub async fn metric_where(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(self
            .metrics()
            .await?
            .iter()
            .filter(|(k, _)| k.split('{').next() == Some(name))
            .filter(|(k, _)| {
                labels
                    .iter()
                    .all(|(label, value)| k.contains(&format!("{label}=\"{value}\"")))
            })
            .map(|(_, v)| v)
            .sum())
    }

    /// Successful Kubernetes writes so far.
    pub async fn writes(&self) -> Result<f64> {
        Ok(self
            .metrics()
            .await?
            .iter()
            .filter(|(k, _)| {
                k.starts_with("registry_connector_kubernetes_writes_total{")
                    && k.contains("result=\"success\"")
            })
            .map(|(_, v)| v)
            .sum())
    }

    /// Failed registry requests so far (every source).
    pub async fn registry_errors(&self) -> Result<f64> {
        self.metric_where(
            "registry_connector_registry_requests_total",
            &[("result", "error")],
        )
        .await
    }

    /// Waits until at least `n` registry requests have failed; the error carries the
    /// log's tail.
    pub async fn wait_registry_errors(&self, n: f64) -> Result<()> {
        testenv::wait_for("failed registry requests", super::WAIT, || async {
            (self.registry_errors().await.ok()? >= n).then_some(())
        })
        .await
        .map_err(|e| e.context(format!("log: {}", self.log_tail())))
    }

    /// SIGTERM, then wait for the exit status.
    pub async fn terminate(mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        let pid = child.id().context("no pid")?;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
        Ok(status)
    }

    /// SIGKILL: a crash.
    pub async fn kill(mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// Runs the binary once with `args` (e.g. `purge ...`, `consul --dry-run ...`) and
/// returns its output; fails when it does not exit within `timeout`.
pub async fn run_once(args: &[&str], timeout: Duration) -> Result<std::process::Output> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_registry-connector"));
    cmd.args(args)
        .env("RUST_LOG", "info,registry_connector=debug")
        .env_remove("CONSUL_HTTP_TOKEN")
        .env_remove("POD_NAME")
        .env_remove("POD_NAMESPACE")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(timeout, cmd.output())
        .await
        .with_context(|| {
            format!(
                "registry-connector {} did not exit in {timeout:?}",
                args.join(" ")
            )
        })?
        .context("running registry-connector")
}

/// Parses the Prometheus/OpenMetrics text format: `name{labels} value` lines.
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}
