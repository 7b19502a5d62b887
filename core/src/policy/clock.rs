//! Wall-clock parts of a policy: the `not_after` field, and the UTC days daily budgets count in.
//! The calendar arithmetic and RFC 3339 are [`crate::time`]'s. Pure: times are passed in, never
//! read here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::time::{self, DAY_SECS, DateTimeError, Rfc3339Error};

/// Why a rule's `not_after` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAfterError {
    /// A string that is not an RFC 3339 instant.
    #[error(transparent)]
    Text(#[from] Rfc3339Error),
    /// A bare TOML date or time that is not an instant.
    #[error(transparent)]
    Value(#[from] DateTimeError),
    /// A number, a table, ...
    #[error("not_after is a date and time, such as \"2026-12-31T00:00:00Z\"")]
    NotADate,
}

/// A rule's `not_after`: an RFC 3339 string or a bare TOML date and time, with an offset.
pub fn not_after(value: &toml::Value) -> Result<SystemTime, NotAfterError> {
    Ok(match value {
        toml::Value::String(s) => time::parse_rfc3339(s)?,
        toml::Value::Datetime(dt) => time::from_datetime(dt)?,
        _ => return Err(NotAfterError::NotADate),
    })
}

/// The UTC day number of `t` (days since 1970-01-01).
pub fn utc_day(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs() / DAY_SECS).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs().div_ceil(DAY_SECS)).unwrap_or(i64::MAX),
    }
}

/// Time from `t` to the next UTC midnight.
pub fn until_next_utc_midnight(t: SystemTime) -> Duration {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let into_day = Duration::new(since.as_secs() % DAY_SECS, since.subsec_nanos());
    Duration::from_secs(DAY_SECS).saturating_sub(into_day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn not_after_takes_strings_and_bare_datetimes() {
        let parse = |text: &str| -> toml::Value {
            let table: toml::Table = text.parse().expect(text);
            table["t"].clone()
        };
        assert_eq!(
            not_after(&parse("t = \"2026-12-31T00:00:00Z\"")),
            Ok(at(1_798_675_200))
        );
        assert_eq!(
            not_after(&parse("t = 2026-12-31T09:00:00+09:00")),
            Ok(at(1_798_675_200))
        );
        assert_eq!(
            not_after(&parse("t = 2026-12-31")).map_err(|e| e.to_string()),
            Err("give a date and a time, as in \"2026-12-31T00:00:00Z\"".into())
        );
        assert_eq!(
            not_after(&parse("t = \"soon\"")).map_err(|e| e.to_string()),
            Err(
                "\"soon\" is not an RFC 3339 date and time; write it like \"2026-12-31T00:00:00Z\""
                    .into()
            )
        );
        assert_eq!(not_after(&parse("t = 5")), Err(NotAfterError::NotADate));
    }

    #[test]
    fn days_and_midnight() {
        assert_eq!(utc_day(at(0)), 0);
        assert_eq!(utc_day(at(DAY_SECS - 1)), 0);
        assert_eq!(utc_day(at(DAY_SECS)), 1);
        assert_eq!(utc_day(UNIX_EPOCH - Duration::from_secs(1)), -1);
        assert_eq!(
            until_next_utc_midnight(at(DAY_SECS + 3600)),
            Duration::from_secs(DAY_SECS - 3600)
        );
        assert_eq!(
            until_next_utc_midnight(at(DAY_SECS)),
            Duration::from_secs(DAY_SECS)
        );
    }
}
