//! Mesh mTLS output checked by Envoy itself and by shape: with the pilot's CA on, a sidecar's
//! `virtualInbound` (STRICT / PERMISSIVE / DISABLE ports from PeerAuthentication) and its
//! clusters (auto mTLS, DestinationRule ISTIO_MUTUAL and DISABLE) go into a static bootstrap
//! with Istio's `sds-grpc` cluster and through `envoy --mode validate`; without a CA nothing
//! refers to SDS (only proxies with a workload identity have the agent's SDS cluster).

mod common;

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as httpv3;
use mizzen_model::{MeshSettings, Proxy, PushContext};
use mizzen_xds::any::pack;
use mizzen_xds::gen::{cluster as cgen, endpoint as egen, listener as lgen};
use prost::Message;
use std::path::Path;
use std::sync::Arc;

const CONFIG: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: foo
  labels: {app: web, security.istio.io/tlsMode: istio}
spec: {serviceAccountName: web-sa}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy-1, namespace: foo, labels: {app: legacy}}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: foo}
spec:
  clusterIP: 10.9.0.1
  selector: {app: web}
  ports:
  - {name: http, port: 8080}
  - {name: tcp, port: 9000}
  - {name: auto, port: 9100}
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: foo}
spec:
  clusterIP: 10.9.0.2
  selector: {app: legacy}
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: pinned, namespace: foo}
spec:
  clusterIP: 10.9.0.3
  selector: {app: web}
  ports: [{name: http, port: 81, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: legacy, namespace: foo}
spec:
  host: legacy
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL, sni: legacy.internal, subjectAltNames: ["spiffe://cluster.local/ns/foo/sa/legacy"]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pinned, namespace: foo}
spec:
  host: pinned
  trafficPolicy: {tls: {mode: DISABLE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web, namespace: foo}
spec:
  selector: {matchLabels: {app: web}}
  portLevelMtls:
    "9000": {mode: PERMISSIVE}
    "9100": {mode: DISABLE}
"#;

fn push(ca_enabled: bool) -> PushContext {
    let load = mizzen_config::load::load_str(Path::new("mtls_envoy.yaml"), CONFIG);
    let errors: Vec<String> = load.errors().map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "fixture rejected: {errors:#?}");
    let registry = mizzen_model::registry::from_resources(&load.resources, "cluster.local");
    PushContext::build(
        "1".into(),
        MeshSettings {
            ca_enabled,
            ..Default::default()
        },
        Arc::new(load.resources),
        registry,
    )
}

fn web_sidecar(push: &PushContext) -> Proxy {
    let md = serde_json::json!({"NAMESPACE": "foo"});
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

fn chain_names(l: &Listener) -> Vec<&str> {
    l.filter_chains.iter().map(|c| c.name.as_str()).collect()
}

fn cluster<'a>(cs: &'a [Cluster], name: &str) -> &'a Cluster {
    cs.iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

fn upstream_tls(ts: &core::TransportSocket) -> UpstreamTlsContext {
    match &ts.config_type {
        Some(core::transport_socket::ConfigType::TypedConfig(a)) => {
            UpstreamTlsContext::decode(a.value.as_slice()).expect("UpstreamTlsContext")
        }
        None => panic!("transport socket without config"),
    }
}

/// Istio's agent-side SDS cluster, as the bootstrap has it (any address: validate mode does
/// not connect).
fn sds_cluster() -> Cluster {
    let opts = httpv3::HttpProtocolOptions {
        upstream_protocol_options: Some(
            httpv3::http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                httpv3::http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(
                        httpv3::http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                            Default::default(),
                        ),
                    ),
                },
            ),
        ),
        ..Default::default()
    };
    Cluster {
        name: "sds-grpc".into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: "sds-grpc".into(),
            ..Default::default()
        }),
        typed_extension_protocol_options: [(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
            pack(&opts),
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    }
}

/// EDS clusters become STATIC with the generated endpoints (metadata included).
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
                c.load_assignment = Some(egen::generate(proxy, push, &c.name));
            }
            c
        })
        .collect()
}

fn envoy_validate(tag: &str, listener: Listener, clusters: Vec<Cluster>) -> Result<(), String> {
    common::envoy_validate(&format!("mtls-{tag}"), "config", vec![listener], clusters)
}

#[test]
fn inbound_chains_follow_peer_authentication() {
    let push = push(true);
    let proxy = web_sidecar(&push);
    let l = inbound(&push, &proxy);
    let names = chain_names(&l);
    // 8080: mesh STRICT (workload UNSET inherits): mTLS + a refusing chain, no plaintext HCM.
    assert!(names.contains(&"inbound|8080||_mtls"), "{names:?}");
    assert!(
        names.contains(&"inbound|8080||_plaintext_refused"),
        "{names:?}"
    );
    assert!(!names.contains(&"inbound|8080||"), "{names:?}");
    // 9000: PERMISSIVE: both.
    assert!(names.contains(&"inbound|9000||_mtls") && names.contains(&"inbound|9000||"));
    // 9100: DISABLE: plaintext (HTTP detection) only.
    assert!(!names.iter().any(|n| n.starts_with("inbound|9100||_mtls")));
    assert!(names.contains(&"inbound|9100||_http") && names.contains(&"inbound|9100||_tcp"));
    // Workload STRICT: unknown ports take mTLS only; the default chain refuses.
    assert!(names.contains(&"InboundPassthroughFilterChain_mtls"));
    let default = l.default_filter_chain.as_ref().expect("default chain");
    assert!(default
        .encode_to_vec()
        .windows(16)
        .any(|w| w == b"BlackHoleCluster"));
    let mtls = l
        .filter_chains
        .iter()
        .find(|c| c.name == "inbound|8080||_mtls")
        .expect("mtls chain");
    let m = mtls.filter_chain_match.as_ref().expect("match");
    assert_eq!(m.transport_protocol, "tls");
    assert_eq!(m.application_protocols, ["istio-peer-exchange", "istio"]);
    assert!(mtls.transport_socket.is_some());
    assert!(l
        .listener_filters
        .iter()
        .any(|f| f.name == "envoy.filters.listener.tls_inspector"));

    let mut clusters = static_clusters(&push, &proxy);
    clusters.push(sds_cluster());
    if let Err(e) = envoy_validate("inbound", l, clusters) {
        panic!("{e}");
    }
}

#[test]
fn outbound_auto_mtls_and_destination_rule_modes() {
    let push = push(true);
    let proxy = web_sidecar(&push);
    let cs = static_clusters(&push, &proxy);
    // Auto mTLS: two matches, the istio one with Istio's SNI, ALPN and the service's SA.
    let web = cluster(&cs, "outbound|8080||web.foo.svc.cluster.local");
    assert!(web.transport_socket.is_none());
    let names: Vec<&str> = web
        .transport_socket_matches
        .iter()
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(names, ["tlsMode-istio", "tlsMode-disabled"]);
    let ctx = upstream_tls(
        web.transport_socket_matches[0]
            .transport_socket
            .as_ref()
            .expect("socket"),
    );
    assert_eq!(ctx.sni, "outbound_.8080_._.web.foo.svc.cluster.local");
    let common = ctx.common_tls_context.expect("common");
    assert_eq!(common.alpn_protocols, ["istio-peer-exchange", "istio"]);
    assert!(format!("{:?}", common.validation_context_type)
        .contains("spiffe://cluster.local/ns/foo/sa/web-sa"));
    // The endpoint with a sidecar carries the match metadata (beside istiod's telemetry
    // metadata `istio: {workload}`, which every endpoint of a known workload has).
    let tls_match = |eps: &envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment| {
        eps.endpoints[0].lb_endpoints[0]
            .metadata
            .as_ref()
            .is_some_and(|m| {
                m.filter_metadata
                    .contains_key("envoy.transport_socket_match")
            })
    };
    assert!(tls_match(web.load_assignment.as_ref().expect("endpoints")));
    // Port 9100: the workload DISABLEs mTLS there, so its endpoint does not ask for it.
    let auto = cluster(&cs, "outbound|9100||web.foo.svc.cluster.local");
    assert!(!tls_match(
        auto.load_assignment.as_ref().expect("endpoints")
    ));
    // DR ISTIO_MUTUAL: mTLS even without the label; DR DISABLE: plaintext despite it.
    let legacy = cluster(&cs, "outbound|80||legacy.foo.svc.cluster.local");
    assert!(legacy.transport_socket_matches.is_empty());
    let ctx = upstream_tls(
        legacy
            .transport_socket
            .as_ref()
            .expect("ISTIO_MUTUAL socket"),
    );
    assert_eq!(ctx.sni, "legacy.internal");
    assert!(
        format!("{:?}", ctx.common_tls_context).contains("spiffe://cluster.local/ns/foo/sa/legacy")
    );
    let pinned = cluster(&cs, "outbound|81||pinned.foo.svc.cluster.local");
    assert!(pinned.transport_socket.is_none() && pinned.transport_socket_matches.is_empty());

    let mut clusters = cs;
    clusters.push(sds_cluster());
    if let Err(e) = envoy_validate("outbound", inbound(&push, &proxy), clusters) {
        panic!("{e}");
    }
}

#[test]
fn without_a_ca_nothing_refers_to_sds() {
    let push = push(false);
    let proxy = web_sidecar(&push);
    let l = inbound(&push, &proxy);
    assert!(!chain_names(&l).iter().any(|n| n.ends_with("_mtls")));
    let cs = static_clusters(&push, &proxy);
    assert!(cs
        .iter()
        .all(|c| c.transport_socket.is_none() && c.transport_socket_matches.is_empty()));
    // No sds-grpc cluster here: Envoy accepts it only because nothing refers to SDS.
    if let Err(e) = envoy_validate("no-ca", l, cs) {
        panic!("{e}");
    }
}

/// The harness can fail: an Istio SNI over TLS's 255-byte limit is rejected.
#[test]
fn envoy_rejects_a_broken_mtls_context() {
    let push = push(true);
    let proxy = web_sidecar(&push);
    let mut cs = static_clusters(&push, &proxy);
    let web = cs
        .iter_mut()
        .find(|c| c.name == "outbound|8080||web.foo.svc.cluster.local")
        .expect("web cluster");
    let ts = web.transport_socket_matches[0]
        .transport_socket
        .as_mut()
        .expect("socket");
    let mut ctx = upstream_tls(ts);
    ctx.sni = "x".repeat(300);
    ts.config_type = Some(core::transport_socket::ConfigType::TypedConfig(pack(&ctx)));
    cs.push(sds_cluster());
    let err = envoy_validate("negative", inbound(&push, &proxy), cs).expect_err("bad SNI accepted");
    assert!(err.to_lowercase().contains("sni"), "{err}");
}
