//! Shared set-up for the sink's integration tests: a real apiserver from the test
//! environment, a fresh namespace, and the sink running in-process, fed by an in-process
//! test source that writes straight into the catalog.
#![allow(dead_code)]

pub mod eureka;
pub mod export;
pub mod nacos;
pub mod objects;
pub mod process;
pub mod tls;
pub mod zookeeper;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::{Api, Client};
use registry_connector::catalog::Catalog;
use registry_connector::model::{
    MicroEndpoint, MicroSvcAppProtocol, MicroSvcDomainName, MicroSvcMeta, MicroSvcName,
    MicroSvcPort,
};
use registry_connector::render::{RenderConfig, ServiceMode};
use registry_connector::sink::{Sink, SinkConfig, SinkHandle};
use testenv::{TestEnv, TestNamespace};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(30);

pub struct Harness {
    pub ns: TestNamespace,
    pub client: Client,
    pub catalog: Arc<Catalog>,
    pub sink: SinkHandle,
    pub connector_id: String,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

pub fn render_config(namespace: &str, connector_id: &str) -> RenderConfig {
    RenderConfig {
        namespace: namespace.to_string(),
        connector_id: connector_id.to_string(),
        service_mode: ServiceMode::Headless,
        legacy_endpoints: true,
        max_endpoints_per_slice: 100,
    }
}

/// Test timing: a short quiet period so tests run fast, everything else as shipped.
pub fn test_config(namespace: &str) -> SinkConfig {
    let mut cfg = SinkConfig::new(render_config(namespace, "test"));
    cfg.quiet_period = Duration::from_millis(100);
    cfg.max_period = Duration::from_millis(500);
    cfg
}

struct Running {
    catalog: Arc<Catalog>,
    handle: SinkHandle,
    connector_id: String,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    async fn spawn(client: Client, cfg: SinkConfig) -> Result<Self> {
        let connector_id = cfg.render.connector_id.clone();
        let (catalog, events) = Catalog::new();
        let catalog = Arc::new(catalog);
        let sink = Sink::new(client, cfg, catalog.clone(), events);
        let handle = sink.handle();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(sink.run(shutdown.clone()));
        tokio::time::timeout(WAIT, handle.wait_for(|s| s.caches_ready)).await?;
        Ok(Self {
            catalog,
            handle,
            connector_id,
            shutdown,
            task,
        })
    }
}

impl Harness {
    pub async fn start(prefix: &str) -> Result<Self> {
        Self::start_with(prefix, |_| {}).await
    }

    pub async fn start_with(prefix: &str, tweak: impl FnOnce(&mut SinkConfig)) -> Result<Self> {
        let env = TestEnv::shared();
        let ns = env.namespace(prefix).await?;
        let client = env.client().await?;
        let mut cfg = test_config(ns.name());
        tweak(&mut cfg);
        let running = Running::spawn(client.clone(), cfg).await?;
        Ok(Self {
            ns,
            client,
            catalog: running.catalog,
            sink: running.handle,
            connector_id: running.connector_id,
            shutdown: running.shutdown,
            task: Some(running.task),
        })
    }

    /// Stops the running sink (if any) and starts a new one with a new, empty catalog
    /// in the same namespace: what a restarted connector process sees.
    pub async fn restart_with(&mut self, tweak: impl FnOnce(&mut SinkConfig)) -> Result<()> {
        self.stop().await;
        let mut cfg = test_config(self.ns.name());
        tweak(&mut cfg);
        let running = Running::spawn(self.client.clone(), cfg).await?;
        self.catalog = running.catalog;
        self.sink = running.handle;
        self.connector_id = running.connector_id;
        self.shutdown = running.shutdown;
        self.task = Some(running.task);
        Ok(())
    }

    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    pub fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), self.ns.name())
    }

    pub fn slices(&self) -> Api<EndpointSlice> {
        Api::namespaced(self.client.clone(), self.ns.name())
    }

    pub fn endpoints(&self) -> Api<Endpoints> {
        Api::namespaced(self.client.clone(), self.ns.name())
    }

    pub async fn slices_of(&self, service: &str) -> Result<Vec<EndpointSlice>> {
        let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
        let mut items = self.slices().list(&lp).await?.items;
        items.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        Ok(items)
    }

    /// Waits until the service's slices hold exactly `count` endpoints in total.
    pub async fn wait_for_endpoint_count(
        &self,
        service: &str,
        count: usize,
    ) -> Result<Vec<EndpointSlice>> {
        testenv::wait_for(
            &format!("{service} to have {count} endpoints"),
            WAIT,
            || async move {
                let slices = self.slices_of(service).await.ok()?;
                (endpoint_count(&slices) == count).then_some(slices)
            },
        )
        .await
    }
}

pub fn endpoint_count(slices: &[EndpointSlice]) -> usize {
    slices.iter().map(|s| s.endpoints.len()).sum()
}

pub fn ep(addr: &str, ports: &[(u16, &str)], ready: bool) -> MicroEndpoint {
    MicroEndpoint {
        addr: addr.parse().expect("test address"),
        ports: ports
            .iter()
            .map(|(p, proto)| {
                (
                    MicroSvcPort::new(*p).expect("test port"),
                    MicroSvcAppProtocol::new(proto),
                )
            })
            .collect::<BTreeMap<_, _>>(),
        ready,
        zone: None,
    }
}

pub fn svc(name: &str, endpoints: Vec<MicroEndpoint>) -> MicroSvcMeta {
    MicroSvcMeta::new(
        MicroSvcName::new(name),
        MicroSvcDomainName::new(format!("{name}.service.consul")),
        endpoints,
    )
}

/// `n` ready instances on port 8080, addresses from 198.51.100.0/24 and 203.0.113.0/24.
pub fn many(n: usize) -> Vec<MicroEndpoint> {
    (0..n)
        .map(|i| {
            let addr = if i < 250 {
                format!("198.51.100.{}", i + 1)
            } else {
                format!("203.0.113.{}", i - 249)
            };
            ep(&addr, &[(8080, "http")], true)
        })
        .collect()
}

pub fn labels_of<K: kube::Resource>(obj: &K) -> BTreeMap<String, String> {
    obj.meta().labels.clone().unwrap_or_default()
}

pub fn annotations_of<K: kube::Resource>(obj: &K) -> BTreeMap<String, String> {
    obj.meta().annotations.clone().unwrap_or_default()
}
