//! Writes the registry refused one by one (see [`super::model::Applied`]), remembered
//! per Service and instance, so that a refusal that lasts is logged, counted as news
//! and reported on the Service once, not at every pass that tries the write again.
//!
//! The same pattern as the engine's reported problems: a refusal is news when the
//! instance was not refused before or is refused for another reason; a write the
//! registry takes forgets it, and so does the instance leaving the Service.

use std::collections::{BTreeMap, HashMap};

use super::model::{Instance, ServiceKey};

/// Refusal reasons by Service and instance id.
#[derive(Debug, Default)]
pub struct Rejections {
    by_service: HashMap<ServiceKey, BTreeMap<String, String>>,
}

impl Rejections {
    /// Remembers that the registry refused a write of `instance` for `reason`; true
    /// when that is news (to log and report).
    pub fn refused(&mut self, instance: &Instance, reason: &str) -> bool {
        let known = self.by_service.entry(instance.source.clone()).or_default();
        match known.get(&instance.id) {
            Some(before) if before == reason => false,
            _ => {
                known.insert(instance.id.clone(), reason.to_string());
                true
            }
        }
    }

    /// The registry took a write of `instance`: a later refusal is news again.
    pub fn accepted(&mut self, instance: &Instance) {
        if let Some(known) = self.by_service.get_mut(&instance.source) {
            known.remove(&instance.id);
            if known.is_empty() {
                self.by_service.remove(&instance.source);
            }
        }
    }

    /// Forgets the instances of `key` for which `keep` is false (no longer desired nor
    /// registered).
    pub fn retain(&mut self, key: &ServiceKey, keep: impl Fn(&str) -> bool) {
        if let Some(known) = self.by_service.get_mut(key) {
            known.retain(|id, _| keep(id));
            if known.is_empty() {
                self.by_service.remove(key);
            }
        }
    }

    /// Instances refused right now.
    pub fn len(&self) -> usize {
        self.by_service.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_service.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::model::Health;

    fn inst(id: &str) -> Instance {
        Instance {
            id: id.into(),
            service: "web".into(),
            source: ServiceKey::new("shop", "web"),
            address: "192.0.2.1".into(),
            port: 80,
            ports: BTreeMap::new(),
            health: Health::Passing,
            tags: vec![],
            meta: BTreeMap::new(),
        }
    }

    #[test]
    fn a_refusal_is_news_once_while_it_lasts() {
        let mut r = Rejections::default();
        assert!(r.refused(&inst("a"), "denied"));
        assert!(!r.refused(&inst("a"), "denied"), "the same refusal again");
        assert!(r.refused(&inst("a"), "invalid name"), "another reason");
        assert!(r.refused(&inst("b"), "denied"), "another instance");
        assert_eq!(r.len(), 2);
        r.accepted(&inst("a"));
        assert!(
            r.refused(&inst("a"), "invalid name"),
            "news after a success"
        );
        r.retain(&ServiceKey::new("shop", "web"), |id| id == "b");
        assert_eq!(r.len(), 1);
        r.accepted(&inst("b"));
        assert!(r.is_empty());
    }
}
