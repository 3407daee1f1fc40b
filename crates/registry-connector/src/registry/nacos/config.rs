//! What the Nacos source is told: where the servers are, which namespace, groups and
//! clusters, how to log in, what to select and how often to list services.
//!
//! Plain data with defaults; the command line maps onto it in `runtime::nacos_args`.
//! The password is a secret: `Debug` prints `<redacted>` in its place.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::registry::metadata::MetadataAllowList;
use crate::registry::PacerConfig;

use super::error::NacosError;

/// Which groups are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Groups {
    /// These groups, in this order (the first one wins a name two of them hold).
    Named(Vec<String>),
    /// Every group of the namespace (`*`), found through the HTTP catalog listing: the
    /// gRPC service list is per group and Nacos has no request listing groups.
    All,
}

impl Groups {
    /// Parses `--nacos-groups`: a comma list, or `*`.
    pub fn parse(list: &[String]) -> Result<Self, NacosError> {
        let names: Vec<String> = list
            .iter()
            .flat_map(|g| g.split(','))
            .map(|g| g.trim().to_string())
            .filter(|g| !g.is_empty())
            .collect();
        if names.iter().any(|g| g == "*") {
            if names.len() > 1 {
                return Err(NacosError::Config(
                    "--nacos-groups: `*` stands alone (every group)".into(),
                ));
            }
            return Ok(Self::All);
        }
        if names.is_empty() {
            return Err(NacosError::Config("--nacos-groups names no group".into()));
        }
        let mut unique = Vec::new();
        for g in names {
            if !unique.contains(&g) {
                unique.push(g);
            }
        }
        Ok(Self::Named(unique))
    }

    /// The rank of `group` for choosing between two groups holding one name: its
    /// position in the list, or (for `*`) the group name itself.
    pub fn rank<'a>(&self, group: &'a str) -> (usize, &'a str) {
        match self {
            Self::Named(list) => (
                list.iter().position(|g| g == group).unwrap_or(usize::MAX),
                group,
            ),
            Self::All => (0, group),
        }
    }
}

/// Configuration of the Nacos source.
#[derive(Clone)]
pub struct NacosConfig {
    /// `host:port` of each server's HTTP API (the gRPC port is `port + grpc_port_offset`),
    /// tried in order.
    pub addrs: Vec<String>,
    /// What Nacos clients add to the HTTP port to reach gRPC (1000).
    pub grpc_port_offset: u16,
    /// The namespace (tenant) id.
    pub namespace: String,
    pub groups: Groups,
    /// Only instances of these clusters take part; empty means all.
    pub clusters: Vec<String>,
    pub username: Option<String>,
    /// Never logged.
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    /// How often the service list is read (Nacos pushes instance changes, not new or
    /// removed services).
    pub service_list_interval: Duration,
    /// Publish `name` of group `G` as `name-G` (no collisions between groups).
    pub group_as_suffix: bool,
    /// Timeout of one request.
    pub request_timeout: Duration,
    /// How long a service that became empty stays published: two confirming reads,
    /// half of it apart, must find it empty (longer right after a reconnect, see
    /// `watch`). Longer than a Java client's re-registration after a node restart.
    pub empty_confirm_delay: Duration,
    /// After a (re)connection, how long emptied services wait for their clients to
    /// register again (Nacos loses ephemeral instances on restart).
    pub reconnect_grace: Duration,
    /// Subscriptions in flight at once (start, reconnect).
    pub subscribe_concurrency: usize,
    /// The largest gRPC message read, in bytes (Nacos sends up to 10 MiB).
    pub max_message_size: usize,
    pub passing_only: bool,
    pub filter_metadata: Vec<(String, String)>,
    pub service_prefix: String,
    pub metadata: MetadataAllowList,
    /// Reconnect backoff.
    pub pacing: PacerConfig,
}

impl NacosConfig {
    pub fn new(addrs: Vec<String>) -> Self {
        Self {
            addrs,
            grpc_port_offset: 1000,
            namespace: "public".into(),
            groups: Groups::Named(vec!["DEFAULT_GROUP".into()]),
            clusters: Vec::new(),
            username: None,
            password: None,
            password_file: None,
            service_list_interval: Duration::from_secs(30),
            group_as_suffix: false,
            request_timeout: Duration::from_secs(10),
            empty_confirm_delay: Duration::from_secs(10),
            reconnect_grace: Duration::from_secs(30),
            subscribe_concurrency: 16,
            max_message_size: super::conn::DEFAULT_MAX_MESSAGE_SIZE,
            passing_only: true,
            filter_metadata: Vec::new(),
            service_prefix: String::new(),
            metadata: MetadataAllowList::default(),
            pacing: PacerConfig {
                min_interval: Duration::ZERO,
                ..PacerConfig::default()
            },
        }
    }

    /// Checks what can be checked without contacting Nacos, and returns the gRPC
    /// address of each server.
    pub fn grpc_addrs(&self) -> Result<Vec<String>, NacosError> {
        if self.addrs.is_empty() {
            return Err(NacosError::Config("--nacos-addr names no server".into()));
        }
        self.addrs
            .iter()
            .map(|addr| grpc_addr(addr, self.grpc_port_offset))
            .collect()
    }
}

impl Default for NacosConfig {
    fn default() -> Self {
        Self::new(vec!["127.0.0.1:8848".into()])
    }
}

/// `host:port` → `host:(port + offset)`; IPv6 hosts in brackets.
pub fn grpc_addr(addr: &str, offset: u16) -> Result<String, NacosError> {
    let bad = |why: &str| NacosError::Config(format!("--nacos-addr {addr:?}: {why}"));
    let addr = addr.trim();
    if addr.contains("://") || addr.contains('/') {
        return Err(bad("give host:port, not a URL"));
    }
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    if host.is_empty() || (host.contains(':') && !host.starts_with('[')) {
        return Err(bad("no host (IPv6 addresses go in brackets)"));
    }
    let port: u16 = port.parse().map_err(|_| bad("the port is not a number"))?;
    let grpc = port
        .checked_add(offset)
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("port + gRPC offset is beyond 65535"))?;
    Ok(format!("{host}:{grpc}"))
}

impl fmt::Debug for NacosConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NacosConfig")
            .field("addrs", &self.addrs)
            .field("grpc_port_offset", &self.grpc_port_offset)
            .field("namespace", &self.namespace)
            .field("groups", &self.groups)
            .field("clusters", &self.clusters)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .field("service_list_interval", &self.service_list_interval)
            .field("group_as_suffix", &self.group_as_suffix)
            .field("passing_only", &self.passing_only)
            .field("filter_metadata", &self.filter_metadata)
            .field("service_prefix", &self.service_prefix)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grpc_port_is_the_http_port_plus_the_offset() {
        assert_eq!(grpc_addr("127.0.0.1:8848", 1000).unwrap(), "127.0.0.1:9848");
        assert_eq!(
            grpc_addr("nacos.example:80", 1).unwrap(),
            "nacos.example:81"
        );
        assert_eq!(grpc_addr("[::1]:8848", 1000).unwrap(), "[::1]:9848");
        for bad in ["http://x:1", "x", "::1:8848", ":1", "x:70000", "x:65000"] {
            assert!(grpc_addr(bad, 1000).is_err(), "{bad}");
        }
    }

    #[test]
    fn groups_parse_as_a_list_or_everything() {
        let list = |s: &[&str]| s.iter().map(|g| g.to_string()).collect::<Vec<_>>();
        assert_eq!(
            Groups::parse(&list(&["A, B", "A"])).unwrap(),
            Groups::Named(list(&["A", "B"]))
        );
        assert_eq!(Groups::parse(&list(&["*"])).unwrap(), Groups::All);
        assert!(Groups::parse(&list(&["*", "A"])).is_err());
        assert!(Groups::parse(&list(&[" ,"])).is_err());
        let named = Groups::Named(list(&["B", "A"]));
        assert!(named.rank("B") < named.rank("A"), "the listed order wins");
        assert!(Groups::All.rank("A") < Groups::All.rank("B"));
    }

    #[test]
    fn debug_hides_the_password() {
        let cfg = NacosConfig {
            password: Some("pw-9c1".into()),
            ..NacosConfig::default()
        };
        assert!(!format!("{cfg:?}").contains("pw-9c1"));
    }
}
