//! Databases for tests, the one helper every test suite uses (the registry's unit and
//! integration tests, the gateway's API tests through the feature `test-support`): a fresh
//! SQLite file in a directory of its own, or a fresh PostgreSQL database on the server of
//! `YIQIAO_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`), removed
//! when dropped. Never skipped: an unreachable PostgreSQL fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use diesel::{Connection, PgConnection, RunQueryDsl};

use super::{Backend, Store, StoreOptions};

/// The PostgreSQL server for tests.
pub fn pg_admin_url() -> String {
    std::env::var("YIQIAO_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Replace the database name of a PostgreSQL URL (keeping any query string).
pub fn with_database(url: &str, db: &str) -> String {
    let mut parsed = url::Url::parse(url).expect("YIQIAO_TEST_DATABASE_URL is not a URL");
    parsed.set_path(&format!("/{db}"));
    parsed.to_string()
}

/// A database of the test's own (not migrated): its URL, and what to remove when dropped.
pub struct TestDatabase {
    pub url: String,
    pg_name: Option<String>,
    dir: Option<PathBuf>,
}

impl TestDatabase {
    pub fn new(backend: Backend) -> TestDatabase {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        match backend {
            Backend::Sqlite => {
                let dir = std::env::temp_dir().join(format!("yiqiao-test-{unique}"));
                std::fs::create_dir_all(&dir).unwrap();
                TestDatabase {
                    url: format!("sqlite://{}", dir.join("yiqiao.db").display()),
                    pg_name: None,
                    dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let name = format!("yq_t_{unique}");
                let admin = pg_admin_url();
                let mut conn = PgConnection::establish(&admin)
                    .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is unreachable: {e}"));
                diesel::sql_query(format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .unwrap();
                TestDatabase {
                    url: with_database(&admin, &name),
                    pg_name: Some(name),
                    dir: None,
                }
            }
        }
    }

    /// Another handle on a database owned elsewhere (a second replica); dropping it keeps
    /// the database.
    pub fn shared(url: &str) -> TestDatabase {
        TestDatabase {
            url: url.to_string(),
            pg_name: None,
            dir: None,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Some(name) = &self.pg_name
            && let Ok(mut conn) = PgConnection::establish(&pg_admin_url())
        {
            let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut conn);
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A test's store on `url`: `pool_size` connections, the store's usual timeouts, migrated.
pub fn open_store(url: &str, pool_size: u32) -> Store {
    let store = Store::open(&StoreOptions {
        url: url.to_string(),
        pool_size,
        min_idle: None,
        acquire_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        statement_timeout: Duration::from_secs(30),
        sqlite_busy_timeout: Duration::from_secs(10),
    })
    .unwrap();
    store.migrate().unwrap();
    store
}

/// A migrated store on a database of the test's own.
pub struct TestStore {
    pub store: Store,
    // Dropped after the store (fields drop in order).
    _db: TestDatabase,
}

impl TestStore {
    pub fn new(backend: Backend) -> TestStore {
        let db = TestDatabase::new(backend);
        TestStore {
            store: open_store(&db.url, 4),
            _db: db,
        }
    }
}

/// Run each listed `fn name(backend: Backend)` of a test module as two tests, `sqlite::name`
/// and `postgres::name`.
#[cfg(test)]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite { $( #[test] fn $name() { super::$name(crate::Backend::Sqlite) } )* }
        mod postgres { $( #[test] fn $name() { super::$name(crate::Backend::Postgres) } )* }
    };
}
#[cfg(test)]
pub(crate) use on_both_backends;
