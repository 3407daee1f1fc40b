//! The poll loop: one full fetch, then a delta every interval, checked against the
//! server's hash code; a full fetch again whenever the check fails.
//!
//! Only verified state reaches the catalog: a delta's changes are published after the
//! local copy hashes like the server's registry, otherwise the full fetch that follows
//! publishes the truth with [`Catalog::replace_all`]. Errors never touch the catalog:
//! while Eureka is down or refusing, the last known state stays published.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::catalog::Catalog;
use crate::model::MicroSvcMeta;
use crate::registry::reported::Reported;
use crate::registry::{error_chain, Pacer, PacerConfig};

use super::error::EurekaError;
use super::http::EurekaHttp;
use super::metrics::{EurekaMetrics, FullFetchReason};
use super::mirror::{AppInstances, Mirror};
use super::schedule::{Read, Schedule};
use super::select::{Selection, SkippedInstance};

/// Everything the loop needs.
pub(crate) struct Poller {
    pub http: EurekaHttp,
    pub selection: Selection,
    pub catalog: Arc<Catalog>,
    pub metrics: Arc<EurekaMetrics>,
    pub interval: Duration,
    /// Zero turns the periodic full read off.
    pub full_fetch_interval: Duration,
    pub pacing: PacerConfig,
    /// What was already reported as left out, per application.
    pub reported: Reported,
}

/// What a successful read showed.
enum FetchOutcome {
    /// The whole registry; whether the answer's own hash code matches the copy made
    /// from it.
    Full { hash_agrees: bool },
    /// A delta that left the copy hashing like the server's registry.
    DeltaVerified,
    /// A delta after which the copy's hash code differs from the server's.
    DeltaMismatch,
}

impl Poller {
    /// Polls until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut pacer = Pacer::new(self.pacing);
        let mut mirror = Mirror::default();
        let mut schedule = Schedule::new(self.full_fetch_interval);
        let mut due = Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(due) => {}
            }
            // Adds the error backoff, if the last request failed.
            if !pacer.ready(&shutdown).await {
                return;
            }
            let started = Instant::now();
            due = started + self.interval;
            let read = schedule.next_read(started);
            let peer = self.http.peer();
            let step = async {
                match read {
                    Read::Full(reason) => self
                        .full_fetch(reason, &mut mirror)
                        .await
                        .map(|hash_agrees| FetchOutcome::Full { hash_agrees }),
                    Read::Delta => self.delta(&mut mirror).await,
                }
            };
            // A request in flight does not hold up shutdown (it may take the whole
            // request timeout against a hanging server).
            let result = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                result = step => result,
            };
            self.metrics
                .mirrored_instances
                .set(i64::try_from(mirror.instance_count()).unwrap_or(i64::MAX));
            match result {
                Ok(outcome) => {
                    if pacer.failures() > 0 {
                        info!(url = %self.http.current_url(), "Eureka answers again");
                    }
                    pacer.succeeded();
                    let (was_refusing, was_unverifiable) =
                        (schedule.deltas_refused(), schedule.unverifiable());
                    match (read, outcome) {
                        (Read::Full(reason), FetchOutcome::Full { hash_agrees }) => {
                            schedule.full_read(reason, started, hash_agrees);
                            if schedule.deltas_refused() && !was_refusing {
                                warn!(
                                    "Eureka refuses /apps/delta but serves /apps: reading the \
                                     whole registry every interval, trying deltas again every \
                                     10 minutes"
                                );
                            }
                            if schedule.unverifiable() && !was_unverifiable {
                                warn!(
                                    local = %mirror.reconcile_hash(),
                                    "Eureka's hash code does not describe the registry it \
                                     sent (instances without an id, or no hash code at all): \
                                     deltas cannot be checked, reading the whole registry \
                                     every interval"
                                );
                            } else if was_unverifiable && !schedule.unverifiable() {
                                info!("Eureka's hash code matches again: back to deltas");
                            }
                        }
                        (_, FetchOutcome::DeltaVerified) => {
                            if was_refusing {
                                info!("Eureka serves /apps/delta again: back to deltas");
                            }
                            schedule.delta_verified(started);
                        }
                        (_, _) => {
                            schedule.delta_mismatched();
                            // The copy is known to be wrong: fetch the truth at once.
                            due = Instant::now();
                        }
                    }
                }
                Err(e) => {
                    match read {
                        Read::Delta if e.is_refusal() => schedule.delta_refused(),
                        Read::Delta => {}
                        Read::Full(reason) => schedule.full_read_failed(reason),
                    }
                    let delay = pacer.failed();
                    warn!(
                        error = %error_chain(&e),
                        failures = pacer.failures(),
                        retry_in = ?delay,
                        "reading Eureka failed; the last known state stays published"
                    );
                    // The backoff alone spaces the retries.
                    due = Instant::now();
                }
            }
            if self.http.peer() != peer {
                info!(url = %self.http.current_url(), "moving to the next Eureka peer");
                schedule.peer_changed();
            }
        }
    }

    async fn full_fetch(
        &self,
        reason: FullFetchReason,
        mirror: &mut Mirror,
    ) -> Result<bool, EurekaError> {
        let read = self.http.apps().await?;
        let mut answer = read.applications;
        self.metrics.full_fetch(reason);
        // As for deltas, an absent hash code is an empty one (the empty registry's).
        let theirs = answer.apps_hashcode.take().unwrap_or_default();
        // The old copy goes before the new one is built: never two at once.
        *mirror = Mirror::default();
        *mirror = Mirror::from_full(answer);
        mirror.remember_delta(read.memo);
        let hash = mirror.reconcile_hash();
        let hash_agrees = theirs == hash;
        self.reported.retain(|app| mirror.app(app).is_some());
        // Each service goes into the catalog as it is built: the catalog keeps it in a
        // compact form, and a list of every built service would be a transient copy of
        // the registry (9 MiB at 10,000 applications).
        let mut published = 0usize;
        self.catalog.replace_all(
            mirror
                .apps()
                .filter_map(|(app, instances)| self.build(app, instances))
                .inspect(|_| published += 1),
        );
        let (applications, instances) = (mirror.apps().count(), mirror.instance_count());
        let routine = matches!(
            reason,
            FullFetchReason::Periodic
                | FullFetchReason::DeltasRefused
                | FullFetchReason::Unverifiable
        );
        if routine {
            debug!(
                reason = reason.as_str(),
                applications, instances, published, "read the whole Eureka registry"
            );
        } else {
            info!(reason = reason.as_str(), applications, instances, published, hash = %hash, "read the whole Eureka registry");
        }
        if mirror.unkeyed() > 0 {
            warn!(
                instances = mirror.unkeyed(),
                "Eureka reported instances with neither instanceId nor hostName; left out"
            );
        }
        Ok(hash_agrees)
    }

    async fn delta(&self, mirror: &mut Mirror) -> Result<FetchOutcome, EurekaError> {
        let decoded = self.http.delta_since(mirror.delta_memo()).await?;
        let delta = decoded.applications;
        if decoded.skipped > 0 {
            debug!(
                skipped = decoded.skipped,
                decoded = delta
                    .applications
                    .iter()
                    .map(|a| a.instances.len())
                    .sum::<usize>(),
                "Eureka delta: entries the last delta already carried were not decoded again"
            );
        }
        mirror.remember_delta(decoded.memo);
        let changed = mirror.apply_delta(&delta);
        let ours = mirror.reconcile_hash();
        let theirs = delta.apps_hashcode.unwrap_or_default();
        if ours != theirs {
            info!(
                local = %ours,
                server = %theirs,
                "the registry copy does not match Eureka's hash code after a delta; reading it whole"
            );
            return Ok(FetchOutcome::DeltaMismatch);
        }
        if !changed.is_empty() {
            debug!(applications = changed.len(), "applying a Eureka delta");
        }
        for app in &changed {
            match mirror
                .app(app)
                .and_then(|instances| self.build(app, instances))
            {
                Some(meta) => self.catalog.upsert(meta),
                None => {
                    self.reported.forget(app);
                    self.catalog.remove(&self.selection.published_name(app));
                }
            }
        }
        Ok(FetchOutcome::DeltaVerified)
    }

    /// What `app` publishes, with newly skipped instances and metadata issues logged and
    /// counted (see [`Reported`]).
    fn build(&self, app: &str, instances: &AppInstances) -> Option<MicroSvcMeta> {
        let built = self.selection.build(app, instances);
        let skip_key = |s: &SkippedInstance| format!("{}/{}", s.instance_id, s.reason.as_label());
        for skipped in self
            .reported
            .fresh(app, "instance", &built.skipped, skip_key)
        {
            self.metrics.reject(skipped.reason.as_label());
            warn!(
                app = %skipped.app,
                instance = %skipped.instance_id,
                reason = %skipped.reason,
                "Eureka instance left out"
            );
        }
        for issue in
            self.reported
                .fresh(app, "metadata", &built.metadata_issues, ToString::to_string)
        {
            self.metrics.reject(issue.as_label());
            warn!(app = %app, reason = %issue, "Eureka metadata left out");
        }
        built.service
    }
}
