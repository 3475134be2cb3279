"""Helpers for Mizzen's end-to-end tests: processes, ports, the pilot, Envoy via the agent,
network namespaces and HTTP load. Every wait is bounded; every process is ended by its PID."""
