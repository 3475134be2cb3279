//! ProxyConfig `proxyHeaders.preserveHttp1HeaderCase`, as istiod applies it: Envoy's
//! `preserve_case` formatter on every HCM and on the clusters of HTTP and auto-detected ports
//! (outbound and inbound) and both passthrough clusters, from the proxy's own ProxyConfig
//! (node metadata `PROXY_CONFIG`) else the mesh default; nowhere otherwise. The sidecar's
//! `virtualInbound` and its clusters then go through `envoy --mode validate`.

mod common;

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3::{filter, Listener};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as httpv3;
use mizzen_model::{MeshSettings, Proxy, PushContext};
use mizzen_xds::any::unpack_any;
use mizzen_xds::gen::{cluster as cgen, endpoint as egen, listener as lgen};
use std::path::Path;
use std::sync::Arc;

const CONFIG: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: foo, labels: {app: web}}
status: {podIP: 10.0.0.1}
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
  - {name: grpc, port: 9200}
"#;

const PRESERVE_CASE: &str =
    "type.googleapis.com/envoy.extensions.http.header_formatters.preserve_case.v3.PreserveCaseFormatterConfig";

fn push(mesh_default: bool) -> PushContext {
    let load = mizzen_config::load::load_str(Path::new("header_case.yaml"), CONFIG);
    let errors: Vec<String> = load.errors().map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:#?}");
    let registry = mizzen_model::registry::from_resources(&load.resources, "cluster.local");
    let mesh = MeshSettings {
        preserve_http1_header_case: mesh_default,
        ..Default::default()
    };
    PushContext::build("1".into(), mesh, Arc::new(load.resources), registry)
}

/// The web pod's sidecar, with `PROXY_CONFIG` in its node metadata when given.
fn sidecar(push: &PushContext, proxy_config: Option<serde_json::Value>) -> Proxy {
    let mut md = serde_json::json!({"NAMESPACE": "foo"});
    if let Some(pc) = proxy_config {
        md["PROXY_CONFIG"] = pc;
    }
    let mut p =
        Proxy::from_node("sidecar~10.0.0.1~web-1.foo~foo.svc.cluster.local", &md).expect("node id");
    p.resolve(push);
    p
}

fn preserve(on: bool) -> Option<serde_json::Value> {
    Some(serde_json::json!({"proxyHeaders": {"preserveHttp1HeaderCase": on}}))
}

fn preserves(h1: Option<&core::Http1ProtocolOptions>) -> bool {
    use core::http1_protocol_options::header_key_format::HeaderFormat;
    matches!(
        h1.and_then(|o| o.header_key_format.as_ref()).and_then(|k| k.header_format.as_ref()),
        Some(HeaderFormat::StatefulFormatter(t))
            if t.typed_config.as_ref().is_some_and(|a| a.type_url == PRESERVE_CASE)
    )
}

/// Names of the clusters whose upstream HTTP/1 options carry the preserve-case formatter.
fn preserving_clusters(cs: &[Cluster]) -> Vec<&str> {
    use httpv3::http_protocol_options::{
        explicit_http_config::ProtocolConfig, UpstreamProtocolOptions,
    };
    cs.iter()
        .filter(|c| {
            c.typed_extension_protocol_options.values().any(|any| {
                let o: Option<httpv3::HttpProtocolOptions> = unpack_any(any);
                match o.and_then(|o| o.upstream_protocol_options) {
                    Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => matches!(
                        &e.protocol_config,
                        Some(ProtocolConfig::HttpProtocolOptions(h1)) if preserves(Some(h1))
                    ),
                    _ => false,
                }
            })
        })
        .map(|c| c.name.as_str())
        .collect()
}

/// Every HCM of the listeners: (listener, whether it preserves case).
fn hcms(ls: &[Listener]) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for l in ls {
        for chain in l
            .filter_chains
            .iter()
            .chain(l.default_filter_chain.as_ref())
        {
            for f in &chain.filters {
                if let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type {
                    if let Some(h) = unpack_any::<HttpConnectionManager>(any) {
                        out.push((l.name.clone(), preserves(h.http_protocol_options.as_ref())));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn preserve_case_where_istiod_sets_it() {
    let push = push(false);
    let proxy = sidecar(&push, preserve(true));
    let cs = cgen::generate(&proxy, &push);
    let mut got = preserving_clusters(&cs);
    got.sort_unstable();
    // HTTP (8080) and auto (9100) ports, both ways, and the passthrough clusters; not TCP
    // (9000) nor gRPC (9200, HTTP/2).
    assert_eq!(
        got,
        vec![
            "InboundPassthroughCluster",
            "PassthroughCluster",
            "inbound|8080||",
            "inbound|9100||",
            "outbound|8080||web.foo.svc.cluster.local",
            "outbound|9100||web.foo.svc.cluster.local",
        ]
    );
    let ls = lgen::generate(&proxy, &push);
    let h = hcms(&ls);
    assert!(h.len() >= 3, "{h:?}");
    assert!(h.iter().all(|(_, p)| *p), "{h:?}");

    // Envoy takes it: virtualInbound (inline routes) and every cluster, EDS made static.
    let inbound = ls
        .into_iter()
        .find(|l| l.name == lgen::VIRTUAL_INBOUND)
        .expect("virtualInbound");
    let clusters = cs
        .into_iter()
        .map(|mut c| {
            if matches!(c.cluster_discovery_type, Some(cluster::ClusterDiscoveryType::Type(t)) if t == cluster::DiscoveryType::Eds as i32)
            {
                c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
                    cluster::DiscoveryType::Static as i32,
                ));
                c.eds_cluster_config = None;
                c.load_assignment = Some(egen::generate(&proxy, &push, &c.name));
            }
            c
        })
        .collect();
    if let Err(e) = common::envoy_validate("header-case", "config", vec![inbound], clusters) {
        panic!("{e}");
    }
}

#[test]
fn the_proxy_config_overrides_the_mesh_default() {
    for (mesh, own, want) in [
        (false, None, false),
        (true, None, true),
        (true, preserve(false), false),
        (false, preserve(true), true),
    ] {
        let push = push(mesh);
        let proxy = sidecar(&push, own.clone());
        let cs = cgen::generate(&proxy, &push);
        let h = hcms(&lgen::generate(&proxy, &push));
        assert!(!h.is_empty());
        let what = format!("mesh default {mesh}, PROXY_CONFIG {own:?}");
        assert_eq!(!preserving_clusters(&cs).is_empty(), want, "{what}");
        assert!(h.iter().all(|(_, p)| *p == want), "{what}: {h:?}");
    }
}
