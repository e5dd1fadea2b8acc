//! Transactional outbox: events (`doc_events`), subscriptions (`doc_subscriptions`) and one
//! delivery row per (subscription, event) (`doc_deliveries`).
//!
//! Delivery protocol (the gateway's worker drives it):
//! - [`claim`] leases due deliveries: only the oldest undelivered event of each active
//!   subscription (per-subscriber ordering), not leased by anyone else, with `attempts`
//!   incremented. PostgreSQL: `FOR UPDATE SKIP LOCKED`, so replicas never claim the same row;
//!   SQLite: one UPDATE statement under the database's single writer lock.
//! - [`complete`] records the result of one attempt, fenced by (lease owner, attempt number):
//!   a worker whose lease expired and was taken over cannot overwrite the newer attempt.
//! - A failed attempt is retried after an exponential backoff with jitter; after
//!   `max_attempts` it is dead-lettered (`dead`), which unblocks the subscriber's next event.
//!   Nothing is lost when a worker dies: its lease expires and another worker claims the row.

use chrono::{Duration as ChronoDuration, NaiveDateTime};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Text, Timestamp};
use serde::Serialize;
use serde_json::{Value, json};

use super::DocumentError;
use super::store::StoredDocument;
use crate::store::schema::{
    doc_deliveries as del_t, doc_event_counter as counter_t, doc_events as events_t,
    doc_subscriptions as subs_t, empi_persons,
};
use crate::store::{Audited, DbConn, now_utc};

/// The topics a subscription can name.
pub const TOPIC_DOCUMENT: &str = "document";
pub const TOPIC_PATIENT_MERGE: &str = "patient-merge";

/// An event to store with the change that caused it.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: String,
    pub document_id: Option<String>,
    pub person_id: Option<String>,
    pub type_code: Option<String>,
    pub custodian_id: Option<String>,
    pub detail: Value,
}

impl NewEvent {
    pub fn document(kind: &str, doc: &StoredDocument) -> NewEvent {
        NewEvent {
            kind: kind.into(),
            document_id: Some(doc.id.clone()),
            person_id: Some(doc.person_id.clone()),
            type_code: Some(doc.type_code.clone()),
            custodian_id: Some(doc.custodian_id.clone()),
            detail: json!({ "status": doc.status.as_str(), "replaces": doc.replaces }),
        }
    }

    /// Person `source` was merged into `target`.
    pub fn patient_merged(target: &str, source: &str) -> NewEvent {
        NewEvent {
            kind: "patient-merged".into(),
            document_id: None,
            person_id: Some(target.into()),
            type_code: None,
            custodian_id: None,
            detail: json!({ "target": target, "source": source }),
        }
    }

    /// The merge of `source` into `target` was undone.
    pub fn patient_unmerged(target: &str, source: &str) -> NewEvent {
        NewEvent {
            kind: "patient-unmerged".into(),
            ..NewEvent::patient_merged(target, source)
        }
    }

    fn is_merge(&self) -> bool {
        self.kind == "patient-merged" || self.kind == "patient-unmerged"
    }

    fn topic(&self) -> &'static str {
        if self.is_merge() {
            TOPIC_PATIENT_MERGE
        } else {
            TOPIC_DOCUMENT
        }
    }
}

/// SQLite: take the database write lock at the start of a write transaction (like
/// `BEGIN IMMEDIATE`), so two writers never deadlock upgrading read locks. PostgreSQL:
/// nothing (the counter row is written last, see [`emit`]).
pub fn take_write_lock(conn: &mut DbConn) -> Result<(), DocumentError> {
    if matches!(conn, DbConn::Sqlite(_)) {
        diesel::update(counter_t::table.find(1))
            .set(counter_t::last_seq.eq(counter_t::last_seq))
            .execute(conn)?;
    }
    Ok(())
}

/// Store events and a pending delivery for every matching active subscription. Call it last
/// in the transaction: the counter row it updates stays locked until commit, so events of
/// concurrent transactions commit in sequence order.
pub fn emit(conn: &mut DbConn, events: &[NewEvent]) -> Result<Vec<i64>, DocumentError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let now = now_utc();
    // Match subscriptions first (reads), then take the sequence numbers (the lock).
    let mut targets = Vec::with_capacity(events.len());
    for e in events {
        targets.push(matching_subscriptions(conn, e)?);
    }
    let n = events.len() as i64;
    diesel::update(counter_t::table.find(1))
        .set(counter_t::last_seq.eq(counter_t::last_seq + n))
        .execute(conn)?;
    let last: i64 = counter_t::table
        .find(1)
        .select(counter_t::last_seq)
        .first(conn)?;
    let first = last - n + 1;
    let mut seqs = Vec::with_capacity(events.len());
    for (k, (e, subs)) in events.iter().zip(targets).enumerate() {
        let seq = first + k as i64;
        diesel::insert_into(events_t::table)
            .values((
                events_t::seq.eq(seq),
                events_t::kind.eq(&e.kind),
                events_t::document_id.eq(&e.document_id),
                events_t::person_id.eq(&e.person_id),
                events_t::type_code.eq(&e.type_code),
                events_t::custodian_id.eq(&e.custodian_id),
                events_t::detail.eq(e.detail.to_string()),
                events_t::created_at.eq(now),
            ))
            .execute(conn)?;
        for sub in subs {
            diesel::insert_into(del_t::table)
                .values((
                    del_t::subscription_id.eq(sub),
                    del_t::event_seq.eq(seq),
                    del_t::status.eq("pending"),
                    del_t::attempts.eq(0),
                    del_t::next_attempt_at.eq(now),
                    del_t::created_at.eq(now),
                ))
                .execute(conn)?;
        }
        seqs.push(seq);
    }
    Ok(seqs)
}

/// Active subscriptions of the event's topic whose filters match. A patient filter names an
/// enterprise person; persons merged into the event's person match too.
fn matching_subscriptions(conn: &mut DbConn, e: &NewEvent) -> Result<Vec<String>, DocumentError> {
    let mut persons: Vec<String> = Vec::new();
    if let Some(p) = &e.person_id {
        persons.push(p.clone());
        let merged: Vec<String> = empi_persons::table
            .filter(empi_persons::merged_into.eq(p))
            .select(empi_persons::id)
            .load(conn)?;
        persons.extend(merged);
        if e.is_merge()
            && let Some(src) = e.detail.get("source").and_then(Value::as_str)
        {
            persons.push(src.to_string());
        }
    }
    let mut q = subs_t::table
        .filter(subs_t::topic.eq(e.topic()))
        .filter(subs_t::status.eq("active"))
        .select(subs_t::id)
        .into_boxed();
    q = q.filter(
        subs_t::filter_person
            .is_null()
            .or(subs_t::filter_person.eq_any(persons)),
    );
    q = match &e.type_code {
        Some(t) => q.filter(
            subs_t::filter_type
                .is_null()
                .or(subs_t::filter_type.eq(t.clone())),
        ),
        None => q.filter(subs_t::filter_type.is_null()),
    };
    Ok(q.order(subs_t::id.asc()).load(conn)?)
}

/// A stored event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredEvent {
    pub seq: i64,
    pub kind: String,
    pub document_id: Option<String>,
    pub person_id: Option<String>,
    pub type_code: Option<String>,
    pub custodian_id: Option<String>,
    pub detail: Value,
    pub created_at: NaiveDateTime,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = events_t)]
struct EventRow {
    seq: i64,
    kind: String,
    document_id: Option<String>,
    person_id: Option<String>,
    type_code: Option<String>,
    custodian_id: Option<String>,
    detail: String,
    created_at: NaiveDateTime,
}

fn event_of(r: EventRow) -> StoredEvent {
    StoredEvent {
        detail: serde_json::from_str(&r.detail).unwrap_or(Value::Null),
        seq: r.seq,
        kind: r.kind,
        document_id: r.document_id,
        person_id: r.person_id,
        type_code: r.type_code,
        custodian_id: r.custodian_id,
        created_at: r.created_at,
    }
}

pub fn get_event(conn: &mut DbConn, seq: i64) -> Result<StoredEvent, DocumentError> {
    let row: EventRow = events_t::table
        .find(seq)
        .select(EventRow::as_select())
        .first(conn)
        .optional()?
        .ok_or_else(|| DocumentError::NotFound(format!("event {seq}")))?;
    Ok(event_of(row))
}

/// A subscription as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    pub id: String,
    pub owner_id: String,
    pub topic: String,
    pub filter_person: Option<String>,
    pub filter_type: Option<String>,
    pub endpoint: String,
    pub status: String,
    pub resource: Value,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

#[derive(Debug, Clone)]
pub struct NewSubscription {
    pub owner_id: String,
    pub topic: String,
    pub filter_person: Option<String>,
    pub filter_type: Option<String>,
    pub endpoint: String,
    pub resource: Value,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = subs_t)]
struct SubRow {
    id: String,
    owner_id: String,
    topic: String,
    filter_person: Option<String>,
    filter_type: Option<String>,
    endpoint: String,
    status: String,
    resource: String,
    created_at: NaiveDateTime,
    updated_at: NaiveDateTime,
}

fn sub_of(r: SubRow) -> Subscription {
    Subscription {
        resource: serde_json::from_str(&r.resource).unwrap_or(Value::Null),
        id: r.id,
        owner_id: r.owner_id,
        topic: r.topic,
        filter_person: r.filter_person,
        filter_type: r.filter_type,
        endpoint: r.endpoint,
        status: r.status,
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

pub fn create_subscription(
    tx: &mut Audited<'_>,
    s: &NewSubscription,
) -> Result<Subscription, DocumentError> {
    let conn = tx.conn();
    let id = uuid::Uuid::now_v7().to_string();
    let now = now_utc();
    diesel::insert_into(subs_t::table)
        .values((
            subs_t::id.eq(&id),
            subs_t::owner_id.eq(&s.owner_id),
            subs_t::topic.eq(&s.topic),
            subs_t::filter_person.eq(&s.filter_person),
            subs_t::filter_type.eq(&s.filter_type),
            subs_t::endpoint.eq(&s.endpoint),
            subs_t::status.eq("active"),
            subs_t::resource.eq(s.resource.to_string()),
            subs_t::created_at.eq(now),
            subs_t::updated_at.eq(now),
        ))
        .execute(conn)?;
    get_subscription(conn, &id)
}

pub fn get_subscription(conn: &mut DbConn, id: &str) -> Result<Subscription, DocumentError> {
    let row: SubRow = subs_t::table
        .find(id)
        .select(SubRow::as_select())
        .first(conn)
        .optional()?
        .ok_or_else(|| DocumentError::NotFound(format!("Subscription/{id}")))?;
    Ok(sub_of(row))
}

pub fn list_subscriptions(
    conn: &mut DbConn,
    owner: &str,
) -> Result<Vec<Subscription>, DocumentError> {
    let rows: Vec<SubRow> = subs_t::table
        .filter(subs_t::owner_id.eq(owner))
        .order(subs_t::id.asc())
        .select(SubRow::as_select())
        .load(conn)?;
    Ok(rows.into_iter().map(sub_of).collect())
}

/// Turn a subscription off (no new deliveries; pending ones are no longer claimed).
pub fn deactivate_subscription(tx: &mut Audited<'_>, id: &str) -> Result<(), DocumentError> {
    let conn = tx.conn();
    diesel::update(subs_t::table.find(id))
        .set((subs_t::status.eq("off"), subs_t::updated_at.eq(now_utc())))
        .execute(conn)?;
    Ok(())
}

/// One claimed delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct Claimed {
    #[diesel(sql_type = Text)]
    pub subscription_id: String,
    #[diesel(sql_type = BigInt)]
    pub event_seq: i64,
    /// The attempt number this claim is (1 for the first).
    #[diesel(sql_type = Integer)]
    pub attempts: i32,
}

// Driven from the subscriptions, not from the pending deliveries: for each active
// subscription the oldest pending delivery (a probe of the partial index
// `doc_deliveries_pending_idx`), claimable when due and not leased. Only the head of a
// subscriber's queue is ever claimable, which is per-subscriber order; and the cost of a claim
// is one probe per active subscription whatever the backlog (the earlier form filtered every
// pending delivery, so the drain slowed as the backlog grew: BENCHMARKS.md, "Notification
// delivery"). On PostgreSQL, `SKIP LOCKED` skips a head another worker is claiming or
// completing right now; it cannot let a later delivery overtake, because only heads are
// candidates.
macro_rules! claim_sql {
    ($owner:literal, $until:literal, $now:literal, $limit:literal, $lock:literal) => {
        concat!(
            "UPDATE doc_deliveries SET lease_owner = ",
            $owner,
            ", lease_until = ",
            $until,
            ", attempts = attempts + 1 WHERE (subscription_id, event_seq) IN ( \
               SELECT d.subscription_id, d.event_seq FROM ( \
                 SELECT s.id AS sid, (SELECT e.event_seq FROM doc_deliveries e \
                                      WHERE e.subscription_id = s.id AND e.status = 'pending' \
                                      ORDER BY e.event_seq LIMIT 1) AS head \
                 FROM doc_subscriptions s WHERE s.status = 'active') h \
               JOIN doc_deliveries d ON d.subscription_id = h.sid AND d.event_seq = h.head \
               WHERE d.status = 'pending' AND d.next_attempt_at <= ",
            $now,
            " AND (d.lease_until IS NULL OR d.lease_until < ",
            $now,
            ") \
               ORDER BY d.next_attempt_at, d.event_seq LIMIT ",
            $limit,
            " ",
            $lock,
            ") \
             RETURNING subscription_id, event_seq, attempts"
        )
    };
}
const CLAIM_PG: &str = claim_sql!("$1", "$2", "$3", "$4", "FOR UPDATE OF d SKIP LOCKED");
const CLAIM_SQLITE: &str = claim_sql!("?1", "?2", "?3", "?4", "");

/// Lease up to `limit` due deliveries for `owner` (a worker id) until `now + lease`.
pub fn claim(
    conn: &mut DbConn,
    owner: &str,
    lease: std::time::Duration,
    limit: i64,
) -> Result<Vec<Claimed>, DocumentError> {
    let now = now_utc();
    let until = now + ChronoDuration::milliseconds(lease.as_millis() as i64);
    let sql = match conn {
        DbConn::Postgresql(_) => CLAIM_PG,
        DbConn::Sqlite(_) => CLAIM_SQLITE,
    };
    let q = diesel::sql_query(sql)
        .bind::<Text, _>(owner)
        .bind::<Timestamp, _>(until)
        .bind::<Timestamp, _>(now)
        .bind::<BigInt, _>(limit);
    let mut claimed: Vec<Claimed> = match conn {
        DbConn::Postgresql(pg) => q.load(pg)?,
        DbConn::Sqlite(lite) => q.load(lite)?,
    };
    claimed
        .sort_by(|a, b| (a.event_seq, &a.subscription_id).cmp(&(b.event_seq, &b.subscription_id)));
    Ok(claimed)
}

/// The result of one attempt.
#[derive(Debug, Clone)]
pub enum AttemptResult {
    /// The subscriber acknowledged (2xx).
    Delivered,
    /// The consent hook withheld the event from this subscriber.
    Withheld,
    /// Failed; retry after `retry_in` unless attempts are used up.
    Failed {
        error: String,
        retry_in: std::time::Duration,
    },
}

/// Record the outcome of a claimed attempt. Returns false when the lease was lost (another
/// worker took the delivery over): nothing is written then.
pub fn complete(
    conn: &mut DbConn,
    c: &Claimed,
    owner: &str,
    result: &AttemptResult,
    max_attempts: i32,
) -> Result<bool, DocumentError> {
    let now = now_utc();
    let target = del_t::table
        .filter(del_t::subscription_id.eq(&c.subscription_id))
        .filter(del_t::event_seq.eq(c.event_seq))
        .filter(del_t::lease_owner.eq(owner))
        .filter(del_t::attempts.eq(c.attempts))
        .filter(del_t::status.eq("pending"));
    let n = match result {
        AttemptResult::Delivered | AttemptResult::Withheld => {
            let status = if matches!(result, AttemptResult::Delivered) {
                "delivered"
            } else {
                "withheld"
            };
            diesel::update(target)
                .set((
                    del_t::status.eq(status),
                    del_t::delivered_at.eq(Some(now)),
                    del_t::lease_owner.eq(None::<String>),
                    del_t::lease_until.eq(None::<NaiveDateTime>),
                ))
                .execute(conn)?
        }
        AttemptResult::Failed { error, retry_in } => {
            let dead = c.attempts >= max_attempts;
            let next = now + ChronoDuration::milliseconds(retry_in.as_millis() as i64);
            let mut error = error.clone();
            error.truncate(500);
            diesel::update(target)
                .set((
                    del_t::status.eq(if dead { "dead" } else { "pending" }),
                    del_t::next_attempt_at.eq(next),
                    del_t::last_error.eq(Some(error)),
                    del_t::lease_owner.eq(None::<String>),
                    del_t::lease_until.eq(None::<NaiveDateTime>),
                ))
                .execute(conn)?
        }
    };
    Ok(n == 1)
}

/// Delivery state of one (subscription, event).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeliveryView {
    pub event_seq: i64,
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: NaiveDateTime,
    pub last_error: Option<String>,
    pub delivered_at: Option<NaiveDateTime>,
}

/// What `$status` shows for a subscription.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubscriptionStatus {
    pub pending: i64,
    pub delivered: i64,
    pub withheld: i64,
    pub dead: i64,
    /// The highest event number up to which every event was acknowledged (or withheld).
    pub last_acknowledged: i64,
    /// Total events matched since the subscription started.
    pub events_since_start: i64,
    /// Dead-lettered deliveries, oldest first (at most 100).
    pub dead_letters: Vec<DeliveryView>,
}

type DelRow = (
    i64,
    String,
    i32,
    NaiveDateTime,
    Option<String>,
    Option<NaiveDateTime>,
);

fn delivery_of(r: DelRow) -> DeliveryView {
    DeliveryView {
        event_seq: r.0,
        status: r.1,
        attempts: r.2,
        next_attempt_at: r.3,
        last_error: r.4,
        delivered_at: r.5,
    }
}

pub fn subscription_status(
    conn: &mut DbConn,
    sub: &str,
) -> Result<SubscriptionStatus, DocumentError> {
    let counts: Vec<(String, i64)> = del_t::table
        .filter(del_t::subscription_id.eq(sub))
        .group_by(del_t::status)
        .select((del_t::status, diesel::dsl::count_star()))
        .load(conn)?;
    let count = |s: &str| {
        counts
            .iter()
            .find(|(k, _)| k == s)
            .map(|(_, n)| *n)
            .unwrap_or(0)
    };
    let dead_letters: Vec<DelRow> = del_t::table
        .filter(del_t::subscription_id.eq(sub))
        .filter(del_t::status.eq("dead"))
        .order(del_t::event_seq.asc())
        .limit(100)
        .select((
            del_t::event_seq,
            del_t::status,
            del_t::attempts,
            del_t::next_attempt_at,
            del_t::last_error,
            del_t::delivered_at,
        ))
        .load(conn)?;
    Ok(SubscriptionStatus {
        pending: count("pending"),
        delivered: count("delivered"),
        withheld: count("withheld"),
        dead: count("dead"),
        last_acknowledged: last_acknowledged(conn, sub)?,
        events_since_start: counts.iter().map(|(_, n)| n).sum(),
        dead_letters: dead_letters.into_iter().map(delivery_of).collect(),
    })
}

/// The highest event number such that every earlier matched event of the subscription was
/// delivered or withheld (0 when none).
pub fn last_acknowledged(conn: &mut DbConn, sub: &str) -> Result<i64, DocumentError> {
    let first_open: Option<i64> = del_t::table
        .filter(del_t::subscription_id.eq(sub))
        .filter(del_t::status.eq_any(["pending", "dead"]))
        .select(diesel::dsl::min(del_t::event_seq))
        .first(conn)?;
    let mut q = del_t::table
        .filter(del_t::subscription_id.eq(sub))
        .filter(del_t::status.eq_any(["delivered", "withheld"]))
        .select(diesel::dsl::max(del_t::event_seq))
        .into_boxed();
    if let Some(open) = first_open {
        q = q.filter(del_t::event_seq.lt(open));
    }
    Ok(q.first::<Option<i64>>(conn)?.unwrap_or(0))
}

/// Events matched for a subscription after `since`, oldest first, with their delivery state
/// (catch-up for a subscriber that was down). Withheld events are not listed.
pub fn events_since(
    conn: &mut DbConn,
    sub: &str,
    since: i64,
    limit: i64,
) -> Result<Vec<(StoredEvent, DeliveryView)>, DocumentError> {
    let dels: Vec<DelRow> = del_t::table
        .filter(del_t::subscription_id.eq(sub))
        .filter(del_t::event_seq.gt(since))
        .filter(del_t::status.ne("withheld"))
        .order(del_t::event_seq.asc())
        .limit(limit.clamp(1, 1000))
        .select((
            del_t::event_seq,
            del_t::status,
            del_t::attempts,
            del_t::next_attempt_at,
            del_t::last_error,
            del_t::delivered_at,
        ))
        .load(conn)?;
    let seqs: Vec<i64> = dels.iter().map(|d| d.0).collect();
    let events: Vec<EventRow> = events_t::table
        .filter(events_t::seq.eq_any(&seqs))
        .select(EventRow::as_select())
        .load(conn)?;
    let mut by_seq: std::collections::HashMap<i64, StoredEvent> =
        events.into_iter().map(|r| (r.seq, event_of(r))).collect();
    Ok(dels
        .into_iter()
        .filter_map(|d| by_seq.remove(&d.0).map(|e| (e, delivery_of(d))))
        .collect())
}

/// Requeue dead-lettered deliveries of a subscription (an operator fixed the receiver).
pub fn retry_dead(tx: &mut Audited<'_>, sub: &str) -> Result<usize, DocumentError> {
    let conn = tx.conn();
    Ok(diesel::update(
        del_t::table
            .filter(del_t::subscription_id.eq(sub))
            .filter(del_t::status.eq("dead")),
    )
    .set((
        del_t::status.eq("pending"),
        del_t::attempts.eq(0),
        del_t::next_attempt_at.eq(now_utc()),
    ))
    .execute(conn)?)
}
