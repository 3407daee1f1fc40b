//! Nacos as the benchmark drives it: synthetic ephemeral instances registered over
//! Nacos's HTTP Open API (`POST /nacos/v1/ns/instance`), made ready or not by their
//! weight (`PUT`, weight 1 or 0: the connector publishes a weight-0 instance not ready)
//! and deregistered (`DELETE`), all in group `DEFAULT_GROUP` of namespace `public`.
//!
//! Every instance carries the metadata entry `bench-set=<data set>`, the connector's
//! `--filter-metadata` selection. Registrations send no heartbeats: the metadata
//! `preserved.heart.beat.timeout` and `preserved.ip.delete.timeout` keep them healthy and
//! present for a day. The harness remembers what it registered (Nacos's service list is
//! paged per group), which is how a data set is found again for its removal. The
//! connector is told of a change by a push, after the server's push delay (500 ms by
//! default in Nacos 2.x), which is the registry's part of every propagation latency.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

use crate::model::{Instance, Service, PORT};

/// The metadata key that carries an instance's data set.
const SET_KEY: &str = "bench-set";

/// How long an instance without heartbeats stays healthy and registered, ms.
const LEASE_MS: u64 = 86_400_000;

/// The server's delay before it pushes a change (`nacos.naming.push.pushTaskDelay`).
const PUSH_DELAY: Duration = Duration::from_millis(500);

/// A Nacos client restricted to what the benchmark does.
#[derive(Debug)]
pub struct Nacos {
    /// `127.0.0.1:PORT`, the HTTP API.
    addr: String,
    http: reqwest::Client,
    /// Per data set, the `(service, address)` of every instance registered and not
    /// deregistered yet.
    sets: Mutex<BTreeMap<String, Vec<(String, String)>>>,
}

/// `key=value&...`, every value percent-encoded.
fn form(pairs: &[(&str, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", utf8_percent_encode(v, NON_ALPHANUMERIC)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The metadata of every instance of data set `set`.
fn metadata(set: &str) -> String {
    serde_json::json!({
        SET_KEY: set,
        "preserved.heart.beat.timeout": LEASE_MS.to_string(),
        "preserved.ip.delete.timeout": LEASE_MS.to_string(),
    })
    .to_string()
}

/// The parameters that name one instance of `service`.
fn instance_params(service: &str, address: &str) -> Vec<(&'static str, String)> {
    vec![
        ("serviceName", service.to_string()),
        ("groupName", "DEFAULT_GROUP".into()),
        ("ip", address.to_string()),
        ("port", PORT.to_string()),
        ("ephemeral", "true".into()),
    ]
}

/// The parameters of a registration or an update: the instance's weight says whether
/// it is ready, and the metadata goes with every update (Nacos replaces it).
fn registration_params(svc: &Service, inst: &Instance) -> Vec<(&'static str, String)> {
    let mut params = instance_params(&svc.name, &inst.address);
    params.push(("weight", if inst.ready { "1" } else { "0" }.into()));
    params.push(("enabled", "true".into()));
    params.push(("healthy", "true".into()));
    params.push(("metadata", metadata(&svc.set)));
    params
}

impl Nacos {
    /// `addr` is the server's HTTP API, `127.0.0.1:PORT`.
    pub fn new(addr: &str) -> Result<Self> {
        let addr = addr
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        if !(addr.starts_with("127.") || addr.starts_with("localhost")) {
            bail!("the benchmark only talks to a Nacos server on the loopback, not {addr}");
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .no_proxy()
            .build()
            .context("building the Nacos HTTP client")?;
        Ok(Self {
            addr,
            http,
            sets: Mutex::new(BTreeMap::new()),
        })
    }

    fn sets(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<(String, String)>>> {
        self.sets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The server's gRPC port (HTTP + 1000), where the connector's connection goes.
    pub fn port(&self) -> u16 {
        self.addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .map_or(0, |p| p.saturating_add(1000))
    }

    /// The connector's flags that make it read this server and only data set `set`.
    pub fn selection_flags(&self, set: &str) -> Vec<String> {
        vec![
            "--nacos-addr".into(),
            self.addr.clone(),
            "--filter-metadata".into(),
            format!("{SET_KEY}={set}"),
        ]
    }

    /// Nacos-specific tuning of every connector: none (pushes, and the service list
    /// read at its default interval).
    pub fn tuning_flags(&self) -> Vec<String> {
        Vec::new()
    }

    /// The registry's part of a propagation: the server's push delay.
    pub fn read_delay(&self) -> Duration {
        PUSH_DELAY
    }

    async fn call(&self, method: reqwest::Method, params: &[(&str, String)]) -> Result<()> {
        let url = format!("http://{}/nacos/v1/ns/instance?{}", self.addr, form(params));
        let resp = self
            .http
            .request(method.clone(), &url)
            .send()
            .await
            .with_context(|| format!("{method} /nacos/v1/ns/instance"))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            bail!("{method} /nacos/v1/ns/instance answered {status}: {text}");
        }
        Ok(())
    }

    /// `DELETE` of one instance. Nacos 2.3.2 answers 500 (a `NullPointerException` on
    /// `InstancePublishInfo`) for an instance it no longer holds: that one is gone already.
    async fn deregister_one(&self, service: &str, address: &str) -> Result<()> {
        match self
            .call(reqwest::Method::DELETE, &instance_params(service, address))
            .await
        {
            Err(e) if format!("{e:#}").contains("InstancePublishInfo") => Ok(()),
            other => other,
        }
    }

    /// Registers one instance.
    pub async fn register(&self, svc: &Service, inst: &Instance) -> Result<()> {
        self.call(reqwest::Method::POST, &registration_params(svc, inst))
            .await?;
        let mut sets = self.sets();
        let members = sets.entry(svc.set.clone()).or_default();
        let key = (svc.name.clone(), inst.address.clone());
        if !members.contains(&key) {
            members.push(key);
        }
        Ok(())
    }

    /// Deregisters one instance.
    pub async fn deregister(&self, svc: &Service, inst: &Instance) -> Result<()> {
        self.deregister_one(&svc.name, &inst.address).await?;
        if let Some(members) = self.sets().get_mut(&svc.set) {
            members.retain(|(s, a)| !(s == &svc.name && a == &inst.address));
        }
        Ok(())
    }

    /// Weight 1 (ready) or 0 (published not ready).
    pub async fn set_ready(&self, svc: &Service, inst: &Instance, ready: bool) -> Result<()> {
        let mut changed = inst.clone();
        changed.ready = ready;
        self.call(reqwest::Method::PUT, &registration_params(svc, &changed))
            .await
    }

    /// Registers every instance of `services`, `concurrency` calls at a time.
    pub async fn register_all(&self, services: &[Service], concurrency: usize) -> Result<()> {
        let calls = services
            .iter()
            .flat_map(|s| s.instances.iter().map(move |i| (s, i)));
        futures::stream::iter(calls)
            .map(|(s, i)| self.register(s, i))
            .buffer_unordered(concurrency.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Instances Nacos holds for `service` in `DEFAULT_GROUP` (healthy or not).
    pub async fn instance_count(&self, service: &str) -> Result<usize> {
        let url = format!(
            "http://{}/nacos/v1/ns/instance/list?{}",
            self.addr,
            form(&[
                ("serviceName", service.to_string()),
                ("healthyOnly", "false".into())
            ])
        );
        let doc: serde_json::Value = self
            .http
            .get(&url)
            .send()
            .await
            .context("GET /nacos/v1/ns/instance/list")?
            .error_for_status()
            .context("GET /nacos/v1/ns/instance/list")?
            .json()
            .await
            .context("decoding GET /nacos/v1/ns/instance/list")?;
        Ok(doc["hosts"].as_array().map_or(0, Vec::len))
    }

    /// Deregisters every instance of data set `set` still registered, `concurrency` at
    /// a time.
    pub async fn remove_set(&self, set: &str, concurrency: usize) -> Result<usize> {
        let members = self.sets().remove(set).unwrap_or_default();
        let count = members.len();
        futures::stream::iter(members)
            .map(|(service, address)| async move { self.deregister_one(&service, &address).await })
            .buffer_unordered(concurrency.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        Ok(count)
    }

    /// Removes every data set this run registered and did not remove yet.
    pub async fn cleanup(&self, concurrency: usize) -> Result<()> {
        let sets: Vec<String> = self.sets().keys().cloned().collect();
        for set in sets {
            self.remove_set(&set, concurrency).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grpc_port_is_the_http_port_plus_1000() {
        let n = Nacos::new("127.0.0.1:8848").unwrap();
        assert_eq!(n.port(), 9848);
        assert!(Nacos::new("192.0.2.1:8848").is_err(), "loopback only");
    }

    #[test]
    fn a_registration_carries_the_set_the_lease_and_readiness_as_weight() {
        let mut svc = Service::new("s1-00000".into(), "bench-sync-1".into(), 1);
        svc.instances[0].ready = false;
        let params: BTreeMap<&str, String> = registration_params(&svc, &svc.instances[0])
            .into_iter()
            .collect();
        assert_eq!(params["serviceName"], "s1-00000");
        assert_eq!(params["ip"], "192.0.2.1");
        assert_eq!(params["weight"], "0");
        assert_eq!(params["ephemeral"], "true");
        let meta: serde_json::Value = serde_json::from_str(&params["metadata"]).unwrap();
        assert_eq!(meta[SET_KEY], "bench-sync-1");
        assert_eq!(meta["preserved.ip.delete.timeout"], "86400000");
    }
}
