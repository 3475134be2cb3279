//! RDS output checked by Envoy itself: every VirtualService feature the generator maps is
//! put through `envoy --mode validate` inside a static bootstrap (binary proto), so anything
//! Envoy would NACK fails this test with Envoy's own message.

mod common;

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, FilterChain, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    route as rroute, route_action, RouteConfiguration,
};
use envoy_types::pb::envoy::extensions::filters::http::cors::v3::Cors;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, http_filter, HttpConnectionManager, HttpFilter,
};
use envoy_types::pb::google::protobuf::Duration;
use mizzen_model::{MeshSettings, Proxy, PushContext};
use mizzen_xds::any::pack;
use mizzen_xds::gen::route;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

const CONFIG: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  clusterIP: 10.0.0.10
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default}
spec:
  clusterIP: 10.0.0.11
  ports: [{name: http, port: 9080}, {name: grpc-api, port: 9090}]
---
apiVersion: v1
kind: Service
metadata: {name: details, namespace: other}
spec:
  clusterIP: 10.0.0.12
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.0.0.13
  ports: [{name: http-web, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: default}
spec:
  clusterIP: None
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: auto, namespace: default}
spec:
  clusterIP: 10.0.0.14
  ports: [{name: web, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: default}
spec:
  hosts: [api.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: default}
spec:
  host: ratings
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpCookie: {name: user, ttl: 10s, path: /}}
  subsets:
  - {name: v1, labels: {version: v1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpHeaderName: x-user}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - name: exact
    match:
    - name: m1
      uri: {exact: /exact}
      ignoreUriCase: true
      headers:
        x-exact: {exact: a}
        x-prefix: {prefix: b}
        x-regex: {regex: "c+"}
        x-present: {regex: ".+"}
      withoutHeaders:
        x-not: {exact: z}
        x-absent: {prefix: y}
      queryParams:
        q1: {exact: v}
        q2: {regex: "^v[0-9]+$"}
        q3: {prefix: p}
      method: {exact: GET}
      authority: {prefix: reviews}
      scheme: {exact: http}
      statPrefix: exact_route
    route:
    - destination: {host: reviews, subset: v1}
      headers:
        request: {set: {x-dest: one}, add: {host: rewritten.example}}
    rewrite: {uri: /new}
    timeout: 2s
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "5xx,503,reset", retryRemoteLocalities: true}
    headers:
      request:
        set: {x-set: s}
        add: {x-add: a}
        remove: [x-remove]
      response:
        set: {x-rset: s}
        add: {x-radd: a}
        remove: [x-rremove]
  - name: split
    match:
    - uri: {prefix: /split}
      sourceLabels: {app: productpage}
    - uri: {regex: "/split-[a-z]+"}
      port: 9080
    - uri: {prefix: /never}
      port: 1234
    - uri: {prefix: /gw-only}
      gateways: [some-gateway]
    - uri: {prefix: /ns-only}
      sourceNamespace: default
    route:
    - destination: {host: reviews, subset: v1}
      weight: 90
      headers:
        request: {set: {x-canary: "no"}, add: {":authority": split.example}}
        response: {remove: [x-internal]}
    - destination: {host: reviews, subset: v2, port: {number: 9080}}
      weight: 10
    - destination: {host: reviews, subset: v3}
      weight: 0
    mirror: {host: ratings, port: {number: 9080}}
    mirrorPercentage: {value: 12.5}
    retries: {attempts: 0}
  - name: mirrors
    match: [{uri: {prefix: /mirrors}}]
    route: [{destination: {host: reviews}}]
    mirrors:
    - destination: {host: ratings, port: {number: 9080}}
      percentage: {value: 50}
    - destination: {host: details.other.svc.cluster.local}
    - destination: {host: not-in-registry.example.com}
      percentage: {value: 0}
    mirrorPercent: 30
  - name: legacy-mirror
    match: [{uri: {prefix: /legacy-mirror}}]
    route: [{destination: {host: reviews}}]
    mirror: {host: ratings, port: {number: 9080}}
    mirrorPercent: 30
  - name: redirect
    match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, authority: new.example.com, port: 8443, scheme: https, redirectCode: 308}
  - name: redirect-derive
    match: [{uri: {prefix: /derive}}]
    redirect: {authority: other.example.com, derivePort: FROM_REQUEST_PORT, redirectCode: 302}
  - name: redirect-default-port
    match: [{uri: {prefix: /plain}}]
    redirect: {port: 80, redirectCode: 307}
  - name: redirect-303
    match: [{uri: {prefix: /see}}]
    redirect: {uri: /other, redirectCode: 303}
  - name: redirect-301
    match: [{uri: {prefix: /moved}}]
    redirect: {uri: /moved-here}
  - name: direct
    match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {string: "I'm a teapot"}}
  - name: direct-bytes
    match: [{uri: {exact: /bytes}}]
    directResponse: {status: 200, body: {bytes: aGVsbG8=}}
  - name: direct-nobody
    match: [{uri: {exact: /nobody}}]
    directResponse: {status: 503}
  - name: regex-rewrite
    match: [{uri: {prefix: /rr}}]
    rewrite:
      uriRegexRewrite: {match: "^/rr/(.*)$", rewrite: "/\\1"}
      authority: internal.example
    route: [{destination: {host: reviews}}]
  - name: exact-rewrite
    match: [{uri: {regex: "/re/[0-9]+"}}]
    rewrite: {uri: /re}
    route: [{destination: {host: reviews}}]
  - name: fault
    match: [{uri: {prefix: /fault}}]
    fault:
      delay: {fixedDelay: 5s, percentage: {value: 0.1}}
      abort: {httpStatus: 503, percentage: {value: 33.3}}
    route: [{destination: {host: reviews}}]
  - name: fault-grpc
    match: [{uri: {prefix: /fault-grpc}}]
    fault:
      delay: {fixedDelay: 1s, percent: 20}
      abort: {grpcStatus: UNAVAILABLE}
    route: [{destination: {host: reviews}}]
  - name: cors
    match: [{uri: {prefix: /cors}}]
    corsPolicy:
      allowOrigins: [{exact: "https://a.example"}, {prefix: "https://b."}, {regex: ".*\\.c\\.example"}]
      allowMethods: [GET, POST]
      allowHeaders: [x-a, x-b]
      exposeHeaders: [x-c]
      maxAge: 24h
      allowCredentials: true
      unmatchedPreflights: IGNORE
    route: [{destination: {host: reviews}}]
  - name: cors-legacy
    match: [{uri: {prefix: /cors-legacy}}]
    corsPolicy:
      allowOrigin: ["https://legacy.example"]
      allowMethods: [GET]
    route: [{destination: {host: reviews}}]
  - name: retry-codes-only
    match: [{uri: {prefix: /codes}}]
    retries: {attempts: 2, retryOn: "503,504"}
    route: [{destination: {host: reviews}}]
  - name: catch-all
    route:
    - destination: {host: reviews, subset: v2}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews-extra, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /extra}}]
    route: [{destination: {host: reviews}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings, ratings.example.com]
  http:
  - route:
    - destination: {host: ratings}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookinfo-com, namespace: default}
spec:
  hosts: [bookinfo.com, "*.bookinfo.com"]
  http:
  - route:
    - destination: {host: web}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: wildcard-svc, namespace: default}
spec:
  hosts: ["*.example.com"]
  http:
  - timeout: 3s
    route:
    - destination: {host: api.example.com}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: ingress, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
  - port: {number: 8080, name: http-redirect, protocol: HTTP}
    hosts: [secure.example.com, "default/shop.example.com"]
    tls: {httpsRedirect: true}
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ["*.example.com"]
    tls: {mode: SIMPLE, credentialName: cert}
  - port: {number: 9000, name: http-empty, protocol: HTTP}
    hosts: [nothing.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: front, namespace: default}
spec:
  hosts: [shop.example.com, "*.bookinfo.com"]
  gateways: [istio-system/ingress]
  http:
  - match:
    - uri: {prefix: /api}
      gateways: [istio-system/ingress]
      headers:
        "@request.auth.claims.group": {exact: admin}
        "@request.auth.claims[nested][key]": {prefix: a}
      withoutHeaders:
        "@request.auth.claims.banned": {exact: "true"}
    - uri: {prefix: /mesh-only}
      gateways: [mesh]
    - uri: {prefix: /p80}
      port: 80
    route:
    - destination: {host: reviews, port: {number: 9080}}
    timeout: 10s
  - match: [{uri: {prefix: /moved}}]
    redirect: {uri: /new, derivePort: FROM_REQUEST_PORT}
  - route:
    - destination: {host: web}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: front-extra, namespace: default}
spec:
  hosts: [shop.example.com]
  gateways: [istio-system/ingress]
  http:
  - match: [{uri: {prefix: /extra}}]
    route:
    - destination: {host: ratings, port: {number: 9080}}
"#;

fn push(extra: &str, mesh: MeshSettings) -> PushContext {
    let text = format!("{CONFIG}{extra}");
    let load = mizzen_config::load::load_str(Path::new("route_envoy.yaml"), &text);
    let errors: Vec<String> = load.errors().map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "fixture rejected: {errors:#?}");
    let registry = mizzen_model::registry::from_resources(&load.resources, "cluster.local");
    PushContext::build("1".into(), mesh, Arc::new(load.resources), registry)
}

fn proxy(push: &PushContext, id: &str, labels: serde_json::Value) -> Proxy {
    let md = serde_json::json!({"NAMESPACE": "default", "LABELS": labels});
    let mut p = Proxy::from_node(id, &md).expect("node id");
    p.resolve(push);
    p
}

fn sidecar(push: &PushContext) -> Proxy {
    proxy(
        push,
        "sidecar~10.1.0.5~productpage-1.default~default.svc.cluster.local",
        serde_json::json!({"app": "productpage"}),
    )
}

fn router(push: &PushContext) -> Proxy {
    proxy(
        push,
        "router~10.1.0.9~ingress-1.istio-system~istio-system.svc.cluster.local",
        serde_json::json!({"istio": "ingressgateway"}),
    )
}

fn clusters_of(rc: &RouteConfiguration, out: &mut BTreeSet<String>) {
    for vh in &rc.virtual_hosts {
        for r in &vh.routes {
            let Some(rroute::Action::Route(a)) = &r.action else {
                continue;
            };
            match &a.cluster_specifier {
                Some(route_action::ClusterSpecifier::Cluster(c)) => {
                    out.insert(c.clone());
                }
                Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
                    out.extend(w.clusters.iter().map(|c| c.name.clone()));
                }
                _ => {}
            }
            out.extend(a.request_mirror_policies.iter().map(|m| m.cluster.clone()));
        }
    }
}

fn http_filter<M: prost::Message + prost::Name>(name: &str, m: &M) -> HttpFilter {
    HttpFilter {
        name: name.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack(m))),
        ..Default::default()
    }
}

fn listener(port: u16, rc: RouteConfiguration) -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: format!("test_{port}"),
        route_specifier: Some(RouteSpecifier::RouteConfig(rc)),
        http_filters: vec![
            http_filter("envoy.filters.http.fault", &HttpFault::default()),
            http_filter("envoy.filters.http.cors", &Cors::default()),
            http_filter("envoy.filters.http.router", &Router::default()),
        ],
        ..Default::default()
    };
    Listener {
        name: format!("l_{port}"),
        address: Some(core::Address {
            address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                address: "127.0.0.1".into(),
                port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(
                    port,
                ))),
                ..Default::default()
            })),
        }),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(pack(&hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Write a bootstrap with one static listener per route config (ports 20000+) and a static
/// cluster for every referenced cluster name, and run `envoy --mode validate` on it.
fn envoy_validate(tag: &str, configs: Vec<RouteConfiguration>) {
    if let Err(e) = run_envoy_validate(tag, configs) {
        panic!("{e}");
    }
}

fn run_envoy_validate(tag: &str, configs: Vec<RouteConfiguration>) -> Result<(), String> {
    let mut names = BTreeSet::new();
    for rc in &configs {
        clusters_of(rc, &mut names);
    }
    let clusters = names
        .into_iter()
        .map(|name| Cluster {
            name: name.clone(),
            connect_timeout: Some(Duration {
                seconds: 1,
                nanos: 0,
            }),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Static as i32,
            )),
            load_assignment: Some(ClusterLoadAssignment {
                cluster_name: name,
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    let listeners = configs
        .into_iter()
        .enumerate()
        .map(|(i, rc)| listener(20000 + u16::try_from(i).expect("few configs"), rc))
        .collect();
    common::envoy_validate(
        &format!("route-{tag}"),
        "route configs",
        listeners,
        clusters,
    )
}

/// The harness itself can fail: a config with a duplicate domain (what the generator's
/// dedupe exists to prevent) is rejected by Envoy.
#[test]
fn envoy_rejects_duplicate_domains() {
    let push = push("", MeshSettings::default());
    let sc = sidecar(&push);
    let mut rc = route::sidecar_outbound(&sc, &push, 9080);
    let first = rc.virtual_hosts[0].domains[0].clone();
    rc.virtual_hosts[1].domains.push(first);
    let err = run_envoy_validate("negative", vec![rc]).expect_err("duplicate domain accepted");
    assert!(err.contains("domain"), "{err}");
}

#[test]
fn envoy_accepts_sidecar_and_gateway_routes() {
    let push = push("", MeshSettings::default());
    let sc = sidecar(&push);
    let names = route::route_names(&sc, &push);
    assert_eq!(names, vec!["80", "9080", "9090"]);
    let mut configs: Vec<RouteConfiguration> = names
        .iter()
        .map(|n| route::generate(&sc, &push, n).expect("known route name"))
        .collect();
    // The big VirtualService really produced its routes (not just defaults).
    let rc9080 = &configs[1];
    let reviews = rc9080
        .virtual_hosts
        .iter()
        .find(|v| v.name == "reviews.default.svc.cluster.local:9080")
        .expect("reviews vhost");
    assert!(reviews.routes.len() > 20, "{}", reviews.routes.len());
    assert!(rc9080.virtual_hosts.iter().any(|v| v.name == "allow_any"));

    let gw = router(&push);
    let gw_names = route::route_names(&gw, &push);
    assert_eq!(
        gw_names,
        vec!["http.443", "http.80", "http.8080", "http.9000"]
    );
    for n in &gw_names {
        configs.push(route::generate(&gw, &push, n).expect("gateway route"));
    }
    let blackhole = configs.last().expect("http.9000");
    assert_eq!(blackhole.virtual_hosts[0].name, "blackhole:9000");
    envoy_validate("all", configs);
}

#[test]
fn envoy_accepts_registry_only_and_egress_proxy() {
    let mesh = MeshSettings {
        outbound_mode: mizzen_config::networking::OutboundMode::RegistryOnly,
        ..Default::default()
    };
    let p = push("", mesh);
    let sc = sidecar(&p);
    let rc = route::sidecar_outbound(&sc, &p, 9080);
    assert_eq!(
        rc.virtual_hosts.last().map(|v| v.name.as_str()),
        Some("block_all")
    );
    let egress = r#"
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: default}
spec:
  outboundTrafficPolicy:
    mode: ALLOW_ANY
    egressProxy: {host: api.example.com, port: {number: 80}}
"#;
    let p2 = push(egress, MeshSettings::default());
    let sc2 = sidecar(&p2);
    let rc2 = route::sidecar_outbound(&sc2, &p2, 80);
    let last = rc2.virtual_hosts.last().expect("catch-all");
    assert_eq!(last.name, "allow_any");
    envoy_validate("registry-only", vec![rc, rc2]);
}
