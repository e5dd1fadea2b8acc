//! `GET /fhir/{Observation|Encounter|Condition|MedicationRequest|DiagnosticReport}?patient=…`
//! and `GET /federation/key`.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use actix_web::{HttpMessage, HttpRequest, HttpResponse, web};
use chrono::{DateTime, NaiveDate, Utc};
use futures::StreamExt;
use serde_json::{Value, json};
use yiqiao_registry::audit::{EntityRef, outcome};
use yiqiao_registry::empi::store as empi;
use yiqiao_sm::ENVELOPE_MEDIA_TYPE;

use super::{Deadlines, Release, Site, SiteResult};
use crate::auth::Caller;
use crate::envelope::{requester_envelope, seal_for};
use crate::error::{ApiError, ErrorCode};
use crate::fhir::{self, INSTITUTION_ID_SYSTEM};
use crate::service::authz::{ClinicalDataSearch, Permit, Public};
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
    let text = crate::fhir::clinical_date(resource)?;
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

/// One released resource, serialised as it was released (the page is assembled from these
/// bytes; no second copy of the resource tree is built).
struct Item {
    /// The resource's JSON text (masked, with `meta.source`).
    json: Vec<u8>,
    custodian: String,
    id: String,
    dedup: String,
    full_url: String,
    when: Option<DateTime<Utc>>,
}

impl Item {
    fn new(
        mut resource: Value,
        custodian: &str,
        endpoint: &str,
        resource_type: &str,
        base_url: &str,
    ) -> Result<Item, ApiError> {
        if !resource["meta"].is_object() {
            resource["meta"] = json!({});
        }
        resource["meta"]["source"] = json!(format!("{base_url}/fhir/Organization/{custodian}"));
        let id = resource["id"].as_str().unwrap_or("").to_string();
        Ok(Item {
            full_url: format!("{endpoint}/{resource_type}/{id}"),
            when: when(&resource),
            dedup: dedup_key(&resource, custodian),
            json: serde_json::to_vec(&resource).map_err(ApiError::internal)?,
            custodian: custodian.to_string(),
            id,
        })
    }
}

fn issue(severity: &str, code: &str, status: &str, inst: Option<&str>, text: String) -> Value {
    let mut coding = vec![json!({ "system": FEDERATION_STATUS_SYSTEM, "code": status })];
    if let Some(id) = inst {
        coding.push(json!({ "system": INSTITUTION_ID_SYSTEM, "code": id }));
    }
    json!({ "severity": severity, "code": code, "details": { "coding": coding, "text": text } })
}

/// The searchset Bundle's JSON text, assembled from the entries' serialised resources.
fn bundle_bytes(
    total: usize,
    links: &[Value],
    page: &[Item],
    outcome: &Value,
) -> Result<Vec<u8>, ApiError> {
    let size: usize = page
        .iter()
        .map(|i| i.json.len() + i.full_url.len() + 64)
        .sum();
    let mut out = Vec::with_capacity(size + 4096);
    fn put<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) -> Result<(), ApiError> {
        serde_json::to_writer(out, v).map_err(ApiError::internal)
    }
    out.extend_from_slice(b"{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"total\":");
    put(&mut out, &total)?;
    out.extend_from_slice(b",\"link\":");
    put(&mut out, links)?;
    out.extend_from_slice(b",\"entry\":[");
    for item in page {
        out.extend_from_slice(b"{\"fullUrl\":");
        put(&mut out, item.full_url.as_str())?;
        out.extend_from_slice(b",\"resource\":");
        out.extend_from_slice(&item.json);
        out.extend_from_slice(b",\"search\":{\"mode\":\"match\"}},");
    }
    put(&mut out, outcome)?;
    out.extend_from_slice(b"]}");
    Ok(out)
}

/// A federated search's parameters: what is forwarded to the hospitals, the enterprise
/// patient, the page and the deadlines.
struct FederatedQuery {
    params: Vec<(String, String)>,
    person: String,
    count: i64,
    offset: i64,
    deadlines: Deadlines,
}

fn parse_query(
    query: &[(String, String)],
    resource_type: &str,
    settings: &crate::config::FederationSettings,
) -> Result<FederatedQuery, ApiError> {
    let allowed = forwarded(resource_type);
    let mut params = Vec::new();
    let mut single: BTreeMap<&str, String> = BTreeMap::new();
    for (k, v) in query {
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
    Ok(FederatedQuery {
        params,
        person,
        count,
        offset,
        deadlines,
    })
}

/// Where the person has records (the holders, with their directory entries through the
/// same per-replica cache as access tokens), and the consent engine's context for releasing
/// their answers; 404 when no institution holds any.
async fn resolve(
    state: &web::Data<AppState>,
    caller: &Caller,
    person: &str,
) -> Result<(Vec<Site>, crate::policy::Prepared), ApiError> {
    // The holders' identifiers in one statement; their directory entries through the same
    // per-replica cache as access tokens (at most `auth.directory_cache_ttl_ms` old).
    // The consent engine's caches are synchronised and the person's consents read on the
    // same trip (their state as of the request's start, like a document search), so the
    // release of each hospital's answer reads nothing shared.
    let lookup = person.to_string();
    let policy = state.policy.clone();
    let requester = crate::policy::Policy::requester(caller);
    let app = state.get_ref().clone();
    let (holders, institutions, synced, prepared) = state
        .db(move |conn| -> Result<_, ApiError> {
            let holders = empi::holders_of_person(conn, &lookup).map_err(ApiError::from)?;
            if holders.is_empty() {
                return Ok((holders, Vec::new(), None, None));
            }
            let ids: Vec<String> = holders.iter().map(|(id, _)| id.clone()).collect();
            let institutions = crate::oauth::cached_institutions_on(&app, conn, &ids)?;
            let synced = policy.sync_on(conn)?;
            let prepared = policy.prepare_on(conn, requester, vec![lookup], synced.as_ref())?;
            Ok((holders, institutions, synced, prepared))
        })
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
    let prepared = match prepared {
        Some(p) => p,
        // With Redis the synchronisation is the engine's own (its marker decides).
        None => {
            state
                .policy
                .prepare(caller, vec![person.to_string()], synced)
                .await?
        }
    };
    Ok((sites, prepared))
}

/// The outcome entry's issues: the summary, each institution that did not answer and why,
/// and what the release policy withheld per institution.
fn outcome_issues(
    results: &[SiteResult],
    problems: &[(&SiteResult, &super::Problem)],
    entries: usize,
    duplicates: usize,
    withheld: &BTreeMap<String, Vec<String>>,
) -> Vec<Value> {
    let answered = results.len() - problems.len();
    let mut issues = vec![issue(
        "information",
        "informational",
        "summary",
        None,
        format!(
            "{} institution(s) hold records of this patient: {answered} answered, {} did not; {} entries ({duplicates} duplicate(s) collapsed)",
            results.len(),
            problems.len(),
            entries
        ),
    )];
    for (site, p) in problems {
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
    for (inst, reasons) in withheld {
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

    issues
}

/// The search's audit record: every institution queried, the failures, what was withheld, and
/// the consent decisions.
fn audit_event(
    state: &AppState,
    target: &str,
    resource_type: &str,
    results: &[SiteResult],
    problems: &[(&SiteResult, &super::Problem)],
    withheld_total: usize,
    released: &crate::policy::Released,
) -> yiqiao_registry::audit::AuditEvent {
    let mut event = state.auditor.search_event(target.to_string());
    for site in results {
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
    event
}

/// Where and for whom each hospital's answer is released.
struct Releasing<'a> {
    state: &'a AppState,
    caller: &'a Caller,
    person: &'a str,
    resource_type: &'a str,
    /// The deployment's hook, applied before the consent engine.
    hook: &'a dyn super::ReleasePolicy,
    prepared: &'a crate::policy::Prepared,
    ask: &'a crate::policy::Ask,
}

/// What the fan-out gathered so far: every site's result, the released entries (serialised),
/// what was withheld per institution and the consent decisions.
#[derive(Default)]
struct Gathered {
    results: Vec<SiteResult>,
    items: Vec<Item>,
    withheld: BTreeMap<String, Vec<String>>,
    released: crate::policy::Released,
    decided: usize,
    /// Time spent releasing, within the fan-out.
    release_s: f64,
}

impl Gathered {
    /// Release one site's answer as it arrives (the hook, then the consent engine with its
    /// masking) and serialise what is kept, while the slower hospitals are still answering.
    fn take(&mut self, mut site: SiteResult, ctx: &Releasing<'_>) -> Result<(), ApiError> {
        let started = std::time::Instant::now();
        let found = match &mut site.result {
            Ok(found) => std::mem::take(found),
            Err(_) => Vec::new(),
        };
        let custodian = site.institution.id.to_string();
        let mut candidates = Vec::with_capacity(found.len());
        for r in found {
            match ctx.hook.release(ctx.caller, ctx.person, &custodian, r) {
                Release::Keep(r) => candidates.push(crate::policy::Candidate {
                    custodian: custodian.clone(),
                    patient: Some(ctx.person.to_string()),
                    resource: r,
                }),
                Release::Withhold { reason } => self
                    .withheld
                    .entry(custodian.clone())
                    .or_default()
                    .push(reason),
            }
        }
        let n = candidates.len();
        let mut part = ctx
            .state
            .policy
            .release_prepared(ctx.prepared, ctx.ask, candidates);
        for w in &part.withheld {
            self.withheld
                .entry(w.custodian.clone())
                .or_default()
                .push(format!("consent policy: {}", w.rule));
        }
        let base = site.institution.endpoint_url.as_deref().unwrap_or_default();
        for (_, r) in part.take_kept() {
            self.items.push(Item::new(
                r,
                &custodian,
                base,
                ctx.resource_type,
                &ctx.state.base_url,
            )?);
        }
        self.released.append(part, self.decided);
        self.decided += n;
        self.results.push(site);
        self.release_s += started.elapsed().as_secs_f64();
        Ok(())
    }
}

/// Each site's position in the directory order.
fn directory_order(sites: &[Site]) -> std::collections::HashMap<String, usize> {
    sites
        .iter()
        .enumerate()
        .map(|(i, s)| (s.institution.id.to_string(), i))
        .collect()
}

/// Routing, middleware and the extractors (authentication) before the handler ran, ms.
fn before_handler_ms(req: &HttpRequest, handler_started: std::time::Instant) -> f64 {
    req.extensions()
        .get::<crate::middleware::RequestStarted>()
        .map_or(0.0, |s| {
            handler_started.duration_since(s.0).as_secs_f64() * 1000.0
        })
}

/// The federated type the path names.
fn federated_type(req: &HttpRequest) -> Result<String, ApiError> {
    req.path()
        .rsplit('/')
        .next()
        .filter(|t| FEDERATED_TYPES.contains(t))
        .map(str::to_string)
        .ok_or_else(|| ApiError::new(ErrorCode::UnknownRoute, "not a federated type"))
}

/// Newest first (then by custodian and id), duplicates collapsed: how many were.
fn merge(items: &mut Vec<Item>) -> usize {
    items.sort_by(|a, b| {
        b.when
            .cmp(&a.when)
            .then_with(|| a.custodian.cmp(&b.custodian))
            .then_with(|| a.id.cmp(&b.id))
    });
    let before = items.len();
    let mut seen = HashSet::new();
    items.retain_mut(|i| seen.insert(std::mem::take(&mut i.dedup)));
    before - items.len()
}

/// The page of the merged entries as a searchset Bundle (self and next links, the outcome
/// entry last).
fn encode_page(
    base_url: &str,
    query: &[(String, String)],
    resource_type: &str,
    (count, offset): (i64, i64),
    items: &[Item],
    issues: Vec<Value>,
) -> Result<Vec<u8>, ApiError> {
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
            base_url,
            serde_urlencoded::to_string(&q).unwrap_or_default()
        )
    };
    let mut links = vec![json!({ "relation": "self", "url": page_url(start) })];
    if end < total {
        links.push(json!({ "relation": "next", "url": page_url(end) }));
    }
    let outcome = json!({
        "resource": { "resourceType": "OperationOutcome", "issue": issues },
        "search": { "mode": "outcome" },
    });
    bundle_bytes(total, &links, &items[start..end], &outcome)
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
    permit: Permit<ClinicalDataSearch>,
    query: web::Query<Vec<(String, String)>>,
) -> Result<HttpResponse, ApiError> {
    let resource_type = federated_type(&req)?;
    let caller = permit.member()?;
    permit.type_scope(&resource_type)?;
    let handler_started = std::time::Instant::now();
    let before_ms = before_handler_ms(&req, handler_started);
    let fed = state.federation.clone();
    let query = query.into_inner();
    let FederatedQuery {
        params,
        person,
        count,
        offset,
        deadlines,
    } = parse_query(&query, &resource_type, fed.settings())?;
    let requester_envelope = requester_envelope(&req, caller)?;

    // Where does the person have records?
    let resolve_started = std::time::Instant::now();
    let (sites, prepared) = resolve(&state, caller, &person).await?;
    let ask = state.policy.ask(caller, &req);
    // Where each site was in the directory order: the outcome and the audit record list
    // them in that order, whatever order they answered in.
    let order = directory_order(&sites);

    let resolve_ms = ms_since(resolve_started);
    let fan_out_started = std::time::Instant::now();
    // Each answer is released (federation hook, then the consent engine with its masking)
    // and serialised as it arrives, while the slower hospitals are still answering: after
    // the last answer only its own resources are left to do.
    let hook = fed.policy();
    let releasing = Releasing {
        state: &state,
        caller,
        person: &person,
        resource_type: &resource_type,
        hook: &*hook,
        prepared: &prepared,
        ask: &ask,
    };
    let mut gathered = Gathered::default();
    let mut answers = std::pin::pin!(fed.fan_out_each(&resource_type, sites, &params, deadlines));
    while let Some(site) = answers.next().await {
        gathered.take(site, &releasing)?;
    }
    let Gathered {
        mut results,
        mut items,
        withheld,
        released,
        release_s,
        ..
    } = gathered;
    let fan_out_ms = ms_since(fan_out_started);
    results.sort_by_key(|r| order.get(r.institution.id.as_str()).copied());
    let slowest_ms = results
        .iter()
        .filter_map(|r| r.round_trip)
        .max()
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let release_started = std::time::Instant::now();
    let problems: Vec<(&SiteResult, &super::Problem)> = results
        .iter()
        .filter_map(|site| site.result.as_ref().err().map(|p| (site, p)))
        .collect();
    let duplicates = merge(&mut items);

    let withheld_total: usize = withheld.values().map(Vec::len).sum();
    let issues = outcome_issues(&results, &problems, items.len(), duplicates, &withheld);

    // The audit record, before anything is sent.
    let release_ms = ms_since(release_started);
    let audit_started = std::time::Instant::now();
    let target = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| req.path().to_string());
    let event = audit_event(
        &state,
        &target,
        &resource_type,
        &results,
        &problems,
        withheld_total,
        &released,
    );
    // The record goes to the writer now; the page is encoded (and sealed) while it is made
    // durable, and nothing is sent before it is.
    let pending = state
        .auditor
        .submit(state.auditor.by_caller(event, caller, Some(person.clone())))
        .await?;
    let submit_ms = ms_since(audit_started);

    // The page.
    let encode_started = std::time::Instant::now();
    let payload = encode_page(
        &state.base_url,
        &query,
        &resource_type,
        (count, offset),
        &items,
        issues,
    )?;
    let (body, content_type) = match requester_envelope {
        None => (payload, fhir::FHIR_JSON),
        Some(envelope) => (
            seal_for(
                &state,
                caller,
                &target,
                envelope,
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
         resolve;dur={resolve_ms:.2}, release-each;dur={:.2};desc=\"releasing each answer as it came, within the fan-out\", \
         release;dur={release_ms:.2};desc=\"merging, after the fan-out\", audit;dur={audit_ms:.2}, \
         encode;dur={encode_ms:.2}, before;dur={before_ms:.2}, handler;dur={:.2}",
        release_s * 1000.0,
        ms_since(handler_started)
    );
    Ok(HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("Server-Timing", timing))
        .body(body))
}

/// The gateway's SM2 envelope key: hospitals seal answers to it; requesters verify the
/// gateway's envelopes with it.
#[utoipa::path(get, path = "/federation/key", tag = "federation",
    responses((status = 200, description = "{ gateway_id, key_id, public_key_pem }")))]
pub async fn gateway_key(
    _public: Public,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
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
