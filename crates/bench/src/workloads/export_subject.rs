//! Who the export workload measures: this repository's connector, or HashiCorp's
//! consul-k8s `sync-catalog -to-consul` (an MPL-2.0 release, for a side-by-side, Consul
//! only), on the same data set, the same steps and the same figures. The connector
//! writes to Consul or to Eureka (`eureka --sync to-registry`).
//!
//! The two differ in what can be read from them, and this module hides that:
//! - Consul requests: the connector counts its own (`/metrics`); consul-k8s does not,
//!   so it talks to Consul through a [`CountingProxy`] and the proxy's counts stand in.
//!   Either way the figures are differences between two [`Counters`] snapshots.
//! - A Pod that is not ready: the connector keeps the instance with a critical check;
//!   consul-k8s (this release) registers ready addresses only, so the instance goes.
//! - Pacing: the connector writes a quiet period after a change; consul-k8s writes
//!   everything every `-consul-write-interval` (30 s by default), and deregisters what
//!   its per-service poll (every interval) found stale at the next write.
//! - Eureka: one request per instance write (no batch API), readiness as the status
//!   override (`OUT_OF_SERVICE` / `UP`), and lease renewals every 30 s per instance,
//!   counted apart from the writes.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::export::ExportEnv;
use super::Ctx;
use crate::connector::{Connector, Flavor, Launch};
use crate::metrics::{delta, Metrics};
use crate::registry::consul_proxy::{CountingProxy, ProxyCounts};
use crate::registry::Kind;
use crate::results::Requests;

/// consul-k8s and how it is run.
#[derive(Debug)]
pub struct ConsulK8s {
    pub bin: PathBuf,
    /// `consul-k8s version` as the binary reports it.
    pub version: String,
    /// `-consul-write-interval`.
    pub write_interval: Duration,
    pub proxy: CountingProxy,
}

/// The program under test.
#[derive(Debug)]
pub enum Subject {
    RegistryConnector,
    ConsulK8s(ConsulK8s),
}

/// Cumulative counts of one process (or of the proxy), from which every figure is a
/// difference.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub requests: Requests,
    pub txn: f64,
    /// Registry write requests: Consul `txn`; Eureka `register`, `status`,
    /// `status_delete` and `cancel` (heartbeats are not counted here).
    pub registry_writes: f64,
    /// Eureka: `POST /apps/<APP>` requests alone.
    pub registrations: f64,
    /// Eureka: lease renewals, and registrations again after a renewal's 404.
    pub heartbeats: f64,
    pub reregistrations: f64,
    /// Instance writes (the connector: register, health, deregister operations;
    /// consul-k8s: catalog register and deregister calls, one instance each).
    pub writes: f64,
    /// Write requests (the connector: batches; consul-k8s: every non-GET call).
    pub write_requests: f64,
    /// The process's own Kubernetes writes (consul-k8s: not counted, 0).
    pub kube_writes: f64,
}

impl Counters {
    pub fn from_metrics(m: &Metrics) -> Self {
        let txn = m.registry_requests_to("txn");
        let registry_writes = if m.source() == "eureka" {
            EUREKA_WRITES
                .iter()
                .map(|e| m.registry_requests_to(e))
                .sum()
        } else {
            txn
        };
        Counters {
            requests: Requests::since_start(m),
            txn,
            registry_writes,
            registrations: m.registry_requests_to("register"),
            heartbeats: m.registry_requests_to("heartbeat"),
            reregistrations: m.eureka_reregistrations(),
            writes: m.export_writes(),
            write_requests: m.export_write_requests(),
            kube_writes: m.writes_all(),
        }
    }

    pub fn from_proxy(c: &ProxyCounts) -> Self {
        Counters {
            requests: Requests {
                total: c.total(),
                failed: c.failed,
                by_endpoint: c.by_endpoint.clone(),
                full_fetches: Default::default(),
            },
            txn: c.by_endpoint.get("txn").copied().unwrap_or(0.0),
            registry_writes: c.by_endpoint.get("txn").copied().unwrap_or(0.0),
            registrations: 0.0,
            heartbeats: 0.0,
            reregistrations: 0.0,
            writes: c.writes_to("catalog_register") + c.writes_to("catalog_deregister"),
            write_requests: c.write_total(),
            kube_writes: 0.0,
        }
    }

    /// What happened between `before` and `self`.
    pub fn since(&self, before: &Counters) -> Counters {
        Counters {
            requests: Requests {
                total: self.requests.total - before.requests.total,
                failed: self.requests.failed - before.requests.failed,
                by_endpoint: delta(&before.requests.by_endpoint, &self.requests.by_endpoint),
                full_fetches: Default::default(),
            },
            txn: self.txn - before.txn,
            registry_writes: self.registry_writes - before.registry_writes,
            registrations: self.registrations - before.registrations,
            heartbeats: self.heartbeats - before.heartbeats,
            reregistrations: self.reregistrations - before.reregistrations,
            writes: self.writes - before.writes,
            write_requests: self.write_requests - before.write_requests,
            kube_writes: self.kube_writes - before.kube_writes,
        }
    }
}

/// The connector's Eureka request endpoints that write (its `endpoint` labels).
const EUREKA_WRITES: [&str; 4] = ["register", "status", "status_delete", "cancel"];

/// A duration as Go's `time.ParseDuration` reads it.
fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl ConsulK8s {
    /// Checks the binary and starts the proxy in front of `consul_addr`.
    pub async fn new(bin: PathBuf, write_interval: Duration, consul_addr: &str) -> Result<Self> {
        let out = std::process::Command::new(&bin)
            .arg("version")
            .output()
            .with_context(|| format!("running {} version", bin.display()))?;
        let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !version.starts_with("consul-k8s") {
            bail!(
                "{} version answered {version:?}, not consul-k8s",
                bin.display()
            );
        }
        Ok(ConsulK8s {
            bin,
            version,
            write_interval,
            proxy: CountingProxy::start(consul_addr).await?,
        })
    }
}

impl Subject {
    /// The name in the report.
    pub fn name(&self) -> String {
        match self {
            Subject::RegistryConnector => "registry-connector".into(),
            Subject::ConsulK8s(c) => format!(
                "{} sync-catalog -to-consul, write interval {} s",
                c.version,
                c.write_interval.as_secs_f64()
            ),
        }
    }

    /// How to start it on `env`.
    pub fn launch(&self, ctx: &Ctx, env: &ExportEnv, quiet: Duration, log: &str) -> Result<Launch> {
        let mut launch = Launch {
            flavor: Flavor::RegistryConnector,
            bin: ctx.bin.clone(),
            kubeconfig: ctx.kubeconfig.clone(),
            source: ctx.registry.source().into(),
            source_flags: Vec::new(),
            namespace: env.ns.clone(),
            quiet_period: quiet,
            extra: Vec::new(),
            log: ctx.log_dir.join(log),
            registry_port: ctx.registry.connector_port(),
        };
        match (self, ctx.registry.kind()) {
            (Subject::RegistryConnector, Kind::Consul) => {
                let consul = ctx.registry.consul().context("no Consul client")?;
                launch.source_flags = consul.address_flags();
                launch.source_flags.extend(
                    [
                        "--sync",
                        "to-registry",
                        "--k8s-allow-namespaces",
                        &env.ns,
                        "--consul-node-name",
                        &env.consul_node,
                        "--connector-id",
                        &env.connector_id,
                    ]
                    .map(String::from),
                );
                launch.extra = ctx.registry.tuning_flags();
                launch
                    .extra
                    .extend(["--log-level".into(), ctx.log_level.clone()]);
            }
            (Subject::RegistryConnector, Kind::Eureka) => {
                let eureka = ctx.registry.eureka().context("no Eureka client")?;
                // No --eureka-poll-interval: that is the reading direction's, which
                // --sync to-registry does not run.
                launch.source_flags = [
                    "--eureka-url",
                    eureka.url(),
                    "--sync",
                    "to-registry",
                    "--k8s-allow-namespaces",
                    &env.ns,
                    "--connector-id",
                    &env.connector_id,
                ]
                .map(String::from)
                .to_vec();
                launch.extra = vec!["--log-level".into(), ctx.log_level.clone()];
            }
            (Subject::ConsulK8s(_), Kind::Eureka | Kind::Nacos | Kind::Zookeeper) => {
                bail!("consul-k8s writes to Consul only")
            }
            (Subject::RegistryConnector, Kind::Nacos | Kind::Zookeeper) => {
                bail!("the export workload measures Consul and Eureka only")
            }
            (Subject::ConsulK8s(c), Kind::Consul) => {
                let consul = ctx.registry.consul().context("no Consul client")?;
                if consul.tls() {
                    bail!(
                        "the consul-k8s side-by-side runs over plain HTTP only (no --consul-tls)"
                    );
                }
                launch.flavor = Flavor::ConsulK8s;
                launch.bin = c.bin.clone();
                launch.registry_port = c.proxy.addr.port();
                launch.source_flags = vec![
                    format!("-http-addr=http://{}", c.proxy.addr),
                    format!("-kubeconfig={}", ctx.kubeconfig.display()),
                    "-to-consul=true".into(),
                    "-to-k8s=false".into(),
                    format!("-k8s-source-namespace={}", env.ns),
                    format!("-consul-node-name={}", env.consul_node),
                    format!("-consul-write-interval={}", go_duration(c.write_interval)),
                ];
                launch.extra = vec![format!("-log-level={}", ctx.log_level)];
            }
        }
        Ok(launch)
    }

    /// The counts a process starts from: nothing for the connector (its metrics start
    /// at 0), the proxy's counts so far for consul-k8s.
    pub fn baseline(&self) -> Counters {
        match self {
            Subject::RegistryConnector => Counters::default(),
            Subject::ConsulK8s(c) => Counters::from_proxy(&c.proxy.counts()),
        }
    }

    /// The counts now.
    pub async fn counters(&self, process: &Connector) -> Result<Counters> {
        match self {
            Subject::RegistryConnector => Ok(Counters::from_metrics(&process.metrics().await?)),
            Subject::ConsulK8s(c) => Ok(Counters::from_proxy(&c.proxy.counts())),
        }
    }

    /// What a Pod that is not ready looks like in the registry, for the report.
    pub fn not_ready_description(&self, kind: Kind) -> &'static str {
        match (self, kind) {
            (Subject::RegistryConnector, Kind::Consul) => "an instance with a critical check",
            (Subject::RegistryConnector, Kind::Eureka) => {
                "an instance with status OUT_OF_SERVICE (the connector's status override)"
            }
            (Subject::RegistryConnector, Kind::Nacos | Kind::Zookeeper) => "(not measured)",
            (Subject::ConsulK8s(_), _) => {
                "no instance (this consul-k8s registers the Endpoints' ready addresses only)"
            }
        }
    }

    /// What the registry shows for a ready Pod: Consul `passing`, Eureka `UP`.
    pub fn ready_state(&self, kind: Kind) -> &'static str {
        match kind {
            Kind::Consul => "passing",
            Kind::Eureka => "UP",
            Kind::Nacos | Kind::Zookeeper => "(not measured)",
        }
    }

    /// What it shows for a Pod that is not ready: a critical check, `OUT_OF_SERVICE`,
    /// or (consul-k8s) no instance at all (`None`).
    pub fn not_ready_state(&self, kind: Kind) -> Option<&'static str> {
        match (self, kind) {
            (Subject::RegistryConnector, Kind::Consul) => Some("critical"),
            (Subject::RegistryConnector, Kind::Eureka) => Some("OUT_OF_SERVICE"),
            (Subject::RegistryConnector, Kind::Nacos | Kind::Zookeeper) => None,
            (Subject::ConsulK8s(_), _) => None,
        }
    }

    /// The connector id its registrations carry; consul-k8s marks none, and everything
    /// on the run's own Consul node is its.
    pub fn owner_id<'a>(&self, env: &'a ExportEnv) -> Option<&'a str> {
        match self {
            Subject::RegistryConnector => Some(&env.connector_id),
            Subject::ConsulK8s(_) => None,
        }
    }

    /// How long a restarted process is watched for writes once ready: the connector's
    /// quiet period plus its max period; consul-k8s's first write comes one interval
    /// after its start.
    pub fn restart_settle(&self, connector_settle: Duration) -> Duration {
        match self {
            Subject::RegistryConnector => connector_settle,
            Subject::ConsulK8s(c) => c.write_interval + Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_counts_become_counters() {
        let c = ProxyCounts {
            by_endpoint: [
                ("catalog_register".to_string(), 60.0),
                ("catalog_service".to_string(), 20.0),
            ]
            .into(),
            writes: [("catalog_register".to_string(), 60.0)].into(),
            failed: 1.0,
        };
        let k = Counters::from_proxy(&c);
        assert_eq!(
            (k.requests.total, k.writes, k.write_requests, k.txn),
            (80.0, 60.0, 60.0, 0.0)
        );
        let later = Counters {
            writes: 70.0,
            ..k.clone()
        };
        assert_eq!(later.since(&k).writes, 10.0);
        assert_eq!(later.since(&k).requests.total, 0.0);
    }

    #[test]
    fn go_reads_the_interval() {
        assert_eq!(go_duration(Duration::from_secs(30)), "30000ms");
    }
}
