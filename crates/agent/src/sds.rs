//! SDS for Envoy on a Unix socket, Istio's contract: secret `default` is the workload's
//! certificate chain and key, `ROOTCA` the trust anchor. Envoy reaches it through the
//! bootstrap's static `sds-grpc` cluster (a pipe address), so nothing secret is ever written
//! to disk and a rotation is a new SDS version, not an Envoy restart.
//!
//! Both stream flavours are served: state of the world (`StreamSecrets`, what Envoy uses for
//! `api_type: GRPC`) and incremental (`DeltaSecrets`). Each stream follows the certificate
//! watch channel and pushes the secrets it subscribed to whenever a new certificate lands.

use crate::identity_cert::{SecretsRx, WorkloadSecrets};
use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, DataSource};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, CertificateValidationContext, Secret, TlsCertificate,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

/// Istio's secret names.
pub const WORKLOAD_SECRET: &str = "default";
pub const ROOT_SECRET: &str = "ROOTCA";
/// The bootstrap cluster through which Envoy reaches this server.
pub const SDS_CLUSTER: &str = "sds-grpc";
/// Socket path under the agent's config dir, named like Istio's
/// `./var/run/secrets/workload-spiffe-uds/socket`.
pub const SOCKET_REL_PATH: &str = "workload-spiffe-uds/socket";
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

#[derive(Debug, thiserror::Error)]
pub enum SdsError {
    #[error("SDS socket {path}: {error}")]
    Socket {
        path: PathBuf,
        error: std::io::Error,
    },
}

fn inline(s: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(s.as_bytes().to_vec())),
        ..Default::default()
    })
}

/// The Envoy `Secret` for `name`, or `None` for a name this agent does not serve.
pub fn secret_for(name: &str, s: &WorkloadSecrets) -> Option<Secret> {
    let ty = match name {
        WORKLOAD_SECRET => secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(&s.cert_chain_pem),
            private_key: inline(&s.key_pem),
            ..Default::default()
        }),
        ROOT_SECRET => secret::Type::ValidationContext(CertificateValidationContext {
            trusted_ca: inline(&s.root_pem),
            ..Default::default()
        }),
        _ => return None,
    };
    Some(Secret {
        name: name.to_string(),
        r#type: Some(ty),
    })
}

fn any(secret: &Secret) -> Any {
    Any {
        type_url: SECRET_TYPE_URL.to_string(),
        value: secret.encode_to_vec(),
    }
}

/// The SDS service over a certificate watch channel.
#[derive(Clone)]
pub struct SdsServer {
    secrets: SecretsRx,
}

impl SdsServer {
    pub fn new(secrets: SecretsRx) -> SdsServer {
        SdsServer { secrets }
    }

    /// Bind `<config_dir>/workload-spiffe-uds/socket` (replacing a stale one) and serve until
    /// the returned task is dropped or aborted.
    pub fn serve(
        self,
        config_dir: &Path,
    ) -> Result<(PathBuf, tokio::task::JoinHandle<()>), SdsError> {
        let path = config_dir.join(SOCKET_REL_PATH);
        let io = |error| SdsError::Socket {
            path: path.clone(),
            error,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let listener = tokio::net::UnixListener::bind(&path).map_err(io)?;
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        info!(socket = %path.display(), "serving SDS (default, ROOTCA)");
        let task = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(SecretDiscoveryServiceServer::new(self))
                .serve_with_incoming(incoming)
                .await;
            if let Err(e) = result {
                warn!(error = %e, "SDS server stopped");
            }
        });
        Ok((path, task))
    }
}

type SotwStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

fn sotw_response(names: &[String], s: &WorkloadSecrets, nonce: u64) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: s.serial.clone(),
        resources: names
            .iter()
            .filter_map(|n| secret_for(n, s))
            .map(|sec| any(&sec))
            .collect(),
        type_url: SECRET_TYPE_URL.to_string(),
        nonce: nonce.to_string(),
        ..Default::default()
    }
}

fn delta_response<'a>(
    names: impl Iterator<Item = &'a String>,
    s: &WorkloadSecrets,
    nonce: u64,
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        system_version_info: s.serial.clone(),
        resources: names
            .filter_map(|n| secret_for(n, s))
            .map(|sec| Resource {
                name: sec.name.clone(),
                version: s.serial.clone(),
                resource: Some(any(&sec)),
                ..Default::default()
            })
            .collect(),
        type_url: SECRET_TYPE_URL.to_string(),
        nonce: nonce.to_string(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for SdsServer {
    type StreamSecretsStream = SotwStream;
    type DeltaSecretsStream = DeltaStream;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        let mut inbound = request.into_inner();
        let mut secrets = self.secrets.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut names: Vec<String> = Vec::new();
            let mut nonce = 0u64;
            loop {
                let send = tokio::select! {
                    msg = inbound.message() => match msg {
                        Ok(Some(req)) => {
                            if let Some(err) = &req.error_detail {
                                warn!(names = ?req.resource_names, error = %err.message, "Envoy rejected a secret (NACK)");
                            }
                            // Initial request or a new subscription: answer. An ACK/NACK for
                            // the same names needs no answer.
                            let answer = req.response_nonce.is_empty() || req.resource_names != names;
                            names = req.resource_names;
                            answer
                        }
                        Ok(None) => return,
                        Err(e) => {
                            debug!(error = %e, "SDS stream closed");
                            return;
                        }
                    },
                    changed = secrets.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        true
                    }
                };
                // Before the first certificate exists there is nothing to send; the watch
                // fires when it lands and the stream answers then.
                let current = secrets.borrow_and_update().clone();
                if let (true, Some(s)) = (send && !names.is_empty(), current) {
                    nonce += 1;
                    debug!(names = ?names, version = %s.serial, "pushing secrets (SotW)");
                    if tx.send(Ok(sotw_response(&names, &s, nonce))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        let mut inbound = request.into_inner();
        let mut secrets = self.secrets.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut subscribed: BTreeSet<String> = BTreeSet::new();
            // Names subscribed but not yet answered (the certificate may not exist yet).
            let mut pending: BTreeSet<String> = BTreeSet::new();
            let mut nonce = 0u64;
            loop {
                tokio::select! {
                    msg = inbound.message() => match msg {
                        Ok(Some(req)) => {
                            if let Some(err) = &req.error_detail {
                                warn!(error = %err.message, "Envoy rejected a secret (NACK)");
                            }
                            for n in req.resource_names_unsubscribe {
                                subscribed.remove(&n);
                                pending.remove(&n);
                            }
                            for n in req.resource_names_subscribe {
                                if subscribed.insert(n.clone()) {
                                    pending.insert(n);
                                }
                            }
                            // Reconnect: Envoy tells what it already has; resend anyway when
                            // the version differs, which a serial comparison decides.
                            if let Some(s) = secrets.borrow().clone() {
                                for (n, v) in &req.initial_resource_versions {
                                    if *v == s.serial {
                                        pending.remove(n);
                                    }
                                }
                            }
                        }
                        Ok(None) => return,
                        Err(e) => {
                            debug!(error = %e, "SDS delta stream closed");
                            return;
                        }
                    },
                    changed = secrets.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        pending = subscribed.clone();
                    }
                }
                let current = secrets.borrow_and_update().clone();
                if let (false, Some(s)) = (pending.is_empty(), current) {
                    nonce += 1;
                    let resp = delta_response(pending.iter(), &s, nonce);
                    pending.clear();
                    if resp.resources.is_empty() {
                        continue;
                    }
                    debug!(version = %s.serial, "pushing secrets (delta)");
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let names = request.into_inner().resource_names;
        let current = self.secrets.borrow().clone();
        match current {
            Some(s) => Ok(Response::new(sotw_response(&names, &s, 1))),
            None => Err(Status::unavailable(
                "no workload certificate yet: the CA has not answered",
            )),
        }
    }
}
