//! The Kubernetes → registry workload (`scripts/bench export [--registry consul|eureka]`):
//! the release connector with `--sync to-registry`, from empty, on N selector Services
//! × M Pods, writing to Consul or to Eureka.
//!
//! 1. The set is created (Services, Pods bound to one Node object, their status) and
//!    the harness waits until the controller-manager has built every EndpointSlice:
//!    the floor, what Kubernetes alone takes.
//! 2. The connector starts against a registry that holds nothing of it; timed until
//!    the registry's answer shows all N × M instances, all passing (Eureka: `UP`). Its
//!    registry requests (`/metrics`) per instance; the apiserver's requests on the
//!    kinds it watches.
//! 3. K readiness flips ([`super::flips`]).
//! 4. A window at rest: no registry write expected (Eureka's lease renewals counted
//!    apart); CPU and memory.
//! 5. A restart with nothing changed: time to ready, writes (0 expected), and every
//!    registration's stamps compared across it (Consul `ModifyIndex`; Eureka
//!    `lastUpdatedTimestamp`, `lastDirtyTimestamp`, the lease's registration time).
//! 6. Clean-up (always, unless `--keep`): the run's registrations removed (Consul: its
//!    node, every registration on it going with it; Eureka: every instance carrying the
//!    run's connector id, cancelled), the Pods force-deleted (no kubelet confirms a
//!    graceful deletion), the namespace deleted and waited for, the Node object
//!    deleted.
//!
//! Each run has its own namespace, Node, Consul node name and connector id
//! (`bench-export-<run id>`), so nothing of another run or test is ever touched. The
//! program measured is a [`Subject`]: this repository's connector, or consul-k8s for a
//! side-by-side. What is registry-specific is read through [`ExportRegistry`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::export_subject::Subject;
use super::flips::{self, FlipOpts, FlipTarget};
use super::{idle, wait_all, Ctx};
use crate::connector::Connector;
use crate::export_results::{ExportRestart, ExportResults, FlipResult};
use crate::metrics::{apiserver_requests, delta};
use crate::plan::ExportPlan;
use crate::pods::{self, ExportService};
use crate::registry::consul_export::ExportConsul;
use crate::registry::eureka_export::ExportEureka;
use crate::registry::export_reader::ExportRegistry;
use crate::registry::Registry;
use crate::tracker::Tracker;
use crate::{floor, say};

/// The kinds the connector watches (consul-k8s: the legacy Endpoints instead of the
/// slices), for the apiserver's request figures.
const WATCHED: [&str; 4] = ["services", "endpointslices", "endpoints", "nodes"];

/// One run's names and data set.
pub struct ExportEnv {
    pub ns: String,
    /// The Kubernetes Node object the Pods are bound to.
    pub node: String,
    /// Consul: the node every registration goes on (unused with Eureka).
    pub consul_node: String,
    pub connector_id: String,
    pub set: Vec<ExportService>,
    pub registry: ExportRegistry,
}

impl ExportEnv {
    pub fn new(ctx: &Ctx, ep: &ExportPlan) -> Result<Self> {
        let id = &ctx.run_id;
        let name = format!("bench-export-{id}");
        let connector_id = format!("bench-{id}");
        let registry = match &ctx.registry {
            Registry::Consul(c) => ExportRegistry::Consul(ExportConsul::new(c.http_addr(), &name)?),
            Registry::Eureka(e) => ExportRegistry::Eureka(ExportEureka::new(
                e.url(),
                &connector_id,
                ep.registry_poll,
                ep.registry_poll_all,
            )?),
            Registry::Nacos(_) | Registry::Zookeeper(_) => {
                anyhow::bail!("the export workload writes to Consul or Eureka (not yet to Nacos or ZooKeeper)")
            }
        };
        Ok(Self {
            registry,
            ns: name.clone(),
            node: name.clone(),
            consul_node: name,
            connector_id,
            set: pods::data_set(&format!("e{id}"), ep.n, ep.m),
        })
    }

    fn instances(&self) -> usize {
        self.set.iter().map(|s| s.pods.len()).sum()
    }
}

/// Runs the six steps into `results`; the clean-up runs whatever happened before it.
pub async fn run(
    ctx: &mut Ctx,
    ep: &ExportPlan,
    subject: &Subject,
    results: &mut ExportResults,
    keep: bool,
) -> Result<()> {
    let mut env = ExportEnv::new(ctx, ep)?;
    results.namespace = env.ns.clone();
    if matches!(env.registry, ExportRegistry::Consul(_)) {
        results.consul_node = env.consul_node.clone();
    }
    results.connector_id = env.connector_id.clone();
    let outcome = steps(ctx, ep, subject, &mut env, results).await;
    if !keep {
        cleanup(ctx, ep, &env, results).await;
    }
    outcome
}

async fn steps(
    ctx: &mut Ctx,
    ep: &ExportPlan,
    subject: &Subject,
    env: &mut ExportEnv,
    results: &mut ExportResults,
) -> Result<()> {
    let slices = kube_floor(ctx, ep, env, results).await?;
    let mut a = initial(ctx, ep, subject, env, results).await?;
    flip_phase(ctx, ep, subject, env, &slices, &a, &mut results.flips).await?;
    rest(ctx, ep, subject, &mut a, results).await?;
    let b = restart(ctx, ep, subject, env, a, &mut results.restart).await?;
    b.stop().await?;
    Ok(())
}

/// The apiserver's requests on the watched kinds between two scrapes.
fn watched(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    delta(before, after)
        .into_iter()
        .filter(|(k, _)| {
            k.split_whitespace()
                .nth(1)
                .is_some_and(|r| WATCHED.contains(&r))
        })
        .collect()
}

/// Step 1: the set written, every EndpointSlice built; returns the slice watch.
async fn kube_floor(
    ctx: &mut Ctx,
    ep: &ExportPlan,
    env: &ExportEnv,
    results: &mut ExportResults,
) -> Result<Tracker> {
    floor::create_namespace(&ctx.client, &env.ns).await?;
    ctx.namespaces.push(env.ns.clone());
    pods::create_node(&ctx.client, &env.node).await?;
    pods::wait_service_account(&ctx.client, &env.ns, Duration::from_secs(60)).await?;
    let slices = Tracker::endpoint_slices(ctx.client.clone(), &env.ns);
    slices.wait_synced(Duration::from_secs(60)).await?;
    for s in &env.set {
        slices.expect(&s.name, s.ready_ips());
    }
    say(format!(
        "export: creating {} Services x {} Pods in {}",
        ep.n, ep.m, env.ns
    ));
    let t0 = Instant::now();
    let writes =
        pods::create_all(&ctx.client, &env.ns, &env.node, &env.set, ctx.concurrency).await?;
    let f = &mut results.floor;
    f.writes_s = t0.elapsed().as_secs_f64();
    f.slices_complete_s = wait_all(&slices, t0, ep.sync_timeout, "the EndpointSlices").await?;
    f.services = env.set.len();
    f.pods = env.instances();
    f.writes = writes;
    say(format!(
        "export: {writes} Kubernetes writes in {:.2} s, every EndpointSlice built after {:.2} s (the floor)",
        f.writes_s, f.slices_complete_s
    ));
    Ok(slices)
}

/// Step 2: the connector from empty until the registry holds every instance, passing.
async fn initial(
    ctx: &Ctx,
    ep: &ExportPlan,
    subject: &Subject,
    env: &ExportEnv,
    results: &mut ExportResults,
) -> Result<Connector> {
    let want = env.instances();
    let before = env.registry.existing().await?;
    if before > 0 {
        anyhow::bail!(
            "{} already holds {before} registrations of this run ({} / {})",
            env.registry.name(),
            env.consul_node,
            env.connector_id
        );
    }
    let api0 = apiserver_requests(&ctx.client).await;
    let launch = subject.launch(ctx, env, ep.quiet, "connector-export.log")?;
    let base = subject.baseline();
    let mut a = Connector::start(&launch).await?;
    results.connector_command = format!("{} {}", launch.bin.display(), a.args.join(" "));
    let deadline = Instant::now() + ep.sync_timeout;
    let started = a.started;
    let (ready, registered) = futures::join!(
        a.wait_ready(ep.sync_timeout),
        env.registry
            .wait_registered(subject.owner_id(env), want, deadline)
    );
    let at = registered?;
    let api1 = apiserver_requests(&ctx.client).await;
    // Reads the sync caused after its last write (its node watch answering) count too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let c = subject.counters(&a).await?.since(&base);
    let stats = a.stats()?;
    let s = &mut results.sync;
    s.instances = want;
    s.complete_s = at.saturating_duration_since(started).as_secs_f64();
    s.ready_s = ready?.as_secs_f64();
    s.ratio_to_floor = s.complete_s / results.floor.slices_complete_s.max(1e-9);
    s.requests_per_instance = c.requests.total / want.max(1) as f64;
    s.requests = c.requests;
    s.txn_requests = c.txn;
    s.registry_write_requests = c.registry_writes;
    s.heartbeats = c.heartbeats;
    s.reregistrations = c.reregistrations;
    s.export_writes = c.writes;
    s.export_write_requests = c.write_requests;
    s.kube_writes = c.kube_writes;
    s.apiserver_requests = watched(&api0, &api1);
    s.cpu_s = stats.cpu_seconds;
    s.peak_rss_mib = stats.peak_rss_mib;
    s.connections = a.connections();
    let reg = env.registry.name();
    say(format!(
        "export: {want} instances in {reg}, all passing, {:.2} s after the start (ready {:.2} s); {:.0} {reg} requests ({:.4} per instance), {:.0} write requests, {:.0} heartbeats",
        s.complete_s, s.ready_s, s.requests.total, s.requests_per_instance, s.registry_write_requests, s.heartbeats
    ));
    Ok(a)
}

/// Step 3 around [`flips::run`]: the metrics before and after.
async fn flip_phase(
    ctx: &mut Ctx,
    ep: &ExportPlan,
    subject: &Subject,
    env: &mut ExportEnv,
    slices: &Tracker,
    a: &Connector,
    out: &mut FlipResult,
) -> Result<()> {
    let opts = FlipOpts {
        k: ep.k,
        land_bound: ep.land_bound,
        min_gap: Duration::from_millis(50),
        max_gap: Duration::from_millis(300),
    };
    let c0 = subject.counters(a).await?;
    let api0 = apiserver_requests(&ctx.client).await;
    let t = Instant::now();
    let target = FlipTarget {
        client: &ctx.client,
        ns: &env.ns,
        registry: &env.registry,
        slices,
        started: a.started,
        ready: subject.ready_state(env.registry.kind()),
        not_ready: subject.not_ready_state(env.registry.kind()),
    };
    out.samples = flips::run(&target, &mut env.set, &opts, &mut ctx.rng).await?;
    // The reads a change causes after its write (the node watch answering) count too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    out.phase_s = t.elapsed().as_secs_f64();
    let c = subject.counters(a).await?.since(&c0);
    out.apiserver_requests = watched(&api0, &apiserver_requests(&ctx.client).await);
    out.flips = ep.k;
    // Eureka is polled: a change can wait one poll interval before the harness sees it.
    let poll = match env.registry {
        ExportRegistry::Eureka(_) => ep.registry_poll,
        ExportRegistry::Consul(_) => Duration::ZERO,
    };
    out.target_ms = (ep.quiet + poll).as_secs_f64() * 1000.0 + 250.0;
    out.summarize();
    let changes = out.changes.max(1) as f64;
    out.requests_per_change = c.requests.total / changes;
    out.txn_per_change = c.txn / changes;
    out.registry_writes_per_change = c.registry_writes / changes;
    out.heartbeats = c.heartbeats;
    out.requests_per_change_without_heartbeats = (c.requests.total - c.heartbeats) / changes;
    out.export_writes_per_change = c.writes / changes;
    out.requests = c.requests;
    say(format!(
        "export: {} readiness changes, p50 {} ms, p99 {} ms ({} landed; slices p50 {} ms); {:.2} {} requests, {:.2} write requests per change",
        out.changes,
        crate::export_results::ms(out.p50_ms),
        crate::export_results::ms(out.p99_ms),
        out.landed,
        crate::export_results::ms(out.slice_p50_ms),
        out.requests_per_change,
        env.registry.name(),
        out.registry_writes_per_change
    ));
    Ok(())
}

/// Step 4: the window at rest.
async fn rest(
    ctx: &Ctx,
    ep: &ExportPlan,
    subject: &Subject,
    a: &mut Connector,
    results: &mut ExportResults,
) -> Result<()> {
    // Anything still coalescing is written before the window opens.
    tokio::time::sleep(ep.quiet + Duration::from_secs(2)).await;
    let (c0, s0) = (subject.counters(a).await?, a.stats()?);
    let api0 = apiserver_requests(&ctx.client).await;
    let t = Instant::now();
    say(format!("export: {:.0} s at rest", ep.rest.as_secs_f64()));
    idle(a, ep.rest).await?;
    let window = t.elapsed().as_secs_f64();
    let (c, s1) = (subject.counters(a).await?.since(&c0), a.stats()?);
    let r = &mut results.rest;
    r.window_s = window;
    r.txn_requests = c.txn;
    r.registry_write_requests = c.registry_writes;
    r.heartbeats = c.heartbeats;
    r.heartbeats_per_min = c.heartbeats / (window / 60.0);
    r.reregistrations = c.reregistrations;
    r.export_writes = c.writes;
    r.export_write_requests = c.write_requests;
    r.requests_per_min = c.requests.total / (window / 60.0);
    r.requests = c.requests;
    r.apiserver_requests = watched(&api0, &apiserver_requests(&ctx.client).await);
    r.cpu_s = s1.cpu_seconds - s0.cpu_seconds;
    r.cpu_pct = r.cpu_s / window * 100.0;
    r.rss_mib = s1.rss_mib;
    r.peak_rss_mib = s1.peak_rss_mib;
    r.connections = a.connections();
    r.connections_peak = a.connections_peak();
    say(format!(
        "export: at rest {:.0} write requests, {:.0} instance writes, {:.0} heartbeats ({:.1}/min), {:.1} registry requests/min, CPU {:.3} %, RSS {:.1} MiB (peak {:.1})",
        r.registry_write_requests, r.export_writes, r.heartbeats, r.heartbeats_per_min, r.requests_per_min, r.cpu_pct, r.rss_mib, r.peak_rss_mib
    ));
    Ok(())
}

/// Step 5: `a` stopped, a second connector with the same flags; returns it.
async fn restart(
    ctx: &Ctx,
    ep: &ExportPlan,
    subject: &Subject,
    env: &ExportEnv,
    a: Connector,
    out: &mut ExportRestart,
) -> Result<Connector> {
    let before = env.registry.snapshot().await?;
    a.stop().await?;
    let launch = subject.launch(ctx, env, ep.quiet, "connector-restart.log")?;
    let base = subject.baseline();
    let mut b = Connector::start(&launch).await?;
    match b.wait_ready(ep.restart_timeout).await {
        Ok(d) => out.ready_s = Some(d.as_secs_f64()),
        Err(e) => say(format!("export: restart: {e:#}")),
    }
    let settle = subject.restart_settle(ep.restart_settle);
    tokio::time::sleep(settle).await;
    out.settle_s = settle.as_secs_f64();
    let c = subject.counters(&b).await?.since(&base);
    let moved = before.compare(&env.registry.snapshot().await?);
    out.export_writes = c.writes;
    out.txn_requests = c.txn;
    out.registry_write_requests = c.registry_writes;
    out.registrations = c.registrations;
    out.heartbeats = c.heartbeats;
    out.reregistrations = c.reregistrations;
    out.requests = c.requests;
    out.instances = moved.instances;
    match env.registry {
        ExportRegistry::Consul(_) => out.modify_index_changed = Some(moved.primary),
        ExportRegistry::Eureka(_) => {
            out.last_updated_changed = Some(moved.primary);
            out.last_dirty_changed = moved.last_dirty;
            out.registration_changed = moved.registration;
        }
    }
    say(format!(
        "export: restart ready after {}, {:.0} instance writes, {:.0} write requests ({:.0} registrations), stamps changed on {} of {} instances",
        out.ready_s
            .map_or(format!("> {:.0} s", ep.restart_timeout.as_secs_f64()), |v| format!("{v:.2} s")),
        out.export_writes,
        out.registry_write_requests,
        out.registrations,
        out.stamps_changed(),
        out.instances
    ));
    Ok(b)
}

/// Step 6, best effort: every failure is recorded, none stops the others.
async fn cleanup(ctx: &mut Ctx, ep: &ExportPlan, env: &ExportEnv, results: &mut ExportResults) {
    let c = &mut results.cleanup;
    // The connector has stopped (or was killed when its step failed), so nothing
    // renews or registers these again.
    match env.registry.remove_all().await {
        Ok(what) => {
            c.registry_removed = true;
            c.registry_removal = what;
        }
        Err(e) => c.errors.push(format!(
            "removing the {} registrations: {e:#}",
            env.registry.name()
        )),
    }
    if let Err(e) = pods::force_delete_pods(&ctx.client, &env.ns).await {
        c.errors.push(format!("deleting the Pods: {e:#}"));
    }
    match floor::delete_namespace(&ctx.client, &env.ns, ep.namespace_gone_max).await {
        Ok((waited, gone)) => {
            c.namespace_gone = gone;
            c.namespace_wait_s = waited;
            ctx.namespaces.retain(|n| n != &env.ns);
        }
        Err(e) => c.errors.push(format!("deleting namespace: {e:#}")),
    }
    match pods::delete_node(&ctx.client, &env.node).await {
        Ok(()) => c.node_deleted = true,
        Err(e) => c.errors.push(format!("deleting Node: {e:#}")),
    }
    say(format!(
        "export: cleaned up ({}: {}, namespace gone after {:.1} s: {}, Node deleted: {}){}",
        if c.registry_removal.is_empty() {
            "registry entries removed"
        } else {
            &c.registry_removal
        },
        c.registry_removed,
        c.namespace_wait_s,
        c.namespace_gone,
        c.node_deleted,
        if c.errors.is_empty() {
            String::new()
        } else {
            format!("; errors: {}", c.errors.join("; "))
        }
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watched_keeps_the_connectors_kinds() {
        let a = BTreeMap::from([("LIST services".to_string(), 1.0)]);
        let b = BTreeMap::from([
            ("LIST services".to_string(), 2.0),
            ("WATCH endpointslices".to_string(), 1.0),
            ("PATCH pods".to_string(), 9.0),
        ]);
        let w = watched(&a, &b);
        assert_eq!(w.len(), 2);
        assert_eq!(w["LIST services"], 1.0);
    }
}
