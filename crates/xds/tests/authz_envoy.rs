//! The inbound listener with AuthorizationPolicy (RBAC) and RequestAuthentication (jwt_authn)
//! filters, checked by Envoy itself: the generated `virtualInbound` and the sidecar's clusters
//! go into a static bootstrap (binary proto) and through `envoy --mode validate`, so every
//! attribute the generator maps is one Envoy accepts.

mod common;

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{filter, Listener};
use mizzen_model::{MeshSettings, Proxy, PushContext};
use mizzen_xds::gen::{cluster as cgen, listener as lgen};
use prost::Message;
use std::path::Path;
use std::sync::Arc;

const CONFIG: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: foo}
spec:
  hosts: [web.foo.svc.cluster.local]
  addresses: [10.9.0.1]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {number: 8080, name: http, protocol: HTTP}
  - {number: 9000, name: tcp, protocol: TCP}
  - {number: 9100, name: auto}
  endpoints: [{address: 10.0.0.1}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: foo}
spec:
  jwtRules:
  - issuer: https://issuer.example
    audiences: [web, api]
    jwksUri: http://127.0.0.1:1/jwks
    fromHeaders: [{name: x-jwt, prefix: "Bearer "}]
    fromParams: [token]
    fromCookies: [session]
    forwardOriginalToken: true
    outputPayloadToHeader: x-jwt-payload
    outputClaimToHeaders: [{header: x-sub, claim: sub}]
  - issuer: inline-issuer
    jwks: '{"keys":[{"kty":"EC","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM","kid":"k1","alg":"ES256"}]}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: istio-system}
spec:
  action: AUDIT
  rules: [{to: [{operation: {methods: [DELETE]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: foo}
spec:
  action: DENY
  rules:
  - from: [{source: {notNamespaces: [foo, "bar*"], remoteIpBlocks: ["192.168.0.0/16"]}}]
    to: [{operation: {notPaths: ["/public/*", "*.css", "/api/{*}/x/{**}"], hosts: ["*.example.com", "web"]}}]
  - when:
    - {key: connection.sni, values: ["*.internal"]}
    - {key: destination.ip, values: ["10.0.0.0/8"]}
    - {key: destination.port, notValues: ["9000"]}
    - key: experimental.envoy.filters.network.foo[bar]
      values: ["x"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: dry
  namespace: foo
  annotations: {istio.io/dry-run: "true"}
spec:
  action: DENY
  rules: [{to: [{operation: {methods: [PUT]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: foo}
spec:
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/foo/sa/*", "*"]
        notPrincipals: ["*/sa/evil"]
        requestPrincipals: ["https://issuer.example/*", "*"]
        serviceAccounts: ["bar/client"]
        trustDomains: ["cluster.local"]
        ipBlocks: ["10.0.0.0/8", "fd00::/8", "127.0.0.1"]
    to: [{operation: {methods: [GET, POST], ports: ["8080", "9000"], paths: ["/exact", "/pre*", "*suf", "*"]}}]
    when:
    - key: request.headers[x-user]
      values: ["*"]
      notValues: ["bad*"]
    - key: request.auth.claims[groups]
      values: ["admin"]
    - key: request.auth.claims[nested][role]
      values: ["owner"]
    - {key: request.auth.audiences, values: ["web"]}
    - {key: request.auth.presenter, values: ["app"]}
    - {key: request.auth.principal, values: ["*/alice"]}
    - {key: source.ip, values: ["10.1.2.3"]}
    - {key: remote.ip, notValues: ["10.0.0.0/8"]}
    - {key: source.namespace, values: [foo]}
    - {key: source.principal, values: ["cluster.local/ns/foo/sa/web"]}
    - {key: source.serviceAccount, values: ["web"]}
  - from: [{source: {namespaces: ["*"]}}]
    to: [{operation: {ports: ["9000"]}}]
"#;

fn push() -> PushContext {
    let load = mizzen_config::load::load_str(Path::new("authz_envoy.yaml"), CONFIG);
    let errors: Vec<String> = load.errors().map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "fixture rejected: {errors:#?}");
    let registry = mizzen_model::registry::from_resources(&load.resources, "cluster.local");
    PushContext::build(
        "1".into(),
        MeshSettings::default(),
        Arc::new(load.resources),
        registry,
    )
}

fn sidecar(push: &PushContext) -> Proxy {
    let md = serde_json::json!({"NAMESPACE": "foo", "LABELS": {"app": "web"}});
    let mut p =
        Proxy::from_node("sidecar~10.0.0.1~web-1.foo~foo.svc.cluster.local", &md).expect("node id");
    p.resolve(push);
    p
}

fn inbound(push: &PushContext, proxy: &Proxy) -> Listener {
    lgen::generate(proxy, push)
        .into_iter()
        .find(|l| l.name == lgen::VIRTUAL_INBOUND)
        .expect("virtualInbound")
}

/// Static copies of the sidecar's clusters (EDS ones become STATIC without endpoints).
fn static_clusters(push: &PushContext, proxy: &Proxy) -> Vec<Cluster> {
    cgen::generate(proxy, push)
        .into_iter()
        .map(|mut c| {
            if matches!(c.cluster_discovery_type, Some(cluster::ClusterDiscoveryType::Type(t)) if t == cluster::DiscoveryType::Eds as i32)
            {
                c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
                    cluster::DiscoveryType::Static as i32,
                ));
                c.eds_cluster_config = None;
                c.load_assignment = Some(ClusterLoadAssignment {
                    cluster_name: c.name.clone(),
                    ..Default::default()
                });
            }
            c
        })
        .collect()
}

fn run_envoy_validate(tag: &str, listener: Listener, clusters: Vec<Cluster>) -> Result<(), String> {
    common::envoy_validate(
        &format!("authz-{tag}"),
        "inbound listener",
        vec![listener],
        clusters,
    )
}

#[test]
fn envoy_accepts_rbac_and_jwt_filters() {
    let push = push();
    let proxy = sidecar(&push);
    let l = inbound(&push, &proxy);
    // Filter names sit in nested Any bytes: look for them in the encoding.
    let bytes = l.encode_to_vec();
    for needle in [
        "envoy.filters.http.rbac",
        "envoy.filters.network.rbac",
        "envoy.filters.http.jwt_authn",
    ] {
        let found = bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
        assert!(found, "{needle} missing from the inbound listener");
    }
    let clusters = static_clusters(&push, &proxy);
    if let Err(e) = run_envoy_validate("all", l, clusters) {
        panic!("{e}");
    }
}

/// The harness can fail: a network RBAC filter without its required stat_prefix is rejected.
#[test]
fn envoy_rejects_a_broken_rbac_filter() {
    use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac;
    let push = push();
    let proxy = sidecar(&push);
    let mut l = inbound(&push, &proxy);
    let mut broken = false;
    for c in &mut l.filter_chains {
        for f in &mut c.filters {
            if f.name != "envoy.filters.network.rbac" {
                continue;
            }
            if let Some(filter::ConfigType::TypedConfig(a)) = &mut f.config_type {
                let mut r = Rbac::decode(a.value.as_slice()).expect("decodes");
                r.stat_prefix.clear();
                a.value = r.encode_to_vec();
                broken = true;
            }
        }
    }
    assert!(broken, "no network RBAC filter to break");
    let err = run_envoy_validate("negative", l, static_clusters(&push, &proxy))
        .expect_err("broken RBAC accepted");
    assert!(
        err.contains("stat_prefix") || err.contains("StatPrefix"),
        "{err}"
    );
}
