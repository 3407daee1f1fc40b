//! Pacing of one registry watch loop: a minimum interval between request starts, and a
//! capped exponential backoff after failures.
//!
//! Long polls (Consul's blocking queries, Nacos' and Eureka's delta polling) normally
//! pace themselves: the server holds the request until something changes. Two cases
//! break that and would turn a watcher into a busy loop against the registry: a server
//! that answers at once although nothing changed (an index that does not advance, a
//! proxy that closes the connection), and a server that fails fast (down, refusing
//! connections). The first is bounded by [`PacerConfig::min_interval`], the second by the
//! backoff. Both waits carry random jitter so that thousands of watchers that failed
//! together (a registry restart) do not retry together.
//!
//! This module owns timing only: it never decides whether an answer was a change, and it
//! knows no registry.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Timing of one watch loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacerConfig {
    /// Least time between the starts of two requests of one watcher. A change that comes
    /// after a quiet period is fetched at once; only bursts are spaced.
    pub min_interval: Duration,
    /// Delay before the first retry after a failure; doubled on each further failure.
    pub backoff_base: Duration,
    /// Longest delay between retries.
    pub backoff_max: Duration,
}

impl Default for PacerConfig {
    /// 100 ms between requests (at most 10 requests per second per watcher, far below
    /// the 1 s quiet period the sink waits for anyway), retries from 500 ms up to 30 s.
    fn default() -> Self {
        Self {
            min_interval: Duration::from_millis(100),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }
}

impl PacerConfig {
    /// The backoff before retry number `failures` (1-based), without jitter.
    pub fn backoff(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(31));
        self.backoff_base
            .saturating_mul(factor)
            .min(self.backoff_max)
    }
}

/// Runs `attempt` until it succeeds, paced by `config` (backoff with jitter between
/// failures), handing each error and the delay before the next try to `on_error`.
/// `None` when `shutdown` comes first. For the reads a source cannot go on without (the
/// first list, the first snapshot of each service, a probe of the registry).
pub async fn retry_until_ok<T, E, Fut>(
    config: PacerConfig,
    shutdown: &CancellationToken,
    mut attempt: impl FnMut() -> Fut,
    mut on_error: impl FnMut(&E, Duration),
) -> Option<T>
where
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut pacer = Pacer::new(config);
    loop {
        if !pacer.ready(shutdown).await {
            return None;
        }
        let result = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            r = attempt() => r,
        };
        match result {
            Ok(value) => return Some(value),
            Err(e) => {
                let delay = pacer.failed();
                on_error(&e, delay);
            }
        }
    }
}

/// The state of one watch loop's pacing. Call [`Pacer::ready`] before each request and
/// [`Pacer::succeeded`] or [`Pacer::failed`] after it.
#[derive(Debug)]
pub struct Pacer {
    config: PacerConfig,
    last_start: Option<Instant>,
    failures: u32,
    not_before: Option<Instant>,
}

impl Pacer {
    pub fn new(config: PacerConfig) -> Self {
        Self {
            config,
            last_start: None,
            failures: 0,
            not_before: None,
        }
    }

    /// Waits until the next request may start, then records its start. Returns `false`
    /// (without waiting further) when `shutdown` is cancelled first.
    pub async fn ready(&mut self, shutdown: &CancellationToken) -> bool {
        if shutdown.is_cancelled() {
            return false;
        }
        let now = Instant::now();
        let delay = self.delay_at(now, rand::random::<f64>());
        if !delay.is_zero() {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.last_start = Some(Instant::now());
        true
    }

    /// Records that a request started at `at`, for callers that wait on their own
    /// timers instead of [`Pacer::ready`].
    pub fn started_at(&mut self, at: Instant) {
        self.last_start = Some(at);
    }

    /// How long a request wanting to start at `now` must wait. `jitter` is a number in
    /// `[0, 1)`; pacing waits get up to half a `min_interval` more, so that watchers
    /// woken together by one registry write spread out.
    pub fn delay_at(&self, now: Instant, jitter: f64) -> Duration {
        let jitter = jitter.clamp(0.0, 1.0);
        let pace = self
            .last_start
            .map(|start| (start + self.config.min_interval).saturating_duration_since(now))
            .unwrap_or(Duration::ZERO);
        let pace = if pace.is_zero() {
            pace
        } else {
            pace + self.config.min_interval.mul_f64(jitter / 2.0)
        };
        let backoff = self
            .not_before
            .map(|t| t.saturating_duration_since(now))
            .unwrap_or(Duration::ZERO);
        pace.max(backoff)
    }

    /// The last request succeeded: the next failure starts from the base delay again.
    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.not_before = None;
    }

    /// The last request failed: the next one waits the backoff. Returns that delay (for
    /// the log line).
    pub fn failed(&mut self) -> Duration {
        self.failed_at(Instant::now(), rand::random::<f64>())
    }

    /// [`Pacer::failed`] with an explicit clock and jitter in `[0, 1)`: the delay is drawn
    /// from `[backoff / 2, backoff)`, which keeps the exponential growth while spreading
    /// retries over half the interval.
    pub fn failed_at(&mut self, now: Instant, jitter: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let full = self.config.backoff(self.failures);
        let delay = full / 2 + full.mul_f64(jitter.clamp(0.0, 1.0) / 2.0);
        self.not_before = Some(now + delay);
        delay
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PacerConfig {
        PacerConfig {
            min_interval: Duration::from_millis(100),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let c = cfg();
        assert_eq!(c.backoff(0), Duration::ZERO);
        assert_eq!(c.backoff(1), Duration::from_millis(500));
        assert_eq!(c.backoff(2), Duration::from_secs(1));
        assert_eq!(c.backoff(3), Duration::from_secs(2));
        assert_eq!(c.backoff(7), Duration::from_secs(30));
        assert_eq!(c.backoff(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn first_request_goes_at_once() {
        let p = Pacer::new(cfg());
        assert_eq!(p.delay_at(Instant::now(), 0.9), Duration::ZERO);
    }

    #[test]
    fn requests_are_spaced_by_the_min_interval_plus_jitter() {
        let mut p = Pacer::new(cfg());
        let t0 = Instant::now();
        p.last_start = Some(t0);
        // Right after a start: the whole interval, plus up to half of it as jitter.
        assert_eq!(p.delay_at(t0, 0.0), Duration::from_millis(100));
        assert_eq!(p.delay_at(t0, 0.5), Duration::from_millis(125));
        assert_eq!(
            p.delay_at(t0 + Duration::from_millis(60), 0.0),
            Duration::from_millis(40)
        );
        // A long poll that lasted longer than the interval costs no wait at all.
        assert_eq!(p.delay_at(t0 + Duration::from_secs(5), 0.9), Duration::ZERO);
    }

    #[test]
    fn failures_back_off_with_jitter_and_success_resets() {
        let mut p = Pacer::new(cfg());
        let t0 = Instant::now();
        let d1 = p.failed_at(t0, 0.0);
        assert_eq!(d1, Duration::from_millis(250));
        assert_eq!(p.delay_at(t0, 0.0), d1);
        let d2 = p.failed_at(t0, 0.999);
        assert!(
            d2 >= Duration::from_millis(500) && d2 < Duration::from_secs(1),
            "{d2:?}"
        );
        for _ in 0..20 {
            p.failed_at(t0, 1.0);
        }
        assert_eq!(p.delay_at(t0, 0.0), Duration::from_secs(30));
        assert_eq!(p.failures(), 22);
        p.succeeded();
        assert_eq!(p.failures(), 0);
        assert_eq!(p.delay_at(t0, 0.0), Duration::ZERO);
        assert_eq!(p.failed_at(t0, 0.0), Duration::from_millis(250));
    }

    #[tokio::test]
    async fn ready_returns_false_on_shutdown() {
        let mut p = Pacer::new(PacerConfig {
            backoff_base: Duration::from_secs(3600),
            backoff_max: Duration::from_secs(3600),
            ..cfg()
        });
        p.failed();
        let token = CancellationToken::new();
        let waiter = token.clone();
        let handle = tokio::spawn(async move { p.ready(&waiter).await });
        token.cancel();
        assert!(!handle.await.expect("task"));
    }
}
