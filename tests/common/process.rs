//! Running the real `spray` binary from tests: servers on free ports, polled until
//! healthy, killed and reaped by PID when dropped (also when a test panics), and one-shot
//! commands bounded in time.
#![allow(dead_code)]

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use tokio::time::timeout;

pub const SPRAY: &str = env!("CARGO_BIN_EXE_spray");

/// Health polls before a server counts as failed to start, one every `POLL_EVERY`.
pub const HEALTH_POLLS: u32 = 600;
pub const POLL_EVERY: Duration = Duration::from_millis(50);
/// Ports tried when the one picked was taken between choosing it and binding it.
pub const PORT_ATTEMPTS: u32 = 3;
/// The longest a single HTTP request may take.
pub const REQUEST_LIMIT: Duration = Duration::from_secs(30);
/// The longest a server may take to drain and exit after SIGTERM.
pub const STOP_LIMIT: Duration = Duration::from_secs(20);
/// The longest a one-shot command (`spray audit`, `spray migrate`) may run.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(60);
/// How quickly `spray serve` with a bad setting must give up.
pub const REFUSAL_LIMIT: Duration = Duration::from_secs(15);

/// A child process that is killed (SIGKILL, by its PID) and reaped when dropped, so no
/// process outlives the test, even one that panics.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // A child already reaped is not signalled again (std guards against PID reuse).
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl ChildGuard {
    /// Polls for the child's exit for at most `limit`; `None` if it is still running.
    pub async fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        timeout(limit, async {
            loop {
                match self.0.try_wait() {
                    Ok(Some(status)) => return status,
                    Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
                    Err(e) => panic!("cannot wait for pid {}: {e}", self.0.id()),
                }
            }
        })
        .await
        .ok()
    }
}

/// A `spray` command with no `SPRAY_*` variable inherited from the test's environment.
pub fn spray_command() -> Command {
    let mut command = Command::new(SPRAY);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SPRAY_") {
            command.env_remove(name);
        }
    }
    command.stdin(Stdio::null());
    command
}

pub fn database_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("spray.db").display())
}

/// A port that was free a moment ago (the listener is dropped before the server binds it).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("the ephemeral port").port()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(REQUEST_LIMIT)
        .no_proxy()
        .build()
        .expect("an HTTP client")
}

/// A running `spray serve`, its stdout and stderr in a log file in the test's directory.
pub struct Server {
    pub child: ChildGuard,
    pub base: String,
    pub log: PathBuf,
}

impl Server {
    /// Starts `spray serve` on a free port and polls `/healthz` until it answers 200.
    pub async fn start(dir: &Path, database_url: &str, flags: &[&str], env: &[(&str, &str)]) -> Server {
        for attempt in 1..=PORT_ATTEMPTS {
            let address = format!("127.0.0.1:{}", free_port());
            let log = dir.join(format!("serve-{}.log", address.replace([':', '.'], "-")));
            let out = File::create(&log).expect("create the server log");
            let err = out.try_clone().expect("share the server log");
            let child = spray_command()
                .args(["serve", "--listen", &address, "--database-url", database_url])
                .args(flags)
                .envs(env.iter().copied())
                .stdout(out)
                .stderr(err)
                .spawn()
                .expect("spawn spray serve");
            let mut server = Server {
                child: ChildGuard(child),
                base: format!("http://{address}"),
                log,
            };
            match server.wait_until_healthy().await {
                Ok(()) => return server,
                // Someone took the port between free_port() and the bind: try another.
                Err(_) if attempt < PORT_ATTEMPTS && server.log_text().contains("cannot listen") => continue,
                Err(e) => panic!(
                    "spray serve did not start: {e}\n--- log ---\n{}",
                    server.log_text()
                ),
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    pub async fn wait_until_healthy(&mut self) -> Result<(), String> {
        let health = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .no_proxy()
            .build()
            .expect("an HTTP client");
        let url = format!("{}/healthz", self.base);
        for _ in 0..HEALTH_POLLS {
            if let Some(status) = self.child.0.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("exited early with {status}"));
            }
            if let Ok(answer) = health.get(&url).send().await
                && answer.status() == reqwest::StatusCode::OK
            {
                return Ok(());
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        Err(format!("/healthz not 200 after {HEALTH_POLLS} polls"))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to drain, flush or close anything.
    pub async fn kill_9(&mut self) {
        self.child.0.kill().expect("SIGKILL the server");
        self.child
            .wait_for_exit(STOP_LIMIT)
            .await
            .expect("a SIGKILLed server is gone at once");
    }

    /// SIGTERM (sent by the `kill` command), then the exit status, within `STOP_LIMIT`.
    pub async fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.0.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        match self.child.wait_for_exit(STOP_LIMIT).await {
            Some(status) => status,
            None => panic!(
                "spray serve still running {STOP_LIMIT:?} after SIGTERM\n--- log ---\n{}",
                self.log_text()
            ),
        }
    }
}

/// What a one-shot command printed, and how it ended.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `spray <args>` to completion within `limit`, output kept in files in `dir`.
pub async fn run_spray(
    dir: &Path,
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
    limit: Duration,
) -> Finished {
    let stdout_path = dir.join(format!("{name}.stdout"));
    let stderr_path = dir.join(format!("{name}.stderr"));
    let child = spray_command()
        .args(args)
        .envs(env.iter().copied())
        .stdout(File::create(&stdout_path).expect("create stdout file"))
        .stderr(File::create(&stderr_path).expect("create stderr file"))
        .spawn()
        .expect("spawn spray");
    let mut child = ChildGuard(child);
    let status = child
        .wait_for_exit(limit)
        .await
        .unwrap_or_else(|| panic!("spray {args:?} still running after {limit:?}"));
    Finished {
        status,
        stdout: std::fs::read_to_string(&stdout_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&stderr_path).unwrap_or_default(),
    }
}

/// Starts `spray serve` with `flags` and `env` on a SQLite file in `dir` and asserts that
/// it refuses to start: a non-zero exit within [`REFUSAL_LIMIT`], `says` on stderr, and no
/// database file written. `what` names the case in failures.
pub async fn assert_refuses_to_start(
    dir: &Path,
    what: &str,
    flags: &[&str],
    env: &[(&str, &str)],
    says: &str,
) {
    let never = dir.join("never.db");
    let url = format!("sqlite://{}", never.display());
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--database-url", &url];
    args.extend_from_slice(flags);
    let name: String = what
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let run = run_spray(dir, &format!("refused-{name}"), &args, env, REFUSAL_LIMIT).await;
    assert!(
        !run.status.success(),
        "{what}: spray serve exited with {}",
        run.status
    );
    assert!(
        run.stderr.contains(says),
        "{what}: stderr does not say why:\n{}",
        run.stderr
    );
    assert!(!never.exists(), "{what}: a database was created");
}
