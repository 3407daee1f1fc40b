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

/// One instance for [`JavaClient`]: registered by Nacos's own Java client over gRPC,
/// ephemeral, tied to that client's connection.
#[derive(Clone)]
pub struct JavaInstance<'a> {
    pub service: &'a str,
    pub group: &'a str,
    pub ip: &'a str,
    pub port: u16,
    pub cluster: &'a str,
    /// Metadata besides the scenario's marker.
    pub metadata: Vec<(&'a str, &'a str)>,
}

impl<'a> JavaInstance<'a> {
    pub fn new(service: &'a str, group: &'a str, ip: &'a str, port: u16) -> Self {
        Self {
            service,
            group,
            ip,
            port,
            cluster: "DEFAULT",
            metadata: Vec::new(),
        }
    }
}

/// The checkout these tests were built from (not `testenv::repo_root()`, which a
/// target directory shared between checkouts may have baked in from another one).
fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the crate lives two levels below the repository root")
        .to_path_buf()
}

/// An application registered through Nacos's official Java client
/// (`com.alibaba.nacos:nacos-client` 2.3.2, gRPC), as `scripts/lib/nacos-java-register
/// run` starts it: it registers its instances, says `ready N` and stays connected until
/// it is killed (or dropped, or this test process goes: it also exits when its standard
/// input closes). Its instances are ephemeral: Nacos removes them when the connection
/// goes.
pub struct JavaClient {
    child: Option<tokio::process::Child>,
    /// Held open: the process exits when it closes.
    _stdin: Option<tokio::process::ChildStdin>,
    pub log: std::path::PathBuf,
}

impl JavaClient {
    /// Builds the fixture once (`scripts/lib/nacos-java-register classpath`: Maven, into
    /// the testenv cache), starts it against the scenario's Nacos with `instances` (each
    /// with the scenario's marker) and waits until all are registered.
    pub async fn start(s: &NacosScenario, instances: &[JavaInstance<'_>]) -> Result<Self> {
        use std::process::Stdio;
        use tokio::io::{AsyncBufReadExt, BufReader};

        let script = repo_root().join("scripts/lib/nacos-java-register");
        // The build may download nacos-client and Maven's plugins on a fresh machine:
        // no timeout here, Maven's own apply.
        let build = tokio::process::Command::new("bash")
            .arg(&script)
            .arg("classpath")
            .stdin(Stdio::null())
            .output()
            .await
            .context("running scripts/lib/nacos-java-register classpath")?;
        if !build.status.success() {
            bail!(
                "scripts/lib/nacos-java-register classpath failed with {}:\n{}",
                build.status,
                String::from_utf8_lossy(&build.stderr)
            );
        }

        let id = unique_name("java");
        let home = s.env.dir().join("nacos-java").join(&id);
        std::fs::create_dir_all(&home)?;
        let log = s.env.dir().join("logs").join(format!("nacos-{id}.log"));
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg(&script)
            .args(["run", "--until-stdin-closes", &s.addr])
            .env("NACOS_REGISTER_HOME", &home);
        for i in instances {
            let mut metadata = vec![format!("{MARKER_KEY}={}", s.marker)];
            metadata.extend(i.metadata.iter().map(|(k, v)| format!("{k}={v}")));
            cmd.arg(format!(
                "{}|{}|{}|{}|{}|{}",
                i.group,
                i.service,
                i.ip,
                i.port,
                i.cluster,
                metadata.join(",")
            ));
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).context("Java client log file")?)
            .kill_on_drop(true)
            .spawn()
            .context("starting the Nacos Java client")?;
        let stdin = child.stdin.take();
        let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
        let want = format!("ready {}", instances.len());
        let ready = tokio::time::timeout(std::time::Duration::from_secs(90), async {
            while let Some(line) = lines.next_line().await? {
                if line == want {
                    return Ok(true);
                }
            }
            anyhow::Ok(false)
        })
        .await;
        let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
        match ready {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => bail!("the Java client exited before '{want}':\n{}", log_text()),
            Ok(Err(e)) => return Err(e.context(log_text())),
            Err(_) => bail!("no '{want}' from the Java client in 90 s:\n{}", log_text()),
        }
        // Nothing more is read: the rest of its output goes nowhere.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child: Some(child),
            _stdin: stdin,
            log,
        })
    }

    /// SIGKILL, as an application that crashes: no deregistration, the connection just
    /// goes.
    pub async fn kill(mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }
}
