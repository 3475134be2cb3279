//! End to end: the built `mizzen sample-app` on free ports, spoken to over real sockets:
//! the HelloWorld text body, /status, /delay (lower bound only), header echo, /json,
//! HTTP/2 prior knowledge on the same port, keep-alive, TCP echo, the server-first greeting,
//! and a clean exit on SIGTERM.

// Test code: a failed setup step should abort the test.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port nobody listens on right now (the kernel picked it; we release it for the app).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct App {
    child: Child,
}

impl App {
    fn start(args: &[String], wait_ports: &[u16]) -> App {
        let child = Command::new(env!("CARGO_BIN_EXE_mizzen"))
            .arg("sample-app")
            .args(["--listen-address", "127.0.0.1"])
            .args(args)
            .env("SERVICE_VERSION", "2")
            .env("POD_NAME", "helloworld-service-v2-2637126738-s7l4s")
            .env("INSTANCE_IP", "10.1.40.3")
            .env("APP", "helloworldsvc")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut app = App { child };
        let deadline = Instant::now() + Duration::from_secs(20);
        for &p in wait_ports {
            while TcpStream::connect(("127.0.0.1", p)).is_err() {
                if let Some(status) = app.child.try_wait().unwrap() {
                    let mut err = String::new();
                    if let Some(mut e) = app.child.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                    panic!("sample-app exited early ({status}): {err}");
                }
                assert!(Instant::now() < deadline, "port {p} never opened");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        app
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 exchange on `conn`; returns (status, headers lowercased, body).
fn exchange(conn: &mut BufReader<TcpStream>, req: &str) -> (u16, Vec<(String, String)>, String) {
    conn.get_mut().write_all(req.as_bytes()).unwrap();
    let mut line = String::new();
    conn.read_line(&mut line).unwrap();
    let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        conn.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap();
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0; len];
    conn.read_exact(&mut body).unwrap();
    (status, headers, String::from_utf8(body).unwrap())
}

fn get(port: u16, path: &str) -> (u16, String) {
    let mut conn = BufReader::new(TcpStream::connect(("127.0.0.1", port)).unwrap());
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: helloworldsvc:8080\r\nX-Test-Echo: abc\r\n\r\n");
    let (status, _, body) = exchange(&mut conn, &req);
    (status, body)
}

#[test]
fn http_endpoints_tcp_modes_and_sigterm() {
    let http = free_port();
    let http2 = free_port();
    let echo = free_port();
    let greet = free_port();
    let mut app = App::start(
        &[
            "--port".into(),
            http.to_string(),
            "--port".into(),
            http2.to_string(),
            "--tcp-echo-port".into(),
            echo.to_string(),
            "--greeting-port".into(),
            greet.to_string(),
        ],
        &[http, http2, echo, greet],
    );

    // The seed's page, on both of its paths and on any other path, and on the second port.
    for (port, path) in [
        (http, "/HelloWorld/index.jsp"),
        (http, "/"),
        (http, "/some/unknown/path"),
        (http2, "/"),
    ] {
        let (status, body) = get(port, path);
        assert_eq!(status, 200);
        let expected = format!(
            "This is a Helloworld test\nHostAddress=10.1.40.3\nHostName=helloworld-service-v2-2637126738-s7l4s\nSERVICE_VERSION=2\nSERVICE_NAME=helloworldsvc\nPATH={path}\n"
        );
        assert_eq!(body, expected);
    }

    // Keep-alive: several requests on one connection.
    let mut conn = BufReader::new(TcpStream::connect(("127.0.0.1", http)).unwrap());
    for code in [503u16, 404, 201] {
        let req = format!("GET /status/{code} HTTP/1.1\r\nHost: x\r\n\r\n");
        let (status, _, body) = exchange(&mut conn, &req);
        assert_eq!(status, code);
        assert!(body.contains("SERVICE_VERSION=2"), "{body}");
    }
    assert_eq!(get(http, "/status/600").0, 400);
    assert_eq!(get(http, "/status/abc").0, 400);
    assert_eq!(get(http, "/status/99").0, 400);
    assert_eq!(get(http, "/status/100").0, 400);
    assert_eq!(get(http, "/status/204").0, 204);
    assert_eq!(get(http, "/healthz").0, 200);

    // /delay: a lower bound only (an upper bound would be a flaky timing test).
    let t = Instant::now();
    let (status, body) = get(http, "/delay/0.2");
    assert_eq!(status, 200);
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    assert!(body.contains("PATH=/delay/0.2"));
    let t = Instant::now();
    assert_eq!(get(http, "/delay/0.3/more/path").0, 200);
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(get(http, "/delay/-1").0, 400);
    assert_eq!(get(http, "/delay/x").0, 400);

    // Header echo, httpbin-style.
    let (status, body) = get(http, "/headers");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["headers"]["X-Test-Echo"], "abc");
    assert_eq!(v["headers"]["Host"], "helloworldsvc:8080");

    let (status, body) = get(http, "/json");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["service_version"], "2");
    assert_eq!(v["service_name"], "helloworldsvc");
    assert_eq!(v["host_name"], "helloworld-service-v2-2637126738-s7l4s");
    assert_eq!(v["host_address"], "10.1.40.3");
    assert_eq!(v["path"], "/json");
    assert_eq!(v["protocol"], "HTTP/1.1");

    // HTTP/2 with prior knowledge on the same port.
    if Command::new("curl").arg("--version").output().is_ok() {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--http2-prior-knowledge",
                "-H",
                "X-Test-Echo: h2",
                "-w",
                "\n%{http_version} %{http_code}",
            ])
            .arg(format!("http://127.0.0.1:{http}/json"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.ends_with("\n2 200"), "{text}");
        assert!(text.contains("\"protocol\": \"HTTP/2.0\""), "{text}");
    } else {
        h2_preface_check(http);
    }

    // TCP echo: each line answered as "VERSION line", client speaks first.
    let mut s = BufReader::new(TcpStream::connect(("127.0.0.1", echo)).unwrap());
    for msg in ["hello", "world again"] {
        s.get_mut()
            .write_all(format!("{msg}\n").as_bytes())
            .unwrap();
        let mut line = String::new();
        s.read_line(&mut line).unwrap();
        assert_eq!(line, format!("2 {msg}\n"));
    }

    // Greeting: the server speaks first (we send nothing until the banner is in), then echoes.
    let mut s = BufReader::new(TcpStream::connect(("127.0.0.1", greet)).unwrap());
    s.get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut banner = String::new();
    s.read_line(&mut banner).unwrap();
    assert!(banner.starts_with("220 helloworldsvc 2 "), "{banner:?}");
    s.get_mut().write_all(b"ping\r\n").unwrap();
    let mut line = String::new();
    s.read_line(&mut line).unwrap();
    assert_eq!(line, "2 ping\n");

    // SIGTERM: a clean exit with status 0, in bounded time, and the request log on stderr.
    let status = Command::new("kill")
        .args(["-TERM", &app.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(st) = app.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(exit.code(), Some(0), "{exit}");
    let mut log = String::new();
    app.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("/status/503"), "{log}");
    assert!(log.contains("503"), "{log}");
    assert!(log.contains("GET"), "{log}");
    assert!(TcpStream::connect(("127.0.0.1", http)).is_err());
}

/// Without curl: send the HTTP/2 connection preface and a SETTINGS frame; an h2 server
/// answers with its own SETTINGS frame (type 0x4), an HTTP/1 server with an error text.
fn h2_preface_check(port: u16) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap();
    let mut head = [0u8; 9];
    s.read_exact(&mut head).unwrap();
    assert_eq!(head[3], 4, "first frame from the server is SETTINGS");
}

#[test]
fn sigint_with_idle_keepalive_connection_exits_cleanly() {
    let http = free_port();
    let mut app = App::start(&["--port".into(), http.to_string()], &[http]);
    // An idle keep-alive connection must not hold the shutdown up.
    let mut conn = BufReader::new(TcpStream::connect(("127.0.0.1", http)).unwrap());
    let (status, _, _) = exchange(&mut conn, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 200);
    let t = Instant::now();
    Command::new("kill")
        .args(["-INT", &app.pid().to_string()])
        .status()
        .unwrap();
    let exit = loop {
        if let Some(st) = app.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "no exit after SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(exit.code(), Some(0));
}

#[test]
fn bad_port_is_an_error_not_a_panic() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = Command::new(env!("CARGO_BIN_EXE_mizzen"))
        .args(["sample-app", "--listen-address", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
}
