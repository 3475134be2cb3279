//! The proxy as the control plane sees it: node id, metadata, and the workload it fronts.

use crate::push::PushContext;
use crate::service::{Labels, Workload};
use std::collections::BTreeMap;
use std::net::IpAddr;

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

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    #[error("node id {0:?} is not TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.cluster.local")]
    MalformedId(String),
    #[error("node id {0:?}: type must be sidecar or router")]
    UnknownType(String),
}

/// A connected proxy: identity from its node id and metadata (Istio's agent conventions),
/// plus the workload it was matched to.
#[derive(Clone, Debug, PartialEq)]
pub struct Proxy {
    pub id: String,
    pub proxy_type: ProxyType,
    pub ips: Vec<IpAddr>,
    pub pod_name: String,
    pub namespace: String,
    pub dns_domain: String,
    pub labels: Labels,
    pub service_account: String,
    pub cluster_id: String,
    pub istio_version: String,
    /// Raw string metadata, for debugging and later features.
    pub metadata: BTreeMap<String, String>,
    /// The workload whose IP matches, if the registry knows one.
    pub workload: Option<Workload>,
    /// The xDS node's `locality` (empty when the proxy sent none); see
    /// [`Proxy::locality`].
    pub node_locality: crate::service::Locality,
    /// `proxyHeaders.preserveHttp1HeaderCase` of the proxy's own ProxyConfig (node metadata
    /// `PROXY_CONFIG`, which Istio's agent fills from the pod's `proxy.istio.io/config`
    /// annotation); `None` when it does not say, so the mesh default applies.
    pub preserve_http1_header_case: Option<bool>,
}

/// The node metadata's `PROXY_CONFIG`: a ProxyConfig in its JSON form, as an object (what
/// Istio's agent sends) or as a string holding one (what an `ISTIO_META_PROXY_CONFIG`
/// variable or a string-only metadata writer gives). Unparsable: ignored, as istiod ignores
/// metadata it cannot read (the proxy still gets config, with the mesh defaults).
fn proxy_config(metadata: &serde_json::Value) -> Option<serde_json::Value> {
    match metadata.get("PROXY_CONFIG")? {
        serde_json::Value::String(s) => serde_json::from_str(s).ok(),
        v @ serde_json::Value::Object(_) => Some(v.clone()),
        _ => None,
    }
}

/// A protobuf `BoolValue` in JSON: `true`, or `{"value": true}` from a Struct conversion.
fn bool_value(v: &serde_json::Value) -> Option<bool> {
    v.as_bool()
        .or_else(|| v.get("value").and_then(serde_json::Value::as_bool))
}

impl Proxy {
    /// Parse `TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.cluster.local` and the metadata JSON object
    /// (`NAMESPACE`, `NAME`, `LABELS`, `INSTANCE_IPS`, `SERVICE_ACCOUNT`, ...).
    pub fn from_node(id: &str, metadata: &serde_json::Value) -> Result<Proxy, ProxyError> {
        let parts: Vec<&str> = id.split('~').collect();
        if parts.len() != 4 {
            return Err(ProxyError::MalformedId(id.to_string()));
        }
        let proxy_type = match parts[0] {
            "sidecar" => ProxyType::Sidecar,
            "router" => ProxyType::Router,
            other => return Err(ProxyError::UnknownType(other.to_string())),
        };
        let (pod_name, id_ns) = parts[2].split_once('.').unwrap_or((parts[2], ""));
        let dns_domain = parts[3].to_string();
        let md = |k: &str| metadata.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let namespace = md("NAMESPACE")
            .filter(|s| !s.is_empty())
            .or_else(|| (!id_ns.is_empty()).then(|| id_ns.to_string()))
            .unwrap_or_else(|| "default".to_string());
        let mut ips: Vec<IpAddr> = md("INSTANCE_IPS")
            .unwrap_or_default()
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        if let Ok(ip) = parts[1].parse::<IpAddr>() {
            if !ips.contains(&ip) {
                ips.insert(0, ip);
            }
        }
        let labels: Labels = metadata
            .get("LABELS")
            .and_then(|v| v.as_object())
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        let strings = metadata
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Proxy {
            id: id.to_string(),
            proxy_type,
            ips,
            pod_name: md("NAME").unwrap_or_else(|| pod_name.to_string()),
            namespace,
            dns_domain,
            labels,
            service_account: md("SERVICE_ACCOUNT").unwrap_or_else(|| "default".to_string()),
            cluster_id: md("CLUSTER_ID").unwrap_or_else(|| "Kubernetes".to_string()),
            istio_version: md("ISTIO_VERSION").unwrap_or_default(),
            metadata: strings,
            workload: None,
            node_locality: Default::default(),
            preserve_http1_header_case: proxy_config(metadata)
                .as_ref()
                .and_then(|pc| pc.get("proxyHeaders"))
                .and_then(|h| h.get("preserveHttp1HeaderCase"))
                .and_then(bool_value),
        })
    }

    /// Whether this proxy keeps HTTP/1 header-name case: its ProxyConfig's
    /// `proxyHeaders.preserveHttp1HeaderCase`, else the mesh default (istiod's
    /// `ProxyConfigOrDefault`, field by field as the agent merges the pod annotation over
    /// meshConfig.defaultConfig).
    pub fn preserve_http1_header_case(&self, mesh: &crate::push::MeshSettings) -> bool {
        self.preserve_http1_header_case
            .unwrap_or(mesh.preserve_http1_header_case)
    }

    /// Match the proxy to a registry workload by IP (then by name); the workload's labels
    /// then count, else the metadata labels stay.
    pub fn resolve(&mut self, push: &PushContext) {
        let wl = push
            .workloads
            .iter()
            .find(|w| {
                w.ip.is_some_and(|ip| self.ips.contains(&ip)) && w.namespace == self.namespace
            })
            .or_else(|| {
                push.workloads
                    .iter()
                    .find(|w| w.ip.is_some_and(|ip| self.ips.contains(&ip)))
            })
            .or_else(|| {
                push.workloads
                    .iter()
                    .find(|w| w.name == self.pod_name && w.namespace == self.namespace)
            });
        self.workload = wl.cloned();
    }

    /// Labels used for selectors: the workload's when known, else the node metadata's.
    pub fn effective_labels(&self) -> &Labels {
        match &self.workload {
            Some(w) if !w.labels.is_empty() => &w.labels,
            _ => &self.labels,
        }
    }

    pub fn primary_ip(&self) -> Option<IpAddr> {
        self.ips.first().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_node_id() {
        let md = serde_json::json!({"NAMESPACE": "ns1", "LABELS": {"app": "a"}, "INSTANCE_IPS": "10.0.0.2,10.0.0.3"});
        let p = Proxy::from_node("sidecar~10.0.0.2~a-1.ns1~ns1.svc.cluster.local", &md).unwrap();
        assert_eq!(p.proxy_type, ProxyType::Sidecar);
        assert_eq!(p.namespace, "ns1");
        assert_eq!(p.pod_name, "a-1");
        assert_eq!(p.ips.len(), 2);
        assert_eq!(p.labels.get("app").map(String::as_str), Some("a"));
        assert!(Proxy::from_node("bogus", &md).is_err());
        assert!(Proxy::from_node("ingress~1.1.1.1~a.b~b.svc.cluster.local", &md).is_err());
    }

    #[test]
    fn proxy_config_header_case_overrides_the_mesh_default() {
        let id = "sidecar~10.0.0.2~a-1.ns1~ns1.svc.cluster.local";
        let on = crate::push::MeshSettings {
            preserve_http1_header_case: true,
            ..Default::default()
        };
        let off = crate::push::MeshSettings::default();
        let with = |md: serde_json::Value| Proxy::from_node(id, &md).unwrap();
        // No PROXY_CONFIG (or one without the field, or unreadable): the mesh decides.
        for md in [
            serde_json::json!({}),
            serde_json::json!({"PROXY_CONFIG": {"concurrency": 2}}),
            serde_json::json!({"PROXY_CONFIG": "not json"}),
        ] {
            let p = with(md);
            assert!(p.preserve_http1_header_case(&on));
            assert!(!p.preserve_http1_header_case(&off));
        }
        // The proxy's own ProxyConfig wins either way: as Istio's agent sends it (an
        // object), or as a JSON string.
        let p = with(
            serde_json::json!({"PROXY_CONFIG": {"proxyHeaders": {"preserveHttp1HeaderCase": true}}}),
        );
        assert!(p.preserve_http1_header_case(&off));
        let p = with(
            serde_json::json!({"PROXY_CONFIG": "{\"proxyHeaders\": {\"preserveHttp1HeaderCase\": false}}"}),
        );
        assert!(!p.preserve_http1_header_case(&on));
    }
}
