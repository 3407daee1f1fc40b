//! The source's copy of the tree: every node read below the base path, as an [`Entry`],
//! by directory (a Dubbo interface, a Curator service name), with an index from each
//! service to the nodes that take part in it. Pure: the watch loop feeds it what it read
//! and what the events say, and asks which services a change touched, so that one event
//! rebuilds only its service(s).
//!
//! A directory is what ZooKeeper groups nodes by; a service is what Kubernetes gets. They
//! differ: in the Dubbo layout with `--dubbo-service-by service-key` one interface
//! directory holds each version and group of the interface (several services), and with
//! `--dubbo-service-by application` one service gathers many directories.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::select::{Built, Entry, Member, Selection, Skip};

/// A node by `(directory, name)`. The names are shared between the directory map and the
/// service index: a Dubbo node's name is its whole URL, some 500 bytes.
type Node = (Arc<str>, Arc<str>);

/// The nodes read, by directory and name, and which services they make.
#[derive(Debug, Default)]
pub struct Mirror {
    dirs: HashMap<Arc<str>, BTreeMap<Arc<str>, Entry>>,
    /// Service → its member nodes `(dir, name)`.
    services: HashMap<Box<str>, BTreeSet<Node>>,
}

impl Mirror {
    /// Sets node `name` of `dir` to `entry`; returns the services it left and joined.
    pub fn set(&mut self, dir: &str, name: &str, entry: Entry) -> Vec<Box<str>> {
        let joined = entry.service().map(Box::<str>::from);
        let (dir_key, nodes) = match self.dirs.get_key_value(dir) {
            Some((key, _)) => {
                let key = Arc::clone(key);
                let nodes = self.dirs.get_mut(dir).expect("just found");
                (key, nodes)
            }
            None => {
                let key: Arc<str> = Arc::from(dir);
                (Arc::clone(&key), self.dirs.entry(key).or_default())
            }
        };
        let name_key: Arc<str> = match nodes.get_key_value(name) {
            Some((key, _)) => Arc::clone(key),
            None => Arc::from(name),
        };
        let left = nodes
            .insert(Arc::clone(&name_key), entry)
            .and_then(|old| old.service().map(Box::<str>::from));
        if let Some(service) = &left {
            self.unindex(service, dir, name);
        }
        if let Some(service) = &joined {
            self.services
                .entry(service.clone())
                .or_default()
                .insert((dir_key, name_key));
        }
        left.into_iter()
            .chain(joined)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// Removes node `name` of `dir`; returns the service it left, if any.
    pub fn remove(&mut self, dir: &str, name: &str) -> Vec<Box<str>> {
        let Some(nodes) = self.dirs.get_mut(dir) else {
            return Vec::new();
        };
        let old = nodes.remove(name);
        if nodes.is_empty() {
            self.dirs.remove(dir);
        }
        let left: Vec<Box<str>> = old
            .and_then(|e| e.service().map(Box::<str>::from))
            .into_iter()
            .collect();
        for service in &left {
            self.unindex(service, dir, name);
        }
        left
    }

    /// Removes every node of `dir`; returns the services they left.
    pub fn remove_dir(&mut self, dir: &str) -> Vec<Box<str>> {
        let Some(nodes) = self.dirs.remove(dir) else {
            return Vec::new();
        };
        let mut left = BTreeSet::new();
        for (name, entry) in nodes {
            if let Some(service) = entry.service() {
                self.unindex(service, dir, &name);
                left.insert(Box::<str>::from(service));
            }
        }
        left.into_iter().collect()
    }

    fn unindex(&mut self, service: &str, dir: &str, name: &str) {
        if let Some(members) = self.services.get_mut(service) {
            members.remove(&(Arc::from(dir), Arc::from(name)));
            if members.is_empty() {
                self.services.remove(service);
            }
        }
    }

    fn members<'a>(&'a self, service: &str) -> impl Iterator<Item = &'a Member> + 'a {
        self.services
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|(dir, name)| match self.dirs.get(dir)?.get(name)? {
                Entry::Member(m) => Some(m),
                _ => None,
            })
    }

    /// What `service` publishes now (nothing once its last member is gone).
    pub fn build(&self, selection: &Selection, service: &str) -> Built {
        selection.build(service, self.members(service))
    }

    /// Every service, in name order.
    pub fn services(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.services.keys().map(|s| &**s).collect();
        names.sort_unstable();
        names
    }

    /// How many services the mirror makes.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// The directories read.
    pub fn dirs(&self) -> impl Iterator<Item = &str> {
        self.dirs.keys().map(|d| &**d)
    }

    /// The nodes of `dir` left out for bad data or published without an endpoint, with
    /// why: what the watch loop reports.
    pub fn problems(&self, dir: &str) -> Vec<(String, Skip)> {
        self.dirs
            .get(dir)
            .into_iter()
            .flatten()
            .filter_map(|(name, entry)| Some((name.to_string(), entry.problem()?)))
            .collect()
    }

    /// Nodes held.
    pub fn len(&self) -> usize {
        self.dirs.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::zookeeper::config::DubboServiceBy;

    fn encode(url: &str) -> String {
        percent_encoding::utf8_percent_encode(url, percent_encoding::NON_ALPHANUMERIC).to_string()
    }

    fn node(host: &str, iface: &str, params: &str) -> String {
        encode(&format!(
            "dubbo://{host}:20880/{iface}?application=shop&side=provider&{params}"
        ))
    }

    fn sel(by: DubboServiceBy) -> Selection {
        Selection {
            passing_only: true,
            dubbo_service_by: by,
            ..Selection::default()
        }
    }

    fn set(m: &mut Mirror, s: &Selection, iface: &str, name: &str) -> Vec<String> {
        let entry = s.dubbo_entry(iface, name);
        m.set(iface, name, entry)
            .into_iter()
            .map(String::from)
            .collect()
    }

    fn ips(m: &Mirror, s: &Selection, service: &str) -> Option<Vec<String>> {
        m.build(s, service)
            .service
            .map(|meta| meta.endpoints.iter().map(|e| e.addr.to_string()).collect())
    }

    #[test]
    fn a_change_touches_only_its_services() {
        let s = sel(DubboServiceBy::ServiceKey);
        let mut m = Mirror::default();
        let a1 = node("192.0.2.1", "A", "");
        let a2 = node("192.0.2.2", "A", "version=2");
        assert_eq!(set(&mut m, &s, "A", &a1), ["A"]);
        assert_eq!(set(&mut m, &s, "A", &a2), ["A:2"]);
        assert_eq!(set(&mut m, &s, "B", &node("192.0.2.3", "B", "")), ["B"]);
        assert_eq!(m.services(), ["A", "A:2", "B"]);
        assert_eq!(ips(&m, &s, "A").unwrap(), ["192.0.2.1"]);
        // The same node again: its service, to rebuild (and find unchanged).
        assert_eq!(set(&mut m, &s, "A", &a1), ["A"]);
        assert_eq!(
            m.remove("A", &a2)
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>(),
            ["A:2"]
        );
        assert_eq!(ips(&m, &s, "A:2"), None, "gone with its last provider");
        assert!(m.remove("A", "unknown").is_empty());
        assert_eq!(m.len(), 2);
        let left: Vec<String> = m.remove_dir("A").into_iter().map(String::from).collect();
        assert_eq!(left, ["A"]);
        assert_eq!(m.services(), ["B"]);
    }

    #[test]
    fn a_node_that_turns_bad_or_ignored_leaves_its_service() {
        let s = sel(DubboServiceBy::Interface);
        let mut m = Mirror::default();
        let good = node("192.0.2.1", "A", "");
        set(&mut m, &s, "A", &good);
        // The same node name cannot change in Dubbo (the URL is the name), but the same
        // Curator node can: model it with set() of another entry.
        let left = m.set("A", &good, Entry::Ignored);
        assert_eq!(left, [Box::from("A")]);
        assert!(m.services().is_empty());
        m.set("A", "garbage", s.dubbo_entry("A", "garbage"));
        let problems = m.problems("A");
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].1.as_label(), "invalid_url");
        assert_eq!(
            m.len(),
            2,
            "ignored and bad nodes are held, to match their deletion"
        );
    }

    #[test]
    fn by_application_one_service_gathers_many_directories() {
        let s = sel(DubboServiceBy::Application);
        let mut m = Mirror::default();
        let a = node("192.0.2.1", "A", "");
        let b = node("192.0.2.1", "B", "");
        let c = node("192.0.2.2", "C", "");
        for (iface, n) in [("A", &a), ("B", &b), ("C", &c)] {
            assert_eq!(set(&mut m, &s, iface, n), ["shop"]);
        }
        assert_eq!(ips(&m, &s, "shop").unwrap(), ["192.0.2.1", "192.0.2.2"]);
        m.remove_dir("A");
        assert_eq!(
            ips(&m, &s, "shop").unwrap(),
            ["192.0.2.1", "192.0.2.2"],
            "B still exports from 192.0.2.1"
        );
        m.remove("B", &b);
        assert_eq!(ips(&m, &s, "shop").unwrap(), ["192.0.2.2"]);
    }
}
