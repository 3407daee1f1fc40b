//! What the sink's caches keep of a live object, and why that is enough.
//!
//! A watch event carries the whole object; the cache keeps a [`Cached`] projection of it
//! and drops the rest at once, so memory grows with what the reconcile compares, not with
//! what the apiserver stores (a Service as deserialised is several kilobytes of maps,
//! strings and options; its projection is about two hundred bytes). Each field is here
//! because something reads it:
//!
//! - `name`, `uid`: deletes carry the UID as precondition; the Service's UID is the owner
//!   of its slices and Endpoints; Events name the object. A UID in the apiserver's
//!   canonical form is kept as its 16 bytes ([`Uid`]).
//! - no resourceVersion: updates read the object first and use the version they read,
//!   and a relist compares projections (a change that leaves the projection as it was
//!   needs no reconcile).
//! - `owned`: both ownership labels with our values; nothing else is ever reused or
//!   deleted (the watches are label-selected on them, so it is true unless a label
//!   selector and [`crate::labels::is_owned`] ever disagree).
//! - `fingerprint`: the hash of the fields we own ([`crate::diff::Owned`]); a rendered
//!   object with the same fingerprint needs no write, a different one means drift or a
//!   registry change and an update. Drift is still seen within one coalescing period: an
//!   edit is a watch event, the event recomputes the fingerprint and queues the service.
//! - per kind ([`Project::Facts`]): for a Service what rendering and the recreate check
//!   read of the live object ([`crate::render::LiveService`], [`ServiceShape`]); for an
//!   EndpointSlice its addresses, which keep every endpoint in the slice it is in
//!   ([`crate::slicing`]); nothing more for Endpoints.
//!
//! What is not kept is read when it is needed, which is rare: an update fetches the live
//! object first (the writer lays our fields over it, see `sink::writer`), and a dry run
//! with `--diff` fetches it to print the fields that would change.
//!
//! Why not `metadata_watcher`: it delivers metadata only, and most drift is in the spec,
//! the endpoints or the subsets (a port added, an address removed), which a
//! metadata-only watch would never see. The full watch is kept and projected as each
//! event arrives, so the whole object lives only as long as its event.

use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{Resource, ResourceExt};

use crate::diff::{Fingerprint, Owned, ServiceShape};
use crate::labels::{is_owned, SERVICE_NAME_LABEL};
use crate::model::MicroEndpointAddr;
use crate::render::LiveService;
use crate::slicing::{slice_addresses, ExistingSlice};

/// What a cache keeps of one live object.
#[derive(Debug, Clone, PartialEq)]
pub struct Cached<F> {
    pub name: Box<str>,
    pub uid: Option<Uid>,
    pub owned: bool,
    pub fingerprint: Fingerprint,
    pub facts: F,
}

impl<F> Cached<F> {
    pub fn uid(&self) -> Option<String> {
        self.uid.as_ref().map(Uid::to_string)
    }
}

/// An object's UID. The apiserver's are lowercase hyphenated UUIDs, kept as their 16
/// bytes instead of a 36-character string (bytes, not a `u128`, whose 16-byte alignment
/// would pad every entry); anything else is kept as it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uid {
    Uuid([u8; 16]),
    Other(Box<str>),
}

impl Uid {
    pub fn new(text: &str) -> Self {
        Self::parse_uuid(text)
            .map(Uid::Uuid)
            .unwrap_or_else(|| Uid::Other(text.into()))
    }

    /// The value of `8-4-4-4-12` lowercase hex digits, only when printing it gives back
    /// exactly `text` (so the round trip is lossless).
    fn parse_uuid(text: &str) -> Option<[u8; 16]> {
        let groups: Vec<&str> = text.split('-').collect();
        let lengths: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        if lengths != [8, 4, 4, 4, 12]
            || !text
                .bytes()
                .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        u128::from_str_radix(&groups.concat(), 16)
            .ok()
            .map(u128::to_be_bytes)
    }
}

impl std::fmt::Display for Uid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Uid::Uuid(bytes) => {
                let hex = format!("{:032x}", u128::from_be_bytes(*bytes));
                write!(
                    f,
                    "{}-{}-{}-{}-{}",
                    &hex[..8],
                    &hex[8..12],
                    &hex[12..16],
                    &hex[16..20],
                    &hex[20..]
                )
            }
            Uid::Other(text) => f.write_str(text),
        }
    }
}

/// A kind the sink caches: how to file it and what else to keep of it.
pub trait Project: Resource<DynamicType = ()> + Owned {
    /// What the reconcile reads of this kind beyond the common fields.
    type Facts: std::fmt::Debug + PartialEq + Send + Sync + 'static;

    /// The service the object belongs to.
    fn service_key(&self) -> Option<String>;

    /// Whether [`Project::service_key`] is the object's own name, which never changes
    /// (so the cache needs no name → service map for moves).
    const FILED_BY_OWN_NAME: bool;

    fn facts(&self) -> Self::Facts;
}

/// The projection of `obj`, for the instance `connector_id`.
pub fn project<K: Project>(obj: &K, connector_id: &str) -> Cached<K::Facts> {
    let meta = obj.meta();
    Cached {
        name: obj.name_any().into_boxed_str(),
        uid: meta.uid.as_deref().map(Uid::new),
        owned: is_owned(meta, connector_id),
        fingerprint: obj.fingerprint(),
        facts: obj.facts(),
    }
}

/// What a reconcile reads of a live Service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceFacts {
    pub shape: ServiceShape,
    pub live: LiveService,
}

impl Project for Service {
    type Facts = ServiceFacts;
    const FILED_BY_OWN_NAME: bool = true;

    fn service_key(&self) -> Option<String> {
        self.metadata.name.clone()
    }

    fn facts(&self) -> ServiceFacts {
        ServiceFacts {
            shape: ServiceShape::of(self),
            live: LiveService::of(self),
        }
    }
}

/// What the slice planner reads of a live EndpointSlice besides its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceFacts {
    pub addresses: Box<[MicroEndpointAddr]>,
}

impl Project for EndpointSlice {
    type Facts = SliceFacts;
    const FILED_BY_OWN_NAME: bool = false;

    fn service_key(&self) -> Option<String> {
        self.metadata
            .labels
            .as_ref()?
            .get(SERVICE_NAME_LABEL)
            .cloned()
    }

    fn facts(&self) -> SliceFacts {
        SliceFacts {
            addresses: slice_addresses(self).into_boxed_slice(),
        }
    }
}

impl Cached<SliceFacts> {
    /// The planner's view of this slice.
    pub fn existing(&self) -> ExistingSlice<'_> {
        ExistingSlice {
            name: &self.name,
            owned: self.owned,
            addresses: &self.facts.addresses,
        }
    }
}

impl Project for Endpoints {
    type Facts = ();
    const FILED_BY_OWN_NAME: bool = true;

    fn service_key(&self) -> Option<String> {
        self.metadata.name.clone()
    }

    fn facts(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::owner_labels;
    use k8s_openapi::api::discovery::v1::Endpoint;
    use kube::api::ObjectMeta;

    fn slice(labels: std::collections::BTreeMap<String, String>) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some("a-v4-abc123-0".into()),
                uid: Some("u-1".into()),
                resource_version: Some("7".into()),
                labels: Some(labels),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: ["192.0.2.2", "not-an-ip", "192.0.2.1"]
                .into_iter()
                .map(|a| Endpoint {
                    addresses: vec![a.into()],
                    ..Default::default()
                })
                .collect(),
            ports: None,
        }
    }

    #[test]
    fn a_slice_keeps_name_uid_version_ownership_fingerprint_and_addresses_in_order() {
        let mut labels = owner_labels("c1");
        labels.insert(SERVICE_NAME_LABEL.into(), "a".into());
        let s = slice(labels);
        let cached = project(&s, "c1");
        assert_eq!(&*cached.name, "a-v4-abc123-0");
        assert_eq!(cached.uid(), Some("u-1".to_string()));
        assert!(cached.owned);
        assert_eq!(cached.fingerprint, s.fingerprint());
        let addresses: Vec<String> = cached
            .facts
            .addresses
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(addresses, ["192.0.2.2", "192.0.2.1"]);
        assert_eq!(s.service_key().as_deref(), Some("a"));

        assert!(!project(&s, "c2").owned, "another instance's slice");
    }

    #[test]
    fn uuids_are_kept_as_numbers_and_print_back_exactly() {
        let canonical = "6f1c0b2e-3d4a-4b5c-8d9e-0a1b2c3d4e5f";
        let uid = Uid::new(canonical);
        assert!(matches!(uid, Uid::Uuid(_)));
        assert_eq!(uid.to_string(), canonical);
        let leading_zeros = "00000000-0000-4000-8000-000000000001";
        assert_eq!(Uid::new(leading_zeros).to_string(), leading_zeros);
        for other in [
            "6F1C0B2E-3D4A-4B5C-8D9E-0A1B2C3D4E5F",
            "6f1c0b2e3d4a4b5c8d9e0a1b2c3d4e5f",
            "6f1c0b2e-3d4a-4b5c-8d9e-0a1b2c3d4e5",
            "+f1c0b2e-3d4a-4b5c-8d9e-0a1b2c3d4e5f",
            "u-1",
            "",
        ] {
            let uid = Uid::new(other);
            assert!(matches!(uid, Uid::Other(_)), "{other}");
            assert_eq!(uid.to_string(), other);
        }
    }

    #[test]
    fn an_entry_stays_small() {
        assert!(
            std::mem::size_of::<Option<Uid>>() <= 24,
            "a tag and 16 bytes"
        );
    }
}
