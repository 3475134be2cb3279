//! RDS: VirtualServices -> Envoy `RouteConfiguration`s, shaped as istiod shapes them
//! (`pilot/pkg/networking/core/httproute.go` for sidecars, `gateway.go` for routers).
//!
//! - Sidecar route configs are named by port (`"8080"`): one virtual host `FQDN:PORT` per
//!   visible HTTP/auto service on that port, with every host name a client in the proxy's
//!   namespace may use (`name`, `name.ns`, `name.ns.svc`, the FQDN, the VIP, each with and
//!   without `:PORT`); routes from the mesh VirtualServices that claim the service, else
//!   istiod's default route; then the `allow_any` / `block_all` catch-all.
//! - Router route configs are named `http.PORT`: one virtual host per host of the bound
//!   VirtualServices intersected with the Gateway servers' hosts on that port.
//!
//! The per-route translation (matches, actions, policies) lives in [`translate`].

pub mod translate;

use envoy_types::pb::envoy::config::route::v3::{self as rv3, RouteConfiguration, VirtualHost};
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};
use mizzen_config::networking as net;
use mizzen_model::push::{host_matches, ConfigEntry};
use mizzen_model::{Protocol, Proxy, ProxyType, PushContext, Service};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use translate::Ctx;

/// Catch-all virtual host / route names (istiod `util.Passthrough` / `util.BlackHole`).
pub const ALLOW_ANY: &str = "allow_any";
pub const BLOCK_ALL: &str = "block_all";
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
/// The name istiod gives the route of a service without VirtualService.
pub const DEFAULT_ROUTE: &str = "default";
/// istiod raises Envoy's 4 KiB direct-response body limit to the 1 MiB its validation allows.
const MAX_DIRECT_RESPONSE_BODY: u32 = 1024 * 1024;
const MESH_GATEWAY: &str = "mesh";

/// Names of the route configurations this proxy needs: sidecars one per HTTP/auto port of
/// a visible service (`"8080"`), routers `http.PORT` per HTTP(S-terminated) server port.
pub fn route_names(proxy: &Proxy, push: &PushContext) -> Vec<String> {
    let names: BTreeSet<String> = match proxy.proxy_type {
        ProxyType::Sidecar => sidecar_ports(proxy, push)
            .into_iter()
            .map(|p| p.to_string())
            .collect(),
        ProxyType::Router => push
            .gateways_for(proxy)
            .iter()
            .flat_map(|(_, gw)| gw.spec.servers.iter())
            .filter(|s| is_http_server(s))
            .filter_map(|s| u16::try_from(s.port.number).ok())
            .map(|p| format!("http.{p}"))
            .collect(),
    };
    names.into_iter().collect()
}

/// Build the named route configuration: `http.PORT` -> gateway, `PORT` -> sidecar outbound.
pub fn generate(proxy: &Proxy, push: &PushContext, name: &str) -> Option<RouteConfiguration> {
    if let Some(port) = name.strip_prefix("http.") {
        return port.parse().ok().map(|p| gateway(proxy, push, p));
    }
    // Only canonical port numbers: "080" would produce a config named differently.
    let port: u16 = name.parse().ok()?;
    (port.to_string() == name).then(|| sidecar_outbound(proxy, push, port))
}

fn sidecar_ports(proxy: &Proxy, push: &PushContext) -> BTreeSet<u16> {
    push.services
        .values()
        .filter(|s| push.visible_to(proxy, s))
        .flat_map(|s| s.ports.iter())
        .filter(|p| is_http_port(p.protocol))
        .map(|p| p.port)
        .collect()
}

fn is_http_port(p: Protocol) -> bool {
    p.is_http() || p == Protocol::Auto
}

/// HTTP-family servers and HTTPS servers that terminate TLS carry HTTP routes.
fn is_http_server(s: &net::Server) -> bool {
    let proto = Protocol::parse(&s.port.protocol);
    if proto.is_http() {
        return true;
    }
    proto == Protocol::Https
        && s.tls.as_ref().is_some_and(|t| {
            !matches!(
                t.mode,
                net::ServerTlsMode::Passthrough | net::ServerTlsMode::AutoPassthrough
            )
        })
}

/// VirtualService `exportTo` (empty or `*` = everywhere, `.` = its own namespace).
fn vs_visible(vs: &ConfigEntry<net::VirtualService>, ns: &str) -> bool {
    let e = &vs.spec.export_to;
    e.is_empty()
        || e.iter()
            .any(|x| x == "*" || x == ns || (x == "." && vs.meta.namespace == ns))
}

fn base_config(name: String, virtual_hosts: Vec<VirtualHost>) -> RouteConfiguration {
    RouteConfiguration {
        name,
        virtual_hosts,
        // Clusters arrive over CDS independently; a route to a not-yet-known cluster must not
        // fail the whole config (istiod sets the same).
        validate_clusters: Some(BoolValue { value: false }),
        max_direct_response_body_size_bytes: Some(UInt32Value {
            value: MAX_DIRECT_RESPONSE_BODY,
        }),
        // Clients send `Host: name:port` or just `name`; port-less domains cover both.
        ignore_port_in_host_matching: true,
        ..Default::default()
    }
}

/// `[::1]` for IPv6 literals in domains.
fn ipv6_compliant(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

// ------------------------------------------------------------------ sidecar

/// The proxy's DNS domain (`ns.svc.cluster.local`), from the node id or derived.
fn proxy_domain(proxy: &Proxy, push: &PushContext) -> String {
    if proxy.dns_domain.contains(".svc.") {
        proxy.dns_domain.clone()
    } else {
        format!("{}.svc.{}", proxy.namespace, push.mesh.domain)
    }
}

/// Short names of a Kubernetes service valid from the proxy's namespace (istiod
/// `generateAltVirtualHostsForKubernetesService`): same namespace `name`, `name.ns.svc`,
/// `name.ns`; other namespace `name.ns`, `name.ns.svc`. Non-Kubernetes hosts have none.
fn alt_hosts(hostname: &str, proxy_domain: &str) -> Vec<String> {
    let (Some(id), Some(ih)) = (proxy_domain.find(".svc."), hostname.find(".svc.")) else {
        return Vec::new();
    };
    // The service must share the proxy's cluster domain suffix.
    if hostname[ih..] != proxy_domain[id..] {
        return Vec::new();
    }
    let Some(dot) = hostname.find('.') else {
        return Vec::new();
    };
    if dot + 1 >= hostname.len() || dot + 1 > ih {
        return Vec::new();
    }
    let name_ns = &hostname[..ih];
    if hostname[dot + 1..ih] == proxy_domain[..id] {
        vec![
            hostname[..dot].to_string(),
            format!("{name_ns}.svc"),
            name_ns.to_string(),
        ]
    } else {
        vec![name_ns.to_string(), format!("{name_ns}.svc")]
    }
}

fn with_port(hosts: &[String], port: u16) -> Vec<String> {
    hosts
        .iter()
        .flat_map(|h| [h.clone(), format!("{h}:{port}")])
        .collect()
}

/// Domains of a service's virtual host: FQDN, short names, VIP, each with and without port.
fn service_domains(svc: &Service, port: u16, proxy_domain: &str) -> (Vec<String>, Vec<String>) {
    let alts = alt_hosts(&svc.hostname, proxy_domain);
    let mut names = vec![svc.hostname.clone()];
    names.extend(alts.iter().cloned());
    let mut domains = with_port(&names, port);
    // Headless Kubernetes services: pods are addressed as `pod.name.ns.svc...` too.
    if svc.resolution == mizzen_model::Resolution::Passthrough
        && svc.source == mizzen_model::service::ServiceSource::Kubernetes
    {
        let wild: Vec<String> = domains.iter().map(|d| format!("*.{d}")).collect();
        domains.extend(wild);
    }
    if let Some(vip) = svc.address.filter(|a| !a.is_unspecified()) {
        domains.extend(with_port(&[ipv6_compliant(&vip.to_string())], port));
    }
    (domains, with_port(&alts, port))
}

/// Accumulates virtual hosts with unique names and unique (case-insensitive) domains:
/// Envoy rejects a route configuration that repeats either.
#[derive(Default)]
struct VhostSet {
    hosts: Vec<VirtualHost>,
    by_name: BTreeMap<String, usize>,
    domains: HashSet<String>,
    /// FQDNs of services with virtual hosts: a short name expanded from another host must not
    /// shadow a real FQDN (istiod `dedupeDomains`).
    known_fqdn: HashSet<String>,
}

impl VhostSet {
    fn add(
        &mut self,
        name: String,
        domains: Vec<String>,
        expanded: &[String],
        routes: Vec<rv3::Route>,
    ) {
        if let Some(&i) = self.by_name.get(&name) {
            // Several VirtualServices for one host: routes appended in config order. (istiod
            // keeps only the first VirtualService for sidecars; appending keeps its routes
            // first, so its catch-all still wins, and adds the others' distinct matches.)
            self.hosts[i].routes.extend(routes);
            return;
        }
        let mut unique = Vec::new();
        for d in domains {
            let lower = d.to_ascii_lowercase();
            if self.domains.contains(&lower)
                || (expanded.contains(&d) && self.known_fqdn.contains(&lower))
            {
                tracing::debug!(domain = %d, vhost = %name, "duplicate domain dropped");
                continue;
            }
            self.domains.insert(lower);
            unique.push(d);
        }
        if unique.is_empty() {
            return;
        }
        self.by_name.insert(name.clone(), self.hosts.len());
        self.hosts.push(VirtualHost {
            name,
            domains: unique,
            routes,
            include_request_attempt_count: true,
            ..Default::default()
        });
    }
}

/// istiod's default route for a service without VirtualService.
fn default_route(push: &PushContext, proxy: &Proxy, svc: &Service, port: u16) -> rv3::Route {
    let cluster = super::outbound_cluster_name(port, "", &svc.hostname);
    let hash = translate::consistent_hash(push, &proxy.namespace, &svc.hostname, Some(port), None)
        .and_then(translate::hash_policy);
    rv3::Route {
        name: DEFAULT_ROUTE.into(),
        r#match: Some(translate::route_match(None)),
        decorator: Some(rv3::Decorator {
            operation: format!("{}:{port}/*", svc.hostname),
            propagate: None,
        }),
        action: Some(rv3::route::Action::Route(rv3::RouteAction {
            cluster_specifier: Some(rv3::route_action::ClusterSpecifier::Cluster(cluster)),
            retry_policy: translate::retry_policy(None, false),
            timeout: Some(translate::zero()),
            hash_policy: hash.into_iter().collect(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The last virtual host: unknown hosts go to `PassthroughCluster` (or the Sidecar's
/// `egressProxy`) under ALLOW_ANY, or get a 502 under REGISTRY_ONLY.
fn catch_all_vhost(proxy: &Proxy, push: &PushContext) -> VirtualHost {
    let prefix_all = Some(translate::route_match(None));
    match push.outbound_mode(proxy) {
        net::OutboundMode::AllowAny => {
            let egress = push
                .sidecar_for(proxy)
                .and_then(|s| s.spec.outbound_traffic_policy.as_ref())
                .and_then(|p| p.egress_proxy.as_ref());
            let cluster = match egress {
                Some(d) => {
                    let port = d
                        .port
                        .as_ref()
                        .and_then(|p| u16::try_from(p.number).ok())
                        .unwrap_or(0);
                    super::outbound_cluster_name(port, d.subset.as_deref().unwrap_or(""), &d.host)
                }
                None => PASSTHROUGH_CLUSTER.into(),
            };
            VirtualHost {
                name: ALLOW_ANY.into(),
                domains: vec!["*".into()],
                routes: vec![rv3::Route {
                    name: ALLOW_ANY.into(),
                    r#match: prefix_all,
                    action: Some(rv3::route::Action::Route(rv3::RouteAction {
                        cluster_specifier: Some(rv3::route_action::ClusterSpecifier::Cluster(
                            cluster,
                        )),
                        timeout: Some(translate::zero()),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                include_request_attempt_count: true,
                ..Default::default()
            }
        }
        net::OutboundMode::RegistryOnly => VirtualHost {
            name: BLOCK_ALL.into(),
            domains: vec!["*".into()],
            routes: vec![rv3::Route {
                name: BLOCK_ALL.into(),
                r#match: prefix_all,
                action: Some(rv3::route::Action::DirectResponse(
                    rv3::DirectResponseAction {
                        status: 502,
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }],
            include_request_attempt_count: true,
            ..Default::default()
        },
    }
}

/// Which services a VirtualService claims on this port, and its hosts that are not services
/// (istiod `separateVSHostsAndServices` with the most-specific-wildcard index).
struct Claim<'a> {
    services: Vec<&'a Arc<Service>>,
    other_hosts: Vec<String>,
}

fn claim<'a>(
    vs: &ConfigEntry<net::VirtualService>,
    all_vs: &[&ConfigEntry<net::VirtualService>],
    on_port: &BTreeMap<&'a str, &'a Arc<Service>>,
) -> Claim<'a> {
    let mut out = Claim {
        services: Vec::new(),
        other_hosts: Vec::new(),
    };
    for h in &vs.spec.hosts {
        if !h.starts_with('*') {
            match on_port.get(h.as_str()) {
                Some(svc) => out.services.push(svc),
                None => out.other_hosts.push(h.clone()),
            }
            continue;
        }
        let mut any = false;
        for (host, svc) in on_port {
            if !host_matches(h, host) {
                continue;
            }
            any = true;
            if owner(all_vs, host).is_some_and(|o| std::ptr::eq(o, vs)) {
                out.services.push(svc);
            }
        }
        if !any {
            out.other_hosts.push(h.clone());
        }
    }
    out.services.dedup_by(|a, b| a.hostname == b.hostname);
    out
}

/// The VirtualService a service host belongs to: the first with that exact host, else the
/// one with the most specific (longest) matching wildcard, first in config order on ties.
fn owner<'v>(
    all_vs: &[&'v ConfigEntry<net::VirtualService>],
    host: &str,
) -> Option<&'v ConfigEntry<net::VirtualService>> {
    if let Some(v) = all_vs
        .iter()
        .find(|v| v.spec.hosts.iter().any(|h| h == host))
    {
        return Some(v);
    }
    let mut best: Option<(usize, &ConfigEntry<net::VirtualService>)> = None;
    for v in all_vs {
        for h in &v.spec.hosts {
            if h.starts_with('*') && host_matches(h, host) && best.is_none_or(|(l, _)| h.len() > l)
            {
                best = Some((h.len(), v));
            }
        }
    }
    best.map(|(_, v)| v)
}

/// Sidecar outbound route config named after the port ("8080"). See the module docs.
pub fn sidecar_outbound(proxy: &Proxy, push: &PushContext, port: u16) -> RouteConfiguration {
    let gateways = [MESH_GATEWAY.to_string()];
    let ctx = Ctx {
        proxy,
        push,
        port,
        gateways: &gateways,
        is_tls: false,
    };
    let domain = proxy_domain(proxy, push);
    // Visible services listening on this port (any protocol: a VS host that is a TCP service
    // on this port is still "a service", not a foreign host), and the HTTP ones.
    let on_port: BTreeMap<&str, &Arc<Service>> = push
        .services
        .iter()
        .filter(|(_, s)| s.port(port).is_some() && push.visible_to(proxy, s))
        .map(|(h, s)| (h.as_str(), s))
        .collect();
    let is_http_here = |s: &Service| s.port(port).is_some_and(|p| is_http_port(p.protocol));
    let vss: Vec<&ConfigEntry<net::VirtualService>> = push
        .mesh_virtual_services()
        .filter(|v| vs_visible(v, &proxy.namespace))
        .collect();

    let mut set = VhostSet::default();
    let mut claimed: HashSet<&str> = HashSet::new();
    // (VS host names, services, routes) in VirtualService order.
    let mut wrappers = Vec::new();
    for vs in &vss {
        let c = claim(vs, &vss, &on_port);
        // istiod only looks at VirtualServices for non-service hosts on port 80 (its
        // long-standing special case); elsewhere a VS must match a service on the port.
        if c.services.is_empty() && port != 80 {
            continue;
        }
        let routes = translate::virtual_service_routes(&ctx, vs);
        if routes.is_empty() {
            continue;
        }
        let services: Vec<&Arc<Service>> =
            c.services.into_iter().filter(|s| is_http_here(s)).collect();
        if services.is_empty() && port != 80 {
            continue;
        }
        for s in &services {
            claimed.insert(s.hostname.as_str());
            set.known_fqdn.insert(s.hostname.to_ascii_lowercase());
            set.known_fqdn
                .insert(format!("{}:{port}", s.hostname).to_ascii_lowercase());
        }
        wrappers.push((c.other_hosts, services, routes));
    }
    for (hosts, services, routes) in wrappers {
        for h in hosts {
            let domains = vec![ipv6_compliant(&h), format!("{h}:{port}")];
            set.add(format!("{h}:{port}"), domains, &[], routes.clone());
        }
        for svc in services {
            let (domains, expanded) = service_domains(svc, port, &domain);
            set.add(
                format!("{}:{port}", svc.hostname),
                domains,
                &expanded,
                routes.clone(),
            );
        }
    }
    for (host, svc) in &on_port {
        if claimed.contains(host) || !is_http_here(svc) {
            continue;
        }
        let (domains, expanded) = service_domains(svc, port, &domain);
        set.add(
            format!("{host}:{port}"),
            domains,
            &expanded,
            vec![default_route(push, proxy, svc, port)],
        );
    }
    let mut vhosts = set.hosts;
    vhosts.sort_by(|a, b| a.name.cmp(&b.name));
    let catch_all = catch_all_vhost(proxy, push);
    // A VirtualService for host `*` already owns the wildcard domain; Envoy allows only one.
    if !set.domains.contains("*") {
        vhosts.push(catch_all);
    }
    base_config(port.to_string(), vhosts)
}

// ------------------------------------------------------------------ gateway

/// Server hosts usable by a VirtualService in `vs_ns` (`host.NamesForNamespace`): `h`,
/// `*/h`, `vs_ns/h`, and `./h` when the Gateway is in `vs_ns`.
fn server_hosts_for(server: &net::Server, gw_ns: &str, vs_ns: &str) -> Vec<String> {
    server
        .hosts
        .iter()
        .filter_map(|h| match h.split_once('/') {
            None => Some(h.clone()),
            Some(("*", host)) => Some(host.to_string()),
            Some((".", host)) if gw_ns == vs_ns => Some(host.to_string()),
            Some((ns, host)) if ns == vs_ns => Some(host.to_string()),
            _ => None,
        })
        .collect()
}

/// `Names.Intersection`: for each overlapping pair keep the more specific host.
fn intersect_hosts(server: &[String], vs: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in server {
        for v in vs {
            let pick = if host_matches(v, s) {
                s
            } else if host_matches(s, v) {
                v
            } else {
                continue;
            };
            let pick = pick.to_ascii_lowercase();
            if !out.contains(&pick) {
                out.push(pick);
            }
        }
    }
    out
}

fn gateway_domains(host: &str) -> Vec<String> {
    if host.starts_with('*') {
        vec![host.to_string()]
    } else {
        vec![host.to_string(), format!("{host}:*")]
    }
}

/// Gateway route config named "http.PORT". See the module docs.
pub fn gateway(proxy: &Proxy, push: &PushContext, port: u16) -> RouteConfiguration {
    let name = format!("http.{port}");
    let mut vhosts: BTreeMap<String, VirtualHost> = BTreeMap::new();
    let mut any_server = false;
    for (gw_name, gw) in push.gateways_for(proxy) {
        let gateways = [gw_name.clone()];
        for server in &gw.spec.servers {
            if server.port.number != u32::from(port) || !is_http_server(server) {
                continue;
            }
            any_server = true;
            let https_redirect = server.tls.as_ref().is_some_and(|t| t.https_redirect);
            let ctx = Ctx {
                proxy,
                push,
                port,
                gateways: &gateways,
                is_tls: server.tls.is_some(),
            };
            for vs in push.gateway_virtual_services(&gw_name) {
                if !vs_visible(vs, &proxy.namespace) {
                    continue;
                }
                let server_hosts = server_hosts_for(server, &gw.meta.namespace, &vs.meta.namespace);
                let hosts = intersect_hosts(&server_hosts, &vs.spec.hosts);
                if hosts.is_empty() {
                    continue;
                }
                let routes = translate::virtual_service_routes(&ctx, vs);
                if routes.is_empty() {
                    continue;
                }
                for h in hosts {
                    let vh = vhosts.entry(h.clone()).or_insert_with(|| VirtualHost {
                        name: format!("{h}:{port}"),
                        domains: gateway_domains(&h),
                        include_request_attempt_count: true,
                        ..Default::default()
                    });
                    vh.routes.extend(routes.iter().cloned());
                    if https_redirect {
                        vh.require_tls = rv3::virtual_host::TlsRequirementType::All as i32;
                    }
                }
            }
            // httpsRedirect hosts without VirtualService still redirect to https.
            if https_redirect {
                for h in &server.hosts {
                    let h = h
                        .split_once('/')
                        .map(|(_, h)| h)
                        .unwrap_or(h)
                        .to_ascii_lowercase();
                    let vh = vhosts.entry(h.clone()).or_insert_with(|| VirtualHost {
                        name: format!("{h}:{port}"),
                        domains: gateway_domains(&h),
                        include_request_attempt_count: true,
                        ..Default::default()
                    });
                    vh.require_tls = rv3::virtual_host::TlsRequirementType::All as i32;
                }
            }
        }
    }
    if !any_server {
        return base_config(name, Vec::new());
    }
    let mut out: Vec<VirtualHost> = vhosts.into_values().collect();
    if out.is_empty() {
        // Like istiod: a server without routes answers 404 (NR) rather than resetting.
        out.push(VirtualHost {
            name: format!("blackhole:{port}"),
            domains: vec!["*".into()],
            ..Default::default()
        });
    }
    for vh in &mut out {
        // Merged VirtualServices: catch-all routes move last so no VS shadows another's
        // specific matches (istiod `SortVHostRoutes`).
        let (catch_all, specific): (Vec<_>, Vec<_>) = std::mem::take(&mut vh.routes)
            .into_iter()
            .partition(translate::is_catch_all);
        vh.routes = specific;
        vh.routes.extend(catch_all);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    base_config(name, out)
}

#[cfg(test)]
mod tests;
