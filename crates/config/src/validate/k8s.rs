//! Kubernetes objects the mesh reads, checked the way the API server would before they could
//! exist in a cluster: a Service whose ports the API server would reject must not silently
//! turn into listeners here.

use super::names;
use super::{Errs, Path};
use crate::k8s::*;
use std::collections::HashSet;

fn target_port(e: &mut Errs, p: &Path, t: &IntOrString) {
    match t {
        IntOrString::Int(n) => e.check(p, names::port(*n)),
        IntOrString::String(s) => {
            // A numeric string is how some tools serialise the int form.
            if let Ok(n) = s.parse::<i64>() {
                e.check(p, names::port(n));
            } else if !names::is_iana_svc_name(s) {
                e.add(p, format!("{s:?} is not a valid port name: at most 15 lower-case letters, digits and '-', with at least one letter"));
            }
        }
    }
}

const PROTOCOLS: &[&str] = &["TCP", "UDP", "SCTP"];

pub(super) fn service(e: &mut Errs, svc: &Service) {
    let p = Path::root("spec");
    let s = &svc.spec;
    let multi = s.ports.len() > 1;
    let mut names_seen = HashSet::new();
    let mut port_proto = HashSet::new();
    for (i, sp) in s.ports.iter().enumerate() {
        let pp = p.i("ports", i);
        let name = sp.name.as_deref().unwrap_or("");
        if multi && name.is_empty() {
            e.add(
                &pp.f("name"),
                "name is required when a Service has more than one port",
            );
        }
        if !name.is_empty() {
            if !names::is_k8s_dns1123_label(name) {
                e.add(
                    &pp.f("name"),
                    format!(
                        "{name:?} is not a valid port name: must be a lower-case DNS-1123 label"
                    ),
                );
            }
            if !names_seen.insert(name) {
                e.add(&pp.f("name"), format!("duplicate port name {name:?}"));
            }
        }
        e.check(&pp.f("port"), names::port(sp.port));
        let proto = sp.protocol.as_deref().unwrap_or("TCP");
        if !PROTOCOLS.contains(&proto) {
            e.add(
                &pp.f("protocol"),
                format!("unsupported protocol {proto:?}: one of TCP, UDP, SCTP"),
            );
        }
        if !port_proto.insert((sp.port, proto)) {
            e.add(&pp, format!("duplicate port {}/{proto}", sp.port));
        }
        if let Some(t) = &sp.target_port {
            target_port(e, &pp.f("targetPort"), t);
        }
        if let Some(np) = sp.node_port {
            // 0 asks the API server to allocate one.
            if np != 0 {
                e.check(&pp.f("nodePort"), names::port(np));
            }
        }
    }
    let ty = s.service_type.as_deref().unwrap_or("ClusterIP");
    if !matches!(
        ty,
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        e.add(
            &p.f("type"),
            format!(
                "unsupported type {ty:?}: one of ClusterIP, NodePort, LoadBalancer, ExternalName"
            ),
        );
    }
    if ty == "ExternalName" {
        match s.external_name.as_deref() {
            None | Some("") => e.add(
                &p.f("externalName"),
                "externalName is required for type ExternalName",
            ),
            Some(n) => e.check(
                &p.f("externalName"),
                names::fqdn(n.trim_end_matches('.')).and_then(|()| {
                    if names::is_k8s_dns1123_subdomain(n.trim_end_matches('.')) {
                        Ok(())
                    } else {
                        Err(format!("{n:?} is not a valid lower-case DNS name"))
                    }
                }),
            ),
        }
    }
    if let Some(ip) = s.cluster_ip.as_deref() {
        if !ip.is_empty() && ip != "None" {
            e.check(&p.f("clusterIP"), names::ip(ip));
        }
    }
    for (i, ip) in s.cluster_ips.iter().enumerate() {
        if ip != "None" {
            e.check(&p.i("clusterIPs", i), names::ip(ip));
        }
    }
    if let Some(sel) = &s.selector {
        super::labels(e, &p, "selector", sel);
    }
}

pub(super) fn pod(e: &mut Errs, pod: &Pod) {
    let st = Path::root("status");
    if let Some(ip) = pod.status.pod_ip.as_deref() {
        if !ip.is_empty() {
            e.check(&st.f("podIP"), names::ip(ip));
        }
    }
    for (i, ip) in pod.status.pod_ips.iter().enumerate() {
        e.check(&st.i("podIPs", i).f("ip"), names::ip(&ip.ip));
    }
    let sp = Path::root("spec");
    if let Some(sa) = pod.spec.service_account_name.as_deref() {
        if !sa.is_empty() && !names::is_k8s_dns1123_subdomain(sa) {
            e.add(
                &sp.f("serviceAccountName"),
                format!("{sa:?} is not a valid service account name"),
            );
        }
    }
    for (i, c) in pod.spec.containers.iter().enumerate() {
        let cp = sp.i("containers", i);
        let mut seen = HashSet::new();
        for (j, port) in c.ports.iter().enumerate() {
            let pp = cp.i("ports", j);
            e.check(&pp.f("containerPort"), names::port(port.container_port));
            if let Some(n) = port.name.as_deref() {
                if !names::is_iana_svc_name(n) {
                    e.add(&pp.f("name"), format!("{n:?} is not a valid port name: at most 15 lower-case letters, digits and '-', with at least one letter"));
                } else if !seen.insert(n) {
                    e.add(&pp.f("name"), format!("duplicate port name {n:?}"));
                }
            }
        }
    }
}

pub(super) fn endpoints(e: &mut Errs, ep: &Endpoints) {
    let p = Path::root("subsets");
    for (i, s) in ep.subsets.iter().enumerate() {
        let sp = Path(format!("{}[{i}]", p.as_str()));
        for (field, list) in [
            ("addresses", &s.addresses),
            ("notReadyAddresses", &s.not_ready_addresses),
        ] {
            for (j, a) in list.iter().enumerate() {
                e.check(&sp.i(field, j).f("ip"), names::ip(&a.ip));
            }
        }
        for (j, port) in s.ports.iter().enumerate() {
            e.check(&sp.i("ports", j).f("port"), names::port(port.port));
        }
    }
}

pub(super) fn endpoint_slice(e: &mut Errs, es: &EndpointSlice) {
    let ty = es.address_type.as_deref().unwrap_or("");
    if !matches!(ty, "IPv4" | "IPv6" | "FQDN") {
        e.add(
            &Path::root("addressType"),
            format!("unsupported addressType {ty:?}: one of IPv4, IPv6, FQDN"),
        );
    }
    let root = Path::root("");
    for (i, ep) in es.endpoints.iter().enumerate() {
        for (j, a) in ep.addresses.iter().enumerate() {
            let ap = root.i("endpoints", i).i("addresses", j);
            let ok = match ty {
                "IPv4" => a.parse::<std::net::Ipv4Addr>().is_ok(),
                "IPv6" => a.parse::<std::net::Ipv6Addr>().is_ok(),
                _ => names::fqdn(a).is_ok(),
            };
            if !ok {
                e.add(&ap, format!("{a:?} is not a valid {ty} address"));
            }
        }
    }
    for (i, port) in es.ports.iter().enumerate() {
        e.check(&root.i("ports", i).f("port"), names::port(port.port));
    }
}

#[cfg(test)]
mod tests {
    use crate::validate::fields_of;

    #[test]
    fn service_ports() {
        let ok = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n  - {name: grpc, port: 9090, targetPort: grpc-port}\n";
        assert!(fields_of(ok).is_empty());
        let single_unnamed =
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n";
        assert!(fields_of(single_unnamed).is_empty());
        let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports:\n  - {name: http, port: 0, targetPort: 70000}\n  - {name: http, port: 81, targetPort: Bad_Name}\n  - {port: 82, protocol: XYZ}\n";
        assert_eq!(
            fields_of(bad),
            vec![
                "spec.ports[0].port",
                "spec.ports[0].targetPort",
                "spec.ports[1].name",
                "spec.ports[1].targetPort",
                "spec.ports[2].name",
                "spec.ports[2].protocol",
            ]
        );
    }

    #[test]
    fn service_type_and_ips() {
        let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {type: ExternalName, clusterIP: 1.2.3, ports: [{port: 80}]}\n";
        assert_eq!(fields_of(bad), vec!["spec.externalName", "spec.clusterIP"]);
        let ok = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: None, ports: [{port: 80}]}\n";
        assert!(fields_of(ok).is_empty());
    }

    #[test]
    fn pod_ip() {
        let ok = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, ports: [{containerPort: 80, name: http}]}]}\nstatus: {podIP: 10.0.0.1, podIPs: [{ip: 'fd00::1'}]}\n";
        assert!(fields_of(ok).is_empty());
        let bad = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, ports: [{containerPort: 0}]}]}\nstatus: {podIP: not-an-ip}\n";
        assert_eq!(
            fields_of(bad),
            vec!["status.podIP", "spec.containers[0].ports[0].containerPort"]
        );
    }

    #[test]
    fn endpoints_and_slices() {
        let bad = "apiVersion: v1\nkind: Endpoints\nmetadata: {name: e}\nsubsets: [{addresses: [{ip: x}], ports: [{port: 0}]}]\n";
        assert_eq!(
            fields_of(bad),
            vec!["subsets[0].addresses[0].ip", "subsets[0].ports[0].port"]
        );
        let slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e}\naddressType: IPv4\nendpoints: [{addresses: ['fd00::1']}]\nports: [{port: 80}]\n";
        assert_eq!(fields_of(slice), vec!["endpoints[0].addresses[0]"]);
    }
}
