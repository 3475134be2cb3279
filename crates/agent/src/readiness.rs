//! The agent's status server: `/healthz/ready` on the status port (15021), as Istio's agent.
//!
//! Kubernetes (and the local mesh, and tests) decide whether to send traffic to this proxy
//! from this endpoint, so "ready" must mean "able to route": Envoy's admin `/ready` says
//! `LIVE` *and* Envoy has accepted at least one CDS and one LDS update. Envoy alone reports
//! LIVE after its initial fetch times out even with no config at all, which is why the second
//! condition exists (Istio's `ready.Probe` checks the same two stats).

use crate::admin::AdminClient;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Stats that prove Envoy got its first config from the pilot.
const CDS_SUCCESS: &str = "cluster_manager.cds.update_success";
const LDS_SUCCESS: &str = "listener_manager.lds.update_success";

/// The outcome of one readiness check; `NotReady` carries the reason shown to whoever probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    NotReady(String),
}

/// Ask Envoy's admin whether it is LIVE and has received CDS and LDS.
pub async fn check(admin: &AdminClient) -> Readiness {
    match admin.get("/ready").await {
        Ok((200, body)) if body.trim() == "LIVE" => {}
        Ok((_, body)) => return Readiness::NotReady(format!("Envoy state {}", body.trim())),
        Err(e) => return Readiness::NotReady(format!("Envoy admin unreachable: {e}")),
    }
    // `filter` is a regex; a plain substring avoids URL-escaping one and still narrows the
    // output to a few lines.
    let stats = match admin.get("/stats?filter=update_success").await {
        Ok((200, body)) => body,
        Ok((code, _)) => return Readiness::NotReady(format!("Envoy /stats answered {code}")),
        Err(e) => return Readiness::NotReady(format!("Envoy admin unreachable: {e}")),
    };
    let cds = stat_value(&stats, CDS_SUCCESS).unwrap_or(0);
    let lds = stat_value(&stats, LDS_SUCCESS).unwrap_or(0);
    if cds >= 1 && lds >= 1 {
        Readiness::Ready
    } else {
        Readiness::NotReady(format!(
            "config not received from XDS server (is the pilot running?): cds updates: {cds} \
             successful, lds updates: {lds} successful"
        ))
    }
}

/// Parse `name: value` from Envoy's plain-text `/stats` output.
fn stat_value(stats: &str, name: &str) -> Option<u64> {
    stats.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Serve `/healthz/ready` on `listener` until `stop` turns true. While `draining` is set the
/// probe answers 503, so load balancers stop sending new traffic before Envoy goes away.
pub async fn serve(
    listener: TcpListener,
    admin: AdminClient,
    draining: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Transient (EMFILE, aborted handshakes): keep serving, but don't spin.
                tracing::warn!(error = %e, "status server accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let admin = admin.clone();
        let draining = draining.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, admin.clone(), draining.clone()));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(%peer, error = %e, "status connection error");
            }
        });
    }
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    admin: AdminClient,
    draining: Arc<AtomicBool>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match req.uri().path() {
        "/healthz/ready" => {
            if draining.load(Ordering::Relaxed) {
                (StatusCode::SERVICE_UNAVAILABLE, "draining".to_string())
            } else {
                match check(&admin).await {
                    Readiness::Ready => (StatusCode::OK, String::new()),
                    Readiness::NotReady(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                }
            }
        }
        _ => (StatusCode::NOT_FOUND, "not found".to_string()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_envoy_stats_lines() {
        let stats = "cluster_manager.cds.update_success: 3\n\
                     listener_manager.lds.update_success: 0\n\
                     http.x.rds.r.update_success: 7\n";
        assert_eq!(stat_value(stats, CDS_SUCCESS), Some(3));
        assert_eq!(stat_value(stats, LDS_SUCCESS), Some(0));
        assert_eq!(stat_value(stats, "missing"), None);
    }

    /// A real TCP server that is not Envoy: the probe must say not ready, with a reason, and
    /// must do so quickly when nothing listens at all.
    #[tokio::test]
    async fn not_ready_without_envoy() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        match check(&AdminClient::new(port)).await {
            Readiness::NotReady(why) => assert!(why.contains("unreachable"), "{why}"),
            Readiness::Ready => panic!("ready without Envoy"),
        }
    }
}
