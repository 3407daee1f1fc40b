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
pub mod project;
pub mod purge;
pub mod reconcile;
mod work;
pub mod writer;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use governor::{Quota, RateLimiter};
use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{Api, Client};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::catalog::{Catalog, CatalogEvent};
use crate::labels::owner_selector;
use crate::render::RenderConfig;
use backoff::{BackoffPolicy, RetryQueue};
use cache::{run_cache, ObjectCache};
use coalescer::Coalescer;
use guard::{DeletionGuard, GuardPolicy};
use metrics::{SinkMetrics, SourceLabels};
use reconcile::ReconcileContext;
use work::LoopState;
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

        let id = &cfg.render.connector_id;
        let services = Arc::new(ObjectCache::<Service>::new(&ns, id));
        let slices = Arc::new(ObjectCache::<EndpointSlice>::new(&ns, id));
        let endpoints = Arc::new(ObjectCache::<Endpoints>::new(&ns, id));
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
