//! The registry writes that turn what this connector owns into what it wants: pure.
//!
//! Only differences are written: an instance equal to its registration costs nothing
//! (a restarted connector computes the same ids and finds everything in place, so it
//! never deregisters and registers again, consul-k8s#319), a changed readiness costs a
//! health write, anything else a registration. New instances are registered before old
//! ones are removed (make before break, so a roll-out never leaves a service empty).

use std::collections::BTreeMap;

use super::model::{Instance, Write};

/// The writes from `current` (owned entries, read back) to `desired`.
pub fn plan<'a>(
    desired: impl IntoIterator<Item = &'a Instance>,
    current: impl IntoIterator<Item = &'a Instance>,
) -> Vec<Write> {
    let mut current: BTreeMap<&str, &Instance> =
        current.into_iter().map(|i| (i.id.as_str(), i)).collect();
    let mut registers = Vec::new();
    let mut health = Vec::new();
    for want in desired {
        match current.remove(want.id.as_str()) {
            None => registers.push(Write::Register(want.clone())),
            Some(have) if !have.same_registration(want) => {
                registers.push(Write::Register(want.clone()))
            }
            Some(have) if have.health != want.health => health.push(Write::SetHealth(want.clone())),
            Some(_) => {}
        }
    }
    let deregisters = current.into_values().map(|i| Write::Deregister(i.clone()));
    registers
        .into_iter()
        .chain(health)
        .chain(deregisters)
        .collect()
}

/// Cuts `writes` into requests of at most `max` operations, `cost` giving each write's.
/// A write costlier than `max` gets a request of its own.
pub fn batches(writes: Vec<Write>, max: usize, cost: impl Fn(&Write) -> usize) -> Vec<Vec<Write>> {
    let max = max.max(1);
    let mut out: Vec<Vec<Write>> = Vec::new();
    let mut used = 0;
    for write in writes {
        let c = cost(&write).max(1);
        if out.is_empty() || used + c > max {
            out.push(Vec::new());
            used = 0;
        }
        used += c;
        if let Some(last) = out.last_mut() {
            last.push(write);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::model::{Health, ServiceKey};

    fn inst(id: &str, port: u16, health: Health) -> Instance {
        Instance {
            id: id.into(),
            service: "web".into(),
            source: ServiceKey::new("shop", "web"),
            address: "192.0.2.1".into(),
            port,
            ports: BTreeMap::new(),
            health,
            tags: vec![],
            meta: BTreeMap::new(),
        }
    }

    #[test]
    fn equal_states_write_nothing() {
        let a = vec![
            inst("a", 80, Health::Passing),
            inst("b", 80, Health::Critical),
        ];
        assert!(plan(&a, &a).is_empty());
    }

    #[test]
    fn new_changed_health_and_gone() {
        let current = vec![
            inst("a", 80, Health::Passing),
            inst("b", 80, Health::Passing),
            inst("c", 80, Health::Passing),
        ];
        let desired = vec![
            inst("a", 81, Health::Passing),
            inst("b", 80, Health::Critical),
            inst("d", 80, Health::Passing),
        ];
        let writes = plan(&desired, &current);
        let ops: Vec<(&str, &str)> = writes
            .iter()
            .map(|w| (w.op(), w.instance().id.as_str()))
            .collect();
        // Registrations first, removals last.
        assert_eq!(
            ops,
            vec![
                ("register", "a"),
                ("register", "d"),
                ("health", "b"),
                ("deregister", "c")
            ]
        );
        // A re-registration carries the desired health.
        assert_eq!(writes[0].instance().port, 81);
    }

    #[test]
    fn batches_respect_the_operation_limit() {
        let writes: Vec<Write> = (0..5)
            .map(|i| Write::Register(inst(&i.to_string(), 80, Health::Passing)))
            .collect();
        let cost = |w: &Write| if w.instance().id == "2" { 2 } else { 1 };
        let sizes: Vec<usize> = batches(writes.clone(), 2, cost)
            .iter()
            .map(|b| b.len())
            .collect();
        assert_eq!(sizes, vec![2, 1, 2]);
        let sizes: Vec<usize> = batches(writes, 64, cost).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, vec![5]);
        assert!(batches(Vec::new(), 64, |_| 1).is_empty());
    }
}
