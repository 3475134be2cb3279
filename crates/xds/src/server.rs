//! The Aggregated Discovery Service: state-of-the-world and delta (incremental) xDS over one
//! gRPC stream per proxy, as istiod serves it.
//!
//! Each stream is one task. It identifies the proxy from the first request's node, then
//! reacts to two things: requests (subscriptions, ACKs, NACKs) and new push contexts (a
//! `watch` channel the pilot publishes to after debouncing). On a push it regenerates every
//! subscribed type in Istio's order (CDS, EDS, LDS, RDS) and sends only what changed;
//! clusters that disappeared are removed last, after listeners and routes stopped pointing at
//! them. A NACK is recorded (with Envoy's message) and nothing is resent until the config
//! changes: the proxy keeps its last good state.

use crate::any::{self, PUSH_ORDER};
use crate::gen::{self, Named};
use crate::status::{now_secs, Nack, ProxySync, SyncStatus};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::{value::Kind as PbKind, Any, Struct, Value as PbValue};
use mizzen_model::{Proxy, PushContext};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: String,
}

/// Istio's pilot metric names, so existing dashboards keep working.
#[derive(Debug, Default)]
pub struct XdsMetrics {
    pub pushes: Family<TypeLabel, Counter>,
    pub rejects: Family<TypeLabel, Counter>,
    pub connected: Gauge,
}

impl XdsMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "pilot_xds_pushes",
            "Pilot build and send errors for lds, rds, cds and eds.",
            self.pushes.clone(),
        );
        registry.register(
            "pilot_total_xds_rejects",
            "Total number of xDS responses from pilot rejected by proxy.",
            self.rejects.clone(),
        );
        registry.register(
            "pilot_xds",
            "Number of endpoints connected to this pilot using XDS.",
            self.connected.clone(),
        );
    }
}

/// Shared by every stream.
#[derive(Clone)]
pub struct Discovery {
    push: watch::Receiver<Arc<PushContext>>,
    pub status: Arc<SyncStatus>,
    pub metrics: Arc<XdsMetrics>,
    next_id: Arc<AtomicU64>,
}

impl Discovery {
    pub fn new(push: watch::Receiver<Arc<PushContext>>) -> Discovery {
        Discovery {
            push,
            status: Arc::new(SyncStatus::default()),
            metrics: Arc::new(XdsMetrics::default()),
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }

    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Discovery> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(256 << 20)
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

type SotwStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Discovery {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let conn = Connection::new(self.clone(), false);
        tokio::spawn(conn.run_sotw(request.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let conn = Connection::new(self.clone(), true);
        tokio::spawn(conn.run_delta(request.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Convert the node's metadata Struct into JSON for the model.
pub fn struct_to_json(s: &Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: &PbValue) -> serde_json::Value {
    match &v.kind {
        Some(PbKind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(PbKind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Some(PbKind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(PbKind::StructValue(s)) => struct_to_json(s),
        Some(PbKind::ListValue(l)) => {
            serde_json::Value::Array(l.values.iter().map(value_to_json).collect())
        }
        Some(PbKind::NullValue(_)) | None => serde_json::Value::Null,
    }
}

fn hash_any(a: &Any) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    a.value.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Per type URL state of one stream.
#[derive(Default)]
struct TypeState {
    /// `None`: wildcard (everything this proxy should have).
    names: Option<BTreeSet<String>>,
    /// What the proxy has from us: name -> content hash, plus the resource itself only where
    /// it may have to be sent again unchanged (SotW clusters kept until removed last). Delta
    /// streams keep hashes only: a full copy per proxy cost ~3 MB each at 1000 services.
    sent: BTreeMap<String, (String, Option<Any>)>,
    nonce: String,
    subscribed: bool,
}

struct Connection {
    d: Discovery,
    conn_id: u64,
    delta: bool,
    proxy: Option<Proxy>,
    push: Arc<PushContext>,
    types: BTreeMap<String, TypeState>,
    nonce: u64,
}

fn is_wildcard_type(type_url: &str) -> bool {
    type_url == any::CLUSTER || type_url == any::LISTENER
}

fn known_type(type_url: &str) -> bool {
    PUSH_ORDER.contains(&type_url)
}

impl Connection {
    fn new(d: Discovery, delta: bool) -> Connection {
        let push = d.push.borrow().clone();
        let conn_id = d.id();
        Connection {
            d,
            conn_id,
            delta,
            proxy: None,
            push,
            types: BTreeMap::new(),
            nonce: 0,
        }
    }

    fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        format!("{}-{}", self.conn_id, self.nonce)
    }

    fn identify(
        &mut self,
        node: Option<&envoy_types::pb::envoy::config::core::v3::Node>,
    ) -> Result<(), Status> {
        if self.proxy.is_some() {
            return Ok(());
        }
        let node =
            node.ok_or_else(|| Status::invalid_argument("first request must carry the node"))?;
        let md = node
            .metadata
            .as_ref()
            .map(struct_to_json)
            .unwrap_or(serde_json::Value::Null);
        let mut proxy =
            Proxy::from_node(&node.id, &md).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(l) = &node.locality {
            proxy.node_locality = mizzen_model::service::Locality {
                region: l.region.clone(),
                zone: l.zone.clone(),
                sub_zone: l.sub_zone.clone(),
            };
        }
        proxy.resolve(&self.push);
        info!(proxy = %proxy.id, delta = self.delta, workload = ?proxy.workload.as_ref().map(|w| &w.name), "proxy connected");
        self.d.status.connect(
            self.conn_id,
            ProxySync {
                id: proxy.id.clone(),
                proxy_type: proxy.proxy_type.as_str().to_string(),
                ip: proxy
                    .primary_ip()
                    .map(|i| i.to_string())
                    .unwrap_or_default(),
                namespace: proxy.namespace.clone(),
                delta: self.delta,
                connected_at: now_secs(),
                resources: BTreeMap::new(),
            },
        );
        self.d.metrics.connected.inc();
        self.proxy = Some(proxy);
        Ok(())
    }

    fn generate(&self, type_url: &str) -> Vec<Named> {
        let Some(proxy) = &self.proxy else {
            return Vec::new();
        };
        let st = self.types.get(type_url);
        let names: Option<Vec<String>> = st
            .and_then(|s| s.names.as_ref())
            .map(|n| n.iter().cloned().collect());
        gen::generate(type_url, proxy, &self.push, names.as_deref())
    }

    fn record_request(
        &mut self,
        type_url: &str,
        nonce: &str,
        version: &str,
        error: Option<String>,
    ) -> bool {
        let Some(st) = self.types.get(type_url) else {
            return false;
        };
        if nonce.is_empty() {
            return false;
        }
        if nonce != st.nonce {
            debug!(type_url, nonce, "stale nonce, ignored");
            return true;
        }
        let short = any::short(type_url);
        match error {
            Some(message) => {
                warn!(proxy = self.proxy.as_ref().map(|p| p.id.as_str()).unwrap_or(""), xds = short, %message, "proxy rejected config (NACK)");
                self.d
                    .metrics
                    .rejects
                    .get_or_create(&TypeLabel {
                        r#type: short.into(),
                    })
                    .inc();
                let (version, nonce) = (version.to_string(), nonce.to_string());
                self.d.status.update(self.conn_id, type_url, |t| {
                    t.nacks += 1;
                    t.nack = Some(Nack {
                        version,
                        nonce,
                        message,
                    });
                });
            }
            None => {
                let version = version.to_string();
                self.d.status.update(self.conn_id, type_url, |t| {
                    t.acked_version = Some(version);
                    t.nack = None;
                });
            }
        }
        false
    }

    fn note_sent(&self, type_url: &str, version: &str, nonce: &str, names: Vec<String>) {
        self.d
            .metrics
            .pushes
            .get_or_create(&TypeLabel {
                r#type: any::short(type_url).into(),
            })
            .inc();
        let (version, nonce) = (version.to_string(), nonce.to_string());
        self.d.status.update(self.conn_id, type_url, |t| {
            t.sent_version = version;
            t.sent_nonce = nonce;
            t.names = names;
            t.responses += 1;
        });
    }

    fn refresh_push(&mut self, push: Arc<PushContext>) {
        self.push = push;
        if let Some(p) = self.proxy.as_mut() {
            p.resolve(&self.push);
        }
    }

    // ------------------------------------------------------------------ state of the world

    async fn run_sotw(
        mut self,
        mut inbound: Streaming<DiscoveryRequest>,
        tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    ) {
        let mut push_rx = self.d.push.clone();
        push_rx.mark_unchanged();
        loop {
            tokio::select! {
                msg = inbound.message() => {
                    let req = match msg {
                        Ok(Some(r)) => r,
                        Ok(None) => break,
                        Err(e) => { debug!(error = %e, "stream closed"); break; }
                    };
                    if let Err(status) = self.identify(req.node.as_ref()) {
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                    if !self.sotw_request(req, &tx).await { break; }
                }
                changed = push_rx.changed() => {
                    if changed.is_err() { break; }
                    let push = push_rx.borrow_and_update().clone();
                    self.refresh_push(push);
                    if !self.sotw_push(&tx).await { break; }
                }
            }
        }
        self.close();
    }

    fn close(&self) {
        if self.proxy.is_some() {
            self.d.status.disconnect(self.conn_id);
            self.d.metrics.connected.dec();
            info!(
                proxy = self.proxy.as_ref().map(|p| p.id.as_str()).unwrap_or(""),
                "proxy disconnected"
            );
        }
    }

    async fn sotw_request(
        &mut self,
        req: DiscoveryRequest,
        tx: &mpsc::Sender<Result<DiscoveryResponse, Status>>,
    ) -> bool {
        let type_url = req.type_url.clone();
        if !known_type(&type_url) {
            debug!(type_url, "unsupported type requested; ignoring");
            return true;
        }
        let error = req.error_detail.as_ref().map(|e| e.message.clone());
        let is_nack = error.is_some();
        if self.record_request(&type_url, &req.response_nonce, &req.version_info, error) {
            return true; // stale
        }
        let names: Option<BTreeSet<String>> =
            if is_wildcard_type(&type_url) && req.resource_names.iter().all(|n| n == "*") {
                None
            } else {
                Some(req.resource_names.iter().cloned().collect())
            };
        let st = self.types.entry(type_url.clone()).or_default();
        let first = !st.subscribed;
        let names_changed = st.names != names;
        st.subscribed = true;
        st.names = names;
        if is_nack && !names_changed {
            return true;
        }
        if first || names_changed {
            let generated = self.generate(&type_url);
            return self.sotw_send(&type_url, generated, None, true, tx).await;
        }
        true
    }

    /// Send the full set for `type_url` (plus `keep`, resources kept until removed last).
    async fn sotw_send(
        &mut self,
        type_url: &str,
        generated: Vec<Named>,
        keep: Option<&BTreeMap<String, (String, Option<Any>)>>,
        force: bool,
        tx: &mpsc::Sender<Result<DiscoveryResponse, Status>>,
    ) -> bool {
        let mut next: BTreeMap<String, (String, Option<Any>)> = generated
            .into_iter()
            .map(|n| (n.name, (hash_any(&n.resource), Some(n.resource))))
            .collect();
        if let Some(keep) = keep {
            for (k, v) in keep {
                next.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        let unchanged = self.types.get(type_url).is_some_and(|st| {
            st.sent.len() == next.len()
                && st
                    .sent
                    .iter()
                    .zip(&next)
                    .all(|((a, (ha, _)), (b, (hb, _)))| a == b && ha == hb)
        });
        if unchanged && !force {
            return true;
        }
        let nonce = self.next_nonce();
        let version = self.push.version.clone();
        let resp = DiscoveryResponse {
            version_info: version.clone(),
            resources: next.values().filter_map(|(_, a)| a.clone()).collect(),
            type_url: type_url.to_string(),
            nonce: nonce.clone(),
            ..Default::default()
        };
        let names: Vec<String> = next.keys().cloned().collect();
        if type_url != any::CLUSTER {
            // Only clusters are ever re-sent from this copy (kept until removed last).
            for v in next.values_mut() {
                v.1 = None;
            }
        }
        if let Some(st) = self.types.get_mut(type_url) {
            st.sent = next;
            st.nonce = nonce.clone();
        }
        self.note_sent(type_url, &version, &nonce, names);
        tx.send(Ok(resp)).await.is_ok()
    }

    async fn sotw_push(&mut self, tx: &mpsc::Sender<Result<DiscoveryResponse, Status>>) -> bool {
        // Clusters that go away stay until listeners and routes have moved off them.
        let mut removed_clusters = None;
        for type_url in PUSH_ORDER {
            let subscribed = self.types.get(type_url).is_some_and(|s| s.subscribed);
            if !subscribed {
                continue;
            }
            let generated = self.generate(type_url);
            let ok = if type_url == any::CLUSTER {
                let new_names: BTreeSet<&str> = generated.iter().map(|n| n.name.as_str()).collect();
                let gone: BTreeMap<String, (String, Option<Any>)> = self
                    .types
                    .get(type_url)
                    .map(|s| {
                        s.sent
                            .iter()
                            .filter(|(k, _)| !new_names.contains(k.as_str()))
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                let keep = (!gone.is_empty()).then_some(gone);
                // The final send below reuses this generation: clusters are the costliest type.
                let final_set = keep.is_some().then(|| generated.clone());
                let ok = self
                    .sotw_send(type_url, generated, keep.as_ref(), false, tx)
                    .await;
                removed_clusters = final_set;
                ok
            } else {
                self.sotw_send(type_url, generated, None, false, tx).await
            };
            if !ok {
                return false;
            }
        }
        if let Some(generated) = removed_clusters {
            return self
                .sotw_send(any::CLUSTER, generated, None, false, tx)
                .await;
        }
        true
    }

    // ------------------------------------------------------------------ delta

    async fn run_delta(
        mut self,
        mut inbound: Streaming<DeltaDiscoveryRequest>,
        tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    ) {
        let mut push_rx = self.d.push.clone();
        push_rx.mark_unchanged();
        loop {
            tokio::select! {
                msg = inbound.message() => {
                    let req = match msg {
                        Ok(Some(r)) => r,
                        Ok(None) => break,
                        Err(e) => { debug!(error = %e, "stream closed"); break; }
                    };
                    if let Err(status) = self.identify(req.node.as_ref()) {
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                    if !self.delta_request(req, &tx).await { break; }
                }
                changed = push_rx.changed() => {
                    if changed.is_err() { break; }
                    let push = push_rx.borrow_and_update().clone();
                    self.refresh_push(push);
                    if !self.delta_push(&tx).await { break; }
                }
            }
        }
        self.close();
    }

    async fn delta_request(
        &mut self,
        req: DeltaDiscoveryRequest,
        tx: &mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    ) -> bool {
        let type_url = req.type_url.clone();
        if !known_type(&type_url) {
            debug!(type_url, "unsupported type requested; ignoring");
            return true;
        }
        let error = req.error_detail.as_ref().map(|e| e.message.clone());
        let version = self.push.version.clone();
        if self.record_request(&type_url, &req.response_nonce, &version, error) {
            // Stale nonce, but subscription changes still count in delta.
            if req.resource_names_subscribe.is_empty() && req.resource_names_unsubscribe.is_empty()
            {
                return true;
            }
        }
        let st = self.types.entry(type_url.clone()).or_default();
        let first = !st.subscribed;
        if first {
            st.subscribed = true;
            // Wildcard types start as wildcard unless the client names resources.
            st.names = if is_wildcard_type(&type_url) {
                None
            } else {
                Some(BTreeSet::new())
            };
            // A reconnecting client tells us what it has: send only what differs.
            for (name, ver) in &req.initial_resource_versions {
                st.sent.insert(name.clone(), (ver.clone(), None));
            }
        }
        let mut changed = first;
        for n in &req.resource_names_subscribe {
            if n == "*" {
                changed |= st.names.is_some();
                st.names = None;
            } else if let Some(set) = st.names.as_mut() {
                changed |= set.insert(n.clone());
                // Explicit re-subscription: the client wants it even if it had it.
                st.sent.remove(n);
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n == "*" {
                if st.names.is_none() {
                    st.names = Some(BTreeSet::new());
                }
            } else if let Some(set) = st.names.as_mut() {
                set.remove(n);
            }
            st.sent.remove(n);
        }
        if !changed && req.resource_names_subscribe.is_empty() {
            return true;
        }
        let generated = self.generate(&type_url);
        self.delta_send(&type_url, generated, true, first, tx).await
    }

    /// Send what changed for `type_url`. `removals`: include removed names now (false for
    /// clusters during a push, which are removed last).
    async fn delta_send(
        &mut self,
        type_url: &str,
        generated: Vec<Named>,
        removals: bool,
        always: bool,
        tx: &mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    ) -> bool {
        let Some(st) = self.types.get(type_url) else {
            return true;
        };
        let mut resources = Vec::new();
        let mut next: BTreeMap<String, (String, Option<Any>)> = BTreeMap::new();
        for n in generated {
            let h = hash_any(&n.resource);
            if st.sent.get(&n.name).map(|(v, _)| v) != Some(&h) {
                resources.push(Resource {
                    name: n.name.clone(),
                    version: h.clone(),
                    resource: Some(n.resource),
                    ..Default::default()
                });
            }
            next.insert(n.name, (h, None));
        }
        let mut removed: Vec<String> = Vec::new();
        for (name, v) in &st.sent {
            if !next.contains_key(name) {
                if removals {
                    removed.push(name.clone());
                } else {
                    next.insert(name.clone(), v.clone());
                }
            }
        }
        // Named subscriptions: a name we cannot produce is reported removed so the client
        // stops waiting for it (Envoy would otherwise keep the listener warming).
        if let Some(names) = &st.names {
            for n in names {
                if !next.contains_key(n) && !removed.contains(n) && always {
                    removed.push(n.clone());
                }
            }
        }
        if resources.is_empty() && removed.is_empty() && !always {
            return true;
        }
        let nonce = self.next_nonce();
        let version = self.push.version.clone();
        let names: Vec<String> = next.keys().cloned().collect();
        if let Some(st) = self.types.get_mut(type_url) {
            st.sent = next;
            st.nonce = nonce.clone();
        }
        let resp = DeltaDiscoveryResponse {
            system_version_info: version.clone(),
            resources,
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce: nonce.clone(),
            ..Default::default()
        };
        self.note_sent(type_url, &version, &nonce, names);
        tx.send(Ok(resp)).await.is_ok()
    }

    async fn delta_push(
        &mut self,
        tx: &mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    ) -> bool {
        let mut cluster_names: Option<BTreeSet<String>> = None;
        for type_url in PUSH_ORDER {
            if !self.types.get(type_url).is_some_and(|s| s.subscribed) {
                continue;
            }
            let generated = self.generate(type_url);
            let removals = type_url != any::CLUSTER;
            if !removals {
                cluster_names = Some(generated.iter().map(|n| n.name.clone()).collect());
                // An updated EDS cluster warms until it gets a ClusterLoadAssignment, and Envoy
                // does not ask again for a name it already subscribes to: resend the endpoints
                // of every changed cluster (else a DestinationRule edit stalls ~15 s).
                let changed: Vec<String> = self
                    .types
                    .get(any::CLUSTER)
                    .map(|st| {
                        generated
                            .iter()
                            .filter(|n| {
                                st.sent.get(&n.name).map(|(h, _)| h) != Some(&hash_any(&n.resource))
                            })
                            .map(|n| n.name.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                if let Some(eds) = self.types.get_mut(any::ENDPOINT) {
                    for n in &changed {
                        eds.sent.remove(n);
                    }
                }
            }
            if !self
                .delta_send(type_url, generated, removals, false, tx)
                .await
            {
                return false;
            }
        }
        // Stale clusters go last, once listeners and routes no longer point at them.
        let Some(current) = cluster_names else {
            return true;
        };
        let stale: Vec<String> = self
            .types
            .get(any::CLUSTER)
            .map(|st| {
                st.sent
                    .keys()
                    .filter(|k| !current.contains(*k))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        if stale.is_empty() {
            return true;
        }
        let nonce = self.next_nonce();
        let version = self.push.version.clone();
        let mut names = Vec::new();
        if let Some(st) = self.types.get_mut(any::CLUSTER) {
            for n in &stale {
                st.sent.remove(n);
            }
            st.nonce = nonce.clone();
            names = st.sent.keys().cloned().collect();
        }
        self.note_sent(any::CLUSTER, &version, &nonce, names);
        let resp = DeltaDiscoveryResponse {
            system_version_info: version,
            type_url: any::CLUSTER.to_string(),
            removed_resources: stale,
            nonce,
            ..Default::default()
        };
        tx.send(Ok(resp)).await.is_ok()
    }
}
