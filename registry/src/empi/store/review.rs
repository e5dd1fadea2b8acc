//! The review queue: pairs the matcher could not decide, listed and resolved by a steward.

use super::*;

/// A review queue item.
#[derive(Clone, Debug, Serialize)]
pub struct ReviewItem {
    pub id: String,
    pub record_a: String,
    pub record_b: String,
    pub score: f64,
    pub explanation: serde_json::Value,
    pub status: String,
    pub resolver: Option<String>,
    pub note: Option<String>,
    pub created_at: NaiveDateTime,
    pub resolved_at: Option<NaiveDateTime>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = review_t)]
struct ReviewRow {
    id: String,
    record_a: String,
    record_b: String,
    score: f64,
    explanation: String,
    status: String,
    resolver: Option<String>,
    note: Option<String>,
    created_at: NaiveDateTime,
    resolved_at: Option<NaiveDateTime>,
}

fn review_item(r: ReviewRow) -> Result<ReviewItem, EmpiError> {
    Ok(ReviewItem {
        explanation: serde_json::from_str(&r.explanation).map_err(corrupt)?,
        id: r.id,
        record_a: r.record_a,
        record_b: r.record_b,
        score: r.score,
        status: r.status,
        resolver: r.resolver,
        note: r.note,
        created_at: r.created_at,
        resolved_at: r.resolved_at,
    })
}

/// Review items with a status (`open`, `linked`, `kept-separate`), oldest first.
pub fn list_review(
    conn: &mut DbConn,
    status: &str,
    limit: i64,
    offset: i64,
) -> Result<Vec<ReviewItem>, EmpiError> {
    review_t::table
        .filter(review_t::status.eq(status))
        .order(review_t::id.asc())
        .limit(limit)
        .offset(offset)
        .select(ReviewRow::as_select())
        .load::<ReviewRow>(conn)?
        .into_iter()
        .map(review_item)
        .collect()
}

/// A steward's decision on a review item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReviewDecision {
    /// Same person: record_b is linked (manual) to record_a's person.
    Link,
    /// Different persons: never linked automatically.
    KeepSeparate,
}

pub fn resolve_review(
    tx: &mut Audited<'_>,
    id: &str,
    decision: ReviewDecision,
    actor: &str,
    note: Option<&str>,
) -> Result<ReviewItem, EmpiError> {
    let conn = tx.conn();
    write_transaction(conn, |conn| {
        let item = review_t::table
            .find(id)
            .select(ReviewRow::as_select())
            .first::<ReviewRow>(conn)
            .optional()?
            .ok_or_else(|| EmpiError::NotFound(format!("review item {id}")))
            .and_then(review_item)?;
        if item.status != "open" {
            return Err(EmpiError::Conflict(format!(
                "review item is already {}",
                item.status
            )));
        }
        let a = load_link(conn, &item.record_a)?
            .ok_or_else(|| corrupt("review record without link"))?;
        let b = load_link(conn, &item.record_b)?
            .ok_or_else(|| corrupt("review record without link"))?;
        lock_persons(conn, &[&a.person_id, &b.person_id])?;
        let status = match decision {
            ReviewDecision::Link => {
                if a.person_id != b.person_id {
                    set_link(
                        conn,
                        &item.record_b,
                        &a.person_id,
                        None,
                        DecidedBy::Manual,
                        actor,
                    )?;
                    touch_person(conn, &a.person_id, "active")?;
                    if linked_count(conn, &b.person_id)? == 0 {
                        touch_person(conn, &b.person_id, "empty")?;
                    }
                }
                record_event(
                    conn,
                    "link",
                    Some(&a.person_id),
                    Some(&b.person_id),
                    Some(&item.record_b),
                    actor,
                    serde_json::json!({ "decided_by": "manual", "review": id }),
                )?;
                "linked"
            }
            ReviewDecision::KeepSeparate => {
                // The pair is excluded from automatic linking from now on; when the matcher
                // had linked them, record_b gets a person of its own (a manual decision).
                if a.person_id == b.person_id {
                    let p = new_person(conn)?;
                    set_link(conn, &item.record_b, &p, None, DecidedBy::Manual, actor)?;
                }
                record_event(
                    conn,
                    "keep-separate",
                    Some(&a.person_id),
                    Some(&b.person_id),
                    Some(&item.record_b),
                    actor,
                    serde_json::json!({ "review": id }),
                )?;
                "kept-separate"
            }
        };
        diesel::update(review_t::table.find(id))
            .set((
                review_t::status.eq(status),
                review_t::resolver.eq(actor),
                review_t::note.eq(note),
                review_t::resolved_at.eq(Some(now_utc())),
            ))
            .execute(conn)?;
        review_t::table
            .find(id)
            .select(ReviewRow::as_select())
            .first::<ReviewRow>(conn)
            .map_err(EmpiError::from)
            .and_then(review_item)
    })
}
