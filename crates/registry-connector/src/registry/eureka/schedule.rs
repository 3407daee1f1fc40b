//! Which read the poll loop makes next: a delta, or the whole registry and why.
//!
//! Deltas are cheap but only cover the server's last few minutes
//! (`eureka.server.retention-time-in-m-s-in-delta-queue`, 3 minutes by default), and the
//! hash code that checks them only counts instances per status: an instance replaced by
//! another of the same status between two successful reads goes unnoticed once its
//! changes have left the delta window. So the whole registry is read again when the last
//! verified read is older than [`DELTA_WINDOW`], when a delta did not reconcile, when the
//! server refuses deltas, after a failover to another peer, while the server's own hash
//! code does not describe what it sends, and every `full_fetch_interval` as a safety net.
//! Pure state, no I/O: the loop asks [`Schedule::next_read`] and reports outcomes back.

use std::time::Duration;

use tokio::time::Instant;

use super::metrics::FullFetchReason;

/// The longest gap after which a delta is still trusted: the server's default delta
/// window (3 minutes) less its default response-cache delay (30 s) and some margin.
pub const DELTA_WINDOW: Duration = Duration::from_secs(120);

/// How long a server that refused deltas is read whole before a delta is tried again:
/// deltas may be switched back on (or the proxy that blocked them fixed) without the
/// connector being restarted.
pub const DELTA_PROBE_AFTER: Duration = Duration::from_secs(600);

/// The read to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    Delta,
    Full(FullFetchReason),
}

/// What the loop knows about its past reads.
#[derive(Debug)]
pub struct Schedule {
    full_fetch_interval: Option<Duration>,
    /// A full read asked for by the last outcome (start, hash mismatch, refused delta).
    pending: Option<FullFetchReason>,
    /// When the local copy was last known to match the server.
    last_verified: Option<Instant>,
    last_full: Option<Instant>,
    /// Since when the server, having refused a delta, served the whole registry: it
    /// has deltas switched off (or a proxy blocks them), so only full reads are made
    /// until [`DELTA_PROBE_AFTER`] has passed and a delta is tried again.
    deltas_refused_since: Option<Instant>,
    /// The last full answer's own hash code did not match the copy made from it: a delta
    /// could never be verified, so only full reads are made until one agrees.
    unverifiable: bool,
}

impl Schedule {
    /// A zero `full_fetch_interval` turns the periodic full read off.
    pub fn new(full_fetch_interval: Duration) -> Self {
        Self {
            full_fetch_interval: Some(full_fetch_interval).filter(|d| !d.is_zero()),
            pending: Some(FullFetchReason::Start),
            last_verified: None,
            last_full: None,
            deltas_refused_since: None,
            unverifiable: false,
        }
    }

    /// The read to make at `now`.
    pub fn next_read(&self, now: Instant) -> Read {
        if let Some(reason) = self.pending {
            return Read::Full(reason);
        }
        if self.unverifiable {
            return Read::Full(FullFetchReason::Unverifiable);
        }
        if let Some(since) = self.deltas_refused_since {
            if now.saturating_duration_since(since) < DELTA_PROBE_AFTER {
                return Read::Full(FullFetchReason::DeltasRefused);
            }
            // Probe: a delta answered again ends the full-read mode; a refusal renews it.
            return Read::Delta;
        }
        let older_than = |at: Option<Instant>, limit: Duration| {
            at.is_none_or(|at| now.saturating_duration_since(at) > limit)
        };
        if older_than(self.last_verified, DELTA_WINDOW) {
            return Read::Full(FullFetchReason::Gap);
        }
        if let Some(interval) = self.full_fetch_interval {
            if older_than(self.last_full, interval) {
                return Read::Full(FullFetchReason::Periodic);
            }
        }
        Read::Delta
    }

    /// The whole registry was read at `at`; `hash_agrees` tells whether the answer's
    /// own hash code matches the copy made from it.
    pub fn full_read(&mut self, reason: FullFetchReason, at: Instant, hash_agrees: bool) {
        if reason == FullFetchReason::DeltaRefused {
            self.deltas_refused_since = Some(at);
        }
        self.unverifiable = !hash_agrees;
        self.pending = None;
        self.last_verified = Some(at);
        self.last_full = Some(at);
    }

    /// A delta was applied and its hash code matched.
    pub fn delta_verified(&mut self, at: Instant) {
        self.last_verified = Some(at);
        self.deltas_refused_since = None;
    }

    /// A delta left the copy with another hash code than the server's.
    pub fn delta_mismatched(&mut self) {
        self.pending = Some(FullFetchReason::HashMismatch);
        self.deltas_refused_since = None;
    }

    /// The server refused the delta request itself (403, 404, ...): try the whole
    /// registry; if that works, deltas are taken to be off (see [`DELTA_PROBE_AFTER`]).
    pub fn delta_refused(&mut self) {
        self.pending = Some(FullFetchReason::DeltaRefused);
    }

    /// The client moved to another peer after a failure: the next read is a full one
    /// (unless one is already due for another reason).
    pub fn peer_changed(&mut self) {
        self.pending.get_or_insert(FullFetchReason::Failover);
    }

    /// Whether deltas cannot be checked against the server's hash code.
    pub fn unverifiable(&self) -> bool {
        self.unverifiable
    }

    /// A full read for `reason` failed. After a refused delta this means the server
    /// refuses everything (down, or a fresh server answering 403 during its start-up
    /// wait), which says nothing about deltas: the next read is decided afresh.
    pub fn full_read_failed(&mut self, reason: FullFetchReason) {
        if reason == FullFetchReason::DeltaRefused {
            self.pending = None;
        }
    }

    /// Whether the server is taken to have deltas off (only full reads, and a probe
    /// now and then).
    pub fn deltas_refused(&self) -> bool {
        self.deltas_refused_since.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn starts_whole_then_reads_deltas() {
        let t0 = Instant::now();
        let mut s = Schedule::new(secs(600));
        assert_eq!(s.next_read(t0), Read::Full(FullFetchReason::Start));
        s.full_read(FullFetchReason::Start, t0, true);
        assert_eq!(s.next_read(t0 + secs(5)), Read::Delta);
        s.delta_verified(t0 + secs(5));
        assert_eq!(s.next_read(t0 + secs(10)), Read::Delta);
    }

    #[test]
    fn a_mismatch_asks_for_the_whole_registry_once() {
        let t0 = Instant::now();
        let mut s = Schedule::new(Duration::ZERO);
        s.full_read(FullFetchReason::Start, t0, true);
        s.delta_mismatched();
        assert_eq!(s.next_read(t0), Read::Full(FullFetchReason::HashMismatch));
        s.full_read(FullFetchReason::HashMismatch, t0 + secs(1), true);
        assert_eq!(s.next_read(t0 + secs(2)), Read::Delta);
    }

    #[test]
    fn a_gap_longer_than_the_delta_window_reads_everything() {
        let t0 = Instant::now();
        let mut s = Schedule::new(Duration::ZERO);
        s.full_read(FullFetchReason::Start, t0, true);
        // Failed reads do not count: only verified ones move the clock.
        assert_eq!(s.next_read(t0 + DELTA_WINDOW), Read::Delta);
        assert_eq!(
            s.next_read(t0 + DELTA_WINDOW + secs(1)),
            Read::Full(FullFetchReason::Gap)
        );
    }

    #[test]
    fn the_periodic_full_read_is_a_safety_net() {
        let t0 = Instant::now();
        let mut s = Schedule::new(secs(600));
        s.full_read(FullFetchReason::Start, t0, true);
        let mut t = t0;
        while t < t0 + secs(600) {
            t += secs(5);
            s.delta_verified(t);
        }
        assert_eq!(
            s.next_read(t + secs(5)),
            Read::Full(FullFetchReason::Periodic)
        );
        assert_eq!(
            Schedule::new(Duration::ZERO).full_fetch_interval,
            None,
            "zero turns it off"
        );
    }

    #[test]
    fn a_server_refusing_everything_is_not_taken_for_one_without_deltas() {
        let t0 = Instant::now();
        let mut s = Schedule::new(Duration::ZERO);
        s.full_read(FullFetchReason::Start, t0, true);
        s.delta_refused();
        s.full_read_failed(FullFetchReason::DeltaRefused);
        assert_eq!(s.next_read(t0 + secs(5)), Read::Delta, "try deltas again");
        s.full_read(FullFetchReason::Gap, t0 + secs(200), true);
        assert!(!s.deltas_refused());
    }

    #[test]
    fn refused_deltas_switch_to_full_reads_only_after_a_full_read_works() {
        let t0 = Instant::now();
        let mut s = Schedule::new(Duration::ZERO);
        s.full_read(FullFetchReason::Start, t0, true);
        s.delta_refused();
        assert_eq!(s.next_read(t0), Read::Full(FullFetchReason::DeltaRefused));
        assert!(!s.deltas_refused());
        s.full_read(FullFetchReason::DeltaRefused, t0 + secs(1), true);
        assert!(s.deltas_refused());
        assert_eq!(
            s.next_read(t0 + secs(6)),
            Read::Full(FullFetchReason::DeltasRefused)
        );
    }

    #[test]
    fn an_answer_whose_own_hash_disagrees_makes_every_read_a_full_one() {
        let t0 = Instant::now();
        let mut s = Schedule::new(Duration::ZERO);
        s.full_read(FullFetchReason::Start, t0, false);
        assert!(s.unverifiable());
        assert_eq!(
            s.next_read(t0 + secs(5)),
            Read::Full(FullFetchReason::Unverifiable)
        );
        s.full_read(FullFetchReason::Unverifiable, t0 + secs(5), true);
        assert_eq!(s.next_read(t0 + secs(10)), Read::Delta, "agrees again");
    }

    #[test]
    fn a_failover_reads_the_new_peer_whole() {
        let t0 = Instant::now();
        let mut s = Schedule::new(Duration::ZERO);
        s.full_read(FullFetchReason::Start, t0, true);
        s.peer_changed();
        assert_eq!(s.next_read(t0), Read::Full(FullFetchReason::Failover));
        s.full_read(FullFetchReason::Failover, t0 + secs(1), true);
        assert_eq!(s.next_read(t0 + secs(2)), Read::Delta);

        // A full read already due keeps its reason.
        s.delta_mismatched();
        s.peer_changed();
        assert_eq!(s.next_read(t0), Read::Full(FullFetchReason::HashMismatch));
    }

    #[test]
    fn deltas_are_tried_again_after_a_while_of_full_reads() {
        let t0 = Instant::now();
        let mut s = Schedule::new(Duration::ZERO);
        s.full_read(FullFetchReason::Start, t0, true);
        s.delta_refused();
        s.full_read(FullFetchReason::DeltaRefused, t0, true);
        let mut t = t0;
        while t + secs(5) < t0 + DELTA_PROBE_AFTER {
            t += secs(5);
            assert_eq!(s.next_read(t), Read::Full(FullFetchReason::DeltasRefused));
            s.full_read(FullFetchReason::DeltasRefused, t, true);
        }
        let probe = t0 + DELTA_PROBE_AFTER;
        assert_eq!(s.next_read(probe), Read::Delta, "a probe");

        // Refused again: one full read for the refusal, then another full-read period.
        s.delta_refused();
        assert_eq!(
            s.next_read(probe),
            Read::Full(FullFetchReason::DeltaRefused)
        );
        s.full_read(FullFetchReason::DeltaRefused, probe, true);
        assert_eq!(
            s.next_read(probe + secs(5)),
            Read::Full(FullFetchReason::DeltasRefused)
        );

        // Answered: back to deltas for good.
        let probe = probe + DELTA_PROBE_AFTER;
        assert_eq!(s.next_read(probe), Read::Delta);
        s.delta_verified(probe);
        assert!(!s.deltas_refused());
        assert_eq!(s.next_read(probe + secs(5)), Read::Delta);
    }
}
