//! The flags every registry source shares: which instances count as serving and how
//! published names are prefixed. One flag set, flattened into each source's command.

use clap::Args;

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Selection")]
pub struct SourceArgs {
    /// Publish only healthy instances (Consul: every check passing; Eureka: status UP);
    /// with false, the others are published as not ready.
    #[arg(long, env = "RC_PASSING_ONLY", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub passing_only: bool,

    /// Prepended to every synced service name.
    #[arg(
        long,
        env = "RC_SERVICE_PREFIX",
        default_value = "",
        value_name = "PREFIX"
    )]
    pub service_prefix: String,
}
