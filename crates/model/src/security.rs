//! Security indexes of the push context: which PeerAuthentication governs a workload, and the
//! identities a service's endpoints run as (for auto mTLS and DestinationRule ISTIO_MUTUAL).
//!
//! PeerAuthentication is resolved as Istio's `pilot/pkg/security/authn` does: the workload's
//! own policy (selector in its namespace) over the namespace policy (no selector) over the
//! mesh policy (no selector, root namespace). `UNSET` inherits from the next level up; the
//! mesh default is PERMISSIVE. `portLevelMtls` counts only on a workload policy (validation
//! rejects it elsewhere) and its keys are the workload's (target) ports. Several policies at
//! one level: Istio takes the oldest; files have no creation time, so the first by name wins.

use crate::service::{selector_matches, Labels};
use mizzen_config::security::{MtlsMode, PeerAuthentication};
use std::collections::BTreeMap;

/// What the inbound side of one workload accepts (never `Unset`: already inherited).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EffectiveMtls {
    pub mode: MtlsMode,
    /// Target port -> mode, for the ports the workload policy overrides.
    pub ports: BTreeMap<u16, MtlsMode>,
}

impl EffectiveMtls {
    /// The mode on `port` of the workload.
    pub fn for_port(&self, port: u16) -> MtlsMode {
        self.ports.get(&port).copied().unwrap_or(self.mode)
    }
}

/// A PeerAuthentication with what the index needs to pick it.
#[derive(Clone, Debug)]
pub struct PeerAuthnEntry {
    pub namespace: String,
    pub name: String,
    pub spec: PeerAuthentication,
}

impl PeerAuthnEntry {
    fn selector(&self) -> Option<&Labels> {
        self.spec
            .selector
            .as_ref()
            .map(|s| &s.match_labels)
            .filter(|l| !l.is_empty())
    }

    fn mode(&self) -> MtlsMode {
        self.spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default()
    }
}

/// PeerAuthentications by namespace, each list sorted by name.
#[derive(Clone, Debug, Default)]
pub struct PeerAuthnIndex {
    by_ns: BTreeMap<String, Vec<PeerAuthnEntry>>,
}

impl PeerAuthnIndex {
    pub fn new(mut entries: Vec<PeerAuthnEntry>) -> PeerAuthnIndex {
        entries.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut by_ns: BTreeMap<String, Vec<PeerAuthnEntry>> = BTreeMap::new();
        for e in entries {
            by_ns.entry(e.namespace.clone()).or_default().push(e);
        }
        PeerAuthnIndex { by_ns }
    }

    pub fn is_empty(&self) -> bool {
        self.by_ns.is_empty()
    }

    fn namespace_policy(&self, ns: &str) -> Option<&PeerAuthnEntry> {
        self.by_ns
            .get(ns)
            .and_then(|v| v.iter().find(|e| e.selector().is_none()))
    }

    /// The effective policy for a workload in `namespace` with `labels`; `root_ns` holds the
    /// mesh-wide policy.
    pub fn effective(&self, root_ns: &str, namespace: &str, labels: &Labels) -> EffectiveMtls {
        let inherit = |parent: MtlsMode, own: MtlsMode| match own {
            MtlsMode::Unset => parent,
            m => m,
        };
        let mesh = self
            .namespace_policy(root_ns)
            .map(PeerAuthnEntry::mode)
            .unwrap_or_default();
        let mesh = inherit(MtlsMode::Permissive, mesh);
        let ns_mode = self
            .namespace_policy(namespace)
            .map(PeerAuthnEntry::mode)
            .unwrap_or_default();
        let ns_mode = inherit(mesh, ns_mode);
        let workload = self.by_ns.get(namespace).and_then(|v| {
            v.iter()
                .find(|e| e.selector().is_some_and(|s| selector_matches(s, labels)))
        });
        let Some(w) = workload else {
            return EffectiveMtls {
                mode: ns_mode,
                ports: BTreeMap::new(),
            };
        };
        let mode = inherit(ns_mode, w.mode());
        let ports = w
            .spec
            .port_level_mtls
            .iter()
            .filter_map(|(k, m)| Some((k.parse::<u16>().ok()?, inherit(mode, m.mode))))
            .collect();
        EffectiveMtls { mode, ports }
    }
}

/// Istio's SPIFFE identity of a service account.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// The label Istio's injector puts on pods with a sidecar; endpoints carrying `istio` get
/// mTLS from sidecars that auto-detect it.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";
pub const TLS_MODE_ISTIO: &str = "istio";

#[cfg(test)]
mod tests {
    use super::*;
    use mizzen_config::security::{LabelSelector, Mtls};

    fn pa(
        ns: &str,
        name: &str,
        sel: &[(&str, &str)],
        mode: MtlsMode,
        ports: &[(u16, MtlsMode)],
    ) -> PeerAuthnEntry {
        PeerAuthnEntry {
            namespace: ns.into(),
            name: name.into(),
            spec: PeerAuthentication {
                selector: (!sel.is_empty()).then(|| LabelSelector {
                    match_labels: sel
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                }),
                mtls: Some(Mtls { mode }),
                port_level_mtls: ports
                    .iter()
                    .map(|(p, m)| (p.to_string(), Mtls { mode: *m }))
                    .collect(),
            },
        }
    }

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn default_is_permissive() {
        let idx = PeerAuthnIndex::default();
        let e = idx.effective("istio-system", "default", &labels(&[]));
        assert_eq!(e.mode, MtlsMode::Permissive);
        assert_eq!(e.for_port(80), MtlsMode::Permissive);
    }

    #[test]
    fn levels_override_and_unset_inherits() {
        let idx = PeerAuthnIndex::new(vec![
            pa("istio-system", "default", &[], MtlsMode::Strict, &[]),
            pa("relaxed", "default", &[], MtlsMode::Permissive, &[]),
            pa(
                "relaxed",
                "legacy",
                &[("app", "legacy")],
                MtlsMode::Disable,
                &[],
            ),
            pa(
                "relaxed",
                "web",
                &[("app", "web")],
                MtlsMode::Unset,
                &[(8080, MtlsMode::Strict), (9090, MtlsMode::Unset)],
            ),
            // A selector in the root namespace is a workload policy there, not mesh-wide.
            pa(
                "istio-system",
                "gw",
                &[("app", "x")],
                MtlsMode::Disable,
                &[],
            ),
        ]);
        let e = |ns: &str, l: &[(&str, &str)]| idx.effective("istio-system", ns, &labels(l));
        assert_eq!(e("other", &[("app", "x")]).mode, MtlsMode::Strict);
        assert_eq!(e("relaxed", &[("app", "x")]).mode, MtlsMode::Permissive);
        assert_eq!(e("relaxed", &[("app", "legacy")]).mode, MtlsMode::Disable);
        let web = e("relaxed", &[("app", "web"), ("v", "1")]);
        assert_eq!(
            web.mode,
            MtlsMode::Permissive,
            "UNSET inherits the namespace's"
        );
        assert_eq!(web.for_port(8080), MtlsMode::Strict);
        assert_eq!(
            web.for_port(9090),
            MtlsMode::Permissive,
            "port UNSET inherits"
        );
        assert_eq!(web.for_port(1), MtlsMode::Permissive);
        assert_eq!(e("istio-system", &[("app", "x")]).mode, MtlsMode::Disable);
    }

    #[test]
    fn first_by_name_wins_at_one_level() {
        let idx = PeerAuthnIndex::new(vec![
            pa("ns", "b", &[], MtlsMode::Disable, &[]),
            pa("ns", "a", &[], MtlsMode::Strict, &[]),
        ]);
        assert_eq!(
            idx.effective("istio-system", "ns", &labels(&[])).mode,
            MtlsMode::Strict
        );
    }

    #[test]
    fn spiffe() {
        assert_eq!(
            spiffe_id("cluster.local", "default", "sleep"),
            "spiffe://cluster.local/ns/default/sa/sleep"
        );
    }
}
