//! Mizzen's own model of the data-plane config: what the proxy actually honours.
//!
//! These types are deliberately smaller than Envoy's protos. Every xDS resource is converted
//! into them by [`proto`] (a `TryFrom` per resource kind); a field that would change behaviour
//! and that we do not implement is a conversion error, so the resource is NACKed instead of
//! being half-applied. Regexes are compiled here, once per resource version, so a bad pattern
//! is a NACK and the request path never compiles anything.

pub mod proto;

use regex::Regex;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// A compiled regex that must match the whole input (Envoy's `safe_regex` semantics).
#[derive(Clone, Debug)]
pub struct FullRegex(pub Arc<Regex>);

impl FullRegex {
    pub fn new(pattern: &str) -> Result<FullRegex, regex::Error> {
        Regex::new(&format!("^(?:{pattern})$")).map(|r| FullRegex(Arc::new(r)))
    }
    pub fn is_match(&self, s: &str) -> bool {
        self.0.is_match(s)
    }
}

// ------------------------------------------------------------------ listeners

#[derive(Clone, Debug)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    /// False for the sidecar's per-service listeners: they only receive connections handed
    /// over by `virtualOutbound`.
    pub bind_to_port: bool,
    /// `virtualOutbound`: hand each connection to the listener of its original destination.
    pub use_original_dst: bool,
    /// The `original_dst` listener filter (`virtualInbound`): filter chains match, and
    /// ORIGINAL_DST clusters connect to, the destination before the REDIRECT, not 15006.
    pub original_dst_filter: bool,
    /// `transparent` (TPROXY capture): bound with IP_TRANSPARENT so it accepts connections
    /// addressed to any IP; such a connection's local address is its original destination.
    pub transparent: bool,
    pub filter_chains: Vec<FilterChain>,
    pub default_chain: Option<FilterChain>,
}

#[derive(Clone, Debug)]
pub struct FilterChain {
    pub name: String,
    pub matcher: ChainMatch,
    /// `envoy.filters.network.rbac` filters before the terminal one, in order: evaluated once
    /// per connection, before the terminal filter sees it.
    pub network_rbac: Arc<[Arc<crate::rbac::NetworkRbac>]>,
    pub filter: NetworkFilter,
    /// `transport_socket` (DownstreamTlsContext): terminate TLS before the filter.
    pub tls: Option<Arc<DownstreamTls>>,
}

/// Envoy's `FilterChainMatch`, reduced to the fields the pilot emits. Empty = any.
#[derive(Clone, Debug, Default)]
pub struct ChainMatch {
    pub destination_port: Option<u16>,
    pub prefix_ranges: Vec<(IpAddr, u8)>,
    pub server_names: Vec<String>,
    /// `raw_buffer` or `tls`.
    pub transport_protocol: Option<String>,
    pub application_protocols: Vec<String>,
}

#[derive(Clone, Debug)]
pub enum NetworkFilter {
    Http(HttpConnectionManager),
    Tcp(TcpProxy),
}

#[derive(Clone, Debug)]
pub struct HttpConnectionManager {
    pub stat_prefix: String,
    pub routes: RouteSource,
    /// The HTTP filters in the order Envoy runs their decoders (the HCM's `http_filters`);
    /// the last is the router. A route's fault or CORS config applies only when that filter
    /// is installed (as in Envoy).
    pub http_filters: Arc<[HttpFilter]>,
    /// `use_remote_address`: this proxy is the edge (gateways), so the downstream peer is the
    /// client address and is appended to `x-forwarded-for`; otherwise the client address is
    /// taken from `x-forwarded-for` (see [`crate::rbac::remote_ip`]).
    pub use_remote_address: bool,
    /// `xff_num_trusted_hops`.
    pub xff_num_trusted_hops: u32,
    /// `x-forwarded-client-cert` handling.
    pub xfcc: Xfcc,
    /// File access logs, one line per request.
    pub access_log: Arc<[crate::access_log::AccessLog]>,
    /// `upgrade_configs`: the `Upgrade` protocols allowed (Istio: `websocket`).
    pub upgrades: Arc<[UpgradeConfig]>,
    /// `http_protocol_options.header_key_format`: `Preserve` records each request's header
    /// case as it is read; `ProperCase` title-cases the responses written downstream.
    pub header_case: HeaderCase,
}

/// HTTP/1 header-name case on the wire (Envoy's `Http1ProtocolOptions.header_key_format`).
/// Envoy lowercases unless told otherwise; Istio sets `preserve_case` on every HCM and on
/// HTTP/1 clusters when ProxyConfig `proxyHeaders.preserveHttp1HeaderCase` is true. As in
/// Envoy (a stateful formatter is attached to the header map by the side that decodes it),
/// the case is recorded where a message is read and written wherever it goes: the HCM's
/// setting decides for requests, the cluster's for responses (hyper: the parser's
/// `preserve_header_case` records a `HeaderCaseMap` the writer honours).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum HeaderCase {
    /// Lowercase (Envoy's default; HTTP/2 is always lowercase).
    #[default]
    Lower,
    /// `stateful_formatter` `envoy.http.stateful_header_formatters.preserve_case`: names as
    /// they arrived.
    Preserve,
    /// `proper_case_words`: `Content-Type`. hyper's title case capitalizes after `-` only,
    /// where Envoy also capitalizes after other non-letters (`x_y` -> `X_Y`).
    ProperCase,
}

/// One `upgrade_configs` entry (HCM or route): requests asking `Upgrade: <kind>` may be
/// tunnelled when enabled; Envoy answers 403 to an upgrade nothing enables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpgradeConfig {
    /// Lower-cased (Envoy compares upgrade types case-insensitively).
    pub kind: String,
    pub enabled: bool,
}

/// One HTTP filter of an HCM, converted from its `http_filters` entry.
#[derive(Clone, Debug)]
pub enum HttpFilter {
    /// `envoy.filters.http.jwt_authn`: verifies tokens and writes each verified payload into
    /// the request's dynamic metadata under its issuer ([`crate::jwt`]).
    JwtAuthn(Arc<JwtAuthn>),
    /// `envoy.filters.http.rbac`.
    Rbac(Arc<crate::rbac::HttpRbac>),
    /// `envoy.filters.http.fault`: the route's fault config.
    Fault,
    /// `envoy.filters.http.cors`: the route's CORS policy.
    Cors,
    /// `envoy.filters.http.router`: always last.
    Router,
}

pub use crate::jwt::JwtAuthn;

/// Envoy's `forward_client_cert_details` + `set_current_client_cert_details`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Xfcc {
    pub mode: XfccMode,
    pub subject: bool,
    pub uri: bool,
    pub dns: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XfccMode {
    /// Remove the header (Envoy's default).
    #[default]
    Sanitize,
    /// Forward it as is on mTLS connections, remove it otherwise.
    ForwardOnly,
    /// On mTLS, append this hop's element; remove it otherwise.
    AppendForward,
    /// On mTLS, replace it with this hop's element; remove it otherwise.
    SanitizeSet,
    /// Forward it as is, whatever the connection.
    AlwaysForwardOnly,
}

#[derive(Clone, Debug)]
pub enum RouteSource {
    /// By name over RDS.
    Rds(String),
    Inline(Arc<RouteConfig>),
}

#[derive(Clone, Debug)]
pub struct TcpProxy {
    pub stat_prefix: String,
    pub target: ClusterTarget,
    /// One line per connection, when it closes (usually none or one).
    pub access_log: Arc<[crate::access_log::AccessLog]>,
}

#[derive(Clone, Debug)]
pub enum ClusterTarget {
    Single(String),
    Weighted(Vec<WeightedCluster>),
}

#[derive(Clone, Debug)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u32,
    pub headers: HeaderOps,
    pub host_rewrite: Option<String>,
}

// ------------------------------------------------------------------ routes

#[derive(Clone, Debug)]
pub struct RouteConfig {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
    pub ignore_port_in_host_matching: bool,
}

#[derive(Clone, Debug)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
    /// `require_tls: ALL` (Gateway `tls.httpsRedirect`): a request whose forwarded scheme is
    /// not https gets Envoy's 301 to `https://<host><path>` instead of a route.
    pub require_tls: bool,
}

#[derive(Clone, Debug)]
pub struct Route {
    pub name: String,
    pub matcher: RouteMatch,
    pub action: Action,
    pub fault: Option<Fault>,
    pub cors: Option<Cors>,
    pub headers: HeaderOps,
}

/// A route's CORS policy (Envoy's cors filter, configured per route).
#[derive(Clone, Debug)]
pub struct Cors {
    pub allow_origins: Vec<StringMatch>,
    pub allow_methods: String,
    pub allow_headers: String,
    pub expose_headers: String,
    pub max_age: String,
    pub allow_credentials: bool,
    /// Preflights from origins the policy does not allow still go upstream.
    pub forward_not_matching_preflights: bool,
}

/// Copy requests to another cluster, fire and forget.
#[derive(Clone, Debug)]
pub struct Mirror {
    pub cluster: String,
    pub fraction: Fraction,
}

#[derive(Clone, Debug, Default)]
pub struct HeaderOps {
    /// (name, value, append): append=false overwrites.
    pub request_add: Vec<(http::HeaderName, http::HeaderValue, bool)>,
    pub request_remove: Vec<http::HeaderName>,
    pub response_add: Vec<(http::HeaderName, http::HeaderValue, bool)>,
    pub response_remove: Vec<http::HeaderName>,
}

#[derive(Clone, Debug)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub case_sensitive: bool,
    pub headers: Vec<HeaderMatch>,
    pub query: Vec<QueryMatch>,
}

#[derive(Clone, Debug)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(FullRegex),
}

#[derive(Clone, Debug)]
pub enum StringMatch {
    Exact { value: String, ignore_case: bool },
    Prefix { value: String, ignore_case: bool },
    Suffix { value: String, ignore_case: bool },
    Contains { value: String, ignore_case: bool },
    Regex(FullRegex),
}

#[derive(Clone, Debug)]
pub enum ValueMatch {
    Present(bool),
    String(StringMatch),
}

#[derive(Clone, Debug)]
pub struct HeaderMatch {
    pub name: String,
    pub value: ValueMatch,
    pub invert: bool,
    pub treat_missing_as_empty: bool,
}

#[derive(Clone, Debug)]
pub struct QueryMatch {
    pub name: String,
    pub value: ValueMatch,
}

#[derive(Clone, Debug)]
pub enum Action {
    Route(RouteAction),
    Redirect(Redirect),
    Direct { status: u16, body: bytes::Bytes },
}

#[derive(Clone, Debug)]
pub struct RouteAction {
    pub target: ClusterTarget,
    /// None = no timeout (Envoy's `0s`).
    pub timeout: Option<Duration>,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<(FullRegex, String)>,
    pub host_rewrite: Option<String>,
    pub retry: Option<RetryPolicy>,
    pub mirrors: Vec<Mirror>,
    /// What RING_HASH / MAGLEV clusters hash (ignored by the other balancers, as in Envoy).
    pub hash_policy: Vec<crate::hash::HashPolicy>,
    /// Route `upgrade_configs`: override the HCM's per upgrade type.
    pub upgrades: Vec<UpgradeConfig>,
}

#[derive(Clone, Debug)]
pub struct Redirect {
    pub status: u16,
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub prefix_rewrite: Option<String>,
    pub strip_query: bool,
}

#[derive(Clone, Debug, Default)]
pub struct RetryOn {
    pub five_xx: bool,
    pub gateway_error: bool,
    pub connect_failure: bool,
    pub reset: bool,
    pub refused_stream: bool,
    pub retriable_4xx: bool,
    pub retriable_status_codes: bool,
    /// gRPC statuses from `grpc-status` response headers (cancelled, unavailable, ...).
    pub grpc_codes: Vec<u32>,
}

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub on: RetryOn,
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub status_codes: Vec<u16>,
}

/// A fraction as Envoy expresses it: `numerator / denominator`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fraction {
    pub numerator: u32,
    pub denominator: u32,
}

#[derive(Clone, Debug)]
pub enum AbortKind {
    Http(u16),
    Grpc(u32),
}

#[derive(Clone, Debug)]
pub struct Fault {
    pub delay: Option<(Duration, Fraction)>,
    pub abort: Option<(AbortKind, Fraction)>,
}

// ------------------------------------------------------------------ clusters

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiscoveryKind {
    Eds,
    Static,
    StrictDns,
    OriginalDst,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    LeastRequest,
    Random,
    /// ORIGINAL_DST: the connection's own destination.
    ClusterProvided,
    /// Istio's `consistentHash` (ring hash, Envoy's default for it).
    RingHash {
        min_size: u64,
        max_size: u64,
    },
    /// Istio's `consistentHash.maglev`.
    Maglev {
        table_size: u64,
    },
}

#[derive(Clone, Debug)]
pub struct Cluster {
    pub name: String,
    pub kind: DiscoveryKind,
    pub lb: LbPolicy,
    pub connect_timeout: Duration,
    /// Upstream speaks HTTP/2 (prior knowledge, h2c).
    pub http2: bool,
    /// The explicit HTTP/1 protocol options' `header_key_format`: `Preserve` records each
    /// response's header case as it is read; `ProperCase` title-cases the requests written
    /// to the endpoints.
    pub header_case: HeaderCase,
    /// EDS service name to subscribe (defaults to the cluster name).
    pub eds_name: Option<String>,
    /// STATIC / STRICT_DNS endpoints from `load_assignment`.
    pub inline_endpoints: Vec<Endpoint>,
    pub outlier: Option<OutlierDetection>,
    /// `upstream_bind_config.source_address`: Istio's inbound clusters connect to the app
    /// from 127.0.0.6, which the capture rules exempt; from the pod IP, the connection would
    /// be captured back into the inbound listener.
    pub source_address: Option<std::net::IpAddr>,
    /// `transport_socket`: TLS to every endpoint (DestinationRule SIMPLE / MUTUAL).
    pub tls: Option<Arc<UpstreamTls>>,
    /// `transport_socket_matches`, in order: the first whose criteria are all in an
    /// endpoint's `envoy.transport_socket_match` metadata decides (Istio's auto mTLS:
    /// `tlsMode: istio` -> ISTIO_MUTUAL, else plaintext).
    pub transport_matches: Vec<TransportSocketMatch>,
    /// Circuit breakers and connection-pool settings (DestinationRule `connectionPool`).
    pub pool: PoolLimits,
    /// `common_lb_config.locality_weighted_lb_config`: pick a locality by its weight (and
    /// health) before a host in it; otherwise locality weights are ignored, as in Envoy.
    pub locality_weighted: bool,
}

/// A cluster's circuit-breaker thresholds (default priority) and upstream connection
/// settings, as Envoy applies them: `circuit_breakers.thresholds`,
/// `common_http_protocol_options.{max_requests_per_connection, idle_timeout}`. Istio sets
/// every threshold to `u32::MAX` unless a DestinationRule's `connectionPool` says otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolLimits {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
    /// 0: unlimited.
    pub max_requests_per_connection: u32,
    /// An upstream connection idle this long is closed.
    pub idle_timeout: Duration,
    /// `max_connection_duration`: an older connection is closed once it is idle.
    pub max_connection_duration: Option<Duration>,
}

impl Default for PoolLimits {
    /// Envoy's defaults for a cluster without `circuit_breakers` (1024 / 1024 / 1024 / 3)
    /// and its 1 h upstream idle timeout.
    fn default() -> PoolLimits {
        PoolLimits {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            max_requests_per_connection: 0,
            idle_timeout: Duration::from_secs(3600),
            max_connection_duration: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TransportSocketMatch {
    pub name: String,
    /// (key, value) pairs that must all be present in the endpoint's metadata.
    pub criteria: Vec<(String, String)>,
    /// `None`: plaintext (`raw_buffer`).
    pub tls: Option<Arc<UpstreamTls>>,
}

/// Consecutive-error ejection (Istio's `outlierDetection`; success-rate ejection is off in
/// Istio and rejected here).
#[derive(Clone, Debug, PartialEq)]
pub struct OutlierDetection {
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway: Option<u32>,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// An IP, or a DNS name for STRICT_DNS clusters (resolved when connecting).
    pub host: String,
    pub port: u16,
    pub weight: u32,
    pub healthy: bool,
    /// String values of the endpoint's `envoy.transport_socket_match` metadata
    /// (`tlsMode: istio`).
    pub transport_metadata: Vec<(String, String)>,
    /// istiod's `istio: {workload: ...}` metadata: who runs there, for the `destination_*`
    /// metric labels.
    pub workload: Option<std::sync::Arc<crate::metrics::Workload>>,
    /// The EDS priority of the endpoint's locality group (0 = highest).
    pub priority: u32,
    /// Index of the endpoint's `LocalityLbEndpoints` in its assignment: endpoints sharing it
    /// share a locality.
    pub locality: u32,
    /// That locality's `load_balancing_weight` (0 = unset: never picked when the cluster
    /// weighs localities).
    pub locality_weight: u32,
}

/// A `ClusterLoadAssignment`.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub cluster: String,
    pub endpoints: Vec<Endpoint>,
}

// ------------------------------------------------------------------ TLS

/// A filter chain's `DownstreamTlsContext`, compiled into rustls server configs whose
/// certificate and client verification read [`crate::secrets`] at handshake time.
#[derive(Clone, Debug)]
pub struct DownstreamTls {
    /// Our ALPN protocols, in preference order.
    pub alpn: Vec<String>,
    pub require_client_certificate: bool,
    /// A validation context is set: client certificates are verified against it.
    pub validates_clients: bool,
    pub config: Arc<rustls::ServerConfig>,
    /// The same without ALPN, for clients whose ALPN list shares nothing with ours: Envoy
    /// then carries on without ALPN, where rustls would abort the handshake.
    pub config_no_alpn: Arc<rustls::ServerConfig>,
}

/// A cluster's `UpstreamTlsContext`, compiled.
#[derive(Clone, Debug)]
pub struct UpstreamTls {
    /// SNI to send; `None` sends none (the endpoint's IP is the verified-against name).
    pub sni: Option<String>,
    pub alpn: Vec<String>,
    pub config: Arc<rustls::ClientConfig>,
    /// Hash of the context and the file contents it loaded: identical contexts share one
    /// upstream connection pool across config updates.
    pub key: u64,
}
