//! The Eureka source: polls a Eureka server's REST API as Eureka clients do and feeds the
//! [`Catalog`].
//!
//! - [`config`]: what the operator sets ([`EurekaConfig`]);
//! - [`http`]: the client (service URLs with failover, basic auth, TLS, JSON);
//! - [`api`]: the shapes of `/apps` and `/apps/delta`, decoded leniently;
//! - [`mirror`]: the local copy of the registry, deltas and the reconcile hash code;
//! - [`select`]: which applications and instances are published, pure functions;
//! - [`metrics`]: request, rejection and full-fetch counters, and the writer's renewals;
//! - `poll` (private): the loop.
//!
//! Like every source it knows nothing about Kubernetes objects or names.
//!
//! The other direction (Kubernetes → Eureka) shares the client and the metrics:
//! - [`register`]: the registration body of an exported instance and its decoding back,
//!   ownership, pure functions;
//! - [`writer`]: [`EurekaWriter`], the export engine's writer (registrations, status
//!   overrides, lease renewals).

pub mod api;
pub mod config;
pub mod delta;
pub mod error;
pub mod http;
pub mod metrics;
pub mod mirror;
mod poll;
pub mod register;
pub mod schedule;
pub mod select;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::catalog::Catalog;

pub use config::EurekaConfig;
pub use error::EurekaError;
pub use metrics::EurekaMetrics;
pub use select::Selection;
pub use writer::{EurekaWriter, EurekaWriterConfig};

/// A configured Eureka source, ready to [`run`](EurekaSource::run).
#[derive(Debug)]
pub struct EurekaSource {
    http: http::EurekaHttp,
    selection: Selection,
    metrics: Arc<EurekaMetrics>,
    interval: Duration,
    full_fetch_interval: Duration,
    pacing: crate::registry::PacerConfig,
}

impl EurekaSource {
    /// Checks the configuration and builds the client (reading password and TLS files).
    /// Does not contact Eureka: a source started while Eureka is down waits for it.
    pub fn new(cfg: EurekaConfig) -> Result<Self, EurekaError> {
        Self::with_metrics(cfg, Arc::default())
    }

    /// As [`EurekaSource::new`], counting into `metrics`.
    pub fn with_metrics(
        cfg: EurekaConfig,
        metrics: Arc<EurekaMetrics>,
    ) -> Result<Self, EurekaError> {
        if cfg.poll_interval < Duration::from_millis(100)
            || cfg.poll_interval > Duration::from_secs(3600)
        {
            return Err(EurekaError::Config(format!(
                "the poll interval must be between 100ms and 1h, got {}",
                humantime::format_duration(cfg.poll_interval)
            )));
        }
        if cfg.full_fetch_interval > Duration::from_secs(7 * 24 * 3600) {
            return Err(EurekaError::Config(
                "the full-fetch interval must be at most a week (0 turns it off)".into(),
            ));
        }
        if cfg.request_timeout.is_zero() {
            return Err(EurekaError::Config(
                "the request timeout must not be zero".into(),
            ));
        }
        let http = http::EurekaHttp::new(&cfg, Arc::clone(&metrics))?;
        Ok(Self {
            http,
            selection: Selection {
                filter_metadata: cfg.filter_metadata,
                passing_only: cfg.passing_only,
                service_prefix: cfg.service_prefix,
                metadata: cfg.metadata,
            },
            metrics,
            interval: cfg.poll_interval,
            full_fetch_interval: cfg.full_fetch_interval,
            pacing: cfg.pacing,
        })
    }

    /// The source's counters.
    pub fn metrics(&self) -> Arc<EurekaMetrics> {
        Arc::clone(&self.metrics)
    }
}

impl crate::registry::RegistrySource for EurekaSource {
    const NAME: &'static str = "eureka";
    type Error = EurekaError;

    /// Registers the source's metrics in `registry`.
    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.metrics.register(registry);
    }

    /// Polls Eureka and keeps `catalog` up to date until `shutdown` is cancelled.
    ///
    /// The first full fetch goes to [`Catalog::replace_all`] (deletions downstream start
    /// only then); deltas go to `upsert` / `remove`. Failures are retried with backoff
    /// and logged, never returned; shutdown removes nothing from the catalog.
    async fn run(
        self,
        catalog: Arc<Catalog>,
        shutdown: CancellationToken,
    ) -> Result<(), EurekaError> {
        info!(
            url = %self.http.current_url(),
            interval = %humantime::format_duration(self.interval),
            passing_only = self.selection.passing_only,
            filter_metadata = ?self.selection.filter_metadata,
            "starting the Eureka source"
        );
        if self.interval > schedule::DELTA_WINDOW {
            warn!(
                interval = %humantime::format_duration(self.interval),
                delta_window = %humantime::format_duration(schedule::DELTA_WINDOW),
                "the poll interval is longer than the window a delta covers: every read \
                 will be a whole-registry read"
            );
        }
        let poller = poll::Poller {
            http: self.http,
            selection: self.selection,
            catalog,
            metrics: self.metrics,
            interval: self.interval,
            full_fetch_interval: self.full_fetch_interval,
            pacing: self.pacing,
            reported: Default::default(),
        };
        poller
            .run(shutdown)
            .instrument(tracing::info_span!("eureka_source", registry = "eureka"))
            .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_intervals_that_would_hammer_eureka() {
        let cfg = EurekaConfig {
            poll_interval: Duration::from_millis(10),
            ..EurekaConfig::default()
        };
        assert!(matches!(
            EurekaSource::new(cfg),
            Err(EurekaError::Config(_))
        ));
        assert!(EurekaSource::new(EurekaConfig::default()).is_ok());
    }
}
