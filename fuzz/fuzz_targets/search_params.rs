//! Search parameters as the HTTP edge takes them: the raw query and path checks (control
//! characters, encoding), decoding into parameters, the known-parameter check and paging.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use yiqiao_gateway::routes::patients::SEARCH_PARAMS;
use yiqiao_gateway::routes::{check_params, paging};
use yiqiao_gateway::sanitize;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let (path, query) = raw.split_once('?').unwrap_or(("/fhir/Patient", raw));
    let _ = sanitize::path_problem(path, Some("/fhir/Patient/{id}"));
    if sanitize::query_problem(query).is_some() {
        return;
    }
    let params: HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let _ = check_params(&params, &SEARCH_PARAMS);
    let _ = paging(&params, 20, 200);
});
