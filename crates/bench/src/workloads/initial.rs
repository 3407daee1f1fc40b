//! Workloads 1 and 2: the apiserver's write floor, and the connector's initial sync of
//! N × M instances measured against it.

use std::time::{Duration, Instant};

use anyhow::Result;

use super::{sync_timeout, wait_all, Ctx};
use crate::connector::Connector;
use crate::host::NetCounters;
use crate::metrics::{apiserver_requests, delta};
use crate::model::{make_services, Service};
use crate::results::{FloorResult, Requests, Results, SyncResult};
use crate::tracker::Tracker;
use crate::{floor, say};

/// The synced data set the later workloads change and watch.
pub struct Synced {
    pub ns: String,
    pub set: String,
    pub services: Vec<Service>,
    /// Watches on the namespace's EndpointSlices and legacy Endpoints.
    pub slices: Tracker,
    pub eps: Tracker,
    /// When the harness saw the sync complete (every object in place and `/readyz`
    /// 200): propagation is timed from here, with nothing excluded.
    pub synced_at: Instant,
}

/// Workload 1: a plain kube client writes the connector's objects for N services.
pub async fn floor(ctx: &mut Ctx, results: &mut Results) -> Result<()> {
    let (n, m) = (ctx.plan.n, ctx.plan.m);
    say(format!(
        "floor: {n} Services + {n} EndpointSlices (+ {n} Endpoints), concurrency {}",
        ctx.concurrency
    ));
    let services = make_services("f", "none", n, m);
    let ns = ctx.namespace("floor").await?;
    // The same watches as during the initial sync, so that the apiserver fans out the
    // same events in both measurements.
    let watches = [
        Tracker::endpoint_slices(ctx.client.clone(), &ns),
        Tracker::endpoints(ctx.client.clone(), &ns),
    ];
    for w in &watches {
        w.wait_synced(Duration::from_secs(30)).await?;
    }
    let api0 = apiserver_requests(&ctx.client).await;
    let f = floor::run(&ctx.client, &ns, &services, ctx.concurrency).await?;
    results.apiserver_requests_floor = delta(&api0, &apiserver_requests(&ctx.client).await);
    drop(watches);
    let all = f.services_and_slices + f.endpoints;
    results.floor = FloorResult {
        services_and_slices_s: f.services_and_slices.as_secs_f64(),
        endpoints_s: f.endpoints.as_secs_f64(),
        all_s: all.as_secs_f64(),
        writes: f.writes,
        writes_per_s: f.writes as f64 / all.as_secs_f64(),
    };
    say(format!(
        "floor: {:.2} s (Services + slices), {:.2} s with Endpoints",
        results.floor.services_and_slices_s, results.floor.all_s
    ));
    Ok(())
}

/// Workload 2: N × M instances loaded into the registry, then connector A (`quiet`)
/// started; timed from spawning the process to the watch event that completes the last
/// service. Returns the data set and the running connector, right away: the figures
/// are read without a pause, so that the next workload starts at the end of the sync.
pub async fn initial_sync(
    ctx: &mut Ctx,
    results: &mut Results,
    quiet: Duration,
) -> Result<(Synced, Connector)> {
    let (n, m) = (ctx.plan.n, ctx.plan.m);
    let set = ctx.set("sync");
    let services = make_services(&format!("s{}", ctx.run_id), &set, n, m);
    say(format!(
        "registering {n} x {m} instances in {} ({})",
        ctx.registry.name(),
        ctx.registry.load_api()
    ));
    let load = ctx.load(&services).await?;
    say(format!("loaded in {:.2} s", load.as_secs_f64()));
    let ns = ctx.namespace("sync").await?;
    let slices = Tracker::endpoint_slices(ctx.client.clone(), &ns);
    let eps = Tracker::endpoints(ctx.client.clone(), &ns);
    slices.wait_synced(Duration::from_secs(30)).await?;
    eps.wait_synced(Duration::from_secs(30)).await?;
    for s in &services {
        slices.expect(&s.name, s.ready_addresses());
        eps.expect(&s.name, s.ready_addresses());
    }
    let log = format!(
        "connector-sync-quiet{}.log",
        humantime::format_duration(quiet)
    );
    let launch = ctx.launch(&ns, &set, quiet, &log);
    say("initial sync: starting the connector");
    let net0 = NetCounters::read();
    let api0 = apiserver_requests(&ctx.client).await;
    let mut a = Connector::start(&launch).await?;
    let t0 = a.started;
    let slices_s = wait_all(&slices, t0, sync_timeout(n), "initial sync (slices)").await?;
    let complete_s = wait_all(&eps, t0, sync_timeout(n), "initial sync (Endpoints)").await?;
    let ready_s = a.wait_ready(sync_timeout(n)).await?.as_secs_f64();
    let synced_at = Instant::now();
    let connections = a.connections();
    let ma = a.metrics().await?;
    let sa = a.stats()?;
    results.net_during_initial_sync = NetCounters::read().since(&net0);
    results.apiserver_requests_initial_sync = delta(&api0, &apiserver_requests(&ctx.client).await);
    results.connector_command = format!("{} {}", ctx.bin.display(), a.args.join(" "));
    let complete_s = complete_s.max(slices_s);
    results.initial_sync = SyncResult {
        registry_load_s: load.as_secs_f64(),
        slices_in_place_s: slices_s,
        complete_s,
        ready_s,
        writes: ma.writes(),
        writes_failed: ma.writes_all() - ma.writes(),
        failed_writes: ma.failed_writes(),
        writes_by_kind: [
            ma.writes_of("service"),
            ma.writes_of("endpointslice"),
            ma.writes_of("endpoints"),
        ],
        requests: Requests::since_start(&ma),
        cpu_s: sa.cpu_seconds,
        peak_rss_mib: sa.peak_rss_mib,
        connections,
        ratio_to_floor: complete_s / results.floor.all_s,
        ratio_slices_to_floor_svc_slices: slices_s / results.floor.services_and_slices_s,
    };
    say(format!(
        "initial sync: slices in place after {slices_s:.2} s, complete after {complete_s:.2} s, {} writes, {connections} connections to {}",
        results.initial_sync.writes,
        ctx.registry.name()
    ));
    let synced = Synced {
        ns,
        set,
        services,
        slices,
        eps,
        synced_at,
    };
    Ok((synced, a))
}
