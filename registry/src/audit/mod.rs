//! Tamper-evident audit trail: every security-relevant event becomes a FHIR AuditEvent
//! (IHE BALP), appended to one SM3 hash chain shared by all gateway replicas, with SM2-signed
//! checkpoints of the chain head.
//!
//! Invariants (see docs/audit.md for the exact byte formats):
//! - `seq` is dense (1, 2, 3, …) and equals the chain position; it is assigned under the lock
//!   of the single `audit_chain_head` row, in the same transaction as the insert.
//! - `hash = SM3("yiqiao-audit-v1\n" ‖ prev_hash_hex ‖ "\n" ‖ resource)` where `resource` is the
//!   stored AuditEvent JSON text, byte for byte. The first record's `prev_hash` is 64 zeros.
//! - The indexed columns are derived from the same [`AuditEvent`] as the resource; verification
//!   rebuilds the resource from the columns and requires it to equal the hashed one.
//! - A checkpoint signs `(seq, head hash, signed_at, key id)` with the gateway's SM2 key.

pub mod alerts;
mod append;
pub mod archive;
pub mod export;
pub mod query;
mod verify;

use chrono::NaiveDateTime;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use yiqiao_sm::{
    DEFAULT_SIGNER_ID, Sm2PrivateKey, Sm2PublicKey, Sm2Signature, Sm2SigningKey, SmError,
};

pub use append::{
    AppendOptions, Appended, ChangeError, PreparedEvent, append_batch, append_many_with,
    append_with, chain_head, checkpoint_due,
};
pub use verify::{
    ChainVerifier, CheckpointRecord, Problem, ProblemKind, Report, seq_at_or_after,
    seq_at_or_before, verify_db,
};

/// `prev_hash` of the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Domain prefix of a record hash input.
pub const HASH_DOMAIN: &str = "yiqiao-audit-v1\n";
/// First line of a checkpoint's signed message.
pub const CHECKPOINT_DOMAIN: &str = "yiqiao-audit-checkpoint-v1";

pub const AUDIT_EVENT_TYPE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";
pub const DICOM_SYSTEM: &str = "http://dicom.nema.org/resources/ontology/DCM";
pub const RESTFUL_INTERACTION_SYSTEM: &str = "http://hl7.org/fhir/restful-interaction";
pub const OBJECT_ROLE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/object-role";
/// The `agent_user` of records made by the admin credential acting on behalf of an institution
/// (`X-On-Behalf-Of`): not a person on any staff roster.
pub const ADMIN_ON_BEHALF_USER: &str = "admin-token";
pub const PURPOSE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
pub const INSTITUTION_SYSTEM: &str = "https://yiqiao.health/fhir/sid/institution-id";
pub const EMPI_SYSTEM: &str = "https://yiqiao.health/fhir/sid/empi";
pub const EXT_CONSENT: &str =
    "https://yiqiao.health/fhir/StructureDefinition/audit-consent-decision";
pub const EXT_REQUEST_ID: &str = "https://yiqiao.health/fhir/StructureDefinition/request-id";

/// Outcome codes of AuditEvent.outcome.
pub mod outcome {
    pub const SUCCESS: &str = "0";
    pub const MINOR_FAILURE: &str = "4";
    pub const SERIOUS_FAILURE: &str = "8";
    pub const MAJOR_FAILURE: &str = "12";
}

/// One object the event is about (AuditEvent.entity). `role` is an object-role code
/// (`1` patient, `4` domain resource, `24` query); for a query `what` is the query text,
/// otherwise a reference such as `Organization/hosp-001`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntityRef {
    pub role: String,
    pub what: String,
}

impl EntityRef {
    pub fn resource(reference: impl Into<String>) -> EntityRef {
        EntityRef {
            role: "4".into(),
            what: reference.into(),
        }
    }
    pub fn query(text: impl Into<String>) -> EntityRef {
        EntityRef {
            role: "24".into(),
            what: text.into(),
        }
    }
}

/// An audit event before it has a chain position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub event_id: String,
    pub recorded_at: NaiveDateTime,
    /// `rest` etc. (audit-event-type) or a DICOM code such as `110114` (user authentication).
    pub type_code: String,
    /// A restful-interaction code (`read`, `search-type`, `create`, `update`) or a DICOM code.
    pub subtype_code: String,
    /// C R U D E.
    pub action: String,
    /// 0, 4, 8, 12.
    pub outcome: String,
    pub agent_institution: Option<String>,
    pub agent_user: Option<String>,
    pub agent_role: Option<String>,
    pub purpose_of_use: Option<String>,
    /// Enterprise (EMPI) patient id.
    pub patient_id: Option<String>,
    pub entities: Vec<EntityRef>,
    pub consent_decision: Option<String>,
    /// The decision's reasons as JSON text (stored as it is, in the consent extension's
    /// `reasons` valueString).
    pub consent_reasons: Option<String>,
    pub request_id: Option<String>,
    pub source_replica: String,
    /// Network address of the requestor (BALP `agent.network`), e.g. for refused requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_address: Option<String>,
    /// Free-text description of the outcome (`AuditEvent.outcomeDesc`), e.g. why a request
    /// was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome_desc: Option<String>,
}

impl AuditEvent {
    /// A RESTful interaction (BALP Read/Query/Create/Update) recorded now.
    pub fn rest(interaction: &str, action: &str, source_replica: &str) -> AuditEvent {
        AuditEvent {
            event_id: uuid::Uuid::now_v7().to_string(),
            recorded_at: crate::store::now_utc(),
            type_code: "rest".into(),
            subtype_code: interaction.into(),
            action: action.into(),
            outcome: outcome::SUCCESS.into(),
            agent_institution: None,
            agent_user: None,
            agent_role: None,
            purpose_of_use: None,
            patient_id: None,
            entities: Vec::new(),
            consent_decision: None,
            consent_reasons: None,
            request_id: None,
            source_replica: source_replica.into(),
            agent_address: None,
            outcome_desc: None,
        }
    }

    /// The FHIR AuditEvent (R4, IHE BALP shape). Deterministic: the same event gives the
    /// same JSON value.
    pub fn to_resource(&self) -> Value {
        let system_of = |code: &str| {
            if code.starts_with(|c: char| c.is_ascii_digit()) {
                DICOM_SYSTEM
            } else {
                AUDIT_EVENT_TYPE_SYSTEM
            }
        };
        let subtype_system = if self.subtype_code.starts_with(|c: char| c.is_ascii_digit()) {
            DICOM_SYSTEM
        } else {
            RESTFUL_INTERACTION_SYSTEM
        };
        let profile = match self.subtype_code.as_str() {
            "read" | "vread" => Some("Read"),
            "search-type" | "search-system" => Some("Query"),
            "create" => Some("Create"),
            "update" | "patch" => Some("Update"),
            "delete" => Some("Delete"),
            _ => None,
        };
        let mut requestor = json!({
            "requestor": true,
            "type": {"coding": [{"system": DICOM_SYSTEM, "code": "110153", "display": "Source Role ID"}]},
        });
        match &self.agent_institution {
            Some(inst) => {
                requestor["who"] =
                    json!({"identifier": {"system": INSTITUTION_SYSTEM, "value": inst}})
            }
            None => requestor["who"] = json!({"display": "unauthenticated"}),
        }
        if let Some(user) = &self.agent_user {
            requestor["altId"] = json!(user);
        }
        if let Some(role) = &self.agent_role {
            requestor["role"] = json!([{"text": role}]);
        }
        if let Some(purpose) = &self.purpose_of_use {
            requestor["purposeOfUse"] =
                json!([{"coding": [{"system": PURPOSE_SYSTEM, "code": purpose}]}]);
        }
        if let Some(address) = &self.agent_address {
            requestor["network"] = json!({"address": address, "type": "2"});
        }
        let gateway = json!({
            "requestor": false,
            "type": {"coding": [{"system": DICOM_SYSTEM, "code": "110152", "display": "Destination Role ID"}]},
            "who": {"display": format!("yiqiao gateway {}", self.source_replica)},
        });
        let mut entities: Vec<Value> = Vec::new();
        if let Some(patient) = &self.patient_id {
            entities.push(json!({
                "what": {"identifier": {"system": EMPI_SYSTEM, "value": patient}},
                "role": {"system": OBJECT_ROLE_SYSTEM, "code": "1"},
            }));
        }
        for e in &self.entities {
            let mut v = json!({"role": {"system": OBJECT_ROLE_SYSTEM, "code": e.role}});
            if e.role == "24" {
                v["description"] = json!(e.what);
            } else {
                v["what"] = json!({"reference": e.what});
            }
            entities.push(v);
        }
        let mut resource = json!({
            "resourceType": "AuditEvent",
            "id": self.event_id,
            "type": {"system": system_of(&self.type_code), "code": self.type_code},
            "subtype": [{"system": subtype_system, "code": self.subtype_code}],
            "action": self.action,
            "recorded": format_time(&self.recorded_at),
            "outcome": self.outcome,
            "agent": [requestor, gateway],
            "source": {
                "observer": {"display": self.source_replica},
                "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4"}],
            },
        });
        if let Some(desc) = &self.outcome_desc {
            resource["outcomeDesc"] = json!(desc);
        }
        if let Some(p) = profile {
            resource["meta"] = json!({"profile": [format!("https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.{p}")]});
        }
        if !entities.is_empty() {
            resource["entity"] = Value::Array(entities);
        }
        let mut extensions = Vec::new();
        if let Some(decision) = &self.consent_decision {
            let mut inner = vec![json!({"url": "decision", "valueCode": decision})];
            if let Some(reasons) = &self.consent_reasons {
                inner.push(json!({"url": "reasons", "valueString": reasons}));
            }
            extensions.push(json!({"url": EXT_CONSENT, "extension": inner}));
        }
        if let Some(id) = &self.request_id {
            extensions.push(json!({"url": EXT_REQUEST_ID, "valueString": id}));
        }
        if !extensions.is_empty() {
            resource["extension"] = Value::Array(extensions);
        }
        resource
    }

    /// The resource as the exact text that is stored and hashed.
    pub fn canonical_resource(&self) -> String {
        self.to_resource().to_string()
    }
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC, microseconds): the one time format of hashed and signed data.
pub fn format_time(t: &NaiveDateTime) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// The record hash: SM3 over `HASH_DOMAIN ‖ prev_hash ‖ "\n" ‖ resource`, lowercase hex.
pub fn chain_hash(prev_hash: &str, resource: &str) -> String {
    let mut buf = Vec::with_capacity(HASH_DOMAIN.len() + prev_hash.len() + 1 + resource.len());
    buf.extend_from_slice(HASH_DOMAIN.as_bytes());
    buf.extend_from_slice(prev_hash.as_bytes());
    buf.push(b'\n');
    buf.extend_from_slice(resource.as_bytes());
    yiqiao_sm::sm3_hex(&buf)
}

/// The bytes a checkpoint signature covers.
pub fn checkpoint_message(seq: i64, head_hash: &str, signed_at: &str, key_id: &str) -> String {
    format!("{CHECKPOINT_DOMAIN}\n{seq}\n{head_hash}\n{signed_at}\n{key_id}\n")
}

/// Key id: the first 16 hex digits of SM3 over the uncompressed public point (04‖x‖y).
pub fn key_id_of(key: &Sm2PublicKey) -> String {
    yiqiao_sm::sm3_hex(&key.to_uncompressed())[..16].to_string()
}

/// The gateway's checkpoint signer (SM2 with SM3, signer id 1234567812345678).
#[derive(Debug)]
pub struct AuditSigner {
    key: Sm2SigningKey,
    key_id: String,
}

impl AuditSigner {
    pub fn new(private: &Sm2PrivateKey) -> Result<AuditSigner, SmError> {
        let key = private.signing_key(DEFAULT_SIGNER_ID)?;
        let key_id = key_id_of(key.public_key());
        Ok(AuditSigner { key, key_id })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn public_key(&self) -> &Sm2PublicKey {
        self.key.public_key()
    }

    /// Sign arbitrary bytes (export manifests); DER signature as lowercase hex.
    pub fn sign_hex(&self, message: &[u8]) -> Result<String, SmError> {
        Ok(hex::encode(self.key.sign(message)?.to_der()))
    }

    /// A signed checkpoint of the chain head at `seq`.
    pub fn checkpoint(
        &self,
        seq: i64,
        head_hash: &str,
        signed_at: NaiveDateTime,
    ) -> Result<CheckpointRecord, SmError> {
        let at = format_time(&signed_at);
        let msg = checkpoint_message(seq, head_hash, &at, &self.key_id);
        Ok(CheckpointRecord {
            seq,
            head_hash: head_hash.to_string(),
            signed_at: at,
            key_id: self.key_id.clone(),
            signature: self.sign_hex(msg.as_bytes())?,
        })
    }
}

/// Verify a hex DER SM2 signature over `message`.
pub fn verify_hex_signature(key: &Sm2PublicKey, message: &[u8], signature_hex: &str) -> bool {
    let Ok(der) = hex::decode(signature_hex) else {
        return false;
    };
    let Ok(sig) = Sm2Signature::from_der(&der) else {
        return false;
    };
    key.verify(message, &sig, DEFAULT_SIGNER_ID).is_ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn hash_input_is_the_documented_bytes() {
        let resource = r#"{"resourceType":"AuditEvent"}"#;
        let manual = format!("yiqiao-audit-v1\n{GENESIS_HASH}\n{resource}");
        assert_eq!(
            chain_hash(GENESIS_HASH, resource),
            yiqiao_sm::sm3_hex(manual.as_bytes())
        );
    }

    #[test]
    fn resource_is_deterministic_and_balp_shaped() {
        let mut e = AuditEvent::rest("read", "R", "replica-a");
        e.agent_institution = Some("hosp-001".into());
        e.entities
            .push(EntityRef::resource("Organization/hosp-002"));
        e.consent_decision = Some("permit".into());
        e.consent_reasons = Some(json!(["policy-1"]).to_string());
        e.request_id = Some("req-1".into());
        let a = e.canonical_resource();
        assert_eq!(a, e.clone().canonical_resource());
        let v: Value = serde_json::from_str(&a).unwrap();
        assert_eq!(v["resourceType"], "AuditEvent");
        assert_eq!(v["subtype"][0]["code"], "read");
        assert_eq!(v["agent"][0]["who"]["identifier"]["value"], "hosp-001");
        assert!(
            v["meta"]["profile"][0]
                .as_str()
                .unwrap()
                .ends_with("IHE.BasicAudit.Read")
        );
        e.patient_id = Some("EMPI-1".into());
        e.purpose_of_use = Some("TREAT".into());
        e.agent_user = Some("dr-li".into());
        let p = PreparedEvent::new(e);
        let row = append::EventRow::for_test(&p);
        let index = append::IndexColumns::of_resource(&serde_json::from_str(&p.resource).unwrap());
        assert_eq!(index, row.index());
    }

    #[test]
    fn checkpoints_verify_only_with_the_signing_key() {
        let key = Sm2PrivateKey::generate().unwrap();
        let signer = AuditSigner::new(&key).unwrap();
        let cp = signer
            .checkpoint(7, GENESIS_HASH, crate::store::now_utc())
            .unwrap();
        let msg = checkpoint_message(cp.seq, &cp.head_hash, &cp.signed_at, &cp.key_id);
        assert!(verify_hex_signature(
            signer.public_key(),
            msg.as_bytes(),
            &cp.signature
        ));
        let other = Sm2PrivateKey::generate().unwrap().public_key();
        assert!(!verify_hex_signature(&other, msg.as_bytes(), &cp.signature));
        let forged = checkpoint_message(8, &cp.head_hash, &cp.signed_at, &cp.key_id);
        assert!(!verify_hex_signature(
            signer.public_key(),
            forged.as_bytes(),
            &cp.signature
        ));
    }
}
