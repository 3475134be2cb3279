//! What the pilot says about AuthorizationPolicy / RequestAuthentication: warnings for what it
//! does not enforce (CUSTOM policies, `experimental.*` conditions) at every push, and
//! `/debug/authorizationz` (policies in force, unsupported parts, JWKS fetch state).

use mizzen_config::security::AuthzAction;
use mizzen_model::PushContext;
use std::collections::BTreeMap;
use tracing::warn;

/// One line per policy part that is accepted but not enforced.
pub fn unsupported(push: &PushContext) -> Vec<String> {
    let mut out = Vec::new();
    for p in &push.authz.authorization {
        let id = format!("AuthorizationPolicy {}/{}", p.meta.namespace, p.meta.name);
        if p.spec.action == AuthzAction::Custom {
            let provider = p
                .spec
                .provider
                .as_ref()
                .map(|x| x.name.as_str())
                .unwrap_or("");
            out.push(format!(
                "{id}: action CUSTOM (provider {provider:?}) needs ext_authz, which is not implemented: the policy is NOT enforced"
            ));
        }
        for (i, r) in p.spec.rules.iter().enumerate() {
            for (j, w) in r.when.iter().enumerate() {
                if w.key.starts_with("experimental.") {
                    out.push(format!(
                        "{id}: rules[{i}].when[{j}].key {} is not supported: an ALLOW rule with it never matches, a DENY rule ignores it",
                        w.key
                    ));
                }
            }
        }
        let targeted = p.spec.target_ref.is_some() || !p.spec.target_refs.is_empty();
        if targeted {
            out.push(format!(
                "{id}: targetRef(s) bind to waypoints/gateways, not sidecars: not applied to any sidecar"
            ));
        }
    }
    for uri in push.authz.jwks_uris() {
        match push.authz.jwks.get(&uri) {
            Some(e) if e.keys.is_some() => {}
            Some(e) => out.push(format!(
                "jwksUri {uri}: no keys yet ({}): tokens of this issuer are refused",
                e.error.as_deref().unwrap_or("not fetched")
            )),
            None => out.push(format!(
                "jwksUri {uri}: not fetched yet: tokens of this issuer are refused"
            )),
        }
    }
    out
}

/// Log [`unsupported`] (once per push, like the other config warnings).
pub fn report(push: &PushContext) {
    for what in unsupported(push) {
        warn!(%what, "security policy not (fully) enforced");
    }
}

/// `/debug/authorizationz`; `jwks` is the resolver's live state (fetch errors included).
pub fn debug_json(
    push: &PushContext,
    jwks: &BTreeMap<String, mizzen_model::authz::JwksEntry>,
) -> serde_json::Value {
    let policies: Vec<serde_json::Value> = push
        .authz
        .authorization
        .iter()
        .map(|p| {
            serde_json::json!({
                "namespace": p.meta.namespace,
                "name": p.meta.name,
                "action": p.spec.action,
                "dry_run": p.meta.annotations.get("istio.io/dry-run"),
                "enforced": p.spec.action != AuthzAction::Custom,
                "rules": p.spec.rules.len(),
            })
        })
        .collect();
    let request_authn: Vec<serde_json::Value> = push
        .authz
        .request_authn
        .iter()
        .map(|r| {
            serde_json::json!({
                "namespace": r.meta.namespace,
                "name": r.meta.name,
                "issuers": r.spec.jwt_rules.iter().map(|j| j.issuer.clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let jwks: serde_json::Map<String, serde_json::Value> = jwks
        .iter()
        .map(|(uri, e)| {
            (
                uri.clone(),
                serde_json::json!({"has_keys": e.keys.is_some(), "keys": e.keys, "error": e.error}),
            )
        })
        .collect();
    serde_json::json!({
        "version": push.version,
        "authorization_policies": policies,
        "request_authentications": request_authn,
        "jwks": jwks,
        "unsupported": unsupported(push),
    })
}
