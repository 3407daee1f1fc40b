//! The ZooKeeper command's own flags: the connect string, the tree and its layout, the
//! session timeout, digest authentication, TLS and the metadata filter.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use secrecy::{ExposeSecret, SecretString};

use super::secret_args::secret;
use super::source_args::SourceArgs;
use crate::registry::metadata::parse_metadata_filters;
use crate::registry::zookeeper::config::{DubboServiceBy, Layout, ZookeeperConfig};

/// `--zookeeper-layout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LayoutArg {
    /// Dubbo's interface-level registry: BASE/INTERFACE/providers/URL.
    Dubbo,
    /// Apache Curator service discovery (Spring Cloud Zookeeper, Dubbo 3 application
    /// level): BASE/NAME/ID holding a JSON instance.
    Curator,
}

/// `--dubbo-service-by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ServiceByArg {
    /// One Service per Dubbo interface; its versions and groups in annotations.
    Interface,
    /// One Service per Dubbo service key (group/interface:version): each version and
    /// group of an interface apart.
    ServiceKey,
    /// One Service per Dubbo application.
    Application,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "ZooKeeper")]
pub struct ZookeeperArgs {
    /// The ensemble's connect string: host:port, comma-separated for several servers,
    /// optionally followed by a chroot (/path); or a Dubbo registry address
    /// (zookeeper://host:port?backup=host:port,...).
    #[arg(
        long,
        env = "ZOOKEEPER_ADDR",
        default_value = "127.0.0.1:2181",
        value_name = "CONNECT"
    )]
    pub zookeeper_addr: String,

    /// The tree to watch; default /dubbo for the dubbo layout, /services for curator.
    #[arg(long, env = "RC_ZOOKEEPER_BASE_PATH", value_name = "PATH")]
    pub zookeeper_base_path: Option<String>,

    /// How the services are laid out below the base path.
    #[arg(
        long,
        env = "RC_ZOOKEEPER_LAYOUT",
        value_enum,
        default_value = "dubbo",
        value_name = "LAYOUT"
    )]
    pub zookeeper_layout: LayoutArg,

    /// The session timeout asked of ZooKeeper (the server keeps it within 2 and 20 of
    /// its ticks); an expired session is followed by a new one and a complete read.
    #[arg(long, env = "RC_ZOOKEEPER_SESSION_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub zookeeper_session_timeout: Duration,

    /// User of ZooKeeper's `digest` authentication (for trees with digest ACLs).
    #[arg(long, env = "ZOOKEEPER_DIGEST_USER", value_name = "USER")]
    pub zookeeper_digest_user: Option<String>,

    /// Its password (prefer --zookeeper-digest-password-file or the environment: flags
    /// show in `ps`).
    #[arg(
        long,
        env = "ZOOKEEPER_DIGEST_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD",
        value_parser = secret
    )]
    pub zookeeper_digest_password: Option<SecretString>,

    /// File holding the digest password.
    #[arg(long, env = "ZOOKEEPER_DIGEST_PASSWORD_FILE", value_name = "FILE")]
    pub zookeeper_digest_password_file: Option<PathBuf>,

    /// CA certificate(s) to verify the servers' certificates: TLS to ZooKeeper's secure
    /// client port is on when this is given.
    #[arg(long, env = "ZOOKEEPER_CACERT", value_name = "FILE")]
    pub zookeeper_ca_file: Option<PathBuf>,

    /// Client certificate for mutual TLS (ssl.clientAuth=need).
    #[arg(
        long,
        env = "ZOOKEEPER_CLIENT_CERT",
        value_name = "FILE",
        requires = "zookeeper_client_key"
    )]
    pub zookeeper_client_cert: Option<PathBuf>,

    /// Client key for mutual TLS.
    #[arg(
        long,
        env = "ZOOKEEPER_CLIENT_KEY",
        value_name = "FILE",
        requires = "zookeeper_client_cert"
    )]
    pub zookeeper_client_key: Option<PathBuf>,

    /// What one Kubernetes Service stands for in the dubbo layout.
    #[arg(
        long,
        env = "RC_DUBBO_SERVICE_BY",
        value_enum,
        default_value = "interface",
        value_name = "BY"
    )]
    pub dubbo_service_by: ServiceByArg,

    /// Sync only providers / instances whose metadata (Dubbo URL parameters, Curator
    /// payload metadata) holds KEY=VALUE (repeatable: all must match; comma-separated in
    /// the environment).
    #[arg(
        long,
        env = "RC_FILTER_METADATA",
        value_delimiter = ',',
        value_name = "KEY=VALUE"
    )]
    pub filter_metadata: Vec<String>,
}

impl ZookeeperArgs {
    /// The source's configuration from its flags and the shared selection flags.
    pub fn to_config(&self, shared: &SourceArgs) -> anyhow::Result<ZookeeperConfig> {
        let mut cfg = ZookeeperConfig::new(self.zookeeper_addr.trim());
        cfg.layout = match self.zookeeper_layout {
            LayoutArg::Dubbo => Layout::Dubbo,
            LayoutArg::Curator => Layout::Curator,
        };
        cfg.base_path = self
            .zookeeper_base_path
            .as_deref()
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .unwrap_or(cfg.layout.default_base_path())
            .to_string();
        cfg.dubbo_service_by = match self.dubbo_service_by {
            ServiceByArg::Interface => DubboServiceBy::Interface,
            ServiceByArg::ServiceKey => DubboServiceBy::ServiceKey,
            ServiceByArg::Application => DubboServiceBy::Application,
        };
        cfg.session_timeout = self.zookeeper_session_timeout;
        cfg.digest_user = self.zookeeper_digest_user.clone();
        cfg.digest_password = self
            .zookeeper_digest_password
            .as_ref()
            .map(|p| p.expose_secret().to_string());
        cfg.digest_password_file = self.zookeeper_digest_password_file.clone();
        cfg.ca_file = self.zookeeper_ca_file.clone();
        cfg.client_cert_file = self.zookeeper_client_cert.clone();
        cfg.client_key_file = self.zookeeper_client_key.clone();
        cfg.filter_metadata = parse_metadata_filters(&self.filter_metadata)
            .map_err(|e| anyhow::anyhow!("--filter-metadata: {e}"))?;
        cfg.passing_only = shared.passing_only;
        cfg.service_prefix = shared.service_prefix.clone();
        cfg.metadata = shared.metadata_allow_list()?;
        Ok(cfg)
    }
}
