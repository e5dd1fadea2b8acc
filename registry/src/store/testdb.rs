//! Databases for the registry's own tests: a fresh SQLite file in a directory of its own, or a
//! fresh PostgreSQL database on the server of `YIQIAO_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), migrated, and removed when dropped. Never
//! skipped: an unreachable PostgreSQL fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use diesel::{Connection, PgConnection, RunQueryDsl};

use super::{Backend, Store, StoreOptions};

/// The PostgreSQL server for tests.
fn pg_admin_url() -> String {
    std::env::var("YIQIAO_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A migrated store of the test's own.
pub struct TestStore {
    pub store: Store,
    pg_name: Option<String>,
    dir: Option<PathBuf>,
}

impl TestStore {
    pub fn new(backend: Backend) -> TestStore {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let (url, pg_name, dir) = match backend {
            Backend::Sqlite => {
                let dir = std::env::temp_dir().join(format!("yiqiao-registry-test-{unique}"));
                std::fs::create_dir_all(&dir).unwrap();
                let url = format!("sqlite://{}", dir.join("registry.db").display());
                (url, None, Some(dir))
            }
            Backend::Postgres => {
                let name = format!("yq_r_{unique}");
                let admin = pg_admin_url();
                let mut conn = PgConnection::establish(&admin)
                    .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is unreachable: {e}"));
                diesel::sql_query(format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .unwrap();
                let mut url = url::Url::parse(&admin).expect("YIQIAO_TEST_DATABASE_URL is a URL");
                url.set_path(&format!("/{name}"));
                (url.to_string(), Some(name), None)
            }
        };
        let store = Store::open(&StoreOptions {
            url,
            pool_size: 4,
            min_idle: None,
            acquire_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            sqlite_busy_timeout: Duration::from_secs(10),
        })
        .unwrap();
        store.migrate().unwrap();
        TestStore {
            store,
            pg_name,
            dir,
        }
    }
}

impl Drop for TestStore {
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

/// Run each listed `fn name(backend: Backend)` of a test module as two tests, `sqlite::name`
/// and `postgres::name`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite { $( #[test] fn $name() { super::$name(crate::Backend::Sqlite) } )* }
        mod postgres { $( #[test] fn $name() { super::$name(crate::Backend::Postgres) } )* }
    };
}
pub(crate) use on_both_backends;
