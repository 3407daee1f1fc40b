//! The Consul command's own flags (the seed's selection rules and the connection).

use std::path::PathBuf;

use clap::Args;
use secrecy::{ExposeSecret, SecretString};

use super::secret_args::secret;

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Consul")]
pub struct ConsulArgs {
    /// Consul HTTP API address, with or without scheme (http://, https://).
    #[arg(
        long,
        env = "CONSUL_HTTP_ADDR",
        default_value = "127.0.0.1:8500",
        value_name = "ADDR"
    )]
    pub consul_http_addr: String,

    /// ACL token (prefer --consul-token-file or the environment: flags show in `ps`).
    #[arg(
        long,
        env = "CONSUL_HTTP_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        value_parser = secret
    )]
    pub consul_token: Option<SecretString>,

    /// File holding the ACL token.
    #[arg(long, env = "CONSUL_HTTP_TOKEN_FILE", value_name = "FILE")]
    pub consul_token_file: Option<PathBuf>,

    /// CA certificate to verify Consul's TLS certificate (implies https).
    #[arg(long, env = "CONSUL_CACERT", value_name = "FILE")]
    pub consul_ca_file: Option<PathBuf>,

    /// Client certificate for mutual TLS.
    #[arg(
        long,
        env = "CONSUL_CLIENT_CERT",
        value_name = "FILE",
        requires = "consul_client_key"
    )]
    pub consul_client_cert: Option<PathBuf>,

    /// Client key for mutual TLS.
    #[arg(
        long,
        env = "CONSUL_CLIENT_KEY",
        value_name = "FILE",
        requires = "consul_client_cert"
    )]
    pub consul_client_key: Option<PathBuf>,

    /// Datacenter to read (default: the agent's).
    #[arg(long, env = "CONSUL_DATACENTER", value_name = "DC")]
    pub consul_datacenter: Option<String>,

    /// Consul DNS domain, for ExternalName targets `<name>.service.<domain>`.
    #[arg(
        long,
        env = "RC_CONSUL_DOMAIN",
        default_value = "consul",
        value_name = "DOMAIN"
    )]
    pub consul_domain: String,

    /// Sync only services carrying this tag (all when empty).
    #[arg(long, env = "RC_FILTER_TAG", value_name = "TAG")]
    pub filter_tag: Option<String>,

    /// Services carrying this tag came from Kubernetes and are never synced back; the
    /// Kubernetes → Consul direction puts it on everything it registers.
    #[arg(long, env = "RC_K8S_TAG", default_value = "k8s", value_name = "TAG")]
    pub k8s_tag: String,

    /// Kubernetes → Consul: the synthetic Consul node every registered instance lives on
    /// (consul-k8s's -consul-node-name).
    #[arg(
        long,
        env = "RC_CONSUL_NODE_NAME",
        default_value = "k8s-sync",
        value_name = "NODE"
    )]
    pub consul_node_name: String,

    /// Instance tag `<prefix-tag>=<p>` also publishes the instance under `<p>-<name>-<s>`.
    #[arg(long, env = "RC_PREFIX_TAG", value_name = "TAG")]
    pub prefix_tag: Option<String>,

    /// Instance tag `<suffix-tag>=<s>`, see --prefix-tag.
    #[arg(long, env = "RC_SUFFIX_TAG", value_name = "TAG")]
    pub suffix_tag: Option<String>,

    /// How long Consul may hold a blocking query open when nothing changes. Unset: 5m,
    /// and 10m (Consul's maximum) for the per-service long polls over HTTPS, whose
    /// HTTP/2 connections pings keep alive; each idle long poll costs one request per
    /// wait. Lower it when a proxy in front of Consul ends requests idle for less.
    #[arg(long, env = "RC_CONSUL_WAIT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub consul_wait: Option<std::time::Duration>,

    /// Most connections open to the Consul agent at once. Unset: half of the agent's
    /// limits.http_max_conns_per_client (read from /v1/agent/self; Consul's default 200
    /// when it will not say), so that a restarted connector fits beside its
    /// predecessor's lingering long polls. Over HTTPS (HTTP/2) each connection carries
    /// 200 long polls; over plain HTTP one, and services beyond the budget are followed
    /// through catalog-wide watches. 0 means no limit.
    #[arg(long, env = "RC_CONSUL_MAX_CONNECTIONS", value_name = "N")]
    pub consul_max_connections: Option<usize>,

    /// Long polls per HTTP/2 connection over HTTPS. Keep it below the stream limit of
    /// whatever answers: Consul allows 250; a proxy in front of it may allow fewer
    /// (nginx and AWS load balancers 128, HAProxy 100).
    #[arg(long, env = "RC_CONSUL_HTTP2_STREAMS", default_value_t = crate::registry::consul::budget::STREAMS_PER_CONNECTION, value_name = "N")]
    pub consul_http2_streams: usize,
}

impl ConsulArgs {
    /// The Kubernetes → Consul writer's settings.
    pub fn writer_config(
        &self,
        connector_id: &str,
    ) -> crate::registry::consul::writer::ConsulWriterConfig {
        crate::registry::consul::writer::ConsulWriterConfig {
            connector_id: connector_id.to_string(),
            node_name: self.consul_node_name.trim().to_string(),
            k8s_tag: self.k8s_tag.trim().to_string(),
            wait: self
                .consul_wait
                .unwrap_or(crate::registry::consul::ConsulConfig::default().wait),
        }
    }

    /// The source's configuration from its flags and the shared selection flags
    /// (defaults for what has no flag).
    pub fn to_config(
        &self,
        shared: &super::source_args::SourceArgs,
    ) -> anyhow::Result<crate::registry::consul::ConsulConfig> {
        let mut cfg = crate::registry::consul::ConsulConfig::new(self.consul_http_addr.clone());
        cfg.token = self
            .consul_token
            .as_ref()
            .map(|t| t.expose_secret().to_string())
            .filter(|t| !t.is_empty());
        cfg.token_file = self.consul_token_file.clone();
        cfg.ca_file = self.consul_ca_file.clone();
        cfg.client_cert_file = self.consul_client_cert.clone();
        cfg.client_key_file = self.consul_client_key.clone();
        cfg.datacenter = self.consul_datacenter.clone().filter(|d| !d.is_empty());
        cfg.consul_domain = self.consul_domain.clone();
        cfg.filter_tag = self.filter_tag.clone().filter(|t| !t.is_empty());
        cfg.k8s_tag = self.k8s_tag.clone();
        cfg.passing_only = shared.passing_only;
        cfg.prefix_tag = self.prefix_tag.clone().filter(|t| !t.is_empty());
        cfg.suffix_tag = self.suffix_tag.clone().filter(|t| !t.is_empty());
        cfg.service_prefix = shared.service_prefix.clone();
        if let Some(wait) = self.consul_wait {
            cfg.wait = wait;
            cfg.http2_poll_wait = wait;
        }
        cfg.max_connections =
            crate::registry::consul::MaxConnections::from_flag(self.consul_max_connections);
        cfg.http2_streams = self.consul_http2_streams;
        cfg.metadata = shared.metadata_allow_list()?;
        Ok(cfg)
    }
}
