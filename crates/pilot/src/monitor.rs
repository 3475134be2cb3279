//! The monitoring port (15014): readiness, Prometheus metrics and debug views.

use crate::Shared;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;
use tracing::debug;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "monitoring accept failed");
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(req, &shared)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn json(v: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(v) {
        Ok(s) => respond(StatusCode::OK, "application/json", s),
        Err(e) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            e.to_string(),
        ),
    }
}

fn handle(req: Request<hyper::body::Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/ready" => respond(StatusCode::OK, "text/plain", "ready\n".into()),
        "/metrics" => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &shared.registry) {
                Ok(()) => respond(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    out,
                ),
                Err(e) => respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        "/debug/syncz" => json(&shared.discovery.status.snapshot()),
        "/debug/configz" => {
            let Ok(st) = shared.store.lock() else {
                return respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "store poisoned".into(),
                );
            };
            let resources: Vec<serde_json::Value> = st
                .resources()
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "kind": r.kind.to_string(),
                        "namespace": r.meta.namespace,
                        "name": r.meta.name,
                        "file": r.origin.file,
                        "document": r.origin.document,
                        "spec": r.spec,
                    })
                })
                .collect();
            let errors: Vec<serde_json::Value> = st
                .errors
                .iter()
                .map(|e| {
                    serde_json::json!({
                        "file": e.file,
                        "document": e.document,
                        "kind": e.kind,
                        "namespace": e.namespace,
                        "name": e.name,
                        "field": e.field,
                        "message": e.message,
                        "text": e.to_string(),
                    })
                })
                .collect();
            let version = shared.push.borrow().version.clone();
            json(&serde_json::json!({
                "config_dir": shared.config_dir,
                "version": version,
                "resources": resources,
                "errors": errors,
                "ignored_objects": st.ignored,
            }))
        }
        "/debug/authorizationz" => {
            let push = shared.push.borrow().clone();
            json(&crate::authz::debug_json(&push, &shared.jwks.snapshot()))
        }
        "/debug/push_status" | "/debug/pushz" => {
            let push = shared.push.borrow().clone();
            json(&serde_json::json!({
                "version": push.version,
                "services": push.services.len(),
                "endpoints": push.endpoints.values().map(Vec::len).sum::<usize>(),
                "virtual_services": push.virtual_services.len(),
                "destination_rules": push.destination_rules.len(),
                "gateways": push.gateways.len(),
                "connected_proxies": shared.discovery.status.connected(),
            }))
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /ready, /metrics, /debug/syncz, /debug/configz, /debug/push_status, /debug/authorizationz\n"
                .into(),
        ),
    }
}
