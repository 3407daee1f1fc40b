//! The Consul source: watches Consul's catalog with blocking queries and feeds the
//! [`Catalog`].
//!
//! How Consul is read, in one folder:
//! - [`config`]: what the operator sets ([`ConsulConfig`]);
//! - [`http`]: the HTTP client (address, token, TLS, datacenter, blocking parameters,
//!   connection budget);
//! - `h2` (private): the per-service long polls straight over HTTP/2;
//! - [`api`]: the shapes of Consul's answers and the blocking-index rule;
//! - [`select`]: the seed's selection and naming rules, pure functions;
//! - [`budget`]: the connection budget and the watch modes it leads to;
//! - [`watch`] (private): the snapshot and the watch loops;
//! - `multiplex` (private): every HTTP/2 long poll in one task;
//! - [`checks`]: the catalog-wide check watch's diff (shared mode);
//! - [`refresh`]: the re-read queue (shared mode);
//! - [`metrics`]: request and instance counters, the mode gauges;
//! - [`writer`] and [`txn`]: the other direction, Kubernetes Services registered in
//!   Consul (the transactions, and what a rolled-back one blames).
//!
//! The source answers the seed's `Aggregate(name, domain)` through the catalog it feeds:
//! the sink reads the catalog, never Consul. It knows nothing about Kubernetes objects or
//! Kubernetes names.

pub mod api;
pub mod budget;
pub mod checks;
pub mod config;
pub mod error;
mod h2;
pub mod http;
pub mod metrics;
mod multiplex;
pub mod refresh;
pub mod select;
pub mod txn;
mod watch;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::catalog::Catalog;
use crate::registry::{error_chain, retry_until_ok, SourceNote};

pub use budget::{MaxConnections, Plan, Transport, WatchMode};
pub use config::ConsulConfig;
pub use error::ConsulError;
pub use metrics::ConsulMetrics;
pub use select::Selection;

/// Consul refuses blocking waits longer than this.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// A configured Consul source, ready to [`run`](ConsulSource::run).
#[derive(Debug)]
pub struct ConsulSource {
    http: http::ConsulHttp,
    selection: Selection,
    metrics: Arc<ConsulMetrics>,
    wait: Duration,
    http2_poll_wait: Duration,
    pacing: crate::registry::PacerConfig,
    max_connections: MaxConnections,
    http2_streams: usize,
    initial_concurrency: usize,
    note: SourceNote,
}

impl ConsulSource {
    /// Checks the configuration and builds the HTTP client (reading the token and TLS
    /// files). Does not contact Consul: a source started while Consul is down waits for
    /// it in [`run`](ConsulSource::run).
    pub fn new(cfg: ConsulConfig) -> Result<Self, ConsulError> {
        Self::with_metrics(cfg, Arc::default())
    }

    /// As [`ConsulSource::new`], counting into `metrics` (shared with the runtime's
    /// Prometheus registry or a benchmark).
    pub fn with_metrics(
        cfg: ConsulConfig,
        metrics: Arc<ConsulMetrics>,
    ) -> Result<Self, ConsulError> {
        for wait in [cfg.wait, cfg.http2_poll_wait] {
            if wait.is_zero() || wait > MAX_WAIT {
                return Err(ConsulError::Config(format!(
                    "the blocking wait must be between 1ms and 10m (Consul's limit), got {}",
                    humantime::format_duration(wait)
                )));
            }
        }
        if let MaxConnections::Fixed(n) = cfg.max_connections {
            if n < budget::MIN_CONNECTIONS {
                return Err(ConsulError::Config(format!(
                    "--consul-max-connections {n} is too small: at least {} (plain reads, the service-list and check watches, a few long polls); 0 means no limit, unset means half of the agent's limits.http_max_conns_per_client",
                    budget::MIN_CONNECTIONS
                )));
            }
        }
        if cfg.http2_streams == 0 {
            return Err(ConsulError::Config(
                "--consul-http2-streams must be at least 1".into(),
            ));
        }
        if cfg.initial_fetch_concurrency == 0 {
            return Err(ConsulError::Config(
                "the initial fetch concurrency must be at least 1".into(),
            ));
        }
        let http = http::ConsulHttp::new(&cfg, Arc::clone(&metrics))?;
        Ok(Self {
            http,
            selection: Selection::from_config(&cfg),
            metrics,
            wait: cfg.wait,
            http2_poll_wait: cfg.http2_poll_wait,
            pacing: cfg.pacing,
            max_connections: cfg.max_connections,
            http2_streams: cfg.http2_streams,
            initial_concurrency: cfg.initial_fetch_concurrency,
            note: SourceNote::default(),
        })
    }

    /// The source's counters (requests by endpoint and result, skipped instances,
    /// watched services).
    pub fn metrics(&self) -> Arc<ConsulMetrics> {
        Arc::clone(&self.metrics)
    }
}

impl crate::registry::RegistrySource for ConsulSource {
    const NAME: &'static str = "consul";
    type Error = ConsulError;

    /// Registers the source's metrics under a `consul` sub-registry of `registry`
    /// (`<prefix>_registry_requests_total`, ...).
    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.metrics.register(registry);
    }

    /// The shared mode's degraded note.
    fn note(&self) -> SourceNote {
        self.note.clone()
    }

    /// Watches Consul and keeps `catalog` up to date until `shutdown` is cancelled.
    ///
    /// The first complete snapshot goes to [`Catalog::replace_all`] once every selected
    /// service has answered (so deletions downstream start only then); after that, each
    /// service's changes go to `upsert` / `remove`. Consul being down, slow or refusing is
    /// retried with backoff and logged, never returned: the only way out is `shutdown`,
    /// which removes nothing from the catalog.
    async fn run(
        self,
        catalog: Arc<Catalog>,
        shutdown: CancellationToken,
    ) -> Result<(), ConsulError> {
        match crate::registry::raise_nofile_limit() {
            Ok(limit) if limit.soft > limit.before => {
                info!(
                    from = limit.before,
                    to = limit.soft,
                    "raised the open-file limit"
                );
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot read or raise the open-file limit"),
        }
        info!(
            consul = %self.http.base(),
            max_connections = ?self.max_connections,
            "starting the Consul source"
        );
        let Some(facts) = probe_agent(&self.http, self.pacing, &shutdown).await else {
            return Ok(());
        };
        let plan = Plan::with_streams(
            facts.transport,
            facts.conns_per_client,
            self.max_connections,
            self.initial_concurrency,
            self.http2_streams,
        );
        // The wait of the transport chosen, not both: over plain HTTP the HTTP/2 one
        // would only mislead.
        let poll_wait = match plan.transport {
            Transport::Http2 => self.http2_poll_wait,
            Transport::Http1 => self.wait,
        };
        info!(
            transport = facts.transport.as_str(),
            agent_conns_per_client = ?facts.conns_per_client,
            connection_budget = plan.connections,
            long_polls = plan.long_polls,
            poll_wait = %humantime::format_duration(poll_wait),
            "Consul connection budget"
        );
        self.metrics
            .connection_budget
            .set(i64::try_from(plan.connections).unwrap_or(-1));
        let http = self.http.with_plan(&plan)?;
        // The probe's client holds an idle connection the budget does not count.
        drop(self.http);
        let shared = Arc::new(watch::Shared {
            http,
            selection: self.selection,
            catalog,
            metrics: self.metrics,
            wait: self.wait,
            poll_wait,
            pacing: self.pacing,
            plan,
            reported: Default::default(),
            refresh: Default::default(),
            services: Default::default(),
            note: self.note,
            poll_failures: Default::default(),
        });
        watch::run(shared, shutdown)
            .instrument(tracing::info_span!("consul_source", registry = "consul"))
            .await
    }
}

/// Asks the agent which protocol it speaks to us and its per-client connection limit,
/// retried until it answers (`None` on shutdown).
async fn probe_agent(
    http: &http::ConsulHttp,
    pacing: crate::registry::PacerConfig,
    shutdown: &CancellationToken,
) -> Option<http::AgentFacts> {
    let facts = retry_until_ok(
        pacing,
        shutdown,
        || http.agent_facts(),
        |e, delay| {
            warn!(
                error = %error_chain(e),
                retry_in = ?delay,
                "waiting for Consul: cannot reach the agent (nothing is published or deleted until it answers)"
            );
        },
    )
    .await?;
    if facts.conns_per_client.is_none() {
        info!(
            assumed = budget::CONSUL_DEFAULT_CONNS_PER_CLIENT,
            "the Consul agent did not tell its limits.http_max_conns_per_client (the token lacks agent:read?); assuming Consul's default, which may be more than the agent allows"
        );
    }
    Some(facts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_waits_consul_would_refuse() {
        let mut cfg = ConsulConfig {
            wait: Duration::ZERO,
            ..ConsulConfig::default()
        };
        assert!(matches!(
            ConsulSource::new(cfg.clone()),
            Err(ConsulError::Config(_))
        ));
        cfg.wait = Duration::from_secs(601);
        assert!(matches!(
            ConsulSource::new(cfg.clone()),
            Err(ConsulError::Config(_))
        ));
        cfg.wait = Duration::from_secs(600);
        assert!(ConsulSource::new(cfg.clone()).is_ok());
        cfg.http2_poll_wait = Duration::from_secs(601);
        assert!(ConsulSource::new(cfg.clone()).is_err());
        cfg.http2_poll_wait = Duration::from_secs(600);
        cfg.initial_fetch_concurrency = 0;
        assert!(ConsulSource::new(cfg.clone()).is_err());
        cfg.initial_fetch_concurrency = 4;
        cfg.max_connections = MaxConnections::Fixed(3);
        let err = ConsulSource::new(cfg.clone()).unwrap_err().to_string();
        assert!(err.contains("--consul-max-connections 3"), "{err}");
        cfg.max_connections = MaxConnections::Unlimited;
        assert!(ConsulSource::new(cfg).is_ok());
    }

    #[test]
    fn debug_of_a_source_does_not_show_the_token() {
        let cfg = ConsulConfig {
            token: Some("very-secret-token".into()),
            ..ConsulConfig::default()
        };
        let source = ConsulSource::new(cfg).expect("builds");
        let text = format!("{source:?}");
        assert!(!text.contains("very-secret-token"), "{text}");
    }
}
