//! CDS: services and DestinationRules -> Envoy clusters, named as istiod names them.
//!
//! Sidecars and routers get `outbound|PORT|SUBSET|FQDN` for every visible service port and
//! DestinationRule subset; sidecars also get `inbound|PORT||` for their own workload's ports.
//! The fixed clusters `PassthroughCluster`, `BlackHoleCluster` and
//! `InboundPassthroughCluster` are always present, as in Istio.
//!
//! Upstream TLS, in Istio's order of precedence:
//! - a DestinationRule `tls` (top level, port level, subset) decides: DISABLE is plaintext,
//!   SIMPLE / MUTUAL originate TLS with files (`caCertificates`, `clientCertificate`,
//!   `privateKey`, `sni`, `subjectAltNames`; `credentialName` is reported unsupported and
//!   left plaintext), ISTIO_MUTUAL is mesh mTLS;
//! - otherwise auto mTLS: endpoints labelled `security.istio.io/tlsMode=istio` (a sidecar in
//!   front) get mesh mTLS through `transport_socket_matches`, the others plaintext.
//!
//! Locality load balancing: `common_lb_config.locality_weighted_lb_config` when the merged
//! `localityLbSetting` distributes load, or names failover rules with outlier detection on
//! (istiod's rule); DNS clusters' inline endpoints get the same per-proxy priorities and
//! weights as EDS ([`super::endpoint`]).
//!
//! HTTP/1 header case: with ProxyConfig `proxyHeaders.preserveHttp1HeaderCase` (the proxy's
//! own, else the mesh default), HTTP and auto-detected ports' clusters (outbound and inbound)
//! and both passthrough clusters write headers with Envoy's `preserve_case` formatter, as
//! istiod does; otherwise Envoy lowercases them. An HTTP/2 cluster (port protocol or
//! `h2UpgradePolicy: UPGRADE`) stays HTTP/2: istiod would turn an upgraded cluster back into
//! HTTP/1 to carry the formatter, which loses the upgrade the DestinationRule asked for.
//!
//! Mesh mTLS (see [`super::tls`]) needs the agent's SDS secrets, so it is generated only when
//! the pilot runs a CA ([`mizzen_model::MeshSettings::ca_enabled`]).

use super::tls::{self as mtls, MATCH_DISABLED, MATCH_ISTIO};
use super::{ads_config_source, duration, outbound_cluster_name, secs, socket_address};
use crate::any::pack;
use envoy_types::pb::envoy::config::cluster::v3::{self as cv3, cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as ev3;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as httpv3;
use envoy_types::pb::google::protobuf::UInt32Value;
use mizzen_config::networking as net;
use mizzen_model::{Endpoint, Proxy, ProxyType, PushContext, Resolution, Service, ServicePort};
use std::collections::HashMap;

pub const PASSTHROUGH: &str = "PassthroughCluster";
pub const BLACKHOLE: &str = "BlackHoleCluster";
pub const INBOUND_PASSTHROUGH: &str = "InboundPassthroughCluster";
/// Istio sends inbound traffic to the app from this address, so the app can tell
/// mesh-delivered connections from its own.
pub const INBOUND_SOURCE: &str = "127.0.0.6";

/// Istio's default connect timeout (MeshConfig.connectTimeout).
const CONNECT_TIMEOUT_SECS: i64 = 10;

pub fn generate(proxy: &Proxy, push: &PushContext) -> Vec<Cluster> {
    let preserve = proxy.preserve_http1_header_case(&push.mesh);
    let mut passthrough = passthrough();
    if preserve {
        set_http1_preserve_case(&mut passthrough);
    }
    let mut out = vec![passthrough, blackhole()];
    for svc in push.services.values() {
        if !push.visible_to(proxy, svc) {
            continue;
        }
        for port in &svc.ports {
            out.extend(outbound_clusters(proxy, push, svc, port));
        }
    }
    if proxy.proxy_type == ProxyType::Sidecar {
        let mut c = inbound_passthrough();
        if preserve {
            set_http1_preserve_case(&mut c);
        }
        out.push(c);
        out.extend(inbound_clusters(proxy, push));
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out.dedup_by(|a, b| a.name == b.name);
    out
}

/// Names of the clusters whose endpoints come over EDS (what the proxy will ask for).
pub fn eds_cluster_names(proxy: &Proxy, push: &PushContext) -> Vec<String> {
    generate(proxy, push)
        .into_iter()
        .filter(|c| matches!(c.cluster_discovery_type, Some(cluster::ClusterDiscoveryType::Type(t)) if t == cluster::DiscoveryType::Eds as i32))
        .map(|c| c.name)
        .collect()
}

fn base(name: String, kind: cluster::DiscoveryType) -> Cluster {
    Cluster {
        name,
        connect_timeout: Some(secs(CONNECT_TIMEOUT_SECS)),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(kind as i32)),
        ..Default::default()
    }
}

fn passthrough() -> Cluster {
    let mut c = base(PASSTHROUGH.into(), cluster::DiscoveryType::OriginalDst);
    c.lb_policy = cluster::LbPolicy::ClusterProvided as i32;
    c.circuit_breakers = Some(default_circuit_breakers());
    c
}

fn blackhole() -> Cluster {
    base(BLACKHOLE.into(), cluster::DiscoveryType::Static)
}

fn inbound_passthrough() -> Cluster {
    let mut c = base(
        INBOUND_PASSTHROUGH.into(),
        cluster::DiscoveryType::OriginalDst,
    );
    c.lb_policy = cluster::LbPolicy::ClusterProvided as i32;
    c.upstream_bind_config = Some(inbound_bind());
    c
}

fn inbound_bind() -> core::BindConfig {
    core::BindConfig {
        source_address: Some(core::SocketAddress {
            address: INBOUND_SOURCE.into(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(0)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `inbound|PORT||` for each target port of the proxy's own service instances: the app is
/// reached on the original destination (the pod IP), from 127.0.0.6.
fn inbound_clusters(proxy: &Proxy, push: &PushContext) -> Vec<Cluster> {
    let mut out = Vec::new();
    for (svc, eps) in push.proxy_services(proxy) {
        for ep in eps {
            let mut c = base(
                format!("inbound|{}||", ep.port),
                cluster::DiscoveryType::Static,
            );
            // The app behind an http2/grpc port speaks HTTP/2 (often prior knowledge only):
            // talk HTTP/2 to it, as istiod does for inbound clusters of such ports.
            let h2 = svc.ports.iter().any(|p| {
                p.protocol.is_http2()
                    && push
                        .endpoints(&svc.hostname, p.port)
                        .iter()
                        .any(|e| e.port == ep.port && e.address == ep.address)
            });
            if h2 {
                c.typed_extension_protocol_options = HashMap::from([(
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
                    pack(&http2_only()),
                )]);
            } else if proxy.preserve_http1_header_case(&push.mesh)
                && svc.ports.iter().any(|p| {
                    http1_or_auto(p.protocol)
                        && push
                            .endpoints(&svc.hostname, p.port)
                            .iter()
                            .any(|e| e.port == ep.port && e.address == ep.address)
                })
            {
                set_http1_preserve_case(&mut c);
            }
            c.load_assignment = Some(ev3::ClusterLoadAssignment {
                cluster_name: c.name.clone(),
                endpoints: vec![ev3::LocalityLbEndpoints {
                    lb_endpoints: vec![lb_endpoint(&ep.address, ep.port, 1)],
                    ..Default::default()
                }],
                ..Default::default()
            });
            c.upstream_bind_config = Some(inbound_bind());
            c.circuit_breakers = Some(default_circuit_breakers());
            out.push(c);
        }
    }
    out
}

/// Ports whose clusters carry HTTP/1 options in istiod (`IsHTTP() || IsUnsupported()`, less
/// the HTTP/2 ones, which return earlier there).
fn http1_or_auto(p: mizzen_model::Protocol) -> bool {
    matches!(
        p,
        mizzen_model::Protocol::Http | mizzen_model::Protocol::Auto
    )
}

/// Istio's `preserveCaseFormatterConfig`: Envoy's preserve-case stateful formatter.
pub(crate) fn preserve_case_http1() -> core::Http1ProtocolOptions {
    use core::http1_protocol_options::{header_key_format::HeaderFormat, HeaderKeyFormat};
    use envoy_types::pb::envoy::extensions::http::header_formatters::preserve_case::v3::PreserveCaseFormatterConfig;
    core::Http1ProtocolOptions {
        header_key_format: Some(HeaderKeyFormat {
            header_format: Some(HeaderFormat::StatefulFormatter(
                core::TypedExtensionConfig {
                    name: "preserve_case".into(),
                    typed_config: Some(pack(&PreserveCaseFormatterConfig::default())),
                },
            )),
        }),
        ..Default::default()
    }
}

/// Explicit HTTP/1 upstream with the preserve-case formatter, on a cluster that had no HTTP
/// protocol options.
fn set_http1_preserve_case(c: &mut Cluster) {
    use httpv3::http_protocol_options::{explicit_http_config::ProtocolConfig, *};
    let opts = httpv3::HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(ProtocolConfig::HttpProtocolOptions(preserve_case_http1())),
            },
        )),
        ..Default::default()
    };
    c.typed_extension_protocol_options = HashMap::from([(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
        pack(&opts),
    )]);
}

fn http2_only() -> httpv3::HttpProtocolOptions {
    use httpv3::http_protocol_options::{explicit_http_config::ProtocolConfig, *};
    httpv3::HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(
                    core::Http2ProtocolOptions::default(),
                )),
            },
        )),
        ..Default::default()
    }
}

/// An endpoint of a service, carrying `{envoy.transport_socket_match: {tlsMode: istio}}`
/// when a sidecar fronts it and accepts mTLS (what auto mTLS matches on).
pub(crate) fn service_lb_endpoint(push: &PushContext, ep: &Endpoint) -> ev3::LbEndpoint {
    let mut lb = lb_endpoint(&ep.address, ep.port, ep.weight);
    if push.endpoint_accepts_mtls(ep) {
        lb.metadata = Some(mtls::endpoint_tls_metadata());
    }
    lb
}

pub(crate) fn lb_endpoint(address: &str, port: u16, weight: u32) -> ev3::LbEndpoint {
    ev3::LbEndpoint {
        host_identifier: Some(ev3::lb_endpoint::HostIdentifier::Endpoint(ev3::Endpoint {
            address: Some(socket_address(address, port)),
            ..Default::default()
        })),
        load_balancing_weight: Some(UInt32Value {
            value: weight.max(1),
        }),
        ..Default::default()
    }
}

/// The merged policy for a port/subset: DR top-level, then port-level, then subset (and the
/// subset's own port-level), later ones overriding earlier ones field by field as istiod does.
#[derive(Default)]
pub(crate) struct Policy {
    pub(crate) lb: Option<net::LoadBalancerSettings>,
    pool: Option<net::ConnectionPoolSettings>,
    pub(crate) outlier: Option<net::OutlierDetection>,
    tls: Option<net::ClientTlsSettings>,
}

/// The merged policy of one cluster (what [`outbound_clusters`] builds it with), for the
/// generators that need it per cluster name (EDS's locality load balancing).
pub(crate) fn traffic_policy(
    proxy: &Proxy,
    push: &PushContext,
    host: &str,
    port: u16,
    subset: &str,
) -> Policy {
    let mut p = Policy::default();
    let Some(dr) = push.destination_rule(&proxy.namespace, host) else {
        return p;
    };
    if let Some(tp) = &dr.spec.traffic_policy {
        p.apply(tp, port);
    }
    if !subset.is_empty() {
        if let Some(tp) = dr
            .spec
            .subsets
            .iter()
            .find(|s| s.name == subset)
            .and_then(|s| s.traffic_policy.as_ref())
        {
            p.apply(tp, port);
        }
    }
    p
}

impl Policy {
    fn apply(&mut self, tp: &net::TrafficPolicy, port: u16) {
        self.overlay(
            tp.load_balancer.clone(),
            tp.connection_pool.clone(),
            tp.outlier_detection.clone(),
            tp.tls.clone(),
        );
        if let Some(pl) = tp
            .port_level_settings
            .iter()
            .find(|p| p.port.as_ref().is_some_and(|s| s.number == u32::from(port)))
        {
            self.overlay(
                pl.load_balancer.clone(),
                pl.connection_pool.clone(),
                pl.outlier_detection.clone(),
                pl.tls.clone(),
            );
        }
    }

    fn overlay(
        &mut self,
        lb: Option<net::LoadBalancerSettings>,
        pool: Option<net::ConnectionPoolSettings>,
        outlier: Option<net::OutlierDetection>,
        tls: Option<net::ClientTlsSettings>,
    ) {
        if lb.is_some() {
            self.lb = lb;
        }
        if pool.is_some() {
            self.pool = pool;
        }
        if outlier.is_some() {
            self.outlier = outlier;
        }
        if tls.is_some() {
            self.tls = tls;
        }
    }
}

fn outbound_clusters(
    proxy: &Proxy,
    push: &PushContext,
    svc: &Service,
    port: &ServicePort,
) -> Vec<Cluster> {
    if port.protocol == mizzen_model::Protocol::Udp {
        return Vec::new();
    }
    let dr = push.destination_rule(&proxy.namespace, &svc.hostname);
    let mut policy = Policy::default();
    if let Some(tp) = dr.and_then(|d| d.spec.traffic_policy.as_ref()) {
        policy.apply(tp, port.port);
    }
    let mut out = vec![outbound_cluster(proxy, push, svc, port, "", &policy)];
    if let Some(dr) = dr {
        for subset in &dr.spec.subsets {
            let mut p = Policy::default();
            if let Some(tp) = &dr.spec.traffic_policy {
                p.apply(tp, port.port);
            }
            if let Some(tp) = &subset.traffic_policy {
                p.apply(tp, port.port);
            }
            out.push(outbound_cluster(proxy, push, svc, port, &subset.name, &p));
        }
    }
    out
}

fn outbound_cluster(
    proxy: &Proxy,
    push: &PushContext,
    svc: &Service,
    port: &ServicePort,
    subset: &str,
    policy: &Policy,
) -> Cluster {
    let name = outbound_cluster_name(port.port, subset, &svc.hostname);
    let mut c = match svc.resolution {
        Resolution::ClientSideLb => {
            let mut c = base(name.clone(), cluster::DiscoveryType::Eds);
            c.eds_cluster_config = Some(cluster::EdsClusterConfig {
                eds_config: Some(ads_config_source()),
                service_name: name.clone(),
            });
            c
        }
        Resolution::Dns | Resolution::DnsRoundRobin => {
            let kind = if svc.resolution == Resolution::Dns {
                cluster::DiscoveryType::StrictDns
            } else {
                cluster::DiscoveryType::LogicalDns
            };
            let mut c = base(name.clone(), kind);
            let eps: Vec<&Endpoint> = push.endpoints(&svc.hostname, port.port).iter().collect();
            let endpoints = if kind == cluster::DiscoveryType::LogicalDns {
                // LOGICAL_DNS takes exactly one host.
                vec![ev3::LocalityLbEndpoints {
                    lb_endpoints: eps
                        .iter()
                        .take(1)
                        .map(|e| service_lb_endpoint(push, e))
                        .collect(),
                    ..Default::default()
                }]
            } else {
                // Grouped by locality: the priorities below apply to these too, as in istiod.
                super::endpoint::locality_groups(push, &eps, false).0
            };
            c.load_assignment = Some(ev3::ClusterLoadAssignment {
                cluster_name: name.clone(),
                endpoints,
                ..Default::default()
            });
            c.dns_lookup_family = cluster::DnsLookupFamily::V4Preferred as i32;
            c
        }
        Resolution::Passthrough => {
            let mut c = base(name.clone(), cluster::DiscoveryType::OriginalDst);
            c.lb_policy = cluster::LbPolicy::ClusterProvided as i32;
            c
        }
    };
    if svc.resolution != Resolution::Passthrough {
        apply_lb(&mut c, policy.lb.as_ref());
    }
    c.circuit_breakers = Some(circuit_breakers(policy.pool.as_ref()));
    if let Some(tcp) = policy.pool.as_ref().and_then(|p| p.tcp.as_ref()) {
        if let Some(t) = tcp.connect_timeout {
            c.connect_timeout = Some(duration(t.as_std()));
        }
        if let Some(ka) = &tcp.tcp_keepalive {
            c.upstream_connection_options = Some(cv3::UpstreamConnectionOptions {
                tcp_keepalive: Some(core::TcpKeepalive {
                    keepalive_probes: ka.probes.map(|v| UInt32Value { value: v }),
                    keepalive_time: ka.time.map(|d| UInt32Value {
                        value: u32::try_from(d.as_std().as_secs()).unwrap_or(u32::MAX),
                    }),
                    keepalive_interval: ka.interval.map(|d| UInt32Value {
                        value: u32::try_from(d.as_std().as_secs()).unwrap_or(u32::MAX),
                    }),
                }),
                ..Default::default()
            });
        }
    }
    if let Some(od) = &policy.outlier {
        c.outlier_detection = Some(outlier(od));
    }
    if svc.resolution != Resolution::Passthrough {
        apply_locality_lb(&mut c, proxy, policy);
    }
    let http = policy.pool.as_ref().and_then(|p| p.http.as_ref());
    let h2 = port.protocol.is_http2()
        || http.and_then(|h| h.h2_upgrade_policy) == Some(net::H2UpgradePolicy::Upgrade);
    let mut common = core::HttpProtocolOptions::default();
    let mut has_common = false;
    let tcp = policy.pool.as_ref().and_then(|p| p.tcp.as_ref());
    // As istiod: http.idleTimeout, else tcp.idleTimeout; tcp.maxConnectionDuration.
    let idle = http
        .and_then(|h| h.idle_timeout)
        .or(tcp.and_then(|t| t.idle_timeout));
    if let Some(idle) = idle {
        common.idle_timeout = Some(duration(idle.as_std()));
        has_common = true;
    }
    if let Some(d) = tcp.and_then(|t| t.max_connection_duration) {
        common.max_connection_duration = Some(duration(d.as_std()));
        has_common = true;
    }
    if let Some(m) = http
        .and_then(|h| h.max_requests_per_connection)
        .filter(|m| *m > 0)
    {
        common.max_requests_per_connection = Some(UInt32Value {
            value: m.unsigned_abs(),
        });
        has_common = true;
    }
    let preserve_case =
        !h2 && http1_or_auto(port.protocol) && proxy.preserve_http1_header_case(&push.mesh);
    if h2 || has_common || preserve_case {
        let protocol = if h2 {
            httpv3::http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(core::Http2ProtocolOptions {
                max_concurrent_streams: http
                    .and_then(|h| h.max_concurrent_streams)
                    .filter(|m| *m > 0)
                    .map(|m| UInt32Value { value: m.unsigned_abs() }),
                ..Default::default()
            })
        } else {
            httpv3::http_protocol_options::explicit_http_config::ProtocolConfig::HttpProtocolOptions(
                if preserve_case {
                    preserve_case_http1()
                } else {
                    core::Http1ProtocolOptions::default()
                },
            )
        };
        let opts = httpv3::HttpProtocolOptions {
            common_http_protocol_options: has_common.then_some(common),
            upstream_protocol_options: Some(
                httpv3::http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                    httpv3::http_protocol_options::ExplicitHttpConfig {
                        protocol_config: Some(protocol),
                    },
                ),
            ),
            ..Default::default()
        };
        c.typed_extension_protocol_options = HashMap::from([(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
            pack(&opts),
        )]);
    }
    upstream_tls(&mut c, push, svc, port.port, subset, policy.tls.as_ref());
    c
}

/// TLS towards the cluster's endpoints: the DestinationRule's mode, else auto mTLS.
fn upstream_tls(
    c: &mut Cluster,
    push: &PushContext,
    svc: &Service,
    port: u16,
    subset: &str,
    tls: Option<&net::ClientTlsSettings>,
) {
    let mesh = || {
        mtls::istio_mutual_upstream(
            mtls::mesh_sni(port, subset, &svc.hostname),
            &push.service_identities(&svc.hostname, port),
        )
    };
    match tls {
        Some(t) => match t.mode {
            net::ClientTlsMode::Disable => {}
            net::ClientTlsMode::IstioMutual => {
                // The rule's own `sni` / `subjectAltNames` replace Istio's defaults.
                if push.mesh.ca_enabled {
                    let sans = if t.subject_alt_names.is_empty() {
                        push.service_identities(&svc.hostname, port)
                    } else {
                        t.subject_alt_names.clone()
                    };
                    let sni = t
                        .sni
                        .clone()
                        .unwrap_or_else(|| mtls::mesh_sni(port, subset, &svc.hostname));
                    c.transport_socket = Some(mtls::istio_mutual_upstream(sni, &sans));
                }
            }
            net::ClientTlsMode::Simple | net::ClientTlsMode::Mutual => {
                c.transport_socket = file_transport_socket(t, &svc.hostname);
            }
        },
        // Auto mTLS. ORIGINAL_DST clusters have no endpoint metadata to match on.
        None if push.mesh.ca_enabled
            && svc.resolution != Resolution::Passthrough
            && c.cluster_discovery_type
                != Some(cluster::ClusterDiscoveryType::Type(
                    cluster::DiscoveryType::OriginalDst as i32,
                )) =>
        {
            c.transport_socket_matches = vec![
                cluster::TransportSocketMatch {
                    name: MATCH_ISTIO.into(),
                    r#match: Some(mtls::tls_mode_istio()),
                    transport_socket: Some(mesh()),
                },
                cluster::TransportSocketMatch {
                    name: MATCH_DISABLED.into(),
                    r#match: Some(Default::default()),
                    transport_socket: Some(mtls::raw_buffer()),
                },
            ];
        }
        None => {}
    }
}

/// Locality load balancing (istiod's `applyLocalityLoadBalancer`): weigh localities when the
/// setting distributes load or names failover rules with outlier detection on, and rank the
/// inline (DNS) endpoints as EDS does.
fn apply_locality_lb(c: &mut Cluster, proxy: &Proxy, policy: &Policy) {
    let Some(setting) = mizzen_model::locality::LocalityLbSetting::effective(
        policy
            .lb
            .as_ref()
            .and_then(|lb| lb.locality_lb_setting.as_ref()),
    ) else {
        return;
    };
    let outlier = c.outlier_detection.is_some();
    if setting.locality_weighted(outlier) {
        c.common_lb_config = Some(cluster::CommonLbConfig {
            locality_config_specifier: Some(
                cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(
                    Default::default(),
                ),
            ),
            ..Default::default()
        });
    }
    if let Some(la) = c.load_assignment.as_mut() {
        super::endpoint::apply_locality_lb(la, None, proxy, &setting, outlier);
    }
}

fn apply_lb(c: &mut Cluster, lb: Option<&net::LoadBalancerSettings>) {
    // Istio's default is LEAST_REQUEST.
    c.lb_policy = cluster::LbPolicy::LeastRequest as i32;
    let Some(lb) = lb else { return };
    if let Some(ch) = &lb.consistent_hash {
        if let Some(m) = &ch.maglev {
            c.lb_policy = cluster::LbPolicy::Maglev as i32;
            if let Some(size) = m.table_size {
                c.lb_config = Some(cluster::LbConfig::MaglevLbConfig(cluster::MaglevLbConfig {
                    table_size: Some(envoy_types::pb::google::protobuf::UInt64Value {
                        value: size,
                    }),
                }));
            }
        } else {
            c.lb_policy = cluster::LbPolicy::RingHash as i32;
            let min = ch
                .ring_hash
                .as_ref()
                .and_then(|r| r.minimum_ring_size)
                .or(ch.minimum_ring_size);
            c.lb_config = Some(cluster::LbConfig::RingHashLbConfig(
                cluster::RingHashLbConfig {
                    minimum_ring_size: min
                        .map(|v| envoy_types::pb::google::protobuf::UInt64Value { value: v }),
                    ..Default::default()
                },
            ));
        }
        return;
    }
    c.lb_policy = match lb.simple {
        Some(net::SimpleLb::RoundRobin) => cluster::LbPolicy::RoundRobin,
        Some(net::SimpleLb::Random) => cluster::LbPolicy::Random,
        Some(net::SimpleLb::Passthrough) => {
            c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::OriginalDst as i32,
            ));
            c.eds_cluster_config = None;
            c.load_assignment = None;
            cluster::LbPolicy::ClusterProvided
        }
        _ => cluster::LbPolicy::LeastRequest,
    } as i32;
}

fn default_circuit_breakers() -> cv3::CircuitBreakers {
    circuit_breakers(None)
}

/// Istio sets every threshold to the maximum unless the DestinationRule says otherwise.
fn circuit_breakers(pool: Option<&net::ConnectionPoolSettings>) -> cv3::CircuitBreakers {
    let max = u32::MAX;
    let pick = |v: Option<i32>| UInt32Value {
        value: v
            .filter(|x| *x > 0)
            .map(|x| x.unsigned_abs())
            .unwrap_or(max),
    };
    let tcp = pool.and_then(|p| p.tcp.as_ref());
    let http = pool.and_then(|p| p.http.as_ref());
    cv3::CircuitBreakers {
        thresholds: vec![cv3::circuit_breakers::Thresholds {
            max_connections: Some(pick(tcp.and_then(|t| t.max_connections))),
            max_pending_requests: Some(pick(http.and_then(|h| h.http1_max_pending_requests))),
            max_requests: Some(pick(http.and_then(|h| h.http2_max_requests))),
            max_retries: Some(pick(http.and_then(|h| h.max_retries))),
            track_remaining: true,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn outlier(od: &net::OutlierDetection) -> cv3::OutlierDetection {
    let u = |v: u32| Some(UInt32Value { value: v });
    let mut out = cv3::OutlierDetection {
        interval: od.interval.map(|d| duration(d.as_std())),
        base_ejection_time: od.base_ejection_time.map(|d| duration(d.as_std())),
        max_ejection_percent: od.max_ejection_percent.map(|v| UInt32Value {
            value: v.unsigned_abs(),
        }),
        // Istio disables success-rate ejection; only consecutive errors count.
        enforcing_success_rate: u(0),
        ..Default::default()
    };
    let five = od
        .consecutive_5xx_errors
        .or(od.consecutive_errors.map(|v| v.unsigned_abs()));
    match five {
        Some(0) | None => out.enforcing_consecutive_5xx = u(0),
        Some(n) => {
            out.consecutive_5xx = u(n);
            out.enforcing_consecutive_5xx = u(100);
        }
    }
    match od.consecutive_gateway_errors {
        Some(n) if n > 0 => {
            out.consecutive_gateway_failure = u(n);
            out.enforcing_consecutive_gateway_failure = u(100);
        }
        _ => out.enforcing_consecutive_gateway_failure = u(0),
    }
    if od.split_external_local_origin_errors == Some(true) {
        out.split_external_local_origin_errors = true;
        if let Some(n) = od.consecutive_local_origin_failures {
            out.consecutive_local_origin_failure = u(n);
            out.enforcing_consecutive_local_origin_failure = u(100);
        }
    }
    out
}

fn file(path: &str) -> core::DataSource {
    core::DataSource {
        specifier: Some(core::data_source::Specifier::Filename(path.to_string())),
        ..Default::default()
    }
}

/// DestinationRule TLS origination with files (SIMPLE / MUTUAL). `credentialName` (a secret
/// the proxy would fetch) is not supported: no TLS, and the pilot reports it at each push.
fn file_transport_socket(t: &net::ClientTlsSettings, host: &str) -> Option<core::TransportSocket> {
    if t.credential_name.as_deref().is_some_and(|c| !c.is_empty()) {
        return None;
    }
    let mut common = tls::CommonTlsContext::default();
    if t.mode == net::ClientTlsMode::Mutual {
        if let (Some(cert), Some(key)) = (&t.client_certificate, &t.private_key) {
            common.tls_certificates = vec![tls::TlsCertificate {
                certificate_chain: Some(file(cert)),
                private_key: Some(file(key)),
                ..Default::default()
            }];
        }
    }
    if t.insecure_skip_verify != Some(true) {
        if let Some(ca) = &t.ca_certificates {
            common.validation_context_type = Some(
                tls::common_tls_context::ValidationContextType::ValidationContext(
                    tls::CertificateValidationContext {
                        trusted_ca: Some(file(ca)),
                        match_typed_subject_alt_names: mtls::san_matchers(&t.subject_alt_names),
                        ..Default::default()
                    },
                ),
            );
        }
    }
    let ctx = tls::UpstreamTlsContext {
        common_tls_context: Some(common),
        sni: t.sni.clone().unwrap_or_else(|| {
            if host.starts_with('*') {
                String::new()
            } else {
                host.to_string()
            }
        }),
        ..Default::default()
    };
    Some(mtls::transport_socket(&ctx))
}
