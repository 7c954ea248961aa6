//! Times as records hold them and as people write them.
//!
//! Records carry Unix nanoseconds (UTC, leap seconds not counted, as Unix
//! time never counts them). People read and write RFC 3339 (`2026-11-23T06:00:00Z`,
//! `2026-11-23T07:00:00.25+01:00`), or, when asking for records, a span back
//! from now (`90s`, `15m`, `1h`, `7d`). This module converts between them; it
//! never reads the clock: "now" is passed in.
//!
//! The parser takes RFC 3339's `date-time` (section 5.6): four-digit year,
//! two-digit fields, `T` (or `t`, or a space, as RFC 3339 allows), an
//! optional fraction of any length (digits past nanoseconds are cut, not
//! rounded), and `Z` or a `±hh:mm` offset. Every field is range-checked, the
//! day against its month and year; a leap second (`:60`) is accepted and
//! counted as the first second of the next minute, as Unix time has no room
//! for it. Times before 1970 are refused: records cannot hold them.

use core::fmt;

/// A time that cannot be read: what was given and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{input}`: {kind}")]
pub struct TimeError {
    input: String,
    kind: Kind,
}

impl TimeError {
    fn new(input: &str, kind: Kind) -> TimeError {
        TimeError {
            input: input.to_string(),
            kind,
        }
    }

    /// The text that was refused.
    pub fn input(&self) -> &str {
        &self.input
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Not laid out as `YYYY-MM-DDThh:mm:ss[.f](Z|±hh:mm)`.
    Form,
    /// A field is out of its range (the name says which).
    Range(&'static str),
    /// `.` with no digits after it.
    EmptyFraction,
    /// No `Z` or `±hh:mm` after the time, or something after it.
    Offset,
    /// Before 1970-01-01T00:00:00Z, or past what nanoseconds in a `u64` hold (2554).
    Span,
    /// None of the forms [`parse_time`] takes.
    NoForm,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Form => f.write_str("not RFC 3339 (YYYY-MM-DDThh:mm:ss[.fraction] and Z or ±hh:mm)"),
            Kind::Range(field) => write!(f, "{field} out of range"),
            Kind::EmptyFraction => f.write_str("empty fraction after '.'"),
            Kind::Offset => f.write_str("missing or bad UTC offset (Z or ±hh:mm)"),
            Kind::Span => f.write_str("outside what a record's time holds (1970 to 2554)"),
            Kind::NoForm => {
                f.write_str("expected a duration like 1h or 30m, RFC 3339 (2026-11-23T06:00:00Z), or Unix nanoseconds")
            }
        }
    }
}

const NS_PER_S: i128 = 1_000_000_000;

/// The value of `s`, all ASCII digits, or `None` (no sign, no spaces).
fn digits(s: &[u8]) -> Option<i64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
}

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day counted from 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Unix nanoseconds of an RFC 3339 date-time.
pub fn parse_rfc3339(s: &str) -> Result<u64, TimeError> {
    let fail = |kind| TimeError::new(s, kind);
    let b = s.as_bytes();
    // YYYY-MM-DDThh:mm:ss is 19 bytes; at least `Z` follows.
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(fail(Kind::Form));
    }
    let field = |r: core::ops::Range<usize>| digits(&b[r]).ok_or_else(|| fail(Kind::Form));
    let (y, mo, d) = (field(0..4)?, field(5..7)?, field(8..10)?);
    let (h, mi, se) = (field(11..13)?, field(14..16)?, field(17..19)?);
    for (value, range, name) in [
        (mo, 1..=12, "month"),
        (h, 0..=23, "hour"),
        (mi, 0..=59, "minute"),
        (se, 0..=60, "second"),
    ] {
        if !range.contains(&value) {
            return Err(fail(Kind::Range(name)));
        }
    }
    if !(1..=days_in_month(y, mo)).contains(&d) {
        return Err(fail(Kind::Range("day")));
    }
    let mut rest = &b[19..];
    let mut frac_ns = 0i64;
    if let Some(r) = rest.strip_prefix(b".") {
        let n = r.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return Err(fail(Kind::EmptyFraction));
        }
        let kept = &r[..n.min(9)];
        // At most nine digits: they fit, and the scale is at most 10^8.
        frac_ns = digits(kept).unwrap_or(0) * 10i64.pow(9 - kept.len() as u32);
        rest = &r[n..];
    }
    let offset_s = match rest {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), hh @ .., b':', m1, m2] if hh.len() == 2 => {
            let oh = digits(hh).ok_or_else(|| fail(Kind::Offset))?;
            let om = digits(&[*m1, *m2]).ok_or_else(|| fail(Kind::Offset))?;
            if oh > 23 {
                return Err(fail(Kind::Range("offset hour")));
            }
            if om > 59 {
                return Err(fail(Kind::Range("offset minute")));
            }
            let v = oh * 3600 + om * 60;
            if *sign == b'-' { -v } else { v }
        }
        _ => return Err(fail(Kind::Offset)),
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se - offset_s;
    let ns = i128::from(secs) * NS_PER_S + i128::from(frac_ns);
    u64::try_from(ns).map_err(|_| fail(Kind::Span))
}

/// RFC 3339 of Unix nanoseconds, in UTC with milliseconds
/// (`2023-11-14T22:13:20.500Z`); finer digits are cut.
pub fn format_rfc3339(ns: u64) -> String {
    // u64 nanoseconds are under 2^64 / 10^9 seconds: an i64 holds them.
    let secs = (ns / 1_000_000_000) as i64;
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        ns % 1_000_000_000 / 1_000_000
    )
}

/// A time given to select records, as Unix nanoseconds: Unix nanoseconds
/// themselves (`1700000000000000000`), a span back from `now_ns` (`500ms`,
/// `90s`, `15m`, `1h`, `7d`; clamped at 1970), or RFC 3339.
pub fn parse_time(s: &str, now_ns: u64) -> Result<u64, TimeError> {
    let t = s.trim();
    if let Ok(ns) = t.parse::<u64>() {
        return Ok(ns);
    }
    for (suffix, unit) in [
        ("ms", 1_000_000u64),
        ("s", 1_000_000_000),
        ("m", 60_000_000_000),
        ("h", 3_600_000_000_000),
        ("d", 86_400_000_000_000),
    ] {
        if let Some(n) = t.strip_suffix(suffix).and_then(|n| n.parse::<u64>().ok()) {
            return Ok(now_ns.saturating_sub(n.saturating_mul(unit)));
        }
    }
    match parse_rfc3339(t) {
        Ok(ns) => Ok(ns),
        // Laid out as RFC 3339: say what is wrong with it. Anything else
        // was not meant as RFC 3339: say which forms there are.
        Err(e) if looks_like_rfc3339(t) => Err(e),
        Err(_) => Err(TimeError::new(s, Kind::NoForm)),
    }
}

/// Starts with a date: `NNNN-`.
fn looks_like_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 5 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-'
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_700_000_000_000_000_000; // 2023-11-14T22:13:20Z
    const S: u64 = 1_000_000_000;

    #[test]
    fn accepted_forms() {
        let cases: &[(&str, u64)] = &[
            ("1970-01-01T00:00:00Z", 0),
            ("2023-11-14T22:13:20Z", T),
            ("2023-11-14t22:13:20z", T),
            ("2023-11-14 22:13:20Z", T),
            // Offsets: local time minus the offset.
            ("2023-11-14T23:13:20+01:00", T),
            ("2023-11-14T16:43:20-05:30", T),
            ("2023-11-15T00:13:20+02:00", T),
            ("2023-11-14T22:13:20+00:00", T),
            ("2023-11-14T22:13:20-00:00", T),
            ("2023-11-15T22:12:20+23:59", T),
            // Fractions of any length; past nanoseconds cut.
            ("2023-11-14T22:13:20.5Z", T + S / 2),
            ("2023-11-14T22:13:20.000000001Z", T + 1),
            ("2023-11-14T22:13:20.1234567899Z", T + 123_456_789),
            ("2023-11-14T23:13:20.25+01:00", T + S / 4),
            // Leap-year days.
            ("2024-02-29T00:00:00Z", 1_709_164_800 * S),
            ("2000-02-29T00:00:00Z", 951_782_400 * S),
            ("2024-03-01T00:00:00Z", 1_709_251_200 * S),
            ("2024-12-31T00:00:00Z", 1_735_603_200 * S),
            // A leap second is the next minute's first.
            ("2016-12-31T23:59:60Z", 1_483_228_800 * S),
            // The last second u64 nanoseconds hold.
            ("2554-07-21T23:34:33Z", 18_446_744_073 * S),
        ];
        for (text, want) in cases {
            assert_eq!(parse_rfc3339(text), Ok(*want), "{text}");
        }
    }

    #[test]
    fn rejected_forms() {
        let cases: &[(&str, Kind)] = &[
            ("", Kind::Form),
            ("2023-11-14", Kind::Form),
            ("2023-11-14T22:13:20", Kind::Form),
            ("2023/11/14T22:13:20Z", Kind::Form),
            ("2023-11-14X22:13:20Z", Kind::Form),
            ("23-11-14T22:13:20Z+0", Kind::Form),
            ("+202-11-14T22:13:20Z", Kind::Form),
            ("2023-+1-14T22:13:20Z", Kind::Form),
            ("2023-11-14T-1:13:20Z", Kind::Form),
            ("2023-11-14T 1:13:20Z", Kind::Form),
            ("2023-11-14T22:13:2xZ", Kind::Form),
            ("२०२३-11-14T22:13:20Z", Kind::Form),
            // Out-of-range fields.
            ("2023-00-14T22:13:20Z", Kind::Range("month")),
            ("2023-13-01T00:00:00Z", Kind::Range("month")),
            ("2023-11-00T22:13:20Z", Kind::Range("day")),
            ("2023-11-31T22:13:20Z", Kind::Range("day")),
            ("2023-02-29T00:00:00Z", Kind::Range("day")),
            ("1900-02-29T00:00:00Z", Kind::Range("day")),
            ("2024-02-30T00:00:00Z", Kind::Range("day")),
            ("2023-11-14T24:00:00Z", Kind::Range("hour")),
            ("2023-11-14T22:60:00Z", Kind::Range("minute")),
            ("2023-11-14T22:13:61Z", Kind::Range("second")),
            ("2023-11-14T22:13:20+24:00", Kind::Range("offset hour")),
            ("2023-11-14T22:13:20+01:60", Kind::Range("offset minute")),
            // Fractions and offsets.
            ("2023-11-14T22:13:20.Z", Kind::EmptyFraction),
            ("2023-11-14T22:13:20.5", Kind::Offset),
            ("2023-11-14T22:13:20+0100", Kind::Offset),
            ("2023-11-14T22:13:20+1:00", Kind::Offset),
            ("2023-11-14T22:13:20+-1:00", Kind::Offset),
            ("2023-11-14T22:13:20Z ", Kind::Offset),
            ("2023-11-14T22:13:20ZZ", Kind::Offset),
            ("2023-11-14T22:13:20 Z", Kind::Offset),
            // Outside what a record holds.
            ("1969-12-31T23:59:59Z", Kind::Span),
            ("1970-01-01T00:30:00+01:00", Kind::Span),
            ("2554-07-21T23:34:34Z", Kind::Span),
            ("9999-12-31T23:59:59Z", Kind::Span),
        ];
        for (text, want) in cases {
            let e = parse_rfc3339(text).unwrap_err();
            assert_eq!(e.kind, *want, "{text}");
            assert_eq!(e.input(), *text);
            assert!(e.to_string().starts_with(&format!("`{text}`: ")), "{e}");
        }
    }

    #[test]
    fn formats_round_trip() {
        let cases: &[(u64, &str)] = &[
            (0, "1970-01-01T00:00:00.000Z"),
            (T + S / 2, "2023-11-14T22:13:20.500Z"),
            (T + 999_999, "2023-11-14T22:13:20.000Z"),
            (1_709_164_800 * S, "2024-02-29T00:00:00.000Z"),
            (1_709_251_199 * S + 999_000_000, "2024-02-29T23:59:59.999Z"),
            (u64::MAX, "2554-07-21T23:34:33.709Z"),
        ];
        for (ns, text) in cases {
            assert_eq!(format_rfc3339(*ns), *text);
            // What is printed reads back to the millisecond.
            assert_eq!(parse_rfc3339(text), Ok(ns - ns % 1_000_000), "{text}");
        }
        // Every day from 1970 to 2100 survives the trip (the calendar code agrees both ways).
        for day in 0..47_482u64 {
            let ns = day * 86_400 * S + 45_296_789_000_000; // 12:34:56.789
            assert_eq!(parse_rfc3339(&format_rfc3339(ns)), Ok(ns), "day {day}");
        }
    }

    #[test]
    fn command_line_times() {
        let now = 10_000 * S;
        let cases: &[(&str, u64)] = &[
            ("123", 123),
            (" 123 ", 123),
            ("500ms", now - S / 2),
            ("90s", now - 90 * S),
            ("15m", now - 900 * S),
            ("1h", now - 3600 * S),
            ("7d", 0),
            ("18446744073709551615d", 0),
            ("2023-11-14T22:13:20Z", T),
            ("2023-11-14T23:13:20.5+01:00", T + S / 2),
        ];
        for (text, want) in cases {
            assert_eq!(parse_time(text, now), Ok(*want), "{text}");
        }
        let cases: &[(&str, Kind)] = &[
            ("yesterday", Kind::NoForm),
            ("", Kind::NoForm),
            ("-1h", Kind::NoForm),
            ("1w", Kind::NoForm),
            ("2023-13-01T00:00:00Z", Kind::Range("month")),
            ("2023-11-14T22:13:20", Kind::Form),
            ("1969-12-31T23:59:59Z", Kind::Span),
        ];
        for (text, want) in cases {
            assert_eq!(parse_time(text, now).unwrap_err().kind, *want, "{text}");
        }
    }
}
