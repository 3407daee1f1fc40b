//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! Every replica runs the caches and the registry watch; only the lease holder writes.
//! Why not kube-lease-manager: when its renewals fail (apiserver unreachable, token
//! revoked) it keeps reporting leadership until the API answers again, while the lease
//! may already have expired and another replica taken over. Here leadership is a local
//! deadline: it lasts `duration` from the start of the last successful renewal and is
//! dropped when that passes, whatever the API says, so a deposed replica stops writing
//! at once. Expiry of another holder's lease is judged, as client-go does, by when this
//! process last saw the record change (its own clock), not by the timestamps inside it,
//! so clock skew between nodes does not matter.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    pub holder: String,
    /// How long a lease is valid after its last renewal.
    pub duration: Duration,
    /// How often the holder renews (and a candidate retries); well under `duration`.
    pub renew_interval: Duration,
}

/// What one round learned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Round {
    /// We hold the lease, renewed at the round's start.
    Held,
    /// Somebody else holds it; it lapses at the given instant unless renewed first.
    Other(String, Option<Instant>),
}

/// The elector. `run` publishes leadership on the returned channel.
pub struct LeaseElector {
    cfg: LeaseConfig,
    api: Api<Lease>,
    /// The other holder's record as last seen, and when we first saw it so.
    observed: Option<(String, Instant)>,
}

impl LeaseElector {
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        let api = Api::namespaced(client, &cfg.namespace);
        Self {
            cfg,
            api,
            observed: None,
        }
    }

    /// Runs until `shutdown`; on shutdown a held lease is released so that a standby
    /// takes over without waiting for expiry.
    pub async fn run(mut self, leader: watch::Sender<bool>, shutdown: CancellationToken) {
        let mut valid_until: Option<Instant> = None;
        loop {
            let started = Instant::now();
            // When the other holder's lease lapses if it is not renewed: try exactly then,
            // not at the next renewal tick, so a takeover is not a tick late.
            let mut their_expiry: Option<Instant> = None;
            match self.round().await {
                Ok(Round::Held) => {
                    if valid_until.is_none() {
                        info!(lease = %self.cfg.name, holder = %self.cfg.holder, "acquired the lease");
                    }
                    valid_until = Some(started + self.cfg.duration);
                }
                Ok(Round::Other(holder, lapses_at)) => {
                    their_expiry = lapses_at;
                    if valid_until.take().is_some() {
                        warn!(lease = %self.cfg.name, %holder, "the lease was taken over");
                    }
                    debug!(lease = %self.cfg.name, %holder, "standing by");
                }
                Err(e) => warn!(lease = %self.cfg.name, error = %e, "lease round failed"),
            }
            let is_leader = valid_until.is_some_and(|t| Instant::now() < t);
            leader.send_if_modified(|v| std::mem::replace(v, is_leader) != is_leader);

            // Wake for the next renewal, or exactly when our own lease would lapse.
            let next = started + self.cfg.renew_interval;
            let wake = [valid_until, their_expiry]
                .into_iter()
                .flatten()
                .filter(|t| *t > Instant::now())
                .fold(next, Instant::min);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(wake) => {}
            }
            if valid_until.is_some_and(|t| Instant::now() >= t) {
                warn!(lease = %self.cfg.name, "could not renew the lease in time: stopping writes");
                valid_until = None;
                leader.send_if_modified(|v| std::mem::replace(v, false));
            }
        }
        leader.send_if_modified(|v| std::mem::replace(v, false));
        if valid_until.is_some() {
            if let Err(e) = self.release().await {
                warn!(lease = %self.cfg.name, error = %e, "could not release the lease");
            } else {
                info!(lease = %self.cfg.name, "released the lease");
            }
        }
    }

    async fn round(&mut self) -> Result<Round, kube::Error> {
        let now = now_micro();
        let Some(lease) = self.api.get_opt(&self.cfg.name).await? else {
            let fresh = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(now.clone(), now, 0)),
            };
            return match self.api.create(&PostParams::default(), &fresh).await {
                Ok(_) => Ok(Round::Held),
                // Someone else created it first: read it next round.
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Round::Other(String::new(), None)),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let transitions = spec.lease_transitions.unwrap_or(0);
        if holder == self.cfg.holder {
            self.observed = None;
            let acquired = spec.acquire_time.clone().unwrap_or_else(|| now.clone());
            return self
                .update(lease, self.spec(acquired, now, transitions))
                .await;
        }
        // Somebody else (or nobody, after a release) holds it.
        let record = format!(
            "{holder}/{:?}/{:?}",
            spec.renew_time.as_ref().map(|t| t.0),
            lease.metadata.resource_version
        );
        let seen_at = match &self.observed {
            Some((r, at)) if *r == record => *at,
            _ => {
                let at = Instant::now();
                self.observed = Some((record, at));
                at
            }
        };
        let their_duration = spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(s.max(1) as u64))
            .unwrap_or(self.cfg.duration);
        let free = holder.is_empty() || seen_at.elapsed() >= their_duration;
        if !free {
            return Ok(Round::Other(holder, Some(seen_at + their_duration)));
        }
        self.update(lease, self.spec(now.clone(), now, transitions + 1))
            .await
    }

    /// Writes the lease with its resourceVersion as precondition: of two candidates
    /// racing for a free lease, exactly one wins.
    async fn update(&self, mut lease: Lease, spec: LeaseSpec) -> Result<Round, kube::Error> {
        lease.spec = Some(spec);
        lease.metadata.managed_fields = None;
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Round::Held),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Round::Other(String::new(), None)),
            Err(e) => Err(e),
        }
    }

    async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.cfg.holder.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.acquire_time = None;
        spec.renew_time = None;
        lease.metadata.managed_fields = None;
        self.api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }

    fn spec(&self, acquired: MicroTime, renewed: MicroTime, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.cfg.holder.clone()),
            lease_duration_seconds: Some(
                self.cfg.duration.as_secs().clamp(1, i32::MAX as u64) as i32
            ),
            acquire_time: Some(acquired),
            renew_time: Some(renewed),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }
}

fn now_micro() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// The holder identity: `--lease-holder`, else `POD_NAME`, else the hostname plus a
/// random suffix (two processes on one machine are two candidates).
pub fn default_holder(explicit: Option<&str>) -> String {
    if let Some(h) = explicit.filter(|h| !h.is_empty()) {
        return h.to_string();
    }
    if let Ok(pod) = std::env::var("POD_NAME") {
        if !pod.is_empty() {
            return pod;
        }
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "registry-connector".to_string());
    format!("{host}-{:08x}", rand::random::<u32>())
}
