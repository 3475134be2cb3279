//! Reading the user's directory: the same YAML they would `kubectl apply`.
//!
//! `mizzen_config` types what the pilot reads (Services, Pods, Istio config) but not
//! Deployments, which only `mizzen local` needs; those are read here from plain JSON values.
//! Everything else is kept as-is to hand to the pilot.

use crate::error::{LocalError, Result};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub type Labels = BTreeMap<String, String>;

/// A Namespace object: its labels decide sidecar injection (`istio-injection=enabled`).
#[derive(Clone, Debug, Default)]
pub struct NamespaceObj {
    pub name: String,
    pub labels: Labels,
}

/// A pod template, from a Deployment (`spec.template`) or a bare Pod.
#[derive(Clone, Debug, Default)]
pub struct Workload {
    /// Deployment name, or the Pod's own name.
    pub name: String,
    pub namespace: String,
    /// Number of pods; 1 for a bare Pod.
    pub replicas: u32,
    /// A bare Pod keeps its name; a Deployment's pods get `NAME-INDEX`.
    pub bare_pod: bool,
    pub labels: Labels,
    pub annotations: Labels,
    pub service_account: String,
    pub containers: Vec<ContainerSpec>,
}

#[derive(Clone, Debug, Default)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    /// `(containerPort, name)`.
    pub ports: Vec<(u16, Option<String>)>,
    /// Literal `env[].value`s; `valueFrom` cannot be resolved without a cluster.
    pub env: Vec<(String, String)>,
}

/// A Service, kept as its JSON value (handed to the pilot with `spec.clusterIP` filled in).
#[derive(Clone, Debug)]
pub struct ServiceObj {
    pub name: String,
    pub namespace: String,
    pub selector: Labels,
    pub ports: Vec<ServicePortSpec>,
    /// `spec.clusterIP` as given (may be `None` the string, for headless services).
    pub cluster_ip: Option<String>,
    pub value: Value,
}

#[derive(Clone, Debug)]
pub struct ServicePortSpec {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: String,
    /// Number, name of a container port, or absent (= port).
    pub target: Option<Value>,
}

/// Everything read from the directory.
#[derive(Clone, Debug, Default)]
pub struct Manifest {
    pub namespaces: Vec<NamespaceObj>,
    pub workloads: Vec<Workload>,
    pub services: Vec<ServiceObj>,
    /// Istio (and other mesh) config objects, passed to the pilot unchanged.
    pub mesh_config: Vec<Value>,
    /// `apiVersion/kind` of objects neither the pilot nor `mizzen local` reads.
    pub ignored: Vec<String>,
}

impl Manifest {
    pub fn namespace_labels(&self, ns: &str) -> Labels {
        self.namespaces
            .iter()
            .find(|n| n.name == ns)
            .map(|n| n.labels.clone())
            .unwrap_or_default()
    }
}

/// Read the `*.yaml|*.yml|*.json` files in `dir` (or the single file `dir`), as
/// `kubectl apply -f DIR` does: subdirectories only with `recursive` (`-R`), so alternative
/// configs kept in a subdirectory are not applied on top. The mesh's part is checked with the
/// pilot's own validation, so errors show before anything is created.
pub fn load_dir(dir: &Path, recursive: bool) -> Result<Manifest> {
    let files = if recursive || dir.is_file() {
        mizzen_config::load::config_files(dir).map_err(|e| LocalError::Manifest {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?
    } else {
        let rd = std::fs::read_dir(dir)
            .map_err(|e| LocalError::io(format!("reading {}", dir.display()), e))?;
        let mut files: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file() && mizzen_config::load::is_config_file(p))
            .filter(|p| {
                !p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'))
            })
            .collect();
        files.sort();
        files
    };
    let mut m = Manifest::default();
    let mut errors = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f)
            .map_err(|e| LocalError::io(format!("reading {}", f.display()), e))?;
        for e in mizzen_config::load::load_str(f, &text).errors() {
            errors.push(e.to_string());
        }
        load_text(f, &text, &mut m)?;
    }
    errors.extend(duplicates(&m));
    if !errors.is_empty() {
        return Err(LocalError::Config(errors));
    }
    Ok(m)
}

/// Objects defined twice (kind, namespace, name): the pilot would ignore the second one
/// silently as far as the user is concerned, so say it up front.
fn duplicates(m: &Manifest) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    let keys = m
        .mesh_config
        .iter()
        .map(|v| {
            (
                s(v, &["kind"]).unwrap_or_default(),
                s(v, &["metadata", "namespace"]).unwrap_or_else(|| "default".into()),
                s(v, &["metadata", "name"]).unwrap_or_default(),
            )
        })
        .chain(
            m.services
                .iter()
                .map(|x| ("Service".to_string(), x.namespace.clone(), x.name.clone())),
        )
        .chain(m.workloads.iter().map(|w| {
            let kind = if w.bare_pod { "Pod" } else { "Deployment" };
            (kind.to_string(), w.namespace.clone(), w.name.clone())
        }));
    for k in keys {
        if k.0 == "Namespace" {
            continue;
        }
        if !seen.insert(k.clone()) {
            out.push(format!("{} {}/{} is defined more than once", k.0, k.1, k.2));
        }
    }
    out
}

/// Decode one file's documents into `m`.
pub fn load_text(path: &Path, text: &str, m: &mut Manifest) -> Result<()> {
    let err = |message: String| LocalError::Manifest {
        path: path.to_path_buf(),
        message,
    };
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(doc).map_err(|e| err(format!("document {i}: {e}")))?;
        if v.is_null() {
            continue;
        }
        // `kind: List` (kubectl get -o yaml) holds objects in `items`.
        let items = if v.get("kind").and_then(Value::as_str) == Some("List") {
            v.get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        } else {
            vec![v]
        };
        for obj in items {
            add_object(obj, m).map_err(|e| err(format!("document {i}: {e}")))?;
        }
    }
    Ok(())
}

fn s(v: &Value, path: &[&str]) -> Option<String> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    match cur {
        Value::String(x) => Some(x.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn string_map(v: Option<&Value>) -> Labels {
    v.and_then(Value::as_object)
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| match v {
                    Value::String(x) => Some((k.clone(), x.clone())),
                    // YAML `version: 1` is a number; Kubernetes would reject it, but the
                    // intent is plain, so keep it as text.
                    Value::Number(n) => Some((k.clone(), n.to_string())),
                    Value::Bool(b) => Some((k.clone(), b.to_string())),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn string_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| match x {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn port_u16(v: Option<&Value>, what: &str) -> std::result::Result<u16, String> {
    v.and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{what}: a port number 1-65535 is required"))
}

fn add_object(v: Value, m: &mut Manifest) -> std::result::Result<(), String> {
    let api = s(&v, &["apiVersion"]).unwrap_or_default();
    let kind = s(&v, &["kind"]).unwrap_or_default();
    let name = s(&v, &["metadata", "name"]).unwrap_or_default();
    let namespace = s(&v, &["metadata", "namespace"]).unwrap_or_else(|| "default".into());
    match (api.as_str(), kind.as_str()) {
        ("v1", "Namespace") => {
            m.namespaces.push(NamespaceObj {
                name: name.clone(),
                labels: string_map(v.pointer("/metadata/labels")),
            });
            m.mesh_config.push(v);
        }
        ("apps/v1", "Deployment") => {
            if name.is_empty() {
                return Err("Deployment without metadata.name".into());
            }
            let replicas = match v.pointer("/spec/replicas") {
                None | Some(Value::Null) => 1,
                Some(r) => r
                    .as_u64()
                    .and_then(|r| u32::try_from(r).ok())
                    .ok_or_else(|| format!("Deployment {name}: spec.replicas must be a number"))?,
            };
            let template = v.pointer("/spec/template").cloned().unwrap_or(Value::Null);
            let mut w = workload(&name, &namespace, &template)?;
            w.replicas = replicas;
            m.workloads.push(w);
        }
        ("v1", "Pod") => {
            if name.is_empty() {
                return Err("Pod without metadata.name".into());
            }
            let mut w = workload(&name, &namespace, &v)?;
            w.replicas = 1;
            w.bare_pod = true;
            m.workloads.push(w);
        }
        ("v1", "Service") => {
            if name.is_empty() {
                return Err("Service without metadata.name".into());
            }
            let mut ports = Vec::new();
            for (i, p) in v
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                ports.push(ServicePortSpec {
                    name: s(p, &["name"]),
                    port: port_u16(
                        p.get("port"),
                        &format!("Service {name} spec.ports[{i}].port"),
                    )?,
                    protocol: s(p, &["protocol"]).unwrap_or_else(|| "TCP".into()),
                    target: p.get("targetPort").cloned(),
                });
            }
            m.services.push(ServiceObj {
                name,
                namespace,
                selector: string_map(v.pointer("/spec/selector")),
                ports,
                cluster_ip: s(&v, &["spec", "clusterIP"]).filter(|c| !c.is_empty()),
                value: v,
            });
        }
        _ => {
            if mizzen_config::Kind::from_api(&api, &kind).is_some() {
                m.mesh_config.push(v);
            } else {
                m.ignored.push(format!("{api}/{kind} {namespace}/{name}"));
            }
        }
    }
    Ok(())
}

/// A pod template (Deployment `spec.template`) or a Pod object: both have metadata + spec.
fn workload(name: &str, namespace: &str, t: &Value) -> std::result::Result<Workload, String> {
    let spec = t.get("spec").cloned().unwrap_or(Value::Null);
    let mut containers = Vec::new();
    for (i, c) in spec
        .get("containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let mut ports = Vec::new();
        for (j, p) in c
            .get("ports")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let port = port_u16(
                p.get("containerPort"),
                &format!("{name}: containers[{i}].ports[{j}].containerPort"),
            )?;
            ports.push((port, s(p, &["name"])));
        }
        let env = c
            .get("env")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|e| Some((s(e, &["name"])?, s(e, &["value"]).unwrap_or_default())))
                    .collect()
            })
            .unwrap_or_default();
        containers.push(ContainerSpec {
            name: s(c, &["name"]).unwrap_or_else(|| format!("container-{i}")),
            image: s(c, &["image"]).unwrap_or_default(),
            command: string_list(c.get("command")),
            args: string_list(c.get("args")),
            ports,
            env,
        });
    }
    if containers.is_empty() {
        return Err(format!(
            "{namespace}/{name}: the pod template has no containers"
        ));
    }
    Ok(Workload {
        name: name.to_string(),
        namespace: namespace.to_string(),
        replicas: 1,
        bare_pod: false,
        labels: string_map(t.pointer("/metadata/labels")),
        annotations: string_map(t.pointer("/metadata/annotations")),
        service_account: s(&spec, &["serviceAccountName"])
            .or_else(|| s(&spec, &["serviceAccount"]))
            .unwrap_or_else(|| "default".into()),
        containers,
    })
}

/// Where a file set came from, for messages.
pub fn describe(dir: &Path) -> PathBuf {
    dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels:
    istio-injection: enabled
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web-v1
  namespace: demo
spec:
  replicas: 2
  template:
    metadata:
      labels:
        app: web
        version: 1
    spec:
      serviceAccountName: web
      containers:
      - name: web
        image: tomcat:9
        ports:
        - containerPort: 8080
          name: http
        env:
        - name: SERVICE_VERSION
          value: v1
        - name: FROM_SECRET
          valueFrom: {secretKeyRef: {name: x, key: y}}
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
spec:
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: http
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: web
  namespace: demo
spec:
  hosts: [web]
  http:
  - route:
    - destination: {host: web}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: junk
"#;

    #[test]
    fn reads_deployments_services_and_mesh_config() {
        let mut m = Manifest::default();
        load_text(Path::new("x.yaml"), YAML, &mut m).unwrap();
        assert_eq!(m.namespaces.len(), 1);
        assert_eq!(
            m.namespace_labels("demo").get("istio-injection").unwrap(),
            "enabled"
        );
        let w = &m.workloads[0];
        assert_eq!(
            (w.name.as_str(), w.replicas, w.bare_pod),
            ("web-v1", 2, false)
        );
        assert_eq!(w.labels.get("version").unwrap(), "1");
        assert_eq!(w.service_account, "web");
        assert_eq!(w.containers[0].ports, vec![(8080, Some("http".into()))]);
        // valueFrom cannot be resolved: kept with an empty value rather than dropped silently.
        assert_eq!(
            w.containers[0].env[0],
            ("SERVICE_VERSION".into(), "v1".into())
        );
        let svc = &m.services[0];
        assert_eq!(svc.ports[0].port, 80);
        assert_eq!(svc.ports[0].target, Some(Value::String("http".into())));
        assert!(svc.cluster_ip.is_none());
        // Namespace + VirtualService go to the pilot; the ConfigMap is ignored.
        assert_eq!(m.mesh_config.len(), 2);
        assert_eq!(m.ignored, vec!["v1/ConfigMap default/junk".to_string()]);
    }

    #[test]
    fn rejects_bad_ports() {
        let mut m = Manifest::default();
        let bad =
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports:\n  - port: 0\n";
        let e = load_text(Path::new("b.yaml"), bad, &mut m).unwrap_err();
        assert!(e.to_string().contains("spec.ports[0].port"), "{e}");
    }
}
