//! The process edge: flags, logging, signals and the wiring of one registry source to
//! the sink. Errors here are `anyhow`: they end the process with context for the operator.

pub mod admin;
pub mod cli;
pub mod consul_args;
pub mod eureka_args;
pub mod lease;
pub mod logging;
pub mod secret_args;
pub mod signals;
pub mod source_args;
pub mod sync_args;

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
use crate::registry::RegistrySource;
use crate::sink::metrics::Verb;
use crate::sink::plan::Plan;
use crate::sink::Sink;
use cli::OperationArgs;
use lease::{LeaseConfig, LeaseElector};
use sync_args::SyncArgs;

/// How long a source gets to stop after the sink has finished.
const SOURCE_STOP_GRACE: Duration = Duration::from_secs(5);

/// Runs `source` feeding the sink until SIGTERM/SIGINT or until the source fails.
/// `registry` already holds the source's metrics; the sink's and the process's are
/// added here, under the `registry_connector_` prefix.
pub async fn run_connector<F, Fut>(
    args: &SyncArgs,
    op: &OperationArgs,
    mut registry: Registry,
    source_name: &'static str,
    note: crate::registry::SourceNote,
    source: F,
) -> Result<()>
where
    F: FnOnce(Arc<Catalog>, CancellationToken) -> Fut,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
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
        "starting registry-connector"
    );
    if op.dry_run || op.diff {
        return dry_run(client, args, op.diff, source).await;
    }

    let shutdown = signals::shutdown_token();
    let (catalog, events) = Catalog::new();
    let catalog = Arc::new(catalog);
    let mut sink_config = args.sink_config();
    sink_config.source = source_name;
    let mut sink = Sink::new(client.clone(), sink_config, catalog.clone(), events);
    sink.handle().metrics.register(&mut registry);

    let leadership = Leadership::start(&client, args, op, &mut registry);
    let leader_rx = leadership.receiver();
    let purge_leader = leader_rx.clone();
    sink = sink.with_leadership(leader_rx);

    let handle = sink.handle();
    let registry = Arc::new(registry);
    let admin_task = match op.admin_addr.0 {
        Some(addr) => Some(
            admin::serve(addr, registry.clone(), handle, note, shutdown.clone())
                .await?
                .1,
        ),
        None => None,
    };

    let source_task = tokio::spawn(source(catalog, shutdown.clone()));
    let sink_task = tokio::spawn(sink.run(shutdown.clone()));

    let source_result = wait_source(source_task, shutdown.clone()).await;
    if let Err(e) = &source_result {
        error!(error = %format!("{e:#}"), "the registry source failed; stopping");
    }
    shutdown.cancel();
    sink_task.await.context("sink task panicked")?;
    // The elector still runs: this is the current leadership.
    let was_leader = *purge_leader.borrow();
    if op.purge_on_exit {
        if was_leader {
            crate::sink::purge::purge(&client, &args.namespace, &args.connector_id)
                .await
                .context("--purge-on-exit")?;
        } else {
            info!("--purge-on-exit: not the lease holder, leaving the objects to the leader");
        }
    }
    leadership.stop().await;
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    source_result
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
    let config = cmd.consul.to_config(&cmd.source)?;
    let source = crate::registry::consul::ConsulSource::new(config)
        .context("configuring the Consul source")?;
    run_source(source, &cmd.sync, &cmd.operation).await
}

async fn run_eureka(cmd: cli::EurekaCommand) -> Result<()> {
    let config = cmd.eureka.to_config(&cmd.source)?;
    let source = crate::registry::eureka::EurekaSource::new(config)
        .context("configuring the Eureka source")?;
    run_source(source, &cmd.sync, &cmd.operation).await
}

/// Runs a configured source with the sink, under the process's metrics registry.
async fn run_source<S: RegistrySource>(
    source: S,
    sync: &SyncArgs,
    operation: &OperationArgs,
) -> Result<()> {
    let mut registry = Registry::with_prefix("registry_connector");
    source.register_metrics(&mut registry);
    let note = source.note();
    run_connector(
        sync,
        operation,
        registry,
        S::NAME,
        note,
        move |catalog, shutdown| async move {
            source
                .run(catalog, shutdown)
                .await
                .with_context(|| format!("reading {}", S::NAME))
        },
    )
    .await
}
