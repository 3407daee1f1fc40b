//! An end-to-end scenario against the test environment's real ZooKeeper 3.9 server: its
//! own Kubernetes namespace, its own base path (`/rc-test-<id>/dubbo` or `.../services`,
//! so that tests sharing the server see only their own nodes), a ZooKeeper session of
//! its own, and the real binary. Nodes are written as Dubbo and Curator write them:
//! persistent directories, an ephemeral node per provider or instance (owned by the
//! scenario's session), at documentation addresses that nobody contacts.

use std::time::Duration;

use anyhow::{Context, Result};
use testenv::{unique_name, TestEnv, TestNamespace};
use zookeeper_client::{Acls, Client, CreateMode};

use super::process::Connector;

/// The scenario's own session lasts this long without the server: long enough to
/// survive a server restart (the server keeps sessions across one and clamps a timeout
/// to 40 s).
pub const SCENARIO_SESSION_TIMEOUT: Duration = Duration::from_secs(30);

pub struct ZkScenario {
    pub env: &'static TestEnv,
    pub ns: TestNamespace,
    pub client: kube::Client,
    pub zk: Client,
    pub addr: String,
    /// `/rc-test-<id>`: the root of this scenario's nodes.
    pub root: String,
}

/// A Dubbo provider as Dubbo 3's ZooKeeper registry writes it.
#[derive(Clone)]
pub struct Provider<'a> {
    pub protocol: &'a str,
    /// An IPv6 address goes in brackets, as Dubbo writes it.
    pub host: &'a str,
    pub port: u16,
    pub interface: &'a str,
    pub application: &'a str,
    pub version: &'a str,
    pub group: &'a str,
    /// Parameters besides Dubbo's usual ones.
    pub params: Vec<(&'a str, &'a str)>,
}

impl<'a> Provider<'a> {
    pub fn new(interface: &'a str, host: &'a str, port: u16) -> Self {
        Self {
            protocol: "dubbo",
            host,
            port,
            interface,
            application: "shop",
            version: "",
            group: "",
            params: Vec::new(),
        }
    }

    /// The provider's URL, its parameters sorted as Dubbo writes them.
    pub fn url(&self) -> String {
        let mut params: Vec<(String, String)> = vec![
            ("anyhost".into(), "true".into()),
            ("application".into(), self.application.into()),
            ("deprecated".into(), "false".into()),
            ("dubbo".into(), "2.0.2".into()),
            ("dynamic".into(), "true".into()),
            ("generic".into(), "false".into()),
            ("interface".into(), self.interface.into()),
            ("methods".into(), "get,list".into()),
            ("pid".into(), "4242".into()),
            ("release".into(), "3.2.11".into()),
            ("side".into(), "provider".into()),
            ("timestamp".into(), "1700000000000".into()),
        ];
        if !self.version.is_empty() {
            params.push(("version".into(), self.version.into()));
        }
        if !self.group.is_empty() {
            params.push(("group".into(), self.group.into()));
        }
        for (k, v) in &self.params {
            params.retain(|(key, _)| key != k);
            params.push((k.to_string(), v.to_string()));
        }
        params.sort();
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(
            "{}://{}:{}/{}?{}",
            self.protocol,
            self.host,
            self.port,
            self.interface,
            query.join("&")
        )
    }
}

/// `text` encoded as Java's `URLEncoder.encode(text, "UTF-8")` does, which is how Dubbo
/// names a provider's node.
pub fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'*' | b'_' | b'-' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A Curator `ServiceInstance` as Spring Cloud Zookeeper registers one (Jackson's
/// field order, `payload` a `ZookeeperInstance`).
pub fn spring_instance(
    name: &str,
    id: &str,
    address: &str,
    port: u16,
    ssl_port: Option<u16>,
    metadata: &[(&str, &str)],
) -> Vec<u8> {
    let metadata: serde_json::Map<String, serde_json::Value> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
    serde_json::json!({
        "name": name,
        "id": id,
        "address": address,
        "port": port,
        "sslPort": ssl_port,
        "payload": {
            "@class": "org.springframework.cloud.zookeeper.discovery.ZookeeperInstance",
            "id": format!("{name}-1"),
            "name": name,
            "metadata": metadata,
        },
        "registrationTimeUTC": 1_700_000_000_000u64,
        "serviceType": "DYNAMIC",
        "uriSpec": {"parts": [
            {"value": "scheme", "variable": true},
            {"value": "://", "variable": false},
            {"value": "address", "variable": true},
            {"value": ":", "variable": false},
            {"value": "port", "variable": true}
        ]}
    })
    .to_string()
    .into_bytes()
}

impl ZkScenario {
    pub async fn new(prefix: &str) -> Result<Self> {
        let env = TestEnv::shared();
        let addr = env.zookeeper_addr()?.to_string();
        let zk = Self::session(&addr).await?;
        Ok(Self {
            env,
            ns: env.namespace(prefix).await?,
            client: env.client().await?,
            zk,
            addr,
            root: format!("/{}", unique_name("rc-test")),
        })
    }

    /// A new ZooKeeper session of [`SCENARIO_SESSION_TIMEOUT`].
    pub async fn session(addr: &str) -> Result<Client> {
        Client::connector()
            .with_session_timeout(SCENARIO_SESSION_TIMEOUT)
            .connect(addr)
            .await
            .with_context(|| format!("connecting to ZooKeeper at {addr}"))
    }

    pub fn ns(&self) -> &str {
        self.ns.name()
    }

    /// The Dubbo base path of this scenario.
    pub fn dubbo_base(&self) -> String {
        format!("{}/dubbo", self.root)
    }

    /// The Curator base path of this scenario.
    pub fn curator_base(&self) -> String {
        format!("{}/services", self.root)
    }

    /// `registry-connector zookeeper` on this scenario's tree in `layout`, with `extra`
    /// flags, in `namespace`.
    pub fn connector_in(&self, namespace: &str, layout: &str, extra: &[&str]) -> Result<Connector> {
        let base = match layout {
            "curator" => self.curator_base(),
            _ => self.dubbo_base(),
        };
        Connector::builder(self.env, namespace)
            .zookeeper()
            .args(["--zookeeper-layout", layout, "--zookeeper-base-path", &base])
            .args(extra)
            .start()
    }

    /// Creates `path`'s parents as persistent nodes (as registries do), then `path`
    /// itself as an ephemeral node of `session` holding `data`.
    pub async fn create_ephemeral(&self, session: &Client, path: &str, data: &[u8]) -> Result<()> {
        let parent = path.rsplit_once('/').map(|(p, _)| p).unwrap_or("/");
        if !parent.is_empty() && parent != "/" {
            match session
                .mkdir(
                    parent,
                    &CreateMode::Persistent.with_acls(Acls::anyone_all()),
                )
                .await
            {
                Ok(()) | Err(zookeeper_client::Error::NodeExists) => {}
                Err(e) => return Err(e).with_context(|| format!("mkdir {parent}")),
            }
        }
        session
            .create(
                path,
                data,
                &CreateMode::Ephemeral.with_acls(Acls::anyone_all()),
            )
            .await
            .with_context(|| format!("create {path}"))?;
        Ok(())
    }

    /// The path of a Dubbo provider node.
    pub fn provider_path(&self, p: &Provider<'_>) -> String {
        format!(
            "{}/{}/providers/{}",
            self.dubbo_base(),
            url_encode(p.interface),
            url_encode(&p.url())
        )
    }

    /// Registers a Dubbo provider: an ephemeral node of the scenario's session, the URL
    /// in its name, and as data what Dubbo's Curator client leaves there (Curator's
    /// default, the local address), which the connector never reads.
    pub async fn register(&self, p: &Provider<'_>) -> Result<String> {
        let path = self.provider_path(p);
        self.create_ephemeral(&self.zk, &path, b"192.0.2.254")
            .await?;
        Ok(path)
    }

    /// A node below the Dubbo interface `interface`'s `category` directory, named `name`
    /// as it stands (a consumer, a configurator, a malformed provider).
    pub async fn register_raw(
        &self,
        interface: &str,
        category: &str,
        name: &str,
    ) -> Result<String> {
        let path = format!(
            "{}/{}/{category}/{name}",
            self.dubbo_base(),
            url_encode(interface)
        );
        self.create_ephemeral(&self.zk, &path, b"").await?;
        Ok(path)
    }

    /// Registers a Curator instance `name/id` holding `data`.
    pub async fn register_instance(&self, name: &str, id: &str, data: &[u8]) -> Result<String> {
        let path = format!("{}/{name}/{id}", self.curator_base());
        self.create_ephemeral(&self.zk, &path, data).await?;
        Ok(path)
    }

    pub async fn set_data(&self, path: &str, data: &[u8]) -> Result<()> {
        self.zk
            .set_data(path, data, None)
            .await
            .with_context(|| format!("set {path}"))?;
        Ok(())
    }

    pub async fn delete(&self, path: &str) -> Result<()> {
        self.zk
            .delete(path, None)
            .await
            .with_context(|| format!("delete {path}"))
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

/// Applications registered through the real client libraries, as
/// `scripts/lib/zookeeper-java-register run --until-stdin-closes` starts them: Dubbo 3
/// providers (`dubbo|APPLICATION|INTERFACE|VERSION|GROUP|HOST|PORT[|PROTOCOL[|K=V,...]]`)
/// and Curator instances shaped as Spring Cloud Zookeeper's
/// (`curator|NAME|ID|HOST|PORT[|K=V,...]`). It registers, says `ready N` and stays; when
/// its standard input closes ([`JavaApps::stop`], or this test process going) it shuts
/// down as an application does, closing its sessions: its ephemeral nodes go at once.
pub struct JavaApps {
    child: Option<tokio::process::Child>,
    stdin: Option<tokio::process::ChildStdin>,
    pub log: std::path::PathBuf,
}

impl JavaApps {
    /// Builds the fixture once (Maven, into the testenv cache), starts it against the
    /// scenario's ZooKeeper with `specs` and waits until all are registered.
    pub async fn start(s: &ZkScenario, specs: &[String]) -> Result<Self> {
        use anyhow::bail;
        use std::process::Stdio;
        use tokio::io::{AsyncBufReadExt, BufReader};

        let script = repo_root().join("scripts/lib/zookeeper-java-register");
        // A fresh machine may download Dubbo and Curator here: Maven's own timeouts apply.
        let build = tokio::process::Command::new("bash")
            .arg(&script)
            .arg("classpath")
            .stdin(Stdio::null())
            .output()
            .await
            .context("running scripts/lib/zookeeper-java-register classpath")?;
        if !build.status.success() {
            bail!(
                "scripts/lib/zookeeper-java-register classpath failed with {}:\n{}",
                build.status,
                String::from_utf8_lossy(&build.stderr)
            );
        }
        let id = unique_name("java");
        let home = s.env.dir().join("zookeeper-java").join(&id);
        std::fs::create_dir_all(&home)?;
        let log = s.env.dir().join("logs").join(format!("zookeeper-{id}.log"));
        let mut child = tokio::process::Command::new("bash")
            .arg(&script)
            .args(["run", "--until-stdin-closes", &s.addr])
            .args(specs)
            .env("ZOOKEEPER_REGISTER_HOME", &home)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).context("Java fixture log file")?)
            .kill_on_drop(true)
            .spawn()
            .context("starting the ZooKeeper Java fixture")?;
        let stdin = child.stdin.take();
        let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
        let want = format!("ready {}", specs.len());
        let ready = tokio::time::timeout(Duration::from_secs(120), async {
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
            Ok(Ok(false)) => bail!("the Java fixture exited before '{want}':\n{}", log_text()),
            Ok(Err(e)) => return Err(e.context(log_text())),
            Err(_) => bail!(
                "no '{want}' from the Java fixture in 120 s:\n{}",
                log_text()
            ),
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child: Some(child),
            stdin,
            log,
        })
    }

    /// Closes its standard input: it shuts down as an application does (Dubbo's
    /// shutdown hook unregisters, the sessions close), and waits for it to exit.
    pub async fn stop(mut self) -> Result<()> {
        drop(self.stdin.take());
        if let Some(mut child) = self.child.take() {
            tokio::time::timeout(Duration::from_secs(30), child.wait())
                .await
                .context("the Java fixture did not exit within 30 s")??;
        }
        Ok(())
    }
}
