//! Applying a ruleset with iptables: read the current state with `iptables-save`, then write
//! one `iptables-restore --noflush` transaction per family that removes Mizzen's previous
//! rules and installs the new ones. Re-running converges to the same state (no duplicates);
//! nothing outside the ISTIO_* chains and Istio's own rules in the built-in chains is touched.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::CaptureError;
use crate::process;
use crate::ruleset::{is_builtin, Family, Rule, Ruleset, Table, CHAIN_PREFIX};

fn bins(family: Family) -> (&'static str, &'static str, &'static str) {
    match family {
        Family::V4 => ("iptables", "iptables-save", "iptables-restore"),
        Family::V6 => ("ip6tables", "ip6tables-save", "ip6tables-restore"),
    }
}

/// What `iptables-save` shows of ours: ISTIO_* chains, and built-in chain rules jumping to them.
#[derive(Debug, Default)]
struct Existing {
    chains: BTreeMap<Table, BTreeSet<String>>,
    jumps: BTreeMap<Table, Vec<String>>,
}

fn parse_table(name: &str) -> Option<Table> {
    Table::ALL.into_iter().find(|t| t.as_str() == name)
}

fn parse_save(save: &str) -> Existing {
    let mut ex = Existing::default();
    let mut table = None;
    for line in save.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = parse_table(name.trim());
            continue;
        }
        let Some(t) = table else { continue };
        if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or_default();
            if chain.starts_with(CHAIN_PREFIX) {
                ex.chains.entry(t).or_default().insert(chain.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let chain = words.first().copied().unwrap_or_default();
            let jumps_to_ours = words
                .windows(2)
                .any(|w| (w[0] == "-j" || w[0] == "-g") && w[1].starts_with(CHAIN_PREFIX));
            if is_builtin(chain) && jumps_to_ours {
                ex.jumps.entry(t).or_default().push(rest.to_string());
            }
        }
    }
    ex
}

/// Istio's rules in built-in chains that do not jump to an ISTIO_* chain (interface RETURNs,
/// TPROXY marks ...): we find them by asking iptables whether each candidate is present.
fn present_plain_builtin_rules(
    iptables: &str,
    candidates: &[Rule],
) -> Result<Vec<Rule>, CaptureError> {
    let mut found: Vec<Rule> = Vec::new();
    for r in candidates {
        let ours = r.jump_target().is_some_and(|t| t.starts_with(CHAIN_PREFIX));
        if !is_builtin(&r.chain) || ours {
            continue;
        }
        let mut key = r.clone();
        key.position = crate::ruleset::Position::Append;
        if found.contains(&key) {
            continue;
        }
        let mut args: Vec<&str> = vec!["-w", "5", "-t", r.table.as_str(), "-C", r.chain.as_str()];
        args.extend(r.args.iter().map(String::as_str));
        let (out, _) = process::run_raw(iptables, &args, None)?;
        if out.success {
            found.push(key);
        }
    }
    Ok(found)
}

/// Build the restore transaction: flush our chains, delete our old built-in rules, delete
/// chains no longer wanted, then add `desired` (empty for cleanup).
fn transaction(existing: &Existing, stale: &[Rule], desired: &Ruleset, family: Family) -> String {
    let desired_chains = desired.chains(family);
    let mut out = String::new();
    for table in Table::ALL {
        let old: BTreeSet<String> = existing.chains.get(&table).cloned().unwrap_or_default();
        let new: Vec<String> = desired_chains.get(&table).cloned().unwrap_or_default();
        let jumps = existing
            .jumps
            .get(&table)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let stale_here: Vec<&Rule> = stale.iter().filter(|r| r.table == table).collect();
        let rules: Vec<&Rule> = desired
            .rules(family)
            .iter()
            .filter(|r| r.table == table)
            .collect();
        if old.is_empty()
            && new.is_empty()
            && jumps.is_empty()
            && stale_here.is_empty()
            && rules.is_empty()
        {
            continue;
        }
        out.push_str(&format!("*{table}\n"));
        // Declaring a user chain in --noflush mode creates it, or empties it if it exists.
        let mut declared: BTreeSet<&String> = BTreeSet::new();
        for chain in new.iter().chain(old.iter()) {
            if declared.insert(chain) {
                out.push_str(&format!(":{chain} - [0:0]\n"));
            }
        }
        for rest in jumps {
            out.push_str(&format!("-D {rest}\n"));
        }
        for r in stale_here {
            out.push_str(&format!("-D {} {}\n", r.chain, r.args.join(" ")));
        }
        for chain in old.iter().filter(|c| !new.contains(c)) {
            out.push_str(&format!("-X {chain}\n"));
        }
        for r in rules {
            out.push_str(&r.restore_line());
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// Install `desired` for `family`, replacing whatever Mizzen (or istio-iptables) installed
/// before. `candidates` lists every built-in-chain rule a previous run may have added.
pub fn apply_family(
    desired: &Ruleset,
    candidates: &Ruleset,
    family: Family,
) -> Result<(), CaptureError> {
    let (iptables, save, restore) = bins(family);
    let existing = parse_save(&process::run(save, &[], None)?);
    let stale = present_plain_builtin_rules(iptables, candidates.rules(family))?;
    let payload = transaction(&existing, &stale, desired, family);
    if payload.is_empty() {
        return Ok(());
    }
    tracing::debug!(%payload, "{restore} --noflush");
    process::run(restore, &["--noflush", "-w", "5"], Some(&payload)).map(|_| ())
}

/// The transaction `apply_family` would run, for inspection (no changes made).
pub fn plan_family(
    desired: &Ruleset,
    candidates: &Ruleset,
    family: Family,
) -> Result<String, CaptureError> {
    let (iptables, save, _) = bins(family);
    let existing = parse_save(&process::run(save, &[], None)?);
    let stale = present_plain_builtin_rules(iptables, candidates.rules(family))?;
    Ok(transaction(&existing, &stale, desired, family))
}

/// Whether the family's tools are installed (ip6tables may be missing on v4-only hosts).
pub fn available(family: Family) -> bool {
    let (_, save, _) = bins(family);
    process::run_raw(save, &["--version"], None)
        .map(|(o, _)| o.success)
        .unwrap_or(false)
}

/// Policy routing for TPROXY: marked packets are delivered locally via table `route_table`.
pub fn configure_tproxy_routes(
    mark: u32,
    route_table: u32,
    ipv6: bool,
) -> Result<(), CaptureError> {
    let mark = mark.to_string();
    let table = route_table.to_string();
    let mut families = vec!["inet"];
    if ipv6 {
        families.push("inet6");
    }
    for f in families {
        // Remove earlier copies first so re-runs do not stack identical rules.
        while process::run_raw(
            "ip",
            &["-f", f, "rule", "del", "fwmark", &mark, "lookup", &table],
            None,
        )?
        .0
        .success
        {}
        process::run(
            "ip",
            &["-f", f, "rule", "add", "fwmark", &mark, "lookup", &table],
            None,
        )?;
        process::run(
            "ip",
            &[
                "-f", f, "route", "replace", "local", "default", "dev", "lo", "table", &table,
            ],
            None,
        )?;
    }
    if ipv6 {
        // The inbound passthrough source (::6) must exist on lo; "exists" is fine.
        let (out, err) =
            process::run_raw("ip", &["-6", "addr", "add", "::6/128", "dev", "lo"], None)?;
        if !out.success && !err.contains("exists") {
            return Err(CaptureError::Command {
                command: "ip -6 addr add ::6/128 dev lo".to_string(),
                status: "non-zero exit".to_string(),
                stderr: err,
            });
        }
    }
    Ok(())
}

/// Best-effort removal of the TPROXY policy routing.
pub fn cleanup_tproxy_routes(mark: u32, route_table: u32) {
    let mark = mark.to_string();
    let table = route_table.to_string();
    for f in ["inet", "inet6"] {
        let mut guard = 0;
        while guard < 64
            && process::run_raw(
                "ip",
                &["-f", f, "rule", "del", "fwmark", &mark, "lookup", &table],
                None,
            )
            .map(|(o, _)| o.success)
            .unwrap_or(false)
        {
            guard += 1;
        }
        let _ = process::run_raw("ip", &["-f", f, "route", "flush", "table", &table], None);
    }
}
