//! Interop with independent Python implementations (tests/interop/*.py: PyPI `gmssl` for
//! SM2/SM3, `cryptography` for SM4-GCM, canonical encodings re-implemented from the docs)
//! and, for JWS, OpenSSL as a second signer. Install: `pip install -r tests/requirements.txt`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use chrono::Utc;
use common::{Scratch, interop_script, openssl, run, run_ok, s};
use serde_json::json;
use yiqiao_sm::{
    DEFAULT_SIGNER_ID, Envelope, EnvelopeError, RecipientKey, RequestBinding, SenderKeys, Sm2Jwk,
    Sm2PrivateKey, Sm2PublicKey, sign_jws, verify_jws,
};

const METHOD: &str = "POST";
const PATH: &str = "/fhir/DocumentReference/_search?patient=urn%3Aoid%3A2.16.156.10011.1.1%7Cx";
const REQUESTER: &str = "H330100";
const REQUEST_ID: &str = "2c5f0f5e-5a46-4d7e-8d9b-1f2e3d4c5b6a";

fn binding_args(request_id: &str) -> Vec<String> {
    [
        "--method",
        METHOD,
        "--path",
        PATH,
        "--requester-id",
        REQUESTER,
        "--request-id",
        request_id,
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect()
}

fn python(script: &str, args: &[String], stdin: Option<&[u8]>) -> std::process::Output {
    let mut full = vec![interop_script(script)];
    full.extend_from_slice(args);
    let refs: Vec<&str> = full.iter().map(String::as_str).collect();
    run("python3", &refs, stdin)
}

fn python_ok(script: &str, args: &[String], stdin: Option<&[u8]>) -> Vec<u8> {
    let out = python(script, args, stdin);
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

struct Parties {
    dir: Scratch,
    sender: Sm2PrivateKey,
    recipient: Sm2PrivateKey,
}

/// Sender key made by us, recipient key made by OpenSSL: both kinds of PEM in play.
fn parties(name: &str) -> Parties {
    let dir = Scratch::new(name);
    let sender = Sm2PrivateKey::generate().unwrap();
    dir.write("sender.pem", sender.to_pkcs8_pem().unwrap().as_bytes());
    dir.write("sender.pub.pem", sender.public_key().to_spki_pem().unwrap());
    openssl(&[
        "genpkey",
        "-algorithm",
        "SM2",
        "-out",
        s(&dir.path("recipient.pem")),
    ]);
    openssl(&[
        "pkey",
        "-in",
        s(&dir.path("recipient.pem")),
        "-pubout",
        "-out",
        s(&dir.path("recipient.pub.pem")),
    ]);
    let recipient =
        Sm2PrivateKey::from_pkcs8_pem(&String::from_utf8(dir.read("recipient.pem")).unwrap())
            .unwrap();
    Parties {
        dir,
        sender,
        recipient,
    }
}

fn payload() -> Vec<u8> {
    (0..16 * 1024u32).map(|i| (i * 7 + i / 256) as u8).collect()
}

fn p(dir: &Scratch, f: &str) -> String {
    s(&dir.path(f)).to_owned()
}

fn python_open(pt: &Parties, envelope_file: &str, request_id: &str) -> std::process::Output {
    let mut args = vec!["open".to_owned()];
    args.extend(binding_args(request_id));
    for (flag, file) in [
        ("--recipient-key", "recipient.pem"),
        ("--sender-pub", "sender.pub.pem"),
        ("--in", envelope_file),
        ("--out", "opened.bin"),
    ] {
        args.push(flag.into());
        args.push(p(&pt.dir, file));
    }
    python("envelope.py", &args, None)
}

#[test]
fn python_packages_are_installed() {
    run_ok(
        "python3",
        &[
            "-c",
            "import gmssl, cryptography; from cryptography.hazmat.primitives.ciphers import algorithms; algorithms.SM4",
        ],
        None,
    );
}

#[test]
fn our_envelope_opens_in_python_and_python_detects_tampering() {
    let pt = parties("env-ours");
    let sender = SenderKeys::new("12330100470116614F", &pt.sender).unwrap();
    let recipient = RecipientKey {
        key_id: "gw-enc-1".into(),
        public_key: pt.recipient.public_key(),
    };
    let binding = RequestBinding::new(METHOD, PATH, REQUESTER, REQUEST_ID).unwrap();
    let data = payload();
    let env = Envelope::seal(
        &data,
        "application/fhir+json",
        &sender,
        &recipient,
        &binding,
        Utc::now(),
    )
    .unwrap();
    pt.dir.write("env.json", env.to_json().unwrap());

    let out = python_open(&pt, "env.json", REQUEST_ID);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "application/fhir+json"
    );
    assert_eq!(pt.dir.read("opened.bin"), data);

    let wrong = python_open(&pt, "env.json", "another-request");
    assert_eq!(
        String::from_utf8_lossy(&wrong.stderr).trim(),
        "BindingMismatch"
    );

    let mut tampered = env.clone();
    tampered.content_type = "text/plain".into();
    pt.dir.write("tampered.json", tampered.to_json().unwrap());
    let bad = python_open(&pt, "tampered.json", REQUEST_ID);
    assert_eq!(String::from_utf8_lossy(&bad.stderr).trim(), "BadSignature");
}

#[test]
fn python_envelope_opens_in_ours() {
    let pt = parties("env-theirs");
    let data = payload();
    pt.dir.write("payload.bin", &data);
    let mut args = vec!["seal".to_owned()];
    args.extend(binding_args(REQUEST_ID));
    for (flag, value) in [
        ("--recipient-pub", p(&pt.dir, "recipient.pub.pem")),
        ("--recipient-key-id", "gw-enc-1".into()),
        ("--sender-key", p(&pt.dir, "sender.pem")),
        ("--sender-id", "12330100470116614F".into()),
        ("--content-type", "application/fhir+json".into()),
        ("--in", p(&pt.dir, "payload.bin")),
    ] {
        args.push(flag.into());
        args.push(value);
    }
    let json = python_ok("envelope.py", &args, None);
    let env = Envelope::from_json(&json).unwrap();
    let binding = RequestBinding::new(METHOD, PATH, REQUESTER, REQUEST_ID).unwrap();
    let skew = Duration::from_secs(300);
    let sender_pub = pt.sender.public_key();
    let (opened, cty) = env
        .open(&pt.recipient, &sender_pub, &binding, Utc::now(), skew)
        .unwrap();
    assert_eq!(opened, data);
    assert_eq!(cty, "application/fhir+json");
    assert_eq!(env.recipient_key_id, "gw-enc-1");

    let other = RequestBinding::new(METHOD, PATH, REQUESTER, "replayed").unwrap();
    assert_eq!(
        env.open(&pt.recipient, &sender_pub, &other, Utc::now(), skew),
        Err(EnvelopeError::BindingMismatch)
    );
    let mut tampered = env.clone();
    tampered.sender_id = "12330100470116614G".into();
    assert_eq!(
        tampered.open(&pt.recipient, &sender_pub, &binding, Utc::now(), skew),
        Err(EnvelopeError::BadSignature)
    );
    let later = Utc::now() + chrono::Duration::seconds(3600);
    assert!(matches!(
        env.open(&pt.recipient, &sender_pub, &binding, later, skew),
        Err(EnvelopeError::Expired { .. })
    ));
}

fn client_key(dir: &Scratch) -> Sm2PublicKey {
    openssl(&[
        "genpkey",
        "-algorithm",
        "SM2",
        "-out",
        s(&dir.path("client.pem")),
    ]);
    Sm2PrivateKey::from_pkcs8_pem(&String::from_utf8(dir.read("client.pem")).unwrap())
        .unwrap()
        .public_key()
}

#[test]
fn client_assertions_from_gmssl_and_openssl_verify_in_ours() {
    let dir = Scratch::new("jws-theirs");
    let public = client_key(&dir);
    // The JWKS route: the key travels as a JWK and comes back intact.
    let jwk: Sm2Jwk = serde_json::from_str(
        &serde_json::to_string(&Sm2Jwk::from_public_key(&public, Some("client-1"))).unwrap(),
    )
    .unwrap();
    let public = jwk.to_public_key().unwrap();
    for signer in ["gmssl", "openssl"] {
        let args: Vec<String> = [
            "sign",
            "--key",
            &p(&dir, "client.pem"),
            "--iss",
            "H330100",
            "--aud",
            "https://gateway.example/token",
            "--kid",
            "client-1",
            "--signer",
            signer,
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        let token = String::from_utf8(python_ok("jws_assertion.py", &args, None)).unwrap();
        let (header, claims) = verify_jws(token.trim(), &public, DEFAULT_SIGNER_ID)
            .unwrap_or_else(|e| panic!("{signer} token rejected: {e}"));
        assert_eq!(header["alg"], "SM2SM3");
        assert_eq!(header["kid"], "client-1");
        assert_eq!(claims["iss"], "H330100");
        assert_eq!(claims["aud"], "https://gateway.example/token");
        assert!(
            verify_jws(token.trim(), &public, "").is_err(),
            "{signer}: signer ID matters"
        );
    }
}

#[test]
fn our_client_assertion_verifies_in_python() {
    let dir = Scratch::new("jws-ours");
    let key = Sm2PrivateKey::generate().unwrap();
    dir.write("client.pub.pem", key.public_key().to_spki_pem().unwrap());
    let claims = json!({"iss": "H330100", "sub": "H330100", "aud": "https://gateway.example/token",
                        "exp": 4_102_444_800u64, "jti": "j-1"});
    let token = sign_jws(
        &json!({"typ": "JWT"}),
        &claims,
        &key.signing_key(DEFAULT_SIGNER_ID).unwrap(),
    )
    .unwrap();
    let args = vec![
        "verify".to_owned(),
        "--pub".into(),
        p(&dir, "client.pub.pem"),
    ];
    let out = python_ok("jws_assertion.py", &args, Some(token.as_bytes()));
    let got: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(got, claims);

    let mut forged = token.clone();
    forged.replace_range(forged.len() - 3.., "AAA");
    let out = python("jws_assertion.py", &args, Some(forged.as_bytes()));
    assert!(!out.status.success());
}
