//! Topic-based subscriptions (FHIR R4 Subscriptions Backport IG shape) with REST-hook
//! delivery through the transactional outbox, plus `$status` (dead letters visible),
//! `$events` (catch-up after downtime) and `$retry-dead`.
//!
//! Topics (`Subscription.criteria`):
//! - `https://yiqiao.health/fhir/SubscriptionTopic/document`: a document was registered,
//!   replaced or withdrawn; filters `patient`, `patient.identifier`, `type`.
//! - `https://yiqiao.health/fhir/SubscriptionTopic/patient-merge`: two enterprise persons were
//!   merged; filters `patient`, `patient.identifier`.

use std::collections::HashMap;

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::{Value, json};
use yiqiao_registry::audit::EntityRef;
use yiqiao_registry::documents::outbox::{self, NewSubscription, Subscription};
use yiqiao_registry::empi::store as empi;

use crate::auth::Caller;
use crate::documents::{
    FILTER_CRITERIA_EXT, PURPOSE_EXT, TOPIC_DOCUMENT_URL, TOPIC_MERGE_URL, topic_url,
};
use crate::error::{ApiError, ErrorCode};
use crate::extract::ValidJson;
use crate::fhir;
use crate::routes::patients::EMPI_SYSTEM;
use crate::service::authz::{
    Facts, Need, Permit, SubscriptionCreate, SubscriptionDelete, SubscriptionRead,
    SubscriptionSearch, SubscriptionUpdate,
};
use crate::state::AppState;

fn fhir_response(status: StatusCode, body: Value) -> HttpResponse {
    HttpResponse::build(status)
        .content_type(fhir::FHIR_JSON)
        .json(body)
}

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::ValidationFailed, message).field(format!("Subscription.{field}"))
}

fn subscription_view(base: &str, s: &Subscription) -> Value {
    let mut r = s.resource.clone();
    r["id"] = json!(s.id);
    r["status"] = json!(if s.status == "active" {
        "active"
    } else {
        "off"
    });
    r["meta"] =
        json!({ "lastUpdated": format!("{}Z", s.updated_at.format("%Y-%m-%dT%H:%M:%S%.6f")) });
    r["criteria"] = json!(topic_url(&s.topic));
    let _ = base;
    r
}

/// A patient filter to resolve to an enterprise person.
enum PatientFilter {
    Record(String),
    Identifier(String, String),
}

/// The backport filter criteria (`_criteria.extension`): the patient and, for the document
/// topic, the document type.
fn filter_criteria(
    state: &AppState,
    sub: &Value,
    topic: &str,
) -> Result<(Option<PatientFilter>, Option<String>), ApiError> {
    let mut patient = None;
    let mut doc_type = None;
    for (i, ext) in sub
        .get("_criteria")
        .and_then(|c| c.get("extension"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let field = format!("_criteria.extension[{i}]");
        if ext.get("url").and_then(Value::as_str) != Some(FILTER_CRITERIA_EXT) {
            return Err(invalid(
                &field,
                format!("only {FILTER_CRITERIA_EXT} is supported"),
            ));
        }
        let raw = ext
            .get("valueString")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(&field, "filter criteria need valueString"))?;
        let query = raw.split_once('?').map_or(raw, |(_, q)| q);
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
            .map_err(|e| invalid(&field, format!("filter criteria: {e}")))?;
        for (k, v) in pairs {
            match k.as_str() {
                "patient" => {
                    let id = v.rsplit_once("Patient/").map_or(v.as_str(), |(_, id)| id);
                    patient = Some(PatientFilter::Record(id.to_string()));
                }
                "patient.identifier" => {
                    let (s, val) = v.split_once('|').ok_or_else(|| {
                        invalid(&field, "patient.identifier must be system|value")
                    })?;
                    patient = Some(PatientFilter::Identifier(s.into(), val.into()));
                }
                "type" if topic == outbox::TOPIC_DOCUMENT => {
                    let (s, c) = v
                        .split_once('|')
                        .ok_or_else(|| invalid(&field, "type must be system|code"))?;
                    if state.documents.codes.document_type(s, c).is_none() {
                        return Err(invalid(&field, format!("unknown document type {v}")));
                    }
                    doc_type = Some(v.clone());
                }
                other => {
                    return Err(invalid(
                        &field,
                        format!(
                            "unsupported filter {other}; supported: patient, patient.identifier, type (document topic)"
                        ),
                    ));
                }
            }
        }
    }
    Ok((patient, doc_type))
}

/// The rest-hook channel's endpoint, as the outbound policy admits it (crate::outbound).
async fn channel_endpoint(state: &AppState, sub: &Value) -> Result<String, ApiError> {
    let channel = sub
        .get("channel")
        .ok_or_else(|| invalid("channel", "channel is required"))?;
    if channel.get("type").and_then(Value::as_str) != Some("rest-hook") {
        return Err(invalid("channel.type", "channel.type must be rest-hook"));
    }
    let endpoint = channel
        .get("endpoint")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("channel.endpoint", "channel.endpoint is required"))?;
    if !url::Url::parse(endpoint).is_ok_and(|u| u.has_host()) {
        return Err(invalid(
            "channel.endpoint",
            "channel.endpoint must be an absolute URL",
        ));
    }
    // Scheme and destination: the outbound policy (one refusal for all, crate::outbound).
    state
        .outbound
        .check_registration(endpoint, "Subscription.channel.endpoint")
        .await?;
    if let Some(p) = channel.get("payload").and_then(Value::as_str)
        && p != "application/fhir+json"
    {
        return Err(invalid(
            "channel.payload",
            "channel.payload must be application/fhir+json",
        ));
    }
    Ok(endpoint.to_string())
}

/// The enterprise person a filtered patient's record is linked to.
fn linked(link: Option<yiqiao_registry::empi::store::Link>) -> Result<String, ApiError> {
    link.map(|l| l.person_id).ok_or_else(|| {
        invalid(
            "_criteria",
            "the patient is not linked to an enterprise person",
        )
    })
}

/// The enterprise person a patient filter names (checked inside the change's transaction).
fn filter_person(
    conn: &mut yiqiao_registry::store::DbConn,
    patient: Option<PatientFilter>,
) -> Result<Option<String>, ApiError> {
    Ok(match patient {
        None => None,
        Some(PatientFilter::Record(id)) => {
            let r = empi::get_record(conn, &id).map_err(|_| {
                invalid(
                    "_criteria",
                    format!("patient Patient/{id} is not registered"),
                )
            })?;
            Some(linked(r.link)?)
        }
        Some(PatientFilter::Identifier(s, v)) if s == EMPI_SYSTEM => {
            empi::get_person(conn, &v)
                .map_err(|_| invalid("_criteria", format!("person {v} does not exist")))?;
            Some(v)
        }
        Some(PatientFilter::Identifier(s, v)) => {
            let r = empi::find_by_identifier(conn, &s, &v)?.ok_or_else(|| {
                invalid(
                    "_criteria",
                    format!("patient identifier {s}|{v} is not registered"),
                )
            })?;
            Some(linked(r.link)?)
        }
    })
}

/// Create a subscription owned by the calling institution.
#[utoipa::path(post, path = "/fhir/Subscription", tag = "documents",
    request_body(content = Object, description = "Subscription: criteria = topic URL, optional backport filter-criteria, channel rest-hook"),
    responses((status = 201, description = "Subscription (status active)"),
        (status = 422, description = "OperationOutcome naming the field")))]
pub async fn create(
    state: web::Data<AppState>,
    permit: Permit<SubscriptionCreate>,
    body: ValidJson<Value>,
) -> Result<HttpResponse, ApiError> {
    let body = body.checked()?;
    let caller = permit.member()?;
    // Its own subscriptions, by construction (owner: the caller).
    permit.settle(Facts::OWN, None)?;
    let sub = body;
    if sub.get("resourceType").and_then(Value::as_str) != Some("Subscription") {
        return Err(invalid("resourceType", "resourceType must be Subscription"));
    }
    let topic = match sub.get("criteria").and_then(Value::as_str) {
        Some(TOPIC_DOCUMENT_URL) => outbox::TOPIC_DOCUMENT,
        Some(TOPIC_MERGE_URL) => outbox::TOPIC_PATIENT_MERGE,
        _ => {
            return Err(invalid(
                "criteria",
                format!("criteria must be a topic: {TOPIC_DOCUMENT_URL} or {TOPIC_MERGE_URL}"),
            ));
        }
    };
    let (patient, doc_type) = filter_criteria(&state, &sub, topic)?;
    let endpoint = channel_endpoint(&state, &sub).await?;
    let owner = caller.institution.id.to_string();
    // Notifications are decided for the purpose of the credential that subscribed.
    let purpose = caller.purpose.unwrap_or(state.policy.default_purpose());
    let mut sub = sub;
    if let Some(obj) = sub.as_object_mut() {
        let mut exts: Vec<Value> = obj
            .get("extension")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        exts.retain(|e| e.get("url").and_then(Value::as_str) != Some(PURPOSE_EXT));
        exts.push(json!({ "url": PURPOSE_EXT, "valueCode": purpose.code() }));
        obj.insert("extension".into(), Value::Array(exts));
    }
    let event = state
        .auditor
        .by_caller(state.auditor.rest_event("create", "C"), caller, None);
    let stored = state
        .auditor
        .change(event, move |tx, event| -> Result<Subscription, ApiError> {
            let conn = tx.conn();
            let filter_person = filter_person(conn, patient)?;
            let stored = outbox::create_subscription(
                tx,
                &NewSubscription {
                    owner_id: owner,
                    topic: topic.into(),
                    filter_person,
                    filter_type: doc_type,
                    endpoint,
                    resource: sub,
                },
            )?;
            event
                .entities
                .push(EntityRef::resource(format!("Subscription/{}", stored.id)));
            event.patient_id = stored.filter_person.clone();
            Ok(stored)
        })
        .await?;
    let mut resp = fhir_response(
        StatusCode::CREATED,
        subscription_view(&state.base_url, &stored),
    );
    if let Ok(v) = header::HeaderValue::from_str(&format!(
        "{}/fhir/Subscription/{}",
        state.base_url, stored.id
    )) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// The caller's own subscriptions.
#[utoipa::path(get, path = "/fhir/Subscription", tag = "documents",
    params(("_count" = Option<i64>, Query), ("_offset" = Option<i64>, Query)),
    responses((status = 200, description = "searchset Bundle of the caller's subscriptions")))]
pub async fn search(
    state: web::Data<AppState>,
    permit: Permit<SubscriptionSearch>,
    req: HttpRequest,
    query: web::Query<HashMap<String, String>>,
) -> Result<HttpResponse, ApiError> {
    let caller = permit.member()?;
    // Its own subscriptions, by construction (owner: the caller).
    permit.settle(Facts::OWN, None)?;
    crate::routes::check_params(&query, &["_count", "_offset"])?;
    let (count, offset) = crate::routes::paging(&query, 20, 200)?;
    let owner = caller.institution.id.to_string();
    let all = state
        .db(move |conn| outbox::list_subscriptions(conn, &owner))
        .await?;
    let more = all.len() as i64 > offset + count;
    let page: Vec<Value> = all
        .iter()
        .skip(offset as usize)
        .take(count as usize)
        .map(|s| subscription_view(&state.base_url, s))
        .collect();
    let (self_url, next) = crate::routes::directory::page_urls(&state, &req, offset, count, more);
    let event = state
        .auditor
        .search_event(format!("{}?{}", req.path(), req.query_string()));
    state
        .auditor
        .record(state.auditor.by_caller(event, caller, None))
        .await?;
    Ok(fhir_response(
        StatusCode::OK,
        fhir::searchset(&state.base_url, &self_url, next, None, page),
    ))
}

/// The caller's own subscription (another institution's is 404).
async fn own_subscription<N: Need>(
    state: &web::Data<AppState>,
    permit: &Permit<N>,
    id: String,
) -> Result<Subscription, ApiError> {
    let caller = permit.member()?;
    let sub = state
        .db(move |conn| outbox::get_subscription(conn, &id))
        .await?;
    let reference = format!("Subscription/{}", sub.id);
    let mut refused = state.auditor.rest_event(N::OP.name(), N::OP.action());
    refused
        .entities
        .push(EntityRef::resource(reference.clone()));
    let facts = Facts {
        custodian: sub.owner_id == caller.institution.id.as_str(),
        ..Facts::default()
    };
    permit.settle_audited(
        &state.auditor,
        facts,
        Some(&format!("{reference} not found")),
        refused,
    )?;
    Ok(sub)
}

/// The audit event of an operation on a subscription by its owner.
fn sub_event(
    state: &AppState,
    caller: &Caller,
    interaction: &str,
    action: &str,
    sub: &Subscription,
) -> yiqiao_registry::audit::AuditEvent {
    let mut event = state.auditor.rest_event(interaction, action);
    event
        .entities
        .push(EntityRef::resource(format!("Subscription/{}", sub.id)));
    state
        .auditor
        .by_caller(event, caller, sub.filter_person.clone())
}

async fn audit_op(
    state: &web::Data<AppState>,
    caller: &Caller,
    interaction: &str,
    action: &str,
    sub: &Subscription,
    consent: Option<(&str, Value)>,
) -> Result<(), ApiError> {
    let mut event = sub_event(state, caller, interaction, action, sub);
    if let Some((decision, reasons)) = consent {
        event.consent_decision = Some(decision.to_string());
        event.consent_reasons = Some(reasons.to_string());
    }
    state.auditor.record(event).await?;
    Ok(())
}

/// Read one of the caller's subscriptions.
#[utoipa::path(get, path = "/fhir/Subscription/{id}", tag = "documents",
    params(("id" = String, Path)),
    responses((status = 200, description = "Subscription"), (status = 404, description = "OperationOutcome")))]
pub async fn read(
    state: web::Data<AppState>,
    permit: Permit<SubscriptionRead>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let caller = permit.member()?;
    let sub = own_subscription(&state, &permit, id.into_inner()).await?;
    audit_op(&state, caller, "read", "R", &sub, None).await?;
    Ok(fhir_response(
        StatusCode::OK,
        subscription_view(&state.base_url, &sub),
    ))
}

/// Turn a subscription off (no further deliveries; its history stays readable).
#[utoipa::path(delete, path = "/fhir/Subscription/{id}", tag = "documents",
    params(("id" = String, Path)),
    responses((status = 200, description = "Subscription with status off")))]
pub async fn delete(
    state: web::Data<AppState>,
    permit: Permit<SubscriptionDelete>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let caller = permit.member()?;
    let sub = own_subscription(&state, &permit, id.into_inner()).await?;
    let sid = sub.id.clone();
    let event = sub_event(&state, caller, "delete", "D", &sub);
    let sub = state
        .auditor
        .change(event, move |tx, _| {
            outbox::deactivate_subscription(tx, &sid)?;
            Ok(outbox::get_subscription(tx.conn(), &sid)?)
        })
        .await?;
    Ok(fhir_response(
        StatusCode::OK,
        subscription_view(&state.base_url, &sub),
    ))
}

fn status_resource(base: &str, sub: &Subscription, st: &outbox::SubscriptionStatus) -> Value {
    let dead: Vec<Value> = st
        .dead_letters
        .iter()
        .map(|d| {
            json!({ "url": "dead-letter", "extension": [
                { "url": "event-number", "valueString": d.event_seq.to_string() },
                { "url": "attempts", "valueInteger": d.attempts },
                { "url": "last-error", "valueString": d.last_error.clone().unwrap_or_default() },
            ]})
        })
        .collect();
    json!({
        "resourceType": "Parameters",
        "parameter": [
            { "name": "subscription", "valueReference": { "reference": format!("{base}/fhir/Subscription/{}", sub.id) } },
            { "name": "topic", "valueCanonical": topic_url(&sub.topic) },
            { "name": "status", "valueCode": if sub.status == "active" { "active" } else { "off" } },
            { "name": "type", "valueCode": "query-status" },
            { "name": "events-since-subscription-start", "valueString": st.events_since_start.to_string() },
            { "name": "last-acknowledged-event", "valueString": st.last_acknowledged.to_string() },
            { "name": "pending", "valueInteger": st.pending },
            { "name": "delivered", "valueInteger": st.delivered },
            { "name": "withheld", "valueInteger": st.withheld },
            { "name": "dead-lettered", "valueInteger": st.dead },
            { "name": "dead-letters", "extension": dead },
        ],
    })
}

/// `$status`: delivery counters, the last acknowledged event and the dead letters.
#[utoipa::path(get, path = "/fhir/Subscription/{id}/$status", tag = "documents",
    params(("id" = String, Path)),
    responses((status = 200, description = "Parameters (SubscriptionStatus shape, type query-status) with dead letters")))]
pub async fn status(
    state: web::Data<AppState>,
    permit: Permit<SubscriptionRead>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let caller = permit.member()?;
    let sub = own_subscription(&state, &permit, id.into_inner()).await?;
    let sid = sub.id.clone();
    let st = state
        .db(move |conn| outbox::subscription_status(conn, &sid))
        .await?;
    audit_op(&state, caller, "operation", "E", &sub, None).await?;
    Ok(fhir_response(
        StatusCode::OK,
        status_resource(&state.base_url, &sub, &st),
    ))
}

/// `$events`: catch-up. Events matched for the subscription after `eventsSinceNumber`
/// (default: the last acknowledged one), oldest first, as one notification Bundle of type
/// `query-event`. Consent applies as for deliveries.
#[utoipa::path(get, path = "/fhir/Subscription/{id}/$events", tag = "documents",
    params(("id" = String, Path), ("eventsSinceNumber" = Option<i64>, Query), ("_count" = Option<i64>, Query)),
    responses((status = 200, description = "history Bundle with one notification-event per event")))]
pub async fn events(
    state: web::Data<AppState>,
    permit: Permit<SubscriptionRead>,
    id: web::Path<String>,
    query: web::Query<HashMap<String, String>>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let caller = permit.member()?;
    crate::routes::check_params(&query, &["eventsSinceNumber", "_count"])?;
    let since = match query.get("eventsSinceNumber") {
        None => None,
        Some(raw) => Some(raw.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
            ApiError::invalid_param("eventsSinceNumber", "must be a non-negative integer")
        })?),
    };
    let (count, _) = crate::routes::paging(&query, 100, 1000)?;
    let sub = own_subscription(&state, &permit, id.into_inner()).await?;
    let sid = sub.id.clone();
    let (list, st) = state
        .db(move |conn| -> Result<_, ApiError> {
            let since = match since {
                Some(s) => s,
                None => outbox::last_acknowledged(conn, &sid)?,
            };
            let list = outbox::events_since(conn, &sid, since, count)?;
            let st = outbox::subscription_status(conn, &sid)?;
            Ok((list, st))
        })
        .await?;
    // The caller asks now, for the purpose of its own credential: decided like a delivery.
    let purpose = state.policy.ask(caller, &req).purpose;
    let mut events = Vec::new();
    let mut reasons = Vec::new();
    let mut withheld = 0usize;
    for (e, _) in list {
        let d = crate::documents::notify_decision(&state, &caller.institution, purpose, &e).await?;
        reasons.extend(d.reasons.as_array().cloned().unwrap_or_default());
        if d.permitted {
            events.push(e);
        } else {
            withheld += 1;
        }
    }
    let decision = match (events.is_empty(), withheld) {
        (true, 0) => "none",
        (false, 0) => "permit",
        (true, _) => "deny",
        (false, _) => "partial",
    };
    audit_op(
        &state,
        caller,
        "operation",
        "E",
        &sub,
        Some((decision, Value::Array(reasons))),
    )
    .await?;
    Ok(fhir_response(
        StatusCode::OK,
        crate::documents::notification_bundle(&state.base_url, &sub, &events, "query-event", &st),
    ))
}

/// `$retry-dead`: put the subscription's dead-lettered deliveries back in the queue.
#[utoipa::path(post, path = "/fhir/Subscription/{id}/$retry-dead", tag = "documents",
    params(("id" = String, Path)),
    responses((status = 200, description = "Parameters with the number requeued")))]
pub async fn retry_dead(
    state: web::Data<AppState>,
    permit: Permit<SubscriptionUpdate>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let caller = permit.member()?;
    let sub = own_subscription(&state, &permit, id.into_inner()).await?;
    let sid = sub.id.clone();
    let event = sub_event(&state, caller, "operation", "U", &sub);
    let n = state
        .auditor
        .change(event, move |tx, _| Ok(outbox::retry_dead(tx, &sid)?))
        .await?;
    state.documents.wake.notify_one();
    Ok(fhir_response(
        StatusCode::OK,
        json!({ "resourceType": "Parameters", "parameter": [{ "name": "requeued", "valueInteger": n }] }),
    ))
}
