//! The HL7 v2 MLLP feed: real messages from an independent peer (python-hl7's MLLPClient,
//! tests/interop/mllp_client.py) on both backends, and hostile peers on raw sockets.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use yiqiao_gateway::config::MllpPeer;
use yiqiao_registry::empi::ident::check_character;
use yiqiao_registry::empi::store as empi;

use crate::auth::tls_material;
use crate::helpers::{ADMIN_TOKEN, Backend, TempDir, TestApp, institution};
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

/// `mllp.allow` entries: (address or network, institution).
pub(crate) fn allow(entries: &[(&str, &str)]) -> Vec<MllpPeer> {
    entries
        .iter()
        .map(|(address, institution)| MllpPeer {
            address: address.to_string(),
            institution: institution.to_string(),
        })
        .collect()
}

/// A gateway with the plain MLLP listener and hosp-001, hosp-002 in the directory. The test
/// peers connect from 127.0.0.1, allowed to send for both (an interface engine serving two
/// hospitals) and for nowhere-99, which is not in the directory; `adjust` may change that.
async fn app(backend: Backend, adjust: impl FnOnce(&mut yiqiao_gateway::Settings)) -> TestApp {
    let app = TestApp::spawn_with(backend, |s| {
        s.mllp.enabled = true;
        s.mllp.listen = "127.0.0.1:0".parse().unwrap();
        s.mllp.allow = allow(&[
            ("127.0.0.1", "hosp-001"),
            ("127.0.0.0/30", "hosp-002"),
            ("127.0.0.1/32", "nowhere-99"),
        ]);
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

/// How the Python peer connects: from which local address, and with TLS (CA, then the client
/// certificate and key, PEM files).
#[derive(Clone, Debug, Default)]
struct Via {
    source: Option<&'static str>,
    tls: Vec<String>,
}

fn from(source: &'static str) -> Via {
    Via {
        source: Some(source),
        tls: Vec::new(),
    }
}

/// Send messages with python-hl7 over one connection; one parsed ACK per message, and a last
/// `{"closed": why}` when the server closed the connection first.
async fn send_via(addr: SocketAddr, via: Via, messages: Vec<String>) -> Vec<Value> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/interop/mllp_client.py"
    );
    let mut cmd = wait::command("python3");
    cmd.arg(script)
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string());
    if let Some(source) = via.source {
        cmd.args(["--source", source]);
    }
    if !via.tls.is_empty() {
        cmd.arg("--tls").args(&via.tls);
    }
    let mut child = wait::spawn(
        cmd.stdin(Stdio::piped())
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

/// Send messages from the default address without TLS.
pub(crate) async fn send_async(addr: SocketAddr, messages: Vec<String>) -> Vec<Value> {
    send_via(addr, Via::default(), messages).await
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

    // Every accepted registration and merge is audited, attributed to the hospital (refused
    // changes are recorded too, with a failure outcome: not counted here).
    let store = app.state.store.clone();
    let rows: Vec<AuditRow> = tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        diesel::RunQueryDsl::load(
            diesel::sql_query(
                "SELECT subtype_code, agent_institution FROM audit_events \
                 WHERE agent_user LIKE 'mllp:%' AND outcome = '0' ORDER BY seq",
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

on_both_backends!(
    feed_registers_updates_and_merges,
    msh4_must_be_the_authenticated_institution
);

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

#[derive(diesel::QueryableByName, Debug)]
struct FeedRecord {
    #[diesel(sql_type = diesel::sql_types::Text)]
    type_code: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    agent_institution: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    agent_user: Option<String>,
    /// The stored AuditEvent JSON (outcomeDesc, agent network address).
    #[diesel(sql_type = diesel::sql_types::Text)]
    resource: String,
}

/// Failure records (outcome 4) of the MLLP feed.
async fn refusal_records(app: &TestApp) -> Vec<FeedRecord> {
    let store = app.state.store.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        diesel::RunQueryDsl::load(
            diesel::sql_query(
                "SELECT type_code, agent_institution, agent_user, resource FROM audit_events \
                 WHERE agent_user LIKE 'mllp:%' AND outcome = '4' ORDER BY seq",
            ),
            &mut *conn,
        )
        .unwrap()
    })
    .await
    .unwrap()
}

/// The failure record whose AuditEvent contains `needle` (refusals are recorded in the
/// background: waits up to 5 s).
async fn refusal_record(app: &TestApp, needle: &str) -> FeedRecord {
    for _ in 0..50 {
        if let Some(r) = refusal_records(app)
            .await
            .into_iter()
            .find(|r| r.resource.contains(needle))
        {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "no failure record with {needle:?}: {:?}",
        refusal_records(app).await
    );
}

/// A raw connection from a chosen loopback address.
async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    socket.connect(addr).await.unwrap()
}

fn closed(acks: &[Value]) -> bool {
    acks.len() == 1 && acks[0].get("closed").is_some()
}

/// Peers are authenticated by address on plain TCP: an address not on `mllp.allow` is
/// closed before anything is read, nothing it sent is stored, and the refusal is audited.
/// Without an allow-list nobody is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_peers_are_refused() {
    let app = app(Backend::Sqlite, |_| {}).await;
    let addr = app.mllp.unwrap();
    let acks = send_via(addr, from("127.0.0.9"), vec![zhang("u1").message()]).await;
    assert!(closed(&acks), "{acks:?}");
    assert!(record(&app, 1, "MRN001").await.is_none());
    let refused = refusal_record(&app, "127.0.0.9 is not on mllp.allow").await;
    assert_eq!(refused.type_code, "110114");
    assert_eq!(refused.agent_institution, None);
    assert!(
        refused
            .agent_user
            .as_deref()
            .unwrap()
            .starts_with("mllp:127.0.0.9:"),
        "{refused:?}"
    );
    assert!(refused.resource.contains("\"127.0.0.9\""), "{refused:?}");
    // A raw socket from that address is closed without an answer.
    let mut s = connect_from("127.0.0.9", addr).await;
    let _ = s.write_all(&framed(zhang("u2").message().as_bytes())).await;
    assert!(read_block(&mut s).await.is_none());
    // An allowed address is served.
    let acks = send_via(addr, from("127.0.0.1"), vec![zhang("a1").message()]).await;
    assert_ack(&acks[0], "AA", "a1");
    app.stop().await;

    // The default: no allow-list, nobody on plain TCP.
    let app = app_with_defaults().await;
    let addr = app.mllp.unwrap();
    let acks = send_async(addr, vec![zhang("d1").message()]).await;
    assert!(closed(&acks), "{acks:?}");
    assert!(record(&app, 1, "MRN001").await.is_none());
    refusal_record(&app, "127.0.0.1 is not on mllp.allow").await;
    app.stop().await;
}

async fn app_with_defaults() -> TestApp {
    let app = app(Backend::Sqlite, |s| {
        s.mllp.allow = yiqiao_gateway::config::MllpSettings::default().allow;
    })
    .await;
    assert!(app.state.settings.mllp.allow.is_empty());
    app
}

/// MSH-4 must name an institution the connection is authenticated for: 127.0.0.2 sends for
/// hosp-002 only, so its A08 renaming a patient of hosp-001 and its A40 merging two of them
/// are refused (AR at MSH-4, audited, nothing changed) while its own messages are accepted.
async fn msh4_must_be_the_authenticated_institution(backend: Backend) {
    let app = app(backend, |_| {}).await;
    let addr = app.mllp.unwrap();
    let mut second = zhang("s1");
    second.control = "s2";
    second.pid3 = "MRN002^^^^MR".into();
    second.name = "李^娜";
    let acks = send_async(addr, vec![zhang("s1").message(), second.message()]).await;
    assert_ack(&acks[0], "AA", "s1");
    assert_ack(&acks[1], "AA", "s2");
    let before = record(&app, 1, "MRN001").await.unwrap();

    let mut rename = zhang("x1");
    rename.event = "A08";
    rename.name = "冒^名";
    let merge = Adt {
        event: "A40",
        control: "x2",
        pid3: "MRN001^^^hosp-001^MR".into(),
        mrg: Some("MRN002^^^hosp-001^MR".into()),
        ..zhang("x2")
    };
    let mut own = zhang("x3");
    own.facility = "hosp-002";
    own.pid3 = "B-1^^^^PI".into();
    let acks = send_via(
        addr,
        from("127.0.0.2"),
        vec![rename.message(), merge.message(), own.message()],
    )
    .await;
    for (ack, control) in acks.iter().zip(["x1", "x2"]) {
        assert_nak(ack, "AR", "MSH^1^4", "207");
        assert_eq!(ack["control_id"], control);
        let text = ack["text"].as_str().unwrap();
        assert!(
            text.contains("hosp-001") && text.contains("hosp-002"),
            "{text}"
        );
    }
    assert_ack(&acks[2], "AA", "x3");

    // Nothing changed: same version and name, still two persons.
    let after = record(&app, 1, "MRN001").await.unwrap();
    assert_eq!(after.version, before.version);
    assert_eq!(after.record.name, "张伟");
    let other = record(&app, 1, "MRN002").await.unwrap();
    assert_ne!(person(&other), person(&after));
    assert!(record(&app, 2, "B-1").await.is_some());

    // Each refusal is in the audit trail, attributed to the institution actually sending.
    let records = refusal_records(&app).await;
    assert_eq!(records.len(), 2, "{records:?}");
    for (r, needle) in records.iter().zip(["ADT^A08 x1", "ADT^A40 x2"]) {
        assert_eq!(r.type_code, "rest");
        assert_eq!(r.agent_institution.as_deref(), Some("hosp-002"));
        assert!(r.resource.contains(needle), "{r:?}");
        assert!(r.resource.contains("MSH-4 hosp-001 is not"), "{r:?}");
        assert!(r.resource.contains("\"127.0.0.2\""), "{r:?}");
    }
    app.stop().await;
}

/// Messages over a structure limit are refused before they are parsed, naming the limit:
/// the 500,000 empty PID fields of a 1 MiB frame (which cost the parser over 400 MB) are
/// answered AR at once, and so are too many repetitions, components, segments and values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_structure_limits_are_refused() {
    let app = app(Backend::Sqlite, |_| {}).await;
    let addr = app.mllp.unwrap();
    let msh = "MSH|^~\\&|HIS|hosp-001|YIQIAO|YIQIAO|20261129120000||ADT^A08^ADT_A01";
    let wide = format!("{msh}|w1|P|2.5\rPID{}", "|".repeat(500_000));
    assert!(wide.len() < 1024 * 1024);
    let mut repeated = zhang("w2");
    repeated.pid3 = vec!["MRN001^^^^MR"; 101].join("~");
    let long_name = "张^".repeat(64);
    let mut components = zhang("w3");
    components.name = &long_name;
    let segments = format!("{}\r{}", zhang("w4").message(), "NTE|1|x\r".repeat(500));
    let values = format!(
        "{}\r{}",
        zhang("w5").message(),
        format!("NTE|1|{}\r", "a^b~".repeat(40)).repeat(130)
    );
    let started = std::time::Instant::now();
    let acks = send_async(
        addr,
        vec![
            wide,
            repeated.message(),
            components.message(),
            segments,
            values,
            zhang("ok").message(),
        ],
    )
    .await;
    let elapsed = started.elapsed();
    for (ack, (control, location, limit)) in acks.iter().zip([
        ("w1", "PID^1", "mllp.max_fields_per_segment"),
        ("w2", "PID^1^3", "mllp.max_repetitions_per_field"),
        ("w3", "PID^1^5", "mllp.max_components"),
        ("w4", "", "mllp.max_segments"),
        ("w5", "NTE^*^2", "mllp.max_values"),
    ]) {
        assert_eq!(ack["code"], "AR", "{ack}");
        assert_eq!(ack["control_id"], control, "{ack}");
        let at = ack["err_location"].as_str().unwrap();
        match location.split_once('*') {
            // Some NTE past the first 100 (each holds 83 values).
            Some((head, tail)) => assert!(
                at.starts_with(head) && at.ends_with(tail) && at.len() == location.len() + 2,
                "{ack}"
            ),
            None => assert_eq!(at, location, "{ack}"),
        }
        assert!(ack["text"].as_str().unwrap().contains(limit), "{ack}");
    }
    // The connection goes on.
    assert_ack(&acks[5], "AA", "ok");
    assert_eq!(record(&app, 1, "MRN001").await.unwrap().version, 1);
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    app.stop().await;
}

/// One address holds at most `max_connections_per_peer` connections (more are closed at once
/// and audited) and idle ones are closed after `idle_timeout_secs`: 100 idle sockets from one
/// peer do not delay another peer's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_of_one_peer_cannot_delay_another() {
    let app = app(Backend::Sqlite, |s| {
        s.mllp.idle_timeout_secs = 5;
        s.mllp.max_connections_per_peer = 4;
    })
    .await;
    let addr = app.mllp.unwrap();
    // 127.0.0.2 is allowed (for hosp-002) but opens 100 connections and sends nothing.
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(connect_from("127.0.0.2", addr).await);
    }
    let opened = std::time::Instant::now();
    let acks = send_async(addr, vec![zhang("prompt").message()]).await;
    let waited = opened.elapsed();
    assert_ack(&acks[0], "AA", "prompt");
    assert!(waited < Duration::from_secs(2), "answered after {waited:?}");

    // All but 4 of the idle sockets were closed at once; those 4 after the idle timeout.
    let mut byte = [0u8; 1];
    let mut open = Vec::new();
    for mut s in idle {
        match tokio::time::timeout(Duration::from_millis(50), s.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(_)) => panic!("an idle socket got data"),
            Err(_) => open.push(s),
        }
    }
    assert_eq!(open.len(), 4);
    refusal_record(&app, "127.0.0.2 already has 4 connections open").await;
    for mut s in open {
        let n = tokio::time::timeout(Duration::from_secs(6), s.read(&mut byte))
            .await
            .expect("an idle connection outlived idle_timeout_secs");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
    assert!(opened.elapsed() >= Duration::from_secs(4));
    app.stop().await;
}

/// MLLP over TLS: the client certificate authenticates the institution it is bound to (the
/// same bindings as the mTLS HTTP listener); a certificate bound to no institution, or none,
/// is refused and audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_certificates_authenticate_institutions() {
    let dir = TempDir::new();
    let clients = tls_material(&dir.path);
    let file = |name: &str, pem: &str| {
        let path = dir.path.join(name);
        std::fs::write(&path, pem).unwrap();
        path.display().to_string()
    };
    let own = vec![
        dir.path.join("ca.pem").display().to_string(),
        file("client0.pem", &clients[0].0),
        file("client0.key", &clients[0].1),
    ];
    let unbound = vec![
        own[0].clone(),
        file("client1.pem", &clients[1].0),
        file("client1.key", &clients[1].1),
    ];
    let app = app(Backend::Sqlite, |s| {
        s.mllp.listen = String::new();
        s.mllp.tls_listen = "127.0.0.1:0".into();
        s.mtls.cert_file = dir.path.join("server.pem").display().to_string();
        s.mtls.key_file = dir.path.join("server.key").display().to_string();
        s.mtls.client_ca_file = own[0].clone();
    })
    .await;
    assert_eq!(app.mllp, None, "no plain listener");
    let addr = app.mllp_tls.unwrap();
    let resp = app
        .admin_put(
            "/admin/institutions/hosp-001/client-certificate",
            &json!({"sha256": clients[0].2}),
        )
        .await;
    assert_eq!(resp.status(), 200);

    let mut other = zhang("t2");
    other.facility = "hosp-002";
    let via = |tls: &Vec<String>| Via {
        source: None,
        tls: tls.clone(),
    };
    let acks = send_via(
        addr,
        via(&own),
        vec![zhang("t1").message(), other.message()],
    )
    .await;
    assert_ack(&acks[0], "AA", "t1");
    assert_nak(&acks[1], "AR", "MSH^1^4", "207");
    assert!(record(&app, 1, "MRN001").await.is_some());
    let r = refusal_record(&app, "ADT^A01 t2").await;
    assert_eq!(r.agent_institution.as_deref(), Some("hosp-001"));
    assert!(r.resource.contains(&clients[0].2), "{r:?}");

    // A certificate of the same CA bound to no institution; no certificate at all.
    let mut third = zhang("t3");
    third.pid3 = "MRN003^^^^MR".into();
    let acks = send_via(addr, via(&unbound), vec![third.message()]).await;
    assert!(closed(&acks), "{acks:?}");
    let refused = refusal_record(&app, "is bound to no institution").await;
    assert!(refused.resource.contains(&clients[1].2), "{refused:?}");
    let acks = send_via(addr, via(&own[..1].to_vec()), vec![third.message()]).await;
    assert!(closed(&acks), "{acks:?}");
    refusal_record(&app, "TLS handshake failed").await;
    assert!(record(&app, 1, "MRN003").await.is_none());
    app.stop().await;
}
