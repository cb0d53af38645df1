//! `--since` / `--until`: the time window a replay keeps, by each record's `end_time` (the
//! timestamp its Lago event carries, so the window matches Lago's billing periods).

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};

/// A bad `--since` / `--until` value.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WindowError {
    #[error(
        "--{flag} {value:?} is not a time; use RFC 3339 (2026-11-01T00:00:00Z) or a UTC date (2026-11-01)"
    )]
    BadTime { flag: &'static str, value: String },
    #[error("--since {since} is not before --until {until}: the window is empty")]
    Empty { since: String, until: String },
}

/// Records that ended at or after `since` and before `until` (either bound optional).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TimeWindow {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

impl TimeWindow {
    pub fn parse(since: Option<&str>, until: Option<&str>) -> Result<Self, WindowError> {
        let since = since.map(|v| parse_bound("since", v)).transpose()?;
        let until = until.map(|v| parse_bound("until", v)).transpose()?;
        if let (Some(s), Some(u)) = (since, until)
            && s >= u
        {
            return Err(WindowError::Empty {
                since: crate::spend::fmt_millis(&s),
                until: crate::spend::fmt_millis(&u),
            });
        }
        Ok(Self { since, until })
    }

    pub fn contains(&self, t: &DateTime<Utc>) -> bool {
        self.since.is_none_or(|s| *t >= s) && self.until.is_none_or(|u| *t < u)
    }
}

/// RFC 3339 with any offset, or a bare date (midnight UTC). A date-time without an offset is
/// taken as UTC too, since that is what operators type when they mean "the log's time".
fn parse_bound(flag: &'static str, value: &str) -> Result<DateTime<Utc>, WindowError> {
    let v = value.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(v, "%Y-%m-%d") {
        return Ok(d.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(v, format) {
            return Ok(t.and_utc());
        }
    }
    Err(WindowError::BadTime {
        flag,
        value: value.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn parses_dates_and_rfc3339_as_utc() {
        let w = TimeWindow::parse(Some("2026-11-01"), Some("2026-11-02T01:00:00+01:00")).unwrap();
        assert_eq!(w.since, Some(t("2026-11-01T00:00:00Z")));
        assert_eq!(w.until, Some(t("2026-11-02T00:00:00Z")));
        let w = TimeWindow::parse(Some("2026-11-01T12:30:00"), None).unwrap();
        assert_eq!(w.since, Some(t("2026-11-01T12:30:00Z")));
    }

    #[test]
    fn since_is_inclusive_and_until_exclusive() {
        let w = TimeWindow::parse(Some("2026-11-01"), Some("2026-11-02")).unwrap();
        assert!(w.contains(&t("2026-11-01T00:00:00Z")));
        assert!(w.contains(&t("2026-11-01T23:59:59.999Z")));
        assert!(!w.contains(&t("2026-11-02T00:00:00Z")));
        assert!(!w.contains(&t("2026-10-31T23:59:59.999Z")));
        assert!(TimeWindow::default().contains(&t("1970-01-01T00:00:00Z")));
    }

    #[test]
    fn bad_values_name_the_flag_and_the_accepted_forms() {
        let err = TimeWindow::parse(Some("yesterday"), None).unwrap_err();
        assert_eq!(
            err,
            WindowError::BadTime {
                flag: "since",
                value: "yesterday".into()
            }
        );
        assert!(err.to_string().contains("RFC 3339"));
        let err = TimeWindow::parse(None, Some("2026-13-01")).unwrap_err();
        assert!(err.to_string().contains("--until"));
        let err = TimeWindow::parse(Some("2026-11-02"), Some("2026-11-01")).unwrap_err();
        assert!(matches!(err, WindowError::Empty { .. }));
    }
}
