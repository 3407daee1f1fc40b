//! Eureka as the benchmark drives it: synthetic instances registered through the
//! server's REST API (`POST /apps/{APP}`), cancelled (`DELETE /apps/{APP}/{id}`) and
//! taken out of or back into service (`PUT /apps/{APP}/{id}/status?value=...`).
//!
//! Every instance carries the metadata entry `bench-set=<data set>`, which is both the
//! connector's `--filter-metadata` selection and how a data set is found again for its
//! removal. Registrations send no heartbeats, so their lease is a day: the server's
//! evictor would otherwise remove them after 90 s. Eureka has no blocking queries: the
//! connector polls `/apps/delta` every `poll_interval`, which therefore bounds every
//! propagation latency on top of the quiet period.

use std::time::Duration;

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use serde_json::{json, Value};
use testenv::eureka::{instance_json, EurekaClient};

use super::DataSets;
use crate::model::{Instance, Service, PORT};

/// The metadata key that carries an instance's data set.
const SET_KEY: &str = "bench-set";

/// Lease of every synthetic registration, seconds: longer than any run (the server
/// multiplies it by 1,000 in an `int`, so it must stay under about 24 days).
const LEASE_SECS: u64 = 86_400;

/// A Eureka client restricted to what the benchmark does.
#[derive(Debug)]
pub struct Eureka {
    /// `http://127.0.0.1:PORT/eureka`, without a trailing slash.
    url: String,
    api: EurekaClient,
    http: reqwest::Client,
    /// The connector's `--eureka-poll-interval`.
    pub poll_interval: Duration,
    sets: DataSets,
}

/// The registration body of `inst` (the JSON the test environment's server accepts,
/// with the long lease and the data-set marker).
fn instance_body(svc: &Service, inst: &Instance) -> Value {
    let status = if inst.ready { "UP" } else { "OUT_OF_SERVICE" };
    let mut body = instance_json(
        &svc.name,
        &inst.id,
        &inst.address,
        Some(PORT),
        None,
        status,
        &[(SET_KEY, &svc.set)],
    );
    body["leaseInfo"]["durationInSecs"] = json!(LEASE_SECS);
    body
}

/// Eureka's JSON gives a one-element list as the element itself: both become a list.
fn list(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(items) => items.iter().collect(),
        Value::Object(_) => vec![v],
        _ => Vec::new(),
    }
}

/// `(application, instance id)` of every instance of an `applications` document whose
/// metadata puts it in data set `set`.
fn members<'a>(doc: &'a Value, set: &str) -> Vec<(&'a str, &'a str)> {
    list(&doc["applications"]["application"])
        .into_iter()
        .flat_map(|app| {
            let name = app["name"].as_str().unwrap_or_default();
            list(&app["instance"])
                .into_iter()
                .filter(move |i| i["metadata"][SET_KEY].as_str() == Some(set))
                .filter_map(move |i| Some((name, i["instanceId"].as_str()?)))
        })
        .collect()
}

/// Instances listed in an `applications` document.
fn instance_total(doc: &Value) -> usize {
    list(&doc["applications"]["application"])
        .into_iter()
        .map(|app| list(&app["instance"]).len())
        .sum()
}

impl Eureka {
    /// `url` is the server's API base, `http://127.0.0.1:PORT/eureka`.
    pub fn new(url: &str, poll_interval: Duration) -> Result<Self> {
        let url = url.trim_end_matches('/').to_string();
        if !(url.starts_with("http://127.") || url.starts_with("http://localhost")) {
            anyhow::bail!("the benchmark only talks to a Eureka server on the loopback, not {url}");
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .no_proxy()
            .build()
            .context("building the Eureka HTTP client")?;
        Ok(Self {
            api: EurekaClient::with_http(&url, http.clone(), None),
            url,
            http,
            poll_interval,
            sets: DataSets::default(),
        })
    }

    /// The server's API base, `http://127.0.0.1:PORT/eureka`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server's port (where the connector's connections go).
    pub fn port(&self) -> u16 {
        self.url
            .trim_start_matches("http://")
            .split(['/', ':'])
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(80)
    }

    /// The connector's flags that make it read this server and only data set `set`.
    pub fn selection_flags(&self, set: &str) -> Vec<String> {
        vec![
            "--eureka-url".into(),
            self.url.clone(),
            "--filter-metadata".into(),
            format!("{SET_KEY}={set}"),
        ]
    }

    /// Eureka-specific tuning of every connector: the poll interval.
    pub fn tuning_flags(&self) -> Vec<String> {
        vec![
            "--eureka-poll-interval".into(),
            humantime::format_duration(self.poll_interval).to_string(),
        ]
    }

    /// Registers one instance (`POST /apps/{APP}`).
    pub async fn register(&self, svc: &Service, inst: &Instance) -> Result<()> {
        self.api
            .register(&svc.name, &instance_body(svc, inst))
            .await
    }

    /// Cancels one instance (`DELETE /apps/{APP}/{id}`).
    pub async fn cancel(&self, svc: &Service, inst: &Instance) -> Result<()> {
        self.api.cancel(&svc.name, &inst.id).await
    }

    /// `UP` or `OUT_OF_SERVICE` (a status override, as an operator or a deployment
    /// tool sets it).
    pub async fn set_ready(&self, svc: &Service, inst: &Instance, ready: bool) -> Result<()> {
        let status = if ready { "UP" } else { "OUT_OF_SERVICE" };
        self.api.set_status(&svc.name, &inst.id, status).await
    }

    /// Registers every instance of `services`, `concurrency` calls at a time.
    pub async fn register_all(&self, services: &[Service], concurrency: usize) -> Result<()> {
        self.sets.add(services);
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

    async fn get_json(&self, path: &str) -> Result<Value> {
        self.http
            .get(format!("{}{path}", self.url))
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .with_context(|| format!("GET {path}"))?
            .error_for_status()
            .with_context(|| format!("GET {path}"))?
            .json()
            .await
            .with_context(|| format!("decoding GET {path}"))
    }

    /// Number of instances Eureka holds for `service` (any status), for sanity checks.
    pub async fn instance_count(&self, service: &str) -> Result<usize> {
        let doc = self
            .get_json(&format!("/apps/{}", service.to_uppercase()))
            .await?;
        Ok(list(&doc["application"]["instance"]).len())
    }

    /// Instances in the server's current `/apps/delta` (its last ~3 minutes of
    /// changes): what every one of the connector's polls downloads and applies again.
    pub async fn delta_instances(&self) -> Result<usize> {
        Ok(instance_total(&self.get_json("/apps/delta").await?))
    }

    /// Cancels every instance of data set `set` still registered, `concurrency` at a time.
    pub async fn remove_set(&self, set: &str, concurrency: usize) -> Result<usize> {
        let doc = self.get_json("/apps").await?;
        let victims = members(&doc, set);
        let count = victims.len();
        futures::stream::iter(victims)
            .map(|(app, id)| self.api.cancel(app, id))
            .buffer_unordered(concurrency.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        self.sets.remove(set);
        Ok(count)
    }

    /// Removes every data set this run registered and did not remove yet.
    pub async fn cleanup(&self, concurrency: usize) -> Result<()> {
        for set in self.sets.all() {
            self.remove_set(&set, concurrency).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_of_the_url() {
        let e = Eureka::new("http://127.0.0.1:40456/eureka", Duration::from_secs(1)).unwrap();
        assert_eq!(e.port(), 40456);
    }

    #[test]
    fn registration_carries_the_set_a_long_lease_and_the_status() {
        let mut svc = Service::new("s1-00000".into(), "bench-sync-1".into(), 1);
        svc.instances[0].ready = false;
        let body = instance_body(&svc, &svc.instances[0]);
        assert_eq!(body["app"], "S1-00000");
        assert_eq!(body["instanceId"], "s1-00000-0");
        assert_eq!(body["ipAddr"], "192.0.2.1");
        assert_eq!(body["status"], "OUT_OF_SERVICE");
        assert_eq!(body["metadata"][SET_KEY], "bench-sync-1");
        assert_eq!(body["leaseInfo"]["durationInSecs"], 86_400);
        assert_eq!(body["port"]["$"], 8080);
    }

    #[test]
    fn finds_the_members_of_a_set_in_lists_and_single_elements() {
        let doc = json!({"applications": {"application": [
            {"name": "A", "instance": [
                {"instanceId": "a-0", "metadata": {"bench-set": "x"}},
                {"instanceId": "a-1", "metadata": {"bench-set": "y"}},
            ]},
            {"name": "B", "instance": {"instanceId": "b-0", "metadata": {"bench-set": "x"}}},
        ]}});
        assert_eq!(members(&doc, "x"), vec![("A", "a-0"), ("B", "b-0")]);
        assert_eq!(instance_total(&doc), 3);
        let single = json!({"applications": {"application":
            {"name": "C", "instance": {"instanceId": "c-0", "metadata": {}}}}});
        assert_eq!(instance_total(&single), 1);
        assert!(members(&single, "x").is_empty());
        assert_eq!(instance_total(&json!({"applications": {}})), 0);
    }
}
