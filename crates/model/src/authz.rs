//! AuthorizationPolicy and RequestAuthentication as the generators need them: which policies
//! apply to a proxy (Istio's scoping), and the JWKS the pilot fetched for `jwksUri`s.
//!
//! Scoping, as Istio's: a policy in the root namespace without a selector applies to every
//! workload of the mesh; one in the root namespace with a selector to matching workloads in
//! every namespace; one elsewhere to its own namespace (all of it without a selector, matching
//! workloads with one). Policies using `targetRef(s)` bind to Services/Gateways through a
//! waypoint or gateway in Istio, never to sidecars, so sidecars skip them.
//!
//! Not implemented: CUSTOM (ext_authz) policies are collected apart so the pilot can report
//! them; they are never enforced.

use crate::proxy::Proxy;
use crate::push::{ConfigEntry, PushContext};
use crate::service::selector_matches;
use mizzen_config::security::{
    AuthorizationPolicy, AuthzAction, JwtRule, LabelSelector, RequestAuthentication,
};
use mizzen_config::{Resource, Spec};
use std::collections::BTreeMap;

/// The JWKS of one `jwksUri` as last fetched by the pilot. `keys` is the last good document;
/// `error` the last failure (kept beside the keys: a failed refresh never drops good keys).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JwksEntry {
    pub keys: Option<String>,
    pub error: Option<String>,
}

/// Every AuthorizationPolicy and RequestAuthentication in force, in config order.
#[derive(Clone, Debug, Default)]
pub struct AuthzPolicies {
    pub authorization: Vec<ConfigEntry<AuthorizationPolicy>>,
    pub request_authn: Vec<ConfigEntry<RequestAuthentication>>,
    /// jwksUri -> fetched keys (set by the pilot; empty in tests and without jwksUris).
    pub jwks: BTreeMap<String, JwksEntry>,
}

impl AuthzPolicies {
    pub fn index(resources: &[Resource]) -> AuthzPolicies {
        let mut out = AuthzPolicies::default();
        for r in resources {
            match &r.spec {
                Spec::AuthorizationPolicy(ap) => out.authorization.push(ConfigEntry {
                    meta: r.meta.clone(),
                    spec: ap.clone(),
                }),
                Spec::RequestAuthentication(ra) => out.request_authn.push(ConfigEntry {
                    meta: r.meta.clone(),
                    spec: ra.clone(),
                }),
                _ => {}
            }
        }
        out
    }

    /// `jwtRule.timeout` per `jwksUri` (the shortest when several rules share a URI).
    pub fn jwks_timeouts(&self) -> BTreeMap<String, std::time::Duration> {
        let mut out: BTreeMap<String, std::time::Duration> = BTreeMap::new();
        for j in self
            .request_authn
            .iter()
            .flat_map(|r| r.spec.jwt_rules.iter())
        {
            if let (Some(uri), Some(t)) = (&j.jwks_uri, &j.timeout) {
                let t = t.as_std();
                out.entry(uri.clone())
                    .and_modify(|cur| *cur = (*cur).min(t))
                    .or_insert(t);
            }
        }
        out
    }

    /// Every `jwksUri` of every RequestAuthentication without inline `jwks` (sorted, unique).
    pub fn jwks_uris(&self) -> Vec<String> {
        let mut uris: Vec<String> = self
            .request_authn
            .iter()
            .flat_map(|r| r.spec.jwt_rules.iter())
            .filter(|j| j.jwks.as_deref().is_none_or(str::is_empty))
            .filter_map(|j| j.jwks_uri.clone())
            .filter(|u| !u.is_empty())
            .collect();
        uris.sort();
        uris.dedup();
        uris
    }
}

/// The AuthorizationPolicies that apply to one proxy, by action (config order within each).
#[derive(Clone, Debug, Default)]
pub struct ProxyAuthz<'a> {
    pub deny: Vec<&'a ConfigEntry<AuthorizationPolicy>>,
    pub allow: Vec<&'a ConfigEntry<AuthorizationPolicy>>,
    pub audit: Vec<&'a ConfigEntry<AuthorizationPolicy>>,
    /// CUSTOM policies: reported, not enforced.
    pub custom: Vec<&'a ConfigEntry<AuthorizationPolicy>>,
}

impl ProxyAuthz<'_> {
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty() && self.audit.is_empty()
    }
}

/// Does a policy in `policy_ns` with this selector apply to `proxy`?
fn applies(
    root_ns: &str,
    policy_ns: &str,
    selector: &Option<LabelSelector>,
    has_target_ref: bool,
    proxy: &Proxy,
) -> bool {
    if has_target_ref {
        return false;
    }
    if policy_ns != root_ns && policy_ns != proxy.namespace {
        return false;
    }
    match selector {
        Some(sel) if !sel.match_labels.is_empty() => {
            selector_matches(&sel.match_labels, proxy.effective_labels())
        }
        _ => true,
    }
}

impl PushContext {
    /// The AuthorizationPolicies that apply to `proxy`, split by action.
    pub fn authorization_policies_for(&self, proxy: &Proxy) -> ProxyAuthz<'_> {
        let mut out = ProxyAuthz::default();
        for p in &self.authz.authorization {
            let targeted = p.spec.target_ref.is_some() || !p.spec.target_refs.is_empty();
            if !applies(
                &self.mesh.root_namespace,
                &p.meta.namespace,
                &p.spec.selector,
                targeted,
                proxy,
            ) {
                continue;
            }
            match p.spec.action {
                AuthzAction::Allow => out.allow.push(p),
                AuthzAction::Deny => out.deny.push(p),
                AuthzAction::Audit => out.audit.push(p),
                AuthzAction::Custom => out.custom.push(p),
            }
        }
        out
    }

    /// The JWT rules of every RequestAuthentication that applies to `proxy` (Istio merges
    /// them all into one jwt_authn filter), with the policy each came from.
    pub fn jwt_rules_for(
        &self,
        proxy: &Proxy,
    ) -> Vec<(&ConfigEntry<RequestAuthentication>, &JwtRule)> {
        self.authz
            .request_authn
            .iter()
            .filter(|r| {
                let targeted = r.spec.target_ref.is_some() || !r.spec.target_refs.is_empty();
                applies(
                    &self.mesh.root_namespace,
                    &r.meta.namespace,
                    &r.spec.selector,
                    targeted,
                    proxy,
                )
            })
            .flat_map(|r| r.spec.jwt_rules.iter().map(move |j| (r, j)))
            .collect()
    }

    /// The keys the pilot fetched for `uri`, if any fetch ever succeeded.
    pub fn jwks(&self, uri: &str) -> Option<&str> {
        self.authz.jwks.get(uri).and_then(|e| e.keys.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::push::MeshSettings;
    use crate::registry::RegistrySnapshot;
    use std::sync::Arc;

    fn push(yaml: &str) -> PushContext {
        let fl = mizzen_config::load::load_str(std::path::Path::new("t.yaml"), yaml);
        assert!(
            fl.errors().next().is_none(),
            "{:?}",
            fl.errors().collect::<Vec<_>>()
        );
        PushContext::build(
            "1".into(),
            MeshSettings::default(),
            Arc::new(fl.resources),
            RegistrySnapshot::default(),
        )
    }

    fn proxy(ns: &str, app: &str) -> Proxy {
        let md = serde_json::json!({"NAMESPACE": ns, "LABELS": {"app": app}});
        Proxy::from_node(
            &format!("sidecar~10.0.0.1~p.{ns}~{ns}.svc.cluster.local"),
            &md,
        )
        .expect("node id")
    }

    #[test]
    fn scoping_follows_istio() {
        let p = push(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-wide, namespace: istio-system}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: root-selected, namespace: istio-system}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ns-wide, namespace: foo}
spec:
  action: AUDIT
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: selected, namespace: foo}
spec:
  selector: {matchLabels: {app: web}}
  action: CUSTOM
  provider: {name: ext}
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: targeted, namespace: foo}
spec:
  targetRefs: [{kind: Service, name: web}]
  action: DENY
  rules: [{}]
"#,
        );
        let names = |v: &Vec<&ConfigEntry<AuthorizationPolicy>>| -> Vec<String> {
            v.iter().map(|p| p.meta.name.clone()).collect()
        };
        let web_foo = p.authorization_policies_for(&proxy("foo", "web"));
        assert_eq!(names(&web_foo.allow), ["mesh-wide"]);
        assert_eq!(names(&web_foo.deny), ["root-selected"]);
        assert_eq!(names(&web_foo.audit), ["ns-wide"]);
        assert_eq!(names(&web_foo.custom), ["selected"]);
        let db_foo = p.authorization_policies_for(&proxy("foo", "db"));
        assert!(db_foo.deny.is_empty() && db_foo.custom.is_empty());
        assert_eq!(names(&db_foo.audit), ["ns-wide"]);
        let web_bar = p.authorization_policies_for(&proxy("bar", "web"));
        assert_eq!(names(&web_bar.deny), ["root-selected"]);
        assert!(web_bar.audit.is_empty());
    }

    #[test]
    fn jwt_rules_and_uris() {
        let p = push(
            r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: a, namespace: foo}
spec:
  selector: {matchLabels: {app: web}}
  jwtRules:
  - issuer: https://issuer.example
    jwksUri: http://127.0.0.1:9/jwks
  - issuer: inline
    jwks: '{"keys": []}'
  - issuer: again
    jwksUri: http://127.0.0.1:9/jwks
    timeout: 2s
"#,
        );
        assert_eq!(p.jwt_rules_for(&proxy("foo", "web")).len(), 3);
        assert!(p.jwt_rules_for(&proxy("foo", "db")).is_empty());
        assert_eq!(p.authz.jwks_uris(), ["http://127.0.0.1:9/jwks"]);
        assert_eq!(
            p.authz.jwks_timeouts().get("http://127.0.0.1:9/jwks"),
            Some(&std::time::Duration::from_secs(2))
        );
    }
}
