//! Type URLs and `Any` packing.

use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// Istio's push order (seed 002): clusters before the endpoints they need, listeners before
/// the routes they reference, so a proxy never points at something it does not have yet.
pub const PUSH_ORDER: [&str; 4] = [CLUSTER, ENDPOINT, LISTENER, ROUTE];

/// Short name for logs and metrics (`cds`, `eds`, `lds`, `rds`).
pub fn short(type_url: &str) -> &'static str {
    match type_url {
        CLUSTER => "cds",
        ENDPOINT => "eds",
        LISTENER => "lds",
        ROUTE => "rds",
        _ => "unknown",
    }
}

/// Pack a message as `Any` with its own type URL.
pub fn pack<M: Message + Name>(msg: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: msg.encode_to_vec(),
    }
}

/// The message in `any` if it is an `M` (by type URL) and decodes.
pub fn unpack_any<M: Message + Name + Default>(any: &Any) -> Option<M> {
    if any.type_url != M::type_url() {
        return None;
    }
    M::decode(any.value.as_slice()).ok()
}
