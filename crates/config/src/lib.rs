//! mizzen-config: Istio and Kubernetes YAML in, typed and validated resources out.
//!
//! This crate owns the first step of the data flow (the Galley role): reading files,
//! splitting multi-document YAML, decoding each document into a typed resource and
//! validating it field by field the way Istio's validation webhook does. Nothing here
//! knows about xDS or proxies.
