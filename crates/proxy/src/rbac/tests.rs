use super::proto::{http_rbac, network_rbac};
use super::*;
use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3::{self as pb, permission, principal};
use envoy_types::pb::envoy::config::route::v3::{header_matcher, HeaderMatcher};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpProto;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetProto;
use envoy_types::pb::envoy::r#type::matcher::v3 as m;
use envoy_types::pb::google::protobuf::UInt32Value;
use serde_json::json;

fn exact(v: &str) -> m::StringMatcher {
    m::StringMatcher {
        match_pattern: Some(m::string_matcher::MatchPattern::Exact(v.into())),
        ignore_case: false,
    }
}

fn prefix(v: &str) -> m::StringMatcher {
    m::StringMatcher {
        match_pattern: Some(m::string_matcher::MatchPattern::Prefix(v.into())),
        ignore_case: false,
    }
}

fn any_perm() -> pb::Permission {
    pb::Permission {
        rule: Some(permission::Rule::Any(true)),
    }
}

fn any_id() -> pb::Principal {
    pb::Principal {
        identifier: Some(principal::Identifier::Any(true)),
    }
}

fn path_perm(s: m::StringMatcher) -> pb::Permission {
    pb::Permission {
        rule: Some(permission::Rule::UrlPath(m::PathMatcher {
            rule: Some(m::path_matcher::Rule::Path(s)),
        })),
    }
}

fn header_id(
    name: &str,
    spec: header_matcher::HeaderMatchSpecifier,
    invert: bool,
) -> pb::Principal {
    pb::Principal {
        identifier: Some(principal::Identifier::Header(HeaderMatcher {
            name: name.into(),
            header_match_specifier: Some(spec),
            invert_match: invert,
            ..Default::default()
        })),
    }
}

fn cidr(ip: &str, len: u32) -> CidrRange {
    CidrRange {
        address_prefix: ip.into(),
        prefix_len: Some(UInt32Value { value: len }),
    }
}

fn policy(perms: Vec<pb::Permission>, ids: Vec<pb::Principal>) -> pb::Policy {
    pb::Policy {
        permissions: perms,
        principals: ids,
        ..Default::default()
    }
}

fn rbac(action: pb::rbac::Action, policies: Vec<(&str, pb::Policy)>) -> pb::Rbac {
    pb::Rbac {
        action: action as i32,
        policies: policies
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        ..Default::default()
    }
}

struct Req {
    method: &'static str,
    path: &'static str,
    headers: http::HeaderMap,
    metadata: DynamicMetadata,
    peer: SocketAddr,
    remote: IpAddr,
    security: crate::tls::Security,
}

impl Req {
    fn new(method: &'static str, path: &'static str) -> Req {
        Req {
            method,
            path,
            headers: http::HeaderMap::new(),
            metadata: DynamicMetadata::default(),
            peer: "10.0.0.9:5555".parse().unwrap(),
            remote: "10.0.0.9".parse().unwrap(),
            security: crate::tls::Security::plaintext(),
        }
    }

    fn header(mut self, k: &'static str, v: &'static str) -> Req {
        self.headers.append(k, http::HeaderValue::from_static(v));
        self
    }

    fn facts(&self) -> Facts<'_> {
        Facts {
            peer: self.peer,
            remote_ip: self.remote,
            local: "10.0.0.1:8080".parse().unwrap(),
            security: &self.security,
            sni: None,
            request: Some(RequestFacts {
                method: self.method,
                path: self.path,
                authority: "web.foo:8080",
                headers: &self.headers,
                metadata: &self.metadata,
            }),
        }
    }
}

fn http_filter(rules: Option<pb::Rbac>, shadow: Option<pb::Rbac>, prefix: &str) -> HttpRbac {
    http_rbac(
        &HttpProto {
            rules,
            shadow_rules: shadow,
            shadow_rules_stat_prefix: "istio_dry_run_deny_".into(),
            ..Default::default()
        },
        prefix,
    )
    .unwrap()
}

fn stat(name: &str) -> u64 {
    stats()
        .into_iter()
        .find(|(k, _)| k == name)
        .map_or(0, |(_, v)| v)
}

#[test]
fn allow_deny_and_the_policy_named_in_the_denial() {
    use pb::rbac::Action;
    let allow = http_filter(
        Some(rbac(
            Action::Allow,
            vec![(
                "ns[foo]-policy[a]-rule[0]",
                policy(vec![path_perm(prefix("/api/"))], vec![any_id()]),
            )],
        )),
        None,
        "t1",
    );
    assert_eq!(
        allow.check(&Req::new("GET", "/api/x").facts()),
        Verdict::Allow
    );
    assert_eq!(
        allow.check(&Req::new("GET", "/other").facts()),
        Verdict::Deny(None)
    );
    // url_path ignores the query.
    let exact_path = http_filter(
        Some(rbac(
            Action::Allow,
            vec![(
                "p",
                policy(vec![path_perm(exact("/exact"))], vec![any_id()]),
            )],
        )),
        None,
        "t1b",
    );
    assert_eq!(
        exact_path.check(&Req::new("GET", "/exact?q=1").facts()),
        Verdict::Allow
    );
    assert_eq!(
        exact_path.check(&Req::new("GET", "/exact/more").facts()),
        Verdict::Deny(None)
    );

    let deny = http_filter(
        Some(rbac(
            Action::Deny,
            vec![
                (
                    "b-rule",
                    policy(vec![path_perm(prefix("/admin"))], vec![any_id()]),
                ),
                (
                    "a-rule",
                    policy(vec![path_perm(prefix("/adm"))], vec![any_id()]),
                ),
            ],
        )),
        None,
        "t2",
    );
    // Policies are tried in name order: the first match is reported.
    assert_eq!(
        deny.check(&Req::new("GET", "/admin").facts()),
        Verdict::Deny(Some("a-rule"))
    );
    assert_eq!(deny.check(&Req::new("GET", "/x").facts()), Verdict::Allow);
    assert_eq!(stat("http.t2.rbac.denied"), 1);
    assert_eq!(stat("http.t2.rbac.allowed"), 1);
}

#[test]
fn log_never_denies_and_shadow_rules_are_only_counted() {
    use pb::rbac::Action;
    let audit = http_rbac(
        &HttpProto {
            rules: Some(rbac(
                Action::Log,
                vec![(
                    "r",
                    policy(vec![path_perm(prefix("/audited"))], vec![any_id()]),
                )],
            )),
            rules_stat_prefix: "istio_audit_".into(),
            track_per_rule_stats: true,
            ..Default::default()
        },
        "t3",
    )
    .unwrap();
    assert_eq!(
        audit.check(&Req::new("GET", "/audited/1").facts()),
        Verdict::Allow
    );
    assert_eq!(
        audit.check(&Req::new("GET", "/not").facts()),
        Verdict::Allow
    );
    assert_eq!(stat("http.t3.rbac.istio_audit_.policy.r.allowed"), 1);

    let dry = http_filter(
        None,
        Some(rbac(
            Action::Deny,
            vec![("r", policy(vec![any_perm()], vec![any_id()]))],
        )),
        "t4",
    );
    assert_eq!(dry.check(&Req::new("PUT", "/").facts()), Verdict::Allow);
    assert_eq!(stat("http.t4.rbac.istio_dry_run_deny_shadow_denied"), 1);
}

#[test]
fn headers_follow_envoys_missing_and_repeated_rules() {
    use header_matcher::HeaderMatchSpecifier as H;
    use pb::rbac::Action;
    let f = |id: pb::Principal| {
        http_filter(
            Some(rbac(
                Action::Allow,
                vec![("p", policy(vec![any_perm()], vec![id]))],
            )),
            None,
            "t5",
        )
    };
    let present = f(header_id("x-evil", H::PresentMatch(true), false));
    assert_eq!(
        present.check(&Req::new("GET", "/").facts()),
        Verdict::Deny(None)
    );
    assert_eq!(
        present.check(&Req::new("GET", "/").header("x-evil", "1").facts()),
        Verdict::Allow
    );
    // An inverted string match does not match a missing header (Envoy).
    let inverted = f(header_id("x-t", H::StringMatch(exact("a")), true));
    assert_eq!(
        inverted.check(&Req::new("GET", "/").facts()),
        Verdict::Deny(None)
    );
    assert_eq!(
        inverted.check(&Req::new("GET", "/").header("x-t", "b").facts()),
        Verdict::Allow
    );
    // Repeated headers are matched joined by ','.
    let joined = f(header_id("x-t", H::StringMatch(exact("a,b")), false));
    let r = Req::new("GET", "/").header("x-t", "a").header("x-t", "b");
    assert_eq!(joined.check(&r.facts()), Verdict::Allow);
    let method = f(header_id(":method", H::StringMatch(exact("POST")), false));
    assert_eq!(method.check(&Req::new("POST", "/").facts()), Verdict::Allow);
    assert_eq!(
        method.check(&Req::new("GET", "/").facts()),
        Verdict::Deny(None)
    );
}

#[test]
fn peers_addresses_and_identities() {
    use pb::rbac::Action;
    let ids = vec![pb::Principal {
        identifier: Some(principal::Identifier::AndIds(principal::Set {
            ids: vec![
                pb::Principal {
                    identifier: Some(principal::Identifier::Authenticated(
                        principal::Authenticated {
                            principal_name: Some(exact("spiffe://cluster.local/ns/a/sa/b")),
                        },
                    )),
                },
                pb::Principal {
                    identifier: Some(principal::Identifier::DirectRemoteIp(cidr("10.0.0.0", 24))),
                },
            ],
        })),
    }];
    let f = http_filter(
        Some(rbac(
            Action::Allow,
            vec![("p", policy(vec![any_perm()], ids))],
        )),
        None,
        "t6",
    );
    let mut r = Req::new("GET", "/");
    assert_eq!(
        f.check(&r.facts()),
        Verdict::Deny(None),
        "plaintext: no principal"
    );
    r.security.tls = true;
    r.security.mutual = true;
    r.security.peer_principal = Some(Arc::from("spiffe://cluster.local/ns/a/sa/b"));
    assert_eq!(f.check(&r.facts()), Verdict::Allow);
    r.peer = "10.0.1.9:1".parse().unwrap();
    assert_eq!(
        f.check(&r.facts()),
        Verdict::Deny(None),
        "peer outside the block"
    );

    let remote = http_filter(
        Some(rbac(
            Action::Allow,
            vec![(
                "p",
                policy(
                    vec![any_perm()],
                    vec![pb::Principal {
                        identifier: Some(principal::Identifier::RemoteIp(cidr("192.0.2.0", 24))),
                    }],
                ),
            )],
        )),
        None,
        "t7",
    );
    let mut r = Req::new("GET", "/");
    r.remote = "192.0.2.7".parse().unwrap();
    assert_eq!(remote.check(&r.facts()), Verdict::Allow);
}

#[test]
fn remote_ip_from_x_forwarded_for() {
    let peer: IpAddr = "10.0.0.9".parse().unwrap();
    let xff = http::HeaderValue::from_static("203.0.113.1, 198.51.100.2");
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    // Sidecar (use_remote_address false): the rightmost entry.
    assert_eq!(remote_ip(Some(&xff), peer, false, 0), ip("198.51.100.2"));
    assert_eq!(remote_ip(Some(&xff), peer, false, 1), ip("203.0.113.1"));
    assert_eq!(remote_ip(Some(&xff), peer, false, 2), peer);
    assert_eq!(remote_ip(None, peer, false, 0), peer);
    // Gateway (use_remote_address true): the peer, or the Nth entry with trusted hops.
    assert_eq!(remote_ip(Some(&xff), peer, true, 0), peer);
    assert_eq!(remote_ip(Some(&xff), peer, true, 1), ip("198.51.100.2"));
}

#[test]
fn jwt_metadata_claims() {
    use pb::rbac::Action;
    let md = |path: &[&str], value: m::ValueMatcher| pb::Principal {
        identifier: Some(principal::Identifier::SourcedMetadata(
            pb::SourcedMetadata {
                metadata_matcher: Some(m::MetadataMatcher {
                    filter: JWT_AUTHN.into(),
                    path: path
                        .iter()
                        .map(|k| m::metadata_matcher::PathSegment {
                            segment: Some(m::metadata_matcher::path_segment::Segment::Key(
                                (*k).into(),
                            )),
                        })
                        .collect(),
                    value: Some(value),
                    invert: false,
                }),
                metadata_source: pb::MetadataSource::Dynamic as i32,
            },
        )),
    };
    let s = |v: &str| m::ValueMatcher {
        match_pattern: Some(m::value_matcher::MatchPattern::StringMatch(exact(v))),
    };
    let one_of = |v: &str| m::ValueMatcher {
        match_pattern: Some(m::value_matcher::MatchPattern::ListMatch(Box::new(
            m::ListMatcher {
                match_pattern: Some(m::list_matcher::MatchPattern::OneOf(Box::new(s(v)))),
            },
        ))),
    };
    let f = http_filter(
        Some(rbac(
            Action::Allow,
            vec![
                (
                    "sub",
                    policy(
                        vec![path_perm(exact("/sub"))],
                        vec![md(&["iss", "sub"], s("alice"))],
                    ),
                ),
                (
                    "groups",
                    policy(
                        vec![path_perm(exact("/groups"))],
                        vec![md(&["iss", "groups"], one_of("admin"))],
                    ),
                ),
                (
                    "nested",
                    policy(
                        vec![path_perm(exact("/nested"))],
                        vec![md(&["iss", "org", "role"], s("owner"))],
                    ),
                ),
            ],
        )),
        None,
        "t8",
    );
    let mut r = Req::new("GET", "/sub");
    assert_eq!(f.check(&r.facts()), Verdict::Deny(None), "no token");
    r.metadata.set(
        JWT_AUTHN,
        "iss",
        json!({"sub": "alice", "groups": ["dev", "admin"], "org": {"role": "owner"}}),
    );
    assert_eq!(f.check(&r.facts()), Verdict::Allow);
    r.path = "/groups";
    assert_eq!(f.check(&r.facts()), Verdict::Allow);
    r.path = "/nested";
    assert_eq!(f.check(&r.facts()), Verdict::Allow);
    let mut r = Req::new("GET", "/groups");
    r.metadata.set(
        JWT_AUTHN,
        "iss",
        json!({"sub": "bob", "groups": ["dev"], "org": {"role": "dev"}}),
    );
    assert_eq!(f.check(&r.facts()), Verdict::Deny(None));
    r.path = "/nested";
    assert_eq!(f.check(&r.facts()), Verdict::Deny(None));
}

#[test]
fn network_filter_on_ports_and_sni_without_a_request() {
    use pb::rbac::Action;
    let f = network_rbac(&NetProto {
        rules: Some(rbac(
            Action::Deny,
            vec![(
                "p",
                policy(
                    vec![pb::Permission {
                        rule: Some(permission::Rule::DestinationPort(9000)),
                    }],
                    vec![any_id()],
                ),
            )],
        )),
        stat_prefix: "tcp.".into(),
        ..Default::default()
    })
    .unwrap();
    let sec = crate::tls::Security::plaintext();
    let facts = |port: u16| Facts {
        peer: "10.0.0.9:1".parse().unwrap(),
        remote_ip: "10.0.0.9".parse().unwrap(),
        local: SocketAddr::new("10.0.0.1".parse().unwrap(), port),
        security: &sec,
        sni: None,
        request: None,
    };
    assert_eq!(f.check(&facts(9000)), Verdict::Deny(Some("p")));
    assert_eq!(f.check(&facts(9001)), Verdict::Allow);
}

#[test]
fn what_cannot_be_evaluated_is_rejected_with_its_field() {
    use pb::rbac::Action;
    let mut p = policy(vec![any_perm()], vec![any_id()]);
    p.condition = Some(Default::default());
    let e = http_rbac(
        &HttpProto {
            rules: Some(rbac(Action::Allow, vec![("x", p)])),
            ..Default::default()
        },
        "t9",
    )
    .unwrap_err();
    assert_eq!(e.field, "rules.policies[x].condition");
    let route_md = pb::Principal {
        identifier: Some(principal::Identifier::SourcedMetadata(
            pb::SourcedMetadata {
                metadata_matcher: None,
                metadata_source: pb::MetadataSource::Route as i32,
            },
        )),
    };
    let e = http_rbac(
        &HttpProto {
            shadow_rules: Some(rbac(
                Action::Deny,
                vec![("y", policy(vec![any_perm()], vec![route_md]))],
            )),
            ..Default::default()
        },
        "t9",
    )
    .unwrap_err();
    assert_eq!(
        e.field,
        "shadow_rules.policies[y].principals[0].sourced_metadata.metadata_source"
    );
}
