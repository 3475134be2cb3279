//! `mizzen pilot`: the control plane.

use anyhow::Context;
use mizzen_config::networking::OutboundMode;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct PilotArgs {
    #[command(subcommand)]
    command: Option<PilotCommand>,
    /// Directory of Istio and Kubernetes YAML (read recursively and watched).
    #[arg(long, required = true)]
    config_dir: Option<PathBuf>,
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
    /// Where every proxy writes its access log (meshConfig.accessLogFile); "" turns access
    /// logs off, as Istio's default profile does.
    #[arg(long, default_value = "/dev/stdout")]
    access_log_file: String,
    /// Every proxy keeps HTTP/1 header-name case (meshConfig.defaultConfig.proxyHeaders.
    /// preserveHttp1HeaderCase); a proxy's own ProxyConfig (node metadata PROXY_CONFIG, from
    /// the pod's proxy.istio.io/config annotation) overrides it. Off: names are lowercased.
    #[arg(long)]
    preserve_http1_header_case: bool,
    /// Quiet time after a config change before pushing (PILOT_DEBOUNCE_AFTER).
    #[arg(long, default_value_t = 100, env = "PILOT_DEBOUNCE_AFTER_MS")]
    debounce_ms: u64,
    /// CA directory (Istio's cacerts layout: ca-cert.pem, ca-key.pem, root-cert.pem,
    /// cert-chain.pem; a self-signed root is created there when empty). Giving it (or
    /// --secure-xds-addr) turns on the CA and the TLS port; without either the pilot is
    /// plaintext-only, as before. [default with --secure-xds-addr: /var/lib/mizzen/ca]
    #[arg(long, value_name = "DIR")]
    ca_dir: Option<PathBuf>,
    /// TLS address for the CSR API (istio.v1.auth.IstioCertificateService) and xDS.
    /// [default with --ca-dir: 0.0.0.0:15012]
    #[arg(long)]
    secure_xds_addr: Option<SocketAddr>,
    /// SPIFFE trust domain of issued certificates.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Lifetime of workload certificates (e.g. 24h, 30m, 20s).
    #[arg(long, default_value = "24h", value_parser = parse_ttl)]
    workload_cert_ttl: Duration,
    /// Longest workload certificate lifetime a caller may request.
    #[arg(long, default_value = "90d", value_parser = parse_ttl)]
    max_workload_cert_ttl: Duration,
}

#[derive(clap::Subcommand)]
enum PilotCommand {
    /// Print a bearer token for the CSR API: the workload presenting it gets certificates for
    /// spiffe://<trust-domain>/ns/NAMESPACE/sa/SERVICE_ACCOUNT.
    Token(TokenArgs),
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The pilot's CA directory (holds the token key; created if missing).
    #[arg(long, default_value = "/var/lib/mizzen/ca")]
    ca_dir: PathBuf,
    #[arg(long)]
    namespace: String,
    #[arg(long)]
    service_account: String,
    /// How long the token is accepted (e.g. 24h, 7d).
    #[arg(long, default_value = "24h", value_parser = parse_ttl)]
    ttl: Duration,
}

/// `20s`, `30m`, `24h`, `90d`, or a bare number of seconds.
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 20s, 30m, 24h or 90d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m, h or d)")),
    };
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

fn token(args: TokenArgs) -> anyhow::Result<u8> {
    let issuer = mizzen_ca::TokenIssuer::load_or_create(&args.ca_dir)?;
    println!(
        "{}",
        issuer.issue(&args.namespace, &args.service_account, args.ttl)
    );
    Ok(0)
}

pub fn run(args: PilotArgs) -> anyhow::Result<u8> {
    if let Some(PilotCommand::Token(t)) = args.command {
        return token(t);
    }
    let config_dir = args.config_dir.context("--config-dir is required")?;
    let secure = if args.ca_dir.is_some() || args.secure_xds_addr.is_some() {
        Some(mizzen_pilot::ca_server::SecureConfig {
            addr: args
                .secure_xds_addr
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 15012))),
            ca_dir: args
                .ca_dir
                .unwrap_or_else(|| PathBuf::from("/var/lib/mizzen/ca")),
            trust_domain: args.trust_domain,
            workload_cert_ttl: args.workload_cert_ttl,
            max_workload_cert_ttl: args.max_workload_cert_ttl.max(args.workload_cert_ttl),
        })
    } else {
        None
    };
    let cfg = mizzen_pilot::PilotConfig {
        config_dir,
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
        secure,
        access_log_file: args.access_log_file,
        preserve_http1_header_case: args.preserve_http1_header_case,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(mizzen_pilot::run(cfg))?;
    Ok(0)
}
