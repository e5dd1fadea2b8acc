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

/// A second listener with TLS that asks institutions for client certificates (mutual TLS,
/// docs/auth.md). Institutions bound to a certificate must use it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsSettings {
    /// Address of the TLS listener (e.g. `0.0.0.0:8443`). Empty: no mutual TLS.
    pub listen: String,
    /// PEM file with the server certificate chain.
    pub cert_file: String,
    /// PEM file with the server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
    /// PEM file with the CA certificates that issue institutions' client certificates.
    pub client_ca_file: String,
}

/// People's login through OpenID Connect (docs/auth.md, "People").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcSettings {
    /// Issuer URL of the OpenID provider (discovery at `<issuer>/.well-known/openid-configuration`).
    /// Empty: people cannot log in (`/login` answers 404); operator tokens still work.
    pub issuer_url: String,
    /// Client id registered at the provider.
    pub client_id: String,
    /// Client secret (client_secret_basic at the provider's token endpoint).
    pub client_secret: Secret,
    /// Redirect URL registered at the provider. Empty: `<public_url>/login/callback`.
    pub redirect_url: String,
    /// Scopes requested besides `openid` (e.g. `profile`, or a scope that releases the roles).
    pub scopes: Vec<String>,
    /// ID-token claim carrying the person's groups or roles (a string or an array of strings);
    /// a dotted path reaches into objects (`realm_access.roles`).
    pub role_claim: String,
    /// Claim value → gateway roles (`admin`, `auditor`, `security-officer`), e.g.
    /// `"yiqiao-admins" = ["admin"]`. Values not listed grant nothing; a person without any
    /// gateway role cannot log in.
    pub role_map: std::collections::BTreeMap<String, Vec<String>>,
    /// Lifetime of a browser session (absolute, from login), seconds.
    pub session_ttl_secs: u64,
    /// Lifetime of a staff bearer token from `POST /login/token`, seconds (never past the
    /// session it comes from).
    pub bearer_ttl_secs: u64,
    /// Mark cookies `Secure` (HTTPS only). Turn off only for tests on plain http.
    pub cookie_secure: bool,
    /// Timeout of each request to the provider (discovery, JWKS, token endpoint), ms.
    pub http_timeout_ms: u64,
}

impl Default for OidcSettings {
    fn default() -> OidcSettings {
        OidcSettings {
            issuer_url: String::new(),
            client_id: String::new(),
            client_secret: Secret::default(),
            redirect_url: String::new(),
            scopes: vec!["profile".into()],
            role_claim: "roles".into(),
            role_map: Default::default(),
            session_ttl_secs: 8 * 3600,
            bearer_ttl_secs: 3600,
            cookie_secure: true,
            http_timeout_ms: 5000,
        }
    }
}

/// Why `consent.enforce = false` is refused (at load, and by the policy in a normal build).
pub const UNENFORCED_REFUSED: &str = "cannot be false: consent enforcement is never turned off by configuration (only a benchmark build with the cargo feature bench-unenforced can turn it off, from code)";

/// Consent and access-policy enforcement (docs/consent.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentSettings {
    /// Enforce policy decisions at every exit: must be `true` (the default). Configuration
    /// cannot turn enforcement off ([`UNENFORCED_REFUSED`]); only code in a build with the cargo
    /// feature `bench-unenforced` can, to measure what enforcement costs.
    pub enforce: bool,
    /// Purpose of use (HL7 v3 ActReason code) assumed when the credential carries none
    /// (the admin credential acting on behalf of an institution), and bound to access tokens
    /// requested without `purpose_of_use` (a stock SMART Backend Services client) unless the
    /// institution has its own default below.
    pub default_purpose: String,
    /// Per-institution default purpose of use for access tokens requested without
    /// `purpose_of_use`: `[consent.institution_purposes] hosp-009 = "PUBHLTH"`.
    #[serde(default)]
    pub institution_purposes: std::collections::BTreeMap<String, String>,
    /// Hex-encoded key (at least 16 bytes) for pseudonyms (HMAC-SM3). Empty: releases that must
    /// be pseudonymised (research) are withheld. Replicas must share one key.
    pub pseudonym_key: Secret,
    /// Most patients whose consents one replica caches; when full the cache starts over.
    pub cache_max_patients: usize,
    /// With Redis: longest a replica trusts the Redis change counter alone before it also reads
    /// the database counter (bounds staleness if a writer could not reach Redis), milliseconds.
    pub cache_max_age_ms: u64,
    /// The policy rules (`[consent.policy]`, see docs/consent.md): default_mode, default_purposes,
    /// purposes_by_kind, break_glass_kinds, sensitive_categories,
    /// explicit_permit_confidentiality, agreement_required_for, masking.
    pub policy: yiqiao_consent::PolicyConfig,
}

impl Default for ConsentSettings {
    fn default() -> ConsentSettings {
        ConsentSettings {
            enforce: true,
            default_purpose: "TREAT".into(),
            institution_purposes: Default::default(),
            pseudonym_key: Secret::default(),
            cache_max_patients: 200_000,
            cache_max_age_ms: 5000,
            policy: yiqiao_consent::PolicyConfig::default(),
        }
    }
}

/// Federated queries to member hospitals (docs/federation.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSettings {
    /// This gateway's ID: `requester_id` in request bindings it sends, `sender_id` of the
    /// envelopes it seals for requesters.
    pub gateway_id: String,
    /// PEM file (PKCS#8) of the gateway's SM2 key: hospitals encrypt response keys to it, the
    /// gateway signs requester envelopes with it. Empty: `<data_dir>/gateway-sm2-key.pem`,
    /// generated on first start. Replicas must share one key.
    pub sm2_key_file: String,
    /// `recipient_key_id` hospitals put in envelopes sealed to the gateway key.
    pub key_id: String,
    /// Deadline for one institution (all attempts together), milliseconds.
    pub endpoint_timeout_ms: u64,
    /// Deadline for the whole federated request, milliseconds.
    pub overall_timeout_ms: u64,
    /// Largest deadline a request may ask for with `_timeout` / `_endpointTimeout`.
    pub max_timeout_ms: u64,
    /// Upstream calls in flight at once in this process, all endpoints together.
    pub max_concurrency: usize,
    /// Upstream calls in flight at once to one endpoint.
    pub max_concurrency_per_endpoint: usize,
    /// Extra attempts after a retryable failure (connection error, 429, 502, 503, 504).
    pub retries: u32,
    /// Base of the exponential backoff between attempts; the wait is uniform in
    /// [0, base × 2^attempt] ("full jitter"), milliseconds.
    pub retry_backoff_ms: u64,
    /// Consecutive failures that open an endpoint's circuit.
    pub breaker_failure_threshold: u32,
    /// How long an open circuit refuses calls before one half-open probe, milliseconds.
    pub breaker_cooldown_ms: u64,
    /// Largest upstream response body accepted, bytes.
    pub max_response_bytes: usize,
    /// Tolerated age / clock difference of an upstream envelope's timestamp, seconds.
    pub max_skew_secs: u64,
    /// TCP connect timeout for upstream calls, milliseconds.
    pub connect_timeout_ms: u64,
    /// Idle keep-alive connections kept per upstream host.
    pub pool_max_idle_per_host: usize,
    /// How long an idle upstream connection is kept, seconds.
    pub pool_idle_timeout_secs: u64,
    /// Entries per page when the request has no `_count`.
    pub default_page_size: usize,
    /// Largest `_count` accepted.
    pub max_page_size: usize,
}

impl Default for FederationSettings {
    fn default() -> FederationSettings {
        FederationSettings {
            gateway_id: "yiqiao-gateway".into(),
            sm2_key_file: String::new(),
            key_id: "gateway-sm2-1".into(),
            endpoint_timeout_ms: 2000,
            overall_timeout_ms: 5000,
            max_timeout_ms: 30_000,
            max_concurrency: 512,
            max_concurrency_per_endpoint: 16,
            retries: 1,
            retry_backoff_ms: 50,
            breaker_failure_threshold: 5,
            breaker_cooldown_ms: 10_000,
            max_response_bytes: 4 * 1024 * 1024,
            max_skew_secs: 300,
            connect_timeout_ms: 1000,
            pool_max_idle_per_host: 32,
            pool_idle_timeout_secs: 90,
            default_page_size: 100,
            max_page_size: 1000,
        }
    }
}

/// Document registry (docs/documents.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DocumentsSettings {
    /// Document type code systems accepted, by name in the code table (`loinc`, `wst500`).
    pub type_systems: Vec<String>,
    /// A code table file replacing the shipped one (same JSON shape as
    /// registry/src/documents/document_codes.json). Empty: the shipped table.
    pub code_file: String,
    /// Most DocumentReferences in one transaction Bundle.
    pub max_bundle_entries: usize,
    /// Timeout of a retrieval from a custodian (`GET /fhir/Binary/{id}`).
    pub retrieval_timeout_ms: u64,
    /// Largest document the gateway relays on retrieval, bytes.
    pub max_retrieval_bytes: u64,
}

impl Default for DocumentsSettings {
    fn default() -> DocumentsSettings {
        DocumentsSettings {
            type_systems: vec!["loinc".into(), "wst500".into()],
            code_file: String::new(),
            max_bundle_entries: 100,
            retrieval_timeout_ms: 10_000,
            max_retrieval_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Subscriptions: the transactional outbox's delivery worker (docs/documents.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubscriptionSettings {
    /// Run the delivery worker in this replica (every replica may; leases keep them apart).
    pub worker: bool,
    /// How often an idle worker looks for due deliveries.
    pub poll_interval_ms: u64,
    /// How long a claimed delivery stays leased to one worker (must exceed request_timeout_ms).
    pub lease_ms: u64,
    /// Timeout of one webhook POST.
    pub request_timeout_ms: u64,
    /// Attempts before a delivery is dead-lettered.
    pub max_attempts: u32,
    /// Backoff after the first failure; doubles per attempt up to backoff_max_ms (with jitter).
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// Most deliveries one worker claims at a time (at most one per subscription).
    pub claim_batch: i64,
}

impl Default for SubscriptionSettings {
    fn default() -> SubscriptionSettings {
        SubscriptionSettings {
            worker: true,
            poll_interval_ms: 1000,
            lease_ms: 30_000,
            request_timeout_ms: 10_000,
            max_attempts: 8,
            backoff_initial_ms: 1000,
            backoff_max_ms: 300_000,
            claim_batch: 32,
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
    /// Refused requests (401/403) waiting to be recorded. When full, further refusals are
    /// counted and recorded as one summary record instead of one record each. Public directory
    /// reads have a queue of their own of the same size.
    pub refusal_queue_capacity: usize,
    /// Seconds between anomaly scans of the trail on this replica (0: this replica does not scan).
    pub alert_scan_interval_secs: u64,
    /// Alert when one agent reads more than this many distinct patients within the window (0: off).
    pub alert_many_patients_threshold: u64,
    pub alert_many_patients_window_secs: u64,
    /// Local hours [start, end) that count as unusual for data access (start == end: off).
    pub alert_off_hours_start: u32,
    pub alert_off_hours_end: u32,
    /// Local time = UTC + this many hours (China Standard Time: 8).
    pub alert_utc_offset_hours: i32,
    /// Alert when one agent breaks the glass (ETREAT) at least this often within the window (0: off).
    pub alert_break_glass_threshold: u64,
    pub alert_break_glass_window_secs: u64,
    /// Alert when one agent has at least this many refused requests within the window (0: off).
    pub alert_denials_threshold: u64,
    pub alert_denials_window_secs: u64,
    /// Alert when a user on an institution's staff roster (named by `X-Yiqiao-User`) accesses a
    /// patient sharing their surname and address (`same-surname-address`).
    pub alert_same_surname_address: bool,
    /// POST every new alert as JSON to this URL (empty: no webhook).
    pub alert_webhook_url: String,
    /// Delivery attempts per alert before it is marked failed (exponential back-off, ≤ 5 min).
    pub alert_webhook_max_attempts: u32,
    /// Timeout of one webhook request.
    pub alert_webhook_timeout_ms: u64,
    /// Months of audit records kept in the database (whole months older than this may be
    /// archived and dropped). At least 6 (Cybersecurity Law) unless `allow_short_retention`.
    pub retention_months: u32,
    /// Allow `retention_months` below 6 (tests only; not compliant).
    pub allow_short_retention: bool,
    /// PostgreSQL: monthly partitions of `audit_events` are kept this many months ahead.
    pub partition_months_ahead: u32,
    /// Directory for scheduled archives (`yiqiao audit archive` on a timer). Empty: no
    /// scheduled archive; run the command instead.
    pub archive_dir: String,
    /// Most records in one archive file: a month holding more is archived as several files
    /// (consecutive ranges, each a signed bundle), so archiving never holds more than this
    /// many records in memory.
    pub archive_file_max_records: i64,
    /// Seconds between maintenance runs on this replica (partitions ahead; the scheduled
    /// archive when `archive_dir` is set). 0: none (start-up still makes the partitions).
    pub maintenance_interval_secs: u64,
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
    /// API calls refused for a bad, expired or forged access token (and failed staff logins)
    /// written to `auth_events` per minute by one replica; more are counted and summarised in
    /// the next row, so a flood cannot fill the disk.
    pub failure_log_per_minute: u32,
}

/// A rate and burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
        if let Err((key, why)) = self.outbound.check() {
            return bad(&key, &why);
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
        let audit = &self.audit;
        if audit.retention_months == 0 {
            return bad("audit.retention_months", "must be at least 1");
        }
        if audit.retention_months < yiqiao_registry::audit::archive::MIN_RETENTION_MONTHS
            && !audit.allow_short_retention
        {
            return bad(
                "audit.retention_months",
                "must be at least 6 (the Cybersecurity Law keeps network logs at least six months); audit.allow_short_retention = true overrides it for tests",
            );
        }
        if !(1..=10_000_000).contains(&audit.archive_file_max_records) {
            return bad(
                "audit.archive_file_max_records",
                "must be between 1 and 10000000",
            );
        }
        if audit.partition_months_ahead == 0 || audit.partition_months_ahead > 24 {
            return bad("audit.partition_months_ahead", "must be between 1 and 24");
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
        let mtls = &self.mtls;
        if !mtls.listen.is_empty() {
            if mtls.listen.parse::<SocketAddr>().is_err() {
                return bad("mtls.listen", "must be an address such as 0.0.0.0:8443");
            }
            if mtls.cert_file.is_empty()
                || mtls.key_file.is_empty()
                || mtls.client_ca_file.is_empty()
            {
                return bad(
                    "mtls.cert_file",
                    "cert_file, key_file and client_ca_file are required with mtls.listen",
                );
            }
        }
        if let Err((key, why)) = self.mllp.check(&self.mtls) {
            return bad(&key, &why);
        }
        let oidc = &self.oidc;
        if !oidc.issuer_url.is_empty() {
            match url::Url::parse(&oidc.issuer_url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => return bad("oidc.issuer_url", "must be an http(s) URL"),
            }
            if oidc.client_id.is_empty() {
                return bad("oidc.client_id", "is required when oidc.issuer_url is set");
            }
            if oidc.role_claim.is_empty() {
                return bad("oidc.role_claim", "is required when oidc.issuer_url is set");
            }
        }
        if !oidc.redirect_url.is_empty() && url::Url::parse(&oidc.redirect_url).is_err() {
            return bad("oidc.redirect_url", "must be a URL");
        }
        for (value, roles) in &oidc.role_map {
            for role in roles {
                if crate::staff::Role::parse(role).is_none() {
                    return bad(
                        &format!("oidc.role_map.{value}"),
                        &format!("unknown role {role:?} (admin, auditor, security-officer)"),
                    );
                }
            }
        }
        if oidc.session_ttl_secs == 0 || oidc.bearer_ttl_secs == 0 || oidc.http_timeout_ms == 0 {
            return bad(
                "oidc.session_ttl_secs",
                "session_ttl_secs, bearer_ttl_secs and http_timeout_ms must be positive",
            );
        }
        let consent = &self.consent;
        if !consent.enforce {
            return bad("consent.enforce", UNENFORCED_REFUSED);
        }
        if yiqiao_consent::Purpose::from_code(&consent.default_purpose).is_none() {
            return bad(
                "consent.default_purpose",
                "must be an HL7 v3 ActReason code: TREAT, ETREAT, HPAYMT, HOPERAT, PUBHLTH, HRESCH or PATRQT",
            );
        }
        for (id, code) in &consent.institution_purposes {
            if yiqiao_consent::Purpose::from_code(code).is_none() {
                return bad(
                    &format!("consent.institution_purposes.{id}"),
                    "must be an HL7 v3 ActReason code: TREAT, ETREAT, HPAYMT, HOPERAT, PUBHLTH, HRESCH or PATRQT",
                );
            }
        }
        if consent.pseudonym_key.is_set() {
            match hex::decode(consent.pseudonym_key.expose()) {
                Ok(k) if k.len() >= yiqiao_consent::PseudonymKey::MIN_LEN => {}
                _ => {
                    return bad(
                        "consent.pseudonym_key",
                        "must be at least 16 bytes, hex-encoded",
                    );
                }
            }
        }
        if consent.cache_max_patients == 0 {
            return bad("consent.cache_max_patients", "must be positive");
        }
        if let Err(e) = consent.policy.validate() {
            return bad("consent.policy", &e.to_string());
        }
        let audit = &self.audit;
        if audit.alert_off_hours_start > 23 || audit.alert_off_hours_end > 23 {
            return bad("audit.alert_off_hours_start", "hours must be 0–23");
        }
        if !(-12..=14).contains(&audit.alert_utc_offset_hours) {
            return bad("audit.alert_utc_offset_hours", "must be between -12 and 14");
        }
        for (key, secs) in [
            (
                "audit.alert_many_patients_window_secs",
                audit.alert_many_patients_window_secs,
            ),
            (
                "audit.alert_break_glass_window_secs",
                audit.alert_break_glass_window_secs,
            ),
            (
                "audit.alert_denials_window_secs",
                audit.alert_denials_window_secs,
            ),
        ] {
            if secs == 0 {
                return bad(key, "must be positive");
            }
        }
        if !audit.alert_webhook_url.is_empty() {
            match url::Url::parse(&audit.alert_webhook_url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => return bad("audit.alert_webhook_url", "must be an http(s) URL"),
            }
        }
        let fed = &self.federation;
        if fed.gateway_id.trim().is_empty() || fed.key_id.trim().is_empty() {
            return bad(
                "federation.gateway_id",
                "gateway_id and key_id must not be empty",
            );
        }
        if fed.endpoint_timeout_ms == 0 || fed.overall_timeout_ms == 0 {
            return bad(
                "federation.overall_timeout_ms",
                "deadlines must be positive",
            );
        }
        if fed.max_timeout_ms < fed.overall_timeout_ms.max(fed.endpoint_timeout_ms) {
            return bad(
                "federation.max_timeout_ms",
                "must be at least overall_timeout_ms and endpoint_timeout_ms",
            );
        }
        if fed.max_concurrency == 0 || fed.max_concurrency_per_endpoint == 0 {
            return bad(
                "federation.max_concurrency",
                "concurrency caps must be positive",
            );
        }
        if fed.breaker_failure_threshold == 0 {
            return bad("federation.breaker_failure_threshold", "must be positive");
        }
        if fed.max_response_bytes < 1024 {
            return bad("federation.max_response_bytes", "must be at least 1024");
        }
        if fed.default_page_size == 0 || fed.max_page_size < fed.default_page_size {
            return bad(
                "federation.max_page_size",
                "default_page_size must be positive and at most max_page_size",
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return bad("log.level", &e.to_string());
        }
        if let Err((key, why)) = self.rate_limits.check() {
            return bad(&key, why);
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
