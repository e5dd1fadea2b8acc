//! `yiqiao sim`: a simulated region of hospital FHIR endpoints in one process.
//!
//! One HTTP port serves every hospital under `/h/{institution id}/fhir/{Type}`; each answers
//! the searches of docs/hospital-contract.md with deterministic synthetic data, sealed in the
//! SM envelope to the gateway's SM2 key and signed with the hospital's own SM2 key (derived
//! from the seed, see [`data::institution_key`]). Knobs inject latency, errors, hangs, garbage
//! and tampered envelopes, globally or per institution, and can be changed while running
//! (`PUT /_sim/knobs/{id}`, [`SimServer::set_knobs`]) so tests can make one hospital misbehave
//! and recover. Like a real hospital (docs/hospital-contract.md section 2a) each one checks the
//! gateway's SM2 request signature and timestamp and answers 401 otherwise.

pub mod cli;
pub mod data;
pub mod load;

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{App, HttpRequest, HttpResponse, web};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use yiqiao_sm::request_sig;
use yiqiao_sm::{Envelope, RecipientKey, RequestBinding, SenderKeys, SignedRequest};

pub use data::{Region, RegionShape};

/// Header carrying the requester's unique request ID (bound into the response envelope).
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Header carrying the requester's ID (the gateway's `federation.gateway_id`).
pub const REQUESTER_HEADER: &str = "x-yiqiao-requester";

/// Fault-injection and latency knobs of one institution (or the default of all).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Knobs {
    /// Latency of an answer, uniform in [min, max] milliseconds.
    pub latency_min_ms: u64,
    pub latency_max_ms: u64,
    /// Share of requests answered 503 with an OperationOutcome.
    pub error_rate: f64,
    /// Share of requests that hang for `hang_ms` before a 504.
    pub timeout_rate: f64,
    /// Share of requests answered 200 with bytes that are not an envelope.
    pub garbage_rate: f64,
    /// Share of requests answered with a sealed envelope whose ciphertext was altered after
    /// signing (the gateway must detect it).
    pub tampered_rate: f64,
    /// How long a "timeout" request hangs, milliseconds.
    pub hang_ms: u64,
}

impl Default for Knobs {
    fn default() -> Knobs {
        Knobs {
            latency_min_ms: 0,
            latency_max_ms: 0,
            error_rate: 0.0,
            timeout_rate: 0.0,
            garbage_rate: 0.0,
            tampered_rate: 0.0,
            hang_ms: 60_000,
        }
    }
}

impl Knobs {
    pub fn check(&self) -> Result<(), String> {
        if self.latency_min_ms > self.latency_max_ms {
            return Err("latency_min_ms must not exceed latency_max_ms".into());
        }
        let rates = [
            ("error_rate", self.error_rate),
            ("timeout_rate", self.timeout_rate),
            ("garbage_rate", self.garbage_rate),
            ("tampered_rate", self.tampered_rate),
        ];
        for (name, r) in rates {
            if !(0.0..=1.0).contains(&r) {
                return Err(format!("{name} must be between 0.0 and 1.0"));
            }
        }
        if rates.iter().map(|(_, r)| r).sum::<f64>() > 1.0 + 1e-9 {
            return Err("the rates together must not exceed 1.0".into());
        }
        Ok(())
    }

    /// Apply `key=value,key=value` (the CLI `--override` syntax) on top of `self`.
    pub fn with_overrides(mut self, text: &str) -> Result<Knobs, String> {
        for pair in text.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair}: expected key=value"))?;
            let int = || {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| format!("{k}: not an integer"))
            };
            let float = || {
                v.trim()
                    .parse::<f64>()
                    .map_err(|_| format!("{k}: not a number"))
            };
            match k.trim() {
                "latency_min_ms" => self.latency_min_ms = int()?,
                "latency_max_ms" => self.latency_max_ms = int()?,
                "error_rate" => self.error_rate = float()?,
                "timeout_rate" => self.timeout_rate = float()?,
                "garbage_rate" => self.garbage_rate = float()?,
                "tampered_rate" => self.tampered_rate = float()?,
                "hang_ms" => self.hang_ms = int()?,
                other => return Err(format!("unknown knob {other}")),
            }
        }
        self.check()?;
        Ok(self)
    }
}

/// What the simulator needs to start.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub shape: RegionShape,
    pub knobs: Knobs,
    /// Per-institution knobs (by institution id).
    pub overrides: HashMap<String, Knobs>,
    /// The gateway's envelope key (public half and its key id).
    pub gateway_key: RecipientKey,
    /// Only this requester ID is served (`X-Yiqiao-Requester`); `None` accepts any.
    pub gateway_id: Option<String>,
    /// Worker threads of the HTTP server.
    pub workers: usize,
}

struct SimState {
    region: Region,
    senders: HashMap<String, SenderKeys>,
    knobs: RwLock<(Knobs, HashMap<String, Knobs>)>,
    gateway_key: RecipientKey,
    gateway_id: Option<String>,
    hits: RwLock<HashMap<String, u64>>,
}

impl SimState {
    fn knobs_of(&self, id: &str) -> Knobs {
        match self.knobs.read() {
            Ok(k) => k.1.get(id).copied().unwrap_or(k.0),
            Err(_) => Knobs::default(),
        }
    }

    fn hit(&self, id: &str) {
        if let Ok(mut h) = self.hits.write() {
            *h.entry(id.to_string()).or_default() += 1;
        }
    }
}

/// A running simulator.
pub struct SimServer {
    pub port: u16,
    pub base_url: String,
    state: Arc<SimState>,
    server: Option<actix_web::dev::Server>,
    handle: actix_web::dev::ServerHandle,
}

impl SimServer {
    /// Generate the region and bind the server (not yet running: see [`SimServer::run`] /
    /// [`SimServer::spawn`]).
    pub fn start(config: SimConfig, listener: TcpListener) -> anyhow::Result<SimServer> {
        config
            .knobs
            .check()
            .map_err(|e| anyhow::anyhow!("knobs: {e}"))?;
        for (id, k) in &config.overrides {
            k.check()
                .map_err(|e| anyhow::anyhow!("knobs of {id}: {e}"))?;
        }
        let region = Region::generate(config.seed, config.shape).map_err(anyhow::Error::msg)?;
        let mut senders = HashMap::new();
        for inst in &region.institutions {
            senders.insert(
                inst.id.clone(),
                SenderKeys::new(&inst.id, &inst.key).map_err(|e| anyhow::anyhow!("{e}"))?,
            );
        }
        let addr = listener.local_addr()?;
        let state = Arc::new(SimState {
            region,
            senders,
            knobs: RwLock::new((config.knobs, config.overrides)),
            gateway_key: config.gateway_key,
            gateway_id: config.gateway_id,
            hits: RwLock::new(HashMap::new()),
        });
        let data = web::Data::from(state.clone());
        let server = actix_web::HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .route("/h/{id}/fhir/{type}", web::get().to(search))
                .route("/_sim/knobs/{id}", web::put().to(put_knobs))
                .route("/_sim/stats", web::get().to(stats))
                .default_service(web::to(|| async {
                    outcome(
                        StatusCode::NOT_FOUND,
                        "not-found",
                        "no such simulated endpoint",
                    )
                }))
        })
        .workers(config.workers.max(1))
        .keep_alive(Duration::from_secs(75))
        .shutdown_timeout(1)
        .listen(listener)?
        .run();
        let handle = server.handle();
        Ok(SimServer {
            port: addr.port(),
            base_url: format!("http://{addr}"),
            state,
            server: Some(server),
            handle,
        })
    }

    /// The region served.
    pub fn region(&self) -> &Region {
        &self.state.region
    }

    /// FHIR base URL of institution `id`.
    pub fn endpoint_of(&self, id: &str) -> String {
        format!("{}/h/{id}/fhir", self.base_url)
    }

    /// Replace the knobs of institution `id` (`None`: back to the default knobs).
    pub fn set_knobs(&self, id: &str, knobs: Option<Knobs>) {
        if let Ok(mut k) = self.state.knobs.write() {
            match knobs {
                Some(v) => {
                    k.1.insert(id.to_string(), v);
                }
                None => {
                    k.1.remove(id);
                }
            }
        }
    }

    /// Requests institution `id` has received so far.
    pub fn hits(&self, id: &str) -> u64 {
        self.state
            .hits
            .read()
            .map(|h| h.get(id).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Run on the current runtime in the background (tests, the demo).
    pub fn spawn(&mut self) {
        if let Some(server) = self.server.take() {
            tokio::spawn(server);
        }
    }

    /// Serve until stopped.
    pub async fn run(mut self) -> std::io::Result<()> {
        match self.server.take() {
            Some(server) => server.await,
            None => Ok(()),
        }
    }

    pub async fn stop(&self) {
        self.handle.stop(true).await;
    }
}

fn outcome(status: StatusCode, code: &str, text: &str) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("application/fhir+json")
        .json(json!({
            "resourceType": "OperationOutcome",
            "issue": [{ "severity": "error", "code": code, "diagnostics": text }],
        }))
}

async fn stats(state: web::Data<SimState>) -> HttpResponse {
    let hits = state.hits.read().map(|h| h.clone()).unwrap_or_default();
    HttpResponse::Ok().json(json!({ "hits": hits }))
}

async fn put_knobs(
    state: web::Data<SimState>,
    path: web::Path<String>,
    body: web::Json<Option<Knobs>>,
) -> HttpResponse {
    let id = path.into_inner();
    if id != "*" && state.region.institution(&id).is_none() {
        return outcome(StatusCode::NOT_FOUND, "not-found", "no such institution");
    }
    if let Some(k) = body.as_ref()
        && let Err(e) = k.check()
    {
        return outcome(StatusCode::BAD_REQUEST, "invalid", &e);
    }
    if let Ok(mut k) = state.knobs.write() {
        match (id.as_str(), body.into_inner()) {
            ("*", Some(v)) => k.0 = v,
            ("*", None) => k.0 = Knobs::default(),
            (_, Some(v)) => {
                k.1.insert(id, v);
            }
            (_, None) => {
                k.1.remove(&id);
            }
        }
    }
    HttpResponse::NoContent().finish()
}

/// Parameters a simulated hospital understands (docs/hospital-contract.md).
fn accepted_params(resource_type: &str) -> &'static [&'static str] {
    match resource_type {
        "Encounter" => &["patient.identifier", "date"],
        _ => &["patient.identifier", "date", "code"],
    }
}

/// `code=system|code` or `code=code` (comma = OR) against every coding of the resource's code.
fn code_matches(resource: &Value, wanted: &str) -> bool {
    let concept = resource
        .get("code")
        .or_else(|| resource.get("medicationCodeableConcept"));
    let Some(codings) = concept.and_then(|c| c["coding"].as_array()) else {
        return false;
    };
    wanted.split(',').any(|token| {
        let (system, code) = match token.split_once('|') {
            Some((s, c)) => (Some(s), c),
            None => (None, token),
        };
        codings.iter().any(|c| {
            c["code"].as_str() == Some(code)
                && system.is_none_or(|s| s.is_empty() || c["system"].as_str() == Some(s))
        })
    })
}

/// `date=[eq|ge|gt|le|lt]YYYY[-MM[-DD]]` compared on the date part of the clinical date.
fn date_matches(resource: &Value, param: &str) -> Result<bool, String> {
    let (prefix, value) = match param.get(..2) {
        Some(p @ ("eq" | "ge" | "gt" | "le" | "lt")) => (p, &param[2..]),
        _ => ("eq", param),
    };
    let ok = matches!(value.len(), 4 | 7 | 10)
        && value.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    if !ok {
        return Err(format!("date: {param} is not [prefix]YYYY[-MM[-DD]]"));
    }
    let Some(date) = crate::fhir::clinical_date(resource) else {
        return Ok(false);
    };
    let have = date.get(..value.len()).unwrap_or(date);
    Ok(match prefix {
        "ge" => have >= value,
        "gt" => have > value,
        "le" => have <= value,
        "lt" => have < value,
        _ => have == value,
    })
}

async fn search(
    state: web::Data<SimState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    let (id, resource_type) = path.into_inner();
    let Some(inst) = state.region.institution(&id) else {
        return outcome(StatusCode::NOT_FOUND, "not-found", "no such institution");
    };
    state.hit(&id);
    if !data::RESOURCE_TYPES.contains(&resource_type.as_str()) {
        return outcome(
            StatusCode::NOT_FOUND,
            "not-supported",
            "resource type not served",
        );
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (Some(request_id), Some(requester)) = (header(REQUEST_ID_HEADER), header(REQUESTER_HEADER))
    else {
        return outcome(
            StatusCode::BAD_REQUEST,
            "required",
            "X-Request-Id and X-Yiqiao-Requester are required",
        );
    };
    if state.gateway_id.as_ref().is_some_and(|g| g != &requester) {
        return outcome(StatusCode::FORBIDDEN, "forbidden", "unknown requester");
    }
    if let Err(why) = verify_gateway(&state, &req, &requester, &request_id) {
        return outcome(StatusCode::UNAUTHORIZED, "login", &why);
    }
    let knobs = state.knobs_of(&id);
    let (delay, fate) = roll(&knobs);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    match fate {
        "timeout" => {
            tokio::time::sleep(Duration::from_millis(knobs.hang_ms)).await;
            return outcome(StatusCode::GATEWAY_TIMEOUT, "timeout", "simulated hang");
        }
        "error" => {
            return outcome(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                "simulated failure",
            );
        }
        "garbage" => {
            return HttpResponse::Ok()
                .content_type(yiqiao_sm::ENVELOPE_MEDIA_TYPE)
                .body("{\"version\":1,\"this is\":not an envelope<<<");
        }
        _ => {}
    }

    let query: Vec<(String, String)> =
        match serde_urlencoded::from_str(req.uri().query().unwrap_or("")) {
            Ok(q) => q,
            Err(e) => return outcome(StatusCode::BAD_REQUEST, "invalid", &e.to_string()),
        };
    let allowed = accepted_params(&resource_type);
    if let Some((k, _)) = query.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        return outcome(
            StatusCode::BAD_REQUEST,
            "not-supported",
            &format!("unknown parameter {k}"),
        );
    }
    let Some((_, ident)) = query.iter().find(|(k, _)| k == "patient.identifier") else {
        return outcome(
            StatusCode::BAD_REQUEST,
            "required",
            "patient.identifier is required",
        );
    };
    let mut people = Vec::new();
    for token in ident.split(',') {
        let Some((system, value)) = token.split_once('|') else {
            return outcome(
                StatusCode::BAD_REQUEST,
                "invalid",
                "patient.identifier must be system|value",
            );
        };
        if system != inst.patient_id_system {
            continue;
        }
        if let Some(&p) = inst.patients.get(value) {
            people.push(p);
        }
    }
    let mut found = Vec::new();
    for p in people {
        let Some(person) = state.region.persons.get(p as usize) else {
            continue;
        };
        'each: for r in data::resources(state.region.seed, inst, person, &resource_type) {
            for (k, v) in &query {
                let keep = match k.as_str() {
                    "code" => code_matches(&r, v),
                    "date" => match date_matches(&r, v) {
                        Ok(b) => b,
                        Err(e) => return outcome(StatusCode::BAD_REQUEST, "invalid", &e),
                    },
                    _ => true,
                };
                if !keep {
                    continue 'each;
                }
            }
            found.push(r);
        }
    }
    let base = format!("{}/h/{id}/fhir", request_base(&req));
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": found.len(),
        "entry": found.into_iter().map(|r| {
            let url = format!("{base}/{}/{}", resource_type, r["id"].as_str().unwrap_or(""));
            json!({ "fullUrl": url, "resource": r, "search": { "mode": "match" } })
        }).collect::<Vec<_>>(),
    });
    let target = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    let sealed = seal(
        &state,
        &id,
        &target,
        (&requester, &request_id),
        &bundle,
        fate == "tampered",
    );
    match sealed {
        Ok(body) => HttpResponse::Ok()
            .content_type(yiqiao_sm::ENVELOPE_MEDIA_TYPE)
            .body(body),
        Err(e) => outcome(StatusCode::INTERNAL_SERVER_ERROR, "exception", &e),
    }
}

/// How far a request's `X-Yiqiao-Timestamp` may be from the hospital's clock (seconds).
pub const SIGNATURE_MAX_SKEW_SECS: u64 = 300;

/// The hospital's check of the gateway's identity (docs/hospital-contract.md): the SM2
/// signature over method, target, timestamp, requester, request id and body, under the
/// gateway's published key, with a fresh timestamp. `Err(why)` is answered 401.
fn verify_gateway(
    state: &SimState,
    req: &HttpRequest,
    requester: &str,
    request_id: &str,
) -> Result<(), String> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let (Some(timestamp), Some(signature)) = (
        header(request_sig::TIMESTAMP_HEADER),
        header(request_sig::SIGNATURE_HEADER),
    ) else {
        return Err("X-Yiqiao-Timestamp and X-Yiqiao-Signature are required".into());
    };
    let timestamp = request_sig::parse_timestamp(timestamp).map_err(|e| e.to_string())?;
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.path().to_string(), |pq| pq.as_str().to_string());
    SignedRequest {
        method: req.method().as_str(),
        target: &target,
        timestamp,
        requester,
        request_id,
        body: b"",
    }
    .verify(
        &state.gateway_key.public_key,
        signature,
        chrono::Utc::now().timestamp(),
        SIGNATURE_MAX_SKEW_SECS,
    )
    .map_err(|e| e.to_string())
}

/// This answer's delay (ms) and fate (`ok`, `timeout`, `error`, `garbage` or `tampered`),
/// drawn with the institution's knobs.
fn roll(knobs: &Knobs) -> (u64, &'static str) {
    let mut rng = rand::thread_rng();
    let delay = if knobs.latency_max_ms > knobs.latency_min_ms {
        rng.gen_range(knobs.latency_min_ms..=knobs.latency_max_ms)
    } else {
        knobs.latency_min_ms
    };
    let draw: f64 = rng.r#gen();
    let fates = [
        ("timeout", knobs.timeout_rate),
        ("error", knobs.error_rate),
        ("garbage", knobs.garbage_rate),
        ("tampered", knobs.tampered_rate),
    ];
    let mut edge = 0.0;
    let mut fate = "ok";
    for (name, rate) in fates {
        edge += rate;
        if draw < edge {
            fate = name;
            break;
        }
    }
    (delay, fate)
}

/// The answer sealed in an SM envelope from institution `id` to the gateway, bound to the
/// request (`target`, requester, request id); `tampered`: its ciphertext altered after signing.
fn seal(
    state: &SimState,
    id: &str,
    target: &str,
    (requester, request_id): (&str, &str),
    bundle: &Value,
    tampered: bool,
) -> Result<String, String> {
    let binding =
        RequestBinding::new("GET", target, requester, request_id).map_err(|e| e.to_string())?;
    let sender = state.senders.get(id).ok_or("no sender key")?;
    let payload = serde_json::to_vec(bundle).map_err(|e| e.to_string())?;
    let mut env = Envelope::seal(
        &payload,
        "application/fhir+json",
        sender,
        &state.gateway_key,
        &binding,
        chrono::Utc::now(),
    )
    .map_err(|e| e.to_string())?;
    if tampered {
        // Alter the ciphertext after signing, as a man in the middle would.
        let mut bytes = env.ciphertext.into_bytes();
        if let Some(b) = bytes.get_mut(4) {
            *b = if *b == b'A' { b'B' } else { b'A' };
        }
        env.ciphertext = String::from_utf8(bytes).map_err(|e| e.to_string())?;
    }
    env.to_json().map_err(|e| e.to_string())
}

fn request_base(req: &HttpRequest) -> String {
    let info = req.connection_info();
    format!("{}://{}", info.scheme(), info.host())
}

/// The region as JSON for loaders: directory entries (with endpoint URLs and SM2 public keys)
/// and the Patient each institution registers with the EMPI.
pub fn region_json(region: &Region, base_url: &str) -> Result<Value, String> {
    let mut institutions = Vec::new();
    for inst in &region.institutions {
        let spec = inst.spec(&format!("{base_url}/h/{}/fhir", inst.id))?;
        institutions.push(serde_json::to_value(spec).map_err(|e| e.to_string())?);
    }
    let mut patients = Vec::new();
    for person in &region.persons {
        for &n in &person.sites {
            if let Some(inst) = region.institution_by_n(n) {
                patients.push(json!({ "institution": inst.id, "patient": person.patient(inst) }));
            }
        }
    }
    let persons: Vec<Value> = region
        .persons
        .iter()
        .map(|p| {
            json!({
                "index": p.index,
                "resident_id": p.resident_id,
                "sites": p.sites.iter().filter_map(|n| region.institution_by_n(*n)).map(|i| i.id.clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(json!({
        "seed": region.seed,
        "institutions": institutions,
        "patients": patients,
        "persons": persons,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn knob_overrides_parse_and_are_checked() {
        let k = Knobs::default()
            .with_overrides("error_rate=0.25, latency_min_ms=5,latency_max_ms=50")
            .unwrap();
        assert_eq!(
            (k.error_rate, k.latency_min_ms, k.latency_max_ms),
            (0.25, 5, 50)
        );
        assert!(Knobs::default().with_overrides("colour=red").is_err());
        assert!(Knobs::default().with_overrides("error_rate=2").is_err());
        assert!(
            Knobs::default()
                .with_overrides("error_rate=0.6,garbage_rate=0.6")
                .is_err()
        );
        assert!(
            Knobs::default()
                .with_overrides("latency_min_ms=9,latency_max_ms=3")
                .is_err()
        );
    }

    #[test]
    fn code_and_date_filters() {
        let r = json!({
            "resourceType": "Observation",
            "code": { "coding": [{ "system": "http://loinc.org", "code": "8867-4" }] },
            "effectiveDateTime": "2024-03-05T09:30:00+08:00",
        });
        assert!(code_matches(&r, "8867-4"));
        assert!(code_matches(&r, "http://loinc.org|8867-4"));
        assert!(code_matches(&r, "x,8867-4"));
        assert!(!code_matches(&r, "http://snomed.info/sct|8867-4"));
        assert!(date_matches(&r, "2024").unwrap());
        assert!(date_matches(&r, "ge2024-03-05").unwrap());
        assert!(!date_matches(&r, "gt2024-03-05").unwrap());
        assert!(date_matches(&r, "lt2024-04").unwrap());
        assert!(!date_matches(&r, "eq2023").unwrap());
        assert!(date_matches(&r, "2024-3-5").is_err());
    }
}
