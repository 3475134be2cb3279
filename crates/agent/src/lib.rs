//! mizzen-agent: proxy identity (xDS node id and metadata) and the Envoy agent mode.
