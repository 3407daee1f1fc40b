//! Counters of the Consul source: requests by endpoint and result, skipped instances
//! (the shared [`SourceMetrics`]), and watched services.
//!
//! The benchmark reads "Consul requests per change" from [`ConsulMetrics::requests_total`]
//! before and after a change; the runtime registers the same counters in the process's
//! Prometheus registry with [`ConsulMetrics::register`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::registry::metrics::SourceMetrics;

/// Which Consul endpoint a request went to.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/catalog/services`.
    CatalogServices,
    /// `/v1/health/service/<name>`.
    HealthService,
    /// `/v1/health/state/any` (the shared mode's check watch).
    HealthState,
    /// `/v1/agent/self` (the start-up probe of the protocol and the connection limit).
    AgentSelf,
    /// `/v1/catalog/node/<node>` (the Kubernetes → Consul writer's own node).
    CatalogNode,
    /// `/v1/health/node/<node>` (the writer's readiness checks).
    HealthNode,
    /// `/v1/internal/ui/services` (which nodes each service has: shared names).
    UiServices,
    /// `/v1/txn` (the writer's batched registrations).
    Txn,
}

/// How a request ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answer that decoded.
    Ok,
    /// Anything else (no answer, error status, undecodable body).
    Error,
}

impl Endpoint {
    /// The label value (lowercase, as every label value of this project).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CatalogServices => "catalog_services",
            Self::HealthService => "health_service",
            Self::HealthState => "health_state",
            Self::AgentSelf => "agent_self",
            Self::CatalogNode => "catalog_node",
            Self::HealthNode => "health_node",
            Self::UiServices => "ui_services",
            Self::Txn => "txn",
        }
    }
}

/// Every reason an entry can be rejected for, for [`ConsulMetrics::rejected_total`].
const REJECT_REASONS: &[&str] = &[
    "no_address",
    "invalid_port",
    "not_an_ip",
    "unspecified_address",
    "loopback_address",
    "link_local_address",
    "link_local_multicast_address",
    "multicast_address",
    "conflicting_metadata",
    "invalid_label_value",
];

/// The Consul source's metrics; shared (`Arc`) between the source and whoever reads them.
#[derive(Debug)]
pub struct ConsulMetrics {
    /// Requests (a blocking query counts when it returns, so an idle watcher adds one per
    /// `wait`) and rejected instances.
    pub common: SourceMetrics,
    /// Services currently watched (selected and followed, by any means).
    pub watched_services: Gauge,
    /// Services with a blocking query of their own.
    pub long_polls: Gauge,
    /// Services followed through the catalog-wide watches of the shared mode.
    pub shared_services: Gauge,
    /// Connections the source may hold to the agent (the budget; -1: no limit).
    pub connection_budget: Gauge,
    /// Connections carrying long polls now.
    pub poll_connections: Gauge,
    /// 1 for the watch mode in force, 0 for the others.
    pub watch_mode: Family<ModeLabel, Gauge>,
    /// Services re-read because a catalog-wide watch named them or the sweep came by.
    pub rereads: Family<RereadLabel, Counter>,
}

/// The `mode` label of `consul_watch_mode`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    pub mode: &'static str,
}

/// The `cause` label of `consul_rereads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RereadLabel {
    pub cause: &'static str,
}

impl Default for ConsulMetrics {
    fn default() -> Self {
        Self {
            common: SourceMetrics::new("consul"),
            watched_services: Gauge::default(),
            long_polls: Gauge::default(),
            shared_services: Gauge::default(),
            connection_budget: Gauge::default(),
            poll_connections: Gauge::default(),
            watch_mode: Family::default(),
            rereads: Family::default(),
        }
    }
}

impl ConsulMetrics {
    /// Registers the metrics under `registry` (names get the process-wide
    /// `registry_connector_` prefix there): `registry_requests_total{source,endpoint,result}`,
    /// `registry_rejected_entries_total{source,reason}`, `consul_watched_services`.
    pub fn register(&self, registry: &mut Registry) {
        self.common.register(registry);
        registry.register(
            "consul_watched_services",
            "Consul services followed by the source",
            self.watched_services.clone(),
        );
        registry.register(
            "consul_long_polls",
            "Consul services with a blocking query of their own",
            self.long_polls.clone(),
        );
        registry.register(
            "consul_shared_services",
            "Consul services followed through the catalog-wide watches (shared mode)",
            self.shared_services.clone(),
        );
        registry.register(
            "consul_connection_budget",
            "Connections the source may hold to the Consul agent (-1: no limit)",
            self.connection_budget.clone(),
        );
        registry.register(
            "consul_poll_connections",
            "Connections carrying per-service long polls",
            self.poll_connections.clone(),
        );
        registry.register(
            "consul_watch_mode",
            "1 for the watch mode in force (multiplexed, per_service, shared)",
            self.watch_mode.clone(),
        );
        registry.register(
            "consul_rereads",
            "Consul services re-read by cause (check, list, sweep, retry)",
            self.rereads.clone(),
        );
    }

    /// Sets the mode gauges: 1 for `mode`, 0 for the others.
    pub(crate) fn set_mode(&self, mode: super::budget::WatchMode) {
        for m in super::budget::WatchMode::ALL {
            self.watch_mode
                .get_or_create(&ModeLabel { mode: m.as_str() })
                .set(i64::from(m == mode));
        }
    }

    /// Counts one re-read.
    pub(crate) fn reread(&self, cause: &'static str) {
        self.rereads.get_or_create(&RereadLabel { cause }).inc();
    }

    /// Counts one instance left out for `reason`.
    pub(crate) fn reject(&self, reason: &'static str) {
        self.common.reject(reason);
    }

    /// Instances left out so far, for every reason.
    pub fn rejected_total(&self) -> u64 {
        REJECT_REASONS.iter().map(|r| self.common.rejected(r)).sum()
    }

    pub(crate) fn record(&self, endpoint: Endpoint, ok: bool) {
        self.common.record(endpoint.as_str(), ok);
    }

    /// Completed requests to `endpoint` that ended with `result`.
    pub fn requests(&self, endpoint: Endpoint, result: Outcome) -> u64 {
        self.common
            .requests(endpoint.as_str(), result == Outcome::Ok)
    }

    /// Every completed request, whatever its endpoint and result.
    pub fn requests_total(&self) -> u64 {
        [
            Endpoint::CatalogServices,
            Endpoint::HealthService,
            Endpoint::HealthState,
            Endpoint::AgentSelf,
            Endpoint::CatalogNode,
            Endpoint::HealthNode,
            Endpoint::UiServices,
            Endpoint::Txn,
        ]
        .into_iter()
        .flat_map(|e| [(e, Outcome::Ok), (e, Outcome::Error)])
        .map(|(e, r)| self.requests(e, r))
        .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_and_encode() {
        let m = ConsulMetrics::default();
        m.record(Endpoint::CatalogServices, true);
        m.record(Endpoint::HealthService, true);
        m.record(Endpoint::HealthService, false);
        assert_eq!(m.requests(Endpoint::HealthService, Outcome::Ok), 1);
        assert_eq!(m.requests_total(), 3);

        m.reject("loopback_address");
        assert_eq!(m.rejected_total(), 1);

        let mut registry = Registry::with_prefix("registry_connector");
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains(
                "registry_connector_registry_requests_total{source=\"consul\",endpoint=\"health_service\",result=\"error\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("registry_connector_consul_watched_services"),
            "{text}"
        );
    }
}
