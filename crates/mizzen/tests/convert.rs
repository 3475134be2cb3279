//! End to end: the built `mizzen convert` on the seed's legacy rules in
//! `examples/helloworld/route-rule/`. Each must convert to exactly the checked-in
//! `*.converted.yaml`, and that output must load with zero errors through the same loader
//! `mizzen validate` and the pilot use. Bad input must fail with the file and field named.

// Test code: a failed setup step should abort the test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/helloworld/route-rule")
}

fn mizzen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mizzen"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Loads `text` as config; returns (resource kinds, every error).
fn load(text: &str) -> (Vec<String>, Vec<String>) {
    let fl = mizzen_config::load::load_str(Path::new("converted.yaml"), text);
    assert!(fl.ignored.is_empty(), "ignored objects: {:?}", fl.ignored);
    let kinds = fl.resources.iter().map(|r| r.kind.to_string()).collect();
    let errors = fl.errors().map(|e| e.to_string()).collect();
    (kinds, errors)
}

fn convert_ok(files: &[&Path]) -> String {
    let mut args = vec!["convert".to_string()];
    args.extend(files.iter().map(|p| p.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = mizzen(&args);
    assert!(out.status.success(), "convert failed: {}", stderr(&out));
    stdout(&out)
}

#[test]
fn every_example_converts_to_its_expected_file_and_validates() {
    let dir = examples();
    let mut seen = 0;
    for name in ["default", "timeout", "retry", "fault-v1alpha2"] {
        let input = dir.join(format!("{name}.yaml"));
        let expected = std::fs::read_to_string(dir.join(format!("{name}.converted.yaml"))).unwrap();
        let got = convert_ok(&[&input]);
        assert_eq!(
            got, expected,
            "{name}: output differs from {name}.converted.yaml"
        );
        let (kinds, errors) = load(&got);
        assert!(errors.is_empty(), "{name}: {errors:?}");
        assert_eq!(kinds, ["VirtualService", "DestinationRule"], "{name}");
        seen += 1;
    }
    assert_eq!(seen, 4);
}

#[test]
fn seed_default_rule_is_a_90_10_split_over_two_subsets() {
    let got = convert_ok(&[&examples().join("default.yaml")]);
    let docs: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&got)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(docs.len(), 2);
    let route = &docs[0]["spec"]["http"][0]["route"];
    assert_eq!(route[0]["destination"]["subset"], "v2");
    assert_eq!(route[0]["weight"], 10);
    assert_eq!(route[1]["destination"]["subset"], "v1");
    assert_eq!(route[1]["weight"], 90);
    let subsets = &docs[1]["spec"]["subsets"];
    assert_eq!(subsets[0]["name"], "v1");
    assert_eq!(subsets[0]["labels"]["version"], "1");
    assert_eq!(subsets[1]["name"], "v2");
    assert_eq!(subsets[1]["labels"]["version"], "2");
}

#[test]
fn rules_for_one_destination_merge_in_precedence_order() {
    let dir = examples();
    // Given low precedence first: the output must still put precedence 9 first.
    let got = convert_ok(&[&dir.join("default.yaml"), &dir.join("timeout.yaml")]);
    let docs: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&got)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(
        docs.len(),
        2,
        "one VirtualService + one DestinationRule:\n{got}"
    );
    let http = docs[0]["spec"]["http"].as_array().unwrap();
    let names: Vec<&str> = http.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["helloworld-timeout", "helloworld-default"]);
    assert_eq!(http[0]["timeout"], "2s");
    let (_, errors) = load(&got);
    assert!(errors.is_empty(), "{errors:?}");
}

#[test]
fn output_dir_gets_one_file_per_destination() {
    let dir = std::env::temp_dir().join(format!("mizzen-convert-out-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let input = examples().join("retry.yaml");
    let out = mizzen(&[
        "convert",
        input.to_str().unwrap(),
        "-o",
        dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
    let written = std::fs::read_to_string(dir.join("helloworldsvc.yaml")).unwrap();
    let expected = std::fs::read_to_string(examples().join("retry.converted.yaml")).unwrap();
    assert_eq!(written, expected);
    let _ = std::fs::remove_dir_all(&dir);
}

fn convert_err(name: &str, text: &str) -> String {
    let path =
        std::env::temp_dir().join(format!("mizzen-convert-{name}-{}.yaml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    let out = mizzen(&["convert", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(1), "should fail: {}", stdout(&out));
    assert!(stdout(&out).is_empty(), "nothing on stdout on error");
    let err = stderr(&out);
    assert!(
        err.contains(path.to_str().unwrap()),
        "file not named: {err}"
    );
    err
}

#[test]
fn unknown_field_is_an_error_naming_file_and_field() {
    let err = convert_err(
        "unknown",
        "type: route-rule\nname: x\nspec:\n  destination: a.b.svc.cluster.local\n  route:\n  - tags: {version: v1}\n    wieght: 100\n",
    );
    assert!(err.contains("spec.route[0].wieght: unknown field"), "{err}");

    let err = convert_err(
        "unknown-top",
        "type: route-rule\nname: x\nspec:\n  destination: a.b.svc.cluster.local\n  httpReqTimeout:\n    simpleTimeout:\n      timeout: 2s\n      retries: 3\n",
    );
    assert!(
        err.contains("spec.httpReqTimeout.simpleTimeout.retries: unknown field"),
        "{err}"
    );
}

#[test]
fn invalid_values_are_errors() {
    let err = convert_err(
        "weights",
        "type: route-rule\nname: x\nspec:\n  destination: a.b.svc.cluster.local\n  route:\n  - tags: {version: v1}\n    weight: 30\n  - tags: {version: v2}\n    weight: 30\n",
    );
    assert!(err.contains("weights add up to 60, not 100"), "{err}");

    let err = convert_err(
        "duration",
        "type: route-rule\nname: x\nspec:\n  destination: a.b.svc.cluster.local\n  httpReqTimeout:\n    simpleTimeout:\n      timeout: soon\n",
    );
    assert!(
        err.contains("spec.httpReqTimeout.simpleTimeout.timeout"),
        "{err}"
    );

    let err = convert_err(
        "nodest",
        "type: route-rule\nname: x\nspec:\n  precedence: 1\n",
    );
    assert!(err.contains("spec.destination: required"), "{err}");

    let err = convert_err(
        "kind",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\nspec: {}\n",
    );
    assert!(err.contains("not legacy Istio config"), "{err}");

    let err = convert_err("yaml", "type: route-rule\nname: [\n");
    assert!(err.contains("bad YAML"), "{err}");
}

#[test]
fn missing_file_fails_cleanly() {
    let out = mizzen(&["convert", "/nonexistent/mizzen-rule.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("/nonexistent/mizzen-rule.yaml"));
}

#[test]
fn headers_sources_rewrite_redirect_and_abort() {
    let text = r#"type: route-rule
name: ratings-jason
spec:
  destination: ratings.default.svc.cluster.local
  precedence: 3
  match:
    source: reviews.default.svc.cluster.local
    sourceTags:
      version: v2
    httpHeaders:
      cookie:
        regex: "^(.*?;)?(user=jason)(;.*)?$"
      uri:
        prefix: /ratings
  rewrite:
    uri: /v1/bookRatings
  route:
  - tags:
      version: v1
  httpFault:
    abort:
      percent: 10
      httpStatus: 400
---
type: route-rule
name: ratings-redirect
spec:
  destination: ratings.default.svc.cluster.local
  precedence: 4
  match:
    httpHeaders:
      uri:
        exact: /v1/getProductRatings
  redirect:
    uri: /v1/bookRatings
    authority: bookratings.default.svc.cluster.local
"#;
    let path =
        std::env::temp_dir().join(format!("mizzen-convert-rich-{}.yaml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    let got = convert_ok(&[&path]);
    let _ = std::fs::remove_file(&path);
    let (kinds, errors) = load(&got);
    assert!(errors.is_empty(), "{errors:?}\n{got}");
    assert_eq!(kinds, ["VirtualService", "DestinationRule"]);
    let docs: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&got)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let http = &docs[0]["spec"]["http"];
    assert_eq!(http[0]["name"], "ratings-redirect");
    assert_eq!(
        http[0]["redirect"]["authority"],
        "bookratings.default.svc.cluster.local"
    );
    assert!(http[0].get("route").is_none());
    let m = &http[1]["match"][0];
    assert_eq!(m["uri"]["prefix"], "/ratings");
    assert_eq!(
        m["headers"]["cookie"]["regex"],
        "^(.*?;)?(user=jason)(;.*)?$"
    );
    assert_eq!(m["sourceLabels"]["version"], "v2");
    assert_eq!(http[1]["rewrite"]["uri"], "/v1/bookRatings");
    assert_eq!(http[1]["fault"]["abort"]["httpStatus"], 400);
    assert_eq!(http[1]["fault"]["abort"]["percentage"]["value"], 10.0);
    assert_eq!(http[1]["route"][0]["destination"]["subset"], "v1");
}
