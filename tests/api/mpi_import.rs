//! `yiqiao mpi import` as scripts use it: the binary against a real database (both
//! backends): rejects report, idempotent re-runs, resume from the checkpoint, CSV mapping.

use serde_json::{Value, json};
use yiqiao_registry::empi::ident::check_character;
use yiqiao_registry::empi::store as empi;
use yiqiao_registry::{Store, StoreOptions};

use crate::helpers::{Backend, TempDir, TestDb, run_blocking, yiqiao_in};

const SYSTEM: &str = "urn:oid:2.16.156.10011.1.99.7";

fn rid(birth: &str, seq: u32) -> String {
    let first17 = format!("350102{birth}{seq:03}");
    format!("{first17}{}", check_character(&first17).unwrap())
}

fn patient(mrn: &str, family: &str, given: &str, birth: &str, seq: u32) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [
            { "system": SYSTEM, "value": mrn },
            { "system": "urn:oid:2.16.156.10011.1.1", "value": rid(&birth.replace('-', ""), seq) }
        ],
        "name": [{ "family": family, "given": [given] }],
        "gender": "female",
        "birthDate": birth,
    })
}

fn records(db_url: &str) -> Vec<(String, String)> {
    let store = Store::open(&StoreOptions {
        url: db_url.to_string(),
        pool_size: 1,
        min_idle: None,
        acquire_timeout: std::time::Duration::from_secs(5),
        connect_timeout: std::time::Duration::from_secs(5),
        statement_timeout: std::time::Duration::from_secs(30),
        sqlite_busy_timeout: std::time::Duration::from_secs(5),
    })
    .unwrap();
    let mut conn = store.conn().unwrap();
    let filter = empi::RecordFilter {
        limit: 100,
        ..Default::default()
    };
    let mut out: Vec<(String, String)> = empi::search_records(&mut conn, &filter)
        .unwrap()
        .into_iter()
        .map(|r| (r.id_value, r.record.name))
        .collect();
    out.sort();
    out
}

fn rejects(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn import_ndjson_and_csv(backend: Backend) {
    let dir = TempDir::new();
    let db = TestDb::new(backend);
    let (code, out, err) = run_blocking(yiqiao_in(&dir, &db.url).args([
        "institution",
        "add",
        "--id",
        "hosp-imp",
        "--name",
        "导入医院",
        "--uscc",
        "91350100M000100Y43",
        "--region-code",
        "350100",
        "--level",
        "3A",
        "--patient-id-system",
        SYSTEM,
    ]));
    assert_eq!(code, 0, "{out}{err}");

    // NDJSON: 5 good rows, an empty line, and 3 bad ones (lines 3, 6, 9).
    let mut no_own_id = patient("X", "钱", "七", "1970-01-01", 9);
    no_own_id["identifier"] = json!([{ "system": "urn:other", "value": "1" }]);
    let mut bad_birth = patient("M9", "孙", "八", "1970-01-01", 10);
    bad_birth["birthDate"] = json!("1970-13-45");
    let lines = [
        patient("M1", "王", "芳", "1980-01-02", 1).to_string(),
        patient("M2", "李", "娜", "1981-02-03", 2).to_string(),
        "{not json".to_string(),
        patient("M3", "张", "敏", "1982-03-04", 3).to_string(),
        String::new(),
        no_own_id.to_string(),
        patient("M4", "刘", "洋", "1983-04-05", 4).to_string(),
        patient("M5", "陈", "静", "1984-05-06", 5).to_string(),
        bad_birth.to_string(),
    ];
    let file = dir.path.join("patients.ndjson");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let import = |extra: &[&str]| {
        let mut cmd = yiqiao_in(&dir, &db.url);
        cmd.args([
            "mpi",
            "import",
            "patients.ndjson",
            "--institution",
            "hosp-imp",
        ])
        .args(["--format", "ndjson", "--batch", "2", "--no-progress"])
        .args(extra);
        run_blocking(&mut cmd)
    };
    let (code, out, err) = import(&[]);
    assert_eq!(code, 6, "rows were rejected: {out}{err}");
    assert!(out.contains("imported 8 rows"), "{out}");
    assert!(
        out.contains("created 5, updated 0, unchanged 0, rejected 3"),
        "{out}"
    );
    assert!(err.contains("patients.ndjson.rejects.csv"), "{err}");
    let report = rejects(&dir.path.join("patients.ndjson.rejects.csv"));
    assert_eq!(report[0], "line,field,reason");
    assert_eq!(report.len(), 4, "{report:?}");
    assert!(report[1].starts_with("3,,not JSON"), "{report:?}");
    assert!(report[2].starts_with("6,Patient.identifier,"), "{report:?}");
    assert!(report[3].starts_with("9,Patient.birthDate,"), "{report:?}");
    let stored = records(&db.url);
    assert_eq!(
        stored.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        ["M1", "M2", "M3", "M4", "M5"]
    );
    assert!(stored.contains(&("M3".into(), "张敏".into())));

    // A re-run finds the checkpoint at the end: nothing read again.
    let (code, out, _) = import(&[]);
    assert_eq!(code, 6);
    assert!(out.contains("imported 0 rows"), "{out}");
    assert!(out.contains("resumed after line 9"), "{out}");

    // A crash after the batch ending at line 4: the checkpoint says line 4 and the report's
    // length then (header + the line-3 reject); rows after it are reported once, registered
    // idempotently.
    let cp_path = dir.path.join("patients.ndjson.checkpoint");
    let mut cp: Value = serde_json::from_str(&std::fs::read_to_string(&cp_path).unwrap()).unwrap();
    let head_len = report[0].len() + 1 + report[1].len() + 1;
    cp["line"] = json!(4);
    cp["rejects_len"] = json!(head_len);
    cp["created"] = json!(3);
    cp["rejected"] = json!(1);
    std::fs::write(&cp_path, cp.to_string()).unwrap();
    let (code, out, _) = import(&[]);
    assert_eq!(code, 6);
    assert!(out.contains("resumed after line 4"), "{out}");
    assert!(
        out.contains("created 3, updated 0, unchanged 2, rejected 3"),
        "{out}"
    );
    assert_eq!(
        rejects(&dir.path.join("patients.ndjson.rejects.csv")),
        report,
        "no duplicate in the report"
    );
    assert_eq!(records(&db.url).len(), 5, "no duplicate records");

    // --restart: everything again, idempotent on the record number.
    let (_, out, _) = import(&["--restart"]);
    assert!(
        out.contains("created 0, updated 0, unchanged 5, rejected 3"),
        "{out}"
    );

    // A checkpoint of another file is refused.
    std::fs::write(&file, lines[..4].join("\n")).unwrap();
    let (code, _, err) = import(&[]);
    assert_eq!(code, 6);
    assert!(err.contains("another file"), "{err}");

    // CSV with a mapped column: a changed row updates, a bad gender is rejected by name.
    let csv = "病案号,name,gender,birth_date,resident_id,phone,address\n\
               M1,王芳,女,19800102,,13800000001,\"福州市鼓楼区, 东街1号\"\n\
               C2,赵雷,X,19900101,,,\n\
               C3,周杰,男,1990-02-03,,,\n\
               ,无号,男,1990-02-03,,,\n";
    std::fs::write(dir.path.join("p.csv"), csv).unwrap();
    let (code, out, err) = run_blocking(yiqiao_in(&dir, &db.url).args([
        "mpi",
        "import",
        "p.csv",
        "--institution",
        "hosp-imp",
        "--format",
        "csv",
        "--column",
        "record_number=病案号",
        "--no-progress",
    ]));
    assert_eq!(code, 6, "{out}{err}");
    assert!(
        out.contains("created 1, updated 1, unchanged 0, rejected 2"),
        "{out}"
    );
    let report = rejects(&dir.path.join("p.csv.rejects.csv"));
    assert!(report[1].starts_with("3,gender,"), "{report:?}");
    assert!(report[2].starts_with("5,record_number,"), "{report:?}");
    assert!(
        records(&db.url).contains(&("C3".into(), "周杰".into())),
        "stored"
    );

    // Header problems stop the import before anything is stored.
    std::fs::write(
        dir.path.join("bad.csv"),
        "record_number,name,shoe_size\n1,a,42\n",
    )
    .unwrap();
    let (code, _, err) = run_blocking(yiqiao_in(&dir, &db.url).args([
        "mpi",
        "import",
        "bad.csv",
        "--institution",
        "hosp-imp",
        "--format",
        "csv",
        "--no-progress",
    ]));
    assert_eq!(code, 6);
    assert!(err.contains("shoe_size"), "{err}");
    let (code, _, _) = run_blocking(yiqiao_in(&dir, &db.url).args([
        "mpi",
        "import",
        "p.csv",
        "--institution",
        "hosp-none",
        "--format",
        "csv",
    ]));
    assert_eq!(code, 5, "unknown institution");
    assert_eq!(records(&db.url).len(), 6);
}

#[test]
fn import_ndjson_and_csv_sqlite() {
    import_ndjson_and_csv(Backend::Sqlite);
}

#[test]
fn import_ndjson_and_csv_postgres() {
    import_ndjson_and_csv(Backend::Postgres);
}
