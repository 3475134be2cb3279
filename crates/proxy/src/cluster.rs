//! Clusters at run time: the healthy endpoints of one cluster and the load balancer that
//! picks among them (ROUND_ROBIN, LEAST_REQUEST with two random choices, RANDOM; weights
//! honoured by expanding each endpoint into a weighted schedule; RING_HASH and MAGLEV through
//! the tables of [`crate::hash`], built here once per snapshot).
//!
//! Each host also resolves its transport: the cluster's `transport_socket_matches` against
//! the endpoint's `tlsMode` metadata (Istio's auto mTLS), else the cluster's own TLS context.
//!
//! A `ClusterLb` lives in one snapshot; its counters are atomics so picking never locks. A new
//! snapshot starts new counters, which only resets round-robin position and in-flight counts
//! of the old generation (requests in flight keep their `Arc` to the old endpoint).

use crate::config::{Cluster, DiscoveryKind, Endpoint, LbPolicy, UpstreamTls};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// One upstream endpoint with its in-flight request count (for LEAST_REQUEST).
#[derive(Debug)]
pub struct Host {
    pub endpoint: Endpoint,
    pub active: AtomicUsize,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Milliseconds since [`epoch`] until which outlier detection ejected this host.
    ejected_until: AtomicU64,
}

/// How one attempt ended, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Status(u16),
    /// Connect failure, reset or timeout: a gateway error from the host's point of view.
    LocalFailure,
}

fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl Host {
    fn new(endpoint: Endpoint) -> Host {
        Host {
            endpoint,
            active: AtomicUsize::new(0),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
        }
    }

    pub fn ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now_ms()
    }

    /// `host:port` as the connector wants it (IPv6 in brackets).
    pub fn authority(&self) -> String {
        if self.endpoint.host.contains(':') {
            format!("[{}]:{}", self.endpoint.host, self.endpoint.port)
        } else {
            format!("{}:{}", self.endpoint.host, self.endpoint.port)
        }
    }
}

#[derive(Debug)]
pub struct ClusterLb {
    pub config: Cluster,
    pub hosts: Vec<Arc<Host>>,
    /// Indexes into `hosts`, each repeated by its weight (bounded) so round robin is weighted.
    schedule: Vec<usize>,
    next: AtomicUsize,
    table: HashTable,
}

/// The consistent-hash table of a RING_HASH / MAGLEV cluster.
#[derive(Debug)]
enum HashTable {
    None,
    Ring(crate::hash::Ring),
    Maglev(crate::hash::Maglev),
}

/// The endpoint picked for one attempt. Dropping it ends the request for LEAST_REQUEST.
pub struct Picked {
    pub host: Arc<Host>,
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.host.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Caps a single endpoint's share of the schedule so a huge weight cannot blow up memory.
const MAX_WEIGHT: u32 = 128;

impl ClusterLb {
    pub fn new(config: Cluster, endpoints: Vec<Endpoint>) -> ClusterLb {
        let hosts: Vec<Arc<Host>> = endpoints
            .into_iter()
            .filter(|e| e.healthy)
            .map(|endpoint| Arc::new(Host::new(endpoint)))
            .collect();
        let uniform = hosts
            .windows(2)
            .all(|w| w[0].endpoint.weight == w[1].endpoint.weight);
        let schedule = if uniform {
            (0..hosts.len()).collect()
        } else {
            // Interleave rather than group so consecutive picks spread across hosts.
            let max = hosts
                .iter()
                .map(|h| h.endpoint.weight.min(MAX_WEIGHT))
                .max()
                .unwrap_or(1);
            let mut s = Vec::new();
            for round in 0..max {
                for (i, h) in hosts.iter().enumerate() {
                    if round < h.endpoint.weight.min(MAX_WEIGHT) {
                        s.push(i);
                    }
                }
            }
            s
        };
        let hash_hosts = || -> Vec<crate::hash::HashHost> {
            hosts
                .iter()
                .map(|h| crate::hash::HashHost {
                    address: h.authority(),
                    weight: h.endpoint.weight,
                })
                .collect()
        };
        let table = match config.lb {
            LbPolicy::RingHash { min_size, max_size } => {
                HashTable::Ring(crate::hash::Ring::new(&hash_hosts(), min_size, max_size))
            }
            LbPolicy::Maglev { table_size } => {
                HashTable::Maglev(crate::hash::Maglev::new(&hash_hosts(), table_size))
            }
            _ => HashTable::None,
        };
        ClusterLb {
            config,
            hosts,
            schedule,
            next: AtomicUsize::new(random_u64() as usize),
            table,
        }
    }

    pub fn is_original_dst(&self) -> bool {
        self.config.kind == DiscoveryKind::OriginalDst
    }

    /// Pick a host; `original_dst` serves ORIGINAL_DST clusters. `None` = no healthy upstream.
    pub fn pick(&self, original_dst: Option<SocketAddr>) -> Option<Picked> {
        self.pick_hashed(original_dst, None)
    }

    /// Does this cluster balance by a request hash (route `hash_policy`)?
    pub fn wants_hash(&self) -> bool {
        !matches!(self.table, HashTable::None)
    }

    /// [`ClusterLb::pick`] with the request's hash for RING_HASH / MAGLEV clusters: the host
    /// the key maps to, or the next one in the table that is not ejected. Without a hash (the
    /// request lacks the header, cookie ...) a hashing cluster picks at random, as Envoy does.
    pub fn pick_hashed(
        &self,
        original_dst: Option<SocketAddr>,
        hash: Option<u64>,
    ) -> Option<Picked> {
        if self.is_original_dst() {
            let dst = original_dst?;
            let host = Arc::new(Host::new(Endpoint {
                host: dst.ip().to_string(),
                port: dst.port(),
                weight: 1,
                healthy: true,
                transport_metadata: Vec::new(),
                workload: None,
            }));
            host.active.fetch_add(1, Ordering::Relaxed);
            return Some(Picked { host });
        }
        if self.schedule.is_empty() {
            return None;
        }
        // Skip hosts ejected by outlier detection; if every try lands on one (or all are
        // ejected), use the last pick rather than fail, as Envoy's panic mode does.
        if let Some(h) = hash {
            let walk: Box<dyn Iterator<Item = usize> + '_> = match &self.table {
                HashTable::Ring(r) => Box::new(r.walk(h)),
                HashTable::Maglev(m) => Box::new(m.walk(h)),
                HashTable::None => Box::new(std::iter::empty()),
            };
            let mut first = None;
            // Bounded: a table holds at most a few million entries, and the first few hosts
            // along the walk are enough to find one that is not ejected.
            for idx in walk.take(64) {
                first.get_or_insert(idx);
                if !self.hosts[idx].ejected() {
                    first = Some(idx);
                    break;
                }
            }
            if let Some(host) = first.and_then(|i| self.hosts.get(i)).cloned() {
                host.active.fetch_add(1, Ordering::Relaxed);
                return Some(Picked { host });
            }
        }
        let mut idx = self.pick_index();
        for _ in 0..self.schedule.len().min(8) {
            if !self.hosts[idx].ejected() {
                break;
            }
            idx = self.pick_index();
        }
        let host = self.hosts.get(idx)?.clone();
        host.active.fetch_add(1, Ordering::Relaxed);
        Some(Picked { host })
    }

    /// The TLS context for connections to `host`: the first transport_socket_match whose
    /// criteria the endpoint's metadata all carry, else the cluster's transport_socket
    /// (Envoy's order). `None` = plaintext.
    pub fn tls_for(&self, host: &Host) -> Option<&Arc<UpstreamTls>> {
        let md = &host.endpoint.transport_metadata;
        for m in &self.config.transport_matches {
            if m.criteria.iter().all(|c| md.contains(c)) {
                return m.tls.as_ref();
            }
        }
        self.config.tls.as_ref()
    }

    fn pick_index(&self) -> usize {
        match self.config.lb {
            LbPolicy::RoundRobin | LbPolicy::ClusterProvided => {
                self.schedule[self.next.fetch_add(1, Ordering::Relaxed) % self.schedule.len()]
            }
            LbPolicy::Random | LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. } => {
                self.schedule[random_below(self.schedule.len())]
            }
            LbPolicy::LeastRequest => {
                // Power of two choices: two random candidates, the less loaded wins.
                let a = self.schedule[random_below(self.schedule.len())];
                let b = self.schedule[random_below(self.schedule.len())];
                let load = |i: usize| self.hosts[i].active.load(Ordering::Relaxed);
                if load(b) < load(a) {
                    b
                } else {
                    a
                }
            }
        }
    }

    /// Feed outlier detection with how an attempt on `host` ended.
    pub fn report(&self, host: &Host, outcome: Outcome) {
        let Some(od) = &self.config.outlier else {
            return;
        };
        let (is_5xx, is_gateway) = match outcome {
            Outcome::Status(s) => (s >= 500, matches!(s, 502..=504)),
            Outcome::LocalFailure => (true, true),
        };
        let bump = |c: &AtomicU32, hit: bool| {
            if hit {
                c.fetch_add(1, Ordering::Relaxed) + 1
            } else {
                c.store(0, Ordering::Relaxed);
                0
            }
        };
        let n5 = bump(&host.consecutive_5xx, is_5xx);
        let ng = bump(&host.consecutive_gateway, is_gateway);
        let trip = od.consecutive_5xx.is_some_and(|t| t > 0 && n5 >= t)
            || od.consecutive_gateway.is_some_and(|t| t > 0 && ng >= t);
        if !trip || host.ejected() {
            return;
        }
        let ejected = self.hosts.iter().filter(|h| h.ejected()).count();
        // At least one host may always be ejected (Envoy), then max_ejection_percent caps it.
        let allowed = ejected == 0
            || (ejected + 1) * 100 <= od.max_ejection_percent as usize * self.hosts.len();
        if allowed {
            let until = now_ms() + od.base_ejection_time.as_millis() as u64;
            host.ejected_until.store(until, Ordering::Relaxed);
            host.consecutive_5xx.store(0, Ordering::Relaxed);
            host.consecutive_gateway.store(0, Ordering::Relaxed);
            tracing::info!(cluster = %self.config.name, host = %host.authority(), "outlier detection: host ejected");
        }
    }
}

/// A process-wide splitmix64 sequence: lock-free, good enough for load balancing, weighted
/// cluster picks and fault percentages (none of which need cryptographic randomness).
pub fn random_u64() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    static SEEDED: std::sync::Once = std::sync::Once::new();
    SEEDED.call_once(|| {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9)
            ^ u64::from(std::process::id()).rotate_left(32);
        STATE.store(seed, Ordering::Relaxed);
    });
    let mut z = STATE
        .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Uniform in `0..n` (n > 0).
pub fn random_below(n: usize) -> usize {
    (random_u64() % (n.max(1) as u64)) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Duration;

    fn cluster(lb: LbPolicy) -> Cluster {
        Cluster {
            name: "c".into(),
            kind: DiscoveryKind::Eds,
            lb,
            connect_timeout: Duration::from_secs(1),
            http2: false,
            eds_name: None,
            inline_endpoints: Vec::new(),
            outlier: None,
            source_address: None,
            tls: None,
            transport_matches: Vec::new(),
        }
    }

    fn ep(host: &str, weight: u32, healthy: bool) -> Endpoint {
        Endpoint {
            host: host.into(),
            port: 80,
            weight,
            healthy,
            transport_metadata: Vec::new(),
            workload: None,
        }
    }

    #[test]
    fn round_robin_skips_unhealthy_and_honours_weights() {
        let lb = ClusterLb::new(
            cluster(LbPolicy::RoundRobin),
            vec![
                ep("10.0.0.1", 3, true),
                ep("10.0.0.2", 1, true),
                ep("10.0.0.3", 1, false),
            ],
        );
        let mut seen: HashMap<String, usize> = HashMap::new();
        for _ in 0..400 {
            let p = lb.pick(None).expect("a host");
            *seen.entry(p.host.endpoint.host.clone()).or_default() += 1;
        }
        assert_eq!(seen.get("10.0.0.1"), Some(&300));
        assert_eq!(seen.get("10.0.0.2"), Some(&100));
        assert!(!seen.contains_key("10.0.0.3"));
    }

    #[test]
    fn consecutive_5xx_ejects_one_host() {
        let mut c = cluster(LbPolicy::RoundRobin);
        c.outlier = Some(crate::config::OutlierDetection {
            consecutive_5xx: Some(3),
            consecutive_gateway: None,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
        });
        let lb = ClusterLb::new(c, vec![ep("10.0.0.1", 1, true), ep("10.0.0.2", 1, true)]);
        let bad = lb.hosts[0].clone();
        lb.report(&bad, Outcome::Status(503));
        lb.report(&bad, Outcome::Status(200));
        lb.report(&bad, Outcome::Status(503));
        lb.report(&bad, Outcome::Status(503));
        assert!(!bad.ejected(), "the 200 reset the streak");
        lb.report(&bad, Outcome::LocalFailure);
        assert!(bad.ejected());
        for _ in 0..20 {
            assert_eq!(
                lb.pick(None)
                    .map(|p| p.host.endpoint.host.clone())
                    .as_deref(),
                Some("10.0.0.2")
            );
        }
        // 10% of 2 hosts: the second may not be ejected too.
        let other = lb.hosts[1].clone();
        for _ in 0..3 {
            lb.report(&other, Outcome::Status(500));
        }
        assert!(!other.ejected());
    }

    #[test]
    fn transport_follows_the_endpoint_tls_mode() {
        let spec = crate::tls::ClientSpec {
            cert: None,
            validation: None,
            alpn: Vec::new(),
            sni: None,
            versions: crate::tls::Versions::Tls12And13,
        };
        let tls = Arc::new(crate::tls::client_context(&spec, 7).unwrap());
        let mut c = cluster(LbPolicy::RoundRobin);
        c.transport_matches = vec![
            crate::config::TransportSocketMatch {
                name: "tlsMode-istio".into(),
                criteria: vec![("tlsMode".into(), "istio".into())],
                tls: Some(tls),
            },
            crate::config::TransportSocketMatch {
                name: "tlsMode-disabled".into(),
                criteria: Vec::new(),
                tls: None,
            },
        ];
        let mut sidecar = ep("10.0.0.1", 1, true);
        sidecar.transport_metadata = vec![("tlsMode".into(), "istio".into())];
        let lb = ClusterLb::new(c, vec![sidecar, ep("10.0.0.2", 1, true)]);
        assert_eq!(lb.tls_for(&lb.hosts[0]).map(|t| t.key), Some(7));
        assert!(lb.tls_for(&lb.hosts[1]).is_none());
    }

    #[test]
    fn least_request_prefers_idle_hosts() {
        let lb = ClusterLb::new(
            cluster(LbPolicy::LeastRequest),
            vec![ep("10.0.0.1", 1, true), ep("10.0.0.2", 1, true)],
        );
        let busy: Vec<Picked> = (0..50)
            .filter_map(|_| lb.pick(None))
            .filter(|p| p.host.endpoint.host == "10.0.0.1")
            .collect();
        // Two random candidates: the busy host only wins when drawn twice (1 in 4), so about
        // 750 of 1000 picks go to the idle one (plain random: 500). 1000 draws keep the bound
        // far from chance (100 draws with a bound of 70 failed about 1 run in 9).
        let mut idle = 0;
        for _ in 0..1000 {
            if lb.pick(None).map(|p| p.host.endpoint.host == "10.0.0.2") == Some(true) {
                idle += 1;
            }
        }
        drop(busy);
        assert!(idle >= 650, "{idle}");
        assert!(ClusterLb::new(cluster(LbPolicy::Random), vec![])
            .pick(None)
            .is_none());
    }
}
