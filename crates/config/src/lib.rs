//! mizzen-config: Istio and Kubernetes YAML in, typed and validated resources out.
//!
//! This crate owns the first step of the data flow (the Galley role): reading files,
//! splitting multi-document YAML, decoding each document into a typed resource and
//! validating it field by field the way Istio's validation webhook does. Nothing here
//! knows about xDS or proxies.
//!
//! - [`networking`], [`security`], [`k8s`]: the object schemas, field for field.
//! - [`resource`]: kinds, metadata, origin (file + document) and the decoded [`Resource`].
//! - [`load`]: directory walk and multi-document decoding.
//! - [`validate`]: semantic checks beyond the schema.
//! - [`error`]: [`ConfigError`], naming file, document, object and field.

pub mod duration;
pub mod error;
pub mod k8s;
pub mod load;
pub mod networking;
pub mod resource;
pub mod security;
pub mod validate;

pub use error::ConfigError;
pub use resource::{Kind, Meta, Origin, Resource, ResourceKey, Spec};
