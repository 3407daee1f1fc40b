//! The Kubernetes → registry direction: selected Kubernetes Services registered in the
//! registry, so that the VMs that stay behind reach what moved into the cluster.
//!
//! Data flows one way, as in the other direction:
//!
//! ```text
//! watch (Services, EndpointSlices, Nodes)          knows nothing of registries
//!   → select + desired (pure)                      which Services, which instances
//!   → plan (pure)                                  desired vs what we own in the registry
//!   → engine                                       coalescing, rate limit, retries, guard
//!   → RegistryWriter (registry/<name>/writer.rs)   the registry's own requests
//! ```
//!
//! Ownership lives in the registry entry itself (a tag or metadata naming this
//! connector): a writer reads back only what it owns, so an entry another tool wrote is
//! never modified or removed, whatever its name.

pub mod desired;
pub mod engine;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod rejections;
pub mod select;
pub mod watch;

pub use model::{Applied, Health, Instance, Registered, Rejected, ServiceKey, Write};

use std::future::Future;

use tokio_util::sync::CancellationToken;

/// What the engine needs of a registry in this direction. Implemented by each
/// registry's `writer.rs`; knows nothing of Kubernetes beyond the [`Instance`] shape.
pub trait RegistryWriter: Send + Sync + 'static {
    /// The `registry` label and log name (`consul`, `eureka`).
    const NAME: &'static str;
    /// Errors of one read or one write request; all are retried by the engine.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Registers the writer's own metrics (requests by endpoint, heartbeats).
    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry);

    /// Most operations one request carries (Consul's transaction limit; 1 where each
    /// write is its own request).
    fn max_ops_per_request(&self) -> usize;

    /// Operations `write` costs in a request (Consul: a critical instance is a service
    /// and a check operation).
    fn cost(&self, write: &Write) -> usize;

    /// Puts a desired instance in the form the registry stores and [`RegistryWriter::read`]
    /// returns (Eureka upper-cases application names), so that an unchanged instance
    /// compares equal. The default changes nothing.
    fn normalize(&self, _instance: &mut Instance) {}

    /// Reads every entry this connector owns, and the names it shares with others.
    fn read(&self) -> impl Future<Output = Result<Registered, Self::Error>> + Send;

    /// Applies `writes` in one request (the engine has cut them to
    /// [`RegistryWriter::max_ops_per_request`]). All or nothing where the registry
    /// allows it; on an error the engine reads the registry again before retrying.
    /// A registry that refuses single writes of a batch (Consul's rolled-back
    /// transaction names them) may instead apply the rest and return the refused ones
    /// in [`Applied::rejected`]: one bad instance must not keep the others out.
    fn apply(&self, writes: &[Write]) -> impl Future<Output = Result<Applied, Self::Error>> + Send;

    /// Resolves when the registry's copy of the owned entries may have changed behind
    /// the connector's back (a restarted registry, an operator's deregistration): the
    /// engine then reads it again. The default never resolves; the periodic resync still
    /// compares everything.
    fn changed(&self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }

    /// Keeps the owned entries alive while this process leads, for registries whose
    /// protocol needs writes at rest (Eureka's lease renewals); returns when `stop` is
    /// cancelled. The default needs nothing.
    fn maintain(&self, stop: CancellationToken) -> impl Future<Output = ()> + Send {
        async move { stop.cancelled().await }
    }
}
