//! The deployment artefacts against the real apiserver: every object of `deploy/` and of
//! the Helm chart's output is accepted (server-side dry-run apply), the pod template
//! passes Pod Security "restricted", the chart's defaults render what `deploy/` holds,
//! and the Roles grant the connector's ServiceAccount what it needs and nothing more
//! (SubjectAccessReview against the apiserver's own RBAC authorizer).
//!
//! The manifests name fixed namespaces; tests run in parallel against one apiserver,
//! so each test maps them onto namespaces of its own before sending anything.
//!
//! The chart tests need Helm (`scripts/helm install`). Without it they skip with a
//! message, except under CI (`CI` set), where a missing Helm is a failure: `.ci/run`
//! installs it, so a skip there would hide a broken install.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::{self, Scope};
use kube::Client;
use serde::Deserialize;
use serde_json::{json, Value};
use testenv::{unique_name, wait_for, TestEnv};

/// The namespaces `deploy/` and the chart's defaults use.
const OWN_NS: &str = "registry-connector";
const SYNC_NS: &str = "registry-services";
/// The release name under which the chart's objects get deploy/'s names.
const RELEASE: &str = "registry-connector";
/// Field manager of this test's applies.
const MANAGER: &str = "deploy-artifacts-test";
/// How long the RBAC authorizer may take to see new Roles and RoleBindings (it reads
/// them from informers, so a grant becomes visible shortly after the write).
const RBAC_PROPAGATION: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------ loading

/// Every document of a multi-document YAML text, as JSON values. Empty documents
/// (Helm emits `---` before templates that rendered nothing) are dropped.
fn parse_documents(text: &str, origin: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(doc)
            .with_context(|| format!("{origin}: document {i} is not valid YAML"))?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// The checkout this test was built from. Not `testenv::repo_root()`: that path is
/// baked into the testenv crate when it is compiled, and a target dir shared between
/// checkouts can hand this test a testenv built from another one.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the crate lives two levels below the repository root")
        .to_path_buf()
}

fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

fn chart_dir() -> PathBuf {
    repo_root().join("charts").join("registry-connector")
}

/// The files `deploy/kustomization.yaml` lists, in its order (the order `kubectl apply
/// -k` would use).
fn kustomization_resources() -> Result<Vec<String>> {
    let path = deploy_dir().join("kustomization.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let k: Value =
        serde_yaml_ng::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    k["resources"]
        .as_array()
        .context("kustomization.yaml has no resources list")?
        .iter()
        .map(|r| {
            r.as_str()
                .map(str::to_owned)
                .context("a resource is not a string")
        })
        .collect()
}

/// Every object of `deploy/`.
fn deploy_objects() -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for file in kustomization_resources()? {
        let path = deploy_dir().join(&file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        out.extend(parse_documents(&text, &file)?);
    }
    Ok(out)
}

/// The pinned Helm from `scripts/helm path`, or None (with a message) when it is not
/// installed outside CI.
fn helm() -> Result<Option<PathBuf>> {
    let script = repo_root().join("scripts").join("helm");
    let out = Command::new("bash")
        .arg(&script)
        .arg("path")
        .output()
        .with_context(|| format!("running {} path", script.display()))?;
    if out.status.success() {
        let path = String::from_utf8(out.stdout)?.trim().to_owned();
        return Ok(Some(PathBuf::from(path)));
    }
    if std::env::var_os("CI").is_some() {
        bail!("helm is not installed although CI is set: .ci/run must run `scripts/helm install`");
    }
    eprintln!("SKIPPED: helm is not installed; run `scripts/helm install` to test the chart");
    Ok(None)
}

fn run_helm(helm: &Path, args: &[&str]) -> Result<std::process::Output> {
    Command::new(helm)
        .args(args)
        .output()
        .with_context(|| format!("running helm {}", args.join(" ")))
}

/// `helm template` of the chart as `release` in `namespace`, with `--set` values.
fn helm_template(
    helm: &Path,
    release: &str,
    namespace: &str,
    sets: &[(&str, &str)],
) -> Result<Vec<Value>> {
    let chart = chart_dir();
    let mut args = vec![
        "template".to_owned(),
        release.to_owned(),
        chart.to_string_lossy().into_owned(),
        "--namespace".to_owned(),
        namespace.to_owned(),
    ];
    for (k, v) in sets {
        args.push("--set".to_owned());
        args.push(format!("{k}={v}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_helm(helm, &args)?;
    ensure!(
        out.status.success(),
        "helm {} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_documents(&String::from_utf8(out.stdout)?, "helm template output")
}

// ------------------------------------------------------------------ objects

fn kind(obj: &Value) -> &str {
    obj["kind"].as_str().unwrap_or_default()
}

fn name(obj: &Value) -> &str {
    obj.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn namespace(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/namespace").and_then(Value::as_str)
}

fn describe(obj: &Value) -> String {
    match namespace(obj) {
        Some(ns) => format!("{} {ns}/{}", kind(obj), name(obj)),
        None => format!("{} {}", kind(obj), name(obj)),
    }
}

fn only_kind<'a>(objects: &'a [Value], k: &str) -> Result<&'a Value> {
    let mut found = objects.iter().filter(|o| kind(o) == k);
    let first = found
        .next()
        .with_context(|| format!("no {k} among the objects"))?;
    ensure!(
        found.next().is_none(),
        "more than one {k} among the objects"
    );
    Ok(first)
}

/// Moves the objects from the namespaces they name to others: Namespace names,
/// metadata.namespace, RoleBinding subjects and the connector's `--namespace=` flag.
/// Everything else (object names, labels, the lease name) stays as written.
fn relocate(mut objects: Vec<Value>, map: &BTreeMap<&str, String>) -> Vec<Value> {
    let rename = |v: &mut Value| {
        if let Some(to) = v.as_str().and_then(|s| map.get(s)) {
            *v = Value::String(to.clone());
        }
    };
    for obj in &mut objects {
        let field = if kind(obj) == "Namespace" {
            "/metadata/name"
        } else {
            "/metadata/namespace"
        };
        if let Some(v) = obj.pointer_mut(field) {
            rename(v);
        }
        if let Some(subjects) = obj.get_mut("subjects").and_then(Value::as_array_mut) {
            for subject in subjects {
                if let Some(v) = subject.get_mut("namespace") {
                    rename(v);
                }
            }
        }
        if let Some(containers) = obj
            .pointer_mut("/spec/template/spec/containers")
            .and_then(Value::as_array_mut)
        {
            for args in containers
                .iter_mut()
                .filter_map(|c| c.get_mut("args").and_then(Value::as_array_mut))
            {
                for arg in args {
                    let mapped = arg
                        .as_str()
                        .and_then(|a| a.strip_prefix("--namespace="))
                        .and_then(|ns| map.get(ns))
                        .map(|to| format!("--namespace={to}"));
                    if let Some(mapped) = mapped {
                        *arg = Value::String(mapped);
                    }
                }
            }
        }
    }
    objects
}

/// What the Deployment runs as and where it writes, read from the Deployment itself so
/// that the RBAC checks follow the manifests rather than restating them.
#[derive(Debug)]
struct Runs {
    own_ns: String,
    sync_ns: String,
    service_account: String,
    lease: String,
}

fn runs(objects: &[Value]) -> Result<Runs> {
    let deployment = only_kind(objects, "Deployment")?;
    let pod = &deployment["spec"]["template"]["spec"];
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
            .with_context(|| format!("the Deployment does not pass {prefix}..."))
    };
    Ok(Runs {
        own_ns: namespace(deployment)
            .context("the Deployment has no namespace")?
            .to_owned(),
        sync_ns: flag("--namespace=")?,
        service_account: pod["serviceAccountName"]
            .as_str()
            .context("the Deployment names no serviceAccountName")?
            .to_owned(),
        lease: flag("--lease-name=")?,
    })
}

// ------------------------------------------------------------------ apiserver

/// Server-side apply of each object (a dry run unless `dry_run` is false), resolving
/// its resource through discovery so any kind the manifests hold is covered.
async fn apply(client: &Client, objects: &[Value], dry_run: bool) -> Result<()> {
    for obj in objects {
        let api_version = obj["apiVersion"]
            .as_str()
            .with_context(|| format!("{} has no apiVersion", describe(obj)))?;
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind(obj));
        let (resource, caps) = discovery::pinned_kind(client, &gvk)
            .await
            .with_context(|| format!("the apiserver does not serve {api_version} {}", kind(obj)))?;
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Namespaced => {
                let ns = namespace(obj)
                    .with_context(|| format!("namespaced {} names no namespace", describe(obj)))?;
                Api::namespaced_with(client.clone(), ns, &resource)
            }
            Scope::Cluster => {
                ensure!(
                    namespace(obj).is_none(),
                    "cluster-scoped {} names a namespace",
                    describe(obj)
                );
                Api::all_with(client.clone(), &resource)
            }
        };
        let mut params = PatchParams::apply(MANAGER);
        if dry_run {
            params = params.dry_run();
        }
        api.patch(name(obj), &params, &Patch::Apply(obj))
            .await
            .with_context(|| {
                format!(
                    "the apiserver rejected {}{}",
                    describe(obj),
                    if dry_run { " (dry run)" } else { "" }
                )
            })?;
    }
    Ok(())
}

/// Every object is accepted in a dry run. Namespace objects are also tried under a
/// fresh name, so both their create path and (on the test's existing namespaces) their
/// update path are checked.
async fn dry_run_all(client: &Client, objects: &[Value]) -> Result<()> {
    apply(client, objects, true).await?;
    for ns in objects.iter().filter(|o| kind(o) == "Namespace") {
        let mut fresh = ns.clone();
        fresh["metadata"]["name"] = json!(unique_name("rc-fresh"));
        apply(client, &[fresh], true).await?;
    }
    Ok(())
}

/// Creates (dry run) a Pod from the Deployment's template in its namespace. Pod
/// Security admission enforces on Pods, not on Deployments, so this is what proves the
/// template passes the level its namespace enforces.
async fn admit_pod_from_template(client: &Client, objects: &[Value]) -> Result<()> {
    let deployment = only_kind(objects, "Deployment")?;
    let ns = namespace(deployment).context("the Deployment has no namespace")?;
    let template = &deployment["spec"]["template"];
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": unique_name("rc-pod"),
            "namespace": ns,
            "labels": template["metadata"]["labels"],
        },
        "spec": template["spec"],
    }))
    .context("the pod template is not a valid Pod")?;
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&params, &pod)
        .await
        .with_context(|| format!("a Pod from {}'s template was refused", describe(deployment)))?;
    Ok(())
}

/// Creates the test's two namespaces (deleted when the guards drop) and the map from
/// the manifests' namespaces to them.
async fn test_namespaces(
    env: &TestEnv,
) -> Result<(
    testenv::TestNamespace,
    testenv::TestNamespace,
    BTreeMap<&'static str, String>,
)> {
    let own = env.namespace("rc-own").await?;
    let sync = env.namespace("rc-sync").await?;
    let map = BTreeMap::from([
        (OWN_NS, own.name().to_owned()),
        (SYNC_NS, sync.name().to_owned()),
    ]);
    Ok((own, sync, map))
}

// ------------------------------------------------------------------ RBAC

/// One request the connector's identity might make.
#[derive(Debug, Clone)]
struct Req {
    ns: Option<String>,
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    subresource: Option<&'static str>,
    name: Option<String>,
}

impl std::fmt::Display for Req {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            self.group
        };
        write!(f, "{} {group}/{}", self.verb, self.resource)?;
        if let Some(sub) = self.subresource {
            write!(f, "/{sub}")?;
        }
        if let Some(name) = &self.name {
            write!(f, " {name:?}")?;
        }
        match &self.ns {
            Some(ns) => write!(f, " in {ns}"),
            None => write!(f, " (cluster-wide)"),
        }
    }
}

fn req(ns: Option<&str>, verb: &'static str, group: &'static str, resource: &'static str) -> Req {
    Req {
        ns: ns.map(str::to_owned),
        verb,
        group,
        resource,
        subresource: None,
        name: None,
    }
}

impl Req {
    fn named(mut self, name: &str) -> Self {
        self.name = Some(name.to_owned());
        self
    }
    fn sub(mut self, subresource: &'static str) -> Self {
        self.subresource = Some(subresource);
        self
    }
}

/// Asks the apiserver whether the ServiceAccount may make `r`, with the groups a
/// ServiceAccount token really carries (grants to them count too).
async fn allowed(client: &Client, who: &Runs, r: &Req) -> Result<bool> {
    let sar = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!(
                "system:serviceaccount:{}:{}",
                who.own_ns, who.service_account
            )),
            groups: Some(vec![
                "system:serviceaccounts".to_owned(),
                format!("system:serviceaccounts:{}", who.own_ns),
                "system:authenticated".to_owned(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                namespace: r.ns.clone(),
                verb: Some(r.verb.to_owned()),
                group: Some(r.group.to_owned()),
                resource: Some(r.resource.to_owned()),
                subresource: r.subresource.map(str::to_owned),
                name: r.name.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let review = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &sar)
        .await
        .with_context(|| format!("SubjectAccessReview for {r}"))?;
    Ok(review.status.map(|s| s.allowed).unwrap_or(false))
}

/// The Roles must not reach beyond their namespace or name resources by wildcard:
/// checked on the objects before the apiserver is asked anything.
fn assert_rbac_objects_are_narrow(objects: &[Value]) -> Result<()> {
    for obj in objects {
        ensure!(
            !matches!(kind(obj), "ClusterRole" | "ClusterRoleBinding"),
            "{} grants cluster-wide access; the connector needs Roles only",
            describe(obj)
        );
        if kind(obj) != "Role" {
            continue;
        }
        for rule in obj["rules"].as_array().into_iter().flatten() {
            for field in ["apiGroups", "resources", "verbs", "resourceNames"] {
                let wild = rule[field]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|v| v.as_str().is_some_and(|s| s.contains('*')));
                ensure!(!wild, "{} has a wildcard in {field}: {rule}", describe(obj));
            }
        }
    }
    Ok(())
}

/// Applies the ServiceAccount, Roles and RoleBindings for real and proves, through the
/// apiserver's authorizer, that they grant exactly the connector's needs.
async fn assert_least_privilege(client: &Client, objects: &[Value]) -> Result<()> {
    assert_rbac_objects_are_narrow(objects)?;
    let who = runs(objects)?;
    let rbac: Vec<Value> = objects
        .iter()
        .filter(|o| matches!(kind(o), "ServiceAccount" | "Role" | "RoleBinding"))
        .cloned()
        .collect();
    ensure!(
        rbac.iter()
            .any(|o| kind(o) == "ServiceAccount" && name(o) == who.service_account),
        "no ServiceAccount {} among the objects",
        who.service_account
    );
    apply(client, &rbac, false).await?;

    let own = Some(who.own_ns.as_str());
    let sync = Some(who.sync_ns.as_str());
    let other_ns = unique_name("rc-other");
    let other = Some(other_ns.as_str());
    let lease = who.lease.as_str();
    let managed = [
        ("", "services"),
        ("", "endpoints"),
        ("discovery.k8s.io", "endpointslices"),
    ];

    let mut must_allow = Vec::new();
    for (group, resource) in managed {
        for verb in ["list", "watch", "create"] {
            must_allow.push(req(sync, verb, group, resource));
        }
        for verb in ["get", "update", "patch", "delete"] {
            must_allow.push(req(sync, verb, group, resource).named("orders"));
        }
    }
    for group in ["", "events.k8s.io"] {
        for verb in ["create", "patch"] {
            must_allow.push(req(sync, verb, group, "events"));
        }
    }
    must_allow.push(req(own, "create", "coordination.k8s.io", "leases"));
    for verb in ["get", "update"] {
        must_allow.push(req(own, verb, "coordination.k8s.io", "leases").named(lease));
    }

    let mut must_deny = Vec::new();
    // The managed kinds anywhere but the sync namespace, and across all namespaces.
    for (group, resource) in managed {
        for ns in [other, None] {
            must_deny.push(req(ns, "list", group, resource));
            must_deny.push(req(ns, "create", group, resource));
        }
        if who.own_ns != who.sync_ns {
            must_deny.push(req(own, "create", group, resource));
            must_deny.push(req(own, "delete", group, resource).named("orders"));
        }
        // Bulk deletes and subresources it never uses.
        must_deny.push(req(sync, "deletecollection", group, resource));
    }
    for (verb, sub) in [
        ("update", "status"),
        ("patch", "status"),
        ("get", "proxy"),
        ("create", "proxy"),
    ] {
        must_deny.push(req(sync, verb, "", "services").named("orders").sub(sub));
    }
    // Other kinds in the sync namespace: no secrets, pods, config, identities or RBAC.
    for (verb, group, resource) in [
        ("get", "", "secrets"),
        ("list", "", "secrets"),
        ("watch", "", "secrets"),
        ("list", "", "pods"),
        ("create", "", "pods"),
        ("get", "", "configmaps"),
        ("create", "", "configmaps"),
        ("create", "", "serviceaccounts"),
        ("create", "apps", "deployments"),
        ("create", "rbac.authorization.k8s.io", "roles"),
        ("create", "rbac.authorization.k8s.io", "rolebindings"),
        ("list", "", "events"),
        ("delete", "", "events"),
        ("list", "events.k8s.io", "events"),
        ("delete", "events.k8s.io", "events"),
        ("create", "coordination.k8s.io", "leases"),
    ] {
        must_deny.push(req(sync, verb, group, resource));
    }
    for verb in ["update", "escalate", "bind"] {
        must_deny.push(
            req(sync, verb, "rbac.authorization.k8s.io", "roles").named("registry-connector-sync"),
        );
    }
    must_deny.push(
        req(own, "create", "", "serviceaccounts")
            .named(&who.service_account)
            .sub("token"),
    );
    if who.own_ns != who.sync_ns {
        for verb in ["get", "update"] {
            must_deny.push(req(sync, verb, "coordination.k8s.io", "leases").named(lease));
        }
    }
    // Leases: only its own, only get/create/update.
    for verb in ["list", "watch"] {
        must_deny.push(req(own, verb, "coordination.k8s.io", "leases"));
    }
    for verb in ["patch", "delete"] {
        must_deny.push(req(own, verb, "coordination.k8s.io", "leases").named(lease));
    }
    for verb in ["get", "update"] {
        must_deny.push(req(own, verb, "coordination.k8s.io", "leases").named("some-other-lease"));
        must_deny.push(req(other, verb, "coordination.k8s.io", "leases").named(lease));
    }
    must_deny.push(req(other, "create", "coordination.k8s.io", "leases"));
    // Its own namespace holds the Consul token Secret: it is read through the pod's
    // environment, never through the API.
    for verb in ["get", "list"] {
        must_deny.push(req(own, verb, "", "secrets"));
    }
    must_deny.push(req(own, "list", "", "pods"));
    // Cluster-scoped writes.
    for (verb, group, resource) in [
        ("create", "", "namespaces"),
        ("create", "", "persistentvolumes"),
        ("patch", "", "nodes"),
        ("create", "rbac.authorization.k8s.io", "clusterroles"),
        ("create", "rbac.authorization.k8s.io", "clusterrolebindings"),
        (
            "create",
            "apiextensions.k8s.io",
            "customresourcedefinitions",
        ),
        (
            "create",
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
        ),
    ] {
        must_deny.push(req(None, verb, group, resource));
    }
    must_deny.push(req(None, "delete", "", "namespaces").named(&who.sync_ns));

    // Grants become visible to the authorizer shortly after they are written: wait for
    // each expected grant, then judge the denials with every grant in place.
    let who = &who;
    for r in &must_allow {
        wait_for(
            &format!("RBAC to allow {r}"),
            RBAC_PROPAGATION,
            || async move { allowed(client, who, r).await.ok().filter(|a| *a) },
        )
        .await?;
    }
    let mut wrongly_allowed = Vec::new();
    for r in &must_deny {
        if allowed(client, who, r).await? {
            wrongly_allowed.push(r.to_string());
        }
    }
    ensure!(
        wrongly_allowed.is_empty(),
        "the connector's ServiceAccount may do more than it needs:\n  {}",
        wrongly_allowed.join("\n  ")
    );
    Ok(())
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn deploy_manifests_are_accepted_by_the_apiserver() -> Result<()> {
    // Nothing in deploy/ is left out of the kustomization, and nothing it lists is missing.
    let mut listed = kustomization_resources()?;
    listed.sort();
    let mut present: Vec<String> = std::fs::read_dir(deploy_dir())?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .collect();
    present.sort();
    assert_eq!(
        listed, present,
        "kustomization.yaml must list every manifest in deploy/"
    );

    let env = TestEnv::shared();
    let client = env.client().await?;
    let (_own, _sync, map) = test_namespaces(env).await?;
    let objects = relocate(deploy_objects()?, &map);
    let kinds: Vec<&str> = objects.iter().map(kind).collect();
    for want in [
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Deployment",
        "PodDisruptionBudget",
    ] {
        assert!(kinds.contains(&want), "deploy/ has no {want}: {kinds:?}");
    }
    dry_run_all(&client, &objects).await?;

    // Really apply the Namespaces (onto the test's own, so they get the manifests'
    // labels, Pod Security "restricted" on the connector's) and the ServiceAccount a
    // Pod needs to be admitted; then a Pod from the template must pass.
    let prerequisites: Vec<Value> = objects
        .iter()
        .filter(|o| matches!(kind(o), "Namespace" | "ServiceAccount"))
        .cloned()
        .collect();
    apply(&client, &prerequisites, false).await?;
    let own_ns = only_kind(&objects, "Deployment").map(|d| namespace(d).unwrap_or_default())?;
    let enforced = objects
        .iter()
        .find(|o| kind(o) == "Namespace" && name(o) == own_ns)
        .and_then(|n| n.pointer("/metadata/labels/pod-security.kubernetes.io~1enforce"))
        .and_then(Value::as_str);
    assert_eq!(
        enforced,
        Some("restricted"),
        "the connector's namespace enforces restricted"
    );
    admit_pod_from_template(&client, &objects).await?;
    Ok(())
}

#[tokio::test]
async fn deploy_rbac_is_least_privilege() -> Result<()> {
    let env = TestEnv::shared();
    let client = env.client().await?;
    let (_own, _sync, map) = test_namespaces(env).await?;
    let objects = relocate(deploy_objects()?, &map);
    assert_least_privilege(&client, &objects).await
}

#[test]
fn chart_passes_helm_lint() -> Result<()> {
    let Some(helm) = helm()? else { return Ok(()) };
    let chart = chart_dir().to_string_lossy().into_owned();
    let chart = chart.as_str();
    for sets in [
        vec![],
        vec![
            "leaderElection.enabled=false",
            "replicaCount=1",
            "connectorId=blue",
            "serviceType=cluster-ip",
            "consul.tokenSecret.name=",
        ],
        vec![
            "registry=eureka",
            "eureka.username=connector",
            "eureka.passwordSecret.name=eureka-credentials",
        ],
        vec![
            "registry=nacos",
            "nacos.addr=nacos-0.nacos:8848\\,nacos-1.nacos:8848",
            "nacos.groups={DEFAULT_GROUP,PAY}",
            "nacos.clusters={SH}",
            "nacos.groupAsSuffix=true",
            "nacos.username=connector",
            "nacos.passwordSecret.name=nacos-credentials",
        ],
        vec![
            "registry=zookeeper",
            "zookeeper.addr=zk-0.zk:2181\\,zk-1.zk:2181/apps",
            "zookeeper.layout=curator",
            "zookeeper.digestUser=connector",
            "zookeeper.digestPasswordSecret.name=zk-credentials",
        ],
        vec!["registry=zookeeper", "sync=both"],
    ] {
        let mut args = vec!["lint", "--strict", chart];
        for s in &sets {
            args.extend(["--set", s]);
        }
        let out = run_helm(&helm, &args)?;
        assert!(
            out.status.success(),
            "helm {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Values the chart must refuse rather than render something harmful or invalid.
    for (sets, why) in [
        (
            &["leaderElection.enabled=false"][..],
            "two replicas without leader election would all write",
        ),
        (
            &["serviceType=nodeport"][..],
            "not a service type the connector knows",
        ),
        (&["registry=etcd"][..], "not a registry the connector reads"),
        (
            &[
                "registry=zookeeper",
                "registryTLS.secretName=tls",
                "registryTLS.caKey=",
            ][..],
            "TLS to ZooKeeper without a CA (its client has no system roots)",
        ),
        (
            &["registry=zookeeper", "zookeeper.layout=flat"][..],
            "not a ZooKeeper layout",
        ),
        (
            &[
                "registry=zookeeper",
                "zookeeper.digestPasswordSecret.name=zk-credentials",
            ][..],
            "a digest password without its user",
        ),
        (
            &["registry=zookeeper", "zookeeper.digestUser=connector"][..],
            "a digest user without its password",
        ),
        (
            &["registryTLS.secretName=tls", "registryTLS.certKey=tls.crt"][..],
            "a client certificate without its key",
        ),
        (
            &["registry=nacos", "sync=both"][..],
            "the nacos command has no Kubernetes -> Nacos direction",
        ),
        (
            &["registry=nacos", "registryTLS.secretName=tls"][..],
            "the nacos command has no TLS",
        ),
        (
            &["registry=nacos", "nacos.groups=null"][..],
            "Nacos without a group to read",
        ),
        (
            &["registry=nacos", "nacos.serviceListInterval=30"][..],
            "an interval without its unit",
        ),
    ] {
        let mut args = vec!["template", "x", chart];
        for s in sets {
            args.extend(["--set", s]);
        }
        let out = run_helm(&helm, &args)?;
        assert!(
            !out.status.success(),
            "helm {} rendered: {why}",
            args.join(" ")
        );
    }
    Ok(())
}

fn deployment_has_no_volumes(objects: &[Value]) -> bool {
    objects
        .iter()
        .filter(|o| kind(o) == "Deployment")
        .all(|d| d.pointer("/spec/template/spec/volumes").is_none())
}

/// The chart's labels that deploy/ does not carry (they name Helm and the chart).
const HELM_ONLY_LABELS: [&str; 2] = ["helm.sh/chart", "app.kubernetes.io/managed-by"];

#[test]
fn chart_defaults_render_what_deploy_holds() -> Result<()> {
    let Some(helm) = helm()? else { return Ok(()) };
    let key = |o: &Value| describe(o);
    let deploy: BTreeMap<String, Value> = deploy_objects()?
        .into_iter()
        .filter(|o| kind(o) != "Namespace")
        .map(|o| (key(&o), o))
        .collect();
    let chart: BTreeMap<String, Value> = helm_template(&helm, RELEASE, OWN_NS, &[])?
        .into_iter()
        .map(|mut o| {
            if let Some(labels) = o
                .pointer_mut("/metadata/labels")
                .and_then(Value::as_object_mut)
            {
                for l in HELM_ONLY_LABELS {
                    labels.remove(l);
                }
            }
            (key(&o), o)
        })
        .collect();
    assert_eq!(
        deploy.keys().collect::<Vec<_>>(),
        chart.keys().collect::<Vec<_>>(),
        "the chart's defaults and deploy/ hold different objects"
    );
    let mut differences = Vec::new();
    for (k, want) in &deploy {
        diff_json(k, want, &chart[k], &mut differences);
    }
    assert!(
        differences.is_empty(),
        "the chart's defaults differ from deploy/ (deploy/ vs chart):\n  {}",
        differences.join("\n  ")
    );
    Ok(())
}

/// The paths at which two JSON values differ, each with both sides.
fn diff_json(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let (l, r) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                diff_json(&format!("{path}.{k}"), l, r, out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (l, r)) in x.iter().zip(y).enumerate() {
                diff_json(&format!("{path}[{i}]"), l, r, out);
            }
        }
        _ if a != b => out.push(format!("{path}: {a} vs {b}")),
        _ => {}
    }
}

#[tokio::test]
async fn chart_renders_are_accepted_by_the_apiserver() -> Result<()> {
    let Some(helm) = helm()? else { return Ok(()) };
    let env = TestEnv::shared();
    let client = env.client().await?;
    let (own, sync, _) = test_namespaces(env).await?;
    // The connector's namespace as deploy/ sets it up: Pod Security "restricted".
    apply(
        &client,
        &[json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": own.name(),
                "labels": { "pod-security.kubernetes.io/enforce": "restricted" },
            },
        })],
        false,
    )
    .await?;

    // The defaults, a set of values that takes the chart's other branches, Eureka,
    // Nacos and ZooKeeper.
    let variants: [(&str, Vec<(&str, &str)>); 5] = [
        (RELEASE, vec![("syncNamespace", sync.name())]),
        (
            "variant",
            vec![
                ("syncNamespace", sync.name()),
                ("leaderElection.enabled", "false"),
                ("replicaCount", "1"),
                ("connectorId", "blue"),
                ("serviceType", "external-name"),
                ("consul.tokenSecret.name", ""),
                ("consul.httpAddr", "https://consul.example:8501"),
                ("extraArgs[0]", "--filter-tag=k8s"),
                ("extraEnv[0].name", "RC_QUIET_PERIOD"),
                ("extraEnv[0].value", "500ms"),
                ("serviceAccount.annotations.example\\.com/role", "connector"),
                ("podLabels.team", "platform"),
                ("spreadAcrossNodes", "false"),
            ],
        ),
        (
            "eureka",
            vec![
                ("syncNamespace", sync.name()),
                ("registry", "eureka"),
                (
                    // `--set` splits on commas unless they are escaped.
                    "eureka.url",
                    "http://eureka-a:8761/eureka\\,http://eureka-b:8761/eureka",
                ),
                ("eureka.username", "connector"),
                ("eureka.passwordSecret.name", "eureka-credentials"),
                ("registryTLS.secretName", "eureka-tls"),
                ("registryTLS.certKey", "tls.crt"),
                ("registryTLS.keyKey", "tls.key"),
            ],
        ),
        (
            "nacos",
            vec![
                ("syncNamespace", sync.name()),
                ("registry", "nacos"),
                ("nacos.addr", "nacos-0.nacos:8848\\,nacos-1.nacos:8848"),
                ("nacos.namespace", "3f1c0a52-prod"),
                ("nacos.groups", "{DEFAULT_GROUP,PAY}"),
                ("nacos.clusters", "{SH,BJ}"),
                ("nacos.serviceListInterval", "1m"),
                ("nacos.groupAsSuffix", "true"),
                ("nacos.username", "connector"),
                ("nacos.passwordSecret.name", "nacos-credentials"),
            ],
        ),
        (
            "zookeeper",
            vec![
                ("syncNamespace", sync.name()),
                ("registry", "zookeeper"),
                ("zookeeper.addr", "zk-0.zk:2181\\,zk-1.zk:2181"),
                ("zookeeper.basePath", "/dubbo-blue"),
                ("zookeeper.sessionTimeout", "20s"),
                ("zookeeper.dubboServiceBy", "application"),
                ("zookeeper.digestUser", "connector"),
                ("zookeeper.digestPasswordSecret.name", "zk-credentials"),
                ("registryTLS.secretName", "zk-tls"),
                ("registryTLS.certKey", "tls.crt"),
                ("registryTLS.keyKey", "tls.key"),
            ],
        ),
    ];
    for (release, sets) in variants {
        let objects = helm_template(&helm, release, own.name(), &sets)?;
        let args = objects
            .iter()
            .find(|o| kind(o) == "Deployment")
            .and_then(|d| d.pointer("/spec/template/spec/containers/0/args"))
            .cloned()
            .unwrap_or_default();
        let registry = match release {
            "eureka" | "nacos" | "zookeeper" => release,
            _ => "consul",
        };
        ensure!(
            args.get(0).and_then(Value::as_str) == Some(registry),
            "release {release} runs {args}"
        );
        if release == "eureka" {
            ensure!(
                args.as_array()
                    .into_iter()
                    .flatten()
                    .any(|a| a
                        == "--eureka-url=http://eureka-a:8761/eureka,http://eureka-b:8761/eureka"),
                "no --eureka-url in {args}"
            );
            let deployment = only_kind(&objects, "Deployment")?;
            for flag in [
                "--eureka-ca-file=/etc/registry-connector/tls/ca.crt",
                "--eureka-client-cert=/etc/registry-connector/tls/tls.crt",
                "--eureka-client-key=/etc/registry-connector/tls/tls.key",
            ] {
                ensure!(
                    args.as_array().into_iter().flatten().any(|a| a == flag),
                    "no {flag} in {args}"
                );
            }
            ensure!(
                deployment.pointer("/spec/template/spec/volumes/0/secret/secretName")
                    == Some(&json!("eureka-tls"))
                    && deployment
                        .pointer("/spec/template/spec/containers/0/volumeMounts/0/mountPath")
                        == Some(&json!("/etc/registry-connector/tls")),
                "the TLS Secret is not mounted: {deployment}"
            );
        } else if release == "nacos" {
            let args: Vec<&str> = args
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let flags: Vec<&str> = args
                .iter()
                .copied()
                .filter(|a| a.starts_with("--nacos-"))
                .collect();
            ensure!(
                flags
                    == [
                        "--nacos-addr=nacos-0.nacos:8848,nacos-1.nacos:8848",
                        "--nacos-namespace=3f1c0a52-prod",
                        "--nacos-groups=DEFAULT_GROUP,PAY",
                        "--nacos-clusters=SH,BJ",
                        "--nacos-service-list-interval=1m",
                        "--nacos-group-as-suffix=true",
                    ],
                "release nacos passes {flags:?}"
            );
            ensure!(
                !args.iter().any(|a| a.starts_with("--sync")),
                "release nacos passes --sync: {args:?}"
            );
            let deployment = only_kind(&objects, "Deployment")?;
            let env = deployment
                .pointer("/spec/template/spec/containers/0/env")
                .and_then(Value::as_array)
                .context("the container has no env")?;
            let var = |name: &str| env.iter().find(|e| e["name"] == name).cloned();
            ensure!(
                var("NACOS_USERNAME")
                    == Some(json!({"name": "NACOS_USERNAME", "value": "connector"})),
                "NACOS_USERNAME: {env:?}"
            );
            ensure!(
                var("NACOS_PASSWORD")
                    == Some(
                        json!({"name": "NACOS_PASSWORD", "valueFrom": {"secretKeyRef": {
                            "name": "nacos-credentials", "key": "password", "optional": false,
                        }}})
                    ),
                "NACOS_PASSWORD from the Secret: {env:?}"
            );
            ensure!(
                !env.iter().any(
                    |e| ["CONSUL_HTTP_TOKEN", "EUREKA_USERNAME", "EUREKA_PASSWORD"]
                        .contains(&e["name"].as_str().unwrap_or_default())
                ),
                "another registry's credentials: {env:?}"
            );
            ensure!(
                deployment_has_no_volumes(&objects),
                "release nacos mounts volumes"
            );
        } else if release == "zookeeper" {
            let args: Vec<&str> = args
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let flags: Vec<&str> = args
                .iter()
                .copied()
                .filter(|a| a.starts_with("--zookeeper-") || a.starts_with("--dubbo-"))
                .collect();
            ensure!(
                flags
                    == [
                        "--zookeeper-addr=zk-0.zk:2181,zk-1.zk:2181",
                        "--zookeeper-layout=dubbo",
                        "--zookeeper-base-path=/dubbo-blue",
                        "--zookeeper-session-timeout=20s",
                        "--dubbo-service-by=application",
                        "--zookeeper-ca-file=/etc/registry-connector/tls/ca.crt",
                        "--zookeeper-client-cert=/etc/registry-connector/tls/tls.crt",
                        "--zookeeper-client-key=/etc/registry-connector/tls/tls.key",
                    ],
                "release zookeeper passes {flags:?}"
            );
            ensure!(
                !args.iter().any(|a| a.starts_with("--sync")),
                "release zookeeper passes --sync: {args:?}"
            );
            let deployment = only_kind(&objects, "Deployment")?;
            let env = deployment
                .pointer("/spec/template/spec/containers/0/env")
                .and_then(Value::as_array)
                .context("the container has no env")?;
            let var = |name: &str| env.iter().find(|e| e["name"] == name).cloned();
            ensure!(
                var("ZOOKEEPER_DIGEST_USER")
                    == Some(json!({"name": "ZOOKEEPER_DIGEST_USER", "value": "connector"})),
                "ZOOKEEPER_DIGEST_USER: {env:?}"
            );
            ensure!(
                var("ZOOKEEPER_DIGEST_PASSWORD")
                    == Some(
                        json!({"name": "ZOOKEEPER_DIGEST_PASSWORD", "valueFrom": {"secretKeyRef": {
                            "name": "zk-credentials", "key": "password", "optional": false,
                        }}})
                    ),
                "ZOOKEEPER_DIGEST_PASSWORD from the Secret: {env:?}"
            );
            ensure!(
                !env.iter().any(|e| [
                    "CONSUL_HTTP_TOKEN",
                    "EUREKA_USERNAME",
                    "EUREKA_PASSWORD",
                    "NACOS_PASSWORD"
                ]
                .contains(&e["name"].as_str().unwrap_or_default())),
                "another registry's credentials: {env:?}"
            );
            ensure!(
                deployment.pointer("/spec/template/spec/volumes/0/secret/secretName")
                    == Some(&json!("zk-tls")),
                "the TLS Secret is not mounted: {deployment}"
            );
        } else {
            ensure!(
                deployment_has_no_volumes(&objects),
                "release {release} mounts volumes without registryTLS"
            );
        }
        ensure!(
            objects.iter().all(|o| kind(o) != "Namespace"),
            "the chart must not create namespaces"
        );
        dry_run_all(&client, &objects)
            .await
            .with_context(|| format!("release {release}"))?;
        // The Pod check needs the ServiceAccount to exist.
        let service_account: Vec<Value> = objects
            .iter()
            .filter(|o| kind(o) == "ServiceAccount")
            .cloned()
            .collect();
        apply(&client, &service_account, false).await?;
        admit_pod_from_template(&client, &objects)
            .await
            .with_context(|| format!("release {release}"))?;
    }
    Ok(())
}

#[tokio::test]
async fn chart_rbac_is_least_privilege() -> Result<()> {
    let Some(helm) = helm()? else { return Ok(()) };
    let env = TestEnv::shared();
    let client = env.client().await?;
    let (own, sync, _) = test_namespaces(env).await?;
    // Rendered straight into the test's namespaces: this also checks that the chart
    // puts each Role where its values say.
    let objects = helm_template(
        &helm,
        RELEASE,
        own.name(),
        &[("syncNamespace", sync.name())],
    )?;
    let who = runs(&objects)?;
    assert_eq!(
        (who.own_ns.as_str(), who.sync_ns.as_str()),
        (own.name(), sync.name())
    );
    assert_least_privilege(&client, &objects).await
}
