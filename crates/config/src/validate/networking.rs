//! `networking.istio.io`: VirtualService, DestinationRule, Gateway, ServiceEntry,
//! WorkloadEntry, WorkloadGroup, Sidecar. Rules follow Istio's `validation.go` and
//! `virtualservice.go`; where we deviate it is said next to the rule.

use super::names::{self, Protocol};
use super::{labels, Errs, Path};
use crate::networking::*;
use crate::resource::Meta;
use std::collections::{BTreeMap, BTreeSet, HashSet};

const MESH_GATEWAY: &str = "mesh";

// ---------------------------------------------------------------- shared pieces

/// `exportTo`: `.`, `*`, `~` (ServiceEntry only) or namespace names, no duplicates, and the
/// public/none values alone.
pub(super) fn export_to(
    e: &mut Errs,
    p: &Path,
    namespace: &str,
    list: &[String],
    is_service_entry: bool,
    dr_with_selector: bool,
) {
    if list.is_empty() {
        return;
    }
    let mut seen: HashSet<String> = HashSet::new();
    for (i, entry) in list.iter().enumerate() {
        let ip = p.i("exportTo", i);
        // `.` means the config's own namespace: `.` and `ns` together are duplicates.
        let key = if entry == "." {
            namespace.to_string()
        } else {
            entry.clone()
        };
        if seen.contains(&key) {
            if &key != entry {
                e.add(
                    &ip,
                    format!("duplicate entries in exportTo: . and current namespace {namespace}"),
                );
            } else {
                e.add(
                    &ip,
                    format!("duplicate entries in exportTo for entry {entry}"),
                );
            }
            continue;
        }
        let valid =
            key == "*" || (is_service_entry && key == "~") || names::is_k8s_dns1123_label(&key);
        if valid {
            seen.insert(key);
        } else {
            e.add(&ip, format!("only .,* or a valid DNS 1123 label is allowed as exportTo entry, found {entry:?}"));
        }
    }
    let ep = p.f("exportTo");
    if dr_with_selector && !seen.is_empty() {
        if seen.contains(namespace) {
            if seen.len() > 1 {
                e.add(&ep, "destination rule with workload selector cannot have multiple entries in exportTo");
            }
        } else {
            e.add(&ep, "destination rule with workload selector cannot have exportTo beyond current namespace");
        }
    }
    if seen.contains("*") && list.len() > 1 {
        e.add(
            &ep,
            "cannot have both public (*) and non-public exportTo values for a resource",
        );
    }
    if seen.contains("~") && list.len() > 1 {
        e.add(&ep, "cannot export service entry to no one (~) and someone");
    }
}

/// `workloadSelector` of the alpha APIs (Sidecar, ServiceEntry, DestinationRule): no empty
/// keys and no wildcards, which Istio would otherwise silently never match.
fn workload_selector(e: &mut Errs, p: &Path, sel: &Option<WorkloadSelector>) {
    if let Some(sel) = sel {
        selector_labels(e, &p.f("workloadSelector"), "labels", &sel.labels);
    }
}

pub(super) fn selector_labels(e: &mut Errs, p: &Path, field: &str, map: &Labels) {
    for (k, v) in map {
        let kp = p.k(field, k);
        if k.is_empty() {
            e.add(
                &kp,
                format!("empty key is not supported in selector: \"{k}={v}\""),
            );
        }
        if k.contains('*') || v.contains('*') {
            e.add(
                &kp,
                format!("wildcard is not supported in selector: \"{k}={v}\""),
            );
        }
    }
}

/// A `Destination`: host (not `*`), subset name, port.
fn destination(e: &mut Errs, p: &Path, d: &Destination) {
    let hp = p.f("host");
    if d.host.is_empty() {
        e.add(&hp, "destination host is required");
    } else if d.host == "*" {
        e.add(&hp, format!("invalid destination host {}", d.host));
    } else {
        e.check(&hp, names::wildcard_domain(&d.host));
    }
    if let Some(subset) = &d.subset {
        e.check(&p.f("subset"), subset_name(subset));
    }
    if let Some(port) = &d.port {
        e.check(
            &p.f("port").f("number"),
            names::port(i64::from(port.number)),
        );
    }
}

fn subset_name(name: &str) -> names::Check {
    if name.is_empty() {
        return Err("subset name cannot be empty".into());
    }
    if !names::is_dns1123_label(name) {
        return Err(format!("subset name is invalid: {name}"));
    }
    Ok(())
}

/// Gateway references in a VirtualService: `ns/name`, or a legacy (possibly dotted) name.
fn gateway_names(e: &mut Errs, p: &Path, field: &str, list: &[String]) {
    for (i, g) in list.iter().enumerate() {
        let gp = p.i(field, i);
        match g.split_once('/') {
            None => e.check(&gp, names::fqdn(g)),
            Some((ns, name)) => {
                if ns.is_empty() || name.is_empty() {
                    e.add(&gp, "config namespace and gateway name cannot be empty");
                    continue;
                }
                if !names::is_dns1123_label(ns) {
                    e.add(&gp, format!("invalid value for namespace: {ns:?}"));
                }
                if !names::is_dns1123_label(name) {
                    e.add(&gp, format!("invalid value for gateway name: {name:?}"));
                }
            }
        }
    }
}

/// Istio's `validatePercentage`: 0, or within [0.0001, 100].
fn percentage(e: &mut Errs, p: &Path, pct: &Option<Percent>) {
    if let Some(pct) = pct {
        let v = pct.value;
        if !(0.0..=100.0).contains(&v) || (v > 0.0 && v < 0.0001) {
            e.add(
                &p.f("value"),
                format!("percentage {v} is neither 0.0, nor in range [0.0001, 100.0]"),
            );
        }
    }
}

fn duration(e: &mut Errs, p: &Path, d: &Option<crate::duration::Duration>) {
    if let Some(d) = d {
        e.check(p, names::duration(d));
    }
}

// ---------------------------------------------------------------- VirtualService

pub(super) fn virtual_service(e: &mut Errs, p: &Path, meta: &Meta, vs: &VirtualService) {
    // A VirtualService without hosts is a delegate, reachable only from a root route's
    // `delegate`; gateways, TLS and TCP routes make no sense there.
    let is_delegate = vs.hosts.is_empty();
    if is_delegate {
        if !vs.gateways.is_empty() {
            e.add(
                &p.f("gateways"),
                "delegate virtual service must have no gateways specified",
            );
        }
        if !vs.tls.is_empty() {
            e.add(
                &p.f("tls"),
                "delegate virtual service must have no tls route specified",
            );
        }
        if !vs.tcp.is_empty() {
            e.add(
                &p.f("tcp"),
                "delegate virtual service must have no tcp route specified",
            );
        }
    }
    gateway_names(e, p, "gateways", &vs.gateways);
    // Bound to gateways only (no `mesh` among them) vs. applying to sidecars.
    let applies_to_gateway =
        !vs.gateways.is_empty() && !vs.gateways.iter().any(|g| g == MESH_GATEWAY);
    let applies_to_mesh = !applies_to_gateway;

    if !applies_to_gateway {
        for (ri, r) in vs.http.iter().enumerate() {
            for (mi, m) in r.matches.iter().enumerate() {
                let mp = p.i("http", ri).i("match", mi);
                for (field, map) in [
                    ("headers", &m.headers),
                    ("withoutHeaders", &m.without_headers),
                ] {
                    for key in map.keys().filter(|k| names::is_jwt_claim_route(k)) {
                        e.add(&mp.k(field, key), format!("JWT claim based routing (key: {key}) is only supported for gateway, found no gateways: {:?}", vs.gateways));
                    }
                }
            }
        }
    }

    let sni = vs
        .tls
        .iter()
        .any(|t| t.matches.iter().any(|m| !m.sni_hosts.is_empty()));
    let mut all_hosts_valid = true;
    for (i, h) in vs.hosts.iter().enumerate() {
        let hp = p.i("hosts", i);
        let res = if applies_to_gateway {
            names::wildcard_domain_for_gateway(sni, h)
        } else {
            names::wildcard_domain(h)
        };
        match res {
            Err(m) => {
                // An IP address is an acceptable host (matched against the authority).
                if !names::is_ip(h) {
                    e.add(&hp, m);
                    all_hosts_valid = false;
                }
            }
            Ok(()) if applies_to_mesh && h == "*" => {
                e.add(
                    &hp,
                    "wildcard host * is not allowed for virtual services bound to the mesh gateway",
                );
                all_hosts_valid = false;
            }
            Ok(()) => {}
        }
    }
    if all_hosts_valid {
        for i in 0..vs.hosts.len() {
            for j in i + 1..vs.hosts.len() {
                if names::hosts_match(&vs.hosts[i], &vs.hosts[j]) {
                    e.add(
                        &p.i("hosts", j),
                        format!(
                            "duplicate hosts in virtual service: {} & {}",
                            vs.hosts[i], vs.hosts[j]
                        ),
                    );
                }
            }
        }
    }

    if vs.http.is_empty() && vs.tcp.is_empty() && vs.tls.is_empty() {
        e.add(p, "http, tcp or tls must be provided in virtual service");
    }
    for (i, r) in vs.http.iter().enumerate() {
        http_route(e, &p.i("http", i), r, is_delegate);
    }
    for (i, r) in vs.tls.iter().enumerate() {
        tls_route(e, &p.i("tls", i), r, vs, applies_to_gateway);
    }
    for (i, r) in vs.tcp.iter().enumerate() {
        tcp_route(e, &p.i("tcp", i), r);
    }
    export_to(e, p, &meta.namespace, &vs.export_to, false, false);
}

fn http_route(e: &mut Errs, p: &Path, r: &HttpRoute, in_delegate: bool) {
    // Root routes (with `delegate`) hand everything to the delegate VirtualService.
    let is_root = !in_delegate && r.delegate.is_some();
    if is_root {
        if r.redirect.is_some() {
            e.add(
                &p.f("redirect"),
                format!(
                    "root HTTP route {} must not specify redirect",
                    r.name.as_deref().unwrap_or("")
                ),
            );
        }
        if !r.route.is_empty() {
            e.add(
                &p.f("route"),
                format!(
                    "root HTTP route {} must not specify route",
                    r.name.as_deref().unwrap_or("")
                ),
            );
        }
        if r.direct_response.is_some() {
            e.add(
                &p.f("directResponse"),
                format!(
                    "root HTTP route {} must not specify directResponse",
                    r.name.as_deref().unwrap_or("")
                ),
            );
        }
    } else {
        if in_delegate && r.delegate.is_some() {
            e.add(
                &p.f("delegate"),
                "delegate HTTP route cannot contain delegate",
            );
        }
        if r.redirect.is_some() {
            if !r.route.is_empty() {
                e.add(
                    &p.f("redirect"),
                    "HTTP route cannot contain both route and redirect",
                );
            }
            if r.fault.is_some() {
                e.add(
                    &p.f("redirect"),
                    "HTTP route cannot contain both fault and redirect",
                );
            }
            if r.rewrite.is_some() {
                e.add(
                    &p.f("redirect"),
                    "HTTP route rule cannot contain both rewrite and redirect",
                );
            }
            if r.direct_response.is_some() {
                e.add(
                    &p.f("redirect"),
                    "HTTP route cannot contain both redirect and directResponse",
                );
            }
        } else if r.direct_response.is_some() {
            if !r.route.is_empty() {
                e.add(
                    &p.f("directResponse"),
                    "HTTP route cannot contain both route and directResponse",
                );
            }
            if r.fault.is_some() {
                e.add(
                    &p.f("directResponse"),
                    "HTTP route cannot contain both fault and directResponse",
                );
            }
            if r.rewrite.is_some() {
                e.add(
                    &p.f("directResponse"),
                    "HTTP route rule cannot contain both rewrite and directResponse",
                );
            }
        } else if r.route.is_empty() && r.delegate.is_none() {
            e.add(
                &p.f("route"),
                "HTTP route, redirect or directResponse is required",
            );
        }
    }

    for (i, m) in r.matches.iter().enumerate() {
        http_match(e, &p.i("match", i), m, in_delegate || is_root);
    }

    if let Some(h) = &r.headers {
        headers(e, &p.f("headers"), h);
    }
    authority_rewrite(e, p, r);
    if let Some(c) = &r.cors_policy {
        cors(e, &p.f("corsPolicy"), c);
    }
    if let Some(f) = &r.fault {
        fault(e, &p.f("fault"), f);
    }
    if let Some(v) = r.mirror_percent {
        if v > 100 {
            e.add(
                &p.f("mirrorPercent"),
                format!("mirror_percent must have a max value of 100 (it has {v})"),
            );
        }
    }
    if let Some(pct) = &r.mirror_percentage {
        let v = pct.value;
        if !(0.0..=100.0).contains(&v) {
            e.add(
                &p.f("mirrorPercentage").f("value"),
                format!("mirror_percentage must be in range 0..100 (it has {v})"),
            );
        }
    }
    if let Some(m) = &r.mirror {
        destination(e, &p.f("mirror"), m);
        if !r.mirrors.is_empty() {
            e.add(&p.f("mirrors"), "mirror and mirrors cannot be set together");
        }
    }
    for (i, m) in r.mirrors.iter().enumerate() {
        let mp = p.i("mirrors", i);
        destination(e, &mp.f("destination"), &m.destination);
        if let Some(pct) = &m.percentage {
            let v = pct.value;
            if !(0.0..=100.0).contains(&v) {
                e.add(
                    &mp.f("percentage").f("value"),
                    format!("mirror percentage must be in range 0..100 (it has {v})"),
                );
            }
        }
    }
    if let Some(rd) = &r.redirect {
        redirect(e, &p.f("redirect"), rd);
    }
    if let Some(dr) = &r.direct_response {
        direct_response(e, &p.f("directResponse"), dr);
    }
    if let Some(rt) = &r.retries {
        retries(e, &p.f("retries"), rt);
    }
    if let Some(rw) = &r.rewrite {
        rewrite(e, &p.f("rewrite"), rw);
    }
    http_route_destinations(e, p, &r.route);
    if let Some(d) = &r.delegate {
        let dp = p.f("delegate");
        if d.name.is_empty() {
            e.add(&dp.f("name"), "delegate name is required");
        } else if !names::is_k8s_dns1123_subdomain(&d.name) {
            e.add(&dp.f("name"), format!("invalid delegate name {:?}", d.name));
        }
        if let Some(ns) = &d.namespace {
            if !ns.is_empty() && !names::is_k8s_dns1123_label(ns) {
                e.add(
                    &dp.f("namespace"),
                    format!("invalid delegate namespace {ns:?}"),
                );
            }
        }
    }
    // `timeout` is a non-negative Duration by construction; 0 disables the timeout.
}

fn string_match_regex(e: &mut Errs, p: &Path, sm: &StringMatch, delegating: bool, what: &str) {
    if let StringMatch::Regex(re) = sm {
        if delegating {
            e.add(
                p,
                format!("{what} match does not support regex match for delegating"),
            );
        } else {
            e.check(p, names::regex(re));
        }
    }
}

fn http_match(e: &mut Errs, p: &Path, m: &HttpMatchRequest, delegating: bool) {
    for (field, map) in [
        ("headers", &m.headers),
        ("withoutHeaders", &m.without_headers),
    ] {
        for (name, sm) in map {
            let hp = p.k(field, name);
            if !names::is_jwt_claim_route(name) {
                e.check(&hp, names::header_name(name));
            }
            string_match_regex(e, &hp, sm, delegating, "header");
        }
    }
    for (field, sm) in [
        ("uri", &m.uri),
        ("scheme", &m.scheme),
        ("method", &m.method),
        ("authority", &m.authority),
    ] {
        if let Some(sm) = sm {
            string_match_regex(e, &p.f(field), sm, delegating, field);
        }
    }
    for (name, sm) in &m.query_params {
        string_match_regex(e, &p.k("queryParams", name), sm, delegating, "query param");
    }
    if let Some(port) = m.port {
        // 0 means unset in the protobuf encoding.
        if port != 0 {
            e.check(&p.f("port"), names::port(i64::from(port)));
        }
    }
    labels(e, p, "sourceLabels", &m.source_labels);
    gateway_names(e, p, "gateways", &m.gateways);
    if let Some(ns) = &m.source_namespace {
        if !ns.is_empty() && !names::is_dns1123_label(ns) {
            e.add(
                &p.f("sourceNamespace"),
                format!("sourceNamespace match {ns} is invalid"),
            );
        }
    }
}

fn is_internal_header(name: &str) -> bool {
    name.starts_with(':') || name.eq_ignore_ascii_case("host")
}

fn is_authority_header(name: &str) -> bool {
    name.eq_ignore_ascii_case(":authority") || name.eq_ignore_ascii_case("host")
}

/// Header manipulation. Request add/set may target the authority (validated separately);
/// removal and response headers may not touch `host` or pseudo-headers.
fn headers(e: &mut Errs, p: &Path, h: &Headers) {
    if let Some(req) = &h.request {
        let rp = p.f("request");
        for field in ["set", "add"] {
            let map = if field == "set" { &req.set } else { &req.add };
            for (name, value) in map {
                let hp = rp.k(field, name);
                if name.is_empty() {
                    e.add(&hp, "header name cannot be empty");
                } else if is_internal_header(name) && !is_authority_header(name) {
                    e.add(
                        &hp,
                        format!("invalid header {name:?}: header cannot have \":\" prefix"),
                    );
                }
                e.check(&hp, names::header_value(value));
            }
        }
        for (i, name) in req.remove.iter().enumerate() {
            e.check(&rp.i("remove", i), header_operation_name(name));
        }
    }
    if let Some(resp) = &h.response {
        let rp = p.f("response");
        for field in ["set", "add"] {
            let map = if field == "set" { &resp.set } else { &resp.add };
            for (name, value) in map {
                let hp = rp.k(field, name);
                e.check(&hp, header_operation_name(name));
                e.check(&hp, names::header_value(value));
            }
        }
        for (i, name) in resp.remove.iter().enumerate() {
            e.check(&rp.i("remove", i), header_operation_name(name));
        }
    }
}

fn header_operation_name(name: &str) -> names::Check {
    if name.is_empty() {
        return Err("header name cannot be empty".into());
    }
    if name.eq_ignore_ascii_case("host") {
        return Err(format!("invalid header {name:?}: cannot set Host header"));
    }
    if is_internal_header(name) {
        return Err(format!(
            "invalid header {name:?}: header cannot have \":\" prefix"
        ));
    }
    Ok(())
}

/// The authority may be rewritten in one place only (rewrite.authority or one header op).
fn authority_rewrite(e: &mut Errs, p: &Path, r: &HttpRoute) {
    let mut current = r
        .rewrite
        .as_ref()
        .and_then(|rw| rw.authority.clone())
        .filter(|a| !a.is_empty());
    let Some(req) = r.headers.as_ref().and_then(|h| h.request.as_ref()) else {
        return;
    };
    for (field, map) in [("set", &req.set), ("add", &req.add)] {
        for (k, v) in map.iter().filter(|(k, _)| is_authority_header(k)) {
            if let Some(cur) = &current {
                e.add(&p.f("headers").f("request").k(field, k), format!("authority header cannot be set multiple times: have {cur:?}, attempting to set {v:?}"));
                return;
            }
            current = Some(v.clone());
        }
    }
}

const SUPPORTED_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE",
];

fn cors_header_name(name: &str) -> names::Check {
    if name == "*" {
        return Ok(());
    }
    names::header_name(name)
}

fn cors(e: &mut Errs, p: &Path, c: &CorsPolicy) {
    for (i, o) in c.allow_origins.iter().enumerate() {
        let op = p.i("allowOrigins", i);
        let s = match o {
            StringMatch::Exact(s) | StringMatch::Prefix(s) | StringMatch::Regex(s) => s,
        };
        if s.is_empty() {
            e.add(&op, "'' is not a valid match type for CORS allow origins");
        } else if let StringMatch::Regex(re) = o {
            e.check(&op, names::regex(re));
        }
    }
    for (i, o) in c.allow_origin.iter().enumerate() {
        if o.is_empty() {
            e.add(
                &p.i("allowOrigin", i),
                "'' is not a valid CORS allow origin",
            );
        }
    }
    for (i, m) in c.allow_methods.iter().enumerate() {
        if !SUPPORTED_METHODS.contains(&m.as_str()) {
            e.add(
                &p.i("allowMethods", i),
                format!("{m:?} is not a supported HTTP method"),
            );
        }
    }
    for (i, h) in c.allow_headers.iter().enumerate() {
        e.check(&p.i("allowHeaders", i), cors_header_name(h));
    }
    for (i, h) in c.expose_headers.iter().enumerate() {
        e.check(&p.i("exposeHeaders", i), cors_header_name(h));
    }
    if let Some(age) = &c.max_age {
        let ap = p.f("maxAge");
        e.check(&ap, names::duration(age));
        if age.as_std().subsec_nanos() > 0 {
            e.add(
                &ap,
                "max_age duration is accurate only to seconds precision",
            );
        }
    }
    if let Some(u) = &c.unmatched_preflights {
        if !matches!(u.as_str(), "UNSPECIFIED" | "FORWARD" | "IGNORE") {
            e.add(
                &p.f("unmatchedPreflights"),
                format!("invalid value {u:?}: one of UNSPECIFIED, FORWARD, IGNORE"),
            );
        }
    }
}

fn fault(e: &mut Errs, p: &Path, f: &HttpFaultInjection) {
    if f.abort.is_none() && f.delay.is_none() {
        e.add(p, "HTTP fault injection must have an abort and/or a delay");
    }
    if let Some(a) = &f.abort {
        let ap = p.f("abort");
        percentage(e, &ap.f("percentage"), &a.percentage);
        let kinds = [
            a.http_status.is_some(),
            a.grpc_status.is_some(),
            a.http2_error.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() > 1 {
            e.add(
                &ap,
                "only one of httpStatus, grpcStatus or http2Error may be set",
            );
        }
        if let Some(s) = a.http_status {
            if !(200..=599).contains(&s) {
                e.add(
                    &ap.f("httpStatus"),
                    format!("HTTP status {s} is not in range 200-599"),
                );
            }
        }
        if let Some(g) = &a.grpc_status {
            if !names::is_grpc_status(g) {
                e.add(&ap.f("grpcStatus"), format!("gRPC status {g:?} is not supported. See https://github.com/grpc/grpc/blob/master/doc/statuscodes.md for a list of supported codes, for example 'NOT_FOUND'"));
            }
        }
        if a.http2_error.is_some() {
            e.add(
                &ap.f("http2Error"),
                "HTTP/2 abort fault injection not supported yet",
            );
        }
    }
    if let Some(d) = &f.delay {
        let dp = p.f("delay");
        percentage(e, &dp.f("percentage"), &d.percentage);
        if let Some(pc) = d.percent {
            if !(0..=100).contains(&pc) {
                e.add(
                    &dp.f("percent"),
                    format!("percentage {pc} is not in range 0..100"),
                );
            }
        }
        if d.fixed_delay.is_some() && d.exponential_delay.is_some() {
            e.add(&dp, "only one of fixedDelay or exponentialDelay may be set");
        }
        duration(e, &dp.f("fixedDelay"), &d.fixed_delay);
        if let Some(x) = &d.exponential_delay {
            e.check(&dp.f("exponentialDelay"), names::duration(x));
            e.add(
                &dp.f("exponentialDelay"),
                "exponentialDelay not supported yet",
            );
        }
    }
}

fn redirect(e: &mut Errs, p: &Path, r: &HttpRedirect) {
    let empty = |s: &Option<String>| s.as_deref().unwrap_or("").is_empty();
    if empty(&r.uri)
        && empty(&r.authority)
        && r.port.is_none()
        && r.derive_port.is_none()
        && empty(&r.scheme)
    {
        e.add(p, "redirect must specify URI, authority, scheme, or port");
    }
    if r.port.is_some() && r.derive_port.is_some() {
        e.add(&p.f("port"), "only one of port or derivePort may be set");
    }
    if let Some(code) = r.redirect_code {
        if code != 0 && !(300..=399).contains(&code) {
            e.add(
                &p.f("redirectCode"),
                format!("{code} is not a valid redirect code, must be 3xx"),
            );
        }
    }
    if let Some(s) = &r.scheme {
        if !s.is_empty() && s != "http" && s != "https" {
            e.add(
                &p.f("scheme"),
                "invalid redirect scheme, must be \"http\" or \"https\"",
            );
        }
    }
    if let Some(port) = r.port {
        e.check(&p.f("port"), names::port(i64::from(port)));
    }
}

fn direct_response(e: &mut Errs, p: &Path, d: &HttpDirectResponse) {
    if !(200..=599).contains(&d.status) {
        e.add(
            &p.f("status"),
            format!("HTTP status {} is not in range 200-599", d.status),
        );
    }
    if let Some(body) = &d.body {
        let size = match body {
            HttpBody::String(s) | HttpBody::Bytes(s) => s.len(),
        };
        if size > 1024 * 1024 {
            e.add(&p.f("body"), "large direct_responses may impact control plane performance, must be less than 1MB");
        }
    }
}

const RETRY_ON_POLICIES: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "envoy-ratelimited",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

fn retries(e: &mut Errs, p: &Path, r: &HttpRetry) {
    if r.attempts < 0 {
        e.add(&p.f("attempts"), "attempts cannot be negative");
    }
    let retry_on = r.retry_on.as_deref().unwrap_or("");
    if r.attempts == 0
        && (r.per_try_timeout.is_some()
            || !retry_on.is_empty()
            || r.retry_remote_localities.is_some())
    {
        e.add(
            &p.f("attempts"),
            "http retry policy configured when attempts are set to 0 (disabled)",
        );
    }
    duration(e, &p.f("perTryTimeout"), &r.per_try_timeout);
    if !retry_on.is_empty() {
        for policy in retry_on.split(',') {
            let is_status = policy.parse::<u32>().is_ok_and(names::is_known_http_status);
            if !is_status && !RETRY_ON_POLICIES.contains(&policy) {
                e.add(
                    &p.f("retryOn"),
                    format!("{policy:?} is not a valid retryOn policy"),
                );
            }
        }
    }
}

fn rewrite(e: &mut Errs, p: &Path, r: &HttpRewrite) {
    let uri = r.uri.as_deref().unwrap_or("");
    let authority = r.authority.as_deref().unwrap_or("");
    if !uri.is_empty() && r.uri_regex_rewrite.is_some() {
        e.add(p, "rewrite may only contain one of URI or UriRegexRewrite");
    }
    if uri.is_empty() && r.uri_regex_rewrite.is_none() && authority.is_empty() {
        e.add(p, "rewrite must specify at least one of URI, UriRegexRewrite, or authority. Only one of URI or UriRegexRewrite may be specified");
    }
    if let Some(rr) = &r.uri_regex_rewrite {
        let rp = p.f("uriRegexRewrite");
        if rr.pattern.is_empty() || rr.rewrite.is_empty() {
            e.add(
                &rp,
                "UriRegexRewrite requires both Rewrite and Match fields to be specified",
            );
        } else {
            e.check(&rp.f("match"), names::regex(&rr.pattern));
        }
    }
}

/// Weights. Each in 0..=100; with more than one destination they must add up to 100
/// (a missing weight counts as 0). A single destination may omit its weight (it gets all
/// the traffic). Current Istio only rejects a zero total and normalises other sums; we keep
/// the documented "sum of weights must be 100" contract so a typo is caught before it skews
/// traffic.
fn weights(e: &mut Errs, p: &Path, ws: &[Option<i32>]) {
    let mut total: i64 = 0;
    for (i, w) in ws.iter().enumerate() {
        let w = w.unwrap_or(0);
        if !(0..=100).contains(&w) {
            e.add(
                &p.i("route", i).f("weight"),
                format!("weight {w} must be in range 0..100"),
            );
        }
        total += i64::from(w);
    }
    if ws.len() > 1 && total != 100 {
        e.add(
            &p.f("route"),
            format!("total destination weight {total} != 100"),
        );
    }
}

fn http_route_destinations(e: &mut Errs, p: &Path, route: &[HttpRouteDestination]) {
    for (i, d) in route.iter().enumerate() {
        let dp = p.i("route", i);
        destination(e, &dp.f("destination"), &d.destination);
        if let Some(h) = &d.headers {
            headers(e, &dp.f("headers"), h);
        }
    }
    let ws: Vec<Option<i32>> = route.iter().map(|d| d.weight).collect();
    weights(e, p, &ws);
}

fn route_destinations(e: &mut Errs, p: &Path, route: &[RouteDestination]) {
    for (i, d) in route.iter().enumerate() {
        destination(e, &p.i("route", i).f("destination"), &d.destination);
    }
    let ws: Vec<Option<i32>> = route.iter().map(|d| d.weight).collect();
    weights(e, p, &ws);
}

fn tls_route(e: &mut Errs, p: &Path, r: &TlsRoute, vs: &VirtualService, gateway: bool) {
    if r.matches.is_empty() {
        e.add(
            &p.f("match"),
            "TLS route must have at least one match condition",
        );
    }
    for (i, m) in r.matches.iter().enumerate() {
        let mp = p.i("match", i);
        if m.sni_hosts.is_empty() {
            e.add(
                &mp.f("sniHosts"),
                "TLS match must have at least one SNI host",
            );
        }
        for (j, sni) in m.sni_hosts.iter().enumerate() {
            let sp = mp.i("sniHosts", j);
            let res = if gateway {
                names::wildcard_domain_for_gateway(true, sni)
            } else {
                names::wildcard_domain(sni)
            };
            if let Err(msg) = res {
                // An IP goes against the SNI spec but Istio only warns.
                if !names::is_ip(sni) {
                    e.add(&sp, msg);
                }
                continue;
            }
            if !vs.hosts.iter().any(|h| names::host_subset_of(sni, h)) {
                e.add(&sp, format!("SNI host {sni:?} is not a compatible subset of any of the virtual service hosts: [{}]", vs.hosts.join(", ")));
            }
        }
        for (j, s) in m.destination_subnets.iter().enumerate() {
            e.check(&mp.i("destinationSubnets", j), names::ip_or_cidr(s));
        }
        if let Some(port) = m.port.filter(|p| *p != 0) {
            e.check(&mp.f("port"), names::port(i64::from(port)));
        }
        labels(e, &mp, "sourceLabels", &m.source_labels);
        gateway_names(e, &mp, "gateways", &m.gateways);
    }
    if r.route.is_empty() {
        e.add(&p.f("route"), "TLS route is required");
    }
    route_destinations(e, p, &r.route);
}

fn tcp_route(e: &mut Errs, p: &Path, r: &TcpRoute) {
    for (i, m) in r.matches.iter().enumerate() {
        let mp = p.i("match", i);
        for (j, s) in m.destination_subnets.iter().enumerate() {
            e.check(&mp.i("destinationSubnets", j), names::ip_or_cidr(s));
        }
        if let Some(s) = &m.source_subnet {
            if !s.is_empty() {
                e.check(&mp.f("sourceSubnet"), names::ip_or_cidr(s));
            }
        }
        if let Some(port) = m.port.filter(|p| *p != 0) {
            e.check(&mp.f("port"), names::port(i64::from(port)));
        }
        labels(e, &mp, "sourceLabels", &m.source_labels);
        gateway_names(e, &mp, "gateways", &m.gateways);
    }
    if r.route.is_empty() {
        e.add(&p.f("route"), "TCP route is required");
    }
    route_destinations(e, p, &r.route);
}

// ---------------------------------------------------------------- DestinationRule

pub(super) fn destination_rule(e: &mut Errs, p: &Path, meta: &Meta, dr: &DestinationRule) {
    e.check(
        &p.f("host"),
        names::wildcard_domain(&dr.host).map_err(|m| {
            if dr.host.is_empty() {
                "host is required".to_string()
            } else {
                m
            }
        }),
    );
    if let Some(tp) = &dr.traffic_policy {
        traffic_policy(e, &p.f("trafficPolicy"), tp);
    }
    let mut seen = HashSet::new();
    for (i, s) in dr.subsets.iter().enumerate() {
        let sp = p.i("subsets", i);
        if !seen.insert(s.name.as_str()) {
            e.add(&sp.f("name"), format!("duplicate subset names: {}", s.name));
        }
        e.check(&sp.f("name"), subset_name(&s.name));
        labels(e, &sp, "labels", &s.labels);
        if let Some(tp) = &s.traffic_policy {
            traffic_policy(e, &sp.f("trafficPolicy"), tp);
        }
    }
    export_to(
        e,
        p,
        &meta.namespace,
        &dr.export_to,
        false,
        dr.workload_selector.is_some(),
    );
    workload_selector(e, p, &dr.workload_selector);
}

fn traffic_policy(e: &mut Errs, p: &Path, tp: &TrafficPolicy) {
    if tp.load_balancer.is_none()
        && tp.connection_pool.is_none()
        && tp.outlier_detection.is_none()
        && tp.tls.is_none()
        && tp.port_level_settings.is_empty()
        && tp.tunnel.is_none()
        && tp.proxy_protocol.is_none()
        && tp.retry_budget.is_none()
    {
        e.add(p, "traffic policy must have at least one field");
        return;
    }
    if tp.tunnel.is_some() && tp.proxy_protocol.is_some() {
        e.add(p, "tunnel and proxyProtocol must not be set together");
        return;
    }
    if let Some(o) = &tp.outlier_detection {
        outlier_detection(e, &p.f("outlierDetection"), o);
    }
    if let Some(c) = &tp.connection_pool {
        connection_pool(e, &p.f("connectionPool"), c);
    }
    if let Some(lb) = &tp.load_balancer {
        load_balancer(e, &p.f("loadBalancer"), lb);
    }
    if let Some(t) = &tp.tls {
        client_tls(e, &p.f("tls"), t);
    }
    let mut ports = HashSet::new();
    for (i, pl) in tp.port_level_settings.iter().enumerate() {
        let pp = p.i("portLevelSettings", i);
        match &pl.port {
            None => e.add(&pp.f("port"), "portTrafficPolicy must have valid port"),
            Some(sel) => {
                e.check(
                    &pp.f("port").f("number"),
                    names::port(i64::from(sel.number)),
                );
                // Two settings for one port would be applied in an unspecified order.
                if !ports.insert(sel.number) {
                    e.add(
                        &pp.f("port").f("number"),
                        format!("duplicate port level settings for port {}", sel.number),
                    );
                }
            }
        }
        if pl.outlier_detection.is_none()
            && pl.connection_pool.is_none()
            && pl.load_balancer.is_none()
            && pl.tls.is_none()
        {
            e.add(&pp, "port traffic policy must have at least one field");
            continue;
        }
        if let Some(o) = &pl.outlier_detection {
            outlier_detection(e, &pp.f("outlierDetection"), o);
        }
        if let Some(c) = &pl.connection_pool {
            connection_pool(e, &pp.f("connectionPool"), c);
        }
        if let Some(lb) = &pl.load_balancer {
            load_balancer(e, &pp.f("loadBalancer"), lb);
        }
        if let Some(t) = &pl.tls {
            client_tls(e, &pp.f("tls"), t);
        }
    }
    if let Some(t) = &tp.tunnel {
        tunnel(e, &p.f("tunnel"), t);
    }
    if let Some(pp) = &tp.proxy_protocol {
        if let Some(v) = pp.get("version") {
            let ok = v.as_str().is_some_and(|s| matches!(s, "V1" | "V2"))
                || v.as_i64().is_some_and(|n| n == 0 || n == 1);
            if !ok {
                e.add(
                    &p.f("proxyProtocol").f("version"),
                    format!("proxy protocol version is invalid: {v}"),
                );
            }
        }
    }
}

fn tunnel(e: &mut Errs, p: &Path, t: &serde_json::Value) {
    let proto = t.get("protocol").and_then(|v| v.as_str()).unwrap_or("");
    if !proto.is_empty() && proto != "CONNECT" && proto != "POST" {
        e.add(
            &p.f("protocol"),
            "tunnel protocol must be \"CONNECT\" or \"POST\"",
        );
    }
    let host = t.get("targetHost").and_then(|v| v.as_str()).unwrap_or("");
    if names::fqdn(host).is_err() && !names::is_ip(host) {
        e.add(
            &p.f("targetHost"),
            format!("tunnel target host must be valid FQDN or IP address: {host:?}"),
        );
    }
    let port = t.get("targetPort").and_then(|v| v.as_i64()).unwrap_or(0);
    if let Err(m) = names::port(port) {
        e.add(
            &p.f("targetPort"),
            format!("tunnel target port is invalid: {m}"),
        );
    }
}

fn outlier_detection(e: &mut Errs, p: &Path, o: &OutlierDetection) {
    duration(e, &p.f("baseEjectionTime"), &o.base_ejection_time);
    duration(e, &p.f("interval"), &o.interval);
    if !o.split_external_local_origin_errors.unwrap_or(false)
        && o.consecutive_local_origin_failures.unwrap_or(0) > 0
    {
        e.add(&p.f("consecutiveLocalOriginFailures"), "outlier detection consecutive local origin failures is specified, but split external local origin errors is set to false");
    }
    for (field, v) in [
        ("maxEjectionPercent", o.max_ejection_percent),
        ("minHealthPercent", o.min_health_percent),
    ] {
        if let Some(v) = v {
            if !(0..=100).contains(&v) {
                e.add(
                    &p.f(field),
                    format!("percentage {v} is not in range 0..100"),
                );
            }
        }
    }
    if let Some(v) = o.consecutive_errors {
        if v < 0 {
            e.add(
                &p.f("consecutiveErrors"),
                "consecutive errors must be non-negative",
            );
        }
    }
}

pub(super) fn connection_pool(e: &mut Errs, p: &Path, c: &ConnectionPoolSettings) {
    if c.http.is_none() && c.tcp.is_none() {
        e.add(p, "connection pool must have at least one field");
        return;
    }
    if let Some(h) = &c.http {
        let hp = p.f("http");
        for (field, v, what) in [
            (
                "http1MaxPendingRequests",
                h.http1_max_pending_requests,
                "http1 max pending requests",
            ),
            (
                "http2MaxRequests",
                h.http2_max_requests,
                "http2 max requests",
            ),
            (
                "maxRequestsPerConnection",
                h.max_requests_per_connection,
                "max requests per connection",
            ),
            ("maxRetries", h.max_retries, "max retries"),
            (
                "maxConcurrentStreams",
                h.max_concurrent_streams,
                "max concurrent streams",
            ),
        ] {
            if v.is_some_and(|v| v < 0) {
                e.add(&hp.f(field), format!("{what} must be non-negative"));
            }
        }
        duration(e, &hp.f("idleTimeout"), &h.idle_timeout);
        if h.h2_upgrade_policy == Some(H2UpgradePolicy::Upgrade)
            && h.use_client_protocol == Some(true)
        {
            e.add(
                &hp.f("useClientProtocol"),
                "use client protocol must not be true when H2UpgradePolicy is UPGRADE",
            );
        }
    }
    if let Some(t) = &c.tcp {
        let tp = p.f("tcp");
        if t.max_connections.is_some_and(|v| v < 0) {
            e.add(
                &tp.f("maxConnections"),
                "max connections must be non-negative",
            );
        }
        duration(e, &tp.f("connectTimeout"), &t.connect_timeout);
        duration(
            e,
            &tp.f("maxConnectionDuration"),
            &t.max_connection_duration,
        );
        duration(e, &tp.f("idleTimeout"), &t.idle_timeout);
        if let Some(ka) = &t.tcp_keepalive {
            duration(e, &tp.f("tcpKeepalive").f("time"), &ka.time);
            duration(e, &tp.f("tcpKeepalive").f("interval"), &ka.interval);
        }
    }
}

/// Envoy's primality test for Maglev table sizes.
fn is_prime(x: u64) -> bool {
    if x != 0 && x < 4 {
        return true;
    }
    if x & 1 == 0 {
        return false;
    }
    let mut f = 3u64;
    while f.saturating_mul(f) <= x {
        if x.is_multiple_of(f) {
            return false;
        }
        f += 2;
    }
    true
}

fn load_balancer(e: &mut Errs, p: &Path, lb: &LoadBalancerSettings) {
    // `simple` and `consistentHash` are a protobuf oneof: Istio's decoder rejects both.
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        e.add(p, "only one of simple or consistentHash may be set");
    }
    if let Some(ch) = &lb.consistent_hash {
        let cp = p.f("consistentHash");
        let keys = [
            ch.http_header_name.is_some(),
            ch.http_cookie.is_some(),
            ch.use_source_ip.is_some(),
            ch.http_query_parameter_name.is_some(),
        ]
        .iter()
        .filter(|k| **k)
        .count();
        if keys != 1 {
            e.add(&cp, "exactly one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName must be set");
        }
        if let Some(c) = &ch.http_cookie {
            if c.name.is_empty() {
                e.add(
                    &cp.f("httpCookie").f("name"),
                    "name required for HttpCookie",
                );
            }
        }
        if ch.ring_hash.is_some() && ch.maglev.is_some() {
            e.add(&cp, "only one of ringHash or maglev may be set");
        }
        if ch.minimum_ring_size.is_some_and(|n| n != 0)
            && (ch.ring_hash.is_some() || ch.maglev.is_some())
        {
            e.add(
                &cp.f("minimumRingSize"),
                "only one of MinimumRingSize or Maglev/Ringhash can be specified",
            );
        }
        if let Some(m) = &ch.maglev {
            let tp = cp.f("maglev").f("tableSize");
            let size = m.table_size.unwrap_or(0);
            if size == 0 {
                e.add(&tp, "tableSize must be set for maglev");
            } else if size >= 5_000_011 {
                e.add(&tp, "tableSize must be less than 5000011 for maglev");
            } else if !is_prime(size) {
                e.add(&tp, "tableSize must be a prime number for maglev");
            }
        }
    }
    if let Some(l) = &lb.locality_lb_setting {
        locality_lb(e, &p.f("localityLbSetting"), l);
    }
    duration(e, &p.f("warmupDurationSecs"), &lb.warmup_duration_secs);
}

/// `localityLbSetting` stays untyped in the schema; check the rules Istio enforces.
fn locality_lb(e: &mut Errs, p: &Path, v: &serde_json::Value) {
    let arr = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_array())
            .map(Vec::as_slice)
            .unwrap_or(&[])
    };
    let distribute = arr("distribute");
    let failover = arr("failover");
    if !distribute.is_empty() && !failover.is_empty() {
        e.add(
            p,
            "can not simultaneously specify 'distribute' and 'failover'",
        );
        return;
    }
    for (i, d) in distribute.iter().enumerate() {
        let dp = p.i("distribute", i);
        let Some(to) = d.get("to").and_then(|t| t.as_object()) else {
            continue;
        };
        let mut total = 0i64;
        for (loc, w) in to {
            let w = w.as_i64().unwrap_or(-1);
            if !(1..=100).contains(&w) {
                e.add(
                    &dp.k("to", loc),
                    "locality weight must be in range [1, 100]",
                );
            }
            total += w;
        }
        if total != 100 {
            e.add(&dp.f("to"), format!("total locality weight {total} != 100"));
        }
    }
    for (i, f) in failover.iter().enumerate() {
        let from = f.get("from").and_then(|x| x.as_str()).unwrap_or("");
        let to = f.get("to").and_then(|x| x.as_str()).unwrap_or("");
        let fp = p.i("failover", i);
        if from == to {
            e.add(
                &fp,
                "locality lb failover settings must specify different regions",
            );
        }
        if from.contains('/') || to.contains('/') {
            e.add(&fp, "locality lb failover only specify region");
        }
        if from.contains('*') || to.contains('*') {
            e.add(
                &fp,
                "locality lb failover region should not contain '*' wildcard",
            );
        }
    }
}

fn client_tls(e: &mut Errs, p: &Path, t: &ClientTlsSettings) {
    let set = |s: &Option<String>| s.as_deref().is_some_and(|s| !s.is_empty());
    if t.insecure_skip_verify == Some(true) {
        if t.mode == ClientTlsMode::Simple
            && (set(&t.ca_certificates)
                || set(&t.credential_name)
                || !t.subject_alt_names.is_empty())
        {
            e.add(p, "cannot specify CaCertificates or CredentialName or SubjectAltNames when InsecureSkipVerify is set true");
        }
        if t.mode == ClientTlsMode::Mutual
            && (set(&t.ca_certificates) || !t.subject_alt_names.is_empty())
        {
            e.add(p, "cannot specify CaCertificates or SubjectAltNames when InsecureSkipVerify is set true");
        }
    }
    if matches!(t.mode, ClientTlsMode::Simple | ClientTlsMode::Mutual) && set(&t.credential_name) {
        // Credentials come from the named secret; inline file paths would be ignored.
        if set(&t.client_certificate)
            || set(&t.ca_certificates)
            || set(&t.private_key)
            || set(&t.ca_crl)
        {
            e.add(p, "cannot specify client certificates or CA certificate or CA CRL If credentialName is set");
        }
        return;
    }
    if t.mode == ClientTlsMode::Mutual {
        if !set(&t.client_certificate) {
            e.add(
                &p.f("clientCertificate"),
                "client certificate required for mutual tls",
            );
        }
        if !set(&t.private_key) {
            e.add(&p.f("privateKey"), "private key required for mutual tls");
        }
    }
}

// ---------------------------------------------------------------- Gateway

pub(super) fn gateway(e: &mut Errs, p: &Path, gw: &Gateway) {
    if gw.servers.is_empty() {
        e.add(&p.f("servers"), "gateway must have at least one server");
    }
    let mut port_names = HashSet::new();
    for (i, s) in gw.servers.iter().enumerate() {
        let sp = p.i("servers", i);
        server(e, &sp, s);
        if !port_names.insert(s.port.name.as_str()) {
            e.add(
                &sp.f("port").f("name"),
                format!(
                    "port names in servers must be unique: duplicate name {}",
                    s.port.name
                ),
            );
        }
    }
    labels(e, p, "selector", &gw.selector);
}

fn server(e: &mut Errs, p: &Path, s: &Server) {
    if s.hosts.is_empty() {
        e.add(
            &p.f("hosts"),
            "server config must contain at least one host",
        );
    }
    for (i, h) in s.hosts.iter().enumerate() {
        e.check(&p.i("hosts", i), namespace_slash_host(h, true));
    }
    let pp = p.f("port");
    let bind = s.bind.as_deref().unwrap_or("");
    let proto = Protocol::parse(&s.port.protocol);
    let mut port_ok = true;
    if proto.is_none() {
        port_ok = false;
        e.add(&pp.f("protocol"), format!("invalid protocol {:?}, supported protocols are HTTP, HTTP2, GRPC, GRPC-WEB, MONGO, REDIS, MYSQL, TCP, HTTPS, TLS", s.port.protocol));
    }
    if s.port.number > 0 || !bind.starts_with("unix://") {
        if let Err(m) = names::port(i64::from(s.port.number)) {
            port_ok = false;
            e.add(&pp.f("number"), m);
        }
    }
    if s.port.target_port.is_some_and(|t| t > 0) {
        port_ok = false;
        e.add(&pp.f("targetPort"), "targetPort has no impact on Gateways");
    }
    if s.port.name.is_empty() {
        port_ok = false;
        e.add(&pp.f("name"), "port name must be set");
    }
    if let Some(uds) = bind.strip_prefix("unix://") {
        e.check(&p.f("bind"), names::unix_address(uds));
        if s.port.number != 0 {
            e.add(
                &pp.f("number"),
                "port number must be 0 for unix domain socket",
            );
        }
    } else if !bind.is_empty() {
        e.check(&p.f("bind"), names::ip(bind));
    }
    if let Some(t) = &s.tls {
        server_tls(e, &p.f("tls"), t);
    }
    if let (true, Some(proto)) = (port_ok, proto) {
        match &s.tls {
            None if proto.is_tls() => e.add(
                &p.f("tls"),
                "server must have TLS settings for HTTPS/TLS protocols",
            ),
            Some(t) if !proto.is_tls() => {
                // A plain HTTP server may only carry `httpsRedirect` (mode defaults to
                // PASSTHROUGH), never certificates.
                let passthrough = matches!(
                    t.mode,
                    ServerTlsMode::Passthrough | ServerTlsMode::AutoPassthrough
                );
                let set = |s: &Option<String>| s.as_deref().is_some_and(|s| !s.is_empty());
                if proto.is_http() {
                    if !passthrough
                        || set(&t.ca_certificates)
                        || set(&t.private_key)
                        || set(&t.server_certificate)
                    {
                        e.add(
                            &p.f("tls"),
                            "server cannot have TLS settings for plain text HTTP ports",
                        );
                    }
                } else {
                    e.add(
                        &p.f("tls"),
                        "server cannot have TLS settings for non HTTPS/TLS ports",
                    );
                }
            }
            _ => {}
        }
    }
    if let Some(d) = &s.default_endpoint {
        if !d.is_empty() {
            e.check(&p.f("defaultEndpoint"), default_endpoint(d));
        }
    }
}

const TLS_VERSIONS: &[&str] = &["TLS_AUTO", "TLSV1_0", "TLSV1_1", "TLSV1_2", "TLSV1_3"];

pub(super) fn server_tls(e: &mut Errs, p: &Path, t: &ServerTlsSettings) {
    let set = |s: &Option<String>| s.as_deref().is_some_and(|s| !s.is_empty());
    for (field, v) in [
        ("minProtocolVersion", &t.min_protocol_version),
        ("maxProtocolVersion", &t.max_protocol_version),
    ] {
        if let Some(v) = v {
            if !TLS_VERSIONS.contains(&v.as_str()) {
                e.add(
                    &p.f(field),
                    format!(
                        "invalid TLS version {v:?}: one of {}",
                        TLS_VERSIONS.join(", ")
                    ),
                );
            }
        }
    }
    if t.mode == ServerTlsMode::IstioMutual {
        // ISTIO_MUTUAL uses the workload's own certificate.
        for (field, v, what) in [
            (
                "serverCertificate",
                &t.server_certificate,
                "server certificate",
            ),
            ("privateKey", &t.private_key, "private key"),
            ("caCertificates", &t.ca_certificates, "CA bundle"),
            ("credentialName", &t.credential_name, "credentialName"),
        ] {
            if set(v) {
                e.add(
                    &p.f(field),
                    format!("ISTIO_MUTUAL TLS cannot have associated {what}"),
                );
            }
        }
        return;
    }
    let has_credential =
        set(&t.credential_name) || !t.credential_names.is_empty() || !t.tls_certificates.is_empty();
    if matches!(
        t.mode,
        ServerTlsMode::Simple | ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual
    ) && has_credential
    {
        if set(&t.ca_crl) && set(&t.credential_name) {
            e.add(&p.f("caCrl"), "CRL is not supported with credentialName. CRL has to be specified in the credential");
        }
        return;
    }
    match t.mode {
        ServerTlsMode::Simple => {
            if !set(&t.server_certificate) {
                e.add(
                    &p.f("serverCertificate"),
                    "SIMPLE TLS requires a server certificate",
                );
            }
            if !set(&t.private_key) {
                e.add(&p.f("privateKey"), "SIMPLE TLS requires a private key");
            }
            if set(&t.ca_crl) {
                e.add(&p.f("caCrl"), "CRL is not supported with SIMPLE TLS");
            }
        }
        ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual => {
            if !set(&t.server_certificate) {
                e.add(
                    &p.f("serverCertificate"),
                    "MUTUAL TLS requires a server certificate",
                );
            }
            if !set(&t.private_key) {
                e.add(&p.f("privateKey"), "MUTUAL TLS requires a private key");
            }
            if !set(&t.ca_certificates) {
                e.add(
                    &p.f("caCertificates"),
                    "MUTUAL TLS requires a client CA bundle",
                );
            }
        }
        _ => {}
    }
}

/// `[namespace/]host` as Gateways and Sidecars spell hosts. Gateways also accept a bare
/// host (old style) and IPs.
fn namespace_slash_host(h: &str, is_gateway: bool) -> names::Check {
    let Some((ns, host)) = h.split_once('/') else {
        if is_gateway {
            return host_part(h, true);
        }
        return Err("host must be of form namespace/dnsName".into());
    };
    if ns.is_empty() || host.is_empty() {
        return Err("config namespace and dnsName in host entry cannot be empty".into());
    }
    let special = ns == "*" || ns == "." || (!is_gateway && ns == "~");
    if !special && !names::is_dns1123_label(ns) {
        let what = if is_gateway { "gateway" } else { "sidecar" };
        return Err(format!("invalid namespace value {ns:?} in {what}"));
    }
    host_part(host, is_gateway)
}

fn host_part(host: &str, is_gateway: bool) -> names::Check {
    if host != "*" && !host.contains('.') {
        return Err(format!("short names (non FQDN) are not allowed: {host:?}"));
    }
    if let Err(m) = names::wildcard_domain(host) {
        if !is_gateway || !names::is_ip(host) {
            return Err(m);
        }
    }
    names::partial_wildcard(host)
}

/// `127.0.0.1:PORT`, `0.0.0.0:PORT`, `[::1]:PORT`, `[::]:PORT`, `:PORT` or `unix://path`.
fn default_endpoint(d: &str) -> names::Check {
    if let Some(uds) = d.strip_prefix("unix://") {
        return names::unix_address(uds);
    }
    let Some((host, port)) = d.rsplit_once(':') else {
        return Err(format!("defaultEndpoint {d:?} is missing a port"));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if !matches!(host, "" | "127.0.0.1" | "0.0.0.0" | "::1" | "::") {
        return Err("sidecar: defaultEndpoint must be of form 127.0.0.1:<port>,0.0.0.0:<port>,[::1]:port,[::]:port,unix://filepath or unset".into());
    }
    match port.parse::<i64>() {
        Ok(n) => names::port(n),
        Err(_) => Err(format!("defaultEndpoint port ({port}) is not a number")),
    }
}

// ---------------------------------------------------------------- ServiceEntry & co

pub(super) fn service_entry(e: &mut Errs, p: &Path, meta: &Meta, se: &ServiceEntry) {
    workload_selector(e, p, &se.workload_selector);
    if se.workload_selector.is_some() && !se.endpoints.is_empty() {
        e.add(
            &p.f("workloadSelector"),
            "only one of WorkloadSelector or Endpoints is allowed in Service Entry",
        );
    }
    if se.hosts.is_empty() {
        e.add(&p.f("hosts"), "service entry must have at least one host");
    }
    for (i, h) in se.hosts.iter().enumerate() {
        let hp = p.i("hosts", i);
        if h == "*" {
            e.add(&hp, format!("invalid host {h}"));
        } else {
            e.check(&hp, names::wildcard_domain(h));
        }
    }
    let mut cidr = false;
    for (i, a) in se.addresses.iter().enumerate() {
        cidr |= a.contains('/');
        e.check(&p.i("addresses", i), names::ip_or_cidr(a));
    }
    if cidr && !matches!(se.resolution, Resolution::None | Resolution::Static) {
        e.add(
            &p.f("addresses"),
            "CIDR addresses are allowed only for NONE/STATIC resolution types",
        );
    }

    let mut port_names: BTreeSet<&str> = BTreeSet::new();
    let mut port_numbers = HashSet::new();
    for (i, sp) in se.ports.iter().enumerate() {
        let pp = p.i("ports", i);
        if !port_names.insert(sp.name.as_str()) {
            e.add(
                &pp.f("name"),
                format!("service entry port name {:?} already defined", sp.name),
            );
        }
        if !port_numbers.insert(sp.number) {
            e.add(
                &pp.f("number"),
                format!("service entry port {} already defined", sp.number),
            );
        }
        if let Some(t) = sp.target_port.filter(|t| *t != 0) {
            e.check(&pp.f("targetPort"), names::port(i64::from(t)));
        }
        e.check(&pp.f("name"), names::port_name(&sp.name));
        e.check(&pp.f("protocol"), names::protocol(&sp.protocol));
        e.check(&pp.f("number"), names::port(i64::from(sp.number)));
    }

    match se.resolution {
        Resolution::None => {
            if !se.endpoints.is_empty() {
                e.add(
                    &p.f("endpoints"),
                    "no endpoints should be provided for resolution type none",
                );
            }
        }
        Resolution::Static => {
            // Stricter than current Istio, which accepts an endpoint-less STATIC entry that
            // can never route anywhere.
            if se.endpoints.is_empty() && se.workload_selector.is_none() {
                e.add(
                    &p.f("endpoints"),
                    "endpoints or workloadSelector must be provided for resolution type STATIC",
                );
            }
            for (i, ep) in se.endpoints.iter().enumerate() {
                let epp = p.i("endpoints", i);
                workload_entry_fields(e, &epp, ep, Some(&port_names), false);
            }
        }
        Resolution::Dns | Resolution::DnsRoundRobin => {
            if se.endpoints.is_empty() {
                for (i, h) in se.hosts.iter().enumerate() {
                    if names::fqdn(h).is_err() {
                        e.add(&p.i("hosts", i), format!("hosts must be FQDN if no endpoints are provided for resolution mode {}", resolution_name(se.resolution)));
                    }
                }
            }
            if se.resolution == Resolution::DnsRoundRobin && se.endpoints.len() > 1 {
                e.add(
                    &p.f("endpoints"),
                    "there must only be 0 or 1 endpoint for resolution mode DNS_ROUND_ROBIN",
                );
            }
            for (i, ep) in se.endpoints.iter().enumerate() {
                let epp = p.i("endpoints", i);
                let ap = epp.f("address");
                if !names::is_ip(&ep.address) && names::fqdn(&ep.address).is_err() {
                    e.add(
                        &ap,
                        format!(
                            "endpoint address {:?} is not a valid FQDN or an IP address",
                            ep.address
                        ),
                    );
                }
                labels(e, &epp, "labels", &ep.labels);
                endpoint_ports(e, &epp, &ep.ports, Some(&port_names));
            }
        }
    }

    // Plain TCP cannot tell several hosts apart (no Host header, no SNI), unless the entry
    // only describes addresses (resolution NONE).
    if se.resolution != Resolution::None && se.hosts.len() > 1 {
        if let Some(i) = se.ports.iter().position(|sp| {
            Protocol::parse(&sp.protocol).is_none_or(|pr| !pr.is_http() && !pr.is_tls())
        }) {
            e.add(
                &p.i("ports", i).f("protocol"),
                "multiple hosts provided with non-HTTP, non-TLS ports",
            );
        }
    }
    export_to(e, p, &meta.namespace, &se.export_to, true, false);
}

fn resolution_name(r: Resolution) -> &'static str {
    match r {
        Resolution::None => "NONE",
        Resolution::Static => "STATIC",
        Resolution::Dns => "DNS",
        Resolution::DnsRoundRobin => "DNS_ROUND_ROBIN",
    }
}

fn endpoint_ports(
    e: &mut Errs,
    p: &Path,
    ports: &BTreeMap<String, u32>,
    service_ports: Option<&BTreeSet<&str>>,
) {
    for (name, port) in ports {
        let pp = p.k("ports", name);
        if let Some(sp) = service_ports {
            if !sp.contains(name.as_str()) {
                e.add(
                    &pp,
                    format!("endpoint port {name:?} is not defined by the service entry"),
                );
            }
        }
        e.check(&pp, names::port_name(name));
        e.check(&pp, names::port(i64::from(*port)));
    }
}

/// The fields of a WorkloadEntry, standalone or as a ServiceEntry endpoint. Hostnames are
/// allowed only where DNS resolution will happen (standalone entries, DNS ServiceEntries).
fn workload_entry_fields(
    e: &mut Errs,
    p: &Path,
    we: &WorkloadEntry,
    service_ports: Option<&BTreeSet<&str>>,
    allow_fqdn: bool,
) {
    let ap = p.f("address");
    let addr = we.address.as_str();
    if addr.is_empty() {
        if we.network.as_deref().unwrap_or("").is_empty() {
            e.add(&ap, "address is required");
            return;
        }
    } else if let Some(uds) = addr.strip_prefix("unix://") {
        e.check(&ap, names::unix_address(uds));
        if !we.ports.is_empty() {
            e.add(
                &p.f("ports"),
                format!("unix endpoint {addr} must not include ports"),
            );
        }
        if let Some(sp) = service_ports {
            if sp.len() != 1 {
                e.add(&ap, "exactly 1 service port required for unix endpoints");
            }
        }
    } else if !names::is_ip(addr) {
        if !allow_fqdn {
            e.add(
                &ap,
                format!("endpoint address {addr:?} is not a valid IP address"),
            );
        } else if names::fqdn(addr).is_err() {
            e.add(
                &ap,
                format!("endpoint address {addr:?} is not a valid FQDN or an IP address"),
            );
        }
    }
    endpoint_ports(e, p, &we.ports, service_ports);
    labels(e, p, "labels", &we.labels);
    if let Some(sa) = &we.service_account {
        if !sa.is_empty() && !names::is_k8s_dns1123_subdomain(sa) {
            e.add(
                &p.f("serviceAccount"),
                format!("invalid service account name {sa:?}"),
            );
        }
    }
}

pub(super) fn workload_entry(e: &mut Errs, p: &Path, we: &WorkloadEntry) {
    workload_entry_fields(e, p, we, None, true);
}

pub(super) fn workload_group(e: &mut Errs, p: &Path, wg: &WorkloadGroup) {
    let tp = p.f("template");
    // The address is filled in per VM when it registers; a fixed one would be shared by
    // every member of the group.
    if !wg.template.address.is_empty() {
        e.add(&tp.f("address"), "address must not be set in a WorkloadGroup template (it is set per workload when it registers)");
    }
    endpoint_ports(e, &tp, &wg.template.ports, None);
    labels(e, &tp, "labels", &wg.template.labels);
    if let Some(m) = &wg.metadata {
        labels(e, &p.f("metadata"), "labels", &m.labels);
    }
    if let Some(probe) = &wg.probe {
        readiness_probe(e, &p.f("probe"), probe);
    }
}

fn readiness_probe(e: &mut Errs, p: &Path, v: &serde_json::Value) {
    for field in [
        "periodSeconds",
        "initialDelaySeconds",
        "timeoutSeconds",
        "successThreshold",
        "failureThreshold",
    ] {
        if v.get(field).and_then(|x| x.as_i64()).is_some_and(|n| n < 0) {
            e.add(&p.f(field), format!("{field} must be non-negative"));
        }
    }
    let methods: Vec<&str> = ["httpGet", "tcpSocket", "exec", "grpc"]
        .into_iter()
        .filter(|m| v.get(m).is_some())
        .collect();
    if methods.len() != 1 {
        e.add(
            p,
            "exactly one of httpGet, tcpSocket, exec or grpc must be set",
        );
        return;
    }
    let m = methods[0];
    let mv = v.get(m).unwrap_or(&serde_json::Value::Null);
    let mp = p.f(m);
    match m {
        "httpGet" | "tcpSocket" | "grpc" => {
            let port = mv.get("port").and_then(|x| x.as_i64()).unwrap_or(0);
            e.check(&mp.f("port"), names::port(port));
            if m == "httpGet" {
                if let Some(s) = mv.get("scheme").and_then(|x| x.as_str()) {
                    if !s.is_empty() && s != "HTTP" && s != "HTTPS" {
                        e.add(
                            &mp.f("scheme"),
                            "httpGet.scheme must be one of \"HTTPS\", \"HTTP\"",
                        );
                    }
                }
            }
        }
        _ => {
            if mv
                .get("command")
                .and_then(|c| c.as_array())
                .is_none_or(|c| c.is_empty())
            {
                e.add(&mp.f("command"), "exec.command is required");
            }
        }
    }
}

// ---------------------------------------------------------------- Sidecar

pub(super) fn sidecar(e: &mut Errs, p: &Path, sc: &Sidecar) {
    workload_selector(e, p, &sc.workload_selector);
    if sc.egress.is_empty()
        && sc.ingress.is_empty()
        && sc.outbound_traffic_policy.is_none()
        && sc.inbound_connection_pool.is_none()
    {
        e.add(p, "sidecar: empty configuration provided");
        return;
    }
    let mut ports = HashSet::new();
    for (i, l) in sc.ingress.iter().enumerate() {
        let lp = p.i("ingress", i);
        let pp = lp.f("port");
        if l.port.target_port.is_some_and(|t| t > 0) {
            e.add(&pp.f("targetPort"), "targetPort has no impact on Sidecars");
        }
        if !l.port.name.is_empty() {
            e.check(&pp.f("name"), names::port_name(&l.port.name));
        }
        e.check(&pp.f("protocol"), names::protocol(&l.port.protocol));
        e.check(&pp.f("number"), names::port(i64::from(l.port.number)));
        if let Some(b) = l.bind.as_deref().filter(|b| !b.is_empty()) {
            e.check(&lp.f("bind"), names::ip(b));
        }
        if !ports.insert(l.port.number) {
            e.add(
                &pp.f("number"),
                "sidecar: ports on IP bound listeners must be unique",
            );
        }
        if let Some(d) = l.default_endpoint.as_deref().filter(|d| !d.is_empty()) {
            e.check(&lp.f("defaultEndpoint"), default_endpoint(d));
        }
        capture_mode(e, &lp, &l.capture_mode);
        if let Some(t) = &l.tls {
            let tp = lp.f("tls");
            if !t.subject_alt_names.is_empty() {
                e.add(
                    &tp.f("subjectAltNames"),
                    "sidecar: subjectAltNames is not supported in ingress tls",
                );
            }
            if t.https_redirect {
                e.add(
                    &tp.f("httpsRedirect"),
                    "sidecar: httpsRedirect is not supported",
                );
            }
            if t.credential_name.as_deref().is_some_and(|c| !c.is_empty()) {
                e.add(
                    &tp.f("credentialName"),
                    "sidecar: credentialName is not currently supported",
                );
            }
            if matches!(
                t.mode,
                ServerTlsMode::IstioMutual | ServerTlsMode::AutoPassthrough
            ) {
                e.add(&tp.f("mode"), "configuration is invalid: cannot set mode to ISTIO_MUTUAL or AUTO_PASSTHROUGH in sidecar ingress tls");
            }
            server_tls(e, &tp, t);
        }
        if let Some(c) = &l.connection_pool {
            connection_pool(e, &lp.f("connectionPool"), c);
        }
    }
    if let Some(c) = &sc.inbound_connection_pool {
        connection_pool(e, &p.f("inboundConnectionPool"), c);
    }

    let mut ports = HashSet::new();
    let mut uds = HashSet::new();
    let mut catch_all = false;
    let last = sc.egress.len().saturating_sub(1);
    for (i, l) in sc.egress.iter().enumerate() {
        let lp = p.i("egress", i);
        let bind = l.bind.as_deref().unwrap_or("");
        match &l.port {
            // A listener without port catches everything else: at most one, and last.
            None => {
                if catch_all {
                    e.add(
                        &lp,
                        "sidecar: egress can have only one listener with empty port",
                    );
                    continue;
                }
                if i == last {
                    catch_all = true;
                } else {
                    e.add(&lp, "sidecar: the egress listener with empty port should be the last listener in the list");
                }
            }
            Some(port) => {
                let pp = lp.f("port");
                if port.target_port.is_some_and(|t| t > 0) {
                    e.add(&pp.f("targetPort"), "targetPort has no impact on Sidecars");
                }
                if !port.name.is_empty() {
                    e.check(&pp.f("name"), names::port_name(&port.name));
                }
                e.check(&pp.f("protocol"), names::protocol(&port.protocol));
                if port.number == 0 {
                    match bind.strip_prefix("unix://") {
                        None => e.add(&lp.f("bind"), "sidecar: ports with 0 value must have a unix domain socket bind address"),
                        Some(path) => e.check(&lp.f("bind"), names::unix_address(path)),
                    }
                    if l.capture_mode
                        .as_deref()
                        .is_some_and(|m| m != "DEFAULT" && m != "NONE")
                    {
                        e.add(&lp.f("captureMode"), "sidecar: captureMode must be DEFAULT/NONE for unix domain socket listeners");
                    }
                    if !uds.insert(bind) {
                        e.add(
                            &lp.f("bind"),
                            "sidecar: unix domain socket values for listeners must be unique",
                        );
                    }
                } else {
                    e.check(&pp.f("number"), names::port(i64::from(port.number)));
                    if !bind.is_empty() {
                        e.check(&lp.f("bind"), names::ip(bind));
                    }
                    if !ports.insert(port.number) {
                        e.add(
                            &pp.f("number"),
                            "sidecar: ports on IP bound listeners must be unique",
                        );
                    }
                }
            }
        }
        capture_mode(e, &lp, &l.capture_mode);
        if l.hosts.is_empty() {
            e.add(
                &lp.f("hosts"),
                "sidecar: egress listener must contain at least one host",
            );
        }
        for (j, h) in l.hosts.iter().enumerate() {
            e.check(&lp.i("hosts", j), namespace_slash_host(h, false));
        }
    }

    if let Some(o) = &sc.outbound_traffic_policy {
        let op = p.f("outboundTrafficPolicy");
        if let Some(proxy) = &o.egress_proxy {
            let xp = op.f("egressProxy");
            if o.mode != OutboundMode::AllowAny {
                e.add(&xp, "sidecar: egress_proxy must be set only with ALLOW_ANY outbound_traffic_policy mode");
            } else {
                e.check(&xp.f("host"), names::fqdn(&proxy.host));
                if proxy.port.is_none() {
                    e.add(&xp.f("port"), "sidecar: egress_proxy port must be non-nil");
                } else {
                    destination(e, &xp, proxy);
                }
            }
        }
    }
}

fn capture_mode(e: &mut Errs, p: &Path, m: &Option<String>) {
    if let Some(m) = m {
        if !matches!(m.as_str(), "DEFAULT" | "IPTABLES" | "NONE") {
            e.add(
                &p.f("captureMode"),
                format!("invalid captureMode {m:?}: one of DEFAULT, IPTABLES, NONE"),
            );
        }
    }
}

#[cfg(test)]
#[path = "networking_tests.rs"]
mod tests;
