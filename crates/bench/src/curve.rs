//! The scaling curve's results: one row per N (written as JSON) and the Markdown table
//! printed on stdout. The per-service columns are the point of the curve: with a cost
//! per service that stays flat, RSS / N and CPU / N do not grow with N.

use serde::Serialize;

use crate::changes::ChangeRun;
use crate::host::Machine;
use crate::registry::Kind;

/// What one N measured. Every figure is optional: a row whose run failed or was
/// skipped keeps what was measured before, and `status` says why it stopped.
#[derive(Debug, Default, Serialize)]
pub struct CurveRow {
    pub n: usize,
    pub m: usize,
    /// `ok`, `skipped: ...` or `failed: ...`.
    pub status: String,
    /// The floor (Services + EndpointSlices + Endpoints), seconds.
    pub floor_s: Option<f64>,
    /// Loading the N × M instances into the registry, seconds.
    pub registry_load_s: Option<f64>,
    /// Connector start → every object in place, seconds, and its ratio to the floor.
    pub initial_sync_s: Option<f64>,
    pub sync_ratio_to_floor: Option<f64>,
    /// Connector start → `/readyz` 200, seconds.
    pub ready_s: Option<f64>,
    /// TCP connections from the connector to the registry: at the end of the initial
    /// sync, the most seen over the process's life, at the end of the rest window.
    pub connections_at_sync: Option<usize>,
    pub connections_peak: Option<usize>,
    pub connections_at_rest: Option<usize>,
    /// End of the initial sync → first change, seconds (nothing excluded).
    pub first_change_after_sync_s: Option<f64>,
    /// Propagation over K changes; `None` percentiles fall among the unlanded ones.
    pub changes: usize,
    pub landed: usize,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// The bound a change had to land within, seconds.
    pub land_bound_s: f64,
    /// Registry requests and Kubernetes writes over the change phase, per change made.
    pub requests_per_change: Option<f64>,
    pub writes_per_change: Option<f64>,
    /// Changes still pending when the rest window started (after a bounded wait).
    pub pending_at_rest: Option<usize>,
    /// The rest window: its length, writes, registry requests per minute, CPU as % of
    /// one core, RSS at its end (VmRSS) and the process's peak (VmHWM), MiB.
    pub rest_window_s: Option<f64>,
    pub writes_at_rest: Option<f64>,
    pub requests_per_min_at_rest: Option<f64>,
    pub cpu_pct_at_rest: Option<f64>,
    pub rss_at_rest_mib: Option<f64>,
    pub rss_peak_mib: Option<f64>,
    /// Consul only: connections the agent still held (the stopped connector's long
    /// polls and the harness's own) when the second connector started.
    pub agent_connections_at_restart: Option<usize>,
    /// A second connector on the synced namespace, started right after the first one
    /// stopped, from the same address: time to ready (`None`: not within the bound),
    /// and its writes (0 expected).
    pub restart_ready_s: Option<f64>,
    pub restart_writes: Option<f64>,
    /// Per service: RSS (KiB), CPU at rest (% of a core per 1,000 services), registry
    /// requests at rest (per minute per 1,000 services).
    pub rss_peak_kib_per_service: Option<f64>,
    pub rss_at_rest_kib_per_service: Option<f64>,
    pub cpu_pct_at_rest_per_1000: Option<f64>,
    pub requests_per_min_at_rest_per_1000: Option<f64>,
    /// Wall time of this N's phases and in all, seconds.
    pub phases_s: Vec<(String, f64)>,
    pub total_s: f64,
    /// The change phase in full (latencies, timeline relative to the connector's start).
    pub run: Option<ChangeRun>,
}

impl CurveRow {
    /// Fills the per-service columns from the absolute ones.
    pub fn per_service(&mut self) {
        let n = self.n.max(1) as f64;
        self.rss_peak_kib_per_service = self.rss_peak_mib.map(|v| v * 1024.0 / n);
        self.rss_at_rest_kib_per_service = self.rss_at_rest_mib.map(|v| v * 1024.0 / n);
        self.cpu_pct_at_rest_per_1000 = self.cpu_pct_at_rest.map(|v| v * 1000.0 / n);
        self.requests_per_min_at_rest_per_1000 =
            self.requests_per_min_at_rest.map(|v| v * 1000.0 / n);
    }
}

/// The curve's parameters, as recorded.
#[derive(Debug, Default, Serialize)]
pub struct CurveParams {
    pub ns: Vec<usize>,
    pub m: usize,
    pub k: usize,
    pub quiet_ms: u64,
    pub land_bound_s: f64,
    pub rest_s: f64,
    pub restart_timeout_s: f64,
    pub max_instances: Option<usize>,
    pub concurrency: usize,
    pub seed: u64,
}

#[derive(Debug, Serialize)]
pub struct CurveResults {
    pub registry: Kind,
    /// `Consul over HTTP`, `Consul over HTTPS`, `Eureka over HTTP`.
    pub transport: String,
    pub started_utc: String,
    pub command: String,
    pub git: String,
    pub machine: Machine,
    /// Consul only: the agent's `limits.http_max_conns_per_client`.
    pub agent_conn_limit: Option<u64>,
    pub connector_flags: String,
    pub params: CurveParams,
    pub rows: Vec<CurveRow>,
    pub total_s: f64,
}

fn f(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

fn u(v: Option<usize>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// A latency, or how it fell among the unlanded changes.
fn lat(v: Option<f64>, row: &CurveRow) -> String {
    match v {
        Some(v) => format!("{v:.0}"),
        None if row.changes > 0 => format!("> {:.0} s", row.land_bound_s),
        None => "-".into(),
    }
}

/// The Markdown: a header, the table of absolute figures, the per-service table.
pub fn markdown(r: &CurveResults) -> String {
    let mut s = format!(
        "### Scaling curve, {}, {} (M = {}, K = {}, quiet {} ms, land bound {:.0} s, rest {:.0} s)\n\n",
        r.transport, r.started_utc, r.params.m, r.params.k, r.params.quiet_ms, r.params.land_bound_s, r.params.rest_s
    );
    s.push_str(&format!(
        "Tree: `{}`. Machine: {} cores, {} MiB, load average at start {}. Agent limit per client: {}. Connector flags: `{}`.\n\n",
        r.git,
        r.machine.nproc,
        r.machine.mem_total_mib,
        r.machine.load_avg_at_start,
        r.agent_conn_limit.map_or("n/a".into(), |v| v.to_string()),
        r.connector_flags
    ));
    s.push_str("| N | floor s | sync s (× floor) | ready s | conns sync / peak / rest | p50 / p99 ms (landed) | req / change | req / min at rest | CPU at rest % | RSS peak / rest MiB | restart ready s (agent conns) | time s | status |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for row in &r.rows {
        s.push_str(&format!(
            "| {} | {} | {} ({}) | {} | {} / {} / {} | {} / {} ({}/{}) | {} | {} | {} | {} / {} | {} ({}) | {:.0} | {} |\n",
            row.n,
            f(row.floor_s, 2),
            f(row.initial_sync_s, 2),
            f(row.sync_ratio_to_floor, 2),
            f(row.ready_s, 2),
            u(row.connections_at_sync),
            u(row.connections_peak),
            u(row.connections_at_rest),
            lat(row.p50_ms, row),
            lat(row.p99_ms, row),
            row.landed,
            row.changes,
            f(row.requests_per_change, 2),
            f(row.requests_per_min_at_rest, 1),
            f(row.cpu_pct_at_rest, 3),
            f(row.rss_peak_mib, 1),
            f(row.rss_at_rest_mib, 1),
            match (row.restart_ready_s, row.status.as_str()) {
                (Some(v), _) => format!("{v:.2}"),
                (None, "ok") => format!("> {:.0}", r.params.restart_timeout_s),
                _ => "-".into(),
            },
            u(row.agent_connections_at_restart),
            row.total_s,
            row.status
        ));
    }
    s.push_str("\n| N | RSS peak / N KiB | RSS at rest / N KiB | CPU at rest % per 1,000 services | requests / min at rest per 1,000 services | writes at rest | pending at rest |\n");
    s.push_str("|---|---|---|---|---|---|---|\n");
    for row in &r.rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            row.n,
            f(row.rss_peak_kib_per_service, 1),
            f(row.rss_at_rest_kib_per_service, 1),
            f(row.cpu_pct_at_rest_per_1000, 3),
            f(row.requests_per_min_at_rest_per_1000, 1),
            f(row.writes_at_rest, 0),
            u(row.pending_at_rest)
        ));
    }
    s.push_str(&format!("\nTotal harness time: {:.0} s.\n", r.total_s));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_service_columns_divide_by_n() {
        let mut row = CurveRow {
            n: 2000,
            rss_peak_mib: Some(100.0),
            cpu_pct_at_rest: Some(0.5),
            requests_per_min_at_rest: Some(400.0),
            ..Default::default()
        };
        row.per_service();
        assert_eq!(row.rss_peak_kib_per_service, Some(51.2));
        assert_eq!(row.cpu_pct_at_rest_per_1000, Some(0.25));
        assert_eq!(row.requests_per_min_at_rest_per_1000, Some(200.0));
        assert_eq!(row.rss_at_rest_kib_per_service, None);
    }

    #[test]
    fn unlanded_percentiles_show_the_bound() {
        let row = CurveRow {
            changes: 10,
            land_bound_s: 30.0,
            ..Default::default()
        };
        assert_eq!(lat(None, &row), "> 30 s");
        assert_eq!(lat(Some(1012.4), &row), "1012");
    }
}
