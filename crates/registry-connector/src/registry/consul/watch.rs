//! The watch loops: the first complete snapshot, one blocking query on the service list,
//! a blocking query per service for as many services as the connection budget allows
//! ([`super::budget`]), and, for the rest (the shared mode), one catalog-wide check watch
//! ([`super::checks`]), the re-read queue ([`super::refresh`]) and a slow sweep.
//!
//! Cost model: with a long poll per service (HTTP/2, or few services), a change to one
//! instance wakes only the blocking query of its service (Consul keeps an index per
//! service) and, when an instance was registered or deregistered, the service-list query
//! too; one change costs O(1) requests. In the shared mode a change costs one answer of
//! the check watch (the whole check table) and one plain read of each service it names.
//! Nothing walks all services against Consul after the first snapshot except the sweep,
//! which re-reads each service without a long poll once per [`SWEEP_PERIOD`].
//!
//! Owns: the order of publication (the snapshot goes to the catalog in one
//! `replace_all`, only once every selected service has answered; watchers start after
//! it), which services get a long poll (instances without checks first: the check watch
//! cannot see them), the lifecycle of per-service watchers (started when a service is
//! selected, stopped and their names removed when it is not), and the index/pacing
//! discipline of every loop. Does not: decide what is selected or how instances map (see
//! [`super::select`]), or give up (errors are retried with backoff until shutdown).
//! Shutdown never removes anything from the catalog.

use std::collections::hash_map::{DefaultHasher, Entry};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::catalog::Catalog;
use crate::model::{MicroSvcMeta, MicroSvcName};
use crate::registry::metadata::MetadataIssue;
use crate::registry::reported::Reported;
use crate::registry::{error_chain, retry_until_ok, Pacer, PacerConfig, SourceNote};

use super::api::{next_index, CatalogServices, HealthEntry};
use super::budget::{Plan, WatchMode};
use super::checks::CheckIndex;
use super::error::ConsulError;
use super::http::{ConsulHttp, Via};
use super::metrics::ConsulMetrics;
use super::multiplex::Multiplexer;
use super::refresh::{Cause, RefreshQueue};
use super::select::{Built, IgnoredTag, Selection, SkippedInstance};

/// The wait of a watcher's first blocking query: short, so that a first poll lost in a
/// start-up burst (a reset connection, a dropped packet) is retried within seconds, not
/// after the 5-minute wait. Later queries use the configured wait.
const FIRST_WAIT: Duration = Duration::from_secs(10);
/// Spread of the first waits, so that thousands of watchers do not return together.
const FIRST_WAIT_JITTER_MS: u64 = 5_000;
/// The second wait is a random share of the configured wait, from this fraction to all
/// of it: the long polls' returns then fall evenly over the whole wait, cycle after
/// cycle (from one half, 10,000 long polls returned over 5 minutes out of every 10, at
/// twice the mean rate, and were silent for the other 5).
const SPREAD_FROM: f64 = 0.1;

/// How long a re-read that came back older than the change it was asked for (a lagging
/// server answering a stale read) blocks for the change to arrive.
const CATCH_UP_WAIT: Duration = Duration::from_secs(10);

/// Over HTTP/1.1, a pause before a long poll's next request, so that the connection its
/// last answer came on is back in the pool (the pool hands it back from a task of its
/// own; a request that comes first opens a new connection, which the pool then keeps).
const HTTP1_REUSE_GRACE: Duration = Duration::from_millis(5);

/// Failed long polls are summed and logged at most this often: thousands of them fail
/// together when the agent restarts.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(30);

/// The sweep re-reads each service without a long poll once per this period: the
/// backstop for what the catalog-wide watches cannot see (an instance re-registered with
/// another address but the same checks).
pub const SWEEP_PERIOD: Duration = Duration::from_secs(600);
/// Shortest gap between two sweep reads.
const MIN_SWEEP_GAP: Duration = Duration::from_millis(10);

/// Least time between two answers of the check watch: each is the whole check table.
const CHECKS_MIN_INTERVAL: Duration = Duration::from_millis(250);
/// After an answer, the check watch also waits this many times what the answer took, so
/// that it spends at most a quarter of its time downloading and decoding.
const CHECKS_IDLE_FACTOR: u32 = 3;
/// Longest extra wait of the check watch.
const CHECKS_MAX_IDLE: Duration = Duration::from_secs(2);

/// Descriptors kept free for everything that is not a long poll (the Kubernetes client,
/// the admin server, log files).
const SPARE_FDS: u64 = 256;

/// What every loop of one source shares.
pub(crate) struct Shared {
    pub http: ConsulHttp,
    pub selection: Selection,
    pub catalog: Arc<Catalog>,
    pub metrics: Arc<ConsulMetrics>,
    /// The wait of the catalog-wide blocking queries.
    pub wait: Duration,
    /// The wait of the per-service long polls (longer over HTTP/2, see
    /// [`super::ConsulConfig::http2_poll_wait`]).
    pub poll_wait: Duration,
    pub pacing: PacerConfig,
    pub plan: Plan,
    /// What was already reported as left out, per Consul service.
    pub reported: Reported,
    /// Services to re-read (the shared mode).
    pub refresh: RefreshQueue,
    /// Every selected service.
    pub services: Mutex<HashMap<String, Arc<Tracked>>>,
    /// The degraded-mode note `/readyz` shows.
    pub note: SourceNote,
    /// Long-poll failures not yet logged.
    pub poll_failures: FailureLog,
}

/// Sums failures of many loops into one warning per [`FAILURE_LOG_EVERY`]: 10,000 long
/// polls failing together must not write 10,000 lines.
#[derive(Debug, Default)]
pub(crate) struct FailureLog {
    state: Mutex<(u64, Option<Instant>)>,
}

impl FailureLog {
    /// Counts one failure; returns the failures to report now (with this one), if due.
    fn failed(&self) -> Option<u64> {
        let mut state = lock(&self.state);
        state.0 += 1;
        let due = state.1.is_none_or(|at| at.elapsed() >= FAILURE_LOG_EVERY);
        if due {
            let count = std::mem::take(&mut state.0);
            state.1 = Some(Instant::now());
            Some(count)
        } else {
            None
        }
    }
}

/// One selected service's state, shared by whoever reads it (its long poll, or the
/// re-read workers).
#[derive(Debug, Default)]
pub(crate) struct Tracked {
    pub(super) state: Mutex<TrackedState>,
}

#[derive(Debug, Default)]
pub(super) struct TrackedState {
    /// The `X-Consul-Index` of the answer last published; a plain read older than it is
    /// dropped (a re-read racing a newer one).
    index: u64,
    /// The registry names this service has put into the catalog.
    published: Box<[MicroSvcName]>,
    /// Deselected: nothing may publish it any more.
    pub(super) removed: bool,
    /// It has a long poll of its own, which alone publishes it.
    polled: bool,
    /// Some instance has no check of its own (invisible to the check watch).
    checkless: bool,
}

/// Who publishes an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Publisher {
    Poll,
    Read,
}

impl Shared {
    /// Builds what `service` publishes; logs and counts what was newly left out (see
    /// [`Reported`]: a blocking query returns again and again with the same content).
    fn build(&self, service: &str, entries: &[HealthEntry]) -> Built {
        let built = self.selection.build(service, entries);
        let skip_key = |s: &SkippedInstance| format!("{}/{}", s.instance_id, s.reason.as_label());
        for skipped in self
            .reported
            .fresh(service, "instance", &built.skipped, skip_key)
        {
            self.metrics.reject(skipped.reason.as_label());
            warn!(
                service = %skipped.service,
                instance = %skipped.instance_id,
                node = %skipped.node,
                reason = %skipped.reason,
                "Consul instance left out"
            );
        }
        let tag_key = |t: &IgnoredTag| format!("{}/{}", t.instance_id, t.tag);
        for ignored in self
            .reported
            .fresh(service, "tag", &built.ignored_tags, tag_key)
        {
            warn!(
                service = %ignored.service,
                instance = %ignored.instance_id,
                tag = %ignored.tag,
                "ignoring a gRPC.port tag whose value is not a port in 1..=65535"
            );
        }
        let meta_key = |(name, issue): &(MicroSvcName, MetadataIssue)| format!("{name}/{issue}");
        for (name, issue) in self
            .reported
            .fresh(service, "meta", &built.metadata_issues, meta_key)
        {
            self.metrics.reject(issue.as_label());
            warn!(service = %name, reason = %issue, "Consul service meta left out");
        }
        built
    }

    /// Publishes one service's new state: upserts what it derives now (the catalog
    /// ignores unchanged values) and removes the derived names it no longer has. Returns
    /// whether it published: a removed service, a plain read of a service that has its
    /// own long poll, and a plain read older than what was published are dropped.
    pub(super) fn publish(
        &self,
        service: &str,
        tracked: &Tracked,
        index: u64,
        entries: &[HealthEntry],
        by: Publisher,
    ) -> bool {
        let mut state = lock(&tracked.state);
        if state.removed || (by == Publisher::Read && (state.polled || index < state.index)) {
            return false;
        }
        state.index = index;
        state.checkless = entries.iter().any(|e| !e.has_own_check());
        let built = self.build(service, entries);
        let names = built.names();
        for meta in built.services {
            self.catalog.upsert(meta);
        }
        for gone in state
            .published
            .iter()
            .filter(|name| names.binary_search(name).is_err())
        {
            self.catalog.remove(gone);
        }
        state.published = names;
        true
    }

    fn tracked(&self, service: &str) -> Option<Arc<Tracked>> {
        lock(&self.services).get(service).cloned()
    }

    /// Whether `service` is selected and has no long poll of its own.
    fn is_shared(&self, service: &str) -> bool {
        self.tracked(service)
            .is_some_and(|t| !lock(&t.state).polled)
    }

    /// Services without a long poll, for the sweep.
    fn shared_services(&self) -> Vec<String> {
        lock(&self.services)
            .iter()
            .filter(|(_, t)| !lock(&t.state).polled)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// After an index went backwards (a server restored from a snapshot): the indexes
    /// kept are meaningless, so every plain read counts again.
    fn reset_indexes(&self) {
        for tracked in lock(&self.services).values() {
            lock(&tracked.state).index = 0;
        }
    }
}

/// One per-service long poll: its own task (HTTP/1.1), or a record in the multiplexer
/// (HTTP/2).
enum Poller {
    Task(TaskPoller),
    Multiplexed,
}

/// A long poll running as its own task.
struct TaskPoller {
    stop: CancellationToken,
    handle: JoinHandle<()>,
}

/// The shared mode's catalog-wide tasks (check watch and sweep).
struct SharedWatch {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// Runs the source until `shutdown`.
pub(crate) async fn run(
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> Result<(), ConsulError> {
    let Some(initial) = initial_snapshot(&shared, &shutdown).await else {
        return Ok(());
    };
    shared.http.narrow_reads(shared.plan.reads);
    let multiplexer = (shared.plan.transport == super::budget::Transport::Http2)
        .then(|| Multiplexer::spawn(Arc::clone(&shared), &shutdown));
    let mut engine = Engine {
        shared: Arc::clone(&shared),
        shutdown: shutdown.clone(),
        multiplexer,
        polls: HashMap::new(),
        draining: Vec::new(),
        shared_watch: None,
        stopped: Vec::new(),
        workers: Vec::new(),
        tags: HashMap::new(),
        mode: None,
        fds_warned: false,
    };
    let list_index = initial.index;
    engine.start(initial);
    let result = engine.follow_list(list_index).await;
    engine.stop().await;
    result
}

/// The list loop's state: it alone starts and stops long polls and the shared watch.
struct Engine {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    /// Every HTTP/2 long poll (`None` over HTTP/1.1).
    multiplexer: Option<Multiplexer>,
    polls: HashMap<String, Poller>,
    /// HTTP/1.1 long polls of services gone, left to finish their request in flight:
    /// cancelling it would close a connection that Consul 1.8 keeps counting until the
    /// blocking query returns, so their places stay taken until then.
    draining: Vec<TaskPoller>,
    shared_watch: Option<SharedWatch>,
    /// Shared watches stopped (the mode left), awaited at shutdown.
    stopped: Vec<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    /// A hash of each selected service's tag list (as the list reports it): a change
    /// names the service for a re-read in the shared mode.
    tags: HashMap<String, u64>,
    mode: Option<WatchMode>,
    fds_warned: bool,
}

impl Engine {
    fn start(&mut self, initial: Initial) {
        let mut order: Vec<(bool, String, u64)> = Vec::with_capacity(initial.services.len());
        {
            let mut services = lock(&self.shared.services);
            for service in initial.services {
                let tracked = Arc::new(Tracked::default());
                {
                    let mut state = lock(&tracked.state);
                    state.index = service.index;
                    state.published = service.published;
                    state.checkless = service.checkless;
                }
                order.push((!service.checkless, service.name.clone(), service.index));
                services.insert(service.name, tracked);
            }
        }
        self.tags = initial.tags;
        // Instances without checks first: the check watch cannot see them.
        order.sort();
        for (_, name, index) in order {
            if self.polls.len() < self.shared.plan.long_polls {
                self.spawn_poller(name, index, true);
            }
        }
        for _ in 0..self.shared.plan.reads.max(1) {
            let shared = Arc::clone(&self.shared);
            let shutdown = self.shutdown.clone();
            self.workers.push(tokio::spawn(
                reread_worker(shared, shutdown).instrument(info_span!("consul_reread")),
            ));
        }
        self.settle(initial.checks);
    }

    /// Follows the service list until shutdown.
    async fn follow_list(&mut self, mut index: u64) -> Result<(), ConsulError> {
        let shared = Arc::clone(&self.shared);
        let mut pacer = Pacer::new(shared.pacing);
        loop {
            if !pacer.ready(&self.shutdown).await {
                return Ok(());
            }
            let result = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(()),
                r = shared.http.catalog_services(index, shared.wait) => r,
            };
            let services = match result {
                Ok(services) => services,
                Err(e) => {
                    let delay = pacer.failed();
                    warn!(error = %error_chain(&e), retry_in = ?delay, "watching the Consul service list failed");
                    continue;
                }
            };
            pacer.succeeded();
            let sent = index;
            index = next_index(sent, services.index);
            debug!(
                sent,
                returned = services.index,
                services = services.value.len(),
                "Consul service list answered"
            );
            self.restart_dead_pollers();
            if sent > 1 && services.index == sent {
                continue;
            }
            self.apply_list(&services.value).await;
            self.settle(None);
        }
    }

    /// Starts and stops what the new list asks for.
    async fn apply_list(&mut self, list: &CatalogServices) {
        let selected = self.shared.selection.selected(list);
        let gone: Vec<String> = lock(&self.shared.services)
            .keys()
            .filter(|name| !selected.contains(*name))
            .cloned()
            .collect();
        for name in gone {
            self.remove(&name).await;
        }
        for name in selected {
            let tags = tags_hash(list.get(&name).map(Vec::as_slice).unwrap_or_default());
            match self.tags.insert(name.clone(), tags) {
                None => self.add(name),
                Some(old) if old != tags && self.shared.is_shared(&name) => {
                    self.shared.refresh.request(&name, Cause::List);
                }
                Some(_) => {}
            }
        }
    }

    /// A newly selected service: a long poll when one is free (its first read publishes
    /// it), else a re-read.
    fn add(&mut self, name: String) {
        debug!(service = %name, "following a new Consul service");
        let tracked = Arc::new(Tracked::default());
        let inserted = match lock(&self.shared.services).entry(name.clone()) {
            Entry::Vacant(slot) => {
                slot.insert(tracked);
                true
            }
            Entry::Occupied(_) => false,
        };
        if !inserted {
            return;
        }
        // Places of long polls still draining are taken until their request returns.
        if self.polls.len() + self.draining.len() < self.shared.plan.long_polls {
            self.spawn_poller(name, 0, false);
        } else {
            self.shared.refresh.request(&name, Cause::List);
        }
    }

    /// A service gone or no longer selected: unpublish it, and let its long poll end
    /// with its request in flight (marked removed, it cannot publish again).
    async fn remove(&mut self, name: &str) {
        self.tags.remove(name);
        self.shared.refresh.forget(name);
        let Some(tracked) = lock(&self.shared.services).remove(name) else {
            return;
        };
        let published = {
            let mut state = lock(&tracked.state);
            state.removed = true;
            std::mem::take(&mut state.published)
        };
        self.shared.reported.forget(name);
        match self.polls.remove(name) {
            Some(Poller::Task(poller)) => self.draining.push(poller),
            Some(Poller::Multiplexed) => {
                if let Some(multiplexer) = &self.multiplexer {
                    multiplexer.stop_polling(name);
                }
            }
            None => {}
        }
        for registry_name in &published {
            self.shared.catalog.remove(registry_name);
        }
        info!(service = %name, removed = published.len(), "Consul service gone or no longer selected");
    }

    /// Hands free long polls to services without one (check-less first), starts or stops
    /// the shared watch, and updates the mode, its metrics and the readiness note.
    fn settle(&mut self, baseline: Option<(u64, CheckIndex)>) {
        // A draining long poll holds its place until its request returns.
        self.draining.retain(|p| !p.handle.is_finished());
        let taken = self.polls.len() + self.draining.len();
        let free = self.shared.plan.long_polls.saturating_sub(taken);
        let total = lock(&self.shared.services).len();
        // Only when some service has no long poll: with all of them polled (every
        // service over HTTP/2) a list answer must not walk 10,000 services.
        if free > 0 && total > self.polls.len() {
            let mut candidates: Vec<(bool, String, u64)> = lock(&self.shared.services)
                .iter()
                .filter(|(name, _)| !self.polls.contains_key(*name))
                .map(|(name, t)| {
                    let state = lock(&t.state);
                    (!state.checkless, name.clone(), state.index)
                })
                .collect();
            candidates.sort();
            for (_, name, index) in candidates.into_iter().take(free) {
                self.spawn_poller(name, index, index > 1);
            }
        }
        let shared_count = total.saturating_sub(self.polls.len());
        if shared_count > 0 && self.shared_watch.is_none() {
            self.shared_watch = Some(start_shared_watch(
                Arc::clone(&self.shared),
                &self.shutdown,
                baseline,
            ));
        } else if shared_count == 0 {
            if let Some(watch) = self.shared_watch.take() {
                watch.stop.cancel();
                self.stopped.extend(watch.tasks);
            }
        }
        self.report(total, shared_count);
    }

    fn report(&mut self, total: usize, shared_count: usize) {
        let shared = &self.shared;
        let plan = &shared.plan;
        let mode = if shared_count > 0 {
            WatchMode::Shared
        } else {
            plan.mode(0)
        };
        let metrics = &shared.metrics;
        metrics.watched_services.set(total as i64);
        metrics.long_polls.set(self.polls.len() as i64);
        metrics.shared_services.set(shared_count as i64);
        metrics.set_mode(mode);
        if self.mode != Some(mode) {
            let budget = budget_text(plan.connections);
            if mode.is_degraded() {
                warn!(
                    mode = %mode,
                    transport = plan.transport.as_str(),
                    services = total,
                    long_polls = self.polls.len(),
                    connection_budget = %budget,
                    "more Consul services than long polls fit in the connection budget: the others are followed through catalog-wide watches (a change costs one answer of /v1/health/state/any and one read; a change that moves no check waits for the sweep); use HTTPS (HTTP/2 carries 200 long polls per connection) or raise the agent's limits.http_max_conns_per_client"
                );
            } else {
                info!(mode = %mode, transport = plan.transport.as_str(), services = total, connection_budget = %budget, "Consul watch mode");
            }
            self.mode = Some(mode);
        }
        shared.note.set(mode.is_degraded().then(|| {
            format!(
                "degraded: Consul watch in shared mode ({} of {total} services have a long poll over {} within a budget of {} connections; the others are followed through catalog-wide watches)",
                self.polls.len(),
                plan.transport.as_str(),
                budget_text(plan.connections),
            )
        }));
        let fds = (plan.descriptors_for(total) as u64).saturating_add(SPARE_FDS);
        let soft = rlimit::Resource::NOFILE
            .get()
            .map(|(soft, _)| soft)
            .unwrap_or(u64::MAX);
        let over = fds > soft;
        if over && !self.fds_warned {
            warn!(
                needed = fds,
                limit = soft,
                "the open-file limit is too low for the Consul long polls; raise it (ulimit -n, LimitNOFILE=) or lower --consul-max-connections"
            );
        }
        self.fds_warned = over;
    }

    fn spawn_poller(&mut self, name: String, index: u64, short_first_wait: bool) {
        let Some(tracked) = self.shared.tracked(&name) else {
            return;
        };
        lock(&tracked.state).polled = true;
        if let Some(multiplexer) = &self.multiplexer {
            multiplexer.start(&name, tracked, index, short_first_wait);
            self.polls.insert(name, Poller::Multiplexed);
            return;
        }
        let stop = self.shutdown.child_token();
        let span = info_span!("consul_service", service = %name);
        let handle = tokio::spawn(
            watch_service(
                Arc::clone(&self.shared),
                name.clone(),
                tracked,
                index,
                short_first_wait,
                stop.clone(),
            )
            .instrument(span),
        );
        self.polls
            .insert(name, Poller::Task(TaskPoller { stop, handle }));
    }

    /// A long poll that died (a bug) is restarted from a plain read; so is every
    /// multiplexed one when their task died.
    fn restart_dead_pollers(&mut self) {
        if self.shutdown.is_cancelled() {
            return;
        }
        let multiplexer_died = self
            .multiplexer
            .as_ref()
            .is_some_and(Multiplexer::is_finished);
        if multiplexer_died {
            warn!("the task of the Consul long polls stopped unexpectedly; restarting it");
            self.multiplexer = Some(Multiplexer::spawn(Arc::clone(&self.shared), &self.shutdown));
        }
        let dead: Vec<String> = self
            .polls
            .iter()
            .filter(|(_, p)| match p {
                Poller::Task(task) => task.handle.is_finished(),
                Poller::Multiplexed => multiplexer_died,
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in dead {
            warn!(service = %name, "a Consul service watcher stopped unexpectedly; restarting it");
            self.polls.remove(&name);
            self.spawn_poller(name, 0, false);
        }
    }

    /// Shutdown: every task's token is a child of `shutdown`, so all are stopping; wait
    /// for them so that no request outlives `run`. Nothing is unpublished.
    async fn stop(self) {
        let tasks = self.polls.into_values().filter_map(|p| match p {
            Poller::Task(task) => Some(task),
            Poller::Multiplexed => None,
        });
        for poller in tasks.chain(self.draining) {
            poller.stop.cancel();
            let _ = poller.handle.await;
        }
        if let Some(multiplexer) = self.multiplexer {
            multiplexer.shutdown().await;
        }
        for task in self.stopped {
            let _ = task.await;
        }
        if let Some(watch) = self.shared_watch {
            watch.stop.cancel();
            for task in watch.tasks {
                let _ = task.await;
            }
        }
        for worker in self.workers {
            let _ = worker.await;
        }
    }
}

fn budget_text(connections: usize) -> String {
    if connections == usize::MAX {
        "unlimited".to_string()
    } else {
        connections.to_string()
    }
}

fn tags_hash(tags: &[String]) -> u64 {
    let mut hasher = DefaultHasher::new();
    tags.hash(&mut hasher);
    hasher.finish()
}

/// One service of the first snapshot.
struct InitialService {
    name: String,
    index: u64,
    published: Box<[MicroSvcName]>,
    checkless: bool,
}

struct Initial {
    /// The index to block on for the service list.
    index: u64,
    services: Vec<InitialService>,
    tags: HashMap<String, u64>,
    /// The check watch's starting point, read before the services when the snapshot
    /// already needs the shared mode (a check that changes during the snapshot is then
    /// seen by the watch's first blocking answer).
    checks: Option<(u64, CheckIndex)>,
}

/// Lists the services, fetches every selected one (bounded concurrency, each retried
/// until it answers), and hands the catalog one complete snapshot. `None` on shutdown.
async fn initial_snapshot(shared: &Arc<Shared>, shutdown: &CancellationToken) -> Option<Initial> {
    let services = retry_until_ok(
        shared.pacing,
        shutdown,
        || shared.http.catalog_services(0, shared.wait),
        |e, delay| {
            warn!(
                error = %error_chain(e),
                retry_in = ?delay,
                "waiting for Consul: cannot list services (nothing is published or deleted until it answers)"
            );
        },
    )
    .await?;
    let (index, list) = (next_index(0, services.index), services.value);
    let selected = shared.selection.selected(&list);
    let tags: HashMap<String, u64> = selected
        .iter()
        .map(|name| {
            let tags = list.get(name).map(Vec::as_slice).unwrap_or_default();
            (name.clone(), tags_hash(tags))
        })
        .collect();
    drop(list);
    let checks = if selected.len() > shared.plan.long_polls {
        Some(read_checks_until_ok(shared, shutdown).await?)
    } else {
        None
    };
    info!(
        services = selected.len(),
        "fetching the first snapshot of Consul services"
    );
    let concurrency = shared.plan.snapshot_reads.max(1);
    let fetched: Vec<Option<(String, u64, bool, Built)>> = futures::stream::iter(selected)
        .map(|name| {
            let shared = Arc::clone(shared);
            let shutdown = shutdown.clone();
            async move {
                let (index, entries) = fetch_until_ok(&shared, &name, &shutdown).await?;
                let checkless = entries.iter().any(|e| !e.has_own_check());
                let built = shared.build(&name, &entries);
                Some((name, index, checkless, built))
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    if shutdown.is_cancelled() {
        return None;
    }
    let mut services = Vec::with_capacity(fetched.len());
    let mut metas: Vec<MicroSvcMeta> = Vec::new();
    for (name, index, checkless, built) in fetched.into_iter().flatten() {
        services.push(InitialService {
            name,
            index,
            published: built.names(),
            checkless,
        });
        metas.extend(built.services);
    }
    info!(
        services = services.len(),
        published = metas.len(),
        "first Consul snapshot complete"
    );
    shared.catalog.replace_all(metas);
    Some(Initial {
        index,
        services,
        tags,
        checks,
    })
}

/// One plain read of a service's instances, retried with backoff until it answers.
async fn fetch_until_ok(
    shared: &Shared,
    name: &str,
    shutdown: &CancellationToken,
) -> Option<(u64, Vec<HealthEntry>)> {
    let answer = retry_until_ok(
        shared.pacing,
        shutdown,
        || shared.http.health_service(name, 0, shared.wait, Via::Read),
        |e, delay| {
            warn!(service = %name, error = %error_chain(e), retry_in = ?delay, "cannot read a Consul service");
        },
    )
    .await?;
    Some((next_index(0, answer.index), answer.value))
}

/// The check table once (the check watch's starting point), retried until it answers.
async fn read_checks_until_ok(
    shared: &Shared,
    shutdown: &CancellationToken,
) -> Option<(u64, CheckIndex)> {
    let answer = retry_until_ok(
        shared.pacing,
        shutdown,
        || shared.http.health_state(0, shared.wait),
        |e, delay| {
            warn!(error = %error_chain(e), retry_in = ?delay, "cannot read Consul's check state");
        },
    )
    .await?;
    let mut checks = CheckIndex::default();
    checks.update(&answer.value);
    Some((next_index(0, answer.index), checks))
}

/// The wait of a long poll's next blocking query: short for the first (see
/// [`FIRST_WAIT`]), then once a random share of the configured wait (so that watchers
/// started together do not keep returning together), then the configured wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum WaitStep {
    First,
    Spread,
    Steady,
}

impl WaitStep {
    pub(super) fn wait(self, configured: Duration) -> Duration {
        match self {
            Self::First => {
                FIRST_WAIT + Duration::from_millis(rand::random_range(0..=FIRST_WAIT_JITTER_MS))
            }
            Self::Spread => configured.mul_f64(rand::random_range(SPREAD_FROM..=1.0)),
            Self::Steady => configured,
        }
    }

    pub(super) fn next(self) -> Self {
        match self {
            Self::First => Self::Spread,
            Self::Spread | Self::Steady => Self::Steady,
        }
    }
}

/// The blocking loop of one service. Returns when `stop` is cancelled or, after its
/// request in flight, once the service was removed.
async fn watch_service(
    shared: Arc<Shared>,
    name: String,
    tracked: Arc<Tracked>,
    mut index: u64,
    short_first_wait: bool,
    stop: CancellationToken,
) {
    let mut pacer = Pacer::new(shared.pacing);
    let slot = loop {
        let slot = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            slot = shared.http.poll_slot() => slot,
        };
        match slot {
            Ok(slot) => break slot,
            Err(e) => {
                let delay = pacer.failed();
                poll_failed(&shared, &name, &e, delay, true);
                if !pacer.ready(&stop).await {
                    return;
                }
            }
        }
    };
    let mut step = if short_first_wait {
        WaitStep::First
    } else {
        WaitStep::Spread
    };
    let http1 = shared.plan.transport == super::budget::Transport::Http1;
    loop {
        if !pacer.ready(&stop).await || lock(&tracked.state).removed {
            return;
        }
        let wait = step.wait(shared.poll_wait);
        let result = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = shared.http.health_service(&name, index, wait, Via::Poll(&slot)) => r,
        };
        match result {
            Ok(answer) => {
                pacer.succeeded();
                step = step.next();
                let sent = index;
                index = next_index(sent, answer.index);
                debug!(
                    sent,
                    returned = answer.index,
                    instances = answer.value.len(),
                    "Consul service answered"
                );
                if sent <= 1 || answer.index != sent {
                    shared.publish(
                        &name,
                        &tracked,
                        answer.index,
                        &answer.value,
                        Publisher::Poll,
                    );
                }
                if http1 {
                    tokio::time::sleep(HTTP1_REUSE_GRACE).await;
                }
            }
            Err(e) => {
                let delay = pacer.failed();
                poll_failed(&shared, &name, &e, delay, false);
            }
        }
    }
}

/// Logs a failed long poll (`placing`: it could not get a connection) in the sum of
/// every long poll's failures: 10,000 failing together write one line, not 10,000.
pub(super) fn poll_failed(
    shared: &Shared,
    service: &str,
    e: &ConsulError,
    delay: Duration,
    placing: bool,
) {
    match shared.poll_failures.failed() {
        Some(count) if placing => warn!(
            error = %error_chain(e),
            failed_requests = count,
            retry_in = ?delay,
            "cannot open a Consul connection for long polls"
        ),
        Some(count) => warn!(
            error = %error_chain(e),
            failed_requests = count,
            retry_in = ?delay,
            "watching Consul services failed (failures of every long poll since the last such line; each retries with backoff)"
        ),
        None => {
            debug!(service, error = %error_chain(e), retry_in = ?delay, "watching a Consul service failed")
        }
    }
}

/// Starts the check watch and the sweep.
fn start_shared_watch(
    shared: Arc<Shared>,
    shutdown: &CancellationToken,
    baseline: Option<(u64, CheckIndex)>,
) -> SharedWatch {
    let stop = shutdown.child_token();
    let checks = tokio::spawn(
        watch_checks(Arc::clone(&shared), baseline, stop.clone())
            .instrument(info_span!("consul_checks")),
    );
    let sweep = tokio::spawn(sweep(shared, stop.clone()).instrument(info_span!("consul_sweep")));
    SharedWatch {
        stop,
        tasks: vec![checks, sweep],
    }
}

/// The check watch: names the services without a long poll whose checks changed.
async fn watch_checks(
    shared: Arc<Shared>,
    baseline: Option<(u64, CheckIndex)>,
    stop: CancellationToken,
) {
    // Without a baseline, the first answer is one (it names nothing: the services it
    // would name were just read whole).
    let has_baseline = baseline.is_some();
    let (mut index, mut checks) = baseline.unwrap_or_default();
    let mut primed = has_baseline;
    let mut pacer = Pacer::new(PacerConfig {
        min_interval: shared.pacing.min_interval.max(CHECKS_MIN_INTERVAL),
        ..shared.pacing
    });
    loop {
        if !pacer.ready(&stop).await {
            return;
        }
        let result = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = shared.http.health_state(index, shared.wait) => r,
        };
        let answer = match result {
            Ok(answer) => answer,
            Err(e) => {
                let delay = pacer.failed();
                if pacer.failures() == 1 || pacer.failures().is_multiple_of(10) {
                    warn!(error = %error_chain(&e), failures = pacer.failures(), retry_in = ?delay, "watching Consul's check state failed");
                }
                continue;
            }
        };
        pacer.succeeded();
        let sent = index;
        index = next_index(sent, answer.index);
        if sent > 1 && answer.index == sent {
            continue;
        }
        if answer.index < sent {
            warn!(
                sent,
                returned = answer.index,
                "Consul's check index went backwards (a restored snapshot?): every service is read again"
            );
            shared.reset_indexes();
            for name in shared.shared_services() {
                shared.refresh.request(&name, Cause::Check);
            }
        }
        let update_started = Instant::now();
        let changed = checks.update(&answer.value);
        // What this answer cost: its transfer and decoding, and the diff (the blocking
        // wait before its headers is not work).
        let took = answer.transfer + update_started.elapsed();
        debug!(
            checks = checks.len(),
            changed = changed.len(),
            bytes = answer.bytes,
            took_ms = took.as_millis() as u64,
            "Consul check state answered"
        );
        if primed {
            for (name, min_index) in changed {
                if shared.is_shared(&name) {
                    shared.refresh.request_at(&name, Cause::Check, min_index);
                }
            }
        } else {
            // Started after the services it follows were read: a change between those
            // reads and this first answer would go unseen, so read them once more.
            for name in shared.shared_services() {
                shared.refresh.request(&name, Cause::Check);
            }
        }
        primed = true;
        drop(answer);
        // Each answer is the whole table: keep the watch's share of the time bounded.
        let idle = (took * CHECKS_IDLE_FACTOR).min(CHECKS_MAX_IDLE);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(idle) => {}
        }
    }
}

/// Re-reads every service without a long poll once per [`SWEEP_PERIOD`], evenly spread.
async fn sweep(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let names = shared.shared_services();
        let gap = if names.is_empty() {
            Duration::from_secs(1)
        } else {
            (SWEEP_PERIOD / names.len().max(1) as u32).max(MIN_SWEEP_GAP)
        };
        if names.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(gap) => continue,
            }
        }
        for name in names {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(gap) => {}
            }
            if shared.is_shared(&name) {
                shared.refresh.request(&name, Cause::Sweep);
            }
        }
    }
}

/// Reads the services the queue names, one at a time, and publishes what they say.
async fn reread_worker(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut pacer = Pacer::new(shared.pacing);
    loop {
        let (name, cause, min_index) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            next = shared.refresh.next() => next,
        };
        let Some(tracked) = shared.tracked(&name).filter(|t| !lock(&t.state).polled) else {
            shared.refresh.done(&name);
            continue;
        };
        shared.metrics.reread(cause.as_str());
        let result = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            r = reread(&shared, &name, min_index) => r,
        };
        shared.refresh.done(&name);
        match result {
            Ok(answer) => {
                pacer.succeeded();
                shared.publish(
                    &name,
                    &tracked,
                    answer.index,
                    &answer.value,
                    Publisher::Read,
                );
            }
            Err(e) => {
                let delay = pacer.failed();
                match shared.poll_failures.failed() {
                    Some(count) => warn!(
                        service = %name,
                        error = %error_chain(&e),
                        failed_requests = count,
                        retry_in = ?delay,
                        "re-reading a Consul service failed (failures of every Consul watch since the last such line)"
                    ),
                    None => {
                        debug!(service = %name, error = %error_chain(&e), "re-reading a Consul service failed")
                    }
                }
                if !pacer.ready(&shutdown).await {
                    return;
                }
                shared.refresh.request_at(&name, Cause::Retry, min_index);
            }
        }
    }
}

/// One plain read of `name`; when it is older than `min_index` (a server behind the one
/// the check watch heard from), one blocking read that returns as soon as it caught up.
async fn reread(
    shared: &Shared,
    name: &str,
    min_index: u64,
) -> Result<super::http::Indexed<Vec<HealthEntry>>, ConsulError> {
    let answer = shared
        .http
        .health_service(name, 0, shared.wait, Via::Read)
        .await?;
    if min_index <= 1 || answer.index >= min_index {
        return Ok(answer);
    }
    debug!(service = %name, got = answer.index, want = min_index, "a re-read is behind the change that asked for it; waiting for it");
    shared
        .http
        .health_service(name, min_index - 1, CATCH_UP_WAIT, Via::Read)
        .await
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The data is plain state; a panic elsewhere leaves it consistent enough to use.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::registry::consul::budget::{MaxConnections, Transport};
    use crate::registry::consul::config::ConsulConfig;

    pub(in crate::registry::consul) fn shared(cfg: &ConsulConfig) -> Shared {
        let metrics = Arc::new(ConsulMetrics::default());
        let (catalog, _rx) = Catalog::new();
        Shared {
            http: ConsulHttp::new(cfg, Arc::clone(&metrics)).expect("client"),
            selection: Selection::from_config(cfg),
            catalog: Arc::new(catalog),
            metrics,
            wait: Duration::from_secs(300),
            poll_wait: Duration::from_secs(300),
            pacing: PacerConfig::default(),
            plan: Plan::new(Transport::Http1, Some(200), MaxConnections::Auto, 4),
            reported: Reported::default(),
            refresh: RefreshQueue::default(),
            services: Mutex::default(),
            note: SourceNote::default(),
            poll_failures: FailureLog::default(),
        }
    }

    fn entry(tags: &str, checks: &str) -> HealthEntry {
        serde_json::from_str(&format!(
            r#"{{"Node":{{"Node":"n","Address":"198.51.100.1"}},"Service":{{"ID":"i","Service":"s","Tags":[{tags}],"Port":80}},"Checks":[{checks}]}}"#
        ))
        .expect("entry")
    }

    const OWN_CHECK: &str = r#"{"CheckID":"c","ServiceID":"i","Status":"passing"}"#;

    #[test]
    fn publish_upserts_and_removes_derived_names() {
        let cfg = ConsulConfig {
            prefix_tag: Some("pfx".into()),
            ..ConsulConfig::default()
        };
        let s = shared(&cfg);
        let tracked = Tracked::default();
        assert!(s.publish(
            "s",
            &tracked,
            5,
            &[entry(r#""pfx=blue""#, "")],
            Publisher::Poll
        ));
        assert!(s.catalog.contains("s"));
        assert!(s.catalog.contains("blue-s"));
        assert!(lock(&tracked.state).checkless);
        assert!(s.publish("s", &tracked, 6, &[entry("", OWN_CHECK)], Publisher::Poll));
        assert!(s.catalog.contains("s"));
        assert!(!s.catalog.contains("blue-s"));
        let state = lock(&tracked.state);
        assert_eq!(state.published.len(), 1);
        assert!(!state.checkless);
    }

    #[test]
    fn plain_reads_never_overwrite_newer_or_polled_state() {
        let s = shared(&ConsulConfig::default());
        let tracked = Tracked::default();
        assert!(s.publish("s", &tracked, 10, &[entry("", OWN_CHECK)], Publisher::Read));
        // An older read that lost the race is dropped.
        assert!(!s.publish("s", &tracked, 9, &[], Publisher::Read));
        assert!(s.catalog.contains("s"));
        // Once the service has its own long poll, only the poll publishes.
        lock(&tracked.state).polled = true;
        assert!(!s.publish("s", &tracked, 11, &[], Publisher::Read));
        assert!(s.publish("s", &tracked, 11, &[entry("", OWN_CHECK)], Publisher::Poll));
        // A removed service is never published again.
        lock(&tracked.state).removed = true;
        assert!(!s.publish("s", &tracked, 12, &[entry("", OWN_CHECK)], Publisher::Poll));
    }

    /// 10,000 of these futures wait at once, each its own task allocation: what they
    /// hold while waiting is most of the source's memory at scale (5.5 KB each when the
    /// connection set-up and the plain-read path were inlined in it).
    #[test]
    fn a_waiting_long_poll_stays_small() {
        let s = Arc::new(shared(&ConsulConfig::default()));
        let poll = watch_service(
            s,
            "s".into(),
            Arc::new(Tracked::default()),
            1,
            false,
            CancellationToken::new(),
        );
        let size = std::mem::size_of_val(&poll);
        eprintln!("watch_service future: {size} bytes");
        assert!(size <= 2048, "watch_service future: {size} bytes");
    }

    #[test]
    fn shared_services_are_those_without_a_long_poll() {
        let s = shared(&ConsulConfig::default());
        for (name, polled) in [("a", true), ("b", false), ("c", false)] {
            let tracked = Arc::new(Tracked::default());
            lock(&tracked.state).polled = polled;
            lock(&tracked.state).index = 7;
            lock(&s.services).insert(name.to_string(), tracked);
        }
        let mut names = s.shared_services();
        names.sort();
        assert_eq!(names, ["b", "c"]);
        assert!(s.is_shared("b") && !s.is_shared("a") && !s.is_shared("zzz"));
        s.reset_indexes();
        assert!(lock(&s.services)
            .values()
            .all(|t| lock(&t.state).index == 0));
    }

    #[test]
    fn failures_are_summed_between_log_lines() {
        let log = FailureLog::default();
        assert_eq!(log.failed(), Some(1));
        assert_eq!(log.failed(), None);
        assert_eq!(log.failed(), None);
        // Due again: the line carries every failure since the last one.
        lock(&log.state).1 = Some(Instant::now() - FAILURE_LOG_EVERY);
        assert_eq!(log.failed(), Some(3));
    }

    #[test]
    fn waits_go_short_then_spread_then_steady() {
        let configured = Duration::from_secs(300);
        let first = WaitStep::First.wait(configured);
        assert!(first >= FIRST_WAIT && first <= FIRST_WAIT + Duration::from_secs(5));
        let spread = WaitStep::Spread.wait(configured);
        assert!(
            spread >= configured.mul_f64(SPREAD_FROM) && spread <= configured,
            "{spread:?}"
        );
        assert_eq!(WaitStep::Steady.wait(configured), configured);
        assert_eq!(WaitStep::First.next(), WaitStep::Spread);
        assert_eq!(WaitStep::Spread.next(), WaitStep::Steady);
        assert_eq!(WaitStep::Steady.next(), WaitStep::Steady);
    }

    #[test]
    fn tag_hashes_follow_the_tags() {
        assert_eq!(tags_hash(&["a".into()]), tags_hash(&["a".into()]));
        assert_ne!(
            tags_hash(&["a".into()]),
            tags_hash(&["a".into(), "b".into()])
        );
    }

    #[test]
    fn error_chains_name_their_causes() {
        let e = ConsulError::ReadFile {
            what: "token",
            path: "/nonexistent".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        };
        assert_eq!(
            error_chain(&e),
            "cannot read the Consul token file /nonexistent: no such file"
        );
    }
}
