//! The agent's SDS server over its real Unix socket, driven by a gRPC client the way Envoy
//! drives it: SotW and delta subscriptions to `default` and `ROOTCA`, ACKs answered with
//! silence, and a new version pushed on every certificate rotation.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use mizzen_agent::identity_cert::WorkloadSecrets;
use mizzen_agent::sds::{SdsServer, SECRET_TYPE_URL};
use prost::Message;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

fn secrets(serial: &str) -> Arc<WorkloadSecrets> {
    Arc::new(WorkloadSecrets {
        cert_chain_pem: format!("CHAIN-{serial}"),
        key_pem: format!("KEY-{serial}"),
        root_pem: "ROOT".into(),
        serial: serial.into(),
        not_before: SystemTime::now(),
        not_after: SystemTime::now() + Duration::from_secs(60),
    })
}

/// A tonic connector that dials the SDS Unix socket whatever the URI says.
#[derive(Clone)]
struct Uds(PathBuf);

impl tonic::codegen::Service<Uri> for Uds {
    type Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Uri) -> Self::Future {
        let p = self.0.clone();
        Box::pin(async move {
            Ok(hyper_util::rt::TokioIo::new(
                tokio::net::UnixStream::connect(p).await?,
            ))
        })
    }
}

async fn start(
    tag: &str,
) -> (
    watch::Sender<Option<Arc<WorkloadSecrets>>>,
    Channel,
    PathBuf,
) {
    let dir = std::env::temp_dir().join(format!("mizzen-sds-{tag}-{}", std::process::id()));
    let (tx, rx) = watch::channel(None);
    let (socket, _task) = SdsServer::new(rx).serve(&dir).unwrap();
    assert!(socket.ends_with("workload-spiffe-uds/socket"));
    let ch = Endpoint::from_static("http://sds.invalid")
        .connect_with_connector(Uds(socket))
        .await
        .unwrap();
    (tx, ch, dir)
}

fn decode(any: &envoy_types::pb::google::protobuf::Any) -> Secret {
    assert_eq!(any.type_url, SECRET_TYPE_URL);
    Secret::decode(any.value.as_slice()).unwrap()
}

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn sotw_serves_default_and_rootca_and_pushes_rotations() {
    let (tx, ch, dir) = start("sotw").await;
    let mut client = SecretDiscoveryServiceClient::new(ch);
    let (req_tx, req_rx) = mpsc::channel(4);
    let names = vec!["default".to_string(), "ROOTCA".to_string()];
    req_tx
        .send(DiscoveryRequest {
            resource_names: names.clone(),
            type_url: SECRET_TYPE_URL.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut stream = client
        .stream_secrets(ReceiverStream::new(req_rx))
        .await
        .unwrap()
        .into_inner();

    // No certificate yet: the request waits instead of getting an empty answer.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.message())
            .await
            .is_err()
    );
    tx.send(Some(secrets("aa01"))).unwrap();
    let r = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.version_info, "aa01");
    let got: Vec<Secret> = r.resources.iter().map(decode).collect();
    assert_eq!(got.len(), 2);
    match &got[0].r#type {
        Some(secret::Type::TlsCertificate(c)) => {
            assert_eq!(got[0].name, "default");
            let chain = c.certificate_chain.as_ref().unwrap();
            assert!(format!("{chain:?}").contains(&format!("{:?}", b"CHAIN-aa01".to_vec())));
        }
        other => panic!("default is not a tls_certificate: {other:?}"),
    }
    assert!(matches!(
        &got[1].r#type,
        Some(secret::Type::ValidationContext(v)) if v.trusted_ca.is_some()
    ));

    // ACK: no answer.
    req_tx
        .send(DiscoveryRequest {
            version_info: r.version_info.clone(),
            response_nonce: r.nonce.clone(),
            resource_names: names.clone(),
            type_url: SECRET_TYPE_URL.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.message())
            .await
            .is_err()
    );

    // Rotation: a new version on the same stream.
    tx.send(Some(secrets("bb02"))).unwrap();
    let r2 = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r2.version_info, "bb02");
    assert_ne!(r2.nonce, r.nonce);
    assert_eq!(r2.resources.len(), 2);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn delta_subscribe_and_rotation() {
    let (tx, ch, dir) = start("delta").await;
    tx.send(Some(secrets("cc03"))).unwrap();
    let mut client = SecretDiscoveryServiceClient::new(ch);
    let (req_tx, req_rx) = mpsc::channel(4);
    req_tx
        .send(DeltaDiscoveryRequest {
            type_url: SECRET_TYPE_URL.into(),
            resource_names_subscribe: vec!["default".into(), "not-ours".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut stream = client
        .delta_secrets(ReceiverStream::new(req_rx))
        .await
        .unwrap()
        .into_inner();
    let r = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let names: Vec<&str> = r.resources.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(names, ["default"], "unknown names are not invented");
    assert_eq!(r.resources[0].version, "cc03");

    req_tx
        .send(DeltaDiscoveryRequest {
            type_url: SECRET_TYPE_URL.into(),
            response_nonce: r.nonce.clone(),
            resource_names_subscribe: vec!["ROOTCA".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let r = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let names: Vec<&str> = r.resources.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(names, ["ROOTCA"], "only the new subscription is sent");

    tx.send(Some(secrets("dd04"))).unwrap();
    let r = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let mut names: Vec<&str> = r.resources.iter().map(|x| x.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["ROOTCA", "default"]);
    assert!(r.resources.iter().all(|x| x.version == "dd04"));
    let _ = std::fs::remove_dir_all(dir);
}
