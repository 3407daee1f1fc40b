//! What the ZooKeeper source is told: where the ensemble is, which tree and layout to
//! read, how long a session lasts, how to authenticate, and what to select.
//!
//! Plain data with defaults; the command line maps onto it in `runtime::zookeeper_args`.
//! The digest password is a secret: `Debug` prints `<redacted>` in its place.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::registry::metadata::MetadataAllowList;
use crate::registry::PacerConfig;

use super::error::ZookeeperError;

/// How services are laid out below the base path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// Dubbo's interface-level registry: `<base>/<interface>/providers/<URL-encoded
    /// provider URL>`, one node per provider, the URL in the node's name.
    #[default]
    Dubbo,
    /// Apache Curator's service discovery (Spring Cloud Zookeeper, Dubbo 3's
    /// application-level discovery): `<base>/<name>/<id>` holding a JSON instance.
    Curator,
}

impl Layout {
    /// The base path each layout's writers use by default.
    pub fn default_base_path(self) -> &'static str {
        match self {
            Self::Dubbo => "/dubbo",
            Self::Curator => "/services",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dubbo => "dubbo",
            Self::Curator => "curator",
        }
    }
}

/// What one Kubernetes Service stands for in the Dubbo layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DubboServiceBy {
    /// One Service per Dubbo interface, whatever its versions and groups (listed in
    /// annotations): the name a migrating team knows the service by.
    #[default]
    Interface,
    /// One Service per Dubbo service key (`group/interface:version`): each version and
    /// group of an interface apart, since a Dubbo consumer never calls a provider of
    /// another version or group.
    ServiceKey,
    /// One Service per Dubbo application (the providers' `application` parameter): the
    /// processes, whatever interfaces they export.
    Application,
}

/// Configuration of the ZooKeeper source.
#[derive(Clone)]
pub struct ZookeeperConfig {
    /// The connect string: `host:port[,host:port...][/chroot]`.
    pub connect: String,
    /// The root of the tree read (absolute, below the chroot if any).
    pub base_path: String,
    pub layout: Layout,
    pub dubbo_service_by: DubboServiceBy,
    /// The session timeout asked of the server (it clamps it to 2..20 ticks).
    pub session_timeout: Duration,
    /// `digest` authentication: the user, and the password (never logged) inline or in a
    /// file.
    pub digest_user: Option<String>,
    pub digest_password: Option<String>,
    pub digest_password_file: Option<PathBuf>,
    /// TLS to the ensemble's secure client port: on when a CA file is given (the client
    /// has no system roots; ZooKeeper ensembles use private CAs), with an optional
    /// client certificate and key for `ssl.clientAuth=need`.
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// Reads in flight at once while the tree is read.
    pub read_concurrency: usize,
    pub passing_only: bool,
    pub filter_metadata: Vec<(String, String)>,
    pub service_prefix: String,
    pub metadata: MetadataAllowList,
    /// Reconnect backoff.
    pub pacing: PacerConfig,
}

impl ZookeeperConfig {
    pub fn new(connect: impl Into<String>) -> Self {
        Self {
            connect: connect.into(),
            base_path: Layout::Dubbo.default_base_path().to_string(),
            layout: Layout::Dubbo,
            dubbo_service_by: DubboServiceBy::Interface,
            session_timeout: Duration::from_secs(30),
            digest_user: None,
            digest_password: None,
            digest_password_file: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            read_concurrency: 64,
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

    /// Checks what can be checked without contacting ZooKeeper; returns the base path
    /// normalised (no trailing `/`, `/` for the root).
    pub fn checked_base_path(&self) -> Result<String, ZookeeperError> {
        normalize_path(&self.base_path)
    }
}

impl Default for ZookeeperConfig {
    fn default() -> Self {
        Self::new("127.0.0.1:2181")
    }
}

/// The connect string for `addr`: a ZooKeeper connect string as it stands
/// (`host:port[,host:port...][/chroot]`), or a Dubbo registry address as Dubbo
/// applications configure it (`zookeeper://host:port?backup=host:port,host:port`), whose
/// hosts are taken and whose path and other parameters are not (a Dubbo address's path
/// names Dubbo's registry interface, not a chroot). Credentials in the address are
/// refused rather than logged: they go in the digest flags.
pub fn connect_string(addr: &str) -> Result<String, ZookeeperError> {
    let addr = addr.trim();
    let bad = |why: &str| ZookeeperError::Config(format!("--zookeeper-addr: {why}"));
    let connect = match addr.get(..12) {
        Some(scheme) if scheme.eq_ignore_ascii_case("zookeeper://") => {
            let rest = &addr[12..];
            let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
            let hosts = rest.split('/').next().unwrap_or("");
            if hosts.contains('@') {
                return Err(bad(
                    "credentials in the address; give --zookeeper-digest-user and a password file",
                ));
            }
            let backups = query
                .split('&')
                .filter_map(|p| p.strip_prefix("backup="))
                .flat_map(|b| b.split(','))
                .filter(|h| !h.trim().is_empty());
            std::iter::once(hosts)
                .chain(backups)
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(",")
        }
        _ => addr.to_string(),
    };
    if connect.contains("://") {
        return Err(bad(
            "give host:port (or a zookeeper:// address), not another URL",
        ));
    }
    let hosts = connect.split('/').next().unwrap_or("");
    if hosts.is_empty() || hosts.split(',').any(|h| h.trim().is_empty()) {
        return Err(bad(
            "names no server (host:port[,host:port...][/chroot], or zookeeper://host:port)",
        ));
    }
    Ok(connect)
}

/// `path` as ZooKeeper takes it: absolute, no empty, `.` or `..` segment, no trailing
/// `/` except for the root itself.
pub fn normalize_path(path: &str) -> Result<String, ZookeeperError> {
    let bad = |why: &str| ZookeeperError::Config(format!("base path {path:?}: {why}"));
    let trimmed = path.trim();
    if !trimmed.starts_with('/') {
        return Err(bad("must start with /"));
    }
    let body = trimmed.trim_end_matches('/');
    if body.is_empty() {
        return Ok("/".into());
    }
    if body[1..]
        .split('/')
        .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        return Err(bad("has an empty, `.` or `..` segment"));
    }
    Ok(body.to_string())
}

impl fmt::Debug for ZookeeperConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZookeeperConfig")
            .field("connect", &self.connect)
            .field("base_path", &self.base_path)
            .field("layout", &self.layout)
            .field("dubbo_service_by", &self.dubbo_service_by)
            .field("session_timeout", &self.session_timeout)
            .field("digest_user", &self.digest_user)
            .field(
                "digest_password",
                &self.digest_password.as_ref().map(|_| "<redacted>"),
            )
            .field("digest_password_file", &self.digest_password_file)
            .field("ca_file", &self.ca_file)
            .field("client_cert_file", &self.client_cert_file)
            .field("client_key_file", &self.client_key_file)
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
    fn base_paths_are_normalised_or_refused() {
        assert_eq!(normalize_path("/dubbo").unwrap(), "/dubbo");
        assert_eq!(normalize_path(" /a/b/ ").unwrap(), "/a/b");
        assert_eq!(normalize_path("/").unwrap(), "/");
        for bad in ["dubbo", "", "/a//b", "/a/./b", "/a/.."] {
            assert!(normalize_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn connect_strings_and_dubbo_addresses() {
        let ok = |a: &str| connect_string(a).expect(a);
        assert_eq!(ok(" zk-1:2181,zk-2:2181/apps "), "zk-1:2181,zk-2:2181/apps");
        assert_eq!(ok("[2001:db8::1]:2181"), "[2001:db8::1]:2181");
        assert_eq!(
            ok("zookeeper://zk-1:2181?backup=zk-2:2181,zk-3:2181&timeout=5000"),
            "zk-1:2181,zk-2:2181,zk-3:2181"
        );
        assert_eq!(
            ok("ZOOKEEPER://zk-1:2181/org.apache.dubbo.registry.RegistryService"),
            "zk-1:2181",
            "a Dubbo address's path is no chroot"
        );
        for bad in [
            "",
            " ",
            "/chroot",
            "zk-1:2181,,zk-2:2181",
            "http://zk:2181",
            "zookeeper://",
        ] {
            assert!(connect_string(bad).is_err(), "{bad:?}");
        }
        let err = connect_string("zookeeper://admin:s3cr3t@zk-1:2181").unwrap_err();
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
    }

    #[test]
    fn debug_hides_the_password() {
        let cfg = ZookeeperConfig {
            digest_password: Some("pw-77f".into()),
            ..ZookeeperConfig::default()
        };
        assert!(!format!("{cfg:?}").contains("pw-77f"));
    }
}
