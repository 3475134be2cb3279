//! Semantic validation, field by field, the way Istio's validation webhook does it.

use crate::resource::Resource;

/// One field-level problem inside a resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path, e.g. `spec.http[0].route[1].weight`.
    pub field: String,
    pub message: String,
}

/// Check one decoded resource; empty means valid.
pub fn validate(_res: &Resource) -> Vec<FieldError> {
    Vec::new()
}
