//! The ADS client (delta, Istio's default, or state of the world): keeps the proxy's config
//! in sync with the pilot.
//!
//! Subscribes like Envoy: CDS and LDS as wildcards, then EDS for every EDS cluster and RDS
//! for every route configuration a listener names, unsubscribing names nobody references any
//! more. Each response is converted resource by resource ([`crate::config::proto`]); the good
//! ones apply, a bad one keeps its previous version and the response is NACKed with every
//! conversion error in `error_detail` (resource and field named). After each response a new
//! [`Snapshot`] is built from the resources in force and published atomically.
//!
//! The stream reconnects with bounded exponential backoff; the last config keeps serving
//! while the pilot is away. A new delta stream announces what we hold
//! (`initial_resource_versions`) so the pilot only sends changes and removals; a new SotW
//! stream gets full CDS/LDS state again, which replaces ours.

use crate::config::{Cluster, Endpoints, Listener, RouteConfig};
use crate::snapshot::{eds_names, rds_names, Resources, Snapshot};
use crate::Shared;
use envoy_types::pb::envoy::config::cluster::v3 as cv3;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3 as ev3;
use envoy_types::pb::envoy::config::listener::v3 as lv3;
use envoy_types::pb::envoy::config::route::v3 as rv3;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("connecting to the pilot at {address}: {source}")]
    Connect {
        address: String,
        source: tonic::transport::Error,
    },
    #[error("opening the ADS stream: {0}")]
    Open(tonic::Status),
    #[error("ADS stream from the pilot failed: {0}")]
    Stream(tonic::Status),
    #[error("ADS stream closed by the pilot")]
    Closed,
    #[error("discovery address {0:?} is not a valid URI")]
    Uri(String),
}

/// What the client keeps across reconnects.
#[derive(Default)]
struct State {
    resources: Resources,
    /// Version of each resource in force, by type URL then name (for delta reconnects).
    versions: HashMap<&'static str, BTreeMap<String, String>>,
    eds_subscribed: BTreeSet<String>,
    rds_subscribed: BTreeSet<String>,
    seen_cds: bool,
    seen_lds: bool,
    /// SotW: last accepted version and last nonce per type (a NACK repeats the version).
    sotw_version: HashMap<&'static str, String>,
    sotw_nonce: HashMap<&'static str, String>,
}

/// Delta (incremental) or state-of-the-world ADS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Delta,
    Sotw,
}

pub struct XdsClient {
    pub node: Node,
    /// `http://host:port`
    pub endpoint: String,
    pub mode: Mode,
    pub shared: Arc<Shared>,
    /// Mesh root (PEM) when the pilot is reached on its TLS port (the CA address is the
    /// discovery address, as in the agent): verified against it and istiod's name.
    pub tls_root: Option<String>,
}

/// One resource of a response, whichever stream variant carried it.
struct Item<'a> {
    /// Empty for SotW (the name comes from the decoded resource).
    name: &'a str,
    version: &'a str,
    bytes: &'a [u8],
}

/// What applying a response produced.
struct Applied {
    errors: Vec<String>,
    /// (type, subscribe, unsubscribe) changes for EDS/RDS.
    resubscribe: Vec<(&'static str, Vec<String>, Vec<String>)>,
}

fn known_type(t: &str) -> Option<&'static str> {
    match t {
        CLUSTER => Some(CLUSTER),
        ENDPOINT => Some(ENDPOINT),
        LISTENER => Some(LISTENER),
        ROUTE => Some(ROUTE),
        _ => None,
    }
}

impl XdsClient {
    /// Runs until the process exits: connect, sync, and on any failure back off and retry.
    pub async fn run(self) {
        let mut state = State::default();
        let mut backoff = BACKOFF_MIN;
        loop {
            let synced_before = self.shared.xds_responses();
            let result = match self.mode {
                Mode::Delta => self.delta_stream(&mut state).await,
                Mode::Sotw => self.sotw_stream(&mut state).await,
            };
            if let Err(e) = result {
                warn!(error = %e, pilot = %self.endpoint, retry_in_ms = backoff.as_millis() as u64,
                      "xDS stream ended; keeping the last config");
            }
            self.shared.set_xds_connected(false);
            // A stream that made progress resets the backoff; a dead pilot doubles it.
            if self.shared.xds_responses() > synced_before {
                backoff = BACKOFF_MIN;
            }
            let jitter = Duration::from_millis(crate::cluster::random_below(100) as u64);
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn channel(&self) -> Result<tonic::transport::Channel, XdsError> {
        let mut endpoint = tonic::transport::Endpoint::from_shared(self.endpoint.clone())
            .map_err(|_| XdsError::Uri(self.endpoint.clone()))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        if let Some(root) = &self.tls_root {
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(root))
                .domain_name(mizzen_ca::client::PILOT_SAN);
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|source| XdsError::Connect {
                    address: self.endpoint.clone(),
                    source,
                })?;
        }
        endpoint
            .connect()
            .await
            .map_err(|source| XdsError::Connect {
                address: self.endpoint.clone(),
                source,
            })
    }

    async fn delta_stream(&self, state: &mut State) -> Result<(), XdsError> {
        let channel = self.channel().await?;
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
        // Initial subscriptions: wildcard CDS/LDS, plus the names we already follow, each with
        // the versions we hold so the pilot sends only what changed.
        let initial =
            |type_url: &'static str, names: Vec<String>, state: &State| DeltaDiscoveryRequest {
                node: Some(self.node.clone()),
                type_url: type_url.into(),
                resource_names_subscribe: names,
                initial_resource_versions: state
                    .versions
                    .get(type_url)
                    .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                    .unwrap_or_default(),
                ..Default::default()
            };
        let mut first = vec![
            initial(CLUSTER, Vec::new(), state),
            initial(LISTENER, Vec::new(), state),
        ];
        if !state.eds_subscribed.is_empty() {
            first.push(initial(
                ENDPOINT,
                state.eds_subscribed.iter().cloned().collect(),
                state,
            ));
        }
        if !state.rds_subscribed.is_empty() {
            first.push(initial(
                ROUTE,
                state.rds_subscribed.iter().cloned().collect(),
                state,
            ));
        }
        for r in first {
            // The receiver is ours and alive until the stream opens; a failure means it closed.
            tx.send(r).await.map_err(|_| XdsError::Closed)?;
        }
        let mut ads =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 << 20);
        let mut inbound = ads
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .map_err(XdsError::Open)?
            .into_inner();
        self.shared.set_xds_connected(true);
        info!(pilot = %self.endpoint, node = %self.node.id, "delta ADS stream open");
        loop {
            let resp: DeltaDiscoveryResponse = match inbound.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Err(XdsError::Closed),
                Err(s) => return Err(XdsError::Stream(s)),
            };
            for r in self.handle_delta(state, &resp) {
                tx.send(r).await.map_err(|_| XdsError::Closed)?;
            }
        }
    }

    fn handle_delta(
        &self,
        state: &mut State,
        resp: &DeltaDiscoveryResponse,
    ) -> Vec<DeltaDiscoveryRequest> {
        let Some(type_url) = known_type(&resp.type_url) else {
            warn!(type_url = %resp.type_url, "unexpected xDS type; NACKed");
            return vec![delta_nack(
                &resp.type_url,
                &resp.nonce,
                format!("type {} is not supported", resp.type_url),
            )];
        };
        let items: Vec<Item> = resp
            .resources
            .iter()
            .filter_map(|r| {
                r.resource.as_ref().map(|any| Item {
                    name: &r.name,
                    version: &r.version,
                    bytes: &any.value,
                })
            })
            .collect();
        let applied = self.apply(
            state,
            type_url,
            &items,
            &resp.removed_resources,
            false,
            &resp.system_version_info,
        );
        let mut out = vec![if applied.errors.is_empty() {
            DeltaDiscoveryRequest {
                type_url: type_url.into(),
                response_nonce: resp.nonce.clone(),
                ..Default::default()
            }
        } else {
            delta_nack(type_url, &resp.nonce, applied.errors.join("; "))
        }];
        // Follow-up subscriptions, after the ACK as Envoy orders them.
        for (t, sub, unsub) in applied.resubscribe {
            out.push(DeltaDiscoveryRequest {
                type_url: t.into(),
                resource_names_subscribe: sub,
                resource_names_unsubscribe: unsub,
                ..Default::default()
            });
        }
        out
    }

    async fn sotw_stream(&self, state: &mut State) -> Result<(), XdsError> {
        let channel = self.channel().await?;
        let (tx, rx) = mpsc::channel::<DiscoveryRequest>(64);
        // A new stream starts from scratch: the pilot sends full CDS/LDS state again.
        state.sotw_nonce.clear();
        let mut first = vec![
            DiscoveryRequest {
                node: Some(self.node.clone()),
                type_url: CLUSTER.into(),
                ..Default::default()
            },
            DiscoveryRequest {
                type_url: LISTENER.into(),
                ..Default::default()
            },
        ];
        if !state.eds_subscribed.is_empty() {
            first.push(sotw_subscribe(state, ENDPOINT));
        }
        if !state.rds_subscribed.is_empty() {
            first.push(sotw_subscribe(state, ROUTE));
        }
        for r in first {
            tx.send(r).await.map_err(|_| XdsError::Closed)?;
        }
        let mut ads =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 << 20);
        let mut inbound = ads
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .map_err(XdsError::Open)?
            .into_inner();
        self.shared.set_xds_connected(true);
        info!(pilot = %self.endpoint, node = %self.node.id, "state-of-the-world ADS stream open");
        loop {
            let resp: DiscoveryResponse = match inbound.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Err(XdsError::Closed),
                Err(s) => return Err(XdsError::Stream(s)),
            };
            for r in self.handle_sotw(state, &resp) {
                tx.send(r).await.map_err(|_| XdsError::Closed)?;
            }
        }
    }

    fn handle_sotw(&self, state: &mut State, resp: &DiscoveryResponse) -> Vec<DiscoveryRequest> {
        let Some(type_url) = known_type(&resp.type_url) else {
            warn!(type_url = %resp.type_url, "unexpected xDS type; NACKed");
            return vec![DiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                error_detail: Some(status(format!("type {} is not supported", resp.type_url))),
                ..Default::default()
            }];
        };
        let items: Vec<Item> = resp
            .resources
            .iter()
            .map(|any| Item {
                name: "",
                version: &resp.version_info,
                bytes: &any.value,
            })
            .collect();
        // CDS and LDS responses are the complete set; EDS/RDS only carry what was asked.
        let full_state = matches!(type_url, CLUSTER | LISTENER);
        let applied = self.apply(state, type_url, &items, &[], full_state, &resp.version_info);
        state.sotw_nonce.insert(type_url, resp.nonce.clone());
        let ack = if applied.errors.is_empty() {
            state
                .sotw_version
                .insert(type_url, resp.version_info.clone());
            None
        } else {
            Some(status(applied.errors.join("; ")))
        };
        let mut out = vec![DiscoveryRequest {
            version_info: state
                .sotw_version
                .get(type_url)
                .cloned()
                .unwrap_or_default(),
            type_url: type_url.into(),
            response_nonce: resp.nonce.clone(),
            resource_names: match type_url {
                ENDPOINT => state.eds_subscribed.iter().cloned().collect(),
                ROUTE => state.rds_subscribed.iter().cloned().collect(),
                _ => Vec::new(),
            },
            error_detail: ack,
            ..Default::default()
        }];
        for (t, _, _) in applied.resubscribe {
            out.push(sotw_subscribe(state, t));
        }
        out
    }

    /// Convert and apply one response's resources; publish the new snapshot.
    fn apply(
        &self,
        state: &mut State,
        type_url: &'static str,
        items: &[Item],
        removed: &[String],
        full_state: bool,
        system_version: &str,
    ) -> Applied {
        let mut errors = Vec::new();
        let mut present: BTreeSet<String> = BTreeSet::new();
        let versions = state.versions.entry(type_url).or_default();
        for it in items {
            let (name, result) = convert(type_url, it, &mut state.resources);
            if let Some(n) = &name {
                present.insert(n.clone());
            }
            let name = name.unwrap_or_else(|| it.name.to_string());
            match result {
                Ok(()) => {
                    versions.insert(name, it.version.to_string());
                }
                Err(e) => {
                    warn!(type_url, resource = %name, version = %it.version, error = %e,
                          "resource rejected; previous version stays");
                    self.shared.count_rejected(type_url);
                    errors.push(e);
                }
            }
        }
        let mut gone: Vec<String> = removed.to_vec();
        if full_state {
            let held: Vec<String> = match type_url {
                CLUSTER => state.resources.clusters.keys().cloned().collect(),
                _ => state.resources.listeners.keys().cloned().collect(),
            };
            gone.extend(held.into_iter().filter(|n| !present.contains(n)));
        }
        for name in &gone {
            versions.remove(name);
            match type_url {
                CLUSTER => drop(state.resources.clusters.remove(name)),
                ENDPOINT => drop(state.resources.endpoints.remove(name)),
                LISTENER => drop(state.resources.listeners.remove(name)),
                _ => drop(state.resources.routes.remove(name)),
            }
        }
        match type_url {
            CLUSTER => state.seen_cds = true,
            LISTENER => state.seen_lds = true,
            _ => {}
        }
        state
            .resources
            .versions
            .insert(type_url.to_string(), system_version.to_string());

        let mut resubscribe = Vec::new();
        if type_url == CLUSTER {
            let want: BTreeSet<String> = eds_names(&state.resources.clusters).into_iter().collect();
            if let Some((sub, unsub)) = diff(&mut state.eds_subscribed, want) {
                for n in &unsub {
                    state.resources.endpoints.remove(n);
                }
                resubscribe.push((ENDPOINT, sub, unsub));
            }
        }
        if type_url == LISTENER {
            let want: BTreeSet<String> =
                rds_names(&state.resources.listeners).into_iter().collect();
            if let Some((sub, unsub)) = diff(&mut state.rds_subscribed, want) {
                for n in &unsub {
                    state.resources.routes.remove(n);
                }
                resubscribe.push((ROUTE, sub, unsub));
            }
        }
        let complete = state.seen_cds
            && state.seen_lds
            && state
                .eds_subscribed
                .iter()
                .all(|n| state.resources.endpoints.contains_key(n))
            && state
                .rds_subscribed
                .iter()
                .all(|n| state.resources.routes.contains_key(n));
        debug!(
            type_url,
            resources = items.len(),
            removed = gone.len(),
            nack = !errors.is_empty(),
            complete,
            "xDS response applied"
        );
        // Built outside any lock; readers switch over with one atomic store.
        let snapshot = Snapshot::build(state.resources.clone());
        self.shared.publish(snapshot, complete);
        Applied {
            errors,
            resubscribe,
        }
    }
}

/// Decode + convert one resource into `resources`. Returns the resource's own name when it
/// could be decoded (SotW responses carry no separate names).
fn convert(
    type_url: &str,
    it: &Item,
    resources: &mut Resources,
) -> (Option<String>, Result<(), String>) {
    let label = |n: &str| {
        if n.is_empty() {
            it.name.to_string()
        } else {
            n.to_string()
        }
    };
    match type_url {
        CLUSTER => match decode::<cv3::Cluster>(it.name, it.bytes) {
            Err(e) => (None, Err(e)),
            Ok(c) => {
                let name = label(&c.name);
                let r = Cluster::try_from(&c).map_err(|e| e.to_string()).map(|v| {
                    resources.clusters.insert(name.clone(), Arc::new(v));
                });
                (Some(name), r)
            }
        },
        ENDPOINT => match decode::<ev3::ClusterLoadAssignment>(it.name, it.bytes) {
            Err(e) => (None, Err(e)),
            Ok(c) => {
                let name = label(&c.cluster_name);
                let r = Endpoints::try_from(&c).map_err(|e| e.to_string()).map(|v| {
                    resources.endpoints.insert(name.clone(), Arc::new(v));
                });
                (Some(name), r)
            }
        },
        LISTENER => match decode::<lv3::Listener>(it.name, it.bytes) {
            Err(e) => (None, Err(e)),
            Ok(l) => {
                let name = label(&l.name);
                let r = Listener::try_from(&l).map_err(|e| e.to_string()).map(|v| {
                    resources.listeners.insert(name.clone(), Arc::new(v));
                });
                (Some(name), r)
            }
        },
        _ => match decode::<rv3::RouteConfiguration>(it.name, it.bytes) {
            Err(e) => (None, Err(e)),
            Ok(rc) => {
                let name = label(&rc.name);
                let r = RouteConfig::try_from(&rc)
                    .map_err(|e| e.to_string())
                    .map(|v| {
                        resources.routes.insert(name.clone(), Arc::new(v));
                    });
                (Some(name), r)
            }
        },
    }
}

fn decode<M: Message + Default>(name: &str, bytes: &[u8]) -> Result<M, String> {
    M::decode(bytes).map_err(|e| format!("{name}: cannot decode: {e}"))
}

fn status(message: String) -> RpcStatus {
    RpcStatus {
        // INVALID_ARGUMENT, as Envoy reports rejected config.
        code: 3,
        message,
        details: Vec::new(),
    }
}

fn delta_nack(type_url: &str, nonce: &str, message: String) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.into(),
        response_nonce: nonce.into(),
        error_detail: Some(status(message)),
        ..Default::default()
    }
}

/// SotW (re)subscription for EDS/RDS: the full list of names, with the last version/nonce.
fn sotw_subscribe(state: &State, type_url: &'static str) -> DiscoveryRequest {
    let names = match type_url {
        ENDPOINT => &state.eds_subscribed,
        _ => &state.rds_subscribed,
    };
    DiscoveryRequest {
        version_info: state
            .sotw_version
            .get(type_url)
            .cloned()
            .unwrap_or_default(),
        type_url: type_url.into(),
        response_nonce: state.sotw_nonce.get(type_url).cloned().unwrap_or_default(),
        resource_names: names.iter().cloned().collect(),
        ..Default::default()
    }
}

fn diff(have: &mut BTreeSet<String>, want: BTreeSet<String>) -> Option<(Vec<String>, Vec<String>)> {
    let sub: Vec<String> = want.difference(have).cloned().collect();
    let unsub: Vec<String> = have.difference(&want).cloned().collect();
    if sub.is_empty() && unsub.is_empty() {
        return None;
    }
    *have = want;
    Some((sub, unsub))
}
