//! Errors of `mizzen local`. Each says what failed and, where there is one, what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("mizzen local needs root (it creates network namespaces, a bridge and iptables rules); run it with sudo or as root")]
    NotRoot,
    #[error("{path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Config(Vec<String>),
    #[error("nothing to run: {0} has no Deployments or Pods")]
    NoPods(PathBuf),
    #[error("a mesh is already up (state in {0}); run `mizzen local down` first")]
    AlreadyUp(PathBuf),
    #[error("no mesh is up (no state in {0}); run `mizzen local up DIR`")]
    NotUp(PathBuf),
    #[error("{0}")]
    Plan(String),
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Json {
        what: String,
        source: serde_json::Error,
    },
    #[error("envoy: {0}")]
    Envoy(String),
    #[error("no pod named {0:?}; pods: {1}")]
    NoSuchPod(String, String),
    #[error("the mesh did not become ready within {secs}s:\n{detail}")]
    NotReady { secs: u64, detail: String },
    #[error("{0}")]
    Sys(String),
    #[error("mesh CA in {dir}: {source}")]
    Ca {
        dir: PathBuf,
        source: mizzen_ca::CaError,
    },
    #[error("workload tokens from the CA in {dir}: {source}")]
    Token {
        dir: PathBuf,
        source: mizzen_ca::TokenError,
    },
}

impl LocalError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        LocalError::Io {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, LocalError>;
