//! The Nacos 2.x source: subscribes to every selected service over Nacos's gRPC API and
//! applies the server's pushes, one whole service each.
//!
//! - [`config`]: what the operator sets ([`NacosConfig`]);
//! - [`proto`]: the two protobuf messages, written by hand;
//! - [`api`]: the JSON of each request, response and server request;
//! - [`conn`]: one connection (server check, bi stream, acknowledgements, requests);
//! - [`http`]: login and the every-group listing over HTTP;
//! - [`select`]: which instances are published, pure functions;
//! - [`claims`]: one name held by two groups; [`listing`]: when a service is gone;
//!   `hold` (private): when an emptied service is removed;
//! - [`metrics`]; `watch` (private): the loop.
//!
//! Why not the `nacos-sdk` crate: it keeps a second full cache of every service, writes a
//! disk cache under `$HOME/nacos` with an fsync per change, polls every subscribed
//! service every 60 s besides the pushes (167 requests/s at 10,000 services), drops empty
//! pushes by default, re-subscribes serially under a lock after a reconnect, and pulls
//! OpenSSL for TLS. The part of the protocol a reader needs is small (see [`conn`]).
//!
//! Like every source it knows nothing about Kubernetes objects or names. Only the
//! Nacos → Kubernetes direction exists; TLS to Nacos is not supported yet (plaintext
//! gRPC and HTTP).

pub mod api;
pub mod claims;
pub mod config;
pub mod conn;
pub mod error;
mod hold;
pub mod http;
pub mod listing;
pub mod metrics;
pub mod proto;
pub mod select;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, Instrument};

use crate::catalog::Catalog;

pub use config::{Groups, NacosConfig};
pub use error::NacosError;
pub use metrics::NacosMetrics;
pub use select::Selection;

/// Below this a service of a few instances would not fit an answer.
const MIN_MESSAGE_SIZE: usize = 64 * 1024;

/// A configured Nacos source, ready to [`run`](crate::registry::RegistrySource::run).
pub struct NacosSource {
    watch: watch::WatchConfig,
    selection: Selection,
    http: http::NacosHttp,
    metrics: Arc<NacosMetrics>,
}

impl NacosSource {
    /// Checks the configuration and reads the password file. Does not contact Nacos: a
    /// source started while Nacos is down waits for it.
    pub fn new(cfg: NacosConfig) -> Result<Self, NacosError> {
        let grpc = cfg.grpc_addrs()?;
        if cfg.service_list_interval < Duration::from_secs(1)
            || cfg.service_list_interval > Duration::from_secs(3600)
        {
            return Err(NacosError::Config(format!(
                "the service list interval must be between 1s and 1h, got {}",
                humantime::format_duration(cfg.service_list_interval)
            )));
        }
        if cfg.request_timeout.is_zero() {
            return Err(NacosError::Config(
                "the request timeout must not be zero".into(),
            ));
        }
        if cfg.max_message_size < MIN_MESSAGE_SIZE {
            return Err(NacosError::Config(format!(
                "the largest Nacos message must be at least {MIN_MESSAGE_SIZE} bytes, got {}",
                cfg.max_message_size
            )));
        }
        if cfg.namespace.trim().is_empty() {
            return Err(NacosError::Config("the namespace must not be empty".into()));
        }
        let password = crate::registry::secret::resolve(
            "Nacos password",
            cfg.password.as_deref(),
            cfg.password_file.as_deref(),
        )?;
        if cfg.username.is_some() != password.is_some() {
            return Err(NacosError::Config(
                "the Nacos username and password go together".into(),
            ));
        }
        let servers = cfg
            .addrs
            .iter()
            .zip(grpc)
            .map(|(http, grpc)| watch::Server {
                http: http.trim().to_string(),
                grpc,
            })
            .collect();
        Ok(Self {
            watch: watch::WatchConfig {
                servers,
                namespace: cfg.namespace.trim().to_string(),
                groups: cfg.groups,
                username: cfg.username,
                password,
                request_timeout: cfg.request_timeout,
                list_interval: cfg.service_list_interval,
                empty_confirm_delay: cfg.empty_confirm_delay,
                reconnect_grace: cfg.reconnect_grace,
                concurrency: cfg.subscribe_concurrency,
                max_message_size: cfg.max_message_size,
                pacing: cfg.pacing,
            },
            selection: Selection {
                filter_metadata: cfg.filter_metadata,
                passing_only: cfg.passing_only,
                service_prefix: cfg.service_prefix,
                metadata: cfg.metadata,
                clusters: cfg.clusters,
                group_as_suffix: cfg.group_as_suffix,
            },
            http: http::NacosHttp::new(cfg.request_timeout)?,
            metrics: Arc::default(),
        })
    }

    /// The source's counters.
    pub fn metrics(&self) -> Arc<NacosMetrics> {
        Arc::clone(&self.metrics)
    }
}

impl crate::registry::RegistrySource for NacosSource {
    const NAME: &'static str = "nacos";
    type Error = NacosError;

    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.metrics.register(registry);
    }

    /// Subscribes and applies pushes until `shutdown`; the first complete read goes to
    /// [`Catalog::replace_all`]. Failures are retried with backoff, never returned;
    /// shutdown removes nothing from the catalog.
    async fn run(
        self,
        catalog: Arc<Catalog>,
        shutdown: CancellationToken,
    ) -> Result<(), NacosError> {
        info!(
            servers = ?self.watch.servers.iter().map(|s| s.grpc.as_str()).collect::<Vec<_>>(),
            namespace = %self.watch.namespace,
            groups = ?self.watch.groups,
            passing_only = self.selection.passing_only,
            list_interval = %humantime::format_duration(self.watch.list_interval),
            "starting the Nacos source"
        );
        let watcher =
            watch::Watcher::new(self.watch, self.selection, catalog, self.metrics, self.http);
        watcher
            .run(shutdown)
            .instrument(tracing::info_span!("nacos_source", registry = "nacos"))
            .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_configurations_fail_at_start() {
        let ok = NacosConfig::default();
        assert!(NacosSource::new(ok.clone()).is_ok());
        for bad in [
            NacosConfig {
                addrs: vec![],
                ..ok.clone()
            },
            NacosConfig {
                addrs: vec!["http://x:8848".into()],
                ..ok.clone()
            },
            NacosConfig {
                service_list_interval: Duration::from_millis(10),
                ..ok.clone()
            },
            NacosConfig {
                username: Some("u".into()),
                ..ok.clone()
            },
            NacosConfig {
                max_message_size: 1024,
                ..ok.clone()
            },
            NacosConfig {
                password_file: Some("/nonexistent/pw".into()),
                username: Some("u".into()),
                ..ok.clone()
            },
        ] {
            assert!(NacosSource::new(bad).is_err());
        }
    }
}
