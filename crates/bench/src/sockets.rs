//! Connections a process holds to one TCP port, counted from the client side: the
//! socket inodes behind the process's descriptors (`/proc/<pid>/fd`) matched against
//! the kernel's connection tables (`/proc/net/tcp`, `/proc/net/tcp6`). This is what the
//! registry sees of the connector (Consul's per-client limit counts exactly these), and
//! it needs nothing from the connector itself, so any build can be measured.
//!
//! A [`PeakSampler`] polls the count in the background for the life of a connector,
//! since the peak (a burst of long polls right after the snapshot) lasts well under a
//! second at small N.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// TCP states that hold a connection open from the client's side (everything but
/// TIME_WAIT, CLOSE and LISTEN, which have no peer or no descriptor).
const OPEN_STATES: [&str; 8] = ["01", "02", "03", "04", "05", "08", "09", "0B"];

/// Socket inodes of `pid`'s descriptors (`socket:[INODE]` links).
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_str()?;
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// The inodes of the open connections whose remote port is `port`, from the text of a
/// `/proc/net/tcp` or `tcp6` table.
fn connections_to(table: &str, port: u16) -> Vec<u64> {
    let suffix = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            let (rem, st, inode) = (cols.get(2)?, cols.get(3)?, cols.get(9)?);
            (rem.ends_with(&suffix) && OPEN_STATES.contains(st)).then(|| inode.parse().ok())?
        })
        .collect()
}

/// Open TCP connections from `pid` to `port` on any address (0 if the process is gone).
pub fn count(pid: u32, port: u16) -> usize {
    let mine = socket_inodes(pid);
    if mine.is_empty() {
        return 0;
    }
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| connections_to(&t, port))
        .filter(|inode| mine.contains(inode))
        .count()
}

/// The highest [`count`] seen since it started, sampled every `every`.
pub struct PeakSampler {
    peak: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl PeakSampler {
    pub fn start(pid: u32, port: u16, every: Duration) -> PeakSampler {
        let peak = Arc::new(AtomicUsize::new(0));
        let p = Arc::clone(&peak);
        let task = tokio::spawn(async move {
            loop {
                // The scan reads a few files per socket: off the async threads.
                let n = tokio::task::spawn_blocking(move || count(pid, port))
                    .await
                    .unwrap_or(0);
                p.fetch_max(n, Ordering::Relaxed);
                tokio::time::sleep(every).await;
            }
        });
        PeakSampler { peak, task }
    }

    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for PeakSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_remote_port_and_open_states_only() {
        // Port 8500 = 0x2134. Rows: established to 8500, TIME_WAIT to 8500 (no inode),
        // established from 8500 (the server side: local port), established to 8501.
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
            0: 0100007F:9C40 0100007F:2134 01 00000000:00000000 00:00000000 00000000 0 0 111 1\n\
            1: 0100007F:9C41 0100007F:2134 06 00000000:00000000 00:00000000 00000000 0 0 0 1\n\
            2: 0100007F:2134 0100007F:9C42 01 00000000:00000000 00:00000000 00000000 0 0 222 1\n\
            3: 0100007F:9C43 0100007F:2135 01 00000000:00000000 00:00000000 00000000 0 0 333 1\n";
        assert_eq!(connections_to(table, 8500), vec![111]);
        assert_eq!(connections_to(table, 8501), vec![333]);
    }

    #[test]
    fn counts_own_connection_to_a_local_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(count(std::process::id(), port), 0);
        let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert_eq!(count(std::process::id(), port), 1);
    }
}
