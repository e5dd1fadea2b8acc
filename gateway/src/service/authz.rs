//! Who may do what: the resource × operation × actor table, evaluated in one place.
//!
//! [`TABLE`] is the whole authorization model of the member and staff APIs (ARCHITECTURE.md
//! prints it; `tests/api/authz.rs` exercises every row with every kind of caller). A handler
//! names its `(Resource, Op)` once, through the service function it calls; the service asks
//! [`check`] before touching data, and [`Check::settle`] once it knows the facts about the
//! item (does the member hold the patient's records, did it record this consent, does it have
//! a care relationship with the patient).
//!
//! Members additionally need the SMART scope of the operation (`system/<Resource>.<c|r|u|d|s>`);
//! what a permitted member then *sees* of patient data is decided per item by the consent engine
//! at release (`crate::policy`), which this table does not replace.

use crate::auth::Caller;
use crate::error::{ApiError, ErrorCode};
use crate::service::Actor;
use crate::staff::Role;

/// What is acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    /// Source records (FHIR Patient feed, PDQm, PIXm, `$match`).
    Patient,
    /// Patients' consents (FHIR Consent).
    Consent,
    /// Data-sharing agreements between institutions.
    Agreement,
    /// Registered care relationships (FHIR Encounter registration).
    Encounter,
    /// Document metadata (FHIR DocumentReference) and its content (`Binary`).
    DocumentReference,
    /// Members' staff rosters (FHIR Practitioner).
    Practitioner,
    /// Notification subscriptions (FHIR Subscription).
    Subscription,
    /// Enterprise persons: read, merge, unmerge.
    Person,
    /// The EMPI review queue.
    ReviewItem,
    /// The audit trail (FHIR AuditEvent, alerts, flags, chain, reports).
    AuditEvent,
    /// The institution directory as public FHIR (Organization, Endpoint).
    Organization,
    /// The institution directory's admin API.
    Institution,
    /// Federated clinical data (Observation, Condition, ... fetched from the holders).
    ClinicalData,
    /// A member's own credential events (token requests, refused calls).
    AuthEvent,
    /// The anomaly alerts raised over the audit trail.
    Alert,
    /// The flagged (VIP) patients whose every access raises an alert.
    FlaggedPatient,
    /// The audit chain's status, daily statistics, reports and the auditors' console session.
    AuditReport,
    /// The consent policy simulator (`$evaluate`).
    ConsentPolicy,
}

impl Resource {
    /// The SMART scope resource name a member needs, if members may act on it at all.
    pub fn scope_name(self) -> Option<&'static str> {
        Some(match self {
            Resource::Patient => "Patient",
            Resource::Consent => "Consent",
            Resource::Encounter => "Encounter",
            Resource::DocumentReference => "DocumentReference",
            Resource::Practitioner => "Practitioner",
            Resource::Subscription => "Subscription",
            Resource::AuditEvent => "AuditEvent",
            Resource::ClinicalData => "Observation",
            Resource::AuthEvent => "AuditEvent",
            Resource::Agreement
            | Resource::Alert
            | Resource::FlaggedPatient
            | Resource::AuditReport
            | Resource::ConsentPolicy
            | Resource::Person
            | Resource::ReviewItem
            | Resource::Organization
            | Resource::Institution => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Resource::Patient => "Patient",
            Resource::Consent => "Consent",
            Resource::Agreement => "Agreement",
            Resource::Encounter => "Encounter",
            Resource::DocumentReference => "DocumentReference",
            Resource::Practitioner => "Practitioner",
            Resource::Subscription => "Subscription",
            Resource::Person => "Person",
            Resource::ReviewItem => "ReviewItem",
            Resource::AuditEvent => "AuditEvent",
            Resource::Organization => "Organization",
            Resource::Institution => "Institution",
            Resource::ClinicalData => "ClinicalData",
            Resource::AuthEvent => "AuthEvent",
            Resource::Alert => "Alert",
            Resource::FlaggedPatient => "FlaggedPatient",
            Resource::AuditReport => "AuditReport",
            Resource::ConsentPolicy => "ConsentPolicy",
        }
    }
}

/// The operation (the SMART v2 permission letters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

impl Op {
    pub fn permission(self) -> char {
        match self {
            Op::Create => 'c',
            Op::Read => 'r',
            Op::Update => 'u',
            Op::Delete => 'd',
            Op::Search => 's',
        }
    }

    /// The audit event's action code (BALP: C, R, U, D, E).
    pub fn action(self) -> &'static str {
        match self {
            Op::Create => "C",
            Op::Read => "R",
            Op::Update => "U",
            Op::Delete => "D",
            Op::Search => "E",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Read => "read",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Search => "search",
        }
    }
}

/// One way in, as the table states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// Anyone, without a credential (public metadata).
    Anyone,
    /// Any member institution holding the scope; the consent engine decides what it sees.
    Member,
    /// The member that is the item's custodian: it holds the patient's records (for a consent:
    /// it recorded the consent, or holds the patient it is about), or the item is its own
    /// (its visits, documents, roster, subscriptions).
    Custodian,
    /// A patient-facing platform (internet hospital) with a current care relationship with the
    /// patient, acting for that patient.
    PatientPlatform,
    /// A person or operator holding this role.
    Staff(Role),
}

/// One row of the table.
#[derive(Debug)]
pub struct Rule {
    pub resource: Resource,
    pub op: Op,
    pub who: &'static [Who],
    /// The rule in words (ARCHITECTURE.md, docs).
    pub note: &'static str,
}

use Op::*;
use Resource as R;
use Who::*;

const STEWARD: Who = Staff(Role::Steward);
const ADMIN: Who = Staff(Role::Admin);
const AUDITOR: Who = Staff(Role::Auditor);
const SECURITY: Who = Staff(Role::SecurityOfficer);

/// The authorization model: every (resource, operation) the APIs offer. A pair that is not
/// here is refused to everyone.
pub const TABLE: &[Rule] = &[
    Rule {
        resource: R::Patient,
        op: Create,
        who: &[Custodian],
        note: "a member registers its own patients (its own identifier system)",
    },
    Rule {
        resource: R::Patient,
        op: Update,
        who: &[Custodian],
        note: "a member updates its own source records",
    },
    Rule {
        resource: R::Patient,
        op: Read,
        who: &[Member],
        note: "released through the consent engine",
    },
    Rule {
        resource: R::Patient,
        op: Search,
        who: &[Member],
        note: "at least one demographic criterion; results released through the consent engine",
    },
    Rule {
        resource: R::Consent,
        op: Create,
        who: &[Custodian, PatientPlatform, STEWARD],
        note: "by a member holding the patient's records, the patient's platform, or a steward; a member names no other institution as a permit's actor",
    },
    Rule {
        resource: R::Consent,
        op: Update,
        who: &[Custodian, PatientPlatform, STEWARD],
        note: "by the institution that recorded it, the patient's platform, or a steward (revocation is an update)",
    },
    Rule {
        resource: R::Consent,
        op: Read,
        who: &[Custodian, PatientPlatform, STEWARD, AUDITOR],
        note: "by the recorder, members holding the patient, the patient's platform, stewards and auditors; others get 404",
    },
    Rule {
        resource: R::Consent,
        op: Search,
        who: &[Custodian, PatientPlatform, STEWARD, AUDITOR],
        note: "members must name a patient they hold; search without a patient is for stewards and auditors",
    },
    Rule {
        resource: R::Agreement,
        op: Update,
        who: &[ADMIN, STEWARD],
        note: "data-sharing agreements",
    },
    Rule {
        resource: R::Agreement,
        op: Search,
        who: &[ADMIN, STEWARD, AUDITOR],
        note: "",
    },
    Rule {
        resource: R::Encounter,
        op: Create,
        who: &[Custodian],
        note: "a member registers its own visits",
    },
    Rule {
        resource: R::Encounter,
        op: Update,
        who: &[Custodian],
        note: "its own visits; a finished visit is not reopened",
    },
    Rule {
        resource: R::Encounter,
        op: Read,
        who: &[Custodian],
        note: "its own visits; others get 404",
    },
    Rule {
        resource: R::DocumentReference,
        op: Create,
        who: &[Custodian],
        note: "a member registers documents it holds",
    },
    Rule {
        resource: R::DocumentReference,
        op: Read,
        who: &[Member],
        note: "metadata and content released through the consent engine",
    },
    Rule {
        resource: R::DocumentReference,
        op: Search,
        who: &[Member],
        note: "released through the consent engine",
    },
    Rule {
        resource: R::Practitioner,
        op: Create,
        who: &[Custodian],
        note: "its own roster",
    },
    Rule {
        resource: R::Practitioner,
        op: Update,
        who: &[Custodian],
        note: "its own roster",
    },
    Rule {
        resource: R::Practitioner,
        op: Read,
        who: &[Custodian],
        note: "its own roster; others get 404",
    },
    Rule {
        resource: R::Practitioner,
        op: Search,
        who: &[Custodian],
        note: "its own roster",
    },
    Rule {
        resource: R::Subscription,
        op: Create,
        who: &[Custodian],
        note: "its own subscriptions",
    },
    Rule {
        resource: R::Subscription,
        op: Read,
        who: &[Custodian],
        note: "its own; others get 404",
    },
    Rule {
        resource: R::Subscription,
        op: Update,
        who: &[Custodian],
        note: "its own (retry dead-lettered deliveries)",
    },
    Rule {
        resource: R::Subscription,
        op: Delete,
        who: &[Custodian],
        note: "its own",
    },
    Rule {
        resource: R::Subscription,
        op: Search,
        who: &[Custodian],
        note: "its own",
    },
    Rule {
        resource: R::Person,
        op: Read,
        who: &[ADMIN, STEWARD],
        note: "enterprise persons with their links",
    },
    Rule {
        resource: R::Person,
        op: Update,
        who: &[ADMIN, STEWARD],
        note: "merge and unmerge",
    },
    Rule {
        resource: R::ReviewItem,
        op: Search,
        who: &[ADMIN, STEWARD],
        note: "the EMPI review queue",
    },
    Rule {
        resource: R::ReviewItem,
        op: Update,
        who: &[ADMIN, STEWARD],
        note: "link or keep separate",
    },
    Rule {
        resource: R::AuditEvent,
        op: Read,
        who: &[AUDITOR, SECURITY],
        note: "the stored trail, as hashed",
    },
    Rule {
        resource: R::AuditEvent,
        op: Search,
        who: &[AUDITOR, SECURITY, Custodian],
        note: "auditors; a member (access token, not on behalf) searches who accessed the records of a patient it registered, trimmed",
    },
    Rule {
        resource: R::AuthEvent,
        op: Read,
        who: &[Member],
        note: "a member's own credential events",
    },
    Rule {
        resource: R::Alert,
        op: Search,
        who: &[AUDITOR],
        note: "",
    },
    Rule {
        resource: R::Alert,
        op: Update,
        who: &[AUDITOR],
        note: "acknowledge",
    },
    Rule {
        resource: R::FlaggedPatient,
        op: Search,
        who: &[AUDITOR],
        note: "",
    },
    Rule {
        resource: R::FlaggedPatient,
        op: Update,
        who: &[AUDITOR],
        note: "flag a patient (CSRF token and note with a session cookie)",
    },
    Rule {
        resource: R::FlaggedPatient,
        op: Delete,
        who: &[AUDITOR],
        note: "",
    },
    Rule {
        resource: R::AuditReport,
        op: Read,
        who: &[AUDITOR],
        note: "chain status, daily statistics, reports, the console session",
    },
    Rule {
        resource: R::ConsentPolicy,
        op: Read,
        who: &[ADMIN, AUDITOR, SECURITY],
        note: "the policy simulator",
    },
    Rule {
        resource: R::Organization,
        op: Read,
        who: &[Anyone],
        note: "public directory metadata",
    },
    Rule {
        resource: R::Organization,
        op: Search,
        who: &[Anyone],
        note: "public directory metadata",
    },
    Rule {
        resource: R::Institution,
        op: Create,
        who: &[ADMIN],
        note: "the directory's admin API",
    },
    Rule {
        resource: R::Institution,
        op: Read,
        who: &[ADMIN],
        note: "",
    },
    Rule {
        resource: R::Institution,
        op: Update,
        who: &[ADMIN],
        note: "incl. suspend, activate, certificate binding",
    },
    Rule {
        resource: R::Institution,
        op: Search,
        who: &[ADMIN],
        note: "",
    },
    Rule {
        resource: R::ClinicalData,
        op: Search,
        who: &[Member],
        note: "federated search (scope of the resource type searched); each answer released through the consent engine",
    },
];

/// The table's row for `(resource, op)`.
pub fn rule(resource: Resource, op: Op) -> Option<&'static Rule> {
    TABLE.iter().find(|r| r.resource == resource && r.op == op)
}

/// The outcome of [`check`]: either settled, or allowed if the item's facts bear it out.
#[derive(Debug, Clone)]
pub enum Check {
    /// Allowed whatever the item (a role, or any member with the scope).
    Allowed(Who),
    /// Allowed only as one of these, which depend on the item ([`Check::settle`]).
    Depends(Vec<Who>),
}

/// What is known about the item once it is read, for [`Check::settle`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Facts {
    /// The member is the item's custodian (see [`Who::Custodian`]).
    pub custodian: bool,
    /// The member is a patient platform with a current care relationship with the patient.
    pub patient_platform: bool,
}

impl Facts {
    /// The item is the member's own by construction (its own roster, visits, subscriptions,
    /// documents: what it names is keyed by its own institution id).
    pub const OWN: Facts = Facts {
        custodian: true,
        patient_platform: false,
    };
}

impl Check {
    /// Does this check still need the item's facts?
    pub fn needs_facts(&self) -> bool {
        matches!(self, Check::Depends(_))
    }

    /// Settle with the facts. `hide`: answer 404 (`not_found` message) instead of 403, so
    /// that a refused caller cannot tell that the item exists.
    pub fn settle(
        &self,
        facts: Facts,
        resource: Resource,
        op: Op,
        hide: Option<&str>,
    ) -> Result<Who, ApiError> {
        match self {
            Check::Allowed(who) => Ok(*who),
            Check::Depends(ways) => {
                for way in ways {
                    match way {
                        Custodian if facts.custodian => return Ok(Custodian),
                        PatientPlatform if facts.patient_platform => return Ok(PatientPlatform),
                        _ => {}
                    }
                }
                Err(match hide {
                    Some(message) => ApiError::not_found(message.to_string()),
                    None => forbidden(resource, op, ways),
                })
            }
        }
    }
}

fn forbidden(resource: Resource, op: Op, ways: &[Who]) -> ApiError {
    let ways: Vec<String> =
        ways.iter()
            .map(|w| match w {
                Anyone => "anyone".to_string(),
                Member => "a member with the scope".to_string(),
                Custodian => "the custodian (the member holding the item or the patient's records)"
                    .to_string(),
                PatientPlatform => {
                    "the patient's platform (a care relationship with the patient)".to_string()
                }
                Staff(role) => format!("the {} role", role.as_str()),
            })
            .collect();
    let who = match ways.as_slice() {
        [one] => one.clone(),
        many => format!("one of {}", many.join(", ")),
    };
    ApiError::new(
        ErrorCode::Forbidden,
        format!("{who} is required to {} {}", op.name(), resource.name()),
    )
}

/// Can `actor` do `op` on `resource` at all? Err: 403 naming who may. Members also need the
/// operation's SMART scope.
pub fn check(actor: &Actor, resource: Resource, op: Op) -> Result<Check, ApiError> {
    let Some(rule) = rule(resource, op) else {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("{} {} is not offered", op.name(), resource.name()),
        ));
    };
    let mut depends = Vec::new();
    let mut scope_missing = None;
    for way in rule.who {
        match (way, actor) {
            (Anyone, _) => return Ok(Check::Allowed(Anyone)),
            (Staff(role), Actor::Staff(staff)) if staff.has(*role) => {
                return Ok(Check::Allowed(*way));
            }
            (Member | Custodian | PatientPlatform, Actor::Member(caller)) => {
                // Federated clinical data: the scope is the searched type's
                // ([`Permit::type_scope`]), known once the request is parsed.
                if resource != Resource::ClinicalData {
                    let scope = resource.scope_name().unwrap_or(resource.name());
                    if let Err(e) = scope_granted(caller, scope, op.permission()) {
                        scope_missing = Some(e);
                        continue;
                    }
                }
                match way {
                    Member => return Ok(Check::Allowed(Member)),
                    PatientPlatform
                        if caller.institution.kind
                            != yiqiao_registry::directory::InstitutionKind::InternetHospital => {}
                    _ => depends.push(*way),
                }
            }
            _ => {}
        }
    }
    if !depends.is_empty() {
        return Ok(Check::Depends(depends));
    }
    Err(scope_missing.unwrap_or_else(|| forbidden(resource, op, rule.who)))
}

/// The SMART scope `system/<scope>.<permission>`: 403 naming it, with the
/// `insufficient_scope` challenge (RFC 6750 section 3.1).
fn scope_granted(caller: &Caller, scope: &str, permission: char) -> Result<(), ApiError> {
    caller.require(scope, permission).map_err(|e| {
        e.header(
            actix_web::http::header::WWW_AUTHENTICATE,
            format!(
                "Bearer realm=\"yiqiao\", error=\"insufficient_scope\", scope=\"system/{scope}.{permission}\""
            ),
        )
    })
}

/// A `(Resource, Op)` a handler needs, as a type: `Permit<ConsentCreate>` in a signature.
pub trait Need: 'static {
    const RESOURCE: Resource;
    const OP: Op;
}

macro_rules! needs {
    ($($name:ident => ($resource:ident, $op:ident),)*) => {
        $(
            #[doc = concat!("Needs ", stringify!($op), " on ", stringify!($resource), " (the table's row).")]
            #[derive(Debug, Clone, Copy)]
            pub struct $name;
            impl Need for $name {
                const RESOURCE: Resource = Resource::$resource;
                const OP: Op = Op::$op;
            }
        )*
    };
}

needs! {
    PatientCreate => (Patient, Create),
    PatientUpdate => (Patient, Update),
    PatientRead => (Patient, Read),
    PatientSearch => (Patient, Search),
    ConsentCreate => (Consent, Create),
    ConsentUpdate => (Consent, Update),
    ConsentRead => (Consent, Read),
    ConsentSearch => (Consent, Search),
    AgreementUpdate => (Agreement, Update),
    AgreementSearch => (Agreement, Search),
    EncounterCreate => (Encounter, Create),
    EncounterUpdate => (Encounter, Update),
    EncounterRead => (Encounter, Read),
    DocumentReferenceCreate => (DocumentReference, Create),
    DocumentReferenceRead => (DocumentReference, Read),
    DocumentReferenceSearch => (DocumentReference, Search),
    PractitionerCreate => (Practitioner, Create),
    PractitionerUpdate => (Practitioner, Update),
    PractitionerRead => (Practitioner, Read),
    PractitionerSearch => (Practitioner, Search),
    SubscriptionCreate => (Subscription, Create),
    SubscriptionRead => (Subscription, Read),
    SubscriptionUpdate => (Subscription, Update),
    SubscriptionDelete => (Subscription, Delete),
    SubscriptionSearch => (Subscription, Search),
    PersonRead => (Person, Read),
    PersonUpdate => (Person, Update),
    ReviewItemSearch => (ReviewItem, Search),
    ReviewItemUpdate => (ReviewItem, Update),
    AuditEventRead => (AuditEvent, Read),
    AuditEventSearch => (AuditEvent, Search),
    AuthEventRead => (AuthEvent, Read),
    AlertSearch => (Alert, Search),
    AlertUpdate => (Alert, Update),
    FlaggedPatientSearch => (FlaggedPatient, Search),
    FlaggedPatientUpdate => (FlaggedPatient, Update),
    FlaggedPatientDelete => (FlaggedPatient, Delete),
    AuditReportRead => (AuditReport, Read),
    ConsentPolicyRead => (ConsentPolicy, Read),
    InstitutionCreate => (Institution, Create),
    InstitutionRead => (Institution, Read),
    InstitutionUpdate => (Institution, Update),
    InstitutionSearch => (Institution, Search),
    ClinicalDataSearch => (ClinicalData, Search),
}

/// Proof that [`check`] ran for `N` and let the actor in (perhaps subject to the item's
/// facts, [`Check::settle`]): the permission a handler needs is in its signature, and the
/// service functions take it, so none runs unchecked. Made by the extractor (HTTP) or by
/// [`Permit::check`] (the other adapters).
#[derive(Debug, Clone)]
pub struct Permit<N: Need> {
    pub actor: Actor,
    pub check: Check,
    _need: std::marker::PhantomData<N>,
}

impl<N: Need> Permit<N> {
    /// Check `actor` against the table's row for `N`.
    pub fn check(actor: Actor) -> Result<Permit<N>, ApiError> {
        let check = check(&actor, N::RESOURCE, N::OP)?;
        Ok(Permit {
            actor,
            check,
            _need: std::marker::PhantomData,
        })
    }

    /// Settle with the item's facts (see [`Check::settle`]).
    pub fn settle(&self, facts: Facts, hide: Option<&str>) -> Result<Who, ApiError> {
        self.check.settle(facts, N::RESOURCE, N::OP, hide)
    }

    /// [`Permit::settle`], recording a refusal (`event`, marked failed, attributed to the
    /// actor) in the audit trail: a hidden refusal (404) is a decision too.
    pub fn settle_audited(
        &self,
        auditor: &crate::audit::Auditor,
        facts: Facts,
        hide: Option<&str>,
        mut event: yiqiao_registry::audit::AuditEvent,
    ) -> Result<Who, ApiError> {
        self.settle(facts, hide).inspect_err(|e| {
            event.outcome = yiqiao_registry::audit::outcome::MINOR_FAILURE.into();
            event.outcome_desc = Some(format!("{}: {}", e.code.code(), e.message));
            auditor.record_refusal(self.actor.attribute(auditor, event, None));
        })
    }

    /// Record the permitted access `event` (attributed to the actor, about `patient` when
    /// known) durably, before any data is returned.
    pub async fn record(
        &self,
        auditor: &crate::audit::Auditor,
        event: yiqiao_registry::audit::AuditEvent,
        patient: Option<String>,
    ) -> Result<(), ApiError> {
        auditor
            .record(self.actor.attribute(auditor, event, patient))
            .await?;
        Ok(())
    }

    /// The member institution acting. Err (403) for a staff credential, which a row offering
    /// only member ways has already refused in [`check`].
    pub fn member(&self) -> Result<&Caller, ApiError> {
        self.actor.member().ok_or_else(|| {
            ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "{} {} is for member institutions",
                    N::OP.name(),
                    N::RESOURCE.name()
                ),
            )
        })
    }

    /// The person or operator acting. Err (403) for a member, which a row offering only roles
    /// has already refused in [`check`].
    pub fn staff(&self) -> Result<&crate::staff::Staff, ApiError> {
        match &self.actor {
            Actor::Staff(s) => Ok(s),
            Actor::Member(_) => Err(ApiError::new(
                ErrorCode::Forbidden,
                format!("{} {} is for staff roles", N::OP.name(), N::RESOURCE.name()),
            )),
        }
    }

    /// A member acting on federated clinical data also needs the scope of the FHIR type it
    /// asks for, with read and this operation (`system/Condition.rs`).
    pub fn type_scope(&self, resource_type: &str) -> Result<(), ApiError> {
        if let Actor::Member(caller) = &self.actor {
            scope_granted(caller, resource_type, 'r')?;
            scope_granted(caller, resource_type, N::OP.permission())?;
        }
        Ok(())
    }
}

impl<N: Need> actix_web::FromRequest for Permit<N> {
    type Error = ApiError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self, ApiError>>>>;

    fn from_request(
        req: &actix_web::HttpRequest,
        payload: &mut actix_web::dev::Payload,
    ) -> Self::Future {
        // Authenticate the way the row admits: a row only for members takes the member
        // credential path (refused tokens logged as before) unless a known staff credential
        // is presented (the table then answers 403); a row only for roles takes the staff path
        // (a member's token: 401 as before); a row open to both tells them apart by the form
        // of the credential.
        let ways = rule(N::RESOURCE, N::OP).map_or(&[][..], |r| r.who);
        let staff = ways.iter().any(|w| matches!(w, Staff(_)));
        let member = ways
            .iter()
            .any(|w| matches!(w, Member | Custodian | PatientPlatform));
        let actor = match (staff, member) {
            (false, true) if crate::service::presents_known_staff_credential(req) => {
                Actor::authenticate_staff(req)
            }
            (false, true) => Actor::authenticate_member(req, payload),
            (true, false) => Actor::authenticate_staff(req),
            _ => Actor::from_request(req, payload),
        };
        Box::pin(async move { Permit::check(actor.await?) })
    }
}

/// The explicit marker of a public route (no credential: the directory's FHIR reads, metadata,
/// health, the token endpoint). A handler without a [`Permit`] takes this instead, so every
/// handler states its access in its signature.
#[derive(Debug, Clone, Copy)]
pub struct Public;

impl actix_web::FromRequest for Public {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Public, ApiError>>;

    fn from_request(_: &actix_web::HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        std::future::ready(Ok(Public))
    }
}

/// The table as Markdown (ARCHITECTURE.md carries it; a test keeps the two equal).
pub fn markdown_table() -> String {
    let mut out = String::from("| resource | operation | who may | rule |\n|---|---|---|---|\n");
    for r in TABLE {
        let who: Vec<String> = r
            .who
            .iter()
            .map(|w| match w {
                Anyone => "anyone".to_string(),
                Member => "member (scope)".to_string(),
                Custodian => "custodian member (scope)".to_string(),
                PatientPlatform => "patient's platform (scope)".to_string(),
                Staff(role) => format!("{} role", role.as_str()),
            })
            .collect();
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            r.resource.name(),
            r.op.name(),
            who.join(", "),
            r.note
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architecture_md_carries_the_table() {
        let doc = include_str!("../../../ARCHITECTURE.md");
        let table = markdown_table();
        assert!(
            doc.contains(&table),
            "ARCHITECTURE.md must contain the authorization table exactly as \
             service::authz::markdown_table() prints it:\n{table}"
        );
    }

    #[test]
    fn every_pair_is_in_the_table_once() {
        for (i, a) in TABLE.iter().enumerate() {
            for b in &TABLE[i + 1..] {
                assert!(
                    !(a.resource == b.resource && a.op == b.op),
                    "{:?} {:?} twice",
                    a.resource,
                    a.op
                );
            }
        }
    }
}
