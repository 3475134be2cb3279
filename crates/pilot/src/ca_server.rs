//! The secure port (15012): Istio's CSR API and the same ADS service as 15010, over TLS.
//!
//! The pilot's serving certificate is issued by its own CA at start for istiod's names
//! (`istiod.istio-system.svc`, `...svc.cluster.local`) plus the loopback and bind IPs, so a
//! proxy that trusts only the mesh root can verify it wherever it reaches the pilot from.

use mizzen_ca::server::CertificateService;
use mizzen_ca::{CertificateAuthority, TokenIssuer};
use mizzen_xds::server::Discovery;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Identity, ServerTlsConfig};
use tracing::info;

/// Lifetime of the pilot's own serving certificate. It is issued afresh at every start and
/// not rotated while running (yet), so it is long compared to workload certificates.
const SERVING_CERT_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

/// The DNS names istiod's serving certificate carries; proxies verify against the first.
pub const PILOT_DNS_NAMES: [&str; 2] = [
    mizzen_ca::client::PILOT_SAN,
    "istiod.istio-system.svc.cluster.local",
];

#[derive(Clone, Debug)]
pub struct SecureConfig {
    /// TLS address for the CSR API and ADS (Istio's 15012).
    pub addr: SocketAddr,
    /// CA directory (Istio's cacerts layout; a self-signed root is created if empty).
    pub ca_dir: PathBuf,
    pub trust_domain: String,
    /// Lifetime of workload certificates when the caller does not ask for one.
    pub workload_cert_ttl: Duration,
    /// Longest lifetime a caller may ask for.
    pub max_workload_cert_ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    #[error(transparent)]
    Ca(#[from] mizzen_ca::CaError),
    #[error(transparent)]
    Token(#[from] mizzen_ca::TokenError),
    #[error("issuing the pilot's serving certificate: {0}")]
    ServingCert(#[from] mizzen_ca::IssueError),
    #[error("cannot listen on {0} (is another pilot running?): {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("TLS setup on {0}: {1}")]
    Tls(SocketAddr, tonic::transport::Error),
}

/// Load the CA, bind the secure port and return the server future (run it on a task).
pub async fn start(
    cfg: &SecureConfig,
    discovery: Discovery,
) -> Result<impl std::future::Future<Output = Result<(), tonic::transport::Error>>, SecureError> {
    let ca = CertificateAuthority::load_or_create(
        &cfg.ca_dir,
        &cfg.trust_domain,
        cfg.workload_cert_ttl,
        cfg.max_workload_cert_ttl,
    )?;
    let tokens = TokenIssuer::load_or_create(&cfg.ca_dir)?;
    let mut ips: Vec<IpAddr> = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
    if !cfg.addr.ip().is_unspecified() && !ips.contains(&cfg.addr.ip()) {
        ips.push(cfg.addr.ip());
    }
    let (chain, key) = ca.issue_server_cert(&PILOT_DNS_NAMES, &ips, SERVING_CERT_TTL)?;
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|e| SecureError::Bind(cfg.addr, e))?;
    let bound = listener.local_addr().unwrap_or(cfg.addr);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let router = tonic::transport::Server::builder()
        .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(chain, key)))
        .map_err(|e| SecureError::Tls(cfg.addr, e))?
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(CertificateService::new(Arc::new(ca), Arc::new(tokens)))
        .add_service(discovery.into_service());
    info!(
        addr = %bound,
        ca_dir = %cfg.ca_dir.display(),
        trust_domain = %cfg.trust_domain,
        "serving the CSR API and xDS over TLS"
    );
    Ok(router.serve_with_incoming(incoming))
}
