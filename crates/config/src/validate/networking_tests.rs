//! One valid and one invalid case per rule, asserting the exact field paths.

use crate::validate::{errors_of, fields_of};

/// A full object of `kind` around a block-YAML `spec` written at column 0.
fn doc(kind: &str, spec: &str) -> String {
    let body: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    format!("apiVersion: networking.istio.io/v1\nkind: {kind}\nmetadata: {{name: t, namespace: ns}}\nspec:\n{body}")
}

fn vs(spec: &str) -> Vec<String> {
    fields_of(&doc("VirtualService", spec))
}

fn dr(spec: &str) -> Vec<String> {
    fields_of(&doc("DestinationRule", spec))
}

fn gw(spec: &str) -> Vec<String> {
    fields_of(&doc("Gateway", spec))
}

fn se(spec: &str) -> Vec<String> {
    fields_of(&doc("ServiceEntry", spec))
}

fn none() -> Vec<String> {
    Vec::new()
}

/// A VirtualService with one HTTP route whose body is `route` (YAML at column 0).
fn http(route: &str) -> Vec<String> {
    let body: String = route.lines().map(|l| format!("  {l}\n")).collect();
    vs(&format!("hosts: [reviews]\nhttp:\n- \n{body}"))
}

const DEST: &str = "route: [{destination: {host: reviews}}]";

// ---------------------------------------------------------------- VirtualService

#[test]
fn vs_valid() {
    assert_eq!(
        vs("hosts: [reviews, 'ratings.ns.svc.cluster.local', '*.example.com']\nhttp:\n- route:\n  - destination: {host: reviews, subset: v1, port: {number: 9080}}"),
        none()
    );
}

#[test]
fn vs_hosts() {
    assert_eq!(
        vs(&format!("hosts: ['foo..bar']\nhttp: [{{{DEST}}}]")),
        vec!["spec.hosts[0]"]
    );
    // `*` alone only on gateways.
    assert_eq!(
        vs(&format!("hosts: ['*']\nhttp: [{{{DEST}}}]")),
        vec!["spec.hosts[0]"]
    );
    assert_eq!(
        vs(&format!(
            "hosts: ['*']\ngateways: [ns/gw]\nhttp: [{{{DEST}}}]"
        )),
        none()
    );
    assert_eq!(
        vs(&format!(
            "hosts: ['*']\ngateways: [ns/gw, mesh]\nhttp: [{{{DEST}}}]"
        )),
        vec!["spec.hosts[0]"]
    );
    // IPs are accepted as hosts.
    assert_eq!(
        vs(&format!("hosts: ['10.1.2.3']\nhttp: [{{{DEST}}}]")),
        none()
    );
    assert_eq!(
        vs(&format!(
            "hosts: [a.foo.com, '*.foo.com']\nhttp: [{{{DEST}}}]"
        )),
        vec!["spec.hosts[1]"]
    );
}

#[test]
fn vs_gateways() {
    assert_eq!(
        vs(&format!(
            "hosts: [a]\ngateways: [istio-system/ingress, mesh, my-gw]\nhttp: [{{{DEST}}}]"
        )),
        none()
    );
    assert_eq!(
        vs(&format!(
            "hosts: [a]\ngateways: [ns/Bad_Name, /x]\nhttp: [{{{DEST}}}]"
        )),
        vec!["spec.gateways[0]", "spec.gateways[1]"]
    );
}

#[test]
fn vs_needs_routes() {
    assert_eq!(vs("hosts: [a]"), vec!["spec"]);
    assert_eq!(
        vs("hosts: [a]\ntcp: [{route: [{destination: {host: a}}]}]"),
        none()
    );
}

#[test]
fn vs_delegate() {
    // No hosts: a delegate VirtualService. Gateways and TCP routes make no sense there.
    assert_eq!(vs(&format!("http: [{{{DEST}}}]")), none());
    assert_eq!(
        vs(&format!("gateways: [ns/gw]\nhttp: [{{{DEST}}}]")),
        vec!["spec.gateways"]
    );
    // Root routes delegate and may not route themselves.
    assert_eq!(
        http("delegate: {name: reviews-delegate, namespace: ns2}"),
        none()
    );
    assert_eq!(
        http(&format!("delegate: {{name: d}}\n{DEST}")),
        vec!["spec.http[0].route"]
    );
    // Delegates may not use regex matches.
    assert_eq!(
        vs(&format!(
            "http: [{{match: [{{uri: {{regex: '/a.*'}}}}], {DEST}}}]"
        )),
        vec!["spec.http[0].match[0].uri"]
    );
}

#[test]
fn vs_route_action_required() {
    assert_eq!(
        http("match: [{uri: {prefix: /}}]"),
        vec!["spec.http[0].route"]
    );
    assert_eq!(http("redirect: {uri: /new}"), none());
    assert_eq!(http("directResponse: {status: 404}"), none());
    assert_eq!(
        http(&format!("redirect: {{uri: /new}}\n{DEST}")),
        vec!["spec.http[0].redirect"]
    );
    assert_eq!(
        http(&format!("directResponse: {{status: 503}}\n{DEST}")),
        vec!["spec.http[0].directResponse"]
    );
    assert_eq!(
        http("redirect: {uri: /new}\nrewrite: {uri: /x}"),
        vec!["spec.http[0].redirect"]
    );
}

#[test]
fn vs_weights() {
    let two = |a: &str, b: &str| {
        http(&format!("route:\n- destination: {{host: r, subset: v1}}\n  {a}\n- destination: {{host: r, subset: v2}}\n  {b}"))
    };
    assert_eq!(two("weight: 80", "weight: 20"), none());
    assert_eq!(two("weight: 0", "weight: 100"), none());
    assert_eq!(two("weight: 50", "weight: 40"), vec!["spec.http[0].route"]);
    // Missing weights count as 0, so two unweighted destinations do not add up.
    assert_eq!(
        two("headers: {}", "headers: {}"),
        vec!["spec.http[0].route"]
    );
    assert_eq!(
        two("weight: -10", "weight: 110"),
        vec![
            "spec.http[0].route[0].weight",
            "spec.http[0].route[1].weight"
        ]
    );
    // A single destination may omit its weight.
    assert_eq!(http(DEST), none());
    assert_eq!(
        http("route: [{destination: {host: r}, weight: 101}]"),
        vec!["spec.http[0].route[0].weight"]
    );
}

#[test]
fn vs_match() {
    let m = |spec: &str| http(&format!("match: [{spec}]\n{DEST}"));
    assert_eq!(m("{uri: {prefix: /api}, method: {exact: GET}, headers: {x-user: {regex: 'a.*'}}, port: 8080}"), none());
    assert_eq!(m("{uri: {regex: '('}}"), vec!["spec.http[0].match[0].uri"]);
    assert_eq!(
        m("{authority: {regex: ''}}"),
        vec!["spec.http[0].match[0].authority"]
    );
    assert_eq!(
        m("{headers: {'bad header': {exact: x}}}"),
        vec!["spec.http[0].match[0].headers[bad header]"]
    );
    assert_eq!(
        m("{queryParams: {q: {regex: '[a'}}}"),
        vec!["spec.http[0].match[0].queryParams[q]"]
    );
    assert_eq!(m("{port: 70000}"), vec!["spec.http[0].match[0].port"]);
    assert_eq!(
        m("{sourceLabels: {'app': '-x'}}"),
        vec!["spec.http[0].match[0].sourceLabels[app]"]
    );
    assert_eq!(
        m("{sourceNamespace: 'Not_A_Label'}"),
        vec!["spec.http[0].match[0].sourceNamespace"]
    );
    // JWT claim routing only on gateways.
    assert_eq!(
        m("{headers: {'@request.auth.claims.group': {exact: admin}}}"),
        vec!["spec.http[0].match[0].headers[@request.auth.claims.group]"]
    );
    // Exactly one of exact/prefix/regex: the decoder already rejects two.
    let two = errors_of(&doc(
        "VirtualService",
        &format!("hosts: [a]\nhttp: [{{match: [{{uri: {{exact: /a, prefix: /b}}}}], {DEST}}}]"),
    ));
    assert_eq!(two.len(), 1);
    assert!(two[0].0.starts_with("spec.http[0].match[0].uri"), "{two:?}");
}

#[test]
fn vs_retries() {
    assert_eq!(http(&format!("retries: {{attempts: 3, perTryTimeout: 2s, retryOn: 'gateway-error,connect-failure,503'}}\n{DEST}")), none());
    assert_eq!(
        http(&format!("retries: {{attempts: -1}}\n{DEST}")),
        vec!["spec.http[0].retries.attempts"]
    );
    assert_eq!(
        http(&format!(
            "retries: {{attempts: 2, retryOn: '5xx,bogus'}}\n{DEST}"
        )),
        vec!["spec.http[0].retries.retryOn"]
    );
    assert_eq!(
        http(&format!("retries: {{attempts: 2, retryOn: '599'}}\n{DEST}")),
        vec!["spec.http[0].retries.retryOn"]
    );
    assert_eq!(
        http(&format!(
            "retries: {{attempts: 2, perTryTimeout: 500us}}\n{DEST}"
        )),
        vec!["spec.http[0].retries.perTryTimeout"]
    );
    assert_eq!(
        http(&format!("retries: {{attempts: 0, retryOn: 5xx}}\n{DEST}")),
        vec!["spec.http[0].retries.attempts"]
    );
}

#[test]
fn vs_timeout() {
    assert_eq!(http(&format!("timeout: 0s\n{DEST}")), none());
    assert_eq!(http(&format!("timeout: 10s\n{DEST}")), none());
    // Negative durations cannot even be decoded.
    assert_eq!(
        errors_of(&doc(
            "VirtualService",
            &format!("hosts: [a]\nhttp: [{{timeout: -1s, {DEST}}}]")
        ))[0]
            .0,
        "spec.http[0].timeout"
    );
}

#[test]
fn vs_fault() {
    let f = |spec: &str| http(&format!("fault: {spec}\n{DEST}"));
    assert_eq!(f("{abort: {httpStatus: 503, percentage: {value: 10}}, delay: {fixedDelay: 5s, percentage: {value: 100}}}"), none());
    assert_eq!(f("{abort: {grpcStatus: UNAVAILABLE}}"), none());
    assert_eq!(f("{}"), vec!["spec.http[0].fault"]);
    assert_eq!(
        f("{abort: {httpStatus: 700}}"),
        vec!["spec.http[0].fault.abort.httpStatus"]
    );
    assert_eq!(
        f("{abort: {httpStatus: 199}}"),
        vec!["spec.http[0].fault.abort.httpStatus"]
    );
    assert_eq!(
        f("{abort: {grpcStatus: NOPE}}"),
        vec!["spec.http[0].fault.abort.grpcStatus"]
    );
    assert_eq!(
        f("{abort: {httpStatus: 500, percentage: {value: 101}}}"),
        vec!["spec.http[0].fault.abort.percentage.value"]
    );
    assert_eq!(
        f("{delay: {fixedDelay: 0s}}"),
        vec!["spec.http[0].fault.delay.fixedDelay"]
    );
    assert_eq!(
        f("{delay: {fixedDelay: 1s, percent: 200}}"),
        vec!["spec.http[0].fault.delay.percent"]
    );
}

#[test]
fn vs_mirror() {
    assert_eq!(
        http(&format!(
            "mirror: {{host: shadow}}\nmirrorPercentage: {{value: 50}}\n{DEST}"
        )),
        none()
    );
    assert_eq!(
        http(&format!(
            "mirror: {{host: shadow}}\nmirrorPercentage: {{value: 150}}\n{DEST}"
        )),
        vec!["spec.http[0].mirrorPercentage.value"]
    );
    assert_eq!(
        http(&format!("mirror: {{host: '*'}}\n{DEST}")),
        vec!["spec.http[0].mirror.host"]
    );
    assert_eq!(
        http(&format!(
            "mirrors: [{{destination: {{host: s}}, percentage: {{value: -1}}}}]\n{DEST}"
        )),
        vec!["spec.http[0].mirrors[0].percentage.value"]
    );
    assert_eq!(
        http(&format!("mirrorPercent: 101\n{DEST}")),
        vec!["spec.http[0].mirrorPercent"]
    );
}

#[test]
fn vs_redirect_and_direct_response() {
    assert_eq!(
        http("redirect: {uri: /x, redirectCode: 308, scheme: https, port: 8443}"),
        none()
    );
    assert_eq!(
        http("redirect: {uri: /x, redirectCode: 200}"),
        vec!["spec.http[0].redirect.redirectCode"]
    );
    assert_eq!(
        http("redirect: {uri: /x, scheme: ftp}"),
        vec!["spec.http[0].redirect.scheme"]
    );
    assert_eq!(
        http("redirect: {redirectCode: 301}"),
        vec!["spec.http[0].redirect"]
    );
    assert_eq!(
        http("directResponse: {status: 200, body: {string: ok}}"),
        none()
    );
    assert_eq!(
        http("directResponse: {status: 100}"),
        vec!["spec.http[0].directResponse.status"]
    );
    assert_eq!(
        http("directResponse: {status: 600}"),
        vec!["spec.http[0].directResponse.status"]
    );
}

#[test]
fn vs_rewrite() {
    assert_eq!(http(&format!("rewrite: {{uri: /v2}}\n{DEST}")), none());
    assert_eq!(
        http(&format!(
            "rewrite: {{uriRegexRewrite: {{match: '^/api/(.*)', rewrite: '/\\1'}}}}\n{DEST}"
        )),
        none()
    );
    assert_eq!(
        http(&format!(
            "rewrite: {{uri: /v2, uriRegexRewrite: {{match: a, rewrite: b}}}}\n{DEST}"
        )),
        vec!["spec.http[0].rewrite"]
    );
    assert_eq!(
        http(&format!(
            "rewrite: {{uriRegexRewrite: {{match: '(', rewrite: b}}}}\n{DEST}"
        )),
        vec!["spec.http[0].rewrite.uriRegexRewrite.match"]
    );
    assert_eq!(
        http(&format!("rewrite: {{}}\n{DEST}")),
        vec!["spec.http[0].rewrite"]
    );
}

#[test]
fn vs_cors() {
    let c = |spec: &str| http(&format!("corsPolicy: {spec}\n{DEST}"));
    assert_eq!(c("{allowOrigins: [{exact: 'https://a.com'}, {regex: 'https://.*\\.b\\.com'}], allowMethods: [GET, POST], allowHeaders: ['*', x-custom], maxAge: 24h}"), none());
    assert_eq!(
        c("{allowOrigins: [{regex: '('}]}"),
        vec!["spec.http[0].corsPolicy.allowOrigins[0]"]
    );
    assert_eq!(
        c("{allowOrigins: [{exact: ''}]}"),
        vec!["spec.http[0].corsPolicy.allowOrigins[0]"]
    );
    assert_eq!(
        c("{allowMethods: [FETCH]}"),
        vec!["spec.http[0].corsPolicy.allowMethods[0]"]
    );
    assert_eq!(
        c("{exposeHeaders: ['bad header']}"),
        vec!["spec.http[0].corsPolicy.exposeHeaders[0]"]
    );
    assert_eq!(
        c("{maxAge: 1500ms}"),
        vec!["spec.http[0].corsPolicy.maxAge"]
    );
}

#[test]
fn vs_headers() {
    let h = |spec: &str| http(&format!("headers: {spec}\n{DEST}"));
    assert_eq!(h("{request: {set: {x-a: b, ':authority': c}, remove: [x-b]}, response: {add: {x-c: '%HOSTNAME%'}}}"), none());
    assert_eq!(
        h("{request: {set: {':path': /x}}}"),
        vec!["spec.http[0].headers.request.set[:path]"]
    );
    assert_eq!(
        h("{response: {remove: [host]}}"),
        vec!["spec.http[0].headers.response.remove[0]"]
    );
    assert_eq!(
        h("{response: {set: {x-a: 'abc%123'}}}"),
        vec!["spec.http[0].headers.response.set[x-a]"]
    );
    // The authority may be rewritten once only.
    assert_eq!(
        http(&format!(
            "rewrite: {{authority: a.com}}\nheaders: {{request: {{set: {{host: b.com}}}}}}\n{DEST}"
        )),
        vec!["spec.http[0].headers.request.set[host]"]
    );
}

#[test]
fn vs_destinations() {
    assert_eq!(
        http("route: [{destination: {host: ''}}]"),
        vec!["spec.http[0].route[0].destination.host"]
    );
    assert_eq!(
        http("route: [{destination: {host: r, subset: 'v_1'}}]"),
        vec!["spec.http[0].route[0].destination.subset"]
    );
    assert_eq!(
        http("route: [{destination: {host: r, port: {number: 0}}}]"),
        vec!["spec.http[0].route[0].destination.port.number"]
    );
}

#[test]
fn vs_tcp_and_tls_routes() {
    assert_eq!(vs("hosts: [db]\ntcp: [{match: [{port: 3306, destinationSubnets: [10.0.0.0/8]}], route: [{destination: {host: db}}]}]"), none());
    assert_eq!(
        vs("hosts: [db]\ntcp: [{match: [{port: 3306}]}]"),
        vec!["spec.tcp[0].route"]
    );
    assert_eq!(vs("hosts: [db]\ntcp: [{match: [{destinationSubnets: [10.0.0.0/40]}], route: [{destination: {host: db}}]}]"), vec!["spec.tcp[0].match[0].destinationSubnets[0]"]);
    assert_eq!(vs("hosts: ['*.a.com']\ntls: [{match: [{sniHosts: [x.a.com], port: 443}], route: [{destination: {host: x.a.com}}]}]"), none());
    assert_eq!(
        vs("hosts: ['*.a.com']\ntls: [{match: [{port: 443}], route: [{destination: {host: x}}]}]"),
        vec!["spec.tls[0].match[0].sniHosts"]
    );
    assert_eq!(
        vs("hosts: ['*.a.com']\ntls: [{route: [{destination: {host: x}}]}]"),
        vec!["spec.tls[0].match"]
    );
    assert_eq!(vs("hosts: ['*.a.com']\ntls: [{match: [{sniHosts: [x.b.com]}], route: [{destination: {host: x}}]}]"), vec!["spec.tls[0].match[0].sniHosts[0]"]);
    assert_eq!(
        vs("hosts: [db]\ntcp: [{route: [{destination: {host: a}, weight: 30}, {destination: {host: b}, weight: 30}]}]"),
        vec!["spec.tcp[0].route"]
    );
}

#[test]
fn vs_export_to() {
    assert_eq!(
        vs(&format!(
            "hosts: [a]\nexportTo: ['.', other]\nhttp: [{{{DEST}}}]"
        )),
        none()
    );
    assert_eq!(
        vs(&format!(
            "hosts: [a]\nexportTo: ['*', other]\nhttp: [{{{DEST}}}]"
        )),
        vec!["spec.exportTo"]
    );
    assert_eq!(
        vs(&format!(
            "hosts: [a]\nexportTo: ['.', ns]\nhttp: [{{{DEST}}}]"
        )),
        vec!["spec.exportTo[1]"]
    );
    assert_eq!(
        vs(&format!("hosts: [a]\nexportTo: ['~']\nhttp: [{{{DEST}}}]")),
        vec!["spec.exportTo[0]"]
    );
}

// ---------------------------------------------------------------- DestinationRule

#[test]
fn dr_valid() {
    assert_eq!(
        dr("host: reviews\ntrafficPolicy:\n  loadBalancer: {simple: LEAST_REQUEST}\n  connectionPool: {tcp: {maxConnections: 100, connectTimeout: 30ms}, http: {http1MaxPendingRequests: 10}}\n  outlierDetection: {consecutive5xxErrors: 7, interval: 5m, baseEjectionTime: 15m, maxEjectionPercent: 100}\nsubsets:\n- {name: v1, labels: {version: v1}}\n- {name: v2, labels: {version: v2}, trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}}"),
        none()
    );
}

#[test]
fn dr_host_and_subsets() {
    assert_eq!(dr("subsets: [{name: v1}]"), vec!["spec.host"]);
    assert_eq!(dr("host: 'a..b'"), vec!["spec.host"]);
    assert_eq!(
        dr("host: r\nsubsets: [{name: v1}, {name: v1}]"),
        vec!["spec.subsets[1].name"]
    );
    assert_eq!(
        dr("host: r\nsubsets: [{name: 'v.1'}]"),
        vec!["spec.subsets[0].name"]
    );
    assert_eq!(
        dr("host: r\nsubsets: [{name: ''}]"),
        vec!["spec.subsets[0].name"]
    );
    assert_eq!(
        dr("host: r\nsubsets: [{name: v1, labels: {'bad key': x}}]"),
        vec!["spec.subsets[0].labels[bad key]"]
    );
}

#[test]
fn dr_load_balancer() {
    let lb = |spec: &str| dr(&format!("host: r\ntrafficPolicy: {{loadBalancer: {spec}}}"));
    assert_eq!(lb("{consistentHash: {httpHeaderName: x-user}}"), none());
    assert_eq!(
        lb("{consistentHash: {httpCookie: {name: c, ttl: 0s}, maglev: {tableSize: 65537}}}"),
        none()
    );
    assert_eq!(
        lb("{simple: ROUND_ROBIN, consistentHash: {useSourceIp: true}}"),
        vec!["spec.trafficPolicy.loadBalancer"]
    );
    assert_eq!(
        lb("{consistentHash: {useSourceIp: true, httpHeaderName: x}}"),
        vec!["spec.trafficPolicy.loadBalancer.consistentHash"]
    );
    assert_eq!(
        lb("{consistentHash: {}}"),
        vec!["spec.trafficPolicy.loadBalancer.consistentHash"]
    );
    assert_eq!(
        lb("{consistentHash: {httpCookie: {name: ''}}}"),
        vec!["spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name"]
    );
    assert_eq!(
        lb("{consistentHash: {useSourceIp: true, maglev: {tableSize: 100}}}"),
        vec!["spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize"]
    );
    assert_eq!(
        lb("{localityLbSetting: {distribute: [{from: 'us/*', to: {'us/a/*': 60, 'us/b/*': 30}}]}}"),
        vec!["spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to"]
    );
}

#[test]
fn dr_outlier_and_pool() {
    let tp = |spec: &str| dr(&format!("host: r\ntrafficPolicy: {spec}"));
    assert_eq!(
        tp("{outlierDetection: {maxEjectionPercent: 150}}"),
        vec!["spec.trafficPolicy.outlierDetection.maxEjectionPercent"]
    );
    assert_eq!(
        tp("{outlierDetection: {minHealthPercent: -1}}"),
        vec!["spec.trafficPolicy.outlierDetection.minHealthPercent"]
    );
    assert_eq!(
        tp("{outlierDetection: {interval: 500us}}"),
        vec!["spec.trafficPolicy.outlierDetection.interval"]
    );
    assert_eq!(
        tp("{outlierDetection: {consecutiveLocalOriginFailures: 3}}"),
        vec!["spec.trafficPolicy.outlierDetection.consecutiveLocalOriginFailures"]
    );
    assert_eq!(
        tp("{connectionPool: {tcp: {maxConnections: -1}}}"),
        vec!["spec.trafficPolicy.connectionPool.tcp.maxConnections"]
    );
    assert_eq!(
        tp("{connectionPool: {http: {maxRetries: -2, idleTimeout: 0s}}}"),
        vec![
            "spec.trafficPolicy.connectionPool.http.maxRetries",
            "spec.trafficPolicy.connectionPool.http.idleTimeout"
        ]
    );
    assert_eq!(
        tp("{connectionPool: {}}"),
        vec!["spec.trafficPolicy.connectionPool"]
    );
    assert_eq!(tp("{}"), vec!["spec.trafficPolicy"]);
}

#[test]
fn dr_tls() {
    let tls = |spec: &str| dr(&format!("host: r\ntrafficPolicy: {{tls: {spec}}}"));
    assert_eq!(tls("{mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem, caCertificates: /ca.pem}"), none());
    assert_eq!(tls("{mode: MUTUAL, credentialName: client-cred}"), none());
    assert_eq!(tls("{mode: SIMPLE, sni: a.com}"), none());
    assert_eq!(
        tls("{mode: MUTUAL}"),
        vec![
            "spec.trafficPolicy.tls.clientCertificate",
            "spec.trafficPolicy.tls.privateKey"
        ]
    );
    assert_eq!(
        tls("{mode: MUTUAL, credentialName: c, privateKey: /k.pem}"),
        vec!["spec.trafficPolicy.tls"]
    );
    assert_eq!(
        tls("{mode: SIMPLE, insecureSkipVerify: true, caCertificates: /ca.pem}"),
        vec!["spec.trafficPolicy.tls"]
    );
}

#[test]
fn dr_port_level_settings() {
    let pls = |spec: &str| {
        dr(&format!(
            "host: r\ntrafficPolicy: {{portLevelSettings: {spec}}}"
        ))
    };
    assert_eq!(pls("[{port: {number: 80}, loadBalancer: {simple: RANDOM}}, {port: {number: 9080}, tls: {mode: DISABLE}}]"), none());
    assert_eq!(
        pls("[{port: {number: 0}, loadBalancer: {simple: RANDOM}}]"),
        vec!["spec.trafficPolicy.portLevelSettings[0].port.number"]
    );
    assert_eq!(
        pls("[{port: {number: 80}, loadBalancer: {simple: RANDOM}}, {port: {number: 80}, loadBalancer: {simple: RANDOM}}]"),
        vec!["spec.trafficPolicy.portLevelSettings[1].port.number"]
    );
    assert_eq!(
        pls("[{loadBalancer: {simple: RANDOM}}]"),
        vec!["spec.trafficPolicy.portLevelSettings[0].port"]
    );
    assert_eq!(
        pls("[{port: {number: 80}}]"),
        vec!["spec.trafficPolicy.portLevelSettings[0]"]
    );
}

#[test]
fn dr_workload_selector_export() {
    assert_eq!(
        dr("host: r\nworkloadSelector: {labels: {app: a}}\nexportTo: ['.']"),
        none()
    );
    assert_eq!(
        dr("host: r\nworkloadSelector: {labels: {app: a}}\nexportTo: ['*']"),
        vec!["spec.exportTo"]
    );
    assert_eq!(
        dr("host: r\nworkloadSelector: {labels: {app: '*'}}"),
        vec!["spec.workloadSelector.labels[app]"]
    );
}

// ---------------------------------------------------------------- Gateway

const HTTP_SERVER: &str = "{port: {number: 80, name: http, protocol: HTTP}, hosts: ['*']}";

#[test]
fn gw_valid() {
    assert_eq!(
        gw("selector: {istio: ingressgateway}\nservers:\n- port: {number: 80, name: http, protocol: HTTP}\n  hosts: ['*', 'ns/a.example.com', './b.example.com']\n  tls: {httpsRedirect: true}\n- port: {number: 443, name: https, protocol: HTTPS}\n  hosts: ['*.example.com']\n  tls: {mode: SIMPLE, credentialName: cert}\n- port: {number: 15443, name: tls, protocol: TLS}\n  hosts: ['*.local']\n  tls: {mode: AUTO_PASSTHROUGH}"),
        none()
    );
}

#[test]
fn gw_servers_and_ports() {
    assert_eq!(gw("servers: []"), vec!["spec.servers"]);
    assert_eq!(
        gw("servers: [{port: {number: 0, name: http, protocol: HTTP}, hosts: ['*']}]"),
        vec!["spec.servers[0].port.number"]
    );
    assert_eq!(
        gw("servers: [{port: {number: 80, name: x, protocol: FOO}, hosts: ['*']}]"),
        vec!["spec.servers[0].port.protocol"]
    );
    assert_eq!(
        gw("servers: [{port: {number: 80, protocol: HTTP}, hosts: ['*']}]"),
        vec!["spec.servers[0].port.name"]
    );
    assert_eq!(
        gw(&format!("servers: [{HTTP_SERVER}, {{port: {{number: 81, name: http, protocol: HTTP}}, hosts: ['*']}}]")),
        vec!["spec.servers[1].port.name"]
    );
    assert_eq!(gw("servers: [{port: {number: 80, name: h, protocol: HTTP}, hosts: ['*'], bind: not-an-ip}]"), vec!["spec.servers[0].bind"]);
}

#[test]
fn gw_hosts() {
    assert_eq!(
        gw("servers: [{port: {number: 80, name: h, protocol: HTTP}, hosts: []}]"),
        vec!["spec.servers[0].hosts"]
    );
    assert_eq!(
        gw("servers: [{port: {number: 80, name: h, protocol: HTTP}, hosts: ['ns/shortname']}]"),
        vec!["spec.servers[0].hosts[0]"]
    );
    assert_eq!(
        gw("servers: [{port: {number: 80, name: h, protocol: HTTP}, hosts: ['Bad_NS/a.com']}]"),
        vec!["spec.servers[0].hosts[0]"]
    );
    assert_eq!(
        gw("servers: [{port: {number: 80, name: h, protocol: HTTP}, hosts: ['a*.com']}]"),
        vec!["spec.servers[0].hosts[0]"]
    );
    assert_eq!(
        gw("servers: [{port: {number: 80, name: h, protocol: HTTP}, hosts: ['10.0.0.1']}]"),
        none()
    );
}

#[test]
fn gw_tls() {
    let s = |proto: &str, tls: &str| {
        gw(&format!("servers: [{{port: {{number: 443, name: p, protocol: {proto}}}, hosts: ['*'], tls: {tls}}}]"))
    };
    assert_eq!(
        gw("servers: [{port: {number: 443, name: p, protocol: HTTPS}, hosts: ['*']}]"),
        vec!["spec.servers[0].tls"]
    );
    assert_eq!(
        s("HTTPS", "{mode: SIMPLE}"),
        vec![
            "spec.servers[0].tls.serverCertificate",
            "spec.servers[0].tls.privateKey"
        ]
    );
    assert_eq!(
        s(
            "HTTPS",
            "{mode: SIMPLE, serverCertificate: /c.pem, privateKey: /k.pem}"
        ),
        none()
    );
    assert_eq!(
        s(
            "HTTPS",
            "{mode: MUTUAL, serverCertificate: /c.pem, privateKey: /k.pem}"
        ),
        vec!["spec.servers[0].tls.caCertificates"]
    );
    assert_eq!(s("TLS", "{mode: PASSTHROUGH}"), none());
    assert_eq!(
        s("TLS", "{mode: ISTIO_MUTUAL, credentialName: x}"),
        vec!["spec.servers[0].tls.credentialName"]
    );
    assert_eq!(
        s("HTTP", "{mode: SIMPLE, credentialName: c}"),
        vec!["spec.servers[0].tls"]
    );
    assert_eq!(s("TCP", "{mode: PASSTHROUGH}"), vec!["spec.servers[0].tls"]);
    assert_eq!(
        s(
            "HTTPS",
            "{mode: SIMPLE, credentialName: c, minProtocolVersion: TLSV9}"
        ),
        vec!["spec.servers[0].tls.minProtocolVersion"]
    );
}

// ---------------------------------------------------------------- ServiceEntry

#[test]
fn se_valid() {
    assert_eq!(se("hosts: ['*.googleapis.com']\nlocation: MESH_EXTERNAL\nports: [{number: 443, name: https, protocol: HTTPS}]\nresolution: NONE"), none());
    assert_eq!(se("hosts: [api.example.com]\nports: [{number: 443, name: tls, protocol: TLS}]\nresolution: DNS"), none());
    assert_eq!(
        se("hosts: [db.internal]\naddresses: [10.1.0.0/16]\nports: [{number: 5432, name: pg, protocol: TCP}]\nresolution: STATIC\nendpoints: [{address: 10.1.2.3, ports: {pg: 15432}}, {address: 'unix:///var/run/pg.sock'}]"),
        none()
    );
}

#[test]
fn se_hosts() {
    assert_eq!(
        se("ports: [{number: 80, name: http, protocol: HTTP}]"),
        vec!["spec.hosts"]
    );
    assert_eq!(
        se("hosts: ['*']\nports: [{number: 80, name: http, protocol: HTTP}]"),
        vec!["spec.hosts[0]"]
    );
    // DNS resolution without endpoints needs resolvable (non-wildcard) hosts.
    assert_eq!(se("hosts: ['*.a.com']\nports: [{number: 80, name: http, protocol: HTTP}]\nresolution: DNS"), vec!["spec.hosts[0]"]);
    // Several hosts with plain TCP cannot be told apart.
    assert_eq!(se("hosts: [a.com, b.com]\nports: [{number: 9000, name: tcp, protocol: TCP}]\nresolution: DNS"), vec!["spec.ports[0].protocol"]);
}

#[test]
fn se_ports() {
    assert_eq!(
        se("hosts: [a.com]\nports: [{number: 80, name: http, protocol: HTTP}, {number: 80, name: http, protocol: HTTP}]"),
        vec!["spec.ports[1].name", "spec.ports[1].number"]
    );
    assert_eq!(
        se("hosts: [a.com]\nports: [{number: 80, name: http, protocol: SMTP}]"),
        vec!["spec.ports[0].protocol"]
    );
    assert_eq!(
        se("hosts: [a.com]\nports: [{number: 0, name: 'Bad_Name', protocol: HTTP}]"),
        vec!["spec.ports[0].name", "spec.ports[0].number"]
    );
}

#[test]
fn se_addresses() {
    assert_eq!(
        se("hosts: [a.com]\naddresses: [not-an-ip]\nports: [{number: 80, name: http}]"),
        vec!["spec.addresses[0]"]
    );
    assert_eq!(se("hosts: [a.com]\naddresses: [10.0.0.0/8]\nports: [{number: 80, name: http}]\nresolution: DNS"), vec!["spec.addresses"]);
}

#[test]
fn se_resolution_and_endpoints() {
    let p = "ports: [{number: 80, name: http, protocol: HTTP}]";
    assert_eq!(
        se(&format!(
            "hosts: [a.com]\n{p}\nresolution: STATIC\nendpoints: [{{address: a.example.com}}]"
        )),
        vec!["spec.endpoints[0].address"]
    );
    assert_eq!(
        se(&format!("hosts: [a.com]\n{p}\nresolution: STATIC")),
        vec!["spec.endpoints"]
    );
    assert_eq!(
        se(&format!(
            "hosts: [a.com]\n{p}\nresolution: STATIC\nworkloadSelector: {{labels: {{app: vm}}}}"
        )),
        none()
    );
    assert_eq!(
        se(&format!(
            "hosts: [a.com]\n{p}\nresolution: DNS\nendpoints: [{{address: b.example.com}}]"
        )),
        none()
    );
    assert_eq!(
        se(&format!(
            "hosts: [a.com]\n{p}\nresolution: DNS\nendpoints: [{{address: 'b_example'}}]"
        )),
        vec!["spec.endpoints[0].address"]
    );
    assert_eq!(se(&format!("hosts: [a.com]\n{p}\nresolution: STATIC\nendpoints: [{{address: 1.2.3.4, ports: {{grpc: 9090}}}}]")), vec!["spec.endpoints[0].ports[grpc]"]);
    assert_eq!(
        se(&format!(
            "hosts: [a.com]\n{p}\nresolution: NONE\nendpoints: [{{address: 1.2.3.4}}]"
        )),
        vec!["spec.endpoints"]
    );
    assert_eq!(
        se(&format!("hosts: [a.com]\n{p}\nresolution: STATIC\nworkloadSelector: {{labels: {{app: vm}}}}\nendpoints: [{{address: 1.2.3.4}}]")),
        vec!["spec.workloadSelector"]
    );
    assert_eq!(se(&format!("hosts: [a.com]\n{p}\nresolution: DNS_ROUND_ROBIN\nendpoints: [{{address: b.com}}, {{address: c.com}}]")), vec!["spec.endpoints"]);
}

// ---------------------------------------------------------------- WorkloadEntry / Group

#[test]
fn workload_entry() {
    let we = |spec: &str| fields_of(&doc("WorkloadEntry", spec));
    assert_eq!(we("address: 10.0.0.5\nports: {http: 8080}\nlabels: {app: vm}\nserviceAccount: sa\nweight: 5"), none());
    assert_eq!(we("address: vm1.example.com"), none());
    assert_eq!(we("labels: {app: vm}"), vec!["spec.address"]);
    assert_eq!(we("network: net1"), none());
    assert_eq!(we("address: 'bad_host!'"), vec!["spec.address"]);
    assert_eq!(
        we("address: 10.0.0.5\nports: {http: 0}"),
        vec!["spec.ports[http]"]
    );
    assert_eq!(
        we("address: 10.0.0.5\nports: {Bad_Name: 80}"),
        vec!["spec.ports[Bad_Name]"]
    );
}

#[test]
fn workload_group() {
    let wg = |spec: &str| fields_of(&doc("WorkloadGroup", spec));
    assert_eq!(wg("metadata: {labels: {app: vm}}\ntemplate: {ports: {http: 8080}, serviceAccount: sa}\nprobe: {httpGet: {port: 8080, path: /ready}}"), none());
    assert_eq!(
        wg("template: {address: 10.0.0.1}"),
        vec!["spec.template.address"]
    );
    assert_eq!(
        wg("metadata: {labels: {'bad key': x}}\ntemplate: {}"),
        vec!["spec.metadata.labels[bad key]"]
    );
    assert_eq!(
        wg("template: {}\nprobe: {tcpSocket: {port: 0}}"),
        vec!["spec.probe.tcpSocket.port"]
    );
    assert_eq!(
        wg("template: {}\nprobe: {periodSeconds: 5}"),
        vec!["spec.probe"]
    );
}

// ---------------------------------------------------------------- Sidecar

#[test]
fn sidecar() {
    let sc = |spec: &str| fields_of(&doc("Sidecar", spec));
    assert_eq!(
        sc("workloadSelector: {labels: {app: a}}\ningress: [{port: {number: 9080, protocol: HTTP, name: http}, defaultEndpoint: '127.0.0.1:8080'}]\negress:\n- port: {number: 3306, protocol: MYSQL, name: mysql}\n  hosts: ['*/mysql.foo.com']\n- hosts: ['./*', 'istio-system/*']\noutboundTrafficPolicy: {mode: REGISTRY_ONLY}"),
        none()
    );
    assert_eq!(sc("{}"), vec!["spec"]);
    assert_eq!(
        sc("egress: [{hosts: [foo.com]}]"),
        vec!["spec.egress[0].hosts[0]"]
    );
    assert_eq!(sc("egress: [{hosts: []}]"), vec!["spec.egress[0].hosts"]);
    assert_eq!(
        sc("egress: [{hosts: ['./*']}, {hosts: ['*/*']}]"),
        vec!["spec.egress[0]"]
    );
    assert_eq!(
        sc("egress: [{port: {number: 70000, protocol: HTTP, name: h}, hosts: ['./*']}]"),
        vec!["spec.egress[0].port.number"]
    );
    assert_eq!(
        sc("ingress: [{port: {number: 0, protocol: HTTP, name: h}}]"),
        vec!["spec.ingress[0].port.number"]
    );
    assert_eq!(sc("ingress: [{port: {number: 80, protocol: HTTP, name: h}, defaultEndpoint: '10.0.0.1:80'}]"), vec!["spec.ingress[0].defaultEndpoint"]);
    assert_eq!(
        sc("outboundTrafficPolicy: {mode: REGISTRY_ONLY, egressProxy: {host: egress.ns.svc.cluster.local, port: {number: 80}}}"),
        vec!["spec.outboundTrafficPolicy.egressProxy"]
    );
    assert_eq!(sc("outboundTrafficPolicy: {mode: ALLOW_ANY, egressProxy: {host: egress.ns.svc.cluster.local, port: {number: 80}}}"), none());
    assert_eq!(
        sc("workloadSelector: {labels: {'': x}}\negress: [{hosts: ['./*']}]"),
        vec!["spec.workloadSelector.labels[]"]
    );
}
