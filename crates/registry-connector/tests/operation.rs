//! Production operation against the real control plane and Consul, with the real binary
//! as a child process: the connector running as the unprivileged identity of `deploy/`,
//! leader election between two processes, `/metrics` and `/readyz`, `--dry-run`, and
//! `purge`.
//!
//! Each test isolates itself: its own namespaces (sync namespace, and the connector's
//! own namespace for the Lease), its own `--filter-tag` and service names, its own
//! Lease name, its own connector id where it matters.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use common::process::{free_port, run_once, Connector};
use common::WAIT;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::{SelfSubjectReview, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Endpoints, Event, Secret, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::NamespaceResourceScope;
use kube::api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use prometheus_parse::{LineInfo, SampleType, Scrape};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use testenv::consul::ConsulClient;
use testenv::{unique_name, wait_for, TestEnv};

// ------------------------------------------------------------------ Consul

/// The test's own slice of the shared Consul agent: every instance it registers carries
/// the test's filter tag, and is deregistered when the value drops (even after a failed
/// assertion), so the agent does not accumulate entries across runs.
struct Registry {
    consul: ConsulClient,
    tag: String,
    registered: BTreeSet<String>,
}

impl Registry {
    fn new(env: &TestEnv) -> Result<Self> {
        Ok(Self {
            consul: ConsulClient::new(env.consul_addr()?)?,
            tag: unique_name("t"),
            registered: BTreeSet::new(),
        })
    }

    /// Registers instance `id` of `name` with a passing TTL check (never an active
    /// check: the addresses are documentation ranges and are never contacted).
    async fn register(&mut self, id: &str, name: &str, addr: &str, port: u16) -> Result<()> {
        self.consul
            .put(
                "/v1/agent/service/register",
                &json!({
                    "ID": id, "Name": name, "Address": addr, "Port": port, "Tags": [self.tag],
                    "Check": {"CheckID": format!("service:{id}"), "TTL": "30m", "Status": "passing"}
                }),
            )
            .await?;
        self.registered.insert(id.to_string());
        Ok(())
    }

    async fn deregister(&mut self, id: &str) -> Result<()> {
        self.consul
            .put(&format!("/v1/agent/service/deregister/{id}"), &json!(null))
            .await?;
        self.registered.remove(id);
        Ok(())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let ids = std::mem::take(&mut self.registered);
        if ids.is_empty() {
            return;
        }
        let consul = self.consul.clone();
        // Drop cannot await and the test's runtime may be going away: deregister from a
        // short-lived runtime on a thread of its own (best effort).
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                for id in ids {
                    let _ = consul
                        .put(&format!("/v1/agent/service/deregister/{id}"), &json!(null))
                        .await;
                }
            });
        })
        .join();
    }
}

// ------------------------------------------------------------------ Kubernetes helpers

/// The addresses in the EndpointSlices of `svc`, sorted; None when the list fails.
async fn slice_addresses(client: &Client, ns: &str, svc: &str) -> Option<Vec<String>> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={svc}"));
    let mut addrs: Vec<String> = api
        .list(&lp)
        .await
        .ok()?
        .items
        .into_iter()
        .flat_map(|s| s.endpoints.into_iter().flat_map(|e| e.addresses))
        .collect();
    addrs.sort();
    Some(addrs)
}

/// Waits until Service `svc` exists and its slices hold exactly `addrs`.
async fn wait_synced(client: &Client, ns: &str, svc: &str, addrs: &[&str]) -> Result<()> {
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let mut want: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    want.sort();
    let want = &want;
    let services = &services;
    wait_for(
        &format!("{ns}/{svc} synced with {want:?}"),
        WAIT,
        || async move {
            services.get_opt(svc).await.ok()??;
            (slice_addresses(client, ns, svc).await.as_ref() == Some(want)).then_some(())
        },
    )
    .await
}

async fn wait_gone(client: &Client, ns: &str, svc: &str) -> Result<()> {
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let services = &services;
    wait_for(&format!("{ns}/{svc} deleted"), WAIT, || async move {
        matches!(services.get_opt(svc).await, Ok(None)).then_some(())
    })
    .await
}

async fn object_names<K>(client: &Client, ns: &str) -> Result<BTreeSet<String>>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|o| o.name_any())
        .collect())
}

/// The HTTP status of a failed API call, or None when it succeeded.
fn status_of<T>(result: &std::result::Result<T, kube::Error>) -> Option<u16> {
    match result {
        Ok(_) => None,
        Err(kube::Error::Api(s)) => Some(s.code),
        Err(_) => Some(0),
    }
}

// ------------------------------------------------------------------ metrics

/// One `/metrics` page, parsed by a real Prometheus text-format parser, with the
/// families' declared types.
struct Metrics {
    scrape: Scrape,
    types: BTreeMap<String, SampleType>,
    text: String,
}

impl Metrics {
    async fn of(c: &Connector) -> Result<Self> {
        let text = c.metrics_text().await?;
        Self::parse(text)
    }

    fn parse(text: String) -> Result<Self> {
        let scrape =
            Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).context("parsing /metrics")?;
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let LineInfo::Type {
                metric_name,
                metric_alias,
                sample_type,
            } = LineInfo::parse(line)
            {
                types.insert(metric_alias.unwrap_or(metric_name), sample_type);
            }
        }
        Ok(Self {
            scrape,
            types,
            text,
        })
    }

    /// Sum of the samples named `name` whose labels include all of `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                _ => 0.0,
            })
            .sum()
    }

    /// Whether any sample is named `name`.
    fn has(&self, name: &str) -> bool {
        self.scrape.samples.iter().any(|s| s.metric == name)
    }

    /// The `+Inf` bucket of histogram `name` (summed over its label sets).
    fn histogram_count(&self, name: &str) -> f64 {
        self.scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter_map(|s| match &s.value {
                prometheus_parse::Value::Histogram(buckets) => buckets
                    .iter()
                    .find(|b| b.less_than.is_infinite())
                    .map(|b| b.count),
                _ => None,
            })
            .sum()
    }

    fn type_of(&self, family: &str) -> Option<SampleType> {
        self.types.get(family).copied()
    }

    /// Successful Kubernetes writes, optionally of one kind and verb.
    fn writes(&self, kind: Option<&str>, verb: Option<&str>) -> f64 {
        let mut labels = vec![("result", "success")];
        if let Some(k) = kind {
            labels.push(("kind", k));
        }
        if let Some(v) = verb {
            labels.push(("verb", v));
        }
        self.sum(WRITES, &labels)
    }

    /// Every write attempt, whatever its result.
    fn write_attempts(&self) -> f64 {
        self.sum(WRITES, &[])
    }

    fn leader(&self) -> f64 {
        self.sum(LEADER, &[])
    }
}

const WRITES: &str = "registry_connector_kubernetes_writes_total";
const LEADER: &str = "registry_connector_leader";

// ------------------------------------------------------------------ deploy/ RBAC

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the crate lives two levels below the repository root")
        .to_path_buf()
}

fn yaml_documents(file: &str) -> Result<Vec<Value>> {
    let path = repo_root().join("deploy").join(file);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let value = Value::deserialize(doc).with_context(|| format!("parsing {file}"))?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// What deploy/'s Deployment runs as: its namespace, sync namespace, ServiceAccount and
/// Lease name, read from the manifest rather than restated.
struct DeployIdentity {
    own_ns: String,
    sync_ns: String,
    service_account: String,
    lease: String,
}

fn deploy_identity() -> Result<DeployIdentity> {
    let docs = yaml_documents("deployment.yaml")?;
    let d = docs
        .iter()
        .find(|o| o["kind"] == "Deployment")
        .context("deployment.yaml holds no Deployment")?;
    let pod = &d["spec"]["template"]["spec"];
    let args: Vec<&str> = pod["containers"][0]["args"]
        .as_array()
        .context("the container has no args")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let flag = |prefix: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(prefix))
            .map(str::to_owned)
            .with_context(|| format!("the Deployment passes no {prefix}..."))
    };
    Ok(DeployIdentity {
        own_ns: d["metadata"]["namespace"]
            .as_str()
            .context("the Deployment has no namespace")?
            .to_owned(),
        sync_ns: flag("--namespace=")?,
        service_account: pod["serviceAccountName"]
            .as_str()
            .context("the Deployment names no ServiceAccount")?
            .to_owned(),
        lease: flag("--lease-name=")?,
    })
}

/// Creates deploy/'s ServiceAccount, Roles and RoleBindings, moved from the manifests'
/// namespaces to the test's (`metadata.namespace` and the RoleBindings' subjects).
async fn apply_deploy_rbac(
    client: &Client,
    who: &DeployIdentity,
    own: &str,
    sync: &str,
) -> Result<()> {
    let map = BTreeMap::from([(who.own_ns.as_str(), own), (who.sync_ns.as_str(), sync)]);
    let relocate = |v: &mut Value| {
        if let Some(to) = v.as_str().and_then(|s| map.get(s)) {
            *v = json!(to);
        }
    };
    let mut created = 0;
    for file in [
        "serviceaccount.yaml",
        "rbac-sync.yaml",
        "rbac-leader-election.yaml",
    ] {
        for mut obj in yaml_documents(file)? {
            relocate(&mut obj["metadata"]["namespace"]);
            if let Some(subjects) = obj["subjects"].as_array_mut() {
                for s in subjects {
                    relocate(&mut s["namespace"]);
                }
            }
            let ns = obj["metadata"]["namespace"]
                .as_str()
                .with_context(|| format!("an object of {file} has no namespace"))?
                .to_owned();
            ensure!(
                ns == own || ns == sync,
                "{file}: an object in namespace {ns}, neither the connector's nor the sync namespace"
            );
            let pp = PostParams::default();
            match obj["kind"].as_str() {
                Some("ServiceAccount") => {
                    let sa: ServiceAccount = serde_json::from_value(obj)?;
                    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
                        .create(&pp, &sa)
                        .await?;
                }
                Some("Role") => {
                    let role: Role = serde_json::from_value(obj)?;
                    Api::<Role>::namespaced(client.clone(), &ns)
                        .create(&pp, &role)
                        .await?;
                }
                Some("RoleBinding") => {
                    let rb: RoleBinding = serde_json::from_value(obj)?;
                    Api::<RoleBinding>::namespaced(client.clone(), &ns)
                        .create(&pp, &rb)
                        .await?;
                }
                other => bail!("{file}: unexpected kind {other:?}"),
            }
            created += 1;
        }
    }
    ensure!(created >= 5, "deploy/ RBAC: only {created} objects");
    Ok(())
}

/// Mints a token for the ServiceAccount with the TokenRequest API and writes a
/// kubeconfig that uses it: the admin kubeconfig's server and CA, nothing else of it.
async fn service_account_kubeconfig(
    env: &TestEnv,
    client: &Client,
    ns: &str,
    sa: &str,
) -> Result<PathBuf> {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            // Empty: the apiserver's own audience.
            audiences: vec![],
            expiration_seconds: Some(3600),
            bound_object_ref: None,
        },
        ..Default::default()
    };
    let minted = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .context("TokenRequest")?;
    let token = minted.status.context("TokenRequest without status")?.token;
    ensure!(!token.is_empty(), "TokenRequest returned an empty token");

    let admin: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(env.kubeconfig())?)?;
    let cluster = &admin["clusters"][0]["cluster"];
    let server = cluster["server"].as_str().context("no server")?;
    let ca = cluster["certificate-authority-data"]
        .as_str()
        .context("no certificate-authority-data")?;
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "testenv", "cluster": {"server": server, "certificate-authority-data": ca}}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": "testenv", "user": sa, "namespace": ns}}],
        "current-context": sa,
    });
    let path = env
        .dir()
        .join(format!("{}.kubeconfig", unique_name("sa-token")));
    std::fs::write(&path, serde_yaml_ng::to_string(&kubeconfig)?)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(path)
}

// ------------------------------------------------------------------ 1. least privilege

#[tokio::test(flavor = "multi_thread")]
async fn runs_as_the_deploy_service_account_and_the_apiserver_refuses_the_rest() -> Result<()> {
    let env = TestEnv::shared();
    let admin = env.client().await?;
    let own = env.namespace("op-rbac-own").await?;
    let sync = env.namespace("op-rbac-sync").await?;
    let other = env.namespace("op-rbac-other").await?;
    let who = deploy_identity()?;
    apply_deploy_rbac(&admin, &who, own.name(), sync.name()).await?;
    let kubeconfig =
        service_account_kubeconfig(env, &admin, own.name(), &who.service_account).await?;
    let sa = testenv::client_from(&kubeconfig).await?;

    // The token authenticates as the ServiceAccount, nothing more.
    let review = Api::<SelfSubjectReview>::all(sa.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await?;
    let user = review.status.and_then(|s| s.user_info).unwrap_or_default();
    assert_eq!(
        user.username.as_deref(),
        Some(
            format!(
                "system:serviceaccount:{}:{}",
                own.name(),
                who.service_account
            )
            .as_str()
        )
    );
    assert!(
        !user
            .groups
            .unwrap_or_default()
            .contains(&"system:masters".to_string()),
        "the token is an admin's"
    );
    // Wait until the Roles' grants are visible to the authorizer (RBAC reads Roles and
    // RoleBindings from informers).
    let sa_services: Api<Service> = Api::namespaced(sa.clone(), sync.name());
    let sa_leases: Api<Lease> = Api::namespaced(sa.clone(), own.name());
    wait_for(
        "the Role's grants to reach the authorizer",
        WAIT,
        || async {
            let listed = sa_services.list(&ListParams::default()).await;
            let lease = sa_leases.get_opt(&who.lease).await;
            (listed.is_ok() && lease.is_ok()).then_some(())
        },
    )
    .await?;

    let mut reg = Registry::new(env)?;
    let names: Vec<String> = (0..3).map(|i| format!("{}-rbac{i}", reg.tag)).collect();
    for (i, name) in names.iter().enumerate() {
        reg.register(
            &format!("{name}-1"),
            name,
            &format!("192.0.2.{}", 60 + i),
            8080,
        )
        .await?;
    }
    let pod_name = format!("{}-7d9c5-x2x4q", who.service_account);
    let connector = Connector::builder(env, sync.name())
        .kubeconfig(&kubeconfig)
        .leader_elect(own.name(), &who.lease)
        // As in the Deployment: the holder identity from the downward API's POD_NAME.
        .env("POD_NAME", &pod_name)
        .args(["--filter-tag", &reg.tag])
        .start()?;

    // Full sync: Services, EndpointSlices and Endpoints of every registry service.
    for (i, name) in names.iter().enumerate() {
        wait_synced(&admin, sync.name(), name, &[&format!("192.0.2.{}", 60 + i)])
            .await
            .with_context(|| format!("log: {}", connector.log_tail()))?;
    }
    connector.wait_ready().await?;
    let endpoints = object_names::<Endpoints>(&admin, sync.name()).await?;
    for name in &names {
        assert!(
            endpoints.contains(name),
            "Endpoints {name} missing: {endpoints:?}"
        );
    }
    // Updates and deletes work under the Role too: a second instance (an EndpointSlice
    // and Endpoints update), and one service of three gone (a delete, below the
    // mass-deletion threshold).
    reg.register(&format!("{}-2", names[0]), &names[0], "192.0.2.70", 8080)
        .await?;
    wait_synced(
        &admin,
        sync.name(),
        &names[0],
        &["192.0.2.60", "192.0.2.70"],
    )
    .await?;
    reg.deregister(&format!("{}-1", names[2])).await?;
    wait_gone(&admin, sync.name(), &names[2]).await?;

    // It holds the Lease in its own namespace under the pod's name.
    let lease = Api::<Lease>::namespaced(admin.clone(), own.name())
        .get(&who.lease)
        .await?;
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some(pod_name.as_str())
    );
    let m = Metrics::of(&connector).await?;
    assert_eq!(m.leader(), 1.0);
    assert_eq!(
        m.sum(WRITES, &[("result", "error")]),
        0.0,
        "a write the Role does not allow? log: {}",
        connector.log_tail()
    );
    let log = std::fs::read_to_string(&connector.log)?.to_lowercase();
    assert!(
        !log.contains("forbidden"),
        "the apiserver refused a request of the connector: the Role is too narrow; log: {}",
        connector.log_tail()
    );

    // The same token, used directly: everything the Role does not grant is refused.
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "not-allowed"},
        "spec": {"ports": [{"port": 80}]},
    }))?;
    let pp = PostParams::default();
    let mut refused = Vec::new();
    let mut check = |what: &str, status: Option<u16>| {
        if status != Some(403) {
            refused.push(format!("{what}: expected 403, got {status:?}"));
        }
    };
    check(
        "create a Service in another namespace",
        status_of(
            &Api::<Service>::namespaced(sa.clone(), other.name())
                .create(&pp, &svc)
                .await,
        ),
    );
    check(
        "create a Service in the connector's own namespace",
        status_of(
            &Api::<Service>::namespaced(sa.clone(), own.name())
                .create(&pp, &svc)
                .await,
        ),
    );
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "not-allowed"}}))?;
    check(
        "create a ConfigMap in the sync namespace",
        status_of(
            &Api::<ConfigMap>::namespaced(sa.clone(), sync.name())
                .create(&pp, &cm)
                .await,
        ),
    );
    check(
        "list Secrets in the connector's own namespace",
        status_of(
            &Api::<Secret>::namespaced(sa.clone(), own.name())
                .list(&ListParams::default())
                .await,
        ),
    );
    check(
        "list Services cluster-wide",
        status_of(
            &Api::<Service>::all(sa.clone())
                .list(&ListParams::default())
                .await,
        ),
    );
    check(
        "delete the Lease",
        status_of(
            &Api::<Lease>::namespaced(sa.clone(), own.name())
                .delete(&who.lease, &Default::default())
                .await,
        ),
    );
    check(
        "read another Lease in its namespace",
        status_of(
            &Api::<Lease>::namespaced(sa.clone(), own.name())
                .get("some-other-lease")
                .await,
        ),
    );
    check(
        "patch a managed Service's status",
        status_of(
            &Api::<Service>::namespaced(sa.clone(), sync.name())
                .patch_status(
                    &names[0],
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {}})),
                )
                .await,
        ),
    );
    assert!(refused.is_empty(), "{}", refused.join("\n"));
    // ...while what it does need still works with that token.
    assert!(
        Api::<Service>::namespaced(sa.clone(), sync.name())
            .get(&names[0])
            .await
            .is_ok(),
        "the token can read the managed Services"
    );

    let status = connector.terminate().await?;
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    let _ = std::fs::remove_file(&kubeconfig);
    Ok(())
}

// ------------------------------------------------------------------ 2. leader election

const LEASE_DURATION: Duration = Duration::from_secs(4);
const RENEW_INTERVAL: Duration = Duration::from_secs(1);
/// The connector's --max-period in tests: the longest a change waits for its batch.
const COALESCING: Duration = Duration::from_millis(500);

fn candidate(
    env: &TestEnv,
    ns: &str,
    lease_ns: &str,
    lease: &str,
    holder: &str,
    tag: &str,
) -> Result<Connector> {
    Connector::builder(env, ns)
        .leader_elect(lease_ns, lease)
        .lease_holder(holder)
        .lease_timing("4s", "1s")
        .args(["--filter-tag", tag])
        .start()
}

fn conn(procs: &[Option<Connector>], i: usize) -> &Connector {
    procs[i].as_ref().expect("running")
}

fn lease_holder(lease: &Lease) -> Option<String> {
    lease.spec.as_ref().and_then(|s| s.holder_identity.clone())
}

fn millis_since_epoch(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_lease_holder_writes_and_a_standby_takes_over_after_a_crash() -> Result<()> {
    let env = TestEnv::shared();
    let client = env.client().await?;
    let ns = env.namespace("op-leader").await?;
    let lease_ns = env.namespace("op-leader-own").await?;
    let lease_name = unique_name("lease");
    let leases: Api<Lease> = Api::namespaced(client.clone(), lease_ns.name());
    let mut reg = Registry::new(env)?;
    let svc = |i: usize| format!("{}-le{i}", reg.tag);
    let (s1, s2, s3, s4) = (svc(1), svc(2), svc(3), svc(4));
    reg.register(&format!("{s1}-1"), &s1, "192.0.2.81", 80)
        .await?;
    reg.register(&format!("{s2}-1"), &s2, "192.0.2.82", 80)
        .await?;

    let holders = [unique_name("rc-a"), unique_name("rc-b")];
    let mut procs: Vec<Option<Connector>> = Vec::new();
    for h in &holders {
        procs.push(Some(candidate(
            env,
            ns.name(),
            lease_ns.name(),
            &lease_name,
            h,
            &reg.tag,
        )?));
    }

    wait_synced(&client, ns.name(), &s1, &["192.0.2.81"]).await?;
    wait_synced(&client, ns.name(), &s2, &["192.0.2.82"]).await?;
    for i in 0..2 {
        conn(&procs, i).wait_ready().await?;
    }
    // Exactly one leader, and it is the Lease's holder.
    let (leader, standby) = wait_for("one leader and one standby", WAIT, || async {
        let a = Metrics::of(conn(&procs, 0)).await.ok()?.leader();
        let b = Metrics::of(conn(&procs, 1)).await.ok()?.leader();
        match (a, b) {
            (x, y) if x == 1.0 && y == 0.0 => Some((0, 1)),
            (x, y) if x == 0.0 && y == 1.0 => Some((1, 0)),
            _ => None,
        }
    })
    .await?;
    let lease = leases.get(&lease_name).await?;
    assert_eq!(lease_holder(&lease).as_ref(), Some(&holders[leader]));
    let transitions_before = lease.spec.as_ref().and_then(|s| s.lease_transitions);

    // Exactly one writes: the leader made every write (3 services... at least a
    // Service, a slice and an Endpoints each), the standby attempted none.
    let ml = Metrics::of(conn(&procs, leader)).await?;
    let ms = Metrics::of(conn(&procs, standby)).await?;
    assert!(
        ml.writes(None, None) >= 6.0,
        "the leader wrote both services: {}",
        ml.writes(None, None)
    );
    assert_eq!(ml.writes(Some("service"), Some("create")), 2.0);
    assert_eq!(
        ms.write_attempts(),
        0.0,
        "the standby wrote; log: {}",
        conn(&procs, standby).log_tail()
    );
    assert_eq!(ms.leader(), 0.0);
    eprintln!(
        "leader election: {} leads with {} writes, {} stands by with 0",
        holders[leader],
        ml.writes(None, None),
        holders[standby]
    );

    // Crash the leader (no lease release), then change the registry at once.
    let killed = procs[leader].take().expect("running");
    killed.kill().await?;
    let killed_at = Instant::now();
    let killed_wall = SystemTime::now();
    reg.register(&format!("{s3}-1"), &s3, "192.0.2.83", 80)
        .await?;
    wait_synced(&client, ns.name(), &s3, &["192.0.2.83"])
        .await
        .with_context(|| format!("standby log: {}", conn(&procs, standby).log_tail()))?;
    let synced_after = killed_at.elapsed();

    let lease = leases.get(&lease_name).await?;
    assert_eq!(lease_holder(&lease).as_ref(), Some(&holders[standby]));
    let spec = lease.spec.clone().unwrap_or_default();
    assert_eq!(
        spec.lease_transitions,
        transitions_before.map(|t| t + 1),
        "one transition"
    );
    let acquired_ms = spec
        .acquire_time
        .as_ref()
        .map(|t| t.0.as_millisecond())
        .context("no acquireTime")?;
    let takeover_ms = acquired_ms - millis_since_epoch(killed_wall);
    let bound = LEASE_DURATION + COALESCING;
    // The standby judges expiry by its own observations (as client-go does, so clock
    // skew does not matter), polling every renew interval: it may see the last renewal
    // up to one interval late, and take over at the poll after expiry. Plus scheduling.
    let slack = 2 * RENEW_INTERVAL + Duration::from_millis(500);
    eprintln!(
        "leader election: SIGKILL of the leader -> lease taken over after {:.2}s, new \
         service synced after {:.2}s (lease duration + coalescing = {:.1}s, slack {:.1}s)",
        takeover_ms as f64 / 1000.0,
        synced_after.as_secs_f64(),
        bound.as_secs_f64(),
        slack.as_secs_f64()
    );
    assert!(
        synced_after <= bound + slack,
        "the change took {synced_after:?} to be synced after the leader died; bound {bound:?} + {slack:?}"
    );
    let mb = Metrics::of(conn(&procs, standby)).await?;
    assert_eq!(mb.leader(), 1.0);
    assert_eq!(
        mb.writes(Some("service"), Some("create")),
        1.0,
        "the new leader created exactly the new service (the others were up to date)"
    );

    // The crashed one comes back under the same identity: it must stand by.
    let restarted_wall = SystemTime::now();
    let restarted = candidate(
        env,
        ns.name(),
        lease_ns.name(),
        &lease_name,
        &holders[leader],
        &reg.tag,
    )?;
    restarted.wait_ready().await?;
    reg.register(&format!("{s4}-1"), &s4, "192.0.2.84", 80)
        .await?;
    wait_synced(&client, ns.name(), &s4, &["192.0.2.84"]).await?;
    // Watch it through two lease durations of the holder's renewals, checking at every
    // poll that it neither leads nor writes.
    let after = millis_since_epoch(restarted_wall) + 2 * LEASE_DURATION.as_millis() as i64;
    let (leases, lease_name, current, r) = (&leases, &lease_name, &holders[standby], &restarted);
    let outcome = wait_for(
        "two lease durations of renewals by the new leader",
        WAIT,
        || async move {
            let m = Metrics::of(r).await.ok()?;
            if m.leader() != 0.0 || m.write_attempts() != 0.0 {
                return Some(Err(format!(
                    "leader gauge {}, {} write attempts",
                    m.leader(),
                    m.write_attempts()
                )));
            }
            let lease = leases.get(lease_name).await.ok()?;
            let renewed = lease.spec.as_ref()?.renew_time.as_ref()?.0.as_millisecond();
            (lease_holder(&lease).as_ref() == Some(current) && renewed >= after).then_some(Ok(()))
        },
    )
    .await?;
    if let Err(e) = outcome {
        bail!(
            "the restarted process did not stay standby: {e}; log: {}",
            restarted.log_tail()
        );
    }
    assert_eq!(
        restarted.readyz().await,
        Some(200),
        "a warm standby is ready"
    );
    assert_eq!(Metrics::of(conn(&procs, standby)).await?.leader(), 1.0);
    Ok(())
}

// ------------------------------------------------------------------ 3. metrics, readiness

/// Forwards every connection accepted on `listener` to `target`.
async fn forward(listener: tokio::net::TcpListener, target: String) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        let target = target.clone();
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

async fn readyz_with_reason(c: &Connector) -> Option<(u16, String)> {
    let resp = reqwest::get(format!("http://{}/readyz", c.admin))
        .await
        .ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.ok()?))
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_parse_and_move_and_readyz_turns_ready_after_the_first_sync() -> Result<()> {
    let env = TestEnv::shared();
    let client = env.client().await?;
    let ns = env.namespace("op-metrics").await?;
    let mut reg = Registry::new(env)?;
    let svc = |i: usize| format!("{}-m{i}", reg.tag);
    let (s1, s2, s3, s4) = (svc(1), svc(2), svc(3), svc(4));
    reg.register(&format!("{s1}-1"), &s1, "192.0.2.91", 80)
        .await?;
    reg.register(&format!("{s2}-1"), &s2, "192.0.2.92", 80)
        .await?;
    reg.register(&format!("{s3}-1"), &s3, "192.0.2.93", 80)
        .await?;

    // Consul is reached through a port that nothing listens on yet: the first registry
    // snapshot cannot be read until the test opens it.
    let port = free_port();
    let connector = Connector::builder(env, ns.name())
        .consul_addr(format!("127.0.0.1:{port}"))
        .args(["--filter-tag", &reg.tag])
        .start()?;
    let c = &connector;
    wait_for(
        "the connector to fail a Consul request",
        WAIT,
        || async move {
            let m = Metrics::of(c).await.ok()?;
            (m.sum(
                "registry_connector_registry_requests_total",
                &[("result", "error")],
            ) >= 1.0)
                .then_some(())
        },
    )
    .await
    .with_context(|| format!("log: {}", connector.log_tail()))?;
    let (status, reason) = readyz_with_reason(&connector)
        .await
        .context("/readyz does not answer")?;
    assert_eq!(status, 503, "not ready before the first sync: {reason}");
    assert!(reason.contains("registry"), "{reason}");
    let before = Metrics::of(&connector).await?;
    assert_eq!(before.writes(None, None), 0.0);
    assert_eq!(
        before.sum("registry_connector_last_sync_timestamp_seconds", &[]),
        0.0
    );
    assert!(object_names::<Service>(&client, ns.name())
        .await?
        .is_empty());

    // Open the way to the real agent.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let proxy = tokio::spawn(forward(listener, env.consul_addr()?.to_string()));
    connector.wait_ready().await?;
    for (name, addr) in [
        (&s1, "192.0.2.91"),
        (&s2, "192.0.2.92"),
        (&s3, "192.0.2.93"),
    ] {
        wait_synced(&client, ns.name(), name, &[addr]).await?;
    }
    assert_eq!(readyz_with_reason(&connector).await.map(|r| r.0), Some(200));

    let m = wait_for("the gauges to catch up", WAIT, || async move {
        let m = Metrics::of(c).await.ok()?;
        (m.sum("registry_connector_managed_services", &[]) == 3.0
            && m.sum("registry_connector_last_sync_timestamp_seconds", &[]) > 0.0)
            .then_some(m)
    })
    .await?;
    // Naming and types as Prometheus expects them.
    for (family, ty) in [
        ("registry_connector_kubernetes_writes", SampleType::Counter),
        ("registry_connector_registry_requests", SampleType::Counter),
        (
            "registry_connector_registry_change_to_write_seconds",
            SampleType::Histogram,
        ),
        ("registry_connector_reconciles", SampleType::Counter),
        (
            "registry_connector_reconcile_duration_seconds",
            SampleType::Histogram,
        ),
        ("registry_connector_managed_services", SampleType::Gauge),
        ("registry_connector_held_deletions", SampleType::Gauge),
        (
            "registry_connector_last_sync_timestamp_seconds",
            SampleType::Gauge,
        ),
        ("registry_connector_leader", SampleType::Gauge),
    ] {
        assert_eq!(m.type_of(family), Some(ty), "type of {family}\n{}", m.text);
    }
    for family in m.types.keys() {
        assert!(
            family.starts_with("registry_connector_"),
            "{family} lacks the registry_connector_ prefix"
        );
    }
    assert!(m.has(WRITES) && m.has("registry_connector_reconciles_total"));
    // The sync's writes: per service a Service, an EndpointSlice and an Endpoints.
    for kind in ["service", "endpointslice", "endpoints"] {
        assert_eq!(
            m.writes(Some(kind), Some("create")),
            3.0,
            "{kind} creates\n{}",
            m.text
        );
    }
    assert_eq!(m.leader(), 1.0, "without election it is always the leader");
    assert_eq!(m.sum("registry_connector_held_deletions", &[]), 0.0);
    let now = millis_since_epoch(SystemTime::now()) as f64 / 1000.0;
    let last_sync = m.sum("registry_connector_last_sync_timestamp_seconds", &[]);
    assert!(
        (now - 120.0..=now + 5.0).contains(&last_sync),
        "last sync {last_sync} vs now {now}"
    );
    assert!(m.histogram_count("registry_connector_reconcile_duration_seconds") >= 3.0);
    assert!(
        m.sum(
            "registry_connector_registry_requests_total",
            &[("result", "ok")]
        ) >= 1.0
    );
    // No per-service labels: no label value anywhere names one of the services.
    for s in &m.scrape.samples {
        for v in s.labels.values() {
            assert!(
                !v.contains(&reg.tag),
                "per-service label on {}: {v}",
                s.metric
            );
        }
    }

    // A new service: the counters move by exactly its three creates.
    reg.register(&format!("{s4}-1"), &s4, "192.0.2.94", 80)
        .await?;
    wait_synced(&client, ns.name(), &s4, &["192.0.2.94"]).await?;
    let consul_before = m.sum(
        "registry_connector_registry_requests_total",
        &[("result", "ok")],
    );
    let reconciles_before = m.sum("registry_connector_reconciles_total", &[]);
    let m2 = wait_for("the counters to move", WAIT, || async move {
        let m = Metrics::of(c).await.ok()?;
        (m.writes(None, Some("create")) >= 12.0).then_some(m)
    })
    .await?;
    for kind in ["service", "endpointslice", "endpoints"] {
        assert_eq!(
            m2.writes(Some(kind), Some("create")),
            4.0,
            "{kind}\n{}",
            m2.text
        );
    }
    assert!(m2.sum("registry_connector_reconciles_total", &[]) > reconciles_before);
    assert!(
        m2.sum(
            "registry_connector_registry_requests_total",
            &[("result", "ok")]
        ) > consul_before
    );

    // A deregistration: the delete counters move.
    reg.deregister(&format!("{s4}-1")).await?;
    wait_gone(&client, ns.name(), &s4).await?;
    let m3 = wait_for("the delete counter to move", WAIT, || async move {
        let m = Metrics::of(c).await.ok()?;
        (m.writes(Some("service"), Some("delete")) == 1.0
            && m.sum("registry_connector_managed_services", &[]) == 3.0)
            .then_some(m)
    })
    .await?;
    assert_eq!(m3.sum(WRITES, &[("result", "error")]), 0.0);
    assert!(m3.writes(None, None) > m2.writes(None, None));

    proxy.abort();
    Ok(())
}

// ------------------------------------------------------------------ 4. dry run

/// Proves that nobody wrote Services, EndpointSlices or Endpoints in a namespace
/// between `start` and `assert_untouched`: watches from the lists' resourceVersions
/// taken at `start`; `assert_untouched` writes a sentinel object of each kind, whose
/// ADDED must be the first event each watch delivers.
struct NoWrites {
    client: Client,
    ns: String,
    versions: [String; 3],
}

impl NoWrites {
    async fn start(client: &Client, ns: &str) -> Result<Self> {
        let lp = ListParams::default();
        let rv = |v: Option<String>| v.context("a list without resourceVersion");
        Ok(Self {
            client: client.clone(),
            ns: ns.to_string(),
            versions: [
                rv(Api::<Service>::namespaced(client.clone(), ns)
                    .list(&lp)
                    .await?
                    .metadata
                    .resource_version)?,
                rv(Api::<EndpointSlice>::namespaced(client.clone(), ns)
                    .list(&lp)
                    .await?
                    .metadata
                    .resource_version)?,
                rv(Api::<Endpoints>::namespaced(client.clone(), ns)
                    .list(&lp)
                    .await?
                    .metadata
                    .resource_version)?,
            ],
        })
    }

    async fn assert_untouched(self) -> Result<()> {
        let sentinel = unique_name("sentinel");
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": sentinel},
            "spec": {"ports": [{"port": 80}]},
        }))?;
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": sentinel},
            "addressType": "IPv4",
            "endpoints": [],
        }))?;
        // Another name than the Service's: the mirroring controller must not copy it.
        let ep: Endpoints =
            serde_json::from_value(json!({"metadata": {"name": format!("{sentinel}-ep")}}))?;
        first_event_is(&self.client, &self.ns, &self.versions[0], svc).await?;
        first_event_is(&self.client, &self.ns, &self.versions[1], slice).await?;
        first_event_is(&self.client, &self.ns, &self.versions[2], ep).await
    }
}

/// Creates `sentinel`, then watches its kind from `rv`: the first event must be the
/// sentinel's ADDED, so nothing of that kind changed in the namespace since `rv`.
async fn first_event_is<K>(client: &Client, ns: &str, rv: &str, sentinel: K) -> Result<()>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug
        + Send
        + 'static,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = sentinel.name_any();
    let kind = K::kind(&());
    api.create(&PostParams::default(), &sentinel).await?;
    let mut events = api
        .watch(&WatchParams::default().timeout(30), rv)
        .await?
        .boxed();
    let first = tokio::time::timeout(WAIT, events.try_next())
        .await
        .with_context(|| format!("no {kind} event in {ns}"))??;
    match first {
        Some(WatchEvent::Added(o)) if o.name_any() == name => Ok(()),
        other => {
            let seen = match other {
                Some(WatchEvent::Added(o)) => format!("ADDED {}", o.name_any()),
                Some(WatchEvent::Modified(o)) => format!("MODIFIED {}", o.name_any()),
                Some(WatchEvent::Deleted(o)) => format!("DELETED {}", o.name_any()),
                Some(WatchEvent::Bookmark(_)) => "a bookmark".to_string(),
                Some(WatchEvent::Error(e)) => format!("error {e:?}"),
                None => "the end of the watch".to_string(),
            };
            bail!("{kind} in {ns} changed before the sentinel {name} was written: {seen}")
        }
    }
}

/// `registry-connector consul --dry-run` (plus `extra`) with the admin identity; its
/// stdout.
async fn dry_run(env: &TestEnv, ns: &str, tag: &str, extra: &[&str]) -> Result<String> {
    let kubeconfig = env.kubeconfig().to_string_lossy().into_owned();
    let mut args = vec![
        "consul",
        "--kubeconfig",
        &kubeconfig,
        "--namespace",
        ns,
        "--consul-http-addr",
        env.consul_addr()?,
        "--filter-tag",
        tag,
        "--admin-addr",
        "off",
        "--leader-elect=false",
        "--dry-run",
    ];
    args.extend_from_slice(extra);
    let out = run_once(&args, Duration::from_secs(60)).await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "dry run failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// The plan's `verb kind name` lines.
fn plan_lines(stdout: &str) -> BTreeSet<(String, String, String)> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let verb = words.next()?;
            if !matches!(verb, "create" | "update" | "delete") {
                return None;
            }
            let kind = words.next()?;
            let name = words.next()?;
            words
                .next()
                .is_none()
                .then(|| (verb.to_string(), kind.to_string(), name.to_string()))
        })
        .collect()
}

fn planned(plan: &BTreeSet<(String, String, String)>, verb: &str, kind: &str, name: &str) -> bool {
    plan.iter().any(|(v, k, n)| {
        v == verb
            && k == kind
            && if kind == "endpointslice" {
                n.starts_with(&format!("{name}-"))
            } else {
                n == name
            }
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_prints_the_plan_and_the_apiserver_sees_no_write() -> Result<()> {
    let env = TestEnv::shared();
    let client = env.client().await?;
    let ns = env.namespace("op-dryrun").await?;
    let mut reg = Registry::new(env)?;
    let svc = |i: usize| format!("{}-d{i}", reg.tag);
    let (a, b, c, d) = (svc(1), svc(2), svc(3), svc(4));
    reg.register(&format!("{a}-1"), &a, "192.0.2.101", 80)
        .await?;
    reg.register(&format!("{a}-2"), &a, "192.0.2.102", 80)
        .await?;
    reg.register(&format!("{b}-1"), &b, "192.0.2.103", 80)
        .await?;
    reg.register(&format!("{c}-1"), &c, "192.0.2.104", 80)
        .await?;

    // 1. An empty namespace: everything is to be created.
    let untouched = NoWrites::start(&client, ns.name()).await?;
    let stdout = dry_run(env, ns.name(), &reg.tag, &[]).await?;
    eprintln!("dry run on an empty namespace:\n{stdout}");
    let plan = plan_lines(&stdout);
    for name in [&a, &b, &c] {
        for kind in ["service", "endpointslice", "endpoints"] {
            assert!(
                planned(&plan, "create", kind, name),
                "create {kind} {name}:\n{stdout}"
            );
        }
    }
    assert_eq!(plan.len(), 9, "{stdout}");
    assert!(
        stdout.contains(&format!("Plan for namespace {}", ns.name()))
            && stdout.contains("9 to create, 0 to update, 0 to delete"),
        "{stdout}"
    );
    untouched.assert_untouched().await?;
    // Only the connector's own Events count: the control plane may record its own about
    // the sentinel objects `NoWrites` creates (the apiserver's ClusterIP repair loop can
    // report a "not allocated" Service when its periodic pass races the creation).
    let events = Api::<Event>::namespaced(client.clone(), ns.name())
        .list(&ListParams::default())
        .await?
        .items;
    let ours: Vec<_> = events
        .iter()
        .filter(|e| e.reporting_component.as_deref() == Some("registry-connector"))
        .map(|e| (&e.reason, &e.message))
        .collect();
    assert!(ours.is_empty(), "the dry run recorded Events: {ours:?}");
    assert!(
        Api::<Lease>::namespaced(client.clone(), ns.name())
            .list(&ListParams::default())
            .await?
            .items
            .is_empty(),
        "the dry run took a Lease"
    );

    // 2. A populated namespace, then the registry changes: one update, one create, one
    // delete; b is unchanged.
    let connector = Connector::consul(env, ns.name(), &["--filter-tag", &reg.tag])?;
    wait_synced(&client, ns.name(), &a, &["192.0.2.101", "192.0.2.102"]).await?;
    wait_synced(&client, ns.name(), &b, &["192.0.2.103"]).await?;
    wait_synced(&client, ns.name(), &c, &["192.0.2.104"]).await?;
    connector.wait_ready().await?;
    let status = connector.terminate().await?;
    assert!(status.success(), "{status}");
    reg.register(&format!("{a}-3"), &a, "192.0.2.105", 80)
        .await?;
    reg.register(&format!("{d}-1"), &d, "192.0.2.106", 80)
        .await?;
    reg.deregister(&format!("{c}-1")).await?;
    let before = object_names::<Service>(&client, ns.name()).await?;

    let untouched = NoWrites::start(&client, ns.name()).await?;
    let stdout = dry_run(env, ns.name(), &reg.tag, &["--diff"]).await?;
    eprintln!("dry run (--diff) after registry changes:\n{stdout}");
    let plan = plan_lines(&stdout);
    for kind in ["service", "endpointslice", "endpoints"] {
        assert!(
            planned(&plan, "create", kind, &d),
            "create {kind} {d}:\n{stdout}"
        );
    }
    assert!(planned(&plan, "update", "endpointslice", &a), "{stdout}");
    assert!(planned(&plan, "update", "endpoints", &a), "{stdout}");
    assert!(planned(&plan, "delete", "service", &c), "{stdout}");
    assert_eq!(plan.len(), 8, "{stdout}");
    assert!(
        stdout.contains("3 to create, 2 to update, 3 to delete"),
        "{stdout}"
    );
    for (verb, kind, name) in &plan {
        assert!(
            !name.starts_with(&b),
            "{verb} {kind} {name}: b did not change\n{stdout}"
        );
        assert!(
            !(name.starts_with(&a) && verb != "update"),
            "{verb} {kind} {name}\n{stdout}"
        );
        assert!(
            !(name.starts_with(&c) && verb != "delete"),
            "{verb} {kind} {name}\n{stdout}"
        );
    }
    assert!(
        stdout.contains("192.0.2.105"),
        "--diff shows the new address:\n{stdout}"
    );
    untouched.assert_untouched().await?;
    // The cluster is as the real run left it.
    assert_eq!(
        slice_addresses(&client, ns.name(), &a).await,
        Some(vec!["192.0.2.101".to_string(), "192.0.2.102".to_string()])
    );
    let after: BTreeSet<String> = object_names::<Service>(&client, ns.name())
        .await?
        .into_iter()
        .filter(|n| !n.starts_with("sentinel-"))
        .collect();
    let before: BTreeSet<String> = before
        .into_iter()
        .filter(|n| !n.starts_with("sentinel-"))
        .collect();
    assert_eq!(after, before);
    assert!(after.contains(&c) && !after.contains(&d));
    Ok(())
}

// ------------------------------------------------------------------ 5. purge

const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
const INSTANCE: &str = "connector.flomesh.io/instance";

/// name → (uid, resourceVersion) of every object of kind K in the namespace.
async fn identities<K>(client: &Client, ns: &str) -> Result<BTreeMap<String, (String, String)>>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|o| {
            (
                o.name_any(),
                (
                    o.uid().unwrap_or_default(),
                    o.resource_version().unwrap_or_default(),
                ),
            )
        })
        .collect())
}

fn with_labels(
    mut labels: BTreeMap<String, String>,
    set: &[(&str, Option<&str>)],
) -> BTreeMap<String, String> {
    for (k, v) in set {
        match v {
            Some(v) => labels.insert(k.to_string(), v.to_string()),
            None => labels.remove(*k),
        };
    }
    labels
}

async fn purge(env: &TestEnv, ns: &str, id: &str) -> Result<String> {
    let kubeconfig = env.kubeconfig().to_string_lossy().into_owned();
    let out = run_once(
        &[
            "purge",
            "--kubeconfig",
            &kubeconfig,
            "--namespace",
            ns,
            "--connector-id",
            id,
        ],
        Duration::from_secs(60),
    )
    .await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "purge failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_removes_exactly_the_owned_objects() -> Result<()> {
    let env = TestEnv::shared();
    let client = env.client().await?;
    let ns = env.namespace("op-purge").await?;
    let mut reg = Registry::new(env)?;
    let id = unique_name("purge-id");
    let other_id = unique_name("other-id");
    let (p1, p2) = (format!("{}-p1", reg.tag), format!("{}-p2", reg.tag));
    reg.register(&format!("{p1}-1"), &p1, "192.0.2.111", 80)
        .await?;
    reg.register(&format!("{p1}-2"), &p1, "2001:db8::111", 80)
        .await?;
    reg.register(&format!("{p2}-1"), &p2, "192.0.2.112", 80)
        .await?;
    let connector = Connector::consul(
        env,
        ns.name(),
        &["--filter-tag", &reg.tag, "--connector-id", &id],
    )?;
    wait_synced(&client, ns.name(), &p1, &["192.0.2.111", "2001:db8::111"]).await?;
    wait_synced(&client, ns.name(), &p2, &["192.0.2.112"]).await?;
    connector.wait_ready().await?;
    let status = connector.terminate().await?;
    assert!(status.success(), "{status}");
    drop(reg);

    // Look-alikes: the labels of the connector's own objects with another connector id,
    // and two with only one of the two ownership labels.
    let services: Api<Service> = Api::namespaced(client.clone(), ns.name());
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns.name());
    let endpoints: Api<Endpoints> = Api::namespaced(client.clone(), ns.name());
    let own_svc_labels = services.get(&p2).await?.metadata.labels.unwrap_or_default();
    assert_eq!(own_svc_labels.get(INSTANCE), Some(&id));
    assert_eq!(
        own_svc_labels.get(MANAGED_BY).map(String::as_str),
        Some("registry-connector")
    );
    let own_slice = slices
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={p2}")))
        .await?
        .items
        .into_iter()
        .next()
        .context("no slice of p2")?;
    let own_ep_labels = endpoints
        .get(&p2)
        .await?
        .metadata
        .labels
        .unwrap_or_default();
    let foreign = format!("{}-foreign", p2);
    let pp = PostParams::default();
    let other = Some(other_id.as_str());
    let mk_service = |name: &str, labels: BTreeMap<String, String>| -> Result<Service> {
        Ok(serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"clusterIP": "None", "ports": [{"name": "http80", "port": 80}]},
        }))?)
    };
    services
        .create(
            &pp,
            &mk_service(
                &foreign,
                with_labels(own_svc_labels.clone(), &[(INSTANCE, other)]),
            )?,
        )
        .await?;
    let slice_labels = with_labels(
        own_slice.metadata.labels.clone().unwrap_or_default(),
        &[
            (INSTANCE, other),
            ("kubernetes.io/service-name", Some(&foreign)),
        ],
    );
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": format!("{foreign}-x"), "labels": slice_labels},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["192.0.2.119"]}],
        "ports": [{"name": "http80", "port": 80}],
    }))?;
    slices.create(&pp, &slice).await?;
    let ep: Endpoints = serde_json::from_value(json!({
        "metadata": {"name": foreign, "labels": with_labels(own_ep_labels, &[(INSTANCE, other)])},
    }))?;
    endpoints.create(&pp, &ep).await?;
    let only_id = format!("{}-only-id", p2);
    services
        .create(
            &pp,
            &mk_service(
                &only_id,
                with_labels(own_svc_labels.clone(), &[(MANAGED_BY, None)]),
            )?,
        )
        .await?;
    let only_mb = format!("{}-only-managed-by", p2);
    services
        .create(
            &pp,
            &mk_service(
                &only_mb,
                with_labels(own_svc_labels.clone(), &[(INSTANCE, None)]),
            )?,
        )
        .await?;

    let svcs_before = identities::<Service>(&client, ns.name()).await?;
    let slices_before = identities::<EndpointSlice>(&client, ns.name()).await?;
    let eps_before = identities::<Endpoints>(&client, ns.name()).await?;
    let owned = |m: &BTreeMap<String, (String, String)>,
                 foreign: &[&str]|
     -> BTreeMap<String, (String, String)> {
        m.iter()
            .filter(|(n, _)| !foreign.iter().any(|f| *n == f))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    };
    let slice_foreign = format!("{foreign}-x");
    let foreign_svcs = [foreign.as_str(), only_id.as_str(), only_mb.as_str()];
    let owned_slices = owned(&slices_before, &[&slice_foreign]).len();
    assert_eq!(
        owned(&svcs_before, &foreign_svcs).len(),
        2,
        "{svcs_before:?}"
    );
    assert!(owned_slices >= 3, "p1 is dual-stack: {slices_before:?}");
    assert_eq!(owned(&eps_before, &[&foreign]).len(), 2, "{eps_before:?}");

    let stdout = purge(env, ns.name(), &id).await?;
    assert!(
        stdout.contains(&format!(
            "purged 2 services, {owned_slices} endpointslices, 2 endpoints"
        )),
        "{stdout}"
    );
    // Exactly the look-alikes are left, untouched (same UID, same resourceVersion).
    let keep = |m: &BTreeMap<String, (String, String)>,
                names: &[&str]|
     -> BTreeMap<String, (String, String)> {
        m.iter()
            .filter(|(n, _)| names.iter().any(|f| *n == f))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    };
    assert_eq!(
        identities::<Service>(&client, ns.name()).await?,
        keep(&svcs_before, &foreign_svcs)
    );
    assert_eq!(
        identities::<EndpointSlice>(&client, ns.name()).await?,
        keep(&slices_before, &[&slice_foreign])
    );
    assert_eq!(
        identities::<Endpoints>(&client, ns.name()).await?,
        keep(&eps_before, &[&foreign])
    );

    // Again: nothing left to purge.
    let stdout = purge(env, ns.name(), &id).await?;
    assert!(
        stdout.contains("purged 0 services, 0 endpointslices, 0 endpoints"),
        "{stdout}"
    );
    // The other id's purge takes its three objects and still not the half-labelled.
    let stdout = purge(env, ns.name(), &other_id).await?;
    assert!(
        stdout.contains("purged 1 services, 1 endpointslices, 1 endpoints"),
        "{stdout}"
    );
    assert_eq!(
        identities::<Service>(&client, ns.name()).await?,
        keep(&svcs_before, &[&only_id, &only_mb])
    );
    Ok(())
}
