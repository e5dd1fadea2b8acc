//! Cross-field and range checks of [`Settings`] that serde cannot express, one function per
//! section; the first failing check is the error, naming its key.

use super::*;

impl Settings {
    /// Cross-field and range checks that serde cannot express, section by section (the first
    /// failing check is reported).
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        self.check_storage()?;
        self.check_audit_retention()?;
        self.check_auth()?;
        self.check_mtls()?;
        self.check_oidc()?;
        self.check_consent()?;
        self.check_audit_alerts()?;
        self.check_federation()?;
        self.check_log_and_limits()?;
        Ok(())
    }

    /// Checks of the database, Redis, public URL and telemetry.
    fn check_storage(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// Checks of how long audit records are kept and archived.
    fn check_audit_retention(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// Checks of token lifetimes and the authentication rate limits.
    fn check_auth(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// Checks of the mutual-TLS listener and the MLLP feed.
    fn check_mtls(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// Checks of staff login through OpenID Connect.
    fn check_oidc(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// Checks of consent enforcement.
    fn check_consent(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// Checks of the audit alert rules and their webhook.
    fn check_audit_alerts(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// Checks of the federated search.
    fn check_federation(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// Checks of the log filter and the API rate limits.
    fn check_log_and_limits(&self) -> Result<(), ConfigError> {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return bad("log.level", &e.to_string());
        }
        if let Err((key, why)) = self.rate_limits.check() {
            return bad(&key, why);
        }
        Ok(())
    }
}

/// The error of a failed check: the key and why.
fn bad(key: &str, why: &str) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid(format!("{key}: {why}")))
}
