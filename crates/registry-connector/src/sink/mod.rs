//! The Kubernetes sink: turns the catalog into Services, EndpointSlices and Endpoints.
//!
//! The seed's `Sink`, `Controller`, `Resource` and `Backgrounder` are one loop here:
//! watches on the managed objects ([`cache`]) and catalog changes both push service
//! names into the [`coalescer`]; due batches go through the mass-deletion [`guard`];
//! each name is reconciled ([`reconcile`]) with bounded concurrency, never twice at once;
//! failures come back through the per-service [`backoff`] queue. Only the [`writer`]
//! talks to the apiserver, behind a client-side rate limit.
//!
//! Safety: nothing is deleted before the source's first complete snapshot; shutdown
//! finishes the writes in flight and deletes nothing.

pub mod backoff;
pub mod cache;
pub mod coalescer;
pub mod events;
pub mod guard;
pub mod metrics;
pub mod plan;
pub mod purge;
pub mod reconcile;
pub mod writer;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use governor::{Quota, RateLimiter};
use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{Api, Client};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::catalog::{Catalog, CatalogEvent};
use crate::labels::{owner_selector, SERVICE_NAME_LABEL};
use crate::render::RenderConfig;
use backoff::{BackoffPolicy, RetryQueue};
use cache::{run_cache, ObjectCache};
use coalescer::Coalescer;
use guard::{DeletionGuard, GuardDecision, GuardPolicy};
use metrics::{SinkMetrics, SourceLabels};
use reconcile::{ReconcileContext, Reconciled};
use writer::Writer;

/// Settings of the sink and its loop.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub render: RenderConfig,
    /// The registry feeding this sink (`consul`, ...), a metric label.
    pub source: &'static str,
    /// Wait for this long without changes before syncing (the seed's K8SQuietPeriod).
    pub quiet_period: Duration,
    /// Never wait longer than this under a steady stream of changes (K8SMaxPeriod).
    pub max_period: Duration,
    /// Services reconciled at the same time.
    pub concurrency: usize,
    /// Client-side write rate limit: sustained writes per second and burst.
    pub write_qps: u32,
    pub write_burst: u32,
    pub retry: BackoffPolicy,
    pub guard: GuardPolicy,
    /// Every this often all services are compared again (no write when nothing differs).
    pub resync_period: Duration,
}

impl SinkConfig {
    pub fn new(render: RenderConfig) -> Self {
        Self {
            render,
            source: "registry",
            quiet_period: Duration::from_secs(1),
            max_period: Duration::from_secs(5),
            concurrency: 16,
            write_qps: 100,
            write_burst: 200,
            retry: BackoffPolicy::default(),
            guard: GuardPolicy::default(),
            resync_period: Duration::from_secs(600),
        }
    }
}

/// What the sink reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkStatus {
    /// The caches listed everything once and the loop runs.
    pub caches_ready: bool,
    /// A batch completed after the source's first complete snapshot.
    pub initial_sync_done: bool,
    /// Names of services whose deletion the guard holds.
    pub held_deletions: BTreeSet<String>,
    /// Services waiting for a retry after a failure.
    pub retrying: usize,
    /// This process may write (it holds the lease, or runs without election).
    pub leader: bool,
    /// The source's first complete snapshot has arrived (a standby is then warm).
    pub source_synced: bool,
}

/// A handle to a running sink: status, metrics, and the operator's override.
#[derive(Clone)]
pub struct SinkHandle {
    status: watch::Receiver<SinkStatus>,
    allow: mpsc::UnboundedSender<()>,
    heartbeat: Heartbeat,
    pub metrics: Arc<SinkMetrics>,
}

/// When the loop last went round (it ticks at least every few seconds when idle).
type Heartbeat = Arc<std::sync::Mutex<Option<std::time::Instant>>>;

/// How often an idle loop refreshes its heartbeat.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

impl SinkHandle {
    pub fn status(&self) -> SinkStatus {
        self.status.borrow().clone()
    }

    /// Waits until `pred` holds for the status.
    pub async fn wait_for(&self, pred: impl Fn(&SinkStatus) -> bool) -> SinkStatus {
        let mut rx = self.status.clone();
        let result = rx.wait_for(|s| pred(s)).await.map(|s| s.clone());
        result.unwrap_or_else(|_| self.status())
    }

    /// The operator allows the deletions the guard currently holds.
    pub fn allow_held_deletions(&self) {
        let _ = self.allow.send(());
    }

    /// Time since the loop last went round; `None` before it started.
    pub fn heartbeat_age(&self) -> Option<Duration> {
        let beat = *self.heartbeat.lock().unwrap_or_else(|e| e.into_inner());
        beat.map(|t| t.elapsed())
    }
}

/// The sink, ready to run.
pub struct Sink {
    cfg: SinkConfig,
    client: Client,
    catalog: Arc<Catalog>,
    catalog_events: mpsc::UnboundedReceiver<CatalogEvent>,
    metrics: Arc<SinkMetrics>,
    status: watch::Sender<SinkStatus>,
    allow_rx: mpsc::UnboundedReceiver<()>,
    allow_tx: mpsc::UnboundedSender<()>,
    leader: watch::Receiver<bool>,
    heartbeat: Heartbeat,
    events: events::Events,
    plan: Option<plan::Plan>,
    /// Keeps the default "always leader" channel open when no election is used.
    _always_leader: Option<watch::Sender<bool>>,
}

fn service_label<K: kube::Resource>(obj: &K) -> Option<String> {
    obj.meta().labels.as_ref()?.get(SERVICE_NAME_LABEL).cloned()
}

fn own_name<K: kube::Resource>(obj: &K) -> Option<String> {
    obj.meta().name.clone()
}

impl Sink {
    pub fn new(
        client: Client,
        cfg: SinkConfig,
        catalog: Arc<Catalog>,
        catalog_events: mpsc::UnboundedReceiver<CatalogEvent>,
    ) -> Self {
        let (allow_tx, allow_rx) = mpsc::unbounded_channel();
        let (always, leader) = watch::channel(true);
        Self {
            cfg,
            client: client.clone(),
            catalog,
            catalog_events,
            metrics: Arc::new(SinkMetrics::default()),
            status: watch::channel(SinkStatus::default()).0,
            allow_rx,
            allow_tx,
            leader,
            heartbeat: Heartbeat::default(),
            events: events::Events::new(client.clone()),
            plan: None,
            _always_leader: Some(always),
        }
    }

    /// A dry run: writes are recorded in `plan`, none is sent, and no event either.
    pub fn with_plan(mut self, plan: plan::Plan) -> Self {
        self.plan = Some(plan);
        self.events = events::Events::disabled();
        self
    }

    /// Where Kubernetes Events go (disabled for dry runs).
    pub fn with_events(mut self, events: events::Events) -> Self {
        self.events = events;
        self
    }

    /// Writes only while `leader` is true (a lease elector's channel). Caches and the
    /// catalog stay warm either way, so a standby takes over with a diff, not a relist.
    pub fn with_leadership(mut self, leader: watch::Receiver<bool>) -> Self {
        self.leader = leader;
        self._always_leader = None;
        self
    }

    pub fn handle(&self) -> SinkHandle {
        SinkHandle {
            status: self.status.subscribe(),
            allow: self.allow_tx.clone(),
            heartbeat: self.heartbeat.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// Runs until `shutdown` is cancelled, then finishes the reconciles in flight.
    pub async fn run(self, shutdown: CancellationToken) {
        let Sink {
            cfg,
            client,
            catalog,
            mut catalog_events,
            metrics,
            status,
            mut allow_rx,
            allow_tx: _,
            mut leader,
            heartbeat,
            events,
            plan,
            _always_leader,
        } = self;
        let ns = cfg.render.namespace.clone();
        let selector = owner_selector(&cfg.render.connector_id);
        let changes = Arc::new(Coalescer::new(cfg.quiet_period, cfg.max_period));

        let services = Arc::new(ObjectCache::<Service>::new(own_name::<Service>));
        let slices = Arc::new(ObjectCache::<EndpointSlice>::new(
            service_label::<EndpointSlice>,
        ));
        let endpoints = Arc::new(ObjectCache::<Endpoints>::new(own_name::<Endpoints>));
        let watchers = CancellationToken::new();
        for task in [
            tokio::spawn(run_cache(
                Api::namespaced(client.clone(), &ns),
                selector.clone(),
                services.clone(),
                changes.clone(),
            )),
            tokio::spawn(run_cache(
                Api::namespaced(client.clone(), &ns),
                selector.clone(),
                slices.clone(),
                changes.clone(),
            )),
            tokio::spawn(run_cache(
                Api::namespaced(client.clone(), &ns),
                selector.clone(),
                endpoints.clone(),
                changes.clone(),
            )),
        ] {
            let watchers = watchers.clone();
            tokio::spawn(async move {
                watchers.cancelled().await;
                task.abort();
            });
        }
        let _stop_watchers = watchers.drop_guard();

        let quota =
            Quota::per_second(NonZeroU32::new(cfg.write_qps.max(1)).unwrap_or(NonZeroU32::MIN))
                .allow_burst(NonZeroU32::new(cfg.write_burst.max(1)).unwrap_or(NonZeroU32::MIN));
        let mut writer = Writer::new(
            client.clone(),
            ns.clone(),
            cfg.render.connector_id.clone(),
            Arc::new(RateLimiter::direct(quota)),
            metrics.clone(),
            leader.clone(),
        );
        if let Some(plan) = plan {
            writer = writer.with_plan(plan);
        }
        let ctx = Arc::new(ReconcileContext {
            catalog: catalog.clone(),
            render: cfg.render.clone(),
            services: services.clone(),
            slices: slices.clone(),
            endpoints: endpoints.clone(),
            writer,
        });

        info!(namespace = %ns, connector_id = %cfg.render.connector_id, "waiting for the caches of managed objects");
        tokio::select! {
            _ = async { services.wait_ready().await; slices.wait_ready().await; endpoints.wait_ready().await; } => {}
            _ = shutdown.cancelled() => return,
        }
        let is_leader = *leader.borrow_and_update();
        status.send_modify(|s| {
            s.caches_ready = true;
            s.leader = is_leader;
            s.source_synced = catalog.is_synced();
        });
        info!(
            managed = services.service_count(),
            "caches ready; starting the sync loop"
        );

        let mut state = LoopState {
            ctx,
            catalog: catalog.clone(),
            metrics: metrics.clone(),
            status,
            concurrency: cfg.concurrency.max(1),
            queue: VecDeque::new(),
            queued: HashSet::new(),
            in_flight: HashSet::new(),
            dirty: HashSet::new(),
            retries: RetryQueue::new(cfg.retry),
            guard: DeletionGuard::new(cfg.guard),
            held: BTreeSet::new(),
            recheck_at: None,
            synced_batch_pending: catalog.is_synced(),
            leader: is_leader,
            events,
            changed_at: HashMap::new(),
            batch_failures: 0,
            batch_ran: false,
        };
        // The first pass looks at everything: what the catalog has and what we own.
        state.enqueue(all_names(&catalog, &services, &slices, &endpoints));

        let mut running = FuturesUnordered::new();
        let mut resync =
            tokio::time::interval_at(Instant::now() + cfg.resync_period, cfg.resync_period);
        let mut ticker = tokio::time::interval(HEARTBEAT_EVERY);
        loop {
            *heartbeat.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
            state.start_ready(&mut running);
            let recheck = state.recheck_at;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(event) = catalog_events.recv() => match event {
                    CatalogEvent::Changed(names) => {
                        let now = Instant::now();
                        for name in &names {
                            state.changed_at.entry(name.clone()).or_insert(now);
                        }
                        changes.push(names);
                    }
                    CatalogEvent::Synced => {
                        state.synced_batch_pending = true;
                        state.status.send_modify(|s| s.source_synced = true);
                        // The first complete snapshot is reconciled at once, without waiting
                        // for a quiet period: nothing is in Kubernetes yet to coalesce with.
                        // Owned objects absent from it can now be deleted.
                        state.enqueue(all_names(&catalog, &services, &slices, &endpoints));
                    }
                },
                batch = changes.next_batch() => {
                    debug!(size = batch.len(), "batch due");
                    state.enqueue(batch);
                }
                Some(name) = state.retries.next() => state.enqueue([name]),
                Some((name, changed_at, result)) = running.next(), if !running.is_empty() => state.finished(name, changed_at, result),
                Some(()) = allow_rx.recv() => {
                    state.guard.allow();
                    let held = std::mem::take(&mut state.held);
                    info!(count = held.len(), "operator allowed the held deletions");
                    state.enqueue(held);
                }
                _ = sleep_until_opt(recheck) => {
                    state.recheck_at = None;
                    let held = std::mem::take(&mut state.held);
                    state.enqueue(held);
                }
                _ = ticker.tick() => {}
                _ = resync.tick() => changes.push(all_names(&catalog, &services, &slices, &endpoints)),
                Ok(()) = leader.changed() => {
                    let now_leader = *leader.borrow_and_update();
                    if now_leader != state.leader {
                        state.leader = now_leader;
                        state.status.send_modify(|s| s.leader = now_leader);
                        if now_leader {
                            info!("acquired the lease: comparing every service and writing the differences");
                            state.synced_batch_pending = catalog.is_synced();
                            state.enqueue(all_names(&catalog, &services, &slices, &endpoints));
                        } else {
                            warn!("lost the lease: writes stopped; caches stay warm");
                        }
                    }
                }
            }
            let source = SourceLabels { source: cfg.source };
            state
                .metrics
                .managed_services
                .get_or_create(&source)
                .set(services.service_count() as i64);
            state
                .metrics
                .managed_endpoints
                .get_or_create(&source)
                .set(catalog.endpoint_count() as i64);
        }
        info!(
            in_flight = running.len(),
            "shutting down: finishing the writes in flight"
        );
        while running.next().await.is_some() {}
        info!("sink stopped");
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => futures::future::pending().await,
    }
}

fn all_names(
    catalog: &Catalog,
    services: &ObjectCache<Service>,
    slices: &ObjectCache<EndpointSlice>,
    endpoints: &ObjectCache<Endpoints>,
) -> Vec<String> {
    let mut names: BTreeSet<String> = catalog.kube_names().into_iter().collect();
    names.extend(services.service_names());
    names.extend(slices.service_names());
    names.extend(endpoints.service_names());
    names.into_iter().collect()
}

type ReconcileResult = Result<Reconciled, writer::WriteError>;
/// A finished reconcile: the name, when its registry change happened (if one did), and
/// the result.
type Finished = (String, Option<Instant>, ReconcileResult);
type Running = FuturesUnordered<futures::future::BoxFuture<'static, Finished>>;

/// The loop's own state; only the loop task touches it, so it needs no locks.
struct LoopState {
    ctx: Arc<ReconcileContext>,
    catalog: Arc<Catalog>,
    metrics: Arc<SinkMetrics>,
    status: watch::Sender<SinkStatus>,
    concurrency: usize,
    /// Names ready to reconcile, in order, without duplicates (`queued`).
    queue: VecDeque<String>,
    queued: HashSet<String>,
    /// Names being reconciled now; a name queued again meanwhile is marked `dirty`
    /// and re-queued when its reconcile ends, so one name never runs twice at once.
    in_flight: HashSet<String>,
    dirty: HashSet<String>,
    retries: RetryQueue,
    guard: DeletionGuard,
    held: BTreeSet<String>,
    recheck_at: Option<Instant>,
    /// The catalog is synced and the next drained queue completes the initial sync.
    synced_batch_pending: bool,
    batch_failures: usize,
    /// Something was reconciled since the queue last drained.
    batch_ran: bool,
    /// Reconciles start only while this process may write.
    leader: bool,
    events: events::Events,
    /// When the registry first changed each service since its last reconcile started:
    /// the start of the registry-change-to-write latency.
    changed_at: HashMap<String, Instant>,
}

impl LoopState {
    fn enqueue(&mut self, names: impl IntoIterator<Item = String>) {
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
                        if let Some(svc) = self.ctx.services.get_named(name, name) {
                            self.events.deletion_held(
                                events::reference(svc.as_ref()),
                                managed.len(),
                                orphans,
                            );
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

    fn start_ready(&mut self, running: &mut Running) {
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

    fn finished(&mut self, name: String, changed_at: Option<Instant>, result: ReconcileResult) {
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
                        if let Some(svc) = self.ctx.services.get_named(&name, &name) {
                            self.events.sync_failing(
                                events::reference(svc.as_ref()),
                                attempts,
                                &error_chain(&err),
                            );
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
