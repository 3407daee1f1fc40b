//! How a ZooKeeper session is opened, for the source's watch and the writer alike: the
//! connect string, TLS, the session timeout and digest credentials.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use zookeeper_client::Client;

use super::error::ZookeeperError;

/// Everything needed to open a session.
#[derive(Clone)]
pub struct SessionConfig {
    pub connect: String,
    /// TLS to every server of the connect string (`secure_connect`).
    pub tls: Option<zookeeper_client::TlsOptions>,
    pub session_timeout: Duration,
    /// `digest` user and password (never logged).
    pub digest: Option<(String, SecretString)>,
}

impl std::fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionConfig")
            .field("connect", &self.connect)
            .field("tls", &self.tls.is_some())
            .field("session_timeout", &self.session_timeout)
            .field("digest_user", &self.digest.as_ref().map(|(u, _)| u))
            .finish()
    }
}

impl SessionConfig {
    /// Opens a session. A `detached` one is not closed when its last client is dropped:
    /// its ephemeral nodes outlive the process by the session timeout, so that a
    /// successor can take them over without a gap (the writer's sessions).
    pub async fn open(&self, detached: bool) -> Result<Client, ZookeeperError> {
        let mut connector = Client::connector()
            .with_session_timeout(self.session_timeout)
            .with_fail_eagerly();
        if detached {
            connector = connector.with_detached();
        }
        if let Some((user, password)) = &self.digest {
            // Given at connect time, the credentials go again with every reconnection.
            let auth = SecretString::from(format!("{user}:{}", password.expose_secret()));
            connector = connector.with_auth("digest", auth.expose_secret().as_bytes());
        }
        let session = match &self.tls {
            Some(tls) => {
                connector
                    .with_tls(tls.clone())
                    .secure_connect(&self.connect)
                    .await
            }
            None => connector.connect(&self.connect).await,
        };
        session.map_err(|source| ZookeeperError::Connect {
            connect: self.connect.clone(),
            source,
        })
    }
}
