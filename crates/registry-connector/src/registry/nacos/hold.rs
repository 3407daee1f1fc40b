//! The hold of a service that had instances and read empty (see `watch`).
//!
//! Nacos forgets its ephemeral instances when a node restarts, and a Java client
//! registers again only after its redo delay (3 s) plus the server's push delay
//! (0.5 s), more on a loaded cluster: an empty read right then is usually an artefact.
//! A hold therefore ends in a removal only after [`EMPTY_READS`] confirming reads, the
//! first half the confirmation delay after the empty read and the last one the whole
//! delay after it, all empty, and never before the grace after a (re)connection. An
//! answer with instances (a push, a confirming read) ends the hold without a removal.

use std::time::Duration;

use tokio::time::Instant;

/// Confirming reads that must all find the service empty before it is removed.
pub const EMPTY_READS: u32 = 2;

/// One held service: when its next confirming read is due, and how many found it empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    pub due: Instant,
    pub empty_reads: u32,
}

/// What an empty confirming read decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmed {
    /// Enough empty reads: remove the service.
    Remove,
    /// Read again at the hold's new due time.
    ReadAgain,
}

impl Hold {
    /// A hold starting `now`, its first read half of `delay` later (not before
    /// `holds_until`).
    pub fn start(now: Instant, delay: Duration, holds_until: Instant) -> Self {
        Self {
            due: next_read(now, delay, holds_until),
            empty_reads: 0,
        }
    }

    /// A new session began: no read before its grace has passed (the instances are
    /// being registered again on the restarted node), and the reads start over.
    pub fn restart(&mut self, holds_until: Instant) {
        self.due = self.due.max(holds_until);
        self.empty_reads = 0;
    }

    /// A confirming read found the service empty at `now`.
    pub fn read_empty(&mut self, now: Instant, delay: Duration, holds_until: Instant) -> Confirmed {
        self.empty_reads += 1;
        if self.empty_reads >= EMPTY_READS {
            return Confirmed::Remove;
        }
        self.due = next_read(now, delay, holds_until);
        Confirmed::ReadAgain
    }
}

/// Reads are spaced by half the confirmation delay: [`EMPTY_READS`] of them span it.
fn next_read(now: Instant, delay: Duration, holds_until: Instant) -> Instant {
    (now + delay / EMPTY_READS).max(holds_until)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELAY: Duration = Duration::from_secs(10);

    #[test]
    fn two_empty_reads_spanning_the_delay_remove() {
        let t0 = Instant::now();
        let mut hold = Hold::start(t0, DELAY, t0);
        assert_eq!(hold.due, t0 + Duration::from_secs(5));
        assert_eq!(hold.read_empty(hold.due, DELAY, t0), Confirmed::ReadAgain);
        assert_eq!(hold.due, t0 + DELAY);
        assert_eq!(hold.read_empty(hold.due, DELAY, t0), Confirmed::Remove);
    }

    #[test]
    fn no_read_before_the_grace() {
        let t0 = Instant::now();
        let grace_end = t0 + Duration::from_secs(30);
        let mut hold = Hold::start(t0, DELAY, grace_end);
        assert_eq!(hold.due, grace_end);
        assert_eq!(
            hold.read_empty(grace_end, DELAY, grace_end),
            Confirmed::ReadAgain
        );
        assert_eq!(hold.due, grace_end + Duration::from_secs(5));
    }

    #[test]
    fn a_reconnect_postpones_the_hold_and_starts_its_reads_over() {
        let t0 = Instant::now();
        let mut hold = Hold::start(t0, DELAY, t0);
        assert_eq!(hold.read_empty(hold.due, DELAY, t0), Confirmed::ReadAgain);
        let grace_end = t0 + Duration::from_secs(40);
        hold.restart(grace_end);
        assert_eq!(
            hold,
            Hold {
                due: grace_end,
                empty_reads: 0
            }
        );
        // A due time already beyond the grace stays.
        let mut late = Hold {
            due: grace_end + DELAY,
            empty_reads: 1,
        };
        late.restart(grace_end);
        assert_eq!(late.due, grace_end + DELAY);
    }
}
