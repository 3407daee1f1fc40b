//! Engine passes against an in-memory registry: the Kubernetes view is a
//! [`ClusterIndex`] filled by hand, the registry a [`FakeWriter`] that records what
//! reached it and can stall, or flip the leadership, in the middle of a write.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use kube::api::ObjectMeta;
use kube::runtime::watcher::Event;

use super::*;
use crate::export::{Applied, Rejected};

/// What the fake does with one `apply` call, by the call's number (0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Applies the writes and answers.
    Apply,
    /// Applies the writes, then never answers (the answer is lost on the way back).
    ApplyThenHang,
}

type Hook = Box<dyn Fn(usize) -> Step + Send + Sync>;
/// The reason the fake refuses a write, if it does.
type Refusal = Box<dyn Fn(&Write) -> Option<String> + Send + Sync>;

/// An in-memory registry: what this connector owns there, and every request.
struct FakeWriter {
    held: Mutex<BTreeMap<String, Instance>>,
    reads: AtomicUsize,
    calls: AtomicUsize,
    /// Every write that reached the registry, in order.
    log: Mutex<Vec<Write>>,
    hook: Hook,
    /// Called with the call number after the writes are applied (flips the lease).
    after_apply: Box<dyn Fn(usize) + Send + Sync>,
    /// The reason the registry refuses a write, if it does (the rest is applied).
    refuse: Refusal,
    /// Desired instances computed, by Service name (each goes through `normalize`).
    normalized: Mutex<BTreeMap<String, usize>>,
}

#[derive(Debug, thiserror::Error)]
#[error("fake registry error")]
struct FakeError;

impl FakeWriter {
    fn new() -> Self {
        Self {
            held: Mutex::default(),
            reads: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
            log: Mutex::default(),
            hook: Box::new(|_| Step::Apply),
            after_apply: Box::new(|_| {}),
            refuse: Box::new(|_| None),
            normalized: Mutex::default(),
        }
    }

    fn registered(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|w| matches!(w, Write::Register(_)))
            .map(|w| w.instance().id.clone())
            .collect()
    }
}

impl RegistryWriter for FakeWriter {
    const NAME: &'static str = "fake";
    type Error = FakeError;

    fn register_metrics(&self, _registry: &mut prometheus_client::registry::Registry) {}

    fn max_ops_per_request(&self) -> usize {
        1
    }

    fn cost(&self, _write: &Write) -> usize {
        1
    }

    async fn read(&self) -> Result<Registered, FakeError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        Ok(Registered {
            instances: self.held.lock().unwrap().values().cloned().collect(),
            shared_names: Default::default(),
        })
    }

    fn normalize(&self, instance: &mut Instance) {
        *self
            .normalized
            .lock()
            .unwrap()
            .entry(instance.source.name.clone())
            .or_default() += 1;
    }

    async fn apply(&self, writes: &[Write]) -> Result<Applied, FakeError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let mut applied = Applied::default();
        {
            let mut held = self.held.lock().unwrap();
            for (index, write) in writes.iter().enumerate() {
                if let Some(reason) = (self.refuse)(write) {
                    applied.rejected.push(Rejected { index, reason });
                    continue;
                }
                match write {
                    Write::Register(i) | Write::SetHealth(i) => {
                        held.insert(i.id.clone(), i.clone());
                    }
                    Write::Deregister(i) => {
                        held.remove(&i.id);
                    }
                }
                self.log.lock().unwrap().push(write.clone());
            }
        }
        (self.after_apply)(call);
        if (self.hook)(call) == Step::ApplyThenHang {
            std::future::pending::<()>().await;
        }
        Ok(applied)
    }
}

/// An ExternalName Service: one instance, at its external name.
fn external(name: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            namespace: Some("shop".into()),
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ExternalName".into()),
            external_name: Some(format!("{name}.example.org")),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn index_of(names: &[&str]) -> SharedIndex {
    let mut ix = ClusterIndex::default();
    for name in names {
        ix.apply_service(Event::Apply(external(name)));
    }
    Arc::new(RwLock::new(ix))
}

fn delete(index: &SharedIndex, name: &str) {
    index
        .write()
        .unwrap()
        .apply_service(Event::Delete(external(name)));
}

fn held_names(writer: &FakeWriter) -> Vec<String> {
    let mut names: Vec<String> = writer
        .held
        .lock()
        .unwrap()
        .values()
        .map(|i| i.source.name.clone())
        .collect();
    names.sort();
    names.dedup();
    names
}

fn keys_of(names: &[&str]) -> Vec<ServiceKey> {
    names.iter().map(|n| ServiceKey::new("shop", *n)).collect()
}

/// An exporter that never reaches an apiserver (the tests drive its passes directly).
fn exporter(writer: FakeWriter, leader: Option<watch::Receiver<bool>>) -> Exporter<FakeWriter> {
    exporter_with(writer, leader, Events::disabled())
}

fn exporter_with(
    writer: FakeWriter,
    leader: Option<watch::Receiver<bool>>,
    events: Events,
) -> Exporter<FakeWriter> {
    let url = "http://127.0.0.1:9".parse().expect("a URL");
    let client = Client::try_from(kube::Config::new(url)).expect("a client");
    let ex = Exporter::new(client, writer, ExportConfig::default()).with_events(events);
    match leader {
        Some(rx) => ex.with_leadership(rx),
        None => ex,
    }
}

/// Long enough for any pass of these tests; time is paused, so it costs nothing.
const PASS_DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(start_paused = true)]
async fn a_lease_lost_during_a_batch_writes_no_further_batch() {
    let names = ["a", "b", "c"];
    let (lease_tx, lease_rx) = watch::channel(true);
    let lease_tx = Arc::new(lease_tx);
    let mut writer = FakeWriter::new();
    // The first batch reaches the registry, then the lease is lost while its answer
    // is still on the way.
    let flip = lease_tx.clone();
    writer.after_apply = Box::new(move |call| {
        if call == 0 {
            flip.send_replace(false);
        }
    });
    writer.hook = Box::new(|call| {
        if call == 0 {
            Step::ApplyThenHang
        } else {
            Step::Apply
        }
    });
    let ex = exporter(writer, Some(lease_rx.clone()));
    let index = index_of(&names);
    let mut state = State::new(&ex);

    let pass = state.pass(&ex, &index, keys_of(&names), Some(lease_rx.clone()));
    tokio::time::timeout(PASS_DEADLINE, pass)
        .await
        .expect("the pass stops when the lease is lost, without waiting for the answer");
    let writer = ex.writer();
    assert_eq!(
        writer.calls.load(Ordering::SeqCst),
        1,
        "no batch after the loss"
    );
    assert!(!state.leader);
    assert!(
        state.owned.is_none(),
        "the cached view is dropped with the lease"
    );
    assert!(!ex.status.borrow().leader);

    // A new term: the loop hears of it, and the next pass reads the registry (which
    // holds the first batch, applied although its answer was lost) before writing.
    lease_tx.send_replace(true);
    let mut loop_rx = Some(lease_rx);
    let leads = changed(&mut loop_rx).await;
    assert_eq!(leads, Some(true));
    state.on_leadership::<FakeWriter>(true);
    let pass = state.pass(&ex, &index, keys_of(&names), loop_rx.clone());
    tokio::time::timeout(PASS_DEADLINE, pass)
        .await
        .expect("the pass ends");
    assert_eq!(writer.reads.load(Ordering::SeqCst), 2, "read again");
    let mut registered = writer.registered();
    registered.sort();
    registered.dedup();
    assert_eq!(registered.len(), 3, "every instance written once in all");
    assert_eq!(writer.registered().len(), 3, "nothing written twice");
    assert!(ex.status.borrow().initial_sync_done);
}

#[tokio::test(start_paused = true)]
async fn a_lease_lost_and_regained_during_a_pass_starts_over_from_a_read() {
    let names = ["a", "b", "c"];
    let (lease_tx, lease_rx) = watch::channel(true);
    let lease_tx = Arc::new(lease_tx);
    let mut writer = FakeWriter::new();
    // While the first batch is written the lease goes to another replica and comes
    // back: the answer arrives normally, but what the other replica did meanwhile is
    // not in the cached view.
    let flip = lease_tx.clone();
    writer.after_apply = Box::new(move |call| {
        if call == 0 {
            flip.send_replace(false);
            flip.send_replace(true);
        }
    });
    let ex = exporter(writer, Some(lease_rx.clone()));
    let index = index_of(&names);
    let mut state = State::new(&ex);
    let mut loop_rx = Some(lease_rx);

    let pass = state.pass(&ex, &index, keys_of(&names), loop_rx.clone());
    tokio::time::timeout(PASS_DEADLINE, pass)
        .await
        .expect("the pass ends");
    let writer = ex.writer();
    assert_eq!(
        writer.calls.load(Ordering::SeqCst),
        1,
        "no batch after the change"
    );

    // Meanwhile the other replica removed what the first batch wrote.
    writer.held.lock().unwrap().clear();
    // The loop sees the change although the value is the same as before.
    assert_eq!(changed(&mut loop_rx).await, Some(true));
    state.on_leadership::<FakeWriter>(true);
    assert!(state.leader);
    let pass = state.pass(&ex, &index, keys_of(&names), loop_rx.clone());
    tokio::time::timeout(PASS_DEADLINE, pass)
        .await
        .expect("the pass ends");
    assert_eq!(writer.reads.load(Ordering::SeqCst), 2, "read again");
    assert_eq!(
        writer.held.lock().unwrap().len(),
        3,
        "the removed instance is written back, not trusted from the cache"
    );
}

#[tokio::test(start_paused = true)]
async fn a_loss_too_short_for_the_loop_to_see_still_ends_the_term() {
    let names = ["a", "b"];
    let (lease_tx, lease_rx) = watch::channel(true);
    let ex = exporter(FakeWriter::new(), Some(lease_rx.clone()));
    let index = index_of(&names);
    let mut state = State::new(&ex);
    let mut loop_rx = Some(lease_rx);
    let pass = state.pass(&ex, &index, keys_of(&names), loop_rx.clone());
    tokio::time::timeout(PASS_DEADLINE, pass)
        .await
        .expect("the pass ends");
    assert!(state.owned.is_some());

    // Between two passes the lease goes and comes back before the loop looks: it
    // sees one notification, saying "leading", as before.
    lease_tx.send_replace(false);
    lease_tx.send_replace(true);
    assert_eq!(changed(&mut loop_rx).await, Some(true));
    state.on_leadership::<FakeWriter>(true);
    assert!(state.owned.is_none(), "the cached view is not trusted");
    assert!(state.full_pass_due);
}

#[tokio::test(start_paused = true)]
async fn a_write_the_registry_refuses_is_reported_once_and_the_rest_is_written() {
    use std::sync::atomic::AtomicBool;
    let names = ["a", "b", "c"];
    let refusing = Arc::new(AtomicBool::new(true));
    let mut writer = FakeWriter::new();
    let refuses = refusing.clone();
    writer.refuse = Box::new(move |w| {
        (w.instance().source.name == "b" && refuses.load(Ordering::SeqCst))
            .then(|| "Permission denied".to_string())
    });
    let (events, captured) = Events::capturing();
    let ex = exporter_with(writer, None, events);
    let index = index_of(&names);
    let mut state = State::new(&ex);

    let rejected = |ex: &Exporter<FakeWriter>| {
        ex.metrics()
            .rejected_writes
            .get_or_create(&crate::export::metrics::OpLabels {
                registry: "fake",
                op: "register",
            })
            .get()
    };
    state.pass(&ex, &index, keys_of(&names), None).await;
    let writer = ex.writer();
    let mut held: Vec<String> = writer
        .held
        .lock()
        .unwrap()
        .values()
        .map(|i| i.source.name.clone())
        .collect();
    held.sort();
    assert_eq!(held, ["a", "c"], "the others are written");
    assert_eq!(rejected(&ex), 1);
    assert!(
        ex.status.borrow().initial_sync_done,
        "one refused instance does not hold up the others"
    );
    assert!(state.retries.is_empty(), "not retried at once");
    {
        let events = captured.lock().unwrap();
        assert_eq!(events.len(), 1);
        let (object, reason, note) = &events[0];
        assert_eq!(object.name.as_deref(), Some("b"));
        assert_eq!(object.namespace.as_deref(), Some("shop"));
        assert_eq!(reason, "RegistryRejected");
        assert!(note.contains("Permission denied"), "{note}");
    }

    // The Service changes: tried again, refused again, counted but not reported again.
    state.pass(&ex, &index, keys_of(&["b"]), None).await;
    assert_eq!(rejected(&ex), 2);
    assert_eq!(captured.lock().unwrap().len(), 1, "reported once");

    // The registry takes it at the next try.
    refusing.store(false, Ordering::SeqCst);
    state.pass(&ex, &index, keys_of(&["b"]), None).await;
    assert_eq!(writer.held.lock().unwrap().len(), 3);
    assert!(state.rejections.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_removal_computes_only_the_services_of_its_pass() {
    let names: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let ex = exporter(FakeWriter::new(), None);
    let index = index_of(&names);
    let mut state = State::new(&ex);
    state.pass(&ex, &index, keys_of(&names), None).await;
    let writer = ex.writer();
    assert_eq!(writer.held.lock().unwrap().len(), 20);
    writer.normalized.lock().unwrap().clear();

    // One Service goes: its pass computes it, not the 19 others (O(removed), not
    // O(managed)), and the guard lets one removal of twenty through.
    delete(&index, "s0");
    state.pass(&ex, &index, keys_of(&["s0"]), None).await;
    assert_eq!(
        *writer.normalized.lock().unwrap(),
        BTreeMap::new(),
        "no desired state computed for the Services outside the pass"
    );
    assert_eq!(writer.held.lock().unwrap().len(), 19, "removed");
    assert!(state.orphans.is_empty());
}

#[tokio::test(start_paused = true)]
async fn held_removals_count_towards_the_next_evaluation() {
    let names = ["a", "b", "c", "d"];
    let ex = exporter(FakeWriter::new(), None);
    let index = index_of(&names);
    let mut state = State::new(&ex);
    state.pass(&ex, &index, keys_of(&names), None).await;

    // Three of four at once: more than the default half, held.
    for name in ["a", "b", "c"] {
        delete(&index, name);
    }
    state
        .pass(&ex, &index, keys_of(&["a", "b", "c"]), None)
        .await;
    let writer = ex.writer();
    assert_eq!(held_names(&writer), ["a", "b", "c", "d"]);
    assert_eq!(state.held.len(), 3);

    // The last one alone: one removal in its pass, but four of four with the held
    // ones, so held too (counting only the pass's own removals would let it go).
    delete(&index, "d");
    state.pass(&ex, &index, keys_of(&["d"]), None).await;
    assert_eq!(held_names(&writer), ["a", "b", "c", "d"]);
    assert_eq!(state.held.len(), 4);

    // One comes back: no longer counted.
    index
        .write()
        .unwrap()
        .apply_service(Event::Apply(external("a")));
    state.pass(&ex, &index, keys_of(&["a"]), None).await;
    assert_eq!(state.orphans.len(), 3);
    assert!(!state.held.contains(&ServiceKey::new("shop", "a")));
}

#[tokio::test(start_paused = true)]
async fn the_first_pass_of_a_term_removes_what_left_while_nobody_led() {
    let names = ["a", "b", "c", "x"];
    let ex = exporter(FakeWriter::new(), None);
    let index = index_of(&names);
    let mut state = State::new(&ex);
    state.pass(&ex, &index, keys_of(&names), None).await;
    let writer = ex.writer();
    assert_eq!(held_names(&writer), names);

    // x is deleted while no replica leads; a new term starts with nothing cached and,
    // as the loop does, passes over the Services it knows.
    delete(&index, "x");
    let mut state = State::new(&ex);
    let keys = state.all_keys(&index);
    state.pass(&ex, &index, keys, None).await;
    assert_eq!(
        held_names(&writer),
        ["a", "b", "c"],
        "x removed by this pass"
    );
    assert!(state.orphans.is_empty());
}
