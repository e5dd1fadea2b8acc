//! Storage: one diesel code path over SQLite (embedded default) and PostgreSQL (production).
//!
//! Invariants:
//! - The backend is chosen from the URL scheme ([`Backend::from_url`]), never by trying to connect.
//! - Every SQLite connection runs with WAL, a busy timeout and foreign keys on.
//! - Every writing transaction goes through [`write_tx`] (or [`transaction`]): on SQLite it
//!   starts with `BEGIN IMMEDIATE`, so it queues for the write lock under the busy timeout
//!   instead of failing with "database is locked" when it reads first and another connection
//!   commits before its first write (a deferred transaction cannot upgrade a stale snapshot).
//! - Migrations for each backend are embedded in the binary and applied by [`Store::migrate`].
//! - All functions here are synchronous; callers on an async runtime run them on a blocking pool.

mod audited;
pub mod schema;
pub use audited::Audited;
#[cfg(any(test, feature = "test-support"))]
pub mod testdb;

use std::path::{Path, PathBuf};
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{self, ManageConnection, PooledConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

/// Migrations for SQLite, embedded at build time.
pub const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations/sqlite");
/// Migrations for PostgreSQL, embedded at build time.
pub const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations/postgres");

/// A connection to either backend. Built explicitly by [`ConnectionFactory`], never through
/// `establish` (which would try the backends in turn).
#[derive(diesel::MultiConnection)]
pub enum DbConn {
    Postgresql(diesel::PgConnection),
    Sqlite(diesel::SqliteConnection),
}

/// The storage backend, decided by the database URL's scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// `postgres://` or `postgresql://` → PostgreSQL; `sqlite://PATH`, `file:PATH` or a plain path
    /// → SQLite. Anything else with a scheme (e.g. `mysql://`) is an error.
    pub fn from_url(url: &str) -> Result<Backend, StoreError> {
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if lower.starts_with("sqlite:")
            || lower.starts_with("file:")
            || !lower.contains("://")
        {
            Ok(Backend::Sqlite)
        } else {
            Err(StoreError::UnsupportedUrl(redact_url(url)))
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// Replace the password of a URL with `***` so it can be logged or shown.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

/// The SQLite file path of a `sqlite://`/`file:` URL or a plain path.
fn sqlite_path(url: &str) -> &str {
    url.strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .or_else(|| url.strip_prefix("file:"))
        .unwrap_or(url)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported database URL {0}: use postgres://… or sqlite://PATH")]
    UnsupportedUrl(String),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("no database connection free within {0:?}")]
    PoolTimeout(Duration),
    #[error("migration failed: {0}")]
    Migration(String),
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("database error: {0}")]
    Query(#[from] diesel::result::Error),
}

impl StoreError {
    /// Map a diesel error, turning unique violations into [`StoreError::Conflict`].
    pub fn from_diesel(err: diesel::result::Error) -> StoreError {
        use diesel::result::{DatabaseErrorKind, Error};
        match err {
            Error::NotFound => StoreError::NotFound,
            Error::DatabaseError(DatabaseErrorKind::UniqueViolation, info) => {
                StoreError::Conflict(info.message().to_string())
            }
            other => StoreError::Query(other),
        }
    }
}

/// Settings the store needs; the gateway fills them from its configuration.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub url: String,
    pub pool_size: u32,
    pub min_idle: Option<u32>,
    /// How long a caller waits for a free connection before [`StoreError::PoolTimeout`].
    pub acquire_timeout: Duration,
    /// PostgreSQL: connect timeout and per-statement timeout.
    pub connect_timeout: Duration,
    pub statement_timeout: Duration,
    /// SQLite: how long a writer waits for the lock.
    pub sqlite_busy_timeout: Duration,
}

/// r2d2 connection manager that builds the backend named by the URL.
#[derive(Debug, Clone)]
pub struct ConnectionFactory {
    backend: Backend,
    url: String,
    busy_timeout: Duration,
    connect_timeout: Duration,
    statement_timeout: Duration,
}

impl ConnectionFactory {
    fn pg_url(&self) -> String {
        // libpq accepts connect_timeout and options as URL parameters.
        let sep = if self.url.contains('?') { '&' } else { '?' };
        let mut url = self.url.clone();
        if !url.contains("connect_timeout=") {
            url.push(sep);
            url.push_str(&format!(
                "connect_timeout={}",
                self.connect_timeout.as_secs().max(1)
            ));
        }
        url
    }
}

impl ManageConnection for ConnectionFactory {
    type Connection = DbConn;
    type Error = r2d2::Error;

    fn connect(&self) -> Result<DbConn, r2d2::Error> {
        match self.backend {
            Backend::Postgres => {
                let mut conn = diesel::PgConnection::establish(&self.pg_url())
                    .map_err(r2d2::Error::ConnectionError)?;
                conn.batch_execute(&format!(
                    "SET statement_timeout = {}; SET TIME ZONE 'UTC';",
                    self.statement_timeout.as_millis()
                ))
                .map_err(r2d2::Error::QueryError)?;
                // Large values (audit records with many consent reasons, FHIR resources) are
                // compressed with lz4 where the server has it: the same size here as pglz at
                // a fraction of the CPU (BENCHMARKS.md, "Consent engine"). A server built
                // without lz4 refuses the setting and keeps its default.
                if conn
                    .batch_execute("SET default_toast_compression = 'lz4'")
                    .is_err()
                {
                    tracing::debug!("PostgreSQL has no lz4; TOAST compression stays the default");
                }
                Ok(DbConn::Postgresql(conn))
            }
            Backend::Sqlite => {
                let mut conn = diesel::SqliteConnection::establish(sqlite_path(&self.url))
                    .map_err(r2d2::Error::ConnectionError)?;
                conn.batch_execute(&format!(
                    "PRAGMA busy_timeout = {}; PRAGMA journal_mode = WAL; \
                     PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
                    self.busy_timeout.as_millis()
                ))
                .map_err(r2d2::Error::QueryError)?;
                Ok(DbConn::Sqlite(conn))
            }
        }
    }

    fn is_valid(&self, conn: &mut DbConn) -> Result<(), r2d2::Error> {
        conn.batch_execute("SELECT 1")
            .map_err(r2d2::Error::QueryError)
    }

    fn has_broken(&self, _conn: &mut DbConn) -> bool {
        false
    }
}

pub type Pool = r2d2::Pool<ConnectionFactory>;
pub type Conn = PooledConnection<ConnectionFactory>;

/// The storage handle: a connection pool over one backend. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    backend: Backend,
    acquire_timeout: Duration,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// Pool usage for metrics.
#[derive(Debug, Clone, Copy)]
pub struct PoolState {
    pub size: u32,
    pub idle: u32,
    pub max: u32,
}

impl Store {
    /// Build the pool. Does not wait for the database: a store on an unreachable
    /// PostgreSQL is created and reports unavailability on use (readiness turns 503).
    pub fn open(opts: &StoreOptions) -> Result<Store, StoreError> {
        let backend = Backend::from_url(&opts.url)?;
        if backend == Backend::Sqlite {
            let path = Path::new(sqlite_path(&opts.url));
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
                    path: dir.to_path_buf(),
                    source,
                })?;
            }
        }
        let factory = ConnectionFactory {
            backend,
            url: opts.url.clone(),
            busy_timeout: opts.sqlite_busy_timeout,
            connect_timeout: opts.connect_timeout,
            statement_timeout: opts.statement_timeout,
        };
        let pool = r2d2::Pool::builder()
            .max_size(opts.pool_size.max(1))
            .min_idle(opts.min_idle)
            .connection_timeout(opts.acquire_timeout)
            .test_on_check_out(true)
            .build_unchecked(factory);
        Ok(Store {
            pool,
            backend,
            acquire_timeout: opts.acquire_timeout,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A pooled connection, or [`StoreError::PoolTimeout`] when none is free in time.
    pub fn conn(&self) -> Result<Conn, StoreError> {
        self.conn_within(self.acquire_timeout)
    }

    pub fn conn_within(&self, timeout: Duration) -> Result<Conn, StoreError> {
        let state = self.pool.state();
        match self.pool.get_timeout(timeout) {
            Ok(conn) => Ok(conn),
            // All connections checked out and busy: the pool is exhausted.
            Err(_) if state.idle_connections == 0 && state.connections >= self.pool.max_size() => {
                Err(StoreError::PoolTimeout(timeout))
            }
            Err(err) => Err(StoreError::Unavailable(err.to_string())),
        }
    }

    pub fn pool_state(&self) -> PoolState {
        let s = self.pool.state();
        PoolState {
            size: s.connections,
            idle: s.idle_connections,
            max: self.pool.max_size(),
        }
    }

    /// Apply pending migrations; returns the versions applied.
    pub fn migrate(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn()?;
        let applied = match &mut *conn {
            DbConn::Postgresql(pg) => pg.run_pending_migrations(POSTGRES_MIGRATIONS),
            DbConn::Sqlite(lite) => lite.run_pending_migrations(SQLITE_MIGRATIONS),
        }
        .map_err(|e| StoreError::Migration(e.to_string()))?;
        Ok(applied.iter().map(|v| v.to_string()).collect())
    }

    /// Round-trip to the database within `timeout` (readiness probe).
    pub fn ping(&self, timeout: Duration) -> Result<(), StoreError> {
        let mut conn = self.conn_within(timeout)?;
        conn.batch_execute("SELECT 1")
            .map_err(StoreError::from_diesel)
    }
}

/// What ended a [`transaction`]: the work's own error, or the database's.
enum TxFailure<E> {
    Work(E),
    Db(diesel::result::Error),
}

impl<E> From<diesel::result::Error> for TxFailure<E> {
    fn from(e: diesel::result::Error) -> TxFailure<E> {
        TxFailure::Db(e)
    }
}

/// Run `work` in one transaction (a savepoint when inside another): every write of it is
/// stored, or none. For callers outside this crate that combine several registry writes
/// without naming diesel; the error type only needs to take a [`StoreError`].
pub fn transaction<T, E: From<StoreError>>(
    conn: &mut DbConn,
    work: impl FnOnce(&mut DbConn) -> Result<T, E>,
) -> Result<T, E> {
    write_tx(conn, |conn| work(conn).map_err(TxFailure::Work)).map_err(|f| match f {
        TxFailure::Work(e) => e,
        TxFailure::Db(d) => E::from(StoreError::from_diesel(d)),
    })
}

/// What an idempotent registration (upsert on an external identifier) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpsertOutcome {
    Created,
    /// A new version of a registered entry.
    Updated,
    /// The same content was registered before: nothing stored.
    Unchanged,
}

/// Run `work` in one writing transaction, like diesel's `Connection::transaction`, except that
/// an outermost transaction on SQLite begins with `BEGIN IMMEDIATE`: it takes the write lock
/// first (waiting under the busy timeout), so a read followed by a write inside it can never
/// fail with `SQLITE_BUSY` because another connection committed in between. Nested calls are
/// savepoints; PostgreSQL transactions are unchanged.
pub fn write_tx<T, E: From<diesel::result::Error>>(
    conn: &mut DbConn,
    work: impl FnOnce(&mut DbConn) -> Result<T, E>,
) -> Result<T, E> {
    use diesel::connection::{AnsiTransactionManager, TransactionManager};
    type Manager = <DbConn as Connection>::TransactionManager;
    let DbConn::Sqlite(lite) = conn else {
        return conn.transaction(work);
    };
    let depth = AnsiTransactionManager::transaction_manager_status_mut(lite).transaction_depth()?;
    if depth.is_some() {
        return conn.transaction(work);
    }
    AnsiTransactionManager::begin_transaction_sql(lite, "BEGIN IMMEDIATE")?;
    match work(conn) {
        Ok(value) => {
            Manager::commit_transaction(conn)?;
            Ok(value)
        }
        Err(error) => match Manager::rollback_transaction(conn) {
            Ok(()) | Err(diesel::result::Error::BrokenTransactionManager) => Err(error),
            Err(rollback) => Err(rollback.into()),
        },
    }
}

/// SQLite: copy what the write-ahead log holds into the database file now (PASSIVE: readers
/// and writers are not waited for). A committing connection does this by itself once the log
/// reaches 1,000 pages — inside its commit, so the request waiting for that commit waits for
/// the copy and the database file's sync too; a writer that calls this when it is idle keeps
/// the log below that mark. No-op on PostgreSQL.
pub fn checkpoint_wal(conn: &mut DbConn) -> Result<(), StoreError> {
    if let DbConn::Sqlite(lite) = conn {
        lite.batch_execute("PRAGMA wal_checkpoint(PASSIVE)")
            .map_err(StoreError::from_diesel)?;
    }
    Ok(())
}

/// The current UTC time truncated to microseconds, the precision both backends keep.
pub fn now_utc() -> chrono::NaiveDateTime {
    use chrono::{SubsecRound, Utc};
    Utc::now().naive_utc().trunc_subsecs(6)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn backend_is_chosen_from_the_scheme() {
        assert_eq!(
            Backend::from_url("postgres://u@h/db").ok(),
            Some(Backend::Postgres)
        );
        assert_eq!(
            Backend::from_url("postgresql://u@h/db").ok(),
            Some(Backend::Postgres)
        );
        assert_eq!(
            Backend::from_url("sqlite://data/y.db").ok(),
            Some(Backend::Sqlite)
        );
        assert_eq!(
            Backend::from_url("./data/yiqiao.db").ok(),
            Some(Backend::Sqlite)
        );
        assert!(matches!(
            Backend::from_url("mysql://h/db"),
            Err(StoreError::UnsupportedUrl(_))
        ));
    }

    /// Read, let another connection commit a write, then write: the interleaving the
    /// simulated-region loader met with the gateway's background writers. A deferred SQLite
    /// transaction fails on its write ("database is locked": its snapshot is stale); [`write_tx`]
    /// holds the write lock from the start, so the other writer waits and both succeed.
    #[test]
    fn sqlite_write_transactions_do_not_fail_on_a_concurrent_commit() {
        use std::sync::mpsc;

        let db = testdb::TestStore::new(Backend::Sqlite);
        let mut a = db.store.conn().unwrap();
        a.batch_execute("CREATE TABLE tx_probe (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)")
            .unwrap();
        let count = |c: &mut DbConn| -> Result<i64, diesel::result::Error> {
            diesel::sql_query("SELECT COUNT(*) AS n FROM tx_probe")
                .get_result::<Count>(c)
                .map(|r| r.n)
        };

        // The control: a deferred transaction that reads before another connection commits.
        let mut b = db.store.conn().unwrap();
        let deferred = a.transaction::<_, diesel::result::Error, _>(|a| {
            count(a)?;
            b.batch_execute("INSERT INTO tx_probe (v) VALUES (1)")?;
            a.batch_execute("INSERT INTO tx_probe (v) VALUES (2)")
        });
        let err = deferred.expect_err("a stale deferred transaction cannot write");
        assert!(err.to_string().contains("locked"), "{err}");

        // The same interleaving through write_tx: the other writer queues behind it.
        let (read_done, wait_read) = mpsc::channel();
        let other = std::thread::spawn(move || {
            wait_read.recv().unwrap();
            b.batch_execute("INSERT INTO tx_probe (v) VALUES (3)")
        });
        let seen = write_tx::<_, diesel::result::Error>(&mut a, |a| {
            let n = count(a)?;
            read_done.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            a.batch_execute("INSERT INTO tx_probe (v) VALUES (4)")?;
            Ok(n)
        })
        .expect("write_tx commits");
        assert_eq!(seen, 1);
        other
            .join()
            .unwrap()
            .expect("the other writer waited and committed");
        assert_eq!(count(&mut a).unwrap(), 3);
        // Nested write_tx is a savepoint inside the outer transaction: its rollback keeps the
        // outer work.
        write_tx::<_, diesel::result::Error>(&mut a, |a| {
            a.batch_execute("INSERT INTO tx_probe (v) VALUES (5)")?;
            let inner = write_tx::<(), diesel::result::Error>(a, |a| {
                a.batch_execute("INSERT INTO tx_probe (v) VALUES (6)")?;
                Err(diesel::result::Error::RollbackTransaction)
            });
            assert!(inner.is_err());
            Ok(())
        })
        .unwrap();
        assert_eq!(count(&mut a).unwrap(), 4);
    }

    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    }
}
