//! The workloads, in the order they run, and what they share: the context (clients,
//! plan, random source), how a connector is launched, and the waits.
//!
//! Order: the floor, the initial sync (connector A, quiet 1 s), propagation on A,
//! a restart (connector B, quiet 100 ms, same namespace), propagation on B, the steady
//! state on B, then the cost-per-change runs on their own data sets. Registry-neutral:
//! everything registry-specific goes through [`Registry`]. The scaling curve
//! ([`curve`]) reuses the floor and the initial sync, once per N. The Kubernetes →
//! Consul workload ([`export`], with [`flips`]) has its own data set and steps.

mod cost;
pub mod curve;
pub mod export;
pub mod export_subject;
mod flips;
mod initial;
mod propagation;
mod steady;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rand::rngs::StdRng;

use crate::changes::ChangeOpts;
use crate::connector::{Connector, Flavor, Launch};
use crate::model::Service;
use crate::plan::Plan;
use crate::registry::{AfterStop, Registry};
use crate::results::{Params, Results};
use crate::tracker::Tracker;
use crate::{floor, say};

/// What every workload needs.
pub struct Ctx {
    pub plan: Plan,
    pub client: kube::Client,
    pub registry: Registry,
    pub bin: PathBuf,
    pub kubeconfig: PathBuf,
    /// The floor's client concurrency and the connector's `--concurrency`.
    pub concurrency: usize,
    /// Registry writes in flight while loading or removing a data set.
    pub load_concurrency: usize,
    pub log_level: String,
    pub seed: u64,
    /// Part of every namespace, data set and service name of this run.
    pub run_id: String,
    pub log_dir: PathBuf,
    pub rng: StdRng,
    /// Namespaces created, deleted at the end.
    pub namespaces: Vec<String>,
}

impl Ctx {
    /// Flags of every connector beyond its registry selection: the write limits lifted
    /// so that the initial sync is limited by the apiserver, as the floor is, the
    /// floor's concurrency, and the registry's own tuning.
    pub fn connector_flags(&self) -> Vec<String> {
        let mut flags: Vec<String> = vec![
            "--kube-write-qps".into(),
            "10000".into(),
            "--kube-write-burst".into(),
            "10000".into(),
            "--concurrency".into(),
            self.concurrency.to_string(),
        ];
        flags.extend(self.registry.tuning_flags());
        flags.extend(["--log-level".into(), self.log_level.clone()]);
        flags
    }

    /// A connector writing to `ns` and reading data set `set`.
    fn launch(&self, ns: &str, set: &str, quiet: Duration, log: &str) -> Launch {
        Launch {
            flavor: Flavor::RegistryConnector,
            bin: self.bin.clone(),
            kubeconfig: self.kubeconfig.clone(),
            source: self.registry.source().into(),
            source_flags: self.registry.selection_flags(set),
            namespace: ns.into(),
            quiet_period: quiet,
            extra: self.connector_flags(),
            log: self.log_dir.join(log),
            registry_port: self.registry.connector_port(),
        }
    }

    /// Creates this run's namespace for workload `what`.
    async fn namespace(&mut self, what: &str) -> Result<String> {
        let ns = format!("bench-{what}-{}", self.run_id);
        floor::create_namespace(&self.client, &ns).await?;
        self.namespaces.push(ns.clone());
        Ok(ns)
    }

    /// This run's data set for workload `what` (Consul tag, Eureka metadata value).
    fn set(&self, what: &str) -> String {
        format!("bench-{what}-{}", self.run_id)
    }

    fn change_opts(&self, count: usize, quiet: Duration, final_wait: Duration) -> ChangeOpts {
        ChangeOpts {
            count,
            min_gap: Duration::from_millis(50),
            max_gap: Duration::from_millis(300),
            phase_jitter: self.registry.read_delay(),
            land_wait: quiet + self.registry.read_delay() + self.plan.land_slack,
            final_wait,
            bound: None,
        }
    }

    /// Loads `services` into the registry and checks that the first one arrived whole.
    async fn load(&self, services: &[Service]) -> Result<Duration> {
        let took = self
            .registry
            .register_all(services, self.load_concurrency)
            .await?;
        if let Some(first) = services.first() {
            let found = self.registry.instance_count(&first.name).await?;
            if found != first.instances.len() {
                bail!(
                    "{} reports {found} instances of {}, expected {}",
                    self.registry.name(),
                    first.name,
                    first.instances.len()
                );
            }
        }
        Ok(took)
    }

    /// After the connector reading `services` stopped: see
    /// [`Registry::connector_stopped`]; Consul's connection figures go to `results`.
    async fn connector_stopped(
        &self,
        results: &mut Results,
        services: &[Service],
        then: AfterStop,
        when: &str,
    ) -> Result<()> {
        let release = self
            .registry
            .connector_stopped(services, then, when, self.load_concurrency)
            .await?;
        results.consul_connections_after_stop.extend(release);
        Ok(())
    }
}

/// Waits until every expectation of `tracker` is met; the time from `t0` to the last.
async fn wait_all(tracker: &Tracker, t0: Instant, timeout: Duration, what: &str) -> Result<f64> {
    let ok = tracker
        .wait_until(Instant::now() + timeout, |t| t.open() == 0)
        .await;
    if !ok {
        bail!(
            "{what}: {} services still not as expected after {timeout:?}",
            tracker.open()
        );
    }
    let last = tracker.last_met().unwrap_or(t0);
    Ok(last.saturating_duration_since(t0).as_secs_f64())
}

/// How long an initial sync of `n` services may take before the run gives up.
fn sync_timeout(n: usize) -> Duration {
    Duration::from_secs(120).max(Duration::from_millis(60 * n as u64))
}

/// Idles for `d`, checking that the connector stays up.
async fn idle(c: &mut Connector, d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        c.check_alive()?;
        let step = (end - Instant::now()).min(Duration::from_secs(5));
        tokio::time::sleep(step).await;
    }
    Ok(())
}

/// Runs every workload; the results, targets evaluated.
pub async fn run_all(ctx: &mut Ctx, profile: &str, stamp: &str, command: &str) -> Result<Results> {
    let p = &ctx.plan;
    let mut results = Results::new(ctx.registry.kind(), profile, stamp, command);
    results.params = Params {
        n: p.n,
        m: p.m,
        k: p.k,
        k_cost: p.k_cost,
        cost_ns: p.cost_ns.clone(),
        steady_s: p.steady.as_secs_f64(),
        concurrency: ctx.concurrency,
        seed: ctx.seed,
        change_gap_ms: [50, 300],
        change_gap_jitter_ms: ctx.registry.read_delay().as_millis() as u64,
        land_wait_slack_ms: p.land_slack.as_millis() as u64,
        final_wait_s: p.final_wait.as_secs_f64(),
        read_delay_ms: ctx.registry.read_delay().as_millis() as u64,
    };
    results.registry_load_api = ctx.registry.load_api().into();
    results.connector_flags = ctx.connector_flags().join(" ")
        + " --leader-elect=false (others default: legacy Endpoints on, --max-period 5s)";

    initial::floor(ctx, &mut results).await?;
    let (mut synced, a) = initial::initial_sync(ctx, &mut results, Duration::from_secs(1)).await?;
    let b = propagation::both(ctx, &mut results, &mut synced, a).await?;
    steady::run(ctx, &mut results, &synced, b).await?;
    // The watches end before the data set goes, so that they do not time its removal.
    drop(synced.slices);
    drop(synced.eps);
    ctx.connector_stopped(
        &mut results,
        &synced.services,
        AfterStop::Remove,
        "after stopping the quiet-100ms connector",
    )
    .await?;

    for n in ctx.plan.cost_ns.clone() {
        let r = cost::run(ctx, n, &mut results).await?;
        say(format!(
            "cost at N={n}: {:.2} writes/change, {:.2} {} requests/change (net {:.2}), {}/{} landed",
            r.writes_per_change,
            r.requests_per_change_raw,
            ctx.registry.name(),
            r.requests_per_change_net,
            r.landed,
            r.changes
        ));
        results.cost.push(r);
    }
    results.evaluate();
    Ok(results)
}
