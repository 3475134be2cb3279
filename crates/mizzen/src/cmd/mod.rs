//! One module per subcommand: its arguments and how it runs.
pub mod iptables;
pub mod pilot;
pub mod proxy;
pub mod validate;
