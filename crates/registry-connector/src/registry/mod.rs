//! Registry sources: one adapter per registry, each feeding the [`crate::catalog`].
//!
//! A source knows its registry's API and nothing about Kubernetes. It delivers one
//! complete snapshot with [`crate::catalog::Catalog::replace_all`] once it has every
//! selected service's instances (that first call is what allows deletions downstream),
//! then single changes with `upsert` / `remove`. Transient registry errors are retried
//! inside the source, never surfaced to the caller: a source returns only on shutdown
//! or on a configuration error found at start.
//!
//! This module also holds what every source needs and no registry owns: the pacing of
//! a watch loop ([`pacer`]), what was already reported as left out ([`reported`]) and
//! the file-descriptor limit that long polls run into.

pub mod consul;
pub mod eureka;
pub mod metadata;
pub mod metrics;
pub mod nacos;
pub mod pacer;
pub mod packed;
pub mod reported;
pub mod secret;
pub mod skip;
pub mod tls;
pub mod zookeeper;

pub use pacer::{retry_until_ok, Pacer, PacerConfig};
pub use skip::SkipReason;

use std::future::Future;
use std::sync::{Arc, RwLock};

use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;

/// What the runtime needs of a registry source: its name, its metrics, and a run that
/// feeds the catalog until shutdown (see the module documentation for the contract).
pub trait RegistrySource: Send + 'static {
    /// The `source` label and log name (`consul`, `eureka`).
    const NAME: &'static str;
    /// Configuration errors found at start; transient errors never end `run`.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Registers the source's metrics in the process's registry.
    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry);

    /// What the source wants `/readyz` to add to its answer (a degraded mode); none by
    /// default.
    fn note(&self) -> SourceNote {
        SourceNote::default()
    }

    /// Feeds `catalog` until `shutdown` is cancelled.
    fn run(
        self,
        catalog: Arc<Catalog>,
        shutdown: CancellationToken,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// One line a source wants operators to see in `/readyz` while it lasts (a degraded
/// watch mode, say), shared between the source that sets it and the admin server.
#[derive(Clone, Debug, Default)]
pub struct SourceNote(Arc<RwLock<Option<String>>>);

impl SourceNote {
    pub fn set(&self, note: Option<String>) {
        let mut slot = self.0.write().unwrap_or_else(|e| e.into_inner());
        if *slot != note {
            *slot = note;
        }
    }

    pub fn get(&self) -> Option<String> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// An error answer's body, trimmed and cut to 512 characters, for an error message.
pub fn error_body(body: &[u8]) -> String {
    const MAX_ERROR_BODY: usize = 512;
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(MAX_ERROR_BODY) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

/// An error with its sources, `: `-separated, for one log field.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The soft and hard `RLIMIT_NOFILE` after [`raise_nofile_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit before the call.
    pub before: u64,
    /// The soft limit now in force.
    pub soft: u64,
    /// The hard limit (the ceiling an unprivileged process can raise to).
    pub hard: u64,
}

/// Raises the soft limit on open files to the hard limit when it is lower.
///
/// Sources that hold one long poll per watched service need one socket each: 10,000
/// services are 10,000 descriptors, while many systems start processes with a soft limit
/// of 1024 and a much higher hard limit. Raising soft to hard is what the Go runtime
/// does for every Go program since 1.19, so the Go original got it for free. Never
/// lowers anything; on platforms without `RLIMIT_NOFILE` it reports the limit as
/// unlimited.
pub fn raise_nofile_limit() -> std::io::Result<NofileLimit> {
    use rlimit::Resource;
    if !Resource::NOFILE.is_supported() {
        return Ok(NofileLimit {
            before: u64::MAX,
            soft: u64::MAX,
            hard: u64::MAX,
        });
    }
    let (before, hard) = Resource::NOFILE.get()?;
    if before < hard {
        rlimit::increase_nofile_limit(hard)?;
    }
    let (soft, hard) = Resource::NOFILE.get()?;
    Ok(NofileLimit { before, soft, hard })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_the_nofile_limit_never_lowers_it() {
        let limit = raise_nofile_limit().expect("getrlimit works on the test machine");
        assert!(limit.soft >= limit.before);
        assert!(limit.soft <= limit.hard);
        // Idempotent: a second call finds nothing to raise.
        let again = raise_nofile_limit().expect("second call");
        assert_eq!(again.before, limit.soft);
        assert_eq!(again.soft, limit.soft);
    }
}
