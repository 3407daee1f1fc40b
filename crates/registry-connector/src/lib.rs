//! registry-connector: keeps Kubernetes Services, EndpointSlices and Endpoints in sync
//! with the services of an external registry (Consul first).
//!
//! Data flows one way: a registry source feeds the [`catalog`]; the [`sink`] renders the
//! desired Kubernetes objects ([`render`], [`slicing`]), compares them with its reflector
//! caches ([`diff`]) and writes only what differs.
#![forbid(unsafe_code)]

pub mod catalog;
pub mod diff;
pub mod export;
pub mod labels;
pub mod model;
pub mod naming;
pub mod registry;
pub mod render;
pub mod runtime;
pub mod sink;
pub mod slicing;
