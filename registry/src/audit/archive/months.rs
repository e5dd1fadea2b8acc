//! Calendar months of the archive: the month of a time, its bounds and labels, the retention
//! cutoff.

use super::*;

/// The first day of `t`'s month.
pub fn month_of(t: NaiveDateTime) -> NaiveDate {
    t.date().with_day(1).unwrap_or(t.date())
}

pub(super) fn next_month(m: NaiveDate) -> NaiveDate {
    m.checked_add_months(Months::new(1))
        .unwrap_or(NaiveDate::MAX)
}

pub(super) fn start_of(m: NaiveDate) -> NaiveDateTime {
    m.and_time(NaiveTime::MIN)
}

/// `YYYY-MM`.
pub fn month_label(m: NaiveDate) -> String {
    m.format("%Y-%m").to_string()
}

/// Parse `YYYY-MM` to the first day of that month.
pub fn parse_month(text: &str) -> Option<NaiveDate> {
    if text.len() != 7 {
        return None;
    }
    NaiveDate::parse_from_str(&format!("{text}-01"), "%Y-%m-%d").ok()
}

/// The first month that must be kept at `now`: every month that ends on or before the start
/// of this one is older than `retention_months` months.
pub fn retention_cutoff(now: NaiveDateTime, retention_months: u32) -> NaiveDate {
    month_of(
        now.checked_sub_months(Months::new(retention_months))
            .unwrap_or(NaiveDateTime::MIN),
    )
}
