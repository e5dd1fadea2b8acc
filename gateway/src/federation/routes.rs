//! `GET /fhir/{Observation|Encounter|Condition|MedicationRequest|DiagnosticReport}?patient=…`
//! and `GET /federation/key`.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Value, json};
use yiqiao_registry::audit::{EntityRef, outcome};
use yiqiao_registry::empi::store as empi;
use yiqiao_sm::{ENVELOPE_MEDIA_TYPE, Envelope, RecipientKey, RequestBinding, Sm2PublicKey};

use super::{Deadlines, Release, Site, SiteResult};
use crate::auth::Caller;
use crate::error::{ApiError, ErrorCode};
use crate::fhir::{self, INSTITUTION_ID_SYSTEM};
use crate::state::AppState;

/// Resource types answered by fan-out.
pub const FEDERATED_TYPES: [&str; 5] = [
    "Observation",
    "Encounter",
    "Condition",
    "MedicationRequest",
    "DiagnosticReport",
];
/// Code system of the per-institution status in the outcome entry.
pub const FEDERATION_STATUS_SYSTEM: &str =
    "https://yiqiao.health/fhir/CodeSystem/federation-status";

/// Search parameters forwarded to hospitals, per type.
fn forwarded(resource_type: &str) -> &'static [&'static str] {
    match resource_type {
        "Encounter" => &["date"],
        _ => &["code", "date"],
    }
}

const GATEWAY_PARAMS: [&str; 5] = [
    "patient",
    "_count",
    "_offset",
    "_timeout",
    "_endpointTimeout",
];

fn ms_since(t: std::time::Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn millis_param(name: &str, raw: &str, max: u64) -> Result<Duration, ApiError> {
    raw.parse::<u64>()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .map(Duration::from_millis)
        .ok_or_else(|| {
            ApiError::invalid_param(name, format!("must be milliseconds from 1 to {max}"))
        })
}

/// When a resource happened, for sorting (newest first; undated last).
fn when(resource: &Value) -> Option<DateTime<Utc>> {
    let text = crate::sim::data::clinical_date(resource)?;
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(text.get(..10)?, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

/// The deduplication key: the first business identifier, else the custodian's id.
fn dedup_key(resource: &Value, custodian: &str) -> String {
    let ident = &resource["identifier"][0];
    match (ident["system"].as_str(), ident["value"].as_str()) {
        (Some(s), Some(v)) => format!("{}|{s}|{v}", resource["resourceType"]),
        _ => format!(
            "{}/{}@{custodian}",
            resource["resourceType"],
            resource["id"].as_str().unwrap_or("")
        ),
    }
}

struct Item {
    resource: Value,
    custodian: String,
    full_url: String,
    when: Option<DateTime<Utc>>,
}

fn issue(severity: &str, code: &str, status: &str, inst: Option<&str>, text: String) -> Value {
    let mut coding = vec![json!({ "system": FEDERATION_STATUS_SYSTEM, "code": status })];
    if let Some(id) = inst {
        coding.push(json!({ "system": INSTITUTION_ID_SYSTEM, "code": id }));
    }
    json!({ "severity": severity, "code": code, "details": { "coding": coding, "text": text } })
}

/// Federated search (docs/federation.md).
#[utoipa::path(get, path = "/fhir/Observation", tag = "federation",
    params(("patient" = String, Query, description = "enterprise patient id (EMPI person)"),
        ("code" = Option<String>, Query, description = "token, forwarded to hospitals (not for Encounter)"),
        ("date" = Option<String>, Query, description = "[eq|ge|gt|le|lt]YYYY[-MM[-DD]], forwarded; may repeat"),
        ("_count" = Option<i64>, Query, description = "page size"),
        ("_offset" = Option<i64>, Query, description = "entries to skip (next links carry it)"),
        ("_timeout" = Option<u64>, Query, description = "overall deadline, ms (≤ federation.max_timeout_ms)"),
        ("_endpointTimeout" = Option<u64>, Query, description = "per-institution deadline, ms")),
    responses((status = 200, description = "searchset Bundle: merged entries (meta.source = custodian) and an OperationOutcome entry (search.mode=outcome) naming every institution that failed and why; application/yiqiao-sm-envelope+json when asked with Accept"),
        (status = 404, description = "no records linked to the enterprise patient")))]
pub async fn search(
    state: web::Data<AppState>,
    req: HttpRequest,
    caller: Caller,
    query: web::Query<Vec<(String, String)>>,
) -> Result<HttpResponse, ApiError> {
    let resource_type = req
        .path()
        .rsplit('/')
        .next()
        .filter(|t| FEDERATED_TYPES.contains(t))
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownRoute, "not a federated type"))?
        .to_string();
    caller.require(&resource_type, 'r')?;
    caller.require(&resource_type, 's')?;
    let handler_started = std::time::Instant::now();
    let fed = state.federation.clone();
    let settings = fed.settings().clone();
    let query = query.into_inner();
    let allowed = forwarded(&resource_type);
    let mut params = Vec::new();
    let mut single: BTreeMap<&str, String> = BTreeMap::new();
    for (k, v) in &query {
        if GATEWAY_PARAMS.contains(&k.as_str()) {
            if single.insert(k.as_str(), v.clone()).is_some() {
                return Err(ApiError::invalid_param(k, "may be given only once"));
            }
        } else if allowed.contains(&k.as_str()) {
            if v.is_empty() {
                return Err(ApiError::invalid_param(k, "must not be empty"));
            }
            params.push((k.clone(), v.clone()));
        } else {
            let mut known: Vec<&str> = GATEWAY_PARAMS.to_vec();
            known.extend_from_slice(allowed);
            return Err(ApiError::invalid_param(
                k,
                format!("unknown parameter; supported: {}", known.join(", ")),
            ));
        }
    }
    let person = single
        .get("patient")
        .map(|p| p.strip_prefix("Patient/").unwrap_or(p).to_string())
        .filter(|p| !p.is_empty() && p.len() <= 128)
        .ok_or_else(|| {
            ApiError::invalid_param("patient", "the enterprise patient id is required")
        })?;
    let paging_query = single
        .iter()
        .filter(|(k, _)| matches!(**k, "_count" | "_offset"))
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let (count, offset) = crate::routes::paging(
        &paging_query,
        settings.default_page_size as i64,
        settings.max_page_size as i64,
    )?;
    let mut deadlines = Deadlines {
        overall: Duration::from_millis(settings.overall_timeout_ms),
        endpoint: Duration::from_millis(settings.endpoint_timeout_ms),
    };
    if let Some(raw) = single.get("_timeout") {
        deadlines.overall = millis_param("_timeout", raw, settings.max_timeout_ms)?;
    }
    if let Some(raw) = single.get("_endpointTimeout") {
        deadlines.endpoint = millis_param("_endpointTimeout", raw, settings.max_timeout_ms)?;
    }
    let requester_envelope = requester_envelope(&req, &caller)?;

    // Where does the person have records?
    let resolve_started = std::time::Instant::now();
    // The holders' identifiers in one statement; their directory entries through the same
    // per-replica cache as access tokens (at most `auth.directory_cache_ttl_ms` old).
    // The consent engine's caches are synchronised on the same trip (their state as of the
    // request's start, like a document search), so the release after the fan-out reads
    // nothing shared.
    let lookup = person.clone();
    let policy = state.policy.clone();
    let (holders, synced) = state
        .db(move |conn| -> Result<_, ApiError> {
            let holders = empi::holders_of_person(conn, &lookup).map_err(ApiError::from)?;
            Ok((holders, policy.sync_on(conn)?))
        })
        .await?;
    let institutions = crate::oauth::cached_institutions(
        &state,
        holders.iter().map(|(id, _)| id.clone()).collect(),
    )
    .await?;
    let sites: Vec<Site> = institutions
        .into_iter()
        .zip(holders)
        .map(|(institution, (_, identifiers))| Site {
            institution,
            identifiers,
        })
        .collect();
    if sites.is_empty() {
        return Err(ApiError::not_found(format!(
            "no records are linked to enterprise patient {person}"
        )));
    }

    let resolve_ms = ms_since(resolve_started);
    let fan_out_started = std::time::Instant::now();
    let mut results = fed.fan_out(&resource_type, sites, &params, deadlines).await;
    let fan_out_ms = ms_since(fan_out_started);
    let slowest_ms = results
        .iter()
        .filter_map(|r| r.round_trip)
        .max()
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let release_started = std::time::Instant::now();

    // Release policy per institution and resource, then merge.
    let policy = fed.policy();
    let mut items = Vec::new();
    let mut withheld: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut problems: Vec<(&SiteResult, &super::Problem)> = Vec::new();
    let mut answered = 0usize;
    // The answers are moved out (not copied) into the merge; `results` keeps the rest.
    let found_by_site: Vec<Vec<Value>> = results
        .iter_mut()
        .map(|site| match &mut site.result {
            Ok(found) => std::mem::take(found),
            Err(_) => Vec::new(),
        })
        .collect();
    for (site, found) in results.iter().zip(found_by_site) {
        let custodian = site.institution.id.as_str();
        match &site.result {
            Err(p) => problems.push((site, p)),
            Ok(_) => {
                answered += 1;
                let base = site.institution.endpoint_url.clone().unwrap_or_default();
                for r in found {
                    match policy.release(&caller, &person, custodian, r) {
                        Release::Keep(mut r) => {
                            if !r["meta"].is_object() {
                                r["meta"] = json!({});
                            }
                            r["meta"]["source"] =
                                json!(format!("{}/fhir/Organization/{custodian}", state.base_url));
                            let full_url = format!(
                                "{base}/{resource_type}/{}",
                                r["id"].as_str().unwrap_or("")
                            );
                            items.push(Item {
                                when: when(&r),
                                resource: r,
                                custodian: custodian.to_string(),
                                full_url,
                            });
                        }
                        Release::Withhold { reason } => withheld
                            .entry(custodian.to_string())
                            .or_default()
                            .push(reason),
                    }
                }
            }
        }
    }
    // The consent engine (crate::policy) decides per custodian and resource, and masks what
    // it releases; its decisions and reasons go into the audit record below.
    let ask = state.policy.ask(&caller, &req);
    let candidates = items
        .iter_mut()
        .map(|i| crate::policy::Candidate {
            custodian: i.custodian.clone(),
            patient: Some(person.clone()),
            resource: std::mem::take(&mut i.resource),
        })
        .collect();
    let released = state
        .policy
        .release_with(&caller, &ask, candidates, synced)
        .await?;
    let mut kept: std::collections::HashMap<usize, Value> = released.kept.iter().cloned().collect();
    for w in &released.withheld {
        withheld
            .entry(w.custodian.clone())
            .or_default()
            .push(format!("consent policy: {}", w.rule));
    }
    let items: Vec<Item> = items
        .into_iter()
        .enumerate()
        .filter_map(|(idx, mut item)| {
            kept.remove(&idx).map(|r| {
                item.resource = r;
                item
            })
        })
        .collect();
    let mut items = items;
    items.sort_by(|a, b| {
        b.when
            .cmp(&a.when)
            .then_with(|| a.custodian.cmp(&b.custodian))
            .then_with(|| a.resource["id"].as_str().cmp(&b.resource["id"].as_str()))
    });
    let before = items.len();
    let mut seen = HashSet::new();
    items.retain(|i| seen.insert(dedup_key(&i.resource, &i.custodian)));
    let duplicates = before - items.len();

    // The outcome entry.
    let mut issues = vec![issue(
        "information",
        "informational",
        "summary",
        None,
        format!(
            "{} institution(s) hold records of this patient: {answered} answered, {} did not; {} entries ({duplicates} duplicate(s) collapsed)",
            results.len(),
            problems.len(),
            items.len()
        ),
    )];
    for (site, p) in &problems {
        issues.push(issue(
            "warning",
            p.issue_type(),
            p.label(),
            Some(site.institution.id.as_str()),
            format!(
                "{} ({}): {}: {}",
                site.institution.id,
                site.institution.name,
                p.label(),
                p.detail()
            ),
        ));
    }
    let withheld_total: usize = withheld.values().map(Vec::len).sum();
    for (inst, reasons) in &withheld {
        let mut distinct: Vec<&String> = reasons.iter().collect();
        distinct.sort();
        distinct.dedup();
        issues.push(issue(
            "information",
            "suppressed",
            "withheld",
            Some(inst),
            format!(
                "{inst}: {} resource(s) withheld by the release policy: {}",
                reasons.len(),
                distinct
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        ));
    }

    // The audit record, before anything is sent.
    let release_ms = ms_since(release_started);
    let audit_started = std::time::Instant::now();
    let target = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| req.path().to_string());
    let mut event = state.auditor.search_event(target.clone());
    for site in &results {
        event.entities.push(EntityRef::resource(format!(
            "Organization/{}",
            site.institution.id
        )));
    }
    let failures: Vec<String> = problems
        .iter()
        .map(|(s, p)| format!("{} {}: {}", s.institution.id, p.label(), p.detail()))
        .collect();
    event.entities.push(EntityRef::query(format!(
        "federated {resource_type}: queried {}; failed: {}; withheld: {withheld_total}",
        results
            .iter()
            .map(|s| s.institution.id.as_str())
            .collect::<Vec<_>>()
            .join(","),
        if failures.is_empty() {
            "none".to_string()
        } else {
            failures.join(" | ")
        }
    )));
    if !problems.is_empty() {
        event.outcome = outcome::MINOR_FAILURE.into();
    }
    released.annotate(&mut event);
    if withheld_total > released.withheld.len() {
        // The federation release hook withheld more than the consent engine did.
        event.consent_decision = Some(format!("partial: {withheld_total} withheld"));
    }
    // The record goes to the writer now; the page is encoded (and sealed) while it is made
    // durable, and nothing is sent before it is.
    let pending = state
        .auditor
        .submit(
            state
                .auditor
                .by_caller(event, &caller, Some(person.clone())),
        )
        .await?;
    let submit_ms = ms_since(audit_started);

    // The page.
    let encode_started = std::time::Instant::now();
    let total = items.len();
    let start = (offset as usize).min(total);
    let end = (start + count as usize).min(total);
    let page_url = |off: usize| {
        let mut q: Vec<(String, String)> = query
            .iter()
            .filter(|(k, _)| k != "_offset" && k != "_count")
            .cloned()
            .collect();
        q.push(("_count".into(), count.to_string()));
        q.push(("_offset".into(), off.to_string()));
        format!(
            "{}/fhir/{resource_type}?{}",
            state.base_url,
            serde_urlencoded::to_string(&q).unwrap_or_default()
        )
    };
    let mut links = vec![json!({ "relation": "self", "url": page_url(start) })];
    if end < total {
        links.push(json!({ "relation": "next", "url": page_url(end) }));
    }
    let mut entries: Vec<Value> = items[start..end]
        .iter()
        .map(|i| json!({ "fullUrl": i.full_url, "resource": i.resource, "search": { "mode": "match" } }))
        .collect();
    entries.push(json!({
        "resource": { "resourceType": "OperationOutcome", "issue": issues },
        "search": { "mode": "outcome" },
    }));
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
        "entry": entries,
    });

    let payload = serde_json::to_vec(&bundle).map_err(ApiError::internal)?;
    let (body, content_type) = match requester_envelope {
        None => (payload, fhir::FHIR_JSON),
        Some((request_id, key)) => (
            seal_for(
                &state,
                &caller,
                &target,
                (request_id, key),
                payload,
                "application/fhir+json",
            )
            .await?
            .into_bytes(),
            ENVELOPE_MEDIA_TYPE,
        ),
    };
    let encode_ms = ms_since(encode_started);
    let wait_started = std::time::Instant::now();
    pending.durable().await?;
    // `audit`: preparing and queueing the record, plus any wait for durability left after
    // encoding (the rest of the write overlapped the encoding and sealing).
    let audit_ms = submit_ms + ms_since(wait_started);
    // Server-Timing (W3C): the slowest successful upstream round trip, the whole fan-out, and
    // the gateway's own stages around it (what the gateway adds over its slowest hospital).
    let timing = format!(
        "upstream;dur={slowest_ms:.2};desc=\"slowest endpoint round trip\", fanout;dur={fan_out_ms:.2}, \
         resolve;dur={resolve_ms:.2}, release;dur={release_ms:.2}, audit;dur={audit_ms:.2}, \
         encode;dur={encode_ms:.2}, handler;dur={:.2}",
        ms_since(handler_started)
    );
    Ok(HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("Server-Timing", timing))
        .body(body))
}

/// Whether the requester wants (Accept) or must get (its directory entry) an SM envelope
/// answer: its X-Request-Id (the envelope is bound to it) and its registered SM2 key. An error
/// when it wants one but sent no request id or has no key.
pub fn requester_envelope(
    req: &HttpRequest,
    caller: &Caller,
) -> Result<Option<(String, RecipientKey)>, ApiError> {
    let wants_envelope = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.to_ascii_lowercase().contains(ENVELOPE_MEDIA_TYPE))
        || caller.institution.require_sm_envelope;
    if !wants_envelope {
        return Ok(None);
    }
    let request_id = req
        .headers()
        .get(crate::middleware::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            ApiError::invalid_param(
                "X-Request-Id",
                "an SM envelope answer is bound to your X-Request-Id; send one",
            )
        })?
        .to_string();
    let key = caller
        .institution
        .sm2_keys
        .iter()
        .find_map(|k| {
            Sm2PublicKey::from_spki_pem(&k.pem)
                .ok()
                .map(|pk| RecipientKey {
                    key_id: k.kid.clone(),
                    public_key: pk,
                })
        })
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "institution {} has no SM2 key registered; an SM envelope cannot be sealed to it",
                    caller.institution.id
                ),
            )
        })?;
    Ok(Some((request_id, key)))
}

/// Seal `payload` (of `content_type`) to the requester, signed by the gateway and bound to
/// `GET target` with the requester's request id; the envelope's JSON text.
pub async fn seal_for(
    state: &AppState,
    caller: &Caller,
    target: &str,
    (request_id, key): (String, RecipientKey),
    payload: Vec<u8>,
    content_type: &str,
) -> Result<String, ApiError> {
    let requester = caller.institution.id.to_string();
    let sender = state.federation.sender().clone();
    let (target, content_type) = (target.to_string(), content_type.to_string());
    web::block(move || -> Result<String, String> {
        let binding = RequestBinding::new("GET", &target, &requester, &request_id)
            .map_err(|e| e.to_string())?;
        Envelope::seal(&payload, &content_type, &sender, &key, &binding, Utc::now())
            .and_then(|e| e.to_json())
            .map_err(|e| e.to_string())
    })
    .await?
    .map_err(ApiError::internal)
}

/// The gateway's SM2 envelope key: hospitals seal answers to it; requesters verify the
/// gateway's envelopes with it.
#[utoipa::path(get, path = "/federation/key", tag = "federation",
    responses((status = 200, description = "{ gateway_id, key_id, public_key_pem }")))]
pub async fn gateway_key(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let fed = &state.federation;
    let pem = fed.public_key().to_spki_pem().map_err(ApiError::internal)?;
    Ok(HttpResponse::Ok().json(json!({
        "gateway_id": fed.settings().gateway_id,
        "key_id": fed.settings().key_id,
        "public_key_pem": pem,
        "signer_id": yiqiao_sm::DEFAULT_SIGNER_ID,
        "envelope_media_type": ENVELOPE_MEDIA_TYPE,
    })))
}

/// OpenAPI: the federated search is documented once (on `/fhir/Observation`) and copied to the
/// other federated types as their GET (other methods on the path, e.g. `POST /fhir/Encounter`,
/// are kept).
pub struct FederatedPaths;

impl utoipa::Modify for FederatedPaths {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let Some(item) = openapi.paths.paths.get("/fhir/Observation").cloned() else {
            return;
        };
        for t in FEDERATED_TYPES.iter().filter(|t| **t != "Observation") {
            let path = openapi
                .paths
                .paths
                .entry(format!("/fhir/{t}"))
                .or_insert_with(|| item.clone());
            path.get.clone_from(&item.get);
        }
    }
}
