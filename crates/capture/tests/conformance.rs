//! Conformance with istio-iptables: every `conformance/iptables/<case>.args` is parsed with
//! our flag parser, rules are generated, and the iptables-restore text must equal
//! `<case>.golden` exactly (Istio's golden files also record the `iptables-save` /
//! `ip6tables-save` calls of its test stub; those lines are not rules and are skipped).

use std::path::PathBuf;

use clap::Parser;
use mizzen_capture::flags::NoEnv;
use mizzen_capture::{generate, Family, Flags};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    flags: Flags,
}

fn cases_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../conformance/iptables")
}

fn render(args_line: &str) -> String {
    let argv = std::iter::once("iptables").chain(args_line.split_whitespace());
    let cli = Cli::try_parse_from(argv).expect("args parse");
    let cfg = cli.flags.to_config(&NoEnv, &|| None).expect("valid config");
    let rules = generate(&cfg);
    let mut out = rules.to_restore(Family::V4);
    if cfg.enable_ipv6 {
        out.push_str(&rules.to_restore(Family::V6));
    }
    out
}

fn expected(golden: &str) -> String {
    golden
        .lines()
        .filter(|l| *l != "iptables-save" && *l != "ip6tables-save")
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn golden_cases() {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(cases_dir())
        .expect("conformance dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "args"))
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 10,
        "expected the conformance cases, found {}",
        cases.len()
    );
    let mut failures = Vec::new();
    for args in &cases {
        let name = args
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let line = std::fs::read_to_string(args).expect("read args");
        let golden = std::fs::read_to_string(args.with_extension("golden")).expect("read golden");
        let got = render(line.trim());
        let want = expected(&golden);
        if got != want {
            failures.push(format!("--- case {name}\n--- want\n{want}--- got\n{got}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
