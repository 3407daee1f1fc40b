//! The admin HTTP server: `/healthz`, `/readyz`, `/metrics`.
//!
//! - `/healthz` answers 200 while the sync loop keeps ticking (it refreshes a heartbeat
//!   every few seconds even when idle); a wedged loop turns it into 503 so the kubelet
//!   restarts the process.
//! - `/readyz` answers 200 once the first complete registry snapshot has been
//!   reconciled, or, on a standby replica, once its caches and registry view are warm.
//! - `/metrics` is the Prometheus text format of the process-wide registry.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::sink::SinkHandle;

/// A heartbeat older than this means the loop is wedged.
const WEDGED_AFTER: Duration = Duration::from_secs(60);

#[derive(Clone)]
struct AdminState {
    registry: Arc<Registry>,
    sink: SinkHandle,
}

/// Binds `addr` and serves until `shutdown`. Returns the bound address (useful with
/// port 0) once listening.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    sink: SinkHandle,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin server to {addr}"))?;
    let bound = listener.local_addr().context("admin server address")?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState { registry, sink });
    info!(addr = %bound, "admin server listening (/healthz, /readyz, /metrics)");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok((bound, task))
}

async fn healthz(State(state): State<AdminState>) -> Response {
    match state.sink.heartbeat_age() {
        Some(age) if age > WEDGED_AFTER => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("sync loop silent for {}s\n", age.as_secs()),
        )
            .into_response(),
        _ => (StatusCode::OK, "ok\n").into_response(),
    }
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let s = state.sink.status();
    let warm_standby = !s.leader && s.caches_ready && s.source_synced;
    if s.initial_sync_done || warm_standby {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let why = if !s.caches_ready {
            "waiting for the Kubernetes caches"
        } else if !s.source_synced {
            "waiting for the registry's first complete snapshot"
        } else {
            "initial sync in progress"
        };
        (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response()
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}
