//! Consul's HTTPS API with client certificates required (the environment's agent serves
//! it next to plain HTTP, with the environment's 127.0.0.1 certificate): the connector
//! syncs with `--consul-ca-file` and a client certificate, and without either it gets
//! TLS errors, stays not ready and writes nothing.

mod common;

use anyhow::Result;
use common::objects::{service_names, wait_endpoints};
use common::process::Connector;
use serde_json::json;
use testenv::consul::ConsulClient;
use testenv::{unique_name, TestEnv};

#[tokio::test]
async fn mutual_tls_with_the_ca_and_a_client_certificate() -> Result<()> {
    let env = TestEnv::shared();
    let https = format!("https://{}", env.consul_https_addr()?);
    let pki = env.pki();
    let tag = unique_name("tls");
    let name = unique_name("tls-svc");
    // Registered over plain HTTP: the same agent, the same catalog.
    ConsulClient::new(env.consul_addr()?)?
        .put(
            "/v1/agent/service/register",
            &json!({"ID": format!("{name}-1"), "Name": name, "Address": "192.0.2.141",
                    "Port": 8080, "Tags": [tag],
                    "Check": {"CheckID": format!("service:{name}-1"), "TTL": "30m",
                              "Status": "passing"}}),
        )
        .await?;
    let client = env.client().await?;
    let ca = pki.ca_cert.to_string_lossy().to_string();
    let cert = pki.client_cert.to_string_lossy().to_string();
    let key = pki.client_key.to_string_lossy().to_string();
    let filter = ["--filter-tag", tag.as_str()];

    // 1. The CA and a client certificate: synced.
    let ok = env.namespace("consul-tls").await?;
    let connector = Connector::builder(env, ok.name())
        .consul_addr(&https)
        .args(filter)
        .args(["--consul-ca-file", &ca])
        .args(["--consul-client-cert", &cert, "--consul-client-key", &key])
        .start()?;
    wait_endpoints(&client, ok.name(), &name, &[("192.0.2.141", true)])
        .await
        .map_err(|e| e.context(format!("log: {}", connector.log_tail())))?;
    drop(connector);

    // 2. No client certificate: the agent refuses the handshake.
    let no_cert = env.namespace("consul-tls-nocert").await?;
    let connector = Connector::builder(env, no_cert.name())
        .consul_addr(&https)
        .args(filter)
        .args(["--consul-ca-file", &ca])
        .start()?;
    connector.wait_registry_errors(2.0).await?;
    assert_eq!(connector.readyz().await, Some(503));
    assert!(service_names(&client, no_cert.name()).await?.is_empty());
    let log = std::fs::read_to_string(&connector.log).unwrap_or_default();
    assert!(
        log.contains("fatal alert"),
        "the log shows the agent's TLS alert: {}",
        connector.log_tail()
    );
    drop(connector);

    // 3. The environment's CA not trusted (system roots only): the agent's certificate
    // is refused.
    let untrusted = env.namespace("consul-tls-untrusted").await?;
    let connector = Connector::builder(env, untrusted.name())
        .consul_addr(&https)
        .args(filter)
        .args(["--consul-client-cert", &cert, "--consul-client-key", &key])
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

    ConsulClient::new(env.consul_addr()?)?
        .put(
            &format!("/v1/agent/service/deregister/{name}-1"),
            &json!(null),
        )
        .await?;
    Ok(())
}
