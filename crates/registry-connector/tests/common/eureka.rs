//! An end-to-end scenario against the test environment's real Eureka server: its own
//! namespace, its own filter marker (instance metadata `rc-test=<marker>`, so that tests
//! sharing the server do not see each other's applications), and the real binary.

use anyhow::Result;
use testenv::eureka::{instance_json, EurekaClient};
use testenv::{unique_name, TestEnv, TestNamespace};

use super::process::Connector;

/// The metadata key the scenarios filter on.
pub const MARKER_KEY: &str = "rc-test";

/// The poll interval the scenarios run the connector with.
pub const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

pub struct EurekaScenario {
    pub env: &'static TestEnv,
    pub ns: TestNamespace,
    pub eureka: EurekaClient,
    pub client: kube::Client,
    pub marker: String,
    /// The connectors' `--eureka-poll-interval`.
    pub poll_interval: std::time::Duration,
    registered: std::sync::Mutex<Vec<(String, String)>>,
}

/// One instance to register.
pub struct Instance<'a> {
    pub app: &'a str,
    pub id: &'a str,
    pub ip: &'a str,
    pub port: Option<u16>,
    pub secure_port: Option<u16>,
    pub status: &'a str,
    /// Metadata besides the scenario's marker.
    pub metadata: Vec<(&'a str, &'a str)>,
}

impl<'a> Instance<'a> {
    /// An `UP` instance with only its plain port enabled.
    pub fn up(app: &'a str, id: &'a str, ip: &'a str, port: u16) -> Self {
        Self {
            app,
            id,
            ip,
            port: Some(port),
            secure_port: None,
            status: "UP",
            metadata: Vec::new(),
        }
    }
}

impl EurekaScenario {
    pub async fn new(prefix: &str) -> Result<Self> {
        let env = TestEnv::shared();
        Ok(Self {
            env,
            ns: env.namespace(prefix).await?,
            eureka: EurekaClient::new(env.eureka_url()?)?,
            client: env.client().await?,
            marker: unique_name("m"),
            poll_interval: POLL_INTERVAL,
            registered: Default::default(),
        })
    }

    pub fn ns(&self) -> &str {
        self.ns.name()
    }

    /// `registry-connector eureka` filtered on this scenario's marker, polling every
    /// `poll_interval` ([`POLL_INTERVAL`] unless changed), with `extra` flags.
    pub fn connector(&self, extra: &[&str]) -> Result<Connector> {
        self.connector_in(self.ns(), extra)
    }

    /// As [`Self::connector`], writing to another namespace.
    pub fn connector_in(&self, namespace: &str, extra: &[&str]) -> Result<Connector> {
        let filter = format!("{MARKER_KEY}={}", self.marker);
        let interval = format!("{}ms", self.poll_interval.as_millis());
        Connector::builder(self.env, namespace)
            .eureka(None)
            .args([
                "--filter-metadata",
                &filter,
                "--eureka-poll-interval",
                &interval,
            ])
            .args(extra)
            .start()
    }

    /// Registers one instance carrying this scenario's marker (documentation addresses,
    /// never contacted; no health check exists in Eureka's model to contact them).
    pub async fn register(&self, i: Instance<'_>) -> Result<()> {
        let mut metadata = vec![(MARKER_KEY, self.marker.as_str())];
        metadata.extend(i.metadata.iter().copied());
        let body = instance_json(
            i.app,
            i.id,
            i.ip,
            i.port,
            i.secure_port,
            i.status,
            &metadata,
        );
        self.eureka.register(i.app, &body).await?;
        self.registered
            .lock()
            .expect("not poisoned")
            .push((i.app.to_string(), i.id.to_string()));
        Ok(())
    }

    pub async fn cancel(&self, app: &str, id: &str) -> Result<()> {
        self.eureka.cancel(app, id).await
    }

    pub async fn set_status(&self, app: &str, id: &str, status: &str) -> Result<()> {
        self.eureka.set_status(app, id, status).await
    }

    /// Cancels whatever this scenario registered and is still there.
    pub async fn cleanup(&self) {
        let registered = self.registered.lock().expect("not poisoned").clone();
        for (app, id) in &registered {
            let _ = self.eureka.cancel(app, id).await;
        }
    }
}
