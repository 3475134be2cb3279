//! The certificate authority: where the signing key comes from and what a workload
//! certificate looks like.
//!
//! Two sources, decided by what is in the CA directory (Istio's `cacerts` layout):
//! - plug-in CA: `ca-cert.pem` + `ca-key.pem` (the signing CA, possibly an intermediate),
//!   `root-cert.pem` (the trust anchor workloads are given) and optionally `cert-chain.pem`
//!   (the signing CA's chain up to the root). Used as is.
//! - otherwise a self-signed root is created and written in that same layout, so the next
//!   start loads it the same way and operators find the files where Istio keeps them.
//!
//! Workload certificates carry exactly one SAN, the caller's SPIFFE URI: whatever else a CSR
//! asks for is ignored, and a CSR naming a *different* SPIFFE identity is refused outright.

use crate::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tracing::info;

pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";

/// Lifetime of a self-signed root (Istio's default is 10 years).
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates are back-dated this much so a peer whose clock is slightly behind still
/// accepts a freshly issued one.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA directory {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("plug-in CA in {dir} is incomplete: {missing} is missing (Istio's cacerts layout needs ca-cert.pem, ca-key.pem and root-cert.pem; cert-chain.pem is optional)")]
    Incomplete { dir: PathBuf, missing: &'static str },
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("creating the self-signed root: {0}")]
    Generate(rcgen::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("CSR is not a valid, self-signed PKCS#10 request: {0}")]
    BadCsr(String),
    #[error("CSR asks for {requested}, but the caller is {allowed}")]
    IdentityMismatch { requested: String, allowed: String },
    #[error("requested lifetime {requested}s exceeds the maximum of {max}s")]
    TtlTooLong { requested: u64, max: u64 },
    #[error("signing: {0}")]
    Sign(rcgen::Error),
}

/// A signed workload certificate with its chain.
#[derive(Clone, Debug)]
pub struct IssuedChain {
    /// Leaf first, then intermediates, the root last (the order istiod returns).
    pub pem: Vec<String>,
    pub not_after: SystemTime,
}

/// A loaded CA, ready to sign.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// The signing CA's chain (ca-cert first), ending with the root.
    chain_pem: Vec<String>,
    root_pem: String,
    trust_domain: String,
    default_ttl: Duration,
    max_ttl: Duration,
    plugged_in: bool,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("plugged_in", &self.plugged_in)
            .finish_non_exhaustive()
    }
}

/// Write `bytes` to `path` readable by the owner only: it holds key material.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

fn to_time(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    // On the (theoretical) failure the serial is the timestamp-derived default below; a
    // serial only has to be unique per issuer, not secret.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        let n = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = n.to_be_bytes();
    }
    // Positive INTEGER, non-zero first byte.
    b[0] = (b[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&b)
}

impl CertificateAuthority {
    /// Load the CA from `dir`, or create a self-signed root there on first start.
    pub fn load_or_create(
        dir: &Path,
        trust_domain: &str,
        default_ttl: Duration,
        max_ttl: Duration,
    ) -> Result<CertificateAuthority, CaError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |error| CaError::Io { path, error }
        };
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let plugged_in = cert_path.exists() || key_path.exists();
        if !plugged_in {
            create_self_signed(dir, trust_domain)?;
        }
        for (name, p) in [
            (CA_CERT_FILE, &cert_path),
            (CA_KEY_FILE, &key_path),
            (ROOT_CERT_FILE, &dir.join(ROOT_CERT_FILE)),
        ] {
            if !p.exists() {
                return Err(CaError::Incomplete {
                    dir: dir.to_path_buf(),
                    missing: name,
                });
            }
        }
        let read = |p: &Path| std::fs::read_to_string(p).map_err(io(p));
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        let root_path = dir.join(ROOT_CERT_FILE);
        let root_pem_file = read(&root_path)?;
        let chain_path = dir.join(CERT_CHAIN_FILE);
        let chain_file = if chain_path.exists() {
            read(&chain_path)?
        } else {
            cert_pem.clone()
        };

        let bad = |path: &Path, reason: String| CaError::BadFile {
            path: path.to_path_buf(),
            reason,
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(&key_path, e.to_string()))?;
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| bad(&cert_path, e.to_string()))?;
        let root_der = crate::pem_certs(&root_pem_file);
        let Some(root) = root_der.first() else {
            return Err(bad(&root_path, "no certificate in file".into()));
        };
        let mut chain_der = crate::pem_certs(&chain_file);
        if chain_der.is_empty() {
            return Err(bad(&chain_path, "no certificate in file".into()));
        }
        // Istio appends the root when cert-chain.pem stops at the last intermediate.
        if chain_der.last() != Some(root) {
            chain_der.push(root.clone());
        }
        info!(
            dir = %dir.display(),
            source = if plugged_in { "plug-in (cacerts files)" } else { "self-signed, created now" },
            chain_len = chain_der.len(),
            "CA loaded"
        );
        Ok(CertificateAuthority {
            issuer,
            chain_pem: chain_der.iter().map(|d| crate::der_to_pem(d)).collect(),
            root_pem: crate::der_to_pem(root),
            trust_domain: trust_domain.to_string(),
            default_ttl,
            max_ttl,
            plugged_in,
        })
    }

    /// The trust anchor workloads verify peers (and the pilot) against.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// True when the signing key came from operator-provided cacerts files.
    pub fn is_plugged_in(&self) -> bool {
        self.plugged_in
    }

    /// Sign `csr_pem` for `id`. The CSR contributes only its public key (after its
    /// self-signature is checked); the identity comes from the caller's credential.
    pub fn sign_workload_csr(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        requested_ttl: Option<Duration>,
    ) -> Result<IssuedChain, IssueError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| IssueError::BadCsr(e.to_string()))?;
        let allowed = id.to_string();
        for san in &csr.params.subject_alt_names {
            if let SanType::URI(uri) = san {
                if uri.as_str() != allowed {
                    return Err(IssueError::IdentityMismatch {
                        requested: uri.as_str().to_string(),
                        allowed,
                    });
                }
            }
        }
        let ttl = match requested_ttl.filter(|d| !d.is_zero()) {
            None => self.default_ttl,
            Some(d) if d > self.max_ttl => {
                return Err(IssueError::TtlTooLong {
                    requested: d.as_secs(),
                    max: self.max_ttl.as_secs(),
                })
            }
            Some(d) => d,
        };
        let uri = allowed
            .clone()
            .try_into()
            .map_err(|e: rcgen::Error| IssueError::Sign(e))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        self.fill_leaf(&mut params, ttl);
        let now = SystemTime::now();
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(IssueError::Sign)?;
        let mut pem = vec![cert.pem()];
        pem.extend(self.chain_pem.iter().cloned());
        Ok(IssuedChain {
            pem,
            not_after: now + ttl,
        })
    }

    /// A serving certificate for the pilot itself (key generated here, in memory).
    /// Returns (chain PEM, key PEM).
    pub fn issue_server_cert(
        &self,
        dns_names: &[&str],
        ips: &[IpAddr],
        ttl: Duration,
    ) -> Result<(String, String), IssueError> {
        let key = KeyPair::generate().map_err(IssueError::Sign)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for d in dns_names {
            let name = (*d).to_string().try_into().map_err(IssueError::Sign)?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        self.fill_leaf(&mut params, ttl);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(IssueError::Sign)?;
        let mut chain = cert.pem();
        for c in &self.chain_pem {
            chain.push_str(c);
        }
        Ok((chain, key.serialize_pem()))
    }

    fn fill_leaf(&self, params: &mut CertificateParams, ttl: Duration) {
        let now = SystemTime::now();
        params.not_before = to_time(now - CLOCK_SKEW);
        params.not_after = to_time(now + ttl);
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
    }
}

fn create_self_signed(dir: &Path, trust_domain: &str) -> Result<(), CaError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| CaError::Io { path, error }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let key = KeyPair::generate().map_err(CaError::Generate)?;
    let mut params = CertificateParams::default();
    // Istio's self-signed root: O=<trust domain>, a CA for 10 years.
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = to_time(now - CLOCK_SKEW);
    params.not_after = to_time(now + ROOT_TTL);
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key).map_err(CaError::Generate)?;
    let cert_pem = cert.pem();
    // Key first: a crash in between leaves a key without a cert, which the next start reports
    // as an incomplete plug-in CA instead of silently creating a second root.
    let key_path = dir.join(CA_KEY_FILE);
    write_private(&key_path, key.serialize_pem().as_bytes()).map_err(io(&key_path))?;
    for name in [ROOT_CERT_FILE, CERT_CHAIN_FILE, CA_CERT_FILE] {
        let p = dir.join(name);
        std::fs::write(&p, &cert_pem).map_err(io(&p))?;
    }
    info!(dir = %dir.display(), trust_domain, "created a self-signed root CA");
    Ok(())
}
