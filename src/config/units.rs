//! The units config values are written in: durations and sizes.

/// Durations written as `"250ms"`, `"30s"`, `"24h"`.
pub mod duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Writes a duration the way `parse` reads it.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    /// Reads a duration string; the error never repeats it.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    /// Parses `"250ms"`, `"4s"`, `"1h 30m"`. The error does not repeat the text: it may be a
    /// secret pasted in the wrong place.
    pub fn parse(text: &str) -> Result<Duration, String> {
        humantime::parse_duration(text.trim()).map_err(|e| {
            let why = match e {
                humantime::DurationError::NumberOverflow => "too large",
                humantime::DurationError::Empty => "empty",
                humantime::DurationError::UnknownUnit { .. } => "unknown unit",
                humantime::DurationError::NumberExpected(_)
                | humantime::DurationError::InvalidCharacter(_) => "not a number with a unit",
            };
            format!("invalid duration ({why}): write e.g. \"250ms\", \"30s\", \"24h\"")
        })
    }
}

/// Sizes written as `"64MiB"`, `"1GiB"`, `"500KB"` or a plain number of bytes.
pub mod bytesize {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes a size in the largest binary unit that divides it.
    pub fn serialize<S: Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
        let (div, unit) = [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")]
            .into_iter()
            .find(|(d, _)| *n >= *d && n % d == 0)
            .unwrap_or((1, "B"));
        s.serialize_str(&format!("{}{unit}", n / div))
    }

    /// Reads a size string; the error never repeats it.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    /// Parses a size with an optional binary (KiB, MiB, GiB) or decimal (KB, MB, GB) unit.
    /// The error does not repeat the text.
    pub fn parse(text: &str) -> Result<u64, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| "invalid size: write e.g. \"64MiB\", \"500KB\" or bytes".to_owned())?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return Err("invalid size unit: use B, KiB, MiB, GiB, KB, MB or GB".into()),
        };
        n.checked_mul(mult)
            .ok_or_else(|| "invalid size: too large".to_owned())
    }
}
