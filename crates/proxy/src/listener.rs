//! Listeners: bind what the snapshot says, accept, and dispatch each connection to a filter
//! chain.
//!
//! The [`Manager`] reconciles bound sockets with the snapshot after every config change:
//! new listeners are bound (`bind_to_port` true only), removed ones closed, and a listener
//! whose address is unchanged keeps its socket — each accepted connection reads the
//! listener's current config from the snapshot, so route or chain edits apply without
//! rebinding. `virtualOutbound` (use_original_dst) reads SO_ORIGINAL_DST and hands the
//! connection to the listener bound to that exact `IP:PORT`, else `0.0.0.0:PORT`, else uses
//! its own chains (passthrough). Chains are matched on destination port and IP, transport
//! (`tls` / `raw_buffer`), SNI and application protocol (`http/1.1`, `h2c`, or the
//! ClientHello's ALPN), sniffed from the first bytes with a short timeout so server-first
//! protocols still fall through to TCP. A chain with a TLS context terminates TLS
//! ([`crate::tls::accept`]) before its filter runs.

use crate::config::{ChainMatch, FilterChain, Listener, NetworkFilter, RouteSource};
use crate::snapshot::inline_route_key;
use crate::Shared;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// How long to wait for the client's first bytes before treating the connection as opaque
/// TCP (the generator's listener_filters_timeout is the same 100 ms).
const DETECTION_TIMEOUT: Duration = Duration::from_millis(100);

pub const VIRTUAL_INBOUND: &str = "virtualInbound";

struct Bound {
    address: SocketAddr,
    transparent: bool,
    task: JoinHandle<()>,
}

pub struct Manager {
    shared: Arc<Shared>,
    bound: HashMap<String, Bound>,
}

impl Manager {
    pub fn new(shared: Arc<Shared>) -> Manager {
        Manager {
            shared,
            bound: HashMap::new(),
        }
    }

    /// Reconcile on every snapshot until shutdown, then close every listener.
    pub async fn run(mut self) {
        let mut generations = self.shared.generations();
        let mut shutdown = self.shared.shutdown_signal();
        loop {
            self.reconcile().await;
            tokio::select! {
                r = generations.changed() => if r.is_err() { break },
                () = crate::stopped(&mut shutdown) => break,
            }
        }
        for (name, b) in self.bound.drain() {
            debug!(listener = %name, "closing listener");
            b.task.abort();
        }
    }

    async fn reconcile(&mut self) {
        let snap = self.shared.snapshot_full();
        let wanted: HashMap<&str, &Arc<Listener>> = snap
            .listeners
            .iter()
            .filter(|(_, l)| l.bind_to_port)
            .map(|(n, l)| (n.as_str(), l))
            .collect();
        self.bound.retain(|name, b| {
            let keep = wanted
                .get(name.as_str())
                .is_some_and(|l| l.address == b.address && l.transparent == b.transparent);
            if !keep {
                info!(listener = %name, address = %b.address, "listener removed");
                b.task.abort();
            }
            keep
        });
        for (name, l) in wanted {
            if self.bound.contains_key(name) {
                continue;
            }
            let bound = if l.transparent {
                bind_transparent(l.address)
            } else {
                TcpListener::bind(l.address).await
            };
            match bound {
                Ok(sock) => {
                    info!(listener = %name, address = %l.address, transparent = l.transparent, "listening");
                    let task =
                        tokio::spawn(accept_loop(self.shared.clone(), name.to_string(), sock));
                    self.bound.insert(
                        name.to_string(),
                        Bound {
                            address: l.address,
                            transparent: l.transparent,
                            task,
                        },
                    );
                }
                // Retried on the next config change; Envoy likewise reports and moves on.
                Err(e) => {
                    warn!(listener = %name, address = %l.address, error = %e, "cannot bind listener")
                }
            }
        }
    }
}

async fn accept_loop(shared: Arc<Shared>, name: String, sock: TcpListener) {
    loop {
        match sock.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(shared.clone(), name.clone(), stream, peer));
            }
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                warn!(listener = %name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(shared: Arc<Shared>, name: String, stream: TcpStream, peer: SocketAddr) {
    let snap = shared.snapshot_full();
    let Some(own) = snap.listeners.get(&name).cloned() else {
        return;
    };
    let local = stream.local_addr().unwrap_or(own.address);
    let (listener, dst, original_dst) = if own.use_original_dst {
        let od = original_dst(&stream).unwrap_or(local);
        match snap.listener_for_original_dst(od) {
            Some(t) if t.name != own.name => (t.clone(), od, Some(od)),
            _ => (own, od, Some(od)),
        }
    } else if own.original_dst_filter {
        let od = original_dst(&stream).unwrap_or(local);
        (own, od, Some(od))
    } else {
        (own, local, None)
    };
    let sniffed = if needs_detection(&listener) {
        detect(&stream).await
    } else {
        Sniffed::default()
    };
    let Some((idx, chain)) = select_chain(&listener, dst, &sniffed) else {
        debug!(listener = %listener.name, %dst, "no filter chain matches; closing");
        return;
    };
    debug!(listener = %listener.name, chain = %chain.name, %peer, %dst, "connection");
    // TLS termination (gateway SIMPLE/MUTUAL, inbound mTLS) before the filter sees bytes.
    let (stream, security) = match &chain.tls {
        None => (
            crate::tls::Stream::from(stream),
            crate::tls::Security::plaintext(),
        ),
        Some(tls) => {
            let tls = tls.clone();
            match crate::tls::accept(stream, &tls, &sniffed.hello.alpn).await {
                Ok(s) => s,
                Err(e) => {
                    debug!(listener = %listener.name, chain = %chain.name, %peer, error = %e, "downstream TLS handshake failed");
                    return;
                }
            }
        }
    };
    // Network RBAC (AuthorizationPolicy on TCP chains): decided once, before the terminal
    // filter opens anything upstream; a denied connection is closed.
    if !chain.network_rbac.is_empty() {
        let facts = crate::rbac::Facts {
            peer,
            remote_ip: peer.ip(),
            local: dst,
            security: &security,
            sni: sniffed.hello.sni.as_deref(),
            request: None,
        };
        for rbac in chain.network_rbac.iter() {
            if let crate::rbac::Verdict::Deny(policy) = rbac.check(&facts) {
                debug!(listener = %listener.name, chain = %chain.name, %peer, %dst, policy = policy.unwrap_or("none"), "rbac: connection denied; closing");
                return;
            }
        }
    }
    match &chain.filter {
        NetworkFilter::Http(h) => {
            let route_key: Arc<str> = match &h.routes {
                RouteSource::Rds(n) => Arc::from(n.as_str()),
                RouteSource::Inline(_) => Arc::from(inline_route_key(&listener.name, idx).as_str()),
            };
            let reporter = if listener.name == VIRTUAL_INBOUND {
                "destination"
            } else {
                "source"
            };
            let ctx = crate::http::ConnCtx {
                shared: shared.clone(),
                route_key,
                listener: Arc::from(listener.name.as_str()),
                chain: idx,
                chain_name: Arc::from(chain.name.as_str()),
                http_filters: h.http_filters.clone(),
                use_remote_address: h.use_remote_address,
                xff_num_trusted_hops: h.xff_num_trusted_hops,
                local: dst,
                sni: sniffed.hello.sni.as_deref().map(Arc::from),
                peer,
                original_dst,
                reporter,
                security: security.with_xfcc(&h.xfcc),
                access_log: h.access_log.clone(),
                upgrades: h.upgrades.clone(),
                header_case: h.header_case,
            };
            drop(snap);
            crate::http::serve(stream, ctx).await;
        }
        NetworkFilter::Tcp(t) => {
            let cfg = t.clone();
            let conn = crate::tcp::TcpConn {
                peer,
                local: dst,
                original_dst,
                reporter: if listener.name == VIRTUAL_INBOUND {
                    "destination"
                } else {
                    "source"
                },
                security,
                sni: sniffed.hello.sni.as_deref().map(Arc::from),
            };
            drop(snap);
            crate::tcp::proxy(shared, stream, &cfg, conn).await;
        }
    }
}

/// A listening socket with IP_TRANSPARENT (TPROXY capture; needs CAP_NET_ADMIN, as Istio's
/// TPROXY sidecar has), set before bind as Envoy's `transparent` does.
fn bind_transparent(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    // IP_TRANSPARENT marks the inet socket itself, so it serves IPv6 sockets too.
    nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::IpTransparent, &true)
        .map_err(std::io::Error::from)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

/// SO_ORIGINAL_DST (IPv4): where the client meant to go before iptables redirected it. A
/// TPROXY'd connection was not rewritten, so there (no NAT: the lookup fails or returns the
/// same address) the accepted socket's local address is the original destination.
fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sin = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::OriginalDst).ok()?;
    let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
    Some(SocketAddr::V4(SocketAddrV4::new(
        ip,
        u16::from_be(sin.sin_port),
    )))
}

#[derive(Default, Debug, PartialEq)]
struct Sniffed {
    /// `tls` or `raw_buffer`.
    transport: &'static str,
    /// `http/1.1`, `h2c`, or empty.
    application: &'static str,
    /// SNI and ALPN of a TLS ClientHello.
    hello: crate::tls::Hello,
}

fn needs_detection(l: &Listener) -> bool {
    l.filter_chains.iter().any(|c| {
        c.matcher.transport_protocol.is_some()
            || !c.matcher.application_protocols.is_empty()
            || !c.matcher.server_names.is_empty()
    })
}

async fn detect(stream: &TcpStream) -> Sniffed {
    let mut buf = [0u8; 24];
    let n = match tokio::time::timeout(DETECTION_TIMEOUT, stream.peek(&mut buf)).await {
        Ok(Ok(n)) => n,
        // Server-first protocol (nothing sent yet) or an error: opaque TCP.
        _ => 0,
    };
    let mut sniffed = classify(&buf[..n]);
    if sniffed.transport == "tls" {
        sniffed.hello = crate::tls::sniff(stream, DETECTION_TIMEOUT).await;
    }
    sniffed
}

fn classify(b: &[u8]) -> Sniffed {
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"HEAD ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
    ];
    if b.len() >= 3 && b[0] == 0x16 && b[1] == 0x03 {
        return Sniffed {
            transport: "tls",
            ..Sniffed::default()
        };
    }
    let application = if b.starts_with(b"PRI * HTTP/2.0") {
        "h2c"
    } else if METHODS.iter().any(|m| b.starts_with(m)) {
        "http/1.1"
    } else {
        ""
    };
    Sniffed {
        transport: "raw_buffer",
        application,
        ..Sniffed::default()
    }
}

fn prefix_contains(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len.min(32)))
            };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len.min(128)))
            };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

/// Envoy's order of criteria, most specific wins: destination port, destination IP,
/// (server names), transport, application protocols. Returns the chain index (`None` for
/// the default chain).
fn select_chain<'a>(
    l: &'a Listener,
    dst: SocketAddr,
    s: &Sniffed,
) -> Option<(Option<usize>, &'a FilterChain)> {
    let matches = |m: &ChainMatch| {
        m.destination_port.is_none_or(|p| p == dst.port())
            && (m.prefix_ranges.is_empty() || m.prefix_ranges.iter().any(|(n, len)| prefix_contains(*n, *len, dst.ip())))
            && (m.server_names.is_empty() || s.hello.sni.as_deref().is_some_and(|sni| m.server_names.iter().any(|p| crate::tls::server_name_matches(p, sni))))
            && m.transport_protocol.as_deref().is_none_or(|t| t == s.transport)
            // TLS: the ClientHello's ALPN list (tls_inspector); plaintext: the sniffed protocol.
            && (m.application_protocols.is_empty() || m.application_protocols.iter().any(|a| a == s.application || s.hello.alpn.contains(a)))
    };
    // Envoy: an exact server name beats a wildcard, a longer wildcard a shorter one.
    let sni_rank = |m: &ChainMatch| -> usize {
        let Some(sni) = s.hello.sni.as_deref() else {
            return 0;
        };
        m.server_names
            .iter()
            .filter(|p| crate::tls::server_name_matches(p, sni))
            .map(|p| {
                if p.starts_with('*') {
                    p.len()
                } else {
                    usize::MAX
                }
            })
            .max()
            .unwrap_or(0)
    };
    let specificity = |m: &ChainMatch| {
        (
            m.destination_port.is_some(),
            m.prefix_ranges.iter().map(|(_, l)| *l).max(),
            sni_rank(m),
            m.transport_protocol.is_some(),
            !m.application_protocols.is_empty(),
        )
    };
    let mut best: Option<(usize, &FilterChain)> = None;
    for (i, c) in l.filter_chains.iter().enumerate() {
        if !matches(&c.matcher) {
            continue;
        }
        if best.is_none_or(|(_, b)| specificity(&c.matcher) > specificity(&b.matcher)) {
            best = Some((i, c));
        }
    }
    match best {
        Some((i, c)) => Some((Some(i), c)),
        None => l.default_chain.as_ref().map(|c| (None, c)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n").application, "http/1.1");
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM").application, "h2c");
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02]).transport, "tls");
        assert_eq!(classify(b"").application, "");
        assert_eq!(classify(b"").transport, "raw_buffer");
    }

    #[test]
    fn prefixes() {
        let n: IpAddr = "10.96.0.0".parse().unwrap();
        assert!(prefix_contains(n, 16, "10.96.3.4".parse().unwrap()));
        assert!(!prefix_contains(n, 16, "10.97.0.1".parse().unwrap()));
        assert!(prefix_contains(n, 0, "1.2.3.4".parse().unwrap()));
    }
}
