//! The flags every source command shares: where and how to write Kubernetes objects.
//! One flag set, flattened into each source's command, so that `consul`, `eureka` and
//! the rest never drift apart.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::render::{RenderConfig, ServiceMode};
use crate::sink::backoff::BackoffPolicy;
use crate::sink::guard::GuardPolicy;
use crate::sink::SinkConfig;

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Kubernetes")]
pub struct SyncArgs {
    /// Kubeconfig file; without it, the in-cluster service account (or ~/.kube/config).
    #[arg(long, env = "KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// Namespace the synced Services, EndpointSlices and Endpoints are written to.
    #[arg(long, short = 'n', env = "RC_NAMESPACE", value_name = "NS")]
    pub namespace: String,

    /// Kind of Service to create: headless (DNS returns the instances), cluster-ip
    /// (a virtual IP balanced by kube-proxy) or external-name (a CNAME to the registry's DNS).
    #[arg(long, env = "RC_SERVICE_TYPE", default_value = "headless", value_parser = parse_service_mode)]
    pub service_type: ServiceMode,

    /// Also write legacy core/v1 Endpoints objects (for consumers that still read them).
    #[arg(long, env = "RC_ENDPOINTS", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub endpoints: bool,

    /// Identifies this connector's objects; several connectors (registries, clusters)
    /// writing to one namespace must each have their own.
    #[arg(
        long,
        env = "RC_CONNECTOR_ID",
        default_value = "default",
        value_name = "ID"
    )]
    pub connector_id: String,

    /// Wait this long without registry changes before writing (e.g. 200ms, 1s).
    #[arg(long, env = "RC_QUIET_PERIOD", default_value = "1s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub quiet_period: Duration,

    /// Write at least this often while changes keep coming.
    #[arg(long, env = "RC_MAX_PERIOD", default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub max_period: Duration,

    /// Compare every service again this often (writes only what differs).
    #[arg(long, env = "RC_RESYNC_PERIOD", default_value = "10m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub resync_period: Duration,

    /// Hold deletions when one registry answer would delete more than this share of
    /// the managed services (0.0-1.0); deleting all of them is always held.
    #[arg(long, env = "RC_MASS_DELETION_THRESHOLD", default_value_t = 0.5, value_parser = parse_ratio, value_name = "RATIO")]
    pub mass_deletion_threshold: f64,

    /// Apply a held mass deletion once it has persisted this long ("0s" holds forever).
    #[arg(long, env = "RC_MASS_DELETION_HOLD", default_value = "10m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub mass_deletion_hold: Duration,

    /// Services reconciled in parallel.
    #[arg(long, env = "RC_CONCURRENCY", default_value_t = 16, value_name = "N")]
    pub concurrency: usize,

    /// Kubernetes writes per second, sustained.
    #[arg(
        long,
        env = "RC_KUBE_WRITE_QPS",
        default_value_t = 100,
        value_name = "QPS"
    )]
    pub kube_write_qps: u32,

    /// Kubernetes writes allowed in a burst above the sustained rate.
    #[arg(
        long,
        env = "RC_KUBE_WRITE_BURST",
        default_value_t = 200,
        value_name = "N"
    )]
    pub kube_write_burst: u32,
}

fn parse_service_mode(s: &str) -> Result<ServiceMode, String> {
    s.parse::<ServiceMode>().map_err(|e| e.to_string())
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0 and 1"))
    }
}

impl SyncArgs {
    /// The sink's settings from the flags.
    pub fn sink_config(&self) -> SinkConfig {
        let render = RenderConfig {
            namespace: self.namespace.clone(),
            connector_id: self.connector_id.clone(),
            service_mode: self.service_type,
            legacy_endpoints: self.endpoints,
            max_endpoints_per_slice: 100,
        };
        let mut cfg = SinkConfig::new(render);
        cfg.quiet_period = self.quiet_period;
        cfg.max_period = self.max_period;
        cfg.resync_period = self.resync_period;
        cfg.concurrency = self.concurrency;
        cfg.write_qps = self.kube_write_qps;
        cfg.write_burst = self.kube_write_burst;
        cfg.retry = BackoffPolicy::default();
        cfg.guard = GuardPolicy {
            max_delete_ratio: self.mass_deletion_threshold,
            hold_for: (!self.mass_deletion_hold.is_zero()).then_some(self.mass_deletion_hold),
        };
        cfg
    }

    /// A Kubernetes client from `--kubeconfig`, else the usual inference.
    pub async fn client(&self) -> Result<Client> {
        kube_client(self.kubeconfig.as_deref()).await
    }
}

/// A Kubernetes client from a kubeconfig file, else in-cluster or `~/.kube/config`.
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => Config::infer()
            .await
            .context("no --kubeconfig given and no in-cluster or default kubeconfig found")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}
