//! `mizzen proxy sidecar|router`: the data plane.
//!
//! With `--envoy PATH` this is the pilot-agent role: resolve the proxy identity, write Envoy's
//! bootstrap, supervise Envoy, serve `/healthz/ready`, drain on SIGTERM. Without it, it
//! runs the native Mizzen proxy (`mizzen-proxy`) with the same identity and ports.

use anyhow::Context;
use mizzen_agent::bootstrap::BootstrapOptions;
use mizzen_agent::{AgentConfig, DiscoveryAddress, HostInfo, Identity, IdentityInput, ProxyType};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct ProxyArgs {
    /// Proxy type: `sidecar` (next to an application) or `router` (a gateway).
    #[arg(value_parser = ["sidecar", "router"])]
    proxy_type: String,
    /// The pilot's xDS (ADS) address.
    #[arg(long, default_value = "127.0.0.1:15010")]
    discovery_address: String,
    /// Pod name [env: POD_NAME; default: hostname].
    #[arg(long)]
    pod_name: Option<String>,
    /// Namespace [env: POD_NAMESPACE; default: default].
    #[arg(long)]
    namespace: Option<String>,
    /// Workload IP [env: INSTANCE_IP; default: first non-loopback IPv4, else 127.0.0.1].
    #[arg(long)]
    ip: Option<String>,
    /// Kubernetes service account [env: SERVICE_ACCOUNT; default: default].
    #[arg(long)]
    service_account: Option<String>,
    /// Workload label KEY=VALUE (repeatable); merged over ISTIO_METAJSON_LABELS.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Cluster id [env: ISTIO_META_CLUSTER_ID; default: Kubernetes].
    #[arg(long)]
    cluster_id: Option<String>,
    /// Cluster DNS domain.
    #[arg(long, default_value = "cluster.local")]
    domain: String,
    /// Envoy admin port (bound on 127.0.0.1 only).
    #[arg(long, default_value_t = 15000)]
    admin_port: u16,
    /// Health port serving /healthz/ready (served by the agent).
    #[arg(long, default_value_t = 15021)]
    status_port: u16,
    /// Prometheus port serving /stats/prometheus (an Envoy listener).
    #[arg(long, default_value_t = 15090)]
    stats_port: u16,
    /// xDS variant: incremental (delta, Istio's default) or state of the world (sotw).
    #[arg(long, default_value = "delta", value_parser = ["delta", "sotw"], env = "MIZZEN_XDS_MODE")]
    xds_mode: String,
    /// Envoy worker threads.
    #[arg(long, default_value_t = 2)]
    concurrency: u16,
    /// Run and supervise this Envoy binary (the agent role). Without it the native Mizzen
    /// proxy serves the traffic itself.
    #[arg(long, value_name = "PATH")]
    envoy: Option<PathBuf>,
    /// Directory for the generated bootstrap (envoy-rev.json) [default: /tmp/mizzen-agent-PID].
    #[arg(long, value_name = "DIR")]
    config_path: Option<PathBuf>,
    /// How long listeners drain on shutdown, e.g. 5s, 500ms, 1m.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain_duration: Duration,
    /// Envoy's log level (trace, debug, info, warning, error, critical, off). Named like
    /// Istio's `--proxyLogLevel`: `--log-level` is the agent's own global log filter.
    #[arg(long, alias = "proxyLogLevel", default_value = "warning",
          value_parser = ["trace", "debug", "info", "warning", "warn", "error", "critical", "off"])]
    proxy_log_level: String,
    #[command(flatten)]
    security: SecurityArgs,
}

/// Workload identity for the Envoy agent or the native proxy (opt-in: without --ca-address,
/// --token-file or MIZZEN_TOKEN the proxy runs without certificates).
#[derive(clap::Args)]
struct SecurityArgs {
    /// The pilot's CSR API (its TLS port) [default when a token is given: the discovery
    /// host on port 15012]. When it equals --discovery-address, xDS also goes over TLS.
    #[arg(long, value_name = "HOST:PORT")]
    ca_address: Option<String>,
    /// File holding the bearer token for the CSR API (`mizzen pilot token` prints one);
    /// re-read at every renewal. [default with --ca-address:
    /// /var/run/secrets/tokens/istio-token, Istio's third-party token path]
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// The bearer token itself (prefer --token-file: the environment is visible to the
    /// process tree).
    #[arg(long, env = "MIZZEN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Mesh root certificate (PEM) to verify the pilot and peers: the pilot's
    /// <ca-dir>/root-cert.pem. Required with workload identity; never fetched unverified.
    #[arg(long, value_name = "PATH")]
    root_cert: Option<PathBuf>,
    /// SPIFFE trust domain of this workload's identity.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Renew the certificate at this fixed interval instead of at 80% of its lifetime.
    #[arg(long, value_parser = parse_duration)]
    cert_rotation_interval: Option<Duration>,
}

/// Istio's projected service-account token path.
const ISTIO_TOKEN_PATH: &str = "/var/run/secrets/tokens/istio-token";

fn identity_cert_options(
    sec: &SecurityArgs,
    identity: &Identity,
    discovery: &DiscoveryAddress,
) -> anyhow::Result<Option<mizzen_agent::identity_cert::CertOptions>> {
    use mizzen_agent::identity_cert::{CertOptions, TokenSource};
    let token = match (&sec.token_file, &sec.token) {
        (Some(p), _) => TokenSource::File(p.clone()),
        (None, Some(t)) => TokenSource::Inline(t.clone()),
        (None, None) if sec.ca_address.is_some() => TokenSource::File(ISTIO_TOKEN_PATH.into()),
        (None, None) => return Ok(None),
    };
    let ca_address = sec
        .ca_address
        .clone()
        .unwrap_or_else(|| format!("{}:15012", discovery.host));
    let root = sec.root_cert.as_ref().context(
        "workload identity needs --root-cert PATH (the pilot's <ca-dir>/root-cert.pem) to \
         verify the pilot",
    )?;
    let root_pem = std::fs::read_to_string(root)
        .with_context(|| format!("reading --root-cert {}", root.display()))?;
    if mizzen_ca::pem_certs(&root_pem).is_empty() {
        anyhow::bail!("--root-cert {}: no PEM certificate in it", root.display());
    }
    Ok(Some(CertOptions {
        ca_address,
        token,
        root_pem,
        identity: mizzen_ca::SpiffeId::new(
            &sec.trust_domain,
            &identity.namespace,
            &identity.service_account,
        ),
        rotation_interval: sec.cert_rotation_interval,
    }))
}

/// `500ms`, `5s`, `2m`, or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 5s or 1m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

pub fn run(args: ProxyArgs) -> anyhow::Result<u8> {
    let Some(envoy) = args.envoy.clone() else {
        return run_native(args);
    };
    let proxy_type: ProxyType = args.proxy_type.parse()?;
    let discovery: DiscoveryAddress = args.discovery_address.parse()?;
    let input = IdentityInput {
        pod_name: args.pod_name,
        namespace: args.namespace,
        ip: args.ip,
        service_account: args.service_account,
        labels: args.labels,
        cluster_id: args.cluster_id,
        domain: Some(args.domain),
    };
    let env = std::env::vars().collect();
    let identity = Identity::resolve(proxy_type, &input, &env, &HostInfo::detect())?;
    let identity_cert = identity_cert_options(&args.security, &identity, &discovery)?;

    // A per-process default directory, removed again on exit; an explicit --config-path is
    // the operator's and is left in place for inspection.
    let (config_dir, remove_dir) = match args.config_path {
        Some(p) => (p, false),
        None => (
            std::env::temp_dir().join(format!("mizzen-agent-{}", std::process::id())),
            true,
        ),
    };
    let log_level = match args.proxy_log_level.as_str() {
        "warn" => "warning".to_string(),
        l => l.to_string(),
    };
    let cfg = AgentConfig {
        identity,
        bootstrap: BootstrapOptions {
            discovery,
            admin_port: args.admin_port,
            stats_port: args.stats_port,
            delta: args.xds_mode == "delta",
        },
        config_dir: config_dir.clone(),
        status_port: args.status_port,
        envoy_binary: envoy,
        concurrency: args.concurrency,
        log_level,
        drain_duration: args.drain_duration,
        identity_cert,
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = rt.block_on(async {
        let signals = mizzen_agent::ShutdownSignals::register()?;
        let agent = mizzen_agent::Agent::start(cfg, signals.recv()).await?;
        agent.wait().await
    });
    if remove_dir {
        if let Err(e) = std::fs::remove_dir_all(&config_dir) {
            tracing::debug!(dir = %config_dir.display(), error = %e, "removing config dir");
        }
    }
    result?;
    Ok(0)
}

/// The native data plane: same identity resolution and ports as the agent, but the proxy is
/// this process.
fn run_native(args: ProxyArgs) -> anyhow::Result<u8> {
    let proxy_type: ProxyType = args.proxy_type.parse()?;
    let discovery: DiscoveryAddress = args.discovery_address.parse()?;
    let input = IdentityInput {
        pod_name: args.pod_name,
        namespace: args.namespace,
        ip: args.ip,
        service_account: args.service_account,
        labels: args.labels,
        cluster_id: args.cluster_id,
        domain: Some(args.domain),
    };
    let env = std::env::vars().collect();
    let identity = Identity::resolve(proxy_type, &input, &env, &HostInfo::detect())?;
    // Same flags as the agent: the native proxy fetches and rotates its own certificate.
    let identity_cert = identity_cert_options(&args.security, &identity, &discovery)?;
    let opts = mizzen_proxy::ProxyOptions {
        node: identity.node(),
        discovery_address: discovery.to_string(),
        xds_mode: if args.xds_mode == "sotw" {
            mizzen_proxy::xds::Mode::Sotw
        } else {
            mizzen_proxy::xds::Mode::Delta
        },
        admin_port: args.admin_port,
        status_port: args.status_port,
        stats_port: args.stats_port,
        drain_duration: args.drain_duration,
        reporter: match proxy_type {
            ProxyType::Sidecar => "sidecar",
            ProxyType::Router => "router",
        },
        identity: identity_cert,
        log_control: crate::logs::control(),
    };
    // One worker (Envoy's `--concurrency 1`): a current-thread runtime drives I/O and tasks on
    // one thread, without the multi-thread scheduler's wake-ups (-10% CPU per request at a
    // fixed rate in bench/proxy).
    let rt = if args.concurrency <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(args.concurrency))
            .enable_all()
            .build()
    }
    .context("starting the async runtime")?;
    rt.block_on(async {
        let signals = mizzen_agent::ShutdownSignals::register()?;
        mizzen_proxy::run(opts, signals.recv()).await?;
        anyhow::Ok(())
    })?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("abc").is_err());
    }
}
