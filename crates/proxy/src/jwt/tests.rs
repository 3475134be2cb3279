use super::proto::JwtConfigError;
use super::*;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as rv3;
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3 as jwtv3;
use ring::rand::SystemRandom;
use ring::signature::{self as sig, KeyPair};
use serde_json::json;

const ISS: &str = "https://issuer.test";
const NOW: u64 = 1_800_000_000;

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// A signing key of one family, its public JWK and tokens signed with it.
enum Signer {
    Rsa(sig::RsaKeyPair),
    Ec(sig::EcdsaKeyPair, &'static str),
    Ed(sig::Ed25519KeyPair),
    Hmac(Vec<u8>),
}

fn rsa(which: &str) -> Signer {
    let der: &[u8] = match which {
        "a" => include_bytes!("testdata/rsa2048-a.der"),
        _ => include_bytes!("testdata/rsa2048-b.der"),
    };
    Signer::Rsa(sig::RsaKeyPair::from_der(der).expect("test RSA key"))
}

fn ec(crv: &'static str) -> Signer {
    let alg = match crv {
        "P-256" => &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
        _ => &sig::ECDSA_P384_SHA384_FIXED_SIGNING,
    };
    let rng = SystemRandom::new();
    let pk8 = sig::EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("ec key");
    Signer::Ec(
        sig::EcdsaKeyPair::from_pkcs8(alg, pk8.as_ref(), &rng).expect("ec key"),
        crv,
    )
}

fn ed() -> Signer {
    let pk8 = sig::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("ed key");
    Signer::Ed(sig::Ed25519KeyPair::from_pkcs8(pk8.as_ref()).expect("ed key"))
}

impl Signer {
    fn jwk(&self, kid: &str) -> Value {
        match self {
            Signer::Rsa(k) => {
                let c: ring::rsa::PublicKeyComponents<Vec<u8>> = k.public().into();
                json!({"kty": "RSA", "kid": kid, "n": b64(&c.n), "e": b64(&c.e)})
            }
            Signer::Ec(k, crv) => {
                let p = k.public_key().as_ref();
                let n = (p.len() - 1) / 2;
                json!({"kty": "EC", "kid": kid, "crv": crv, "x": b64(&p[1..1 + n]), "y": b64(&p[1 + n..])})
            }
            Signer::Ed(k) => {
                json!({"kty": "OKP", "kid": kid, "crv": "Ed25519", "x": b64(k.public_key().as_ref())})
            }
            Signer::Hmac(s) => json!({"kty": "oct", "kid": kid, "k": b64(s)}),
        }
    }

    fn sign(&self, alg: &str, kid: &str, claims: Value) -> String {
        let head = b64(json!({"alg": alg, "typ": "JWT", "kid": kid})
            .to_string()
            .as_bytes());
        let input = format!("{head}.{}", b64(claims.to_string().as_bytes()));
        let rng = SystemRandom::new();
        let signature = match self {
            Signer::Rsa(k) => {
                let pad: &'static dyn sig::RsaEncoding = match alg {
                    "RS256" => &sig::RSA_PKCS1_SHA256,
                    "RS384" => &sig::RSA_PKCS1_SHA384,
                    "RS512" => &sig::RSA_PKCS1_SHA512,
                    "PS256" => &sig::RSA_PSS_SHA256,
                    _ => &sig::RSA_PSS_SHA512,
                };
                let mut out = vec![0; k.public().modulus_len()];
                k.sign(pad, &rng, input.as_bytes(), &mut out).expect("sign");
                out
            }
            Signer::Ec(k, _) => k
                .sign(&rng, input.as_bytes())
                .expect("sign")
                .as_ref()
                .to_vec(),
            Signer::Ed(k) => k.sign(input.as_bytes()).as_ref().to_vec(),
            Signer::Hmac(s) => {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, s);
                ring::hmac::sign(&key, input.as_bytes()).as_ref().to_vec()
            }
        };
        format!("{input}.{}", b64(&signature))
    }

    /// An RS256 (or the family's) token for ISS with `extra` claims over iss/sub/aud/exp.
    fn token(&self, kid: &str, extra: Value) -> String {
        let alg = match self {
            Signer::Rsa(_) => "RS256",
            Signer::Ec(_, "P-256") => "ES256",
            Signer::Ec(..) => "ES384",
            Signer::Ed(_) => "EdDSA",
            Signer::Hmac(_) => "HS256",
        };
        let mut c =
            json!({"iss": ISS, "sub": "alice", "aud": "web", "iat": NOW, "exp": NOW + 3600});
        if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                c.insert(k.clone(), v.clone());
            }
        }
        self.sign(alg, kid, c)
    }
}

fn jwks(keys: &[Value]) -> String {
    json!({ "keys": keys }).to_string()
}

/// A provider as the pilot builds it (see `mizzen_xds::gen::jwt`).
fn provider(issuer: &str, keys: String) -> jwtv3::JwtProvider {
    jwtv3::JwtProvider {
        issuer: issuer.into(),
        audiences: vec!["web".into()],
        payload_in_metadata: issuer.into(),
        jwks_source_specifier: Some(jwtv3::jwt_provider::JwksSourceSpecifier::LocalJwks(
            core::DataSource {
                specifier: Some(core::data_source::Specifier::InlineString(keys)),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

fn name_req(n: &str) -> jwtv3::JwtRequirement {
    jwtv3::JwtRequirement {
        requires_type: Some(jwtv3::jwt_requirement::RequiresType::ProviderName(n.into())),
    }
}

/// Istio's shape: any provider, or no token.
fn istio(providers: Vec<jwtv3::JwtProvider>) -> jwtv3::JwtAuthentication {
    let mut any: Vec<_> = (0..providers.len())
        .map(|i| name_req(&format!("origins-{i}")))
        .collect();
    any.push(jwtv3::JwtRequirement {
        requires_type: Some(jwtv3::jwt_requirement::RequiresType::AllowMissing(
            Default::default(),
        )),
    });
    let requires = jwtv3::JwtRequirement {
        requires_type: Some(jwtv3::jwt_requirement::RequiresType::RequiresAny(
            jwtv3::JwtRequirementOrList { requirements: any },
        )),
    };
    one_rule(providers, requires)
}

fn one_rule(
    providers: Vec<jwtv3::JwtProvider>,
    requires: jwtv3::JwtRequirement,
) -> jwtv3::JwtAuthentication {
    jwtv3::JwtAuthentication {
        providers: providers
            .into_iter()
            .enumerate()
            .map(|(i, p)| (format!("origins-{i}"), p))
            .collect(),
        rules: vec![jwtv3::RequirementRule {
            r#match: Some(rv3::RouteMatch {
                path_specifier: Some(rv3::route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            requirement_type: Some(jwtv3::requirement_rule::RequirementType::Requires(requires)),
        }],
        bypass_cors_preflight: true,
        ..Default::default()
    }
}

fn compile(c: &jwtv3::JwtAuthentication) -> JwtAuthn {
    JwtAuthn::try_from(c).expect("config converts")
}

fn req(path: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut b = Request::builder()
        .uri(path)
        .header("host", "web.foo:8080")
        .header("x-forwarded-proto", "http");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).expect("request")
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

fn denied(r: Result<Payloads, Rejection>) -> Rejection {
    r.expect_err("request should be refused")
}

#[test]
fn a_valid_token_passes_its_payload_goes_to_metadata_and_the_token_is_stripped() {
    let k = rsa("a");
    let f = compile(&istio(vec![provider(ISS, jwks(&[k.jwk("k1")]))]));
    let tok = k.token("k1", json!({"groups": ["dev", "admin"]}));
    let mut r = req("/open", &[("authorization", &bearer(&tok))]);
    let md = f
        .on_request(&mut r, Downstream::default(), NOW)
        .expect("valid token");
    assert_eq!(md.len(), 1);
    assert_eq!(md[0].0, ISS);
    assert_eq!(md[0].1["sub"], "alice");
    assert_eq!(md[0].1["groups"][1], "admin");
    // forward is false (Istio's default): the token does not reach the app.
    assert!(r.headers().get("authorization").is_none());
}

#[test]
fn no_token_passes_with_allow_missing_and_is_refused_without_it() {
    let k = rsa("a");
    let p = provider(ISS, jwks(&[k.jwk("k1")]));
    let f = compile(&istio(vec![p.clone()]));
    let md = f
        .on_request(&mut req("/", &[]), Downstream::default(), NOW)
        .expect("no token passes");
    assert!(md.is_empty());

    let strict = compile(&one_rule(vec![p], name_req("origins-0")));
    let rej = denied(strict.on_request(&mut req("/x?a=1", &[]), Downstream::default(), NOW));
    assert_eq!(rej.status, StatusCode::UNAUTHORIZED);
    assert_eq!(rej.body, "Jwt is missing");
    // Missing: a realm, no invalid_token error (Envoy's header).
    assert_eq!(
        rej.www_authenticate.expect("header"),
        "Bearer realm=\"http://web.foo:8080/x?a=1\""
    );
}

#[test]
fn envoy_answers_for_invalid_tokens() {
    let k = rsa("a");
    let stranger = rsa("b");
    let f = compile(&istio(vec![provider(ISS, jwks(&[k.jwk("k1")]))]));
    let cases: Vec<(String, StatusCode, &str)> = vec![
        (
            k.token("k1", json!({"exp": NOW - 61})),
            StatusCode::UNAUTHORIZED,
            "Jwt is expired",
        ),
        (
            k.token("k1", json!({"nbf": NOW + 61})),
            StatusCode::UNAUTHORIZED,
            "Jwt not yet valid",
        ),
        (
            k.token("k1", json!({"iss": "https://evil.test"})),
            StatusCode::UNAUTHORIZED,
            "Jwt issuer is not configured",
        ),
        (
            k.token("k1", json!({"aud": "other"})),
            StatusCode::FORBIDDEN,
            "Audiences in Jwt are not allowed",
        ),
        (
            stranger.token("k1", json!({})),
            StatusCode::UNAUTHORIZED,
            "Jwt verification fails",
        ),
        (
            k.token("k9", json!({})),
            StatusCode::UNAUTHORIZED,
            "Jwks doesn't have key to match kid or alg from Jwt",
        ),
        (
            "not-a-jwt".into(),
            StatusCode::UNAUTHORIZED,
            "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
        ),
        (
            "not.a.jwt".into(),
            StatusCode::UNAUTHORIZED,
            "Jwt header is an invalid JSON",
        ),
        (
            format!("{}.{}.sig", b64(br#"{"alg":"none"}"#), b64(b"{}")),
            StatusCode::UNAUTHORIZED,
            "Jwt header [alg] is not supported",
        ),
        (
            format!(
                "{}.{}.sig",
                b64(br#"{"alg":"RS256"}"#),
                b64(br#"{"exp":"soon"}"#)
            ),
            StatusCode::UNAUTHORIZED,
            "Jwt payload [exp] field is not an integer",
        ),
        (
            format!(
                "{}.{}.sig",
                b64(br#"{"alg":"RS256"}"#),
                b64(br#"{"aud":[1]}"#)
            ),
            StatusCode::UNAUTHORIZED,
            "Jwt payload [aud] field is not a string or string list",
        ),
    ];
    for (tok, status, body) in cases {
        let mut r = req("/open", &[("authorization", &bearer(&tok))]);
        let rej = denied(f.on_request(&mut r, Downstream::default(), NOW));
        assert_eq!((rej.status, rej.body), (status, body), "token {tok}");
        assert_eq!(
            rej.www_authenticate.expect("header"),
            "Bearer realm=\"http://web.foo:8080/open\", error=\"invalid_token\""
        );
    }
}

#[test]
fn clock_skew_is_sixty_seconds_by_default_and_configurable() {
    let k = rsa("a");
    let mut p = provider(ISS, jwks(&[k.jwk("k1")]));
    let f = compile(&istio(vec![p.clone()]));
    for extra in [json!({"exp": NOW - 59}), json!({"nbf": NOW + 59})] {
        let tok = k.token("k1", extra);
        assert!(f
            .on_request(
                &mut req("/", &[("authorization", &bearer(&tok))]),
                Downstream::default(),
                NOW
            )
            .is_ok());
    }
    p.clock_skew_seconds = 5;
    let f = compile(&istio(vec![p]));
    let tok = k.token("k1", json!({"exp": NOW - 10}));
    let rej = denied(f.on_request(
        &mut req("/", &[("authorization", &bearer(&tok))]),
        Downstream::default(),
        NOW,
    ));
    assert_eq!(rej.body, "Jwt is expired");
}

#[test]
fn audiences_any_listed_one_matches_none_listed_means_any() {
    let k = rsa("a");
    let mut p = provider(ISS, jwks(&[k.jwk("k1")]));
    p.audiences = vec!["web".into(), "https://api.test/".into()];
    let f = compile(&istio(vec![p.clone()]));
    for aud in [json!(["x", "web"]), json!("api.test"), json!("http://web/")] {
        let tok = k.token("k1", json!({ "aud": aud }));
        assert!(
            f.on_request(
                &mut req("/", &[("authorization", &bearer(&tok))]),
                Downstream::default(),
                NOW
            )
            .is_ok(),
            "aud {aud}"
        );
    }
    let tok = k.token("k1", json!({"aud": ["x", "y"]}));
    assert!(f
        .on_request(
            &mut req("/", &[("authorization", &bearer(&tok))]),
            Downstream::default(),
            NOW
        )
        .is_err());
    p.audiences.clear();
    let f = compile(&istio(vec![p]));
    assert!(f
        .on_request(
            &mut req("/", &[("authorization", &bearer(&tok))]),
            Downstream::default(),
            NOW
        )
        .is_ok());
}

#[test]
fn every_supported_algorithm_verifies_and_a_foreign_signature_does_not() {
    let cases: Vec<(Signer, &str)> = vec![
        (rsa("a"), "RS256"),
        (rsa("a"), "RS384"),
        (rsa("a"), "RS512"),
        (rsa("a"), "PS256"),
        (rsa("a"), "PS512"),
        (ec("P-256"), "ES256"),
        (ec("P-384"), "ES384"),
        (ed(), "EdDSA"),
        (
            Signer::Hmac(b"0123456789abcdef0123456789abcdef".to_vec()),
            "HS256",
        ),
    ];
    for (k, alg) in &cases {
        let f = compile(&istio(vec![provider(ISS, jwks(&[k.jwk("k1")]))]));
        let claims = json!({"iss": ISS, "sub": "s", "aud": "web", "exp": NOW + 60});
        let tok = k.sign(alg, "k1", claims.clone());
        assert!(
            f.on_request(
                &mut req("/", &[("authorization", &bearer(&tok))]),
                Downstream::default(),
                NOW
            )
            .is_ok(),
            "{alg}"
        );
        // The same claims under another signature of the same length.
        let mut parts: Vec<String> = tok.split('.').map(str::to_string).collect();
        let other = k.sign(alg, "k1", json!({"iss": ISS, "aud": "web", "x": 1}));
        parts[2] = other.rsplit('.').next().unwrap_or_default().to_string();
        let forged = parts.join(".");
        let rej = denied(f.on_request(
            &mut req("/", &[("authorization", &bearer(&forged))]),
            Downstream::default(),
            NOW,
        ));
        assert_eq!(rej.body, "Jwt verification fails", "{alg}");
    }
}

#[test]
fn a_key_of_another_family_or_alg_cannot_verify() {
    let r = rsa("a");
    let e = ec("P-256");
    // Both keys without kid: the RSA token tries both, only the RSA key fits.
    let f = compile(&istio(vec![provider(
        ISS,
        jwks(&[e.jwk("e"), r.jwk("r")])
            .replace("\"kid\":\"e\",", "")
            .replace("\"kid\":\"r\",", ""),
    )]));
    let tok = r.sign("RS256", "", json!({"iss": ISS, "aud": "web"}));
    assert!(f
        .on_request(
            &mut req("/", &[("authorization", &bearer(&tok))]),
            Downstream::default(),
            NOW
        )
        .is_ok());
    // A key pinned to another alg is no candidate.
    let mut jwk = r.jwk("k1");
    jwk["alg"] = json!("PS256");
    let f = compile(&istio(vec![provider(ISS, jwks(&[jwk]))]));
    let tok = r.token("k1", json!({}));
    let rej = denied(f.on_request(
        &mut req("/", &[("authorization", &bearer(&tok))]),
        Downstream::default(),
        NOW,
    ));
    assert_eq!(
        rej.body,
        "Jwks doesn't have key to match kid or alg from Jwt"
    );
}

#[test]
fn custom_locations_forward_and_outputs() {
    let k = rsa("a");
    let mut p = provider(ISS, jwks(&[k.jwk("k1")]));
    p.from_headers = vec![jwtv3::JwtHeader {
        name: "X-Jwt".into(),
        value_prefix: "Token ".into(),
    }];
    p.from_params = vec!["access_token".into()];
    p.from_cookies = vec!["session".into()];
    p.forward = true;
    p.forward_payload_header = "x-jwt-payload".into();
    p.claim_to_headers = vec![
        jwtv3::JwtClaimToHeader {
            header_name: "x-sub".into(),
            claim_name: "sub".into(),
            ..Default::default()
        },
        jwtv3::JwtClaimToHeader {
            header_name: "x-role".into(),
            claim_name: "org.role".into(),
            ..Default::default()
        },
        jwtv3::JwtClaimToHeader {
            header_name: "x-level".into(),
            claim_name: "level".into(),
            ..Default::default()
        },
        jwtv3::JwtClaimToHeader {
            header_name: "x-ratio".into(),
            claim_name: "ratio".into(),
            ..Default::default()
        },
    ];
    let f = compile(&istio(vec![p.clone()]));
    let tok = k.token(
        "k1",
        json!({"org": {"role": "owner"}, "level": 3, "ratio": 0.5}),
    );
    // Header with its prefix; a client-set payload header is replaced.
    let mut r = req(
        "/",
        &[
            ("x-jwt", &format!("Token {tok}")),
            ("x-jwt-payload", "forged"),
        ],
    );
    f.on_request(&mut r, Downstream::default(), NOW)
        .expect("header token");
    let h = r.headers();
    assert_eq!(
        h.get("x-jwt").map(|v| v.as_bytes()),
        Some(format!("Token {tok}").as_bytes())
    );
    let payload = h.get_all("x-jwt-payload").iter().collect::<Vec<_>>();
    assert_eq!(payload.len(), 1);
    let json: Value =
        serde_json::from_slice(&B64URL.decode(payload[0].as_bytes()).expect("b64")).expect("json");
    assert_eq!(json["sub"], "alice");
    assert_eq!(h.get("x-sub").map(|v| v.as_bytes()), Some(&b"alice"[..]));
    assert_eq!(h.get("x-role").map(|v| v.as_bytes()), Some(&b"owner"[..]));
    assert_eq!(h.get("x-level").map(|v| v.as_bytes()), Some(&b"3"[..]));
    assert_eq!(
        h.get("x-ratio").map(|v| v.as_bytes()),
        Some(&b"0.500000"[..])
    );
    // Bearer in Authorization is not a location once locations are configured.
    let mut r = req(
        "/",
        &[(
            "authorization",
            &bearer(&k.token("k1", json!({"aud": "x"}))),
        )],
    );
    assert!(f
        .on_request(&mut r, Downstream::default(), NOW)
        .expect("ignored")
        .is_empty());
    // Query parameter, and a cookie.
    let mut r = req(&format!("/p?a=1&access_token={tok}&b=2"), &[]);
    assert_eq!(
        f.on_request(&mut r, Downstream::default(), NOW)
            .expect("param")
            .len(),
        1
    );
    let mut r = req("/", &[("cookie", &format!("a=b; session=\"{tok}\""))]);
    assert_eq!(
        f.on_request(&mut r, Downstream::default(), NOW)
            .expect("cookie")
            .len(),
        1
    );
    // forward = false takes the parameter out of the query.
    p.forward = false;
    let f = compile(&istio(vec![p]));
    let mut r = req(&format!("/p?a=1&access_token={tok}&b=2"), &[]);
    f.on_request(&mut r, Downstream::default(), NOW)
        .expect("param");
    assert_eq!(
        r.uri().path_and_query().map(|p| p.as_str()),
        Some("/p?a=1&b=2")
    );
    // A client cannot forge the output headers even without a token.
    let mut r = req("/", &[("x-sub", "mallory"), ("x-jwt-payload", "forged")]);
    f.on_request(&mut r, Downstream::default(), NOW)
        .expect("no token");
    assert!(r.headers().get("x-sub").is_none() && r.headers().get("x-jwt-payload").is_none());
}

#[test]
fn providers_by_issuer_and_multiple_tokens() {
    let a = rsa("a");
    let b = rsa("b");
    let p0 = provider(ISS, jwks(&[a.jwk("k1")]));
    let p1 = provider("https://other.test", jwks(&[b.jwk("k2")]));
    let f = compile(&istio(vec![p0, p1]));
    let tok = b.token("k2", json!({"iss": "https://other.test"}));
    let md = f
        .on_request(
            &mut req("/", &[("authorization", &bearer(&tok))]),
            Downstream::default(),
            NOW,
        )
        .expect("second provider");
    assert_eq!(md[0].0, "https://other.test");
    // A good token and a bad one. With a single provider required, every token must be good.
    let good = a.token("k1", json!({}));
    let bad = a.token("k1", json!({"exp": NOW - 3600}));
    let strict = compile(&one_rule(
        vec![provider(ISS, jwks(&[a.jwk("k1")]))],
        name_req("origins-0"),
    ));
    let two = |header: &str, param: &str| {
        req(
            &format!("/?access_token={param}"),
            &[("authorization", &bearer(header))],
        )
    };
    assert_eq!(
        denied(strict.on_request(&mut two(&good, &bad), Downstream::default(), NOW)).body,
        "Jwt is expired"
    );
    assert_eq!(
        denied(strict.on_request(&mut two(&bad, &good), Downstream::default(), NOW)).body,
        "Jwt is expired"
    );
    // Under allow_missing Envoy checks them all and the last one checked (the first extracted:
    // headers before parameters) decides.
    assert_eq!(
        f.on_request(&mut two(&good, &bad), Downstream::default(), NOW)
            .expect("header decides")
            .len(),
        1
    );
    assert_eq!(
        denied(f.on_request(&mut two(&bad, &good), Downstream::default(), NOW)).body,
        "Jwt is expired"
    );
}

#[test]
fn cors_preflight_and_unmatched_paths_bypass_verification() {
    let k = rsa("a");
    let mut c = istio(vec![provider(ISS, jwks(&[k.jwk("k1")]))]);
    let f = compile(&c);
    let mut r = Request::builder()
        .method("OPTIONS")
        .uri("/")
        .header("origin", "https://a.test")
        .header("access-control-request-method", "GET")
        .header("authorization", "Bearer garbage")
        .body(())
        .expect("request");
    assert!(f.on_request(&mut r, Downstream::default(), NOW).is_ok());
    c.rules[0].r#match = Some(rv3::RouteMatch {
        path_specifier: Some(rv3::route_match::PathSpecifier::Prefix("/api".into())),
        ..Default::default()
    });
    let f = compile(&c);
    assert!(f
        .on_request(
            &mut req("/open", &[("authorization", "Bearer garbage")]),
            Downstream::default(),
            NOW
        )
        .is_ok());
    assert!(f
        .on_request(
            &mut req("/api/x", &[("authorization", "Bearer garbage")]),
            Downstream::default(),
            NOW
        )
        .is_err());
}

#[test]
fn unusable_jwks_fail_tokens_like_envoy_and_strip_failure_response() {
    let k = rsa("a");
    for bad in [
        "not json",
        r#"{"keys": "x"}"#,
        r#"{"keys": [{"kty": "RSA"}, 3]}"#,
    ] {
        let f = compile(&istio(vec![provider(ISS, bad.into())]));
        let tok = k.token("k1", json!({}));
        let rej = denied(f.on_request(
            &mut req("/", &[("authorization", &bearer(&tok))]),
            Downstream::default(),
            NOW,
        ));
        assert_eq!(rej.body, "Jwks doesn't have any valid public key", "{bad}");
    }
    let mut c = istio(vec![provider(ISS, jwks(&[k.jwk("k1")]))]);
    c.strip_failure_response = true;
    let f = compile(&c);
    let rej = denied(f.on_request(
        &mut req("/", &[("authorization", "Bearer x.y.z")]),
        Downstream::default(),
        NOW,
    ));
    assert_eq!(
        (rej.status, rej.body, rej.www_authenticate),
        (StatusCode::UNAUTHORIZED, "", None)
    );
}

fn nack(c: &jwtv3::JwtAuthentication) -> JwtConfigError {
    JwtAuthn::try_from(c).expect_err("config must be refused")
}

#[test]
fn what_cannot_be_honoured_is_refused_naming_the_field() {
    let k = rsa("a");
    let good = provider(ISS, jwks(&[k.jwk("k1")]));

    let mut p = good.clone();
    p.jwks_source_specifier = Some(jwtv3::jwt_provider::JwksSourceSpecifier::RemoteJwks(
        Default::default(),
    ));
    assert_eq!(
        nack(&istio(vec![p])).field,
        "providers[origins-0].remote_jwks"
    );

    let p521 = json!({"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"});
    let p = provider(ISS, jwks(&[k.jwk("k1"), p521]));
    let e = nack(&istio(vec![p]));
    assert_eq!(e.field, "providers[origins-0].local_jwks.keys[1].crv");

    let small = json!({"kty": "RSA", "n": b64(&[0xff; 128]), "e": "AQAB"});
    let e = nack(&istio(vec![provider(ISS, jwks(&[small]))]));
    assert_eq!(e.field, "providers[origins-0].local_jwks.keys[0].n");
    assert!(e.reason.contains("1024-bit"), "{e}");

    let mut p = good.clone();
    p.clear_route_cache = true;
    assert_eq!(
        nack(&istio(vec![p])).field,
        "providers[origins-0].clear_route_cache"
    );

    let mut p = good.clone();
    p.claim_to_headers = vec![jwtv3::JwtClaimToHeader {
        header_name: "bad header".into(),
        claim_name: "sub".into(),
        ..Default::default()
    }];
    assert_eq!(
        nack(&istio(vec![p])).field,
        "providers[origins-0].claim_to_headers[0].header_name"
    );

    let e = nack(&one_rule(vec![good.clone()], name_req("origins-7")));
    assert_eq!(e.field, "rules[0].requires.provider_name");
    assert!(e.reason.contains("origins-7"), "{e}");

    let all = jwtv3::JwtRequirement {
        requires_type: Some(jwtv3::jwt_requirement::RequiresType::RequiresAll(
            jwtv3::JwtRequirementAndList {
                requirements: vec![name_req("origins-0")],
            },
        )),
    };
    assert_eq!(
        nack(&one_rule(vec![good.clone()], all)).field,
        "rules[0].requires.requires_all"
    );

    let mut c = istio(vec![good]);
    if let Some(m) = c.rules[0].r#match.as_mut() {
        m.headers = vec![Default::default()];
    }
    assert_eq!(nack(&c).field, "rules[0].match");
}

#[test]
fn the_pilots_placeholder_key_refuses_every_token() {
    // What the pilot sends until a jwksUri was fetched: a key nobody holds.
    let unusable = r#"{"keys":[{"kty":"RSA","alg":"RS256","use":"sig","kid":"mizzen-no-key","e":"AQAB","n":"npFCY7PwTK0-dUvD0LkgWFztuhyj1v2ljUdAtXvQWZ--nyvdHLpTacR9vrJc16VjD1q3MYQRA0SpNwqkW6Vy-y61tVSbADmZaSOwCGoztNPE0X6ya0_4c_QkYebj1zG0ACQ0DHrIlgx8T_6kuvRVZJk0-sq8uWydu98UMH5NeHdRHTCX8feMDyb0OtoIYhYg_agnostnz5iS1xC8tm904RFpFkRruX0s-qw_-PL9r7M5T3zX-INIT_CkBcSo5T3N2ErxkX7WKgTIOZpFViOdmrIcAphpDqrtsNiQvemwkh6VpjXJwMIDybW7M9g1FDJmDKl1keHKYSP_UQrD14FYHw"}]}"#;
    let f = compile(&istio(vec![provider(ISS, unusable.into())]));
    let k = rsa("a");
    let tok = k.sign("RS256", "mizzen-no-key", json!({"iss": ISS, "aud": "web"}));
    let rej = denied(f.on_request(
        &mut req("/", &[("authorization", &bearer(&tok))]),
        Downstream::default(),
        NOW,
    ));
    assert_eq!(rej.body, "Jwt verification fails");
}

/// A listener as the pilot sends it: HCM with jwt_authn before the router.
fn listener_with(
    jwt: &jwtv3::JwtAuthentication,
) -> envoy_types::pb::envoy::config::listener::v3::Listener {
    use envoy_types::pb::envoy::config::listener::v3 as lv3;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
    use envoy_types::pb::google::protobuf::Any;
    use prost::{Message, Name};
    let any = |type_url: String, value: Vec<u8>| Any { type_url, value };
    let filter = |name: &str, cfg: Option<Any>| hcm::HttpFilter {
        name: name.into(),
        config_type: cfg.map(hcm::http_filter::ConfigType::TypedConfig),
        ..Default::default()
    };
    let router = envoy_types::pb::envoy::extensions::filters::http::router::v3::Router::default();
    let h = hcm::HttpConnectionManager {
        stat_prefix: "inbound_0.0.0.0_8080".into(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                route_config_name: "8080".into(),
                ..Default::default()
            },
        )),
        http_filters: vec![
            filter(
                JWT_AUTHN,
                Some(any(
                    jwtv3::JwtAuthentication::type_url(),
                    jwt.encode_to_vec(),
                )),
            ),
            filter(
                "envoy.filters.http.router",
                Some(any(
                    envoy_types::pb::envoy::extensions::filters::http::router::v3::Router::type_url(
                    ),
                    router.encode_to_vec(),
                )),
            ),
        ],
        ..Default::default()
    };
    lv3::Listener {
        name: "0.0.0.0_8080".into(),
        address: Some(core::Address {
            address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                address: "0.0.0.0".into(),
                port_specifier: Some(core::socket_address::PortSpecifier::PortValue(8080)),
                ..Default::default()
            })),
        }),
        filter_chains: vec![lv3::FilterChain {
            filters: vec![lv3::Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(lv3::filter::ConfigType::TypedConfig(any(
                    hcm::HttpConnectionManager::type_url(),
                    h.encode_to_vec(),
                ))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn the_listener_carries_the_filter_and_a_bad_one_is_nacked_with_its_full_path() {
    use crate::config::{HttpFilter, Listener, NetworkFilter};
    let k = rsa("a");
    let good = istio(vec![provider(ISS, jwks(&[k.jwk("k1")]))]);
    let l = Listener::try_from(&listener_with(&good)).expect("listener converts");
    let chain = l.filter_chains.first().expect("one chain");
    let NetworkFilter::Http(h) = &chain.filter else {
        panic!("not an HCM: {:?}", chain.filter);
    };
    assert!(matches!(
        h.http_filters.first(),
        Some(HttpFilter::JwtAuthn(_))
    ));

    let mut p = provider(ISS, jwks(&[k.jwk("k1")]));
    p.jwks_source_specifier = Some(jwtv3::jwt_provider::JwksSourceSpecifier::RemoteJwks(
        Default::default(),
    ));
    let e = Listener::try_from(&listener_with(&istio(vec![p])))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("listener 0.0.0.0_8080"), "{e}");
    assert!(
        e.contains("http_filters[0].typed_config.providers[origins-0].remote_jwks"),
        "{e}"
    );
}

#[test]
fn the_realm_scheme_is_what_envoys_connection_manager_sets() {
    let k = rsa("a");
    let f = compile(&one_rule(
        vec![provider(ISS, jwks(&[k.jwk("k1")]))],
        name_req("origins-0"),
    ));
    let realm = |xfp: Option<&str>, conn: Downstream| {
        let mut b = Request::builder().uri("/p").header("host", "gw.test");
        if let Some(x) = xfp {
            b = b.header("x-forwarded-proto", x);
        }
        let mut r = b.body(()).expect("request");
        denied(f.on_request(&mut r, conn, NOW))
            .www_authenticate
            .and_then(|v| v.to_str().ok().map(str::to_string))
            .unwrap_or_default()
    };
    let tls = Downstream {
        tls: true,
        use_remote_address: false,
    };
    let edge = Downstream {
        tls: true,
        use_remote_address: true,
    };
    assert_eq!(realm(None, tls), "Bearer realm=\"https://gw.test/p\"");
    assert_eq!(
        realm(Some("http"), tls),
        "Bearer realm=\"http://gw.test/p\""
    );
    assert_eq!(
        realm(Some("http"), edge),
        "Bearer realm=\"https://gw.test/p\""
    );
    assert_eq!(
        realm(None, Downstream::default()),
        "Bearer realm=\"http://gw.test/p\""
    );
}
