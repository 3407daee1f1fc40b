//! The process edge: flags, logging, signals and the wiring of one registry source to
//! the sink. Errors here are `anyhow`: they end the process with context for the operator.

pub mod cli;
pub mod logging;
pub mod signals;
pub mod sync_args;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::catalog::Catalog;
use crate::sink::Sink;
use sync_args::SyncArgs;

/// How long a source gets to stop after the sink has finished.
const SOURCE_STOP_GRACE: Duration = Duration::from_secs(5);

/// Runs `source` feeding the sink until SIGTERM/SIGINT or until the source fails.
pub async fn run_connector<F, Fut>(args: &SyncArgs, source_name: &'static str, source: F) -> Result<()>
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
    let sink = Sink::new(client, args.sink_config(), catalog.clone(), events);

    let source_task = tokio::spawn(source(catalog, shutdown.clone()));
    let sink_task = tokio::spawn(sink.run(shutdown.clone()));

    let source_result = wait_source(source_task, shutdown.clone()).await;
    if let Err(e) = &source_result {
        error!(error = %format!("{e:#}"), "the registry source failed; stopping");
    }
    shutdown.cancel();
    sink_task.await.context("sink task panicked")?;
    source_result
}

async fn wait_source(task: tokio::task::JoinHandle<Result<()>>, shutdown: CancellationToken) -> Result<()> {
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
