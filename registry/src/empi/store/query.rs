//! Reads of the identity store: records, persons and their golden record, candidate scoring
//! (`$match`) and the PDQm record search.

use super::*;

pub(super) fn load_link(conn: &mut DbConn, record_id: &str) -> Result<Option<Link>, EmpiError> {
    links_t::table
        .find(record_id)
        .select(LinkRow::as_select())
        .first(conn)
        .optional()?
        .map(LinkRow::into_link)
        .transpose()
}

/// One source record by id.
pub fn get_record(conn: &mut DbConn, id: &str) -> Result<StoredRecord, EmpiError> {
    let row = records_t::table
        .find(id)
        .select(RecordRow::as_select())
        .first(conn)
        .optional()?
        .ok_or_else(|| EmpiError::NotFound(format!("Patient/{id}")))?;
    let link = load_link(conn, id)?;
    row.into_stored(link)
}

/// The source record registered under an institution identifier.
pub fn find_by_identifier(
    conn: &mut DbConn,
    system: &str,
    value: &str,
) -> Result<Option<StoredRecord>, EmpiError> {
    let row = records_t::table
        .filter(records_t::id_system.eq(system))
        .filter(records_t::id_value.eq(value))
        .select(RecordRow::as_select())
        .first(conn)
        .optional()?;
    match row {
        None => Ok(None),
        Some(row) => {
            let link = load_link(conn, &row.id)?;
            Ok(Some(row.into_stored(link)?))
        }
    }
}

fn load_records(conn: &mut DbConn, ids: &[String]) -> Result<Vec<StoredRecord>, EmpiError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    // One statement: each record with its link (if any).
    let rows: Vec<(RecordRow, Option<LinkRow>)> = records_t::table
        .left_join(links_t::table.on(links_t::record_id.eq(records_t::id)))
        .filter(records_t::id.eq_any(ids))
        .select((RecordRow::as_select(), Option::<LinkRow>::as_select()))
        .load(conn)?;
    stored_records(rows)
}

/// Records with their links (a left join's rows), ordered by id.
fn stored_records(rows: Vec<(RecordRow, Option<LinkRow>)>) -> Result<Vec<StoredRecord>, EmpiError> {
    let mut out: Vec<StoredRecord> = rows
        .into_iter()
        .map(|(r, l)| r.into_stored(l.map(LinkRow::into_link).transpose()?))
        .collect::<Result<_, _>>()?;
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// The linked records among `ids` as (id, engine record as JSON, person): what the matcher
/// needs of a candidate, in one statement, without the stored resource or link evidence.
pub(super) fn load_linked_candidates(
    conn: &mut DbConn,
    ids: &[String],
) -> Result<Vec<(String, String, String)>, EmpiError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(records_t::table
        .inner_join(links_t::table.on(links_t::record_id.eq(records_t::id)))
        .filter(records_t::id.eq_any(ids))
        .select((records_t::id, records_t::record_json, links_t::person_id))
        .load(conn)?)
}

/// The source records linked to a person, oldest first.
pub fn records_of_person(
    conn: &mut DbConn,
    person_id: &str,
) -> Result<Vec<StoredRecord>, EmpiError> {
    let ids: Vec<String> = links_t::table
        .filter(links_t::person_id.eq(person_id))
        .select(links_t::record_id)
        .load(conn)?;
    load_records(conn, &ids)
}

/// An institution holding records of a person: its id and the (system, value) identifiers of
/// those records.
pub type Holder = (String, Vec<(String, String)>);

/// Where a person's records are held: per institution (sorted by id), the identifiers
/// (system, value) of its records linked to the person. One statement, nothing decoded (the
/// federated search needs only this, not the records).
pub fn holders_of_person(conn: &mut DbConn, person_id: &str) -> Result<Vec<Holder>, EmpiError> {
    let rows: Vec<(String, String, String)> = links_t::table
        .inner_join(records_t::table.on(records_t::id.eq(links_t::record_id)))
        .filter(links_t::person_id.eq(person_id))
        .select((
            records_t::institution_id,
            records_t::id_system,
            records_t::id_value,
        ))
        .order((
            records_t::institution_id,
            records_t::id_system,
            records_t::id_value,
        ))
        .load(conn)?;
    let mut out: Vec<Holder> = Vec::new();
    for (institution, system, value) in rows {
        match out.last_mut() {
            Some((last, ids)) if *last == institution => ids.push((system, value)),
            _ => out.push((institution, vec![(system, value)])),
        }
    }
    Ok(out)
}

/// One candidate of a record, scored.
#[derive(Clone, Debug)]
pub struct ScoredCandidate {
    pub record: StoredRecord,
    pub score: Score,
    pub vector: ComparisonVector,
    pub decision: Decision,
    pub posterior: f64,
}

/// Records sharing a blocking key with `prepared`, scored with `model`, best first.
pub(super) fn scored_candidates(
    conn: &mut DbConn,
    prepared: &PreparedRecord,
    keys: &[String],
    exclude: Option<&str>,
    model: &StoredModel,
) -> Result<Vec<ScoredCandidate>, EmpiError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    // No DISTINCT in SQL: `SELECT DISTINCT … LIMIT` let PostgreSQL walk the whole
    // (record_id, key) primary key in order, filtering on the key, instead of looking the
    // keys up. A record shares at most `keys.len()` keys with the query (one row per key),
    // so `MAX_CANDIDATES × keys.len()` key rows hold at least `MAX_CANDIDATES` distinct
    // records whenever that many exist; beyond `MAX_CANDIDATES` an arbitrary subset is
    // scored, as before. One statement: the key lookup is a subquery of the records' load.
    let row_limit = MAX_CANDIDATES.saturating_mul(i64::try_from(keys.len()).unwrap_or(i64::MAX));
    // Record ids are never empty, so "" excludes nothing.
    let ids = keys_t::table
        .filter(keys_t::key.eq_any(keys))
        .filter(keys_t::record_id.ne(exclude.unwrap_or_default()))
        .select(keys_t::record_id)
        .limit(row_limit);
    let rows: Vec<(RecordRow, Option<LinkRow>)> = records_t::table
        .left_join(links_t::table.on(links_t::record_id.eq(records_t::id)))
        .filter(records_t::id.eq_any(ids))
        .select((RecordRow::as_select(), Option::<LinkRow>::as_select()))
        .load(conn)?;
    let mut records = stored_records(rows)?;
    records.truncate(usize::try_from(MAX_CANDIDATES).unwrap_or(usize::MAX));
    let mut out: Vec<ScoredCandidate> = records
        .into_iter()
        .map(|r| {
            let (score, vector, decision) = score_pair(model, prepared, &prepare(&r.record));
            let posterior = model.posterior(score.total);
            ScoredCandidate {
                record: r,
                score,
                vector,
                decision,
                posterior,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        b.score
            .total
            .total_cmp(&a.score.total)
            .then(a.record.id.cmp(&b.record.id))
    });
    Ok(out)
}

/// Compare two prepared records and score the pair with `model`.
pub(super) fn score_pair(
    model: &StoredModel,
    a: &PreparedRecord,
    b: &PreparedRecord,
) -> (Score, ComparisonVector, Decision) {
    let vector = compare(a, b);
    let score = model.parameters.score(&vector);
    let decision = model.thresholds.decide_pair(score.total, &vector);
    (score, vector, decision)
}

/// Score a record against the index without storing anything (`$match`).
pub fn match_record(
    conn: &mut DbConn,
    record: &SourceRecord,
) -> Result<Vec<ScoredCandidate>, EmpiError> {
    let (_, model) = current_model(conn)?;
    let prepared = prepare(record);
    let keys = blocking_keys(&prepared);
    scored_candidates(conn, &prepared, &keys, None, &model)
}

pub(super) fn sex_str(s: Option<Sex>) -> Option<&'static str> {
    s.map(|s| match s {
        Sex::Male => "male",
        Sex::Female => "female",
    })
}

pub(super) fn search_text(raw: &str) -> String {
    crate::empi::normalize::normalise_name(raw)
        .full
        .to_lowercase()
}

pub(super) fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

/// Search filters of PDQm (all optional, combined with AND).
#[derive(Clone, Debug, Default)]
pub struct RecordFilter {
    pub family: Option<String>,
    pub given: Option<String>,
    /// Matches the name (Han or Latin) or its romanised (pinyin) form, by substring.
    pub name: Option<String>,
    pub birth_date: Option<NaiveDate>,
    pub sex: Option<Sex>,
    /// Normalised resident ID number.
    pub resident_id: Option<String>,
    /// (system, value) of an institution identifier; system `None` matches any.
    pub identifier: Option<(Option<String>, String)>,
    pub phone: Option<String>,
    pub limit: i64,
    pub offset: i64,
}

fn like_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

/// Source records matching a filter, ordered by id.
pub fn search_records(conn: &mut DbConn, f: &RecordFilter) -> Result<Vec<StoredRecord>, EmpiError> {
    let mut q = records_t::table.select(records_t::id).into_boxed();
    if let Some(v) = &f.family {
        q = q.filter(
            records_t::family
                .like(format!("{}%", like_escape(&search_text(v))))
                .escape('\\'),
        );
    }
    if let Some(v) = &f.given {
        q = q.filter(
            records_t::given
                .like(format!("{}%", like_escape(&search_text(v))))
                .escape('\\'),
        );
    }
    if let Some(v) = &f.name {
        let pattern = format!("%{}%", like_escape(&search_text(v)));
        q = q.filter(records_t::name_search.like(pattern).escape('\\'));
    }
    if let Some(d) = f.birth_date {
        q = q.filter(records_t::birth_date.eq(d.to_string()));
    }
    if let Some(s) = sex_str(f.sex) {
        q = q.filter(records_t::sex.eq(s));
    }
    if let Some(r) = &f.resident_id {
        q = q.filter(records_t::resident_id.eq(r.clone()));
    }
    if let Some((system, value)) = &f.identifier {
        q = q.filter(records_t::id_value.eq(value.clone()));
        if let Some(system) = system {
            q = q.filter(records_t::id_system.eq(system.clone()));
        }
    }
    if let Some(p) = &f.phone {
        // Any of the record's phones, through its `ph:` blocking key (the key index serves
        // the lookup; the phone column keeps only the first phone and has no index).
        q = q.filter(
            records_t::id.eq_any(
                keys_t::table
                    .filter(keys_t::key.eq(phone_key(p)))
                    .select(keys_t::record_id),
            ),
        );
    }
    let limit = if f.limit <= 0 { 100 } else { f.limit.min(1000) };
    let ids: Vec<String> = q
        .order(records_t::id.asc())
        .limit(limit)
        .offset(f.offset.max(0))
        .load(conn)?;
    load_records(conn, &ids)
}

/// An enterprise person with its linked records.
#[derive(Clone, Debug)]
pub struct Person {
    pub id: String,
    pub status: String,
    pub merged_into: Option<String>,
    pub version: i64,
    pub records: Vec<StoredRecord>,
    /// Institution level (e.g. `3A`) of each record's institution, by institution id.
    pub institution_levels: BTreeMap<String, String>,
}

pub fn get_person(conn: &mut DbConn, id: &str) -> Result<Person, EmpiError> {
    let (pid, status, merged_into, version): (String, String, Option<String>, i64) =
        persons_t::table
            .find(id)
            .select((
                persons_t::id,
                persons_t::status,
                persons_t::merged_into,
                persons_t::version,
            ))
            .first(conn)
            .optional()?
            .ok_or_else(|| EmpiError::NotFound(format!("person {id}")))?;
    let records = records_of_person(conn, id)?;
    let inst_ids: Vec<String> = records.iter().map(|r| r.institution_id.clone()).collect();
    let institution_levels = institutions::table
        .filter(institutions::id.eq_any(&inst_ids))
        .select((institutions::id, institutions::level))
        .load::<(String, String)>(conn)?
        .into_iter()
        .collect();
    Ok(Person {
        id: pid,
        status,
        merged_into,
        version,
        records,
        institution_levels,
    })
}

/// Golden record of a person, by the survivorship rules in docs/empi.md.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GoldenRecord {
    pub name: Option<String>,
    pub name_from: Option<String>,
    pub sex: Option<Sex>,
    pub birth_date: Option<NaiveDate>,
    pub resident_id: Option<String>,
    pub phone: Option<String>,
    pub address: Option<String>,
}

/// Rank of an institution level: `3A` (三级甲等) highest; unrated lowest.
fn level_rank(level: &str) -> (u8, u8) {
    let mut chars = level.chars();
    let grade = chars.next().and_then(|c| c.to_digit(10)).unwrap_or(0);
    let class = match chars.next() {
        Some('A') => 3,
        Some('B') => 2,
        Some('C') => 1,
        _ => 0,
    };
    (u8::try_from(grade).unwrap_or(0), class)
}

/// Survivorship: the trusted resident ID held by most records (ties: most recent); sex and
/// birth date from that ID when present, else from the most recent record that has them;
/// name from the highest-level institution's most recent record; phone and address from the
/// most recent record that has them.
pub fn golden_record(person: &Person) -> GoldenRecord {
    let mut recent: Vec<(&StoredRecord, PreparedRecord)> = person
        .records
        .iter()
        .map(|r| (r, prepare(&r.record)))
        .collect();
    recent.sort_by_key(|r| std::cmp::Reverse(r.0.updated_at));
    let mut ids: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (i, (_, p)) in recent.iter().enumerate() {
        if let Some(r) = p.resident_id.as_ref().filter(|r| r.trusted) {
            let e = ids.entry(r.number.clone()).or_insert((0, i));
            e.0 += 1;
        }
    }
    let resident = ids
        .iter()
        .max_by(|a, b| a.1.0.cmp(&b.1.0).then(b.1.1.cmp(&a.1.1)))
        .map(|(n, _)| n.clone());
    let id_info = resident.as_ref().and_then(|n| {
        recent
            .iter()
            .filter_map(|(_, p)| p.resident_id.as_ref())
            .find(|r| &r.number == n)
            .cloned()
    });
    let named = recent
        .iter()
        .filter(|(r, _)| !r.record.name.trim().is_empty())
        .max_by(|a, b| {
            let la = level_rank(
                person
                    .institution_levels
                    .get(&a.0.institution_id)
                    .map_or("", String::as_str),
            );
            let lb = level_rank(
                person
                    .institution_levels
                    .get(&b.0.institution_id)
                    .map_or("", String::as_str),
            );
            la.cmp(&lb).then(a.0.updated_at.cmp(&b.0.updated_at))
        });
    GoldenRecord {
        name: named.map(|(r, _)| r.record.name.clone()),
        name_from: named.map(|(r, _)| r.id.clone()),
        sex: id_info
            .as_ref()
            .and_then(|r| r.sex)
            .or_else(|| recent.iter().find_map(|(r, _)| r.record.sex)),
        birth_date: id_info
            .as_ref()
            .and_then(|r| r.birth_date)
            .or_else(|| recent.iter().find_map(|(r, _)| r.record.birth_date)),
        resident_id: resident,
        phone: recent.iter().find_map(|(_, p)| p.phones.first().cloned()),
        address: recent
            .iter()
            .find_map(|(_, p)| p.address.as_ref().map(|a| a.full.clone())),
    }
}
