//! `mizzen`: one binary, every role of the mesh. This crate only parses the command
//! line and hands off to the library crates; each subcommand lives in `cmd/`.

// The global allocator stays glibc's malloc, by measurement (callgrind instructions per proxied
// HTTP/1.1 request and /proc RssAnon, bench/proxy/count.py's one-hop setup): jemalloc saved ~4%
// of the instructions for ~0.5 MiB more anonymous memory and a C build; mimalloc ~7%, but its
// eagerly committed arena kept ~6 MiB more resident unless MIMALLOC_ARENA_EAGER_COMMIT=0 is in
// the environment before the first allocation (mi_option_set from main is too late).

mod cmd;
mod logs;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mizzen",
    version,
    about = "A service mesh that speaks Istio, in Rust"
)]
struct Cli {
    /// Log filter (tracing env-filter syntax); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane: config, discovery and xDS (the istiod role).
    Pilot(cmd::pilot::PilotArgs),
    /// Run a data-plane proxy (sidecar or router); with --envoy, bootstrap and supervise Envoy.
    Proxy(cmd::proxy::ProxyArgs),
    /// Validate Istio/Kubernetes YAML the way the pilot does; non-zero exit on errors.
    Validate(cmd::validate::ValidateArgs),
    /// Set up traffic capture rules, flag-compatible with istio-iptables.
    Iptables(Box<cmd::iptables::IptablesArgs>),
    /// A mesh on this machine: pods as network namespaces with real capture and sidecars.
    Local(cmd::local::LocalArgs),
    /// The built-in demo application (version, pod name and IP; /delay/N, /status/N, echo).
    SampleApp(cmd::sample_app::SampleAppArgs),
    /// Convert legacy Istio config (v1alpha1 route-rule) into VirtualService/DestinationRule.
    Convert(cmd::convert::ConvertArgs),
    /// Print the version.
    Version,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logs::init(&cli.log_level);
    let result = match cli.command {
        Command::Pilot(a) => cmd::pilot::run(a),
        Command::Proxy(a) => cmd::proxy::run(a),
        Command::Validate(a) => cmd::validate::run(a),
        Command::Iptables(a) => cmd::iptables::run(*a),
        Command::Local(a) => cmd::local::run(a),
        Command::SampleApp(a) => cmd::sample_app::run(a),
        Command::Convert(a) => cmd::convert::run(a),
        Command::Version => {
            println!("mizzen {}", env!("CARGO_PKG_VERSION"));
            Ok(0)
        }
    };
    match result {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
