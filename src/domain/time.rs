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
}
