//! SM envelope answers (docs/federation.md): does the requester want or need its answer sealed,
//! and sealing it. Shared by the adapters that answer with patient data (the federated search,
//! document content), so that no route module imports another.

use actix_web::http::header;
use actix_web::{HttpRequest, web};
use chrono::Utc;
use yiqiao_sm::{ENVELOPE_MEDIA_TYPE, Envelope, RecipientKey, RequestBinding, Sm2PublicKey};

use crate::auth::Caller;
use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;

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
