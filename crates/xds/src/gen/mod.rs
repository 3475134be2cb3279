//! Generators: `(proxy, push) -> resources` for each xDS type. Pure functions: no I/O, no
//! locks, deterministic output (sorted), so the server can diff versions cheaply.
//!
//! Besides one module per xDS type: [`rbac`] (AuthorizationPolicy) and [`jwt`]
//! (RequestAuthentication) build the filters that [`listener`] puts into inbound and gateway
//! listeners.
//!
//! Per-proxy output beyond selection: [`endpoint`] assigns EDS priorities and locality weights
//! relative to the proxy's locality (`localityLbSetting`, as istiod), [`cluster`] marks the
//! clusters that weigh localities, and [`listener`] makes the capture listeners transparent
//! for proxies whose metadata says `INTERCEPTION_MODE=TPROXY`.

pub mod cluster;
pub mod endpoint;
pub mod jwt;
pub mod listener;
pub mod rbac;
pub mod route;
pub mod tls;

use crate::any;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::google::protobuf::{Any, Duration};
use mizzen_model::{Proxy, PushContext};

/// One named resource ready to send.
#[derive(Clone, Debug, PartialEq)]
pub struct Named {
    pub name: String,
    pub resource: Any,
}

/// Generate every resource of `type_url` for `proxy`. `names` restricts the result for
/// non-wildcard types (EDS, RDS); `None` means "all this proxy should have".
pub fn generate(
    type_url: &str,
    proxy: &Proxy,
    push: &PushContext,
    names: Option<&[String]>,
) -> Vec<Named> {
    let mut out = match type_url {
        any::CLUSTER => cluster::generate(proxy, push)
            .into_iter()
            .map(|c| Named {
                name: c.name.clone(),
                resource: any::pack(&c),
            })
            .collect(),
        any::LISTENER => listener::generate(proxy, push)
            .into_iter()
            .map(|l| Named {
                name: l.name.clone(),
                resource: any::pack(&l),
            })
            .collect(),
        any::ENDPOINT => {
            let wanted: Vec<String> = match names {
                Some(n) => n.to_vec(),
                None => cluster::eds_cluster_names(proxy, push),
            };
            wanted
                .iter()
                .map(|n| endpoint::generate(proxy, push, n))
                .map(|cla| Named {
                    name: cla.cluster_name.clone(),
                    resource: any::pack(&cla),
                })
                .collect()
        }
        any::ROUTE => {
            let wanted: Vec<String> = match names {
                Some(n) => n.to_vec(),
                None => route::route_names(proxy, push),
            };
            wanted
                .iter()
                .filter_map(|n| route::generate(proxy, push, n))
                .map(|rc| Named {
                    name: rc.name.clone(),
                    resource: any::pack(&rc),
                })
                .collect()
        }
        _ => Vec::new(),
    };
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out.dedup_by(|a, b| a.name == b.name);
    out
}

pub(crate) fn duration(d: std::time::Duration) -> Duration {
    Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

pub(crate) fn secs(s: i64) -> Duration {
    Duration {
        seconds: s,
        nanos: 0,
    }
}

/// `{ads: {}, resource_api_version: V3}`
pub(crate) fn ads_config_source() -> core::ConfigSource {
    core::ConfigSource {
        resource_api_version: core::ApiVersion::V3 as i32,
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            core::AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

pub(crate) fn socket_address(address: &str, port: u16) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: address.to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(
                port,
            ))),
            ..Default::default()
        })),
    }
}

/// Parse `outbound|PORT|SUBSET|HOST` (and `inbound|PORT||`).
pub fn parse_cluster_name(name: &str) -> Option<(&str, u16, &str, &str)> {
    let mut it = name.splitn(4, '|');
    let dir = it.next()?;
    let port = it.next()?.parse().ok()?;
    let subset = it.next()?;
    let host = it.next()?;
    Some((dir, port, subset, host))
}

pub fn outbound_cluster_name(port: u16, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}
