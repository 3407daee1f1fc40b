//! The counters every source has, under the same names so that dashboards put sources
//! side by side: `registry_requests_total{source,endpoint,result}` and
//! `registry_rejected_entries_total{source,reason}`. Labels are bounded (a source's few
//! endpoints, two results, a fixed set of reasons); never a service name.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub source: &'static str,
    pub endpoint: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectedLabels {
    pub source: &'static str,
    pub reason: &'static str,
}

/// Requests and rejected entries of one source.
#[derive(Debug)]
pub struct SourceMetrics {
    source: &'static str,
    /// Completed requests (answered or failed) by endpoint and result.
    pub requests: Family<RequestLabels, Counter>,
    /// Registry entries left out, by reason; counted each time the entry's service is
    /// processed, so a permanently bad entry counts once per change of its service.
    pub rejected: Family<RejectedLabels, Counter>,
}

fn result(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "error"
    }
}

impl SourceMetrics {
    /// Metrics labelled `source="<source>"`.
    pub fn new(source: &'static str) -> Self {
        Self {
            source,
            requests: Family::default(),
            rejected: Family::default(),
        }
    }

    /// Registers the two families in `registry` (which carries the process prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "registry_requests",
            "Registry requests by source, endpoint and result",
            self.requests.clone(),
        );
        registry.register(
            "registry_rejected_entries",
            "Registry entries left out, by source and reason (invalid address, port or metadata)",
            self.rejected.clone(),
        );
    }

    /// Counts one completed request to `endpoint`.
    pub fn record(&self, endpoint: &'static str, ok: bool) {
        self.requests
            .get_or_create(&self.request(endpoint, ok))
            .inc();
    }

    /// Completed requests to `endpoint` with the given outcome.
    pub fn requests(&self, endpoint: &'static str, ok: bool) -> u64 {
        self.requests
            .get_or_create(&self.request(endpoint, ok))
            .get()
    }

    /// Counts one entry left out for `reason`.
    pub fn reject(&self, reason: &'static str) {
        self.rejected.get_or_create(&self.rejection(reason)).inc();
    }

    /// Entries left out for `reason` so far.
    pub fn rejected(&self, reason: &'static str) -> u64 {
        self.rejected.get_or_create(&self.rejection(reason)).get()
    }

    fn request(&self, endpoint: &'static str, ok: bool) -> RequestLabels {
        RequestLabels {
            source: self.source,
            endpoint,
            result: result(ok),
        }
    }

    fn rejection(&self, reason: &'static str) -> RejectedLabels {
        RejectedLabels {
            source: self.source,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_encode_with_the_source_label() {
        let m = SourceMetrics::new("test");
        m.record("things", true);
        m.record("things", false);
        m.reject("invalid_port");
        assert_eq!(m.requests("things", true), 1);
        assert_eq!(m.rejected("invalid_port"), 1);
        let mut registry = Registry::with_prefix("registry_connector");
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for line in [
            "registry_connector_registry_requests_total{source=\"test\",endpoint=\"things\",result=\"error\"} 1",
            "registry_connector_registry_rejected_entries_total{source=\"test\",reason=\"invalid_port\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}
