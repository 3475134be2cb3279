//! One simulated Envoy: a delta ADS stream that subscribes like Envoy does and ACKs every
//! response.
//!
//! Envoy's order: wildcard CDS and LDS; for every EDS cluster received, subscribe its
//! ClusterLoadAssignment by name; for every listener's HttpConnectionManager that uses RDS,
//! subscribe the route configuration by name; unsubscribe names that stop being referenced.
//! Every response is ACKed with its nonce; a resource that cannot be decoded is NACKed
//! (error_detail, as Envoy would) and the client fails.

use anyhow::{anyhow, bail, Context, Result};
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, Listener};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const HCM_FILTER: &str = "envoy.filters.network.http_connection_manager";
const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// What a client reports to the coordinator.
#[derive(Debug)]
pub enum Event {
    /// Every response, after its ACK was queued on the stream.
    Response {
        client: usize,
        at: Instant,
        version: String,
    },
    /// First time the client has received and ACKed CDS, EDS, LDS and RDS in full.
    Complete {
        client: usize,
        at: Instant,
        summary: Box<Summary>,
    },
    Failed {
        client: usize,
        error: String,
    },
}

/// Counters shared by every client.
#[derive(Debug, Default)]
pub struct Stats {
    pub bytes: AtomicU64,
    pub responses: AtomicU64,
    pub resources: AtomicU64,
}

/// A client's view of its config when it became complete.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub n_clusters: usize,
    pub n_listeners: usize,
    pub n_routes: usize,
    /// Names only when asked for (`--dump-names`).
    pub clusters: Vec<String>,
    pub eds_clusters: usize,
    pub endpoints: usize,
    pub listeners: Vec<String>,
    pub routes: Vec<String>,
    pub virtual_hosts: usize,
    /// Subscribed names the server reported as removed (it cannot produce them).
    pub eds_missing: Vec<String>,
    pub rds_missing: Vec<String>,
}

/// The identity of simulated client `index`, as Istio's agent would send it.
pub fn node(index: usize, ip_base: Ipv4Addr, namespace: &str, pod_prefix: &str) -> Node {
    let ip = Ipv4Addr::from(u32::from(ip_base).wrapping_add(index as u32));
    let pod = format!("{pod_prefix}-{index}");
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.to_string())),
    };
    let mut labels = Struct::default();
    labels.fields.insert("app".into(), s(pod_prefix));
    let mut md = Struct::default();
    md.fields.insert("NAMESPACE".into(), s(namespace));
    md.fields.insert("NAME".into(), s(&pod));
    md.fields.insert("INSTANCE_IPS".into(), s(&ip.to_string()));
    md.fields.insert("CLUSTER_ID".into(), s("Kubernetes"));
    md.fields.insert("SERVICE_ACCOUNT".into(), s("default"));
    md.fields.insert("ISTIO_VERSION".into(), s("1.24.0"));
    md.fields.insert(
        "LABELS".into(),
        Value {
            kind: Some(Kind::StructValue(labels)),
        },
    );
    Node {
        id: format!("sidecar~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local"),
        cluster: format!("{pod_prefix}.{namespace}"),
        metadata: Some(md),
        user_agent_name: "mizzen-xds-load".into(),
        ..Default::default()
    }
}

#[derive(Default)]
struct State {
    got_cds: bool,
    got_lds: bool,
    /// cluster name -> EDS service name (None: not an EDS cluster)
    clusters: BTreeMap<String, Option<String>>,
    eds_subscribed: BTreeSet<String>,
    /// EDS name -> endpoint count
    eds_have: BTreeMap<String, usize>,
    eds_missing: BTreeSet<String>,
    /// listener name -> RDS names it references
    listeners: BTreeMap<String, Vec<String>>,
    rds_subscribed: BTreeSet<String>,
    /// route config name -> virtual host count
    rds_have: BTreeMap<String, usize>,
    rds_missing: BTreeSet<String>,
}

fn unpack<M: Message + Default>(r: &Resource, type_url: &str) -> Result<M> {
    let any = r
        .resource
        .as_ref()
        .ok_or_else(|| anyhow!("resource {:?} has no body", r.name))?;
    if any.type_url != type_url {
        bail!(
            "resource {:?}: type {:?} in a {type_url} response",
            r.name,
            any.type_url
        );
    }
    M::decode(any.value.as_slice()).with_context(|| format!("decoding {type_url} {:?}", r.name))
}

fn rds_names(l: &Listener) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let chains = l.filter_chains.iter().chain(l.default_filter_chain.iter());
    for fc in chains {
        for f in &fc.filters {
            if let Some(name) = hcm_rds(f).with_context(|| format!("listener {:?}", l.name))? {
                out.push(name);
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn hcm_rds(f: &Filter) -> Result<Option<String>> {
    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
        return Ok(None);
    };
    if f.name != HCM_FILTER && any.type_url != HCM_TYPE {
        return Ok(None);
    }
    let hcm = HttpConnectionManager::decode(any.value.as_slice())
        .context("decoding HttpConnectionManager")?;
    Ok(match hcm.route_specifier {
        Some(RouteSpecifier::Rds(rds)) => Some(rds.route_config_name),
        _ => None,
    })
}

/// Set difference helpers for (un)subscriptions.
fn diff(want: &BTreeSet<String>, have: &BTreeSet<String>) -> (Vec<String>, Vec<String>) {
    let sub = want.difference(have).cloned().collect();
    let unsub = have.difference(want).cloned().collect();
    (sub, unsub)
}

impl State {
    /// Apply a response; returns follow-up subscription requests to send after the ACK.
    fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Result<Vec<DeltaDiscoveryRequest>> {
        let mut follow = Vec::new();
        match resp.type_url.as_str() {
            CLUSTER => {
                for r in &resp.resources {
                    let c: Cluster = unpack(r, CLUSTER)?;
                    let eds = matches!(c.cluster_discovery_type,
                        Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32);
                    let eds_name = eds.then(|| {
                        c.eds_cluster_config
                            .as_ref()
                            .map(|e| e.service_name.clone())
                            .filter(|s| !s.is_empty())
                            .unwrap_or_else(|| c.name.clone())
                    });
                    self.clusters.insert(r.name.clone(), eds_name);
                }
                for n in &resp.removed_resources {
                    self.clusters.remove(n);
                }
                self.got_cds = true;
                let want: BTreeSet<String> = self.clusters.values().flatten().cloned().collect();
                let (sub, unsub) = diff(&want, &self.eds_subscribed);
                for n in &unsub {
                    self.eds_have.remove(n);
                    self.eds_missing.remove(n);
                }
                self.eds_subscribed = want;
                if !sub.is_empty() || !unsub.is_empty() {
                    follow.push(DeltaDiscoveryRequest {
                        type_url: ENDPOINT.into(),
                        resource_names_subscribe: sub,
                        resource_names_unsubscribe: unsub,
                        ..Default::default()
                    });
                }
            }
            ENDPOINT => {
                for r in &resp.resources {
                    let cla: ClusterLoadAssignment = unpack(r, ENDPOINT)?;
                    let n = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
                    self.eds_missing.remove(&r.name);
                    self.eds_have.insert(r.name.clone(), n);
                }
                for n in &resp.removed_resources {
                    self.eds_have.remove(n);
                    if self.eds_subscribed.contains(n) {
                        self.eds_missing.insert(n.clone());
                    }
                }
            }
            LISTENER => {
                for r in &resp.resources {
                    let l: Listener = unpack(r, LISTENER)?;
                    self.listeners.insert(r.name.clone(), rds_names(&l)?);
                }
                for n in &resp.removed_resources {
                    self.listeners.remove(n);
                }
                self.got_lds = true;
                let want: BTreeSet<String> = self.listeners.values().flatten().cloned().collect();
                let (sub, unsub) = diff(&want, &self.rds_subscribed);
                for n in &unsub {
                    self.rds_have.remove(n);
                    self.rds_missing.remove(n);
                }
                self.rds_subscribed = want;
                if !sub.is_empty() || !unsub.is_empty() {
                    follow.push(DeltaDiscoveryRequest {
                        type_url: ROUTE.into(),
                        resource_names_subscribe: sub,
                        resource_names_unsubscribe: unsub,
                        ..Default::default()
                    });
                }
            }
            ROUTE => {
                for r in &resp.resources {
                    let rc: RouteConfiguration = unpack(r, ROUTE)?;
                    self.rds_missing.remove(&r.name);
                    self.rds_have.insert(r.name.clone(), rc.virtual_hosts.len());
                }
                for n in &resp.removed_resources {
                    self.rds_have.remove(n);
                    if self.rds_subscribed.contains(n) {
                        self.rds_missing.insert(n.clone());
                    }
                }
            }
            other => bail!("response for a type never subscribed: {other:?}"),
        }
        Ok(follow)
    }

    fn complete(&self) -> bool {
        self.got_cds
            && self.got_lds
            && self
                .eds_subscribed
                .iter()
                .all(|n| self.eds_have.contains_key(n) || self.eds_missing.contains(n))
            && self
                .rds_subscribed
                .iter()
                .all(|n| self.rds_have.contains_key(n) || self.rds_missing.contains(n))
    }

    fn summary(&self, names: bool) -> Summary {
        let list = |it: &mut dyn Iterator<Item = &String>| -> Vec<String> {
            if names {
                it.cloned().collect()
            } else {
                Vec::new()
            }
        };
        Summary {
            n_clusters: self.clusters.len(),
            n_listeners: self.listeners.len(),
            n_routes: self.rds_have.len(),
            clusters: list(&mut self.clusters.keys()),
            eds_clusters: self.eds_subscribed.len(),
            endpoints: self.eds_have.values().sum(),
            listeners: list(&mut self.listeners.keys()),
            routes: list(&mut self.rds_have.keys()),
            virtual_hosts: self.rds_have.values().sum(),
            eds_missing: self.eds_missing.iter().cloned().collect(),
            rds_missing: self.rds_missing.iter().cloned().collect(),
        }
    }
}

pub struct Client {
    pub index: usize,
    pub node: Node,
    pub channel: Channel,
    pub events: mpsc::UnboundedSender<Event>,
    pub stats: Arc<Stats>,
    /// Keep resource names in the summary (not only counts).
    pub names: bool,
}

impl Client {
    pub async fn run(self) {
        let (index, events) = (self.index, self.events.clone());
        if let Err(e) = self.run_inner().await {
            let _ = events.send(Event::Failed {
                client: index,
                error: format!("{e:#}"),
            });
        }
    }

    async fn run_inner(self) -> Result<()> {
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
        // Envoy starts with wildcard CDS and LDS; the node goes on the first message.
        tx.send(DeltaDiscoveryRequest {
            node: Some(self.node.clone()),
            type_url: CLUSTER.into(),
            ..Default::default()
        })
        .await?;
        tx.send(DeltaDiscoveryRequest {
            type_url: LISTENER.into(),
            ..Default::default()
        })
        .await?;
        let mut ads = AggregatedDiscoveryServiceClient::new(self.channel.clone())
            .max_decoding_message_size(256 << 20);
        let mut inbound = ads
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .context("opening the delta ADS stream")?
            .into_inner();
        let mut st = State::default();
        let mut complete = false;
        loop {
            let resp = match inbound.message().await {
                Ok(Some(r)) => r,
                Ok(None) => bail!("the server closed the stream"),
                Err(status) => bail!("ADS stream failed: {status}"),
            };
            self.stats
                .bytes
                .fetch_add(resp.encoded_len() as u64, Ordering::Relaxed);
            self.stats.responses.fetch_add(1, Ordering::Relaxed);
            self.stats
                .resources
                .fetch_add(resp.resources.len() as u64, Ordering::Relaxed);
            let follow = match st.apply(&resp) {
                Ok(f) => f,
                Err(e) => {
                    // NACK, as Envoy would, then give up: the run is invalid.
                    let _ = tx
                        .send(DeltaDiscoveryRequest {
                            type_url: resp.type_url.clone(),
                            response_nonce: resp.nonce.clone(),
                            error_detail: Some(RpcStatus {
                                code: 3,
                                message: format!("{e:#}"),
                                details: Vec::new(),
                            }),
                            ..Default::default()
                        })
                        .await;
                    return Err(e.context(format!("NACKed {} nonce {}", resp.type_url, resp.nonce)));
                }
            };
            tx.send(DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                ..Default::default()
            })
            .await
            .context("sending ACK")?;
            for req in follow {
                tx.send(req).await.context("sending subscription")?;
            }
            let at = Instant::now();
            let _ = self.events.send(Event::Response {
                client: self.index,
                at,
                version: resp.system_version_info.clone(),
            });
            if !complete && st.complete() {
                complete = true;
                let _ = self.events.send(Event::Complete {
                    client: self.index,
                    at,
                    summary: Box::new(st.summary(self.names)),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::listener::v3::FilterChain;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::Rds;
    use envoy_types::pb::google::protobuf::Any;

    fn res<M: Message>(name: &str, type_url: &str, m: &M) -> Resource {
        Resource {
            name: name.into(),
            version: "1".into(),
            resource: Some(Any {
                type_url: type_url.into(),
                value: m.encode_to_vec(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn subscribes_eds_and_rds_like_envoy() {
        let mut st = State::default();
        let eds = Cluster {
            name: "outbound|80||a.ns.svc.cluster.local".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            ..Default::default()
        };
        let pass = Cluster {
            name: "PassthroughCluster".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(
                DiscoveryType::OriginalDst as i32,
            )),
            ..Default::default()
        };
        let follow = st
            .apply(&DeltaDiscoveryResponse {
                type_url: CLUSTER.into(),
                resources: vec![
                    res(&eds.name, CLUSTER, &eds),
                    res(&pass.name, CLUSTER, &pass),
                ],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(follow.len(), 1);
        assert_eq!(follow[0].type_url, ENDPOINT);
        assert_eq!(
            follow[0].resource_names_subscribe,
            vec!["outbound|80||a.ns.svc.cluster.local"]
        );
        assert!(!st.complete());

        let hcm = HttpConnectionManager {
            route_specifier: Some(RouteSpecifier::Rds(Rds {
                route_config_name: "80".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let l = Listener {
            name: "0.0.0.0_80".into(),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: HCM_FILTER.into(),
                    config_type: Some(filter::ConfigType::TypedConfig(Any {
                        type_url: HCM_TYPE.into(),
                        value: hcm.encode_to_vec(),
                    })),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let follow = st
            .apply(&DeltaDiscoveryResponse {
                type_url: LISTENER.into(),
                resources: vec![res(&l.name, LISTENER, &l)],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(follow[0].type_url, ROUTE);
        assert_eq!(follow[0].resource_names_subscribe, vec!["80"]);
        assert!(!st.complete());

        st.apply(&DeltaDiscoveryResponse {
            type_url: ENDPOINT.into(),
            resources: vec![res(
                "outbound|80||a.ns.svc.cluster.local",
                ENDPOINT,
                &ClusterLoadAssignment {
                    cluster_name: "outbound|80||a.ns.svc.cluster.local".into(),
                    ..Default::default()
                },
            )],
            ..Default::default()
        })
        .unwrap();
        assert!(!st.complete());
        st.apply(&DeltaDiscoveryResponse {
            type_url: ROUTE.into(),
            resources: vec![res("80", ROUTE, &RouteConfiguration::default())],
            ..Default::default()
        })
        .unwrap();
        assert!(st.complete());

        // The cluster goes away: its EDS subscription is dropped.
        let follow = st
            .apply(&DeltaDiscoveryResponse {
                type_url: CLUSTER.into(),
                removed_resources: vec![eds.name.clone()],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(follow[0].resource_names_unsubscribe, vec![eds.name]);
    }

    #[test]
    fn undecodable_resource_is_an_error() {
        let mut st = State::default();
        let bad = Resource {
            name: "x".into(),
            resource: Some(Any {
                type_url: CLUSTER.into(),
                value: vec![0xff, 0xff, 0xff],
            }),
            ..Default::default()
        };
        assert!(st
            .apply(&DeltaDiscoveryResponse {
                type_url: CLUSTER.into(),
                resources: vec![bad],
                ..Default::default()
            })
            .is_err());
    }

    #[test]
    fn node_ids_are_istio_shaped_and_distinct() {
        let base: Ipv4Addr = "10.10.0.1".parse().unwrap();
        let a = node(0, base, "bench", "p");
        let b = node(300, base, "bench", "p");
        assert_eq!(a.id, "sidecar~10.10.0.1~p-0.bench~bench.svc.cluster.local");
        assert_eq!(
            b.id,
            "sidecar~10.10.1.45~p-300.bench~bench.svc.cluster.local"
        );
    }
}
