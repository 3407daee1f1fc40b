//! The scaling curve: for each N, a fresh data set taken through the floor, the initial
//! sync, K changes starting right at the end of the sync, a window at rest and a
//! restart, with one [`CurveRow`] per N.
//!
//! Every N is bounded in time: a change counts as landed only within the land bound,
//! the wait for pending changes before the rest window and the restarted connector's
//! wait for ready are bounded too, and a failure of one N is recorded in its row (its
//! namespaces and data sets are removed) so that the next N still runs. The restart is
//! measured as an operator's restart would happen: the second process starts as soon as
//! the first has exited, from the same address, without the harness first ending the
//! long polls Consul keeps for the stopped one.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{idle, initial, Ctx};
use crate::changes;
use crate::connector::Connector;
use crate::curve::{CurveResults, CurveRow};
use crate::plan::CurvePlan;
use crate::registry::AfterStop;
use crate::results::Results;
use crate::{floor, say};

/// Wall time of a row's phases, in order.
struct Phases {
    last: Instant,
    list: Vec<(String, f64)>,
}

impl Phases {
    fn new() -> Self {
        Phases {
            last: Instant::now(),
            list: Vec::new(),
        }
    }

    fn mark(&mut self, name: &str) {
        let now = Instant::now();
        self.list
            .push((name.into(), now.duration_since(self.last).as_secs_f64()));
        self.last = now;
    }
}

/// Runs every N of `cp` into `results.rows`, rewriting `out` after each row so that an
/// interrupted curve keeps the rows it finished.
pub async fn run(ctx: &mut Ctx, cp: &CurvePlan, results: &mut CurveResults, out: &Path) {
    let base_id = ctx.run_id.clone();
    let base_log = ctx.log_dir.clone();
    for &n in &cp.ns {
        let mut row = CurveRow {
            n,
            m: cp.m,
            land_bound_s: cp.land_bound.as_secs_f64(),
            ..Default::default()
        };
        let started = Instant::now();
        match cp.max_instances.filter(|max| n * cp.m > *max) {
            Some(max) => {
                row.status = format!(
                    "skipped: {} instances, above {max} (--max-instances; the Eureka server's 256 MiB heap was seen to hold 30,000)",
                    n * cp.m
                );
                say(format!("curve N={n}: {}", row.status));
            }
            None => {
                ctx.plan.n = n;
                ctx.plan.m = cp.m;
                ctx.run_id = format!("{base_id}n{n}");
                ctx.log_dir = base_log.join(format!("n{n}"));
                let _ = std::fs::create_dir_all(&ctx.log_dir);
                say(format!("curve N={n}: {} x {} instances", n, cp.m));
                match one(ctx, cp, &mut row).await {
                    Ok(()) => row.status = "ok".into(),
                    Err(e) => {
                        row.status = format!("failed: {e:#}").replace(['|', '\n'], " ");
                        say(format!("curve N={n}: {}", row.status));
                        after_failure(ctx, cp).await;
                    }
                }
            }
        }
        row.total_s = started.elapsed().as_secs_f64();
        row.per_service();
        say(summary(&row));
        results.rows.push(row);
        if let Err(e) = write(results, out) {
            say(format!("writing {} failed: {e:#}", out.display()));
        }
    }
}

/// One N, filling `row` as it goes (a failure keeps what was measured).
async fn one(ctx: &mut Ctx, cp: &CurvePlan, row: &mut CurveRow) -> Result<()> {
    let mut phases = Phases::new();
    let mut scratch = Results::new(ctx.registry.kind(), "curve", "", "");

    initial::floor(ctx, &mut scratch).await?;
    row.floor_s = Some(scratch.floor.all_s);
    phases.mark("floor");
    // The namespace controller's deletions would compete with the sync.
    drop_namespace(ctx, &format!("bench-floor-{}", ctx.run_id), cp).await?;
    phases.mark("floor namespace deleted");

    let (mut synced, mut a) = initial::initial_sync(ctx, &mut scratch, cp.quiet).await?;
    let i = &scratch.initial_sync;
    row.registry_load_s = Some(i.registry_load_s);
    row.initial_sync_s = Some(i.complete_s);
    row.sync_ratio_to_floor = Some(i.ratio_to_floor);
    row.ready_s = Some(i.ready_s);
    row.connections_at_sync = Some(i.connections);
    phases.mark("registry load and initial sync");

    // Changes from the end of the sync on: nothing is excluded as a warm-up.
    let mut opts = ctx.change_opts(cp.k, cp.quiet, cp.land_bound);
    opts.bound = Some(cp.land_bound);
    let before = a.metrics().await?;
    row.first_change_after_sync_s = Some(synced.synced_at.elapsed().as_secs_f64());
    let run = changes::run(
        &ctx.registry,
        &synced.slices,
        &mut synced.services,
        &opts,
        &mut ctx.rng,
        a.started,
    )
    .await?;
    let after = a.metrics().await?;
    let made = run.changes.max(1) as f64;
    row.changes = run.changes;
    row.landed = run.landed;
    row.p50_ms = changes::percentile(&run, 50.0);
    row.p99_ms = changes::percentile(&run, 99.0);
    row.max_ms = changes::max(&run);
    row.requests_per_change = Some((after.registry_requests() - before.registry_requests()) / made);
    row.writes_per_change = Some((after.writes_all() - before.writes_all()) / made);
    say(format!(
        "curve N={}: propagation p50 {}, p99 {}; {}/{} landed within {:.0} s ({} later)",
        row.n,
        ms(row.p50_ms),
        ms(row.p99_ms),
        run.landed,
        run.changes,
        cp.land_bound.as_secs_f64(),
        run.landed_after_bound
    ));
    row.run = Some(run);
    phases.mark("propagation");

    // A change still pending would write during the window: give it the bound once more.
    synced
        .slices
        .wait_until(Instant::now() + cp.land_bound, |t| t.open() == 0)
        .await;
    row.pending_at_rest = Some(synced.slices.open());
    let m0 = a.metrics().await?;
    let s0 = a.stats()?;
    let t = Instant::now();
    idle(&mut a, cp.rest).await?;
    let window = t.elapsed().as_secs_f64();
    let m1 = a.metrics().await?;
    let s1 = a.stats()?;
    row.rest_window_s = Some(window);
    row.writes_at_rest = Some(m1.writes_all() - m0.writes_all());
    row.requests_per_min_at_rest =
        Some((m1.registry_requests() - m0.registry_requests()) / (window / 60.0));
    row.cpu_pct_at_rest = Some((s1.cpu_seconds - s0.cpu_seconds) / window * 100.0);
    row.rss_at_rest_mib = Some(s1.rss_mib);
    row.rss_peak_mib = Some(s1.peak_rss_mib);
    row.connections_at_rest = Some(a.connections());
    row.connections_peak = Some(a.connections_peak());
    phases.mark("pending wait and rest");

    a.stop().await?;
    restart(ctx, cp, row, &synced.ns, &synced.set).await?;
    phases.mark("restart");

    // The watches end before the data set goes, so that they do not time its removal.
    drop(synced.slices);
    drop(synced.eps);
    ctx.connector_stopped(
        &mut scratch,
        &synced.services,
        AfterStop::Remove,
        "after the restarted connector stopped",
    )
    .await?;
    drop_namespace(ctx, &synced.ns, cp).await?;
    phases.mark("cleanup");
    row.phases_s = phases.list;
    Ok(())
}

/// A second connector on the synced namespace, started right after the first exited.
async fn restart(ctx: &Ctx, cp: &CurvePlan, row: &mut CurveRow, ns: &str, set: &str) -> Result<()> {
    row.agent_connections_at_restart = ctx.registry.agent_connections();
    let launch = ctx.launch(ns, set, cp.quiet, "connector-restart.log");
    let mut b = Connector::start(&launch).await?;
    match b.wait_ready(cp.restart_timeout).await {
        Ok(d) => {
            row.restart_ready_s = Some(d.as_secs_f64());
            // Writes of a restart are counted once it is ready (0 expected).
            tokio::time::sleep(Duration::from_secs(1)).await;
            row.restart_writes = Some(b.metrics().await?.writes_all());
        }
        Err(e) => say(format!("curve N={}: restart: {e:#}", row.n)),
    }
    say(format!(
        "curve N={}: restart ready after {} ({} connections held by the agent at the start)",
        row.n,
        row.restart_ready_s.map_or(
            format!("> {:.0} s", cp.restart_timeout.as_secs_f64()),
            |v| format!("{v:.2} s")
        ),
        row.agent_connections_at_restart
            .map_or("n/a".into(), |v| v.to_string())
    ));
    b.stop().await?;
    Ok(())
}

/// Deletes one of this run's namespaces and waits until it is gone (bounded).
async fn drop_namespace(ctx: &mut Ctx, ns: &str, cp: &CurvePlan) -> Result<()> {
    let (waited, gone) = floor::delete_namespace(&ctx.client, ns, cp.namespace_gone_max).await?;
    ctx.namespaces.retain(|n| n != ns);
    say(format!(
        "namespace {ns} {} after {waited:.1} s",
        if gone { "gone" } else { "still there" }
    ));
    Ok(())
}

/// After a failed N: removes what it left (namespaces, data sets), best effort.
async fn after_failure(ctx: &mut Ctx, cp: &CurvePlan) {
    for ns in ctx.namespaces.clone() {
        if let Err(e) = drop_namespace(ctx, &ns, cp).await {
            say(format!("deleting namespace {ns} failed: {e:#}"));
        }
    }
    if let Err(e) = ctx.registry.cleanup(ctx.load_concurrency).await {
        say(format!("removing the data sets failed: {e:#}"));
    }
    // Consul: removing a data set ends the killed connector's long polls.
    tokio::time::sleep(Duration::from_secs(2)).await;
}

fn ms(v: Option<f64>) -> String {
    v.map_or("not landed".into(), |v| format!("{v:.0} ms"))
}

/// The one-line summary of a row on stderr.
fn summary(r: &CurveRow) -> String {
    format!(
        "curve N={}: {} in {:.0} s; sync {} s, {} connections at sync / {} peak / {} at rest, RSS peak {} MiB, restart ready {}",
        r.n,
        r.status,
        r.total_s,
        r.initial_sync_s.map_or("-".into(), |v| format!("{v:.2}")),
        r.connections_at_sync.map_or("-".into(), |v| v.to_string()),
        r.connections_peak.map_or("-".into(), |v| v.to_string()),
        r.connections_at_rest.map_or("-".into(), |v| v.to_string()),
        r.rss_peak_mib.map_or("-".into(), |v| format!("{v:.1}")),
        r.restart_ready_s.map_or("-".into(), |v| format!("{v:.2} s")),
    )
}

fn write(results: &CurveResults, out: &Path) -> Result<()> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(results).context("encoding the results")?;
    std::fs::write(out, json).with_context(|| format!("writing {}", out.display()))
}
