//! The command line, black-box: `spray serve`, `spray migrate` and `spray audit` run as
//! the real binary, each test in its own directory with its own SQLite file.

mod common;

use common::process::*;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::timeout;

/// Each test as a whole, whatever happens inside it.
const TEST_LIMIT: Duration = Duration::from_secs(240);

const SPRAYER: i64 = 1;
const ROOM: &str = "R";

/// Answers as status and JSON body (`Null` when the body is not JSON).
async fn answer(response: reqwest::Response) -> (u16, Option<String>, Value) {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let raw = response.bytes().await.expect("an answer body");
    (
        status,
        content_type,
        serde_json::from_slice(&raw).unwrap_or(Value::Null),
    )
}

/// POST `body` as JSON to `path` as `user` in `ROOM`.
async fn post(
    client: &reqwest::Client,
    server: &Server,
    path: &str,
    user: i64,
    body: &Value,
) -> (u16, Value) {
    let response = client
        .post(server.url(path))
        .header("x-user-id", user.to_string())
        .header("x-room-id", ROOM)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}\n--- log ---\n{}", server.log_text()));
    let (status, _, body) = answer(response).await;
    (status, body)
}

/// Sprays as `SPRAYER` in `ROOM`; returns the token.
async fn spray(client: &reqwest::Client, server: &Server, body: &Value) -> String {
    let (status, answer) = post(client, server, "/api/v1/spray", SPRAYER, body).await;
    assert_eq!(status, 201, "spray {body} refused: {answer}");
    answer["token"].as_str().expect("a token").to_owned()
}

async fn receive(client: &reqwest::Client, server: &Server, token: &str, user: i64) {
    let (status, answer) = post(
        client,
        server,
        "/api/v1/receive",
        user,
        &json!({ "token": token }),
    )
    .await;
    assert_eq!(
        status, 200,
        "user {user} could not receive from {token}: {answer}"
    );
}

/// A store in `dir` written by the real server, which is then stopped. In room `R`, by
/// user 1:
/// - 1000 over 3 shares, every share received (users 2, 3, 4): completed;
/// - 500 over 4 shares, two received (users 2, 3): active;
/// - 777 over 5 shares in random mode, one received (user 2): active.
///
/// The corruptions below find these sprays by their amounts.
async fn populated_store(dir: &Path) -> String {
    let url = database_url(dir);
    let mut server = Server::start(dir, &url, &[], &[]).await;
    let client = client();
    let sprays: [(Value, &[i64]); 3] = [
        (json!({ "amount": 1000, "recipient_count": 3 }), &[2, 3, 4]),
        (json!({ "amount": 500, "recipient_count": 4 }), &[2, 3]),
        (
            json!({ "amount": 777, "recipient_count": 5, "mode": "random" }),
            &[2],
        ),
    ];
    for (body, receivers) in sprays {
        let token = spray(&client, &server, &body).await;
        for user in receivers {
            receive(&client, &server, &token, *user).await;
        }
    }
    let status = server.terminate().await;
    assert!(
        status.success(),
        "the server stopped with {status}\n{}",
        server.log_text()
    );
    url
}

async fn audit(dir: &Path, name: &str, database_url: &str) -> Finished {
    run_spray(
        dir,
        name,
        &["audit", "--database-url", database_url],
        &[],
        COMMAND_LIMIT,
    )
    .await
}

/// The names of the checks the audit summary marks `FAIL (n) <name>`.
fn failed_checks(summary: &str) -> Vec<&str> {
    summary
        .lines()
        .filter_map(|line| line.strip_prefix("FAIL ("))
        .filter_map(|rest| rest.split_once(')'))
        .map(|(_, name)| name.trim())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_passes_on_a_healthy_store() {
    timeout(TEST_LIMIT, async {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = populated_store(dir.path()).await;

        let audit = audit(dir.path(), "audit", &url).await;
        assert_eq!(
            audit.status.code(),
            Some(0),
            "spray audit on a healthy store:\n{}\n{}",
            audit.stdout,
            audit.stderr
        );
        assert!(audit.stdout.contains("audit clean"), "{}", audit.stdout);
        assert!(failed_checks(&audit.stdout).is_empty(), "{}", audit.stdout);
        // The totals say what was audited.
        let lines: Vec<&str> = audit.stdout.lines().map(str::trim).collect();
        for total in ["sprays: 3", "shares: 12", "received shares: 6", "debited: 2277"] {
            assert!(lines.contains(&total), "no line `{total}` in:\n{}", audit.stdout);
        }
    })
    .await
    .expect("the test finished in time");
}

/// One way to break the store behind the service's back, and the check that must notice.
struct Corruption {
    what: &'static str,
    sql: &'static str,
    breaks: &'static str,
}

const CORRUPTIONS: &[Corruption] = &[
    Corruption {
        what: "an unreceived share of the 500 spray grows by 1",
        sql: "UPDATE shares SET amount = amount + 1
              WHERE spray_id = (SELECT id FROM sprays WHERE total_amount = 500)
                AND slot = (SELECT MAX(slot) FROM shares
                            WHERE spray_id = (SELECT id FROM sprays WHERE total_amount = 500)
                              AND receiver_id IS NULL)",
        breaks: "the shares of each spray sum to its amount",
    },
    Corruption {
        what: "a received share of the 1000 spray is given to the sprayer",
        sql: "UPDATE shares SET receiver_id = (SELECT owner_id FROM sprays WHERE id = shares.spray_id)
              WHERE spray_id = (SELECT id FROM sprays WHERE total_amount = 1000)
                AND slot = (SELECT MIN(slot) FROM shares
                            WHERE spray_id = (SELECT id FROM sprays WHERE total_amount = 1000))",
        breaks: "no sprayer receives from their own spray",
    },
    Corruption {
        // `receive_until` itself is the first instant outside the window (`now < until`).
        what: "the receipts of the 500 spray are dated at the end of its receive window",
        sql: "UPDATE shares SET received_at = (SELECT receive_until FROM sprays WHERE id = shares.spray_id)
              WHERE spray_id = (SELECT id FROM sprays WHERE total_amount = 500)
                AND receiver_id IS NOT NULL",
        breaks: "every receipt is inside its spray's receive window",
    },
    Corruption {
        what: "a receipt of the 777 spray is dated an hour after its receive window",
        sql: "UPDATE shares SET received_at = (SELECT receive_until FROM sprays WHERE id = shares.spray_id) + 3600000
              WHERE spray_id = (SELECT id FROM sprays WHERE total_amount = 777)
                AND receiver_id IS NOT NULL",
        breaks: "every receipt is inside its spray's receive window",
    },
    Corruption {
        what: "one CREDIT of the 1000 spray is deleted",
        sql: "DELETE FROM ledger
              WHERE id = (SELECT MIN(id) FROM ledger
                          WHERE kind = 'CREDIT'
                            AND spray_id = (SELECT id FROM sprays WHERE total_amount = 1000))",
        breaks: "each received share has one CREDIT of its amount to its receiver",
    },
    Corruption {
        what: "a REFUND of 1 to the sprayer of the half-received 500 spray",
        sql: "INSERT INTO ledger (spray_id, kind, user_id, amount, at)
              SELECT id, 'REFUND', owner_id, 1, receive_until FROM sprays WHERE total_amount = 500",
        breaks: "settled sprays balance: debit = credits + refund",
    },
    Corruption {
        what: "an unreceived share of the 500 spray is deleted",
        sql: "DELETE FROM shares
              WHERE spray_id = (SELECT id FROM sprays WHERE total_amount = 500)
                AND slot = (SELECT MAX(slot) FROM shares
                            WHERE spray_id = (SELECT id FROM sprays WHERE total_amount = 500)
                              AND receiver_id IS NULL)",
        breaks: "each spray has as many shares as recipient_count",
    },
    Corruption {
        what: "a CREDIT of the 777 spray to a user who received nothing",
        sql: "INSERT INTO ledger (spray_id, kind, user_id, amount, at)
              SELECT id, 'CREDIT', 999, 1, created_at FROM sprays WHERE total_amount = 777",
        breaks: "no CREDIT without a received share",
    },
    Corruption {
        what: "a second DEBIT of the 1000 spray, from someone else",
        sql: "INSERT INTO ledger (spray_id, kind, user_id, amount, at)
              SELECT id, 'DEBIT', 999, total_amount, created_at FROM sprays WHERE total_amount = 1000",
        breaks: "each spray has exactly one DEBIT of its amount, from its sprayer",
    },
    Corruption {
        what: "the CREDIT of the 777 spray grows past its DEBIT",
        sql: "UPDATE ledger SET amount = amount + 1000
              WHERE kind = 'CREDIT' AND spray_id = (SELECT id FROM sprays WHERE total_amount = 777)",
        breaks: "open sprays never pay out more than was debited: debit >= credits",
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_fails_on_a_store_corrupted_on_purpose() {
    timeout(TEST_LIMIT, async {
        for corruption in CORRUPTIONS {
            assert!(
                spray::audit::CHECKS
                    .iter()
                    .any(|check| check.name == corruption.breaks),
                "no audit check is named {:?} (this test is out of date)",
                corruption.breaks
            );
            let dir = tempfile::tempdir().expect("a temporary directory");
            let url = populated_store(dir.path()).await;

            let pool = sqlx::SqlitePool::connect(&url)
                .await
                .expect("open the store directly");
            let done = sqlx::query(corruption.sql)
                .execute(&pool)
                .await
                .unwrap_or_else(|e| panic!("{}: the corruption was refused: {e}", corruption.what));
            assert!(
                done.rows_affected() >= 1,
                "{}: the corruption changed nothing",
                corruption.what
            );
            pool.close().await;

            let audit = audit(dir.path(), "audit", &url).await;
            assert_eq!(
                audit.status.code(),
                Some(1),
                "{}: spray audit should fail its checks (exit 1):\n{}\n{}",
                corruption.what,
                audit.stdout,
                audit.stderr
            );
            assert!(
                failed_checks(&audit.stdout).contains(&corruption.breaks),
                "{}: the audit did not fail `{}`:\n{}",
                corruption.what,
                corruption.breaks,
                audit.stdout
            );
            assert!(audit.stdout.contains("audit FAILED"), "{}", audit.stdout);
        }
    })
    .await
    .expect("the test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_the_database_file_and_is_idempotent() {
    timeout(TEST_LIMIT, async {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("fresh.db");
        let url = format!("sqlite://{}", path.display());
        assert!(!path.exists());

        for round in ["first", "second"] {
            let migrate = run_spray(
                dir.path(),
                round,
                &["migrate", "--database-url", &url],
                &[],
                COMMAND_LIMIT,
            )
            .await;
            assert_eq!(
                migrate.status.code(),
                Some(0),
                "{round} spray migrate:\n{}\n{}",
                migrate.stdout,
                migrate.stderr
            );
            assert!(
                migrate.stdout.contains("migrations applied"),
                "{}",
                migrate.stdout
            );
            assert!(
                path.is_file(),
                "{round} spray migrate left no file at {}",
                path.display()
            );
        }

        // Each migration is recorded once, and the schema is there and empty.
        let pool = sqlx::SqlitePool::connect(&url)
            .await
            .expect("open the migrated store");
        let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
            .fetch_one(&pool)
            .await
            .expect("the migrations table");
        let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite"))
            .expect("the migrations folder")
            .count();
        assert_eq!(usize::try_from(applied).ok(), Some(files));
        for (table, sql) in [
            ("sprays", "SELECT COUNT(*) FROM sprays"),
            ("shares", "SELECT COUNT(*) FROM shares"),
            ("ledger", "SELECT COUNT(*) FROM ledger"),
        ] {
            let rows: i64 = sqlx::query_scalar(sql)
                .fetch_one(&pool)
                .await
                .unwrap_or_else(|e| panic!("table {table}: {e}"));
            assert_eq!(rows, 0, "table {table}");
        }
        pool.close().await;

        let audit = audit(dir.path(), "audit", &url).await;
        assert_eq!(audit.status.code(), Some(0), "{}\n{}", audit.stdout, audit.stderr);
    })
    .await
    .expect("the test finished in time");
}

/// A setting the binary must refuse before it serves, and what its error must mention.
struct BadSetting {
    what: &'static str,
    flags: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
    says: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_come_from_flags_over_environment() {
    timeout(TEST_LIMIT, async {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = database_url(dir.path());
        let client = client();
        let three = json!({ "amount": 300, "recipient_count": 3 });
        let two = json!({ "amount": 300, "recipient_count": 2 });

        // The environment alone: at most 2 recipients.
        let mut server = Server::start(dir.path(), &url, &[], &[("SPRAY_MAX_RECIPIENTS", "2")]).await;
        let response = client
            .post(server.url("/api/v1/spray"))
            .header("x-user-id", SPRAYER.to_string())
            .header("x-room-id", ROOM)
            .json(&three)
            .send()
            .await
            .expect("POST /api/v1/spray");
        let (status, content_type, problem) = answer(response).await;
        assert_eq!(
            (status, problem["code"].as_str()),
            (400, Some("INVALID_REQUEST")),
            "{problem}"
        );
        assert_eq!(content_type.as_deref(), Some("application/problem+json"));
        spray(&client, &server, &two).await;
        let status = server.terminate().await;
        assert!(status.success(), "{status}");
        drop(server);

        // The flag wins over the environment.
        let mut server = Server::start(
            dir.path(),
            &url,
            &["--max-recipients", "5"],
            &[("SPRAY_MAX_RECIPIENTS", "2")],
        )
        .await;
        spray(&client, &server, &three).await;
        let (status, problem) = post(
            &client,
            &server,
            "/api/v1/spray",
            SPRAYER,
            &json!({ "amount": 600, "recipient_count": 6 }),
        )
        .await;
        assert_eq!(
            (status, problem["code"].as_str()),
            (400, Some("INVALID_REQUEST")),
            "{problem}"
        );
        let status = server.terminate().await;
        assert!(status.success(), "{status}");
        drop(server);

        // Bad settings stop the binary at once, with a non-zero status, before it serves.
        let cases = [
            BadSetting {
                what: "a duration flag that is not a duration",
                flags: &["--receive-window", "tenminutes"],
                env: &[],
                says: "tenminutes",
            },
            BadSetting {
                what: "a duration variable that is not a duration",
                flags: &[],
                env: &[("SPRAY_RECEIVE_WINDOW", "tenminutes")],
                says: "tenminutes",
            },
            BadSetting {
                what: "a lookup window shorter than the receive window",
                flags: &["--receive-window", "10m", "--lookup-window", "5m"],
                env: &[],
                says: "--lookup-window",
            },
        ];
        for case in &cases {
            assert_refuses_to_start(dir.path(), case.what, case.flags, case.env, case.says).await;
        }
    })
    .await
    .expect("the test finished in time");
}

/// The allocator's memory is kept in ordinary 4 KiB pages: with transparent huge pages,
/// each instance held about 10 MiB more and its RSS rose in steps of 2 MiB pages through
/// a long run (BENCHMARKS.md), whatever the host's THP setting is.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn serve_keeps_its_memory_out_of_transparent_huge_pages() {
    timeout(TEST_LIMIT, async {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let server = Server::start(dir.path(), &database_url(dir.path()), &[], &[]).await;
        let pid = server.child.0.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("its /proc status");
        // `THP_enabled` is in /proc/PID/status since Linux 5.0: 0 when the process has
        // turned transparent huge pages off for itself (prctl PR_SET_THP_DISABLE).
        let enabled = status
            .lines()
            .find_map(|line| line.strip_prefix("THP_enabled:"))
            .map(str::trim);
        assert_eq!(enabled, Some("0"), "spray serve's /proc status:\n{status}");
    })
    .await
    .expect("the test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_server_gracefully() {
    timeout(TEST_LIMIT, async {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = database_url(dir.path());
        let client = client();
        let mut server = Server::start(dir.path(), &url, &[], &[]).await;
        let token = spray(&client, &server, &json!({ "amount": 10, "recipient_count": 2 })).await;
        receive(&client, &server, &token, 2).await;

        let status = server.terminate().await;
        assert_eq!(
            status.code(),
            Some(0),
            "spray serve ended with {status} after SIGTERM\n--- log ---\n{}",
            server.log_text()
        );
        // Stopped means stopped: nothing answers on its port any more.
        let after = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .no_proxy()
            .build()
            .expect("an HTTP client")
            .get(server.url("/healthz"))
            .send()
            .await;
        assert!(after.is_err(), "something still answers after SIGTERM: {after:?}");
        drop(server);

        // What it wrote before stopping is whole.
        let audit = audit(dir.path(), "audit", &url).await;
        assert_eq!(audit.status.code(), Some(0), "{}\n{}", audit.stdout, audit.stderr);
    })
    .await
    .expect("the test finished in time");
}

#[tokio::test]
async fn a_request_in_flight_at_sigterm_is_finished_before_the_exit() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    timeout(TEST_LIMIT, async {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = database_url(dir.path());
        let client = client();
        let mut server = Server::start(dir.path(), &url, &[], &[]).await;
        let token = spray(&client, &server, &json!({ "amount": 10, "recipient_count": 2 })).await;
        let in_flight = || async {
            let text = client
                .get(server.url("/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            text.lines()
                .find_map(|l| {
                    l.strip_prefix("http_requests_in_flight ")?
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
                .unwrap_or(0.0)
        };
        let baseline = in_flight().await;

        // A receive whose body is only half sent: the request is in flight.
        let body = format!(r#"{{"token": "{token}"}}"#);
        let (first, rest) = body.split_at(body.len() / 2);
        let address = server.base.trim_start_matches("http://").to_owned();
        let mut stream = tokio::net::TcpStream::connect(&address).await.expect("connect");
        let head = format!(
            "POST /api/v1/receive HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
             X-USER-ID: 2\r\nX-ROOM-ID: {ROOM}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{first}",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut polls = 0;
        while in_flight().await <= baseline {
            polls += 1;
            assert!(polls < HEALTH_POLLS, "the half-sent request never started");
            tokio::time::sleep(POLL_EVERY).await;
        }

        // SIGTERM now: the server stops accepting but finishes this request.
        let pid = server.child.0.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        stream.write_all(rest.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("the answer");
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "answer after SIGTERM: {answer}"
        );
        assert!(answer.contains(r#"{"received_amount":5}"#), "{answer}");

        let status = server
            .child
            .wait_for_exit(STOP_LIMIT)
            .await
            .expect("spray serve exits after the drain");
        assert_eq!(status.code(), Some(0), "--- log ---\n{}", server.log_text());
        let audit = audit(dir.path(), "audit", &url).await;
        assert_eq!(audit.status.code(), Some(0), "{}\n{}", audit.stdout, audit.stderr);
    })
    .await
    .expect("the test finished in time");
}

#[tokio::test]
async fn serve_starts_and_answers_with_redis_unreachable() {
    timeout(TEST_LIMIT, async {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = database_url(dir.path());
        let client = client();
        // Nothing listens on port 1: Redis is unreachable from the very start.
        let mut server = Server::start(dir.path(), &url, &["--redis-url", "redis://127.0.0.1:1"], &[]).await;
        // Said at start, with the host, before any request noticed it.
        let log = server.log_text();
        assert!(
            log.contains("redis does not answer at start") && log.contains("redis=redis://127.0.0.1:1"),
            "{log}"
        );
        let token = spray(&client, &server, &json!({ "amount": 10, "recipient_count": 2 })).await;
        receive(&client, &server, &token, 2).await;
        let (status, answer) = post(&client, &server, "/api/v1/receive", 2, &json!({ "token": token })).await;
        assert_eq!((status, answer["code"].as_str()), (409, Some("ALREADY_RECEIVED")));
        let ready = client.get(server.url("/readyz")).send().await.expect("readyz");
        assert_eq!(ready.status(), 200);
        let ready: Value = ready.json().await.expect("a JSON body");
        assert_eq!(
            (ready["sql"].as_str(), ready["redis"].as_str()),
            (Some("up"), Some("down"))
        );
        assert_eq!(server.terminate().await.code(), Some(0));
    })
    .await
    .expect("the test finished in time");
}

/// Settings that cannot keep money, each refused by every command before anything is
/// opened or written: exit 2, a message naming the setting, and no file in the directory
/// the command ran in.
#[tokio::test]
async fn settings_that_cannot_keep_money_are_refused_by_every_command_and_write_nothing() {
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "an SQLite URL with no file",
            &["--database-url", "sqlite://"],
            "--database-url",
        ),
        (
            "SQLite with no file and options",
            &["--database-url", "sqlite://?mode=rwc"],
            "--database-url",
        ),
        (
            "in-memory SQLite",
            &["--database-url", "sqlite::memory:"],
            "in-memory",
        ),
        (
            "in-memory SQLite by option",
            &["--database-url", "sqlite://x.db?mode=memory"],
            "in-memory",
        ),
        (
            "no database connection",
            &["--database-max-connections", "0"],
            "--database-max-connections",
        ),
        (
            "an empty gateway secret",
            &["--gateway-secret", ""],
            "--gateway-secret",
        ),
        (
            "a blank gateway secret",
            &["--gateway-secret", "  "],
            "--gateway-secret",
        ),
    ];
    let logs = tempfile::tempdir().expect("a directory for the output");
    for command in ["serve", "migrate", "audit", "config"] {
        for (what, flags, says) in cases {
            // The command runs in an empty directory of its own: whatever it writes there
            // (a database file) shows; its output goes elsewhere.
            let dir = tempfile::tempdir().expect("a temporary directory");
            let stderr_path = logs
                .path()
                .join(format!("{command}-{}.stderr", what.replace(' ', "-")));
            let child = spray_command()
                .current_dir(dir.path())
                .arg(command)
                .args(["--listen", "127.0.0.1:0"])
                .args(*flags)
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&stderr_path).expect("the stderr file"))
                .spawn()
                .expect("run spray");
            // Killed by PID when dropped: a command that wrongly starts is stopped.
            let mut child = ChildGuard(child);
            let status = child.wait_for_exit(REFUSAL_LIMIT).await;
            let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            assert_eq!(
                status.and_then(|s| s.code()),
                Some(2),
                "{command} with {what}: {stderr}"
            );
            assert!(
                stderr.contains(says),
                "{command} with {what} does not say why: {stderr}"
            );
            let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert!(left.is_empty(), "{command} with {what} wrote {left:?}");
        }
    }
}

/// A port that is taken stops `spray serve` before it opens a store: exit 1, a message
/// with the address, and no SQLite file created, no table made in a MySQL database.
#[tokio::test]
async fn serve_on_a_taken_port_exits_before_it_creates_or_migrates_a_store() {
    timeout(TEST_LIMIT, async {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("take a port");
        let address = taken.local_addr().expect("its address").to_string();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let logs = tempfile::tempdir().expect("a directory for the output");
        let url = database_url(dir.path());
        let run = run_spray(
            logs.path(),
            "sqlite",
            &["serve", "--listen", &address, "--database-url", &url],
            &[],
            REFUSAL_LIMIT,
        )
        .await;
        assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
        assert!(
            run.stderr.contains(&format!("cannot listen on {address}")) && run.stderr.contains("in use"),
            "{}",
            run.stderr
        );
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "a refused start wrote {left:?}");

        let database = common::MySqlDatabase::create().await;
        let run = run_spray(
            logs.path(),
            "mysql",
            &["serve", "--listen", &address, "--database-url", &database.url],
            &[],
            REFUSAL_LIMIT,
        )
        .await;
        assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
        let pool = sqlx::MySqlPool::connect(&database.url)
            .await
            .expect("the test database");
        let tables: Vec<String> = sqlx::query_scalar("SHOW TABLES").fetch_all(&pool).await.unwrap();
        assert!(tables.is_empty(), "a refused start made {tables:?}");
        pool.close().await;
        drop(taken);
    })
    .await
    .expect("the test finished in time");
}

/// The bytes of a file, to show that a command left it as it was.
fn bytes_of(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `spray audit` never creates or changes a store: a missing file, an empty file and a
/// store of an older schema are each refused with exit 2 and a message that says which,
/// and are left as they were (no file created, not a byte changed, nothing migrated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_refuses_a_missing_empty_or_older_store_and_changes_nothing() {
    timeout(TEST_LIMIT, async {
        let logs = tempfile::tempdir().expect("a directory for the output");
        let dir = tempfile::tempdir().expect("a temporary directory");

        let missing = dir.path().join("missing.db");
        let url = format!("sqlite://{}", missing.display());
        let run = audit(logs.path(), "missing", &url).await;
        assert_eq!(run.status.code(), Some(2), "{}\n{}", run.stdout, run.stderr);
        assert!(
            run.stderr
                .contains(&format!("there is no store at {}", missing.display())),
            "{}",
            run.stderr
        );
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "audit of a missing store wrote {left:?}");

        // A file with no tables (SQLite reads an empty file as an empty database).
        let empty = dir.path().join("empty.db");
        std::fs::write(&empty, b"").unwrap();
        let url = format!("sqlite://{}", empty.display());
        let run = audit(logs.path(), "empty", &url).await;
        assert_eq!(run.status.code(), Some(2), "{}\n{}", run.stdout, run.stderr);
        assert!(run.stderr.contains("is empty (no tables)"), "{}", run.stderr);
        assert!(bytes_of(&empty).is_empty(), "the empty file was written to");

        // A store one migration behind this binary.
        let older = tempfile::tempdir().expect("a temporary directory");
        let url = populated_store(older.path()).await;
        let pool = sqlx::SqlitePool::connect(&url)
            .await
            .expect("open the store directly");
        sqlx::query(
            "DELETE FROM _sqlx_migrations WHERE version = (SELECT MAX(version) FROM _sqlx_migrations)",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
        let file = older.path().join("spray.db");
        let before = bytes_of(&file);
        let run = audit(logs.path(), "older", &url).await;
        assert_eq!(run.status.code(), Some(2), "{}\n{}", run.stdout, run.stderr);
        assert!(
            run.stderr.contains("is of an older schema") && run.stderr.contains("run spray migrate"),
            "{}",
            run.stderr
        );
        assert!(bytes_of(&file) == before, "the audit changed the older store");

        // The same in JSON, for a monitor: one object on stdout that says why.
        let run = run_spray(
            logs.path(),
            "older-json",
            &["audit", "--format", "json", "--database-url", &url],
            &[],
            COMMAND_LIMIT,
        )
        .await;
        assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
        let report: Value = serde_json::from_str(&run.stdout).expect("JSON on stdout");
        assert_eq!(report["clean"], false);
        assert!(
            report["error"].as_str().unwrap().contains("older schema"),
            "{report}"
        );
    })
    .await
    .expect("the test finished in time");
}

/// On MySQL too: a database with no tables is refused and left without tables (the audit
/// does not migrate); a database that does not exist is named.
#[tokio::test]
async fn audit_on_mysql_never_migrates() {
    timeout(TEST_LIMIT, async {
        let logs = tempfile::tempdir().expect("a directory for the output");
        let database = common::MySqlDatabase::create().await;
        let run = audit(logs.path(), "empty", &database.url).await;
        assert_eq!(run.status.code(), Some(2), "{}\n{}", run.stdout, run.stderr);
        assert!(run.stderr.contains("is empty (no tables)"), "{}", run.stderr);
        let pool = sqlx::MySqlPool::connect(&database.url)
            .await
            .expect("the test database");
        let tables: Vec<String> = sqlx::query_scalar("SHOW TABLES").fetch_all(&pool).await.unwrap();
        assert!(tables.is_empty(), "the audit made {tables:?}");
        pool.close().await;

        let absent = format!("{}_absent", database.url);
        let run = audit(logs.path(), "absent", &absent).await;
        assert_eq!(run.status.code(), Some(2), "{}\n{}", run.stdout, run.stderr);
        assert!(run.stderr.contains("cannot open the store"), "{}", run.stderr);
        assert!(run.stderr.contains("_absent"), "{}", run.stderr);
    })
    .await
    .expect("the test finished in time");
}

/// `spray audit --format json` (or `--json`) prints one object a monitor can read, and
/// an audit reads the store without changing a byte of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_prints_json_for_monitoring_and_leaves_the_store_as_it_was() {
    timeout(TEST_LIMIT, async {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = populated_store(dir.path()).await;
        let file = dir.path().join("spray.db");
        let before = bytes_of(&file);
        for flag in [&["--format", "json"][..], &["--json"][..]] {
            let mut args = vec!["audit", "--database-url", &url];
            args.extend_from_slice(flag);
            let run = run_spray(dir.path(), "json", &args, &[], COMMAND_LIMIT).await;
            assert_eq!(run.status.code(), Some(0), "{}\n{}", run.stdout, run.stderr);
            let report: Value = serde_json::from_str(&run.stdout).expect("one JSON object");
            assert_eq!(report["clean"], true, "{report}");
            assert_eq!(report["violations"], 0, "{report}");
            assert_eq!(report["totals"]["sprays"], 3, "{report}");
            assert_eq!(report["totals"]["debited"], 2277, "{report}");
            let checks = report["checks"].as_array().expect("the checks");
            assert_eq!(checks.len(), spray::audit::CHECKS.len());
            assert!(checks.iter().all(|check| check["ok"] == true), "{report}");
        }
        assert!(bytes_of(&file) == before, "the audit changed the store");

        let pool = sqlx::SqlitePool::connect(&url)
            .await
            .expect("open the store directly");
        sqlx::query(CORRUPTIONS[0].sql).execute(&pool).await.unwrap();
        pool.close().await;
        let run = run_spray(
            dir.path(),
            "json-corrupt",
            &["audit", "--json", "--database-url", &url],
            &[],
            COMMAND_LIMIT,
        )
        .await;
        assert_eq!(run.status.code(), Some(1), "{}\n{}", run.stdout, run.stderr);
        let report: Value = serde_json::from_str(&run.stdout).expect("one JSON object");
        assert_eq!(report["clean"], false, "{report}");
        let failed: Vec<&str> = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|check| check["ok"] == false)
            .filter_map(|check| check["name"].as_str())
            .collect();
        assert_eq!(failed, [CORRUPTIONS[0].breaks], "{report}");
    })
    .await
    .expect("the test finished in time");
}

/// `--help` gives every exit status, for the audit among them.
#[test]
fn help_lists_the_exit_statuses() {
    for args in [
        &["--help"][..],
        &["audit", "--help"][..],
        &["healthcheck", "--help"][..],
    ] {
        let output = spray_command().args(args).output().expect("run spray");
        assert!(output.status.success());
        let help = String::from_utf8(output.stdout).unwrap();
        assert!(help.contains("Exit status:"), "{args:?}: {help}");
        assert!(
            help.contains(
                "audit        0 every check passed; 1 a money invariant is broken; 2 could not audit"
            ),
            "{args:?}: {help}"
        );
    }
}

/// `spray healthcheck` asks /readyz of a running server: 0 when it answers 200, 1 when it
/// answers anything else or nothing, 2 for a URL it cannot use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_exits_by_the_readiness_of_the_server() {
    timeout(TEST_LIMIT, async {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = database_url(dir.path());
        let mut server = Server::start(dir.path(), &url, &[], &[]).await;
        let address = server.base.trim_start_matches("http://").to_owned();
        let port = address.rsplit_once(':').unwrap().1.to_owned();
        let check = |name: &'static str, args: Vec<String>| {
            let dir = dir.path().to_owned();
            async move {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                run_spray(&dir, name, &args, &[], COMMAND_LIMIT).await
            }
        };
        let ready = [
            vec!["healthcheck".into(), "--listen".into(), address.clone()],
            // The container's listen address: every interface, so loopback is asked.
            vec!["healthcheck".into(), "--listen".into(), format!("0.0.0.0:{port}")],
            vec![
                "healthcheck".into(),
                "--url".into(),
                format!("http://{address}/readyz"),
            ],
        ];
        for args in ready {
            let run = check("ready", args.clone()).await;
            assert_eq!(run.status.code(), Some(0), "{args:?}: {}", run.stderr);
        }
        let run = check(
            "404",
            vec![
                "healthcheck".into(),
                "--url".into(),
                format!("http://{address}/nothing"),
            ],
        )
        .await;
        assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
        assert!(run.stderr.contains("answered 404"), "{}", run.stderr);
        let run = check(
            "https",
            vec![
                "healthcheck".into(),
                "--url".into(),
                format!("https://{address}/readyz"),
            ],
        )
        .await;
        assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
        assert_eq!(server.terminate().await.code(), Some(0));
        let run = check(
            "stopped",
            vec!["healthcheck".into(), "--listen".into(), address.clone()],
        )
        .await;
        assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
        assert!(
            run.stderr.contains(&format!("cannot connect to {address}")),
            "{}",
            run.stderr
        );
    })
    .await
    .expect("the test finished in time");
}

/// Opening a store fails with the thing and the cause in words, and writes nothing:
/// settings that can be judged without connecting are refused first (exit 2); a server or
/// a file that cannot be opened is named with the reason (exit 1).
#[tokio::test]
async fn store_errors_name_the_store_and_the_cause_and_write_nothing() {
    timeout(TEST_LIMIT, async {
        let logs = tempfile::tempdir().expect("a directory for the output");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let refused_port = free_port();
        let refused = format!("mysql://root@127.0.0.1:{refused_port}/spray");
        let no_dir = dir.path().join("no-such-dir").join("spray.db");
        let no_dir_url = format!("sqlite://{}", no_dir.display());
        let a_dir = dir.path().join("a-dir.db");
        std::fs::create_dir(&a_dir).unwrap();
        let a_dir_url = format!("sqlite://{}", a_dir.display());
        let cases: &[(&str, &[&str], i32, &[&str])] = &[
            (
                "a MySQL URL without a database",
                &["--database-url", "mysql://root@127.0.0.1:3306"],
                2,
                &["mysql://root@127.0.0.1:3306 names no database"],
            ),
            (
                "a MySQL option spelt wrong (sqlx would ignore it)",
                &[
                    "--database-url",
                    "mysql://root@127.0.0.1:3306/spray?ssl_mode=REQUIRED",
                ],
                2,
                &["unknown option `ssl_mode`"],
            ),
            (
                "a malformed MySQL option",
                &[
                    "--database-url",
                    "mysql://root@127.0.0.1:3306/spray?ssl-mode=SOMETIMES",
                ],
                2,
                &["--database-url", "SOMETIMES"],
            ),
            (
                "a CA file that does not exist",
                &[
                    "--database-url",
                    "mysql://root@127.0.0.1:3306/spray?ssl-mode=VERIFY_CA&ssl-ca=/no/ca.pem",
                ],
                2,
                &["ssl-ca=/no/ca.pem is not a readable file"],
            ),
            (
                "an unknown scheme",
                &["--database-url", "postgres://root@127.0.0.1/spray"],
                2,
                &["neither sqlite://FILE nor mysql://"],
            ),
            (
                "a malformed Redis URL",
                &["--redis-url", "redis://127.0.0.1:notaport"],
                2,
                &["--redis-url redis://127.0.0.1:notaport"],
            ),
            (
                "a MySQL port nobody listens on",
                &["--database-url", &refused],
                1,
                &[&format!("127.0.0.1:{refused_port}"), "Connection refused"],
            ),
            (
                "an SQLite file in a directory that does not exist",
                &["--database-url", &no_dir_url],
                1,
                &[&no_dir.display().to_string(), "does not exist"],
            ),
            (
                "an SQLite path that is a directory",
                &["--database-url", &a_dir_url],
                1,
                &[&a_dir.display().to_string(), "it is a directory"],
            ),
        ];
        for command in ["migrate", "serve"] {
            for (what, flags, code, says) in cases {
                let mut args = vec![command, "--listen", "127.0.0.1:0"];
                args.extend_from_slice(flags);
                let name = format!("{command}-{}", what.replace(' ', "-"));
                let run = run_spray(logs.path(), &name, &args, &[], REFUSAL_LIMIT).await;
                assert_eq!(
                    run.status.code(),
                    Some(*code),
                    "{command}, {what}: {}",
                    run.stderr
                );
                for said in *says {
                    assert!(
                        run.stderr.contains(said),
                        "{command}, {what}: no `{said}` in {}",
                        run.stderr
                    );
                }
            }
        }
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            [std::ffi::OsString::from("a-dir.db")],
            "something was written"
        );
        assert!(std::fs::read_dir(&a_dir).unwrap().next().is_none());
    })
    .await
    .expect("the test finished in time");
}
