//! The application (service) layer: one function per use case, between the adapters (HTTP
//! routes, the HL7 v2 MLLP feed, `yiqiao mpi import`, the simulator's loader) and the registry.
//!
//! Adapters parse and render; they never write to the registry themselves and never call each
//! other. A service function:
//! 1. asks [`authz::check`] whether the [`Actor`] may do the operation at all (the one
//!    resource × operation × actor table),
//! 2. makes the change through the audited-command primitive, `Auditor::change` /
//!    `Auditor::change_many`: the item's facts are read, the authorization settled
//!    ([`authz::Check::settle`]), the change made and its audit record appended in ONE database
//!    transaction — or nothing is stored. The registry's write functions take
//!    `&mut yiqiao_registry::store::Audited`, which only that primitive can create, so there is
//!    no way to write around it;
//! 3. for reads, records the access durably before any data is returned.

pub mod authz;
pub mod consent;
pub mod encounters;
pub mod offline;
pub mod patients;

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest};
use yiqiao_registry::audit::AuditEvent;

use crate::audit::Auditor;
use crate::auth::{Caller, ON_BEHALF_OF};
use crate::error::{ApiError, ErrorCode};
use crate::staff::Staff;

/// Who is acting: a member institution (access token, the admin credential on its behalf, an
/// authenticated HL7 feed, an operator's bulk import) or a person/operator with roles.
// One Actor per request or feed message, moved, never stored in bulk: boxing the member's
// Caller would cost an allocation per request for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Actor {
    Member(Caller),
    Staff(Staff),
}

impl Actor {
    /// The member institution, if the actor is one.
    pub fn member(&self) -> Option<&Caller> {
        match self {
            Actor::Member(c) => Some(c),
            Actor::Staff(_) => None,
        }
    }

    /// How the registry records who made a change: `institution:<id>` or `staff:<subject>`.
    pub fn recorded_as(&self) -> String {
        match self {
            Actor::Member(c) => c.institution.id.to_string(),
            Actor::Staff(s) => format!("staff:{}", s.subject),
        }
    }

    /// Attribute an audit event to this actor (and to an enterprise patient, when known).
    pub fn attribute(
        &self,
        auditor: &Auditor,
        mut event: AuditEvent,
        patient: Option<String>,
    ) -> AuditEvent {
        match self {
            Actor::Member(c) => auditor.by_caller(event, c, patient),
            Actor::Staff(s) => {
                event.agent_user = Some(s.subject.clone());
                event.agent_role = Some(crate::oidc::roles_text(&s.roles));
                event.patient_id = patient;
                event
            }
        }
    }
}

/// Is this request's credential a staff credential (operator token without
/// `X-On-Behalf-Of`, a staff bearer token, or a session cookie) rather than a member's?
fn presents_staff_credential(req: &HttpRequest) -> bool {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match bearer {
        // Gateway access tokens are JWTs (three dot-separated parts); staff credentials are
        // opaque operator secrets or `yqs_` session tokens.
        Some(token) => !req.headers().contains_key(ON_BEHALF_OF) && token.split('.').count() != 3,
        None => crate::oidc::request_cookie(req, crate::oidc::SESSION_COOKIE).is_some(),
    }
}

/// Does this request present a credential the staff extractor knows by its form — one of the
/// configured operator tokens or a `yqs_` staff bearer token (without `X-On-Behalf-Of`), or a
/// session cookie? A row open only to members authenticates these as staff (so the table
/// answers 403), and anything else through the member path, which logs refused tokens.
pub(crate) fn presents_known_staff_credential(req: &HttpRequest) -> bool {
    use subtle::ConstantTimeEq;
    if !presents_staff_credential(req) {
        return false;
    }
    let Some(token) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
    else {
        return true; // the session cookie
    };
    if token.starts_with("yqs_") {
        return true;
    }
    let Some(state) = req.app_data::<actix_web::web::Data<crate::state::AppState>>() else {
        return false;
    };
    let s = &state.settings;
    [&s.admin_token, &s.auditor_token, &s.steward_token]
        .iter()
        .map(|t| t.expose())
        .filter(|t| !t.is_empty())
        .fold(false, |known, t| {
            known | bool::from(t.as_bytes().ct_eq(token.as_bytes()))
        })
}

impl FromRequest for Actor {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Actor, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        if presents_staff_credential(req) {
            Actor::authenticate_staff(req)
        } else {
            Actor::authenticate_member(req, payload)
        }
    }
}

impl Actor {
    /// Authenticate the request as a person or operator (401 without a staff credential).
    pub(crate) fn authenticate_staff(req: &HttpRequest) -> <Actor as FromRequest>::Future {
        let req = req.clone();
        Box::pin(async move {
            match Staff::authenticate(&req).await? {
                Some(staff) => Ok(Actor::Staff(staff)),
                None => Err(ApiError::new(
                    ErrorCode::Unauthenticated,
                    "an Authorization: Bearer credential is required",
                )
                .header(header::WWW_AUTHENTICATE, "Bearer realm=\"yiqiao\"")),
            }
        })
    }

    /// Authenticate the request as a member institution (the `Caller` extractor: access
    /// token, or the admin credential on its behalf; refused tokens logged within a budget).
    pub(crate) fn authenticate_member(
        req: &HttpRequest,
        payload: &mut Payload,
    ) -> <Actor as FromRequest>::Future {
        let caller = Caller::from_request(req, payload);
        Box::pin(async move { Ok(Actor::Member(caller.await?)) })
    }
}

/// A new audit event like `template` (same agent, purpose, request) for another interaction:
/// its own id and time, no entities.
pub fn derived(template: &AuditEvent, interaction: &str, action: &str) -> AuditEvent {
    let mut e = template.clone();
    e.event_id = uuid::Uuid::now_v7().to_string();
    e.recorded_at = yiqiao_registry::store::now_utc();
    e.subtype_code = interaction.into();
    e.action = action.into();
    e.entities.clear();
    e
}
