#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::empi::synth::{PopulationConfig, generate};
use crate::store::Backend;
use crate::store::testdb::TestStore;

fn add_institutions(conn: &mut DbConn, records: &[SourceRecord]) {
    let ids: BTreeSet<&str> = records.iter().map(|r| r.institution.as_str()).collect();
    let now = now_utc();
    for (n, id) in ids.into_iter().enumerate() {
        diesel::insert_into(institutions::table)
            .values((
                institutions::id.eq(id),
                institutions::name.eq(format!("test {id}")),
                institutions::uscc.eq(format!("91350100MA{n:08}")),
                institutions::region_code.eq("350100"),
                institutions::level.eq("3A"),
                institutions::kind.eq("hospital"),
                institutions::jwks.eq("{\"keys\":[]}"),
                institutions::sm2_keys.eq("[]"),
                institutions::patient_id_system.eq(format!("urn:test:{id}")),
                institutions::allowed_scopes.eq(""),
                institutions::require_sm_envelope.eq(false),
                institutions::status.eq("active"),
                institutions::version.eq(1i64),
                institutions::created_at.eq(now),
                institutions::updated_at.eq(now),
            ))
            .execute(conn)
            .unwrap();
    }
}

fn registrations(records: &[SourceRecord]) -> Vec<Registration> {
    records
        .iter()
        .map(|r| Registration {
            institution_id: r.institution.clone(),
            id_system: format!("urn:test:{}", r.institution),
            id_value: r.record_id.0.to_string(),
            record: r.clone(),
            family: String::new(),
            given: String::new(),
            resource: serde_json::json!({ "resourceType": "Patient" }),
        })
        .collect()
}

/// Everything matching decided, keyed by identifiers (record and person ids differ between
/// stores): the persons as sets of identifiers with their versions, each link's score
/// and decider, the open review pairs, event kinds and data-quality issues.
#[derive(Debug, PartialEq)]
struct Decided {
    persons: BTreeSet<(BTreeSet<String>, i64)>,
    links: BTreeMap<String, (Option<String>, String)>,
    reviews: BTreeSet<(String, String, String)>,
    events: BTreeMap<String, usize>,
    issues: BTreeSet<(String, String)>,
}

fn decided(conn: &mut DbConn) -> Decided {
    let records: Vec<(String, String, String)> = records_t::table
        .select((records_t::id, records_t::id_system, records_t::id_value))
        .load(conn)
        .unwrap();
    let ident: HashMap<String, String> = records
        .into_iter()
        .map(|(id, s, v)| (id, format!("{s}|{v}")))
        .collect();
    let links: Vec<LinkRow> = links_t::table
        .select(LinkRow::as_select())
        .load(conn)
        .unwrap();
    let versions: HashMap<String, i64> = persons_t::table
        .select((persons_t::id, persons_t::version))
        .load(conn)
        .unwrap()
        .into_iter()
        .collect();
    let mut groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut by_record = BTreeMap::new();
    for l in &links {
        groups
            .entry(l.person_id.clone())
            .or_default()
            .insert(ident[&l.record_id].clone());
        by_record.insert(
            ident[&l.record_id].clone(),
            (l.score.map(|s| format!("{s:.9}")), l.decided_by.clone()),
        );
    }
    let reviews: Vec<(String, String, f64, String)> = review_t::table
        .select((
            review_t::record_a,
            review_t::record_b,
            review_t::score,
            review_t::status,
        ))
        .load(conn)
        .unwrap();
    let mut events = BTreeMap::new();
    for kind in events_t::table
        .select(events_t::kind)
        .load::<String>(conn)
        .unwrap()
    {
        *events.entry(kind).or_insert(0) += 1;
    }
    Decided {
        persons: groups
            .into_iter()
            .map(|(p, members)| (members, versions[&p]))
            .collect(),
        links: by_record,
        reviews: reviews
            .into_iter()
            .map(|(a, b, score, status)| {
                let (a, b) = pair(&ident[&a], &ident[&b]);
                (a, format!("{b} {score:.9}"), status)
            })
            .collect(),
        events,
        issues: issues_t::table
            .select((issues_t::record_id, issues_t::issue))
            .load::<(String, String)>(conn)
            .unwrap()
            .into_iter()
            .map(|(r, i)| (ident[&r].clone(), i))
            .collect(),
    }
}

/// The set-based batch path decides exactly what one-by-one registration decides: the
/// same persons, link scores, review items, events and issues for a synthetic population
/// with typos, homophones, twins and missing IDs; and batches that contain a stored or
/// repeated identifier, or a refused record, still behave as before.
fn batch_equals_one_by_one(backend: Backend) {
    let pop = generate(&PopulationConfig::new(1_200, 7));
    let regs = registrations(&pop.records);

    let one = TestStore::new(backend);
    let mut a = one.store.conn().unwrap();
    add_institutions(&mut a, &pop.records);
    for reg in &regs {
        register(&mut Audited::unaudited(&mut a), reg, "test").unwrap();
    }

    let set = TestStore::new(backend);
    let mut b = set.store.conn().unwrap();
    add_institutions(&mut b, &pop.records);
    for chunk in regs.chunks(250) {
        let refs: Vec<&Registration> = chunk.iter().collect();
        // The set-based path itself (register_batch would fall back silently).
        let out = write_transaction(&mut b, |c| {
            let (_, model) = current_model(c)?;
            register_new_set(c, &refs, "test", &model)
        })
        .unwrap()
        .expect("all new: the set-based path registers the batch");
        assert!(
            out.iter()
                .all(|o| matches!(o, Ok(RegistrationOutcome::Created)))
        );
    }
    let expected = decided(&mut a);
    assert!(expected.persons.len() < regs.len(), "some records linked");
    assert!(!expected.reviews.is_empty(), "some pairs queued for review");
    assert_eq!(decided(&mut b), expected);

    // A batch with stored identifiers goes one by one: unchanged, nothing new.
    let again: Vec<&Registration> = regs.iter().take(20).collect();
    let out = register_batch(&mut Audited::unaudited(&mut b), &again, "test").unwrap();
    assert!(
        out.iter()
            .all(|o| matches!(o, Ok(RegistrationOutcome::Unchanged)))
    );
    assert_eq!(decided(&mut b), expected);

    // A refused record inside a new batch: refused alone, the others created.
    let extra = generate(&PopulationConfig::new(30, 99));
    let mut fresh = registrations(&extra.records);
    for r in &mut fresh {
        r.id_system = format!("{}:extra", r.id_system);
    }
    fresh[3].institution_id = "someone-else".into();
    let refs: Vec<&Registration> = fresh.iter().collect();
    let out = register_batch(&mut Audited::unaudited(&mut b), &refs, "test").unwrap();
    assert!(matches!(
        out[3],
        Err(EmpiError::Invalid {
            field: "institution",
            ..
        })
    ));
    assert_eq!(
        out.iter()
            .filter(|o| matches!(o, Ok(RegistrationOutcome::Created)))
            .count(),
        29
    );
    // An identifier twice in one batch: the second is an update of the first (one by one).
    let twice = [&fresh[0], &fresh[0]];
    let before = decided(&mut b);
    let out = register_batch(&mut Audited::unaudited(&mut b), &twice, "test").unwrap();
    assert!(
        out.iter()
            .all(|o| matches!(o, Ok(RegistrationOutcome::Unchanged)))
    );
    assert_eq!(decided(&mut b), before);
}

/// A telecom search finds a record by any of its phones (through the `ph:` keys), not
/// only by the first one the phone column keeps.
fn phone_search_finds_any_of_a_records_phones(backend: Backend) {
    use crate::empi::ident::IdentifierKind;
    use crate::empi::record::Identifier;
    let test = TestStore::new(backend);
    let mut conn = test.store.conn().unwrap();
    let mut record = generate(&PopulationConfig::new(1, 3)).records.remove(0);
    record
        .identifiers
        .retain(|i| i.kind != IdentifierKind::Phone);
    for phone in ["13800138000", "0591-87654321"] {
        record.identifiers.push(Identifier {
            kind: IdentifierKind::Phone,
            value: phone.into(),
        });
    }
    add_institutions(&mut conn, std::slice::from_ref(&record));
    let reg = registrations(std::slice::from_ref(&record)).remove(0);
    register(&mut Audited::unaudited(&mut conn), &reg, "test").unwrap();
    let prepared = prepare(&record);
    assert_eq!(prepared.phones.len(), 2, "{:?}", prepared.phones);
    for phone in &prepared.phones {
        let found = search_records(
            &mut conn,
            &RecordFilter {
                phone: Some(phone.clone()),
                ..RecordFilter::default()
            },
        )
        .unwrap();
        assert_eq!(found.len(), 1, "phone {phone}");
        assert_eq!(found[0].id_value, reg.id_value);
    }
    let none = search_records(
        &mut conn,
        &RecordFilter {
            phone: Some("13900000000".into()),
            ..RecordFilter::default()
        },
    )
    .unwrap();
    assert!(none.is_empty());
}

#[test]
fn phone_search_finds_any_of_a_records_phones_sqlite() {
    phone_search_finds_any_of_a_records_phones(Backend::Sqlite);
}

#[test]
fn phone_search_finds_any_of_a_records_phones_postgres() {
    phone_search_finds_any_of_a_records_phones(Backend::Postgres);
}

/// The records of one fresh population, registered as new (all `Created`) in one batch.
fn register_all_new(conn: &mut DbConn, regs: &[Registration]) {
    let refs: Vec<&Registration> = regs.iter().collect();
    let out = register_batch(&mut Audited::unaudited(conn), &refs, "test").unwrap();
    assert!(
        out.iter()
            .all(|o| matches!(o, Ok(RegistrationOutcome::Created)))
    );
}

/// A batch far larger than the PostgreSQL lock table could hold as per-key locks
/// (`max_locks_per_transaction` × connections; ~7 locks a record; without the writers'
/// lock this fails with "out of shared memory") registers: such batches hold the one
/// writers' lock instead.
fn large_batches_fit_the_lock_table(backend: Backend) {
    let test = TestStore::new(backend);
    let mut conn = test.store.conn().unwrap();
    let records = match &mut *conn {
        DbConn::Postgresql(pg) => {
            #[derive(QueryableByName)]
            struct Slots {
                #[diesel(sql_type = diesel::sql_types::BigInt)]
                n: i64,
            }
            let slots: Slots = diesel::sql_query(
                "SELECT current_setting('max_locks_per_transaction')::bigint * \
                 (current_setting('max_connections')::bigint + \
                  current_setting('max_prepared_transactions')::bigint) AS n",
            )
            .get_result(pg)
            .unwrap();
            // ≥ 6 keys and 1 identifier a record: about 7 locks per slot (1/3 of that
            // still fitted in the table's spare shared memory; this does not).
            usize::try_from(slots.n).unwrap()
        }
        DbConn::Sqlite(_) => 6_400,
    };
    let pop = generate(&PopulationConfig::new(records, 5));
    add_institutions(&mut conn, &pop.records);
    let regs = registrations(&pop.records);
    register_all_new(&mut conn, &regs);
    let stored: i64 = records_t::table.count().get_result(&mut *conn).unwrap();
    assert_eq!(stored, i64::try_from(regs.len()).unwrap());
}

#[test]
fn large_batches_fit_the_lock_table_sqlite() {
    large_batches_fit_the_lock_table(Backend::Sqlite);
}

#[test]
fn large_batches_fit_the_lock_table_postgres() {
    large_batches_fit_the_lock_table(Backend::Postgres);
}

/// While a bulk batch (which takes no per-key locks) is uncommitted, a registration of
/// the same person from another institution waits for it, and then links to its record
/// instead of making a second person from a view without the batch.
fn a_registration_waits_for_an_uncommitted_bulk_batch(backend: Backend) {
    let test = TestStore::new(backend);
    let pop = generate(&PopulationConfig::new(EXCLUSIVE_BATCH + 50, 13));
    let mut setup = test.store.conn().unwrap();
    add_institutions(&mut setup, &pop.records);
    let regs = registrations(&pop.records);
    // The first record again, exactly, as registered by another institution.
    let mut twin = regs[0].clone();
    let other = regs
        .iter()
        .find(|r| r.institution_id != twin.institution_id)
        .unwrap()
        .institution_id
        .clone();
    twin.record.institution.clone_from(&other);
    twin.institution_id.clone_from(&other);
    twin.record.record_id = RecordId(u64::MAX);
    twin.id_system = format!("urn:test:{other}");
    twin.id_value = "twin-of-first".into();
    let (started_tx, started) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let store = &test.store;
        let regs = &regs;
        scope.spawn(move || {
            let mut a = store.conn().unwrap();
            crate::store::write_tx(&mut a, |c| -> Result<(), EmpiError> {
                let refs: Vec<&Registration> = regs.iter().collect();
                register_batch(&mut Audited::unaudited(c), &refs, "bulk")?;
                started_tx.send(()).unwrap();
                // Long enough for the other registration to finish if it did not wait.
                std::thread::sleep(std::time::Duration::from_millis(800));
                Ok(())
            })
            .unwrap();
        });
        started.recv().unwrap();
        let mut b = store.conn().unwrap();
        register(&mut Audited::unaudited(&mut b), &twin, "feed").unwrap();
    });
    let person_of = |conn: &mut DbConn, system: &str, value: &str| -> String {
        let id = find_by_identifier(conn, system, value).unwrap().unwrap().id;
        load_link(conn, &id).unwrap().unwrap().person_id
    };
    assert_eq!(
        person_of(&mut setup, &twin.id_system, &twin.id_value),
        person_of(&mut setup, &regs[0].id_system, &regs[0].id_value),
        "the registration saw the committed batch and linked to its record"
    );
}

#[test]
fn a_registration_waits_for_an_uncommitted_bulk_batch_sqlite() {
    a_registration_waits_for_an_uncommitted_bulk_batch(Backend::Sqlite);
}

#[test]
fn a_registration_waits_for_an_uncommitted_bulk_batch_postgres() {
    a_registration_waits_for_an_uncommitted_bulk_batch(Backend::Postgres);
}

#[test]
fn batch_equals_one_by_one_sqlite() {
    batch_equals_one_by_one(Backend::Sqlite);
}

#[test]
fn batch_equals_one_by_one_postgres() {
    batch_equals_one_by_one(Backend::Postgres);
}
