//! The admin HTTP server: `/healthz`, `/readyz`, `/metrics`.
//!
//! - `/healthz` answers 200 while the sync loop keeps ticking (it refreshes a heartbeat
//!   every few seconds even when idle); a wedged loop turns it into 503 so the kubelet
//!   restarts the process.
//! - `/readyz` answers 200 once the first complete registry snapshot has been
//!   reconciled, or, on a standby replica, once its caches and registry view are warm.
//!   A source in a degraded mode (Consul's shared mode) adds a line saying so: the
//!   process is ready, but an operator reading the probe should know. With the
//!   Kubernetes → registry direction running, it must be ready too (its watches listed
//!   and its first pass written, or, on a standby, its watches listed).
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

use crate::export::engine::ExportStatus;
use crate::registry::SourceNote;
use crate::sink::{SinkHandle, SinkStatus};

/// A heartbeat older than this means the loop is wedged.
const WEDGED_AFTER: Duration = Duration::from_secs(60);

#[derive(Clone)]
struct AdminState {
    registry: Arc<Registry>,
    parts: Parts,
}

/// What the probes look at: the registry → Kubernetes sink and the Kubernetes →
/// registry exporter, whichever run.
#[derive(Clone)]
pub struct Parts {
    pub sink: Option<SinkHandle>,
    pub export: Option<tokio::sync::watch::Receiver<ExportStatus>>,
    pub note: SourceNote,
}

/// Binds `addr` and serves until `shutdown`. Returns the bound address (useful with
/// port 0) once listening.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    parts: Parts,
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
        .with_state(AdminState { registry, parts });
    info!(addr = %bound, "admin server listening (/healthz, /readyz, /metrics)");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok((bound, task))
}

async fn healthz(State(state): State<AdminState>) -> Response {
    match state.parts.sink.as_ref().and_then(|s| s.heartbeat_age()) {
        Some(age) if age > WEDGED_AFTER => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("sync loop silent for {}s\n", age.as_secs()),
        )
            .into_response(),
        _ => (StatusCode::OK, "ok\n").into_response(),
    }
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let sink = state.parts.sink.as_ref().map(|s| s.status());
    let export = state.parts.export.as_ref().map(|e| e.borrow().clone());
    let mut reasons: Vec<String> = sink
        .as_ref()
        .and_then(not_ready_because)
        .into_iter()
        .collect();
    reasons.extend(export.as_ref().and_then(export_not_ready_because));
    let (status, body) = answer(reasons, state.parts.note.get());
    (status, body).into_response()
}

/// The status and body of `/readyz` for the sink alone.
#[cfg(test)]
fn readyz_answer(status: &SinkStatus, note: Option<String>) -> (StatusCode, String) {
    answer(not_ready_because(status).into_iter().collect(), note)
}

/// The status and body of `/readyz`: the reasons for not being ready, and the source's
/// note (a degraded mode) in either case.
fn answer(reasons: Vec<String>, note: Option<String>) -> (StatusCode, String) {
    let (code, mut body) = if reasons.is_empty() {
        (StatusCode::OK, "ready".to_string())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, reasons.join("; "))
    };
    if let Some(note) = note {
        body.push('\n');
        body.push_str(&note);
    }
    body.push('\n');
    (code, body)
}

/// Why this replica is not ready, or `None` when it is. Names every missing
/// precondition, not only the first: an operator looking at a stuck rollout needs to
/// see that the registry is unreachable even while the caches are still filling.
fn not_ready_because(s: &SinkStatus) -> Option<String> {
    let warm_standby = !s.leader && s.caches_ready && s.source_synced;
    if s.initial_sync_done || warm_standby {
        return None;
    }
    let mut waiting = Vec::new();
    if !s.caches_ready {
        waiting.push("waiting for the Kubernetes caches");
    }
    if !s.source_synced {
        waiting.push("waiting for the registry's first complete snapshot");
    }
    if waiting.is_empty() {
        waiting.push("initial sync in progress");
    }
    Some(waiting.join("; "))
}

/// Why the Kubernetes → registry direction is not ready, or `None`.
fn export_not_ready_because(s: &ExportStatus) -> Option<String> {
    if s.initial_sync_done || (!s.leader && s.caches_ready) {
        return None;
    }
    let mut waiting = Vec::new();
    if !s.caches_ready {
        waiting.push("to-registry: waiting for the Service, EndpointSlice and Node watches");
    }
    if s.leader && !s.registry_read {
        waiting.push("to-registry: waiting to read this connector's registrations");
    }
    if waiting.is_empty() {
        waiting.push("to-registry: initial sync in progress");
    }
    Some(waiting.join("; "))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn status(caches_ready: bool, source_synced: bool, leader: bool, done: bool) -> SinkStatus {
        SinkStatus {
            caches_ready,
            source_synced,
            leader,
            initial_sync_done: done,
            ..SinkStatus::default()
        }
    }

    #[test]
    fn names_every_missing_precondition() {
        let why = not_ready_because(&status(false, false, true, false)).unwrap();
        assert!(why.contains("Kubernetes caches"), "{why}");
        assert!(why.contains("registry"), "{why}");
        let why = not_ready_because(&status(true, false, true, false)).unwrap();
        assert!(!why.contains("caches") && why.contains("registry"), "{why}");
        let why = not_ready_because(&status(true, true, true, false)).unwrap();
        assert_eq!(why, "initial sync in progress");
    }

    #[test]
    fn a_degraded_source_is_ready_and_says_so() {
        let (code, body) = readyz_answer(&status(true, true, true, true), None);
        assert_eq!((code, body.as_str()), (StatusCode::OK, "ready\n"));
        let note = Some("degraded: Consul watch in shared mode".to_string());
        let (code, body) = readyz_answer(&status(true, true, true, true), note.clone());
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body, "ready\ndegraded: Consul watch in shared mode\n");
        let (code, body) = readyz_answer(&status(true, false, true, false), note);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.ends_with("shared mode\n") && body.contains("registry"),
            "{body}"
        );
    }

    #[test]
    fn the_export_direction_says_what_it_waits_for() {
        let mut s = ExportStatus {
            leader: true,
            ..Default::default()
        };
        let why = export_not_ready_because(&s).unwrap();
        assert!(
            why.contains("watches") && why.contains("registrations"),
            "{why}"
        );
        s.caches_ready = true;
        s.registry_read = true;
        assert_eq!(
            export_not_ready_because(&s).unwrap(),
            "to-registry: initial sync in progress"
        );
        s.initial_sync_done = true;
        assert_eq!(export_not_ready_because(&s), None);
        let standby = ExportStatus {
            caches_ready: true,
            ..Default::default()
        };
        assert_eq!(export_not_ready_because(&standby), None);
        let (code, body) = answer(vec!["a".into(), "b".into()], None);
        assert_eq!(
            (code, body.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "a; b\n")
        );
    }

    #[test]
    fn ready_after_the_first_sync_or_as_a_warm_standby() {
        assert_eq!(not_ready_because(&status(true, true, true, true)), None);
        assert_eq!(not_ready_because(&status(true, true, false, false)), None);
        assert!(not_ready_because(&status(true, false, false, false)).is_some());
    }
}
