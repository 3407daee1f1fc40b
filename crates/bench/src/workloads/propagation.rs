//! Workload 3: propagation of K single-instance changes, first on the connector that
//! did the initial sync (quiet 1 s), then, after a restart on the same namespace, on
//! one with quiet 100 ms. The restart's own figures (time to ready, writes) are taken
//! on the way.

use std::time::Duration;

use anyhow::Result;

use super::initial::Synced;
use super::{sync_timeout, Ctx};
use crate::changes;
use crate::connector::Connector;
use crate::registry::AfterStop;
use crate::results::{prop_line, PropResult, Requests, RestartResult, Results};
use crate::say;

/// Propagation on `a` (quiet 1 s), stop, restart as quiet 100 ms, propagation on the
/// new connector, which is returned for the steady state.
pub async fn both(
    ctx: &mut Ctx,
    results: &mut Results,
    synced: &mut Synced,
    a: Connector,
) -> Result<Connector> {
    let r = one(ctx, &a, synced, Duration::from_secs(1), true).await?;
    results.propagation.push(r);
    a.stop().await?;
    ctx.connector_stopped(
        results,
        &synced.services,
        AfterStop::Keep,
        "after stopping the quiet-1s connector",
    )
    .await?;

    let quiet = Duration::from_millis(100);
    let launch = ctx.launch(&synced.ns, &synced.set, quiet, "connector-quiet100ms.log");
    let mut b = Connector::start(&launch).await?;
    let ready = b
        .wait_ready(sync_timeout(synced.services.len()))
        .await?
        .as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mb = b.metrics().await?;
    results.restart = RestartResult {
        ready_s: ready,
        writes: mb.writes(),
        requests: Requests::since_start(&mb),
    };
    say(format!(
        "restart on a synced namespace: ready after {ready:.2} s, {} writes",
        mb.writes()
    ));
    let r = one(ctx, &b, synced, quiet, false).await?;
    results.propagation.push(r);
    Ok(b)
}

/// One propagation run against `connector` (started with `quiet` as its quiet period):
/// K changes, and the connector's counters before and after. `after_sync`: the
/// connector is the one that did the initial sync, and the gap from its end to the
/// first change is recorded.
async fn one(
    ctx: &mut Ctx,
    connector: &Connector,
    synced: &mut Synced,
    quiet: Duration,
    after_sync: bool,
) -> Result<PropResult> {
    let opts = ctx.change_opts(ctx.plan.k, quiet, ctx.plan.final_wait);
    say(format!(
        "propagation: {} changes, quiet period {}",
        opts.count,
        humantime::format_duration(quiet)
    ));
    let delta_at_start = ctx.registry.delta_instances().await;
    let before = connector.metrics().await?;
    let gap = synced.synced_at.elapsed().as_secs_f64();
    let run = changes::run(
        &ctx.registry,
        &synced.slices,
        &mut synced.services,
        &opts,
        &mut ctx.rng,
        connector.started,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = connector.metrics().await?;
    let mut result = PropResult::new(
        quiet.as_millis() as u64,
        ctx.registry.read_delay().as_millis() as u64,
        synced.services.len(),
        &run,
        &before,
        &after,
    );
    result.delta_instances_at_start = delta_at_start;
    result.first_change_after_sync_s = after_sync.then_some(gap);
    say(prop_line(&result));
    Ok(result)
}
