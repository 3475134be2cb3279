//! mizzen-xds: per-proxy Envoy xDS v3 generation and the ADS server.
//!
//! - [`gen`]: generators, one module per xDS kind, each a pure function of
//!   `(proxy, push context)` (istiod's `networking/core` layout).
//! - [`server`]: the Aggregated Discovery Service (state-of-the-world and delta), versions,
//!   nonces, ACK/NACK tracking per proxy, pushes in Istio's order.
//! - [`status`]: what each connected proxy was sent and whether it ACKed, for `/debug/syncz`.

pub mod any;
pub mod gen;
pub mod server;
pub mod status;
