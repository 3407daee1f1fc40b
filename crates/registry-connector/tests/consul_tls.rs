//! Consul's HTTPS API with client certificates required (the environment's agent serves
//! it next to plain HTTP, with the environment's 127.0.0.1 certificate): the connector
//! syncs with `--consul-ca-file` and a client certificate, and without either it gets
//! TLS errors, stays not ready and writes nothing.

mod common;

use anyhow::Result;
use common::objects::wait_endpoints;
use common::process::Connector;
use common::tls;
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
    let connector = |ns: &str, material| {
        Connector::builder(env, ns)
            .consul_addr(&https)
            .args(["--filter-tag", tag.as_str()])
            .args(tls::flags("consul", &pki, material))
            .start()
    };

    // 1. The CA and a client certificate: synced.
    let ok = env.namespace("consul-tls").await?;
    let synced = connector(ok.name(), tls::FULL)?;
    wait_endpoints(&client, ok.name(), &name, &[("192.0.2.141", true)])
        .await
        .map_err(|e| e.context(format!("log: {}", synced.log_tail())))?;
    drop(synced);

    // 2. No client certificate, or the environment's CA not trusted: refused.
    for (case, material, why) in tls::REFUSED {
        let ns = env.namespace(&format!("consul-tls-{case}")).await?;
        let refused = connector(ns.name(), material)?;
        tls::assert_refused(&refused, &client, ns.name(), why)
            .await
            .map_err(|e| e.context(case))?;
    }

    ConsulClient::new(env.consul_addr()?)?
        .put(
            &format!("/v1/agent/service/deregister/{name}-1"),
            &json!(null),
        )
        .await?;
    Ok(())
}
