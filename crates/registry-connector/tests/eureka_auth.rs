//! A Eureka server that requires HTTP basic auth, as secured production servers do (a
//! private server from the environment's jar with Spring Security on): the connector
//! authenticates with the credentials written in its URL or given by its flags, never
//! logs the password, and a wrong password is an error that writes and deletes nothing.

mod common;

use anyhow::Result;
use common::objects::{service_names, wait_endpoints};
use common::process::Connector;
use testenv::eureka::{instance_json, EurekaClient, EurekaProcess};
use testenv::{unique_name, TestEnv};

const USER: &str = "connector";
const PASSWORD: &str = "pw-5c1d3f";

fn log_of(connector: &Connector) -> String {
    std::fs::read_to_string(&connector.log).unwrap_or_default()
}

#[tokio::test]
async fn basic_auth_from_the_url_or_the_flags() -> Result<()> {
    let env = TestEnv::shared();
    let user = format!("--spring.security.user.name={USER}");
    let password = format!("--spring.security.user.password={PASSWORD}");
    let server = EurekaProcess::start(
        env.eureka_jar()?,
        &env.dir().join("logs"),
        &["--testenv.auth.enabled=true", &user, &password],
    )
    .await?;
    assert!(
        EurekaClient::new(&server.url())?.apps().await.is_err(),
        "the server refuses anonymous reads"
    );
    let eureka = EurekaClient::with_basic_auth(&server.url(), Some((USER, PASSWORD)))?;
    let app = unique_name("auth");
    eureka
        .register(
            &app,
            &instance_json(&app, "auth-1", "192.0.2.91", Some(8080), None, "UP", &[]),
        )
        .await?;
    let client = env.client().await?;
    let poll = ["--eureka-poll-interval", "1s"];

    // 1. Credentials in the URL, as a client's defaultZone carries them.
    let in_url = env.namespace("eureka-auth-url").await?;
    let url = format!("http://{USER}:{PASSWORD}@127.0.0.1:{}/eureka", server.port);
    let connector = Connector::builder(env, in_url.name())
        .eureka(Some(&url))
        .args(poll)
        .start()?;
    wait_endpoints(&client, in_url.name(), &app, &[("192.0.2.91", true)]).await?;
    let log = log_of(&connector);
    assert!(!log.contains(PASSWORD), "the password is never logged");
    drop(connector);

    // 2. The user as a flag, the password from the environment (as the chart sets it).
    let by_flags = env.namespace("eureka-auth-flags").await?;
    let connector = Connector::builder(env, by_flags.name())
        .eureka(Some(&server.url()))
        .args(poll)
        .args(["--eureka-username", USER])
        .env("EUREKA_PASSWORD", PASSWORD)
        .start()?;
    wait_endpoints(&client, by_flags.name(), &app, &[("192.0.2.91", true)]).await?;
    drop(connector);

    // 3. A wrong password: errors, not ready, nothing written.
    let refused = env.namespace("eureka-auth-refused").await?;
    let connector = Connector::builder(env, refused.name())
        .eureka(Some(&server.url()))
        .args(poll)
        .args(["--eureka-username", USER])
        .env("EUREKA_PASSWORD", "wrong-password")
        .start()?;
    connector.wait_registry_errors(2.0).await?;
    assert_eq!(connector.readyz().await, Some(503));
    assert!(service_names(&client, refused.name()).await?.is_empty());
    let log = log_of(&connector);
    assert!(log.contains("401"), "the refusal is logged with its status");
    assert!(!log.contains("wrong-password"));
    Ok(())
}
