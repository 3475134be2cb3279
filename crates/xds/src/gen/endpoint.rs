//! EDS: the endpoints of one `outbound|PORT|SUBSET|FQDN` cluster, grouped by locality and
//! filtered by the subset's labels. Endpoints with a sidecar carry the auto mTLS metadata
//! `envoy.transport_socket_match: {tlsMode: istio}`.

use super::{cluster::service_lb_endpoint, parse_cluster_name};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as ev3;
use mizzen_model::service::{selector_matches, Labels, Locality};
use mizzen_model::{Proxy, PushContext};
use std::collections::BTreeMap;

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
    let mut by_locality: BTreeMap<Locality, Vec<ev3::LbEndpoint>> = BTreeMap::new();
    for ep in push.endpoints(host, port) {
        if let Some(sel) = &subset_labels {
            if !selector_matches(sel, &ep.labels) {
                continue;
            }
        }
        let mut lb = service_lb_endpoint(push, ep);
        lb.health_status = if ep.healthy {
            core::HealthStatus::Healthy as i32
        } else {
            core::HealthStatus::Unhealthy as i32
        };
        by_locality.entry(ep.locality.clone()).or_default().push(lb);
    }
    for (loc, eps) in by_locality {
        let weight: u32 = eps
            .iter()
            .map(|e| {
                e.load_balancing_weight
                    .as_ref()
                    .map(|w| w.value)
                    .unwrap_or(1)
            })
            .sum();
        cla.endpoints.push(ev3::LocalityLbEndpoints {
            locality: Some(core::Locality {
                region: loc.region,
                zone: loc.zone,
                sub_zone: loc.sub_zone,
            }),
            lb_endpoints: eps,
            load_balancing_weight: Some(envoy_types::pb::google::protobuf::UInt32Value {
                value: weight.max(1),
            }),
            ..Default::default()
        });
    }
    cla
}
