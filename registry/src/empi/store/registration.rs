//! Registration of one source record (or a batch of them, one by one): the record is
//! stored, its blocking keys written and it is linked by the matcher.

use super::*;

pub(super) fn new_person(conn: &mut DbConn) -> Result<String, EmpiError> {
    let id = new_id();
    let now = now_utc();
    diesel::insert_into(persons_t::table)
        .values((
            persons_t::id.eq(&id),
            persons_t::status.eq("active"),
            persons_t::version.eq(1i64),
            persons_t::created_at.eq(now),
            persons_t::updated_at.eq(now),
        ))
        .execute(conn)?;
    Ok(id)
}

pub(super) fn touch_person(conn: &mut DbConn, id: &str, status: &str) -> Result<(), EmpiError> {
    diesel::update(persons_t::table.find(id))
        .set((
            persons_t::status.eq(status),
            persons_t::version.eq(persons_t::version + 1),
            persons_t::updated_at.eq(now_utc()),
        ))
        .execute(conn)?;
    Ok(())
}

pub(super) fn linked_count(conn: &mut DbConn, person: &str) -> Result<i64, EmpiError> {
    Ok(links_t::table
        .filter(links_t::person_id.eq(person))
        .count()
        .get_result(conn)?)
}

pub(super) fn set_link(
    conn: &mut DbConn,
    record: &str,
    person: &str,
    score: Option<&Score>,
    decided_by: DecidedBy,
    actor: &str,
) -> Result<(), EmpiError> {
    diesel::delete(links_t::table.find(record)).execute(conn)?;
    insert_link(conn, record, person, score, decided_by, actor)
}

/// [`set_link`] for a record known to have no link (a new record).
fn insert_link(
    conn: &mut DbConn,
    record: &str,
    person: &str,
    score: Option<&Score>,
    decided_by: DecidedBy,
    actor: &str,
) -> Result<(), EmpiError> {
    let explanation = score
        .map(|s| serde_json::to_string(&s.explanation))
        .transpose()
        .map_err(ModelError::from)?;
    diesel::insert_into(links_t::table)
        .values((
            links_t::record_id.eq(record),
            links_t::person_id.eq(person),
            links_t::score.eq(score.map(|s| s.total)),
            links_t::explanation.eq(explanation),
            links_t::decided_by.eq(decided_by.as_str()),
            links_t::actor.eq(actor),
            links_t::decided_at.eq(now_utc()),
        ))
        .execute(conn)?;
    Ok(())
}

/// Pairs a steward kept separate that involve `record`.
fn kept_separate(conn: &mut DbConn, record: &str) -> Result<BTreeSet<String>, EmpiError> {
    let rows: Vec<(String, String)> = review_t::table
        .filter(review_t::status.eq("kept-separate"))
        .filter(
            review_t::record_a
                .eq(record)
                .or(review_t::record_b.eq(record)),
        )
        .select((review_t::record_a, review_t::record_b))
        .load(conn)?;
    Ok(rows
        .into_iter()
        .map(|(a, b)| if a == record { b } else { a })
        .collect())
}

fn queue_review(conn: &mut DbConn, a: &str, b: &str, score: &Score) -> Result<(), EmpiError> {
    let (a, b) = pair(a, b);
    let exists: i64 = review_t::table
        .filter(review_t::record_a.eq(&a))
        .filter(review_t::record_b.eq(&b))
        .count()
        .get_result(conn)?;
    if exists > 0 {
        return Ok(());
    }
    diesel::insert_into(review_t::table)
        .values((
            review_t::id.eq(new_id()),
            review_t::record_a.eq(&a),
            review_t::record_b.eq(&b),
            review_t::score.eq(score.total),
            review_t::explanation
                .eq(serde_json::to_string(&score.explanation).map_err(ModelError::from)?),
            review_t::status.eq("open"),
            review_t::created_at.eq(now_utc()),
        ))
        .execute(conn)?;
    Ok(())
}

/// Register (or update) a source record and link it, in one transaction.
pub fn register(
    tx: &mut Audited<'_>,
    reg: &Registration,
    actor: &str,
) -> Result<Registered, EmpiError> {
    register_with(tx, reg, actor, None)
}

/// Register many records in one write transaction (bulk import), the model loaded once. Per
/// record: its outcome, or the `Invalid`/`Conflict` error that refused it alone (raised
/// before the record writes anything, so no savepoint is needed). Any other error rolls the
/// whole batch back and is returned.
pub fn register_batch(
    tx: &mut Audited<'_>,
    regs: &[&Registration],
    actor: &str,
) -> Result<Vec<Result<RegistrationOutcome, EmpiError>>, EmpiError> {
    let conn = tx.conn();
    write_transaction(conn, |conn| {
        let (_, model) = current_model(conn)?;
        if let Some(out) = register_new_set(conn, regs, actor, &model)? {
            return Ok(out);
        }
        let mut out = Vec::with_capacity(regs.len());
        for reg in regs {
            out.push(
                match register_inner(conn, reg, actor, Some(&model), Nesting::InBatch) {
                    Ok((outcome, _)) => Ok(outcome),
                    Err(e @ (EmpiError::Invalid { .. } | EmpiError::Conflict(_))) => Err(e),
                    Err(other) => return Err(other),
                },
            );
        }
        Ok(out)
    })
}

/// [`register`] with the match model given (bulk import loads it once per batch; `None`: the
/// current one). Inside an outer transaction this is a savepoint: a failed registration
/// leaves nothing behind and the outer transaction goes on.
pub fn register_with(
    tx: &mut Audited<'_>,
    reg: &Registration,
    actor: &str,
    model: Option<&StoredModel>,
) -> Result<Registered, EmpiError> {
    let conn = tx.conn();
    let (outcome, read) = register_inner(conn, reg, actor, model, Nesting::Own)?;
    let (record, issues) = read.ok_or_else(|| corrupt("registered record not read back"))?;
    Ok(Registered {
        outcome,
        record,
        issues,
    })
}

/// The stored record and the data-quality issues of a registration.
type ReadBack = (StoredRecord, Vec<crate::empi::ident::DataQualityIssue>);

/// How [`register_inner`] runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Nesting {
    /// In its own write transaction (a savepoint inside an outer one); reads the stored
    /// record back.
    Own,
    /// Inside [`register_batch`]'s write transaction, no savepoint: its only per-record
    /// errors (`Invalid`, `Conflict`) are raised before the record writes anything, and any
    /// other error rolls the whole batch back. Reads nothing back (the import needs the
    /// outcome alone).
    InBatch,
}

/// [`register_with`] and one record of [`register_batch`].
pub(super) fn register_inner(
    conn: &mut DbConn,
    reg: &Registration,
    actor: &str,
    model: Option<&StoredModel>,
    nesting: Nesting,
) -> Result<(RegistrationOutcome, Option<ReadBack>), EmpiError> {
    let read_back = nesting == Nesting::Own;
    if reg.record.institution != reg.institution_id {
        return Err(EmpiError::Invalid {
            field: "institution",
            message: "the record's institution must be the registering institution".into(),
        });
    }
    let prepared = prepare(&reg.record);
    let keys = blocking_keys(&prepared);
    let record_json = serde_json::to_string(&reg.record).map_err(ModelError::from)?;
    let resource = reg.resource.to_string();
    let issues = &prepared.issues;
    let body = |conn: &mut DbConn| {
        lock(
            conn,
            &BTreeSet::from([format!("id:{}|{}", reg.id_system, reg.id_value)]),
        )?;
        let existing = records_t::table
            .filter(records_t::id_system.eq(&reg.id_system))
            .filter(records_t::id_value.eq(&reg.id_value))
            .select(RecordRow::as_select())
            .first(conn)
            .optional()?;
        let old_keys: Vec<String> = match &existing {
            Some(row) => keys_t::table
                .filter(keys_t::record_id.eq(&row.id))
                .select(keys_t::key)
                .load(conn)?,
            None => Vec::new(),
        };
        if let Some(row) = &existing {
            if row.institution_id != reg.institution_id {
                return Err(EmpiError::Conflict(
                    "the identifier is registered by another institution".into(),
                ));
            }
            if row.record_json == record_json && row.resource == resource {
                let record = if read_back {
                    Some((get_record(conn, &row.id)?, issues.clone()))
                } else {
                    None
                };
                return Ok((RegistrationOutcome::Unchanged, record));
            }
        }
        let mut names: BTreeSet<String> = keys.iter().map(|k| format!("key:{k}")).collect();
        names.extend(old_keys.iter().map(|k| format!("key:{k}")));
        lock(conn, &names)?;

        let now = now_utc();
        let first_phone = prepared.phones.first().cloned();
        let columns = (
            records_t::name_search.eq(format!(
                "{} {}",
                search_text(&reg.record.name),
                prepared.name.romanised
            )),
            records_t::family.eq(search_text(&reg.family)),
            records_t::given.eq(search_text(&reg.given)),
            records_t::sex.eq(sex_str(reg.record.sex)),
            records_t::birth_date.eq(reg.record.birth_date.map(|d| d.to_string())),
            records_t::resident_id.eq(prepared.resident_id.as_ref().map(|r| r.number.clone())),
            records_t::phone.eq(first_phone),
            records_t::record_json.eq(&record_json),
            records_t::resource.eq(&resource),
        );
        let (record_id, outcome) = match &existing {
            Some(row) => {
                diesel::update(records_t::table.find(&row.id))
                    .set((
                        columns,
                        records_t::version.eq(row.version + 1),
                        records_t::updated_at.eq(now),
                    ))
                    .execute(conn)?;
                diesel::delete(keys_t::table.filter(keys_t::record_id.eq(&row.id)))
                    .execute(conn)?;
                diesel::delete(issues_t::table.filter(issues_t::record_id.eq(&row.id)))
                    .execute(conn)?;
                // Open review items were about the old content.
                diesel::delete(
                    review_t::table.filter(review_t::status.eq("open")).filter(
                        review_t::record_a
                            .eq(&row.id)
                            .or(review_t::record_b.eq(&row.id)),
                    ),
                )
                .execute(conn)?;
                (row.id.clone(), RegistrationOutcome::Updated)
            }
            None => {
                let id = new_id();
                diesel::insert_into(records_t::table)
                    .values((
                        records_t::id.eq(&id),
                        records_t::institution_id.eq(&reg.institution_id),
                        records_t::id_system.eq(&reg.id_system),
                        records_t::id_value.eq(&reg.id_value),
                        columns,
                        records_t::version.eq(1i64),
                        records_t::created_at.eq(now),
                        records_t::updated_at.eq(now),
                    ))
                    .execute(conn)?;
                (id, RegistrationOutcome::Created)
            }
        };
        insert_keys_and_issues(conn, &record_id, &keys, issues)?;
        link_by_matcher(
            conn,
            &record_id,
            outcome == RegistrationOutcome::Created,
            &prepared,
            &keys,
            actor,
            model,
        )?;
        let record = if read_back {
            Some((get_record(conn, &record_id)?, issues.clone()))
        } else {
            None
        };
        Ok((outcome, record))
    };
    match nesting {
        Nesting::Own => write_transaction(conn, body),
        Nesting::InBatch => body(conn),
    }
}

/// Insert a record's blocking keys and its distinct data-quality issues: one multi-row
/// INSERT each (not one round trip per key or issue).
fn insert_keys_and_issues(
    conn: &mut DbConn,
    record_id: &str,
    keys: &[String],
    issues: &[crate::empi::ident::DataQualityIssue],
) -> Result<(), EmpiError> {
    if !keys.is_empty() {
        let rows: Vec<_> = keys
            .iter()
            .map(|key| (keys_t::record_id.eq(record_id), keys_t::key.eq(key)))
            .collect();
        per_backend!(conn, |c| diesel::insert_into(keys_t::table)
            .values(&rows)
            .execute(c))?;
    }
    let distinct_issues: BTreeSet<String> = issues
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<_, _>>()
        .map_err(ModelError::from)?;
    if !distinct_issues.is_empty() {
        let rows: Vec<_> = distinct_issues
            .iter()
            .map(|issue| (issues_t::record_id.eq(record_id), issues_t::issue.eq(issue)))
            .collect();
        per_backend!(conn, |c| diesel::insert_into(issues_t::table)
            .values(&rows)
            .execute(c))?;
    }
    Ok(())
}

/// Decide the person of a (new or changed) record; manual and merge links are kept.
/// `created`: the record was inserted in this transaction, so it has no link and no review
/// item yet (nothing to read).
pub(super) fn link_by_matcher(
    conn: &mut DbConn,
    record_id: &str,
    created: bool,
    prepared: &PreparedRecord,
    keys: &[String],
    actor: &str,
    model: Option<&StoredModel>,
) -> Result<(), EmpiError> {
    let current = if created {
        None
    } else {
        load_link(conn, record_id)?
    };
    if current
        .as_ref()
        .is_some_and(|l| l.decided_by != DecidedBy::Auto)
    {
        return Ok(());
    }
    let loaded;
    let model = match model {
        Some(m) => m,
        None => {
            loaded = current_model(conn)?.1;
            &loaded
        }
    };
    let separate = if created {
        BTreeSet::new()
    } else {
        kept_separate(conn, record_id)?
    };
    let candidates: Vec<ScoredCandidate> =
        scored_candidates(conn, prepared, keys, Some(record_id), model)?
            .into_iter()
            .filter(|c| !separate.contains(&c.record.id) && c.record.link.is_some())
            .collect();
    let best = candidates.iter().find(|c| c.decision == Decision::AutoLink);
    let current_person = current.as_ref().map(|l| l.person_id.clone());
    let target = match best {
        Some(c) => c
            .record
            .link
            .as_ref()
            .map(|l| (l.person_id.clone(), Some(c.score.clone()))),
        None => None,
    };
    let (person, score) = match (target, &current_person) {
        (Some((p, s)), _) => (p, s),
        (None, Some(p)) if linked_count(conn, p)? <= 1 => (p.clone(), None),
        (None, _) => (new_person(conn)?, None),
    };
    if current_person.as_deref() != Some(person.as_str()) || current.is_none() {
        if current.is_none() {
            insert_link(
                conn,
                record_id,
                &person,
                score.as_ref(),
                DecidedBy::Auto,
                actor,
            )?;
        } else {
            set_link(
                conn,
                record_id,
                &person,
                score.as_ref(),
                DecidedBy::Auto,
                actor,
            )?;
        }
        touch_person(conn, &person, "active")?;
        if let Some(old) = current_person.as_deref().filter(|old| *old != person)
            && linked_count(conn, old)? == 0
        {
            touch_person(conn, old, "empty")?;
        }
        record_event(
            conn,
            if current.is_none() { "link" } else { "relink" },
            Some(&person),
            current_person.as_deref(),
            Some(record_id),
            actor,
            serde_json::json!({ "decided_by": "auto", "score": score.as_ref().map(|s| s.total) }),
        )?;
    } else if let Some(s) = &score {
        // Same person, fresher evidence.
        set_link(conn, record_id, &person, Some(s), DecidedBy::Auto, actor)?;
    }
    for c in &candidates {
        let other_person = c.record.link.as_ref().map(|l| l.person_id.as_str());
        if other_person != Some(person.as_str()) && c.decision != Decision::NonMatch {
            queue_review(conn, record_id, &c.record.id, &c.score)?;
        }
    }
    Ok(())
}
