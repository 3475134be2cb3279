//! Per-proxy sync status: what each connected proxy was sent and whether it ACKed or
//! NACKed, as `/debug/syncz` shows it. Updated by the connection tasks (never on a data path).

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, Debug, Serialize)]
pub struct Nack {
    pub version: String,
    pub nonce: String,
    pub message: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TypeSync {
    pub sent_version: String,
    pub sent_nonce: String,
    pub acked_version: Option<String>,
    pub nack: Option<Nack>,
    pub names: Vec<String>,
    pub responses: u64,
    pub nacks: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProxySync {
    pub id: String,
    #[serde(rename = "type")]
    pub proxy_type: String,
    pub ip: String,
    pub namespace: String,
    pub delta: bool,
    pub connected_at: u64,
    /// Keyed by type URL.
    pub resources: BTreeMap<String, TypeSync>,
}

/// Shared table of connected proxies. A std Mutex is enough: every critical section is a
/// few map operations, never held across an await.
#[derive(Debug, Default)]
pub struct SyncStatus {
    proxies: Mutex<BTreeMap<u64, ProxySync>>,
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl SyncStatus {
    pub fn connect(&self, conn: u64, entry: ProxySync) {
        if let Ok(mut m) = self.proxies.lock() {
            m.insert(conn, entry);
        }
    }

    pub fn disconnect(&self, conn: u64) {
        if let Ok(mut m) = self.proxies.lock() {
            m.remove(&conn);
        }
    }

    pub fn update(&self, conn: u64, type_url: &str, f: impl FnOnce(&mut TypeSync)) {
        if let Ok(mut m) = self.proxies.lock() {
            if let Some(p) = m.get_mut(&conn) {
                f(p.resources.entry(type_url.to_string()).or_default());
            }
        }
    }

    pub fn snapshot(&self) -> Vec<ProxySync> {
        self.proxies
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn connected(&self) -> usize {
        self.proxies.lock().map(|m| m.len()).unwrap_or(0)
    }
}
