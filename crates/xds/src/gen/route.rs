//! RDS: VirtualService -> RouteConfiguration. (Placeholder signatures; being written.)
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use mizzen_model::{Proxy, PushContext};

pub fn route_names(_proxy: &Proxy, _push: &PushContext) -> Vec<String> {
    Vec::new()
}

pub fn generate(_proxy: &Proxy, _push: &PushContext, _name: &str) -> Option<RouteConfiguration> {
    None
}
