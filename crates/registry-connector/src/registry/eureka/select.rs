//! Which Eureka applications are published, under which names, with which instances,
//! ports and readiness. Pure functions from the [`Mirror`](super::mirror::Mirror)'s
//! instances to [`MicroSvcMeta`]; what is left out is returned for the caller to log
//! and count.
//!
//! The rules:
//! - with filter metadata (`key=value` pairs), only instances carrying every pair take
//!   part; an application none of whose instances take part is not published;
//! - instances registered from Kubernetes (metadata `external-source=kubernetes`, what
//!   the Kubernetes → Eureka direction writes) never take part, so that `both` mode does
//!   not publish them back;
//! - the application name (Eureka upper-cases it) is the registry name, behind the
//!   service prefix; the catalog turns it into a Kubernetes name (`ORDERS` → `orders`);
//! - an instance's address is its `ipAddr`, IPv4 or IPv6; its `port`, when enabled, is
//!   published as `http` and its `securePort`, when enabled, as `https`; an instance
//!   without a usable address, with an enabled port out of range, or with no enabled port
//!   is skipped;
//! - an instance is ready when its status is `UP`; with `passing_only` the others
//!   (`DOWN`, `STARTING`, `OUT_OF_SERVICE`, `UNKNOWN`) are left out, otherwise published
//!   as not ready. An application stays published while it has instances taking part,
//!   even if none is ready: a failing service empties its endpoints instead of losing
//!   its Service;
//! - allow-listed metadata keys become Service labels or annotations when every
//!   instance taking part that has the key agrees on its value (see
//!   [`crate::registry::metadata`]); health does not matter here, so labels do not flap;
//! - the domain (the ExternalName target) is the instances' `vipAddress` (the first of
//!   a comma-separated list, lowercased; the smallest over the instances, so it does not
//!   depend on order), else the lowercased application name.

use crate::model::{
    MicroEndpoint, MicroEndpointAddr, MicroSvcAppProtocol, MicroSvcDomainName, MicroSvcMeta,
    MicroSvcName, MicroSvcPort,
};
use crate::naming::{is_dns1123_subdomain, is_valid_external_name, kube_service_name};
use crate::registry::metadata::{matches_filter, MetadataAllowList, MetadataIssue};

use super::api::{Instance, Status};
use super::mirror::AppInstances;

/// The selection rules of the Eureka source.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only instances with all these metadata entries take part.
    pub filter_metadata: Vec<(String, String)>,
    /// Publish only `UP` instances.
    pub passing_only: bool,
    /// Prepended to every published name.
    pub service_prefix: String,
    /// Metadata keys copied onto the Service.
    pub metadata: MetadataAllowList,
}

pub use crate::registry::SkipReason;

/// An instance left out, with what finds it in Eureka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedInstance {
    pub app: String,
    pub instance_id: String,
    pub reason: SkipReason,
}

/// What one application publishes.
#[derive(Debug, Clone, Default)]
pub struct Built {
    /// `None` when no instance takes part.
    pub service: Option<MicroSvcMeta>,
    pub skipped: Vec<SkippedInstance>,
    /// Allow-listed metadata left out.
    pub metadata_issues: Vec<MetadataIssue>,
}

impl Selection {
    /// The registry name `app` is published under.
    pub fn published_name(&self, app: &str) -> MicroSvcName {
        MicroSvcName(format!("{}{}", self.service_prefix, app))
    }

    /// Whether `instance` carries every filter metadata entry and did not come from
    /// Kubernetes (`external-source=kubernetes`, written by a registry-connector's
    /// Kubernetes → Eureka direction): publishing those back into Kubernetes would loop
    /// in `both` mode, and duplicate what the cluster already has in any mode.
    pub fn takes_part(&self, instance: &Instance) -> bool {
        !super::register::is_exported(&instance.metadata)
            && matches_filter(&instance.metadata, &self.filter_metadata)
    }

    /// Builds what the application `app` publishes from its instances.
    pub fn build(&self, app: &str, instances: &AppInstances) -> Built {
        let mut built = Built::default();
        let members: Vec<(&str, &Instance)> = instances
            .iter()
            .filter(|(_, i)| self.takes_part(i))
            .collect();
        if members.is_empty() {
            return built;
        }
        let mut endpoints = Vec::new();
        for (id, instance) in &members {
            match endpoint(instance) {
                Ok(endpoint) if self.passing_only && !endpoint.ready => {}
                Ok(endpoint) => endpoints.push(endpoint),
                Err(reason) => built.skipped.push(SkippedInstance {
                    app: app.to_string(),
                    instance_id: id.to_string(),
                    reason,
                }),
            }
        }
        let domain = members
            .iter()
            .filter_map(|(_, i)| vip_domain(i))
            .min()
            .unwrap_or_else(|| fallback_domain(app));
        let (metadata, issues) = self
            .metadata
            .apply(members.iter().map(|(_, i)| &i.metadata));
        built.metadata_issues = issues;
        built.service = Some(
            MicroSvcMeta::new(
                self.published_name(app),
                MicroSvcDomainName(domain),
                endpoints,
            )
            .with_metadata(metadata),
        );
        built
    }
}

fn endpoint(instance: &Instance) -> Result<MicroEndpoint, SkipReason> {
    let ip = instance
        .ip_addr
        .as_deref()
        .map(str::trim)
        .filter(|ip| !ip.is_empty())
        .ok_or(SkipReason::NoAddress)?;
    let addr: MicroEndpointAddr = ip.parse()?;
    let mut ports = std::collections::BTreeMap::new();
    // The secure port goes in first so that, should both name the same number, the
    // plain one (`http`) wins, as the port enabled by default.
    for (number, protocol) in [
        (instance.https_port(), MicroSvcAppProtocol::new("https")),
        (instance.http_port(), MicroSvcAppProtocol::Http),
    ] {
        let Some(number) = number else { continue };
        let port = u16::try_from(number)
            .ok()
            .and_then(|p| MicroSvcPort::new(p).ok())
            .ok_or(SkipReason::Port(number))?;
        ports.insert(port, protocol);
    }
    if ports.is_empty() {
        return Err(SkipReason::NoPort);
    }
    Ok(MicroEndpoint {
        addr,
        ports,
        ready: instance.status == Status::Up,
        zone: None,
    })
}

/// The first VIP address of the instance, when it is a DNS name.
/// The domain of an application without a usable `vipAddress`: its lowercased name, or,
/// when that is no DNS name (`ORDER_SERVICE`), the sanitised Service name, so that an
/// ExternalName Service is not refused by the apiserver at every reconcile.
fn fallback_domain(app: &str) -> String {
    let lower = app.trim().to_ascii_lowercase();
    if is_valid_external_name(&lower) {
        lower
    } else {
        kube_service_name(app)
    }
}

fn vip_domain(instance: &Instance) -> Option<String> {
    let vip = instance.vip_address.as_deref()?;
    let first = vip.split(',').next()?.trim().trim_end_matches('.');
    let lower = first.to_ascii_lowercase();
    is_dns1123_subdomain(&lower).then_some(lower)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::eureka::api::PortInfo;

    fn port(number: i64, enabled: bool) -> Option<PortInfo> {
        Some(PortInfo {
            number: Some(number),
            enabled: Some(enabled),
        })
    }

    fn instance(ip: &str, status: Status) -> Instance {
        Instance {
            instance_id: Some(format!("{ip}-id")),
            ip_addr: Some(ip.to_string()),
            status,
            port: port(8080, true),
            secure_port: port(8443, false),
            vip_address: Some("orders-vip".into()),
            ..Instance::default()
        }
    }

    fn app(instances: Vec<Instance>) -> AppInstances {
        instances
            .into_iter()
            .enumerate()
            .map(|(i, instance)| (format!("i{i}"), instance))
            .collect()
    }

    fn selection(passing_only: bool) -> Selection {
        Selection {
            passing_only,
            ..Selection::default()
        }
    }

    fn addresses(meta: &MicroSvcMeta) -> Vec<(String, bool)> {
        meta.endpoints
            .iter()
            .map(|e| (e.addr.to_string(), e.ready))
            .collect()
    }

    #[test]
    fn up_instances_are_ready_and_others_left_out_or_not_ready() {
        let instances = app(vec![
            instance("192.0.2.1", Status::Up),
            instance("192.0.2.2", Status::Down),
            instance("192.0.2.3", Status::OutOfService),
            instance("192.0.2.4", Status::Starting),
            instance("2001:db8::5", Status::Up),
        ]);
        let built = selection(true).build("ORDERS", &instances);
        let meta = built.service.expect("published");
        assert_eq!(meta.registry_name.as_str(), "ORDERS");
        assert_eq!(meta.domain.as_str(), "orders-vip");
        assert_eq!(
            addresses(&meta),
            [("192.0.2.1".into(), true), ("2001:db8::5".into(), true)]
        );

        let meta = selection(false)
            .build("ORDERS", &instances)
            .service
            .expect("published");
        assert_eq!(meta.endpoints.len(), 5);
        assert_eq!(meta.endpoints.iter().filter(|e| e.ready).count(), 2);
    }

    #[test]
    fn an_app_with_no_ready_instance_stays_published_and_empty() {
        let built =
            selection(true).build("ORDERS", &app(vec![instance("192.0.2.1", Status::Down)]));
        let meta = built.service.expect("still published");
        assert!(meta.endpoints.is_empty());
    }

    #[test]
    fn ports_follow_their_enabled_flags() {
        let mut both = instance("192.0.2.1", Status::Up);
        both.secure_port = port(8443, true);
        let mut secure_only = instance("192.0.2.2", Status::Up);
        secure_only.port = port(80, false);
        secure_only.secure_port = port(443, true);
        let meta = selection(true)
            .build("PAY", &app(vec![both, secure_only]))
            .service
            .expect("published");
        let ports: Vec<(u16, String)> = meta
            .ports()
            .into_iter()
            .map(|(p, proto)| (p.get(), proto.to_string()))
            .collect();
        assert_eq!(
            ports,
            [
                (443, "https".into()),
                (8080, "http".into()),
                (8443, "https".into())
            ]
        );
    }

    #[test]
    fn bad_instances_are_skipped_with_their_reason() {
        let mut no_ip = instance("192.0.2.1", Status::Up);
        no_ip.ip_addr = Some(" ".into());
        let loopback = instance("127.0.0.1", Status::Up);
        let mut bad_port = instance("192.0.2.3", Status::Up);
        bad_port.port = port(70000, true);
        let mut no_port = instance("192.0.2.4", Status::Up);
        no_port.port = port(8080, false);
        let good = instance("192.0.2.5", Status::Up);
        let built =
            selection(true).build("A", &app(vec![no_ip, loopback, bad_port, no_port, good]));
        let reasons: Vec<&str> = built.skipped.iter().map(|s| s.reason.as_label()).collect();
        assert_eq!(
            reasons,
            [
                "no_address",
                "loopback_address",
                "invalid_port",
                "no_enabled_port"
            ]
        );
        assert_eq!(
            addresses(&built.service.expect("published")),
            [("192.0.2.5".into(), true)]
        );
    }

    #[test]
    fn instances_registered_from_kubernetes_are_never_published_back() {
        let mut exported = instance("192.0.2.1", Status::Up);
        exported
            .metadata
            .insert("external-source".into(), "kubernetes".into());
        exported
            .metadata
            .insert("registry-connector-id".into(), "any".into());
        let mut from_a_vm = instance("192.0.2.2", Status::Up);
        from_a_vm
            .metadata
            .insert("external-source".into(), "vm".into());
        let s = selection(false);
        // A shared application publishes only the instances that did not come from
        // Kubernetes; one holding nothing else is not published at all.
        let meta = s
            .build("WEB", &app(vec![exported.clone(), from_a_vm]))
            .service
            .expect("published");
        assert_eq!(addresses(&meta), [("192.0.2.2".into(), true)]);
        assert!(s
            .build("ONLY-EXPORTED", &app(vec![exported]))
            .service
            .is_none());
    }

    #[test]
    fn filter_metadata_selects_instances_and_apps() {
        let mut tagged = instance("192.0.2.1", Status::Up);
        tagged.metadata.insert("team".into(), "blue".into());
        let untagged = instance("192.0.2.2", Status::Up);
        let s = Selection {
            filter_metadata: vec![("team".into(), "blue".into())],
            passing_only: true,
            service_prefix: "eu-".into(),
            ..Selection::default()
        };
        let meta = s
            .build("A", &app(vec![tagged, untagged.clone()]))
            .service
            .expect("published");
        assert_eq!(meta.registry_name.as_str(), "eu-A");
        assert_eq!(addresses(&meta), [("192.0.2.1".into(), true)]);
        assert!(s.build("B", &app(vec![untagged])).service.is_none());
    }

    #[test]
    fn allow_listed_metadata_goes_to_the_service_whatever_the_health() {
        let mut up = instance("192.0.2.1", Status::Up);
        up.metadata.insert("version".into(), "2.1".into());
        up.metadata.insert("zone".into(), "eu-1".into());
        let mut down = instance("192.0.2.2", Status::Down);
        down.metadata.insert("version".into(), "2.1".into());
        down.metadata.insert("zone".into(), "eu-2".into());
        let s = Selection {
            passing_only: true,
            metadata: MetadataAllowList::new(["version".to_string()], ["zone".to_string()])
                .expect("valid"),
            ..Selection::default()
        };
        let built = s.build("A", &app(vec![up, down]));
        let meta = built.service.expect("published");
        assert_eq!(
            meta.metadata.labels.get("version").map(String::as_str),
            Some("2.1")
        );
        assert!(meta.metadata.annotations.is_empty(), "zones disagree");
        assert_eq!(built.metadata_issues.len(), 1);
    }

    #[test]
    fn the_domain_is_the_first_valid_vip_else_the_app_name() {
        let mut a = instance("192.0.2.1", Status::Up);
        a.vip_address = Some("Zeta.Example, alpha".into());
        let mut b = instance("192.0.2.2", Status::Up);
        b.vip_address = Some("beta.example".into());
        let mut c = instance("192.0.2.3", Status::Up);
        c.vip_address = Some("not a name".into());
        let meta = selection(true)
            .build("ORDERS", &app(vec![a, b, c.clone()]))
            .service
            .expect("published");
        assert_eq!(meta.domain.as_str(), "beta.example");
        let meta = selection(true)
            .build("ORDERS", &app(vec![c.clone()]))
            .service
            .expect("published");
        assert_eq!(meta.domain.as_str(), "orders");
        let meta = selection(true)
            .build("ORDER_SERVICE", &app(vec![c]))
            .service
            .expect("published");
        assert_eq!(meta.domain.as_str(), "order-service", "a DNS name");
    }
}
