//! `mizzen pilot`: the control plane.

use anyhow::Context;
use mizzen_config::networking::OutboundMode;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct PilotArgs {
    /// Directory of Istio and Kubernetes YAML (read recursively and watched).
    #[arg(long)]
    config_dir: PathBuf,
    /// gRPC xDS (ADS) address.
    #[arg(long, default_value = "0.0.0.0:15010")]
    xds_addr: SocketAddr,
    /// Monitoring and debug HTTP address (/ready, /metrics, /debug/syncz, /debug/configz).
    #[arg(long, default_value = "0.0.0.0:15014")]
    monitoring_addr: SocketAddr,
    /// Cluster DNS domain.
    #[arg(long, default_value = "cluster.local")]
    domain: String,
    /// Root namespace for mesh-wide config (Sidecar, PeerAuthentication ...).
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// Mesh default for traffic to unknown destinations: ALLOW_ANY or REGISTRY_ONLY.
    #[arg(long, default_value = "ALLOW_ANY", value_parser = ["ALLOW_ANY", "REGISTRY_ONLY"])]
    outbound_traffic_policy: String,
    /// Quiet time after a config change before pushing (PILOT_DEBOUNCE_AFTER).
    #[arg(long, default_value_t = 100, env = "PILOT_DEBOUNCE_AFTER_MS")]
    debounce_ms: u64,
}

pub fn run(args: PilotArgs) -> anyhow::Result<u8> {
    let cfg = mizzen_pilot::PilotConfig {
        config_dir: args.config_dir,
        xds_addr: args.xds_addr,
        monitoring_addr: args.monitoring_addr,
        domain: args.domain,
        root_namespace: args.root_namespace,
        outbound_mode: if args.outbound_traffic_policy == "REGISTRY_ONLY" {
            OutboundMode::RegistryOnly
        } else {
            OutboundMode::AllowAny
        },
        debounce: Duration::from_millis(args.debounce_ms),
        debounce_max: Duration::from_secs(10),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(mizzen_pilot::run(cfg))?;
    Ok(0)
}
