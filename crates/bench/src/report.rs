//! The Markdown report printed on stdout: one table of figures per workload, then the
//! targets. Registry-neutral; rows that only mean something for Eureka (whole-registry
//! reads, the delta the server hands out) appear when there is something to show.

use std::collections::BTreeMap;

use crate::registry::Kind;
use crate::results::{ms, Requests, Results};

fn ms_opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0}"))
        .unwrap_or_else(|| "not landed".into())
}

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

/// Requests by endpoint and whole-registry reads, as one cell.
fn request_detail(r: &Requests) -> String {
    format!(
        "by endpoint: {}; full reads: {}",
        counts(&r.by_endpoint),
        counts(&r.full_fetches)
    )
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
    let name = r.registry.name();
    s.push_str(&format!(
        "### {name}, `{}` profile, {} (N = {}, M = {}, K = {}, steady state {:.0} s{})\n\n",
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
    if p.read_delay_ms > 0 {
        let what = match r.registry {
            Kind::Nacos => "Nacos push delay (the server's default)",
            _ => "Eureka poll interval",
        };
        s.push_str(&format!(
            "{what} {} ms: a change waits up to that long in the server before the connector reads it, on top of the quiet period.\n\n",
            p.read_delay_ms
        ));
    }
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
        &format!("{name} load ({})", r.registry_load_api),
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
            "{:.0} ({:.0} / {:.0} / {:.0}), {:.0}{}",
            i.writes,
            i.writes_by_kind[0],
            i.writes_by_kind[1],
            i.writes_by_kind[2],
            i.writes_failed,
            if i.failed_writes.is_empty() {
                String::new()
            } else {
                format!(" ({})", counts(&i.failed_writes))
            }
        ),
    );
    row(
        &mut s,
        "2 initial sync",
        &format!("{name} requests (failed), connector CPU, peak RSS"),
        format!(
            "{:.0} ({:.0}), {:.2} s, {:.1} MiB",
            i.requests.total, i.requests.failed, i.cpu_s, i.peak_rss_mib
        ),
    );
    row(
        &mut s,
        "2 initial sync",
        &format!("TCP connections to {name} at the end of the sync"),
        i.connections.to_string(),
    );
    if !i.requests.full_fetches.is_empty() {
        row(
            &mut s,
            "2 initial sync",
            &format!("{name} requests in detail"),
            request_detail(&i.requests),
        );
    }
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
        &format!("restart on the synced namespace: ready, writes, {name} requests"),
        format!(
            "{:.2} s, {:.0} writes, {:.0} requests",
            r.restart.ready_s, r.restart.writes, r.restart.requests.total
        ),
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
        if let Some(gap) = pr.first_change_after_sync_s {
            row(
                &mut s,
                "3 propagation",
                &format!(
                    "quiet {} ms: first change after the end of the initial sync",
                    pr.quiet_ms
                ),
                format!("{gap:.2} s (no warm-up excluded)"),
            );
        }
        row(
            &mut s,
            "3 propagation",
            &format!(
                "quiet {} ms: writes, {name} requests per change",
                pr.quiet_ms
            ),
            format!(
                "{:.2}, {:.2}",
                pr.writes_per_landed_change, pr.requests_per_change
            ),
        );
        if let Some(d) = pr.delta_instances_at_start {
            row(
                &mut s,
                "3 propagation",
                &format!(
                    "quiet {} ms: {name} requests in detail; instances in the server's delta at the start",
                    pr.quiet_ms
                ),
                format!("{}; {d}", request_detail(&pr.requests)),
            );
        }
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
                "N={}: {name} requests per change, raw / net of idle background",
                c.n
            ),
            format!(
                "{:.2} / {:.2} (idle {:.2}/s)",
                c.requests_per_change_raw, c.requests_per_change_net, c.requests_idle_per_s
            ),
        );
        if let Some(d) = c.delta_instances_at_start {
            row(
                &mut s,
                "4 cost per change",
                &format!(
                    "N={}: full reads per change; requests in detail; instances in the delta at the start",
                    c.n
                ),
                format!(
                    "{:.2}; {}; {d}",
                    c.full_fetches_per_change,
                    request_detail(&c.requests)
                ),
            );
        }
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
        &format!("{name} requests per minute (failed in the window)"),
        format!("{:.1} ({:.0})", st.requests_per_min, st.requests.failed),
    );
    if r.registry == crate::registry::Kind::Eureka {
        row(
            &mut s,
            "5 steady state",
            &format!("{name} requests in detail"),
            request_detail(&st.requests),
        );
    }
    row(
        &mut s,
        "5 steady state",
        "CPU seconds in the window (per minute; % of a core)",
        format!(
            "{:.2} ({:.3}; {:.2} %)",
            st.cpu_s,
            st.cpu_s / (st.window_s / 60.0),
            st.cpu_pct
        ),
    );
    row(
        &mut s,
        "5 steady state",
        &format!("TCP connections to {name} at rest / most over the process's life"),
        format!("{} / {}", st.connections, st.connections_peak),
    );
    row(
        &mut s,
        "5 steady state",
        "RSS now / peak (VmHWM)",
        format!("{:.1} / {:.1} MiB", st.rss_mib, st.peak_rss_mib),
    );
    let top = |m: &BTreeMap<String, f64>| {
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
