//! Istio's standard metrics with their full label set, so existing dashboards and Kiali work:
//! `istio_requests_total`, `istio_request_duration_milliseconds`, `istio_request_bytes`,
//! `istio_response_bytes` for HTTP; `istio_tcp_sent_bytes_total`,
//! `istio_tcp_received_bytes_total`, `istio_tcp_connections_opened_total`,
//! `istio_tcp_connections_closed_total` for TCP proxies; plus the proxy's own counters
//! (rejected xDS updates, in-flight requests).
//!
//! Who is on each end ([`Workload`]: workload, namespace, canonical service/revision, app,
//! version, cluster) comes from where Istio's sidecars take it:
//! - this proxy: its node metadata (`NAME`, `NAMESPACE`, `LABELS`, `WORKLOAD_NAME`,
//!   `CLUSTER_ID`), the same the pilot gets ([`Metrics::set_local`]);
//! - the peer, over HTTP: Istio's metadata exchange headers. The outbound side adds
//!   `x-envoy-peer-metadata-id` and `x-envoy-peer-metadata` (base64 of a protobuf `Struct` of
//!   its node metadata) to the request; the inbound side takes them off (the app never sees
//!   them) and, only to a caller that sent them, answers with its own on the response, which
//!   the outbound side takes off in turn. Envoy sidecars with Istio's `istio.metadata_exchange`
//!   filter speak the same headers.
//! - the destination, when no header came back (no sidecar there, or TCP): the endpoint's EDS
//!   metadata `istio: {workload: "name;namespace;canonical-service;canonical-revision;cluster"}`
//!   as istiod writes it (app/version are then the canonical service/revision, as Istio's stats
//!   plugin does).
//!
//! Cheap on the request path: workloads, services and principals are shared `Arc`s with their
//! hash computed once; a request builds one small key ([`RequestKey`]) and does one lock-free
//! lookup (`ArcSwap` map) that yields all four series, whose counters and histograms are
//! atomics. Decoded peer headers and per-cluster service labels are cached (bounded). Label
//! strings are only written at scrape time, by a prometheus-client [`Collector`].
//!
//! Not done: TCP metadata exchange (a TCP proxy's `reporter="destination"` has no
//! `source_workload`, only the principal), TCP byte counters while a connection is open (they
//! are added when it closes), `grpc_response_status` from trailers (only a trailers-only
//! response's `grpc-status` header is seen), request/response sizes other than `content-length`.

use arc_swap::ArcSwap;
use base64::Engine as _;
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabel, EncodeLabelSet, LabelSetEncoder, NoLabelSet,
};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Istio's metadata exchange headers.
pub const PEER_ID_HEADER: HeaderName = HeaderName::from_static("x-envoy-peer-metadata-id");
pub const PEER_METADATA_HEADER: HeaderName = HeaderName::from_static("x-envoy-peer-metadata");

/// At most this many distinct peers / services are known; beyond, new ones are reported as
/// `unknown` (a bound on the series a client can create, not an expected size).
const CACHE_LIMIT: usize = 4096;

const UNKNOWN: &str = "unknown";

/// What Istio's labels say about one end of a request.
#[derive(Debug)]
pub struct Workload {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub canonical_service: Arc<str>,
    pub canonical_revision: Arc<str>,
    pub app: Arc<str>,
    pub version: Arc<str>,
    pub cluster: Arc<str>,
    /// Of the fields above, computed once: series lookups hash this instead of seven strings.
    hash: u64,
}

impl PartialEq for Workload {
    fn eq(&self, o: &Self) -> bool {
        self.hash == o.hash
            && self.name == o.name
            && self.namespace == o.namespace
            && self.canonical_service == o.canonical_service
            && self.canonical_revision == o.canonical_revision
            && self.app == o.app
            && self.version == o.version
            && self.cluster == o.cluster
    }
}
impl Eq for Workload {}
impl Hash for Workload {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(self.hash);
    }
}

fn hash_strs(parts: &[&str]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

/// An empty value means "not known": Istio reports `unknown`.
fn or_unknown(s: &str) -> Arc<str> {
    Arc::from(if s.is_empty() { UNKNOWN } else { s })
}

impl Workload {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        namespace: &str,
        canonical_service: &str,
        canonical_revision: &str,
        app: &str,
        version: &str,
        cluster: &str,
    ) -> Workload {
        let f = [
            or_unknown(name),
            or_unknown(namespace),
            or_unknown(canonical_service),
            or_unknown(canonical_revision),
            or_unknown(app),
            or_unknown(version),
            or_unknown(cluster),
        ];
        let hash = hash_strs(&f.iter().map(|s| &**s).collect::<Vec<_>>());
        let [name, namespace, canonical_service, canonical_revision, app, version, cluster] = f;
        Workload {
            name,
            namespace,
            canonical_service,
            canonical_revision,
            app,
            version,
            cluster,
            hash,
        }
    }

    /// The shared "nothing known" workload.
    pub fn unknown() -> Arc<Workload> {
        static U: OnceLock<Arc<Workload>> = OnceLock::new();
        U.get_or_init(|| Arc::new(Workload::new("", "", "", "", "", "", "")))
            .clone()
    }

    /// From node metadata (ours, or a peer's from its exchange header), with Istio's label
    /// fallbacks for the canonical service and revision.
    pub fn from_node_metadata(md: &Struct) -> Workload {
        let s = |k: &str| match md.fields.get(k).and_then(|v| v.kind.as_ref()) {
            Some(Kind::StringValue(s)) => s.as_str(),
            _ => "",
        };
        let labels = match md.fields.get("LABELS").and_then(|v| v.kind.as_ref()) {
            Some(Kind::StructValue(l)) => Some(l),
            _ => None,
        };
        let label = |k: &str| match labels
            .and_then(|l| l.fields.get(k))
            .and_then(|v| v.kind.as_ref())
        {
            Some(Kind::StringValue(s)) => s.as_str(),
            _ => "",
        };
        let first = |ks: &[&str]| {
            ks.iter()
                .map(|k| label(k))
                .find(|v| !v.is_empty())
                .unwrap_or("")
        };
        let name = match s("WORKLOAD_NAME") {
            "" => s("NAME"),
            w => w,
        };
        let app = first(&["app", "app.kubernetes.io/name"]);
        let version = first(&["version", "app.kubernetes.io/version"]);
        let canonical_service = match first(&["service.istio.io/canonical-name"]) {
            "" if !app.is_empty() => app,
            "" => name,
            c => c,
        };
        let canonical_revision = match first(&["service.istio.io/canonical-revision"]) {
            "" if !version.is_empty() => version,
            "" => "latest",
            c => c,
        };
        Workload::new(
            name,
            s("NAMESPACE"),
            canonical_service,
            canonical_revision,
            app,
            version,
            s("CLUSTER_ID"),
        )
    }

    /// From istiod's endpoint metadata `name;namespace;canonical-service;canonical-revision;cluster`.
    pub fn from_endpoint_metadata(s: &str) -> Option<Workload> {
        let mut it = s.split(';');
        let (name, ns, svc, rev, cluster) =
            (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
        Some(Workload::new(name, ns, svc, rev, svc, rev, cluster))
    }
}

/// `destination_service`, `destination_service_name`, `destination_service_namespace`.
#[derive(Debug)]
pub struct Service {
    pub fqdn: Arc<str>,
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    hash: u64,
}

impl PartialEq for Service {
    fn eq(&self, o: &Self) -> bool {
        self.hash == o.hash
            && self.fqdn == o.fqdn
            && self.name == o.name
            && self.namespace == o.namespace
    }
}
impl Eq for Service {}
impl Hash for Service {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(self.hash);
    }
}

impl Service {
    fn new(fqdn: &str, name: &str, namespace: &str) -> Service {
        let (fqdn, name, namespace) = (or_unknown(fqdn), or_unknown(name), or_unknown(namespace));
        let hash = hash_strs(&[&fqdn, &name, &namespace]);
        Service {
            fqdn,
            name,
            namespace,
            hash,
        }
    }

    /// From `outbound|PORT|SUBSET|FQDN`; all `unknown` for other cluster names.
    pub fn from_cluster(cluster: &str) -> Service {
        let (fqdn, name, ns) = destination_service(cluster);
        Service::new(&fqdn, &name, &ns)
    }

    /// From the request's host, for the inbound side (its clusters name no service):
    /// `name`, `name.ns`, `name.ns.svc...` as Kubernetes resolves them from `local_ns`.
    pub fn from_authority(authority: &str, local_ns: &str) -> Service {
        let host = match authority.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(']') => h,
            _ => authority,
        };
        if host.is_empty() || host.parse::<std::net::IpAddr>().is_ok() {
            return Service::new("", "", "");
        }
        let mut labels = host.split('.');
        let name = labels.next().unwrap_or(host);
        match (labels.next(), labels.next()) {
            (None, _) => Service::new(
                &format!("{name}.{local_ns}.svc.cluster.local"),
                name,
                local_ns,
            ),
            (Some(ns), None) => Service::new(&format!("{name}.{ns}.svc.cluster.local"), name, ns),
            (Some(ns), Some("svc")) => Service::new(host, name, ns),
            _ => Service::new(host, host, ""),
        }
    }
}

/// Response flags of one request (Envoy's short codes), joined with `,` when printed.
pub type Flags = Vec<&'static str>;

fn flags_text(f: &Flags) -> String {
    if f.is_empty() {
        "-".into()
    } else {
        f.join(",")
    }
}

/// The labels of one HTTP request's series.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestKey {
    pub reporter: &'static str,
    pub source: Arc<Workload>,
    pub destination: Arc<Workload>,
    pub service: Arc<Service>,
    pub source_principal: Option<Arc<str>>,
    pub destination_principal: Option<Arc<str>>,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub grpc_status: Option<u16>,
    pub response_flags: Flags,
    pub connection_security_policy: &'static str,
}

/// The labels of one TCP connection's series.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TcpKey {
    pub reporter: &'static str,
    pub source: Arc<Workload>,
    pub destination: Arc<Workload>,
    pub service: Arc<Service>,
    pub source_principal: Option<Arc<str>>,
    pub destination_principal: Option<Arc<str>>,
    pub response_flags: Flags,
    pub connection_security_policy: &'static str,
}

fn label(enc: &mut LabelSetEncoder, k: &str, v: &str) -> Result<(), std::fmt::Error> {
    (k, v).encode(enc.encode_label())
}

/// The workload/service labels both keys share, in Istio's order.
#[allow(clippy::too_many_arguments)]
fn encode_peers(
    enc: &mut LabelSetEncoder,
    reporter: &str,
    s: &Workload,
    d: &Workload,
    svc: &Service,
    sp: &Option<Arc<str>>,
    dp: &Option<Arc<str>>,
    request_protocol: Option<&str>,
) -> Result<(), std::fmt::Error> {
    let p = |x: &Option<Arc<str>>| x.as_deref().unwrap_or(UNKNOWN).to_string();
    let (sp, dp) = (p(sp), p(dp));
    for (k, v) in [
        ("reporter", reporter),
        ("source_workload", &s.name),
        ("source_canonical_service", &s.canonical_service),
        ("source_canonical_revision", &s.canonical_revision),
        ("source_workload_namespace", &s.namespace),
        ("source_principal", &sp),
        ("source_app", &s.app),
        ("source_version", &s.version),
        ("source_cluster", &s.cluster),
        ("destination_workload", &d.name),
        ("destination_workload_namespace", &d.namespace),
        ("destination_principal", &dp),
        ("destination_app", &d.app),
        ("destination_version", &d.version),
        ("destination_service", &svc.fqdn),
        ("destination_service_name", &svc.name),
        ("destination_service_namespace", &svc.namespace),
        ("destination_canonical_service", &d.canonical_service),
        ("destination_canonical_revision", &d.canonical_revision),
        ("destination_cluster", &d.cluster),
    ] {
        label(enc, k, v)?;
    }
    if let Some(p) = request_protocol {
        label(enc, "request_protocol", p)?;
    }
    Ok(())
}

impl EncodeLabelSet for RequestKey {
    fn encode(&self, enc: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        encode_peers(
            enc,
            self.reporter,
            &self.source,
            &self.destination,
            &self.service,
            &self.source_principal,
            &self.destination_principal,
            Some(self.request_protocol),
        )?;
        label(enc, "response_code", &self.response_code.to_string())?;
        let grpc = self.grpc_status.map(|g| g.to_string()).unwrap_or_default();
        label(enc, "grpc_response_status", &grpc)?;
        label(enc, "response_flags", &flags_text(&self.response_flags))?;
        label(
            enc,
            "connection_security_policy",
            self.connection_security_policy,
        )
    }
}

impl EncodeLabelSet for TcpKey {
    fn encode(&self, enc: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        encode_peers(
            enc,
            self.reporter,
            &self.source,
            &self.destination,
            &self.service,
            &self.source_principal,
            &self.destination_principal,
            Some("tcp"),
        )?;
        label(enc, "response_flags", &flags_text(&self.response_flags))?;
        label(
            enc,
            "connection_security_policy",
            self.connection_security_policy,
        )
    }
}

/// A histogram of atomics: `observe` is a few `fetch_add`s, no lock. The sum is kept in
/// integer units of `1/scale` (microseconds for milliseconds, bytes for bytes).
#[derive(Debug)]
pub struct AtomicHistogram {
    bounds: &'static [f64],
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum: AtomicU64,
    scale: f64,
}

impl AtomicHistogram {
    fn new(bounds: &'static [f64], scale: f64) -> AtomicHistogram {
        AtomicHistogram {
            bounds,
            buckets: (0..bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            scale,
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum
            .fetch_add((v * self.scale).max(0.0) as u64, Ordering::Relaxed);
    }

    fn encode(&self, enc: &mut prometheus_client::encoding::MetricEncoder) -> std::fmt::Result {
        let mut cumulative = 0;
        let mut buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .zip(self.buckets.iter())
            .map(|(b, c)| {
                cumulative += c.load(Ordering::Relaxed);
                (*b, cumulative)
            })
            .collect();
        let count = self.count.load(Ordering::Relaxed);
        buckets.push((f64::MAX, count));
        let sum = self.sum.load(Ordering::Relaxed) as f64 / self.scale;
        enc.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

/// Istio's duration buckets (milliseconds).
const DURATION_BUCKETS: [f64; 15] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0,
];
/// Istio's size buckets (bytes): powers of ten up to 100 MB.
const BYTES_BUCKETS: [f64; 9] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

/// All four HTTP metrics of one label set: found with one lookup per request.
#[derive(Debug)]
pub struct RequestSeries {
    pub requests: AtomicU64,
    pub duration: AtomicHistogram,
    pub request_bytes: AtomicHistogram,
    pub response_bytes: AtomicHistogram,
}

impl RequestSeries {
    pub fn record(&self, duration_ms: f64, request_bytes: u64, response_bytes: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.duration.observe(duration_ms);
        self.request_bytes.observe(request_bytes as f64);
        self.response_bytes.observe(response_bytes as f64);
    }

    fn new() -> RequestSeries {
        RequestSeries {
            requests: AtomicU64::new(0),
            duration: AtomicHistogram::new(&DURATION_BUCKETS, 1000.0),
            request_bytes: AtomicHistogram::new(&BYTES_BUCKETS, 1.0),
            response_bytes: AtomicHistogram::new(&BYTES_BUCKETS, 1.0),
        }
    }
}

#[derive(Debug, Default)]
pub struct TcpSeries {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

/// FxHash's word-at-a-time mix: the series keys are mostly precomputed `u64`s and short
/// strings, for which SipHash was most of a request's metric cost. Not collision-resistant,
/// which is fine here: peer-controlled values reach the keys only through the bounded
/// caches below, so an attacker cannot flood one bucket with unbounded keys.
#[derive(Default, Clone, Copy)]
struct Fx(u64);

impl Fx {
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }

    fn write_u8(&mut self, v: u8) {
        self.add(u64::from(v));
    }

    fn write_u16(&mut self, v: u16) {
        self.add(u64::from(v));
    }

    fn write_u32(&mut self, v: u32) {
        self.add(u64::from(v));
    }

    fn write_u64(&mut self, v: u64) {
        self.add(v);
    }

    fn write_usize(&mut self, v: usize) {
        self.add(v as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type FxMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<Fx>>;

/// A map read lock-free on the request path; a new key (rare: a new label set) copies it.
#[derive(Debug)]
struct SeriesMap<K, V>(ArcSwap<FxMap<K, Arc<V>>>);

impl<K: Hash + Eq + Clone, V> SeriesMap<K, V> {
    fn new() -> Self {
        SeriesMap(ArcSwap::from_pointee(FxMap::default()))
    }

    fn get_or_insert(&self, key: &K, make: impl Fn() -> V) -> Arc<V> {
        if let Some(v) = self.0.load().get(key) {
            return v.clone();
        }
        let mut out = None;
        self.0.rcu(|m| {
            let mut m = FxMap::clone(m);
            let v = m.entry(key.clone()).or_insert_with(|| Arc::new(make()));
            out = Some(v.clone());
            m
        });
        out.unwrap_or_else(|| Arc::new(make()))
    }
}

/// Scrape-time view of the series maps.
#[derive(Debug)]
struct Istio {
    requests: Arc<SeriesMap<RequestKey, RequestSeries>>,
    tcp: Arc<SeriesMap<TcpKey, TcpSeries>>,
}

fn counter_family<K: EncodeLabelSet, V>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    map: &FxMap<K, Arc<V>>,
    value: impl Fn(&V) -> u64,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (k, v) in map {
        let mut f = m.encode_family(k)?;
        f.encode_counter::<NoLabelSet, _, u64>(&value(v), None)?;
    }
    Ok(())
}

fn histogram_family<K: EncodeLabelSet, V>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    map: &FxMap<K, Arc<V>>,
    h: impl Fn(&V) -> &AtomicHistogram,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (k, v) in map {
        let mut f = m.encode_family(k)?;
        h(v).encode(&mut f)?;
    }
    Ok(())
}

impl Collector for Istio {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let r = self.requests.0.load();
        counter_family(
            &mut enc,
            "istio_requests",
            "Requests handled by the proxy",
            &r,
            |s| s.requests.load(Ordering::Relaxed),
        )?;
        histogram_family(
            &mut enc,
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds",
            &r,
            |s| &s.duration,
        )?;
        histogram_family(
            &mut enc,
            "istio_request_bytes",
            "Request body sizes in bytes",
            &r,
            |s| &s.request_bytes,
        )?;
        histogram_family(
            &mut enc,
            "istio_response_bytes",
            "Response body sizes in bytes",
            &r,
            |s| &s.response_bytes,
        )?;
        let t = self.tcp.0.load();
        counter_family(
            &mut enc,
            "istio_tcp_sent_bytes",
            "Bytes sent to the downstream by TCP proxies",
            &t,
            |s| s.sent.load(Ordering::Relaxed),
        )?;
        counter_family(
            &mut enc,
            "istio_tcp_received_bytes",
            "Bytes received from the downstream by TCP proxies",
            &t,
            |s| s.received.load(Ordering::Relaxed),
        )?;
        counter_family(
            &mut enc,
            "istio_tcp_connections_opened",
            "TCP connections opened",
            &t,
            |s| s.opened.load(Ordering::Relaxed),
        )?;
        counter_family(
            &mut enc,
            "istio_tcp_connections_closed",
            "TCP connections closed",
            &t,
            |s| s.closed.load(Ordering::Relaxed),
        )
    }
}

/// This proxy's own identity and the exchange headers it sends (encoded once).
#[derive(Debug)]
struct Local {
    workload: Arc<Workload>,
    id: HeaderValue,
    metadata: HeaderValue,
}

/// Node metadata keys that travel in the exchange header (what the peer's labels need, not
/// the whole node: no addresses or proxy internals).
const EXCHANGED_KEYS: [&str; 7] = [
    "NAME",
    "NAMESPACE",
    "LABELS",
    "WORKLOAD_NAME",
    "CLUSTER_ID",
    "MESH_ID",
    "SERVICE_ACCOUNT",
];

pub struct Metrics {
    registry: Registry,
    requests: Arc<SeriesMap<RequestKey, RequestSeries>>,
    tcp: Arc<SeriesMap<TcpKey, TcpSeries>>,
    active: Gauge,
    local: OnceLock<Local>,
    peers: ArcSwap<HashMap<HeaderValue, Arc<Workload>>>,
    services: ArcSwap<HashMap<Box<str>, Arc<Service>>>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Arc::new(SeriesMap::new());
        let tcp = Arc::new(SeriesMap::new());
        let active = Gauge::default();
        registry.register_collector(Box::new(Istio {
            requests: requests.clone(),
            tcp: tcp.clone(),
        }));
        registry.register(
            "mizzen_proxy_active_requests",
            "Requests in flight",
            active.clone(),
        );
        Metrics {
            registry,
            requests,
            tcp,
            active,
            local: OnceLock::new(),
            peers: ArcSwap::from_pointee(HashMap::new()),
            services: ArcSwap::from_pointee(HashMap::new()),
        }
    }

    /// This proxy's identity, from the node it sends the pilot. Set once, at start.
    pub fn set_local(&self, node: &envoy_types::pb::envoy::config::core::v3::Node) {
        use prost::Message as _;
        let md = node.metadata.clone().unwrap_or_default();
        let exchanged = Struct {
            fields: md
                .fields
                .iter()
                .filter(|(k, _)| EXCHANGED_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let b64 = base64::engine::general_purpose::STANDARD.encode(exchanged.encode_to_vec());
        let (Ok(id), Ok(metadata)) = (HeaderValue::from_str(&node.id), HeaderValue::from_str(&b64))
        else {
            tracing::warn!(node = %node.id, "node id is not a valid header value; no metadata exchange");
            return;
        };
        let _ = self.local.set(Local {
            workload: Arc::new(Workload::from_node_metadata(&md)),
            id,
            metadata,
        });
    }

    /// This proxy's workload (`unknown` until [`Metrics::set_local`]).
    pub fn local(&self) -> Arc<Workload> {
        self.local
            .get()
            .map_or_else(Workload::unknown, |l| l.workload.clone())
    }

    /// Adds our exchange headers (replacing any the app set: it cannot speak for us).
    pub fn add_exchange_headers(&self, h: &mut HeaderMap) {
        if let Some(l) = self.local.get() {
            h.insert(PEER_ID_HEADER, l.id.clone());
            h.insert(PEER_METADATA_HEADER, l.metadata.clone());
        }
    }

    /// Takes the peer's exchange headers off `h` (they are mesh-internal) and returns who the
    /// peer is, when it said so.
    pub fn take_peer(&self, h: &mut HeaderMap) -> Option<Arc<Workload>> {
        h.remove(PEER_ID_HEADER);
        let v = h.remove(PEER_METADATA_HEADER)?;
        if let Some(w) = self.peers.load().get(&v) {
            return Some(w.clone());
        }
        // Past the bound, a new peer counts as unknown: a peer cannot grow the series without
        // limit by sending ever new metadata.
        if self.peers.load().len() >= CACHE_LIMIT {
            return Some(Workload::unknown());
        }
        let w = Arc::new(decode_peer(v.as_bytes())?);
        self.peers.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(v.clone(), w.clone());
            m
        });
        Some(w)
    }

    /// The service labels of an outbound cluster name, or (for inbound clusters, which name
    /// no service) of the request's authority.
    pub fn service(&self, cluster: &str, authority: &str) -> Arc<Service> {
        let inbound = !cluster.starts_with("outbound|");
        let key = if inbound { authority } else { cluster };
        if let Some(s) = self.services.load().get(key) {
            return s.clone();
        }
        // Past the bound (clients choose the inbound authority), unknown: bounded series.
        if self.services.load().len() >= CACHE_LIMIT {
            static UNKNOWN_SERVICE: OnceLock<Arc<Service>> = OnceLock::new();
            return UNKNOWN_SERVICE
                .get_or_init(|| Arc::new(Service::new("", "", "")))
                .clone();
        }
        let s = Arc::new(if inbound {
            Service::from_authority(authority, &self.local().namespace)
        } else {
            Service::from_cluster(cluster)
        });
        self.services.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(key.into(), s.clone());
            m
        });
        s
    }

    /// The series of one request's labels (created on first use).
    pub fn request_series(&self, key: &RequestKey) -> Arc<RequestSeries> {
        self.requests.get_or_insert(key, RequestSeries::new)
    }

    pub fn tcp_series(&self, key: &TcpKey) -> Arc<TcpSeries> {
        self.tcp.get_or_insert(key, TcpSeries::default)
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

/// The service FQDN in Istio's mesh mTLS SNI (`outbound_.PORT_.SUBSET_.FQDN`): what the
/// client's sidecar meant to reach, which the inbound side's clusters do not name.
pub fn service_from_sni(sni: &str) -> Option<&str> {
    sni.strip_prefix("outbound_.")?
        .splitn(3, "_.")
        .nth(2)
        .filter(|s| !s.is_empty())
}

/// A peer's `x-envoy-peer-metadata`: base64 of a protobuf `Struct` of its node metadata.
pub fn decode_peer(b64: &[u8]) -> Option<Workload> {
    use prost::Message as _;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let md = Struct::decode(bytes.as_slice()).ok()?;
    Some(Workload::from_node_metadata(&md))
}

/// A string `Value`, for building node metadata in tests and callers.
pub fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

/// (service FQDN, name, namespace) from `outbound|PORT|SUBSET|FQDN`; `unknown` otherwise,
/// which is what Istio reports when it cannot tell.
pub fn destination_service(cluster: &str) -> (String, String, String) {
    let mut it = cluster.splitn(4, '|');
    let host = match (it.next(), it.next(), it.next(), it.next()) {
        (Some("outbound"), Some(_), Some(_), Some(h)) if !h.is_empty() => h,
        _ => return (UNKNOWN.into(), UNKNOWN.into(), UNKNOWN.into()),
    };
    let mut labels = host.split('.');
    match (labels.next(), labels.next(), labels.next()) {
        (Some(name), Some(ns), Some("svc")) => (host.to_string(), name.to_string(), ns.to_string()),
        // A ServiceEntry host is its own name (its namespace is not in the cluster name).
        _ => (host.to_string(), host.to_string(), UNKNOWN.to_string()),
    }
}

/// (`connection_security_policy`, `source_principal`, `destination_principal`) as Istio
/// reports them: the server side (reporter `destination`) knows whether the downstream
/// connection was mutual TLS (`mutual_tls` / `none`) and the client's principal; the client
/// side reports `unknown` for the policy and the principals of an mTLS upstream connection.
pub fn security_labels(
    reporter: &str,
    downstream: &crate::tls::Security,
    upstream: Option<&crate::tls::Security>,
) -> (&'static str, Option<Arc<str>>, Option<Arc<str>>) {
    if reporter == "destination" {
        let policy = if downstream.mutual {
            "mutual_tls"
        } else {
            "none"
        };
        (
            policy,
            downstream.peer_principal.clone(),
            downstream.local_principal.clone(),
        )
    } else {
        match upstream.filter(|u| u.mutual) {
            Some(u) => (
                "unknown",
                u.local_principal.clone(),
                u.peer_principal.clone(),
            ),
            None => ("unknown", None, None),
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

    fn node(labels: &[(&str, &str)]) -> envoy_types::pb::envoy::config::core::v3::Node {
        let labels = Struct {
            fields: labels
                .iter()
                .map(|(k, v)| (k.to_string(), string_value(v)))
                .collect(),
        };
        let mut fields: std::collections::BTreeMap<String, Value> = [
            ("NAME", "web-v1-abc"),
            ("NAMESPACE", "shop"),
            ("WORKLOAD_NAME", "web-v1"),
            ("CLUSTER_ID", "Kubernetes"),
            ("INSTANCE_IPS", "10.0.0.7"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), string_value(v)))
        .collect();
        fields.insert(
            "LABELS".into(),
            Value {
                kind: Some(Kind::StructValue(labels)),
            },
        );
        envoy_types::pb::envoy::config::core::v3::Node {
            id: "sidecar~10.0.0.7~web-v1-abc.shop~shop.svc.cluster.local".into(),
            metadata: Some(Struct {
                fields: fields.into_iter().collect(),
            }),
            ..Default::default()
        }
    }

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
            destination_service("outbound|80||api.internal.example"),
            (
                "api.internal.example".into(),
                "api.internal.example".into(),
                "unknown".into()
            )
        );
        assert_eq!(destination_service("BlackHoleCluster").0, "unknown");
    }

    #[test]
    fn exchange_headers_round_trip_and_are_taken_off() {
        let a = Metrics::new();
        a.set_local(&node(&[("app", "web"), ("version", "v1")]));
        let mut h = HeaderMap::new();
        a.add_exchange_headers(&mut h);
        assert!(h.get(PEER_ID_HEADER).is_some());
        let b = Metrics::new();
        let peer = b.take_peer(&mut h).unwrap();
        assert!(h.is_empty(), "{h:?}");
        assert_eq!(&*peer.name, "web-v1");
        assert_eq!(&*peer.namespace, "shop");
        assert_eq!((&*peer.app, &*peer.version), ("web", "v1"));
        assert_eq!(
            (&*peer.canonical_service, &*peer.canonical_revision),
            ("web", "v1")
        );
        assert_eq!(&*peer.cluster, "Kubernetes");
        assert_eq!(*peer, *a.local());
        // The addresses stay home.
        let mut h = HeaderMap::new();
        a.add_exchange_headers(&mut h);
        let raw = base64::engine::general_purpose::STANDARD
            .decode(h.get(PEER_METADATA_HEADER).unwrap().as_bytes())
            .unwrap();
        assert!(!String::from_utf8_lossy(&raw).contains("10.0.0.7"));
        // The second time comes from the cache: the same Arc.
        let again = b.take_peer(&mut h).unwrap();
        assert!(Arc::ptr_eq(&peer, &again));
        // Garbage is nobody, and still taken off.
        let mut h = HeaderMap::new();
        h.insert(
            PEER_METADATA_HEADER,
            HeaderValue::from_static("!!not base64"),
        );
        assert!(b.take_peer(&mut h).is_none());
        assert!(h.is_empty());
    }

    #[test]
    fn canonical_labels_fall_back_as_istio() {
        let w = Workload::from_node_metadata(
            node(&[("service.istio.io/canonical-name", "shop-web")])
                .metadata
                .as_ref()
                .unwrap(),
        );
        assert_eq!(&*w.canonical_service, "shop-web");
        assert_eq!(&*w.canonical_revision, "latest");
        assert_eq!((&*w.app, &*w.version), ("unknown", "unknown"));
        let e = Workload::from_endpoint_metadata("web-v2;shop;web;v2;east").unwrap();
        assert_eq!(
            (&*e.name, &*e.namespace, &*e.app, &*e.version, &*e.cluster),
            ("web-v2", "shop", "web", "v2", "east")
        );
        assert!(Workload::from_endpoint_metadata("web;shop").is_none());
    }

    #[test]
    fn services_from_mesh_sni() {
        assert_eq!(
            service_from_sni("outbound_.8000_._.back.default.svc.cluster.local"),
            Some("back.default.svc.cluster.local")
        );
        assert_eq!(
            service_from_sni("outbound_.80_.v1_.web.shop.svc.cluster.local"),
            Some("web.shop.svc.cluster.local")
        );
        assert_eq!(service_from_sni("api.example.com"), None);
    }

    #[test]
    fn services_from_inbound_authorities() {
        let s = Service::from_authority("web:8080", "shop");
        assert_eq!(
            (&*s.fqdn, &*s.name, &*s.namespace),
            ("web.shop.svc.cluster.local", "web", "shop")
        );
        let s = Service::from_authority("web.other.svc.cluster.local", "shop");
        assert_eq!((&*s.name, &*s.namespace), ("web", "other"));
        assert_eq!(
            &*Service::from_authority("10.0.0.1:80", "shop").fqdn,
            "unknown"
        );
    }

    #[test]
    fn one_series_per_label_set_with_all_metrics_encoded() {
        let m = Metrics::new();
        m.set_local(&node(&[("app", "web")]));
        let key = |code| RequestKey {
            reporter: "source",
            source: m.local(),
            destination: Arc::new(
                Workload::from_endpoint_metadata("api-v1;shop;api;v1;Kubernetes").unwrap(),
            ),
            service: m.service("outbound|80||api.shop.svc.cluster.local", "api"),
            source_principal: None,
            destination_principal: Some(Arc::from("spiffe://cluster.local/ns/shop/sa/api")),
            request_protocol: "http",
            response_code: code,
            grpc_status: None,
            response_flags: Vec::new(),
            connection_security_policy: "unknown",
        };
        for _ in 0..3 {
            let s = m.request_series(&key(200));
            s.requests.fetch_add(1, Ordering::Relaxed);
            s.duration.observe(7.5);
            s.request_bytes.observe(0.0);
            s.response_bytes.observe(1234.0);
        }
        m.request_series(&key(503))
            .requests
            .fetch_add(1, Ordering::Relaxed);
        assert!(Arc::ptr_eq(
            &m.request_series(&key(200)),
            &m.request_series(&key(200))
        ));
        let text = m.encode();
        let ok = text
            .lines()
            .find(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"200\""))
            .unwrap_or_else(|| panic!("{text}"));
        for want in [
            "reporter=\"source\"",
            "source_workload=\"web-v1\"",
            "source_app=\"web\"",
            "source_version=\"unknown\"",
            "destination_workload=\"api-v1\"",
            "destination_app=\"api\"",
            "destination_version=\"v1\"",
            "destination_service=\"api.shop.svc.cluster.local\"",
            "destination_cluster=\"Kubernetes\"",
            "source_principal=\"unknown\"",
            "destination_principal=\"spiffe://cluster.local/ns/shop/sa/api\"",
            "grpc_response_status=\"\"",
            "response_flags=\"-\"",
        ] {
            assert!(ok.contains(want), "{want} not in {ok}");
        }
        assert!(ok.ends_with(" 3"), "{ok}");
        assert!(
            text.contains("istio_request_duration_milliseconds_sum{"),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("istio_response_bytes_bucket{")
                    && l.contains("le=\"10000.0\"")
                    && l.contains("response_code=\"200\"")
                    && l.ends_with(" 3")),
            "{text}"
        );
        let t = m.tcp_series(&TcpKey {
            reporter: "destination",
            source: Workload::unknown(),
            destination: m.local(),
            service: m.service("inbound|9000||", "10.0.0.7:9000"),
            source_principal: None,
            destination_principal: None,
            response_flags: vec!["UF"],
            connection_security_policy: "none",
        });
        t.opened.fetch_add(1, Ordering::Relaxed);
        t.sent.fetch_add(42, Ordering::Relaxed);
        let text = m.encode();
        assert!(
            text.lines()
                .any(|l| l.starts_with("istio_tcp_sent_bytes_total{")
                    && l.contains("response_flags=\"UF\"")
                    && l.ends_with(" 42")),
            "{text}"
        );
        assert!(
            text.contains("istio_tcp_connections_opened_total{"),
            "{text}"
        );
    }

    /// Instructions per request of the recording, old (13 `String` labels, two `Family`
    /// lookups) against new: run under callgrind with `MZ_BENCH=old|new` and `MZ_BENCH_N=0`
    /// and `=N`; the difference over N is the per-request cost. Not a test.
    #[test]
    #[ignore]
    fn recording_cost() {
        use prometheus_client::metrics::{counter::Counter, family::Family, histogram::Histogram};
        #[derive(
            Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet,
        )]
        struct Old {
            reporter: &'static str,
            source_workload: String,
            source_workload_namespace: String,
            destination_service: String,
            destination_service_name: String,
            destination_service_namespace: String,
            destination_cluster: String,
            request_protocol: &'static str,
            response_code: u16,
            response_flags: String,
            connection_security_policy: &'static str,
            source_principal: String,
            destination_principal: String,
        }
        let n: usize = std::env::var("MZ_BENCH_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let cluster = String::from("outbound|80||web.default.svc.cluster.local");
        let authority = "web.default.svc.cluster.local";
        let mut resp = HeaderMap::new();
        resp.insert("content-length", HeaderValue::from_static("612"));
        if std::env::var("MZ_BENCH").as_deref() == Ok("old") {
            let requests = Family::<Old, Counter>::default();
            let duration =
                Family::<Old, Histogram>::new_with_constructor(|| Histogram::new(DURATION_BUCKETS));
            for i in 0..n {
                let (svc, name, ns) = destination_service(&cluster);
                let labels = Old {
                    reporter: "source",
                    source_workload: "unknown".into(),
                    source_workload_namespace: "unknown".into(),
                    destination_service: svc,
                    destination_service_name: name,
                    destination_service_namespace: ns,
                    destination_cluster: cluster.clone(),
                    request_protocol: "http",
                    response_code: 200,
                    response_flags: "-".to_string(),
                    connection_security_policy: "unknown",
                    source_principal: "unknown".into(),
                    destination_principal: "unknown".into(),
                };
                requests.get_or_create(&labels).inc();
                duration.get_or_create(&labels).observe((i % 7) as f64);
            }
        } else {
            let m = Metrics::new();
            m.set_local(&node(&[("app", "gw")]));
            for i in 0..n {
                let mut req = HeaderMap::new();
                m.add_exchange_headers(&mut req);
                let peer = m.take_peer(&mut resp);
                let key = RequestKey {
                    reporter: "source",
                    source: m.local(),
                    destination: peer.unwrap_or_else(Workload::unknown),
                    service: m.service(&cluster, authority),
                    source_principal: None,
                    destination_principal: None,
                    request_protocol: "http",
                    response_code: 200,
                    grpc_status: None,
                    response_flags: Vec::new(),
                    connection_security_policy: "unknown",
                };
                m.request_series(&key).record((i % 7) as f64, 0, 612);
                std::hint::black_box(req);
            }
        }
    }
}
