//! The export workload's Markdown on stdout: one table of figures in step order, then
//! the targets, in the same shape as the other profiles' report. One table for both
//! registries: the rows name the registry, and where the figures differ (Consul's
//! `txn` and `ModifyIndex`; Eureka's heartbeats and timestamps) each gets its own rows.

use std::collections::BTreeMap;

use crate::export_results::{ms, ExportResults};
use crate::registry::Kind;

/// `key value, key value` of a counter map, or `none`.
fn counts(m: &BTreeMap<String, f64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "n/a",
    }
}

/// The Markdown report.
pub fn markdown(r: &ExportResults) -> String {
    let p = &r.params;
    let eureka = r.registry == Some(Kind::Eureka);
    let reg = r.registry.map_or("Consul", Kind::name);
    let mut s = format!(
        "### Kubernetes → {reg} ({}), `export` profile, {} (N = {}, M = {}, K = {} flips, quiet {} ms, rest {:.0} s{})\n\n",
        r.subject,
        r.started_utc,
        p.n,
        p.m,
        p.k,
        p.quiet_ms,
        p.rest_s,
        if p.rest_s < 300.0 { ", shortened from 5 min" } else { "" }
    );
    s.push_str(&format!(
        "Tree: `{}`. Machine: {} cores, {} MiB, load average at start {}.{} Status: {}.\n\n",
        r.git,
        r.machine.nproc,
        r.machine.mem_total_mib,
        r.machine.load_avg_at_start,
        if eureka {
            String::new()
        } else {
            format!(
                " Agent limit per client: {}.",
                r.agent_conn_limit.map_or("n/a".into(), |v| v.to_string())
            )
        },
        r.status
    ));
    s.push_str(&format!(
        "Connector: `{}`.\n\n{reg} read-back: {}. A Pod that is not ready shows in {reg} as {}. Addresses: {}.\n\n",
        r.connector_command,
        p.watch,
        p.not_ready_in_registry,
        if p.unique_addresses {
            "one per Pod"
        } else {
            "distinct within a Service, repeated across Services (N × M > 747)"
        }
    ));
    s.push_str("| step | figure | value |\n|---|---|---|\n");
    let mut row = |w: &str, k: &str, v: String| s.push_str(&format!("| {w} | {k} | {v} |\n"));
    let f = &r.floor;
    row(
        "1 Kubernetes",
        &format!(
            "{} Services + {} Pods (create + status): writes",
            f.services, f.pods
        ),
        format!("{} in {:.2} s", f.writes, f.writes_s),
    );
    row(
        "1 Kubernetes",
        "first write → every EndpointSlice built (**floor**)",
        format!("{:.2} s", f.slices_complete_s),
    );
    let i = &r.sync;
    row(
        "2 initial export",
        &format!(
            "start → {} instances in {reg}, all {}",
            i.instances,
            if eureka { "UP" } else { "passing" }
        ),
        format!(
            "{:.2} s ({:.2} × floor); ready after {:.2} s",
            i.complete_s, i.ratio_to_floor, i.ready_s
        ),
    );
    row(
        "2 initial export",
        &format!("{reg} requests (failed); per instance"),
        format!(
            "{:.0} ({:.0}); {:.4} (1 per {:.1})",
            i.requests.total,
            i.requests.failed,
            i.requests_per_instance,
            i.instances as f64 / i.requests.total.max(1.0)
        ),
    );
    row(
        "2 initial export",
        &format!("{reg} requests by endpoint"),
        counts(&i.requests.by_endpoint),
    );
    if eureka {
        row(
            "2 initial export",
            "registrations / status writes (register, status, status_delete, cancel) vs heartbeats; re-registrations",
            format!(
                "{:.0} ({:.0} register) vs {:.0}; {:.0}",
                i.registry_write_requests,
                i.requests.by_endpoint.get("register").copied().unwrap_or(0.0),
                i.heartbeats,
                i.reregistrations
            ),
        );
    }
    row(
        "2 initial export",
        "instance writes, write batches; connector's Kubernetes writes",
        format!(
            "{:.0}, {:.0}; {:.0}",
            i.export_writes, i.export_write_requests, i.kube_writes
        ),
    );
    row(
        "2 initial export",
        "apiserver requests on Services, EndpointSlices, Endpoints, Nodes (whoever)",
        counts(&i.apiserver_requests),
    );
    row(
        "2 initial export",
        &format!("connector CPU, peak RSS, TCP connections to {reg}"),
        format!(
            "{:.2} s, {:.1} MiB, {}",
            i.cpu_s, i.peak_rss_mib, i.connections
        ),
    );
    let fl = &r.flips;
    row(
        "3 readiness flips",
        &format!(
            "{} flips = {} status writes: p50 / p90 / p99 / max (ms)",
            fl.flips, fl.changes
        ),
        format!(
            "{} / {} / {} / {} ({}/{} landed within {:.0} s)",
            ms(fl.p50_ms),
            ms(fl.p90_ms),
            ms(fl.p99_ms),
            ms(fl.max_ms),
            fl.landed,
            fl.changes,
            p.land_bound_s
        ),
    );
    row(
        "3 readiness flips",
        "Ready → not ready p50 / p99; not ready → ready p50 / p99 (ms)",
        format!(
            "{} / {}; {} / {}",
            ms(fl.to_not_ready_p50_ms),
            ms(fl.to_not_ready_p99_ms),
            ms(fl.to_ready_p50_ms),
            ms(fl.to_ready_p99_ms)
        ),
    );
    row(
        "3 readiness flips",
        "Kubernetes' share: status write → EndpointSlice event p50 / p99 (ms)",
        format!("{} / {}", ms(fl.slice_p50_ms), ms(fl.slice_p99_ms)),
    );
    if eureka {
        row(
            "3 readiness flips",
            "per change: Eureka requests without heartbeats, write requests (status, status_delete, ...), instance writes; heartbeats in the phase (not caused by the flips)",
            format!(
                "{:.2}, {:.2}, {:.2} ({}); {:.0} heartbeats in {:.0} s",
                fl.requests_per_change_without_heartbeats,
                fl.registry_writes_per_change,
                fl.export_writes_per_change,
                counts(&fl.requests.by_endpoint),
                fl.heartbeats,
                fl.phase_s
            ),
        );
    } else {
        row(
            "3 readiness flips",
            "per change: Consul requests, txn, instance writes",
            format!(
                "{:.2}, {:.2}, {:.2} ({})",
                fl.requests_per_change,
                fl.txn_per_change,
                fl.export_writes_per_change,
                counts(&fl.requests.by_endpoint)
            ),
        );
    }
    let rs = &r.rest;
    if eureka {
        row(
            "4 at rest",
            &format!(
                "{:.0} s: registry write requests (register, status, cancel), instance writes, write batches, re-registrations",
                rs.window_s
            ),
            format!(
                "{:.0}, {:.0}, {:.0}, {:.0}",
                rs.registry_write_requests,
                rs.export_writes,
                rs.export_write_requests,
                rs.reregistrations
            ),
        );
        row(
            "4 at rest",
            "heartbeats (lease renewals, apart from the writes); per minute (one per instance per 30 s: expected)",
            format!(
                "{:.0}; {:.1} ({:.0})",
                rs.heartbeats,
                rs.heartbeats_per_min,
                2.0 * r.sync.instances as f64
            ),
        );
    } else {
        row(
            "4 at rest",
            &format!(
                "{:.0} s: txn requests, instance writes, write batches",
                rs.window_s
            ),
            format!(
                "{:.0}, {:.0}, {:.0}",
                rs.txn_requests, rs.export_writes, rs.export_write_requests
            ),
        );
    }
    row(
        "4 at rest",
        &format!("{reg} requests per minute (by endpoint)"),
        format!(
            "{:.1} ({})",
            rs.requests_per_min,
            counts(&rs.requests.by_endpoint)
        ),
    );
    row(
        "4 at rest",
        "CPU seconds (% of a core); RSS now / peak (VmHWM)",
        format!(
            "{:.2} ({:.3} %); {:.1} / {:.1} MiB",
            rs.cpu_s, rs.cpu_pct, rs.rss_mib, rs.peak_rss_mib
        ),
    );
    row(
        "4 at rest",
        &format!("TCP connections to {reg} now / most over the process's life"),
        format!("{} / {}", rs.connections, rs.connections_peak),
    );
    let rt = &r.restart;
    let ready = rt
        .ready_s
        .map_or("not ready".into(), |v| format!("{v:.2} s"));
    let of = |v: Option<usize>| v.map_or("n/a".into(), |v| format!("{v} of {}", rt.instances));
    if eureka {
        row(
            "5 restart",
            &format!(
                "ready; then {:.1} s watched: instance writes, write requests, registrations, re-registrations; heartbeats",
                rt.settle_s
            ),
            format!(
                "{ready}; {:.0}, {:.0}, {:.0}, {:.0}; {:.0}",
                rt.export_writes,
                rt.registry_write_requests,
                rt.registrations,
                rt.reregistrations,
                rt.heartbeats
            ),
        );
        row(
            "5 restart",
            "Eureka requests since its start; lastUpdatedTimestamp / lastDirtyTimestamp / leaseInfo.registrationTimestamp changed",
            format!(
                "{:.0} ({}); {} / {} / {}",
                rt.requests.total,
                counts(&rt.requests.by_endpoint),
                of(rt.last_updated_changed),
                of(rt.last_dirty_changed),
                of(rt.registration_changed)
            ),
        );
    } else {
        row(
            "5 restart",
            &format!(
                "ready; then {:.1} s watched: instance writes, txn",
                rt.settle_s
            ),
            format!("{ready}; {:.0}, {:.0}", rt.export_writes, rt.txn_requests),
        );
        row(
            "5 restart",
            "Consul requests since its start; ModifyIndex changed",
            format!(
                "{:.0} ({}); {}",
                rt.requests.total,
                counts(&rt.requests.by_endpoint),
                of(rt.modify_index_changed)
            ),
        );
    }
    let c = &r.cleanup;
    row(
        "6 clean-up",
        &format!(
            "{} removed{}, namespace gone (wait), Node deleted",
            if eureka {
                "the connector's Eureka instances"
            } else {
                "Consul node"
            },
            if c.registry_removal.is_empty() {
                String::new()
            } else {
                format!(" ({})", c.registry_removal)
            }
        ),
        format!(
            "{}, {} ({:.1} s), {}{}",
            c.registry_removed,
            c.namespace_gone,
            c.namespace_wait_s,
            c.node_deleted,
            if c.errors.is_empty() {
                String::new()
            } else {
                format!("; {}", c.errors.join("; "))
            }
        ),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_step() {
        let mut r = ExportResults {
            subject: "registry-connector".into(),
            ..Default::default()
        };
        r.params.n = 20;
        r.evaluate();
        let md = markdown(&r);
        for step in [
            "1 Kubernetes",
            "2 initial export",
            "3 readiness flips",
            "4 at rest",
            "5 restart",
            "6 clean-up",
        ] {
            assert!(md.contains(step), "{step} missing");
        }
        assert!(md.contains("shortened from 5 min"));
        assert!(md.contains("Kubernetes → Consul"));
    }

    #[test]
    fn eureka_rows_report_heartbeats_and_timestamps() {
        let mut r = ExportResults {
            subject: "registry-connector".into(),
            registry: Some(Kind::Eureka),
            ..Default::default()
        };
        r.rest.window_s = 60.0;
        r.rest.heartbeats = 120.0;
        r.restart.settle_s = 6.0;
        r.restart.last_updated_changed = Some(0);
        r.evaluate();
        let md = markdown(&r);
        assert!(md.contains("Kubernetes → Eureka"));
        assert!(md.contains("heartbeats (lease renewals"));
        assert!(md.contains("lastDirtyTimestamp"));
        assert!(!md.contains("ModifyIndex"));
        assert!(!md.contains("Agent limit"));
    }
}
