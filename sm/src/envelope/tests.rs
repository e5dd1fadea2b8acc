//! Envelope round trip and tamper tests: every field, one error each.

use super::*;
use chrono::TimeZone;

const SKEW: Duration = Duration::from_secs(300);

struct Fixture {
    sender_key: Sm2PrivateKey,
    sender: SenderKeys,
    recipient_key: Sm2PrivateKey,
    recipient: RecipientKey,
    binding: RequestBinding,
    now: DateTime<Utc>,
}

fn fixture() -> Fixture {
    let sender_key = Sm2PrivateKey::generate().unwrap();
    let recipient_key = Sm2PrivateKey::generate().unwrap();
    Fixture {
        sender: SenderKeys::new("12330100470116614F", &sender_key).unwrap(),
        recipient: RecipientKey {
            key_id: "gw-enc-2026-1".into(),
            public_key: recipient_key.public_key(),
        },
        sender_key,
        recipient_key,
        binding: RequestBinding::new(
            "get",
            "/fhir/Patient?identifier=urn:oid:2.16.156.10011.1.1|x",
            "H330100",
            "7f1c1a7e-0b55-4a4e-9d1f-3c2a1e0f9b10",
        )
        .unwrap(),
        now: Utc.with_ymd_and_hms(2026, 11, 29, 14, 3, 28).unwrap(),
    }
}

impl Fixture {
    fn seal(&self, payload: &[u8]) -> Envelope {
        Envelope::seal(
            payload,
            "application/fhir+json",
            &self.sender,
            &self.recipient,
            &self.binding,
            self.now,
        )
        .unwrap()
    }

    fn open(&self, env: &Envelope) -> Result<(Vec<u8>, String), EnvelopeError> {
        env.open(
            &self.recipient_key,
            &self.sender_key.public_key(),
            &self.binding,
            self.now,
            SKEW,
        )
    }

    /// Signs a modified envelope again, as a sender whose key is trusted would.
    fn resign(&self, env: &mut Envelope) {
        let d = env.decode().unwrap();
        let header = env.canonical_header(&d.wrapped_key, &d.nonce);
        env.sign(&self.sender, &header, &d.ciphertext).unwrap();
    }
}

fn flip_b64(text: &str, index: usize) -> String {
    let mut bytes = b64_decode(text, usize::MAX / 8).unwrap();
    bytes[index] ^= 0x01;
    b64_encode(&bytes)
}

fn flip_char(text: &str) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    let last = chars.len() - 1;
    chars[last] = if chars[last] == '0' { '1' } else { '0' };
    chars.into_iter().collect()
}

#[test]
fn round_trip_and_json() {
    let f = fixture();
    let env = f.seal(b"{\"resourceType\":\"Patient\"}");
    let json = env.to_json().unwrap();
    let parsed = Envelope::from_json(json.as_bytes()).unwrap();
    assert_eq!(parsed, env);
    assert_eq!(parsed.timestamp, "2026-11-29T14:03:28Z");
    let (payload, cty) = f.open(&parsed).unwrap();
    assert_eq!(payload, b"{\"resourceType\":\"Patient\"}");
    assert_eq!(cty, "application/fhir+json");
    // empty payload is allowed
    assert_eq!(f.open(&f.seal(b"")).unwrap().0, b"");
}

#[test]
fn binding_canonical_form_is_pinned() {
    let b = RequestBinding::new("post", "/a?b=c", "R1", "N1").unwrap();
    let mut expect = Vec::new();
    for part in [
        &b"yiqiao-sm-binding-v1"[..],
        b"POST",
        b"/a?b=c",
        b"R1",
        b"N1",
    ] {
        expect.extend_from_slice(&(part.len() as u32).to_be_bytes());
        expect.extend_from_slice(part);
    }
    assert_eq!(b.canonical_bytes(), expect);
    assert_eq!(b.digest_hex(), crate::sm3_hex(&expect));
}

#[test]
fn every_signed_field_tampered_without_resigning_is_bad_signature() {
    let f = fixture();
    let env = f.seal(b"payload bytes");
    type Tamper = fn(&mut Envelope);
    let cases: &[(&str, Tamper)] = &[
        ("sender_id", |e| e.sender_id = flip_char(&e.sender_id)),
        ("recipient_key_id", |e| {
            e.recipient_key_id = flip_char(&e.recipient_key_id)
        }),
        ("timestamp", |e| e.timestamp = "2026-11-29T14:03:29Z".into()),
        ("request_binding", |e| {
            e.request_binding = flip_char(&e.request_binding)
        }),
        ("content_type", |e| {
            e.content_type = "application/fhir+xml".into()
        }),
        ("wrapped_key", |e| {
            e.wrapped_key = flip_b64(&e.wrapped_key, 40)
        }),
        ("nonce", |e| e.nonce = flip_b64(&e.nonce, 0)),
        ("ciphertext", |e| e.ciphertext = flip_b64(&e.ciphertext, 2)),
        ("tag", |e| {
            let n = b64_decode(&e.ciphertext, 1 << 20).unwrap().len();
            e.ciphertext = flip_b64(&e.ciphertext, n - 1)
        }),
        ("signature", |e| {
            let n = b64_decode(&e.signature, 100).unwrap().len();
            e.signature = flip_b64(&e.signature, n - 1)
        }),
    ];
    for (name, tamper) in cases {
        let mut e = env.clone();
        tamper(&mut e);
        assert_ne!(e, env, "{name} unchanged");
        assert_eq!(f.open(&e), Err(EnvelopeError::BadSignature), "{name}");
    }
}

#[test]
fn unsupported_and_malformed_fields_are_named() {
    let f = fixture();
    let env = f.seal(b"x");
    type Tamper = fn(&mut Envelope);
    let cases: &[(Tamper, EnvelopeError)] = &[
        (
            |e| e.version = 2,
            EnvelopeError::Unsupported { field: "version" },
        ),
        (
            |e| e.enc_alg = "SM4-CBC".into(),
            EnvelopeError::Unsupported { field: "enc_alg" },
        ),
        (
            |e| e.key_wrap_alg = "SM2-C1C3C2".into(),
            EnvelopeError::Unsupported {
                field: "key_wrap_alg",
            },
        ),
        (
            |e| e.sig_alg = "SM2".into(),
            EnvelopeError::Unsupported { field: "sig_alg" },
        ),
        (|e| e.sender_id.clear(), malformed("sender_id", "empty")),
        (
            |e| e.timestamp = "2026-11-29T14:03:28+00:00".into(),
            malformed("timestamp", "not RFC 3339 UTC YYYY-MM-DDTHH:MM:SSZ"),
        ),
        (
            |e| e.request_binding = e.request_binding.to_uppercase(),
            malformed("request_binding", "not 64 lower-case hex digits"),
        ),
        (
            |e| e.content_type = "text/plain\u{7f}".into(),
            malformed("content_type", "contains control characters"),
        ),
        (
            |e| e.nonce = b64_encode(&[0u8; 11]),
            malformed("nonce", "not 12 bytes"),
        ),
        (
            |e| e.nonce = "AAAAAAAAAAAAAAAA ".into(),
            EnvelopeError::TooLarge {
                field: "nonce",
                limit: 12,
            },
        ),
        (
            |e| e.wrapped_key.push('!'),
            malformed("wrapped_key", "not strict padded base64"),
        ),
        (
            |e| e.wrapped_key = b64_encode(&[0u8; 300]),
            EnvelopeError::TooLarge {
                field: "wrapped_key",
                limit: 256,
            },
        ),
        (
            |e| e.ciphertext = b64_encode(&[0u8; 15]),
            malformed("ciphertext", "shorter than the 16-byte tag"),
        ),
        (
            |e| e.signature = b64_encode(&[0x30, 0x00]),
            malformed("signature", "not a DER SM2 signature"),
        ),
    ];
    for (tamper, expected) in cases {
        let mut e = env.clone();
        tamper(&mut e);
        assert_eq!(f.open(&e).as_ref(), Err(expected));
    }
}

#[test]
fn resigned_tampering_reaches_the_specific_check() {
    let f = fixture();
    let env = f.seal(b"payload bytes");

    let mut e = env.clone();
    e.ciphertext = flip_b64(&e.ciphertext, 0);
    f.resign(&mut e);
    assert_eq!(f.open(&e), Err(EnvelopeError::TagMismatch));

    let mut e = env.clone();
    e.nonce = flip_b64(&e.nonce, 5);
    f.resign(&mut e);
    assert_eq!(f.open(&e), Err(EnvelopeError::TagMismatch));

    let mut e = env.clone();
    e.content_type = "text/plain".into();
    f.resign(&mut e);
    assert_eq!(
        f.open(&e),
        Err(EnvelopeError::TagMismatch),
        "AAD covers header"
    );

    let mut e = env.clone();
    e.wrapped_key = flip_b64(&e.wrapped_key, 40);
    f.resign(&mut e);
    assert_eq!(f.open(&e), Err(EnvelopeError::KeyUnwrap));

    let mut e = env.clone();
    e.request_binding = flip_char(&e.request_binding);
    f.resign(&mut e);
    assert_eq!(f.open(&e), Err(EnvelopeError::BindingMismatch));
}

#[test]
fn wrong_keys_binding_and_clock() {
    let f = fixture();
    let env = f.seal(b"payload");
    let other = Sm2PrivateKey::generate().unwrap();
    let pk = f.sender_key.public_key();

    assert_eq!(
        env.open(
            &f.recipient_key,
            &other.public_key(),
            &f.binding,
            f.now,
            SKEW
        ),
        Err(EnvelopeError::BadSignature)
    );
    assert_eq!(
        env.open(&other, &pk, &f.binding, f.now, SKEW),
        Err(EnvelopeError::KeyUnwrap)
    );
    let replayed = RequestBinding::new("GET", "/fhir/Patient", "H330100", "another").unwrap();
    assert_eq!(
        env.open(&f.recipient_key, &pk, &replayed, f.now, SKEW),
        Err(EnvelopeError::BindingMismatch)
    );
    let later = f.now + chrono::Duration::seconds(301);
    assert_eq!(
        env.open(&f.recipient_key, &pk, &f.binding, later, SKEW),
        Err(EnvelopeError::Expired { age_seconds: 301 })
    );
    let earlier = f.now - chrono::Duration::seconds(400);
    assert_eq!(
        env.open(&f.recipient_key, &pk, &f.binding, earlier, SKEW),
        Err(EnvelopeError::ClockSkew { ahead_seconds: 400 })
    );
    let edge = f.now + chrono::Duration::seconds(300);
    assert!(
        env.open(&f.recipient_key, &pk, &f.binding, edge, SKEW)
            .is_ok()
    );
}

#[test]
fn sizes_are_bounded_before_decoding() {
    let f = fixture();
    let huge = vec![b' '; MAX_ENVELOPE_BYTES + 1];
    assert_eq!(
        Envelope::from_json(&huge),
        Err(EnvelopeError::TooLarge {
            field: "envelope",
            limit: MAX_ENVELOPE_BYTES
        })
    );
    assert!(matches!(
        Envelope::from_json(b"{\"version\":1}"),
        Err(EnvelopeError::Malformed { field: "json", .. })
    ));
    let mut json: serde_json::Value =
        serde_json::from_str(&f.seal(b"x").to_json().unwrap()).unwrap();
    json["extra"] = "field".into();
    assert!(Envelope::from_json(json.to_string().as_bytes()).is_err());

    let mut e = f.seal(b"x");
    e.sender_id = "x".repeat(MAX_ID_BYTES + 1);
    assert_eq!(
        f.open(&e),
        Err(EnvelopeError::TooLarge {
            field: "sender_id",
            limit: MAX_ID_BYTES
        })
    );
    let too_big = vec![0u8; MAX_PAYLOAD_BYTES + 1];
    assert!(matches!(
        Envelope::seal(&too_big, "a/b", &f.sender, &f.recipient, &f.binding, f.now),
        Err(EnvelopeError::TooLarge {
            field: "payload",
            ..
        })
    ));
}

#[test]
fn verify_and_decrypt_apart_agree_with_open() {
    let f = fixture();
    let env = f.seal(b"{\"resourceType\":\"Bundle\"}");
    let sender = f.sender_key.public_key();
    env.verify(&sender, &f.binding, f.now, SKEW).unwrap();
    assert_eq!(
        env.decrypt(&f.recipient_key).unwrap(),
        f.open(&env).unwrap()
    );

    // Signed by someone else: decryption alone still works (it proves nothing about the
    // sender), verification refuses, and so does open.
    let mut forged = env.clone();
    let other = SenderKeys::new("12330100470116614F", &Sm2PrivateKey::generate().unwrap()).unwrap();
    let decoded = forged.decode().unwrap();
    let aad = forged.canonical_header(&decoded.wrapped_key, &decoded.nonce);
    forged.sign(&other, &aad, &decoded.ciphertext).unwrap();
    assert!(forged.decrypt(&f.recipient_key).is_ok());
    assert!(matches!(
        forged.verify(&sender, &f.binding, f.now, SKEW),
        Err(EnvelopeError::BadSignature)
    ));
    assert!(matches!(f.open(&forged), Err(EnvelopeError::BadSignature)));

    // A ciphertext changed (and re-signed by the true sender): verification passes, the
    // decryption refuses at the GCM tag.
    let mut changed = env.clone();
    changed.ciphertext = flip_b64(&changed.ciphertext, 3);
    f.resign(&mut changed);
    changed.verify(&sender, &f.binding, f.now, SKEW).unwrap();
    assert!(matches!(
        changed.decrypt(&f.recipient_key),
        Err(EnvelopeError::TagMismatch)
    ));
}
