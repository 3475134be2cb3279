//! The caller's side of the CSR API: a TLS channel to the pilot verified against the mesh
//! root, and `CreateCertificate` with a bearer token.

use crate::proto::{IstioCertificateRequest, IstioCertificateResponse, CREATE_CERTIFICATE_PATH};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Status;

/// The name the pilot's serving certificate carries (istiod's service name), used as SNI and
/// for verification whatever address the pilot is reached at.
pub const PILOT_SAN: &str = "istiod.istio-system.svc";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("CA address {0:?} is not HOST:PORT")]
    Address(String),
    #[error("TLS setup for the CA at {addr}: {error}")]
    Tls {
        addr: String,
        error: tonic::transport::Error,
    },
    #[error("connecting to the CA at {addr}: {error}")]
    Connect {
        addr: String,
        error: tonic::transport::Error,
    },
    #[error("the CA at {addr} answered {code:?}: {message}")]
    Rpc {
        addr: String,
        code: tonic::Code,
        message: String,
    },
    #[error("the bearer token is not valid header text")]
    Token,
}

impl ClientError {
    /// The gRPC code when the CA answered (tests and retry policy look at it).
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A TLS channel to `addr` (HOST:PORT) that trusts only `root_pem` and expects the pilot's
/// name [`PILOT_SAN`].
pub async fn connect(addr: &str, root_pem: &str) -> Result<Channel, ClientError> {
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|_| ClientError::Address(addr.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(root_pem))
                .domain_name(PILOT_SAN),
        )
        .map_err(|error| ClientError::Tls {
            addr: addr.to_string(),
            error,
        })?;
    endpoint
        .connect()
        .await
        .map_err(|error| ClientError::Connect {
            addr: addr.to_string(),
            error,
        })
}

/// Send `csr_pem` with `token`; return the PEM chain (leaf first).
pub async fn create_certificate(
    channel: Channel,
    addr: &str,
    token: &str,
    csr_pem: String,
    validity: Option<Duration>,
) -> Result<Vec<String>, ClientError> {
    let rpc_err = |s: Status| ClientError::Rpc {
        addr: addr.to_string(),
        code: s.code(),
        message: s.message().to_string(),
    };
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| rpc_err(Status::unavailable(e.to_string())))?;
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: csr_pem,
        validity_duration: validity
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0),
        metadata: None,
    });
    let value = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| ClientError::Token)?;
    req.metadata_mut().insert("authorization", value);
    let path = http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE_PATH);
    let resp: tonic::Response<IstioCertificateResponse> = grpc
        .unary(req, path, tonic_prost::ProstCodec::default())
        .await
        .map_err(rpc_err)?;
    Ok(resp.into_inner().cert_chain)
}
