//! The supervisor daemon (`mizzen local supervise`, started detached by `up`): starts the
//! pilot, sidecars, gateways and apps, restarts them when they exit (with backoff), keeps
//! `pids.json` current, forwards `--publish` ports, and on SIGTERM stops them all.

use crate::error::{LocalError, Result};
use crate::state::{self, Pids, ProcSpec, Publish, State};
use crate::sys::ProcId;
use nix::sys::signal::Signal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub fn supervise(state_dir: &Path) -> Result<()> {
    // Own session: the terminal that ran `up` may close; the mesh stays.
    let _ = nix::unistd::setsid();
    let st = State::load(state_dir)?.ok_or_else(|| LocalError::NotUp(state_dir.to_path_buf()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| LocalError::io("starting the async runtime", e))?;
    rt.block_on(run(st))
}

async fn run(st: State) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| LocalError::io("SIGTERM handler", e))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| LocalError::io("SIGINT handler", e))?;
    // SIGHUP would end us by default; a closing terminal must not take the mesh down.
    let mut hup = signal(SignalKind::hangup()).map_err(|e| LocalError::io("SIGHUP handler", e))?;

    let pids: Arc<Mutex<Pids>> = Arc::new(Mutex::new(Pids::new()));
    let (tx, rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for spec in st.procs.clone() {
        tasks.push(tokio::spawn(keep_running(
            spec,
            pids.clone(),
            st.state_dir.clone(),
            rx.clone(),
        )));
    }
    for p in st.publish.clone() {
        tokio::spawn(forward(p, rx.clone()));
    }
    tracing::info!(procs = st.procs.len(), "supervising");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => continue,
        }
    }
    tracing::info!("stopping every process");
    let _ = tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(12), t).await;
    }
    write_pids(&st.state_dir, &pids);
    Ok(())
}

/// Writes the pid file under the lock: writers share one temporary file (write, then
/// rename), so two tasks writing at once could otherwise rename the other's older snapshot
/// into place and lose a pid for good (seen in CI: an app shown as not running, `up` timing
/// out).
fn write_pids(dir: &Path, pids: &Arc<Mutex<Pids>>) {
    let g = match pids.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    if let Err(e) = state::write_json(&state::pids_path(dir), &*g) {
        tracing::warn!("{e}");
    }
}

fn set_pid(dir: &Path, pids: &Arc<Mutex<Pids>>, name: &str, id: Option<ProcId>) {
    let mut g = match pids.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    match id {
        Some(id) => g.insert(name.to_string(), id),
        None => g.remove(name),
    };
    if let Err(e) = state::write_json(&state::pids_path(dir), &*g) {
        tracing::warn!("{e}");
    }
}

fn open_log(path: &PathBuf) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// Sleep, or return true early when shutdown is requested.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

async fn keep_running(
    spec: ProcSpec,
    pids: Arc<Mutex<Pids>>,
    dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        // holdApplicationUntilProxyStarts: wait for what this process depends on.
        for probe in &spec.after {
            loop {
                let p = probe.clone();
                let ok = tokio::task::spawn_blocking(move || p.check())
                    .await
                    .unwrap_or(false);
                if ok {
                    break;
                }
                if sleep_or_stop(Duration::from_millis(300), &mut stop).await {
                    return;
                }
            }
        }
        if *stop.borrow() {
            return;
        }
        let log = match open_log(&spec.log) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(name = %spec.name, "cannot open {}: {e}", spec.log.display());
                if sleep_or_stop(Duration::from_secs(5), &mut stop).await {
                    return;
                }
                continue;
            }
        };
        {
            use std::io::Write;
            let mut l = &log;
            let _ = writeln!(l, "$ {}", spec.argv.join(" "));
        }
        let (stdout, stderr) = match (log.try_clone(), log.try_clone()) {
            (Ok(a), Ok(b)) => (a, b),
            _ => return,
        };
        let Some((prog, args)) = spec.argv.split_first() else {
            return;
        };
        let mut cmd = tokio::process::Command::new(prog);
        cmd.args(args)
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(&spec.cwd)
            .stdin(std::process::Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // Its own process group: stopping it stops its children too (Envoy under the agent).
            .process_group(0);
        let started = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(name = %spec.name, "cannot start {prog}: {e}");
                if sleep_or_stop(backoff, &mut stop).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        let id = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .and_then(ProcId::of);
        set_pid(&dir, &pids, &spec.name, id);
        tracing::info!(name = %spec.name, pid = ?id.map(|i| i.pid), "started");
        tokio::select! {
            status = child.wait() => {
                set_pid(&dir, &pids, &spec.name, None);
                tracing::warn!(name = %spec.name, "exited ({}); restarting in {:?}",
                    status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()), backoff);
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = Duration::from_secs(1);
                }
                if sleep_or_stop(backoff, &mut stop).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            _ = stop.changed() => {
                if let Some(id) = id {
                    id.signal_group(Signal::SIGTERM);
                }
                if tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_err() {
                    if let Some(id) = id {
                        id.signal_group(Signal::SIGKILL);
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(3), child.wait()).await;
                } else if let Some(id) = id {
                    // The leader exited; children left in its group go too.
                    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(id.pid), Signal::SIGKILL);
                }
                set_pid(&dir, &pids, &spec.name, None);
                return;
            }
        }
    }
}

/// `--publish`: accept on the host, connect to the pod, copy both ways.
async fn forward(p: Publish, mut stop: watch::Receiver<bool>) {
    let listener = match tokio::net::TcpListener::bind(p.host).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("publish {} -> {}: cannot listen: {e}", p.host, p.target);
            return;
        }
    };
    tracing::info!("publishing {} -> {}", p.host, p.target);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            acc = listener.accept() => {
                let Ok((mut inbound, _)) = acc else { continue };
                let target = p.target;
                tokio::spawn(async move {
                    let conn = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(target)).await;
                    if let Ok(Ok(mut out)) = conn {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        }
    }
}
