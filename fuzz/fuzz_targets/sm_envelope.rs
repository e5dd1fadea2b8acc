//! SM envelopes from the network: JSON structure, then the checks of `open` (signature,
//! timestamp, request binding, SM2 key unwrap, SM4-GCM tag) with fixed keys.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use yiqiao_sm::envelope::{Envelope, RequestBinding};

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = Envelope::from_json(data) else {
        return;
    };
    let key = common::key();
    let Ok(binding) = RequestBinding::new("GET", "/fhir/Observation?patient=p", "gateway", "req-1")
    else {
        return;
    };
    let now = chrono::Utc::now();
    let _ = envelope.open(
        key,
        &key.public_key(),
        &binding,
        now,
        std::time::Duration::from_secs(300),
    );
    let _ = envelope.decrypt(key);
});
