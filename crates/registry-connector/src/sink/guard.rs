//! The mass-deletion guard.
//!
//! A registry that suddenly answers "no services" (an ACL token revoked, the wrong
//! datacenter, a restarted server that lost its state) must not wipe the namespace.
//! When applying the registry's view would delete more than a share of the managed
//! services, or all of them, the deletions are held and reported instead. They go ahead
//! once the hold has lasted the hold time, or when the operator allows them; they are
//! forgotten when the registry's view has recovered completely. A partial recovery does
//! not end the hold: a restarted registry fills up again over its clients' heartbeat
//! period, and releasing the hold as soon as the missing share drops below the threshold
//! would delete the services whose instances happen to register last.

use std::time::Duration;

use tokio::time::Instant;

/// Guard settings.
#[derive(Debug, Clone, Copy)]
pub struct GuardPolicy {
    /// Largest share (0.0..=1.0) of the managed services one view may delete unheld.
    pub max_delete_ratio: f64,
    /// How long a held deletion must persist before it is applied anyway; `None` holds
    /// until the operator allows it.
    pub hold_for: Option<Duration>,
}

impl Default for GuardPolicy {
    fn default() -> Self {
        Self {
            max_delete_ratio: 0.5,
            hold_for: Some(Duration::from_secs(600)),
        }
    }
}

/// What to do with the deletions of one evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardDecision {
    /// Delete.
    Proceed,
    /// Do not delete yet; re-evaluate no later than `recheck_at`.
    Hold { since: Instant, recheck_at: Instant },
}

/// The guard's memory: when the current hold started and whether the operator allowed it.
#[derive(Debug)]
pub struct DeletionGuard {
    policy: GuardPolicy,
    held_since: Option<Instant>,
    allowed: bool,
}

/// How often a hold is re-evaluated when it has no expiry of its own.
const RECHECK: Duration = Duration::from_secs(5);

impl DeletionGuard {
    pub fn new(policy: GuardPolicy) -> Self {
        Self {
            policy,
            held_since: None,
            allowed: false,
        }
    }

    /// The operator allows the currently held deletions (and only those: a later,
    /// separate mass deletion is held again).
    pub fn allow(&mut self) {
        if self.held_since.is_some() {
            self.allowed = true;
        }
    }

    /// Whether deletions are being held right now.
    pub fn is_holding(&self) -> bool {
        self.held_since.is_some() && !self.allowed
    }

    /// Decides about deleting `orphans` of the `managed` services this connector owns.
    pub fn evaluate(&mut self, managed: usize, orphans: usize, now: Instant) -> GuardDecision {
        let recovered = orphans == 0 || managed == 0;
        if recovered || (self.held_since.is_none() && !self.is_mass_deletion(managed, orphans)) {
            self.held_since = None;
            self.allowed = false;
            return GuardDecision::Proceed;
        }
        let since = *self.held_since.get_or_insert(now);
        if self.allowed {
            return GuardDecision::Proceed;
        }
        match self.policy.hold_for {
            Some(hold) if now >= since + hold => GuardDecision::Proceed,
            Some(hold) => GuardDecision::Hold {
                since,
                recheck_at: (since + hold).min(now + RECHECK),
            },
            None => GuardDecision::Hold {
                since,
                recheck_at: now + RECHECK,
            },
        }
    }

    fn is_mass_deletion(&self, managed: usize, orphans: usize) -> bool {
        if orphans == 0 || managed == 0 {
            return false;
        }
        orphans >= managed || (orphans as f64) > self.policy.max_delete_ratio * managed as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(ratio: f64, hold: Option<u64>) -> DeletionGuard {
        DeletionGuard::new(GuardPolicy {
            max_delete_ratio: ratio,
            hold_for: hold.map(Duration::from_secs),
        })
    }

    #[test]
    fn small_deletions_proceed() {
        let mut g = guard(0.5, Some(60));
        let now = Instant::now();
        assert_eq!(g.evaluate(10, 5, now), GuardDecision::Proceed);
        assert_eq!(g.evaluate(10, 0, now), GuardDecision::Proceed);
        assert!(!g.is_holding());
    }

    #[test]
    fn deleting_everything_is_always_held() {
        let mut g = guard(1.0, Some(60));
        let now = Instant::now();
        assert!(matches!(g.evaluate(1, 1, now), GuardDecision::Hold { .. }));
        assert!(g.is_holding());
    }

    #[test]
    fn more_than_the_ratio_is_held_until_the_hold_time_passes() {
        let mut g = guard(0.5, Some(60));
        let t0 = Instant::now();
        match g.evaluate(10, 6, t0) {
            GuardDecision::Hold { since, recheck_at } => {
                assert_eq!(since, t0);
                assert_eq!(recheck_at, t0 + RECHECK);
            }
            other => panic!("expected hold, got {other:?}"),
        }
        assert!(matches!(
            g.evaluate(10, 6, t0 + Duration::from_secs(59)),
            GuardDecision::Hold { .. }
        ));
        assert_eq!(
            g.evaluate(10, 6, t0 + Duration::from_secs(60)),
            GuardDecision::Proceed
        );
    }

    #[test]
    fn recovery_clears_the_hold_and_a_new_mass_deletion_starts_over() {
        let mut g = guard(0.5, Some(60));
        let t0 = Instant::now();
        g.evaluate(10, 10, t0);
        assert_eq!(
            g.evaluate(10, 0, t0 + Duration::from_secs(30)),
            GuardDecision::Proceed
        );
        let t1 = t0 + Duration::from_secs(61);
        assert!(matches!(
            g.evaluate(10, 10, t1),
            GuardDecision::Hold { since, .. } if since == t1
        ));
    }

    #[test]
    fn a_partial_recovery_keeps_the_hold_until_the_hold_time() {
        let mut g = guard(0.5, Some(60));
        let t0 = Instant::now();
        assert!(matches!(g.evaluate(10, 10, t0), GuardDecision::Hold { .. }));
        // Eight services came back: two missing is under the ratio, but the registry may
        // still be filling up after a restart.
        assert!(matches!(
            g.evaluate(10, 2, t0 + Duration::from_secs(20)),
            GuardDecision::Hold { since, .. } if since == t0
        ));
        assert_eq!(
            g.evaluate(10, 2, t0 + Duration::from_secs(60)),
            GuardDecision::Proceed,
            "still missing after the hold time: really gone"
        );
    }

    #[test]
    fn the_operator_can_allow_a_held_deletion_once() {
        let mut g = guard(0.5, None);
        let t0 = Instant::now();
        assert!(matches!(g.evaluate(4, 4, t0), GuardDecision::Hold { .. }));
        g.allow();
        assert_eq!(g.evaluate(4, 4, t0), GuardDecision::Proceed);
        assert_eq!(g.evaluate(0, 0, t0), GuardDecision::Proceed);
        assert!(matches!(g.evaluate(4, 4, t0), GuardDecision::Hold { .. }));
    }

    #[test]
    fn allowing_without_a_hold_does_nothing() {
        let mut g = guard(0.5, None);
        g.allow();
        assert!(matches!(
            g.evaluate(2, 2, Instant::now()),
            GuardDecision::Hold { .. }
        ));
    }
}
