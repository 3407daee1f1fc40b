//! Counters of the ZooKeeper source, beside every source's `registry_requests_total`
//! (source `zookeeper`, endpoint `add_watch`, `get_children`, `get_data`, `connect`) and
//! `registry_rejected_entries_total`: sessions opened and expired, the connection's
//! state, whole-tree reads, node events, and the nodes and services mirrored. Labels are
//! bounded; never a path or a service name.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::registry::metrics::SourceMetrics;

const SOURCE: &str = "zookeeper";

#[derive(Debug)]
pub struct ZookeeperMetrics {
    /// Requests by kind and result; rejected entries by reason.
    pub common: SourceMetrics,
    /// Sessions established (the first, and one after each expiry).
    pub sessions: Counter,
    /// Sessions that expired or were closed under the source.
    pub session_expirations: Counter,
    /// Connections lost and re-established within one session.
    pub reconnects: Counter,
    /// 1 while the session is connected, else 0.
    pub connected: Gauge,
    /// Complete reads of the tree (start, each new session, each reconnection).
    pub tree_reads: Counter,
    /// Node events received from the persistent recursive watch.
    pub events: Counter,
    /// Nodes mirrored (providers or instances, whether published or left out).
    pub nodes: Gauge,
    /// Services published from the mirror.
    pub services: Gauge,
}

impl Default for ZookeeperMetrics {
    fn default() -> Self {
        Self {
            common: SourceMetrics::new(SOURCE),
            sessions: Counter::default(),
            session_expirations: Counter::default(),
            reconnects: Counter::default(),
            connected: Gauge::default(),
            tree_reads: Counter::default(),
            events: Counter::default(),
            nodes: Gauge::default(),
            services: Gauge::default(),
        }
    }
}

impl ZookeeperMetrics {
    /// Registers the metrics under `registry` (which carries the process prefix).
    pub fn register(&self, registry: &mut Registry) {
        self.common.register(registry);
        registry.register(
            "zookeeper_sessions",
            "ZooKeeper sessions established",
            self.sessions.clone(),
        );
        registry.register(
            "zookeeper_session_expirations",
            "ZooKeeper sessions that expired or were closed",
            self.session_expirations.clone(),
        );
        registry.register(
            "zookeeper_reconnects",
            "Connections to ZooKeeper lost and re-established within a session",
            self.reconnects.clone(),
        );
        registry.register(
            "zookeeper_connected",
            "1 while the ZooKeeper session is connected",
            self.connected.clone(),
        );
        registry.register(
            "zookeeper_tree_reads",
            "Complete reads of the watched ZooKeeper tree",
            self.tree_reads.clone(),
        );
        registry.register(
            "zookeeper_events",
            "Node events received from the persistent recursive watch",
            self.events.clone(),
        );
        registry.register(
            "zookeeper_nodes",
            "ZooKeeper nodes mirrored (providers or instances)",
            self.nodes.clone(),
        );
        registry.register(
            "zookeeper_services",
            "Services published from ZooKeeper",
            self.services.clone(),
        );
    }

    pub fn record(&self, endpoint: &'static str, ok: bool) {
        self.common.record(endpoint, ok);
    }

    pub fn reject(&self, reason: &'static str) {
        self.common.reject(reason);
    }
}

/// The Kubernetes → ZooKeeper writer's own counters (its requests are in
/// [`ZookeeperMetrics::common`], endpoints `multi`, `get_ephemerals`, `mkdir`, ...).
#[derive(Debug, Default)]
pub struct WriterMetrics {
    /// Sessions the writer opened (the first, and one after each expiry).
    pub sessions: Counter,
    /// Owned nodes re-created under this process's session because another session
    /// held them (a predecessor's, or the replica that led before).
    pub takeovers: Counter,
    /// 1 while the writer's session is connected.
    pub connected: Gauge,
}

impl WriterMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "zookeeper_writer_sessions",
            "ZooKeeper sessions opened by the Kubernetes -> ZooKeeper writer",
            self.sessions.clone(),
        );
        registry.register(
            "zookeeper_writer_takeovers",
            "Owned ZooKeeper nodes re-created under this process's session (taken over from a predecessor's)",
            self.takeovers.clone(),
        );
        registry.register(
            "zookeeper_writer_connected",
            "1 while the Kubernetes -> ZooKeeper writer's session is connected",
            self.connected.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_under_the_process_prefix() {
        let m = ZookeeperMetrics::default();
        m.record("get_children", true);
        m.sessions.inc();
        m.connected.set(1);
        let mut registry = Registry::with_prefix("registry_connector");
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for line in [
            "registry_connector_registry_requests_total{source=\"zookeeper\",endpoint=\"get_children\",result=\"ok\"} 1",
            "registry_connector_zookeeper_sessions_total 1",
            "registry_connector_zookeeper_connected 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}
