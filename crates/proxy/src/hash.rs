//! Consistent hashing (Istio's DestinationRule `consistentHash`, Envoy's RING_HASH and
//! MAGLEV): which request key a route hashes, and the tables that map a hash to an endpoint.
//!
//! Both tables are built once per endpoint set, outside the request path (a new table comes
//! with a new snapshot). The hash function is xxHash64 as in Envoy, and the ring is built the
//! way Envoy builds it (each host hashed as `ADDRESS_N`, N = 0..its share of the ring), so a
//! key lands on the same host for as long as the endpoint set stays the same.

use std::time::Duration;
use xxhash_rust::xxh64::xxh64;

/// What a route hashes (Envoy's `RouteAction.hash_policy`; Istio emits one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashPolicy {
    /// `httpHeaderName`: the header's value (absent header: no key).
    Header(http::HeaderName),
    /// `httpCookie`: the cookie's value; with a TTL, a missing cookie is generated and set on
    /// the response (Envoy's behaviour), so the next request sticks.
    Cookie {
        name: String,
        path: Option<String>,
        ttl: Option<Duration>,
    },
    /// `useSourceIp`: the downstream address.
    SourceIp,
    /// `httpQueryParameterName`.
    QueryParameter(String),
}

/// Envoy combines several policies' hashes by rotating and xoring.
pub fn combine(acc: Option<u64>, h: u64) -> u64 {
    match acc {
        None => h,
        Some(a) => a.rotate_left(1) ^ h,
    }
}

pub fn hash_key(key: &[u8]) -> u64 {
    xxh64(key, 0)
}

/// The value of cookie `name` in a `Cookie` header value (`a=1; b=2`).
pub fn cookie_value<'a>(cookie_header: &'a str, name: &str) -> Option<&'a str> {
    cookie_header.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// The value of query parameter `name` in `a=1&b=2` (not percent-decoded, like Envoy).
pub fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| match kv.split_once('=') {
        Some((k, v)) if k == name => Some(v),
        None if kv == name => Some(""),
        _ => None,
    })
}

/// A host of a hash table: its address (as Envoy prints it, `ip:port`) and weight.
#[derive(Clone, Debug)]
pub struct HashHost {
    pub address: String,
    pub weight: u32,
}

/// Envoy's ring defaults (`RingHashLbConfig`): 1024 and 8M entries.
pub const DEFAULT_MIN_RING: u64 = 1024;
pub const DEFAULT_MAX_RING: u64 = 8 * 1024 * 1024;
/// Envoy's Maglev default table size (a prime).
pub const DEFAULT_MAGLEV_TABLE: u64 = 65537;

/// Envoy's ketama-style ring: each host owns a share of `(hash, host index)` points
/// proportional to its weight; a key goes to the first point at or after its hash.
#[derive(Clone, Debug, Default)]
pub struct Ring {
    points: Vec<(u64, usize)>,
}

impl Ring {
    pub fn new(hosts: &[HashHost], min_size: u64, max_size: u64) -> Ring {
        let total: u64 = hosts.iter().map(|h| u64::from(h.weight.max(1))).sum();
        if hosts.is_empty() || total == 0 {
            return Ring::default();
        }
        let max_size = max_size.max(1);
        let min_size = min_size.clamp(1, max_size);
        let normalized: Vec<f64> = hosts
            .iter()
            .map(|h| f64::from(h.weight.max(1)) / total as f64)
            .collect();
        let min_w = normalized.iter().copied().fold(f64::INFINITY, f64::min);
        // Enough points that the lightest host still gets at least one; capped at max_size.
        let scale = ((min_w * min_size as f64).ceil() / min_w).min(max_size as f64);
        let mut points = Vec::with_capacity(scale.ceil() as usize);
        let mut target = 0.0f64;
        let mut current = 0u64;
        for (idx, (h, w)) in hosts.iter().zip(&normalized).enumerate() {
            target += scale * w;
            let mut n = 0u64;
            while (current as f64) < target {
                let key = format!("{}_{n}", h.address);
                points.push((hash_key(key.as_bytes()), idx));
                n += 1;
                current += 1;
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The host index for `hash`, then the following distinct hosts in ring order (so a
    /// caller can skip unhealthy ones, as Envoy does).
    pub fn walk(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let start = self.points.partition_point(|(h, _)| *h < hash);
        let n = self.points.len();
        (0..n).map(move |i| self.points[(start + i) % n].1)
    }
}

/// Google's Maglev table (Envoy's MAGLEV): each host fills the slots of its own permutation in
/// turn, weighted hosts more often; a key goes to slot `hash % size`.
#[derive(Clone, Debug, Default)]
pub struct Maglev {
    table: Vec<usize>,
}

impl Maglev {
    pub fn new(hosts: &[HashHost], table_size: u64) -> Maglev {
        let m = table_size.max(2);
        if hosts.is_empty() {
            return Maglev::default();
        }
        let max_w = f64::from(hosts.iter().map(|h| h.weight.max(1)).max().unwrap_or(1));
        struct Perm {
            offset: u64,
            skip: u64,
            next: u64,
            weight: f64,
            credit: f64,
        }
        let mut perms: Vec<Perm> = hosts
            .iter()
            .map(|h| Perm {
                offset: xxh64(h.address.as_bytes(), 0) % m,
                skip: xxh64(h.address.as_bytes(), 1) % (m - 1) + 1,
                next: 0,
                weight: f64::from(h.weight.max(1)) / max_w,
                credit: 0.0,
            })
            .collect();
        let size = usize::try_from(m).unwrap_or(usize::MAX);
        let mut table = vec![usize::MAX; size];
        let mut filled = 0usize;
        // Each round every host earns its relative weight; a whole credit buys one slot (the
        // heaviest host takes one slot per round). Bounded: every round fills at least one slot.
        while filled < size {
            for (idx, p) in perms.iter_mut().enumerate() {
                p.credit += p.weight;
                while p.credit >= 1.0 && filled < size {
                    p.credit -= 1.0;
                    loop {
                        let slot = ((p.offset + p.next * p.skip) % m) as usize;
                        p.next += 1;
                        if table[slot] == usize::MAX {
                            table[slot] = idx;
                            filled += 1;
                            break;
                        }
                    }
                }
                if filled == size {
                    break;
                }
            }
        }
        Maglev { table }
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The host for `hash`, then the hosts of the following slots (for skipping unhealthy
    /// ones; may repeat).
    pub fn walk(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let n = self.table.len();
        let start = if n == 0 {
            0
        } else {
            (hash % n as u64) as usize
        };
        (0..n).map(move |i| self.table[(start + i) % n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(ws: &[u32]) -> Vec<HashHost> {
        ws.iter()
            .enumerate()
            .map(|(i, w)| HashHost {
                address: format!("10.0.0.{}:8080", i + 1),
                weight: *w,
            })
            .collect()
    }

    fn shares(picks: impl Iterator<Item = usize>, n: usize) -> Vec<f64> {
        let mut c = vec![0usize; n];
        let mut total = 0usize;
        for p in picks {
            c[p] += 1;
            total += 1;
        }
        c.iter().map(|x| *x as f64 / total as f64).collect()
    }

    #[test]
    fn ring_is_deterministic_and_weighted() {
        let hs = hosts(&[1, 1, 2]);
        let a = Ring::new(&hs, DEFAULT_MIN_RING, DEFAULT_MAX_RING);
        let b = Ring::new(&hs, DEFAULT_MIN_RING, DEFAULT_MAX_RING);
        assert!(a.len() >= 1024);
        for k in 0..200u32 {
            let h = hash_key(format!("user-{k}").as_bytes());
            assert_eq!(a.walk(h).next(), b.walk(h).next());
        }
        let s = shares(
            (0..20_000u32).map(|k| a.walk(hash_key(&k.to_le_bytes())).next().unwrap()),
            3,
        );
        assert!((s[2] - 0.5).abs() < 0.08, "{s:?}");
        assert!((s[0] - 0.25).abs() < 0.08, "{s:?}");
    }

    #[test]
    fn removing_a_host_moves_few_other_keys() {
        let all = hosts(&[1, 1, 1, 1]);
        let ring = Ring::new(&all, DEFAULT_MIN_RING, DEFAULT_MAX_RING);
        let fewer = Ring::new(&all[..3], DEFAULT_MIN_RING, DEFAULT_MAX_RING);
        let (mut kept, mut moved) = (0, 0);
        for k in 0..5000u32 {
            let h = hash_key(&k.to_le_bytes());
            let before = ring.walk(h).next().unwrap();
            if before == 3 {
                continue;
            }
            // A host keeps its points (`ADDRESS_N`); the survivors only gain points (a
            // larger share each), which takes some keys from their neighbours.
            if before == fewer.walk(h).next().unwrap() {
                kept += 1;
            } else {
                moved += 1;
            }
        }
        // Rehashing modulo the host count would move about two thirds of them.
        assert!(moved * 4 < kept, "moved {moved}, kept {kept}");
    }

    #[test]
    fn ring_walk_visits_every_host() {
        let r = Ring::new(&hosts(&[1, 1, 1]), 16, 64);
        let mut seen: Vec<usize> = r.walk(12345).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, vec![0, 1, 2]);
        assert!(Ring::new(&[], 16, 64).is_empty());
    }

    #[test]
    fn maglev_fills_the_table_by_weight() {
        let m = Maglev::new(&hosts(&[1, 3]), 65537);
        assert_eq!(m.len(), 65537);
        let s = shares(m.table.iter().copied(), 2);
        assert!((s[1] - 0.75).abs() < 0.02, "{s:?}");
        let again = Maglev::new(&hosts(&[1, 3]), 65537);
        assert_eq!(m.table, again.table);
        assert!(Maglev::new(&[], 7).is_empty());
    }

    #[test]
    fn maglev_moves_few_keys_when_a_host_goes() {
        let all = hosts(&[1, 1, 1, 1, 1]);
        let a = Maglev::new(&all, 65537);
        let b = Maglev::new(&all[..4], 65537);
        let moved = (0..65537)
            .filter(|i| a.table[*i] != 4 && a.table[*i] != b.table[*i])
            .count();
        // Maglev is not perfectly stable, but close: a few percent of slots move.
        assert!(moved < 65537 / 10, "{moved}");
    }

    #[test]
    fn cookie_and_query_values() {
        assert_eq!(cookie_value("a=1; user=bob; b=2", "user"), Some("bob"));
        assert_eq!(cookie_value("a=1", "user"), None);
        assert_eq!(query_value("x=1&user=7&y", "user"), Some("7"));
        assert_eq!(query_value("x=1&y", "y"), Some(""));
        assert_eq!(query_value("x=1", "user"), None);
        assert_eq!(combine(None, 5), 5);
        assert_eq!(combine(Some(1), 0), 2);
    }
}
