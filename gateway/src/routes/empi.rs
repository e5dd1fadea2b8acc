//! EMPI administration (admin and steward roles, the authorization table): enterprise persons with their golden
//! record, merge / unmerge, and the review queue. Every change is written to `empi_events`.

use std::collections::HashMap;

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;
use yiqiao_registry::audit::EntityRef;
use yiqiao_registry::empi::record::prepare;
use yiqiao_registry::empi::store::{self as empi, ReviewDecision};

use crate::error::ApiError;
use crate::extract::ValidJson;
use crate::routes::{check_params, paging};
use crate::service::authz::{Permit, PersonRead, PersonUpdate, ReviewItemSearch, ReviewItemUpdate};
use crate::state::AppState;

fn ts(t: chrono::NaiveDateTime) -> String {
    format!("{}Z", t.format("%Y-%m-%dT%H:%M:%S%.6f"))
}

/// An enterprise person: golden record, linked source records with their link evidence,
/// and the events that concern it.
#[utoipa::path(get, path = "/empi/persons/{id}", tag = "empi",
    params(("id" = String, Path)),
    responses((status = 200, description = "Person with golden record, links and events"), (status = 404, description = "OperationOutcome")))]
pub async fn read_person(
    permit: Permit<PersonRead>,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let reference = format!("Person/{id}");
    let (person, events) = state
        .db(move |conn| -> Result<_, empi::EmpiError> {
            Ok((
                empi::get_person(conn, &id)?,
                empi::events_of_person(conn, &id)?,
            ))
        })
        .await?;
    permit
        .record(
            &state.auditor,
            state.auditor.read_event(reference),
            Some(person.id.clone()),
        )
        .await?;
    let golden = empi::golden_record(&person);
    let records: Vec<Value> = person
        .records
        .iter()
        .map(|r| {
            // The matcher's view of the record: is its resident ID trusted, what is wrong.
            let prepared = prepare(&r.record);
            json!({
                "id": r.id,
                "institution": r.institution_id,
                "identifier": { "system": r.id_system, "value": r.id_value },
                "resident_id": prepared.resident_id.as_ref().map(|id| json!({
                    "value": id.number,
                    "trusted": id.trusted,
                })),
                "quality_issues": prepared.issues,
                "link": r.link.as_ref().map(|l| json!({
                    "score": l.score,
                    "explanation": l.explanation,
                    "decided_by": l.decided_by,
                    "actor": l.actor,
                    "decided_at": ts(l.decided_at),
                })),
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "id": person.id,
        "status": person.status,
        "merged_into": person.merged_into,
        "version": person.version,
        "golden": golden,
        "records": records,
        "events": events.iter().map(|e| json!({
            "id": e.id, "kind": e.kind, "person_id": e.person_id,
            "other_person_id": e.other_person_id, "record_id": e.record_id,
            "actor": e.actor, "detail": e.detail, "created_at": ts(e.created_at),
        })).collect::<Vec<_>>(),
    })))
}

/// Body of `$merge` / `$unmerge`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeInput {
    /// The person merged into (or split back out of) the path's person.
    pub source: String,
}

/// Merge person `source` into the path's person.
#[utoipa::path(post, path = "/empi/persons/{id}/$merge", tag = "empi",
    params(("id" = String, Path, description = "the surviving person")),
    request_body = MergeInput,
    responses((status = 200, description = "Merged; the merge event id"), (status = 404, description = "OperationOutcome"), (status = 409, description = "OperationOutcome")))]
pub async fn merge(
    permit: Permit<PersonUpdate>,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: ValidJson<MergeInput>,
) -> Result<HttpResponse, ApiError> {
    merge_step(permit, state, id.into_inner(), body, "$merge", empi::merge).await
}

/// [`empi::merge`] or [`empi::unmerge`].
type MergeStep = fn(
    &mut yiqiao_registry::store::Audited<'_>,
    &str,
    &str,
    &str,
) -> Result<String, empi::EmpiError>;

/// `$merge` or `$unmerge` (`step`) of `source` and `target`, with its audit record in the
/// same transaction; both persons' cached views are dropped afterwards.
async fn merge_step(
    permit: Permit<PersonUpdate>,
    state: web::Data<AppState>,
    target: String,
    body: ValidJson<MergeInput>,
    operation: &'static str,
    step: MergeStep,
) -> Result<HttpResponse, ApiError> {
    let body = body.checked()?;
    let admin = permit.staff()?;
    let source = body.source;
    let actor = admin.subject.clone();
    let mut audit = state
        .auditor
        .staff_event(admin, "operation", "U", format!("Person/{target}"));
    audit.patient_id = Some(target.clone());
    audit.entities.push(EntityRef::query(format!(
        "{operation} source=Person/{source}"
    )));
    let persons = [target.clone(), source.clone()];
    let event = state
        .auditor
        .change(audit, move |conn, _| {
            Ok(step(conn, &target, &source, &actor)?)
        })
        .await?;
    state.persons_merged(&[&persons[0], &persons[1]]).await;
    Ok(HttpResponse::Ok().json(json!({ "event": event })))
}

/// Undo the latest merge of `source` into the path's person, restoring every link exactly.
#[utoipa::path(post, path = "/empi/persons/{id}/$unmerge", tag = "empi",
    params(("id" = String, Path, description = "the person that absorbed source")),
    request_body = MergeInput,
    responses((status = 200, description = "Unmerged; the unmerge event id"), (status = 404, description = "OperationOutcome"), (status = 409, description = "OperationOutcome")))]
pub async fn unmerge(
    permit: Permit<PersonUpdate>,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: ValidJson<MergeInput>,
) -> Result<HttpResponse, ApiError> {
    merge_step(
        permit,
        state,
        id.into_inner(),
        body,
        "$unmerge",
        empi::unmerge,
    )
    .await
}

/// Review items by status (default open), oldest first.
#[utoipa::path(get, path = "/empi/review", tag = "empi",
    params(("status" = Option<String>, Query, description = "open | linked | kept-separate"),
        ("_count" = Option<i64>, Query), ("_offset" = Option<i64>, Query)),
    responses((status = 200, description = "Review items")))]
pub async fn list_review(
    permit: Permit<ReviewItemSearch>,
    state: web::Data<AppState>,
    query: web::Query<HashMap<String, String>>,
) -> Result<HttpResponse, ApiError> {
    check_params(&query, &["status", "_count", "_offset"])?;
    let (count, offset) = paging(&query, 50, 500)?;
    let status = query
        .get("status")
        .cloned()
        .unwrap_or_else(|| "open".into());
    if !["open", "linked", "kept-separate"].contains(&status.as_str()) {
        return Err(ApiError::invalid_param(
            "status",
            "must be open, linked or kept-separate",
        ));
    }
    let items = state
        .db(move |conn| empi::list_review(conn, &status, count, offset))
        .await?;
    permit
        .record(
            &state.auditor,
            state.auditor.search_event("/empi/review".into()),
            None,
        )
        .await?;
    Ok(HttpResponse::Ok().json(json!({ "items": items })))
}

/// A steward's note on a review decision.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReviewInput {
    #[serde(default)]
    pub note: Option<String>,
}

async fn resolve(
    staff: crate::staff::Staff,
    state: web::Data<AppState>,
    id: String,
    decision: ReviewDecision,
    note: Option<String>,
) -> Result<HttpResponse, ApiError> {
    let audit = state
        .auditor
        .staff_event(&staff, "update", "U", format!("EmpiReview/{id}"));
    let actor = staff.subject;
    let item = state
        .auditor
        .change(audit, move |conn, _| {
            Ok(empi::resolve_review(
                conn,
                &id,
                decision,
                &actor,
                note.as_deref(),
            )?)
        })
        .await?;
    Ok(HttpResponse::Ok().json(item))
}

/// Same person: record_b is linked (manual) to record_a's person.
#[utoipa::path(post, path = "/empi/review/{id}/link", tag = "empi",
    params(("id" = String, Path)), request_body = ReviewInput,
    responses((status = 200, description = "The resolved item"), (status = 409, description = "Already resolved")))]
pub async fn review_link(
    permit: Permit<ReviewItemUpdate>,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: ValidJson<ReviewInput>,
) -> Result<HttpResponse, ApiError> {
    let body = body.checked()?;
    let admin = permit.staff()?;
    resolve(
        admin.clone(),
        state,
        id.into_inner(),
        ReviewDecision::Link,
        body.note,
    )
    .await
}

/// Different persons: the pair is never linked automatically.
#[utoipa::path(post, path = "/empi/review/{id}/keep-separate", tag = "empi",
    params(("id" = String, Path)), request_body = ReviewInput,
    responses((status = 200, description = "The resolved item"), (status = 409, description = "Already resolved")))]
pub async fn review_keep_separate(
    permit: Permit<ReviewItemUpdate>,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: ValidJson<ReviewInput>,
) -> Result<HttpResponse, ApiError> {
    let body = body.checked()?;
    let admin = permit.staff()?;
    resolve(
        admin.clone(),
        state,
        id.into_inner(),
        ReviewDecision::KeepSeparate,
        body.note,
    )
    .await
}
