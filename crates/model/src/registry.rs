//! Platform adapters: turn platform objects into services, endpoints and workloads.
//!
//! Each adapter produces a [`RegistrySnapshot`]; the push context merges them. Today the
//! file adapter reads Kubernetes objects (Service, Endpoints, EndpointSlice, Pod) and Istio's
//! ServiceEntry / WorkloadEntry from the config store. A live Kubernetes watcher or VM
//! auto-registration are further adapters producing the same snapshot; the generators only
//! ever see the merged result.

use crate::service::{
    selector_matches, Endpoint, Labels, Locality, Protocol, Resolution, Service, ServicePort,
    ServiceSource, Workload, WorkloadKind,
};
use mizzen_config::k8s::{self, IntOrString};
use mizzen_config::networking as net;
use mizzen_config::{Kind, Resource, Spec};
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

/// An endpoint address from an Endpoints/EndpointSlice object: IP, the pod it names, ready.
type ExplicitAddr<'a> = (String, Option<&'a k8s::ObjectReference>, bool);

/// What one adapter knows.
#[derive(Clone, Debug, Default)]
pub struct RegistrySnapshot {
    pub services: Vec<Service>,
    /// Endpoints per (service hostname, service port).
    pub endpoints: BTreeMap<(String, u16), Vec<Endpoint>>,
    pub workloads: Vec<Workload>,
}

impl RegistrySnapshot {
    pub fn merge(&mut self, other: RegistrySnapshot) {
        self.services.extend(other.services);
        for (k, mut v) in other.endpoints {
            self.endpoints.entry(k).or_default().append(&mut v);
        }
        self.workloads.extend(other.workloads);
    }
}

/// The file/Kubernetes-object adapter.
pub fn from_resources(resources: &[Resource], domain: &str) -> RegistrySnapshot {
    let mut out = RegistrySnapshot::default();
    let pods: Vec<(&Resource, &k8s::Pod)> = resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::Pod(p) => Some((r, p)),
            _ => None,
        })
        .collect();
    let workload_entries: Vec<(&Resource, &net::WorkloadEntry)> = resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::WorkloadEntry(w) => Some((r, w)),
            _ => None,
        })
        .collect();

    for (r, p) in &pods {
        out.workloads.push(pod_workload(r, p));
    }
    for (r, w) in &workload_entries {
        out.workloads.push(entry_workload(
            &r.meta.name,
            &r.meta.namespace,
            &r.meta.labels,
            w,
        ));
    }

    for r in resources {
        match &r.spec {
            Spec::Service(svc) => kube_service(r, svc, domain, resources, &pods, &mut out),
            Spec::ServiceEntry(se) => service_entry(r, se, &pods, &workload_entries, &mut out),
            _ => {}
        }
    }
    out
}

fn pod_ip(p: &k8s::Pod) -> Option<IpAddr> {
    p.status
        .pod_ip
        .as_deref()
        .or_else(|| p.status.pod_ips.first().map(|i| i.ip.as_str()))
        .and_then(|s| s.parse().ok())
}

fn pod_locality(labels: &Labels) -> Locality {
    Locality::from_labels(labels)
}

fn pod_workload(r: &Resource, p: &k8s::Pod) -> Workload {
    let mut named_ports = BTreeMap::new();
    for c in &p.spec.containers {
        for port in &c.ports {
            if let (Some(name), Ok(num)) = (&port.name, u16::try_from(port.container_port)) {
                named_ports.insert(name.clone(), num);
            }
        }
    }
    Workload {
        name: r.meta.name.clone(),
        namespace: r.meta.namespace.clone(),
        ip: pod_ip(p),
        labels: r.meta.labels.clone(),
        service_account: p
            .spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".to_string()),
        locality: pod_locality(&r.meta.labels),
        kind: WorkloadKind::Pod,
        named_ports,
    }
}

fn entry_workload(
    name: &str,
    namespace: &str,
    meta_labels: &Labels,
    w: &net::WorkloadEntry,
) -> Workload {
    let mut labels = meta_labels.clone();
    labels.extend(w.labels.clone());
    Workload {
        name: name.to_string(),
        namespace: namespace.to_string(),
        ip: w.address.parse().ok(),
        labels,
        service_account: w
            .service_account
            .clone()
            .unwrap_or_else(|| "default".to_string()),
        locality: w
            .locality
            .as_deref()
            .map(Locality::parse)
            .unwrap_or_default(),
        kind: WorkloadKind::WorkloadEntry,
        named_ports: w
            .ports
            .iter()
            .filter_map(|(k, v)| u16::try_from(*v).ok().map(|p| (k.clone(), p)))
            .collect(),
    }
}

fn kube_port_protocol(p: &k8s::K8sServicePort) -> Protocol {
    if let Some(ap) = &p.app_protocol {
        let proto = Protocol::parse(ap);
        if proto != Protocol::Auto {
            return proto;
        }
    }
    if p.protocol.as_deref() == Some("UDP") {
        return Protocol::Udp;
    }
    Protocol::from_port_name(p.name.as_deref().unwrap_or(""))
}

fn kube_service(
    r: &Resource,
    svc: &k8s::Service,
    domain: &str,
    all: &[Resource],
    pods: &[(&Resource, &k8s::Pod)],
    out: &mut RegistrySnapshot,
) {
    let ns = &r.meta.namespace;
    let hostname = format!("{}.{}.svc.{}", r.meta.name, ns, domain);
    let ports: Vec<ServicePort> = svc
        .spec
        .ports
        .iter()
        .filter_map(|p| {
            Some(ServicePort {
                name: p.name.clone().unwrap_or_default(),
                port: u16::try_from(p.port).ok()?,
                protocol: kube_port_protocol(p),
            })
        })
        .collect();
    let cluster_ip = svc.spec.cluster_ip.as_deref().unwrap_or("");
    let headless = cluster_ip == "None";
    let external_name = svc.spec.service_type.as_deref() == Some("ExternalName");
    let resolution = if external_name {
        Resolution::Dns
    } else if headless {
        Resolution::Passthrough
    } else {
        Resolution::ClientSideLb
    };
    let service = Service {
        hostname: hostname.clone(),
        namespace: ns.clone(),
        name: r.meta.name.clone(),
        ports: ports.clone(),
        address: cluster_ip.parse().ok(),
        addresses: Vec::new(),
        resolution,
        mesh_external: false,
        labels: r.meta.labels.clone(),
        export_to: r
            .meta
            .annotations
            .get("networking.istio.io/exportTo")
            .map(|s| s.split(',').map(|x| x.trim().to_string()).collect())
            .unwrap_or_default(),
        source: ServiceSource::Kubernetes,
    };
    out.services.push(service);

    if external_name {
        if let Some(target) = &svc.spec.external_name {
            for sp in &ports {
                out.endpoints
                    .entry((hostname.clone(), sp.port))
                    .or_default()
                    .push(endpoint_for(
                        target,
                        sp.port,
                        &Labels::new(),
                        "default",
                        ns,
                        "",
                    ));
            }
        }
        return;
    }

    let mut seen: HashSet<(String, u16, u16)> = HashSet::new();
    // Pods picked by the selector, exactly as the Kubernetes endpoints controller would.
    if let Some(selector) = svc.spec.selector.as_ref().filter(|s| !s.is_empty()) {
        for (pr, pod) in pods {
            if pr.meta.namespace != *ns || !selector_matches(selector, &pr.meta.labels) {
                continue;
            }
            let Some(ip) = pod_ip(pod) else { continue };
            let wl = pod_workload(pr, pod);
            for (sp, kp) in ports.iter().zip(&svc.spec.ports) {
                let target = match &kp.target_port {
                    None => Some(sp.port),
                    Some(IntOrString::Int(i)) => u16::try_from(*i).ok(),
                    Some(IntOrString::String(name)) => wl.named_ports.get(name).copied(),
                };
                let Some(target) = target else { continue };
                if seen.insert((ip.to_string(), sp.port, target)) {
                    let mut ep = endpoint_for(
                        &ip.to_string(),
                        target,
                        &wl.labels,
                        &wl.service_account,
                        ns,
                        &wl.name,
                    );
                    ep.locality = wl.locality.clone();
                    out.endpoints
                        .entry((hostname.clone(), sp.port))
                        .or_default()
                        .push(ep);
                }
            }
        }
    }
    // Endpoints / EndpointSlices given explicitly (services without selectors, or objects
    // copied from a live cluster).
    for other in all {
        if other.meta.namespace != *ns {
            continue;
        }
        let (addrs, eports): (Vec<ExplicitAddr<'_>>, &Vec<k8s::EndpointPort>) = match &other.spec {
            Spec::Endpoints(e) if other.meta.name == r.meta.name => {
                for subset in &e.subsets {
                    let list = subset
                        .addresses
                        .iter()
                        .map(|a| (a.ip.clone(), a.target_ref.as_ref(), true))
                        .chain(
                            subset
                                .not_ready_addresses
                                .iter()
                                .map(|a| (a.ip.clone(), a.target_ref.as_ref(), false)),
                        )
                        .collect();
                    add_explicit(
                        &hostname,
                        ns,
                        &ports,
                        &svc.spec.ports,
                        list,
                        &subset.ports,
                        pods,
                        &mut seen,
                        out,
                    );
                }
                continue;
            }
            Spec::EndpointSlice(s)
                if other.kind == Kind::EndpointSlice
                    && other.meta.labels.get("kubernetes.io/service-name")
                        == Some(&r.meta.name) =>
            {
                let list = s
                    .endpoints
                    .iter()
                    .flat_map(|e| {
                        let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                        e.addresses
                            .iter()
                            .map(move |a| (a.clone(), e.target_ref.as_ref(), ready))
                    })
                    .collect();
                (list, &s.ports)
            }
            _ => continue,
        };
        add_explicit(
            &hostname,
            ns,
            &ports,
            &svc.spec.ports,
            addrs,
            eports,
            pods,
            &mut seen,
            out,
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn add_explicit(
    hostname: &str,
    ns: &str,
    ports: &[ServicePort],
    kports: &[k8s::K8sServicePort],
    addrs: Vec<ExplicitAddr<'_>>,
    eports: &[k8s::EndpointPort],
    pods: &[(&Resource, &k8s::Pod)],
    seen: &mut HashSet<(String, u16, u16)>,
    out: &mut RegistrySnapshot,
) {
    for (sp, kp) in ports.iter().zip(kports) {
        // Endpoint ports are matched to service ports by name (single unnamed port: by position).
        let target = eports
            .iter()
            .find(|ep| ep.name.as_deref().unwrap_or("") == kp.name.as_deref().unwrap_or(""))
            .or_else(|| (eports.len() == 1 && ports.len() == 1).then(|| &eports[0]))
            .and_then(|ep| u16::try_from(ep.port).ok());
        let Some(target) = target else { continue };
        for (ip, tref, ready) in &addrs {
            if !seen.insert((ip.clone(), sp.port, target)) {
                continue;
            }
            let pod = tref.and_then(|t| t.name.as_ref()).and_then(|n| {
                pods.iter()
                    .find(|(r, _)| r.meta.name == *n && r.meta.namespace == ns)
            });
            let (labels, sa, wname) = match pod {
                Some((r, p)) => (
                    r.meta.labels.clone(),
                    p.spec
                        .service_account_name
                        .clone()
                        .unwrap_or_else(|| "default".into()),
                    r.meta.name.clone(),
                ),
                None => (Labels::new(), "default".to_string(), String::new()),
            };
            let mut ep = endpoint_for(ip, target, &labels, &sa, ns, &wname);
            ep.healthy = *ready;
            out.endpoints
                .entry((hostname.to_string(), sp.port))
                .or_default()
                .push(ep);
        }
    }
}

fn endpoint_for(
    addr: &str,
    port: u16,
    labels: &Labels,
    sa: &str,
    ns: &str,
    workload: &str,
) -> Endpoint {
    Endpoint {
        address: addr.to_string(),
        port,
        labels: labels.clone(),
        service_account: sa.to_string(),
        locality: Locality::default(),
        weight: 1,
        workload: workload.to_string(),
        namespace: ns.to_string(),
        healthy: true,
    }
}

fn service_entry(
    r: &Resource,
    se: &net::ServiceEntry,
    pods: &[(&Resource, &k8s::Pod)],
    entries: &[(&Resource, &net::WorkloadEntry)],
    out: &mut RegistrySnapshot,
) {
    let ns = &r.meta.namespace;
    let resolution = match se.resolution {
        net::Resolution::None => Resolution::Passthrough,
        net::Resolution::Static => Resolution::ClientSideLb,
        net::Resolution::Dns => Resolution::Dns,
        net::Resolution::DnsRoundRobin => Resolution::DnsRoundRobin,
    };
    let ports: Vec<(ServicePort, Option<u32>)> = se
        .ports
        .iter()
        .filter_map(|p| {
            Some((
                ServicePort {
                    name: p.name.clone(),
                    port: u16::try_from(p.number).ok()?,
                    protocol: Protocol::parse(&p.protocol),
                },
                p.target_port,
            ))
        })
        .collect();
    let address = se.addresses.iter().find_map(|a| a.parse::<IpAddr>().ok());
    // Workloads selected by workloadSelector: WorkloadEntries and Pods of the same namespace.
    let mut selected: Vec<Workload> = Vec::new();
    if let Some(sel) = &se.workload_selector {
        for (wr, we) in entries {
            let wl = entry_workload(&wr.meta.name, &wr.meta.namespace, &wr.meta.labels, we);
            if wr.meta.namespace == *ns && selector_matches(&sel.labels, &wl.labels) {
                selected.push(wl);
            }
        }
        for (pr, pod) in pods {
            if pr.meta.namespace == *ns && selector_matches(&sel.labels, &pr.meta.labels) {
                selected.push(pod_workload(pr, pod));
            }
        }
    }
    for host in &se.hosts {
        out.services.push(Service {
            hostname: host.clone(),
            namespace: ns.clone(),
            name: host.clone(),
            ports: ports.iter().map(|(p, _)| p.clone()).collect(),
            address,
            addresses: se.addresses.clone(),
            resolution,
            mesh_external: se.location == net::Location::MeshExternal,
            labels: r.meta.labels.clone(),
            export_to: se.export_to.clone(),
            source: ServiceSource::ServiceEntry {
                namespace: ns.clone(),
                name: r.meta.name.clone(),
            },
        });
        for (sp, target_port) in &ports {
            let default_port = target_port
                .and_then(|t| u16::try_from(t).ok())
                .unwrap_or(sp.port);
            let key = (host.clone(), sp.port);
            for we in &se.endpoints {
                let port = we
                    .ports
                    .get(&sp.name)
                    .and_then(|p| u16::try_from(*p).ok())
                    .unwrap_or(default_port);
                let mut ep = endpoint_for(
                    &we.address,
                    port,
                    &we.labels,
                    we.service_account.as_deref().unwrap_or("default"),
                    ns,
                    "",
                );
                ep.weight = we.weight.unwrap_or(1).max(1);
                ep.locality = we
                    .locality
                    .as_deref()
                    .map(Locality::parse)
                    .unwrap_or_default();
                out.endpoints.entry(key.clone()).or_default().push(ep);
            }
            for wl in &selected {
                let Some(ip) = wl.ip else { continue };
                let port = wl
                    .named_ports
                    .get(&sp.name)
                    .copied()
                    .unwrap_or(default_port);
                let mut ep = endpoint_for(
                    &ip.to_string(),
                    port,
                    &wl.labels,
                    &wl.service_account,
                    ns,
                    &wl.name,
                );
                ep.locality = wl.locality.clone();
                out.endpoints.entry(key.clone()).or_default().push(ep);
            }
            // DNS resolution with no endpoints: the host itself is resolved by the proxy.
            if matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin)
                && se.endpoints.is_empty()
                && selected.is_empty()
                && !host.starts_with('*')
            {
                {
                    out.endpoints
                        .entry(key.clone())
                        .or_default()
                        .push(endpoint_for(
                            host,
                            default_port,
                            &Labels::new(),
                            "default",
                            ns,
                            "",
                        ));
                }
            }
        }
    }
}
