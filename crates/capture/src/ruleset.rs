//! The typed ruleset: which rule goes in which table and chain, per IP family, in the order
//! istio-iptables emits them, and its `iptables-restore` rendering.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

/// An iptables table. The derived order (filter, mangle, nat, raw) is the order istio-iptables
/// writes tables in its restore input (it sorts them by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Filter,
    Mangle,
    Nat,
    Raw,
}

impl Table {
    pub const ALL: [Table; 4] = [Table::Filter, Table::Mangle, Table::Nat, Table::Raw];

    pub fn as_str(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Mangle => "mangle",
            Table::Nat => "nat",
            Table::Raw => "raw",
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// IP family: rules for `iptables` (V4) or `ip6tables` (V6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

/// Where a rule goes in its chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Position {
    /// `-A`: at the end.
    Append,
    /// `-I CHAIN n`: at 1-based position n at the time it is applied.
    Insert(u32),
}

/// One rule: its table, chain, position and the iptables match/target arguments.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub table: Table,
    pub chain: String,
    pub position: Position,
    pub args: Vec<String>,
}

/// Chains and targets that are not ours to create (built into the kernel or into iptables).
pub fn is_builtin(chain: &str) -> bool {
    matches!(
        chain,
        "INPUT"
            | "OUTPUT"
            | "FORWARD"
            | "PREROUTING"
            | "POSTROUTING"
            | "ACCEPT"
            | "RETURN"
            | "DROP"
    )
}

/// Mizzen owns every chain with this prefix (the same names as Istio, so tools keep working).
pub const CHAIN_PREFIX: &str = "ISTIO_";

impl Rule {
    /// The chain this rule jumps to, when the rule ends with `-j CHAIN` (targets with their
    /// own options, like `-j REDIRECT --to-ports`, are not chains).
    pub fn jump_target(&self) -> Option<&str> {
        let n = self.args.len();
        if n >= 2 && self.args[n - 2] == "-j" {
            Some(self.args[n - 1].as_str())
        } else {
            None
        }
    }

    /// The rule in `iptables-restore` syntax, e.g. `-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN`.
    pub fn restore_line(&self) -> String {
        let head = match self.position {
            Position::Append => format!("-A {}", self.chain),
            Position::Insert(n) => format!("-I {} {}", self.chain, n),
        };
        if self.args.is_empty() {
            head
        } else {
            format!("{} {}", head, self.args.join(" "))
        }
    }
}

/// All rules for both families. `v6` is empty unless IPv6 capture is enabled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub v4: Vec<Rule>,
    pub v6: Vec<Rule>,
}

impl Ruleset {
    pub fn rules(&self, family: Family) -> &[Rule] {
        match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }

    /// Non-builtin chains per table, in the order istio-iptables declares them: first the
    /// chains that hold rules (by first rule), then chains only jumped to.
    pub fn chains(&self, family: Family) -> BTreeMap<Table, Vec<String>> {
        let rules = self.rules(family);
        let mut seen: HashSet<(Table, &str)> = HashSet::new();
        let mut out: BTreeMap<Table, Vec<String>> = BTreeMap::new();
        let owners = rules.iter().map(|r| (r.table, r.chain.as_str()));
        let targets = rules
            .iter()
            .filter_map(|r| r.jump_target().map(|t| (r.table, t)));
        for (table, chain) in owners.chain(targets) {
            if seen.insert((table, chain)) && !is_builtin(chain) {
                out.entry(table).or_default().push(chain.to_string());
            }
        }
        out
    }

    /// The `iptables-restore --noflush` input istio-iptables would feed for this family:
    /// per table (sorted), `-N` for each chain, then every rule in generation order.
    /// Empty when the family has no rules.
    pub fn to_restore(&self, family: Family) -> String {
        let chains = self.chains(family);
        let mut out = String::new();
        for table in Table::ALL {
            let rules: Vec<&Rule> = self
                .rules(family)
                .iter()
                .filter(|r| r.table == table)
                .collect();
            let decls = chains.get(&table).map(Vec::as_slice).unwrap_or_default();
            if rules.is_empty() && decls.is_empty() {
                continue;
            }
            out.push_str(&format!("* {table}\n"));
            for chain in decls {
                out.push_str(&format!("-N {chain}\n"));
            }
            for rule in rules {
                out.push_str(&rule.restore_line());
                out.push('\n');
            }
            out.push_str("COMMIT\n");
        }
        out
    }
}
