//! End to end: the built `mizzen validate` binary on a directory with one good and one bad
//! file: exit code, the error line (file, kind, namespace/name, field), the summary, and the
//! `--quiet` and `--output json` forms.

// Test helpers outside `#[test]` functions: a failed setup step should abort the test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch directory removed on drop (no tempfile dependency needed for this).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "mizzen-validate-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const GOOD: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: bookinfo
spec:
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
data: {a: b}
"#;

const BAD: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews-route
  namespace: bookinfo
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 80
    - destination: {host: reviews, subset: v2}
      weight: 30
"#;

fn mizzen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mizzen"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn reports_errors_with_file_object_and_field() {
    let dir = TempDir::new("mixed");
    dir.write("good.yaml", GOOD);
    let bad = dir.write("bad.yaml", BAD);
    let dir_arg = dir.path().to_str().unwrap();

    let out = mizzen(&["validate", dir_arg]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "stdout:\n{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let err = lines[0];
    assert!(err.contains(&bad.display().to_string()), "{err}");
    assert!(err.contains("(document 0)"), "{err}");
    assert!(
        err.contains("VirtualService bookinfo/reviews-route"),
        "{err}"
    );
    assert!(err.contains("spec.http[0].route:"), "{err}");
    assert!(err.contains("total destination weight 110 != 100"), "{err}");
    assert_eq!(
        lines[1],
        "1 resources valid, 1 errors, 1 ignored objects in 2 files"
    );

    let quiet = mizzen(&["validate", "--quiet", dir_arg]);
    assert_eq!(quiet.status.code(), Some(1));
    assert_eq!(
        stdout(&quiet).trim(),
        "1 resources valid, 1 errors, 1 ignored objects in 2 files"
    );

    let json = mizzen(&["validate", "--output", "json", dir_arg]);
    assert_eq!(json.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 1);
    assert_eq!(arr[0]["kind"], "VirtualService");
    assert_eq!(arr[0]["namespace"], "bookinfo");
    assert_eq!(arr[0]["name"], "reviews-route");
    assert_eq!(arr[0]["field"], "spec.http[0].route");
    assert_eq!(arr[0]["document"], 0);
    assert_eq!(arr[0]["file"], bad.display().to_string());
}

#[test]
fn valid_config_exits_zero() {
    let dir = TempDir::new("good");
    let good = dir.write("good.yaml", GOOD);
    let out = mizzen(&["validate", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert_eq!(
        stdout(&out).trim(),
        "1 resources valid, 0 errors, 1 ignored objects in 1 files"
    );
    let json = mizzen(&["validate", "-o", "json", good.to_str().unwrap()]);
    assert_eq!(json.status.code(), Some(0));
    assert_eq!(stdout(&json).trim(), "[]");
}

#[test]
fn decode_errors_name_the_field() {
    let dir = TempDir::new("decode");
    let f = dir.write(
        "typo.yaml",
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: ns}\nspec:\n  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hostz: ['*']\n",
    );
    let out = mizzen(&["validate", f.to_str().unwrap()]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("Gateway ns/gw: spec.servers[0]"), "{text}");
    assert!(text.contains("hostz"), "{text}");
}

#[test]
fn missing_path_is_an_error() {
    let out = mizzen(&["validate", "/nonexistent/mizzen/config"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such file or directory"));
}

#[test]
fn istio_samples_are_valid() {
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testdata/istio");
    if !samples.is_dir() {
        return;
    }
    let out = mizzen(&["validate", "--quiet", samples.to_str().unwrap()]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains(" 0 errors"), "{text}");
}
