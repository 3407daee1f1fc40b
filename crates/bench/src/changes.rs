//! Single-instance registry changes (add, remove, readiness flip) made one at a time at
//! random intervals, each timed from the registry write to the watch event that shows
//! the expected EndpointSlice content. Registry-neutral: what a change is in Consul or
//! Eureka terms is [`Registry`]'s business.
//!
//! A change that has not shown up after `land_wait` is left pending (its expectation
//! stays registered and is still timed when it lands) and the next change goes to
//! another service, so one slow change cannot stall the run; the phase ends when every
//! change has landed or `final_wait` after the last one has passed. Changes that never
//! landed are reported as such, never dropped from the percentiles. With a `bound`, a
//! change that took longer counts as not landed too (its real latency stays in the
//! timeline): a connector that misses changes for minutes then costs the run at most
//! the bound after the last change, whatever N.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::Rng;
use serde::Serialize;

use crate::model::Service;
use crate::registry::Registry;
use crate::tracker::Tracker;

/// Most instances a service may grow to through `add` changes.
const MAX_INSTANCES: usize = 12;

#[derive(Debug, Clone)]
pub struct ChangeOpts {
    pub count: usize,
    pub min_gap: Duration,
    pub max_gap: Duration,
    /// An extra uniform wait in `0..phase_jitter` after each change. A change is made
    /// once the previous one has landed, and against a polling registry (Eureka) a
    /// landing comes right after a poll: without this, every change would hit the same
    /// point of the poll cycle. With a jitter of one poll interval the point is uniform.
    pub phase_jitter: Duration,
    pub land_wait: Duration,
    pub final_wait: Duration,
    /// Longest latency that counts as landed (`None`: whatever landed by the end).
    pub bound: Option<Duration>,
}

/// One kind of change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A new ready instance registers.
    Add,
    /// A ready instance leaves (Consul deregistration, Eureka cancel).
    Remove,
    /// A ready instance stops being ready (Consul check critical, Eureka
    /// `OUT_OF_SERVICE`): with the default `--passing-only` it leaves the slice.
    FlipToNotReady,
    /// A not-ready instance is ready again.
    FlipToReady,
}

/// The change to make to `svc`, from a uniform draw `choice` in 0..3 (add, remove,
/// flip) and a uniformly drawn instance `flip_target`. A service keeps at least one
/// ready instance (so it keeps its slice) and at most [`MAX_INSTANCES`]; a flip turns
/// the drawn instance back to ready only when it is not ready, so with many services
/// nearly every flip is ready → not ready.
pub fn choose_kind(svc: &Service, choice: u8, flip_target: usize) -> Kind {
    match choice {
        1 if svc.ready_count() >= 2 => Kind::Remove,
        2 if !svc.instances[flip_target].ready => Kind::FlipToReady,
        2 if svc.ready_count() >= 2 => Kind::FlipToNotReady,
        _ if svc.instances.len() < MAX_INSTANCES => Kind::Add,
        _ if svc.ready_count() >= 2 => Kind::Remove,
        _ => Kind::FlipToReady,
    }
}

/// What a change phase measured.
#[derive(Debug, Clone, Serialize)]
pub struct ChangeRun {
    pub changes: usize,
    pub landed: usize,
    pub not_landed: usize,
    /// Latencies in ms of the changes that landed, in the order they were made.
    pub latencies_ms: Vec<f64>,
    pub kinds: Vec<Kind>,
    /// Wall time from the first change to the end of the phase.
    pub elapsed_s: f64,
    /// How long an unlanded change was given at least (final_wait, or the bound), seconds.
    pub final_wait_s: f64,
    /// Changes that landed, but later than the bound (counted in `not_landed`).
    pub landed_after_bound: usize,
    /// Mean duration of the registry write itself (part of every latency), ms.
    pub registry_write_ms: f64,
    /// Per change, in the order made: seconds since the connector started, and the
    /// latency in ms (null: not landed within the phase).
    pub timeline: Vec<(f64, Option<f64>)>,
}

/// Percentile over all changes, unlanded ones counted as +infinity: `None` when the
/// percentile falls among them.
pub fn percentile(run: &ChangeRun, p: f64) -> Option<f64> {
    let mut v = run.latencies_ms.clone();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = run.changes;
    if n == 0 {
        return None;
    }
    // Nearest-rank.
    let rank = ((p / 100.0) * n as f64).ceil().max(1.0) as usize;
    v.get(rank - 1).copied()
}

pub fn max(run: &ChangeRun) -> Option<f64> {
    if run.not_landed > 0 {
        None
    } else {
        run.latencies_ms.iter().copied().reduce(f64::max)
    }
}

fn pick_service(services: &[Service], tracker: &Tracker, rng: &mut StdRng) -> usize {
    for _ in 0..1000 {
        let i = rng.random_range(0..services.len());
        if !tracker.is_open(&services[i].name) {
            return i;
        }
    }
    rng.random_range(0..services.len())
}

/// The wait after a change: uniform in `min_gap..=max_gap`, plus the phase jitter.
fn gap(opts: &ChangeOpts, rng: &mut StdRng) -> Duration {
    let base = rng.random_range(opts.min_gap..=opts.max_gap);
    if opts.phase_jitter.is_zero() {
        return base;
    }
    base + rng.random_range(Duration::ZERO..opts.phase_jitter)
}

/// Makes `opts.count` changes to random `services`, keeping the model in `services` up to date.
pub async fn run(
    registry: &Registry,
    tracker: &Tracker,
    services: &mut [Service],
    opts: &ChangeOpts,
    rng: &mut StdRng,
    connector_started: Instant,
) -> Result<ChangeRun> {
    let started = Instant::now();
    let mut made: Vec<(u64, Instant, Kind)> = Vec::with_capacity(opts.count);
    let mut write_time = Duration::ZERO;
    for _ in 0..opts.count {
        let si = pick_service(services, tracker, rng);
        let svc = &mut services[si];
        let choice = rng.random_range(0..3u8);
        let flip_target = rng.random_range(0..svc.instances.len());
        let kind = choose_kind(svc, choice, flip_target);
        // Apply to the model first, register the expectation, then write the registry.
        let t0;
        let id;
        match kind {
            Kind::Add => {
                let inst = svc.add_instance();
                id = tracker.expect(&svc.name, svc.ready_addresses());
                t0 = Instant::now();
                registry.add(svc, &inst).await?;
            }
            Kind::Remove => {
                let ready: Vec<usize> = (0..svc.instances.len())
                    .filter(|&i| svc.instances[i].ready)
                    .collect();
                let victim = ready[rng.random_range(0..ready.len())];
                let inst = svc.instances.remove(victim);
                id = tracker.expect(&svc.name, svc.ready_addresses());
                t0 = Instant::now();
                registry.remove(svc, &inst).await?;
            }
            Kind::FlipToNotReady | Kind::FlipToReady => {
                let target = if kind == Kind::FlipToReady {
                    (0..svc.instances.len())
                        .find(|&i| !svc.instances[i].ready)
                        .context("no not-ready instance to flip")?
                } else {
                    flip_target
                };
                let ready = kind == Kind::FlipToReady;
                svc.instances[target].ready = ready;
                id = tracker.expect(&svc.name, svc.ready_addresses());
                t0 = Instant::now();
                registry
                    .set_ready(svc, &svc.instances[target], ready)
                    .await?;
            }
        }
        write_time += t0.elapsed();
        made.push((id, t0, kind));
        tracker
            .wait_until(t0 + opts.land_wait, |t| t.met(id).is_some())
            .await;
        tokio::time::sleep(gap(opts, rng)).await;
    }
    let ids: Vec<u64> = made.iter().map(|m| m.0).collect();
    let final_wait = opts
        .bound
        .map_or(opts.final_wait, |b| b.min(opts.final_wait));
    tracker
        .wait_until(Instant::now() + final_wait, |t| {
            ids.iter().all(|id| t.met(*id).is_some())
        })
        .await;
    let bound_ms = opts.bound.map(|b| b.as_secs_f64() * 1000.0);
    let mut latencies = Vec::new();
    let mut landed_after_bound = 0;
    for (id, t0, _) in &made {
        if let Some(at) = tracker.met(*id) {
            let ms = at.saturating_duration_since(*t0).as_secs_f64() * 1000.0;
            if bound_ms.is_some_and(|b| ms > b) {
                landed_after_bound += 1;
            } else {
                latencies.push(ms);
            }
        }
    }
    let timeline = made
        .iter()
        .map(|(id, t0, _)| {
            (
                t0.saturating_duration_since(connector_started)
                    .as_secs_f64(),
                tracker
                    .met(*id)
                    .map(|at| at.saturating_duration_since(*t0).as_secs_f64() * 1000.0),
            )
        })
        .collect();
    let landed = latencies.len();
    Ok(ChangeRun {
        changes: made.len(),
        landed,
        not_landed: made.len() - landed,
        latencies_ms: latencies,
        kinds: made.iter().map(|m| m.2).collect(),
        elapsed_s: started.elapsed().as_secs_f64(),
        final_wait_s: final_wait.as_secs_f64(),
        landed_after_bound,
        registry_write_ms: if made.is_empty() {
            0.0
        } else {
            write_time.as_secs_f64() * 1000.0 / made.len() as f64
        },
        timeline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(latencies: &[f64], changes: usize) -> ChangeRun {
        ChangeRun {
            changes,
            landed: latencies.len(),
            not_landed: changes - latencies.len(),
            latencies_ms: latencies.to_vec(),
            kinds: Vec::new(),
            elapsed_s: 0.0,
            final_wait_s: 0.0,
            landed_after_bound: 0,
            registry_write_ms: 0.0,
            timeline: Vec::new(),
        }
    }

    #[test]
    fn unlanded_changes_count_as_infinitely_slow() {
        let r = run_of(&[30.0, 10.0, 20.0], 4);
        assert_eq!(percentile(&r, 50.0), Some(20.0));
        assert_eq!(percentile(&r, 75.0), Some(30.0));
        assert_eq!(percentile(&r, 99.0), None);
        assert_eq!(max(&r), None);
        assert_eq!(max(&run_of(&[30.0, 10.0], 2)), Some(30.0));
        assert_eq!(percentile(&run_of(&[], 0), 50.0), None);
    }

    #[test]
    fn gaps_stay_in_range_with_and_without_jitter() {
        use rand::SeedableRng;
        let mut rng = StdRng::seed_from_u64(7);
        let mut opts = ChangeOpts {
            count: 0,
            min_gap: Duration::from_millis(50),
            max_gap: Duration::from_millis(300),
            phase_jitter: Duration::ZERO,
            land_wait: Duration::ZERO,
            final_wait: Duration::ZERO,
            bound: None,
        };
        for _ in 0..200 {
            let g = gap(&opts, &mut rng);
            assert!(g >= opts.min_gap && g <= opts.max_gap);
        }
        opts.phase_jitter = Duration::from_secs(1);
        let gaps: Vec<Duration> = (0..200).map(|_| gap(&opts, &mut rng)).collect();
        assert!(gaps
            .iter()
            .all(|g| *g >= opts.min_gap && *g < Duration::from_millis(1300)));
        assert!(gaps.iter().any(|g| *g > Duration::from_millis(800)));
    }

    #[test]
    fn a_service_keeps_a_ready_instance_and_a_bounded_size() {
        let mut s = Service::new("a".into(), "set".into(), 1);
        // One ready instance: no remove, no flip to not ready.
        assert_eq!(choose_kind(&s, 1, 0), Kind::Add);
        assert_eq!(choose_kind(&s, 2, 0), Kind::Add);
        s.add_instance();
        assert_eq!(choose_kind(&s, 1, 0), Kind::Remove);
        assert_eq!(choose_kind(&s, 2, 1), Kind::FlipToNotReady);
        s.instances[1].ready = false;
        assert_eq!(choose_kind(&s, 2, 1), Kind::FlipToReady);
        assert_eq!(choose_kind(&s, 2, 0), Kind::Add);
        while s.instances.len() < MAX_INSTANCES {
            s.add_instance();
        }
        assert_eq!(choose_kind(&s, 0, 0), Kind::Remove);
    }
}
