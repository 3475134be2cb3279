//! Primitive checks shared by every kind: DNS names, hosts, labels, IPs, ports, protocols,
//! durations, regexes. Each returns `Err(message)`; the caller attaches the field path.
//!
//! The rules mirror Istio's `pkg/config/labels`, `pkg/config/validation/agent` and
//! `pkg/config/protocol`, and Kubernetes' `apimachinery/pkg/util/validation` where the kind
//! is a Kubernetes object.

use crate::duration::Duration;
use std::net::IpAddr;
use std::time::Duration as StdDuration;

pub type Check = Result<(), String>;

const DNS1123_LABEL_MAX: usize = 63;
const DNS1123_SUBDOMAIN_MAX: usize = 253;

fn is_alnum(c: u8) -> bool {
    c.is_ascii_alphanumeric()
}

/// Istio's DNS-1123 label: `[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?`, at most 63 chars. Istio
/// accepts upper case here (its regex does), unlike Kubernetes object names.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= DNS1123_LABEL_MAX
        && is_alnum(b[0])
        && is_alnum(b[b.len() - 1])
        && b.iter().all(|&c| is_alnum(c) || c == b'-')
}

/// Kubernetes' stricter label form, lower case only (namespaces, object names).
pub fn is_k8s_dns1123_label(s: &str) -> bool {
    is_dns1123_label(s) && !s.bytes().any(|c| c.is_ascii_uppercase())
}

/// Kubernetes DNS-1123 subdomain: lower-case labels joined by dots, at most 253 chars.
pub fn is_k8s_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= DNS1123_SUBDOMAIN_MAX && s.split('.').all(is_k8s_dns1123_label)
}

/// Kubernetes DNS-1035 label (Service names): like a DNS-1123 label but starts with a letter.
pub fn is_k8s_dns1035_label(s: &str) -> bool {
    is_k8s_dns1123_label(s) && s.as_bytes().first().is_some_and(u8::is_ascii_alphabetic)
}

/// Kubernetes IANA_SVC_NAME (named ports): at most 15 chars, lower-case alphanumerics and
/// '-', at least one letter, no leading/trailing or doubled '-'.
pub fn is_iana_svc_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && s.bytes().any(|c| c.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// Istio's wildcard label: `*`, or a DNS-1123 label optionally prefixed by `*` or `*-`.
pub fn is_wildcard_dns1123_label(s: &str) -> bool {
    if s.len() > DNS1123_LABEL_MAX {
        return false;
    }
    if s == "*" {
        return true;
    }
    let rest = s
        .strip_prefix("*-")
        .or_else(|| s.strip_prefix('*'))
        .unwrap_or(s);
    is_dns1123_label(rest)
}

fn dns_preconditions(name: &str) -> Check {
    if name.len() > 255 {
        return Err(format!("domain name {name:?} too long (max 255)"));
    }
    if name.is_empty() {
        return Err("empty domain name not allowed".into());
    }
    Ok(())
}

/// Every dot-separated label is a DNS-1123 label; a trailing dot (`istio.io.`) is allowed and
/// the top-level label may not be all digits.
fn dns1123_labels(domain: &str) -> Check {
    let parts: Vec<&str> = domain.split('.').collect();
    let tld = parts.last().copied().unwrap_or("");
    if !tld.is_empty() && tld.bytes().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "domain name {domain:?} invalid (top level domain {tld:?} cannot be all-numeric)"
        ));
    }
    for (i, label) in parts.iter().enumerate() {
        if i == parts.len() - 1 && label.is_empty() {
            return Ok(());
        }
        if !is_dns1123_label(label) {
            return Err(format!(
                "domain name {domain:?} invalid (label {label:?} invalid)"
            ));
        }
    }
    Ok(())
}

/// A fully-qualified (or short) domain name without wildcards.
pub fn fqdn(name: &str) -> Check {
    dns_preconditions(name)?;
    dns1123_labels(name)
}

/// A domain name whose first label may be a wildcard (`*.example.com`, `*`).
pub fn wildcard_domain(name: &str) -> Check {
    dns_preconditions(name)?;
    let (first, rest) = match name.split_once('.') {
        Some((f, r)) => (f, Some(r)),
        None => (name, None),
    };
    if !is_wildcard_dns1123_label(first) {
        return Err(format!(
            "domain name {name:?} invalid (label {first:?} invalid)"
        ));
    }
    match rest {
        Some(r) => dns1123_labels(r),
        None => Ok(()),
    }
}

/// Like [`wildcard_domain`], but SNI hosts on gateways may be the auto-generated
/// `outbound_.PORT_._.HOST` names of multi-network passthrough.
pub fn wildcard_domain_for_gateway(sni: bool, name: &str) -> Check {
    dns_preconditions(name)?;
    let first = name.split('.').next().unwrap_or("");
    if sni && first == "outbound_" {
        let ok = name
            .strip_prefix("outbound_.")
            .and_then(|r| r.bytes().next())
            .is_some_and(|c| (b'0'..=b'8').contains(&c));
        return if ok {
            Ok(())
        } else {
            Err(format!(
                "domain name {name:?} invalid (label {first:?} invalid)"
            ))
        };
    }
    wildcard_domain(name)
}

/// A partial wildcard such as `foo*.com` is not allowed; `*` and `*.x` are.
pub fn partial_wildcard(host: &str) -> Check {
    if host.contains('*') && host.len() != 1 && !host.starts_with("*.") {
        return Err(format!("partial wildcard {host:?} not allowed"));
    }
    Ok(())
}

pub fn is_ip(s: &str) -> bool {
    s.parse::<IpAddr>().is_ok()
}

pub fn ip(s: &str) -> Check {
    if is_ip(s) {
        Ok(())
    } else {
        Err(format!("{s} is not a valid IP"))
    }
}

/// An IP or a CIDR block (`10.0.0.0/8`, `2001:db8::/32`). Like Go's `netip.ParsePrefix`, host
/// bits may be set.
pub fn ip_or_cidr(s: &str) -> Check {
    if s.contains('/') {
        let Some((addr, bits)) = s.split_once('/') else {
            return Err(format!("{s} is not a valid CIDR block"));
        };
        let Ok(addr) = addr.parse::<IpAddr>() else {
            return Err(format!("{s} is not a valid CIDR block"));
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        // Go rejects a sign or leading zeros in the prefix length; so do we.
        let ok = !bits.is_empty()
            && bits.bytes().all(|c| c.is_ascii_digit())
            && (bits == "0" || !bits.starts_with('0'))
            && bits.parse::<u32>().is_ok_and(|b| b <= max);
        if ok {
            Ok(())
        } else {
            Err(format!("{s} is not a valid CIDR block"))
        }
    } else {
        ip(s)
    }
}

pub fn port(p: i64) -> Check {
    if (1..=65535).contains(&p) {
        Ok(())
    } else {
        Err(format!("port number {p} must be in the range 1..65535"))
    }
}

/// Istio port names are DNS-1123 labels.
pub fn port_name(name: &str) -> Check {
    if is_dns1123_label(name) {
        Ok(())
    } else {
        Err(format!("invalid port name: {name:?}"))
    }
}

/// Istio's protocol names (`protocol.Parse`, case-insensitive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Grpc,
    GrpcWeb,
    Http,
    HttpProxy,
    Http2,
    Https,
    Tls,
    Mongo,
    Redis,
    Mysql,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Protocol> {
        Some(match s.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "grpc" => Protocol::Grpc,
            "grpc-web" => Protocol::GrpcWeb,
            "http" => Protocol::Http,
            "http_proxy" => Protocol::HttpProxy,
            "http2" => Protocol::Http2,
            "https" => Protocol::Https,
            "tls" => Protocol::Tls,
            "mongo" => Protocol::Mongo,
            "redis" => Protocol::Redis,
            "mysql" => Protocol::Mysql,
            _ => return None,
        })
    }

    pub fn is_http(self) -> bool {
        matches!(
            self,
            Protocol::Http
                | Protocol::Http2
                | Protocol::HttpProxy
                | Protocol::Grpc
                | Protocol::GrpcWeb
        )
    }

    pub fn is_tls(self) -> bool {
        matches!(self, Protocol::Https | Protocol::Tls)
    }
}

/// Empty means "sniff the protocol", which is allowed.
pub fn protocol(s: &str) -> Check {
    if s.is_empty() || Protocol::parse(s).is_some() {
        Ok(())
    } else {
        Err(format!("unsupported protocol: {s}"))
    }
}

/// Istio's `ValidateDuration`: at least 1ms and a whole number of milliseconds (Envoy's
/// timers have millisecond resolution).
pub fn duration(d: &Duration) -> Check {
    let d = d.as_std();
    if d < StdDuration::from_millis(1) {
        return Err("duration must be greater than 1ms".into());
    }
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        return Err("only durations to ms precision are supported".into());
    }
    Ok(())
}

/// Envoy compiles regexes with RE2; Istio bounds their length (RE2 program size grows with
/// it) and compiles them with Go's RE2-compatible engine. The `regex` crate is the closest
/// Rust equivalent (no backreferences or look-around, like RE2).
pub fn regex(re: &str) -> Check {
    if re.is_empty() {
        return Err("regex string match should not be empty".into());
    }
    if re.len() > 1024 {
        return Err("regex is too large, max length allowed is 1024".into());
    }
    regex::Regex::new(re).map(|_| ()).map_err(|e| {
        format!(
            "{e}; Istio uses RE2 style regex-based match (https://github.com/google/re2/wiki/Syntax)"
        )
    })
}

/// Istio's header-name rule for matches: `^[-_A-Za-z0-9]+$`.
pub fn header_name(name: &str) -> Check {
    if name.is_empty() {
        return Err("header name cannot be empty".into());
    }
    if name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    {
        Ok(())
    } else {
        Err(format!("header name {name} is not a valid header name"))
    }
}

/// JWT claim routing keys (`@request.auth.claims.sub`, `@request.auth.claims[sub]`).
pub fn is_jwt_claim_route(name: &str) -> bool {
    name.strip_prefix("@request.auth.claims")
        .is_some_and(|rest| rest.starts_with('.') && rest.len() > 1 || rest.starts_with('['))
}

/// Header values Envoy accepts: no control characters except tab, and `%` only as `%%` or
/// around a `%COMMAND%`/`%COMMAND(args)%` substitution.
pub fn header_value(v: &str) -> Check {
    if v.chars()
        .any(|c| (c != '\t' && (c as u32) < 0x20) || c as u32 == 0x7f)
    {
        return Err(format!("header value configuration {v:?} is invalid"));
    }
    let b = v.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            i += 1;
            continue;
        }
        if b.get(i + 1) == Some(&b'%') {
            i += 2;
            continue;
        }
        // A substitution: `%NAME%` or `%NAME(args)%`; arguments may contain anything but
        // the closing `)%`.
        let start = i + 1;
        let name_len = b[start..]
            .iter()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || **c == b'_')
            .count();
        if name_len == 0 {
            return Err(format!(
                "header value configuration: invalid header value {v:?}: '%' must be escaped as '%%' or start a %VARIABLE%"
            ));
        }
        let mut j = start + name_len;
        if b.get(j) == Some(&b'(') {
            match v[j..].find(")%") {
                Some(off) => j += off + 1,
                None => {
                    return Err(format!(
                        "header value configuration: unterminated variable in {v:?}"
                    ))
                }
            }
        }
        if b.get(j) != Some(&b'%') {
            return Err(format!(
                "header value configuration: unterminated variable in {v:?}"
            ));
        }
        i = j + 1;
    }
    Ok(())
}

/// Kubernetes label key: optional DNS-subdomain prefix and `/`, then a qualified name of at
/// most 63 characters.
pub fn label_key(k: &str) -> Check {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        if p.is_empty() || p.len() > DNS1123_SUBDOMAIN_MAX || !p.split('.').all(is_dns1123_label) {
            return Err(format!("invalid label key {k:?}: bad DNS prefix"));
        }
    }
    if !is_qualified_name(name) {
        return Err(format!(
            "invalid label key {k:?}: must be at most 63 alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"
        ));
    }
    Ok(())
}

fn is_qualified_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= DNS1123_LABEL_MAX
        && is_alnum(b[0])
        && is_alnum(b[b.len() - 1])
        && b.iter()
            .all(|&c| is_alnum(c) || c == b'-' || c == b'_' || c == b'.')
}

/// Kubernetes label value: empty, or a qualified name of at most 63 characters.
pub fn label_value(v: &str) -> Check {
    if v.is_empty() || is_qualified_name(v) {
        Ok(())
    } else {
        Err(format!(
            "invalid label value {v:?}: must be empty or at most 63 alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"
        ))
    }
}

/// Absolute path of a unix domain socket (or an abstract socket starting with `@`).
pub fn unix_address(addr: &str) -> Check {
    if addr.is_empty() {
        return Err("unix address must not be empty".into());
    }
    if addr.starts_with('@') {
        return Ok(());
    }
    if !addr.starts_with('/') || addr.ends_with('/') {
        return Err(format!("{addr} is not an absolute path to a file"));
    }
    Ok(())
}

/// HTTP status codes Go's `net/http.StatusText` knows: Istio accepts a numeric `retryOn`
/// entry only when it is one of these.
pub fn is_known_http_status(code: u32) -> bool {
    matches!(code,
        100..=103 | 200..=208 | 226 | 300..=305 | 307 | 308 | 400..=418 | 421..=426 | 428 | 429
        | 431 | 451 | 500..=508 | 510 | 511)
}

/// Hostname matching with wildcards, as Istio's `host.Name.Matches` (used for duplicate
/// detection): `*.foo.com` matches `a.foo.com` and `*.com` matches `*.foo.com`.
pub fn hosts_match(a: &str, b: &str) -> bool {
    if a == b || a == "*" || b == "*" {
        return true;
    }
    match (a.strip_prefix('*'), b.strip_prefix('*')) {
        (Some(sa), Some(sb)) => sa.ends_with(sb) || sb.ends_with(sa),
        (Some(sa), None) => b.ends_with(sa),
        (None, Some(sb)) => a.ends_with(sb),
        (None, None) => false,
    }
}

/// `a` is a subset of `b` (every name `a` matches, `b` matches too).
pub fn host_subset_of(a: &str, b: &str) -> bool {
    if a == b || b == "*" {
        return true;
    }
    match (a.strip_prefix('*'), b.strip_prefix('*')) {
        (Some(sa), Some(sb)) => sa.ends_with(sb),
        (Some(_), None) => false,
        (None, Some(sb)) => a.ends_with(sb),
        (None, None) => false,
    }
}

/// gRPC status names Istio's fault injection accepts (`grpc.SupportedGRPCStatus`).
pub fn is_grpc_status(s: &str) -> bool {
    matches!(
        s,
        "OK" | "CANCELLED"
            | "UNKNOWN"
            | "INVALID_ARGUMENT"
            | "DEADLINE_EXCEEDED"
            | "NOT_FOUND"
            | "ALREADY_EXISTS"
            | "PERMISSION_DENIED"
            | "RESOURCE_EXHAUSTED"
            | "FAILED_PRECONDITION"
            | "ABORTED"
            | "OUT_OF_RANGE"
            | "UNIMPLEMENTED"
            | "INTERNAL"
            | "UNAVAILABLE"
            | "DATA_LOSS"
            | "UNAUTHENTICATED"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_domains() {
        assert!(is_dns1123_label("v1"));
        assert!(!is_dns1123_label("-v1"));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        assert!(is_wildcard_dns1123_label("*"));
        assert!(is_wildcard_dns1123_label("*foo"));
        assert!(is_wildcard_dns1123_label("*-foo"));
        assert!(!is_wildcard_dns1123_label("f*o"));
        assert!(wildcard_domain("*.example.com").is_ok());
        assert!(wildcard_domain("reviews").is_ok());
        assert!(wildcard_domain("istio.io.").is_ok());
        assert!(wildcard_domain("foo.*.com").is_err());
        assert!(wildcard_domain("1.2.3.4").is_err());
        assert!(wildcard_domain("").is_err());
        assert!(fqdn("*.example.com").is_err());
        assert!(wildcard_domain_for_gateway(true, "outbound_.80_._.e2e.foo.mesh").is_ok());
        assert!(wildcard_domain_for_gateway(true, "outbound_.x").is_err());
    }

    #[test]
    fn k8s_names() {
        assert!(is_k8s_dns1123_subdomain("my.app-1"));
        assert!(!is_k8s_dns1123_subdomain("My.app"));
        assert!(is_k8s_dns1035_label("svc"));
        assert!(!is_k8s_dns1035_label("1svc"));
        assert!(is_iana_svc_name("http-web"));
        assert!(!is_iana_svc_name("8080"));
        assert!(!is_iana_svc_name("a--b"));
        assert!(label_key("app.kubernetes.io/name").is_ok());
        assert!(label_key("bad key").is_err());
        assert!(label_key("/x").is_err());
        assert!(label_value("").is_ok());
        assert!(label_value("v1.2_x").is_ok());
        assert!(label_value("-x").is_err());
    }

    #[test]
    fn addresses() {
        assert!(ip_or_cidr("10.0.0.0/8").is_ok());
        assert!(ip_or_cidr("2001:db8::/32").is_ok());
        assert!(ip_or_cidr("10.0.0.0/33").is_err());
        assert!(ip_or_cidr("10.0.0.0/08").is_err());
        assert!(ip_or_cidr("10.0.0.300").is_err());
        assert!(ip_or_cidr("1.2.3.4/").is_err());
        assert!(unix_address("/var/run/x.sock").is_ok());
        assert!(unix_address("x.sock").is_err());
    }

    #[test]
    fn header_values() {
        assert!(header_value("foo").is_ok());
        assert!(header_value("%HOSTNAME%").is_ok());
        assert!(header_value("100%%").is_ok());
        assert!(header_value("a %START_TIME(%s)% b").is_ok());
        assert!(header_value("abc%123").is_err());
        assert!(header_value("%START_TIME%%").is_err());
        assert!(header_value("a\nb").is_err());
    }

    #[test]
    fn hosts() {
        assert!(hosts_match("*.foo.com", "a.foo.com"));
        assert!(hosts_match("*.com", "*.foo.com"));
        assert!(!hosts_match("a.foo.com", "b.foo.com"));
        assert!(host_subset_of("a.foo.com", "*.foo.com"));
        assert!(!host_subset_of("*.foo.com", "a.foo.com"));
        assert!(host_subset_of("*", "*"));
    }

    #[test]
    fn misc() {
        assert!(regex("^/a.*$").is_ok());
        assert!(regex("(").is_err());
        assert!(regex("").is_err());
        assert!(regex(&"a".repeat(1025)).is_err());
        assert!(protocol("").is_ok());
        assert!(protocol("grpc-web").is_ok());
        assert!(protocol("tls").is_ok());
        assert!(protocol("smtp").is_err());
        assert!(is_jwt_claim_route("@request.auth.claims.sub"));
        assert!(is_jwt_claim_route("@request.auth.claims[sub]"));
        assert!(!is_jwt_claim_route("x-claim"));
    }
}
