//! A minimal client for Envoy's admin API on loopback.
//!
//! The agent needs only a handful of calls (`/ready`, `/stats`, `/drain_listeners`,
//! `/quitquitquit`), each a single short HTTP/1.1 request, so a fresh connection per call keeps
//! this free of pooling state that could go stale across Envoy restarts.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("connecting to Envoy admin at {addr}: {error}")]
    Connect {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("Envoy admin HTTP error: {0}")]
    Http(#[from] hyper::Error),
    #[error("building admin request: {0}")]
    Request(#[from] http::Error),
    #[error("Envoy admin did not answer within {0:?}")]
    Timeout(Duration),
}

/// Envoy's admin endpoint, always 127.0.0.1 (the bootstrap binds it there).
#[derive(Clone, Debug)]
pub struct AdminClient {
    addr: SocketAddr,
    timeout: Duration,
}

impl AdminClient {
    pub fn new(port: u16) -> AdminClient {
        AdminClient {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            // Admin calls are local and cheap; a slow answer means Envoy is wedged, and the
            // readiness probe must not hang on it.
            timeout: Duration::from_secs(2),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub async fn get(&self, path: &str) -> Result<(u16, String), AdminError> {
        self.request(Method::GET, path).await
    }

    pub async fn post(&self, path: &str) -> Result<(u16, String), AdminError> {
        self.request(Method::POST, path).await
    }

    /// One request on a fresh connection; returns status and body (lossy UTF-8).
    async fn request(&self, method: Method, path: &str) -> Result<(u16, String), AdminError> {
        let fut = async {
            let stream =
                TcpStream::connect(self.addr)
                    .await
                    .map_err(|error| AdminError::Connect {
                        addr: self.addr,
                        error,
                    })?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            // The connection driver ends on its own once `sender` is dropped.
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::trace!(error = %e, "admin connection ended");
                }
            });
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header(http::header::HOST, "127.0.0.1")
                .body(Empty::<Bytes>::new())?;
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok((status, String::from_utf8_lossy(&body).into_owned()))
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| AdminError::Timeout(self.timeout))?
    }
}
