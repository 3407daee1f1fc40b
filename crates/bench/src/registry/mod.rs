//! The registry under test. The workloads are registry-neutral: they load data sets,
//! make changes, start connectors and clean up through [`Registry`], which forwards to
//! the Consul, Eureka, Nacos or ZooKeeper client. An enum rather than a trait object: there
//! are four registries, the methods are async, and each variant keeps its own quirks (Consul's
//! abandoned long polls, Eureka's poll interval) behind the same few calls.

pub mod consul;
pub mod consul_export;
pub mod consul_link;
pub mod consul_proxy;
pub mod eureka;
pub mod eureka_export;
pub mod export_reader;
pub mod nacos;
pub mod zookeeper;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::ValueEnum;
use serde::Serialize;

use crate::model::{Instance, Service};
use consul::{ConnRelease, Consul};
use eureka::Eureka;
use nacos::Nacos;
use zookeeper::Zookeeper;

/// Which registry a run drives (`--registry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Consul,
    Eureka,
    Nacos,
    Zookeeper,
}

impl Kind {
    /// The name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Consul => "Consul",
            Kind::Eureka => "Eureka",
            Kind::Nacos => "Nacos",
            Kind::Zookeeper => "ZooKeeper",
        }
    }
}

/// A client of the registry under test.
#[derive(Debug)]
pub enum Registry {
    Consul(Consul),
    Eureka(Eureka),
    Nacos(Nacos),
    Zookeeper(Zookeeper),
}

/// What happens to a data set once the connector reading it has stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterStop {
    /// The next connector reads the same data set.
    Keep,
    /// The data set is done with.
    Remove,
}

impl Registry {
    pub fn kind(&self) -> Kind {
        match self {
            Registry::Consul(_) => Kind::Consul,
            Registry::Eureka(_) => Kind::Eureka,
            Registry::Nacos(_) => Kind::Nacos,
            Registry::Zookeeper(_) => Kind::Zookeeper,
        }
    }

    /// The name in the report.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// The connector's subcommand, which is also the `source` label of its metrics.
    pub fn source(&self) -> &'static str {
        match self {
            Registry::Consul(_) => "consul",
            Registry::Eureka(_) => "eureka",
            Registry::Nacos(_) => "nacos",
            Registry::Zookeeper(_) => "zookeeper",
        }
    }

    /// The Consul client, when the registry is Consul.
    pub fn consul(&self) -> Option<&Consul> {
        match self {
            Registry::Consul(c) => Some(c),
            Registry::Eureka(_) | Registry::Nacos(_) | Registry::Zookeeper(_) => None,
        }
    }

    /// The Eureka client, when the registry is Eureka.
    pub fn eureka(&self) -> Option<&Eureka> {
        match self {
            Registry::Consul(_) | Registry::Nacos(_) | Registry::Zookeeper(_) => None,
            Registry::Eureka(e) => Some(e),
        }
    }

    /// The TCP port the connector reads the registry on (Consul's HTTP or HTTPS API,
    /// Eureka's server): where its connections are counted.
    pub fn connector_port(&self) -> u16 {
        match self {
            Registry::Consul(c) => c.connector_port(),
            Registry::Eureka(e) => e.port(),
            Registry::Nacos(n) => n.port(),
            Registry::Zookeeper(z) => z.port(),
        }
    }

    /// How the connector reaches the registry, for the report (`Consul`, `Consul over
    /// HTTPS`, `Eureka`).
    pub fn transport(&self) -> &'static str {
        match self {
            Registry::Consul(c) if c.tls() => "Consul over HTTPS",
            Registry::Consul(_) => "Consul over HTTP",
            Registry::Eureka(_) => "Eureka over HTTP",
            Registry::Nacos(_) => "Nacos over gRPC",
            Registry::Zookeeper(_) => "ZooKeeper (one persistent recursive watch)",
        }
    }

    /// Consul only: the agent's per-client connection limit. A side figure: a failure
    /// to read it is reported and yields `None`.
    pub async fn conn_limit(&self) -> Option<u64> {
        match self {
            Registry::Consul(c) => match c.conn_limit().await {
                Ok(n) => Some(n),
                Err(err) => {
                    crate::say(format!(
                        "reading the agent's connection limit failed: {err:#}"
                    ));
                    None
                }
            },
            Registry::Eureka(_) | Registry::Nacos(_) | Registry::Zookeeper(_) => None,
        }
    }

    /// Consul only: connections the agent holds on the connectors' ports (the
    /// harness's own included), what its per-client limit counts.
    pub fn agent_connections(&self) -> Option<usize> {
        match self {
            Registry::Consul(c) => Some(c.open_connections()),
            Registry::Eureka(_) | Registry::Nacos(_) | Registry::Zookeeper(_) => None,
        }
    }

    /// How data sets are loaded, for the report.
    pub fn load_api(&self) -> &'static str {
        match self {
            Registry::Consul(_) => "PUT /v1/catalog/register",
            Registry::Eureka(_) => "POST /apps/{APP}",
            Registry::Nacos(_) => "POST /nacos/v1/ns/instance",
            Registry::Zookeeper(_) => "create <base>/<interface>/providers/<URL> (ephemeral)",
        }
    }

    /// The connector's flags that point it at the registry and select data set `set`.
    pub fn selection_flags(&self, set: &str) -> Vec<String> {
        match self {
            Registry::Consul(c) => c.selection_flags(set),
            Registry::Eureka(e) => e.selection_flags(set),
            Registry::Nacos(n) => n.selection_flags(set),
            Registry::Zookeeper(z) => z.selection_flags(set),
        }
    }

    /// Registry-specific tuning of every connector, reported with the results.
    pub fn tuning_flags(&self) -> Vec<String> {
        match self {
            Registry::Consul(c) => c.tuning_flags(),
            Registry::Eureka(e) => e.tuning_flags(),
            Registry::Nacos(n) => n.tuning_flags(),
            Registry::Zookeeper(z) => z.tuning_flags(),
        }
    }

    /// How long a change may wait in the registry before the connector can see it, on
    /// top of the quiet period: nothing with Consul's blocking queries, one poll
    /// interval with Eureka, the server's push delay with Nacos. Part of the propagation target and of the per-change wait.
    pub fn read_delay(&self) -> Duration {
        match self {
            Registry::Consul(_) => Duration::ZERO,
            Registry::Eureka(e) => e.poll_interval,
            Registry::Nacos(n) => n.read_delay(),
            Registry::Zookeeper(_) => Duration::ZERO,
        }
    }

    /// Registers every instance of `services`; returns the wall time taken.
    pub async fn register_all(&self, services: &[Service], concurrency: usize) -> Result<Duration> {
        let started = Instant::now();
        match self {
            Registry::Consul(c) => c.register_all(services, concurrency).await?,
            Registry::Eureka(e) => e.register_all(services, concurrency).await?,
            Registry::Nacos(n) => n.register_all(services, concurrency).await?,
            Registry::Zookeeper(z) => z.register_all(services, concurrency).await?,
        }
        Ok(started.elapsed())
    }

    /// A new instance of `svc`.
    pub async fn add(&self, svc: &Service, inst: &Instance) -> Result<()> {
        match self {
            Registry::Consul(c) => c.register(svc, inst).await,
            Registry::Eureka(e) => e.register(svc, inst).await,
            Registry::Nacos(n) => n.register(svc, inst).await,
            Registry::Zookeeper(z) => z.register(svc, inst).await,
        }
    }

    /// An instance leaves (Consul or Nacos deregistration, Eureka cancel).
    pub async fn remove(&self, svc: &Service, inst: &Instance) -> Result<()> {
        match self {
            Registry::Consul(c) => c.deregister(svc, inst).await,
            Registry::Eureka(e) => e.cancel(svc, inst).await,
            Registry::Nacos(n) => n.deregister(svc, inst).await,
            Registry::Zookeeper(z) => z.deregister(svc, inst).await,
        }
    }

    /// An instance becomes ready or not (Consul check passing/critical, Eureka status
    /// `UP`/`OUT_OF_SERVICE`, Nacos weight 1/0).
    pub async fn set_ready(&self, svc: &Service, inst: &Instance, ready: bool) -> Result<()> {
        match self {
            Registry::Consul(c) => c.set_ready(svc, inst, ready).await,
            Registry::Eureka(e) => e.set_ready(svc, inst, ready).await,
            Registry::Nacos(n) => n.set_ready(svc, inst, ready).await,
            Registry::Zookeeper(z) => z.set_ready(svc, inst, ready).await,
        }
    }

    /// Instances the registry reports for `service`, any state (a sanity check of a load).
    pub async fn instance_count(&self, service: &str) -> Result<usize> {
        match self {
            Registry::Consul(c) => c.instance_count(service).await,
            Registry::Eureka(e) => e.instance_count(service).await,
            Registry::Nacos(n) => n.instance_count(service).await,
            Registry::Zookeeper(z) => z.instance_count(service).await,
        }
    }

    /// After the connector reading `services` stopped: keeps or removes their data set,
    /// and gets the registry ready for the next connector. With Consul that means
    /// ending the stopped connector's abandoned long polls (the figures are returned);
    /// Eureka and Nacos keep nothing for a client that went away (Nacos drops the
    /// subscriptions of a closed connection).
    pub async fn connector_stopped(
        &self,
        services: &[Service],
        then: AfterStop,
        when: &str,
        concurrency: usize,
    ) -> Result<Option<ConnRelease>> {
        match self {
            Registry::Consul(c) => c
                .release(services, then == AfterStop::Remove, when, concurrency)
                .await
                .map(Some),
            Registry::Eureka(e) => {
                if then == AfterStop::Remove {
                    if let Some(s) = services.first() {
                        let n = e.remove_set(&s.set, concurrency).await?;
                        crate::say(format!("cancelled the {n} instances of {} {when}", s.set));
                    }
                }
                Ok(None)
            }
            Registry::Nacos(n) => {
                if then == AfterStop::Remove {
                    if let Some(s) = services.first() {
                        let n = n.remove_set(&s.set, concurrency).await?;
                        crate::say(format!(
                            "deregistered the {n} instances of {} {when}",
                            s.set
                        ));
                    }
                }
                Ok(None)
            }
            Registry::Zookeeper(z) => {
                if then == AfterStop::Remove {
                    if let Some(s) = services.first() {
                        let n = z.remove_set(&s.set, concurrency).await?;
                        crate::say(format!("deleted the {n} providers of {} {when}", s.set));
                    }
                }
                Ok(None)
            }
        }
    }

    /// Removes every data set this run registered and did not remove yet.
    pub async fn cleanup(&self, concurrency: usize) -> Result<()> {
        match self {
            Registry::Consul(c) => c.cleanup().await,
            Registry::Eureka(e) => e.cleanup(concurrency).await,
            Registry::Nacos(n) => n.cleanup(concurrency).await,
            Registry::Zookeeper(z) => z.cleanup(concurrency).await,
        }
    }

    /// Eureka only: instances in the server's current delta, which every poll downloads
    /// (a mass registration or cancel stays in it for about 3 minutes). A side figure:
    /// a failure to read it is reported and yields `None`.
    pub async fn delta_instances(&self) -> Option<usize> {
        match self {
            Registry::Consul(_) | Registry::Nacos(_) | Registry::Zookeeper(_) => None,
            Registry::Eureka(e) => match e.delta_instances().await {
                Ok(n) => Some(n),
                Err(err) => {
                    crate::say(format!("reading Eureka's delta failed: {err:#}"));
                    None
                }
            },
        }
    }
}

/// The data sets a client registered and has not removed yet, for the final cleanup.
#[derive(Debug, Default)]
pub struct DataSets(Mutex<Vec<String>>);

impl DataSets {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn add(&self, services: &[Service]) {
        let mut sets = self.lock();
        for s in services {
            if !sets.contains(&s.set) {
                sets.push(s.set.clone());
            }
        }
    }

    pub fn remove(&self, set: &str) {
        self.lock().retain(|s| s != set);
    }

    pub fn all(&self) -> Vec<String> {
        self.lock().clone()
    }
}
