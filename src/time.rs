//! FHIR `instant` values (datatypes.html#instant) and HTTP dates, as microseconds since
//! the Unix epoch. Kept dependency-free: the server only needs UTC formatting and parsing.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since 1970-01-01T00:00:00Z.
pub type Micros = i64;

pub fn now_micros() -> Micros {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Days since the epoch to a civil date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `2026-11-21T08:30:14.123456Z`: a valid FHIR instant, and lexically ordered.
pub fn format_instant(t: Micros) -> String {
    let secs = t.div_euclid(1_000_000);
    let micros = t.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

/// RFC 7231 date for `Last-Modified` (second precision).
pub fn format_http_date(t: Micros) -> String {
    let secs = t.max(0) as u64 / 1_000_000;
    httpdate::fmt_http_date(UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

pub fn parse_http_date(s: &str) -> Option<Micros> {
    let t = httpdate::parse_http_date(s).ok()?;
    let d = t.duration_since(UNIX_EPOCH).ok()?;
    Some(d.as_secs() as i64 * 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_instants() {
        assert_eq!(format_instant(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            format_instant(1_763_713_814_123_456),
            "2025-11-21T08:30:14.123456Z"
        );
        assert_eq!(format_instant(-1), "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn http_dates_round_trip_to_the_second() {
        let t = 1_763_713_814_000_000;
        assert_eq!(parse_http_date(&format_http_date(t)), Some(t));
        assert_eq!(parse_http_date("yesterday"), None);
    }
}
