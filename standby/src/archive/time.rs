//! Times in archives: the `--until` forms `restore` accepts, the UTC
//! spellings reports and `db_recover -t` use, and the creation time a
//! backup's directory name carries. Calendar arithmetic and time zones are
//! jiff's; this module only knows which spellings Tandem accepts.
//!
//! `db_recover -t` reads its argument in its process's local time zone,
//! so Tandem hands it UTC ([`bdb_time_utc`]) and runs it with `TZ=UTC0`.
//! Zone-less inputs are local time, like db_recover's own; the local zone
//! is jiff's system zone (the `TZ` variable, POSIX strings such as `JST-9`
//! included, else `/etc/localtime`).

use jiff::civil::DateTime;
use jiff::tz::{Offset, TimeZone};
use jiff::Timestamp;

/// A `--until` the restore cannot read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the time {input:?}: {why}")]
pub struct TimeError {
    pub input: String,
    pub why: String,
}

const FORMS: &str = "expected @UNIXSECONDS, YYYY-MM-DDTHH:MM:SS[.frac][Z|±HH:MM], \"YYYY-MM-DD HH:MM:SS\" or BDB's [[CC]YY]MMDDhhmm[.SS]";

/// Where a zone-less or zoned civil time is anchored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Zone {
    Utc,
    /// Seconds east of UTC.
    Offset(i32),
    Local,
}

/// Civil fields as written, before the calendar checks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fields {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

/// Parses a restore time into unix seconds. Accepted:
/// - `@1795636648`: unix seconds;
/// - RFC 3339, `2026-11-25T19:57:28Z` or with an offset `+02:00`;
/// - `2026-11-25 19:57:28` or `2026-11-25T19:57:28` without a zone: local
///   time (UTC on a host set to UTC);
/// - BDB's `[[CC]YY]MMDDhhmm[.SS]`, local time, as `db_recover -t` reads it
///   (without CC: YY 69..99 is 19YY, otherwise 20YY; without YY: this year).
///
/// Fractions of a second are dropped: BDB stamps commits in whole seconds.
pub fn parse_time(input: &str) -> Result<i64, TimeError> {
    let s = input.trim();
    let bad = |why: String| TimeError {
        input: input.to_owned(),
        why,
    };
    let unix = if let Some(digits) = s.strip_prefix('@') {
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(format!("{digits:?} is not a number of seconds")));
        }
        digits.parse::<i64>().map_err(|e| bad(e.to_string()))?
    } else {
        let (fields, zone) = if s.contains('-') || s.contains(':') {
            parse_iso(s)
        } else {
            parse_bdb(s, current_local_year())
        }
        .map_err(bad)?;
        to_unix(&fields, zone).map_err(bad)?
    };
    if !(0..=i64::from(i32::MAX)).contains(&unix) {
        return Err(bad(
            "outside the range of BDB's commit timestamps (1970 .. 2038)".into(),
        ));
    }
    Ok(unix)
}

fn digits_at(s: &str, r: std::ops::Range<usize>) -> Result<u32, String> {
    let part = s.get(r).ok_or_else(|| FORMS.to_owned())?;
    if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FORMS.to_owned());
    }
    part.parse().map_err(|_| FORMS.to_owned())
}

fn parse_iso(s: &str) -> Result<(Fields, Zone), String> {
    let b = s.as_bytes();
    if b.len() < 16
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
    {
        return Err(FORMS.to_owned());
    }
    let mut f = Fields {
        year: i64::from(digits_at(s, 0..4)?),
        month: digits_at(s, 5..7)?,
        day: digits_at(s, 8..10)?,
        hour: digits_at(s, 11..13)?,
        minute: digits_at(s, 14..16)?,
        second: 0,
    };
    let mut i = 16;
    if b.get(i) == Some(&b':') {
        f.second = digits_at(s, i + 1..i + 3)?;
        i += 3;
        if b.get(i) == Some(&b'.') {
            i += 1;
            let start = i;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            if i == start {
                return Err(FORMS.to_owned());
            }
        }
    }
    let zone = match &s[i..] {
        "" => Zone::Local,
        "Z" | "z" => Zone::Utc,
        z if z.starts_with('+') || z.starts_with('-') => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let rest = &z[1..];
            let (h, m) = match rest.len() {
                5 if rest.as_bytes()[2] == b':' => (digits_at(rest, 0..2)?, digits_at(rest, 3..5)?),
                4 => (digits_at(rest, 0..2)?, digits_at(rest, 2..4)?),
                2 => (digits_at(rest, 0..2)?, 0),
                _ => return Err(format!("bad zone offset {z:?}")),
            };
            // RFC 3339 offsets stay within a day (jiff would take up to 26 h).
            if h > 23 || m > 59 {
                return Err(format!("bad zone offset {z:?}"));
            }
            Zone::Offset(sign * (h * 3600 + m * 60) as i32)
        }
        z => return Err(format!("unexpected {z:?} after the time; {FORMS}")),
    };
    Ok((f, zone))
}

fn parse_bdb(s: &str, this_year: i64) -> Result<(Fields, Zone), String> {
    let (main, secs) = match s.split_once('.') {
        Some((m, sec)) => (m, Some(sec)),
        None => (s, None),
    };
    if !main.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FORMS.to_owned());
    }
    let (year, rest) = match main.len() {
        12 => (i64::from(digits_at(main, 0..4)?), &main[4..]),
        10 => {
            let yy = i64::from(digits_at(main, 0..2)?);
            (if yy >= 69 { 1900 + yy } else { 2000 + yy }, &main[2..])
        }
        8 => (this_year, main),
        _ => {
            return Err(format!(
                "BDB's form has 8, 10 or 12 digits before the optional .SS; {FORMS}"
            ))
        }
    };
    let second = match secs {
        None => 0,
        Some(sec) if sec.len() == 2 => digits_at(sec, 0..2)?,
        Some(_) => return Err("seconds after '.' must be two digits".into()),
    };
    Ok((
        Fields {
            year,
            month: digits_at(rest, 0..2)?,
            day: digits_at(rest, 2..4)?,
            hour: digits_at(rest, 4..6)?,
            minute: digits_at(rest, 6..8)?,
            second,
        },
        Zone::Local,
    ))
}

/// The civil time the fields name; jiff refuses impossible dates (day 30
/// of February, hour 24, second 60).
fn civil(f: &Fields) -> Result<DateTime, String> {
    let small = |v: u32| i8::try_from(v).unwrap_or(i8::MAX);
    let year = i16::try_from(f.year).map_err(|_| format!("year {} is out of range", f.year))?;
    DateTime::new(
        year,
        small(f.month),
        small(f.day),
        small(f.hour),
        small(f.minute),
        small(f.second),
        0,
    )
    .map_err(|e| {
        format!(
            "{}-{:02}-{:02} {:02}:{:02}:{:02} is not a date and time: {e}",
            f.year, f.month, f.day, f.hour, f.minute, f.second
        )
    })
}

/// Unix seconds of the fields in `zone`. A local time that a clock change
/// skips or repeats resolves the way mktime(3) does (jiff's "compatible":
/// the later instant in a gap, the earlier in a fold).
fn to_unix(f: &Fields, zone: Zone) -> Result<i64, String> {
    let dt = civil(f)?;
    let ts = match zone {
        Zone::Utc => TimeZone::UTC.to_timestamp(dt),
        Zone::Offset(east) => Offset::from_seconds(east).and_then(|o| o.to_timestamp(dt)),
        Zone::Local => TimeZone::system().to_timestamp(dt),
    };
    ts.map(|t| t.as_second())
        .map_err(|e| format!("not a valid time: {e}"))
}

fn current_local_year() -> i64 {
    i64::from(
        Timestamp::now()
            .to_zoned_datetime(TimeZone::system())
            .year(),
    )
}

/// A unix time in UTC with jiff's strftime, or `?` if it is out of jiff's
/// range (it is not for BDB's 32-bit timestamps).
fn utc(unix: i64, format: &str) -> String {
    match Timestamp::from_second(unix) {
        Ok(t) => t.strftime(format).to_string(),
        Err(_) => format!("@{unix}?"),
    }
}

/// `2026-11-25T19:57:28Z`.
pub fn rfc3339(unix: i64) -> String {
    utc(unix, "%Y-%m-%dT%H:%M:%SZ")
}

/// BDB's `db_recover -t` form `CCYYMMDDhhmm.SS`, in UTC: run db_recover
/// with `TZ=UTC0` so it reads it as UTC (it reads local time).
pub fn bdb_time_utc(unix: i64) -> String {
    utc(unix, "%Y%m%d%H%M.%S")
}

/// A backup's directory name: its creation time in UTC to the millisecond,
/// then up to 12 alphanumerics of its base id.
pub fn backup_name(unix_ms: u64, base_id: &str) -> String {
    let base: String = base_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(12)
        .collect();
    format!(
        "{}.{:03}Z-{base}",
        utc((unix_ms / 1000) as i64, "%Y%m%dT%H%M%S"),
        unix_ms % 1000
    )
}

/// The creation time (unix ms) a backup's directory name carries, or
/// `None` if the name is not a backup's.
pub fn parse_backup_name(name: &str) -> Option<u64> {
    let b = name.as_bytes();
    if b.len() < 21 || b[8] != b'T' || b[15] != b'.' || b[19] != b'Z' || b[20] != b'-' {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let s = name.get(r)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let f = Fields {
        year: i64::from(digits(0..4)?),
        month: digits(4..6)?,
        day: digits(6..8)?,
        hour: digits(9..11)?,
        minute: digits(11..13)?,
        second: digits(13..15)?,
    };
    let ms = digits(16..19)?;
    if !name[21..]
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'-')
    {
        return None;
    }
    let secs = to_unix(&f, Zone::Utc).ok()?;
    u64::try_from(secs).ok().map(|s| s * 1000 + u64::from(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_accepted_form() {
        let t = 1_795_636_648; // 2026-11-25T19:57:28Z
        assert_eq!(parse_time("@1795636648").unwrap(), t);
        assert_eq!(parse_time("2026-11-25T19:57:28Z").unwrap(), t);
        assert_eq!(parse_time("2026-11-25t19:57:28z").unwrap(), t);
        assert_eq!(
            parse_time("2026-11-25T19:57:28.999Z").unwrap(),
            t,
            "fractions are dropped"
        );
        assert_eq!(parse_time("2026-11-25T21:57:28+02:00").unwrap(), t);
        assert_eq!(parse_time("2026-11-25T14:27:28-0530").unwrap(), t);
        assert_eq!(parse_time("2026-11-25T19:57Z").unwrap(), t - 28);
        // Zone-less forms are local time, like db_recover's own.
        let local = to_unix(
            &Fields {
                year: 2026,
                month: 11,
                day: 25,
                hour: 19,
                minute: 57,
                second: 28,
            },
            Zone::Local,
        )
        .unwrap();
        assert_eq!(parse_time("2026-11-25 19:57:28").unwrap(), local);
        assert_eq!(parse_time("202611251957.28").unwrap(), local);
        assert_eq!(parse_time("2611251957.28").unwrap(), local);
        assert_eq!(parse_bdb("6911251957", 2026).unwrap().0.year, 1969);
        assert_eq!(parse_bdb("6811251957", 2026).unwrap().0.year, 2068);
        assert_eq!(
            parse_bdb("11251957.05", 2031).unwrap().0,
            Fields {
                year: 2031,
                month: 11,
                day: 25,
                hour: 19,
                minute: 57,
                second: 5
            }
        );
    }

    #[test]
    fn refuses_malformed_and_impossible_times() {
        for bad in [
            "",
            "yesterday",
            "@",
            "@12x",
            "@-5",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-11-25T24:00:00Z",
            "2026-11-25T19:60:00Z",
            "2026-11-25T19:57:28+25:00",
            "2026-11-25T19:57:28 UTC",
            "2026-11-25",
            "12345",
            "202611251957.5",
            "1795636648",
            "@99999999999",
        ] {
            assert!(parse_time(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse_time("2028-02-29T00:00:00Z").is_ok(), "a leap day");
    }

    #[test]
    fn bdb_time_round_trips() {
        for t in [0i64, 951_782_400, 1_795_636_648, i64::from(i32::MAX)] {
            let s = bdb_time_utc(t);
            let (f, _) = parse_bdb(&s, 0).unwrap();
            assert_eq!(to_unix(&f, Zone::Utc).unwrap(), t, "{s}");
        }
        assert_eq!(bdb_time_utc(1_795_636_648), "202611251957.28");
        assert_eq!(rfc3339(1_795_636_648), "2026-11-25T19:57:28Z");
    }

    #[test]
    fn names_and_dates_round_trip() {
        let ms = 1_795_636_648_123;
        let name = backup_name(ms, "3fa9-c2b1d0e4f5a6b7");
        assert_eq!(name, "20261125T195728.123Z-3fa9c2b1d0e4");
        assert_eq!(parse_backup_name(&name), Some(ms));
        assert_eq!(parse_backup_name(&format!("{name}-2")), Some(ms));
        assert_eq!(backup_name(0, ""), "19700101T000000.000Z-");
        for bad in [
            "",
            "latest",
            "20261125T195728.123Z",
            "20261325T195728.123Z-x",
            "20260230T195728.123Z-x",
            "20261125T245728.123Z-x",
            "20261125T195728.123Z-x/y",
            "2026112xT195728.123Z-x",
            "x",
            ".tandem-tmp-x",
        ] {
            assert_eq!(parse_backup_name(bad), None, "{bad}");
        }
    }
}
