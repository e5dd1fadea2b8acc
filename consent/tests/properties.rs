//! Property tests: deny precedence, masking never leaks, decisions are deterministic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use proptest::prelude::*;
use proptest::sample::subsequence;
use serde_json::{Value, json};
use support::*;
use yiqiao_consent::*;

const INSTITUTIONS: [&str; 4] = ["h1", "h2", "h3", "ih1"];
const CLASSES: [&str; 3] = ["Observation", "Condition", "Patient"];
const NON_EMERGENCY: [Purpose; 6] = [
    Purpose::Treatment,
    Purpose::Payment,
    Purpose::Operations,
    Purpose::PublicHealth,
    Purpose::Research,
    Purpose::PatientRequest,
];

fn period() -> impl Strategy<Value = Period> {
    prop_oneof![
        Just(Period::ALWAYS),
        Just(around(-30, -1)),
        Just(around(1, 30)),
        Just(around(-5, 5))
    ]
}

fn status() -> impl Strategy<Value = ConsentStatus> {
    prop_oneof![
        4 => Just(ConsentStatus::Active),
        1 => Just(ConsentStatus::Revoked),
        1 => Just(ConsentStatus::Inactive),
        1 => Just(ConsentStatus::Draft),
    ]
}

fn labels() -> impl Strategy<Value = Vec<SecurityLabel>> {
    let all: Vec<SecurityLabel> = Sensitivity::ALL
        .into_iter()
        .map(SecurityLabel::Sensitivity)
        .chain([SecurityLabel::Confidentiality(Confidentiality::V)])
        .collect();
    subsequence(all, 0..3)
}

fn any_consent() -> impl Strategy<Value = Consent> {
    (
        0u8..40,
        any::<bool>(),
        subsequence(INSTITUTIONS.to_vec(), 0..3),
        subsequence(Purpose::ALL.to_vec(), 0..3),
        subsequence(CLASSES.to_vec(), 0..2),
        labels(),
        status(),
        period(),
    )
        .prop_map(
            |(n, is_permit, actors, purposes, classes, labels, status, period)| Consent {
                id: ConsentId::new(format!("c{n:02}")),
                patient: PatientId::new("p1"),
                status,
                provision: if is_permit {
                    ProvisionType::Permit
                } else {
                    ProvisionType::Deny
                },
                scope: Scope {
                    actors: actors.into_iter().map(InstitutionId::new).collect(),
                    purposes: purposes.into_iter().collect(),
                    classes: classes.into_iter().map(DataClass::resource_type).collect(),
                    labels,
                },
                period,
            },
        )
}

fn any_config() -> impl Strategy<Value = PolicyConfig> {
    (
        any::<bool>(),
        subsequence(InstitutionKind::ALL.to_vec(), 0..4),
        subsequence(InstitutionKind::ALL.to_vec(), 0..4),
        subsequence(Sensitivity::ALL.to_vec(), 0..11),
    )
        .prop_map(|(opt_in, agreement_kinds, glass_kinds, sensitive)| {
            let mut c = PolicyConfig::default();
            if opt_in {
                c.default_mode = DefaultMode::OptIn;
            }
            c.agreement_required_for = agreement_kinds.into_iter().collect();
            c.break_glass_kinds = glass_kinds.into_iter().collect();
            c.sensitive_categories = sensitive.into_iter().collect();
            c
        })
}

fn any_data() -> impl Strategy<Value = DataItem> {
    (
        prop::sample::select(CLASSES.to_vec()),
        subsequence(Sensitivity::ALL.to_vec(), 0..3),
        prop::sample::select(Confidentiality::ALL.to_vec()),
    )
        .prop_map(|(class, sens, conf)| DataItem {
            classes: vec![DataClass::resource_type(class)],
            confidentiality: conf,
            sensitivities: sens.into_iter().collect(),
        })
}

fn kind_of(institution: &str) -> InstitutionKind {
    if institution.starts_with("ih") {
        InstitutionKind::InternetHospital
    } else {
        InstitutionKind::Hospital
    }
}

#[derive(Debug, Clone)]
struct World {
    config: PolicyConfig,
    requester: Requester,
    custodian: InstitutionId,
    purpose: Purpose,
    data: DataItem,
    consents: Vec<Consent>,
    agreements: Vec<Agreement>,
    encounters: Vec<Encounter>,
    reason: Option<String>,
}

impl World {
    fn decide(&self) -> Decision {
        let engine = PolicyEngine::new(self.config.clone()).unwrap();
        let patient = PatientId::new("p1");
        let request = AccessRequest {
            requester: &self.requester,
            purpose: self.purpose,
            patient: &patient,
            custodian: &self.custodian,
            data: &self.data,
            at: t0(),
            break_glass_reason: self.reason.as_deref(),
            encounters: &self.encounters,
        };
        engine.decide(&request, &self.consents, &self.agreements)
    }
}

/// A world in which the requester (never the custodian h1) is generous: agreements for
/// every purpose, an active encounter and whatever random consents were drawn.
fn any_world() -> impl Strategy<Value = World> {
    (
        any_config(),
        prop::sample::select(vec!["h2", "h3", "ih1"]),
        prop::sample::select(NON_EMERGENCY.to_vec()),
        any_data(),
        prop::collection::vec(any_consent(), 0..8),
        any::<bool>(),
    )
        .prop_map(
            |(config, who, purpose, data, consents, with_encounter)| World {
                config,
                requester: Requester::institution(who, kind_of(who)),
                custodian: InstitutionId::new("h1"),
                purpose,
                data,
                consents,
                agreements: vec![agreement("a1", "h1", who, &Purpose::ALL)],
                encounters: if with_encounter {
                    vec![encounter(who, Period::ALWAYS)]
                } else {
                    Vec::new()
                },
                reason: None,
            },
        )
}

/// Adds an in-force deny for the requester that matches the request (its scope may also
/// name the request's purpose and data class, or leave them open).
fn with_deny(mut world: World, narrow_purpose: bool, narrow_class: bool) -> World {
    let mut d = deny("zz-deny").actor(world.requester.institution.as_str());
    if narrow_purpose {
        d = d.purpose(world.purpose);
    }
    if narrow_class {
        d.scope.classes.push(world.data.classes[0].clone());
    }
    world.consents.push(d);
    world
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// (a) A deny for an actor always yields Deny for that actor, whatever is granted.
    #[test]
    fn deny_for_actor_always_denies(world in any_world(), np in any::<bool>(), nc in any::<bool>()) {
        let world = with_deny(world, np, nc);
        let d = world.decide();
        prop_assert_eq!(d.effect, Effect::Deny);
        // Only the purpose gate (rule 2) may come first; otherwise the deny itself decides.
        if d.decided_by.rule != RuleId::PurposeNotAllowedForKind {
            prop_assert_eq!(d.decided_by.rule, RuleId::ConsentDeny);
            prop_assert!(d.decided_by.consent.is_some());
        }
    }

    /// (a') Exception 1: the custodian still sees its own data despite a deny naming it.
    #[test]
    fn custodian_overrides_deny(mut world in any_world(), np in any::<bool>(), nc in any::<bool>()) {
        world.custodian = world.requester.institution.clone();
        let world = with_deny(world, np, nc);
        let d = world.decide();
        prop_assert_eq!(d.effect, Effect::Permit);
        prop_assert_eq!(d.decided_by.rule, RuleId::CustodianOwnData);
    }

    /// (a'') Exception 2: break-the-glass by an allowed kind with a reason overrides the deny,
    /// always flagged for review and naming the overridden consent.
    #[test]
    fn break_glass_overrides_deny(mut world in any_world(), nc in any::<bool>()) {
        world.purpose = Purpose::EmergencyTreatment;
        world.reason = Some("patient unconscious".to_owned());
        world.config.break_glass_kinds.insert(world.requester.kind);
        let world = with_deny(world, true, nc);
        let d = world.decide();
        prop_assert_eq!(d.effect, Effect::Permit);
        prop_assert_eq!(d.decided_by.rule, RuleId::BreakGlass);
        prop_assert!(d.flagged_for_review());
        prop_assert!(d.notes.iter().any(|n| n.rule == RuleId::BreakGlassOverrodeConsent
            && n.consent.as_ref().map(ConsentId::as_str) == Some("zz-deny")));
    }

    /// (c) Decisions are deterministic and independent of the order consents are given in.
    #[test]
    fn decisions_are_deterministic(world in any_world(), rotate in 0usize..8) {
        let first = world.decide();
        let again = world.decide();
        prop_assert_eq!(&first, &again);
        let mut shuffled = World { consents: world.consents.clone(), ..world };
        let n = shuffled.consents.len().max(1);
        shuffled.consents.rotate_left(rotate % n);
        shuffled.consents.reverse();
        let other = shuffled.decide();
        prop_assert_eq!(serde_json::to_string(&first).unwrap(), serde_json::to_string(&other).unwrap());
    }
}

// ------------------------------------------------------------------------------------------
// (b) Masking never leaks.

const SURNAMES: [&str; 8] = ["张", "王", "李", "赵", "欧阳", "司马", "陈", "刘"];
const VOCABULARY: &str = "Patient Bundle Observation RelatedPerson Organization official phone email \
    home mobile generated Consent http example urn oid";

fn given_cjk() -> impl Strategy<Value = String> {
    prop::collection::vec(0x4e00u32..0x9fa5, 1..3)
        .prop_map(|cs| cs.into_iter().filter_map(char::from_u32).collect())
}

fn latin_word() -> impl Strategy<Value = String> {
    "[A-Z][a-z]{4,7}".prop_filter("not part of the FHIR vocabulary", |w| {
        !VOCABULARY.contains(w.as_str())
    })
}

fn resident_id() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["110105", "440524", "310104", "510107"]),
        1940u32..2020,
        1u32..13,
        1u32..29,
        0u32..1000,
    )
        .prop_map(|(area, y, m, d, seq)| {
            let body = format!("{area}{y:04}{m:02}{d:02}{seq:03}");
            const W: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
            let sum: u32 = body
                .chars()
                .zip(W)
                .map(|(c, w)| c.to_digit(10).unwrap() * w)
                .sum();
            let check =
                ['1', '0', 'X', '9', '8', '7', '6', '5', '4', '3', '2'][(sum % 11) as usize];
            format!("{body}{check}")
        })
}

#[derive(Debug, Clone)]
struct Person {
    surname: String,
    given: String,
    latin_given: String,
    latin_family: String,
    id: String,
    phone: String,
    email: String,
    line: String,
    postal: String,
    birth: String,
    contact_name: String,
    contact_phone: String,
}

fn person() -> impl Strategy<Value = Person> {
    (
        (
            prop::sample::select(SURNAMES.to_vec()),
            given_cjk(),
            latin_word(),
            latin_word(),
        ),
        (
            resident_id(),
            "1[3-9][0-9]{9}",
            "[a-z]{5,10}@[a-z]{4,8}\\.cn",
        ),
        (
            given_cjk(),
            1u32..999,
            "9[0-9]{5}",
            1940u32..2020,
            1u32..13,
            1u32..29,
        ),
        (given_cjk(), "1[3-9][0-9]{9}"),
    )
        .prop_map(
            |(
                (surname, given, lg, lf),
                (id, phone, email),
                (street, no, postal, y, m, d),
                (cg, cphone),
            )| Person {
                surname: surname.to_owned(),
                given,
                latin_given: lg,
                latin_family: lf,
                id,
                phone,
                email,
                line: format!("{street}路{no}号"),
                postal,
                birth: format!("{y:04}-{m:02}-{d:02}"),
                contact_name: format!("王{cg}"),
                contact_phone: cphone,
            },
        )
}

impl Person {
    fn full(&self) -> String {
        format!("{}{}", self.surname, self.given)
    }

    fn latin(&self) -> String {
        format!("{} {}", self.latin_given, self.latin_family)
    }

    /// A Patient that repeats its data in every awkward place.
    fn patient(&self, id: &str, contained: Option<Value>) -> Value {
        let mut p = json!({
            "resourceType": "Patient",
            "id": id,
            "text": {"status": "generated", "div": format!("<div>{} {} {}</div>", self.full(), self.id, self.phone)},
            "extension": [
                {"url": "http://example.org/fhir/alias", "valueString": self.full()},
                {"url": "http://example.org/fhir/note", "valueString": format!("联系人{}，电话{}", self.full(), self.phone)}
            ],
            "identifier": [
                {"system": "urn:oid:2.16.156.10011.1.1", "value": self.id,
                 "extension": [{"url": "http://example.org/holder", "valueString": self.full()}]},
                {"system": "urn:example:mrn", "value": format!("MRN{}", &self.phone[3..])}
            ],
            "name": [
                {"use": "official", "text": self.full(), "family": self.surname, "given": [self.given],
                 "extension": [{"url": "http://example.org/pinyin", "valueString": self.latin()}]},
                {"text": self.latin(), "family": self.latin_family, "given": [self.latin_given]}
            ],
            "telecom": [{"system": "phone", "value": self.phone}, {"system": "email", "value": self.email}],
            "address": [{"text": format!("北京市海淀区{}", self.line), "line": [self.line], "city": "北京市",
                          "district": "海淀区", "postalCode": self.postal}],
            "birthDate": self.birth,
            "contact": [{"name": {"text": self.contact_name}, "telecom": [{"system": "phone", "value": self.contact_phone}]}]
        });
        if let Some(c) = contained {
            p["contained"] = json!([c]);
        }
        p
    }

    fn secrets(&self) -> Vec<String> {
        let mut s = vec![
            self.full(),
            self.latin(),
            self.latin_given.clone(),
            self.id.clone(),
            self.phone.clone(),
            self.email.clone(),
            self.line.clone(),
            self.postal.clone(),
            self.birth.clone(),
            self.contact_name.clone(),
            self.contact_phone.clone(),
            self.phone[3..].to_owned(), // the MRN's digits
        ];
        if self.given.chars().count() >= 2 {
            s.push(self.given.clone());
        }
        s
    }
}

fn masking_rules(research: bool) -> Vec<FieldRule> {
    let config = MaskingConfig::default();
    if research {
        config.research
    } else {
        config
            .assignments
            .into_iter()
            .find(|a| a.purposes.contains(&Purpose::Payment))
            .map(|a| a.rules)
            .unwrap()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// (b) No original sensitive string survives anywhere in the serialised output, for the
    /// default masking profile and the default research profile, in a Bundle with a contained
    /// Patient and an Observation repeating the name.
    #[test]
    fn masking_never_leaks(a in person(), b in person(), research in any::<bool>()) {
        let outer = a.patient("p1", Some(b.patient("p2", None)));
        let mut bundle = json!({"resourceType": "Bundle", "type": "searchset", "entry": [
            {"fullUrl": "urn:example:Patient/p1", "resource": outer},
            {"resource": {"resourceType": "Observation", "subject": {"reference": "Patient/p1", "display": a.full()}}}
        ]});
        let key = PseudonymKey::new(b"0123456789abcdef0123".to_vec()).unwrap();
        let ps = Pseudonymiser::new(&key, InstitutionId::new("research-1"));
        apply_rules(&mut bundle, &masking_rules(research), Some(&ps)).unwrap();
        let out = serde_json::to_string(&bundle).unwrap();
        for secret in a.secrets().into_iter().chain(b.secrets()) {
            prop_assert!(!out.contains(&secret), "`{}` leaked (research={}): {}", secret, research, out);
        }
        // Structure survives the sweep.
        prop_assert_eq!(&bundle["entry"][0]["resource"]["resourceType"], "Patient");
    }
}
