//! The sections of [`Settings`] other than its top-level keys, each with its defaults.

use super::*;

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
