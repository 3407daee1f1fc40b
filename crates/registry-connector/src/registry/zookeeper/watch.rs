//! The source's loop: a session, one persistent recursive watch on the base path, one
//! complete read of the tree, then the watch's events, each applied to the one or two
//! services it touches.
//!
//! Per session:
//! 1. the watch is added **first** (`addWatch` with `PERSISTENT_RECURSIVE`), so that
//!    every change from then on is queued for us;
//! 2. the tree is read: the directories below the base path, then each one's nodes, a
//!    bounded number of requests in flight. For Dubbo that is one `getChildren` per
//!    interface (`<interface>/providers`): a provider's URL is its node's name, so no
//!    data is read. For Curator one `getChildren` per service and one `getData` per
//!    instance;
//! 3. once that read is complete, and only then, the catalog gets it as one snapshot
//!    ([`Catalog::replace_all`]): a service missing from it is deleted downstream, and
//!    nothing is deleted before it;
//! 4. then the queued and new events, in order: a Dubbo provider created or deleted is
//!    applied from its path alone (zero reads); a Curator instance created or changed
//!    costs one `getData`, a deleted one nothing. Events queued while the tree was read
//!    are applied too: each is idempotent against what the read found (a node the read
//!    saw and the event creates again, a node the event deletes and the read never saw).
//!
//! **Connection loss and session expiry.** The client reconnects by itself within the
//! session. ZooKeeper does not replay the events a persistent watch missed while the
//! client was disconnected (ZOOKEEPER-4698), so after a reconnection the tree is read
//! again (steps 2-3 on the same session and watch). When the session expires (or is
//! closed), a new one is opened with backoff and starts at step 1. Either way the last
//! snapshot stays published until the new read is complete: a ZooKeeper outage deletes
//! nothing, and a re-read that finds what was published writes nothing (the catalog
//! reports only what changed). A provider's ephemeral node that vanishes because its
//! owner's session expired is an ordinary deletion event; the sink's mass-deletion guard
//! stays in front of the apiserver.

use std::collections::BTreeSet;
use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use zookeeper_client::{
    AddWatchMode, Client, EventType, PersistentWatcher, SessionState, WatchedEvent,
};

use crate::catalog::Catalog;
use crate::registry::reported::Reported;
use crate::registry::{error_chain, Pacer, PacerConfig};

use super::api::{self, PROVIDERS};
use super::config::Layout;
use super::error::ZookeeperError;
use super::events;
use super::metrics::ZookeeperMetrics;
use super::mirror::Mirror;
use super::select::Selection;
use super::session::SessionConfig;

/// Events taken from the watch at once: one burst of changes becomes one pass over the
/// services it touches.
const MAX_BATCH: usize = 1024;

pub(super) struct WatchConfig {
    pub session: SessionConfig,
    pub base: String,
    pub layout: Layout,
    pub read_concurrency: usize,
    pub pacing: PacerConfig,
}

enum End {
    Shutdown,
    Lost { error: ZookeeperError, steady: bool },
}

/// What a batch of events asks of the session loop next.
enum Next {
    Continue,
    /// The connection came back within the session: events may have been missed.
    Reread,
    Lost(ZookeeperError),
}

pub(super) struct Watcher {
    cfg: WatchConfig,
    selection: Selection,
    catalog: Arc<Catalog>,
    metrics: Arc<ZookeeperMetrics>,
    reported: Reported,
    mirror: Mirror,
}

impl Watcher {
    pub fn new(
        cfg: WatchConfig,
        selection: Selection,
        catalog: Arc<Catalog>,
        metrics: Arc<ZookeeperMetrics>,
    ) -> Self {
        Self {
            cfg,
            selection,
            catalog,
            metrics,
            reported: Reported::default(),
            mirror: Mirror::default(),
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut pacer = Pacer::new(self.cfg.pacing);
        loop {
            if !pacer.ready(&shutdown).await {
                return;
            }
            let connected = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                c = self.connect() => c,
            };
            self.metrics.record("connect", connected.is_ok());
            let client = match connected {
                Ok(c) => c,
                Err(e) => {
                    let delay = pacer.failed();
                    warn!(
                        error = %error_chain(&e),
                        failures = pacer.failures(),
                        retry_in = ?delay,
                        "cannot open a ZooKeeper session; the last known state stays published"
                    );
                    continue;
                }
            };
            self.metrics.sessions.inc();
            self.metrics.connected.set(1);
            info!(
                session = ?client.session_id(),
                timeout = ?client.session_timeout(),
                "ZooKeeper session established"
            );
            let end = self.session(&client, &shutdown).await;
            self.metrics.connected.set(0);
            match end {
                End::Shutdown => return,
                End::Lost { error, steady } => {
                    self.metrics.session_expirations.inc();
                    if steady {
                        pacer.succeeded();
                        warn!(error = %error_chain(&error), "the ZooKeeper session ended; opening a new one (nothing is removed meanwhile)");
                    } else {
                        let delay = pacer.failed();
                        warn!(error = %error_chain(&error), retry_in = ?delay, "the ZooKeeper session ended before its first complete read; opening a new one with backoff (nothing is removed meanwhile)");
                    }
                }
            }
        }
    }

    async fn connect(&self) -> Result<Client, ZookeeperError> {
        self.cfg.session.open(false).await
    }

    /// One session: the watch, then reads and events until the session ends.
    async fn session(&mut self, client: &Client, shutdown: &CancellationToken) -> End {
        let added = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return End::Shutdown,
            w = client.watch(&self.cfg.base, AddWatchMode::PersistentRecursive) => w,
        };
        self.metrics.record("add_watch", added.is_ok());
        let mut watcher = match added {
            Ok(w) => w,
            Err(e) => {
                return End::Lost {
                    error: ZookeeperError::request("addWatch", &self.cfg.base, e),
                    steady: false,
                }
            }
        };
        let mut steady = false;
        let mut pacer = Pacer::new(self.cfg.pacing);
        loop {
            // Whatever is queued so far, the read below covers; only the session's state
            // matters, and a disconnected session is waited for.
            if let Err(state) = self.settle(&mut watcher, shutdown).await {
                return match state {
                    None => End::Shutdown,
                    Some(state) => End::Lost {
                        error: ZookeeperError::SessionEnded(state),
                        steady,
                    },
                };
            }
            if !pacer.ready(shutdown).await {
                return End::Shutdown;
            }
            let read = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return End::Shutdown,
                r = self.read_tree(client) => r,
            };
            match read {
                Ok(mirror) => {
                    pacer.succeeded();
                    self.install(mirror);
                    steady = true;
                }
                Err(error) if error.is_session_lost() => return End::Lost { error, steady },
                Err(error) => {
                    let delay = pacer.failed();
                    warn!(error = %error_chain(&error), retry_in = ?delay, "reading the ZooKeeper tree failed; reading it again (the last known state stays published)");
                    continue;
                }
            }
            loop {
                let first = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return End::Shutdown,
                    e = watcher.changed() => e,
                };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH && !is_terminal(batch.last()) {
                    match watcher.changed().now_or_never() {
                        Some(e) => batch.push(e),
                        None => break,
                    }
                }
                match self.apply(client, batch).await {
                    Next::Continue => {}
                    Next::Reread => break,
                    Next::Lost(error) => return End::Lost { error, steady },
                }
            }
        }
    }

    /// Drops the queued events (a read is about to cover them) and waits while the
    /// session is disconnected. `Err(None)` on shutdown, `Err(Some(state))` when the
    /// session ended.
    async fn settle(
        &self,
        watcher: &mut PersistentWatcher,
        shutdown: &CancellationToken,
    ) -> Result<(), Option<SessionState>> {
        let mut connected = true;
        loop {
            let event = if connected {
                match watcher.changed().now_or_never() {
                    Some(e) => e,
                    None => return Ok(()),
                }
            } else {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Err(None),
                    e = watcher.changed() => e,
                }
            };
            if event.event_type != EventType::Session {
                continue;
            }
            match event.session_state {
                s if s.is_terminated() => return Err(Some(s)),
                SessionState::Disconnected => {
                    self.metrics.connected.set(0);
                    connected = false;
                }
                _ => {
                    if !connected {
                        self.metrics.reconnects.inc();
                    }
                    self.metrics.connected.set(1);
                    connected = true;
                }
            }
        }
    }

    /// Reads the whole tree below the base path into a new mirror.
    async fn read_tree(&self, client: &Client) -> Result<Mirror, ZookeeperError> {
        let started = std::time::Instant::now();
        let base = &self.cfg.base;
        let dirs = self.children(client, base).await?.unwrap_or_default();
        let mut mirror = Mirror::default();
        let n = self.cfg.read_concurrency.max(1);
        match self.cfg.layout {
            Layout::Dubbo => {
                let mut lists = futures::stream::iter(dirs)
                    .map(|iface| async move {
                        let path = api::join(base, &[&iface, PROVIDERS]);
                        let children = self.children(client, &path).await;
                        (iface, children)
                    })
                    .buffer_unordered(n);
                while let Some((iface, children)) = lists.next().await {
                    for node in children?.unwrap_or_default() {
                        let entry = self.selection.dubbo_entry(&iface, &node);
                        mirror.set(&iface, &node, entry);
                    }
                }
            }
            Layout::Curator => {
                let lists: Vec<(String, Option<Vec<String>>)> = futures::stream::iter(dirs)
                    .map(|name| async move {
                        let path = api::join(base, &[&name]);
                        self.children(client, &path).await.map(|c| (name, c))
                    })
                    .buffer_unordered(n)
                    .collect::<Vec<_>>()
                    .await
                    .into_iter()
                    .collect::<Result<_, _>>()?;
                let nodes = lists.into_iter().flat_map(|(name, ids)| {
                    ids.unwrap_or_default()
                        .into_iter()
                        .map(move |id| (name.clone(), id))
                });
                let mut reads = futures::stream::iter(nodes)
                    .map(|(name, id)| async move {
                        let path = api::join(base, &[&name, &id]);
                        let data = self.data(client, &path).await;
                        (name, id, data)
                    })
                    .buffer_unordered(n);
                while let Some((name, id, data)) = reads.next().await {
                    if let Some(data) = data? {
                        let entry = self.selection.curator_entry(&name, &data);
                        mirror.set(&name, &id, entry);
                    }
                }
            }
        }
        self.metrics.tree_reads.inc();
        info!(
            nodes = mirror.len(),
            services = mirror.service_count(),
            took = ?started.elapsed(),
            "read the ZooKeeper tree"
        );
        Ok(mirror)
    }

    /// The children of `path`; `None` when it does not exist.
    async fn children(
        &self,
        client: &Client,
        path: &str,
    ) -> Result<Option<Vec<String>>, ZookeeperError> {
        let result = client.list_children(path).await;
        self.metrics.record(
            "get_children",
            result.is_ok() || matches!(result, Err(zookeeper_client::Error::NoNode)),
        );
        match result {
            Ok(children) => Ok(Some(children)),
            Err(zookeeper_client::Error::NoNode) => Ok(None),
            Err(e) => Err(ZookeeperError::request("getChildren", path, e)),
        }
    }

    /// The data of `path`; `None` when it does not exist.
    async fn data(&self, client: &Client, path: &str) -> Result<Option<Vec<u8>>, ZookeeperError> {
        let result = client.get_data(path).await;
        self.metrics.record(
            "get_data",
            result.is_ok() || matches!(result, Err(zookeeper_client::Error::NoNode)),
        );
        match result {
            Ok((data, _)) => Ok(Some(data)),
            Err(zookeeper_client::Error::NoNode) => Ok(None),
            Err(e) => Err(ZookeeperError::request("getData", path, e)),
        }
    }

    /// Makes `mirror` the published state: one complete snapshot.
    fn install(&mut self, mirror: Mirror) {
        self.mirror = mirror;
        let dirs: BTreeSet<String> = self.mirror.dirs().map(str::to_string).collect();
        let services: BTreeSet<String> = self
            .mirror
            .services()
            .into_iter()
            .map(str::to_string)
            .collect();
        self.reported.retain(|scope| match scope.split_once(':') {
            Some(("dir", dir)) => dirs.contains(dir),
            Some(("svc", svc)) => services.contains(svc),
            _ => false,
        });
        for dir in &dirs {
            self.report_problems(dir);
        }
        let metas: Vec<_> = services.iter().filter_map(|s| self.build(s)).collect();
        self.catalog.replace_all(metas);
        self.count();
    }

    /// Applies one batch of events, then publishes each service it touched once.
    async fn apply(&mut self, client: &Client, batch: Vec<WatchedEvent>) -> Next {
        let mut next = Next::Continue;
        let mut events = Vec::with_capacity(batch.len());
        for event in batch {
            if event.event_type != EventType::Session {
                self.metrics.events.inc();
                events.push(event);
                continue;
            }
            match event.session_state {
                s if s.is_terminated() => {
                    next = Next::Lost(ZookeeperError::SessionEnded(s));
                    break;
                }
                SessionState::Disconnected => {
                    self.metrics.connected.set(0);
                    warn!("lost the connection to ZooKeeper; the client reconnects within the session (nothing is removed meanwhile)");
                }
                _ => {
                    // Events of the disconnection may be lost: what follows in this
                    // batch is covered by the read that comes next.
                    self.metrics.connected.set(1);
                    self.metrics.reconnects.inc();
                    info!("reconnected to ZooKeeper within the session; reading the tree again");
                    next = Next::Reread;
                    break;
                }
            }
        }
        let data = self.read_changed(client, &events).await;
        let mut touched = BTreeSet::new();
        let mut dirs = BTreeSet::new();
        for (i, event) in events.iter().enumerate() {
            let Some(change) = change_of(event.event_type) else {
                continue;
            };
            let applied = events::apply(
                &mut self.mirror,
                &self.selection,
                self.cfg.layout,
                &self.cfg.base,
                change,
                &event.path,
                data.get(&i).map(|d| d.as_deref()),
            );
            if applied.dir.is_none() && applied.touched.is_empty() {
                debug!(path = %event.path, kind = %event.event_type, "ZooKeeper event without effect; ignored");
            }
            touched.extend(applied.touched);
            dirs.extend(applied.dir);
        }
        for dir in &dirs {
            self.report_problems(dir);
        }
        for service in &touched {
            self.publish(service);
        }
        if !touched.is_empty() {
            self.count();
        }
        next
    }

    /// For Curator, the data of every instance an event created or changed, read at
    /// once, by event index; a read that fails leaves its event unapplied (a lost
    /// connection brings a complete read anyway).
    async fn read_changed(
        &self,
        client: &Client,
        events: &[WatchedEvent],
    ) -> std::collections::HashMap<usize, Option<Vec<u8>>> {
        let wanted: Vec<(usize, String)> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                change_of(e.event_type).is_some_and(|change| {
                    events::needs_data(self.cfg.layout, &self.cfg.base, change, &e.path)
                })
            })
            .map(|(i, e)| (i, e.path.clone()))
            .collect();
        let n = self.cfg.read_concurrency.max(1);
        let mut reads = futures::stream::iter(wanted)
            .map(|(i, path)| async move {
                let data = self.data(client, &path).await;
                (i, path, data)
            })
            .buffer_unordered(n);
        let mut out = std::collections::HashMap::new();
        while let Some((i, path, data)) = reads.next().await {
            match data {
                Ok(data) => {
                    out.insert(i, data);
                }
                Err(e) => {
                    warn!(path, error = %error_chain(&e), "reading a changed ZooKeeper node failed; it is read again with the tree");
                }
            }
        }
        out
    }

    fn build(&self, service: &str) -> Option<crate::model::MicroSvcMeta> {
        let built = self.mirror.build(&self.selection, service);
        let scope = format!("svc:{service}");
        for issue in self.reported.fresh(
            &scope,
            "metadata",
            &built.metadata_issues,
            ToString::to_string,
        ) {
            self.metrics.reject(issue.as_label());
            warn!(service, reason = %issue, "ZooKeeper metadata left out");
        }
        built.service
    }

    /// Writes `service`'s current state to the catalog.
    fn publish(&self, service: &str) {
        match self.build(service) {
            Some(meta) => self.catalog.upsert(meta),
            None => {
                self.reported.forget(&format!("svc:{service}"));
                self.catalog.remove(&self.selection.published_name(service));
            }
        }
    }

    /// Logs and counts, once while it lasts, each node of `dir` left out.
    fn report_problems(&self, dir: &str) {
        let problems = self.mirror.problems(dir);
        let scope = format!("dir:{dir}");
        for (node, skip) in self
            .reported
            .fresh(&scope, "node", &problems, |(node, skip)| {
                format!("{node}/{}", skip.as_label())
            })
        {
            self.metrics.reject(skip.as_label());
            let shown = api::decode_component(node).unwrap_or_else(|_| node.clone());
            warn!(path = %api::join(&self.cfg.base, &[dir]), node = %shown, reason = %skip, "ZooKeeper node left out");
        }
    }

    fn count(&self) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.metrics.nodes.set(gauge(self.mirror.len()));
        self.metrics
            .services
            .set(gauge(self.mirror.service_count()));
    }
}

fn change_of(kind: EventType) -> Option<events::Change> {
    match kind {
        EventType::NodeCreated => Some(events::Change::Created),
        EventType::NodeDeleted => Some(events::Change::Deleted),
        EventType::NodeDataChanged => Some(events::Change::DataChanged),
        EventType::NodeChildrenChanged | EventType::Session => None,
    }
}

fn is_terminal(event: Option<&WatchedEvent>) -> bool {
    event.is_some_and(|e| e.event_type == EventType::Session && e.session_state.is_terminated())
}
