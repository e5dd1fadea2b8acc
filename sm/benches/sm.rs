//! SM primitive and envelope throughput. Run: `cargo bench -p yiqiao-sm --bench sm`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Duration;

use chrono::Utc;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use yiqiao_sm::{
    DEFAULT_SIGNER_ID, Envelope, RecipientKey, RequestBinding, SenderKeys, Sm2PrivateKey, sm3_hash,
    sm4_gcm_open, sm4_gcm_seal,
};

fn sm4_gcm(c: &mut Criterion) {
    let key = [7u8; 16];
    let nonce = [9u8; 12];
    let aad = [1u8; 64];
    for (name, size) in [("1MiB", 1024 * 1024), ("16KiB", 16 * 1024)] {
        let data = vec![0x5au8; size];
        let sealed = sm4_gcm_seal(&key, &nonce, &aad, &data).unwrap();
        let mut g = c.benchmark_group(format!("sm4_gcm_{name}"));
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function("seal", |b| {
            b.iter(|| sm4_gcm_seal(&key, &nonce, &aad, black_box(&data)).unwrap())
        });
        g.bench_function("open", |b| {
            b.iter(|| sm4_gcm_open(&key, &nonce, &aad, black_box(&sealed)).unwrap())
        });
        g.finish();
    }
}

fn sm3(c: &mut Criterion) {
    let data = vec![0xa5u8; 1024 * 1024];
    let mut g = c.benchmark_group("sm3_1MiB");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("hash", |b| b.iter(|| sm3_hash(black_box(&data))));
    g.finish();
}

fn sm2(c: &mut Criterion) {
    let key = Sm2PrivateKey::generate().unwrap();
    let signer = key.signing_key(DEFAULT_SIGNER_ID).unwrap();
    let public = key.public_key();
    let msg = [0x42u8; 256];
    let sig = signer.sign(&msg).unwrap();
    let mut g = c.benchmark_group("sm2");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sign", |b| b.iter(|| signer.sign(black_box(&msg)).unwrap()));
    g.bench_function("verify", |b| {
        b.iter(|| {
            public
                .verify(black_box(&msg), &sig, DEFAULT_SIGNER_ID)
                .unwrap()
        })
    });
    g.finish();
}

fn envelope(c: &mut Criterion) {
    let sender_key = Sm2PrivateKey::generate().unwrap();
    let recipient_key = Sm2PrivateKey::generate().unwrap();
    let sender = SenderKeys::new("12330100470116614F", &sender_key).unwrap();
    let recipient = RecipientKey {
        key_id: "gw-enc-1".into(),
        public_key: recipient_key.public_key(),
    };
    let binding = RequestBinding::new("GET", "/fhir/Patient?_id=1", "H330100", "req-1").unwrap();
    let payload = vec![0x33u8; 16 * 1024];
    let now = Utc::now();
    let env = Envelope::seal(
        &payload,
        "application/fhir+json",
        &sender,
        &recipient,
        &binding,
        now,
    )
    .unwrap();
    let sender_pub = sender_key.public_key();
    let mut g = c.benchmark_group("envelope_16KiB");
    g.throughput(Throughput::Elements(1));
    g.bench_function("seal", |b| {
        b.iter(|| {
            Envelope::seal(
                black_box(&payload),
                "application/fhir+json",
                &sender,
                &recipient,
                &binding,
                now,
            )
            .unwrap()
        })
    });
    g.bench_function("open", |b| {
        b.iter(|| {
            env.open(
                &recipient_key,
                &sender_pub,
                &binding,
                now,
                Duration::from_secs(300),
            )
            .unwrap()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = sm4_gcm, sm3, sm2, envelope
}
criterion_main!(benches);
