//! System helpers: running `ip`/`iptables`, probing inside a pod's network namespace,
//! process liveness and signals. Everything here is bounded in time.

use crate::error::{LocalError, Result};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Run a command to completion; its stderr becomes the error.
pub fn run(argv: &[&str]) -> Result<String> {
    let command = argv.join(" ");
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| LocalError::Sys("empty command".into()))?;
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LocalError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(LocalError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run_owned(argv: &[String]) -> Result<String> {
    let v: Vec<&str> = argv.iter().map(String::as_str).collect();
    run(&v)
}

/// `iptables -w ...`: wait for the xtables lock, since other tools may hold it briefly.
pub fn iptables(args: &[String]) -> Result<String> {
    let mut argv = vec!["iptables".to_string(), "-w".into(), "5".into()];
    argv.extend(args.iter().cloned());
    run_owned(&argv)
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Run `f` on a fresh thread that has entered network namespace `netns` (by its
/// `/run/netns` bind mount). Only that thread switches namespace, so callers stay put.
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let path = format!("/run/netns/{netns}");
    let file =
        std::fs::File::open(&path).map_err(|e| LocalError::io(format!("opening {path}"), e))?;
    let h = std::thread::spawn(move || -> std::result::Result<T, String> {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("setns: {e}"))?;
        Ok(f())
    });
    h.join()
        .map_err(|_| LocalError::Sys(format!("probe thread in {netns} panicked")))?
        .map_err(|e| LocalError::Sys(format!("entering {netns}: {e}")))
}

/// `GET path` over HTTP/1.0; the status code, or `None` when nothing answered.
pub fn http_status(addr: SocketAddr, path: &str, timeout: Duration) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    // The status line is all we need.
    while !got.contains(&b'\n') && got.len() < 512 {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&got);
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn tcp_open(addr: SocketAddr, timeout: Duration) -> bool {
    TcpStream::connect_timeout(&addr, timeout).is_ok()
}

/// A process we started, identified by PID and its start time (field 22 of
/// `/proc/PID/stat`), so a recycled PID is never mistaken for ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcId {
    pub pid: i32,
    pub start_time: u64,
}

impl ProcId {
    pub fn of(pid: i32) -> Option<ProcId> {
        Some(ProcId {
            pid,
            start_time: start_time(pid)?,
        })
    }

    /// Still the same process (and not a zombie)?
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time) && !is_zombie(self.pid)
    }

    /// Signal its process group (children such as Envoy under the agent are in it) and the
    /// process itself, only if it is still ours.
    pub fn signal_group(&self, sig: Signal) {
        if self.start_time != 0 && start_time(self.pid) != Some(self.start_time) {
            return;
        }
        let _ = signal::killpg(Pid::from_raw(self.pid), sig);
        let _ = signal::kill(Pid::from_raw(self.pid), sig);
    }
}

fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: split after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn start_time(pid: i32) -> Option<u64> {
    // After ")" the fields start at 3 (state); starttime is field 22.
    stat_fields(pid)?.get(19)?.parse().ok()
}

fn is_zombie(pid: i32) -> bool {
    stat_fields(pid)
        .and_then(|f| f.first().cloned())
        .is_some_and(|s| s == "Z" || s == "X")
}

/// PIDs of processes in network namespace `netns` (`ip netns pids`).
pub fn netns_pids(netns: &str) -> Vec<i32> {
    run(&["ip", "netns", "pids", netns])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

pub fn kill(pid: i32, sig: Signal) {
    let _ = signal::kill(Pid::from_raw(pid), sig);
}

pub fn link_exists(name: &str) -> bool {
    std::path::Path::new(&format!("/sys/class/net/{name}")).exists()
}

pub fn netns_exists(name: &str) -> bool {
    std::path::Path::new(&format!("/run/netns/{name}")).exists()
}
