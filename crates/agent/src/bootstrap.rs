//! Envoy's bootstrap: the one static file Envoy starts from, everything else comes over ADS.
//!
//! Modelled on Istio's `envoy_bootstrap.json` template, reduced to what Mizzen needs:
//!
//! - `node`: the identity from [`crate::identity`], so the pilot can tell who is asking;
//! - `dynamic_resources`: ADS over gRPC to the static cluster `xds-grpc` (the pilot), CDS and
//!   LDS through ADS. EDS/RDS/SDS come through ADS as referenced by those resources;
//! - `static_resources`: `xds-grpc`, `prometheus_stats` (the admin API seen from the
//!   Prometheus listener) and the 15090 listener serving `/stats/prometheus`;
//! - `admin` on loopback only (it can drain and kill Envoy, so never expose it);
//! - `layered_runtime`: a static layer and an admin layer, as Istio has, so runtime flags can
//!   be flipped through the admin API while debugging.
//!
//! The readiness endpoint (15021 `/healthz/ready`) is deliberately NOT an Envoy listener: as in
//! Istio, the agent serves it itself (see [`crate::readiness`]) because "ready" means "Envoy is
//! LIVE *and* has received its first config", which Envoy alone cannot answer.

use crate::identity::{DiscoveryAddress, Identity};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// File name Istio uses for the bootstrap (`envoy-rev.json`); kept so operators find it.
pub const BOOTSTRAP_FILE: &str = "envoy-rev.json";

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("creating config directory {path}: {error}")]
    CreateDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("writing bootstrap {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("encoding bootstrap: {0}")]
    Encode(#[from] serde_json::Error),
}

/// How long Envoy waits for the first CDS and then LDS answer before finishing its own
/// initialisation without them. Istio uses 0s (wait forever), but then Envoy never starts its
/// workers while the pilot is unreachable and even the Prometheus listener stays dark. A short
/// timeout keeps metrics and admin-visible state available; it cannot make the proxy look
/// ready without config, because `/healthz/ready` also requires a successful CDS and LDS
/// update (see `crate::readiness`), and config that arrives later is applied as usual.
const INITIAL_FETCH_TIMEOUT: &str = "3s";

/// Ports and addresses the bootstrap wires together.
#[derive(Clone, Debug)]
pub struct BootstrapOptions {
    pub discovery: DiscoveryAddress,
    /// Envoy admin, bound on 127.0.0.1.
    pub admin_port: u16,
    /// Prometheus listener (`/stats/prometheus`), bound on 0.0.0.0.
    pub stats_port: u16,
    /// Incremental (delta) ADS, Istio's default since 1.22; `false` is state of the world.
    pub delta: bool,
}

/// Build the bootstrap JSON for `identity`.
pub fn build(identity: &Identity, opts: &BootstrapOptions) -> Value {
    json!({
        "node": {
            "id": identity.node_id(),
            "cluster": identity.service_cluster(),
            "metadata": identity.metadata_json(),
            "user_agent_name": "envoy",
        },
        "layered_runtime": {
            "layers": [
                {
                    "name": "global config",
                    "static_layer": {
                        // Istio raises RE2's program size limit so large generated route
                        // regexes are accepted rather than rejected (NACKed).
                        "re2.max_program_size.error_level": 32768,
                        "re2.max_program_size.warn_level": 1000,
                    }
                },
                { "name": "admin", "admin_layer": {} }
            ]
        },
        "admin": {
            "access_log": [{
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": "/dev/null"
                }
            }],
            "address": socket_address("127.0.0.1", opts.admin_port),
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": if opts.delta { "DELTA_GRPC" } else { "GRPC" },
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [{ "envoy_grpc": { "cluster_name": "xds-grpc" } }]
            },
            "cds_config": {
                "ads": {}, "initial_fetch_timeout": INITIAL_FETCH_TIMEOUT, "resource_api_version": "V3"
            },
            "lds_config": {
                "ads": {}, "initial_fetch_timeout": INITIAL_FETCH_TIMEOUT, "resource_api_version": "V3"
            }
        },
        // Istio's explicit (effectively unlimited) connection cap: without a configured
        // monitor Envoy warns at every start, and this is where an operator would lower it.
        "overload_manager": {
            "resource_monitors": [{
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                    "max_active_downstream_connections": 2147483647
                }
            }]
        },
        "static_resources": {
            "clusters": [
                xds_cluster(&opts.discovery),
                {
                    "name": "prometheus_stats",
                    "type": "STATIC",
                    "connect_timeout": "0.250s",
                    "lb_policy": "ROUND_ROBIN",
                    "load_assignment": load_assignment("prometheus_stats", "127.0.0.1", opts.admin_port),
                }
            ],
            "listeners": [prometheus_listener(opts.stats_port)]
        }
    })
}

/// The pilot. STATIC when the address is an IP (no DNS dependency at startup), STRICT_DNS
/// otherwise (`istiod.istio-system.svc`). HTTP/2 is mandatory: ADS is gRPC.
fn xds_cluster(d: &DiscoveryAddress) -> Value {
    let mut c = json!({
        "name": "xds-grpc",
        "type": if d.ip().is_some() { "STATIC" } else { "STRICT_DNS" },
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": load_assignment("xds-grpc", &d.host, d.port),
        // Istio's values: the ADS stream is long-lived and idle most of the time, so keepalive
        // detects a dead pilot (or a NAT that dropped the flow) and reconnects.
        "upstream_connection_options": {
            "tcp_keepalive": { "keepalive_time": 300 }
        },
        "circuit_breakers": {
            "thresholds": [
                { "priority": "DEFAULT", "max_connections": 100000, "max_pending_requests": 100000,
                  "max_requests": 100000 },
                { "priority": "HIGH", "max_connections": 100000, "max_pending_requests": 100000,
                  "max_requests": 100000 }
            ]
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {
                    "http2_protocol_options": {
                        "connection_keepalive": { "interval": "30s", "timeout": "10s" }
                    }
                }
            }
        }
    });
    if d.ip().is_none() {
        // Prefer IPv4 but accept an IPv6-only pilot. (Istio also sets `respect_dns_ttl`,
        // deprecated in Envoy 1.40, so it is left out.)
        if let Some(obj) = c.as_object_mut() {
            obj.insert("dns_lookup_family".into(), json!("V4_PREFERRED"));
        }
    }
    c
}

/// Istio's 15090 listener: only `/stats/prometheus` is routed to the admin API, so the
/// (powerful) rest of the admin API stays on loopback.
fn prometheus_listener(port: u16) -> Value {
    json!({
        "name": format!("0.0.0.0_{port}"),
        "address": socket_address("0.0.0.0", port),
        "filter_chains": [{
            "filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "codec_type": "AUTO",
                    "stat_prefix": "stats",
                    "route_config": {
                        "virtual_hosts": [{
                            "name": "backend",
                            "domains": ["*"],
                            "routes": [{
                                "match": { "prefix": "/stats/prometheus" },
                                // The admin serves the same path; rewriting to itself keeps
                                // the query string (`?usedonly`, `?filter=`) intact.
                                "route": {
                                    "cluster": "prometheus_stats",
                                    "prefix_rewrite": "/stats/prometheus"
                                }
                            }]
                        }]
                    },
                    "http_filters": [{
                        "name": "envoy.filters.http.router",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                        }
                    }]
                }
            }]
        }]
    })
}

fn socket_address(address: &str, port: u16) -> Value {
    json!({ "socket_address": { "protocol": "TCP", "address": address, "port_value": port } })
}

fn load_assignment(cluster: &str, address: &str, port: u16) -> Value {
    json!({
        "cluster_name": cluster,
        "endpoints": [{
            "lb_endpoints": [{ "endpoint": { "address": socket_address(address, port) } }]
        }]
    })
}

/// Workload identity wiring for the bootstrap (only when the agent has a CA to talk to).
#[derive(Clone, Debug)]
pub struct BootstrapSecurity {
    /// The agent's SDS socket (see [`crate::sds`]).
    pub sds_socket: PathBuf,
    /// Reach the pilot over TLS (its 15012 port), presenting `default` and verifying the
    /// pilot against `ROOTCA` and istiod's name, as Istio's agents did before the xDS proxy.
    pub xds_tls: bool,
}

/// The `sds_config` every SDS reference in Envoy config uses: the `sds-grpc` cluster,
/// SotW gRPC (Envoy's default for SDS).
pub fn sds_config() -> Value {
    json!({
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "set_node_on_first_message_only": true,
            "grpc_services": [{ "envoy_grpc": { "cluster_name": crate::sds::SDS_CLUSTER } }]
        },
        "resource_api_version": "V3"
    })
}

/// Add the `sds-grpc` cluster (a pipe to the agent's SDS socket), and TLS on `xds-grpc` when
/// asked, to a bootstrap from [`build`].
pub fn add_security(bootstrap: &mut Value, sec: &BootstrapSecurity) {
    let sds = json!({
        "name": crate::sds::SDS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": crate::sds::SDS_CLUSTER,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                "pipe": { "path": sec.sds_socket.to_string_lossy() }
            }}}]}]
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": { "http2_protocol_options": {} }
            }
        }
    });
    let Some(clusters) = bootstrap["static_resources"]["clusters"].as_array_mut() else {
        return;
    };
    if sec.xds_tls {
        if let Some(xds) = clusters.iter_mut().find(|c| c["name"] == "xds-grpc") {
            xds["transport_socket"] = json!({
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "sni": mizzen_ca::client::PILOT_SAN,
                    "common_tls_context": {
                        "alpn_protocols": ["h2"],
                        "tls_certificate_sds_secret_configs": [{
                            "name": crate::sds::WORKLOAD_SECRET, "sds_config": sds_config()
                        }],
                        "combined_validation_context": {
                            "default_validation_context": {
                                "match_typed_subject_alt_names": [{
                                    "san_type": "DNS",
                                    "matcher": { "exact": mizzen_ca::client::PILOT_SAN }
                                }]
                            },
                            "validation_context_sds_secret_config": {
                                "name": crate::sds::ROOT_SECRET, "sds_config": sds_config()
                            }
                        }
                    }
                }
            });
        }
    }
    clusters.push(sds);
}

/// Write `bootstrap` to `<dir>/envoy-rev.json` (creating `dir`) and return the file path.
/// Written to a temporary name and renamed, so a restarting Envoy never reads half a file.
pub fn write(dir: &Path, bootstrap: &Value) -> Result<PathBuf, BootstrapError> {
    std::fs::create_dir_all(dir).map_err(|error| BootstrapError::CreateDir {
        path: dir.to_path_buf(),
        error,
    })?;
    let path = dir.join(BOOTSTRAP_FILE);
    let tmp = dir.join(format!(".{BOOTSTRAP_FILE}.tmp"));
    let bytes = serde_json::to_vec_pretty(bootstrap)?;
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|error| BootstrapError::Write {
            path: path.clone(),
            error,
        })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{HostInfo, IdentityInput, ProxyType};
    use std::collections::BTreeMap;

    fn identity() -> Identity {
        let input = IdentityInput {
            pod_name: Some("gw-7d4f8b9c6d-x7k2q".into()),
            namespace: Some("istio-system".into()),
            ip: Some("10.0.0.5".into()),
            labels: vec![
                "istio=ingressgateway".into(),
                "app=istio-ingressgateway".into(),
            ],
            ..Default::default()
        };
        let host = HostInfo {
            hostname: "h".into(),
            ipv4: None,
        };
        Identity::resolve(ProxyType::Router, &input, &BTreeMap::new(), &host).unwrap()
    }

    fn opts(discovery: &str) -> BootstrapOptions {
        BootstrapOptions {
            discovery: discovery.parse().unwrap(),
            admin_port: 15000,
            stats_port: 15090,
            delta: false,
        }
    }

    fn cluster<'a>(b: &'a Value, name: &str) -> &'a Value {
        b["static_resources"]["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no cluster {name}"))
    }

    #[test]
    fn node_and_ads() {
        let b = build(&identity(), &opts("127.0.0.1:15010"));
        assert_eq!(
            b["node"]["id"],
            "router~10.0.0.5~gw-7d4f8b9c6d-x7k2q.istio-system~istio-system.svc.cluster.local"
        );
        assert_eq!(b["node"]["cluster"], "istio-ingressgateway.istio-system");
        assert_eq!(b["node"]["metadata"]["LABELS"]["istio"], "ingressgateway");
        assert_eq!(b["node"]["metadata"]["NAMESPACE"], "istio-system");
        let ads = &b["dynamic_resources"]["ads_config"];
        assert_eq!(ads["api_type"], "GRPC");
        assert_eq!(ads["transport_api_version"], "V3");
        assert_eq!(ads["set_node_on_first_message_only"], true);
        assert_eq!(
            ads["grpc_services"][0]["envoy_grpc"]["cluster_name"],
            "xds-grpc"
        );
        for k in ["cds_config", "lds_config"] {
            assert_eq!(b["dynamic_resources"][k]["ads"], json!({}));
            assert_eq!(b["dynamic_resources"][k]["resource_api_version"], "V3");
        }
    }

    #[test]
    fn xds_cluster_static_or_dns_and_http2() {
        let b = build(&identity(), &opts("10.96.0.10:15010"));
        let c = cluster(&b, "xds-grpc");
        assert_eq!(c["type"], "STATIC");
        assert_eq!(c["connect_timeout"], "1s");
        let addr = &c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
            ["socket_address"];
        assert_eq!(addr["address"], "10.96.0.10");
        assert_eq!(addr["port_value"], 15010);
        let po = &c["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
        assert_eq!(
            po["@type"],
            "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        );
        assert!(po["explicit_http_config"]["http2_protocol_options"].is_object());
        assert!(c["upstream_connection_options"]["tcp_keepalive"].is_object());
        assert!(c.get("dns_lookup_family").is_none());

        let b = build(&identity(), &opts("istiod.istio-system.svc:15012"));
        let c = cluster(&b, "xds-grpc");
        assert_eq!(c["type"], "STRICT_DNS");
        assert_eq!(c["dns_lookup_family"], "V4_PREFERRED");
    }

    #[test]
    fn admin_stats_and_runtime() {
        let mut o = opts("127.0.0.1:15010");
        o.admin_port = 19000;
        o.stats_port = 19090;
        let b = build(&identity(), &o);
        let admin = &b["admin"]["address"]["socket_address"];
        assert_eq!(admin["address"], "127.0.0.1");
        assert_eq!(admin["port_value"], 19000);
        assert_eq!(
            b["admin"]["access_log"][0]["typed_config"]["path"],
            "/dev/null"
        );

        let prom = cluster(&b, "prometheus_stats");
        assert_eq!(
            prom["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                ["socket_address"]["port_value"],
            19000
        );
        let listeners = b["static_resources"]["listeners"].as_array().unwrap();
        assert_eq!(
            listeners.len(),
            1,
            "15021 is served by the agent, not Envoy"
        );
        let l = &listeners[0];
        assert_eq!(l["address"]["socket_address"]["address"], "0.0.0.0");
        assert_eq!(l["address"]["socket_address"]["port_value"], 19090);
        let hcm = &l["filter_chains"][0]["filters"][0]["typed_config"];
        let route = &hcm["route_config"]["virtual_hosts"][0]["routes"][0];
        assert_eq!(route["match"]["prefix"], "/stats/prometheus");
        assert_eq!(route["route"]["cluster"], "prometheus_stats");

        assert_eq!(
            b["overload_manager"]["resource_monitors"][0]["name"],
            "envoy.resource_monitors.global_downstream_max_connections"
        );
        let layers = b["layered_runtime"]["layers"].as_array().unwrap();
        assert!(layers.iter().any(|l| l.get("static_layer").is_some()));
        assert!(layers.iter().any(|l| l.get("admin_layer").is_some()));
    }

    #[test]
    fn security_adds_sds_cluster_and_xds_tls() {
        let mut b = build(&identity(), &opts("127.0.0.1:15012"));
        let plain = b.clone();
        add_security(
            &mut b,
            &BootstrapSecurity {
                sds_socket: "/tmp/x/workload-spiffe-uds/socket".into(),
                xds_tls: true,
            },
        );
        let sds = cluster(&b, "sds-grpc");
        assert_eq!(
            sds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                ["pipe"]["path"],
            "/tmp/x/workload-spiffe-uds/socket"
        );
        let tls = &cluster(&b, "xds-grpc")["transport_socket"]["typed_config"];
        assert_eq!(tls["sni"], "istiod.istio-system.svc");
        let ctx = &tls["common_tls_context"];
        assert_eq!(
            ctx["tls_certificate_sds_secret_configs"][0]["name"],
            "default"
        );
        assert_eq!(
            ctx["combined_validation_context"]["validation_context_sds_secret_config"]["name"],
            "ROOTCA"
        );
        assert_eq!(
            ctx["tls_certificate_sds_secret_configs"][0]["sds_config"]["api_config_source"]
                ["grpc_services"][0]["envoy_grpc"]["cluster_name"],
            "sds-grpc"
        );
        assert!(cluster(&plain, "xds-grpc")
            .get("transport_socket")
            .is_none());
    }

    #[test]
    fn write_creates_dir_and_file() {
        let dir =
            std::env::temp_dir().join(format!("mizzen-bootstrap-test-{}", std::process::id()));
        let b = build(&identity(), &opts("127.0.0.1:15010"));
        let path = write(&dir.join("nested"), &b).unwrap();
        assert!(path.ends_with("nested/envoy-rev.json"));
        let back: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, b);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
