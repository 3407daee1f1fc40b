//! Results: the JSON document and the Markdown table printed on stdout.

use serde::Serialize;

use crate::changes::{self, ChangeRun};
use crate::connector::{Metrics, NetCounters};

#[derive(Debug, Default, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub mem_total_mib: u64,
    pub kernel: String,
    pub load_avg_at_start: String,
}

impl Machine {
    fn read() -> Machine {
        let mem = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .unwrap_or(0);
        Machine {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            mem_total_mib: mem / 1024,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            load_avg_at_start: std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Params {
    pub n: usize,
    pub m: usize,
    pub k: usize,
    pub k_cost: usize,
    pub cost_ns: Vec<usize>,
    pub steady_s: f64,
    pub concurrency: usize,
    pub seed: u64,
    pub change_gap_ms: [u64; 2],
    pub land_wait_slack_ms: u64,
    pub final_wait_s: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct FloorResult {
    pub services_and_slices_s: f64,
    pub endpoints_s: f64,
    pub all_s: f64,
    pub writes: usize,
    pub writes_per_s: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct SyncResult {
    pub registry_load_s: f64,
    pub slices_in_place_s: f64,
    pub complete_s: f64,
    pub ready_s: f64,
    pub writes: f64,
    pub writes_failed: f64,
    /// Service, EndpointSlice, Endpoints.
    pub writes_by_kind: [f64; 3],
    pub consul_requests: f64,
    pub consul_errors: f64,
    pub cpu_s: f64,
    pub peak_rss_mib: f64,
    /// complete / floor (Services + slices + Endpoints): the same objects.
    pub ratio_to_floor: f64,
    /// slices in place / floor (Services + slices only), the literal floor.
    pub ratio_slices_to_floor_svc_slices: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct RestartResult {
    pub ready_s: f64,
    pub writes: f64,
    pub consul_requests: f64,
}

#[derive(Debug, Serialize)]
pub struct PropResult {
    pub quiet_ms: u64,
    pub n: usize,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub target_ms: f64,
    pub writes_per_landed_change: f64,
    pub consul_requests_per_change: f64,
    pub run: ChangeRun,
}

impl PropResult {
    pub fn new(
        quiet_ms: u64,
        n: usize,
        run: &ChangeRun,
        before: &Metrics,
        after: &Metrics,
    ) -> Self {
        let landed = run.landed.max(1) as f64;
        PropResult {
            quiet_ms,
            n,
            p50_ms: changes::percentile(run, 50.0),
            p90_ms: changes::percentile(run, 90.0),
            p99_ms: changes::percentile(run, 99.0),
            max_ms: changes::max(run),
            target_ms: quiet_ms as f64 + 250.0,
            writes_per_landed_change: (after.writes_all() - before.writes_all()) / landed,
            consul_requests_per_change: (after.consul_requests() - before.consul_requests())
                / landed,
            run: run.clone(),
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct SteadyResult {
    pub n: usize,
    pub window_s: f64,
    pub writes: f64,
    pub consul_requests: f64,
    pub consul_requests_per_min: f64,
    pub consul_errors: f64,
    pub net: NetCounters,
    pub reconciles: f64,
    pub cpu_s: f64,
    pub cpu_s_total: f64,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
    pub managed_services: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct CostResult {
    pub n: usize,
    pub quiet_ms: u64,
    pub initial_sync_s: f64,
    pub changes: usize,
    pub landed: usize,
    pub writes: f64,
    pub writes_per_change: f64,
    /// Service, EndpointSlice, Endpoints.
    pub writes_by_kind_per_change: [f64; 3],
    pub consul_requests: f64,
    /// Raw request deltas over the change phase, by endpoint label.
    pub consul_by_endpoint: std::collections::BTreeMap<String, f64>,
    pub consul_per_change_raw: f64,
    pub consul_idle_per_s: f64,
    pub consul_per_change_net: f64,
    pub reconciles_per_change: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub change_phase_s: f64,
    /// CPU seconds and peak RSS of the whole connector process (start to stop).
    pub cpu_s: f64,
    pub peak_rss_mib: f64,
    pub consul_errors: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct PendingWait {
    pub pending: usize,
    pub waited_s: f64,
    pub still_pending: usize,
}

/// Connections the Consul agent kept for a stopped connector (see `touch_all`).
#[derive(Debug, Serialize)]
pub struct ConnRelease {
    pub when: String,
    pub held_after_stop: usize,
    pub left_after_release: usize,
    pub release_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Target {
    pub target: String,
    pub measured: String,
    pub met: Option<bool>,
}

#[derive(Debug, Default, Serialize)]
pub struct Results {
    pub profile: String,
    pub started_utc: String,
    pub command: String,
    /// `git describe --always --dirty` of the tree the connector was built from.
    pub git: String,
    pub machine: Machine,
    pub params: Params,
    pub connector_flags: String,
    pub connector_command: String,
    pub consul_endpoint_labels: Vec<String>,
    pub floor: FloorResult,
    pub initial_sync: SyncResult,
    pub restart: RestartResult,
    pub propagation: Vec<PropResult>,
    pub steady: SteadyResult,
    pub cost: Vec<CostResult>,
    pub targets: Vec<Target>,
    pub consul_connections_after_stop: Vec<ConnRelease>,
    pub net_during_initial_sync: NetCounters,
    /// apiserver_request_total deltas ("VERB resource"), whoever made the requests
    /// (the harness's watches and the controller-manager included).
    pub apiserver_requests_floor: std::collections::BTreeMap<String, f64>,
    pub apiserver_requests_initial_sync: std::collections::BTreeMap<String, f64>,
    pub apiserver_requests_steady: std::collections::BTreeMap<String, f64>,
    pub pending_before_steady: PendingWait,
    pub total_s: f64,
}

fn ms(v: Option<f64>, run: &ChangeRun) -> String {
    match v {
        Some(v) => format!("{v:.0}"),
        None => format!("> {:.0} s (not landed)", run.final_wait_s),
    }
}

fn ms_opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0}"))
        .unwrap_or_else(|| "not landed".into())
}

pub fn prop_line(p: &PropResult) -> String {
    format!(
        "propagation quiet {} ms: p50 {} p90 {} p99 {} max {} ms; {}/{} landed",
        p.quiet_ms,
        ms(p.p50_ms, &p.run),
        ms(p.p90_ms, &p.run),
        ms(p.p99_ms, &p.run),
        ms(p.max_ms, &p.run),
        p.run.landed,
        p.run.changes
    )
}

impl Results {
    pub fn new(profile: &str, stamp: &str, command: &str) -> Results {
        Results {
            profile: profile.into(),
            started_utc: stamp.into(),
            command: command.into(),
            git: std::process::Command::new("git")
                .args(["describe", "--always", "--dirty"])
                .output()
                .ok()
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            machine: Machine::read(),
            ..Default::default()
        }
    }

    /// Compares the figures with the targets (reported, never asserted).
    pub fn evaluate(&mut self) {
        let mut t = Vec::new();
        let r = self.initial_sync.ratio_to_floor;
        t.push(Target {
            target: "initial sync <= 1.3 x floor".into(),
            measured: format!(
                "{r:.2} x ({:.1} s vs {:.1} s; slices only: {:.2} x)",
                self.initial_sync.complete_s,
                self.floor.all_s,
                self.initial_sync.ratio_slices_to_floor_svc_slices
            ),
            met: Some(r <= 1.3),
        });
        for p in &self.propagation {
            t.push(Target {
                target: format!(
                    "propagation p99 <= {} ms (quiet {} ms)",
                    p.target_ms, p.quiet_ms
                ),
                measured: format!("p99 {} ms at N={}", ms(p.p99_ms, &p.run), p.n),
                met: Some(p.p99_ms.is_some_and(|v| v <= p.target_ms)),
            });
        }
        if !self.cost.is_empty() {
            let worst = self
                .cost
                .iter()
                .map(|c| c.writes_per_change)
                .fold(0.0, f64::max);
            t.push(Target {
                target: "<= 2 Kubernetes writes per change".into(),
                measured: self
                    .cost
                    .iter()
                    .map(|c| format!("N={}: {:.2}", c.n, c.writes_per_change))
                    .collect::<Vec<_>>()
                    .join(", "),
                met: Some(worst <= 2.0),
            });
            let first = self
                .cost
                .first()
                .map(|c| c.consul_per_change_net)
                .unwrap_or(0.0);
            let last = self
                .cost
                .last()
                .map(|c| c.consul_per_change_net)
                .unwrap_or(0.0);
            t.push(Target {
                target: "O(1) Consul requests per change".into(),
                measured: self
                    .cost
                    .iter()
                    .map(|c| {
                        format!(
                            "N={}: {:.2} raw, {:.2} net of background",
                            c.n, c.consul_per_change_raw, c.consul_per_change_net
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
                met: Some(last <= first.max(1.0) * 1.5 + 0.5),
            });
        }
        t.push(Target {
            target: "0 writes at rest".into(),
            measured: format!(
                "{} writes in {:.0} s at N={}",
                self.steady.writes, self.steady.window_s, self.steady.n
            ),
            met: Some(self.steady.writes == 0.0),
        });
        let at = self.steady.n;
        t.push(Target {
            target: "peak RSS <= 64 MiB at 10,000 services".into(),
            measured: format!("{:.1} MiB at N={at}", self.steady.peak_rss_mib),
            met: (at >= 10_000).then_some(self.steady.peak_rss_mib <= 64.0),
        });
        self.targets = t;
    }
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "n/a at this N",
    }
}

/// The Markdown report.
pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let p = &r.params;
    s.push_str(&format!(
        "### `{}` profile, {} (N = {}, M = {}, K = {}, steady state {:.0} s{})\n\n",
        r.profile,
        r.started_utc,
        p.n,
        p.m,
        p.k,
        p.steady_s,
        if p.steady_s < 300.0 {
            ", shortened from 5 min"
        } else {
            ""
        }
    ));
    s.push_str(&format!(
        "Tree: `{}`. Machine: {} cores, {} MiB, kernel {}, load average at start {}. Connector flags: `{}`; floor client concurrency {}.\n\n",
        r.git, r.machine.nproc, r.machine.mem_total_mib, r.machine.kernel, r.machine.load_avg_at_start,
        r.connector_flags, p.concurrency
    ));
    s.push_str("| workload | figure | value |\n|---|---|---|\n");
    let f = &r.floor;
    let row = |s: &mut String, w: &str, k: &str, v: String| {
        s.push_str(&format!("| {w} | {k} | {v} |\n"));
    };
    row(
        &mut s,
        "1 floor",
        "N Services + N EndpointSlices",
        format!("{:.2} s", f.services_and_slices_s),
    );
    row(
        &mut s,
        "1 floor",
        "+ N Endpoints (connector's object set)",
        format!("{:.2} s ({:.0} writes/s)", f.all_s, f.writes_per_s),
    );
    let i = &r.initial_sync;
    row(
        &mut s,
        "2 initial sync",
        "Consul load (catalog register)",
        format!("{:.2} s", i.registry_load_s),
    );
    row(
        &mut s,
        "2 initial sync",
        "start → every EndpointSlice in place",
        format!(
            "{:.2} s ({:.2} × floor of Services + slices)",
            i.slices_in_place_s, i.ratio_slices_to_floor_svc_slices
        ),
    );
    row(
        &mut s,
        "2 initial sync",
        "start → every slice and Endpoints in place",
        format!(
            "{:.2} s (**{:.2} × floor**)",
            i.complete_s, i.ratio_to_floor
        ),
    );
    row(
        &mut s,
        "2 initial sync",
        "writes (Service / slice / Endpoints), failed",
        format!(
            "{:.0} ({:.0} / {:.0} / {:.0}), {:.0}",
            i.writes,
            i.writes_by_kind[0],
            i.writes_by_kind[1],
            i.writes_by_kind[2],
            i.writes_failed
        ),
    );
    row(
        &mut s,
        "2 initial sync",
        "Consul requests (failed), connector CPU, peak RSS",
        format!(
            "{:.0} ({:.0}), {:.2} s, {:.1} MiB",
            i.consul_requests, i.consul_errors, i.cpu_s, i.peak_rss_mib
        ),
    );
    row(
        &mut s,
        "2 initial sync",
        "loopback backlog drops, TCP timeouts (whole machine)",
        format!(
            "{}, {}",
            r.net_during_initial_sync.backlog_drops, r.net_during_initial_sync.tcp_timeouts
        ),
    );
    row(
        &mut s,
        "2 restart",
        "restart on the synced namespace: ready, writes",
        format!("{:.2} s, {:.0} writes", r.restart.ready_s, r.restart.writes),
    );
    for pr in &r.propagation {
        row(
            &mut s,
            "3 propagation",
            &format!(
                "quiet {} ms, N={}: p50 / p90 / p99 / max (ms)",
                pr.quiet_ms, pr.n
            ),
            format!(
                "{} / {} / {} / {} ({}/{} landed)",
                ms(pr.p50_ms, &pr.run),
                ms(pr.p90_ms, &pr.run),
                ms(pr.p99_ms, &pr.run),
                ms(pr.max_ms, &pr.run),
                pr.run.landed,
                pr.run.changes
            ),
        );
        row(
            &mut s,
            "3 propagation",
            &format!(
                "quiet {} ms: writes, Consul requests per change",
                pr.quiet_ms
            ),
            format!(
                "{:.2}, {:.2}",
                pr.writes_per_landed_change, pr.consul_requests_per_change
            ),
        );
    }
    for c in &r.cost {
        row(
            &mut s,
            "4 cost per change",
            &format!("N={}: writes per change (Service / slice / Endpoints)", c.n),
            format!(
                "{:.2} ({:.2} / {:.2} / {:.2}), {}/{} landed",
                c.writes_per_change,
                c.writes_by_kind_per_change[0],
                c.writes_by_kind_per_change[1],
                c.writes_by_kind_per_change[2],
                c.landed,
                c.changes
            ),
        );
        row(
            &mut s,
            "4 cost per change",
            &format!(
                "N={}: Consul requests per change, raw / net of idle background",
                c.n
            ),
            format!(
                "{:.2} / {:.2} (idle {:.2}/s)",
                c.consul_per_change_raw, c.consul_per_change_net, c.consul_idle_per_s
            ),
        );
        row(
            &mut s,
            "4 cost per change",
            &format!(
                "N={}: latency p50 / p99 / max (ms), quiet {} ms",
                c.n, c.quiet_ms
            ),
            format!(
                "{} / {} / {}",
                ms_opt(c.p50_ms),
                ms_opt(c.p99_ms),
                ms_opt(c.max_ms)
            ),
        );
        row(
            &mut s,
            "4 cost per change",
            &format!("N={}: initial sync, connector CPU, peak RSS", c.n),
            format!(
                "{:.2} s, {:.2} s, {:.1} MiB",
                c.initial_sync_s, c.cpu_s, c.peak_rss_mib
            ),
        );
    }
    let st = &r.steady;
    let pw = &r.pending_before_steady;
    if pw.pending > 0 {
        row(
            &mut s,
            "5 steady state",
            "changes still pending before the window: waited",
            format!(
                "{} pending, {:.0} s, {} left",
                pw.pending, pw.waited_s, pw.still_pending
            ),
        );
    }
    row(
        &mut s,
        "5 steady state",
        &format!("N={}, {:.0} s: Kubernetes writes", st.n, st.window_s),
        format!("{:.0}", st.writes),
    );
    row(
        &mut s,
        "5 steady state",
        "Consul requests per minute (failed in the window)",
        format!(
            "{:.1} ({:.0})",
            st.consul_requests_per_min, st.consul_errors
        ),
    );
    row(
        &mut s,
        "5 steady state",
        "CPU seconds in the window (per minute)",
        format!("{:.2} ({:.3})", st.cpu_s, st.cpu_s / (st.window_s / 60.0)),
    );
    row(
        &mut s,
        "5 steady state",
        "RSS now / peak (VmHWM)",
        format!("{:.1} / {:.1} MiB", st.rss_mib, st.peak_rss_mib),
    );
    let top = |m: &std::collections::BTreeMap<String, f64>| {
        let mut v: Vec<(&String, &f64)> = m.iter().filter(|(_, d)| **d >= 10.0).collect();
        v.sort_by(|a, b| b.1.total_cmp(a.1));
        v.iter()
            .take(8)
            .map(|(k, d)| format!("{k} {d:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    row(
        &mut s,
        "apiserver",
        "requests during the floor (top, >= 10)",
        top(&r.apiserver_requests_floor),
    );
    row(
        &mut s,
        "apiserver",
        "requests during the initial sync (top, >= 10)",
        top(&r.apiserver_requests_initial_sync),
    );
    row(
        &mut s,
        "apiserver",
        "requests during the steady state (top, >= 10)",
        top(&r.apiserver_requests_steady),
    );
    s.push_str("\n| target | measured | verdict |\n|---|---|---|\n");
    for t in &r.targets {
        s.push_str(&format!(
            "| {} | {} | {} |\n",
            t.target,
            t.measured,
            verdict(t.met)
        ));
    }
    s.push_str(&format!("\nTotal harness time: {:.0} s.\n", r.total_s));
    s
}
