//! TLS to ZooKeeper's secure client port: a private ZooKeeper server of this test (the
//! environment's own jars, Netty, PEM key and trust stores from the environment's CA,
//! `ssl.clientAuth=need`, on 127.0.0.1 only), a provider written over TLS, and the real
//! binary: with the CA and the client certificate it publishes; without the client
//! certificate, or trusting another CA, it is refused and publishes nothing.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use common::objects::{service_names, wait_endpoints};
use common::process::{free_port, Connector};
use common::zookeeper::{url_encode, Provider};
use testenv::{unique_name, wait_for, Pki, TestEnv};
use zookeeper_client::{Acls, Client, CreateMode, TlsOptions};

/// A standalone ZooKeeper serving only TLS, killed when dropped.
struct TlsZookeeper {
    _child: tokio::process::Child,
    addr: String,
    log: PathBuf,
}

/// The class path of the environment's own ZooKeeper, from its recorded command line.
fn zookeeper_classpath(env: &TestEnv) -> Result<String> {
    let cmd = env.dir().join("cmd/zookeeper.sh");
    let text =
        std::fs::read_to_string(&cmd).with_context(|| format!("reading {}", cmd.display()))?;
    let args: Vec<String> = text
        .lines()
        .map(|l| {
            l.trim()
                .trim_end_matches('\\')
                .trim()
                .trim_matches('\'')
                .to_string()
        })
        .collect();
    let at = args
        .iter()
        .position(|a| a == "-cp")
        .context("no -cp in the ZooKeeper command")?;
    args.get(at + 1).cloned().context("no class path after -cp")
}

fn tls(pki: &Pki, ca: &Path, client_cert: bool) -> Result<TlsOptions> {
    let mut options = TlsOptions::new().with_pem_ca(&std::fs::read_to_string(ca)?)?;
    if client_cert {
        options = options.with_pem_identity(
            &std::fs::read_to_string(&pki.client_cert)?,
            &std::fs::read_to_string(&pki.client_key)?,
        )?;
    }
    Ok(options)
}

impl TlsZookeeper {
    async fn start(env: &TestEnv) -> Result<Self> {
        let pki = env.pki();
        let dir = env.dir().join(unique_name("zookeeper-tls"));
        std::fs::create_dir_all(dir.join("data"))?;
        // ZooKeeper's PEM key store: the key and its certificate in one file.
        let mut pem = std::fs::read_to_string(&pki.serving_key)?;
        pem.push('\n');
        pem.push_str(&std::fs::read_to_string(&pki.serving_cert)?);
        std::fs::write(dir.join("server.pem"), pem)?;
        let port = free_port();
        std::fs::write(
            dir.join("zoo.cfg"),
            format!(
                "tickTime=2000\ndataDir={data}\nsecureClientPort={port}\nsecureClientPortAddress=127.0.0.1\n\
                 serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory\n\
                 ssl.keyStore.location={keystore}\nssl.keyStore.type=PEM\n\
                 ssl.trustStore.location={ca}\nssl.trustStore.type=PEM\nssl.clientAuth=need\n\
                 admin.enableServer=false\n4lw.commands.whitelist=srvr\nmaxClientCnxns=0\n",
                data = dir.join("data").display(),
                keystore = dir.join("server.pem").display(),
                ca = pki.ca_cert.display(),
            ),
        )?;
        let log = env.dir().join("logs").join(format!(
            "{}.log",
            dir.file_name().unwrap_or_default().to_string_lossy()
        ));
        let child = tokio::process::Command::new("java")
            .args([
                "-Xms32m",
                "-Xmx128m",
                "-XX:TieredStopAtLevel=1",
                "-XX:+UseSerialGC",
            ])
            .arg(format!("-Djava.io.tmpdir={}", dir.display()))
            .arg("-cp")
            .arg(zookeeper_classpath(env)?)
            .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
            .arg(dir.join("zoo.cfg"))
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(log.with_extension("err"))?)
            .kill_on_drop(true)
            .spawn()
            .context("starting a TLS ZooKeeper")?;
        let server = Self {
            _child: child,
            addr: format!("127.0.0.1:{port}"),
            log,
        };
        wait_for(
            "the TLS ZooKeeper to serve",
            Duration::from_secs(60),
            || async { server.session(&pki, true).await.ok().map(drop) },
        )
        .await
        .with_context(|| server.log_tail())?;
        Ok(server)
    }

    /// A TLS session trusting the environment's CA, with or without the client certificate.
    async fn session(&self, pki: &Pki, client_cert: bool) -> Result<Client> {
        Ok(Client::connector()
            .with_session_timeout(Duration::from_secs(30))
            .with_fail_eagerly()
            .with_tls(tls(pki, &pki.ca_cert, client_cert)?)
            .secure_connect(&self.addr)
            .await?)
    }

    fn log_tail(&self) -> String {
        let mut text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.push_str(&std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default());
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

#[tokio::test]
async fn tls_with_a_client_certificate_is_read_and_anything_less_refused() -> Result<()> {
    let env = TestEnv::shared();
    let pki = env.pki();
    let server = TlsZookeeper::start(env).await?;
    let owner = server.session(&pki, true).await?;
    // Without a client certificate the server refuses the handshake.
    if server.session(&pki, false).await.is_ok() {
        bail!("the TLS ZooKeeper accepted a client without a certificate");
    }
    let t = unique_name("t")[2..].to_string();
    let iface = format!("com.example.Tls{t}");
    let p = Provider::new(&iface, "192.0.2.151", 20880);
    let path = format!(
        "/dubbo/{}/providers/{}",
        url_encode(&iface),
        url_encode(&p.url())
    );
    owner
        .mkdir(
            path.rsplit_once('/').expect("a parent").0,
            &CreateMode::Persistent.with_acls(Acls::anyone_all()),
        )
        .await?;
    owner
        .create(
            &path,
            b"",
            &CreateMode::Ephemeral.with_acls(Acls::anyone_all()),
        )
        .await?;
    let kube = format!("com-example-tls{t}");
    let client = env.client().await?;

    let start = |ns: &str, flags: Vec<String>| {
        Connector::builder(env, ns)
            .zookeeper_at(server.addr.clone())
            .args(["--zookeeper-session-timeout", "4s"])
            .args(flags)
            .start()
    };
    let ca = pki.ca_cert.to_string_lossy().into_owned();
    let cert = pki.client_cert.to_string_lossy().into_owned();
    let key = pki.client_key.to_string_lossy().into_owned();
    let ok_ns = env.namespace("zk-tls").await?;
    let full = start(
        ok_ns.name(),
        vec![
            "--zookeeper-ca-file".into(),
            ca.clone(),
            "--zookeeper-client-cert".into(),
            cert.clone(),
            "--zookeeper-client-key".into(),
            key.clone(),
        ],
    )?;
    wait_endpoints(&client, ok_ns.name(), &kube, &[("192.0.2.151", true)])
        .await
        .map_err(|e| e.context(full.log_tail()))?;

    // Refused: no client certificate; a CA that did not sign the server's certificate
    // (the client certificate stands in for one).
    let no_cert_ns = env.namespace("zk-tls-nocert").await?;
    let no_cert = start(
        no_cert_ns.name(),
        vec!["--zookeeper-ca-file".into(), ca.clone()],
    )?;
    let untrusted_ns = env.namespace("zk-tls-untrusted").await?;
    let untrusted = start(
        untrusted_ns.name(),
        vec![
            "--zookeeper-ca-file".into(),
            cert.clone(),
            "--zookeeper-client-cert".into(),
            cert,
            "--zookeeper-client-key".into(),
            key,
        ],
    )?;
    for c in [&no_cert, &untrusted] {
        c.wait_registry_errors(2.0).await?;
    }
    for ns in [no_cert_ns.name(), untrusted_ns.name()] {
        assert!(service_names(&client, ns).await?.is_empty(), "{ns}");
    }
    // A plaintext connector gets nowhere either.
    let plain_ns = env.namespace("zk-tls-plain").await?;
    let plain = start(plain_ns.name(), vec![])?;
    plain.wait_registry_errors(1.0).await?;
    assert!(service_names(&client, plain_ns.name()).await?.is_empty());
    drop(owner);
    Ok(())
}
