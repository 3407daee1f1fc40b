//! The results document (written as JSON) and its comparison with the targets.
//! Registry-neutral: request figures are the connector's requests to whichever
//! registry it reads, with Eureka's whole-registry reads alongside.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::changes::{self, ChangeRun};
use crate::host::{Machine, NetCounters};
use crate::metrics::{delta, Metrics};
use crate::registry::consul::ConnRelease;
use crate::registry::Kind;

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
    /// Extra uniform gap in 0..this after each change (the read delay), ms.
    pub change_gap_jitter_ms: u64,
    pub land_wait_slack_ms: u64,
    pub final_wait_s: f64,
    /// How long a change may wait in the registry before a connector can see it (the
    /// Eureka poll interval; 0 for Consul), ms.
    pub read_delay_ms: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct FloorResult {
    pub services_and_slices_s: f64,
    pub endpoints_s: f64,
    pub all_s: f64,
    pub writes: usize,
    pub writes_per_s: f64,
}

/// The registry requests between two scrapes.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Requests {
    pub total: f64,
    pub failed: f64,
    pub by_endpoint: BTreeMap<String, f64>,
    /// Eureka's whole-registry reads by reason (empty for Consul, or when none).
    pub full_fetches: BTreeMap<String, f64>,
}

impl Requests {
    pub fn between(before: &Metrics, after: &Metrics) -> Requests {
        Requests {
            total: after.registry_requests() - before.registry_requests(),
            failed: after.registry_errors() - before.registry_errors(),
            by_endpoint: delta(
                &before.registry_requests_by_endpoint(),
                &after.registry_requests_by_endpoint(),
            ),
            full_fetches: delta(&before.full_fetches(), &after.full_fetches()),
        }
    }

    /// Since the connector started.
    pub fn since_start(m: &Metrics) -> Requests {
        Self::between(&Metrics::default(), m)
    }

    /// Full reads of the registry, all reasons.
    pub fn full_fetch_count(&self) -> f64 {
        // A fold from +0.0: `sum` of no floats is -0.0, which prints as "-0.00".
        self.full_fetches.values().fold(0.0, |a, b| a + b)
    }
}

#[derive(Debug, Default, Serialize)]
pub struct SyncResult {
    pub registry_load_s: f64,
    pub slices_in_place_s: f64,
    pub complete_s: f64,
    pub ready_s: f64,
    pub writes: f64,
    pub writes_failed: f64,
    /// The failed writes by `"<kind> <verb> <result>"`.
    pub failed_writes: BTreeMap<String, f64>,
    /// Service, EndpointSlice, Endpoints.
    pub writes_by_kind: [f64; 3],
    pub requests: Requests,
    pub cpu_s: f64,
    pub peak_rss_mib: f64,
    /// TCP connections the connector held to the registry when the sync was complete.
    pub connections: usize,
    /// complete / floor (Services + slices + Endpoints): the same objects.
    pub ratio_to_floor: f64,
    /// slices in place / floor (Services + slices only), the literal floor.
    pub ratio_slices_to_floor_svc_slices: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct RestartResult {
    pub ready_s: f64,
    pub writes: f64,
    pub requests: Requests,
}

#[derive(Debug, Serialize)]
pub struct PropResult {
    pub quiet_ms: u64,
    pub n: usize,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// quiet period + read delay (Eureka's poll interval) + 250 ms.
    pub target_ms: f64,
    pub writes_per_landed_change: f64,
    pub requests_per_change: f64,
    pub requests: Requests,
    /// Eureka: instances in the server's delta when the run started (see
    /// `Registry::delta_instances`).
    pub delta_instances_at_start: Option<usize>,
    /// From the end of the initial sync to the first change, for the run on the
    /// connector that did the sync (nothing is excluded as a warm-up).
    pub first_change_after_sync_s: Option<f64>,
    pub run: ChangeRun,
}

impl PropResult {
    pub fn new(
        quiet_ms: u64,
        read_delay_ms: u64,
        n: usize,
        run: &ChangeRun,
        before: &Metrics,
        after: &Metrics,
    ) -> Self {
        let landed = run.landed.max(1) as f64;
        let requests = Requests::between(before, after);
        PropResult {
            quiet_ms,
            n,
            p50_ms: changes::percentile(run, 50.0),
            p90_ms: changes::percentile(run, 90.0),
            p99_ms: changes::percentile(run, 99.0),
            max_ms: changes::max(run),
            target_ms: (quiet_ms + read_delay_ms) as f64 + 250.0,
            writes_per_landed_change: (after.writes_all() - before.writes_all()) / landed,
            requests_per_change: requests.total / landed,
            requests,
            delta_instances_at_start: None,
            first_change_after_sync_s: None,
            run: run.clone(),
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct SteadyResult {
    pub n: usize,
    pub window_s: f64,
    pub writes: f64,
    pub requests: Requests,
    pub requests_per_min: f64,
    pub net: NetCounters,
    pub reconciles: f64,
    pub cpu_s: f64,
    pub cpu_s_total: f64,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
    pub managed_services: f64,
    /// CPU in the window as % of one core.
    pub cpu_pct: f64,
    /// TCP connections to the registry at the end of the window, and the most seen
    /// over the connector's life.
    pub connections: usize,
    pub connections_peak: usize,
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
    /// Raw request deltas over the change phase.
    pub requests: Requests,
    pub requests_per_change_raw: f64,
    pub requests_idle_per_s: f64,
    pub requests_per_change_net: f64,
    /// Eureka's whole-registry reads during the change phase, per landed change.
    pub full_fetches_per_change: f64,
    pub reconciles_per_change: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub change_phase_s: f64,
    /// CPU seconds and peak RSS of the whole connector process (start to stop).
    pub cpu_s: f64,
    pub peak_rss_mib: f64,
    pub delta_instances_at_start: Option<usize>,
}

#[derive(Debug, Default, Serialize)]
pub struct PendingWait {
    pub pending: usize,
    pub waited_s: f64,
    pub still_pending: usize,
}

#[derive(Debug, Serialize)]
pub struct Target {
    pub target: String,
    pub measured: String,
    pub met: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub registry: Kind,
    pub profile: String,
    pub started_utc: String,
    pub command: String,
    /// `git describe --always --dirty` of the tree the connector was built from.
    pub git: String,
    pub machine: Machine,
    pub params: Params,
    /// How the data sets were written to the registry.
    pub registry_load_api: String,
    pub connector_flags: String,
    pub connector_command: String,
    pub floor: FloorResult,
    pub initial_sync: SyncResult,
    pub restart: RestartResult,
    pub propagation: Vec<PropResult>,
    pub steady: SteadyResult,
    pub cost: Vec<CostResult>,
    pub targets: Vec<Target>,
    /// Consul only: connections the agent kept for each stopped connector.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub consul_connections_after_stop: Vec<ConnRelease>,
    pub net_during_initial_sync: NetCounters,
    /// apiserver_request_total deltas ("VERB resource"), whoever made the requests
    /// (the harness's watches and the controller-manager included).
    pub apiserver_requests_floor: BTreeMap<String, f64>,
    pub apiserver_requests_initial_sync: BTreeMap<String, f64>,
    pub apiserver_requests_steady: BTreeMap<String, f64>,
    pub pending_before_steady: PendingWait,
    pub total_s: f64,
}

impl Results {
    pub fn new(registry: Kind, profile: &str, stamp: &str, command: &str) -> Results {
        Results {
            registry,
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
            params: Params::default(),
            registry_load_api: String::new(),
            connector_flags: String::new(),
            connector_command: String::new(),
            floor: FloorResult::default(),
            initial_sync: SyncResult::default(),
            restart: RestartResult::default(),
            propagation: Vec::new(),
            steady: SteadyResult::default(),
            cost: Vec::new(),
            targets: Vec::new(),
            consul_connections_after_stop: Vec::new(),
            net_during_initial_sync: NetCounters::default(),
            apiserver_requests_floor: BTreeMap::new(),
            apiserver_requests_initial_sync: BTreeMap::new(),
            apiserver_requests_steady: BTreeMap::new(),
            pending_before_steady: PendingWait::default(),
            total_s: 0.0,
        }
    }

    /// Compares the figures with the targets (reported, never asserted).
    pub fn evaluate(&mut self) {
        let name = self.registry.name();
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
            let bound = if self.params.read_delay_ms > 0 {
                let read = if self.registry == Kind::Nacos {
                    "push delay"
                } else {
                    "poll"
                };
                format!(
                    "quiet {} ms + {read} {} ms + 250 ms",
                    p.quiet_ms, self.params.read_delay_ms
                )
            } else {
                format!("quiet {} ms + 250 ms", p.quiet_ms)
            };
            t.push(Target {
                target: format!("propagation p99 <= {} ms ({bound})", p.target_ms),
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
                .map(|c| c.requests_per_change_net)
                .unwrap_or(0.0);
            let last = self
                .cost
                .last()
                .map(|c| c.requests_per_change_net)
                .unwrap_or(0.0);
            t.push(Target {
                target: format!("O(1) {name} requests per change"),
                measured: self
                    .cost
                    .iter()
                    .map(|c| {
                        format!(
                            "N={}: {:.2} raw, {:.2} net of background",
                            c.n, c.requests_per_change_raw, c.requests_per_change_net
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

/// A latency in ms, or how long an unlanded one was waited for.
pub fn ms(v: Option<f64>, run: &ChangeRun) -> String {
    match v {
        Some(v) => format!("{v:.0}"),
        None => format!("> {:.0} s (not landed)", run.final_wait_s),
    }
}

/// The one-line summary of a propagation run on stderr.
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
