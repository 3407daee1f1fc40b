//! Workload 5: the steady state. The quiet-100ms connector, once every change made so
//! far has landed (a pending one would write during the window), is left alone for the
//! window: writes, registry requests, CPU and memory.

use std::time::{Duration, Instant};

use anyhow::Result;

use super::initial::Synced;
use super::{idle, Ctx};
use crate::connector::Connector;
use crate::host::NetCounters;
use crate::metrics::{apiserver_requests, delta};
use crate::results::{PendingWait, Requests, Results, SteadyResult};
use crate::say;

/// Measures the window on `b`, then stops it.
pub async fn run(
    ctx: &Ctx,
    results: &mut Results,
    synced: &Synced,
    mut b: Connector,
) -> Result<()> {
    let slices = &synced.slices;
    let pending = slices.open();
    let tw = Instant::now();
    if pending > 0 {
        say(format!(
            "waiting for {pending} changes still pending before the steady state"
        ));
        slices
            .wait_until(Instant::now() + ctx.plan.settle_max, |t| t.open() == 0)
            .await;
    }
    results.pending_before_steady = PendingWait {
        pending,
        waited_s: tw.elapsed().as_secs_f64(),
        still_pending: slices.open(),
    };
    if pending > 0 {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    say(format!(
        "steady state: {} s without changes",
        ctx.plan.steady.as_secs()
    ));
    let m0 = b.metrics().await?;
    let s0 = b.stats()?;
    let net0 = NetCounters::read();
    let api0 = apiserver_requests(&ctx.client).await;
    let ts = Instant::now();
    idle(&mut b, ctx.plan.steady).await?;
    let m1 = b.metrics().await?;
    let s1 = b.stats()?;
    let window_s = ts.elapsed().as_secs_f64();
    let minutes = window_s / 60.0;
    results.apiserver_requests_steady = delta(&api0, &apiserver_requests(&ctx.client).await);
    let requests = Requests::between(&m0, &m1);
    results.steady = SteadyResult {
        n: synced.services.len(),
        window_s: minutes * 60.0,
        writes: m1.writes_all() - m0.writes_all(),
        requests_per_min: requests.total / minutes,
        requests,
        net: NetCounters::read().since(&net0),
        reconciles: m1.reconciles() - m0.reconciles(),
        cpu_s: s1.cpu_seconds - s0.cpu_seconds,
        cpu_s_total: s1.cpu_seconds,
        rss_mib: s1.rss_mib,
        peak_rss_mib: s1.peak_rss_mib,
        managed_services: m1.managed_services(),
        cpu_pct: (s1.cpu_seconds - s0.cpu_seconds) / window_s * 100.0,
        connections: b.connections(),
        connections_peak: b.connections_peak(),
    };
    say(format!(
        "steady state: {} writes, {:.1} {} requests/min, {:.2} CPU s, peak RSS {:.1} MiB, {} connections (peak {})",
        results.steady.writes,
        results.steady.requests_per_min,
        ctx.registry.name(),
        results.steady.cpu_s,
        results.steady.peak_rss_mib,
        results.steady.connections,
        results.steady.connections_peak
    ));
    b.stop().await?;
    Ok(())
}
