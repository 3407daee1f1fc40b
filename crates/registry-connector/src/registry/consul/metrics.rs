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

/// The registry a metric is about; a constant here, a label so that dashboards can put
/// several sources side by side.
const SOURCE: &str = "consul";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub source: &'static str,
    pub endpoint: Endpoint,
    pub result: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectedLabels {
    pub source: &'static str,
    pub reason: &'static str,
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
    pub rejected: Family<RejectedLabels, Counter>,
    /// Services currently watched (one blocking query each).
    pub watched_services: Gauge,
}

impl ConsulMetrics {
    /// Registers the metrics under `registry` (names get the process-wide
    /// `registry_connector_` prefix there): `registry_requests_total{source,endpoint,result}`,
    /// `registry_rejected_entries_total{source,reason}`, `consul_watched_services`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "registry_requests",
            "Registry requests by source, endpoint and result",
            self.requests.clone(),
        );
        registry.register(
            "registry_rejected_entries",
            "Registry instances left out, by source and reason (invalid address or port)",
            self.rejected.clone(),
        );
        registry.register(
            "consul_watched_services",
            "Consul services watched with a blocking query",
            self.watched_services.clone(),
        );
    }

    /// Counts one instance left out for `reason`.
    pub(crate) fn reject(&self, reason: &'static str) {
        self.rejected
            .get_or_create(&RejectedLabels {
                source: SOURCE,
                reason,
            })
            .inc();
    }

    /// Instances left out so far, for every reason.
    pub fn rejected_total(&self) -> u64 {
        let mut total = 0;
        for reason in [
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
        ] {
            total += self
                .rejected
                .get_or_create(&RejectedLabels {
                    source: SOURCE,
                    reason,
                })
                .get();
        }
        total
    }

    pub(crate) fn record(&self, endpoint: Endpoint, ok: bool) {
        let result = if ok { Outcome::Ok } else { Outcome::Error };
        self.requests
            .get_or_create(&RequestLabels {
                source: SOURCE,
                endpoint,
                result,
            })
            .inc();
    }

    /// Completed requests to `endpoint` that ended with `result`.
    pub fn requests(&self, endpoint: Endpoint, result: Outcome) -> u64 {
        self.requests
            .get_or_create(&RequestLabels {
                source: SOURCE,
                endpoint,
                result,
            })
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
            text.contains(
                "registry_connector_registry_rejected_entries_total{source=\"consul\",reason=\"loopback_address\"} 1"
            ),
            "{text}"
        );
    }
}
