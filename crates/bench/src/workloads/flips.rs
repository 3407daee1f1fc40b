//! Step 3 of the export workload: readiness flips of random Pods, each timed from the
//! Pod status write to the registry answer that shows the instance's new state.
//!
//! A flip is two status writes on one Pod: Ready False, then (after a gap) True again,
//! so the set is all ready when the phase ends and both directions are measured. Each
//! write waits for the previous one to land (or for the land bound). Consul is watched
//! with blocking queries on the service (`/v1/health/service/<name>?index=`), whose
//! index moves when the connector's transaction commits: the answer arrives within the
//! loopback round trip of the commit (a few ms), with no polling interval on top.
//! Eureka has no blocking queries: `GET /apps/<APP>` is polled (the plan's
//! `registry_poll`), so its figures carry up to one poll interval more. The
//! EndpointSlice watch times Kubernetes' share (status write → the controller-manager's
//! slice update) of the same change.

use std::time::{Duration, Instant};

use anyhow::Result;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};
use rand::rngs::StdRng;
use rand::Rng;

use crate::export_results::FlipSample;
use crate::pods::{self, ExportService};
use crate::registry::export_reader::ExportRegistry;
use crate::tracker::Tracker;

/// How the flips are made.
#[derive(Debug, Clone)]
pub struct FlipOpts {
    pub k: usize,
    /// A write whose effect is not in the registry within this counts as not landed.
    pub land_bound: Duration,
    /// Uniform pause between two writes.
    pub min_gap: Duration,
    pub max_gap: Duration,
}

/// What the flips read and write.
pub struct FlipTarget<'a> {
    pub client: &'a Client,
    pub ns: &'a str,
    pub registry: &'a ExportRegistry,
    pub slices: &'a Tracker,
    /// When the connector under test started (the samples' time base).
    pub started: Instant,
    /// What the registry shows for a ready Pod (Consul `passing`, Eureka `UP`).
    pub ready: &'static str,
    /// What it shows for a Pod that is not ready (`None`: no instance).
    pub not_ready: Option<&'static str>,
}

/// Makes `opts.k` flips on random Pods of `set`; one sample per status write.
pub async fn run(
    t: &FlipTarget<'_>,
    set: &mut [ExportService],
    opts: &FlipOpts,
    rng: &mut StdRng,
) -> Result<Vec<FlipSample>> {
    let api: Api<Pod> = Api::namespaced(t.client.clone(), t.ns);
    let mut samples = Vec::with_capacity(2 * opts.k);
    if set.is_empty() || set.iter().any(|s| s.pods.is_empty()) {
        return Ok(samples);
    }
    for _ in 0..opts.k {
        let i = rng.random_range(0..set.len());
        let j = rng.random_range(0..set[i].pods.len());
        for ready in [false, true] {
            samples.push(change(t, &api, &mut set[i], j, ready, opts).await?);
            let gap = rng.random_range(opts.min_gap..=opts.max_gap);
            tokio::time::sleep(gap).await;
        }
    }
    Ok(samples)
}

/// One status write on Pod `j` of `svc`, timed.
async fn change(
    t: &FlipTarget<'_>,
    api: &Api<Pod>,
    svc: &mut ExportService,
    j: usize,
    ready: bool,
    opts: &FlipOpts,
) -> Result<FlipSample> {
    let pod = svc.pods[j].clone();
    let want = if ready { Some(t.ready) } else { t.not_ready };
    // Taken before the write, so no commit can be missed.
    let cursor = t.registry.cursor(&svc.name, &pod.ip).await?;
    svc.pods[j].ready = ready;
    let expectation = t.slices.expect(&svc.name, svc.ready_ips());
    let t0 = Instant::now();
    pods::set_status(api, &pod.name, &pod.ip, ready).await?;
    let deadline = t0 + opts.land_bound;
    let landed = t
        .registry
        .wait_status(&svc.name, &pod.ip, want, cursor, deadline)
        .await?;
    t.slices
        .wait_until(deadline, |s| s.met(expectation).is_some())
        .await;
    let since = |at: Instant| at.saturating_duration_since(t0).as_secs_f64() * 1000.0;
    let bound_ms = opts.land_bound.as_secs_f64() * 1000.0;
    let latency = landed.map(since);
    Ok(FlipSample {
        pod: pod.name,
        service: svc.name.clone(),
        to_ready: ready,
        at_s: t0.saturating_duration_since(t.started).as_secs_f64(),
        slice_ms: t.slices.met(expectation).map(since),
        registry_ms: latency.filter(|v| *v <= bound_ms),
        registry_late_ms: latency.filter(|v| *v > bound_ms),
    })
}
