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

#[cfg(test)]
mod tests {
    use super::*;
    use mizzen_model::MeshSettings;
    use std::sync::Arc;

    #[test]
    fn custom_experimental_targeted_and_keyless_issuers_are_reported() {
        let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: foo}
spec:
  action: CUSTOM
  provider: {name: opa}
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: exp, namespace: foo}
spec:
  rules:
  - when:
    - key: experimental.envoy.filters.network.mysql_proxy[db.table]
      values: ["[update]"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint, namespace: foo}
spec:
  targetRefs: [{kind: Service, name: web}]
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: fine, namespace: foo}
spec:
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: foo}
spec:
  jwtRules: [{issuer: x, jwksUri: "http://127.0.0.1:1/keys"}]
"#;
        let fl = mizzen_config::load::load_str(std::path::Path::new("t.yaml"), yaml);
        let errs: Vec<_> = fl.errors().collect();
        assert!(errs.is_empty(), "{errs:?}");
        let push = PushContext::build(
            "1".into(),
            MeshSettings::default(),
            Arc::new(fl.resources),
            Default::default(),
        );
        let u = unsupported(&push);
        assert_eq!(u.len(), 4, "{u:#?}");
        assert!(u[0].contains("foo/ext") && u[0].contains("opa") && u[0].contains("NOT enforced"));
        assert!(u[1].contains("foo/exp") && u[1].contains("rules[0].when[0].key"));
        assert!(u[2].contains("foo/waypoint") && u[2].contains("targetRef"));
        assert!(u[3].contains("http://127.0.0.1:1/keys") && u[3].contains("refused"));
        let dbg = debug_json(&push, &BTreeMap::new());
        assert_eq!(
            dbg["authorization_policies"].as_array().map(Vec::len),
            Some(4)
        );
        assert_eq!(dbg["unsupported"].as_array().map(Vec::len), Some(4));
    }
}
