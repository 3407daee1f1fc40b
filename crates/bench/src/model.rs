//! The harness's own picture of a synthetic data set: services, their instances, and
//! which instances should be ready. Registry-neutral: the Consul and Eureka clients
//! (`registry/`) turn it into their own requests, the floor writes objects from it, and
//! the trackers compare the apiserver's state against it.
//!
//! Addresses come from the three documentation ranges (RFC 5737), so nothing is ever
//! contacted: instance `j` of any service is `RANGE[j % 3].(1 + (j / 3) % 249)`, which
//! keeps every address distinct within a service.

use std::collections::BTreeSet;

/// The three documentation ranges (TEST-NET-1, -2, -3).
pub const RANGES: [&str; 3] = ["192.0.2", "198.51.100", "203.0.113"];
/// The port every synthetic instance listens on.
pub const PORT: u16 = 8080;
/// Highest host part used for instances (`.250` and above stay free for Consul's nodes).
const MAX_HOST: usize = 249;

/// One synthetic instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Sequence number within its service; fixes the address.
    pub j: usize,
    /// Registry instance id, unique across the data set (`<service>-<j>`).
    pub id: String,
    pub address: String,
    /// Consul: its check is passing; Eureka: its status is `UP`.
    pub ready: bool,
}

/// One synthetic service and the instances the harness believes are registered.
#[derive(Debug, Clone)]
pub struct Service {
    /// Registry name, lowercase, also the Kubernetes name (already a DNS label; Eureka
    /// upper-cases it and the connector lowercases it back).
    pub name: String,
    /// The data set it belongs to: the connector's selection (Consul tag, Eureka
    /// metadata value) and the unit of removal. One per workload, so that one
    /// connector never sees another's services.
    pub set: String,
    pub instances: Vec<Instance>,
    next_j: usize,
}

impl Service {
    /// A service with `m` ready instances.
    pub fn new(name: String, set: String, m: usize) -> Self {
        let mut s = Service {
            name,
            set,
            instances: Vec::new(),
            next_j: 0,
        };
        for _ in 0..m {
            s.add_instance();
        }
        s
    }

    /// Records a new ready instance with the next free address; returns it.
    pub fn add_instance(&mut self) -> Instance {
        let inst = self.next_instance();
        self.instances.push(inst.clone());
        inst
    }

    fn next_instance(&mut self) -> Instance {
        let j = self.next_j;
        self.next_j += 1;
        let host = 1 + (j / RANGES.len()) % MAX_HOST;
        Instance {
            j,
            id: format!("{}-{j}", self.name),
            address: format!("{}.{host}", RANGES[j % RANGES.len()]),
            ready: true,
        }
    }

    /// Addresses that should appear as ready endpoints.
    pub fn ready_addresses(&self) -> BTreeSet<String> {
        self.instances
            .iter()
            .filter(|i| i.ready)
            .map(|i| i.address.clone())
            .collect()
    }

    pub fn ready_count(&self) -> usize {
        self.instances.iter().filter(|i| i.ready).count()
    }
}

/// `n` services named `<prefix>-<i>` in data set `set`, `m` instances each.
/// `prefix` must start with a letter so that the names need no mapping in Kubernetes.
pub fn make_services(prefix: &str, set: &str, n: usize, m: usize) -> Vec<Service> {
    (0..n)
        .map(|i| Service::new(format!("{prefix}-{i:05}"), set.to_string(), m))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_documentation_addresses_and_distinct_within_a_service() {
        let s = Service::new("a-00001".into(), "set".into(), 12);
        let addrs = s.ready_addresses();
        assert_eq!(addrs.len(), 12);
        assert!(addrs
            .iter()
            .all(|a| RANGES.iter().any(|r| a.starts_with(&format!("{r}.")))));
        assert_eq!(s.instances[0].address, "192.0.2.1");
        assert_eq!(s.instances[4].address, "198.51.100.2");
        assert_eq!(s.instances[4].id, "a-00001-4");
    }

    #[test]
    fn not_ready_instances_leave_the_ready_set() {
        let mut s = Service::new("a".into(), "set".into(), 3);
        s.instances[1].ready = false;
        assert_eq!(s.ready_count(), 2);
        assert!(!s.ready_addresses().contains(&s.instances[1].address));
        let next = s.add_instance();
        assert_eq!(next.j, 3);
        assert_eq!(s.instances.len(), 4);
    }

    #[test]
    fn names_are_dns_labels() {
        let v = make_services("s1a2b3c", "bench-sync-1a2b3c", 2, 1);
        assert_eq!(v[1].name, "s1a2b3c-00001");
        assert!(v.iter().all(|s| s.set == "bench-sync-1a2b3c"));
    }
}
