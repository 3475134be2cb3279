//! Envoy's RBAC filters, as the pilot emits them for AuthorizationPolicy
//! (`crates/xds/src/gen/rbac.rs`): `envoy.filters.http.rbac` in the HCM's filter chain,
//! `envoy.filters.network.rbac` before tcp_proxy.
//!
//! - Domain types ([`HttpRbac`], [`NetworkRbac`], [`Rbac`], [`Policy`], [`Permission`],
//!   [`Principal`]) apart from the protos; [`proto`] converts them (`TryFrom`), and anything
//!   this module cannot evaluate exactly as Envoy does (CEL conditions, ROUTE metadata,
//!   filter state, matcher extensions, ...) is an [`RbacError`] naming the field, so the
//!   listener is NACKed rather than enforced differently.
//! - Evaluation as Envoy: policies are tried in name order; a policy matches when any of its
//!   permissions and any of its principals match. ALLOW: a match allows, no match denies;
//!   DENY: a match denies; LOG: never denies (a match is only counted and logged). Shadow
//!   rules (Istio's dry-run) are evaluated and counted, never enforced. No `rules` at all
//!   means the filter allows everything.
//! - Facts ([`Facts`]): the connection's peer (`direct_remote_ip`, `source_ip`), the client
//!   address after `x-forwarded-for` (`remote_ip`, see [`remote_ip`]), its destination (the
//!   original destination on captured listeners: `destination_ip`/`destination_port`), the
//!   SNI, the verified peer certificate's URI SAN (`authenticated`); for HTTP also the
//!   headers (with `:method`, `:path`, `:authority`), the path without its query (`url_path`)
//!   and jwt_authn's dynamic metadata (`metadata` / `sourced_metadata`, DYNAMIC).
//! - HTTP denial: 403 `RBAC: access denied` with response code details
//!   `rbac_access_denied_matched_policy[NAME|none]` (Envoy sets no response flag for it; the
//!   e2e test reads both proxies' access logs); TCP denial: the connection is closed before
//!   any upstream is contacted. Envoy decides on the connection's first byte, after
//!   tcp_proxy has connected upstream (a server-first protocol's greeting reaches a client
//!   that is then denied); we decide at accept, from the same facts, which never leaks it.
//! - Where: [`crate::http`] runs the HTTP filter in the HCM's filter order (after jwt_authn,
//!   whose payloads it reads), re-reading the connection's HCM from the current snapshot per
//!   request; [`crate::listener`] runs the network filters after TLS termination.
//! - Counters under Envoy's names (`http.<prefix>.rbac.allowed`, `...denied`,
//!   `...shadow_allowed`, `...shadow_denied`, per-policy ones with `track_per_rule_stats`,
//!   `<stat_prefix>rbac.*` for the network filter) are shown by the admin `/stats`. Handles
//!   are resolved when the config is converted; the request path only bumps atomics.
//!
//! Evaluation allocates nothing, except to join a header that was sent more than once.
//!
//! Not implemented (NACKed): `condition`/`checked_condition` (CEL), `matcher` and
//! `shadow_matcher` (the unified matcher API), permission `metadata`/`matcher`/`uri_template`,
//! principal `filter_state`/`custom`, ROUTE metadata, header `range_match`, network RBAC
//! `CONTINUOUS` enforcement. Envoy's `access_log_hint` metadata of the LOG action is not
//! written (nothing here reads it); matches are logged at debug level instead.
//!
//! Known differences: `authenticated` matches the peer certificate's URI SAN (the SPIFFE id)
//! only, where Envoy would also try its DNS SANs and subject; `:authority` is matched
//! lowercased; an open TCP connection is not re-checked when policies change (Envoy drains
//! it with its old filter chain).

use crate::config::{HeaderMatch, StringMatch, ValueMatch};
use crate::http::DynamicMetadata;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tracing::debug;

pub mod proto;

/// Where jwt_authn leaves verified payloads (keyed by issuer); RBAC's metadata matchers name it.
pub const JWT_AUTHN: &str = "envoy.filters.http.jwt_authn";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Log,
}

/// One `envoy.filters.http.rbac` filter.
#[derive(Debug)]
pub struct HttpRbac {
    pub engine: Option<Engine>,
    pub shadow: Option<Engine>,
}

/// One `envoy.filters.network.rbac` filter.
#[derive(Debug)]
pub struct NetworkRbac {
    pub engine: Option<Engine>,
    pub shadow: Option<Engine>,
}

/// An `RBAC` message with its counters.
#[derive(Debug)]
pub struct Engine {
    pub rbac: Rbac,
    allowed: Counter,
    denied: Counter,
}

/// An `envoy.config.rbac.v3.RBAC`: the action and the policies, sorted by name (Envoy keeps
/// them in a sorted map and reports the first that matches).
#[derive(Debug)]
pub struct Rbac {
    pub action: Action,
    pub policies: Vec<NamedPolicy>,
}

#[derive(Debug)]
pub struct NamedPolicy {
    pub name: String,
    pub policy: Policy,
    /// `track_per_rule_stats`: (allowed, denied) counted when this policy decides.
    per_rule: Option<(Counter, Counter)>,
}

/// Matches when any permission and any principal match.
#[derive(Debug)]
pub struct Policy {
    pub permissions: Vec<Permission>,
    pub principals: Vec<Principal>,
}

#[derive(Debug)]
pub struct Cidr {
    pub ip: IpAddr,
    pub len: u8,
}

#[derive(Debug)]
pub enum Permission {
    Any,
    And(Vec<Permission>),
    Or(Vec<Permission>),
    Not(Box<Permission>),
    Header(HeaderMatch),
    /// The path without query and fragment.
    UrlPath(StringMatch),
    DestinationIp(Cidr),
    DestinationPort(u16),
    /// `[start, end)`.
    DestinationPortRange(u32, u32),
    /// The SNI, or `""` without one.
    RequestedServerName(StringMatch),
}

#[derive(Debug)]
pub enum Principal {
    Any,
    And(Vec<Principal>),
    Or(Vec<Principal>),
    Not(Box<Principal>),
    /// A verified peer certificate whose URI SAN matches (`None`: any TLS connection).
    Authenticated(Option<StringMatch>),
    /// The connection's peer (`direct_remote_ip`, and the deprecated `source_ip`).
    DirectRemoteIp(Cidr),
    /// The client address after `x-forwarded-for`.
    RemoteIp(Cidr),
    Header(HeaderMatch),
    UrlPath(StringMatch),
    /// Dynamic metadata.
    Metadata(MetadataMatch),
}

/// Envoy's `MetadataMatcher` over dynamic metadata.
#[derive(Debug)]
pub struct MetadataMatch {
    pub filter: String,
    pub path: Vec<String>,
    pub value: MetaValue,
    pub invert: bool,
}

/// Envoy's `ValueMatcher`.
#[derive(Debug)]
pub enum MetaValue {
    Null,
    Number {
        exact: Option<f64>,
        range: Option<(f64, f64)>,
    },
    String(StringMatch),
    Bool(bool),
    Present(bool),
    /// A list with an element that matches.
    ListOneOf(Box<MetaValue>),
    Or(Vec<MetaValue>),
}

/// What the filters decide on.
pub struct Facts<'a> {
    pub peer: SocketAddr,
    /// The client address after `x-forwarded-for` (the peer on TCP).
    pub remote_ip: IpAddr,
    /// The connection's destination.
    pub local: SocketAddr,
    pub security: &'a crate::tls::Security,
    pub sni: Option<&'a str>,
    /// `None` on the network filter.
    pub request: Option<RequestFacts<'a>>,
}

pub struct RequestFacts<'a> {
    pub method: &'a str,
    /// Path and query, as received.
    pub path: &'a str,
    pub authority: &'a str,
    pub headers: &'a http::HeaderMap,
    pub metadata: &'a DynamicMetadata,
}

/// The verdict of one filter.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    Allow,
    /// Denied; the policy that decided (DENY), none for an ALLOW that nothing matched.
    Deny(Option<&'a str>),
}

impl HttpRbac {
    pub fn check<'s>(&'s self, f: &Facts<'_>) -> Verdict<'s> {
        check(self.engine.as_ref(), self.shadow.as_ref(), f)
    }
}

impl NetworkRbac {
    pub fn check<'s>(&'s self, f: &Facts<'_>) -> Verdict<'s> {
        check(self.engine.as_ref(), self.shadow.as_ref(), f)
    }
}

fn check<'s>(engine: Option<&'s Engine>, shadow: Option<&'s Engine>, f: &Facts<'_>) -> Verdict<'s> {
    if let Some(s) = shadow {
        // Counted under the shadow names, never enforced.
        let (allowed, policy) = s.rbac.decide(f);
        if allowed {
            s.allowed.inc();
        } else {
            s.denied.inc();
        }
        debug!(
            allowed,
            policy = policy.map(|p| p.name.as_str()),
            "rbac shadow rules"
        );
    }
    let Some(e) = engine else {
        return Verdict::Allow;
    };
    let (allowed, policy) = e.rbac.decide(f);
    if let Some((a, d)) = policy.and_then(|p| p.per_rule.as_ref()) {
        if allowed {
            a.inc();
        } else {
            d.inc();
        }
    }
    if e.rbac.action == Action::Log {
        if let Some(p) = policy {
            debug!(policy = %p.name, "rbac: audit (LOG) policy matched");
        }
    }
    if allowed {
        e.allowed.inc();
        Verdict::Allow
    } else {
        e.denied.inc();
        Verdict::Deny(policy.map(|p| p.name.as_str()))
    }
}

impl Rbac {
    fn matched(&self, f: &Facts<'_>) -> Option<&NamedPolicy> {
        self.policies.iter().find(|p| p.policy.matches(f))
    }

    /// (allowed, the policy that matched).
    fn decide(&self, f: &Facts<'_>) -> (bool, Option<&NamedPolicy>) {
        let m = self.matched(f);
        let allowed = match self.action {
            Action::Allow => m.is_some(),
            Action::Deny => m.is_none(),
            Action::Log => true,
        };
        (allowed, m)
    }
}

impl Policy {
    pub fn matches(&self, f: &Facts<'_>) -> bool {
        self.permissions.iter().any(|p| p.matches(f))
            && self.principals.iter().any(|p| p.matches(f))
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4-mapped IPv6 peer (dual-stack socket) is compared as IPv4.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.ip, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let len = u32::from(self.len.min(32));
                let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                u32::from(n) & mask == u32::from(i) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let len = u32::from(self.len.min(128));
                let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                u128::from(n) & mask == u128::from(i) & mask
            }
            _ => false,
        }
    }
}

impl Permission {
    pub fn matches(&self, f: &Facts<'_>) -> bool {
        match self {
            Permission::Any => true,
            Permission::And(v) => v.iter().all(|p| p.matches(f)),
            Permission::Or(v) => v.iter().any(|p| p.matches(f)),
            Permission::Not(p) => !p.matches(f),
            Permission::Header(h) => header_matches(h, f.request.as_ref()),
            Permission::UrlPath(m) => url_path_matches(m, f),
            Permission::DestinationIp(c) => c.contains(f.local.ip()),
            Permission::DestinationPort(p) => f.local.port() == *p,
            Permission::DestinationPortRange(start, end) => {
                (*start..*end).contains(&u32::from(f.local.port()))
            }
            Permission::RequestedServerName(m) => string_matches(m, f.sni.unwrap_or("")),
        }
    }
}

impl Principal {
    pub fn matches(&self, f: &Facts<'_>) -> bool {
        match self {
            Principal::Any => true,
            Principal::And(v) => v.iter().all(|p| p.matches(f)),
            Principal::Or(v) => v.iter().any(|p| p.matches(f)),
            Principal::Not(p) => !p.matches(f),
            Principal::Authenticated(m) => {
                // Envoy: no TLS, no match; a TLS peer without a certificate (or without a URI
                // SAN) is matched by its empty subject.
                if !f.security.tls {
                    return false;
                }
                match m {
                    None => true,
                    Some(m) => {
                        string_matches(m, f.security.peer_principal.as_deref().unwrap_or(""))
                    }
                }
            }
            Principal::DirectRemoteIp(c) => c.contains(f.peer.ip()),
            Principal::RemoteIp(c) => c.contains(f.remote_ip),
            Principal::Header(h) => header_matches(h, f.request.as_ref()),
            Principal::UrlPath(m) => url_path_matches(m, f),
            Principal::Metadata(m) => m.matches(f.request.as_ref().map(|r| r.metadata)),
        }
    }
}

impl MetadataMatch {
    fn matches(&self, md: Option<&DynamicMetadata>) -> bool {
        let value = md.and_then(|md| {
            let (first, rest) = self.path.split_first()?;
            let mut v = md.get(&self.filter, first)?;
            for k in rest {
                v = v.as_object()?.get(k)?;
            }
            Some(v)
        });
        self.value.matches(value) != self.invert
    }
}

impl MetaValue {
    fn matches(&self, v: Option<&serde_json::Value>) -> bool {
        use serde_json::Value;
        match (self, v) {
            // Envoy's present matcher: `present_match: false` never matches.
            (MetaValue::Present(p), v) => *p && v.is_some(),
            (MetaValue::Or(ms), v) => ms.iter().any(|m| m.matches(v)),
            (_, None) => false,
            (MetaValue::Null, Some(v)) => v.is_null(),
            (MetaValue::String(m), Some(Value::String(s))) => string_matches(m, s),
            (MetaValue::Bool(b), Some(Value::Bool(v))) => b == v,
            (MetaValue::Number { exact, range }, Some(Value::Number(n))) => {
                let Some(n) = n.as_f64() else { return false };
                exact.is_some_and(|e| e == n)
                    || range.is_some_and(|(start, end)| start <= n && n < end)
            }
            (MetaValue::ListOneOf(m), Some(Value::Array(items))) => {
                items.iter().any(|i| m.matches(Some(i)))
            }
            _ => false,
        }
    }
}

fn url_path_matches(m: &StringMatch, f: &Facts<'_>) -> bool {
    let Some(r) = &f.request else {
        return false;
    };
    let end = r.path.find(['?', '#']).unwrap_or(r.path.len());
    string_matches(m, &r.path[..end])
}

/// Envoy's `HeaderUtility::matchHeaders` for one matcher: a header sent more than once is
/// matched as its values joined by `,`; a missing header matches only `present_match:
/// false` (or, inverted, `present_match: true`), unless `treat_missing_header_as_empty`.
fn header_matches(h: &HeaderMatch, r: Option<&RequestFacts<'_>>) -> bool {
    let pseudo = r.and_then(|r| match h.name.as_str() {
        ":method" => Some(r.method),
        ":path" => Some(r.path),
        ":authority" | "host" => Some(r.authority),
        ":scheme" => Some("http"),
        _ => None,
    });
    let joined;
    let value: Option<&str> = match (pseudo, r) {
        (Some(v), _) => Some(v),
        (None, None) => None,
        (None, Some(r)) => {
            let mut all = r.headers.get_all(h.name.as_str()).iter();
            match (all.next(), all.next()) {
                (None, _) => None,
                (Some(v), None) => Some(std::str::from_utf8(v.as_bytes()).unwrap_or("")),
                (Some(_), Some(_)) => {
                    joined = r
                        .headers
                        .get_all(h.name.as_str())
                        .iter()
                        .map(|v| String::from_utf8_lossy(v.as_bytes()))
                        .collect::<Vec<_>>()
                        .join(",");
                    Some(joined.as_str())
                }
            }
        }
    };
    let value = match value {
        Some(v) => v,
        None if h.treat_missing_as_empty => "",
        None => {
            let present = |want: bool| matches!(h.value, ValueMatch::Present(p) if p == want);
            return if h.invert {
                present(true)
            } else {
                present(false)
            };
        }
    };
    let m = match &h.value {
        ValueMatch::Present(p) => *p,
        ValueMatch::String(s) => string_matches(s, value),
    };
    m != h.invert
}

/// Envoy's `StringMatcher`, without allocating (`ignore_case` folds ASCII only, as Envoy).
pub fn string_matches(m: &StringMatch, v: &str) -> bool {
    fn eq(a: &[u8], b: &[u8], ic: bool) -> bool {
        if ic {
            a.eq_ignore_ascii_case(b)
        } else {
            a == b
        }
    }
    let vb = v.as_bytes();
    match m {
        StringMatch::Exact { value, ignore_case } => eq(vb, value.as_bytes(), *ignore_case),
        StringMatch::Prefix { value, ignore_case } => {
            vb.len() >= value.len() && eq(&vb[..value.len()], value.as_bytes(), *ignore_case)
        }
        StringMatch::Suffix { value, ignore_case } => {
            vb.len() >= value.len()
                && eq(
                    &vb[vb.len() - value.len()..],
                    value.as_bytes(),
                    *ignore_case,
                )
        }
        StringMatch::Contains { value, ignore_case } => {
            let n = value.len();
            n == 0 || vb.windows(n).any(|w| eq(w, value.as_bytes(), *ignore_case))
        }
        StringMatch::Regex(re) => re.is_match(v),
    }
}

/// The client address as Envoy's `remote_ip` sees it: with `use_remote_address` the
/// downstream peer (or, with `xff_num_trusted_hops` N > 0, the Nth `x-forwarded-for` entry
/// from the right); without it the (N+1)th entry from the right. The peer when the header
/// has no such entry.
pub fn remote_ip(
    xff: Option<&http::HeaderValue>,
    peer: IpAddr,
    use_remote_address: bool,
    trusted_hops: u32,
) -> IpAddr {
    if use_remote_address && trusted_hops == 0 {
        return peer;
    }
    let skip = if use_remote_address {
        trusted_hops - 1
    } else {
        trusted_hops
    };
    let Some(list) = xff.and_then(|v| v.to_str().ok()) else {
        return peer;
    };
    list.rsplit(',')
        .nth(skip as usize)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(peer)
}

// ------------------------------------------------------------------ counters

/// A counter shared by every config version that names it (Envoy's stats outlive listener
/// updates too).
#[derive(Clone, Debug)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn registry() -> &'static Mutex<BTreeMap<String, Arc<AtomicU64>>> {
    static R: OnceLock<Mutex<BTreeMap<String, Arc<AtomicU64>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// The counter named `name`, created at 0. Called while converting config, never on the
/// request path.
pub fn counter(name: String) -> Counter {
    let mut r = registry().lock().unwrap_or_else(|e| e.into_inner());
    Counter(r.entry(name).or_default().clone())
}

/// Every RBAC counter, for the admin `/stats`.
pub fn stats() -> Vec<(String, u64)> {
    let r = registry().lock().unwrap_or_else(|e| e.into_inner());
    r.iter()
        .map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed)))
        .collect()
}

impl Engine {
    /// `prefix` is the full stat prefix up to the counter name, e.g.
    /// `http.inbound_0.0.0.0_8080.rbac.` or `...rbac.istio_dry_run_deny_shadow_`.
    pub fn new(mut rbac: Rbac, prefix: &str, per_rule: Option<&str>) -> Engine {
        if let Some(pr) = per_rule {
            for p in &mut rbac.policies {
                p.per_rule = Some((
                    counter(format!("{pr}policy.{}.allowed", p.name)),
                    counter(format!("{pr}policy.{}.denied", p.name)),
                ));
            }
        }
        Engine {
            rbac,
            allowed: counter(format!("{prefix}allowed")),
            denied: counter(format!("{prefix}denied")),
        }
    }
}

#[cfg(test)]
mod tests;
