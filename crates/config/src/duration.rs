//! Durations as Istio's YAML spells them.
//!
//! Istio decodes durations with a JSON codec that accepts both protobuf's `"1.5s"` and Go's
//! `"1m30s"`/`"100ms"` forms (its docs use both), so we accept the union.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::time::Duration as StdDuration;

/// A non-negative duration from config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub StdDuration);

impl Duration {
    pub fn as_std(&self) -> StdDuration {
        self.0
    }
}

/// Parse `"2s"`, `"0.5s"`, `"100ms"`, `"1m30s"`, `"1h"`, `"250us"`, `"10ns"`.
pub fn parse_duration(s: &str) -> Result<StdDuration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s == "0" {
        return Ok(StdDuration::ZERO);
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("duration {s:?} lacks a unit (use s, ms, m, h ...)"))?;
        if num_len == 0 {
            return Err(format!("duration {s:?} is not a number followed by a unit"));
        }
        let value: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("duration {s:?} has a malformed number"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let secs = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => return Err(format!("duration {s:?} has unknown unit {other:?}")),
        };
        total += value * secs;
    }
    if !total.is_finite() || total > 315_576_000_000.0 {
        return Err(format!("duration {s:?} is out of range"));
    }
    Ok(StdDuration::from_secs_f64(total))
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"2s\", \"0.5s\" or \"100ms\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
                parse_duration(v).map(Duration).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}s", self.0.as_secs_f64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_forms() {
        assert_eq!(parse_duration("2s").unwrap(), StdDuration::from_secs(2));
        assert_eq!(
            parse_duration("0.5s").unwrap(),
            StdDuration::from_millis(500)
        );
        assert_eq!(
            parse_duration("100ms").unwrap(),
            StdDuration::from_millis(100)
        );
        assert_eq!(parse_duration("1m30s").unwrap(), StdDuration::from_secs(90));
        assert_eq!(parse_duration("1h").unwrap(), StdDuration::from_secs(3600));
        assert!(parse_duration("2").is_err());
        assert!(parse_duration("2x").is_err());
        assert!(parse_duration("").is_err());
    }
}
