//! What can go wrong talking to Nacos. Only [`NacosError::Config`] ends the source (at
//! start); every other error is retried, with the connection reopened when it says so
//! ([`NacosError::is_connection_lost`]).

use super::api::Kind;

#[derive(Debug, thiserror::Error)]
pub enum NacosError {
    #[error("invalid Nacos configuration: {0}")]
    Config(String),
    #[error("the Nacos password")]
    Secret(#[from] crate::registry::secret::SecretError),
    #[error("connecting to Nacos at {server} over gRPC")]
    Connect {
        server: String,
        source: tonic::transport::Error,
    },
    #[error("Nacos {kind} request failed")]
    Rpc {
        kind: &'static str,
        source: tonic::Status,
    },
    #[error("Nacos {kind} request got no answer within {timeout:?}")]
    Timeout {
        kind: &'static str,
        timeout: std::time::Duration,
    },
    #[error("Nacos refused the {kind} request: error code {code}: {message}")]
    Server {
        kind: &'static str,
        code: i64,
        message: String,
    },
    #[error(
        "Nacos does not know this connection (error code 301): it was lost or not yet registered"
    )]
    Unregistered,
    #[error("the connection to Nacos is closed: {0}")]
    Closed(String),
    #[error("decoding the answer to a Nacos {kind} request")]
    Decode {
        kind: &'static str,
        source: serde_json::Error,
    },
    #[error("Nacos HTTP {what} at {url}")]
    Http {
        what: &'static str,
        url: String,
        source: reqwest::Error,
    },
    #[error("Nacos HTTP {what} at {url} answered {status}: {body}")]
    HttpStatus {
        what: &'static str,
        url: String,
        status: u16,
        body: String,
    },
}

impl NacosError {
    pub fn rpc(kind: Kind, source: tonic::Status) -> Self {
        Self::Rpc {
            kind: kind.as_label(),
            source,
        }
    }

    /// Whether the connection has to be opened again (as opposed to one request that
    /// failed on a working connection). An answer larger than the decoding limit
    /// (`OutOfRange`) is a failure of that one request: the connection is fine, and
    /// reopening it would read the same answer again.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Unregistered | Self::Closed(_) | Self::Timeout { .. } => {
                true
            }
            Self::Rpc { source, .. } => matches!(
                source.code(),
                tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
            ),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_too_large_answer_fails_the_request_not_the_connection() {
        let too_large = NacosError::rpc(
            Kind::Subscribe,
            tonic::Status::out_of_range("Error, decoded message length too large"),
        );
        assert!(!too_large.is_connection_lost());
        let gone = NacosError::rpc(Kind::Subscribe, tonic::Status::unavailable("gone"));
        assert!(gone.is_connection_lost());
    }
}
