//! mizzen-xds: per-proxy Envoy xDS v3 generation and the ADS server.
