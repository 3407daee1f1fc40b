//! Benchmark harness of registry-connector: runs the release binary as a separate
//! process against the real test environment (kube-apiserver, etcd,
//! kube-controller-manager, and Consul or Eureka) and reports initial sync against the
//! apiserver's own write floor, change propagation, cost per change and steady state.
//!
//! `scripts/bench quick|full [--registry consul|eureka]` starts the environment,
//! builds, runs this and stops the environment; `scripts/bench curve --ns ...` runs the
//! scaling curve instead, and `scripts/bench export` the Kubernetes → registry direction
//! (Consul or Eureka).
//! See docs/benchmarks.md for the method.
#![forbid(unsafe_code)]

mod changes;
mod connector;
mod curve;
mod export_report;
mod export_results;
mod floor;
mod host;
mod metrics;
mod model;
mod plan;
mod pods;
mod registry;
mod report;
mod results;
mod sockets;
mod tracker;
mod workloads;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use rand::rngs::StdRng;
use rand::SeedableRng;

use plan::{CurveOverrides, ExportOverrides, Overrides, Profile};
use registry::consul::Consul;
use registry::consul_link::{ConnectorLink, Tls};
use registry::eureka::Eureka;
use registry::nacos::Nacos;
use registry::zookeeper::Zookeeper;
use registry::{Kind, Registry};
use workloads::export_subject::{ConsulK8s, Subject};
use workloads::Ctx;

/// Benchmarks registry-connector against the real test environment.
#[derive(Debug, Parser)]
#[command(name = "bench", args_override_self = true)]
struct Args {
    /// Workload sizes and durations.
    #[arg(value_enum)]
    profile: Profile,
    /// The registry the connector reads.
    #[arg(long, value_enum, default_value = "consul")]
    registry: Kind,
    /// Admin kubeconfig of the environment.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Consul HTTP address (127.0.0.1:PORT), with --registry consul. The harness
    /// writes through it, and the connector reads it unless --consul-tls.
    #[arg(long, env = "CONSUL_HTTP_ADDR")]
    consul_http_addr: Option<String>,
    /// The connector reads the agent's HTTPS API (--consul-https-addr) with the test
    /// environment's CA and client certificate ($TESTENV_DIR/pki).
    #[arg(long)]
    consul_tls: bool,
    /// The same agent's HTTPS address (127.0.0.1:PORT), with --consul-tls.
    #[arg(long, env = "CONSUL_HTTPS_ADDR")]
    consul_https_addr: Option<String>,
    /// The test environment's directory (for its pki/), with --consul-tls.
    #[arg(long, env = "TESTENV_DIR")]
    testenv_dir: Option<PathBuf>,
    /// Eureka's API base (http://127.0.0.1:PORT/eureka), with --registry eureka.
    #[arg(long, env = "EUREKA_URL")]
    eureka_url: Option<String>,
    /// Nacos's HTTP API (127.0.0.1:PORT; gRPC on PORT + 1000), with --registry nacos.
    #[arg(long, env = "NACOS_ADDR")]
    nacos_addr: Option<String>,
    /// ZooKeeper's client port (127.0.0.1:PORT), with --registry zookeeper.
    #[arg(long, env = "ZOOKEEPER_ADDR")]
    zookeeper_addr: Option<String>,
    /// The connector's --eureka-poll-interval. Eureka has no blocking queries, so a
    /// change waits up to this long in the server before the connector reads it.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    eureka_poll_interval: Duration,
    /// The connector binary (default: target/release/registry-connector of this repo).
    #[arg(long)]
    connector_bin: Option<PathBuf>,
    /// JSON results file (default:
    /// target/bench/results-[<registry>-]<profile>-<timestamp>.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Services (overrides the profile).
    #[arg(long)]
    n: Option<usize>,
    /// Instances per service.
    #[arg(long)]
    m: Option<usize>,
    /// Changes per propagation run (export: readiness flips, each two status writes).
    #[arg(long)]
    k: Option<usize>,
    /// Changes per cost-per-change run.
    #[arg(long)]
    k_cost: Option<usize>,
    /// Steady-state window (e.g. 60s, 5m).
    #[arg(long, value_parser = humantime::parse_duration)]
    steady: Option<Duration>,
    /// Client-side concurrency of the floor, and the connector's --concurrency.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Registry writes in flight while loading or removing a data set (no connector
    /// reads it then).
    #[arg(long, alias = "consul-concurrency", default_value_t = 32)]
    load_concurrency: usize,
    /// The connector's --consul-max-connections. Not given: the connector's own
    /// default, which is what the figures are meant to show (scripts/bench starts the
    /// agent with Consul's default limit of 200 connections per client).
    #[arg(long)]
    consul_max_connections: Option<usize>,
    /// The connector's --log-level.
    #[arg(long, default_value = "info")]
    connector_log_level: String,
    /// Seed of the random choices (service, kind of change, intervals).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Skip the cost-per-change runs (N = 100 and 1,000).
    #[arg(long)]
    no_cost: bool,
    /// Leave namespaces and registry entries in place at the end.
    #[arg(long)]
    keep: bool,
    /// The command line to record in the results (scripts/bench passes its own).
    #[arg(long, default_value = "")]
    command: String,
    /// curve: the Ns, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "400,1000,10000,30000")]
    ns: Vec<usize>,
    /// curve, export: the connector's quiet period (default: its own default, 1s).
    #[arg(long, value_parser = humantime::parse_duration)]
    quiet: Option<Duration>,
    /// curve, export: a change that takes longer counts as not landed (default 30s).
    #[arg(long, value_parser = humantime::parse_duration)]
    land_bound: Option<Duration>,
    /// curve: the window at rest (default 60s; Consul's blocking queries return every
    /// 5 min, so 5m shows their turnover too); export: the same (default 5m).
    #[arg(long, value_parser = humantime::parse_duration)]
    rest: Option<Duration>,
    /// export: run the workload against this consul-k8s binary (`sync-catalog
    /// -to-consul`, an MPL-2.0 release; `scripts/consul-k8s-build` builds one) instead
    /// of the connector, for a side-by-side.
    #[arg(long)]
    consul_k8s_bin: Option<PathBuf>,
    /// export with --consul-k8s-bin: its `-consul-write-interval` (its default, 30s).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    consul_k8s_write_interval: Duration,
    /// curve: skip an N whose N x M is above this (default for Eureka: 30,000, the
    /// largest load its 256 MiB heap was seen to hold; none for Consul).
    #[arg(long)]
    max_instances: Option<usize>,
}

impl Args {
    fn overrides(&self) -> Overrides {
        Overrides {
            n: self.n,
            m: self.m,
            k: self.k,
            k_cost: self.k_cost,
            steady: self.steady,
            no_cost: self.no_cost,
        }
    }

    fn curve_overrides(&self) -> CurveOverrides {
        CurveOverrides {
            ns: self.ns.clone(),
            m: self.m,
            k: self.k,
            quiet: self.quiet,
            land_bound: self.land_bound,
            rest: self.rest,
            max_instances: self.max_instances,
        }
    }

    fn export_overrides(&self) -> ExportOverrides {
        ExportOverrides {
            n: self.n,
            m: self.m,
            k: self.k,
            quiet: self.quiet,
            land_bound: self.land_bound,
            rest: self.rest,
        }
    }

    /// The HTTPS side of the agent, with `--consul-tls`.
    fn tls(&self) -> Result<Option<Tls>> {
        if !self.consul_tls {
            return Ok(None);
        }
        let addr = self
            .consul_https_addr
            .clone()
            .context("--consul-tls needs --consul-https-addr (or CONSUL_HTTPS_ADDR)")?;
        let dir = self
            .testenv_dir
            .as_ref()
            .context("--consul-tls needs --testenv-dir (or TESTENV_DIR) for its pki/")?;
        Ok(Some(Tls {
            addr,
            pki: dir.join("pki"),
        }))
    }

    /// The client of the registry chosen with `--registry`.
    async fn registry(&self) -> Result<Registry> {
        Ok(match self.registry {
            Kind::Consul => {
                let addr = self
                    .consul_http_addr
                    .as_deref()
                    .context("--registry consul needs --consul-http-addr (or CONSUL_HTTP_ADDR)")?;
                let link = ConnectorLink {
                    max_connections: self.consul_max_connections,
                    tls: self.tls()?,
                };
                Registry::Consul(Consul::new(addr, link)?)
            }
            Kind::Eureka => {
                let url = self
                    .eureka_url
                    .as_deref()
                    .context("--registry eureka needs --eureka-url (or EUREKA_URL)")?;
                if self.consul_tls {
                    bail!("--consul-tls is for --registry consul");
                }
                Registry::Eureka(Eureka::new(url, self.eureka_poll_interval)?)
            }
            Kind::Nacos => {
                let addr = self
                    .nacos_addr
                    .as_deref()
                    .context("--registry nacos needs --nacos-addr (or NACOS_ADDR)")?;
                if self.consul_tls {
                    bail!("--consul-tls is for --registry consul");
                }
                Registry::Nacos(Nacos::new(addr)?)
            }
            Kind::Zookeeper => {
                let addr = self
                    .zookeeper_addr
                    .as_deref()
                    .context("--registry zookeeper needs --zookeeper-addr (or ZOOKEEPER_ADDR)")?;
                if self.consul_tls {
                    bail!("--consul-tls is for --registry consul");
                }
                Registry::Zookeeper(Zookeeper::connect(addr).await?)
            }
        })
    }

    /// The name of this run's files: Consul over HTTP keeps the names it always had.
    fn label(&self) -> String {
        let registry = match (self.registry, self.consul_tls) {
            (Kind::Consul, true) => "consul-tls".to_string(),
            (other, _) => other.name().to_lowercase(),
        };
        match (self.profile, registry.as_str()) {
            (Profile::Curve, r) => format!("curve-{r}"),
            (Profile::Export, "consul") if self.consul_k8s_bin.is_some() => {
                "export-consul-k8s".into()
            }
            (p, "consul") => p.name().to_string(),
            (p, r) => format!("{r}-{}", p.name()),
        }
    }
}

pub fn say(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

fn short_id() -> String {
    use rand::Rng;
    format!("{:06x}", rand::rng().random::<u32>() & 0xff_ffff)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let plan = plan::plan(args.profile, args.registry, &args.overrides());
    let registry = args.registry().await?;
    let root = testenv::repo_root();
    let bin = args
        .connector_bin
        .clone()
        .unwrap_or_else(|| root.join("target/release/registry-connector"));
    if !bin.exists() {
        bail!(
            "{} not found: cargo build --release -p registry-connector",
            bin.display()
        );
    }
    let stamp = host::utc_stamp("+%Y%m%dT%H%M%SZ");
    let profile = args.profile.name();
    let label = args.label();
    let out = args.out.clone().unwrap_or_else(|| {
        root.join("target/bench")
            .join(format!("results-{label}-{stamp}.json"))
    });
    let log_dir = root
        .join("target/bench")
        .join(format!("logs-{label}-{stamp}"));
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let client = testenv::client_from(&args.kubeconfig).await?;
    let mut ctx = Ctx {
        plan,
        client,
        registry,
        bin,
        kubeconfig: args.kubeconfig.clone(),
        concurrency: args.concurrency,
        load_concurrency: args.load_concurrency,
        log_level: args.connector_log_level.clone(),
        seed: args.seed,
        run_id: short_id(),
        log_dir,
        rng: StdRng::seed_from_u64(args.seed),
        namespaces: Vec::new(),
    };
    let total = Instant::now();
    if args.profile == Profile::Curve {
        return curve(&args, &mut ctx, &stamp, &out, total).await;
    }
    if args.profile == Profile::Export {
        return export(&args, &mut ctx, &stamp, &out, total).await;
    }
    let result = workloads::run_all(&mut ctx, profile, &stamp, &args.command).await;
    if !args.keep {
        cleanup(&ctx).await;
    }
    let mut results = result?;
    results.total_s = total.elapsed().as_secs_f64();
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(&results).context("encoding the results")?;
    std::fs::write(&out, json).with_context(|| format!("writing {}", out.display()))?;
    println!("{}", report::markdown(&results));
    say(format!(
        "results in {} (connector logs in {}), {:.0} s in all",
        out.display(),
        ctx.log_dir.display(),
        results.total_s
    ));
    Ok(())
}

/// The scaling curve: one row per N, the JSON rewritten after each.
async fn curve(
    args: &Args,
    ctx: &mut Ctx,
    stamp: &str,
    out: &std::path::Path,
    total: Instant,
) -> Result<()> {
    let cp = plan::curve_plan(args.registry, &args.curve_overrides());
    let scratch = results::Results::new(args.registry, "curve", stamp, &args.command);
    let mut results = curve::CurveResults {
        registry: args.registry,
        transport: ctx.registry.transport().into(),
        started_utc: stamp.into(),
        command: args.command.clone(),
        git: scratch.git,
        machine: scratch.machine,
        agent_conn_limit: ctx.registry.conn_limit().await,
        connector_flags: ctx.connector_flags().join(" ")
            + &format!(
                " --quiet-period {} --leader-elect=false (others default)",
                humantime::format_duration(cp.quiet)
            ),
        params: curve::CurveParams {
            ns: cp.ns.clone(),
            m: cp.m,
            k: cp.k,
            quiet_ms: cp.quiet.as_millis() as u64,
            land_bound_s: cp.land_bound.as_secs_f64(),
            rest_s: cp.rest.as_secs_f64(),
            restart_timeout_s: cp.restart_timeout.as_secs_f64(),
            max_instances: cp.max_instances,
            concurrency: ctx.concurrency,
            seed: ctx.seed,
        },
        rows: Vec::new(),
        total_s: 0.0,
    };
    say(format!(
        "curve over {} (agent limit per client: {}), N = {:?}",
        results.transport,
        results
            .agent_conn_limit
            .map_or("n/a".into(), |v| v.to_string()),
        cp.ns
    ));
    workloads::curve::run(ctx, &cp, &mut results, out).await;
    if !args.keep {
        cleanup(ctx).await;
    }
    results.total_s = total.elapsed().as_secs_f64();
    let json = serde_json::to_string_pretty(&results).context("encoding the results")?;
    std::fs::write(out, json).with_context(|| format!("writing {}", out.display()))?;
    println!("{}", curve::markdown(&results));
    say(format!(
        "results in {} (connector logs in {}/n*), {:.0} s in all",
        out.display(),
        ctx.log_dir.parent().unwrap_or(&ctx.log_dir).display(),
        results.total_s
    ));
    Ok(())
}

/// The Kubernetes → registry workload (Consul or Eureka): the results are written (and
/// the Markdown printed) whether it succeeded or not, with the error in `status`.
async fn export(
    args: &Args,
    ctx: &mut Ctx,
    stamp: &str,
    out: &std::path::Path,
    total: Instant,
) -> Result<()> {
    let mut ep = plan::export_plan(&args.export_overrides());
    let subject = match &args.consul_k8s_bin {
        None => Subject::RegistryConnector,
        Some(bin) => {
            let consul = ctx.registry.consul().context(
                "--consul-k8s-bin is for --registry consul (consul-k8s writes to Consul only)",
            )?;
            let c = ConsulK8s::new(
                bin.clone(),
                args.consul_k8s_write_interval,
                consul.http_addr(),
            )
            .await?;
            // It writes once per interval, and deregisters what its per-service poll
            // (once per interval too) found stale at the next write.
            if args.land_bound.is_none() {
                ep.land_bound = 2 * c.write_interval + Duration::from_secs(15);
            }
            // It takes its Services one after another, about 5 a second here (seen at
            // N = 1,000: 590 Services in the 120 s the connector is given); give it room
            // to finish, so that its time can be reported rather than a timeout.
            ep.sync_timeout = ep
                .sync_timeout
                .max(Duration::from_millis(300 * ep.n as u64) + Duration::from_secs(120));
            Subject::ConsulK8s(c)
        }
    };
    let scratch = results::Results::new(args.registry, "export", stamp, &args.command);
    let eureka = args.registry == Kind::Eureka;
    let watch = if eureka {
        format!(
            "polls, no blocking queries in Eureka: GET /eureka/apps/<APP> every {} ms per flip, GET /eureka/apps every {} ms for the initial export (Accept: application/json); a latency includes up to one poll interval and the answer's round trip. The environment's server serves reads from its read-write cache (eureka.server.use-read-only-response-cache=false in testenv/eureka), invalidated by every registration, status change and cancel, so no response-cache lag is added (a production server's read-only cache lags up to 30 s)",
            ep.registry_poll.as_millis(),
            ep.registry_poll_all.as_millis()
        )
    } else {
        "blocking queries (/v1/catalog/node/<node>?index= for the initial export, /v1/health/service/<name>?index= per flip): an answer arrives when Consul commits, within the loopback round trip (a few ms)".into()
    };
    let mut results = export_results::ExportResults {
        profile: "export".into(),
        registry: Some(args.registry),
        subject: subject.name(),
        started_utc: stamp.into(),
        command: args.command.clone(),
        git: scratch.git,
        machine: scratch.machine,
        agent_conn_limit: ctx.registry.conn_limit().await,
        params: export_results::ExportParams {
            n: ep.n,
            m: ep.m,
            k: ep.k,
            quiet_ms: ep.quiet.as_millis() as u64,
            land_bound_s: ep.land_bound.as_secs_f64(),
            rest_s: ep.rest.as_secs_f64(),
            restart_settle_s: ep.restart_settle.as_secs_f64(),
            concurrency: ctx.concurrency,
            seed: ctx.seed,
            unique_addresses: ep.n * ep.m <= pods::UNIQUE_ADDRESSES,
            not_ready_in_registry: subject.not_ready_description(args.registry).into(),
            registry_poll_ms: eureka.then_some(ep.registry_poll.as_millis() as u64),
            watch,
        },
        ..Default::default()
    };
    say(format!(
        "export to {}: N = {}, M = {}, K = {}, quiet {:?}, rest {:?}",
        args.registry.name(),
        ep.n,
        ep.m,
        ep.k,
        ep.quiet,
        ep.rest
    ));
    let outcome = workloads::export::run(ctx, &ep, &subject, &mut results, args.keep).await;
    results.status = match &outcome {
        Ok(()) => "ok".into(),
        Err(e) => format!("failed: {e:#}").replace(['|', '\n'], " "),
    };
    if !args.keep {
        cleanup(ctx).await;
    }
    results.evaluate();
    results.total_s = total.elapsed().as_secs_f64();
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(&results).context("encoding the results")?;
    std::fs::write(out, json).with_context(|| format!("writing {}", out.display()))?;
    println!("{}", export_report::markdown(&results));
    say(format!(
        "results in {} (connector logs in {}), {:.0} s in all",
        out.display(),
        ctx.log_dir.display(),
        results.total_s
    ));
    outcome
}

/// Deletes the run's namespaces and registry entries (best effort: reported, not fatal).
async fn cleanup(ctx: &Ctx) {
    use k8s_openapi::api::core::v1::Namespace;
    let api: kube::Api<Namespace> = kube::Api::all(ctx.client.clone());
    for ns in &ctx.namespaces {
        if let Err(e) = api.delete(ns, &kube::api::DeleteParams::background()).await {
            say(format!("deleting namespace {ns} failed: {e}"));
        }
    }
    if let Err(e) = ctx.registry.cleanup(ctx.load_concurrency).await {
        say(format!(
            "cleanup of the {} entries failed: {e:#}",
            ctx.registry.name()
        ));
    }
}
