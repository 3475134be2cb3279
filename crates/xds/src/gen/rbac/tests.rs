//! Unit tests of the RBAC and jwt_authn generators: the generated protos, decoded back.

use super::*;
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3 as jwtv3;
use mizzen_model::{MeshSettings, Proxy, PushContext};
use std::sync::Arc;

fn push(yaml: &str) -> PushContext {
    let fl = mizzen_config::load::load_str(std::path::Path::new("t.yaml"), yaml);
    let errs: Vec<_> = fl.errors().collect();
    assert!(errs.is_empty(), "{errs:?}");
    let reg = mizzen_model::registry::from_resources(&fl.resources, "cluster.local");
    PushContext::build(
        "1".into(),
        MeshSettings::default(),
        Arc::new(fl.resources),
        reg,
    )
}

fn proxy(ns: &str, app: &str) -> Proxy {
    let md = serde_json::json!({"NAMESPACE": ns, "LABELS": {"app": app}});
    Proxy::from_node(
        &format!("sidecar~10.0.0.1~p.{ns}~{ns}.svc.cluster.local"),
        &md,
    )
    .expect("node id")
}

fn http_rbacs(p: &PushContext, px: &Proxy) -> Vec<(String, HttpRbac)> {
    inbound_http_filters(px, p)
        .into_iter()
        .filter_map(|f| match f.config_type {
            Some(hcm::http_filter::ConfigType::TypedConfig(a)) if f.name == HTTP_RBAC => Some((
                f.name,
                HttpRbac::decode(a.value.as_slice()).expect("decodes"),
            )),
            _ => None,
        })
        .collect()
}

fn net_rbacs(p: &PushContext, px: &Proxy) -> Vec<NetworkRbac> {
    inbound_network_filters(px, p)
        .into_iter()
        .filter_map(|f| match f.config_type {
            Some(lv3::filter::ConfigType::TypedConfig(a)) => {
                Some(NetworkRbac::decode(a.value.as_slice()).expect("decodes"))
            }
            _ => None,
        })
        .collect()
}

const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: foo}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-get, namespace: foo}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/bar/sa/client"]
        namespaces: ["bar"]
        notIpBlocks: ["10.1.0.0/16"]
    to:
    - operation: {methods: [GET], ports: ["8080"]}
    when:
    - key: request.headers[x-user]
      values: ["alice", "bob*"]
  - from: [{source: {ipBlocks: ["10.2.0.0/16", "10.3.0.1"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-all, namespace: istio-system}
spec:
  action: AUDIT
  rules: [{}]
"#;

#[test]
fn order_is_audit_deny_allow_and_rules_are_named_as_istio() {
    let p = push(POLICIES);
    let r = http_rbacs(&p, &proxy("foo", "web"));
    let actions: Vec<i32> = r
        .iter()
        .map(|(_, f)| f.rules.as_ref().expect("enforced").action)
        .collect();
    use rbacv3::rbac::Action;
    assert_eq!(
        actions,
        [
            Action::Log as i32,
            Action::Deny as i32,
            Action::Allow as i32
        ]
    );
    let allow = r[2].1.rules.as_ref().expect("rules");
    let mut names: Vec<&String> = allow.policies.keys().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "ns[foo]-policy[allow-get]-rule[0]",
            "ns[foo]-policy[allow-get]-rule[1]"
        ]
    );
    // A workload the ALLOW policy does not select gets only AUDIT and DENY.
    assert_eq!(http_rbacs(&p, &proxy("foo", "db")).len(), 2);
    // Nothing applies in another namespace but the mesh-wide AUDIT.
    assert_eq!(http_rbacs(&p, &proxy("bar", "web")).len(), 1);
}

#[test]
fn principals_and_permissions_map_field_by_field() {
    let p = push(POLICIES);
    let r = http_rbacs(&p, &proxy("foo", "web"));
    let allow = r[2].1.rules.as_ref().expect("rules");
    let rule0 = &allow.policies["ns[foo]-policy[allow-get]-rule[0]"];
    let dbg = format!("{rule0:?}");
    // from: SPIFFE principal, namespace regex, negated ipBlock (direct peer address).
    assert!(
        dbg.contains("Exact(\"spiffe://cluster.local/ns/bar/sa/client\")"),
        "{dbg}"
    );
    assert!(dbg.contains(".*/ns/bar/.*"), "{dbg}");
    assert!(
        dbg.contains("NotId(")
            && dbg.contains("DirectRemoteIp(CidrRange { address_prefix: \"10.1.0.0\""),
        "{dbg}"
    );
    // to: method header and destination port; when: header exact and prefix.
    assert!(
        dbg.contains("name: \":method\"") && dbg.contains("Exact(\"GET\")"),
        "{dbg}"
    );
    assert!(dbg.contains("DestinationPort(8080)"), "{dbg}");
    assert!(
        dbg.contains("name: \"x-user\"") && dbg.contains("Prefix(\"bob\")"),
        "{dbg}"
    );
    let rule1 = format!("{:?}", allow.policies["ns[foo]-policy[allow-get]-rule[1]"]);
    assert!(
        rule1.contains("prefix_len: Some(UInt32Value { value: 32 })"),
        "{rule1}"
    );
    assert!(
        rule1.contains("Any(true)"),
        "permissions of a from-only rule: {rule1}"
    );
    // DENY paths: prefix on the path without query.
    let deny = format!("{:?}", r[1].1.rules.as_ref().expect("rules"));
    assert!(
        deny.contains("UrlPath(PathMatcher") && deny.contains("Prefix(\"/admin\")"),
        "{deny}"
    );
}

#[test]
fn tcp_drops_http_only_allow_rules_and_widens_deny_rules() {
    let p = push(POLICIES);
    let r = net_rbacs(&p, &proxy("foo", "web"));
    assert_eq!(r.len(), 3);
    // DENY with only paths: on TCP the path is ignored, so it denies every connection.
    let deny = r[1].rules.as_ref().expect("rules");
    let d = &deny.policies["ns[foo]-policy[deny-admin]-rule[0]"];
    assert_eq!(
        format!("{:?}", d.permissions),
        format!("{:?}", vec![any_permission()])
    );
    // ALLOW: rule 0 has methods and a header condition -> dropped; rule 1 (ipBlocks) stays.
    let allow = r[2].rules.as_ref().expect("rules");
    let names: Vec<&String> = allow.policies.keys().collect();
    assert_eq!(names, ["ns[foo]-policy[allow-get]-rule[1]"]);
    assert_eq!(r[2].stat_prefix, "tcp.");
}

#[test]
fn empty_allow_policy_allows_nothing_and_empty_rule_allows_all() {
    let p = push(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: foo}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: bar}
spec:
  rules: [{}]
"#,
    );
    let foo = http_rbacs(&p, &proxy("foo", "web"));
    assert_eq!(foo.len(), 1);
    assert!(foo[0].1.rules.as_ref().expect("rules").policies.is_empty());
    let bar = http_rbacs(&p, &proxy("bar", "web"));
    let pol =
        &bar[0].1.rules.as_ref().expect("rules").policies["ns[bar]-policy[allow-all]-rule[0]"];
    assert_eq!(
        format!("{:?}", pol.principals),
        format!("{:?}", vec![any_principal()])
    );
}

#[test]
fn dry_run_goes_to_shadow_rules() {
    let p = push(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: try-deny
  namespace: foo
  annotations: {istio.io/dry-run: "true"}
spec:
  action: DENY
  rules: [{to: [{operation: {methods: [POST]}}]}]
"#,
    );
    let r = http_rbacs(&p, &proxy("foo", "web"));
    assert_eq!(r.len(), 1);
    assert!(r[0].1.rules.is_none());
    assert!(r[0].1.shadow_rules.is_some());
    assert_eq!(r[0].1.shadow_rules_stat_prefix, "istio_dry_run_deny_");
}

#[test]
fn request_principals_match_sub_under_each_issuer() {
    let iss = vec!["https://issuer.example".to_string(), "other".to_string()];
    let dbg = format!(
        "{:?}",
        request_principal("https://issuer.example/alice", &iss)
    );
    assert!(
        dbg.contains("Key(\"https://issuer.example\")") && dbg.contains("Exact(\"alice\")"),
        "{dbg}"
    );
    assert!(!dbg.contains("Key(\"other\")"), "{dbg}");
    // `*`: any verified token of any issuer.
    let any = format!("{:?}", request_principal("*", &iss));
    assert!(
        any.contains("PresentMatch(true)") && any.contains("Key(\"other\")"),
        "{any}"
    );
    // Suffix across the separator: `*/bob` is SUB == bob for every issuer.
    let suf = format!("{:?}", request_principal("*/bob", &iss));
    assert!(suf.contains("Exact(\"bob\")"), "{suf}");
    // An issuer nobody configured matches nothing.
    let none = format!("{:?}", request_principal("https://nobody/x", &iss));
    assert_eq!(none, format!("{:?}", not_id(any_principal())));
}

#[test]
fn map_fields_encode_in_key_order() {
    let p = push(POLICIES);
    let px = proxy("foo", "web");
    let a = inbound_http_filters(&px, &p);
    for _ in 0..5 {
        assert_eq!(
            inbound_http_filters(&px, &p),
            a,
            "byte-identical every time"
        );
    }
}

#[test]
fn jwt_filter_inlines_keys_and_falls_back_to_an_unusable_key() {
    let mut p = push(
        r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: foo}
spec:
  jwtRules:
  - issuer: https://issuer.example
    audiences: [web]
    jwksUri: http://127.0.0.1:1/jwks
    fromHeaders: [{name: x-jwt, prefix: "Token "}]
    fromParams: [token]
    forwardOriginalToken: true
    outputPayloadToHeader: x-payload
"#,
    );
    let px = proxy("foo", "web");
    let decode = |p: &PushContext| {
        let f = crate::gen::jwt::filter(&px, p).expect("filter");
        let Some(hcm::http_filter::ConfigType::TypedConfig(a)) = f.config_type else {
            panic!("typed config")
        };
        jwtv3::JwtAuthentication::decode(a.value.as_slice()).expect("decodes")
    };
    let j = decode(&p);
    let prov = &j.providers["origins-0"];
    assert_eq!(prov.issuer, "https://issuer.example");
    assert_eq!(prov.audiences, ["web"]);
    assert_eq!(prov.from_headers[0].value_prefix, "Token ");
    assert_eq!(prov.from_params, ["token"]);
    assert!(prov.forward);
    assert_eq!(prov.forward_payload_header, "x-payload");
    assert_eq!(prov.payload_in_metadata, "https://issuer.example");
    assert!(format!("{prov:?}").contains("mizzen-no-key"));
    p.authz.jwks.insert(
        "http://127.0.0.1:1/jwks".into(),
        mizzen_model::authz::JwksEntry {
            keys: Some(r#"{"keys":[{"kid":"fetched"}]}"#.into()),
            error: None,
        },
    );
    assert!(format!("{:?}", decode(&p).providers["origins-0"]).contains("fetched"));
    // allow_missing: a request without a token passes jwt_authn.
    assert!(format!("{:?}", j.rules).contains("AllowMissing"));
    // And the RBAC filters come after jwt_authn.
    let names: Vec<String> = inbound_http_filters(&px, &p)
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(names, [crate::gen::jwt::JWT_AUTHN]);
}

#[test]
fn listener_hook_puts_filters_before_router_and_tcp_proxy() {
    let p = push(&format!(
        "{POLICIES}---\n{}",
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: foo}
spec:
  hosts: [web.foo.svc.cluster.local]
  addresses: [10.9.0.1]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}, {number: 9000, name: tcp, protocol: TCP}]
  endpoints: [{address: 10.0.0.1}]
"#
    ));
    let px = proxy("foo", "web");
    let l = crate::gen::listener::generate(&px, &p)
        .into_iter()
        .find(|l| l.name == "virtualInbound")
        .expect("inbound");
    let mut saw_http = false;
    let mut saw_tcp = false;
    for c in l
        .filter_chains
        .iter()
        .chain(l.default_filter_chain.as_ref())
    {
        let names: Vec<&str> = c.filters.iter().map(|f| f.name.as_str()).collect();
        if names.contains(&"envoy.filters.network.tcp_proxy") {
            assert_eq!(
                names[..3],
                [NETWORK_RBAC, NETWORK_RBAC, NETWORK_RBAC],
                "{names:?}"
            );
            saw_tcp = true;
        }
        for f in &c.filters {
            if f.name == "envoy.filters.network.http_connection_manager" {
                let Some(lv3::filter::ConfigType::TypedConfig(a)) = &f.config_type else {
                    panic!("typed")
                };
                let h = hcm::HttpConnectionManager::decode(a.value.as_slice()).expect("hcm");
                let hn: Vec<&str> = h.http_filters.iter().map(|f| f.name.as_str()).collect();
                let n = hn.len();
                assert_eq!(
                    hn[n - 4..],
                    [HTTP_RBAC, HTTP_RBAC, HTTP_RBAC, "envoy.filters.http.router"],
                    "{hn:?}"
                );
                saw_http = true;
            }
        }
    }
    assert!(
        saw_http && saw_tcp,
        "{:?}",
        l.filter_chains.iter().map(|c| &c.name).collect::<Vec<_>>()
    );
}
