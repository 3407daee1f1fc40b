//! The ZooKeeper source: Dubbo's interface-level registry and Apache Curator's service
//! discovery (Spring Cloud Zookeeper, Dubbo 3's application-level discovery), watched
//! through one persistent recursive watch on the base path, never polled.
//!
//! - [`config`]: what the operator sets ([`ZookeeperConfig`]);
//! - [`api`]: the two layouts' node names and data, decoded (pure);
//! - [`select`]: which nodes are published, under which names (pure);
//! - [`mirror`]: the nodes read, by directory and by service (pure);
//! - [`events`]: what one watch event does to the mirror (pure);
//! - [`metrics`], [`error`]; `watch` (private): the session and event loop.
//!
//! Cost model: a change costs the reads of that change only: zero for a Dubbo provider
//! created or deleted (its URL is its node's name), one `getData` for a Curator instance
//! created or changed; a whole-tree read happens at start, after a session expiry and
//! after a reconnection (ZooKeeper does not replay what a persistent watch missed).
//!
//! The client is the `zookeeper-client` crate (async, tokio, persistent watches, digest
//! auth); ZooKeeper 3.6 or later is needed for persistent recursive watches. Like every
//! source it knows nothing about Kubernetes objects or names. TLS (the ensemble's secure
//! client port) is on when a CA file is given.
//!
//! The Kubernetes → ZooKeeper direction: [`writer`] (the export engine's
//! `RegistryWriter`, ephemeral nodes of its own detached session) and [`register`] (the
//! node forms of both layouts, pure); `session` opens the sessions of both.

pub mod api;
pub mod config;
pub mod error;
pub mod events;
pub mod metrics;
pub mod mirror;
pub mod register;
pub mod select;
mod session;
mod watch;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, Instrument};
use zookeeper_client::TlsOptions;

use crate::catalog::Catalog;
use crate::registry::secret;

pub use config::{DubboServiceBy, Layout, ZookeeperConfig};
pub use error::ZookeeperError;
pub use metrics::ZookeeperMetrics;
pub use select::Selection;

/// A configured ZooKeeper source, ready to [`run`](crate::registry::RegistrySource::run).
pub struct ZookeeperSource {
    watch: watch::WatchConfig,
    selection: Selection,
    metrics: Arc<ZookeeperMetrics>,
}

impl ZookeeperSource {
    /// Checks the configuration and reads the password file. Does not contact
    /// ZooKeeper: a source started while ZooKeeper is down waits for it.
    pub fn new(cfg: ZookeeperConfig) -> Result<Self, ZookeeperError> {
        let session = session_config(&cfg)?;
        let base = cfg.checked_base_path()?;
        Ok(Self {
            watch: watch::WatchConfig {
                session,
                base,
                layout: cfg.layout,
                read_concurrency: cfg.read_concurrency,
                pacing: cfg.pacing,
            },
            selection: Selection {
                layout: cfg.layout,
                dubbo_service_by: cfg.dubbo_service_by,
                filter_metadata: cfg.filter_metadata,
                passing_only: cfg.passing_only,
                service_prefix: cfg.service_prefix,
                metadata: cfg.metadata,
            },
            metrics: Arc::default(),
        })
    }

    /// The source's counters.
    pub fn metrics(&self) -> Arc<ZookeeperMetrics> {
        Arc::clone(&self.metrics)
    }
}

/// The session settings of `cfg`, checked; reads the password file. Shared by the
/// source and the writer.
pub(crate) fn session_config(
    cfg: &ZookeeperConfig,
) -> Result<session::SessionConfig, ZookeeperError> {
    let connect = config::connect_string(&cfg.connect)?;
    let tls = tls_options(cfg)?;
    if cfg.session_timeout < Duration::from_secs(1)
        || cfg.session_timeout > Duration::from_secs(3600)
    {
        return Err(ZookeeperError::Config(format!(
            "the session timeout must be between 1s and 1h, got {}",
            humantime::format_duration(cfg.session_timeout)
        )));
    }
    let password = secret::resolve(
        "ZooKeeper digest password",
        cfg.digest_password.as_deref(),
        cfg.digest_password_file.as_deref(),
    )?;
    let user = cfg.digest_user.clone().filter(|u| !u.trim().is_empty());
    let digest = match (user, password) {
        (Some(user), Some(password)) => {
            if user.contains(':') {
                return Err(ZookeeperError::Config(
                    "the ZooKeeper digest user must not contain ':'".into(),
                ));
            }
            Some((user, password))
        }
        (None, None) => None,
        _ => {
            return Err(ZookeeperError::Config(
                "the ZooKeeper digest user and password go together".into(),
            ))
        }
    };
    Ok(session::SessionConfig {
        connect,
        tls,
        session_timeout: cfg.session_timeout,
        digest,
    })
}

/// The TLS options of `cfg`: none without a CA file; the client certificate and key go
/// together.
fn tls_options(cfg: &ZookeeperConfig) -> Result<Option<TlsOptions>, ZookeeperError> {
    use crate::registry::tls::read_file;
    let pem = |what: &'static str, path: &std::path::Path| -> Result<String, ZookeeperError> {
        String::from_utf8(read_file(what, path)?).map_err(|_| {
            ZookeeperError::Config(format!(
                "the {what} file {} is not PEM text",
                path.display()
            ))
        })
    };
    let identity = match (&cfg.client_cert_file, &cfg.client_key_file) {
        (Some(cert), Some(key)) => {
            Some((pem("client certificate", cert)?, pem("client key", key)?))
        }
        (None, None) => None,
        _ => {
            return Err(ZookeeperError::Config(
                "the ZooKeeper client certificate and key go together".into(),
            ))
        }
    };
    let Some(ca_file) = &cfg.ca_file else {
        if identity.is_some() {
            return Err(ZookeeperError::Config(
                "a ZooKeeper client certificate needs --zookeeper-ca-file (TLS is on with a CA: the client has no system roots)".into(),
            ));
        }
        return Ok(None);
    };
    let mut options = TlsOptions::new()
        .with_pem_ca(&pem("CA", ca_file)?)
        .map_err(|source| ZookeeperError::Tls {
            what: "CA file",
            source,
        })?;
    if let Some((cert, key)) = identity {
        options = options
            .with_pem_identity(&cert, &key)
            .map_err(|source| ZookeeperError::Tls {
                what: "client certificate or key",
                source,
            })?;
    }
    Ok(Some(options))
}

impl crate::registry::RegistrySource for ZookeeperSource {
    const NAME: &'static str = "zookeeper";
    type Error = ZookeeperError;

    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.metrics.register(registry);
    }

    /// Watches and applies events until `shutdown`; the first complete read goes to
    /// [`Catalog::replace_all`]. Failures are retried with backoff, never returned;
    /// shutdown removes nothing from the catalog (and closes the session).
    async fn run(
        self,
        catalog: Arc<Catalog>,
        shutdown: CancellationToken,
    ) -> Result<(), ZookeeperError> {
        info!(
            connect = %self.watch.session.connect,
            base_path = %self.watch.base,
            layout = self.watch.layout.as_str(),
            service_by = ?self.selection.dubbo_service_by,
            digest_user = self.watch.session.digest.as_ref().map(|(u, _)| u.as_str()),
            tls = self.watch.session.tls.is_some(),
            passing_only = self.selection.passing_only,
            "starting the ZooKeeper source"
        );
        let watcher = watch::Watcher::new(self.watch, self.selection, catalog, self.metrics);
        watcher
            .run(shutdown)
            .instrument(tracing::info_span!(
                "zookeeper_source",
                registry = "zookeeper"
            ))
            .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_configurations_fail_at_start() {
        let ok = ZookeeperConfig::default();
        assert!(ZookeeperSource::new(ok.clone()).is_ok());
        for bad in [
            ZookeeperConfig {
                connect: " ".into(),
                ..ok.clone()
            },
            ZookeeperConfig {
                base_path: "dubbo".into(),
                ..ok.clone()
            },
            ZookeeperConfig {
                session_timeout: Duration::from_millis(10),
                ..ok.clone()
            },
            ZookeeperConfig {
                digest_user: Some("u".into()),
                ..ok.clone()
            },
            ZookeeperConfig {
                digest_password: Some("p".into()),
                ..ok.clone()
            },
            ZookeeperConfig {
                digest_user: Some("u:x".into()),
                digest_password: Some("p".into()),
                ..ok.clone()
            },
            ZookeeperConfig {
                digest_user: Some("u".into()),
                digest_password_file: Some("/nonexistent/pw".into()),
                ..ok.clone()
            },
        ] {
            assert!(ZookeeperSource::new(bad).is_err());
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let garbage = dir.path().join("ca.pem");
        std::fs::write(&garbage, "not a certificate").expect("write");
        for bad in [
            ZookeeperConfig {
                client_cert_file: Some(garbage.clone()),
                ..ok.clone()
            },
            ZookeeperConfig {
                ca_file: Some(garbage.clone()),
                client_cert_file: Some(garbage.clone()),
                client_key_file: Some(garbage.clone()),
                ..ok.clone()
            },
            ZookeeperConfig {
                ca_file: Some(dir.path().join("missing.pem")),
                ..ok.clone()
            },
        ] {
            assert!(ZookeeperSource::new(bad).is_err());
        }
        let with_auth = ZookeeperConfig {
            digest_user: Some("u".into()),
            digest_password: Some("p".into()),
            ..ok
        };
        assert!(ZookeeperSource::new(with_auth).is_ok());
    }
}
