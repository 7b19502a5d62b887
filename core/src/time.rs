//! Time helpers written once: Unix times as the audit log, the vault and the control protocol
//! store them, civil (proleptic Gregorian, UTC) dates, and the text forms every output prints:
//! RFC 3339 for policies and messages, and the console's clock and timestamp.
//!
//! Pure apart from the `now_*` functions, which read the wall clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use toml::value::{Datetime, Offset};

/// Seconds in a day.
pub const DAY_SECS: u64 = 86_400;

/// Milliseconds since the Unix epoch; 0 before it, saturating far after it.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Seconds since the Unix epoch; 0 before it.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Now, in Unix milliseconds.
pub fn now_unix_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// Now, in Unix seconds.
pub fn now_unix_secs() -> u64 {
    unix_secs(SystemTime::now())
}

/// The time `secs` seconds after the Unix epoch (saturating).
pub fn from_unix_secs(secs: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .unwrap_or(UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX)))
}

/// Why a date and time cannot be used, once it has been read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DateTimeError {
    /// A date alone, or a time alone.
    #[error("give a date and a time, as in \"2026-12-31T00:00:00Z\"")]
    NotDateAndTime,
    /// A local time: it would mean a different instant on each broker host.
    #[error(
        "give a UTC offset (`Z` or `+02:00`), as in \"2026-12-31T00:00:00Z\"; a local time \
         would depend on the broker host's time zone"
    )]
    NoOffset,
    #[error("the date is out of range")]
    OutOfRange,
}

/// Why a text is not an RFC 3339 instant. Both forms name the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rfc3339Error {
    #[error("{raw:?} is not an RFC 3339 date and time; write it like \"2026-12-31T00:00:00Z\"")]
    Syntax { raw: String },
    /// It reads as a date and time, but not as one instant.
    #[error("{raw:?}: {problem}")]
    Unusable { raw: String, problem: DateTimeError },
}

/// Parses an RFC 3339 instant with an offset (`2026-12-31T00:00:00Z`,
/// `2026-12-31T09:00:00+09:00`, fractional seconds allowed).
pub fn parse_rfc3339(raw: &str) -> Result<SystemTime, Rfc3339Error> {
    let dt: Datetime = raw.trim().parse().map_err(|_| Rfc3339Error::Syntax {
        raw: raw.to_string(),
    })?;
    from_datetime(&dt).map_err(|problem| Rfc3339Error::Unusable {
        raw: raw.to_string(),
        problem,
    })
}

/// Converts a TOML datetime (from a string or a bare TOML value) to an instant. Needs the
/// date, the time and the offset: a local time would depend on the broker host's zone.
pub fn from_datetime(dt: &Datetime) -> Result<SystemTime, DateTimeError> {
    let (Some(date), Some(time)) = (dt.date, dt.time) else {
        return Err(DateTimeError::NotDateAndTime);
    };
    let Some(offset) = dt.offset else {
        return Err(DateTimeError::NoOffset);
    };
    let days = days_from_civil(
        i64::from(date.year),
        u32::from(date.month),
        u32::from(date.day),
    );
    let offset_secs = match offset {
        Offset::Z => 0,
        Offset::Custom { minutes } => i64::from(minutes) * 60,
    };
    let secs = days * DAY_SECS as i64
        + i64::from(time.hour) * 3600
        + i64::from(time.minute) * 60
        + i64::from(time.second.unwrap_or(0))
        - offset_secs;
    let nanos = time.nanosecond.unwrap_or(0);
    let t = match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH.checked_add(Duration::new(s, nanos)),
        Err(_) => UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))
            .and_then(|t| t.checked_add(Duration::from_nanos(u64::from(nanos)))),
    };
    t.ok_or(DateTimeError::OutOfRange)
}

/// `2026-12-31T00:00:00Z` (sub-second parts dropped; works before 1970 too).
pub fn format_rfc3339(t: SystemTime) -> String {
    let secs: i64 = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    let c = Civil::of(secs);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    )
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a Unix time in seconds: brokerctl's tables.
pub fn utc_date_time(unix_secs: u64) -> String {
    let c = Civil::of_ms(unix_secs.saturating_mul(1000));
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    )
}

/// `HH:MM:SS.mmm` (UTC) of a Unix time in milliseconds: `brokerctl logs`' time column.
pub fn utc_hms_millis(unix_ms: u64) -> String {
    format!("{}.{:03}", utc_hms(unix_ms), unix_ms % 1000)
}

/// `HH:MM:SS` (UTC) of a Unix time in milliseconds: the console's time column.
pub fn utc_hms(unix_ms: u64) -> String {
    let c = Civil::of_ms(unix_ms);
    format!("{:02}:{:02}:{:02}", c.hour, c.minute, c.second)
}

/// `YYYY-MM-DD HH:MM:SS.mmm UTC` of a Unix time in milliseconds: the console's detail pane.
pub fn utc_timestamp(unix_ms: u64) -> String {
    let c = Civil::of_ms(unix_ms);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03} UTC",
        c.year,
        c.month,
        c.day,
        c.hour,
        c.minute,
        c.second,
        unix_ms % 1000
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date `(year, month, day)` of a day count since 1970-01-01 (negative
/// before it); the inverse of [`days_from_civil`].
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

/// A UTC date and time of day, to the second.
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: i64,
    minute: i64,
    second: i64,
}

impl Civil {
    /// `secs` seconds after the Unix epoch (negative before it).
    fn of(secs: i64) -> Self {
        let (year, month, day) = civil_from_days(secs.div_euclid(DAY_SECS as i64));
        let rem = secs.rem_euclid(DAY_SECS as i64);
        Self {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem % 3600 / 60,
            second: rem % 60,
        }
    }

    /// `unix_ms` milliseconds after the Unix epoch (the sub-second part dropped).
    fn of_ms(unix_ms: u64) -> Self {
        // u64::MAX / 1000 < i64::MAX: the conversion cannot fail.
        Self::of(i64::try_from(unix_ms / 1000).unwrap_or(i64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn brokerctl_spells_dates_and_event_times_in_utc() {
        assert_eq!(utc_date_time(0), "1970-01-01 00:00:00");
        assert_eq!(utc_date_time(1_795_435_200), "2026-11-23 12:00:00");
        assert_eq!(utc_hms_millis(1_795_435_200_042), "12:00:00.042");
        // Far dates do not panic (humantime's formatter refused years past 9999).
        assert!(utc_date_time(400_000_000_000).starts_with("14645-"));
    }

    #[test]
    fn parses_utc_offsets_and_fractions() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(at(0)));
        assert_eq!(parse_rfc3339("2026-12-31T00:00:00Z"), Ok(at(1_798_675_200)));
        assert_eq!(
            parse_rfc3339("2026-12-31T09:00:00+09:00"),
            Ok(at(1_798_675_200))
        );
        assert_eq!(
            parse_rfc3339("2026-12-30T22:30:00-01:30"),
            Ok(at(1_798_675_200))
        );
        assert_eq!(
            parse_rfc3339("2000-02-29T12:00:00.5Z"),
            Ok(at(951_825_600) + Duration::from_millis(500))
        );
        assert!(parse_rfc3339("1969-12-31T23:59:59Z").expect("ok") < at(0));
    }

    #[test]
    fn refuses_incomplete_or_garbage() {
        for (raw, want) in [
            ("tomorrow", "not an RFC 3339"),
            ("2026-12-31", "a date and a time"),
            ("2026-12-31T00:00:00", "UTC offset"),
            ("2026-13-01T00:00:00Z", "not an RFC 3339"),
            ("2026-02-30T00:00:00Z", "not an RFC 3339"),
        ] {
            let e = parse_rfc3339(raw).expect_err(raw).to_string();
            assert!(e.contains(want), "{raw}: {e}");
        }
        // The messages policy files show, word for word.
        assert_eq!(
            parse_rfc3339("tomorrow").expect_err("garbage").to_string(),
            "\"tomorrow\" is not an RFC 3339 date and time; write it like \"2026-12-31T00:00:00Z\""
        );
        assert_eq!(
            parse_rfc3339("2026-12-31").expect_err("date only"),
            Rfc3339Error::Unusable {
                raw: "2026-12-31".into(),
                problem: DateTimeError::NotDateAndTime
            }
        );
        assert_eq!(
            parse_rfc3339("2026-12-31T00:00:00")
                .expect_err("local")
                .to_string(),
            "\"2026-12-31T00:00:00\": give a UTC offset (`Z` or `+02:00`), as in \
             \"2026-12-31T00:00:00Z\"; a local time would depend on the broker host's time zone"
        );
    }

    #[test]
    fn formats_and_round_trips() {
        assert_eq!(format_rfc3339(at(0)), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(at(1_798_675_200)), "2026-12-31T00:00:00Z");
        assert_eq!(format_rfc3339(at(951_825_600)), "2000-02-29T12:00:00Z");
        assert_eq!(
            format_rfc3339(UNIX_EPOCH - Duration::from_secs(1)),
            "1969-12-31T23:59:59Z"
        );
        for s in [
            "1999-12-31T23:59:59Z",
            "2024-02-29T01:02:03Z",
            "2100-03-01T00:00:00Z",
            "1960-06-15T10:20:30Z",
        ] {
            assert_eq!(format_rfc3339(parse_rfc3339(s).expect(s)), s);
        }
    }

    #[test]
    fn console_clock_and_timestamp() {
        assert_eq!(
            utc_timestamp(1_717_245_296_789),
            "2024-06-01 12:34:56.789 UTC"
        );
        assert_eq!(utc_hms(1_717_245_296_789), "12:34:56");
        assert_eq!(utc_timestamp(0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(utc_hms(0), "00:00:00");
        assert_eq!(
            utc_timestamp(951_782_400_000),
            "2000-02-29 00:00:00.000 UTC"
        );
        assert_eq!(utc_hms(86_399_999), "23:59:59");
        // The far end of u64 milliseconds does not overflow.
        assert!(utc_timestamp(u64::MAX).ends_with(".615 UTC"));
    }

    #[test]
    fn civil_days_round_trip() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
    }

    #[test]
    fn unix_conversions() {
        assert_eq!(unix_secs(at(5)), 5);
        assert_eq!(unix_ms(at(5) + Duration::from_millis(7)), 5_007);
        assert_eq!(unix_secs(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert_eq!(from_unix_secs(1_798_675_200), at(1_798_675_200));
    }
}
