//! `mizzen-proxy`: Mizzen's native data plane (`mizzen proxy sidecar|router` without
//! `--envoy`).
//!
//! The data flows through the modules in this order:
//!
//! - [`xds`]: ADS client (delta or state of the world); converts each resource ([`config::proto`]) and publishes a
//!   new [`snapshot::Snapshot`] atomically after every response.
//! - [`listener`]: binds the snapshot's listeners, hands `virtualOutbound` connections to the
//!   listener of their original destination (SO_ORIGINAL_DST, or the local address of a
//!   TPROXY'd connection on a `transparent` listener bound with IP_TRANSPARENT), picks a
//!   filter chain (destination, SNI, transport, ALPN) and terminates TLS when the chain has a
//!   TLS context ([`tls`]).
//! - [`http`]'s upgrades follow the HCM's and the route's `upgrade_configs` (403 otherwise;
//!   `h2c` upgrades stripped and served as HTTP/1.1, as Envoy's codec does).
//! - [`http`] (HTTP/1.1 with Upgrade/WebSocket + h2c, gRPC, Envoy's router semantics) or
//!   [`tcp`] (byte copy). HTTP/1 header names are lowercased, as Envoy does, unless the HCM
//!   (requests) or the cluster (responses) has a `header_key_format`: `preserve_case`
//!   (Istio's `preserveHttp1HeaderCase`) or `proper_case_words` (hyper's title case, which
//!   capitalizes only after `-`).
//! - [`jwt`]: `envoy.filters.http.jwt_authn` in the HTTP filter chain (RequestAuthentication):
//!   tokens verified with Envoy's answers (401/403 texts, `www-authenticate`); verified payloads
//!   go into the request's dynamic metadata, where RBAC matches request principals and claims.
//! - [`rbac`]: AuthorizationPolicy as Envoy's RBAC filters: `envoy.filters.http.rbac` in the
//!   HTTP filter chain (403 `RBAC: access denied`), `envoy.filters.network.rbac` decided once
//!   per connection before tcp_proxy (a denied connection is closed); ALLOW/DENY/LOG, shadow
//!   (dry-run) rules, counters in `/stats`. HTTP requests on a kept-alive connection run the
//!   filters of the current listener config, where Envoy would drain the connection.
//! - [`cluster`]: load balancing over the cluster's endpoints: EDS priorities by Envoy's
//!   priority load (overprovisioning factor 1.4, outlier-ejected hosts count as unhealthy),
//!   locality-weighted picks when the cluster asks for them, consistent hashing in
//!   [`hash`]; and each endpoint's transport
//!   (auto mTLS by `tlsMode`, DestinationRule TLS) originated by [`tls`].
//! - [`secrets`]: the workload certificate from the pilot's CA (SDS `default` / `ROOTCA`),
//!   rotated in-process.
//! - [`admin`] + [`metrics`]: the admin port (with Envoy's `/logging`, through the binary's
//!   [`admin::LogControl`]), `/healthz/ready` and `/stats/prometheus`
//!   (Istio's HTTP and TCP metrics with both workloads' labels, learnt by Istio's metadata
//!   exchange headers and the endpoints' EDS metadata);
//!   [`access_log`]: the pilot's access-log format, one line per HTTP request or TCP
//!   connection.
//!
//! The request path reads config only through `ArcSwap::load`; nothing on it takes a lock.
//!
//! Not implemented yet (each is NACKed when the pilot sends it, or listed as accepted but not
//! enforced): SDS secrets other than `default` / `ROOTCA` (Gateway `credentialName`),
//! certificate files re-read on change (they load when the resource arrives), CRLs, SPKI/hash
//! pinning, OCSP, session ticket keys, `Cert`/`Chain` in `x-forwarded-client-cert`, TLS
//! 1.0/1.1, cipher/curve lists (accepted: rustls' fixed modern set), presenting the workload
//! certificate on the xDS connection (the pilot does not ask for it), Envoy's panic
//! threshold within a partly healthy priority and its total-panic spread across priorities
//! (here: ejected hosts are skipped while any host of the chosen priority is left, all
//! priorities empty of healthy hosts = the highest one), zone-aware routing,
//! circuit breakers on TCP proxy clusters and HIGH-priority thresholds, `max_connections`,
//! `max_pending_requests` and `max_requests_per_connection` on the pools that are not ours
//! (HTTP/1 to STRICT_DNS hostnames or over TLS contexts that offer h2; HTTP/2: one connection
//! per endpoint, only `max_requests` applies),
//! upgrade-specific filter chains and CONNECT in `upgrade_configs`, HTTP/2 upstream `:authority` to hostname (STRICT_DNS) endpoints,
//! header formatters other than `preserve_case` (and its `forward_reason_phrase`), request
//! trailers on a retry, keeping upgraded (WebSocket) tunnels open through the drain time, closing open TCP
//! connections that a new network RBAC policy would deny (decided at accept only), the RBAC
//! features listed in [`rbac`] (CEL conditions, the matcher API, ...), route matching on JWT
//! claims (a route match's `dynamic_metadata`: VirtualService `@request.auth.claims`), jwt_authn's
//! remote JWKS and the rest listed in [`jwt`], `require_tls: EXTERNAL_ONLY` (`ALL`, Gateway `httpsRedirect`, is done), TPROXY's original source address towards the app
//! (`original_src`; the pilot does not emit it either), TCP metadata exchange (an inbound TCP connection's
//! `source_workload` is unknown), an inbound request's `destination_service` from the inbound
//! cluster's service metadata (taken from the mesh SNI or the authority instead), TCP byte counts while a
//! connection is open, `grpc_response_status` from trailers, body sizes without
//! `content-length` (see [`metrics`]).

pub mod access_log;
pub mod admin;
pub mod cluster;
pub mod config;
pub mod hash;
pub mod http;
pub mod jwt;
pub mod listener;
pub mod metrics;
pub mod rbac;
pub mod secrets;
pub mod snapshot;
pub mod tcp;
pub mod tls;
pub mod xds;

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::config::core::v3::Node;
use snapshot::Snapshot;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::info;

/// Istio's source address for inbound connections to the app: the capture rules let it
/// through (`-s 127.0.0.6 -o lo -j RETURN`) instead of redirecting it back to 15006.
pub const INBOUND_SOURCE: std::net::IpAddr =
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 6));

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("binding {what} on {addr}: {source} (is another proxy or Envoy already running?)")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// How to run the proxy; the CLI fills it from flags and the agent's identity.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    pub node: Node,
    /// `host:port` of the pilot's xDS server.
    pub discovery_address: String,
    pub xds_mode: xds::Mode,
    pub admin_port: u16,
    pub status_port: u16,
    pub stats_port: u16,
    pub drain_duration: Duration,
    /// `sidecar` or `router`: the `reporter` label of Istio's metrics.
    pub reporter: &'static str,
    /// Workload certificate from the pilot's CA (SDS `default` / `ROOTCA` in TLS contexts);
    /// `None`: no identity, and TLS contexts that need it fail their handshakes.
    pub identity: Option<mizzen_agent::identity_cert::CertOptions>,
    /// The binary's run-time log levels, for the admin port's `/logging`.
    pub log_control: Option<Arc<dyn admin::LogControl>>,
}

/// State shared by every task: the current snapshot, readiness, xDS status, metrics and the
/// upstream clients.
pub struct Shared {
    snapshot: ArcSwap<Snapshot>,
    ready: AtomicBool,
    /// The proxy fetches a workload certificate (readiness waits for it).
    needs_identity: AtomicBool,
    xds_connected: AtomicBool,
    xds_responses: AtomicU64,
    /// Open downstream HTTP connections: drain waits for them to finish their last response.
    http_connections: AtomicU64,
    pub rejected: metrics::Rejected,
    generation: watch::Sender<u64>,
    pub metrics: metrics::Metrics,
    pub clients: http::Clients,
    /// Upstream pools over TLS, one per distinct TLS context.
    pub tls_clients: tls::UpstreamClients,
    pub reporter: &'static str,
    shutdown: watch::Sender<bool>,
}

impl Shared {
    pub fn new(reporter: &'static str) -> Arc<Shared> {
        Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            ready: AtomicBool::new(false),
            needs_identity: AtomicBool::new(false),
            xds_connected: AtomicBool::new(false),
            xds_responses: AtomicU64::new(0),
            http_connections: AtomicU64::new(0),
            rejected: metrics::Rejected::default(),
            generation: watch::channel(0).0,
            metrics: metrics::Metrics::new(),
            clients: http::Clients::new(),
            tls_clients: tls::UpstreamClients::default(),
            reporter,
            shutdown: watch::channel(false).0,
        })
    }

    /// The config in force; cheap, lock-free.
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    pub fn snapshot_full(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Install a new snapshot and wake the listener manager. Readiness is sticky: once the
    /// first complete config arrived we keep serving, even if later updates are partial.
    pub fn publish(&self, snapshot: Snapshot, complete: bool) {
        // Pooled connections to endpoints that left the config close (Envoy drains them).
        self.clients.forget_departed(&snapshot);
        // Outlier ejections carry over (ones recorded between these two lines are lost:
        // rare, and they recur).
        snapshot.inherit_outlier_state(&self.snapshot.load());
        self.snapshot.store(Arc::new(snapshot));
        self.xds_responses.fetch_add(1, Ordering::Relaxed);
        if complete && !self.ready.swap(true, Ordering::SeqCst) {
            info!("first complete config (CDS, LDS and their EDS/RDS) received; ready");
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// Ready once the first complete config arrived and, for a proxy with a mesh identity, its
    /// workload certificate too: Envoy's listeners warm until their SDS secret arrives, and a
    /// sidecar without its certificate would fail every mesh mTLS handshake.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
            && (!self.needs_identity.load(Ordering::Relaxed)
                || secrets::store().workload().is_some())
    }

    pub fn set_xds_connected(&self, v: bool) {
        self.xds_connected.store(v, Ordering::Relaxed);
    }

    pub fn xds_connected(&self) -> bool {
        self.xds_connected.load(Ordering::Relaxed)
    }

    pub fn xds_responses(&self) -> u64 {
        self.xds_responses.load(Ordering::Relaxed)
    }

    /// Counts one open downstream HTTP connection until the guard drops.
    pub fn http_connection(self: &Arc<Self>) -> ConnectionGuard {
        self.http_connections.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(self.clone())
    }

    pub fn open_http_connections(&self) -> u64 {
        self.http_connections.load(Ordering::Relaxed)
    }

    pub fn count_rejected(&self, type_url: &str) {
        self.rejected.count(type_url);
    }

    pub fn generations(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }
}

pub struct ConnectionGuard(Arc<Shared>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.http_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves once the shutdown flag is set (or its sender is gone); holds no watch guard
/// across awaits, so callers stay `Send`.
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Run the proxy until `stop` resolves or `/quitquitquit` is called, then stop accepting and
/// give in-flight requests `drain_duration` to finish.
pub async fn run(
    opts: ProxyOptions,
    stop: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ProxyError> {
    let shared = Shared::new(opts.reporter);
    // Our side of Istio's metric labels and of the metadata exchange.
    shared.metrics.set_local(&opts.node);
    shared
        .needs_identity
        .store(opts.identity.is_some(), Ordering::Relaxed);
    let identity_task = opts
        .identity
        .clone()
        .map(|o| tokio::spawn(secrets::run_identity(o)));
    admin::serve(&shared, &opts).await?;
    // The agent's rule: a CA address equal to the discovery address means xDS over TLS.
    let tls_root = opts
        .identity
        .as_ref()
        .filter(|o| o.ca_address == opts.discovery_address)
        .map(|o| o.root_pem.clone());
    let scheme = if tls_root.is_some() { "https" } else { "http" };
    let client = xds::XdsClient {
        node: opts.node.clone(),
        endpoint: format!("{scheme}://{}", opts.discovery_address),
        mode: opts.xds_mode,
        shared: shared.clone(),
        tls_root,
    };
    let xds_task = tokio::spawn(client.run());
    let listeners = tokio::spawn(listener::Manager::new(shared.clone()).run());
    let mut quit = shared.shutdown_signal();
    tokio::select! {
        () = stop => info!("shutdown signal received; draining"),
        () = stopped(&mut quit) => info!("/quitquitquit; draining"),
    }
    shared.shutdown();
    xds_task.abort();
    if let Some(t) = identity_task {
        t.abort();
    }
    // The manager closes every listener on shutdown; in-flight connections hold their own
    // tasks, which we give the drain time to finish.
    let _ = listeners.await;
    let deadline = tokio::time::Instant::now() + opts.drain_duration;
    while shared.metrics.active_requests() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    info!(
        in_flight = shared.metrics.active_requests(),
        "drained; exiting"
    );
    Ok(())
}
