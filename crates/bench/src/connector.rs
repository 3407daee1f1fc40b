//! The connector under test: the release binary run as a separate process, its
//! `/metrics` and `/readyz`, its CPU time and memory, and the connections it holds to
//! the registry. Registry-neutral: the registry's subcommand, flags and port come from
//! [`crate::registry::Registry`]. The export workload can run HashiCorp's consul-k8s
//! `sync-catalog` through the same type ([`Flavor::ConsulK8s`]): the same process
//! figures, its own command line and health endpoint, and no `/metrics`.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

use crate::host::{proc_stats, ProcStats};
use crate::metrics::Metrics;
use crate::sockets::{self, PeakSampler};

/// How often the connections to the registry are counted for their peak.
const CONN_SAMPLE: Duration = Duration::from_millis(250);

/// Which program a [`Launch`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// This repository's connector: `<source> --kubeconfig ... --admin-addr ...`,
    /// `/healthz`, `/readyz`, `/metrics`.
    RegistryConnector,
    /// consul-k8s: `sync-catalog -listen=ADDR` followed by `source_flags` and `extra`
    /// (its whole command line); `/health/ready` answers 204 once it reaches Consul.
    ConsulK8s,
}

/// How one connector process is started.
#[derive(Debug, Clone)]
pub struct Launch {
    pub flavor: Flavor,
    pub bin: PathBuf,
    pub kubeconfig: PathBuf,
    /// The subcommand (`consul`, `eureka`), also the `source` label of its metrics.
    pub source: String,
    /// The registry's address and the selection of one data set.
    pub source_flags: Vec<String>,
    pub namespace: String,
    pub quiet_period: Duration,
    /// Flags beyond the ones above (throughput tuning, log level).
    pub extra: Vec<String>,
    pub log: PathBuf,
    /// The registry's port, where the connector's connections are counted.
    pub registry_port: u16,
}

impl Launch {
    /// The full argument list, as reported in the results.
    pub fn args(&self, admin: SocketAddr) -> Vec<String> {
        if self.flavor == Flavor::ConsulK8s {
            let mut args = vec!["sync-catalog".to_string(), format!("-listen={admin}")];
            args.extend(self.source_flags.iter().cloned());
            args.extend(self.extra.iter().cloned());
            return args;
        }
        let mut args = vec![
            self.source.clone(),
            "--kubeconfig".into(),
            self.kubeconfig.display().to_string(),
            "--namespace".into(),
            self.namespace.clone(),
        ];
        args.extend(self.source_flags.iter().cloned());
        args.extend([
            "--quiet-period".into(),
            humantime::format_duration(self.quiet_period).to_string(),
            "--admin-addr".into(),
            admin.to_string(),
            "--leader-elect=false".into(),
        ]);
        args.extend(self.extra.iter().cloned());
        args
    }

    /// The admin paths answering once the process is up, and once it is ready.
    fn paths(&self) -> (&'static str, &'static str) {
        match self.flavor {
            Flavor::RegistryConnector => ("/healthz", "/readyz"),
            Flavor::ConsulK8s => ("/health/ready", "/health/ready"),
        }
    }
}

/// A running connector process.
pub struct Connector {
    child: Child,
    pid: u32,
    admin: SocketAddr,
    http: reqwest::Client,
    pub started: Instant,
    pub args: Vec<String>,
    pub log: PathBuf,
    source: String,
    registry_port: u16,
    conn_peak: PeakSampler,
    /// The `/readyz` of the program (see [`Launch::paths`]).
    ready_path: &'static str,
}

fn free_port() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("picking a free port")?;
    l.local_addr().context("local addr")
}

impl Connector {
    /// Starts the connector; returns once its admin server answers.
    pub async fn start(launch: &Launch) -> Result<Connector> {
        let admin = free_port()?;
        let args = launch.args(admin);
        if let Some(dir) = launch.log.parent() {
            std::fs::create_dir_all(dir).ok();
        }
        let log = std::fs::File::create(&launch.log)
            .with_context(|| format!("creating {}", launch.log.display()))?;
        let log2 = log.try_clone().context("duplicating the log file handle")?;
        let started = Instant::now();
        let mut cmd = Command::new(&launch.bin);
        if launch.flavor == Flavor::ConsulK8s {
            // Its flags win over these, but nothing of the harness's environment
            // should reach it unseen.
            for var in ["CONSUL_HTTP_ADDR", "CONSUL_HTTPS_ADDR", "CONSUL_HTTP_TOKEN"] {
                cmd.env_remove(var);
            }
        }
        let child = cmd
            .args(&args)
            .env_remove("RUST_LOG")
            .env("RC_LOG_FORMAT", "plain")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", launch.bin.display()))?;
        let pid = child.id().context("connector pid")?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .no_proxy()
            .build()
            .context("building the admin HTTP client")?;
        let mut c = Connector {
            child,
            pid,
            admin,
            http,
            started,
            args,
            log: launch.log.clone(),
            source: launch.source.clone(),
            registry_port: launch.registry_port,
            conn_peak: PeakSampler::start(pid, launch.registry_port, CONN_SAMPLE),
            ready_path: launch.paths().1,
        };
        let health = launch.paths().0;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = c.child.try_wait().context("polling the connector")? {
                bail!(
                    "the connector exited at start with {status}; log: {}\n{}",
                    c.log.display(),
                    tail(&c.log, 20)
                );
            }
            if c.get(health).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("the connector's admin server did not answer within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(c)
    }

    async fn get(&self, path: &str) -> Result<(u16, String)> {
        let resp = self
            .http
            .get(format!("http://{}{}", self.admin, path))
            .send()
            .await
            .with_context(|| format!("GET {path} of the connector"))?;
        let status = resp.status().as_u16();
        let body = resp
            .text()
            .await
            .with_context(|| format!("reading {path} of the connector"))?;
        Ok((status, body))
    }

    pub async fn metrics(&self) -> Result<Metrics> {
        let (status, body) = self.get("/metrics").await?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(Metrics::parse(&body, &self.source))
    }

    /// Waits until `/readyz` answers 2xx (the first snapshot is reconciled; consul-k8s:
    /// it reaches Consul).
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().context("polling the connector")? {
                bail!(
                    "the connector exited with {status}; see {}",
                    self.log.display()
                );
            }
            if let Ok((200..=299, _)) = self.get(self.ready_path).await {
                return Ok(self.started.elapsed());
            }
            if Instant::now() > deadline {
                bail!("the connector was not ready within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn stats(&self) -> Result<ProcStats> {
        proc_stats(self.pid)
    }

    /// TCP connections the process holds to the registry now.
    pub fn connections(&self) -> usize {
        sockets::count(self.pid, self.registry_port)
    }

    /// The most connections to the registry seen since the start (sampled every 250 ms).
    pub fn connections_peak(&self) -> usize {
        self.conn_peak.peak().max(self.connections())
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait().context("polling the connector")? {
            bail!(
                "the connector exited with {status}; log {}:\n{}",
                self.log.display(),
                tail(&self.log, 20)
            );
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 20 s. Returns the stats just before the signal.
    pub async fn stop(mut self) -> Result<ProcStats> {
        let stats = self.stats().unwrap_or_default();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        match tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                eprintln!("bench: connector {} ignored SIGTERM; killing it", self.pid);
                let _ = self.child.kill().await;
            }
        }
        Ok(stats)
    }
}

/// The last `n` lines of a file (for error messages).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
