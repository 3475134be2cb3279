//! TCP proxy: pick a cluster (weighted), pick an endpoint, connect within the cluster's
//! connect timeout, then copy bytes both ways until either side closes.
//!
//! Each connection counts in Istio's `istio_tcp_*` metrics and, when the pilot configured
//! access logs on the TCP proxy, writes one line as it closes, with Envoy's response flags
//! (`NC` no such cluster, `UH` no healthy upstream, `UF` connect or TLS failure).

use crate::cluster::random_u64;
use crate::config::{ClusterTarget, TcpProxy};
use crate::metrics::{TcpKey, Workload};
use crate::Shared;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

/// What the listener knows about a downstream connection.
pub struct TcpConn {
    pub peer: SocketAddr,
    /// The address the connection arrived on (after capture: the original destination).
    pub local: SocketAddr,
    pub original_dst: Option<SocketAddr>,
    /// `destination` on the inbound listener, `source` otherwise.
    pub reporter: &'static str,
    pub security: crate::tls::Security,
    pub sni: Option<Arc<str>>,
}

fn pick(target: &ClusterTarget) -> Option<&str> {
    match target {
        ClusterTarget::Single(c) => Some(c),
        ClusterTarget::Weighted(ws) => {
            let total: u64 = ws.iter().map(|w| u64::from(w.weight)).sum();
            let mut r = random_u64() % total.max(1);
            for w in ws {
                if r < u64::from(w.weight) {
                    return Some(&w.name);
                }
                r -= u64::from(w.weight);
            }
            ws.first().map(|w| w.name.as_str())
        }
    }
}

/// How a connection went, for its metrics and log line.
#[derive(Default)]
struct Report {
    cluster: String,
    flag: Option<&'static str>,
    upstream_host: Option<String>,
    upstream_workload: Option<Arc<Workload>>,
    upstream_security: Option<crate::tls::Security>,
}

pub async fn proxy(
    shared: Arc<Shared>,
    downstream: crate::tls::Stream,
    cfg: &TcpProxy,
    conn: TcpConn,
) {
    let started = (Instant::now(), SystemTime::now());
    let mut report = Report::default();
    let upstream = connect_upstream(&shared, &cfg.target, conn.original_dst, &mut report).await;
    let series = shared
        .metrics
        .tcp_series(&tcp_key(&shared, &conn, &mut report));
    series
        .opened
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (received, sent) = match upstream {
        None => (0, 0),
        Some(mut upstream) => {
            let mut downstream = Counted::new(downstream);
            let r = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
            if let Err(e) = r {
                debug!(cluster = %report.cluster, error = %e, "tcp proxy: ended with an error");
            }
            (downstream.read, downstream.written)
        }
    };
    debug!(cluster = %report.cluster, bytes_received = received, bytes_sent = sent, "tcp proxy: closed");
    use std::sync::atomic::Ordering::Relaxed;
    series.received.fetch_add(received, Relaxed);
    series.sent.fetch_add(sent, Relaxed);
    series.closed.fetch_add(1, Relaxed);
    if cfg.access_log.is_empty() {
        return;
    }
    let upstream_san = report
        .upstream_security
        .as_ref()
        .and_then(|s| s.peer_principal.clone());
    let entry = crate::access_log::Entry {
        start: Some(started.1),
        duration: started.0.elapsed(),
        response_flags: report.flag.unwrap_or("-"),
        bytes_received: received,
        bytes_sent: sent,
        upstream_host: report.upstream_host.as_deref(),
        upstream_cluster: Some(report.cluster.as_str()).filter(|c| !c.is_empty()),
        downstream_remote: Some(conn.peer),
        downstream_local: Some(conn.original_dst.unwrap_or(conn.local)),
        requested_server_name: conn.sni.as_deref(),
        downstream_peer_uri_san: conn.security.peer_principal.as_deref(),
        upstream_peer_uri_san: upstream_san.as_deref(),
        ..Default::default()
    };
    for l in cfg.access_log.iter() {
        l.log(&entry);
    }
}

/// Cluster, endpoint, connect, TLS: the upstream stream, or `None` with the flag saying why.
async fn connect_upstream(
    shared: &Shared,
    target: &ClusterTarget,
    original_dst: Option<SocketAddr>,
    report: &mut Report,
) -> Option<crate::tls::Stream> {
    let name = pick(target)?;
    report.cluster = name.to_string();
    let Some(cluster) = shared.snapshot().clusters.get(name).cloned() else {
        debug!(cluster = %name, "tcp proxy: unknown cluster; closing");
        report.flag = Some("NC");
        return None;
    };
    let Some(picked) = cluster.pick(original_dst) else {
        debug!(cluster = %name, "tcp proxy: no healthy upstream; closing");
        report.flag = Some("UH");
        return None;
    };
    let addr = picked.host.authority();
    report.upstream_host = Some(addr.clone());
    report.upstream_workload = picked.host.endpoint.workload.clone();
    let timeout = cluster.config.connect_timeout;
    let upstream =
        match tokio::time::timeout(timeout, connect(&addr, cluster.config.source_address)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                debug!(cluster = %name, %addr, error = %e, "tcp proxy: connect failed");
                report.flag = Some("UF");
                return None;
            }
            Err(_) => {
                debug!(cluster = %name, %addr, "tcp proxy: connect timed out");
                report.flag = Some("UF");
                return None;
            }
        };
    let _ = upstream.set_nodelay(true);
    // TLS origination when the endpoint's transport says so (ISTIO_MUTUAL, DR SIMPLE/MUTUAL).
    match cluster.tls_for(&picked.host) {
        None => Some(crate::tls::Stream::from(upstream)),
        Some(tls) => match crate::tls::connect(upstream, tls).await {
            Ok((s, security)) => {
                report.upstream_security = Some(security);
                Some(crate::tls::Stream::Client(Box::new(s)))
            }
            Err(e) => {
                debug!(cluster = %name, %addr, error = %e, "tcp proxy: upstream TLS handshake failed");
                report.flag = Some("UF");
                None
            }
        },
    }
}

/// The connection's labels. TCP has no metadata exchange here: the inbound side knows its
/// caller only by principal, the outbound side its destination by the endpoint's metadata.
fn tcp_key(shared: &Shared, conn: &TcpConn, report: &mut Report) -> TcpKey {
    let m = &shared.metrics;
    let inbound = conn.reporter == "destination";
    let (source, destination) = if inbound {
        (Workload::unknown(), m.local())
    } else {
        (
            m.local(),
            report
                .upstream_workload
                .take()
                .unwrap_or_else(Workload::unknown),
        )
    };
    // Inbound clusters name no service; mesh mTLS carries it in the SNI
    // (`outbound_.PORT_.SUBSET_.FQDN`).
    let sni_service = conn
        .sni
        .as_deref()
        .filter(|_| inbound)
        .and_then(crate::metrics::service_from_sni)
        .unwrap_or("");
    let (policy, source_principal, destination_principal) = crate::metrics::security_labels(
        conn.reporter,
        &conn.security,
        report.upstream_security.as_ref(),
    );
    TcpKey {
        reporter: conn.reporter,
        source,
        destination,
        service: m.service(&report.cluster, sni_service),
        source_principal,
        destination_principal,
        response_flags: report.flag.into_iter().collect(),
        connection_security_policy: policy,
    }
}

/// Connect, from `source` when the cluster sets one (Istio's inbound 127.0.0.6).
async fn connect(addr: &str, source: Option<std::net::IpAddr>) -> std::io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(addr).await;
    };
    let target: std::net::SocketAddr = addr
        .parse()
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not ip:port"))?;
    let socket = if target.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(std::net::SocketAddr::new(source, 0))?;
    socket.connect(target).await
}

/// Counts the bytes read from and written to a stream: the totals survive a copy that ends
/// in an error (a reset), which `copy_bidirectional`'s own counts do not.
struct Counted<S> {
    inner: S,
    read: u64,
    written: u64,
}

impl<S> Counted<S> {
    fn new(inner: S) -> Self {
        Counted {
            inner,
            read: 0,
            written: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            self.read += (buf.filled().len() - before) as u64;
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written += n as u64;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counted_streams_count_both_ways() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut c = Counted::new(a);
        c.write_all(b"hello").await.unwrap();
        b.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!((c.read, c.written), (2, 5));
    }
}
