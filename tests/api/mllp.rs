//! The HL7 v2 MLLP feed: real messages from an independent peer (python-hl7's MLLPClient,
//! tests/interop/mllp_client.py) on both backends, and hostile peers on raw sockets.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use yiqiao_registry::empi::ident::check_character;
use yiqiao_registry::empi::store as empi;

use crate::helpers::{ADMIN_TOKEN, Backend, TestApp, institution};
use crate::on_both_backends;
use crate::wait;

fn system(n: u32) -> String {
    format!("urn:oid:2.16.156.10011.1.99.{n}")
}

fn rid(birth: &str, seq: u32) -> String {
    let first17 = format!("350102{birth}{seq:03}");
    let check = check_character(&first17).unwrap();
    format!("{first17}{check}")
}

async fn app(backend: Backend, adjust: impl FnOnce(&mut yiqiao_gateway::Settings)) -> TestApp {
    let app = TestApp::spawn_with(backend, |s| {
        s.mllp.enabled = true;
        s.mllp.listen = "127.0.0.1:0".parse().unwrap();
        adjust(s);
    })
    .await;
    for i in 1..=2 {
        let mut inst = institution(i);
        inst["allowed_scopes"] = json!(["system/Patient.cruds"]);
        assert_eq!(
            app.admin_post("/admin/institutions", &inst).await.status(),
            201
        );
    }
    app
}

/// Send messages with python-hl7 over one connection; one parsed ACK per message.
pub(crate) async fn send_async(addr: SocketAddr, messages: Vec<String>) -> Vec<Value> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/interop/mllp_client.py"
    );
    let mut child = wait::spawn(
        wait::command("python3")
            .arg(script)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        "mllp_client.py",
    );
    let mut stdin = child.stdin.take().unwrap();
    let input = serde_json::to_string(&messages).unwrap();
    tokio::time::timeout(wait::RUN, stdin.write_all(input.as_bytes()))
        .await
        .expect("mllp_client.py did not read its messages")
        .unwrap();
    drop(stdin);
    let out = wait::output_of(child, "mllp_client.py", wait::RUN).await;
    assert!(
        out.status.success(),
        "mllp_client.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

struct Adt<'a> {
    event: &'a str,
    facility: &'a str,
    control: &'a str,
    pid3: String,
    name: &'a str,
    birth: &'a str,
    sex: &'a str,
    address: &'a str,
    phone: &'a str,
    mrg: Option<String>,
}

impl Adt<'_> {
    fn message(&self) -> String {
        let mut m = format!(
            "MSH|^~\\&|HIS|{}|YIQIAO|YIQIAO|20261129120000||ADT^{}^ADT_A01|{}|P|2.5\r\
             EVN|{}|20261129120000\r\
             PID|1||{}||{}||{}|{}|||{}||{}\r\
             PV1|1|O",
            self.facility,
            self.event,
            self.control,
            self.event,
            self.pid3,
            self.name,
            self.birth,
            self.sex,
            self.address,
            self.phone
        );
        if let Some(mrg) = &self.mrg {
            m.push_str(&format!("\rMRG|{mrg}"));
        }
        m
    }
}

fn zhang(control: &str) -> Adt<'_> {
    Adt {
        event: "A01",
        facility: "hosp-001",
        control,
        pid3: format!("MRN001^^^hosp-001^MR~{}^^^^NNCHN", rid("19800102", 11)),
        name: "张^伟^^^^^L",
        birth: "19800102",
        sex: "M",
        address: "鼓楼路1号\\T\\2单元^^福州市^福建省^350001^CHN^H^^鼓楼区",
        phone: "13800138000",
        mrg: None,
    }
}

pub(crate) fn assert_ack(ack: &Value, code: &str, control: &str) {
    assert_eq!(ack["code"], code, "{ack}");
    assert_eq!(ack["control_id"], control, "{ack}");
    assert!(
        ack["ack_type"].as_str().unwrap().starts_with("ACK"),
        "{ack}"
    );
}

pub(crate) fn assert_nak(ack: &Value, code: &str, location: &str, err_code: &str) {
    assert_eq!(ack["code"], code, "{ack}");
    assert_eq!(ack["err_location"], location, "{ack}");
    assert_eq!(ack["err_code"], err_code, "{ack}");
    assert!(!ack["text"].as_str().unwrap().is_empty(), "{ack}");
}

async fn record(app: &TestApp, inst: u32, value: &str) -> Option<empi::StoredRecord> {
    let store = app.state.store.clone();
    let value = value.to_string();
    tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        empi::find_by_identifier(&mut conn, &system(inst), &value).unwrap()
    })
    .await
    .unwrap()
}

fn person(r: &empi::StoredRecord) -> String {
    r.link.as_ref().unwrap().person_id.clone()
}

async fn feed_registers_updates_and_merges(backend: Backend) {
    let app = app(backend, |_| {}).await;
    let addr = app.mllp.unwrap();

    // A01, the same again (idempotent), then A08 with a new phone.
    let mut update = zhang("c3");
    update.event = "A08";
    update.phone = "13900139000";
    let acks = send_async(
        addr,
        vec![
            zhang("c1").message(),
            zhang("c2").message(),
            update.message(),
        ],
    )
    .await;
    assert_ack(&acks[0], "AA", "c1");
    assert!(
        acks[0]["text"]
            .as_str()
            .unwrap()
            .starts_with("created Patient/")
    );
    assert_ack(&acks[1], "AA", "c2");
    assert!(acks[1]["text"].as_str().unwrap().starts_with("unchanged"));
    assert_ack(&acks[2], "AA", "c3");
    assert!(acks[2]["text"].as_str().unwrap().starts_with("updated"));
    assert!(acks[2]["ack_type"].as_str().unwrap().starts_with("ACK^A08"));

    // Stored as the FHIR feed would: read it back over FHIR.
    let stored = record(&app, 1, "MRN001").await.unwrap();
    assert_eq!(stored.version, 2);
    let resp = app
        .client
        .get(app.url(&format!("/fhir/Patient/{}", stored.id)))
        .bearer_auth(ADMIN_TOKEN)
        .header("X-On-Behalf-Of", "hosp-001")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let p: Value = resp.json().await.unwrap();
    assert_eq!(p["name"][0]["family"], "张");
    assert_eq!(p["name"][0]["given"], json!(["伟"]));
    assert_eq!(p["birthDate"], "1980-01-02");
    assert_eq!(p["gender"], "male");
    assert_eq!(p["telecom"][0]["value"], "13900139000");
    // The \T\ escape is decoded with the message's encoding characters.
    assert_eq!(p["address"][0]["line"][0], "鼓楼路1号&2单元");
    assert_eq!(p["address"][0]["district"], "鼓楼区");
    assert_eq!(p["identifier"][1]["value"], rid("19800102", 11));
    assert_eq!(stored.record.name, "张伟");

    // Another hospital registers the same resident: one enterprise person.
    let mut other = zhang("h2-1");
    other.facility = "hosp-002";
    other.event = "A04";
    other.pid3 = format!(
        "B-77^^^^PI~{}^^^&2.16.156.10011.1.1&ISO",
        rid("19800102", 11)
    );
    // A different separator set (MSH-1/MSH-2): '#' for components.
    let custom = other.message().replace('^', "#");
    assert!(custom.starts_with("MSH|#~\\&|"));
    let acks = send_async(addr, vec![custom]).await;
    assert_ack(&acks[0], "AA", "h2-1");
    // The ACK speaks the message's own delimiters.
    assert_eq!(acks[0]["ack_type"], "ACK#A04#ACK");
    let b = record(&app, 2, "B-77").await.unwrap();
    assert_eq!(person(&b), person(&stored));
    assert_eq!(b.record.name, "张伟");

    // Application errors name the field; rejects for what cannot be processed at all.
    let mut bad_birth = zhang("e1");
    bad_birth.birth = "19801340";
    let mut no_pid3 = zhang("e2");
    no_pid3.pid3 = String::new();
    let mut foreign_only = zhang("e3");
    foreign_only.pid3 = "X1^^^other-hosp^MR".into();
    let mut bad_sex = zhang("e4");
    bad_sex.sex = "X";
    let mut no_name = zhang("e5");
    no_name.name = "";
    let mut unknown = zhang("r1");
    unknown.facility = "nowhere-99";
    // A03 (discharge) needs the visit number PV1-19 (the PV1 here has none).
    let mut discharge = zhang("e6");
    discharge.event = "A03";
    let mut transfer = zhang("r2");
    transfer.event = "A02";
    let oru = zhang("r3").message().replace("ADT^A01^ADT_A01", "ORU^R01");
    let acks = send_async(
        addr,
        vec![
            bad_birth.message(),
            no_pid3.message(),
            foreign_only.message(),
            bad_sex.message(),
            no_name.message(),
            unknown.message(),
            transfer.message(),
            oru,
            discharge.message(),
        ],
    )
    .await;
    assert_nak(&acks[0], "AE", "PID^1^7", "102");
    assert_nak(&acks[1], "AE", "PID^1^3", "101");
    assert_nak(&acks[2], "AE", "PID^1^3", "101");
    assert_nak(&acks[3], "AE", "PID^1^8", "103");
    assert_nak(&acks[4], "AE", "PID^1^5", "101");
    assert_nak(&acks[5], "AR", "MSH^1^4", "103");
    assert!(acks[5]["text"].as_str().unwrap().contains("nowhere-99"));
    assert_nak(&acks[6], "AR", "MSH^1^9", "201");
    assert_nak(&acks[7], "AR", "MSH^1^9", "200");
    assert_nak(&acks[8], "AE", "PV1^1^19", "101");
    for (ack, control) in acks
        .iter()
        .zip(["e1", "e2", "e3", "e4", "e5", "r1", "r2", "r3", "e6"])
    {
        assert_eq!(ack["control_id"], control);
    }
    // Nothing of the failed messages was stored.
    assert!(record(&app, 1, "X1").await.is_none());
    assert_eq!(record(&app, 1, "MRN001").await.unwrap().version, 2);

    // A40: the hospital found MRN002 to be a duplicate of MRN001.
    let dup = Adt {
        event: "A04",
        facility: "hosp-001",
        control: "m0",
        pid3: "MRN002^^^^MR".into(),
        name: "李^娜",
        birth: "19950505",
        sex: "F",
        address: "",
        phone: "",
        mrg: None,
    };
    let merge = Adt {
        event: "A40",
        control: "m1",
        pid3: "MRN001^^^hosp-001^MR".into(),
        mrg: Some("MRN002^^^hosp-001^MR".into()),
        ..zhang("m1")
    };
    let unknown_prior = Adt {
        event: "A40",
        control: "m2",
        pid3: "MRN001^^^hosp-001^MR".into(),
        mrg: Some("MRN404^^^hosp-001^MR".into()),
        ..zhang("m2")
    };
    let acks = send_async(addr, vec![dup.message()]).await;
    assert_ack(&acks[0], "AA", "m0");
    let before = record(&app, 1, "MRN002").await.unwrap();
    assert_ne!(
        person(&before),
        person(&stored),
        "different people before A40"
    );
    let acks = send_async(
        addr,
        vec![dup.message(), merge.message(), unknown_prior.message()],
    )
    .await;
    assert_ack(&acks[1], "AA", "m1");
    assert!(acks[1]["text"].as_str().unwrap().starts_with("merged"));
    let after = record(&app, 1, "MRN002").await.unwrap();
    assert_eq!(person(&after), person(&stored));
    assert_eq!(after.link.unwrap().decided_by, empi::DecidedBy::Merge);
    assert_nak(&acks[2], "AE", "MRG^1^1", "204");

    // The merge is waiting in the durable event table for the institutions' notifications.
    let store = app.state.store.clone();
    let target = person(&stored);
    tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        let pending = empi::pending_events(&mut conn, 1000).unwrap();
        let merge = pending
            .iter()
            .find(|e| e.kind == "merge")
            .expect("merge event pending");
        assert_eq!(merge.person_id.as_deref(), Some(target.as_str()));
        assert_eq!(merge.actor, "institution:hosp-001 (hl7v2)");
        let id = merge.id.clone();
        assert_eq!(
            empi::mark_notified(&mut conn, std::slice::from_ref(&id)).unwrap(),
            1
        );
        assert_eq!(
            empi::mark_notified(&mut conn, std::slice::from_ref(&id)).unwrap(),
            0
        );
        let left = empi::pending_events(&mut conn, 1000).unwrap();
        assert!(left.iter().all(|e| e.id != id));
        assert_eq!(left.len(), pending.len() - 1);
    })
    .await
    .unwrap();

    // Every accepted registration and merge is audited, attributed to the hospital.
    let store = app.state.store.clone();
    let rows: Vec<AuditRow> = tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        diesel::RunQueryDsl::load(
            diesel::sql_query(
                "SELECT subtype_code, agent_institution FROM audit_events \
                 WHERE agent_user LIKE 'mllp:%' ORDER BY seq",
            ),
            &mut *conn,
        )
        .unwrap()
    })
    .await
    .unwrap();
    let seen: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r.subtype_code.as_str(), r.agent_institution.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("create", "hosp-001"),
            ("update", "hosp-001"),
            ("update", "hosp-001"),
            ("create", "hosp-002"),
            ("create", "hosp-001"),
            ("update", "hosp-001"), // m0 again: unchanged
            ("update", "hosp-001"), // the A40 merge
        ]
    );
    app.stop().await;
}

#[derive(diesel::QueryableByName)]
struct AuditRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    subtype_code: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    agent_institution: String,
}

on_both_backends!(feed_registers_updates_and_merges);

/// Read one MLLP block (or EOF) within 5 s.
async fn read_block(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("no answer within 5 s")
            .unwrap_or(0);
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&byte[..n]);
        if buf.ends_with(&[0x1c, 0x0d]) {
            let body = &buf[1..buf.len() - 2];
            return Some(String::from_utf8(body.to_vec()).unwrap());
        }
    }
}

fn msa(ack: &str) -> Vec<String> {
    ack.split('\r')
        .find(|s| s.starts_with("MSA|"))
        .unwrap()
        .split('|')
        .map(String::from)
        .collect()
}

fn framed(payload: &[u8]) -> Vec<u8> {
    [&[0x0b][..], payload, &[0x1c, 0x0d]].concat()
}

/// The listener survives garbage, bad frames, oversized and non-UTF-8 messages, peers that
/// vanish mid-frame or go idle; every connection after them is served normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_survives_hostile_peers() {
    let app = app(Backend::Sqlite, |s| {
        s.mllp.max_message_bytes = 2048;
        s.mllp.idle_timeout_secs = 1;
    })
    .await;
    let addr = app.mllp.unwrap();
    let good = zhang("ok1").message();

    // Garbage before a block is skipped; the block is answered.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"\x00\xffGET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&framed(good.as_bytes())).await.unwrap();
    assert_eq!(msa(&read_block(&mut s).await.unwrap())[1], "AA");

    // Not HL7, not UTF-8, a bad trailer: AR each, and the connection goes on.
    s.write_all(&framed(b"hello world")).await.unwrap();
    let ack = read_block(&mut s).await.unwrap();
    assert_eq!(msa(&ack)[1], "AR", "{ack}");
    assert!(ack.contains("MSH segment"), "{ack}");
    s.write_all(&framed(b"MSH|^~\\&|HIS|hosp-001|\xff\xfe|"))
        .await
        .unwrap();
    let ack = read_block(&mut s).await.unwrap();
    assert_eq!(msa(&ack)[1], "AR");
    assert!(ack.contains("not UTF-8"), "{ack}");
    let mut bad = vec![0x0b];
    bad.extend_from_slice(zhang("bt").message().as_bytes());
    bad.extend_from_slice(&[0x1c, b'X']);
    s.write_all(&bad).await.unwrap();
    let ack = read_block(&mut s).await.unwrap();
    assert_eq!(msa(&ack)[1..3], ["AR".to_string(), "bt".to_string()]);
    assert!(ack.contains("malformed MLLP frame"), "{ack}");
    s.write_all(&framed(zhang("ok2").message().as_bytes()))
        .await
        .unwrap();
    assert_eq!(msa(&read_block(&mut s).await.unwrap())[1], "AA");

    // Unparseable MSH (no encoding characters).
    s.write_all(&framed(b"MSH|")).await.unwrap();
    assert_eq!(msa(&read_block(&mut s).await.unwrap())[1], "AR");

    // Oversized: AR naming the limit, with the control id of its MSH; the rest of the block is
    // skipped and the connection goes on.
    let mut big = zhang("big").message();
    big.push_str(&format!("\rNTE|1||{}", "x".repeat(4000)));
    s.write_all(&framed(big.as_bytes())).await.unwrap();
    let ack = read_block(&mut s).await.unwrap();
    assert_eq!(msa(&ack)[1..3], ["AR".to_string(), "big".to_string()]);
    assert!(ack.contains("2048 bytes"), "{ack}");
    s.write_all(&framed(zhang("ok3").message().as_bytes()))
        .await
        .unwrap();
    let ack = read_block(&mut s).await.unwrap();
    assert_eq!(msa(&ack)[1..3], ["AA".to_string(), "ok3".to_string()]);

    // A peer that disconnects mid-frame.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&good.as_bytes()[..20]).await.unwrap();
    s.write_all(b"").await.unwrap();
    drop(s);
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[&[0x0b][..], &good.as_bytes()[..30]].concat())
        .await
        .unwrap();
    drop(s);

    // Endless bytes outside any block: the connection is closed.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(&[b'z'; 5000]).await;
    assert!(read_block(&mut s).await.is_none());

    // An idle peer is dropped after idle_timeout_secs.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        read_block(&mut idle).await.is_none(),
        "idle connection closed"
    );

    // Still serving, to python-hl7 as well.
    let acks = send_async(addr, vec![zhang("after").message()]).await;
    assert_ack(&acks[0], "AA", "after");
    app.stop().await;
}
