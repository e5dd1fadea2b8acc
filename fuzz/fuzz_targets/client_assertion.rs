//! Client assertions at the token endpoint: compact JWS parsing and signature verification
//! against the institution's registered SM2 key.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use yiqiao_gateway::oauth::assertion;

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(parsed) = assertion::parse(token) {
        let _ = parsed.issuer();
        let _ = parsed.jti();
        let _ = assertion::verify_signature(&parsed, common::institution());
    }
});
