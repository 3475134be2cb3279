//! `mizzen sample-app`: the built-in demo application. It stands in for the container images
//! the seeds deploy (the tomcat "HelloWorld" page, httpbin, Istio's tcp-echo), so the
//! one-machine mesh and the end-to-end tests need nothing but this binary.
//!
//! HTTP: HTTP/1.1 (keep-alive) and HTTP/2 with prior knowledge (h2c) on the same port.
//! Every answer names the version, pod and address that served it, which is what routing
//! tests count. TCP: a line echo prefixed with the version (client speaks first) and a
//! greeting mode where the server speaks first (MySQL/SMTP-like), to exercise server-first
//! protocols through the sidecar.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Longest accepted `/delay/N`: a demo app must not be turned into a connection hog.
const MAX_DELAY_SECS: f64 = 60.0;
/// Longest line the TCP modes buffer before answering (longer input is answered in pieces).
const MAX_LINE: u64 = 64 * 1024;
/// How long in-flight HTTP requests get to finish after SIGTERM before we exit anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(clap::Args)]
pub struct SampleAppArgs {
    /// HTTP port (HTTP/1.1 and HTTP/2 prior knowledge on the same port); repeatable.
    /// Default 8080, unless only --tcp-echo-port/--greeting-port listeners are requested.
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
    /// Address every listener binds to.
    #[arg(long, default_value = "0.0.0.0")]
    pub listen_address: IpAddr,
    /// Version reported in every answer (env SERVICE_VERSION, else "v1").
    #[arg(long, env = "SERVICE_VERSION", default_value = "v1")]
    pub version: String,
    /// Service name reported in every answer (env APP, then SERVICE_NAME, else "sample-app").
    #[arg(long)]
    pub name: Option<String>,
    /// TCP echo port: each line is answered with "VERSION line" (Istio's tcp-echo); repeatable.
    #[arg(long = "tcp-echo-port", value_name = "PORT")]
    pub tcp_echo_ports: Vec<u16>,
    /// Server-first port: sends a banner on connect, then echoes like --tcp-echo-port;
    /// repeatable.
    #[arg(long = "greeting-port", value_name = "PORT")]
    pub greeting_ports: Vec<u16>,
    /// Seconds /HelloWorld/delay.jsp sleeps (the seed's slow page for the timeout demo).
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub jsp_delay: f64,
}

/// Who is answering: the fields every response reports.
struct Identity {
    name: String,
    version: String,
    pod_name: String,
    ip: String,
    jsp_delay: Duration,
}

pub fn run(args: SampleAppArgs) -> anyhow::Result<u8> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(serve(args))
}

async fn serve(args: SampleAppArgs) -> anyhow::Result<u8> {
    let jsp_delay = secs_to_delay(args.jsp_delay)
        .ok_or_else(|| anyhow::anyhow!("--jsp-delay must be between 0 and {MAX_DELAY_SECS}"))?;
    let id = Arc::new(Identity {
        name: args.name.clone().unwrap_or_else(default_name),
        version: args.version.clone(),
        pod_name: pod_name(),
        ip: instance_ip(),
        jsp_delay,
    });

    // Signal handlers go in before any port is open: whoever sees the port open may send
    // SIGTERM at once, and that must be a clean shutdown, not death by signal.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the SIGINT handler")?;

    let mut http_ports = args.ports.clone();
    if http_ports.is_empty() && args.tcp_echo_ports.is_empty() && args.greeting_ports.is_empty() {
        http_ports.push(8080);
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for port in http_ports {
        let listener = bind(args.listen_address, port).await?;
        tracing::info!(addr = %local(&listener), name = %id.name, version = %id.version, "sample-app: HTTP listening");
        tasks.spawn(http_loop(listener, id.clone(), stop_rx.clone()));
    }
    for (ports, greet) in [(&args.tcp_echo_ports, false), (&args.greeting_ports, true)] {
        for &port in ports {
            let listener = bind(args.listen_address, port).await?;
            let mode = if greet { "greeting" } else { "tcp-echo" };
            tracing::info!(addr = %local(&listener), mode, "sample-app: TCP listening");
            tasks.spawn(tcp_loop(listener, id.clone(), greet, stop_rx.clone()));
        }
    }

    let signal = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    tracing::info!(signal, "sample-app: shutting down");
    // Receivers may all be gone if every loop already ended; nothing to tell then.
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(0)
}

async fn bind(addr: IpAddr, port: u16) -> anyhow::Result<TcpListener> {
    let sa = SocketAddr::new(addr, port);
    TcpListener::bind(sa)
        .await
        .with_context(|| format!("cannot listen on {sa}"))
}

fn local(l: &TcpListener) -> String {
    l.local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into())
}

async fn http_loop(listener: TcpListener, id: Arc<Identity>, mut stop: watch::Receiver<bool>) {
    let graceful = GracefulShutdown::new();
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Usually EMFILE; back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let id = id.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(req, id.clone(), port, peer));
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish in time; exiting anyway");
    }
}

async fn tcp_loop(
    listener: TcpListener,
    id: Arc<Identity>,
    greet: bool,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let id = id.clone();
                tokio::spawn(async move {
                    if let Err(e) = echo(stream, &id, greet).await {
                        tracing::debug!(%peer, error = %e, "tcp connection ended with an error");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn echo(stream: TcpStream, id: &Identity, greet: bool) -> std::io::Result<()> {
    let peer = stream.peer_addr().ok();
    let (rd, mut wr) = stream.into_split();
    if greet {
        let banner = format!("220 {} {} {} ready\r\n", id.name, id.version, id.pod_name);
        wr.write_all(banner.as_bytes()).await?;
    }
    tracing::info!(?peer, greet, "tcp connection");
    let mut reader = BufReader::new(rd);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = (&mut reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut buf)
            .await?;
        if n == 0 {
            return Ok(());
        }
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        let mut out = Vec::with_capacity(buf.len() + id.version.len() + 2);
        out.extend_from_slice(id.version.as_bytes());
        out.push(b' ');
        out.extend_from_slice(&buf);
        out.push(b'\n');
        wr.write_all(&out).await?;
    }
}

type Resp = Response<Full<Bytes>>;

async fn handle(
    req: Request<Incoming>,
    id: Arc<Identity>,
    port: u16,
    peer: SocketAddr,
) -> Result<Resp, Infallible> {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let version = req.version();
    let resp = route(&req, &id, port).await;
    tracing::info!(
        method = %method,
        path = %path,
        status = resp.status().as_u16(),
        proto = ?version,
        %peer,
        ms = start.elapsed().as_millis() as u64,
        "request"
    );
    Ok(resp)
}

async fn route(req: &Request<Incoming>, id: &Identity, port: u16) -> Resp {
    let path = req.uri().path();
    if path == "/healthz" {
        return text(StatusCode::OK, "ok\n".into());
    }
    if path == "/headers" {
        return json(
            StatusCode::OK,
            // The protocol the request arrived in: tests check what a proxy spoke upstream.
            &serde_json::json!({
                "headers": headers_json(req),
                "protocol": format!("{:?}", req.version()),
            }),
        );
    }
    if path == "/json" {
        let body = serde_json::json!({
            "service_name": id.name,
            "service_version": id.version,
            "host_name": id.pod_name,
            "host_address": id.ip,
            "path": path,
            "method": req.method().as_str(),
            "protocol": format!("{:?}", req.version()),
            "port": port,
        });
        return json(StatusCode::OK, &body);
    }
    if let Some(rest) = path.strip_prefix("/status/") {
        let code = first_segment(rest)
            .parse::<u16>()
            .ok()
            // 1xx is informational and cannot end an exchange (hyper would turn it into a
            // 500), so only final codes are honoured.
            .filter(|c| (200..=599).contains(c))
            .and_then(|c| StatusCode::from_u16(c).ok());
        let Some(code) = code else {
            return text(
                StatusCode::BAD_REQUEST,
                format!("invalid status code {rest:?}: want 200-599\n"),
            );
        };
        // 204 and 304 carry no body.
        let body = if code == StatusCode::NO_CONTENT || code == StatusCode::NOT_MODIFIED {
            String::new()
        } else {
            body_text(id, path)
        };
        return text(code, body);
    }
    if let Some(rest) = path.strip_prefix("/delay/") {
        let Some(d) = parse_delay(first_segment(rest)) else {
            return text(
                StatusCode::BAD_REQUEST,
                format!("invalid delay {rest:?}: want seconds between 0 and {MAX_DELAY_SECS}\n"),
            );
        };
        tokio::time::sleep(d).await;
        return text(StatusCode::OK, body_text(id, path));
    }
    if path == "/HelloWorld/delay.jsp" {
        tokio::time::sleep(id.jsp_delay).await;
    }
    // "/", "/HelloWorld/index.jsp" and anything else: the seed's HelloWorld page.
    text(StatusCode::OK, body_text(id, path))
}

fn first_segment(s: &str) -> &str {
    s.split('/').next().unwrap_or("")
}

/// Seconds, fractional allowed. Negative or non-numbers are rejected; values above the
/// cap are capped (the caller asked for "slow", and slow is what it gets).
fn parse_delay(s: &str) -> Option<Duration> {
    secs_to_delay(s.parse().ok()?)
}

fn secs_to_delay(secs: f64) -> Option<Duration> {
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64(secs.min(MAX_DELAY_SECS)))
}

/// The seed's tomcat index.jsp output, as plain text, plus the fields tests want.
fn body_text(id: &Identity, path: &str) -> String {
    format!(
        "This is a Helloworld test\nHostAddress={}\nHostName={}\nSERVICE_VERSION={}\nSERVICE_NAME={}\nPATH={}\n",
        id.ip, id.pod_name, id.version, id.name, path
    )
}

/// Request headers the way httpbin shows them: canonical capitalisation, repeated headers
/// joined with ",", and Host filled from :authority for HTTP/2.
fn headers_json(req: &Request<Incoming>) -> serde_json::Map<String, serde_json::Value> {
    let mut out: serde_json::Map<String, serde_json::Value> = serde_json::Map::new();
    for (name, value) in req.headers() {
        let key = title_case(name.as_str());
        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match out.get_mut(&key) {
            Some(serde_json::Value::String(prev)) => {
                prev.push(',');
                prev.push_str(&v);
            }
            _ => {
                out.insert(key, serde_json::Value::String(v));
            }
        }
    }
    if !out.contains_key("Host") {
        if let Some(a) = req.uri().authority() {
            out.insert("Host".into(), serde_json::Value::String(a.to_string()));
        }
    }
    out
}

fn title_case(name: &str) -> String {
    name.split('-')
        .map(|w| {
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_uppercase().chain(c).collect::<String>(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

fn text(status: StatusCode, body: String) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(status: StatusCode, v: &serde_json::Value) -> Resp {
    let mut body = serde_json::to_string_pretty(v).unwrap_or_else(|_| "{}".into());
    body.push('\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn env_nonempty(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

fn default_name() -> String {
    env_nonempty("APP")
        .or_else(|| env_nonempty("SERVICE_NAME"))
        .unwrap_or_else(|| "sample-app".into())
}

fn pod_name() -> String {
    env_nonempty("POD_NAME")
        .or_else(|| {
            // The UTS namespace's hostname, which is the pod name in Kubernetes and the
            // local mesh alike.
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .or_else(|| env_nonempty("HOSTNAME"))
        .unwrap_or_else(|| "localhost".into())
}

fn instance_ip() -> String {
    env_nonempty("INSTANCE_IP")
        .or_else(|| env_nonempty("POD_IP"))
        .or_else(|| {
            std::fs::read_to_string("/proc/net/fib_trie")
                .ok()
                .and_then(|t| first_local_address(&t))
        })
        .or_else(route_source_address)
        .unwrap_or_else(|| "127.0.0.1".into())
}

/// The first non-loopback address this network namespace owns, from the kernel's FIB dump
/// (no netlink dependency; /proc/net is per network namespace, as we need it).
fn first_local_address(fib_trie: &str) -> Option<String> {
    let mut last: Option<&str> = None;
    for line in fib_trie.lines() {
        let t = line.trim();
        if let Some(addr) = t.strip_prefix("|-- ") {
            last = Some(addr.trim());
        } else if t.starts_with("/32 host LOCAL") {
            if let Some(a) = last.and_then(|a| a.parse::<std::net::Ipv4Addr>().ok()) {
                if !a.is_loopback() {
                    return Some(a.to_string());
                }
            }
        }
    }
    None
}

/// The source address the kernel would use for outbound traffic (a UDP connect sends
/// nothing). Only consulted when /proc is unavailable.
fn route_source_address() -> Option<String> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then(|| ip.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fib_trie_skips_loopback() {
        let t = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 127.0.0.1\n        /32 host LOCAL\n     |-- 10.1.40.3\n        /32 host LOCAL\n";
        assert_eq!(first_local_address(t).as_deref(), Some("10.1.40.3"));
        assert_eq!(first_local_address("Main:\n"), None);
    }

    #[test]
    fn delays() {
        assert_eq!(parse_delay("0.2"), Some(Duration::from_millis(200)));
        assert_eq!(parse_delay("999"), Some(Duration::from_secs(60)));
        assert_eq!(parse_delay("-1"), None);
        assert_eq!(parse_delay("NaN"), None);
        assert_eq!(parse_delay("x"), None);
    }

    #[test]
    fn header_names() {
        assert_eq!(title_case("user-agent"), "User-Agent");
        assert_eq!(title_case("x-b3-traceid"), "X-B3-Traceid");
    }
}
