//! The sync loop's own state: the de-duplicated work queue, the in-flight set, retries,
//! the mass-deletion hold and the bookkeeping of sync progress. Only the loop task in
//! [`super::Sink::run`] touches it, so it needs no locks.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use futures::stream::FuturesUnordered;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, info_span, warn, Instrument};

use super::backoff::RetryQueue;
use super::events;
use super::guard::{DeletionGuard, GuardDecision};
use super::metrics::SinkMetrics;
use super::reconcile::{ReconcileContext, Reconciled};
use super::writer;
use super::SinkStatus;
use crate::catalog::Catalog;

type ReconcileResult = Result<Reconciled, writer::WriteError>;
/// A finished reconcile: the name, when its registry change happened (if one did), and
/// the result.
type Finished = (String, Option<Instant>, ReconcileResult);
pub(super) type Running = FuturesUnordered<futures::future::BoxFuture<'static, Finished>>;

/// The loop's own state; only the loop task touches it, so it needs no locks.
pub(super) struct LoopState {
    pub(super) ctx: Arc<ReconcileContext>,
    pub(super) catalog: Arc<Catalog>,
    pub(super) metrics: Arc<SinkMetrics>,
    pub(super) status: watch::Sender<SinkStatus>,
    pub(super) concurrency: usize,
    /// Names ready to reconcile, in order, without duplicates (`queued`).
    pub(super) queue: VecDeque<String>,
    pub(super) queued: HashSet<String>,
    /// Names being reconciled now; a name queued again meanwhile is marked `dirty`
    /// and re-queued when its reconcile ends, so one name never runs twice at once.
    pub(super) in_flight: HashSet<String>,
    pub(super) dirty: HashSet<String>,
    pub(super) retries: RetryQueue,
    pub(super) guard: DeletionGuard,
    pub(super) held: BTreeSet<String>,
    pub(super) recheck_at: Option<Instant>,
    /// The catalog is synced and the next drained queue completes the initial sync.
    pub(super) synced_batch_pending: bool,
    pub(super) batch_failures: usize,
    /// Something was reconciled since the queue last drained.
    pub(super) batch_ran: bool,
    /// Reconciles start only while this process may write.
    pub(super) leader: bool,
    pub(super) events: events::Events,
    /// When the registry first changed each service since its last reconcile started:
    /// the start of the registry-change-to-write latency.
    pub(super) changed_at: HashMap<String, Instant>,
}

impl LoopState {
    pub(super) fn enqueue(&mut self, names: impl IntoIterator<Item = String>) {
        let mut deletions = Vec::new();
        for name in names {
            if !self.catalog.contains(&name) {
                if self.ctx.has_objects(&name) {
                    deletions.push(name);
                }
                continue;
            }
            self.held.remove(&name);
            self.push(name);
        }
        if !deletions.is_empty() {
            self.plan_deletions(deletions);
        }
        self.publish_held();
    }

    fn push(&mut self, name: String) {
        if self.in_flight.contains(&name) {
            self.dirty.insert(name);
        } else if self.queued.insert(name.clone()) {
            self.queue.push_back(name);
        }
    }

    /// Runs deletions through the first-snapshot rule and the mass-deletion guard.
    fn plan_deletions(&mut self, names: Vec<String>) {
        if !self.catalog.is_synced() {
            debug!(
                count = names.len(),
                "not deleting before the source's first complete snapshot"
            );
            return;
        }
        let managed = self.ctx.services.service_names();
        let orphans = managed.iter().filter(|n| !self.catalog.contains(n)).count();
        let was_holding = self.guard.is_holding();
        match self.guard.evaluate(managed.len(), orphans, Instant::now()) {
            GuardDecision::Proceed => {
                for name in names {
                    self.held.remove(&name);
                    self.push(name);
                }
            }
            GuardDecision::Hold { since, recheck_at } => {
                if !was_holding {
                    for name in names.iter().take(events::MAX_HELD_EVENTS) {
                        if let Some(svc) = self.ctx.services.reference(name, name) {
                            self.events.deletion_held(svc, managed.len(), orphans);
                        }
                    }
                    warn!(
                        managed = managed.len(),
                        would_delete = orphans,
                        held_for = ?since.elapsed(),
                        "mass deletion held: the registry's view would delete too many managed services"
                    );
                }
                self.held.extend(names);
                self.recheck_at = Some(recheck_at);
            }
        }
    }

    fn publish_held(&mut self) {
        self.metrics.held_deletions.set(self.held.len() as i64);
        let held = &self.held;
        self.status.send_if_modified(|s| {
            if s.held_deletions != *held {
                s.held_deletions = held.clone();
                true
            } else {
                false
            }
        });
    }

    pub(super) fn start_ready(&mut self, running: &mut Running) {
        while self.leader && running.len() < self.concurrency {
            let Some(name) = self.queue.pop_front() else {
                break;
            };
            self.queued.remove(&name);
            self.in_flight.insert(name.clone());
            self.batch_ran = true;
            let ctx = self.ctx.clone();
            let may_delete = self.catalog.is_synced();
            let metrics = self.metrics.clone();
            let changed_at = self.changed_at.remove(&name);
            let span = info_span!("reconcile", service = %name);
            running.push(Box::pin(
                async move {
                    let started = std::time::Instant::now();
                    let result = ctx.reconcile(&name, may_delete).await;
                    metrics.reconciles.inc();
                    metrics
                        .reconcile_duration
                        .observe(started.elapsed().as_secs_f64());
                    (name, changed_at, result)
                }
                .instrument(span),
            ));
        }
        self.maybe_complete_batch(running.len());
    }

    pub(super) fn finished(
        &mut self,
        name: String,
        changed_at: Option<Instant>,
        result: ReconcileResult,
    ) {
        self.in_flight.remove(&name);
        match result {
            Ok(outcome) => {
                debug!(service = %name, ?outcome, "reconciled");
                self.retries.succeeded(&name);
                let wrote = matches!(outcome, Reconciled::Synced { writes } | Reconciled::Deleted { writes } if writes > 0);
                if let (true, Some(at)) = (wrote, changed_at) {
                    self.metrics
                        .change_to_write
                        .observe(at.elapsed().as_secs_f64());
                }
            }
            Err(err) if err.is_not_leader() => {
                // Not a failure: the next leader (or this one, on re-election) does a
                // full pass anyway.
                debug!(service = %name, "reconcile stopped: lease lost");
            }
            Err(err) => {
                self.metrics.reconcile_failures.inc();
                self.batch_failures += 1;
                let delay = self.retries.failed(&name);
                let attempts = self.retries.attempts(&name);
                if let writer::WriteError::Clash {
                    object: Some(object),
                    ..
                } = &err
                {
                    let registry_name = self
                        .ctx
                        .catalog
                        .aggregate(&name)
                        .map(|m| m.registry_name.to_string())
                        .unwrap_or_else(|| name.clone());
                    if attempts == 1 || attempts.is_multiple_of(10) {
                        self.events.name_clash(object.clone(), &registry_name);
                    }
                }
                if err.is_clash() {
                    warn!(service = %name, error = %err, retry_in = ?delay, "service not synced: name clash");
                } else {
                    if attempts == events::FAILURES_BEFORE_EVENT
                        || (attempts > events::FAILURES_BEFORE_EVENT && attempts.is_multiple_of(10))
                    {
                        if let Some(svc) = self.ctx.services.reference(&name, &name) {
                            self.events.sync_failing(svc, attempts, &error_chain(&err));
                        }
                    }
                    warn!(service = %name, error = %error_chain(&err), attempts, retry_in = ?delay, "reconcile failed; will retry");
                }
            }
        }
        if self.dirty.remove(&name) {
            self.push(name);
        }
        let retrying = self.retries.len();
        self.status.send_if_modified(|s| {
            let changed = s.retrying != retrying;
            s.retrying = retrying;
            changed
        });
    }

    /// Marks sync progress whenever the work queue drains.
    fn maybe_complete_batch(&mut self, running: usize) {
        if running > 0 || !self.queue.is_empty() || !self.batch_ran {
            return;
        }
        self.batch_ran = false;
        if self.batch_failures == 0 {
            if let Ok(now) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
                self.metrics.last_sync_timestamp.set(now.as_secs() as i64);
            }
        }
        self.batch_failures = 0;
        if self.synced_batch_pending && self.catalog.is_synced() {
            self.synced_batch_pending = false;
            info!(services = self.catalog.len(), "initial sync complete");
            self.status.send_modify(|s| s.initial_sync_done = true);
        }
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
