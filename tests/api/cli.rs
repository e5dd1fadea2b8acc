//! The command line as scripts use it: exit codes, output, and the demo.

use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::helpers::{Backend, TempDir, TestDb, client, run_blocking, yiqiao_in};
use crate::wait;

fn cli_exit_codes(backend: Backend) {
    let dir = TempDir::new();
    let db = TestDb::new(backend);
    let (code, out, _) = run_blocking(yiqiao_in(&dir, &db.url).arg("migrate"));
    assert_eq!(code, 0);
    assert!(out.contains("migration(s) applied"), "{out}");
    let (code, out, _) = run_blocking(yiqiao_in(&dir, &db.url).arg("migrate"));
    assert_eq!(code, 0);
    assert!(out.contains("up to date"), "{out}");

    let add = |extra: &[&str]| {
        let mut cmd = yiqiao_in(&dir, &db.url);
        cmd.args([
            "institution",
            "add",
            "--id",
            "hosp-cli",
            "--name",
            "命令行医院",
            "--uscc",
            "91350100M000100Y43",
        ])
        .args([
            "--region-code",
            "350100",
            "--level",
            "2A",
            "--patient-id-system",
            "urn:oid:1.2.3.4",
        ])
        .args(["--scope", "system/Patient.rs"])
        .args(extra);
        run_blocking(&mut cmd)
    };
    let (code, out, err) = add(&[]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = add(&[]);
    assert_eq!(code, 6, "duplicate → rejected input: {err}");
    assert!(err.contains("already registered"), "{err}");
    let (code, _, err) = add(&["--kind", "pharmacy"]);
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("kind"), "{err}");

    let (code, out, _) =
        run_blocking(yiqiao_in(&dir, &db.url).args(["institution", "show", "hosp-cli"]));
    assert_eq!(code, 0);
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["name"], "命令行医院");
    assert_eq!(shown["status"], "active");
    let (code, _, err) =
        run_blocking(yiqiao_in(&dir, &db.url).args(["institution", "show", "nope-1"]));
    assert_eq!(code, 5, "{err}");
    let (code, out, _) =
        run_blocking(yiqiao_in(&dir, &db.url).args(["institution", "suspend", "hosp-cli"]));
    assert_eq!(code, 0);
    assert!(out.contains("suspended"));
    let (code, out, _) = run_blocking(yiqiao_in(&dir, &db.url).args([
        "institution",
        "list",
        "--status",
        "suspended",
    ]));
    assert_eq!(code, 0);
    assert!(
        out.contains("hosp-cli") && out.contains("1 institution(s)"),
        "{out}"
    );
    let (code, _, _) = run_blocking(yiqiao_in(&dir, &db.url).args(["institution", "frobnicate"]));
    assert_eq!(code, 2, "usage error");
}

#[test]
fn cli_exit_codes_sqlite() {
    cli_exit_codes(Backend::Sqlite);
}

#[test]
fn cli_exit_codes_postgres() {
    cli_exit_codes(Backend::Postgres);
}

#[test]
fn config_show_masks_secrets_and_check_names_bad_keys() {
    let dir = TempDir::new();
    let file = dir.path.join("y.toml");
    std::fs::write(
        &file,
        "admin_token = \"s3cret-admin\"\n[database]\nurl = \"postgres://u:pw-42@db/x\"\n",
    )
    .unwrap();
    let (code, out, _) = run_blocking(
        yiqiao_in(&dir, "")
            .args(["--config", file.to_str().unwrap(), "config", "show"])
            .env_remove("YIQIAO_DATABASE_URL"),
    );
    assert_eq!(code, 0);
    assert!(
        !out.contains("s3cret-admin") && !out.contains("pw-42"),
        "{out}"
    );
    assert!(out.contains("postgres://u:***@db/x"), "{out}");
    std::fs::write(&file, "[database]\npool_size = -1\n").unwrap();
    let (code, _, err) = run_blocking(
        yiqiao_in(&dir, "")
            .args(["--config", file.to_str().unwrap(), "config", "check"])
            .env_remove("YIQIAO_DATABASE_URL"),
    );
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("database.pool_size"), "{err}");
    let (code, _, err) = run_blocking(
        yiqiao_in(&dir, "")
            .args(["config", "check"])
            .env("YIQIAO_LISTEN", "not-an-address"),
    );
    assert_eq!(code, 3);
    assert!(err.contains("listen"), "{err}");
    let (code, _, err) = run_blocking(yiqiao_in(&dir, "").args([
        "--config",
        "/no/such/file.toml",
        "config",
        "check",
    ]));
    assert_eq!(code, 3);
    assert!(err.contains("does not exist"), "{err}");
}

/// Issue 25: consent enforcement cannot be turned off by configuration — not by the
/// environment, not by the file — and the process says why at start; nor by code in a build
/// without the `bench-unenforced` feature.
/// `cmd` to the end within the deadline: (exit code, stdout, stderr).
async fn run(cmd: &mut tokio::process::Command) -> (i32, String, String) {
    let what = format!("`{}`", wait::describe(cmd));
    let out = wait::output(cmd, &what).await;
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn consent_enforcement_cannot_be_configured_off() {
    let dir = TempDir::new();
    let file = dir.path.join("y.toml");
    std::fs::write(&file, "[consent]\nenforce = false\n").unwrap();
    // `config check` first: before the refusal existed, `serve` would have served.
    let config = file.to_str().unwrap();
    let cases: [(&[&str], Option<&str>); 3] = [
        (&["config", "check"], Some("false")),
        (&["serve", "--listen", "127.0.0.1:0"], Some("false")),
        (
            &["--config", config, "serve", "--listen", "127.0.0.1:0"],
            None,
        ),
    ];
    for (args, env) in cases {
        let mut cmd = yiqiao_in(&dir, "");
        cmd.args(args).env_remove("YIQIAO_DATABASE_URL");
        if let Some(value) = env {
            cmd.env("YIQIAO_CONSENT__ENFORCE", value);
        }
        let (code, _, err) = run(&mut cmd).await;
        assert_eq!(code, 3, "{args:?}: {err}");
        assert!(err.contains("consent.enforce"), "{err}");
        assert!(err.contains("bench-unenforced"), "{err}");
    }
    let (code, _, err) = run(yiqiao_in(&dir, "")
        .args(["config", "check"])
        .env_remove("YIQIAO_DATABASE_URL")
        .env("YIQIAO_CONSENT__ENFORCE", "true"))
    .await;
    assert_eq!(code, 0, "{err}");
    // Code cannot either, in a build without the feature (tests never enable it).
    let db = TestDb::new(Backend::Sqlite);
    let mut settings = crate::helpers::test_settings(&db.url);
    settings.consent.enforce = false;
    let built = yiqiao_gateway::Application::build(settings).await;
    let err = built.err().expect("an unenforcing gateway started");
    assert!(err.to_string().contains("bench-unenforced"), "{err}");
}

/// The README's main command: `yiqiao demo` serves a registered demo region on SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_a_registered_region() {
    let dir = TempDir::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = wait::spawn(
        yiqiao_in(&dir, "")
            .env_remove("YIQIAO_DATABASE_URL")
            .env_remove("MALLOC_ARENA_MAX")
            .env_remove("GLIBC_TUNABLES")
            .env("YIQIAO_ADMIN_TOKEN", "demo-test-admin-token")
            .args([
                "demo",
                "--institutions",
                "8",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
        "`yiqiao demo`",
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = client();
    let orgs_url = format!("{base}/fhir/Organization?_count=50");
    let orgs: Value = wait::until(
        &format!("`yiqiao demo` to serve {orgs_url}"),
        wait::READY,
        || async {
            let resp = client.get(&orgs_url).send().await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            resp.json().await.ok()
        },
    )
    .await;
    // The process caps glibc's malloc arenas (it restarted itself with MALLOC_ARENA_MAX, same
    // pid), the fix for the soak's creeping resident memory.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let pid = child.id().expect("demo running");
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        let want = format!("MALLOC_ARENA_MAX={cores}");
        assert!(
            environ.split(|b| *b == 0).any(|v| v == want.as_bytes()),
            "`yiqiao demo` runs without {want}"
        );
    }
    // The walkthrough's federated query works: every simulated hospital of the person answers.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (_, stdout) = wait::line(
        &mut lines,
        "`yiqiao demo` to print its walkthrough (to \"Stop with Ctrl-C\")",
        wait::READY,
        |l| l.contains("Stop with Ctrl-C"),
    )
    .await;
    let person = stdout
        .split("/fhir/Observation?patient=")
        .nth(1)
        .and_then(|rest| rest.split('&').next())
        .unwrap_or_else(|| panic!("no federated query in {stdout}"))
        .to_string();
    let asker = stdout
        .split("X-On-Behalf-Of: ")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap_or_else(|| panic!("no requester in {stdout}"))
        .to_string();
    let resp = client
        .get(format!("{base}/fhir/Observation?patient={person}"))
        .bearer_auth("demo-test-admin-token")
        .header("X-On-Behalf-Of", &asker)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let bundle: Value = resp.json().await.unwrap();
    assert!(status.is_success(), "{status}: {bundle}");
    let entries = bundle["entry"].as_array().unwrap();
    assert!(
        entries.iter().any(|e| e["search"]["mode"] == "match"),
        "{bundle}"
    );
    let outcome = entries
        .iter()
        .find(|e| e["search"]["mode"] == "outcome")
        .unwrap();
    let summary = outcome["resource"]["issue"][0]["details"]["text"]
        .as_str()
        .unwrap();
    assert!(summary.contains(" 0 did not"), "{summary}");
    wait::kill(&mut child, "`yiqiao demo`").await;
    assert_eq!(orgs["entry"].as_array().unwrap().len(), 8, "{orgs}");
    assert!(stdout.contains("Walkthrough"), "{stdout}");
    assert!(stdout.contains("8 member institutions"), "{stdout}");
    assert!(dir.path.join("demo/keys/fz-004.sm2.pem").exists());
    assert!(dir.path.join("demo/yiqiao-demo.db").exists());
}

/// A minimal OTLP/HTTP receiver: records (path, content-type, body) of each POST.
fn otlp_receiver() -> (u16, std::sync::mpsc::Receiver<(String, String, Vec<u8>)>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                loop {
                    let mut request_line = String::new();
                    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                        return;
                    }
                    let path = request_line
                        .split_whitespace()
                        .nth(1)
                        .unwrap_or_default()
                        .to_string();
                    let (mut len, mut ct) = (0usize, String::new());
                    loop {
                        let mut line = String::new();
                        reader.read_line(&mut line).unwrap();
                        let line = line.trim_end();
                        if line.is_empty() {
                            break;
                        }
                        let (name, value) = line.split_once(':').unwrap_or((line, ""));
                        match name.to_ascii_lowercase().as_str() {
                            "content-length" => len = value.trim().parse().unwrap_or(0),
                            "content-type" => ct = value.trim().to_string(),
                            _ => {}
                        }
                    }
                    let mut body = vec![0; len];
                    reader.read_exact(&mut body).unwrap();
                    let _ = tx.send((path, ct, body));
                    let mut out = stream.try_clone().unwrap();
                    let _ = out.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n");
                }
            });
        }
    });
    (port, rx)
}

/// Traces reach an OpenTelemetry collector over OTLP/HTTP when configured (flushed at a graceful
/// SIGTERM shutdown); JSON logs are one JSON object per line and carry no query string.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_export_json_logs_and_graceful_shutdown() {
    let (otlp_port, spans) = otlp_receiver();
    let dir = TempDir::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let db = format!("sqlite://{}/y.db", dir.path.display());
    let child = wait::spawn(
        yiqiao_in(&dir, &db)
            .env(
                "YIQIAO_TELEMETRY__OTLP_ENDPOINT",
                format!("http://127.0.0.1:{otlp_port}"),
            )
            .env("YIQIAO_TELEMETRY__SERVICE_NAME", "yiqiao-under-test")
            .env("YIQIAO_LOG__FORMAT", "json")
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
        "`yiqiao serve`",
    );
    let url = format!("http://127.0.0.1:{port}/fhir/Organization?name=%E5%BC%A0%E4%B8%89");
    let client = client();
    wait::until(
        &format!("`yiqiao serve` to answer {url}"),
        wait::READY,
        || async {
            client
                .get(&url)
                .send()
                .await
                .ok()?
                .status()
                .is_success()
                .then_some(())
        },
    )
    .await;
    let pid = child.id().unwrap().to_string();
    let kill = wait::output(wait::command("kill").args(["-TERM", &pid]), "`kill -TERM`").await;
    assert!(kill.status.success());
    let out = wait::output_of(child, "`yiqiao serve` after SIGTERM", wait::EXIT).await;
    assert_eq!(out.status.code(), Some(0), "graceful shutdown exits 0");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in &lines {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v.get("level").is_some(), "{line}");
    }
    assert!(
        stderr.contains("\"route\":\"/fhir/Organization\""),
        "{stderr}"
    );
    assert!(
        !stderr.contains("张三") && !stderr.contains("%E5%BC%A0"),
        "query strings must not be logged"
    );

    let (path, ct, body) =
        tokio::task::spawn_blocking(move || spans.recv_timeout(std::time::Duration::from_secs(10)))
            .await
            .unwrap()
            .expect("no OTLP export within 10 s of the shutdown");
    assert_eq!(path, "/v1/traces");
    assert_eq!(ct, "application/x-protobuf");
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("yiqiao-under-test"),
        "service.name missing from the export"
    );
    assert!(
        text.contains("request"),
        "request span missing from the export"
    );
    assert!(!text.contains("%E5%BC%A0"));
}
