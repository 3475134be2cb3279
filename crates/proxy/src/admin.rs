//! The proxy's own ports, Istio's fixed points:
//!
//! - admin on 127.0.0.1:ADMIN (15000): `/config_dump` (the snapshot in Envoy's dump shape,
//!   summarized), `/clusters`, `/stats` (text, or `?format=json`), `/ready`,
//!   `/quitquitquit` (drain and exit), `/logging` (Envoy's: list the loggers and their
//!   levels; POST `?level=L` sets them all, `?<logger>=L` one, through the binary's
//!   [`LogControl`]);
//! - status on STATUS (15021): `/healthz/ready`, 200 only once the first complete config
//!   (CDS, LDS and the EDS/RDS they reference) has arrived and, for a proxy with a mesh
//!   identity, its workload certificate;
//! - Prometheus on STATS (15090): `/stats/prometheus`.

use crate::config::{DiscoveryKind, LbPolicy, NetworkFilter, RouteSource};
use crate::{ProxyError, ProxyOptions, Shared};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpListener;
use tracing::{debug, info};

#[derive(Clone, Copy)]
enum Port {
    Admin,
    Status,
    Stats,
}

/// Run-time log levels, as the binary's subscriber implements them (the library does not own
/// the subscriber). Loggers are named parts of the proxy (`http`, `cluster`, `xds` ...).
pub trait LogControl: Send + Sync + std::fmt::Debug {
    /// Every logger and its level, sorted by name.
    fn levels(&self) -> Vec<(String, String)>;
    /// Set one logger's level, or every logger's (`None`).
    fn set(&self, logger: Option<&str>, level: &str) -> Result<(), LogError>;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogError {
    #[error("unknown logger {0:?}")]
    UnknownLogger(String),
    #[error("unknown level {0:?} (trace, debug, info, warning, error, critical, off)")]
    UnknownLevel(String),
    #[error("applying the new levels: {0}")]
    Apply(String),
}

/// Bind the three ports (failing fast if one is taken) and serve them in the background.
pub async fn serve(shared: &Arc<Shared>, opts: &ProxyOptions) -> Result<(), ProxyError> {
    let ports = [
        (
            Port::Admin,
            "admin",
            SocketAddr::from((Ipv4Addr::LOCALHOST, opts.admin_port)),
        ),
        (
            Port::Status,
            "status",
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, opts.status_port)),
        ),
        (
            Port::Stats,
            "stats",
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, opts.stats_port)),
        ),
    ];
    for (port, what, addr) in ports {
        let sock = TcpListener::bind(addr)
            .await
            .map_err(|source| ProxyError::Bind { what, addr, source })?;
        info!(port = what, %addr, "serving");
        tokio::spawn(accept(shared.clone(), port, sock, opts.log_control.clone()));
    }
    Ok(())
}

async fn accept(
    shared: Arc<Shared>,
    port: Port,
    sock: TcpListener,
    logs: Option<Arc<dyn LogControl>>,
) {
    loop {
        let Ok((stream, _)) = sock.accept().await else {
            continue;
        };
        let shared = shared.clone();
        let logs = logs.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                let logs = logs.clone();
                async move { Ok::<_, Infallible>(handle(&shared, port, req, logs.as_deref())) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(error = %e, "admin connection");
            }
        });
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

fn handle(
    shared: &Shared,
    port: Port,
    req: Request<Incoming>,
    logs: Option<&dyn LogControl>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let json_format = req.uri().query().is_some_and(|q| q.contains("format=json"));
    match (port, path) {
        (Port::Status, "/healthz/ready") | (Port::Admin, "/ready") => {
            if shared.is_ready() {
                reply(StatusCode::OK, "text/plain", "LIVE\n")
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "PRE_INITIALIZING\n",
                )
            }
        }
        (Port::Stats, "/stats/prometheus") => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            shared.metrics.encode(),
        ),
        (Port::Admin, "/config_dump") => reply(
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&config_dump(shared)).unwrap_or_default(),
        ),
        (Port::Admin, "/clusters") => reply(StatusCode::OK, "text/plain", clusters(shared)),
        (Port::Admin, "/stats") => {
            let stats = stats(shared);
            if json_format {
                let list: Vec<Value> = stats
                    .iter()
                    .map(|(k, v)| json!({"name": k, "value": v}))
                    .collect();
                reply(
                    StatusCode::OK,
                    "application/json",
                    json!({ "stats": list }).to_string(),
                )
            } else {
                let text: String = stats.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
                reply(StatusCode::OK, "text/plain", text)
            }
        }
        (Port::Admin, "/logging") => {
            let (status, text) = logging(
                logs,
                req.method() == http::Method::POST,
                req.uri().query().unwrap_or(""),
            );
            reply(status, "text/plain", text)
        }
        (Port::Admin, "/quitquitquit") => {
            shared.shutdown();
            reply(StatusCode::OK, "text/plain", "OK\n")
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Counters named like Envoy's where an Envoy user would look for them.
/// Envoy's `/logging`: without parameters the loggers and their levels; changes only by POST
/// (a GET that would change state gets 405, as Envoy's mutating endpoints do). Unknown
/// loggers or levels get 404 with the reason, changing nothing.
fn logging(logs: Option<&dyn LogControl>, post: bool, query: &str) -> (StatusCode, String) {
    let Some(logs) = logs else {
        return (
            StatusCode::NOT_FOUND,
            "run-time log levels are not available in this process\n".into(),
        );
    };
    let params: Vec<(&str, &str)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    if !params.is_empty() && !post {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            "This command needs to be sent as a POST\n".into(),
        );
    }
    for (k, v) in params {
        let logger = (k != "level").then_some(k);
        if let Err(e) = logs.set(logger, v) {
            return (StatusCode::NOT_FOUND, format!("error: {e}\n"));
        }
        info!(
            logger = logger.unwrap_or("*"),
            level = v,
            "log level changed"
        );
    }
    let mut text = String::from("active loggers:\n");
    for (name, level) in logs.levels() {
        text.push_str(&format!("  {name}: {level}\n"));
    }
    (StatusCode::OK, text)
}

fn stats(shared: &Shared) -> Vec<(String, u64)> {
    let r = &shared.rejected;
    let snap = shared.snapshot();
    let mut out = vec![
        (
            "cluster_manager.cds.update_rejected".into(),
            r.cds.load(Ordering::Relaxed),
        ),
        (
            "cluster_manager.active_clusters".into(),
            snap.clusters.len() as u64,
        ),
        (
            "listener_manager.lds.update_rejected".into(),
            r.lds.load(Ordering::Relaxed),
        ),
        (
            "listener_manager.total_listeners_active".into(),
            snap.listeners.len() as u64,
        ),
        (
            "mizzen.eds.update_rejected".into(),
            r.eds.load(Ordering::Relaxed),
        ),
        (
            "mizzen.rds.update_rejected".into(),
            r.rds.load(Ordering::Relaxed),
        ),
        (
            "mizzen.xds.connected".into(),
            u64::from(shared.xds_connected()),
        ),
        ("mizzen.xds.responses".into(), shared.xds_responses()),
        ("server.state".into(), if shared.is_ready() { 0 } else { 2 }),
    ];
    // AuthorizationPolicy (RBAC filter) counters, named as Envoy names them.
    out.extend(crate::rbac::stats());
    out
}

fn clusters(shared: &Shared) -> String {
    let snap = shared.snapshot();
    let mut names: Vec<&String> = snap.clusters.keys().collect();
    names.sort();
    let mut out = String::new();
    for n in names {
        let Some(c) = snap.clusters.get(n) else {
            continue;
        };
        if c.hosts.is_empty() {
            out.push_str(&format!(
                "{n}::default_priority::max_connections::4294967295\n"
            ));
        }
        for h in &c.hosts {
            let a = h.authority();
            out.push_str(&format!(
                "{n}::{a}::rq_active::{}\n",
                h.active.load(Ordering::Relaxed)
            ));
            out.push_str(&format!("{n}::{a}::weight::{}\n", h.endpoint.weight));
            out.push_str(&format!("{n}::{a}::health_flags::healthy\n"));
        }
    }
    out
}

fn kind(k: DiscoveryKind) -> &'static str {
    match k {
        DiscoveryKind::Eds => "EDS",
        DiscoveryKind::Static => "STATIC",
        DiscoveryKind::StrictDns => "STRICT_DNS",
        DiscoveryKind::OriginalDst => "ORIGINAL_DST",
    }
}

fn lb(l: LbPolicy) -> &'static str {
    match l {
        LbPolicy::RoundRobin => "ROUND_ROBIN",
        LbPolicy::LeastRequest => "LEAST_REQUEST",
        LbPolicy::Random => "RANDOM",
        LbPolicy::ClusterProvided => "CLUSTER_PROVIDED",
        LbPolicy::RingHash { .. } => "RING_HASH",
        LbPolicy::Maglev { .. } => "MAGLEV",
    }
}

/// The snapshot in the shape of Envoy's `/config_dump` (names, addresses, domains, routes,
/// endpoints), enough for `proxy-config`-style tooling and tests; not every field.
fn config_dump(shared: &Shared) -> Value {
    let snap = shared.snapshot();
    let res = &snap.resources;
    let version = |t: &str| res.versions.get(t).cloned().unwrap_or_default();
    let clusters: Vec<Value> = res
        .clusters
        .values()
        .map(|c| {
            json!({"version_info": version(crate::xds::CLUSTER), "cluster": {
                "name": c.name, "type": kind(c.kind), "lb_policy": lb(c.lb),
                "connect_timeout": format!("{}s", c.connect_timeout.as_secs_f64()),
                "http2": c.http2,
            }})
        })
        .collect();
    let listeners: Vec<Value> = res
        .listeners
        .values()
        .map(|l| {
            let chains: Vec<Value> = l
                .filter_chains
                .iter()
                .chain(l.default_chain.iter())
                .map(|c| {
                    let filter = match &c.filter {
                        NetworkFilter::Http(h) => match &h.routes {
                            RouteSource::Rds(n) => json!({"http_connection_manager": {"rds": n}}),
                            RouteSource::Inline(rc) => json!({"http_connection_manager": {"route_config": rc.name}}),
                        },
                        NetworkFilter::Tcp(t) => json!({"tcp_proxy": {"stat_prefix": t.stat_prefix}}),
                    };
                    json!({"name": c.name, "destination_port": c.matcher.destination_port,
                           "transport_protocol": c.matcher.transport_protocol,
                           "application_protocols": c.matcher.application_protocols, "filter": filter})
                })
                .collect();
            json!({"name": l.name, "active_state": {"version_info": version(crate::xds::LISTENER), "listener": {
                "name": l.name,
                "address": {"socket_address": {"address": l.address.ip().to_string(), "port_value": l.address.port()}},
                "bind_to_port": l.bind_to_port, "use_original_dst": l.use_original_dst,
                "transparent": l.transparent,
                "filter_chains": chains,
            }}})
        })
        .collect();
    let routes: Vec<Value> = res
        .routes
        .values()
        .map(|rc| {
            let vhs: Vec<Value> = rc
                .virtual_hosts
                .iter()
                .map(|vh| {
                    let routes: Vec<&str> = vh.routes.iter().map(|r| r.name.as_str()).collect();
                    json!({"name": vh.name, "domains": vh.domains, "routes": routes})
                })
                .collect();
            json!({"version_info": version(crate::xds::ROUTE), "route_config": {"name": rc.name, "virtual_hosts": vhs}})
        })
        .collect();
    let endpoints: Vec<Value> = res
        .endpoints
        .values()
        .map(|e| {
            let eps: Vec<Value> = e
                .endpoints
                .iter()
                .map(|ep| json!({"address": ep.host, "port": ep.port, "weight": ep.weight, "healthy": ep.healthy}))
                .collect();
            json!({"endpoint_config": {"cluster_name": e.cluster, "endpoints": eps}})
        })
        .collect();
    json!({
        "configs": [
            {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump", "dynamic_active_clusters": clusters},
            {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump", "dynamic_listeners": listeners},
            {"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump", "dynamic_route_configs": routes},
            {"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump", "dynamic_endpoint_configs": endpoints},
        ],
        "mizzen": {"ready": shared.is_ready(), "xds_connected": shared.xds_connected()},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what `/logging` asks for; the real control is the binary's reload handle.
    #[derive(Debug, Default)]
    struct Levels(Mutex<Vec<(String, String)>>);

    impl LogControl for Levels {
        fn levels(&self) -> Vec<(String, String)> {
            self.0.lock().map(|l| l.clone()).unwrap_or_default()
        }
        fn set(&self, logger: Option<&str>, level: &str) -> Result<(), LogError> {
            if level != "debug" && level != "info" {
                return Err(LogError::UnknownLevel(level.into()));
            }
            let mut l = self.0.lock().map_err(|e| LogError::Apply(e.to_string()))?;
            for (name, lvl) in l.iter_mut() {
                if logger.is_none_or(|x| x == name) {
                    *lvl = level.into();
                }
            }
            Ok(())
        }
    }

    #[test]
    fn logging_lists_changes_by_post_and_rejects_bad_input() {
        let l = Levels(Mutex::new(vec![
            ("http".into(), "info".into()),
            ("xds".into(), "info".into()),
        ]));
        let (s, t) = logging(Some(&l), false, "");
        assert_eq!(
            (s, t.as_str()),
            (
                StatusCode::OK,
                "active loggers:\n  http: info\n  xds: info\n"
            )
        );
        assert_eq!(
            logging(Some(&l), false, "http=debug").0,
            StatusCode::METHOD_NOT_ALLOWED
        );
        let (s, t) = logging(Some(&l), true, "http=debug");
        assert_eq!(s, StatusCode::OK);
        assert!(t.contains("http: debug") && t.contains("xds: info"), "{t}");
        let (s, t) = logging(Some(&l), true, "level=loud");
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(t.contains("loud"), "{t}");
        assert!(logging(Some(&l), true, "level=debug")
            .1
            .contains("xds: debug"));
        assert_eq!(logging(None, false, "").0, StatusCode::NOT_FOUND);
    }
}
