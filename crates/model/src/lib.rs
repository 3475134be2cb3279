//! mizzen-model: the abstract model of the mesh (seed 002).
//!
//! - [`service`]: services, ports, protocols, endpoints and workloads.
//! - [`registry`]: platform adapters producing a [`registry::RegistrySnapshot`] (files with
//!   Kubernetes objects and ServiceEntry/WorkloadEntry today; a live Kubernetes watcher and VM
//!   auto-registration plug in as more adapters).
//! - [`push`]: the immutable [`push::PushContext`] that generators read, one per config change.
//! - [`proxy`]: a connected proxy's identity and the workload it fronts.
//! - [`locality`]: where a proxy and its endpoints sit, and `localityLbSetting`.
//! - [`security`]: PeerAuthentication resolution and SPIFFE identities of services.
//! - [`authz`]: which AuthorizationPolicies / RequestAuthentications apply to a proxy, and the
//!   JWKS the pilot fetched for them.

pub mod authz;
pub mod locality;
pub mod proxy;
pub mod push;
pub mod registry;
pub mod security;
pub mod service;

pub use proxy::{Proxy, ProxyType};
pub use push::{ConfigEntry, MeshSettings, PushContext};
pub use service::{Endpoint, Protocol, Resolution, Service, ServicePort, Workload};
