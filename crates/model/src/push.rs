//! [`PushContext`]: one immutable, indexed view of config + registry, built once per change
//! (outside any lock) and shared by every generator and every proxy for that push, like
//! istiod's PushContext.

use crate::proxy::Proxy;
use crate::registry::RegistrySnapshot;
use crate::security::{spiffe_id, EffectiveMtls, PeerAuthnEntry, PeerAuthnIndex};
use crate::service::{selector_matches, Endpoint, Service, Workload};
use mizzen_config::networking as net;
use mizzen_config::{Meta, Resource, Spec};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

/// A config object with its metadata; hosts inside are already fully qualified.
#[derive(Clone, Debug)]
pub struct ConfigEntry<T> {
    pub meta: Meta,
    pub spec: T,
}

/// Mesh-wide settings (Istio's MeshConfig subset we use).
#[derive(Clone, Debug)]
pub struct MeshSettings {
    pub domain: String,
    pub root_namespace: String,
    pub outbound_mode: net::OutboundMode,
    pub trust_domain: String,
    /// The pilot runs a CA and every proxy it serves has Istio's SDS secrets `default` and
    /// `ROOTCA` (through the bootstrap's `sds-grpc` cluster): only then can generated config
    /// refer to them (auto mTLS, ISTIO_MUTUAL, PeerAuthentication). Without a CA the mesh is
    /// plaintext: no proxy would have certificates to present.
    pub ca_enabled: bool,
    /// meshConfig.accessLogFile: where proxies write access logs; empty = none (Istio's
    /// default profile). Mizzen defaults to `/dev/stdout`, as Istio's demo profile does.
    pub access_log_file: String,
    /// meshConfig.defaultConfig.proxyHeaders.preserveHttp1HeaderCase: every proxy keeps
    /// HTTP/1 header-name case unless its own ProxyConfig says otherwise (see
    /// [`crate::Proxy::preserve_http1_header_case`]). Off, as in Istio: Envoy lowercases.
    pub preserve_http1_header_case: bool,
}

impl Default for MeshSettings {
    fn default() -> Self {
        MeshSettings {
            domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            outbound_mode: net::OutboundMode::AllowAny,
            trust_domain: "cluster.local".into(),
            ca_enabled: false,
            access_log_file: "/dev/stdout".into(),
            preserve_http1_header_case: false,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct PushContext {
    pub version: String,
    pub mesh: MeshSettings,
    /// By hostname (sorted: generated output is deterministic).
    pub services: BTreeMap<String, Arc<Service>>,
    pub services_by_ip: HashMap<IpAddr, Vec<String>>,
    pub endpoints: BTreeMap<(String, u16), Vec<Endpoint>>,
    pub workloads: Vec<Workload>,
    pub virtual_services: Vec<ConfigEntry<net::VirtualService>>,
    pub destination_rules: Vec<ConfigEntry<net::DestinationRule>>,
    pub gateways: Vec<ConfigEntry<net::Gateway>>,
    pub sidecars: Vec<ConfigEntry<net::Sidecar>>,
    /// DestinationRule indexes: exact host -> positions, and the wildcard-host ones. Every
    /// proxy looks up every service's rule; a linear scan was the pilot's top CPU cost.
    dr_exact: HashMap<String, Vec<usize>>,
    dr_wildcard: Vec<usize>,
    /// Every valid resource, for features that read config directly (security, telemetry).
    pub resources: Arc<Vec<Resource>>,
    /// AuthorizationPolicy / RequestAuthentication and fetched JWKS (see [`crate::authz`]).
    pub authz: crate::authz::AuthzPolicies,
    /// PeerAuthentications, resolved per workload by [`PushContext::peer_authn`].
    pub peer_authentications: PeerAuthnIndex,
    /// Config that is valid Istio but that Mizzen does not implement, one line per use (the
    /// pilot logs them at each push), e.g. a DestinationRule's `credentialName`.
    pub unsupported: Vec<String>,
}

/// `reviews` in namespace `default` -> `reviews.default.svc.cluster.local`; names with a dot
/// and wildcards are kept as written (Istio's short-name rule).
pub fn resolve_host(host: &str, namespace: &str, domain: &str) -> String {
    if host.contains('.') || host.contains('*') || host.is_empty() {
        host.to_string()
    } else {
        format!("{host}.{namespace}.svc.{domain}")
    }
}

/// Gateway references in a VirtualService: `name` -> `ns/name`.
pub fn resolve_gateway(gw: &str, namespace: &str) -> String {
    if gw == "mesh" || gw.contains('/') {
        gw.to_string()
    } else if let Some((name, ns)) = gw.split_once('.') {
        // `gateway.namespace` (deprecated but accepted by Istio).
        format!("{ns}/{name}")
    } else {
        format!("{namespace}/{gw}")
    }
}

/// Does `pattern` (an Istio host, possibly `*.suffix` or `*`) match `host`?
pub fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" || pattern == host {
        return true;
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return host.ends_with(suffix);
    }
    false
}

impl PushContext {
    pub fn build(
        version: String,
        mesh: MeshSettings,
        resources: Arc<Vec<Resource>>,
        registry: RegistrySnapshot,
    ) -> PushContext {
        let mut ctx = PushContext {
            version,
            ..Default::default()
        };
        let domain = mesh.domain.clone();
        let mut peer_authn = Vec::new();
        for svc in registry.services {
            // First definition of a host wins (Kubernetes Services before ServiceEntries
            // would need creation time; files give us order instead).
            if let Some(ip) = svc.address {
                ctx.services_by_ip
                    .entry(ip)
                    .or_default()
                    .push(svc.hostname.clone());
            }
            ctx.services
                .entry(svc.hostname.clone())
                .or_insert_with(|| Arc::new(svc));
        }
        ctx.endpoints = registry.endpoints;
        ctx.workloads = registry.workloads;
        for r in resources.iter() {
            let ns = &r.meta.namespace;
            match &r.spec {
                Spec::VirtualService(vs) => {
                    let mut vs = vs.clone();
                    vs.hosts = vs
                        .hosts
                        .iter()
                        .map(|h| resolve_host(h, ns, &domain))
                        .collect();
                    vs.gateways = vs.gateways.iter().map(|g| resolve_gateway(g, ns)).collect();
                    resolve_vs_destinations(&mut vs, ns, &domain);
                    ctx.virtual_services.push(ConfigEntry {
                        meta: r.meta.clone(),
                        spec: vs,
                    });
                }
                Spec::DestinationRule(dr) => {
                    let mut dr = dr.clone();
                    dr.host = resolve_host(&dr.host, ns, &domain);
                    note_unsupported_dr(&mut ctx.unsupported, &r.meta, &dr);
                    ctx.destination_rules.push(ConfigEntry {
                        meta: r.meta.clone(),
                        spec: dr,
                    });
                }
                Spec::Gateway(gw) => ctx.gateways.push(ConfigEntry {
                    meta: r.meta.clone(),
                    spec: gw.clone(),
                }),
                Spec::Sidecar(sc) => ctx.sidecars.push(ConfigEntry {
                    meta: r.meta.clone(),
                    spec: sc.clone(),
                }),
                Spec::PeerAuthentication(pa) => peer_authn.push(PeerAuthnEntry {
                    namespace: ns.clone(),
                    name: r.meta.name.clone(),
                    spec: pa.clone(),
                }),
                _ => {}
            }
        }
        for (i, d) in ctx.destination_rules.iter().enumerate() {
            if d.spec.host.starts_with('*') {
                ctx.dr_wildcard.push(i);
            } else {
                ctx.dr_exact.entry(d.spec.host.clone()).or_default().push(i);
            }
        }
        ctx.authz = crate::authz::AuthzPolicies::index(&resources);
        ctx.peer_authentications = PeerAuthnIndex::new(peer_authn);
        ctx.mesh = mesh;
        ctx.resources = resources;
        ctx
    }

    /// The PeerAuthentication in force for this proxy's workload (its namespace and labels).
    pub fn peer_authn(&self, proxy: &Proxy) -> EffectiveMtls {
        self.peer_authentications.effective(
            &self.mesh.root_namespace,
            &proxy.namespace,
            proxy.effective_labels(),
        )
    }

    /// Auto mTLS for this endpoint: a sidecar fronts it and its workload's PeerAuthentication
    /// does not DISABLE mTLS on the endpoint's port (Istio's client then sends plaintext).
    pub fn endpoint_accepts_mtls(&self, ep: &Endpoint) -> bool {
        ep.has_sidecar()
            && self
                .peer_authentications
                .effective(&self.mesh.root_namespace, &ep.namespace, &ep.labels)
                .for_port(ep.port)
                != mizzen_config::security::MtlsMode::Disable
    }

    /// The SPIFFE identities the endpoints of `host:port` run as (sorted, deduplicated): what
    /// a client checks the server certificate's URI SAN against. Empty for a port without
    /// endpoints, and then no SAN is checked (as Istio does).
    pub fn service_identities(&self, host: &str, port: u16) -> Vec<String> {
        let mut out: Vec<String> = self
            .endpoints(host, port)
            .iter()
            .filter(|e| !e.service_account.is_empty())
            .map(|e| spiffe_id(&self.mesh.trust_domain, &e.namespace, &e.service_account))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    pub fn service(&self, hostname: &str) -> Option<&Arc<Service>> {
        self.services.get(hostname)
    }

    pub fn endpoints(&self, hostname: &str, port: u16) -> &[Endpoint] {
        self.endpoints
            .get(&(hostname.to_string(), port))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Is the service visible from `namespace`? (`exportTo`: `*` or empty = all, `.` = own.)
    pub fn visible(&self, svc: &Service, namespace: &str) -> bool {
        svc.export_to.is_empty()
            || svc
                .export_to
                .iter()
                .any(|e| e == "*" || (e == "." && svc.namespace == namespace) || e == namespace)
    }

    /// Is the service visible to this proxy: exported to its namespace and, when a Sidecar
    /// resource applies, listed in one of its egress `hosts` (`ns/host`, with `*`, `.` and `~`
    /// for the namespace part, as Istio defines them). Routers see every exported service.
    pub fn visible_to(&self, proxy: &Proxy, svc: &Service) -> bool {
        if !self.visible(svc, &proxy.namespace) {
            return false;
        }
        if proxy.proxy_type == crate::proxy::ProxyType::Router {
            return true;
        }
        let Some(sc) = self.sidecar_for(proxy) else {
            return true;
        };
        if sc.spec.egress.is_empty() {
            return true;
        }
        sc.spec.egress.iter().flat_map(|e| e.hosts.iter()).any(|h| {
            let (ns, host) = h.split_once('/').unwrap_or(("*", h.as_str()));
            let ns_ok = match ns {
                "*" => true,
                "." => svc.namespace == sc.meta.namespace,
                "~" => false,
                other => svc.namespace == other,
            };
            ns_ok && host_matches(host, &svc.hostname)
        })
    }

    /// The Sidecar resource that applies to this proxy: a workload-selected one in its
    /// namespace, else the namespace default, else the root namespace's.
    pub fn sidecar_for(&self, proxy: &Proxy) -> Option<&ConfigEntry<net::Sidecar>> {
        let labels = proxy.effective_labels();
        let sidecars = &self.sidecars;
        let in_ns = |ns: String| sidecars.iter().filter(move |s| s.meta.namespace == ns);
        in_ns(proxy.namespace.clone())
            .find(|s| {
                s.spec.workload_selector.as_ref().is_some_and(|sel| {
                    !sel.labels.is_empty() && selector_matches(&sel.labels, labels)
                })
            })
            .or_else(|| in_ns(proxy.namespace.clone()).find(|s| s.spec.workload_selector.is_none()))
            .or_else(|| {
                in_ns(self.mesh.root_namespace.clone()).find(|s| s.spec.workload_selector.is_none())
            })
    }

    pub fn outbound_mode(&self, proxy: &Proxy) -> net::OutboundMode {
        self.sidecar_for(proxy)
            .and_then(|s| s.spec.outbound_traffic_policy.as_ref())
            .map(|p| p.mode)
            .unwrap_or(self.mesh.outbound_mode)
    }

    /// The DestinationRule for `host` as seen from `proxy_ns`: Istio's lookup order is the
    /// proxy's namespace, then the service's namespace, then the root namespace; an exact
    /// host beats a wildcard.
    pub fn destination_rule(
        &self,
        proxy_ns: &str,
        host: &str,
    ) -> Option<&ConfigEntry<net::DestinationRule>> {
        let svc_ns = self.services.get(host).map(|s| s.namespace.as_str());
        let exact = self.dr_exact.get(host).map(Vec::as_slice).unwrap_or(&[]);
        let candidates = |ns: &str| {
            exact
                .iter()
                .map(|&i| &self.destination_rules[i])
                .find(|d| d.meta.namespace == ns)
                .or_else(|| {
                    self.dr_wildcard
                        .iter()
                        .map(|&i| &self.destination_rules[i])
                        .filter(|d| d.meta.namespace == ns && host_matches(&d.spec.host, host))
                        .max_by_key(|d| d.spec.host.len())
                })
        };
        candidates(proxy_ns)
            .or_else(|| svc_ns.and_then(candidates))
            .or_else(|| candidates(&self.mesh.root_namespace))
            .or_else(|| exact.first().map(|&i| &self.destination_rules[i]))
    }

    /// Gateways (`ns/name`) whose selector matches the router's labels.
    pub fn gateways_for(&self, proxy: &Proxy) -> Vec<(String, &ConfigEntry<net::Gateway>)> {
        let labels = proxy.effective_labels();
        self.gateways
            .iter()
            .filter(|g| !g.spec.selector.is_empty() && selector_matches(&g.spec.selector, labels))
            .map(|g| (format!("{}/{}", g.meta.namespace, g.meta.name), g))
            .collect()
    }

    /// VirtualServices that apply to sidecars (`gateways` empty or containing `mesh`).
    pub fn mesh_virtual_services(&self) -> impl Iterator<Item = &ConfigEntry<net::VirtualService>> {
        self.virtual_services
            .iter()
            .filter(|v| v.spec.gateways.is_empty() || v.spec.gateways.iter().any(|g| g == "mesh"))
    }

    /// VirtualServices bound to the given gateway (`ns/name`).
    pub fn gateway_virtual_services<'a>(
        &'a self,
        gateway: &'a str,
    ) -> impl Iterator<Item = &'a ConfigEntry<net::VirtualService>> + 'a {
        self.virtual_services
            .iter()
            .filter(move |v| v.spec.gateways.iter().any(|g| g == gateway))
    }

    /// Services whose endpoints include this proxy's IPs (its inbound side).
    pub fn proxy_services(&self, proxy: &Proxy) -> Vec<(Arc<Service>, Vec<Endpoint>)> {
        let mut out = Vec::new();
        for svc in self.services.values() {
            let mut eps = Vec::new();
            for p in &svc.ports {
                for ep in self.endpoints(&svc.hostname, p.port) {
                    if ep
                        .address
                        .parse::<IpAddr>()
                        .is_ok_and(|ip| proxy.ips.contains(&ip))
                    {
                        eps.push(ep.clone());
                    }
                }
            }
            if !eps.is_empty() {
                out.push((svc.clone(), eps));
            }
        }
        out
    }
}

/// DestinationRule features that are valid Istio but not implemented here.
fn note_unsupported_dr(out: &mut Vec<String>, meta: &Meta, dr: &net::DestinationRule) {
    let mut policies: Vec<(String, &net::TrafficPolicy)> = Vec::new();
    if let Some(tp) = &dr.traffic_policy {
        policies.push(("trafficPolicy".into(), tp));
    }
    for (i, s) in dr.subsets.iter().enumerate() {
        if let Some(tp) = &s.traffic_policy {
            policies.push((format!("subsets[{i}].trafficPolicy"), tp));
        }
    }
    for (path, tp) in policies {
        let tls = tp.tls.iter().map(|t| (format!("{path}.tls"), t)).chain(
            tp.port_level_settings
                .iter()
                .enumerate()
                .filter_map(|(i, p)| {
                    p.tls
                        .as_ref()
                        .map(|t| (format!("{path}.portLevelSettings[{i}].tls"), t))
                }),
        );
        for (p, t) in tls {
            if t.credential_name.as_deref().is_some_and(|c| !c.is_empty()) {
                out.push(format!(
                    "DestinationRule {}/{}: {p}.credentialName is not supported (no secret \
                     store for sidecars yet): use caCertificates/clientCertificate/privateKey \
                     files; the cluster is generated without TLS origination",
                    meta.namespace, meta.name
                ));
            }
        }
    }
}

fn resolve_destination(d: &mut net::Destination, ns: &str, domain: &str) {
    d.host = resolve_host(&d.host, ns, domain);
}

fn resolve_vs_destinations(vs: &mut net::VirtualService, ns: &str, domain: &str) {
    for h in &mut vs.http {
        for r in &mut h.route {
            resolve_destination(&mut r.destination, ns, domain);
        }
        if let Some(m) = &mut h.mirror {
            resolve_destination(m, ns, domain);
        }
        for m in &mut h.mirrors {
            resolve_destination(&mut m.destination, ns, domain);
        }
        for m in &mut h.matches {
            m.gateways = m.gateways.iter().map(|g| resolve_gateway(g, ns)).collect();
        }
    }
    for t in &mut vs.tcp {
        for r in &mut t.route {
            resolve_destination(&mut r.destination, ns, domain);
        }
        for m in &mut t.matches {
            m.gateways = m.gateways.iter().map(|g| resolve_gateway(g, ns)).collect();
        }
    }
    for t in &mut vs.tls {
        for r in &mut t.route {
            resolve_destination(&mut r.destination, ns, domain);
        }
        for m in &mut t.matches {
            m.gateways = m.gateways.iter().map(|g| resolve_gateway(g, ns)).collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_resolve_in_namespace() {
        assert_eq!(
            resolve_host("reviews", "bookinfo", "cluster.local"),
            "reviews.bookinfo.svc.cluster.local"
        );
        assert_eq!(
            resolve_host("api.example.com", "x", "cluster.local"),
            "api.example.com"
        );
        assert_eq!(resolve_host("*", "x", "cluster.local"), "*");
        assert_eq!(resolve_gateway("gw", "ns"), "ns/gw");
        assert_eq!(resolve_gateway("mesh", "ns"), "mesh");
        assert_eq!(resolve_gateway("other/gw", "ns"), "other/gw");
        assert!(host_matches("*.example.com", "a.example.com"));
        assert!(!host_matches("*.example.com", "example.org"));
    }

    #[test]
    fn credential_name_is_reported_and_identities_come_from_endpoints() {
        let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: ns}
spec:
  hosts: [api.example.com]
  resolution: STATIC
  ports: [{number: 443, name: https, protocol: HTTPS}]
  endpoints:
  - {address: 10.0.0.1, serviceAccount: a, labels: {security.istio.io/tlsMode: istio}}
  - {address: 10.0.0.2, serviceAccount: a}
  - {address: 10.0.0.3}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: ns}
spec:
  host: api.example.com
  trafficPolicy:
    portLevelSettings:
    - port: {number: 443}
      tls: {mode: SIMPLE, credentialName: api-cred}
"#;
        let load = mizzen_config::load::load_str(std::path::Path::new("t.yaml"), yaml);
        assert_eq!(load.errors().count(), 0);
        let reg = crate::registry::from_resources(&load.resources, "cluster.local");
        let push = PushContext::build(
            "1".into(),
            MeshSettings::default(),
            Arc::new(load.resources),
            reg,
        );
        assert_eq!(push.unsupported.len(), 1, "{:?}", push.unsupported);
        assert!(
            push.unsupported[0].contains("ns/api")
                && push.unsupported[0]
                    .contains("trafficPolicy.portLevelSettings[0].tls.credentialName")
        );
        assert_eq!(
            push.service_identities("api.example.com", 443),
            [
                "spiffe://cluster.local/ns/ns/sa/a",
                "spiffe://cluster.local/ns/ns/sa/default"
            ]
        );
        let eps = push.endpoints("api.example.com", 443);
        assert!(push.endpoint_accepts_mtls(&eps[0]));
        assert!(!push.endpoint_accepts_mtls(&eps[1]), "no sidecar label");
    }
}
