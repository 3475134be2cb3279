//! EDS: the endpoints of one `outbound|PORT|SUBSET|FQDN` cluster, grouped by locality and
//! filtered by the subset's labels. Endpoints with a sidecar carry the auto mTLS metadata
//! `envoy.transport_socket_match: {tlsMode: istio}`.
//!
//! Locality load balancing, per proxy, as istiod does it (the DestinationRule's
//! `localityLbSetting`, else the mesh default, which is enabled):
//! - `distribute`: the first rule whose `from` matches the proxy's locality sets each
//!   locality's weight (a `to` weight shared by the localities it matches, in proportion to
//!   their own weights); localities no `to` names lose their endpoints;
//! - otherwise, only when the rule has outlier detection (without it Envoy would never
//!   leave a priority): `failoverPriority` labels split endpoints into priorities by how many
//!   leading labels they share with the proxy, then (without `failoverPriority`, or with
//!   explicit `failover` too) each locality gets the priority of its rank against the
//!   proxy's locality ([`mizzen_model::service::Locality::rank`]; `failover` pushes regions
//!   it does not name below the one it does). Priorities are compacted to 0..N.

use super::{cluster::service_lb_endpoint, parse_cluster_name};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as ev3;
use envoy_types::pb::google::protobuf::UInt32Value;
use mizzen_model::locality::LocalityLbSetting;
use mizzen_model::service::{selector_matches, Labels, Locality};
use mizzen_model::{Endpoint, Proxy, PushContext};
use std::collections::{BTreeMap, BTreeSet};

/// Always returns an assignment (possibly empty): Envoy waits for one per EDS cluster, and
/// an empty one is how "no healthy upstream" is expressed.
pub fn generate(
    proxy: &Proxy,
    push: &PushContext,
    cluster_name: &str,
) -> ev3::ClusterLoadAssignment {
    let mut cla = ev3::ClusterLoadAssignment {
        cluster_name: cluster_name.to_string(),
        ..Default::default()
    };
    let Some(("outbound", port, subset, host)) = parse_cluster_name(cluster_name) else {
        return cla;
    };
    let subset_labels: Option<Labels> = if subset.is_empty() {
        None
    } else {
        match push
            .destination_rule(&proxy.namespace, host)
            .and_then(|dr| dr.spec.subsets.iter().find(|s| s.name == subset))
        {
            Some(s) => Some(s.labels.clone()),
            // A subset nobody defines selects nothing, as in Istio.
            None => return cla,
        }
    };
    let eps: Vec<&Endpoint> = push
        .endpoints(host, port)
        .iter()
        .filter(|ep| {
            subset_labels
                .as_ref()
                .is_none_or(|sel| selector_matches(sel, &ep.labels))
        })
        .collect();
    let (groups, labels) = locality_groups(push, &eps, true);
    cla.endpoints = groups;
    let policy = super::cluster::traffic_policy(proxy, push, host, port, subset);
    let setting = LocalityLbSetting::effective(
        policy
            .lb
            .as_ref()
            .and_then(|lb| lb.locality_lb_setting.as_ref()),
    );
    if let Some(setting) = setting {
        apply_locality_lb(
            &mut cla,
            Some(&labels),
            proxy,
            &setting,
            policy.outlier.is_some(),
        );
    }
    cla
}

/// The endpoints grouped by locality (sorted), each group weighted by the sum of its
/// endpoints' weights; beside each group, its endpoints' labels with their locality labels
/// added (what `failoverPriority` matches on). `health` sets each endpoint's health status
/// (EDS); inline DNS assignments leave it unset, as istiod does.
pub(crate) fn locality_groups(
    push: &PushContext,
    eps: &[&Endpoint],
    health: bool,
) -> (Vec<ev3::LocalityLbEndpoints>, Vec<Vec<Labels>>) {
    let mut by_locality: BTreeMap<&Locality, Vec<&Endpoint>> = BTreeMap::new();
    for ep in eps {
        by_locality.entry(&ep.locality).or_default().push(ep);
    }
    let mut groups = Vec::new();
    let mut labels = Vec::new();
    for (loc, eps) in by_locality {
        let lb_endpoints: Vec<ev3::LbEndpoint> = eps
            .iter()
            .map(|ep| {
                let mut lb = service_lb_endpoint(push, ep);
                add_workload_metadata(&mut lb, ep);
                if health {
                    lb.health_status = if ep.healthy {
                        core::HealthStatus::Healthy as i32
                    } else {
                        core::HealthStatus::Unhealthy as i32
                    };
                }
                lb
            })
            .collect();
        groups.push(ev3::LocalityLbEndpoints {
            locality: Some(core::Locality {
                region: loc.region.clone(),
                zone: loc.zone.clone(),
                sub_zone: loc.sub_zone.clone(),
            }),
            load_balancing_weight: Some(UInt32Value {
                value: weight_sum(&lb_endpoints).max(1),
            }),
            lb_endpoints,
            ..Default::default()
        });
        labels.push(eps.iter().map(|ep| loc.augment(&ep.labels)).collect());
    }
    (groups, labels)
}

fn weight_sum(eps: &[ev3::LbEndpoint]) -> u32 {
    eps.iter()
        .map(|e| e.load_balancing_weight.as_ref().map_or(1, |w| w.value))
        .fold(0u32, u32::saturating_add)
}

fn model_locality(l: Option<&core::Locality>) -> Locality {
    l.map(|l| Locality {
        region: l.region.clone(),
        zone: l.zone.clone(),
        sub_zone: l.sub_zone.clone(),
    })
    .unwrap_or_default()
}

/// Istio's `ApplyLocalityLoadBalancer` for one proxy. `labels` (parallel to `cla.endpoints`)
/// enables `failoverPriority`; inline DNS assignments pass `None`, as istiod does.
pub(crate) fn apply_locality_lb(
    cla: &mut ev3::ClusterLoadAssignment,
    labels: Option<&[Vec<Labels>]>,
    proxy: &Proxy,
    setting: &LocalityLbSetting,
    outlier_detection: bool,
) {
    let locality = proxy.locality();
    if !setting.distribute.is_empty() {
        apply_weights(cla, &locality, setting);
        return;
    }
    if !outlier_detection {
        return;
    }
    if !setting.failover_priority.is_empty() {
        if let Some(labels) = labels {
            let proxy_labels = locality.augment(proxy.effective_labels());
            apply_failover_priority(cla, labels, &proxy_labels, &setting.failover_priority);
        }
        if setting.failover.is_empty() {
            return;
        }
    }
    apply_failover(cla, &locality, setting);
}

fn apply_weights(cla: &mut ev3::ClusterLoadAssignment, proxy: &Locality, s: &LocalityLbSetting) {
    let Some(rule) = s.distribute.iter().find(|d| proxy.matches(&d.from)) else {
        return;
    };
    let mut unmatched: BTreeSet<usize> = (0..cla.endpoints.len()).collect();
    for (pattern, weight) in &rule.to {
        let matched: Vec<(usize, u32)> = cla
            .endpoints
            .iter()
            .enumerate()
            .filter(|(i, g)| {
                unmatched.contains(i) && model_locality(g.locality.as_ref()).matches(pattern)
            })
            .map(|(i, g)| (i, g.load_balancing_weight.as_ref().map_or(1, |w| w.value)))
            .collect();
        let total: u64 = matched.iter().map(|(_, w)| u64::from(*w)).sum();
        for (i, own) in matched {
            unmatched.remove(&i);
            // The rule's weight shared in proportion to each locality's own, rounded up.
            let w = (u64::from(own) * u64::from(*weight)).div_ceil(total.max(1));
            if w > 0 {
                cla.endpoints[i].load_balancing_weight = Some(UInt32Value {
                    value: u32::try_from(w).unwrap_or(u32::MAX),
                });
            }
        }
    }
    for i in unmatched {
        cla.endpoints[i].lb_endpoints.clear();
    }
}

fn apply_failover(cla: &mut ev3::ClusterLoadAssignment, proxy: &Locality, s: &LocalityLbSetting) {
    for g in &mut cla.endpoints {
        let ep = model_locality(g.locality.as_ref());
        let mut rank = proxy.rank(&ep);
        if rank == 3 {
            if let Some(f) = s.failover.iter().find(|f| f.from == proxy.region) {
                if ep.region != f.to {
                    rank = 4;
                }
            }
        }
        // Keep the order failoverPriority already set: five locality ranks per level.
        g.priority = g.priority.saturating_mul(5).saturating_add(rank);
    }
    compact_priorities(&mut cla.endpoints);
}

/// Split each locality by how many leading `failover_priority` labels an endpoint shares
/// with the proxy (all = priority 0, none of the first = N). `label=value` compares with a
/// fixed value instead of the proxy's.
fn apply_failover_priority(
    cla: &mut ev3::ClusterLoadAssignment,
    labels: &[Vec<Labels>],
    proxy_labels: &Labels,
    keys: &[String],
) {
    if proxy_labels.is_empty() {
        return;
    }
    let keys: Vec<(&str, Option<&str>)> = keys
        .iter()
        .map(|k| match k.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (k.as_str(), None),
        })
        .collect();
    let mut out = Vec::new();
    for (g, eps_labels) in cla.endpoints.iter().zip(labels) {
        let mut by_priority: BTreeMap<u32, Vec<ev3::LbEndpoint>> = BTreeMap::new();
        for (ep, l) in g.lb_endpoints.iter().zip(eps_labels) {
            let mismatch = keys.iter().position(|(k, fixed)| {
                let want = fixed.or_else(|| proxy_labels.get(*k).map(String::as_str));
                want != l.get(*k).map(String::as_str)
            });
            let p = mismatch.map_or(0, |j| keys.len() - j);
            by_priority
                .entry(u32::try_from(p).unwrap_or(u32::MAX))
                .or_default()
                .push(ep.clone());
        }
        for (priority, eps) in by_priority {
            out.push(ev3::LocalityLbEndpoints {
                priority,
                load_balancing_weight: Some(UInt32Value {
                    value: weight_sum(&eps),
                }),
                lb_endpoints: eps,
                ..g.clone()
            });
        }
    }
    compact_priorities(&mut out);
    cla.endpoints = out;
}

/// Envoy wants priorities 0..N without gaps.
fn compact_priorities(groups: &mut [ev3::LocalityLbEndpoints]) {
    let used: BTreeSet<u32> = groups.iter().map(|g| g.priority).collect();
    let index: BTreeMap<u32, u32> = used
        .into_iter()
        .enumerate()
        .map(|(i, p)| (p, u32::try_from(i).unwrap_or(u32::MAX)))
        .collect();
    for g in groups {
        g.priority = index.get(&g.priority).copied().unwrap_or(g.priority);
    }
}

/// istiod's endpoint metadata for telemetry, `istio: {workload: "name;namespace;
/// canonical-service;canonical-revision;cluster"}`: a client sidecar labels its metrics'
/// `destination_*` from it when the destination sent no peer metadata (TCP, no sidecar).
fn add_workload_metadata(lb: &mut ev3::LbEndpoint, ep: &mizzen_model::service::Endpoint) {
    use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
    if ep.workload.is_empty() {
        return;
    }
    let label = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| ep.labels.get(*k).filter(|v| !v.is_empty()))
            .cloned()
    };
    let service = label(&[
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ])
    .unwrap_or_else(|| ep.workload.clone());
    let revision = label(&[
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ])
    .unwrap_or_else(|| "latest".to_string());
    // One cluster: Istio's default cluster ID, the one the agent reports as CLUSTER_ID.
    let value = format!(
        "{};{};{service};{revision};Kubernetes",
        ep.workload, ep.namespace
    );
    let istio = Struct {
        fields: [(
            "workload".to_string(),
            Value {
                kind: Some(Kind::StringValue(value)),
            },
        )]
        .into_iter()
        .collect(),
    };
    lb.metadata
        .get_or_insert_with(Default::default)
        .filter_metadata
        .insert("istio".to_string(), istio);
}

#[cfg(test)]
mod workload_tests {
    use super::*;
    use envoy_types::pb::google::protobuf::value::Kind;

    fn workload_of(lb: &ev3::LbEndpoint) -> Option<String> {
        let v = lb
            .metadata
            .as_ref()?
            .filter_metadata
            .get("istio")?
            .fields
            .get("workload")?;
        match &v.kind {
            Some(Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        }
    }

    #[test]
    fn endpoints_carry_istiods_workload_metadata() {
        let mut ep = mizzen_model::service::Endpoint {
            address: "10.0.0.7".into(),
            port: 9080,
            labels: [("app", "reviews"), ("version", "v2")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            service_account: "reviews".into(),
            locality: Locality::default(),
            weight: 1,
            workload: "reviews-v2".into(),
            namespace: "shop".into(),
            healthy: true,
        };
        let mut lb = ev3::LbEndpoint::default();
        add_workload_metadata(&mut lb, &ep);
        assert_eq!(
            workload_of(&lb).as_deref(),
            Some("reviews-v2;shop;reviews;v2;Kubernetes")
        );
        // The canonical labels win; the tlsMode metadata next to it stays.
        ep.labels.insert(
            "service.istio.io/canonical-name".into(),
            "reviews-svc".into(),
        );
        ep.labels.remove("version");
        let mut lb = ev3::LbEndpoint {
            metadata: Some(super::super::tls::endpoint_tls_metadata()),
            ..Default::default()
        };
        add_workload_metadata(&mut lb, &ep);
        assert_eq!(
            workload_of(&lb).as_deref(),
            Some("reviews-v2;shop;reviews-svc;latest;Kubernetes")
        );
        assert_eq!(lb.metadata.unwrap().filter_metadata.len(), 2);
        // No workload (a ServiceEntry address): nothing to say.
        ep.workload.clear();
        let mut lb = ev3::LbEndpoint::default();
        add_workload_metadata(&mut lb, &ep);
        assert!(lb.metadata.is_none());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mizzen_model::locality::{Distribute, Failover};

    fn proxy(locality: &str, labels: &[(&str, &str)]) -> Proxy {
        let md = serde_json::json!({
            "LABELS": labels.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
        });
        let mut p =
            Proxy::from_node("sidecar~10.0.0.1~a.ns~ns.svc.cluster.local", &md).expect("node id");
        p.node_locality = Locality::parse(locality);
        p
    }

    fn group(locality: &str, n: usize) -> ev3::LocalityLbEndpoints {
        let l = Locality::parse(locality);
        ev3::LocalityLbEndpoints {
            locality: Some(core::Locality {
                region: l.region,
                zone: l.zone,
                sub_zone: l.sub_zone,
            }),
            lb_endpoints: (0..n)
                .map(|i| super::super::cluster::lb_endpoint(&format!("10.0.0.{i}"), 80, 1))
                .collect(),
            load_balancing_weight: Some(UInt32Value {
                value: u32::try_from(n).unwrap_or(1),
            }),
            ..Default::default()
        }
    }

    fn cla(groups: Vec<ev3::LocalityLbEndpoints>) -> ev3::ClusterLoadAssignment {
        ev3::ClusterLoadAssignment {
            cluster_name: "c".into(),
            endpoints: groups,
            ..Default::default()
        }
    }

    fn priorities(c: &ev3::ClusterLoadAssignment) -> Vec<u32> {
        c.endpoints.iter().map(|g| g.priority).collect()
    }

    #[test]
    fn default_failover_ranks_and_compacts() {
        let mut c = cla(vec![
            group("r1/z1/s1", 1),
            group("r1/z1/s2", 1),
            group("r2/z1/s1", 1),
            group("r1/z2/s1", 1),
        ]);
        let p = proxy("r1/z1/s1", &[]);
        apply_locality_lb(&mut c, None, &p, &LocalityLbSetting::default(), true);
        assert_eq!(priorities(&c), vec![0, 1, 3, 2]);
        // Without outlier detection nothing changes.
        let mut c = cla(vec![group("r1/z1/s1", 1), group("r2/z1/s1", 1)]);
        apply_locality_lb(&mut c, None, &p, &LocalityLbSetting::default(), false);
        assert_eq!(priorities(&c), vec![0, 0]);
        // Gaps are closed: ranks 0 and 3 become 0 and 1.
        let mut c = cla(vec![group("r1/z1/s1", 1), group("r2/z1/s1", 1)]);
        apply_locality_lb(&mut c, None, &p, &LocalityLbSetting::default(), true);
        assert_eq!(priorities(&c), vec![0, 1]);
    }

    #[test]
    fn failover_region_rule() {
        let mut c = cla(vec![
            group("r2/z/s", 1),
            group("r3/z/s", 1),
            group("r1/z/s", 1),
        ]);
        let s = LocalityLbSetting {
            failover: vec![Failover {
                from: "r1".into(),
                to: "r3".into(),
            }],
            ..Default::default()
        };
        apply_locality_lb(&mut c, None, &proxy("r1/z/s", &[]), &s, true);
        // r1 = 0, r3 (named) = rank 3 -> 1, r2 = rank 4 -> 2.
        assert_eq!(priorities(&c), vec![2, 1, 0]);
    }

    #[test]
    fn distribute_weights_and_drops_unnamed_localities() {
        let mut c = cla(vec![
            group("r1/z1/s1", 1),
            group("r1/z2/s1", 1),
            group("r1/z2/s2", 3),
            group("r2/z1/s1", 1),
        ]);
        let s = LocalityLbSetting {
            distribute: vec![
                Distribute {
                    from: "r9/*".into(),
                    to: [("r2/*".to_string(), 100)].into(),
                },
                Distribute {
                    from: "r1/z1/*".into(),
                    to: [("r1/z1/*".to_string(), 80), ("r1/z2/*".to_string(), 20)].into(),
                },
            ],
            ..Default::default()
        };
        apply_locality_lb(&mut c, None, &proxy("r1/z1/s1", &[]), &s, false);
        let w: Vec<u32> = c
            .endpoints
            .iter()
            .map(|g| g.load_balancing_weight.as_ref().map_or(0, |w| w.value))
            .collect();
        // 20 shared 1:3 between the two z2 localities, rounded up.
        assert_eq!(w, vec![80, 5, 15, 1]);
        assert!(c.endpoints[3].lb_endpoints.is_empty(), "r2 is not named");
        assert_eq!(priorities(&c), vec![0, 0, 0, 0]);
    }

    #[test]
    fn failover_priority_splits_by_labels() {
        let mut c = cla(vec![group("r1/z1/s1", 3)]);
        let lab = |net: &str, ver: &str| -> Labels {
            [
                ("net".to_string(), net.to_string()),
                ("version".to_string(), ver.to_string()),
            ]
            .into()
        };
        let labels = vec![vec![lab("n1", "v1"), lab("n1", "v2"), lab("n2", "v1")]];
        let s = LocalityLbSetting {
            failover_priority: vec!["net".into(), "version".into()],
            ..Default::default()
        };
        let p = proxy("r1/z1/s1", &[("net", "n1"), ("version", "v1")]);
        apply_locality_lb(&mut c, Some(&labels), &p, &s, true);
        let got: Vec<(u32, usize)> = c
            .endpoints
            .iter()
            .map(|g| (g.priority, g.lb_endpoints.len()))
            .collect();
        // All match = 0, first only = 1, none = 2.
        assert_eq!(got, vec![(0, 1), (1, 1), (2, 1)]);
    }
}
