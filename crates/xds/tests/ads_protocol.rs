#![allow(clippy::unwrap_used, clippy::expect_used)] // test file: failures should panic loudly
//! The ADS protocol over a real gRPC connection: a tonic client against the server on a
//! loopback socket. Covers what Envoy never exercises on its own: a NACK (recorded with its
//! message, nothing resent, previous config kept), stale nonces, delta subscriptions,
//! removals, and pushes after a config change.

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use mizzen_model::{registry, MeshSettings, PushContext};
use mizzen_xds::any;
use mizzen_xds::server::Discovery;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

const V1: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  clusterIP: 10.96.0.20
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: default, labels: {app: reviews, version: v1}}
status: {podIP: 10.0.0.5}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default}
spec:
  clusterIP: 10.96.0.21
  selector: {app: ratings}
  ports: [{name: http, port: 9080}]
"#;

fn push(version: &str, yaml: &str) -> Arc<PushContext> {
    let load = mizzen_config::load::load_str(std::path::Path::new("test.yaml"), yaml);
    assert!(
        load.errors().next().is_none(),
        "{:?}",
        load.errors().collect::<Vec<_>>()
    );
    let reg = registry::from_resources(&load.resources, "cluster.local");
    Arc::new(PushContext::build(
        version.into(),
        MeshSettings::default(),
        Arc::new(load.resources),
        reg,
    ))
}

fn node() -> Node {
    let mut md = Struct::default();
    md.fields.insert(
        "NAMESPACE".into(),
        Value {
            kind: Some(Kind::StringValue("default".into())),
        },
    );
    Node {
        id: "sidecar~10.0.0.9~client.default~default.svc.cluster.local".into(),
        metadata: Some(md),
        ..Default::default()
    }
}

async fn start(initial: Arc<PushContext>) -> (String, watch::Sender<Arc<PushContext>>, Discovery) {
    let (tx, rx) = watch::channel(initial);
    let discovery = Discovery::new(rx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = discovery.clone().into_service();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (format!("http://{addr}"), tx, discovery)
}

async fn next<T>(s: &mut tonic::Streaming<T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("response within 5s")
        .expect("stream ok")
        .expect("stream open")
}

#[tokio::test]
async fn sotw_nack_is_recorded_and_nothing_is_resent() {
    let (addr, push_tx, discovery) = start(push("v1", V1)).await;
    let mut client = AggregatedDiscoveryServiceClient::connect(addr)
        .await
        .unwrap();
    let (req_tx, req_rx) = mpsc::channel(8);
    req_tx
        .send(DiscoveryRequest {
            node: Some(node()),
            type_url: any::CLUSTER.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut resp = client
        .stream_aggregated_resources(ReceiverStream::new(req_rx))
        .await
        .unwrap()
        .into_inner();
    let r1 = next(&mut resp).await;
    assert_eq!(r1.type_url, any::CLUSTER);
    assert!(
        r1.resources.len() >= 4,
        "outbound clusters + Passthrough/BlackHole/InboundPassthrough"
    );
    // NACK it.
    req_tx
        .send(DiscoveryRequest {
            type_url: any::CLUSTER.into(),
            response_nonce: r1.nonce.clone(),
            version_info: String::new(),
            error_detail: Some(RpcStatus {
                code: 3,
                message: "cluster X: bad thing".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    // Nothing is resent for a NACK: the next message only comes with a config change.
    let quiet = tokio::time::timeout(Duration::from_millis(300), resp.message()).await;
    assert!(quiet.is_err(), "server resent after a NACK: {quiet:?}");
    let st = discovery.status.snapshot();
    let cds = &st[0].resources[any::CLUSTER];
    let nack = cds.nack.as_ref().expect("NACK recorded");
    assert_eq!(nack.message, "cluster X: bad thing");
    assert_eq!(cds.acked_version, None);
    // A stale nonce (not the last one sent) is ignored.
    req_tx
        .send(DiscoveryRequest {
            type_url: any::CLUSTER.into(),
            response_nonce: "bogus".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // A config change produces a new version; ACK it and the NACK clears.
    push_tx
        .send(push(
            "v2",
            &V1.replace(
                "port: 9080}]\n---\napiVersion: v1\nkind: Pod",
                "port: 9081}]\n---\napiVersion: v1\nkind: Pod",
            ),
        ))
        .unwrap();
    // The reviews port moved 9080 -> 9081: the old cluster stays in the first CDS response
    // (listeners and routes may still point at it) and is removed by a final one.
    let r2 = next(&mut resp).await;
    assert_eq!(r2.version_info, "v2");
    assert_eq!(r2.resources.len(), r1.resources.len() + 1);
    let r2 = next(&mut resp).await;
    assert_eq!(r2.resources.len(), r1.resources.len());
    req_tx
        .send(DiscoveryRequest {
            type_url: any::CLUSTER.into(),
            response_nonce: r2.nonce.clone(),
            version_info: r2.version_info.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let st = discovery.status.snapshot();
    let cds = &st[0].resources[any::CLUSTER];
    assert_eq!(cds.acked_version.as_deref(), Some("v2"));
    assert!(cds.nack.is_none());
    assert_eq!(cds.nacks, 1);
}

#[tokio::test]
async fn delta_subscribe_push_and_remove() {
    let (addr, push_tx, _discovery) = start(push("v1", V1)).await;
    let mut client = AggregatedDiscoveryServiceClient::connect(addr)
        .await
        .unwrap();
    let (req_tx, req_rx) = mpsc::channel(8);
    req_tx
        .send(DeltaDiscoveryRequest {
            node: Some(node()),
            type_url: any::CLUSTER.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut resp = client
        .delta_aggregated_resources(ReceiverStream::new(req_rx))
        .await
        .unwrap()
        .into_inner();
    let r1 = next(&mut resp).await;
    let names: Vec<&str> = r1.resources.iter().map(|r| r.name.as_str()).collect();
    assert!(
        names.contains(&"outbound|9080||ratings.default.svc.cluster.local"),
        "{names:?}"
    );
    assert!(r1.removed_resources.is_empty());
    req_tx
        .send(DeltaDiscoveryRequest {
            type_url: any::CLUSTER.into(),
            response_nonce: r1.nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    // EDS by name.
    req_tx
        .send(DeltaDiscoveryRequest {
            type_url: any::ENDPOINT.into(),
            resource_names_subscribe: vec![
                "outbound|9080||reviews.default.svc.cluster.local".into()
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    let e1 = next(&mut resp).await;
    assert_eq!(e1.type_url, any::ENDPOINT);
    assert_eq!(e1.resources.len(), 1);
    req_tx
        .send(DeltaDiscoveryRequest {
            type_url: any::ENDPOINT.into(),
            response_nonce: e1.nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Remove the ratings service: the CDS removal comes last, after the (unchanged) others.
    let without_ratings = V1
        .split("---\napiVersion: v1\nkind: Service\nmetadata: {name: ratings")
        .next()
        .unwrap()
        .to_string();
    push_tx.send(push("v2", &without_ratings)).unwrap();
    let r2 = next(&mut resp).await;
    assert_eq!(r2.type_url, any::CLUSTER);
    assert_eq!(
        r2.removed_resources,
        vec!["outbound|9080||ratings.default.svc.cluster.local".to_string()]
    );
    assert!(
        r2.resources.is_empty(),
        "nothing else changed: {:?}",
        r2.resources.iter().map(|r| &r.name).collect::<Vec<_>>()
    );
}
