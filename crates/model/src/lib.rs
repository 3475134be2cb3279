//! mizzen-model: the abstract model of the mesh (seed 002).
//!
//! Services, ports, workloads and endpoints, fed by platform adapters (files today;
//! a live Kubernetes watcher and VM auto-registration later), plus an immutable
//! [`PushContext`] that indexes config for the xDS generators.
