//! The source's loop: connect, list, subscribe, apply pushes; again after a reconnect.
//!
//! Per connection (a *session*):
//! 1. one listing pass over the selected groups ([`Listing`] decides what is gone);
//! 2. a subscription per service, a bounded number in flight: each answers with the
//!    service's whole instance list, its one read;
//! 3. the first time every listed service has answered, the catalog gets its complete
//!    snapshot ([`Catalog::replace_all`], which allows deletions downstream);
//! 4. then pushes, one whole service each, applied as they come (`upsert` / `remove`);
//!    the service list again every `--nacos-service-list-interval`; a health check when
//!    the connection has been idle 5 s (as Nacos's clients do).
//!
//! When the connection ends (server restart, network, `ConnectResetRequest`, error 301)
//! nothing is removed: the last state stays published, a new connection is opened, and
//! every service is subscribed again (subscriptions die with the connection on the
//! server side). A connection that ended before its first full listing and subscription
//! round counts as a failed attempt: the next one waits the backoff and goes to the next
//! server (see [`is_steady`]).
//!
//! **Empty services.** Nacos forgets its ephemeral instances when a node restarts, and
//! its own clients register again only once they have reconnected (a Java client after
//! its 3 s redo delay, then the server's 0.5 s push delay), so right after a restart
//! every such service reads empty for a while. A service that had instances and reads
//! empty is therefore held: it stays published until two confirming
//! `ServiceQueryRequest`s, half of `empty_confirm_delay` (10 s) apart, both find it empty
//! (`hold`), and during the first `reconnect_grace` (30 s) of a *re*connection not before
//! that grace has passed; a new connection postpones the holds it finds to its own grace.
//! A real scale to zero thus reaches Kubernetes 10 s late (more right after a
//! reconnect); an instance that comes back meanwhile ends the hold with its push.
//! Likewise a service missing from the service list is removed only after two complete
//! passes without it, none of them within the grace, and a `ServiceQueryRequest` that
//! finds it empty. The
//! sink's mass-deletion guard stays the second line.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use secrecy::SecretString;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::catalog::Catalog;
use crate::registry::reported::Reported;
use crate::registry::{error_chain, Pacer, PacerConfig};

use super::api::{self, Kind, ServiceInfo};
use super::claims::Claims;
use super::config::Groups;
use super::conn::{Connection, Inbound, TokenSlot};
use super::error::NacosError;
use super::hold::{Confirmed, Hold};
use super::http::NacosHttp;
use super::listing::Listing;
use super::metrics::NacosMetrics;
use super::select::{is_consumer, Selection, ServiceKey};

/// A health check is sent after this long without traffic.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
/// How often the loop looks at its timers (keepalive, holds, retries, token).
const TICK: Duration = Duration::from_secs(1);
/// Names per `ServiceListRequest` page.
const PAGE_SIZE: u32 = 500;
/// A bound on pages per group and pass, against a server that never sends a short page.
const MAX_PAGES: u32 = 10_000;

/// One server: its HTTP and its gRPC address.
#[derive(Debug, Clone)]
pub struct Server {
    pub http: String,
    pub grpc: String,
}

/// What the loop is told.
pub struct WatchConfig {
    pub servers: Vec<Server>,
    pub namespace: String,
    pub groups: Groups,
    pub username: Option<String>,
    pub password: Option<SecretString>,
    pub request_timeout: Duration,
    pub list_interval: Duration,
    pub empty_confirm_delay: Duration,
    pub reconnect_grace: Duration,
    pub concurrency: usize,
    pub max_message_size: usize,
    pub pacing: PacerConfig,
}

/// What the loop knows of one listed service.
#[derive(Debug, Default)]
struct Tracked {
    /// Subscribed on the current connection.
    subscribed: bool,
    /// `lastRefTime` of the newest answer applied: older ones are dropped.
    last_ref_time: i64,
    /// Whether the last applied answer published the service (an instance took part).
    /// Only then can an empty answer delete something: a service whose instances are
    /// all left out (another data set's, another cluster's) is not held nor confirmed.
    had_instances: bool,
    /// An empty answer waiting for confirmation.
    empty_hold: Option<Hold>,
    /// The last answer came under the protection threshold.
    protected: bool,
}

impl Tracked {
    /// What [`Tally`] counts of it: (held, under the protection threshold).
    fn flags(&self) -> (bool, bool) {
        (self.empty_hold.is_some(), self.protected)
    }

    /// A new connection: nothing subscribed on it yet, and its answers are compared with
    /// each other only. `lastRefTime` is the serving node's wall clock when it answered:
    /// after a failover to a node whose clock is behind, every answer would look older
    /// than the last one applied and be dropped. A hold waits for the new grace.
    fn start_session(&mut self, holds_until: Instant) {
        self.subscribed = false;
        self.last_ref_time = 0;
        if let Some(hold) = &mut self.empty_hold {
            hold.restart(holds_until);
        }
    }
}

/// The services held and those under the protection threshold, kept up to date as each
/// answer changes one of them: scanning every service on every answer made a
/// subscription round of 10,000 services take 10⁸ steps.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    held: usize,
    protected: usize,
}

impl Tally {
    /// One service's flags went from `before` to `after` ([`Tracked::flags`]).
    fn update(&mut self, before: (bool, bool), after: (bool, bool)) {
        fn step(n: &mut usize, before: bool, after: bool) {
            match (before, after) {
                (false, true) => *n += 1,
                (true, false) => *n = n.saturating_sub(1),
                _ => {}
            }
        }
        step(&mut self.held, before.0, after.0);
        step(&mut self.protected, before.1, after.1);
    }
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Subscribe,
    Push,
    /// A confirming read of an emptied service: applied as it is.
    Confirm,
}

enum SessionEnd {
    Shutdown,
    /// The connection ended; `steady` when it had run steadily first (see [`is_steady`]).
    Lost {
        error: NacosError,
        steady: bool,
    },
}

/// A session that lived this long counts as steady even if its first subscription round
/// has not ended (a very large namespace).
const STEADY_AFTER: Duration = Duration::from_secs(60);

/// Whether a session that ended counts as a success for the reconnect backoff: it
/// finished its first full listing and subscription round, or lived [`STEADY_AFTER`].
/// A connection that opens and then dies while listing or subscribing (a server that
/// accepts and then fails, a request that kills the stream) is a failure: without this,
/// it would be reopened at once, forever, on the same server.
fn is_steady(first_round_done: bool, alive: Duration) -> bool {
    first_round_done || alive >= STEADY_AFTER
}

/// Whether a listing pass may count a service's absence towards removing it: only a
/// complete pass, and not within the grace after a (re)connection (a restarted node
/// lists a service again only once one of its clients registered again).
fn counts_for_removal(complete: bool, now: Instant, holds_until: Instant) -> bool {
    complete && now >= holds_until
}

pub(crate) struct Watcher {
    pub cfg: WatchConfig,
    pub selection: Selection,
    pub catalog: Arc<Catalog>,
    pub metrics: Arc<NacosMetrics>,
    pub http: NacosHttp,
    pub token: TokenSlot,
    pub reported: Reported,
    services: BTreeMap<ServiceKey, Tracked>,
    tally: Tally,
    claims: Claims,
    listing: Listing,
    synced: bool,
    server: usize,
    login_due: Option<Instant>,
}

impl Watcher {
    pub fn new(
        cfg: WatchConfig,
        selection: Selection,
        catalog: Arc<Catalog>,
        metrics: Arc<NacosMetrics>,
        http: NacosHttp,
    ) -> Self {
        let claims = Claims::new(cfg.groups.clone());
        Self {
            cfg,
            selection,
            catalog,
            metrics,
            http,
            token: TokenSlot::default(),
            reported: Reported::default(),
            services: BTreeMap::new(),
            tally: Tally::default(),
            claims,
            listing: Listing::default(),
            synced: false,
            server: 0,
            login_due: None,
        }
    }

    /// Runs sessions until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut pacer = Pacer::new(self.cfg.pacing);
        let mut opened = 0u64;
        loop {
            if !pacer.ready(&shutdown).await {
                return;
            }
            let connected = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                c = self.connect() => c,
            };
            let (conn, events) = match connected {
                Ok(c) => c,
                Err(e) => {
                    let delay = pacer.failed();
                    let server = self.cfg.servers[self.server].grpc.clone();
                    self.server = (self.server + 1) % self.cfg.servers.len();
                    warn!(
                        server,
                        error = %error_chain(&e),
                        failures = pacer.failures(),
                        retry_in = ?delay,
                        "cannot connect to Nacos; the last known state stays published"
                    );
                    continue;
                }
            };
            if opened > 0 {
                self.metrics.reconnects.inc();
            }
            opened += 1;
            // `connected` goes to 1 with the server's SetupAckRequest (the reader).
            info!(
                server = conn.server(),
                connection = conn.id(),
                "connected to Nacos"
            );
            self.metrics.subscribed_services.set(0);
            // The first connection reads no restart artefact: what was read empty on it
            // had instances on it before.
            let grace = if opened > 1 {
                self.cfg.reconnect_grace
            } else {
                Duration::ZERO
            };
            let end = self.session(&conn, events, &shutdown, grace).await;
            self.metrics.connected.set(0);
            self.metrics.subscribed_services.set(0);
            match end {
                SessionEnd::Shutdown => return,
                SessionEnd::Lost { error, steady } => {
                    self.after_lost(&mut pacer, conn.server(), &error, steady)
                }
            }
        }
    }

    /// Paces the next connection after one was lost: at once on the same server after a
    /// steady session, else with backoff on the next server.
    fn after_lost(&mut self, pacer: &mut Pacer, server: &str, error: &NacosError, steady: bool) {
        if steady {
            pacer.succeeded();
            warn!(
                server,
                error = %error_chain(error),
                "lost the connection to Nacos; reconnecting (nothing is removed meanwhile)"
            );
            return;
        }
        let delay = pacer.failed();
        self.server = (self.server + 1) % self.cfg.servers.len();
        warn!(
            server,
            error = %error_chain(error),
            failures = pacer.failures(),
            retry_in = ?delay,
            next_server = %self.cfg.servers[self.server].grpc,
            "the connection to Nacos ended before its first full read; reconnecting with backoff (nothing is removed meanwhile)"
        );
    }

    async fn connect(
        &mut self,
    ) -> Result<(Connection, mpsc::UnboundedReceiver<Inbound>), NacosError> {
        let server = self.cfg.servers[self.server].clone();
        if self.login_due.is_none_or(|due| due <= Instant::now()) {
            self.login(&server).await?;
        }
        Connection::open(
            &server.grpc,
            &self.cfg.namespace,
            self.token.clone(),
            Arc::clone(&self.metrics),
            self.cfg.request_timeout,
            self.cfg.max_message_size,
        )
        .await
    }

    /// Logs in when a user is configured (else nothing to do, ever).
    async fn login(&mut self, server: &Server) -> Result<(), NacosError> {
        let (Some(user), Some(password)) = (&self.cfg.username, &self.cfg.password) else {
            self.login_due = Some(Instant::now() + Duration::from_secs(86_400 * 365));
            return Ok(());
        };
        let login = self
            .http
            .login(&server.http, user, password, &self.metrics)
            .await?;
        *self.token.write().unwrap_or_else(|e| e.into_inner()) = Some(login.token);
        self.login_due = Some(login.refresh_at);
        debug!(server = %server.http, "logged in to Nacos");
        Ok(())
    }

    /// One connection's life; the end says whether it ran steadily (see [`is_steady`]).
    async fn session(
        &mut self,
        conn: &Connection,
        events: mpsc::UnboundedReceiver<Inbound>,
        shutdown: &CancellationToken,
        grace: Duration,
    ) -> SessionEnd {
        let started = Instant::now();
        let mut first_round_done = false;
        match self
            .session_loop(conn, events, shutdown, grace, &mut first_round_done)
            .await
        {
            Ok(()) => SessionEnd::Shutdown,
            Err(error) => SessionEnd::Lost {
                error,
                steady: is_steady(first_round_done, started.elapsed()),
            },
        }
    }

    /// Lists, subscribes and applies pushes until shutdown (`Ok`) or the connection is
    /// lost. `first_round_done` is set once the first listing and subscription round
    /// ended without losing the connection.
    async fn session_loop(
        &mut self,
        conn: &Connection,
        mut events: mpsc::UnboundedReceiver<Inbound>,
        shutdown: &CancellationToken,
        grace: Duration,
        first_round_done: &mut bool,
    ) -> Result<(), NacosError> {
        // Holds end no earlier than this (see the module documentation).
        let holds_until = Instant::now() + grace;
        self.start_session(holds_until);
        let mut next_list = Instant::now();
        let mut listed_whole = false;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let now = Instant::now();
            if now >= next_list {
                match self.list(conn, holds_until).await {
                    Ok(complete) => {
                        listed_whole |= complete;
                        next_list = if complete || self.synced {
                            now + self.cfg.list_interval
                        } else {
                            now + TICK
                        };
                    }
                    Err(e) => return Err(e),
                }
            }
            self.subscribe_pending(conn, holds_until).await?;
            *first_round_done = true;
            if !self.synced && listed_whole && self.services.values().all(|t| t.subscribed) {
                self.synced = true;
                let winners = self.claims.winners();
                info!(
                    services = self.services.len(),
                    published = winners.len(),
                    "read every selected Nacos service; publishing"
                );
                self.report_collisions();
                self.catalog.replace_all(winners);
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                event = events.recv() => match event {
                    Some(Inbound::Push(push)) => self.on_push(*push, holds_until),
                    Some(Inbound::Closed(why)) => return Err(NacosError::Closed(why)),
                    None => return Err(NacosError::Closed("the reader stopped".into())),
                },
                _ = tick.tick() => {
                    self.on_tick(conn, holds_until).await?;
                }
            }
        }
    }

    /// A new connection: nothing is subscribed on it yet, holds wait for its grace and
    /// their reads start over, and service-list misses seen before it are forgotten (a
    /// restarted node lists a service only once its clients registered again).
    fn start_session(&mut self, holds_until: Instant) {
        for tracked in self.services.values_mut() {
            tracked.start_session(holds_until);
        }
        self.listing = Listing::default();
    }

    /// Keepalive, confirmations of emptied services, the token.
    async fn on_tick(&mut self, conn: &Connection, holds_until: Instant) -> Result<(), NacosError> {
        if conn.idle_for() >= KEEPALIVE_IDLE {
            conn.request::<api::Status>(Kind::HealthCheck, api::health_check())
                .await?;
        }
        let now = Instant::now();
        let due: Vec<ServiceKey> = self
            .services
            .iter()
            .filter(|(_, t)| t.empty_hold.is_some_and(|h| h.due <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let body = api::service_query(&self.cfg.namespace, &key.group, &key.name);
            match conn
                .request::<api::ServiceInfoResponse>(Kind::ServiceQuery, body)
                .await
            {
                Ok(answer) => {
                    let info = answer.service_info.unwrap_or_default();
                    self.on_confirm(&key, info, holds_until);
                }
                Err(e) if e.is_connection_lost() => return Err(e),
                Err(e) => {
                    warn!(service = %key, error = %error_chain(&e), "confirming an emptied Nacos service failed; retrying")
                }
            }
        }
        self.publish_tally();
        if self.login_due.is_some_and(|due| due <= now) {
            let server = self.cfg.servers[self.server].clone();
            if let Err(e) = self.login(&server).await {
                self.login_due = Some(now + Duration::from_secs(10));
                warn!(error = %error_chain(&e), "refreshing the Nacos access token failed; retrying in 10s");
            }
        }
        Ok(())
    }

    /// A confirming read of a held service: instances end the hold; an empty read
    /// removes the service only if it is the last of [`hold::EMPTY_READS`](super::hold).
    fn on_confirm(&mut self, key: &ServiceKey, info: ServiceInfo, holds_until: Instant) {
        if info.hosts.is_empty() {
            let delay = self.cfg.empty_confirm_delay;
            let Some(hold) = self
                .services
                .get_mut(key)
                .and_then(|t| t.empty_hold.as_mut())
            else {
                return;
            };
            if hold.read_empty(Instant::now(), delay, holds_until) == Confirmed::ReadAgain {
                debug!(service = %key, "a Nacos service read empty again; one more read before removing it");
                return;
            }
            info!(service = %key, "confirmed empty in Nacos; removing it");
        }
        self.apply(key, info, Origin::Confirm, holds_until);
    }

    /// One listing pass; `Ok(false)` when part of it failed. Services found are tracked
    /// (and subscribed by the caller); those gone are removed once a read confirms it.
    async fn list(&mut self, conn: &Connection, holds_until: Instant) -> Result<bool, NacosError> {
        let (listed, complete) = self.list_pass(conn).await?;
        let counts = counts_for_removal(complete, Instant::now(), holds_until);
        let outcome = self.listing.observe(self.services.keys(), &listed, counts);
        if !outcome.added.is_empty() {
            debug!(services = outcome.added.len(), "new Nacos services listed");
        }
        for key in outcome.added {
            self.services.insert(key, Tracked::default());
        }
        for key in outcome.gone {
            if !self.confirm_gone(conn, &key).await? {
                continue;
            }
            info!(service = %key, "gone from the Nacos service list; removing it");
            let removed = self.services.remove(&key);
            if let Some(t) = &removed {
                self.tally.update(t.flags(), (false, false));
                self.publish_tally();
            }
            let was_subscribed = removed.is_some_and(|t| t.subscribed);
            self.reported.forget(&key.to_string());
            self.publish_state(&key, None);
            if was_subscribed {
                let body = api::subscribe(&self.cfg.namespace, &key.group, &key.name, false);
                if let Err(e) = conn.request::<api::Status>(Kind::Unsubscribe, body).await {
                    debug!(service = %key, error = %error_chain(&e), "unsubscribing failed");
                }
            }
        }
        self.count_subscribed();
        Ok(complete)
    }

    /// Whether a service missing from the list is really gone: a `ServiceQueryRequest`
    /// must find it empty (a list cut from a shifting set, or a node still taking its
    /// clients' registrations back, may miss a service that has instances). `Err` only
    /// when the connection is lost.
    async fn confirm_gone(&self, conn: &Connection, key: &ServiceKey) -> Result<bool, NacosError> {
        let body = api::service_query(&self.cfg.namespace, &key.group, &key.name);
        match conn
            .request::<api::ServiceInfoResponse>(Kind::ServiceQuery, body)
            .await
        {
            Ok(answer)
                if answer
                    .service_info
                    .as_ref()
                    .is_some_and(|i| !i.hosts.is_empty()) =>
            {
                info!(service = %key, "missing from the Nacos service list but still has instances; kept");
                Ok(false)
            }
            Ok(_) => Ok(true),
            Err(e) if e.is_connection_lost() => Err(e),
            Err(e) => {
                warn!(service = %key, error = %error_chain(&e), "confirming a service gone from the Nacos list failed; kept for now");
                Ok(false)
            }
        }
    }

    /// Every selected service the server lists now (consumers left out), and whether
    /// every page was read. `Err` only when the connection is lost.
    async fn list_pass(
        &self,
        conn: &Connection,
    ) -> Result<(BTreeSet<ServiceKey>, bool), NacosError> {
        let mut listed = BTreeSet::new();
        let mut complete = true;
        let mut add = |group: &str, name: &str| {
            if !is_consumer(name) && !name.is_empty() {
                listed.insert(ServiceKey::new(group, name));
            }
        };
        match &self.cfg.groups {
            Groups::Named(groups) => {
                for group in groups {
                    for page in 1..=MAX_PAGES {
                        let body = api::service_list(&self.cfg.namespace, group, page, PAGE_SIZE);
                        match conn
                            .request::<api::ServiceListResponse>(Kind::ServiceList, body)
                            .await
                        {
                            Ok(answer) => {
                                for name in &answer.service_names {
                                    add(group, api::plain_name(name));
                                }
                                if answer.service_names.len() < PAGE_SIZE as usize {
                                    break;
                                }
                            }
                            Err(e) if e.is_connection_lost() => return Err(e),
                            Err(e) => {
                                warn!(group, page, error = %error_chain(&e), "listing Nacos services failed; nothing is removed on this pass");
                                complete = false;
                                break;
                            }
                        }
                    }
                }
            }
            Groups::All => {
                let server = &self.cfg.servers[self.server].http;
                let token = self.token.read().unwrap_or_else(|e| e.into_inner()).clone();
                let mut seen = 0usize;
                for page in 1..=MAX_PAGES {
                    match self
                        .http
                        .catalog_page(
                            server,
                            &self.cfg.namespace,
                            page,
                            PAGE_SIZE,
                            token.as_ref(),
                            &self.metrics,
                        )
                        .await
                    {
                        Ok(answer) => {
                            seen += answer.service_list.len();
                            for s in &answer.service_list {
                                add(&s.group_name, &s.name);
                            }
                            let total = usize::try_from(answer.count).unwrap_or(0);
                            if answer.service_list.is_empty() || seen >= total {
                                break;
                            }
                        }
                        Err(e) => {
                            warn!(page, error = %error_chain(&e), "listing Nacos services (every group) failed; nothing is removed on this pass");
                            complete = false;
                            break;
                        }
                    }
                }
            }
        }
        Ok((listed, complete))
    }

    /// Subscribes every tracked service not yet subscribed on this connection, a bounded
    /// number at once. `Err` only when the connection is lost.
    async fn subscribe_pending(
        &mut self,
        conn: &Connection,
        holds_until: Instant,
    ) -> Result<(), NacosError> {
        let pending: Vec<ServiceKey> = self
            .services
            .iter()
            .filter(|(_, t)| !t.subscribed)
            .map(|(k, _)| k.clone())
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        let namespace = self.cfg.namespace.clone();
        // Answers are applied as they arrive (no batch of whole services held in
        // memory), and the batch ends with the connection: at the first lost-connection
        // error or when the stream ends, not after every remaining request failed.
        let answers = futures::stream::iter(pending)
            .map(|key| {
                let body = api::subscribe(&namespace, &key.group, &key.name, true);
                async move {
                    let answer = conn
                        .request::<api::ServiceInfoResponse>(Kind::Subscribe, body)
                        .await;
                    (key, answer)
                }
            })
            .buffer_unordered(self.cfg.concurrency.max(1))
            .take_until(conn.closed());
        let mut answers = std::pin::pin!(answers);
        let mut lost = None;
        let mut failed = 0usize;
        while let Some((key, answer)) = answers.next().await {
            match answer {
                Ok(answer) => {
                    if let Some(t) = self.services.get_mut(&key) {
                        t.subscribed = true;
                    }
                    self.apply(
                        &key,
                        answer.service_info.unwrap_or_default(),
                        Origin::Subscribe,
                        holds_until,
                    );
                }
                Err(e) if e.is_connection_lost() => {
                    lost = Some(e);
                    break;
                }
                Err(e) => {
                    failed += 1;
                    debug!(service = %key, error = %error_chain(&e), "subscribing failed");
                }
            }
        }
        if failed > 0 {
            warn!(failed, "some Nacos subscriptions failed; retrying");
        }
        self.count_subscribed();
        match lost {
            Some(e) => Err(e),
            None if conn.is_closed() => Err(NacosError::Closed(
                "the stream ended while subscribing".into(),
            )),
            None => Ok(()),
        }
    }

    fn on_push(&mut self, push: api::NotifySubscriber, holds_until: Instant) {
        let Some(info) = push.service_info else {
            return;
        };
        let (info_group, info_name) = info.group_and_name();
        let group = push
            .group_name
            .clone()
            .filter(|g| !g.is_empty())
            .or_else(|| info_group.map(str::to_string))
            .unwrap_or_else(|| "DEFAULT_GROUP".to_string());
        let name = push
            .service_name
            .as_deref()
            .filter(|n| !n.is_empty())
            .map(|n| api::plain_name(n).to_string())
            .unwrap_or_else(|| info_name.to_string());
        let key = ServiceKey::new(group, name);
        debug!(service = %key, instances = info.hosts.len(), "Nacos push");
        self.apply(&key, info, Origin::Push, holds_until);
    }

    /// Applies one whole answer for `key` (see the module documentation on holds), and
    /// counts what it changed.
    fn apply(&mut self, key: &ServiceKey, info: ServiceInfo, origin: Origin, holds_until: Instant) {
        let Some(before) = self.services.get(key).map(Tracked::flags) else {
            debug!(service = %key, "an answer for a service no longer tracked; ignored");
            return;
        };
        self.apply_answer(key, info, origin, holds_until);
        if let Some(after) = self.services.get(key).map(Tracked::flags) {
            if after != before {
                self.tally.update(before, after);
                self.publish_tally();
            }
        }
    }

    fn apply_answer(
        &mut self,
        key: &ServiceKey,
        info: ServiceInfo,
        origin: Origin,
        holds_until: Instant,
    ) {
        let Some(tracked) = self.services.get_mut(key) else {
            return;
        };
        if origin != Origin::Confirm && info.last_ref_time < tracked.last_ref_time {
            debug!(service = %key, "an answer older than the one applied; ignored");
            return;
        }
        tracked.last_ref_time = tracked.last_ref_time.max(info.last_ref_time);
        if info.reach_protection_threshold != tracked.protected {
            tracked.protected = info.reach_protection_threshold;
            if tracked.protected {
                warn!(service = %key, "Nacos answers this service under its protection threshold: unhealthy instances are reported healthy");
            }
        }
        let empty = info.hosts.is_empty();
        if empty && tracked.had_instances && origin != Origin::Confirm {
            if tracked.empty_hold.is_none() {
                let now = Instant::now();
                let hold = Hold::start(now, self.cfg.empty_confirm_delay, holds_until);
                tracked.empty_hold = Some(hold);
                info!(service = %key, first_read_in = ?hold.due.saturating_duration_since(now), "a Nacos service read empty; keeping it until reads confirm");
            }
            return;
        }
        tracked.empty_hold = None;
        let built = self.selection.build(key, &info);
        if let Some(tracked) = self.services.get_mut(key) {
            tracked.had_instances = built.service.is_some();
        }
        let service = key.to_string();
        for skipped in self
            .reported
            .fresh(&service, "instance", &built.skipped, |s| {
                format!("{}/{}", s.instance_id, s.reason.as_label())
            })
        {
            self.metrics.reject(skipped.reason.as_label());
            warn!(service = %key, instance = %skipped.instance_id, reason = %skipped.reason, "Nacos instance left out");
        }
        for issue in self.reported.fresh(
            &service,
            "metadata",
            &built.metadata_issues,
            ToString::to_string,
        ) {
            self.metrics.reject(issue.as_label());
            warn!(service = %key, reason = %issue, "Nacos metadata left out");
        }
        self.publish_state(key, built.service);
    }

    /// Records what `key` publishes and, once synced, writes its name's winner.
    fn publish_state(&mut self, key: &ServiceKey, meta: Option<crate::model::MicroSvcMeta>) {
        let name = self.selection.published_name(key);
        let state = self.claims.set(key, &name, meta);
        self.report_collision(&state);
        if !self.synced {
            return;
        }
        match state.publish {
            Some(meta) => self.catalog.upsert(meta),
            None => self.catalog.remove(&name),
        }
    }

    fn report_collisions(&self) {
        for state in self.claims.collisions() {
            self.report_collision(&state);
        }
    }

    /// Logs and counts, once while it lasts, each group left out under a name.
    fn report_collision(&self, state: &super::claims::NameState) {
        let fresh = self.reported.fresh(
            &format!("name:{}", state.name),
            "collision",
            &state.rejected,
            Clone::clone,
        );
        for group in fresh {
            self.metrics.reject("group_collision");
            warn!(
                name = %state.name,
                published_group = state.winner.as_deref().unwrap_or(""),
                skipped_group = %group,
                "two Nacos groups hold a service of one name; publishing one (--nacos-group-as-suffix publishes both)"
            );
        }
    }

    fn count_subscribed(&self) {
        let n = self.services.values().filter(|t| t.subscribed).count();
        self.metrics
            .subscribed_services
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    fn publish_tally(&self) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.metrics.empty_holds.set(gauge(self.tally.held));
        self.metrics
            .protection_threshold
            .set(gauge(self.tally.protected));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_steady_after_its_first_round_or_a_minute() {
        assert!(!is_steady(false, Duration::from_secs(5)));
        assert!(is_steady(true, Duration::from_millis(10)));
        assert!(is_steady(false, STEADY_AFTER));
    }

    #[test]
    fn a_new_connection_forgets_the_old_nodes_clock() {
        let now = Instant::now();
        let mut tracked = Tracked {
            subscribed: true,
            last_ref_time: 1_796_350_945_377,
            had_instances: true,
            empty_hold: Some(Hold::start(now, Duration::from_secs(10), now)),
            protected: false,
        };
        let grace_end = now + Duration::from_secs(30);
        tracked.start_session(grace_end);
        assert!(!tracked.subscribed);
        assert_eq!(
            tracked.last_ref_time, 0,
            "a slower clock's answers are applied"
        );
        assert_eq!(tracked.empty_hold.map(|h| h.due), Some(grace_end));
        assert!(tracked.had_instances, "what is published stays");
    }

    #[test]
    fn the_tally_follows_each_change() {
        let mut tally = Tally::default();
        tally.update((false, false), (true, true));
        tally.update((false, false), (true, false));
        assert_eq!(
            tally,
            Tally {
                held: 2,
                protected: 1
            }
        );
        tally.update((true, true), (false, true));
        tally.update((true, false), (true, false));
        assert_eq!(
            tally,
            Tally {
                held: 1,
                protected: 1
            }
        );
        tally.update((true, false), (false, false));
        tally.update((false, true), (false, false));
        tally.update((false, true), (false, false));
        assert_eq!(tally, Tally::default(), "never below zero");
    }

    #[test]
    fn listing_passes_within_the_grace_remove_nothing() {
        let now = Instant::now();
        let grace_end = now + Duration::from_secs(30);
        assert!(!counts_for_removal(true, now, grace_end));
        assert!(!counts_for_removal(false, grace_end, grace_end));
        assert!(counts_for_removal(true, grace_end, grace_end));
    }
}
