//! Table-driven decision tests: every rule and their interplay. Each case names the inputs,
//! the expected effect, the deciding rule and (where one decides) the consent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use Confidentiality as C;
use InstitutionKind::{Hospital, InternetHospital, RegionalPlatform};
use support::*;
use yiqiao_consent::*;
const CDC: InstitutionKind = InstitutionKind::PublicHealth;
use Purpose::*;
use RuleId as R;
use Sensitivity as S;

struct Case {
    name: &'static str,
    config: fn(&mut PolicyConfig),
    requester: (&'static str, InstitutionKind),
    custodian: &'static str,
    purpose: Purpose,
    data: DataItem,
    consents: Vec<Consent>,
    agreements: Vec<Agreement>,
    encounters: Vec<Encounter>,
    reason: Option<&'static str>,
    effect: Effect,
    rule: RuleId,
    consent: Option<&'static str>,
    obligations: Vec<&'static str>,
    note: Option<(RuleId, Option<&'static str>, Option<&'static str>)>,
}

fn case(name: &'static str) -> Case {
    Case {
        name,
        config: |_| {},
        requester: ("h2", Hospital),
        custodian: "h1",
        purpose: Treatment,
        data: DataItem::resource("Observation"),
        consents: Vec::new(),
        agreements: Vec::new(),
        encounters: Vec::new(),
        reason: None,
        effect: Effect::Deny,
        rule: R::DefaultOptIn,
        consent: None,
        obligations: Vec::new(),
        note: None,
    }
}

impl Case {
    fn config(mut self, f: fn(&mut PolicyConfig)) -> Self {
        self.config = f;
        self
    }
    fn by(mut self, id: &'static str, kind: InstitutionKind) -> Self {
        self.requester = (id, kind);
        self
    }
    fn custodian(mut self, id: &'static str) -> Self {
        self.custodian = id;
        self
    }
    fn purpose(mut self, p: Purpose) -> Self {
        self.purpose = p;
        self
    }
    fn data(mut self, d: DataItem) -> Self {
        self.data = d;
        self
    }
    fn sensitive(mut self, s: Sensitivity) -> Self {
        self.data = self.data.with_sensitivity(s);
        self
    }
    fn consents(mut self, c: Vec<Consent>) -> Self {
        self.consents = c;
        self
    }
    fn agreements(mut self, a: Vec<Agreement>) -> Self {
        self.agreements = a;
        self
    }
    fn encounters(mut self, e: Vec<Encounter>) -> Self {
        self.encounters = e;
        self
    }
    fn reason(mut self, r: &'static str) -> Self {
        self.reason = Some(r);
        self
    }
    fn permit(mut self, rule: RuleId) -> Self {
        self.effect = Effect::Permit;
        self.rule = rule;
        self
    }
    fn deny(mut self, rule: RuleId) -> Self {
        self.effect = Effect::Deny;
        self.rule = rule;
        self
    }
    fn consent(mut self, id: &'static str) -> Self {
        self.consent = Some(id);
        self
    }
    fn obligations(mut self, o: &[&'static str]) -> Self {
        self.obligations = o.to_vec();
        self
    }
    fn note(
        mut self,
        rule: RuleId,
        consent: Option<&'static str>,
        agreement: Option<&'static str>,
    ) -> Self {
        self.note = Some((rule, consent, agreement));
        self
    }
}

fn opt_in(c: &mut PolicyConfig) {
    c.default_mode = DefaultMode::OptIn;
}
fn agreements_for_hospitals(c: &mut PolicyConfig) {
    c.agreement_required_for.insert(Hospital);
}
fn agreements_for_internet_hospitals(c: &mut PolicyConfig) {
    c.agreement_required_for.insert(InternetHospital);
}
fn research_by_default(c: &mut PolicyConfig) {
    c.default_purposes.insert(Research);
}

fn cases() -> Vec<Case> {
    vec![
        // --- 1. custodian's own data -------------------------------------------------------
        case("custodian reads its own data")
            .by("h1", Hospital)
            .permit(R::CustodianOwnData),
        case("custodian is not stopped by a deny consent naming it")
            .by("h1", Hospital)
            .consents(vec![deny("c1").actor("h1")])
            .permit(R::CustodianOwnData),
        case("custodian sees its own sensitive data without explicit permit")
            .by("h1", Hospital)
            .sensitive(S::Hiv)
            .permit(R::CustodianOwnData),
        case("custodian doing research still gets pseudonymised data")
            .by("h1", Hospital)
            .purpose(Research)
            .permit(R::CustodianOwnData)
            .obligations(&["pseudonymise"]),
        case("custodian under opt-in needs no consent")
            .config(opt_in)
            .by("h1", Hospital)
            .permit(R::CustodianOwnData),
        case("internet hospital as custodian needs no encounter")
            .by("ih1", InternetHospital)
            .custodian("ih1")
            .permit(R::CustodianOwnData),
        case("custodian using ETREAT without a reason is still the custodian")
            .by("h1", Hospital)
            .purpose(EmergencyTreatment)
            .permit(R::CustodianOwnData),
        case("custodian asking for a purpose its kind may not use is still the custodian")
            .by("cdc", CDC)
            .custodian("cdc")
            .purpose(Treatment)
            .permit(R::CustodianOwnData),
        // --- 2. purpose allowed for kind ---------------------------------------------------
        case("public health may not request for treatment")
            .by("cdc", CDC)
            .deny(R::PurposeNotAllowedForKind),
        case("internet hospital may not request for research")
            .by("ih1", InternetHospital)
            .purpose(Research)
            .deny(R::PurposeNotAllowedForKind),
        case("regional platform may not request for treatment")
            .by("rp", RegionalPlatform)
            .deny(R::PurposeNotAllowedForKind),
        case("purpose check precedes a permit consent")
            .by("cdc", CDC)
            .purpose(Payment)
            .consents(vec![permit("c1")])
            .deny(R::PurposeNotAllowedForKind),
        case("public health reporting is shared by default")
            .by("cdc", CDC)
            .purpose(PublicHealth)
            .permit(R::DefaultOptOut),
        case("a kind missing from purposes_by_kind may ask for nothing")
            .config(|c| {
                c.purposes_by_kind.remove(&Hospital);
            })
            .deny(R::PurposeNotAllowedForKind),
        // --- 3. break-the-glass ------------------------------------------------------------
        case("hospital breaks the glass with a reason")
            .purpose(EmergencyTreatment)
            .reason("unconscious patient in ER")
            .permit(R::BreakGlass)
            .obligations(&["flag"]),
        case("break-the-glass without a reason")
            .purpose(EmergencyTreatment)
            .deny(R::BreakGlassReasonMissing),
        case("break-the-glass with a blank reason")
            .purpose(EmergencyTreatment)
            .reason("   ")
            .deny(R::BreakGlassReasonMissing),
        case("internet hospital may not break the glass")
            .by("ih1", InternetHospital)
            .purpose(EmergencyTreatment)
            .reason("urgent")
            .deny(R::BreakGlassKindNotAllowed),
        case("public health may not break the glass")
            .by("cdc", CDC)
            .purpose(EmergencyTreatment)
            .reason("outbreak")
            .deny(R::BreakGlassKindNotAllowed),
        case("break-the-glass overrides a deny consent and notes it for the reviewer")
            .purpose(EmergencyTreatment)
            .reason("cardiac arrest")
            .consents(vec![deny("c1").actor("h2")])
            .permit(R::BreakGlass)
            .obligations(&["flag"])
            .note(R::BreakGlassOverrodeConsent, Some("c1"), None),
        case("break-the-glass overrides the explicit-permit rule for HIV data")
            .purpose(EmergencyTreatment)
            .reason("trauma")
            .sensitive(S::Hiv)
            .permit(R::BreakGlass)
            .obligations(&["flag"]),
        case("break-the-glass works in an opt-in region without consent")
            .config(opt_in)
            .purpose(EmergencyTreatment)
            .reason("trauma")
            .permit(R::BreakGlass)
            .obligations(&["flag"]),
        case("break-the-glass overrides a missing agreement")
            .config(agreements_for_hospitals)
            .purpose(EmergencyTreatment)
            .reason("trauma")
            .permit(R::BreakGlass)
            .obligations(&["flag"]),
        case("internet hospital configured for break-the-glass needs no encounter, still masked")
            .config(|c| {
                c.break_glass_kinds.insert(InternetHospital);
            })
            .by("ih1", InternetHospital)
            .purpose(EmergencyTreatment)
            .reason("video consult emergency")
            .permit(R::BreakGlass)
            .obligations(&["flag", "mask"]),
        // --- 4. patient deny ---------------------------------------------------------------
        case("deny naming the requester")
            .consents(vec![deny("c1").actor("h2")])
            .deny(R::ConsentDeny)
            .consent("c1"),
        case("deny for any actor")
            .consents(vec![deny("c1")])
            .deny(R::ConsentDeny)
            .consent("c1"),
        case("deny naming another institution does not apply")
            .consents(vec![deny("c1").actor("h3")])
            .permit(R::DefaultOptOut),
        case("deny for research only does not stop treatment")
            .consents(vec![deny("c1").purpose(Research)])
            .permit(R::DefaultOptOut),
        case("deny for treatment stops treatment")
            .consents(vec![deny("c1").purpose(Treatment)])
            .deny(R::ConsentDeny)
            .consent("c1"),
        case("deny for Observation stops Observation")
            .consents(vec![deny("c1").class("Observation")])
            .deny(R::ConsentDeny)
            .consent("c1"),
        case("deny for Observation does not stop Condition")
            .data(DataItem::resource("Condition"))
            .consents(vec![deny("c1").class("Observation")])
            .permit(R::DefaultOptOut),
        case("deny on PSY overrides an explicit PSY permit")
            .sensitive(S::Psy)
            .consents(vec![
                permit("c1").sensitivity(S::Psy),
                deny("c2").sensitivity(S::Psy),
            ])
            .deny(R::ConsentDeny)
            .consent("c2"),
        case("deny on HIV does not touch unlabelled data")
            .consents(vec![deny("c1").sensitivity(S::Hiv)])
            .permit(R::DefaultOptOut),
        case("deny overrides a permit for the same actor")
            .consents(vec![permit("c1").actor("h2"), deny("c2").actor("h2")])
            .deny(R::ConsentDeny)
            .consent("c2"),
        case("revoked deny no longer counts")
            .consents(vec![deny("c1").status(ConsentStatus::Revoked)])
            .permit(R::DefaultOptOut),
        case("inactive deny no longer counts")
            .consents(vec![deny("c1").status(ConsentStatus::Inactive)])
            .permit(R::DefaultOptOut),
        case("draft deny does not count yet")
            .consents(vec![deny("c1").status(ConsentStatus::Draft)])
            .permit(R::DefaultOptOut),
        case("expired deny no longer counts")
            .consents(vec![deny("c1").period(around(-30, -1))])
            .permit(R::DefaultOptOut),
        case("deny not yet started does not count")
            .consents(vec![deny("c1").period(around(1, 30))])
            .permit(R::DefaultOptOut),
        case("deny whose period ends exactly now still counts (inclusive end)")
            .consents(vec![
                deny("c1").period(Period::between(t0() - days(1), t0())),
            ])
            .deny(R::ConsentDeny)
            .consent("c1"),
        case("two denies: the smaller id is named")
            .consents(vec![deny("c2"), deny("c1")])
            .deny(R::ConsentDeny)
            .consent("c1"),
        case("another patient's deny is ignored")
            .consents(vec![deny("c1").patient("p2")])
            .permit(R::DefaultOptOut),
        // --- 5. agreements -----------------------------------------------------------------
        case("agreement required and missing")
            .config(agreements_for_hospitals)
            .deny(R::AgreementRequired),
        case("agreement required and present")
            .config(agreements_for_hospitals)
            .agreements(vec![agreement("a1", "h1", "h2", &[Treatment])])
            .permit(R::DefaultOptOut)
            .note(R::AgreementCovers, None, Some("a1")),
        case("expired agreement")
            .config(agreements_for_hospitals)
            .agreements(vec![Agreement {
                period: around(-60, -1),
                ..agreement("a1", "h1", "h2", &[Treatment])
            }])
            .deny(R::AgreementRequired),
        case("agreement for another purpose")
            .config(agreements_for_hospitals)
            .agreements(vec![agreement("a1", "h1", "h2", &[Payment])])
            .deny(R::AgreementRequired),
        case("agreement for another data class")
            .config(agreements_for_hospitals)
            .agreements(vec![Agreement {
                classes: vec![DataClass::resource_type("Condition")],
                ..agreement("a1", "h1", "h2", &[Treatment])
            }])
            .deny(R::AgreementRequired),
        case("terminated agreement")
            .config(agreements_for_hospitals)
            .agreements(vec![Agreement {
                status: AgreementStatus::Terminated,
                ..agreement("a1", "h1", "h2", &[Treatment])
            }])
            .deny(R::AgreementRequired),
        case("agreement in the other direction does not count")
            .config(agreements_for_hospitals)
            .agreements(vec![agreement("a1", "h2", "h1", &[Treatment])])
            .deny(R::AgreementRequired),
        case("agreement required only for internet hospitals: hospital unaffected")
            .config(agreements_for_internet_hospitals)
            .permit(R::DefaultOptOut),
        case("patient deny is reported before a missing agreement")
            .config(agreements_for_hospitals)
            .consents(vec![deny("c1")])
            .deny(R::ConsentDeny)
            .consent("c1"),
        case("agreement does not replace the patient's permit in an opt-in region")
            .config(|c| {
                c.default_mode = DefaultMode::OptIn;
                c.agreement_required_for.insert(Hospital);
            })
            .agreements(vec![agreement("a1", "h1", "h2", &[Treatment])])
            .deny(R::DefaultOptIn),
        // --- 6. internet hospitals ---------------------------------------------------------
        case("internet hospital with neither consent nor encounter")
            .by("ih1", InternetHospital)
            .deny(R::InternetHospitalNoRelationship),
        case("internet hospital with an active encounter")
            .by("ih1", InternetHospital)
            .encounters(vec![encounter("ih1", around(-1, 1))])
            .permit(R::DefaultOptOut)
            .obligations(&["mask"])
            .note(R::InternetHospitalRelationship, None, None),
        case("internet hospital with an open-ended encounter")
            .by("ih1", InternetHospital)
            .encounters(vec![encounter(
                "ih1",
                Period {
                    start: Some(t0() - days(3)),
                    end: None,
                },
            )])
            .permit(R::DefaultOptOut)
            .obligations(&["mask"]),
        case("internet hospital whose encounter ended")
            .by("ih1", InternetHospital)
            .encounters(vec![encounter("ih1", around(-10, -1))])
            .deny(R::InternetHospitalNoRelationship),
        case("internet hospital: an encounter elsewhere does not count")
            .by("ih1", InternetHospital)
            .encounters(vec![encounter("h2", around(-1, 1))])
            .deny(R::InternetHospitalNoRelationship),
        case("internet hospital with a consent naming it")
            .by("ih1", InternetHospital)
            .consents(vec![permit("c1").actor("ih1")])
            .permit(R::ConsentPermit)
            .consent("c1")
            .obligations(&["mask"])
            .note(R::InternetHospitalRelationship, Some("c1"), None),
        case("internet hospital: a permit for any actor is not a relationship")
            .by("ih1", InternetHospital)
            .consents(vec![permit("c1")])
            .deny(R::InternetHospitalNoRelationship),
        case("internet hospital: a revoked consent is not a relationship")
            .by("ih1", InternetHospital)
            .consents(vec![
                permit("c1").actor("ih1").status(ConsentStatus::Revoked),
            ])
            .deny(R::InternetHospitalNoRelationship),
        case("internet hospital: a consent for payment does not cover treatment")
            .by("ih1", InternetHospital)
            .consents(vec![permit("c1").actor("ih1").purpose(Payment)])
            .deny(R::InternetHospitalNoRelationship),
        case("internet hospital with encounter but patient deny")
            .by("ih1", InternetHospital)
            .encounters(vec![encounter("ih1", around(-1, 1))])
            .consents(vec![deny("c9").actor("ih1")])
            .deny(R::ConsentDeny)
            .consent("c9"),
        case("internet hospital with encounter and required agreement present")
            .config(agreements_for_internet_hospitals)
            .by("ih1", InternetHospital)
            .encounters(vec![encounter("ih1", around(-1, 1))])
            .agreements(vec![agreement("a7", "h1", "ih1", &[Treatment])])
            .permit(R::DefaultOptOut)
            .obligations(&["mask"])
            .note(R::AgreementCovers, None, Some("a7")),
        case("internet hospital at the patient's request, with encounter")
            .by("ih1", InternetHospital)
            .purpose(PatientRequest)
            .encounters(vec![encounter("ih1", around(0, 0))])
            .permit(R::DefaultOptOut)
            .obligations(&["mask"]),
        // --- 7. sensitive data -------------------------------------------------------------
        case("mental health data without explicit permit, even for treatment")
            .sensitive(S::Psy)
            .deny(R::SensitiveNeedsExplicitPermit),
        case("mental health data with a permit naming PSY")
            .sensitive(S::Psy)
            .consents(vec![permit("c1").sensitivity(S::Psy)])
            .permit(R::ConsentPermit)
            .consent("c1"),
        case("a general permit is not explicit for PSY")
            .sensitive(S::Psy)
            .consents(vec![permit("c1")])
            .deny(R::SensitiveNeedsExplicitPermit),
        case("PSY+HIV data with only a PSY permit")
            .sensitive(S::Psy)
            .sensitive(S::Hiv)
            .consents(vec![permit("c1").sensitivity(S::Psy)])
            .deny(R::SensitiveNeedsExplicitPermit),
        case("PSY+HIV data with PSY and HIV permits")
            .sensitive(S::Psy)
            .sensitive(S::Hiv)
            .consents(vec![
                permit("c2").sensitivity(S::Hiv),
                permit("c1").sensitivity(S::Psy),
            ])
            .permit(R::ConsentPermit)
            .consent("c1")
            .note(R::ConsentPermit, Some("c2"), None),
        case("HIV permit for another institution")
            .sensitive(S::Hiv)
            .consents(vec![permit("c1").sensitivity(S::Hiv).actor("h3")])
            .deny(R::SensitiveNeedsExplicitPermit),
        case("substance use (ETH) needs an explicit permit")
            .sensitive(S::Eth)
            .deny(R::SensitiveNeedsExplicitPermit),
        case("genetic data (GDIS) with an explicit permit for this hospital")
            .sensitive(S::Gdis)
            .consents(vec![permit("c1").sensitivity(S::Gdis).actor("h2")])
            .permit(R::ConsentPermit)
            .consent("c1"),
        case("reproductive health (SEX) is not sensitive when configured so")
            .config(|c| {
                c.sensitive_categories.remove(&S::Sex);
            })
            .sensitive(S::Sex)
            .permit(R::DefaultOptOut),
        case("very restricted (V) data without permit")
            .data(DataItem::resource("Observation").with_confidentiality(C::V))
            .deny(R::SensitiveNeedsExplicitPermit),
        case("very restricted (V) data with a permit naming V")
            .data(DataItem::resource("Observation").with_confidentiality(C::V))
            .consents(vec![permit("c1").confidentiality(C::V)])
            .permit(R::ConsentPermit)
            .consent("c1"),
        case("restricted (R) data follows the default")
            .data(DataItem::resource("Observation").with_confidentiality(C::R))
            .permit(R::DefaultOptOut),
        case("PSY permit for research does not cover treatment")
            .sensitive(S::Psy)
            .consents(vec![permit("c1").sensitivity(S::Psy).purpose(Research)])
            .deny(R::SensitiveNeedsExplicitPermit),
        case("internet hospital with encounter still needs explicit STD permit")
            .by("ih1", InternetHospital)
            .encounters(vec![encounter("ih1", around(-1, 1))])
            .sensitive(S::Std)
            .deny(R::SensitiveNeedsExplicitPermit),
        // --- 8/9. permits and defaults -----------------------------------------------------
        case("opt-in region without consent")
            .config(opt_in)
            .deny(R::DefaultOptIn),
        case("opt-in region with a permit for any actor")
            .config(opt_in)
            .consents(vec![permit("c1")])
            .permit(R::ConsentPermit)
            .consent("c1"),
        case("opt-in region with a permit for another actor")
            .config(opt_in)
            .consents(vec![permit("c1").actor("h3")])
            .deny(R::DefaultOptIn),
        case("opt-in region with an expired permit")
            .config(opt_in)
            .consents(vec![permit("c1").period(around(-30, -1))])
            .deny(R::DefaultOptIn),
        case("payment is not a default purpose")
            .purpose(Payment)
            .deny(R::DefaultPurposeNeedsConsent),
        case("payment with a permit is masked")
            .purpose(Payment)
            .consents(vec![permit("c1").purpose(Payment)])
            .permit(R::ConsentPermit)
            .consent("c1")
            .obligations(&["mask"]),
        case("research with a permit is pseudonymised")
            .purpose(Research)
            .consents(vec![permit("c1").purpose(Research)])
            .permit(R::ConsentPermit)
            .consent("c1")
            .obligations(&["pseudonymise"])
            .note(R::ResearchPseudonymised, None, None),
        case("research without a permit")
            .purpose(Research)
            .deny(R::DefaultPurposeNeedsConsent),
        case("research shared by default when configured, still pseudonymised")
            .config(research_by_default)
            .purpose(Research)
            .permit(R::DefaultOptOut)
            .obligations(&["pseudonymise"]),
        case("a matching permit is named even where the default would permit")
            .consents(vec![permit("c1").purpose(Treatment)])
            .permit(R::ConsentPermit)
            .consent("c1"),
        case("regional platform operations need consent")
            .by("rp", RegionalPlatform)
            .purpose(Operations)
            .deny(R::DefaultPurposeNeedsConsent),
        case("regional platform operations with consent are masked")
            .by("rp", RegionalPlatform)
            .purpose(Operations)
            .consents(vec![permit("c1").purpose(Operations)])
            .permit(R::ConsentPermit)
            .consent("c1")
            .obligations(&["mask"]),
        case("a permit for a document category applies to documents of that category")
            .config(opt_in)
            .data(DataItem {
                classes: vec![
                    DataClass::resource_type("DocumentReference"),
                    DataClass::coded("http://loinc.org", "11506-3"),
                ],
                ..DataItem::resource("DocumentReference")
            })
            .consents(vec![
                permit("c1").data_class(DataClass::coded("http://loinc.org", "11506-3")),
            ])
            .permit(R::ConsentPermit)
            .consent("c1"),
        case("a permit for another document category does not apply")
            .config(opt_in)
            .consents(vec![
                permit("c1").data_class(DataClass::coded("http://loinc.org", "18842-5")),
            ])
            .deny(R::DefaultOptIn),
    ]
}

#[test]
fn decision_table() {
    let cases = cases();
    assert!(cases.len() >= 60, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let mut config = PolicyConfig::default();
        (case.config)(&mut config);
        let engine = PolicyEngine::new(config).unwrap();
        let requester = Requester::institution(case.requester.0, case.requester.1);
        let patient = PatientId::new("p1");
        let custodian = InstitutionId::new(case.custodian);
        let request = AccessRequest {
            requester: &requester,
            purpose: case.purpose,
            patient: &patient,
            custodian: &custodian,
            data: &case.data,
            at: t0(),
            break_glass_reason: case.reason,
            encounters: &case.encounters,
        };
        let d = engine.decide(&request, &case.consents, &case.agreements);
        let mut problems = Vec::new();
        if d.effect != case.effect {
            problems.push(format!("effect {:?}, expected {:?}", d.effect, case.effect));
        }
        if d.decided_by.rule != case.rule {
            problems.push(format!(
                "rule {:?}, expected {:?}",
                d.decided_by.rule, case.rule
            ));
        }
        if d.decided_by.consent.as_ref().map(ConsentId::as_str) != case.consent {
            problems.push(format!(
                "consent {:?}, expected {:?}",
                d.decided_by.consent, case.consent
            ));
        }
        if obligation_kinds(&d) != case.obligations {
            problems.push(format!(
                "obligations {:?}, expected {:?}",
                obligation_kinds(&d),
                case.obligations
            ));
        }
        if d.decided_by.text.is_empty() {
            problems.push("empty reason text".to_owned());
        }
        if d.effect == Effect::Deny && !d.obligations.is_empty() {
            problems.push("a deny carries obligations".to_owned());
        }
        if let Some((rule, consent, agreement)) = case.note {
            let found = d.notes.iter().any(|n| {
                n.rule == rule
                    && n.consent.as_ref().map(ConsentId::as_str) == consent
                    && n.agreement.as_ref().map(AgreementId::as_str) == agreement
            });
            if !found {
                problems.push(format!(
                    "no note {rule:?}/{consent:?}/{agreement:?} in {:?}",
                    d.notes
                ));
            }
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {}", case.name, problems.join("; ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn decision_serialises_with_stable_rule_ids() {
    let engine = PolicyEngine::new(PolicyConfig::default()).unwrap();
    let requester = Requester::institution("h2", Hospital);
    let (patient, custodian) = (PatientId::new("p1"), InstitutionId::new("h1"));
    let data = DataItem::resource("Observation");
    let request = AccessRequest {
        requester: &requester,
        purpose: EmergencyTreatment,
        patient: &patient,
        custodian: &custodian,
        data: &data,
        at: t0(),
        break_glass_reason: Some("unconscious"),
        encounters: &[],
    };
    let decision = engine.decide(&request, &[deny("c1")], &[]);
    let json = serde_json::to_value(&decision).unwrap();
    assert_eq!(json["effect"], "permit");
    assert_eq!(json["decided_by"]["rule"], "break-glass");
    assert_eq!(json["obligations"][0]["type"], "flag_for_review");
    assert_eq!(json["obligations"][0]["reason"], "unconscious");
    assert_eq!(json["notes"][0]["rule"], "break-glass-overrode-consent");
    assert_eq!(json["notes"][0]["consent"], "c1");
    let back: Decision = serde_json::from_value(json).unwrap();
    assert_eq!(back, decision);
    // Every rule id's serde name equals its documented string.
    for rule in [
        R::CustodianOwnData,
        R::ConsentDeny,
        R::SensitiveNeedsExplicitPermit,
        R::DefaultOptIn,
    ] {
        assert_eq!(serde_json::to_value(rule).unwrap(), rule.as_str());
    }
}

#[test]
fn config_round_trips_and_rejects_unknown_keys() {
    let config = PolicyConfig::default();
    let json = serde_json::to_string(&config).unwrap();
    let back: PolicyConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, config);
    let err = serde_json::from_str::<PolicyConfig>(r#"{"default_mode":"opt_in","break_glass":[]}"#)
        .unwrap_err();
    assert!(err.to_string().contains("break_glass"), "{err}");
    let partial: PolicyConfig = serde_json::from_str(r#"{"default_mode":"opt_in"}"#).unwrap();
    assert_eq!(partial.default_mode, DefaultMode::OptIn);
    assert_eq!(partial.break_glass_kinds, config.break_glass_kinds);
    let mut bad = PolicyConfig::default();
    bad.masking
        .research
        .push(FieldRule::new("name", Technique::Name));
    assert_eq!(
        PolicyEngine::new(bad).unwrap_err(),
        ConfigError::BadPath("name".to_owned())
    );
}
