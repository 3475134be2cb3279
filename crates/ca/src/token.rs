//! Bearer tokens for the CSR API in the local (non-Kubernetes) mesh.
//!
//! Kubernetes gives every pod a service-account JWT the API server can verify; outside
//! Kubernetes nothing does, so the pilot issues its own: `mzt1.<payload>.<mac>`, where the
//! payload is base64url JSON `{"ns", "sa", "exp"}` and the MAC is HMAC-SHA256 over the
//! payload text with a key kept next to the CA key. Only the pilot can mint or check them,
//! which is all the CSR API needs: the token says which identity the caller may have.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::hmac;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// File in the CA directory holding the 32-byte HMAC key.
pub const TOKEN_KEY_FILE: &str = "token-key";
const PREFIX: &str = "mzt1";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "token is malformed (expected mzt1.<payload>.<mac>, as printed by `mizzen pilot token`)"
    )]
    Malformed,
    #[error("token signature does not verify: it was not issued by this pilot's CA directory")]
    BadSignature,
    #[error("token expired {0}s ago; issue a new one with `mizzen pilot token`")]
    Expired(u64),
    #[error("token key {path}: {error}")]
    Key {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("token key {0} must be at least 32 bytes")]
    KeyTooShort(PathBuf),
    #[error("generating a token key: no system randomness")]
    Random,
}

/// The identity a verified token grants.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenClaims {
    pub ns: String,
    pub sa: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

/// Mints and verifies tokens with one key.
pub struct TokenIssuer {
    key: hmac::Key,
}

impl TokenIssuer {
    pub fn from_key(bytes: &[u8]) -> TokenIssuer {
        TokenIssuer {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        }
    }

    /// Load `<dir>/token-key`, creating it (mode 0600) if absent.
    pub fn load_or_create(dir: &Path) -> Result<TokenIssuer, TokenError> {
        let path = dir.join(TOKEN_KEY_FILE);
        let io = |error| TokenError::Key {
            path: path.clone(),
            error,
        };
        match std::fs::read(&path) {
            Ok(bytes) if bytes.len() >= 32 => Ok(TokenIssuer::from_key(&bytes)),
            Ok(_) => Err(TokenError::KeyTooShort(path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
                    .map_err(|_| TokenError::Random)?;
                std::fs::create_dir_all(dir).map_err(io)?;
                crate::authority::write_private(&path, &key).map_err(io)?;
                Ok(TokenIssuer::from_key(&key))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// A token for `ns/sa` valid for `ttl` from now.
    pub fn issue(&self, ns: &str, sa: &str, ttl: Duration) -> String {
        let exp = now_secs().saturating_add(ttl.as_secs());
        let claims = TokenClaims {
            ns: ns.to_string(),
            sa: sa.to_string(),
            exp,
        };
        // Serializing a struct of strings and an integer cannot fail.
        let json = serde_json::to_vec(&claims).unwrap_or_default();
        let payload = URL_SAFE_NO_PAD.encode(json);
        let mac = hmac::sign(&self.key, payload.as_bytes());
        format!(
            "{PREFIX}.{payload}.{}",
            URL_SAFE_NO_PAD.encode(mac.as_ref())
        )
    }

    /// Check the MAC and expiry; return the identity the token grants.
    pub fn verify(&self, token: &str) -> Result<TokenClaims, TokenError> {
        let mut parts = token.trim().split('.');
        let (Some(PREFIX), Some(payload), Some(mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let mac = URL_SAFE_NO_PAD
            .decode(mac)
            .map_err(|_| TokenError::Malformed)?;
        // Constant-time comparison inside ring.
        hmac::verify(&self.key, payload.as_bytes(), &mac).map_err(|_| TokenError::BadSignature)?;
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Malformed)?;
        let claims: TokenClaims =
            serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        let now = now_secs();
        if claims.exp <= now {
            return Err(TokenError::Expired(now - claims.exp));
        }
        Ok(claims)
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_verify_tamper_expire() {
        let t = TokenIssuer::from_key(&[7u8; 32]);
        let tok = t.issue("ns1", "sa1", Duration::from_secs(60));
        let c = t.verify(&tok).unwrap();
        assert_eq!((c.ns.as_str(), c.sa.as_str()), ("ns1", "sa1"));

        let other = TokenIssuer::from_key(&[8u8; 32]);
        assert!(matches!(other.verify(&tok), Err(TokenError::BadSignature)));

        // Swap the payload for another identity, keep the MAC: refused.
        let forged_payload =
            URL_SAFE_NO_PAD.encode(br#"{"ns":"ns1","sa":"admin","exp":9999999999}"#);
        let mac = tok.rsplit('.').next().unwrap();
        let forged = format!("mzt1.{forged_payload}.{mac}");
        assert!(matches!(t.verify(&forged), Err(TokenError::BadSignature)));

        let expired = t.issue("ns1", "sa1", Duration::ZERO);
        assert!(matches!(t.verify(&expired), Err(TokenError::Expired(_))));
        assert!(matches!(t.verify("garbage"), Err(TokenError::Malformed)));
    }
}
