//! Test harness: per-test databases, an in-process gateway, a TCP proxy that can cut a
//! dependency off and bring it back.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};
use tokio::io::copy_bidirectional;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use yiqiao_gateway::config::{Secret, Settings};
use yiqiao_gateway::{Application, state::AppState};

use crate::wait;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// The storage backends, and a database of a test's own (a fresh PostgreSQL database dropped
/// at the end, or a SQLite file in a fresh directory): the registry's one test-database helper.
pub use yiqiao_registry::Backend;
pub use yiqiao_registry::store::testdb::TestDatabase as TestDb;

/// Run each listed `async fn name(backend: Backend)` as two tests, one per backend.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name($crate::helpers::Backend::Sqlite).await } )*
        }
        mod postgres {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name($crate::helpers::Backend::Postgres).await } )*
        }
    };
}

pub fn redis_url() -> String {
    std::env::var("YIQIAO_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        let path =
            std::env::temp_dir().join(format!("yiqiao-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Settings for a test server on port 0 over `db_url`.
pub fn test_settings(db_url: &str) -> Settings {
    let mut s = Settings::default();
    s.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    s.admin_token = Secret::new(ADMIN_TOKEN);
    s.database.url = Secret::new(db_url);
    s.database.pool_size = 4;
    s.database.acquire_timeout_ms = 1000;
    s.database.connect_timeout_ms = 1000;
    s.http.workers = 2;
    s.http.max_body_bytes = 64 * 1024;
    s.http.shutdown_timeout_secs = 1;
    s.audit.signing_key_file = test_audit_key().0.display().to_string();
    s.federation.sm2_key_file = test_gateway_key().0.display().to_string();
    // Bulk loads in tests share one SQLite file with the audit writer and the delivery worker on
    // a loaded 2-core machine: allow a longer wait for the write lock than the default.
    s.database.sqlite_busy_timeout_ms = 20_000;
    // API rate limits stay on (every call takes the check) with budgets no other test reaches;
    // tests/api/ratelimit.rs sets its own.
    s.rate_limits.token_burst = 1_000_000;
    s.rate_limits.institution_burst = 1_000_000;
    s.rate_limits.directory_burst = 1_000_000;
    // The test region (simulated hospitals, webhook receivers, custodians) listens on plain
    // HTTP at 127.0.0.1: allow-listed here, refused by the default policy
    // (tests/api/outbound.rs starts from the default).
    s.outbound.allow_http = true;
    s.outbound.allow_cidrs = vec!["127.0.0.0/8".into()];
    s
}

/// Settings of one of several replicas over `db_url` sharing one Redis under `prefix` and one
/// public URL (so a token issued by one is valid at the others).
pub fn replica_settings(db_url: &str, prefix: &str) -> Settings {
    let mut s = test_settings(db_url);
    s.public_url = "http://gateway.test".into();
    s.redis.url = Secret::new(redis_url());
    s.redis.key_prefix = prefix.to_string();
    s
}

/// One gateway SM2 envelope key per test process: (private key PEM file, the key).
pub fn test_gateway_key() -> &'static (PathBuf, yiqiao_sm::Sm2PrivateKey) {
    static KEY: std::sync::OnceLock<(PathBuf, yiqiao_sm::Sm2PrivateKey)> =
        std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!(
            "yiqiao-gateway-key-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let key = yiqiao_sm::Sm2PrivateKey::generate().unwrap();
        let path = dir.join("gateway-key.pem");
        std::fs::write(&path, key.to_pkcs8_pem().unwrap().as_bytes()).unwrap();
        (path, key)
    })
}

/// Run the `yiqiao` binary against this app's database with the test audit key (within
/// [`wait::RUN`]).
pub async fn yiqiao_cli(app: &TestApp, args: &[&str]) -> std::process::Output {
    wait::output(
        wait::command(env!("CARGO_BIN_EXE_yiqiao"))
            .args(args)
            .env_remove("YIQIAO_CONFIG")
            .env("YIQIAO_DATABASE_URL", app.state.settings.database_url())
            .env("YIQIAO_AUDIT__SIGNING_KEY_FILE", &test_audit_key().0)
            .env("YIQIAO_DATA_DIR", std::env::temp_dir()),
        &format!("`yiqiao {}`", args.join(" ")),
    )
    .await
}

/// The `yiqiao` binary as scripts run it: a clean environment but PATH, `dir` as its data and
/// working directory, `db_url` as its database.
pub fn yiqiao_in(dir: &TempDir, db_url: &str) -> tokio::process::Command {
    let mut cmd = wait::command(env!("CARGO_BIN_EXE_yiqiao"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("YIQIAO_DATA_DIR", &dir.path)
        .env("YIQIAO_DATABASE_URL", db_url)
        .current_dir(&dir.path);
    cmd
}

/// Run `cmd` to the end within [`wait::RUN`] from a synchronous test: (exit code or -1, stdout,
/// stderr).
pub fn run_blocking(cmd: &mut tokio::process::Command) -> (i32, String, String) {
    let what = format!("`{}`", wait::describe(cmd));
    let out = wait::output_blocking(cmd, &what);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One SM2 audit checkpoint key per test process (every replica of every test shares it):
/// (private key PEM file, public key PEM file).
pub fn test_audit_key() -> &'static (PathBuf, PathBuf) {
    static KEY: std::sync::OnceLock<(PathBuf, PathBuf)> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!(
            "yiqiao-audit-key-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let key = yiqiao_sm::Sm2PrivateKey::generate().unwrap();
        let private = dir.join("audit-key.pem");
        let public = dir.join("audit-key.pub.pem");
        std::fs::write(&private, key.to_pkcs8_pem().unwrap().as_bytes()).unwrap();
        std::fs::write(&public, key.public_key().to_spki_pem().unwrap()).unwrap();
        (private, public)
    })
}

/// An HTTP client whose requests fail after [`wait::REQUEST`] rather than hang.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(wait::REQUEST)
        .build()
        .unwrap()
}

/// A running gateway with its own database.
pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub state: AppState,
    /// Owns the test database (dropped with the app).
    _db: TestDb,
    server: actix_web::dev::ServerHandle,
    /// The HL7 v2 MLLP listener, when `mllp.enabled`.
    pub mllp: Option<std::net::SocketAddr>,
    /// The MLLP-over-TLS listener, when `mllp.tls_listen` is set.
    pub mllp_tls: Option<std::net::SocketAddr>,
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> TestApp {
        Self::spawn_with(backend, |_| {}).await
    }

    pub async fn spawn_with(backend: Backend, adjust: impl FnOnce(&mut Settings)) -> TestApp {
        let db = TestDb::new(backend);
        let mut settings = test_settings(&db.url);
        adjust(&mut settings);
        Self::spawn_on(db, settings).await
    }

    pub async fn spawn_on(db: TestDb, settings: Settings) -> TestApp {
        let listener = TcpListener::bind(settings.listen).unwrap();
        let app = Application::build_with_listener(settings, listener)
            .await
            .expect("gateway failed to start");
        let base = format!("http://127.0.0.1:{}", app.port());
        let state = app.state().clone();
        let server = app.handle();
        let mllp = app.mllp_addr();
        let mllp_tls = app.mllp_tls_addr();
        tokio::spawn(app.into_server());
        TestApp {
            base,
            client: client(),
            state,
            _db: db,
            server,
            mllp,
            mllp_tls,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    pub async fn admin_get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
    }

    pub async fn admin_post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn admin_put(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .put(self.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Number of institutions stored, read through the admin API.
    pub async fn institution_count(&self) -> usize {
        let resp = self.admin_get("/admin/institutions?_count=1000").await;
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        body["items"].as_array().unwrap().len()
    }

    pub async fn stop(self) {
        self.server.stop(true).await;
    }
}

/// A registrable institution; `n` varies the unique fields.
pub fn institution(n: u32) -> Value {
    json!({
        "id": format!("hosp-{n:03}"),
        "name": format!("第{n}人民医院"),
        "uscc": uscc(n),
        "region_code": "350100",
        "level": "3A",
        "kind": "hospital",
        "endpoint_url": format!("https://his-{n}.example/fhir"),
        "patient_id_system": format!("urn:oid:2.16.156.10011.1.99.{n}"),
        "allowed_scopes": ["system/Patient.rs", "system/Observation.rs"],
    })
}

/// A valid unified social credit code derived from `n` (GB 32100 check character).
pub fn uscc(n: u32) -> String {
    let body = format!("91350100M{n:08}");
    let check = yiqiao_registry::directory::uscc_check_character(&body).unwrap();
    format!("{body}{check}")
}

/// Assert a response is an OperationOutcome with the given status and error code; returns it.
pub async fn assert_outcome(resp: reqwest::Response, status: u16, code: &str) -> Value {
    let got = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let has_request_id = resp.headers().contains_key("x-request-id");
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(got, status, "status; body {body}");
    assert!(ct.starts_with("application/fhir+json"), "content-type {ct}");
    assert!(has_request_id, "X-Request-Id missing");
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    let issue = &body["issue"][0];
    assert_eq!(issue["severity"], "error");
    assert_eq!(issue["details"]["coding"][0]["code"], code, "{body}");
    assert!(
        issue["details"]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    );
    assert!(
        issue["diagnostics"]
            .as_str()
            .is_some_and(|d| d.starts_with("request id ")),
        "{body}"
    );
    body
}

/// A TCP proxy in front of a real service that a test can take down and bring back.
pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (up2, conns2) = (up.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns2.lock().await.push(task);
            }
        });
        Proxy {
            addr,
            up,
            conns,
            accept,
        }
    }

    /// Cut every open connection and refuse new ones.
    pub async fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        for task in self.conns.lock().await.drain(..) {
            task.abort();
        }
    }

    pub fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Host and port of a service URL.
pub fn socket_of(url: &str) -> SocketAddr {
    let parsed = url::Url::parse(url).unwrap();
    let host = parsed.host_str().unwrap();
    let port = parsed
        .port_or_known_default()
        .unwrap_or(match parsed.scheme() {
            "redis" => 6379,
            _ => 5432,
        });
    use std::net::ToSocketAddrs;
    (host, port).to_socket_addrs().unwrap().next().unwrap()
}

/// The URL with host and port replaced by the proxy's.
pub fn via_proxy(url: &str, proxy: &Proxy) -> String {
    let mut parsed = url::Url::parse(url).unwrap();
    parsed.set_host(Some("127.0.0.1")).unwrap();
    parsed.set_port(Some(proxy.addr.port())).unwrap();
    parsed.to_string()
}

/// (consent_decision, resource) of every audit record, in chain order.
pub fn audit_rows(app: &TestApp) -> Vec<(Option<String>, serde_json::Value)> {
    use diesel::prelude::*;
    use yiqiao_registry::store::schema::audit_events::dsl as a;
    let mut conn = app.state.store.conn().unwrap();
    a::audit_events
        .order(a::seq.asc())
        .select((a::consent_decision, a::resource))
        .load::<(Option<String>, String)>(&mut conn)
        .unwrap()
        .into_iter()
        .map(|(d, r)| (d, serde_json::from_str(&r).unwrap()))
        .collect()
}
