//! A Eureka server behind mutual TLS (a private server from the environment's jar,
//! serving the environment's 127.0.0.1 certificate and requiring a client certificate
//! from its CA): the connector syncs with `--eureka-ca-file` and a client certificate,
//! and without either it gets TLS errors, stays not ready and writes nothing.

mod common;

use anyhow::Result;
use common::objects::{service_names, wait_endpoints};
use common::process::Connector;
use testenv::eureka::{instance_json, EurekaClient, EurekaProcess};
use testenv::{unique_name, TestEnv};

#[tokio::test]
async fn mutual_tls_with_the_ca_and_a_client_certificate() -> Result<()> {
    let env = TestEnv::shared();
    let pki = env.pki();
    let server =
        EurekaProcess::start_https(env.eureka_jar()?, &env.dir().join("logs"), &pki, &[]).await?;
    let url = server.url();
    assert!(url.starts_with("https://"), "{url}");
    let app = unique_name("tls");
    EurekaClient::with_http(&url, pki.https_client()?, None)
        .register(
            &app,
            &instance_json(&app, "tls-1", "192.0.2.131", Some(8080), None, "UP", &[]),
        )
        .await?;
    let client = env.client().await?;
    let ca = pki.ca_cert.to_string_lossy().to_string();
    let cert = pki.client_cert.to_string_lossy().to_string();
    let key = pki.client_key.to_string_lossy().to_string();
    let poll = ["--eureka-poll-interval", "1s"];

    // 1. The CA and a client certificate: synced.
    let ok = env.namespace("eureka-tls").await?;
    let connector = Connector::builder(env, ok.name())
        .eureka(Some(&url))
        .args(poll)
        .args(["--eureka-ca-file", &ca])
        .args(["--eureka-client-cert", &cert, "--eureka-client-key", &key])
        .start()?;
    wait_endpoints(&client, ok.name(), &app, &[("192.0.2.131", true)])
        .await
        .map_err(|e| e.context(format!("log: {}", connector.log_tail())))?;
    drop(connector);

    // 2. No client certificate: the server ends the handshake.
    let no_cert = env.namespace("eureka-tls-nocert").await?;
    let connector = Connector::builder(env, no_cert.name())
        .eureka(Some(&url))
        .args(poll)
        .args(["--eureka-ca-file", &ca])
        .start()?;
    connector.wait_registry_errors(2.0).await?;
    assert_eq!(connector.readyz().await, Some(503));
    assert!(service_names(&client, no_cert.name()).await?.is_empty());
    let log = std::fs::read_to_string(&connector.log).unwrap_or_default();
    assert!(
        log.contains("fatal alert"),
        "the log shows the server's TLS alert: {}",
        connector.log_tail()
    );
    drop(connector);

    // 3. The environment's CA not trusted (system roots only): the server's certificate
    // is refused.
    let untrusted = env.namespace("eureka-tls-untrusted").await?;
    let connector = Connector::builder(env, untrusted.name())
        .eureka(Some(&url))
        .args(poll)
        .args(["--eureka-client-cert", &cert, "--eureka-client-key", &key])
        .start()?;
    connector.wait_registry_errors(2.0).await?;
    assert_eq!(connector.readyz().await, Some(503));
    assert!(service_names(&client, untrusted.name()).await?.is_empty());
    let log = std::fs::read_to_string(&connector.log).unwrap_or_default();
    assert!(
        log.contains("UnknownIssuer"),
        "the log names the certificate problem: {}",
        connector.log_tail()
    );
    Ok(())
}
