//! Counters the figures are computed from: a scrape of the connector's `/metrics`
//! (writes, registry requests, Eureka full reads) and the apiserver's own request
//! counters. Every figure is a difference between two scrapes.

use std::collections::{BTreeMap, HashMap};

/// A scrape of the connector's `/metrics`: series (name plus label text) to value, and
/// the registry (`source` label) the connector reads.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    series: HashMap<String, f64>,
    source: String,
}

const WRITES: &str = "registry_connector_kubernetes_writes_total";
const REQUESTS: &str = "registry_connector_registry_requests_total";
/// The Consul request counter of connectors older than `REQUESTS` (for `--connector-bin`).
const OLD_CONSUL_REQUESTS: &str = "registry_connector_consul_requests_total";
const EUREKA_FULL_FETCHES: &str = "registry_connector_eureka_full_fetches_total";
/// The Kubernetes → registry direction: instance writes by op, and the engine's
/// requests by kind (`read` of what it owns, `write` batches).
const EXPORT_WRITES: &str = "registry_connector_export_writes_total";
const EXPORT_REQUESTS: &str = "registry_connector_export_requests_total";
/// The Kubernetes → Eureka writer: instances registered again after a renewal's 404.
const EUREKA_REREGISTRATIONS: &str = "registry_connector_eureka_reregistrations_total";

impl Metrics {
    /// Parses the text format; `source` is the connector's registry (`consul`, `eureka`).
    pub fn parse(text: &str, source: &str) -> Metrics {
        let mut series = HashMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            // `name{labels} value` or `name value`; label values never hold "} " here.
            let (key, value) = match line.rfind(' ') {
                Some(i) => (&line[..i], &line[i + 1..]),
                None => continue,
            };
            if let Ok(v) = value.parse::<f64>() {
                series.insert(key.to_string(), v);
            }
        }
        Metrics {
            series,
            source: source.to_string(),
        }
    }

    /// The registry (`source` label) the connector reads or writes.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Eureka writer: instances registered again because a renewal found them gone.
    pub fn eureka_reregistrations(&self) -> f64 {
        self.sum(EUREKA_REREGISTRATIONS, &[])
    }

    /// Sum of every series of metric `name` whose labels contain all of `labels`
    /// (`key="value"` pairs).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.series
            .iter()
            .filter(|(k, _)| {
                let (n, l) = match k.find('{') {
                    Some(i) => (&k[..i], &k[i..]),
                    None => (k.as_str(), ""),
                };
                n == name
                    && labels
                        .iter()
                        .all(|(lk, lv)| l.contains(&format!("{lk}=\"{lv}\"")))
            })
            .map(|(_, v)| v)
            .fold(0.0, |a, b| a + b)
    }

    /// Successful Kubernetes writes.
    pub fn writes(&self) -> f64 {
        self.sum(WRITES, &[("result", "success")])
    }

    /// Kubernetes writes whatever their result.
    pub fn writes_all(&self) -> f64 {
        self.sum(WRITES, &[])
    }

    /// Successful writes of one kind (`service`, `endpointslice`, `endpoints`).
    pub fn writes_of(&self, kind: &str) -> f64 {
        self.sum(WRITES, &[("kind", kind), ("result", "success")])
    }

    /// Writes the apiserver did not accept, by `"<kind> <verb> <result>"` (result
    /// `conflict` or `error`): what the "failed" figures are made of.
    pub fn failed_writes(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (key, v) in &self.series {
            if !key.starts_with(&format!("{WRITES}{{")) {
                continue;
            }
            let label = |name: &str| label_value(key, name).unwrap_or_default();
            let result = label("result");
            if result != "success" && *v > 0.0 {
                let k = format!("{} {} {result}", label("kind"), label("verb"));
                *out.entry(k).or_insert(0.0) += v;
            }
        }
        out
    }

    /// Requests to the registry matching `labels` (`endpoint`, `result`).
    fn requests_where(&self, labels: &[(&str, &str)]) -> f64 {
        let mut with_source = vec![("source", self.source.as_str())];
        with_source.extend_from_slice(labels);
        let old = if self.source == "consul" {
            self.sum(OLD_CONSUL_REQUESTS, labels)
        } else {
            0.0
        };
        self.sum(REQUESTS, &with_source) + old
    }

    /// Registry requests, all endpoints and results.
    pub fn registry_requests(&self) -> f64 {
        self.requests_where(&[])
    }

    /// Registry requests that failed (no answer, error status).
    pub fn registry_errors(&self) -> f64 {
        self.requests_where(&[("result", "error")])
    }

    /// Registry requests to one endpoint (Consul: `txn`, `catalog_node`, ...).
    pub fn registry_requests_to(&self, endpoint: &str) -> f64 {
        self.requests_where(&[("endpoint", endpoint)])
    }

    /// Export direction: instance writes (register, health, deregister), any result.
    pub fn export_writes(&self) -> f64 {
        self.sum(EXPORT_WRITES, &[])
    }

    /// Export direction: write batches sent to the registry, any result.
    pub fn export_write_requests(&self) -> f64 {
        self.sum(EXPORT_REQUESTS, &[("kind", "write")])
    }

    /// Registry requests, by `endpoint` label (Consul: `catalog_services`,
    /// `health_service`; Eureka: `apps`, `apps_delta`).
    pub fn registry_requests_by_endpoint(&self) -> BTreeMap<String, f64> {
        let mut endpoints = self.label_values(REQUESTS, "endpoint", Some(&self.source));
        if self.source == "consul" {
            endpoints.extend(self.label_values(OLD_CONSUL_REQUESTS, "endpoint", None));
        }
        endpoints
            .into_iter()
            .map(|e| {
                let v = self.requests_where(&[("endpoint", &e)]);
                (e, v)
            })
            .collect()
    }

    /// Eureka's whole-registry reads by reason (`start`, `hash_mismatch`, `gap`,
    /// `periodic`, `deltas_refused`); empty for other sources.
    pub fn full_fetches(&self) -> BTreeMap<String, f64> {
        self.label_values(EUREKA_FULL_FETCHES, "reason", Some(&self.source))
            .into_iter()
            .map(|r| {
                let v = self.sum(EUREKA_FULL_FETCHES, &[("reason", &r)]);
                (r, v)
            })
            .collect()
    }

    pub fn reconciles(&self) -> f64 {
        self.sum("registry_connector_reconciles_total", &[])
    }

    pub fn managed_services(&self) -> f64 {
        self.sum("registry_connector_managed_services", &[])
    }

    /// The label values seen for `label` on metric `name` (optionally only on series
    /// whose `source` is `source`).
    fn label_values(&self, name: &str, label: &str, source: Option<&str>) -> Vec<String> {
        let source = source.map(|s| format!("source=\"{s}\""));
        let mut out: Vec<String> = self
            .series
            .keys()
            .filter(|k| k.starts_with(&format!("{name}{{")))
            .filter(|k| source.as_ref().is_none_or(|s| k.contains(s.as_str())))
            .filter_map(|k| label_value(k, label))
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// The value of `key="..."` in a series' label text.
fn label_value(series: &str, key: &str) -> Option<String> {
    let pat = format!("{key}=\"");
    let i = series.find(&pat)? + pat.len();
    let j = series[i..].find('"')?;
    Some(series[i..i + j].to_string())
}

/// `after - before` per key, keeping the entries that moved.
pub fn delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect()
}

/// The apiserver's own request counters (`apiserver_request_total`), summed by verb and
/// resource: what a workload asked of the apiserver, whoever asked. Empty when the
/// scrape fails (a side figure).
pub async fn apiserver_requests(client: &kube::Client) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(req) = kube::core::Request::new("/metrics").list(&Default::default()) else {
        return out;
    };
    let Ok(text) = client.request_text(req).await else {
        return out;
    };
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let (Some(verb), Some(resource)) =
            (label_value(rest, "verb"), label_value(rest, "resource"))
        else {
            continue;
        };
        let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        *out.entry(format!("{verb} {resource}")).or_insert(0.0) += v;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openmetrics_text() {
        let text = "# HELP x y\n\
            registry_connector_kubernetes_writes_total{kind=\"service\",verb=\"create\",result=\"success\"} 3\n\
            registry_connector_kubernetes_writes_total{kind=\"endpointslice\",verb=\"apply\",result=\"success\"} 2\n\
            registry_connector_kubernetes_writes_total{kind=\"endpointslice\",verb=\"apply\",result=\"error\"} 1\n\
            registry_connector_managed_services 7\n# EOF\n";
        let m = Metrics::parse(text, "consul");
        assert_eq!(m.writes(), 5.0);
        assert_eq!(m.writes_all(), 6.0);
        assert_eq!(m.writes_of("endpointslice"), 2.0);
        assert_eq!(m.managed_services(), 7.0);
        assert_eq!(
            m.failed_writes(),
            BTreeMap::from([("endpointslice apply error".to_string(), 1.0)])
        );
    }

    #[test]
    fn counts_only_the_connectors_own_registry() {
        let text = "\
            registry_connector_registry_requests_total{source=\"eureka\",endpoint=\"apps\",result=\"ok\"} 1\n\
            registry_connector_registry_requests_total{source=\"eureka\",endpoint=\"apps_delta\",result=\"ok\"} 40\n\
            registry_connector_registry_requests_total{source=\"eureka\",endpoint=\"apps_delta\",result=\"error\"} 2\n\
            registry_connector_registry_requests_total{source=\"consul\",endpoint=\"health_service\",result=\"ok\"} 9\n\
            registry_connector_eureka_full_fetches_total{source=\"eureka\",reason=\"start\"} 1\n\
            registry_connector_eureka_full_fetches_total{source=\"eureka\",reason=\"hash_mismatch\"} 0\n";
        let m = Metrics::parse(text, "eureka");
        assert_eq!(m.registry_requests(), 43.0);
        assert_eq!(m.registry_errors(), 2.0);
        assert_eq!(
            m.registry_requests_by_endpoint(),
            BTreeMap::from([("apps".into(), 1.0), ("apps_delta".into(), 42.0)])
        );
        assert_eq!(
            m.full_fetches(),
            BTreeMap::from([("hash_mismatch".into(), 0.0), ("start".into(), 1.0)])
        );
        let c = Metrics::parse(text, "consul");
        assert_eq!(c.registry_requests(), 9.0);
        assert!(c.full_fetches().is_empty());
    }

    #[test]
    fn export_counters() {
        let text = "\
            registry_connector_registry_requests_total{source=\"consul\",endpoint=\"txn\",result=\"ok\"} 3\n\
            registry_connector_registry_requests_total{source=\"consul\",endpoint=\"catalog_node\",result=\"ok\"} 5\n\
            registry_connector_export_writes_total{registry=\"consul\",op=\"register\",result=\"success\"} 60\n\
            registry_connector_export_writes_total{registry=\"consul\",op=\"health\",result=\"success\"} 2\n\
            registry_connector_export_requests_total{registry=\"consul\",kind=\"write\",result=\"success\"} 3\n\
            registry_connector_export_requests_total{registry=\"consul\",kind=\"read\",result=\"success\"} 1\n";
        let m = Metrics::parse(text, "consul");
        assert_eq!(m.registry_requests_to("txn"), 3.0);
        assert_eq!(m.registry_requests(), 8.0);
        assert_eq!(m.export_writes(), 62.0);
        assert_eq!(m.export_write_requests(), 3.0);
        let e = Metrics::parse(
            "registry_connector_registry_requests_total{source=\"eureka\",endpoint=\"heartbeat\",result=\"ok\"} 4\n\
             registry_connector_eureka_reregistrations_total 2\n",
            "eureka",
        );
        assert_eq!(e.source(), "eureka");
        assert_eq!(e.registry_requests_to("heartbeat"), 4.0);
        assert_eq!(e.eureka_reregistrations(), 2.0);
    }

    #[test]
    fn delta_keeps_what_moved() {
        let a = BTreeMap::from([("x".to_string(), 1.0), ("y".to_string(), 2.0)]);
        let b = BTreeMap::from([
            ("x".to_string(), 1.0),
            ("y".to_string(), 5.0),
            ("z".to_string(), 1.0),
        ]);
        assert_eq!(
            delta(&a, &b),
            BTreeMap::from([("y".to_string(), 3.0), ("z".to_string(), 1.0)])
        );
    }
}
