//! registry-connector: keeps Kubernetes Services, EndpointSlices and Endpoints in sync
//! with the services of an external registry (Consul first).
#![forbid(unsafe_code)]
