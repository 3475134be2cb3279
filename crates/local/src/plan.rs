//! From the user's objects to a concrete plan: which pods, which IPs, which processes, which
//! names and which kube-proxy rules. Pure: no system calls, so it is unit-tested here.

use crate::manifest::{Labels, Manifest, ServiceObj, Workload};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// The bridge in the root namespace that every pod's veth joins.
pub const BRIDGE: &str = "mzbr0";
/// The bridge's address: pods' default gateway, and where the embedded pilot listens.
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
pub const POD_PREFIX_LEN: u8 = 16;
pub const POD_CIDR: &str = "10.244.0.0/16";
/// Pod i gets 10.244.0.(FIRST_POD_HOST + i).
pub const FIRST_POD_HOST: u8 = 10;
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
pub const PILOT_XDS_PORT: u16 = 15010;
pub const PILOT_MONITORING_PORT: u16 = 15014;
/// Istio's fixed ports, used unchanged inside each pod's own network namespace.
pub const PROXY_ADMIN_PORT: u16 = 15000;
pub const PROXY_STATUS_PORT: u16 = 15021;
pub const PROXY_STATS_PORT: u16 = 15090;
pub const PROXY_UID: u32 = 1337;
pub const DOMAIN: &str = "cluster.local";

/// The capture flags Istio's injector gives istio-init (REDIRECT mode, all inbound ports,
/// the agent/health/stats ports excluded).
pub fn capture_flags() -> Vec<String> {
    [
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        "1337",
        "-m",
        "REDIRECT",
        "-i",
        "*",
        "-x",
        "",
        "-b",
        "*",
        "-d",
        "15090,15021,15020",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// What the processes run and where they find the pilot: the binaries (copies inside the
/// state dir, so uid 1337 can reach them) and the pilot's ports on the bridge address.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Bins {
    pub mizzen: PathBuf,
    /// The Envoy the agent runs; `None`: the native Mizzen proxy (`mizzen proxy` alone).
    pub envoy: Option<PathBuf>,
    /// Istio's 15010 / 15014 unless something on this host holds them.
    pub xds_port: u16,
    pub monitoring_port: u16,
    /// Workload identity: the pilot's CA and the per-pod tokens (absent in older states).
    #[serde(default)]
    pub identity: Option<MeshIdentity>,
}

/// Where proxies get their certificates: the pilot's CSR API (its TLS port, Istio's 15012)
/// with a token per pod, verified against the mesh root.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MeshIdentity {
    pub secure_port: u16,
    /// The pilot's CA directory (`root-cert.pem` is read by every proxy).
    pub ca_dir: PathBuf,
    /// One token file per proxy pod: `NAMESPACE.POD`.
    pub tokens_dir: PathBuf,
    /// The agents' config directories, one per pod IP: short, because the SDS Unix socket
    /// lives there and socket paths are limited to 107 bytes.
    pub agents_dir: PathBuf,
}

impl MeshIdentity {
    pub fn token_file(&self, ns: &str, pod: &str) -> PathBuf {
        self.tokens_dir.join(format!("{ns}.{pod}"))
    }

    pub fn agent_dir(&self, ip: Ipv4Addr) -> PathBuf {
        self.agents_dir.join(ip.to_string())
    }
}

/// The label Istio's injector puts on every pod it gives a proxy: the pilot tells from it that
/// the pod accepts mesh mTLS (auto mTLS).
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Runner {
    /// The container's own command, found on this machine.
    Command,
    /// `mizzen sample-app` stands in for an image that cannot run here.
    SampleApp,
    /// An Istio gateway pod: `mizzen proxy router`.
    Router,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ContainerPlan {
    pub name: String,
    pub image: String,
    pub runner: Runner,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub ports: Vec<u16>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodPlan {
    pub name: String,
    pub namespace: String,
    /// The Deployment (or Pod) it came from.
    pub workload: String,
    pub index: usize,
    pub ip: Ipv4Addr,
    /// `ip netns` name.
    pub netns: String,
    /// Root-side veth (the pod side is renamed `eth0` inside the namespace).
    pub veth: String,
    pub labels: Labels,
    pub annotations: Labels,
    pub service_account: String,
    pub sidecar: bool,
    pub gateway: bool,
    pub containers: Vec<ContainerPlan>,
}

impl PodPlan {
    /// Does a proxy (sidecar or gateway router) run in this pod?
    pub fn has_proxy(&self) -> bool {
        self.sidecar || self.gateway
    }

    /// Ports the app containers listen on (what readiness waits for). A gateway's own
    /// listeners come from config and are not waited on.
    pub fn app_ports(&self) -> Vec<u16> {
        self.containers
            .iter()
            .filter(|c| c.runner != Runner::Router)
            .flat_map(|c| c.ports.iter().copied())
            .collect()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServicePortPlan {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: String,
    /// `(pod IP, target port)` of every selected pod.
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServicePlan {
    pub name: String,
    pub namespace: String,
    /// `None` for a headless service (`clusterIP: None`).
    pub cluster_ip: Option<Ipv4Addr>,
    pub ports: Vec<ServicePortPlan>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub pods: Vec<PodPlan>,
    pub services: Vec<ServicePlan>,
}

fn plan_err(m: impl Into<String>) -> crate::LocalError {
    crate::LocalError::Plan(m.into())
}

/// Istio's injection decision, reduced to what a one-machine mesh needs: an explicit pod
/// label/annotation `sidecar.istio.io/inject` wins (both "true" and "false"); otherwise the
/// namespace label `istio-injection=enabled` decides.
pub fn wants_sidecar(ns_labels: &Labels, labels: &Labels, annotations: &Labels) -> bool {
    let key = "sidecar.istio.io/inject";
    match labels
        .get(key)
        .or_else(|| annotations.get(key))
        .map(String::as_str)
    {
        Some("true") => true,
        Some("false") => false,
        _ => ns_labels.get("istio-injection").map(String::as_str) == Some("enabled"),
    }
}

/// Is this pod template Istio's gateway (`istio: ingressgateway|egressgateway`, or the
/// proxyv2 image run with `router`)?
pub fn is_gateway(w: &Workload) -> bool {
    let label = w.labels.get("istio").map(String::as_str);
    if matches!(label, Some("ingressgateway" | "egressgateway")) {
        return true;
    }
    w.containers.iter().any(|c| {
        c.image.contains("proxyv2") && c.args.iter().chain(&c.command).any(|a| a == "router")
    })
}

/// Pod name: a bare Pod keeps its own; Deployment replica i is `NAME-i`.
fn pod_name(w: &Workload, i: u32) -> String {
    if w.bare_pod {
        w.name.clone()
    } else {
        format!("{}-{}", w.name, i)
    }
}

/// Compute the plan. `can_run(cmd)` tells whether a container's command exists here.
pub fn plan(m: &Manifest, bins: &Bins, can_run: &dyn Fn(&str) -> bool) -> crate::Result<Plan> {
    let mut pods = Vec::new();
    let mut names = BTreeSet::new();
    for w in &m.workloads {
        let ns_labels = m.namespace_labels(&w.namespace);
        let gateway = is_gateway(w);
        let sidecar = !gateway && wants_sidecar(&ns_labels, &w.labels, &w.annotations);
        // Checked here so a bad annotation fails `up` before anything is created.
        proxy_config_args(&w.namespace, &w.name, &w.annotations)?;
        for r in 0..w.replicas {
            let index = pods.len();
            let host = u8::try_from(usize::from(FIRST_POD_HOST) + index)
                .ok()
                .filter(|h| *h < 255)
                .ok_or_else(|| {
                    plan_err(
                        "more than 244 pods: the local mesh uses one /24 of 10.244.0.0/16 for pods",
                    )
                })?;
            let name = pod_name(w, r);
            if !names.insert((w.namespace.clone(), name.clone())) {
                return Err(plan_err(format!("two pods named {}/{}", w.namespace, name)));
            }
            let ip = Ipv4Addr::new(10, 244, 0, host);
            let containers = if gateway {
                vec![router_container(w, &name, ip, bins)]
            } else {
                w.containers
                    .iter()
                    .map(|c| app_container(w, c, &name, ip, bins, can_run))
                    .collect()
            };
            pods.push(PodPlan {
                netns: format!("mz-{}-{}", w.namespace, name),
                veth: format!("mzv{index}"),
                name,
                namespace: w.namespace.clone(),
                workload: w.name.clone(),
                index,
                ip,
                labels: {
                    let mut l = w.labels.clone();
                    if sidecar || gateway {
                        l.entry(TLS_MODE_LABEL.into())
                            .or_insert_with(|| "istio".into());
                    }
                    l
                },
                annotations: w.annotations.clone(),
                service_account: w.service_account.clone(),
                sidecar,
                gateway,
                containers,
            });
        }
    }
    let services = plan_services(&m.services, &pods, m)?;
    Ok(Plan { pods, services })
}

fn base_env(w: &Workload, pod: &str, ip: Ipv4Addr) -> Vec<(String, String)> {
    vec![
        ("POD_NAME".into(), pod.to_string()),
        ("POD_NAMESPACE".into(), w.namespace.clone()),
        ("INSTANCE_IP".into(), ip.to_string()),
        ("SERVICE_ACCOUNT".into(), w.service_account.clone()),
    ]
}

fn app_container(
    w: &Workload,
    c: &crate::manifest::ContainerSpec,
    pod: &str,
    ip: Ipv4Addr,
    bins: &Bins,
    can_run: &dyn Fn(&str) -> bool,
) -> ContainerPlan {
    let ports: Vec<u16> = c.ports.iter().map(|(p, _)| *p).collect();
    let mut env = base_env(w, pod, ip);
    env.extend(c.env.iter().cloned());
    let runnable = c.command.first().is_some_and(|cmd| can_run(cmd));
    let (runner, argv) = if runnable {
        let mut argv = c.command.clone();
        argv.extend(c.args.iter().cloned());
        (Runner::Command, argv)
    } else {
        // The version the stand-in reports: the Deployment's SERVICE_VERSION, else its
        // `version` label (what the seed's JSP printed).
        let version = c
            .env
            .iter()
            .find(|(k, _)| k == "SERVICE_VERSION")
            .map(|(_, v)| v.clone())
            .or_else(|| w.labels.get("version").cloned())
            .unwrap_or_else(|| "v1".into());
        if !env.iter().any(|(k, _)| k == "SERVICE_VERSION") {
            env.push(("SERVICE_VERSION".into(), version.clone()));
        }
        let app = w
            .labels
            .get("app")
            .cloned()
            .unwrap_or_else(|| w.name.clone());
        let mut argv = vec![
            bins.mizzen.display().to_string(),
            "sample-app".into(),
            "--name".into(),
            app,
            "--version".into(),
            version,
        ];
        // An image without declared ports still answers somewhere, like the seed's tomcat.
        let listen = if ports.is_empty() {
            vec![8080]
        } else {
            ports.clone()
        };
        for p in &listen {
            argv.push("--port".into());
            argv.push(p.to_string());
        }
        (Runner::SampleApp, argv)
    };
    ContainerPlan {
        name: c.name.clone(),
        image: c.image.clone(),
        runner,
        argv,
        env,
        ports,
    }
}

fn router_container(w: &Workload, pod: &str, ip: Ipv4Addr, bins: &Bins) -> ContainerPlan {
    let mut argv = vec![
        bins.mizzen.display().to_string(),
        "proxy".into(),
        "router".into(),
    ];
    argv.extend(proxy_identity_args(
        bins,
        pod,
        &w.namespace,
        ip,
        &w.service_account,
        &w.labels,
    ));
    // Validated in `plan` before any pod is planned.
    argv.extend(proxy_config_args(&w.namespace, &w.name, &w.annotations).unwrap_or_default());
    let c = w.containers.first();
    ContainerPlan {
        name: c
            .map(|c| c.name.clone())
            .unwrap_or_else(|| "istio-proxy".into()),
        image: c.map(|c| c.image.clone()).unwrap_or_default(),
        runner: Runner::Router,
        argv,
        env: base_env(w, pod, ip)
            .into_iter()
            .chain(proxy_config_env(&w.annotations))
            .collect(),
        ports: w
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().map(|(p, _)| *p))
            .collect(),
    }
}

/// The agent's flags: Envoy, the pilot on the bridge, the pod's identity (and, with the CA,
/// where it gets its certificate), Istio's ports.
pub fn proxy_identity_args(
    bins: &Bins,
    pod: &str,
    ns: &str,
    ip: Ipv4Addr,
    sa: &str,
    labels: &Labels,
) -> Vec<String> {
    let mut a = Vec::new();
    if let Some(envoy) = &bins.envoy {
        a.extend(["--envoy".to_string(), envoy.display().to_string()]);
    }
    // With the pilot's CA, xDS goes over its TLS port too (Istio's 15012): the proxy verifies
    // the pilot against the mesh root and presents its own workload certificate. 15010 stays
    // plaintext for tools and pods outside the mesh identity.
    let discovery_port = bins
        .identity
        .as_ref()
        .map_or(bins.xds_port, |id| id.secure_port);
    a.extend([
        "--discovery-address".into(),
        format!("{BRIDGE_IP}:{discovery_port}"),
        "--pod-name".into(),
        pod.to_string(),
        "--namespace".into(),
        ns.to_string(),
        "--ip".into(),
        ip.to_string(),
        "--service-account".into(),
        sa.to_string(),
    ]);
    for (k, v) in labels {
        a.push("--label".into());
        a.push(format!("{k}={v}"));
    }
    if let Some(id) = &bins.identity {
        a.extend([
            "--ca-address".into(),
            format!("{BRIDGE_IP}:{}", id.secure_port),
            "--token-file".into(),
            id.token_file(ns, pod).display().to_string(),
            "--root-cert".into(),
            id.ca_dir.join("root-cert.pem").display().to_string(),
            "--config-path".into(),
            id.agent_dir(ip).display().to_string(),
        ]);
    }
    a.extend([
        "--admin-port".into(),
        PROXY_ADMIN_PORT.to_string(),
        "--status-port".into(),
        PROXY_STATUS_PORT.to_string(),
        "--stats-port".into(),
        PROXY_STATS_PORT.to_string(),
    ]);
    a
}

/// Istio's per-pod proxy settings: the `proxy.istio.io/config` annotation holds a ProxyConfig
/// in YAML. `concurrency` becomes the proxy's `--concurrency` here; the whole ProxyConfig also
/// goes to the proxy as JSON in `PROXY_CONFIG` ([`proxy_config_env`]), which the pilot reads
/// per-proxy settings from (`proxyHeaders.preserveHttp1HeaderCase`); other fields are ignored.
pub fn proxy_config_args(
    ns: &str,
    workload: &str,
    annotations: &Labels,
) -> crate::Result<Vec<String>> {
    const KEY: &str = "proxy.istio.io/config";
    let Some(text) = annotations.get(KEY) else {
        return Ok(Vec::new());
    };
    let bad = |what: String| plan_err(format!("{ns}/{workload}: annotation {KEY}: {what}"));
    let v: serde_json::Value = serde_yaml_ng::from_str(text)
        .map_err(|e| bad(format!("not a ProxyConfig in YAML: {e}")))?;
    if !(v.is_object() || v.is_null()) {
        return Err(bad("not a ProxyConfig in YAML: expected a mapping".into()));
    }
    match v.get("concurrency") {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(c) => {
            let n = c
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(|| bad(format!("concurrency: {c} is not a number of threads")))?;
            // Istio: 0 means one worker per CPU.
            let n = if n == 0 {
                std::thread::available_parallelism().map_or(1, |p| p.get())
            } else {
                usize::from(n)
            };
            Ok(vec!["--concurrency".into(), n.to_string()])
        }
    }
}

/// The injector's `PROXY_CONFIG` environment variable: the pod's `proxy.istio.io/config`
/// annotation as JSON (the agent puts it in the node metadata). Nothing without the annotation;
/// the annotation is validated by [`proxy_config_args`] (in `plan`, before anything starts).
pub fn proxy_config_env(annotations: &Labels) -> Vec<(String, String)> {
    annotations
        .get("proxy.istio.io/config")
        .and_then(|text| serde_yaml_ng::from_str::<serde_json::Value>(text).ok())
        .filter(serde_json::Value::is_object)
        .map(|v| vec![("PROXY_CONFIG".to_string(), v.to_string())])
        .unwrap_or_default()
}

fn selects(selector: &Labels, labels: &Labels) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn plan_services(
    svcs: &[ServiceObj],
    pods: &[PodPlan],
    m: &Manifest,
) -> crate::Result<Vec<ServicePlan>> {
    // Given clusterIPs are kept; the rest are allocated from 10.96.0.10 upwards around them.
    let mut used: BTreeSet<Ipv4Addr> = BTreeSet::new();
    for s in svcs {
        if let Some(ip) = s.cluster_ip.as_deref().filter(|c| *c != "None") {
            let ip: Ipv4Addr = ip.parse().map_err(|_| {
                plan_err(format!(
                    "Service {}/{}: spec.clusterIP {ip:?} is not an IPv4 address",
                    s.namespace, s.name
                ))
            })?;
            if !used.insert(ip) {
                return Err(plan_err(format!(
                    "Service {}/{}: clusterIP {ip} is used twice",
                    s.namespace, s.name
                )));
            }
        }
    }
    let mut next: u32 = u32::from(Ipv4Addr::new(10, 96, 0, 10));
    let mut out = Vec::new();
    for s in svcs {
        let cluster_ip = match s.cluster_ip.as_deref() {
            Some("None") => None,
            Some(ip) => ip.parse().ok(),
            None => {
                while used.contains(&Ipv4Addr::from(next)) {
                    next += 1;
                }
                if next >= u32::from(Ipv4Addr::new(10, 97, 0, 0)) {
                    return Err(plan_err("out of ClusterIPs in 10.96.0.0/16"));
                }
                let ip = Ipv4Addr::from(next);
                used.insert(ip);
                Some(ip)
            }
        };
        let selected: Vec<&PodPlan> = pods
            .iter()
            .filter(|p| p.namespace == s.namespace && selects(&s.selector, &p.labels))
            .collect();
        let mut ports = Vec::new();
        for sp in &s.ports {
            let mut endpoints = Vec::new();
            for p in &selected {
                let target = match &sp.target {
                    None | Some(Value::Null) => Some(sp.port),
                    Some(Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                    Some(Value::String(name)) => {
                        named_port(m, p, name).or_else(|| name.parse().ok())
                    }
                    Some(_) => None,
                };
                if let Some(t) = target {
                    endpoints.push((p.ip, t));
                }
            }
            ports.push(ServicePortPlan {
                name: sp.name.clone(),
                port: sp.port,
                protocol: sp.protocol.clone(),
                endpoints,
            });
        }
        out.push(ServicePlan {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            cluster_ip,
            ports,
        });
    }
    Ok(out)
}

fn named_port(m: &Manifest, p: &PodPlan, name: &str) -> Option<u16> {
    let w = m
        .workloads
        .iter()
        .find(|w| w.name == p.workload && w.namespace == p.namespace)?;
    w.containers
        .iter()
        .flat_map(|c| c.ports.iter())
        .find(|(_, n)| n.as_deref() == Some(name))
        .map(|(p, _)| *p)
}

/// `/etc/hosts` of one pod: itself, then every service under the names a pod in that
/// namespace would resolve (`svc` only in its own namespace, `svc.ns`, and the FQDN).
pub fn hosts_file(pod: &PodPlan, services: &[ServicePlan]) -> String {
    let mut out = String::from("# written by mizzen local\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    out.push_str(&format!("{}\t{}\n", pod.ip, pod.name));
    for s in services {
        // A headless service resolves to its endpoints; /etc/hosts can only give one.
        let ip = match s.cluster_ip {
            Some(ip) => ip,
            None => match s.ports.iter().flat_map(|p| p.endpoints.first()).next() {
                Some((ip, _)) => *ip,
                None => continue,
            },
        };
        let fqdn = format!("{}.{}.svc.{DOMAIN}", s.name, s.namespace);
        let short = format!("{}.{}", s.name, s.namespace);
        if s.namespace == pod.namespace {
            out.push_str(&format!("{ip}\t{fqdn} {short} {}\n", s.name));
        } else {
            out.push_str(&format!("{ip}\t{fqdn} {short}\n"));
        }
    }
    out
}

/// The pod's `/etc/resolv.conf`: Kubernetes' search path, and a resolver that answers
/// nothing at once (see the crate docs).
pub fn resolv_conf(pod: &PodPlan) -> String {
    format!(
        "# written by mizzen local: names come from /etc/hosts; there is no cluster DNS\n\
         search {ns}.svc.{DOMAIN} svc.{DOMAIN} {DOMAIN}\n\
         nameserver 127.0.0.1\n\
         options ndots:5 timeout:1 attempts:1\n",
        ns = pod.namespace
    )
}

/// kube-proxy's job for pods without a sidecar: `ClusterIP:port` -> a random endpoint. Each
/// rule is the argument list after `iptables -t nat -A MIZZEN-SERVICES`. With n endpoints
/// rule i matches with probability 1/(n-i), which makes the choice uniform.
pub fn service_rules(services: &[ServicePlan]) -> Vec<Vec<String>> {
    let mut rules = Vec::new();
    for s in services {
        let Some(cip) = s.cluster_ip else { continue };
        for p in &s.ports {
            let proto = p.protocol.to_ascii_lowercase();
            if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
                continue;
            }
            let n = p.endpoints.len();
            let comment = format!("{}/{}:{}", s.namespace, s.name, p.port);
            if n == 0 {
                // No endpoints: nothing to DNAT to (the nat table cannot REJECT); the
                // connection times out as it would to an unrouted ClusterIP.
                continue;
            }
            for (i, (ip, target)) in p.endpoints.iter().enumerate() {
                let mut r = svec(&[
                    "-d",
                    &format!("{cip}/32"),
                    "-p",
                    &proto,
                    "--dport",
                    &p.port.to_string(),
                    "-m",
                    "comment",
                    "--comment",
                    &comment,
                ]);
                let left = n - i;
                if left > 1 {
                    r.extend(svec(&[
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        &format!("{:.5}", 1.0 / left as f64),
                    ]));
                }
                r.extend(svec(&[
                    "-j",
                    "DNAT",
                    "--to-destination",
                    &format!("{ip}:{target}"),
                ]));
                rules.push(r);
            }
        }
    }
    rules
}

fn svec(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// The objects the embedded pilot reads: the user's mesh config, Services with their
/// clusterIP, and one Pod per replica with its IP (what the Kubernetes API would hold).
pub fn pilot_objects(m: &Manifest, plan: &Plan) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (i, v) in m.mesh_config.iter().enumerate() {
        let kind = v.get("kind").and_then(Value::as_str).unwrap_or("object");
        let name = v
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("unnamed");
        out.push((
            format!(
                "config-{i:03}-{}-{}.json",
                kind.to_lowercase(),
                sanitize(name)
            ),
            v.clone(),
        ));
    }
    for (s, sp) in m.services.iter().zip(&plan.services) {
        let mut v = s.value.clone();
        let ip = sp
            .cluster_ip
            .map(|i| i.to_string())
            .unwrap_or_else(|| "None".into());
        if let Some(spec) = v.get_mut("spec").and_then(Value::as_object_mut) {
            spec.insert("clusterIP".into(), Value::String(ip.clone()));
            spec.insert("clusterIPs".into(), json!([ip]));
        }
        if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.entry("namespace")
                .or_insert(Value::String(s.namespace.clone()));
        }
        out.push((
            format!(
                "service-{}-{}.json",
                sanitize(&s.namespace),
                sanitize(&s.name)
            ),
            v,
        ));
    }
    for p in &plan.pods {
        let containers: Vec<Value> = p
            .containers
            .iter()
            .map(|c| {
                let named = m
                    .workloads
                    .iter()
                    .find(|w| w.name == p.workload && w.namespace == p.namespace)
                    .and_then(|w| w.containers.iter().find(|x| x.name == c.name));
                let ports: Vec<Value> = match named {
                    Some(spec) => spec
                        .ports
                        .iter()
                        .map(|(port, name)| match name {
                            Some(n) => json!({"containerPort": port, "name": n}),
                            None => json!({"containerPort": port}),
                        })
                        .collect(),
                    None => c
                        .ports
                        .iter()
                        .map(|port| json!({"containerPort": port}))
                        .collect(),
                };
                json!({"name": c.name, "image": c.image, "ports": ports})
            })
            .collect();
        let v = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": p.name,
                "namespace": p.namespace,
                "labels": p.labels,
                "annotations": p.annotations,
            },
            "spec": {"serviceAccountName": p.service_account, "containers": containers},
            "status": {"phase": "Running", "podIP": p.ip.to_string(), "podIPs": [{"ip": p.ip.to_string()}]},
        });
        out.push((
            format!("pod-{}-{}.json", sanitize(&p.namespace), sanitize(&p.name)),
            v,
        ));
    }
    out
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Is `cmd` an executable on this machine (absolute path, or found on PATH)?
pub fn command_exists(cmd: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let is_exec = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if cmd.contains('/') {
        return is_exec(Path::new(cmd));
    }
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|d| is_exec(&d.join(cmd))))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    #[test]
    fn proxy_config_annotation_sets_concurrency() {
        let ann =
            |v: &str| super::Labels::from([("proxy.istio.io/config".to_string(), v.to_string())]);
        let args = |v: &str| super::proxy_config_args("ns", "w", &ann(v));
        assert_eq!(args("concurrency: 1").unwrap(), ["--concurrency", "1"]);
        assert_eq!(
            args("{\"concurrency\": 3, \"holdApplicationUntilProxyStarts\": true}").unwrap(),
            ["--concurrency", "3"]
        );
        assert!(args("holdApplicationUntilProxyStarts: true")
            .unwrap()
            .is_empty());
        assert_eq!(args("concurrency: 0").unwrap()[0], "--concurrency");
        let e = args("concurrency: lots").unwrap_err().to_string();
        assert!(
            e.contains("ns/w") && e.contains("proxy.istio.io/config") && e.contains("concurrency"),
            "{e}"
        );
        assert!(args("[1, 2]").is_err());
        assert!(super::proxy_config_args("ns", "w", &super::Labels::new())
            .unwrap()
            .is_empty());
        // The whole ProxyConfig, as JSON, for the agent's node metadata.
        let env = super::proxy_config_env(&ann("proxyHeaders:\n  preserveHttp1HeaderCase: true"));
        assert_eq!(
            env,
            [(
                "PROXY_CONFIG".to_string(),
                r#"{"proxyHeaders":{"preserveHttp1HeaderCase":true}}"#.to_string()
            )]
        );
        assert!(super::proxy_config_env(&super::Labels::new()).is_empty());
    }

    use super::*;
    use crate::manifest::load_text;

    const YAML: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: hello, labels: {istio-injection: enabled}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: hw-v1, namespace: hello}
spec:
  replicas: 2
  template:
    metadata: {labels: {app: hw, version: "1"}}
    spec:
      containers:
      - {name: web, image: "tomcat:9", ports: [{containerPort: 8080, name: http}], env: [{name: SERVICE_VERSION, value: v1}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: tool, namespace: hello}
spec:
  template:
    metadata:
      labels: {app: tool}
      annotations: {sidecar.istio.io/inject: "false"}
    spec:
      containers:
      - {name: tool, image: curl, command: ["sleep", "infinity"]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: istio-ingressgateway, namespace: istio-system}
spec:
  template:
    metadata: {labels: {istio: ingressgateway}}
    spec:
      containers:
      - {name: istio-proxy, image: "istio/proxyv2", args: [proxy, router], ports: [{containerPort: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: hwsvc, namespace: hello}
spec:
  selector: {app: hw}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: fixed, namespace: hello}
spec:
  clusterIP: 10.96.0.10
  selector: {app: nothing}
  ports: [{port: 9000}]
"#;

    fn bins() -> Bins {
        Bins {
            mizzen: "/s/bin/mizzen".into(),
            envoy: Some("/s/bin/envoy".into()),
            xds_port: 15010,
            monitoring_port: 15014,
            identity: Some(MeshIdentity {
                secure_port: 15012,
                ca_dir: "/s/ca".into(),
                tokens_dir: "/s/tokens".into(),
                agents_dir: "/s/agents".into(),
            }),
        }
    }

    fn setup() -> (Manifest, Plan) {
        let mut m = Manifest::default();
        load_text(Path::new("t.yaml"), YAML, &mut m).unwrap();
        let p = plan(&m, &bins(), &|c| c == "sleep").unwrap();
        (m, p)
    }

    #[test]
    fn pods_ips_injection_and_runners() {
        let (_, p) = setup();
        let names: Vec<_> = p
            .pods
            .iter()
            .map(|p| (p.name.as_str(), p.ip.to_string(), p.sidecar, p.gateway))
            .collect();
        assert_eq!(
            names,
            vec![
                ("hw-v1-0", "10.244.0.10".to_string(), true, false),
                ("hw-v1-1", "10.244.0.11".to_string(), true, false),
                ("tool-0", "10.244.0.12".to_string(), false, false),
                (
                    "istio-ingressgateway-0",
                    "10.244.0.13".to_string(),
                    false,
                    true
                ),
            ]
        );
        let hw = &p.pods[0].containers[0];
        assert_eq!(hw.runner, Runner::SampleApp);
        assert_eq!(
            hw.argv,
            vec![
                "/s/bin/mizzen",
                "sample-app",
                "--name",
                "hw",
                "--version",
                "v1",
                "--port",
                "8080"
            ]
        );
        assert!(hw
            .env
            .contains(&("INSTANCE_IP".into(), "10.244.0.10".into())));
        assert_eq!(p.pods[2].containers[0].argv, vec!["sleep", "infinity"]);
        let gw = &p.pods[3].containers[0];
        assert_eq!(gw.runner, Runner::Router);
        assert_eq!(&gw.argv[..3], &["/s/bin/mizzen", "proxy", "router"]);
        assert!(gw
            .argv
            .windows(2)
            .any(|w| w == ["--label", "istio=ingressgateway"]));
        assert!(gw
            .argv
            .windows(2)
            .any(|w| w == ["--discovery-address", "10.244.0.1:15012"]));
        // Workload identity: the injector's tlsMode label on proxy pods only, and the CA
        // flags with this pod's own token and a short agent directory (SDS socket).
        assert_eq!(
            p.pods[0].labels.get(TLS_MODE_LABEL).map(String::as_str),
            Some("istio")
        );
        assert!(!p.pods[2].labels.contains_key(TLS_MODE_LABEL));
        for w in [
            ["--ca-address", "10.244.0.1:15012"],
            [
                "--token-file",
                "/s/tokens/istio-system.istio-ingressgateway-0",
            ],
            ["--root-cert", "/s/ca/root-cert.pem"],
            ["--config-path", "/s/agents/10.244.0.13"],
        ] {
            assert!(gw.argv.windows(2).any(|x| x == w), "{w:?} in {:?}", gw.argv);
        }
        assert_eq!(p.pods[3].netns, "mz-istio-system-istio-ingressgateway-0");
    }

    #[test]
    fn cluster_ips_kept_and_allocated_around_given_ones() {
        let (_, p) = setup();
        let hw = &p.services[0];
        // 10.96.0.10 is taken by `fixed`, so the first allocated one is .11.
        assert_eq!(hw.cluster_ip, Some(Ipv4Addr::new(10, 96, 0, 11)));
        assert_eq!(
            hw.ports[0].endpoints,
            vec![
                (Ipv4Addr::new(10, 244, 0, 10), 8080),
                (Ipv4Addr::new(10, 244, 0, 11), 8080)
            ]
        );
        assert_eq!(p.services[1].cluster_ip, Some(Ipv4Addr::new(10, 96, 0, 10)));
    }

    #[test]
    fn hosts_have_three_names_in_own_namespace() {
        let (_, p) = setup();
        let h = hosts_file(&p.pods[2], &p.services);
        assert!(
            h.contains("10.96.0.11\thwsvc.hello.svc.cluster.local hwsvc.hello hwsvc\n"),
            "{h}"
        );
        assert!(h.contains("10.244.0.12\ttool-0\n"));
        let g = hosts_file(&p.pods[3], &p.services);
        assert!(
            g.contains("10.96.0.11\thwsvc.hello.svc.cluster.local hwsvc.hello\n"),
            "{g}"
        );
        assert!(!g.contains(" hwsvc\n"));
    }

    #[test]
    fn service_rules_balance_uniformly() {
        let (_, p) = setup();
        let rules: Vec<String> = service_rules(&p.services)
            .iter()
            .map(|r| r.join(" "))
            .collect();
        assert_eq!(rules[0], "-d 10.96.0.11/32 -p tcp --dport 80 -m comment --comment hello/hwsvc:80 -m statistic --mode random --probability 0.50000 -j DNAT --to-destination 10.244.0.10:8080");
        assert_eq!(rules[1], "-d 10.96.0.11/32 -p tcp --dport 80 -m comment --comment hello/hwsvc:80 -j DNAT --to-destination 10.244.0.11:8080");
        assert_eq!(rules.len(), 2, "a service without endpoints gets no rule");
    }

    #[test]
    fn pilot_gets_services_with_ips_and_pods_with_status() {
        let (m, p) = setup();
        let objs = pilot_objects(&m, &p);
        let svc = objs
            .iter()
            .find(|(n, _)| n == "service-hello-hwsvc.json")
            .unwrap();
        assert_eq!(svc.1.pointer("/spec/clusterIP").unwrap(), "10.96.0.11");
        let pod = objs
            .iter()
            .find(|(n, _)| n == "pod-hello-hw-v1-1.json")
            .unwrap();
        assert_eq!(pod.1.pointer("/status/podIP").unwrap(), "10.244.0.11");
        assert_eq!(
            pod.1.pointer("/spec/containers/0/ports/0/name").unwrap(),
            "http"
        );
        assert_eq!(pod.1.pointer("/metadata/labels/version").unwrap(), "1");
        // Every object decodes with the pilot's own loader.
        for (name, v) in &objs {
            let text = serde_json::to_string(v).unwrap();
            let l = mizzen_config::load::load_str(Path::new(name), &text);
            assert_eq!(
                l.errors().count(),
                0,
                "{name}: {:?}",
                l.errors().map(|e| e.to_string()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn injection_rules() {
        let l = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Labels>()
        };
        let ns_on = l(&[("istio-injection", "enabled")]);
        assert!(wants_sidecar(&ns_on, &l(&[]), &l(&[])));
        assert!(!wants_sidecar(
            &ns_on,
            &l(&[]),
            &l(&[("sidecar.istio.io/inject", "false")])
        ));
        assert!(wants_sidecar(
            &l(&[]),
            &l(&[]),
            &l(&[("sidecar.istio.io/inject", "true")])
        ));
        assert!(!wants_sidecar(&l(&[]), &l(&[]), &l(&[])));
    }
}
