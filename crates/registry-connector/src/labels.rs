//! The label and annotation keys that make up the connector's contract with the cluster.
//!
//! This module owns the names: the seed's keys (kept verbatim so that meshes and the
//! reverse-direction sync that already read them keep working), the ownership labels that
//! prove an object is ours, and the well-known Kubernetes keys we set on EndpointSlices and
//! Endpoints. It also owns the ownership test itself, so that "is this object ours?" is
//! answered in exactly one place. It must not build objects; see [`crate::render`].

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Marks every object rendered from a registry service (seed: `CloudSourcedServiceLabel`).
/// Consumers such as the mesh use it to tell registry-sourced Services from native ones.
pub const CLOUD_SOURCED_SERVICE_LABEL: &str = "cloud-sourced-service";

/// Seed's `CloudServiceLabel`; kept for consumers that match on it. Not set by this crate's
/// renderers (the seed's sink did not set it on C2K Services either).
pub const CLOUD_SERVICE_LABEL: &str = "cloud-service";

/// Carries the original registry service name, which the Kubernetes name may have lost to
/// sanitisation (seed: `CloudServiceInheritedFromAnnotation`).
pub const CLOUD_SERVICE_INHERITED_FROM_ANNOTATION: &str = "flomesh.io/cloud-service-inherited-from";

/// Set to `"false"` on rendered Services so that the Kubernetes → registry direction never
/// registers them back into the registry they came from (seed: `MeshServiceSyncAnnotation`).
pub const MESH_SERVICE_SYNC_ANNOTATION: &str = "flomesh.io/mesh-service-sync";

/// Seed's `MeshEndpointAddrAnnotation`. The original packed IPv4 addresses as integers into
/// it; this crate does not (no IPv6, and it overflows past a few thousand instances): the
/// addresses live in EndpointSlices. Kept so the key is reserved and documented.
pub const MESH_ENDPOINT_ADDR_ANNOTATION: &str = "flomesh.io/cloud-endpoint-addr";

/// The standard "which tool manages this object" label; half of our ownership proof.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// Value of [`MANAGED_BY_LABEL`] on everything this controller writes.
pub const MANAGED_BY_VALUE: &str = "registry-connector";

/// Identifies which connector instance owns an object, so that several connectors (several
/// registries, several clusters sharing a namespace) never touch each other's objects.
pub const CONNECTOR_INSTANCE_LABEL: &str = "connector.flomesh.io/instance";

/// Links an EndpointSlice (and our legacy Endpoints) to its Service; kube-proxy, CoreDNS
/// and meshes find a Service's slices by this label.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Tells the EndpointSlice controller (and readers) which controller manages a slice; the
/// built-in controller leaves slices with a foreign value alone.
pub const ENDPOINTSLICE_MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";

/// Our value for [`ENDPOINTSLICE_MANAGED_BY_LABEL`]. Domain-qualified, as Kubernetes
/// recommends for non-core controllers.
pub const ENDPOINTSLICE_CONTROLLER_NAME: &str = "registry-connector.flomesh.io";

/// Set to `"true"` on our legacy Endpoints so that the EndpointSlice mirroring controller
/// does not copy them into slices that would duplicate ours.
pub const SKIP_MIRROR_LABEL: &str = "endpointslice.kubernetes.io/skip-mirror";

/// Lists the labels and annotations of a Service that were copied from registry metadata
/// (`labels=team,tier;annotations=owner`), so that a later update can remove the ones the
/// registry no longer has without touching labels other tools added.
pub const METADATA_KEYS_ANNOTATION: &str = "connector.flomesh.io/metadata-keys";

/// Annotations the connector sets only sometimes: when the desired object lacks one, the
/// live object must not carry it either (diff compares that, the writer removes it).
pub const CONDITIONAL_ANNOTATIONS: &[&str] =
    &[ENDPOINTS_OVER_CAPACITY_ANNOTATION, METADATA_KEYS_ANNOTATION];

/// Keys registry metadata may never set: the connector's own contract.
pub const RESERVED_KEYS: &[&str] = &[
    CLOUD_SOURCED_SERVICE_LABEL,
    CLOUD_SERVICE_LABEL,
    CLOUD_SERVICE_INHERITED_FROM_ANNOTATION,
    MESH_SERVICE_SYNC_ANNOTATION,
    MESH_ENDPOINT_ADDR_ANNOTATION,
    MANAGED_BY_LABEL,
    CONNECTOR_INSTANCE_LABEL,
    SERVICE_NAME_LABEL,
    ENDPOINTSLICE_MANAGED_BY_LABEL,
    SKIP_MIRROR_LABEL,
    METADATA_KEYS_ANNOTATION,
];

/// The value of [`METADATA_KEYS_ANNOTATION`] for these label and annotation keys; `None`
/// when both are empty.
pub fn metadata_keys_value<'a>(
    labels: impl IntoIterator<Item = &'a String>,
    annotations: impl IntoIterator<Item = &'a String>,
) -> Option<String> {
    let join = |keys: Vec<&String>| {
        keys.into_iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(",")
    };
    let labels: Vec<&String> = labels.into_iter().collect();
    let annotations: Vec<&String> = annotations.into_iter().collect();
    if labels.is_empty() && annotations.is_empty() {
        return None;
    }
    Some(format!(
        "labels={};annotations={}",
        join(labels),
        join(annotations)
    ))
}

/// The label and annotation keys a [`METADATA_KEYS_ANNOTATION`] value lists. Unknown
/// parts are ignored: a hand-edited value can at worst leave a key in place.
pub fn parse_metadata_keys(value: &str) -> (Vec<String>, Vec<String>) {
    let mut labels = Vec::new();
    let mut annotations = Vec::new();
    for part in value.split(';') {
        let Some((kind, keys)) = part.split_once('=') else {
            continue;
        };
        let target = match kind.trim() {
            "labels" => &mut labels,
            "annotations" => &mut annotations,
            _ => continue,
        };
        target.extend(
            keys.split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_string),
        );
    }
    (labels, annotations)
}

/// Field manager name for server-side apply and for update requests.
pub const FIELD_MANAGER: &str = "registry-connector";

/// Annotation the Kubernetes endpoints controller sets when it truncates an Endpoints object
/// to 1000 addresses; we set it in the same situation so readers see the same signal.
pub const ENDPOINTS_OVER_CAPACITY_ANNOTATION: &str = "endpoints.kubernetes.io/over-capacity";

/// Value of [`ENDPOINTS_OVER_CAPACITY_ANNOTATION`] when addresses were dropped.
pub const ENDPOINTS_OVER_CAPACITY_TRUNCATED: &str = "truncated";

/// The label selector that lists exactly the objects owned by one connector instance; used
/// by the watchers so that the caches never hold foreign objects.
pub fn owner_selector(connector_id: &str) -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE},{CONNECTOR_INSTANCE_LABEL}={connector_id}")
}

/// The two ownership labels, ready to merge into an object's labels.
pub fn owner_labels(connector_id: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned()),
        (CONNECTOR_INSTANCE_LABEL.to_owned(), connector_id.to_owned()),
    ])
}

/// Ownership is proven by labels, never assumed from a name: an object is ours only when
/// both ownership labels are present with our values. Anything else is never updated or
/// deleted.
pub fn is_owned(meta: &ObjectMeta, connector_id: &str) -> bool {
    let Some(labels) = meta.labels.as_ref() else {
        return false;
    };
    labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY_VALUE)
        && labels.get(CONNECTOR_INSTANCE_LABEL).map(String::as_str) == Some(connector_id)
}

/// Whether `value` is a valid Kubernetes label value (at most 63 characters, alphanumerics
/// with `-`, `_`, `.` inside, may be empty). The connector id ends up in a label value, so
/// the runtime should reject an id that fails this before it renders anything.
pub fn is_label_value(value: &str) -> bool {
    if value.is_empty() {
        return true;
    }
    let bytes = value.as_bytes();
    value.len() <= 63
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_keys_round_trip() {
        let labels = ["team".to_string(), "example.com/tier".to_string()];
        let annotations = ["owner".to_string()];
        let value = metadata_keys_value(&labels, &annotations).expect("some keys");
        assert_eq!(value, "labels=team,example.com/tier;annotations=owner");
        assert_eq!(
            parse_metadata_keys(&value),
            (labels.to_vec(), annotations.to_vec())
        );
        assert_eq!(metadata_keys_value(&[], &[]), None);
        assert_eq!(
            parse_metadata_keys("labels=;junk;annotations= a , b"),
            (vec![], vec!["a".to_string(), "b".to_string()])
        );
    }

    fn meta_with(labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn seed_keys_are_kept_verbatim() {
        assert_eq!(CLOUD_SOURCED_SERVICE_LABEL, "cloud-sourced-service");
        assert_eq!(CLOUD_SERVICE_LABEL, "cloud-service");
        assert_eq!(
            CLOUD_SERVICE_INHERITED_FROM_ANNOTATION,
            "flomesh.io/cloud-service-inherited-from"
        );
        assert_eq!(MESH_SERVICE_SYNC_ANNOTATION, "flomesh.io/mesh-service-sync");
        assert_eq!(
            MESH_ENDPOINT_ADDR_ANNOTATION,
            "flomesh.io/cloud-endpoint-addr"
        );
    }

    #[test]
    fn owner_selector_lists_both_labels() {
        assert_eq!(
            owner_selector("consul-a"),
            "app.kubernetes.io/managed-by=registry-connector,connector.flomesh.io/instance=consul-a"
        );
    }

    #[test]
    fn owner_labels_match_is_owned() {
        let meta = ObjectMeta {
            labels: Some(owner_labels("c1")),
            ..ObjectMeta::default()
        };
        assert!(is_owned(&meta, "c1"));
    }

    #[test]
    fn owned_requires_both_labels_with_our_values() {
        let ours = meta_with(&[
            (MANAGED_BY_LABEL, MANAGED_BY_VALUE),
            (CONNECTOR_INSTANCE_LABEL, "c1"),
            ("other", "x"),
        ]);
        assert!(is_owned(&ours, "c1"));
        assert!(!is_owned(&ours, "c2"), "another instance's object");

        let no_instance = meta_with(&[(MANAGED_BY_LABEL, MANAGED_BY_VALUE)]);
        assert!(!is_owned(&no_instance, "c1"));

        let no_manager = meta_with(&[(CONNECTOR_INSTANCE_LABEL, "c1")]);
        assert!(!is_owned(&no_manager, "c1"));

        let other_manager =
            meta_with(&[(MANAGED_BY_LABEL, "helm"), (CONNECTOR_INSTANCE_LABEL, "c1")]);
        assert!(!is_owned(&other_manager, "c1"));

        assert!(!is_owned(&ObjectMeta::default(), "c1"), "no labels at all");
    }

    #[test]
    fn label_values() {
        assert!(is_label_value(""));
        assert!(is_label_value("consul-dc1"));
        assert!(is_label_value("a.b_c-d"));
        assert!(is_label_value(&"a".repeat(63)));
        assert!(!is_label_value(&"a".repeat(64)));
        assert!(!is_label_value("-a"));
        assert!(!is_label_value("a-"));
        assert!(!is_label_value("a/b"));
        assert!(!is_label_value("a b"));
    }
}
