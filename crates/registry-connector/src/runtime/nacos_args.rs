//! The Nacos command's own flags: servers, namespace, groups, clusters, credentials,
//! the service-list interval and the metadata filter.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use secrecy::{ExposeSecret, SecretString};

use super::secret_args::secret;
use super::source_args::SourceArgs;
use crate::registry::metadata::parse_metadata_filters;
use crate::registry::nacos::config::{Groups, NacosConfig};

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Nacos")]
pub struct NacosArgs {
    /// host:port of Nacos's HTTP API, comma-separated for several servers (tried in
    /// order); gRPC is on port + --nacos-grpc-port-offset.
    #[arg(
        long,
        env = "NACOS_ADDR",
        value_delimiter = ',',
        default_value = "127.0.0.1:8848",
        value_name = "HOST:PORT"
    )]
    pub nacos_addr: Vec<String>,

    /// What Nacos clients add to the HTTP port to reach gRPC.
    #[arg(
        long,
        env = "RC_NACOS_GRPC_PORT_OFFSET",
        default_value_t = 1000,
        value_name = "N"
    )]
    pub nacos_grpc_port_offset: u16,

    /// The namespace (tenant) id.
    #[arg(
        long,
        env = "RC_NACOS_NAMESPACE",
        default_value = "public",
        value_name = "ID"
    )]
    pub nacos_namespace: String,

    /// Groups to read, comma-separated; `*` for every group of the namespace.
    #[arg(
        long,
        env = "RC_NACOS_GROUPS",
        value_delimiter = ',',
        default_value = "DEFAULT_GROUP",
        value_name = "GROUP"
    )]
    pub nacos_groups: Vec<String>,

    /// Only instances of these clusters (comma-separated); all when not given.
    #[arg(
        long,
        env = "RC_NACOS_CLUSTERS",
        value_delimiter = ',',
        value_name = "CLUSTER"
    )]
    pub nacos_clusters: Vec<String>,

    /// User to log in as (Nacos with authentication on).
    #[arg(long, env = "NACOS_USERNAME", value_name = "USER")]
    pub nacos_username: Option<String>,

    /// Password (prefer --nacos-password-file or the environment: flags show in `ps`).
    #[arg(
        long,
        env = "NACOS_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD",
        value_parser = secret
    )]
    pub nacos_password: Option<SecretString>,

    /// File holding the password.
    #[arg(long, env = "NACOS_PASSWORD_FILE", value_name = "FILE")]
    pub nacos_password_file: Option<PathBuf>,

    /// How often the service list is read (Nacos pushes instance changes, but not new
    /// or removed services).
    #[arg(long, env = "RC_NACOS_SERVICE_LIST_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub nacos_service_list_interval: Duration,

    /// Publish a service as NAME-GROUP, so that one name in two groups makes two
    /// Services (without it, the first listed group wins and the other is reported).
    #[arg(long, env = "RC_NACOS_GROUP_AS_SUFFIX", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub nacos_group_as_suffix: bool,

    /// Timeout of one request to Nacos.
    #[arg(long, env = "RC_NACOS_REQUEST_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub nacos_request_timeout: Duration,

    /// How long a service that read empty stays published: two reads, half of it apart,
    /// must find it empty (Nacos clients re-register some seconds after a node restart).
    #[arg(long, env = "RC_NACOS_EMPTY_CONFIRM_DELAY", default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub nacos_empty_confirm_delay: Duration,

    /// The largest gRPC message read from Nacos, in bytes (Nacos sends up to 10 MiB: a
    /// service of many instances is one message).
    #[arg(long, env = "RC_NACOS_MAX_MESSAGE_SIZE", default_value_t = crate::registry::nacos::conn::DEFAULT_MAX_MESSAGE_SIZE, value_name = "BYTES")]
    pub nacos_max_message_size: usize,

    /// Sync only instances whose metadata holds KEY=VALUE (repeatable: all must match;
    /// comma-separated in the environment).
    #[arg(
        long,
        env = "RC_FILTER_METADATA",
        value_delimiter = ',',
        value_name = "KEY=VALUE"
    )]
    pub filter_metadata: Vec<String>,
}

impl NacosArgs {
    /// The source's configuration from its flags and the shared selection flags.
    pub fn to_config(&self, shared: &SourceArgs) -> anyhow::Result<NacosConfig> {
        let addrs: Vec<String> = self
            .nacos_addr
            .iter()
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect();
        let mut cfg = NacosConfig::new(addrs);
        cfg.grpc_port_offset = self.nacos_grpc_port_offset;
        cfg.namespace = self.nacos_namespace.clone();
        cfg.groups = Groups::parse(&self.nacos_groups)?;
        cfg.clusters = self
            .nacos_clusters
            .iter()
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .collect();
        cfg.username = self.nacos_username.clone().filter(|u| !u.is_empty());
        cfg.password = self
            .nacos_password
            .as_ref()
            .map(|p| p.expose_secret().to_string())
            .filter(|p| !p.is_empty());
        cfg.password_file = self.nacos_password_file.clone();
        cfg.service_list_interval = self.nacos_service_list_interval;
        cfg.group_as_suffix = self.nacos_group_as_suffix;
        cfg.request_timeout = self.nacos_request_timeout;
        cfg.max_message_size = self.nacos_max_message_size;
        cfg.empty_confirm_delay = self.nacos_empty_confirm_delay;
        cfg.filter_metadata = parse_metadata_filters(&self.filter_metadata)
            .map_err(|e| anyhow::anyhow!("--filter-metadata: {e}"))?;
        cfg.passing_only = shared.passing_only;
        cfg.service_prefix = shared.service_prefix.clone();
        cfg.metadata = shared.metadata_allow_list()?;
        Ok(cfg)
    }
}
