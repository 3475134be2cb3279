//! One module per subcommand: its arguments and how it runs.
pub mod convert;
pub mod iptables;
pub mod local;
pub mod pilot;
pub mod proxy;
pub mod sample_app;
pub mod validate;
