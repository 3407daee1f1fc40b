//! The registry the export workload reads back: Consul ([`ExportConsul`], blocking
//! queries) or Eureka ([`ExportEureka`], polls). The workload's steps are the same for
//! both; this enum is where they differ: what "every instance is there" means, how a
//! flip is waited for, what a restart is compared on, and what the clean-up removes.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Result;

use super::consul_export::ExportConsul;
use super::eureka_export::{ExportEureka, Owned};
use super::Kind;

/// The export workload's registry.
#[derive(Debug, Clone)]
pub enum ExportRegistry {
    Consul(ExportConsul),
    Eureka(ExportEureka),
}

/// Taken before a write, so that its effect cannot be missed: Consul's health index to
/// block on; Eureka has none (polls compare states).
#[derive(Debug, Clone, Copy)]
pub enum Cursor {
    Consul(u64),
    Eureka,
}

/// What a restart is compared on.
#[derive(Debug, Clone)]
pub enum Snapshot {
    /// Registration id → `ModifyIndex`.
    Consul(BTreeMap<String, u64>),
    Eureka(Owned),
}

/// Instances whose stamps moved across a restart (or that appeared or went).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StampChanges {
    /// Instances after the restart.
    pub instances: usize,
    /// Consul: `ModifyIndex`; Eureka: `lastUpdatedTimestamp`.
    pub primary: usize,
    /// Eureka only: `lastDirtyTimestamp`.
    pub last_dirty: Option<usize>,
    /// Eureka only: `leaseInfo.registrationTimestamp`.
    pub registration: Option<usize>,
}

/// Keys whose value differs, or that are in one map only.
pub fn changed<V: PartialEq>(before: &BTreeMap<String, V>, after: &BTreeMap<String, V>) -> usize {
    let moved = before
        .iter()
        .filter(|(id, v)| after.get(*id) != Some(*v))
        .count();
    moved + after.keys().filter(|id| !before.contains_key(*id)).count()
}

impl Snapshot {
    /// What moved between `self` (before) and `after`.
    pub fn compare(&self, after: &Snapshot) -> StampChanges {
        match (self, after) {
            (Snapshot::Consul(b), Snapshot::Consul(a)) => StampChanges {
                instances: a.len(),
                primary: changed(b, a),
                ..Default::default()
            },
            (Snapshot::Eureka(b), Snapshot::Eureka(a)) => StampChanges {
                instances: a.instances.len(),
                primary: changed(&b.last_updated(), &a.last_updated()),
                last_dirty: Some(changed(&b.last_dirty(), &a.last_dirty())),
                registration: Some(changed(&b.registered(), &a.registered())),
            },
            _ => StampChanges::default(),
        }
    }
}

impl ExportRegistry {
    pub fn kind(&self) -> Kind {
        match self {
            ExportRegistry::Consul(_) => Kind::Consul,
            ExportRegistry::Eureka(_) => Kind::Eureka,
        }
    }

    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// Instances of the run already in the registry (0 expected before the start):
    /// Consul, everything on the run's node; Eureka, the run's connector id.
    pub async fn existing(&self) -> Result<usize> {
        Ok(match self {
            ExportRegistry::Consul(c) => c.node(0).await?.services.len(),
            ExportRegistry::Eureka(e) => e.owned().await?.instances.len(),
        })
    }

    /// Waits until the registry shows `want` instances (Consul: of connector `owner`,
    /// any with `None`), all passing / `UP`; returns when that answer arrived.
    pub async fn wait_registered(
        &self,
        owner: Option<&str>,
        want: usize,
        deadline: Instant,
    ) -> Result<Instant> {
        match self {
            ExportRegistry::Consul(c) => Ok(c.wait_registered(owner, want, deadline).await?.0),
            ExportRegistry::Eureka(e) => Ok(e.wait_registered(want, deadline).await?.0),
        }
    }

    /// Taken before the write whose effect [`ExportRegistry::wait_status`] waits for.
    pub async fn cursor(&self, service: &str, ip: &str) -> Result<Cursor> {
        match self {
            ExportRegistry::Consul(c) => {
                Ok(Cursor::Consul(c.instance_status(service, ip, 0).await?.1))
            }
            ExportRegistry::Eureka(_) => Ok(Cursor::Eureka),
        }
    }

    /// Waits until the instance at `ip` of `service` shows `want` (Consul: `passing`,
    /// `critical`; Eureka: `UP`, `OUT_OF_SERVICE`; `None`: absent), at most until
    /// `deadline`; when the answer that showed it arrived.
    pub async fn wait_status(
        &self,
        service: &str,
        ip: &str,
        want: Option<&str>,
        cursor: Cursor,
        deadline: Instant,
    ) -> Result<Option<Instant>> {
        match (self, cursor) {
            (ExportRegistry::Consul(c), Cursor::Consul(mut index)) => {
                while Instant::now() < deadline {
                    // A request that fails (Consul closing a connection at its
                    // per-client limit, which consul-k8s's own connections from this
                    // address count against) is asked again, not the end of the run.
                    let (status, at) = match c.instance_status(service, ip, index).await {
                        Ok(answer) => answer,
                        Err(e) => {
                            crate::say(format!("asking Consul again after: {e:#}"));
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                            continue;
                        }
                    };
                    if status.as_deref() == want {
                        return Ok(Some(Instant::now()));
                    }
                    // An index that went backwards (a Consul restart) starts over.
                    index = if at < index { 0 } else { at };
                }
                Ok(None)
            }
            (ExportRegistry::Eureka(e), _) => e.wait_status(service, ip, want, deadline).await,
            (ExportRegistry::Consul(_), Cursor::Eureka) => {
                anyhow::bail!("a Eureka cursor given to the Consul reader")
            }
        }
    }

    /// The stamps a restart is compared on.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        Ok(match self {
            ExportRegistry::Consul(c) => Snapshot::Consul(c.node(0).await?.modify_indexes()),
            ExportRegistry::Eureka(e) => Snapshot::Eureka(e.owned().await?),
        })
    }

    /// Removes what the run registered: Consul, the run's node (with every
    /// registration on it); Eureka, every instance carrying the run's connector id.
    /// Returns what was done, for the report.
    pub async fn remove_all(&self) -> Result<String> {
        match self {
            ExportRegistry::Consul(c) => {
                c.deregister_node().await?;
                Ok(format!("Consul node {} deregistered", c.node))
            }
            ExportRegistry::Eureka(e) => {
                let n = e.cancel_owned().await?;
                Ok(format!("{n} Eureka instances cancelled"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::eureka_export::EurekaInstance;

    #[test]
    fn changed_counts_moved_added_and_gone() {
        let before = BTreeMap::from([("a".into(), 1), ("b".into(), 2), ("c".into(), 3)]);
        let after = BTreeMap::from([("a".into(), 1), ("b".into(), 5), ("d".into(), 4)]);
        assert_eq!(changed(&before, &after), 3);
        assert_eq!(changed(&before, &before), 0);
    }

    #[test]
    fn eureka_snapshots_compare_each_stamp() {
        let inst = |updated, dirty| EurekaInstance {
            app: "WEB".into(),
            ip: "192.0.2.1".into(),
            status: "UP".into(),
            last_updated: Some(updated),
            last_dirty: Some(dirty),
            registered: Some(1),
        };
        let before = Snapshot::Eureka(Owned {
            instances: BTreeMap::from([("a".into(), inst(10, 5)), ("b".into(), inst(10, 5))]),
        });
        let after = Snapshot::Eureka(Owned {
            instances: BTreeMap::from([("a".into(), inst(11, 5)), ("b".into(), inst(10, 5))]),
        });
        assert_eq!(
            before.compare(&after),
            StampChanges {
                instances: 2,
                primary: 1,
                last_dirty: Some(0),
                registration: Some(0),
            }
        );
    }
}
