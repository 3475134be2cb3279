//! Running Envoy: start it, forward its logs, restart it when it dies, drain it on shutdown.
//!
//! The agent owns exactly one Envoy process at a time and only ever signals the process it
//! spawned (tokio's `Child::id()` is `None` once reaped, so a recycled PID is never hit).
//! Envoy is started in its own process group so a terminal's Ctrl-C reaches only the agent,
//! which then drains Envoy gracefully instead of Envoy dying mid-request.

use crate::admin::AdminClient;
use std::future::Future;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// First restart delay; doubled after each quick crash up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// An Envoy that ran this long before exiting was healthy; its next restart is immediate-ish
/// (initial backoff) rather than inheriting the backoff of an old crash loop.
const STABLE_RUN: Duration = Duration::from_secs(60);
/// After `/quitquitquit` (or SIGTERM) Envoy normally exits within a second; past this we
/// escalate.
const QUIT_GRACE: Duration = Duration::from_secs(5);

/// Log line format: level and logger first, tab-separated, so lines can be re-emitted at the
/// right tracing level. Timestamps come from our own tracing output.
const LOG_FORMAT: &str = "%l\t%n\t%v";

#[derive(Debug, thiserror::Error)]
pub enum EnvoyError {
    #[error("starting Envoy {binary}: {error}")]
    Spawn {
        binary: PathBuf,
        error: std::io::Error,
    },
    #[error("waiting for Envoy: {0}")]
    Wait(std::io::Error),
}

/// How to run Envoy.
#[derive(Clone, Debug)]
pub struct EnvoyOptions {
    pub binary: PathBuf,
    pub config_file: PathBuf,
    pub admin_port: u16,
    /// Worker threads (`--concurrency`).
    pub concurrency: u16,
    /// Envoy's `-l` level (trace, debug, info, warning, error, critical, off).
    pub log_level: String,
    /// How long listeners drain on shutdown (`--drain-time-s` and the agent's own wait).
    pub drain_duration: Duration,
}

impl EnvoyOptions {
    /// Envoy's command line (without the binary).
    pub fn args(&self) -> Vec<String> {
        // Envoy takes whole seconds; never 0, which would make "graceful" meaningless.
        let drain_s = self.drain_duration.as_secs().max(1);
        vec![
            "-c".into(),
            self.config_file.display().to_string(),
            "--drain-time-s".into(),
            drain_s.to_string(),
            // Must exceed the drain time (Envoy checks); only matters for hot restart.
            "--parent-shutdown-time-s".into(),
            (drain_s + 10).to_string(),
            // Drain all connections at once when draining starts (Istio's choice); the drain
            // time then bounds how long in-flight requests get.
            "--drain-strategy".into(),
            "immediate".into(),
            // Each Envoy picks a free shared-memory base id, so several proxies (sidecars of
            // the local mesh, parallel tests) can run on one host.
            "--use-dynamic-base-id".into(),
            "--concurrency".into(),
            self.concurrency.to_string(),
            "-l".into(),
            self.log_level.clone(),
            "--log-format".into(),
            LOG_FORMAT.into(),
        ]
    }
}

/// What the supervisor is doing, observable through [`Supervisor::status`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvoyStatus {
    /// PID of the running Envoy, if one is running.
    pub pid: Option<u32>,
    /// How many times Envoy has been started (1 = never restarted).
    pub starts: u64,
}

/// Runs one Envoy at a time until told to stop.
pub struct Supervisor {
    opts: EnvoyOptions,
    admin: AdminClient,
    status: watch::Sender<EnvoyStatus>,
}

impl Supervisor {
    pub fn new(opts: EnvoyOptions) -> Supervisor {
        let admin = AdminClient::new(opts.admin_port);
        Supervisor {
            opts,
            admin,
            status: watch::Sender::new(EnvoyStatus::default()),
        }
    }

    /// A live view of the running Envoy's PID and start count.
    pub fn status(&self) -> watch::Receiver<EnvoyStatus> {
        self.status.subscribe()
    }

    /// Keep Envoy running until `shutdown` completes, then drain it and stop it.
    ///
    /// Returns an error only if Envoy cannot be started at all (a bad `--envoy` path is an
    /// operator error worth failing loudly on, not something a retry fixes).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), EnvoyError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let mut child = self.spawn()?;
            let started = Instant::now();
            let exited = tokio::select! {
                r = child.wait() => r.map_err(EnvoyError::Wait)?,
                () = &mut shutdown => {
                    self.stop(&mut child).await?;
                    self.set_pid(None);
                    return Ok(());
                }
            };
            self.set_pid(None);
            if started.elapsed() >= STABLE_RUN {
                backoff = INITIAL_BACKOFF;
            }
            tracing::warn!(
                status = %describe(exited),
                restart_in = ?backoff,
                "Envoy exited unexpectedly; restarting"
            );
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = &mut shutdown => return Ok(()),
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn spawn(&self) -> Result<Child, EnvoyError> {
        let mut cmd = Command::new(&self.opts.binary);
        cmd.args(self.opts.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            // Safety net: if the agent unwinds without stopping Envoy, don't leave it behind.
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|error| EnvoyError::Spawn {
            binary: self.opts.binary.clone(),
            error,
        })?;
        let pid = child.id();
        tracing::info!(
            pid,
            binary = %self.opts.binary.display(),
            config = %self.opts.config_file.display(),
            "Envoy started"
        );
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_logs(out));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward_logs(err));
        }
        self.status.send_modify(|s| {
            s.pid = pid;
            s.starts += 1;
        });
        Ok(child)
    }

    fn set_pid(&self, pid: Option<u32>) {
        self.status.send_modify(|s| s.pid = pid);
    }

    /// Graceful stop, as Istio's agent does it: drain listeners (Envoy stops accepting and
    /// tells HTTP clients to go away), give connections the drain duration, then ask Envoy to
    /// quit; escalate to SIGTERM and finally SIGKILL only if it does not.
    async fn stop(&self, child: &mut Child) -> Result<(), EnvoyError> {
        let drain = self.opts.drain_duration;
        tracing::info!(?drain, "shutting down: draining Envoy listeners");
        if let Err(e) = self.admin.post("/drain_listeners?graceful").await {
            tracing::warn!(error = %e, "drain_listeners failed");
        }
        tokio::select! {
            r = child.wait() => {
                let st = r.map_err(EnvoyError::Wait)?;
                tracing::info!(status = %describe(st), "Envoy exited while draining");
                return Ok(());
            }
            () = tokio::time::sleep(drain) => {}
        }
        tracing::info!("drain period over: stopping Envoy");
        let asked = match self.admin.post("/quitquitquit").await {
            Ok((200, _)) => true,
            Ok((code, body)) => {
                tracing::warn!(code, body = body.trim(), "quitquitquit refused");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "quitquitquit failed");
                false
            }
        };
        if !asked {
            terminate(child);
        }
        if let Some(st) = wait_for(child, QUIT_GRACE).await? {
            tracing::info!(status = %describe(st), "Envoy stopped");
            return Ok(());
        }
        if asked {
            tracing::warn!("Envoy ignored quitquitquit; sending SIGTERM");
            terminate(child);
            if let Some(st) = wait_for(child, QUIT_GRACE).await? {
                tracing::info!(status = %describe(st), "Envoy stopped");
                return Ok(());
            }
        }
        tracing::warn!("Envoy did not stop; killing it");
        child.kill().await.map_err(EnvoyError::Wait)?;
        Ok(())
    }
}

async fn wait_for(child: &mut Child, limit: Duration) -> Result<Option<ExitStatus>, EnvoyError> {
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(r) => r.map(Some).map_err(EnvoyError::Wait),
        Err(_) => Ok(None),
    }
}

/// SIGTERM our child, if it is still ours to signal.
fn terminate(child: &Child) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    if let Err(e) = kill(Pid::from_raw(pid), Signal::SIGTERM) {
        tracing::warn!(pid, error = %e, "SIGTERM to Envoy failed");
    }
}

fn describe(st: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => st.to_string(),
    }
}

/// Re-emit Envoy's log lines through tracing at their own level (see [`LOG_FORMAT`]).
/// Lines that don't carry the prefix (multi-line messages, early startup errors) go out at
/// info so nothing is lost.
async fn forward_logs(stream: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(stream).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(line)) => emit(&line),
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "reading Envoy output failed");
                return;
            }
        }
    }
}

fn emit(line: &str) {
    let mut parts = line.splitn(3, '\t');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(level), Some(logger), Some(msg)) => match level {
            "trace" | "debug" => tracing::debug!(target: "envoy", logger, "{msg}"),
            "info" => tracing::info!(target: "envoy", logger, "{msg}"),
            "warning" => tracing::warn!(target: "envoy", logger, "{msg}"),
            "error" | "critical" => tracing::error!(target: "envoy", logger, "{msg}"),
            _ => tracing::info!(target: "envoy", "{line}"),
        },
        _ => tracing::info!(target: "envoy", "{line}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line() {
        let o = EnvoyOptions {
            binary: "/usr/bin/envoy".into(),
            config_file: "/tmp/x/envoy-rev.json".into(),
            admin_port: 15000,
            concurrency: 2,
            log_level: "warning".into(),
            drain_duration: Duration::from_millis(500),
        };
        let a = o.args();
        let after = |flag: &str| {
            let i = a.iter().position(|x| x == flag).unwrap();
            a[i + 1].clone()
        };
        assert_eq!(after("-c"), "/tmp/x/envoy-rev.json");
        assert_eq!(after("--drain-time-s"), "1");
        assert_eq!(after("--parent-shutdown-time-s"), "11");
        assert_eq!(after("--concurrency"), "2");
        assert_eq!(after("-l"), "warning");
        assert!(a.contains(&"--use-dynamic-base-id".to_string()));
    }

    /// A binary that does not exist is a startup error, not a restart loop.
    #[tokio::test]
    async fn missing_binary_fails_fast() {
        let s = Supervisor::new(EnvoyOptions {
            binary: "/nonexistent/envoy".into(),
            config_file: "/tmp/none.json".into(),
            admin_port: 1,
            concurrency: 1,
            log_level: "warning".into(),
            drain_duration: Duration::from_secs(1),
        });
        let r = s.run(std::future::pending()).await;
        assert!(matches!(r, Err(EnvoyError::Spawn { .. })), "{r:?}");
    }
}
