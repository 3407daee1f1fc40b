//! The watch loops: the first complete snapshot, one blocking query on the service list,
//! and one blocking query per selected service.
//!
//! Cost model: a change to one instance wakes only the blocking query of its service
//! (Consul keeps an index per service) and, when the instance was registered or
//! deregistered, the service-list query too (its index moves on any registration); the
//! list answer starts or stops watchers only for services that appeared or disappeared,
//! so one change costs O(1) requests whatever the number of services. Nothing here ever
//! walks all services against Consul after the first snapshot.
//!
//! Owns: the order of publication (the snapshot goes to the catalog in one
//! `replace_all`, only once every selected service has answered; watchers start after
//! it), the lifecycle of per-service watchers (started when a service is selected,
//! stopped and their names removed when it is not), and the index/pacing discipline of
//! every loop. Does not: decide what is selected or how instances map (see
//! [`super::select`]), or give up (errors are retried with backoff until shutdown).
//! Shutdown never removes anything from the catalog.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::catalog::Catalog;
use crate::model::{MicroSvcMeta, MicroSvcName};
use crate::registry::metadata::MetadataIssue;
use crate::registry::reported::Reported;
use crate::registry::{error_chain, Pacer, PacerConfig};

use super::api::{next_index, HealthEntry};
use super::error::ConsulError;
use super::http::ConsulHttp;
use super::metrics::ConsulMetrics;
use super::select::{Built, IgnoredTag, Selection, SkippedInstance};

/// Shortest blocking wait when watchers take turns on a limited connection budget.
const MIN_SHARED_WAIT: Duration = Duration::from_secs(1);

/// Descriptors kept free for everything that is not a long poll (the Kubernetes client,
/// the admin server, log files).
const SPARE_FDS: u64 = 256;

/// What every loop of one source shares.
pub(crate) struct Shared {
    pub http: ConsulHttp,
    pub selection: Selection,
    pub catalog: Arc<Catalog>,
    pub metrics: Arc<ConsulMetrics>,
    pub wait: Duration,
    pub pacing: PacerConfig,
    pub max_connections: usize,
    pub initial_concurrency: usize,
    /// Number of running per-service watchers.
    pub watched: AtomicUsize,
    /// What was already reported as left out, per Consul service.
    pub reported: Reported,
}

impl Shared {
    /// The `wait` of the next blocking query. With more watchers than connections, a
    /// watcher waiting for a connection only gets one when another's query returns;
    /// shortening every query in proportion keeps each service polled about once per
    /// `wait` (the same request rate as without a limit) instead of starving the queue.
    fn effective_wait(&self) -> Duration {
        let watchers = self.watched.load(Ordering::Relaxed) + 1;
        if self.max_connections == 0 || watchers <= self.max_connections {
            return self.wait;
        }
        let share = self.max_connections as f64 / watchers as f64;
        self.wait.mul_f64(share).max(MIN_SHARED_WAIT).min(self.wait)
    }

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
    /// ignores unchanged values) and removes the derived names it no longer has.
    fn publish(
        &self,
        service: &str,
        entries: &[HealthEntry],
        published: &Mutex<BTreeSet<MicroSvcName>>,
    ) {
        let built = self.build(service, entries);
        let names = built.names();
        let mut published = lock(published);
        for meta in built.services {
            self.catalog.upsert(meta);
        }
        for gone in published.difference(&names) {
            self.catalog.remove(gone);
        }
        *published = names;
    }
}

/// One running per-service watcher.
struct Watcher {
    stop: CancellationToken,
    handle: JoinHandle<()>,
    /// The registry names this watcher has put into the catalog; kept outside the task
    /// so that they can be removed even if the task died.
    published: Arc<Mutex<BTreeSet<MicroSvcName>>>,
}

/// Runs the source until `shutdown`.
pub(crate) async fn run(
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> Result<(), ConsulError> {
    let Some(initial) = initial_snapshot(&shared, &shutdown).await else {
        return Ok(());
    };
    let mut watchers: HashMap<String, Watcher> = HashMap::with_capacity(initial.services.len());
    // Counted before any watcher starts, so that the first blocking waits already know
    // how many watchers share the connections.
    shared
        .watched
        .store(initial.services.len(), Ordering::Relaxed);
    for (name, (index, published)) in initial.services {
        let watcher = spawn_watcher(&shared, &shutdown, name.clone(), index, published);
        watchers.insert(name, watcher);
    }
    let mut budget = Budget::default();
    budget.update(&shared, watchers.len());

    let mut index = initial.index;
    let mut pacer = Pacer::new(shared.pacing);
    loop {
        if !pacer.ready(&shutdown).await {
            break;
        }
        let result = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
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
        let unchanged = sent > 1 && services.index == sent;
        let selected = shared.selection.selected(&services.value);

        // Services that disappeared or are no longer selected: stop, then unpublish.
        let gone: Vec<String> = watchers
            .keys()
            .filter(|name| !selected.contains(*name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(watcher) = watchers.remove(&name) {
                stop_and_unpublish(&shared, &name, watcher).await;
            }
        }
        // A watcher that died (a bug) is restarted from a plain read.
        for (name, watcher) in watchers.iter_mut() {
            if watcher.handle.is_finished() && !shutdown.is_cancelled() {
                warn!(service = %name, "a Consul service watcher stopped unexpectedly; restarting it");
                let published = std::mem::take(&mut *lock(&watcher.published));
                *watcher = spawn_watcher(&shared, &shutdown, name.clone(), 0, published);
            }
        }
        if unchanged && selected.len() == watchers.len() {
            continue;
        }
        // New services: a watcher starting with a plain read publishes them.
        for name in selected {
            if let Entry::Vacant(slot) = watchers.entry(name) {
                debug!(service = %slot.key(), "watching a new Consul service");
                let name = slot.key().clone();
                shared.watched.fetch_add(1, Ordering::Relaxed);
                slot.insert(spawn_watcher(&shared, &shutdown, name, 0, BTreeSet::new()));
            }
        }
        budget.update(&shared, watchers.len());
    }

    // Shutdown: every watcher's token is a child of `shutdown`, so all are stopping;
    // wait for them so that no request outlives `run`. Nothing is unpublished.
    for (_, watcher) in watchers {
        let _ = watcher.handle.await;
    }
    Ok(())
}

struct Initial {
    /// The index to block on for the service list.
    index: u64,
    /// Per selected service: the index to block on and what it published.
    services: BTreeMap<String, (u64, BTreeSet<MicroSvcName>)>,
}

/// Lists the services, fetches every selected one (bounded concurrency, each retried
/// until it answers), and hands the catalog one complete snapshot. `None` on shutdown.
async fn initial_snapshot(shared: &Arc<Shared>, shutdown: &CancellationToken) -> Option<Initial> {
    let mut pacer = Pacer::new(shared.pacing);
    let (index, selected) = loop {
        if !pacer.ready(shutdown).await {
            return None;
        }
        let result = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            r = shared.http.catalog_services(0, shared.wait) => r,
        };
        match result {
            Ok(services) => {
                break (
                    next_index(0, services.index),
                    shared.selection.selected(&services.value),
                )
            }
            Err(e) => {
                let delay = pacer.failed();
                warn!(
                    error = %error_chain(&e),
                    retry_in = ?delay,
                    "waiting for Consul: cannot list services (nothing is published or deleted until it answers)"
                );
            }
        }
    };
    info!(
        services = selected.len(),
        "fetching the first snapshot of Consul services"
    );
    let concurrency = shared.initial_concurrency.max(1);
    let fetched: Vec<Option<(String, u64, Built)>> = futures::stream::iter(selected)
        .map(|name| {
            let shared = Arc::clone(shared);
            let shutdown = shutdown.clone();
            async move {
                let answer = fetch_until_ok(&shared, &name, &shutdown).await?;
                let built = shared.build(&name, &answer.1);
                Some((name, answer.0, built))
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    if shutdown.is_cancelled() {
        return None;
    }
    let mut services = BTreeMap::new();
    let mut metas: Vec<MicroSvcMeta> = Vec::new();
    for (name, index, built) in fetched.into_iter().flatten() {
        services.insert(name, (index, built.names()));
        metas.extend(built.services);
    }
    info!(
        services = services.len(),
        published = metas.len(),
        "first Consul snapshot complete"
    );
    shared.catalog.replace_all(metas);
    Some(Initial { index, services })
}

/// One plain read of a service's instances, retried with backoff until it answers.
async fn fetch_until_ok(
    shared: &Shared,
    name: &str,
    shutdown: &CancellationToken,
) -> Option<(u64, Vec<HealthEntry>)> {
    let mut pacer = Pacer::new(shared.pacing);
    loop {
        if !pacer.ready(shutdown).await {
            return None;
        }
        let wait = || shared.wait;
        let result = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            r = shared.http.health_service(name, 0, &wait) => r,
        };
        match result {
            Ok(answer) => return Some((next_index(0, answer.index), answer.value)),
            Err(e) => {
                let delay = pacer.failed();
                warn!(service = %name, error = %error_chain(&e), retry_in = ?delay, "cannot read a Consul service");
            }
        }
    }
}

fn spawn_watcher(
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
    name: String,
    index: u64,
    published: BTreeSet<MicroSvcName>,
) -> Watcher {
    let stop = shutdown.child_token();
    let published = Arc::new(Mutex::new(published));
    let span = info_span!("consul_service", service = %name);
    let handle = tokio::spawn(
        watch_service(
            Arc::clone(shared),
            name,
            index,
            Arc::clone(&published),
            stop.clone(),
        )
        .instrument(span),
    );
    Watcher {
        stop,
        handle,
        published,
    }
}

async fn stop_and_unpublish(shared: &Shared, name: &str, watcher: Watcher) {
    watcher.stop.cancel();
    // The task leaves at its next await point; once it has, nothing can republish.
    if let Err(e) = watcher.handle.await {
        warn!(service = %name, error = %e, "a Consul service watcher failed");
    }
    shared.watched.fetch_sub(1, Ordering::Relaxed);
    shared.reported.forget(name);
    let published = std::mem::take(&mut *lock(&watcher.published));
    for registry_name in &published {
        shared.catalog.remove(registry_name);
    }
    info!(service = %name, removed = published.len(), "Consul service gone or no longer selected");
}

/// The blocking loop of one service. Returns when `stop` is cancelled.
async fn watch_service(
    shared: Arc<Shared>,
    name: String,
    mut index: u64,
    published: Arc<Mutex<BTreeSet<MicroSvcName>>>,
    stop: CancellationToken,
) {
    let mut pacer = Pacer::new(shared.pacing);
    loop {
        if !pacer.ready(&stop).await {
            return;
        }
        let wait = || shared.effective_wait();
        let result = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = shared.http.health_service(&name, index, &wait) => r,
        };
        match result {
            Ok(answer) => {
                pacer.succeeded();
                let sent = index;
                index = next_index(sent, answer.index);
                debug!(
                    sent,
                    returned = answer.index,
                    instances = answer.value.len(),
                    "Consul service answered"
                );
                if sent > 1 && answer.index == sent {
                    // The wait ran out: nothing new.
                    continue;
                }
                shared.publish(&name, &answer.value, &published);
            }
            Err(e) => {
                let delay = pacer.failed();
                // Thousands of watchers fail together when Consul goes away: say it on
                // the first failure and every tenth, not on every retry.
                if pacer.failures() == 1 || pacer.failures().is_multiple_of(10) {
                    warn!(error = %error_chain(&e), failures = pacer.failures(), retry_in = ?delay, "watching a Consul service failed");
                } else {
                    debug!(error = %error_chain(&e), retry_in = ?delay, "watching a Consul service failed");
                }
            }
        }
    }
}

/// Warns when the watchers no longer fit the connection budget or the descriptor limit,
/// once per crossing.
#[derive(Default)]
struct Budget {
    over_connections: bool,
    over_fds: bool,
}

impl Budget {
    fn update(&mut self, shared: &Shared, watchers: usize) {
        shared.metrics.watched_services.set(watchers as i64);
        let needed = watchers + 1;
        let over = shared.max_connections > 0 && needed > shared.max_connections;
        if over && !self.over_connections {
            warn!(
                watched_services = watchers,
                max_connections = shared.max_connections,
                "more Consul services than connections: watchers take turns and a change is seen only when its service's turn comes (within about the blocking wait) instead of at once; raise max_connections and the agent's limits.http_max_conns_per_client above the number of services"
            );
        }
        self.over_connections = over;
        let fds_needed = if shared.max_connections > 0 {
            needed.min(shared.max_connections)
        } else {
            needed
        } as u64
            + SPARE_FDS;
        let soft = rlimit::Resource::NOFILE
            .get()
            .map(|(soft, _)| soft)
            .unwrap_or(u64::MAX);
        let over = fds_needed > soft;
        if over && !self.over_fds {
            warn!(
                needed = fds_needed,
                limit = soft,
                "the open-file limit is too low for one connection per watched Consul service; raise it (ulimit -n, LimitNOFILE=) or lower max_connections"
            );
        }
        self.over_fds = over;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The data is a plain set; a panic elsewhere leaves it consistent enough to use.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::consul::config::ConsulConfig;

    fn shared(max_connections: usize, watched: usize) -> Shared {
        let cfg = ConsulConfig {
            max_connections,
            ..ConsulConfig::default()
        };
        let metrics = Arc::new(ConsulMetrics::default());
        let (catalog, _rx) = Catalog::new();
        Shared {
            http: ConsulHttp::new(&cfg, Arc::clone(&metrics)).expect("client"),
            selection: Selection::from_config(&cfg),
            catalog: Arc::new(catalog),
            metrics,
            wait: Duration::from_secs(300),
            pacing: PacerConfig::default(),
            max_connections,
            initial_concurrency: 4,
            watched: AtomicUsize::new(watched),
            reported: Reported::default(),
        }
    }

    #[test]
    fn wait_is_shortened_only_beyond_the_connection_budget() {
        assert_eq!(shared(0, 50_000).effective_wait(), Duration::from_secs(300));
        assert_eq!(shared(180, 100).effective_wait(), Duration::from_secs(300));
        assert_eq!(shared(180, 179).effective_wait(), Duration::from_secs(300));
        // 359 watchers + the list watcher on 180 connections: half the wait.
        assert_eq!(shared(180, 359).effective_wait(), Duration::from_secs(150));
        assert_eq!(shared(10, 1_000_000).effective_wait(), MIN_SHARED_WAIT);
    }

    #[test]
    fn publish_upserts_and_removes_derived_names() {
        let mut s = shared(0, 0);
        let cfg = ConsulConfig {
            prefix_tag: Some("pfx".into()),
            ..ConsulConfig::default()
        };
        s.selection = Selection::from_config(&cfg);
        let entry = |tags: &str| -> HealthEntry {
            serde_json::from_str(&format!(
                r#"{{"Node":{{"Node":"n","Address":"198.51.100.1"}},"Service":{{"ID":"i","Service":"s","Tags":[{tags}],"Port":80}}}}"#
            ))
            .expect("entry")
        };
        let published = Mutex::new(BTreeSet::new());
        s.publish("s", &[entry(r#""pfx=blue""#)], &published);
        assert!(s.catalog.contains("s"));
        assert!(s.catalog.contains("blue-s"));
        s.publish("s", &[entry("")], &published);
        assert!(s.catalog.contains("s"));
        assert!(!s.catalog.contains("blue-s"));
        assert_eq!(lock(&published).len(), 1);
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
