//! Merge of two enterprise persons and its exact undo.

use super::*;

/// Lineage stored with a merge event, enough to undo it exactly.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct MergeLineage {
    target: String,
    source: String,
    source_status: String,
    moved: Vec<Link>,
}

pub(super) fn lock_persons(conn: &mut DbConn, persons: &[&str]) -> Result<(), EmpiError> {
    lock(
        conn,
        &persons.iter().map(|p| format!("person:{p}")).collect(),
    )?;
    let records: Vec<String> = links_t::table
        .filter(links_t::person_id.eq_any(persons))
        .select(links_t::record_id)
        .load(conn)?;
    let keys: Vec<String> = keys_t::table
        .filter(keys_t::record_id.eq_any(&records))
        .select(keys_t::key)
        .load(conn)?;
    lock(
        conn,
        &keys.into_iter().map(|k| format!("key:{k}")).collect(),
    )
}

fn person_status(conn: &mut DbConn, id: &str) -> Result<String, EmpiError> {
    persons_t::table
        .find(id)
        .select(persons_t::status)
        .first(conn)
        .optional()?
        .ok_or_else(|| EmpiError::NotFound(format!("person {id}")))
}

/// Merge person `source` into `target`: every record of `source` is linked to `target`
/// (decided_by merge). Returns the merge event id.
pub fn merge(
    tx: &mut Audited<'_>,
    target: &str,
    source: &str,
    actor: &str,
) -> Result<String, EmpiError> {
    let conn = tx.conn();
    if target == source {
        return Err(EmpiError::Invalid {
            field: "source",
            message: "cannot merge a person into itself".into(),
        });
    }
    write_transaction(conn, |conn| {
        lock_persons(conn, &[target, source])?;
        let target_status = person_status(conn, target)?;
        let source_status = person_status(conn, source)?;
        if target_status == "merged" || source_status == "merged" {
            return Err(EmpiError::Conflict(
                "a person that was merged away cannot take part in a merge".into(),
            ));
        }
        let moved: Vec<Link> = links_t::table
            .filter(links_t::person_id.eq(source))
            .select(LinkRow::as_select())
            .order(links_t::record_id.asc())
            .load(conn)?
            .into_iter()
            .map(LinkRow::into_link)
            .collect::<Result<_, _>>()?;
        for l in &moved {
            set_link(conn, &l.record_id, target, None, DecidedBy::Merge, actor)?;
        }
        let lineage = MergeLineage {
            target: target.into(),
            source: source.into(),
            source_status,
            moved,
        };
        let detail = serde_json::to_value(&lineage).map_err(ModelError::from)?;
        finish_pair_change(
            conn,
            PairChange {
                kind: "merge",
                target,
                source,
                source_status: "merged",
                merged_into: Some(target),
                actor,
                detail,
                event: NewEvent::patient_merged(target, source),
            },
        )
    })
}

/// Undo the latest merge of `source` into `target`, restoring every moved link exactly
/// (person, score, explanation, decided_by, actor, time). Refused when a moved record has
/// been relinked since.
pub fn unmerge(
    tx: &mut Audited<'_>,
    target: &str,
    source: &str,
    actor: &str,
) -> Result<String, EmpiError> {
    let conn = tx.conn();
    write_transaction(conn, |conn| {
        lock_persons(conn, &[target, source])?;
        let event: Option<(String, String)> = events_t::table
            .filter(events_t::kind.eq("merge"))
            .filter(events_t::person_id.eq(target))
            .filter(events_t::other_person_id.eq(source))
            .order(events_t::id.desc())
            .select((events_t::id, events_t::detail))
            .first(conn)
            .optional()?;
        let Some((event_id, detail)) = event else {
            return Err(EmpiError::NotFound(format!(
                "merge of person {source} into {target}"
            )));
        };
        let undone: i64 = events_t::table
            .filter(events_t::kind.eq("unmerge"))
            .filter(events_t::detail.like(format!("%\"merge_event\":\"{event_id}\"%")))
            .count()
            .get_result(conn)?;
        if undone > 0 || person_status(conn, source)? != "merged" {
            return Err(EmpiError::Conflict("that merge was already undone".into()));
        }
        let lineage: MergeLineage = serde_json::from_str(&detail).map_err(corrupt)?;
        for l in &lineage.moved {
            let now = load_link(conn, &l.record_id)?;
            if now
                .as_ref()
                .is_none_or(|n| n.person_id != target || n.decided_by != DecidedBy::Merge)
            {
                return Err(EmpiError::Conflict(format!(
                    "record {} was relinked after the merge; resolve it manually",
                    l.record_id
                )));
            }
            diesel::delete(links_t::table.find(&l.record_id)).execute(conn)?;
            diesel::insert_into(links_t::table)
                .values((
                    links_t::record_id.eq(&l.record_id),
                    links_t::person_id.eq(&l.person_id),
                    links_t::score.eq(l.score),
                    links_t::explanation
                        .eq(l.explanation.as_ref().map(serde_json::Value::to_string)),
                    links_t::decided_by.eq(l.decided_by.as_str()),
                    links_t::actor.eq(&l.actor),
                    links_t::decided_at.eq(l.decided_at),
                ))
                .execute(conn)?;
        }
        finish_pair_change(
            conn,
            PairChange {
                kind: "unmerge",
                target,
                source,
                source_status: &lineage.source_status,
                merged_into: None,
                actor,
                detail: serde_json::json!({ "merge_event": event_id }),
                event: NewEvent::patient_unmerged(target, source),
            },
        )
    })
}

/// The last steps of a merge and of its undo: the source person's status (and whom it is
/// merged into), the target touched, both persons' consents re-resolved, the event logged
/// and the subscribers' notification queued.
struct PairChange<'a> {
    /// `merge` or `unmerge` (the event kind).
    kind: &'static str,
    target: &'a str,
    source: &'a str,
    source_status: &'a str,
    merged_into: Option<&'a str>,
    actor: &'a str,
    /// The event's detail (the merge's lineage, or the merge event undone).
    detail: serde_json::Value,
    /// The notification for subscribers to the patient-merge topic.
    event: NewEvent,
}

/// Apply a [`PairChange`] inside the caller's write transaction; returns the event id.
fn finish_pair_change(conn: &mut DbConn, change: PairChange<'_>) -> Result<String, EmpiError> {
    let PairChange {
        kind,
        target,
        source,
        source_status,
        merged_into,
        actor,
        detail,
        event,
    } = change;
    diesel::update(persons_t::table.find(source))
        .set((
            persons_t::status.eq(source_status),
            persons_t::merged_into.eq(merged_into),
            persons_t::version.eq(persons_t::version + 1),
            persons_t::updated_at.eq(now_utc()),
        ))
        .execute(conn)?;
    touch_person(conn, target, "active")?;
    // A merged source's consents apply to the target (consent::for_patients); an undo
    // separates them again.
    crate::consent::subjects_changed(conn, &[target, source])?;
    let id = record_event(conn, kind, Some(target), Some(source), None, actor, detail)?;
    // Subscribers to the patient-merge topic, in the same transaction (outbox; last, it
    // takes the event counter lock).
    emit_merge_event(conn, event)?;
    Ok(id)
}

fn emit_merge_event(conn: &mut DbConn, event: NewEvent) -> Result<(), EmpiError> {
    outbox::emit(conn, &[event]).map_err(|e| match e {
        crate::documents::DocumentError::Store(s) => EmpiError::Store(s),
        other => EmpiError::Store(StoreError::Unavailable(format!(
            "merge notification not stored: {other}"
        ))),
    })?;
    Ok(())
}
