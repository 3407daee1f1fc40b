//! The operator's allow-list from registry metadata to Service labels and annotations,
//! shared by every source.
//!
//! Registry metadata lives on instances (Eureka's metadata map, Consul's service meta);
//! a Service is one object for all of them. A key is copied when every instance that has
//! it agrees on the value; instances that disagree are reported, and the key is left out
//! rather than chosen by chance. Label values must be valid Kubernetes label values; an
//! invalid one is reported and left out, so one odd value never makes the apiserver
//! refuse the whole Service. Keys are checked once, when the allow-list is built.

use std::collections::{BTreeMap, BTreeSet};

use crate::labels::RESERVED_KEYS;
use crate::model::ServiceMetadata;
use crate::naming::{is_label_value, is_qualified_name};

/// A registry entry's metadata, read by key: the map types the sources keep.
pub trait MetadataLookup {
    fn value(&self, key: &str) -> Option<&str>;
}

impl MetadataLookup for BTreeMap<String, String> {
    fn value(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

pub use super::packed::CompactMetadata;

/// A [`CompactMetadata`] of `entries`, in any order; of two with one key the last wins.
pub fn compact_metadata(entries: impl IntoIterator<Item = (String, String)>) -> CompactMetadata {
    entries.into_iter().collect()
}

/// Parses a `key=value` filter entry (`--filter-metadata`; the value may be empty, the
/// key may not).
pub fn parse_metadata_filter(entry: &str) -> Result<(String, String), String> {
    let (key, value) = entry
        .split_once('=')
        .ok_or_else(|| format!("{entry:?} is not KEY=VALUE"))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(format!("{entry:?} has an empty key"));
    }
    Ok((key.to_string(), value.trim().to_string()))
}

/// Every `--filter-metadata` entry of a command line, blank ones ignored.
pub fn parse_metadata_filters(entries: &[String]) -> Result<Vec<(String, String)>, String> {
    entries
        .iter()
        .filter(|entry| !entry.trim().is_empty())
        .map(|entry| parse_metadata_filter(entry))
        .collect()
}

/// Whether `metadata` carries every `(key, value)` of `filter` (an empty filter matches
/// everything).
pub fn matches_filter(metadata: &impl MetadataLookup, filter: &[(String, String)]) -> bool {
    filter
        .iter()
        .all(|(key, value)| metadata.value(key) == Some(value.as_str()))
}

/// Whether a registry entry was registered from Kubernetes (`external-source=kubernetes`,
/// what every Kubernetes → registry direction writes): a source never publishes those
/// back, which would loop in `both` mode and duplicate what the cluster has in any mode.
pub fn is_from_kubernetes(metadata: &impl MetadataLookup) -> bool {
    use crate::export::model::meta_keys;
    metadata.value(meta_keys::SOURCE) == Some(meta_keys::SOURCE_VALUE)
}

/// Which metadata keys become labels and which become annotations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetadataAllowList {
    labels: BTreeSet<String>,
    annotations: BTreeSet<String>,
}

/// Why an allow-listed key was left out of one service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataIssue {
    #[error("instances disagree on the value of metadata key {key:?}")]
    Conflict { key: String },
    #[error("metadata key {key:?} has value {value:?}, which is not a valid label value")]
    InvalidLabelValue { key: String, value: String },
}

impl MetadataIssue {
    /// The `reason` label of the rejected-entries metric.
    pub fn as_label(&self) -> &'static str {
        match self {
            Self::Conflict { .. } => "conflicting_metadata",
            Self::InvalidLabelValue { .. } => "invalid_label_value",
        }
    }
}

impl MetadataAllowList {
    /// Checks the keys: each must be a qualified name (what Kubernetes accepts as a label
    /// or annotation key), none may be one of the connector's own keys, and a key may not
    /// be both a label and an annotation.
    pub fn new(
        labels: impl IntoIterator<Item = String>,
        annotations: impl IntoIterator<Item = String>,
    ) -> Result<Self, String> {
        let check = |key: String| -> Result<String, String> {
            let key = key.trim().to_string();
            if !is_qualified_name(&key) {
                return Err(format!(
                    "{key:?} is not a valid label or annotation key (name or prefix/name)"
                ));
            }
            if RESERVED_KEYS.contains(&key.as_str()) {
                return Err(format!("{key:?} is one of the connector's own keys"));
            }
            Ok(key)
        };
        let labels: BTreeSet<String> = labels.into_iter().map(check).collect::<Result<_, _>>()?;
        let annotations: BTreeSet<String> = annotations
            .into_iter()
            .map(check)
            .collect::<Result<_, _>>()?;
        if let Some(both) = labels.intersection(&annotations).next() {
            return Err(format!(
                "{both:?} is allow-listed both as a label and as an annotation"
            ));
        }
        Ok(Self {
            labels,
            annotations,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.annotations.is_empty()
    }

    /// Whether `key` is allow-listed (as a label or an annotation): what a source that
    /// keeps entries for a long time needs to keep of their metadata.
    pub fn wants(&self, key: &str) -> bool {
        self.labels.contains(key) || self.annotations.contains(key)
    }

    /// The labels and annotations for a service whose instances carry `instances`.
    pub fn apply<'a, M: MetadataLookup + 'a>(
        &self,
        instances: impl IntoIterator<Item = &'a M>,
    ) -> (ServiceMetadata, Vec<MetadataIssue>) {
        let mut out = ServiceMetadata::default();
        let mut issues = Vec::new();
        if self.is_empty() {
            return (out, issues);
        }
        let mut values: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for metadata in instances {
            for key in self.labels.iter().chain(&self.annotations) {
                if let Some(value) = metadata.value(key) {
                    values.entry(key).or_default().insert(value.trim());
                }
            }
        }
        for (key, found) in values {
            let mut found = found.into_iter();
            let (Some(value), None) = (found.next(), found.next()) else {
                issues.push(MetadataIssue::Conflict {
                    key: key.to_string(),
                });
                continue;
            };
            if self.labels.contains(key) {
                if is_label_value(value) {
                    out.labels.insert(key.to_string(), value.to_string());
                } else {
                    issues.push(MetadataIssue::InvalidLabelValue {
                        key: key.to_string(),
                        value: value.to_string(),
                    });
                }
            } else {
                out.annotations.insert(key.to_string(), value.to_string());
            }
        }
        (out, issues)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn allow(labels: &[&str], annotations: &[&str]) -> MetadataAllowList {
        MetadataAllowList::new(
            labels.iter().map(|s| s.to_string()),
            annotations.iter().map(|s| s.to_string()),
        )
        .expect("valid allow-list")
    }

    #[test]
    fn agreed_values_are_copied_and_the_rest_reported() {
        let a = allow(&["team", "version", "example.com/tier"], &["owner"]);
        let instances = [
            map(&[
                ("team", "blue"),
                ("version", "1.2"),
                ("owner", "Jane Doe <jane@example.com>"),
                ("other", "x"),
            ]),
            map(&[
                ("team", "blue"),
                ("version", "1.3"),
                ("example.com/tier", "not valid!"),
            ]),
            map(&[]),
        ];
        let (out, issues) = a.apply(&instances);
        assert_eq!(out.labels, map(&[("team", "blue")]));
        assert_eq!(
            out.annotations,
            map(&[("owner", "Jane Doe <jane@example.com>")]),
            "annotations take any text"
        );
        let reasons: Vec<&str> = issues.iter().map(MetadataIssue::as_label).collect();
        assert_eq!(reasons, ["invalid_label_value", "conflicting_metadata"]);
    }

    #[test]
    fn metadata_filters_parse_and_match() {
        assert_eq!(
            parse_metadata_filter(" team = blue "),
            Ok(("team".into(), "blue".into()))
        );
        assert_eq!(parse_metadata_filter("k="), Ok(("k".into(), String::new())));
        assert!(parse_metadata_filter("novalue").is_err());
        assert!(parse_metadata_filter("=x").is_err());
        let filter = parse_metadata_filters(&["team=blue".into(), " ".into(), "tier=web".into()])
            .expect("valid");
        assert_eq!(filter.len(), 2);
        assert!(matches_filter(
            &map(&[("team", "blue"), ("tier", "web"), ("x", "y")]),
            &filter
        ));
        assert!(!matches_filter(&map(&[("team", "blue")]), &filter));
        assert!(matches_filter(&map(&[]), &[]));
        assert!(is_from_kubernetes(&map(&[(
            "external-source",
            "kubernetes"
        )])));
        assert!(!is_from_kubernetes(&map(&[("external-source", "vm")])));
    }

    #[test]
    fn an_empty_allow_list_copies_nothing() {
        let (out, issues) = MetadataAllowList::default().apply(&[map(&[("team", "blue")])]);
        assert!(out.is_empty());
        assert!(issues.is_empty());
    }

    #[test]
    fn bad_keys_are_refused_when_the_list_is_built() {
        for (labels, annotations) in [
            (vec!["not a key"], vec![]),
            (vec!["app.kubernetes.io/managed-by"], vec![]),
            (vec![], vec!["connector.flomesh.io/metadata-keys"]),
            (vec!["team"], vec!["team"]),
        ] {
            assert!(MetadataAllowList::new(
                labels.into_iter().map(String::from),
                annotations.into_iter().map(String::from)
            )
            .is_err());
        }
    }
}
