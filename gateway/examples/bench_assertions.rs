//! Benchmark helper (gateway/benches/auth/run.sh): keys for institution `hosp-bench` and N
//! client assertions per algorithm, signed here (Python's pure SM2 would take minutes).
//!
//!     bench_assertions OUTDIR AUD N
//!
//! Writes OUTDIR/institution.json (registration body with an ES256 JWK, kid `bench-es256`,
//! and an SM2 key, kid `bench-sm2`), OUTDIR/es256.txt and OUTDIR/sm2.txt (one token-request
//! form body per line, each with a fresh jti).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};
use std::io::Write;

fn form(assertion: &str) -> String {
    serde_urlencoded::to_string([
        ("grant_type", "client_credentials"),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", assertion),
        ("scope", "system/Patient.rs"),
        ("purpose_of_use", "TREAT"),
    ])
    .unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (out, aud, n) = (&args[1], &args[2], args[3].parse::<usize>().unwrap());
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let es =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let point = es.public_key().as_ref();
    let sm2 = yiqiao_sm::Sm2PrivateKey::generate().unwrap();
    let sm2_signer = sm2.signing_key(yiqiao_sm::DEFAULT_SIGNER_ID).unwrap();
    let body = json!({
        "id": "hosp-bench", "name": "Bench Hospital", "uscc": "91350100M000009998",
        "region_code": "350100", "level": "3A", "kind": "hospital",
        "patient_id_system": "urn:oid:2.16.156.10011.1.99.999",
        "allowed_scopes": ["system/Patient.rs"],
        "jwks": {"keys": [{"kty": "EC", "crv": "P-256", "kid": "bench-es256",
                           "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65])}]},
        "sm2_keys": [{"kid": "bench-sm2", "pem": sm2.public_key().to_spki_pem().unwrap()}],
    });
    std::fs::write(format!("{out}/institution.json"), body.to_string()).unwrap();
    let now = chrono::Utc::now().timestamp();
    let claims = || -> Value {
        json!({"iss": "hosp-bench", "sub": "hosp-bench", "aud": aud, "iat": now,
               "exp": now + 290, "jti": uuid::Uuid::new_v4().to_string()})
    };
    let mut es_file =
        std::io::BufWriter::new(std::fs::File::create(format!("{out}/es256.txt")).unwrap());
    let header =
        B64.encode(json!({"alg": "ES256", "kid": "bench-es256", "typ": "JWT"}).to_string());
    for _ in 0..n {
        let input = format!("{header}.{}", B64.encode(claims().to_string()));
        let sig = es.sign(&rng, input.as_bytes()).unwrap();
        writeln!(
            es_file,
            "{}",
            form(&format!("{input}.{}", B64.encode(sig.as_ref())))
        )
        .unwrap();
    }
    let mut sm_file =
        std::io::BufWriter::new(std::fs::File::create(format!("{out}/sm2.txt")).unwrap());
    for _ in 0..n {
        let token = yiqiao_sm::sign_jws(
            &json!({"typ": "JWT", "kid": "bench-sm2"}),
            &claims(),
            &sm2_signer,
        )
        .unwrap();
        writeln!(sm_file, "{}", form(&token)).unwrap();
    }
}
