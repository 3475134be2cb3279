//! mizzen-pilot: the control-plane process (the istiod role).
//!
//! Owns the loop that turns files into pushes: watch the config directory, debounce bursts of
//! changes (Istio's PILOT_DEBOUNCE_AFTER), reload the [`store::Store`] (last good version of
//! every resource stays in force), build a new immutable `PushContext` outside any lock and
//! publish it on a `watch` channel that every xDS stream follows. Also serves the monitoring
//! port (15014): `/ready`, `/metrics`, `/debug/syncz`, `/debug/configz`,
//! `/debug/authorizationz`. RequestAuthentication `jwksUri`s are fetched here ([`jwks`]) and
//! inlined into the proxies' config; a refresh with new keys triggers a push.

pub mod authz;
pub mod ca_server;
pub mod jwks;
pub mod monitor;
pub mod store;

use mizzen_config::networking::OutboundMode;
use mizzen_model::{registry, MeshSettings, PushContext};
use mizzen_xds::server::Discovery;
use notify::{RecursiveMode, Watcher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum PilotError {
    #[error("config dir {0}: {1}")]
    ConfigDir(PathBuf, String),
    #[error("cannot watch {0} for changes: {1}")]
    Watch(PathBuf, notify::Error),
    #[error("cannot listen on {0} (is another pilot running?): {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error(transparent)]
    Secure(#[from] ca_server::SecureError),
    #[error(transparent)]
    Jwks(#[from] jwks::JwksError),
    #[error("xDS server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

#[derive(Clone, Debug)]
pub struct PilotConfig {
    pub config_dir: PathBuf,
    pub xds_addr: SocketAddr,
    pub monitoring_addr: SocketAddr,
    pub domain: String,
    pub root_namespace: String,
    pub outbound_mode: OutboundMode,
    pub debounce: Duration,
    /// Upper bound on how long a steady stream of changes can delay a push (PILOT_DEBOUNCE_MAX).
    pub debounce_max: Duration,
    /// The CA and the TLS port (15012); `None` keeps the pilot plaintext-only.
    pub secure: Option<ca_server::SecureConfig>,
    /// meshConfig.accessLogFile (empty: no access logs).
    pub access_log_file: String,
    /// meshConfig.defaultConfig.proxyHeaders.preserveHttp1HeaderCase.
    pub preserve_http1_header_case: bool,
}

/// State shared with the monitoring endpoints.
pub struct Shared {
    pub store: Mutex<store::Store>,
    pub push: watch::Receiver<Arc<PushContext>>,
    pub discovery: Discovery,
    pub registry: prometheus_client::registry::Registry,
    pub config_dir: PathBuf,
    /// Live JWKS fetch state (a push only carries it when keys change).
    pub jwks: Arc<jwks::JwksResolver>,
}

fn build_push(
    cfg: &PilotConfig,
    version: u64,
    resources: Vec<mizzen_config::Resource>,
) -> PushContext {
    let mesh = MeshSettings {
        domain: cfg.domain.clone(),
        root_namespace: cfg.root_namespace.clone(),
        outbound_mode: cfg.outbound_mode,
        // With a CA every proxy holds a mesh certificate: mTLS config can be generated.
        ca_enabled: cfg.secure.is_some(),
        trust_domain: cfg
            .secure
            .as_ref()
            .map(|s| s.trust_domain.clone())
            .unwrap_or_else(|| MeshSettings::default().trust_domain),
        access_log_file: cfg.access_log_file.clone(),
        preserve_http1_header_case: cfg.preserve_http1_header_case,
    };
    let reg = registry::from_resources(&resources, &cfg.domain);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let push = PushContext::build(format!("{stamp}/{version}"), mesh, Arc::new(resources), reg);
    for what in &push.unsupported {
        warn!(%what, "config not supported; ignored");
    }
    push
}

fn log_errors(store: &store::Store) {
    for e in &store.errors {
        warn!(error = %e, "config rejected; last good version stays in force");
    }
}

/// Fetch the jwksUris the push needs for the first time, put the JWKS snapshot into it, and
/// report the security config it does not enforce.
async fn with_jwks(mut push: PushContext, resolver: &jwks::JwksResolver) -> PushContext {
    resolver.set_timeouts(push.authz.jwks_timeouts());
    resolver.ensure(&push.authz.jwks_uris()).await;
    push.authz.jwks = resolver.snapshot();
    authz::report(&push);
    push
}

/// Run the pilot until the process is stopped.
pub async fn run(cfg: PilotConfig) -> Result<(), PilotError> {
    if !cfg.config_dir.is_dir() {
        return Err(PilotError::ConfigDir(
            cfg.config_dir.clone(),
            "is not a directory".into(),
        ));
    }
    let mut st = store::Store::default();
    let started = Instant::now();
    st.reload(&cfg.config_dir);
    log_errors(&st);
    let mut version = 1u64;
    let resolver = Arc::new(jwks::JwksResolver::new(jwks::refresh_interval_from_env()?));
    let resources = st.resources();
    let push = with_jwks(build_push(&cfg, version, resources), &resolver).await;
    info!(
        resources = push.resources.len(),
        services = push.services.len(),
        errors = st.errors.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "initial config loaded"
    );
    let (push_tx, push_rx) = watch::channel(Arc::new(push));
    let discovery = Discovery::new(push_rx.clone());
    let mut registry = prometheus_client::registry::Registry::default();
    discovery.metrics.register(&mut registry);
    let shared = Arc::new(Shared {
        store: Mutex::new(st),
        push: push_rx,
        discovery: discovery.clone(),
        registry,
        config_dir: cfg.config_dir.clone(),
        jwks: resolver.clone(),
    });

    // File watching: notify's callback runs on its own thread; it only pokes a channel.
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<()>();
    let ev_tx_jwks = ev_tx.clone();
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(ev) if !ev.kind.is_access() => {
                let _ = ev_tx.send(());
            }
            Ok(_) => {}
            Err(e) => error!(error = %e, "config watch error"),
        })
        .map_err(|e| PilotError::Watch(cfg.config_dir.clone(), e))?;
    watcher
        .watch(&cfg.config_dir, RecursiveMode::Recursive)
        .map_err(|e| PilotError::Watch(cfg.config_dir.clone(), e))?;

    let mon_listener = tokio::net::TcpListener::bind(cfg.monitoring_addr)
        .await
        .map_err(|e| PilotError::Bind(cfg.monitoring_addr, e))?;
    tokio::spawn(monitor::serve(mon_listener, shared.clone()));

    // JWKS refresh: fetch every jwksUri in use again; new keys mean a new push, through the
    // debounce loop like a file change.
    let jwks_dirty = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (resolver, dirty, ev, rx) = (
            resolver.clone(),
            jwks_dirty.clone(),
            ev_tx_jwks.clone(),
            shared.push.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(resolver.refresh).await;
                let uris = rx.borrow().authz.jwks_uris();
                if resolver.refresh(&uris).await {
                    dirty.store(true, std::sync::atomic::Ordering::SeqCst);
                    if ev.send(()).is_err() {
                        return;
                    }
                }
            }
        });
    }
    let resolver_dbg = resolver.clone();
    let debounce_cfg = cfg.clone();
    let shared_dbg = shared.clone();
    tokio::spawn(async move {
        // Debounce: wait until changes stop for `debounce` (or `debounce_max` passed), then
        // rebuild once.
        while ev_rx.recv().await.is_some() {
            let first = Instant::now();
            loop {
                let quiet = tokio::time::timeout(debounce_cfg.debounce, ev_rx.recv()).await;
                match quiet {
                    Ok(Some(())) if first.elapsed() < debounce_cfg.debounce_max => continue,
                    Ok(None) => return,
                    _ => break,
                }
            }
            let t = Instant::now();
            let jwks_changed = jwks_dirty.swap(false, std::sync::atomic::Ordering::SeqCst);
            let resources = {
                let Ok(mut st) = shared_dbg.store.lock() else {
                    return;
                };
                let changed = st.reload(&debounce_cfg.config_dir);
                log_errors(&st);
                if !changed && !jwks_changed {
                    continue;
                }
                st.resources()
            };
            version += 1;
            // Built outside every lock; streams pick it up from the watch channel.
            let push =
                with_jwks(build_push(&debounce_cfg, version, resources), &resolver_dbg).await;
            info!(
                version = %push.version,
                services = push.services.len(),
                build_ms = t.elapsed().as_millis() as u64,
                "config changed, pushing"
            );
            if push_tx.send(Arc::new(push)).is_err() {
                return;
            }
        }
    });

    if let Some(secure) = &cfg.secure {
        let server = ca_server::start(secure, discovery.clone()).await?;
        tokio::spawn(async move {
            if let Err(e) = server.await {
                error!(error = %e, "secure xDS/CA server failed");
            }
        });
    }

    info!(addr = %cfg.xds_addr, "serving xDS (ADS, SotW and delta)");
    let incoming = tokio::net::TcpListener::bind(cfg.xds_addr)
        .await
        .map_err(|e| PilotError::Bind(cfg.xds_addr, e))?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(incoming);
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(discovery.into_service())
        .serve_with_incoming(incoming)
        .await;
    drop(watcher);
    result.map_err(PilotError::from)
}
