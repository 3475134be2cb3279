//! Smoke test of the load client itself: a real `mizzen pilot` on a tiny config, 5 simulated
//! delta-xDS clients to completion, then the pilot's own view (`/debug/syncz`) must list the 5
//! proxies with ACKed versions.
//!
//! Needs the `mizzen` binary: `$MIZZEN_BIN`, else next to this crate's binary
//! (`target/<profile>/mizzen`; build it with `cargo build -p mizzen`, or `--release`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mizzen_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MIZZEN_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "MIZZEN_BIN={} does not exist", p.display());
        return p;
    }
    let load = Path::new(env!("CARGO_BIN_EXE_mizzen-xds-load"));
    let p = load.with_file_name("mizzen");
    assert!(
        p.is_file(),
        "the mizzen binary is needed at {} (build it first: cargo build -p mizzen, with the \
         same profile as this test) or set MIZZEN_BIN",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    if !buf.starts_with("HTTP/1.1 200") {
        return None;
    }
    buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

fn write_config(dir: &Path) {
    let mut docs = Vec::new();
    for n in 0..3 {
        docs.push(format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{n}\n  namespace: bench\n\
             spec:\n  selector:\n    app: svc-{n}\n  ports:\n  - name: http\n    port: 80\n    \
             targetPort: 8080\n"
        ));
        for r in 0..3 {
            let k = n * 3 + r;
            let version = if r == 2 { "v2" } else { "v1" };
            docs.push(format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: svc-{n}-{r}\n  namespace: bench\n  \
                 labels:\n    app: svc-{n}\n    version: {version}\nspec:\n  containers:\n  \
                 - name: app\n    ports:\n    - containerPort: 8080\nstatus:\n  phase: Running\n  \
                 podIP: 10.10.0.{}\n",
                k + 1
            ));
        }
    }
    std::fs::write(dir.join("services.yaml"), docs.join("---\n")).expect("writing services.yaml");
    std::fs::write(
        dir.join("routing.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: svc-0\n  \
         namespace: bench\nspec:\n  host: svc-0\n  subsets:\n  - name: v1\n    labels:\n      \
         version: v1\n  - name: v2\n    labels:\n      version: v2\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: svc-0\n  \
         namespace: bench\nspec:\n  hosts:\n  - svc-0\n  http:\n  - route:\n    - destination:\n        \
         host: svc-0\n        subset: v1\n      weight: 90\n    - destination:\n        \
         host: svc-0\n        subset: v2\n      weight: 10\n",
    )
    .expect("writing routing.yaml");
}

#[test]
fn five_clients_get_full_config_and_ack() {
    let started = Instant::now();
    let bin = mizzen_bin();
    let dir = std::env::temp_dir().join(format!("mizzen-xds-load-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    write_config(&dir);

    let (xds, mon) = (free_port(), free_port());
    let _pilot = Kill(
        Command::new(&bin)
            .args(["pilot", "--config-dir"])
            .arg(&dir)
            .args(["--xds-addr", &format!("127.0.0.1:{xds}")])
            .args(["--monitoring-addr", &format!("127.0.0.1:{mon}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display())),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while http_get(mon, "/ready").is_none() {
        assert!(Instant::now() < deadline, "pilot not ready within 5 s");
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut load = Kill(
        Command::new(env!("CARGO_BIN_EXE_mizzen-xds-load"))
            .args(["--xds", &format!("127.0.0.1:{xds}")])
            .args(["--clients", "5", "--clients-per-channel", "2"])
            .args(["--namespace", "bench", "--ip-base", "10.10.0.1"])
            .args(["--timeout-secs", "5", "--hold-secs", "5"])
            .args(["--json", "--dump-names"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(load.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let out: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("load client output {line:?}: {e}"));
    assert_eq!(out["ok"], true, "{out:#}");
    assert_eq!(out["clients"], 5);
    assert_eq!(out["channels"], 3);
    let clusters: Vec<&str> = out["names"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for want in [
        "outbound|80||svc-0.bench.svc.cluster.local",
        "outbound|80|v1|svc-0.bench.svc.cluster.local",
        "outbound|80|v2|svc-0.bench.svc.cluster.local",
        "outbound|80||svc-2.bench.svc.cluster.local",
    ] {
        assert!(clusters.contains(&want), "{want} missing from {clusters:?}");
    }
    // 3 services + 2 subsets, all EDS, each with its endpoints delivered.
    assert_eq!(out["config"]["eds_clusters"], 5, "{out:#}");
    assert_eq!(out["config"]["endpoints"], 3 * 3 + 2 + 1, "{out:#}");
    assert!(out["config"]["route_configs"].as_u64().unwrap() >= 1);
    assert_eq!(out["config"]["eds_missing"].as_array().unwrap().len(), 0);

    // The pilot's view while the streams are still open. The clients' last ACKs may still be
    // in flight when the result is printed: poll briefly.
    let all_acked = |p: &serde_json::Value| {
        [
            "Cluster",
            "ClusterLoadAssignment",
            "Listener",
            "RouteConfiguration",
        ]
        .iter()
        .all(|t| {
            p["resources"].as_object().is_some_and(|res| {
                res.iter().any(|(k, ts)| {
                    k.ends_with(t) && ts["acked_version"].is_string() && ts["nack"].is_null()
                })
            })
        })
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let (syncz, proxies) = loop {
        let syncz = http_get(mon, "/debug/syncz").expect("/debug/syncz");
        let v: serde_json::Value = serde_json::from_str(&syncz).unwrap();
        let proxies = v.as_array().unwrap().clone();
        if (proxies.len() == 5 && proxies.iter().all(all_acked)) || Instant::now() > deadline {
            break (syncz, proxies);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(proxies.len(), 5, "{syncz}");
    for p in &proxies {
        assert_eq!(p["delta"], true);
        assert!(all_acked(p), "not all of CDS, EDS, LDS, RDS ACKed: {p}");
    }
    let ids: std::collections::BTreeSet<&str> =
        proxies.iter().filter_map(|p| p["id"].as_str()).collect();
    assert!(ids.contains("sidecar~10.10.0.1~xds-load-0.bench~bench.svc.cluster.local"));
    assert_eq!(ids.len(), 5);

    let _ = std::fs::remove_dir_all(&dir);
    assert!(started.elapsed() < Duration::from_secs(10));
}
