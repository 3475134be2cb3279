//! The immutable, compiled view of the whole config that the data path reads.
//!
//! The xDS client keeps the last accepted (already converted) resources of each type in
//! [`Resources`]; after every accepted response it builds a new [`Snapshot`] from them, outside
//! any lock, and publishes it with one `ArcSwap::store`. Requests `load()` the current
//! snapshot and never block on config updates. Virtual hosts are indexed for Envoy's domain
//! lookup order (exact, longest `*.suffix`, longest `prefix*`, `*`); regexes were compiled
//! when the resources were converted.

use crate::cluster::ClusterLb;
use crate::config::{
    Cluster, Endpoints, Listener, NetworkFilter, RouteConfig, RouteSource, VirtualHost,
};
use crate::metrics::FxMap;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// The converted resources currently in force, by name, with the version they came in.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    pub clusters: BTreeMap<String, Arc<Cluster>>,
    pub endpoints: BTreeMap<String, Arc<Endpoints>>,
    pub listeners: BTreeMap<String, Arc<Listener>>,
    pub routes: BTreeMap<String, Arc<RouteConfig>>,
    /// Last accepted version per type URL (for `/config_dump`).
    pub versions: BTreeMap<String, String>,
}

/// A route configuration with its virtual hosts indexed by domain.
#[derive(Debug)]
pub struct RouteTable {
    pub config: Arc<RouteConfig>,
    exact: FxMap<String, usize>,
    /// `*.example.com` / `*-foo.com` as the suffix after the `*`, longest first.
    suffix: Vec<(String, usize)>,
    /// `foo.*` as the prefix before the `*`, longest first.
    prefix: Vec<(String, usize)>,
    any: Option<usize>,
}

impl RouteTable {
    pub fn new(config: Arc<RouteConfig>) -> RouteTable {
        let mut exact = FxMap::default();
        let mut suffix = Vec::new();
        let mut prefix = Vec::new();
        let mut any = None;
        for (i, vh) in config.virtual_hosts.iter().enumerate() {
            for d in &vh.domains {
                if d == "*" {
                    any.get_or_insert(i);
                } else if let Some(s) = d.strip_prefix('*') {
                    suffix.push((s.to_string(), i));
                } else if let Some(p) = d.strip_suffix('*') {
                    prefix.push((p.to_string(), i));
                } else {
                    // First definition wins, as Envoy rejects duplicates anyway.
                    exact.entry(d.clone()).or_insert(i);
                }
            }
        }
        // Longest wildcard first; the sort is stable, so config order breaks ties.
        suffix.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        prefix.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        RouteTable {
            config,
            exact,
            suffix,
            prefix,
            any,
        }
    }

    /// The virtual host for a request's authority (lowercased by the caller).
    pub fn virtual_host(&self, authority: &str) -> Option<&VirtualHost> {
        let host = if self.config.ignore_port_in_host_matching {
            strip_port(authority)
        } else {
            authority
        };
        self.lookup(host)
            // Clients that send `host:port` where domains are port-less still match the
            // port-less name (Envoy retries without the port in that case too).
            .or_else(|| self.lookup(strip_port(host)))
            .and_then(|i| self.config.virtual_hosts.get(i))
    }

    fn lookup(&self, host: &str) -> Option<usize> {
        if let Some(i) = self.exact.get(host) {
            return Some(*i);
        }
        // A wildcard must match at least one character.
        if let Some((_, i)) = self
            .suffix
            .iter()
            .find(|(s, _)| host.len() > s.len() && host.ends_with(s.as_str()))
        {
            return Some(*i);
        }
        if let Some((_, i)) = self
            .prefix
            .iter()
            .find(|(p, _)| host.len() > p.len() && host.starts_with(p.as_str()))
        {
            return Some(*i);
        }
        self.any
    }
}

fn strip_port(host: &str) -> &str {
    // `[::1]:80` -> `[::1]`; `a.b:80` -> `a.b`; a bare IPv6 literal has no port to strip.
    if let Some(rest) = host.strip_prefix('[') {
        return match rest.find(']') {
            Some(i) => &host[..i + 2],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Everything the data path needs, compiled. The maps are looked up per request (listener,
/// route table, cluster, virtual host) with keys from the config: Fx hashing, as SipHash was
/// ~800 instructions per request here; only the control plane inserts keys.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub resources: Resources,
    pub listeners: FxMap<String, Arc<Listener>>,
    /// Listener by exact bound address, for `virtualOutbound` hand-off.
    pub by_address: FxMap<SocketAddr, Arc<Listener>>,
    pub routes: FxMap<String, Arc<RouteTable>>,
    pub clusters: FxMap<String, Arc<ClusterLb>>,
}

impl Snapshot {
    pub fn build(resources: Resources) -> Snapshot {
        let listeners: FxMap<String, Arc<Listener>> = resources
            .listeners
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let by_address = resources
            .listeners
            .values()
            .map(|l| (l.address, l.clone()))
            .collect();
        let mut routes: FxMap<String, Arc<RouteTable>> = resources
            .routes
            .iter()
            .map(|(k, v)| (k.clone(), Arc::new(RouteTable::new(v.clone()))))
            .collect();
        // Inline route configurations (sidecar inbound) get tables too, under a key no RDS
        // name can take.
        for l in resources.listeners.values() {
            let chains = l
                .filter_chains
                .iter()
                .enumerate()
                .map(|(i, c)| (Some(i), c));
            for (idx, c) in chains.chain(l.default_chain.iter().map(|c| (None, c))) {
                if let NetworkFilter::Http(h) = &c.filter {
                    if let RouteSource::Inline(rc) = &h.routes {
                        routes.insert(
                            inline_route_key(&l.name, idx),
                            Arc::new(RouteTable::new(rc.clone())),
                        );
                    }
                }
            }
        }
        let clusters = resources
            .clusters
            .iter()
            .map(|(name, c)| {
                let eps = match c.kind {
                    crate::config::DiscoveryKind::Eds => {
                        let key = c.eds_name.as_deref().unwrap_or(name);
                        resources
                            .endpoints
                            .get(key)
                            .map(|e| e.endpoints.clone())
                            .unwrap_or_default()
                    }
                    _ => c.inline_endpoints.clone(),
                };
                (
                    name.clone(),
                    Arc::new(ClusterLb::new(Cluster::clone(c), eps)),
                )
            })
            .collect();
        Snapshot {
            resources,
            listeners,
            by_address,
            routes,
            clusters,
        }
    }

    /// The listener a `virtualOutbound` connection to `dst` belongs to: exact `IP_PORT`, else
    /// `0.0.0.0_PORT`.
    /// Carry outlier detection's host state over from the snapshot this one replaces.
    pub fn inherit_outlier_state(&self, old: &Snapshot) {
        for (name, lb) in &self.clusters {
            if let Some(prev) = old.clusters.get(name) {
                lb.inherit_outlier_state(prev);
            }
        }
    }

    pub fn listener_for_original_dst(&self, dst: SocketAddr) -> Option<&Arc<Listener>> {
        self.by_address.get(&dst).or_else(|| {
            let any = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), dst.port());
            self.by_address.get(&any)
        })
    }
}

/// Snapshot key of an inline route configuration: `listener#chain-index` (`#default`).
pub fn inline_route_key(listener: &str, chain: Option<usize>) -> String {
    match chain {
        Some(i) => format!("{listener}#{i}"),
        None => format!("{listener}#default"),
    }
}

/// EDS names the clusters need and RDS names the listeners need.
pub fn eds_names(clusters: &BTreeMap<String, Arc<Cluster>>) -> Vec<String> {
    clusters
        .iter()
        .filter(|(_, c)| c.kind == crate::config::DiscoveryKind::Eds)
        .map(|(n, c)| c.eds_name.clone().unwrap_or_else(|| n.clone()))
        .collect()
}

pub fn rds_names(listeners: &BTreeMap<String, Arc<Listener>>) -> Vec<String> {
    let mut out: Vec<String> = listeners
        .values()
        .flat_map(|l| l.filter_chains.iter().chain(l.default_chain.iter()))
        .filter_map(|c| match &c.filter {
            NetworkFilter::Http(h) => match &h.routes {
                RouteSource::Rds(n) => Some(n.clone()),
                RouteSource::Inline(_) => None,
            },
            NetworkFilter::Tcp(_) => None,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vh(name: &str, domains: &[&str]) -> VirtualHost {
        VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            routes: Vec::new(),
            require_tls: false,
        }
    }

    #[test]
    fn domain_lookup_order() {
        let rc = RouteConfig {
            name: "r".into(),
            virtual_hosts: vec![
                vh("any", &["*"]),
                vh("suffix", &["*.example.com"]),
                vh("longer", &["*.a.example.com"]),
                vh("prefix", &["foo.*"]),
                vh("exact", &["a.example.com"]),
            ],
            ignore_port_in_host_matching: true,
        };
        let t = RouteTable::new(Arc::new(rc));
        let name = |h: &str| {
            t.virtual_host(h)
                .map(|v| v.name.clone())
                .unwrap_or_default()
        };
        assert_eq!(name("a.example.com"), "exact");
        assert_eq!(name("a.example.com:8080"), "exact");
        assert_eq!(name("x.a.example.com"), "longer");
        assert_eq!(name("b.example.com"), "suffix");
        assert_eq!(name("foo.bar"), "prefix");
        assert_eq!(name("other"), "any");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
    }
}
