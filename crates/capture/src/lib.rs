//! mizzen-capture: the traffic-capture rules of a sidecar, i.e. what `istio-iptables` does.
//!
//! This crate owns everything between the `mizzen iptables` flags and the kernel:
//!
//! - [`flags`]: the istio-iptables command line (same long/short names, defaults and
//!   environment variables), turned into a validated [`Config`] before anything is touched;
//! - [`generate`]: pure rule generation, `Config` -> [`Ruleset`] (tables, chains, rules in
//!   istio-iptables' order), with no I/O so it can be compared against Istio's golden files;
//! - [`ruleset`]: the typed ruleset and its `iptables-restore` rendering;
//! - [`iptables`]: applying / cleaning up with `iptables-save` + one atomic `iptables-restore`;
//! - [`nftables`]: the equivalent ruleset for `nft -f`, applied and cleaned up atomically.
//!
//! It does not own the proxy listening on the capture ports (that is `mizzen proxy`).
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod flags;
pub mod generate;
pub mod iptables;
pub mod nftables;
mod process;
pub mod ruleset;

pub use config::{Config, InterceptionMode, PortSelection, RangeSelection};
pub use error::{CaptureError, ConfigError};
pub use flags::Flags;
pub use generate::generate;
pub use ruleset::{Family, Position, Rule, Ruleset, Table};
