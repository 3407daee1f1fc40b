//! The TLS cases every registry's test runs against a server that requires client
//! certificates from the test environment's CA: the connector's flags for a choice of
//! material, and what a refused connection must look like.

use anyhow::{ensure, Result};
use kube::Client;
use testenv::Pki;

use super::objects::service_names;
use super::process::Connector;

/// What a connector is given.
#[derive(Debug, Clone, Copy)]
pub struct Material {
    /// `--<registry>-ca-file` with the environment's CA (else the system roots).
    pub ca: bool,
    /// `--<registry>-client-cert` and `-client-key` with the environment's client
    /// certificate.
    pub client_cert: bool,
}

/// Both: what the server accepts.
pub const FULL: Material = Material {
    ca: true,
    client_cert: true,
};

/// The cases the server refuses, each with what the connector's log must name.
pub const REFUSED: [(&str, Material, &str); 2] = [
    (
        "no-client-cert",
        Material {
            ca: true,
            client_cert: false,
        },
        "fatal alert",
    ),
    (
        "untrusted",
        Material {
            ca: false,
            client_cert: true,
        },
        "UnknownIssuer",
    ),
];

/// The connector flags giving `material` for `registry` (`consul`, `eureka`).
pub fn flags(registry: &str, pki: &Pki, material: Material) -> Vec<String> {
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let mut flags = Vec::new();
    if material.ca {
        flags.push(format!("--{registry}-ca-file={}", path(&pki.ca_cert)));
    }
    if material.client_cert {
        flags.push(format!(
            "--{registry}-client-cert={}",
            path(&pki.client_cert)
        ));
        flags.push(format!("--{registry}-client-key={}", path(&pki.client_key)));
    }
    flags
}

/// The connector keeps failing over TLS (its log naming `why`), is not ready, and has
/// written nothing into `ns`.
pub async fn assert_refused(
    connector: &Connector,
    client: &Client,
    ns: &str,
    why: &str,
) -> Result<()> {
    connector.wait_registry_errors(2.0).await?;
    ensure!(
        connector.readyz().await == Some(503),
        "ready although the registry refuses it"
    );
    ensure!(
        service_names(client, ns).await?.is_empty(),
        "wrote Services into {ns}"
    );
    let log = std::fs::read_to_string(&connector.log).unwrap_or_default();
    ensure!(
        log.contains(why),
        "the log does not name {why:?}: {}",
        connector.log_tail()
    );
    Ok(())
}
