//! One VirtualService `http` route -> Envoy `Route`s, field for field as istiod's
//! `pilot/pkg/networking/core/route/route.go` maps them (match, destinations, redirect,
//! direct response, rewrite, timeout, retries, fault, mirror, CORS, header operations,
//! consistent-hash policies from DestinationRules).
//!
//! Everything here is total: inputs were validated already, but a value Envoy would reject
//! (an unsupported redirect code, a route with nowhere to go) drops that one route with a
//! warning instead of producing config that would be NACKed as a whole.

use crate::any::pack;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as rv3;
use envoy_types::pb::envoy::config::route::v3::route_action::{hash_policy, HashPolicy};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3 as common_fault;
use envoy_types::pb::envoy::extensions::filters::http::cors::v3::CorsPolicy;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault;
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use envoy_types::pb::envoy::extensions::retry::priority::previous_priorities::v3::PreviousPrioritiesConfig;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::envoy::r#type::v3::{fractional_percent::DenominatorType, FractionalPercent};
use envoy_types::pb::google::protobuf::{value, BoolValue, Duration, Struct, UInt32Value, Value};
use mizzen_config::networking as net;
use mizzen_model::push::ConfigEntry;
use mizzen_model::{Proxy, PushContext};
use std::collections::BTreeMap;
use tracing::warn;

/// HTTP filter names used as `typed_per_filter_config` keys (the listener's HCM installs
/// these filters under the same names).
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";
pub const CORS_FILTER: &str = "envoy.filters.http.cors";

/// Istio's default retry policy (`retry.DefaultPolicy`) values.
pub const DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";
pub const DEFAULT_NUM_RETRIES: u32 = 2;

/// Where the routes are being built: the listener port and the gateway names a match's
/// `gateways` field is compared with (`mesh` for sidecars, `ns/name` for a router).
pub struct Ctx<'a> {
    pub proxy: &'a Proxy,
    pub push: &'a PushContext,
    pub port: u16,
    pub gateways: &'a [String],
    /// The server terminates TLS (gateway HTTPS): default redirect scheme is https.
    pub is_tls: bool,
}

// ------------------------------------------------------------------ small helpers

pub fn duration(d: &mizzen_config::duration::Duration) -> Duration {
    super::super::duration(d.as_std())
}

pub fn zero() -> Duration {
    Duration {
        seconds: 0,
        nanos: 0,
    }
}

fn bool_value(v: bool) -> Option<BoolValue> {
    Some(BoolValue { value: v })
}

/// Istio `Percent` (a double, 0-100) -> Envoy per-million fraction, as istiod's
/// `translatePercentToFractionalPercent` (per million keeps 4 decimals of precision).
pub fn percent_per_million(p: f64) -> FractionalPercent {
    let n = (p * 10_000.0).clamp(0.0, 1_000_000.0);
    FractionalPercent {
        // Clamped above; the cast cannot wrap.
        numerator: n as u32,
        denominator: DenominatorType::Million as i32,
    }
}

pub fn percent_per_hundred(p: i64) -> FractionalPercent {
    FractionalPercent {
        numerator: u32::try_from(p.clamp(0, 100)).unwrap_or(0),
        denominator: DenominatorType::Hundred as i32,
    }
}

/// Istio `StringMatch` -> Envoy `StringMatcher` (`util.ConvertToEnvoyMatch`).
pub fn string_matcher(m: &net::StringMatch) -> matcher::StringMatcher {
    use matcher::string_matcher::MatchPattern;
    let pattern = match m {
        net::StringMatch::Exact(s) => MatchPattern::Exact(s.clone()),
        // Envoy requires a non-empty prefix; an empty prefix matches everything, which is
        // what an empty regex-free `prefix` means to the user.
        net::StringMatch::Prefix(s) if s.is_empty() => MatchPattern::SafeRegex(regex(".*")),
        net::StringMatch::Prefix(s) => MatchPattern::Prefix(s.clone()),
        net::StringMatch::Regex(s) => MatchPattern::SafeRegex(regex(s)),
    };
    matcher::StringMatcher {
        match_pattern: Some(pattern),
        ignore_case: false,
    }
}

/// A RE2 regex matcher (Envoy's default engine is Google RE2, the engine Istio documents).
pub fn regex(re: &str) -> matcher::RegexMatcher {
    matcher::RegexMatcher {
        regex: re.to_string(),
        engine_type: None,
    }
}

/// `regex: "*"` is not RE2; Istio treats it as "header present" (istio/istio#20629).
fn is_present_match(m: &net::StringMatch) -> bool {
    matches!(m, net::StringMatch::Regex(r) if r == "*")
}

/// `outbound|PORT|SUBSET|HOST` for a route destination (istiod `GetDestinationCluster`): the
/// destination port, else the service's only port, else the listener port. Hosts missing
/// from the registry still get a name (the route then blackholes, as with istiod).
pub fn destination_cluster(push: &PushContext, d: &net::Destination, listener_port: u16) -> String {
    let port = match &d.port {
        Some(p) => u16::try_from(p.number).unwrap_or(listener_port),
        None => match push.service(&d.host) {
            Some(svc) if svc.ports.len() == 1 => svc.ports[0].port,
            _ => listener_port,
        },
    };
    super::super::outbound_cluster_name(port, d.subset.as_deref().unwrap_or(""), &d.host)
}

// ------------------------------------------------------------------ headers

/// Header operations of one `Headers` block (`TranslateHeadersOperations`).
#[derive(Default, Debug, Clone, PartialEq)]
pub struct HeaderOps {
    pub request_add: Vec<core::HeaderValueOption>,
    pub response_add: Vec<core::HeaderValueOption>,
    pub request_remove: Vec<String>,
    pub response_remove: Vec<String>,
    /// `host` / `:authority` set or added: becomes `host_rewrite_literal`, since Envoy does
    /// not let header mutations touch pseudo-headers.
    pub authority: Option<String>,
}

fn is_internal_header(k: &str) -> bool {
    k.starts_with(':') || k.eq_ignore_ascii_case("host")
}

fn is_authority_header(k: &str) -> bool {
    k.eq_ignore_ascii_case(":authority") || k.eq_ignore_ascii_case("host")
}

fn header_values(
    headers: &BTreeMap<String, String>,
    append: bool,
) -> (Vec<core::HeaderValueOption>, Option<String>) {
    let action = if append {
        core::header_value_option::HeaderAppendAction::AppendIfExistsOrAdd
    } else {
        core::header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd
    };
    let mut authority = None;
    let mut out = Vec::new();
    // BTreeMap: sorted by key, the order istiod's stable sort produces.
    for (k, v) in headers {
        if is_authority_header(k) {
            authority = Some(v.clone());
        }
        if is_internal_header(k) {
            continue;
        }
        out.push(core::HeaderValueOption {
            header: Some(core::HeaderValue {
                key: k.clone(),
                value: v.clone(),
                ..Default::default()
            }),
            append_action: action as i32,
            ..Default::default()
        });
    }
    (out, authority)
}

pub fn header_ops(h: &net::Headers) -> HeaderOps {
    let empty = net::HeaderOperations::default();
    let req = h.request.as_ref().unwrap_or(&empty);
    let resp = h.response.as_ref().unwrap_or(&empty);
    let (mut request_add, set_auth) = header_values(&req.set, false);
    let (req_add, add_auth) = header_values(&req.add, true);
    request_add.extend(req_add);
    let (mut response_add, _) = header_values(&resp.set, false);
    response_add.extend(header_values(&resp.add, true).0);
    let drop_internal = |v: &[String]| {
        v.iter()
            .filter(|k| !is_internal_header(k))
            .cloned()
            .collect::<Vec<_>>()
    };
    HeaderOps {
        request_add,
        response_add,
        request_remove: drop_internal(&req.remove),
        response_remove: drop_internal(&resp.remove),
        // `set` wins over `add` when both name the authority.
        authority: set_auth.or(add_auth),
    }
}

// ------------------------------------------------------------------ match

/// `@request.auth.claims.a.b` / `@request.auth.claims[a][b]` -> `["a", "b"]`
/// (istio `jwt.ToRoutingClaim`): such "headers" match JWT claims via dynamic metadata.
fn routing_claim(name: &str) -> Option<Vec<String>> {
    const PREFIX: &str = "@request.auth.claims";
    // `get`, not indexing: a non-ASCII header name must not split a character (panic).
    let (head, rest) = (name.get(..PREFIX.len())?, name.get(PREFIX.len()..)?);
    if !head.eq_ignore_ascii_case(PREFIX) {
        return None;
    }
    if let Some(r) = rest.strip_prefix('.') {
        if !r.is_empty() {
            return Some(r.split('.').map(str::to_string).collect());
        }
    } else if rest.len() > 2 && rest.starts_with('[') && rest.ends_with(']') {
        let inner = &rest[1..rest.len() - 1];
        return Some(inner.split("][").map(str::to_string).collect());
    }
    None
}

/// JWT claim matcher on the `istio_authn` filter metadata, as istiod's
/// `MetadataMatcherForJWTClaims` builds it.
fn claim_matcher(claims: Vec<String>, m: &net::StringMatch) -> matcher::MetadataMatcher {
    use matcher::metadata_matcher::{path_segment::Segment, PathSegment};
    let path = std::iter::once("request.auth.claims".to_string())
        .chain(claims)
        .map(|k| PathSegment {
            segment: Some(Segment::Key(k)),
        })
        .collect();
    let one_of = matcher::ValueMatcher {
        match_pattern: Some(matcher::value_matcher::MatchPattern::StringMatch(
            string_matcher(m),
        )),
    };
    matcher::MetadataMatcher {
        filter: "istio_authn".into(),
        path,
        value: Some(matcher::ValueMatcher {
            match_pattern: Some(matcher::value_matcher::MatchPattern::ListMatch(Box::new(
                matcher::ListMatcher {
                    match_pattern: Some(matcher::list_matcher::MatchPattern::OneOf(Box::new(
                        one_of,
                    ))),
                },
            ))),
        }),
        invert: false,
    }
}

pub fn header_matcher(name: &str, m: &net::StringMatch) -> rv3::HeaderMatcher {
    use rv3::header_matcher::HeaderMatchSpecifier;
    let spec = if is_present_match(m) {
        HeaderMatchSpecifier::PresentMatch(true)
    } else {
        HeaderMatchSpecifier::StringMatch(string_matcher(m))
    };
    rv3::HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(spec),
        ..Default::default()
    }
}

/// `HTTPMatchRequest` -> `RouteMatch` (`TranslateRouteMatch`). `None` = catch-all `/`.
pub fn route_match(m: Option<&net::HttpMatchRequest>) -> rv3::RouteMatch {
    use rv3::route_match::PathSpecifier;
    let mut out = rv3::RouteMatch {
        path_specifier: Some(PathSpecifier::Prefix("/".into())),
        ..Default::default()
    };
    let Some(m) = m else {
        return out;
    };
    for (name, sm) in &m.headers {
        match routing_claim(name) {
            Some(claims) => out.dynamic_metadata.push(claim_matcher(claims, sm)),
            None => out.headers.push(header_matcher(name, sm)),
        }
    }
    for (name, sm) in &m.without_headers {
        match routing_claim(name) {
            Some(claims) => {
                let mut mm = claim_matcher(claims, sm);
                mm.invert = true;
                out.dynamic_metadata.push(mm);
            }
            None => {
                let mut hm = header_matcher(name, sm);
                hm.invert_match = true;
                // A header that is absent must count as "not matching" the value, so the
                // inverted matcher accepts it; Envoy forbids this flag with present_match.
                hm.treat_missing_header_as_empty = !is_present_match(sm);
                out.headers.push(hm);
            }
        }
    }
    // Stable order, as istiod sorts the user headers by name.
    out.headers.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(uri) = &m.uri {
        out.path_specifier = Some(match uri {
            net::StringMatch::Exact(p) => PathSpecifier::Path(p.clone()),
            net::StringMatch::Prefix(p) => PathSpecifier::Prefix(p.clone()),
            net::StringMatch::Regex(r) => PathSpecifier::SafeRegex(regex(r)),
        });
    }
    out.case_sensitive = bool_value(!m.ignore_uri_case);
    if let Some(sm) = &m.method {
        out.headers.push(header_matcher(":method", sm));
    }
    if let Some(sm) = &m.authority {
        out.headers.push(header_matcher(":authority", sm));
    }
    if let Some(sm) = &m.scheme {
        out.headers.push(header_matcher(":scheme", sm));
    }
    for (name, sm) in &m.query_params {
        use rv3::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
        let spec = if is_present_match(sm) {
            Q::PresentMatch(true)
        } else {
            Q::StringMatch(string_matcher(sm))
        };
        out.query_parameters.push(rv3::QueryParameterMatcher {
            name: name.clone(),
            query_parameter_match_specifier: Some(spec),
        });
    }
    out
}

/// Istio's `IsCatchAllRoute`: prefix `/` (or regex `.*`) with no header, query or metadata
/// conditions. Routes after it can never match.
pub fn is_catch_all(r: &rv3::Route) -> bool {
    use rv3::route_match::PathSpecifier;
    let Some(m) = &r.r#match else {
        return false;
    };
    let path_all = match &m.path_specifier {
        Some(PathSpecifier::Prefix(p)) => p == "/",
        Some(PathSpecifier::PathSeparatedPrefix(p)) => p == "/",
        Some(PathSpecifier::SafeRegex(re)) => re.regex == ".*",
        _ => false,
    };
    path_all
        && m.headers.is_empty()
        && m.query_parameters.is_empty()
        && m.dynamic_metadata.is_empty()
}

/// Does a match block apply to this proxy / gateway (`sourceMatchHTTP`)? A match naming
/// gateways applies only to those (and then source labels are not consulted, as in istiod).
fn source_matches(ctx: &Ctx, m: &net::HttpMatchRequest) -> bool {
    if !m.gateways.is_empty() {
        return m.gateways.iter().any(|g| ctx.gateways.contains(g));
    }
    let labels = ctx.proxy.effective_labels();
    let labels_ok = m
        .source_labels
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v));
    labels_ok
        && m.source_namespace
            .as_deref()
            .is_none_or(|ns| ns.is_empty() || ns == ctx.proxy.namespace)
}

// ------------------------------------------------------------------ policies

/// Istio retry policy -> Envoy (`retry.ConvertPolicy`). `None` when retries are disabled.
pub fn retry_policy(r: Option<&net::HttpRetry>, consistent_hash: bool) -> Option<rv3::RetryPolicy> {
    let mut out = rv3::RetryPolicy {
        num_retries: Some(UInt32Value {
            value: DEFAULT_NUM_RETRIES,
        }),
        retry_on: DEFAULT_RETRY_ON.into(),
        host_selection_retry_max_attempts: 5,
        retriable_status_codes: vec![503],
        ..Default::default()
    };
    // With consistent hashing a retry must stay on the same host, so no previous_hosts.
    if !consistent_hash {
        out.retry_host_predicate = vec![previous_hosts()];
    }
    let Some(r) = r else {
        return Some(out);
    };
    if r.attempts <= 0 {
        return None;
    }
    out.num_retries = Some(UInt32Value {
        value: u32::try_from(r.attempts).unwrap_or(0),
    });
    if let Some(on) = r.retry_on.as_deref().filter(|s| !s.is_empty()) {
        let (policies, codes) = parse_retry_on(on);
        out.retry_on = policies;
        out.retriable_status_codes = codes;
        if !out.retriable_status_codes.is_empty()
            && !out.retry_on.contains("retriable-status-codes")
        {
            if out.retry_on.is_empty() {
                out.retry_on = "retriable-status-codes".into();
            } else {
                out.retry_on.push_str(",retriable-status-codes");
            }
        }
    }
    if let Some(t) = &r.per_try_timeout {
        out.per_try_timeout = Some(duration(t));
    }
    if r.retry_remote_localities == Some(true) {
        out.retry_priority = Some(rv3::retry_policy::RetryPriority {
            name: "envoy.retry_priorities.previous_priorities".into(),
            config_type: Some(rv3::retry_policy::retry_priority::ConfigType::TypedConfig(
                pack(&PreviousPrioritiesConfig {
                    update_frequency: 2,
                }),
            )),
        });
    }
    Some(out)
}

fn previous_hosts() -> rv3::retry_policy::RetryHostPredicate {
    rv3::retry_policy::RetryHostPredicate {
        name: "envoy.retry_host_predicates.previous_hosts".into(),
        config_type: Some(
            rv3::retry_policy::retry_host_predicate::ConfigType::TypedConfig(pack(
                &PreviousHostsPredicate {},
            )),
        ),
    }
}

/// `"5xx,503,gateway-error"` -> (`"5xx,gateway-error"`, `[503]`): integers that are HTTP
/// status codes become `retriable_status_codes`.
pub fn parse_retry_on(s: &str) -> (String, Vec<u32>) {
    let mut policies = Vec::new();
    let mut codes = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<u32>() {
            Ok(code) if (100..=599).contains(&code) => codes.push(code),
            _ => policies.push(part),
        }
    }
    (policies.join(","), codes)
}

/// gRPC status name -> code (istio `grpc.SupportedGRPCStatus`).
fn grpc_code(name: &str) -> Option<u32> {
    const CODES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    CODES
        .iter()
        .position(|c| *c == name)
        .and_then(|i| u32::try_from(i).ok())
}

/// `HTTPFaultInjection` -> `HTTPFault` (`TranslateFault`); `None` when nothing usable is left.
pub fn fault(f: &net::HttpFaultInjection) -> Option<fault::HttpFault> {
    let mut out = fault::HttpFault::default();
    if let Some(d) = &f.delay {
        match &d.fixed_delay {
            Some(fixed) => {
                let percentage = match &d.percentage {
                    Some(p) => percent_per_million(p.value),
                    None => percent_per_hundred(i64::from(d.percent.unwrap_or(0))),
                };
                out.delay = Some(common_fault::FaultDelay {
                    percentage: Some(percentage),
                    fault_delay_secifier: Some(
                        common_fault::fault_delay::FaultDelaySecifier::FixedDelay(duration(fixed)),
                    ),
                });
            }
            None => warn!("exponential fault delays are not supported (as in Istio); ignored"),
        }
    }
    if let Some(a) = &f.abort {
        use fault::fault_abort::ErrorType;
        let error = if let Some(code) = a.http_status {
            match u32::try_from(code) {
                // Envoy accepts [200, 600).
                Ok(c) if (200..600).contains(&c) => Some(ErrorType::HttpStatus(c)),
                _ => {
                    warn!(code, "fault abort httpStatus out of range; ignored");
                    None
                }
            }
        } else if let Some(g) = &a.grpc_status {
            let code = grpc_code(g);
            if code.is_none() {
                warn!(status = %g, "unknown gRPC status in fault abort; ignored");
            }
            code.map(ErrorType::GrpcStatus)
        } else {
            warn!("only httpStatus and grpcStatus fault aborts are supported (as in Istio)");
            None
        };
        if let Some(error) = error {
            out.abort = Some(fault::FaultAbort {
                percentage: a.percentage.as_ref().map(|p| percent_per_million(p.value)),
                error_type: Some(error),
                ..Default::default()
            });
        }
    }
    (out.delay.is_some() || out.abort.is_some()).then_some(out)
}

/// `CorsPolicy` -> Envoy per-route `CorsPolicy` (`TranslateCORSPolicy`).
pub fn cors(c: &net::CorsPolicy) -> CorsPolicy {
    let allow_origin_string_match = if !c.allow_origins.is_empty() {
        c.allow_origins.iter().map(string_matcher).collect()
    } else {
        c.allow_origin
            .iter()
            .map(|o| string_matcher(&net::StringMatch::Exact(o.clone())))
            .collect()
    };
    CorsPolicy {
        allow_origin_string_match,
        allow_methods: c.allow_methods.join(","),
        allow_headers: c.allow_headers.join(","),
        expose_headers: c.expose_headers.join(","),
        max_age: c
            .max_age
            .as_ref()
            .map(|d| d.as_std().as_secs().to_string())
            .unwrap_or_default(),
        allow_credentials: c.allow_credentials.map(|v| BoolValue { value: v }),
        filter_enabled: Some(core::RuntimeFractionalPercent {
            default_value: Some(percent_per_hundred(100)),
            runtime_key: String::new(),
        }),
        // Istio's default keeps Envoy's pre-1.30 behaviour: forward preflights that do not
        // match; IGNORE stops forwarding them.
        forward_not_matching_preflights: bool_value(
            c.unmatched_preflights.as_deref() != Some("IGNORE"),
        ),
        ..Default::default()
    }
}

/// Consistent-hash settings of the DestinationRule for `d` (subset port-level, subset,
/// port-level, top-level; istiod `hashForHTTPDestination`).
pub fn consistent_hash<'a>(
    push: &'a PushContext,
    proxy_ns: &str,
    host: &str,
    port: Option<u16>,
    subset: Option<&str>,
) -> Option<&'a net::ConsistentHashLb> {
    let dr = push.destination_rule(proxy_ns, host)?;
    let tp = dr.spec.traffic_policy.as_ref();
    let port_level = |tp: Option<&'a net::TrafficPolicy>| {
        let port = port?;
        tp?.port_level_settings
            .iter()
            .find(|p| p.port.as_ref().is_some_and(|s| s.number == u32::from(port)))?
            .load_balancer
            .as_ref()?
            .consistent_hash
            .as_ref()
    };
    let top = tp
        .and_then(|t| t.load_balancer.as_ref())
        .and_then(|l| l.consistent_hash.as_ref());
    let subset_tp = subset.and_then(|name| {
        dr.spec
            .subsets
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.traffic_policy.as_ref())
    });
    let subset_hash = subset_tp
        .and_then(|t| t.load_balancer.as_ref())
        .and_then(|l| l.consistent_hash.as_ref());
    port_level(subset_tp)
        .or(subset_hash)
        .or_else(|| port_level(tp))
        .or(top)
}

/// `ConsistentHashLB` -> Envoy hash policy (`consistentHashToHashPolicy`).
pub fn hash_policy(h: &net::ConsistentHashLb) -> Option<HashPolicy> {
    let spec = if let Some(name) = h.http_header_name.as_ref().filter(|s| !s.is_empty()) {
        hash_policy::PolicySpecifier::Header(hash_policy::Header {
            header_name: name.clone(),
            regex_rewrite: None,
        })
    } else if let Some(c) = h.http_cookie.as_ref().filter(|c| !c.name.is_empty()) {
        hash_policy::PolicySpecifier::Cookie(hash_policy::Cookie {
            name: c.name.clone(),
            ttl: c.ttl.as_ref().map(duration),
            path: c.path.clone().unwrap_or_default(),
            attributes: Vec::new(),
        })
    } else if h.use_source_ip == Some(true) {
        hash_policy::PolicySpecifier::ConnectionProperties(hash_policy::ConnectionProperties {
            source_ip: true,
        })
    } else if let Some(q) = h
        .http_query_parameter_name
        .as_ref()
        .filter(|s| !s.is_empty())
    {
        hash_policy::PolicySpecifier::QueryParameter(hash_policy::QueryParameter {
            name: q.clone(),
        })
    } else {
        return None;
    };
    Some(HashPolicy {
        policy_specifier: Some(spec),
        terminal: false,
    })
}

fn destination_hash(ctx: &Ctx, d: &net::Destination) -> Option<HashPolicy> {
    let port = d.port.as_ref().and_then(|p| u16::try_from(p.number).ok());
    consistent_hash(
        ctx.push,
        &ctx.proxy.namespace,
        &d.host,
        port,
        d.subset.as_deref(),
    )
    .and_then(hash_policy)
}

// ------------------------------------------------------------------ actions

fn redirect(r: &net::HttpRedirect, port: u16, is_tls: bool) -> Option<rv3::RedirectAction> {
    use rv3::redirect_action::{
        PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier,
    };
    let response_code = match r.redirect_code.unwrap_or(0) {
        0 | 301 => RedirectResponseCode::MovedPermanently,
        302 => RedirectResponseCode::Found,
        303 => RedirectResponseCode::SeeOther,
        307 => RedirectResponseCode::TemporaryRedirect,
        308 => RedirectResponseCode::PermanentRedirect,
        other => {
            // istiod emits a route without action here, which Envoy rejects; drop the route.
            warn!(
                code = other,
                "redirect code not supported by Envoy; route dropped"
            );
            return None;
        }
    };
    let mut out = rv3::RedirectAction {
        host_redirect: r.authority.clone().unwrap_or_default(),
        response_code: response_code as i32,
        path_rewrite_specifier: r
            .uri
            .as_ref()
            .filter(|u| !u.is_empty())
            .map(|u| PathRewriteSpecifier::PathRedirect(u.clone())),
        scheme_rewrite_specifier: r
            .scheme
            .as_ref()
            .filter(|s| !s.is_empty())
            .map(|s| SchemeRewriteSpecifier::SchemeRedirect(s.clone())),
        ..Default::default()
    };
    if r.port.is_some() || r.derive_port.is_some() {
        if let Some(p) = r.port {
            out.port_redirect = p;
        } else if r.derive_port == Some(net::RedirectPortSelection::FromRequestPort) {
            // Envoy cannot derive the port per request, but routes are built per listener
            // port, so that port is the request's port.
            out.port_redirect = u32::from(port);
        }
        let scheme = match r.scheme.as_deref() {
            Some(s) if !s.is_empty() => s,
            _ if is_tls => "https",
            _ => "http",
        };
        // No explicit default port in the Location header.
        if (out.port_redirect == 80 && scheme == "http")
            || (out.port_redirect == 443 && scheme == "https")
        {
            out.port_redirect = 0;
        }
    }
    Some(out)
}

fn direct_response(d: &net::HttpDirectResponse) -> rv3::DirectResponseAction {
    use core::data_source::Specifier;
    let body = d.body.as_ref().map(|b| core::DataSource {
        specifier: Some(match b {
            net::HttpBody::String(s) => Specifier::InlineString(s.clone()),
            net::HttpBody::Bytes(b64) => Specifier::InlineBytes(base64_decode(b64)),
        }),
        ..Default::default()
    });
    rv3::DirectResponseAction {
        status: d.status,
        body,
        body_format: None,
    }
}

/// Standard (and URL-safe) base64, padding optional; invalid characters are skipped. Only
/// used for `directResponse.body.bytes`, which validation already checked.
pub fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' | b'-' => Some(62),
            b'/' | b'_' => Some(63),
            _ => None,
        }
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
        }
    }
    out
}

fn mirror_policy(
    push: &PushContext,
    d: &net::Destination,
    port: u16,
    fraction: FractionalPercent,
) -> rv3::route_action::RequestMirrorPolicy {
    rv3::route_action::RequestMirrorPolicy {
        cluster: destination_cluster(push, d, port),
        runtime_fraction: Some(core::RuntimeFractionalPercent {
            default_value: Some(fraction),
            runtime_key: String::new(),
        }),
        trace_sampled: bool_value(false),
        ..Default::default()
    }
}

/// Mirror percentage (`MirrorPercent`): explicit 0 disables; absent means 100%.
fn mirror_fraction(h: &net::HttpRoute) -> Option<FractionalPercent> {
    match (&h.mirror_percentage, h.mirror_percent) {
        (Some(p), _) => (p.value > 0.0).then(|| percent_per_million(p.value)),
        (None, Some(p)) => (p > 0).then(|| percent_per_hundred(i64::from(p))),
        (None, None) => Some(percent_per_hundred(100)),
    }
}

/// Route action for destinations (`applyHTTPRouteDestination`). Adds single-destination
/// header operations to the route itself, like istiod.
fn route_action(
    ctx: &Ctx,
    h: &net::HttpRoute,
    out: &mut rv3::Route,
    authority: Option<String>,
) -> Option<rv3::RouteAction> {
    use rv3::route_action::{ClusterSpecifier, HostRewriteSpecifier};
    let mut action = rv3::RouteAction {
        timeout: Some(h.timeout.as_ref().map(duration).unwrap_or_else(zero)),
        // No grpc-timeout handling: istiod uses the deprecated max_grpc_timeout for it, and
        // its replacement (any max_stream_duration) switches Envoy to the "new timeouts" path
        // where this route `timeout` is no longer enforced (the end-to-end 2 s timeout test
        // caught exactly that). gRPC clients still enforce their own deadlines.
        ..Default::default()
    };
    let mut authority = authority;
    if let Some(rw) = &h.rewrite {
        if let Some(rr) = &rw.uri_regex_rewrite {
            action.regex_rewrite = Some(matcher::RegexMatchAndSubstitute {
                pattern: Some(regex(&rr.pattern)),
                substitution: rr.rewrite.clone(),
            });
        } else if let Some(uri) = rw.uri.as_ref().filter(|u| !u.is_empty()) {
            // istiod uses prefix_rewrite for every match kind: with an exact or regex path
            // match Envoy's "matched prefix" is the whole path, so it is replaced entirely.
            action.prefix_rewrite = uri.clone();
        }
        if let Some(a) = rw.authority.as_ref().filter(|a| !a.is_empty()) {
            authority = Some(a.clone());
        }
    }
    if let Some(a) = authority {
        action.host_rewrite_specifier = Some(HostRewriteSpecifier::HostRewriteLiteral(a));
    }
    if let Some(m) = &h.mirror {
        if let Some(f) = mirror_fraction(h) {
            action
                .request_mirror_policies
                .push(mirror_policy(ctx.push, m, ctx.port, f));
        }
    }
    for m in &h.mirrors {
        let f = match &m.percentage {
            Some(p) if p.value > 0.0 => percent_per_million(p.value),
            Some(_) => continue,
            None => percent_per_hundred(100),
        };
        action
            .request_mirror_policies
            .push(mirror_policy(ctx.push, &m.destination, ctx.port, f));
    }
    let mut consistent = false;
    match h.route.as_slice() {
        [] => return None,
        [only] => {
            action.cluster_specifier = Some(ClusterSpecifier::Cluster(destination_cluster(
                ctx.push,
                &only.destination,
                ctx.port,
            )));
            if let Some(hdrs) = &only.headers {
                let ops = header_ops(hdrs);
                out.request_headers_to_add.extend(ops.request_add);
                out.request_headers_to_remove.extend(ops.request_remove);
                out.response_headers_to_add.extend(ops.response_add);
                out.response_headers_to_remove.extend(ops.response_remove);
                // A route-level rewrite wins over a destination's authority header.
                if let (Some(a), None) = (ops.authority, &action.host_rewrite_specifier) {
                    action.host_rewrite_specifier =
                        Some(HostRewriteSpecifier::HostRewriteLiteral(a));
                }
            }
            if let Some(hp) = destination_hash(ctx, &only.destination) {
                action.hash_policy.push(hp);
                consistent = true;
            }
        }
        many => {
            let mut clusters = Vec::new();
            for d in many {
                let weight = d.weight.unwrap_or(0);
                if weight <= 0 {
                    // Zero-weight destinations are dropped when others exist (istiod).
                    continue;
                }
                let mut cw = rv3::weighted_cluster::ClusterWeight {
                    name: destination_cluster(ctx.push, &d.destination, ctx.port),
                    weight: Some(UInt32Value {
                        value: u32::try_from(weight).unwrap_or(0),
                    }),
                    ..Default::default()
                };
                if let Some(hdrs) = &d.headers {
                    let ops = header_ops(hdrs);
                    cw.request_headers_to_add = ops.request_add;
                    cw.request_headers_to_remove = ops.request_remove;
                    cw.response_headers_to_add = ops.response_add;
                    cw.response_headers_to_remove = ops.response_remove;
                    cw.host_rewrite_specifier = ops.authority.map(
                        rv3::weighted_cluster::cluster_weight::HostRewriteSpecifier::HostRewriteLiteral,
                    );
                }
                if let Some(hp) = destination_hash(ctx, &d.destination) {
                    action.hash_policy.push(hp);
                }
                clusters.push(cw);
            }
            if clusters.is_empty() {
                warn!("every weighted destination has weight 0; route dropped");
                return None;
            }
            action.cluster_specifier =
                Some(ClusterSpecifier::WeightedClusters(rv3::WeightedCluster {
                    clusters,
                    ..Default::default()
                }));
        }
    }
    action.retry_policy = retry_policy(h.retries.as_ref(), consistent);
    Some(action)
}

/// Trace operation name, as istiod's `GetRouteOperation`.
fn operation(r: &rv3::Route, vs_name: &str, port: u16) -> String {
    use rv3::route_match::PathSpecifier;
    let path = match r.r#match.as_ref().and_then(|m| m.path_specifier.as_ref()) {
        Some(PathSpecifier::Prefix(p)) => format!("{p}*"),
        Some(PathSpecifier::Path(p)) => p.clone(),
        Some(PathSpecifier::SafeRegex(re)) => re.regex.clone(),
        _ => "/*".into(),
    };
    if let Some(rv3::route::Action::Route(a)) = &r.action {
        if let Some(rv3::route_action::ClusterSpecifier::Cluster(c)) = &a.cluster_specifier {
            if let Some((_, p, _, host)) = super::super::parse_cluster_name(c) {
                return format!("{host}:{p}{path}");
            }
        }
    }
    format!("{vs_name}:{port}{path}")
}

/// `filter_metadata.istio.config` naming the VirtualService, as istiod sets it (shows up in
/// config dumps and lets operators trace a route back to its source).
pub fn config_metadata(vs: &ConfigEntry<net::VirtualService>) -> core::Metadata {
    let path = format!(
        "/apis/networking.istio.io/v1alpha3/namespaces/{}/virtual-service/{}",
        vs.meta.namespace, vs.meta.name
    );
    let mut fields = std::collections::HashMap::new();
    fields.insert(
        "config".to_string(),
        Value {
            kind: Some(value::Kind::StringValue(path)),
        },
    );
    let mut md = core::Metadata::default();
    md.filter_metadata
        .insert("istio".to_string(), Struct { fields });
    md
}

/// One `http` entry under one match block (`translateRoute`). `None` when the match does not
/// apply here or the route cannot be expressed.
pub fn translate(
    ctx: &Ctx,
    vs: &ConfigEntry<net::VirtualService>,
    h: &net::HttpRoute,
    m: Option<&net::HttpMatchRequest>,
) -> Option<rv3::Route> {
    if let Some(m) = m {
        if m.port.is_some_and(|p| p != 0 && p != u32::from(ctx.port)) {
            return None;
        }
        if !source_matches(ctx, m) {
            return None;
        }
    }
    let mut name = h.name.clone().unwrap_or_default();
    if let Some(mn) = m.and_then(|m| m.name.as_deref()).filter(|n| !n.is_empty()) {
        name = format!("{name}.{mn}");
    }
    let mut out = rv3::Route {
        name,
        r#match: Some(route_match(m)),
        metadata: Some(config_metadata(vs)),
        stat_prefix: m.and_then(|m| m.stat_prefix.clone()).unwrap_or_default(),
        ..Default::default()
    };
    let mut authority = None;
    if let Some(hdrs) = &h.headers {
        let ops = header_ops(hdrs);
        out.request_headers_to_add = ops.request_add;
        out.response_headers_to_add = ops.response_add;
        out.request_headers_to_remove = ops.request_remove;
        out.response_headers_to_remove = ops.response_remove;
        authority = ops.authority;
    }
    let action = if let Some(r) = &h.redirect {
        rv3::route::Action::Redirect(redirect(r, ctx.port, ctx.is_tls)?)
    } else if let Some(d) = &h.direct_response {
        rv3::route::Action::DirectResponse(direct_response(d))
    } else if h.delegate.is_some() {
        warn!(
            virtual_service = %format!("{}/{}", vs.meta.namespace, vs.meta.name),
            "delegate VirtualServices are not supported yet; route skipped"
        );
        return None;
    } else {
        match route_action(ctx, h, &mut out, authority) {
            Some(a) => rv3::route::Action::Route(a),
            None => {
                warn!(
                    virtual_service = %format!("{}/{}", vs.meta.namespace, vs.meta.name),
                    "http route without destination, redirect or directResponse; skipped"
                );
                return None;
            }
        }
    };
    out.action = Some(action);
    out.decorator = Some(rv3::Decorator {
        operation: operation(&out, &vs.meta.name, ctx.port),
        propagate: None,
    });
    if let Some(f) = h.fault.as_ref().and_then(fault) {
        out.typed_per_filter_config
            .insert(FAULT_FILTER.into(), pack(&f));
    }
    if let Some(c) = &h.cors_policy {
        out.typed_per_filter_config
            .insert(CORS_FILTER.into(), pack(&cors(c)));
    }
    Some(out)
}

/// Every Envoy route of a VirtualService in order (`BuildHTTPRoutesForVirtualService`):
/// one per applicable match block, stopping after the first catch-all.
pub fn virtual_service_routes(ctx: &Ctx, vs: &ConfigEntry<net::VirtualService>) -> Vec<rv3::Route> {
    let mut out = Vec::new();
    for h in &vs.spec.http {
        let mut catch_all = false;
        if h.matches.is_empty() {
            if let Some(r) = translate(ctx, vs, h, None) {
                out.push(r);
            }
            catch_all = true;
        } else {
            for m in &h.matches {
                if let Some(r) = translate(ctx, vs, h, Some(m)) {
                    let all = is_catch_all(&r);
                    out.push(r);
                    if all {
                        catch_all = true;
                        break;
                    }
                }
            }
        }
        if catch_all {
            break;
        }
    }
    out
}
