//! Time in the source's zone. Jushuitan speaks China time (UTC+8, no DST) without a zone suffix;
//! inside the project every instant is a `jiff::Timestamp` and is formatted with its zone.

use jiff::{Timestamp, civil::DateTime, tz::TimeZone};

/// China Standard Time, fixed UTC+08:00 (China has no daylight saving time).
pub fn china() -> TimeZone {
    TimeZone::fixed(jiff::tz::offset(8))
}

/// `yyyy-MM-dd HH:mm:ss` in China time: the format Jushuitan expects in requests.
pub fn format_china(ts: Timestamp) -> String {
    ts.to_zoned_datetime(china()).strftime("%Y-%m-%d %H:%M:%S").to_string()
}

/// Parses a Jushuitan datetime (`2021-09-18 11:02:19`, optionally with `.807` fractional
/// seconds, or a bare `2021-09-18`) as China time.
pub fn parse_china(text: &str) -> Result<Timestamp, TimeError> {
    let text = text.trim();
    let civil: DateTime = if text.len() == 10 {
        let date: jiff::civil::Date = text.parse().map_err(|_| TimeError(text.to_string()))?;
        date.to_datetime(jiff::civil::Time::midnight())
    } else {
        DateTime::strptime("%Y-%m-%d %H:%M:%S%.f", text)
            .or_else(|_| text.replacen(' ', "T", 1).parse::<DateTime>())
            .map_err(|_| TimeError(text.to_string()))?
    };
    civil.to_zoned_datetime(china()).map(|z| z.timestamp()).map_err(|_| TimeError(text.to_string()))
}

/// RFC 3339 with the explicit `+08:00` offset, for logs and messages a person reads.
pub fn rfc3339_china(ts: Timestamp) -> String {
    ts.to_zoned_datetime(china()).strftime("%Y-%m-%dT%H:%M:%S%.3f%:z").to_string()
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("not a China-time datetime (expected yyyy-MM-dd HH:mm:ss[.fff]): {0:?}")]
pub struct TimeError(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn china_time_round_trips_through_the_request_format() {
        let ts = parse_china("2021-09-18 11:02:19").expect("parses");
        assert_eq!(ts.to_string(), "2021-09-18T03:02:19Z");
        assert_eq!(format_china(ts), "2021-09-18 11:02:19");
    }

    #[test]
    fn milliseconds_and_bare_dates_are_accepted() {
        let ts = parse_china("2021-09-18 11:02:19.807").expect("parses");
        assert_eq!(ts.subsec_millisecond(), 807);
        assert_eq!(parse_china("2023-10-01").expect("parses").to_string(), "2023-09-30T16:00:00Z");
    }

    #[test]
    fn garbage_is_an_error_naming_the_value() {
        let err = parse_china("yesterday").expect_err("rejects");
        assert!(err.to_string().contains("yesterday"));
    }

    #[test]
    fn rfc3339_carries_the_zone() {
        let ts = parse_china("2021-09-18 11:02:19").expect("parses");
        assert_eq!(rfc3339_china(ts), "2021-09-18T11:02:19.000+08:00");
    }
}
