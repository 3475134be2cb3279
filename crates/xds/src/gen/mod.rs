//! Generators: `(proxy, push) -> resources` for each xDS type. Pure functions: no I/O, no
//! locks, deterministic output (sorted), so the server can diff versions cheaply.

pub mod cluster;
pub mod endpoint;
pub mod listener;
pub mod route;
