//! `Retry-After`: delay-seconds or an HTTP-date (RFC 9110 §10.2.3).

use std::time::{Duration, SystemTime};

/// The wait a `Retry-After` header asks for, relative to `now`. A date in the past means "now"
/// (zero); an unparsable value is ignored (the caller falls back to its backoff).
pub fn parse(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

pub fn from_headers(headers: &http::HeaderMap, now: SystemTime) -> Option<Duration> {
    headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse(v, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds() {
        assert_eq!(
            parse("315", SystemTime::now()),
            Some(Duration::from_secs(315))
        );
        assert_eq!(parse(" 0 ", SystemTime::now()), Some(Duration::ZERO));
    }

    #[test]
    fn http_date_is_relative_to_now() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").expect("date");
        assert_eq!(
            parse("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(Duration::from_secs(30))
        );
        // Obsolete RFC 850 form is still a valid HTTP-date.
        assert_eq!(
            parse("Sunday, 06-Nov-94 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn garbage_is_ignored() {
        assert_eq!(parse("soon", SystemTime::now()), None);
        assert_eq!(parse("-5", SystemTime::now()), None);
    }
}
