//! Access logs as Envoy writes them: the pilot's `envoy.access_loggers.file` config (a path and
//! a text format of `%COMMAND%`s) on HTTP connection managers and TCP proxies, one line per
//! request or connection, with Envoy's response flags.
//!
//! The format is parsed once, when the listener arrives ([`Format::parse`]); a line is rendered
//! on the request path and handed to one writer thread per file through a bounded channel.
//! The writer wakes every 250 ms (or once 1024 lines wait) and writes the batch, as Envoy
//! flushes its access-log buffers on an interval: a line costs the request path neither a
//! wake-up of the writer nor a system call (waking it per line was 3 syscalls and 3 context
//! switches per request on each sidecar). The request path never blocks on the file: when
//! the writer falls behind, lines are dropped and counted ([`dropped`]; not exported as a
//! metric yet), like Envoy's buffered flushes favour the data path.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("unterminated command in the access log format at byte {0} (commands look like %NAME% or %NAME(ARG)%)")]
    Unterminated(usize),
    #[error("empty command %% in the access log format at byte {0}")]
    Empty(usize),
    #[error("opening the access log {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
}

/// One piece of a format. Everything a line needs is resolved here, when the format is
/// parsed (header names, commands), so rendering a line only copies values.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Text(String),
    /// `%REQ(A?B):N%` / `%RESP(A?B):N%`: a header, its fallback, an optional length cap.
    Req(Hdr, Option<Hdr>, Option<usize>),
    Resp(Hdr, Option<Hdr>, Option<usize>),
    Command(Cmd),
}

/// A header a `%REQ%`/`%RESP%` reads: the request's pseudo-headers (REQ only), a header name,
/// or a name no header can have (it always prints `-`, as `headers.get` of it would).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Hdr {
    Method,
    Path,
    Authority,
    Scheme,
    Name(http::HeaderName),
    Never,
}

impl Hdr {
    fn parse(name: &str, request: bool) -> Hdr {
        match (name, request) {
            (":method", true) => Hdr::Method,
            (":path", true) => Hdr::Path,
            (":authority", true) => Hdr::Authority,
            (":scheme", true) => Hdr::Scheme,
            _ => http::HeaderName::from_bytes(name.as_bytes()).map_or(Hdr::Never, Hdr::Name),
        }
    }
}

/// The commands this proxy computes; any other (or one it does not compute) prints `-`, which
/// is what Envoy prints for a value it does not have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cmd {
    StartTime,
    Duration,
    Protocol,
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    BytesReceived,
    BytesSent,
    UpstreamHost,
    UpstreamCluster,
    DownstreamRemote,
    DownstreamRemoteWithoutPort,
    DownstreamLocal,
    DownstreamLocalWithoutPort,
    RequestedServerName,
    RouteName,
    DownstreamPeerUriSan,
    UpstreamPeerUriSan,
    Unknown,
}

impl Cmd {
    fn parse(name: &str) -> Cmd {
        match name {
            "START_TIME" => Cmd::StartTime,
            "DURATION" => Cmd::Duration,
            "PROTOCOL" => Cmd::Protocol,
            "RESPONSE_CODE" => Cmd::ResponseCode,
            "RESPONSE_FLAGS" => Cmd::ResponseFlags,
            "RESPONSE_CODE_DETAILS" => Cmd::ResponseCodeDetails,
            "BYTES_RECEIVED" => Cmd::BytesReceived,
            "BYTES_SENT" => Cmd::BytesSent,
            "UPSTREAM_HOST" => Cmd::UpstreamHost,
            "UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW" => Cmd::UpstreamCluster,
            "DOWNSTREAM_REMOTE_ADDRESS" => Cmd::DownstreamRemote,
            "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Cmd::DownstreamRemoteWithoutPort,
            "DOWNSTREAM_LOCAL_ADDRESS" => Cmd::DownstreamLocal,
            "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => Cmd::DownstreamLocalWithoutPort,
            "REQUESTED_SERVER_NAME" => Cmd::RequestedServerName,
            "ROUTE_NAME" => Cmd::RouteName,
            "DOWNSTREAM_PEER_URI_SAN" => Cmd::DownstreamPeerUriSan,
            "UPSTREAM_PEER_URI_SAN" => Cmd::UpstreamPeerUriSan,
            _ => Cmd::Unknown,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Format {
    tokens: Vec<Token>,
}

/// Envoy's default format when the config gives none.
const ENVOY_DEFAULT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

impl Format {
    pub fn envoy_default() -> Format {
        Format::parse(ENVOY_DEFAULT).unwrap_or(Format { tokens: Vec::new() })
    }

    pub fn parse(s: &str) -> Result<Format, AccessLogError> {
        let mut tokens = Vec::new();
        let mut text = String::new();
        let mut rest = s;
        let mut at = 0usize;
        while let Some(i) = rest.find('%') {
            text.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            let Some(j) = after.find('%') else {
                return Err(AccessLogError::Unterminated(at + i));
            };
            let cmd = &after[..j];
            if cmd.is_empty() {
                return Err(AccessLogError::Empty(at + i));
            }
            if !text.is_empty() {
                tokens.push(Token::Text(std::mem::take(&mut text)));
            }
            tokens.push(command(cmd));
            at += i + j + 2;
            rest = &after[j + 1..];
        }
        text.push_str(rest);
        if !text.is_empty() {
            tokens.push(Token::Text(text));
        }
        Ok(Format { tokens })
    }

    pub fn render(&self, e: &Entry<'_>) -> String {
        let mut out = String::with_capacity(384);
        for t in &self.tokens {
            match t {
                Token::Text(s) => out.push_str(s),
                Token::Req(a, b, max) => header(&mut out, e.request_headers, a, b, *max, e),
                Token::Resp(a, b, max) => header(&mut out, e.response_headers, a, b, *max, e),
                Token::Command(c) => e.command(&mut out, *c),
            }
        }
        out
    }
}

fn command(cmd: &str) -> Token {
    let (name, max) = match cmd.rsplit_once("):") {
        Some((head, n)) if n.bytes().all(|b| b.is_ascii_digit()) => {
            (format!("{head})"), n.parse().ok())
        }
        _ => (cmd.to_string(), None),
    };
    let arg = |prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(')'))
            .map(|a| match a.split_once('?') {
                Some((x, y)) => (x.to_ascii_lowercase(), Some(y.to_ascii_lowercase())),
                None => (a.to_ascii_lowercase(), None),
            })
    };
    if let Some((a, b)) = arg("REQ(") {
        let hdr = |n: &str| Hdr::parse(n, true);
        return Token::Req(hdr(&a), b.as_deref().map(hdr), max);
    }
    if let Some((a, b)) = arg("RESP(") {
        let hdr = |n: &str| Hdr::parse(n, false);
        return Token::Resp(hdr(&a), b.as_deref().map(hdr), max);
    }
    // START_TIME(format) and the like: the argument is not honoured, the value is.
    Token::Command(Cmd::parse(name.split('(').next().unwrap_or_default()))
}

fn header(
    out: &mut String,
    headers: Option<&http::HeaderMap>,
    a: &Hdr,
    b: &Option<Hdr>,
    max: Option<usize>,
    // Where the request's pseudo-headers come from (only REQ tokens name them).
    e: &Entry<'_>,
) {
    let get = |h: &Hdr| -> Option<&str> {
        match h {
            Hdr::Method => e.method,
            Hdr::Path => e.path,
            Hdr::Authority => e.authority,
            Hdr::Scheme => Some("http"),
            Hdr::Name(n) => headers?.get(n)?.to_str().ok(),
            Hdr::Never => None,
        }
    };
    match get(a).or_else(|| b.as_ref().and_then(get)) {
        Some(v) => {
            let v = match max.and_then(|m| v.char_indices().nth(m)) {
                Some((cut, _)) => &v[..cut],
                None => v,
            };
            out.push_str(v);
        }
        None => out.push('-'),
    }
}

/// What one request (or TCP connection) leaves behind for its log line.
#[derive(Default)]
pub struct Entry<'a> {
    pub start: Option<SystemTime>,
    pub duration: Duration,
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    pub authority: Option<&'a str>,
    pub protocol: Option<&'a str>,
    pub request_headers: Option<&'a http::HeaderMap>,
    pub response_headers: Option<&'a http::HeaderMap>,
    pub response_code: u16,
    pub response_flags: &'a str,
    pub response_code_details: Option<&'a str>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub upstream_host: Option<&'a str>,
    pub upstream_cluster: Option<&'a str>,
    pub downstream_remote: Option<SocketAddr>,
    pub downstream_local: Option<SocketAddr>,
    pub requested_server_name: Option<&'a str>,
    pub route_name: Option<&'a str>,
    pub downstream_peer_uri_san: Option<&'a str>,
    pub upstream_peer_uri_san: Option<&'a str>,
}

impl Entry<'_> {
    fn command(&self, out: &mut String, c: Cmd) {
        let opt = |out: &mut String, v: Option<&str>| match v.filter(|s| !s.is_empty()) {
            Some(s) => out.push_str(s),
            None => out.push('-'),
        };
        match c {
            Cmd::StartTime => rfc3339_millis_into(out, self.start.unwrap_or_else(SystemTime::now)),
            Cmd::Duration => push_u64(
                out,
                u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX),
            ),
            Cmd::Protocol => opt(out, self.protocol),
            Cmd::ResponseCode => push_u64(out, u64::from(self.response_code)),
            Cmd::ResponseFlags => opt(out, Some(self.response_flags)),
            Cmd::ResponseCodeDetails => opt(out, self.response_code_details),
            Cmd::BytesReceived => push_u64(out, self.bytes_received),
            Cmd::BytesSent => push_u64(out, self.bytes_sent),
            Cmd::UpstreamHost => opt(out, self.upstream_host),
            Cmd::UpstreamCluster => opt(out, self.upstream_cluster),
            Cmd::DownstreamRemote => addr(out, self.downstream_remote, true),
            Cmd::DownstreamRemoteWithoutPort => addr(out, self.downstream_remote, false),
            Cmd::DownstreamLocal => addr(out, self.downstream_local, true),
            Cmd::DownstreamLocalWithoutPort => addr(out, self.downstream_local, false),
            Cmd::RequestedServerName => opt(out, self.requested_server_name),
            Cmd::RouteName => opt(out, self.route_name),
            Cmd::DownstreamPeerUriSan => opt(out, self.downstream_peer_uri_san),
            Cmd::UpstreamPeerUriSan => opt(out, self.upstream_peer_uri_san),
            Cmd::Unknown => out.push('-'),
        }
    }
}

/// Decimal digits without the formatting machinery (a line has a dozen small numbers).
fn push_u64(out: &mut String, v: u64) {
    if v >= 10 {
        push_u64(out, v / 10);
    }
    out.push(char::from(b'0' + (v % 10) as u8));
}

/// `v` zero-padded to `width` digits (values wider than that are written whole).
fn push_padded(out: &mut String, v: u64, width: usize) {
    let mut n = 1;
    let mut x = v;
    while x >= 10 {
        x /= 10;
        n += 1;
    }
    for _ in n..width {
        out.push('0');
    }
    push_u64(out, v);
}

fn addr(out: &mut String, a: Option<SocketAddr>, port: bool) {
    match a {
        Some(SocketAddr::V4(a)) => {
            for (i, o) in a.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_u64(out, u64::from(o));
            }
            if port {
                out.push(':');
                push_u64(out, u64::from(a.port()));
            }
        }
        Some(a) if port => {
            let _ = write!(out, "{a}");
        }
        Some(a) => {
            let _ = write!(out, "{}", a.ip());
        }
        None => out.push('-'),
    }
}

/// `2026-11-23T14:10:00.123Z` (Envoy's default START_TIME).
#[cfg(test)]
fn rfc3339_millis(t: SystemTime) -> String {
    let mut out = String::new();
    rfc3339_millis_into(&mut out, t);
    out
}

fn rfc3339_millis_into(out: &mut String, t: SystemTime) {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Every field is non-negative past 1970 (earlier times were clamped to the epoch above).
    let u = |v: i64| u64::try_from(v).unwrap_or(0);
    push_padded(out, u(year), 4);
    out.push('-');
    push_padded(out, u(month), 2);
    out.push('-');
    push_padded(out, u(day), 2);
    out.push('T');
    push_padded(out, u(rem / 3600), 2);
    out.push(':');
    push_padded(out, u(rem % 3600 / 60), 2);
    out.push(':');
    push_padded(out, u(rem % 60), 2);
    out.push('.');
    push_padded(out, u64::from(d.subsec_millis()), 3);
    out.push('Z');
}

/// One configured access log: where its lines go and how they look.
#[derive(Clone, Debug)]
pub struct AccessLog {
    pub path: Arc<str>,
    pub format: Arc<Format>,
    sink: Sink,
}

impl PartialEq for AccessLog {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path && self.format == other.format
    }
}

impl AccessLog {
    /// Opens (or reuses) the writer of `path`: a config naming an unwritable file is rejected
    /// when it arrives, not discovered on the first request.
    pub fn new(path: &str, format: Format) -> Result<AccessLog, AccessLogError> {
        Ok(AccessLog {
            path: path.into(),
            format: Arc::new(format),
            sink: Sink::for_path(path)?,
        })
    }

    pub fn log(&self, e: &Entry<'_>) {
        let mut line = self.format.render(e);
        if !line.ends_with('\n') {
            line.push('\n');
        }
        self.sink.send(line);
    }
}

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Lines dropped because a writer fell behind (not exported as a metric yet).
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// How often the writer wakes to write what is queued (Envoy: --file-flush-interval-msec,
/// 10 s). Short enough that a line shows up promptly, long enough that a busy proxy pays one
/// wake-up and one write per batch instead of per line.
const FLUSH_INTERVAL: Duration = Duration::from_millis(250);
/// Queued lines that wake the writer before its interval (the queue holds 16 Ki lines).
const WAKE_AT: usize = 1024;

#[derive(Clone, Debug)]
struct Sink(Arc<SinkInner>);

#[derive(Debug)]
struct SinkInner {
    tx: SyncSender<String>,
    /// Lines sent and not yet taken by the writer.
    queued: AtomicUsize,
    writer: std::thread::Thread,
}

impl Sink {
    fn for_path(path: &str) -> Result<Sink, AccessLogError> {
        static SINKS: OnceLock<Mutex<HashMap<String, Sink>>> = OnceLock::new();
        let sinks = SINKS.get_or_init(|| Mutex::new(HashMap::new()));
        // Config-time only (a listener update), never on the request path.
        let mut map = sinks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get(path) {
            return Ok(s.clone());
        }
        // The process's own stdout/stderr, not a reopened /dev/stdout: reopening goes through
        // /proc/self/fd, which a sidecar running as another user (1337) may not be allowed to
        // open when its stdout is a file of the user who started it.
        let file: Box<dyn std::io::Write + Send> = match path {
            "/dev/stdout" => Box::new(std::io::stdout()),
            "/dev/stderr" => Box::new(std::io::stderr()),
            _ => Box::new(
                std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(path)
                    .map_err(|source| AccessLogError::Open {
                        path: path.to_string(),
                        source,
                    })?,
            ),
        };
        let (tx, rx) = sync_channel::<String>(16 * 1024);
        let name = format!("access-log {path}");
        let (inner_tx, inner_rx) = std::sync::mpsc::channel::<Arc<SinkInner>>();
        let handle = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                // The sink's shared counter: the writer starts once the sink exists.
                if let Ok(inner) = inner_rx.recv() {
                    write_lines(rx, &inner.queued, file, &name);
                }
            })
            .map_err(|source| AccessLogError::Open {
                path: path.to_string(),
                source,
            })?;
        let sink = Sink(Arc::new(SinkInner {
            tx,
            queued: AtomicUsize::new(0),
            writer: handle.thread().clone(),
        }));
        let _ = inner_tx.send(sink.0.clone());
        map.insert(path.to_string(), sink.clone());
        Ok(sink)
    }

    /// Never blocks and, below [`WAKE_AT`] queued lines, makes no system call: the writer
    /// never waits in `recv` (a send would wake it), it sleeps in `park_timeout`.
    fn send(&self, line: String) {
        match self.0.tx.try_send(line) {
            Ok(()) => {
                if self.0.queued.fetch_add(1, Ordering::Relaxed) + 1 == WAKE_AT {
                    self.0.writer.unpark();
                }
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Writes what is queued every [`FLUSH_INTERVAL`] (sooner when [`WAKE_AT`] lines wait), as
/// Envoy flushes its access-log buffers on an interval, so a line costs the request path no
/// wake-up of this thread.
fn write_lines(
    rx: Receiver<String>,
    queued: &AtomicUsize,
    file: Box<dyn std::io::Write + Send>,
    name: &str,
) {
    let mut w = std::io::BufWriter::with_capacity(64 * 1024, file);
    loop {
        let mut n = 0usize;
        let mut ok = true;
        let gone = loop {
            match rx.try_recv() {
                Ok(line) => {
                    ok &= w.write_all(line.as_bytes()).is_ok();
                    n += 1;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break false,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => break true,
            }
        };
        if n > 0 {
            queued.fetch_sub(n, Ordering::Relaxed);
            ok &= w.flush().is_ok();
            if !ok {
                tracing::warn!(
                    log = name,
                    "writing the access log failed; lines are being lost"
                );
            }
        }
        if gone {
            return;
        }
        std::thread::park_timeout(FLUSH_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_renders_envoy_commands() {
        let f = Format::parse(
            "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" \
             %RESPONSE_CODE% %RESPONSE_FLAGS% %REQ(USER-AGENT):4% %RESP(X-B)% %UPSTREAM_HOST% \
             %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %NOT_A_THING% %DURATION%\n",
        )
        .unwrap();
        let mut req = http::HeaderMap::new();
        req.insert("user-agent", "curl/8.0".parse().unwrap());
        let mut resp = http::HeaderMap::new();
        resp.insert("x-b", "web-v1".parse().unwrap());
        let e = Entry {
            start: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_443_000_123)),
            duration: Duration::from_millis(42),
            method: Some("GET"),
            path: Some("/a?b=1"),
            protocol: Some("HTTP/1.1"),
            request_headers: Some(&req),
            response_headers: Some(&resp),
            response_code: 503,
            response_flags: "UH",
            upstream_host: None,
            downstream_remote: Some("127.0.0.5:4000".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(
            f.render(&e),
            "[2026-11-23T14:10:00.123Z] \"GET /a?b=1 HTTP/1.1\" 503 UH curl web-v1 - 127.0.0.5 - 42\n"
        );
    }

    #[test]
    fn renders_addresses_numbers_and_caps_as_before() {
        let f = Format::parse(
            "%DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% \
             %DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% \
             %REQ(X-A):3% %REQ(:SCHEME)% %RESP(:METHOD)% %REQ(BAD NAME?:AUTHORITY)% \
             %REQ(X-NONE?X-ALSO-NONE)% %UPSTREAM_CLUSTER_RAW% %REQUESTED_SERVER_NAME%",
        )
        .unwrap();
        let mut req = http::HeaderMap::new();
        req.insert("x-a", "abcdef".parse().unwrap());
        let e = Entry {
            downstream_local: Some("10.244.0.10:8080".parse().unwrap()),
            downstream_remote: Some("[::1]:40000".parse().unwrap()),
            bytes_received: 0,
            bytes_sent: 18_446_744_073_709_551_615,
            duration: Duration::from_millis(1000),
            method: Some("GET"),
            authority: Some("web:80"),
            request_headers: Some(&req),
            upstream_cluster: Some("outbound|80||web"),
            requested_server_name: Some(""),
            ..Default::default()
        };
        assert_eq!(
            f.render(&e),
            "10.244.0.10:8080 [::1]:40000 10.244.0.10 0 18446744073709551615 1000 \
             abc http - web:80 - outbound|80||web -"
        );
    }

    #[test]
    fn bad_formats_are_errors() {
        assert!(matches!(
            Format::parse("a %START_TIME"),
            Err(AccessLogError::Unterminated(2))
        ));
        assert!(matches!(
            Format::parse("a %% b"),
            Err(AccessLogError::Empty(2))
        ));
        assert_eq!(
            Format::parse("plain").unwrap().tokens,
            vec![Token::Text("plain".into())]
        );
    }

    #[test]
    fn dates() {
        assert_eq!(
            rfc3339_millis(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339_millis(leap), "2000-02-29T00:00:00.000Z");
        let late = SystemTime::UNIX_EPOCH + Duration::from_millis(253_402_300_799_009); // 9999-12-31
        assert_eq!(rfc3339_millis(late), "9999-12-31T23:59:59.009Z");
    }

    #[test]
    fn lines_reach_the_file() {
        let dir = std::env::temp_dir().join(format!("mz-al-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let log = AccessLog::new(
            path.to_str().unwrap(),
            Format::parse("%RESPONSE_CODE%").unwrap(),
        )
        .unwrap();
        log.log(&Entry {
            response_code: 204,
            ..Default::default()
        });
        let mut text = String::new();
        for _ in 0..100 {
            text = std::fs::read_to_string(&path).unwrap_or_default();
            if !text.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(text, "204\n");
        assert!(AccessLog::new("/nonexistent-dir/x.log", Format::envoy_default()).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
