//! The workload certificate: key generated here, certificate from the pilot's CA, rotated
//! before it expires.
//!
//! The private key is generated in this process for every request and only ever leaves it
//! towards Envoy over the local SDS socket; the CA sees the CSR. A new certificate is
//! requested at ~80% of the current one's lifetime (Istio's SECRET_GRACE_PERIOD_RATIO is 0.5;
//! 80% keeps fewer CSRs in flight for the same safety margin on 24h certs), or at a fixed
//! interval when one is configured. Failures retry with capped backoff while the current
//! certificate stays in force.

use mizzen_ca::SpiffeId;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tracing::{info, warn};

/// Where the bearer token comes from; re-read for every request so a rotated token file
/// (Kubernetes projects a fresh one regularly) is picked up.
#[derive(Clone, Debug)]
pub enum TokenSource {
    File(PathBuf),
    Inline(String),
}

#[derive(Clone, Debug)]
pub struct CertOptions {
    /// The CSR API, HOST:PORT (the pilot's TLS port).
    pub ca_address: String,
    pub token: TokenSource,
    /// PEM of the mesh root, used to verify the pilot and handed to Envoy as `ROOTCA`.
    pub root_pem: String,
    pub identity: SpiffeId,
    /// Fixed rotation interval (tests); `None` rotates at 80% of the lifetime.
    pub rotation_interval: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("reading the token {path}: {error}")]
    Token {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("creating the key or CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error(transparent)]
    Ca(#[from] mizzen_ca::client::ClientError),
    #[error("the CA returned an unusable chain: {0}")]
    BadChain(String),
}

/// What Envoy gets over SDS, one version at a time.
#[derive(Debug)]
pub struct WorkloadSecrets {
    /// Leaf and intermediates, PEM (Istio's `default` secret).
    pub cert_chain_pem: String,
    pub key_pem: String,
    /// Trust anchor, PEM (Istio's `ROOTCA` secret).
    pub root_pem: String,
    /// The leaf's serial in hex; doubles as the SDS version.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

pub type SecretsRx = watch::Receiver<Option<Arc<WorkloadSecrets>>>;

impl CertOptions {
    fn token(&self) -> Result<String, CertError> {
        match &self.token {
            TokenSource::Inline(t) => Ok(t.trim().to_string()),
            TokenSource::File(path) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .map_err(|error| CertError::Token {
                    path: path.clone(),
                    error,
                }),
        }
    }

    /// One CSR round trip: new key, CSR naming our SPIFFE id, the signed chain back.
    pub async fn fetch(&self) -> Result<WorkloadSecrets, CertError> {
        let token = self.token()?;
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(self.identity.to_string().try_into()?)];
        let csr = params.serialize_request(&key)?.pem()?;
        let channel = mizzen_ca::client::connect(&self.ca_address, &self.root_pem).await?;
        let chain =
            mizzen_ca::client::create_certificate(channel, &self.ca_address, &token, csr, None)
                .await?;
        let Some(leaf_pem) = chain.first() else {
            return Err(CertError::BadChain("empty".into()));
        };
        let ders = mizzen_ca::pem_certs(leaf_pem);
        let Some(leaf_der) = ders.first() else {
            return Err(CertError::BadChain("leaf is not a PEM certificate".into()));
        };
        let (_, leaf) = x509_parser::parse_x509_certificate(leaf_der)
            .map_err(|e| CertError::BadChain(e.to_string()))?;
        let validity = leaf.validity();
        let to_system = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0).unsigned_abs())
        };
        // The root travels separately (ROOTCA); the identity chain stops below it unless the
        // CA is the root itself signing directly, in which case the leaf alone is the chain.
        let body = if chain.len() > 1 {
            &chain[..chain.len() - 1]
        } else {
            &chain[..]
        };
        Ok(WorkloadSecrets {
            cert_chain_pem: body.concat(),
            key_pem: key.serialize_pem(),
            root_pem: self.root_pem.clone(),
            serial: leaf.raw_serial_as_string().replace(':', ""),
            not_before: to_system(validity.not_before),
            not_after: to_system(validity.not_after),
        })
    }

    fn refresh_after(&self, s: &WorkloadSecrets) -> Duration {
        if let Some(d) = self.rotation_interval {
            return d;
        }
        // Measured from now, not from not_before: the CA back-dates certificates for clock
        // skew, which would otherwise eat into short lifetimes.
        let remaining = s
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        remaining.mul_f64(0.8).max(Duration::from_secs(1))
    }

    /// Keep `tx` holding a valid certificate until every receiver is gone.
    pub async fn run(self, tx: watch::Sender<Option<Arc<WorkloadSecrets>>>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let wait = match self.fetch().await {
                Ok(s) => {
                    backoff = Duration::from_millis(500);
                    let next = self.refresh_after(&s);
                    info!(
                        identity = %self.identity,
                        serial = %s.serial,
                        rotate_in_s = next.as_secs(),
                        "workload certificate issued"
                    );
                    if tx.send(Some(Arc::new(s))).is_err() {
                        return;
                    }
                    next
                }
                Err(e) => {
                    warn!(
                        ca = %self.ca_address,
                        error = %e,
                        retry_in_ms = backoff.as_millis() as u64,
                        "workload certificate request failed; current certificate (if any) stays"
                    );
                    let w = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    w
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = tx.closed() => return,
            }
        }
    }
}
