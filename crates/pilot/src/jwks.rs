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
//! Not implemented: `https` URIs (the pilot has no public root store yet; reported as a
//! fetch error naming the URI).

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
/// Istio's default jwksUri fetch timeout (`jwtRule.timeout` is not honoured yet).
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWKS is a few KiB; refuse anything absurd.
const MAX_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("jwksUri {0}: only http:// URIs can be fetched by this pilot")]
    Scheme(String),
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
}

impl JwksResolver {
    pub fn new(refresh: Duration) -> JwksResolver {
        JwksResolver {
            entries: ArcSwap::from_pointee(BTreeMap::new()),
            refresh,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
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
        if !uri.starts_with("http://") {
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
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| JwksError::Fetch(uri.into(), e.to_string()))?;
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
        let body = tokio::time::timeout(FETCH_TIMEOUT, work)
            .await
            .map_err(|_| JwksError::Timeout(uri.into(), FETCH_TIMEOUT))??;
        let text = String::from_utf8(body.to_vec())
            .map_err(|_| JwksError::NotJwks(uri.into(), "not UTF-8".into()))?;
        check_jwks(&text).map_err(|m| JwksError::NotJwks(uri.into(), m))?;
        Ok(text)
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
        // https is reported, not silently skipped.
        let https = vec!["https://example.com/jwks".to_string()];
        assert!(!r.ensure(&https).await);
        assert!(r.snapshot()["https://example.com/jwks"]
            .error
            .as_deref()
            .is_some_and(|m| m.contains("http://")));
    }
}
