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

    /// Registry metadata keys copied onto each Service as labels (comma-separated; a
    /// key is copied when all instances that have it agree on a valid label value).
    #[arg(
        long,
        env = "RC_METADATA_LABELS",
        value_delimiter = ',',
        value_name = "KEY"
    )]
    pub metadata_labels: Vec<String>,

    /// Registry metadata keys copied onto each Service as annotations (comma-separated).
    #[arg(
        long,
        env = "RC_METADATA_ANNOTATIONS",
        value_delimiter = ',',
        value_name = "KEY"
    )]
    pub metadata_annotations: Vec<String>,
}

impl SourceArgs {
    /// The metadata allow-list from the flags; a bad key fails the start.
    pub fn metadata_allow_list(
        &self,
    ) -> anyhow::Result<crate::registry::metadata::MetadataAllowList> {
        let keys = |list: &[String]| -> Vec<String> {
            list.iter()
                .map(|k| k.trim().to_string())
                .filter(|k| !k.is_empty())
                .collect()
        };
        crate::registry::metadata::MetadataAllowList::new(
            keys(&self.metadata_labels),
            keys(&self.metadata_annotations),
        )
        .map_err(|e| anyhow::anyhow!("--metadata-labels / --metadata-annotations: {e}"))
    }
}
