//! What the harness reads about the machine it runs on: the machine itself (recorded
//! with the results, since absolute times depend on it), a process's CPU time and
//! memory, and the loopback's packet-loss counters. All from `/proc`.

use anyhow::{Context, Result};
use serde::Serialize;

/// The machine, as recorded with the results.
#[derive(Debug, Default, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub mem_total_mib: u64,
    pub kernel: String,
    pub load_avg_at_start: String,
}

impl Machine {
    pub fn read() -> Machine {
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

/// The current UTC time formatted by `date -u <fmt>` ("unknown" if that fails).
pub fn utc_stamp(fmt: &str) -> String {
    std::process::Command::new("date")
        .args(["-u", fmt])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// CPU and memory of a process, from `/proc/<pid>/stat` and `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcStats {
    /// User + system CPU seconds since the process started.
    pub cpu_seconds: f64,
    /// Current resident set (VmRSS), MiB.
    pub rss_mib: f64,
    /// Peak resident set (VmHWM), MiB.
    pub peak_rss_mib: f64,
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// Reads CPU seconds and memory of `pid`.
pub fn proc_stats(pid: u32) -> Result<ProcStats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command (which may contain spaces) start at field 3 (state).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/pid/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, so 11 and 12 of `rest`
    // (0-based; `rest` starts at field 3).
    let utime: f64 = fields.get(11).context("utime")?.parse()?;
    let stime: f64 = fields.get(12).context("stime")?.parse()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib = |key: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok(ProcStats {
        cpu_seconds: (utime + stime) / clock_ticks(),
        rss_mib: kib("VmRSS:") / 1024.0,
        peak_rss_mib: kib("VmHWM:") / 1024.0,
    })
}

/// Loopback packet loss counters of this network namespace: packets dropped from the
/// per-CPU input backlog (`/proc/net/softnet_stat`, second column, summed over CPUs)
/// and TCP retransmission timeouts (`TcpExtTCPTimeouts` in `/proc/net/netstat`).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct NetCounters {
    pub backlog_drops: u64,
    pub tcp_timeouts: u64,
}

impl NetCounters {
    pub fn read() -> NetCounters {
        let backlog_drops = std::fs::read_to_string("/proc/net/softnet_stat")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter_map(|v| u64::from_str_radix(v, 16).ok())
            .sum();
        let netstat = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
        let lines: Vec<&str> = netstat.lines().collect();
        let mut tcp_timeouts = 0;
        for pair in lines.chunks(2) {
            if let [head, vals] = pair {
                if head.starts_with("TcpExt:") {
                    let h: Vec<&str> = head.split_whitespace().collect();
                    let v: Vec<&str> = vals.split_whitespace().collect();
                    if let Some(i) = h.iter().position(|k| *k == "TCPTimeouts") {
                        tcp_timeouts = v.get(i).and_then(|x| x.parse().ok()).unwrap_or(0);
                    }
                }
            }
        }
        NetCounters {
            backlog_drops,
            tcp_timeouts,
        }
    }

    pub fn since(&self, earlier: &NetCounters) -> NetCounters {
        NetCounters {
            backlog_drops: self.backlog_drops.saturating_sub(earlier.backlog_drops),
            tcp_timeouts: self.tcp_timeouts.saturating_sub(earlier.tcp_timeouts),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_proc_stats() {
        let s = proc_stats(std::process::id()).expect("own stats");
        assert!(s.peak_rss_mib > 0.0 && s.peak_rss_mib >= s.rss_mib * 0.5);
        assert!(s.cpu_seconds >= 0.0);
    }
}
