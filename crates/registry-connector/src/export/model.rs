//! The registry-neutral shape of what the Kubernetes → registry direction registers.
//!
//! An [`Instance`] is one registry entry as this connector wants it (rendered from
//! Kubernetes objects by [`super::desired`]) or as a registry writer read it back (from
//! the entries it owns). Both sides use the same type so that [`super::plan`] compares
//! like with like: a field the registry cannot store must not be in here, or every
//! comparison would find a difference and every resync would write.

use std::collections::BTreeMap;
use std::fmt;

/// A Kubernetes Service, by namespace and name: the unit of selection, coalescing and
/// retries in this direction.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// `namespace/name`, the key of the coalescer and the retry queue.
    pub fn to_path(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Parses [`ServiceKey::to_path`]'s form.
    pub fn from_path(path: &str) -> Option<Self> {
        let (namespace, name) = path.split_once('/')?;
        (!namespace.is_empty() && !name.is_empty()).then(|| Self::new(namespace, name))
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The health a registry shows for an instance: Kubernetes readiness, nothing more
/// (the connector runs no probes of its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Health {
    /// The endpoint is ready (Consul check passing, Eureka `UP`).
    Passing,
    /// Not ready or terminating (Consul check critical, Eureka `OUT_OF_SERVICE`).
    Critical,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passing => "passing",
            Self::Critical => "critical",
        }
    }
}

/// One registry entry: a service instance at one address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// Stable id, unique in the registry for this connector: derived from the source
    /// Service, the address and the port, so that a restarted connector computes the
    /// same ids and finds its entries unchanged (no deregister-then-register).
    pub id: String,
    /// The registry service (Consul service name, Eureka application).
    pub service: String,
    /// The Kubernetes Service it comes from (stored in the entry's metadata).
    pub source: ServiceKey,
    /// An IP address (v4 or v6, in canonical text form) or a DNS name (ExternalName and
    /// load-balancer hostnames).
    pub address: String,
    /// The main port (the `--registry-port` annotation's, else the Service's first).
    pub port: u16,
    /// Every port by name, the main one included (`port-<name>` metadata).
    pub ports: BTreeMap<String, u16>,
    pub health: Health,
    /// Extra tags from the Service's annotations (sorted, unique); the ownership tag is
    /// the writer's business and not in here.
    pub tags: Vec<String>,
    /// Extra metadata from the Service's annotations; the ownership keys are the
    /// writer's business and not in here.
    pub meta: BTreeMap<String, String>,
}

impl Instance {
    /// Whether two instances differ in anything but their health: such a difference
    /// needs the whole entry written again, a health difference only its status.
    pub fn same_registration(&self, other: &Instance) -> bool {
        self.id == other.id
            && self.service == other.service
            && self.source == other.source
            && self.address == other.address
            && self.port == other.port
            && self.ports == other.ports
            && self.tags == other.tags
            && self.meta == other.meta
    }
}

/// One change to the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Create the entry, or write it again whole (a changed port, tag or metadata). The
    /// instance carries its health: a writer sets it in the same request when it can.
    Register(Instance),
    /// Only the health changed.
    SetHealth(Instance),
    /// Remove the entry (it is ours: only instances read back as owned get here).
    Deregister(Instance),
}

impl Write {
    pub fn instance(&self) -> &Instance {
        match self {
            Self::Register(i) | Self::SetHealth(i) | Self::Deregister(i) => i,
        }
    }

    /// The `op` label value.
    pub fn op(&self) -> &'static str {
        match self {
            Self::Register(_) => "register",
            Self::SetHealth(_) => "health",
            Self::Deregister(_) => "deregister",
        }
    }
}

impl fmt::Display for Write {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = self.instance();
        write!(
            f,
            "{} {} {} {}:{} ({}) from {}",
            self.op(),
            i.service,
            i.id,
            i.address,
            i.port,
            i.health.as_str(),
            i.source
        )
    }
}

/// What [`super::RegistryWriter::apply`] did with a batch the registry took only in
/// part: the writes it refused one by one (Consul names the failing operations of a
/// rolled-back transaction), while every other write of the batch was applied. A
/// refused write is not retried at once (the registry would refuse it again): it is
/// reported, and written again at the Service's next pass or the periodic resync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub rejected: Vec<Rejected>,
}

/// One write the registry refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// The write's index in the batch given to `apply`.
    pub index: usize,
    /// The registry's reason.
    pub reason: String,
}

/// What a writer read back from the registry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Registered {
    /// Every entry this connector owns.
    pub instances: Vec<Instance>,
    /// Registry services that also hold entries this connector does not own (a VM
    /// service of the same name, another connector's): those entries are never touched;
    /// the names are reported.
    pub shared_names: std::collections::BTreeSet<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_key_paths_round_trip() {
        let key = ServiceKey::new("shop", "web");
        assert_eq!(key.to_path(), "shop/web");
        assert_eq!(ServiceKey::from_path("shop/web"), Some(key));
        assert_eq!(ServiceKey::from_path("shop"), None);
        assert_eq!(ServiceKey::from_path("/web"), None);
    }
}

/// Metadata keys every writer puts on the entries it owns (Consul service meta, Eureka
/// instance metadata). consul-k8s's own keys where it has them, so that tools written
/// for it keep working; annotations cannot set them.
pub mod meta_keys {
    /// `kubernetes` on everything this direction registers.
    pub const SOURCE: &str = "external-source";
    /// The value of [`SOURCE`].
    pub const SOURCE_VALUE: &str = "kubernetes";
    /// The namespace of the source Service.
    pub const NAMESPACE: &str = "external-k8s-ns";
    /// The name of the source Service.
    pub const SERVICE: &str = "external-k8s-name";
    /// The `--connector-id` of the connector that owns the entry: the ownership proof.
    pub const CONNECTOR: &str = "registry-connector-id";
    /// Prefix of one key per named port (`port-http=8080`).
    pub const PORT_PREFIX: &str = "port-";
    /// The extra tags, comma-joined, where the registry has no tags of its own (Eureka).
    pub const TAGS: &str = "external-k8s-tags";

    /// Whether annotations may not set `key`.
    pub fn is_reserved(key: &str) -> bool {
        matches!(key, SOURCE | NAMESPACE | SERVICE | CONNECTOR | TAGS)
            || key.starts_with(PORT_PREFIX)
    }
}
