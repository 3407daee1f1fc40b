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

impl Connector {
    /// Starts `registry-connector consul` with the test environment's kubeconfig and
    /// Consul, short coalescing periods, and `extra` flags.
    pub fn consul(env: &testenv::TestEnv, namespace: &str, extra: &[&str]) -> Result<Self> {
        let port = free_port();
        let admin = format!("127.0.0.1:{port}");
        let log = env
            .dir()
            .join("logs")
            .join(format!("connector-{namespace}-{port}.log"));
        let out = std::fs::File::create(&log).context("connector log file")?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_registry-connector"));
        cmd.arg("consul")
            .args(["--kubeconfig", &env.kubeconfig().to_string_lossy()])
            .args(["--namespace", namespace])
            .args(["--consul-http-addr", env.consul_addr()?])
            .args(["--quiet-period", "100ms", "--max-period", "500ms"])
            .args(["--admin-addr", &admin])
            .args(["--leader-elect=false"])
            .args(extra)
            .env("RUST_LOG", "info,registry_connector=debug")
            .env_remove("CONSUL_HTTP_TOKEN")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        let child = cmd.spawn().context("starting registry-connector")?;
        Ok(Self {
            child: Some(child),
            admin,
            log,
            http: reqwest::Client::new(),
        })
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

    /// The `/metrics` page, parsed into `name{labels}` → value.
    pub async fn metrics(&self) -> Result<BTreeMap<String, f64>> {
        let text = self
            .http
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await?
            .text()
            .await?;
        Ok(parse_metrics(&text))
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
