//! An end-to-end scenario against the test environment's real Nacos 2.3.2 server: its
//! own Kubernetes namespace, its own Nacos group (so that tests sharing the server list
//! only their own services), a metadata marker the connectors filter on, and the real
//! binary. Instances are registered over Nacos's HTTP Open API at documentation
//! addresses (never contacted: ephemeral instances are not health-checked by Nacos).

use anyhow::{bail, Context, Result};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use testenv::{unique_name, TestEnv, TestNamespace};

use super::process::Connector;

/// The metadata key the scenarios filter on.
pub const MARKER_KEY: &str = "rc-test";

pub struct NacosScenario {
    pub env: &'static TestEnv,
    pub ns: TestNamespace,
    pub client: kube::Client,
    pub http: reqwest::Client,
    pub addr: String,
    pub marker: String,
    /// The scenario's own group.
    pub group: String,
}

/// One instance to register.
#[derive(Clone)]
pub struct Instance<'a> {
    pub service: &'a str,
    pub group: &'a str,
    pub ip: &'a str,
    pub port: u16,
    pub cluster: &'a str,
    pub weight: f64,
    pub enabled: bool,
    /// Metadata besides the marker and the lease settings.
    pub metadata: Vec<(&'a str, &'a str)>,
    /// Beats expected every 500 ms and missed for 1 s make it unhealthy (then kept for an
    /// hour): the way to turn an ephemeral instance unhealthy without a client.
    pub short_lease: bool,
}

impl<'a> Instance<'a> {
    pub fn new(service: &'a str, group: &'a str, ip: &'a str, port: u16) -> Self {
        Self {
            service,
            group,
            ip,
            port,
            cluster: "DEFAULT",
            weight: 1.0,
            enabled: true,
            metadata: Vec::new(),
            short_lease: false,
        }
    }
}

fn form(pairs: &[(&str, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", utf8_percent_encode(v, NON_ALPHANUMERIC)))
        .collect::<Vec<_>>()
        .join("&")
}

impl NacosScenario {
    pub async fn new(prefix: &str) -> Result<Self> {
        let env = TestEnv::shared();
        Ok(Self {
            env,
            ns: env.namespace(prefix).await?,
            client: env.client().await?,
            http: reqwest::Client::new(),
            addr: env.nacos_addr()?.to_string(),
            marker: unique_name("m"),
            group: unique_name("G"),
        })
    }

    pub fn ns(&self) -> &str {
        self.ns.name()
    }

    /// `registry-connector nacos` on this scenario's group(s), filtered on its marker,
    /// listing services every 2 s, with `extra` flags.
    pub fn connector_in(&self, namespace: &str, groups: &str, extra: &[&str]) -> Result<Connector> {
        let filter = format!("{MARKER_KEY}={}", self.marker);
        Connector::builder(self.env, namespace)
            .nacos()
            .args([
                "--nacos-groups",
                groups,
                "--filter-metadata",
                &filter,
                "--nacos-service-list-interval",
                "2s",
            ])
            .args(extra)
            .start()
    }

    fn metadata_json(&self, i: &Instance<'_>) -> String {
        let mut m = serde_json::Map::new();
        m.insert(MARKER_KEY.into(), self.marker.clone().into());
        if i.short_lease {
            m.insert("preserved.heart.beat.interval".into(), "500".into());
            m.insert("preserved.heart.beat.timeout".into(), "1000".into());
        } else {
            m.insert("preserved.heart.beat.timeout".into(), "3600000".into());
        }
        m.insert("preserved.ip.delete.timeout".into(), "3600000".into());
        for (k, v) in &i.metadata {
            m.insert(k.to_string(), v.to_string().into());
        }
        serde_json::Value::Object(m).to_string()
    }

    fn params(&self, i: &Instance<'_>) -> Vec<(&'static str, String)> {
        vec![
            ("serviceName", i.service.to_string()),
            ("groupName", i.group.to_string()),
            ("ip", i.ip.to_string()),
            ("port", i.port.to_string()),
            ("clusterName", i.cluster.to_string()),
            ("ephemeral", "true".to_string()),
            ("weight", i.weight.to_string()),
            ("enabled", i.enabled.to_string()),
            ("metadata", self.metadata_json(i)),
        ]
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        params: &[(&str, String)],
    ) -> Result<String> {
        let url = format!("http://{}/nacos/v1/ns/{path}?{}", self.addr, form(params));
        let resp = self
            .http
            .request(method.clone(), &url)
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("{method} {path} answered {status}: {text}");
        }
        Ok(text)
    }

    /// Registers (or, again, re-registers) one ephemeral instance.
    pub async fn register(&self, i: &Instance<'_>) -> Result<()> {
        self.call(reqwest::Method::POST, "instance", &self.params(i))
            .await
            .map(drop)
    }

    /// Changes an instance (weight, enabled, metadata).
    pub async fn update(&self, i: &Instance<'_>) -> Result<()> {
        self.call(reqwest::Method::PUT, "instance", &self.params(i))
            .await
            .map(drop)
    }

    /// One heartbeat: makes an unhealthy ephemeral instance healthy again.
    pub async fn beat(&self, i: &Instance<'_>) -> Result<()> {
        let beat = serde_json::json!({
            "serviceName": format!("{}@@{}", i.group, i.service), "ip": i.ip, "port": i.port,
            "cluster": i.cluster, "metadata": {}, "scheduled": false,
        });
        let params = [
            ("serviceName", i.service.to_string()),
            ("groupName", i.group.to_string()),
            ("ip", i.ip.to_string()),
            ("port", i.port.to_string()),
            ("clusterName", i.cluster.to_string()),
            ("beat", beat.to_string()),
        ];
        self.call(reqwest::Method::PUT, "instance/beat", &params)
            .await
            .map(drop)
    }

    pub async fn deregister(&self, i: &Instance<'_>) -> Result<()> {
        let params = [
            ("serviceName", i.service.to_string()),
            ("groupName", i.group.to_string()),
            ("ip", i.ip.to_string()),
            ("port", i.port.to_string()),
            ("clusterName", i.cluster.to_string()),
            ("ephemeral", "true".to_string()),
        ];
        self.call(reqwest::Method::DELETE, "instance", &params)
            .await
            .map(drop)
    }
}
