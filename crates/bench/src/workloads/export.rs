//! The Kubernetes → Consul workload (`scripts/bench export`): the release connector
//! with `--sync to-registry`, from empty, on N selector Services × M Pods.
//!
//! 1. The set is created (Services, Pods bound to one Node object, their status) and
//!    the harness waits until the controller-manager has built every EndpointSlice:
//!    the floor, what Kubernetes alone takes.
//! 2. The connector starts against a Consul that holds nothing of it; timed until
//!    Consul's answer shows all N × M instances, all passing. Its Consul requests
//!    (`/metrics`) per instance; the apiserver's requests on the kinds it watches.
//! 3. K readiness flips ([`super::flips`]).
//! 4. A window at rest: no registry write expected; CPU and memory.
//! 5. A restart with nothing changed: time to ready, writes (0 expected), and every
//!    registration's `ModifyIndex` compared across it.
//! 6. Clean-up (always, unless `--keep`): the Consul node deregistered (every
//!    registration on it goes with it), the Pods force-deleted (no kubelet confirms a
//!    graceful deletion), the namespace deleted and waited for, the Node object
//!    deleted.
//!
//! Each run has its own namespace, Node, Consul node name and connector id
//! (`bench-export-<run id>`), so nothing of another run or test is ever touched. The
//! program measured is a [`Subject`]: this repository's connector, or consul-k8s for a
//! side-by-side.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::export_subject::Subject;
use super::flips::{self, FlipOpts, FlipTarget};
use super::{idle, wait_all, Ctx};
use crate::connector::Connector;
use crate::export_results::{ExportRestart, ExportResults, FlipResult};
use crate::metrics::{apiserver_requests, delta};
use crate::plan::ExportPlan;
use crate::pods::{self, ExportService};
use crate::registry::consul::Consul;
use crate::registry::consul_export::ExportConsul;
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
    pub consul_node: String,
    pub connector_id: String,
    pub set: Vec<ExportService>,
    pub consul: ExportConsul,
}

impl ExportEnv {
    pub fn new(ctx: &Ctx, consul: &Consul, n: usize, m: usize) -> Result<Self> {
        let id = &ctx.run_id;
        let name = format!("bench-export-{id}");
        Ok(Self {
            consul: ExportConsul::new(consul.http_addr(), &name)?,
            ns: name.clone(),
            node: name.clone(),
            consul_node: name,
            connector_id: format!("bench-{id}"),
            set: pods::data_set(&format!("e{id}"), n, m),
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
    let consul = ctx
        .registry
        .consul()
        .context("the export workload needs --registry consul")?;
    let mut env = ExportEnv::new(ctx, consul, ep.n, ep.m)?;
    results.namespace = env.ns.clone();
    results.consul_node = env.consul_node.clone();
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

/// Step 2: the connector from empty until Consul holds every instance, passing.
async fn initial(
    ctx: &Ctx,
    ep: &ExportPlan,
    subject: &Subject,
    env: &ExportEnv,
    results: &mut ExportResults,
) -> Result<Connector> {
    let want = env.instances();
    let before = env.consul.node(0).await?;
    if !before.services.is_empty() {
        anyhow::bail!(
            "Consul node {} already holds {} registrations",
            env.consul_node,
            before.services.len()
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
        env.consul
            .wait_registered(subject.owner_id(env), want, deadline)
    );
    let (at, _) = registered?;
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
    s.export_writes = c.writes;
    s.export_write_requests = c.write_requests;
    s.kube_writes = c.kube_writes;
    s.apiserver_requests = watched(&api0, &api1);
    s.cpu_s = stats.cpu_seconds;
    s.peak_rss_mib = stats.peak_rss_mib;
    s.connections = a.connections();
    say(format!(
        "export: {want} instances in Consul, all passing, {:.2} s after the start (ready {:.2} s); {:.0} Consul requests ({:.4} per instance), {:.0} txn",
        s.complete_s, s.ready_s, s.requests.total, s.requests_per_instance, s.txn_requests
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
        consul: &env.consul,
        slices,
        started: a.started,
        not_ready: subject.not_ready_state(),
    };
    out.samples = flips::run(&target, &mut env.set, &opts, &mut ctx.rng).await?;
    // The reads a change causes after its write (the node watch answering) count too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    out.phase_s = t.elapsed().as_secs_f64();
    let c = subject.counters(a).await?.since(&c0);
    out.apiserver_requests = watched(&api0, &apiserver_requests(&ctx.client).await);
    out.flips = ep.k;
    out.target_ms = ep.quiet.as_secs_f64() * 1000.0 + 250.0;
    out.summarize();
    let changes = out.changes.max(1) as f64;
    out.requests_per_change = c.requests.total / changes;
    out.txn_per_change = c.txn / changes;
    out.export_writes_per_change = c.writes / changes;
    out.requests = c.requests;
    say(format!(
        "export: {} readiness changes, p50 {} ms, p99 {} ms ({} landed; slices p50 {} ms); {:.2} Consul requests, {:.2} txn per change",
        out.changes,
        crate::export_results::ms(out.p50_ms),
        crate::export_results::ms(out.p99_ms),
        out.landed,
        crate::export_results::ms(out.slice_p50_ms),
        out.requests_per_change,
        out.txn_per_change
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
        "export: at rest {:.0} txn, {:.0} instance writes, {:.1} Consul requests/min, CPU {:.3} %, RSS {:.1} MiB (peak {:.1})",
        r.txn_requests, r.export_writes, r.requests_per_min, r.cpu_pct, r.rss_mib, r.peak_rss_mib
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
    let before = env.consul.node(0).await?.modify_indexes();
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
    let after = env.consul.node(0).await?.modify_indexes();
    out.export_writes = c.writes;
    out.txn_requests = c.txn;
    out.requests = c.requests;
    out.instances = after.len();
    out.modify_index_changed = changed(&before, &after);
    say(format!(
        "export: restart ready after {}, {:.0} instance writes, {:.0} txn, {} of {} ModifyIndex changed",
        out.ready_s
            .map_or(format!("> {:.0} s", ep.restart_timeout.as_secs_f64()), |v| format!("{v:.2} s")),
        out.export_writes,
        out.txn_requests,
        out.modify_index_changed,
        out.instances
    ));
    Ok(b)
}

/// Registrations whose `ModifyIndex` differs, or that are in one map only.
fn changed(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> usize {
    let moved = before
        .iter()
        .filter(|(id, ix)| after.get(*id) != Some(*ix))
        .count();
    moved + after.keys().filter(|id| !before.contains_key(*id)).count()
}

/// Step 6, best effort: every failure is recorded, none stops the others.
async fn cleanup(ctx: &mut Ctx, ep: &ExportPlan, env: &ExportEnv, results: &mut ExportResults) {
    let c = &mut results.cleanup;
    match env.consul.deregister_node().await {
        Ok(()) => c.consul_node_deregistered = true,
        Err(e) => c.errors.push(format!("deregistering Consul node: {e:#}")),
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
        "export: cleaned up (Consul node deregistered: {}, namespace gone after {:.1} s: {}, Node deleted: {}){}",
        c.consul_node_deregistered,
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
    fn changed_counts_moved_added_and_gone() {
        let before = BTreeMap::from([("a".into(), 1), ("b".into(), 2), ("c".into(), 3)]);
        let after = BTreeMap::from([("a".into(), 1), ("b".into(), 5), ("d".into(), 4)]);
        assert_eq!(changed(&before, &after), 3);
        assert_eq!(changed(&before, &before), 0);
    }

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
