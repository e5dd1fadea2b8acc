//! Institution directory (WS/T 790.7 institution registration).
//!
//! Member institutions with their identity (unified social credit code, region), endpoint,
//! registered public keys, patient-identifier namespace, allowed scopes and status.
//! Validation lives here so that every entry point (HTTP, CLI, import) applies the same rules.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use serde::{Deserialize, Serialize};

use crate::store::schema::institutions;
use crate::store::{Audited, DbConn, StoreError, now_utc};

/// The id of a member institution (a lowercase slug chosen at registration).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InstitutionId(String);

impl InstitutionId {
    pub fn parse(raw: &str) -> Result<InstitutionId, ValidationError> {
        let ok = (2..=64).contains(&raw.len())
            && raw
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && raw
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(InstitutionId(raw.to_string()))
        } else {
            Err(ValidationError::new(
                "id",
                "must be 2–64 characters of a–z, 0–9 and '-', starting with a letter or digit",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for InstitutionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What kind of member an institution is; decides what policy applies to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstitutionKind {
    Hospital,
    InternetHospital,
    PublicHealth,
    RegionalPlatform,
}

impl InstitutionKind {
    pub const ALL: [InstitutionKind; 4] = [
        InstitutionKind::Hospital,
        InstitutionKind::InternetHospital,
        InstitutionKind::PublicHealth,
        InstitutionKind::RegionalPlatform,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InstitutionKind::Hospital => "hospital",
            InstitutionKind::InternetHospital => "internet_hospital",
            InstitutionKind::PublicHealth => "public_health",
            InstitutionKind::RegionalPlatform => "regional_platform",
        }
    }

    pub fn parse(raw: &str) -> Result<InstitutionKind, ValidationError> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == raw)
            .ok_or_else(|| {
                ValidationError::new(
                    "kind",
                    "must be one of hospital, internet_hospital, public_health, regional_platform",
                )
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstitutionStatus {
    Active,
    Suspended,
}

impl InstitutionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            InstitutionStatus::Active => "active",
            InstitutionStatus::Suspended => "suspended",
        }
    }

    fn from_db(raw: &str) -> InstitutionStatus {
        if raw == "active" {
            InstitutionStatus::Active
        } else {
            InstitutionStatus::Suspended
        }
    }
}

/// Hospital grade under the national grading scheme (三级甲等 = `3A`, …), or `unrated`
/// for institutions outside it (platforms, public-health bodies, clinics).
pub const LEVELS: [&str; 10] = [
    "3A", "3B", "3C", "2A", "2B", "2C", "1A", "1B", "1C", "unrated",
];

/// An SM2 public key registered by an institution (SPKI PEM), selected by `kid`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sm2Key {
    pub kid: String,
    pub pem: String,
}

/// A directory entry as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Institution {
    pub id: InstitutionId,
    pub name: String,
    pub uscc: String,
    pub region_code: String,
    pub level: String,
    pub kind: InstitutionKind,
    pub endpoint_url: Option<String>,
    pub jwks: serde_json::Value,
    pub sm2_keys: Vec<Sm2Key>,
    pub patient_id_system: String,
    pub allowed_scopes: Vec<String>,
    pub require_sm_envelope: bool,
    pub status: InstitutionStatus,
    pub version: i64,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

impl Institution {
    pub fn is_active(&self) -> bool {
        self.status == InstitutionStatus::Active
    }
}

/// The registrable fields of an institution (create and full update).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstitutionSpec {
    pub id: String,
    pub name: String,
    pub uscc: String,
    pub region_code: String,
    pub level: String,
    pub kind: String,
    pub endpoint_url: Option<String>,
    pub jwks: Option<serde_json::Value>,
    pub sm2_keys: Vec<Sm2Key>,
    pub patient_id_system: String,
    pub allowed_scopes: Vec<String>,
    pub require_sm_envelope: bool,
}

/// A rule an input broke, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> ValidationError {
        ValidationError {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("institution {0} not found")]
    NotFound(String),
    #[error("{field} {value} is already registered to institution {holder}")]
    Duplicate {
        field: &'static str,
        value: String,
        holder: String,
    },
    #[error("institution {id} is at version {current}, not {expected}")]
    VersionMismatch {
        id: String,
        current: i64,
        expected: i64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<diesel::result::Error> for DirectoryError {
    fn from(err: diesel::result::Error) -> DirectoryError {
        DirectoryError::Store(StoreError::from_diesel(err))
    }
}

/// Validated, normalised form of an [`InstitutionSpec`], ready to store.
#[derive(Debug, Clone)]
pub struct ValidSpec {
    id: InstitutionId,
    name: String,
    uscc: String,
    region_code: String,
    level: String,
    kind: InstitutionKind,
    endpoint_url: Option<String>,
    jwks: serde_json::Value,
    sm2_keys: Vec<Sm2Key>,
    patient_id_system: String,
    allowed_scopes: Vec<String>,
    require_sm_envelope: bool,
}

impl ValidSpec {
    pub fn id(&self) -> &InstitutionId {
        &self.id
    }
}

/// Check every field; the first rule broken is reported with its field name.
pub fn validate(spec: &InstitutionSpec) -> Result<ValidSpec, ValidationError> {
    let id = InstitutionId::parse(&spec.id)?;
    let name = spec.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ValidationError::new("name", "must be 1–200 characters"));
    }
    let uscc = spec.uscc.trim().to_ascii_uppercase();
    validate_uscc(&uscc)?;
    if spec.region_code.len() != 6 || !spec.region_code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ValidationError::new(
            "region_code",
            "must be a 6-digit administrative division code (GB/T 2260)",
        ));
    }
    if !LEVELS.contains(&spec.level.as_str()) {
        return Err(ValidationError::new(
            "level",
            format!("must be one of {}", LEVELS.join(", ")),
        ));
    }
    let kind = InstitutionKind::parse(&spec.kind)?;
    let endpoint_url = match spec.endpoint_url.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(raw) => Some(validate_endpoint(raw)?),
    };
    let jwks = validate_jwks(spec.jwks.clone())?;
    let jwk_kids: Vec<&str> = jwks["keys"]
        .as_array()
        .map(|keys| keys.iter().filter_map(|k| k["kid"].as_str()).collect())
        .unwrap_or_default();
    for (i, key) in spec.sm2_keys.iter().enumerate() {
        let field = format!("sm2_keys[{i}]");
        if key.kid.trim().is_empty() || key.kid.len() > 128 {
            return Err(ValidationError::new(
                format!("{field}.kid"),
                "must be 1–128 characters",
            ));
        }
        if jwk_kids.contains(&key.kid.as_str())
            || spec.sm2_keys[..i].iter().any(|k| k.kid == key.kid)
        {
            return Err(ValidationError::new(
                format!("{field}.kid"),
                format!("kid {} is used by another key of this institution", key.kid),
            ));
        }
        validate_public_pem(&key.pem)
            .map_err(|m| ValidationError::new(format!("{field}.pem"), m))?;
        yiqiao_sm::Sm2PublicKey::from_spki_pem(key.pem.trim()).map_err(|e| {
            ValidationError::new(
                format!("{field}.pem"),
                format!("is not an SM2 public key: {e}"),
            )
        })?;
    }
    let patient_id_system = spec.patient_id_system.trim().to_string();
    validate_system_uri(&patient_id_system)?;
    let mut allowed_scopes = Vec::with_capacity(spec.allowed_scopes.len());
    for (i, scope) in spec.allowed_scopes.iter().enumerate() {
        if !is_smart_scope(scope) {
            return Err(ValidationError::new(
                format!("allowed_scopes[{i}]"),
                format!("{scope:?} is not a SMART scope such as system/Patient.rs"),
            ));
        }
        if !allowed_scopes.contains(scope) {
            allowed_scopes.push(scope.clone());
        }
    }
    Ok(ValidSpec {
        id,
        name: name.to_string(),
        uscc,
        region_code: spec.region_code.clone(),
        level: spec.level.clone(),
        kind,
        endpoint_url,
        jwks,
        sm2_keys: spec.sm2_keys.clone(),
        patient_id_system,
        allowed_scopes,
        require_sm_envelope: spec.require_sm_envelope,
    })
}

const USCC_CHARS: &[u8] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";
const USCC_WEIGHTS: [u32; 17] = [
    1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28,
];

/// The GB 32100 check character for the first 17 characters of a unified social credit code,
/// or `None` when they are not 17 characters of the code alphabet.
pub fn uscc_check_character(first17: &str) -> Option<char> {
    let values: Option<Vec<u32>> = first17
        .bytes()
        .map(|b| USCC_CHARS.iter().position(|c| *c == b).map(|p| p as u32))
        .collect();
    let values = values.filter(|v| v.len() == 17)?;
    let sum: u32 = values.iter().zip(USCC_WEIGHTS).map(|(v, w)| v * w).sum();
    Some(USCC_CHARS[((31 - sum % 31) % 31) as usize] as char)
}

/// Unified social credit code (GB 32100-2015): 18 characters from a 31-character alphabet,
/// the last a MOD 31 check character.
pub fn validate_uscc(code: &str) -> Result<(), ValidationError> {
    let well_formed = code.len() == 18 && code.bytes().all(|b| USCC_CHARS.contains(&b));
    if !well_formed {
        return Err(ValidationError::new(
            "uscc",
            "must be 18 characters of 0-9 and A-Z without I, O, Z, S, V (GB 32100)",
        ));
    }
    if uscc_check_character(&code[..17]) != code[17..].chars().next() {
        return Err(ValidationError::new(
            "uscc",
            "check character does not match (GB 32100)",
        ));
    }
    Ok(())
}

fn validate_endpoint(raw: &str) -> Result<String, ValidationError> {
    let field = "endpoint_url";
    let url =
        url::Url::parse(raw).map_err(|e| ValidationError::new(field, format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ValidationError::new(field, "must be an http or https URL"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ValidationError::new(field, "must not carry credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ValidationError::new(
            field,
            "must be a base URL without query or fragment",
        ));
    }
    Ok(raw.trim_end_matches('/').to_string())
}

fn validate_system_uri(raw: &str) -> Result<(), ValidationError> {
    let field = "patient_id_system";
    let oid_ok = raw.strip_prefix("urn:oid:").is_some_and(|oid| {
        !oid.is_empty()
            && oid
                .split('.')
                .all(|arc| !arc.is_empty() && arc.bytes().all(|b| b.is_ascii_digit()))
    });
    let url_ok =
        (raw.starts_with("http://") || raw.starts_with("https://") || raw.starts_with("urn:"))
            && url::Url::parse(raw).is_ok()
            && !raw.contains('|');
    if oid_ok || (url_ok && !raw.starts_with("urn:oid:")) {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            "must be a URI (urn:oid:… or http(s)://…) without '|'",
        ))
    }
}

fn validate_jwks(jwks: Option<serde_json::Value>) -> Result<serde_json::Value, ValidationError> {
    let Some(jwks) = jwks else {
        return Ok(serde_json::json!({ "keys": [] }));
    };
    let Some(keys) = jwks.get("keys").and_then(|k| k.as_array()) else {
        return Err(ValidationError::new(
            "jwks.keys",
            "a JWKS must be an object with a keys array",
        ));
    };
    let mut kids: Vec<&str> = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let field = format!("jwks.keys[{i}]");
        let kty = key.get("kty").and_then(|v| v.as_str()).unwrap_or_default();
        if !matches!(kty, "RSA" | "EC") {
            return Err(ValidationError::new(
                format!("{field}.kty"),
                "must be RSA or EC",
            ));
        }
        let Some(kid) = key
            .get("kid")
            .and_then(|v| v.as_str())
            .filter(|k| !k.is_empty())
        else {
            return Err(ValidationError::new(
                format!("{field}.kid"),
                "every key needs a kid",
            ));
        };
        if kids.contains(&kid) {
            return Err(ValidationError::new(
                format!("{field}.kid"),
                format!("kid {kid} is repeated"),
            ));
        }
        kids.push(kid);
        for private in ["d", "p", "q", "dp", "dq", "qi", "k"] {
            if key.get(private).is_some() {
                return Err(ValidationError::new(
                    format!("{field}.{private}"),
                    "private key material must never be registered; send the public key only",
                ));
            }
        }
        let required: &[&str] = if kty == "RSA" {
            &["n", "e"]
        } else {
            &["crv", "x", "y"]
        };
        for member in required {
            if key
                .get(*member)
                .and_then(|v| v.as_str())
                .is_none_or(str::is_empty)
            {
                return Err(ValidationError::new(
                    format!("{field}.{member}"),
                    "is required",
                ));
            }
        }
        if kty == "EC" {
            let crv = key["crv"].as_str().unwrap_or_default();
            if !matches!(crv, "P-256" | "P-384") {
                return Err(ValidationError::new(
                    format!("{field}.crv"),
                    "must be P-256 or P-384",
                ));
            }
        }
    }
    Ok(jwks)
}

/// Structural check of an SPKI public key PEM (the SM2 point itself is parsed by
/// `yiqiao_sm::Sm2PublicKey::from_spki_pem` in [`validate`]).
fn validate_public_pem(pem: &str) -> Result<(), String> {
    let body = pem
        .trim()
        .strip_prefix("-----BEGIN PUBLIC KEY-----")
        .and_then(|rest| rest.strip_suffix("-----END PUBLIC KEY-----"))
        .ok_or("must be a PEM public key (-----BEGIN PUBLIC KEY-----)")?;
    let compact: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    let valid_b64 = !compact.is_empty()
        && compact.len().is_multiple_of(4)
        && compact
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
    if valid_b64 && compact.len() < 4096 {
        Ok(())
    } else {
        Err("PEM body is not valid base64".into())
    }
}

/// SMART v1/v2 scope: `system/Patient.rs`, `system/*.read`, `user/AuditEvent.rs` …
pub fn is_smart_scope(scope: &str) -> bool {
    let Some((context, rest)) = scope.split_once('/') else {
        return false;
    };
    let Some((resource, perms)) = rest.split_once('.') else {
        return false;
    };
    let context_ok = matches!(context, "system" | "user" | "patient");
    let resource_ok = resource == "*"
        || (resource.len() <= 64
            && resource
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_uppercase())
            && resource.bytes().all(|b| b.is_ascii_alphanumeric()));
    let perms_ok = matches!(perms, "read" | "write" | "*") || is_v2_permissions(perms);
    context_ok && resource_ok && perms_ok
}

fn is_v2_permissions(perms: &str) -> bool {
    // Letters in the order c r u d s, each at most once, at least one.
    let mut last = None;
    !perms.is_empty()
        && perms.chars().all(|c| {
            let pos = "cruds".find(c);
            let ok = pos.is_some() && pos > last;
            last = pos;
            ok
        })
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = institutions)]
struct InstitutionRow {
    id: String,
    name: String,
    uscc: String,
    region_code: String,
    level: String,
    kind: String,
    endpoint_url: Option<String>,
    jwks: String,
    sm2_keys: String,
    patient_id_system: String,
    allowed_scopes: String,
    require_sm_envelope: bool,
    status: String,
    version: i64,
    created_at: NaiveDateTime,
    updated_at: NaiveDateTime,
}

impl InstitutionRow {
    fn into_institution(self) -> Result<Institution, StoreError> {
        let corrupt = |what: &str| {
            StoreError::Unavailable(format!("stored institution {} has corrupt {what}", self.id))
        };
        Ok(Institution {
            kind: InstitutionKind::parse(&self.kind).map_err(|_| corrupt("kind"))?,
            jwks: serde_json::from_str(&self.jwks).map_err(|_| corrupt("jwks"))?,
            sm2_keys: serde_json::from_str(&self.sm2_keys).map_err(|_| corrupt("sm2_keys"))?,
            allowed_scopes: self
                .allowed_scopes
                .split_whitespace()
                .map(String::from)
                .collect(),
            status: InstitutionStatus::from_db(&self.status),
            id: InstitutionId(self.id),
            name: self.name,
            uscc: self.uscc,
            region_code: self.region_code,
            level: self.level,
            endpoint_url: self.endpoint_url,
            patient_id_system: self.patient_id_system,
            require_sm_envelope: self.require_sm_envelope,
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// Filters for listing institutions.
#[derive(Debug, Clone, Default)]
pub struct InstitutionFilter {
    pub status: Option<InstitutionStatus>,
    pub kind: Option<InstitutionKind>,
    pub name_contains: Option<String>,
    pub uscc: Option<String>,
    pub limit: i64,
    pub offset: i64,
}

/// Look up one institution.
pub fn get(conn: &mut DbConn, id: &str) -> Result<Institution, DirectoryError> {
    institutions::table
        .find(id)
        .select(InstitutionRow::as_select())
        .first(conn)
        .optional()?
        .ok_or_else(|| DirectoryError::NotFound(id.to_string()))?
        .into_institution()
        .map_err(DirectoryError::from)
}

/// Several institutions in one query, in the order of `ids`; `NotFound` names the first id
/// that is not in the directory. (A federated query needs every holder's entry at once.)
pub fn get_many(conn: &mut DbConn, ids: &[String]) -> Result<Vec<Institution>, DirectoryError> {
    let rows: Vec<InstitutionRow> = institutions::table
        .filter(institutions::id.eq_any(ids))
        .select(InstitutionRow::as_select())
        .load(conn)?;
    let mut by_id = std::collections::HashMap::with_capacity(rows.len());
    for row in rows {
        let inst = row.into_institution().map_err(DirectoryError::from)?;
        by_id.insert(inst.id.as_str().to_string(), inst);
    }
    ids.iter()
        .map(|id| {
            by_id
                .get(id)
                .cloned()
                .ok_or_else(|| DirectoryError::NotFound(id.clone()))
        })
        .collect()
}

/// The institution whose patient-identifier namespace is `system`.
pub fn find_by_patient_system(
    conn: &mut DbConn,
    system: &str,
) -> Result<Option<Institution>, DirectoryError> {
    institutions::table
        .filter(institutions::patient_id_system.eq(system))
        .select(InstitutionRow::as_select())
        .first(conn)
        .optional()?
        .map(|row| row.into_institution().map_err(DirectoryError::from))
        .transpose()
}

pub fn list(
    conn: &mut DbConn,
    filter: &InstitutionFilter,
) -> Result<Vec<Institution>, DirectoryError> {
    let mut query = institutions::table
        .select(InstitutionRow::as_select())
        .into_boxed();
    if let Some(status) = filter.status {
        query = query.filter(institutions::status.eq(status.as_str()));
    }
    if let Some(kind) = filter.kind {
        query = query.filter(institutions::kind.eq(kind.as_str()));
    }
    if let Some(name) = &filter.name_contains {
        let escaped = name
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        query = query.filter(institutions::name.like(format!("%{escaped}%")).escape('\\'));
    }
    if let Some(uscc) = &filter.uscc {
        query = query.filter(institutions::uscc.eq(uscc.to_ascii_uppercase()));
    }
    let limit = if filter.limit <= 0 {
        100
    } else {
        filter.limit.min(1000)
    };
    query
        .order(institutions::id.asc())
        .limit(limit)
        .offset(filter.offset.max(0))
        .load::<InstitutionRow>(conn)?
        .into_iter()
        .map(|row| row.into_institution().map_err(DirectoryError::from))
        .collect()
}

pub fn count(conn: &mut DbConn) -> Result<i64, DirectoryError> {
    Ok(institutions::table.count().get_result(conn)?)
}

/// Check that no other institution holds the same unique values (so the error names the field).
fn check_unique(conn: &mut DbConn, spec: &ValidSpec) -> Result<(), DirectoryError> {
    let holders: Vec<(String, String, String)> = institutions::table
        .filter(
            institutions::uscc
                .eq(&spec.uscc)
                .or(institutions::patient_id_system.eq(&spec.patient_id_system)),
        )
        .filter(institutions::id.ne(spec.id.as_str()))
        .select((
            institutions::id,
            institutions::uscc,
            institutions::patient_id_system,
        ))
        .load(conn)?;
    if let Some((holder, _, _)) = holders.iter().find(|(_, uscc, _)| *uscc == spec.uscc) {
        return Err(DirectoryError::Duplicate {
            field: "uscc",
            value: spec.uscc.clone(),
            holder: holder.clone(),
        });
    }
    if let Some((holder, _, _)) = holders.first() {
        return Err(DirectoryError::Duplicate {
            field: "patient_id_system",
            value: spec.patient_id_system.clone(),
            holder: holder.clone(),
        });
    }
    Ok(())
}

/// Register a new institution (active). Atomic: on any error nothing is stored.
pub fn create(tx: &mut Audited<'_>, spec: &ValidSpec) -> Result<Institution, DirectoryError> {
    let conn = tx.conn();
    crate::store::write_tx(conn, |conn| {
        let exists: i64 = institutions::table
            .filter(institutions::id.eq(spec.id.as_str()))
            .count()
            .get_result(conn)?;
        if exists > 0 {
            return Err(DirectoryError::Duplicate {
                field: "id",
                value: spec.id.to_string(),
                holder: spec.id.to_string(),
            });
        }
        check_unique(conn, spec)?;
        let now = now_utc();
        diesel::insert_into(institutions::table)
            .values((
                institutions::id.eq(spec.id.as_str()),
                institutions::status.eq(InstitutionStatus::Active.as_str()),
                institutions::version.eq(1i64),
                institutions::created_at.eq(now),
                institutions::updated_at.eq(now),
                spec_columns(spec)?,
            ))
            .execute(conn)?;
        get(conn, spec.id.as_str())
    })
}

#[allow(clippy::type_complexity)]
fn spec_columns(
    spec: &ValidSpec,
) -> Result<
    (
        diesel::dsl::Eq<institutions::name, String>,
        diesel::dsl::Eq<institutions::uscc, String>,
        diesel::dsl::Eq<institutions::region_code, String>,
        diesel::dsl::Eq<institutions::level, String>,
        diesel::dsl::Eq<institutions::kind, &'static str>,
        diesel::dsl::Eq<institutions::endpoint_url, Option<String>>,
        diesel::dsl::Eq<institutions::jwks, String>,
        diesel::dsl::Eq<institutions::sm2_keys, String>,
        diesel::dsl::Eq<institutions::patient_id_system, String>,
        diesel::dsl::Eq<institutions::allowed_scopes, String>,
        diesel::dsl::Eq<institutions::require_sm_envelope, bool>,
    ),
    DirectoryError,
> {
    let sm2_keys = serde_json::to_string(&spec.sm2_keys)
        .map_err(|e| StoreError::Unavailable(format!("cannot encode sm2_keys: {e}")))?;
    Ok((
        institutions::name.eq(spec.name.clone()),
        institutions::uscc.eq(spec.uscc.clone()),
        institutions::region_code.eq(spec.region_code.clone()),
        institutions::level.eq(spec.level.clone()),
        institutions::kind.eq(spec.kind.as_str()),
        institutions::endpoint_url.eq(spec.endpoint_url.clone()),
        institutions::jwks.eq(spec.jwks.to_string()),
        institutions::sm2_keys.eq(sm2_keys),
        institutions::patient_id_system.eq(spec.patient_id_system.clone()),
        institutions::allowed_scopes.eq(spec.allowed_scopes.join(" ")),
        institutions::require_sm_envelope.eq(spec.require_sm_envelope),
    ))
}

/// Replace the registrable fields of an institution. With `expected_version`, the update
/// only happens if the stored version matches (optimistic concurrency).
pub fn update(
    tx: &mut Audited<'_>,
    spec: &ValidSpec,
    expected_version: Option<i64>,
) -> Result<Institution, DirectoryError> {
    let conn = tx.conn();
    crate::store::write_tx(conn, |conn| {
        let current = get(conn, spec.id.as_str())?;
        check_version(&current, expected_version)?;
        check_unique(conn, spec)?;
        let changed = diesel::update(
            institutions::table
                .filter(institutions::id.eq(spec.id.as_str()))
                .filter(institutions::version.eq(current.version)),
        )
        .set((
            spec_columns(spec)?,
            institutions::version.eq(current.version + 1),
            institutions::updated_at.eq(now_utc()),
        ))
        .execute(conn)?;
        if changed != 1 {
            return Err(DirectoryError::VersionMismatch {
                id: spec.id.to_string(),
                current: current.version,
                expected: current.version,
            });
        }
        get(conn, spec.id.as_str())
    })
}

fn check_version(current: &Institution, expected: Option<i64>) -> Result<(), DirectoryError> {
    match expected {
        Some(expected) if expected != current.version => Err(DirectoryError::VersionMismatch {
            id: current.id.to_string(),
            current: current.version,
            expected,
        }),
        _ => Ok(()),
    }
}

/// Set an institution's status (suspend or reactivate). Idempotent.
pub fn set_status(
    tx: &mut Audited<'_>,
    id: &str,
    status: InstitutionStatus,
    expected_version: Option<i64>,
) -> Result<Institution, DirectoryError> {
    let conn = tx.conn();
    crate::store::write_tx(conn, |conn| {
        let current = get(conn, id)?;
        check_version(&current, expected_version)?;
        if current.status == status {
            return Ok(current);
        }
        diesel::update(institutions::table.filter(institutions::id.eq(id)))
            .set((
                institutions::status.eq(status.as_str()),
                institutions::version.eq(current.version + 1),
                institutions::updated_at.eq(now_utc()),
            ))
            .execute(conn)?;
        get(conn, id)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn uscc_check_character() {
        // Published sample codes with valid check characters.
        assert!(validate_uscc("91350100M000100Y43").is_ok());
        assert!(validate_uscc("91350100M000100Y44").is_err());
        assert!(validate_uscc("91350100M000100Y4").is_err());
        assert!(
            validate_uscc("9135010OM000100Y43").is_err(),
            "O is not in the alphabet"
        );
    }

    #[test]
    fn smart_scopes() {
        for ok in [
            "system/Patient.rs",
            "system/*.read",
            "user/AuditEvent.rs",
            "system/Consent.cruds",
        ] {
            assert!(is_smart_scope(ok), "{ok}");
        }
        for bad in [
            "Patient.rs",
            "system/patient.rs",
            "system/Patient.sr",
            "admin/X.r",
            "system/Patient.",
        ] {
            assert!(!is_smart_scope(bad), "{bad}");
        }
    }

    fn spec() -> InstitutionSpec {
        InstitutionSpec {
            id: "hosp-001".into(),
            name: "第一人民医院".into(),
            uscc: "91350100M000100Y43".into(),
            region_code: "350100".into(),
            level: "3A".into(),
            kind: "hospital".into(),
            endpoint_url: Some("https://his.example/fhir/".into()),
            jwks: None,
            sm2_keys: vec![],
            patient_id_system: "urn:oid:2.16.156.10011.1.99.1".into(),
            allowed_scopes: vec!["system/Patient.rs".into()],
            require_sm_envelope: false,
        }
    }

    #[test]
    #[allow(clippy::type_complexity)]
    fn validation_names_the_field() {
        assert!(validate(&spec()).is_ok());
        let cases: Vec<(&str, Box<dyn Fn(&mut InstitutionSpec)>)> = vec![
            ("id", Box::new(|s| s.id = "Bad Id".into())),
            ("name", Box::new(|s| s.name = "  ".into())),
            ("uscc", Box::new(|s| s.uscc = "123".into())),
            ("region_code", Box::new(|s| s.region_code = "35010".into())),
            ("level", Box::new(|s| s.level = "5Z".into())),
            ("kind", Box::new(|s| s.kind = "pharmacy".into())),
            (
                "endpoint_url",
                Box::new(|s| s.endpoint_url = Some("ftp://x".into())),
            ),
            (
                "patient_id_system",
                Box::new(|s| s.patient_id_system = "not a uri".into()),
            ),
            (
                "allowed_scopes[0]",
                Box::new(|s| s.allowed_scopes = vec!["everything".into()]),
            ),
            (
                "jwks.keys[0].d",
                Box::new(|s| {
                    s.jwks = Some(
                        serde_json::json!({"keys":[{"kty":"EC","kid":"k","crv":"P-256","x":"a","y":"b","d":"secret"}]}),
                    )
                }),
            ),
            (
                "sm2_keys[0].pem",
                Box::new(|s| {
                    s.sm2_keys = vec![Sm2Key {
                        kid: "s".into(),
                        pem: "nope".into(),
                    }]
                }),
            ),
        ];
        for (field, mutate) in cases {
            let mut s = spec();
            mutate(&mut s);
            let err = validate(&s).expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
    }

    /// `get_many` answers in the order asked, with one query, and names a missing id.
    fn get_many_keeps_the_order_and_names_the_missing(backend: crate::Backend) {
        let db = crate::store::testdb::TestStore::new(backend);
        let mut conn = db.store.conn().unwrap();
        for n in 1..=3 {
            let mut s = spec();
            s.id = format!("hosp-00{n}");
            let body = format!("91350100M00010{n}Y4");
            s.uscc = format!("{body}{}", super::uscc_check_character(&body).unwrap());
            s.patient_id_system = format!("urn:oid:2.16.156.10011.1.99.{n}");
            create(&mut Audited::unaudited(&mut conn), &validate(&s).unwrap()).unwrap();
        }
        let ids: Vec<String> = ["hosp-003", "hosp-001", "hosp-002"]
            .map(String::from)
            .to_vec();
        let got = get_many(&mut conn, &ids).unwrap();
        let got_ids: Vec<&str> = got.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(got_ids, ["hosp-003", "hosp-001", "hosp-002"]);
        assert_eq!(got[1], get(&mut conn, "hosp-001").unwrap());
        let missing = get_many(&mut conn, &["hosp-002".into(), "hosp-404".into()]);
        assert!(
            matches!(&missing, Err(DirectoryError::NotFound(id)) if id == "hosp-404"),
            "{missing:?}"
        );
        assert!(get_many(&mut conn, &[]).unwrap().is_empty());
    }

    crate::store::testdb::on_both_backends!(get_many_keeps_the_order_and_names_the_missing);
}
