//! Semantic validation, field by field, the way Istio's validation webhook does it
//! (`pkg/config/validation` in istio/istio) and, for Kubernetes objects, the way the API
//! server would.
//!
//! Decoding (serde, `deny_unknown_fields`) already rejected wrong types and unknown fields;
//! what is checked here are the rules a schema cannot express: ranges, formats, one-of
//! constraints, cross-field consistency. Every error carries the field path in Istio's YAML
//! naming (`spec.http[0].route[1].weight`), so a user can find the line to fix.
//!
//! Istio also emits *warnings* (deprecated fields, suspicious but legal settings); those are
//! not errors and are not reported here.

mod k8s;
mod names;
mod networking;
mod security;

use crate::resource::{Kind, Meta, Resource, Spec};

/// One field-level problem inside a resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path, e.g. `spec.http[0].route[1].weight`.
    pub field: String,
    pub message: String,
}

/// Check one decoded resource; empty means valid.
pub fn validate(res: &Resource) -> Vec<FieldError> {
    let mut e = Errs::default();
    validate_meta(&mut e, res.kind, &res.meta);
    let spec = Path::root("spec");
    match &res.spec {
        Spec::VirtualService(s) => networking::virtual_service(&mut e, &spec, &res.meta, s),
        Spec::DestinationRule(s) => networking::destination_rule(&mut e, &spec, &res.meta, s),
        Spec::Gateway(s) => networking::gateway(&mut e, &spec, s),
        Spec::ServiceEntry(s) => networking::service_entry(&mut e, &spec, &res.meta, s),
        Spec::WorkloadEntry(s) => networking::workload_entry(&mut e, &spec, s),
        Spec::WorkloadGroup(s) => networking::workload_group(&mut e, &spec, s),
        Spec::Sidecar(s) => networking::sidecar(&mut e, &spec, s),
        Spec::PeerAuthentication(s) => security::peer_authentication(&mut e, &spec, s),
        Spec::AuthorizationPolicy(s) => security::authorization_policy(&mut e, &spec, &res.meta, s),
        Spec::RequestAuthentication(s) => security::request_authentication(&mut e, &spec, s),
        Spec::Telemetry(s) => security::telemetry(&mut e, &spec, s),
        Spec::Service(s) => k8s::service(&mut e, s),
        Spec::Endpoints(s) => k8s::endpoints(&mut e, s),
        Spec::EndpointSlice(s) => k8s::endpoint_slice(&mut e, s),
        Spec::Pod(s) => k8s::pod(&mut e, s),
        Spec::Namespace(_) => {}
    }
    e.0
}

/// A field path under construction. Cheap string building; only materialised on error
/// paths and per nested field.
#[derive(Clone, Debug)]
pub(crate) struct Path(String);

impl Path {
    pub(crate) fn root(name: &str) -> Path {
        Path(name.to_string())
    }

    /// `a.b`
    pub(crate) fn f(&self, name: &str) -> Path {
        if self.0.is_empty() {
            Path(name.to_string())
        } else {
            Path(format!("{}.{name}", self.0))
        }
    }

    /// `a.b[3]`
    pub(crate) fn i(&self, name: &str, index: usize) -> Path {
        Path(format!("{}[{index}]", self.f(name).0))
    }

    /// `a.b[key]`, the Kubernetes convention for map entries.
    pub(crate) fn k(&self, name: &str, key: &str) -> Path {
        Path(format!("{}[{key}]", self.f(name).0))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// Collected errors for one resource.
#[derive(Default)]
pub(crate) struct Errs(Vec<FieldError>);

impl Errs {
    pub(crate) fn add(&mut self, path: &Path, message: impl Into<String>) {
        self.0.push(FieldError {
            field: path.as_str().to_string(),
            message: message.into(),
        });
    }

    /// Record the outcome of a primitive check.
    pub(crate) fn check(&mut self, path: &Path, result: names::Check) {
        if let Err(m) = result {
            self.add(path, m);
        }
    }
}

/// Object metadata: the name rule Kubernetes applies to the kind (and Istio's stricter one
/// for Gateways), the namespace, labels and annotation keys.
fn validate_meta(e: &mut Errs, kind: Kind, meta: &Meta) {
    let name_path = Path::root("metadata").f("name");
    let name = meta.name.as_str();
    match kind {
        // Istio: "Gateway name must conform to the DNS label format (no dots)".
        Kind::Gateway => {
            if !names::is_k8s_dns1123_label(name) {
                e.add(&name_path, format!("invalid gateway name: {name:?} (must be a lower-case DNS-1123 label, no dots)"));
            }
        }
        Kind::Service => {
            if !names::is_k8s_dns1035_label(name) {
                e.add(&name_path, format!("{name:?} is not a valid Service name: must be a lower-case DNS-1035 label (a letter, then letters, digits or '-', at most 63)"));
            }
        }
        Kind::Namespace => {
            if !names::is_k8s_dns1123_label(name) {
                e.add(&name_path, format!("{name:?} is not a valid Namespace name: must be a lower-case DNS-1123 label"));
            }
        }
        _ => {
            if !names::is_k8s_dns1123_subdomain(name) {
                e.add(&name_path, format!("{name:?} is not a valid object name: must be a lower-case DNS-1123 subdomain (letters, digits, '-' and '.', at most 253)"));
            }
        }
    }
    if !kind.is_cluster_scoped() && !names::is_k8s_dns1123_label(&meta.namespace) {
        e.add(
            &Path::root("metadata").f("namespace"),
            format!(
                "{:?} is not a valid namespace: must be a lower-case DNS-1123 label",
                meta.namespace
            ),
        );
    }
    labels(e, &Path::root("metadata"), "labels", &meta.labels);
    let mut total = 0usize;
    for (k, v) in &meta.annotations {
        total += k.len() + v.len();
        e.check(
            &Path::root("metadata").k("annotations", k),
            names::label_key(k).map_err(|m| m.replace("label key", "annotation key")),
        );
    }
    // Kubernetes caps the annotations of one object at 256 KiB.
    if total > 256 * 1024 {
        e.add(
            &Path::root("metadata").f("annotations"),
            format!("annotations total size {total} exceeds 262144 bytes"),
        );
    }
    if kind == Kind::AuthorizationPolicy {
        // Handled with the policy: only AuthorizationPolicy may carry istio.io/dry-run.
    } else if meta.annotations.contains_key("istio.io/dry-run") {
        e.add(
            &Path::root("metadata").k("annotations", "istio.io/dry-run"),
            "unsupported annotation istio.io/dry-run: only AuthorizationPolicy supports it",
        );
    }
}

/// A label map (`metadata.labels`, `sourceLabels`, subset labels ...).
pub(crate) fn labels(
    e: &mut Errs,
    parent: &Path,
    field: &str,
    map: &std::collections::BTreeMap<String, String>,
) {
    for (k, v) in map {
        let p = parent.k(field, k);
        e.check(&p, names::label_key(k));
        e.check(&p, names::label_value(v));
    }
}

/// Test helper: decode YAML text with the real loader and return the validation errors of
/// its single object as `(field, message)` pairs.
#[cfg(test)]
pub(crate) fn errors_of(yaml: &str) -> Vec<(String, String)> {
    let load = crate::load::load_str(std::path::Path::new("test.yaml"), yaml);
    assert!(
        load.file_errors.is_empty(),
        "file errors: {:?}",
        load.file_errors
    );
    load.rejected
        .iter()
        .flat_map(|r| r.errors.iter())
        .map(|e| (e.field.clone(), e.message.clone()))
        .collect()
}

/// Test helper: the fields with errors, in order.
#[cfg(test)]
pub(crate) fn fields_of(yaml: &str) -> Vec<String> {
    errors_of(yaml).into_iter().map(|(f, _)| f).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_names() {
        let ok = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: a.b-c, namespace: ns1, labels: {app: x}}\nspec: {host: a}\n";
        assert!(fields_of(ok).is_empty());
        let bad = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: A_b, namespace: Ns, labels: {'bad key': x}, annotations: {'a b': x}}\nspec: {host: a}\n";
        assert_eq!(
            fields_of(bad),
            vec![
                "metadata.name",
                "metadata.namespace",
                "metadata.labels[bad key]",
                "metadata.annotations[a b]"
            ]
        );
        let gw = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: a.b}\nspec: {servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ['*']}]}\n";
        assert_eq!(fields_of(gw), vec!["metadata.name"]);
        let svc =
            "apiVersion: v1\nkind: Service\nmetadata: {name: 1svc}\nspec: {ports: [{port: 80}]}\n";
        assert_eq!(fields_of(svc), vec!["metadata.name"]);
    }

    #[test]
    fn label_values() {
        let bad = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: a, labels: {app: '-x'}}\nspec: {host: a}\n";
        assert_eq!(fields_of(bad), vec!["metadata.labels[app]"]);
    }

    #[test]
    fn dry_run_only_on_authz() {
        let bad = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: a, annotations: {istio.io/dry-run: 'true'}}\nspec: {host: a}\n";
        assert_eq!(
            fields_of(bad),
            vec!["metadata.annotations[istio.io/dry-run]"]
        );
    }

    #[test]
    fn paths() {
        let p = Path::root("spec");
        assert_eq!(
            p.i("http", 0).i("route", 1).f("weight").as_str(),
            "spec.http[0].route[1].weight"
        );
        assert_eq!(p.k("labels", "app").as_str(), "spec.labels[app]");
        assert_eq!(Path::root("").f("spec").as_str(), "spec");
    }
}
