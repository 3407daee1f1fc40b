//! The process edge: flags, logging, signals and the wiring of one registry source to
//! the sink. Errors here are `anyhow`: they end the process with context for the operator.

pub mod admin;
pub mod cli;
pub mod consul_args;
pub mod eureka_args;
pub mod export_args;
pub mod lease;
pub mod logging;
pub mod nacos_args;
pub mod secret_args;
pub mod signals;
pub mod source_args;
pub mod sync_args;
pub mod zookeeper_args;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::catalog::Catalog;
use crate::export::engine::{ExportPlan, ExportStatus, Exporter};
use crate::export::RegistryWriter;
use crate::registry::RegistrySource;
use crate::sink::metrics::Verb;
use crate::sink::plan::Plan;
use crate::sink::Sink;
use cli::OperationArgs;
use futures::future::BoxFuture;
use lease::{LeaseConfig, LeaseElector};
use sync_args::SyncArgs;

/// How long a source gets to stop after the sink has finished.
const SOURCE_STOP_GRACE: Duration = Duration::from_secs(5);

/// A source's run, type-erased: it feeds the catalog until the token is cancelled.
pub type SourceTask =
    Box<dyn FnOnce(Arc<Catalog>, CancellationToken) -> BoxFuture<'static, Result<()>> + Send>;

/// What one command runs: the registry → Kubernetes direction (a source), the
/// Kubernetes → registry direction (an exporter), or both under one lease.
pub struct Directions {
    pub source: Option<SourceTask>,
    /// The `source` label and log name.
    pub source_name: &'static str,
    pub note: crate::registry::SourceNote,
    pub export: Option<Box<dyn ExportRunner>>,
}

/// The exporter of one registry, type-erased for the runtime.
pub trait ExportRunner: Send {
    fn status(&self) -> watch::Receiver<ExportStatus>;
    fn register_metrics(&self, registry: &mut Registry);
    fn run(
        self: Box<Self>,
        shutdown: CancellationToken,
        leader: watch::Receiver<bool>,
    ) -> BoxFuture<'static, ()>;
    fn plan(self: Box<Self>, shutdown: CancellationToken)
        -> BoxFuture<'static, Result<ExportPlan>>;
    /// Deregisters everything this connector owns; usable after `run` ended.
    fn purger(&self) -> Box<dyn FnOnce() -> BoxFuture<'static, Result<usize>> + Send>;
}

impl<W: RegistryWriter> ExportRunner for Exporter<W> {
    fn status(&self) -> watch::Receiver<ExportStatus> {
        Exporter::status(self)
    }

    fn register_metrics(&self, registry: &mut Registry) {
        Exporter::register_metrics(self, registry)
    }

    fn run(
        self: Box<Self>,
        shutdown: CancellationToken,
        leader: watch::Receiver<bool>,
    ) -> BoxFuture<'static, ()> {
        Box::pin(self.with_leadership(leader).run(shutdown))
    }

    fn plan(
        self: Box<Self>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<ExportPlan>> {
        Box::pin(async move { Ok(self.plan_once(shutdown).await?) })
    }

    fn purger(&self) -> Box<dyn FnOnce() -> BoxFuture<'static, Result<usize>> + Send> {
        let purger = self.purger_handle();
        Box::new(move || {
            Box::pin(async move {
                purger
                    .purge()
                    .await
                    .map_err(|e| anyhow::anyhow!(crate::registry::error_chain(&e)))
                    .with_context(|| format!("deregistering this connector's {} entries", W::NAME))
            })
        })
    }
}

/// Runs the directions of one command until SIGTERM/SIGINT or until the source fails.
/// `registry` already holds the registry's metrics; the sink's, the exporter's and the
/// process's are added here, under the `registry_connector_` prefix.
pub async fn run_connector(
    args: &SyncArgs,
    op: &OperationArgs,
    mut registry: Registry,
    directions: Directions,
) -> Result<()> {
    let Directions {
        source,
        source_name,
        note,
        export,
    } = directions;
    let client = args.client().await?;
    let version = client
        .apiserver_version()
        .await
        .context("cannot reach the Kubernetes apiserver")?;
    info!(
        source = source_name,
        apiserver = %version.git_version,
        namespace = %args.namespace,
        connector_id = %args.connector_id,
        to_kubernetes = source.is_some(),
        to_registry = export.is_some(),
        "starting registry-connector"
    );
    if op.purge {
        return purge_now(&client, args, source.is_some(), export).await;
    }
    if op.dry_run || op.diff {
        if let Some(source) = source {
            dry_run(client.clone(), args, op.diff, source).await?;
        }
        if let Some(export) = export {
            export_dry_run(export, source_name).await?;
        }
        return Ok(());
    }

    let shutdown = signals::shutdown_token();
    let leadership = Leadership::start(&client, args, op, &mut registry);
    let leader_rx = leadership.receiver();
    let purge_leader = leader_rx.clone();

    let mut sink_parts = None;
    if let Some(source) = source {
        let (catalog, events) = Catalog::new();
        let catalog = Arc::new(catalog);
        let mut sink_config = args.sink_config();
        sink_config.source = source_name;
        let sink = Sink::new(client.clone(), sink_config, catalog.clone(), events)
            .with_leadership(leader_rx.clone());
        sink.handle().metrics.register(&mut registry);
        sink_parts = Some((sink, catalog, source));
    }
    let mut export_parts = None;
    if let Some(export) = export {
        export.register_metrics(&mut registry);
        let status = export.status();
        let purger = export.purger();
        export_parts = Some((export, status, purger));
    }

    let registry = Arc::new(registry);
    let admin_task = match op.admin_addr.0 {
        Some(addr) => Some(
            admin::serve(
                addr,
                registry.clone(),
                admin::Parts {
                    sink: sink_parts.as_ref().map(|(sink, _, _)| sink.handle()),
                    export: export_parts.as_ref().map(|(_, status, _)| status.clone()),
                    note,
                },
                shutdown.clone(),
            )
            .await?
            .1,
        ),
        None => None,
    };

    let mut source_task = None;
    let mut sink_task = None;
    if let Some((sink, catalog, source)) = sink_parts {
        source_task = Some(tokio::spawn(source(catalog, shutdown.clone())));
        sink_task = Some(tokio::spawn(sink.run(shutdown.clone())));
    }
    let mut export_task = None;
    let mut export_purger = None;
    if let Some((export, _, purger)) = export_parts {
        export_task = Some(tokio::spawn(
            export.run(shutdown.clone(), leader_rx.clone()),
        ));
        export_purger = Some(purger);
    }

    let source_result = match source_task {
        Some(task) => wait_source(task, shutdown.clone()).await,
        None => {
            shutdown.cancelled().await;
            Ok(())
        }
    };
    if let Err(e) = &source_result {
        error!(error = %format!("{e:#}"), "the registry source failed; stopping");
    }
    shutdown.cancel();
    let has_sink = sink_task.is_some();
    if let Some(task) = sink_task {
        task.await.context("sink task panicked")?;
    }
    if let Some(task) = export_task {
        task.await.context("export task panicked")?;
    }
    // The elector still runs: this is the current leadership.
    let was_leader = *purge_leader.borrow();
    if op.purge_on_exit && !was_leader {
        info!("--purge-on-exit: not the lease holder, leaving the objects to the leader");
    }
    if op.purge_on_exit && was_leader {
        if has_sink {
            crate::sink::purge::purge(&client, &args.namespace, &args.connector_id)
                .await
                .context("--purge-on-exit")?;
        }
        if let Some(purger) = export_purger {
            let count = purger().await.context("--purge-on-exit")?;
            info!(
                registry = source_name,
                deregistered = count,
                "--purge-on-exit: registrations removed"
            );
        }
    }
    leadership.stop().await;
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    source_result
}

/// `--purge`: removes what this connector owns in each direction it names, and exits.
async fn purge_now(
    client: &kube::Client,
    args: &SyncArgs,
    to_kubernetes: bool,
    export: Option<Box<dyn ExportRunner>>,
) -> Result<()> {
    if to_kubernetes {
        let purged = crate::sink::purge::purge(client, &args.namespace, &args.connector_id)
            .await
            .with_context(|| format!("purging namespace {}", args.namespace))?;
        println!(
            "purged {} services, {} endpointslices, {} endpoints owned by connector {:?} in namespace {}",
            purged.services, purged.endpoint_slices, purged.endpoints, args.connector_id, args.namespace
        );
    }
    if let Some(export) = export {
        let count = export.purger()().await?;
        println!(
            "deregistered {count} registry entries owned by connector {:?}",
            args.connector_id
        );
    }
    Ok(())
}

/// `--dry-run` for the Kubernetes → registry direction: the registry writes a pass
/// would make.
async fn export_dry_run(export: Box<dyn ExportRunner>, registry: &str) -> Result<()> {
    let interrupted = signals::shutdown_token();
    info!("dry run: reading the cluster and the registry; nothing will be written");
    let plan = export.plan(interrupted).await?;
    let count = |op: &str| plan.writes.iter().filter(|w| w.op() == op).count();
    println!(
        "Plan for {registry}: {} to register, {} health changes, {} to deregister",
        count("register"),
        count("health"),
        count("deregister"),
    );
    for write in &plan.writes {
        println!("  {write}");
    }
    if !plan.held.is_empty() {
        println!(
            "Held by the mass-deletion guard (not in the plan): {} services: {}",
            plan.held.len(),
            plan.held.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    if plan.writes.is_empty() {
        println!("  (nothing to do: the registry matches the cluster)");
    }
    Ok(())
}

/// Whether this process may write: a Lease elector, or always when election is off.
struct Leadership {
    rx: watch::Receiver<bool>,
    elector: Option<tokio::task::JoinHandle<()>>,
    /// Its own stop signal: the lease is kept (and released) only after the sink has
    /// stopped and a --purge-on-exit has run, so that purge happens under the lease.
    stop: CancellationToken,
    /// Without election the sender must outlive the sink: the channel then says
    /// "leader" for the whole run.
    _always: Option<watch::Sender<bool>>,
}

impl Leadership {
    fn start(
        client: &kube::Client,
        args: &SyncArgs,
        op: &OperationArgs,
        registry: &mut Registry,
    ) -> Self {
        let (tx, rx) = watch::channel(!op.leader_elect);
        let stop = CancellationToken::new();
        let mut leadership = Self {
            rx,
            elector: None,
            stop: stop.clone(),
            _always: None,
        };
        if op.leader_elect {
            let cfg = LeaseConfig {
                name: op.lease_name.clone(),
                namespace: op
                    .lease_namespace
                    .clone()
                    .unwrap_or_else(|| args.namespace.clone()),
                holder: lease::default_holder(op.lease_holder.as_deref()),
                duration: op.lease_duration,
                renew_interval: op.lease_renew_interval,
            };
            info!(lease = %cfg.name, namespace = %cfg.namespace, holder = %cfg.holder, "leader election on");
            let elector = LeaseElector::new(client.clone(), cfg);
            leadership.elector = Some(tokio::spawn(elector.run(tx, stop)));
        } else {
            leadership._always = Some(tx);
        }

        let gauge = Gauge::<i64>::default();
        registry.register(
            "leader",
            "1 while this process holds the lease (or runs without election), else 0",
            gauge.clone(),
        );
        let mut rx = leadership.rx.clone();
        tokio::spawn(async move {
            loop {
                gauge.set(i64::from(*rx.borrow_and_update()));
                if rx.changed().await.is_err() {
                    gauge.set(0);
                    break;
                }
            }
        });
        leadership
    }

    fn receiver(&self) -> watch::Receiver<bool> {
        self.rx.clone()
    }

    /// Stops the elector, which releases a held lease.
    async fn stop(self) {
        self.stop.cancel();
        if let Some(task) = self.elector {
            let _ = task.await;
        }
    }
}

/// `--dry-run` / `--diff`: one pass in plan mode, then print the plan.
async fn dry_run<F, Fut>(client: kube::Client, args: &SyncArgs, diff: bool, source: F) -> Result<()>
where
    F: FnOnce(Arc<Catalog>, CancellationToken) -> Fut,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let interrupted = signals::shutdown_token();
    let stop = CancellationToken::new();
    let (catalog, events) = Catalog::new();
    let catalog = Arc::new(catalog);
    let plan = if diff {
        Plan::with_changes()
    } else {
        Plan::default()
    };
    let sink =
        Sink::new(client, args.sink_config(), catalog.clone(), events).with_plan(plan.clone());
    let handle = sink.handle();
    let mut source_task = tokio::spawn(source(catalog, stop.clone()));
    let sink_task = tokio::spawn(sink.run(stop.clone()));
    info!("dry run: reading the registry and the cluster; nothing will be written");
    let outcome = tokio::select! {
        _ = handle.wait_for(|s| s.initial_sync_done) => Ok(()),
        _ = interrupted.cancelled() => Err(anyhow::anyhow!("interrupted before the registry's first complete snapshot")),
        res = &mut source_task => match res {
            Ok(Ok(())) => Err(anyhow::anyhow!("the registry source stopped before its first snapshot")),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(e).context("source task panicked"),
        },
    };
    stop.cancel();
    sink_task.await.context("sink task panicked")?;
    source_task.abort();
    outcome?;

    let writes = plan.writes();
    let count = |verb: &[Verb]| writes.iter().filter(|w| verb.contains(&w.verb)).count();
    println!(
        "Plan for namespace {} (connector id {}): {} to create, {} to update, {} to delete",
        args.namespace,
        args.connector_id,
        count(&[Verb::Create]),
        count(&[Verb::Update]),
        count(&[Verb::Delete]),
    );
    for write in &writes {
        println!("  {write}");
        if diff {
            for change in &write.changes {
                println!("      ~ {change}");
            }
        }
    }
    let held = handle.status().held_deletions;
    if !held.is_empty() {
        println!(
            "Held by the mass-deletion guard (not in the plan): {} services: {}",
            held.len(),
            held.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    if writes.is_empty() {
        println!("  (nothing to do: the cluster matches the registry)");
    }
    Ok(())
}

async fn wait_source(
    task: tokio::task::JoinHandle<Result<()>>,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut task = task;
    tokio::select! {
        res = &mut task => return res.context("source task panicked")?,
        _ = shutdown.cancelled() => {}
    }
    match tokio::time::timeout(SOURCE_STOP_GRACE, &mut task).await {
        Ok(res) => res.context("source task panicked")?,
        Err(_) => {
            task.abort();
            Ok(())
        }
    }
}

/// Runs one command to completion.
pub async fn run(command: cli::Command) -> Result<()> {
    match command {
        cli::Command::Consul(cmd) => run_consul(*cmd).await,
        cli::Command::Eureka(cmd) => run_eureka(*cmd).await,
        cli::Command::Nacos(cmd) => run_nacos(*cmd).await,
        cli::Command::Zookeeper(cmd) => run_zookeeper(*cmd).await,
        cli::Command::Purge(cmd) => {
            let client = sync_args::kube_client(cmd.kubeconfig.as_deref()).await?;
            let purged = crate::sink::purge::purge(&client, &cmd.namespace, &cmd.connector_id)
                .await
                .with_context(|| format!("purging namespace {}", cmd.namespace))?;
            println!(
                "purged {} services, {} endpointslices, {} endpoints owned by connector {:?} in namespace {}",
                purged.services, purged.endpoint_slices, purged.endpoints, cmd.connector_id, cmd.namespace
            );
            Ok(())
        }
    }
}

async fn run_consul(cmd: cli::ConsulCommand) -> Result<()> {
    use crate::registry::consul::{metrics::ConsulMetrics, writer::ConsulWriter, ConsulSource};
    let config = cmd.consul.to_config(&cmd.source)?;
    let direction = cmd.export.sync;
    // One set of Consul request metrics for both directions.
    let metrics = Arc::new(ConsulMetrics::default());
    let mut registry = Registry::with_prefix("registry_connector");
    metrics.register(&mut registry);
    let mut directions = Directions {
        source: None,
        source_name: "consul",
        note: Default::default(),
        export: None,
    };
    if direction.to_kubernetes() {
        let source = ConsulSource::with_metrics(config.clone(), metrics.clone())
            .context("configuring the Consul source")?;
        directions.note = source.note();
        directions.source = Some(source_task(source));
    }
    if direction.to_registry() {
        let writer = ConsulWriter::new(
            &config,
            cmd.consul.writer_config(&cmd.sync.connector_id),
            metrics,
        )
        .context("configuring the Kubernetes → Consul writer")?;
        directions.export = Some(exporter(&cmd.sync, &cmd.export, writer).await?);
    }
    run_connector(&cmd.sync, &cmd.operation, registry, directions).await
}

async fn run_eureka(cmd: cli::EurekaCommand) -> Result<()> {
    use crate::registry::eureka::writer::{EurekaWriter, EurekaWriterConfig};
    use crate::registry::eureka::EurekaSource;
    let config = cmd.eureka.to_config(&cmd.source)?;
    let mut registry = Registry::with_prefix("registry_connector");
    let mut directions = Directions {
        source: None,
        source_name: "eureka",
        note: Default::default(),
        export: None,
    };
    let mut source_metrics = None;
    if cmd.export.sync.to_kubernetes() {
        let source = EurekaSource::new(config.clone()).context("configuring the Eureka source")?;
        source.register_metrics(&mut registry);
        source_metrics = Some(source.metrics());
        directions.note = source.note();
        directions.source = Some(source_task(source));
    }
    if cmd.export.sync.to_registry() {
        let writer_cfg = EurekaWriterConfig::new(cmd.sync.connector_id.clone());
        // One set of Eureka request metrics for both directions.
        let writer = match source_metrics {
            Some(metrics) => EurekaWriter::with_source_metrics(&config, writer_cfg, metrics),
            None => EurekaWriter::new(&config, writer_cfg),
        }
        .context("configuring the Kubernetes → Eureka writer")?;
        directions.export = Some(exporter(&cmd.sync, &cmd.export, writer).await?);
    }
    run_connector(&cmd.sync, &cmd.operation, registry, directions).await
}

async fn run_nacos(cmd: cli::NacosCommand) -> Result<()> {
    use crate::registry::nacos::NacosSource;
    let config = cmd.nacos.to_config(&cmd.source)?;
    let mut registry = Registry::with_prefix("registry_connector");
    let source = NacosSource::new(config).context("configuring the Nacos source")?;
    source.register_metrics(&mut registry);
    let directions = Directions {
        source_name: "nacos",
        note: source.note(),
        source: Some(source_task(source)),
        export: None,
    };
    run_connector(&cmd.sync, &cmd.operation, registry, directions).await
}

async fn run_zookeeper(cmd: cli::ZookeeperCommand) -> Result<()> {
    use crate::registry::zookeeper::{writer::ZookeeperWriter, ZookeeperSource};
    let config = cmd.zookeeper.to_config(&cmd.source)?;
    let mut registry = Registry::with_prefix("registry_connector");
    let mut directions = Directions {
        source: None,
        source_name: "zookeeper",
        note: Default::default(),
        export: None,
    };
    let mut source_metrics = None;
    if cmd.export.sync.to_kubernetes() {
        let source =
            ZookeeperSource::new(config.clone()).context("configuring the ZooKeeper source")?;
        source.register_metrics(&mut registry);
        source_metrics = Some(source.metrics());
        directions.note = source.note();
        directions.source = Some(source_task(source));
    }
    if cmd.export.sync.to_registry() {
        let id = &cmd.sync.connector_id;
        // One set of ZooKeeper request metrics for both directions.
        let writer = match source_metrics {
            Some(metrics) => ZookeeperWriter::with_source_metrics(&config, id, metrics),
            None => ZookeeperWriter::new(&config, id),
        }
        .context("configuring the Kubernetes → ZooKeeper writer")?;
        directions.export = Some(exporter(&cmd.sync, &cmd.export, writer).await?);
    }
    run_connector(&cmd.sync, &cmd.operation, registry, directions).await
}

/// A source as the runtime runs it.
fn source_task<S: RegistrySource>(source: S) -> SourceTask {
    Box::new(move |catalog, shutdown| {
        Box::pin(async move {
            source
                .run(catalog, shutdown)
                .await
                .with_context(|| format!("reading {}", S::NAME))
        })
    })
}

/// The exporter of `writer`, configured from the flags.
async fn exporter<W: RegistryWriter>(
    sync: &SyncArgs,
    export: &export_args::ExportArgs,
    writer: W,
) -> Result<Box<dyn ExportRunner>> {
    let client = sync.client().await?;
    Ok(Box::new(Exporter::new(
        client,
        writer,
        export.export_config(sync),
    )))
}
