//! mizzen-ca: workload identity for the mesh (the Citadel role).
//!
//! Owns three things, each in its own module:
//! - [`authority`]: the certificate authority. A self-signed root created at first start, or a
//!   plug-in CA read from Istio's `cacerts` layout; it signs workload CSRs for exactly one
//!   SPIFFE identity, short-lived, and returns the chain the way istiod does.
//! - [`token`]: the credential a workload presents to get a certificate in the local mesh:
//!   an HMAC-signed `(namespace, service account, expiry)` issued by the pilot.
//! - [`proto`]: Istio's CSR API messages (`istio.v1.auth.IstioCertificateService`), written by
//!   hand with prost derives so no protoc is needed.
//!
//! - [`server`]: the CSR API as a tonic service (the pilot mounts it on its TLS port), and
//!   [`client`]: the agent's side of it.
#![forbid(unsafe_code)]

pub mod authority;
pub mod client;
pub mod proto;
pub mod server;
pub mod token;

pub use authority::{CaError, CertificateAuthority, IssueError, IssuedChain};
pub use token::{TokenError, TokenIssuer};

use std::fmt;

/// A workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> SpiffeId {
        SpiffeId {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Split a PEM bundle into its certificates (DER), in order. Non-certificate blocks are
/// skipped so a bundle with comments or keys still yields its certificates.
pub fn pem_certs(pem: &str) -> Vec<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .map(|c| c.as_ref().to_vec())
        .collect()
}

/// Encode one DER certificate as PEM.
pub fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}
