//! TLS pieces shared by CDS and LDS: Istio's in-mesh mTLS (ISTIO_MUTUAL) contexts, which take
//! the workload certificate (`default`) and the trust anchor (`ROOTCA`) over SDS from the agent
//! (the bootstrap's `sds-grpc` cluster), and the endpoint metadata auto mTLS matches on.

use crate::any::pack;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher::MatchPattern, StringMatcher};
use envoy_types::pb::google::protobuf::{value::Kind, BoolValue, Struct, Value};
use std::collections::BTreeMap;

/// The agent's SDS cluster and secret names (Istio's).
pub const SDS_CLUSTER: &str = "sds-grpc";
pub const WORKLOAD_SECRET: &str = "default";
pub const ROOT_SECRET: &str = "ROOTCA";
/// What a sidecar offers and expects in mesh mTLS: `istio-peer-exchange` (metadata exchange)
/// and `istio`. The inbound listener tells mesh mTLS from an application's own TLS by them.
pub const ALPN_IN_MESH: [&str; 2] = ["istio-peer-exchange", "istio"];
/// Endpoint metadata key Envoy matches `transport_socket_matches` against.
pub const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";
/// Names of the two auto mTLS matches (they appear in Envoy's stats).
pub const MATCH_ISTIO: &str = "tlsMode-istio";
pub const MATCH_DISABLED: &str = "tlsMode-disabled";

fn sds(name: &str) -> tls::SdsSecretConfig {
    tls::SdsSecretConfig {
        name: name.into(),
        sds_config: Some(core::ConfigSource {
            resource_api_version: core::ApiVersion::V3 as i32,
            config_source_specifier: Some(
                core::config_source::ConfigSourceSpecifier::ApiConfigSource(
                    core::ApiConfigSource {
                        api_type: core::api_config_source::ApiType::Grpc as i32,
                        transport_api_version: core::ApiVersion::V3 as i32,
                        set_node_on_first_message_only: true,
                        grpc_services: vec![core::GrpcService {
                            target_specifier: Some(core::grpc_service::TargetSpecifier::EnvoyGrpc(
                                core::grpc_service::EnvoyGrpc {
                                    cluster_name: SDS_CLUSTER.into(),
                                    ..Default::default()
                                },
                            )),
                            ..Default::default()
                        }],
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }),
    }
}

/// Exact matchers for SANs: `spiffe://` identities are URI SANs, anything else a DNS name.
pub fn san_matchers(sans: &[String]) -> Vec<tls::SubjectAltNameMatcher> {
    sans.iter()
        .map(|san| tls::SubjectAltNameMatcher {
            san_type: if san.starts_with("spiffe://") {
                tls::subject_alt_name_matcher::SanType::Uri
            } else {
                tls::subject_alt_name_matcher::SanType::Dns
            } as i32,
            matcher: Some(StringMatcher {
                match_pattern: Some(MatchPattern::Exact(san.clone())),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect()
}

/// Istio's mesh TLS versions: 1.2 accepted, 1.3 preferred (what two sidecars negotiate).
fn mesh_tls_params() -> tls::TlsParameters {
    tls::TlsParameters {
        tls_minimum_protocol_version: tls::tls_parameters::TlsProtocol::TlSv12 as i32,
        tls_maximum_protocol_version: tls::tls_parameters::TlsProtocol::TlSv13 as i32,
        ..Default::default()
    }
}

/// Certificate `default`, peers validated against `ROOTCA` (and `sans` when given).
fn mesh_common(alpn: &[&str], sans: &[String]) -> tls::CommonTlsContext {
    tls::CommonTlsContext {
        tls_params: Some(mesh_tls_params()),
        alpn_protocols: alpn.iter().map(|s| s.to_string()).collect(),
        tls_certificate_sds_secret_configs: vec![sds(WORKLOAD_SECRET)],
        validation_context_type: Some(
            tls::common_tls_context::ValidationContextType::CombinedValidationContext(
                tls::common_tls_context::CombinedCertificateValidationContext {
                    default_validation_context: Some(tls::CertificateValidationContext {
                        match_typed_subject_alt_names: san_matchers(sans),
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(sds(ROOT_SECRET)),
                    ..Default::default()
                },
            ),
        ),
        ..Default::default()
    }
}

pub fn transport_socket<M: prost::Message + prost::Name>(msg: &M) -> core::TransportSocket {
    core::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(pack(msg))),
    }
}

pub fn raw_buffer() -> core::TransportSocket {
    core::TransportSocket {
        name: "envoy.transport_sockets.raw_buffer".into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(pack(
            &RawBuffer::default(),
        ))),
    }
}

/// Istio's SNI for in-mesh mTLS: `outbound_.PORT_.SUBSET_.HOST`.
pub fn mesh_sni(port: u16, subset: &str, host: &str) -> String {
    format!("outbound_.{port}_.{subset}_.{host}")
}

/// Client side of ISTIO_MUTUAL: the server must present a certificate from the mesh root whose
/// URI SAN is one of `sans` (the destination's service accounts).
pub fn istio_mutual_upstream(sni: String, sans: &[String]) -> core::TransportSocket {
    transport_socket(&tls::UpstreamTlsContext {
        common_tls_context: Some(mesh_common(&ALPN_IN_MESH, sans)),
        sni,
        ..Default::default()
    })
}

/// Server side of mesh mTLS (an inbound chain): the client must present a certificate from the
/// mesh root; any mesh identity is accepted here (authorization is RBAC's job).
pub fn istio_mutual_downstream(alpn: &[&str]) -> core::TransportSocket {
    transport_socket(&tls::DownstreamTlsContext {
        common_tls_context: Some(mesh_common(alpn, &[])),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    })
}

fn string_struct(fields: &[(&str, &str)]) -> Struct {
    Struct {
        fields: fields
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Value {
                        kind: Some(Kind::StringValue(v.to_string())),
                    },
                )
            })
            .collect(),
    }
}

/// `{tlsMode: istio}`: what an endpoint with a sidecar carries and what the auto mTLS match asks.
pub fn tls_mode_istio() -> Struct {
    string_struct(&[("tlsMode", crate::gen::tls::TLS_MODE_ISTIO)])
}

pub const TLS_MODE_ISTIO: &str = mizzen_model::security::TLS_MODE_ISTIO;

/// Endpoint metadata `{envoy.transport_socket_match: {tlsMode: istio}}`.
pub fn endpoint_tls_metadata() -> core::Metadata {
    core::Metadata {
        filter_metadata: BTreeMap::from([(TRANSPORT_SOCKET_MATCH.to_string(), tls_mode_istio())])
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_and_sans() {
        assert_eq!(
            mesh_sni(8080, "", "a.ns.svc.cluster.local"),
            "outbound_.8080_._.a.ns.svc.cluster.local"
        );
        let m = san_matchers(&["spiffe://td/ns/a/sa/b".into(), "api.example.com".into()]);
        assert_eq!(
            m[0].san_type,
            tls::subject_alt_name_matcher::SanType::Uri as i32
        );
        assert_eq!(
            m[1].san_type,
            tls::subject_alt_name_matcher::SanType::Dns as i32
        );
    }
}
