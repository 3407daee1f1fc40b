//! The connector under test: the release binary run as a separate process, its
//! `/metrics` and `/readyz`, and its CPU time and memory from `/proc`.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::process::{Child, Command};

/// How one connector process is started.
#[derive(Debug, Clone)]
pub struct Launch {
    pub bin: PathBuf,
    pub kubeconfig: PathBuf,
    pub consul_addr: String,
    pub namespace: String,
    pub filter_tag: String,
    pub quiet_period: Duration,
    /// Flags beyond the ones above (throughput tuning, log level).
    pub extra: Vec<String>,
    pub log: PathBuf,
}

impl Launch {
    /// The full argument list, as reported in the results.
    pub fn args(&self, admin: SocketAddr) -> Vec<String> {
        let mut args = vec![
            "consul".to_string(),
            "--kubeconfig".into(),
            self.kubeconfig.display().to_string(),
            "--namespace".into(),
            self.namespace.clone(),
            "--consul-http-addr".into(),
            self.consul_addr.clone(),
            "--filter-tag".into(),
            self.filter_tag.clone(),
            "--quiet-period".into(),
            humantime::format_duration(self.quiet_period).to_string(),
            "--admin-addr".into(),
            admin.to_string(),
            "--leader-elect=false".into(),
        ];
        args.extend(self.extra.iter().cloned());
        args
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
}

/// CPU and memory of a process, from `/proc/<pid>/stat` and `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcStats {
    /// User + system CPU seconds since the process started.
    pub cpu_seconds: f64,
    /// Current resident set (VmRSS), MiB.
    pub rss_mib: f64,
    /// Peak resident set (VmHWM), MiB.
    pub peak_rss_mib: f64,
}

fn free_port() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("picking a free port")?;
    l.local_addr().context("local addr")
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// Reads CPU seconds and memory of `pid`.
pub fn proc_stats(pid: u32) -> Result<ProcStats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command (which may contain spaces) start at field 3 (state).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/pid/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, so 11 and 12 of `rest`
    // (0-based; `rest` starts at field 3).
    let utime: f64 = fields.get(11).context("utime")?.parse()?;
    let stime: f64 = fields.get(12).context("stime")?.parse()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib = |key: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok(ProcStats {
        cpu_seconds: (utime + stime) / clock_ticks(),
        rss_mib: kib("VmRSS:") / 1024.0,
        peak_rss_mib: kib("VmHWM:") / 1024.0,
    })
}

/// A scrape of `/metrics`: series (name plus label text) to value.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    series: HashMap<String, f64>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut series = HashMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            // `name{labels} value` or `name value`; label values never hold "} " here.
            let (key, value) = match line.rfind(' ') {
                Some(i) => (&line[..i], &line[i + 1..]),
                None => continue,
            };
            if let Ok(v) = value.parse::<f64>() {
                series.insert(key.to_string(), v);
            }
        }
        Metrics { series }
    }

    /// Sum of every series of metric `name` whose labels contain all of `labels`
    /// (`key="value"` pairs).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.series
            .iter()
            .filter(|(k, _)| {
                let (n, l) = match k.find('{') {
                    Some(i) => (&k[..i], &k[i..]),
                    None => (k.as_str(), ""),
                };
                n == name
                    && labels
                        .iter()
                        .all(|(lk, lv)| l.contains(&format!("{lk}=\"{lv}\"")))
            })
            .map(|(_, v)| v)
            .fold(0.0, |a, b| a + b)
    }

    /// Successful Kubernetes writes.
    pub fn writes(&self) -> f64 {
        self.sum(
            "registry_connector_kubernetes_writes_total",
            &[("result", "success")],
        )
    }

    /// Kubernetes writes whatever their result.
    pub fn writes_all(&self) -> f64 {
        self.sum("registry_connector_kubernetes_writes_total", &[])
    }

    /// Successful writes of one kind (`service`, `endpointslice`, `endpoints`).
    pub fn writes_of(&self, kind: &str) -> f64 {
        self.sum(
            "registry_connector_kubernetes_writes_total",
            &[("kind", kind), ("result", "success")],
        )
    }

    /// Consul requests matching `labels`: `registry_connector_registry_requests_total
    /// {source="consul",endpoint,result}`, or the older
    /// `registry_connector_consul_requests_total{endpoint,result}`.
    fn consul_sum(&self, labels: &[(&str, &str)]) -> f64 {
        let mut with_source = vec![("source", "consul")];
        with_source.extend_from_slice(labels);
        self.sum("registry_connector_registry_requests_total", &with_source)
            + self.sum("registry_connector_consul_requests_total", labels)
    }

    /// Consul requests, all endpoints and results.
    pub fn consul_requests(&self) -> f64 {
        self.consul_sum(&[])
    }

    /// Consul requests that failed (no answer, error status).
    pub fn consul_errors(&self) -> f64 {
        self.consul_sum(&[("result", "error")])
    }

    /// Consul requests to one endpoint label value.
    pub fn consul_requests_to(&self, endpoint: &str) -> f64 {
        self.consul_sum(&[("endpoint", endpoint)])
    }

    /// The endpoint label values of the Consul request counters.
    pub fn consul_endpoints(&self) -> Vec<String> {
        let mut v = self.label_values("registry_connector_registry_requests_total", "endpoint");
        v.extend(self.label_values("registry_connector_consul_requests_total", "endpoint"));
        v.sort();
        v.dedup();
        v
    }

    pub fn reconciles(&self) -> f64 {
        self.sum("registry_connector_reconciles_total", &[])
    }

    pub fn managed_services(&self) -> f64 {
        self.sum("registry_connector_managed_services", &[])
    }

    /// The label values seen for `label` on metric `name` (to report what is there).
    pub fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .series
            .keys()
            .filter(|k| k.starts_with(&format!("{name}{{")))
            .filter_map(|k| {
                let pat = format!("{label}=\"");
                let i = k.find(&pat)? + pat.len();
                let j = k[i..].find('"')?;
                Some(k[i..i + j].to_string())
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }
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
        let log2 = log.try_clone()?;
        let started = Instant::now();
        let child = Command::new(&launch.bin)
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
            .build()?;
        let mut c = Connector {
            child,
            pid,
            admin,
            http,
            started,
            args,
            log: launch.log.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = c.child.try_wait()? {
                bail!(
                    "the connector exited at start with {status}; log: {}\n{}",
                    c.log.display(),
                    tail(&c.log, 20)
                );
            }
            if c.get("/healthz").await.is_ok() {
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
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await?))
    }

    pub async fn metrics(&self) -> Result<Metrics> {
        let (status, body) = self.get("/metrics").await?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(Metrics::parse(&body))
    }

    /// Waits until `/readyz` answers 200 (the first snapshot is reconciled).
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the connector exited with {status}; see {}",
                    self.log.display()
                );
            }
            if let Ok((200, _)) = self.get("/readyz").await {
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

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
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

/// Loopback packet loss counters of this network namespace: packets dropped from the
/// per-CPU input backlog (`/proc/net/softnet_stat`, second column, summed over CPUs)
/// and TCP retransmission timeouts (`TcpExtTCPTimeouts` in `/proc/net/netstat`).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct NetCounters {
    pub backlog_drops: u64,
    pub tcp_timeouts: u64,
}

impl NetCounters {
    pub fn read() -> NetCounters {
        let backlog_drops = std::fs::read_to_string("/proc/net/softnet_stat")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter_map(|v| u64::from_str_radix(v, 16).ok())
            .sum();
        let netstat = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
        let lines: Vec<&str> = netstat.lines().collect();
        let mut tcp_timeouts = 0;
        for pair in lines.chunks(2) {
            if let [head, vals] = pair {
                if head.starts_with("TcpExt:") {
                    let h: Vec<&str> = head.split_whitespace().collect();
                    let v: Vec<&str> = vals.split_whitespace().collect();
                    if let Some(i) = h.iter().position(|k| *k == "TCPTimeouts") {
                        tcp_timeouts = v.get(i).and_then(|x| x.parse().ok()).unwrap_or(0);
                    }
                }
            }
        }
        NetCounters {
            backlog_drops,
            tcp_timeouts,
        }
    }

    pub fn since(&self, earlier: &NetCounters) -> NetCounters {
        NetCounters {
            backlog_drops: self.backlog_drops.saturating_sub(earlier.backlog_drops),
            tcp_timeouts: self.tcp_timeouts.saturating_sub(earlier.tcp_timeouts),
        }
    }
}

/// The last `n` lines of a file (for error messages).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The apiserver's own request counters (`apiserver_request_total`), summed by verb and
/// resource: what a workload asked of the apiserver, whoever asked.
pub async fn apiserver_requests(client: &kube::Client) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(req) = kube::core::Request::new("/metrics").list(&Default::default()) else {
        return out;
    };
    let Ok(text) = client.request_text(req).await else {
        return out;
    };
    let label = |l: &str, key: &str| -> Option<String> {
        let pat = format!("{key}=\"");
        let i = l.find(&pat)? + pat.len();
        let j = l[i..].find('"')?;
        Some(l[i..i + j].to_string())
    };
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let (Some(verb), Some(resource)) = (label(rest, "verb"), label(rest, "resource")) else {
            continue;
        };
        let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        *out.entry(format!("{verb} {resource}")).or_insert(0.0) += v;
    }
    out
}

/// `after - before`, keeping the entries that moved.
pub fn delta(
    before: &std::collections::BTreeMap<String, f64>,
    after: &std::collections::BTreeMap<String, f64>,
) -> std::collections::BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openmetrics_text() {
        let text = "# HELP x y\n\
            registry_connector_kubernetes_writes_total{kind=\"service\",verb=\"create\",result=\"success\"} 3\n\
            registry_connector_kubernetes_writes_total{kind=\"endpointslice\",verb=\"apply\",result=\"success\"} 2\n\
            registry_connector_kubernetes_writes_total{kind=\"endpointslice\",verb=\"apply\",result=\"error\"} 1\n\
            registry_connector_managed_services 7\n# EOF\n";
        let m = Metrics::parse(text);
        assert_eq!(m.writes(), 5.0);
        assert_eq!(m.writes_all(), 6.0);
        assert_eq!(m.writes_of("endpointslice"), 2.0);
        assert_eq!(m.managed_services(), 7.0);
        assert_eq!(
            m.label_values("registry_connector_kubernetes_writes_total", "kind"),
            vec!["endpointslice".to_string(), "service".to_string()]
        );
    }

    #[test]
    fn reads_own_proc_stats() {
        let s = proc_stats(std::process::id()).expect("own stats");
        assert!(s.peak_rss_mib > 0.0 && s.peak_rss_mib >= s.rss_mib * 0.5);
        assert!(s.cpu_seconds >= 0.0);
    }
}
