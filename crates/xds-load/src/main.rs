//! mizzen-xds-load: N simulated Envoy-like delta-xDS clients in one process, against a pilot.
//!
//! Phase 1 (initial): every client opens its own ADS stream (clients share HTTP/2 channels,
//! `--clients-per-channel` each), subscribes like Envoy and ACKs everything; measured is the
//! time from the start until the last client has received and ACKed its full CDS, EDS, LDS and
//! RDS config.
//!
//! Phase 2 (optional, `--change-file F --change-content-file C`): atomically replace F (in the
//! pilot's config dir) with C's content and measure the time until every client has received
//! and ACKed the resulting push: responses whose system version the clients had not seen
//! before the change. The push is over when every client got at least one such response and
//! none arrived for `--settle-ms`; the figure is the time of the last such ACK (the settle
//! wait is not counted).
//!
//! Exit status: 0 success, 1 a client failed (stream error, or a response it could not decode
//! and NACKed), 2 timeout.

mod client;

use anyhow::{Context, Result};
use clap::Parser;
use client::{Client, Event, Stats, Summary};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "mizzen-xds-load",
    about = "Simulate N Envoy-like delta-xDS clients against a pilot and time full config delivery"
)]
struct Args {
    /// The pilot's xDS address (HOST:PORT).
    #[arg(long, default_value = "127.0.0.1:15010")]
    xds: String,
    /// Number of simulated clients (one delta ADS stream each).
    #[arg(long, default_value_t = 10)]
    clients: usize,
    /// Namespace of the simulated proxies.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// IPv4 address of client 0; client i gets ip-base + i.
    #[arg(long, default_value = "10.10.0.1")]
    ip_base: Ipv4Addr,
    /// Pod name prefix: client i is POD_PREFIX-i.
    #[arg(long, default_value = "xds-load")]
    pod_prefix: String,
    /// Clients per HTTP/2 connection.
    #[arg(long, default_value_t = 50)]
    clients_per_channel: usize,
    /// Bound on each phase (initial sync; change propagation).
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// A config file (in the pilot's watched dir) to replace after the initial sync.
    #[arg(long, requires = "change_content_file")]
    change_file: Option<PathBuf>,
    /// The new content for --change-file.
    #[arg(long, requires = "change_file")]
    change_content_file: Option<PathBuf>,
    /// After a change, how long without further updates means the push is over.
    #[arg(long, default_value_t = 1000)]
    settle_ms: u64,
    /// Wait this long between the initial sync and the change (lets the pilot go idle, so
    /// the two phases can be told apart in its CPU time). `initial-complete` goes to stderr
    /// when the wait starts.
    #[arg(long, default_value_t = 0)]
    change_delay_ms: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Include client 0's resource names in the result.
    #[arg(long)]
    dump_names: bool,
    /// After a successful run, print the result and keep the streams open this long.
    #[arg(long, default_value_t = 0)]
    hold_secs: u64,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Percentile (nearest rank) of sorted durations.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn dist(mut v: Vec<Duration>) -> serde_json::Value {
    v.sort();
    serde_json::json!({
        "p50_ms": ms(pct(&v, 50.0)),
        "p90_ms": ms(pct(&v, 90.0)),
        "p99_ms": ms(pct(&v, 99.0)),
        "max_ms": ms(pct(&v, 100.0)),
    })
}

#[derive(Debug)]
enum Failure {
    Client(String),
    Timeout(String),
    Other(anyhow::Error),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mizzen-xds-load: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = rt.block_on(async {
        let mut out = serde_json::json!({
            "xds": args.xds,
            "clients": args.clients,
            "clients_per_channel": args.clients_per_channel,
        });
        let mut tasks = tokio::task::JoinSet::new();
        let result = run(&args, &mut out, &mut tasks).await;
        let (code, error) = match result {
            Ok(()) => (0u8, None),
            Err(Failure::Client(e)) => (1, Some(e)),
            Err(Failure::Other(e)) => (1, Some(format!("{e:#}"))),
            Err(Failure::Timeout(e)) => (2, Some(e)),
        };
        out["ok"] = serde_json::Value::Bool(code == 0);
        if let Some(e) = &error {
            out["error"] = serde_json::Value::String(e.clone());
        }
        if args.json {
            println!("{out}");
        } else {
            print_text(&out);
        }
        if let Some(e) = error {
            eprintln!("mizzen-xds-load: {e}");
        }
        if code == 0 && args.hold_secs > 0 {
            // Streams stay open so the pilot's debug views can be inspected.
            use std::io::Write;
            let _ = std::io::stdout().flush();
            tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
        }
        tasks.abort_all();
        code
    });
    rt.shutdown_timeout(Duration::from_millis(200));
    ExitCode::from(code)
}

fn print_text(out: &serde_json::Value) {
    let g = |p: &str| out.pointer(p).cloned().unwrap_or(serde_json::Value::Null);
    println!("clients: {}  channels: {}", g("/clients"), g("/channels"));
    if !g("/initial").is_null() {
        println!(
            "initial full config ACKed by all: {} ms (per client p50 {} ms, p99 {} ms)",
            g("/initial/all_acked_ms"),
            g("/initial/per_client/p50_ms"),
            g("/initial/per_client/p99_ms")
        );
        println!(
            "received: {} bytes in {} responses, {} resources",
            g("/initial/bytes"),
            g("/initial/responses"),
            g("/initial/resources")
        );
        println!(
            "per client: {} clusters ({} EDS, {} endpoints), {} listeners, {} route configs ({} virtual hosts)",
            g("/config/clusters"),
            g("/config/eds_clusters"),
            g("/config/endpoints"),
            g("/config/listeners"),
            g("/config/route_configs"),
            g("/config/virtual_hosts")
        );
    }
    if !g("/change").is_null() {
        println!(
            "change ACKed by all: {} ms (first client {} ms, p50 {} ms); {} bytes in {} responses",
            g("/change/all_acked_ms"),
            g("/change/first_ms"),
            g("/change/per_client/p50_ms"),
            g("/change/bytes"),
            g("/change/responses")
        );
    }
}

fn channel(addr: &str) -> Result<Channel> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(uri)
        .context("--xds")?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        // Envoy's defaults are large windows; 64 KiB would throttle big CDS responses.
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(64 << 20))
        .connect_lazy())
}

async fn run(
    args: &Args,
    out: &mut serde_json::Value,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<(), Failure> {
    if args.clients == 0 {
        return Err(Failure::Other(anyhow::anyhow!(
            "--clients must be at least 1"
        )));
    }
    let per = args.clients_per_channel.max(1);
    let n_channels = args.clients.div_ceil(per);
    out["channels"] = n_channels.into();
    let channels: Vec<Channel> = (0..n_channels)
        .map(|_| channel(&args.xds))
        .collect::<Result<_>>()
        .map_err(Failure::Other)?;
    let change_content = match &args.change_content_file {
        Some(p) => Some(
            std::fs::read(p)
                .with_context(|| format!("reading {}", p.display()))
                .map_err(Failure::Other)?,
        ),
        None => None,
    };
    let stats = Arc::new(Stats::default());
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let timeout = Duration::from_secs(args.timeout_secs);

    // ---------------------------------------------------------------- phase 1: initial sync
    let start = Instant::now();
    for i in 0..args.clients {
        let c = Client {
            index: i,
            node: client::node(i, args.ip_base, &args.namespace, &args.pod_prefix),
            channel: channels[i / per].clone(),
            events: ev_tx.clone(),
            stats: stats.clone(),
            names: args.dump_names && i == 0,
        };
        tasks.spawn(c.run());
    }
    drop(ev_tx);
    let deadline = tokio::time::Instant::from_std(start + timeout);
    let mut done: Vec<Option<Instant>> = vec![None; args.clients];
    let mut n_done = 0;
    let mut seen_versions: BTreeSet<String> = BTreeSet::new();
    let mut summary0: Option<Summary> = None;
    while n_done < args.clients {
        let ev = match tokio::time::timeout_at(deadline, ev_rx.recv()).await {
            Ok(Some(ev)) => ev,
            Ok(None) => return Err(Failure::Other(anyhow::anyhow!("all clients stopped"))),
            Err(_) => {
                return Err(Failure::Timeout(format!(
                    "initial sync: only {n_done} of {} clients had their full config after {}s",
                    args.clients, args.timeout_secs
                )))
            }
        };
        match ev {
            Event::Response { version, .. } => {
                seen_versions.insert(version);
            }
            Event::Complete {
                client,
                at,
                summary,
            } => {
                if done[client].is_none() {
                    done[client] = Some(at);
                    n_done += 1;
                }
                if client == 0 {
                    summary0 = Some(*summary);
                }
            }
            Event::Failed { client, error } => {
                return Err(Failure::Client(format!("client {client}: {error}")));
            }
        }
    }
    let per_client: Vec<Duration> = done.iter().flatten().map(|t| *t - start).collect();
    let all = per_client.iter().max().copied().unwrap_or_default();
    let bytes0 = stats.bytes.load(Ordering::Relaxed);
    let resp0 = stats.responses.load(Ordering::Relaxed);
    let res0 = stats.resources.load(Ordering::Relaxed);
    out["initial"] = serde_json::json!({
        "all_acked_ms": ms(all),
        "per_client": dist(per_client),
        "bytes": bytes0,
        "responses": resp0,
        "resources": res0,
        "versions": seen_versions.iter().collect::<Vec<_>>(),
    });
    if let Some(s) = &summary0 {
        out["config"] = serde_json::json!({
            "clusters": s.n_clusters,
            "eds_clusters": s.eds_clusters,
            "endpoints": s.endpoints,
            "listeners": s.n_listeners,
            "route_configs": s.n_routes,
            "virtual_hosts": s.virtual_hosts,
            "eds_missing": s.eds_missing,
            "rds_missing": s.rds_missing,
        });
        if args.dump_names {
            out["names"] = serde_json::json!({
                "clusters": s.clusters,
                "listeners": s.listeners,
                "route_configs": s.routes,
            });
        }
    }

    // ---------------------------------------------------------------- phase 2: one change
    if let (Some(file), Some(content)) = (&args.change_file, change_content) {
        eprintln!("initial-complete");
        if args.change_delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.change_delay_ms)).await;
        }
        // Late responses of the initial sync belong to the baseline.
        while let Ok(ev) = ev_rx.try_recv() {
            match ev {
                Event::Response { version, .. } => {
                    seen_versions.insert(version);
                }
                Event::Failed { client, error } => {
                    return Err(Failure::Client(format!("client {client}: {error}")));
                }
                Event::Complete { .. } => {}
            }
        }
        let baseline = seen_versions.clone();
        let tmp = file.with_extension("xds-load.tmp");
        std::fs::write(&tmp, &content)
            .with_context(|| format!("writing {}", tmp.display()))
            .map_err(Failure::Other)?;
        let t0 = Instant::now();
        std::fs::rename(&tmp, file)
            .with_context(|| format!("replacing {}", file.display()))
            .map_err(Failure::Other)?;
        let deadline = tokio::time::Instant::from_std(t0 + timeout);
        let settle = Duration::from_millis(args.settle_ms);
        let mut last: Vec<Option<Instant>> = vec![None; args.clients];
        let mut first: Vec<Option<Instant>> = vec![None; args.clients];
        let mut n_updated = 0usize;
        let mut new_versions = BTreeSet::new();
        loop {
            let wait_until = if n_updated == args.clients {
                std::cmp::min(deadline, tokio::time::Instant::now() + settle)
            } else {
                deadline
            };
            let ev = match tokio::time::timeout_at(wait_until, ev_rx.recv()).await {
                Ok(Some(ev)) => ev,
                Ok(None) => return Err(Failure::Other(anyhow::anyhow!("all clients stopped"))),
                Err(_) if n_updated == args.clients => break,
                Err(_) => {
                    return Err(Failure::Timeout(format!(
                        "change: only {n_updated} of {} clients received an update within {}s \
                         (did the change change anything?)",
                        args.clients, args.timeout_secs
                    )))
                }
            };
            match ev {
                Event::Response {
                    client,
                    at,
                    version,
                } => {
                    if baseline.contains(&version) {
                        continue;
                    }
                    new_versions.insert(version);
                    if first[client].is_none() {
                        first[client] = Some(at);
                        n_updated += 1;
                    }
                    last[client] = Some(at);
                }
                Event::Failed { client, error } => {
                    return Err(Failure::Client(format!("client {client}: {error}")));
                }
                Event::Complete { .. } => {}
            }
        }
        let per_client: Vec<Duration> = last.iter().flatten().map(|t| *t - t0).collect();
        let all = per_client.iter().max().copied().unwrap_or_default();
        let first_any = first
            .iter()
            .flatten()
            .min()
            .map(|t| *t - t0)
            .unwrap_or_default();
        out["change"] = serde_json::json!({
            "file": file,
            "all_acked_ms": ms(all),
            "first_ms": ms(first_any),
            "per_client": dist(per_client),
            "bytes": stats.bytes.load(Ordering::Relaxed) - bytes0,
            "responses": stats.responses.load(Ordering::Relaxed) - resp0,
            "resources": stats.resources.load(Ordering::Relaxed) - res0,
            "versions": new_versions.iter().collect::<Vec<_>>(),
        });
    }
    out["total_bytes"] = stats.bytes.load(Ordering::Relaxed).into();
    Ok(())
}
