//! Counters of the Consul source: requests by endpoint and result, skipped instances
//! (the shared [`SourceMetrics`]), and watched services.
//!
//! The benchmark reads "Consul requests per change" from [`ConsulMetrics::requests_total`]
//! before and after a change; the runtime registers the same counters in the process's
//! Prometheus registry with [`ConsulMetrics::register`].

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
    /// Services currently watched (one blocking query each).
    pub watched_services: Gauge,
}

impl Default for ConsulMetrics {
    fn default() -> Self {
        Self {
            common: SourceMetrics::new("consul"),
            watched_services: Gauge::default(),
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
            "Consul services watched with a blocking query",
            self.watched_services.clone(),
        );
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
        [Endpoint::CatalogServices, Endpoint::HealthService]
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
