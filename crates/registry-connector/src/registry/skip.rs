//! Why a source left a registry instance out: the reasons every source shares, with the
//! `reason` label of `registry_rejected_entries_total`.

use crate::model::AddrError;

/// Why an instance was left out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkipReason {
    /// The registry gives no address for the instance.
    #[error("no address")]
    NoAddress,
    /// The address is one Kubernetes refuses in an EndpointSlice.
    #[error(transparent)]
    Address(#[from] AddrError),
    /// A port is 0 or out of range.
    #[error("port {0} is not in 1..=65535")]
    Port(i64),
    /// The instance offers no port at all (Eureka: neither `port` nor `securePort` is
    /// enabled).
    #[error("no enabled port")]
    NoPort,
}

impl SkipReason {
    /// The `reason` label of the rejected-entries metric.
    pub fn as_label(&self) -> &'static str {
        match self {
            Self::NoAddress => "no_address",
            Self::Address(e) => e.reason.as_label(),
            Self::Port(_) => "invalid_port",
            Self::NoPort => "no_enabled_port",
        }
    }
}
