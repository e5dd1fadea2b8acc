//! GB 11643 resident ID numbers where patients enter (issue 25, docs/empi.md "Resident ID
//! numbers"): an invalid number is kept as an untrusted identifier with a data-quality issue —
//! never refused — the same through the FHIR feed, the HL7 v2 feed and the bulk import; the
//! matcher neither links nor vetoes on it; a 15-digit number contradicting the record's birth
//! date is not upgraded to a trusted 19xx number.

use serde_json::{Value, json};
use yiqiao_registry::empi::ident::check_character;
use yiqiao_registry::empi::store as empi;

use crate::empi::person_of;
use crate::helpers::{ADMIN_TOKEN, Backend, TestApp, institution, yiqiao_cli};
use crate::on_both_backends;

const RID_SYSTEM: &str = "urn:oid:2.16.156.10011.1.1";

fn system(n: u32) -> String {
    format!("urn:oid:2.16.156.10011.1.99.{n}")
}

fn valid_rid(birth: &str, seq: u32) -> String {
    let first17 = format!("350102{birth}{seq:03}");
    format!("{first17}{}", check_character(&first17).unwrap())
}

async fn app(backend: Backend) -> TestApp {
    let app = TestApp::spawn_with(backend, |s| {
        s.mllp.enabled = true;
        s.mllp.listen = "127.0.0.1:0".parse().unwrap();
        s.mllp.allow = crate::mllp::allow(&[("127.0.0.1", "hosp-001"), ("127.0.0.1", "hosp-002")]);
    })
    .await;
    for n in 1..=2 {
        let mut inst = institution(n);
        inst["allowed_scopes"] = json!(["system/Patient.cruds"]);
        assert_eq!(
            app.admin_post("/admin/institutions", &inst).await.status(),
            201
        );
    }
    app
}

struct Demographics<'a> {
    name: (&'a str, &'a str),
    gender: &'a str,
    birth: Option<&'a str>,
    rid: &'a str,
    phone: Option<&'a str>,
}

async fn register(app: &TestApp, inst: u32, local: &str, d: &Demographics<'_>) -> Value {
    let mut body = json!({
        "resourceType": "Patient",
        "identifier": [
            { "system": system(inst), "value": local },
            { "system": RID_SYSTEM, "value": d.rid },
        ],
        "name": [{ "use": "official", "family": d.name.0, "given": [d.name.1] }],
        "gender": d.gender,
    });
    if let Some(birth) = d.birth {
        body["birthDate"] = json!(birth);
    }
    if let Some(phone) = d.phone {
        body["telecom"] = json!([{ "system": "phone", "value": phone }]);
    }
    let resp = app
        .client
        .post(app.url("/fhir/Patient"))
        .bearer_auth(ADMIN_TOKEN)
        .header("X-On-Behalf-Of", format!("hosp-{inst:03}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let out: Value = resp.json().await.unwrap();
    assert_eq!(status, 201, "{out}");
    out
}

async fn person(app: &TestApp, id: &str) -> Value {
    let resp = app.admin_get(&format!("/empi/persons/{id}")).await;
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// The person's view of the record registered by `inst` as `local`.
async fn record_view(app: &TestApp, inst: u32, local: &str) -> (Value, Value) {
    let store = app.state.store.clone();
    let local = local.to_string();
    let record = tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        empi::find_by_identifier(&mut conn, &system(inst), &local).unwrap()
    })
    .await
    .unwrap()
    .expect("the record is stored");
    let person = person(app, &record.link.as_ref().unwrap().person_id).await;
    let view = person["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == record.id.as_str())
        .unwrap()
        .clone();
    (view, person)
}

fn assert_untrusted(view: &Value, value: &str, issue: &str) {
    assert_eq!(view["resident_id"]["value"], value, "{view}");
    assert_eq!(view["resident_id"]["trusted"], false, "{view}");
    assert!(
        view["quality_issues"].to_string().contains(issue),
        "{issue} expected: {view}"
    );
}

/// The invalid numbers of the issue: kept, untrusted, each with its issue; never the golden
/// record's resident ID.
const INVALID: [(&str, &str, &str); 5] = [
    (
        "wrong check digit",
        "110105194912310021",
        "ResidentIdCheckCharacter",
    ),
    ("month 13", "110105194913310026", "ResidentIdBirthDate"),
    ("day 32", "110105194912320023", "ResidentIdBirthDate"),
    ("16 digits", "1101051949123100", "ResidentIdLength"),
    ("a letter", "11010519491231A02X", "ResidentIdCharacters"),
];

async fn invalid_resident_ids_are_kept_untrusted_on_every_feed(backend: Backend) {
    let app = app(backend).await;
    let families = ["赵", "钱", "孙", "李", "周"];
    // FHIR.
    for (i, (what, rid, issue)) in INVALID.iter().enumerate() {
        let local = format!("F{i}");
        let d = Demographics {
            name: (families[i], "一"),
            gender: "female",
            birth: Some("1949-12-31"),
            rid,
            phone: None,
        };
        register(&app, 1, &local, &d).await;
        let (view, person) = record_view(&app, 1, &local).await;
        assert_untrusted(&view, rid, issue);
        assert!(
            person["golden"]["resident_id"].is_null(),
            "{what}: {person}"
        );
    }
    // HL7 v2: PID-3 repetition of type NNCHN, wrong check digit; accepted (AA) and untrusted.
    let message =
        "MSH|^~\\&|HIS|hosp-002|YIQIAO|YIQIAO|20261129120000||ADT^A04^ADT_A01|C-RID|P|2.5\r\
                   EVN|A04|20261129120000\r\
                   PID|1||H1^^^hosp-002^MR~110105194912310021^^^^NNCHN||吴^二^^^^^L||19491231|F"
            .to_string();
    let acks = crate::mllp::send_async(app.mllp.unwrap(), vec![message]).await;
    assert_eq!(acks[0]["code"], "AA", "{}", acks[0]);
    let (view, _) = record_view(&app, 2, "H1").await;
    assert_untrusted(&view, "110105194912310021", "ResidentIdCheckCharacter");
    // Bulk import (CSV): stored, not in the rejects report.
    let dir = crate::helpers::TempDir::new();
    let csv = dir.path.join("patients.csv");
    std::fs::write(
        &csv,
        "record_number,name,gender,birth_date,resident_id\n\
         I1,郑三,F,1949-12-31,1101051949123100\n",
    )
    .unwrap();
    let out = yiqiao_cli(
        &app,
        &[
            "mpi",
            "import",
            csv.to_str().unwrap(),
            "--institution",
            "hosp-002",
            "--format",
            "csv",
            "--no-progress",
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (view, _) = record_view(&app, 2, "I1").await;
    assert_untrusted(&view, "1101051949123100", "ResidentIdLength");
    app.stop().await;
}

async fn untrusted_ids_neither_force_nor_veto_a_link(backend: Backend) {
    let app = app(backend).await;
    // Two men named 张伟 (the commonest name), one without a birth date, sharing a malformed
    // number (18 characters, month 13: the same blocking key). Name and sex alone are far from
    // a link; the number must add nothing (as trusted evidence it added +15 and linked them).
    let zhang = |birth| Demographics {
        name: ("张", "伟"),
        gender: "male",
        birth,
        rid: "350102198013150012",
        phone: None,
    };
    let a = register(&app, 1, "A1", &zhang(Some("1980-03-15"))).await;
    let b = register(&app, 2, "B1", &zhang(None)).await;
    assert_ne!(person_of(&a), person_of(&b), "linked by a malformed number");

    // One person born in 2005: a legacy 15-digit number (read as 1905) at one hospital, the
    // valid 18-digit one at another. The 15-digit one is untrusted, so it does not veto the
    // link, and the golden record keeps the 2005 birth date.
    let d = |rid| Demographics {
        name: ("李", "娜"),
        gender: "female",
        birth: Some("2005-03-04"),
        rid,
        phone: Some("13900002222"),
    };
    let legacy = "350102050304122";
    let valid = valid_rid("20050304", 122);
    let c = register(&app, 1, "A2", &d(legacy)).await;
    let e = register(&app, 2, "B2", &d(&valid)).await;
    assert_eq!(
        person_of(&c),
        person_of(&e),
        "vetoed by an upgraded 15-digit number"
    );
    let (view, person) = record_view(&app, 1, "A2").await;
    assert_untrusted(&view, legacy, "ResidentIdLegacy15BirthDate");
    assert_eq!(person["golden"]["resident_id"], valid.as_str(), "{person}");
    assert_eq!(person["golden"]["birth_date"], "2005-03-04", "{person}");
    app.stop().await;
}

on_both_backends!(
    invalid_resident_ids_are_kept_untrusted_on_every_feed,
    untrusted_ids_neither_force_nor_veto_a_link,
);
