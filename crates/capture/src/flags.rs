//! The istio-iptables command line: the same short and long flags, defaults and environment
//! variables (istio-iptables binds each flag to the upper-cased flag name, e.g. `ENVOY_PORT`,
//! `ISTIO_INBOUND_PORTS`, plus a few legacy names such as `INBOUND_INTERCEPTION_MODE`).

use clap::{ArgAction, Args};

use crate::config::{self, Config, InterceptionMode};
use crate::error::ConfigError;

/// Flags of `mizzen iptables` / `istio-iptables`.
#[derive(Debug, Clone, Default, Args)]
pub struct Flags {
    /// Envoy port to which all outbound TCP traffic is redirected.
    #[arg(
        short = 'p',
        long = "envoy-port",
        env = "ENVOY_PORT",
        default_value = "15001"
    )]
    pub envoy_port: String,
    /// Port to which all inbound TCP traffic is redirected.
    #[arg(
        short = 'z',
        long = "inbound-capture-port",
        env = "INBOUND_CAPTURE_PORT",
        default_value = "15006"
    )]
    pub inbound_capture_port: String,
    /// Istio tunnel (HBONE) port, never redirected inbound.
    #[arg(
        short = 'e',
        long = "inbound-tunnel-port",
        env = "INBOUND_TUNNEL_PORT",
        default_value = "15008"
    )]
    pub inbound_tunnel_port: String,
    /// UID(s) whose traffic is not redirected (the proxy); default: uid of $ENVOY_USER, or 1337.
    #[arg(short = 'u', long = "proxy-uid", env = "PROXY_UID", default_value = "")]
    pub proxy_uid: String,
    /// GID(s) whose traffic is not redirected; default: same as --proxy-uid.
    #[arg(short = 'g', long = "proxy-gid", env = "PROXY_GID", default_value = "")]
    pub proxy_gid: String,
    /// Inbound interception mode: REDIRECT or TPROXY.
    #[arg(
        short = 'm',
        long = "istio-inbound-interception-mode",
        env = "ISTIO_INBOUND_INTERCEPTION_MODE",
        default_value = ""
    )]
    pub inbound_interception_mode: String,
    /// Mark used for TPROXY inbound packets.
    #[arg(
        short = 't',
        long = "istio-inbound-tproxy-mark",
        env = "ISTIO_INBOUND_TPROXY_MARK",
        default_value = ""
    )]
    pub inbound_tproxy_mark: String,
    /// Routing table used for TPROXY inbound packets.
    #[arg(
        short = 'r',
        long = "istio-inbound-tproxy-route-table",
        env = "ISTIO_INBOUND_TPROXY_ROUTE_TABLE",
        default_value = "133"
    )]
    pub inbound_tproxy_route_table: String,
    /// Inbound ports to redirect ("*" for all, empty for none).
    #[arg(
        short = 'b',
        long = "istio-inbound-ports",
        env = "ISTIO_INBOUND_PORTS",
        default_value = ""
    )]
    pub inbound_ports: String,
    /// Inbound ports excluded from redirection (with -b "*").
    #[arg(
        short = 'd',
        long = "istio-local-exclude-ports",
        env = "ISTIO_LOCAL_EXCLUDE_PORTS",
        default_value = ""
    )]
    pub local_exclude_ports: String,
    /// Interfaces whose traffic is never captured.
    #[arg(
        short = 'c',
        long = "istio-exclude-interfaces",
        env = "ISTIO_EXCLUDE_INTERFACES",
        default_value = ""
    )]
    pub exclude_interfaces: String,
    /// Outbound CIDRs to redirect ("*" for all, empty for none).
    #[arg(
        short = 'i',
        long = "istio-service-cidr",
        env = "ISTIO_SERVICE_CIDR",
        default_value = ""
    )]
    pub service_cidr: String,
    /// Outbound CIDRs excluded from redirection.
    #[arg(
        short = 'x',
        long = "istio-service-exclude-cidr",
        env = "ISTIO_SERVICE_EXCLUDE_CIDR",
        default_value = ""
    )]
    pub service_exclude_cidr: String,
    /// Outbound ports always redirected.
    #[arg(
        short = 'q',
        long = "istio-outbound-ports",
        env = "ISTIO_OUTBOUND_PORTS",
        default_value = ""
    )]
    pub outbound_ports: String,
    /// Outbound ports excluded from redirection.
    #[arg(
        short = 'o',
        long = "istio-local-outbound-ports-exclude",
        env = "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",
        default_value = ""
    )]
    pub local_outbound_ports_exclude: String,
    /// Virtual interfaces whose inbound traffic (from VMs) is treated as outbound.
    #[arg(
        short = 'k',
        long = "kube-virt-interfaces",
        env = "KUBE_VIRT_INTERFACES",
        default_value = ""
    )]
    pub kube_virt_interfaces: String,
    /// Print the rules instead of applying them.
    #[arg(short = 'n', long = "dry-run", env = "DRY_RUN", action = ArgAction::Set, num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub dry_run: bool,
    /// Capture DNS (port 53) to the agent on 15053 (default $ISTIO_META_DNS_CAPTURE).
    #[arg(long = "redirect-dns", env = "REDIRECT_DNS", action = ArgAction::Set, num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub redirect_dns: bool,
    /// Capture all DNS on port 53, not only to the resolv.conf servers.
    #[arg(long = "capture-all-dns", env = "CAPTURE_ALL_DNS", action = ArgAction::Set, num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub capture_all_dns: bool,
    /// Drop conntrack-INVALID packets (default $INVALID_DROP).
    #[arg(long = "drop-invalid", env = "DROP_INVALID", action = ArgAction::Set, num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub drop_invalid: bool,
    /// Also install IPv6 (ip6tables) rules (default $ISTIO_AGENT_DUAL_STACK).
    #[arg(long = "dual-stack", env = "DUAL_STACK", action = ArgAction::Set, num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub dual_stack: bool,
    /// Only remove the rules and chains, do not install them.
    #[arg(long = "cleanup-only", env = "CLEANUP_ONLY", action = ArgAction::Set, num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub cleanup_only: bool,
    /// Use nftables (nft -f) instead of iptables.
    #[arg(long = "native-nftables", env = "NATIVE_NFTABLES", action = ArgAction::Set, num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub native_nftables: bool,
    /// Accepted for compatibility; output is always in iptables-restore format.
    #[arg(short = 'f', long = "restore-format", action = ArgAction::Set, num_args = 0..=1, default_value = "true", default_missing_value = "true", hide = true)]
    pub restore_format: bool,
    /// Mizzen extension: DNS servers to capture instead of reading /etc/resolv.conf.
    #[arg(long = "dns-servers", env = "MIZZEN_DNS_SERVERS", default_value = "")]
    pub dns_servers: String,
}

/// Environment lookups, injectable so tests do not depend on the process environment.
pub trait Env {
    fn get(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

/// No environment at all.
pub struct NoEnv;

impl Env for NoEnv {
    fn get(&self, _name: &str) -> Option<String> {
        None
    }
}

fn env_bool(env: &dyn Env, name: &str) -> bool {
    env.get(name)
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// uid of `user` from /etc/passwd, as istio-iptables does for $ENVOY_USER.
fn passwd_uid(user: &str) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some(user)).then(|| f.nth(1).map(str::to_string))?
    })
}

impl Flags {
    /// Validate every flag and build the configuration. `resolv_conf` supplies the DNS
    /// servers when DNS capture is on and `--dns-servers` is not given.
    pub fn to_config(
        &self,
        env: &dyn Env,
        resolv_conf: &dyn Fn() -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut c = Config {
            proxy_port: config::parse_port("--envoy-port", &self.envoy_port)?,
            inbound_capture_port: config::parse_port(
                "--inbound-capture-port",
                &self.inbound_capture_port,
            )?,
            inbound_tunnel_port: config::parse_port(
                "--inbound-tunnel-port",
                &self.inbound_tunnel_port,
            )?,
            ..Config::default()
        };

        let uid = if self.proxy_uid.trim().is_empty() {
            let user = env
                .get("ENVOY_USER")
                .unwrap_or_else(|| "istio-proxy".to_string());
            passwd_uid(&user).unwrap_or_else(|| "1337".to_string())
        } else {
            self.proxy_uid.clone()
        };
        c.proxy_uid = config::parse_owners("--proxy-uid", &uid)?;
        // istio-iptables: the gid defaults to the uid (TPROXY relies on that).
        let gid = if self.proxy_gid.trim().is_empty() {
            uid
        } else {
            self.proxy_gid.clone()
        };
        c.proxy_gid = config::parse_owners("--proxy-gid", &gid)?;

        let mode = if self.inbound_interception_mode.is_empty() {
            env.get("INBOUND_INTERCEPTION_MODE").unwrap_or_default()
        } else {
            self.inbound_interception_mode.clone()
        };
        c.mode = InterceptionMode::parse("--istio-inbound-interception-mode", &mode)?;
        let mark = if self.inbound_tproxy_mark.is_empty() {
            env.get("INBOUND_TPROXY_MARK")
                .unwrap_or_else(|| "1337".to_string())
        } else {
            self.inbound_tproxy_mark.clone()
        };
        c.inbound_tproxy_mark = config::parse_u32("--istio-inbound-tproxy-mark", &mark)?;
        c.inbound_tproxy_route_table = config::parse_u32(
            "--istio-inbound-tproxy-route-table",
            &self.inbound_tproxy_route_table,
        )?;

        c.inbound_ports_include =
            config::parse_port_selection("--istio-inbound-ports", &self.inbound_ports)?;
        c.inbound_ports_exclude =
            config::parse_ports("--istio-local-exclude-ports", &self.local_exclude_ports)?;
        c.outbound_ports_include =
            config::parse_ports("--istio-outbound-ports", &self.outbound_ports)?;
        c.outbound_ports_exclude = config::parse_ports(
            "--istio-local-outbound-ports-exclude",
            &self.local_outbound_ports_exclude,
        )?;
        c.outbound_ip_ranges_include =
            config::parse_range_selection("--istio-service-cidr", &self.service_cidr)?;
        if self.service_exclude_cidr.trim() == "*" {
            return Err(ConfigError::Other {
                flag: "--istio-service-exclude-cidr",
                value: "*".to_string(),
                reason: "the wildcard is not allowed here",
            });
        }
        c.outbound_ip_ranges_exclude =
            config::parse_cidrs("--istio-service-exclude-cidr", &self.service_exclude_cidr)?;
        c.kube_virt_interfaces =
            config::parse_interfaces("--kube-virt-interfaces", &self.kube_virt_interfaces)?;
        c.exclude_interfaces =
            config::parse_interfaces("--istio-exclude-interfaces", &self.exclude_interfaces)?;

        if let Some(groups) = env.get("ISTIO_OUTBOUND_OWNER_GROUPS") {
            c.owner_groups_include = groups;
        }
        if let Some(groups) = env.get("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE") {
            c.owner_groups_exclude =
                config::parse_owners("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", &groups)?;
        }
        if c.owner_groups_include.trim() != "*" {
            config::parse_owners("ISTIO_OUTBOUND_OWNER_GROUPS", &c.owner_groups_include)?;
        }
        if let Some(cidr) = env.get("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR") {
            let net = config::parse_cidr("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", &cidr)?;
            if !matches!(net, ipnet::IpNet::V4(_)) || !net.addr().is_loopback() {
                return Err(ConfigError::Other {
                    flag: "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
                    value: cidr,
                    reason: "must be an IPv4 loopback CIDR",
                });
            }
            c.host_ipv4_loopback_cidr = net;
        }

        c.redirect_dns = self.redirect_dns || env_bool(env, "ISTIO_META_DNS_CAPTURE");
        c.capture_all_dns = self.capture_all_dns;
        c.drop_invalid = self.drop_invalid || env_bool(env, "INVALID_DROP");
        c.enable_ipv6 = self.dual_stack || env_bool(env, "ISTIO_AGENT_DUAL_STACK");

        if c.redirect_dns && !c.capture_all_dns {
            let servers = if self.dns_servers.trim().is_empty() {
                resolv_conf()
                    .map(|text| config::nameservers(&text))
                    .unwrap_or_default()
            } else {
                let mut v4 = Vec::new();
                let mut v6 = Vec::new();
                for s in config::split(&self.dns_servers) {
                    match s.parse::<std::net::IpAddr>() {
                        Ok(std::net::IpAddr::V4(_)) => v4.push(s),
                        Ok(std::net::IpAddr::V6(_)) => v6.push(s),
                        Err(_) => {
                            return Err(ConfigError::Other {
                                flag: "--dns-servers",
                                value: s,
                                reason: "not an IP address",
                            })
                        }
                    }
                }
                (v4, v6)
            };
            c.dns_servers_v4 = servers.0;
            c.dns_servers_v6 = servers.1;
        }
        Ok(c)
    }
}
