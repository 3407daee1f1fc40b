//! Benchmark harness of registry-connector: runs the release binary as a separate
//! process against the real test environment (kube-apiserver, etcd,
//! kube-controller-manager, Consul) and reports initial sync against the apiserver's
//! own write floor, change propagation, cost per change and steady state.
//!
//! `scripts/bench quick|full` starts the environment, builds, runs this and stops the
//! environment; see docs/benchmarks.md for the method.
#![forbid(unsafe_code)]

mod changes;
mod connector;
mod consul;
mod floor;
mod report;
mod tracker;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use rand::rngs::StdRng;
use rand::SeedableRng;

use changes::ChangeOpts;
use connector::{Connector, Launch};
use report::*;
use tracker::Tracker;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Profile {
    /// N = 200, M = 3, K = 50, steady state 60 s: a few minutes.
    Quick,
    /// N = 10,000, M = 3, K = 200, steady state 5 min.
    Full,
}

/// Benchmarks registry-connector against the real test environment.
#[derive(Debug, Parser)]
#[command(name = "bench", args_override_self = true)]
struct Args {
    /// Workload sizes and durations.
    #[arg(value_enum)]
    profile: Profile,
    /// Admin kubeconfig of the environment.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Consul HTTP address (127.0.0.1:PORT).
    #[arg(long, env = "CONSUL_HTTP_ADDR")]
    consul_http_addr: String,
    /// The connector binary (default: target/release/registry-connector of this repo).
    #[arg(long)]
    connector_bin: Option<PathBuf>,
    /// JSON results file (default: target/bench/results-<profile>-<timestamp>.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Services (overrides the profile).
    #[arg(long)]
    n: Option<usize>,
    /// Instances per service.
    #[arg(long)]
    m: Option<usize>,
    /// Changes per propagation run.
    #[arg(long)]
    k: Option<usize>,
    /// Changes per cost-per-change run.
    #[arg(long)]
    k_cost: Option<usize>,
    /// Steady-state window (e.g. 60s, 5m).
    #[arg(long, value_parser = humantime::parse_duration)]
    steady: Option<Duration>,
    /// Client-side concurrency of the floor, and the connector's --concurrency.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Registry writes in flight while loading Consul (no connector running then).
    #[arg(long, default_value_t = 32)]
    consul_concurrency: usize,
    /// The connector's --consul-max-connections: above the number of services, so that
    /// every service keeps its own long poll (the default, 180, makes services beyond
    /// it take turns); the test environment's Consul allows 12,000 per client.
    #[arg(long, default_value_t = 11_000)]
    consul_max_connections: usize,
    /// The connector's --log-level.
    #[arg(long, default_value = "info")]
    connector_log_level: String,
    /// Seed of the random choices (service, kind of change, intervals).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Skip the cost-per-change runs (N = 100 and 1,000).
    #[arg(long)]
    no_cost: bool,
    /// Leave namespaces and Consul entries in place at the end.
    #[arg(long)]
    keep: bool,
    /// The command line to record in the results (scripts/bench passes its own).
    #[arg(long, default_value = "")]
    command: String,
}

struct Plan {
    n: usize,
    m: usize,
    k: usize,
    k_cost: usize,
    steady: Duration,
    cost_ns: Vec<usize>,
    /// Per-change wait before moving on, on top of the quiet period.
    land_slack: Duration,
    final_wait: Duration,
    cost_final_wait: Duration,
    cost_idle_cap: Duration,
    /// Longest wait for pending changes before the steady-state window.
    settle_max: Duration,
}

fn plan(args: &Args) -> Plan {
    let (n, m, k, k_cost, steady, final_wait, cost_final_wait, cost_idle_cap) = match args.profile {
        Profile::Quick => (
            200,
            3,
            50,
            20,
            Duration::from_secs(60),
            Duration::from_secs(20),
            Duration::from_secs(20),
            Duration::from_secs(10),
        ),
        Profile::Full => (
            10_000,
            3,
            200,
            50,
            Duration::from_secs(300),
            Duration::from_secs(120),
            Duration::from_secs(120),
            Duration::from_secs(60),
        ),
    };
    Plan {
        n: args.n.unwrap_or(n),
        m: args.m.unwrap_or(m),
        k: args.k.unwrap_or(k),
        k_cost: args.k_cost.unwrap_or(k_cost),
        steady: args.steady.unwrap_or(steady),
        cost_ns: if args.no_cost {
            vec![]
        } else {
            vec![100, 1000]
        },
        land_slack: Duration::from_millis(1500),
        final_wait,
        cost_final_wait,
        cost_idle_cap,
        settle_max: match args.profile {
            Profile::Quick => Duration::from_secs(30),
            Profile::Full => Duration::from_secs(360),
        },
    }
}

fn say(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

fn utc_stamp(fmt: &str) -> String {
    std::process::Command::new("date")
        .args(["-u", fmt])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn short_id() -> String {
    use rand::Rng;
    format!("{:06x}", rand::rng().random::<u32>() & 0xff_ffff)
}

/// Connector flags tuned for throughput (the floor uses the same client concurrency).
fn throughput_flags(args: &Args) -> Vec<String> {
    vec![
        "--kube-write-qps".into(),
        "10000".into(),
        "--kube-write-burst".into(),
        "10000".into(),
        "--concurrency".into(),
        args.concurrency.to_string(),
        "--consul-max-connections".into(),
        args.consul_max_connections.to_string(),
        "--log-level".into(),
        args.connector_log_level.clone(),
    ]
}

struct Ctx {
    args: Args,
    plan: Plan,
    client: kube::Client,
    registry: consul::Registry,
    bin: PathBuf,
    run_id: String,
    log_dir: PathBuf,
    rng: StdRng,
    namespaces: Vec<String>,
}

impl Ctx {
    fn launch(&self, ns: &str, tag: &str, quiet: Duration, log: &str) -> Launch {
        Launch {
            bin: self.bin.clone(),
            kubeconfig: self.args.kubeconfig.clone(),
            consul_addr: self.args.consul_http_addr.clone(),
            namespace: ns.into(),
            filter_tag: tag.into(),
            quiet_period: quiet,
            extra: throughput_flags(&self.args),
            log: self.log_dir.join(log),
        }
    }

    async fn namespace(&mut self, what: &str) -> Result<String> {
        let ns = format!("bench-{what}-{}", self.run_id);
        floor::create_namespace(&self.client, &ns).await?;
        self.namespaces.push(ns.clone());
        Ok(ns)
    }

    fn change_opts(&self, count: usize, quiet: Duration, final_wait: Duration) -> ChangeOpts {
        ChangeOpts {
            count,
            min_gap: Duration::from_millis(50),
            max_gap: Duration::from_millis(300),
            land_wait: quiet + self.plan.land_slack,
            final_wait,
        }
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

/// After a connector stopped: counts the connections Consul still holds for it, ends
/// its abandoned blocking queries with `release` (moving their indexes), and waits until
/// the agent has let go of them, so that the next connector is not refused by the
/// per-client connection limit.
async fn release_consul<F, Fut>(
    ctx: &Ctx,
    results: &mut Results,
    when: &str,
    release: F,
) -> Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = ctx.registry.open_connections();
    let t = Instant::now();
    release().await?;
    let left = ctx
        .registry
        .wait_connections_below(4, Duration::from_secs(60))
        .await;
    say(format!(
        "Consul still held {held} connections {when}; {left} after releasing them ({:.1} s)",
        t.elapsed().as_secs_f64()
    ));
    results.consul_connections_after_stop.push(ConnRelease {
        when: when.to_string(),
        held_after_stop: held,
        left_after_release: left,
        release_s: t.elapsed().as_secs_f64(),
    });
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let plan = plan(&args);
    let root = testenv::repo_root();
    let bin = args
        .connector_bin
        .clone()
        .unwrap_or_else(|| root.join("target/release/registry-connector"));
    if !bin.exists() {
        bail!(
            "{} not found: cargo build --release -p registry-connector",
            bin.display()
        );
    }
    let stamp = utc_stamp("+%Y%m%dT%H%M%SZ");
    let profile = format!("{:?}", args.profile).to_lowercase();
    let out = args.out.clone().unwrap_or_else(|| {
        root.join("target/bench")
            .join(format!("results-{profile}-{stamp}.json"))
    });
    let run_id = short_id();
    let log_dir = root
        .join("target/bench")
        .join(format!("logs-{profile}-{stamp}"));
    std::fs::create_dir_all(&log_dir).ok();
    let client = testenv::client_from(&args.kubeconfig).await?;
    let registry = consul::Registry::new(&args.consul_http_addr)?;
    let rng = StdRng::seed_from_u64(args.seed);
    let mut ctx = Ctx {
        args,
        plan,
        client,
        registry,
        bin,
        run_id,
        log_dir,
        rng,
        namespaces: Vec::new(),
    };
    let total = Instant::now();
    let result = run_all(&mut ctx, &profile, &stamp).await;
    if !ctx.args.keep {
        cleanup(&ctx).await;
    }
    let mut results = result?;
    results.total_s = total.elapsed().as_secs_f64();
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(&out, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("{}", report::markdown(&results));
    say(format!(
        "results in {} (connector logs in {}), {:.0} s in all",
        out.display(),
        ctx.log_dir.display(),
        results.total_s
    ));
    Ok(())
}

async fn cleanup(ctx: &Ctx) {
    use k8s_openapi::api::core::v1::Namespace;
    let api: kube::Api<Namespace> = kube::Api::all(ctx.client.clone());
    for ns in &ctx.namespaces {
        let _ = api.delete(ns, &kube::api::DeleteParams::background()).await;
    }
    if let Err(e) = ctx.registry.cleanup().await {
        say(format!("cleanup of the Consul entries failed: {e:#}"));
    }
}

async fn run_all(ctx: &mut Ctx, profile: &str, stamp: &str) -> Result<Results> {
    let p = &ctx.plan;
    let (n, m) = (p.n, p.m);
    let mut results = Results::new(profile, stamp, &ctx.args.command);
    results.params = Params {
        n,
        m,
        k: p.k,
        k_cost: p.k_cost,
        cost_ns: p.cost_ns.clone(),
        steady_s: p.steady.as_secs_f64(),
        concurrency: ctx.args.concurrency,
        seed: ctx.args.seed,
        change_gap_ms: [50, 300],
        land_wait_slack_ms: p.land_slack.as_millis() as u64,
        final_wait_s: p.final_wait.as_secs_f64(),
    };
    results.connector_flags = throughput_flags(&ctx.args).join(" ")
        + " --leader-elect=false (others default: legacy Endpoints on, --max-period 5s)";
    let run_id = ctx.run_id.clone();

    // 1. Floor.
    say(format!(
        "floor: {n} Services + {n} EndpointSlices (+ {n} Endpoints), concurrency {}",
        ctx.args.concurrency
    ));
    let floor_services = consul::make_services("f", "none", n, m);
    let ns = ctx.namespace("floor").await?;
    // The same watches as during the initial sync, so that the apiserver fans out the
    // same events in both measurements.
    let floor_watches = [
        Tracker::endpoint_slices(ctx.client.clone(), &ns),
        Tracker::endpoints(ctx.client.clone(), &ns),
    ];
    for w in &floor_watches {
        w.wait_synced(Duration::from_secs(30)).await?;
    }
    let api0 = connector::apiserver_requests(&ctx.client).await;
    let f = floor::run(&ctx.client, &ns, &floor_services, ctx.args.concurrency).await?;
    results.apiserver_requests_floor =
        connector::delta(&api0, &connector::apiserver_requests(&ctx.client).await);
    drop(floor_watches);
    results.floor = FloorResult {
        services_and_slices_s: f.services_and_slices.as_secs_f64(),
        endpoints_s: f.endpoints.as_secs_f64(),
        all_s: (f.services_and_slices + f.endpoints).as_secs_f64(),
        writes: f.writes,
        writes_per_s: f.writes as f64 / (f.services_and_slices + f.endpoints).as_secs_f64(),
    };
    say(format!(
        "floor: {:.2} s (Services + slices), {:.2} s with Endpoints",
        results.floor.services_and_slices_s, results.floor.all_s
    ));

    // 2. Initial sync.
    let tag = format!("bench-sync-{run_id}");
    let mut services = consul::make_services(&format!("s{run_id}"), &tag, n, m);
    say(format!(
        "registering {n} x {m} instances in Consul (catalog API)"
    ));
    let reg_time = ctx
        .registry
        .register_all(&services, ctx.args.consul_concurrency)
        .await?;
    let probe = ctx.registry.instance_count(&services[0].name).await?;
    if probe != m {
        bail!(
            "Consul reports {probe} instances of {}, expected {m}",
            services[0].name
        );
    }
    let ns = ctx.namespace("sync").await?;
    let slices = Tracker::endpoint_slices(ctx.client.clone(), &ns);
    let eps = Tracker::endpoints(ctx.client.clone(), &ns);
    slices.wait_synced(Duration::from_secs(30)).await?;
    eps.wait_synced(Duration::from_secs(30)).await?;
    for s in &services {
        slices.expect(&s.name, s.ready_addresses());
        eps.expect(&s.name, s.ready_addresses());
    }
    let launch_a = ctx.launch(
        &ns,
        &tag,
        Duration::from_secs(1),
        "connector-sync-quiet1s.log",
    );
    say("initial sync: starting the connector");
    let net0 = connector::NetCounters::read();
    let api0 = connector::apiserver_requests(&ctx.client).await;
    let mut a = Connector::start(&launch_a).await?;
    let t0 = a.started;
    let slices_s = wait_all(&slices, t0, sync_timeout(n), "initial sync (slices)").await?;
    let complete_s = wait_all(&eps, t0, sync_timeout(n), "initial sync (Endpoints)").await?;
    let ready_s = a.wait_ready(sync_timeout(n)).await?.as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ma = a.metrics().await?;
    let sa = a.stats()?;
    results.net_during_initial_sync = connector::NetCounters::read().since(&net0);
    results.apiserver_requests_initial_sync =
        connector::delta(&api0, &connector::apiserver_requests(&ctx.client).await);
    results.connector_command = format!("{} {}", ctx.bin.display(), a.args.join(" "));
    results.initial_sync = SyncResult {
        registry_load_s: reg_time.as_secs_f64(),
        slices_in_place_s: slices_s,
        complete_s: complete_s.max(slices_s),
        ready_s,
        writes: ma.writes(),
        writes_failed: ma.writes_all() - ma.writes(),
        writes_by_kind: [
            ma.writes_of("service"),
            ma.writes_of("endpointslice"),
            ma.writes_of("endpoints"),
        ],
        consul_requests: ma.consul_requests(),
        consul_errors: ma.consul_errors(),
        cpu_s: sa.cpu_seconds,
        peak_rss_mib: sa.peak_rss_mib,
        ratio_to_floor: complete_s.max(slices_s) / results.floor.all_s,
        ratio_slices_to_floor_svc_slices: slices_s / results.floor.services_and_slices_s,
    };
    say(format!(
        "initial sync: slices in place after {slices_s:.2} s, complete after {:.2} s, {} writes",
        results.initial_sync.complete_s, results.initial_sync.writes
    ));
    results.consul_endpoint_labels = ma.consul_endpoints();

    // 3. Propagation, quiet 1s (connector A), then 100ms (connector B, same namespace).
    let mut prop = Vec::new();
    prop.push(propagation(ctx, &a, &slices, &mut services, Duration::from_secs(1), n).await?);
    a.stop().await?;
    release_consul(
        ctx,
        &mut results,
        "after stopping the quiet-1s connector",
        || async {
            ctx.registry
                .touch_all(&services, ctx.args.consul_concurrency)
                .await
        },
    )
    .await?;

    let launch_b = ctx.launch(
        &ns,
        &tag,
        Duration::from_millis(100),
        "connector-quiet100ms.log",
    );
    let mut b = Connector::start(&launch_b).await?;
    let restart_ready = b.wait_ready(sync_timeout(n)).await?.as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mb = b.metrics().await?;
    results.restart = RestartResult {
        ready_s: restart_ready,
        writes: mb.writes(),
        consul_requests: mb.consul_requests(),
    };
    say(format!(
        "restart on a synced namespace: ready after {restart_ready:.2} s, {} writes",
        mb.writes()
    ));
    prop.push(
        propagation(
            ctx,
            &b,
            &slices,
            &mut services,
            Duration::from_millis(100),
            n,
        )
        .await?,
    );
    results.propagation = prop;

    // 5. Steady state on connector B, once every change made so far has landed (a
    // change still pending would write during the window).
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
    let net0 = connector::NetCounters::read();
    let api0 = connector::apiserver_requests(&ctx.client).await;
    let ts = Instant::now();
    idle(&mut b, ctx.plan.steady).await?;
    let m1 = b.metrics().await?;
    let s1 = b.stats()?;
    let minutes = ts.elapsed().as_secs_f64() / 60.0;
    results.apiserver_requests_steady =
        connector::delta(&api0, &connector::apiserver_requests(&ctx.client).await);
    results.steady = SteadyResult {
        n,
        window_s: minutes * 60.0,
        writes: m1.writes_all() - m0.writes_all(),
        consul_requests: m1.consul_requests() - m0.consul_requests(),
        consul_requests_per_min: (m1.consul_requests() - m0.consul_requests()) / minutes,
        consul_errors: m1.consul_errors() - m0.consul_errors(),
        net: connector::NetCounters::read().since(&net0),
        reconciles: m1.reconciles() - m0.reconciles(),
        cpu_s: s1.cpu_seconds - s0.cpu_seconds,
        cpu_s_total: s1.cpu_seconds,
        rss_mib: s1.rss_mib,
        peak_rss_mib: s1.peak_rss_mib,
        managed_services: m1.managed_services(),
    };
    say(format!(
        "steady state: {} writes, {:.1} Consul requests/min, {:.2} CPU s, peak RSS {:.1} MiB",
        results.steady.writes,
        results.steady.consul_requests_per_min,
        results.steady.cpu_s,
        results.steady.peak_rss_mib
    ));
    b.stop().await?;
    drop(slices);
    drop(eps);
    let nodes = services[0].nodes.clone();
    release_consul(
        ctx,
        &mut results,
        "after stopping the quiet-100ms connector",
        || async { ctx.registry.remove_dataset(&nodes).await },
    )
    .await?;

    // 4. Cost per change at fixed sizes.
    for cn in ctx.plan.cost_ns.clone() {
        let r = cost_run(ctx, cn, &mut results).await?;
        say(format!(
            "cost at N={cn}: {:.2} writes/change, {:.2} Consul requests/change (net {:.2}), {}/{} landed",
            r.writes_per_change, r.consul_per_change_raw, r.consul_per_change_net, r.landed, r.changes
        ));
        results.cost.push(r);
    }
    results.evaluate();
    Ok(results)
}

/// One propagation run against `connector` (started with `quiet` as its quiet period):
/// K changes, then the connector's counters before and after.
async fn propagation(
    ctx: &mut Ctx,
    connector: &Connector,
    slices: &Tracker,
    services: &mut [consul::Service],
    quiet: Duration,
    n: usize,
) -> Result<PropResult> {
    let opts = ctx.change_opts(ctx.plan.k, quiet, ctx.plan.final_wait);
    say(format!(
        "propagation: {} changes, quiet period {}",
        opts.count,
        humantime::format_duration(quiet)
    ));
    let before = connector.metrics().await?;
    let run = changes::run(
        &ctx.registry,
        slices,
        services,
        &opts,
        &mut ctx.rng,
        connector.started,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = connector.metrics().await?;
    let result = PropResult::new(quiet.as_millis() as u64, n, &run, &before, &after);
    say(prop_line(&result));
    Ok(result)
}

async fn cost_run(ctx: &mut Ctx, cn: usize, results: &mut Results) -> Result<CostResult> {
    let m = ctx.plan.m;
    let quiet = Duration::from_millis(100);
    let tag = format!("bench-cost{cn}-{}", ctx.run_id);
    let mut services = consul::make_services(&format!("c{cn}x{}", ctx.run_id), &tag, cn, m);
    say(format!("cost at N={cn}: registering {cn} x {m} instances"));
    ctx.registry
        .register_all(&services, ctx.args.consul_concurrency)
        .await?;
    let ns = ctx.namespace(&format!("cost{cn}")).await?;
    let slices = Tracker::endpoint_slices(ctx.client.clone(), &ns);
    slices.wait_synced(Duration::from_secs(30)).await?;
    for s in &services {
        slices.expect(&s.name, s.ready_addresses());
    }
    let launch = ctx.launch(&ns, &tag, quiet, &format!("connector-cost{cn}.log"));
    let mut c = Connector::start(&launch).await?;
    let t0 = c.started;
    let sync_s = wait_all(&slices, t0, sync_timeout(cn), "cost run initial sync").await?;
    c.wait_ready(sync_timeout(cn)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m0 = c.metrics().await?;
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
    let change_phase = run.elapsed_s + 2.1;
    // The same connector idle for a while: the background that the deltas include.
    let idle_len = Duration::from_secs_f64(change_phase).min(ctx.plan.cost_idle_cap);
    idle(&mut c, idle_len).await?;
    let m2 = c.metrics().await?;
    let stats = c.stop().await?;
    let nodes = services[0].nodes.clone();
    release_consul(
        ctx,
        results,
        &format!("after stopping the N={cn} connector"),
        || async { ctx.registry.remove_dataset(&nodes).await },
    )
    .await?;
    let landed = run.landed.max(1) as f64;
    let consul_raw = m1.consul_requests() - m0.consul_requests();
    let idle_rate = (m2.consul_requests() - m1.consul_requests()) / idle_len.as_secs_f64();
    let background = idle_rate * change_phase;
    Ok(CostResult {
        n: cn,
        quiet_ms: quiet.as_millis() as u64,
        initial_sync_s: sync_s,
        changes: run.changes,
        landed: run.landed,
        writes: m1.writes_all() - m0.writes_all(),
        writes_per_change: (m1.writes_all() - m0.writes_all()) / landed,
        writes_by_kind_per_change: [
            (m1.writes_of("service") - m0.writes_of("service")) / landed,
            (m1.writes_of("endpointslice") - m0.writes_of("endpointslice")) / landed,
            (m1.writes_of("endpoints") - m0.writes_of("endpoints")) / landed,
        ],
        consul_requests: consul_raw,
        consul_by_endpoint: m1
            .consul_endpoints()
            .into_iter()
            .map(|e| {
                let d = m1.consul_requests_to(&e) - m0.consul_requests_to(&e);
                (e, d)
            })
            .collect(),
        consul_per_change_raw: consul_raw / landed,
        consul_idle_per_s: idle_rate,
        consul_per_change_net: (consul_raw - background).max(0.0) / landed,
        reconciles_per_change: (m1.reconciles() - m0.reconciles()) / landed,
        p50_ms: changes::percentile(&run, 50.0),
        p99_ms: changes::percentile(&run, 99.0),
        max_ms: changes::max(&run),
        change_phase_s: change_phase,
        cpu_s: stats.cpu_seconds,
        peak_rss_mib: stats.peak_rss_mib,
        consul_errors: m1.consul_errors() - m0.consul_errors(),
    })
}
