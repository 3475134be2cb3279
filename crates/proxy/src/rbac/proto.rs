//! Envoy RBAC protos -> [`super`] types. Every field that would change the verdict and that
//! [`super`] cannot evaluate as Envoy does is an [`RbacError`] naming it.

use super::*;
use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3 as pb;
use envoy_types::pb::envoy::config::route::v3::HeaderMatcher;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbacProto;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::{
    rbac::EnforcementType, Rbac as NetworkRbacProto,
};
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;

/// Why an RBAC filter cannot be enforced; `field` is the proto path inside the filter's
/// config.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct RbacError {
    pub field: String,
    pub reason: String,
}

type R<T> = Result<T, RbacError>;

impl From<crate::config::proto::FieldError> for RbacError {
    fn from(e: crate::config::proto::FieldError) -> Self {
        RbacError {
            field: e.field,
            reason: e.reason,
        }
    }
}

fn bad<T>(field: impl Into<String>, reason: impl Into<String>) -> R<T> {
    Err(RbacError {
        field: field.into(),
        reason: reason.into(),
    })
}

fn within(prefix: &str, e: RbacError) -> RbacError {
    RbacError {
        field: format!("{prefix}.{}", e.field),
        reason: e.reason,
    }
}

/// `envoy.filters.http.rbac`'s config; `stat_prefix` is the HCM's (counters are
/// `http.<stat_prefix>.rbac.*`, as Envoy names them).
pub fn http_rbac(r: &HttpRbacProto, stat_prefix: &str) -> R<HttpRbac> {
    if r.matcher.is_some() || r.shadow_matcher.is_some() {
        return bad("matcher", "the matcher API is not supported (use rules)");
    }
    let base = format!("http.{stat_prefix}.rbac.");
    let per_rule = format!("{base}{}.", r.rules_stat_prefix);
    let engine = r
        .rules
        .as_ref()
        .map(|x| rbac(x).map_err(|e| within("rules", e)))
        .transpose()?
        .map(|x| {
            Engine::new(
                x,
                &format!("{base}{}", r.rules_stat_prefix),
                r.track_per_rule_stats.then_some(per_rule.as_str()),
            )
        });
    let shadow = r
        .shadow_rules
        .as_ref()
        .map(|x| rbac(x).map_err(|e| within("shadow_rules", e)))
        .transpose()?
        .map(|x| {
            Engine::new(
                x,
                &format!("{base}{}shadow_", r.shadow_rules_stat_prefix),
                None,
            )
        });
    Ok(HttpRbac { engine, shadow })
}

/// `envoy.filters.network.rbac`'s config (counters `<stat_prefix>rbac.*`).
pub fn network_rbac(r: &NetworkRbacProto) -> R<NetworkRbac> {
    if r.matcher.is_some() || r.shadow_matcher.is_some() {
        return bad("matcher", "the matcher API is not supported (use rules)");
    }
    if EnforcementType::try_from(r.enforcement_type) != Ok(EnforcementType::OneTimeOnFirstByte) {
        return bad(
            "enforcement_type",
            "only ONE_TIME_ON_FIRST_BYTE is supported",
        );
    }
    if r.delay_deny.is_some() {
        return bad("delay_deny", "not supported");
    }
    let base = format!("{}rbac.", r.stat_prefix);
    let engine = r
        .rules
        .as_ref()
        .map(|x| rbac(x).map_err(|e| within("rules", e)))
        .transpose()?
        .map(|x| Engine::new(x, &base, None));
    let shadow = r
        .shadow_rules
        .as_ref()
        .map(|x| rbac(x).map_err(|e| within("shadow_rules", e)))
        .transpose()?
        .map(|x| {
            Engine::new(
                x,
                &format!("{base}{}shadow_", r.shadow_rules_stat_prefix),
                None,
            )
        });
    Ok(NetworkRbac { engine, shadow })
}

pub fn rbac(r: &pb::Rbac) -> R<Rbac> {
    use pb::rbac::Action as A;
    let action = match A::try_from(r.action) {
        Ok(A::Allow) => Action::Allow,
        Ok(A::Deny) => Action::Deny,
        Ok(A::Log) => Action::Log,
        Err(_) => return bad("action", format!("unknown action {}", r.action)),
    };
    if r.audit_logging_options.is_some() {
        return bad(
            "audit_logging_options",
            "RBAC audit loggers are not supported",
        );
    }
    let mut names: Vec<&String> = r.policies.keys().collect();
    names.sort();
    let mut policies = Vec::with_capacity(names.len());
    for name in names {
        let Some(p) = r.policies.get(name) else {
            continue;
        };
        let field = format!("policies[{name}]");
        policies.push(NamedPolicy {
            name: name.clone(),
            policy: policy(p).map_err(|e| within(&field, e))?,
            per_rule: None,
        });
    }
    Ok(Rbac { action, policies })
}

fn policy(p: &pb::Policy) -> R<Policy> {
    if p.condition.is_some() || p.checked_condition.is_some() {
        return bad("condition", "CEL conditions are not supported");
    }
    if p.permissions.is_empty() {
        return bad("permissions", "at least one permission is required");
    }
    if p.principals.is_empty() {
        return bad("principals", "at least one principal is required");
    }
    let permissions = p
        .permissions
        .iter()
        .enumerate()
        .map(|(i, x)| permission(x).map_err(|e| within(&format!("permissions[{i}]"), e)))
        .collect::<R<Vec<_>>>()?;
    let principals = p
        .principals
        .iter()
        .enumerate()
        .map(|(i, x)| principal(x).map_err(|e| within(&format!("principals[{i}]"), e)))
        .collect::<R<Vec<_>>>()?;
    Ok(Policy {
        permissions,
        principals,
    })
}

// The deprecated variants are still sent by older control planes; they are matched here.
#[allow(deprecated)]
fn permission(p: &pb::Permission) -> R<Permission> {
    use pb::permission::Rule;
    let set = |field: &str, s: &pb::permission::Set| -> R<Vec<Permission>> {
        s.rules
            .iter()
            .enumerate()
            .map(|(i, x)| permission(x).map_err(|e| within(&format!("{field}.rules[{i}]"), e)))
            .collect()
    };
    Ok(match &p.rule {
        Some(Rule::Any(true)) => Permission::Any,
        Some(Rule::Any(false)) => return bad("any", "must be true"),
        Some(Rule::AndRules(s)) => Permission::And(set("and_rules", s)?),
        Some(Rule::OrRules(s)) => Permission::Or(set("or_rules", s)?),
        Some(Rule::NotRule(n)) => {
            Permission::Not(Box::new(permission(n).map_err(|e| within("not_rule", e))?))
        }
        Some(Rule::Header(h)) => Permission::Header(header("header", h)?),
        Some(Rule::UrlPath(m)) => Permission::UrlPath(path("url_path", m)?),
        Some(Rule::DestinationIp(c)) => Permission::DestinationIp(cidr("destination_ip", c)?),
        Some(Rule::DestinationPort(port)) => Permission::DestinationPort(
            u16::try_from(*port).or_else(|_| bad("destination_port", "out of range"))?,
        ),
        Some(Rule::DestinationPortRange(r)) => {
            let (Ok(start), Ok(end)) = (u32::try_from(r.start), u32::try_from(r.end)) else {
                return bad("destination_port_range", "negative port");
            };
            Permission::DestinationPortRange(start, end)
        }
        Some(Rule::RequestedServerName(m)) => {
            Permission::RequestedServerName(string_match("requested_server_name", m)?)
        }
        Some(Rule::Metadata(_)) | Some(Rule::SourcedMetadata(_)) => {
            return bad("metadata", "metadata permissions are not supported")
        }
        Some(Rule::Matcher(_)) => return bad("matcher", "permission matchers are not supported"),
        Some(Rule::UriTemplate(_)) => return bad("uri_template", "not supported"),
        None => return bad("rule", "missing"),
    })
}

#[allow(deprecated)]
fn principal(p: &pb::Principal) -> R<Principal> {
    use pb::principal::Identifier as I;
    let set = |field: &str, s: &pb::principal::Set| -> R<Vec<Principal>> {
        s.ids
            .iter()
            .enumerate()
            .map(|(i, x)| principal(x).map_err(|e| within(&format!("{field}.ids[{i}]"), e)))
            .collect()
    };
    Ok(match &p.identifier {
        Some(I::Any(true)) => Principal::Any,
        Some(I::Any(false)) => return bad("any", "must be true"),
        Some(I::AndIds(s)) => Principal::And(set("and_ids", s)?),
        Some(I::OrIds(s)) => Principal::Or(set("or_ids", s)?),
        Some(I::NotId(n)) => {
            Principal::Not(Box::new(principal(n).map_err(|e| within("not_id", e))?))
        }
        Some(I::Authenticated(a)) => Principal::Authenticated(
            a.principal_name
                .as_ref()
                .map(|m| string_match("authenticated.principal_name", m))
                .transpose()?,
        ),
        Some(I::SourceIp(c)) => Principal::DirectRemoteIp(cidr("source_ip", c)?),
        Some(I::DirectRemoteIp(c)) => Principal::DirectRemoteIp(cidr("direct_remote_ip", c)?),
        Some(I::RemoteIp(c)) => Principal::RemoteIp(cidr("remote_ip", c)?),
        Some(I::Header(h)) => Principal::Header(header("header", h)?),
        Some(I::UrlPath(m)) => Principal::UrlPath(path("url_path", m)?),
        Some(I::Metadata(m)) => Principal::Metadata(metadata("metadata", m)?),
        Some(I::SourcedMetadata(s)) => {
            if pb::MetadataSource::try_from(s.metadata_source) != Ok(pb::MetadataSource::Dynamic) {
                return bad(
                    "sourced_metadata.metadata_source",
                    "only DYNAMIC metadata is supported",
                );
            }
            let Some(m) = &s.metadata_matcher else {
                return bad("sourced_metadata.metadata_matcher", "missing");
            };
            Principal::Metadata(metadata("sourced_metadata.metadata_matcher", m)?)
        }
        Some(I::FilterState(_)) => return bad("filter_state", "not supported"),
        Some(I::Custom(_)) => return bad("custom", "custom principals are not supported"),
        None => return bad("identifier", "missing"),
    })
}

fn cidr(field: &str, c: &CidrRange) -> R<Cidr> {
    let ip: IpAddr = c
        .address_prefix
        .parse()
        .or_else(|_| bad(field, format!("{:?} is not an IP", c.address_prefix)))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = c.prefix_len.as_ref().map_or(max, |l| l.value);
    if len > max {
        return bad(field, format!("prefix length {len} out of range"));
    }
    Ok(Cidr {
        ip,
        len: u8::try_from(len).unwrap_or(0),
    })
}

fn path(field: &str, m: &matcher::PathMatcher) -> R<StringMatch> {
    match &m.rule {
        Some(matcher::path_matcher::Rule::Path(s)) => string_match(&format!("{field}.path"), s),
        None => bad(field, "missing rule"),
    }
}

pub fn string_match(field: &str, m: &matcher::StringMatcher) -> R<StringMatch> {
    Ok(crate::config::proto::string_match(field, m)?)
}

fn header(field: &str, h: &HeaderMatcher) -> R<HeaderMatch> {
    Ok(crate::config::proto::header_match(field, h)?)
}

fn metadata(field: &str, m: &matcher::MetadataMatcher) -> R<MetadataMatch> {
    use matcher::metadata_matcher::path_segment::Segment;
    let mut path = Vec::with_capacity(m.path.len());
    for (i, s) in m.path.iter().enumerate() {
        match &s.segment {
            Some(Segment::Key(k)) => path.push(k.clone()),
            None => return bad(format!("{field}.path[{i}]"), "missing key"),
        }
    }
    if path.is_empty() {
        return bad(format!("{field}.path"), "at least one key is required");
    }
    let Some(v) = &m.value else {
        return bad(format!("{field}.value"), "missing");
    };
    Ok(MetadataMatch {
        filter: m.filter.clone(),
        path,
        value: value_matcher(&format!("{field}.value"), v)?,
        invert: m.invert,
    })
}

fn value_matcher(field: &str, v: &matcher::ValueMatcher) -> R<MetaValue> {
    use matcher::value_matcher::MatchPattern as P;
    Ok(match &v.match_pattern {
        Some(P::NullMatch(_)) => MetaValue::Null,
        Some(P::DoubleMatch(d)) => {
            use matcher::double_matcher::MatchPattern as D;
            match &d.match_pattern {
                Some(D::Exact(x)) => MetaValue::Number {
                    exact: Some(*x),
                    range: None,
                },
                Some(D::Range(r)) => MetaValue::Number {
                    exact: None,
                    range: Some((r.start, r.end)),
                },
                None => return bad(format!("{field}.double_match"), "missing"),
            }
        }
        Some(P::StringMatch(s)) => {
            MetaValue::String(string_match(&format!("{field}.string_match"), s)?)
        }
        Some(P::BoolMatch(b)) => MetaValue::Bool(*b),
        Some(P::PresentMatch(p)) => MetaValue::Present(*p),
        Some(P::ListMatch(l)) => match &l.match_pattern {
            Some(matcher::list_matcher::MatchPattern::OneOf(inner)) => MetaValue::ListOneOf(
                Box::new(value_matcher(&format!("{field}.list_match.one_of"), inner)?),
            ),
            None => return bad(format!("{field}.list_match"), "missing"),
        },
        Some(P::OrMatch(o)) => MetaValue::Or(
            o.value_matchers
                .iter()
                .enumerate()
                .map(|(i, x)| value_matcher(&format!("{field}.or_match[{i}]"), x))
                .collect::<R<Vec<_>>>()?,
        ),
        None => return bad(field, "missing match_pattern"),
    })
}

impl TryFrom<&pb::Rbac> for Rbac {
    type Error = RbacError;
    fn try_from(r: &pb::Rbac) -> R<Rbac> {
        rbac(r)
    }
}

impl TryFrom<&NetworkRbacProto> for NetworkRbac {
    type Error = RbacError;
    fn try_from(r: &NetworkRbacProto) -> R<NetworkRbac> {
        network_rbac(r)
    }
}

/// The HTTP filter with its HCM's stat prefix (its counters are named after it).
impl TryFrom<(&HttpRbacProto, &str)> for HttpRbac {
    type Error = RbacError;
    fn try_from((r, stat_prefix): (&HttpRbacProto, &str)) -> R<HttpRbac> {
        http_rbac(r, stat_prefix)
    }
}
