//! Anomaly rules over the audit stream, the alerts they raise, and the flagged (VIP) patients.
//!
//! Exactly once across restarts and replicas: [`scan`] reads the records after the cursor
//! (`audit_alert_cursor`), evaluates the rules, inserts the alerts and moves the cursor in ONE
//! transaction that holds the cursor row's lock (PostgreSQL `FOR UPDATE`; SQLite's write lock).
//! A crash before commit leaves cursor and alerts untouched, so the batch is evaluated again;
//! alerts carry a unique `dedupe_key` (rule + subject + window), so a window that spans batches
//! raises one alert, not one per batch.
//!
//! `same-surname-address` compares the acting user (the `agent_user` a member institution
//! states with `X-Yiqiao-User`) through the staff roster ([`crate::practitioners`]) with every
//! source record linked to the accessed enterprise person now: surname and address keys equal
//! (normalised, see the practitioners module). The lookups are batched: one roster query and
//! one EMPI query per chunk of 500 agents or persons per scan batch, not one per event.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{Duration, NaiveDateTime, Timelike};
use diesel::AggregateExpressionMethods;
use diesel::prelude::*;
use serde::Serialize;
use serde_json::json;

use super::ADMIN_ON_BEHALF_USER;
use super::query::{self, StoredEvent};
use crate::empi::normalize::{NameScript, normalise_name};
use crate::empi::record::SourceRecord;
use crate::practitioners::{self, comparable, surname_key};
use crate::store::schema::{
    audit_alert_cursor, audit_alerts, audit_events, audit_flagged_patients, empi_links,
    empi_source_records,
};
use crate::store::{Audited, DbConn, StoreError, now_utc};

/// Purpose of use that is break-the-glass (HL7 v3 ActReason emergency treatment).
pub const BREAK_GLASS_PURPOSE: &str = "ETREAT";

/// Rule parameters (from the `[audit]` section). A threshold of 0 disables its rule.
#[derive(Debug, Clone)]
pub struct Rules {
    /// More than this many distinct patients read by one agent within the window.
    pub many_patients_threshold: u64,
    pub many_patients_window_secs: i64,
    /// Local hours [start, end) (wrapping midnight when start > end) count as unusual.
    /// start == end disables the rule.
    pub off_hours_start: u32,
    pub off_hours_end: u32,
    /// Local time = UTC + this many hours (China Standard Time: 8).
    pub utc_offset_hours: i32,
    /// At least this many break-the-glass accesses by one agent within the window.
    pub break_glass_threshold: u64,
    pub break_glass_window_secs: i64,
    /// At least this many refused requests by one agent (or unauthenticated) within the window.
    pub denials_threshold: u64,
    pub denials_window_secs: i64,
    /// Raise `same-surname-address` when a user on the institution's staff roster accesses a
    /// patient sharing their surname and address.
    pub same_surname_address: bool,
    /// New alerts wait for webhook delivery.
    pub webhook: bool,
}

/// A stored alert.
#[derive(Debug, Clone, Queryable, Serialize)]
pub struct Alert {
    pub id: String,
    /// many-patients | off-hours | break-the-glass | break-the-glass-frequent |
    /// flagged-patient | denials | same-surname-address
    pub rule: String,
    #[serde(skip)]
    pub dedupe_key: String,
    /// `institution` or `institution/user`; `unauthenticated` for refused anonymous requests.
    pub agent: Option<String>,
    pub patient_id: Option<String>,
    /// Chain positions of the first and last record that triggered it.
    pub first_seq: i64,
    pub last_seq: i64,
    /// JSON text: message and figures.
    pub detail: String,
    pub created_at: NaiveDateTime,
    /// open | acknowledged
    pub status: String,
    pub ack_by: Option<String>,
    pub ack_note: Option<String>,
    pub ack_at: Option<NaiveDateTime>,
    /// none | pending | delivered | failed
    pub webhook_state: String,
    pub webhook_attempts: i32,
    pub next_attempt_at: NaiveDateTime,
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = audit_alerts)]
struct NewAlert {
    id: String,
    rule: String,
    dedupe_key: String,
    agent: Option<String>,
    patient_id: Option<String>,
    first_seq: i64,
    last_seq: i64,
    detail: String,
    created_at: NaiveDateTime,
    status: String,
    webhook_state: String,
    webhook_attempts: i32,
    next_attempt_at: NaiveDateTime,
}

/// The agent an event is attributed to, as alerts name it.
fn agent_of(e: &StoredEvent) -> String {
    match (&e.agent_institution, &e.agent_user) {
        (Some(i), Some(u)) => format!("{i}/{u}"),
        (Some(i), None) => i.clone(),
        (None, Some(u)) => u.clone(),
        (None, None) => "unauthenticated".into(),
    }
}

fn in_off_hours(rules: &Rules, local_hour: u32) -> bool {
    let (s, e) = (rules.off_hours_start, rules.off_hours_end);
    if s == e {
        false
    } else if s < e {
        (s..e).contains(&local_hour)
    } else {
        local_hour >= s || local_hour < e
    }
}

struct Candidates<'a> {
    rules: &'a Rules,
    now: NaiveDateTime,
    by_key: BTreeMap<String, NewAlert>,
}

impl Candidates<'_> {
    fn add(
        &mut self,
        rule: &str,
        key: String,
        e: &StoredEvent,
        patient: Option<String>,
        detail: serde_json::Value,
    ) {
        if let Some(existing) = self.by_key.get_mut(&key) {
            existing.last_seq = existing.last_seq.max(e.seq);
            return;
        }
        self.by_key.insert(
            key.clone(),
            NewAlert {
                id: uuid::Uuid::now_v7().to_string(),
                rule: rule.into(),
                dedupe_key: key,
                agent: Some(agent_of(e)),
                patient_id: patient,
                first_seq: e.seq,
                last_seq: e.seq,
                detail: detail.to_string(),
                created_at: self.now,
                status: "open".into(),
                webhook_state: if self.rules.webhook {
                    "pending"
                } else {
                    "none"
                }
                .into(),
                webhook_attempts: 0,
                next_attempt_at: self.now,
            },
        );
    }
}

/// Count records of one agent in `(t - window, t]` matching `extra`.
fn count_in_window(
    conn: &mut DbConn,
    e: &StoredEvent,
    window_secs: i64,
    what: WindowCount,
) -> Result<i64, diesel::result::Error> {
    use audit_events as a;
    let t = e.recorded_at;
    let since = t - Duration::seconds(window_secs);
    let mut q = a::table
        .filter(a::recorded_at.gt(since))
        .filter(a::recorded_at.le(t))
        .into_boxed();
    q = match &e.agent_institution {
        Some(i) => q.filter(a::agent_institution.eq(i.clone())),
        None => q.filter(a::agent_institution.is_null()),
    };
    q = match &e.agent_user {
        Some(u) => q.filter(a::agent_user.eq(u.clone())),
        None => q.filter(a::agent_user.is_null()),
    };
    match what {
        WindowCount::DistinctPatients => q
            .filter(a::outcome.eq(super::outcome::SUCCESS))
            .filter(a::patient_id.is_not_null())
            .select(diesel::dsl::count(a::patient_id).aggregate_distinct())
            .first(conn),
        WindowCount::BreakGlass => q
            .filter(a::outcome.eq(super::outcome::SUCCESS))
            .filter(a::purpose_of_use.eq(BREAK_GLASS_PURPOSE))
            .count()
            .get_result(conn),
        WindowCount::Denials => q
            .filter(a::outcome.ne(super::outcome::SUCCESS))
            .count()
            .get_result(conn),
    }
}

fn to_diesel(e: StoreError) -> diesel::result::Error {
    match e {
        StoreError::Query(q) => q,
        other => diesel::result::Error::QueryBuilderError(Box::new(other)),
    }
}

/// (source record id, surname key, address key) of one EMPI source record.
type RecordKeys = (String, String, Option<String>);

/// The [`RecordKeys`] of every record linked to these enterprise persons now, by person. A
/// record's surname is its `family` column (the EMPI's normalised HumanName.family), else the
/// surname of a Han full name.
fn person_keys(
    conn: &mut DbConn,
    persons: &[String],
) -> Result<BTreeMap<String, Vec<RecordKeys>>, diesel::result::Error> {
    let mut out: BTreeMap<String, Vec<RecordKeys>> = BTreeMap::new();
    for chunk in persons.chunks(500) {
        let rows: Vec<(String, String, String, String)> = empi_links::table
            .inner_join(
                empi_source_records::table.on(empi_source_records::id.eq(empi_links::record_id)),
            )
            .filter(empi_links::person_id.eq_any(chunk))
            .select((
                empi_links::person_id,
                empi_source_records::id,
                empi_source_records::family,
                empi_source_records::record_json,
            ))
            .load(conn)?;
        for (person, record_id, family, json) in rows {
            let record: SourceRecord = match serde_json::from_str(&json) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(record = %record_id, cause = %e, "unreadable EMPI record skipped by the same-surname-address rule");
                    continue;
                }
            };
            let mut surname = surname_key(&family);
            if surname.is_empty() {
                let name = normalise_name(&record.name);
                if name.script == NameScript::Han {
                    surname = comparable(&name.surname);
                }
            }
            let address = record
                .address
                .as_deref()
                .map(comparable)
                .filter(|a| !a.is_empty());
            out.entry(person)
                .or_default()
                .push((record_id, surname, address));
        }
    }
    Ok(out)
}

/// The `same-surname-address` rule over one scan batch's accesses by named users.
fn same_surname_address(
    tx: &mut DbConn,
    c: &mut Candidates<'_>,
    accesses: &[&StoredEvent],
    offset: Duration,
) -> Result<(), diesel::result::Error> {
    let agents: Vec<(String, String)> = accesses
        .iter()
        .filter_map(|e| Some((e.agent_institution.clone()?, e.agent_user.clone()?)))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let roster = practitioners::keys_of(tx, &agents).map_err(to_diesel)?;
    // Only entries with both keys can match.
    let roster: BTreeMap<_, _> = roster
        .into_iter()
        .filter_map(|(k, (s, a))| Some((k, (s, a?))))
        .filter(|(_, (s, _))| !s.is_empty())
        .collect();
    if roster.is_empty() {
        return Ok(());
    }
    let lookup = |e: &StoredEvent| {
        let key = (e.agent_institution.clone()?, e.agent_user.clone()?);
        roster.get(&key)
    };
    let persons: Vec<String> = accesses
        .iter()
        .filter(|e| lookup(e).is_some())
        .filter_map(|e| e.patient_id.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let records = person_keys(tx, &persons)?;
    for e in accesses {
        let (Some((surname, address)), Some(patient)) = (lookup(e), &e.patient_id) else {
            continue;
        };
        let Some(matched) = records.get(patient).and_then(|rs| {
            rs.iter()
                .find(|(_, s, a)| s == surname && a.as_ref() == Some(address))
        }) else {
            continue;
        };
        let agent = agent_of(e);
        let day = (e.recorded_at + offset).format("%Y-%m-%d");
        c.add(
            "same-surname-address",
            format!("same-surname-address:{agent}:{patient}:{day}"),
            e,
            Some(patient.clone()),
            json!({
                "message": format!("{agent} accessed the records of patient {patient}, who shares the user's surname and address (staff roster entry and EMPI record Patient/{}): a relative, a neighbour or the user themself", matched.0),
                "patient_record": format!("Patient/{}", matched.0),
                "local_date": day.to_string(),
            }),
        );
    }
    Ok(())
}

/// A windowed rule: an agent's events of one kind counted in the window that ends at the
/// agent's last such event of the scan; an alert when the count reaches `min_count`. The
/// three rules differ only in this table's rows.
struct WindowRule {
    id: &'static str,
    count: WindowCount,
    /// 0: the rule is off.
    threshold: u64,
    /// The count that raises an alert (the threshold itself, or one above it for a rule that
    /// fires only when the threshold is exceeded).
    min_count: u64,
    window_secs: i64,
    /// The alert's message from the agent, the count, the window and the threshold.
    message: fn(&str, i64, i64, u64) -> String,
}

impl WindowRule {
    fn many_patients(rules: &Rules) -> WindowRule {
        WindowRule {
            id: "many-patients",
            count: WindowCount::DistinctPatients,
            threshold: rules.many_patients_threshold,
            min_count: rules.many_patients_threshold.saturating_add(1),
            window_secs: rules.many_patients_window_secs,
            message: |agent, n, w, threshold| {
                format!(
                    "{agent} accessed {n} distinct patients within {w} s (threshold {threshold})"
                )
            },
        }
    }

    fn break_glass(rules: &Rules) -> WindowRule {
        WindowRule {
            id: "break-the-glass-frequent",
            count: WindowCount::BreakGlass,
            threshold: rules.break_glass_threshold,
            min_count: rules.break_glass_threshold,
            window_secs: rules.break_glass_window_secs,
            message: |agent, n, w, threshold| {
                format!(
                    "{agent} used break-the-glass {n} times within {w} s (threshold {threshold})"
                )
            },
        }
    }

    fn denials(rules: &Rules) -> WindowRule {
        WindowRule {
            id: "denials",
            count: WindowCount::Denials,
            threshold: rules.denials_threshold,
            min_count: rules.denials_threshold,
            window_secs: rules.denials_window_secs,
            message: |agent, n, w, threshold| {
                format!("{n} refused requests by {agent} within {w} s (threshold {threshold})")
            },
        }
    }

    /// Evaluate the rule for each agent's last event (`last`), adding its alerts to `c`.
    fn raise(
        &self,
        tx: &mut DbConn,
        c: &mut Candidates<'_>,
        last: &BTreeMap<String, &StoredEvent>,
    ) -> Result<(), diesel::result::Error> {
        if self.threshold == 0 {
            return Ok(());
        }
        let w = self.window_secs;
        for (agent, e) in last {
            let n = count_in_window(tx, e, w, self.count)?;
            if n as u64 >= self.min_count {
                let bucket = e.recorded_at.and_utc().timestamp() / w.max(1);
                c.add(
                    self.id,
                    format!("{}:{agent}:{bucket}", self.id),
                    e,
                    None,
                    json!({"message": (self.message)(agent, n, w, self.threshold), "count": n, "window_secs": w}),
                );
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum WindowCount {
    DistinctPatients,
    BreakGlass,
    Denials,
}

/// What one scan did.
#[derive(Debug, Clone, Default)]
pub struct ScanOutcome {
    /// Records evaluated.
    pub evaluated: usize,
    /// Alerts raised (new ones only).
    pub raised: Vec<String>,
    /// The cursor after the scan.
    pub cursor: i64,
}

fn lock_cursor(tx: &mut DbConn) -> Result<i64, diesel::result::Error> {
    match tx {
        DbConn::Postgresql(pg) => audit_alert_cursor::table
            .find(1)
            .select(audit_alert_cursor::last_seq)
            .for_update()
            .first(pg),
        DbConn::Sqlite(_) => {
            // Take the write lock before reading (a deferred transaction cannot wait for it).
            diesel::update(audit_alert_cursor::table.find(1))
                .set(audit_alert_cursor::last_seq.eq(audit_alert_cursor::last_seq))
                .execute(tx)?;
            audit_alert_cursor::table
                .find(1)
                .select(audit_alert_cursor::last_seq)
                .first(tx)
        }
    }
}

/// Evaluate the rules over up to `batch` records after the cursor; see the module docs.
///
/// PostgreSQL: in one transaction holding the cursor row (scanners of several replicas take
/// turns). SQLite has one writer for the whole database — the audit writer, committing every
/// data request's record — so the records are evaluated on a read snapshot (a WAL reader
/// blocks no writer) and the write lock is taken only to store the alerts and move the
/// cursor, and only if no other scanner moved it meanwhile (else nothing is stored and the
/// next round evaluates again).
pub fn scan(conn: &mut DbConn, rules: &Rules, batch: i64) -> Result<ScanOutcome, StoreError> {
    if matches!(conn, DbConn::Postgresql(_)) {
        return crate::store::write_tx::<_, diesel::result::Error>(conn, |tx| {
            let cursor = lock_cursor(tx)?;
            match evaluate(tx, rules, batch, cursor)? {
                Some(found) => store_found(tx, found),
                None => Ok(ScanOutcome {
                    cursor,
                    ..ScanOutcome::default()
                }),
            }
        })
        .map_err(StoreError::from_diesel);
    }
    let (cursor, found) = conn
        .transaction::<_, diesel::result::Error, _>(|tx| {
            let cursor: i64 = audit_alert_cursor::table
                .find(1)
                .select(audit_alert_cursor::last_seq)
                .first(tx)?;
            Ok((cursor, evaluate(tx, rules, batch, cursor)?))
        })
        .map_err(StoreError::from_diesel)?;
    let Some(found) = found else {
        return Ok(ScanOutcome {
            cursor,
            ..ScanOutcome::default()
        });
    };
    crate::store::write_tx::<_, diesel::result::Error>(conn, |tx| {
        let now = lock_cursor(tx)?;
        if now != cursor {
            return Ok(ScanOutcome {
                cursor: now,
                ..ScanOutcome::default()
            });
        }
        store_found(tx, found)
    })
    .map_err(StoreError::from_diesel)
}

/// What one evaluation found: how many records, the last one's position, the alerts.
struct Found {
    evaluated: usize,
    last: i64,
    alerts: BTreeMap<String, NewAlert>,
}

/// The rules over up to `batch` records after `cursor` (reads only); `None` when there are none.
fn evaluate(
    tx: &mut DbConn,
    rules: &Rules,
    batch: i64,
    cursor: i64,
) -> Result<Option<Found>, diesel::result::Error> {
    let events = query::after_seq(tx, cursor, batch).map_err(to_diesel)?;
    let Some(last) = events.last().map(|e| e.seq) else {
        return Ok(None);
    };
    let flagged: BTreeSet<String> = audit_flagged_patients::table
        .select(audit_flagged_patients::patient_id)
        .load::<String>(tx)?
        .into_iter()
        .collect();
    let mut c = Candidates {
        rules,
        now: now_utc(),
        by_key: BTreeMap::new(),
    };
    let offset = Duration::hours(i64::from(rules.utc_offset_hours));
    // Last event per agent (successful data access / refusal) for the windowed rules.
    let mut last_access: BTreeMap<String, &StoredEvent> = BTreeMap::new();
    let mut last_btg: BTreeMap<String, &StoredEvent> = BTreeMap::new();
    let mut last_denial: BTreeMap<String, &StoredEvent> = BTreeMap::new();
    // Accesses by a named user of an institution (same-surname-address).
    let mut by_user: Vec<&StoredEvent> = Vec::new();
    for e in &events {
        let agent = agent_of(e);
        let local = e.recorded_at + offset;
        let day = local.format("%Y-%m-%d");
        if e.outcome != super::outcome::SUCCESS {
            last_denial.insert(agent, e);
            continue;
        }
        // Data access by an institution (staff changes such as flagging are not accesses).
        let (Some(patient), Some(_)) = (&e.patient_id, &e.agent_institution) else {
            continue;
        };
        last_access.insert(agent.clone(), e);
        if rules.same_surname_address
            && e.agent_user
                .as_deref()
                .is_some_and(|u| u != ADMIN_ON_BEHALF_USER)
        {
            by_user.push(e);
        }
        if in_off_hours(rules, local.hour()) {
            c.add(
                "off-hours",
                format!("off-hours:{agent}:{day}"),
                e,
                None,
                json!({"message": format!("{agent} accessed patient records at {} local time, outside {:02}:00–{:02}:00", local.format("%H:%M"), rules.off_hours_end, rules.off_hours_start), "local_date": day.to_string()}),
            );
        }
        if flagged.contains(patient) {
            c.add(
                "flagged-patient",
                format!("flagged-patient:{agent}:{patient}:{day}"),
                e,
                Some(patient.clone()),
                json!({"message": format!("{agent} accessed the records of flagged patient {patient}")}),
            );
        }
        if e.purpose_of_use.as_deref() == Some(BREAK_GLASS_PURPOSE) {
            c.add(
                "break-the-glass",
                format!("break-the-glass:{}", e.seq),
                e,
                Some(patient.clone()),
                json!({"message": format!("{agent} used break-the-glass (ETREAT) for patient {patient}: review required")}),
            );
            last_btg.insert(agent.clone(), e);
        }
    }
    if !by_user.is_empty() {
        same_surname_address(tx, &mut c, &by_user, offset)?;
    }
    for (rule, last) in [
        (WindowRule::many_patients(rules), &last_access),
        (WindowRule::break_glass(rules), &last_btg),
        (WindowRule::denials(rules), &last_denial),
    ] {
        rule.raise(tx, &mut c, last)?;
    }
    Ok(Some(Found {
        evaluated: events.len(),
        last,
        alerts: c.by_key,
    }))
}

/// Store the new alerts of an evaluation (those not raised before) and move the cursor.
fn store_found(tx: &mut DbConn, found: Found) -> Result<ScanOutcome, diesel::result::Error> {
    let mut raised = Vec::new();
    for (key, alert) in found.alerts {
        let exists: bool = diesel::select(diesel::dsl::exists(
            audit_alerts::table.filter(audit_alerts::dedupe_key.eq(&key)),
        ))
        .get_result(tx)?;
        if exists {
            continue;
        }
        diesel::insert_into(audit_alerts::table)
            .values(&alert)
            .execute(tx)?;
        raised.push(alert.id);
    }
    diesel::update(audit_alert_cursor::table.find(1))
        .set((
            audit_alert_cursor::last_seq.eq(found.last),
            audit_alert_cursor::updated_at.eq(now_utc()),
        ))
        .execute(tx)?;
    Ok(ScanOutcome {
        evaluated: found.evaluated,
        raised,
        cursor: found.last,
    })
}

/// Alerts, newest first.
pub fn list(
    conn: &mut DbConn,
    status: Option<&str>,
    rule: Option<&str>,
    limit: i64,
    offset: i64,
) -> Result<Vec<Alert>, StoreError> {
    let mut q = audit_alerts::table.into_boxed();
    if let Some(s) = status {
        q = q.filter(audit_alerts::status.eq(s.to_string()));
    }
    if let Some(r) = rule {
        q = q.filter(audit_alerts::rule.eq(r.to_string()));
    }
    q.order((audit_alerts::created_at.desc(), audit_alerts::id.desc()))
        .limit(limit)
        .offset(offset)
        .load(conn)
        .map_err(StoreError::from_diesel)
}

/// Every alert about one of these chain positions' break-the-glass records (report).
pub fn break_glass_reviews(
    conn: &mut DbConn,
    seqs: &[i64],
) -> Result<BTreeMap<i64, Alert>, StoreError> {
    let mut out = BTreeMap::new();
    for chunk in seqs.chunks(500) {
        let rows: Vec<Alert> = audit_alerts::table
            .filter(audit_alerts::rule.eq("break-the-glass"))
            .filter(audit_alerts::first_seq.eq_any(chunk.to_vec()))
            .load(conn)
            .map_err(StoreError::from_diesel)?;
        for a in rows {
            out.insert(a.first_seq, a);
        }
    }
    Ok(out)
}

/// Why an acknowledgement was refused.
#[derive(Debug, thiserror::Error)]
pub enum AckError {
    #[error("alert {0} not found")]
    NotFound(String),
    #[error("alert {0} was already acknowledged by {1}")]
    Already(String, String),
    #[error(transparent)]
    Db(#[from] diesel::result::Error),
}

/// Acknowledge an open alert with a note.
pub fn acknowledge(
    tx: &mut Audited<'_>,
    id: &str,
    by: &str,
    note: &str,
) -> Result<Alert, AckError> {
    let conn = tx.conn();
    let alert: Alert = audit_alerts::table
        .find(id)
        .first(conn)
        .optional()?
        .ok_or_else(|| AckError::NotFound(id.to_string()))?;
    if alert.status != "open" {
        return Err(AckError::Already(
            id.to_string(),
            alert.ack_by.unwrap_or_default(),
        ));
    }
    let now = now_utc();
    let n = diesel::update(
        audit_alerts::table
            .find(id)
            .filter(audit_alerts::status.eq("open")),
    )
    .set((
        audit_alerts::status.eq("acknowledged"),
        audit_alerts::ack_by.eq(by),
        audit_alerts::ack_note.eq(note),
        audit_alerts::ack_at.eq(now),
    ))
    .execute(conn)?;
    if n != 1 {
        return Err(AckError::Already(id.to_string(), "another auditor".into()));
    }
    Ok(audit_alerts::table.find(id).first(conn)?)
}

/// Alerts whose webhook delivery is due, claimed for `lease` (another replica will not pick
/// them up until the lease ends).
pub fn claim_deliveries(
    conn: &mut DbConn,
    limit: i64,
    lease: Duration,
) -> Result<Vec<Alert>, StoreError> {
    let now = now_utc();
    let due: Vec<Alert> = audit_alerts::table
        .filter(audit_alerts::webhook_state.eq("pending"))
        .filter(audit_alerts::next_attempt_at.le(now))
        .order(audit_alerts::next_attempt_at.asc())
        .limit(limit)
        .load(conn)
        .map_err(StoreError::from_diesel)?;
    let mut claimed = Vec::new();
    for a in due {
        let n = diesel::update(
            audit_alerts::table
                .find(&a.id)
                .filter(audit_alerts::next_attempt_at.eq(a.next_attempt_at))
                .filter(audit_alerts::webhook_state.eq("pending")),
        )
        .set(audit_alerts::next_attempt_at.eq(now + lease))
        .execute(conn)
        .map_err(StoreError::from_diesel)?;
        if n == 1 {
            claimed.push(a);
        }
    }
    Ok(claimed)
}

/// Record a delivery attempt: delivered, or retry at `retry_at` (None: give up, `failed`).
pub fn delivery_result(
    conn: &mut DbConn,
    id: &str,
    delivered: bool,
    retry_at: Option<NaiveDateTime>,
) -> Result<(), StoreError> {
    let state = match (delivered, retry_at) {
        (true, _) => "delivered",
        (false, Some(_)) => "pending",
        (false, None) => "failed",
    };
    diesel::update(audit_alerts::table.find(id))
        .set((
            audit_alerts::webhook_state.eq(state),
            audit_alerts::webhook_attempts.eq(audit_alerts::webhook_attempts + 1),
            audit_alerts::next_attempt_at.eq(retry_at.unwrap_or_else(now_utc)),
        ))
        .execute(conn)
        .map_err(StoreError::from_diesel)?;
    Ok(())
}

/// A flagged (VIP) patient.
#[derive(Debug, Clone, Queryable, Serialize)]
pub struct FlaggedPatient {
    pub patient_id: String,
    pub note: String,
    pub flagged_by: String,
    pub flagged_at: NaiveDateTime,
}

pub fn flagged(conn: &mut DbConn) -> Result<Vec<FlaggedPatient>, diesel::result::Error> {
    audit_flagged_patients::table
        .order(audit_flagged_patients::patient_id.asc())
        .load(conn)
}

/// Flag (or re-note) a patient.
pub fn flag(
    tx: &mut Audited<'_>,
    patient: &str,
    note: &str,
    by: &str,
) -> Result<FlaggedPatient, diesel::result::Error> {
    let conn = tx.conn();
    let row = FlaggedPatient {
        patient_id: patient.into(),
        note: note.into(),
        flagged_by: by.into(),
        flagged_at: now_utc(),
    };
    diesel::delete(audit_flagged_patients::table.find(patient)).execute(conn)?;
    diesel::insert_into(audit_flagged_patients::table)
        .values((
            audit_flagged_patients::patient_id.eq(&row.patient_id),
            audit_flagged_patients::note.eq(&row.note),
            audit_flagged_patients::flagged_by.eq(&row.flagged_by),
            audit_flagged_patients::flagged_at.eq(row.flagged_at),
        ))
        .execute(conn)?;
    Ok(row)
}

/// Remove a flag; false when the patient was not flagged.
pub fn unflag(tx: &mut Audited<'_>, patient: &str) -> Result<bool, diesel::result::Error> {
    let conn = tx.conn();
    Ok(diesel::delete(audit_flagged_patients::table.find(patient)).execute(conn)? == 1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::audit::{AppendOptions, AuditEvent, AuditSigner, PreparedEvent, append_batch};

    fn rules(start: u32, end: u32) -> Rules {
        Rules {
            many_patients_threshold: 0,
            many_patients_window_secs: 60,
            off_hours_start: start,
            off_hours_end: end,
            utc_offset_hours: 8,
            break_glass_threshold: 0,
            break_glass_window_secs: 60,
            denials_threshold: 0,
            denials_window_secs: 60,
            same_surname_address: false,
            webhook: false,
        }
    }

    /// Register a patient of hosp-001; returns the enterprise person id.
    fn patient(conn: &mut DbConn, mrn: &str, name: &str, born: u32, address: &str) -> String {
        use crate::empi::record::RecordId;
        use crate::empi::store::{self as empi, Registration};
        let (family, given) = crate::empi::normalize::split_han_name(name);
        let reg = Registration {
            institution_id: "hosp-001".into(),
            id_system: "urn:oid:2.16.156.10011.1.99.1".into(),
            id_value: mrn.into(),
            record: SourceRecord {
                record_id: RecordId(0),
                institution: "hosp-001".into(),
                name: name.into(),
                sex: None,
                birth_date: chrono::NaiveDate::from_ymd_opt(
                    1940 + born as i32,
                    born % 12 + 1,
                    born % 28 + 1,
                ),
                identifiers: vec![],
                address: Some(address.into()),
            },
            family,
            given,
            resource: json!({ "resourceType": "Patient", "id": mrn }),
        };
        let done = empi::register(&mut Audited::unaudited(conn), &reg, "test").unwrap();
        done.record.link.unwrap().person_id
    }

    fn access(inst: &str, user: Option<&str>, person: &str, outcome: &str) -> PreparedEvent {
        let mut e = AuditEvent::rest("read", "R", "test");
        e.agent_institution = Some(inst.into());
        e.agent_user = user.map(String::from);
        e.patient_id = Some(person.into());
        e.purpose_of_use = Some("TREAT".into());
        e.outcome = outcome.into();
        PreparedEvent::new(e)
    }

    /// One alert per agent, patient and day when a rostered user reads a patient with the same
    /// surname and address (any linked record); none for another address or surname, users
    /// not on the roster, other institutions, refusals, or with the rule off.
    fn same_surname_address_rule(backend: crate::Backend) {
        use crate::practitioners::tests::{institution, staff};
        use crate::practitioners::{Allowed, upsert};
        let db = crate::store::testdb::TestStore::new(backend);
        let mut conn = db.store.conn().unwrap();
        institution(&mut conn, 1);
        institution(&mut conn, 2);
        let all = Allowed {
            create: true,
            change: true,
        };
        upsert(
            &mut Audited::unaudited(&mut conn),
            &staff(
                1,
                "D001",
                "王",
                Some("福建省福州市鼓楼区 五四路８８号－３０１室"),
            ),
            all,
        )
        .unwrap();
        upsert(
            &mut Audited::unaudited(&mut conn),
            &staff(1, "D002", "王", None),
            all,
        )
        .unwrap();
        let same = patient(
            &mut conn,
            "MR-1",
            "王芳",
            15,
            "福建省福州市鼓楼区五四路88号301室",
        );
        let moved = patient(
            &mut conn,
            "MR-2",
            "王强",
            33,
            "福建省福州市鼓楼区五四路88号302室",
        );
        let other = patient(
            &mut conn,
            "MR-3",
            "李娜",
            47,
            "福建省福州市鼓楼区五四路88号301室",
        );
        let signer = AuditSigner::new(&yiqiao_sm::Sm2PrivateKey::generate().unwrap()).unwrap();
        let opts = AppendOptions {
            checkpoint_every: 1000,
            force_checkpoint: false,
        };
        let batch = vec![
            access("hosp-001", Some("D001"), &same, "0"),
            access("hosp-001", Some("D001"), &same, "0"),
            access("hosp-001", Some("D001"), &moved, "0"),
            access("hosp-001", Some("D001"), &other, "0"),
            access("hosp-001", Some("D002"), &same, "0"),
            access("hosp-001", Some("D404"), &same, "0"),
            access("hosp-002", Some("D001"), &same, "0"),
            access("hosp-001", None, &same, "0"),
            access("hosp-001", Some("admin-token"), &same, "0"),
            access("hosp-001", Some("D001"), &same, "4"),
        ];
        append_batch(&mut conn, &batch, &signer, opts).unwrap();
        let mut off = rules(0, 0);
        let done = scan(&mut conn, &off, 100).unwrap();
        assert!(done.raised.is_empty(), "the rule is off");
        // Again with the rule on, over the same records (cursor moved back).
        diesel::update(audit_alert_cursor::table.find(1))
            .set(audit_alert_cursor::last_seq.eq(done.cursor - batch.len() as i64))
            .execute(&mut conn)
            .unwrap();
        off.same_surname_address = true;
        let done = scan(&mut conn, &off, 100).unwrap();
        assert_eq!(done.raised.len(), 1);
        let got = list(&mut conn, None, Some("same-surname-address"), 10, 0).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].agent.as_deref(), Some("hosp-001/D001"));
        assert_eq!(got[0].patient_id.as_deref(), Some(same.as_str()));
        assert!(
            got[0]
                .detail
                .contains("shares the user's surname and address")
        );
        // Another batch the same day: the same agent and patient raise nothing new.
        append_batch(
            &mut conn,
            &[access("hosp-001", Some("D001"), &same, "0")],
            &signer,
            opts,
        )
        .unwrap();
        assert!(scan(&mut conn, &off, 100).unwrap().raised.is_empty());
        assert_eq!(list(&mut conn, None, None, 10, 0).unwrap().len(), 1);
    }

    crate::store::testdb::on_both_backends!(same_surname_address_rule);

    /// SQLite: a scan evaluates on a read snapshot and takes the database's one write lock
    /// only to store what it found, so it never makes the audit writer wait while it reads.
    /// With another connection holding the write lock (the audit writer mid-commit) and no
    /// waiting allowed, a scan with nothing to store succeeds; one that took the lock first
    /// failed with "database is locked".
    #[test]
    fn sqlite_scan_evaluates_without_the_write_lock() {
        use diesel::connection::SimpleConnection;
        let db = crate::store::testdb::TestStore::new(crate::Backend::Sqlite);
        let mut writer = db.store.conn().unwrap();
        let mut scanner = db.store.conn().unwrap();
        scanner.batch_execute("PRAGMA busy_timeout = 0").unwrap();
        writer.batch_execute("BEGIN IMMEDIATE").unwrap();
        let out = scan(&mut scanner, &rules(0, 0), 100).unwrap();
        assert_eq!((out.evaluated, out.cursor), (0, 0));
        writer.batch_execute("ROLLBACK").unwrap();
    }

    #[test]
    fn off_hours_wrap_midnight() {
        let r = rules(22, 6);
        assert!(in_off_hours(&r, 23) && in_off_hours(&r, 0) && in_off_hours(&r, 5));
        assert!(!in_off_hours(&r, 6) && !in_off_hours(&r, 12) && !in_off_hours(&r, 21));
        let day = rules(9, 17);
        assert!(in_off_hours(&day, 9) && !in_off_hours(&day, 17));
        assert!(!in_off_hours(&rules(0, 0), 3));
    }
}
