//! Reading config from files: directory walk, multi-document YAML/JSON, decoding to typed
//! resources. Decoding errors and validation errors come back as [`ConfigError`]s; the
//! caller decides what stays in force (the pilot keeps the last good version).

use crate::error::ConfigError;
use crate::resource::{Kind, Meta, Origin, Resource, Spec};
use crate::validate;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What one file produced.
#[derive(Clone, Debug, Default)]
pub struct FileLoad {
    pub file: PathBuf,
    /// Valid resources, in document order.
    pub resources: Vec<Resource>,
    /// Objects whose spec was rejected. `key` is known when the object named itself, so the
    /// caller can keep the previous good version of exactly that object.
    pub rejected: Vec<Rejected>,
    /// Errors not attributable to one object (unreadable file, YAML syntax). When present,
    /// the caller should keep everything it had from this file.
    pub file_errors: Vec<ConfigError>,
    /// `apiVersion/kind` of objects the mesh does not read.
    pub ignored: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Rejected {
    pub key: Option<crate::resource::ResourceKey>,
    pub errors: Vec<ConfigError>,
}

impl FileLoad {
    /// Every error in this file, file-level first.
    pub fn errors(&self) -> impl Iterator<Item = &ConfigError> {
        self.file_errors
            .iter()
            .chain(self.rejected.iter().flat_map(|r| r.errors.iter()))
    }
}

/// Is this a file the config source reads? (`*.yaml`, `*.yml`, `*.json`)
pub fn is_config_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// All config files under `root` (recursively, sorted, hidden entries skipped). `root` may
/// also be a single file.
// A rich error (file, object, field) on a cold path is worth its size.
#[allow(clippy::result_large_err)]
pub fn config_files(root: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let mut out = Vec::new();
    if root.is_file() {
        out.push(root.to_path_buf());
        return Ok(out);
    }
    let mut stack = vec![root.to_path_buf()];
    // Bounded walk: a symlink loop must not hang the pilot.
    let mut visited = 0usize;
    while let Some(dir) = stack.pop() {
        visited += 1;
        if visited > 100_000 {
            return Err(ConfigError::file(
                root,
                "too many directories (symlink loop?)",
            ));
        }
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| ConfigError::file(&dir, format!("cannot read directory: {e}")))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if hidden {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if is_config_file(&path) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Read and decode one file.
pub fn load_file(path: &Path) -> FileLoad {
    match std::fs::read_to_string(path) {
        Ok(text) => load_str(path, &text),
        Err(e) => FileLoad {
            file: path.to_path_buf(),
            file_errors: vec![ConfigError::file(path, format!("cannot read file: {e}"))],
            ..Default::default()
        },
    }
}

/// Decode the text of one file (multi-document YAML, or JSON which is YAML too).
pub fn load_str(path: &Path, text: &str) -> FileLoad {
    let mut out = FileLoad {
        file: path.to_path_buf(),
        ..Default::default()
    };
    // Parse every document first: a syntax error anywhere makes the file unusable as a
    // whole, and then the caller keeps what it had from it.
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        match serde_yaml_ng::Value::deserialize(doc) {
            Ok(v) => docs.push((i, v)),
            Err(e) => {
                let mut err = ConfigError::file(path, format!("YAML syntax error: {e}"));
                err.document = Some(i);
                out.file_errors.push(err);
                return out;
            }
        }
    }
    for (i, doc) in docs {
        let value = match yaml_to_json(doc) {
            Ok(v) => v,
            Err(msg) => {
                let mut err = ConfigError::file(path, msg);
                err.document = Some(i);
                out.rejected.push(Rejected {
                    key: None,
                    errors: vec![err],
                });
                continue;
            }
        };
        decode_object(path, i, value, &mut out);
    }
    out
}

fn decode_object(path: &Path, document: usize, value: Value, out: &mut FileLoad) {
    let origin = Origin {
        file: path.to_path_buf(),
        document,
    };
    let obj = match value {
        Value::Null => return,
        Value::Object(m) => m,
        other => {
            let mut err = ConfigError::file(path, format!("expected an object, found {other}"));
            err.document = Some(document);
            out.rejected.push(Rejected {
                key: None,
                errors: vec![err],
            });
            return;
        }
    };
    let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind_str = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    if kind_str == "List" || kind_str.ends_with("List") && obj.contains_key("items") {
        if let Some(Value::Array(items)) = obj.get("items") {
            for item in items.clone() {
                decode_object(path, document, item, out);
            }
        }
        return;
    }
    let Some(kind) = Kind::from_api(api_version, kind_str) else {
        out.ignored.push(format!("{api_version}/{kind_str}"));
        return;
    };
    match decode_resource(kind, obj, origin) {
        Ok(res) => {
            let errors = validate::validate(&res);
            if errors.is_empty() {
                out.resources.push(res);
            } else {
                let key = res.key();
                let errs = errors
                    .into_iter()
                    .map(|fe| object_error(&res.origin, kind, &res.meta, fe.field, fe.message))
                    .collect();
                out.rejected.push(Rejected {
                    key: Some(key),
                    errors: errs,
                });
            }
        }
        Err((key, err)) => out.rejected.push(Rejected {
            key,
            errors: vec![err],
        }),
    }
}

fn object_error(
    origin: &Origin,
    kind: Kind,
    meta: &Meta,
    field: String,
    message: String,
) -> ConfigError {
    ConfigError {
        file: origin.file.clone(),
        document: Some(origin.document),
        kind: Some(kind.to_string()),
        namespace: (!kind.is_cluster_scoped()).then(|| meta.namespace.clone()),
        name: Some(meta.name.clone()),
        field,
        message,
    }
}

type DecodeError = (Option<crate::resource::ResourceKey>, ConfigError);

/// Decode one object of a known kind into a typed [`Resource`] (no semantic validation).
#[allow(clippy::result_large_err)]
pub fn decode_resource(
    kind: Kind,
    mut obj: serde_json::Map<String, Value>,
    origin: Origin,
) -> Result<Resource, DecodeError> {
    let meta_value = obj.remove("metadata").unwrap_or(Value::Null);
    let mut meta = Meta::default();
    let mut meta_err = None;
    if let Value::Object(m) = &meta_value {
        meta.name = m
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        meta.namespace = m
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        for (field, target) in [
            ("labels", &mut meta.labels),
            ("annotations", &mut meta.annotations),
        ] {
            if let Some(v) = m.get(field) {
                match serde_json::from_value::<BTreeMap<String, String>>(v.clone()) {
                    Ok(map) => *target = map,
                    Err(e) => meta_err = Some((format!("metadata.{field}"), e.to_string())),
                }
            }
        }
    }
    if meta.namespace.is_empty() && !kind.is_cluster_scoped() {
        meta.namespace = "default".to_string();
    }
    let key = (!meta.name.is_empty()).then(|| crate::resource::ResourceKey {
        kind,
        namespace: meta.namespace.clone(),
        name: meta.name.clone(),
    });
    let fail = |field: String, message: String, meta: &Meta| {
        (
            key.clone(),
            object_error(&origin, kind, meta, field, message),
        )
    };
    if meta.name.is_empty() {
        return Err(fail("metadata.name".into(), "is required".into(), &meta));
    }
    if let Some((field, message)) = meta_err {
        return Err(fail(field, message, &meta));
    }
    obj.remove("apiVersion");
    obj.remove("kind");
    let spec = if kind.is_istio() {
        // Istio objects: everything lives under `spec`; `status` is written by controllers.
        obj.remove("status");
        let spec = obj
            .remove("spec")
            .unwrap_or(Value::Object(Default::default()));
        if let Some(extra) = obj.keys().next() {
            return Err(fail(extra.clone(), "unknown field".into(), &meta));
        }
        decode_spec(kind, spec, "spec").map_err(|(f, m)| fail(f, m, &meta))?
    } else {
        decode_spec(kind, Value::Object(obj), "").map_err(|(f, m)| fail(f, m, &meta))?
    };
    Ok(Resource {
        kind,
        meta,
        spec,
        origin,
    })
}

fn typed<T: DeserializeOwned>(value: Value, prefix: &str) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let path = match (prefix.is_empty(), inner == ".") {
            (true, _) => inner,
            (false, true) => prefix.to_string(),
            (false, false) => format!("{prefix}.{inner}"),
        };
        (path, e.into_inner().to_string())
    })
}

fn decode_spec(kind: Kind, v: Value, p: &str) -> Result<Spec, (String, String)> {
    Ok(match kind {
        Kind::VirtualService => Spec::VirtualService(typed(v, p)?),
        Kind::DestinationRule => Spec::DestinationRule(typed(v, p)?),
        Kind::Gateway => Spec::Gateway(typed(v, p)?),
        Kind::ServiceEntry => Spec::ServiceEntry(typed(v, p)?),
        Kind::WorkloadEntry => Spec::WorkloadEntry(typed(v, p)?),
        Kind::WorkloadGroup => Spec::WorkloadGroup(typed(v, p)?),
        Kind::Sidecar => Spec::Sidecar(typed(v, p)?),
        Kind::PeerAuthentication => Spec::PeerAuthentication(typed(v, p)?),
        Kind::AuthorizationPolicy => Spec::AuthorizationPolicy(typed(v, p)?),
        Kind::RequestAuthentication => Spec::RequestAuthentication(typed(v, p)?),
        Kind::Telemetry => Spec::Telemetry(typed(v, p)?),
        Kind::Service => Spec::Service(typed(v, p)?),
        Kind::Endpoints => Spec::Endpoints(typed(v, p)?),
        Kind::EndpointSlice => Spec::EndpointSlice(typed(v, p)?),
        Kind::Pod => Spec::Pod(typed(v, p)?),
        Kind::Namespace => Spec::Namespace(typed(v, p)?),
    })
}

/// YAML allows non-string map keys (`portLevelMtls: {8080: ...}`); JSON objects do not, so
/// scalar keys are turned into their string form, as Kubernetes' YAML-to-JSON step does.
fn yaml_to_json(v: serde_yaml_ng::Value) -> Result<Value, String> {
    use serde_yaml_ng::Value as Y;
    Ok(match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .ok_or_else(|| format!("number {f} is not representable in JSON"))?
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(seq) => Value::Array(
            seq.into_iter()
                .map(yaml_to_json)
                .collect::<Result<_, _>>()?,
        ),
        Y::Mapping(m) => {
            let mut out = serde_json::Map::new();
            for (k, v) in m {
                let key = match k {
                    Y::String(s) => s,
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    other => return Err(format!("unsupported map key {other:?}")),
                };
                out.insert(key, yaml_to_json(v)?);
            }
            Value::Object(out)
        }
        Y::Tagged(t) => yaml_to_json(t.value)?,
    })
}

/// Load every config file under each root; the report `mizzen validate` prints.
pub fn load_paths(roots: &[PathBuf]) -> (Vec<FileLoad>, Vec<ConfigError>) {
    let mut loads = Vec::new();
    let mut errors = Vec::new();
    for root in roots {
        match config_files(root) {
            Ok(files) => loads.extend(files.iter().map(|f| load_file(f))),
            Err(e) => errors.push(e),
        }
    }
    (loads, errors)
}
