//! The validated capture configuration: what istio-iptables calls `config.Config`, with the
//! strings parsed into types so that rule generation cannot meet a bad value.

use ipnet::IpNet;

use crate::error::ConfigError;

/// How inbound connections reach the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InterceptionMode {
    /// NAT `REDIRECT` to the inbound capture port (the default).
    #[default]
    Redirect,
    /// `TPROXY` in the mangle table, keeping the original destination and source.
    Tproxy,
}

impl InterceptionMode {
    /// Parse `-m`: `REDIRECT`, `TPROXY`, or empty for the default.
    pub fn parse(flag: &'static str, value: &str) -> Result<Self, ConfigError> {
        match value.trim() {
            "" | "REDIRECT" => Ok(Self::Redirect),
            "TPROXY" => Ok(Self::Tproxy),
            other => Err(ConfigError::Mode {
                flag,
                value: other.to_string(),
            }),
        }
    }
}

/// A port list that may also be the wildcard `*` (`-b`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PortSelection {
    #[default]
    None,
    All,
    Ports(Vec<u16>),
}

/// A CIDR list that may also be the wildcard `*` (`-i`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RangeSelection {
    #[default]
    None,
    All,
    Cidrs(Vec<IpNet>),
}

/// Everything rule generation needs. Field names follow istio-iptables' `config.Config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub proxy_port: u16,
    pub inbound_capture_port: u16,
    pub inbound_tunnel_port: u16,
    /// UIDs (or user names) whose traffic is never captured: the proxy itself.
    pub proxy_uid: Vec<String>,
    pub proxy_gid: Vec<String>,
    pub mode: InterceptionMode,
    pub inbound_tproxy_mark: u32,
    pub inbound_tproxy_route_table: u32,
    pub inbound_ports_include: PortSelection,
    pub inbound_ports_exclude: Vec<u16>,
    pub outbound_ports_include: Vec<u16>,
    pub outbound_ports_exclude: Vec<u16>,
    pub outbound_ip_ranges_include: RangeSelection,
    pub outbound_ip_ranges_exclude: Vec<IpNet>,
    pub kube_virt_interfaces: Vec<String>,
    pub exclude_interfaces: Vec<String>,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS`: `*` means all groups (then the exclude list applies).
    pub owner_groups_include: String,
    pub owner_groups_exclude: Vec<String>,
    pub redirect_dns: bool,
    pub capture_all_dns: bool,
    /// Kept as written (e.g. from resolv.conf): istio-iptables prints them verbatim.
    pub dns_servers_v4: Vec<String>,
    pub dns_servers_v6: Vec<String>,
    pub drop_invalid: bool,
    pub enable_ipv6: bool,
    pub host_ipv4_loopback_cidr: IpNet,
}

impl Default for Config {
    /// istio-iptables' defaults (the same values its golden tests start from).
    fn default() -> Self {
        Config {
            proxy_port: 15001,
            inbound_capture_port: 15006,
            inbound_tunnel_port: 15008,
            proxy_uid: vec!["1337".to_string()],
            proxy_gid: vec!["1337".to_string()],
            mode: InterceptionMode::Redirect,
            inbound_tproxy_mark: 1337,
            inbound_tproxy_route_table: 133,
            inbound_ports_include: PortSelection::None,
            inbound_ports_exclude: Vec::new(),
            outbound_ports_include: Vec::new(),
            outbound_ports_exclude: Vec::new(),
            outbound_ip_ranges_include: RangeSelection::None,
            outbound_ip_ranges_exclude: Vec::new(),
            kube_virt_interfaces: Vec::new(),
            exclude_interfaces: Vec::new(),
            owner_groups_include: "*".to_string(),
            owner_groups_exclude: Vec::new(),
            redirect_dns: false,
            capture_all_dns: false,
            dns_servers_v4: Vec::new(),
            dns_servers_v6: Vec::new(),
            drop_invalid: false,
            enable_ipv6: false,
            host_ipv4_loopback_cidr: IpNet::V4(
                ipnet::Ipv4Net::new(std::net::Ipv4Addr::LOCALHOST, 32).unwrap_or_default(),
            ),
        }
    }
}

/// Split a comma-separated flag value, trimming blanks and dropping empty items
/// (istio-iptables accepts `6000,7000,`).
pub fn split(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

pub fn parse_port(flag: &'static str, value: &str) -> Result<u16, ConfigError> {
    match value.trim().parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(ConfigError::Port {
            flag,
            value: value.to_string(),
        }),
    }
}

pub fn parse_ports(flag: &'static str, value: &str) -> Result<Vec<u16>, ConfigError> {
    split(value).iter().map(|p| parse_port(flag, p)).collect()
}

pub fn parse_port_selection(flag: &'static str, value: &str) -> Result<PortSelection, ConfigError> {
    match value.trim() {
        "" => Ok(PortSelection::None),
        "*" => Ok(PortSelection::All),
        v => Ok(PortSelection::Ports(parse_ports(flag, v)?)),
    }
}

pub fn parse_cidr(flag: &'static str, value: &str) -> Result<IpNet, ConfigError> {
    value
        .trim()
        .parse::<IpNet>()
        .map_err(|_| ConfigError::Cidr {
            flag,
            value: value.to_string(),
        })
}

/// Unlike istio-iptables, which skips an unparsable CIDR with a warning "for bug
/// compatibility", we refuse it: a typo would otherwise silently capture the wrong traffic.
pub fn parse_cidrs(flag: &'static str, value: &str) -> Result<Vec<IpNet>, ConfigError> {
    split(value).iter().map(|c| parse_cidr(flag, c)).collect()
}

pub fn parse_range_selection(
    flag: &'static str,
    value: &str,
) -> Result<RangeSelection, ConfigError> {
    match value.trim() {
        "" => Ok(RangeSelection::None),
        "*" => Ok(RangeSelection::All),
        v => Ok(RangeSelection::Cidrs(parse_cidrs(flag, v)?)),
    }
}

/// Interface names as the kernel accepts them (1-15 bytes, no '/', blanks or ':').
pub fn parse_interfaces(flag: &'static str, value: &str) -> Result<Vec<String>, ConfigError> {
    let names = split(value);
    for n in &names {
        let bad = n.len() > 15 || n.chars().any(|c| c == '/' || c == ':' || c.is_whitespace());
        if bad {
            return Err(ConfigError::Other {
                flag,
                value: n.clone(),
                reason: "not a network interface name",
            });
        }
    }
    Ok(names)
}

/// User/group ids or names for `-m owner`: digits, or a plain name.
pub fn parse_owners(flag: &'static str, value: &str) -> Result<Vec<String>, ConfigError> {
    let ids = split(value);
    for id in &ids {
        let ok = id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
        if !ok {
            return Err(ConfigError::Other {
                flag,
                value: id.clone(),
                reason: "not a user/group id or name",
            });
        }
    }
    Ok(ids)
}

/// Parse a number the way iptables does for marks (decimal or 0x hex).
pub fn parse_u32(flag: &'static str, value: &str) -> Result<u32, ConfigError> {
    let v = value.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => v.parse::<u32>(),
    };
    parsed.map_err(|_| ConfigError::Other {
        flag,
        value: value.to_string(),
        reason: "not a 32-bit number",
    })
}

/// The `nameserver` lines of a resolv.conf, split into IPv4 and IPv6 (as istio-iptables does
/// when `--redirect-dns` is on and `--capture-all-dns` is off).
pub fn nameservers(resolv_conf: &str) -> (Vec<String>, Vec<String>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for line in resolv_conf.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        if let Some(addr) = words.next() {
            match addr.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(_)) => v4.push(addr.to_string()),
                Ok(std::net::IpAddr::V6(_)) => v6.push(addr.to_string()),
                Err(_) => {}
            }
        }
    }
    (v4, v6)
}
