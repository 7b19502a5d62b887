//! Wall-clock arithmetic the policy needs: RFC 3339 instants for `not_after`, and UTC days for
//! daily budgets. Pure: times are passed in, never read here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use toml::value::{Datetime, Offset};

/// Seconds in a day.
pub const DAY_SECS: u64 = 86_400;

/// Parses an RFC 3339 instant with an offset (`2026-12-31T00:00:00Z`,
/// `2026-12-31T09:00:00+09:00`, fractional seconds allowed).
pub fn parse_rfc3339(raw: &str) -> Result<SystemTime, String> {
    let dt: Datetime = raw.trim().parse().map_err(|_| {
        format!("{raw:?} is not an RFC 3339 date and time; write it like \"2026-12-31T00:00:00Z\"")
    })?;
    from_datetime(&dt).map_err(|e| format!("{raw:?}: {e}"))
}

/// Converts a TOML datetime (from a string or a bare TOML value) to an instant. Needs the
/// date, the time and the offset: a local time would depend on the broker host's zone.
pub fn from_datetime(dt: &Datetime) -> Result<SystemTime, String> {
    let (Some(date), Some(time)) = (dt.date, dt.time) else {
        return Err("give a date and a time, as in \"2026-12-31T00:00:00Z\"".into());
    };
    let Some(offset) = dt.offset else {
        return Err(
            "give a UTC offset (`Z` or `+02:00`), as in \"2026-12-31T00:00:00Z\"; a local time \
             would depend on the broker host's time zone"
                .into(),
        );
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
    t.ok_or_else(|| "the date is out of range".into())
}

/// `2026-12-31T00:00:00Z` (sub-second parts dropped).
pub fn format_rfc3339(t: SystemTime) -> String {
    let secs: i64 = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    let days = secs.div_euclid(DAY_SECS as i64);
    let rem = secs.rem_euclid(DAY_SECS as i64);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, u32, u32) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
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
            let e = parse_rfc3339(raw).expect_err(raw);
            assert!(e.contains(want), "{raw}: {e}");
        }
    }

    #[test]
    fn formats_and_round_trips() {
        assert_eq!(format_rfc3339(at(0)), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(at(1_798_675_200)), "2026-12-31T00:00:00Z");
        assert_eq!(format_rfc3339(at(951_825_600)), "2000-02-29T12:00:00Z");
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
