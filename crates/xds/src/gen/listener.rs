//! LDS: listeners for sidecars and gateways, named and shaped as istiod's.
//!
//! Sidecar: `virtualOutbound` (15001, hands connections to the listener matching their
//! original destination), one outbound listener per service port (`0.0.0.0_PORT` for HTTP,
//! auto-detected and TLS ports, `VIP_PORT` for TCP services), and `virtualInbound` (15006)
//! with a filter chain per port of the proxy's own workload. Router: one listener per
//! Gateway server port.
//!
//! Inbound mTLS follows the workload's PeerAuthentication (see [`mizzen_model::security`]),
//! per target port, when the pilot runs a CA: STRICT gives each port a mesh mTLS chain
//! (`tls` transport with ALPN `istio-peer-exchange`/`istio`, client certificate required and
//! checked against `ROOTCA`) and a chain that closes anything else; PERMISSIVE adds the
//! plaintext chains next to the mTLS one (the tls_inspector tells them apart); DISABLE keeps
//! plaintext only. Inbound HTTP over mTLS passes the peer identity to the app in
//! `x-forwarded-client-cert`, and every access log line says `connection_security_policy`
//! (`mutual_tls` / `none`) and the peer's SPIFFE id.
//!
//! Not implemented: telling HTTP from TCP inside mesh mTLS on auto-detected (unnamed) ports:
//! Istio does it with ALPN values set by its own Envoy filter (`istio.alpn`), which stock
//! Envoy lacks, so such ports are proxied as TCP under mTLS (L7 policy needs a named port).

use super::cluster::{BLACKHOLE, INBOUND_PASSTHROUGH, PASSTHROUGH};
use super::tls as mtls;
use super::{ads_config_source, outbound_cluster_name, secs, socket_address};
use crate::any::pack;
use envoy_types::pb::envoy::config::accesslog::v3 as alv3;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3::{self as lv3, Listener};
use envoy_types::pb::envoy::config::route::v3 as rv3;
use envoy_types::pb::envoy::extensions::access_loggers::file::v3::{
    file_access_log, FileAccessLog,
};
use envoy_types::pb::envoy::extensions::filters::http::cors::v3::Cors;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::http_inspector::v3::HttpInspector;
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    self as hcm, HttpConnectionManager,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    self as tcpv3, TcpProxy,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};
use mizzen_config::networking as net;
use mizzen_config::security::MtlsMode;
use mizzen_model::push::host_matches;
use mizzen_model::security::EffectiveMtls;
use mizzen_model::{Protocol, Proxy, ProxyType, PushContext, Service};
use std::collections::BTreeMap;

pub const VIRTUAL_OUTBOUND: &str = "virtualOutbound";
pub const VIRTUAL_INBOUND: &str = "virtualInbound";
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;
/// Server-first protocols (MySQL, SMTP) send nothing: stop waiting for a client preface after
/// this long and treat the connection as plain TCP.
const DETECTION_TIMEOUT_MS: u32 = 100;

pub fn generate(proxy: &Proxy, push: &PushContext) -> Vec<Listener> {
    let mut out = match proxy.proxy_type {
        ProxyType::Sidecar => sidecar(proxy, push),
        // Gateways enforce the AuthorizationPolicies / RequestAuthentications selecting them.
        ProxyType::Router => router(proxy, push)
            .into_iter()
            .map(|l| super::rbac::with_inbound_authz(l, proxy, push))
            .collect(),
    };
    if push.mesh.access_log_file != DEFAULT_ACCESS_LOG {
        for l in &mut out {
            set_access_log_file(l, &push.mesh.access_log_file);
        }
    }
    if proxy.preserve_http1_header_case(&push.mesh) {
        for l in &mut out {
            set_preserve_header_case(l);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// ProxyConfig `proxyHeaders.preserveHttp1HeaderCase`: every HCM (outbound, inbound,
/// gateway) writes HTTP/1 header names as they arrived, with Envoy's `preserve_case`
/// formatter in `http_protocol_options.header_key_format`, as istiod's
/// `buildHTTPConnectionManager` does. Like [`set_access_log_file`], a rewrite of the finished
/// listener that costs nothing unless asked for.
fn set_preserve_header_case(l: &mut Listener) {
    use crate::any::unpack_any;
    let chains = l
        .filter_chains
        .iter_mut()
        .chain(l.default_filter_chain.as_mut());
    for chain in chains {
        for filter in &mut chain.filters {
            let Some(lv3::filter::ConfigType::TypedConfig(any)) = &mut filter.config_type else {
                continue;
            };
            if let Some(mut h) = unpack_any::<HttpConnectionManager>(any) {
                h.http_protocol_options = Some(super::cluster::preserve_case_http1());
                *any = pack(&h);
            }
        }
    }
}

/// Where access logs go unless meshConfig.accessLogFile says otherwise (Istio's demo profile).
pub const DEFAULT_ACCESS_LOG: &str = "/dev/stdout";

/// meshConfig.accessLogFile: another file for every HCM's and TCP proxy's access log, or none
/// at all when empty (Istio's default profile). The builders above always log to
/// [`DEFAULT_ACCESS_LOG`]; this rewrites the finished listener, which only costs anything when
/// the mesh changes the default.
fn set_access_log_file(l: &mut Listener, path: &str) {
    use crate::any::unpack_any;
    let fix = |logs: &mut Vec<alv3::AccessLog>| {
        if path.is_empty() {
            logs.clear();
            return;
        }
        for log in logs.iter_mut() {
            if let Some(alv3::access_log::ConfigType::TypedConfig(any)) = &mut log.config_type {
                if let Some(mut f) = unpack_any::<FileAccessLog>(any) {
                    f.path = path.to_string();
                    *any = pack(&f);
                }
            }
        }
    };
    let chains = l
        .filter_chains
        .iter_mut()
        .chain(l.default_filter_chain.as_mut());
    for chain in chains {
        for filter in &mut chain.filters {
            let Some(lv3::filter::ConfigType::TypedConfig(any)) = &mut filter.config_type else {
                continue;
            };
            if let Some(mut h) = unpack_any::<HttpConnectionManager>(any) {
                fix(&mut h.access_log);
                *any = pack(&h);
            } else if let Some(mut t) = unpack_any::<TcpProxy>(any) {
                fix(&mut t.access_log);
                *any = pack(&t);
            }
        }
    }
}

// ------------------------------------------------------------------ building blocks

fn bool_value(v: bool) -> Option<BoolValue> {
    Some(BoolValue { value: v })
}

fn listener_filter<M: prost::Message + prost::Name>(name: &str, msg: &M) -> lv3::ListenerFilter {
    lv3::ListenerFilter {
        name: name.into(),
        config_type: Some(lv3::listener_filter::ConfigType::TypedConfig(pack(msg))),
        ..Default::default()
    }
}

fn network_filter<M: prost::Message + prost::Name>(name: &str, msg: &M) -> lv3::Filter {
    lv3::Filter {
        name: name.into(),
        config_type: Some(lv3::filter::ConfigType::TypedConfig(pack(msg))),
    }
}

/// Istio's default text access log format (response flags and details, upstream and
/// downstream addresses, SNI), plus the upstream peer's identity when the proxy originated TLS.
const LOG_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% \
    %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% \
    %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% \
    %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \
    \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" \
    %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% \
    %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME% \
    upstream_peer=%UPSTREAM_PEER_URI_SAN%";

/// How the downstream connection of an inbound chain is secured; it names Istio's
/// `connection_security_policy` label values in the access log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChainSecurity {
    /// Mesh mTLS terminated by this chain.
    MutualTls,
    /// Plaintext (or the application's own TLS, passed through).
    None,
}

impl ChainSecurity {
    fn as_str(self) -> &'static str {
        match self {
            ChainSecurity::MutualTls => "mutual_tls",
            ChainSecurity::None => "none",
        }
    }
}

/// Outbound and gateway chains log [`LOG_FORMAT`]; inbound chains add the connection's security
/// and the downstream peer's SPIFFE id (`-` when there is none).
fn access_log_for(security: Option<ChainSecurity>) -> Vec<alv3::AccessLog> {
    let mut format = LOG_FORMAT.to_string();
    if let Some(sec) = security {
        format.push_str(&format!(
            " connection_security_policy={} downstream_peer=%DOWNSTREAM_PEER_URI_SAN%",
            sec.as_str()
        ));
    }
    format.push('\n');
    let text = core::SubstitutionFormatString {
        format: Some(core::substitution_format_string::Format::TextFormatSource(
            core::DataSource {
                specifier: Some(core::data_source::Specifier::InlineString(format)),
                ..Default::default()
            },
        )),
        ..Default::default()
    };
    let file = FileAccessLog {
        path: "/dev/stdout".into(),
        access_log_format: Some(file_access_log::AccessLogFormat::LogFormat(text)),
    };
    vec![alv3::AccessLog {
        name: "envoy.access_loggers.file".into(),
        config_type: Some(alv3::access_log::ConfigType::TypedConfig(pack(&file))),
        ..Default::default()
    }]
}

fn http_filter<M: prost::Message + prost::Name>(name: &str, msg: &M) -> hcm::HttpFilter {
    hcm::HttpFilter {
        name: name.into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack(msg))),
        ..Default::default()
    }
}

/// The HTTP filter chain every HCM gets: fault and CORS (configured per route by RDS), then
/// the router.
fn http_filters() -> Vec<hcm::HttpFilter> {
    vec![
        http_filter("envoy.filters.http.fault", &HttpFault::default()),
        http_filter("envoy.filters.http.cors", &Cors::default()),
        http_filter("envoy.filters.http.router", &Router::default()),
    ]
}

enum Routes {
    Rds(String),
    Inline(Box<rv3::RouteConfiguration>),
}

fn http_connection_manager(stat_prefix: &str, routes: Routes, gateway: bool) -> lv3::Filter {
    hcm_filter(stat_prefix, routes, gateway, http_filters(), None)
}

/// An HCM; `inbound` (the chain's security) adds the security to its access log and, on mesh
/// mTLS, the caller's identity to `x-forwarded-client-cert` (Istio's inbound settings).
fn hcm_filter(
    stat_prefix: &str,
    routes: Routes,
    gateway: bool,
    http_filters: Vec<hcm::HttpFilter>,
    inbound: Option<ChainSecurity>,
) -> lv3::Filter {
    let route_specifier = match routes {
        Routes::Rds(name) => hcm::http_connection_manager::RouteSpecifier::Rds(hcm::Rds {
            config_source: Some(ads_config_source()),
            route_config_name: name,
        }),
        Routes::Inline(rc) => hcm::http_connection_manager::RouteSpecifier::RouteConfig(*rc),
    };
    let h = HttpConnectionManager {
        stat_prefix: stat_prefix.into(),
        codec_type: hcm::http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(route_specifier),
        http_filters,
        access_log: access_log_for(inbound),
        use_remote_address: bool_value(gateway),
        normalize_path: bool_value(true),
        upgrade_configs: vec![hcm::http_connection_manager::UpgradeConfig {
            upgrade_type: "websocket".into(),
            ..Default::default()
        }],
        stream_idle_timeout: Some(secs(0)),
        ..Default::default()
    };
    let h = if inbound == Some(ChainSecurity::MutualTls) {
        HttpConnectionManager {
            forward_client_cert_details:
                hcm::http_connection_manager::ForwardClientCertDetails::AppendForward as i32,
            set_current_client_cert_details: Some(
                hcm::http_connection_manager::SetCurrentClientCertDetails {
                    subject: bool_value(true),
                    dns: true,
                    uri: true,
                    ..Default::default()
                },
            ),
            ..h
        }
    } else {
        h
    };
    network_filter("envoy.filters.network.http_connection_manager", &h)
}

fn tcp_proxy(stat_prefix: &str, target: TcpTarget) -> lv3::Filter {
    tcp_proxy_logged(stat_prefix, target, None)
}

fn tcp_proxy_logged(
    stat_prefix: &str,
    target: TcpTarget,
    inbound: Option<ChainSecurity>,
) -> lv3::Filter {
    let cluster_specifier = match target {
        TcpTarget::Cluster(c) => tcpv3::tcp_proxy::ClusterSpecifier::Cluster(c),
        TcpTarget::Weighted(ws) => tcpv3::tcp_proxy::ClusterSpecifier::WeightedClusters(
            tcpv3::tcp_proxy::WeightedCluster {
                clusters: ws
                    .into_iter()
                    .map(
                        |(name, weight)| tcpv3::tcp_proxy::weighted_cluster::ClusterWeight {
                            name,
                            weight,
                            ..Default::default()
                        },
                    )
                    .collect(),
            },
        ),
    };
    let t = TcpProxy {
        stat_prefix: stat_prefix.into(),
        cluster_specifier: Some(cluster_specifier),
        access_log: access_log_for(inbound),
        ..Default::default()
    };
    network_filter("envoy.filters.network.tcp_proxy", &t)
}

#[derive(Clone, Debug, PartialEq)]
enum TcpTarget {
    Cluster(String),
    Weighted(Vec<(String, u32)>),
}

fn chain(
    name: &str,
    filter_chain_match: Option<lv3::FilterChainMatch>,
    filters: Vec<lv3::Filter>,
) -> lv3::FilterChain {
    lv3::FilterChain {
        name: name.into(),
        filter_chain_match,
        filters,
        ..Default::default()
    }
}

fn http_protocols() -> Vec<String> {
    vec!["http/1.1".into(), "h2c".into()]
}

// ------------------------------------------------------------------ sidecar

fn passthrough_target(proxy: &Proxy, push: &PushContext) -> String {
    match push.outbound_mode(proxy) {
        net::OutboundMode::AllowAny => PASSTHROUGH.into(),
        net::OutboundMode::RegistryOnly => BLACKHOLE.into(),
    }
}

/// Everything that lands on one outbound `0.0.0.0_PORT` listener.
#[derive(Default)]
struct WildcardPort {
    http: bool,
    auto: bool,
    /// SNI chains for TLS/HTTPS services: (server names, target).
    tls: Vec<(Vec<String>, TcpTarget)>,
    /// Plain TCP services without a VIP.
    tcp: Option<TcpTarget>,
}

fn sidecar(proxy: &Proxy, push: &PushContext) -> Vec<Listener> {
    let fallback = passthrough_target(proxy, push);
    // AuthorizationPolicy / RequestAuthentication filters go into every inbound chain.
    let mut inbound = super::rbac::with_inbound_authz(virtual_inbound(proxy, push), proxy, push);
    let mut outbound = virtual_outbound(&fallback);
    // TPROXY capture (node metadata INTERCEPTION_MODE, as istiod reads it): the capture
    // listeners accept connections addressed to other hosts, so they bind IP_TRANSPARENT.
    if proxy.metadata.get("INTERCEPTION_MODE").map(String::as_str) == Some("TPROXY") {
        inbound.transparent = bool_value(true);
        outbound.transparent = bool_value(true);
    }
    let mut out = vec![outbound, inbound];
    let mut wildcard: BTreeMap<u16, WildcardPort> = BTreeMap::new();
    let mut vip_listeners: BTreeMap<String, Listener> = BTreeMap::new();
    for svc in push.services.values() {
        if !push.visible_to(proxy, svc) {
            continue;
        }
        for port in &svc.ports {
            match port.protocol {
                p if p.is_http() => wildcard.entry(port.port).or_default().http = true,
                Protocol::Auto => {
                    wildcard.entry(port.port).or_default().auto = true;
                    // A VIP gets its own sniffing listener whose TCP fallback is the service
                    // (not passthrough to the VIP), as Istio does: a server-first protocol
                    // (MySQL, SMTP) never sends what HTTP detection waits for.
                    if let Some(vip) = svc.address.filter(|v| !v.is_unspecified()) {
                        let name = format!("{vip}_{}", port.port);
                        let w = WildcardPort {
                            auto: true,
                            tcp: Some(tcp_target(proxy, push, svc, port.port)),
                            ..Default::default()
                        };
                        vip_listeners
                            .entry(name.clone())
                            .or_insert_with(|| Listener {
                                name,
                                address: Some(socket_address(&vip.to_string(), port.port)),
                                ..wildcard_listener(port.port, w, &fallback)
                            });
                    }
                }
                Protocol::Https | Protocol::Tls => {
                    let target = tls_target(proxy, push, svc, port.port);
                    let snis = vec![svc.hostname.clone()];
                    wildcard
                        .entry(port.port)
                        .or_default()
                        .tls
                        .push((snis, target));
                }
                Protocol::Udp => {}
                _ => {
                    let target = tcp_target(proxy, push, svc, port.port);
                    match svc.address {
                        Some(vip) if !vip.is_unspecified() => {
                            let name = format!("{vip}_{}", port.port);
                            vip_listeners
                                .entry(name.clone())
                                .or_insert_with(|| Listener {
                                    name: name.clone(),
                                    address: Some(socket_address(&vip.to_string(), port.port)),
                                    bind_to_port: bool_value(false),
                                    traffic_direction: core::TrafficDirection::Outbound as i32,
                                    filter_chains: vec![chain(
                                        &name,
                                        None,
                                        vec![tcp_proxy(
                                            &format!("outbound|{}||{}", port.port, svc.hostname),
                                            target,
                                        )],
                                    )],
                                    ..Default::default()
                                });
                        }
                        _ => {
                            let w = wildcard.entry(port.port).or_default();
                            if w.tcp.is_none() {
                                w.tcp = Some(target);
                            }
                        }
                    }
                }
            }
        }
    }
    for (port, w) in wildcard {
        out.push(wildcard_listener(port, w, &fallback));
    }
    out.extend(vip_listeners.into_values());
    out
}

fn virtual_outbound(fallback: &str) -> Listener {
    Listener {
        name: VIRTUAL_OUTBOUND.into(),
        address: Some(socket_address("0.0.0.0", OUTBOUND_PORT)),
        use_original_dst: bool_value(true),
        traffic_direction: core::TrafficDirection::Outbound as i32,
        filter_chains: vec![chain(
            "PassthroughFilterChain",
            None,
            vec![tcp_proxy(fallback, TcpTarget::Cluster(fallback.into()))],
        )],
        ..Default::default()
    }
}

fn wildcard_listener(port: u16, w: WildcardPort, fallback: &str) -> Listener {
    let name = format!("0.0.0.0_{port}");
    let mut chains = Vec::new();
    let mut listener_filters = Vec::new();
    let rds = Routes::Rds(port.to_string());
    let stat = format!("outbound_0.0.0.0_{port}");
    if !w.tls.is_empty() {
        listener_filters.push(listener_filter(
            "envoy.filters.listener.tls_inspector",
            &TlsInspector::default(),
        ));
        for (snis, target) in &w.tls {
            chains.push(chain(
                &format!("{port}_{}", snis.join(",")),
                Some(lv3::FilterChainMatch {
                    server_names: snis.clone(),
                    transport_protocol: "tls".into(),
                    ..Default::default()
                }),
                vec![tcp_proxy(&stat, target.clone())],
            ));
        }
    }
    let mut default_chain = None;
    if w.http && !w.auto && w.tls.is_empty() && w.tcp.is_none() {
        default_chain = Some(chain(
            &name,
            None,
            vec![http_connection_manager(&stat, rds, false)],
        ));
    } else if w.http || w.auto {
        listener_filters.push(listener_filter(
            "envoy.filters.listener.http_inspector",
            &HttpInspector::default(),
        ));
        chains.push(chain(
            &format!("{name}_http"),
            Some(lv3::FilterChainMatch {
                application_protocols: http_protocols(),
                transport_protocol: "raw_buffer".into(),
                ..Default::default()
            }),
            vec![http_connection_manager(&stat, rds, false)],
        ));
        let tcp = w
            .tcp
            .clone()
            .unwrap_or_else(|| TcpTarget::Cluster(fallback.into()));
        default_chain = Some(chain(
            &format!("{name}_tcp"),
            None,
            vec![tcp_proxy(&stat, tcp)],
        ));
    } else if let Some(tcp) = w.tcp {
        default_chain = Some(chain(
            &format!("{name}_tcp"),
            None,
            vec![tcp_proxy(&stat, tcp)],
        ));
    } else {
        default_chain = default_chain.or_else(|| {
            Some(chain(
                "PassthroughFilterChain",
                None,
                vec![tcp_proxy(fallback, TcpTarget::Cluster(fallback.into()))],
            ))
        });
    }
    // Envoy needs at least one filter chain besides the default one.
    if chains.is_empty() {
        if let Some(d) = default_chain.take() {
            chains.push(d);
        }
    }
    Listener {
        name: name.clone(),
        address: Some(socket_address("0.0.0.0", port)),
        bind_to_port: bool_value(false),
        traffic_direction: core::TrafficDirection::Outbound as i32,
        listener_filters_timeout: Some(super::duration(std::time::Duration::from_millis(
            u64::from(DETECTION_TIMEOUT_MS),
        ))),
        continue_on_listener_filters_timeout: true,
        listener_filters,
        filter_chains: chains,
        default_filter_chain: default_chain,
        ..Default::default()
    }
}

/// TCP routing for `svc:port` from the mesh VirtualServices' `tcp` routes, else straight to
/// the service's cluster.
fn tcp_target(proxy: &Proxy, push: &PushContext, svc: &Service, port: u16) -> TcpTarget {
    for vs in push.mesh_virtual_services() {
        if !vs.spec.hosts.iter().any(|h| host_matches(h, &svc.hostname)) {
            continue;
        }
        for route in &vs.spec.tcp {
            let matched = route.matches.is_empty()
                || route.matches.iter().any(|m| {
                    m.port.is_none_or(|p| p == u32::from(port))
                        && mizzen_model::service::selector_matches(
                            &m.source_labels,
                            proxy.effective_labels(),
                        )
                });
            if matched && !route.route.is_empty() {
                return route_target(push, &route.route, port);
            }
        }
    }
    TcpTarget::Cluster(outbound_cluster_name(port, "", &svc.hostname))
}

fn tls_target(proxy: &Proxy, push: &PushContext, svc: &Service, port: u16) -> TcpTarget {
    for vs in push.mesh_virtual_services() {
        if !vs.spec.hosts.iter().any(|h| host_matches(h, &svc.hostname)) {
            continue;
        }
        for route in &vs.spec.tls {
            let matched = route.matches.iter().any(|m| {
                m.port.is_none_or(|p| p == u32::from(port))
                    && m.sni_hosts.iter().any(|s| host_matches(s, &svc.hostname))
                    && mizzen_model::service::selector_matches(
                        &m.source_labels,
                        proxy.effective_labels(),
                    )
            });
            if matched && !route.route.is_empty() {
                return route_target(push, &route.route, port);
            }
        }
    }
    TcpTarget::Cluster(outbound_cluster_name(port, "", &svc.hostname))
}

fn destination_port(push: &PushContext, d: &net::Destination, default: u16) -> u16 {
    if let Some(p) = d.port.as_ref().and_then(|p| u16::try_from(p.number).ok()) {
        return p;
    }
    match push.service(&d.host) {
        Some(s) if s.ports.len() == 1 => s.ports[0].port,
        _ => default,
    }
}

fn route_target(push: &PushContext, dests: &[net::RouteDestination], port: u16) -> TcpTarget {
    let name = |d: &net::RouteDestination| {
        outbound_cluster_name(
            destination_port(push, &d.destination, port),
            d.destination.subset.as_deref().unwrap_or(""),
            &d.destination.host,
        )
    };
    if dests.len() == 1 {
        return TcpTarget::Cluster(name(&dests[0]));
    }
    TcpTarget::Weighted(
        dests
            .iter()
            .filter(|d| d.weight.unwrap_or(0) > 0)
            .map(|d| (name(d), d.weight.unwrap_or(0).unsigned_abs()))
            .collect(),
    )
}

/// The inbound side of one workload port, as the inbound chain builders see it.
struct InboundPort {
    /// The workload (target) port.
    port: u16,
    protocol: Protocol,
}

impl InboundPort {
    fn cluster(&self) -> String {
        format!("inbound|{}||", self.port)
    }

    fn stat(&self) -> String {
        format!("inbound_0.0.0.0_{}", self.port)
    }

    /// The network filters of one inbound chain: the HCM (HTTP ports) or a TCP proxy to the
    /// app. The one place inbound filter lists are assembled; authorization/authentication
    /// filters are added to every inbound chain afterwards by `rbac::with_inbound_authz`.
    fn filters(&self, http: bool, security: ChainSecurity) -> Vec<lv3::Filter> {
        if http {
            vec![hcm_filter(
                &self.stat(),
                Routes::Inline(Box::new(inbound_route(self.port, &self.cluster()))),
                false,
                http_filters(),
                Some(security),
            )]
        } else {
            vec![tcp_proxy_logged(
                &self.stat(),
                TcpTarget::Cluster(self.cluster()),
                Some(security),
            )]
        }
    }

    fn port_match(&self, transport: &str, alpn: Vec<String>) -> Option<lv3::FilterChainMatch> {
        Some(lv3::FilterChainMatch {
            destination_port: Some(UInt32Value {
                value: u32::from(self.port),
            }),
            transport_protocol: transport.into(),
            application_protocols: alpn,
            ..Default::default()
        })
    }

    /// Plaintext chains: by protocol, with HTTP detection on auto ports.
    fn plaintext_chains(&self) -> Vec<lv3::FilterChain> {
        let cluster = self.cluster();
        let none = ChainSecurity::None;
        match self.protocol {
            p if p.is_http() => vec![chain(
                &cluster,
                self.port_match("", vec![]),
                self.filters(true, none),
            )],
            Protocol::Auto => vec![
                chain(
                    &format!("{cluster}_http"),
                    self.port_match("", http_protocols()),
                    self.filters(true, none),
                ),
                chain(
                    &format!("{cluster}_tcp"),
                    self.port_match("", vec![]),
                    self.filters(false, none),
                ),
            ],
            _ => vec![chain(
                &cluster,
                self.port_match("", vec![]),
                self.filters(false, none),
            )],
        }
    }

    /// The mesh mTLS chain. HTTP is known only on named HTTP ports (see the module doc).
    fn mtls_chain(&self) -> lv3::FilterChain {
        let http = self.protocol.is_http();
        let alpn: &[&str] = if http { &["h2", "http/1.1"] } else { &[] };
        lv3::FilterChain {
            name: format!("{}_mtls", self.cluster()),
            filter_chain_match: self.port_match("tls", mesh_alpn()),
            filters: self.filters(http, ChainSecurity::MutualTls),
            transport_socket: Some(mtls::istio_mutual_downstream(alpn)),
            ..Default::default()
        }
    }
}

fn mesh_alpn() -> Vec<String> {
    mtls::ALPN_IN_MESH.iter().map(|s| s.to_string()).collect()
}

/// Refuses what reaches it: a TCP proxy to the cluster without endpoints.
fn refuse_chain(name: &str, filter_chain_match: Option<lv3::FilterChainMatch>) -> lv3::FilterChain {
    chain(
        name,
        filter_chain_match,
        vec![tcp_proxy_logged(
            name,
            TcpTarget::Cluster(BLACKHOLE.into()),
            Some(ChainSecurity::None),
        )],
    )
}

/// The mTLS mode of a port of this proxy: PeerAuthentication when the mesh has a CA (only then
/// do proxies hold certificates), else plaintext.
fn inbound_mode(push: &PushContext, policy: &EffectiveMtls, port: Option<u16>) -> MtlsMode {
    if !push.mesh.ca_enabled {
        return MtlsMode::Disable;
    }
    match port {
        Some(p) => policy.for_port(p),
        None => policy.mode,
    }
}

fn virtual_inbound(proxy: &Proxy, push: &PushContext) -> Listener {
    let mut chains = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut any_http = false;
    let mut any_tls = false;
    let policy = push.peer_authn(proxy);
    for (svc, eps) in push.proxy_services(proxy) {
        for sp in &svc.ports {
            // The target port this service port lands on in this workload.
            let Some(ep) = eps.iter().find(|e| {
                push.endpoints(&svc.hostname, sp.port)
                    .iter()
                    .any(|x| x == *e)
            }) else {
                continue;
            };
            if !seen.insert(ep.port) {
                continue;
            }
            let ip = InboundPort {
                port: ep.port,
                protocol: sp.protocol,
            };
            any_http |= sp.protocol == Protocol::Auto;
            match inbound_mode(push, &policy, Some(ep.port)) {
                MtlsMode::Strict => {
                    any_tls = true;
                    chains.push(ip.mtls_chain());
                    chains.push(refuse_chain(
                        &format!("{}_plaintext_refused", ip.cluster()),
                        ip.port_match("", vec![]),
                    ));
                }
                MtlsMode::Permissive | MtlsMode::Unset => {
                    any_tls = true;
                    chains.push(ip.mtls_chain());
                    chains.extend(ip.plaintext_chains());
                }
                MtlsMode::Disable => chains.extend(ip.plaintext_chains()),
            }
        }
    }
    let mut listener_filters = vec![listener_filter(
        "envoy.filters.listener.original_dst",
        &OriginalDst::default(),
    )];
    // Ports no service names: passed through to the original destination, under the
    // workload-level mode (mTLS terminated first when it says so, as Istio does).
    let workload_mode = inbound_mode(push, &policy, None);
    if workload_mode != MtlsMode::Disable {
        any_tls = true;
        chains.push(lv3::FilterChain {
            name: "InboundPassthroughFilterChain_mtls".into(),
            filter_chain_match: Some(lv3::FilterChainMatch {
                transport_protocol: "tls".into(),
                application_protocols: mesh_alpn(),
                ..Default::default()
            }),
            filters: vec![tcp_proxy_logged(
                INBOUND_PASSTHROUGH,
                TcpTarget::Cluster(INBOUND_PASSTHROUGH.into()),
                Some(ChainSecurity::MutualTls),
            )],
            transport_socket: Some(mtls::istio_mutual_downstream(&[])),
            ..Default::default()
        });
    }
    if any_tls {
        listener_filters.push(listener_filter(
            "envoy.filters.listener.tls_inspector",
            &TlsInspector::default(),
        ));
    }
    if any_http {
        listener_filters.push(listener_filter(
            "envoy.filters.listener.http_inspector",
            &HttpInspector::default(),
        ));
    }
    let passthrough = if workload_mode == MtlsMode::Strict {
        refuse_chain("InboundPassthroughFilterChain", None)
    } else {
        chain(
            "InboundPassthroughFilterChain",
            None,
            vec![tcp_proxy_logged(
                INBOUND_PASSTHROUGH,
                TcpTarget::Cluster(INBOUND_PASSTHROUGH.into()),
                Some(ChainSecurity::None),
            )],
        )
    };
    if chains.is_empty() {
        chains.push(passthrough.clone());
    }
    Listener {
        name: VIRTUAL_INBOUND.into(),
        address: Some(socket_address("0.0.0.0", INBOUND_PORT)),
        traffic_direction: core::TrafficDirection::Inbound as i32,
        listener_filters,
        listener_filters_timeout: Some(super::duration(std::time::Duration::from_millis(
            u64::from(DETECTION_TIMEOUT_MS),
        ))),
        continue_on_listener_filters_timeout: true,
        filter_chains: chains,
        default_filter_chain: Some(passthrough),
        ..Default::default()
    }
}

/// Inbound HTTP: everything to the local app's port, no timeout (the caller's sidecar owns
/// timeouts and retries).
fn inbound_route(port: u16, cluster: &str) -> rv3::RouteConfiguration {
    rv3::RouteConfiguration {
        name: format!("inbound|{port}||"),
        validate_clusters: bool_value(false),
        virtual_hosts: vec![rv3::VirtualHost {
            name: format!("inbound|http|{port}"),
            domains: vec!["*".into()],
            routes: vec![rv3::Route {
                name: "default".into(),
                r#match: Some(rv3::RouteMatch {
                    path_specifier: Some(rv3::route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(rv3::route::Action::Route(rv3::RouteAction {
                    cluster_specifier: Some(rv3::route_action::ClusterSpecifier::Cluster(
                        cluster.into(),
                    )),
                    timeout: Some(secs(0)),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

// ------------------------------------------------------------------ router (gateways)

fn router(proxy: &Proxy, push: &PushContext) -> Vec<Listener> {
    // port -> servers (with their gateway name), in config order.
    let mut ports: BTreeMap<u16, Vec<(String, &net::Server)>> = BTreeMap::new();
    for (gw_name, gw) in push.gateways_for(proxy) {
        for server in &gw.spec.servers {
            if let Ok(p) = u16::try_from(server.port.target_port.unwrap_or(server.port.number)) {
                ports.entry(p).or_default().push((gw_name.clone(), server));
            }
        }
    }
    let mut out = Vec::new();
    for (port, servers) in ports {
        let name = format!("0.0.0.0_{port}");
        let stat = format!("outbound_0.0.0.0_{port}");
        let route_name = format!("http.{}", servers[0].1.port.number);
        let mut chains = Vec::new();
        let mut listener_filters = Vec::new();
        let proto = Protocol::parse(&servers[0].1.port.protocol);
        for (gw_name, server) in &servers {
            let sp = Protocol::parse(&server.port.protocol);
            match (sp, server.tls.as_ref()) {
                (p, _) if p.is_http() => {
                    if chains.is_empty() {
                        chains.push(chain(
                            &name,
                            None,
                            vec![http_connection_manager(
                                &stat,
                                Routes::Rds(route_name.clone()),
                                true,
                            )],
                        ));
                    }
                }
                (Protocol::Https, Some(t)) | (Protocol::Tls, Some(t))
                    if matches!(
                        t.mode,
                        net::ServerTlsMode::Simple | net::ServerTlsMode::Mutual
                    ) =>
                {
                    let snis: Vec<String> = server_sni(server);
                    let filter = if sp == Protocol::Https {
                        http_connection_manager(&stat, Routes::Rds(route_name.clone()), true)
                    } else {
                        tcp_proxy(
                            &stat,
                            gateway_tcp_target(push, gw_name, server, port)
                                .unwrap_or(TcpTarget::Cluster(BLACKHOLE.into())),
                        )
                    };
                    chains.push(lv3::FilterChain {
                        name: format!("{name}_{}", server.name.clone().unwrap_or_default()),
                        filter_chain_match: Some(lv3::FilterChainMatch {
                            server_names: snis,
                            transport_protocol: "tls".into(),
                            ..Default::default()
                        }),
                        filters: vec![filter],
                        transport_socket: downstream_tls(t),
                        ..Default::default()
                    });
                    listener_filters.push(listener_filter(
                        "envoy.filters.listener.tls_inspector",
                        &TlsInspector::default(),
                    ));
                }
                (Protocol::Https | Protocol::Tls, _) => {
                    // PASSTHROUGH: route on SNI from the VirtualServices' tls routes.
                    listener_filters.push(listener_filter(
                        "envoy.filters.listener.tls_inspector",
                        &TlsInspector::default(),
                    ));
                    for (snis, target) in gateway_tls_routes(push, gw_name, port) {
                        chains.push(chain(
                            &format!("{name}_{}", snis.join(",")),
                            Some(lv3::FilterChainMatch {
                                server_names: snis.into_iter().filter(|s| s != "*").collect(),
                                transport_protocol: "tls".into(),
                                ..Default::default()
                            }),
                            vec![tcp_proxy(&stat, target)],
                        ));
                    }
                }
                _ => {
                    if let Some(target) = gateway_tcp_target(push, gw_name, server, port) {
                        if chains.is_empty() {
                            chains.push(chain(&name, None, vec![tcp_proxy(&stat, target)]));
                        }
                    }
                }
            }
        }
        if chains.is_empty() {
            continue;
        }
        listener_filters.dedup_by(|a, b| a.name == b.name);
        let _ = proto;
        out.push(Listener {
            name,
            address: Some(socket_address("0.0.0.0", port)),
            traffic_direction: core::TrafficDirection::Outbound as i32,
            listener_filters,
            filter_chains: chains,
            ..Default::default()
        });
    }
    out
}

fn server_sni(server: &net::Server) -> Vec<String> {
    let hosts: Vec<String> = server
        .hosts
        .iter()
        .map(|h| h.split_once('/').map(|(_, h)| h).unwrap_or(h).to_string())
        .filter(|h| h != "*")
        .collect();
    hosts
}

fn downstream_tls(t: &net::ServerTlsSettings) -> Option<core::TransportSocket> {
    let file = |p: &str| core::DataSource {
        specifier: Some(core::data_source::Specifier::Filename(p.into())),
        ..Default::default()
    };
    let (cert, key) = (t.server_certificate.as_deref()?, t.private_key.as_deref()?);
    let mut common = tls::CommonTlsContext {
        tls_certificates: vec![tls::TlsCertificate {
            certificate_chain: Some(file(cert)),
            private_key: Some(file(key)),
            ..Default::default()
        }],
        alpn_protocols: vec!["h2".into(), "http/1.1".into()],
        ..Default::default()
    };
    let mutual = t.mode == net::ServerTlsMode::Mutual;
    if let (true, Some(ca)) = (mutual, t.ca_certificates.as_deref()) {
        common.validation_context_type = Some(
            tls::common_tls_context::ValidationContextType::ValidationContext(
                tls::CertificateValidationContext {
                    trusted_ca: Some(file(ca)),
                    ..Default::default()
                },
            ),
        );
    }
    let ctx = tls::DownstreamTlsContext {
        common_tls_context: Some(common),
        require_client_certificate: bool_value(mutual),
        ..Default::default()
    };
    Some(core::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(pack(&ctx))),
    })
}

fn gateway_tcp_target(
    push: &PushContext,
    gw: &str,
    server: &net::Server,
    port: u16,
) -> Option<TcpTarget> {
    for vs in push.gateway_virtual_services(gw) {
        if !server_hosts_match(server, &vs.spec.hosts) {
            continue;
        }
        for route in &vs.spec.tcp {
            let ok = route.matches.is_empty()
                || route.matches.iter().any(|m| {
                    m.port.is_none_or(|p| p == server.port.number)
                        && (m.gateways.is_empty() || m.gateways.iter().any(|g| g == gw))
                });
            if ok && !route.route.is_empty() {
                return Some(route_target(push, &route.route, port));
            }
        }
    }
    None
}

fn gateway_tls_routes(push: &PushContext, gw: &str, port: u16) -> Vec<(Vec<String>, TcpTarget)> {
    let mut out = Vec::new();
    for vs in push.gateway_virtual_services(gw) {
        for route in &vs.spec.tls {
            for m in &route.matches {
                if m.port.is_some_and(|p| p != u32::from(port)) || route.route.is_empty() {
                    continue;
                }
                out.push((m.sni_hosts.clone(), route_target(push, &route.route, port)));
            }
        }
    }
    out
}

fn server_hosts_match(server: &net::Server, vs_hosts: &[String]) -> bool {
    server.hosts.iter().any(|sh| {
        let h = sh.split_once('/').map(|(_, h)| h).unwrap_or(sh);
        vs_hosts
            .iter()
            .any(|v| host_matches(h, v) || host_matches(v, h))
    })
}
