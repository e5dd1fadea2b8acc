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

pub use crate::mllp::settings::{MllpPeer, MllpSettings};

mod check;
mod sections;

pub use sections::*;

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
    /// Bearer credential with the steward role (data stewardship: consents on patients'
    /// behalf, agreements, the EMPI review queue) for operators' jobs, beside people who log in
    /// with that role. Empty disables it.
    #[serde(default)]
    pub steward_token: Secret,
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
    pub oidc: OidcSettings,
    #[serde(default)]
    pub mtls: MtlsSettings,
    /// Consent and access policy (docs/consent.md).
    #[serde(default)]
    pub consent: ConsentSettings,
    #[serde(default)]
    pub federation: FederationSettings,
    #[serde(default)]
    pub documents: DocumentsSettings,
    #[serde(default)]
    pub subscriptions: SubscriptionSettings,
    #[serde(default)]
    pub mllp: MllpSettings,
    /// Rate limits on API calls and public directory reads (crate::ratelimit, docs/auth.md).
    #[serde(default)]
    pub rate_limits: crate::ratelimit::RateLimitSettings,
    /// Policy for the URLs the gateway calls: attachments, webhooks, federation endpoints
    /// (crate::outbound, docs/outbound.md).
    #[serde(default)]
    pub outbound: crate::outbound::OutboundSettings,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            public_url: String::new(),
            admin_token: Secret::default(),
            auditor_token: Secret::default(),
            steward_token: Secret::default(),
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
                failure_log_per_minute: 60,
            },
            empi: EmpiSettings::default(),
            oidc: OidcSettings::default(),
            mtls: MtlsSettings::default(),
            federation: FederationSettings::default(),
            documents: DocumentsSettings::default(),
            subscriptions: SubscriptionSettings::default(),
            audit: AuditSettings {
                signing_key_file: String::new(),
                checkpoint_every: 1000,
                checkpoint_interval_secs: 60,
                batch_max: 2000,
                queue_capacity: 65536,
                write_timeout_ms: 5000,
                replica_id: String::new(),
                refusal_queue_capacity: 10_000,
                alert_scan_interval_secs: 10,
                alert_many_patients_threshold: 50,
                alert_many_patients_window_secs: 600,
                alert_off_hours_start: 22,
                alert_off_hours_end: 6,
                alert_utc_offset_hours: 8,
                alert_break_glass_threshold: 3,
                alert_break_glass_window_secs: 86_400,
                alert_denials_threshold: 20,
                alert_denials_window_secs: 300,
                alert_same_surname_address: true,
                alert_webhook_url: String::new(),
                alert_webhook_max_attempts: 8,
                alert_webhook_timeout_ms: 5000,
                retention_months: 6,
                allow_short_retention: false,
                partition_months_ahead: 3,
                archive_dir: String::new(),
                archive_file_max_records: yiqiao_registry::audit::archive::DEFAULT_FILE_MAX_RECORDS,
                maintenance_interval_secs: 3600,
            },
            consent: ConsentSettings::default(),
            mllp: MllpSettings::default(),
            rate_limits: Default::default(),
            outbound: Default::default(),
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
}

impl Settings {
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
    fn mllp_allow_list_is_read_and_checked() {
        let ok = "[mllp]\nallow = [{ address = \"10.20.1.0/24\", institution = \"fz-004\" }]\n";
        let s = load_toml(ok).unwrap();
        assert_eq!(s.mllp.allow[0].institution, "fz-004");
        assert!(
            Settings::default().mllp.allow.is_empty(),
            "nobody by default"
        );
        let err = load_toml(&ok.replace("10.20.1.0/24", "10.20.1.0/33")).unwrap_err();
        assert!(err.to_string().contains("mllp.allow[0].address"), "{err}");
        let err = load_toml("[mllp]\ntls_listen = \"0.0.0.0:2576\"\n").unwrap_err();
        assert!(err.to_string().contains("mllp.tls_listen"), "{err}");
        let err = load_toml("[mllp]\nmax_fields_per_segment = 0\n").unwrap_err();
        assert!(
            err.to_string().contains("mllp.max_fields_per_segment"),
            "{err}"
        );
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

    /// Audit retention below six months is refused unless explicitly allowed (tests).
    #[test]
    fn short_audit_retention_needs_an_explicit_override() {
        let err = load_toml("[audit]\nretention_months = 5\n").unwrap_err();
        assert!(err.to_string().contains("audit.retention_months"), "{err}");
        let err =
            load_toml("[audit]\nretention_months = 0\nallow_short_retention = true\n").unwrap_err();
        assert!(err.to_string().contains("audit.retention_months"), "{err}");
        let s = load_toml("[audit]\nretention_months = 1\nallow_short_retention = true\n").unwrap();
        assert_eq!(s.audit.retention_months, 1);
        assert_eq!(Settings::default().audit.retention_months, 6);
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
