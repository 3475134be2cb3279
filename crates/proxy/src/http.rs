//! HTTP: the connection manager and router, with Envoy's semantics for the config the pilot
//! generates.
//!
//! Downstream connections are served by hyper (HTTP/1.1 and h2c, detected per connection);
//! an h2 connection's streams run in the connection's own task, not one task each (`serve`).
//! For each request: pick the virtual host by authority, the first route that matches
//! (path, headers, query), apply fault injection, then the action — direct response,
//! redirect, or forwarding to a (weighted) cluster with rewrites, header edits, timeout and
//! retries. Local replies use Envoy's texts (`upstream request timeout`, `no healthy
//! upstream`, `fault filter abort`) and every request records Envoy's response flags.
//!
//! HTTP/1.1 details as Envoy does them: request bodies stream upstream while a copy of up to
//! [`RETRY_BUFFER_LIMIT`] bytes is kept for retries (a larger body streams and is not retried;
//! a route with mirrors buffers the body whole, the copies need it); responses stream back;
//! `Expect: 100-continue` is answered by the proxy (hyper sends `100 Continue` when the body
//! is first read) and not forwarded; `Upgrade` (WebSocket) requests become a byte tunnel once
//! the upstream answers `101`; header name case is preserved on HTTP/1 hops both ways.
//! Upstream connections are pooled per endpoint: HTTP/1 keep-alive by `H1Pool` (IP
//! endpoints, cleartext or TLS; hyper-util's client for hostnames), HTTP/2 by `H2Pool` (one
//! multiplexed connection per endpoint, the request's host as `:authority`, `TE: trailers`
//! kept for gRPC). Envoy's circuit breakers (DestinationRule `connectionPool`) hold per
//! cluster across snapshots: `max_connections` and `max_pending_requests` in `H1Pool`,
//! `max_requests` for every attempt, `max_retries` around each retry; over a threshold the
//! request gets Envoy's 503 `... reset reason: overflow` with flag `UO` (a retry over
//! `max_retries` is not made, and flagged `UO`). Pools drop endpoints that leave the config.

use crate::cluster::{random_below, random_u64, Breakers, ClusterLb, Resource, Slot};
use crate::config::HeaderCase;
use crate::config::{
    AbortKind, Action, ClusterTarget, Fraction, HeaderMatch, HeaderOps, HttpFilter, PathMatch,
    QueryMatch, Redirect, RetryPolicy, Route, RouteAction, StringMatch, ValueMatch,
};
use crate::metrics::RequestKey;
use crate::snapshot::Snapshot;
use crate::Shared;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::client::conn::http2::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::oneshot;
use tracing::debug;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Connect timeout for upstreams: Istio's default `connectTimeout` (10 s).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Envoy's default retry back-off: 25 ms base, 10x cap.
const RETRY_BASE: Duration = Duration::from_millis(25);
const RETRY_MAX: Duration = Duration::from_millis(250);
/// How much of a streamed request body is kept for a retry: Envoy's default per-connection
/// buffer limit (1 MiB). A longer body still streams, but cannot be retried.
pub const RETRY_BUFFER_LIMIT: usize = 1 << 20;

/// Upstream client pools (keyed by endpoint `ip:port` inside hyper-util), one per protocol.
pub struct Clients {
    /// By [`HeaderCase`] (see [`case_index`]): a legacy client's case is fixed when built.
    h1: [Client<HttpConnector, Body>; 3],
    /// Cleartext HTTP/2 to an IP endpoint; `h2` below serves what it cannot (hostnames).
    h2c: H2Pool,
    h2: Client<HttpConnector, Body>,
    /// Pools whose connections come from Istio's inbound source address (127.0.0.6).
    inbound_h1: [Client<HttpConnector, Body>; 3],
    inbound_h2: Client<HttpConnector, Body>,
    /// HTTP/1.1 to an IP endpoint, cleartext or TLS: our own keep-alive pool, which also
    /// enforces the connection circuit breakers. The hyper-util clients above serve only
    /// what it cannot (hostnames, TLS contexts that may negotiate h2).
    h1pool: H1Pool,
    /// Circuit-breaker resources in use, by cluster name (they outlive snapshots).
    breakers: ArcSwap<HashMap<String, Arc<Breakers>>>,
}

impl Clients {
    pub fn new() -> Clients {
        let pools = |source: Option<std::net::IpAddr>| {
            let mut c = HttpConnector::new();
            c.set_nodelay(true);
            c.set_connect_timeout(Some(CONNECT_TIMEOUT));
            c.set_local_address(source);
            // Clients are cheap until they connect: one per header case.
            let h1 = [
                HeaderCase::Lower,
                HeaderCase::Preserve,
                HeaderCase::ProperCase,
            ]
            .map(|case| {
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(60))
                    .http1_preserve_header_case(case == HeaderCase::Preserve)
                    .http1_title_case_headers(case == HeaderCase::ProperCase)
                    .build(c.clone())
            });
            let h2 = Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(c);
            (h1, h2)
        };
        let (h1, h2) = pools(None);
        let (inbound_h1, inbound_h2) = pools(Some(crate::INBOUND_SOURCE));
        Clients {
            h1,
            h2c: H2Pool::default(),
            h2,
            inbound_h1,
            inbound_h2,
            h1pool: H1Pool::default(),
            breakers: ArcSwap::default(),
        }
    }

    /// Close the pooled connections to endpoints no cluster of `snap` lists any more (they
    /// left EDS, or their cluster went away), as Envoy drains a removed host's pools: idle
    /// connections close now, busy ones when their request is done (HTTP/1) or their last
    /// stream ends (HTTP/2, once no sender is left). Called with every new snapshot; it
    /// also keeps the pools' maps from growing with ORIGINAL_DST destinations, and drops the
    /// breaker counters of removed clusters once none of their units is held.
    pub fn forget_departed(&self, snap: &Snapshot) {
        // Breaker counters of clusters that are gone, once nothing holds a unit of them.
        let idle = |b: &Breakers| {
            use std::sync::atomic::Ordering::Acquire;
            b.connections.load(Acquire) == 0
                && b.pending.load(Acquire) == 0
                && b.requests.load(Acquire) == 0
                && b.retries.load(Acquire) == 0
        };
        let stale = |name: &String, b: &Arc<Breakers>| !snap.clusters.contains_key(name) && idle(b);
        if self.breakers.load().iter().any(|(n, b)| stale(n, b)) {
            self.breakers.rcu(|m| {
                m.iter()
                    .filter(|(n, b)| !stale(n, b))
                    .map(|(n, b)| (n.clone(), b.clone()))
                    .collect::<HashMap<_, _>>()
            });
        }
        let (h1, h2) = (self.h1pool.hosts.load(), self.h2c.conns.load());
        if h1.is_empty() && h2.is_empty() {
            return;
        }
        let live: std::collections::HashSet<SocketAddr> = snap
            .clusters
            .values()
            .flat_map(|c| c.hosts.iter().filter_map(|h| h.addr))
            .collect();
        if h2.keys().any(|k| !live.contains(&k.0)) {
            self.h2c.conns.rcu(|m| {
                m.iter()
                    .filter(|(k, _)| live.contains(&k.0))
                    .map(|(k, v)| (*k, v.clone()))
                    .collect::<HashMap<_, _>>()
            });
        }
        if h1.keys().any(|k| !live.contains(&k.0)) {
            let old = self.h1pool.hosts.rcu(|m| {
                m.iter()
                    .filter(|(k, _)| live.contains(&k.0))
                    .map(|(k, v)| (*k, v.clone()))
                    .collect::<HashMap<_, _>>()
            });
            for (k, host) in old.iter().filter(|(k, _)| !live.contains(&k.0)) {
                host.retire();
                debug!(endpoint = %k.0, "closing the pooled HTTP/1 connections of a departed endpoint");
            }
        }
    }

    /// The breaker resources of a cluster; lock-free after its first request.
    fn breakers(&self, cluster: &str) -> Arc<Breakers> {
        if let Some(b) = self.breakers.load().get(cluster) {
            return b.clone();
        }
        let mut out = None;
        self.breakers.rcu(|m| {
            let mut m = HashMap::clone(m);
            let b = m.entry(cluster.to_string()).or_default().clone();
            out = Some(b);
            m
        });
        out.unwrap_or_default()
    }

    /// The pool for a cluster. Only Istio's inbound source address is supported as a bind
    /// address: it is the one the pilot emits, and one pool per address keeps this simple.
    fn pick(
        &self,
        http2: bool,
        source: Option<std::net::IpAddr>,
        case: HeaderCase,
    ) -> &Client<HttpConnector, Body> {
        match (http2, source.is_some()) {
            (true, false) => &self.h2,
            (false, false) => &self.h1[case_index(case)],
            (true, true) => &self.inbound_h2,
            (false, true) => &self.inbound_h1[case_index(case)],
        }
    }
}

/// Position of a header case in per-case client arrays.
pub(crate) fn case_index(case: HeaderCase) -> usize {
    match case {
        HeaderCase::Lower => 0,
        HeaderCase::Preserve => 1,
        HeaderCase::ProperCase => 2,
    }
}

impl Default for Clients {
    fn default() -> Self {
        Clients::new()
    }
}

/// One multiplexed HTTP/2 connection per (endpoint, source address, TLS context), as Envoy keeps by
/// default. Not hyper-util's pool: that one names a connection by the URI's authority, which
/// HTTP/2 also sends as `:authority`, and that must be the request's host, not the endpoint.
/// Lookups are lock-free; a new connection is published with a copy-on-write swap.
#[derive(Default)]
struct H2Pool {
    conns: ArcSwap<HashMap<H2Key, H2Conn>>,
}

/// An upstream HTTP/2 connection's identity: endpoint, source address and the key of its TLS
/// context (`None`: h2c).
type H2Key = (SocketAddr, Option<IpAddr>, Option<u64>);

/// A connection's sender and, over TLS, its peer (copied into every response for metrics).
#[derive(Clone)]
struct H2Conn {
    sender: SendRequest<Body>,
    peer: Option<crate::tls::Security>,
}

impl H2Pool {
    async fn send(
        &self,
        endpoint: SocketAddr,
        source: Option<IpAddr>,
        tls: Option<&Arc<crate::config::UpstreamTls>>,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, Failure> {
        let key = (endpoint, source, tls.map(|t| t.key));
        let cached = self
            .conns
            .load()
            .get(&key)
            .filter(|c| !c.sender.is_closed())
            .cloned();
        let mut conn = cached;
        if let Some(c) = conn.as_mut() {
            // A cached connection may have gone away since (GOAWAY, idle close).
            if c.sender.ready().await.is_err() {
                conn = None;
            }
        }
        let mut conn = match conn {
            Some(c) => c,
            // Boxed, as the HTTP/1 connect: keeps the per-request future small.
            None => Box::pin(self.connect(key, tls)).await?,
        };
        let resp = match conn.sender.try_send_request(req).await {
            Ok(resp) => Ok(resp),
            Err(mut e) => match e.take_message() {
                // It never reached the connection (closing under us): once more on a new one.
                Some(req) => {
                    conn = Box::pin(self.connect(key, tls)).await?;
                    conn.sender
                        .send_request(req)
                        .await
                        .map_err(|e| Failure::Reset(e.to_string()))
                }
                None => Err(Failure::Reset(e.into_error().to_string())),
            },
        };
        resp.map(|mut r| {
            if let Some(p) = conn.peer {
                r.extensions_mut().insert(crate::tls::UpstreamPeer(p));
            }
            r
        })
    }

    /// A new connection, ready for a request, published for the next ones.
    async fn connect(
        &self,
        key: H2Key,
        tls: Option<&Arc<crate::config::UpstreamTls>>,
    ) -> Result<H2Conn, Failure> {
        let mut c = h2_connect(key.0, key.1, tls)
            .await
            .map_err(Failure::Connect)?;
        c.sender
            .ready()
            .await
            .map_err(|e| Failure::Reset(e.to_string()))?;
        self.conns.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(key, c.clone());
            m
        });
        Ok(c)
    }
}

async fn h2_connect(
    endpoint: SocketAddr,
    source: Option<IpAddr>,
    tls: Option<&Arc<crate::config::UpstreamTls>>,
) -> Result<H2Conn, String> {
    let (stream, peer) = upstream_stream(endpoint, source, tls).await?;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP/2 handshake with {endpoint}: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(%endpoint, error = %e, "upstream HTTP/2 connection ended with an error");
        }
    });
    Ok(H2Conn { sender, peer })
}

/// A connected upstream byte stream (TCP, then TLS when the endpoint's transport says so)
/// and, over TLS, the peer's identity.
async fn upstream_stream(
    endpoint: SocketAddr,
    source: Option<IpAddr>,
    tls: Option<&Arc<crate::config::UpstreamTls>>,
) -> Result<(crate::tls::Stream, Option<crate::tls::Security>), String> {
    let sock = if endpoint.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| e.to_string())?;
    if let Some(ip) = source {
        sock.bind(SocketAddr::new(ip, 0))
            .map_err(|e| format!("binding {ip}: {e}"))?;
    }
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(endpoint))
        .await
        .map_err(|_| format!("connecting to {endpoint}: timed out"))?
        .map_err(|e| format!("connecting to {endpoint}: {e}"))?;
    let _ = stream.set_nodelay(true);
    // Over TLS (ISTIO_MUTUAL, DestinationRule TLS) the handshake comes first.
    let (stream, peer) = match tls {
        None => (crate::tls::Stream::from(stream), None),
        Some(t) => {
            let (s, peer) = crate::tls::connect(stream, t)
                .await
                .map_err(|e| format!("TLS handshake with {endpoint}: {e}"))?;
            (crate::tls::Stream::Client(Box::new(s)), Some(peer))
        }
    };
    Ok((stream, peer))
}

/// HTTP/1.1 keep-alive connections per (endpoint, source address, TLS context), with
/// Envoy's connection-pool circuit breakers. A request takes an idle connection if there is
/// one, else queues as pending (`max_pending_requests`) for a new connection
/// (`max_connections`; the first connection to a host is always allowed, as Envoy does) or
/// for one to come free; a request over `max_requests` or `max_pending_requests` overflows.
/// Idle connections wait in a lock-free queue per endpoint; the response body hands its
/// connection back when it ends. Hosts are found with one `ArcSwap` load.
#[derive(Default)]
struct H1Pool {
    hosts: ArcSwap<HashMap<H1Key, Arc<H1Host>>>,
}

/// An HTTP/1 host's identity: an [`H2Key`] and the header case its connections write (fixed
/// per connection by hyper, so clusters that differ in it do not share connections).
type H1Key = (SocketAddr, Option<IpAddr>, Option<u64>, HeaderCase);

/// Idle connections kept per endpoint; more are closed when they come free.
const MAX_IDLE_PER_HOST: usize = 1024;
/// Bound on how long a request waits as pending (Envoy waits as long as the route timeout,
/// which may be none): past it the request overflows.
const MAX_PENDING_WAIT: Duration = Duration::from_secs(300);

pub(crate) struct H1Host {
    idle_tx: crossbeam_channel::Sender<H1Conn>,
    idle_rx: crossbeam_channel::Receiver<H1Conn>,
    /// Connections open to this endpoint, busy or idle.
    open: std::sync::atomic::AtomicU32,
    /// The endpoint left the config: connections close instead of going idle.
    retired: std::sync::atomic::AtomicBool,
    /// HTTP/1 header-name case of this host's connections.
    header_case: HeaderCase,
}

impl H1Host {
    fn retire(&self) {
        self.retired
            .store(true, std::sync::atomic::Ordering::Release);
        // Bounded by the queue's capacity; dropping an idle connection closes it.
        for _ in 0..MAX_IDLE_PER_HOST {
            if self.idle_rx.try_recv().is_err() {
                break;
            }
        }
    }
}

impl std::fmt::Debug for H1Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Host")
            .field("idle", &self.idle_rx.len())
            .field("open", &self.open)
            .finish()
    }
}

impl Default for H1Host {
    fn default() -> H1Host {
        let (idle_tx, idle_rx) = crossbeam_channel::bounded(MAX_IDLE_PER_HOST);
        H1Host {
            idle_tx,
            idle_rx,
            open: Default::default(),
            retired: Default::default(),
            header_case: HeaderCase::Lower,
        }
    }
}

/// One upstream HTTP/1.1 connection's handle.
struct H1Conn {
    sender: http1::SendRequest<Body>,
    peer: Option<crate::tls::Security>,
    /// Requests sent on it so far (`max_requests_per_connection`).
    uses: u32,
    /// When it was opened (`max_connection_duration`).
    born: Instant,
    /// Milliseconds (since [`pool_epoch`]) when it last went idle; 0 while busy. The
    /// connection's task closes it once idle longer than the cluster's idle timeout.
    idle_since: Arc<std::sync::atomic::AtomicU64>,
}

fn pool_epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn pool_now_ms() -> u64 {
    // +1: 0 means busy.
    pool_epoch().elapsed().as_millis() as u64 + 1
}

/// Gives the connection's counts back when its task ends (closed by either side, idle
/// timeout, failed connect).
struct OpenConn {
    host: Arc<H1Host>,
    _slot: Slot,
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.host
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// What a request needs from the cluster to use the pool.
struct PoolUse<'a> {
    breakers: &'a Arc<Breakers>,
    limits: &'a crate::config::PoolLimits,
}

impl H1Pool {
    fn host(&self, key: H1Key) -> Arc<H1Host> {
        if let Some(h) = self.hosts.load().get(&key) {
            return h.clone();
        }
        let new = || {
            Arc::new(H1Host {
                header_case: key.3,
                ..H1Host::default()
            })
        };
        let mut out = None;
        self.hosts.rcu(|m| {
            let mut m = HashMap::clone(m);
            out = Some(m.entry(key).or_insert_with(new).clone());
            m
        });
        out.unwrap_or_else(new)
    }

    /// A ready idle connection of `host`, dropping (closing) dead or expired ones.
    async fn take_idle(
        host: &H1Host,
        idle_timeout: Duration,
        max_age: Option<Duration>,
    ) -> Option<H1Conn> {
        // Bounded by the queue's capacity.
        for _ in 0..MAX_IDLE_PER_HOST {
            let mut c = host.idle_rx.try_recv().ok()?;
            let since = c.idle_since.swap(0, std::sync::atomic::Ordering::AcqRel);
            let idle_for = Duration::from_millis(pool_now_ms().saturating_sub(since));
            let too_old = max_age.is_some_and(|m| c.born.elapsed() >= m);
            if c.sender.is_closed() || too_old || (since > 0 && idle_for >= idle_timeout) {
                continue;
            }
            // Right after its previous response the connection task may not have marked it
            // idle yet; it does so promptly (or fails, when the server closed it).
            if c.sender.ready().await.is_ok() {
                return Some(c);
            }
        }
        None
    }

    async fn send(
        pool: PoolUse<'_>,
        host: Arc<H1Host>,
        endpoint: SocketAddr,
        source: Option<IpAddr>,
        tls: Option<&Arc<crate::config::UpstreamTls>>,
        req: Request<Body>,
        reusable: bool,
    ) -> Result<Response<Body>, Failure> {
        let limits = pool.limits;
        let mut conn =
            Self::take_idle(&host, limits.idle_timeout, limits.max_connection_duration).await;
        if conn.is_none() {
            // Envoy: a request without a ready connection is pending, within the threshold.
            let _pending = pool
                .breakers
                .take(Resource::Pending, limits.max_pending_requests, false)
                .ok_or(Failure::Overflow)?;
            let deadline = tokio::time::Instant::now() + MAX_PENDING_WAIT;
            // Bounded in time by the deadline; each round ends in a wake-up or a connection.
            loop {
                let freed = pool.breakers.freed.notified();
                tokio::pin!(freed);
                freed.as_mut().enable();
                if let Some(c) =
                    Self::take_idle(&host, limits.idle_timeout, limits.max_connection_duration)
                        .await
                {
                    conn = Some(c);
                    break;
                }
                // The first connection to a host is always allowed, so a host starved by
                // its siblings' connections still makes progress.
                let first = host.open.load(std::sync::atomic::Ordering::Acquire) == 0;
                if let Some(slot) =
                    pool.breakers
                        .take(Resource::Connections, limits.max_connections, first)
                {
                    host.open.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    let open = OpenConn {
                        host: host.clone(),
                        _slot: slot,
                    };
                    // Boxed: inline, the connect (and TLS handshake) state would enlarge every
                    // request's future, which is moved per request.
                    conn = Some(
                        Box::pin(h1_connect(endpoint, source, tls, open, limits.idle_timeout))
                            .await?,
                    );
                    break;
                }
                if tokio::time::timeout_at(deadline, freed).await.is_err() {
                    return Err(Failure::Overflow);
                }
            }
        }
        let Some(mut conn) = conn else {
            return Err(Failure::Overflow);
        };
        let Some(request) = pool
            .breakers
            .take(Resource::Requests, limits.max_requests, false)
        else {
            conn.idle_since
                .store(pool_now_ms(), std::sync::atomic::Ordering::Release);
            let _ = host.idle_tx.try_send(conn);
            return Err(Failure::Overflow);
        };
        conn.uses += 1;
        let resp = match conn.sender.try_send_request(req).await {
            Ok(r) => r,
            Err(mut e) => match e.take_message() {
                // It never reached the connection (closed under us): once more on a new one
                // (it keeps its place under the breakers: the old one's slot is given back).
                Some(req) => {
                    let first = host.open.load(std::sync::atomic::Ordering::Acquire) == 0;
                    let slot = pool
                        .breakers
                        .take(Resource::Connections, limits.max_connections, first)
                        .ok_or(Failure::Overflow)?;
                    host.open.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    let open = OpenConn {
                        host: host.clone(),
                        _slot: slot,
                    };
                    conn = Box::pin(h1_connect(endpoint, source, tls, open, limits.idle_timeout))
                        .await?;
                    conn.uses += 1;
                    conn.sender
                        .send_request(req)
                        .await
                        .map_err(|e| Failure::Reset(e.to_string()))?
                }
                None => return Err(Failure::Reset(e.into_error().to_string())),
            },
        };
        let peer = conn.peer.clone();
        let max_uses = limits.max_requests_per_connection;
        let back = (reusable && (max_uses == 0 || conn.uses < max_uses)).then(|| GiveBack {
            host,
            conn,
            breakers: pool.breakers.clone(),
            max_age: limits.max_connection_duration,
        });
        let (mut parts, body) = resp.into_parts();
        if let Some(p) = peer {
            parts.extensions.insert(crate::tls::UpstreamPeer(p));
        }
        let mut body = PooledBody {
            inner: body,
            back,
            _request: Some(request),
        };
        if body.inner.is_end_stream() {
            body.done();
        }
        Ok(Response::from_parts(parts, body.boxed()))
    }
}

/// A new HTTP/1.1 connection (header case as its host's cluster says, upgrades allowed)
/// whose task closes it once idle for `idle_timeout`.
async fn h1_connect(
    endpoint: SocketAddr,
    source: Option<IpAddr>,
    tls: Option<&Arc<crate::config::UpstreamTls>>,
    open: OpenConn,
    idle_timeout: Duration,
) -> Result<H1Conn, Failure> {
    let (stream, peer) = upstream_stream(endpoint, source, tls)
        .await
        .map_err(Failure::Connect)?;
    let case = open.host.header_case;
    let (sender, conn) = http1::Builder::new()
        .preserve_header_case(case == HeaderCase::Preserve)
        .title_case_headers(case == HeaderCase::ProperCase)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Failure::Connect(format!("HTTP/1 handshake with {endpoint}: {e}")))?;
    let idle_since = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watched = idle_since.clone();
    tokio::spawn(async move {
        let _open = open;
        let conn = conn.with_upgrades();
        tokio::pin!(conn);
        // Beyond a day, "never" (Envoy's 0 = disabled arrives as Duration::MAX).
        let check = (idle_timeout < Duration::from_secs(86_400)).then_some(idle_timeout);
        // Bounded by the connection's life: every round ends it or re-checks after a sleep.
        loop {
            let sleep = async {
                match check {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        debug!(%endpoint, error = %e, "upstream HTTP/1 connection ended with an error");
                    }
                    return;
                }
                () = sleep => {
                    let since = watched.load(std::sync::atomic::Ordering::Acquire);
                    let idle_ms = pool_now_ms().saturating_sub(since) as u128;
                    if since > 0 && check.is_some_and(|d| idle_ms >= d.as_millis()) {
                        debug!(%endpoint, "closing an idle upstream HTTP/1 connection");
                        return;
                    }
                }
            }
        }
    });
    Ok(H1Conn {
        sender,
        peer,
        uses: 0,
        born: Instant::now(),
        idle_since,
    })
}

/// Where a finished response puts its connection back.
struct GiveBack {
    host: Arc<H1Host>,
    conn: H1Conn,
    breakers: Arc<Breakers>,
    max_age: Option<Duration>,
}

/// An upstream HTTP/1.1 response body: holds the request's breaker slot until it ends, then
/// hands the connection back to the idle queue. Dropped early, the connection closes (hyper
/// cannot reuse one with an unread response).
struct PooledBody {
    inner: Incoming,
    back: Option<GiveBack>,
    _request: Option<Slot>,
}

impl PooledBody {
    fn done(&mut self) {
        self._request = None;
        if let Some(b) = self.back.take() {
            let too_old = b.max_age.is_some_and(|m| b.conn.born.elapsed() >= m);
            if too_old || b.host.retired.load(std::sync::atomic::Ordering::Acquire) {
                // Dropped: the connection closes.
                b.breakers.wake_pending();
                return;
            }
            b.conn
                .idle_since
                .store(pool_now_ms(), std::sync::atomic::Ordering::Release);
            // A full queue closes the connection (dropped).
            let _ = b.host.idle_tx.try_send(b.conn);
            b.breakers.wake_pending();
        }
    }
}

impl hyper::body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.done(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.done(),
            Poll::Ready(Some(Err(_))) => {
                self.back = None;
                self._request = None;
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that holds the request's breaker slot until it ends (the pools that are
/// not ours: HTTP/2, hostnames).
struct CountedBody {
    inner: Incoming,
    _request: Option<Slot>,
}

impl hyper::body::Body for CountedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) || self.inner.is_end_stream()
        {
            self._request = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// What one downstream connection knows: where its routes come from and who it talks to.
#[derive(Clone)]
pub struct ConnCtx {
    pub shared: Arc<Shared>,
    /// Key of the route table in the snapshot (RDS name or the inline key).
    pub route_key: Arc<str>,
    /// Where this connection's HCM lives in the snapshot (listener, chain index and name), so
    /// each request runs the filters of the current config (see [`current_hcm`]).
    pub listener: Arc<str>,
    pub chain: Option<usize>,
    pub chain_name: Arc<str>,
    /// The HCM's HTTP filters in decoder order (the router last) when the connection was
    /// accepted.
    pub http_filters: Arc<[crate::config::HttpFilter]>,
    /// The HCM's `use_remote_address` / `xff_num_trusted_hops`: where `remote_ip` comes from.
    pub use_remote_address: bool,
    pub xff_num_trusted_hops: u32,
    /// The connection's destination: the original destination on captured listeners, else
    /// the local address (RBAC's `destination_ip` / `destination_port`).
    pub local: SocketAddr,
    /// SNI of the downstream ClientHello, when the listener sniffed one.
    pub sni: Option<Arc<str>>,
    pub peer: SocketAddr,
    pub original_dst: Option<SocketAddr>,
    /// Istio's `reporter` label: `destination` on the inbound path, `source` otherwise
    /// (sidecar outbound and gateways).
    pub reporter: &'static str,
    /// Downstream TLS facts (mTLS, peer principal) for metrics.
    pub security: crate::tls::Security,
    /// The connection manager's access logs (usually none or one).
    pub access_log: Arc<[crate::access_log::AccessLog]>,
    /// The connection manager's `upgrade_configs`.
    pub upgrades: Arc<[crate::config::UpgradeConfig]>,
    /// The connection manager's HTTP/1 `header_key_format`.
    pub header_case: HeaderCase,
}

/// Serve one downstream connection (HTTP/1.1 or h2c) until it closes or we shut down.
pub async fn serve(stream: crate::tls::Stream, ctx: ConnCtx) {
    let _open = ctx.shared.http_connection();
    let ctx_case = ctx.header_case;
    let mut shutdown = ctx.shared.shutdown_signal();
    let svc = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(ctx, req).await) }
    });
    // Preserved header case is kept per request (hyper records it in the request's
    // extensions, which go upstream with it and are honoured by the writer there, as Envoy's
    // stateful formatter travels with the header map); recording costs a map per request,
    // so only when the HCM asks for it.
    // Upgrades need the connection handed back after a 101.
    let (exec, mut spawned) = StreamExec::new();
    let builder = hyper_util::server::conn::auto::Builder::new(exec)
        .preserve_header_case(ctx_case == HeaderCase::Preserve)
        .title_case_headers(ctx_case == HeaderCase::ProperCase);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let mut streams = futures::stream::FuturesUnordered::new();
    let mut conn_done = false;
    let mut draining = false;
    let mut stopped = std::pin::pin!(crate::stopped(&mut shutdown));
    // Wakers of the connection and of the streams' set that, while this task polls them,
    // record a wake-up for this same poll instead of scheduling the task again.
    let conn_wake = Arc::new(PollWake::default());
    let conn_waker = std::task::Waker::from(conn_wake.clone());
    let streams_wake = Arc::new(PollWake::default());
    let streams_waker = std::task::Waker::from(streams_wake.clone());
    // Moved in: the receiver is Send but not Sync, so the task may hold it, not a reference.
    std::future::poll_fn(move |cx| {
        if !draining && std::future::Future::poll(stopped.as_mut(), cx).is_ready() {
            // Finish in-flight requests, refuse new ones (Connection: close / GOAWAY).
            draining = true;
            conn.as_mut().graceful_shutdown();
        }
        // Until a stream was spawned (HTTP/1.1 always), the connection is all there is.
        if !spawned.any {
            if let Poll::Ready(r) = std::future::Future::poll(conn.as_mut(), cx) {
                if let Err(e) = r {
                    debug!(error = %e, "downstream connection ended with an error");
                }
                if !spawned.sent.load(Ordering::Acquire) {
                    return Poll::Ready(());
                }
                conn_done = true;
            }
            if !spawned.sent.load(Ordering::Acquire) {
                return Poll::Pending;
            }
            spawned.any = true;
        }
        conn_wake.begin(cx.waker());
        streams_wake.begin(cx.waker());
        let mut conn_cx = Context::from_waker(&conn_waker);
        let mut streams_cx = Context::from_waker(&streams_waker);
        // Bounded: a connection woken by its streams on every round yields after these.
        let mut again = false;
        for _ in 0..16 {
            // Streams first: a response one of them queues is written by the connection's
            // poll below, in this same wake-up.
            spawned.drive(&mut streams, &streams_wake, &mut streams_cx);
            if conn_done {
                break;
            }
            // Wake-ups before this poll (a stream queued frames) are answered by it.
            conn_wake.state.store(POLLING, Ordering::Release);
            if let Poll::Ready(r) = std::future::Future::poll(conn.as_mut(), &mut conn_cx) {
                conn_done = true;
                if let Err(e) = r {
                    debug!(error = %e, "downstream connection ended with an error");
                }
            }
            // The requests the connection just read start now (their first poll sends them
            // upstream) rather than after another wake-up.
            spawned.drive(&mut streams, &streams_wake, &mut streams_cx);
            // A stream started after the connection's poll queued frames (a local reply) or
            // the connection woke itself: poll it again now, not through another wake-up.
            again = !conn_done && conn_wake.notified();
            if !again {
                break;
            }
        }
        // Wake-ups that came after the last look (or rounds used up with one pending) bring
        // the task back.
        let conn_unanswered = conn_wake.end() && !conn_done;
        let streams_unanswered = streams_wake.end();
        if again || conn_unanswered || streams_unanswered {
            cx.waker().wake_by_ref();
        }
        // A connection that ended (or failed) has told its streams (reset or error); they
        // finish, as spawned tasks would, before the connection counts as closed.
        if conn_done && streams.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}

/// [`PollWake::state`]: the task is not polling the future / is polling it / was woken for
/// it while polling it.
const IDLE: u8 = 0;
const POLLING: u8 = 1;
const NOTIFIED: u8 = 2;

/// The waker [`serve`] polls the connection (and the set of its streams) with. A stream
/// that queues a response wakes its connection, and the connection granting send capacity
/// wakes the stream; when that happens inside serve's own poll, the wake-up is recorded
/// and answered in the same poll, instead of waking the task only to find the work done.
#[derive(Default)]
struct PollWake {
    state: AtomicU8,
    task: futures::task::AtomicWaker,
}

impl PollWake {
    /// A poll starts: wake-ups from now on are recorded.
    fn begin(&self, task: &std::task::Waker) {
        self.task.register(task);
        self.state.store(POLLING, Ordering::Release);
    }

    /// Whether a wake-up came since [`PollWake::begin`] or the last call (and reset).
    fn notified(&self) -> bool {
        self.state
            .compare_exchange(NOTIFIED, POLLING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The poll ends: wake-ups go to the task again; whether one came unanswered.
    fn end(&self) -> bool {
        self.state.swap(IDLE, Ordering::AcqRel) == NOTIFIED
    }
}

impl std::task::Wake for PollWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        match self
            .state
            .compare_exchange(POLLING, NOTIFIED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) | Err(NOTIFIED) => {}
            Err(_) => self.task.wake(),
        }
    }
}

#[cfg(test)]
mod poll_wake_tests {
    use super::PollWake;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Count(AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn wake_ups_during_a_poll_are_recorded_others_reach_the_task() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let task = std::task::Waker::from(count.clone());
        let pw = Arc::new(PollWake::default());
        let waker = std::task::Waker::from(pw.clone());
        // Idle: straight to the task (no registered task yet: nothing to wake, no panic).
        waker.wake_by_ref();
        pw.begin(&task);
        assert!(!pw.notified());
        waker.wake_by_ref();
        waker.wake_by_ref();
        assert_eq!(count.0.load(Ordering::SeqCst), 0, "recorded, not passed on");
        assert!(pw.notified());
        assert!(!pw.notified(), "answered once");
        waker.wake_by_ref();
        assert!(pw.end(), "an unanswered wake-up is reported at the end");
        waker.wake_by_ref();
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "after the poll: the task"
        );
        pw.begin(&task);
        assert!(!pw.end());
    }
}

/// A future hyper hands to its executor: an h2 stream (one request and its response body)
/// or an h2 CONNECT tunnel.
type StreamFuture = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The executor of one downstream connection: hyper's h2 server spawns a task per stream;
/// this runs them in the connection's own task instead (as Envoy runs a connection's streams
/// on its worker), which saves the task spawn and scheduling and the wake-ups between a
/// stream and the connection that writes its frames (callgrind, h2c one stream per
/// connection: see BENCHMARKS.md). hyper calls `execute` only from within the connection's
/// or a stream's poll, so [`Spawned::drive`] picks them up right after, in the same task.
#[derive(Clone)]
struct StreamExec {
    tx: std::sync::mpsc::Sender<StreamFuture>,
    /// Set with each send: the common poll (nothing spawned) checks this, not the channel.
    sent: Arc<AtomicBool>,
}

/// The receiving end of [`StreamExec`], held by [`serve`]'s task.
struct Spawned {
    rx: std::sync::mpsc::Receiver<StreamFuture>,
    sent: Arc<AtomicBool>,
    /// Whether hyper ever spawned on this connection (h2): until then [`serve`] polls the
    /// connection alone, with the task's own waker.
    any: bool,
}

impl StreamExec {
    fn new() -> (Self, Spawned) {
        let (tx, rx) = std::sync::mpsc::channel();
        let sent = Arc::new(AtomicBool::new(false));
        (
            StreamExec {
                tx,
                sent: sent.clone(),
            },
            Spawned {
                rx,
                sent,
                any: false,
            },
        )
    }
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        match self.tx.send(Box::pin(fut)) {
            Ok(()) => self.sent.store(true, Ordering::Release),
            // The connection's task is gone (cannot happen while hyper polls it): a task of
            // its own then, rather than a dropped stream.
            Err(std::sync::mpsc::SendError(fut)) => {
                tokio::spawn(fut);
            }
        }
    }
}

impl Spawned {
    /// Polls a connection's streams, taking on those hyper spawned meanwhile (a stream's
    /// poll can spawn too: an h2 CONNECT tunnel), until none is ready; `cx` wakes through
    /// `wake`, so a stream woken while polled (the connection granted it send capacity) is
    /// polled again here.
    fn drive(
        &self,
        streams: &mut futures::stream::FuturesUnordered<StreamFuture>,
        wake: &PollWake,
        cx: &mut Context<'_>,
    ) {
        use futures::StreamExt as _;
        // Bounded: streams that wake themselves or spawn on every poll cannot keep this
        // loop going past these rounds (a wake-up left over brings the task back).
        for _ in 0..16 {
            if self.sent.swap(false, Ordering::Acquire) {
                while let Ok(f) = self.rx.try_recv() {
                    streams.push(f);
                }
            }
            if streams.is_empty() {
                return;
            }
            while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
            if !wake.notified() && !self.sent.load(Ordering::Acquire) {
                return;
            }
        }
        // Rounds used up with work left: recorded as a wake-up, the poll's end answers it.
        cx.waker().wake_by_ref();
    }
}

/// Per-request facts for the access log and metrics.
struct Outcome {
    flags: Vec<&'static str>,
    /// The route's cluster (shared: no copy of its name per request).
    cluster: Option<Arc<ClusterLb>>,
    /// The name of a route's cluster the config does not have (`NC`).
    missing_cluster: Option<String>,
    /// The upstream TLS peer, when the response came over TLS.
    upstream: Option<crate::tls::Security>,
    /// The endpoint of the last attempt, for the access log.
    upstream_host: Option<Arc<crate::cluster::Host>>,
    /// Its workload, from the endpoint's EDS metadata (`destination_*` labels when no peer
    /// metadata came back).
    upstream_workload: Option<Arc<crate::metrics::Workload>>,
    /// `%RESPONSE_CODE_DETAILS%` when a filter answered (RBAC's denial).
    details: Option<String>,
}

/// The request's future on the heap: hyper moves the service's future into its dispatcher
/// slot and polls it through a chain of state machines, so a pointer moves instead of
/// several KiB per request (callgrind: fewer instructions than the allocation costs).
fn handle(
    ctx: ConnCtx,
    req: Request<Incoming>,
) -> Pin<Box<impl std::future::Future<Output = Response<Body>> + Send>> {
    Box::pin(handle_request(ctx, req))
}

impl Outcome {
    fn cluster_name(&self) -> &str {
        match (&self.cluster, &self.missing_cluster) {
            (Some(c), _) => &c.config.name,
            (None, Some(name)) => name,
            (None, None) => "",
        }
    }
}

async fn handle_request(ctx: ConnCtx, mut req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let telemetry = &ctx.shared.metrics;
    telemetry.request_started();
    // Istio's metadata exchange: the inbound side takes the caller's headers off (the app
    // must not see them), the outbound side sends ours.
    let inbound = ctx.reporter == "destination";
    let downstream_peer = if inbound {
        telemetry.take_peer(req.headers_mut())
    } else {
        telemetry.add_exchange_headers(req.headers_mut());
        None
    };
    let protocol = match req.version() {
        Version::HTTP_2 => "http/2",
        Version::HTTP_10 => "http/1.0",
        _ => "http/1.1",
    };
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let method = req.method().clone();
    // Shares the request's bytes (no copy); only the logs read it.
    let path = req.uri().path_and_query().cloned();
    let path = path.as_ref().map_or("/", PathAndQuery::as_str);
    let authority = authority(&req);
    // For the access log: the id the client sent (one we generate is the upstream's business).
    let request_id = req.headers().get(&X_REQUEST_ID).cloned();
    // The request as it arrived, only when an access log will print it.
    let logged = (!ctx.access_log.is_empty()).then(|| (SystemTime::now(), req.headers().clone()));
    let request_bytes = content_length(req.headers());
    let mut out = Outcome {
        flags: Vec::new(),
        cluster: None,
        missing_cluster: None,
        upstream: None,
        upstream_host: None,
        upstream_workload: None,
        details: None,
    };
    let mut resp = route_request(&ctx, req, &authority, &mut out).await;
    telemetry.request_finished();
    // A gRPC client gets the proxy's own errors as gRPC (Envoy's local reply conversion).
    if grpc {
        if let Some(LocalReply(text)) = resp.extensions().get::<LocalReply>().cloned() {
            resp = grpc_local_reply(resp.status(), &text);
        }
    }
    // The other half of the exchange: a caller that sent its metadata gets ours; the
    // upstream's answer is taken off before the app sees the response.
    let upstream_peer = if inbound {
        if downstream_peer.is_some() {
            telemetry.add_exchange_headers(resp.headers_mut());
        }
        None
    } else {
        telemetry.take_peer(resp.headers_mut())
    };

    let code = resp.status().as_u16();
    let (policy, source_principal, destination_principal) =
        crate::metrics::security_labels(ctx.reporter, &ctx.security, out.upstream.as_ref());
    let (source, destination) = if inbound {
        (
            downstream_peer.unwrap_or_else(crate::metrics::Workload::unknown),
            telemetry.local(),
        )
    } else {
        (
            telemetry.local(),
            upstream_peer
                .or_else(|| out.upstream_workload.take())
                .unwrap_or_else(crate::metrics::Workload::unknown),
        )
    };
    let grpc_status = resp
        .headers()
        .get(&GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let response_bytes = content_length(resp.headers());
    let flags_text = match out.flags.as_slice() {
        [] => std::borrow::Cow::Borrowed("-"),
        [one] => std::borrow::Cow::Borrowed(*one),
        many => std::borrow::Cow::Owned(many.join(",")),
    };
    let key = RequestKey {
        reporter: ctx.reporter,
        source,
        destination,
        // Inbound in mesh mTLS, the SNI names the service the caller meant; else the host.
        service: telemetry.service(
            out.cluster_name(),
            ctx.sni
                .as_deref()
                .filter(|_| inbound)
                .and_then(crate::metrics::service_from_sni)
                .unwrap_or(&authority),
        ),
        source_principal,
        destination_principal,
        request_protocol: if grpc { "grpc" } else { "http" },
        response_code: code,
        grpc_status,
        response_flags: std::mem::take(&mut out.flags),
        connection_security_policy: policy,
    };
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    telemetry
        .request_series(&key)
        .record(ms, request_bytes, response_bytes);
    if tracing::enabled!(target: "access_log", tracing::Level::DEBUG) {
        let request_id = request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        debug!(target: "access_log", %method, %path, %authority, protocol, code, flags = %flags_text, cluster = %out.cluster_name(), peer = %ctx.peer, duration_ms = ms as u64, request_id = %request_id, "request");
    }
    let flags = &*flags_text;
    if let Some((started, req_headers)) = &logged {
        let upstream_san = out.upstream.as_ref().and_then(|s| s.peer_principal.clone());
        let downstream_san = ctx.security.peer_principal.clone();
        let entry = crate::access_log::Entry {
            start: Some(*started),
            duration: start.elapsed(),
            method: Some(method.as_str()),
            path: Some(path),
            authority: Some(&authority),
            protocol: Some(match protocol {
                "http/2" => "HTTP/2",
                "http/1.0" => "HTTP/1.0",
                _ => "HTTP/1.1",
            }),
            request_headers: Some(req_headers),
            response_headers: Some(resp.headers()),
            response_code: code,
            response_flags: flags,
            response_code_details: out.details.as_deref(),
            bytes_received: request_bytes,
            bytes_sent: response_bytes,
            upstream_host: out.upstream_host.as_ref().map(|h| h.authority_str()),
            upstream_cluster: Some(out.cluster_name()).filter(|c| !c.is_empty()),
            downstream_remote: Some(ctx.peer),
            downstream_local: ctx.original_dst,
            downstream_peer_uri_san: downstream_san.as_deref(),
            upstream_peer_uri_san: upstream_san.as_deref(),
            ..Default::default()
        };
        for l in ctx.access_log.iter() {
            l.log(&entry);
        }
    }
    resp
}

/// A message's `content-length` (0 when absent: a streamed body's size is not counted).
fn content_length(h: &HeaderMap) -> u64 {
    h.get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn authority(req: &Request<Incoming>) -> String {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or_default()
        .to_ascii_lowercase()
}

async fn route_request(
    ctx: &ConnCtx,
    mut req: Request<Incoming>,
    authority: &str,
    out: &mut Outcome,
) -> Response<Body> {
    // One load per request: every decision below sees the same config.
    let snap = ctx.shared.snapshot_full();
    // The route is resolved before the filters run (Envoy caches it for them); a request
    // without one still passes every filter and gets its 404 from the router.
    let vh = snap
        .routes
        .get(&*ctx.route_key)
        .and_then(|table| table.virtual_host(authority));
    // `require_tls` (httpsRedirect) stands in for the route: Envoy's SSL-redirect route,
    // answered by the router after the filters.
    let ssl_redirect = vh.is_some_and(|vh| {
        vh.require_tls && !forwarded_https(ctx.security.tls, ctx.use_remote_address, req.headers())
    });
    let route = vh
        .filter(|_| !ssl_redirect)
        .and_then(|vh| vh.routes.iter().find(|r| route_matches(r, &req, authority)));
    // Upgrades are decided before any filter runs, as Envoy does when it builds the chain.
    if let Some(resp) = upgrade_filter(ctx, route, &mut req) {
        return resp;
    }
    let mut state = FilterState::default();
    let mut cors_headers = None;
    let live = current_hcm(ctx, &snap);
    let filters = live.map_or(&*ctx.http_filters, |h| &*h.http_filters);
    let xff = live.map_or((ctx.use_remote_address, ctx.xff_num_trusted_hops), |h| {
        (h.use_remote_address, h.xff_num_trusted_hops)
    });
    // The decoder filters in the HCM's order (the pilot emits fault, cors, jwt_authn, rbac,
    // router); any of them may answer the request itself.
    for filter in filters {
        match filter {
            HttpFilter::JwtAuthn(jwt) => {
                if let Some(resp) = jwt_filter(ctx, jwt, &mut req, &mut state) {
                    return resp;
                }
            }
            HttpFilter::Rbac(rbac) => {
                if let Some(resp) = rbac_filter(ctx, xff, rbac, &req, authority, &state, out) {
                    return resp;
                }
            }
            HttpFilter::Fault => {
                if let Some(resp) = fault_filter(route, out).await {
                    return resp;
                }
            }
            HttpFilter::Cors => match cors_filter(route, &req) {
                Cors::Reply(resp) => return resp,
                Cors::Headers(h) => cors_headers = h,
            },
            HttpFilter::Router => break,
        }
    }
    if ssl_redirect {
        return https_redirect(&req, authority);
    }
    let Some(route) = route else {
        out.flags.push("NR");
        return local_reply(StatusCode::NOT_FOUND, "");
    };
    let mut resp = match &route.action {
        Action::Direct { status, body } => {
            let mut resp = full_response(
                StatusCode::from_u16(*status).unwrap_or(StatusCode::OK),
                body.clone(),
            );
            apply_response_ops(resp.headers_mut(), &route.headers);
            resp
        }
        Action::Redirect(r) => {
            let mut resp = redirect(r, route, &req, authority);
            apply_response_ops(resp.headers_mut(), &route.headers);
            resp
        }
        Action::Route(a) => forward(ctx, &snap, route, a, req, authority, out).await,
    };
    if let Some(h) = cors_headers {
        resp.headers_mut().extend(h);
    }
    resp
}

/// What the HTTP filters of one request share (Envoy's stream info): dynamic metadata, which
/// one filter writes (jwt_authn: the verified payload per issuer) and a later one reads (rbac).
#[derive(Debug, Default)]
pub struct FilterState {
    pub metadata: DynamicMetadata,
}

/// Envoy's dynamic metadata: filter name -> key -> value. Usually empty or one filter with a
/// few keys, so a vector (no allocation while empty) rather than maps.
#[derive(Debug, Default)]
pub struct DynamicMetadata(Vec<(String, serde_json::Map<String, serde_json::Value>)>);

impl DynamicMetadata {
    pub fn set(&mut self, filter: &str, key: impl Into<String>, value: serde_json::Value) {
        let i = match self.0.iter().position(|(f, _)| f == filter) {
            Some(i) => i,
            None => {
                self.0.push((filter.to_string(), serde_json::Map::new()));
                self.0.len() - 1
            }
        };
        self.0[i].1.insert(key.into(), value);
    }

    /// Everything `filter` wrote.
    pub fn filter(&self, filter: &str) -> Option<&serde_json::Map<String, serde_json::Value>> {
        self.0.iter().find(|(f, _)| f == filter).map(|(_, m)| m)
    }

    pub fn get(&self, filter: &str, key: &str) -> Option<&serde_json::Value> {
        self.filter(filter)?.get(key)
    }
}

/// This connection's HCM in the current snapshot. Envoy drains connections whose filter
/// chain changed, so their clients reconnect to the new config; here a long-lived
/// (keep-alive, pooled) connection runs the current filters on its next request instead, so
/// an AuthorizationPolicy applies to it at once. `None` when the chain is gone or changed
/// place: the connection keeps the filters it was accepted with.
fn current_hcm<'s>(
    ctx: &ConnCtx,
    snap: &'s Snapshot,
) -> Option<&'s crate::config::HttpConnectionManager> {
    let l = snap.listeners.get(&*ctx.listener)?;
    let chain = match ctx.chain {
        Some(i) => l.filter_chains.get(i)?,
        None => l.default_chain.as_ref()?,
    };
    if *chain.name != *ctx.chain_name {
        return None;
    }
    match &chain.filter {
        crate::config::NetworkFilter::Http(h) => Some(h),
        crate::config::NetworkFilter::Tcp(_) => None,
    }
}

/// `envoy.filters.http.rbac`: `Some(403)` when the request is denied.
fn rbac_filter(
    ctx: &ConnCtx,
    (use_remote_address, xff_num_trusted_hops): (bool, u32),
    rbac: &crate::rbac::HttpRbac,
    req: &Request<Incoming>,
    authority: &str,
    state: &FilterState,
    out: &mut Outcome,
) -> Option<Response<Body>> {
    let remote_ip = crate::rbac::remote_ip(
        req.headers().get("x-forwarded-for"),
        ctx.peer.ip(),
        use_remote_address,
        xff_num_trusted_hops,
    );
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let facts = crate::rbac::Facts {
        peer: ctx.peer,
        remote_ip,
        local: ctx.local,
        security: &ctx.security,
        sni: ctx.sni.as_deref(),
        request: Some(crate::rbac::RequestFacts {
            method: req.method().as_str(),
            path,
            authority,
            headers: req.headers(),
            metadata: &state.metadata,
        }),
    };
    match rbac.check(&facts) {
        crate::rbac::Verdict::Allow => None,
        crate::rbac::Verdict::Deny(policy) => {
            out.details = Some(format!(
                "rbac_access_denied_matched_policy[{}]",
                policy.unwrap_or("none")
            ));
            Some(local_reply(StatusCode::FORBIDDEN, "RBAC: access denied"))
        }
    }
}

/// `envoy.filters.http.jwt_authn`: the verified payloads go to the dynamic metadata (for
/// rbac); a bad token gets Envoy's 401/403 with its `www-authenticate`.
fn jwt_filter(
    ctx: &ConnCtx,
    jwt: &crate::jwt::JwtAuthn,
    req: &mut Request<Incoming>,
    state: &mut FilterState,
) -> Option<Response<Body>> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let conn = crate::jwt::Downstream {
        tls: ctx.security.tls,
        use_remote_address: ctx.use_remote_address,
    };
    match jwt.on_request(req, conn, now) {
        Ok(payloads) => {
            for (key, payload) in payloads {
                state.metadata.set(crate::jwt::JWT_AUTHN, key, payload);
            }
            None
        }
        Err(r) => {
            let mut resp = local_reply(r.status, r.body);
            if let Some(v) = r.www_authenticate {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            Some(resp)
        }
    }
}

/// `envoy.filters.http.fault`: the route's delay, then its abort.
async fn fault_filter(route: Option<&Route>, out: &mut Outcome) -> Option<Response<Body>> {
    let route = route?;
    let f = route.fault.as_ref()?;
    if let Some((d, frac)) = f.delay {
        if hit(frac) {
            out.flags.push("DI");
            tokio::time::sleep(d).await;
        }
    }
    let (kind, frac) = f.abort.as_ref()?;
    if !hit(*frac) {
        return None;
    }
    out.flags.push("FI");
    let mut resp = match kind {
        AbortKind::Http(code) => local_reply(
            StatusCode::from_u16(*code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "fault filter abort",
        ),
        AbortKind::Grpc(code) => grpc_reply(*code, "fault filter abort"),
    };
    apply_response_ops(resp.headers_mut(), &route.headers);
    Some(resp)
}

enum Cors {
    /// A preflight answered here.
    Reply(Response<Body>),
    /// Headers for the response of an allowed origin, if any.
    Headers(Option<HeaderMap>),
}

/// `envoy.filters.http.cors`: preflights from allowed origins are answered here; other
/// requests get the policy's headers on their response.
fn cors_filter(route: Option<&Route>, req: &Request<Incoming>) -> Cors {
    let Some(c) = route.and_then(|r| r.cors.as_ref()) else {
        return Cors::Headers(None);
    };
    let Some(origin) = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    else {
        return Cors::Headers(None);
    };
    let allowed = c.allow_origins.iter().any(|m| string_matches(m, origin));
    let preflight = req.method() == http::Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if preflight && (allowed || !c.forward_not_matching_preflights) {
        let mut resp = full_response(StatusCode::OK, Bytes::new());
        if allowed {
            cors_preflight_headers(resp.headers_mut(), c, origin);
        }
        return Cors::Reply(resp);
    }
    if !allowed {
        return Cors::Headers(None);
    }
    let mut h = HeaderMap::new();
    insert_str(&mut h, header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    if c.allow_credentials {
        insert_str(&mut h, header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true");
    }
    if !c.expose_headers.is_empty() {
        insert_str(
            &mut h,
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            &c.expose_headers,
        );
    }
    Cors::Headers(Some(h))
}

/// The scheme Envoy's router sees in `x-forwarded-proto` after the connection manager set it:
/// the connection's own on an edge proxy, else the client's header, else the connection's.
fn forwarded_https(tls: bool, use_remote_address: bool, h: &HeaderMap) -> bool {
    if use_remote_address {
        return tls;
    }
    match h.get(&X_FORWARDED_PROTO) {
        Some(v) => v.as_bytes().eq_ignore_ascii_case(b"https"),
        None => tls,
    }
}

/// Envoy's SSL redirect: 301 to `https://` + the request's host (port kept) + path.
fn https_redirect(req: &Request<Incoming>, authority: &str) -> Response<Body> {
    // The host as the client wrote it (`authority` is lowercased for matching).
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or(authority);
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut resp = full_response(StatusCode::MOVED_PERMANENTLY, Bytes::new());
    if let Ok(v) = HeaderValue::from_str(&format!("https://{host}{path}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

fn insert_str(h: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

fn cors_preflight_headers(h: &mut HeaderMap, c: &crate::config::Cors, origin: &str) {
    insert_str(h, header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    for (name, v) in [
        (header::ACCESS_CONTROL_ALLOW_METHODS, &c.allow_methods),
        (header::ACCESS_CONTROL_ALLOW_HEADERS, &c.allow_headers),
        (header::ACCESS_CONTROL_MAX_AGE, &c.max_age),
    ] {
        if !v.is_empty() {
            insert_str(h, name, v);
        }
    }
    if c.allow_credentials {
        insert_str(h, header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true");
    }
}

/// Fire-and-forget copies for the route's mirror policies: same request, `Host` suffixed
/// with `-shadow` (as Envoy does), response discarded, never delaying the real request.
// The request pieces are passed separately because the real request still owns them.
#[allow(clippy::too_many_arguments)]
fn mirror(
    ctx: &ConnCtx,
    snap: &Snapshot,
    a: &RouteAction,
    method: &http::Method,
    path: &PathAndQuery,
    host: &str,
    headers: &HeaderMap,
    body: &Bytes,
) {
    for m in &a.mirrors {
        if !hit(m.fraction) {
            continue;
        }
        let Some(cluster) = snap.clusters.get(&m.cluster).cloned() else {
            continue;
        };
        let shadow = match host.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => format!("{h}-shadow:{p}"),
            _ => format!("{host}-shadow"),
        };
        let mut h = headers.clone();
        insert_str(&mut h, header::HOST, &shadow);
        let (ctx, method, path, body) = (ctx.clone(), method.clone(), path.clone(), body.clone());
        tokio::spawn(async move {
            let Some(picked) = cluster.pick(ctx.original_dst) else {
                return;
            };
            let tls = cluster.tls_for(&picked.host).cloned();
            let r = attempt_once(
                &ctx,
                &cluster,
                tls.as_ref(),
                &picked.host,
                &path,
                &method,
                h,
                http::Extensions::new(),
                full_body(body),
                None,
                None,
            )
            .await;
            if let AttemptResult::Response(resp) = r {
                // Read the body so the pooled connection can be reused.
                let _ = resp.into_body().collect().await;
            }
        });
    }
}

fn hit(f: Fraction) -> bool {
    f.numerator > 0 && (random_below(f.denominator as usize) as u32) < f.numerator
}

// ------------------------------------------------------------------ matching

fn route_matches(r: &Route, req: &Request<Incoming>, authority: &str) -> bool {
    let pq = req.uri().path_and_query();
    let path = pq.map_or("/", |p| p.path());
    let query = pq.and_then(|p| p.query()).unwrap_or("");
    let m = &r.matcher;
    let path_ok = match &m.path {
        PathMatch::Prefix(p) => {
            if m.case_sensitive {
                path.starts_with(p.as_str())
            } else {
                path.len() >= p.len()
                    && path.is_char_boundary(p.len())
                    && path[..p.len()].eq_ignore_ascii_case(p)
            }
        }
        PathMatch::Exact(p) => {
            if m.case_sensitive {
                path == p
            } else {
                path.eq_ignore_ascii_case(p)
            }
        }
        PathMatch::Regex(re) => re.is_match(path),
    };
    path_ok
        && m.headers.iter().all(|h| header_matches(h, req, authority))
        && m.query.iter().all(|q| query_matches(q, query))
}

fn header_value(req: &Request<Incoming>, name: &str, authority: &str) -> Option<String> {
    match name {
        ":method" => Some(req.method().as_str().to_string()),
        ":authority" | "host" => Some(authority.to_string()),
        ":scheme" => Some("http".to_string()),
        ":path" => Some(
            req.uri()
                .path_and_query()
                .map_or("/".into(), |p| p.to_string()),
        ),
        _ => {
            let vals: Vec<&str> = req
                .headers()
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            // Envoy matches repeated headers as their comma-joined value.
            (!vals.is_empty()).then(|| vals.join(","))
        }
    }
}

fn header_matches(h: &HeaderMatch, req: &Request<Incoming>, authority: &str) -> bool {
    let mut v = header_value(req, &h.name, authority);
    if v.is_none() && h.treat_missing_as_empty {
        v = Some(String::new());
    }
    let m = value_matches(&h.value, v.as_deref());
    m != h.invert
}

fn value_matches(m: &ValueMatch, v: Option<&str>) -> bool {
    match (m, v) {
        (ValueMatch::Present(p), v) => v.is_some() == *p,
        (ValueMatch::String(_), None) => false,
        (ValueMatch::String(s), Some(v)) => string_matches(s, v),
    }
}

fn string_matches(m: &StringMatch, v: &str) -> bool {
    let fold = |ic: bool, s: &str| {
        if ic {
            s.to_ascii_lowercase()
        } else {
            s.to_string()
        }
    };
    match m {
        StringMatch::Exact { value, ignore_case } => {
            if *ignore_case {
                v.eq_ignore_ascii_case(value)
            } else {
                v == value
            }
        }
        StringMatch::Prefix { value, ignore_case } => {
            fold(*ignore_case, v).starts_with(&fold(*ignore_case, value))
        }
        StringMatch::Suffix { value, ignore_case } => {
            fold(*ignore_case, v).ends_with(&fold(*ignore_case, value))
        }
        StringMatch::Contains { value, ignore_case } => {
            fold(*ignore_case, v).contains(&fold(*ignore_case, value))
        }
        StringMatch::Regex(re) => re.is_match(v),
    }
}

fn query_matches(q: &QueryMatch, query: &str) -> bool {
    let v = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .find(|(k, _)| *k == q.name)
        .map(|(_, v)| v);
    value_matches(&q.value, v)
}

// ------------------------------------------------------------------ actions

fn split_path(pq: &str) -> (&str, Option<&str>) {
    match pq.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (pq, None),
    }
}

/// The upstream path after `prefix_rewrite` / `regex_rewrite`; the query string is kept.
fn rewritten_path(
    route: &Route,
    prefix_rewrite: Option<&str>,
    regex_rewrite: Option<&(crate::config::FullRegex, String)>,
    pq: &str,
) -> String {
    let (path, query) = split_path(pq);
    let new_path = if let Some((re, sub)) = regex_rewrite {
        re.0.replace_all(path, sub.as_str()).into_owned()
    } else if let Some(rw) = prefix_rewrite {
        match &route.matcher.path {
            // The matched prefix is replaced; for exact and regex matches Envoy's "matched
            // prefix" is the whole path.
            PathMatch::Prefix(p) if path.len() >= p.len() && path.is_char_boundary(p.len()) => {
                format!("{rw}{}", &path[p.len()..])
            }
            _ => rw.to_string(),
        }
    } else {
        path.to_string()
    };
    match query {
        Some(q) => format!("{new_path}?{q}"),
        None => new_path,
    }
}

fn redirect(
    r: &Redirect,
    route: &Route,
    req: &Request<Incoming>,
    authority: &str,
) -> Response<Body> {
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/".to_string(), |p| p.to_string());
    let scheme = r.scheme.as_deref().unwrap_or("http");
    let mut host = r.host.clone().unwrap_or_else(|| authority.to_string());
    if let Some(p) = r.port {
        let bare = host
            .rsplit_once(':')
            .map_or(host.as_str(), |(h, _)| h)
            .to_string();
        host = format!("{bare}:{p}");
    }
    let (orig_path, orig_query) = split_path(&pq);
    let (path, query) = match (&r.path, &r.prefix_rewrite) {
        (Some(p), _) => match split_path(p) {
            // A query in path_redirect replaces the request's.
            (p, Some(q)) => (p.to_string(), Some(q.to_string())),
            (p, None) => (p.to_string(), orig_query.map(str::to_string)),
        },
        (None, Some(rw)) => {
            let full = rewritten_path(route, Some(rw), None, &pq);
            let (p, q) = split_path(&full);
            (p.to_string(), q.map(str::to_string))
        }
        (None, None) => (orig_path.to_string(), orig_query.map(str::to_string)),
    };
    let query = if r.strip_query { None } else { query };
    let location = match query {
        Some(q) => format!("{scheme}://{host}{path}?{q}"),
        None => format!("{scheme}://{host}{path}"),
    };
    let mut resp = full_response(
        StatusCode::from_u16(r.status).unwrap_or(StatusCode::MOVED_PERMANENTLY),
        Bytes::new(),
    );
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

fn pick_target(target: &ClusterTarget) -> (&str, Option<&HeaderOps>, Option<&str>) {
    match target {
        ClusterTarget::Single(c) => (c, None, None),
        ClusterTarget::Weighted(ws) => {
            let total: u64 = ws.iter().map(|w| u64::from(w.weight)).sum();
            let mut r = random_u64() % total.max(1);
            for w in ws {
                if r < u64::from(w.weight) {
                    return (&w.name, Some(&w.headers), w.host_rewrite.as_deref());
                }
                r -= u64::from(w.weight);
            }
            // Unreachable with a positive total (conversion rejects all-zero weights).
            ws.first().map_or(("", None, None), |w| {
                (&w.name, Some(&w.headers), w.host_rewrite.as_deref())
            })
        }
    }
}

/// Hop-by-hop headers a proxy must not forward (RFC 9110 7.6.1). A static: a `const` array
/// of `HeaderName`s is built and dropped at every use.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Header names looked up per request, parsed once.
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_ENVOY_ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Position of `n` in [`HOP_BY_HOP`]. A `match` on the name compiles to a length switch and
/// one comparison; seven `HeaderName` comparisons per header cost ~10x more.
fn hop_by_hop_index(n: &HeaderName) -> Option<usize> {
    match n.as_str() {
        "connection" => Some(0),
        "keep-alive" => Some(1),
        "proxy-connection" => Some(2),
        "proxy-authenticate" => Some(3),
        "te" => Some(4),
        "transfer-encoding" => Some(5),
        "upgrade" => Some(6),
        _ => None,
    }
}

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // One pass over the names finds which hop-by-hop headers are there (usually none or
    // `Connection`), instead of seven hashed removals.
    let mut present = 0u8;
    for k in h.keys() {
        if let Some(i) = hop_by_hop_index(k) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // Headers named in `Connection` are hop-by-hop too (`keep-alive`, `close` and the
    // listed ones need no extra removal).
    let mut named: Vec<HeaderName> = Vec::new();
    if present & 1 != 0 {
        for t in h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
        {
            let t = t.trim();
            if t.is_empty()
                || t.eq_ignore_ascii_case("close")
                || HOP_BY_HOP
                    .iter()
                    .any(|n| t.eq_ignore_ascii_case(n.as_str()))
            {
                continue;
            }
            if let Ok(n) = HeaderName::from_bytes(t.as_bytes()) {
                named.push(n);
            }
        }
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            h.remove(n);
        }
    }
    for n in &named {
        h.remove(n);
    }
}

fn apply_request_ops(h: &mut HeaderMap, ops: &HeaderOps) {
    for n in &ops.request_remove {
        h.remove(n);
    }
    for (n, v, append) in &ops.request_add {
        if *append {
            h.append(n.clone(), v.clone());
        } else {
            h.insert(n.clone(), v.clone());
        }
    }
}

fn apply_response_ops(h: &mut HeaderMap, ops: &HeaderOps) {
    for n in &ops.response_remove {
        h.remove(n);
    }
    for (n, v, append) in &ops.response_add {
        if *append {
            h.append(n.clone(), v.clone());
        } else {
            h.insert(n.clone(), v.clone());
        }
    }
}

/// A random (version 4) UUID, as Envoy generates for `x-request-id`. Written by hand: the
/// `format!` it replaces cost ~3000 instructions per request.
fn request_id() -> HeaderValue {
    // 32 random hex digits as 8-4-4-4-12, then the version (4) and variant (10xx) digits.
    let (ra, rb) = (random_u64(), random_u64());
    let (a, b) = (hex_u64(ra), hex_u64(rb));
    let mut out = [b'-'; 36];
    out[0..8].copy_from_slice(&a[0..8]);
    out[9..13].copy_from_slice(&a[8..12]);
    out[14..18].copy_from_slice(&a[12..16]);
    out[14] = b'4';
    out[19..23].copy_from_slice(&b[0..4]);
    out[19] = HEX_DIGITS[(0x8 | ((rb >> 60) & 0x3)) as usize];
    out[24..36].copy_from_slice(&b[4..16]);
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// `x` as 16 lowercase hex digits, most significant first.
fn hex_u64(x: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = HEX_DIGITS[((x >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// `x-envoy-attempt-count`: the usual values without an allocation.
fn attempt_count(n: u32) -> HeaderValue {
    const SMALL: [&str; 5] = ["0", "1", "2", "3", "4"];
    match SMALL.get(n as usize) {
        Some(s) => HeaderValue::from_static(s),
        None => HeaderValue::from(n),
    }
}

/// Why an attempt did not produce a usable response.
enum Failure {
    Connect(String),
    Reset(String),
    PerTryTimeout,
    /// A circuit breaker said no (Envoy's pool overflow): 503 `UO`, never retried.
    Overflow,
}

/// The request's hash for RING_HASH / MAGLEV clusters (Envoy's `hash_policy`): policies that
/// find their key are combined; none found = no hash. A cookie policy with a TTL whose cookie
/// is missing makes one up, hashes it, and returns the `Set-Cookie` for the response, so the
/// client sticks from its next request on (Envoy's behaviour).
fn request_hash(
    policies: &[crate::hash::HashPolicy],
    headers: &HeaderMap,
    path_and_query: &str,
    source: std::net::IpAddr,
) -> (Option<u64>, Option<HeaderValue>) {
    use crate::hash::{combine, cookie_value, hash_key, query_value, HashPolicy as H};
    let mut acc = None;
    let mut set_cookie = None;
    for p in policies {
        let h = match p {
            H::Header(name) => {
                let mut vals = headers.get_all(name).iter().peekable();
                // Several values hash as Envoy does: each one, combined in order.
                vals.peek()
                    .is_some()
                    .then(|| vals.fold(None, |a, v| Some(combine(a, hash_key(v.as_bytes())))))
                    .flatten()
            }
            H::Cookie { name, path, ttl } => {
                let found = headers
                    .get_all(header::COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .find_map(|c| cookie_value(c, name));
                match (found, ttl) {
                    (Some(v), _) => Some(hash_key(v.as_bytes())),
                    (None, Some(ttl)) => {
                        let value = format!("{:016x}", random_u64());
                        let mut c = format!("{name}=\"{value}\"; Max-Age={}", ttl.as_secs());
                        if let Some(path) = path {
                            c.push_str(&format!("; Path={path}"));
                        }
                        c.push_str("; HttpOnly");
                        set_cookie = HeaderValue::from_str(&c).ok();
                        Some(hash_key(value.as_bytes()))
                    }
                    (None, None) => None,
                }
            }
            H::SourceIp => Some(hash_key(source.to_string().as_bytes())),
            H::QueryParameter(name) => path_and_query
                .split_once('?')
                .and_then(|(_, q)| query_value(q, name))
                .map(|v| hash_key(v.as_bytes())),
        };
        if let Some(h) = h {
            acc = Some(combine(acc, h));
        }
    }
    (acc, set_cookie)
}

async fn forward(
    ctx: &ConnCtx,
    snap: &Snapshot,
    route: &Route,
    a: &RouteAction,
    req: Request<Incoming>,
    authority: &str,
    out: &mut Outcome,
) -> Response<Body> {
    let (cluster_name, cluster_ops, cluster_host) = pick_target(&a.target);
    let Some(cluster) = snap.clusters.get(cluster_name).cloned() else {
        out.missing_cluster = Some(cluster_name.to_string());
        out.flags.push("NC");
        return local_reply(StatusCode::SERVICE_UNAVAILABLE, "");
    };
    out.cluster = Some(cluster.clone());
    let (mut parts, body) = req.into_parts();
    // Taken out in any case: it belongs to the downstream connection, not to the upstream
    // request the extensions go on with (they carry the header case map).
    let downstream_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    let upgrade = upgrade_protocol(&parts.headers, parts.version).filter(|_| !cluster.config.http2);
    let mut req_body = if a.mirrors.is_empty() {
        ReqBody::new(body)
    } else {
        // The mirrors need a copy of the whole body.
        match body.collect().await {
            Ok(b) => ReqBody::Buffered(b.to_bytes()),
            Err(e) => {
                out.flags.push("DC");
                debug!(error = %e, "reading the downstream request body");
                return local_reply(StatusCode::BAD_REQUEST, "");
            }
        }
    };
    let original_pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let pq = original_pq.as_str();
    // Without a rewrite the request's own path goes upstream (shared bytes, no copy).
    let path = if a.prefix_rewrite.is_none() && a.regex_rewrite.is_none() {
        original_pq.clone()
    } else {
        let p = rewritten_path(
            route,
            a.prefix_rewrite.as_deref(),
            a.regex_rewrite.as_ref(),
            pq,
        );
        match PathAndQuery::try_from(p) {
            Ok(p) => p,
            Err(e) => {
                out.flags.push("UF");
                debug!(error = %e, "the rewritten path is not a valid URI path");
                return reset_reply(false, "remote connection failure");
            }
        }
    };
    let host = cluster_host
        .or(a.host_rewrite.as_deref())
        .unwrap_or(authority)
        .to_string();

    let mut headers = parts.headers;
    // `TE: trailers` is the one TE value a proxy passes on: gRPC servers require it.
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    strip_hop_by_hop(&mut headers);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // Envoy answers `100 Continue` itself (hyper does when the body is first read) and does
    // not pass the expectation on.
    headers.remove(header::EXPECT);
    if let Some(proto) = &upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, proto.clone());
    }
    if !headers.contains_key(&X_REQUEST_ID) {
        headers.insert(X_REQUEST_ID.clone(), request_id());
    }
    // Envoy's connection manager: an edge proxy (use_remote_address) states the downstream
    // connection's scheme, others fill it in only when the client did not.
    if ctx.use_remote_address || !headers.contains_key(&X_FORWARDED_PROTO) {
        let scheme = if ctx.security.tls { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(scheme));
    }
    crate::tls::apply_xfcc(&mut headers, &ctx.security);
    apply_request_ops(&mut headers, &route.headers);
    if let Some(ops) = cluster_ops {
        apply_request_ops(&mut headers, ops);
    }
    // Usually the request's own `Host` already says it: no copy then.
    if headers.get(header::HOST).map(|v| v.as_bytes()) != Some(host.as_bytes()) {
        if let Ok(v) = HeaderValue::from_str(&host) {
            headers.insert(header::HOST, v);
        }
    }
    if let ReqBody::Buffered(body) = &req_body {
        mirror(ctx, snap, a, &parts.method, &path, &host, &headers, body);
    }

    // Computed from the request as it arrived (before rewrites), as Envoy's router does.
    let (hash, set_cookie) = if cluster.wants_hash() {
        request_hash(&a.hash_policy, &headers, pq, ctx.peer.ip())
    } else {
        (None, None)
    };

    let deadline = a.timeout.map(|t| Instant::now() + t);
    // An upgrade is a tunnel: one attempt, as Envoy does.
    let retry = a.retry.as_ref().filter(|_| upgrade.is_none());
    let max_attempts = 1 + retry.map_or(0, |r| r.num_retries);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let Some(picked) = cluster.pick_hashed(ctx.original_dst, hash) else {
            out.flags.push("UH");
            return local_reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        };
        // The last possible attempt takes the headers; only earlier ones need a copy. The
        // copy stays here and the original goes upstream: hyper recycles a sent map for the
        // next message on its connection, and the original has room for the headers added
        // per request (a clone is exactly full, so they would grow it every time).
        let last = attempt >= max_attempts;
        let mut h = if last {
            std::mem::take(&mut headers)
        } else {
            let copy = headers.clone();
            std::mem::replace(&mut headers, copy)
        };
        h.insert(X_ENVOY_ATTEMPT_COUNT.clone(), attempt_count(attempt));
        out.upstream_host = Some(picked.host.clone());
        out.upstream_workload = picked.host.endpoint.workload.clone();
        let tls = cluster.tls_for(&picked.host).cloned();
        let result = attempt_once(
            ctx,
            &cluster,
            tls.as_ref(),
            &picked.host,
            &path,
            &parts.method,
            h,
            if last {
                std::mem::take(&mut parts.extensions)
            } else {
                parts.extensions.clone()
            },
            req_body.next(),
            deadline,
            retry,
        )
        .await;
        match &result {
            AttemptResult::Response(r) => cluster.report(
                &picked.host,
                crate::cluster::Outcome::Status(r.status().as_u16()),
            ),
            // An overflow is the proxy's own limit, not the host's fault.
            AttemptResult::Failed(Failure::Overflow) => {}
            _ => cluster.report(&picked.host, crate::cluster::Outcome::LocalFailure),
        }
        drop(picked);
        let retries_left = attempt < max_attempts;
        match result {
            AttemptResult::GlobalTimeout => {
                out.flags.push("UT");
                return local_reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout");
            }
            AttemptResult::Response(mut resp) => {
                out.upstream = resp
                    .extensions()
                    .get::<crate::tls::UpstreamPeer>()
                    .map(|p| p.0.clone());
                let retriable = retry.is_some_and(|r| retriable_response(r, &resp));
                if retriable
                    && retries_left
                    && req_body.replayable().await
                    && retry_backoff(ctx, &cluster, attempt, deadline, out).await
                {
                    continue;
                }
                if retriable && attempt > 1 {
                    out.flags.push("URX");
                }
                let switching =
                    upgrade.is_some() && resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                if switching {
                    let upstream_upgrade = hyper::upgrade::on(&mut resp);
                    let Some(down) = downstream_upgrade else {
                        out.flags.push("UPE");
                        return local_reply(StatusCode::BAD_GATEWAY, "upgrade failed");
                    };
                    tokio::spawn(tunnel(down, upstream_upgrade));
                }
                let (mut p, b) = resp.into_parts();
                // A 101 keeps `Connection: upgrade` and `Upgrade`; the rest is hop-by-hop.
                let proto = p
                    .headers
                    .get(header::UPGRADE)
                    .cloned()
                    .filter(|_| switching);
                strip_hop_by_hop(&mut p.headers);
                if let Some(proto) = proto {
                    p.headers
                        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    p.headers.insert(header::UPGRADE, proto);
                }
                apply_response_ops(&mut p.headers, &route.headers);
                if let Some(ops) = cluster_ops {
                    apply_response_ops(&mut p.headers, ops);
                }
                if let Some(c) = &set_cookie {
                    p.headers.append(header::SET_COOKIE, c.clone());
                }
                return Response::from_parts(p, b);
            }
            AttemptResult::Failed(f) => {
                let retriable = retry.is_some_and(|r| retriable_failure(r, &f));
                if retriable
                    && retries_left
                    && req_body.replayable().await
                    && retry_backoff(ctx, &cluster, attempt, deadline, out).await
                {
                    continue;
                }
                if retriable && attempt > 1 {
                    out.flags.push("URX");
                }
                return match f {
                    Failure::PerTryTimeout => {
                        out.flags.push("UT");
                        local_reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
                    }
                    Failure::Connect(e) => {
                        out.flags.push("UF");
                        debug!(cluster = %cluster.config.name, error = %e, "upstream connect failure");
                        reset_reply(attempt > 1, "remote connection failure")
                    }
                    Failure::Reset(e) => {
                        out.flags.push("UC");
                        debug!(cluster = %cluster.config.name, error = %e, "upstream reset");
                        reset_reply(attempt > 1, "connection termination")
                    }
                    Failure::Overflow => {
                        out.flags.push("UO");
                        debug!(cluster = %cluster.config.name, "circuit breaker overflow");
                        reset_reply(attempt > 1, "overflow")
                    }
                };
            }
        }
    }
}

enum AttemptResult {
    Response(Response<Body>),
    Failed(Failure),
    GlobalTimeout,
}

#[allow(clippy::too_many_arguments)]
async fn attempt_once(
    ctx: &ConnCtx,
    cluster: &ClusterLb,
    tls: Option<&Arc<crate::config::UpstreamTls>>,
    host: &crate::cluster::Host,
    path: &PathAndQuery,
    method: &http::Method,
    headers: HeaderMap,
    extensions: http::Extensions,
    body: Body,
    deadline: Option<Instant>,
    retry: Option<&RetryPolicy>,
) -> AttemptResult {
    let addr = host.addr;
    let http2 = cluster.config.http2;
    // HTTP/1.1 to an IP, cleartext or over a TLS context that cannot pick h2 by ALPN: our
    // own pool, with the request in origin form and its `Host` header as is.
    let own_h1 = addr.filter(|_| {
        !http2 && tls.is_none_or(|t| !t.config.alpn_protocols.iter().any(|p| p == b"h2"))
    });
    // HTTP/2 to an IP (cleartext or TLS): our own pool, with the request's host as
    // `:authority`.
    let h2c = addr.filter(|_| http2);
    let mut headers = headers;
    let uri: Result<Uri, String> = if own_h1.is_some() {
        Ok(Uri::from(path.clone()))
    } else {
        let target = match h2c {
            Some(_) => headers
                .remove(header::HOST)
                .and_then(|h| h.to_str().ok().map(str::to_string))
                .unwrap_or_else(|| host.authority_str().to_string()),
            None => host.authority_str().to_string(),
        };
        format!("http://{target}{path}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| e.to_string())
    };
    let uri = match uri {
        Ok(u) => u,
        Err(e) => return AttemptResult::Failed(Failure::Connect(format!("bad upstream URI: {e}"))),
    };
    let reusable = !headers.contains_key(header::UPGRADE);
    let mut req = Request::new(body);
    *req.extensions_mut() = extensions;
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    *req.version_mut() = if http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let now = Instant::now();
    let global_left = deadline.map(|d| d.saturating_duration_since(now));
    let per_try = retry.and_then(|r| r.per_try_timeout);
    let limit = match (global_left, per_try) {
        (Some(g), Some(p)) => Some(g.min(p)),
        (g, p) => g.or(p),
    };
    let clients = &ctx.shared.clients;
    let breakers = cluster
        .breakers
        .get_or_init(|| clients.breakers(&cluster.config.name));
    let limits = &cluster.config.pool;
    let source = cluster.config.source_address;
    let fut = async {
        if let Some(addr) = own_h1 {
            let pool = PoolUse { breakers, limits };
            // One pool per (endpoint, source, TLS context): fixed for a host of this cluster.
            let h1 = host.h1_pool.get_or_init(|| {
                clients
                    .h1pool
                    .host((addr, source, tls.map(|t| t.key), cluster.config.header_case))
            });
            return H1Pool::send(pool, h1.clone(), addr, source, tls, req, reusable).await;
        }
        // The other pools: only `max_requests` applies (their connections are theirs).
        let request = breakers
            .take(Resource::Requests, limits.max_requests, false)
            .ok_or(Failure::Overflow)?;
        let resp = match (tls, h2c) {
            (tls, Some(addr)) => clients.h2c.send(addr, source, tls, req).await,
            // TLS upstreams (DestinationRule tls, ISTIO_MUTUAL) have their own pools.
            (Some(t), None) => ctx
                .shared
                .tls_clients
                .get(t, http2, source, cluster.config.header_case)
                .request(req)
                .await
                .map_err(legacy_failure),
            (None, None) => clients
                .pick(http2, source, cluster.config.header_case)
                .request(req)
                .await
                .map_err(legacy_failure),
        }?;
        Ok(resp.map(|b| {
            CountedBody {
                inner: b,
                _request: Some(request),
            }
            .boxed()
        }))
    };
    let res = match limit {
        Some(l) => match tokio::time::timeout(l, fut).await {
            Ok(r) => r,
            Err(_) => {
                // Whichever budget ran out decides: the route timeout ends the request.
                let global_done = deadline.is_some_and(|d| Instant::now() >= d)
                    || per_try.is_none_or(|p| global_left.is_some_and(|g| g <= p));
                return if global_done {
                    AttemptResult::GlobalTimeout
                } else {
                    AttemptResult::Failed(Failure::PerTryTimeout)
                };
            }
        },
        None => fut.await,
    };
    match res {
        Ok(resp) => AttemptResult::Response(resp),
        Err(f) => AttemptResult::Failed(f),
    }
}

fn legacy_failure(e: hyper_util::client::legacy::Error) -> Failure {
    if e.is_connect() {
        Failure::Connect(format!("{e:?}"))
    } else {
        Failure::Reset(format!("{e:?}"))
    }
}

fn retriable_response<B>(r: &RetryPolicy, resp: &Response<B>) -> bool {
    let code = resp.status().as_u16();
    let on = &r.on;
    if on.five_xx && code >= 500 {
        return true;
    }
    if on.gateway_error && matches!(code, 502..=504) {
        return true;
    }
    if on.retriable_4xx && code == 409 {
        return true;
    }
    if on.retriable_status_codes && r.status_codes.contains(&code) {
        return true;
    }
    if !on.grpc_codes.is_empty() {
        let grpc = resp
            .headers()
            .get(&GRPC_STATUS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok());
        if grpc.is_some_and(|g| on.grpc_codes.contains(&g)) {
            return true;
        }
    }
    false
}

fn retriable_failure(r: &RetryPolicy, f: &Failure) -> bool {
    let on = &r.on;
    match f {
        Failure::Connect(_) => on.connect_failure || on.five_xx || on.gateway_error || on.reset,
        Failure::Reset(_) => on.reset || on.five_xx || on.gateway_error,
        Failure::PerTryTimeout => on.five_xx || on.gateway_error || on.reset,
        // Envoy never retries an overflow.
        Failure::Overflow => false,
    }
}

/// A retry under the cluster's `max_retries` breaker (held through the back-off, as Envoy
/// does); over it there is no retry and the request is flagged `UO`.
async fn retry_backoff(
    ctx: &ConnCtx,
    cluster: &ClusterLb,
    attempt: u32,
    deadline: Option<Instant>,
    out: &mut Outcome,
) -> bool {
    let breakers = cluster
        .breakers
        .get_or_init(|| ctx.shared.clients.breakers(&cluster.config.name));
    let Some(_retry) = breakers.take(Resource::Retries, cluster.config.pool.max_retries, false)
    else {
        out.flags.push("UO");
        return false;
    };
    backoff(attempt, deadline).await
}

/// Jittered exponential back-off before the next attempt; false if the route deadline
/// leaves no time for it.
async fn backoff(attempt: u32, deadline: Option<Instant>) -> bool {
    let cap = RETRY_BASE
        .saturating_mul(1u32 << attempt.min(8))
        .min(RETRY_MAX);
    let wait = Duration::from_millis(random_below(cap.as_millis().max(1) as usize) as u64);
    if deadline.is_some_and(|d| Instant::now() + wait >= d) {
        return false;
    }
    tokio::time::sleep(wait).await;
    true
}

// ------------------------------------------------------------------ upgrades

/// Envoy's upgrade handling for an HTTP/1.1 request asking to switch protocols:
/// - `h2c`: not proxied; its `Upgrade`, `HTTP2-Settings` and their `Connection` tokens are
///   removed and the request goes on as a plain one (Envoy's HTTP/1 codec);
/// - otherwise the route's `upgrade_configs` entry for the type decides, else the HCM's: an
///   upgrade nothing enables is answered 403 with an empty body (`upgrade_failed`).
fn upgrade_filter(
    ctx: &ConnCtx,
    route: Option<&Route>,
    req: &mut Request<Incoming>,
) -> Option<Response<Body>> {
    let proto = upgrade_protocol(req.headers(), req.version())?;
    let kind = proto.to_str().unwrap_or("").trim().to_ascii_lowercase();
    if kind == "h2c" {
        strip_h2c_upgrade(req.headers_mut());
        return None;
    }
    let per_route = match route.map(|r| &r.action) {
        Some(Action::Route(a)) => a.upgrades.as_slice(),
        _ => &[],
    };
    if upgrade_allowed(&ctx.upgrades, per_route, &kind) {
        return None;
    }
    debug!(upgrade = %kind, "upgrade not enabled by the connection manager or the route");
    Some(local_reply(StatusCode::FORBIDDEN, ""))
}

/// A route entry for the type decides (enabled or not); else an enabled HCM entry.
fn upgrade_allowed(
    hcm: &[crate::config::UpgradeConfig],
    route: &[crate::config::UpgradeConfig],
    kind: &str,
) -> bool {
    match route.iter().find(|u| u.kind == kind) {
        Some(u) => u.enabled,
        None => hcm.iter().any(|u| u.kind == kind && u.enabled),
    }
}

fn strip_h2c_upgrade(h: &mut HeaderMap) {
    h.remove(header::UPGRADE);
    h.remove("http2-settings");
    let kept: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case("upgrade")
                && !t.eq_ignore_ascii_case("http2-settings")
        })
        .map(str::to_string)
        .collect();
    h.remove(header::CONNECTION);
    if let Ok(v) = HeaderValue::from_str(&kept.join(", ")) {
        if !kept.is_empty() {
            h.insert(header::CONNECTION, v);
        }
    }
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` + `Upgrade`);
/// [`upgrade_filter`] has already refused the ones the config does not enable.
fn upgrade_protocol(h: &HeaderMap, version: Version) -> Option<HeaderValue> {
    if version != Version::HTTP_11 {
        return None;
    }
    let asks = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| h.get(header::UPGRADE).cloned()).flatten()
}

/// Copy bytes both ways between the two upgraded connections until either side closes.
async fn tunnel(down: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade) {
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(x) => x,
        Err(e) => {
            debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
    match tokio::io::copy_bidirectional(&mut down, &mut up).await {
        Ok((to_up, to_down)) => debug!(to_up, to_down, "upgraded connection closed"),
        Err(e) => debug!(error = %e, "upgraded connection ended with an error"),
    }
}

// ------------------------------------------------------------------ request bodies

/// The downstream request body across attempts.
enum ReqBody {
    /// Whole in memory: every attempt sends a copy.
    Buffered(Bytes),
    /// Not (completely) sent yet: the next attempt streams `rest` after `kept`.
    Pending(Leftover),
    /// Owned by an attempt in flight; what it leaves comes back on the channel.
    Sent(oneshot::Receiver<Leftover>),
}

/// What a streamed body leaves for the next attempt: the bytes already read (all of them,
/// within the retry buffer) and the part not read yet.
struct Leftover {
    kept: Vec<Bytes>,
    rest: Option<Incoming>,
}

impl ReqBody {
    fn new(body: Incoming) -> ReqBody {
        if body.is_end_stream() {
            ReqBody::Buffered(Bytes::new())
        } else {
            ReqBody::Pending(Leftover {
                kept: Vec::new(),
                rest: Some(body),
            })
        }
    }

    /// The body for the next attempt.
    fn next(&mut self) -> Body {
        let left = match std::mem::replace(self, ReqBody::Buffered(Bytes::new())) {
            ReqBody::Buffered(b) => {
                *self = ReqBody::Buffered(b.clone());
                return full_body(b);
            }
            ReqBody::Pending(l) => l,
            // Only reached when `replayable` said no and the caller went on anyway.
            ReqBody::Sent(_) => return full_body(Bytes::new()),
        };
        let (tx, rx) = oneshot::channel();
        *self = ReqBody::Sent(rx);
        let kept_len = left.kept.iter().map(Bytes::len).sum();
        Tee {
            replay: left.kept.iter().cloned().collect(),
            kept: Some(left.kept),
            kept_len,
            rest: left.rest,
            back: Some(tx),
        }
        .boxed()
    }

    /// Whether another attempt can send the whole body again. The attempt that had it hands
    /// it back when hyper finishes or drops it; a drop in the connection task can lag the
    /// response a little, hence the short bounded wait.
    async fn replayable(&mut self) -> bool {
        let ReqBody::Sent(rx) = self else {
            return true;
        };
        match tokio::time::timeout(Duration::from_millis(100), rx).await {
            Ok(Ok(left)) => {
                *self = ReqBody::Pending(left);
                true
            }
            // Over the retry buffer, failed, or still held upstream: no retry.
            _ => false,
        }
    }
}

/// Streams a request body upstream and keeps a copy of what went through (up to
/// [`RETRY_BUFFER_LIMIT`]); hands that copy, and whatever was not read, back when done or
/// dropped. Sends the kept bytes of an earlier attempt first.
struct Tee {
    replay: VecDeque<Bytes>,
    /// `None` once the body outgrew the retry buffer (or had trailers): not replayable.
    kept: Option<Vec<Bytes>>,
    kept_len: usize,
    rest: Option<Incoming>,
    back: Option<oneshot::Sender<Leftover>>,
}

impl Tee {
    fn give_back(&mut self) {
        if let (Some(tx), Some(kept)) = (self.back.take(), self.kept.take()) {
            let _ = tx.send(Leftover {
                kept,
                rest: self.rest.take(),
            });
        }
    }

    fn keep(&mut self, data: &Bytes) {
        self.kept_len += data.len();
        if self.kept_len > RETRY_BUFFER_LIMIT {
            self.kept = None;
        } else if let Some(k) = &mut self.kept {
            k.push(data.clone());
        }
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        self.give_back();
    }
}

impl hyper::body::Body for Tee {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        if let Some(b) = self.replay.pop_front() {
            return Poll::Ready(Some(Ok(hyper::body::Frame::data(b))));
        }
        let Some(rest) = self.rest.as_mut() else {
            self.give_back();
            return Poll::Ready(None);
        };
        match Pin::new(rest).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.rest = None;
                self.give_back();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.kept = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                match frame.data_ref() {
                    Some(data) => {
                        let data = data.clone();
                        self.keep(&data);
                    }
                    // Trailers are not kept: such a body is sent once.
                    None => self.kept = None,
                }
                if self.rest.as_ref().is_some_and(|r| r.is_end_stream()) {
                    self.rest = None;
                    self.give_back();
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.replay.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let replay: u64 = self.replay.iter().map(|b| b.len() as u64).sum();
        let rest = self
            .rest
            .as_ref()
            .map_or_else(|| hyper::body::SizeHint::with_exact(0), |r| r.size_hint());
        // Upper first: set_lower must never exceed it.
        let mut hint = hyper::body::SizeHint::new();
        if let Some(u) = rest.upper() {
            hint.set_upper(u + replay);
        }
        hint.set_lower(rest.lower() + replay);
        hint
    }
}

fn full_body(b: Bytes) -> Body {
    // An empty body boxes a zero-sized value: no allocation (most requests have no body).
    if b.is_empty() {
        return http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed();
    }
    Full::new(b).map_err(|never| match never {}).boxed()
}

// ------------------------------------------------------------------ local replies

fn full_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(full_body(body));
    *resp.status_mut() = status;
    resp
}

/// A response generated by the proxy itself, in Envoy's shape (`text/plain`).
pub fn local_reply(status: StatusCode, body: &'static str) -> Response<Body> {
    let text = Bytes::from_static(body.as_bytes());
    let mut resp = full_response(status, text.clone());
    if !body.is_empty() {
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    resp.extensions_mut().insert(LocalReply(text));
    resp
}

/// Marks a response the proxy generated itself, with its text: `handle` turns it into a gRPC
/// error when the request was gRPC.
#[derive(Clone)]
struct LocalReply(Bytes);

/// Envoy's mapping of a local reply's HTTP status to a gRPC status
/// (`Grpc::Utility::httpToGrpcStatus`).
fn http_to_grpc_status(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,                   // INTERNAL
        401 => 16,                   // UNAUTHENTICATED
        403 => 7,                    // PERMISSION_DENIED
        404 => 12,                   // UNIMPLEMENTED
        429 | 502 | 503 | 504 => 14, // UNAVAILABLE
        _ => 2,                      // UNKNOWN
    }
}

/// A local reply as a trailers-only gRPC response: HTTP 200, `grpc-status` and the text as
/// `grpc-message`.
fn grpc_local_reply(status: StatusCode, text: &Bytes) -> Response<Body> {
    let mut resp = full_response(StatusCode::OK, Bytes::new());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(
        "grpc-status",
        HeaderValue::from(http_to_grpc_status(status)),
    );
    if let Ok(v) = HeaderValue::from_bytes(text) {
        if !text.is_empty() {
            h.insert("grpc-message", v);
        }
    }
    resp
}

/// Envoy's 503 for an upstream that failed before sending headers, in its words.
fn reset_reply(retried: bool, reason: &str) -> Response<Body> {
    let how = if retried {
        "retried and the latest reset reason"
    } else {
        "reset reason"
    };
    let text = Bytes::from(format!(
        "upstream connect error or disconnect/reset before headers. {how}: {reason}"
    ));
    let mut resp = full_response(StatusCode::SERVICE_UNAVAILABLE, text.clone());
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp.extensions_mut().insert(LocalReply(text));
    resp
}

/// A gRPC error as a trailers-only response (HTTP 200, `grpc-status` in the headers).
fn grpc_reply(code: u32, message: &'static str) -> Response<Body> {
    let mut resp = full_response(StatusCode::OK, Bytes::new());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code));
    h.insert("grpc-message", HeaderValue::from_static(message));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FullRegex, RouteMatch};

    #[test]
    fn hop_by_hop_index_matches_the_table() {
        for (i, n) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(n), Some(i), "{n}");
        }
        for n in ["host", "x-connection", "tee", "upgrade-insecure-requests"] {
            assert_eq!(hop_by_hop_index(&HeaderName::from_static(n)), None, "{n}");
        }
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-drop"),
        );
        h.insert("x-drop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::HOST, HeaderValue::from_static("a"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["host"]);
    }

    fn route(path: PathMatch) -> Route {
        Route {
            name: "r".into(),
            matcher: RouteMatch {
                path,
                case_sensitive: true,
                headers: Vec::new(),
                query: Vec::new(),
            },
            action: Action::Direct {
                status: 200,
                body: Bytes::new(),
            },
            fault: None,
            cors: None,
            headers: HeaderOps::default(),
        }
    }

    #[test]
    fn prefix_and_regex_rewrites_keep_the_query() {
        let r = route(PathMatch::Prefix("/old/".into()));
        assert_eq!(
            rewritten_path(&r, Some("/new/"), None, "/old/thing?a=1"),
            "/new/thing?a=1"
        );
        let r = route(PathMatch::Exact("/x".into()));
        assert_eq!(rewritten_path(&r, Some("/y"), None, "/x?q"), "/y?q");
        let re = (
            FullRegex(Arc::new(regex::Regex::new("^/v1/(.*)$").unwrap())),
            "/v2/${1}".to_string(),
        );
        assert_eq!(
            rewritten_path(&r, None, Some(&re), "/v1/a/b?z=1"),
            "/v2/a/b?z=1"
        );
    }

    #[test]
    fn query_and_string_matching() {
        let q = QueryMatch {
            name: "id".into(),
            value: ValueMatch::String(StringMatch::Exact {
                value: "7".into(),
                ignore_case: false,
            }),
        };
        assert!(query_matches(&q, "a=1&id=7"));
        assert!(!query_matches(&q, "id=8"));
        assert!(string_matches(
            &StringMatch::Prefix {
                value: "JA".into(),
                ignore_case: true
            },
            "jason"
        ));
    }

    #[test]
    fn fractions() {
        assert!(!hit(Fraction {
            numerator: 0,
            denominator: 100
        }));
        assert!(hit(Fraction {
            numerator: 100,
            denominator: 100
        }));
        let n = (0..10_000)
            .filter(|_| {
                hit(Fraction {
                    numerator: 300_000,
                    denominator: 1_000_000,
                })
            })
            .count();
        assert!((2_700..3_300).contains(&n), "{n}");
    }

    #[test]
    fn upgrades_follow_the_route_then_the_connection_manager() {
        use crate::config::UpgradeConfig;
        let u = |kind: &str, enabled: bool| UpgradeConfig {
            kind: kind.into(),
            enabled,
        };
        let hcm = [u("websocket", true), u("spdy/3.1", false)];
        assert!(upgrade_allowed(&hcm, &[], "websocket"));
        assert!(
            !upgrade_allowed(&hcm, &[], "spdy/3.1"),
            "disabled in the HCM"
        );
        assert!(!upgrade_allowed(&hcm, &[], "foo"), "configured nowhere");
        assert!(!upgrade_allowed(
            &hcm,
            &[u("websocket", false)],
            "websocket"
        ));
        assert!(
            upgrade_allowed(&hcm, &[u("foo", true)], "foo"),
            "the route enables it"
        );
        assert!(upgrade_allowed(&hcm, &[u("spdy/3.1", true)], "spdy/3.1"));
    }

    #[test]
    fn h2c_upgrade_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert(
            "http2-settings",
            HeaderValue::from_static("AAMAAABkAAQAAP__"),
        );
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, HTTP2-Settings, keep-alive"),
        );
        strip_h2c_upgrade(&mut h);
        assert!(h.get(header::UPGRADE).is_none() && h.get("http2-settings").is_none());
        assert_eq!(
            h.get(header::CONNECTION),
            Some(&HeaderValue::from_static("keep-alive"))
        );
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        strip_h2c_upgrade(&mut h);
        assert!(h.get(header::CONNECTION).is_none());
    }

    #[test]
    fn upgrade_needs_connection_upgrade_on_http11() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(
            upgrade_protocol(&h, Version::HTTP_11),
            None,
            "no Connection: upgrade"
        );
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert_eq!(
            upgrade_protocol(&h, Version::HTTP_11),
            Some(HeaderValue::from_static("websocket"))
        );
        assert_eq!(upgrade_protocol(&h, Version::HTTP_2), None);
        h.remove(header::UPGRADE);
        assert_eq!(upgrade_protocol(&h, Version::HTTP_11), None);
    }

    #[tokio::test]
    async fn a_replayed_body_is_sent_again_and_handed_back() {
        let (a, b) = (Bytes::from_static(b"abc"), Bytes::from_static(b"def"));
        let (tx, rx) = oneshot::channel();
        let tee = Tee {
            replay: [a.clone(), b.clone()].into_iter().collect(),
            kept: Some(vec![a, b]),
            kept_len: 6,
            rest: None,
            back: Some(tx),
        };
        assert_eq!(tee.size_hint().exact(), Some(6));
        assert!(!tee.is_end_stream());
        let sent = tee.collect().await.map(|c| c.to_bytes()).ok();
        assert_eq!(sent.as_deref(), Some(&b"abcdef"[..]));
        let left = rx.await.ok();
        let kept: Vec<u8> = left
            .iter()
            .flat_map(|l| l.kept.iter().flat_map(|k| k.to_vec()))
            .collect();
        assert_eq!(kept, b"abcdef");
        assert!(left.is_some_and(|l| l.rest.is_none()));
    }

    /// A backend on loopback that counts its connections; `/slow` answers after 300 ms.
    async fn counting_backend() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        if req.uri().path() == "/slow" {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                        Ok::<_, Infallible>(Response::new(full_body(Bytes::from_static(b"ok"))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    async fn pooled_get(
        host: &Arc<H1Host>,
        breakers: &Arc<Breakers>,
        limits: &crate::config::PoolLimits,
        addr: SocketAddr,
        path: &'static str,
    ) -> Result<Bytes, &'static str> {
        let mut req = Request::new(full_body(Bytes::new()));
        *req.uri_mut() = Uri::from_static(path);
        req.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("backend"));
        let pool = PoolUse { breakers, limits };
        match H1Pool::send(pool, host.clone(), addr, None, None, req, true).await {
            Ok(r) => Ok(r.into_body().collect().await.unwrap().to_bytes()),
            Err(Failure::Overflow) => Err("overflow"),
            Err(_) => Err("failed"),
        }
    }

    #[tokio::test]
    async fn the_h1_pool_reuses_connections_within_its_limits() {
        let (addr, accepted) = counting_backend().await;
        let pool = H1Pool::default();
        let host = pool.host((addr, None, None, HeaderCase::Lower));
        let breakers = Arc::new(Breakers::default());
        let mut limits = crate::config::PoolLimits {
            max_requests_per_connection: 2,
            ..Default::default()
        };
        for _ in 0..5 {
            let body = pooled_get(&host, &breakers, &limits, addr, "/").await;
            assert_eq!(body.as_deref(), Ok(&b"ok"[..]));
        }
        let n = accepted.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(n, 3, "two requests per connection");

        // One connection (the idle one left above, now unlimited reuse) and one pending
        // request: of three concurrent slow requests the first takes the connection, the
        // second waits for it, the third overflows.
        limits.max_requests_per_connection = 0;
        limits.max_connections = 1;
        limits.max_pending_requests = 1;
        let (a, b, c) = tokio::join!(
            pooled_get(&host, &breakers, &limits, addr, "/slow"),
            pooled_get(&host, &breakers, &limits, addr, "/slow"),
            pooled_get(&host, &breakers, &limits, addr, "/slow"),
        );
        assert_eq!(
            (a.is_ok(), b.is_ok(), c),
            (true, true, Err("overflow")),
            "{a:?} {b:?}"
        );
        let n = accepted.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(n, 3, "the second request reused the first one's connection");
        assert_eq!(
            breakers.pending.load(std::sync::atomic::Ordering::SeqCst),
            0
        );
        assert_eq!(
            breakers.requests.load(std::sync::atomic::Ordering::SeqCst),
            0
        );

        // Idle past the idle timeout (a connection keeps the timeout it was opened with): the
        // connection is closed and its slot given back; the next request opens a new one.
        limits.idle_timeout = Duration::from_millis(100);
        let fresh = H1Pool::default().host((addr, None, None, HeaderCase::Lower));
        let breakers = Arc::new(Breakers::default());
        assert!(pooled_get(&fresh, &breakers, &limits, addr, "/")
            .await
            .is_ok());
        assert_eq!(
            breakers
                .connections
                .load(std::sync::atomic::Ordering::SeqCst),
            1
        );
        // Bounded wait (5 s) for the connection's task to notice.
        for _ in 0..50 {
            if breakers
                .connections
                .load(std::sync::atomic::Ordering::SeqCst)
                == 0
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            breakers
                .connections
                .load(std::sync::atomic::Ordering::SeqCst),
            0
        );
        assert!(pooled_get(&fresh, &breakers, &limits, addr, "/")
            .await
            .is_ok());
        let n = accepted.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(n, 5, "a new connection after the idle timeout");

        // Past max_connection_duration a connection is not reused.
        let aged = crate::config::PoolLimits {
            max_connection_duration: Some(Duration::ZERO),
            ..Default::default()
        };
        let fresh = H1Pool::default().host((addr, None, None, HeaderCase::Lower));
        assert!(pooled_get(&fresh, &breakers, &aged, addr, "/")
            .await
            .is_ok());
        assert!(pooled_get(&fresh, &breakers, &aged, addr, "/")
            .await
            .is_ok());
        let n = accepted.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(n, 7, "every connection too old to reuse");
    }

    #[tokio::test]
    async fn connections_to_departed_endpoints_are_closed() {
        let (addr, _) = counting_backend().await;
        let clients = Clients::new();
        let host = clients.h1pool.host((addr, None, None, HeaderCase::Lower));
        let breakers = Arc::new(Breakers::default());
        let limits = crate::config::PoolLimits::default();
        assert!(pooled_get(&host, &breakers, &limits, addr, "/")
            .await
            .is_ok());
        assert_eq!(
            breakers
                .connections
                .load(std::sync::atomic::Ordering::SeqCst),
            1
        );
        // A snapshot that still lists the endpoint keeps it.
        let mut snap = Snapshot::default();
        let cluster = crate::config::Cluster {
            name: "c".into(),
            kind: crate::config::DiscoveryKind::Static,
            lb: crate::config::LbPolicy::RoundRobin,
            connect_timeout: Duration::from_secs(1),
            http2: false,
            header_case: Default::default(),
            eds_name: None,
            inline_endpoints: Vec::new(),
            outlier: None,
            source_address: None,
            tls: None,
            transport_matches: Vec::new(),
            pool: Default::default(),
            locality_weighted: false,
        };
        let endpoint = crate::config::Endpoint {
            host: addr.ip().to_string(),
            port: addr.port(),
            weight: 1,
            healthy: true,
            transport_metadata: Vec::new(),
            workload: None,
            priority: 0,
            locality: 0,
            locality_weight: 1,
        };
        snap.clusters.insert(
            "c".into(),
            Arc::new(ClusterLb::new(cluster, vec![endpoint])),
        );
        let _ = clients.breakers("c");
        let _ = clients.breakers("gone");
        clients.forget_departed(&snap);
        let names: Vec<String> = clients.breakers.load().keys().cloned().collect();
        assert_eq!(
            names,
            ["c"],
            "the breakers of a removed cluster are dropped"
        );
        assert!(clients
            .h1pool
            .hosts
            .load()
            .contains_key(&(addr, None, None, HeaderCase::Lower)));
        assert!(!host.retired.load(std::sync::atomic::Ordering::SeqCst));
        // Gone from every cluster: its idle connection closes.
        clients.forget_departed(&Snapshot::default());
        assert!(clients.h1pool.hosts.load().is_empty());
        for _ in 0..50 {
            if breakers
                .connections
                .load(std::sync::atomic::Ordering::SeqCst)
                == 0
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            breakers
                .connections
                .load(std::sync::atomic::Ordering::SeqCst),
            0
        );
    }

    #[tokio::test]
    async fn a_body_over_the_retry_buffer_is_not_handed_back() {
        let (tx, rx) = oneshot::channel();
        let mut tee = Tee {
            replay: VecDeque::new(),
            kept: Some(Vec::new()),
            kept_len: 0,
            rest: None,
            back: Some(tx),
        };
        tee.keep(&Bytes::from(vec![0u8; RETRY_BUFFER_LIMIT]));
        assert!(tee.kept.is_some(), "exactly the limit still fits");
        tee.keep(&Bytes::from_static(b"x"));
        assert!(tee.kept.is_none());
        drop(tee);
        assert!(rx.await.is_err(), "nothing to replay");
    }

    #[test]
    fn request_ids_look_like_uuids() {
        let v = request_id();
        let id = v.to_str().unwrap();
        assert_eq!(id.len(), 36, "{id}");
        let groups: Vec<&str> = id.split('-').collect();
        assert_eq!(
            groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12],
            "{id}"
        );
        assert!(groups[2].starts_with('4'), "version 4: {id}");
        assert!(groups[3].starts_with(['8', '9', 'a', 'b']), "variant: {id}");
        assert!(id.bytes().all(|c| c == b'-' || c.is_ascii_hexdigit()));
        assert_ne!(request_id(), request_id());
    }

    #[test]
    fn hex_digits_most_significant_first() {
        assert_eq!(&hex_u64(0x0123_4567_89ab_cdef), b"0123456789abcdef");
        assert_eq!(&hex_u64(u64::MAX), b"ffffffffffffffff");
    }
}
