//! Services, ports, endpoints and workloads: the registry half of the model.

use std::collections::BTreeMap;
use std::net::IpAddr;

pub type Labels = BTreeMap<String, String>;

/// Application protocol of a service port, as Istio derives it from the port name prefix,
/// `appProtocol`, or the ServiceEntry/Gateway `protocol` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    GrpcWeb,
    Https,
    Tls,
    Tcp,
    Mongo,
    Redis,
    Mysql,
    Udp,
    /// Unnamed or unknown: detected per connection (Istio's protocol sniffing).
    Auto,
}

impl Protocol {
    /// Parse Istio's protocol names (case-insensitive).
    pub fn parse(s: &str) -> Protocol {
        match s.to_ascii_lowercase().as_str() {
            "http" | "http1" => Protocol::Http,
            "http2" | "h2c" | "kubernetes.io/h2c" => Protocol::Http2,
            "grpc" => Protocol::Grpc,
            "grpc-web" => Protocol::GrpcWeb,
            "https" => Protocol::Https,
            "tls" => Protocol::Tls,
            "tcp" => Protocol::Tcp,
            "mongo" => Protocol::Mongo,
            "redis" => Protocol::Redis,
            "mysql" => Protocol::Mysql,
            "udp" => Protocol::Udp,
            _ => Protocol::Auto,
        }
    }

    /// Kubernetes port naming convention: `http`, `http-web`, `grpc-api`, `tcp-db` ...
    pub fn from_port_name(name: &str) -> Protocol {
        let prefix = name.split('-').next().unwrap_or("");
        Protocol::parse(prefix)
    }

    /// Routed by the HTTP connection manager (L7).
    pub fn is_http(&self) -> bool {
        matches!(
            self,
            Protocol::Http | Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb
        )
    }

    /// Upstream must speak HTTP/2.
    pub fn is_http2(&self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Http => "HTTP",
            Protocol::Http2 => "HTTP2",
            Protocol::Grpc => "GRPC",
            Protocol::GrpcWeb => "GRPC-WEB",
            Protocol::Https => "HTTPS",
            Protocol::Tls => "TLS",
            Protocol::Tcp => "TCP",
            Protocol::Mongo => "MONGO",
            Protocol::Redis => "REDIS",
            Protocol::Mysql => "MYSQL",
            Protocol::Udp => "UDP",
            Protocol::Auto => "UnsupportedProtocol",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// How the proxy finds a service's endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Endpoints known to the control plane, sent over EDS.
    ClientSideLb,
    /// The proxy resolves the endpoint host names (STRICT_DNS).
    Dns,
    /// One DNS name, round-robin over its addresses (LOGICAL_DNS).
    DnsRoundRobin,
    /// Forward to the original destination.
    Passthrough,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceSource {
    Kubernetes,
    ServiceEntry { namespace: String, name: String },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    /// Fully qualified host, e.g. `reviews.default.svc.cluster.local` or `api.example.com`.
    pub hostname: String,
    pub namespace: String,
    pub name: String,
    pub ports: Vec<ServicePort>,
    /// The VIP (ClusterIP or the ServiceEntry's first IP address), if any.
    pub address: Option<IpAddr>,
    /// Extra addresses/CIDRs from a ServiceEntry.
    pub addresses: Vec<String>,
    pub resolution: Resolution,
    pub mesh_external: bool,
    pub labels: Labels,
    pub export_to: Vec<String>,
    pub source: ServiceSource,
}

impl Service {
    pub fn port(&self, number: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == number)
    }
}

/// Where a workload sits: `region/zone/subzone`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub sub_zone: String,
}

impl Locality {
    pub fn parse(s: &str) -> Locality {
        let mut it = s.split('/');
        Locality {
            region: it.next().unwrap_or("").to_string(),
            zone: it.next().unwrap_or("").to_string(),
            sub_zone: it.next().unwrap_or("").to_string(),
        }
    }
}

/// One backend of one service port.
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    /// IP address, or a host name for DNS-resolved ServiceEntries.
    pub address: String,
    pub port: u16,
    pub labels: Labels,
    pub service_account: String,
    pub locality: Locality,
    pub weight: u32,
    pub workload: String,
    pub namespace: String,
    pub healthy: bool,
}

impl Endpoint {
    /// Istio's injector labels pods that have a sidecar `security.istio.io/tlsMode: istio`
    /// (WorkloadEntries carry it by hand): such endpoints accept mesh mTLS.
    pub fn has_sidecar(&self) -> bool {
        self.labels
            .get(crate::security::TLS_MODE_LABEL)
            .map(String::as_str)
            == Some(crate::security::TLS_MODE_ISTIO)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadKind {
    Pod,
    WorkloadEntry,
}

/// A running instance: a pod or a VM (WorkloadEntry).
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub ip: Option<IpAddr>,
    pub labels: Labels,
    pub service_account: String,
    pub locality: Locality,
    pub kind: WorkloadKind,
    /// Named ports (pod container ports, WorkloadEntry `ports`).
    pub named_ports: BTreeMap<String, u16>,
}

/// `selector` matches `labels` when every selector pair is present (an empty selector
/// matches everything, as Kubernetes and Istio define it).
pub fn selector_matches(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
