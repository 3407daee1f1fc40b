//! Metrics of the Kubernetes → registry direction, under `registry_connector_export_`.
//! Labels are bounded (registry, op, result, reason): never a service name.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub registry: &'static str,
    /// `register`, `health`, `deregister`.
    pub op: &'static str,
    /// `success` or `error`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub registry: &'static str,
    /// `read` (what we own) or `write` (one batch of writes).
    pub kind: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub registry: &'static str,
    /// `register`, `health`, `deregister`.
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Counters and gauges of the export engine. Registry-specific requests (Eureka's
/// heartbeats, Consul's endpoints) are the writers' own metrics.
#[derive(Debug)]
pub struct ExportMetrics {
    /// Instance writes by op and result.
    pub writes: Family<WriteLabels, Counter>,
    /// Engine requests to the registry: reads of what we own, write batches.
    pub requests: Family<RequestLabels, Counter>,
    /// Writes the registry refused one by one while it took the rest of their batch
    /// (also counted as errors in `writes`).
    pub rejected_writes: Family<OpLabels, Counter>,
    /// Kubernetes Services with at least one registered instance.
    pub managed_services: Gauge,
    /// Registry instances this connector owns.
    pub managed_instances: Gauge,
    /// Registry names that also hold entries this connector does not own.
    pub shared_names: Gauge,
    /// Service removals held by the mass-deletion guard.
    pub held_deletions: Gauge,
    /// Selected Services whose instances lost something (bad address, unknown port...),
    /// counted once each time a Service starts having that problem.
    pub problems: Family<ReasonLabels, Counter>,
    /// From a Kubernetes event to the registry write it caused.
    pub change_to_write: Histogram,
    /// Unix time of the last pass that wrote everything it had to.
    pub last_sync_timestamp: Gauge,
}

impl Default for ExportMetrics {
    fn default() -> Self {
        Self {
            writes: Family::default(),
            requests: Family::default(),
            rejected_writes: Family::default(),
            managed_services: Gauge::default(),
            managed_instances: Gauge::default(),
            shared_names: Gauge::default(),
            held_deletions: Gauge::default(),
            problems: Family::default(),
            change_to_write: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            last_sync_timestamp: Gauge::default(),
        }
    }
}

impl ExportMetrics {
    pub fn register(&self, registry: &mut Registry, writer: &'static str) {
        for op in ["register", "health", "deregister"] {
            let _ = self.writes.get_or_create(&WriteLabels {
                registry: writer,
                op,
                result: "success",
            });
        }
        for op in ["register", "health", "deregister"] {
            let _ = self.rejected_writes.get_or_create(&OpLabels {
                registry: writer,
                op,
            });
        }
        for kind in ["read", "write"] {
            let _ = self.requests.get_or_create(&RequestLabels {
                registry: writer,
                kind,
                result: "success",
            });
        }
        let sub = registry.sub_registry_with_prefix("export");
        sub.register(
            "writes",
            "Registry instance writes by op and result",
            self.writes.clone(),
        );
        sub.register(
            "requests",
            "Requests the export engine sent to the registry: reads of the owned entries and write batches",
            self.requests.clone(),
        );
        sub.register(
            "rejected_writes",
            "Writes the registry refused one by one while it took the rest of their batch",
            self.rejected_writes.clone(),
        );
        sub.register(
            "managed_services",
            "Kubernetes Services with instances registered by this connector",
            self.managed_services.clone(),
        );
        sub.register(
            "managed_instances",
            "Registry instances owned by this connector",
            self.managed_instances.clone(),
        );
        sub.register(
            "shared_names",
            "Registry service names that also hold entries this connector does not own (left untouched)",
            self.shared_names.clone(),
        );
        sub.register(
            "held_deletions",
            "Service removals held by the mass-deletion guard",
            self.held_deletions.clone(),
        );
        sub.register(
            "problems",
            "Parts of selected Services left out of the registry, by reason",
            self.problems.clone(),
        );
        sub.register(
            "change_to_write_seconds",
            "From a Kubernetes change to the registry write it caused",
            self.change_to_write.clone(),
        );
        sub.register(
            "last_sync_timestamp_seconds",
            "Unix time of the last pass that wrote everything it had to",
            self.last_sync_timestamp.clone(),
        );
    }

    pub fn record_write(&self, registry: &'static str, op: &'static str, ok: bool) {
        self.writes
            .get_or_create(&WriteLabels {
                registry,
                op,
                result: if ok { "success" } else { "error" },
            })
            .inc();
    }

    pub fn record_rejected(&self, registry: &'static str, op: &'static str) {
        self.rejected_writes
            .get_or_create(&OpLabels { registry, op })
            .inc();
    }

    pub fn record_request(&self, registry: &'static str, kind: &'static str, ok: bool) {
        self.requests
            .get_or_create(&RequestLabels {
                registry,
                kind,
                result: if ok { "success" } else { "error" },
            })
            .inc();
    }

    /// Successful instance writes so far (tests and the benchmark count them).
    pub fn successful_writes(&self, registry: &'static str) -> u64 {
        ["register", "health", "deregister"]
            .iter()
            .map(|op| {
                self.writes
                    .get_or_create(&WriteLabels {
                        registry,
                        op,
                        result: "success",
                    })
                    .get()
            })
            .sum()
    }
}
