//! The set-based path of a bulk registration (records whose identifiers are all new) and the
//! settings of a bulk-load connection.

use super::*;

/// Rows per multi-row statement of the set-based path (bind parameters stay far below
/// PostgreSQL's 65,535 and SQLite's 32,766 for the widest table, 16 columns).
const SET_CHUNK: usize = 1_000;

/// Whether any of the (system, value) identifiers is registered: one statement per chunk,
/// an index probe of the (id_system, id_value) unique index per pair (a filter on the values
/// alone would scan that whole index; one per system would be a statement per institution).
fn any_registered(conn: &mut DbConn, idents: &[(&str, &str)]) -> Result<bool, EmpiError> {
    use diesel::sql_types::{Array, BigInt, Text};
    #[derive(QueryableByName)]
    struct Found {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    for chunk in idents.chunks(SET_CHUNK) {
        let found: Found = match conn {
            DbConn::Postgresql(pg) => diesel::sql_query(
                "SELECT count(*) AS n FROM unnest($1::text[], $2::text[]) AS q (s, v) \
                 JOIN empi_source_records r ON r.id_system = q.s AND r.id_value = q.v",
            )
            .bind::<Array<Text>, _>(chunk.iter().map(|(s, _)| *s).collect::<Vec<_>>())
            .bind::<Array<Text>, _>(chunk.iter().map(|(_, v)| *v).collect::<Vec<_>>())
            .get_result(pg)?,
            DbConn::Sqlite(lite) => {
                // CROSS JOIN keeps the VALUES list as the outer loop.
                let rows = vec!["(?, ?)"; chunk.len()].join(", ");
                let mut query = diesel::sql_query(format!(
                    "SELECT count(*) AS n FROM (VALUES {rows}) AS q CROSS JOIN \
                     empi_source_records r ON r.id_system = q.column1 AND r.id_value = q.column2"
                ))
                .into_boxed();
                for (system, value) in chunk {
                    query = query.bind::<Text, _>(*system).bind::<Text, _>(*value);
                }
                query.get_result(lite)?
            }
        };
        if found.n > 0 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// One record of [`register_new_set`], prepared.
struct NewItem<'a> {
    reg: &'a Registration,
    id: String,
    prepared: PreparedRecord,
    keys: Vec<String>,
    record_json: String,
    resource: String,
    issues: BTreeSet<String>,
}

/// A record a batch record is compared with: stored before the batch, or earlier in it.
struct Known {
    prepared: PreparedRecord,
    person: String,
}

/// The set-based bulk registration: when every valid record of the batch is new (no stored
/// record has its identifier, no identifier twice in the batch), register them all with one
/// statement per step instead of ~14 per record — one identifier lock, one existence check,
/// one key lock, one candidate-key query and one candidate load for the whole batch, then
/// matching in memory (each record against the stored records and the batch's earlier
/// records that share a blocking key, exactly as one-by-one registration in the same order
/// would see them), then multi-row inserts of records, keys, issues, persons, links, events
/// and review items and one person update per touch count. `None`: some record exists or
/// repeats; the caller registers one by one (updates, re-imports).
///
/// Same decisions as [`register_inner`] per record in order, as long as no record has more
/// than [`MAX_CANDIDATES`] candidates (beyond that both paths score an arbitrary subset).
pub(super) fn register_new_set(
    conn: &mut DbConn,
    regs: &[&Registration],
    actor: &str,
    model: &StoredModel,
) -> Result<Option<Vec<Result<RegistrationOutcome, EmpiError>>>, EmpiError> {
    // Per-record refusals come first, as in `register_inner` (nothing written for them).
    let Some((mut refused, idents)) = refusals(regs) else {
        return Ok(None);
    };
    if idents.is_empty() {
        return Ok(None);
    }
    let exclusive = idents.len() >= EXCLUSIVE_BATCH;
    if exclusive {
        lock_all_writers(conn)?;
    } else {
        lock(
            conn,
            &idents
                .iter()
                .map(|(system, value)| format!("id:{system}|{value}"))
                .collect(),
        )?;
    }
    let pairs: Vec<(&str, &str)> = idents.iter().copied().collect();
    if any_registered(conn, &pairs)? {
        return Ok(None);
    }
    let items = new_items(regs, &refused, idents.len())?;
    let all_keys: BTreeSet<&str> = items
        .iter()
        .flat_map(|i| i.keys.iter().map(String::as_str))
        .collect();
    if !exclusive {
        lock(conn, &all_keys.iter().map(|k| format!("key:{k}")).collect())?;
    }
    let stored = StoredCandidates::load(conn, &all_keys, &items)?;
    let matched = match_in_order(&items, &stored, model)?;
    let now = now_utc();
    insert_records(conn, &items, now)?;
    insert_links(conn, &items, &matched, actor, now)?;

    let mut out = Vec::with_capacity(regs.len());
    for index in 0..regs.len() {
        out.push(match refused.remove(&index) {
            Some(e) => Err(e),
            None => Ok(RegistrationOutcome::Created),
        });
    }
    Ok(Some(out))
}

/// The records refused on their own (by index) and the identifiers of the others; `None`
/// when an identifier repeats in the batch.
#[allow(clippy::type_complexity)]
fn refusals<'a>(
    regs: &[&'a Registration],
) -> Option<(BTreeMap<usize, EmpiError>, BTreeSet<(&'a str, &'a str)>)> {
    let mut refused: BTreeMap<usize, EmpiError> = BTreeMap::new();
    let mut idents: BTreeSet<(&str, &str)> = BTreeSet::new();
    for (index, reg) in regs.iter().enumerate() {
        if reg.record.institution != reg.institution_id {
            refused.insert(
                index,
                EmpiError::Invalid {
                    field: "institution",
                    message: "the record's institution must be the registering institution".into(),
                },
            );
        } else if !idents.insert((reg.id_system.as_str(), reg.id_value.as_str())) {
            return None;
        }
    }
    Some((refused, idents))
}

/// The records not refused, prepared, in batch order.
fn new_items<'a>(
    regs: &[&'a Registration],
    refused: &BTreeMap<usize, EmpiError>,
    capacity: usize,
) -> Result<Vec<NewItem<'a>>, EmpiError> {
    let mut items: Vec<NewItem> = Vec::with_capacity(capacity);
    for (index, reg) in regs.iter().enumerate() {
        if refused.contains_key(&index) {
            continue;
        }
        let prepared = prepare(&reg.record);
        let keys = blocking_keys(&prepared);
        let issues = prepared
            .issues
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<_, _>>()
            .map_err(ModelError::from)?;
        items.push(NewItem {
            reg,
            id: new_id(),
            keys,
            record_json: serde_json::to_string(&reg.record).map_err(ModelError::from)?,
            resource: reg.resource.to_string(),
            issues,
            prepared,
        });
    }
    Ok(items)
}

/// Most candidates scored per record (as [`MAX_CANDIDATES`]).
fn candidate_limit() -> usize {
    usize::try_from(MAX_CANDIDATES).unwrap_or(usize::MAX)
}

/// The stored records a batch is matched with.
struct StoredCandidates {
    /// Stored records sharing a key with any batch record, by key.
    by_key: HashMap<String, Vec<String>>,
    /// The linked ones among the first [`candidate_limit`] of each batch record, prepared.
    known: HashMap<String, Known>,
}

impl StoredCandidates {
    fn load(
        conn: &mut DbConn,
        all_keys: &BTreeSet<&str>,
        items: &[NewItem<'_>],
    ) -> Result<StoredCandidates, EmpiError> {
        let key_list: Vec<&str> = all_keys.iter().copied().collect();
        let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
        for chunk in key_list.chunks(SET_CHUNK) {
            let rows: Vec<(String, String)> = keys_t::table
                .filter(keys_t::key.eq_any(chunk))
                .select((keys_t::key, keys_t::record_id))
                .load(conn)?;
            for (key, record) in rows {
                by_key.entry(key).or_default().push(record);
            }
        }
        let limit = candidate_limit();
        let stored_ids: BTreeSet<String> = items
            .iter()
            .flat_map(|item| {
                let mut seen = BTreeSet::new();
                item.keys
                    .iter()
                    .flat_map(|k| by_key.get(k).into_iter().flatten())
                    .filter(|id| seen.insert(id.as_str()))
                    .take(limit)
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut known: HashMap<String, Known> = HashMap::new();
        let stored_ids: Vec<String> = stored_ids.into_iter().collect();
        for chunk in stored_ids.chunks(SET_CHUNK) {
            // Only linked records are candidates (as in `link_by_matcher`).
            for (id, json, person) in load_linked_candidates(conn, chunk)? {
                let record: SourceRecord = serde_json::from_str(&json).map_err(corrupt)?;
                known.insert(
                    id,
                    Known {
                        prepared: prepare(&record),
                        person,
                    },
                );
            }
        }
        Ok(StoredCandidates { by_key, known })
    }
}

/// A review item a batch record raises: the pair (ordered), its score and explanation.
struct PendingReview {
    a: String,
    b: String,
    total: f64,
    explanation: String,
}

/// What matching decided for a batch, in item order.
#[derive(Default)]
struct Matched {
    /// The person each item is linked to.
    persons: Vec<String>,
    /// The auto-link score of each item (total, explanation JSON); `None`: a new person.
    scores: Vec<Option<(f64, String)>>,
    new_persons: BTreeSet<String>,
    /// Records linked per person (each link touches its person once).
    touches: BTreeMap<String, i64>,
    reviews: Vec<PendingReview>,
}

/// Match each item in order, in memory, against the stored candidates and the batch's
/// earlier items that share a blocking key.
fn match_in_order(
    items: &[NewItem<'_>],
    stored: &StoredCandidates,
    model: &StoredModel,
) -> Result<Matched, EmpiError> {
    let limit = candidate_limit();
    let mut batch_by_key: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut m = Matched {
        persons: Vec::with_capacity(items.len()),
        scores: Vec::with_capacity(items.len()),
        ..Matched::default()
    };
    for (pos, item) in items.iter().enumerate() {
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let mut candidates: Vec<(&str, &PreparedRecord, &str)> = Vec::new();
        for key in &item.keys {
            for id in stored.by_key.get(key).into_iter().flatten() {
                if candidates.len() < limit
                    && let Some(k) = stored.known.get(id)
                    && seen.insert(id.as_str())
                {
                    candidates.push((id.as_str(), &k.prepared, k.person.as_str()));
                }
            }
            for &earlier in batch_by_key.get(key.as_str()).into_iter().flatten() {
                let other = &items[earlier];
                if candidates.len() < limit && seen.insert(other.id.as_str()) {
                    candidates.push((
                        other.id.as_str(),
                        &other.prepared,
                        m.persons[earlier].as_str(),
                    ));
                }
            }
        }
        let mut scored: Vec<(&str, &str, Score, Decision)> = candidates
            .into_iter()
            .map(|(id, other, person)| {
                let (score, _, decision) = score_pair(model, &item.prepared, other);
                (id, person, score, decision)
            })
            .collect();
        scored.sort_by(|a, b| b.2.total.total_cmp(&a.2.total).then(a.0.cmp(b.0)));
        let best = scored.iter().find(|c| c.3 == Decision::AutoLink);
        let (person, score) = match best {
            Some(c) => (c.1.to_string(), Some(&c.2)),
            None => {
                let id = new_id();
                m.new_persons.insert(id.clone());
                (id, None)
            }
        };
        *m.touches.entry(person.clone()).or_insert(0) += 1;
        let score = score
            .map(|s| serde_json::to_string(&s.explanation).map(|e| (s.total, e)))
            .transpose()
            .map_err(ModelError::from)?;
        m.scores.push(score);
        for (other, other_person, s, decision) in &scored {
            if *other_person != person && *decision != Decision::NonMatch {
                let (a, b) = pair(&item.id, other);
                m.reviews.push(PendingReview {
                    a,
                    b,
                    total: s.total,
                    explanation: serde_json::to_string(&s.explanation).map_err(ModelError::from)?,
                });
            }
        }
        m.persons.push(person);
        for key in &item.keys {
            batch_by_key.entry(key.as_str()).or_default().push(pos);
        }
    }
    Ok(m)
}

/// Insert the batch's records, their blocking keys and data-quality issues: one multi-row
/// statement per table and chunk.
fn insert_records(
    conn: &mut DbConn,
    items: &[NewItem<'_>],
    now: NaiveDateTime,
) -> Result<(), EmpiError> {
    let records: Vec<_> = items
        .iter()
        .map(|item| {
            let reg = item.reg;
            (
                (
                    records_t::id.eq(item.id.as_str()),
                    records_t::institution_id.eq(reg.institution_id.as_str()),
                    records_t::id_system.eq(reg.id_system.as_str()),
                    records_t::id_value.eq(reg.id_value.as_str()),
                    records_t::name_search.eq(format!(
                        "{} {}",
                        search_text(&reg.record.name),
                        item.prepared.name.romanised
                    )),
                    records_t::family.eq(search_text(&reg.family)),
                    records_t::given.eq(search_text(&reg.given)),
                    records_t::sex.eq(sex_str(reg.record.sex)),
                ),
                (
                    records_t::birth_date.eq(reg.record.birth_date.map(|d| d.to_string())),
                    records_t::resident_id.eq(item
                        .prepared
                        .resident_id
                        .as_ref()
                        .map(|r| r.number.clone())),
                    records_t::phone.eq(item.prepared.phones.first().cloned()),
                    records_t::record_json.eq(item.record_json.as_str()),
                    records_t::resource.eq(item.resource.as_str()),
                    records_t::version.eq(1i64),
                    records_t::created_at.eq(now),
                    records_t::updated_at.eq(now),
                ),
            )
        })
        .collect();
    insert_chunks!(conn, records_t::table, records, SET_CHUNK);
    let keys: Vec<_> = items
        .iter()
        .flat_map(|item| {
            item.keys.iter().map(|k| {
                (
                    keys_t::record_id.eq(item.id.as_str()),
                    keys_t::key.eq(k.as_str()),
                )
            })
        })
        .collect();
    insert_chunks!(conn, keys_t::table, keys, SET_CHUNK * 4);
    let issues: Vec<_> = items
        .iter()
        .flat_map(|item| {
            item.issues.iter().map(|i| {
                (
                    issues_t::record_id.eq(item.id.as_str()),
                    issues_t::issue.eq(i.as_str()),
                )
            })
        })
        .collect();
    insert_chunks!(conn, issues_t::table, issues, SET_CHUNK * 4);
    Ok(())
}

/// Insert the batch's new persons, count the links to existing ones, and insert the links,
/// their events and the review items: one multi-row statement per table and chunk.
fn insert_links(
    conn: &mut DbConn,
    items: &[NewItem<'_>],
    matched: &Matched,
    actor: &str,
    now: NaiveDateTime,
) -> Result<(), EmpiError> {
    let Matched {
        persons,
        scores,
        new_persons,
        touches,
        reviews,
    } = matched;
    let mut links = Vec::with_capacity(items.len());
    let mut events = Vec::with_capacity(items.len());
    for ((item, person), score) in items.iter().zip(persons).zip(scores) {
        let total = score.as_ref().map(|(t, _)| *t);
        links.push((
            links_t::record_id.eq(item.id.clone()),
            links_t::person_id.eq(person.clone()),
            links_t::score.eq(total),
            links_t::explanation.eq(score.as_ref().map(|(_, e)| e.clone())),
            links_t::decided_by.eq(DecidedBy::Auto.as_str()),
            links_t::actor.eq(actor),
            links_t::decided_at.eq(now),
        ));
        events.push((
            events_t::id.eq(new_id()),
            events_t::kind.eq("link"),
            events_t::person_id.eq(Some(person.clone())),
            events_t::other_person_id.eq(None::<String>),
            events_t::record_id.eq(Some(item.id.clone())),
            events_t::actor.eq(actor),
            events_t::detail
                .eq(serde_json::json!({ "decided_by": "auto", "score": total }).to_string()),
            events_t::created_at.eq(now),
        ));
    }
    let reviews: Vec<_> = reviews
        .iter()
        .map(|r| {
            (
                review_t::id.eq(new_id()),
                review_t::record_a.eq(r.a.as_str()),
                review_t::record_b.eq(r.b.as_str()),
                review_t::score.eq(r.total),
                review_t::explanation.eq(r.explanation.as_str()),
                review_t::status.eq("open"),
                review_t::created_at.eq(now),
            )
        })
        .collect();
    // A new person is created (version 1) and touched once per record linked to it.
    let created: Vec<_> = new_persons
        .iter()
        .map(|id| {
            (
                persons_t::id.eq(id.as_str()),
                persons_t::status.eq("active"),
                persons_t::version.eq(1 + touches.get(id).copied().unwrap_or(0)),
                persons_t::created_at.eq(now),
                persons_t::updated_at.eq(now),
            )
        })
        .collect();
    insert_chunks!(conn, persons_t::table, created, SET_CHUNK);
    let mut by_count: BTreeMap<i64, Vec<&str>> = BTreeMap::new();
    for (person, n) in touches {
        if !new_persons.contains(person) {
            by_count.entry(*n).or_default().push(person.as_str());
        }
    }
    for (n, ids) in by_count {
        for chunk in ids.chunks(SET_CHUNK) {
            diesel::update(persons_t::table.filter(persons_t::id.eq_any(chunk)))
                .set((
                    persons_t::status.eq("active"),
                    persons_t::version.eq(persons_t::version + n),
                    persons_t::updated_at.eq(now),
                ))
                .execute(conn)?;
        }
    }
    insert_chunks!(conn, links_t::table, links, SET_CHUNK);
    insert_chunks!(conn, events_t::table, events, SET_CHUNK);
    insert_chunks!(conn, review_t::table, reviews, SET_CHUNK);

    Ok(())
}

/// Refresh the query planner's statistics of the identity tables (PostgreSQL `ANALYZE`; on
/// SQLite nothing: its planner needs no statistics for these equality lookups). A bulk load
/// into small tables otherwise keeps the plans made when they were nearly empty — each
/// connection's cached generic plans read every row of `empi_source_records` and
/// `empi_links` per registration — until autovacuum analyses them, and autovacuum may be off.
pub fn refresh_statistics(conn: &mut DbConn) -> Result<(), EmpiError> {
    if let DbConn::Postgresql(pg) = conn {
        diesel::sql_query(
            "ANALYZE empi_source_records, empi_links, empi_blocking_keys, empi_persons, \
             empi_review_items",
        )
        .execute(pg)?;
    }
    Ok(())
}

/// Settings of a connection dedicated to a bulk load (`yiqiao mpi import`, the store bench),
/// made once before its first batch. PostgreSQL: none — a commit is durable with the
/// default `synchronous_commit = on`, which is what a resumable import needs of each batch.
/// SQLite (WAL): `synchronous = FULL`, so each batch's commit is on disk before the import
/// records it in its checkpoint file (the store's `NORMAL` leaves a WAL commit to the next
/// checkpoint's sync: a power failure could lose a batch the checkpoint file counts as
/// stored), and `wal_autocheckpoint` at 16,384 pages (64 MiB) instead of 1,000, so index
/// pages that several batches change are copied into the database once per checkpoint,
/// not once per batch (a batch of 500 dirties thousands of index pages, so with 1,000 every
/// commit checkpointed), and a page cache of up to 1 GiB (`cache_size`; the default 2 MiB is
/// far below what one large batch dirties, so SQLite spilled dirty pages to the WAL in the
/// middle of the transaction and wrote many of them again before the commit). The
/// connection keeps these settings until it is closed.
pub fn bulk_load_session(conn: &mut DbConn) -> Result<(), EmpiError> {
    if let DbConn::Sqlite(lite) = conn {
        diesel::sql_query("PRAGMA synchronous = FULL").execute(lite)?;
        diesel::sql_query("PRAGMA wal_autocheckpoint = 16384").execute(lite)?;
        diesel::sql_query("PRAGMA cache_size = -1048576").execute(lite)?;
    }
    Ok(())
}

/// When a bulk load refreshes statistics ([`refresh_statistics`]): after its first batch,
/// then each time the rows loaded have doubled (a handful of `ANALYZE`s for a million rows).
#[derive(Debug)]
pub struct StatisticsSchedule {
    next_at: u64,
}

impl Default for StatisticsSchedule {
    fn default() -> Self {
        StatisticsSchedule { next_at: 1 }
    }
}

impl StatisticsSchedule {
    /// Call after each committed batch with the rows loaded so far; returns whether it
    /// refreshed.
    pub fn after_batch(&mut self, conn: &mut DbConn, rows_done: u64) -> Result<bool, EmpiError> {
        if rows_done < self.next_at {
            return Ok(false);
        }
        refresh_statistics(conn)?;
        self.next_at = rows_done.saturating_mul(2);
        Ok(true)
    }
}
