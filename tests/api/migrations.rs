//! Both migration trees define the same tables and columns (names and nullability), checked
//! by applying each to a real database and reading the catalogue back.

use std::collections::BTreeMap;

use diesel::sql_types::{Integer, Text};
use diesel::{QueryableByName, RunQueryDsl};
use yiqiao_registry::store::DbConn;
use yiqiao_registry::{Store, StoreOptions};

use crate::helpers::{Backend, TestDb};

#[derive(QueryableByName)]
struct Column {
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = Text)]
    column_name: String,
    #[diesel(sql_type = Integer)]
    not_null: i32,
}

fn columns(backend: Backend) -> BTreeMap<(String, String), bool> {
    let db = TestDb::new(backend);
    let store = Store::open(&StoreOptions {
        url: db.url.clone(),
        pool_size: 1,
        min_idle: None,
        acquire_timeout: std::time::Duration::from_secs(5),
        connect_timeout: std::time::Duration::from_secs(5),
        statement_timeout: std::time::Duration::from_secs(30),
        sqlite_busy_timeout: std::time::Duration::from_secs(5),
    })
    .unwrap();
    let applied = store.migrate().unwrap();
    assert!(!applied.is_empty());
    let mut conn = store.conn().unwrap();
    let rows: Vec<Column> = match &mut *conn {
        DbConn::Postgresql(pg) => diesel::sql_query(
            "SELECT table_name::text AS table_name, column_name::text AS column_name, \
             CASE WHEN is_nullable = 'NO' THEN 1 ELSE 0 END AS not_null \
             FROM information_schema.columns WHERE table_schema = 'public' \
             AND table_name <> '__diesel_schema_migrations' \
             AND table_name NOT IN (SELECT relname FROM pg_class WHERE relispartition)",
        )
        .load(pg)
        .unwrap(),
        DbConn::Sqlite(lite) => diesel::sql_query(
            "SELECT m.name AS table_name, p.name AS column_name, (p.\"notnull\" OR p.pk) AS not_null \
             FROM sqlite_master m JOIN pragma_table_info(m.name) p \
             WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' AND m.name <> '__diesel_schema_migrations'",
        )
        .load(lite)
        .unwrap(),
    };
    rows.into_iter()
        .map(|c| ((c.table_name, c.column_name), c.not_null != 0))
        .collect()
}

#[test]
fn sqlite_and_postgres_trees_define_the_same_columns() {
    let lite = columns(Backend::Sqlite);
    let pg = columns(Backend::Postgres);
    assert!(lite.contains_key(&("institutions".into(), "uscc".into())));
    let only_lite: Vec<_> = lite.keys().filter(|k| !pg.contains_key(*k)).collect();
    let only_pg: Vec<_> = pg.keys().filter(|k| !lite.contains_key(*k)).collect();
    assert!(
        only_lite.is_empty() && only_pg.is_empty(),
        "only in sqlite: {only_lite:?}; only in postgres: {only_pg:?}"
    );
    let nullability: Vec<_> = lite
        .iter()
        .filter(|(k, v)| pg.get(*k) != Some(v))
        .map(|(k, _)| k)
        .collect();
    assert!(
        nullability.is_empty(),
        "nullability differs: {nullability:?}"
    );
}

#[test]
fn migration_folders_pair_up() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    let names = |dir: &str| {
        let mut v: Vec<String> = std::fs::read_dir(root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names("sqlite"),
        names("postgres"),
        "each migration needs a twin for the other backend"
    );
}
