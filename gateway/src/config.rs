//! Settings: one typed struct, layered defaults → TOML file (`--config`) → `YIQIAO_*` environment.
//!
//! Unknown keys and bad values are rejected at start with the key's name. Secrets are wrapped in
//! [`Secret`] so they never print (logs, `yiqiao config show`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// A value that must never appear in logs or output. Serialises as `"********"` (or `""`
/// when unset), so `config show` reveals whether it is set but not what it is.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_set(&self) -> bool {
        !self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "\"********\""
        })
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "********" })
    }
}

/// The whole configuration of a gateway process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address the HTTP server listens on.
    pub listen: SocketAddr,
    /// Directory for the embedded database and other local files.
    pub data_dir: PathBuf,
    /// The externally visible base URL (used in links, token audiences and discovery).
    /// Empty: derived from `listen`.
    pub public_url: String,
    /// Bearer credential for the admin API until people log in through OpenID Connect.
    /// Empty disables the admin API.
    pub admin_token: Secret,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
    pub audit: AuditSettings,
}

/// The tamper-evident audit trail (docs/audit.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    /// PEM file (PKCS#8) of the SM2 key that signs checkpoints and exports. Empty: the file
    /// `<data_dir>/audit-signing-key.pem`, generated on first start. Replicas must share one key.
    pub signing_key_file: String,
    /// Sign a checkpoint at least every this many records.
    pub checkpoint_every: u64,
    /// …and at this interval when records were added since the last checkpoint.
    pub checkpoint_interval_secs: u64,
    /// Most records committed in one transaction (group commit).
    pub batch_max: usize,
    /// Records waiting for the writer before callers queue.
    pub queue_capacity: usize,
    /// How long a request waits for its record to be durable before answering 503.
    pub write_timeout_ms: u64,
    /// Name of this replica in AuditEvent.source. Empty: $HOSTNAME, else "gateway".
    pub replica_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `postgres://…` for PostgreSQL; empty for the embedded SQLite file `data_dir/yiqiao.db`;
    /// `sqlite://PATH` for another SQLite file. A password in the URL is treated as a secret.
    pub url: Secret,
    /// Maximum connections in the pool.
    pub pool_size: u32,
    /// How long a request waits for a free connection before answering 503.
    pub acquire_timeout_ms: u64,
    /// PostgreSQL connect timeout.
    pub connect_timeout_ms: u64,
    /// PostgreSQL per-statement timeout.
    pub statement_timeout_ms: u64,
    /// SQLite busy timeout (wait for the write lock).
    pub sqlite_busy_timeout_ms: u64,
    /// Apply pending migrations when `serve` starts.
    pub migrate_on_start: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://host:port/db`; empty: no Redis (single node only).
    pub url: Secret,
    /// Timeout for a Redis round trip (readiness and shared state).
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Largest request body accepted, in bytes (413 above).
    pub max_body_bytes: usize,
    /// Worker threads; 0 means one per CPU core.
    pub workers: usize,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    pub shutdown_timeout_secs: u64,
    /// Keep-alive for client connections.
    pub keep_alive_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// `tracing` filter directive, e.g. `info` or `yiqiao=debug,actix_web=info`.
    pub level: String,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            public_url: String::new(),
            admin_token: Secret::default(),
            database: DatabaseSettings {
                url: Secret::default(),
                pool_size: 16,
                acquire_timeout_ms: 2000,
                connect_timeout_ms: 3000,
                statement_timeout_ms: 30_000,
                sqlite_busy_timeout_ms: 5000,
                migrate_on_start: true,
            },
            redis: RedisSettings {
                url: Secret::default(),
                timeout_ms: 1000,
            },
            http: HttpSettings {
                max_body_bytes: 1024 * 1024,
                workers: 0,
                shutdown_timeout_secs: 30,
                keep_alive_secs: 75,
            },
            log: LogSettings {
                format: LogFormat::Text,
                level: "info".into(),
            },
            audit: AuditSettings {
                signing_key_file: String::new(),
                checkpoint_every: 1000,
                checkpoint_interval_secs: 60,
                batch_max: 2000,
                queue_capacity: 65536,
                write_timeout_ms: 5000,
                replica_id: String::new(),
            },
        }
    }
}

/// Environment variables that belong to the test harness, not to the gateway.
const IGNORED_ENV: [&str; 3] = ["test_database_url", "test_redis_url", "config"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Settings {
    /// Defaults, then the TOML file (if given), then `YIQIAO_*` environment variables.
    ///
    /// Environment names: `YIQIAO_LISTEN`, `YIQIAO_DATA_DIR`, `YIQIAO_PUBLIC_URL`,
    /// `YIQIAO_ADMIN_TOKEN`, `YIQIAO_DATABASE_URL`, `YIQIAO_REDIS_URL`, and for any other nested key
    /// `YIQIAO_SECTION__KEY` (e.g. `YIQIAO_DATABASE__POOL_SIZE`, `YIQIAO_LOG__FORMAT`).
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_from(file, Env::prefixed("YIQIAO_"))
    }

    fn load_from(file: Option<&Path>, env: Env) -> Result<Settings, ConfigError> {
        let defaults = serde_json::to_value(Settings::default())
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let mut figment = Figment::from(Serialized::defaults(defaults));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::MissingFile(path.to_path_buf()));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let env = env
            .filter(|key| !IGNORED_ENV.contains(&key.as_str().to_ascii_lowercase().as_str()))
            .map(|key| {
                let lower = key.as_str().to_ascii_lowercase();
                match lower.as_str() {
                    "database_url" => "database.url".into(),
                    "redis_url" => "redis.url".into(),
                    other => other.replace("__", ".").into(),
                }
            })
            .lowercase(false);
        figment = figment.merge(env);
        let settings: Settings = figment
            .extract()
            .map_err(|e| ConfigError::Invalid(describe(e)))?;
        settings.check()?;
        Ok(settings)
    }

    /// Cross-field and range checks that serde cannot express.
    fn check(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError::Invalid(format!("{key}: {why}")));
        if self.database.pool_size == 0 || self.database.pool_size > 1000 {
            return bad("database.pool_size", "must be between 1 and 1000");
        }
        if self.database.acquire_timeout_ms == 0 {
            return bad("database.acquire_timeout_ms", "must be positive");
        }
        if self.http.max_body_bytes < 1024 {
            return bad("http.max_body_bytes", "must be at least 1024");
        }
        let url = self.database.url.expose();
        if let Err(e) = yiqiao_registry::Backend::from_url(url)
            .map(|_| ())
            .or_else(|e| if url.is_empty() { Ok(()) } else { Err(e) })
        {
            return bad("database.url", &e.to_string());
        }
        let redis = self.redis.url.expose();
        if !(redis.is_empty() || redis.starts_with("redis://") || redis.starts_with("rediss://")) {
            return bad("redis.url", "must start with redis:// or rediss://");
        }
        if !self.public_url.is_empty() {
            match url::Url::parse(&self.public_url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => return bad("public_url", "must be an http(s) URL"),
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return bad("log.level", &e.to_string());
        }
        Ok(())
    }

    /// The database URL in effect: the configured one, or the embedded SQLite file.
    pub fn database_url(&self) -> String {
        let url = self.database.url.expose();
        if url.is_empty() {
            format!("sqlite://{}", self.data_dir.join("yiqiao.db").display())
        } else {
            url.to_string()
        }
    }

    pub fn public_base_url(&self) -> String {
        if self.public_url.is_empty() {
            format!("http://{}", self.listen)
        } else {
            self.public_url.trim_end_matches('/').to_string()
        }
    }

    pub fn store_options(&self) -> yiqiao_registry::StoreOptions {
        yiqiao_registry::StoreOptions {
            url: self.database_url(),
            pool_size: self.database.pool_size,
            min_idle: None,
            acquire_timeout: Duration::from_millis(self.database.acquire_timeout_ms),
            connect_timeout: Duration::from_millis(self.database.connect_timeout_ms),
            statement_timeout: Duration::from_millis(self.database.statement_timeout_ms),
            sqlite_busy_timeout: Duration::from_millis(self.database.sqlite_busy_timeout_ms),
        }
    }

    /// The effective settings as TOML with secrets masked (`yiqiao config show`).
    pub fn to_redacted_toml(&self) -> Result<String, ConfigError> {
        let mut value =
            serde_json::to_value(self).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        // Show which database is used without its password.
        value["database"]["url"] = serde_json::Value::String(if self.database.url.is_set() {
            yiqiao_registry::store::redact_url(self.database.url.expose())
        } else {
            String::new()
        });
        value["redis"]["url"] = serde_json::Value::String(if self.redis.url.is_set() {
            yiqiao_registry::store::redact_url(self.redis.url.expose())
        } else {
            String::new()
        });
        toml::to_string_pretty(&value).map_err(|e| ConfigError::Invalid(e.to_string()))
    }
}

/// Turn a figment error into one line naming the key and the source.
fn describe(err: figment::Error) -> String {
    err.into_iter()
        .map(|e| {
            let key = if e.path.is_empty() {
                String::new()
            } else {
                format!("{}: ", e.path.join("."))
            };
            let source = e
                .metadata
                .as_ref()
                .map(|m| match &m.source {
                    Some(src) => format!(" (from {} {src})", m.name),
                    None => format!(" (from {})", m.name),
                })
                .unwrap_or_default();
            format!("{key}{}{source}", e.kind)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn load_toml(toml: &str) -> Result<Settings, ConfigError> {
        let dir = std::env::temp_dir().join(format!("yq-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("yiqiao.toml");
        std::fs::write(&path, toml).unwrap();
        // An env prefix nobody sets, so the process environment cannot interfere.
        Settings::load_from(Some(&path), Env::prefixed("YIQIAO_UNIT_TEST_UNSET_"))
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = load_toml("listen = \"127.0.0.1:9000\"\nlisten_port = 3\n").unwrap_err();
        assert!(err.to_string().contains("listen_port"), "{err}");
        let err = load_toml("[database]\npool_sise = 3\n").unwrap_err();
        assert!(err.to_string().contains("pool_sise"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = load_toml("[database]\npool_size = \"many\"\n").unwrap_err();
        assert!(err.to_string().contains("database.pool_size"), "{err}");
        let err = load_toml("[database]\npool_size = 0\n").unwrap_err();
        assert!(err.to_string().contains("database.pool_size"), "{err}");
        let err = load_toml("[database]\nurl = \"mysql://x/y\"\n").unwrap_err();
        assert!(err.to_string().contains("database.url"), "{err}");
        let err = load_toml("listen = \"nowhere\"\n").unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
        let err = load_toml("[log]\nformat = \"xml\"\n").unwrap_err();
        assert!(err.to_string().contains("log.format"), "{err}");
    }

    #[test]
    fn secrets_never_show() {
        let s = load_toml(
            "admin_token = \"hunter2-admin\"\n[database]\nurl = \"postgres://u:pw-secret@h/db\"\n",
        )
        .unwrap();
        let shown = s.to_redacted_toml().unwrap();
        let debug = format!("{s:?}");
        for text in [&shown, &debug] {
            assert!(!text.contains("hunter2-admin"), "{text}");
            assert!(!text.contains("pw-secret"), "{text}");
        }
        assert!(shown.contains("postgres://u:***@h/db"), "{shown}");
        assert_eq!(s.admin_token.expose(), "hunter2-admin");
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn environment_overrides_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "y.toml",
                "listen = \"127.0.0.1:9000\"\n[database]\npool_size = 4\n",
            )?;
            jail.set_env("YIQIAO_LISTEN", "127.0.0.1:9100");
            jail.set_env("YIQIAO_DATABASE__POOL_SIZE", "7");
            jail.set_env("YIQIAO_DATABASE_URL", "postgres://postgres@127.0.0.1/test");
            jail.set_env("YIQIAO_TEST_DATABASE_URL", "ignored");
            let s = Settings::load(Some(Path::new("y.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(s.listen.port(), 9100);
            assert_eq!(s.database.pool_size, 7);
            assert_eq!(
                s.database.url.expose(),
                "postgres://postgres@127.0.0.1/test"
            );
            jail.set_env("YIQIAO_LISTN", "x");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.contains("listn"), "{err}");
            Ok(())
        });
    }

    /// The documented example in deploy/ must stay in step with the struct: it parses, and it
    /// mentions every key the struct has.
    #[test]
    fn example_config_matches_the_struct() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/yiqiao.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        load_toml(&text).unwrap();
        let defaults = serde_json::to_value(Settings::default()).unwrap();
        let parsed: toml::Table = text.parse().unwrap();
        let mut missing = Vec::new();
        for (key, value) in defaults.as_object().unwrap() {
            match value.as_object() {
                Some(section) => {
                    for sub in section.keys() {
                        let present = parsed
                            .get(key)
                            .and_then(|t| t.as_table())
                            .is_some_and(|t| t.contains_key(sub));
                        if !present && !text.contains(&format!("# {sub} =")) {
                            missing.push(format!("{key}.{sub}"));
                        }
                    }
                }
                None => {
                    if !parsed.contains_key(key) && !text.contains(&format!("# {key} =")) {
                        missing.push(key.clone());
                    }
                }
            }
        }
        assert!(
            missing.is_empty(),
            "deploy/yiqiao.example.toml lacks {missing:?}"
        );
    }
}
