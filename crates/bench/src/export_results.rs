//! The export workload's results document (written as JSON) and its comparison with
//! the targets. Kept apart from [`crate::results`]: the other direction's figures
//! (floor of direct writes, EndpointSlices in place) do not apply, and this one's
//! (instances in the registry, Pod status write → instance state) do not apply there.
//! One document for both registries: the Consul-only figures (`txn`, `ModifyIndex`)
//! and the Eureka-only ones (heartbeats, `lastUpdatedTimestamp`, `lastDirtyTimestamp`)
//! sit side by side, the other registry's left at 0 or `null`.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::host::Machine;
use crate::registry::Kind;
use crate::results::{Requests, Target};

/// The workload's parameters, as recorded.
#[derive(Debug, Default, Serialize)]
pub struct ExportParams {
    pub n: usize,
    pub m: usize,
    pub k: usize,
    pub quiet_ms: u64,
    pub land_bound_s: f64,
    pub rest_s: f64,
    pub restart_settle_s: f64,
    /// Kubernetes writes in flight while the set is created.
    pub concurrency: usize,
    pub seed: u64,
    /// Whether every Pod has an address of its own (N × M ≤ 747), or addresses repeat
    /// across Services.
    pub unique_addresses: bool,
    /// How a change is seen in the registry, and the resolution of that.
    pub watch: String,
    /// Eureka: the harness's poll interval of every read-back (no blocking queries).
    pub registry_poll_ms: Option<u64>,
    /// What a Pod that is not ready looks like in the registry for the program measured.
    pub not_ready_in_registry: String,
}

/// Step 1: Kubernetes alone.
#[derive(Debug, Default, Serialize)]
pub struct KubeFloor {
    pub services: usize,
    pub pods: usize,
    /// Services, Pods and Pod status writes.
    pub writes: usize,
    /// First write → last write answered.
    pub writes_s: f64,
    /// First write → the watch event completing the last Service's EndpointSlices
    /// (every Pod's address ready): the floor.
    pub slices_complete_s: f64,
}

/// Step 2: the connector from empty.
#[derive(Debug, Default, Serialize)]
pub struct ExportSync {
    pub instances: usize,
    /// Process start → the registry answer that showed every instance, all passing
    /// (Eureka: all `UP`).
    pub complete_s: f64,
    /// Process start → `/readyz` 200.
    pub ready_s: f64,
    /// complete / the floor.
    pub ratio_to_floor: f64,
    /// Registry requests since the start, by endpoint, read right after completion.
    pub requests: Requests,
    pub requests_per_instance: f64,
    pub txn_requests: f64,
    /// Registry write requests: Consul `txn`; Eureka register, status, status_delete
    /// and cancel (one instance each). Heartbeats are not writes here.
    pub registry_write_requests: f64,
    /// Eureka: lease renewals, and instances registered again after a renewal's 404.
    pub heartbeats: f64,
    pub reregistrations: f64,
    /// Instance writes (register, health, deregister) and write batches.
    pub export_writes: f64,
    pub export_write_requests: f64,
    /// The connector's own Kubernetes writes (none expected in this direction).
    pub kube_writes: f64,
    /// `apiserver_request_total` deltas on the kinds the connector watches (Services,
    /// EndpointSlices, Nodes; Endpoints for consul-k8s), "VERB resource", from the
    /// start to completion. Whoever
    /// made them: nothing else changes then, but the controller-manager's watches
    /// count too.
    pub apiserver_requests: BTreeMap<String, f64>,
    pub cpu_s: f64,
    pub peak_rss_mib: f64,
    pub connections: usize,
}

/// One Pod status write of step 3.
#[derive(Debug, Clone, Serialize)]
pub struct FlipSample {
    pub pod: String,
    pub service: String,
    pub to_ready: bool,
    /// When the write was sent, seconds since the connector started.
    pub at_s: f64,
    /// Status write → the EndpointSlice watch event showing it (Kubernetes' share).
    pub slice_ms: Option<f64>,
    /// Status write → the registry answer showing the new state (Consul: check state;
    /// Eureka: status); `None`: not within the land bound.
    pub registry_ms: Option<f64>,
    /// The real latency of a change that landed after the bound.
    pub registry_late_ms: Option<f64>,
}

/// Step 3.
#[derive(Debug, Default, Serialize)]
pub struct FlipResult {
    pub flips: usize,
    pub changes: usize,
    pub landed: usize,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub to_not_ready_p50_ms: Option<f64>,
    pub to_not_ready_p99_ms: Option<f64>,
    pub to_ready_p50_ms: Option<f64>,
    pub to_ready_p99_ms: Option<f64>,
    /// Kubernetes' share: status write → EndpointSlice event.
    pub slice_p50_ms: Option<f64>,
    pub slice_p99_ms: Option<f64>,
    /// quiet period + 250 ms (Eureka: + the harness's poll interval).
    pub target_ms: f64,
    pub requests: Requests,
    pub requests_per_change: f64,
    pub txn_per_change: f64,
    /// See [`ExportSync::registry_write_requests`].
    pub registry_writes_per_change: f64,
    /// Eureka: lease renewals during the phase (not caused by the flips), and the
    /// requests per change without them.
    pub heartbeats: f64,
    pub requests_per_change_without_heartbeats: f64,
    pub export_writes_per_change: f64,
    pub apiserver_requests: BTreeMap<String, f64>,
    pub phase_s: f64,
    pub samples: Vec<FlipSample>,
}

/// Step 4.
#[derive(Debug, Default, Serialize)]
pub struct ExportRest {
    pub window_s: f64,
    pub txn_requests: f64,
    /// See [`ExportSync::registry_write_requests`]: 0 expected.
    pub registry_write_requests: f64,
    /// Eureka: lease renewals (the one write Eureka needs at rest, reported apart),
    /// per minute, and re-registrations (0 expected).
    pub heartbeats: f64,
    pub heartbeats_per_min: f64,
    pub reregistrations: f64,
    pub export_writes: f64,
    pub export_write_requests: f64,
    pub requests: Requests,
    pub requests_per_min: f64,
    pub apiserver_requests: BTreeMap<String, f64>,
    pub cpu_s: f64,
    /// CPU in the window as % of one core.
    pub cpu_pct: f64,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
    pub connections: usize,
    pub connections_peak: usize,
}

/// Step 5.
#[derive(Debug, Default, Serialize)]
pub struct ExportRestart {
    /// Process start → `/readyz` 200; `None`: not within the bound.
    pub ready_s: Option<f64>,
    /// Watched this long once ready.
    pub settle_s: f64,
    pub export_writes: f64,
    pub txn_requests: f64,
    /// See [`ExportSync::registry_write_requests`].
    pub registry_write_requests: f64,
    /// Eureka: `POST /apps/<APP>` requests of the restarted connector (0 expected),
    /// its heartbeats and re-registrations.
    pub registrations: f64,
    pub heartbeats: f64,
    pub reregistrations: f64,
    pub requests: Requests,
    pub instances: usize,
    /// Consul: registrations whose `ModifyIndex` moved, appeared or went, across the
    /// restart.
    pub modify_index_changed: Option<usize>,
    /// Eureka: instances whose `lastUpdatedTimestamp`, `lastDirtyTimestamp`,
    /// `leaseInfo.registrationTimestamp` moved (or that appeared or went).
    pub last_updated_changed: Option<usize>,
    pub last_dirty_changed: Option<usize>,
    pub registration_changed: Option<usize>,
}

impl ExportRestart {
    /// Instances whose stamps moved, whichever registry: the largest count.
    pub fn stamps_changed(&self) -> usize {
        [
            self.modify_index_changed,
            self.last_updated_changed,
            self.last_dirty_changed,
            self.registration_changed,
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(0)
    }
}

/// Step 6.
#[derive(Debug, Default, Serialize)]
pub struct ExportCleanup {
    /// The run's registrations removed (Consul: its node; Eureka: its instances).
    pub registry_removed: bool,
    /// What was removed, as said in the report.
    pub registry_removal: String,
    pub namespace_gone: bool,
    pub namespace_wait_s: f64,
    pub node_deleted: bool,
    pub errors: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct ExportResults {
    pub profile: String,
    pub registry: Option<Kind>,
    /// What was measured: `registry-connector` (this repository's release build).
    pub subject: String,
    pub started_utc: String,
    pub command: String,
    pub git: String,
    pub machine: Machine,
    /// The agent's `limits.http_max_conns_per_client`.
    pub agent_conn_limit: Option<u64>,
    pub params: ExportParams,
    pub namespace: String,
    pub consul_node: String,
    pub connector_id: String,
    pub connector_command: String,
    pub floor: KubeFloor,
    pub sync: ExportSync,
    pub flips: FlipResult,
    pub rest: ExportRest,
    pub restart: ExportRestart,
    pub cleanup: ExportCleanup,
    pub targets: Vec<Target>,
    /// `ok` or `failed: ...` (the figures measured before the failure are kept).
    pub status: String,
    pub total_s: f64,
}

/// Nearest-rank percentile `p` of `values`, where `None` (not landed) ranks above every
/// latency: `None` when the rank falls among them.
pub fn percentile(values: &[Option<f64>], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v: Vec<Option<f64>> = values.to_vec();
    v.sort_by(|a, b| match (a, b) {
        (Some(x), Some(y)) => x.total_cmp(y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    });
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v.get(rank - 1).copied().flatten()
}

impl FlipResult {
    /// Fills the percentiles from the samples.
    pub fn summarize(&mut self) {
        let all: Vec<Option<f64>> = self.samples.iter().map(|s| s.registry_ms).collect();
        let by = |ready: bool| -> Vec<Option<f64>> {
            self.samples
                .iter()
                .filter(|s| s.to_ready == ready)
                .map(|s| s.registry_ms)
                .collect()
        };
        let slices: Vec<Option<f64>> = self.samples.iter().map(|s| s.slice_ms).collect();
        self.changes = self.samples.len();
        self.landed = all.iter().filter(|v| v.is_some()).count();
        self.p50_ms = percentile(&all, 50.0);
        self.p90_ms = percentile(&all, 90.0);
        self.p99_ms = percentile(&all, 99.0);
        self.max_ms = percentile(&all, 100.0);
        self.to_not_ready_p50_ms = percentile(&by(false), 50.0);
        self.to_not_ready_p99_ms = percentile(&by(false), 99.0);
        self.to_ready_p50_ms = percentile(&by(true), 50.0);
        self.to_ready_p99_ms = percentile(&by(true), 99.0);
        self.slice_p50_ms = percentile(&slices, 50.0);
        self.slice_p99_ms = percentile(&slices, 99.0);
    }
}

impl ExportResults {
    /// Compares the figures with the targets (reported, never asserted).
    pub fn evaluate(&mut self) {
        let mut t = Vec::new();
        let eureka = self.registry == Some(Kind::Eureka);
        let reg = self.registry.map_or("Consul", Kind::name);
        let s = &self.sync;
        if s.instances > 0 && eureka {
            // Eureka has no batch write: one registration per instance is the least.
            t.push(Target {
                target:
                    "initial export: 1 Eureka write per instance (no batch API), no other write"
                        .into(),
                measured: format!(
                    "{:.0} write requests for {} instances ({:.0} requests in all)",
                    s.registry_write_requests, s.instances, s.requests.total
                ),
                met: Some(s.registry_write_requests <= s.instances as f64),
            });
        } else if s.instances > 0 {
            t.push(Target {
                target: "initial export: <= 1 Consul request per 32 instances".into(),
                measured: format!(
                    "{:.4} per instance ({:.0} requests for {} instances: 1 per {:.1})",
                    s.requests_per_instance,
                    s.requests.total,
                    s.instances,
                    s.instances as f64 / s.requests.total.max(1.0)
                ),
                met: Some(s.requests_per_instance <= 1.0 / 32.0),
            });
        }
        let f = &self.flips;
        if f.changes > 0 {
            let poll = match self.params.registry_poll_ms {
                Some(p) => format!(" + poll {p} ms"),
                None => String::new(),
            };
            t.push(Target {
                target: format!(
                    "readiness change p99 <= {:.0} ms (quiet {} ms + 250 ms{poll}; Pod status write → {reg}, Kubernetes' share included)",
                    f.target_ms, self.params.quiet_ms
                ),
                measured: format!(
                    "p99 {} ms ({}/{} landed)",
                    ms(f.p99_ms),
                    f.landed,
                    f.changes
                ),
                met: Some(f.p99_ms.is_some_and(|v| v <= f.target_ms)),
            });
        }
        let r = &self.rest;
        if r.window_s > 0.0 {
            let writes = r.registry_write_requests
                + r.txn_requests
                + r.export_writes
                + r.export_write_requests
                + r.reregistrations;
            let measured = if eureka {
                format!(
                    "{:.0} write requests, {:.0} instance writes, {:.0} write batches, {:.0} re-registrations in {:.0} s (heartbeats apart: {:.0})",
                    r.registry_write_requests, r.export_writes, r.export_write_requests, r.reregistrations, r.window_s, r.heartbeats
                )
            } else {
                format!(
                    "{:.0} txn requests, {:.0} instance writes, {:.0} write batches in {:.0} s",
                    r.txn_requests, r.export_writes, r.export_write_requests, r.window_s
                )
            };
            t.push(Target {
                target: if eureka {
                    "0 registry writes at rest (lease renewals not counted)".into()
                } else {
                    "0 registry writes at rest".into()
                },
                measured,
                met: Some(writes == 0.0),
            });
        }
        let rs = &self.restart;
        if rs.settle_s > 0.0 {
            let writes = rs.export_writes + rs.txn_requests + rs.registry_write_requests;
            let (target, measured) = if eureka {
                (
                    "restart with nothing changed: 0 writes, 0 registrations, lastUpdatedTimestamp and lastDirtyTimestamp unchanged",
                    format!(
                        "{:.0} instance writes, {:.0} write requests ({:.0} registrations), lastUpdatedTimestamp changed {} / lastDirtyTimestamp changed {} of {}",
                        rs.export_writes,
                        rs.registry_write_requests,
                        rs.registrations,
                        rs.last_updated_changed.unwrap_or(0),
                        rs.last_dirty_changed.unwrap_or(0),
                        rs.instances
                    ),
                )
            } else {
                (
                    "restart with nothing changed: 0 writes, every ModifyIndex unchanged",
                    format!(
                        "{:.0} instance writes, {:.0} txn requests, {} of {} ModifyIndex changed",
                        rs.export_writes,
                        rs.txn_requests,
                        rs.modify_index_changed.unwrap_or(0),
                        rs.instances
                    ),
                )
            };
            t.push(Target {
                target: target.into(),
                measured,
                met: Some(writes == 0.0 && rs.registrations == 0.0 && rs.stamps_changed() == 0),
            });
        }
        self.targets = t;
    }
}

/// A latency in ms, or "not landed".
pub fn ms(v: Option<f64>) -> String {
    v.map_or("not landed".into(), |v| format!("{v:.0}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlanded_rank_above_every_latency() {
        let v = [Some(30.0), None, Some(10.0), Some(20.0)];
        assert_eq!(percentile(&v, 50.0), Some(20.0));
        assert_eq!(percentile(&v, 75.0), Some(30.0));
        assert_eq!(percentile(&v, 99.0), None);
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn targets_follow_the_figures() {
        let mut r = ExportResults::default();
        r.sync.instances = 3000;
        r.sync.requests.total = 60.0;
        r.sync.requests_per_instance = 0.02;
        r.rest.window_s = 60.0;
        r.rest.txn_requests = 1.0;
        r.evaluate();
        assert_eq!(r.targets.len(), 2);
        assert_eq!(r.targets[0].met, Some(true));
        assert_eq!(r.targets[1].met, Some(false));
    }
}
