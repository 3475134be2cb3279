//! Locality load balancing as Istio defines it: where a proxy sits, how an endpoint's
//! locality ranks against it, and the typed `localityLbSetting` of a DestinationRule.
//!
//! The ranking is Istio's: same region/zone/subzone = 0, same region/zone = 1, same region
//! = 2, else 3 (4 when a `failover` rule for the proxy's region names another region). The
//! xDS endpoint generator turns ranks into EDS priorities.

use crate::proxy::Proxy;
use crate::service::{Labels, Locality};
use serde::Deserialize;

/// Kubernetes' and Istio's locality labels (also the labels `failoverPriority` names).
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";
/// Istio's explicit locality label, `region.zone.subzone`.
pub const ISTIO_LOCALITY_LABEL: &str = "istio-locality";

impl Locality {
    /// The locality a set of labels declares: `istio-locality` (`region.zone.subzone`)
    /// first, else the topology labels.
    pub fn from_labels(labels: &Labels) -> Locality {
        if let Some(l) = labels.get(ISTIO_LOCALITY_LABEL) {
            return Locality::parse(&l.replace('.', "/"));
        }
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        Locality {
            region: get(REGION_LABEL),
            zone: get(ZONE_LABEL),
            sub_zone: get(SUBZONE_LABEL),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.region.is_empty() && self.zone.is_empty() && self.sub_zone.is_empty()
    }

    /// Istio's `LocalityMatch`: `rule` is `region[/zone[/subzone]]`, `*` matching anything;
    /// a missing zone or subzone matches anything too.
    pub fn matches(&self, rule: &str) -> bool {
        let mut it = rule.split('/');
        let region = it.next().unwrap_or("");
        let zone = it.next().unwrap_or("");
        let sub_zone = it.next().unwrap_or("");
        (region == "*" || region == self.region)
            && (zone == "*" || zone.is_empty() || zone == self.zone)
            && (sub_zone == "*" || sub_zone.is_empty() || sub_zone == self.sub_zone)
    }

    /// Istio's `LbPriority` of an endpoint in `endpoint` seen from a proxy in `self`.
    pub fn rank(&self, endpoint: &Locality) -> u32 {
        if self.region != endpoint.region {
            3
        } else if self.zone != endpoint.zone {
            2
        } else if self.sub_zone != endpoint.sub_zone {
            1
        } else {
            0
        }
    }

    /// The labels Istio adds to a workload's own for `failoverPriority` matching.
    pub fn augment(&self, labels: &Labels) -> Labels {
        let mut out = labels.clone();
        for (k, v) in [
            (REGION_LABEL, &self.region),
            (ZONE_LABEL, &self.zone),
            (SUBZONE_LABEL, &self.sub_zone),
        ] {
            if !v.is_empty() {
                out.insert(k.to_string(), v.clone());
            }
        }
        out
    }
}

impl Proxy {
    /// Where the proxy sits, as istiod decides: the xDS node's `locality` when set, else the
    /// locality of the registry workload it fronts, else its metadata labels'.
    pub fn locality(&self) -> Locality {
        if !self.node_locality.is_empty() {
            return self.node_locality.clone();
        }
        match &self.workload {
            Some(w) if !w.locality.is_empty() => w.locality.clone(),
            _ => Locality::from_labels(&self.labels),
        }
    }
}

/// A DestinationRule's `loadBalancer.localityLbSetting` (validated by the config crate).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LocalityLbSetting {
    pub distribute: Vec<Distribute>,
    pub failover: Vec<Failover>,
    pub failover_priority: Vec<String>,
    pub enabled: Option<bool>,
}

/// `distribute[]`: from the proxy's locality (pattern) to weighted endpoint localities.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Distribute {
    pub from: String,
    pub to: std::collections::BTreeMap<String, u32>,
}

/// `failover[]`: from one region to another (regions only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Failover {
    pub from: String,
    pub to: String,
}

impl LocalityLbSetting {
    /// Istio's `GetLocalityLbSetting`: the rule's setting unless it disables locality load
    /// balancing; without one, the mesh default, which is enabled with no rules.
    /// A value the validator let through but that does not parse counts as unset.
    pub fn effective(rule: Option<&serde_json::Value>) -> Option<LocalityLbSetting> {
        match rule {
            Some(v) => match LocalityLbSetting::deserialize(v) {
                Ok(s) if s.enabled == Some(false) => None,
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "localityLbSetting does not parse; using the mesh default");
                    Some(LocalityLbSetting::default())
                }
            },
            None => Some(LocalityLbSetting::default()),
        }
    }

    /// Does this setting make Envoy weigh localities (`locality_weighted_lb_config`)? As
    /// istiod: `distribute`, or explicit failover rules when outlier detection is on.
    pub fn locality_weighted(&self, outlier_detection: bool) -> bool {
        !self.distribute.is_empty()
            || (outlier_detection
                && (!self.failover.is_empty() || !self.failover_priority.is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(s: &str) -> Locality {
        Locality::parse(s)
    }

    #[test]
    fn ranks_as_istio() {
        let me = loc("r1/z1/s1");
        assert_eq!(me.rank(&loc("r1/z1/s1")), 0);
        assert_eq!(me.rank(&loc("r1/z1/s2")), 1);
        assert_eq!(me.rank(&loc("r1/z2/s1")), 2);
        assert_eq!(me.rank(&loc("r2/z1/s1")), 3);
        assert_eq!(Locality::default().rank(&Locality::default()), 0);
    }

    #[test]
    fn matches_patterns() {
        let l = loc("us/east/a");
        assert!(l.matches("us/east/a"));
        assert!(l.matches("us/*"));
        assert!(l.matches("us"));
        assert!(l.matches("*"));
        assert!(l.matches("us/east/*"));
        assert!(!l.matches("us/west/*"));
        assert!(!l.matches("eu/*"));
    }

    #[test]
    fn locality_from_labels() {
        let mut labels = Labels::new();
        labels.insert(REGION_LABEL.into(), "r".into());
        labels.insert(ZONE_LABEL.into(), "z".into());
        assert_eq!(Locality::from_labels(&labels), loc("r/z"));
        labels.insert(ISTIO_LOCALITY_LABEL.into(), "a.b.c".into());
        assert_eq!(Locality::from_labels(&labels), loc("a/b/c"));
    }

    #[test]
    fn setting_parses_and_disables() {
        let v =
            serde_json::json!({"distribute": [{"from": "r1/*", "to": {"r1/*": 80, "r2/*": 20}}]});
        let s = LocalityLbSetting::effective(Some(&v)).expect("enabled");
        assert_eq!(s.distribute[0].to.get("r2/*"), Some(&20));
        assert!(s.locality_weighted(false));
        let off = serde_json::json!({"enabled": false});
        assert!(LocalityLbSetting::effective(Some(&off)).is_none());
        let d = LocalityLbSetting::effective(None).expect("mesh default");
        assert!(!d.locality_weighted(true));
        let f = serde_json::json!({"failover": [{"from": "r1", "to": "r2"}]});
        let f = LocalityLbSetting::effective(Some(&f)).expect("enabled");
        assert!(f.locality_weighted(true) && !f.locality_weighted(false));
    }
}
