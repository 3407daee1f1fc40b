//! What the export workload reads from Eureka: the instances the connector registered
//! (`GET /apps`, those whose metadata carries its `registry-connector-id`), the status
//! of one instance (`GET /apps/<APP>`), and their removal at the end
//! (`DELETE /apps/<APP>/<id>`, ours only).
//!
//! Eureka has no blocking queries, so every wait here polls (the export plan's
//! `registry_poll` for one application, `registry_poll_all` for `GET /apps`): a change
//! is seen within one poll interval plus the round trip of the answer. The server may also answer from a response cache that
//! lags its registry (the read-only cache, refreshed every 30 s by default); the test
//! environment's server turns that cache off
//! (`eureka.server.use-read-only-response-cache=false`, testenv/eureka), and its
//! read-write cache is invalidated by every registration, status change and cancel, so
//! the next poll after a write sees it.
//!
//! What an instance exposes that tells whether it was written again: its
//! `lastUpdatedTimestamp` (set by the server on a registration and a status change),
//! its `lastDirtyTimestamp` (the client's, sent with a registration) and
//! `leaseInfo.registrationTimestamp`. A lease renewal moves none of them (it moves
//! `leaseInfo.lastRenewalTimestamp`, not read here).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;

/// The metadata key of the connector's ownership (the same key as Consul's meta).
const OWNER_KEY: &str = "registry-connector-id";

/// One of the connector's instances as `GET /apps` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EurekaInstance {
    /// The application (upper-case).
    pub app: String,
    pub ip: String,
    /// `UP`, `OUT_OF_SERVICE`, ...
    pub status: String,
    pub last_updated: Option<i64>,
    pub last_dirty: Option<i64>,
    pub registered: Option<i64>,
}

/// The connector's instances at one read: instance id → instance.
#[derive(Debug, Clone, Default)]
pub struct Owned {
    pub instances: BTreeMap<String, EurekaInstance>,
}

impl Owned {
    /// Instance id → `lastUpdatedTimestamp`.
    pub fn last_updated(&self) -> BTreeMap<String, Option<i64>> {
        self.field(|i| i.last_updated)
    }

    /// Instance id → `lastDirtyTimestamp`.
    pub fn last_dirty(&self) -> BTreeMap<String, Option<i64>> {
        self.field(|i| i.last_dirty)
    }

    /// Instance id → `leaseInfo.registrationTimestamp`.
    pub fn registered(&self) -> BTreeMap<String, Option<i64>> {
        self.field(|i| i.registered)
    }

    fn field(&self, f: impl Fn(&EurekaInstance) -> Option<i64>) -> BTreeMap<String, Option<i64>> {
        self.instances
            .iter()
            .map(|(id, i)| (id.clone(), f(i)))
            .collect()
    }

    /// How many are not `UP`.
    pub fn not_up(&self) -> usize {
        self.instances.values().filter(|i| i.status != "UP").count()
    }
}

/// Eureka as the export workload reads it, for one connector id.
#[derive(Debug, Clone)]
pub struct ExportEureka {
    /// `http://127.0.0.1:PORT/eureka`, no trailing slash.
    url: String,
    http: reqwest::Client,
    connector_id: String,
    /// Interval of the polls of one application (flips) and of `GET /apps`.
    pub poll: Duration,
    pub poll_all: Duration,
}

/// Eureka's JSON gives a one-element list as the element itself: both become a list.
fn list(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(items) => items.iter().collect(),
        Value::Object(_) => vec![v],
        _ => Vec::new(),
    }
}

/// A timestamp that Eureka writes as a string or a number.
fn stamp(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

/// The instances of connector `id` in the `application` objects `apps`.
fn owned_in(apps: &[&Value], id: &str) -> Owned {
    let mut instances = BTreeMap::new();
    for app in apps {
        let name = app["name"].as_str().unwrap_or_default();
        for i in list(&app["instance"]) {
            if i["metadata"][OWNER_KEY].as_str() != Some(id) {
                continue;
            }
            let Some(iid) = i["instanceId"].as_str() else {
                continue;
            };
            instances.insert(
                iid.to_string(),
                EurekaInstance {
                    app: name.to_string(),
                    ip: i["ipAddr"].as_str().unwrap_or_default().to_string(),
                    status: i["status"].as_str().unwrap_or_default().to_string(),
                    last_updated: stamp(&i["lastUpdatedTimestamp"]),
                    last_dirty: stamp(&i["lastDirtyTimestamp"]),
                    registered: stamp(&i["leaseInfo"]["registrationTimestamp"]),
                },
            );
        }
    }
    Owned { instances }
}

impl ExportEureka {
    /// `url` is the server's API base (`http://127.0.0.1:PORT/eureka`); `connector_id`
    /// the connector's `--connector-id`, the only instances read or removed.
    pub fn new(url: &str, connector_id: &str, poll: Duration, poll_all: Duration) -> Result<Self> {
        let url = url.trim_end_matches('/').to_string();
        if !(url.starts_with("http://127.") || url.starts_with("http://localhost")) {
            anyhow::bail!("the benchmark only talks to a Eureka server on the loopback, not {url}");
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(4)
            .no_proxy()
            .build()
            .context("building the Eureka HTTP client")?;
        Ok(Self {
            url,
            http,
            connector_id: connector_id.into(),
            poll,
            poll_all,
        })
    }

    /// `GET path` as JSON; `None` on 404 (an application that does not exist).
    async fn get(&self, path: &str) -> Result<Option<Value>> {
        let resp = self
            .http
            .get(format!("{}{path}", self.url))
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = resp
            .error_for_status()
            .with_context(|| format!("GET {path}"))?;
        Ok(Some(
            resp.json()
                .await
                .with_context(|| format!("decoding GET {path}"))?,
        ))
    }

    /// The connector's instances in `GET /apps`.
    pub async fn owned(&self) -> Result<Owned> {
        let doc = self.get("/apps").await?.unwrap_or(Value::Null);
        Ok(owned_in(
            &list(&doc["applications"]["application"]),
            &self.connector_id,
        ))
    }

    /// Polls `GET /apps` until it shows at least `want` of the connector's instances,
    /// all `UP`; returns when the answer that showed it arrived, and that state.
    pub async fn wait_registered(
        &self,
        want: usize,
        deadline: Instant,
    ) -> Result<(Instant, Owned)> {
        loop {
            let state = self.owned().await?;
            let at = Instant::now();
            let count = state.instances.len();
            if count >= want && state.not_up() == 0 {
                return Ok((at, state));
            }
            if at > deadline {
                anyhow::bail!(
                    "Eureka holds {count} of the {want} instances of connector {} ({} not UP) at the deadline",
                    self.connector_id,
                    state.not_up()
                );
            }
            tokio::time::sleep(self.poll_all).await;
        }
    }

    /// The status of the connector's instance at `ip` of `service` (`GET /apps/<APP>`);
    /// `None` when absent.
    pub async fn instance_status(&self, service: &str, ip: &str) -> Result<Option<String>> {
        let app = service.to_uppercase();
        let Some(doc) = self.get(&format!("/apps/{app}")).await? else {
            return Ok(None);
        };
        let owned = owned_in(&[&doc["application"]], &self.connector_id);
        Ok(owned
            .instances
            .into_values()
            .find(|i| i.ip == ip)
            .map(|i| i.status))
    }

    /// Polls the instance at `ip` of `service` until its status is `want` (`None`:
    /// absent) or `deadline`; returns when the answer that showed it arrived.
    pub async fn wait_status(
        &self,
        service: &str,
        ip: &str,
        want: Option<&str>,
        deadline: Instant,
    ) -> Result<Option<Instant>> {
        while Instant::now() < deadline {
            let status = self.instance_status(service, ip).await?;
            if status.as_deref() == want {
                return Ok(Some(Instant::now()));
            }
            tokio::time::sleep(self.poll).await;
        }
        Ok(None)
    }

    /// Cancels every instance of the connector still registered (`DELETE
    /// /apps/<APP>/<id>`, 8 at a time); returns how many. A 404 (gone meanwhile) counts
    /// as done. Nothing without the connector's id is touched.
    pub async fn cancel_owned(&self) -> Result<usize> {
        let owned = self.owned().await?;
        let count = owned.instances.len();
        futures::stream::iter(owned.instances)
            .map(|(id, i)| async move {
                let path = format!("/apps/{}/{id}", i.app);
                let resp = self
                    .http
                    .delete(format!("{}{path}", self.url))
                    .send()
                    .await
                    .with_context(|| format!("DELETE {path}"))?;
                if resp.status() != reqwest::StatusCode::NOT_FOUND {
                    resp.error_for_status()
                        .with_context(|| format!("DELETE {path}"))?;
                }
                anyhow::Ok(())
            })
            .buffer_unordered(8)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_only_the_connectors_instances_and_their_stamps() {
        let doc = json!({"applications": {"application": [
            {"name": "WEB", "instance": [
                {"instanceId": "a", "ipAddr": "192.0.2.1", "status": "UP",
                 "lastUpdatedTimestamp": "1700000000001", "lastDirtyTimestamp": "1700000000000",
                 "leaseInfo": {"registrationTimestamp": 1700000000002_i64},
                 "metadata": {"registry-connector-id": "bench-1"}},
                {"instanceId": "vm", "ipAddr": "192.0.2.9", "status": "UP",
                 "metadata": {"registry-connector-id": "other"}},
            ]},
            {"name": "API", "instance": {"instanceId": "b", "ipAddr": "198.51.100.1",
             "status": "OUT_OF_SERVICE", "metadata": {"registry-connector-id": "bench-1"}}},
        ]}});
        let o = owned_in(&list(&doc["applications"]["application"]), "bench-1");
        assert_eq!(o.instances.len(), 2);
        assert_eq!(o.instances["a"].app, "WEB");
        assert_eq!(o.instances["a"].last_updated, Some(1_700_000_000_001));
        assert_eq!(o.instances["a"].last_dirty, Some(1_700_000_000_000));
        assert_eq!(o.instances["a"].registered, Some(1_700_000_000_002));
        assert_eq!(o.instances["b"].last_dirty, None);
        assert_eq!(o.not_up(), 1);
        assert_eq!(o.last_updated().len(), 2);
    }

    #[test]
    fn only_loopback_servers() {
        assert!(ExportEureka::new(
            "http://192.0.2.1:8761/eureka",
            "x",
            Duration::ZERO,
            Duration::ZERO
        )
        .is_err());
        assert!(ExportEureka::new(
            "http://127.0.0.1:8761/eureka/",
            "x",
            Duration::ZERO,
            Duration::ZERO
        )
        .is_ok());
    }
}
