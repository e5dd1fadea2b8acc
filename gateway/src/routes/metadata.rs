//! `/metadata`: the FHIR CapabilityStatement, built from [`IMPLEMENTED`] — the one list of what
//! the gateway really serves. A test requests every interaction listed here.

use actix_web::{HttpResponse, web};
use serde_json::{Value, json};

use crate::fhir;
use crate::service::authz::Public;
use crate::state::AppState;

/// A FHIR resource type the gateway serves, with its interactions and search parameters.
pub struct ResourceCapability {
    pub resource: &'static str,
    pub interactions: &'static [&'static str],
    /// (name, FHIR search param type)
    pub search_params: &'static [(&'static str, &'static str)],
    pub documentation: &'static str,
    /// Type-level operations (name, canonical OperationDefinition).
    pub operations: &'static [(&'static str, &'static str)],
}

pub const IMPLEMENTED: &[ResourceCapability] = &[
    ResourceCapability {
        resource: "Organization",
        interactions: &["read", "search-type"],
        search_params: &[
            ("name", "string"),
            ("identifier", "token"),
            ("active", "token"),
            ("type", "token"),
        ],
        documentation: "Member institutions of the region (WS/T 790.7 institution registry).",
        operations: &[],
    },
    ResourceCapability {
        resource: "Endpoint",
        interactions: &["read", "search-type"],
        search_params: &[
            ("organization", "reference"),
            ("status", "token"),
            ("name", "string"),
        ],
        documentation: "FHIR endpoints of member institutions.",
        operations: &[],
    },
    ResourceCapability {
        resource: "Patient",
        interactions: &["read", "search-type", "create", "update"],
        search_params: &[
            ("family", "string"),
            ("given", "string"),
            ("name", "string"),
            ("birthdate", "date"),
            ("gender", "token"),
            ("identifier", "token"),
            ("telecom", "token"),
        ],
        documentation: "EMPI source records (what each institution registered; PDQm returns these, each with the enterprise-person extension). create and conditional update (?identifier=system|value) are the registration feed; operations $ihe-pix (PIXm) and $match.",
        operations: &[
            (
                "ihe-pix",
                "https://profiles.ihe.net/ITI/PIXm/OperationDefinition/IHE.PIXm.pix",
            ),
            (
                "match",
                "http://hl7.org/fhir/OperationDefinition/Patient-match",
            ),
        ],
    },
    ResourceCapability {
        resource: "Consent",
        interactions: &["read", "search-type", "create", "update"],
        search_params: &[("patient", "reference"), ("status", "token")],
        documentation: "Patients' privacy consents (one provision: permit or deny, by actor institution, purpose, data class, security label and period), recorded by member institutions; patient is a Patient source record or enterprise person. Enforced at every Patient exit; revoking (status inactive) takes effect on the next request on every replica. docs/consent.md.",
        operations: &[],
    },
    ResourceCapability {
        resource: "AuditEvent",
        interactions: &["read", "search-type"],
        search_params: &[
            ("patient", "reference"),
            ("agent", "reference"),
            ("entity", "reference"),
            ("date", "date"),
            ("outcome", "token"),
            ("purpose", "token"),
            ("_id", "token"),
        ],
        documentation: "The tamper-evident audit trail (IHE BALP), newest first. Auditor role: every event as recorded (SM3-chained). Institutions with system/AuditEvent.s: the accesses to one of their own patients (patient required), trimmed to institution, purpose and time.",
        operations: &[],
    },
    ResourceCapability {
        resource: "DocumentReference",
        interactions: &["read", "search-type", "create"],
        search_params: &[
            ("patient", "reference"),
            ("patient.identifier", "token"),
            ("type", "token"),
            ("category", "token"),
            ("date", "date"),
            ("status", "token"),
            ("custodian", "reference"),
            ("_sort", "string"),
        ],
        documentation: "Document registry (IHE MHD-style, WS/T 790.10-.14): custodians register metadata (create, or a transaction Bundle at POST /fhir); search across all hospitals; content through Binary/{id} with an SM3 check (docs/documents.md).",
        operations: &[],
    },
    ResourceCapability {
        resource: "Encounter",
        interactions: &["read", "create", "update"],
        search_params: &[],
        documentation: "Care relationships (who treats whom, when), registered by the treating institution (serviceProvider = the caller; subject by its own patient identifier; idempotent on the visit number identifier) or from HL7 v2 ADT PV1; read by the consent engine (internet hospitals see a patient only with a consent naming them or during an active encounter). Not clinical content; read only by the registering institution. GET /fhir/Encounter?patient= is the federated search of hospitals' clinical Encounters (docs/federation.md), not a search of these registrations (docs/consent.md).",
        operations: &[],
    },
    ResourceCapability {
        resource: "Practitioner",
        interactions: &["read", "search-type", "create", "update"],
        search_params: &[("identifier", "token")],
        documentation: "The staff roster of each member institution: identifier https://yiqiao.health/fhir/sid/practitioner/<institution id>|<staff number> (the value members send in X-Yiqiao-User), name, home address. create is idempotent on the identifier; update is the conditional update PUT /fhir/Practitioner?identifier=system|value (creates when absent). Read and searched only by the registering institution; used by the audit anomaly rule same-surname-address (docs/audit.md, docs/hospital-contract.md).",
        operations: &[],
    },
    ResourceCapability {
        resource: "Subscription",
        interactions: &["read", "search-type", "create", "delete"],
        search_params: &[],
        documentation: "Topic-based subscriptions (Subscriptions Backport IG shape): topics document and patient-merge, rest-hook delivery through a transactional outbox; operations $status, $events (catch-up) and $retry-dead (docs/documents.md).",
        operations: &[],
    },
];

pub fn capability_statement(base_url: &str) -> Value {
    let resources: Vec<Value> = IMPLEMENTED
        .iter()
        .map(|cap| {
            let mut res = json!({
                "type": cap.resource,
                "documentation": cap.documentation,
                "interaction": cap.interactions.iter().map(|i| json!({ "code": i })).collect::<Vec<_>>(),
            });
            // Search parameters only where search-type is offered.
            if cap.interactions.contains(&"search-type") {
                let mut params: Vec<Value> = cap
                    .search_params
                    .iter()
                    .map(|(name, kind)| json!({ "name": name, "type": kind }))
                    .collect();
                params.push(json!({ "name": "_count", "type": "number" }));
                res["searchParam"] = Value::Array(params);
            }
            if !cap.operations.is_empty() {
                res["operation"] = cap
                    .operations
                    .iter()
                    .map(|(name, definition)| json!({ "name": name, "definition": definition }))
                    .collect();
            }
            res
        })
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-29",
        "kind": "instance",
        "software": { "name": "Yiqiao (医桥)", "version": env!("CARGO_PKG_VERSION") },
        "implementation": { "description": "Yiqiao regional health information exchange gateway", "url": format!("{base_url}/fhir") },
        "fhirVersion": fhir::FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "rest": [{ "mode": "server", "resource": resources }],
    })
}

/// The FHIR CapabilityStatement (at `/metadata` and `/fhir/metadata`).
#[utoipa::path(get, path = "/metadata", tag = "fhir", responses((status = 200, description = "CapabilityStatement")))]
pub async fn metadata(_public: Public, state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(fhir::FHIR_JSON)
        .json(capability_statement(&state.base_url))
}
