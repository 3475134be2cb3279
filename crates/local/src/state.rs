//! What `up` created, written as it goes, so `down` removes exactly that (and a failed or
//! interrupted `up` can still be cleaned up).

use crate::error::{LocalError, Result};
use crate::plan::{Bins, Plan};
use crate::sys::ProcId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/mizzen-local";
const STATE_FILE: &str = "state.json";
const PIDS_FILE: &str = "pids.json";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Pilot,
    Sidecar,
    Router,
    App,
}

/// A readiness check: TCP connect, or `GET http_path` = 200, optionally inside a netns.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Probe {
    pub netns: Option<String>,
    pub addr: SocketAddr,
    pub http_path: Option<String>,
}

impl Probe {
    pub fn check(&self) -> bool {
        let addr = self.addr;
        let path = self.http_path.clone();
        let f = move || {
            let t = std::time::Duration::from_millis(800);
            match &path {
                Some(p) => crate::sys::http_status(addr, p, t) == Some(200),
                None => crate::sys::tcp_open(addr, t),
            }
        };
        match &self.netns {
            Some(ns) => crate::sys::in_netns(ns, f).unwrap_or(false),
            None => f(),
        }
    }
}

/// One process the supervisor keeps running.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProcSpec {
    /// Unique, also the log file name: `pilot`, `NS.POD.sidecar`, `NS.POD.CONTAINER`.
    pub name: String,
    pub role: Role,
    /// `NS/POD`, when it runs in a pod.
    pub pod: Option<String>,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub log: PathBuf,
    /// Start only once every probe passes (the app waits for its sidecar).
    pub after: Vec<Probe>,
}

/// A host port forwarded to a pod port (`--publish`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Publish {
    pub host: SocketAddr,
    pub target: SocketAddr,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub source: PathBuf,
    pub state_dir: PathBuf,
    pub bins: Option<Bins>,
    pub plan: Option<Plan>,
    /// We created the bridge.
    pub bridge: Option<String>,
    /// `net.ipv4.ip_forward` before we set it, when we changed it.
    pub ip_forward_restore: Option<String>,
    pub netns: Vec<String>,
    pub veths: Vec<String>,
    pub etc_netns: Vec<PathBuf>,
    /// We created `/etc/netns` itself.
    #[serde(default)]
    pub etc_netns_created: bool,
    /// `(table, chain)` we created.
    pub chains: Vec<(String, String)>,
    /// `(table, rule)` we inserted into chains we did not create (removed with `-D rule`).
    pub jumps: Vec<(String, Vec<String>)>,
    pub supervisor: Option<ProcId>,
    pub procs: Vec<ProcSpec>,
    pub publish: Vec<Publish>,
}

impl State {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    pub fn load(dir: &Path) -> Result<Option<State>> {
        let p = Self::path(dir);
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(LocalError::io(format!("reading {}", p.display()), e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| LocalError::Json {
                what: format!("decoding {}", p.display()),
                source,
            })
    }

    /// Write atomically (temp file + rename): a crash never leaves half a state file.
    pub fn save(&self) -> Result<()> {
        write_json(&Self::path(&self.state_dir), self)
    }
}

/// PIDs of running children, kept current by the supervisor (restarts change them).
pub type Pids = BTreeMap<String, ProcId>;

pub fn pids_path(dir: &Path) -> PathBuf {
    dir.join(PIDS_FILE)
}

pub fn load_pids(dir: &Path) -> Pids {
    std::fs::read_to_string(pids_path(dir))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

pub fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|source| LocalError::Json {
        what: format!("encoding {}", path.display()),
        source,
    })?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text)
        .map_err(|e| LocalError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| LocalError::io(format!("renaming to {}", path.display()), e))
}
