//! Config errors: each names the file, the document, the object and the field.

use serde::Serialize;
use std::fmt;
use std::path::PathBuf;

/// One problem with one resource (or with a whole file when it cannot be split into
/// documents). The Display form is what `mizzen validate` prints and the pilot logs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 0-based document index within the file; `None` when the file itself is unreadable.
    pub document: Option<usize>,
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// Dotted field path such as `spec.http[0].route[1].weight`; empty for file-level errors.
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn file(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.into(),
            document: None,
            kind: None,
            namespace: None,
            name: None,
            field: String::new(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(d) = self.document {
            write!(f, " (document {d})")?;
        }
        if let Some(k) = &self.kind {
            write!(f, " {k}")?;
            match (&self.namespace, &self.name) {
                (Some(ns), Some(n)) => write!(f, " {ns}/{n}")?,
                (None, Some(n)) => write!(f, " {n}")?,
                _ => {}
            }
        }
        f.write_str(": ")?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}
