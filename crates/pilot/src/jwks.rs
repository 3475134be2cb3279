//! JWKS for RequestAuthentication `jwksUri`s, fetched by the pilot and inlined into the
//! proxies' jwt_authn config (Istio's default `PILOT_JWT_ENABLE_REMOTE_JWKS=false`: proxies
//! never reach out to the issuer themselves).
//!
//! - A URI seen for the first time is fetched before the push that needs it is built, so a new
//!   RequestAuthentication never goes out with a placeholder key when its issuer is reachable.
//! - Every `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL` (Istio's name and default, 20m; Go duration
//!   syntax such as `1s`, `500ms`, `20m`) every URI in use is fetched again; changed keys
//!   trigger a push.
//! - A failed fetch (connection, status, timeout, not a JWKS) is logged and kept beside the
//!   last good keys, which stay in force. A URI that never worked gets a key nobody holds
//!   (see `mizzen_xds::gen::jwt`), so its tokens are refused, never accepted unchecked.
//!
//! - `https` URIs are verified against the PEM bundle named by `SSL_CERT_FILE` (the usual
//!   convention), else the system bundle (`/etc/ssl/certs/ca-certificates.crt`, ...).
//!
//! - Each fetch is bounded by the rule's `timeout` (Istio's default: 5 s).
//!
//! Not implemented: HTTP proxies for the fetch.

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mizzen_model::authz::JwksEntry;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Istio's `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`.
pub const REFRESH_ENV: &str = "PILOT_JWT_PUB_KEY_REFRESH_INTERVAL";
const DEFAULT_REFRESH: Duration = Duration::from_secs(20 * 60);
/// Istio's default jwksUri fetch timeout (a rule's `timeout` overrides it).
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWKS is a few KiB; refuse anything absurd.
const MAX_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("jwksUri {0}: only http:// and https:// URIs can be fetched")]
    Scheme(String),
    #[error("jwksUri {0}: no trust anchors for https ({1}); set SSL_CERT_FILE to a PEM bundle")]
    NoRoots(String, String),
    #[error("jwksUri {0}: bad URI: {1}")]
    Uri(String, String),
    #[error("jwksUri {0}: {1}")]
    Fetch(String, String),
    #[error("jwksUri {0}: timed out after {1:?}")]
    Timeout(String, Duration),
    #[error("jwksUri {0}: HTTP status {1}")]
    Status(String, u16),
    #[error("jwksUri {0}: not a JWKS (a JSON object with a non-empty `keys` list): {1}")]
    NotJwks(String, String),
    #[error("{REFRESH_ENV}={0:?}: not a duration like 1s, 500ms or 20m")]
    Interval(String),
}

/// Go-style durations as Istio's env vars take them: `1h`, `20m`, `1s`, `500ms`, `1m30s`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "h" => value * 3600.0,
            "m" => value * 60.0,
            "s" => value,
            "ms" => value / 1000.0,
            _ => return None,
        };
        total += Duration::try_from_secs_f64(secs).ok()?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// The refresh interval from the environment (default 20m); a bad value is an error.
pub fn refresh_interval_from_env() -> Result<Duration, JwksError> {
    match std::env::var(REFRESH_ENV) {
        Ok(v) => parse_duration(&v)
            .filter(|d| !d.is_zero())
            .ok_or(JwksError::Interval(v)),
        Err(_) => Ok(DEFAULT_REFRESH),
    }
}

/// The pilot's JWKS cache: a snapshot per change, read when pushes are built.
pub struct JwksResolver {
    entries: ArcSwap<BTreeMap<String, JwksEntry>>,
    pub refresh: Duration,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    /// For https URIs; built once, the error kept to report per URI.
    tls: Result<Arc<rustls::ClientConfig>, String>,
    /// `jwtRule.timeout` by URI, from the latest config.
    timeouts: ArcSwap<BTreeMap<String, Duration>>,
}

/// Where distributions keep the system CA bundle.
const SYSTEM_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// TLS client config trusting `SSL_CERT_FILE`, else the system bundle.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    tls_config_from(std::env::var_os("SSL_CERT_FILE"))
}

fn tls_config_from(
    bundle: Option<std::ffi::OsString>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let path = bundle
        .map(std::path::PathBuf::from)
        .or_else(|| {
            SYSTEM_BUNDLES
                .iter()
                .map(std::path::PathBuf::from)
                .find(|p| p.exists())
        })
        .ok_or_else(|| "no CA bundle found".to_string())?;
    let pem = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(
        <rustls_pki_types::CertificateDer as rustls_pki_types::pem::PemObject>::pem_slice_iter(
            &pem,
        )
        .filter_map(Result::ok),
    );
    if added == 0 {
        return Err(format!("{}: no usable certificate", path.display()));
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(cfg))
}

impl JwksResolver {
    pub fn new(refresh: Duration) -> JwksResolver {
        JwksResolver {
            entries: ArcSwap::from_pointee(BTreeMap::new()),
            refresh,
            client: Client::builder(TokioExecutor::new()).build_http(),
            tls: tls_config(),
            timeouts: ArcSwap::from_pointee(BTreeMap::new()),
        }
    }

    /// The per-URI fetch timeouts of the config in force.
    pub fn set_timeouts(&self, timeouts: BTreeMap<String, Duration>) {
        self.timeouts.store(Arc::new(timeouts));
    }

    pub fn snapshot(&self) -> BTreeMap<String, JwksEntry> {
        self.entries.load().as_ref().clone()
    }

    /// Fetch the URIs never fetched before. Returns whether any keys changed.
    pub async fn ensure(&self, uris: &[String]) -> bool {
        let known = self.entries.load();
        let missing: Vec<String> = uris
            .iter()
            .filter(|u| !known.contains_key(*u))
            .cloned()
            .collect();
        drop(known);
        self.fetch_all(&missing).await
    }

    /// Fetch every URI again (the periodic refresh). Returns whether any keys changed.
    pub async fn refresh(&self, uris: &[String]) -> bool {
        self.fetch_all(uris).await
    }

    async fn fetch_all(&self, uris: &[String]) -> bool {
        if uris.is_empty() {
            return false;
        }
        // Concurrently: one slow issuer does not hold up the others.
        let results = futures::future::join_all(
            uris.iter()
                .map(|u| async move { (u.clone(), self.fetch(u).await) }),
        )
        .await;
        let mut next = self.snapshot();
        let mut changed = false;
        for (uri, res) in results {
            let entry = next.entry(uri.clone()).or_default();
            match res {
                Ok(keys) => {
                    if entry.keys.as_deref() != Some(keys.as_str()) {
                        info!(%uri, "JWKS fetched; new keys go out with the next push");
                        changed = true;
                    }
                    entry.keys = Some(keys);
                    entry.error = None;
                }
                Err(e) => {
                    warn!(%uri, error = %e, kept_last_good = entry.keys.is_some(), "JWKS fetch failed");
                    entry.error = Some(e.to_string());
                }
            }
        }
        self.entries.store(Arc::new(next));
        changed
    }

    async fn fetch(&self, uri: &str) -> Result<String, JwksError> {
        let https = uri.starts_with("https://");
        if !https && !uri.starts_with("http://") {
            return Err(JwksError::Scheme(uri.into()));
        }
        let parsed: hyper::Uri = uri
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| JwksError::Uri(uri.into(), e.to_string()))?;
        let req = hyper::Request::get(parsed)
            .header(hyper::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| JwksError::Uri(uri.into(), e.to_string()))?;
        let work = async {
            let resp = if https {
                self.https_request(uri, req).await?
            } else {
                self.client
                    .request(req)
                    .await
                    .map_err(|e| JwksError::Fetch(uri.into(), e.to_string()))?
            };
            let status = resp.status();
            if !status.is_success() {
                return Err(JwksError::Status(uri.into(), status.as_u16()));
            }
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| JwksError::Fetch(uri.into(), e.to_string()))?
                .to_bytes();
            Ok(body)
        };
        let limit = self
            .timeouts
            .load()
            .get(uri)
            .copied()
            .unwrap_or(FETCH_TIMEOUT);
        let body = tokio::time::timeout(limit, work)
            .await
            .map_err(|_| JwksError::Timeout(uri.into(), limit))??;
        let text = String::from_utf8(body.to_vec())
            .map_err(|_| JwksError::NotJwks(uri.into(), "not UTF-8".into()))?;
        check_jwks(&text).map_err(|m| JwksError::NotJwks(uri.into(), m))?;
        Ok(text)
    }
}

impl JwksResolver {
    /// One request over a fresh TLS connection (JWKS fetches are rare: no pool needed).
    async fn https_request(
        &self,
        uri: &str,
        mut req: hyper::Request<Empty<Bytes>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, JwksError> {
        let fetch = |m: String| JwksError::Fetch(uri.into(), m);
        let cfg = self
            .tls
            .as_ref()
            .map_err(|e| JwksError::NoRoots(uri.into(), e.clone()))?;
        let host = req
            .uri()
            .host()
            .ok_or_else(|| JwksError::Uri(uri.into(), "no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = req.uri().port_u16().unwrap_or(443);
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_else(|| host.clone());
        let server_name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|e| JwksError::Uri(uri.into(), e.to_string()))?;
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| fetch(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(cfg.clone())
            .connect(server_name, tcp)
            .await
            .map_err(|e| fetch(format!("TLS: {e}")))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| fetch(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        // Origin form on the wire, the authority in Host.
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        *req.uri_mut() = path
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| JwksError::Uri(uri.into(), e.to_string()))?;
        if let Ok(v) = authority.parse() {
            req.headers_mut().insert(hyper::header::HOST, v);
        }
        sender
            .send_request(req)
            .await
            .map_err(|e| fetch(e.to_string()))
    }
}

/// A JWKS: a JSON object whose `keys` is a non-empty list of objects with a `kty`.
fn check_jwks(text: &str) -> Result<(), String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let keys = v
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or_else(|| "no `keys` list".to_string())?;
    if keys.is_empty() {
        return Err("`keys` is empty".into());
    }
    if let Some(i) = keys.iter().position(|k| k.get("kty").is_none()) {
        return Err(format!("keys[{i}] has no `kty`"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_istio_writes_them() {
        assert_eq!(parse_duration("20m"), Some(Duration::from_secs(1200)));
        assert_eq!(parse_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn jwks_shape_is_checked() {
        assert!(check_jwks(r#"{"keys":[{"kty":"RSA","n":"x","e":"AQAB"}]}"#).is_ok());
        assert!(check_jwks(r#"{"keys":[]}"#).is_err());
        assert!(check_jwks(r#"{"keys":[{"n":"x"}]}"#).is_err());
        assert!(check_jwks("<html>").is_err());
    }

    /// A real server on loopback: good keys, then a failure that keeps them, then new keys.
    #[tokio::test]
    async fn failed_refresh_keeps_the_last_good_keys() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let bodies = [
            (200, r#"{"keys":[{"kty":"RSA","kid":"one"}]}"#),
            (500, "oops"),
            (200, r#"{"keys":[{"kty":"RSA","kid":"two"}]}"#),
        ];
        let server = tokio::spawn(async move {
            for (status, body) in bodies {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        let r = JwksResolver::new(Duration::from_secs(1));
        let uri = format!("http://{addr}/jwks");
        let uris = vec![uri.clone()];
        assert!(r.ensure(&uris).await);
        assert!(r.snapshot()[&uri]
            .keys
            .as_deref()
            .is_some_and(|k| k.contains("one")));
        // Known already: ensure does not fetch again.
        assert!(!r.ensure(&uris).await);
        assert!(!r.refresh(&uris).await, "a failed fetch changes no keys");
        let e = &r.snapshot()[&uri];
        assert!(e.keys.as_deref().is_some_and(|k| k.contains("one")));
        assert!(
            e.error.as_deref().is_some_and(|m| m.contains("500")),
            "{e:?}"
        );
        assert!(r.refresh(&uris).await);
        let e = &r.snapshot()[&uri];
        assert!(e.keys.as_deref().is_some_and(|k| k.contains("two")) && e.error.is_none());
        server.await.expect("server");
        // Another scheme is reported, not silently skipped.
        let ftp = vec!["ftp://example.com/jwks".to_string()];
        assert!(!r.ensure(&ftp).await);
        assert!(r.snapshot()["ftp://example.com/jwks"]
            .error
            .as_deref()
            .is_some_and(|m| m.contains("https://")));
    }

    /// https against a TLS server on loopback whose certificate is in the trusted bundle; the
    /// same server is refused when the bundle does not contain it.
    #[tokio::test]
    async fn https_uris_are_fetched_and_verified() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("cert");
        let dir = std::env::temp_dir().join(format!("mizzen-jwks-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let bundle = dir.join("ca.pem");
        std::fs::write(&bundle, ck.cert.pem()).expect("write");
        let server_cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![ck.cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into()),
        )
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            // The trusted fetch, then the untrusted one (whose handshake fails).
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.expect("accept");
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut buf = [0u8; 2048];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                assert!(req.starts_with("GET /keys HTTP/1.1"), "{req}");
                let body = r#"{"keys":[{"kty":"RSA","kid":"tls"}]}"#;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            }
        });
        let uri = format!("https://{addr}/keys");
        let mut r = JwksResolver::new(Duration::from_secs(60));
        r.tls = tls_config_from(Some(bundle.clone().into_os_string()));
        assert!(
            r.ensure(std::slice::from_ref(&uri)).await,
            "{:?}",
            r.snapshot()
        );
        assert!(r.snapshot()[&uri]
            .keys
            .as_deref()
            .is_some_and(|k| k.contains("tls")));
        // A bundle without that certificate: the handshake is refused and reported.
        let other =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("cert");
        let other_bundle = dir.join("other.pem");
        std::fs::write(&other_bundle, other.cert.pem()).expect("write");
        let mut r2 = JwksResolver::new(Duration::from_secs(60));
        r2.tls = tls_config_from(Some(other_bundle.into_os_string()));
        assert!(!r2.ensure(std::slice::from_ref(&uri)).await);
        let e = &r2.snapshot()[&uri];
        assert!(
            e.keys.is_none() && e.error.as_deref().is_some_and(|m| m.contains("TLS")),
            "{e:?}"
        );
        server.await.expect("server");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A server that accepts and never answers: the rule's timeout bounds the fetch.
    #[tokio::test]
    async fn the_rule_timeout_bounds_a_fetch() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let uri = format!("http://{}/slow", listener.local_addr().expect("addr"));
        let hold = tokio::spawn(async move {
            let conn = listener.accept().await;
            tokio::time::sleep(Duration::from_secs(10)).await;
            drop(conn);
        });
        let r = JwksResolver::new(Duration::from_secs(60));
        r.set_timeouts(BTreeMap::from([(uri.clone(), Duration::from_millis(200))]));
        assert!(!r.ensure(std::slice::from_ref(&uri)).await);
        let e = &r.snapshot()[&uri];
        assert!(
            e.error
                .as_deref()
                .is_some_and(|m| m.contains("timed out after 200ms")),
            "{e:?}"
        );
        hold.abort();
    }
}
