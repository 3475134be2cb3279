//! Rule generation: `Config` -> `Ruleset`, with no I/O.
//!
//! The rules and their order follow istio-iptables (`tools/istio-iptables/pkg/capture/run.go`)
//! so that `iptables-save` output matches Istio's; the conformance tests hold us to Istio's
//! golden files. The comments say why each rule exists, since the order is the logic.

use ipnet::IpNet;

use crate::config::{Config, InterceptionMode, PortSelection, RangeSelection};
use crate::ruleset::{Position, Rule, Ruleset, Table};

pub const ISTIO_OUTPUT: &str = "ISTIO_OUTPUT";
pub const ISTIO_OUTPUT_DNS: &str = "ISTIO_OUTPUT_DNS";
pub const ISTIO_INBOUND: &str = "ISTIO_INBOUND";
pub const ISTIO_DIVERT: &str = "ISTIO_DIVERT";
pub const ISTIO_TPROXY: &str = "ISTIO_TPROXY";
pub const ISTIO_REDIRECT: &str = "ISTIO_REDIRECT";
pub const ISTIO_IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
pub const ISTIO_DROP: &str = "ISTIO_DROP";

/// Port of the agent's DNS proxy.
pub const DNS_PROXY_PORT: &str = "15053";
/// Mark the proxy puts on its own outbound-to-app packets in TPROXY mode, so that they are
/// not captured again as inbound.
pub const OUTBOUND_MARK: &str = "1338";

/// Stands for the per-family address in a dual-stack rule (see `append_versioned`).
const VERSIONED: &str = "\u{0}ip-version-specific";

macro_rules! args {
    ($($x:expr),* $(,)?) => { vec![$($x.to_string()),*] };
}

/// Accumulates rules for both families in call order, like istio-iptables' rule builder.
struct Builder {
    ipv6: bool,
    set: Ruleset,
}

impl Builder {
    fn rule(table: Table, chain: &str, position: Position, args: Vec<String>) -> Rule {
        Rule {
            table,
            chain: chain.to_string(),
            position,
            args,
        }
    }
    fn append_v4(&mut self, table: Table, chain: &str, args: Vec<String>) {
        self.set
            .v4
            .push(Self::rule(table, chain, Position::Append, args));
    }
    fn append_v6(&mut self, table: Table, chain: &str, args: Vec<String>) {
        if self.ipv6 {
            self.set
                .v6
                .push(Self::rule(table, chain, Position::Append, args));
        }
    }
    fn append(&mut self, table: Table, chain: &str, args: Vec<String>) {
        self.append_v4(table, chain, args.clone());
        self.append_v6(table, chain, args);
    }
    fn insert_v4(&mut self, table: Table, chain: &str, pos: u32, args: Vec<String>) {
        self.set
            .v4
            .push(Self::rule(table, chain, Position::Insert(pos), args));
    }
    fn insert_v6(&mut self, table: Table, chain: &str, pos: u32, args: Vec<String>) {
        if self.ipv6 {
            self.set
                .v6
                .push(Self::rule(table, chain, Position::Insert(pos), args));
        }
    }
    fn insert(&mut self, table: Table, chain: &str, pos: u32, args: Vec<String>) {
        self.insert_v4(table, chain, pos, args.clone());
        self.insert_v6(table, chain, pos, args);
    }
    fn append_family(&mut self, v6: bool, table: Table, chain: &str, args: Vec<String>) {
        if v6 {
            self.append_v6(table, chain, args)
        } else {
            self.append_v4(table, chain, args)
        }
    }
    fn insert_family(&mut self, v6: bool, table: Table, chain: &str, pos: u32, args: Vec<String>) {
        if v6 {
            self.insert_v6(table, chain, pos, args)
        } else {
            self.insert_v4(table, chain, pos, args)
        }
    }
    /// One rule in both families, with `VERSIONED` replaced by the family's address.
    fn append_versioned(
        &mut self,
        v4: &str,
        v6: &str,
        table: Table,
        chain: &str,
        args: Vec<String>,
    ) {
        let subst = |with: &str| -> Vec<String> {
            args.iter()
                .map(|a| {
                    if a == VERSIONED {
                        with.to_string()
                    } else {
                        a.clone()
                    }
                })
                .collect()
        };
        self.append_v4(table, chain, subst(v4));
        self.append_v6(table, chain, subst(v6));
    }
}

/// Destination-port matches for a port list: `--dport P` for one port, else `-m multiport
/// --dports a,b,c` (multiport takes at most 15 ports, so longer lists become several rules).
fn dport_matches(ports: &[u16]) -> Vec<Vec<String>> {
    if let [single] = ports {
        return vec![args!["--dport", single]];
    }
    ports
        .chunks(15)
        .map(|chunk| {
            let list: Vec<String> = chunk.iter().map(u16::to_string).collect();
            args!["-m", "multiport", "--dports", list.join(",")]
        })
        .collect()
}

/// The v4 / v6 halves of a CIDR list, and whether either names a loopback address.
struct Ranges {
    all: bool,
    v4: Vec<IpNet>,
    v6: Vec<IpNet>,
    has_loopback: bool,
}

fn split_ranges(sel: &RangeSelection) -> Ranges {
    let (all, cidrs): (bool, &[IpNet]) = match sel {
        RangeSelection::None => (false, &[]),
        RangeSelection::All => (true, &[]),
        RangeSelection::Cidrs(c) => (false, c),
    };
    let v4: Vec<IpNet> = cidrs
        .iter()
        .filter(|c| matches!(c, IpNet::V4(_)))
        .copied()
        .collect();
    let v6: Vec<IpNet> = cidrs
        .iter()
        .filter(|c| matches!(c, IpNet::V6(_)))
        .copied()
        .collect();
    let has_loopback = cidrs.iter().any(|c| c.addr().is_loopback());
    Ranges {
        all,
        v4,
        v6,
        has_loopback,
    }
}

/// Generate istio-iptables' ruleset for `cfg`.
pub fn generate(cfg: &Config) -> Ruleset {
    let mut b = Builder {
        ipv6: cfg.enable_ipv6,
        set: Ruleset::default(),
    };
    let tproxy = cfg.mode == InterceptionMode::Tproxy;
    let loopback = cfg.host_ipv4_loopback_cidr.to_string();
    let tunnel = cfg.inbound_tunnel_port.to_string();
    let include = split_ranges(&cfg.outbound_ip_ranges_include);

    // Redirecting DNS needs somewhere to send it: all of port 53, or the resolv.conf servers.
    let redirect_dns = cfg.redirect_dns
        && (cfg.capture_all_dns
            || !cfg.dns_servers_v4.is_empty()
            || !cfg.dns_servers_v6.is_empty());

    // Excluded interfaces bypass everything, so their RETURNs come first.
    for nic in &cfg.exclude_interfaces {
        b.append(Table::Nat, "PREROUTING", args!["-i", nic, "-j", "RETURN"]);
        b.append(Table::Nat, "OUTPUT", args!["-o", nic, "-j", "RETURN"]);
    }
    if tproxy {
        for nic in &cfg.exclude_interfaces {
            b.append(
                Table::Mangle,
                "PREROUTING",
                args!["-i", nic, "-j", "RETURN"],
            );
            b.append(Table::Mangle, "OUTPUT", args!["-o", nic, "-j", "RETURN"]);
        }
    }
    // Traffic arriving from a VM's virtual interface is not inbound for this workload.
    for nic in &cfg.kube_virt_interfaces {
        b.insert(
            Table::Nat,
            "PREROUTING",
            1,
            args!["-i", nic, "-j", "RETURN"],
        );
    }
    // Drop out-of-window packets rather than letting conntrack reset the connection.
    if cfg.drop_invalid {
        b.append(
            Table::Mangle,
            "PREROUTING",
            args!["-m", "conntrack", "--ctstate", "INVALID", "-j", ISTIO_DROP],
        );
        b.append(Table::Mangle, ISTIO_DROP, args!["-j", "DROP"]);
    }

    // The tunnel (HBONE) port is served by the proxy directly; never redirect it.
    b.append(
        Table::Nat,
        ISTIO_INBOUND,
        args!["-p", "tcp", "--dport", tunnel, "-j", "RETURN"],
    );
    b.append(
        Table::Nat,
        ISTIO_REDIRECT,
        args!["-p", "tcp", "-j", "REDIRECT", "--to-ports", cfg.proxy_port],
    );
    b.append(
        Table::Nat,
        ISTIO_IN_REDIRECT,
        args![
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            cfg.inbound_capture_port
        ],
    );

    inbound(&mut b, cfg);

    // All locally generated traffic goes through ISTIO_OUTPUT (UDP only matters for DNS).
    b.append(Table::Nat, "OUTPUT", args!["-j", ISTIO_OUTPUT]);

    // Port exclusions must come before the rules that send connections back to self.
    for m in dport_matches(&cfg.outbound_ports_exclude) {
        let mut tcp = args!["-p", "tcp"];
        tcp.extend(m.iter().cloned());
        tcp.extend(args!["-j", "RETURN"]);
        b.append(Table::Nat, ISTIO_OUTPUT, tcp);
        let mut udp = args!["-p", "udp"];
        udp.extend(m);
        udp.extend(args!["-j", "RETURN"]);
        b.append(Table::Nat, ISTIO_OUTPUT, udp);
    }

    // 127.0.0.6 / ::6 is the source the proxy's inbound passthrough binds to.
    b.append_versioned(
        "127.0.0.6/32",
        "::6/128",
        Table::Nat,
        ISTIO_OUTPUT,
        args!["-o", "lo", "-s", VERSIONED, "-j", "RETURN"],
    );

    for (owner, ids) in [
        ("--uid-owner", &cfg.proxy_uid),
        ("--gid-owner", &cfg.proxy_gid),
    ] {
        for id in ids {
            proxy_owner_rules(
                &mut b,
                owner,
                id,
                redirect_dns,
                &loopback,
                &tunnel,
                include.has_loopback,
            );
        }
    }

    owner_groups(&mut b, cfg);

    if redirect_dns {
        dns(&mut b, cfg);
    }

    // Envoy-aware apps and container-to-container traffic use localhost: leave it alone.
    b.append_versioned(
        &loopback,
        "::1/128",
        Table::Nat,
        ISTIO_OUTPUT,
        args!["-d", VERSIONED, "-j", "RETURN"],
    );
    // CIDR exclusions must come before inclusions.
    let exclude = split_ranges(&RangeSelection::Cidrs(
        cfg.outbound_ip_ranges_exclude.clone(),
    ));
    for cidr in &exclude.v4 {
        b.append_v4(Table::Nat, ISTIO_OUTPUT, args!["-d", cidr, "-j", "RETURN"]);
    }
    for cidr in &exclude.v6 {
        b.append_v6(Table::Nat, ISTIO_OUTPUT, args!["-d", cidr, "-j", "RETURN"]);
    }

    for port in &cfg.outbound_ports_include {
        b.append(
            Table::Nat,
            ISTIO_OUTPUT,
            args!["-p", "tcp", "--dport", port, "-j", ISTIO_REDIRECT],
        );
    }

    for (v6, cidrs) in [(false, &include.v4), (true, &include.v6)] {
        if include.all {
            b.append_family(v6, Table::Nat, ISTIO_OUTPUT, args!["-j", ISTIO_REDIRECT]);
            for nic in &cfg.kube_virt_interfaces {
                b.insert_family(
                    v6,
                    Table::Nat,
                    "PREROUTING",
                    1,
                    args!["-i", nic, "-j", ISTIO_REDIRECT],
                );
            }
        } else {
            for cidr in cidrs {
                for nic in &cfg.kube_virt_interfaces {
                    b.insert_family(
                        v6,
                        Table::Nat,
                        "PREROUTING",
                        1,
                        args!["-i", nic, "-d", cidr, "-j", ISTIO_REDIRECT],
                    );
                }
                b.append_family(
                    v6,
                    Table::Nat,
                    ISTIO_OUTPUT,
                    args!["-d", cidr, "-j", ISTIO_REDIRECT],
                );
            }
        }
    }

    if tproxy {
        tproxy_marks(&mut b, cfg, &loopback);
    }
    b.set
}

/// Inbound capture: which ports go to the proxy, via NAT REDIRECT or mangle TPROXY.
fn inbound(b: &mut Builder, cfg: &Config) {
    if cfg.inbound_ports_include == PortSelection::None {
        return;
    }
    let tproxy = cfg.mode == InterceptionMode::Tproxy;
    let mark = cfg.inbound_tproxy_mark.to_string();
    let table = if tproxy {
        // Marked packets are routed to loopback (policy routing) and accepted there.
        b.append(
            Table::Mangle,
            ISTIO_DIVERT,
            args!["-j", "MARK", "--set-mark", mark],
        );
        b.append(Table::Mangle, ISTIO_DIVERT, args!["-j", "ACCEPT"]);
        b.append_versioned(
            &cfg.host_ipv4_loopback_cidr.to_string(),
            "::1/128",
            Table::Mangle,
            ISTIO_TPROXY,
            args![
                "!",
                "-d",
                VERSIONED,
                "-p",
                "tcp",
                "-j",
                "TPROXY",
                "--tproxy-mark",
                format!("{mark}/0xffffffff"),
                "--on-port",
                cfg.inbound_capture_port
            ],
        );
        Table::Mangle
    } else {
        Table::Nat
    };
    b.append(table, "PREROUTING", args!["-p", "tcp", "-j", ISTIO_INBOUND]);

    match &cfg.inbound_ports_include {
        PortSelection::All => {
            for m in dport_matches(&cfg.inbound_ports_exclude) {
                let mut r = args!["-p", "tcp"];
                r.extend(m);
                r.extend(args!["-j", "RETURN"]);
                b.append(table, ISTIO_INBOUND, r);
            }
            if tproxy {
                // Packets of established sockets only need diverting to loopback; new
                // connections go through TPROXY.
                b.append(
                    Table::Mangle,
                    ISTIO_INBOUND,
                    args![
                        "-p",
                        "tcp",
                        "-m",
                        "conntrack",
                        "--ctstate",
                        "RELATED,ESTABLISHED",
                        "-j",
                        ISTIO_DIVERT
                    ],
                );
                b.append(
                    Table::Mangle,
                    ISTIO_INBOUND,
                    args!["-p", "tcp", "-j", ISTIO_TPROXY],
                );
            } else {
                b.append(
                    Table::Nat,
                    ISTIO_INBOUND,
                    args!["-p", "tcp", "-j", ISTIO_IN_REDIRECT],
                );
            }
        }
        PortSelection::Ports(ports) => {
            for port in ports {
                if tproxy {
                    b.append(
                        Table::Mangle,
                        ISTIO_INBOUND,
                        args![
                            "-p",
                            "tcp",
                            "--dport",
                            port,
                            "-m",
                            "conntrack",
                            "--ctstate",
                            "RELATED,ESTABLISHED",
                            "-j",
                            ISTIO_DIVERT
                        ],
                    );
                    b.append(
                        Table::Mangle,
                        ISTIO_INBOUND,
                        args!["-p", "tcp", "--dport", port, "-j", ISTIO_TPROXY],
                    );
                } else {
                    b.append(
                        Table::Nat,
                        ISTIO_INBOUND,
                        args!["-p", "tcp", "--dport", port, "-j", ISTIO_IN_REDIRECT],
                    );
                }
            }
        }
        PortSelection::None => {}
    }
}

/// The three rules per proxy uid/gid: loop back via the inbound listener when the proxy
/// calls its own pod by VIP, let apps talk to themselves over lo, never capture the proxy.
fn proxy_owner_rules(
    b: &mut Builder,
    owner: &str,
    id: &str,
    redirect_dns: bool,
    loopback: &str,
    tunnel: &str,
    include_has_loopback: bool,
) {
    let uid = owner == "--uid-owner";
    let negated = owner;
    // Only the uid rule skips port 53 here: with DNS capture the agent (running as the proxy
    // uid) must reach the DNS server directly, not through the inbound listener.
    let port_match = if redirect_dns && uid {
        args!["-m", "multiport", "!", "--dports", format!("53,{tunnel}")]
    } else {
        args!["!", "--dport", tunnel]
    };
    let mut r = args!["-o", "lo", "!", "-d", VERSIONED, "-p", "tcp"];
    r.extend(port_match);
    r.extend(args!["-m", "owner", owner, id, "-j", ISTIO_IN_REDIRECT]);
    b.append_versioned(loopback, "::1/128", Table::Nat, ISTIO_OUTPUT, r);

    // An explicit loopback range in -i means the user wants lo captured: skip this RETURN.
    if !include_has_loopback {
        if redirect_dns {
            // TCP DNS to a local resolver must still be captured.
            b.append(
                Table::Nat,
                ISTIO_OUTPUT,
                args![
                    "-o", "lo", "-p", "tcp", "!", "--dport", "53", "-m", "owner", "!", negated, id,
                    "-j", "RETURN"
                ],
            );
        } else {
            b.append(
                Table::Nat,
                ISTIO_OUTPUT,
                args!["-o", "lo", "-m", "owner", "!", negated, id, "-j", "RETURN"],
            );
        }
    }
    // Never capture the proxy's own traffic (TCP or UDP, any destination): avoids loops.
    b.append(
        Table::Nat,
        ISTIO_OUTPUT,
        args!["-m", "owner", owner, id, "-j", "RETURN"],
    );
}

/// `ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`: capture only (or all but) some groups.
fn owner_groups(b: &mut Builder, cfg: &Config) {
    if cfg.owner_groups_include.trim() == "*" {
        for g in &cfg.owner_groups_exclude {
            b.append(
                Table::Nat,
                ISTIO_OUTPUT,
                args!["-m", "owner", "--gid-owner", g, "-j", "RETURN"],
            );
        }
    } else {
        let mut r = Vec::new();
        for g in crate::config::split(&cfg.owner_groups_include) {
            r.extend(args!["-m", "owner", "!", "--gid-owner", g]);
        }
        r.extend(args!["-j", "RETURN"]);
        b.append(Table::Nat, ISTIO_OUTPUT, r);
    }
}

/// DNS capture: TCP and UDP port 53 to the agent's DNS proxy, and conntrack zones that keep
/// the app<->agent and agent<->server UDP flows apart.
fn dns(b: &mut Builder, cfg: &Config) {
    let all = cfg.capture_all_dns;
    b.append(Table::Raw, "OUTPUT", args!["-j", ISTIO_OUTPUT_DNS]);
    // Jump only in the families that will have redirect rules.
    if all || !cfg.dns_servers_v4.is_empty() {
        b.append_v4(Table::Nat, ISTIO_OUTPUT, args!["-j", ISTIO_OUTPUT_DNS]);
    }
    if all || !cfg.dns_servers_v6.is_empty() {
        b.append_v6(Table::Nat, ISTIO_OUTPUT, args!["-j", ISTIO_OUTPUT_DNS]);
    }
    // istio-iptables spells the TCP target `--to-ports` and the UDP one `--to-port`.
    for (proto, to) in [("tcp", "--to-ports"), ("udp", "--to-port")] {
        if all {
            b.append(
                Table::Nat,
                ISTIO_OUTPUT_DNS,
                args![
                    "-p",
                    proto,
                    "--dport",
                    "53",
                    "-j",
                    "REDIRECT",
                    to,
                    DNS_PROXY_PORT
                ],
            );
        } else {
            for s in &cfg.dns_servers_v4 {
                b.append_v4(
                    Table::Nat,
                    ISTIO_OUTPUT_DNS,
                    args![
                        "-p",
                        proto,
                        "--dport",
                        "53",
                        "-d",
                        format!("{s}/32"),
                        "-j",
                        "REDIRECT",
                        to,
                        DNS_PROXY_PORT
                    ],
                );
            }
            for s in &cfg.dns_servers_v6 {
                b.append_v6(
                    Table::Nat,
                    ISTIO_OUTPUT_DNS,
                    args![
                        "-p",
                        proto,
                        "--dport",
                        "53",
                        "-d",
                        format!("{s}/128"),
                        "-j",
                        "REDIRECT",
                        to,
                        DNS_PROXY_PORT
                    ],
                );
            }
        }
    }

    // Zone 1: agent <-> upstream resolvers; zone 2: apps <-> agent.
    for (owner, ids) in [
        ("--uid-owner", &cfg.proxy_uid),
        ("--gid-owner", &cfg.proxy_gid),
    ] {
        for id in ids {
            b.append(
                Table::Raw,
                ISTIO_OUTPUT_DNS,
                args![
                    "-p", "udp", "--dport", "53", "-m", "owner", owner, id, "-j", "CT", "--zone",
                    "1"
                ],
            );
            b.append(
                Table::Raw,
                ISTIO_OUTPUT_DNS,
                args![
                    "-p",
                    "udp",
                    "--sport",
                    DNS_PROXY_PORT,
                    "-m",
                    "owner",
                    owner,
                    id,
                    "-j",
                    "CT",
                    "--zone",
                    "2"
                ],
            );
        }
    }
    if all {
        b.append(Table::Raw, "PREROUTING", args!["-j", ISTIO_INBOUND]);
        b.append(
            Table::Raw,
            ISTIO_OUTPUT_DNS,
            args!["-p", "udp", "--dport", "53", "-j", "CT", "--zone", "2"],
        );
        b.append(
            Table::Raw,
            ISTIO_INBOUND,
            args!["-p", "udp", "--sport", "53", "-j", "CT", "--zone", "1"],
        );
        return;
    }
    for (v6, servers, len) in [
        (false, &cfg.dns_servers_v4, 32),
        (true, &cfg.dns_servers_v6, 128),
    ] {
        if !servers.is_empty() {
            b.append_family(v6, Table::Raw, "PREROUTING", args!["-j", ISTIO_INBOUND]);
        }
        for s in servers {
            b.append_family(
                v6,
                Table::Raw,
                ISTIO_OUTPUT_DNS,
                args![
                    "-p",
                    "udp",
                    "--dport",
                    "53",
                    "-d",
                    format!("{s}/{len}"),
                    "-j",
                    "CT",
                    "--zone",
                    "2"
                ],
            );
            b.append_family(
                v6,
                Table::Raw,
                ISTIO_INBOUND,
                args![
                    "-p",
                    "udp",
                    "--sport",
                    "53",
                    "-s",
                    format!("{s}/{len}"),
                    "-j",
                    "CT",
                    "--zone",
                    "1"
                ],
            );
        }
    }
}

/// TPROXY bookkeeping in mangle: keep the mark on the connection, and do not capture the
/// proxy's own connections to the app a second time.
fn tproxy_marks(b: &mut Builder, cfg: &Config, loopback: &str) {
    let mark = cfg.inbound_tproxy_mark.to_string();
    b.append(
        Table::Mangle,
        "PREROUTING",
        args![
            "-p",
            "tcp",
            "-m",
            "mark",
            "--mark",
            mark,
            "-j",
            "CONNMARK",
            "--save-mark"
        ],
    );
    b.append(
        Table::Mangle,
        "OUTPUT",
        args!["-p", "tcp", "-o", "lo", "-m", "mark", "--mark", mark, "-j", "RETURN"],
    );
    for (owner, ids) in [
        ("--uid-owner", &cfg.proxy_uid),
        ("--gid-owner", &cfg.proxy_gid),
    ] {
        for id in ids {
            b.append_versioned(
                loopback,
                "::1/128",
                Table::Mangle,
                "OUTPUT",
                args![
                    "!",
                    "-d",
                    VERSIONED,
                    "-p",
                    "tcp",
                    "-o",
                    "lo",
                    "-m",
                    "owner",
                    owner,
                    id,
                    "-j",
                    "MARK",
                    "--set-mark",
                    OUTBOUND_MARK
                ],
            );
        }
    }
    b.append(
        Table::Mangle,
        "OUTPUT",
        args![
            "-p",
            "tcp",
            "-m",
            "connmark",
            "--mark",
            mark,
            "-j",
            "CONNMARK",
            "--restore-mark"
        ],
    );
    b.insert(
        Table::Mangle,
        ISTIO_INBOUND,
        1,
        args!["-p", "tcp", "-m", "mark", "--mark", mark, "-j", "RETURN"],
    );
    b.insert_v4(
        Table::Mangle,
        ISTIO_INBOUND,
        2,
        args![
            "-p",
            "tcp",
            "-s",
            "127.0.0.6/32",
            "-i",
            "lo",
            "-j",
            "RETURN"
        ],
    );
    b.insert_v6(
        Table::Mangle,
        ISTIO_INBOUND,
        2,
        args!["-p", "tcp", "-s", "::6/128", "-i", "lo", "-j", "RETURN"],
    );
    b.insert(
        Table::Mangle,
        ISTIO_INBOUND,
        3,
        args![
            "-p",
            "tcp",
            "-i",
            "lo",
            "-m",
            "mark",
            "!",
            "--mark",
            OUTBOUND_MARK,
            "-j",
            "RETURN"
        ],
    );
}
