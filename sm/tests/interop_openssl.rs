//! Interop with the OpenSSL 3 command line: SM3, SM2 signatures and SM2 DER ciphertexts,
//! both directions, with keys generated on both sides.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::{Scratch, openssl, run, s};
use yiqiao_sm::{
    DEFAULT_SIGNER_ID, Sm2CiphertextFormat, Sm2PrivateKey, Sm2PublicKey, Sm2Signature, sm3_hex,
};

const DISTID: &str = "distid:1234567812345678";

fn openssl_key(dir: &Scratch) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = dir.path("openssl.pem");
    let public = dir.path("openssl.pub.pem");
    openssl(&["genpkey", "-algorithm", "SM2", "-out", s(&key)]);
    openssl(&["pkey", "-in", s(&key), "-pubout", "-out", s(&public)]);
    (key, public)
}

fn our_key(dir: &Scratch) -> (Sm2PrivateKey, std::path::PathBuf, std::path::PathBuf) {
    let key = Sm2PrivateKey::generate().unwrap();
    let key_path = dir.write("ours.pem", key.to_pkcs8_pem().unwrap().as_bytes());
    let pub_path = dir.write("ours.pub.pem", key.public_key().to_spki_pem().unwrap());
    (key, key_path, pub_path)
}

#[test]
fn openssl_is_version_3() {
    let v = String::from_utf8(openssl(&["version"])).unwrap();
    assert!(v.starts_with("OpenSSL 3."), "need OpenSSL 3, have {v}");
}

#[test]
fn sm3_matches_openssl_dgst() {
    let dir = Scratch::new("sm3");
    let mut big = Vec::with_capacity(100_003);
    for i in 0..100_003u32 {
        big.push((i.wrapping_mul(2_654_435_761) >> 13) as u8);
    }
    for (name, data) in [
        ("abc", b"abc".to_vec()),
        ("empty", Vec::new()),
        ("big", big),
    ] {
        let f = dir.write(name, &data);
        let out = String::from_utf8(openssl(&["dgst", "-sm3", "-r", s(&f)])).unwrap();
        let theirs = out.split_whitespace().next().unwrap();
        assert_eq!(theirs, sm3_hex(&data), "{name}");
    }
}

#[test]
fn our_signature_verifies_in_openssl_only_with_distid() {
    let dir = Scratch::new("sig-ours");
    let (key, _, pub_path) = our_key(&dir);
    let msg = dir.write("msg", b"GET /fhir/Patient?identifier=x H330100");
    let sig = key
        .signing_key(DEFAULT_SIGNER_ID)
        .unwrap()
        .sign(&std::fs::read(&msg).unwrap())
        .unwrap();
    let sig_path = dir.write("sig", sig.to_der());
    let verify = |distid: Option<&str>, msg: &std::path::Path| {
        let mut args = vec![
            "pkeyutl",
            "-verify",
            "-rawin",
            "-digest",
            "sm3",
            "-pubin",
            "-inkey",
            s(&pub_path),
            "-in",
            s(msg),
            "-sigfile",
            s(&sig_path),
        ];
        if let Some(d) = distid {
            args.extend(["-pkeyopt", d]);
        }
        run("openssl", &args, None)
    };
    let ok = verify(Some(DISTID), &msg);
    assert!(
        ok.status.success()
            && String::from_utf8_lossy(&ok.stdout).contains("Verified Successfully"),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        !verify(None, &msg).status.success(),
        "OpenSSL's default signer ID is empty"
    );
    let other = dir.write("other", b"GET /fhir/Patient?identifier=y H330100");
    assert!(!verify(Some(DISTID), &other).status.success());
}

#[test]
fn openssl_signature_verifies_in_ours() {
    let dir = Scratch::new("sig-theirs");
    let (key_path, pub_path) = openssl_key(&dir);
    let public = Sm2PublicKey::from_spki_pem(&std::fs::read_to_string(&pub_path).unwrap()).unwrap();
    let private =
        Sm2PrivateKey::from_pkcs8_pem(&std::fs::read_to_string(&key_path).unwrap()).unwrap();
    assert_eq!(
        private.public_key(),
        public,
        "OpenSSL PKCS#8 and SPKI agree in our parser"
    );
    let msg = b"client assertion signing input";
    let msg_path = dir.write("msg", msg);
    let der = openssl(&[
        "pkeyutl",
        "-sign",
        "-rawin",
        "-digest",
        "sm3",
        "-inkey",
        s(&key_path),
        "-pkeyopt",
        DISTID,
        "-in",
        s(&msg_path),
    ]);
    let sig = Sm2Signature::from_der(&der).unwrap();
    public.verify(msg, &sig, DEFAULT_SIGNER_ID).unwrap();
    assert!(public.verify(b"other", &sig, DEFAULT_SIGNER_ID).is_err());
    assert!(public.verify(msg, &sig, "").is_err());
}

#[test]
fn our_der_ciphertext_decrypts_in_openssl() {
    let dir = Scratch::new("enc-ours");
    let (key, key_path, _) = our_key(&dir);
    let secret = b"\x00\x01sixteen-byte-key";
    let ct = key
        .public_key()
        .encrypt(secret, Sm2CiphertextFormat::Der)
        .unwrap();
    let ct_path = dir.write("ct", &ct);
    let plain = openssl(&[
        "pkeyutl",
        "-decrypt",
        "-inkey",
        s(&key_path),
        "-in",
        s(&ct_path),
    ]);
    assert_eq!(plain, secret);

    // OpenSSL 3.0 does not read the raw C1C3C2 form: the format really must be stated.
    let raw = key
        .public_key()
        .encrypt(secret, Sm2CiphertextFormat::RawC1C3C2)
        .unwrap();
    let raw_path = dir.write("raw", &raw);
    let out = run(
        "openssl",
        &[
            "pkeyutl",
            "-decrypt",
            "-inkey",
            s(&key_path),
            "-in",
            s(&raw_path),
        ],
        None,
    );
    assert!(!out.status.success() || out.stdout != secret);
}

#[test]
fn openssl_ciphertext_decrypts_in_ours() {
    let dir = Scratch::new("enc-theirs");
    let (key_path, pub_path) = openssl_key(&dir);
    let private =
        Sm2PrivateKey::from_pkcs8_pem(&std::fs::read_to_string(&key_path).unwrap()).unwrap();
    let secret = dir.write("secret", b"0123456789abcdef");
    let ct = openssl(&[
        "pkeyutl",
        "-encrypt",
        "-pubin",
        "-inkey",
        s(&pub_path),
        "-in",
        s(&secret),
    ]);
    let plain = private.decrypt(&ct, Sm2CiphertextFormat::Der).unwrap();
    assert_eq!(plain.as_slice(), b"0123456789abcdef");
    assert!(
        private
            .decrypt(&ct, Sm2CiphertextFormat::RawC1C3C2)
            .is_err()
    );
}
