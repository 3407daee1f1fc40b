//! The process edge: flags, logging, signals and the wiring of one registry source to
//! the sink. Errors here are `anyhow`: they end the process with context for the operator.

pub mod admin;
pub mod cli;
pub mod consul_args;
pub mod lease;
pub mod logging;
pub mod signals;
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

    let shutdown = signals::shutdown_token();
    let (catalog, events) = Catalog::new();
    let catalog = Arc::new(catalog);
    let mut sink = Sink::new(client.clone(), args.sink_config(), catalog.clone(), events);
    sink.handle().metrics.register(&mut registry);

    // Leadership: a Lease elector, or always the leader when election is off.
    let leader_gauge = Gauge::<i64>::default();
    registry.register(
        "leader",
        "1 while this process holds the lease (or runs without election), else 0",
        leader_gauge.clone(),
    );
    let (leader_tx, leader_rx) = watch::channel(!op.leader_elect);
    let mut elector_task = None;
    // Without election the sender must outlive the sink: the channel then says
    // "leader" for the whole run.
    let mut _always_leader = None;
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
        elector_task = Some(tokio::spawn(elector.run(leader_tx, shutdown.clone())));
    } else {
        _always_leader = Some(leader_tx);
    }
    {
        let mut rx = leader_rx.clone();
        let gauge = leader_gauge.clone();
        tokio::spawn(async move {
            loop {
                gauge.set(i64::from(*rx.borrow_and_update()));
                if rx.changed().await.is_err() {
                    gauge.set(0);
                    break;
                }
            }
        });
    }
    sink = sink.with_leadership(leader_rx);

    let handle = sink.handle();
    let registry = Arc::new(registry);
    let admin_task = match op.admin_addr.0 {
        Some(addr) => Some(
            admin::serve(addr, registry.clone(), handle, shutdown.clone())
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
    if let Some(task) = elector_task {
        let _ = task.await;
    }
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    source_result
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
        cli::Command::Consul(cmd) => run_consul(cmd).await,
    }
}

async fn run_consul(cmd: cli::ConsulCommand) -> Result<()> {
    let config = cmd.consul.to_config()?;
    let source = crate::registry::consul::ConsulSource::new(config)
        .context("configuring the Consul source")?;
    let mut registry = Registry::with_prefix("registry_connector");
    source.register_metrics(&mut registry);
    run_connector(
        &cmd.sync,
        &cmd.operation,
        registry,
        "consul",
        move |catalog, shutdown| async move {
            source
                .run(catalog, shutdown)
                .await
                .context("reading Consul")
        },
    )
    .await
}
