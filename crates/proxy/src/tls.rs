//! TLS: rustls contexts built from xDS TLS contexts, the downstream and upstream handshakes,
//! ClientHello sniffing for filter-chain selection, and the upstream HTTP pools over TLS.
//!
//! - Building ([`server_context`], [`client_context`]) happens while converting xDS
//!   resources, so an unusable context (unreadable file, key not matching the certificate,
//!   an SDS name we do not serve) is a NACK. Certificates named `default` / `ROOTCA` are
//!   resolved from [`crate::secrets`] at each handshake, so rotation needs no config change
//!   and never touches established connections.
//! - Peer verification follows Envoy, not browsers: the chain must lead to the configured
//!   trust anchor, and when SAN matchers are set one of the certificate's SANs must match
//!   (SPIFFE URI SANs for ISTIO_MUTUAL); the SNI is not checked against the certificate.
//!   Without a validation context the peer is not verified, as in Envoy.
//! - [`sniff`] reads (peeks) the ClientHello for SNI and ALPN without consuming it, so TLS
//!   passthrough chains still forward the untouched bytes.
//! - [`UpstreamClients`] keeps one hyper connection pool per distinct upstream context,
//!   shared across config updates (keyed by content hash).

use crate::config::{DownstreamTls, StringMatch, UpstreamTls, Xfcc, XfccMode};
use crate::secrets::{self, store, Trust};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bound on a TLS handshake, either side (a silent peer must not hold a task forever).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Upstream TCP connect timeout for TLS pools, as the plaintext pools use.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Secret(#[from] secrets::SecretError),
    #[error("building the TLS context: {0}")]
    Rustls(#[from] rustls::Error),
}

// ------------------------------------------------------------------ specs

/// Where a certificate comes from.
#[derive(Clone, Debug)]
pub enum CertSource {
    /// SDS `default`: the workload identity.
    Workload,
    Static(Arc<CertifiedKey>),
}

/// What a peer's chain must lead to.
#[derive(Clone, Debug)]
pub enum TrustSource {
    /// SDS `ROOTCA`: the mesh root.
    MeshRoot,
    Static(Arc<Trust>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SanKind {
    Any,
    Dns,
    Uri,
}

#[derive(Clone, Debug)]
pub struct SanMatch {
    pub kind: SanKind,
    pub matcher: StringMatch,
}

#[derive(Clone, Debug)]
pub struct Validation {
    pub trust: TrustSource,
    pub sans: Vec<SanMatch>,
}

/// TLS versions allowed by `tls_params`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Versions {
    Tls12And13,
    Tls13Only,
    Tls12Only,
}

impl Versions {
    fn list(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        static BOTH: [&rustls::SupportedProtocolVersion; 2] =
            [&rustls::version::TLS13, &rustls::version::TLS12];
        static V13: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        static V12: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS12];
        match self {
            Versions::Tls12And13 => &BOTH,
            Versions::Tls13Only => &V13,
            Versions::Tls12Only => &V12,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ServerSpec {
    pub cert: CertSource,
    pub validation: Option<Validation>,
    pub require_client_certificate: bool,
    pub alpn: Vec<String>,
    pub versions: Versions,
}

#[derive(Clone, Debug)]
pub struct ClientSpec {
    pub cert: Option<CertSource>,
    pub validation: Option<Validation>,
    pub alpn: Vec<String>,
    pub sni: Option<String>,
    pub versions: Versions,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

// ------------------------------------------------------------------ building

pub fn server_context(spec: &ServerSpec) -> Result<DownstreamTls, TlsError> {
    let verifier: Arc<dyn ClientCertVerifier> = match &spec.validation {
        None => rustls::server::WebPkiClientVerifier::no_client_auth(),
        Some(v) => match &v.trust {
            TrustSource::Static(t) if spec.require_client_certificate => t.client_verifier.clone(),
            TrustSource::Static(t) => t.optional_client_verifier.clone(),
            TrustSource::MeshRoot => Arc::new(MeshClientVerifier {
                required: spec.require_client_certificate,
                algorithms: algorithms(),
            }),
        },
    };
    let build = |alpn: Vec<Vec<u8>>| -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut c = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(spec.versions.list())?
            .with_client_cert_verifier(verifier.clone())
            .with_cert_resolver(Arc::new(CertResolver(spec.cert.clone())));
        c.alpn_protocols = alpn;
        Ok(Arc::new(c))
    };
    Ok(DownstreamTls {
        alpn: spec.alpn.clone(),
        require_client_certificate: spec.require_client_certificate,
        validates_clients: spec.validation.is_some(),
        config: build(spec.alpn.iter().map(|a| a.as_bytes().to_vec()).collect())?,
        config_no_alpn: build(Vec::new())?,
    })
}

pub fn client_context(spec: &ClientSpec, key: u64) -> Result<UpstreamTls, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(spec.versions.list())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PeerVerifier {
            validation: spec.validation.clone(),
            algorithms: algorithms(),
        }));
    let mut c = match &spec.cert {
        Some(cert) => builder.with_client_cert_resolver(Arc::new(CertResolver(cert.clone()))),
        None => builder.with_no_client_auth(),
    };
    c.alpn_protocols = spec.alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    Ok(UpstreamTls {
        sni: spec.sni.clone(),
        alpn: spec.alpn.clone(),
        config: Arc::new(c),
        key,
    })
}

/// Serves (or presents) the configured certificate; the workload one is looked up per
/// handshake so a rotated certificate is used from the next handshake on.
#[derive(Debug)]
struct CertResolver(CertSource);

impl CertResolver {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        match &self.0 {
            CertSource::Workload => store().workload().map(|w| w.certified.clone()),
            CertSource::Static(c) => Some(c.clone()),
        }
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl rustls::client::ResolvesClientCert for CertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn no_root() -> rustls::Error {
    rustls::Error::General("no mesh root (ROOTCA) yet: the workload identity is not set up".into())
}

/// Client verification against the mesh root, looked up per handshake.
#[derive(Debug)]
struct MeshClientVerifier {
    required: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for MeshClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.required
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let trust = store().trust().ok_or_else(no_root)?;
        trust
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Envoy's upstream verification: chain to the trust anchor, then the SAN matchers; the
/// server name is not compared with the certificate.
#[derive(Debug)]
struct PeerVerifier {
    validation: Option<Validation>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(v) = &self.validation else {
            return Ok(ServerCertVerified::assertion());
        };
        let trust = match &v.trust {
            TrustSource::MeshRoot => store().trust().ok_or_else(no_root)?,
            TrustSource::Static(t) => t.clone(),
        };
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &trust.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        if !v.sans.is_empty() && !sans_match(&v.sans, end_entity) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn sans_match(matchers: &[SanMatch], der: &[u8]) -> bool {
    let (uris, dns) = secrets::sans(der);
    matchers.iter().any(|m| {
        let pool: Vec<&String> = match m.kind {
            SanKind::Uri => uris.iter().collect(),
            SanKind::Dns => dns.iter().collect(),
            SanKind::Any => uris.iter().chain(dns.iter()).collect(),
        };
        pool.iter().any(|s| string_match(&m.matcher, s))
    })
}

fn string_match(m: &StringMatch, v: &str) -> bool {
    let cmp = |value: &str, ic: bool, f: fn(&str, &str) -> bool| {
        if ic {
            f(&v.to_ascii_lowercase(), &value.to_ascii_lowercase())
        } else {
            f(v, value)
        }
    };
    match m {
        StringMatch::Exact { value, ignore_case } => cmp(value, *ignore_case, |a, b| a == b),
        StringMatch::Prefix { value, ignore_case } => {
            cmp(value, *ignore_case, |a, b| a.starts_with(b))
        }
        StringMatch::Suffix { value, ignore_case } => {
            cmp(value, *ignore_case, |a, b| a.ends_with(b))
        }
        StringMatch::Contains { value, ignore_case } => {
            cmp(value, *ignore_case, |a, b| a.contains(b))
        }
        StringMatch::Regex(r) => r.is_match(v),
    }
}

// ------------------------------------------------------------------ connections

/// What the TLS layer learned about a connection, for metrics and logs.
#[derive(Clone, Debug, Default)]
pub struct Security {
    pub tls: bool,
    /// The peer presented a certificate that was verified.
    pub mutual: bool,
    /// The peer certificate's URI SAN (SPIFFE id).
    pub peer_principal: Option<Arc<str>>,
    /// Our own principal on this connection (the workload identity when it was used).
    pub local_principal: Option<Arc<str>>,
    /// The peer's leaf certificate (DER), for `x-forwarded-client-cert`.
    pub peer_cert: Option<Arc<[u8]>>,
    /// What requests on this connection do with `x-forwarded-client-cert`.
    pub xfcc: XfccAction,
}

/// `x-forwarded-client-cert` handling, decided once per connection; this hop's element is
/// a ready header value, so a request only clones it (Bytes: a reference count).
#[derive(Clone, Debug, Default)]
pub enum XfccAction {
    #[default]
    Remove,
    Keep,
    Set(http::HeaderValue),
    Append(http::HeaderValue),
}

const XFCC: http::HeaderName = http::HeaderName::from_static("x-forwarded-client-cert");

impl Security {
    pub fn plaintext() -> Security {
        Security::default()
    }

    /// Envoy's rules: only an mTLS connection may carry the header on (or add this hop's
    /// element); a plaintext client's header is removed unless ALWAYS_FORWARD_ONLY.
    pub fn with_xfcc(mut self, cfg: &Xfcc) -> Security {
        self.xfcc = match cfg.mode {
            XfccMode::AlwaysForwardOnly => XfccAction::Keep,
            _ if !self.mutual => XfccAction::Remove,
            XfccMode::Sanitize => XfccAction::Remove,
            XfccMode::ForwardOnly => XfccAction::Keep,
            XfccMode::AppendForward | XfccMode::SanitizeSet => {
                let element = self.xfcc_element(cfg);
                match http::HeaderValue::from_str(&element) {
                    Ok(v) if cfg.mode == XfccMode::SanitizeSet => XfccAction::Set(v),
                    Ok(v) => XfccAction::Append(v),
                    // Not a header value (a control character in a SAN or subject): nothing
                    // of ours to add, and the client's header is not passed on unchecked.
                    Err(_) => {
                        tracing::warn!(%element, "x-forwarded-client-cert element is not a valid header value; removing the header");
                        XfccAction::Remove
                    }
                }
            }
        };
        self
    }

    /// `By=...;Hash=...;Subject="...";URI=...;DNS=...` in Envoy's order.
    fn xfcc_element(&self, cfg: &Xfcc) -> String {
        let mut parts = Vec::new();
        if let Some(by) = &self.local_principal {
            parts.push(format!("By={by}"));
        }
        let Some(der) = &self.peer_cert else {
            return parts.join(";");
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let hash: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        parts.push(format!("Hash={hash}"));
        if cfg.subject {
            parts.push(format!("Subject=\"{}\"", subject_rfc2253(der)));
        }
        let (uris, dns) = secrets::sans(der);
        if cfg.uri {
            if let Some(u) = uris.first() {
                parts.push(format!("URI={u}"));
            }
        }
        if cfg.dns {
            parts.extend(dns.iter().map(|d| format!("DNS={d}")));
        }
        parts.join(";")
    }
}

/// The subject as RFC 2253 writes it (last RDN first, no spaces), as Envoy's XFCC does.
fn subject_rfc2253(der: &[u8]) -> String {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return String::new();
    };
    let s = cert.subject().to_string();
    if s.is_empty() {
        return s;
    }
    let mut rdns: Vec<&str> = s.split(", ").collect();
    rdns.reverse();
    rdns.join(",")
}

/// Apply the connection's XFCC decision to a request's headers.
pub fn apply_xfcc(headers: &mut http::HeaderMap, sec: &Security) {
    match &sec.xfcc {
        XfccAction::Keep => {}
        XfccAction::Remove => {
            headers.remove(XFCC);
        }
        XfccAction::Set(v) => {
            headers.insert(XFCC, v.clone());
        }
        XfccAction::Append(v) => {
            let joined = match headers.get(XFCC).and_then(|h| h.to_str().ok()) {
                Some(prev) if !prev.is_empty() => {
                    let mut b = Vec::with_capacity(prev.len() + 1 + v.len());
                    b.extend_from_slice(prev.as_bytes());
                    b.push(b',');
                    b.extend_from_slice(v.as_bytes());
                    http::HeaderValue::from_bytes(&b).ok()
                }
                _ => Some(v.clone()),
            };
            if let Some(v) = joined {
                headers.insert(XFCC, v);
            }
        }
    }
}

/// A downstream or upstream byte stream, plaintext or TLS.
pub enum Stream {
    Plain(TcpStream),
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Stream {
        Stream::Plain(s)
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Server(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Client(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Server(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Client(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Server(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Client(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Server(s) => s.is_write_vectored(),
            Stream::Client(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Server(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Client(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Server(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Client(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

fn first_uri_san(certs: Option<&[CertificateDer<'static>]>) -> Option<Arc<str>> {
    let leaf = certs?.first()?;
    secrets::uri_sans(leaf).into_iter().next().map(Arc::from)
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} timed out"))
}

/// Terminate TLS on an accepted connection. `client_alpn` is what the ClientHello offered:
/// with no protocol in common we answer without ALPN, as Envoy does.
pub async fn accept(
    tcp: TcpStream,
    tls: &DownstreamTls,
    client_alpn: &[String],
) -> io::Result<(Stream, Security)> {
    let overlap = client_alpn.is_empty() || client_alpn.iter().any(|a| tls.alpn.contains(a));
    let config = if overlap {
        tls.config.clone()
    } else {
        tls.config_no_alpn.clone()
    };
    let s = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(config).accept(tcp),
    )
    .await
    .map_err(|_| timed_out("downstream TLS handshake"))??;
    let conn = s.get_ref().1;
    let peer_principal = first_uri_san(conn.peer_certificates());
    let peer_cert = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| Arc::<[u8]>::from(c.as_ref()));
    let mutual = tls.validates_clients && peer_cert.is_some();
    let local_principal = if mutual {
        store().workload().map(|w| w.principal.clone())
    } else {
        None
    };
    Ok((
        Stream::Server(Box::new(s)),
        Security {
            tls: true,
            mutual,
            peer_principal,
            local_principal,
            peer_cert,
            xfcc: XfccAction::Remove,
        },
    ))
}

/// Originate TLS on a connected upstream socket.
pub async fn connect(
    tcp: TcpStream,
    tls: &UpstreamTls,
) -> io::Result<(tokio_rustls::client::TlsStream<TcpStream>, Security)> {
    let name = match &tls.sni {
        Some(sni) => ServerName::try_from(sni.clone()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("SNI {sni:?} is not a DNS name: {e}"),
            )
        })?,
        None => ServerName::IpAddress(tcp.peer_addr()?.ip().into()),
    };
    let s = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsConnector::from(tls.config.clone()).connect(name, tcp),
    )
    .await
    .map_err(|_| timed_out("upstream TLS handshake"))??;
    let conn = s.get_ref().1;
    let peer_principal = first_uri_san(conn.peer_certificates());
    // Whether our certificate went out is not exposed; the server asked and we have one.
    let local_principal = store().workload().map(|w| w.principal.clone());
    let security = Security {
        tls: true,
        mutual: peer_principal.is_some(),
        peer_principal,
        local_principal,
        peer_cert: None,
        xfcc: XfccAction::Remove,
    };
    Ok((s, security))
}

/// [`connect`] for the TCP proxy.
pub async fn connect_stream(tcp: TcpStream, tls: &UpstreamTls) -> io::Result<Stream> {
    let (s, _) = connect(tcp, tls).await?;
    Ok(Stream::Client(Box::new(s)))
}

// ------------------------------------------------------------------ ClientHello

/// SNI and ALPN of a ClientHello, for filter-chain selection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hello {
    pub sni: Option<String>,
    pub alpn: Vec<String>,
}

/// Peek at the ClientHello (the first TLS record) until it is complete, `timeout` passes or
/// the peer sends something that is not one. Nothing is consumed.
pub async fn sniff(stream: &TcpStream, timeout: Duration) -> Hello {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 5 + 16 * 1024];
    // Bounded by time and count: a slow client gets ~`timeout`, then what we have so far.
    for _ in 0..200 {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => 0,
        };
        match parse_client_hello(&buf[..n]) {
            Parsed::Done(h) => return h,
            Parsed::Invalid => return Hello::default(),
            Parsed::Incomplete if n == 0 || tokio::time::Instant::now() >= deadline => {
                return Hello::default()
            }
            Parsed::Incomplete => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    Hello::default()
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Done(Hello),
    Incomplete,
    Invalid,
}

/// A bounds-checked reader over a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

fn parse_client_hello(b: &[u8]) -> Parsed {
    if b.len() < 5 {
        return Parsed::Incomplete;
    }
    if b[0] != 0x16 || b[1] != 0x03 {
        return Parsed::Invalid;
    }
    let record_len = usize::from(u16::from_be_bytes([b[3], b[4]]));
    if b.len() < 5 + record_len {
        return Parsed::Incomplete;
    }
    // A ClientHello split over several records is legal but rare; parsing the first record
    // yields what it holds (the extensions come last and may be cut off).
    match hello_fields(&b[5..5 + record_len]) {
        Some(h) => Parsed::Done(h),
        None => Parsed::Invalid,
    }
}

fn hello_fields(record: &[u8]) -> Option<Hello> {
    let mut r = Reader(record);
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    r.take(3)?; // handshake length
    r.take(2 + 32)?; // legacy_version, random
    r.vec8()?; // session id
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    let mut hello = Hello::default();
    let Some(exts) = r.vec16() else {
        return Some(hello);
    };
    let mut e = Reader(exts);
    while let (Some(ty), Some(data)) = (e.u16(), e.vec16()) {
        let mut d = Reader(data);
        match ty {
            0 => {
                // server_name: list of (type, name); type 0 is host_name.
                let mut list = Reader(d.vec16()?);
                while let (Some(kind), Some(name)) = (list.u8(), list.vec16()) {
                    if kind == 0 {
                        hello.sni = Some(String::from_utf8_lossy(name).to_ascii_lowercase());
                    }
                }
            }
            16 => {
                let mut list = Reader(d.vec16()?);
                while let Some(p) = list.vec8() {
                    hello.alpn.push(String::from_utf8_lossy(p).into_owned());
                }
            }
            _ => {}
        }
    }
    Some(hello)
}

/// Envoy's server_names matching: exact, or `*.suffix` matching one or more labels.
pub fn server_name_matches(pattern: &str, sni: &str) -> bool {
    if let Some(suffix) = pattern.strip_prefix('*') {
        sni.len() > suffix.len() && sni.ends_with(suffix)
    } else {
        pattern.eq_ignore_ascii_case(sni)
    }
}

// ------------------------------------------------------------------ upstream HTTP pools

/// The upstream peer's identity, attached to every response from a TLS pool (hyper-util
/// copies it into the response extensions).
#[derive(Clone, Debug)]
pub struct UpstreamPeer(pub Security);

/// hyper-util connector: TCP (with the plaintext pools' options), then the TLS handshake.
#[derive(Clone)]
pub struct TlsConnector {
    http: HttpConnector,
    tls: Arc<UpstreamTls>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<http::Uri> for TlsConnector {
    type Response = TlsConn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsConn, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let mut http = self.http.clone();
        let tls = self.tls.clone();
        Box::pin(async move {
            let tcp = http.call(uri).await?.into_inner();
            let (s, security) = connect(tcp, &tls).await?;
            let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
            Ok(TlsConn {
                io: TokioIo::new(s),
                security,
                h2,
            })
        })
    }
}

pub struct TlsConn {
    io: TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    security: Security,
    h2: bool,
}

impl Connection for TlsConn {
    fn connected(&self) -> Connected {
        let c = Connected::new().extra(UpstreamPeer(self.security.clone()));
        if self.h2 {
            c.negotiated_h2()
        } else {
            c
        }
    }
}

impl hyper::rt::Read for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

pub type TlsClient = Client<TlsConnector, crate::http::Body>;

type PoolKey = (u64, bool, Option<IpAddr>, crate::config::HeaderCase);

/// One pool per (context, HTTP/2, source address). Looked up lock-free; a new context
/// (config change) copies the small map once.
#[derive(Default)]
pub struct UpstreamClients {
    pools: arc_swap::ArcSwap<HashMap<PoolKey, TlsClient>>,
}

/// Distinct contexts are few (one per DestinationRule TLS setting plus ISTIO_MUTUAL per
/// SAN set); past this many, stale ones are dropped wholesale rather than tracked.
const MAX_POOLS: usize = 512;

impl UpstreamClients {
    pub fn get(
        &self,
        tls: &Arc<UpstreamTls>,
        http2: bool,
        source: Option<IpAddr>,
        case: crate::config::HeaderCase,
    ) -> TlsClient {
        let key = (tls.key, http2, source, case);
        if let Some(c) = self.pools.load().get(&key) {
            return c.clone();
        }
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_local_address(source);
        let connector = TlsConnector {
            http,
            tls: tls.clone(),
        };
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_idle_timeout(Duration::from_secs(60))
            .http1_preserve_header_case(case == crate::config::HeaderCase::Preserve)
            .http1_title_case_headers(case == crate::config::HeaderCase::ProperCase);
        if http2 {
            b.http2_only(true);
        }
        let client = b.build(connector);
        self.pools.rcu(|m| {
            let mut m = HashMap::clone(m);
            if m.len() >= MAX_POOLS {
                m.clear();
            }
            m.entry(key).or_insert_with(|| client.clone());
            m
        });
        client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello_bytes(sni: &str, alpn: &[&str]) -> Vec<u8> {
        let mut exts = Vec::new();
        let name = sni.as_bytes();
        let mut sn = vec![0u8];
        sn.extend((name.len() as u16).to_be_bytes());
        sn.extend(name);
        exts.extend(0u16.to_be_bytes());
        exts.extend(((sn.len() + 2) as u16).to_be_bytes());
        exts.extend((sn.len() as u16).to_be_bytes());
        exts.extend(&sn);
        let mut al = Vec::new();
        for a in alpn {
            al.push(a.len() as u8);
            al.extend(a.as_bytes());
        }
        exts.extend(16u16.to_be_bytes());
        exts.extend(((al.len() + 2) as u16).to_be_bytes());
        exts.extend((al.len() as u16).to_be_bytes());
        exts.extend(&al);
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one cipher suite
        body.extend([1, 0]); // null compression
        body.extend((exts.len() as u16).to_be_bytes());
        body.extend(&exts);
        let mut hs = vec![1u8, 0];
        hs.extend((body.len() as u16).to_be_bytes());
        hs.extend(&body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(&hs);
        rec
    }

    #[test]
    fn client_hello_sni_and_alpn() {
        let b = hello_bytes(
            "Outbound_.80_._.web.default.svc.cluster.local",
            &["istio", "h2"],
        );
        assert_eq!(
            parse_client_hello(&b),
            Parsed::Done(Hello {
                sni: Some("outbound_.80_._.web.default.svc.cluster.local".into()),
                alpn: vec!["istio".into(), "h2".into()],
            })
        );
        assert_eq!(parse_client_hello(&b[..b.len() - 1]), Parsed::Incomplete);
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\n"), Parsed::Invalid);
    }

    fn identity(uri: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    /// One handshake over loopback between our two sides; the client expects `want_san`.
    async fn handshake(want_san: &str) -> io::Result<Security> {
        let (cert, key) = identity("spiffe://cluster.local/ns/a/sa/server");
        let ck = secrets::certified_key(cert.as_bytes(), key.as_bytes(), "test").unwrap();
        let server = server_context(&ServerSpec {
            cert: CertSource::Static(Arc::new(ck)),
            validation: None,
            require_client_certificate: false,
            alpn: vec!["istio".into()],
            versions: Versions::Tls13Only,
        })
        .unwrap();
        let trust = secrets::trust_from_pem(&cert, "test").unwrap();
        let client = client_context(
            &ClientSpec {
                cert: None,
                validation: Some(Validation {
                    trust: TrustSource::Static(Arc::new(trust)),
                    sans: vec![SanMatch {
                        kind: SanKind::Uri,
                        matcher: StringMatch::Exact {
                            value: want_san.into(),
                            ignore_case: false,
                        },
                    }],
                }),
                alpn: vec!["istio".into()],
                sni: Some("outbound_.80_._.a.svc".into()),
                versions: Versions::Tls13Only,
            },
            1,
        )
        .unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let srv = tokio::spawn(async move {
            let (s, _) = l.accept().await?;
            accept(s, &server, &["istio".to_string()]).await.map(|_| ())
        });
        let r = connect(TcpStream::connect(addr).await?, &client).await;
        let _ = srv.await;
        r.map(|(_, sec)| sec)
    }

    #[tokio::test]
    async fn upstream_checks_the_peer_san_not_the_sni() {
        let ok = handshake("spiffe://cluster.local/ns/a/sa/server")
            .await
            .unwrap();
        assert_eq!(
            ok.peer_principal.as_deref(),
            Some("spiffe://cluster.local/ns/a/sa/server")
        );
        assert!(handshake("spiffe://cluster.local/ns/a/sa/other")
            .await
            .is_err());
    }

    #[test]
    fn server_names() {
        assert!(server_name_matches("*.example.com", "a.b.example.com"));
        assert!(!server_name_matches("*.example.com", "example.com"));
        assert!(server_name_matches("web.example.com", "WEB.example.com"));
    }
}
