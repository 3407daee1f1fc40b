//! Single-instance registry changes (add, remove, health flip) made one at a time at
//! random intervals, each timed from the registry write to the watch event that shows
//! the expected EndpointSlice content.
//!
//! A change that has not shown up after `land_wait` is left pending (its expectation
//! stays registered and is still timed when it lands) and the next change goes to
//! another service, so one slow change cannot stall the run; the phase ends when every
//! change has landed or `final_wait` after the last one has passed. Changes that never
//! landed are reported as such, never dropped from the percentiles.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::Rng;
use serde::Serialize;

use crate::consul::{Registry, Service};
use crate::tracker::Tracker;

/// Most instances a service may grow to through `add` changes.
const MAX_INSTANCES: usize = 12;

#[derive(Debug, Clone)]
pub struct ChangeOpts {
    pub count: usize,
    pub min_gap: Duration,
    pub max_gap: Duration,
    pub land_wait: Duration,
    pub final_wait: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Add,
    Remove,
    FlipToCritical,
    FlipToPassing,
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
    /// How long an unlanded change was given at least (final_wait), seconds.
    pub final_wait_s: f64,
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
        let kind = match choice {
            1 if svc.passing_count() >= 2 => Kind::Remove,
            2 if !svc.instances[flip_target].passing => Kind::FlipToPassing,
            2 if svc.passing_count() >= 2 => Kind::FlipToCritical,
            _ if svc.instances.len() < MAX_INSTANCES => Kind::Add,
            _ if svc.passing_count() >= 2 => Kind::Remove,
            _ => Kind::FlipToPassing,
        };
        // Apply to the model first, register the expectation, then write the registry.
        let t0;
        let id;
        match kind {
            Kind::Add => {
                let inst = svc.make_instance();
                svc.instances.push(inst.clone());
                id = tracker.expect(&svc.name, svc.ready_addresses());
                t0 = Instant::now();
                registry.register(svc, &inst).await?;
            }
            Kind::Remove => {
                let passing: Vec<usize> = (0..svc.instances.len())
                    .filter(|&i| svc.instances[i].passing)
                    .collect();
                let victim = passing[rng.random_range(0..passing.len())];
                let inst = svc.instances.remove(victim);
                id = tracker.expect(&svc.name, svc.ready_addresses());
                t0 = Instant::now();
                registry.deregister(svc, &inst).await?;
            }
            Kind::FlipToCritical | Kind::FlipToPassing => {
                let target = if kind == Kind::FlipToPassing {
                    (0..svc.instances.len())
                        .find(|&i| !svc.instances[i].passing)
                        .context("no critical instance to flip")?
                } else {
                    flip_target
                };
                let passing = kind == Kind::FlipToPassing;
                svc.instances[target].passing = passing;
                id = tracker.expect(&svc.name, svc.ready_addresses());
                t0 = Instant::now();
                registry
                    .set_health(svc, &svc.instances[target], passing)
                    .await?;
            }
        }
        write_time += t0.elapsed();
        made.push((id, t0, kind));
        tracker
            .wait_until(t0 + opts.land_wait, |t| t.met(id).is_some())
            .await;
        let gap = rng.random_range(opts.min_gap..=opts.max_gap);
        tokio::time::sleep(gap).await;
    }
    let ids: Vec<u64> = made.iter().map(|m| m.0).collect();
    tracker
        .wait_until(Instant::now() + opts.final_wait, |t| {
            ids.iter().all(|id| t.met(*id).is_some())
        })
        .await;
    let mut latencies = Vec::new();
    for (id, t0, _) in &made {
        if let Some(at) = tracker.met(*id) {
            latencies.push(at.saturating_duration_since(*t0).as_secs_f64() * 1000.0);
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
        final_wait_s: opts.final_wait.as_secs_f64(),
        registry_write_ms: if made.is_empty() {
            0.0
        } else {
            write_time.as_secs_f64() * 1000.0 / made.len() as f64
        },
        timeline,
    })
}
