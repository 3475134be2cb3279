//! Envoy RBAC protos -> [`super`] types (conversion follows).
