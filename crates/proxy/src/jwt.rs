//! `envoy.filters.http.jwt_authn`: RequestAuthentication on the native proxy, with Envoy's
//! answers.
//!
//! The pilot sends the filter as istiod builds it (`mizzen_xds::gen::jwt`): one provider
//! `origins-N` per JWT rule (issuer, audiences, token locations, keys inlined as `local_jwks`),
//! and one rule `prefix: /` requiring any provider or no token at all (`allow_missing`).
//! [`proto`] converts it once per resource version into a [`JwtAuthn`]: JWKS parsed, keys
//! decoded into verification keys, header names and token locations compiled. Whatever the
//! proxy cannot honour is a conversion error naming the field (the listener is NACKed);
//! nothing is silently dropped.
//!
//! Per request ([`JwtAuthn::on_request`]), as Envoy's verifier tree does it:
//!
//! - Tokens are extracted per provider: `from_headers` (value after `value_prefix`),
//!   `from_params`, `from_cookies`; with none of them, `Authorization: Bearer` and the
//!   `access_token` parameter. A token only counts for the issuers that named its location.
//! - Each token: JWS parse (Envoy's error texts), issuer, `exp`/`nbf` with the provider's clock
//!   skew (60 s by default), audiences (any configured one in the token's `aud`, scheme and
//!   trailing slash ignored; none configured = any), then the signature with the JWKS keys
//!   whose `kid`/`alg` fit (RS256/384/512, PS256/384/512, ES256/384, EdDSA, HS256/384/512).
//! - `requires_any`: the first provider that verifies the request wins; otherwise the
//!   `allow_missing` branch: no token passes, an invalid one is refused.
//! - A verified token sets `forward_payload_header` (base64url payload), `claim_to_headers`,
//!   strips the token unless `forward`, and its payload goes to the request's dynamic
//!   metadata (`envoy.filters.http.jwt_authn` -> `payload_in_metadata`, the issuer), where
//!   the RBAC filter reads request principals (`iss/sub`) and `request.auth.claims`.
//! - A refused request gets Envoy's local reply: 401 (403 for `Audiences in Jwt are not
//!   allowed`) with the status text as body and `www-authenticate: Bearer
//!   realm="<scheme>://<host><path>", error="invalid_token"`.
//!
//! Signatures are checked by `jsonwebtoken` (on `ring`, the crypto our TLS stack already
//! uses); the JWS parsing, key selection and claim checks are Envoy's and live here, because
//! their order decides which error text the client sees.
//!
//! Not implemented (NACKed): `remote_jwks` (the pilot always inlines keys), JWKS files,
//! X.509-certificate-map JWKS, P-521/ES512 keys, RSA keys outside 2048..8192 bits (ring's
//! limits), `subjects`, `max_lifetime`, `require_expiration`, `failed_status_in_metadata`,
//! `normalize_payload_in_metadata`, `clear_route_cache` (routes are chosen before the
//! filters run), `requires_all`, `provider_and_audiences`, nested requirement lists,
//! `requirement_map`/`requirement_name`, `filter_state_rules`, rule matches other than
//! `prefix`/`path`. Accepted and not needed: `jwt_cache_config` (no token cache: every request
//! is verified), `stat_prefix` (jwt_authn's Envoy stats are not exported).

use base64::Engine;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use tracing::{debug, warn};

/// The filter's name, also the dynamic-metadata namespace of verified payloads.
pub const JWT_AUTHN: &str = "envoy.filters.http.jwt_authn";
/// Envoy's default `clock_skew_seconds`.
const DEFAULT_CLOCK_SKEW: u64 = 60;
/// Envoy cuts the path in `www-authenticate`'s realm to this many bytes.
const MAX_REALM_PATH: usize = 256;

const B64URL: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

// ------------------------------------------------------------------ statuses

/// Why a token was refused: Envoy's `jwt_verify` statuses this proxy can produce. The text is
/// the body of the 401 (users grep for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Missed,
    NotYetValid,
    Expired,
    BadFormat,
    HeaderBadBase64,
    HeaderBadJson,
    HeaderBadAlg,
    HeaderNotImplementedAlg,
    HeaderBadKid,
    PayloadBadBase64,
    PayloadBadJson,
    IssNotString,
    SubNotString,
    IatNotInteger,
    IatOutOfRange,
    NbfNotInteger,
    NbfOutOfRange,
    ExpNotInteger,
    ExpOutOfRange,
    JtiNotString,
    AudNotString,
    SignatureBadBase64,
    UnknownIssuer,
    AudienceNotAllowed,
    VerificationFail,
    Ed25519SignatureWrongLength,
    JwksNoValidKeys,
    JwksKidAlgMismatch,
}

impl Status {
    /// Envoy's text for the status (`getStatusString`).
    pub fn text(self) -> &'static str {
        use Status::*;
        match self {
            Missed => "Jwt is missing",
            NotYetValid => "Jwt not yet valid",
            Expired => "Jwt is expired",
            BadFormat => {
                "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
            }
            HeaderBadBase64 => "Jwt header is an invalid Base64url encoded",
            HeaderBadJson => "Jwt header is an invalid JSON",
            HeaderBadAlg => "Jwt header [alg] field is required and must be a string",
            HeaderNotImplementedAlg => "Jwt header [alg] is not supported",
            HeaderBadKid => "Jwt header [kid] field is not a string",
            PayloadBadBase64 => "Jwt payload is an invalid Base64url encoded",
            PayloadBadJson => "Jwt payload is an invalid JSON",
            IssNotString => "Jwt payload [iss] field is not a string",
            SubNotString => "Jwt payload [sub] field is not a string",
            IatNotInteger => "Jwt payload [iat] field is not an integer",
            IatOutOfRange => "Jwt payload [iat] field is not a positive 64 bit integer",
            NbfNotInteger => "Jwt payload [nbf] field is not an integer",
            NbfOutOfRange => "Jwt payload [nbf] field is not a positive 64 bit integer",
            ExpNotInteger => "Jwt payload [exp] field is not an integer",
            ExpOutOfRange => "Jwt payload [exp] field is not a positive 64 bit integer",
            JtiNotString => "Jwt payload [jti] field is not a string",
            AudNotString => "Jwt payload [aud] field is not a string or string list",
            SignatureBadBase64 => "Jwt signature is an invalid Base64url encoded",
            UnknownIssuer => "Jwt issuer is not configured",
            AudienceNotAllowed => "Audiences in Jwt are not allowed",
            VerificationFail => "Jwt verification fails",
            Ed25519SignatureWrongLength => "Jwt ED25519 signature is wrong length",
            JwksNoValidKeys => "Jwks doesn't have any valid public key",
            JwksKidAlgMismatch => "Jwks doesn't have key to match kid or alg from Jwt",
        }
    }
}

// ------------------------------------------------------------------ domain types

/// One compiled `JwtAuthentication`.
#[derive(Debug)]
pub struct JwtAuthn {
    /// By name (Envoy looks providers up by issuer in this order for `allow_missing`).
    providers: Vec<Provider>,
    /// First match wins; no match = no verification.
    rules: Vec<Rule>,
    bypass_cors_preflight: bool,
    strip_failure_response: bool,
}

#[derive(Debug)]
struct Provider {
    name: String,
    /// Empty: any issuer.
    issuer: String,
    /// Sanitized (Envoy's `CheckAudience`): no `http(s)://`, no trailing slash.
    audiences: Vec<String>,
    /// `Err` when the JWKS had no usable key: every token of the provider fails with it.
    keys: Result<Vec<Jwk>, Status>,
    forward: bool,
    forward_payload_header: Option<HeaderName>,
    pad_forward_payload_header: bool,
    payload_in_metadata: Option<String>,
    header_in_metadata: Option<String>,
    clock_skew: u64,
    claim_to_headers: Vec<(HeaderName, Vec<String>)>,
    locations: Locations,
}

/// Where a provider looks for tokens (Envoy's defaults already applied).
#[derive(Debug, Default)]
struct Locations {
    /// (header, value prefix)
    headers: Vec<(HeaderName, String)>,
    params: Vec<String>,
    cookies: Vec<String>,
}

struct Jwk {
    kid: Option<String>,
    alg: Option<String>,
    kind: KeyKind,
    key: DecodingKey,
}

impl std::fmt::Debug for Jwk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwk")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("kind", &self.kind)
            .finish()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
    Hmac,
}

#[derive(Debug)]
struct Rule {
    path: PathMatch,
    verifier: Verifier,
}

#[derive(Debug)]
enum PathMatch {
    Prefix(String),
    Exact(String),
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Exact(p) => path.split('?').next() == Some(p.as_str()),
        }
    }
}

#[derive(Debug)]
enum Verifier {
    /// No requirement (or one that no request can fail).
    AllowAll,
    /// One provider (an index into `providers`) with its own token locations.
    Provider(usize, Extractor),
    /// `requires_any`: the providers in order, then the bypass (`allow_missing` or
    /// `allow_missing_or_failed`) over the locations of all of them.
    Any {
        providers: Vec<(usize, Extractor)>,
        bypass: Option<(Bypass, Extractor)>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bypass {
    Missing,
    MissingOrFailed,
}

/// Envoy's extractor for a set of providers: token locations in its order (headers sorted by
/// name + prefix, then parameters, then cookies, each sorted), each with the issuers that
/// named it, plus the headers to clear before verifying (outputs of these providers).
#[derive(Debug, Default)]
struct Extractor {
    headers: Vec<(HeaderName, String, Issuers)>,
    params: Vec<(String, Issuers)>,
    cookies: Vec<(String, Issuers)>,
    sanitize: Vec<HeaderName>,
}

#[derive(Debug, Default, Clone)]
struct Issuers {
    any: bool,
    names: Vec<String>,
}

impl Issuers {
    fn add(&mut self, issuer: &str) {
        if issuer.is_empty() {
            self.any = true;
        } else if !self.names.iter().any(|n| n == issuer) {
            self.names.push(issuer.to_string());
        }
    }
    fn allows(&self, issuer: &str) -> bool {
        self.any || self.names.iter().any(|n| n == issuer)
    }
}

impl Extractor {
    fn new<'a>(providers: impl IntoIterator<Item = &'a Provider>) -> Extractor {
        let mut headers: BTreeMap<(String, String), (HeaderName, Issuers)> = BTreeMap::new();
        let mut params: BTreeMap<String, Issuers> = BTreeMap::new();
        let mut cookies: BTreeMap<String, Issuers> = BTreeMap::new();
        let mut sanitize = Vec::new();
        for p in providers {
            for (name, prefix) in &p.locations.headers {
                headers
                    .entry((name.as_str().to_string(), prefix.clone()))
                    .or_insert_with(|| (name.clone(), Issuers::default()))
                    .1
                    .add(&p.issuer);
            }
            for name in &p.locations.params {
                params.entry(name.clone()).or_default().add(&p.issuer);
            }
            for name in &p.locations.cookies {
                cookies.entry(name.clone()).or_default().add(&p.issuer);
            }
            sanitize.extend(p.forward_payload_header.iter().cloned());
            sanitize.extend(p.claim_to_headers.iter().map(|(h, _)| h.clone()));
        }
        Extractor {
            headers: headers
                .into_iter()
                .map(|((_, prefix), (name, iss))| (name, prefix, iss))
                .collect(),
            params: params.into_iter().collect(),
            cookies: cookies.into_iter().collect(),
            sanitize,
        }
    }

    /// The tokens of the request, in Envoy's order.
    fn extract<B>(&self, req: &Request<B>) -> Vec<Token<'_>> {
        let mut out = Vec::new();
        for (name, prefix, issuers) in &self.headers {
            for v in req.headers().get_all(name) {
                let Ok(v) = v.to_str() else { continue };
                let value = if prefix.is_empty() {
                    v
                } else {
                    let Some(at) = v.find(prefix.as_str()) else {
                        continue;
                    };
                    jwt_after(v, at + prefix.len())
                };
                out.push(Token {
                    value: value.to_string(),
                    issuers,
                    at: At::Header(name),
                });
            }
        }
        if !self.params.is_empty() {
            let query = req.uri().query().unwrap_or("");
            for (name, issuers) in &self.params {
                if let Some(v) = query_param(query, name) {
                    out.push(Token {
                        value: v,
                        issuers,
                        at: At::Param(name),
                    });
                }
            }
        }
        if !self.cookies.is_empty() {
            for (name, issuers) in &self.cookies {
                if let Some(v) = cookie(req.headers(), name) {
                    out.push(Token {
                        value: v,
                        issuers,
                        at: At::Cookie,
                    });
                }
            }
        }
        out
    }
}

/// Envoy's `extractJWT`: from the first base64url character (or dot) after the prefix to the
/// end; the whole value when there is none.
fn jwt_after(v: &str, after: usize) -> &str {
    let tail = v.get(after..).unwrap_or("");
    match tail.find(|c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        Some(i) => &tail[i..],
        None => v,
    }
}

/// The first value of `name` in a query string, percent-decoded.
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first cookie called `name` over all `cookie` headers (Envoy's `parseCookies`: quotes
/// around the value removed).
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim_start().split_once('=')?;
            if k != name {
                return None;
            }
            let v = v
                .strip_prefix('"')
                .and_then(|x| x.strip_suffix('"'))
                .unwrap_or(v);
            Some(v.to_string())
        })
}

struct Token<'a> {
    value: String,
    issuers: &'a Issuers,
    at: At<'a>,
}

/// Where a token came from, to remove it when the provider does not forward it.
enum At<'a> {
    Header(&'a HeaderName),
    Param(&'a str),
    /// Envoy leaves cookies in place.
    Cookie,
}

// ------------------------------------------------------------------ tokens

/// A parsed (not yet verified) JWS, Envoy's `Jwt`.
struct Jwt<'t> {
    alg: String,
    kid: Option<String>,
    header: Map<String, Value>,
    payload: Map<String, Value>,
    /// base64url as in the token (the signing input, and `forward_payload_header`).
    header_b64: &'t str,
    payload_b64: &'t str,
    signature_b64: &'t str,
    signature_len: usize,
    iss: String,
    audiences: Vec<String>,
    nbf: u64,
    exp: u64,
}

const IMPLEMENTED_ALGS: &[&str] = &[
    "ES256", "ES384", "ES512", "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256",
    "PS384", "PS512", "EdDSA",
];

impl<'t> Jwt<'t> {
    /// Envoy's `Jwt::parseFromString`, with its checks in its order.
    fn parse(token: &'t str) -> Result<Jwt<'t>, Status> {
        if token.bytes().filter(|b| *b == b'.').count() != 2 {
            return Err(Status::BadFormat);
        }
        let parts: Vec<&str> = token.split('.').filter(|s| !s.is_empty()).collect();
        let [header_b64, payload_b64, signature_b64] = parts[..] else {
            return Err(Status::BadFormat);
        };
        let header_json = B64URL
            .decode(header_b64)
            .map_err(|_| Status::HeaderBadBase64)?;
        let Ok(Value::Object(header)) = serde_json::from_slice::<Value>(&header_json) else {
            return Err(Status::HeaderBadJson);
        };
        let Some(Value::String(alg)) = header.get("alg") else {
            return Err(Status::HeaderBadAlg);
        };
        let alg = alg.clone();
        if !IMPLEMENTED_ALGS.contains(&alg.as_str()) {
            return Err(Status::HeaderNotImplementedAlg);
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => return Err(Status::HeaderBadKid),
        };
        let payload_json = B64URL
            .decode(payload_b64)
            .map_err(|_| Status::PayloadBadBase64)?;
        let Ok(Value::Object(payload)) = serde_json::from_slice::<Value>(&payload_json) else {
            return Err(Status::PayloadBadJson);
        };
        let string = |k: &str, e: Status| match payload.get(k) {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(e),
        };
        let iss = string("iss", Status::IssNotString)?;
        string("sub", Status::SubNotString)?;
        let uint = |k: &str, not_int: Status, range: Status| match payload.get(k) {
            None => Ok(0),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(f) if f >= 0.0 && f < u64::MAX as f64 => Ok(f as u64),
                _ => Err(range),
            },
            Some(_) => Err(not_int),
        };
        uint("iat", Status::IatNotInteger, Status::IatOutOfRange)?;
        let nbf = uint("nbf", Status::NbfNotInteger, Status::NbfOutOfRange)?;
        let exp = uint("exp", Status::ExpNotInteger, Status::ExpOutOfRange)?;
        string("jti", Status::JtiNotString)?;
        let audiences = match payload.get("aud") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(l)) => l
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or(Status::AudNotString))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(Status::AudNotString),
        };
        let signature_len = B64URL
            .decode(signature_b64)
            .map_err(|_| Status::SignatureBadBase64)?
            .len();
        Ok(Jwt {
            alg,
            kid,
            header,
            payload,
            header_b64,
            payload_b64,
            signature_b64,
            signature_len,
            iss,
            audiences,
            nbf,
            exp,
        })
    }

    fn check_time(&self, now: u64, skew: u64) -> Result<(), Status> {
        if now.saturating_add(skew) < self.nbf {
            return Err(Status::NotYetValid);
        }
        if self.exp != 0 && now > self.exp.saturating_add(skew) {
            return Err(Status::Expired);
        }
        Ok(())
    }

    /// Envoy's `verifyJwtWithoutTimeChecking`: every key whose kid and alg fit is tried.
    fn check_signature(&self, keys: &[Jwk]) -> Result<(), Status> {
        let message = format!("{}.{}", self.header_b64, self.payload_b64);
        let alg: Option<Algorithm> = self.alg.parse().ok();
        let mut matched = false;
        for k in keys {
            if let (Some(want), Some(have)) = (&self.kid, &k.kid) {
                if want != have {
                    continue;
                }
            }
            if k.alg.as_ref().is_some_and(|a| *a != self.alg) {
                continue;
            }
            matched = true;
            if k.kind == KeyKind::Ed25519 && self.alg == "EdDSA" && self.signature_len != 64 {
                return Err(Status::Ed25519SignatureWrongLength);
            }
            // A key of another family (or an algorithm jsonwebtoken lacks, ES512) cannot
            // verify the token; Envoy's attempt fails the same way.
            let Some(alg) = alg.filter(|a| fits(k.kind, *a)) else {
                continue;
            };
            match jsonwebtoken::crypto::verify(self.signature_b64, message.as_bytes(), &k.key, alg)
            {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => debug!(error = %e, "JWT signature check failed"),
            }
        }
        Err(if matched {
            Status::VerificationFail
        } else {
            Status::JwksKidAlgMismatch
        })
    }
}

fn fits(kind: KeyKind, alg: Algorithm) -> bool {
    use Algorithm::*;
    matches!(
        (kind, alg),
        (KeyKind::Rsa, RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
            | (KeyKind::EcP256, ES256)
            | (KeyKind::EcP384, ES384)
            | (KeyKind::Ed25519, EdDSA)
            | (KeyKind::Hmac, HS256 | HS384 | HS512)
    )
}

/// Envoy's `sanitizeAudience`.
fn sanitize_audience(a: &str) -> String {
    let mut s = a;
    let mut changed = false;
    if let Some(r) = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
    {
        s = r;
        changed = true;
    }
    if let Some(r) = s.strip_suffix('/') {
        s = r;
        changed = true;
    }
    if changed {
        s.to_string()
    } else {
        a.to_string()
    }
}

// ------------------------------------------------------------------ the filter

/// A request the filter turns away: Envoy's local reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    /// The status text; empty with `strip_failure_response`.
    pub body: &'static str,
    pub www_authenticate: Option<HeaderValue>,
    /// Why, for logs and access-log details.
    pub reason: Status,
}

/// Verified payloads to put into the request's dynamic metadata under [`JWT_AUTHN`]: key
/// (`payload_in_metadata` / `header_in_metadata`) -> JSON object.
pub type Payloads = Vec<(String, Value)>;

/// The downstream connection, for the scheme Envoy's connection manager gives the request
/// (`x-forwarded-proto`), which the `www-authenticate` realm shows.
#[derive(Clone, Copy, Debug, Default)]
pub struct Downstream {
    pub tls: bool,
    /// `use_remote_address` (an edge proxy): the connection's scheme overrides the client's
    /// `x-forwarded-proto`.
    pub use_remote_address: bool,
}

impl JwtAuthn {
    /// Run the filter on a request: `Ok` with the payloads for dynamic metadata (the request's
    /// headers and query may have been changed: outputs set, forwarded-or-not tokens), or the
    /// reply to send. `now` is the Unix time in seconds.
    pub fn on_request<B>(
        &self,
        req: &mut Request<B>,
        conn: Downstream,
        now: u64,
    ) -> Result<Payloads, Rejection> {
        let mut payloads = Vec::new();
        if self.bypass_cors_preflight && is_cors_preflight(req) {
            return Ok(payloads);
        }
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let Some(rule) = self.rules.iter().find(|r| r.path.matches(path)) else {
            return Ok(payloads);
        };
        // Taken before verification may drop a token parameter (as Envoy does).
        let realm = original_uri(req, conn);
        match self.run(&rule.verifier, req, now, &mut payloads) {
            Ok(()) => Ok(payloads),
            Err(status) => Err(self.reject(status, &realm)),
        }
    }

    fn run<B>(
        &self,
        v: &Verifier,
        req: &mut Request<B>,
        now: u64,
        payloads: &mut Payloads,
    ) -> Result<(), Status> {
        match v {
            Verifier::AllowAll => Ok(()),
            Verifier::Provider(i, ex) => self.authenticate(Some(*i), ex, None, req, now, payloads),
            Verifier::Any { providers, bypass } => {
                let mut last = Err(Status::Missed);
                for (i, ex) in providers {
                    last = self.authenticate(Some(*i), ex, None, req, now, payloads);
                    if last.is_ok() {
                        return last;
                    }
                }
                match bypass {
                    Some((b, ex)) => self.authenticate(None, ex, Some(*b), req, now, payloads),
                    None => last,
                }
            }
        }
    }

    /// Envoy's authenticator: every token is checked (from the last extracted); without a
    /// bypass, the first bad one decides. `provider` None: the provider is found by issuer.
    fn authenticate<B>(
        &self,
        provider: Option<usize>,
        ex: &Extractor,
        bypass: Option<Bypass>,
        req: &mut Request<B>,
        now: u64,
        payloads: &mut Payloads,
    ) -> Result<(), Status> {
        for h in &ex.sanitize {
            req.headers_mut().remove(h);
        }
        // The tokens borrow the extractor (the config), not the request.
        let mut tokens = ex.extract(req);
        let mut status = Err(Status::Missed);
        while let Some(token) = tokens.pop() {
            status = self.verify_token(provider, &token, req, now, payloads);
            if status.is_err() && bypass.is_none() {
                break;
            }
        }
        match (status, bypass) {
            (Ok(()), _) | (Err(_), Some(Bypass::MissingOrFailed)) => Ok(()),
            (Err(Status::Missed), Some(Bypass::Missing)) => Ok(()),
            (Err(s), _) => Err(s),
        }
    }

    fn verify_token<B>(
        &self,
        provider: Option<usize>,
        token: &Token<'_>,
        req: &mut Request<B>,
        now: u64,
        payloads: &mut Payloads,
    ) -> Result<(), Status> {
        let jwt = Jwt::parse(&token.value)?;
        if !token.issuers.allows(&jwt.iss) {
            return Err(Status::UnknownIssuer);
        }
        let p = match provider {
            Some(i) => self.providers.get(i),
            None => self.by_issuer(&jwt.iss),
        }
        .ok_or(Status::UnknownIssuer)?;
        jwt.check_time(now, p.clock_skew)?;
        if !p.audiences.is_empty()
            && !jwt
                .audiences
                .iter()
                .any(|a| p.audiences.contains(&sanitize_audience(a)))
        {
            return Err(Status::AudienceNotAllowed);
        }
        let keys = p.keys.as_ref().map_err(|s| *s)?;
        jwt.check_signature(keys)?;
        debug!(provider = %p.name, issuer = %jwt.iss, "JWT verified");
        // Envoy's handleGoodJwt.
        let headers = req.headers_mut();
        if let Some(h) = &p.forward_payload_header {
            let mut v = jwt.payload_b64.to_string();
            if p.pad_forward_payload_header {
                while v.len() % 4 != 0 {
                    v.push('=');
                }
            }
            if let Ok(v) = HeaderValue::try_from(v) {
                headers.append(h.clone(), v);
            }
        }
        for (h, path) in &p.claim_to_headers {
            if let Some(v) = claim_text(&jwt.payload, path) {
                if let Ok(v) = HeaderValue::try_from(v) {
                    headers.append(h.clone(), v);
                }
            }
        }
        if !p.forward {
            match token.at {
                At::Header(h) => {
                    headers.remove(h);
                }
                At::Param(name) => remove_param(req, name),
                At::Cookie => {}
            }
        }
        if let Some(k) = &p.header_in_metadata {
            payloads.push((k.clone(), Value::Object(jwt.header.clone())));
        }
        if let Some(k) = &p.payload_in_metadata {
            payloads.push((k.clone(), Value::Object(jwt.payload)));
        }
        Ok(())
    }

    /// The first provider (by name) with this issuer, else the first without one.
    fn by_issuer(&self, iss: &str) -> Option<&Provider> {
        self.providers
            .iter()
            .find(|p| p.issuer == iss)
            .or_else(|| self.providers.iter().find(|p| p.issuer.is_empty()))
    }

    fn reject(&self, reason: Status, realm: &str) -> Rejection {
        let status = if reason == Status::AudienceNotAllowed {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::UNAUTHORIZED
        };
        debug!(reason = reason.text(), "jwt_authn denied the request");
        if self.strip_failure_response {
            return Rejection {
                status,
                body: "",
                www_authenticate: None,
                reason,
            };
        }
        let mut v = format!("Bearer realm=\"{realm}\"");
        if reason != Status::Missed {
            v.push_str(", error=\"invalid_token\"");
        }
        Rejection {
            status,
            body: reason.text(),
            www_authenticate: HeaderValue::try_from(v).ok(),
            reason,
        }
    }
}

fn is_cors_preflight<B>(req: &Request<B>) -> bool {
    req.method() == http::Method::OPTIONS
        && req
            .headers()
            .get(http::header::ORIGIN)
            .is_some_and(|v| !v.is_empty())
        && req
            .headers()
            .get(http::header::ACCESS_CONTROL_REQUEST_METHOD)
            .is_some_and(|v| !v.is_empty())
}

/// Envoy's `buildOriginalUri`: `x-forwarded-proto://host` + the path (query included), the
/// path cut at 256 bytes. The scheme is what Envoy's connection manager leaves in
/// `x-forwarded-proto`: the client's, unless this is the edge or it sent none.
fn original_uri<B>(req: &Request<B>, conn: Downstream) -> String {
    let h = req.headers();
    let own = if conn.tls { "https" } else { "http" };
    let scheme = if conn.use_remote_address {
        own
    } else {
        h.get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .unwrap_or(own)
    };
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| h.get(http::header::HOST).and_then(|v| v.to_str().ok()))
        .unwrap_or("");
    let path = req.uri().path_and_query().map_or("", |p| p.as_str());
    let mut end = path.len().min(MAX_REALM_PATH);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{scheme}://{host}{}", &path[..end])
}

/// A claim (by path) as Envoy copies it into a header: strings as they are, integers without
/// a fraction, other numbers as C's `%f`, booleans as `true`/`false`; nothing for other kinds
/// or an empty string.
fn claim_text(payload: &Map<String, Value>, path: &[String]) -> Option<String> {
    let (first, rest) = path.split_first()?;
    let mut v = payload.get(first)?;
    for k in rest {
        v = v.as_object()?.get(k)?;
    }
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match (n.as_u64(), n.as_f64()) {
            (Some(u), _) => u.to_string(),
            (None, Some(f)) if f >= 0.0 && f.fract() == 0.0 && f < u64::MAX as f64 => {
                format!("{}", f as u64)
            }
            (None, Some(f)) => format!("{f:.6}"),
            _ => return None,
        },
        _ => return None,
    };
    (!s.is_empty()).then_some(s)
}

/// Drop every `name=` parameter from the query (Envoy's `JwtParamLocation::removeJwt`).
fn remove_param<B>(req: &mut Request<B>, name: &str) {
    let uri = req.uri();
    let Some(query) = uri.query() else { return };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| percent_decode(kv.split_once('=').map_or(*kv, |(k, _)| k)) != name)
        .collect();
    let path = uri.path();
    let pq = if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    };
    let mut parts = uri.clone().into_parts();
    match http::uri::PathAndQuery::try_from(pq) {
        Ok(p) => parts.path_and_query = Some(p),
        Err(_) => return,
    }
    if let Ok(u) = http::Uri::from_parts(parts) {
        *req.uri_mut() = u;
    }
}

// ------------------------------------------------------------------ conversion

/// The proto -> [`JwtAuthn`] conversion (the filter's `typed_config`).
pub mod proto {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3 as core;
    use envoy_types::pb::envoy::config::route::v3 as rv3;
    use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3 as jwtv3;
    use jwtv3::jwt_requirement::RequiresType;

    /// Why a `JwtAuthentication` cannot be honoured: the field (proto path inside the filter's
    /// config) and what is wrong with it.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    #[error("{field}: {reason}")]
    pub struct JwtConfigError {
        pub field: String,
        pub reason: String,
    }

    fn bad<T>(field: impl Into<String>, reason: impl Into<String>) -> Result<T, JwtConfigError> {
        Err(JwtConfigError {
            field: field.into(),
            reason: reason.into(),
        })
    }

    impl TryFrom<&jwtv3::JwtAuthentication> for JwtAuthn {
        type Error = JwtConfigError;

        fn try_from(c: &jwtv3::JwtAuthentication) -> Result<JwtAuthn, JwtConfigError> {
            if c.filter_state_rules.is_some() {
                return bad("filter_state_rules", "not supported");
            }
            if !c.requirement_map.is_empty() {
                return bad("requirement_map", "not supported");
            }
            let mut names: Vec<&String> = c.providers.keys().collect();
            names.sort();
            let providers = names
                .into_iter()
                .map(|name| provider(name, &c.providers[name]))
                .collect::<Result<Vec<_>, _>>()?;
            let mut out = JwtAuthn {
                providers,
                rules: Vec::new(),
                bypass_cors_preflight: c.bypass_cors_preflight,
                strip_failure_response: c.strip_failure_response,
            };
            for (i, r) in c.rules.iter().enumerate() {
                let field = format!("rules[{i}]");
                let path = rule_match(r.r#match.as_ref())
                    .map_err(|e| within(&format!("{field}.match"), e))?;
                let verifier = match &r.requirement_type {
                    None => Verifier::AllowAll,
                    Some(jwtv3::requirement_rule::RequirementType::Requires(req)) => out
                        .verifier(req)
                        .map_err(|e| within(&format!("{field}.requires"), e))?,
                    Some(jwtv3::requirement_rule::RequirementType::RequirementName(_)) => {
                        return bad(format!("{field}.requirement_name"), "not supported")
                    }
                };
                out.rules.push(Rule { path, verifier });
            }
            Ok(out)
        }
    }

    fn within(prefix: &str, e: JwtConfigError) -> JwtConfigError {
        JwtConfigError {
            field: if e.field.is_empty() {
                prefix.to_string()
            } else {
                format!("{prefix}.{}", e.field)
            },
            reason: e.reason,
        }
    }

    impl JwtAuthn {
        fn index(&self, name: &str) -> Result<usize, JwtConfigError> {
            match self.providers.iter().position(|p| p.name == name) {
                Some(i) => Ok(i),
                None => bad(
                    "provider_name",
                    format!("required provider {name:?} is not configured"),
                ),
            }
        }

        fn verifier(&self, r: &jwtv3::JwtRequirement) -> Result<Verifier, JwtConfigError> {
            Ok(match &r.requires_type {
                None | Some(RequiresType::AllowMissing(_)) => Verifier::AllowAll,
                Some(RequiresType::AllowMissingOrFailed(_)) => Verifier::AllowAll,
                Some(RequiresType::ProviderName(n)) => {
                    let i = self.index(n)?;
                    Verifier::Provider(i, Extractor::new([&self.providers[i]]))
                }
                Some(RequiresType::RequiresAny(list)) => {
                    let mut providers = Vec::new();
                    let mut bypass = None;
                    for (k, r) in list.requirements.iter().enumerate() {
                        let field = format!("requires_any.requirements[{k}]");
                        match &r.requires_type {
                            Some(RequiresType::ProviderName(n)) => {
                                let i = self.index(n).map_err(|e| within(&field, e))?;
                                providers.push((i, Extractor::new([&self.providers[i]])));
                            }
                            // Envoy keeps one bypass; allow_missing_or_failed wins.
                            Some(RequiresType::AllowMissing(_)) => {
                                bypass = bypass.or(Some(Bypass::Missing));
                            }
                            Some(RequiresType::AllowMissingOrFailed(_)) => {
                                bypass = Some(Bypass::MissingOrFailed);
                            }
                            _ => {
                                return bad(
                                    field,
                                    "only provider_name, allow_missing and \
                                     allow_missing_or_failed are supported in requires_any",
                                )
                            }
                        }
                    }
                    let all = Extractor::new(providers.iter().map(|(i, _)| &self.providers[*i]));
                    Verifier::Any {
                        providers,
                        bypass: bypass.map(|b| (b, all)),
                    }
                }
                Some(RequiresType::ProviderAndAudiences(_)) => {
                    return bad("provider_and_audiences", "not supported")
                }
                Some(RequiresType::RequiresAll(_)) => return bad("requires_all", "not supported"),
                Some(_) => return bad("requires_type", "this requirement kind is not supported"),
            })
        }
    }

    fn rule_match(m: Option<&rv3::RouteMatch>) -> Result<PathMatch, JwtConfigError> {
        use rv3::route_match::PathSpecifier;
        let Some(m) = m else {
            return bad("", "missing");
        };
        if m.case_sensitive.as_ref().is_some_and(|b| !b.value) {
            return bad(
                "case_sensitive",
                "case-insensitive matching is not supported",
            );
        }
        let rest = rv3::RouteMatch {
            path_specifier: None,
            case_sensitive: None,
            ..m.clone()
        };
        if rest != rv3::RouteMatch::default() {
            return bad(
                "",
                "only prefix or path matching is supported (no headers, query parameters \
                 or other conditions)",
            );
        }
        match &m.path_specifier {
            Some(PathSpecifier::Prefix(p)) => Ok(PathMatch::Prefix(p.clone())),
            Some(PathSpecifier::Path(p)) => Ok(PathMatch::Exact(p.clone())),
            _ => bad("path_specifier", "only prefix and path are supported"),
        }
    }

    fn header_name(field: &str, name: &str) -> Result<HeaderName, JwtConfigError> {
        HeaderName::try_from(name.to_ascii_lowercase())
            .or_else(|_| bad(field, format!("{name:?} is not a valid header name")))
    }

    fn provider(name: &str, p: &jwtv3::JwtProvider) -> Result<Provider, JwtConfigError> {
        provider_inner(name, p).map_err(|e| within(&format!("providers[{name}]"), e))
    }

    fn provider_inner(name: &str, p: &jwtv3::JwtProvider) -> Result<Provider, JwtConfigError> {
        use jwtv3::jwt_provider::JwksSourceSpecifier;
        if p.subjects.is_some() {
            return bad("subjects", "not supported");
        }
        if p.require_expiration {
            return bad("require_expiration", "not supported");
        }
        if p.max_lifetime.is_some() {
            return bad("max_lifetime", "not supported");
        }
        if !p.failed_status_in_metadata.is_empty() {
            return bad("failed_status_in_metadata", "not supported");
        }
        if p.normalize_payload_in_metadata
            .as_ref()
            .is_some_and(|n| !n.space_delimited_claims.is_empty())
        {
            return bad("normalize_payload_in_metadata", "not supported");
        }
        if p.clear_route_cache {
            return bad(
                "clear_route_cache",
                "not supported (the route is chosen before the HTTP filters run)",
            );
        }
        let jwks = match &p.jwks_source_specifier {
            Some(JwksSourceSpecifier::LocalJwks(ds)) => match &ds.specifier {
                Some(core::data_source::Specifier::InlineString(s)) => s.clone(),
                Some(core::data_source::Specifier::InlineBytes(b)) => {
                    String::from_utf8_lossy(b).into_owned()
                }
                _ => {
                    return bad(
                        "local_jwks",
                        "only inline_string / inline_bytes are supported",
                    )
                }
            },
            Some(JwksSourceSpecifier::RemoteJwks(_)) => {
                return bad(
                    "remote_jwks",
                    "not supported: the proxy fetches nothing (the pilot inlines the keys)",
                )
            }
            None => return bad("jwks_source_specifier", "missing"),
        };
        let keys = jwks_keys(&jwks).map_err(|e| within("local_jwks", e))?;
        if let Err(s) = &keys {
            warn!(provider = name, issuer = %p.issuer, reason = s.text(),
                "JWKS has no usable key: tokens of this provider are refused");
        }
        let mut locations = Locations::default();
        for (i, h) in p.from_headers.iter().enumerate() {
            let n = header_name(&format!("from_headers[{i}].name"), &h.name)?;
            locations.headers.push((n, h.value_prefix.clone()));
        }
        locations.params = p.from_params.clone();
        locations.cookies = p.from_cookies.clone();
        if locations.headers.is_empty()
            && locations.params.is_empty()
            && locations.cookies.is_empty()
        {
            locations
                .headers
                .push((http::header::AUTHORIZATION, "Bearer ".into()));
            locations.params.push("access_token".into());
        }
        let forward_payload_header = Some(&p.forward_payload_header)
            .filter(|h| !h.is_empty())
            .map(|h| header_name("forward_payload_header", h))
            .transpose()?;
        let mut claim_to_headers = Vec::new();
        for (i, c) in p.claim_to_headers.iter().enumerate() {
            let field = format!("claim_to_headers[{i}]");
            let h = header_name(&format!("{field}.header_name"), &c.header_name)?;
            let path: Vec<String> = match (c.claim_name.is_empty(), c.claim_path.is_empty()) {
                (false, true) => c.claim_name.split('.').map(str::to_string).collect(),
                (true, false) => c.claim_path.iter().map(|s| s.key.clone()).collect(),
                _ => {
                    return bad(
                        field,
                        "exactly one of claim_name and claim_path must be set",
                    )
                }
            };
            claim_to_headers.push((h, path));
        }
        Ok(Provider {
            name: name.to_string(),
            issuer: p.issuer.clone(),
            audiences: p.audiences.iter().map(|a| sanitize_audience(a)).collect(),
            keys,
            forward: p.forward,
            forward_payload_header,
            pad_forward_payload_header: p.pad_forward_payload_header,
            payload_in_metadata: Some(p.payload_in_metadata.clone()).filter(|s| !s.is_empty()),
            header_in_metadata: Some(p.header_in_metadata.clone()).filter(|s| !s.is_empty()),
            clock_skew: if p.clock_skew_seconds > 0 {
                u64::from(p.clock_skew_seconds)
            } else {
                DEFAULT_CLOCK_SKEW
            },
            claim_to_headers,
            locations,
        })
    }

    /// Envoy's `Jwks::createFrom(JWKS)`: keys Envoy cannot read either are skipped (a JWKS with
    /// none left fails every token, as in Envoy); keys Envoy reads and this proxy cannot
    /// verify with are a conversion error.
    fn jwks_keys(jwks: &str) -> Result<Result<Vec<Jwk>, Status>, JwtConfigError> {
        let Ok(Value::Object(doc)) = serde_json::from_str::<Value>(jwks) else {
            return Ok(Err(Status::JwksNoValidKeys));
        };
        let Some(keys) = doc.get("keys") else {
            let certs = !doc.is_empty()
                && doc.values().all(|v| {
                    v.as_str()
                        .is_some_and(|s| s.starts_with("-----BEGIN CERTIFICATE-----"))
                });
            if certs {
                return bad("", "X.509 certificate-map JWKS are not supported");
            }
            return Ok(Err(Status::JwksNoValidKeys));
        };
        let Some(keys) = keys.as_array() else {
            return Ok(Err(Status::JwksNoValidKeys));
        };
        let mut out = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let Some(k) = k.as_object() else { continue };
            match jwk(k).map_err(|e| within(&format!("keys[{i}]"), e))? {
                Some(j) => out.push(j),
                None => debug!(index = i, "JWKS key skipped (as Envoy does)"),
            }
        }
        Ok(if out.is_empty() {
            Err(Status::JwksNoValidKeys)
        } else {
            Ok(out)
        })
    }

    /// One JWK: `None` when Envoy would skip it too.
    fn jwk(k: &Map<String, Value>) -> Result<Option<Jwk>, JwtConfigError> {
        let s = |name: &str| k.get(name).and_then(Value::as_str);
        let bytes = |name: &str| s(name).and_then(|v| B64URL.decode(v).ok());
        let Some(kty) = s("kty") else { return Ok(None) };
        let kid = match k.get("kid") {
            None => None,
            Some(Value::String(v)) => Some(v.clone()),
            Some(_) => return Ok(None),
        };
        let alg = match k.get("alg") {
            None => None,
            Some(Value::String(v)) => Some(v.clone()),
            Some(_) => return Ok(None),
        };
        let a = alg.as_deref();
        let (kind, key) = match kty {
            "RSA" => {
                if a.is_some_and(|a| !a.starts_with("RS") && !a.starts_with("PS")) {
                    return Ok(None);
                }
                let (Some(n), Some(e)) = (bytes("n"), bytes("e")) else {
                    return Ok(None);
                };
                let first = n.iter().position(|b| *b != 0).unwrap_or(n.len());
                let bits = (n.len() - first) * 8;
                if !(2048..=8192).contains(&bits) {
                    return bad(
                        "n",
                        format!("a {bits}-bit RSA key: only 2048 to 8192 bits are supported"),
                    );
                }
                (KeyKind::Rsa, DecodingKey::from_rsa_raw_components(&n, &e))
            }
            "EC" => {
                if a.is_some_and(|a| !a.starts_with("ES")) {
                    return Ok(None);
                }
                let crv = match (k.get("crv"), a) {
                    (Some(Value::String(c)), _) => c.as_str(),
                    (Some(_), _) => return Ok(None),
                    (None, Some("ES256")) => "P-256",
                    (None, Some("ES384")) => "P-384",
                    (None, Some("ES512")) => "P-521",
                    (None, _) => return Ok(None),
                };
                let (kind, len, want_alg) = match crv {
                    "P-256" => (KeyKind::EcP256, 32, "ES256"),
                    "P-384" => (KeyKind::EcP384, 48, "ES384"),
                    "P-521" => return bad("crv", "P-521 (ES512) keys are not supported"),
                    _ => return Ok(None),
                };
                if a.is_some_and(|a| a != want_alg) {
                    return Ok(None);
                }
                let (Some(x), Some(y)) = (bytes("x"), bytes("y")) else {
                    return Ok(None);
                };
                if x.len() != len || y.len() != len {
                    return Ok(None);
                }
                let mut point = Vec::with_capacity(1 + 2 * len);
                point.push(0x04);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                (kind, DecodingKey::from_ec_der(&point))
            }
            "OKP" => {
                if a.is_some_and(|a| a != "EdDSA") || s("crv") != Some("Ed25519") {
                    return Ok(None);
                }
                let Some(x) = bytes("x").filter(|x| x.len() == 32) else {
                    return Ok(None);
                };
                (KeyKind::Ed25519, DecodingKey::from_ed_der(&x))
            }
            "oct" => {
                if a.is_some_and(|a| !a.starts_with("HS")) {
                    return Ok(None);
                }
                let Some(secret) = bytes("k") else {
                    return Ok(None);
                };
                (KeyKind::Hmac, DecodingKey::from_secret(&secret))
            }
            _ => return Ok(None),
        };
        Ok(Some(Jwk {
            kid,
            alg,
            kind,
            key,
        }))
    }
}

#[cfg(test)]
mod tests;
