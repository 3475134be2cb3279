//! Unit tests of the RDS mapping: exact Envoy fields for each VirtualService feature.

use super::translate::{self, Ctx};
use super::*;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, query_parameter_matcher::QueryParameterMatchSpecifier,
    redirect_action, route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier,
    Route, RouteAction,
};
use envoy_types::pb::envoy::extensions::filters::http::cors::v3::CorsPolicy;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{fault_abort, HttpFault};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
use mizzen_model::MeshSettings;
use prost::Message;

const BASE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  clusterIP: 10.0.0.10
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: multi, namespace: default}
spec:
  clusterIP: 10.0.0.11
  ports: [{name: http, port: 9080}, {name: http-admin, port: 9081}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: other}
spec:
  clusterIP: 10.0.0.12
  ports: [{name: tcp, port: 5432}]
"#;

fn push_with(extra: &str, mesh: MeshSettings) -> PushContext {
    let text = format!("{BASE}{extra}");
    let load = mizzen_config::load::load_str(std::path::Path::new("t.yaml"), &text);
    let errors: Vec<String> = load.errors().map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:#?}");
    let reg = mizzen_model::registry::from_resources(&load.resources, "cluster.local");
    PushContext::build("1".into(), mesh, Arc::new(load.resources), reg)
}

fn push(extra: &str) -> PushContext {
    push_with(extra, MeshSettings::default())
}

fn sidecar(push: &PushContext, labels: serde_json::Value) -> Proxy {
    let md = serde_json::json!({"NAMESPACE": "default", "LABELS": labels});
    let mut p = Proxy::from_node(
        "sidecar~10.9.0.1~app-1.default~default.svc.cluster.local",
        &md,
    )
    .expect("node");
    p.resolve(push);
    p
}

fn router(push: &PushContext) -> Proxy {
    let md =
        serde_json::json!({"NAMESPACE": "istio-system", "LABELS": {"istio": "ingressgateway"}});
    let mut p = Proxy::from_node(
        "router~10.9.0.2~gw-1.istio-system~istio-system.svc.cluster.local",
        &md,
    )
    .expect("node");
    p.resolve(push);
    p
}

fn vs(http: &str) -> String {
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  hosts: [reviews]\n  http:\n{http}"
    )
}

fn vhost<'a>(rc: &'a RouteConfiguration, name: &str) -> &'a VirtualHost {
    rc.virtual_hosts
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no vhost {name} in {:?}", names(rc)))
}

fn names(rc: &RouteConfiguration) -> Vec<&str> {
    rc.virtual_hosts.iter().map(|v| v.name.as_str()).collect()
}

/// Routes of `reviews:9080` for a VirtualService with the given `http` block.
fn routes(http: &str) -> Vec<Route> {
    let p = push(&vs(http));
    let sc = sidecar(&p, serde_json::json!({"app": "productpage"}));
    let rc = sidecar_outbound(&sc, &p, 9080);
    vhost(&rc, "reviews.default.svc.cluster.local:9080")
        .routes
        .clone()
}

fn action(r: &Route) -> &RouteAction {
    match &r.action {
        Some(Action::Route(a)) => a,
        other => panic!("not a route action: {other:?}"),
    }
}

fn cluster(r: &Route) -> &str {
    match &action(r).cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) => c,
        other => panic!("not a single cluster: {other:?}"),
    }
}

fn secs(s: i64) -> Option<envoy_types::pb::google::protobuf::Duration> {
    Some(envoy_types::pb::google::protobuf::Duration {
        seconds: s,
        nanos: 0,
    })
}

// ------------------------------------------------------------------ sidecar shape

#[test]
fn sidecar_default_virtual_hosts_like_istiod() {
    let p = push("");
    let sc = sidecar(&p, serde_json::json!({}));
    assert_eq!(route_names(&sc, &p), vec!["9080", "9081"]);
    let rc = sidecar_outbound(&sc, &p, 9080);
    assert_eq!(rc.name, "9080");
    assert_eq!(rc.validate_clusters, Some(BoolValue { value: false }));
    assert!(rc.ignore_port_in_host_matching);
    assert_eq!(
        names(&rc),
        vec![
            "multi.default.svc.cluster.local:9080",
            "reviews.default.svc.cluster.local:9080",
            "allow_any"
        ]
    );
    let vh = vhost(&rc, "reviews.default.svc.cluster.local:9080");
    assert_eq!(
        vh.domains,
        vec![
            "reviews.default.svc.cluster.local",
            "reviews.default.svc.cluster.local:9080",
            "reviews",
            "reviews:9080",
            "reviews.default.svc",
            "reviews.default.svc:9080",
            "reviews.default",
            "reviews.default:9080",
            "10.0.0.10",
            "10.0.0.10:9080",
        ]
    );
    assert!(vh.include_request_attempt_count);
    let r = &vh.routes[0];
    assert_eq!(r.name, "default");
    assert_eq!(
        r.r#match.as_ref().and_then(|m| m.path_specifier.clone()),
        Some(PathSpecifier::Prefix("/".into()))
    );
    assert_eq!(
        cluster(r),
        "outbound|9080||reviews.default.svc.cluster.local"
    );
    let a = action(r);
    assert_eq!(a.timeout, secs(0));
    let retry = a.retry_policy.as_ref().expect("default retry policy");
    assert_eq!(retry.num_retries, Some(UInt32Value { value: 2 }));
    assert_eq!(
        retry.retry_on,
        "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
    );
    assert_eq!(retry.retriable_status_codes, vec![503]);
    assert_eq!(retry.host_selection_retry_max_attempts, 5);
    assert_eq!(
        retry.retry_host_predicate[0].name,
        "envoy.retry_host_predicates.previous_hosts"
    );
    assert_eq!(
        r.decorator.as_ref().map(|d| d.operation.as_str()),
        Some("reviews.default.svc.cluster.local:9080/*")
    );
    let any = rc.virtual_hosts.last().expect("catch-all");
    assert_eq!(any.domains, vec!["*"]);
    assert_eq!(cluster(&any.routes[0]), "PassthroughCluster");
    assert_eq!(action(&any.routes[0]).timeout, secs(0));
}

#[test]
fn other_namespace_short_names_and_registry_only() {
    let extra = r#"---
apiVersion: v1
kind: Service
metadata: {name: details, namespace: other}
spec:
  clusterIP: 10.0.0.20
  ports: [{name: http, port: 9080}]
"#;
    let mesh = MeshSettings {
        outbound_mode: net::OutboundMode::RegistryOnly,
        ..Default::default()
    };
    let p = push_with(extra, mesh);
    let sc = sidecar(&p, serde_json::json!({}));
    let rc = sidecar_outbound(&sc, &p, 9080);
    let vh = vhost(&rc, "details.other.svc.cluster.local:9080");
    assert_eq!(
        vh.domains,
        vec![
            "details.other.svc.cluster.local",
            "details.other.svc.cluster.local:9080",
            "details.other",
            "details.other:9080",
            "details.other.svc",
            "details.other.svc:9080",
            "10.0.0.20",
            "10.0.0.20:9080",
        ]
    );
    let last = rc.virtual_hosts.last().expect("block_all");
    assert_eq!(last.name, "block_all");
    match &last.routes[0].action {
        Some(Action::DirectResponse(d)) => assert_eq!(d.status, 502),
        other => panic!("{other:?}"),
    }
}

#[test]
fn tcp_ports_get_no_route_config_and_unknown_names_none() {
    let p = push("");
    let sc = sidecar(&p, serde_json::json!({}));
    assert!(!route_names(&sc, &p).contains(&"5432".to_string()));
    assert!(generate(&sc, &p, "not-a-route").is_none());
    assert!(generate(&sc, &p, "09080").is_none());
    assert_eq!(
        generate(&sc, &p, "9080").map(|r| r.name),
        Some("9080".into())
    );
}

#[test]
fn non_service_vs_hosts_get_virtual_hosts() {
    let extra = r#"---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r, namespace: default}
spec:
  hosts: [reviews, reviews.example.com]
  http:
  - route: [{destination: {host: reviews}}]
"#;
    let p = push(extra);
    let sc = sidecar(&p, serde_json::json!({}));
    let rc = sidecar_outbound(&sc, &p, 9080);
    let vh = vhost(&rc, "reviews.example.com:9080");
    assert_eq!(
        vh.domains,
        vec!["reviews.example.com", "reviews.example.com:9080"]
    );
    assert_eq!(
        cluster(&vh.routes[0]),
        "outbound|9080||reviews.default.svc.cluster.local"
    );
    // Not on a port where the VS matches no service (istiod's port-80 exception aside).
    let rc81 = sidecar_outbound(&sc, &p, 9081);
    assert!(!names(&rc81).contains(&"reviews.example.com:9081"));
}

// ------------------------------------------------------------------ matches

#[test]
fn match_fields() {
    let rs = routes(
        r#"  - name: r
    match:
    - name: m
      uri: {exact: /a}
      ignoreUriCase: true
      headers: {x-b: {prefix: p}, x-a: {exact: e}}
      withoutHeaders: {x-c: {regex: "c.*"}}
      queryParams: {q: {exact: v}}
      method: {exact: GET}
      authority: {regex: "rev.*"}
      scheme: {exact: https}
      statPrefix: sp
    route: [{destination: {host: reviews}}]
"#,
    );
    let r = &rs[0];
    assert_eq!(r.name, "r.m");
    assert_eq!(r.stat_prefix, "sp");
    let m = r.r#match.as_ref().expect("match");
    assert_eq!(m.path_specifier, Some(PathSpecifier::Path("/a".into())));
    assert_eq!(m.case_sensitive, Some(BoolValue { value: false }));
    let hdr: Vec<(&str, bool, bool)> = m
        .headers
        .iter()
        .map(|h| {
            (
                h.name.as_str(),
                h.invert_match,
                h.treat_missing_header_as_empty,
            )
        })
        .collect();
    assert_eq!(
        hdr,
        vec![
            ("x-a", false, false),
            ("x-b", false, false),
            ("x-c", true, true),
            (":method", false, false),
            (":authority", false, false),
            (":scheme", false, false),
        ]
    );
    let pat = |i: usize| match &m.headers[i].header_match_specifier {
        Some(HeaderMatchSpecifier::StringMatch(s)) => s.match_pattern.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(pat(0), Some(MatchPattern::Exact("e".into())));
    assert_eq!(pat(1), Some(MatchPattern::Prefix("p".into())));
    assert!(matches!(pat(2), Some(MatchPattern::SafeRegex(re)) if re.regex == "c.*"));
    assert!(matches!(
        &m.query_parameters[0].query_parameter_match_specifier,
        Some(QueryParameterMatchSpecifier::StringMatch(s)) if s.match_pattern == Some(MatchPattern::Exact("v".into()))
    ));
    // Catch-all routes stop the list; the next http entry is not emitted.
    assert_eq!(rs.len(), 1);
}

#[test]
fn present_match_for_star_regex_and_jwt_claims() {
    // `regex: "*"` and JWT claim headers are rejected for sidecar VS by validation; the
    // translation itself still maps them the way istiod does.
    let mut m = net::HttpMatchRequest::default();
    m.headers
        .insert("x-any".into(), net::StringMatch::Regex("*".into()));
    m.without_headers
        .insert("x-none".into(), net::StringMatch::Regex("*".into()));
    m.headers.insert(
        "@request.auth.claims[group][id]".into(),
        net::StringMatch::Exact("g".into()),
    );
    let rm = translate::route_match(Some(&m));
    assert_eq!(
        rm.headers[0].header_match_specifier,
        Some(HeaderMatchSpecifier::PresentMatch(true))
    );
    assert!(rm.headers[1].invert_match);
    assert!(!rm.headers[1].treat_missing_header_as_empty);
    let mut odd = net::HttpMatchRequest::default();
    odd.headers.insert(
        "@request.auth.claimé".into(),
        net::StringMatch::Exact("x".into()),
    );
    odd.headers
        .insert("é".into(), net::StringMatch::Exact("x".into()));
    assert_eq!(translate::route_match(Some(&odd)).headers.len(), 2);
    let md = &rm.dynamic_metadata[0];
    assert_eq!(md.filter, "istio_authn");
    assert_eq!(md.path.len(), 3);
}

#[test]
fn source_labels_port_gateways_and_namespace_filter_matches() {
    let rs = routes(
        r#"  - match:
    - {uri: {prefix: /labels}, sourceLabels: {app: productpage}}
    - {uri: {prefix: /other-labels}, sourceLabels: {app: nope}}
    - {uri: {prefix: /port}, port: 9080}
    - {uri: {prefix: /other-port}, port: 9081}
    - {uri: {prefix: /mesh}, gateways: [mesh]}
    - {uri: {prefix: /gw}, gateways: [istio-system/gw]}
    - {uri: {prefix: /ns}, sourceNamespace: default}
    - {uri: {prefix: /other-ns}, sourceNamespace: other}
    route: [{destination: {host: reviews}}]
"#,
    );
    let paths: Vec<PathSpecifier> = rs
        .iter()
        .filter_map(|r| r.r#match.as_ref()?.path_specifier.clone())
        .collect();
    let want: Vec<PathSpecifier> = ["/labels", "/port", "/mesh", "/ns"]
        .iter()
        .map(|p| PathSpecifier::Prefix(p.to_string()))
        .collect();
    assert_eq!(paths, want);
}

// ------------------------------------------------------------------ destinations

#[test]
fn destinations_weights_ports_and_per_destination_headers() {
    let rs = routes(
        r#"  - match: [{uri: {prefix: /w}}]
    route:
    - destination: {host: reviews, subset: v1}
      weight: 75
      headers: {request: {set: {x-v: "1"}, add: {host: v1.example}}, response: {remove: [x-r]}}
    - destination: {host: multi}
      weight: 25
    - destination: {host: reviews, subset: v3}
      weight: 0
  - match: [{uri: {prefix: /one}}]
    route:
    - destination: {host: multi, port: {number: 9081}}
      headers: {request: {add: {x-one: "1", ":authority": one.example}}}
  - match: [{uri: {prefix: /unknown}}]
    route: [{destination: {host: nowhere.example.com}}]
"#,
    );
    let Some(ClusterSpecifier::WeightedClusters(w)) = &action(&rs[0]).cluster_specifier else {
        panic!("weighted expected");
    };
    let got: Vec<(&str, u32)> = w
        .clusters
        .iter()
        .map(|c| (c.name.as_str(), c.weight.map(|w| w.value).unwrap_or(0)))
        .collect();
    // Multi-port service without destination port: the listener port.
    assert_eq!(
        got,
        vec![
            ("outbound|9080|v1|reviews.default.svc.cluster.local", 75),
            ("outbound|9080||multi.default.svc.cluster.local", 25),
        ]
    );
    let c0 = &w.clusters[0];
    assert_eq!(c0.request_headers_to_add.len(), 1);
    assert_eq!(
        c0.request_headers_to_add[0].append_action,
        core::header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32
    );
    assert_eq!(c0.response_headers_to_remove, vec!["x-r"]);
    assert!(c0.host_rewrite_specifier.is_some());

    assert_eq!(
        cluster(&rs[1]),
        "outbound|9081||multi.default.svc.cluster.local"
    );
    assert_eq!(rs[1].request_headers_to_add.len(), 1);
    assert_eq!(
        rs[1].request_headers_to_add[0].append_action,
        core::header_value_option::HeaderAppendAction::AppendIfExistsOrAdd as i32
    );
    assert_eq!(
        action(&rs[1]).host_rewrite_specifier,
        Some(rv3::route_action::HostRewriteSpecifier::HostRewriteLiteral(
            "one.example".into()
        ))
    );
    // Not in the registry: istiod still names the cluster with the listener port.
    assert_eq!(cluster(&rs[2]), "outbound|9080||nowhere.example.com");
}

#[test]
fn route_headers_rewrite_timeout() {
    let rs = routes(
        r#"  - match: [{uri: {prefix: /p}}]
    rewrite: {uri: /q, authority: a.example}
    timeout: 1.5s
    headers:
      request: {set: {x-s: s}, add: {x-a: a}, remove: [x-r]}
      response: {set: {x-rs: s}, add: {x-ra: a}, remove: [x-rr]}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {exact: /e}}]
    rewrite: {uri: /full}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /rx}}]
    rewrite: {uriRegexRewrite: {match: "^/rx/(.*)$", rewrite: "/\\1"}}
    route: [{destination: {host: reviews}}]
"#,
    );
    let r = &rs[0];
    let a = action(r);
    assert_eq!(a.prefix_rewrite, "/q");
    assert_eq!(
        a.host_rewrite_specifier,
        Some(rv3::route_action::HostRewriteSpecifier::HostRewriteLiteral(
            "a.example".into()
        ))
    );
    assert_eq!(
        a.timeout,
        Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 1,
            nanos: 500_000_000
        })
    );
    // max_stream_duration would make Envoy ignore `timeout` ("new timeouts"); the
    // deprecated max_grpc_timeout (istiod's choice) is left out too.
    assert!(a.max_stream_duration.is_none());
    #[allow(deprecated)]
    let grpc_max = a.max_grpc_timeout;
    assert_eq!(grpc_max, None);
    let keys: Vec<(&str, i32)> = r
        .request_headers_to_add
        .iter()
        .map(|h| {
            (
                h.header.as_ref().map(|h| h.key.as_str()).unwrap_or(""),
                h.append_action,
            )
        })
        .collect();
    assert_eq!(
        keys,
        vec![
            (
                "x-s",
                core::header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32
            ),
            (
                "x-a",
                core::header_value_option::HeaderAppendAction::AppendIfExistsOrAdd as i32
            ),
        ]
    );
    assert_eq!(r.request_headers_to_remove, vec!["x-r"]);
    assert_eq!(r.response_headers_to_add.len(), 2);
    assert_eq!(r.response_headers_to_remove, vec!["x-rr"]);
    // Exact match + rewrite: prefix_rewrite replaces the whole (matched) path, as istiod.
    assert_eq!(action(&rs[1]).prefix_rewrite, "/full");
    let rr = action(&rs[2])
        .regex_rewrite
        .as_ref()
        .expect("regex rewrite");
    assert_eq!(
        rr.pattern.as_ref().map(|p| p.regex.as_str()),
        Some("^/rx/(.*)$")
    );
    assert_eq!(rr.substitution, "/\\1");
}

// ------------------------------------------------------------------ other actions

#[test]
fn redirects_and_direct_responses() {
    let rs = routes(
        r#"  - match: [{uri: {prefix: /a}}]
    redirect: {uri: /b, authority: b.example, port: 8443, scheme: https, redirectCode: 302}
  - match: [{uri: {prefix: /c}}]
    redirect: {uri: /d}
  - match: [{uri: {prefix: /e}}]
    redirect: {derivePort: FROM_REQUEST_PORT, redirectCode: 307}
  - match: [{uri: {prefix: /f}}]
    redirect: {port: 80, redirectCode: 308}
  - match: [{uri: {prefix: /g}}]
    redirect: {uri: /h, redirectCode: 305}
  - match: [{uri: {prefix: /i}}]
    directResponse: {status: 418, body: {string: tea}}
  - match: [{uri: {prefix: /j}}]
    directResponse: {status: 200, body: {bytes: aGk=}}
"#,
    );
    let redir = |i: usize| match &rs[i].action {
        Some(Action::Redirect(r)) => r.clone(),
        other => panic!("{other:?}"),
    };
    let r0 = redir(0);
    assert_eq!(r0.host_redirect, "b.example");
    assert_eq!(r0.port_redirect, 8443);
    assert_eq!(
        r0.response_code,
        redirect_action::RedirectResponseCode::Found as i32
    );
    assert_eq!(
        r0.path_rewrite_specifier,
        Some(redirect_action::PathRewriteSpecifier::PathRedirect(
            "/b".into()
        ))
    );
    assert_eq!(
        r0.scheme_rewrite_specifier,
        Some(redirect_action::SchemeRewriteSpecifier::SchemeRedirect(
            "https".into()
        ))
    );
    assert_eq!(
        redir(1).response_code,
        redirect_action::RedirectResponseCode::MovedPermanently as i32
    );
    let r2 = redir(2);
    assert_eq!(r2.port_redirect, 9080);
    assert_eq!(
        r2.response_code,
        redirect_action::RedirectResponseCode::TemporaryRedirect as i32
    );
    // :80 over http is implicit.
    assert_eq!(redir(3).port_redirect, 0);
    // 305 has no Envoy equivalent: route dropped (istiod would emit an action-less route).
    let r4 = match &rs[4].action {
        Some(Action::DirectResponse(d)) => d.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(r4.status, 418);
    assert_eq!(
        r4.body.and_then(|b| b.specifier),
        Some(core::data_source::Specifier::InlineString("tea".into()))
    );
    match &rs[5].action {
        Some(Action::DirectResponse(d)) => assert_eq!(
            d.body.clone().and_then(|b| b.specifier),
            Some(core::data_source::Specifier::InlineBytes(b"hi".to_vec()))
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn retries() {
    let rs = routes(
        r#"  - match: [{uri: {prefix: /a}}]
    retries: {attempts: 4, perTryTimeout: 2s, retryOn: "gateway-error,503,429"}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /b}}]
    retries: {attempts: 0}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /c}}]
    retries: {attempts: 1, retryOn: "503"}
    route: [{destination: {host: reviews}}]
"#,
    );
    let p = action(&rs[0]).retry_policy.as_ref().expect("retry");
    assert_eq!(p.num_retries, Some(UInt32Value { value: 4 }));
    assert_eq!(p.per_try_timeout, secs(2));
    assert_eq!(p.retry_on, "gateway-error,retriable-status-codes");
    assert_eq!(p.retriable_status_codes, vec![503, 429]);
    assert_eq!(p.host_selection_retry_max_attempts, 5);
    assert!(action(&rs[1]).retry_policy.is_none());
    let p2 = action(&rs[2]).retry_policy.as_ref().expect("retry");
    assert_eq!(p2.retry_on, "retriable-status-codes");
    assert_eq!(
        translate::parse_retry_on(" 5xx , 503,,x "),
        ("5xx,x".into(), vec![503])
    );
}

#[test]
fn fault_mirror_cors() {
    let rs = routes(
        r#"  - match: [{uri: {prefix: /f}}]
    fault:
      delay: {fixedDelay: 2s, percentage: {value: 12.5}}
      abort: {grpcStatus: NOT_FOUND, percentage: {value: 50}}
    mirror: {host: multi, port: {number: 9081}}
    mirrorPercentage: {value: 25}
    corsPolicy:
      allowOrigins: [{exact: "https://x"}]
      allowMethods: [GET, PUT]
      maxAge: 1m
      allowCredentials: false
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /m}}]
    mirrors:
    - destination: {host: reviews, subset: shadow}
    - destination: {host: reviews}
      percentage: {value: 0}
    route: [{destination: {host: reviews}}]
"#,
    );
    let r = &rs[0];
    let any = r
        .typed_per_filter_config
        .get("envoy.filters.http.fault")
        .expect("fault");
    assert_eq!(
        any.type_url,
        "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
    );
    let f = HttpFault::decode(any.value.as_slice()).expect("decode");
    let d = f.delay.expect("delay");
    let pct = d.percentage.expect("pct");
    assert_eq!(pct.numerator, 125_000);
    assert_eq!(pct.denominator, DenominatorType::Million as i32);
    let a = f.abort.expect("abort");
    assert_eq!(a.error_type, Some(fault_abort::ErrorType::GrpcStatus(5)));
    assert_eq!(a.percentage.map(|p| p.numerator), Some(500_000));

    let mut m = action(r).request_mirror_policies.clone();
    assert_eq!(m.len(), 1);
    // mirrors: a 0% entry is dropped, no percentage means 100%.
    m.extend(action(&rs[1]).request_mirror_policies.iter().cloned());
    assert_eq!(m.len(), 2);
    assert_eq!(
        m[0].cluster,
        "outbound|9081||multi.default.svc.cluster.local"
    );
    let frac = m[0]
        .runtime_fraction
        .as_ref()
        .and_then(|f| f.default_value)
        .expect("fraction");
    assert_eq!(
        (frac.numerator, frac.denominator),
        (250_000, DenominatorType::Million as i32)
    );
    assert_eq!(
        m[1].cluster,
        "outbound|9080|shadow|reviews.default.svc.cluster.local"
    );
    let frac1 = m[1]
        .runtime_fraction
        .as_ref()
        .and_then(|f| f.default_value)
        .expect("fraction");
    assert_eq!(
        (frac1.numerator, frac1.denominator),
        (100, DenominatorType::Hundred as i32)
    );
    assert_eq!(m[1].trace_sampled, Some(BoolValue { value: false }));

    let c = r
        .typed_per_filter_config
        .get("envoy.filters.http.cors")
        .expect("cors");
    let cp = CorsPolicy::decode(c.value.as_slice()).expect("decode");
    assert_eq!(cp.allow_methods, "GET,PUT");
    assert_eq!(cp.max_age, "60");
    assert_eq!(cp.allow_credentials, Some(BoolValue { value: false }));
    assert_eq!(
        cp.forward_not_matching_preflights,
        Some(BoolValue { value: true })
    );
    assert_eq!(
        cp.allow_origin_string_match[0].match_pattern,
        Some(MatchPattern::Exact("https://x".into()))
    );
}

#[test]
fn consistent_hash_from_destination_rule() {
    let extra = r#"---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
  subsets:
  - name: v1
    labels: {v: "1"}
    trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}
"#;
    let p = push(&format!(
        "{extra}{}",
        vs("  - route: [{destination: {host: reviews, subset: v1}}]\n")
    ));
    let sc = sidecar(&p, serde_json::json!({}));
    let rc = sidecar_outbound(&sc, &p, 9080);
    let r = &vhost(&rc, "reviews.default.svc.cluster.local:9080").routes[0];
    let a = action(r);
    assert!(matches!(
        a.hash_policy[0].policy_specifier,
        Some(rv3::route_action::hash_policy::PolicySpecifier::ConnectionProperties(ref c)) if c.source_ip
    ));
    // Consistent hash: retries stay on the same host.
    assert!(a
        .retry_policy
        .as_ref()
        .is_some_and(|p| p.retry_host_predicate.is_empty()));
}

#[test]
fn multiple_virtual_services_append_in_config_order() {
    let extra = format!(
        "{}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: second, namespace: default}}\nspec:\n  hosts: [reviews.default.svc.cluster.local]\n  http:\n  - match: [{{uri: {{prefix: /second}}}}]\n    route: [{{destination: {{host: reviews}}}}]\n",
        vs("  - match: [{uri: {prefix: /first}}]\n    route: [{destination: {host: reviews}}]\n")
    );
    let p = push(&extra);
    let sc = sidecar(&p, serde_json::json!({}));
    let rc = sidecar_outbound(&sc, &p, 9080);
    let vh = vhost(&rc, "reviews.default.svc.cluster.local:9080");
    let paths: Vec<_> = vh
        .routes
        .iter()
        .filter_map(|r| r.r#match.as_ref()?.path_specifier.clone())
        .collect();
    assert_eq!(
        paths,
        vec![
            PathSpecifier::Prefix("/first".into()),
            PathSpecifier::Prefix("/second".into())
        ]
    );
}

// ------------------------------------------------------------------ gateway

const GATEWAY: &str = r#"---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*.example.com", "other/hidden.example.com"]
    tls: {httpsRedirect: true}
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: SIMPLE, credentialName: c}
  - port: {number: 8443, name: tls, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: PASSTHROUGH}
  - port: {number: 8000, name: http-none, protocol: HTTP}
    hosts: [none.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: front, namespace: default}
spec:
  hosts: [a.example.com, hidden.example.com, b.other.com]
  gateways: [istio-system/gw]
  http:
  - match:
    - {uri: {prefix: /api}, port: 443}
    - {uri: {prefix: /gw}, gateways: [istio-system/gw]}
    - {uri: {prefix: /mesh}, gateways: [mesh]}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /r}}]
    redirect: {port: 443}
  - route: [{destination: {host: multi, port: {number: 9081}}}]
"#;

#[test]
fn gateway_virtual_hosts() {
    let p = push(GATEWAY);
    let gw = router(&p);
    assert_eq!(
        route_names(&gw, &p),
        vec!["http.443", "http.80", "http.8000"]
    );
    let rc = gateway(&gw, &p, 80);
    assert_eq!(rc.name, "http.80");
    // `other/hidden.example.com` is only for VirtualServices in namespace `other`, but
    // `*.example.com` admits it (the more specific host is kept); the wildcard itself gets a
    // redirect-only vhost from httpsRedirect; `b.other.com` matches no server host.
    assert_eq!(
        names(&rc),
        vec![
            "*.example.com:80",
            "a.example.com:80",
            "hidden.example.com:80"
        ]
    );
    assert!(vhost(&rc, "*.example.com:80").routes.is_empty());
    let vh = vhost(&rc, "a.example.com:80");
    assert_eq!(vh.domains, vec!["a.example.com", "a.example.com:*"]);
    assert_eq!(
        vh.require_tls,
        rv3::virtual_host::TlsRequirementType::All as i32
    );
    let paths: Vec<_> = vh
        .routes
        .iter()
        .filter_map(|r| r.r#match.as_ref()?.path_specifier.clone())
        .collect();
    assert_eq!(
        paths,
        vec![
            PathSpecifier::Prefix("/gw".into()),
            PathSpecifier::Prefix("/r".into()),
            PathSpecifier::Prefix("/".into())
        ]
    );
    assert_eq!(
        cluster(&vh.routes[0]),
        "outbound|9080||reviews.default.svc.cluster.local"
    );
    assert_eq!(
        cluster(&vh.routes[2]),
        "outbound|9081||multi.default.svc.cluster.local"
    );

    let rc443 = gateway(&gw, &p, 443);
    assert_eq!(
        names(&rc443),
        vec![
            "a.example.com:443",
            "b.other.com:443",
            "hidden.example.com:443"
        ]
    );
    let r = &vhost(&rc443, "a.example.com:443").routes;
    assert_eq!(
        r[0].r#match.as_ref().and_then(|m| m.path_specifier.clone()),
        Some(PathSpecifier::Prefix("/api".into()))
    );
    // TLS server: redirect to port 443 keeps https implicit.
    match &r[2].action {
        Some(Action::Redirect(rd)) => assert_eq!(rd.port_redirect, 0),
        other => panic!("{other:?}"),
    }

    let empty = gateway(&gw, &p, 8000);
    assert_eq!(names(&empty), vec!["blackhole:8000"]);
    assert_eq!(empty.virtual_hosts[0].domains, vec!["*"]);
    assert!(empty.virtual_hosts[0].routes.is_empty());
    // No server on the port at all: an empty config, as istiod answers.
    assert!(gateway(&gw, &p, 1234).virtual_hosts.is_empty());
    assert_eq!(
        generate(&gw, &p, "http.443").map(|r| r.name),
        Some("http.443".into())
    );
}

#[test]
fn base64_and_percent_helpers() {
    assert_eq!(translate::base64_decode("aGVsbG8="), b"hello");
    assert_eq!(translate::base64_decode("aGVsbG8"), b"hello");
    assert_eq!(translate::base64_decode(""), b"");
    assert_eq!(translate::percent_per_million(0.0001).numerator, 1);
    assert_eq!(translate::percent_per_million(1000.0).numerator, 1_000_000);
    assert_eq!(translate::percent_per_hundred(-5).numerator, 0);
}

#[test]
fn unused_ctx_fields_compile() {
    // Ctx is public to the module: building one by hand must stay possible for callers
    // that translate a single route (e.g. debug endpoints).
    let p = push("");
    let sc = sidecar(&p, serde_json::json!({}));
    let gws = vec!["mesh".to_string()];
    let ctx = Ctx {
        proxy: &sc,
        push: &p,
        port: 9080,
        gateways: &gws,
        is_tls: false,
    };
    let h = net::HttpRoute {
        route: vec![net::HttpRouteDestination {
            destination: net::Destination {
                host: "reviews.default.svc.cluster.local".into(),
                ..Default::default()
            },
            ..Default::default()
        }],
        ..Default::default()
    };
    let entry = mizzen_model::ConfigEntry {
        meta: mizzen_config::Meta {
            name: "x".into(),
            namespace: "default".into(),
            ..Default::default()
        },
        spec: net::VirtualService::default(),
    };
    let r = translate::translate(&ctx, &entry, &h, None).expect("route");
    assert_eq!(
        cluster(&r),
        "outbound|9080||reviews.default.svc.cluster.local"
    );
    assert!(translate::is_catch_all(&r));
}
