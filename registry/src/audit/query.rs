//! Reading the trail: AuditEvent search for auditors and patient-facing platforms, and the
//! aggregates of the compliance report. Results come newest first (descending chain position),
//! paged by a position cursor so a page boundary never moves while records are appended.

use std::collections::BTreeMap;

use chrono::NaiveDateTime;
use diesel::prelude::*;

use super::append::EventRow;
use crate::store::schema::audit_events;
use crate::store::{DbConn, StoreError};

/// A comparison of `AuditEvent.recorded` (FHIR date prefixes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeBound {
    /// recorded ≥ t
    From(NaiveDateTime),
    /// recorded > t
    After(NaiveDateTime),
    /// recorded ≤ t
    Until(NaiveDateTime),
    /// recorded < t
    Before(NaiveDateTime),
}

/// Search criteria; every given criterion must hold.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Enterprise patient id (`patient_id` column).
    pub patient: Option<String>,
    /// Requesting institution id or user (`agent_institution` or `agent_user`).
    pub agent: Option<String>,
    /// A resource reference the event is about (`entity.what.reference`).
    pub entity: Option<String>,
    pub time: Vec<TimeBound>,
    pub outcome: Option<String>,
    pub purpose: Option<String>,
    pub event_id: Option<String>,
    /// Only positions below this one (the paging cursor).
    pub before_seq: Option<i64>,
    pub limit: i64,
}

/// A stored record as search returns it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: i64,
    pub event_id: String,
    pub recorded_at: NaiveDateTime,
    pub type_code: String,
    pub subtype_code: String,
    pub outcome: String,
    pub agent_institution: Option<String>,
    pub agent_user: Option<String>,
    pub purpose_of_use: Option<String>,
    pub patient_id: Option<String>,
    pub consent_decision: Option<String>,
    pub request_id: Option<String>,
    /// The hashed AuditEvent JSON text.
    pub resource: String,
}

impl From<EventRow> for StoredEvent {
    fn from(r: EventRow) -> StoredEvent {
        StoredEvent {
            seq: r.seq,
            event_id: r.event_id,
            recorded_at: r.recorded_at,
            type_code: r.type_code,
            subtype_code: r.subtype_code,
            outcome: r.outcome,
            agent_institution: r.agent_institution,
            agent_user: r.agent_user,
            purpose_of_use: r.purpose_of_use,
            patient_id: r.patient_id,
            consent_decision: r.consent_decision,
            request_id: r.request_id,
            resource: r.resource,
        }
    }
}

/// Escape `%`, `_` and `\` for a LIKE pattern with escape character `\`.
fn like_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Events matching `f`, newest first, at most `f.limit`.
pub fn search(conn: &mut DbConn, f: &EventFilter) -> Result<Vec<StoredEvent>, StoreError> {
    use audit_events as e;
    let mut q = e::table.into_boxed();
    if let Some(p) = &f.patient {
        q = q.filter(e::patient_id.eq(p.clone()));
    }
    if let Some(a) = &f.agent {
        q = q.filter(
            e::agent_institution
                .eq(a.clone())
                .or(e::agent_user.eq(a.clone())),
        );
    }
    if let Some(entity) = &f.entity {
        // The entity references live only in the hashed resource (compact JSON).
        let json = serde_json::to_string(entity).unwrap_or_default();
        let pattern = format!("%\"reference\":{}%", like_escape(&json));
        q = q.filter(e::resource.like(pattern).escape('\\'));
    }
    for bound in &f.time {
        q = match *bound {
            TimeBound::From(t) => q.filter(e::recorded_at.ge(t)),
            TimeBound::After(t) => q.filter(e::recorded_at.gt(t)),
            TimeBound::Until(t) => q.filter(e::recorded_at.le(t)),
            TimeBound::Before(t) => q.filter(e::recorded_at.lt(t)),
        };
    }
    if let Some(o) = &f.outcome {
        q = q.filter(e::outcome.eq(o.clone()));
    }
    if let Some(p) = &f.purpose {
        q = q.filter(e::purpose_of_use.eq(p.clone()));
    }
    if let Some(id) = &f.event_id {
        q = q.filter(e::event_id.eq(id.clone()));
    }
    if let Some(before) = f.before_seq {
        q = q.filter(e::seq.lt(before));
    }
    let rows: Vec<EventRow> = q
        .order(e::seq.desc())
        .limit(f.limit.max(1))
        .load(conn)
        .map_err(StoreError::from_diesel)?;
    Ok(rows.into_iter().map(StoredEvent::from).collect())
}

/// Events with positions `after+1 ..`, oldest first, at most `limit` (the anomaly scanner).
pub fn after_seq(
    conn: &mut DbConn,
    after: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, StoreError> {
    let rows: Vec<EventRow> = audit_events::table
        .filter(audit_events::seq.gt(after))
        .order(audit_events::seq.asc())
        .limit(limit.max(1))
        .load(conn)
        .map_err(StoreError::from_diesel)?;
    Ok(rows.into_iter().map(StoredEvent::from).collect())
}

/// Is there an audit record carrying this request id? (kill -9 tests, support.)
pub fn has_request_id(conn: &mut DbConn, request_id: &str) -> Result<bool, StoreError> {
    use diesel::dsl::{exists, select};
    select(exists(
        audit_events::table.filter(audit_events::request_id.eq(request_id)),
    ))
    .get_result(conn)
    .map_err(StoreError::from_diesel)
}

/// One group of the compliance report.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct AccessKey {
    pub institution: String,
    pub purpose: String,
    /// The consent decision when one was taken, else the outcome (`success` / `refused`).
    pub decision: String,
}

/// Aggregates of the trail over a time range (compliance report).
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub total: u64,
    pub by_access: BTreeMap<AccessKey, u64>,
    /// Refused or failed requests (outcome ≠ 0) per institution (`unauthenticated` when none).
    pub denials_by_institution: BTreeMap<String, u64>,
    /// Per day (UTC date) → (accesses, denials).
    pub by_day: BTreeMap<String, (u64, u64)>,
    /// First and last position in the range.
    pub first_seq: Option<i64>,
    pub last_seq: Option<i64>,
    /// Break-the-glass (purpose ETREAT) events in the range.
    pub break_glass: Vec<StoredEvent>,
}

/// The indexed columns the aggregates read: position, time, outcome, institution, user,
/// purpose, consent decision.
type AggregateRow = (
    i64,
    NaiveDateTime,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// Call `each` for every event recorded in `[from, to)`, oldest first, reading the indexed
/// columns only (not the resources), 10,000 rows at a time.
fn for_each_in_range(
    conn: &mut DbConn,
    from: NaiveDateTime,
    to: NaiveDateTime,
    mut each: impl FnMut(AggregateRow),
) -> Result<(), StoreError> {
    use audit_events as e;
    let mut after = 0i64;
    loop {
        let rows: Vec<AggregateRow> = e::table
            .filter(e::recorded_at.ge(from))
            .filter(e::recorded_at.lt(to))
            .filter(e::seq.gt(after))
            .order(e::seq.asc())
            .limit(10_000)
            .select((
                e::seq,
                e::recorded_at,
                e::outcome,
                e::agent_institution,
                e::agent_user,
                e::purpose_of_use,
                e::consent_decision,
            ))
            .load(conn)
            .map_err(StoreError::from_diesel)?;
        let Some(last) = rows.last() else {
            return Ok(());
        };
        after = last.0;
        rows.into_iter().for_each(&mut each);
    }
}

/// Summarise events recorded in `[from, to)`. Reads the indexed columns only (not the
/// resources), page by page.
pub fn summarise(
    conn: &mut DbConn,
    from: NaiveDateTime,
    to: NaiveDateTime,
) -> Result<Summary, StoreError> {
    use audit_events as e;
    let mut s = Summary::default();
    for_each_in_range(
        conn,
        from,
        to,
        |(seq, at, outcome, inst, _user, purpose, decision)| {
            s.total += 1;
            s.first_seq.get_or_insert(seq);
            s.last_seq = Some(seq);
            let refused = outcome != super::outcome::SUCCESS;
            let institution = inst.unwrap_or_else(|| "unauthenticated".into());
            let key = AccessKey {
                institution: institution.clone(),
                purpose: purpose.clone().unwrap_or_else(|| "none".into()),
                decision: decision
                    .unwrap_or_else(|| if refused { "refused" } else { "success" }.to_string()),
            };
            *s.by_access.entry(key).or_default() += 1;
            let day = s
                .by_day
                .entry(at.format("%Y-%m-%d").to_string())
                .or_default();
            if refused {
                *s.denials_by_institution.entry(institution).or_default() += 1;
                day.1 += 1;
            } else {
                day.0 += 1;
            }
        },
    )?;
    let rows: Vec<EventRow> = e::table
        .filter(e::recorded_at.ge(from))
        .filter(e::recorded_at.lt(to))
        .filter(e::purpose_of_use.eq("ETREAT"))
        .order(e::seq.asc())
        .limit(100_000)
        .load(conn)
        .map_err(StoreError::from_diesel)?;
    s.break_glass = rows.into_iter().map(StoredEvent::from).collect();
    Ok(s)
}

/// Who a daily count is about: the requesting institution; `staff` for records of people and
/// operators (auditors' reads, administrators' changes); `unauthenticated` when nobody was.
pub fn requester_label(institution: Option<String>, user: Option<&str>) -> String {
    match (institution, user) {
        (Some(i), _) => i,
        (None, Some(_)) => "staff".into(),
        (None, None) => "unauthenticated".into(),
    }
}

/// The records of one requester on one day (UTC).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DailyCount {
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    /// Institution id, `staff` or `unauthenticated` ([`requester_label`]).
    pub requester: String,
    /// Records with outcome 0 (success).
    pub accesses: u64,
    /// Refused or failed requests (outcome 4, 8 or 12).
    pub denials: u64,
}

/// Accesses and denials per requester per day over `[from, to)`, sorted by requester then day;
/// days without records are absent.
pub fn daily_by_requester(
    conn: &mut DbConn,
    from: NaiveDateTime,
    to: NaiveDateTime,
) -> Result<Vec<DailyCount>, StoreError> {
    let mut counts: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for_each_in_range(conn, from, to, |(_, at, outcome, inst, user, _, _)| {
        let key = (
            requester_label(inst, user.as_deref()),
            at.format("%Y-%m-%d").to_string(),
        );
        let entry = counts.entry(key).or_default();
        if outcome == super::outcome::SUCCESS {
            entry.0 += 1;
        } else {
            entry.1 += 1;
        }
    })?;
    Ok(counts
        .into_iter()
        .map(|((requester, day), (accesses, denials))| DailyCount {
            day,
            requester,
            accesses,
            denials,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::like_escape;

    #[test]
    fn like_patterns_escape_wildcards() {
        assert_eq!(like_escape("a%b_c\\d"), "a\\%b\\_c\\\\d");
    }
}
