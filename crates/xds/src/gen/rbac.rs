//! AuthorizationPolicy -> Envoy RBAC filters on the sidecar's inbound side and on gateways,
//! as istiod's `pilot/pkg/security/authz` builds them.
//!
//! - HTTP chains get `envoy.filters.http.rbac` (after jwt_authn, see [`super::jwt`]); TCP
//!   chains get `envoy.filters.network.rbac` before tcp_proxy. One filter per action, in
//!   Istio's order: AUDIT (Envoy action LOG: nothing is blocked, matches set the
//!   `envoy.common` `access_log_hint` metadata and count `rbac.logged`), DENY, then ALLOW.
//!   Envoy runs them in sequence, so DENY wins over ALLOW; with any ALLOW policy applying, a
//!   request no ALLOW rule matches is denied (an ALLOW policy without rules allows nothing);
//!   no policy means no filter, so everything is allowed.
//! - Each rule is one Envoy policy named `ns[NS]-policy[NAME]-rule[I]`: `from` sources and the
//!   source-side `when` conditions become principals, `to` operations and the
//!   destination-side conditions permissions.
//! - Policies annotated `istio.io/dry-run: "true"` go to `shadow_rules` (stats prefix
//!   `istio_dry_run_allow_` / `istio_dry_run_deny_`): evaluated and counted, never enforced.
//! - TCP chains and HTTP-only attributes (hosts, methods, paths, requestPrincipals,
//!   `request.*` conditions): an ALLOW rule using one is dropped (it can never match), a
//!   DENY/AUDIT rule loses those attributes (it denies more, never less), as Istio does.
//! - Request principals and `request.auth.*` come from jwt_authn's verified payload, which
//!   [`super::jwt`] writes into dynamic metadata under the issuer's name. A request principal
//!   `ISS/SUB` is matched per issuer this proxy accepts (an issuer with no RequestAuthentication
//!   can never produce a verified token).
//!
//! Not implemented: CUSTOM (ext_authz) policies (reported by the pilot, never enforced; see
//! `ProxyAuthz::custom`), and `experimental.envoy.filters.*` conditions (treated like an
//! HTTP-only attribute on a TCP chain: the ALLOW rule is dropped, the DENY rule ignores it).

use crate::any::pack;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3 as lv3;
use envoy_types::pb::envoy::config::rbac::v3::{
    self as rbacv3, permission, principal, Permission, Policy, Principal,
};
use envoy_types::pb::envoy::config::route::v3::{header_matcher, HeaderMatcher};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use mizzen_config::security::{AuthorizationPolicy, Condition, Operation, Rule, Source};
use mizzen_model::authz::ProxyAuthz;
use mizzen_model::push::ConfigEntry;
use mizzen_model::{Proxy, PushContext};
use prost::Message;
use std::collections::BTreeMap;

pub const HTTP_RBAC: &str = "envoy.filters.http.rbac";
pub const NETWORK_RBAC: &str = "envoy.filters.network.rbac";
/// Where jwt_authn leaves verified payloads (keyed by issuer).
pub const JWT_METADATA: &str = "envoy.filters.http.jwt_authn";
const DRY_RUN: &str = "istio.io/dry-run";

/// The inbound HTTP filters for `proxy`: jwt_authn (if a RequestAuthentication applies), then
/// the RBAC filters; empty when no policy applies. They go before the router.
pub fn inbound_http_filters(proxy: &Proxy, push: &PushContext) -> Vec<hcm::HttpFilter> {
    let mut out = Vec::new();
    if let Some(jwt) = super::jwt::filter(proxy, push) {
        out.push(jwt);
    }
    let issuers = super::jwt::issuers(proxy, push);
    let policies = push.authorization_policies_for(proxy);
    for rbac in build(&policies, &Ctx::new(push, &issuers, false)) {
        out.push(hcm::HttpFilter {
            name: HTTP_RBAC.into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(rbac.http())),
            ..Default::default()
        });
    }
    out
}

/// The inbound network filters for `proxy`'s TCP chains (before tcp_proxy); empty when no
/// policy applies.
pub fn inbound_network_filters(proxy: &Proxy, push: &PushContext) -> Vec<lv3::Filter> {
    let policies = push.authorization_policies_for(proxy);
    build(&policies, &Ctx::new(push, &[], true))
        .into_iter()
        .map(|rbac| lv3::Filter {
            name: NETWORK_RBAC.into(),
            config_type: Some(lv3::filter::ConfigType::TypedConfig(rbac.network())),
        })
        .collect()
}

/// Put the authorization filters into every chain of a listener where traffic enters the
/// workload: the sidecar's `virtualInbound` (plain, TLS and passthrough chains alike) and
/// every gateway listener. HTTP filters go before the router, network ones before tcp_proxy.
/// Without applicable policies the listener is returned untouched.
pub fn with_inbound_authz(
    mut l: lv3::Listener,
    proxy: &Proxy,
    push: &PushContext,
) -> lv3::Listener {
    let http = inbound_http_filters(proxy, push);
    let tcp = inbound_network_filters(proxy, push);
    if http.is_empty() && tcp.is_empty() {
        return l;
    }
    let chains = l
        .filter_chains
        .iter_mut()
        .chain(l.default_filter_chain.as_mut());
    for chain in chains {
        insert_into_chain(chain, &http, &tcp);
    }
    l
}

fn insert_into_chain(chain: &mut lv3::FilterChain, http: &[hcm::HttpFilter], tcp: &[lv3::Filter]) {
    const HCM: &str = "envoy.filters.network.http_connection_manager";
    const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
    const ROUTER: &str = "envoy.filters.http.router";
    for i in 0..chain.filters.len() {
        let name = chain.filters[i].name.clone();
        if name == TCP_PROXY && !tcp.is_empty() {
            for (k, f) in tcp.iter().enumerate() {
                chain.filters.insert(i + k, f.clone());
            }
            return;
        }
        if name == HCM && !http.is_empty() {
            let Some(lv3::filter::ConfigType::TypedConfig(any)) = &chain.filters[i].config_type
            else {
                return;
            };
            // Decoded and re-encoded: stable bytes as long as the inbound HCM holds no protobuf
            // map with two or more entries (it holds none today; see `append_sorted_map`).
            let Ok(mut h) = hcm::HttpConnectionManager::decode(any.value.as_slice()) else {
                return;
            };
            let at = h
                .http_filters
                .iter()
                .position(|f| f.name == ROUTER)
                .unwrap_or(h.http_filters.len());
            for (k, f) in http.iter().enumerate() {
                h.http_filters.insert(at + k, f.clone());
            }
            chain.filters[i].config_type = Some(lv3::filter::ConfigType::TypedConfig(pack(&h)));
            return;
        }
    }
}

/// What a rule is translated against.
pub(crate) struct Ctx<'a> {
    trust_domain: &'a str,
    /// Issuers of the RequestAuthentications applying to the proxy.
    issuers: &'a [String],
    tcp: bool,
}

impl<'a> Ctx<'a> {
    pub(crate) fn new(push: &'a PushContext, issuers: &'a [String], tcp: bool) -> Ctx<'a> {
        Ctx {
            trust_domain: &push.mesh.trust_domain,
            issuers,
            tcp,
        }
    }
}

/// One RBAC filter: its action, enforced policies (`None`: nothing enforced) and dry-run ones.
pub(crate) struct Filter {
    action: rbacv3::rbac::Action,
    rules: Option<BTreeMap<String, Policy>>,
    shadow: Option<BTreeMap<String, Policy>>,
}

pub(crate) fn build(policies: &ProxyAuthz<'_>, ctx: &Ctx<'_>) -> Vec<Filter> {
    use rbacv3::rbac::Action;
    let mut out = Vec::new();
    for (action, list) in [
        (Action::Log, &policies.audit),
        (Action::Deny, &policies.deny),
        (Action::Allow, &policies.allow),
    ] {
        if list.is_empty() {
            continue;
        }
        let (mut enforced, mut shadow) = (None::<BTreeMap<_, _>>, None::<BTreeMap<_, _>>);
        for p in list {
            let target = if dry_run(p) {
                &mut shadow
            } else {
                &mut enforced
            };
            // A policy that applies always creates the map: an ALLOW policy whose rules all
            // drop out still allows nothing.
            let map = target.get_or_insert_with(BTreeMap::new);
            for (i, rule) in p.spec.rules.iter().enumerate() {
                if let Some(policy) = rule_policy(rule, &p.meta.namespace, action, ctx) {
                    map.insert(policy_name(p, i), policy);
                }
            }
        }
        out.push(Filter {
            action,
            rules: enforced,
            shadow,
        });
    }
    out
}

fn dry_run(p: &ConfigEntry<AuthorizationPolicy>) -> bool {
    p.meta
        .annotations
        .get(DRY_RUN)
        .is_some_and(|v| matches!(v.as_str(), "1" | "t" | "T" | "TRUE" | "true" | "True"))
}

pub(crate) fn policy_name(p: &ConfigEntry<AuthorizationPolicy>, rule: usize) -> String {
    format!(
        "ns[{}]-policy[{}]-rule[{rule}]",
        p.meta.namespace, p.meta.name
    )
}

impl Filter {
    fn rbac(&self, policies: &Option<BTreeMap<String, Policy>>) -> Option<Vec<u8>> {
        policies.as_ref().map(|p| {
            let head = rbacv3::Rbac {
                action: self.action as i32,
                ..Default::default()
            };
            let mut buf = head.encode_to_vec();
            append_sorted_map(&mut buf, 2, p);
            buf
        })
    }

    fn shadow_prefix(&self) -> String {
        match self.action {
            rbacv3::rbac::Action::Allow => "istio_dry_run_allow_".into(),
            rbacv3::rbac::Action::Deny => "istio_dry_run_deny_".into(),
            rbacv3::rbac::Action::Log => String::new(),
        }
    }

    /// `envoy.extensions.filters.http.rbac.v3.RBAC` (rules = 1, shadow_rules = 2).
    pub(crate) fn http(&self) -> Any {
        let audit = self.action == rbacv3::rbac::Action::Log;
        let head = HttpRbac {
            // AUDIT (LOG) never blocks, so its allowed/denied counters say nothing: per-rule
            // counters under its own prefix show which audit rules matched.
            rules_stat_prefix: if audit {
                "istio_audit_".into()
            } else {
                String::new()
            },
            track_per_rule_stats: audit,
            shadow_rules_stat_prefix: self
                .shadow
                .as_ref()
                .map(|_| self.shadow_prefix())
                .unwrap_or_default(),
            ..Default::default()
        };
        let mut buf = head.encode_to_vec();
        if let Some(r) = self.rbac(&self.rules) {
            append_bytes_field(&mut buf, 1, &r);
        }
        if let Some(s) = self.rbac(&self.shadow) {
            append_bytes_field(&mut buf, 2, &s);
        }
        Any {
            type_url: pack(&head).type_url,
            value: buf,
        }
    }

    /// `envoy.extensions.filters.network.rbac.v3.RBAC` (rules = 1, shadow_rules = 2).
    pub(crate) fn network(&self) -> Any {
        let head = NetworkRbac {
            stat_prefix: "tcp.".into(),
            shadow_rules_stat_prefix: self
                .shadow
                .as_ref()
                .map(|_| self.shadow_prefix())
                .unwrap_or_default(),
            ..Default::default()
        };
        let mut buf = head.encode_to_vec();
        if let Some(r) = self.rbac(&self.rules) {
            append_bytes_field(&mut buf, 1, &r);
        }
        if let Some(s) = self.rbac(&self.shadow) {
            append_bytes_field(&mut buf, 2, &s);
        }
        Any {
            type_url: pack(&head).type_url,
            value: buf,
        }
    }
}

// ------------------------------------------------------------------ deterministic encoding

/// Protobuf maps are `HashMap`s in the generated types, whose iteration order (and so the
/// encoded bytes) changes from one value to the next. The server hashes resources to decide
/// what to resend, so map fields are appended by hand in key order: a map entry is a
/// length-delimited field holding `key = 1`, `value = 2`.
pub(crate) fn append_sorted_map<V: Message>(
    buf: &mut Vec<u8>,
    tag: u32,
    map: &BTreeMap<String, V>,
) {
    for (k, v) in map {
        let mut entry = Vec::new();
        prost::encoding::string::encode(1, k, &mut entry);
        prost::encoding::message::encode(2, v, &mut entry);
        append_bytes_field(buf, tag, &entry);
    }
}

fn append_bytes_field(buf: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, buf);
    prost::encoding::encode_varint(bytes.len() as u64, buf);
    buf.extend_from_slice(bytes);
}

// ------------------------------------------------------------------ rules

/// Does the rule use attributes only an HTTP request has?
fn http_only(rule: &Rule) -> bool {
    rule.from.iter().any(|f| {
        !f.source.request_principals.is_empty() || !f.source.not_request_principals.is_empty()
    }) || rule.to.iter().any(|t| {
        let o = &t.operation;
        !(o.hosts.is_empty()
            && o.not_hosts.is_empty()
            && o.methods.is_empty()
            && o.not_methods.is_empty()
            && o.paths.is_empty()
            && o.not_paths.is_empty())
    }) || rule.when.iter().any(|c| c.key.starts_with("request."))
}

/// The rule without its HTTP-only attributes (what a DENY rule keeps on a TCP chain).
fn strip_http(rule: &Rule) -> Rule {
    let mut r = rule.clone();
    for f in &mut r.from {
        f.source.request_principals.clear();
        f.source.not_request_principals.clear();
    }
    for t in &mut r.to {
        let o = &mut t.operation;
        o.hosts.clear();
        o.not_hosts.clear();
        o.methods.clear();
        o.not_methods.clear();
        o.paths.clear();
        o.not_paths.clear();
    }
    r.when.retain(|c| !c.key.starts_with("request."));
    r
}

/// One rule as an Envoy policy; `None` when an ALLOW rule cannot be evaluated here (it would
/// never match, so leaving it out is the same).
fn rule_policy(
    rule: &Rule,
    ns: &str,
    action: rbacv3::rbac::Action,
    ctx: &Ctx<'_>,
) -> Option<Policy> {
    let allow = action == rbacv3::rbac::Action::Allow;
    let stripped;
    let rule = if ctx.tcp && http_only(rule) {
        if allow {
            return None;
        }
        stripped = strip_http(rule);
        &stripped
    } else {
        rule
    };
    let mut principals: Vec<Principal> = Vec::new();
    let mut permissions: Vec<Permission> = Vec::new();
    if !rule.from.is_empty() {
        principals.push(or_ids(
            rule.from
                .iter()
                .map(|f| source(&f.source, ns, ctx))
                .collect(),
        ));
    }
    if !rule.to.is_empty() {
        permissions.push(or_rules(
            rule.to.iter().map(|t| operation(&t.operation)).collect(),
        ));
    }
    for c in &rule.when {
        match condition(c, ns, ctx) {
            Some(Cond::Principal(p)) => principals.push(p),
            Some(Cond::Permission(p)) => permissions.push(p),
            None if allow => return None,
            // DENY/AUDIT: an attribute we cannot evaluate widens the rule, never narrows it.
            None => {}
        }
    }
    Some(Policy {
        permissions: vec![and_rules(permissions)],
        principals: vec![and_ids(principals)],
        ..Default::default()
    })
}

fn any_principal() -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Any(true)),
    }
}

fn any_permission() -> Permission {
    Permission {
        rule: Some(permission::Rule::Any(true)),
    }
}

/// AND of principals; the empty AND is "any", one element stands for itself.
fn and_ids(mut ids: Vec<Principal>) -> Principal {
    match ids.len() {
        0 => any_principal(),
        1 => ids.remove(0),
        _ => Principal {
            identifier: Some(principal::Identifier::AndIds(principal::Set { ids })),
        },
    }
}

fn or_ids(mut ids: Vec<Principal>) -> Principal {
    if ids.len() == 1 {
        return ids.remove(0);
    }
    Principal {
        identifier: Some(principal::Identifier::OrIds(principal::Set { ids })),
    }
}

fn not_id(p: Principal) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::NotId(Box::new(p))),
    }
}

fn and_rules(mut rules: Vec<Permission>) -> Permission {
    match rules.len() {
        0 => any_permission(),
        1 => rules.remove(0),
        _ => Permission {
            rule: Some(permission::Rule::AndRules(permission::Set { rules })),
        },
    }
}

fn or_rules(mut rules: Vec<Permission>) -> Permission {
    if rules.len() == 1 {
        return rules.remove(0);
    }
    Permission {
        rule: Some(permission::Rule::OrRules(permission::Set { rules })),
    }
}

fn not_rule(p: Permission) -> Permission {
    Permission {
        rule: Some(permission::Rule::NotRule(Box::new(p))),
    }
}

/// `values` ORed, `not_values` ORed and negated, both ANDed into `out` (empty lists add
/// nothing).
fn ids_field(
    out: &mut Vec<Principal>,
    values: &[String],
    not_values: &[String],
    f: &dyn Fn(&str) -> Principal,
) {
    if !values.is_empty() {
        out.push(or_ids(values.iter().map(|v| f(v)).collect()));
    }
    if !not_values.is_empty() {
        out.push(not_id(or_ids(not_values.iter().map(|v| f(v)).collect())));
    }
}

fn rules_field(
    out: &mut Vec<Permission>,
    values: &[String],
    not_values: &[String],
    f: &dyn Fn(&str) -> Permission,
) {
    if !values.is_empty() {
        out.push(or_rules(values.iter().map(|v| f(v)).collect()));
    }
    if !not_values.is_empty() {
        out.push(not_rule(or_rules(
            not_values.iter().map(|v| f(v)).collect(),
        )));
    }
}

fn source(s: &Source, ns: &str, ctx: &Ctx<'_>) -> Principal {
    let mut and = Vec::new();
    ids_field(&mut and, &s.principals, &s.not_principals, &|v| {
        authenticated(spiffe_match(v))
    });
    ids_field(
        &mut and,
        &s.request_principals,
        &s.not_request_principals,
        &|v| request_principal(v, ctx.issuers),
    );
    ids_field(
        &mut and,
        &s.namespaces,
        &s.not_namespaces,
        &namespace_principal,
    );
    ids_field(&mut and, &s.ip_blocks, &s.not_ip_blocks, &|v| {
        cidr_principal(v, false)
    });
    ids_field(
        &mut and,
        &s.remote_ip_blocks,
        &s.not_remote_ip_blocks,
        &|v| cidr_principal(v, true),
    );
    ids_field(
        &mut and,
        &s.service_accounts,
        &s.not_service_accounts,
        &|v| service_account(v, ns, ctx.trust_domain),
    );
    ids_field(&mut and, &s.trust_domains, &s.not_trust_domains, &|v| {
        authenticated(string_match_prefix(&format!("spiffe://{v}/")))
    });
    and_ids(and)
}

fn operation(o: &Operation) -> Permission {
    let mut and = Vec::new();
    rules_field(&mut and, &o.hosts, &o.not_hosts, &host_permission);
    rules_field(&mut and, &o.ports, &o.not_ports, &port_permission);
    rules_field(&mut and, &o.methods, &o.not_methods, &|m| Permission {
        rule: Some(permission::Rule::Header(header(":method", &exact(m)))),
    });
    rules_field(&mut and, &o.paths, &o.not_paths, &path_permission);
    and_rules(and)
}

enum Cond {
    Principal(Principal),
    Permission(Permission),
}

/// A `when` condition, on the principal or the permission side; `None` when it cannot be
/// evaluated (unknown key, `experimental.*`).
fn condition(c: &Condition, ns: &str, ctx: &Ctx<'_>) -> Option<Cond> {
    let key = c.key.as_str();
    let p = |f: &dyn Fn(&str) -> Principal| {
        let mut and = Vec::new();
        ids_field(&mut and, &c.values, &c.not_values, f);
        Some(Cond::Principal(and_ids(and)))
    };
    let q = |f: &dyn Fn(&str) -> Permission| {
        let mut and = Vec::new();
        rules_field(&mut and, &c.values, &c.not_values, f);
        Some(Cond::Permission(and_rules(and)))
    };
    if let Some(name) = map_key(key, "request.headers") {
        return p(&|v| Principal {
            identifier: Some(principal::Identifier::Header(header(&name, &wildcard(v)))),
        });
    }
    if let Some(claim) = key.strip_prefix("request.auth.claims") {
        let path = claim_path(claim);
        if path.is_empty() {
            return None;
        }
        return p(&|v| claim_principal(&path, v, ctx.issuers));
    }
    match key {
        "source.ip" => p(&|v| cidr_principal(v, false)),
        "remote.ip" => p(&|v| cidr_principal(v, true)),
        "source.namespace" => p(&namespace_principal),
        "source.principal" => p(&|v| authenticated(spiffe_match(v))),
        "source.serviceAccount" => p(&|v| service_account(v, ns, ctx.trust_domain)),
        "request.auth.principal" => p(&|v| request_principal(v, ctx.issuers)),
        "request.auth.audiences" => p(&|v| claim_principal(&["aud".to_string()], v, ctx.issuers)),
        "request.auth.presenter" => p(&|v| claim_principal(&["azp".to_string()], v, ctx.issuers)),
        "destination.ip" => q(&|v| Permission {
            rule: Some(permission::Rule::DestinationIp(cidr(v))),
        }),
        "destination.port" => q(&port_permission),
        "connection.sni" => q(&|v| Permission {
            rule: Some(permission::Rule::RequestedServerName(wildcard(v))),
        }),
        _ => None,
    }
}

/// `request.headers[x-token]` -> `x-token`.
fn map_key(key: &str, prefix: &str) -> Option<String> {
    key.strip_prefix(prefix)?
        .strip_prefix('[')?
        .strip_suffix(']')
        .map(str::to_string)
}

/// `[groups]` -> `groups`; `[a][b]` -> `a`, `b` (nested claims).
fn claim_path(s: &str) -> Vec<String> {
    let Some(inner) = s.strip_prefix('[').and_then(|s| s.strip_suffix(']')) else {
        return Vec::new();
    };
    inner.split("][").map(str::to_string).collect()
}

// ------------------------------------------------------------------ matchers

fn sm(p: matcher::string_matcher::MatchPattern, ignore_case: bool) -> matcher::StringMatcher {
    matcher::StringMatcher {
        match_pattern: Some(p),
        ignore_case,
    }
}

fn exact(v: &str) -> matcher::StringMatcher {
    sm(
        matcher::string_matcher::MatchPattern::Exact(v.into()),
        false,
    )
}

fn string_match_prefix(v: &str) -> matcher::StringMatcher {
    sm(
        matcher::string_matcher::MatchPattern::Prefix(v.into()),
        false,
    )
}

fn safe_regex(re: &str) -> matcher::StringMatcher {
    sm(
        matcher::string_matcher::MatchPattern::SafeRegex(matcher::RegexMatcher {
            regex: re.into(),
            engine_type: None,
        }),
        false,
    )
}

/// Istio's value forms: `*` (any, non-empty), `abc*` (prefix), `*abc` (suffix), else exact.
fn wildcard(v: &str) -> matcher::StringMatcher {
    use matcher::string_matcher::MatchPattern as P;
    if v == "*" {
        safe_regex(".+")
    } else if let Some(p) = v.strip_suffix('*') {
        sm(P::Prefix(p.into()), false)
    } else if let Some(s) = v.strip_prefix('*') {
        sm(P::Suffix(s.into()), false)
    } else {
        exact(v)
    }
}

/// Principals are SPIFFE ids written without the scheme (`cluster.local/ns/a/sa/b`).
fn spiffe_match(v: &str) -> matcher::StringMatcher {
    use matcher::string_matcher::MatchPattern as P;
    if v == "*" {
        safe_regex(".+")
    } else if let Some(p) = v.strip_suffix('*') {
        sm(P::Prefix(format!("spiffe://{p}")), false)
    } else if let Some(s) = v.strip_prefix('*') {
        sm(P::Suffix(s.into()), false)
    } else {
        exact(&format!("spiffe://{v}"))
    }
}

fn authenticated(m: matcher::StringMatcher) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Authenticated(
            principal::Authenticated {
                principal_name: Some(m),
            },
        )),
    }
}

/// `foo` -> the peer's SPIFFE id has `/ns/foo/`; `foo*`, `*foo` and `*` as in Istio.
fn namespace_principal(v: &str) -> Principal {
    let seg = if v == "*" {
        "[^/]+".to_string()
    } else if let Some(p) = v.strip_suffix('*') {
        format!("{}[^/]*", regex::escape(p))
    } else if let Some(s) = v.strip_prefix('*') {
        format!("[^/]*{}", regex::escape(s))
    } else {
        regex::escape(v)
    };
    authenticated(safe_regex(&format!(".*/ns/{seg}/.*")))
}

/// `sa` (the policy's namespace) or `ns/sa`.
fn service_account(v: &str, ns: &str, td: &str) -> Principal {
    let (ns, sa) = v.split_once('/').unwrap_or((ns, v));
    authenticated(exact(&format!("spiffe://{td}/ns/{ns}/sa/{sa}")))
}

fn cidr(v: &str) -> core::CidrRange {
    let (addr, len) = match v.split_once('/') {
        Some((a, l)) => (a, l.parse::<u32>().ok()),
        None => (v, None),
    };
    let len = len.unwrap_or(if addr.contains(':') { 128 } else { 32 });
    core::CidrRange {
        address_prefix: addr.into(),
        prefix_len: Some(UInt32Value { value: len }),
    }
}

/// `remote`: the client address after X-Forwarded-For (`remoteIpBlocks`, `remote.ip`);
/// otherwise the peer of the connection (`ipBlocks`, `source.ip`).
fn cidr_principal(v: &str, remote: bool) -> Principal {
    let c = cidr(v);
    Principal {
        identifier: Some(if remote {
            principal::Identifier::RemoteIp(c)
        } else {
            principal::Identifier::DirectRemoteIp(c)
        }),
    }
}

fn header(name: &str, m: &matcher::StringMatcher) -> HeaderMatcher {
    let spec = match &m.match_pattern {
        Some(matcher::string_matcher::MatchPattern::SafeRegex(r)) if r.regex == ".+" => {
            header_matcher::HeaderMatchSpecifier::PresentMatch(true)
        }
        _ => header_matcher::HeaderMatchSpecifier::StringMatch(m.clone()),
    };
    HeaderMatcher {
        name: name.into(),
        header_match_specifier: Some(spec),
        ..Default::default()
    }
}

fn port_permission(v: &str) -> Permission {
    Permission {
        rule: Some(permission::Rule::DestinationPort(v.parse().unwrap_or(0))),
    }
}

/// Hosts match the authority case-insensitively, with or without a port.
fn host_permission(v: &str) -> Permission {
    use matcher::string_matcher::MatchPattern as P;
    let h = |m| Permission {
        rule: Some(permission::Rule::Header(header(":authority", &m))),
    };
    if v == "*" {
        return h(safe_regex(".+"));
    }
    if let Some(p) = v.strip_suffix('*') {
        return h(sm(P::Prefix(p.into()), true));
    }
    if let Some(s) = v.strip_prefix('*') {
        return or_rules(vec![
            h(sm(P::Suffix(s.into()), true)),
            h(sm(
                P::SafeRegex(matcher::RegexMatcher {
                    regex: format!("(?i).*{}:[0-9]+", regex::escape(s)),
                    engine_type: None,
                }),
                false,
            )),
        ]);
    }
    or_rules(vec![
        h(sm(P::Exact(v.into()), true)),
        h(sm(P::Prefix(format!("{v}:")), true)),
    ])
}

/// Paths: exact, `abc*`, `*abc`, `*`, and Envoy's URI templates (`{*}` one segment, `{**}`
/// the rest), matched against the path without the query string.
fn path_permission(v: &str) -> Permission {
    let m = if v.contains("{*}") || v.contains("{**}") {
        let re: Vec<String> = v
            .split('/')
            .map(|seg| match seg {
                "{*}" => "[^/]+".to_string(),
                "{**}" => ".*".to_string(),
                other => regex::escape(other),
            })
            .collect();
        safe_regex(&re.join("/"))
    } else {
        wildcard(v)
    };
    Permission {
        rule: Some(permission::Rule::UrlPath(matcher::PathMatcher {
            rule: Some(matcher::path_matcher::Rule::Path(m)),
        })),
    }
}

/// A claim (by path) of the verified JWT of any accepted issuer: a string equal to `v`, or a
/// list containing it.
fn claim_principal(path: &[String], v: &str, issuers: &[String]) -> Principal {
    let value = wildcard(v);
    let mut ors = Vec::new();
    for iss in issuers {
        let mut full = vec![iss.clone()];
        full.extend(path.iter().cloned());
        ors.push(metadata(&full, string_value(value.clone())));
        ors.push(metadata(&full, list_contains(string_value(value.clone()))));
    }
    or_ids_or_nothing(ors)
}

fn string_value(m: matcher::StringMatcher) -> matcher::ValueMatcher {
    matcher::ValueMatcher {
        match_pattern: Some(matcher::value_matcher::MatchPattern::StringMatch(m)),
    }
}

fn list_contains(v: matcher::ValueMatcher) -> matcher::ValueMatcher {
    matcher::ValueMatcher {
        match_pattern: Some(matcher::value_matcher::MatchPattern::ListMatch(Box::new(
            matcher::ListMatcher {
                match_pattern: Some(matcher::list_matcher::MatchPattern::OneOf(Box::new(v))),
            },
        ))),
    }
}

fn metadata(path: &[String], value: matcher::ValueMatcher) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::SourcedMetadata(
            rbacv3::SourcedMetadata {
                metadata_matcher: Some(matcher::MetadataMatcher {
                    filter: JWT_METADATA.into(),
                    path: path
                        .iter()
                        .map(|k| matcher::metadata_matcher::PathSegment {
                            segment: Some(matcher::metadata_matcher::path_segment::Segment::Key(
                                k.clone(),
                            )),
                        })
                        .collect(),
                    value: Some(value),
                    invert: false,
                }),
                metadata_source: rbacv3::MetadataSource::Dynamic as i32,
            },
        )),
    }
}

/// An OR that may be empty: empty matches nothing (`not any`).
fn or_ids_or_nothing(ids: Vec<Principal>) -> Principal {
    if ids.is_empty() {
        not_id(any_principal())
    } else {
        or_ids(ids)
    }
}

/// A request principal pattern over `ISS/SUB`, for each issuer the proxy accepts: the
/// verified payload sits under the issuer's key, so the pattern becomes a match on `sub`.
fn request_principal(v: &str, issuers: &[String]) -> Principal {
    use matcher::string_matcher::MatchPattern as P;
    let mut ors = Vec::new();
    for iss in issuers {
        let head = format!("{iss}/");
        let sub =
            |m: matcher::StringMatcher| metadata(&[iss.clone(), "sub".into()], string_value(m));
        let present = || {
            metadata(
                &[iss.clone(), "sub".into()],
                matcher::ValueMatcher {
                    match_pattern: Some(matcher::value_matcher::MatchPattern::PresentMatch(true)),
                },
            )
        };
        if v == "*" {
            ors.push(present());
        } else if let Some(prefix) = v.strip_suffix('*') {
            if head.starts_with(prefix) {
                ors.push(present());
            } else if let Some(rest) = prefix.strip_prefix(&head) {
                ors.push(sub(sm(P::Prefix(rest.into()), false)));
            }
        } else if let Some(suffix) = v.strip_prefix('*') {
            // ISS/SUB ends with `suffix`: either SUB does, or `suffix` is a tail of ISS, a
            // slash and exactly SUB.
            ors.push(sub(sm(P::Suffix(suffix.into()), false)));
            for (i, _) in suffix.match_indices('/') {
                if iss.ends_with(&suffix[..i]) {
                    ors.push(sub(exact(&suffix[i + 1..])));
                }
            }
        } else if let Some(rest) = v.strip_prefix(&head) {
            ors.push(sub(exact(rest)));
        }
    }
    or_ids_or_nothing(ors)
}

#[cfg(test)]
mod tests;
