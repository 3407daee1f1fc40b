//! What can go wrong with ZooKeeper. Only [`ZookeeperError::Config`],
//! [`ZookeeperError::Secret`] and the TLS file errors end the source (at start); every other error is logged
//! and retried by the watch loop: a read again on the same session, a new session when
//! the old one is gone ([`ZookeeperError::is_session_lost`]). No variant holds the
//! digest password.

use crate::registry::secret::SecretError;

#[derive(Debug, thiserror::Error)]
pub enum ZookeeperError {
    #[error("invalid ZooKeeper configuration: {0}")]
    Config(String),
    #[error("the ZooKeeper digest password")]
    Secret(#[from] SecretError),
    #[error(transparent)]
    TlsFile(#[from] crate::registry::tls::TlsFileError),
    #[error("invalid TLS material for ZooKeeper ({what})")]
    Tls {
        what: &'static str,
        #[source]
        source: zookeeper_client::Error,
    },
    #[error("opening a ZooKeeper session with {connect}")]
    Connect {
        connect: String,
        #[source]
        source: zookeeper_client::Error,
    },
    #[error("ZooKeeper {op} of {path}")]
    Request {
        op: &'static str,
        path: String,
        #[source]
        source: zookeeper_client::Error,
    },
    #[error("the ZooKeeper session ended ({0:?})")]
    SessionEnded(zookeeper_client::SessionState),
}

impl ZookeeperError {
    pub fn request(op: &'static str, path: &str, source: zookeeper_client::Error) -> Self {
        Self::Request {
            op,
            path: path.to_string(),
            source,
        }
    }

    /// Whether the session is gone for good (expired, closed, refused), so that only a
    /// new one can go on; otherwise the session may still recover (a lost connection
    /// the client re-establishes by itself).
    pub fn is_session_lost(&self) -> bool {
        use zookeeper_client::Error as E;
        match self {
            Self::SessionEnded(_) | Self::Connect { .. } => true,
            Self::Request { source, .. } => matches!(
                source,
                E::SessionExpired | E::SessionMoved | E::ClientClosed | E::AuthFailed | E::NoHosts
            ),
            Self::Config(_) | Self::Secret(_) | Self::TlsFile(_) | Self::Tls { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_connection_keeps_the_session_an_expiry_does_not() {
        let lost =
            ZookeeperError::request("list", "/dubbo", zookeeper_client::Error::ConnectionLoss);
        assert!(!lost.is_session_lost());
        let expired =
            ZookeeperError::request("list", "/dubbo", zookeeper_client::Error::SessionExpired);
        assert!(expired.is_session_lost());
        assert!(expired.to_string().contains("/dubbo"));
    }
}
