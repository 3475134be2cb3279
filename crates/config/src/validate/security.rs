//! `security.istio.io` (PeerAuthentication, AuthorizationPolicy, RequestAuthentication) and
//! `telemetry.istio.io` (Telemetry), after Istio's `validation.go` and
//! `pkg/config/security`.

use super::names;
use super::networking::selector_labels;
use super::{Errs, Path};
use crate::resource::Meta;
use crate::security::*;

/// `selector`, `targetRef` and `targetRefs` are alternative ways to pick workloads.
fn one_of_selector(
    e: &mut Errs,
    p: &Path,
    selector: &Option<LabelSelector>,
    target_ref: &Option<PolicyTargetReference>,
    target_refs: &[PolicyTargetReference],
) {
    let set = [
        selector.is_some(),
        target_ref.is_some(),
        !target_refs.is_empty(),
    ]
    .iter()
    .filter(|s| **s)
    .count();
    if set > 1 {
        e.add(p, "only one of targetRefs or workloadSelector can be set");
    }
    if let Some(sel) = selector {
        selector_labels(e, &p.f("selector"), "matchLabels", &sel.match_labels);
    }
    if let Some(r) = target_ref {
        policy_target_ref(e, &p.f("targetRef"), r);
    }
    for (i, r) in target_refs.iter().enumerate() {
        policy_target_ref(e, &p.i("targetRefs", i), r);
    }
}

/// Policies may target a Service, a ServiceEntry or a Kubernetes Gateway (API group checked,
/// version not), in the policy's own namespace.
fn policy_target_ref(e: &mut Errs, p: &Path, r: &PolicyTargetReference) {
    if r.name.is_empty() {
        e.add(&p.f("name"), "targetRef name must be set");
    }
    if r.namespace.as_deref().is_some_and(|n| !n.is_empty()) {
        e.add(
            &p.f("namespace"),
            "targetRef namespace must not be set; cross namespace referencing is not supported",
        );
    }
    let group = r.group.as_deref().unwrap_or("");
    let allowed = matches!(
        (group, r.kind.as_str()),
        ("" | "core", "Service")
            | ("networking.istio.io", "ServiceEntry")
            | ("gateway.networking.k8s.io", "Gateway" | "GatewayClass")
    );
    if !allowed {
        e.add(&p.f("kind"), format!("targetRef must be to one of core/Service, networking.istio.io/ServiceEntry, gateway.networking.k8s.io/Gateway but was {group}/{}", r.kind));
    }
}

// ---------------------------------------------------------------- PeerAuthentication

pub(super) fn peer_authentication(e: &mut Errs, p: &Path, pa: &PeerAuthentication) {
    let empty_selector = pa
        .selector
        .as_ref()
        .is_none_or(|s| s.match_labels.is_empty());
    // Port numbers only mean something for a selected workload: a namespace-wide policy
    // cannot know which workload's port 8080 is meant.
    if empty_selector && !pa.port_level_mtls.is_empty() {
        e.add(
            &p.f("portLevelMtls"),
            "mesh/namespace peer authentication cannot have port level mTLS",
        );
    }
    for key in pa.port_level_mtls.keys() {
        let kp = p.k("portLevelMtls", key);
        match key.parse::<i64>() {
            Ok(n) if (1..=65535).contains(&n) => {}
            _ => e.add(
                &kp,
                format!("port {key:?} must be a number in range 1..65535"),
            ),
        }
    }
    if let Some(sel) = &pa.selector {
        selector_labels(e, &p.f("selector"), "matchLabels", &sel.match_labels);
    }
}

// ---------------------------------------------------------------- AuthorizationPolicy

/// `when` keys Istio's RBAC filter understands, and the value rules for each.
fn attribute(key: &str, values: &[String]) -> names::Check {
    if values.iter().any(String::is_empty) {
        return Err(format!("empty value not allowed, found in {key}"));
    }
    let map_key = |k: &str| -> names::Check {
        let open = k.find('[');
        if k.ends_with(']') && open.is_some_and(|o| o > 0 && o < k.len().saturating_sub(2)) {
            Ok(())
        } else {
            Err(format!("bad key ({k}): should have format a[b]"))
        }
    };
    match key {
        k if k.starts_with("request.experimental.inline.headers") => map_key(k),
        k if k.starts_with("request.headers") => map_key(k),
        "source.ip" | "remote.ip" | "destination.ip" => ips(values),
        "source.namespace"
        | "source.principal"
        | "request.auth.principal"
        | "request.auth.audiences"
        | "request.auth.presenter"
        | "connection.sni" => Ok(()),
        "source.serviceAccount" => service_accounts(key, values),
        k if k.starts_with("request.auth.claims") => map_key(k),
        "destination.port" => ports(values),
        k if k.starts_with("experimental.envoy.filters.") => map_key(k),
        "destination.namespace" => Err(format!(
            "attribute {key} is replaced by the metadata.namespace"
        )),
        k if k.starts_with("destination.labels") => Err(format!(
            "attribute {key} is replaced by the workload selector"
        )),
        "destination.name" | "destination.user" => Err(format!(
            "deprecated attribute {key}: only supported in v1alpha1"
        )),
        _ => Err(format!("unknown attribute: {key}")),
    }
}

fn ips(values: &[String]) -> names::Check {
    for v in values {
        if v.contains('/') {
            names::ip_or_cidr(v).map_err(|_| format!("bad CIDR range ({v})"))?;
        } else if !names::is_ip(v) {
            return Err(format!("bad IP address ({v})"));
        }
    }
    Ok(())
}

fn ports(values: &[String]) -> names::Check {
    for v in values {
        // Istio accepts 0..=65535 here (a port condition, not a listener).
        let ok = !v.is_empty()
            && v.bytes().all(|c| c.is_ascii_digit())
            && v.parse::<u32>().is_ok_and(|n| n <= 65535);
        if !ok {
            return Err(format!("bad port ({v})"));
        }
    }
    Ok(())
}

fn service_accounts(key: &str, values: &[String]) -> names::Check {
    if values.len() > 16 {
        return Err("may not have more than 16 values".into());
    }
    for v in values {
        if v.is_empty() {
            return Err(format!("empty value not allowed, found in {key}"));
        }
        if v.contains('*') {
            return Err(format!("wildcard not allowed, found in {key}"));
        }
        if v.matches('/').count() > 1 || v.len() > 320 {
            return Err(format!("expected format 'serviceAccount' or 'namespace/serviceAccount', found {v:?} in {key}"));
        }
        if let Some((ns, sa)) = v.split_once('/') {
            if ns.is_empty() || sa.is_empty() {
                return Err(format!("expected format 'serviceAccount' or 'namespace/serviceAccount', found {v:?} in {key}"));
            }
        }
    }
    Ok(())
}

/// Envoy's URI templates in paths: `{*}` and `{**}` (last) as whole segments, other
/// segments plain RFC 3986 pchars.
fn path_templates(paths: &[String]) -> names::Check {
    for path in paths {
        let has_template = path.contains("{*}") || path.contains("{**}");
        let mut any_seen = false;
        for glob in path.trim_matches('/').split('/') {
            match glob {
                "{*}" | "{**}" if any_seen => {
                    return Err(format!(
                        "invalid or unsupported path {path}: {{**}} is not the last operator"
                    ))
                }
                "{*}" => continue,
                "{**}" => {
                    any_seen = true;
                    continue;
                }
                _ => {}
            }
            if glob.contains(['{', '}']) {
                return Err(format!("invalid or unsupported path {path}: contains '{{' or '}}' beyond a supported path template"));
            }
            let pchar = |c: char| c.is_ascii_alphanumeric() || "-._~%!$&'()+,;:@=".contains(c);
            if has_template && (glob.is_empty() || !glob.chars().all(pchar)) {
                return Err(format!("invalid or unsupported path {path}: contains segment {glob:?} with invalid string literal"));
            }
        }
    }
    Ok(())
}

fn no_empty(e: &mut Errs, p: &Path, field: &str, values: &[String]) {
    for (i, v) in values.iter().enumerate() {
        if v.is_empty() {
            e.add(
                &p.i(field, i),
                format!("empty value not allowed, found in {field}"),
            );
        }
    }
}

fn ip_list(e: &mut Errs, p: &Path, field: &str, values: &[String]) {
    for (i, v) in values.iter().enumerate() {
        if !v.is_empty() {
            e.check(&p.i(field, i), ips(std::slice::from_ref(v)));
        }
    }
}

pub(super) fn authorization_policy(e: &mut Errs, p: &Path, meta: &Meta, ap: &AuthorizationPolicy) {
    one_of_selector(e, p, &ap.selector, &ap.target_ref, &ap.target_refs);

    if let Some(v) = meta.annotations.get("istio.io/dry-run") {
        let ap_path = Path::root("metadata").k("annotations", "istio.io/dry-run");
        match ap.action {
            AuthzAction::Allow | AuthzAction::Deny => {
                if !matches!(
                    v.as_str(),
                    "1" | "t"
                        | "T"
                        | "TRUE"
                        | "true"
                        | "True"
                        | "0"
                        | "f"
                        | "F"
                        | "FALSE"
                        | "false"
                        | "False"
                ) {
                    e.add(&ap_path, format!("invalid value {v:?}: must be a boolean"));
                }
            }
            _ => e.add(
                &ap_path,
                "the annotation istio.io/dry-run currently only supports action ALLOW/DENY",
            ),
        }
    }

    // The Go API distinguishes `rules` absent from `rules: []`; both decode to an empty list
    // here, and both never match, so both are rejected where Istio rejects absence.
    if ap.action == AuthzAction::Custom {
        if ap.rules.is_empty() {
            e.add(&p.f("rules"), "CUSTOM action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request");
        } else if ap.provider.as_ref().is_none_or(|pr| pr.name.is_empty()) {
            e.add(
                &p.f("provider").f("name"),
                "`provider.name` must not be empty",
            );
        }
        for (i, r) in ap.rules.iter().enumerate() {
            let rp = p.i("rules", i);
            for (j, f) in r.from.iter().enumerate() {
                let sp = rp.i("from", j).f("source");
                let s = &f.source;
                for (field, list) in [
                    ("namespaces", &s.namespaces),
                    ("notNamespaces", &s.not_namespaces),
                    ("principals", &s.principals),
                    ("notPrincipals", &s.not_principals),
                    ("requestPrincipals", &s.request_principals),
                    ("notRequestPrincipals", &s.not_request_principals),
                ] {
                    if !list.is_empty() {
                        e.add(
                            &sp.f(field),
                            format!("{field} is currently not supported with CUSTOM action"),
                        );
                    }
                }
            }
            for (j, w) in r.when.iter().enumerate() {
                if w.key == "source.namespace"
                    || w.key == "source.principal"
                    || w.key.starts_with("request.auth.")
                {
                    e.add(
                        &rp.i("when", j).f("key"),
                        format!("{} is currently not supported with CUSTOM action", w.key),
                    );
                }
            }
        }
    } else if ap.provider.is_some() {
        e.add(
            &p.f("provider"),
            format!(
                "`provider` must not be with non CUSTOM action, found {:?}",
                ap.action
            ),
        );
    }
    if ap.action == AuthzAction::Deny && ap.rules.is_empty() {
        e.add(&p.f("rules"), "DENY action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request");
    }

    for (i, r) in ap.rules.iter().enumerate() {
        let rp = p.i("rules", i);
        for (j, f) in r.from.iter().enumerate() {
            let sp = rp.i("from", j).f("source");
            let s = &f.source;
            let lists: [(&str, &Vec<String>); 14] = [
                ("principals", &s.principals),
                ("notPrincipals", &s.not_principals),
                ("requestPrincipals", &s.request_principals),
                ("notRequestPrincipals", &s.not_request_principals),
                ("namespaces", &s.namespaces),
                ("notNamespaces", &s.not_namespaces),
                ("ipBlocks", &s.ip_blocks),
                ("notIpBlocks", &s.not_ip_blocks),
                ("remoteIpBlocks", &s.remote_ip_blocks),
                ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
                ("serviceAccounts", &s.service_accounts),
                ("notServiceAccounts", &s.not_service_accounts),
                ("trustDomains", &s.trust_domains),
                ("notTrustDomains", &s.not_trust_domains),
            ];
            if lists.iter().all(|(_, l)| l.is_empty()) {
                e.add(
                    &sp,
                    format!("`from.source` must not be empty, found at rule {i}"),
                );
            }
            for (field, l) in lists {
                no_empty(e, &sp, field, l);
            }
            for field in [
                "ipBlocks",
                "notIpBlocks",
                "remoteIpBlocks",
                "notRemoteIpBlocks",
            ] {
                let l = match field {
                    "ipBlocks" => &s.ip_blocks,
                    "notIpBlocks" => &s.not_ip_blocks,
                    "remoteIpBlocks" => &s.remote_ip_blocks,
                    _ => &s.not_remote_ip_blocks,
                };
                ip_list(e, &sp, field, l);
            }
            for (field, l) in [
                ("serviceAccounts", &s.service_accounts),
                ("notServiceAccounts", &s.not_service_accounts),
            ] {
                if !l.is_empty() {
                    e.check(&sp.f(field), service_accounts(field, l));
                }
            }
        }
        for (j, t) in r.to.iter().enumerate() {
            let op = rp.i("to", j).f("operation");
            let o = &t.operation;
            let lists: [(&str, &Vec<String>); 8] = [
                ("hosts", &o.hosts),
                ("notHosts", &o.not_hosts),
                ("ports", &o.ports),
                ("notPorts", &o.not_ports),
                ("methods", &o.methods),
                ("notMethods", &o.not_methods),
                ("paths", &o.paths),
                ("notPaths", &o.not_paths),
            ];
            if lists.iter().all(|(_, l)| l.is_empty()) {
                e.add(
                    &op,
                    format!("`to.operation` must not be empty, found at rule {i}"),
                );
            }
            for (field, l) in lists {
                no_empty(e, &op, field, l);
            }
            for (field, l) in [("ports", &o.ports), ("notPorts", &o.not_ports)] {
                for (k, v) in l.iter().enumerate() {
                    // Ports in an operation select the listener port: 1..65535.
                    match v.parse::<i64>() {
                        Ok(n) if v.bytes().all(|c| c.is_ascii_digit()) => {
                            e.check(&op.i(field, k), names::port(n))
                        }
                        _ if v.is_empty() => {}
                        _ => e.add(&op.i(field, k), format!("bad port ({v}): must be a number")),
                    }
                }
            }
            for (field, l) in [("paths", &o.paths), ("notPaths", &o.not_paths)] {
                e.check(&op.f(field), path_templates(l));
            }
        }
        for (j, c) in r.when.iter().enumerate() {
            let cp = rp.i("when", j);
            if c.key.is_empty() {
                e.add(&cp.f("key"), "`key` must not be empty");
                continue;
            }
            if c.values.is_empty() && c.not_values.is_empty() {
                e.add(
                    &cp,
                    format!(
                        "at least one of `values` or `notValues` must be set for key {}",
                        c.key
                    ),
                );
                continue;
            }
            // An unknown or malformed key is reported once, on the key itself.
            if let Err(m) = attribute(&c.key, &[]) {
                e.add(&cp.f("key"), m);
                continue;
            }
            if let Err(m) = attribute(&c.key, &c.values) {
                e.add(
                    &cp.f("values"),
                    format!("invalid `value` for `key` {}: {m}", c.key),
                );
            }
            if let Err(m) = attribute(&c.key, &c.not_values) {
                e.add(
                    &cp.f("notValues"),
                    format!("invalid `notValue` for `key` {}: {m}", c.key),
                );
            }
        }
    }
}

// ---------------------------------------------------------------- RequestAuthentication

/// Istio's `ParseJwksURI`: an absolute http or https URL with a host.
fn jwks_uri(uri: &str) -> names::Check {
    let (scheme, rest) = uri
        .split_once("://")
        .ok_or_else(|| format!("jwksUri {uri:?} is not an absolute URL"))?;
    if scheme != "http" && scheme != "https" {
        return Err(format!("URI scheme {scheme:?} is not supported"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(authority);
    let (host, port) = if let Some(stripped) = host_port.strip_prefix('[') {
        match stripped.split_once(']') {
            Some((h, rest)) => (h, rest.strip_prefix(':')),
            None => return Err(format!("jwksUri {uri:?} has a malformed IPv6 host")),
        }
    } else {
        match host_port.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return Err(format!("jwksUri {uri:?} has no host"));
    }
    if uri.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("jwksUri {uri:?} contains whitespace"));
    }
    if let Some(p) = port {
        if !p.is_empty() && p.parse::<u16>().is_err() {
            return Err(format!("jwksUri {uri:?} has an invalid port {p:?}"));
        }
    }
    Ok(())
}

/// A JSON Web Key Set: a JSON object with a `keys` array of objects carrying `kty`.
fn jwks(text: &str) -> names::Check {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|err| format!("jwks parse error: {err}"))?;
    let keys = v
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or("jwks parse error: expected an object with a \"keys\" array")?;
    for (i, k) in keys.iter().enumerate() {
        if k.get("kty").and_then(|t| t.as_str()).is_none() {
            return Err(format!("jwks parse error: key {i} has no \"kty\""));
        }
    }
    Ok(())
}

pub(super) fn request_authentication(e: &mut Errs, p: &Path, ra: &RequestAuthentication) {
    one_of_selector(e, p, &ra.selector, &ra.target_ref, &ra.target_refs);
    for (i, r) in ra.jwt_rules.iter().enumerate() {
        let rp = p.i("jwtRules", i);
        if r.issuer.is_empty() {
            e.add(&rp.f("issuer"), "issuer must be set");
        }
        for (j, a) in r.audiences.iter().enumerate() {
            if a.is_empty() {
                e.add(&rp.i("audiences", j), "audience must be non-empty string");
            }
        }
        let uri = r.jwks_uri.as_deref().unwrap_or("");
        let inline = r.jwks.as_deref().unwrap_or("");
        if !uri.is_empty() {
            e.check(&rp.f("jwksUri"), jwks_uri(uri));
        }
        if !inline.is_empty() {
            e.check(&rp.f("jwks"), jwks(inline));
        }
        // Istio documents that only one of the two should be used; with both, which keys
        // verify a token would depend on the implementation.
        if !uri.is_empty() && !inline.is_empty() {
            e.add(&rp.f("jwks"), "only one of jwks or jwksUri may be set");
        }
        for (j, h) in r.from_headers.iter().enumerate() {
            let hp = rp.i("fromHeaders", j).f("name");
            if h.name.is_empty() {
                e.add(&hp, "location header name must be non-empty string");
            } else if h.name.bytes().any(|c| c <= b' ' || c == b':' || c >= 0x7f) {
                e.add(
                    &hp,
                    format!(
                        "location header name {:?} is not a valid header name",
                        h.name
                    ),
                );
            }
        }
        for (j, q) in r.from_params.iter().enumerate() {
            if q.is_empty() {
                e.add(
                    &rp.i("fromParams", j),
                    "location query must be non-empty string",
                );
            }
        }
        for (j, c) in r.from_cookies.iter().enumerate() {
            if c.is_empty() {
                e.add(
                    &rp.i("fromCookies", j),
                    "cookie name must be non-empty string",
                );
            }
        }
        for (j, c) in r.output_claim_to_headers.iter().enumerate() {
            let cp = rp.i("outputClaimToHeaders", j);
            if c.claim.is_empty() || c.header.is_empty() {
                e.add(
                    &cp,
                    "outputClaimToHeaders header and claim value must be non-empty string",
                );
                continue;
            }
            e.check(&cp.f("header"), names::header_name(&c.header));
        }
        if let Some(h) = &r.output_payload_to_header {
            if !h.is_empty() {
                e.check(&rp.f("outputPayloadToHeader"), names::header_name(h));
            }
        }
        if let Some(t) = &r.timeout {
            e.check(&rp.f("timeout"), names::duration(t));
        }
    }
}

// ---------------------------------------------------------------- Telemetry

fn providers(e: &mut Errs, p: &Path, item: &serde_json::Value) {
    if let Some(list) = item.get("providers").and_then(|v| v.as_array()) {
        for (i, pr) in list.iter().enumerate() {
            if pr
                .get("name")
                .and_then(|n| n.as_str())
                .is_none_or(str::is_empty)
            {
                e.add(
                    &p.i("providers", i).f("name"),
                    "providers.name may not be empty",
                );
            }
        }
    }
}

pub(super) fn telemetry(e: &mut Errs, p: &Path, t: &Telemetry) {
    one_of_selector(e, p, &t.selector, &t.target_ref, &t.target_refs);
    for (i, tr) in t.tracing.iter().enumerate() {
        let tp = p.i("tracing", i);
        providers(e, &tp, tr);
        if let Some(v) = tr.get("randomSamplingPercentage") {
            // A bare number or a wrapper `{value: N}` depending on the client.
            let n = v
                .as_f64()
                .or_else(|| v.get("value").and_then(|x| x.as_f64()));
            if n.is_none_or(|n| !(0.0..=100.0).contains(&n)) {
                e.add(
                    &tp.f("randomSamplingPercentage"),
                    "randomSamplingPercentage must be in range [0.0, 100.0]",
                );
            }
        }
        if let Some(tags) = tr.get("customTags").and_then(|v| v.as_object()) {
            for (name, tag) in tags {
                let cp = tp.k("customTags", name);
                if name.is_empty() {
                    e.add(&cp, "tag name may not be empty");
                }
                let field = |kind: &str, f: &str| {
                    tag.get(kind)
                        .map(|k| k.get(f).and_then(|x| x.as_str()).unwrap_or(""))
                };
                if field("literal", "value") == Some("") {
                    e.add(
                        &cp.f("literal").f("value"),
                        "literal tag value may not be empty",
                    );
                }
                if field("header", "name") == Some("") {
                    e.add(
                        &cp.f("header").f("name"),
                        "header tag name may not be empty",
                    );
                }
                if field("environment", "name") == Some("") {
                    e.add(
                        &cp.f("environment").f("name"),
                        "environment tag name may not be empty",
                    );
                }
            }
        }
    }
    for (i, m) in t.metrics.iter().enumerate() {
        let mp = p.i("metrics", i);
        providers(e, &mp, m);
        if let Some(overrides) = m.get("overrides").and_then(|v| v.as_array()) {
            for (j, o) in overrides.iter().enumerate() {
                let op = mp.i("overrides", j);
                if let Some(tags) = o.get("tagOverrides").and_then(|v| v.as_object()) {
                    for (name, to) in tags {
                        let value = to.get("value").and_then(|v| v.as_str()).unwrap_or("");
                        match to
                            .get("operation")
                            .and_then(|v| v.as_str())
                            .unwrap_or("UPSERT")
                        {
                            "UPSERT" if value.is_empty() => e.add(
                                &op.k("tagOverrides", name).f("value"),
                                "tagOverrides.value must be set when operation is UPSERT",
                            ),
                            "REMOVE" if !value.is_empty() => e.add(
                                &op.k("tagOverrides", name).f("value"),
                                "tagOverrides.value may only be set when operation is UPSERT",
                            ),
                            _ => {}
                        }
                    }
                }
                if let Some(cm) = o.get("match").and_then(|m| m.get("customMetric")) {
                    if cm.as_str().is_none_or(str::is_empty) {
                        e.add(
                            &op.f("match").f("customMetric"),
                            "customMetric may not be empty",
                        );
                    }
                }
            }
        }
    }
    for (i, l) in t.access_logging.iter().enumerate() {
        providers(e, &p.i("accessLogging", i), l);
    }
}

#[cfg(test)]
#[path = "security_tests.rs"]
mod tests;
