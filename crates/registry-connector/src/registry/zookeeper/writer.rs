//! The Kubernetes → ZooKeeper writer: [`ZookeeperWriter`] implements the export
//! engine's [`RegistryWriter`] in either layout ([`super::register`] has the node
//! forms), as Dubbo providers and Curator's `ServiceDiscovery` register themselves:
//! ephemeral nodes of the writer's own session, below persistent directories.
//!
//! Why it looks the way it does:
//! - **One multi-operation per batch.** ZooKeeper's `multi` applies creates, deletes
//!   and data writes all or nothing; a changed Dubbo provider (whose URL is its name) is
//!   a delete and a create in it, so its consumers never see the provider missing.
//! - **Ephemeral, and detached.** The nodes are ephemeral, so a connector that dies
//!   and never comes back leaves nothing behind: its nodes go with its session, as a
//!   Dubbo provider's do. The session is opened *detached*: a stopping connector does
//!   not close it, so its nodes outlive it by the session timeout, and its successor
//!   (a restarted pod, the replica that takes the lease) finds them and **takes them
//!   over**: the same node deleted and created again under its own session in one
//!   `multi`, invisible to a consumer that lists the directory (the name and data are
//!   the same). Nothing is deregistered and registered again at a restart
//!   (consul-k8s#319). Which nodes need it, one `getEphemerals` says: the owned nodes
//!   it does not list belong to another session.
//! - **The session is watched at rest.** If it expires (a partition longer than the
//!   session timeout), ZooKeeper has deleted every node of it: the writer opens a new
//!   session and [`RegistryWriter::changed`] makes the engine read and write again.
//! - **Ownership** is in the node itself (the URL's parameters, the instance's
//!   metadata): nodes of anybody else, even in the same directory, are never read back,
//!   changed or removed.
//!
//! Not watched: an owned node deleted by hand is written again at the next resync
//! (`--resync-period`), not at once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use zookeeper_client::{Acl, Acls, AuthId, Client, CreateMode, Permission};

use super::api::{self, PROVIDERS};
use super::config::{Layout, ZookeeperConfig};
use super::error::ZookeeperError;
use super::metrics::{WriterMetrics, ZookeeperMetrics};
use super::register::{self, CuratorRead, Node};
use super::session::SessionConfig;
use crate::export::model::{Applied, Instance, Registered, Rejected, Write};
use crate::export::RegistryWriter;
use crate::registry::error_chain;

/// Directories (and, for Curator, instances) read at once while the tree is read.
const READ_CONCURRENCY: usize = 32;
/// Operations in one `multi`: well under ZooKeeper's 1 MiB request limit
/// (`jute.maxbuffer`) with Dubbo URLs of a few hundred bytes.
const MAX_OPS: usize = 128;
/// How often the writer looks at its session's state while nothing else happens (a
/// local check, no request).
const SESSION_CHECK: Duration = Duration::from_secs(1);

/// An owned node as the writer knows it.
#[derive(Clone, Debug)]
struct Held {
    path: String,
    instance: Instance,
    /// Whether this process's current session owns the node (else a predecessor's does,
    /// and it is taken over).
    ours: bool,
}

/// One operation of a `multi`.
#[derive(Debug)]
enum Op {
    Create(Node),
    Delete(String),
    SetData(Node),
}

/// Registers Kubernetes instances as ZooKeeper nodes of its own session.
pub struct ZookeeperWriter {
    session_cfg: SessionConfig,
    base: String,
    layout: Layout,
    connector_id: String,
    /// ACLs of the nodes it creates: open without credentials (as Dubbo's), readable by
    /// anyone and writable by the same digest user with them.
    node_acls: Vec<Acl>,
    metrics: Arc<ZookeeperMetrics>,
    /// Whether [`RegistryWriter::register_metrics`] registers the request counters too
    /// (not when a source shares them and registers them).
    registers_requests: bool,
    writer_metrics: Arc<WriterMetrics>,
    client: tokio::sync::Mutex<Option<Client>>,
    /// Instance id → node.
    owned: Mutex<BTreeMap<String, Held>>,
    /// Owned nodes of an id already held (left by an older version or a crash between
    /// two of its sessions): removed by `maintain`.
    strays: Mutex<Vec<String>>,
    /// Directories known to exist.
    dirs: Mutex<BTreeSet<String>>,
    /// Held by every write: a takeover must not interleave with a batch.
    writes: tokio::sync::Mutex<()>,
    changed: Notify,
    takeover: Notify,
}

impl std::fmt::Debug for ZookeeperWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZookeeperWriter")
            .field("session", &self.session_cfg)
            .field("base", &self.base)
            .field("layout", &self.layout)
            .field("connector_id", &self.connector_id)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ZookeeperWriter {
    /// Checks the configuration; does not contact ZooKeeper.
    pub fn new(cfg: &ZookeeperConfig, connector_id: &str) -> Result<Self, ZookeeperError> {
        Self::with_metrics(cfg, connector_id, Arc::default(), true)
    }

    /// The same, counting its requests in a source's metrics (`both` mode).
    pub fn with_source_metrics(
        cfg: &ZookeeperConfig,
        connector_id: &str,
        metrics: Arc<ZookeeperMetrics>,
    ) -> Result<Self, ZookeeperError> {
        Self::with_metrics(cfg, connector_id, metrics, false)
    }

    fn with_metrics(
        cfg: &ZookeeperConfig,
        connector_id: &str,
        metrics: Arc<ZookeeperMetrics>,
        registers_requests: bool,
    ) -> Result<Self, ZookeeperError> {
        let session_cfg = super::session_config(cfg)?;
        let node_acls = if session_cfg.digest.is_some() {
            vec![
                Acl::new(Permission::READ, AuthId::anyone()),
                Acl::new(Permission::ALL, AuthId::authed()),
            ]
        } else {
            Acls::anyone_all().to_vec()
        };
        Ok(Self {
            session_cfg,
            base: cfg.checked_base_path()?,
            layout: cfg.layout,
            connector_id: connector_id.to_string(),
            node_acls,
            metrics,
            registers_requests,
            writer_metrics: Arc::default(),
            client: tokio::sync::Mutex::new(None),
            owned: Mutex::default(),
            strays: Mutex::default(),
            dirs: Mutex::default(),
            writes: tokio::sync::Mutex::new(()),
            changed: Notify::new(),
            takeover: Notify::new(),
        })
    }

    /// The writer's own counters.
    pub fn writer_metrics(&self) -> Arc<WriterMetrics> {
        Arc::clone(&self.writer_metrics)
    }

    /// The id of the session the writer's nodes belong to (a node's `ephemeralOwner`),
    /// once one is open.
    pub async fn session_id(&self) -> Option<i64> {
        self.client.lock().await.as_ref().map(|c| c.session_id().0)
    }

    /// The session's client, opening a session when there is none or the last one
    /// ended (then the engine is told: the old session's nodes are gone).
    async fn client(&self) -> Result<Client, ZookeeperError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref() {
            let state = client.state();
            if !state.is_terminated() {
                return Ok(client.clone());
            }
            warn!(
                ?state,
                "the writer's ZooKeeper session ended; its nodes are gone, registering them again"
            );
            self.writer_metrics.connected.set(0);
            lock(&self.dirs).clear();
            lock(&self.owned).clear();
            self.changed.notify_one();
        }
        let opened = self.session_cfg.open(true).await;
        self.metrics.record("connect", opened.is_ok());
        let client = opened?;
        info!(session = ?client.session_id(), timeout = ?client.session_timeout(), "the writer's ZooKeeper session is open");
        self.writer_metrics.sessions.inc();
        self.writer_metrics.connected.set(1);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// The node `instance` is written as.
    fn node(&self, instance: &Instance) -> Result<Node, register::Unwritable> {
        match self.layout {
            Layout::Dubbo => register::dubbo_node(&self.base, instance, &self.connector_id),
            Layout::Curator => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                register::curator_node(&self.base, instance, &self.connector_id, now)
            }
        }
    }

    /// The children of `path`; none when it does not exist.
    async fn children(&self, client: &Client, path: &str) -> Result<Vec<String>, ZookeeperError> {
        let listed = client.list_children(path).await;
        self.metrics.record(
            "get_children",
            !matches!(&listed, Err(e) if *e != zookeeper_client::Error::NoNode),
        );
        match listed {
            Ok(children) => Ok(children),
            Err(zookeeper_client::Error::NoNode) => Ok(Vec::new()),
            Err(e) => Err(ZookeeperError::request("getChildren", path, e)),
        }
    }

    /// The owned nodes of one service directory, and whether it holds others' nodes.
    async fn read_dir(
        &self,
        client: &Client,
        dir: &str,
    ) -> Result<(Vec<(String, Instance)>, bool), ZookeeperError> {
        let mut owned = Vec::new();
        let mut foreign = false;
        match self.layout {
            Layout::Dubbo => {
                let parent = api::join(&self.base, &[dir, PROVIDERS]);
                for name in self.children(client, &parent).await? {
                    match register::decode_dubbo(dir, &name, &self.connector_id) {
                        Some(instance) => owned.push((format!("{parent}/{name}"), instance)),
                        None => foreign = true,
                    }
                }
            }
            Layout::Curator => {
                let parent = api::join(&self.base, &[dir]);
                let names = self.children(client, &parent).await?;
                let mut reads = futures::stream::iter(names)
                    .map(|name| {
                        let path = format!("{parent}/{name}");
                        async move {
                            let data = client.get_data(&path).await;
                            (path, data)
                        }
                    })
                    .buffer_unordered(READ_CONCURRENCY);
                while let Some((path, data)) = reads.next().await {
                    self.metrics.record(
                        "get_data",
                        !matches!(&data, Err(e) if *e != zookeeper_client::Error::NoNode),
                    );
                    match data {
                        Ok((data, _)) => {
                            match register::decode_curator(dir, &data, &self.connector_id) {
                                CuratorRead::Owned(instance) => owned.push((path, instance)),
                                CuratorRead::Foreign => foreign = true,
                            }
                        }
                        // Gone since the listing.
                        Err(zookeeper_client::Error::NoNode) => {}
                        Err(e) => return Err(ZookeeperError::request("getData", &path, e)),
                    }
                }
            }
        }
        Ok((owned, foreign))
    }

    /// Creates the persistent directories the batch's new nodes go in, where not known
    /// to exist (open ACLs, as Dubbo and Curator create them: other providers register
    /// in the same directories).
    async fn ensure_dirs(&self, client: &Client, ops: &[Op]) -> Result<(), ZookeeperError> {
        let wanted: BTreeSet<String> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Create(node) => node.path.rsplit_once('/').map(|(dir, _)| dir.to_string()),
                _ => None,
            })
            .filter(|dir| !lock(&self.dirs).contains(dir))
            .collect();
        let options = CreateMode::Persistent.with_acls(Acls::anyone_all());
        for dir in wanted {
            let made = client.mkdir(&dir, &options).await;
            self.metrics.record("mkdir", made.is_ok());
            made.map_err(|e| ZookeeperError::request("mkdir", &dir, e))?;
            lock(&self.dirs).insert(dir);
        }
        Ok(())
    }

    /// Applies `ops` in one `multi`.
    async fn commit(&self, client: &Client, ops: &[Op]) -> Result<(), ZookeeperError> {
        if ops.is_empty() {
            return Ok(());
        }
        self.ensure_dirs(client, ops).await?;
        let acls = Acls::new(&self.node_acls);
        let options = CreateMode::Ephemeral.with_acls(acls);
        let mut multi = client.new_multi_writer();
        let mut first_path = "";
        for op in ops {
            let added = match op {
                Op::Create(node) => multi.add_create(&node.path, &node.data, &options),
                Op::Delete(path) => multi.add_delete(path, None),
                Op::SetData(node) => multi.add_set_data(&node.path, &node.data, None),
            };
            let path = match op {
                Op::Create(n) | Op::SetData(n) => n.path.as_str(),
                Op::Delete(p) => p.as_str(),
            };
            if first_path.is_empty() {
                first_path = path;
            }
            added.map_err(|e| ZookeeperError::request("multi", path, e))?;
        }
        let result = multi.commit().await;
        self.metrics.record("multi", result.is_ok());
        match result {
            Ok(_) => Ok(()),
            Err(zookeeper_client::MultiWriteError::OperationFailed { index, source }) => {
                if source == zookeeper_client::Error::NoNode {
                    // A directory removed behind our back, or a node already gone.
                    lock(&self.dirs).clear();
                }
                let path = match &ops[index] {
                    Op::Create(n) | Op::SetData(n) => n.path.as_str(),
                    Op::Delete(p) => p.as_str(),
                };
                Err(ZookeeperError::request("multi", path, source))
            }
            Err(zookeeper_client::MultiWriteError::RequestFailed { source }) => {
                Err(ZookeeperError::request("multi", first_path, source))
            }
        }
    }

    /// Re-creates, under this session, the owned nodes another session holds, and
    /// removes the strays; a batch at a time, each atomic.
    async fn take_over(&self) -> Result<usize, ZookeeperError> {
        let _writes = self.writes.lock().await;
        let client = self.client().await?;
        let strays: Vec<String> = std::mem::take(&mut *lock(&self.strays));
        let foreign: Vec<Held> = lock(&self.owned)
            .values()
            .filter(|h| !h.ours)
            .cloned()
            .collect();
        if foreign.is_empty() && strays.is_empty() {
            return Ok(0);
        }
        let mut done = 0;
        for chunk in strays.chunks(MAX_OPS) {
            let ops: Vec<Op> = chunk.iter().cloned().map(Op::Delete).collect();
            if let Err(e) = self.commit(&client, &ops).await {
                debug!(error = %error_chain(&e), "removing duplicate nodes; the next read finds them again");
            }
        }
        for chunk in foreign.chunks(MAX_OPS / 2) {
            let mut ops = Vec::with_capacity(chunk.len() * 2);
            let mut paths = Vec::with_capacity(chunk.len());
            for held in chunk {
                let Ok(node) = self.node(&held.instance) else {
                    continue;
                };
                ops.push(Op::Delete(held.path.clone()));
                paths.push((held.instance.id.clone(), node.path.clone()));
                ops.push(Op::Create(node));
            }
            match self.commit(&client, &ops).await {
                Ok(()) => {
                    let mut owned = lock(&self.owned);
                    for (id, path) in paths {
                        if let Some(held) = owned.get_mut(&id) {
                            held.path = path;
                            held.ours = true;
                        }
                    }
                    done += chunk.len();
                    self.writer_metrics.takeovers.inc_by(chunk.len() as u64);
                }
                Err(e) => {
                    // A node of the old session vanished meanwhile (it expired): what
                    // is missing is registered again after the next read.
                    warn!(error = %error_chain(&e), "taking over nodes of another session failed; reading ZooKeeper again");
                    self.changed.notify_one();
                    return Err(e);
                }
            }
        }
        Ok(done)
    }
}

impl RegistryWriter for ZookeeperWriter {
    const NAME: &'static str = "zookeeper";
    type Error = ZookeeperError;

    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        if self.registers_requests {
            self.metrics.common.register(registry);
        }
        self.writer_metrics.register(registry);
    }

    fn max_ops_per_request(&self) -> usize {
        MAX_OPS
    }

    /// A new node is one create; a changed one a delete and a create.
    fn cost(&self, write: &Write) -> usize {
        match write {
            Write::Register(_) | Write::SetHealth(_) => 2,
            Write::Deregister(_) => 1,
        }
    }

    fn normalize(&self, instance: &mut Instance) {
        register::normalize(self.layout, instance);
    }

    /// Every service directory below the base path, its nodes, and this session's
    /// ephemerals: what is owned, and which owned nodes another session holds.
    async fn read(&self) -> Result<Registered, ZookeeperError> {
        let _writes = self.writes.lock().await;
        let client = self.client().await?;
        let dirs = self.children(&client, &self.base).await?;
        let mut reads = futures::stream::iter(dirs)
            .map(|dir| {
                let client = &client;
                async move {
                    let read = self.read_dir(client, &dir).await;
                    (dir, read)
                }
            })
            .buffer_unordered(READ_CONCURRENCY);
        let mut found = Vec::new();
        let mut shared_names = BTreeSet::new();
        let mut known_dirs = BTreeSet::new();
        while let Some((dir, read)) = reads.next().await {
            let (owned, foreign) = read?;
            if foreign && !owned.is_empty() {
                shared_names.insert(dir.clone());
            }
            if !owned.is_empty() {
                let parent = owned[0].0.rsplit_once('/').map(|(d, _)| d.to_string());
                known_dirs.extend(parent);
            }
            found.extend(owned);
        }
        drop(reads);
        let listed = client.list_ephemerals(&self.base).await;
        self.metrics.record("get_ephemerals", listed.is_ok());
        let ephemerals: BTreeSet<String> = listed
            .map_err(|e| ZookeeperError::request("getEphemerals", &self.base, e))?
            .into_iter()
            .collect();

        let mut owned = BTreeMap::new();
        let mut strays = Vec::new();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        for (path, instance) in found {
            let ours = ephemerals.contains(&path);
            match owned.get_mut(&instance.id) {
                None => {
                    owned.insert(
                        instance.id.clone(),
                        Held {
                            path,
                            instance,
                            ours,
                        },
                    );
                }
                // Keep the one this session holds, remove the other.
                Some(held) if ours && !held.ours => {
                    strays.push(
                        std::mem::replace(
                            held,
                            Held {
                                path,
                                instance,
                                ours,
                            },
                        )
                        .path,
                    );
                }
                Some(_) => strays.push(path),
            }
        }
        let foreign = owned.values().filter(|h| !h.ours).count();
        if foreign > 0 || !strays.is_empty() {
            info!(
                nodes = foreign,
                duplicates = strays.len(),
                "owned ZooKeeper nodes held by another session; taking them over"
            );
            self.takeover.notify_one();
        }
        let instances = owned.values().map(|h| h.instance.clone()).collect();
        *lock(&self.owned) = owned;
        *lock(&self.strays) = strays;
        lock(&self.dirs).extend(known_dirs);
        Ok(Registered {
            instances,
            shared_names,
        })
    }

    async fn apply(&self, writes: &[Write]) -> Result<Applied, ZookeeperError> {
        let _writes = self.writes.lock().await;
        let client = self.client().await?;
        let mut ops = Vec::new();
        let mut rejected = Vec::new();
        // What the owned map becomes once the multi is committed.
        let mut after: Vec<(String, Option<Held>)> = Vec::new();
        {
            let owned = lock(&self.owned);
            for (index, write) in writes.iter().enumerate() {
                let instance = write.instance();
                let held = owned.get(&instance.id);
                match write {
                    Write::Register(_) | Write::SetHealth(_) => {
                        let node = match self.node(instance) {
                            Ok(node) => node,
                            Err(e) => {
                                rejected.push(Rejected {
                                    index,
                                    reason: e.to_string(),
                                });
                                continue;
                            }
                        };
                        let path = node.path.clone();
                        match held {
                            // Curator's node keeps its name: its data changes in place.
                            Some(h)
                                if h.ours
                                    && h.path == node.path
                                    && self.layout == Layout::Curator =>
                            {
                                ops.push(Op::SetData(node));
                            }
                            Some(h) => {
                                ops.push(Op::Delete(h.path.clone()));
                                ops.push(Op::Create(node));
                            }
                            None => ops.push(Op::Create(node)),
                        }
                        after.push((
                            instance.id.clone(),
                            Some(Held {
                                path,
                                instance: instance.clone(),
                                ours: true,
                            }),
                        ));
                    }
                    Write::Deregister(_) => {
                        if let Some(h) = held {
                            ops.push(Op::Delete(h.path.clone()));
                        }
                        after.push((instance.id.clone(), None));
                    }
                }
            }
        }
        self.commit(&client, &ops).await?;
        let mut owned = lock(&self.owned);
        for (id, held) in after {
            match held {
                Some(held) => owned.insert(id, held),
                None => owned.remove(&id),
            };
        }
        Ok(Applied { rejected })
    }

    async fn changed(&self) {
        self.changed.notified().await;
    }

    /// While this process leads: takes over owned nodes another session holds, and
    /// notices an expired session (a new one is opened, the engine reads again).
    async fn maintain(&self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.takeover.notified() => {}
                _ = tokio::time::sleep(SESSION_CHECK) => {}
            }
            match self.take_over().await {
                Ok(0) => {}
                Ok(n) => info!(
                    nodes = n,
                    "took over owned ZooKeeper nodes from another session"
                ),
                Err(e) => debug!(error = %error_chain(&e), "ZooKeeper writer maintenance"),
            }
        }
    }
}
