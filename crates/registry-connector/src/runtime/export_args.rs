//! The flags of the Kubernetes → registry direction, shared by every registry command
//! (consul-k8s's names where it has them; see docs/to-registry.md for the table).

use std::time::Duration;

use clap::{Args, ValueEnum};

use super::sync_args::SyncArgs;
use crate::export::desired::{DesiredConfig, NodePortSync};
use crate::export::engine::ExportConfig;
use crate::export::select::{NamespaceSet, SelectionConfig};
use crate::sink::backoff::BackoffPolicy;

/// Which way the connector syncs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum SyncDirection {
    /// Registry services become Kubernetes Services (the default).
    #[default]
    ToKubernetes,
    /// Kubernetes Services are registered in the registry.
    ToRegistry,
    /// Both, in one process under one lease.
    Both,
}

impl SyncDirection {
    pub fn to_kubernetes(self) -> bool {
        matches!(self, Self::ToKubernetes | Self::Both)
    }

    pub fn to_registry(self) -> bool {
        matches!(self, Self::ToRegistry | Self::Both)
    }
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Kubernetes → registry")]
pub struct ExportArgs {
    /// Direction: to-kubernetes (registry → Kubernetes), to-registry (Kubernetes →
    /// registry) or both.
    #[arg(
        long,
        env = "RC_SYNC",
        default_value = "to-kubernetes",
        value_enum,
        value_name = "DIRECTION"
    )]
    pub sync: SyncDirection,

    /// Namespaces whose Services are registered (comma-separated; `*` for all).
    #[arg(
        long,
        env = "RC_K8S_ALLOW_NAMESPACES",
        value_delimiter = ',',
        default_value = "*",
        value_name = "NS,..."
    )]
    pub k8s_allow_namespaces: Vec<String>,

    /// Namespaces never registered (comma-separated; `*` for all); wins over the allow list.
    #[arg(
        long,
        env = "RC_K8S_DENY_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system,kube-public",
        value_name = "NS,..."
    )]
    pub k8s_deny_namespaces: Vec<String>,

    /// Register Services without a sync annotation (`connector.flomesh.io/sync` or
    /// `consul.hashicorp.com/service-sync`); false: only those annotated "true".
    #[arg(long, env = "RC_K8S_DEFAULT_SYNC", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub k8s_default_sync: bool,

    /// Prepended to the registry name of every Service without a name annotation.
    #[arg(
        long,
        env = "RC_REGISTRY_SERVICE_PREFIX",
        default_value = "",
        value_name = "PREFIX"
    )]
    pub registry_service_prefix: String,

    /// Append `-<namespace>` to every registry name.
    #[arg(long, env = "RC_ADD_K8S_NAMESPACE_SUFFIX", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub add_k8s_namespace_suffix: bool,

    /// Register a ClusterIP Service's cluster IPs instead of its endpoints.
    #[arg(long, env = "RC_SYNC_CLUSTER_IP_SERVICES", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub sync_cluster_ip_services: bool,

    /// The Node address a NodePort Service is registered at.
    #[arg(
        long,
        env = "RC_NODE_PORT_SYNC_TYPE",
        default_value = "external-only",
        value_enum,
        value_name = "TYPE"
    )]
    pub node_port_sync_type: NodePortSync,

    /// Register a LoadBalancer Service's endpoints instead of its ingress addresses.
    #[arg(long, env = "RC_SYNC_LB_SERVICES_ENDPOINTS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub sync_lb_services_endpoints: bool,

    /// Registry write requests per second, sustained (a Consul transaction of up to 63
    /// operations is one request).
    #[arg(
        long,
        env = "RC_REGISTRY_WRITE_QPS",
        default_value_t = 50,
        value_name = "QPS"
    )]
    pub registry_write_qps: u32,

    /// Registry write requests allowed in a burst above the sustained rate.
    #[arg(
        long,
        env = "RC_REGISTRY_WRITE_BURST",
        default_value_t = 100,
        value_name = "N"
    )]
    pub registry_write_burst: u32,
}

impl ExportArgs {
    /// The engine's settings; the coalescing, resync and guard settings are the
    /// Kubernetes flags' (one quiet period, one guard policy for both directions).
    pub fn export_config(&self, sync: &SyncArgs) -> ExportConfig {
        let sink = sync.sink_config();
        ExportConfig {
            selection: SelectionConfig {
                allow: NamespaceSet::new(&self.k8s_allow_namespaces),
                deny: NamespaceSet::new(&self.k8s_deny_namespaces),
                default_sync: self.k8s_default_sync,
                prefix: self.registry_service_prefix.clone(),
                namespace_suffix: self.add_k8s_namespace_suffix,
            },
            desired: DesiredConfig {
                cluster_ip: self.sync_cluster_ip_services,
                node_port: self.node_port_sync_type,
                lb_endpoints: self.sync_lb_services_endpoints,
                connector_id: sync.connector_id.clone(),
            },
            quiet_period: sync.quiet_period,
            max_period: sync.max_period,
            resync_period: sync.resync_period.max(Duration::from_secs(1)),
            write_qps: self.registry_write_qps,
            write_burst: self.registry_write_burst,
            retry: BackoffPolicy::default(),
            guard: sink.guard,
        }
    }
}
