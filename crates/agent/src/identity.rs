//! Who this proxy is: the xDS node identity, resolved the way Istio's pilot-agent does it.
//!
//! The control plane picks a proxy's config from its node id and metadata alone, so these
//! have to match Istio's conventions exactly (see ARCHITECTURE.md, "Contracts"):
//!
//! - id `TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.<domain>`;
//! - metadata `NAMESPACE`, `NAME`, `LABELS` (a string map), `INSTANCE_IPS`,
//!   `SERVICE_ACCOUNT`, `CLUSTER_ID`, `WORKLOAD_NAME`, `MESH_ID`, `ISTIO_VERSION`, plus every
//!   `ISTIO_META_*` variable the injector set, and `PROXY_CONFIG` (the pod's ProxyConfig, from
//!   the injector's `PROXY_CONFIG` variable, as a JSON string).
//!
//! Every value comes from an explicit flag when one was given, else from the environment
//! Istio's injector writes into the sidecar container (`POD_NAME`, `POD_NAMESPACE`,
//! `INSTANCE_IP`, `SERVICE_ACCOUNT`, `ISTIO_META_*`, `ISTIO_METAJSON_LABELS`), else from the
//! host. Resolution is a pure function of ([`IdentityInput`], environment map, [`HostInfo`]) so
//! it can be tested without touching the real process environment.
//!
//! This module is shared by the Envoy agent and the native proxy: both must present the same
//! node to the pilot.

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

/// The Istio version we claim in `ISTIO_VERSION`: the crate version, so the pilot can tell
/// Mizzen builds apart.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Prefix of the injector's per-key metadata variables (`ISTIO_META_CLUSTER_ID=...`).
const META_PREFIX: &str = "ISTIO_META_";

/// Bad identity input. Each variant names the offending value so the operator can fix the
/// flag or the environment variable without guessing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("proxy type {0:?} is not sidecar or router")]
    BadProxyType(String),
    #[error("label {0:?} is not KEY=VALUE")]
    BadLabel(String),
    #[error("label {0:?} has an empty key")]
    EmptyLabelKey(String),
    #[error("IP address {value:?} (from {source_name}) is not a valid IP")]
    BadIp { value: String, source_name: String },
    #[error("ISTIO_METAJSON_LABELS is not a JSON object of strings: {0}")]
    BadLabelsJson(String),
    #[error("discovery address {0:?} is not HOST:PORT")]
    BadDiscoveryAddress(String),
    #[error("{field} {value:?} must not be empty or contain '~' or '.'")]
    BadName { field: &'static str, value: String },
    #[error("PROXY_CONFIG is not a ProxyConfig as a JSON object: {0}")]
    BadProxyConfig(String),
}

/// `sidecar` (an application's proxy) or `router` (a gateway), the first node id field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProxyType {
    Sidecar,
    Router,
}

impl ProxyType {
    pub fn as_str(&self) -> &'static str {
        match self {
            ProxyType::Sidecar => "sidecar",
            ProxyType::Router => "router",
        }
    }
}

impl FromStr for ProxyType {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sidecar" => Ok(ProxyType::Sidecar),
            "router" => Ok(ProxyType::Router),
            other => Err(IdentityError::BadProxyType(other.to_string())),
        }
    }
}

impl fmt::Display for ProxyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the pilot's xDS server is: a host (IP or DNS name) and a port. Kept as host + port
/// rather than a `SocketAddr` because in Kubernetes it is a DNS name
/// (`istiod.istio-system.svc:15010`) that Envoy resolves itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryAddress {
    pub host: String,
    pub port: u16,
}

impl DiscoveryAddress {
    /// The host as an IP, when it is one (then Envoy needs no DNS to reach the pilot).
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

impl FromStr for DiscoveryAddress {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IdentityError::BadDiscoveryAddress(s.to_string());
        if let Ok(sa) = s.parse::<SocketAddr>() {
            if sa.port() == 0 {
                return Err(bad());
            }
            return Ok(DiscoveryAddress {
                host: sa.ip().to_string(),
                port: sa.port(),
            });
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        // A DNS name: letters, digits, '-', '.', '_' only; anything else (spaces, a bare
        // IPv6 without brackets, a URL scheme) is a typo we should not hand to Envoy.
        let valid_host = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        if !valid_host || port == 0 {
            return Err(bad());
        }
        Ok(DiscoveryAddress {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for DiscoveryAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip() {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

/// What the operator said explicitly (command-line flags). `None` / empty means "not given":
/// the environment and then the host fill the gap.
#[derive(Clone, Debug, Default)]
pub struct IdentityInput {
    pub pod_name: Option<String>,
    pub namespace: Option<String>,
    pub ip: Option<String>,
    pub service_account: Option<String>,
    /// `k=v` strings as typed on the command line.
    pub labels: Vec<String>,
    pub cluster_id: Option<String>,
    /// DNS domain; `cluster.local` when absent.
    pub domain: Option<String>,
}

/// Facts about the host, used only as last-resort defaults. Split out so tests can supply
/// them instead of reading the machine they run on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostInfo {
    pub hostname: String,
    /// First non-loopback IPv4 address, if any.
    pub ipv4: Option<Ipv4Addr>,
}

impl HostInfo {
    /// Read the hostname and the first non-loopback, up IPv4 interface address.
    pub fn detect() -> HostInfo {
        let hostname = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_string());
        let ipv4 = first_ipv4();
        HostInfo { hostname, ipv4 }
    }
}

fn first_ipv4() -> Option<Ipv4Addr> {
    use nix::net::if_::InterfaceFlags;
    let addrs = match nix::ifaddrs::getifaddrs() {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(error = %e, "cannot list interfaces; falling back to 127.0.0.1");
            return None;
        }
    };
    addrs
        .filter(|ifa| {
            ifa.flags.contains(InterfaceFlags::IFF_UP)
                && !ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK)
        })
        .filter_map(|ifa| ifa.address.and_then(|a| a.as_sockaddr_in().map(|s| s.ip())))
        .find(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

/// A resolved proxy identity: everything the node id and metadata are made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub proxy_type: ProxyType,
    pub pod_name: String,
    pub namespace: String,
    pub ip: IpAddr,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub cluster_id: String,
    pub domain: String,
    pub mesh_id: String,
    pub workload_name: String,
    /// Extra string metadata from `ISTIO_META_*` that is not one of the keys above.
    pub extra_metadata: BTreeMap<String, String>,
}

impl Identity {
    /// Resolve an identity: flags first, then the injector's environment, then the host.
    ///
    /// `env` is the process environment as a map (pass `std::env::vars().collect()`).
    pub fn resolve(
        proxy_type: ProxyType,
        input: &IdentityInput,
        env: &BTreeMap<String, String>,
        host: &HostInfo,
    ) -> Result<Identity, IdentityError> {
        // Empty strings count as unset: Kubernetes' downward API yields "" for missing fields
        // and an empty node-id field would produce an id the pilot cannot parse.
        let env_get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
        let flag = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());

        // The injector's per-key metadata, prefix stripped: ISTIO_META_CLUSTER_ID -> CLUSTER_ID.
        let env_meta: BTreeMap<String, String> = env
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(META_PREFIX)
                    .filter(|rest| !rest.is_empty())
                    .map(|rest| (rest.to_string(), v.clone()))
            })
            .collect();

        let pod_name = flag(&input.pod_name)
            .or_else(|| env_get("POD_NAME"))
            // A FQDN hostname would put dots into the node id's POD.NAMESPACE field.
            .unwrap_or_else(|| short_hostname(&host.hostname));
        check_name("pod name", &pod_name)?;
        let namespace = flag(&input.namespace)
            .or_else(|| env_get("POD_NAMESPACE"))
            .unwrap_or_else(|| "default".to_string());
        check_name("namespace", &namespace)?;

        let ip = match (flag(&input.ip), env_get("INSTANCE_IP")) {
            (Some(v), _) => parse_ip(&v, "--ip")?,
            (None, Some(v)) => parse_ip(&v, "INSTANCE_IP")?,
            (None, None) => IpAddr::V4(host.ipv4.unwrap_or(Ipv4Addr::LOCALHOST)),
        };

        let service_account = flag(&input.service_account)
            .or_else(|| env_get("SERVICE_ACCOUNT"))
            .unwrap_or_else(|| "default".to_string());

        // Labels: the injector's JSON first, explicit flags override key by key, so an
        // operator can correct one label without restating the rest.
        let mut labels = match env_get("ISTIO_METAJSON_LABELS") {
            Some(json) => parse_labels_json(&json)?,
            None => BTreeMap::new(),
        };
        for l in &input.labels {
            let (k, v) = parse_label(l)?;
            labels.insert(k, v);
        }

        let cluster_id = flag(&input.cluster_id)
            .or_else(|| env_meta.get("CLUSTER_ID").cloned())
            .unwrap_or_else(|| "Kubernetes".to_string());
        let domain = flag(&input.domain).unwrap_or_else(|| "cluster.local".to_string());
        // Istio's MESH_ID defaults to the trust domain, which is cluster.local by default.
        let mesh_id = env_meta
            .get("MESH_ID")
            .cloned()
            .unwrap_or_else(|| "cluster.local".to_string());
        let workload_name = env_meta
            .get("WORKLOAD_NAME")
            .cloned()
            .unwrap_or_else(|| derive_workload_name(&pod_name, &labels));

        // Keys we compute win over a stray ISTIO_META_ of the same name: the node id and the
        // metadata must never disagree about who this proxy is.
        let mut extra_metadata: BTreeMap<String, String> = env_meta
            .into_iter()
            .filter(|(k, _)| !RESERVED_KEYS.contains(&k.as_str()))
            .collect();
        // The pod's ProxyConfig, which Istio's injector writes as JSON into PROXY_CONFIG (from
        // the proxy.istio.io/config annotation); the agent hands it to istiod as the node
        // metadata PROXY_CONFIG, which per-proxy settings (proxyHeaders ...) are read from.
        if let Some(pc) = env_get("PROXY_CONFIG") {
            let v: serde_json::Value = serde_json::from_str(&pc)
                .map_err(|e| IdentityError::BadProxyConfig(e.to_string()))?;
            if !v.is_object() {
                return Err(IdentityError::BadProxyConfig(format!(
                    "{v} is not an object"
                )));
            }
            extra_metadata.insert("PROXY_CONFIG".into(), v.to_string());
        }

        Ok(Identity {
            proxy_type,
            pod_name,
            namespace,
            ip,
            service_account,
            labels,
            cluster_id,
            domain,
            mesh_id,
            workload_name,
            extra_metadata,
        })
    }

    /// `TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.<domain>`, Istio's node id.
    pub fn node_id(&self) -> String {
        format!(
            "{}~{}~{}.{}~{}.svc.{}",
            self.proxy_type, self.ip, self.pod_name, self.namespace, self.namespace, self.domain
        )
    }

    /// Envoy's `node.cluster`: `<app label or workload name>.<namespace>` (Istio's default
    /// service cluster). Only used for Envoy's own stats and logs.
    pub fn service_cluster(&self) -> String {
        let app = self
            .labels
            .get("app")
            .or_else(|| self.labels.get("app.kubernetes.io/name"))
            .unwrap_or(&self.workload_name);
        format!("{app}.{}", self.namespace)
    }

    /// The node metadata as JSON: every value a string, except `LABELS`, a string map.
    pub fn metadata_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (k, v) in &self.extra_metadata {
            m.insert(k.clone(), serde_json::Value::String(v.clone()));
        }
        for (k, v) in self.fixed_metadata() {
            m.insert(k.to_string(), serde_json::Value::String(v));
        }
        let labels = self
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        m.insert("LABELS".to_string(), serde_json::Value::Object(labels));
        serde_json::Value::Object(m)
    }

    /// The node metadata as a protobuf `Struct`, for a proxy that speaks xDS itself.
    pub fn metadata_struct(&self) -> Struct {
        let string = |s: String| Value {
            kind: Some(Kind::StringValue(s)),
        };
        let mut fields: BTreeMap<String, Value> = self
            .extra_metadata
            .iter()
            .map(|(k, v)| (k.clone(), string(v.clone())))
            .collect();
        for (k, v) in self.fixed_metadata() {
            fields.insert(k.to_string(), string(v));
        }
        let labels = Struct {
            fields: self
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), string(v.clone())))
                .collect(),
        };
        fields.insert(
            "LABELS".to_string(),
            Value {
                kind: Some(Kind::StructValue(labels)),
            },
        );
        Struct {
            fields: fields.into_iter().collect(),
        }
    }

    /// The full xDS `Node` message (id, cluster, metadata).
    pub fn node(&self) -> Node {
        Node {
            id: self.node_id(),
            cluster: self.service_cluster(),
            metadata: Some(self.metadata_struct()),
            user_agent_name: "mizzen".to_string(),
            ..Default::default()
        }
    }

    fn fixed_metadata(&self) -> [(&'static str, String); 8] {
        [
            ("NAMESPACE", self.namespace.clone()),
            ("NAME", self.pod_name.clone()),
            ("INSTANCE_IPS", self.ip.to_string()),
            ("SERVICE_ACCOUNT", self.service_account.clone()),
            ("CLUSTER_ID", self.cluster_id.clone()),
            ("WORKLOAD_NAME", self.workload_name.clone()),
            ("MESH_ID", self.mesh_id.clone()),
            ("ISTIO_VERSION", VERSION.to_string()),
        ]
    }
}

/// Metadata keys derived from the identity itself; `ISTIO_META_` copies of these are ignored
/// (CLUSTER_ID, MESH_ID and WORKLOAD_NAME are read from it first, see `resolve`).
const RESERVED_KEYS: [&str; 9] = [
    "NAMESPACE",
    "NAME",
    "LABELS",
    "INSTANCE_IPS",
    "SERVICE_ACCOUNT",
    "CLUSTER_ID",
    "WORKLOAD_NAME",
    "MESH_ID",
    "ISTIO_VERSION",
];

fn short_hostname(h: &str) -> String {
    h.split('.').next().unwrap_or(h).to_string()
}

/// Node id fields are separated by `~` and the pod/namespace by `.`: either inside a name
/// would make the id ambiguous to the pilot's parser.
fn check_name(field: &'static str, value: &str) -> Result<(), IdentityError> {
    if value.is_empty() || value.contains('~') || value.contains('.') {
        return Err(IdentityError::BadName {
            field,
            value: value.to_string(),
        });
    }
    Ok(())
}

fn parse_ip(value: &str, source_name: &str) -> Result<IpAddr, IdentityError> {
    value.trim().parse().map_err(|_| IdentityError::BadIp {
        value: value.to_string(),
        source_name: source_name.to_string(),
    })
}

/// `k=v` (the value may itself contain `=` and may be empty, as Kubernetes allows).
pub fn parse_label(s: &str) -> Result<(String, String), IdentityError> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| IdentityError::BadLabel(s.to_string()))?;
    if k.trim().is_empty() {
        return Err(IdentityError::EmptyLabelKey(s.to_string()));
    }
    Ok((k.trim().to_string(), v.to_string()))
}

fn parse_labels_json(json: &str) -> Result<BTreeMap<String, String>, IdentityError> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| IdentityError::BadLabelsJson(e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| IdentityError::BadLabelsJson(format!("{json} is not an object")))?;
    obj.iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k.clone(), s.clone())),
            other => Err(IdentityError::BadLabelsJson(format!(
                "label {k:?} has non-string value {other}"
            ))),
        })
        .collect()
}

/// Characters Kubernetes uses for generated name suffixes (`k8s.io/apimachinery`
/// `rand.String`): no vowels and no look-alikes, which is what makes a hash "obvious".
const K8S_RAND_ALPHABET: &str = "bcdfghjklmnpqrstvwxz2456789";

fn is_k8s_rand(s: &str, min: usize, max: usize) -> bool {
    (min..=max).contains(&s.len()) && s.chars().all(|c| K8S_RAND_ALPHABET.contains(c))
}

/// The workload (Deployment, DaemonSet ...) a pod belongs to, guessed from its name the way
/// Istio's agent does when no owner information is at hand:
///
/// - `reviews-v1-545db77b95-xvqk2` (Deployment: pod-template hash + 5-char suffix) ->
///   `reviews-v1`;
/// - `fluentd-x7k2q` (DaemonSet/Job: 5-char suffix) -> `fluentd`;
/// - otherwise the `app` label, otherwise the pod name itself.
pub fn derive_workload_name(pod_name: &str, labels: &BTreeMap<String, String>) -> String {
    let parts: Vec<&str> = pod_name.split('-').collect();
    if let [head @ .., hash, suffix] = parts.as_slice() {
        if !head.is_empty() && is_k8s_rand(suffix, 5, 5) && is_k8s_rand(hash, 6, 10) {
            return head.join("-");
        }
    }
    if let [head @ .., suffix] = parts.as_slice() {
        if !head.is_empty() && is_k8s_rand(suffix, 5, 5) {
            return head.join("-");
        }
    }
    labels
        .get("app")
        .cloned()
        .unwrap_or_else(|| pod_name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostInfo {
        HostInfo {
            hostname: "myhost".to_string(),
            ipv4: Some(Ipv4Addr::new(10, 1, 2, 3)),
        }
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_come_from_host() {
        let id = Identity::resolve(
            ProxyType::Sidecar,
            &IdentityInput::default(),
            &BTreeMap::new(),
            &host(),
        )
        .unwrap();
        assert_eq!(
            id.node_id(),
            "sidecar~10.1.2.3~myhost.default~default.svc.cluster.local"
        );
        assert_eq!(id.service_account, "default");
        assert_eq!(id.cluster_id, "Kubernetes");
        assert_eq!(id.mesh_id, "cluster.local");
        assert_eq!(id.workload_name, "myhost");
        let no_ip = HostInfo {
            hostname: "h".into(),
            ipv4: None,
        };
        let id = Identity::resolve(
            ProxyType::Router,
            &IdentityInput::default(),
            &BTreeMap::new(),
            &no_ip,
        )
        .unwrap();
        assert_eq!(
            id.node_id(),
            "router~127.0.0.1~h.default~default.svc.cluster.local"
        );
    }

    #[test]
    fn proxy_config_env_goes_to_the_node_metadata() {
        let pc = r#"{"proxyHeaders":{"preserveHttp1HeaderCase":true}}"#;
        let id = Identity::resolve(
            ProxyType::Sidecar,
            &IdentityInput::default(),
            &env(&[("PROXY_CONFIG", pc)]),
            &host(),
        )
        .unwrap();
        let md = id.metadata_json();
        let got: serde_json::Value =
            serde_json::from_str(md["PROXY_CONFIG"].as_str().unwrap_or_default()).unwrap();
        assert_eq!(got["proxyHeaders"]["preserveHttp1HeaderCase"], true);
        for bad in ["proxyHeaders: {}", "[1]"] {
            let e = Identity::resolve(
                ProxyType::Sidecar,
                &IdentityInput::default(),
                &env(&[("PROXY_CONFIG", bad)]),
                &host(),
            )
            .unwrap_err();
            assert!(e.to_string().starts_with("PROXY_CONFIG"), "{e}");
        }
    }

    #[test]
    fn env_is_used_when_flags_absent_and_flags_win() {
        let e = env(&[
            ("POD_NAME", "reviews-v1-545db77b95-xvqk2"),
            ("POD_NAMESPACE", "bookinfo"),
            ("INSTANCE_IP", "10.244.0.7"),
            ("SERVICE_ACCOUNT", "bookinfo-reviews"),
            ("ISTIO_META_CLUSTER_ID", "east"),
            ("ISTIO_META_DNS_CAPTURE", "true"),
            ("ISTIO_META_NAME", "ignored"),
            (
                "ISTIO_METAJSON_LABELS",
                r#"{"app":"reviews","version":"v1"}"#,
            ),
        ]);
        let id =
            Identity::resolve(ProxyType::Sidecar, &IdentityInput::default(), &e, &host()).unwrap();
        assert_eq!(
            id.node_id(),
            "sidecar~10.244.0.7~reviews-v1-545db77b95-xvqk2.bookinfo~bookinfo.svc.cluster.local"
        );
        assert_eq!(id.cluster_id, "east");
        assert_eq!(id.workload_name, "reviews-v1");
        assert_eq!(id.service_cluster(), "reviews.bookinfo");
        let md = id.metadata_json();
        assert_eq!(md["NAME"], "reviews-v1-545db77b95-xvqk2");
        assert_eq!(md["DNS_CAPTURE"], "true");
        assert_eq!(md["LABELS"]["version"], "v1");
        assert_eq!(md["SERVICE_ACCOUNT"], "bookinfo-reviews");

        let flags = IdentityInput {
            pod_name: Some("p1".into()),
            namespace: Some("ns1".into()),
            ip: Some("10.0.0.9".into()),
            service_account: Some("sa1".into()),
            labels: vec!["version=v2".into(), "extra=a=b".into()],
            cluster_id: Some("west".into()),
            domain: Some("example.org".into()),
        };
        let id = Identity::resolve(ProxyType::Sidecar, &flags, &e, &host()).unwrap();
        assert_eq!(id.node_id(), "sidecar~10.0.0.9~p1.ns1~ns1.svc.example.org");
        assert_eq!(id.cluster_id, "west");
        assert_eq!(id.service_account, "sa1");
        // Flag labels override the injector's JSON key by key.
        assert_eq!(id.labels["app"], "reviews");
        assert_eq!(id.labels["version"], "v2");
        assert_eq!(id.labels["extra"], "a=b");
    }

    #[test]
    fn metadata_has_every_contract_key_and_parses_in_the_pilot_shape() {
        let flags = IdentityInput {
            pod_name: Some("gw-7d4f8b9c6d-x7k2q".into()),
            labels: vec!["istio=ingressgateway".into()],
            ..Default::default()
        };
        let id = Identity::resolve(ProxyType::Router, &flags, &BTreeMap::new(), &host()).unwrap();
        let md = id.metadata_json();
        for k in [
            "NAMESPACE",
            "NAME",
            "LABELS",
            "INSTANCE_IPS",
            "SERVICE_ACCOUNT",
            "CLUSTER_ID",
            "WORKLOAD_NAME",
            "MESH_ID",
            "ISTIO_VERSION",
        ] {
            assert!(md.get(k).is_some(), "missing {k}");
        }
        assert!(md["LABELS"].is_object());
        assert_eq!(md["INSTANCE_IPS"], "10.1.2.3");
        assert_eq!(md["WORKLOAD_NAME"], "gw");
        assert_eq!(md["ISTIO_VERSION"], VERSION);
        // Every value other than LABELS is a string.
        for (k, v) in md.as_object().unwrap() {
            if k != "LABELS" {
                assert!(v.is_string(), "{k} is not a string");
            }
        }
        // The protobuf form carries the same content.
        let s = id.metadata_struct();
        assert_eq!(s.fields.len(), md.as_object().unwrap().len());
        match &s.fields["LABELS"].kind {
            Some(Kind::StructValue(l)) => assert_eq!(
                l.fields["istio"].kind,
                Some(Kind::StringValue("ingressgateway".into()))
            ),
            other => panic!("LABELS is {other:?}"),
        }
        let node = id.node();
        assert_eq!(node.id, id.node_id());
        assert_eq!(node.cluster, "gw.default");
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let r = |input: IdentityInput, e: &[(&str, &str)]| {
            Identity::resolve(ProxyType::Sidecar, &input, &env(e), &host())
        };
        assert_eq!(
            r(
                IdentityInput {
                    labels: vec!["novalue".into()],
                    ..Default::default()
                },
                &[]
            ),
            Err(IdentityError::BadLabel("novalue".into()))
        );
        assert_eq!(
            r(
                IdentityInput {
                    labels: vec!["=v".into()],
                    ..Default::default()
                },
                &[]
            ),
            Err(IdentityError::EmptyLabelKey("=v".into()))
        );
        assert!(matches!(
            r(
                IdentityInput {
                    ip: Some("10.0.0.300".into()),
                    ..Default::default()
                },
                &[]
            ),
            Err(IdentityError::BadIp { .. })
        ));
        assert!(matches!(
            r(IdentityInput::default(), &[("INSTANCE_IP", "nope")]),
            Err(IdentityError::BadIp { source_name, .. }) if source_name == "INSTANCE_IP"
        ));
        assert!(matches!(
            r(
                IdentityInput::default(),
                &[("ISTIO_METAJSON_LABELS", "[1]")]
            ),
            Err(IdentityError::BadLabelsJson(_))
        ));
        assert!(matches!(
            r(
                IdentityInput::default(),
                &[("ISTIO_METAJSON_LABELS", r#"{"a":1}"#)]
            ),
            Err(IdentityError::BadLabelsJson(_))
        ));
        assert!(matches!(
            r(
                IdentityInput {
                    namespace: Some("a.b".into()),
                    ..Default::default()
                },
                &[]
            ),
            Err(IdentityError::BadName { .. })
        ));
        assert_eq!(
            "sidecarz".parse::<ProxyType>(),
            Err(IdentityError::BadProxyType("sidecarz".into()))
        );
    }

    #[test]
    fn discovery_address_parsing() {
        let d: DiscoveryAddress = "127.0.0.1:15010".parse().unwrap();
        assert_eq!(d.ip(), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(d.port, 15010);
        let d: DiscoveryAddress = "istiod.istio-system.svc:15012".parse().unwrap();
        assert_eq!(d.host, "istiod.istio-system.svc");
        assert_eq!(d.ip(), None);
        let d: DiscoveryAddress = "[::1]:15010".parse().unwrap();
        assert_eq!(d.host, "::1");
        assert_eq!(d.to_string(), "[::1]:15010");
        for bad in [
            "",
            "host",
            ":15010",
            "host:",
            "host:0",
            "host:99999",
            "::1:15010",
            "http://x:1",
            "a b:1",
        ] {
            assert_eq!(
                bad.parse::<DiscoveryAddress>(),
                Err(IdentityError::BadDiscoveryAddress(bad.to_string())),
                "{bad}"
            );
        }
    }

    #[test]
    fn workload_name_heuristics() {
        let none = BTreeMap::new();
        let app: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
        assert_eq!(
            derive_workload_name("reviews-v1-545db77b95-xvqk2", &none),
            "reviews-v1"
        );
        assert_eq!(derive_workload_name("fluentd-x7k2q", &none), "fluentd");
        // Not obviously generated: vowels in the suffix, or a StatefulSet ordinal.
        assert_eq!(derive_workload_name("my-hello", &app), "web");
        assert_eq!(derive_workload_name("db-0", &none), "db-0");
        assert_eq!(derive_workload_name("single", &none), "single");
    }
}
