//! Kubernetes Events for what an operator should see in `kubectl describe`: a name
//! clash, held deletions, a service that keeps failing to sync.
//!
//! Published with kube-runtime's `Recorder` (events.k8s.io/v1; repeats of one event are
//! aggregated into a series by the recorder). Publishing never blocks a reconcile and
//! its failure is only logged: events are a courtesy, not part of the sync.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;
use tracing::debug;

/// The controller name events are reported under.
const REPORTER: &str = "registry-connector";

/// At most this many Services get a "deletion held" event per hold: a registry that
/// lost 10,000 services must not cause 10,000 events.
pub const MAX_HELD_EVENTS: usize = 20;

/// Consecutive failures of one service after which (and every tenth after that) an
/// event is published on its Service.
pub const FAILURES_BEFORE_EVENT: u32 = 3;

#[derive(Clone)]
pub struct Events {
    recorder: Option<Recorder>,
    /// Where a test's events go instead (see [`Events::capturing`]).
    #[cfg(test)]
    captured: Option<std::sync::Arc<std::sync::Mutex<Vec<Captured>>>>,
}

/// An event a test captured: the object, the reason and the note.
#[cfg(test)]
pub type Captured = (ObjectReference, String, String);

impl Events {
    pub fn new(client: Client) -> Self {
        let reporter = Reporter {
            controller: REPORTER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Some(Recorder::new(client, reporter)),
            #[cfg(test)]
            captured: None,
        }
    }

    /// Events that go nowhere (tests of pure logic, dry runs).
    pub fn disabled() -> Self {
        Self {
            recorder: None,
            #[cfg(test)]
            captured: None,
        }
    }

    /// Events kept in memory, for tests that check what is reported.
    #[cfg(test)]
    pub fn capturing() -> (Self, std::sync::Arc<std::sync::Mutex<Vec<Captured>>>) {
        let captured = std::sync::Arc::default();
        let events = Self {
            recorder: None,
            captured: Some(std::sync::Arc::clone(&captured)),
        };
        (events, captured)
    }

    /// Somebody else's object holds the name a registry service needs.
    pub fn name_clash(&self, object: ObjectReference, registry_name: &str) {
        self.publish(
            object,
            EventType::Warning,
            "NameClash",
            "Sync",
            format!(
                "registry service {registry_name:?} maps to this name, but this object is not managed by \
                 registry-connector (missing its ownership labels); it is left untouched and the registry \
                 service is not synced"
            ),
        );
    }

    /// The mass-deletion guard keeps this Service although the registry dropped it.
    pub fn deletion_held(&self, object: ObjectReference, managed: usize, orphans: usize) {
        self.publish(
            object,
            EventType::Warning,
            "DeletionHeld",
            "Delete",
            format!(
                "the registry no longer lists this service, but deleting {orphans} of {managed} managed \
                 services at once exceeds the mass-deletion threshold; held until it persists for the \
                 hold time or an operator allows it"
            ),
        );
    }

    /// Writes for this Service keep failing.
    pub fn sync_failing(&self, object: ObjectReference, attempts: u32, error: &str) {
        self.publish(
            object,
            EventType::Warning,
            "SyncFailed",
            "Sync",
            format!("{attempts} consecutive attempts failed; retrying with backoff. Last error: {error}"),
        );
    }

    /// The registry refused one write of this Service's instances (the others went
    /// through); reported once while the refusal lasts.
    pub fn write_rejected(&self, object: ObjectReference, op: &str, instance: &str, reason: &str) {
        self.publish(
            object,
            EventType::Warning,
            "RegistryRejected",
            "Sync",
            format!(
                "the registry refused to {op} instance {instance}: {reason}; the Service's other \
                 instances are written, this one is tried again when the Service changes or at \
                 the next resync"
            ),
        );
    }

    fn publish(
        &self,
        object: ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        #[cfg(test)]
        if let Some(captured) = &self.captured {
            if let Ok(mut captured) = captured.lock() {
                captured.push((object, reason.to_string(), note));
            }
            return;
        }
        let Some(recorder) = self.recorder.clone() else {
            return;
        };
        let event = Event {
            type_,
            reason: reason.into(),
            // The API caps notes at 1 kB.
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &object).await {
                debug!(error = %e, reason = %event.reason, "could not publish an event");
            }
        });
    }
}
