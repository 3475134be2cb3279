//! Every real Istio YAML in the shared test data (copied unmodified from istio/istio) must
//! load with zero errors: if one fails, the bug is in our types or rules, not in Istio's
//! samples. Also: random mutations of those samples must never panic the loader.

use mizzen_config::load::{load_paths, load_str};
use mizzen_config::Kind;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testdata/istio")
}

#[test]
fn istio_samples_load_without_errors() {
    let root = testdata();
    assert!(root.is_dir(), "missing test data at {}", root.display());
    let (loads, root_errors) = load_paths(std::slice::from_ref(&root));
    assert!(root_errors.is_empty(), "{root_errors:?}");

    let errors: Vec<String> = loads
        .iter()
        .flat_map(|l| l.errors())
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "{} errors:\n{}",
        errors.len(),
        errors.join("\n")
    );

    let mut counts: BTreeMap<Kind, usize> = BTreeMap::new();
    for r in loads.iter().flat_map(|l| l.resources.iter()) {
        *counts.entry(r.kind).or_default() += 1;
    }
    eprintln!("{} files, kinds: {counts:?}", loads.len());
    assert!(loads.len() >= 80, "only {} files found", loads.len());
    for (kind, min) in [
        (Kind::VirtualService, 20),
        (Kind::DestinationRule, 10),
        (Kind::Gateway, 5),
        (Kind::ServiceEntry, 5),
        (Kind::Service, 20),
        (Kind::AuthorizationPolicy, 10),
        (Kind::PeerAuthentication, 3),
        (Kind::Sidecar, 1),
        (Kind::Telemetry, 1),
    ] {
        let n = counts.get(&kind).copied().unwrap_or(0);
        assert!(n >= min, "expected at least {min} {kind}, found {n}");
    }
}

/// A tiny deterministic PRNG (xorshift): no dependency, reproducible failures.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Replacement tokens that tend to hit validation edge cases rather than YAML syntax errors.
const TOKENS: &[&str] = &[
    "0",
    "-1",
    "65536",
    "100",
    "101",
    "*",
    "''",
    "\"\"",
    "null",
    "[]",
    "{}",
    "true",
    "x.y.z",
    "1.2.3.4",
    "10.0.0.0/33",
    "(",
    "%",
    "unix://",
    "/",
    "::",
    "é",
    "9999999999999999999999",
    "1e309",
    "-0.5",
    "ns/*",
    "*/*",
    "a/b/c",
    "0s",
    "1ns",
    "0.0001ms",
];

#[test]
fn mutated_samples_never_panic() {
    let root = testdata();
    let files = mizzen_config::load::config_files(&root).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut rounds = 0;
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for _ in 0..12 {
            let mut s = text.clone();
            for _ in 0..1 + rng.below(4) {
                // Replace the value after a random `: ` or `- `, or splice random bytes.
                let positions: Vec<usize> = s
                    .match_indices(": ")
                    .chain(s.match_indices("- "))
                    .map(|(i, _)| i + 2)
                    .collect();
                if positions.is_empty() || rng.below(5) == 0 {
                    let at = rng.below(s.len());
                    if s.is_char_boundary(at) {
                        let tok = TOKENS[rng.below(TOKENS.len())];
                        s.insert_str(at, tok);
                    }
                    continue;
                }
                let at = positions[rng.below(positions.len())];
                let end = s[at..].find('\n').map_or(s.len(), |n| at + n);
                let tok = TOKENS[rng.below(TOKENS.len())];
                s.replace_range(at..end, tok);
            }
            // The loader must return (errors or not) without panicking.
            let _ = load_str(file, &s);
            rounds += 1;
        }
    }
    assert!(rounds > 500);
}
