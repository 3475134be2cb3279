//! Istio's standard metrics with their standard labels, so existing dashboards work:
//! `istio_requests_total` and `istio_request_duration_milliseconds`, plus the proxy's own
//! counters (rejected xDS updates, in-flight requests).
//!
//! Label values are computed once per request from the route's cluster name
//! (`outbound|PORT|SUBSET|FQDN` -> destination service FQDN, name, namespace).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub response_flags: String,
    pub connection_security_policy: &'static str,
    pub source_principal: String,
    pub destination_principal: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RequestLabels, Histogram>,
    active: Gauge,
}

/// Istio's duration buckets (milliseconds).
const DURATION_BUCKETS: [f64; 15] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RequestLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let active = Gauge::default();
        registry.register(
            "istio_requests",
            "Requests handled by the proxy",
            requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds",
            duration.clone(),
        );
        registry.register(
            "mizzen_proxy_active_requests",
            "Requests in flight",
            active.clone(),
        );
        Metrics {
            registry,
            requests,
            duration,
            active,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }

    pub fn request_started(&self) {
        self.active.inc();
    }

    pub fn request_finished(&self) {
        self.active.dec();
    }

    pub fn active_requests(&self) -> i64 {
        self.active.get()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// (service FQDN, name, namespace) from `outbound|PORT|SUBSET|FQDN`; `unknown` otherwise,
/// which is what Istio reports when it cannot tell.
pub fn destination_service(cluster: &str) -> (String, String, String) {
    let mut it = cluster.splitn(4, '|');
    let host = match (it.next(), it.next(), it.next(), it.next()) {
        (Some("outbound"), Some(_), Some(_), Some(h)) if !h.is_empty() => h,
        _ => return ("unknown".into(), "unknown".into(), "unknown".into()),
    };
    let mut labels = host.split('.');
    let name = labels.next().unwrap_or(host).to_string();
    let ns = match (labels.next(), labels.next()) {
        (Some(ns), Some("svc")) => ns.to_string(),
        _ => "unknown".to_string(),
    };
    (host.to_string(), name, ns)
}

/// (`connection_security_policy`, `source_principal`, `destination_principal`) as Istio
/// reports them: the server side (reporter `destination`) knows whether the downstream
/// connection was mutual TLS (`mutual_tls` / `none`) and the client's principal; the client
/// side reports `unknown` for the policy and the principals of an mTLS upstream connection.
pub fn security_labels(
    reporter: &str,
    downstream: &crate::tls::Security,
    upstream: Option<&crate::tls::Security>,
) -> (&'static str, String, String) {
    let name = |p: &Option<std::sync::Arc<str>>| p.as_deref().unwrap_or("unknown").to_string();
    if reporter == "destination" {
        let policy = if downstream.mutual {
            "mutual_tls"
        } else {
            "none"
        };
        (
            policy,
            name(&downstream.peer_principal),
            name(&downstream.local_principal),
        )
    } else {
        match upstream.filter(|u| u.mutual) {
            Some(u) => ("unknown", name(&u.local_principal), name(&u.peer_principal)),
            None => ("unknown", "unknown".into(), "unknown".into()),
        }
    }
}

/// xDS updates rejected, by type (the admin `/stats` shows them like Envoy's
/// `*.update_rejected`).
#[derive(Debug, Default)]
pub struct Rejected {
    pub cds: AtomicU64,
    pub eds: AtomicU64,
    pub lds: AtomicU64,
    pub rds: AtomicU64,
}

impl Rejected {
    pub fn count(&self, type_url: &str) {
        let c = match type_url {
            crate::xds::CLUSTER => &self.cds,
            crate::xds::ENDPOINT => &self.eds,
            crate::xds::LISTENER => &self.lds,
            _ => &self.rds,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_from_cluster_name() {
        assert_eq!(
            destination_service("outbound|80|v1|web.default.svc.cluster.local"),
            (
                "web.default.svc.cluster.local".into(),
                "web".into(),
                "default".into()
            )
        );
        assert_eq!(
            destination_service("outbound|80||api.internal.example").2,
            "unknown"
        );
        assert_eq!(destination_service("BlackHoleCluster").0, "unknown");
    }
}
