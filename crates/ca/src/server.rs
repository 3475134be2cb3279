//! `istio.v1.auth.IstioCertificateService/CreateCertificate` as a tonic service.
//!
//! Authentication is the `authorization: Bearer <token>` metadata (a token from
//! [`crate::token`]); the certificate's identity is taken from the verified token and never
//! from the CSR. Status codes follow what callers act on: UNAUTHENTICATED (get a new token),
//! PERMISSION_DENIED (the CSR names someone else), INVALID_ARGUMENT (a broken CSR).

use crate::proto::{IstioCertificateRequest, IstioCertificateResponse, CREATE_CERTIFICATE_PATH};
use crate::{CertificateAuthority, IssueError, SpiffeId, TokenIssuer};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::codegen::{Body, BoxFuture, StdError};
use tonic::{Code, Status};
use tracing::{info, warn};

/// The CSR service: a CA plus the token key that authenticates callers.
#[derive(Clone)]
pub struct CertificateService {
    inner: Arc<Inner>,
}

struct Inner {
    ca: Arc<CertificateAuthority>,
    tokens: Arc<TokenIssuer>,
}

impl CertificateService {
    pub fn new(ca: Arc<CertificateAuthority>, tokens: Arc<TokenIssuer>) -> CertificateService {
        CertificateService {
            inner: Arc::new(Inner { ca, tokens }),
        }
    }
}

impl Inner {
    fn create(
        &self,
        req: tonic::Request<IstioCertificateRequest>,
    ) -> Result<IstioCertificateResponse, Status> {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("no `authorization: Bearer <token>` metadata")
            })?;
        let claims = self.tokens.verify(token).map_err(|e| {
            warn!(error = %e, "CSR refused: bad token");
            Status::unauthenticated(e.to_string())
        })?;
        let id = SpiffeId::new(self.ca.trust_domain(), &claims.ns, &claims.sa);
        let body = req.into_inner();
        let ttl = u64::try_from(body.validity_duration)
            .ok()
            .map(Duration::from_secs);
        let issued = self
            .ca
            .sign_workload_csr(&body.csr, &id, ttl)
            .map_err(|e| {
                warn!(identity = %id, error = %e, "CSR refused");
                let code = match e {
                    IssueError::IdentityMismatch { .. } => Code::PermissionDenied,
                    IssueError::BadCsr(_) | IssueError::TtlTooLong { .. } => Code::InvalidArgument,
                    IssueError::Sign(_) => Code::Internal,
                };
                Status::new(code, e.to_string())
            })?;
        info!(identity = %id, "issued workload certificate");
        Ok(IstioCertificateResponse {
            cert_chain: issued.pem,
        })
    }
}

struct CreateSvc(Arc<Inner>);

impl tonic::server::UnaryService<IstioCertificateRequest> for CreateSvc {
    type Response = IstioCertificateResponse;
    type Future = BoxFuture<tonic::Response<IstioCertificateResponse>, Status>;
    fn call(&mut self, request: tonic::Request<IstioCertificateRequest>) -> Self::Future {
        let inner = self.0.clone();
        // Signing is a few hundred microseconds of CPU; not worth a blocking-pool hop.
        Box::pin(async move { inner.create(request).map(tonic::Response::new) })
    }
}

impl<B> tonic::codegen::Service<http::Request<B>> for CertificateService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() == CREATE_CERTIFICATE_PATH {
            let inner = self.inner.clone();
            Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(CreateSvc(inner), req).await)
            })
        } else {
            Box::pin(async move {
                let mut response = http::Response::new(tonic::body::Body::default());
                let headers = response.headers_mut();
                headers.insert(Status::GRPC_STATUS, (Code::Unimplemented as i32).into());
                headers.insert(
                    http::header::CONTENT_TYPE,
                    tonic::metadata::GRPC_CONTENT_TYPE,
                );
                Ok(response)
            })
        }
    }
}

impl tonic::server::NamedService for CertificateService {
    const NAME: &'static str = crate::proto::SERVICE;
}
