//! One valid and one invalid case per rule, asserting the exact field paths.

use crate::validate::fields_of;

fn doc(kind: &str, spec: &str) -> String {
    let api = if kind == "Telemetry" {
        "telemetry.istio.io/v1"
    } else {
        "security.istio.io/v1"
    };
    let body: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    format!("apiVersion: {api}\nkind: {kind}\nmetadata: {{name: t, namespace: ns}}\nspec:\n{body}")
}

fn pa(spec: &str) -> Vec<String> {
    fields_of(&doc("PeerAuthentication", spec))
}

fn ap(spec: &str) -> Vec<String> {
    fields_of(&doc("AuthorizationPolicy", spec))
}

fn ra(spec: &str) -> Vec<String> {
    fields_of(&doc("RequestAuthentication", spec))
}

fn tel(spec: &str) -> Vec<String> {
    fields_of(&doc("Telemetry", spec))
}

fn none() -> Vec<String> {
    Vec::new()
}

#[test]
fn peer_authentication() {
    assert_eq!(pa("mtls: {mode: STRICT}"), none());
    assert_eq!(pa("selector: {matchLabels: {app: a}}\nmtls: {mode: PERMISSIVE}\nportLevelMtls: {8080: {mode: DISABLE}}"), none());
    // Port-level settings need a selector: a namespace-wide port number is ambiguous.
    assert_eq!(
        pa("portLevelMtls: {8080: {mode: DISABLE}}"),
        vec!["spec.portLevelMtls"]
    );
    assert_eq!(pa("selector: {matchLabels: {app: a}}\nportLevelMtls: {0: {mode: DISABLE}, http: {mode: STRICT}}"), vec!["spec.portLevelMtls[0]", "spec.portLevelMtls[http]"]);
    assert_eq!(
        pa("selector: {matchLabels: {app: '*'}}\nmtls: {mode: STRICT}"),
        vec!["spec.selector.matchLabels[app]"]
    );
}

#[test]
fn authz_valid() {
    assert_eq!(
        ap("selector: {matchLabels: {app: httpbin}}\naction: ALLOW\nrules:\n- from: [{source: {principals: ['cluster.local/ns/default/sa/sleep'], namespaces: [ns], ipBlocks: [10.0.0.0/8, 1.2.3.4]}}]\n  to: [{operation: {methods: [GET], paths: ['/info*', '/api/{*}/x'], ports: ['8080']}}]\n  when: [{key: 'request.auth.claims[iss]', values: ['https://a.com']}, {key: source.ip, notValues: [10.1.0.0/16]}, {key: 'request.headers[x-user]', values: [a]}]"),
        none()
    );
    assert_eq!(ap("{}"), none());
    assert_eq!(ap("action: DENY\nrules: [{}]"), none());
    assert_eq!(ap("action: CUSTOM\nprovider: {name: ext-authz}\nrules: [{to: [{operation: {paths: [/admin]}}]}]"), none());
}

#[test]
fn authz_action_and_provider() {
    assert_eq!(
        ap("action: CUSTOM\nrules: [{}]"),
        vec!["spec.provider.name"]
    );
    assert_eq!(
        ap("action: CUSTOM\nprovider: {name: x}"),
        vec!["spec.rules"]
    );
    assert_eq!(
        ap("action: ALLOW\nprovider: {name: x}\nrules: [{}]"),
        vec!["spec.provider"]
    );
    assert_eq!(ap("action: DENY"), vec!["spec.rules"]);
    assert_eq!(
        ap("action: CUSTOM\nprovider: {name: x}\nrules: [{from: [{source: {principals: [a]}}], when: [{key: source.principal, values: [a]}]}]"),
        vec!["spec.rules[0].from[0].source.principals", "spec.rules[0].when[0].key"]
    );
}

#[test]
fn authz_rules() {
    assert_eq!(
        ap("rules: [{to: [{operation: {ports: [http]}}]}]"),
        vec!["spec.rules[0].to[0].operation.ports[0]"]
    );
    assert_eq!(
        ap("rules: [{to: [{operation: {notPorts: ['70000']}}]}]"),
        vec!["spec.rules[0].to[0].operation.notPorts[0]"]
    );
    assert_eq!(
        ap("rules: [{from: [{source: {ipBlocks: [1.2.3.4/40]}}]}]"),
        vec!["spec.rules[0].from[0].source.ipBlocks[0]"]
    );
    assert_eq!(
        ap("rules: [{from: [{source: {remoteIpBlocks: [not-ip]}}]}]"),
        vec!["spec.rules[0].from[0].source.remoteIpBlocks[0]"]
    );
    assert_eq!(
        ap("rules: [{from: [{source: {principals: ['']}}]}]"),
        vec!["spec.rules[0].from[0].source.principals[0]"]
    );
    assert_eq!(
        ap("rules: [{from: [{source: {}}]}]"),
        vec!["spec.rules[0].from[0].source"]
    );
    assert_eq!(
        ap("rules: [{to: [{operation: {}}]}]"),
        vec!["spec.rules[0].to[0].operation"]
    );
    assert_eq!(
        ap("rules: [{to: [{operation: {paths: ['/a/{**}/{*}']}}]}]"),
        vec!["spec.rules[0].to[0].operation.paths"]
    );
    assert_eq!(
        ap("rules: [{from: [{source: {serviceAccounts: ['a/b/c']}}]}]"),
        vec!["spec.rules[0].from[0].source.serviceAccounts"]
    );
}

#[test]
fn authz_when() {
    assert_eq!(
        ap("rules: [{when: [{key: foo.bar, values: [x]}]}]"),
        vec!["spec.rules[0].when[0].key"]
    );
    assert_eq!(
        ap("rules: [{when: [{key: destination.port, values: ['80', x]}]}]"),
        vec!["spec.rules[0].when[0].values"]
    );
    assert_eq!(
        ap("rules: [{when: [{key: request.headers, values: [x]}]}]"),
        vec!["spec.rules[0].when[0].key"]
    );
    assert_eq!(
        ap("rules: [{when: [{key: destination.namespace, values: [x]}]}]"),
        vec!["spec.rules[0].when[0].key"]
    );
    assert_eq!(
        ap("rules: [{when: [{key: source.namespace}]}]"),
        vec!["spec.rules[0].when[0]"]
    );
    assert_eq!(
        ap("rules: [{when: [{key: '', values: [a]}]}]"),
        vec!["spec.rules[0].when[0].key"]
    );
    assert_eq!(
        ap("rules: [{when: [{key: remote.ip, notValues: [bad]}]}]"),
        vec!["spec.rules[0].when[0].notValues"]
    );
}

#[test]
fn authz_selector_and_target_ref() {
    assert_eq!(
        ap("targetRef: {kind: Service, group: '', name: web}"),
        none()
    );
    assert_eq!(
        ap("targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]"),
        none()
    );
    assert_eq!(
        ap("selector: {matchLabels: {app: a}}\ntargetRef: {kind: Service, name: web}"),
        vec!["spec"]
    );
    assert_eq!(
        ap("targetRef: {kind: Pod, name: web}"),
        vec!["spec.targetRef.kind"]
    );
    assert_eq!(
        ap("targetRef: {kind: Service, name: web, namespace: other}"),
        vec!["spec.targetRef.namespace"]
    );
    assert_eq!(
        ap("targetRef: {kind: Service, name: ''}"),
        vec!["spec.targetRef.name"]
    );
}

#[test]
fn authz_dry_run() {
    let with = |v: &str, action: &str| {
        fields_of(&format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: t, annotations: {{istio.io/dry-run: '{v}'}}}}\nspec: {{action: {action}, rules: [{{}}]}}\n"))
    };
    assert_eq!(with("true", "DENY"), none());
    assert_eq!(
        with("maybe", "ALLOW"),
        vec!["metadata.annotations[istio.io/dry-run]"]
    );
    assert_eq!(
        with("true", "AUDIT"),
        vec!["metadata.annotations[istio.io/dry-run]"]
    );
}

#[test]
fn request_authentication() {
    assert_eq!(
        ra("selector: {matchLabels: {app: a}}\njwtRules:\n- issuer: testing@secure.istio.io\n  jwksUri: https://raw.githubusercontent.com/istio/istio/master/security/tools/jwt/samples/jwks.json\n  audiences: [a]\n  fromHeaders: [{name: x-jwt, prefix: 'Bearer '}]\n  outputClaimToHeaders: [{header: x-sub, claim: sub}]\n  timeout: 5s"),
        none()
    );
    assert_eq!(ra("jwtRules: [{issuer: a, jwks: '{\"keys\": [{\"kty\": \"RSA\", \"n\": \"x\", \"e\": \"AQAB\"}]}'}]"), none());
    assert_eq!(
        ra("jwtRules: [{jwksUri: 'https://a.com/jwks'}]"),
        vec!["spec.jwtRules[0].issuer"]
    );
    assert_eq!(
        ra("jwtRules: [{issuer: a, jwksUri: 'ftp://a.com/jwks'}]"),
        vec!["spec.jwtRules[0].jwksUri"]
    );
    assert_eq!(
        ra("jwtRules: [{issuer: a, jwksUri: 'https:///jwks'}]"),
        vec!["spec.jwtRules[0].jwksUri"]
    );
    assert_eq!(
        ra("jwtRules: [{issuer: a, jwks: 'not json'}]"),
        vec!["spec.jwtRules[0].jwks"]
    );
    assert_eq!(
        ra("jwtRules: [{issuer: a, jwksUri: 'https://a.com/k', jwks: '{\"keys\": [{\"kty\": \"RSA\"}]}'}]"),
        vec!["spec.jwtRules[0].jwks"]
    );
    assert_eq!(
        ra("jwtRules: [{issuer: a, fromHeaders: [{name: ''}, {name: 'bad name'}]}]"),
        vec![
            "spec.jwtRules[0].fromHeaders[0].name",
            "spec.jwtRules[0].fromHeaders[1].name"
        ]
    );
    assert_eq!(
        ra("jwtRules: [{issuer: a, audiences: ['']}]"),
        vec!["spec.jwtRules[0].audiences[0]"]
    );
    assert_eq!(
        ra("jwtRules: [{issuer: a, outputClaimToHeaders: [{header: 'bad header', claim: sub}]}]"),
        vec!["spec.jwtRules[0].outputClaimToHeaders[0].header"]
    );
    assert_eq!(
        ra("selector: {matchLabels: {app: a}}\ntargetRef: {kind: Service, name: a}"),
        vec!["spec"]
    );
}

#[test]
fn telemetry() {
    assert_eq!(tel("tracing: [{providers: [{name: otel}], randomSamplingPercentage: 10, customTags: {env: {literal: {value: prod}}}}]\naccessLogging: [{providers: [{name: envoy}]}]"), none());
    assert_eq!(
        tel("tracing: [{randomSamplingPercentage: 101}]"),
        vec!["spec.tracing[0].randomSamplingPercentage"]
    );
    assert_eq!(
        tel("tracing: [{providers: [{name: ''}]}]"),
        vec!["spec.tracing[0].providers[0].name"]
    );
    assert_eq!(
        tel("metrics: [{overrides: [{tagOverrides: {x: {operation: UPSERT}}}]}]"),
        vec!["spec.metrics[0].overrides[0].tagOverrides[x].value"]
    );
    assert_eq!(
        tel("selector: {matchLabels: {app: a}}\ntargetRefs: [{kind: Service, name: a}]"),
        vec!["spec"]
    );
    assert_eq!(
        tel("targetRef: {kind: Deployment, group: apps, name: a}"),
        vec!["spec.targetRef.kind"]
    );
}
