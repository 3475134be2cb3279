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
        add_workload_metadata(&mut lb, ep);
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
