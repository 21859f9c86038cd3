//! Durability, black-box: the real `spray` binary is killed with SIGKILL while receipts
//! are in flight, restarted on the same SQLite file, and must still hold every receipt it
//! acknowledged, with the money invariants intact (`spray audit`).

use std::collections::HashMap;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::timeout;

const SPRAY: &str = env!("CARGO_BIN_EXE_spray");

/// Health polls before a server counts as failed to start, one every `POLL_EVERY`.
const HEALTH_POLLS: u32 = 600;
const POLL_EVERY: Duration = Duration::from_millis(50);
/// Ports tried when the one picked was taken between choosing it and binding it.
const PORT_ATTEMPTS: u32 = 3;
/// The longest a single HTTP request may take.
const REQUEST_LIMIT: Duration = Duration::from_secs(30);
/// The longest a server may take to drain and exit after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(20);
/// The longest a one-shot command (`spray audit`) may run.
const COMMAND_LIMIT: Duration = Duration::from_secs(60);
/// The whole test, whatever happens inside it.
const TEST_LIMIT: Duration = Duration::from_secs(240);

const SPRAYER: i64 = 1;
const ROOM: &str = "R";
const AMOUNT: u64 = 1_000_000;
const SHARES: u64 = 300;
/// Receivers run at once: fewer than the shares, so nobody is refused for exhaustion.
const RECEIVERS: i64 = 200;
const FIRST_RECEIVER: i64 = 2;
/// The server is killed once this many receipts have been acknowledged.
const ACKS_BEFORE_KILL: usize = 50;

/// A child process that is killed (SIGKILL, by its PID) and reaped when dropped, so no
/// process outlives the test, even one that panics.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // A child already reaped is not signalled again (std guards against PID reuse).
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl ChildGuard {
    /// Polls for the child's exit for at most `limit`; `None` if it is still running.
    async fn wait_for_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
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
fn spray_command() -> Command {
    let mut command = Command::new(SPRAY);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SPRAY_") {
            command.env_remove(name);
        }
    }
    command.stdin(Stdio::null());
    command
}

fn database_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("spray.db").display())
}

/// A port that was free a moment ago (the listener is dropped before the server binds it).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("the ephemeral port").port()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(REQUEST_LIMIT)
        .no_proxy()
        .build()
        .expect("an HTTP client")
}

/// A running `spray serve`, its stdout and stderr in a log file in the test's directory.
struct Server {
    child: ChildGuard,
    base: String,
    log: PathBuf,
}

impl Server {
    /// Starts `spray serve` on a free port and polls `/healthz` until it answers 200.
    async fn start(dir: &Path, database_url: &str, flags: &[&str], env: &[(&str, &str)]) -> Server {
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

    async fn wait_until_healthy(&mut self) -> Result<(), String> {
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

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to drain, flush or close anything.
    async fn kill_9(&mut self) {
        self.child.0.kill().expect("SIGKILL the server");
        self.child
            .wait_for_exit(STOP_LIMIT)
            .await
            .expect("a SIGKILLed server is gone at once");
    }

    /// SIGTERM (sent by the `kill` command), then the exit status, within `STOP_LIMIT`.
    async fn terminate(&mut self) -> ExitStatus {
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
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `spray <args>` to completion within `COMMAND_LIMIT`, output kept in files in `dir`.
async fn run_spray(dir: &Path, name: &str, args: &[&str]) -> Finished {
    let stdout_path = dir.join(format!("{name}.stdout"));
    let stderr_path = dir.join(format!("{name}.stderr"));
    let child = spray_command()
        .args(args)
        .stdout(File::create(&stdout_path).expect("create stdout file"))
        .stderr(File::create(&stderr_path).expect("create stderr file"))
        .spawn()
        .expect("spawn spray");
    let mut child = ChildGuard(child);
    let status = child
        .wait_for_exit(COMMAND_LIMIT)
        .await
        .unwrap_or_else(|| panic!("spray {args:?} still running after {COMMAND_LIMIT:?}"));
    Finished {
        status,
        stdout: std::fs::read_to_string(&stdout_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&stderr_path).unwrap_or_default(),
    }
}

fn json_u64(value: &Value, what: &str) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("{what} is not an unsigned integer: {value}"))
}

fn json_i64(value: &Value, what: &str) -> i64 {
    value
        .as_i64()
        .unwrap_or_else(|| panic!("{what} is not an integer: {value}"))
}

/// What the receivers saw: the receipts acknowledged with 200, and everything else.
#[derive(Default)]
struct Outcomes {
    acknowledged: Vec<(i64, u64)>,
    other_statuses: HashMap<u16, usize>,
    transport_errors: usize,
    finished: usize,
}

/// How one receive ended, as the client saw it.
enum Outcome {
    /// 200, with the amount received.
    Acknowledged(u64),
    /// Any other status.
    Refused(u16),
    /// No complete answer: the server died first.
    Lost,
}

/// One receiver: POST /api/v1/receive, and record what came back.
async fn receive(
    client: reqwest::Client,
    url: String,
    token: String,
    user: i64,
    outcomes: Arc<Mutex<Outcomes>>,
    progress: tokio::sync::watch::Sender<()>,
) {
    let answer = client
        .post(url)
        .header("x-user-id", user.to_string())
        .header("x-room-id", ROOM)
        .json(&json!({ "token": token }))
        .send()
        .await;
    // A receipt counts as acknowledged only once the whole 200 answer has been read.
    let outcome = match answer {
        Ok(answer) if answer.status() == reqwest::StatusCode::OK => match answer.json::<Value>().await {
            Ok(body) => Outcome::Acknowledged(json_u64(&body["received_amount"], "received_amount")),
            Err(_) => Outcome::Lost,
        },
        Ok(answer) => Outcome::Refused(answer.status().as_u16()),
        Err(_) => Outcome::Lost,
    };
    {
        let mut outcomes = outcomes.lock().expect("outcomes lock");
        match outcome {
            Outcome::Acknowledged(amount) => outcomes.acknowledged.push((user, amount)),
            Outcome::Refused(status) => *outcomes.other_statuses.entry(status).or_default() += 1,
            Outcome::Lost => outcomes.transport_errors += 1,
        }
        outcomes.finished += 1;
    }
    progress.send_replace(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_receipts_survive_kill_9() {
    timeout(TEST_LIMIT, kill_9_scenario())
        .await
        .expect("the kill -9 scenario finished in time");
}

async fn kill_9_scenario() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let database_url = database_url(dir.path());
    let client = client();

    let mut server = Server::start(dir.path(), &database_url, &[], &[]).await;
    let created = client
        .post(server.url("/api/v1/spray"))
        .header("x-user-id", SPRAYER.to_string())
        .header("x-room-id", ROOM)
        .json(&json!({ "amount": AMOUNT, "recipient_count": SHARES }))
        .send()
        .await
        .expect("create the spray");
    assert_eq!(created.status(), reqwest::StatusCode::CREATED);
    let created: Value = created.json().await.expect("the creation answer");
    let token = created["token"].as_str().expect("a token").to_owned();

    // Every receiver at once; each reports to `outcomes` and nudges `progress`.
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let (progress, mut watch_progress) = tokio::sync::watch::channel(());
    let mut receivers = tokio::task::JoinSet::new();
    for user in FIRST_RECEIVER..FIRST_RECEIVER + RECEIVERS {
        receivers.spawn(receive(
            client.clone(),
            server.url("/api/v1/receive"),
            token.clone(),
            user,
            outcomes.clone(),
            progress.clone(),
        ));
    }
    drop(progress);

    // Kill as soon as enough receipts are acknowledged, with the rest still in flight.
    let enough = |o: &Outcomes| o.acknowledged.len() >= ACKS_BEFORE_KILL || o.finished == receivers.len();
    timeout(REQUEST_LIMIT, async {
        while !enough(&outcomes.lock().expect("outcomes lock")) {
            watch_progress.changed().await.expect("receivers still running");
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "fewer than {ACKS_BEFORE_KILL} receipts in {REQUEST_LIMIT:?}\n--- log ---\n{}",
            server.log_text()
        )
    });
    server.kill_9().await;
    let acknowledged_at_kill = outcomes.lock().expect("outcomes lock").acknowledged.len();

    // The requests still in flight now fail (or deliver answers already sent).
    timeout(REQUEST_LIMIT + Duration::from_secs(5), async {
        while let Some(joined) = receivers.join_next().await {
            joined.expect("a receiver task");
        }
    })
    .await
    .expect("every receiver finished after the kill");
    let outcomes = std::mem::take(&mut *outcomes.lock().expect("outcomes lock"));
    eprintln!(
        "acknowledged {} ({acknowledged_at_kill} when killed), transport errors {}, other statuses {:?}",
        outcomes.acknowledged.len(),
        outcomes.transport_errors,
        outcomes.other_statuses
    );
    assert!(
        outcomes.acknowledged.len() >= ACKS_BEFORE_KILL,
        "only {} receipts acknowledged before the kill; statuses {:?}\n--- log ---\n{}",
        outcomes.acknowledged.len(),
        outcomes.other_statuses,
        server.log_text()
    );
    drop(server);

    // Restart on the same file; the recovery of the WAL is the store's job.
    let mut server = Server::start(dir.path(), &database_url, &[], &[]).await;
    let lookup = client
        .get(server.url(&format!("/api/v1/spray/{token}")))
        .header("x-user-id", SPRAYER.to_string())
        .header("x-room-id", ROOM)
        .send()
        .await
        .expect("look the spray up after the restart");
    assert_eq!(lookup.status(), reqwest::StatusCode::OK);
    let spray: Value = lookup.json().await.expect("the lookup answer");
    assert_eq!(json_u64(&spray["total_amount"], "total_amount"), AMOUNT);
    assert_eq!(json_u64(&spray["recipient_count"], "recipient_count"), SHARES);

    let recipients = spray["recipients"].as_array().expect("recipients");
    let mut received: HashMap<i64, u64> = HashMap::new();
    for recipient in recipients {
        let user = json_i64(&recipient["user_id"], "user_id");
        let amount = json_u64(&recipient["amount"], "amount");
        assert!(
            (FIRST_RECEIVER..FIRST_RECEIVER + RECEIVERS).contains(&user),
            "user {user} never asked for a share"
        );
        assert!(
            received.insert(user, amount).is_none(),
            "user {user} received twice"
        );
    }
    for (user, amount) in &outcomes.acknowledged {
        assert_eq!(
            received.get(user),
            Some(amount),
            "the receipt of {amount} acknowledged to user {user} was lost by kill -9"
        );
    }
    eprintln!(
        "after the restart: {} recipients, {} of them acknowledged",
        received.len(),
        outcomes.acknowledged.len()
    );
    let sum = received
        .values()
        .copied()
        .fold(0_u64, |sum, amount| sum.checked_add(amount).expect("no overflow"));
    assert_eq!(sum, json_u64(&spray["received_amount"], "received_amount"));
    assert!(sum <= AMOUNT);

    // A user whose receipt was acknowledged is refused a second one, after the crash too.
    let (user, _) = outcomes.acknowledged[0];
    let again = client
        .post(server.url("/api/v1/receive"))
        .header("x-user-id", user.to_string())
        .header("x-room-id", ROOM)
        .json(&json!({ "token": token }))
        .send()
        .await
        .expect("receive again");
    assert_eq!(again.status(), reqwest::StatusCode::CONFLICT);
    let again: Value = again.json().await.expect("a problem document");
    assert_eq!(again["code"], "ALREADY_RECEIVED");

    // Someone who never asked before can still receive: the store works after recovery.
    let newcomer = FIRST_RECEIVER + RECEIVERS;
    let fresh = client
        .post(server.url("/api/v1/receive"))
        .header("x-user-id", newcomer.to_string())
        .header("x-room-id", ROOM)
        .json(&json!({ "token": token }))
        .send()
        .await
        .expect("a fresh receipt after the restart");
    assert_eq!(fresh.status(), reqwest::StatusCode::OK);

    let status = server.terminate().await;
    assert!(status.success(), "the restarted server stopped with {status}");

    let audit = run_spray(dir.path(), "audit", &["audit", "--database-url", &database_url]).await;
    assert!(
        audit.status.success(),
        "spray audit failed after kill -9 ({}):\n{}\n{}",
        audit.status,
        audit.stdout,
        audit.stderr
    );
    assert!(audit.stdout.contains("audit clean"), "{}", audit.stdout);
}
