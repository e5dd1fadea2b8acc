//! The identity event log (`empi_events`): writing an event, reading a person's events and
//! the notifier's pending ones.

use super::*;

pub(super) fn record_event(
    conn: &mut DbConn,
    kind: &str,
    person: Option<&str>,
    other_person: Option<&str>,
    record: Option<&str>,
    actor: &str,
    detail: serde_json::Value,
) -> Result<String, EmpiError> {
    let id = new_id();
    diesel::insert_into(events_t::table)
        .values((
            events_t::id.eq(&id),
            events_t::kind.eq(kind),
            events_t::person_id.eq(person),
            events_t::other_person_id.eq(other_person),
            events_t::record_id.eq(record),
            events_t::actor.eq(actor),
            events_t::detail.eq(detail.to_string()),
            events_t::created_at.eq(now_utc()),
        ))
        .execute(conn)?;
    Ok(id)
}

/// An event of the log, oldest first.
#[derive(Clone, Debug, Serialize)]
pub struct EmpiEvent {
    pub id: String,
    pub kind: String,
    pub person_id: Option<String>,
    pub other_person_id: Option<String>,
    pub record_id: Option<String>,
    pub actor: String,
    pub detail: serde_json::Value,
    pub created_at: NaiveDateTime,
}

/// Events that involve a person (as either side).
pub fn events_of_person(conn: &mut DbConn, person: &str) -> Result<Vec<EmpiEvent>, EmpiError> {
    let rows: Vec<EventRow> = events_t::table
        .filter(
            events_t::person_id
                .eq(person)
                .or(events_t::other_person_id.eq(person)),
        )
        .order(events_t::id.asc())
        .select(EventRow::as_select())
        .load(conn)?;
    rows.into_iter().map(event_of_row).collect()
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = events_t)]
struct EventRow {
    id: String,
    kind: String,
    person_id: Option<String>,
    other_person_id: Option<String>,
    record_id: Option<String>,
    actor: String,
    detail: String,
    created_at: NaiveDateTime,
}

fn event_of_row(r: EventRow) -> Result<EmpiEvent, EmpiError> {
    Ok(EmpiEvent {
        detail: serde_json::from_str(&r.detail).map_err(corrupt)?,
        id: r.id,
        kind: r.kind,
        person_id: r.person_id,
        other_person_id: r.other_person_id,
        record_id: r.record_id,
        actor: r.actor,
        created_at: r.created_at,
    })
}

/// Events not yet delivered to institutions (`notified_at` NULL), oldest first (ids are
/// UUIDv7, so id order is creation order). For the notification sender (subscriptions).
pub fn pending_events(conn: &mut DbConn, limit: i64) -> Result<Vec<EmpiEvent>, EmpiError> {
    let rows: Vec<EventRow> = events_t::table
        .filter(events_t::notified_at.is_null())
        .order(events_t::id.asc())
        .limit(limit)
        .select(EventRow::as_select())
        .load(conn)?;
    rows.into_iter().map(event_of_row).collect()
}

/// Mark events delivered; returns how many were still pending (a second call marks none).
pub fn mark_notified(conn: &mut DbConn, ids: &[String]) -> Result<usize, EmpiError> {
    Ok(diesel::update(
        events_t::table
            .filter(events_t::id.eq_any(ids))
            .filter(events_t::notified_at.is_null()),
    )
    .set(events_t::notified_at.eq(Some(now_utc())))
    .execute(conn)?)
}
