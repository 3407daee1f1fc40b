//! How the connectors of a run reach the Consul agent: plain HTTP or the same agent's
//! HTTPS API with the test environment's CA and client certificate, and whether the
//! connection budget is the connector's own. Kept apart from the harness's client
//! ([`super::consul`]), which always writes over plain HTTP.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The agent's HTTPS API and the client material the connector presents to it.
#[derive(Debug, Clone)]
pub struct Tls {
    /// `127.0.0.1:PORT` of the same agent's HTTPS listener (`CONSUL_HTTPS_ADDR`).
    pub addr: String,
    /// The test environment's `pki/` (ca.crt, client.crt, client.key).
    pub pki: PathBuf,
}

impl Tls {
    pub fn port(&self) -> Result<u16> {
        port_of(&self.addr)
    }

    /// The connector's flags for the HTTPS API.
    pub fn flags(&self) -> Vec<String> {
        let file = |name: &str| self.pki.join(name).display().to_string();
        vec![
            "--consul-http-addr".into(),
            format!("https://{}", self.addr.trim_start_matches("https://")),
            "--consul-ca-file".into(),
            file("ca.crt"),
            "--consul-client-cert".into(),
            file("client.crt"),
            "--consul-client-key".into(),
            file("client.key"),
        ]
    }

    fn check(&self) -> Result<()> {
        for name in ["ca.crt", "client.crt", "client.key"] {
            let p: &Path = &self.pki.join(name);
            if !p.is_file() {
                bail!(
                    "--consul-tls needs {} (the test environment's pki)",
                    p.display()
                );
            }
        }
        Ok(())
    }
}

/// How the connectors of a run reach the agent.
#[derive(Debug, Clone, Default)]
pub struct ConnectorLink {
    /// The connector's `--consul-max-connections`; `None` leaves its default.
    pub max_connections: Option<usize>,
    /// Over HTTPS instead of plain HTTP.
    pub tls: Option<Tls>,
}

impl ConnectorLink {
    /// Checks the TLS material and address, when there is TLS.
    pub fn check(&self) -> Result<()> {
        if let Some(tls) = &self.tls {
            tls.check()?;
            tls.port()?;
        }
        Ok(())
    }
}

/// The port of `127.0.0.1:PORT` or `http(s)://127.0.0.1:PORT[/]`.
pub fn port_of(addr: &str) -> Result<u16> {
    addr.trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no port in the Consul address {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_flags_point_the_connector_at_https_with_the_pki() {
        let tls = Tls {
            addr: "127.0.0.1:40124".into(),
            pki: PathBuf::from("/env/pki"),
        };
        assert_eq!(tls.port().unwrap(), 40124);
        assert_eq!(
            tls.flags(),
            [
                "--consul-http-addr",
                "https://127.0.0.1:40124",
                "--consul-ca-file",
                "/env/pki/ca.crt",
                "--consul-client-cert",
                "/env/pki/client.crt",
                "--consul-client-key",
                "/env/pki/client.key",
            ]
        );
        assert!(tls.check().is_err());
        assert_eq!(port_of("http://127.0.0.1:8500/").unwrap(), 8500);
    }
}
