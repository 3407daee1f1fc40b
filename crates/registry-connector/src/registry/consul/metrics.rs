//! Counters of the Consul source: requests by endpoint and result, skipped instances,
//! watched services. Labels are bounded (two endpoints, two results); never a service
//! name, so cardinality does not grow with the registry.
//!
//! The benchmark reads "Consul requests per change" from [`ConsulMetrics::requests_total`]
//! before and after a change; the runtime registers the same counters in the process's
//! Prometheus registry with [`ConsulMetrics::register`].

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error => "error",
        }
    }
}

impl EncodeLabelValue for Endpoint {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: Endpoint,
    pub result: Outcome,
}

/// The Consul source's metrics; shared (`Arc`) between the source and whoever reads them.
#[derive(Debug, Default)]
pub struct ConsulMetrics {
    /// Completed requests (answered or failed) by endpoint and result. A blocking query
    /// counts when it returns, so an idle watcher adds one per `wait`.
    pub requests: Family<RequestLabels, Counter>,
    /// Instances left out because Consul reported something Kubernetes cannot carry (an
    /// address such as loopback, port 0); counted each time a service's answer is
    /// processed, so a permanently bad instance counts once per change of its service.
    pub skipped_instances: Counter,
    /// Services currently watched (one blocking query each).
    pub watched_services: Gauge,
}

impl ConsulMetrics {
    /// Registers the metrics under `registry` (give it a `consul` sub-registry; names get
    /// the process-wide `registry_connector_` prefix there).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "requests",
            "Consul HTTP requests by endpoint and result",
            self.requests.clone(),
        );
        registry.register(
            "skipped_instances",
            "Consul instances left out for an invalid address or port",
            self.skipped_instances.clone(),
        );
        registry.register(
            "watched_services",
            "Consul services watched with a blocking query",
            self.watched_services.clone(),
        );
    }

    pub(crate) fn record(&self, endpoint: Endpoint, ok: bool) {
        let result = if ok { Outcome::Ok } else { Outcome::Error };
        self.requests
            .get_or_create(&RequestLabels { endpoint, result })
            .inc();
    }

    /// Completed requests to `endpoint` that ended with `result`.
    pub fn requests(&self, endpoint: Endpoint, result: Outcome) -> u64 {
        self.requests
            .get_or_create(&RequestLabels { endpoint, result })
            .get()
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

        let mut registry = Registry::with_prefix("registry_connector_consul");
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains("registry_connector_consul_requests_total{endpoint=\"health_service\",result=\"error\"} 1"),
            "{text}"
        );
    }
}
