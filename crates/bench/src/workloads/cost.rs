//! Workload 4: cost per change at a fixed size. A data set of its own, a connector
//! with quiet 100 ms, and the connector's counters before and after K changes: writes
//! and registry requests per landed change. Requests the connector makes whether or
//! not anything changes (Eureka's polls, Consul's blocking queries timing out) are
//! measured on the same connector idling afterwards and subtracted ("net").

use std::time::{Duration, Instant};

use anyhow::Result;

use super::{idle, sync_timeout, wait_all, Ctx};
use crate::changes;
use crate::connector::Connector;
use crate::model::make_services;
use crate::registry::AfterStop;
use crate::results::{CostResult, Requests, Results};
use crate::say;
use crate::tracker::Tracker;

pub async fn run(ctx: &mut Ctx, n: usize, results: &mut Results) -> Result<CostResult> {
    let m = ctx.plan.m;
    let quiet = Duration::from_millis(100);
    let set = ctx.set(&format!("cost{n}"));
    let mut services = make_services(&format!("c{n}x{}", ctx.run_id), &set, n, m);
    say(format!("cost at N={n}: registering {n} x {m} instances"));
    ctx.load(&services).await?;
    let ns = ctx.namespace(&format!("cost{n}")).await?;
    let slices = Tracker::endpoint_slices(ctx.client.clone(), &ns);
    slices.wait_synced(Duration::from_secs(30)).await?;
    for s in &services {
        slices.expect(&s.name, s.ready_addresses());
    }
    let launch = ctx.launch(&ns, &set, quiet, &format!("connector-cost{n}.log"));
    let mut c = Connector::start(&launch).await?;
    let sync_s = wait_all(&slices, c.started, sync_timeout(n), "cost run initial sync").await?;
    c.wait_ready(sync_timeout(n)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let delta_at_start = ctx.registry.delta_instances().await;
    let m0 = c.metrics().await?;
    let phase_start = Instant::now();
    let opts = ctx.change_opts(ctx.plan.k_cost, quiet, ctx.plan.cost_final_wait);
    let run = changes::run(
        &ctx.registry,
        &slices,
        &mut services,
        &opts,
        &mut ctx.rng,
        c.started,
    )
    .await?;
    // Let the reconcile of the last change (and any stray write) finish.
    tokio::time::sleep(quiet + Duration::from_secs(2)).await;
    let m1 = c.metrics().await?;
    let change_phase = phase_start.elapsed();
    // The same connector idle for a while: the background that the deltas include.
    let idle_len = change_phase.min(ctx.plan.cost_idle_cap);
    idle(&mut c, idle_len).await?;
    let m2 = c.metrics().await?;
    let stats = c.stop().await?;
    drop(slices);
    ctx.connector_stopped(
        results,
        &services,
        AfterStop::Remove,
        &format!("after stopping the N={n} connector"),
    )
    .await?;

    let landed = run.landed.max(1) as f64;
    let requests = Requests::between(&m0, &m1);
    let idle_rate = Requests::between(&m1, &m2).total / idle_len.as_secs_f64();
    let background = idle_rate * change_phase.as_secs_f64();
    let writes = m1.writes_all() - m0.writes_all();
    let per_change = |kind: &str| (m1.writes_of(kind) - m0.writes_of(kind)) / landed;
    Ok(CostResult {
        n,
        quiet_ms: quiet.as_millis() as u64,
        initial_sync_s: sync_s,
        changes: run.changes,
        landed: run.landed,
        writes,
        writes_per_change: writes / landed,
        writes_by_kind_per_change: [
            per_change("service"),
            per_change("endpointslice"),
            per_change("endpoints"),
        ],
        requests_per_change_raw: requests.total / landed,
        requests_idle_per_s: idle_rate,
        requests_per_change_net: (requests.total - background).max(0.0) / landed,
        full_fetches_per_change: requests.full_fetch_count() / landed,
        requests,
        reconciles_per_change: (m1.reconciles() - m0.reconciles()) / landed,
        p50_ms: changes::percentile(&run, 50.0),
        p99_ms: changes::percentile(&run, 99.0),
        max_ms: changes::max(&run),
        change_phase_s: change_phase.as_secs_f64(),
        cpu_s: stats.cpu_seconds,
        peak_rss_mib: stats.peak_rss_mib,
        delta_instances_at_start: delta_at_start,
    })
}
