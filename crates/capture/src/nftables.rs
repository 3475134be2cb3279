//! The nftables backend: the same ruleset as `nft -f` input, one atomic transaction.
//!
//! Each iptables table becomes an nftables table of its own (`ip istio-proxy-nat`,
//! `ip6 istio-proxy-nat`, ...), so Mizzen's rules never mix with anyone else's and cleanup is
//! deleting those tables. Families stay separate (`ip` / `ip6`) so each rule keeps exactly the
//! meaning it has under iptables / ip6tables.

use std::collections::BTreeMap;

use crate::error::CaptureError;
use crate::process;
use crate::ruleset::{is_builtin, Family, Position, Rule, Ruleset, Table};

fn family_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

fn table_name(t: Table) -> String {
    format!("istio-proxy-{}", t.as_str())
}

/// nft chain name: ISTIO_IN_REDIRECT -> istio-in-redirect, PREROUTING -> prerouting.
fn chain_name(c: &str) -> String {
    c.to_ascii_lowercase().replace('_', "-")
}

/// Base chain hook declaration for a built-in iptables chain in a table.
fn base_chain(table: Table, chain: &str) -> Option<String> {
    let hook = match chain {
        "PREROUTING" => "prerouting",
        "OUTPUT" => "output",
        "INPUT" => "input",
        "FORWARD" => "forward",
        "POSTROUTING" => "postrouting",
        _ => return None,
    };
    let (ty, prio) = match table {
        Table::Nat => ("nat", "-100"),
        // Output packets whose mark changes must be re-routed: a route chain does that.
        Table::Mangle if hook == "output" => ("route", "-150"),
        Table::Mangle => ("filter", "-150"),
        // Before conntrack (-200), like the raw table, so `ct zone set` takes effect.
        Table::Raw => ("filter", "-300"),
        Table::Filter => ("filter", "0"),
    };
    Some(format!(
        "type {ty} hook {hook} priority {prio}; policy accept;"
    ))
}

fn bad(rule: &Rule, reason: &str) -> CaptureError {
    CaptureError::Nft {
        rule: rule.restore_line(),
        reason: reason.to_string(),
    }
}

/// Translate one iptables rule's arguments into an nft rule body.
pub fn translate(rule: &Rule, family: Family) -> Result<String, CaptureError> {
    let ip = family_name(family);
    let mut out: Vec<String> = Vec::new();
    let mut proto = String::new();
    let mut neg = false;
    let mut it = rule.args.iter().map(String::as_str).peekable();
    let op = |neg: bool| if neg { "!= " } else { "" };
    while let Some(tok) = it.next() {
        let mut value = || it.next().ok_or_else(|| bad(rule, "missing value"));
        match tok {
            "!" => {
                neg = true;
                continue;
            }
            "-m" => {
                // Match modules are implied by the nft expressions below.
                value()?;
                continue;
            }
            "-p" => {
                proto = value()?.to_string();
                out.push(format!("meta l4proto {}{proto}", op(neg)));
            }
            "-d" => out.push(format!("{ip} daddr {}{}", op(neg), value()?)),
            "-s" => out.push(format!("{ip} saddr {}{}", op(neg), value()?)),
            "-i" => out.push(format!("iifname {}{}", op(neg), value()?)),
            "-o" => out.push(format!("oifname {}{}", op(neg), value()?)),
            "--dport" | "--sport" | "--dports" => {
                if proto.is_empty() {
                    return Err(bad(rule, "port match without -p"));
                }
                let dir = if tok == "--sport" { "sport" } else { "dport" };
                let v = value()?;
                let v = if v.contains(',') {
                    format!("{{ {} }}", v.replace(',', ", "))
                } else {
                    v.to_string()
                };
                out.push(format!("{proto} {dir} {}{v}", op(neg)));
            }
            "--uid-owner" => out.push(format!("meta skuid {}{}", op(neg), value()?)),
            "--gid-owner" => out.push(format!("meta skgid {}{}", op(neg), value()?)),
            "--ctstate" => out.push(format!(
                "ct state {}{}",
                op(neg),
                value()?.to_ascii_lowercase()
            )),
            "--mark" => {
                // `-m connmark --mark` is the connection mark, `-m mark --mark` the packet's.
                let connmark = rule
                    .args
                    .windows(2)
                    .any(|w| w[0] == "-m" && w[1] == "connmark");
                let what = if connmark { "ct mark" } else { "meta mark" };
                out.push(format!("{what} {}{}", op(neg), value()?));
            }
            "-j" => {
                let target = value()?;
                let rest: Vec<&str> = it.by_ref().collect();
                out.push(target_stmt(rule, target, &rest)?);
                break;
            }
            _ => return Err(bad(rule, &format!("unsupported option {tok}"))),
        }
        neg = false;
    }
    Ok(out.join(" "))
}

fn target_stmt(rule: &Rule, target: &str, rest: &[&str]) -> Result<String, CaptureError> {
    let opt = |name: &str| {
        rest.windows(2)
            .find(|w| w[0] == name)
            .map(|w| w[1].to_string())
            .ok_or_else(|| bad(rule, &format!("{target} without {name}")))
    };
    Ok(match target {
        "RETURN" => "return".to_string(),
        "ACCEPT" => "accept".to_string(),
        "DROP" => "drop".to_string(),
        "REDIRECT" => {
            let port = opt("--to-ports").or_else(|_| opt("--to-port"))?;
            format!("redirect to :{port}")
        }
        "MARK" => format!("meta mark set {}", opt("--set-mark")?),
        "CONNMARK" if rest.contains(&"--save-mark") => "ct mark set meta mark".to_string(),
        "CONNMARK" if rest.contains(&"--restore-mark") => "meta mark set ct mark".to_string(),
        "CT" => format!("ct zone set {}", opt("--zone")?),
        "TPROXY" => {
            let mark = opt("--tproxy-mark")?;
            let mark = mark.split('/').next().unwrap_or_default().to_string();
            format!("meta mark set {mark} tproxy to :{}", opt("--on-port")?)
        }
        chain if !is_builtin(chain) && rest.is_empty() => format!("jump {}", chain_name(chain)),
        other => return Err(bad(rule, &format!("unsupported target {other}"))),
    })
}

/// Final rule order per (table, chain), with `-I n` inserts resolved the way iptables would.
fn ordered(rules: &[Rule]) -> BTreeMap<(Table, String), Vec<&Rule>> {
    let mut chains: BTreeMap<(Table, String), Vec<&Rule>> = BTreeMap::new();
    for r in rules {
        let list = chains.entry((r.table, r.chain.clone())).or_default();
        match r.position {
            Position::Append => list.push(r),
            Position::Insert(n) => {
                let at = (n.max(1) as usize - 1).min(list.len());
                list.insert(at, r);
            }
        }
    }
    chains
}

/// Lines that make sure a table exists and then delete it: valid whether or not it existed.
fn drop_table(out: &mut String, fam: &str, table: &str) {
    out.push_str(&format!(
        "add table {fam} {table}\ndelete table {fam} {table}\n"
    ));
}

/// The whole `nft -f` script: replace Mizzen's tables with `ruleset`'s.
pub fn script(ruleset: &Ruleset) -> Result<String, CaptureError> {
    let mut out = String::new();
    for family in [Family::V4, Family::V6] {
        let fam = family_name(family);
        for table in Table::ALL {
            drop_table(&mut out, fam, &table_name(table));
        }
        let chains = ordered(ruleset.rules(family));
        let declared = ruleset.chains(family);
        for table in Table::ALL {
            let used: Vec<&(Table, String)> = chains.keys().filter(|(t, _)| *t == table).collect();
            let user_chains = declared.get(&table).cloned().unwrap_or_default();
            if used.is_empty() && user_chains.is_empty() {
                continue;
            }
            let tname = table_name(table);
            out.push_str(&format!("add table {fam} {tname}\n"));
            for (_, chain) in &used {
                if let Some(hook) = base_chain(table, chain) {
                    out.push_str(&format!(
                        "add chain {fam} {tname} {} {{ {hook} }}\n",
                        chain_name(chain)
                    ));
                }
            }
            for chain in &user_chains {
                out.push_str(&format!("add chain {fam} {tname} {}\n", chain_name(chain)));
            }
            for (_, chain) in used {
                for r in &chains[&(table, chain.clone())] {
                    out.push_str(&format!(
                        "add rule {fam} {tname} {} {}\n",
                        chain_name(chain),
                        translate(r, family)?
                    ));
                }
            }
        }
    }
    Ok(out)
}

/// Script removing every Mizzen nftables table.
pub fn cleanup_script() -> String {
    let mut out = String::new();
    for fam in ["ip", "ip6"] {
        for table in Table::ALL {
            drop_table(&mut out, fam, &table_name(table));
        }
    }
    out
}

/// Run a script with `nft -f -` (one atomic transaction).
pub fn run_script(script: &str) -> Result<(), CaptureError> {
    process::run("nft", &["-f", "-"], Some(script)).map(|_| ())
}
