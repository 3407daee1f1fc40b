//! Workload sizes and waits: the profiles (`quick`, `full`, `curve`, `export`) and the
//! overrides of the command line, resolved once into a [`Plan`] (for the curve a
//! [`CurvePlan`], for the export an [`ExportPlan`]) so that the workloads read numbers,
//! not flags. Pure.

use std::time::Duration;

use clap::ValueEnum;

use crate::registry::Kind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Profile {
    /// N = 200, M = 3, K = 50, steady state 60 s: a few minutes.
    Quick,
    /// N = 10,000, M = 3, K = 200, steady state 5 min.
    Full,
    /// The scaling curve: per N of `--ns`, a fresh data set through floor, initial
    /// sync, propagation, rest and restart; one row per N.
    Curve,
    /// The Kubernetes → registry direction (`--sync to-registry`, Consul or Eureka): N selector Services ×
    /// M Pods exported from empty, K readiness flips, a window at rest, a restart.
    Export,
}

impl Profile {
    pub fn name(self) -> &'static str {
        match self {
            Profile::Quick => "quick",
            Profile::Full => "full",
            Profile::Curve => "curve",
            Profile::Export => "export",
        }
    }
}

/// Command-line overrides of the profile's sizes.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub n: Option<usize>,
    pub m: Option<usize>,
    pub k: Option<usize>,
    pub k_cost: Option<usize>,
    pub steady: Option<Duration>,
    pub no_cost: bool,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub n: usize,
    pub m: usize,
    pub k: usize,
    pub k_cost: usize,
    pub steady: Duration,
    pub cost_ns: Vec<usize>,
    /// Per-change wait before moving on, on top of the quiet period and the registry's
    /// read delay.
    pub land_slack: Duration,
    pub final_wait: Duration,
    pub cost_final_wait: Duration,
    pub cost_idle_cap: Duration,
    /// Longest wait for pending changes before the steady-state window.
    pub settle_max: Duration,
}

/// The plan of `profile` for `registry`, with `o` applied. Both registries get the
/// same sizes: the Eureka server (one JVM with a 256 MiB heap) keeps up with the quick
/// profile on 2 cores; the full profile's 30,000 instances are its own experiment.
pub fn plan(profile: Profile, _registry: Kind, o: &Overrides) -> Plan {
    let quick = profile == Profile::Quick;
    let pick = |q: u64, f: u64| Duration::from_secs(if quick { q } else { f });
    Plan {
        n: o.n.unwrap_or(if quick { 200 } else { 10_000 }),
        m: o.m.unwrap_or(3),
        k: o.k.unwrap_or(if quick { 50 } else { 200 }),
        k_cost: o.k_cost.unwrap_or(if quick { 20 } else { 50 }),
        steady: o.steady.unwrap_or(pick(60, 300)),
        cost_ns: if o.no_cost { vec![] } else { vec![100, 1000] },
        land_slack: Duration::from_millis(1500),
        final_wait: pick(20, 120),
        cost_final_wait: pick(20, 120),
        cost_idle_cap: pick(10, 60),
        settle_max: pick(30, 360),
    }
}

/// The curve's sizes and bounds, per N.
#[derive(Debug, Clone)]
pub struct CurvePlan {
    pub ns: Vec<usize>,
    pub m: usize,
    /// Changes per N: modest, so that the largest N stays within minutes.
    pub k: usize,
    /// The connector's quiet period (its default, 1 s, unless overridden).
    pub quiet: Duration,
    /// A change that takes longer counts as not landed; also the wait after the last
    /// change and the longest wait for pending changes before the rest window.
    pub land_bound: Duration,
    pub rest: Duration,
    /// How long the restarted connector may take to be ready before it counts as not.
    pub restart_timeout: Duration,
    /// Ns whose N × M is above this are skipped (Eureka: what its heap was seen to hold).
    pub max_instances: Option<usize>,
    /// Longest wait for a deleted namespace to be gone.
    pub namespace_gone_max: Duration,
}

/// Command-line overrides of the curve.
#[derive(Debug, Clone, Default)]
pub struct CurveOverrides {
    pub ns: Vec<usize>,
    pub m: Option<usize>,
    pub k: Option<usize>,
    pub quiet: Option<Duration>,
    pub land_bound: Option<Duration>,
    pub rest: Option<Duration>,
    pub max_instances: Option<usize>,
}

/// The largest load of the Eureka server (one JVM, 256 MiB heap) measured to fit: the
/// full profile's 10,000 × 3 (see BENCHMARKS.md). Larger Ns are skipped unless
/// `--max-instances` says otherwise.
pub const EUREKA_MAX_INSTANCES: usize = 30_000;

pub fn curve_plan(registry: Kind, o: &CurveOverrides) -> CurvePlan {
    CurvePlan {
        ns: if o.ns.is_empty() {
            vec![400, 1000, 10_000, 30_000]
        } else {
            o.ns.clone()
        },
        m: o.m.unwrap_or(3),
        k: o.k.unwrap_or(50),
        quiet: o.quiet.unwrap_or(Duration::from_secs(1)),
        land_bound: o.land_bound.unwrap_or(Duration::from_secs(30)),
        rest: o.rest.unwrap_or(Duration::from_secs(60)),
        restart_timeout: Duration::from_secs(60),
        max_instances: o.max_instances.or(match registry {
            Kind::Eureka => Some(EUREKA_MAX_INSTANCES),
            Kind::Consul | Kind::Nacos | Kind::Zookeeper => None,
        }),
        namespace_gone_max: Duration::from_secs(600),
    }
}

/// The export workload's sizes and bounds.
#[derive(Debug, Clone)]
pub struct ExportPlan {
    pub n: usize,
    pub m: usize,
    /// Readiness flips: each is two Pod status writes (Ready False, then True again).
    pub k: usize,
    /// The connector's quiet period (its default, 1 s, unless `--quiet`).
    pub quiet: Duration,
    /// A status write whose effect is not in Consul within this counts as not landed.
    pub land_bound: Duration,
    pub rest: Duration,
    /// Longest wait for the controller-manager to build every EndpointSlice, and for
    /// the connector to register every instance.
    pub sync_timeout: Duration,
    /// How long the restarted connector may take to be ready.
    pub restart_timeout: Duration,
    /// How long the restarted connector is watched for writes once ready: the quiet
    /// period plus the connector's default `--max-period` (5 s), so that any batch it
    /// would coalesce is written within it.
    pub restart_settle: Duration,
    /// Longest wait for the namespace to be gone at the end.
    pub namespace_gone_max: Duration,
    /// Eureka: how often the harness reads an application back while it waits for a
    /// flip (no blocking queries): one small `GET /apps/<APP>` per interval, short so
    /// that it adds little to a latency.
    pub registry_poll: Duration,
    /// Eureka: how often `GET /apps` (every instance) is read while the initial export
    /// is waited for: longer, since each answer is the whole registry (about 1 KiB per
    /// instance) and the server shares the 2 cores with the connector.
    pub registry_poll_all: Duration,
}

/// Command-line overrides of the export workload.
#[derive(Debug, Clone, Default)]
pub struct ExportOverrides {
    pub n: Option<usize>,
    pub m: Option<usize>,
    pub k: Option<usize>,
    pub quiet: Option<Duration>,
    pub land_bound: Option<Duration>,
    pub rest: Option<Duration>,
}

pub fn export_plan(o: &ExportOverrides) -> ExportPlan {
    let n = o.n.unwrap_or(1000);
    let m = o.m.unwrap_or(3);
    let quiet = o.quiet.unwrap_or(Duration::from_secs(1));
    ExportPlan {
        n,
        m,
        k: o.k.unwrap_or(50),
        quiet,
        land_bound: o.land_bound.unwrap_or(Duration::from_secs(30)),
        rest: o.rest.unwrap_or(Duration::from_secs(300)),
        // 120 s, or 20 ms per Pod beyond that (the controller-manager and the apiserver
        // share 2 cores with everything else).
        sync_timeout: Duration::from_secs(120).max(Duration::from_millis(20 * (n * m) as u64)),
        restart_timeout: Duration::from_secs(60),
        restart_settle: quiet + Duration::from_secs(5),
        namespace_gone_max: Duration::from_secs(300),
        registry_poll: Duration::from_millis(50),
        registry_poll_all: Duration::from_millis(200),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_and_overrides() {
        let q = plan(Profile::Quick, Kind::Eureka, &Overrides::default());
        assert_eq!((q.n, q.m, q.k, q.k_cost), (200, 3, 50, 20));
        assert_eq!(q.steady, Duration::from_secs(60));
        assert_eq!(q.cost_ns, vec![100, 1000]);
        let f = plan(
            Profile::Full,
            Kind::Consul,
            &Overrides {
                n: Some(2000),
                no_cost: true,
                ..Default::default()
            },
        );
        assert_eq!((f.n, f.k), (2000, 200));
        assert!(f.cost_ns.is_empty());
        assert_eq!(f.final_wait, Duration::from_secs(120));
    }

    #[test]
    fn export_defaults_and_overrides() {
        let e = export_plan(&ExportOverrides::default());
        assert_eq!((e.n, e.m, e.k), (1000, 3, 50));
        assert_eq!(e.rest, Duration::from_secs(300));
        assert_eq!(e.restart_settle, Duration::from_secs(6));
        let small = export_plan(&ExportOverrides {
            n: Some(20),
            k: Some(5),
            rest: Some(Duration::from_secs(20)),
            quiet: Some(Duration::from_millis(100)),
            ..Default::default()
        });
        assert_eq!((small.n, small.m, small.k), (20, 3, 5));
        assert_eq!(small.sync_timeout, Duration::from_secs(120));
        assert_eq!(small.restart_settle, Duration::from_millis(5100));
    }

    #[test]
    fn curve_defaults_and_the_eureka_guard() {
        let c = curve_plan(Kind::Consul, &CurveOverrides::default());
        assert_eq!(c.ns, vec![400, 1000, 10_000, 30_000]);
        assert_eq!((c.m, c.k, c.max_instances), (3, 50, None));
        let e = curve_plan(
            Kind::Eureka,
            &CurveOverrides {
                ns: vec![400],
                ..Default::default()
            },
        );
        assert_eq!(e.ns, vec![400]);
        assert_eq!(e.max_instances, Some(EUREKA_MAX_INSTANCES));
    }
}
