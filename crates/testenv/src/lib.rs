//! Test support: a real local control plane (etcd, kube-apiserver, kube-controller-manager),
//! a real Consul agent, a real Eureka server, a real ZooKeeper and a real Nacos server (the
//! last two when the environment was started with them, as [`TestEnv::shared`] and
//! `scripts/test` do), started by `scripts/testenv` and shared by all tests of one test
//! binary.
//!
//! `TestEnv::shared()` attaches to an environment that is already up when `TESTENV_DIR`
//! names one (CI starts one for the whole suite), otherwise it starts its own with
//! `scripts/testenv up --watch-pid <this process>`, so the environment is torn down when
//! the test binary exits, even after a panic or an abort. This crate never imitates a
//! component: every client it hands out talks to the real processes.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

/// One running test environment, described by the files `scripts/testenv up` wrote.
#[derive(Debug, Clone)]
pub struct TestEnv {
    dir: PathBuf,
    kubeconfig: PathBuf,
    user_kubeconfig: PathBuf,
    consul_addr: Option<String>,
    consul_https_addr: Option<String>,
    eureka_url: Option<String>,
    eureka_jar: Option<PathBuf>,
    zookeeper_addr: Option<String>,
    nacos_addr: Option<String>,
}

static SHARED: OnceLock<std::result::Result<TestEnv, String>> = OnceLock::new();

impl TestEnv {
    /// The environment shared by every test in this binary (started on first use).
    ///
    /// Panics with the start-up error: a test cannot run without its environment.
    pub fn shared() -> &'static TestEnv {
        let env = SHARED.get_or_init(|| Self::attach_or_start().map_err(|e| format!("{e:#}")));
        match env {
            Ok(env) => env,
            Err(e) => panic!("test environment unavailable: {e}"),
        }
    }

    fn attach_or_start() -> Result<TestEnv> {
        if let Ok(dir) = std::env::var("TESTENV_DIR") {
            if !dir.is_empty() {
                return Self::from_dir(Path::new(&dir));
            }
        }
        let pid = std::process::id().to_string();
        let out = Command::new("bash")
            .arg(script_path())
            .args([
                "up",
                "--with",
                "consul",
                "--with",
                "eureka",
                "--with",
                "zookeeper",
                "--with",
                "nacos",
                "--watch-pid",
                &pid,
            ])
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("running scripts/testenv up")?;
        if !out.status.success() {
            bail!("scripts/testenv up failed with {}", out.status);
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let dir = parse_exports(&stdout)
            .into_iter()
            .find(|(k, _)| k == "TESTENV_DIR")
            .map(|(_, v)| v)
            .context("scripts/testenv up printed no TESTENV_DIR")?;
        Self::from_dir(Path::new(&dir))
    }

    /// Reads the `env` file that `scripts/testenv up` leaves in its directory.
    pub fn from_dir(dir: &Path) -> Result<TestEnv> {
        let env_file = dir.join("env");
        let text = std::fs::read_to_string(&env_file)
            .with_context(|| format!("reading {}", env_file.display()))?;
        let vars = parse_exports(&text);
        let get = |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        Ok(TestEnv {
            dir: dir.to_path_buf(),
            kubeconfig: get("KUBECONFIG")
                .context("env file lacks KUBECONFIG")?
                .into(),
            user_kubeconfig: get("TESTENV_USER_KUBECONFIG")
                .context("env file lacks TESTENV_USER_KUBECONFIG")?
                .into(),
            consul_addr: get("CONSUL_HTTP_ADDR"),
            consul_https_addr: get("CONSUL_HTTPS_ADDR"),
            eureka_url: get("EUREKA_URL"),
            eureka_jar: get("TESTENV_EUREKA_JAR").map(PathBuf::from),
            zookeeper_addr: get("ZOOKEEPER_ADDR"),
            nacos_addr: get("NACOS_ADDR"),
        })
    }

    /// The directory holding kubeconfigs, logs and pid files of this environment.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the admin kubeconfig (bearer token of a `system:masters` identity).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A client with the admin identity. Made anew per call: a kube `Client` is bound to
    /// the tokio runtime that created it, and every `#[tokio::test]` has its own.
    pub async fn client(&self) -> Result<Client> {
        client_from(&self.kubeconfig).await
    }

    /// A client with the unprivileged identity `tester`, for RBAC checks.
    pub async fn user_client(&self) -> Result<Client> {
        client_from(&self.user_kubeconfig).await
    }

    /// `host:port` of the Consul agent's HTTP API.
    pub fn consul_addr(&self) -> Result<&str> {
        self.consul_addr
            .as_deref()
            .context("this test environment was started without consul")
    }

    /// `host:port` of the same agent's HTTPS API: the environment's serving certificate,
    /// and a client certificate from its CA required ([`TestEnv::pki`]).
    pub fn consul_https_addr(&self) -> Result<&str> {
        self.consul_https_addr
            .as_deref()
            .context("this test environment was started without consul (or before HTTPS)")
    }

    /// Base URL of the Eureka server's REST API, `http://127.0.0.1:PORT/eureka` (no
    /// trailing slash). Its registry is in memory: after `stop_component("eureka")` and
    /// `start_component("eureka")` it is empty.
    pub fn eureka_url(&self) -> Result<&str> {
        self.eureka_url
            .as_deref()
            .context("this test environment was started without eureka")
    }

    /// The Eureka server jar, for tests that start a private, differently configured
    /// server ([`eureka::EurekaProcess`]).
    pub fn eureka_jar(&self) -> Result<&Path> {
        self.eureka_jar
            .as_deref()
            .context("this test environment was started without eureka")
    }

    /// `127.0.0.1:PORT` of the ZooKeeper server's client port (`up --with zookeeper`, which
    /// [`TestEnv::shared`] passes when it starts its own environment). Standalone, its data on disk: znodes survive
    /// `stop_component("zookeeper")` and `start_component("zookeeper")`.
    pub fn zookeeper_addr(&self) -> Result<&str> {
        self.zookeeper_addr
            .as_deref()
            .context("this test environment was started without zookeeper")
    }

    /// `127.0.0.1:PORT` of the Nacos server's HTTP API (`up --with nacos`, which
    /// [`TestEnv::shared`] passes when it starts its own environment): the Open API is under `http://ADDR/nacos/v1/...`, and Nacos's
    /// clients speak gRPC to PORT + 1000. Ephemeral instances live in memory: after
    /// `stop_component("nacos")` and `start_component("nacos")` they are gone, while
    /// persistent instances, configuration and namespaces remain.
    pub fn nacos_addr(&self) -> Result<&str> {
        self.nacos_addr
            .as_deref()
            .context("this test environment was started without nacos")
    }

    /// The Consul binary the environment's agent runs (the program of its recorded
    /// command line, `DIR/cmd/consul.sh`), else the newest Consul 1.8 in the cache: tests
    /// that need a differently configured agent start a private one from the same binary
    /// ([`consul::ConsulProcess`]).
    pub fn consul_bin(&self) -> Result<PathBuf> {
        let recorded = self.dir.join("cmd").join("consul.sh");
        if let Ok(script) = std::fs::read_to_string(&recorded) {
            if let Some(program) = exec_program(&script).map(PathBuf::from) {
                if program.is_file() {
                    return Ok(program);
                }
            }
        }
        cached_consul().with_context(|| {
            format!(
                "no consul binary: {} names none and the cache holds none (scripts/testenv install consul)",
                recorded.display()
            )
        })
    }

    /// The environment's certificates: its CA, the 127.0.0.1 serving certificate the
    /// apiserver uses, and a client certificate, all PEM.
    pub fn pki(&self) -> Pki {
        Pki::in_dir(&self.dir.join("pki"))
    }

    /// Creates a namespace with a unique name derived from `prefix`; it is deleted when
    /// the returned guard drops.
    pub async fn namespace(&self, prefix: &str) -> Result<TestNamespace> {
        let client = self.client().await?;
        let name = unique_name(prefix);
        let ns = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client)
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(TestNamespace {
            name,
            kubeconfig: self.kubeconfig.clone(),
        })
    }

    /// Stops one component (`kube-apiserver`, `consul`, `eureka`, `zookeeper`, `nacos`, ...)
    /// through `scripts/testenv stop`.
    pub fn stop_component(&self, name: &str) -> Result<()> {
        self.run_script(&["stop", &self.dir.to_string_lossy(), name])
    }

    /// Starts a stopped component again with its original command line and waits until
    /// it is ready.
    pub fn start_component(&self, name: &str) -> Result<()> {
        self.run_script(&["start", &self.dir.to_string_lossy(), name])
    }

    fn run_script(&self, args: &[&str]) -> Result<()> {
        let status = Command::new("bash")
            .arg(script_path())
            .args(args)
            .status()
            .with_context(|| format!("running scripts/testenv {}", args.join(" ")))?;
        if !status.success() {
            bail!("scripts/testenv {} failed with {status}", args.join(" "));
        }
        Ok(())
    }
}

/// A namespace owned by one test; deleted (without waiting) when dropped.
#[derive(Debug)]
pub struct TestNamespace {
    name: String,
    kubeconfig: PathBuf,
}

impl TestNamespace {
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Drop cannot await, and the test's runtime may be shutting down: delete from a
        // short-lived runtime on its own thread. Best effort: the environment's teardown
        // removes everything anyway.
        let name = self.name.clone();
        let kubeconfig = self.kubeconfig.clone();
        let deleter = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(client) = client_from(&kubeconfig).await {
                    let _ = Api::<Namespace>::all(client)
                        .delete(&name, &DeleteParams::background())
                        .await;
                }
            });
        });
        let _ = deleter.join();
    }
}

/// Builds a client from a kubeconfig file.
pub async fn client_from(path: &Path) -> Result<Client> {
    let kubeconfig =
        Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("building client config")?;
    Client::try_from(config).context("building client")
}

/// A name unique across tests and runs: `prefix-<random>`, a valid DNS label.
pub fn unique_name(prefix: &str) -> String {
    use rand::Rng;
    let suffix: u32 = rand::rng().random();
    format!("{prefix}-{suffix:08x}")
}

/// Polls `check` until it returns `Some` or `timeout` passes. Deadlines, not sleeps: a
/// test waits exactly as long as the condition needs.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Path of `scripts/testenv` in this repository.
pub fn script_path() -> PathBuf {
    repo_root().join("scripts").join("testenv")
}

/// The repository root: the nearest ancestor of the working directory (cargo runs tests
/// in their package's directory) that holds `scripts/testenv`, else the one this crate
/// was compiled in. Looked up at run time, so a test binary built from another checkout
/// that shares the target directory still drives this checkout's scripts.
pub fn repo_root() -> PathBuf {
    let holds_script = |dir: &Path| dir.join("scripts").join("testenv").is_file();
    if let Ok(cwd) = std::env::current_dir() {
        if let Some(root) = cwd.ancestors().find(|d| holds_script(d)) {
            return root.to_path_buf();
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The program a `cmd/NAME.sh` script written by `scripts/testenv` runs: the first word
/// after its `exec` (bare, or single-quoted as `shquote` writes it).
fn exec_program(script: &str) -> Option<String> {
    let (_, after) = script.split_once("\nexec")?;
    shell_word(after.trim_start_matches(|c: char| c.is_whitespace() || c == '\\'))
}

/// The first shell word of `text`: unquoted characters, backslash escapes and
/// single-quoted runs, up to the first unquoted white space.
fn shell_word(text: &str) -> Option<String> {
    let mut word = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => break,
            '\'' => loop {
                match chars.next()? {
                    '\'' => break,
                    c => word.push(c),
                }
            },
            '\\' => word.push(chars.next()?),
            c => word.push(c),
        }
    }
    (!word.is_empty()).then_some(word)
}

/// `scripts/testenv`'s cache: `${XDG_CACHE_HOME:-$HOME/.cache}/registry-connector`.
fn cache_root() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache"),
    };
    Some(base.join("registry-connector"))
}

/// The newest `consul-1.8.*/usr/bin/consul` in the cache (what `scripts/testenv up` runs).
fn cached_consul() -> Option<PathBuf> {
    std::fs::read_dir(cache_root()?)
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("consul-1.8.")
        })
        .map(|entry| entry.path().join("usr").join("bin").join("consul"))
        .filter(|bin| bin.is_file())
        .max_by_key(|bin| version_key(&bin.to_string_lossy()))
}

/// Sort key comparing the digit runs of a version string as numbers (`1.8.10` after `1.8.7`).
fn version_key(text: &str) -> Vec<u64> {
    text.split(|c: char| !c.is_ascii_digit())
        .filter(|run| !run.is_empty())
        .map(|run| run.parse().unwrap_or(u64::MAX))
        .collect()
}

/// Parses `export NAME=value` lines (values optionally single or double quoted).
pub fn parse_exports(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("export "))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .or_else(|| v.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
                .unwrap_or(v);
            (k.trim().to_string(), v.to_string())
        })
        .collect()
}

/// A small Consul HTTP client for tests: registers and deregisters catalog entries
/// and checks on the real agent; and private agents for tests that need one configured
/// unlike the shared agent ([`consul::ConsulProcess`]).
pub mod consul {
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use anyhow::{bail, Context, Result};
    use serde_json::Value;

    use crate::Pki;

    #[derive(Debug, Clone)]
    pub struct ConsulClient {
        base: String,
        http: reqwest::Client,
    }

    impl ConsulClient {
        pub fn new(addr: &str) -> Result<Self> {
            let http = reqwest::Client::builder().build().context("http client")?;
            Ok(Self::with_http(addr, http))
        }

        /// Over a given HTTP client: e.g. one that keeps few idle connections, for an
        /// agent whose per-client connection limit the test measures against.
        pub fn with_http(addr: &str, http: reqwest::Client) -> Self {
            let base = if addr.starts_with("http://") || addr.starts_with("https://") {
                addr.trim_end_matches('/').to_string()
            } else {
                format!("http://{}", addr.trim_end_matches('/'))
            };
            Self { base, http }
        }

        /// PUT a JSON body to an API path such as `/v1/agent/service/register`.
        pub async fn put(&self, path: &str, body: &Value) -> Result<()> {
            let resp = self
                .http
                .put(format!("{}{}", self.base, path))
                .json(body)
                .send()
                .await
                .with_context(|| format!("PUT {path}"))?;
            if !resp.status().is_success() {
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                bail!("PUT {path}: {status}: {text}");
            }
            Ok(())
        }

        /// GET an API path; returns the JSON body and the `X-Consul-Index` header.
        pub async fn get(&self, path_and_query: &str) -> Result<(Value, u64)> {
            let resp = self
                .http
                .get(format!("{}{}", self.base, path_and_query))
                .send()
                .await
                .with_context(|| format!("GET {path_and_query}"))?;
            let status = resp.status();
            let index = resp
                .headers()
                .get("X-Consul-Index")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if !status.is_success() {
                bail!("GET {path_and_query}: {status}");
            }
            let body = resp.json().await.context("decoding consul response")?;
            Ok((body, index))
        }
    }

    /// Consul's own default of `limits.http_max_conns_per_client`: how many connections
    /// one client IP may hold open to an agent's HTTP and HTTPS APIs.
    pub const DEFAULT_MAX_CONNS_PER_CLIENT: u32 = 200;

    /// How long a private agent may take to elect itself (it needs well under a second).
    const START_TIMEOUT: Duration = Duration::from_secs(30);

    /// Start attempts: ports are picked by binding and releasing them, so a parallel test
    /// can take one before the agent binds it; the agent then exits and is started again
    /// on other ports.
    const START_ATTEMPTS: usize = 3;

    /// A private single-node Consul agent for one test, from the environment's binary
    /// ([`crate::TestEnv::consul_bin`]), configured like the shared agent (plain HTTP, and
    /// HTTPS with the environment's serving certificate and client certificates required)
    /// but with Consul's **default** per-client connection limit, unless told otherwise.
    /// The shared agent allows 12000 connections per client because every test reaches it
    /// from 127.0.0.1; that hides what a real agent refuses, so tests of the connection
    /// budget run against one of these.
    ///
    /// `-dev`: the state lives in memory (nothing on disk but the log), the agent is ready
    /// in well under a second, and a test's registrations vanish with it. gRPC, DNS and
    /// serf WAN are off, Connect too (it would generate a CA for nothing). Killed when
    /// dropped.
    pub struct ConsulProcess {
        child: Child,
        http_port: u16,
        https_port: u16,
        max_conns_per_client: u32,
        log: PathBuf,
    }

    /// The agent's free loopback ports.
    #[derive(Debug, Clone, Copy)]
    struct Ports {
        http: u16,
        https: u16,
        serf_lan: u16,
        server: u16,
    }

    impl Ports {
        /// Four distinct free ports: all bound at once, then released.
        fn pick() -> Result<Self> {
            let listeners = (0..4)
                .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
                .collect::<std::io::Result<Vec<_>>>()
                .context("free loopback ports")?;
            let port = |i: usize| -> Result<u16> {
                Ok(listeners[i].local_addr().context("a bound port")?.port())
            };
            Ok(Self {
                http: port(0)?,
                https: port(1)?,
                serf_lan: port(2)?,
                server: port(3)?,
            })
        }
    }

    impl ConsulProcess {
        /// Starts an agent with Consul's default limit of
        /// [`DEFAULT_MAX_CONNS_PER_CLIENT`] connections per client IP; its log goes to
        /// `log_dir`. Returns once `/v1/status/leader` names a leader.
        pub async fn start(binary: &Path, log_dir: &Path, pki: &Pki) -> Result<Self> {
            Self::start_with_limit(binary, log_dir, pki, DEFAULT_MAX_CONNS_PER_CLIENT).await
        }

        /// As [`ConsulProcess::start`] with another `limits.http_max_conns_per_client`.
        pub async fn start_with_limit(
            binary: &Path,
            log_dir: &Path,
            pki: &Pki,
            max_conns_per_client: u32,
        ) -> Result<Self> {
            let mut failures = Vec::new();
            for _ in 0..START_ATTEMPTS {
                let ports = Ports::pick()?;
                let mut agent = Self::spawn(binary, log_dir, pki, ports, max_conns_per_client)?;
                match agent.wait_for_leader().await {
                    Ok(()) => return Ok(agent),
                    Err(e) => failures.push(format!("{e:#}")),
                }
            }
            bail!(
                "no private consul agent after {START_ATTEMPTS} attempts: {}",
                failures.join("; ")
            )
        }

        fn spawn(
            binary: &Path,
            log_dir: &Path,
            pki: &Pki,
            ports: Ports,
            max_conns_per_client: u32,
        ) -> Result<Self> {
            let log = log_dir.join(format!("consul-private-{}.log", ports.http));
            let out = std::fs::File::create(&log)
                .with_context(|| format!("creating {}", log.display()))?;
            let child = Command::new(binary)
                .args(agent_args(pki, ports, max_conns_per_client))
                .stdin(Stdio::null())
                .stdout(out.try_clone().context("consul log file")?)
                .stderr(out)
                .spawn()
                .with_context(|| format!("starting {}", binary.display()))?;
            Ok(Self {
                child,
                http_port: ports.http,
                https_port: ports.https,
                max_conns_per_client,
                log,
            })
        }

        /// Polls `/v1/status/leader` until it names a leader and the HTTPS port accepts
        /// connections; fails early when the agent exits (a port taken meanwhile).
        async fn wait_for_leader(&mut self) -> Result<()> {
            let probe = reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .context("http client")?;
            let url = format!("http://{}/v1/status/leader", self.http_addr());
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if let Some(status) = self.child.try_wait()? {
                    bail!("consul exited with {status}; log: {}", self.log.display());
                }
                if self.has_leader(&probe, &url).await
                    && tokio::net::TcpStream::connect(self.https_addr())
                        .await
                        .is_ok()
                {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!(
                        "consul has no leader after {START_TIMEOUT:?}; log: {}",
                        self.log.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        /// `/v1/status/leader` answers a quoted address, `""` while there is none.
        async fn has_leader(&self, probe: &reqwest::Client, url: &str) -> bool {
            let Ok(resp) = probe.get(url).send().await else {
                return false;
            };
            if !resp.status().is_success() {
                return false;
            }
            let leader = resp.text().await.unwrap_or_default();
            !leader.trim().trim_matches('"').is_empty()
        }

        /// `127.0.0.1:PORT` of the plain HTTP API.
        pub fn http_addr(&self) -> String {
            format!("127.0.0.1:{}", self.http_port)
        }

        /// `127.0.0.1:PORT` of the HTTPS API (the environment's serving certificate; a
        /// client certificate from its CA required).
        pub fn https_addr(&self) -> String {
            format!("127.0.0.1:{}", self.https_port)
        }

        pub fn http_port(&self) -> u16 {
            self.http_port
        }

        pub fn https_port(&self) -> u16 {
            self.https_port
        }

        /// The agent's `limits.http_max_conns_per_client`.
        pub fn max_conns_per_client(&self) -> u32 {
            self.max_conns_per_client
        }

        /// The agent's log file (kept after the agent is gone).
        pub fn log(&self) -> &Path {
            &self.log
        }

        /// The agent's process id.
        pub fn pid(&self) -> u32 {
            self.child.id()
        }
    }

    impl Drop for ConsulProcess {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// The command line of a private agent: the shared agent's TLS settings
    /// (`scripts/testenv up`), its own ports, and the given connection limit.
    fn agent_args(pki: &Pki, ports: Ports, max_conns_per_client: u32) -> Vec<String> {
        let file = |key: &str, path: &Path| format!("{key} = \"{}\"", path.display());
        let Ports {
            http,
            https,
            serf_lan,
            server,
        } = ports;
        [
            "agent",
            "-dev",
            "-ui=false",
            "-bind=127.0.0.1",
            "-client=127.0.0.1",
            "-advertise=127.0.0.1",
            "-log-level=info",
        ]
        .into_iter()
        .map(String::from)
        .chain([
            format!("-node=private-{http}"),
            format!(
                "-hcl=ports {{ http = {http}, https = {https}, dns = -1, grpc = -1, \
                 serf_lan = {serf_lan}, serf_wan = -1, server = {server} }}"
            ),
            format!("-hcl=limits {{ http_max_conns_per_client = {max_conns_per_client} }}"),
            "-hcl=connect { enabled = false }".to_string(),
            format!("-hcl={}", file("ca_file", &pki.ca_cert)),
            format!("-hcl={}", file("cert_file", &pki.serving_cert)),
            format!("-hcl={}", file("key_file", &pki.serving_key)),
            "-hcl=verify_incoming_https = true".to_string(),
        ])
        .collect()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_private_agent_gets_its_ports_tls_and_connection_limit() {
            let pki = Pki::in_dir(Path::new("/env/pki"));
            let ports = Ports {
                http: 8500,
                https: 8501,
                serf_lan: 8301,
                server: 8300,
            };
            let args = agent_args(&pki, ports, 200);
            for want in [
                "-dev",
                "-hcl=limits { http_max_conns_per_client = 200 }",
                "-hcl=ca_file = \"/env/pki/ca.crt\"",
                "-hcl=verify_incoming_https = true",
            ] {
                assert!(args.iter().any(|a| a == want), "{want} not in {args:?}");
            }
            let ports = args
                .iter()
                .find(|a| a.starts_with("-hcl=ports"))
                .expect("a ports block");
            for part in [
                "http = 8500,",
                "https = 8501,",
                "grpc = -1",
                "dns = -1",
                "serf_wan = -1",
            ] {
                assert!(ports.contains(part), "{ports}");
            }
        }
    }
}

/// PEM files of a test environment's PKI (written by `scripts/testenv up`).
#[derive(Debug, Clone)]
pub struct Pki {
    /// The CA that signed the others.
    pub ca_cert: PathBuf,
    /// A server certificate for `127.0.0.1` and `localhost`.
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    /// A client certificate (CN `registry-connector`, client auth only).
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    fn in_dir(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join("ca.crt"),
            serving_cert: dir.join("serving.crt"),
            serving_key: dir.join("serving.key"),
            client_cert: dir.join("client.crt"),
            client_key: dir.join("client.key"),
        }
    }

    /// An HTTP client trusting only this CA and presenting the client certificate.
    pub fn https_client(&self) -> Result<reqwest::Client> {
        let ca = std::fs::read(&self.ca_cert)
            .with_context(|| format!("reading {}", self.ca_cert.display()))?;
        let mut identity = std::fs::read(&self.client_cert)
            .with_context(|| format!("reading {}", self.client_cert.display()))?;
        identity.push(b'\n');
        identity.extend(
            std::fs::read(&self.client_key)
                .with_context(|| format!("reading {}", self.client_key.display()))?,
        );
        reqwest::Client::builder()
            .tls_certs_only(reqwest::Certificate::from_pem_bundle(&ca).context("CA")?)
            .identity(reqwest::Identity::from_pem(&identity).context("client identity")?)
            .build()
            .context("https client")
    }
}

/// A small Eureka REST client for tests: registers, updates and cancels instances on the
/// real server and reads its registry.
pub mod eureka {
    use anyhow::{bail, Context, Result};
    use reqwest::StatusCode;
    use serde_json::{json, Map, Value};

    #[derive(Debug, Clone)]
    pub struct EurekaClient {
        base: String,
        http: reqwest::Client,
        auth: Option<(String, String)>,
    }

    impl EurekaClient {
        /// `url` is the server's API base, e.g. `http://127.0.0.1:PORT/eureka`.
        pub fn new(url: &str) -> Result<Self> {
            Self::with_basic_auth(url, None)
        }

        /// As [`EurekaClient::new`], sending `(user, password)` with every request.
        pub fn with_basic_auth(url: &str, credentials: Option<(&str, &str)>) -> Result<Self> {
            let http = reqwest::Client::builder().build().context("http client")?;
            Ok(Self::with_http(url, http, credentials))
        }

        /// Over a given HTTP client (e.g. [`crate::Pki::https_client`] for a server that
        /// wants TLS client certificates).
        pub fn with_http(
            url: &str,
            http: reqwest::Client,
            credentials: Option<(&str, &str)>,
        ) -> Self {
            Self {
                base: url.trim_end_matches('/').to_string(),
                http,
                auth: credentials.map(|(u, p)| (u.to_string(), p.to_string())),
            }
        }

        /// A request to `{base}{path}`, with the credentials if any.
        fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
            let request = self.http.request(method, format!("{}{path}", self.base));
            match &self.auth {
                Some((user, password)) => request.basic_auth(user, Some(password)),
                None => request,
            }
        }

        /// `POST /apps/{APP}` with `{"instance": instance}`; Eureka answers 204.
        pub async fn register(&self, app: &str, instance: &Value) -> Result<()> {
            let what = format!("POST /apps/{}", app.to_uppercase());
            let resp = self
                .request(
                    reqwest::Method::POST,
                    &format!("/apps/{}", app.to_uppercase()),
                )
                .json(&json!({ "instance": instance }))
                .send()
                .await
                .with_context(|| what.clone())?;
            expect(resp, StatusCode::NO_CONTENT, &what).await
        }

        /// `PUT /apps/{APP}/{id}/status?value=STATUS` (an override such as
        /// `OUT_OF_SERVICE`); Eureka answers 200.
        pub async fn set_status(&self, app: &str, instance_id: &str, status: &str) -> Result<()> {
            let what = format!(
                "PUT /apps/{}/{instance_id}/status?value={status}",
                app.to_uppercase()
            );
            let resp = self
                .request(
                    reqwest::Method::PUT,
                    &format!(
                        "/apps/{}/{instance_id}/status?value={status}",
                        app.to_uppercase()
                    ),
                )
                .send()
                .await
                .with_context(|| what.clone())?;
            expect(resp, StatusCode::OK, &what).await
        }

        /// `DELETE /apps/{APP}/{id}`; Eureka answers 200.
        pub async fn cancel(&self, app: &str, instance_id: &str) -> Result<()> {
            let what = format!("DELETE /apps/{}/{instance_id}", app.to_uppercase());
            let resp = self
                .request(
                    reqwest::Method::DELETE,
                    &format!("/apps/{}/{instance_id}", app.to_uppercase()),
                )
                .send()
                .await
                .with_context(|| what.clone())?;
            expect(resp, StatusCode::OK, &what).await
        }

        /// `GET /apps` as JSON: `{"applications": {"apps__hashcode": ..., "application": [...]}}`.
        pub async fn apps(&self) -> Result<Value> {
            let resp = self
                .request(reqwest::Method::GET, "/apps")
                .header(reqwest::header::ACCEPT, "application/json")
                .send()
                .await
                .context("GET /apps")?;
            let status = resp.status();
            if !status.is_success() {
                let text = resp.text().await.unwrap_or_default();
                bail!("GET /apps: {status}: {text}");
            }
            resp.json().await.context("decoding eureka /apps response")
        }
    }

    /// A private Eureka server started from the environment's jar with extra Spring
    /// properties (e.g. `--testenv.auth.enabled=true`), on a free loopback port; killed
    /// when dropped. For tests that need a server configured unlike the shared one.
    pub struct EurekaProcess {
        child: std::process::Child,
        pub port: u16,
        pub log: std::path::PathBuf,
        scheme: &'static str,
    }

    impl EurekaProcess {
        /// Starts the server over plain HTTP and waits (up to 90 s) until it answers;
        /// with basic auth on, an answer of 401 counts as up.
        pub async fn start(
            jar: &std::path::Path,
            log_dir: &std::path::Path,
            properties: &[&str],
        ) -> Result<Self> {
            let probe = reqwest::Client::new();
            Self::launch(jar, log_dir, properties, "http", probe).await
        }

        /// Starts the server over HTTPS with the environment's serving certificate,
        /// requiring a client certificate from the environment's CA (mutual TLS).
        pub async fn start_https(
            jar: &std::path::Path,
            log_dir: &std::path::Path,
            pki: &crate::Pki,
            properties: &[&str],
        ) -> Result<Self> {
            let file = |p: &std::path::Path| format!("file:{}", p.display());
            let tls = [
                "--server.ssl.enabled=true".to_string(),
                format!("--server.ssl.certificate={}", file(&pki.serving_cert)),
                format!(
                    "--server.ssl.certificate-private-key={}",
                    file(&pki.serving_key)
                ),
                format!("--server.ssl.trust-certificate={}", file(&pki.ca_cert)),
                "--server.ssl.client-auth=need".to_string(),
            ];
            let all: Vec<&str> = tls
                .iter()
                .map(String::as_str)
                .chain(properties.iter().copied())
                .collect();
            Self::launch(jar, log_dir, &all, "https", pki.https_client()?).await
        }

        async fn launch(
            jar: &std::path::Path,
            log_dir: &std::path::Path,
            properties: &[&str],
            scheme: &'static str,
            probe: reqwest::Client,
        ) -> Result<Self> {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .context("a free loopback port")?
                .port();
            let log = log_dir.join(format!("eureka-private-{port}.log"));
            let out = std::fs::File::create(&log).context("eureka log file")?;
            let child = std::process::Command::new("java")
                .args([
                    "-Xms64m",
                    "-Xmx256m",
                    "-XX:TieredStopAtLevel=1",
                    "-XX:+UseSerialGC",
                ])
                .arg("-jar")
                .arg(jar)
                .arg(format!("--server.port={port}"))
                .args(properties)
                .stdin(std::process::Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .spawn()
                .context("starting java")?;
            let mut process = Self {
                child,
                port,
                log,
                scheme,
            };
            let url = format!("{}/apps", process.url());
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
            loop {
                if let Ok(resp) = probe
                    .get(&url)
                    .header(reqwest::header::ACCEPT, "application/json")
                    .send()
                    .await
                {
                    if resp.status().is_success() || resp.status() == StatusCode::UNAUTHORIZED {
                        return Ok(process);
                    }
                }
                if let Some(status) = process.child.try_wait()? {
                    bail!(
                        "eureka exited with {status}; log: {}",
                        process.log.display()
                    );
                }
                if std::time::Instant::now() > deadline {
                    bail!("eureka not up after 90 s; log: {}", process.log.display());
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        }

        /// `http://127.0.0.1:PORT/eureka` (`https://` for [`EurekaProcess::start_https`]).
        pub fn url(&self) -> String {
            format!("{}://127.0.0.1:{}/eureka", self.scheme, self.port)
        }
    }

    impl Drop for EurekaProcess {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    async fn expect(resp: reqwest::Response, want: StatusCode, what: &str) -> Result<()> {
        let status = resp.status();
        if status != want {
            let text = resp.text().await.unwrap_or_default();
            bail!("{what}: expected {want}, got {status}: {text}");
        }
        Ok(())
    }

    /// The `instance` object Eureka expects in a registration. `port`/`secure_port` of
    /// `None` are sent disabled (80/443 with `@enabled` false). `leaseInfo.durationInSecs`
    /// is an hour: tests send no heartbeats, and with the default 90 s lease the server
    /// would evict the instance.
    pub fn instance_json(
        app: &str,
        instance_id: &str,
        ip: &str,
        port: Option<u16>,
        secure_port: Option<u16>,
        status: &str,
        metadata: &[(&str, &str)],
    ) -> Value {
        let port_json = |p: Option<u16>, default: u16| match p {
            Some(p) => json!({"$": p, "@enabled": "true"}),
            None => json!({"$": default, "@enabled": "false"}),
        };
        let metadata: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
        json!({
            "instanceId": instance_id,
            "hostName": format!("{instance_id}.example.invalid"),
            "app": app.to_uppercase(),
            "ipAddr": ip,
            "status": status,
            "port": port_json(port, 80),
            "securePort": port_json(secure_port, 443),
            "vipAddress": app.to_lowercase(),
            "secureVipAddress": app.to_lowercase(),
            "dataCenterInfo": {
                "@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo",
                "name": "MyOwn"
            },
            "leaseInfo": {"durationInSecs": 3600},
            "metadata": metadata,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_export_lines_with_and_without_quotes() {
        let text = "export A=1\nnoise\nexport B='x y'\nexport C=\"/tmp/k\"\n";
        assert_eq!(
            parse_exports(text),
            vec![
                ("A".to_string(), "1".to_string()),
                ("B".to_string(), "x y".to_string()),
                ("C".to_string(), "/tmp/k".to_string()),
            ]
        );
    }

    #[test]
    fn unique_names_are_dns_labels_and_differ() {
        let a = unique_name("t");
        let b = unique_name("t");
        assert_ne!(a, b);
        assert!(a.len() <= 63 && a.starts_with("t-"));
        assert!(a
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
    }

    #[test]
    fn the_program_of_a_recorded_command_line() {
        let script = "#!/bin/sh\n# consul of the test environment in /tmp/x (restart: scripts/testenv start DIR consul)\nexec \\\n  /root/.cache/registry-connector/consul-1.8.7+dfsg1-2+b3/usr/bin/consul \\\n  agent \\\n  -server\n";
        assert_eq!(
            exec_program(script).as_deref(),
            Some("/root/.cache/registry-connector/consul-1.8.7+dfsg1-2+b3/usr/bin/consul")
        );
        let quoted = "#!/bin/sh\nexec \\\n  '/home/a b/it'\\''s/consul' \\\n  agent\n";
        assert_eq!(
            exec_program(quoted).as_deref(),
            Some("/home/a b/it's/consul")
        );
        assert_eq!(exec_program("#!/bin/sh\necho hi\n"), None);
    }

    #[test]
    fn zookeeper_and_nacos_addresses_come_from_the_env_file() {
        let dir = std::env::temp_dir().join(unique_name("testenv-env"));
        std::fs::create_dir_all(&dir).unwrap();
        let base = "export KUBECONFIG=/x/admin.kubeconfig\nexport TESTENV_USER_KUBECONFIG=/x/user.kubeconfig\n";
        std::fs::write(dir.join("env"), base).unwrap();
        let without = TestEnv::from_dir(&dir).unwrap();
        assert!(without.zookeeper_addr().is_err());
        assert!(without.nacos_addr().is_err());
        std::fs::write(
            dir.join("env"),
            format!(
                "{base}export ZOOKEEPER_ADDR=127.0.0.1:40001\nexport NACOS_ADDR=127.0.0.1:40002\n"
            ),
        )
        .unwrap();
        let with = TestEnv::from_dir(&dir).unwrap();
        assert_eq!(with.zookeeper_addr().unwrap(), "127.0.0.1:40001");
        assert_eq!(with.nacos_addr().unwrap(), "127.0.0.1:40002");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn versions_compare_by_their_numbers() {
        assert!(version_key("consul-1.8.10+dfsg1") > version_key("consul-1.8.7+dfsg1-2+b3"));
        assert!(version_key("consul-1.8.7+dfsg1-2+b3") > version_key("consul-1.8.7+dfsg1-2"));
    }

    #[test]
    fn eureka_instance_json_has_what_the_server_needs() {
        let v = eureka::instance_json(
            "orders",
            "orders-1",
            "192.0.2.1",
            Some(8080),
            None,
            "UP",
            &[("zone", "a")],
        );
        assert_eq!(v["app"], "ORDERS");
        assert_eq!(v["vipAddress"], "orders");
        assert_eq!(v["hostName"], "orders-1.example.invalid");
        assert_eq!(
            v["port"],
            serde_json::json!({"$": 8080, "@enabled": "true"})
        );
        assert_eq!(
            v["securePort"],
            serde_json::json!({"$": 443, "@enabled": "false"})
        );
        assert_eq!(v["leaseInfo"]["durationInSecs"], 3600);
        assert_eq!(v["metadata"]["zone"], "a");
    }
}
