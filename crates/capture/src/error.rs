//! Typed errors: configuration errors name the flag and the offending value, so the operator
//! knows what to fix; apply errors carry the command and its stderr.

use thiserror::Error;

/// A flag (or its environment variable) has a value we refuse. Raised before anything changes.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid value {value:?} for {flag}: not a port number (1-65535)")]
    Port { flag: &'static str, value: String },
    #[error("invalid value {value:?} for {flag}: not a CIDR (expected e.g. 10.0.0.0/8 or 2001:db8::/32)")]
    Cidr { flag: &'static str, value: String },
    #[error("invalid value {value:?} for {flag}: expected REDIRECT or TPROXY")]
    Mode { flag: &'static str, value: String },
    #[error("invalid value {value:?} for {flag}: {reason}")]
    Other {
        flag: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// Failure while reading or changing the kernel's rules.
#[derive(Debug, Error)]
pub enum CaptureError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("could not run {command}: {source} (is it installed and on PATH?)")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot express iptables rule `{rule}` in nftables: {reason}")]
    Nft { rule: String, reason: String },
}
