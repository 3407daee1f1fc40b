//! The export engine: Kubernetes changes in, the fewest registry writes out.
//!
//! One loop owns the state (what this connector owns in the registry, per Service), so
//! it needs no locks beyond the watch index it reads. Kubernetes events name Services;
//! the names are coalesced (the same quiet and max periods as the other direction), and
//! a due batch is computed ([`super::desired`]), compared ([`super::plan`]) and written
//! in as few requests as the registry allows, under a rate limit. The mechanisms of the
//! other direction are reused, not copied: the [`Coalescer`], the per-key
//! [`RetryQueue`], the [`DeletionGuard`] and the Events.
//!
//! Safety: nothing is written before the three watches have listed and the registry's
//! owned entries have been read; a failed write makes the next pass read the registry
//! again first (never plan against a guessed state); removing every instance of more
//! than the guard's share of the managed Services at once is held. Only the lease
//! holder writes: every batch of a pass is raced against the leadership, so a lease
//! lost mid-pass abandons the batch in flight and writes none of the rest; every new
//! term (including a loss and a regain too quick for the loop to see) reads the
//! registry before its first pass, never trusting the view cached before the loss.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::desired::{desired_instances, DesiredConfig, Problem};
use super::metrics::ExportMetrics;
use super::model::{Instance, Registered, ServiceKey, Write};
use super::plan::{batches, plan};
use super::rejections::Rejections;
use super::select::SelectionConfig;
use super::watch::{spawn_watches, Change, ClusterIndex, SharedIndex, Watched};
use super::RegistryWriter;
use crate::registry::error_chain;
use crate::sink::backoff::{BackoffPolicy, RetryQueue};
use crate::sink::coalescer::Coalescer;
use crate::sink::events::{self, Events};
use crate::sink::guard::{DeletionGuard, GuardDecision, GuardPolicy};

/// The engine's settings.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    pub selection: SelectionConfig,
    pub desired: DesiredConfig,
    pub quiet_period: Duration,
    pub max_period: Duration,
    /// Read the registry and compare everything again this often (writes only what
    /// differs): what catches an entry removed behind the connector's back when the
    /// writer cannot watch for it.
    pub resync_period: Duration,
    /// Registry write requests per second, sustained, and the burst above it.
    pub write_qps: u32,
    pub write_burst: u32,
    pub retry: BackoffPolicy,
    pub guard: GuardPolicy,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            selection: SelectionConfig::default(),
            desired: DesiredConfig::default(),
            quiet_period: Duration::from_secs(1),
            max_period: Duration::from_secs(5),
            resync_period: Duration::from_secs(600),
            write_qps: 50,
            write_burst: 100,
            retry: BackoffPolicy::default(),
            guard: GuardPolicy::default(),
        }
    }
}

/// What the admin server and the tests see of the engine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportStatus {
    /// The three watches have listed.
    pub caches_ready: bool,
    /// The registry's owned entries have been read at least once.
    pub registry_read: bool,
    pub leader: bool,
    /// A complete pass has written everything it had to.
    pub initial_sync_done: bool,
    pub managed_services: usize,
    pub managed_instances: usize,
    /// Services (`namespace/name`) whose removal the guard holds.
    pub held_deletions: BTreeSet<String>,
}

/// A dry run's result: the writes a pass would make, and the removals the guard holds.
#[derive(Clone, Debug, Default)]
pub struct ExportPlan {
    pub writes: Vec<Write>,
    pub held: BTreeSet<String>,
}

/// Errors that end the engine (none of the registry's: those are retried).
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Shut down before the first complete view (a dry run that was interrupted).
    #[error("stopped before the Kubernetes watches and the registry were read")]
    Interrupted,
}

/// The Kubernetes → registry engine for one writer.
pub struct Exporter<W: RegistryWriter> {
    client: Client,
    writer: Arc<W>,
    cfg: ExportConfig,
    metrics: Arc<ExportMetrics>,
    status: watch::Sender<ExportStatus>,
    leader: Option<watch::Receiver<bool>>,
    events: Events,
}

impl<W: RegistryWriter> Exporter<W> {
    pub fn new(client: Client, writer: W, cfg: ExportConfig) -> Self {
        Self {
            events: Events::new(client.clone()),
            client,
            writer: Arc::new(writer),
            cfg,
            metrics: Arc::new(ExportMetrics::default()),
            status: watch::channel(ExportStatus::default()).0,
            leader: None,
        }
    }

    /// Writes only while `leader` says so.
    pub fn with_leadership(mut self, leader: watch::Receiver<bool>) -> Self {
        self.leader = Some(leader);
        self
    }

    pub fn with_events(mut self, events: Events) -> Self {
        self.events = events;
        self
    }

    pub fn metrics(&self) -> Arc<ExportMetrics> {
        self.metrics.clone()
    }

    pub fn writer(&self) -> Arc<W> {
        self.writer.clone()
    }

    /// Registers the engine's and the writer's metrics.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.metrics.register(registry, W::NAME);
        self.writer.register_metrics(registry);
    }

    pub fn status(&self) -> watch::Receiver<ExportStatus> {
        self.status.subscribe()
    }

    /// Syncs until `shutdown`. Registry errors never end it.
    pub async fn run(self, shutdown: CancellationToken) {
        let stop_watches = CancellationToken::new();
        let _stop = stop_watches.clone().drop_guard();
        let (index, mut changes) = self.start_watches(stop_watches.clone());
        let mut leader_rx = self.leader.clone();
        let mut state = State::new(&self);
        // Marked as seen: only later transitions wake the loop (and end a pass).
        state.set_leader(leader_rx.as_mut().is_none_or(|rx| *rx.borrow_and_update()));

        // The registry says when its copy may have changed behind our back.
        let (drift_tx, mut drift) = mpsc::channel::<()>(1);
        {
            let writer = self.writer.clone();
            let stop = stop_watches.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = writer.changed() => {}
                    }
                    if drift_tx.send(()).await.is_err() {
                        return;
                    }
                }
            });
        }

        let coalescer = Coalescer::new(self.cfg.quiet_period, self.cfg.max_period);
        let mut ready: BTreeSet<Watched> = BTreeSet::new();
        let mut resync = tokio::time::interval_at(
            Instant::now() + self.cfg.resync_period,
            self.cfg.resync_period.max(Duration::from_secs(1)),
        );
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut maintain: Option<CancellationToken> = None;

        loop {
            // A pass that saw the lease go has already stopped writing; the renewals of
            // a registry that needs them stop with it.
            if !state.leader {
                if let Some(stop) = maintain.take() {
                    stop.cancel();
                }
            }
            // A full pass is due when the view is complete and this process leads, and
            // either nothing was read yet or the registry must be read again.
            if ready.len() == 3 && state.leader && (state.owned.is_none() || state.full_pass_due) {
                if maintain.is_none() {
                    maintain = Some(self.start_maintain());
                }
                let keys = state.all_keys(&index);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = state.pass(&self, &index, keys, leader_rx.clone()) => {}
                }
                continue;
            }
            let recheck = state.recheck_at;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                change = changes.recv() => {
                    let Some(change) = change else { break };
                    match change {
                        Change::Ready(kind) => {
                            ready.insert(kind);
                            if ready.len() == 3 {
                                state.publish(|s| s.caches_ready = true);
                                info!("Kubernetes watches listed (Services, EndpointSlices, Nodes)");
                            }
                        }
                        Change::Services(keys) => {
                            state.touched(&keys);
                            coalescer.push(keys.iter().map(ServiceKey::to_path));
                        }
                        Change::Nodes => {
                            let keys = read(&index).node_port_services();
                            state.touched(&keys);
                            coalescer.push(keys.iter().map(ServiceKey::to_path));
                        }
                    }
                }
                batch = coalescer.next_batch(), if ready.len() == 3 && state.owned.is_some() && state.leader => {
                    let keys: Vec<ServiceKey> = batch.iter().filter_map(|p| ServiceKey::from_path(p)).collect();
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = state.pass(&self, &index, keys, leader_rx.clone()) => {}
                    }
                }
                Some(path) = state.retries.next(), if state.owned.is_some() && state.leader => {
                    if let Some(key) = ServiceKey::from_path(&path) {
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = state.pass(&self, &index, vec![key], leader_rx.clone()) => {}
                        }
                    }
                }
                _ = sleep_until(recheck), if recheck.is_some() && state.leader => {
                    state.recheck_at = None;
                    let held: Vec<ServiceKey> = state.held.iter().cloned().collect();
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = state.pass(&self, &index, held, leader_rx.clone()) => {}
                    }
                }
                _ = resync.tick() => {
                    debug!("periodic resync: reading the registry again");
                    state.full_pass_due = true;
                }
                Some(()) = drift.recv() => {
                    debug!(registry = W::NAME, "the registry's copy changed; reading it again");
                    state.full_pass_due = true;
                }
                changed = changed(&mut leader_rx) => {
                    let leads = changed.unwrap_or(false);
                    state.on_leadership::<W>(leads);
                    if !leads {
                        if let Some(stop) = maintain.take() {
                            stop.cancel();
                        }
                    }
                }
            }
        }
        if let Some(stop) = maintain.take() {
            stop.cancel();
        }
    }

    /// Reads everything once and returns the writes a pass would make (`--dry-run`).
    pub async fn plan_once(self, shutdown: CancellationToken) -> Result<ExportPlan, ExportError> {
        let stop_watches = CancellationToken::new();
        let _stop = stop_watches.clone().drop_guard();
        let (index, mut changes) = self.start_watches(stop_watches);
        let mut ready = BTreeSet::new();
        while ready.len() < 3 {
            tokio::select! {
                _ = shutdown.cancelled() => return Err(ExportError::Interrupted),
                change = changes.recv() => match change {
                    Some(Change::Ready(kind)) => { ready.insert(kind); }
                    Some(_) => {}
                    None => return Err(ExportError::Interrupted),
                },
            }
        }
        let mut state = State::new(&self);
        let registered = tokio::select! {
            _ = shutdown.cancelled() => return Err(ExportError::Interrupted),
            r = state.read_until_ok(&self) => r,
        };
        state.load(registered);
        let keys = state.all_keys(&index);
        let (writes, held) = state.compute(&self, &index, &keys);
        Ok(ExportPlan {
            writes,
            held: held.iter().map(ServiceKey::to_path).collect(),
        })
    }

    /// What deregisters every entry this connector owns (`--purge-on-exit`,
    /// `--purge`); usable after [`Exporter::run`] consumed the exporter.
    pub fn purger_handle(&self) -> Purger<W> {
        Purger {
            writer: self.writer.clone(),
        }
    }

    fn start_watches(
        &self,
        stop: CancellationToken,
    ) -> (SharedIndex, mpsc::UnboundedReceiver<Change>) {
        let index: SharedIndex = Arc::new(RwLock::new(ClusterIndex::default()));
        let (tx, rx) = mpsc::unbounded_channel();
        spawn_watches(self.client.clone(), index.clone(), tx, stop);
        (index, rx)
    }

    fn start_maintain(&self) -> CancellationToken {
        let stop = CancellationToken::new();
        let writer = self.writer.clone();
        let token = stop.clone();
        tokio::spawn(async move { writer.maintain(token).await });
        stop
    }
}

/// Deregisters every entry a writer owns.
pub struct Purger<W: RegistryWriter> {
    writer: Arc<W>,
}

impl<W: RegistryWriter> Purger<W> {
    /// Removes what the writer reads as owned, and nothing else; returns how many.
    pub async fn purge(&self) -> Result<usize, W::Error> {
        let registered = self.writer.read().await?;
        let writes: Vec<Write> = registered
            .instances
            .into_iter()
            .map(Write::Deregister)
            .collect();
        let mut count = writes.len();
        let max = self.writer.max_ops_per_request();
        for batch in batches(writes, max, |w| self.writer.cost(w)) {
            for rejected in self.writer.apply(&batch).await?.rejected {
                count = count.saturating_sub(1);
                if let Some(write) = batch.get(rejected.index) {
                    warn!(registry = W::NAME, instance = %write.instance().id, reason = %rejected.reason, "the registry refused to deregister this instance");
                }
            }
        }
        Ok(count)
    }
}

/// The leadership as one pass sees it (see [`State::pass`]).
struct Term(Option<watch::Receiver<bool>>);

impl Term {
    /// Resolves at the first leadership change the loop has not seen yet; never without
    /// an elector, or once the elector is gone (as the loop's [`changed`]).
    async fn changed(&mut self) {
        let gone = match &mut self.0 {
            Some(rx) => rx.changed().await.is_err(),
            None => true,
        };
        if gone {
            std::future::pending::<()>().await;
        }
    }
}

async fn changed(rx: &mut Option<watch::Receiver<bool>>) -> Option<bool> {
    match rx {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(*rx.borrow_and_update()),
            // The elector is gone: write nothing more.
            Err(_) => {
                std::future::pending::<()>().await;
                None
            }
        },
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn read(index: &SharedIndex) -> std::sync::RwLockReadGuard<'_, ClusterIndex> {
    index.read().unwrap_or_else(|e| e.into_inner())
}

/// The loop's own state.
struct State {
    /// What this connector owns in the registry, per Service, by instance id; `None`
    /// until the first read, or after a failure made it unreliable.
    owned: Option<BTreeMap<ServiceKey, BTreeMap<String, Instance>>>,
    full_pass_due: bool,
    leader: bool,
    retries: RetryQueue,
    guard: DeletionGuard,
    held: BTreeSet<ServiceKey>,
    /// Owned Services known to want no instance (removals planned, held or not yet
    /// confirmed): what the guard counts. Kept up to date by each pass for its own
    /// Services and by each confirmed removal, so that counting costs nothing per
    /// pass instead of a desired computation for every managed Service. Rebuilt by the
    /// pass after each read, which covers every Service (see [`State::pass`]).
    orphans: BTreeSet<ServiceKey>,
    recheck_at: Option<Instant>,
    /// The problems last reported per Service: reported again only when they change.
    reported: HashMap<ServiceKey, Vec<Problem>>,
    /// The writes the registry refused, reported once while they last.
    rejections: Rejections,
    shared_names: BTreeSet<String>,
    /// When Kubernetes first changed each Service since its last pass.
    changed_at: HashMap<ServiceKey, Instant>,
    limiter: DefaultDirectRateLimiter,
    status: watch::Sender<ExportStatus>,
    metrics: Arc<ExportMetrics>,
}

impl State {
    fn new<W: RegistryWriter>(ex: &Exporter<W>) -> Self {
        let qps = NonZeroU32::new(ex.cfg.write_qps.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(ex.cfg.write_burst.max(1)).unwrap_or(NonZeroU32::MIN);
        Self {
            owned: None,
            full_pass_due: true,
            leader: true,
            retries: RetryQueue::new(ex.cfg.retry),
            guard: DeletionGuard::new(ex.cfg.guard),
            held: BTreeSet::new(),
            orphans: BTreeSet::new(),
            recheck_at: None,
            reported: HashMap::new(),
            rejections: Rejections::default(),
            shared_names: BTreeSet::new(),
            changed_at: HashMap::new(),
            limiter: RateLimiter::direct(Quota::per_second(qps).allow_burst(burst)),
            status: ex.status.clone(),
            metrics: ex.metrics.clone(),
        }
    }

    fn publish(&self, f: impl FnOnce(&mut ExportStatus)) {
        self.status.send_modify(f);
    }

    fn set_leader(&mut self, leads: bool) {
        self.leader = leads;
        if !leads {
            // A new term starts from a fresh read.
            self.owned = None;
        }
        self.publish(|s| s.leader = leads);
    }

    /// A leadership change the elector reported. The elector reports transitions only
    /// (`send_if_modified`), so a notification that says "leading" while this loop
    /// thought it led means a loss in between, seen first by a pass or too short to be
    /// seen at all: another replica may have written meanwhile, so every new term
    /// starts from a fresh read, never from the view cached before the loss.
    fn on_leadership<W: RegistryWriter>(&mut self, leads: bool) {
        if leads {
            info!(
                registry = W::NAME,
                "leading: reading the registry before the first pass"
            );
            self.set_leader(true);
            self.owned = None;
            self.full_pass_due = true;
        } else if self.leader {
            info!(registry = W::NAME, "lost the lease: writing nothing more");
            self.set_leader(false);
        }
    }

    /// The lease went (or went and came back) while a pass was under way: what it
    /// had not written yet is left to the next term, which reads the registry first
    /// (the batch in flight may or may not have been applied).
    fn lost_lease_mid_pass<W: RegistryWriter>(&mut self, unwritten: usize) {
        info!(
            registry = W::NAME,
            unwritten, "the lease changed during a pass: the rest of it is not written"
        );
        self.set_leader(false);
    }

    fn touched(&mut self, keys: &[ServiceKey]) {
        let now = Instant::now();
        for key in keys {
            self.changed_at.entry(key.clone()).or_insert(now);
        }
    }

    /// Every Service the index knows and every one we own entries for.
    fn all_keys(&self, index: &SharedIndex) -> Vec<ServiceKey> {
        let mut keys: BTreeSet<ServiceKey> = read(index).service_keys().into_iter().collect();
        if let Some(owned) = &self.owned {
            keys.extend(owned.keys().cloned());
        }
        keys.into_iter().collect()
    }

    async fn read_until_ok<W: RegistryWriter>(&self, ex: &Exporter<W>) -> Registered {
        let mut attempt = 0u32;
        loop {
            match ex.writer.read().await {
                Ok(r) => {
                    self.metrics.record_request(W::NAME, "read", true);
                    return r;
                }
                Err(e) => {
                    self.metrics.record_request(W::NAME, "read", false);
                    attempt += 1;
                    let delay = ex.cfg.retry.delay(attempt);
                    warn!(registry = W::NAME, error = %error_chain(&e), retry_in = ?delay, "cannot read the connector's registrations");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    fn load(&mut self, registered: Registered) {
        let mut owned: BTreeMap<ServiceKey, BTreeMap<String, Instance>> = BTreeMap::new();
        for instance in registered.instances {
            owned
                .entry(instance.source.clone())
                .or_default()
                .insert(instance.id.clone(), instance);
        }
        if registered.shared_names != self.shared_names && !registered.shared_names.is_empty() {
            info!(
                names = ?registered.shared_names.iter().take(20).collect::<Vec<_>>(),
                count = registered.shared_names.len(),
                "registry services that also hold entries this connector does not own (left untouched)"
            );
        }
        self.shared_names = registered.shared_names;
        // Recounted by the pass that follows, over every Service.
        self.orphans.clear();
        self.metrics
            .shared_names
            .set(self.shared_names.len() as i64);
        self.owned = Some(owned);
        self.publish_counts();
        self.publish(|s| s.registry_read = true);
    }

    fn publish_counts(&self) {
        let (services, instances) = self
            .owned
            .as_ref()
            .map(|o| (o.len(), o.values().map(|m| m.len()).sum()))
            .unwrap_or((0, 0));
        self.metrics.managed_services.set(services as i64);
        self.metrics.managed_instances.set(instances as i64);
        self.metrics.held_deletions.set(self.held.len() as i64);
        let held: BTreeSet<String> = self.held.iter().map(ServiceKey::to_path).collect();
        self.status.send_if_modified(|s| {
            let changed = s.managed_services != services
                || s.managed_instances != instances
                || s.held_deletions != held;
            s.managed_services = services;
            s.managed_instances = instances;
            s.held_deletions = held;
            changed
        });
    }

    /// The instances `key` should have (none when the Service is gone or not selected).
    fn desired<W: RegistryWriter>(
        &mut self,
        ex: &Exporter<W>,
        ix: &ClusterIndex,
        key: &ServiceKey,
    ) -> Vec<Instance> {
        let Some(svc) = ix.service(key) else {
            self.reported.remove(key);
            return Vec::new();
        };
        let name = match ex.cfg.selection.decide(&svc) {
            Ok(name) => name,
            Err(_) => {
                self.reported.remove(key);
                return Vec::new();
            }
        };
        let desired = desired_instances(
            &svc,
            &name,
            ix.slices_ref(key),
            |n| ix.node_ref(n),
            &ex.cfg.desired,
        );
        self.report(key, desired.problems);
        let mut instances = desired.instances;
        for instance in &mut instances {
            ex.writer.normalize(instance);
        }
        instances
    }

    fn report(&mut self, key: &ServiceKey, problems: Vec<Problem>) {
        let before = self.reported.get(key).cloned().unwrap_or_default();
        if before == problems {
            return;
        }
        for problem in problems.iter().filter(|p| !before.contains(p)) {
            self.metrics
                .problems
                .get_or_create(&super::metrics::ReasonLabels {
                    reason: problem.reason(),
                })
                .inc();
            warn!(service = %key, reason = problem.reason(), "{problem}");
        }
        if problems.is_empty() {
            self.reported.remove(key);
        } else {
            self.reported.insert(key.clone(), problems);
        }
    }

    /// The writes for `keys`, and the Services whose removal the guard holds.
    fn compute<W: RegistryWriter>(
        &mut self,
        ex: &Exporter<W>,
        index: &SharedIndex,
        keys: &[ServiceKey],
    ) -> (Vec<Write>, BTreeSet<ServiceKey>) {
        let ix = read(index);
        let empty = BTreeMap::new();
        let mut writes = Vec::new();
        let mut removals = Vec::new();
        for key in keys {
            let desired = self.desired(ex, &ix, key);
            let owned = self
                .owned
                .as_ref()
                .and_then(|o| o.get(key))
                .unwrap_or(&empty);
            self.rejections.retain(key, |id| {
                owned.contains_key(id) || desired.iter().any(|d| d.id == id)
            });
            if desired.is_empty() && !owned.is_empty() {
                self.orphans.insert(key.clone());
                removals.push(key.clone());
                continue;
            }
            self.orphans.remove(key);
            self.held.remove(key);
            writes.extend(plan(&desired, owned.values()));
        }
        let mut held = BTreeSet::new();
        if !removals.is_empty() {
            // This pass's removals, the held ones and those not confirmed yet: every
            // Service whose desired state went empty has been through a pass (the
            // change that emptied it named it), so nothing needs computing again here.
            let managed = self.owned.as_ref().map_or(0, BTreeMap::len);
            let orphans = self.orphans.len();
            let was_holding = self.guard.is_holding();
            match self.guard.evaluate(managed, orphans, Instant::now()) {
                GuardDecision::Proceed => {
                    for key in &removals {
                        self.held.remove(key);
                        let current = self
                            .owned
                            .as_ref()
                            .and_then(|o| o.get(key))
                            .unwrap_or(&empty);
                        writes.extend(plan(std::iter::empty(), current.values()));
                    }
                }
                GuardDecision::Hold { since, recheck_at } => {
                    if !was_holding {
                        warn!(
                            registry = W::NAME,
                            managed,
                            would_remove = orphans,
                            held_for = ?since.elapsed(),
                            "mass deregistration held: the Kubernetes view would remove too many registered services"
                        );
                        for key in removals.iter().take(events::MAX_HELD_EVENTS) {
                            ex.events.deletion_held(service_ref(key), managed, orphans);
                        }
                    }
                    self.recheck_at = Some(recheck_at);
                    held.extend(removals.iter().cloned());
                    self.held.extend(removals);
                }
            }
        }
        (writes, held)
    }

    /// One pass over `keys`: read the registry first when needed, compute, write.
    ///
    /// `lease` is a copy of the loop's leadership receiver: any change the loop has not
    /// handled yet (a loss; a loss and a new term) ends the pass before its next write
    /// and abandons the one in flight, so that a replica that lost the lease never
    /// writes over its successor. Only the lease holder writes, including mid-pass.
    async fn pass<W: RegistryWriter>(
        &mut self,
        ex: &Exporter<W>,
        index: &SharedIndex,
        mut keys: Vec<ServiceKey>,
        lease: Option<watch::Receiver<bool>>,
    ) {
        let mut term = Term(lease);
        if self.owned.is_none() || self.full_pass_due {
            let registered = tokio::select! {
                biased;
                () = term.changed() => None,
                registered = self.read_until_ok(ex) => Some(registered),
            };
            let Some(registered) = registered else {
                self.lost_lease_mid_pass::<W>(0);
                return;
            };
            self.load(registered);
            // Every Service after a read, whatever the pass was for: the keys a full
            // pass was given were listed before the read, without the Services that
            // left Kubernetes while nothing was cached (a new term, a failed write), and
            // the orphan count is rebuilt from this pass alone.
            keys = self.all_keys(index);
            self.full_pass_due = false;
        }
        let (writes, _held) = self.compute(ex, index, &keys);
        self.publish_counts();
        let mut failed: BTreeMap<ServiceKey, String> = BTreeMap::new();
        let mut written: BTreeSet<ServiceKey> = BTreeSet::new();
        let max = ex.writer.max_ops_per_request();
        let count = writes.len();
        let batches = batches(writes, max, |w| ex.writer.cost(w));
        let mut unwritten = count;
        for batch in batches {
            let limiter = &self.limiter;
            let result = tokio::select! {
                // A change already seen wins over a write that could go at once.
                biased;
                () = term.changed() => None,
                result = async {
                    limiter.until_ready().await;
                    ex.writer.apply(&batch).await
                } => Some(result),
            };
            let Some(result) = result else {
                self.lost_lease_mid_pass::<W>(unwritten);
                return;
            };
            unwritten -= batch.len();
            self.metrics
                .record_request(W::NAME, "write", result.is_ok());
            match result {
                Ok(applied) => {
                    let rejected: BTreeMap<usize, String> = applied
                        .rejected
                        .into_iter()
                        .map(|r| (r.index, r.reason))
                        .collect();
                    for (index, write) in batch.into_iter().enumerate() {
                        if let Some(reason) = rejected.get(&index) {
                            self.rejected::<W>(ex, &write, reason);
                            continue;
                        }
                        self.metrics.record_write(W::NAME, write.op(), true);
                        self.rejections.accepted(write.instance());
                        written.insert(write.instance().source.clone());
                        self.record(write);
                    }
                }
                Err(e) => {
                    let error = error_chain(&e);
                    warn!(registry = W::NAME, writes = batch.len(), error = %error, "registry write failed; reading the registry again before the retry");
                    for write in &batch {
                        self.metrics.record_write(W::NAME, write.op(), false);
                        failed.insert(write.instance().source.clone(), error.clone());
                    }
                    // Whatever was applied is read back before anything else is planned.
                    self.full_pass_due = true;
                }
            }
        }
        if count > 0 {
            debug!(
                registry = W::NAME,
                writes = count,
                failed = failed.len(),
                "pass written"
            );
        }
        let now = Instant::now();
        for key in &keys {
            let path = key.to_path();
            if let Some(error) = failed.get(key) {
                let delay = self.retries.failed(&path);
                let attempts = self.retries.attempts(&path);
                debug!(service = %key, attempts, retry_in = ?delay, "will retry");
                if attempts == events::FAILURES_BEFORE_EVENT
                    || (attempts > events::FAILURES_BEFORE_EVENT && attempts.is_multiple_of(10))
                {
                    ex.events.sync_failing(
                        service_ref(key),
                        attempts,
                        &format!("registering in {}: {error}", W::NAME),
                    );
                }
                continue;
            }
            self.retries.succeeded(&path);
            if let Some(at) = self.changed_at.remove(key) {
                if written.contains(key) {
                    self.metrics
                        .change_to_write
                        .observe(now.duration_since(at).as_secs_f64());
                }
            }
        }
        self.publish_counts();
        if failed.is_empty() && self.retries.is_empty() && !self.full_pass_due {
            if let Ok(since_epoch) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
                self.metrics
                    .last_sync_timestamp
                    .set(since_epoch.as_secs() as i64);
            }
            let first = !self.status.borrow().initial_sync_done;
            if first {
                info!(
                    registry = W::NAME,
                    services = self.owned.as_ref().map_or(0, |o| o.len()),
                    "initial sync to the registry done"
                );
                self.publish(|s| s.initial_sync_done = true);
            }
        }
    }

    /// A write the registry refused while it took the rest of its batch: counted every
    /// time, logged and reported on the Service once while it lasts. Not recorded as
    /// owned, so the Service's next pass (a Kubernetes change, the periodic resync)
    /// plans it again; not a failure, so it neither backs the Service off nor holds
    /// up the initial sync for the instances that went through.
    fn rejected<W: RegistryWriter>(&mut self, ex: &Exporter<W>, write: &Write, reason: &str) {
        self.metrics.record_write(W::NAME, write.op(), false);
        self.metrics.record_rejected(W::NAME, write.op());
        let instance = write.instance();
        if !self.rejections.refused(instance, reason) {
            return;
        }
        warn!(
            registry = W::NAME,
            service = %instance.source,
            instance = %instance.id,
            op = write.op(),
            reason,
            "the registry refused this write (the rest of the batch was written); tried again at the Service's next pass"
        );
        let verb = match write {
            Write::Register(_) => "register",
            Write::SetHealth(_) => "set the health of",
            Write::Deregister(_) => "deregister",
        };
        ex.events
            .write_rejected(service_ref(&instance.source), verb, &instance.id, reason);
    }

    /// Keeps `owned` in step with a write the registry accepted.
    fn record(&mut self, write: Write) {
        let Some(owned) = self.owned.as_mut() else {
            return;
        };
        match write {
            Write::Register(i) | Write::SetHealth(i) => {
                owned
                    .entry(i.source.clone())
                    .or_default()
                    .insert(i.id.clone(), i);
            }
            Write::Deregister(i) => {
                if let Some(map) = owned.get_mut(&i.source) {
                    map.remove(&i.id);
                    if map.is_empty() {
                        owned.remove(&i.source);
                        self.orphans.remove(&i.source);
                    }
                }
            }
        }
    }
}

fn service_ref(key: &ServiceKey) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Service".into()),
        namespace: Some(key.namespace.clone()),
        name: Some(key.name.clone()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
