//! Watches the apiserver for the objects the connector writes and times when each
//! service reaches the state the harness expects.
//!
//! A [`Tracker`] runs a kube-runtime watcher on one kind in one namespace, keeps, per
//! service, the set of ready endpoint addresses (union over its objects), and resolves
//! *expectations*: "service S has exactly these ready addresses". An expectation is
//! registered before the registry change is made, so no event can be missed, and it
//! resolves at the instant the watch event that made the state match was received.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Endpoints;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

/// Which service an object belongs to and the ready addresses it carries.
type Extract<K> = fn(&K) -> Option<(String, BTreeSet<String>)>;

#[derive(Default)]
struct State {
    /// service -> object name -> ready addresses.
    objects: HashMap<String, BTreeMap<String, BTreeSet<String>>>,
    /// service -> (expected ready addresses, id).
    expected: HashMap<String, (BTreeSet<String>, u64)>,
    /// id -> instant the expectation was met.
    met: HashMap<u64, Instant>,
    next_id: u64,
    events: u64,
}

impl State {
    fn ready(&self, service: &str) -> BTreeSet<String> {
        self.objects
            .get(service)
            .map(|objs| objs.values().flatten().cloned().collect())
            .unwrap_or_default()
    }

    fn check(&mut self, service: &str, now: Instant) {
        let Some((want, id)) = self.expected.get(service) else {
            return;
        };
        let (want, id) = (want.clone(), *id);
        if self.ready(service) == want {
            self.expected.remove(service);
            self.met.insert(id, now);
        }
    }
}

/// A running watch on one kind in one namespace.
pub struct Tracker {
    state: Arc<Mutex<State>>,
    changed: watch::Receiver<u64>,
    synced: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Tracker {
    /// Watches EndpointSlices: service from `kubernetes.io/service-name`, ready
    /// addresses from endpoints whose `ready` condition is not false.
    pub fn endpoint_slices(client: Client, namespace: &str) -> Tracker {
        Self::start::<EndpointSlice>(Api::namespaced(client, namespace), |s| {
            let service = s.labels().get("kubernetes.io/service-name")?.clone();
            let ready = s
                .endpoints
                .iter()
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
                .flat_map(|e| e.addresses.iter().cloned())
                .collect();
            Some((service, ready))
        })
    }

    /// Watches legacy Endpoints: service = object name, ready = `subsets[].addresses`.
    pub fn endpoints(client: Client, namespace: &str) -> Tracker {
        Self::start::<Endpoints>(Api::namespaced(client, namespace), |e| {
            let ready = e
                .subsets
                .iter()
                .flatten()
                .flat_map(|s| s.addresses.iter().flatten().map(|a| a.ip.clone()))
                .collect();
            Some((e.name_any(), ready))
        })
    }

    fn start<K>(api: Api<K>, extract: Extract<K>) -> Tracker
    where
        K: Resource<DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let state = Arc::new(Mutex::new(State::default()));
        let (changed_tx, changed) = watch::channel(0u64);
        let (synced_tx, synced) = watch::channel(false);
        let st = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let stream = watcher(api, watcher::Config::default()).default_backoff();
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                let now = Instant::now();
                let Ok(event) = event else { continue };
                let mut s = lock(&st);
                s.events += 1;
                let touched = match event {
                    Event::Apply(obj) | Event::InitApply(obj) => {
                        extract(&obj).map(|(svc, ready)| {
                            s.objects
                                .entry(svc.clone())
                                .or_default()
                                .insert(obj.name_any(), ready);
                            svc
                        })
                    }
                    Event::Delete(obj) => extract(&obj).map(|(svc, _)| {
                        if let Some(objs) = s.objects.get_mut(&svc) {
                            objs.remove(&obj.name_any());
                            if objs.is_empty() {
                                s.objects.remove(&svc);
                            }
                        }
                        svc
                    }),
                    Event::Init => None,
                    Event::InitDone => {
                        synced_tx.send_replace(true);
                        None
                    }
                };
                if let Some(svc) = touched {
                    s.check(&svc, now);
                }
                let events = s.events;
                drop(s);
                changed_tx.send_replace(events);
            }
        });
        Tracker {
            state,
            changed,
            synced,
            task,
        }
    }

    /// Waits for the first complete list.
    pub async fn wait_synced(&self, timeout: Duration) -> anyhow::Result<()> {
        let mut rx = self.synced.clone();
        tokio::time::timeout(timeout, rx.wait_for(|s| *s))
            .await
            .map_err(|_| anyhow::anyhow!("the watch did not list within {timeout:?}"))?
            .map_err(|_| anyhow::anyhow!("the watch task ended"))?;
        Ok(())
    }

    /// Registers an expectation; returns its id. Replaces any earlier one for `service`.
    pub fn expect(&self, service: &str, ready: BTreeSet<String>) -> u64 {
        let mut s = lock(&self.state);
        let id = s.next_id;
        s.next_id += 1;
        s.expected.insert(service.to_string(), (ready, id));
        s.check(service, Instant::now());
        id
    }

    /// The instant expectation `id` was met, if it was.
    pub fn met(&self, id: u64) -> Option<Instant> {
        lock(&self.state).met.get(&id).copied()
    }

    /// Number of expectations still open.
    pub fn open(&self) -> usize {
        lock(&self.state).expected.len()
    }

    /// Whether `service` still has an open expectation.
    pub fn is_open(&self, service: &str) -> bool {
        lock(&self.state).expected.contains_key(service)
    }

    /// Latest instant any expectation was met.
    pub fn last_met(&self) -> Option<Instant> {
        lock(&self.state).met.values().max().copied()
    }

    /// Waits until `done()` holds or `deadline` passes; true when it holds.
    pub async fn wait_until(&self, deadline: Instant, mut done: impl FnMut(&Self) -> bool) -> bool {
        let mut rx = self.changed.clone();
        loop {
            if done(self) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            // Re-check at least every 200 ms (expectations may be added meanwhile).
            let step = (deadline - now).min(Duration::from_millis(200));
            let _ = tokio::time::timeout(step, rx.changed()).await;
        }
    }
}
