//! Typed resources: what kind, which object, where it came from, and its spec.

use crate::{k8s, networking as net, security as sec};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// Every kind the mesh understands. Anything else in a config dir is ignored (and listed as
/// ignored), the way istiod ignores objects it does not watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    VirtualService,
    DestinationRule,
    Gateway,
    ServiceEntry,
    WorkloadEntry,
    WorkloadGroup,
    Sidecar,
    PeerAuthentication,
    AuthorizationPolicy,
    RequestAuthentication,
    Telemetry,
    Service,
    Endpoints,
    EndpointSlice,
    Pod,
    Namespace,
}

impl Kind {
    /// Map `apiVersion` + `kind` to a known kind; `None` for objects the mesh does not read.
    pub fn from_api(api_version: &str, kind: &str) -> Option<Kind> {
        let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        let version = api_version.rsplit('/').next().unwrap_or("");
        let k = match (group, kind) {
            ("networking.istio.io", "VirtualService") => Kind::VirtualService,
            ("networking.istio.io", "DestinationRule") => Kind::DestinationRule,
            ("networking.istio.io", "Gateway") => Kind::Gateway,
            ("networking.istio.io", "ServiceEntry") => Kind::ServiceEntry,
            ("networking.istio.io", "WorkloadEntry") => Kind::WorkloadEntry,
            ("networking.istio.io", "WorkloadGroup") => Kind::WorkloadGroup,
            ("networking.istio.io", "Sidecar") => Kind::Sidecar,
            ("security.istio.io", "PeerAuthentication") => Kind::PeerAuthentication,
            ("security.istio.io", "AuthorizationPolicy") => Kind::AuthorizationPolicy,
            ("security.istio.io", "RequestAuthentication") => Kind::RequestAuthentication,
            ("telemetry.istio.io", "Telemetry") => Kind::Telemetry,
            ("", "Service") if version == "v1" => Kind::Service,
            ("", "Endpoints") if version == "v1" => Kind::Endpoints,
            ("", "Pod") if version == "v1" => Kind::Pod,
            ("", "Namespace") if version == "v1" => Kind::Namespace,
            ("discovery.k8s.io", "EndpointSlice") => Kind::EndpointSlice,
            _ => return None,
        };
        let istio = group.ends_with(".istio.io");
        if istio && !matches!(version, "v1alpha3" | "v1beta1" | "v1" | "v1alpha1") {
            return None;
        }
        Some(k)
    }

    pub fn is_cluster_scoped(&self) -> bool {
        matches!(self, Kind::Namespace)
    }

    pub fn is_istio(&self) -> bool {
        !matches!(
            self,
            Kind::Service | Kind::Endpoints | Kind::EndpointSlice | Kind::Pod | Kind::Namespace
        )
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Where a resource was read from: the file and the 0-based document index in it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Origin {
    pub file: PathBuf,
    pub document: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (document {})", self.file.display(), self.document)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Meta {
    pub name: String,
    /// The object's namespace; `default` when the YAML leaves it out, as kubectl would.
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// Identity of a resource in the store: kind, namespace, name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ResourceKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind.is_cluster_scoped() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

// Specs are built once per config change and shared; boxing the large variants would only
// add indirection for every reader.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Spec {
    VirtualService(net::VirtualService),
    DestinationRule(net::DestinationRule),
    Gateway(net::Gateway),
    ServiceEntry(net::ServiceEntry),
    WorkloadEntry(net::WorkloadEntry),
    WorkloadGroup(net::WorkloadGroup),
    Sidecar(net::Sidecar),
    PeerAuthentication(sec::PeerAuthentication),
    AuthorizationPolicy(sec::AuthorizationPolicy),
    RequestAuthentication(sec::RequestAuthentication),
    Telemetry(sec::Telemetry),
    Service(k8s::Service),
    Endpoints(k8s::Endpoints),
    EndpointSlice(k8s::EndpointSlice),
    Pod(k8s::Pod),
    Namespace(k8s::Namespace),
}

/// One decoded object.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Resource {
    pub kind: Kind,
    pub meta: Meta,
    pub spec: Spec,
    pub origin: Origin,
}

impl Resource {
    pub fn key(&self) -> ResourceKey {
        ResourceKey {
            kind: self.kind,
            namespace: self.meta.namespace.clone(),
            name: self.meta.name.clone(),
        }
    }
}
