//! Secrets the TLS contexts refer to: the workload identity (Istio's SDS secret `default`)
//! and the mesh root (`ROOTCA`), plus PEM files named in the config.
//!
//! In sidecar mode with a token the proxy gets its own SPIFFE certificate in-process, with
//! the same code the Envoy agent uses (`mizzen_agent::identity_cert`): the key is generated
//! here, the CA signs a CSR, and the certificate is renewed before it expires. Each issued
//! certificate is parsed once and published with one `ArcSwap::store`; TLS handshakes read the
//! current one through resolvers ([`crate::tls`]), so rotation affects new handshakes only and
//! established connections keep going.
//!
//! The store is process-wide: a proxy has exactly one workload identity, the way Envoy's SDS
//! secrets are bootstrap-wide, and it lets the xDS conversion build TLS contexts that refer to
//! `default` / `ROOTCA` without threading the store through every resource.

use arc_swap::ArcSwapOption;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::{Arc, LazyLock};
use tracing::{info, warn};

/// Istio's SDS name of the workload certificate.
pub const SDS_DEFAULT: &str = "default";
/// Istio's SDS name of the mesh trust anchor.
pub const SDS_ROOTCA: &str = "ROOTCA";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("reading {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{what}: no PEM certificate in it")]
    NoCertificate { what: String },
    #[error("{what}: no usable PEM private key in it: {reason}")]
    BadKey { what: String, reason: String },
    #[error("{what}: unusable certificate or trust anchor: {reason}")]
    Unusable { what: String, reason: String },
}

/// The workload identity as TLS uses it.
#[derive(Debug)]
pub struct Workload {
    pub certified: Arc<CertifiedKey>,
    /// The leaf's URI SAN (`spiffe://...`): our principal in metrics.
    pub principal: Arc<str>,
    pub serial: String,
}

/// The mesh root and the client verifier built from it (built once per root, not per
/// handshake).
#[derive(Debug)]
pub struct Trust {
    pub roots: Arc<RootCertStore>,
    pub client_verifier: Arc<dyn ClientCertVerifier>,
    pub optional_client_verifier: Arc<dyn ClientCertVerifier>,
}

#[derive(Default)]
pub struct Store {
    workload: ArcSwapOption<Workload>,
    root: ArcSwapOption<Trust>,
}

static STORE: LazyLock<Store> = LazyLock::new(Store::default);

/// The process-wide secret store.
pub fn store() -> &'static Store {
    &STORE
}

impl Store {
    /// The current workload certificate, if one was issued yet.
    pub fn workload(&self) -> Option<Arc<Workload>> {
        self.workload.load_full()
    }

    pub fn trust(&self) -> Option<Arc<Trust>> {
        self.root.load_full()
    }

    /// Install a freshly issued identity; the previous one keeps serving on failure.
    pub fn install(&self, s: &mizzen_agent::identity_cert::WorkloadSecrets) {
        match workload_from_pem(&s.cert_chain_pem, &s.key_pem, "issued certificate") {
            Ok(mut w) => {
                w.serial = s.serial.clone();
                info!(principal = %w.principal, serial = %w.serial, "workload certificate installed");
                self.workload.store(Some(Arc::new(w)));
            }
            Err(e) => warn!(error = %e, "issued certificate not installed; previous one stays"),
        }
        if self.root.load().is_none() {
            match trust_from_pem(&s.root_pem, "ROOTCA") {
                Ok(t) => self.root.store(Some(Arc::new(t))),
                Err(e) => warn!(error = %e, "mesh root not installed"),
            }
        }
    }

    /// Install the mesh root alone (known before the first certificate arrives).
    pub fn install_root(&self, pem: &str) -> Result<(), SecretError> {
        let t = trust_from_pem(pem, "ROOTCA")?;
        self.root.store(Some(Arc::new(t)));
        Ok(())
    }
}

pub fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, SecretError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(SecretError::NoCertificate { what: what.into() });
    }
    Ok(certs)
}

/// A certificate chain and its key, ready to sign handshakes.
pub fn certified_key(
    chain_pem: &[u8],
    key_pem: &[u8],
    what: &str,
) -> Result<CertifiedKey, SecretError> {
    let chain = certs_from_pem(chain_pem, what)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| SecretError::BadKey {
        what: what.into(),
        reason: e.to_string(),
    })?;
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| SecretError::BadKey {
            what: what.into(),
            reason: e.to_string(),
        })?;
    let ck = CertifiedKey::new(chain, signer);
    // Catches a key that does not belong to the certificate at config time, not per handshake.
    ck.keys_match().map_err(|e| SecretError::BadKey {
        what: what.into(),
        reason: e.to_string(),
    })?;
    Ok(ck)
}

fn workload_from_pem(chain_pem: &str, key_pem: &str, what: &str) -> Result<Workload, SecretError> {
    let certified = certified_key(chain_pem.as_bytes(), key_pem.as_bytes(), what)?;
    let principal = certified
        .cert
        .first()
        .and_then(|c| uri_sans(c).into_iter().next())
        .unwrap_or_default();
    Ok(Workload {
        certified: Arc::new(certified),
        principal: Arc::from(principal.as_str()),
        serial: String::new(),
    })
}

pub fn roots_from_pem(pem: &[u8], what: &str) -> Result<RootCertStore, SecretError> {
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs_from_pem(pem, what)?);
    if added == 0 {
        return Err(SecretError::Unusable {
            what: what.into(),
            reason: "no certificate could be used as a trust anchor".into(),
        });
    }
    Ok(roots)
}

/// Roots plus the two client verifiers (client certificate required / optional).
pub fn trust_from_pem(pem: &str, what: &str) -> Result<Trust, SecretError> {
    trust_from_roots(Arc::new(roots_from_pem(pem.as_bytes(), what)?), what)
}

pub fn trust_from_roots(roots: Arc<RootCertStore>, what: &str) -> Result<Trust, SecretError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let unusable = |e: rustls::server::VerifierBuilderError| SecretError::Unusable {
        what: what.into(),
        reason: e.to_string(),
    };
    let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .map_err(unusable)?;
    let optional_client_verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
            .allow_unauthenticated()
            .build()
            .map_err(unusable)?;
    Ok(Trust {
        roots,
        client_verifier,
        optional_client_verifier,
    })
}

/// Read a file named in the config; the error names the file.
pub fn read_file(path: &Path) -> Result<Vec<u8>, SecretError> {
    std::fs::read(path).map_err(|error| SecretError::Read {
        path: path.display().to_string(),
        error,
    })
}

/// URI SANs of a DER certificate (SPIFFE ids); empty if it does not parse.
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    sans(der).0
}

/// (URI SANs, DNS SANs) of a DER certificate.
pub fn sans(der: &[u8]) -> (Vec<String>, Vec<String>) {
    use x509_parser::extensions::GeneralName;
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return (uris, dns);
    };
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for n in &ext.value.general_names {
            match n {
                GeneralName::URI(u) => uris.push(u.to_string()),
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                _ => {}
            }
        }
    }
    (uris, dns)
}

/// Keep the process-wide store holding a valid workload certificate (sidecar/router mode
/// with a token). Runs until the process ends; failures retry inside `CertOptions::run`
/// while the current certificate stays.
pub async fn run_identity(opts: mizzen_agent::identity_cert::CertOptions) {
    if let Err(e) = store().install_root(&opts.root_pem) {
        warn!(error = %e, "mesh root unusable; peers cannot be verified");
    }
    let (tx, mut rx) = tokio::sync::watch::channel(None);
    tokio::spawn(opts.run(tx));
    while rx.changed().await.is_ok() {
        let current = rx.borrow_and_update().clone();
        if let Some(s) = current {
            store().install(&s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_identity_is_installed_with_its_principal() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://cluster.local/ns/a/sa/b".try_into().unwrap(),
        )];
        let cert = params.self_signed(&key).unwrap();
        let w = workload_from_pem(&cert.pem(), &key.serialize_pem(), "test").unwrap();
        assert_eq!(&*w.principal, "spiffe://cluster.local/ns/a/sa/b");
        let other = rcgen::KeyPair::generate().unwrap();
        let e = workload_from_pem(&cert.pem(), &other.serialize_pem(), "test")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("test"), "{e}");
        assert!(trust_from_pem(&cert.pem(), "root").is_ok());
        assert!(trust_from_pem("nothing", "root").is_err());
    }
}
