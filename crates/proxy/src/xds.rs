//! The delta ADS client: keeps the proxy's config in sync with the pilot.
//!
//! Subscribes like Envoy: CDS and LDS as wildcards, then EDS for every EDS cluster and RDS
//! for every route configuration a listener names, unsubscribing names nobody references any
//! more. Each response is converted resource by resource ([`crate::config::proto`]); the good
//! ones apply, a bad one keeps its previous version and the response is NACKed with every
//! conversion error in `error_detail` (resource and field named). After each response a new
//! [`Snapshot`] is built from the resources in force and published atomically.
//!
//! The stream reconnects with bounded exponential backoff; the last config keeps serving
//! while the pilot is away, and the new stream announces what we hold
//! (`initial_resource_versions`) so the pilot only sends changes and removals.

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
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
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
    #[error("opening the delta ADS stream: {0}")]
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
    /// Version of each resource in force, by type URL then name (for reconnects).
    versions: HashMap<&'static str, BTreeMap<String, String>>,
    eds_subscribed: BTreeSet<String>,
    rds_subscribed: BTreeSet<String>,
    seen_cds: bool,
    seen_lds: bool,
}

pub struct XdsClient {
    pub node: Node,
    /// `http://host:port`
    pub endpoint: String,
    pub shared: Arc<Shared>,
}

impl XdsClient {
    /// Runs until the process exits: connect, sync, and on any failure back off and retry.
    pub async fn run(self) {
        let mut state = State::default();
        let mut backoff = BACKOFF_MIN;
        loop {
            let synced_before = self.shared.xds_responses();
            match self.stream(&mut state).await {
                Ok(()) => {}
                Err(e) => {
                    warn!(error = %e, pilot = %self.endpoint, retry_in_ms = backoff.as_millis() as u64, "xDS stream ended; keeping the last config")
                }
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

    async fn stream(&self, state: &mut State) -> Result<(), XdsError> {
        let channel = tonic::transport::Endpoint::from_shared(self.endpoint.clone())
            .map_err(|_| XdsError::Uri(self.endpoint.clone()))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|source| XdsError::Connect {
                address: self.endpoint.clone(),
                source,
            })?;
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
            let resp = match inbound.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Err(XdsError::Closed),
                Err(s) => return Err(XdsError::Stream(s)),
            };
            let follow = self.handle(state, &resp);
            for r in follow {
                tx.send(r).await.map_err(|_| XdsError::Closed)?;
            }
        }
    }

    /// Apply one response; returns the ACK/NACK and any subscription changes to send.
    fn handle(
        &self,
        state: &mut State,
        resp: &DeltaDiscoveryResponse,
    ) -> Vec<DeltaDiscoveryRequest> {
        let type_url: &'static str = match resp.type_url.as_str() {
            CLUSTER => CLUSTER,
            ENDPOINT => ENDPOINT,
            LISTENER => LISTENER,
            ROUTE => ROUTE,
            other => {
                warn!(type_url = other, "unexpected xDS type; NACKed");
                return vec![nack(
                    &resp.type_url,
                    &resp.nonce,
                    format!("type {other} is not supported"),
                )];
            }
        };
        let mut errors = Vec::new();
        let versions = state.versions.entry(type_url).or_default();
        for r in &resp.resources {
            let Some(any) = &r.resource else { continue };
            let result = match type_url {
                CLUSTER => decode::<cv3::Cluster>(&r.name, &any.value).and_then(|c| {
                    Cluster::try_from(&c).map_err(|e| e.to_string()).map(|c| {
                        state.resources.clusters.insert(r.name.clone(), Arc::new(c));
                    })
                }),
                ENDPOINT => {
                    decode::<ev3::ClusterLoadAssignment>(&r.name, &any.value).and_then(|c| {
                        Endpoints::try_from(&c).map_err(|e| e.to_string()).map(|c| {
                            state
                                .resources
                                .endpoints
                                .insert(r.name.clone(), Arc::new(c));
                        })
                    })
                }
                LISTENER => decode::<lv3::Listener>(&r.name, &any.value).and_then(|l| {
                    Listener::try_from(&l).map_err(|e| e.to_string()).map(|l| {
                        state
                            .resources
                            .listeners
                            .insert(r.name.clone(), Arc::new(l));
                    })
                }),
                _ => decode::<rv3::RouteConfiguration>(&r.name, &any.value).and_then(|rc| {
                    RouteConfig::try_from(&rc)
                        .map_err(|e| e.to_string())
                        .map(|rc| {
                            state.resources.routes.insert(r.name.clone(), Arc::new(rc));
                        })
                }),
            };
            match result {
                Ok(()) => {
                    versions.insert(r.name.clone(), r.version.clone());
                }
                Err(e) => {
                    warn!(type_url, resource = %r.name, version = %r.version, error = %e, "resource rejected; previous version stays");
                    self.shared.count_rejected(type_url);
                    errors.push(e);
                }
            }
        }
        for name in &resp.removed_resources {
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
            .insert(type_url.to_string(), resp.system_version_info.clone());

        let mut out = vec![if errors.is_empty() {
            DeltaDiscoveryRequest {
                type_url: type_url.into(),
                response_nonce: resp.nonce.clone(),
                ..Default::default()
            }
        } else {
            nack(type_url, &resp.nonce, errors.join("; "))
        }];
        // Follow-up subscriptions, after the ACK as Envoy orders them.
        if type_url == CLUSTER {
            let want: BTreeSet<String> = eds_names(&state.resources.clusters).into_iter().collect();
            if let Some(r) = resubscribe(ENDPOINT, &mut state.eds_subscribed, want) {
                for n in &r.resource_names_unsubscribe {
                    state.resources.endpoints.remove(n);
                }
                out.push(r);
            }
        }
        if type_url == LISTENER {
            let want: BTreeSet<String> =
                rds_names(&state.resources.listeners).into_iter().collect();
            if let Some(r) = resubscribe(ROUTE, &mut state.rds_subscribed, want) {
                for n in &r.resource_names_unsubscribe {
                    state.resources.routes.remove(n);
                }
                out.push(r);
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
        debug!(type_url, nonce = %resp.nonce, resources = resp.resources.len(), removed = resp.removed_resources.len(), nack = !errors.is_empty(), complete, "xDS response applied");
        // Built outside any lock; readers switch over with one atomic store.
        let snapshot = Snapshot::build(state.resources.clone());
        self.shared.publish(snapshot, complete);
        out
    }
}

fn decode<M: Message + Default>(name: &str, bytes: &[u8]) -> Result<M, String> {
    M::decode(bytes).map_err(|e| format!("{name}: cannot decode: {e}"))
}

fn nack(type_url: &str, nonce: &str, message: String) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.into(),
        response_nonce: nonce.into(),
        error_detail: Some(RpcStatus {
            // INVALID_ARGUMENT, as Envoy reports rejected config.
            code: 3,
            message,
            details: Vec::new(),
        }),
        ..Default::default()
    }
}

fn resubscribe(
    type_url: &str,
    have: &mut BTreeSet<String>,
    want: BTreeSet<String>,
) -> Option<DeltaDiscoveryRequest> {
    let sub: Vec<String> = want.difference(have).cloned().collect();
    let unsub: Vec<String> = have.difference(&want).cloned().collect();
    if sub.is_empty() && unsub.is_empty() {
        return None;
    }
    *have = want;
    Some(DeltaDiscoveryRequest {
        type_url: type_url.into(),
        resource_names_subscribe: sub,
        resource_names_unsubscribe: unsub,
        ..Default::default()
    })
}
