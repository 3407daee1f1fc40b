//! Command-line interface. Every flag can also be set through an environment variable
//! (shown in `--help`), so a Deployment can configure it either way.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use super::logging::LogFormat;
use super::source_args::SourceArgs;
use super::sync_args::SyncArgs;

/// Keeps Kubernetes Services and EndpointSlices in sync with a service registry.
#[derive(Debug, Parser)]
#[command(name = "registry-connector", version, about, long_about = None)]
pub struct Cli {
    /// Log output: plain (for people) or json (for log pipelines).
    #[arg(
        long,
        global = true,
        env = "RC_LOG_FORMAT",
        default_value = "plain",
        value_enum
    )]
    pub log_format: LogFormat,

    /// Log level or tracing filter (e.g. info, debug, registry_connector=debug);
    /// RUST_LOG wins when set.
    #[arg(long, global = true, env = "RC_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Sync Consul services into Kubernetes (and, with --sync, Kubernetes Services into
    /// Consul).
    Consul(Box<ConsulCommand>),
    /// Sync Eureka applications into Kubernetes (and, with --sync, Kubernetes Services
    /// into Eureka).
    Eureka(Box<EurekaCommand>),
    /// Sync Nacos 2.x services into Kubernetes (pushed over gRPC).
    Nacos(Box<NacosCommand>),
    /// Sync ZooKeeper services into Kubernetes: Dubbo providers or Curator (Spring Cloud
    /// Zookeeper) instances, watched.
    Zookeeper(Box<ZookeeperCommand>),
    /// Delete every Service, EndpointSlice and Endpoints object that one connector
    /// instance owns in a namespace, and nothing else.
    Purge(PurgeCommand),
}

#[derive(Debug, Args)]
pub struct PurgeCommand {
    /// Kubeconfig file; without it, the in-cluster service account (or ~/.kube/config).
    #[arg(long, env = "KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<std::path::PathBuf>,

    /// Namespace to purge.
    #[arg(long, short = 'n', env = "RC_NAMESPACE", value_name = "NS")]
    pub namespace: String,

    /// The connector instance whose objects are deleted.
    #[arg(
        long,
        env = "RC_CONNECTOR_ID",
        default_value = "default",
        value_name = "ID"
    )]
    pub connector_id: String,
}

#[derive(Debug, Args)]
pub struct ConsulCommand {
    #[command(flatten)]
    pub consul: super::consul_args::ConsulArgs,

    #[command(flatten)]
    pub source: SourceArgs,

    #[command(flatten)]
    pub sync: SyncArgs,

    #[command(flatten)]
    pub export: super::export_args::ExportArgs,

    #[command(flatten)]
    pub operation: OperationArgs,
}

/// The same shared flag sets as [`ConsulCommand`], with Eureka's own in front.
#[derive(Debug, Args)]
pub struct EurekaCommand {
    #[command(flatten)]
    pub eureka: super::eureka_args::EurekaArgs,

    #[command(flatten)]
    pub source: SourceArgs,

    #[command(flatten)]
    pub sync: SyncArgs,

    #[command(flatten)]
    pub export: super::export_args::ExportArgs,

    #[command(flatten)]
    pub operation: OperationArgs,
}

/// The shared selection, Kubernetes and operation flags with Nacos's own in front; no
/// `--sync` yet (only the Nacos → Kubernetes direction exists).
#[derive(Debug, Args)]
pub struct NacosCommand {
    #[command(flatten)]
    pub nacos: super::nacos_args::NacosArgs,

    #[command(flatten)]
    pub source: SourceArgs,

    #[command(flatten)]
    pub sync: SyncArgs,

    #[command(flatten)]
    pub operation: OperationArgs,
}

/// The same shared flag sets as [`ConsulCommand`], with ZooKeeper's own in front.
#[derive(Debug, Args)]
pub struct ZookeeperCommand {
    #[command(flatten)]
    pub zookeeper: super::zookeeper_args::ZookeeperArgs,

    #[command(flatten)]
    pub source: SourceArgs,

    #[command(flatten)]
    pub sync: SyncArgs,

    #[command(flatten)]
    pub export: super::export_args::ExportArgs,

    #[command(flatten)]
    pub operation: OperationArgs,
}

/// How the process runs: admin endpoints and leader election.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Operation")]
pub struct OperationArgs {
    /// Address of the admin server (/healthz, /readyz, /metrics); "off" disables it.
    #[arg(long, env = "RC_ADMIN_ADDR", default_value = "127.0.0.1:9090", value_parser = parse_admin_addr, value_name = "ADDR")]
    pub admin_addr: AdminAddr,

    /// Elect a leader through a Lease so that several replicas can run; only the
    /// holder writes.
    #[arg(long, env = "RC_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub leader_elect: bool,

    /// Name of the Lease.
    #[arg(
        long,
        env = "RC_LEASE_NAME",
        default_value = "registry-connector",
        value_name = "NAME"
    )]
    pub lease_name: String,

    /// Namespace of the Lease (default: POD_NAMESPACE, else the sync namespace).
    #[arg(long, env = "POD_NAMESPACE", value_name = "NS")]
    pub lease_namespace: Option<String>,

    /// This process's identity in the Lease (default: POD_NAME, else hostname plus a
    /// random suffix).
    #[arg(long, value_name = "ID")]
    pub lease_holder: Option<String>,

    /// How long a lease stays valid without renewal.
    #[arg(long, env = "RC_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub lease_duration: Duration,

    /// Read the registry and the cluster, print the writes a sync would make, write
    /// nothing, and exit.
    #[arg(long, env = "RC_DRY_RUN", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub dry_run: bool,

    /// Like --dry-run, and also print, for each update, the fields that would change.
    #[arg(long, default_value_t = false)]
    pub diff: bool,

    /// On shutdown, delete every object this connector instance owns (only the lease
    /// holder does, so a rolling update of a replicated Deployment never purges).
    #[arg(long, env = "RC_PURGE_ON_EXIT", default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub purge_on_exit: bool,

    /// Remove everything this connector instance owns in the directions --sync names
    /// (its Kubernetes objects; its registry registrations), then exit.
    #[arg(long, default_value_t = false)]
    pub purge: bool,

    /// How often the holder renews its lease.
    #[arg(long, env = "RC_LEASE_RENEW_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub lease_renew_interval: Duration,
}

/// Where the admin server listens, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminAddr(pub Option<SocketAddr>);

fn parse_admin_addr(s: &str) -> Result<AdminAddr, String> {
    if s.eq_ignore_ascii_case("off") || s.is_empty() {
        return Ok(AdminAddr(None));
    }
    s.parse()
        .map(|a| AdminAddr(Some(a)))
        .map_err(|e| format!("{s:?} is not IP:PORT: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_and_booleans_parse_like_an_operator_writes_them() {
        let cli = Cli::try_parse_from([
            "registry-connector",
            "consul",
            "--namespace",
            "apps",
            "--quiet-period",
            "200ms",
            "--endpoints=false",
            "--admin-addr",
            "off",
        ])
        .expect("parses");
        let Command::Consul(cmd) = cli.command else {
            panic!("consul command expected");
        };
        assert_eq!(cmd.sync.quiet_period, Duration::from_millis(200));
        assert_eq!(cmd.sync.max_period, Duration::from_secs(5));
        assert!(!cmd.sync.endpoints);
        assert_eq!(cmd.operation.admin_addr, AdminAddr(None));
        assert_eq!(cmd.sync.connector_id, "default");
    }

    #[test]
    fn both_sources_share_the_selection_and_sync_flags() {
        let common = [
            "--namespace",
            "apps",
            "--passing-only=false",
            "--service-prefix",
            "reg-",
            "--quiet-period",
            "300ms",
            "--leader-elect=false",
        ];
        let consul =
            Cli::try_parse_from(["registry-connector", "consul"].into_iter().chain(common))
                .expect("consul parses");
        let Command::Consul(consul) = consul.command else {
            panic!("consul command expected");
        };
        let eureka = Cli::try_parse_from(
            [
                "registry-connector",
                "eureka",
                "--eureka-url",
                "http://127.0.0.1:1/eureka",
            ]
            .into_iter()
            .chain(common)
            .chain([
                "--filter-metadata",
                "team=blue",
                "--filter-metadata",
                "env=prod",
            ]),
        )
        .expect("eureka parses");
        let Command::Eureka(eureka) = eureka.command else {
            panic!("eureka command expected");
        };
        for (source, sync, operation) in [
            (&consul.source, &consul.sync, &consul.operation),
            (&eureka.source, &eureka.sync, &eureka.operation),
        ] {
            assert!(!source.passing_only);
            assert_eq!(source.service_prefix, "reg-");
            assert_eq!(sync.quiet_period, Duration::from_millis(300));
            assert!(!operation.leader_elect);
        }
        let cfg = eureka.eureka.to_config(&eureka.source).expect("valid");
        assert_eq!(cfg.poll_interval, Duration::from_secs(5));
        assert!(!cfg.passing_only);
        assert_eq!(
            cfg.filter_metadata,
            [
                ("team".to_string(), "blue".to_string()),
                ("env".into(), "prod".into())
            ]
        );
        let parse = |filter: &str| {
            let cli = Cli::try_parse_from([
                "registry-connector",
                "eureka",
                "-n",
                "x",
                "--filter-metadata",
                filter,
            ])
            .expect("parses");
            let Command::Eureka(cmd) = cli.command else {
                panic!("eureka command expected");
            };
            cmd.eureka.to_config(&cmd.source)
        };
        assert!(parse("nokey").is_err(), "not KEY=VALUE");
        let trailing = parse("team=blue,").expect("a trailing comma is harmless");
        assert_eq!(trailing.filter_metadata.len(), 1);
    }

    #[test]
    fn debug_of_the_parsed_flags_shows_no_secret() {
        let consul = Cli::try_parse_from([
            "registry-connector",
            "consul",
            "--namespace",
            "apps",
            "--consul-token",
            "tok-3f9a",
        ])
        .expect("consul flags");
        let eureka = Cli::try_parse_from([
            "registry-connector",
            "eureka",
            "--namespace",
            "apps",
            "--eureka-url",
            "http://reader:pw-in-url@127.0.0.1:8761/eureka",
            "--eureka-username",
            "reader",
            "--eureka-password",
            "pw-flag",
        ])
        .expect("eureka flags");
        let shown = format!("{consul:?} {eureka:?}");
        for secret in ["tok-3f9a", "pw-in-url", "pw-flag"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(
            shown.contains("127.0.0.1:8761"),
            "the URL stays readable: {shown}"
        );
        let Command::Eureka(cmd) = eureka.command else {
            panic!("not the eureka command")
        };
        let cfg = cmd.eureka.to_config(&cmd.source).expect("config");
        assert_eq!(
            cfg.password.as_deref(),
            Some("pw-flag"),
            "the value itself is kept"
        );
    }

    #[test]
    fn the_nacos_command_takes_its_flags_and_the_shared_ones() {
        let cli = Cli::try_parse_from([
            "registry-connector",
            "nacos",
            "-n",
            "apps",
            "--nacos-addr",
            "127.0.0.1:8848,127.0.0.2:8848",
            "--nacos-groups",
            "A,B",
            "--nacos-clusters",
            "SH",
            "--nacos-group-as-suffix",
            "--nacos-password",
            "pw-77d1",
            "--nacos-username",
            "reader",
            "--passing-only=false",
            "--filter-metadata",
            "team=blue",
        ])
        .expect("parses");
        assert!(
            !format!("{cli:?}").contains("pw-77d1"),
            "no secret in Debug"
        );
        let Command::Nacos(cmd) = cli.command else {
            panic!("nacos command expected");
        };
        let cfg = cmd.nacos.to_config(&cmd.source).expect("valid");
        assert_eq!(cfg.addrs, ["127.0.0.1:8848", "127.0.0.2:8848"]);
        assert_eq!(
            cfg.groups,
            crate::registry::nacos::Groups::Named(vec!["A".into(), "B".into()])
        );
        assert_eq!(cfg.clusters, ["SH"]);
        assert!(cfg.group_as_suffix);
        assert!(!cfg.passing_only);
        assert_eq!(cfg.namespace, "public");
        assert_eq!(cfg.service_list_interval, Duration::from_secs(30));
        assert_eq!(
            cfg.filter_metadata,
            [("team".to_string(), "blue".to_string())]
        );
        assert_eq!(cfg.password.as_deref(), Some("pw-77d1"));
    }

    #[test]
    fn the_zookeeper_command_takes_its_flags_and_the_shared_ones() {
        let cli = Cli::try_parse_from([
            "registry-connector",
            "zookeeper",
            "-n",
            "apps",
            "--zookeeper-addr",
            "127.0.0.1:2181,127.0.0.2:2181/chroot",
            "--zookeeper-layout",
            "curator",
            "--zookeeper-session-timeout",
            "10s",
            "--zookeeper-digest-user",
            "reader",
            "--zookeeper-digest-password",
            "pw-5e2a",
            "--filter-metadata",
            "team=blue",
            "--service-prefix",
            "zk-",
        ])
        .expect("parses");
        assert!(
            !format!("{cli:?}").contains("pw-5e2a"),
            "no secret in Debug"
        );
        let Command::Zookeeper(cmd) = cli.command else {
            panic!("zookeeper command expected");
        };
        let cfg = cmd.zookeeper.to_config(&cmd.source).expect("valid");
        assert_eq!(cfg.connect, "127.0.0.1:2181,127.0.0.2:2181/chroot");
        assert_eq!(cfg.layout, crate::registry::zookeeper::Layout::Curator);
        assert_eq!(cfg.base_path, "/services", "the layout's default");
        assert_eq!(cfg.session_timeout, Duration::from_secs(10));
        assert_eq!(cfg.digest_password.as_deref(), Some("pw-5e2a"));
        assert_eq!(cfg.service_prefix, "zk-");
        assert!(cfg.passing_only);
        assert_eq!(
            cfg.filter_metadata,
            [("team".to_string(), "blue".to_string())]
        );
        let dubbo = Cli::try_parse_from([
            "registry-connector",
            "zookeeper",
            "-n",
            "apps",
            "--dubbo-service-by",
            "application",
        ])
        .expect("parses");
        let Command::Zookeeper(cmd) = dubbo.command else {
            panic!("zookeeper command expected");
        };
        let cfg = cmd.zookeeper.to_config(&cmd.source).expect("valid");
        assert_eq!(cfg.base_path, "/dubbo");
        assert_eq!(
            cfg.dubbo_service_by,
            crate::registry::zookeeper::DubboServiceBy::Application
        );
    }

    #[test]
    fn the_namespace_is_required() {
        let err = Cli::try_parse_from(["registry-connector", "consul"]).expect_err("must fail");
        assert!(err.to_string().contains("--namespace"), "{err}");
    }
}
