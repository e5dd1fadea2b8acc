//! FHIR Patient input as `POST /fhir/Patient` takes it: the edge's byte and value checks
//! (control characters), then the mapping to an EMPI registration.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use yiqiao_gateway::routes::patients::registration;
use yiqiao_gateway::sanitize;

fuzz_target!(|data: &[u8]| {
    if sanitize::check_json_bytes(data).is_err() {
        return;
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if sanitize::check_json_value(&value).is_err() {
        return;
    }
    let _ = registration(common::institution(), value, None, common::RESIDENT_SYSTEM);
});
