//! Envoy xDS protos -> [`crate::config`] types.
//!
//! One `TryFrom` per resource kind. The rule: a field the pilot can emit that changes what
//! the proxy does, and that we do not implement, fails the conversion with a message naming
//! the resource and the field. The xDS client turns that into a NACK of that one resource, so
//! the operator sees exactly what to change and the last good version keeps serving.
//! Fields that only tune things we do not model yet (stat prefixes, HIGH-priority circuit
//! breaker thresholds) are accepted.

use super::*;
use envoy_types::pb::envoy::config::cluster::v3 as cv3;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as ev3;
use envoy_types::pb::envoy::config::listener::v3 as lv3;
use envoy_types::pb::envoy::config::route::v3 as rv3;
use envoy_types::pb::envoy::extensions::filters::http::cors::v3 as corsv3;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as faultv3;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as hrbacv3;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3 as nrbacv3;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcpv3;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tlsv3;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as upv3;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

/// Why a resource cannot be honoured. `resource` names it; `field` is the proto path inside
/// it, so the NACK tells the operator precisely what to change.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("{resource}: {field}: {reason}")]
pub struct ConvertError {
    pub resource: String,
    pub field: String,
    pub reason: String,
}

/// Errors built inside a resource before its name is attached.
#[derive(Debug)]
pub(crate) struct FieldError {
    pub(crate) field: String,
    pub(crate) reason: String,
}

pub(crate) type FResult<T> = Result<T, FieldError>;

fn bad<T>(field: impl Into<String>, reason: impl Into<String>) -> FResult<T> {
    Err(FieldError {
        field: field.into(),
        reason: reason.into(),
    })
}

fn within(prefix: &str, e: FieldError) -> FieldError {
    FieldError {
        field: format!("{prefix}.{}", e.field),
        reason: e.reason,
    }
}

fn named(resource: &str, e: FieldError) -> ConvertError {
    ConvertError {
        resource: resource.to_string(),
        field: e.field,
        reason: e.reason,
    }
}

fn unpack<M: Message + Default + prost::Name>(field: &str, any: &Any) -> FResult<M> {
    if any.type_url != M::type_url() {
        return bad(
            field,
            format!("unsupported type {} (want {})", any.type_url, M::type_url()),
        );
    }
    M::decode(any.value.as_slice()).or_else(|e| bad(field, format!("cannot decode: {e}")))
}

fn duration(d: &envoy_types::pb::google::protobuf::Duration) -> Duration {
    let secs = u64::try_from(d.seconds).unwrap_or(0);
    let nanos = u32::try_from(d.nanos).unwrap_or(0);
    Duration::new(secs, nanos)
}

fn regex(field: &str, pattern: &str) -> FResult<FullRegex> {
    FullRegex::new(pattern).or_else(|e| bad(field, format!("invalid regex {pattern:?}: {e}")))
}

fn socket_address(field: &str, a: Option<&core::Address>) -> FResult<(String, u16)> {
    let Some(core::address::Address::SocketAddress(sa)) = a.and_then(|a| a.address.as_ref()) else {
        return bad(field, "only socket addresses are supported");
    };
    let port = match sa.port_specifier {
        Some(core::socket_address::PortSpecifier::PortValue(p)) => {
            u16::try_from(p).or_else(|_| bad(field, format!("port {p} out of range")))?
        }
        _ => return bad(field, "named ports are not supported"),
    };
    Ok((sa.address.clone(), port))
}

// ------------------------------------------------------------------ listeners

const HCM_NAME: &str = "envoy.filters.network.http_connection_manager";
const TCP_PROXY_NAME: &str = "envoy.filters.network.tcp_proxy";
const FAULT_FILTER: &str = "envoy.filters.http.fault";
const CORS_FILTER: &str = "envoy.filters.http.cors";
const ROUTER_FILTER: &str = "envoy.filters.http.router";
const RBAC_FILTER: &str = "envoy.filters.http.rbac";
const NETWORK_RBAC_FILTER: &str = "envoy.filters.network.rbac";
/// Listener filters whose job our own accept path does (original destination, TLS and HTTP
/// sniffing), so accepting them changes nothing.
const KNOWN_LISTENER_FILTERS: [&str; 3] = [
    "envoy.filters.listener.original_dst",
    "envoy.filters.listener.tls_inspector",
    "envoy.filters.listener.http_inspector",
];

impl TryFrom<&lv3::Listener> for Listener {
    type Error = ConvertError;
    fn try_from(l: &lv3::Listener) -> Result<Self, ConvertError> {
        listener(l).map_err(|e| named(&format!("listener {}", l.name), e))
    }
}

fn listener(l: &lv3::Listener) -> FResult<Listener> {
    let (host, port) = socket_address("address", l.address.as_ref())?;
    let ip: IpAddr = host
        .parse()
        .or_else(|_| bad("address", format!("{host:?} is not an IP")))?;
    for (i, f) in l.listener_filters.iter().enumerate() {
        if !KNOWN_LISTENER_FILTERS.contains(&f.name.as_str()) {
            return bad(
                format!("listener_filters[{i}]"),
                format!("listener filter {} is not supported", f.name),
            );
        }
    }
    let filter_chains = l
        .filter_chains
        .iter()
        .enumerate()
        .map(|(i, c)| filter_chain(c).map_err(|e| within(&format!("filter_chains[{i}]"), e)))
        .collect::<FResult<Vec<_>>>()?;
    let default_chain = l
        .default_filter_chain
        .as_ref()
        .map(|c| filter_chain(c).map_err(|e| within("default_filter_chain", e)))
        .transpose()?;
    Ok(Listener {
        name: l.name.clone(),
        address: SocketAddr::new(ip, port),
        bind_to_port: l.bind_to_port.as_ref().is_none_or(|b| b.value),
        use_original_dst: l.use_original_dst.as_ref().is_some_and(|b| b.value),
        original_dst_filter: l
            .listener_filters
            .iter()
            .any(|f| f.name == "envoy.filters.listener.original_dst"),
        transparent: l.transparent.as_ref().is_some_and(|b| b.value),
        filter_chains,
        default_chain,
    })
}

fn filter_chain(c: &lv3::FilterChain) -> FResult<FilterChain> {
    let tls = c
        .transport_socket
        .as_ref()
        .map(|t| downstream_tls(t).map_err(|e| within("transport_socket", e)))
        .transpose()?
        .flatten();
    let matcher = match &c.filter_chain_match {
        None => ChainMatch::default(),
        Some(m) => chain_match(m).map_err(|e| within("filter_chain_match", e))?,
    };
    // Network RBAC filters (AuthorizationPolicy on TCP), then one terminal filter.
    let Some((last, before)) = c.filters.split_last() else {
        return bad("filters", "a filter chain without filters is not supported");
    };
    let mut rbac = Vec::with_capacity(before.len());
    for (i, f) in before.iter().enumerate() {
        let field = format!("filters[{i}]");
        if f.name != NETWORK_RBAC_FILTER {
            return bad(
                format!("{field}.name"),
                format!(
                    "network filter {} before the terminal one; only {NETWORK_RBAC_FILTER} is supported there",
                    f.name
                ),
            );
        }
        let Some(lv3::filter::ConfigType::TypedConfig(any)) = &f.config_type else {
            return bad(format!("{field}.typed_config"), "missing");
        };
        let r: nrbacv3::Rbac = unpack(&format!("{field}.typed_config"), any)?;
        let r = crate::rbac::NetworkRbac::try_from(&r)
            .or_else(|e| bad(format!("{field}.typed_config.{}", e.field), e.reason))?;
        rbac.push(Arc::new(r));
    }
    let filter =
        network_filter(last).map_err(|e| within(&format!("filters[{}]", before.len()), e))?;
    Ok(FilterChain {
        name: c.name.clone(),
        matcher,
        network_rbac: rbac.into(),
        filter,
        tls,
    })
}

fn chain_match(m: &lv3::FilterChainMatch) -> FResult<ChainMatch> {
    if !m.source_prefix_ranges.is_empty() || !m.source_ports.is_empty() {
        return bad("source_prefix_ranges", "source matching is not supported");
    }
    if !m.direct_source_prefix_ranges.is_empty() {
        return bad(
            "direct_source_prefix_ranges",
            "source matching is not supported",
        );
    }
    let mut prefix_ranges = Vec::new();
    for (i, r) in m.prefix_ranges.iter().enumerate() {
        let ip: IpAddr = r.address_prefix.parse().or_else(|_| {
            bad(
                format!("prefix_ranges[{i}]"),
                format!("{:?} is not an IP", r.address_prefix),
            )
        })?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = r.prefix_len.as_ref().map_or(max, |l| l.value);
        let len = u8::try_from(len.min(max)).unwrap_or(0);
        prefix_ranges.push((ip, len));
    }
    Ok(ChainMatch {
        destination_port: m
            .destination_port
            .as_ref()
            .map(|p| u16::try_from(p.value).or_else(|_| bad("destination_port", "out of range")))
            .transpose()?,
        prefix_ranges,
        server_names: m.server_names.clone(),
        transport_protocol: Some(m.transport_protocol.clone()).filter(|t| !t.is_empty()),
        application_protocols: m.application_protocols.clone(),
    })
}

fn network_filter(f: &lv3::Filter) -> FResult<NetworkFilter> {
    let Some(lv3::filter::ConfigType::TypedConfig(any)) = &f.config_type else {
        return bad(
            "typed_config",
            format!("filter {} has no typed_config", f.name),
        );
    };
    match f.name.as_str() {
        HCM_NAME => {
            let h: hcm::HttpConnectionManager = unpack("typed_config", any)?;
            http_connection_manager(&h).map_err(|e| within("typed_config", e))
        }
        TCP_PROXY_NAME => {
            let t: tcpv3::TcpProxy = unpack("typed_config", any)?;
            tcp_proxy(&t).map_err(|e| within("typed_config", e))
        }
        other => bad("name", format!("network filter {other} is not supported")),
    }
}

fn http_connection_manager(h: &hcm::HttpConnectionManager) -> FResult<NetworkFilter> {
    use hcm::http_connection_manager::RouteSpecifier;
    let mut http_filters = Vec::with_capacity(h.http_filters.len());
    for (i, f) in h.http_filters.iter().enumerate() {
        let field = format!("http_filters[{i}]");
        if f.is_optional || f.disabled {
            return bad(field, "optional / disabled HTTP filters are not supported");
        }
        let filter = match f.name.as_str() {
            FAULT_FILTER => HttpFilter::Fault,
            CORS_FILTER => HttpFilter::Cors,
            ROUTER_FILTER => HttpFilter::Router,
            RBAC_FILTER => {
                let Some(hcm::http_filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                    return bad(format!("{field}.typed_config"), "missing");
                };
                let r: hrbacv3::Rbac = unpack(&format!("{field}.typed_config"), any)?;
                let r = crate::rbac::HttpRbac::try_from((&r, h.stat_prefix.as_str()))
                    .or_else(|e| bad(format!("{field}.typed_config.{}", e.field), e.reason))?;
                HttpFilter::Rbac(Arc::new(r))
            }
            crate::jwt::JWT_AUTHN => {
                use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3 as jwtv3;
                let Some(hcm::http_filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                    return bad(format!("{field}.typed_config"), "missing");
                };
                let j: jwtv3::JwtAuthentication = unpack(&format!("{field}.typed_config"), any)?;
                let j = crate::jwt::JwtAuthn::try_from(&j)
                    .or_else(|e| bad(format!("{field}.typed_config.{}", e.field), e.reason))?;
                HttpFilter::JwtAuthn(Arc::new(j))
            }
            other => return bad(field, format!("HTTP filter {other} is not supported")),
        };
        let last = matches!(filter, HttpFilter::Router);
        http_filters.push(filter);
        // Envoy never runs a filter after the terminal router.
        if last {
            if i + 1 != h.http_filters.len() {
                return bad(field, "the router must be the last HTTP filter");
            }
            break;
        }
    }
    if !matches!(http_filters.last(), Some(HttpFilter::Router)) {
        return bad("http_filters", "no envoy.filters.http.router");
    }
    let routes = match &h.route_specifier {
        Some(RouteSpecifier::Rds(r)) => RouteSource::Rds(r.route_config_name.clone()),
        Some(RouteSpecifier::RouteConfig(rc)) => RouteSource::Inline(Arc::new(
            route_config(rc).map_err(|e| within("route_config", e))?,
        )),
        _ => return bad("route_specifier", "only rds and route_config are supported"),
    };
    Ok(NetworkFilter::Http(HttpConnectionManager {
        stat_prefix: h.stat_prefix.clone(),
        routes,
        http_filters: http_filters.into(),
        use_remote_address: h.use_remote_address.as_ref().is_some_and(|b| b.value),
        xff_num_trusted_hops: h.xff_num_trusted_hops,
        xfcc: xfcc(h)?,
        access_log: access_logs(&h.access_log)?.into(),
        upgrades: hcm_upgrades(&h.upgrade_configs)?.into(),
        header_case: header_key_format(h.http_protocol_options.as_ref())
            .map_err(|e| within("http_protocol_options", e))?,
    }))
}

/// The stateful header formatter Istio configures (`preserveHttp1HeaderCase`).
const PRESERVE_CASE_CONFIG: &str =
    "type.googleapis.com/envoy.extensions.http.header_formatters.preserve_case.v3.PreserveCaseFormatterConfig";

/// `Http1ProtocolOptions.header_key_format` (of an HCM or a cluster) -> [`HeaderCase`].
/// Envoy picks a stateful formatter by its `typed_config` type; the name is free (Istio
/// sends `preserve_case`). Only the preserve-case formatter with its defaults is supported.
fn header_key_format(o: Option<&core::Http1ProtocolOptions>) -> FResult<HeaderCase> {
    use core::http1_protocol_options::header_key_format::HeaderFormat;
    use envoy_types::pb::envoy::extensions::http::header_formatters::preserve_case::v3 as pcv3;
    let Some(f) = o
        .and_then(|o| o.header_key_format.as_ref())
        .and_then(|k| k.header_format.as_ref())
    else {
        return Ok(HeaderCase::Lower);
    };
    let field = "header_key_format.stateful_formatter";
    match f {
        HeaderFormat::ProperCaseWords(_) => Ok(HeaderCase::ProperCase),
        HeaderFormat::StatefulFormatter(ext) => {
            let Some(any) = ext.typed_config.as_ref() else {
                return bad(
                    field,
                    format!("formatter {:?} has no typed_config", ext.name),
                );
            };
            if any.type_url != PRESERVE_CASE_CONFIG {
                return bad(
                    field,
                    format!(
                        "formatter {:?} of type {} is not supported (only {PRESERVE_CASE_CONFIG})",
                        ext.name, any.type_url
                    ),
                );
            }
            let c = pcv3::PreserveCaseFormatterConfig::decode(any.value.as_slice())
                .or_else(|e| bad(field, format!("cannot decode: {e}")))?;
            if c.forward_reason_phrase {
                return bad(
                    format!("{field}.typed_config.forward_reason_phrase"),
                    "not supported (the standard reason phrase is sent)",
                );
            }
            if c.formatter_type_on_envoy_headers != 0 {
                return bad(
                    format!("{field}.typed_config.formatter_type_on_envoy_headers"),
                    "only DEFAULT (lowercase) is supported",
                );
            }
            Ok(HeaderCase::Preserve)
        }
    }
}

/// The HCM's `upgrade_configs`; a custom filter chain for an upgrade is not supported.
fn hcm_upgrades(
    u: &[hcm::http_connection_manager::UpgradeConfig],
) -> FResult<Vec<crate::config::UpgradeConfig>> {
    u.iter()
        .enumerate()
        .map(|(i, c)| {
            if !c.filters.is_empty() {
                return bad(
                    format!("upgrade_configs[{i}].filters"),
                    "upgrade-specific filter chains are not supported",
                );
            }
            Ok(crate::config::UpgradeConfig {
                kind: c.upgrade_type.to_ascii_lowercase(),
                enabled: c.enabled.as_ref().is_none_or(|b| b.value),
            })
        })
        .collect()
}

/// `envoy.access_loggers.file` (text format) and `envoy.access_loggers.stdout`; filters and
/// JSON formats are not supported.
fn access_logs(
    logs: &[envoy_types::pb::envoy::config::accesslog::v3::AccessLog],
) -> FResult<Vec<crate::access_log::AccessLog>> {
    use crate::access_log::{AccessLog, Format};
    use envoy_types::pb::envoy::config::accesslog::v3::access_log::ConfigType;
    use envoy_types::pb::envoy::extensions::access_loggers::file::v3::{
        file_access_log::AccessLogFormat, FileAccessLog,
    };
    use envoy_types::pb::envoy::extensions::access_loggers::stream::v3::StdoutAccessLog;
    let mut out = Vec::new();
    for (i, l) in logs.iter().enumerate() {
        let field = format!("access_log[{i}]");
        if l.filter.is_some() {
            return bad(
                format!("{field}.filter"),
                "access log filters are not supported",
            );
        }
        let Some(ConfigType::TypedConfig(any)) = &l.config_type else {
            return bad(format!("{field}.typed_config"), "missing");
        };
        let text = |f: &Option<core::SubstitutionFormatString>| -> FResult<Format> {
            use core::substitution_format_string::Format as F;
            let Some(f) = f else {
                return Ok(Format::envoy_default());
            };
            let src = match &f.format {
                Some(F::TextFormatSource(d)) => match &d.specifier {
                    Some(core::data_source::Specifier::InlineString(s)) => s.clone(),
                    _ => {
                        return bad(
                            format!("{field}.log_format"),
                            "only an inline text format is supported",
                        )
                    }
                },
                #[allow(deprecated)]
                Some(F::TextFormat(s)) => s.clone(),
                None => return Ok(Format::envoy_default()),
                Some(_) => {
                    return bad(
                        format!("{field}.log_format"),
                        "only text formats are supported (not JSON)",
                    )
                }
            };
            Format::parse(&src).or_else(|e| bad(format!("{field}.log_format"), e.to_string()))
        };
        use prost::Name;
        let (path, format) = if any.type_url == FileAccessLog::type_url() {
            let f: FileAccessLog = unpack(&field, any)?;
            let format = match &f.access_log_format {
                None => Format::envoy_default(),
                Some(AccessLogFormat::LogFormat(lf)) => text(&Some(lf.clone()))?,
                #[allow(deprecated)]
                Some(AccessLogFormat::Format(s)) => {
                    Format::parse(s).or_else(|e| bad(format!("{field}.format"), e.to_string()))?
                }
                Some(_) => {
                    return bad(
                        format!("{field}.access_log_format"),
                        "only text formats are supported (not JSON)",
                    )
                }
            };
            (f.path, format)
        } else if any.type_url == StdoutAccessLog::type_url() {
            let f: StdoutAccessLog = unpack(&field, any)?;
            let format = match &f.access_log_format {
                None => Format::envoy_default(),
                Some(envoy_types::pb::envoy::extensions::access_loggers::stream::v3::stdout_access_log::AccessLogFormat::LogFormat(lf)) => text(&Some(lf.clone()))?,
            };
            ("/dev/stdout".to_string(), format)
        } else {
            return bad(
                format!("{field}.typed_config"),
                format!("access logger {} is not supported", any.type_url),
            );
        };
        out.push(
            AccessLog::new(&path, format)
                .or_else(|e| bad(format!("{field}.path"), e.to_string()))?,
        );
    }
    Ok(out)
}

fn xfcc(h: &hcm::HttpConnectionManager) -> FResult<Xfcc> {
    use hcm::http_connection_manager::ForwardClientCertDetails as F;
    let mode = match F::try_from(h.forward_client_cert_details) {
        Ok(F::Sanitize) => XfccMode::Sanitize,
        Ok(F::ForwardOnly) => XfccMode::ForwardOnly,
        Ok(F::AppendForward) => XfccMode::AppendForward,
        Ok(F::SanitizeSet) => XfccMode::SanitizeSet,
        Ok(F::AlwaysForwardOnly) => XfccMode::AlwaysForwardOnly,
        Err(_) => return bad("forward_client_cert_details", "unknown value"),
    };
    let d = h.set_current_client_cert_details.unwrap_or_default();
    if d.cert || d.chain {
        return bad(
            "set_current_client_cert_details",
            "Cert and Chain in x-forwarded-client-cert are not supported (Subject, URI, DNS are)",
        );
    }
    Ok(Xfcc {
        mode,
        subject: d.subject.as_ref().is_some_and(|b| b.value),
        uri: d.uri,
        dns: d.dns,
    })
}

fn tcp_proxy(t: &tcpv3::TcpProxy) -> FResult<NetworkFilter> {
    use tcpv3::tcp_proxy::ClusterSpecifier;
    let target = match &t.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) => ClusterTarget::Single(c.clone()),
        Some(ClusterSpecifier::WeightedClusters(w)) => ClusterTarget::Weighted(
            w.clusters
                .iter()
                .map(|c| WeightedCluster {
                    name: c.name.clone(),
                    weight: c.weight,
                    headers: HeaderOps::default(),
                    host_rewrite: None,
                })
                .collect(),
        ),
        None => return bad("cluster_specifier", "missing"),
    };
    Ok(NetworkFilter::Tcp(TcpProxy {
        stat_prefix: t.stat_prefix.clone(),
        target,
        access_log: access_logs(&t.access_log)?.into(),
    }))
}

// ------------------------------------------------------------------ routes

impl TryFrom<&rv3::RouteConfiguration> for RouteConfig {
    type Error = ConvertError;
    fn try_from(rc: &rv3::RouteConfiguration) -> Result<Self, ConvertError> {
        route_config(rc).map_err(|e| named(&format!("route configuration {}", rc.name), e))
    }
}

fn route_config(rc: &rv3::RouteConfiguration) -> FResult<RouteConfig> {
    let virtual_hosts = rc
        .virtual_hosts
        .iter()
        .map(|vh| virtual_host(vh).map_err(|e| within(&format!("virtual_hosts[{}]", vh.name), e)))
        .collect::<FResult<Vec<_>>>()?;
    if rc.vhds.is_some() {
        return bad("vhds", "VHDS is not supported");
    }
    Ok(RouteConfig {
        name: rc.name.clone(),
        virtual_hosts,
        ignore_port_in_host_matching: rc.ignore_port_in_host_matching,
    })
}

fn virtual_host(vh: &rv3::VirtualHost) -> FResult<VirtualHost> {
    use rv3::virtual_host::TlsRequirementType;
    let require_tls = match TlsRequirementType::try_from(vh.require_tls) {
        Ok(TlsRequirementType::None) => false,
        Ok(TlsRequirementType::All) => true,
        // Envoy's EXTERNAL_ONLY trusts `x-envoy-internal`, which this proxy never sets; the
        // pilot emits ALL (httpsRedirect) only.
        Ok(TlsRequirementType::ExternalOnly) => {
            return bad("require_tls", "EXTERNAL_ONLY is not supported (only ALL)")
        }
        Err(_) => return bad("require_tls", format!("unknown value {}", vh.require_tls)),
    };
    if !vh.typed_per_filter_config.is_empty() {
        return bad(
            "typed_per_filter_config",
            "per-virtual-host filter config is not supported",
        );
    }
    let routes = vh
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let label = if r.name.is_empty() {
                format!("routes[{i}]")
            } else {
                format!("routes[{i}:{}]", r.name)
            };
            route(r).map_err(|e| within(&label, e))
        })
        .collect::<FResult<Vec<_>>>()?;
    Ok(VirtualHost {
        name: vh.name.clone(),
        domains: vh.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
        routes,
        require_tls,
    })
}

fn route(r: &rv3::Route) -> FResult<Route> {
    let matcher = route_match(r.r#match.as_ref()).map_err(|e| within("match", e))?;
    let mut fault = None;
    let mut cors = None;
    for (name, any) in &r.typed_per_filter_config {
        match name.as_str() {
            FAULT_FILTER => {
                let f: faultv3::HttpFault = unpack("typed_per_filter_config.fault", any)?;
                fault =
                    Some(http_fault(&f).map_err(|e| within("typed_per_filter_config.fault", e))?);
            }
            CORS_FILTER => {
                let c: corsv3::CorsPolicy = unpack("typed_per_filter_config.cors", any)?;
                cors =
                    Some(cors_policy(&c).map_err(|e| within("typed_per_filter_config.cors", e))?);
            }
            other => {
                return bad(
                    format!("typed_per_filter_config.{other}"),
                    "per-route config for this filter is not supported",
                )
            }
        }
    }
    let action = match &r.action {
        Some(rv3::route::Action::Route(a)) => {
            Action::Route(route_action(a).map_err(|e| within("route", e))?)
        }
        Some(rv3::route::Action::Redirect(rd)) => {
            Action::Redirect(redirect(rd).map_err(|e| within("redirect", e))?)
        }
        Some(rv3::route::Action::DirectResponse(d)) => {
            let status = u16::try_from(d.status)
                .ok()
                .filter(|s| (200..600).contains(s))
                .map_or_else(|| bad("direct_response.status", "out of range"), Ok)?;
            use core::data_source::Specifier;
            let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                None => bytes::Bytes::new(),
                Some(Specifier::InlineString(s)) => bytes::Bytes::from(s.clone()),
                Some(Specifier::InlineBytes(b)) => bytes::Bytes::from(b.clone()),
                Some(_) => return bad("direct_response.body", "only inline bodies are supported"),
            };
            Action::Direct { status, body }
        }
        _ => return bad("action", "unsupported route action"),
    };
    Ok(Route {
        name: r.name.clone(),
        matcher,
        action,
        fault,
        cors,
        headers: header_ops(
            &r.request_headers_to_add,
            &r.request_headers_to_remove,
            &r.response_headers_to_add,
            &r.response_headers_to_remove,
        )?,
    })
}

fn header_ops(
    req_add: &[core::HeaderValueOption],
    req_remove: &[String],
    resp_add: &[core::HeaderValueOption],
    resp_remove: &[String],
) -> FResult<HeaderOps> {
    fn adds(
        field: &str,
        v: &[core::HeaderValueOption],
    ) -> FResult<Vec<(http::HeaderName, http::HeaderValue, bool)>> {
        use core::header_value_option::HeaderAppendAction as A;
        v.iter()
            .map(|o| {
                let Some(h) = &o.header else {
                    return bad(field, "header value option without header");
                };
                let name = http::HeaderName::from_bytes(h.key.as_bytes())
                    .or_else(|_| bad(field, format!("bad header name {:?}", h.key)))?;
                let value = http::HeaderValue::from_str(&h.value)
                    .or_else(|_| bad(field, format!("bad value for header {}", h.key)))?;
                let append = match A::try_from(o.append_action) {
                    Ok(A::AppendIfExistsOrAdd) => true,
                    Ok(A::OverwriteIfExistsOrAdd) => false,
                    _ => return bad(field, "append_action not supported"),
                };
                Ok((name, value, append))
            })
            .collect()
    }
    fn removes(field: &str, v: &[String]) -> FResult<Vec<http::HeaderName>> {
        v.iter()
            .map(|k| {
                http::HeaderName::from_bytes(k.as_bytes())
                    .or_else(|_| bad(field, format!("bad header name {k:?}")))
            })
            .collect()
    }
    Ok(HeaderOps {
        request_add: adds("request_headers_to_add", req_add)?,
        request_remove: removes("request_headers_to_remove", req_remove)?,
        response_add: adds("response_headers_to_add", resp_add)?,
        response_remove: removes("response_headers_to_remove", resp_remove)?,
    })
}

/// Envoy's `StringMatcher`; shared by route matches and the RBAC filters.
pub(crate) fn string_match(field: &str, m: &matcher::StringMatcher) -> FResult<StringMatch> {
    use matcher::string_matcher::MatchPattern as P;
    let ic = m.ignore_case;
    Ok(match &m.match_pattern {
        Some(P::Exact(v)) => StringMatch::Exact {
            value: v.clone(),
            ignore_case: ic,
        },
        Some(P::Prefix(v)) => StringMatch::Prefix {
            value: v.clone(),
            ignore_case: ic,
        },
        Some(P::Suffix(v)) => StringMatch::Suffix {
            value: v.clone(),
            ignore_case: ic,
        },
        Some(P::Contains(v)) => StringMatch::Contains {
            value: v.clone(),
            ignore_case: ic,
        },
        Some(P::SafeRegex(r)) => StringMatch::Regex(regex(field, &r.regex)?),
        Some(P::Custom(_)) => return bad(field, "custom string matchers are not supported"),
        None => return bad(field, "missing match_pattern"),
    })
}

/// Envoy's `HeaderMatcher` (the deprecated direct forms included); shared by route matches
/// and the RBAC filters.
pub(crate) fn header_match(field: &str, h: &rv3::HeaderMatcher) -> FResult<HeaderMatch> {
    use rv3::header_matcher::HeaderMatchSpecifier as H;
    let plain = |v: &String, make: fn(String) -> StringMatch| ValueMatch::String(make(v.clone()));
    #[allow(deprecated)]
    let value = match &h.header_match_specifier {
        Some(H::PresentMatch(p)) => ValueMatch::Present(*p),
        Some(H::StringMatch(s)) => {
            ValueMatch::String(string_match(&format!("{field}.string_match"), s)?)
        }
        Some(H::ExactMatch(v)) => plain(v, |value| StringMatch::Exact {
            value,
            ignore_case: false,
        }),
        Some(H::PrefixMatch(v)) => plain(v, |value| StringMatch::Prefix {
            value,
            ignore_case: false,
        }),
        Some(H::SuffixMatch(v)) => plain(v, |value| StringMatch::Suffix {
            value,
            ignore_case: false,
        }),
        Some(H::ContainsMatch(v)) => plain(v, |value| StringMatch::Contains {
            value,
            ignore_case: false,
        }),
        Some(H::SafeRegexMatch(r)) => {
            ValueMatch::String(StringMatch::Regex(regex(field, &r.regex)?))
        }
        Some(H::RangeMatch(_)) => return bad(format!("{field}.range_match"), "not supported"),
        // Envoy: no specifier matches any request that has the header.
        None => ValueMatch::Present(true),
    };
    Ok(HeaderMatch {
        name: h.name.to_ascii_lowercase(),
        value,
        invert: h.invert_match,
        treat_missing_as_empty: h.treat_missing_header_as_empty,
    })
}

fn route_match(m: Option<&rv3::RouteMatch>) -> FResult<RouteMatch> {
    use rv3::route_match::PathSpecifier as P;
    let Some(m) = m else {
        return bad("match", "missing");
    };
    if !m.dynamic_metadata.is_empty() {
        return bad(
            "dynamic_metadata",
            "JWT claim matching (@request.auth.claims) is not supported yet",
        );
    }
    if m.grpc.is_some() || m.tls_context.is_some() || m.runtime_fraction.is_some() {
        return bad(
            "match",
            "grpc / tls_context / runtime_fraction matching is not supported",
        );
    }
    let path = match &m.path_specifier {
        Some(P::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(P::Path(p)) => PathMatch::Exact(p.clone()),
        Some(P::SafeRegex(r)) => PathMatch::Regex(regex("safe_regex", &r.regex)?),
        _ => {
            return bad(
                "path_specifier",
                "only prefix, path and safe_regex are supported",
            )
        }
    };
    let mut headers = Vec::new();
    for (i, h) in m.headers.iter().enumerate() {
        headers.push(header_match(&format!("headers[{i}]"), h)?);
    }
    let mut query = Vec::new();
    for (i, q) in m.query_parameters.iter().enumerate() {
        use rv3::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
        let field = format!("query_parameters[{i}]");
        let value = match &q.query_parameter_match_specifier {
            Some(Q::PresentMatch(p)) => ValueMatch::Present(*p),
            Some(Q::StringMatch(s)) => ValueMatch::String(string_match(&field, s)?),
            None => ValueMatch::Present(true),
        };
        query.push(QueryMatch {
            name: q.name.clone(),
            value,
        });
    }
    Ok(RouteMatch {
        path,
        case_sensitive: m.case_sensitive.as_ref().is_none_or(|b| b.value),
        headers,
        query,
    })
}

fn route_action(a: &rv3::RouteAction) -> FResult<RouteAction> {
    use rv3::route_action::{ClusterSpecifier, HostRewriteSpecifier};
    let mut mirrors = Vec::new();
    for (i, m) in a.request_mirror_policies.iter().enumerate() {
        let field = format!("request_mirror_policies[{i}]");
        if m.cluster.is_empty() {
            return bad(field, "only a named cluster can be mirrored to");
        }
        let frac = m
            .runtime_fraction
            .as_ref()
            .and_then(|f| f.default_value.as_ref());
        mirrors.push(Mirror {
            cluster: m.cluster.clone(),
            fraction: fraction(&field, frac)?,
        });
    }
    let hash_policy = a
        .hash_policy
        .iter()
        .enumerate()
        .map(|(i, h)| hash_policy(h).map_err(|e| within(&format!("hash_policy[{i}]"), e)))
        .collect::<FResult<Vec<_>>>()?;
    let target = match &a.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) => ClusterTarget::Single(c.clone()),
        Some(ClusterSpecifier::WeightedClusters(w)) => {
            let mut out = Vec::new();
            for (i, c) in w.clusters.iter().enumerate() {
                let field = format!("weighted_clusters.clusters[{i}]");
                let host_rewrite = c.host_rewrite_specifier.as_ref().map(|h| match h {
                    rv3::weighted_cluster::cluster_weight::HostRewriteSpecifier::HostRewriteLiteral(h) => h.clone(),
                });
                out.push(WeightedCluster {
                    name: c.name.clone(),
                    weight: c.weight.as_ref().map_or(0, |w| w.value),
                    headers: header_ops(
                        &c.request_headers_to_add,
                        &c.request_headers_to_remove,
                        &c.response_headers_to_add,
                        &c.response_headers_to_remove,
                    )
                    .map_err(|e| within(&field, e))?,
                    host_rewrite,
                });
            }
            if out.iter().all(|c| c.weight == 0) {
                return bad("weighted_clusters", "all weights are 0");
            }
            ClusterTarget::Weighted(out)
        }
        _ => {
            return bad(
                "cluster_specifier",
                "only cluster and weighted_clusters are supported",
            )
        }
    };
    let host_rewrite = match &a.host_rewrite_specifier {
        None => None,
        Some(HostRewriteSpecifier::HostRewriteLiteral(h)) => Some(h.clone()),
        Some(_) => {
            return bad(
                "host_rewrite_specifier",
                "only host_rewrite_literal is supported",
            )
        }
    };
    let regex_rewrite = match &a.regex_rewrite {
        None => None,
        Some(rr) => {
            let pattern = rr
                .pattern
                .as_ref()
                .map_or_else(|| bad("regex_rewrite.pattern", "missing"), Ok)?;
            // The rewrite replaces matches anywhere in the path, so it is not anchored.
            let re = regex::Regex::new(&pattern.regex)
                .or_else(|e| bad("regex_rewrite.pattern", format!("invalid regex: {e}")))?;
            Some((
                FullRegex(Arc::new(re)),
                envoy_substitution(&rr.substitution),
            ))
        }
    };
    let retry = a
        .retry_policy
        .as_ref()
        .map(|r| retry_policy(r).map_err(|e| within("retry_policy", e)))
        .transpose()?;
    let upgrades = a
        .upgrade_configs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if c.connect_config.is_some() {
                return bad(
                    format!("upgrade_configs[{i}].connect_config"),
                    "CONNECT termination is not supported",
                );
            }
            Ok(crate::config::UpgradeConfig {
                kind: c.upgrade_type.to_ascii_lowercase(),
                enabled: c.enabled.as_ref().is_none_or(|b| b.value),
            })
        })
        .collect::<FResult<Vec<_>>>()?;
    Ok(RouteAction {
        target,
        timeout: a.timeout.as_ref().map(duration).filter(|d| !d.is_zero()),
        prefix_rewrite: Some(a.prefix_rewrite.clone()).filter(|p| !p.is_empty()),
        regex_rewrite,
        host_rewrite,
        retry,
        mirrors,
        hash_policy,
        upgrades,
    })
}

fn cors_policy(c: &corsv3::CorsPolicy) -> FResult<Cors> {
    if c.shadow_enabled.is_some() || c.allow_private_network_access.is_some() {
        return bad(
            "shadow_enabled",
            "shadow CORS and private network access are not supported",
        );
    }
    if let Some(f) = c
        .filter_enabled
        .as_ref()
        .and_then(|f| f.default_value.as_ref())
    {
        let fr = fraction("filter_enabled", Some(f))?;
        if fr.numerator != fr.denominator {
            return bad("filter_enabled", "partially enabled CORS is not supported");
        }
    }
    let allow_origins = c
        .allow_origin_string_match
        .iter()
        .enumerate()
        .map(|(i, m)| string_match(&format!("allow_origin_string_match[{i}]"), m))
        .collect::<FResult<Vec<_>>>()?;
    Ok(Cors {
        allow_origins,
        allow_methods: c.allow_methods.clone(),
        allow_headers: c.allow_headers.clone(),
        expose_headers: c.expose_headers.clone(),
        max_age: c.max_age.clone(),
        allow_credentials: c.allow_credentials.as_ref().is_some_and(|b| b.value),
        forward_not_matching_preflights: c
            .forward_not_matching_preflights
            .as_ref()
            .is_none_or(|b| b.value),
    })
}

/// RE2's `\1` capture references -> the regex crate's `${1}`.
fn envoy_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(|d| d.is_ascii_digit()) => {
                out.push_str("${");
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    out.push(d);
                    chars.next();
                }
                out.push('}');
            }
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

fn retry_policy(r: &rv3::RetryPolicy) -> FResult<RetryPolicy> {
    let mut on = RetryOn::default();
    for part in r
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        match part {
            "5xx" => on.five_xx = true,
            "gateway-error" => on.gateway_error = true,
            "connect-failure" => on.connect_failure = true,
            "reset" => on.reset = true,
            "refused-stream" => on.refused_stream = true,
            "retriable-4xx" => on.retriable_4xx = true,
            "retriable-status-codes" => on.retriable_status_codes = true,
            "cancelled" => on.grpc_codes.push(1),
            "deadline-exceeded" => on.grpc_codes.push(4),
            "resource-exhausted" => on.grpc_codes.push(8),
            "internal" => on.grpc_codes.push(13),
            "unavailable" => on.grpc_codes.push(14),
            other => {
                return bad(
                    "retry_on",
                    format!("retry condition {other:?} is not supported"),
                )
            }
        }
    }
    if r.retry_priority.is_some() {
        return bad(
            "retry_priority",
            "locality-aware retries are not supported yet",
        );
    }
    for (i, p) in r.retry_host_predicate.iter().enumerate() {
        // Our balancers already move to another host on the next pick; previous_hosts adds
        // nothing we would do differently with a handful of endpoints.
        if p.name != "envoy.retry_host_predicates.previous_hosts" {
            return bad(
                format!("retry_host_predicate[{i}]"),
                format!("{} is not supported", p.name),
            );
        }
    }
    let status_codes = r
        .retriable_status_codes
        .iter()
        .map(|c| u16::try_from(*c).or_else(|_| bad("retriable_status_codes", "out of range")))
        .collect::<FResult<Vec<_>>>()?;
    Ok(RetryPolicy {
        on,
        num_retries: r.num_retries.as_ref().map_or(1, |n| n.value),
        per_try_timeout: r
            .per_try_timeout
            .as_ref()
            .map(duration)
            .filter(|d| !d.is_zero()),
        status_codes,
    })
}

fn redirect(r: &rv3::RedirectAction) -> FResult<Redirect> {
    use rv3::redirect_action::{
        PathRewriteSpecifier as P, RedirectResponseCode as C, SchemeRewriteSpecifier as S,
    };
    let status = match C::try_from(r.response_code) {
        Ok(C::MovedPermanently) => 301,
        Ok(C::Found) => 302,
        Ok(C::SeeOther) => 303,
        Ok(C::TemporaryRedirect) => 307,
        Ok(C::PermanentRedirect) => 308,
        Err(_) => return bad("response_code", "unknown"),
    };
    let scheme = match &r.scheme_rewrite_specifier {
        None => None,
        Some(S::HttpsRedirect(true)) => Some("https".to_string()),
        Some(S::HttpsRedirect(false)) => None,
        Some(S::SchemeRedirect(s)) => Some(s.clone()),
    };
    let (path, prefix_rewrite) = match &r.path_rewrite_specifier {
        None => (None, None),
        Some(P::PathRedirect(p)) => (Some(p.clone()), None),
        Some(P::PrefixRewrite(p)) => (None, Some(p.clone())),
        Some(_) => {
            return bad(
                "path_rewrite_specifier",
                "regex redirects are not supported",
            )
        }
    };
    Ok(Redirect {
        status,
        scheme,
        host: Some(r.host_redirect.clone()).filter(|h| !h.is_empty()),
        port: u16::try_from(r.port_redirect).ok().filter(|p| *p != 0),
        path,
        prefix_rewrite,
        strip_query: r.strip_query,
    })
}

fn fraction(field: &str, p: Option<&FractionalPercent>) -> FResult<Fraction> {
    use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType as D;
    // Envoy: a fault without percentage applies to every request.
    let Some(p) = p else {
        return Ok(Fraction {
            numerator: 100,
            denominator: 100,
        });
    };
    let denominator = match D::try_from(p.denominator) {
        Ok(D::Hundred) => 100,
        Ok(D::TenThousand) => 10_000,
        Ok(D::Million) => 1_000_000,
        Err(_) => return bad(field, "unknown denominator"),
    };
    Ok(Fraction {
        numerator: p.numerator.min(denominator),
        denominator,
    })
}

fn http_fault(f: &faultv3::HttpFault) -> FResult<Fault> {
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay::FaultDelaySecifier;
    use faultv3::fault_abort::ErrorType;
    if !f.headers.is_empty()
        || !f.downstream_nodes.is_empty()
        || f.max_active_faults.is_some()
        || f.response_rate_limit.is_some()
    {
        return bad(
            "fault",
            "header/node-scoped faults, max_active_faults and rate limits are not supported",
        );
    }
    let delay = match &f.delay {
        None => None,
        Some(d) => match &d.fault_delay_secifier {
            Some(FaultDelaySecifier::FixedDelay(fd)) => Some((
                duration(fd),
                fraction("delay.percentage", d.percentage.as_ref())?,
            )),
            _ => return bad("delay", "only fixed delays are supported"),
        },
    };
    let abort = match &f.abort {
        None => None,
        Some(a) => {
            let kind = match &a.error_type {
                Some(ErrorType::HttpStatus(s)) => AbortKind::Http(
                    u16::try_from(*s)
                        .ok()
                        .filter(|s| (200..600).contains(s))
                        .map_or_else(|| bad("abort.http_status", "out of range"), Ok)?,
                ),
                Some(ErrorType::GrpcStatus(s)) => AbortKind::Grpc(*s),
                _ => return bad("abort", "header-controlled aborts are not supported"),
            };
            Some((kind, fraction("abort.percentage", a.percentage.as_ref())?))
        }
    };
    Ok(Fault { delay, abort })
}

// ------------------------------------------------------------------ clusters

const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

impl TryFrom<&cv3::Cluster> for Cluster {
    type Error = ConvertError;
    fn try_from(c: &cv3::Cluster) -> Result<Self, ConvertError> {
        cluster(c).map_err(|e| named(&format!("cluster {}", c.name), e))
    }
}

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// Istio emits one policy per route (header, cookie, source IP or query parameter).
fn hash_policy(h: &rv3::route_action::HashPolicy) -> FResult<crate::hash::HashPolicy> {
    use crate::hash::HashPolicy as H;
    use rv3::route_action::hash_policy::PolicySpecifier as P;
    match &h.policy_specifier {
        Some(P::Header(x)) => {
            if x.regex_rewrite.is_some() {
                return bad("header.regex_rewrite", "not supported");
            }
            http::HeaderName::from_bytes(x.header_name.as_bytes())
                .map(H::Header)
                .or_else(|_| {
                    bad(
                        "header.header_name",
                        format!("{:?} is not a header name", x.header_name),
                    )
                })
        }
        Some(P::Cookie(c)) => {
            if c.name.is_empty() {
                return bad("cookie.name", "empty");
            }
            Ok(H::Cookie {
                name: c.name.clone(),
                path: (!c.path.is_empty()).then(|| c.path.clone()),
                ttl: c.ttl.as_ref().map(|d| {
                    Duration::from_secs(d.seconds.max(0) as u64)
                        + Duration::from_nanos(d.nanos.max(0) as u64)
                }),
            })
        }
        Some(P::ConnectionProperties(p)) if p.source_ip => Ok(H::SourceIp),
        Some(P::QueryParameter(q)) if !q.name.is_empty() => Ok(H::QueryParameter(q.name.clone())),
        Some(P::FilterState(_)) => bad("filter_state", "not supported"),
        _ => bad("policy_specifier", "empty or not supported"),
    }
}

fn cluster(c: &cv3::Cluster) -> FResult<Cluster> {
    use cv3::cluster::{ClusterDiscoveryType, DiscoveryType as D, LbPolicy as L};
    let kind = match &c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) => match D::try_from(*t) {
            Ok(D::Eds) => DiscoveryKind::Eds,
            Ok(D::Static) => DiscoveryKind::Static,
            // LOGICAL_DNS gets one address; resolving it per connection is what STRICT_DNS
            // with one endpoint does here too.
            Ok(D::StrictDns) | Ok(D::LogicalDns) => DiscoveryKind::StrictDns,
            Ok(D::OriginalDst) => DiscoveryKind::OriginalDst,
            Err(_) => return bad("type", format!("unknown discovery type {t}")),
        },
        _ => return bad("cluster_type", "custom cluster types are not supported"),
    };
    let lb = match L::try_from(c.lb_policy) {
        Ok(L::RoundRobin) => LbPolicy::RoundRobin,
        Ok(L::LeastRequest) => LbPolicy::LeastRequest,
        Ok(L::Random) => LbPolicy::Random,
        Ok(L::ClusterProvided) => LbPolicy::ClusterProvided,
        Ok(L::RingHash) => {
            let cfg = match &c.lb_config {
                Some(cv3::cluster::LbConfig::RingHashLbConfig(r)) => Some(r),
                _ => None,
            };
            let min_size = cfg
                .and_then(|r| r.minimum_ring_size.as_ref())
                .map_or(crate::hash::DEFAULT_MIN_RING, |v| v.value);
            let max_size = cfg
                .and_then(|r| r.maximum_ring_size.as_ref())
                .map_or(crate::hash::DEFAULT_MAX_RING, |v| v.value);
            // Envoy's own limits: a ring is at most 8M entries.
            if min_size > max_size || max_size > crate::hash::DEFAULT_MAX_RING {
                return bad(
                    "ring_hash_lb_config",
                    format!("ring size {min_size}..{max_size} must be ordered and at most 8388608"),
                );
            }
            LbPolicy::RingHash { min_size, max_size }
        }
        Ok(L::Maglev) => {
            let table_size = match &c.lb_config {
                Some(cv3::cluster::LbConfig::MaglevLbConfig(m)) => {
                    m.table_size.as_ref().map(|v| v.value)
                }
                _ => None,
            }
            .unwrap_or(crate::hash::DEFAULT_MAGLEV_TABLE);
            // Envoy requires a prime below 5000011.
            if table_size >= 5_000_011 || !is_prime(table_size) {
                return bad(
                    "maglev_lb_config.table_size",
                    format!("{table_size} is not a prime below 5000011"),
                );
            }
            LbPolicy::Maglev { table_size }
        }
        Ok(other) => {
            return bad(
                "lb_policy",
                format!("{} is not supported", other.as_str_name()),
            )
        }
        Err(_) => return bad("lb_policy", "unknown"),
    };
    let tls = c
        .transport_socket
        .as_ref()
        .map(|t| upstream_tls(t).map_err(|e| within("transport_socket", e)))
        .transpose()?
        .flatten();
    let transport_matches = c
        .transport_socket_matches
        .iter()
        .enumerate()
        .map(|(i, m)| {
            transport_socket_match(m)
                .map_err(|e| within(&format!("transport_socket_matches[{i}]"), e))
        })
        .collect::<FResult<Vec<_>>>()?;
    let outlier = c
        .outlier_detection
        .as_ref()
        .map(|o| outlier(o).map_err(|e| within("outlier_detection", e)))
        .transpose()?;
    let mut http2 = false;
    let mut header_case = HeaderCase::Lower;
    let mut pool = circuit_breakers(c.circuit_breakers.as_ref());
    for (k, any) in &c.typed_extension_protocol_options {
        if k != HTTP_PROTOCOL_OPTIONS {
            return bad(
                format!("typed_extension_protocol_options.{k}"),
                "not supported",
            );
        }
        let o: upv3::HttpProtocolOptions = unpack("typed_extension_protocol_options", any)?;
        if let Some(common) = &o.common_http_protocol_options {
            if let Some(m) = &common.max_requests_per_connection {
                pool.max_requests_per_connection = m.value;
            }
            pool.max_connection_duration = common
                .max_connection_duration
                .as_ref()
                .map(duration)
                .filter(|d| !d.is_zero());
            // Zero disables Envoy's idle timeout.
            match common.idle_timeout.as_ref().map(duration) {
                Some(d) if d.is_zero() => pool.idle_timeout = Duration::MAX,
                Some(d) => pool.idle_timeout = d,
                None => {}
            }
        }
        use upv3::http_protocol_options::explicit_http_config::ProtocolConfig;
        use upv3::http_protocol_options::UpstreamProtocolOptions;
        if let Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) = &o.upstream_protocol_options {
            http2 = matches!(
                e.protocol_config,
                Some(ProtocolConfig::Http2ProtocolOptions(_))
            );
            if let Some(ProtocolConfig::HttpProtocolOptions(h1)) = &e.protocol_config {
                header_case = header_key_format(Some(h1)).map_err(|e| {
                    within(
                        &format!("typed_extension_protocol_options.{HTTP_PROTOCOL_OPTIONS}.explicit_http_config.http_protocol_options"),
                        e,
                    )
                })?;
            }
        } else if o.upstream_protocol_options.is_some() {
            return bad(
                "typed_extension_protocol_options",
                "only explicit_http_config is supported",
            );
        }
    }
    let source_address = match c
        .upstream_bind_config
        .as_ref()
        .and_then(|b| b.source_address.as_ref())
    {
        None => None,
        Some(sa) => match sa.address.parse::<std::net::IpAddr>() {
            Ok(ip) if ip == crate::INBOUND_SOURCE => Some(ip),
            Ok(_) => {
                return bad(
                    "upstream_bind_config.source_address.address",
                    format!(
                        "only Istio's inbound source {} is supported, not {:?}",
                        crate::INBOUND_SOURCE,
                        sa.address
                    ),
                )
            }
            Err(_) => {
                return bad(
                    "upstream_bind_config.source_address.address",
                    format!("{:?} is not an IP address", sa.address),
                )
            }
        },
    };
    let inline_endpoints = match &c.load_assignment {
        Some(la) => endpoints(la)?.endpoints,
        None => Vec::new(),
    };
    Ok(Cluster {
        name: c.name.clone(),
        kind,
        lb,
        connect_timeout: c
            .connect_timeout
            .as_ref()
            .map(duration)
            .unwrap_or(Duration::from_secs(5)),
        http2,
        header_case,
        eds_name: c
            .eds_cluster_config
            .as_ref()
            .map(|e| e.service_name.clone())
            .filter(|s| !s.is_empty()),
        inline_endpoints,
        outlier,
        source_address,
        tls,
        transport_matches,
        pool,
        locality_weighted: matches!(
            c.common_lb_config
                .as_ref()
                .and_then(|l| l.locality_config_specifier.as_ref()),
            Some(
                cv3::cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(
                    _
                )
            )
        ),
    })
}

/// The default-priority thresholds (Istio emits no others; HIGH priority is not modelled,
/// every request here is default priority). A threshold left out keeps Envoy's default.
fn circuit_breakers(cb: Option<&cv3::CircuitBreakers>) -> PoolLimits {
    let mut pool = PoolLimits::default();
    let Some(t) = cb.and_then(|cb| {
        cb.thresholds
            .iter()
            .find(|t| t.priority == core::RoutingPriority::Default as i32)
    }) else {
        return pool;
    };
    let set = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>, d: &mut u32| {
        if let Some(v) = v {
            *d = v.value;
        }
    };
    set(&t.max_connections, &mut pool.max_connections);
    set(&t.max_pending_requests, &mut pool.max_pending_requests);
    set(&t.max_requests, &mut pool.max_requests);
    set(&t.max_retries, &mut pool.max_retries);
    pool
}

fn outlier(o: &cv3::OutlierDetection) -> FResult<OutlierDetection> {
    let enforced = |v: &Option<envoy_types::pb::google::protobuf::UInt32Value>| {
        v.as_ref().is_none_or(|e| e.value > 0)
    };
    // Envoy enables success-rate ejection unless told otherwise; Istio always turns it off.
    if enforced(&o.enforcing_success_rate) {
        return bad(
            "enforcing_success_rate",
            "success-rate ejection is not supported",
        );
    }
    if o.enforcing_failure_percentage
        .as_ref()
        .is_some_and(|e| e.value > 0)
        || o.enforcing_failure_percentage_local_origin
            .as_ref()
            .is_some_and(|e| e.value > 0)
    {
        return bad(
            "enforcing_failure_percentage",
            "failure-percentage ejection is not supported",
        );
    }
    if o.split_external_local_origin_errors {
        return bad(
            "split_external_local_origin_errors",
            "local-origin error tracking is not supported",
        );
    }
    // Envoy's defaults: 5 consecutive 5xx enforced at 100%, gateway failures not enforced.
    let consecutive_5xx = if enforced(&o.enforcing_consecutive_5xx) {
        Some(o.consecutive_5xx.as_ref().map_or(5, |v| v.value))
    } else {
        None
    };
    let consecutive_gateway = if o
        .enforcing_consecutive_gateway_failure
        .as_ref()
        .is_some_and(|e| e.value > 0)
    {
        Some(
            o.consecutive_gateway_failure
                .as_ref()
                .map_or(5, |v| v.value),
        )
    } else {
        None
    };
    Ok(OutlierDetection {
        consecutive_5xx,
        consecutive_gateway,
        base_ejection_time: o
            .base_ejection_time
            .as_ref()
            .map_or(Duration::from_secs(30), duration),
        max_ejection_percent: o
            .max_ejection_percent
            .as_ref()
            .map_or(10, |v| v.value.min(100)),
    })
}

impl TryFrom<&ev3::ClusterLoadAssignment> for Endpoints {
    type Error = ConvertError;
    fn try_from(la: &ev3::ClusterLoadAssignment) -> Result<Self, ConvertError> {
        endpoints(la).map_err(|e| named(&format!("endpoints {}", la.cluster_name), e))
    }
}

fn endpoints(la: &ev3::ClusterLoadAssignment) -> FResult<Endpoints> {
    // The native proxy balances priorities with Envoy's default overprovisioning factor
    // (1.4); any other would silently change where traffic spills.
    if let Some(f) = la
        .policy
        .as_ref()
        .and_then(|p| p.overprovisioning_factor.as_ref())
        .filter(|f| f.value != crate::cluster::OVERPROVISIONING)
    {
        return bad(
            "policy.overprovisioning_factor",
            format!(
                "{} is not supported (only Envoy's default {})",
                f.value,
                crate::cluster::OVERPROVISIONING
            ),
        );
    }
    let mut out = Vec::new();
    for (i, loc) in la.endpoints.iter().enumerate() {
        let locality = u32::try_from(i).unwrap_or(u32::MAX);
        for (j, e) in loc.lb_endpoints.iter().enumerate() {
            let field = format!("endpoints[{i}].lb_endpoints[{j}]");
            use ev3::lb_endpoint::HostIdentifier;
            let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                return bad(field, "named endpoints are not supported");
            };
            let (host, port) = socket_address(&field, ep.address.as_ref())?;
            let status = core::HealthStatus::try_from(e.health_status)
                .unwrap_or(core::HealthStatus::Unknown);
            out.push(Endpoint {
                host,
                port,
                weight: e
                    .load_balancing_weight
                    .as_ref()
                    .map_or(1, |w| w.value.max(1)),
                healthy: matches!(
                    status,
                    core::HealthStatus::Unknown
                        | core::HealthStatus::Healthy
                        | core::HealthStatus::Degraded
                ),
                transport_metadata: transport_metadata(e.metadata.as_ref()),
                workload: workload_metadata(e.metadata.as_ref()),
                priority: loc.priority,
                locality,
                locality_weight: loc.load_balancing_weight.as_ref().map_or(0, |w| w.value),
            });
        }
    }
    Ok(Endpoints {
        cluster: la.cluster_name.clone(),
        endpoints: out,
    })
}

// ------------------------------------------------------------------ TLS

const TLS_SOCKET: &str = "envoy.transport_sockets.tls";
const RAW_BUFFER: &str = "envoy.transport_sockets.raw_buffer";
/// Endpoint metadata namespace that transport_socket_matches match against.
const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";

/// The TLS context inside a transport socket; `None` for plaintext (`raw_buffer`).
fn tls_any(ts: &core::TransportSocket) -> FResult<Option<&Any>> {
    let any = match &ts.config_type {
        Some(core::transport_socket::ConfigType::TypedConfig(any)) => any,
        None if ts.name == RAW_BUFFER || ts.name == "raw_buffer" => return Ok(None),
        None => {
            return bad(
                "typed_config",
                format!("transport socket {} has no config", ts.name),
            )
        }
    };
    if any.type_url.ends_with(".RawBuffer") {
        return Ok(None);
    }
    if ts.name != TLS_SOCKET && ts.name != "tls" {
        return bad(
            "name",
            format!(
                "transport socket {} is not supported (only TLS and raw_buffer)",
                ts.name
            ),
        );
    }
    Ok(Some(any))
}

fn downstream_tls(ts: &core::TransportSocket) -> FResult<Option<Arc<DownstreamTls>>> {
    let Some(any) = tls_any(ts)? else {
        return Ok(None);
    };
    let d: tlsv3::DownstreamTlsContext = unpack("typed_config", any)?;
    let field = "typed_config";
    if d.require_sni.as_ref().is_some_and(|b| b.value) {
        return bad(format!("{field}.require_sni"), "not supported");
    }
    if d.session_ticket_keys_type.is_some() {
        return bad(format!("{field}.session_ticket_keys"), "not supported");
    }
    let mut hasher = std::hash::DefaultHasher::new();
    let common = common_tls(d.common_tls_context.as_ref(), &mut hasher)
        .map_err(|e| within(&format!("{field}.common_tls_context"), e))?;
    let Some(cert) = common.cert else {
        return bad(
            format!("{field}.common_tls_context"),
            "a server context needs tls_certificates or the SDS secret default",
        );
    };
    let spec = crate::tls::ServerSpec {
        cert,
        validation: common.validation,
        require_client_certificate: d
            .require_client_certificate
            .as_ref()
            .is_some_and(|b| b.value),
        alpn: common.alpn,
        versions: common.versions,
    };
    crate::tls::server_context(&spec)
        .map(|t| Some(Arc::new(t)))
        .or_else(|e| bad(field, e.to_string()))
}

fn upstream_tls(ts: &core::TransportSocket) -> FResult<Option<Arc<UpstreamTls>>> {
    use std::hash::{Hash, Hasher};
    let Some(any) = tls_any(ts)? else {
        return Ok(None);
    };
    let u: tlsv3::UpstreamTlsContext = unpack("typed_config", any)?;
    let field = "typed_config";
    if u.auto_host_sni || u.auto_sni_san_validation {
        return bad(
            format!("{field}.auto_host_sni"),
            "SNI / SAN validation from the Host header is not supported",
        );
    }
    if u.allow_renegotiation {
        return bad(
            format!("{field}.allow_renegotiation"),
            "TLS renegotiation is not supported",
        );
    }
    let mut hasher = std::hash::DefaultHasher::new();
    any.value.hash(&mut hasher);
    let common = common_tls(u.common_tls_context.as_ref(), &mut hasher)
        .map_err(|e| within(&format!("{field}.common_tls_context"), e))?;
    let spec = crate::tls::ClientSpec {
        cert: common.cert,
        validation: common.validation,
        alpn: common.alpn,
        sni: Some(u.sni.clone()).filter(|s| !s.is_empty()),
        versions: common.versions,
    };
    crate::tls::client_context(&spec, hasher.finish())
        .map(|t| Some(Arc::new(t)))
        .or_else(|e| bad(field, e.to_string()))
}

struct CommonTls {
    cert: Option<crate::tls::CertSource>,
    validation: Option<crate::tls::Validation>,
    alpn: Vec<String>,
    versions: crate::tls::Versions,
}

/// Bytes of a DataSource (file, inline, environment variable); file names go into the
/// error so the operator knows which one is missing.
fn data_source(
    field: &str,
    d: Option<&core::DataSource>,
    hasher: &mut std::hash::DefaultHasher,
) -> FResult<Vec<u8>> {
    use core::data_source::Specifier;
    use std::hash::Hash;
    let bytes = match d.and_then(|d| d.specifier.as_ref()) {
        None => return bad(field, "missing"),
        Some(Specifier::Filename(f)) => crate::secrets::read_file(std::path::Path::new(f))
            .or_else(|e| bad(field, e.to_string()))?,
        Some(Specifier::InlineBytes(b)) => b.clone(),
        Some(Specifier::InlineString(s)) => s.as_bytes().to_vec(),
        Some(Specifier::EnvironmentVariable(v)) => std::env::var(v)
            .map(String::into_bytes)
            .or_else(|_| bad(field, format!("environment variable {v} is not set")))?,
    };
    bytes.hash(hasher);
    Ok(bytes)
}

fn sds_name(field: &str, s: &tlsv3::SdsSecretConfig, want: &str) -> FResult<()> {
    if s.name == want {
        return Ok(());
    }
    bad(
        field,
        format!(
            "SDS secret {:?} is not served in-process (only Istio's {} and {})",
            s.name,
            crate::secrets::SDS_DEFAULT,
            crate::secrets::SDS_ROOTCA
        ),
    )
}

fn common_tls(
    c: Option<&tlsv3::CommonTlsContext>,
    hasher: &mut std::hash::DefaultHasher,
) -> FResult<CommonTls> {
    use crate::tls::{CertSource, TrustSource, Validation, Versions};
    use tlsv3::common_tls_context::ValidationContextType as V;
    use tlsv3::tls_parameters::TlsProtocol as P;
    let default = tlsv3::CommonTlsContext::default();
    let c = c.unwrap_or(&default);
    if c.tls_certificate_provider_instance.is_some()
        || c.custom_tls_certificate_selector.is_some()
        || c.custom_handshaker.is_some()
        || c.key_log.is_some()
    {
        return bad(
            "tls_certificate_provider_instance",
            "certificate providers, custom handshakers and key logs are not supported",
        );
    }
    // rustls offers TLS 1.2 and 1.3 with modern suites only; cipher and curve lists can
    // only narrow that further, so they are accepted as they are.
    let versions = match c.tls_params.as_ref() {
        None => Versions::Tls12And13,
        Some(p) => {
            let min = P::try_from(p.tls_minimum_protocol_version).unwrap_or(P::TlsAuto);
            let max = P::try_from(p.tls_maximum_protocol_version).unwrap_or(P::TlsAuto);
            match (min, max) {
                (P::TlSv13, P::TlSv12 | P::TlSv11 | P::TlSv10) => {
                    return bad("tls_params", "minimum version above maximum")
                }
                (P::TlSv13, _) => Versions::Tls13Only,
                (_, P::TlSv12) => Versions::Tls12Only,
                (_, P::TlSv11 | P::TlSv10) => {
                    return bad(
                        "tls_params.tls_maximum_protocol_version",
                        "TLS below 1.2 is not supported",
                    )
                }
                _ => Versions::Tls12And13,
            }
        }
    };
    let cert = match (
        c.tls_certificates.as_slice(),
        c.tls_certificate_sds_secret_configs.as_slice(),
    ) {
        ([], []) => None,
        ([t], []) => {
            if t.private_key_provider.is_some() || t.password.is_some() {
                return bad(
                    "tls_certificates[0]",
                    "private key providers and passwords are not supported",
                );
            }
            let chain = data_source(
                "tls_certificates[0].certificate_chain",
                t.certificate_chain.as_ref(),
                hasher,
            )?;
            let key = data_source(
                "tls_certificates[0].private_key",
                t.private_key.as_ref(),
                hasher,
            )?;
            let ck = crate::secrets::certified_key(&chain, &key, "tls_certificates[0]")
                .or_else(|e| bad("tls_certificates[0]", e.to_string()))?;
            Some(CertSource::Static(Arc::new(ck)))
        }
        ([], [s]) => {
            sds_name(
                "tls_certificate_sds_secret_configs[0]",
                s,
                crate::secrets::SDS_DEFAULT,
            )?;
            Some(CertSource::Workload)
        }
        _ => {
            return bad(
                "tls_certificates",
                "exactly one certificate (file, inline or the SDS secret default) is supported",
            )
        }
    };
    let validation = match &c.validation_context_type {
        None => None,
        Some(V::ValidationContext(v)) => {
            validation_context(v, None, hasher).map_err(|e| within("validation_context", e))?
        }
        Some(V::ValidationContextSdsSecretConfig(s)) => {
            sds_name(
                "validation_context_sds_secret_config",
                s,
                crate::secrets::SDS_ROOTCA,
            )?;
            Some(Validation {
                trust: TrustSource::MeshRoot,
                sans: Vec::new(),
            })
        }
        Some(V::CombinedValidationContext(cv)) => {
            let trust = match &cv.validation_context_sds_secret_config {
                Some(s) => {
                    sds_name(
                        "combined_validation_context.validation_context_sds_secret_config",
                        s,
                        crate::secrets::SDS_ROOTCA,
                    )?;
                    Some(TrustSource::MeshRoot)
                }
                None => None,
            };
            let default = tlsv3::CertificateValidationContext::default();
            validation_context(
                cv.default_validation_context.as_ref().unwrap_or(&default),
                trust,
                hasher,
            )
            .map_err(|e| within("combined_validation_context.default_validation_context", e))?
        }
        Some(_) => {
            return bad(
                "validation_context_type",
                "certificate-provider validation contexts are not supported",
            )
        }
    };
    Ok(CommonTls {
        cert,
        validation,
        alpn: c.alpn_protocols.clone(),
        versions,
    })
}

fn validation_context(
    v: &tlsv3::CertificateValidationContext,
    sds_trust: Option<crate::tls::TrustSource>,
    hasher: &mut std::hash::DefaultHasher,
) -> FResult<Option<crate::tls::Validation>> {
    use crate::tls::{SanKind, SanMatch, TrustSource, Validation};
    use tlsv3::subject_alt_name_matcher::SanType;
    if !v.verify_certificate_spki.is_empty() || !v.verify_certificate_hash.is_empty() {
        return bad(
            "verify_certificate_hash",
            "certificate pinning is not supported",
        );
    }
    if v.crl.is_some() {
        return bad("crl", "CRLs are not supported");
    }
    if v.allow_expired_certificate {
        return bad("allow_expired_certificate", "not supported");
    }
    if v.trust_chain_verification != 0 {
        return bad(
            "trust_chain_verification",
            "only VERIFY_TRUST_CHAIN is supported",
        );
    }
    if v.custom_validator_config.is_some()
        || v.ca_certificate_provider_instance.is_some()
        || v.system_root_certs.is_some()
    {
        return bad(
            "custom_validator_config",
            "custom validators, certificate providers and system roots are not supported",
        );
    }
    let mut sans = Vec::new();
    for (i, m) in v.match_typed_subject_alt_names.iter().enumerate() {
        let f = format!("match_typed_subject_alt_names[{i}]");
        let kind = match SanType::try_from(m.san_type) {
            Ok(SanType::Dns) => SanKind::Dns,
            Ok(SanType::Uri) => SanKind::Uri,
            _ => return bad(f, "only DNS and URI SANs are supported"),
        };
        let Some(sm) = m.matcher.as_ref() else {
            return bad(f, "no matcher");
        };
        sans.push(SanMatch {
            kind,
            matcher: string_match(&f, sm)?,
        });
    }
    // Deprecated in Envoy but still what older control planes (and Istio for gateways) send.
    #[allow(deprecated)]
    let untyped = &v.match_subject_alt_names;
    for (i, sm) in untyped.iter().enumerate() {
        sans.push(SanMatch {
            kind: SanKind::Any,
            matcher: string_match(&format!("match_subject_alt_names[{i}]"), sm)?,
        });
    }
    let trust = match (&v.trusted_ca, sds_trust) {
        (Some(_), Some(_)) => {
            return bad(
                "trusted_ca",
                "both a trusted_ca and the SDS secret ROOTCA are set",
            )
        }
        (Some(ca), None) => {
            let pem = data_source("trusted_ca", Some(ca), hasher)?;
            let roots = crate::secrets::roots_from_pem(&pem, "trusted_ca")
                .and_then(|r| crate::secrets::trust_from_roots(Arc::new(r), "trusted_ca"))
                .or_else(|e| bad("trusted_ca", e.to_string()))?;
            TrustSource::Static(Arc::new(roots))
        }
        (None, Some(t)) => t,
        (None, None) if sans.is_empty() => return Ok(None),
        (None, None) => return bad("trusted_ca", "SAN matching needs a trusted_ca"),
    };
    Ok(Some(Validation { trust, sans }))
}

fn transport_socket_match(m: &cv3::cluster::TransportSocketMatch) -> FResult<TransportSocketMatch> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let mut criteria = Vec::new();
    if let Some(st) = &m.r#match {
        for (k, v) in &st.fields {
            match &v.kind {
                Some(Kind::StringValue(s)) => criteria.push((k.clone(), s.clone())),
                _ => return bad(format!("match.{k}"), "only string values are supported"),
            }
        }
    }
    criteria.sort();
    let tls = match &m.transport_socket {
        None => None,
        Some(t) => upstream_tls(t).map_err(|e| within("transport_socket", e))?,
    };
    Ok(TransportSocketMatch {
        name: m.name.clone(),
        criteria,
        tls,
    })
}

/// istiod's endpoint metadata `istio: {workload: "name;namespace;canonical-service;
/// canonical-revision;cluster"}`; anything else there is ignored (it only labels metrics).
fn workload_metadata(
    md: Option<&core::Metadata>,
) -> Option<std::sync::Arc<crate::metrics::Workload>> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let v = md?.filter_metadata.get("istio")?.fields.get("workload")?;
    match &v.kind {
        Some(Kind::StringValue(s)) => {
            crate::metrics::Workload::from_endpoint_metadata(s).map(std::sync::Arc::new)
        }
        _ => None,
    }
}

/// String values of the `envoy.transport_socket_match` metadata (Istio's `tlsMode`).
fn transport_metadata(md: Option<&core::Metadata>) -> Vec<(String, String)> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let Some(st) = md.and_then(|m| m.filter_metadata.get(TRANSPORT_SOCKET_MATCH)) else {
        return Vec::new();
    };
    let mut out: Vec<(String, String)> = st
        .fields
        .iter()
        .filter_map(|(k, v)| match &v.kind {
            Some(Kind::StringValue(s)) => Some((k.clone(), s.clone())),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any_of<M: Message + prost::Name>(m: &M) -> Any {
        Any {
            type_url: M::type_url(),
            value: m.encode_to_vec(),
        }
    }

    /// An RBAC config whose one policy allows everything; `cel` adds a CEL condition.
    fn rbac_rules(cel: bool) -> envoy_types::pb::envoy::config::rbac::v3::Rbac {
        use envoy_types::pb::envoy::config::rbac::v3 as r;
        let policy = r::Policy {
            permissions: vec![r::Permission {
                rule: Some(r::permission::Rule::Any(true)),
            }],
            principals: vec![r::Principal {
                identifier: Some(r::principal::Identifier::Any(true)),
            }],
            condition: cel.then(Default::default),
            ..Default::default()
        };
        r::Rbac {
            action: r::rbac::Action::Deny as i32,
            policies: [("p".to_string(), policy)].into_iter().collect(),
            ..Default::default()
        }
    }

    fn chain_listener(filters: Vec<lv3::Filter>) -> lv3::Listener {
        lv3::Listener {
            name: "virtualInbound".into(),
            address: Some(core::Address {
                address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                    address: "0.0.0.0".into(),
                    port_specifier: Some(core::socket_address::PortSpecifier::PortValue(15006)),
                    ..Default::default()
                })),
            }),
            filter_chains: vec![lv3::FilterChain {
                name: "c".into(),
                filters,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn http_filter(name: &str, any: Option<Any>) -> hcm::HttpFilter {
        hcm::HttpFilter {
            name: name.into(),
            config_type: any.map(hcm::http_filter::ConfigType::TypedConfig),
            ..Default::default()
        }
    }

    fn hcm_with(filters: Vec<hcm::HttpFilter>) -> lv3::Filter {
        let h = hcm::HttpConnectionManager {
            stat_prefix: "inbound_0.0.0.0_8080".into(),
            route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
                hcm::Rds {
                    route_config_name: "r".into(),
                    ..Default::default()
                },
            )),
            http_filters: filters,
            ..Default::default()
        };
        lv3::Filter {
            name: HCM_NAME.into(),
            config_type: Some(lv3::filter::ConfigType::TypedConfig(any_of(&h))),
        }
    }

    #[test]
    fn http_filters_keep_their_order_and_the_router_ends_them() {
        let rbac = hrbacv3::Rbac {
            rules: Some(rbac_rules(false)),
            ..Default::default()
        };
        let l = chain_listener(vec![hcm_with(vec![
            http_filter(FAULT_FILTER, None),
            http_filter(CORS_FILTER, None),
            http_filter(RBAC_FILTER, Some(any_of(&rbac))),
            http_filter(ROUTER_FILTER, None),
        ])]);
        let got = Listener::try_from(&l).map_err(|e| e.to_string());
        let Ok(Listener { filter_chains, .. }) = got else {
            panic!("{got:?}");
        };
        let NetworkFilter::Http(h) = &filter_chains[0].filter else {
            panic!("not an HCM");
        };
        assert!(matches!(
            &*h.http_filters,
            [
                HttpFilter::Fault,
                HttpFilter::Cors,
                HttpFilter::Rbac(_),
                HttpFilter::Router
            ]
        ));
        // A filter after the router, or an unknown one, is a NACK naming it.
        for (filters, field) in [
            (
                vec![
                    http_filter(ROUTER_FILTER, None),
                    http_filter(FAULT_FILTER, None),
                ],
                "http_filters[0]",
            ),
            (
                vec![
                    http_filter("envoy.filters.http.ext_authz", None),
                    http_filter(ROUTER_FILTER, None),
                ],
                "http_filters[0]",
            ),
        ] {
            let e = Listener::try_from(&chain_listener(vec![hcm_with(filters)]))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(&format!("typed_config.{field}")), "{e}");
        }
        // An RBAC feature we cannot evaluate (CEL) is a NACK with its path.
        let cel = hrbacv3::Rbac {
            rules: Some(rbac_rules(true)),
            ..Default::default()
        };
        let e = Listener::try_from(&chain_listener(vec![hcm_with(vec![
            http_filter(RBAC_FILTER, Some(any_of(&cel))),
            http_filter(ROUTER_FILTER, None),
        ])]))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            e.contains("http_filters[0].typed_config.rules.policies[p].condition"),
            "{e}"
        );
    }

    #[test]
    fn network_rbac_goes_before_the_terminal_filter() {
        let tcp = tcpv3::TcpProxy {
            stat_prefix: "inbound|9000||".into(),
            cluster_specifier: Some(tcpv3::tcp_proxy::ClusterSpecifier::Cluster("c".into())),
            ..Default::default()
        };
        let tcp = lv3::Filter {
            name: TCP_PROXY_NAME.into(),
            config_type: Some(lv3::filter::ConfigType::TypedConfig(any_of(&tcp))),
        };
        let rbac = |cel| lv3::Filter {
            name: NETWORK_RBAC_FILTER.into(),
            config_type: Some(lv3::filter::ConfigType::TypedConfig(any_of(
                &nrbacv3::Rbac {
                    rules: Some(rbac_rules(cel)),
                    stat_prefix: "tcp.".into(),
                    ..Default::default()
                },
            ))),
        };
        let l = Listener::try_from(&chain_listener(vec![rbac(false), rbac(false), tcp.clone()]));
        assert!(l.is_ok_and(|l| l.filter_chains[0].network_rbac.len() == 2
            && matches!(l.filter_chains[0].filter, NetworkFilter::Tcp(_))));
        let e = Listener::try_from(&chain_listener(vec![rbac(false), rbac(true), tcp.clone()]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("filters[1].typed_config.rules.policies[p].condition"),
            "{e}"
        );
        // Only RBAC may precede the terminal filter.
        let e = Listener::try_from(&chain_listener(vec![tcp.clone(), tcp]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("filters[0].name"), "{e}");
    }

    #[test]
    fn substitution_uses_regex_crate_syntax() {
        assert_eq!(envoy_substitution(r"/v2/\1/x"), "/v2/${1}/x");
        assert_eq!(envoy_substitution("a$b"), "a$$b");
    }

    #[test]
    fn unsupported_field_is_rejected_with_its_path() {
        let rc = rv3::RouteConfiguration {
            name: "http.8080".into(),
            virtual_hosts: vec![rv3::VirtualHost {
                name: "a.example.com:80".into(),
                domains: vec!["a.example.com".into()],
                routes: vec![rv3::Route {
                    name: "r".into(),
                    r#match: Some(rv3::RouteMatch {
                        path_specifier: Some(rv3::route_match::PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(rv3::route::Action::Route(rv3::RouteAction {
                        cluster_specifier: Some(rv3::route_action::ClusterSpecifier::Cluster(
                            "c".into(),
                        )),
                        retry_policy: Some(rv3::RetryPolicy {
                            retry_priority: Some(Default::default()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let e = RouteConfig::try_from(&rc)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("route configuration http.8080"), "{e}");
        assert!(e.contains("route.retry_policy.retry_priority"), "{e}");
    }

    fn sds(name: &str) -> tlsv3::SdsSecretConfig {
        tlsv3::SdsSecretConfig {
            name: name.into(),
            sds_config: None,
        }
    }

    /// What the pilot emits for auto mTLS (Istio's shape).
    fn istio_mutual(cert_secret: &str) -> core::TransportSocket {
        use tlsv3::common_tls_context::{
            CombinedCertificateValidationContext, ValidationContextType,
        };
        let ctx = tlsv3::UpstreamTlsContext {
            sni: "outbound_.8000_._.back.default.svc.cluster.local".into(),
            common_tls_context: Some(tlsv3::CommonTlsContext {
                alpn_protocols: vec!["istio-peer-exchange".into(), "istio".into()],
                tls_certificate_sds_secret_configs: vec![sds(cert_secret)],
                validation_context_type: Some(ValidationContextType::CombinedValidationContext(
                    CombinedCertificateValidationContext {
                        default_validation_context: Some(tlsv3::CertificateValidationContext {
                            match_typed_subject_alt_names: vec![tlsv3::SubjectAltNameMatcher {
                                san_type: tlsv3::subject_alt_name_matcher::SanType::Uri as i32,
                                matcher: Some(matcher::StringMatcher {
                                    match_pattern: Some(
                                        matcher::string_matcher::MatchPattern::Exact(
                                            "spiffe://cluster.local/ns/default/sa/back".into(),
                                        ),
                                    ),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            }],
                            ..Default::default()
                        }),
                        validation_context_sds_secret_config: Some(sds("ROOTCA")),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }),
            ..Default::default()
        };
        core::TransportSocket {
            name: TLS_SOCKET.into(),
            config_type: Some(core::transport_socket::ConfigType::TypedConfig(Any {
                type_url: <tlsv3::UpstreamTlsContext as prost::Name>::type_url(),
                value: ctx.encode_to_vec(),
            })),
        }
    }

    fn auto_mtls_cluster(cert_secret: &str) -> cv3::Cluster {
        use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
        let tls_mode = Struct {
            fields: [(
                "tlsMode".to_string(),
                Value {
                    kind: Some(Kind::StringValue("istio".into())),
                },
            )]
            .into(),
        };
        cv3::Cluster {
            name: "outbound|8000||back.default.svc.cluster.local".into(),
            cluster_discovery_type: Some(cv3::cluster::ClusterDiscoveryType::Type(
                cv3::cluster::DiscoveryType::Eds as i32,
            )),
            transport_socket_matches: vec![
                cv3::cluster::TransportSocketMatch {
                    name: "tlsMode-istio".into(),
                    r#match: Some(tls_mode),
                    transport_socket: Some(istio_mutual(cert_secret)),
                },
                cv3::cluster::TransportSocketMatch {
                    name: "tlsMode-disabled".into(),
                    r#match: Some(Struct::default()),
                    transport_socket: Some(core::TransportSocket {
                        name: RAW_BUFFER.into(),
                        config_type: None,
                    }),
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn auto_mtls_transport_socket_matches() {
        let c = Cluster::try_from(&auto_mtls_cluster("default")).unwrap();
        assert_eq!(c.transport_matches.len(), 2);
        let istio = &c.transport_matches[0];
        assert_eq!(istio.criteria, vec![("tlsMode".into(), "istio".into())]);
        let tls = istio.tls.as_ref().unwrap();
        assert_eq!(
            tls.sni.as_deref(),
            Some("outbound_.8000_._.back.default.svc.cluster.local")
        );
        assert_eq!(tls.alpn, vec!["istio-peer-exchange", "istio"]);
        assert!(c.transport_matches[1].tls.is_none());
        assert!(c.tls.is_none());
        // Same context, same pool key; a different one, another key.
        let again = Cluster::try_from(&auto_mtls_cluster("default")).unwrap();
        assert_eq!(
            again.transport_matches[0].tls.as_ref().unwrap().key,
            tls.key
        );
    }

    #[test]
    fn unknown_sds_secret_is_rejected_with_its_path() {
        let e = Cluster::try_from(&auto_mtls_cluster("kubernetes://gw-cred"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("transport_socket_matches[0].transport_socket.typed_config.common_tls_context.tls_certificate_sds_secret_configs[0]"),
            "{e}"
        );
        assert!(e.contains("kubernetes://gw-cred"), "{e}");
    }

    #[test]
    fn priorities_and_locality_weights_are_kept_other_overprovisioning_is_not() {
        use envoy_types::pb::google::protobuf::UInt32Value;
        let lb = |ip: &str| ev3::LbEndpoint {
            host_identifier: Some(ev3::lb_endpoint::HostIdentifier::Endpoint(ev3::Endpoint {
                address: Some(core::Address {
                    address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                        address: ip.into(),
                        port_specifier: Some(core::socket_address::PortSpecifier::PortValue(80)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            ..Default::default()
        };
        let mut la = ev3::ClusterLoadAssignment {
            cluster_name: "c".into(),
            endpoints: vec![
                ev3::LocalityLbEndpoints {
                    lb_endpoints: vec![lb("10.0.0.1")],
                    load_balancing_weight: Some(UInt32Value { value: 75 }),
                    ..Default::default()
                },
                ev3::LocalityLbEndpoints {
                    lb_endpoints: vec![lb("10.0.0.2")],
                    priority: 1,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let eps = Endpoints::try_from(&la).expect("priorities are supported");
        let got: Vec<(u32, u32, u32)> = eps
            .endpoints
            .iter()
            .map(|e| (e.priority, e.locality, e.locality_weight))
            .collect();
        assert_eq!(got, vec![(0, 0, 75), (1, 1, 0)]);
        la.policy = Some(ev3::cluster_load_assignment::Policy {
            overprovisioning_factor: Some(UInt32Value { value: 200 }),
            ..Default::default()
        });
        let e = Endpoints::try_from(&la).unwrap_err().to_string();
        assert!(
            e.contains("policy.overprovisioning_factor") && e.contains("140"),
            "{e}"
        );
    }

    #[test]
    fn endpoint_tls_mode_metadata_is_kept() {
        use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
        let md = core::Metadata {
            filter_metadata: [(
                TRANSPORT_SOCKET_MATCH.to_string(),
                Struct {
                    fields: [(
                        "tlsMode".to_string(),
                        Value {
                            kind: Some(Kind::StringValue("istio".into())),
                        },
                    )]
                    .into(),
                },
            )]
            .into(),
            ..Default::default()
        };
        assert_eq!(
            transport_metadata(Some(&md)),
            vec![("tlsMode".to_string(), "istio".to_string())]
        );
        assert!(transport_metadata(None).is_empty());
    }

    /// `header_key_format` with Istio's preserve-case formatter, a stateful formatter
    /// named `name` with `typed_config` of `type_url`, or proper-case words.
    fn key_format(kind: &str, name: &str, type_url: &str) -> core::Http1ProtocolOptions {
        use super::core::http1_protocol_options::header_key_format::{
            HeaderFormat, ProperCaseWords,
        };
        let f = if kind == "proper" {
            HeaderFormat::ProperCaseWords(ProperCaseWords {})
        } else {
            HeaderFormat::StatefulFormatter(core::TypedExtensionConfig {
                name: name.into(),
                typed_config: Some(Any {
                    type_url: type_url.into(),
                    value: Vec::new(),
                }),
            })
        };
        core::Http1ProtocolOptions {
            header_key_format: Some(core::http1_protocol_options::HeaderKeyFormat {
                header_format: Some(f),
            }),
            ..Default::default()
        }
    }

    fn hcm_case(opts: Option<core::Http1ProtocolOptions>) -> Result<HeaderCase, String> {
        let mut f = hcm_with(vec![http_filter(ROUTER_FILTER, None)]);
        if let Some(lv3::filter::ConfigType::TypedConfig(any)) = &mut f.config_type {
            let mut h: hcm::HttpConnectionManager = unpack("t", any).map_err(|e| e.reason)?;
            h.http_protocol_options = opts;
            *any = any_of(&h);
        }
        let l = Listener::try_from(&chain_listener(vec![f])).map_err(|e| e.to_string())?;
        match &l.filter_chains[0].filter {
            NetworkFilter::Http(h) => Ok(h.header_case),
            NetworkFilter::Tcp(_) => Err("not an HCM".into()),
        }
    }

    fn cluster_case(h1: Option<core::Http1ProtocolOptions>) -> Result<HeaderCase, String> {
        use upv3::http_protocol_options::explicit_http_config::ProtocolConfig;
        use upv3::http_protocol_options::{ExplicitHttpConfig, UpstreamProtocolOptions};
        let mut c = auto_mtls_cluster("default");
        if let Some(h1) = h1 {
            let o = upv3::HttpProtocolOptions {
                upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
                    ExplicitHttpConfig {
                        protocol_config: Some(ProtocolConfig::HttpProtocolOptions(h1)),
                    },
                )),
                ..Default::default()
            };
            c.typed_extension_protocol_options =
                [(HTTP_PROTOCOL_OPTIONS.to_string(), any_of(&o))].into();
        }
        Cluster::try_from(&c)
            .map(|c| c.header_case)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn header_key_format_on_the_hcm_and_the_cluster() {
        // Envoy's default: lowercase.
        assert_eq!(hcm_case(None), Ok(HeaderCase::Lower));
        assert_eq!(cluster_case(None), Ok(HeaderCase::Lower));
        assert_eq!(
            cluster_case(Some(core::Http1ProtocolOptions::default())),
            Ok(HeaderCase::Lower)
        );
        // Istio's preserve_case (the name is free; the typed_config type decides).
        let istio = || key_format("stateful", "preserve_case", PRESERVE_CASE_CONFIG);
        assert_eq!(hcm_case(Some(istio())), Ok(HeaderCase::Preserve));
        assert_eq!(cluster_case(Some(istio())), Ok(HeaderCase::Preserve));
        let proper = || key_format("proper", "", "");
        assert_eq!(hcm_case(Some(proper())), Ok(HeaderCase::ProperCase));
        assert_eq!(cluster_case(Some(proper())), Ok(HeaderCase::ProperCase));
        // Another stateful formatter is a NACK naming the resource, the field and the formatter.
        let other = || {
            key_format(
                "stateful",
                "envoy.http.stateful_header_formatters.dynamic_modules",
                "type.googleapis.com/envoy.extensions.http.header_formatters.dynamic_modules.v3.Config",
            )
        };
        let e = hcm_case(Some(other())).unwrap_err();
        assert!(
            e.starts_with("listener virtualInbound: ")
                && e.contains(
                    "typed_config.http_protocol_options.header_key_format.stateful_formatter"
                )
                && e.contains("dynamic_modules"),
            "{e}"
        );
        let e = cluster_case(Some(other())).unwrap_err();
        assert!(
            e.starts_with("cluster outbound|8000||back.default.svc.cluster.local: ")
                && e.contains("explicit_http_config.http_protocol_options.header_key_format.stateful_formatter")
                && e.contains("dynamic_modules"),
            "{e}"
        );
        // Preserve-case options we do not implement are NACKed too.
        let mut fwd = istio();
        if let Some(
            core::http1_protocol_options::header_key_format::HeaderFormat::StatefulFormatter(t),
        ) = fwd
            .header_key_format
            .as_mut()
            .and_then(|k| k.header_format.as_mut())
        {
            t.typed_config = Some(any_of(
                &envoy_types::pb::envoy::extensions::http::header_formatters::preserve_case::v3::PreserveCaseFormatterConfig {
                    forward_reason_phrase: true,
                    ..Default::default()
                },
            ));
        }
        let e = hcm_case(Some(fwd)).unwrap_err();
        assert!(e.contains("forward_reason_phrase"), "{e}");
    }

    #[test]
    fn regex_path_is_anchored() {
        let r = FullRegex::new("/items/[0-9]+").unwrap();
        assert!(r.is_match("/items/42"));
        assert!(!r.is_match("/items/42x"));
    }
}
