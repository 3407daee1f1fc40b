//! Counters of the Eureka source, under the same names as every source's
//! (`registry_requests_total{source="eureka",endpoint,result}`,
//! `registry_rejected_entries_total{source="eureka",reason}`) plus what only Eureka has:
//! full fetches by reason, and the size of the mirrored registry; and for the writer
//! (Kubernetes → Eureka) its lease renewals, counted apart from the export engine's
//! writes because they are the one write Eureka needs at rest. Labels are bounded; never
//! an application name.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::registry::metrics::SourceMetrics;

const SOURCE: &str = "eureka";

/// Which Eureka endpoint a request went to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /apps`: the whole registry.
    Apps,
    /// `GET /apps/delta`: recent changes.
    Delta,
    /// `POST /apps/{APP}`: a registration (Kubernetes → Eureka).
    Register,
    /// `PUT /apps/{APP}/{ID}`: a lease renewal.
    Heartbeat,
    /// `PUT /apps/{APP}/{ID}/status`: a status override.
    StatusOverride,
    /// `DELETE /apps/{APP}/{ID}/status`: an override removed.
    StatusOverrideDelete,
    /// `DELETE /apps/{APP}/{ID}`: a deregistration.
    Cancel,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Apps => "apps",
            Self::Delta => "apps_delta",
            Self::Register => "register",
            Self::Heartbeat => "heartbeat",
            Self::StatusOverride => "status",
            Self::StatusOverrideDelete => "status_delete",
            Self::Cancel => "cancel",
        }
    }
}

/// Why the whole registry was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FullFetchReason {
    /// The first read after start.
    Start,
    /// A delta left the local copy with another hash code than the server's.
    HashMismatch,
    /// The last verified read is older than the server's delta window.
    Gap,
    /// The periodic safety-net read.
    Periodic,
    /// The server refused a delta request; trying the whole registry instead.
    DeltaRefused,
    /// The server does not serve deltas: every read is a full one.
    DeltasRefused,
    /// The last read went to another peer than the one before (failover): peers can
    /// disagree in ways the hash code does not show.
    Failover,
    /// The server's own hash code does not describe the registry it sent (instances
    /// without an id, or a server that sends none): deltas cannot be checked, so every
    /// read is a full one.
    Unverifiable,
}

impl FullFetchReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::HashMismatch => "hash_mismatch",
            Self::Gap => "gap",
            Self::Periodic => "periodic",
            Self::DeltaRefused | Self::DeltasRefused => "deltas_refused",
            Self::Failover => "failover",
            Self::Unverifiable => "unverifiable",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FullFetchLabels {
    pub source: &'static str,
    pub reason: &'static str,
}

/// The Eureka source's metrics; shared (`Arc`) between the source and its readers.
#[derive(Debug)]
pub struct EurekaMetrics {
    /// Requests by endpoint and result, rejected instances and metadata.
    pub common: SourceMetrics,
    /// Full reads of the registry, by reason (`start`, `hash_mismatch`).
    pub full_fetches: Family<FullFetchLabels, Counter>,
    /// Instances in the local copy of the registry (all applications, all statuses).
    pub mirrored_instances: Gauge,
}

impl Default for EurekaMetrics {
    fn default() -> Self {
        Self {
            common: SourceMetrics::new(SOURCE),
            full_fetches: Family::default(),
            mirrored_instances: Gauge::default(),
        }
    }
}

impl EurekaMetrics {
    /// Registers the metrics under `registry` (which carries the process prefix).
    pub fn register(&self, registry: &mut Registry) {
        self.common.register(registry);
        registry.register(
            "eureka_full_fetches",
            "Full reads of the Eureka registry, by reason (start, hash_mismatch, gap, periodic, deltas_refused)",
            self.full_fetches.clone(),
        );
        registry.register(
            "eureka_mirrored_instances",
            "Instances in the local copy of the Eureka registry, all statuses",
            self.mirrored_instances.clone(),
        );
    }

    pub(crate) fn record(&self, endpoint: Endpoint, ok: bool) {
        self.common.record(endpoint.as_str(), ok);
    }

    pub(crate) fn reject(&self, reason: &'static str) {
        self.common.reject(reason);
    }

    pub(crate) fn full_fetch(&self, reason: FullFetchReason) {
        self.full_fetches.get_or_create(&Self::labels(reason)).inc();
    }

    /// Failed requests to `endpoint`.
    pub fn failed_requests(&self, endpoint: Endpoint) -> u64 {
        self.common.requests(endpoint.as_str(), false)
    }

    /// Successful requests to `endpoint`.
    pub fn ok_requests(&self, endpoint: Endpoint) -> u64 {
        self.common.requests(endpoint.as_str(), true)
    }

    /// Full fetches for `reason`.
    pub fn full_fetches(&self, reason: FullFetchReason) -> u64 {
        self.full_fetches.get_or_create(&Self::labels(reason)).get()
    }

    fn labels(reason: FullFetchReason) -> FullFetchLabels {
        FullFetchLabels {
            source: SOURCE,
            reason: reason.as_str(),
        }
    }
}

/// The result of one lease renewal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeartbeatResult {
    Ok,
    /// 404: the server forgot the instance (restart, eviction); it is registered again.
    NotFound,
    /// No answer or an error status; the next round tries again.
    Error,
}

impl HeartbeatResult {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::NotFound => "not_found",
            Self::Error => "error",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HeartbeatLabels {
    pub result: &'static str,
}

/// The writer's own counters (its requests are in [`EurekaMetrics`]).
#[derive(Debug, Default)]
pub struct WriterMetrics {
    /// Lease renewals by result.
    pub heartbeats: Family<HeartbeatLabels, Counter>,
    /// Instances registered again because a renewal found them gone.
    pub reregistrations: Counter,
}

impl WriterMetrics {
    /// Registers `eureka_heartbeats_total{result}` and `eureka_reregistrations_total`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "eureka_heartbeats",
            "Lease renewals of the instances this connector registered in Eureka, by result (ok, not_found, error)",
            self.heartbeats.clone(),
        );
        registry.register(
            "eureka_reregistrations",
            "Instances registered again because a lease renewal found them gone (a restarted server, an eviction)",
            self.reregistrations.clone(),
        );
    }

    pub(crate) fn heartbeat(&self, result: HeartbeatResult) {
        self.heartbeats
            .get_or_create(&HeartbeatLabels {
                result: result.as_str(),
            })
            .inc();
    }

    /// Renewals with `result`.
    pub fn heartbeats(&self, result: HeartbeatResult) -> u64 {
        self.heartbeats
            .get_or_create(&HeartbeatLabels {
                result: result.as_str(),
            })
            .get()
    }

    /// Re-registrations after a renewal's 404.
    pub fn reregistrations(&self) -> u64 {
        self.reregistrations.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_encode_under_the_shared_names() {
        let m = EurekaMetrics::default();
        m.record(Endpoint::Delta, true);
        m.record(Endpoint::Apps, false);
        m.full_fetch(FullFetchReason::HashMismatch);
        m.reject("invalid_port");
        assert_eq!(m.ok_requests(Endpoint::Delta), 1);
        assert_eq!(m.full_fetches(FullFetchReason::HashMismatch), 1);
        let mut registry = Registry::with_prefix("registry_connector");
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for line in [
            "registry_connector_registry_requests_total{source=\"eureka\",endpoint=\"apps_delta\",result=\"ok\"} 1",
            "registry_connector_registry_requests_total{source=\"eureka\",endpoint=\"apps\",result=\"error\"} 1",
            "registry_connector_eureka_full_fetches_total{source=\"eureka\",reason=\"hash_mismatch\"} 1",
            "registry_connector_registry_rejected_entries_total{source=\"eureka\",reason=\"invalid_port\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn writer_metrics_encode_under_their_names() {
        let m = WriterMetrics::default();
        m.heartbeat(HeartbeatResult::Ok);
        m.heartbeat(HeartbeatResult::Ok);
        m.heartbeat(HeartbeatResult::NotFound);
        m.reregistrations.inc();
        assert_eq!(m.heartbeats(HeartbeatResult::Ok), 2);
        assert_eq!(m.reregistrations(), 1);
        let mut registry = Registry::with_prefix("registry_connector");
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for line in [
            "registry_connector_eureka_heartbeats_total{result=\"ok\"} 2",
            "registry_connector_eureka_heartbeats_total{result=\"not_found\"} 1",
            "registry_connector_eureka_reregistrations_total 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}
