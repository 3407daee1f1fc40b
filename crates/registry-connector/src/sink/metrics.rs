//! The sink's Prometheus metrics. Labels are bounded (kind, verb, result): never a
//! service name, so cardinality does not grow with the registry.

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Kind {
    Service,
    EndpointSlice,
    Endpoints,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Verb {
    Create,
    Update,
    Delete,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Conflict,
    Error,
}

/// Label values in Prometheus style (lowercase), from the variants' names.
macro_rules! label_values {
    ($ty:ident { $($variant:ident => $value:literal),+ $(,)? }) => {
        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $value),+
                }
            }
        }

        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    };
}

label_values!(Kind { Service => "service", EndpointSlice => "endpointslice", Endpoints => "endpoints" });
label_values!(Verb { Create => "create", Update => "update", Delete => "delete" });
label_values!(Outcome { Success => "success", Conflict => "conflict", Error => "error" });

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub kind: Kind,
    pub verb: Verb,
    pub result: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: Kind,
}

/// Counters and gauges of the Kubernetes side.
#[derive(Debug)]
pub struct SinkMetrics {
    /// Kubernetes writes by kind, verb and result.
    pub writes: Family<WriteLabels, Counter>,
    /// Reads of one object by kind: the caches keep no whole objects, so an update
    /// reads the live object first (as does a create conflict, and `--diff`).
    pub reads: Family<KindLabels, Counter>,
    /// Reconciles of one service, and those that failed.
    pub reconciles: Counter,
    pub reconcile_failures: Counter,
    pub reconcile_duration: Histogram,
    /// From a registry change reaching the catalog to the Kubernetes write it caused.
    pub change_to_write: Histogram,
    /// Objects that carry a name we want but are not ours.
    pub name_clashes: Counter,
    /// Deletions currently held by the mass-deletion guard.
    pub held_deletions: Gauge,
    /// Services this connector instance manages (from its caches).
    pub managed_services: Family<SourceLabels, Gauge>,
    /// Endpoints of the services this connector publishes (from the registry's view).
    pub managed_endpoints: Family<SourceLabels, Gauge>,
    /// Unix time of the last batch that completed without failures.
    pub last_sync_timestamp: Gauge,
}

impl Default for SinkMetrics {
    fn default() -> Self {
        Self {
            writes: Family::default(),
            reads: Family::default(),
            reconciles: Counter::default(),
            reconcile_failures: Counter::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            change_to_write: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            name_clashes: Counter::default(),
            held_deletions: Gauge::default(),
            managed_services: Family::default(),
            managed_endpoints: Family::default(),
            last_sync_timestamp: Gauge::default(),
        }
    }
}

impl SinkMetrics {
    pub fn register(&self, registry: &mut Registry) {
        // Every kind and verb shows up from the start (a standby reports 0 writes, not
        // "no data").
        for kind in [Kind::Service, Kind::EndpointSlice, Kind::Endpoints] {
            for verb in [Verb::Create, Verb::Update, Verb::Delete] {
                let _ = self.writes.get_or_create(&WriteLabels {
                    kind,
                    verb,
                    result: Outcome::Success,
                });
            }
        }
        registry.register(
            "kubernetes_writes",
            "Kubernetes API writes by kind, verb and result",
            self.writes.clone(),
        );
        registry.register(
            "kubernetes_reads",
            "Kubernetes API reads of one object (before an update, after a create conflict), by kind",
            self.reads.clone(),
        );
        registry.register(
            "reconciles",
            "Per-service reconciles",
            self.reconciles.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Per-service reconciles that failed and were scheduled for retry",
            self.reconcile_failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one service's reconcile",
            self.reconcile_duration.clone(),
        );
        registry.register(
            "registry_change_to_write_seconds",
            "From a registry change to the Kubernetes write it caused (includes the quiet period)",
            self.change_to_write.clone(),
        );
        registry.register(
            "name_clashes",
            "Objects whose name is taken by an object this connector does not own",
            self.name_clashes.clone(),
        );
        registry.register(
            "held_deletions",
            "Service deletions held by the mass-deletion guard",
            self.held_deletions.clone(),
        );
        registry.register(
            "managed_services",
            "Services managed by this connector instance, by source",
            self.managed_services.clone(),
        );
        registry.register(
            "managed_endpoints",
            "Endpoints of the services this connector instance publishes, by source",
            self.managed_endpoints.clone(),
        );
        registry.register(
            "last_sync_timestamp_seconds",
            "Unix time of the last batch reconciled without failure",
            self.last_sync_timestamp.clone(),
        );
    }

    pub fn record_write(&self, kind: Kind, verb: Verb, result: Outcome) {
        self.writes
            .get_or_create(&WriteLabels { kind, verb, result })
            .inc();
    }

    pub fn record_read(&self, kind: Kind) {
        self.reads.get_or_create(&KindLabels { kind }).inc();
    }

    /// Writes of one kind that the apiserver accepted.
    pub fn successful_writes(&self, kind: Kind) -> u64 {
        [Verb::Create, Verb::Update, Verb::Delete]
            .into_iter()
            .map(|verb| {
                self.writes
                    .get_or_create(&WriteLabels {
                        kind,
                        verb,
                        result: Outcome::Success,
                    })
                    .get()
            })
            .sum()
    }

    /// All writes the apiserver accepted, of every kind.
    pub fn total_successful_writes(&self) -> u64 {
        [Kind::Service, Kind::EndpointSlice, Kind::Endpoints]
            .into_iter()
            .map(|k| self.successful_writes(k))
            .sum()
    }
}
