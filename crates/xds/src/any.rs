//! Type URLs and `Any` packing.

use envoy_types::pb::google::protobuf::Any;
use prost::Message;

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// Pack a message as `Any` with the given fully-qualified proto name.
pub fn pack<M: Message>(type_name: &str, msg: &M) -> Any {
    Any {
        type_url: format!("type.googleapis.com/{type_name}"),
        value: msg.encode_to_vec(),
    }
}
