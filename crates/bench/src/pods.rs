//! The Kubernetes side of the export workload: a Node object, N selector Services and
//! M Pods each, bound to that Node, whose IP and readiness the harness sets through the
//! status subresource. There is no kubelet and no scheduler: the real
//! kube-controller-manager turns these Pods into EndpointSlices, which is what the
//! connector exports (as in `crates/registry-connector/tests/common/export.rs`).
//!
//! Addresses come from the three IPv4 documentation ranges (RFC 5737) and are never
//! contacted. Pod `j` of Service `i` is the `p = i × M + j`-th Pod of the set and gets
//! `RANGE[p % 3].(1 + (p / 3) % 249)`: unique in the namespace while N × M ≤ 747,
//! reused by other Services beyond (Kubernetes does not require Pod IPs to be unique,
//! and the connector's instance ids include the Service), and always distinct within
//! one Service while M ≤ 747. IPv6 (2001:db8::/32) is not an option here, although the
//! connector exports IPv6 endpoints: the test cluster is IPv4 single-stack
//! (`--service-cluster-ip-range` 10.96.0.0/16), the apiserver refuses a Service with
//! `ipFamilies: [IPv6]`, headless or not ("not configured on this cluster"), and the
//! controller-manager builds only IPv4 slices for an IPv4 Service.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod, Service, ServiceAccount};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::model::RANGES;

/// Host parts used per range (`.250` and above stay free, as in [`crate::model`]).
const HOSTS_PER_RANGE: usize = 249;
/// Addresses before they repeat across Services.
pub const UNIQUE_ADDRESSES: usize = HOSTS_PER_RANGE * RANGES.len();
/// The Pods' container port, the Services' target port (what Consul registers).
pub const TARGET_PORT: i32 = 8080;

/// One Pod of the set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub name: String,
    pub ip: String,
    pub ready: bool,
}

/// One selector Service and its Pods.
#[derive(Debug, Clone)]
pub struct ExportService {
    /// The Kubernetes name, also the Consul service name (no prefix, no suffix).
    pub name: String,
    pub pods: Vec<PodSpec>,
}

impl ExportService {
    /// The addresses of its ready Pods (what its EndpointSlices should show ready).
    pub fn ready_ips(&self) -> BTreeSet<String> {
        self.pods
            .iter()
            .filter(|p| p.ready)
            .map(|p| p.ip.clone())
            .collect()
    }
}

/// The address of the `p`-th Pod of a set.
pub fn pod_ip(p: usize) -> String {
    let r = p % RANGES.len();
    let host = 1 + (p / RANGES.len()) % HOSTS_PER_RANGE;
    format!("{}.{host}", RANGES[r])
}

/// N Services named `<prefix>-NNNNN` with M ready Pods each.
pub fn data_set(prefix: &str, n: usize, m: usize) -> Vec<ExportService> {
    (0..n)
        .map(|i| {
            let name = format!("{prefix}-{i:05}");
            let pods = (0..m)
                .map(|j| PodSpec {
                    name: format!("{name}-{j}"),
                    ip: pod_ip(i * m + j),
                    ready: true,
                })
                .collect();
            ExportService { name, pods }
        })
        .collect()
}

/// The Node object every Pod is bound to: the controller-manager skips Pods whose Node
/// it does not know. Nothing runs on it, and no controller that watches heartbeats
/// (node lifecycle) runs in the test environment.
pub async fn create_node(client: &Client, name: &str) -> Result<()> {
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "zone-a"}},
    }))?;
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .with_context(|| format!("creating Node {name}"))?;
    Ok(())
}

/// Deletes the Node object (cluster-scoped: it outlives the namespace).
pub async fn delete_node(client: &Client, name: &str) -> Result<()> {
    match Api::<Node>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting Node {name}")),
    }
}

/// Deletes every Pod of `ns` at once (grace period 0). A Pod bound to a Node waits for
/// its kubelet to confirm a graceful deletion, and there is none: without this the
/// namespace would stay `Terminating` (its controller retries with backoff).
pub async fn force_delete_pods(client: &Client, ns: &str) -> Result<()> {
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::background()
    };
    match Api::<Pod>::namespaced(client.clone(), ns)
        .delete_collection(&params, &ListParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting the Pods of {ns}")),
    }
}

/// Waits until the namespace's `default` ServiceAccount exists: Pod admission rejects
/// Pods until the controller-manager has created it.
pub async fn wait_service_account(client: &Client, ns: &str, timeout: Duration) -> Result<()> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + timeout;
    loop {
        if api.get_opt("default").await?.is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no default ServiceAccount in {ns} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn service(name: &str) -> Result<Service> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": TARGET_PORT}],
        },
    }))?)
}

fn pod(app: &str, pod: &PodSpec, node: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": pod.name, "labels": {"app": app}},
        "spec": {
            "nodeName": node,
            "containers": [{
                "name": "app",
                "image": "example.invalid/app:1",
                "ports": [{"containerPort": TARGET_PORT, "name": "http"}],
            }],
        },
    }))?)
}

/// The status a kubelet would report: running at `ip`, ready or not. A merge patch
/// replaces the whole `conditions` list.
fn status_patch(ip: &str, ready: bool) -> serde_json::Value {
    let status = if ready { "True" } else { "False" };
    json!({"status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [
            {"type": "Ready", "status": status},
            {"type": "ContainersReady", "status": status},
        ],
    }})
}

/// Sets one Pod's status (IP and readiness) through the status subresource.
pub async fn set_status(pods: &Api<Pod>, name: &str, ip: &str, ready: bool) -> Result<()> {
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(&status_patch(ip, ready)),
    )
    .await
    .with_context(|| format!("setting the status of Pod {name}"))?;
    Ok(())
}

/// Writes the set into `ns`, `concurrency` Services at a time: per Service the Service,
/// then each Pod (create, then its status). Returns the number of writes.
pub async fn create_all(
    client: &Client,
    ns: &str,
    node: &str,
    set: &[ExportService],
    concurrency: usize,
) -> Result<usize> {
    let pp = PostParams::default();
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    futures::stream::iter(set)
        .map(|s| {
            let (services, pods, pp) = (&services, &pods, &pp);
            async move {
                services
                    .create(pp, &service(&s.name)?)
                    .await
                    .with_context(|| format!("creating Service {}", s.name))?;
                for p in &s.pods {
                    pods.create(pp, &pod(&s.name, p, node)?)
                        .await
                        .with_context(|| format!("creating Pod {}", p.name))?;
                    set_status(pods, &p.name, &p.ip, p.ready).await?;
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    Ok(set.iter().map(|s| 1 + 2 * s.pods.len()).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_unique_up_to_747_and_distinct_within_a_service() {
        let all: BTreeSet<String> = (0..UNIQUE_ADDRESSES).map(pod_ip).collect();
        assert_eq!(all.len(), UNIQUE_ADDRESSES);
        assert_eq!(pod_ip(0), "192.0.2.1");
        assert_eq!(pod_ip(4), "198.51.100.2");
        assert_eq!(pod_ip(746), "203.0.113.249");
        assert_eq!(pod_ip(747), pod_ip(0));
        let set = data_set("e1", 1000, 3);
        assert!(set.iter().all(|s| s.ready_ips().len() == 3));
        assert_eq!(set[999].name, "e1-00999");
        assert_eq!(set[999].pods[2].name, "e1-00999-2");
    }

    #[test]
    fn the_status_patch_carries_ip_and_both_conditions() {
        let p = status_patch("192.0.2.7", false);
        assert_eq!(p["status"]["podIPs"][0]["ip"], "192.0.2.7");
        assert_eq!(p["status"]["conditions"][0]["status"], "False");
        assert_eq!(p["status"]["conditions"][1]["type"], "ContainersReady");
    }
}
