//! A Eureka server behind mutual TLS (a private server from the environment's jar,
//! serving the environment's 127.0.0.1 certificate and requiring a client certificate
//! from its CA): the connector syncs with `--eureka-ca-file` and a client certificate,
//! and without either it gets TLS errors, stays not ready and writes nothing.

mod common;

use anyhow::Result;
use common::objects::wait_endpoints;
use common::process::Connector;
use common::tls;
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
    let connector = |ns: &str, material| {
        Connector::builder(env, ns)
            .eureka(Some(&url))
            .args(["--eureka-poll-interval", "1s"])
            .args(tls::flags("eureka", &pki, material))
            .start()
    };

    // 1. The CA and a client certificate: synced.
    let ok = env.namespace("eureka-tls").await?;
    let synced = connector(ok.name(), tls::FULL)?;
    wait_endpoints(&client, ok.name(), &app, &[("192.0.2.131", true)])
        .await
        .map_err(|e| e.context(format!("log: {}", synced.log_tail())))?;
    drop(synced);

    // 2. No client certificate, or the environment's CA not trusted: refused.
    for (case, material, why) in tls::REFUSED {
        let ns = env.namespace(&format!("eureka-tls-{case}")).await?;
        let refused = connector(ns.name(), material)?;
        tls::assert_refused(&refused, &client, ns.name(), why)
            .await
            .map_err(|e| e.context(case))?;
    }
    Ok(())
}
