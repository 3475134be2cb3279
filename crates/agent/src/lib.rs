//! `mizzen-agent`: the pilot-agent role. Given a proxy identity it writes Envoy's bootstrap,
//! runs and supervises Envoy, and serves the readiness probe, exactly the job Istio's
//! `pilot-agent` does next to Envoy. The identity module is also what the native Mizzen proxy
//! presents to the pilot, so both data planes look the same to the control plane.
//!
//! Layout: [`identity`] (node id + metadata), [`bootstrap`] (Envoy's static config),
//! [`envoy`] (process supervision), [`readiness`] (`/healthz/ready`), [`admin`] (Envoy admin
//! client), [`identity_cert`] (workload key + certificate from the pilot's CA, rotated) and
//! [`sds`] (serving it to Envoy as Istio's `default` / `ROOTCA` secrets), and [`run`] tying
//! them together.

pub mod admin;
pub mod bootstrap;
pub mod envoy;
pub mod identity;
pub mod identity_cert;
pub mod readiness;
pub mod sds;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

pub use envoy::{EnvoyOptions, EnvoyStatus};
pub use identity::{DiscoveryAddress, HostInfo, Identity, IdentityError, IdentityInput, ProxyType};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Bootstrap(#[from] bootstrap::BootstrapError),
    #[error(transparent)]
    Envoy(#[from] envoy::EnvoyError),
    #[error("binding the status port {addr}: {error}")]
    StatusBind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error(transparent)]
    Sds(#[from] sds::SdsError),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Everything the agent needs to run one Envoy.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub identity: Identity,
    pub bootstrap: bootstrap::BootstrapOptions,
    /// Where `envoy-rev.json` is written.
    pub config_dir: PathBuf,
    /// `/healthz/ready` port, served by the agent on all interfaces.
    pub status_port: u16,
    pub envoy_binary: PathBuf,
    pub concurrency: u16,
    pub log_level: String,
    pub drain_duration: std::time::Duration,
    /// Workload identity from the pilot's CA, served to Envoy over SDS; `None` keeps the
    /// agent as before (no certificates, plaintext xDS).
    pub identity_cert: Option<identity_cert::CertOptions>,
}

/// A started agent: Envoy is being supervised and the status port is bound.
pub struct Agent {
    status: watch::Receiver<EnvoyStatus>,
    status_addr: SocketAddr,
    bootstrap_path: PathBuf,
    task: tokio::task::JoinHandle<Result<(), AgentError>>,
}

impl Agent {
    /// Write the bootstrap, bind the status port and start Envoy in the background; the agent
    /// runs until `shutdown` completes, then drains and stops Envoy.
    ///
    /// Binding happens here, before anything is spawned, so a port conflict is reported
    /// to the caller instead of surfacing later as a probe that never answers.
    pub async fn start(
        cfg: AgentConfig,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<Agent, AgentError> {
        let mut bs = bootstrap::build(&cfg.identity, &cfg.bootstrap);
        // Certificates and SDS first: Envoy's first connection to the pilot may already need
        // them. The fetch loop and the SDS server live as long as the agent's task.
        let mut security_tasks = Vec::new();
        if let Some(cert) = cfg.identity_cert.clone() {
            let (tx, rx) = watch::channel(None);
            let (socket, sds_task) = sds::SdsServer::new(rx).serve(&cfg.config_dir)?;
            // xDS goes over TLS when it targets the pilot's TLS port, i.e. the CA's address.
            let xds_tls = cert.ca_address == cfg.bootstrap.discovery.to_string();
            bootstrap::add_security(
                &mut bs,
                &bootstrap::BootstrapSecurity {
                    sds_socket: socket,
                    xds_tls,
                },
            );
            security_tasks.push(sds_task);
            security_tasks.push(tokio::spawn(cert.run(tx)));
        }
        let bootstrap_path = bootstrap::write(&cfg.config_dir, &bs)?;
        tracing::info!(
            node = %cfg.identity.node_id(),
            discovery = %cfg.bootstrap.discovery,
            bootstrap = %bootstrap_path.display(),
            "starting Envoy agent"
        );

        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, cfg.status_port));
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(error) => {
                // Nothing else will ever stop the SDS server and the certificate loop.
                for t in &security_tasks {
                    t.abort();
                }
                return Err(AgentError::StatusBind { addr, error });
            }
        };
        let status_addr = listener.local_addr().unwrap_or(addr);

        let admin = admin::AdminClient::new(cfg.bootstrap.admin_port);
        let supervisor = envoy::Supervisor::new(EnvoyOptions {
            binary: cfg.envoy_binary.clone(),
            config_file: bootstrap_path.clone(),
            admin_port: cfg.bootstrap.admin_port,
            concurrency: cfg.concurrency,
            log_level: cfg.log_level.clone(),
            drain_duration: cfg.drain_duration,
        });
        let status = supervisor.status();

        let draining = Arc::new(AtomicBool::new(false));
        let (stop_tx, stop_rx) = watch::channel(false);
        let server = tokio::spawn(readiness::serve(listener, admin, draining.clone(), stop_rx));
        let task = tokio::spawn(async move {
            // The probe turns 503 as soon as shutdown begins, before Envoy starts draining.
            let shutdown = async move {
                shutdown.await;
                draining.store(true, Ordering::Relaxed);
            };
            let result = supervisor.run(shutdown).await;
            for t in security_tasks {
                t.abort();
            }
            // The status server outlives Envoy by nothing: once Envoy is gone there is
            // nothing left to report on.
            let _ = stop_tx.send(true);
            let _ = server.await;
            result.map_err(AgentError::from)
        });
        Ok(Agent {
            status,
            status_addr,
            bootstrap_path,
            task,
        })
    }

    /// Live view of the supervised Envoy (PID, start count).
    pub fn envoy_status(&self) -> watch::Receiver<EnvoyStatus> {
        self.status.clone()
    }

    pub fn status_addr(&self) -> SocketAddr {
        self.status_addr
    }

    pub fn bootstrap_path(&self) -> &std::path::Path {
        &self.bootstrap_path
    }

    /// Wait until the agent has stopped (after `shutdown` fired and Envoy is gone), or Envoy
    /// could not be started.
    pub async fn wait(self) -> Result<(), AgentError> {
        match self.task.await {
            Ok(r) => r,
            // The task only ends abnormally if it panicked; re-raise rather than hide it.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

/// SIGTERM and SIGINT, registered eagerly: install this before starting Envoy so a signal
/// that arrives during startup is handled (drain + stop) rather than killing the agent and
/// orphaning Envoy.
pub struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    pub fn register() -> Result<ShutdownSignals, AgentError> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(ShutdownSignals {
            term: signal(SignalKind::terminate()).map_err(AgentError::Signals)?,
            int: signal(SignalKind::interrupt()).map_err(AgentError::Signals)?,
        })
    }

    /// Completes on the first SIGTERM or SIGINT.
    pub async fn recv(mut self) {
        let name = tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutdown requested");
    }
}
