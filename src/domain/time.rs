//! Time as the API shows it and as the store keeps it.
//!
//! The store keeps every instant as integer epoch milliseconds (text timestamps misorder
//! in SQLite); the API shows RFC 3339 UTC with exactly three fractional digits.

use chrono::{DateTime, SecondsFormat, Utc};

/// An instant, in milliseconds since the Unix epoch (UTC).
pub type EpochMillis = i64;

/// The current time. Handlers call this once per request and pass the value down, so
/// everything below them is testable with a fixed time.
pub fn now_millis() -> EpochMillis {
    Utc::now().timestamp_millis()
}

/// `2026-03-20T14:30:00.000Z`
pub fn format_rfc3339_millis(at: EpochMillis) -> String {
    DateTime::<Utc>::from_timestamp_millis(at)
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Serde helper: serialise an [`EpochMillis`] field as RFC 3339 with milliseconds.
pub mod rfc3339_millis {
    use super::EpochMillis;

    pub fn serialize<S: serde::Serializer>(at: &EpochMillis, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_rfc3339_millis(*at))
    }

    /// The same for an optional field.
    pub mod option {
        use super::EpochMillis;

        pub fn serialize<S: serde::Serializer>(
            at: &Option<EpochMillis>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match at {
                Some(at) => s.serialize_str(&super::super::format_rfc3339_millis(*at)),
                None => s.serialize_none(),
            }
        }
    }
}

/// `500ms`, `10s`, `5m`, `2h`, `5d`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} needs a unit: ms, s, m, h or d"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 10s or 5m"))?;
    let seconds = |mult: u64| {
        n.checked_mul(mult)
            .map(std::time::Duration::from_secs)
            .ok_or_else(|| format!("{text:?} is too long"))
    };
    match unit {
        "ms" => Ok(std::time::Duration::from_millis(n)),
        "s" => seconds(1),
        "m" => seconds(60),
        "h" => seconds(3600),
        "d" => seconds(86_400),
        _ => Err(format!(
            "{text:?}: unknown unit {unit:?}; use ms, s, m, h or d"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_exactly_three_fraction_digits() {
        assert_eq!(
            format_rfc3339_millis(1_774_017_000_000),
            "2026-03-20T14:30:00.000Z"
        );
        assert_eq!(
            format_rfc3339_millis(1_774_017_000_007),
            "2026-03-20T14:30:00.007Z"
        );
    }

    #[test]
    fn parses_durations() {
        assert_eq!(
            parse_duration("500ms"),
            Ok(std::time::Duration::from_millis(500))
        );
        assert_eq!(
            parse_duration("10s"),
            Ok(std::time::Duration::from_secs(10))
        );
        assert_eq!(
            parse_duration("5m"),
            Ok(std::time::Duration::from_secs(300))
        );
        assert_eq!(
            parse_duration("2h"),
            Ok(std::time::Duration::from_secs(7200))
        );
        assert_eq!(
            parse_duration("5d"),
            Ok(std::time::Duration::from_secs(432_000))
        );
        for bad in ["", "10", "s", "10x", "-1s", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
