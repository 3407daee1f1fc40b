//! The test environment is made of real parts: these tests check the behaviour that only
//! a real apiserver, controller-manager, Consul agent and Eureka server have.

use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::Api;
use serde_json::json;
use testenv::consul::ConsulClient;
use testenv::eureka::{instance_json, EurekaClient};
use testenv::{unique_name, wait_for, TestEnv};

const WAIT: Duration = Duration::from_secs(30);

fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("test object literal is valid")
}

#[tokio::test]
async fn apiserver_reports_the_pinned_release() -> Result<()> {
    let env = TestEnv::shared();
    let client = env.client().await?;
    let version = client.apiserver_version().await?;
    assert_eq!(version.git_version, "v1.37.2");
    Ok(())
}

#[tokio::test]
async fn mirroring_controller_mirrors_selectorless_endpoints() -> Result<()> {
    let env = TestEnv::shared();
    let ns = env.namespace("mirror").await?;
    let client = env.client().await?;
    let services: Api<Service> = Api::namespaced(client.clone(), ns.name());
    let endpoints: Api<Endpoints> = Api::namespaced(client.clone(), ns.name());
    let slices: Api<EndpointSlice> = Api::namespaced(client, ns.name());

    services
        .create(
            &PostParams::default(),
            &from_json(json!({
                "metadata": {"name": "legacy"},
                "spec": {"ports": [{"name": "http", "port": 80}]}
            })),
        )
        .await?;
    endpoints
        .create(
            &PostParams::default(),
            &from_json(json!({
                "metadata": {"name": "legacy"},
                "subsets": [{
                    "addresses": [{"ip": "192.0.2.10"}],
                    "ports": [{"name": "http", "port": 8080}]
                }]
            })),
        )
        .await?;

    let mirrored = wait_for("a mirrored EndpointSlice", WAIT, || {
        let slices = slices.clone();
        async move {
            let lp = ListParams::default().labels(
                "kubernetes.io/service-name=legacy,endpointslice.kubernetes.io/managed-by=endpointslicemirroring-controller.k8s.io",
            );
            slices.list(&lp).await.ok()?.items.into_iter().next()
        }
    })
    .await?;
    let addresses: Vec<String> = mirrored
        .endpoints
        .iter()
        .flat_map(|e| e.addresses.clone())
        .collect();
    assert_eq!(addresses, vec!["192.0.2.10".to_string()]);
    Ok(())
}

#[tokio::test]
async fn endpointslice_controller_serves_services_with_selectors() -> Result<()> {
    let env = TestEnv::shared();
    let ns = env.namespace("selector").await?;
    let client = env.client().await?;
    let services: Api<Service> = Api::namespaced(client.clone(), ns.name());
    let slices: Api<EndpointSlice> = Api::namespaced(client, ns.name());
    services
        .create(
            &PostParams::default(),
            &from_json(json!({
                "metadata": {"name": "web"},
                "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}
            })),
        )
        .await?;
    wait_for("the endpointslice controller's slice", WAIT, || {
        let slices = slices.clone();
        async move {
            let lp = ListParams::default().labels(
                "kubernetes.io/service-name=web,endpointslice.kubernetes.io/managed-by=endpointslice-controller.k8s.io",
            );
            slices.list(&lp).await.ok()?.items.into_iter().next()
        }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn garbage_collector_removes_slices_owned_by_a_deleted_service() -> Result<()> {
    let env = TestEnv::shared();
    let ns = env.namespace("gc").await?;
    let client = env.client().await?;
    let services: Api<Service> = Api::namespaced(client.clone(), ns.name());
    let slices: Api<EndpointSlice> = Api::namespaced(client, ns.name());
    let svc = services
        .create(
            &PostParams::default(),
            &from_json(json!({
                "metadata": {"name": "owned"},
                "spec": {"clusterIP": "None", "ports": [{"port": 80}]}
            })),
        )
        .await?;
    let uid = svc.metadata.uid.clone().expect("created service has a uid");
    slices
        .create(
            &PostParams::default(),
            &from_json(json!({
                "metadata": {
                    "name": "owned-1",
                    "labels": {"kubernetes.io/service-name": "owned",
                               "endpointslice.kubernetes.io/managed-by": "test.example"},
                    "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "owned", "uid": uid}]
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["192.0.2.20"]}],
                "ports": [{"port": 80}]
            })),
        )
        .await?;
    services
        .delete("owned", &DeleteParams::background())
        .await?;
    wait_for("the slice to be garbage-collected", WAIT, || {
        let slices = slices.clone();
        async move {
            match slices.get_opt("owned-1").await {
                Ok(None) => Some(()),
                _ => None,
            }
        }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn rbac_is_enforced_for_the_unprivileged_identity() -> Result<()> {
    let env = TestEnv::shared();
    let ns = env.namespace("rbac").await?;
    let admin = env.client().await?;
    let user = env.user_client().await?;
    let as_user: Api<Service> = Api::namespaced(user, ns.name());
    let svc: Service = from_json(json!({
        "metadata": {"name": "probe"},
        "spec": {"clusterIP": "None", "ports": [{"port": 80}]}
    }));

    let refused = as_user.create(&PostParams::default(), &svc).await;
    match refused {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("expected 403 Forbidden, got {other:?}"),
    }

    let roles: Api<Role> = Api::namespaced(admin.clone(), ns.name());
    roles
        .create(
            &PostParams::default(),
            &from_json(json!({
                "metadata": {"name": "services-writer"},
                "rules": [{"apiGroups": [""], "resources": ["services"], "verbs": ["create", "get"]}]
            })),
        )
        .await?;
    let bindings: Api<RoleBinding> = Api::namespaced(admin, ns.name());
    bindings
        .create(
            &PostParams::default(),
            &from_json(json!({
                "metadata": {"name": "tester-services-writer"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "services-writer"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "tester"}]
            })),
        )
        .await?;
    // RBAC decisions follow the authorizer's informer: allow it a moment.
    wait_for("tester to be allowed to create services", WAIT, || {
        let as_user = as_user.clone();
        let svc = svc.clone();
        async move { as_user.create(&PostParams::default(), &svc).await.ok() }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn consul_blocking_query_returns_on_registration() -> Result<()> {
    let env = TestEnv::shared();
    let consul = ConsulClient::new(env.consul_addr()?)?;
    let (_, index) = consul.get("/v1/catalog/services").await?;
    assert!(index > 0, "consul returns an index");

    let name = unique_name("blocking");
    let waiter = {
        let consul = consul.clone();
        tokio::spawn(async move {
            consul
                .get(&format!("/v1/catalog/services?index={index}&wait=20s"))
                .await
        })
    };
    consul
        .put(
            "/v1/agent/service/register",
            &json!({"Name": name, "Address": "192.0.2.30", "Port": 8080,
                    "Check": {"TTL": "60s", "Status": "passing"}}),
        )
        .await?;
    let (services, new_index) = tokio::time::timeout(WAIT, waiter).await???;
    assert!(new_index > index, "index advanced: {index} -> {new_index}");
    assert!(services.get(&name).is_some(), "{services}");
    consul
        .put(
            &format!("/v1/agent/service/deregister/{name}"),
            &json!(null),
        )
        .await?;
    Ok(())
}

/// The instances of `app` in a Eureka `/apps` document (a list or, for one, an object).
fn eureka_instances(apps: &serde_json::Value, app: &str) -> Vec<serde_json::Value> {
    let as_list = |v: &serde_json::Value| match v {
        serde_json::Value::Array(items) => items.clone(),
        serde_json::Value::Null => Vec::new(),
        other => vec![other.clone()],
    };
    as_list(&apps["applications"]["application"])
        .into_iter()
        .filter(|a| a["name"] == app)
        .flat_map(|a| as_list(&a["instance"]))
        .collect()
}

#[tokio::test]
async fn eureka_registration_shows_in_apps_and_cancel_removes_it() -> Result<()> {
    let env = TestEnv::shared();
    let eureka = EurekaClient::new(env.eureka_url()?)?;
    let apps = eureka.apps().await?;
    assert!(apps["applications"].is_object(), "{apps}");

    let app = unique_name("eureka").to_uppercase();
    let id = format!("{}-1", app.to_lowercase());
    eureka
        .register(
            &app,
            &instance_json(
                &app,
                &id,
                "192.0.2.40",
                Some(8080),
                None,
                "UP",
                &[("zone", "a")],
            ),
        )
        .await?;
    let (instance, hashcode) = wait_for("the registration in /apps", WAIT, || {
        let eureka = eureka.clone();
        let app = app.clone();
        async move {
            let apps = eureka.apps().await.ok()?;
            let instance = eureka_instances(&apps, &app).into_iter().next()?;
            let hashcode = apps["applications"]["apps__hashcode"].as_str()?.to_string();
            Some((instance, hashcode))
        }
    })
    .await?;
    assert!(hashcode.contains("UP_"), "apps__hashcode {hashcode}");
    assert_eq!(instance["instanceId"], id.as_str(), "{instance}");
    assert_eq!(instance["ipAddr"], "192.0.2.40", "{instance}");
    assert_eq!(instance["status"], "UP", "{instance}");
    assert_eq!(instance["metadata"]["zone"], "a", "{instance}");

    eureka.set_status(&app, &id, "OUT_OF_SERVICE").await?;
    wait_for("the status override in /apps", WAIT, || {
        let eureka = eureka.clone();
        let app = app.clone();
        async move {
            let apps = eureka.apps().await.ok()?;
            let instance = eureka_instances(&apps, &app).into_iter().next()?;
            (instance["status"] == "OUT_OF_SERVICE").then_some(())
        }
    })
    .await?;

    eureka.cancel(&app, &id).await?;
    wait_for("the cancelled instance to leave /apps", WAIT, || {
        let eureka = eureka.clone();
        let app = app.clone();
        async move {
            let apps = eureka.apps().await.ok()?;
            eureka_instances(&apps, &app).is_empty().then_some(())
        }
    })
    .await?;
    Ok(())
}
