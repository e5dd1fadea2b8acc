//! Deadlines for everything these tests wait on (issue 25): a child process to finish, to print a
//! line or to exit, a port or URL to answer, a condition to hold. A wait that runs out fails the
//! test with a message naming what it waited for and for how long, instead of hanging the suite
//! until CI's limit. Children are `tokio::process` children with `kill_on_drop`: a test that
//! ends or fails (a panic drops them) kills the processes it started. Nothing here blocks an
//! async test thread; [`output_blocking`] is for synchronous tests and `spawn_blocking` closures.

use std::ffi::OsStr;
use std::fmt;
use std::future::Future;
use std::process::{ExitStatus, Output};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, Lines};
use tokio::process::{Child, Command};

/// A one-shot command (the `yiqiao` CLI, python3, openssl) finishes within this.
pub const RUN: Duration = Duration::from_secs(120);
/// A server (a child process, a port) is ready, or a child prints its first line, within this.
pub const READY: Duration = Duration::from_secs(60);
/// An HTTP request from a test's client is answered within this (the clients' timeout).
pub const REQUEST: Duration = Duration::from_secs(120);
/// A child asked to stop (SIGTERM) exits within this.
pub const EXIT: Duration = Duration::from_secs(30);

/// A wait that ran out (or whose child could not be started or read): the message says what was
/// waited for.
#[derive(Debug)]
pub struct Stuck(pub String);

impl fmt::Display for Stuck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn gave_up(what: &str, within: Duration) -> Stuck {
    Stuck(format!("gave up after {within:?} waiting for {what}"))
}

/// A command whose child is killed when it is dropped (the test ended or failed).
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.kill_on_drop(true);
    cmd
}

/// `program arg…` of `cmd`, for messages.
pub fn describe(cmd: &Command) -> String {
    let std = cmd.as_std();
    let program = std::path::Path::new(std.get_program());
    let name = program.file_name().unwrap_or(program.as_os_str());
    std::iter::once(name)
        .chain(std.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Start `cmd` (killed when dropped); panics naming `what` if it cannot start.
pub fn spawn(cmd: &mut Command, what: &str) -> Child {
    cmd.kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"))
}

/// Run `cmd` to the end (stdin closed, stdout and stderr captured) within `within`; the child is
/// killed if it does not finish in time.
pub async fn try_output(cmd: &mut Command, what: &str, within: Duration) -> Result<Output, Stuck> {
    match tokio::time::timeout(within, cmd.kill_on_drop(true).output()).await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) => Err(Stuck(format!("cannot run {what}: {e}"))),
        Err(_) => Err(gave_up(&format!("{what} to finish"), within)),
    }
}

/// [`try_output`] within [`RUN`]; panics if it runs out.
pub async fn output(cmd: &mut Command, what: &str) -> Output {
    try_output(cmd, what, RUN)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// [`output`] for a synchronous test or a `spawn_blocking` closure (a runtime of its own).
pub fn output_blocking(cmd: &mut Command, what: &str) -> Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(output(cmd, what))
}

/// The output of a started child (its stdout and stderr piped) within `within`; killed if not.
pub async fn output_of(child: Child, what: &str, within: Duration) -> Output {
    match tokio::time::timeout(within, child.wait_with_output()).await {
        Ok(out) => out.unwrap_or_else(|e| panic!("cannot read the output of {what}: {e}")),
        Err(_) => panic!("{}", gave_up(&format!("{what} to finish"), within)),
    }
}

/// Wait for `child` to exit within `within`; if it does not, kill it (and reap it).
pub async fn try_exit(
    child: &mut Child,
    what: &str,
    within: Duration,
) -> Result<ExitStatus, Stuck> {
    match tokio::time::timeout(within, child.wait()).await {
        Ok(status) => status.map_err(|e| Stuck(format!("cannot wait for {what}: {e}"))),
        Err(_) => {
            let _ = child.kill().await;
            Err(gave_up(&format!("{what} to exit"), within))
        }
    }
}

/// [`try_exit`]; panics if it runs out.
pub async fn exit(child: &mut Child, what: &str, within: Duration) -> ExitStatus {
    try_exit(child, what, within)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// SIGKILL `child` and reap it.
pub async fn kill(child: &mut Child, what: &str) {
    // An error here means it was already reaped: nothing left to kill.
    let _ = child.start_kill();
    exit(child, what, EXIT).await;
}

/// Read lines until one satisfies `wanted`, within `within`: (that line, everything read up
/// to and including it). Fails on the deadline and on the end of the output, showing what was
/// read.
pub async fn try_line<R: AsyncBufRead + Unpin>(
    lines: &mut Lines<R>,
    what: &str,
    within: Duration,
    wanted: impl Fn(&str) -> bool,
) -> Result<(String, String), Stuck> {
    let deadline = tokio::time::Instant::now() + within;
    let mut read = String::new();
    loop {
        match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                read.push_str(&line);
                read.push('\n');
                if wanted(&line) {
                    return Ok((line, read));
                }
            }
            Ok(Ok(None)) => {
                return Err(Stuck(format!(
                    "{what}: the output ended first; it printed {read:?}"
                )));
            }
            Ok(Err(e)) => return Err(Stuck(format!("cannot read {what}: {e}"))),
            Err(_) => {
                return Err(Stuck(format!(
                    "{}; it printed {read:?}",
                    gave_up(what, within)
                )));
            }
        }
    }
}

/// [`try_line`]; panics if it fails.
pub async fn line<R: AsyncBufRead + Unpin>(
    lines: &mut Lines<R>,
    what: &str,
    within: Duration,
    wanted: impl Fn(&str) -> bool,
) -> (String, String) {
    try_line(lines, what, within, wanted)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Poll `probe` (every 100 ms) until it gives a value, within `within`.
pub async fn try_until<T, F: Future<Output = Option<T>>>(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> F,
) -> Result<T, Stuck> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // A probe that itself hangs (a connection accepted and never answered) counts too.
        if let Ok(Some(value)) = tokio::time::timeout(left, probe()).await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(gave_up(what, within));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// [`try_until`]; panics if it runs out.
pub async fn until<T, F: Future<Output = Option<T>>>(
    what: &str,
    within: Duration,
    probe: impl FnMut() -> F,
) -> T {
    try_until(what, within, probe)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Wait until `GET <base>/readyz` answers 200, within [`READY`].
pub async fn ready(client: &reqwest::Client, base: &str, what: &str) {
    let url = format!("{base}/readyz");
    until(&format!("{what} to answer 200 at {url}"), READY, || async {
        let resp = client.get(&url).send().await.ok()?;
        (resp.status() == 200).then_some(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::process::Stdio;

    use tokio::io::BufReader;

    use super::*;

    /// A process is gone once it is reaped or left a zombie.
    fn gone(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        }
    }

    async fn silent_child() -> Child {
        // Holds its stdout open and prints nothing, like the provider that hung in issue 25.
        spawn(
            command("sleep").arg("300").stdout(Stdio::piped()),
            "sleep 300",
        )
    }

    #[tokio::test]
    async fn a_child_that_never_prints_fails_within_the_deadline_naming_what_was_awaited() {
        let mut child = silent_child().await;
        let pid = child.id().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let started = Instant::now();
        let err = try_line(
            &mut lines,
            "the silent child to print its ISSUER line",
            Duration::from_secs(1),
            |l| l.starts_with("ISSUER "),
        )
        .await
        .unwrap_err();
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(1) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        assert_eq!(
            err.0,
            "gave up after 1s waiting for the silent child to print its ISSUER line; it printed \"\""
        );
        // The test is over: dropping the child kills it.
        drop(lines);
        drop(child);
        let killed = try_until(
            "the dropped child to die",
            Duration::from_secs(5),
            || async { gone(pid).then_some(()) },
        )
        .await;
        assert!(killed.is_ok(), "the dropped child {pid} still runs");
    }

    #[tokio::test]
    async fn a_command_that_never_finishes_is_killed_at_the_deadline() {
        let started = Instant::now();
        let err = try_output(
            command("sleep").arg("300"),
            "sleep 300",
            Duration::from_millis(500),
        )
        .await
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(err.0, "gave up after 500ms waiting for sleep 300 to finish");

        let mut child = silent_child().await;
        let pid = child.id().unwrap();
        let err = try_exit(&mut child, "sleep 300", Duration::from_millis(500))
            .await
            .unwrap_err();
        assert_eq!(err.0, "gave up after 500ms waiting for sleep 300 to exit");
        assert!(gone(pid), "try_exit killed and reaped it");
    }

    #[tokio::test]
    async fn a_port_that_accepts_and_never_answers_fails_the_readiness_wait() {
        // Accepts connections, never answers: a probe that hangs is cut at the deadline.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let _accept = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        let client = reqwest::Client::new();
        let started = Instant::now();
        let err = try_until("the mute server", Duration::from_secs(1), || async {
            client.get(format!("{base}/readyz")).send().await.ok()
        })
        .await
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(err.0, "gave up after 1s waiting for the mute server");
    }
}
