//! `mizzen local`: a mesh on this machine (see `mizzen_local` for what each step does).

use anyhow::Context;
use mizzen_local::{state::DEFAULT_STATE_DIR, UpOptions};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct LocalArgs {
    /// Where the mesh keeps its state, generated config, binaries and logs.
    #[arg(long, global = true, default_value = DEFAULT_STATE_DIR, env = "MIZZEN_LOCAL_STATE_DIR")]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: LocalCommand,
}

#[derive(clap::Subcommand)]
enum LocalCommand {
    /// Create the pods, services and sidecars described by the YAML in DIR, and wait until
    /// every pod is ready.
    Up {
        /// Directory (or file) of Kubernetes + Istio YAML.
        dir: PathBuf,
        /// Also read the subdirectories of DIR (like `kubectl apply -R`).
        #[arg(short = 'R', long)]
        recursive: bool,
        /// The Envoy binary the proxies run (a path, or a name looked up on PATH).
        #[arg(long, default_value = "envoy")]
        envoy: String,
        /// Which data plane the sidecars and gateways run: Envoy under the agent, or the
        /// native Mizzen proxy.
        #[arg(long, default_value = "envoy", value_parser = ["envoy", "native"])]
        proxy: String,
        /// Give up (and clean up) if the mesh is not ready after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Forward a host port to the ingress gateway pod: HOSTPORT:PODPORT (repeatable).
        #[arg(long, value_parser = parse_publish)]
        publish: Vec<(u16, u16)>,
        /// On failure, leave everything as it is for debugging (then run `down`).
        #[arg(long)]
        keep_on_failure: bool,
    },
    /// Remove every namespace, link, rule and process `up` made. Safe to repeat.
    Down,
    /// Pods, IPs, proxy and app readiness, services.
    Status {
        /// Print JSON (with every recorded PID).
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside a pod's network namespace (with its /etc/hosts).
    Exec {
        /// Pod name, or a Deployment name (its first pod).
        pod: String,
        /// The pod's namespace, when the name is ambiguous.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Run as this uid/gid (not 1337, so the sidecar's capture applies).
        #[arg(long, default_value_t = 1000)]
        uid: u32,
        /// The command and its arguments (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<String>,
    },
    /// The process supervisor `up` starts in the background.
    #[command(hide = true)]
    Supervise,
}

fn parse_publish(s: &str) -> Result<(u16, u16), String> {
    let (h, p) = s.split_once(':').ok_or("expected HOSTPORT:PODPORT")?;
    let h = h.parse().map_err(|_| format!("bad host port {h:?}"))?;
    let p = p.parse().map_err(|_| format!("bad pod port {p:?}"))?;
    Ok((h, p))
}

pub fn run(args: LocalArgs) -> anyhow::Result<u8> {
    let sd = args.state_dir;
    match args.command {
        LocalCommand::Up {
            dir,
            recursive,
            envoy,
            proxy,
            timeout,
            publish,
            keep_on_failure,
        } => {
            let opts = UpOptions {
                dir: dir.clone(),
                recursive,
                state_dir: sd.clone(),
                envoy: (proxy == "envoy").then_some(envoy),
                mizzen: std::env::current_exe().context("locating the mizzen binary")?,
                timeout: Duration::from_secs(timeout),
                publish,
                keep_on_failure,
            };
            let progress = |m: &str| eprintln!("[mizzen local] {m}");
            let status = mizzen_local::up(&opts, &progress)
                .with_context(|| format!("mizzen local up {}", dir.display()))?;
            print!("{}", mizzen_local::format_status(&status));
            println!("mesh is up. Try: mizzen local exec POD -- curl -s SERVICE:PORT/ ; stop with: mizzen local down");
            Ok(0)
        }
        LocalCommand::Down => {
            let r = mizzen_local::down(&sd).context("mizzen local down")?;
            if !r.was_up {
                println!("nothing to do: no mesh is up (state dir {})", sd.display());
                return Ok(0);
            }
            println!(
                "removed {} process group(s), {} namespace(s), {} link(s), {} iptables chain(s)",
                r.processes, r.namespaces, r.links, r.chains
            );
            if !r.problems.is_empty() {
                for p in &r.problems {
                    eprintln!("problem: {p}");
                }
                anyhow::bail!("some resources could not be removed; the state is kept, run `mizzen local down` again");
            }
            Ok(0)
        }
        LocalCommand::Status { json } => {
            let s = mizzen_local::status(&sd).context("mizzen local status")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", mizzen_local::format_status(&s));
            }
            Ok(if s.pilot.ready && s.pods.iter().all(|p| p.ready) {
                0
            } else {
                3
            })
        }
        LocalCommand::Exec {
            pod,
            namespace,
            uid,
            cmd,
        } => {
            let code = mizzen_local::exec(&sd, &pod, namespace.as_deref(), uid, &cmd)
                .context("mizzen local exec")?;
            Ok(u8::try_from(code).unwrap_or(1))
        }
        LocalCommand::Supervise => {
            mizzen_local::supervise::supervise(&sd).context("mizzen local supervise")?;
            Ok(0)
        }
    }
}
