//! The CSR API over real TLS sockets: a server set up the way the pilot sets up 15012, the
//! agent's client, and the real `openssl` binary to check what comes out.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

use mizzen_ca::client::{self, PILOT_SAN};
use mizzen_ca::server::CertificateService;
use mizzen_ca::{CertificateAuthority, SpiffeId, TokenIssuer};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Identity, ServerTlsConfig};

const DAY: Duration = Duration::from_secs(24 * 3600);

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mizzen-ca-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn openssl() -> &'static str {
    let ok = Command::new("openssl").arg("version").output();
    assert!(
        matches!(ok, Ok(ref o) if o.status.success()),
        "these tests need the `openssl` binary on PATH (apt-get install openssl)"
    );
    "openssl"
}

/// `openssl verify -CAfile root -untrusted <intermediates> leaf`; returns (ok, output).
fn openssl_verify(dir: &Path, chain: &[String], root_pem: &str) -> (bool, String) {
    std::fs::write(dir.join("root.pem"), root_pem).unwrap();
    std::fs::write(dir.join("leaf.pem"), &chain[0]).unwrap();
    // Everything after the leaf, root included, as istiod returns it: untrusted helpers.
    std::fs::write(dir.join("chain.pem"), chain[1..].concat()).unwrap();
    let out = Command::new(openssl())
        .arg("verify")
        .arg("-CAfile")
        .arg(dir.join("root.pem"))
        .arg("-untrusted")
        .arg(dir.join("chain.pem"))
        .arg(dir.join("leaf.pem"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn csr_for(sans: Vec<rcgen::SanType>) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn uri(s: &str) -> rcgen::SanType {
    rcgen::SanType::URI(s.to_string().try_into().unwrap())
}

struct Leaf {
    uris: Vec<String>,
    dns: Vec<String>,
    lifetime: i64,
    server_and_client_auth: bool,
}

fn parse_leaf(pem: &str) -> Leaf {
    use x509_parser::extensions::GeneralName;
    let der = mizzen_ca::pem_certs(pem).remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let mut uris = vec![];
    let mut dns = vec![];
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(u) => uris.push(u.to_string()),
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                _ => {}
            }
        }
    }
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    let v = cert.validity();
    Leaf {
        uris,
        dns,
        lifetime: v.not_after.timestamp() - v.not_before.timestamp(),
        server_and_client_auth: eku.server_auth && eku.client_auth,
    }
}

/// Serve the CSR API over TLS on a loopback port, as the pilot does on 15012.
async fn serve(ca: CertificateAuthority, tokens: TokenIssuer) -> (String, String) {
    let root = ca.root_pem().to_string();
    let (chain, key) = ca
        .issue_server_cert(&[PILOT_SAN], &["127.0.0.1".parse().unwrap()], DAY)
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let router = tonic::transport::Server::builder()
        .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(chain, key)))
        .unwrap()
        .add_service(CertificateService::new(Arc::new(ca), Arc::new(tokens)));
    tokio::spawn(router.serve_with_incoming(incoming));
    (addr, root)
}

async fn request(
    addr: &str,
    root: &str,
    token: &str,
    csr: String,
) -> Result<Vec<String>, client::ClientError> {
    let ch = client::connect(addr, root).await?;
    client::create_certificate(ch, addr, token, csr, None).await
}

#[tokio::test]
async fn issued_chain_verifies_with_openssl_and_names_only_the_token_identity() {
    let dir = tmpdir("issue");
    let ca = CertificateAuthority::load_or_create(&dir.join("ca"), "cluster.local", DAY, 90 * DAY)
        .unwrap();
    assert!(!ca.is_plugged_in());
    let tokens = TokenIssuer::load_or_create(&dir.join("ca")).unwrap();
    let token = tokens.issue("istio-system", "ingress", Duration::from_secs(600));
    let (addr, root) = serve(ca, tokens).await;

    // The CSR also asks for a DNS name: it must not be honoured.
    let csr = csr_for(vec![
        uri("spiffe://cluster.local/ns/istio-system/sa/ingress"),
        rcgen::SanType::DnsName("evil.example.com".try_into().unwrap()),
    ]);
    let chain = request(&addr, &root, &token, csr).await.unwrap();
    assert_eq!(chain.len(), 2, "leaf + root: {chain:?}");
    assert_eq!(mizzen_ca::pem_certs(&chain[1]), mizzen_ca::pem_certs(&root));
    let (ok, out) = openssl_verify(&dir, &chain, &root);
    assert!(ok, "openssl verify failed: {out}");
    assert!(out.contains("leaf.pem: OK"), "{out}");

    let leaf = parse_leaf(&chain[0]);
    assert_eq!(
        leaf.uris,
        vec!["spiffe://cluster.local/ns/istio-system/sa/ingress"]
    );
    assert!(leaf.dns.is_empty(), "CSR's DNS SAN leaked: {:?}", leaf.dns);
    assert!(leaf.server_and_client_auth);
    // 24h, plus the back-dating for clock skew.
    assert!(
        (24 * 3600..=24 * 3600 + 120).contains(&leaf.lifetime),
        "lifetime {}s",
        leaf.lifetime
    );

    // A CSR without any SAN still gets exactly the token's identity.
    let chain = request(&addr, &root, &token, csr_for(vec![]))
        .await
        .unwrap();
    assert_eq!(
        parse_leaf(&chain[0]).uris,
        vec!["spiffe://cluster.local/ns/istio-system/sa/ingress"]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn csr_for_another_identity_is_refused() {
    let dir = tmpdir("other");
    let ca = CertificateAuthority::load_or_create(&dir, "cluster.local", DAY, 90 * DAY).unwrap();
    let tokens = TokenIssuer::load_or_create(&dir).unwrap();
    let token = tokens.issue("default", "web", Duration::from_secs(600));
    let (addr, root) = serve(ca, tokens).await;
    let csr = csr_for(vec![uri(
        "spiffe://cluster.local/ns/istio-system/sa/istiod",
    )]);
    let err = request(&addr, &root, &token, csr).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::PermissionDenied), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn bad_missing_and_expired_tokens_are_unauthenticated() {
    let dir = tmpdir("tokens");
    let ca = CertificateAuthority::load_or_create(&dir, "cluster.local", DAY, 90 * DAY).unwrap();
    let tokens = TokenIssuer::load_or_create(&dir).unwrap();
    let expired = tokens.issue("default", "web", Duration::ZERO);
    let foreign = TokenIssuer::from_key(&[1u8; 32]).issue("default", "web", DAY);
    let (addr, root) = serve(ca, tokens).await;
    let id = "spiffe://cluster.local/ns/default/sa/web";
    for token in [expired.as_str(), foreign.as_str(), "not-a-token", ""] {
        let err = request(&addr, &root, token, csr_for(vec![uri(id)]))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Some(tonic::Code::Unauthenticated),
            "token {token:?}: {err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn client_refuses_a_pilot_not_signed_by_its_root() {
    let dir = tmpdir("wrongroot");
    let ca =
        CertificateAuthority::load_or_create(&dir.join("a"), "cluster.local", DAY, DAY).unwrap();
    let other =
        CertificateAuthority::load_or_create(&dir.join("b"), "cluster.local", DAY, DAY).unwrap();
    let tokens = TokenIssuer::load_or_create(&dir.join("a")).unwrap();
    let token = tokens.issue("default", "web", DAY);
    let (addr, _) = serve(ca, tokens).await;
    let res = request(&addr, other.root_pem(), &token, csr_for(vec![])).await;
    assert!(res.is_err(), "TLS to a pilot of another mesh must fail");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn plug_in_ca_from_cacerts_files_is_used() {
    let dir = tmpdir("plugin");
    // An operator's offline root and an intermediate for this cluster.
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut rp = rcgen::CertificateParams::default();
    rp.distinguished_name
        .push(rcgen::DnType::CommonName, "Operator Root CA");
    rp.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    rp.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let root = rp.self_signed(&root_key).unwrap();
    let root_issuer = rcgen::Issuer::new(rp, root_key);
    let int_key = rcgen::KeyPair::generate().unwrap();
    let mut ip = rcgen::CertificateParams::default();
    ip.distinguished_name
        .push(rcgen::DnType::CommonName, "Cluster Intermediate CA");
    ip.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ip.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    ip.use_authority_key_identifier_extension = true;
    let int = ip.signed_by(&int_key, &root_issuer).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), int.pem()).unwrap();
    std::fs::write(dir.join("ca-key.pem"), int_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("root-cert.pem"), root.pem()).unwrap();
    std::fs::write(
        dir.join("cert-chain.pem"),
        format!("{}{}", int.pem(), root.pem()),
    )
    .unwrap();

    let ca = CertificateAuthority::load_or_create(&dir, "example.org", DAY, DAY).unwrap();
    assert!(ca.is_plugged_in());
    assert_eq!(
        mizzen_ca::pem_certs(ca.root_pem()),
        mizzen_ca::pem_certs(&root.pem())
    );
    let id = SpiffeId::new("example.org", "ns1", "sa1");
    let csr = csr_for(vec![uri(&id.to_string())]);
    let issued = ca
        .sign_workload_csr(&csr, &id, Some(Duration::from_secs(3600)))
        .unwrap();
    assert_eq!(issued.pem.len(), 3, "leaf, intermediate, root");
    let (ok, out) = openssl_verify(&dir, &issued.pem, &root.pem());
    assert!(ok, "openssl verify failed: {out}");
    let leaf = parse_leaf(&issued.pem[0]);
    assert_eq!(leaf.uris, vec!["spiffe://example.org/ns/ns1/sa/sa1"]);
    assert!(
        leaf.lifetime <= 3600 + 120,
        "requested 1h, got {}s",
        leaf.lifetime
    );
    // Nothing was created over the operator's files.
    assert_eq!(
        std::fs::read_to_string(dir.join("ca-cert.pem")).unwrap(),
        int.pem()
    );
    // Asking for more than the maximum is refused, not silently shortened.
    assert!(ca.sign_workload_csr(&csr, &id, Some(2 * DAY)).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn incomplete_plug_in_ca_is_reported() {
    let dir = tmpdir("incomplete");
    std::fs::write(dir.join("ca-cert.pem"), "x").unwrap();
    let err = CertificateAuthority::load_or_create(&dir, "cluster.local", DAY, DAY).unwrap_err();
    assert!(err.to_string().contains("ca-key.pem is missing"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn self_signed_root_survives_restart() {
    let dir = tmpdir("restart");
    let a = CertificateAuthority::load_or_create(&dir, "cluster.local", DAY, DAY).unwrap();
    let b = CertificateAuthority::load_or_create(&dir, "cluster.local", DAY, DAY).unwrap();
    assert_eq!(a.root_pem(), b.root_pem());
    std::fs::remove_dir_all(&dir).unwrap();
}
