//! The Eureka command's own flags: where the servers are, credentials, TLS, polling and
//! the metadata filter.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use secrecy::{ExposeSecret, SecretString};

use super::secret_args::{secret, UrlList};
use super::source_args::SourceArgs;
use crate::registry::eureka::config::EurekaConfig;
use crate::registry::metadata::parse_metadata_filters;

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Eureka")]
pub struct EurekaArgs {
    /// Eureka service URL as a client's defaultZone writes it
    /// (http://host:8761/eureka); comma-separated for several peers, tried in order.
    // The environment's value is hidden from --help: a URL may carry credentials.
    #[arg(
        long,
        env = "EUREKA_URL",
        hide_env_values = true,
        default_value = "http://127.0.0.1:8761/eureka",
        value_name = "URL"
    )]
    pub eureka_url: UrlList,

    /// Basic-auth user (credentials in the URL are used when this is not set).
    #[arg(long, env = "EUREKA_USERNAME", value_name = "USER")]
    pub eureka_username: Option<String>,

    /// Basic-auth password (prefer --eureka-password-file or the environment: flags
    /// show in `ps`).
    #[arg(
        long,
        env = "EUREKA_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD",
        value_parser = secret
    )]
    pub eureka_password: Option<SecretString>,

    /// File holding the basic-auth password.
    #[arg(long, env = "EUREKA_PASSWORD_FILE", value_name = "FILE")]
    pub eureka_password_file: Option<PathBuf>,

    /// CA certificate(s) to verify the servers' TLS certificates (https URLs).
    #[arg(long, env = "EUREKA_CACERT", value_name = "FILE")]
    pub eureka_ca_file: Option<PathBuf>,

    /// Client certificate for mutual TLS.
    #[arg(
        long,
        env = "EUREKA_CLIENT_CERT",
        value_name = "FILE",
        requires = "eureka_client_key"
    )]
    pub eureka_client_cert: Option<PathBuf>,

    /// Client key for mutual TLS.
    #[arg(
        long,
        env = "EUREKA_CLIENT_KEY",
        value_name = "FILE",
        requires = "eureka_client_cert"
    )]
    pub eureka_client_key: Option<PathBuf>,

    /// How often to read the registry's changes (a full read only when they do not
    /// add up to the server's hash code).
    #[arg(long, env = "RC_EUREKA_POLL_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub eureka_poll_interval: Duration,

    /// Read the whole registry this often even when deltas reconcile (a safety net for
    /// changes the hash code cannot see); 0s turns it off.
    #[arg(long, env = "RC_EUREKA_FULL_FETCH_INTERVAL", default_value = "10m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub eureka_full_fetch_interval: Duration,

    /// Timeout of one request to Eureka.
    #[arg(long, env = "RC_EUREKA_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub eureka_request_timeout: Duration,

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

impl EurekaArgs {
    /// The source's configuration from its flags and the shared selection flags.
    pub fn to_config(&self, shared: &SourceArgs) -> anyhow::Result<EurekaConfig> {
        let mut cfg = EurekaConfig::new(self.eureka_url.0.clone());
        cfg.username = self.eureka_username.clone().filter(|u| !u.is_empty());
        cfg.password = self
            .eureka_password
            .as_ref()
            .map(|p| p.expose_secret().to_string())
            .filter(|p| !p.is_empty());
        cfg.password_file = self.eureka_password_file.clone();
        cfg.ca_file = self.eureka_ca_file.clone();
        cfg.client_cert_file = self.eureka_client_cert.clone();
        cfg.client_key_file = self.eureka_client_key.clone();
        cfg.poll_interval = self.eureka_poll_interval;
        cfg.request_timeout = self.eureka_request_timeout;
        cfg.full_fetch_interval = self.eureka_full_fetch_interval;
        cfg.filter_metadata = parse_metadata_filters(&self.filter_metadata)
            .map_err(|e| anyhow::anyhow!("--filter-metadata: {e}"))?;
        cfg.passing_only = shared.passing_only;
        cfg.service_prefix = shared.service_prefix.clone();
        cfg.metadata = shared.metadata_allow_list()?;
        Ok(cfg)
    }
}
