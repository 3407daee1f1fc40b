//! Issue 16: with more Consul services than connections, changes must still reach
//! Kubernetes within seconds.
//!
//! Each test starts a private Consul agent with Consul's default per-client connection
//! limit (200; the shared agent allows 12000 because every test reaches it from 127.0.0.1,
//! which hides the problem), registers 400 services of one instance each, runs the real
//! binary with default flags, and then makes a series of changes on randomly chosen
//! services: each must show in its EndpointSlice within 15 s. The connector's connections
//! to the agent must stay within the agent's limit throughout (sampled during the first
//! sync and after every change), and none of its Consul requests may fail: the agent
//! resets the connections beyond its limit at once, so a connector over budget shows as
//! failed requests far more than as a count above the limit.
//!
//! A late change is still watched in the background until shortly after the series, so
//! that the failure says how late it was (a slow connector and a stuck one look alike at
//! the deadline); the series stops after a few late changes so that a failing run stays
//! short, and changes to a service whose earlier change is still outstanding are skipped
//! (the connector could see both at once, and the second would then pass unseen).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::objects::{readiness, slices_of, wait_endpoints};
use common::process::Connector;
use common::tls;
use futures::stream::{self, FuturesUnordered, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Service;
use kube::api::ListParams;
use kube::{Api, Client};
use serde_json::json;
use testenv::consul::{ConsulClient, ConsulProcess};
use testenv::TestEnv;
use tokio::task::AbortHandle;

/// More than the connector's default budget of 180 connections and the agent's 200.
const SERVICES: usize = 400;
/// Registrations in flight at once.
const REGISTER_CONCURRENCY: usize = 16;
/// Synthetic catalog nodes the instances are spread over.
const NODES: usize = 8;
/// The first sync of all services (a few Kubernetes writes per service at the default
/// 100 writes/s, on a shared 2-core machine).
const ALL_SYNCED_WITHIN: Duration = Duration::from_secs(120);
/// How soon a change must show in Kubernetes: the default coalescing (1 s quiet, 5 s
/// at most) and a write, with room for a loaded machine; far below the minutes the
/// connector needs when its services take turns on the connections.
const CHANGE_WITHIN: Duration = Duration::from_secs(15);
/// Rounds of four changes each (see [`plan`]).
const ROUNDS: usize = 5;
/// The series stops after this many late changes: the defect is shown by then.
const MAX_LATE: usize = 4;
/// How long late changes are still watched after the series, to measure how late.
const LATE_GRACE: Duration = Duration::from_secs(30);
/// Interval between two reads of a service's EndpointSlices.
const POLL: Duration = Duration::from_millis(250);

#[tokio::test]
async fn changes_reach_kubernetes_above_the_budget_over_http() -> Result<()> {
    run(Transport::Http).await
}

#[tokio::test]
async fn changes_reach_kubernetes_above_the_budget_over_https() -> Result<()> {
    run(Transport::Https).await
}

/// How the connector reaches the agent (the test itself always uses plain HTTP: same
/// agent, same catalog).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Http,
    Https,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Https => "https",
        }
    }

    /// The connector's `--consul-http-addr` and TLS flags, and the agent port it talks to.
    fn connector_target(self, env: &TestEnv, agent: &ConsulProcess) -> (String, Vec<String>, u16) {
        match self {
            Transport::Http => (
                format!("http://{}", agent.http_addr()),
                Vec::new(),
                agent.http_port(),
            ),
            Transport::Https => (
                format!("https://{}", agent.https_addr()),
                tls::flags("consul", &env.pki(), tls::FULL),
                agent.https_port(),
            ),
        }
    }
}

async fn run(transport: Transport) -> Result<()> {
    let env = TestEnv::shared();
    let agent =
        ConsulProcess::start(&env.consul_bin()?, &env.dir().join("logs"), &env.pki()).await?;
    // One idle connection at most: the test's own connections count against the agent's
    // per-client limit too (everything comes from 127.0.0.1).
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .context("http client")?;
    let consul = ConsulClient::with_http(&agent.http_addr(), http);
    let started = Instant::now();
    register_all(&consul).await?;
    let registered = started.elapsed();

    let ns = env
        .namespace(&format!("scale-{}", transport.name()))
        .await?;
    let client = env.client().await?;
    let (addr, flags, port) = transport.connector_target(env, &agent);
    let connector = Connector::builder(env, ns.name())
        .consul_addr(addr)
        .shipped_timing()
        .args(flags)
        .start()?;
    let pid = connector.pid().context("the connector has no pid")?;
    let mut connections = Connections::new(pid, port);
    wait_all_synced(&client, ns.name(), &connector, &mut connections).await?;
    let synced = started.elapsed();

    let steps = plan();
    for step in &steps {
        let first = Instance::first(step.index);
        wait_endpoints(&client, ns.name(), &first.service, &[(&first.addr, true)])
            .await
            .with_context(|| format!("the first sync of {}", first.service))?;
    }
    let outcomes = run_series(&consul, &client, ns.name(), &steps, &mut connections).await?;
    connections.sample();
    let figures = Figures {
        transport,
        limit: agent.max_conns_per_client(),
        registered,
        synced,
        outcomes,
        connections,
        // `+ 0.0`: a sum over no series is -0.0, which would print as "-0".
        failed_requests: connector.registry_errors().await.unwrap_or(f64::NAN) + 0.0,
    };
    println!("{}", figures.summary());
    figures.verdict(&connector.log_tail())
}

/// One registered instance: a service instance on a synthetic node, with one check that
/// the test sets itself (no agent runs it: the addresses are documentation ranges and are
/// never contacted).
#[derive(Debug, Clone)]
struct Instance {
    service: String,
    id: String,
    node: String,
    node_addr: String,
    addr: String,
}

impl Instance {
    /// The one instance service `index` starts with: `192.0.2.x` for the first 200
    /// services, `198.51.100.x` for the others.
    fn first(index: usize) -> Self {
        let addr = if index < 200 {
            format!("192.0.2.{}", index + 1)
        } else {
            format!("198.51.100.{}", index - 199)
        };
        Self::on_node(index, "1", addr)
    }

    /// The instance added to service `index` in round `round`: `203.0.113.x`.
    fn added(index: usize, round: usize) -> Self {
        Self::on_node(index, "2", format!("203.0.113.{}", round + 1))
    }

    fn on_node(index: usize, suffix: &str, addr: String) -> Self {
        let service = format!("scale-{index:03}");
        Self {
            id: format!("{service}-{suffix}"),
            service,
            node: format!("node-{}", index % NODES),
            node_addr: format!("203.0.113.{}", 241 + index % NODES),
            addr,
        }
    }

    fn check_id(&self) -> String {
        format!("check-{}", self.id)
    }

    fn check(&self, status: &str) -> serde_json::Value {
        json!({"CheckID": self.check_id(), "Name": "synthetic", "Status": status,
               "ServiceID": self.id})
    }

    /// Registers the instance through the catalog API with a passing check.
    async fn register(&self, consul: &ConsulClient) -> Result<()> {
        let body = json!({
            "Node": self.node, "Address": self.node_addr,
            "Service": {"ID": self.id, "Service": self.service, "Address": self.addr,
                        "Port": 8080},
            "Check": self.check("passing"),
        });
        consul.put("/v1/catalog/register", &body).await
    }

    /// Sets the instance's check to `status` (`passing`, `critical`).
    async fn set_check(&self, consul: &ConsulClient, status: &str) -> Result<()> {
        let body = json!({"Node": self.node, "Address": self.node_addr,
                          "Check": self.check(status)});
        consul.put("/v1/catalog/register", &body).await
    }

    /// Removes the instance and its check.
    async fn deregister(&self, consul: &ConsulClient) -> Result<()> {
        let body = json!({"Node": self.node, "ServiceID": self.id});
        consul.put("/v1/catalog/deregister", &body).await
    }
}

/// Registers the [`SERVICES`] services, [`REGISTER_CONCURRENCY`] at a time.
async fn register_all(consul: &ConsulClient) -> Result<()> {
    stream::iter(0..SERVICES)
        .map(|index| async move {
            let instance = Instance::first(index);
            instance
                .register(consul)
                .await
                .with_context(|| format!("registering {}", instance.id))
        })
        .buffer_unordered(REGISTER_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Waits until every registered service has its Service, sampling the connector's
/// connections meanwhile (the first sync is when the most requests are in flight).
async fn wait_all_synced(
    client: &Client,
    ns: &str,
    connector: &Connector,
    connections: &mut Connections,
) -> Result<()> {
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    let wanted: HashSet<String> = (0..SERVICES).map(|i| Instance::first(i).service).collect();
    let deadline = Instant::now() + ALL_SYNCED_WITHIN;
    loop {
        connections.sample();
        let present = match api.list_metadata(&ListParams::default()).await {
            Ok(list) => list
                .items
                .iter()
                .filter(|s| s.metadata.name.as_ref().is_some_and(|n| wanted.contains(n)))
                .count(),
            Err(_) => 0,
        };
        if present == SERVICES {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{present} of {SERVICES} Services after {ALL_SYNCED_WITHIN:?}; connector log tail:\n{}",
                connector.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What a step does to its instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The only instance's check goes critical: it leaves the ready set.
    Fail,
    /// The check passes again.
    Recover,
    /// A second instance is registered.
    Add,
    /// The first instance is deregistered (the added one stays).
    Remove,
}

/// One change and what the service's EndpointSlices must show after it.
#[derive(Debug, Clone)]
struct Step {
    kind: Kind,
    /// The service's number.
    index: usize,
    instance: Instance,
    want: BTreeMap<String, bool>,
}

impl Step {
    fn new(kind: Kind, index: usize, instance: &Instance, want: &[&Instance]) -> Self {
        Self {
            kind,
            index,
            instance: instance.clone(),
            want: want.iter().map(|i| (i.addr.clone(), true)).collect(),
        }
    }

    fn describe(&self) -> String {
        let i = &self.instance;
        match self.kind {
            Kind::Fail => format!("check of {} to critical", i.id),
            Kind::Recover => format!("check of {} back to passing", i.id),
            Kind::Add => format!("new instance {} at {}", i.id, i.addr),
            Kind::Remove => format!("instance {} removed", i.id),
        }
    }

    async fn apply(&self, consul: &ConsulClient) -> Result<()> {
        match self.kind {
            Kind::Fail => self.instance.set_check(consul, "critical").await,
            Kind::Recover => self.instance.set_check(consul, "passing").await,
            Kind::Add => self.instance.register(consul).await,
            Kind::Remove => self.instance.deregister(consul).await,
        }
        .with_context(|| self.describe())
    }
}

/// [`ROUNDS`] rounds on two fresh random services `f` and `a` each: `f`'s check goes
/// critical, `a` gets a second instance, `f`'s check passes again, `a`'s first instance
/// is removed. Every step changes what Kubernetes must show, and no two rounds share a
/// service.
fn plan() -> Vec<Step> {
    let picks = rand::seq::index::sample(&mut rand::rng(), SERVICES, 2 * ROUNDS);
    let mut steps = Vec::with_capacity(4 * ROUNDS);
    for round in 0..ROUNDS {
        let (f, a) = (picks.index(2 * round), picks.index(2 * round + 1));
        let failing = Instance::first(f);
        let first = Instance::first(a);
        let added = Instance::added(a, round);
        steps.push(Step::new(Kind::Fail, f, &failing, &[]));
        steps.push(Step::new(Kind::Add, a, &added, &[&first, &added]));
        steps.push(Step::new(Kind::Recover, f, &failing, &[&failing]));
        steps.push(Step::new(Kind::Remove, a, &first, &[&added]));
    }
    steps
}

/// When a step's change showed in Kubernetes.
#[derive(Debug, Clone, Copy)]
enum Seen {
    InTime(Duration),
    /// Past [`CHANGE_WITHIN`]: seen after this long, or not by the end of the watch
    /// (`seen: false`, `after`: how long it was watched).
    Late {
        after: Duration,
        seen: bool,
    },
    /// Not made: an earlier change to the service is outstanding, or the series stopped.
    Skipped(&'static str),
}

#[derive(Debug)]
struct Outcome {
    number: usize,
    step: Step,
    seen: Seen,
}

impl Outcome {
    fn is_late(&self) -> bool {
        matches!(self.seen, Seen::Late { .. })
    }

    fn line(&self, total: usize) -> String {
        let what = format!(
            "change {:>2}/{total} on {} ({})",
            self.number,
            self.step.instance.service,
            self.step.describe()
        );
        match self.seen {
            Seen::InTime(d) => format!("{what}: in Kubernetes after {:.1}s", d.as_secs_f64()),
            Seen::Late { after, seen: true } => format!(
                "{what}: LATE, not in Kubernetes within {CHANGE_WITHIN:?} (seen after {:.1}s)",
                after.as_secs_f64()
            ),
            Seen::Late { after, seen: false } => format!(
                "{what}: LATE, not in Kubernetes within {CHANGE_WITHIN:?} (still not after {:.1}s)",
                after.as_secs_f64()
            ),
            Seen::Skipped(why) => format!("{what}: skipped ({why})"),
        }
    }
}

/// Makes the steps one after another, each waited for up to [`CHANGE_WITHIN`]; late ones
/// are followed in the background until [`LATE_GRACE`] after the series.
async fn run_series(
    consul: &ConsulClient,
    client: &Client,
    ns: &str,
    steps: &[Step],
    connections: &mut Connections,
) -> Result<Vec<Outcome>> {
    let mut outcomes = Vec::with_capacity(steps.len());
    let mut outstanding: HashSet<usize> = HashSet::new();
    let mut trackers = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let number = i + 1;
        let skip = if outstanding.contains(&step.index) {
            Some("an earlier change to this service is not in Kubernetes yet")
        } else if trackers.len() >= MAX_LATE {
            Some("the series stopped after enough late changes")
        } else {
            None
        };
        if let Some(why) = skip {
            outcomes.push(Outcome {
                number,
                step: step.clone(),
                seen: Seen::Skipped(why),
            });
            continue;
        }
        step.apply(consul).await?;
        let changed = Instant::now();
        let seen = match seen_at(client, ns, step, Some(changed + CHANGE_WITHIN)).await {
            Some(at) => Seen::InTime(at - changed),
            None => {
                outstanding.insert(step.index);
                trackers.push(track(client, ns, step, changed, i));
                Seen::Late {
                    after: changed.elapsed(),
                    seen: false,
                }
            }
        };
        let outcome = Outcome {
            number,
            step: step.clone(),
            seen,
        };
        println!("{}", outcome.line(steps.len()));
        outcomes.push(outcome);
        connections.sample();
    }
    settle_late(trackers, &mut outcomes).await;
    Ok(outcomes)
}

/// A late change followed in the background until it shows in Kubernetes.
struct Tracker {
    /// The outcome's position in the series.
    position: usize,
    changed: Instant,
    seen: tokio::task::JoinHandle<Option<Instant>>,
}

fn track(client: &Client, ns: &str, step: &Step, changed: Instant, position: usize) -> Tracker {
    let (client, ns, step) = (client.clone(), ns.to_string(), step.clone());
    let seen = tokio::spawn(async move { seen_at(&client, &ns, &step, None).await });
    Tracker {
        position,
        changed,
        seen,
    }
}

/// Gives the late changes until [`LATE_GRACE`] from now to show, and records when they
/// did, or for how long they were watched in vain.
async fn settle_late(trackers: Vec<Tracker>, outcomes: &mut [Outcome]) {
    let until = tokio::time::Instant::now() + LATE_GRACE;
    let watched: Vec<(usize, Instant, AbortHandle)> = trackers
        .iter()
        .map(|t| (t.position, t.changed, t.seen.abort_handle()))
        .collect();
    let mut pending: FuturesUnordered<_> = trackers
        .into_iter()
        .map(|t| async move { (t.position, t.changed, t.seen.await) })
        .collect();
    while let Ok(Some((position, changed, seen))) =
        tokio::time::timeout_at(until, pending.next()).await
    {
        if let Ok(Some(at)) = seen {
            outcomes[position].seen = Seen::Late {
                after: at - changed,
                seen: true,
            };
        }
    }
    let now = Instant::now();
    for (position, changed, abort) in watched {
        abort.abort();
        if let Seen::Late { seen: false, .. } = outcomes[position].seen {
            outcomes[position].seen = Seen::Late {
                after: now - changed,
                seen: false,
            };
        }
    }
}

/// Reads the step's service until its EndpointSlices show what the step wants; the time
/// of that read, or `None` at `until`.
async fn seen_at(
    client: &Client,
    ns: &str,
    step: &Step,
    until: Option<Instant>,
) -> Option<Instant> {
    loop {
        if let Some(slices) = slices_of(client, ns, &step.instance.service).await {
            if readiness(&slices) == step.want {
                return Some(Instant::now());
            }
        }
        if until.is_some_and(|until| Instant::now() >= until) {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The connector's established TCP connections to the agent's port, sampled.
struct Connections {
    pid: u32,
    port: u16,
    last: usize,
    most: usize,
    samples: usize,
}

impl Connections {
    fn new(pid: u32, port: u16) -> Self {
        Self {
            pid,
            port,
            last: 0,
            most: 0,
            samples: 0,
        }
    }

    /// Counts now; a failed read (the process gone) counts nothing.
    fn sample(&mut self) {
        if let Ok(n) = established_to(self.pid, self.port) {
            self.last = n;
            self.most = self.most.max(n);
            self.samples += 1;
        }
    }

    fn describe(&self, limit: u32) -> String {
        format!(
            "connector connections to the agent's port {}: {} at the end, at most {} in {} samples (agent limit {limit})",
            self.port, self.last, self.most, self.samples
        )
    }
}

/// Established TCP connections of process `pid` to port `port` on this host (the agent
/// listens on 127.0.0.1): its socket inodes from `/proc/<pid>/fd`, matched against
/// `/proc/net/tcp` and `/proc/net/tcp6` by remote port, state and inode.
fn established_to(pid: u32, port: u16) -> Result<usize> {
    let inodes = socket_inodes(pid)?;
    let mut count = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        count += text
            .lines()
            .skip(1)
            .filter(|line| is_established_to(line, port, &inodes))
            .count();
    }
    Ok(count)
}

/// The inodes of the sockets `pid` holds (`socket:[N]` links in `/proc/<pid>/fd`).
fn socket_inodes(pid: u32) -> Result<HashSet<String>> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))?;
    Ok(entries
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            let inode = link.strip_prefix("socket:[")?.strip_suffix(']')?;
            Some(inode.to_string())
        })
        .collect())
}

/// One `/proc/net/tcp` line: `sl local rem st tx:rx tr:when retrnsmt uid timeout inode`,
/// addresses as `HEXADDR:HEXPORT`, state `01` = ESTABLISHED.
fn is_established_to(line: &str, port: u16, inodes: &HashSet<String>) -> bool {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 10 || fields[3] != "01" || !inodes.contains(fields[9]) {
        return false;
    }
    fields[2]
        .rsplit_once(':')
        .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
        == Some(port)
}

/// The figures of one run, printed whether it passes or not.
struct Figures {
    transport: Transport,
    /// The agent's per-client connection limit.
    limit: u32,
    registered: Duration,
    synced: Duration,
    outcomes: Vec<Outcome>,
    connections: Connections,
    failed_requests: f64,
}

impl Figures {
    fn summary(&self) -> String {
        let in_time: Vec<Duration> = self
            .outcomes
            .iter()
            .filter_map(|o| match o.seen {
                Seen::InTime(d) => Some(d),
                _ => None,
            })
            .collect();
        let late = self.late().len();
        let skipped = self.outcomes.len() - in_time.len() - late;
        let slowest = in_time.iter().max().copied().unwrap_or_default();
        let mut text = format!(
            "consul scale over {}: {SERVICES} services registered in {:.1}s, all in Kubernetes {:.1}s after the start; \
             {} changes in time (slowest {:.1}s), {late} late, {skipped} skipped; {}; failed Consul requests: {}\n",
            self.transport.name(),
            self.registered.as_secs_f64(),
            self.synced.as_secs_f64(),
            in_time.len(),
            slowest.as_secs_f64(),
            self.connections.describe(self.limit),
            self.failed_requests,
        );
        for outcome in &self.outcomes {
            let _ = writeln!(text, "  {}", outcome.line(self.outcomes.len()));
        }
        text
    }

    fn late(&self) -> Vec<&Outcome> {
        self.outcomes.iter().filter(|o| o.is_late()).collect()
    }

    /// Fails when a change was late, the connector held more connections than the agent
    /// allows, or any of its Consul requests failed: the agent resets every connection
    /// beyond its limit at once, so a connector over budget rarely shows more connections
    /// than the limit when sampled, but it does show failed requests. The error ends with
    /// `log_tail`, the connector's last log lines.
    fn verdict(&self, log_tail: &str) -> Result<()> {
        let late = self.late();
        let over_limit = self.connections.most > self.limit as usize;
        let refused = self.failed_requests != 0.0;
        if late.is_empty() && !over_limit && !refused {
            return Ok(());
        }
        let mut message = format!(
            "over {}: {} of {} changes late; {}\n",
            self.transport.name(),
            late.len(),
            self.outcomes.len(),
            self.connections.describe(self.limit),
        );
        for outcome in &late {
            let _ = writeln!(message, "{}", outcome.line(self.outcomes.len()));
        }
        if over_limit {
            let _ = writeln!(
                message,
                "the connector held {} connections to the agent, above its limit of {}",
                self.connections.most, self.limit
            );
        }
        if refused {
            let _ = writeln!(
                message,
                "{} Consul requests failed (an agent over its per-client limit resets the connections beyond it)",
                self.failed_requests
            );
        }
        bail!("{message}connector log tail:\n{log_tail}")
    }
}
