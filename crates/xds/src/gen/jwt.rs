//! RequestAuthentication -> `envoy.filters.http.jwt_authn` on the sidecar's inbound HTTP
//! chains, as istiod builds it.
//!
//! - One provider per JWT rule of every RequestAuthentication applying to the proxy, named
//!   `origins-N` in config order; issuer, audiences, `fromHeaders` (with prefix),
//!   `fromParams`, `fromCookies`, `forwardOriginalToken`, `outputPayloadToHeader`,
//!   `outputClaimToHeaders`. The verified payload goes to dynamic metadata under the issuer's
//!   name, where the RBAC filter ([`super::rbac`]) reads request principals and claims.
//! - Keys are always inline: `jwks` as written, `jwksUri` as the pilot fetched it (Istio's
//!   default `PILOT_JWT_ENABLE_REMOTE_JWKS=false`). Until a fetch succeeded the provider gets
//!   a key nobody holds, so tokens of that issuer fail (401) instead of passing unchecked.
//! - The requirement is Istio's: any provider, or no token at all (`allow_missing`). A token
//!   that is present but invalid (bad signature, expired, wrong issuer or audience) gets
//!   Envoy's 401; a request without one passes, and only an AuthorizationPolicy requiring a
//!   request principal turns it away (403).
//!
//! `timeout` bounds the pilot's fetch (the proxy fetches nothing). Not implemented: nothing of
//! the current API (per-path trigger rules are gone from it).

use super::rbac::append_sorted_map;
use crate::any::pack;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as rv3;
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3 as jwtv3;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::google::protobuf::Any;
use mizzen_config::security::JwtRule;
use mizzen_model::{Proxy, PushContext};
use prost::Message;
use std::collections::BTreeMap;

pub const JWT_AUTHN: &str = "envoy.filters.http.jwt_authn";

/// A public key whose private half nobody has: stands in for a jwksUri that could not be
/// fetched yet (Envoy needs some key to load the provider).
pub const UNUSABLE_JWKS: &str = r#"{"keys":[{"kty":"RSA","alg":"RS256","use":"sig","kid":"mizzen-no-key","e":"AQAB","n":"npFCY7PwTK0-dUvD0LkgWFztuhyj1v2ljUdAtXvQWZ--nyvdHLpTacR9vrJc16VjD1q3MYQRA0SpNwqkW6Vy-y61tVSbADmZaSOwCGoztNPE0X6ya0_4c_QkYebj1zG0ACQ0DHrIlgx8T_6kuvRVZJk0-sq8uWydu98UMH5NeHdRHTCX8feMDyb0OtoIYhYg_agnostnz5iS1xC8tm904RFpFkRruX0s-qw_-PL9r7M5T3zX-INIT_CkBcSo5T3N2ErxkX7WKgTIOZpFViOdmrIcAphpDqrtsNiQvemwkh6VpjXJwMIDybW7M9g1FDJmDKl1keHKYSP_UQrD14FYHw"}]}"#;

/// Issuers whose tokens this proxy verifies (sorted, unique).
pub fn issuers(proxy: &Proxy, push: &PushContext) -> Vec<String> {
    let mut out: Vec<String> = push
        .jwt_rules_for(proxy)
        .into_iter()
        .map(|(_, j)| j.issuer.clone())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The jwt_authn filter for `proxy`, if any RequestAuthentication applies.
pub fn filter(proxy: &Proxy, push: &PushContext) -> Option<hcm::HttpFilter> {
    let rules = push.jwt_rules_for(proxy);
    if rules.is_empty() {
        return None;
    }
    let providers: BTreeMap<String, jwtv3::JwtProvider> = rules
        .iter()
        .enumerate()
        .map(|(i, (_, j))| (format!("origins-{i}"), provider(j, push)))
        .collect();
    let mut any: Vec<jwtv3::JwtRequirement> = providers
        .keys()
        .map(|name| jwtv3::JwtRequirement {
            requires_type: Some(jwtv3::jwt_requirement::RequiresType::ProviderName(
                name.clone(),
            )),
        })
        .collect();
    any.push(jwtv3::JwtRequirement {
        requires_type: Some(jwtv3::jwt_requirement::RequiresType::AllowMissing(
            envoy_types::pb::google::protobuf::Empty {},
        )),
    });
    let head = jwtv3::JwtAuthentication {
        rules: vec![jwtv3::RequirementRule {
            r#match: Some(rv3::RouteMatch {
                path_specifier: Some(rv3::route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            requirement_type: Some(jwtv3::requirement_rule::RequirementType::Requires(
                jwtv3::JwtRequirement {
                    requires_type: Some(jwtv3::jwt_requirement::RequiresType::RequiresAny(
                        jwtv3::JwtRequirementOrList { requirements: any },
                    )),
                },
            )),
        }],
        bypass_cors_preflight: true,
        ..Default::default()
    };
    // `providers` (field 1) is a map: appended in key order so the bytes are stable.
    let mut value = head.encode_to_vec();
    append_sorted_map(&mut value, 1, &providers);
    Some(hcm::HttpFilter {
        name: JWT_AUTHN.into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(Any {
            type_url: pack(&head).type_url,
            value,
        })),
        ..Default::default()
    })
}

fn provider(j: &JwtRule, push: &PushContext) -> jwtv3::JwtProvider {
    let jwks = match (&j.jwks, &j.jwks_uri) {
        (Some(inline), _) if !inline.is_empty() => inline.clone(),
        (_, Some(uri)) => push.jwks(uri).unwrap_or(UNUSABLE_JWKS).to_string(),
        _ => UNUSABLE_JWKS.to_string(),
    };
    jwtv3::JwtProvider {
        issuer: j.issuer.clone(),
        audiences: j.audiences.clone(),
        forward: j.forward_original_token,
        from_headers: j
            .from_headers
            .iter()
            .map(|h| jwtv3::JwtHeader {
                name: h.name.clone(),
                value_prefix: h.prefix.clone().unwrap_or_default(),
            })
            .collect(),
        from_params: j.from_params.clone(),
        from_cookies: j.from_cookies.clone(),
        forward_payload_header: j.output_payload_to_header.clone().unwrap_or_default(),
        claim_to_headers: j
            .output_claim_to_headers
            .iter()
            .map(|c| jwtv3::JwtClaimToHeader {
                header_name: c.header.clone(),
                claim_name: c.claim.clone(),
                ..Default::default()
            })
            .collect(),
        payload_in_metadata: j.issuer.clone(),
        jwks_source_specifier: Some(jwtv3::jwt_provider::JwksSourceSpecifier::LocalJwks(
            core::DataSource {
                specifier: Some(core::data_source::Specifier::InlineString(jwks)),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}
