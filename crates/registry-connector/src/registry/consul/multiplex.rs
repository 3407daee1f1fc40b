//! The multiplexed mode's long polls: every per-service blocking query over HTTP/2 held
//! by one task, each as a small record and the future of its stream.
//!
//! Why not a task per service, as over HTTP/1.1: a task that waits minutes for its
//! answer carries its whole future, a span, a cancellation token and the task header
//! (1.8 KB each, measured with heaptrack at 10,000 long polls: 18 MiB). Here a waiting
//! long poll is its record (index, pacing, place on a connection) and the boxed future of
//! its stream; one deadline queue replaces 10,000 timers. futures' `FuturesUnordered` and
//! `Abortable` and tokio-util's `DelayQueue` do the scheduling; what is ours is the state
//! machine of one long poll: place → blocking query → answer → pause → query ...
//!
//! Owns: for each service it is handed, getting a place on a connection, the blocking
//! queries (short first wait, then spread, then the configured wait), their deadlines,
//! pacing and backoff, publishing the answers whose index moved. Does not: decide which
//! services get a long poll (the watch loop does), speak HTTP/2 (see `super::h2`) or
//! decode (see [`super::http`]).

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::{AbortHandle, AbortRegistration, Abortable, BoxFuture};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::time::{delay_queue, DelayQueue};
use tracing::{debug, info_span, Instrument};

use crate::registry::Pacer;

use super::api::next_index;
use super::error::ConsulError;
use super::h2::{Failure, H2Answer};
use super::http::{request_timeout, PollAnswer, PollSlot};
use super::watch::{lock, poll_failed, Publisher, Shared, Tracked, WaitStep};

/// The task holding every HTTP/2 long poll, and how the watch loop talks to it.
pub(super) struct Multiplexer {
    commands: mpsc::UnboundedSender<Command>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Multiplexer {
    pub(super) fn spawn(shared: Arc<Shared>, shutdown: &CancellationToken) -> Self {
        let (commands, receiver) = mpsc::unbounded_channel();
        let stop = shutdown.child_token();
        let task = tokio::spawn(
            run(shared, receiver, stop.clone()).instrument(info_span!("consul_long_polls")),
        );
        Self {
            commands,
            stop,
            task,
        }
    }

    /// Starts following `name` from `index` (0: its first query is a plain read).
    pub(super) fn start(
        &self,
        name: &str,
        tracked: Arc<Tracked>,
        index: u64,
        short_first_wait: bool,
    ) {
        let _ = self.commands.send(Command::Start {
            name: name.into(),
            tracked,
            index,
            short_first_wait,
        });
    }

    /// Stops following `name`: its stream is reset at once (HTTP/2 frees the place with
    /// it; nothing lingers as an HTTP/1.1 connection would).
    pub(super) fn stop_polling(&self, name: &str) {
        let _ = self.commands.send(Command::Stop(name.into()));
    }

    /// Whether the task ended (it ends only at shutdown, or by a bug).
    pub(super) fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops every long poll and waits for the task.
    pub(super) async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

enum Command {
    Start {
        name: Arc<str>,
        tracked: Arc<Tracked>,
        index: u64,
        short_first_wait: bool,
    },
    Stop(Arc<str>),
}

/// One service's long poll.
struct LongPoll {
    tracked: Arc<Tracked>,
    /// Its place on a connection, once it has one.
    slot: Option<PollSlot>,
    /// The index its next query blocks on.
    index: u64,
    step: WaitStep,
    pacer: Pacer,
    /// Bumped by every step started: what an older step reports comes too late.
    generation: u32,
    phase: Phase,
}

enum Phase {
    /// Between two steps (only while the task handles one event).
    Idle,
    /// A step in flight (getting a place, or a query), with its deadline.
    InFlight {
        abort: AbortHandle,
        deadline: Option<delay_queue::Key>,
    },
    /// Paced or backing off until the timer fires.
    Paused(delay_queue::Key),
}

/// What a step in flight does.
enum Job {
    Place(Arc<Shared>),
    Query(Arc<super::h2::H2Shard>, String),
}

enum Outcome {
    Place(Result<PollSlot, ConsulError>),
    Answer(Result<H2Answer, Failure>),
}

/// A step that ended (or was aborted: `None`).
struct Finished {
    name: Arc<str>,
    generation: u32,
    outcome: Option<Outcome>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TimerKind {
    Resume,
    Deadline,
}

struct Timer {
    name: Arc<str>,
    generation: u32,
    kind: TimerKind,
}

/// The state of the task.
struct Polls {
    shared: Arc<Shared>,
    polls: HashMap<Arc<str>, LongPoll>,
    in_flight: FuturesUnordered<BoxFuture<'static, Finished>>,
    timers: DelayQueue<Timer>,
}

async fn run(
    shared: Arc<Shared>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    stop: CancellationToken,
) {
    let mut polls = Polls {
        shared,
        polls: HashMap::new(),
        in_flight: FuturesUnordered::new(),
        timers: DelayQueue::new(),
    };
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            command = commands.recv() => match command {
                Some(command) => polls.command(command),
                None => return,
            },
            Some(finished) = polls.in_flight.next(), if !polls.in_flight.is_empty() => {
                polls.finished(finished);
            }
            Some(timer) = polls.timers.next(), if !polls.timers.is_empty() => {
                polls.timer(timer.into_inner());
            }
        }
    }
}

impl Polls {
    fn command(&mut self, command: Command) {
        match command {
            Command::Start {
                name,
                tracked,
                index,
                short_first_wait,
            } => {
                let poll = LongPoll {
                    tracked,
                    slot: None,
                    index,
                    step: if short_first_wait {
                        WaitStep::First
                    } else {
                        WaitStep::Spread
                    },
                    pacer: Pacer::new(self.shared.pacing),
                    generation: 0,
                    phase: Phase::Idle,
                };
                if let Some(old) = self.polls.insert(Arc::clone(&name), poll) {
                    self.cancel(old);
                }
                self.launch(&name);
            }
            Command::Stop(name) => {
                if let Some(poll) = self.polls.remove(&name) {
                    self.cancel(poll);
                }
            }
        }
    }

    /// Ends whatever `poll` has pending; its place is given back as it drops.
    fn cancel(&mut self, poll: LongPoll) {
        self.clear_phase(&poll.phase);
    }

    fn clear_phase(&mut self, phase: &Phase) {
        match phase {
            Phase::InFlight { abort, deadline } => {
                abort.abort();
                if let Some(key) = deadline {
                    self.timers.try_remove(key);
                }
            }
            Phase::Paused(key) => {
                self.timers.try_remove(key);
            }
            Phase::Idle => {}
        }
    }

    /// Starts the next step of `name`'s long poll: getting a place, or its next query.
    fn launch(&mut self, name: &Arc<str>) {
        let Some(poll) = self.polls.get_mut(name) else {
            return;
        };
        if lock(&poll.tracked.state).removed {
            if let Some(poll) = self.polls.remove(name) {
                self.cancel(poll);
            }
            return;
        }
        poll.generation = poll.generation.wrapping_add(1);
        let generation = poll.generation;
        let (job, timeout) = match poll.slot.as_ref().and_then(PollSlot::h2_shard) {
            Some(shard) => {
                let wait = poll.step.wait(self.shared.poll_wait);
                let url = self.shared.http.health_service_url(name, poll.index, wait);
                poll.pacer.started_at(Instant::now());
                (
                    Job::Query(Arc::clone(shard), url),
                    Some(request_timeout(poll.index, wait)),
                )
            }
            None => (Job::Place(Arc::clone(&self.shared)), None),
        };
        let (abort, registration) = AbortHandle::new_pair();
        self.in_flight
            .push(step(Arc::clone(name), generation, job, registration));
        let deadline = timeout.map(|timeout| {
            self.timers.insert(
                Timer {
                    name: Arc::clone(name),
                    generation,
                    kind: TimerKind::Deadline,
                },
                timeout,
            )
        });
        let old = std::mem::replace(&mut poll.phase, Phase::InFlight { abort, deadline });
        self.clear_phase(&old);
    }

    fn finished(&mut self, finished: Finished) {
        let Finished {
            name,
            generation,
            outcome,
        } = finished;
        let Some(outcome) = outcome else {
            return; // aborted: cancelled or timed out, already handled
        };
        let Some(poll) = self.polls.get_mut(&name) else {
            return;
        };
        if poll.generation != generation {
            return;
        }
        if let Phase::InFlight {
            deadline: Some(key),
            ..
        } = &poll.phase
        {
            self.timers.try_remove(key);
        }
        poll.phase = Phase::Idle;
        match outcome {
            Outcome::Place(Ok(slot)) if slot.h2_shard().is_none() => {
                // Cannot happen: the multiplexer runs only over HTTP/2. Said, not looped.
                tracing::error!(service = %name, "a long poll got an HTTP/1.1 place in the multiplexed mode; it stops");
                self.polls.remove(&name);
                return;
            }
            Outcome::Place(Ok(slot)) => {
                poll.slot = Some(slot);
            }
            Outcome::Place(Err(e)) => {
                let delay = poll.pacer.failed();
                poll_failed(&self.shared, &name, &e, delay, true);
            }
            Outcome::Answer(exchanged) => {
                let sent = poll.index;
                match self
                    .shared
                    .http
                    .health_service_answer(&name, sent, exchanged)
                {
                    Ok(answer) => {
                        poll.pacer.succeeded();
                        poll.step = poll.step.next();
                        let returned = answer.index();
                        poll.index = next_index(sent, returned);
                        if let PollAnswer::Changed(answer) = answer {
                            debug!(
                                service = %name,
                                sent,
                                returned,
                                instances = answer.value.len(),
                                "Consul service answered"
                            );
                            self.shared.publish(
                                &name,
                                &poll.tracked,
                                answer.index,
                                &answer.value,
                                Publisher::Poll,
                            );
                        }
                    }
                    Err(e) => {
                        let delay = poll.pacer.failed();
                        poll_failed(&self.shared, &name, &e, delay, false);
                    }
                }
            }
        }
        self.pause_or_launch(&name);
    }

    fn timer(&mut self, timer: Timer) {
        let Some(poll) = self.polls.get_mut(&timer.name) else {
            return;
        };
        if poll.generation != timer.generation {
            return;
        }
        match (timer.kind, &mut poll.phase) {
            (TimerKind::Resume, Phase::Paused(_)) => {
                // The key just fired: forget it before anything else can reuse its slot.
                poll.phase = Phase::Idle;
                self.launch(&timer.name);
            }
            (TimerKind::Deadline, Phase::InFlight { abort, .. }) => {
                // The key just fired (it is no longer in the queue); the step ends here.
                abort.abort();
                poll.phase = Phase::Idle;
                // Counted and named as any failed answer.
                let timed_out = Failure::Consul(ConsulError::Timeout {
                    path: format!("/v1/health/service/{}", timer.name),
                });
                let sent = poll.index;
                if let Err(e) =
                    self.shared
                        .http
                        .health_service_answer(&timer.name, sent, Err(timed_out))
                {
                    let delay = poll.pacer.failed();
                    poll_failed(&self.shared, &timer.name, &e, delay, false);
                }
                self.pause_or_launch(&timer.name);
            }
            _ => {}
        }
    }

    /// After a step: the next one now, or when pacing or backoff allow.
    fn pause_or_launch(&mut self, name: &Arc<str>) {
        let Some(poll) = self.polls.get_mut(name) else {
            return;
        };
        let delay = poll.pacer.delay_at(Instant::now(), rand::random::<f64>());
        if delay.is_zero() {
            self.launch(name);
            return;
        }
        poll.generation = poll.generation.wrapping_add(1);
        let key = self.timers.insert(
            Timer {
                name: Arc::clone(name),
                generation: poll.generation,
                kind: TimerKind::Resume,
            },
            delay,
        );
        // The step that ended has nothing pending (its deadline was removed or fired).
        debug_assert!(matches!(poll.phase, Phase::Idle));
        poll.phase = Phase::Paused(key);
    }
}

/// One step as a boxed future: the only per-service allocation that waits for minutes,
/// so it holds what the stream needs and no more (see the size test below).
fn step(
    name: Arc<str>,
    generation: u32,
    job: Job,
    registration: AbortRegistration,
) -> BoxFuture<'static, Finished> {
    Abortable::new(work(job), registration)
        .map(move |outcome| Finished {
            name,
            generation,
            outcome: outcome.ok(),
        })
        .boxed()
}

/// What a step does (an `async fn`: its size is that of its largest state).
async fn work(job: Job) -> Outcome {
    match job {
        Job::Place(shared) => Outcome::Place(shared.http.poll_slot().await),
        Job::Query(shard, url) => Outcome::Answer(shard.exchange(url).await),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::consul::config::ConsulConfig;
    use crate::registry::consul::watch::tests::shared;

    /// 10,000 of these wait at once, minutes each: what one holds is most of what a long
    /// poll costs (the task per service it replaced held 1.8 KB with its span and token).
    /// The size is the largest of its states, so a place's future measures the query's.
    #[test]
    fn a_waiting_multiplexed_long_poll_stays_small() {
        let s = Arc::new(shared(&ConsulConfig::default()));
        let future = work(Job::Place(s));
        let size = std::mem::size_of_val(&future);
        eprintln!("multiplexed long poll future: {size} bytes");
        assert!(size <= 768, "multiplexed long poll future: {size} bytes");
    }
}
