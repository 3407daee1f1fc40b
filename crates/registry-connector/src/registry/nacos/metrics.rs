//! Counters of the Nacos source, beside every source's `registry_requests_total` and
//! `registry_rejected_entries_total` (source `nacos`): pushes received and acknowledged,
//! connections opened, the connection's state, the subscribed services and those the
//! server answers under its protection threshold. Labels are bounded; never a service
//! name.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::registry::metrics::SourceMetrics;

const SOURCE: &str = "nacos";

#[derive(Debug)]
pub struct NacosMetrics {
    /// Requests by kind (`subscribe`, `service_list`, ...) and result; rejected entries.
    pub common: SourceMetrics,
    /// `NotifySubscriberRequest`s received on the bi stream.
    pub pushes_received: Counter,
    /// Pushes acknowledged (at once, before they are applied).
    pub pushes_acked: Counter,
    /// Connections opened after the first one (server restarts, network breaks, resets).
    pub reconnects: Counter,
    /// 1 while a connection is open and registered, else 0.
    pub connected: Gauge,
    /// Services currently subscribed.
    pub subscribed_services: Gauge,
    /// Services whose last answer came under the protection threshold (Nacos then
    /// reports unhealthy instances as healthy).
    pub protection_threshold: Gauge,
    /// Emptied services whose removal waits for a confirming read.
    pub empty_holds: Gauge,
}

impl Default for NacosMetrics {
    fn default() -> Self {
        Self {
            common: SourceMetrics::new(SOURCE),
            pushes_received: Counter::default(),
            pushes_acked: Counter::default(),
            reconnects: Counter::default(),
            connected: Gauge::default(),
            subscribed_services: Gauge::default(),
            protection_threshold: Gauge::default(),
            empty_holds: Gauge::default(),
        }
    }
}

impl NacosMetrics {
    /// Registers the metrics under `registry` (which carries the process prefix).
    pub fn register(&self, registry: &mut Registry) {
        self.common.register(registry);
        registry.register(
            "nacos_pushes_received",
            "Service pushes (NotifySubscriberRequest) received from Nacos",
            self.pushes_received.clone(),
        );
        registry.register(
            "nacos_pushes_acked",
            "Service pushes acknowledged to Nacos",
            self.pushes_acked.clone(),
        );
        registry.register(
            "nacos_reconnects",
            "gRPC connections to Nacos opened after the first",
            self.reconnects.clone(),
        );
        registry.register(
            "nacos_connected",
            "1 while the gRPC connection to Nacos is open and registered",
            self.connected.clone(),
        );
        registry.register(
            "nacos_subscribed_services",
            "Nacos services currently subscribed",
            self.subscribed_services.clone(),
        );
        registry.register(
            "nacos_protection_threshold_services",
            "Services Nacos answers under its protection threshold (unhealthy reported healthy)",
            self.protection_threshold.clone(),
        );
        registry.register(
            "nacos_empty_holds",
            "Services that became empty and wait for a confirming read before removal",
            self.empty_holds.clone(),
        );
    }

    pub fn record(&self, endpoint: &'static str, ok: bool) {
        self.common.record(endpoint, ok);
    }

    pub fn reject(&self, reason: &'static str) {
        self.common.reject(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_under_the_process_prefix() {
        let m = NacosMetrics::default();
        m.record("subscribe", true);
        m.pushes_received.inc();
        m.connected.set(1);
        let mut registry = Registry::with_prefix("registry_connector");
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for line in [
            "registry_connector_registry_requests_total{source=\"nacos\",endpoint=\"subscribe\",result=\"ok\"} 1",
            "registry_connector_nacos_pushes_received_total 1",
            "registry_connector_nacos_connected 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}
