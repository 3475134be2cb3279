//! The config store: what is in force, and why.
//!
//! Reloads read every file again and decide per file and per resource what stays in force:
//! - a file that cannot be parsed at all keeps everything it contributed before;
//! - a resource that fails validation keeps its previous good version (if any);
//! - a deleted file takes its resources with it.
//!
//! Errors are kept for `/debug/configz` and the log, each naming file, object and field.

use mizzen_config::load::{self, FileLoad};
use mizzen_config::{ConfigError, Resource, ResourceKey};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

#[derive(Debug, Default)]
pub struct Store {
    /// Per file: the resources in force from it.
    files: BTreeMap<PathBuf, Vec<Resource>>,
    /// Current errors (of the last reload).
    pub errors: Vec<ConfigError>,
    pub ignored: usize,
}

impl Store {
    /// Re-read `root`. Returns whether anything in force changed.
    pub fn reload(&mut self, root: &Path) -> bool {
        let mut errors = Vec::new();
        let files = match load::config_files(root) {
            Ok(f) => f,
            Err(e) => {
                // The directory itself is unreadable: keep everything.
                self.errors = vec![e];
                return false;
            }
        };
        let previous: BTreeMap<ResourceKey, Resource> = self
            .files
            .values()
            .flatten()
            .map(|r| (r.key(), r.clone()))
            .collect();
        let mut next: BTreeMap<PathBuf, Vec<Resource>> = BTreeMap::new();
        let mut ignored = 0;
        for file in files {
            let fl: FileLoad = load::load_file(&file);
            ignored += fl.ignored.len();
            errors.extend(fl.errors().cloned());
            if !fl.file_errors.is_empty() {
                // Unparseable: the last good content of this file stays in force.
                if let Some(old) = self.files.get(&file) {
                    next.insert(file, old.clone());
                }
                continue;
            }
            let mut resources = fl.resources;
            for rej in &fl.rejected {
                if let Some(old) = rej.key.as_ref().and_then(|k| previous.get(k)) {
                    resources.push(old.clone());
                }
            }
            next.insert(file, resources);
        }
        // The same object defined twice: the first file (in sorted order) wins, as a
        // deterministic stand-in for Kubernetes' "one object per name".
        let mut seen: HashSet<ResourceKey> = HashSet::new();
        for (file, resources) in next.iter_mut() {
            resources.retain(|r| {
                if seen.insert(r.key()) {
                    true
                } else {
                    errors.push(ConfigError {
                        file: file.clone(),
                        document: Some(r.origin.document),
                        kind: Some(r.kind.to_string()),
                        namespace: Some(r.meta.namespace.clone()),
                        name: Some(r.meta.name.clone()),
                        field: "metadata.name".into(),
                        message: "duplicate: an object with this kind, namespace and name is defined earlier; this one is ignored".into(),
                    });
                    false
                }
            });
        }
        let changed = next != self.files;
        self.files = next;
        self.errors = errors;
        self.ignored = ignored;
        changed
    }

    /// Every resource in force, in file order.
    pub fn resources(&self) -> Vec<Resource> {
        self.files.values().flatten().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &str) {
        std::fs::write(dir.join(name), body).unwrap();
    }

    const GOOD: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: default}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n";
    const BAD: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: default}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n      weight: 150\n    - destination: {host: ratings}\n      weight: 50\n";

    #[test]
    fn last_good_version_stays_in_force() {
        let dir = std::env::temp_dir().join(format!("mizzen-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write(&dir, "vs.yaml", GOOD);
        let mut s = Store::default();
        assert!(s.reload(&dir));
        assert_eq!(s.resources().len(), 1);
        assert!(s.errors.is_empty());
        // Invalid edit: reported, previous version kept.
        write(&dir, "vs.yaml", BAD);
        s.reload(&dir);
        assert_eq!(s.resources().len(), 1);
        assert!(!s.errors.is_empty());
        assert!(s.errors[0].to_string().contains("vs.yaml"));
        // Unparseable file: everything from it kept.
        write(&dir, "vs.yaml", "{{{ not yaml");
        s.reload(&dir);
        assert_eq!(s.resources().len(), 1);
        // Deleted: gone.
        std::fs::remove_file(dir.join("vs.yaml")).unwrap();
        assert!(s.reload(&dir));
        assert!(s.resources().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
