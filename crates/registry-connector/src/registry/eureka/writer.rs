//! The Kubernetes → Eureka writer: [`EurekaWriter`] implements the export engine's
//! [`RegistryWriter`] with Eureka's REST API, as a Eureka client registers itself.
//!
//! Why it looks the way it does:
//! - Eureka forgets an instance whose lease is not renewed (90 s by default), so the
//!   writer renews every instance it owns once per renewal interval while this process
//!   leads ([`RegistryWriter::maintain`]), spread over the interval with bounded
//!   concurrency rather than in a burst. A renewal answered 404 means the server forgot
//!   the instance (a restart, an eviction): it is registered again at once, and
//!   [`RegistryWriter::changed`] makes the engine read the registry again.
//! - Health is a status override (`PUT .../status?value=OUT_OF_SERVICE`), because a
//!   registration does not change the status of an instance the server already holds:
//!   the server keeps an existing `UP` or `OUT_OF_SERVICE` (and any override) across
//!   re-registrations. Checked against the real server: `PUT status?value=UP` followed
//!   by `DELETE status?value=UP` brings an instance up whether or not it carries an
//!   override (the `DELETE` alone does nothing without one), and removes the override
//!   again, leaving the instance as a plain client's would be. A critical instance is
//!   registered `OUT_OF_SERVICE` with that override in the body, so a new one is never
//!   `UP` for a moment.
//! - Ownership is in the instance's metadata (see [`super::register`]): instances of
//!   anybody else are never returned, changed or removed, even in a shared application.
//! - The writer remembers what it owns (from [`RegistryWriter::read`] and every
//!   successful write): what the renewals go through, and what tells a registration
//!   whether the server may hold the instance with another status.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::api;
use super::config::EurekaConfig;
use super::error::EurekaError;
use super::http::{Answer, EurekaHttp};
use super::metrics::{EurekaMetrics, HeartbeatResult, WriterMetrics};
use super::register::{self, Lease};
use crate::export::model::{Applied, Health, Instance, Registered, Write};
use crate::export::RegistryWriter;
use crate::registry::error_chain;

/// Renewals in flight at once.
const HEARTBEAT_CONCURRENCY: usize = 16;
/// How long [`RegistryWriter::changed`] waits for more re-registrations before it
/// reports them: a restarted server makes every instance fail its renewal over one
/// interval, and that should cost the engine one read, not one per instance.
const CHANGE_SETTLE: Duration = Duration::from_secs(2);
/// How often an idle `maintain` looks for instances to renew again.
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// What the writer is told beyond the server's address.
#[derive(Clone, Debug)]
pub struct EurekaWriterConfig {
    /// This connector's `--connector-id`: written into every instance's metadata, and
    /// the only instances it reads back, changes or removes are those that carry it.
    pub connector_id: String,
    /// How often every owned instance's lease is renewed (Eureka clients: 30 s).
    pub renewal_interval: Duration,
    /// After how long without a renewal the server may evict an instance (Eureka's
    /// default: 90 s). Registered as `leaseInfo.durationInSecs`.
    pub lease_duration: Duration,
}

impl EurekaWriterConfig {
    /// Eureka's client defaults: renew every 30 s, a 90 s lease.
    pub fn new(connector_id: impl Into<String>) -> Self {
        Self {
            connector_id: connector_id.into(),
            renewal_interval: Duration::from_secs(30),
            lease_duration: Duration::from_secs(90),
        }
    }
}

/// An owned instance as the writer knows it.
#[derive(Clone, Debug)]
struct Tracked {
    instance: Instance,
    /// The `lastDirtyTimestamp` the server holds (renewals send it back; a new
    /// registration must be newer).
    last_dirty: Option<i64>,
}

/// (application, instance id): how Eureka addresses an instance.
type Key = (String, String);

/// Registers Kubernetes instances in Eureka and keeps their leases.
pub struct EurekaWriter {
    http: EurekaHttp,
    connector_id: String,
    renewal_interval: Duration,
    lease: Lease,
    metrics: Arc<EurekaMetrics>,
    /// Whether [`RegistryWriter::register_metrics`] registers the request counters too
    /// (not when they are shared with a source, which registers them).
    registers_requests: bool,
    writer_metrics: Arc<WriterMetrics>,
    owned: Mutex<BTreeMap<Key, Tracked>>,
    /// Held by every write: a renewal's re-registration must not overtake a
    /// deregistration (and bring the instance back) or a newer registration.
    writes: tokio::sync::Mutex<()>,
    changed: Notify,
}

impl std::fmt::Debug for EurekaWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EurekaWriter")
            .field("http", &self.http)
            .field("connector_id", &self.connector_id)
            .field("renewal_interval", &self.renewal_interval)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl EurekaWriter {
    /// Checks the configuration and builds the client (reading password and TLS files),
    /// with request counters of its own. Does not contact Eureka.
    pub fn new(cfg: &EurekaConfig, writer_cfg: EurekaWriterConfig) -> Result<Self, EurekaError> {
        Self::build(cfg, writer_cfg, Arc::default(), true)
    }

    /// As [`EurekaWriter::new`], counting requests into `metrics`, which the source of
    /// the other direction shares and registers (`both` mode).
    pub fn with_source_metrics(
        cfg: &EurekaConfig,
        writer_cfg: EurekaWriterConfig,
        metrics: Arc<EurekaMetrics>,
    ) -> Result<Self, EurekaError> {
        Self::build(cfg, writer_cfg, metrics, false)
    }

    fn build(
        cfg: &EurekaConfig,
        writer_cfg: EurekaWriterConfig,
        metrics: Arc<EurekaMetrics>,
        registers_requests: bool,
    ) -> Result<Self, EurekaError> {
        let connector_id = writer_cfg.connector_id.trim().to_string();
        if connector_id.is_empty() {
            return Err(EurekaError::Config(
                "the connector id must not be empty: it is what marks the instances this \
                 connector owns"
                    .into(),
            ));
        }
        let (renewal, lease) = (writer_cfg.renewal_interval, writer_cfg.lease_duration);
        if renewal < Duration::from_millis(100) || renewal > Duration::from_secs(3600) {
            return Err(EurekaError::Config(format!(
                "the renewal interval must be between 100ms and 1h, got {}",
                humantime::format_duration(renewal)
            )));
        }
        if lease <= renewal {
            return Err(EurekaError::Config(format!(
                "the lease duration ({}) must be longer than the renewal interval ({}), or \
                 the server evicts instances between renewals",
                humantime::format_duration(lease),
                humantime::format_duration(renewal)
            )));
        }
        if cfg.request_timeout.is_zero() {
            return Err(EurekaError::Config(
                "the request timeout must not be zero".into(),
            ));
        }
        let http = EurekaHttp::new(cfg, Arc::clone(&metrics))?;
        Ok(Self {
            http,
            connector_id,
            renewal_interval: renewal,
            lease: Lease {
                renewal_secs: whole_seconds(renewal),
                duration_secs: whole_seconds(lease),
            },
            metrics,
            registers_requests,
            writer_metrics: Arc::default(),
            owned: Mutex::default(),
            writes: tokio::sync::Mutex::new(()),
            changed: Notify::new(),
        })
    }

    /// The request counters (shared with a source when built with
    /// [`EurekaWriter::with_source_metrics`]).
    pub fn metrics(&self) -> Arc<EurekaMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Heartbeat and re-registration counters.
    pub fn writer_metrics(&self) -> Arc<WriterMetrics> {
        Arc::clone(&self.writer_metrics)
    }

    /// How many instances the writer currently renews.
    pub fn owned_count(&self) -> usize {
        self.owned().len()
    }

    fn owned(&self) -> MutexGuard<'_, BTreeMap<Key, Tracked>> {
        self.owned.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn apply_one(&self, write: &Write) -> Result<(), EurekaError> {
        let instance = write.instance();
        let app = register::app_name(&instance.service);
        let key = (app.clone(), instance.id.clone());
        match write {
            Write::Register(instance) => {
                let before = self.owned().get(&key).cloned();
                self.register(&app, instance, before.as_ref().and_then(|t| t.last_dirty))
                    .await?;
                // The server keeps the status of an instance it already holds (and any
                // override): change it when it was another.
                match (instance.health, before.map(|t| t.instance.health)) {
                    (Health::Critical, Some(Health::Passing)) => {
                        self.set_out_of_service(&app, &instance.id).await?
                    }
                    (Health::Passing, Some(Health::Critical)) => {
                        self.set_up(&app, &instance.id).await?
                    }
                    _ => {}
                }
            }
            Write::SetHealth(instance) => {
                match instance.health {
                    Health::Critical => self.set_out_of_service(&app, &instance.id).await?,
                    Health::Passing => self.set_up(&app, &instance.id).await?,
                }
                let mut owned = self.owned();
                match owned.get_mut(&key) {
                    Some(tracked) => tracked.instance.health = instance.health,
                    None => {
                        owned.insert(
                            key,
                            Tracked {
                                instance: normalized(instance),
                                last_dirty: None,
                            },
                        );
                    }
                }
            }
            Write::Deregister(instance) => {
                // 404: already gone (evicted, cancelled by an operator).
                self.http.cancel(&app, &instance.id).await?;
                self.owned().remove(&key);
            }
        }
        Ok(())
    }

    /// `POST /apps/{APP}` of `instance`, newer than `last_dirty`, and remembers it.
    async fn register(
        &self,
        app: &str,
        instance: &Instance,
        last_dirty: Option<i64>,
    ) -> Result<(), EurekaError> {
        let dirty = next_dirty(last_dirty);
        let body = register::registration(instance, &self.connector_id, self.lease, dirty);
        self.http.register(app, &body).await?;
        self.owned().insert(
            (app.to_string(), instance.id.clone()),
            Tracked {
                instance: normalized(instance),
                last_dirty: Some(dirty),
            },
        );
        Ok(())
    }

    async fn set_out_of_service(&self, app: &str, id: &str) -> Result<(), EurekaError> {
        let status = register::status(Health::Critical).as_str();
        match self.http.set_status(app, id, status).await? {
            Answer::Done => Ok(()),
            Answer::NotFound => Err(not_registered(app, id, "PUT status")),
        }
    }

    /// Up whether or not the instance carries an override, and without one afterwards.
    async fn set_up(&self, app: &str, id: &str) -> Result<(), EurekaError> {
        let status = register::status(Health::Passing).as_str();
        if self.http.set_status(app, id, status).await? == Answer::NotFound {
            return Err(not_registered(app, id, "PUT status"));
        }
        match self.http.delete_status_override(app, id, status).await? {
            Answer::Done => Ok(()),
            Answer::NotFound => Err(not_registered(app, id, "DELETE status")),
        }
    }

    /// One renewal; a 404 registers the instance again.
    async fn heartbeat(&self, key: Key, health: Health, last_dirty: Option<i64>) -> Beat {
        let (app, id) = (&key.0, &key.1);
        let status = register::status(health).as_str();
        match self.http.renew(app, id, status, last_dirty).await {
            Ok(Answer::Done) => {
                self.writer_metrics.heartbeat(HeartbeatResult::Ok);
                Beat::Ok
            }
            Ok(Answer::NotFound) => {
                self.writer_metrics.heartbeat(HeartbeatResult::NotFound);
                let again = self.reregister(&key, last_dirty).await;
                self.changed.notify_one();
                Beat::Gone(again)
            }
            Err(e) => {
                self.writer_metrics.heartbeat(HeartbeatResult::Error);
                debug!(app = %app, instance = %id, error = %error_chain(&e), "lease renewal failed");
                Beat::Failed(e)
            }
        }
    }

    /// Registers again an instance the server forgot, unless it was deregistered or
    /// registered anew since the renewal was sent.
    async fn reregister(&self, key: &Key, sent_dirty: Option<i64>) -> Result<bool, EurekaError> {
        let _writing = self.writes.lock().await;
        let Some(tracked) = self.owned().get(key).cloned() else {
            return Ok(false);
        };
        if tracked.last_dirty != sent_dirty {
            return Ok(false);
        }
        self.register(&key.0, &tracked.instance, tracked.last_dirty)
            .await?;
        self.writer_metrics.reregistrations.inc();
        debug!(app = %key.0, instance = %key.1, "registered again after a renewal found it gone");
        Ok(true)
    }

    /// One renewal round: every instance owned at its start, spread over the interval.
    async fn round(&self, start: Instant) {
        let snapshot: Vec<(Key, Health, Option<i64>)> = self
            .owned()
            .iter()
            .map(|(k, t)| (k.clone(), t.instance.health, t.last_dirty))
            .collect();
        let count = snapshot.len();
        let interval = self.renewal_interval;
        let beats: Vec<Beat> = futures::stream::iter(snapshot.into_iter().enumerate())
            .then(|(i, item)| async move {
                let offset = interval.mul_f64(i as f64 / count as f64);
                tokio::time::sleep_until(start + offset).await;
                item
            })
            .map(|(key, health, dirty)| self.heartbeat(key, health, dirty))
            .buffer_unordered(HEARTBEAT_CONCURRENCY)
            .collect()
            .await;
        let mut failed = 0usize;
        let mut first_error = None;
        let mut registered = 0usize;
        for beat in beats {
            match beat {
                Beat::Ok => {}
                Beat::Gone(Ok(true)) => registered += 1,
                Beat::Gone(Ok(false)) => {}
                Beat::Gone(Err(e)) | Beat::Failed(e) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        if registered > 0 {
            info!(
                registry = "eureka",
                instances = registered,
                "instances the server had forgotten (a restart, an eviction) registered again"
            );
        }
        if let Some(e) = first_error {
            warn!(
                registry = "eureka",
                failed,
                of = count,
                error = %error_chain(&e),
                "lease renewals failed; retried next round"
            );
        }
    }
}

/// What one renewal came to.
enum Beat {
    Ok,
    /// 404; whether it was registered again.
    Gone(Result<bool, EurekaError>),
    Failed(EurekaError),
}

impl RegistryWriter for EurekaWriter {
    const NAME: &'static str = "eureka";
    type Error = EurekaError;

    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        if self.registers_requests {
            self.metrics.common.register(registry);
        }
        self.writer_metrics.register(registry);
    }

    fn max_ops_per_request(&self) -> usize {
        1
    }

    fn cost(&self, _write: &Write) -> usize {
        1
    }

    fn normalize(&self, instance: &mut Instance) {
        instance.service = register::app_name(&instance.service);
    }

    async fn read(&self) -> Result<Registered, EurekaError> {
        let apps = self
            .http
            .apps_with(|body| api::decode_applications(body).map(|a| a.applications))
            .await?;
        let (owned, shared_names) = register::owned(&apps, &self.connector_id);
        let tracked: BTreeMap<Key, Tracked> = owned
            .iter()
            .map(|o| {
                (
                    (o.app.clone(), o.instance.id.clone()),
                    Tracked {
                        instance: o.instance.clone(),
                        last_dirty: o.last_dirty,
                    },
                )
            })
            .collect();
        *self.owned() = tracked;
        Ok(Registered {
            instances: owned.into_iter().map(|o| o.instance).collect(),
            shared_names,
        })
    }

    /// One request per write: a failure fails the batch (which holds one write).
    async fn apply(&self, writes: &[Write]) -> Result<Applied, EurekaError> {
        let _writing = self.writes.lock().await;
        for write in writes {
            self.apply_one(write).await?;
        }
        Ok(Applied::default())
    }

    async fn changed(&self) {
        self.changed.notified().await;
        // Let a burst of re-registrations finish first (bounded by one interval).
        let deadline = Instant::now() + self.renewal_interval.max(CHANGE_SETTLE);
        loop {
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(CHANGE_SETTLE) => return,
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    async fn maintain(&self, stop: CancellationToken) {
        debug!(interval = ?self.renewal_interval, "renewing the leases of the exported instances");
        loop {
            let start = Instant::now();
            if self.owned().is_empty() {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(IDLE_RECHECK.min(self.renewal_interval)) => continue,
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.round(start) => {}
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep_until(start + self.renewal_interval) => {}
            }
        }
        // Another replica leads now (or the process stops): what it changes meanwhile
        // is not known here, and the next term starts from a read. Forgetting also keeps
        // a stale entry from being registered again by the next term's first renewals.
        self.owned().clear();
    }
}

fn normalized(instance: &Instance) -> Instance {
    Instance {
        service: register::app_name(&instance.service),
        ..instance.clone()
    }
}

fn not_registered(app: &str, id: &str, what: &'static str) -> EurekaError {
    EurekaError::NotRegistered {
        app: app.to_string(),
        id: id.to_string(),
        what,
    }
}

/// Seconds for `leaseInfo`, at least 1, rounded up.
fn whole_seconds(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

/// A `lastDirtyTimestamp` for a registration: now, and newer than the server's copy
/// (the server keeps its copy when a registration is not newer).
fn next_dirty(last: Option<i64>) -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    match last {
        Some(last) if last >= now => last.saturating_add(1),
        _ => now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> EurekaConfig {
        EurekaConfig::new("http://127.0.0.1:1/eureka")
    }

    #[test]
    fn the_configuration_is_checked() {
        assert!(EurekaWriter::new(&cfg(), EurekaWriterConfig::new("rc")).is_ok());
        for bad in [
            EurekaWriterConfig::new(" "),
            EurekaWriterConfig {
                renewal_interval: Duration::from_millis(10),
                ..EurekaWriterConfig::new("rc")
            },
            EurekaWriterConfig {
                lease_duration: Duration::from_secs(30),
                ..EurekaWriterConfig::new("rc")
            },
        ] {
            assert!(
                matches!(
                    EurekaWriter::new(&cfg(), bad.clone()),
                    Err(EurekaError::Config(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn leases_are_whole_seconds_and_dirty_timestamps_move_forward() {
        assert_eq!(whole_seconds(Duration::from_millis(300)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(90)), 90);
        let now = next_dirty(None);
        assert!(now > 1_600_000_000_000);
        assert_eq!(next_dirty(Some(now + 10_000)), now + 10_001);
        assert!(next_dirty(Some(1)) >= now);
    }

    #[test]
    fn normalize_upper_cases_the_application_only() {
        let writer = EurekaWriter::new(&cfg(), EurekaWriterConfig::new("rc")).expect("builds");
        let mut instance = Instance {
            id: "web-0123".into(),
            service: "web".into(),
            source: crate::export::ServiceKey::new("shop", "web"),
            address: "192.0.2.1".into(),
            port: 80,
            ports: BTreeMap::new(),
            health: Health::Passing,
            tags: vec![],
            meta: BTreeMap::new(),
        };
        writer.normalize(&mut instance);
        assert_eq!(instance.service, "WEB");
        assert_eq!(instance.id, "web-0123");
        assert_eq!(writer.max_ops_per_request(), 1);
        assert_eq!(writer.cost(&Write::Register(instance)), 1);
    }
}
