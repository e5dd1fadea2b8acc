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
    /// Bearer credential with the auditor role (read-only: audit events, alerts, reports) for
    /// operators' jobs such as a SIEM export, beside people who log in. Empty disables it.
    #[serde(default)]
    pub auditor_token: Secret,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
    pub telemetry: TelemetrySettings,
    pub auth: AuthSettings,
    #[serde(default)]
    pub empi: EmpiSettings,
    pub audit: AuditSettings,
    #[serde(default)]
    pub mllp: MllpSettings,
}

/// HL7 v2 over MLLP listener for hospital ADT feeds (docs/empi.md, "HL7 v2 feed").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MllpSettings {
    /// Start the listener with the server.
    pub enabled: bool,
    /// Address the MLLP listener binds.
    pub listen: SocketAddr,
    /// Largest accepted message (bytes between the MLLP start and end characters).
    pub max_message_bytes: usize,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout_secs: u64,
    /// Concurrent connections; more wait in the accept queue.
    pub max_connections: usize,
}

impl Default for MllpSettings {
    fn default() -> MllpSettings {
        MllpSettings {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 2575)),
            max_message_bytes: 1024 * 1024,
            idle_timeout_secs: 300,
            max_connections: 64,
        }
    }
}

/// Enterprise master patient index.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmpiSettings {
    /// Identifier system of the resident ID number (居民身份证号码) in FHIR Patients.
    pub resident_id_system: String,
}

impl Default for EmpiSettings {
    fn default() -> EmpiSettings {
        EmpiSettings {
            resident_id_system: "urn:oid:2.16.156.10011.1.1".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// OpenTelemetry OTLP/HTTP collector base URL (e.g. `http://otel-collector:4318`); traces go
    /// to `<url>/v1/traces`. Empty: no export.
    pub otlp_endpoint: String,
    /// `service.name` resource attribute.
    pub service_name: String,
    /// Share of traces exported, 0.0–1.0.
    pub sample_ratio: f64,
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
    /// Prefix of every Redis key this gateway writes (replicas of one deployment share it).
    pub key_prefix: String,
}

/// Machine authentication (SMART Backend Services token endpoint, access tokens).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Lifetime of issued access tokens, seconds (1–900).
    pub access_token_ttl_secs: u64,
    /// Tolerated clock difference for `exp`, `nbf`, `iat` of client assertions, seconds (0–300).
    pub clock_skew_secs: u64,
    /// How long a replica may use a cached directory entry when checking an access token,
    /// milliseconds: the bound on how late a suspension takes effect (0 = read every request).
    pub directory_cache_ttl_ms: u64,
    /// Token-endpoint requests per minute from one client IP, and the burst above that rate.
    pub ip_per_minute: u32,
    pub ip_burst: u32,
    /// Token-endpoint requests per minute per institution (unless overridden), and burst.
    pub institution_per_minute: u32,
    pub institution_burst: u32,
    /// Per-institution overrides: `[auth.institution_limits.hosp-001] per_minute = 10, burst = 2`.
    pub institution_limits: std::collections::BTreeMap<String, RateLimit>,
}

/// A rate and burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_minute: u32,
    pub burst: u32,
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
            auditor_token: Secret::default(),
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
                key_prefix: "yiqiao:".into(),
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
            telemetry: TelemetrySettings {
                otlp_endpoint: String::new(),
                service_name: "yiqiao".into(),
                sample_ratio: 1.0,
            },
            auth: AuthSettings {
                access_token_ttl_secs: 300,
                clock_skew_secs: 60,
                directory_cache_ttl_ms: 2000,
                ip_per_minute: 300,
                ip_burst: 30,
                institution_per_minute: 60,
                institution_burst: 10,
                institution_limits: Default::default(),
            },
            empi: EmpiSettings::default(),
            audit: AuditSettings {
                signing_key_file: String::new(),
                checkpoint_every: 1000,
                checkpoint_interval_secs: 60,
                batch_max: 2000,
                queue_capacity: 65536,
                write_timeout_ms: 5000,
                replica_id: String::new(),
            },
            mllp: MllpSettings::default(),
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
        if !(0.0..=1.0).contains(&self.telemetry.sample_ratio) {
            return bad("telemetry.sample_ratio", "must be between 0.0 and 1.0");
        }
        if !self.telemetry.otlp_endpoint.is_empty() {
            match url::Url::parse(&self.telemetry.otlp_endpoint) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => {
                    return bad(
                        "telemetry.otlp_endpoint",
                        "must be an http(s) URL such as http://collector:4318",
                    );
                }
            }
        }
        let auth = &self.auth;
        if !(1..=900).contains(&auth.access_token_ttl_secs) {
            return bad("auth.access_token_ttl_secs", "must be between 1 and 900");
        }
        if auth.clock_skew_secs > 300 {
            return bad("auth.clock_skew_secs", "must be at most 300");
        }
        if auth.ip_per_minute == 0 || auth.ip_burst == 0 {
            return bad("auth.ip_per_minute", "rate and burst must be positive");
        }
        if auth.institution_per_minute == 0 || auth.institution_burst == 0 {
            return bad(
                "auth.institution_per_minute",
                "rate and burst must be positive",
            );
        }
        for (id, limit) in &auth.institution_limits {
            if limit.per_minute == 0 || limit.burst == 0 {
                return bad(
                    &format!("auth.institution_limits.{id}"),
                    "rate and burst must be positive",
                );
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
            // Keep a couple of warm connections; r2d2's default (min_idle = pool size) would open
            // the whole pool in background threads at start.
            min_idle: Some(self.database.pool_size.min(2)),
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
