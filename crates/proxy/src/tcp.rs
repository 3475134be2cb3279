//! TCP proxy: pick a cluster (weighted), pick an endpoint, connect within the cluster's
//! connect timeout, then copy bytes both ways until either side closes.

use crate::cluster::random_u64;
use crate::config::ClusterTarget;
use crate::Shared;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use tracing::debug;

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

pub async fn proxy(
    shared: Arc<Shared>,
    mut downstream: crate::tls::Stream,
    target: &ClusterTarget,
    original_dst: Option<SocketAddr>,
) {
    let Some(name) = pick(target) else { return };
    let Some(cluster) = shared.snapshot().clusters.get(name).cloned() else {
        debug!(cluster = %name, "tcp proxy: unknown cluster; closing");
        return;
    };
    let Some(picked) = cluster.pick(original_dst) else {
        debug!(cluster = %name, "tcp proxy: no healthy upstream; closing");
        return;
    };
    let addr = picked.host.authority();
    let timeout = cluster.config.connect_timeout;
    let upstream =
        match tokio::time::timeout(timeout, connect(&addr, cluster.config.source_address)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                debug!(cluster = %name, %addr, error = %e, "tcp proxy: connect failed");
                return;
            }
            Err(_) => {
                debug!(cluster = %name, %addr, "tcp proxy: connect timed out");
                return;
            }
        };
    let _ = upstream.set_nodelay(true);
    // TLS origination when the endpoint's transport says so (ISTIO_MUTUAL, DR SIMPLE/MUTUAL).
    let mut upstream = match cluster.tls_for(&picked.host) {
        None => crate::tls::Stream::from(upstream),
        Some(tls) => match crate::tls::connect_stream(upstream, tls).await {
            Ok(s) => s,
            Err(e) => {
                debug!(cluster = %name, %addr, error = %e, "tcp proxy: upstream TLS handshake failed");
                return;
            }
        },
    };
    match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        Ok((up, down)) => {
            debug!(cluster = %name, %addr, bytes_sent = up, bytes_received = down, "tcp proxy: closed")
        }
        Err(e) => debug!(cluster = %name, %addr, error = %e, "tcp proxy: ended with error"),
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
