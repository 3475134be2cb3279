//! Istio's CSR API (`security/proto/istioca.proto`, package `istio.v1.auth`), by hand.
//!
//! The messages are tiny and stable, so prost derives with Istio's field numbers are clearer
//! than a protoc step in the build. Field 2 of the request is unused (reserved) upstream too.

use envoy_types::pb::google::protobuf::Struct;

/// gRPC service name, as Istio's agents and ztunnel call it.
pub const SERVICE: &str = "istio.v1.auth.IstioCertificateService";
/// Full method path of the one RPC.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";

#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded certificate request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested lifetime in seconds; 0 (or absent) means the CA's default.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// Free-form metadata (Istio uses it for impersonation by ztunnel; ignored here).
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<Struct>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM certificates: the leaf first, then intermediates, the root last.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}
