//! The process's tracing subscriber, with log levels changeable at run time (the native
//! proxy's admin `/logging`, as Envoy's): the filter sits behind a reload layer, and
//! [`Logs`] rebuilds it from the start-up directives plus the per-logger levels set since.

use anyhow::Context;
use mizzen_proxy::admin::{LogControl, LogError};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// `/logging`'s logger names and the modules (tracing targets) each covers.
const LOGGERS: &[(&str, &str)] = &[
    ("access_log", "mizzen_proxy::access_log"),
    ("admin", "mizzen_proxy::admin"),
    ("agent", "mizzen_agent"),
    ("cluster", "mizzen_proxy::cluster"),
    ("http", "mizzen_proxy::http"),
    ("jwt", "mizzen_proxy::jwt"),
    ("listener", "mizzen_proxy::listener"),
    ("rbac", "mizzen_proxy::rbac"),
    ("secrets", "mizzen_proxy::secrets"),
    ("snapshot", "mizzen_proxy::snapshot"),
    ("tcp", "mizzen_proxy::tcp"),
    ("tls", "mizzen_proxy::tls"),
    ("xds", "mizzen_proxy::xds"),
];

static LOGS: OnceLock<Arc<Logs>> = OnceLock::new();

#[derive(Debug)]
pub struct Logs {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The start-up directives (`RUST_LOG`, else `--log-level`).
    base: String,
    /// The level loggers without their own have: the start-up one until `level=` sets all.
    default: Mutex<String>,
    per_logger: Mutex<BTreeMap<&'static str, String>>,
}

/// Install the subscriber: stderr, filtered by `RUST_LOG` or `level`.
pub fn init(level: &str) {
    let base = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| EnvFilter::try_new(s).is_ok())
        .unwrap_or_else(|| level.to_string());
    let filter = EnvFilter::try_new(&base).unwrap_or_else(|_| EnvFilter::new("info"));
    let (layer, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(layer)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    // A plain level is what loggers report until changed; directives show as given.
    let shown = normalize(&base).unwrap_or(&base).to_string();
    let _ = LOGS.set(Arc::new(Logs {
        handle,
        base,
        default: Mutex::new(shown),
        per_logger: Mutex::new(BTreeMap::new()),
    }));
}

/// The handle for the proxy's admin port.
pub fn control() -> Option<Arc<dyn LogControl>> {
    LOGS.get().map(|l| l.clone() as Arc<dyn LogControl>)
}

/// Envoy's level names to tracing's (`critical` is tracing's `error`).
fn normalize(level: &str) -> Option<&'static str> {
    Some(match level.to_ascii_lowercase().as_str() {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warn" | "warning" => "warning",
        "error" | "err" | "critical" => "error",
        "off" => "off",
        _ => return None,
    })
}

fn directive_level(shown: &str) -> &str {
    if shown == "warning" {
        "warn"
    } else {
        shown
    }
}

impl Logs {
    fn apply(
        &self,
        default: Option<&str>,
        per: &BTreeMap<&'static str, String>,
    ) -> anyhow::Result<()> {
        let mut d = match default {
            Some(l) => directive_level(l).to_string(),
            None => self.base.clone(),
        };
        for (name, level) in per {
            if let Some((_, target)) = LOGGERS.iter().find(|(n, _)| n == name) {
                d.push_str(&format!(",{target}={}", directive_level(level)));
            }
        }
        let filter = EnvFilter::try_new(&d).with_context(|| format!("filter {d:?}"))?;
        self.handle
            .reload(filter)
            .context("reloading the log filter")
    }
}

impl LogControl for Logs {
    fn levels(&self) -> Vec<(String, String)> {
        let default = self.default.lock().map(|d| d.clone()).unwrap_or_default();
        let per = self
            .per_logger
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default();
        LOGGERS
            .iter()
            .map(|(name, _)| {
                let level = per.get(name).cloned().unwrap_or_else(|| default.clone());
                (name.to_string(), level)
            })
            .collect()
    }

    fn set(&self, logger: Option<&str>, level: &str) -> Result<(), LogError> {
        let level = normalize(level).ok_or_else(|| LogError::UnknownLevel(level.to_string()))?;
        let mut default = self
            .default
            .lock()
            .map_err(|e| LogError::Apply(e.to_string()))?;
        let mut per = self
            .per_logger
            .lock()
            .map_err(|e| LogError::Apply(e.to_string()))?;
        let (new_default, new_per) = match logger {
            // Every logger, as Envoy's `?level=`: earlier per-logger levels are overridden.
            None => (Some(level.to_string()), BTreeMap::new()),
            Some(name) => {
                let (name, _) = LOGGERS
                    .iter()
                    .find(|(n, _)| *n == name)
                    .ok_or_else(|| LogError::UnknownLogger(name.to_string()))?;
                let mut p = per.clone();
                p.insert(*name, level.to_string());
                // Keep a `level=` set earlier; otherwise the start-up directives stay.
                let set_all = normalize(&default).is_some() && *default != self.base;
                (set_all.then(|| default.clone()), p)
            }
        };
        self.apply(new_default.as_deref(), &new_per)
            .map_err(|e| LogError::Apply(format!("{e:#}")))?;
        if let Some(d) = new_default {
            *default = d;
        }
        *per = new_per;
        Ok(())
    }
}
