//! Durability, black-box: the real `spray` binary is killed with SIGKILL while receipts
//! and new sprays are in flight, restarted on the same SQLite file, and must still hold
//! every receipt and every spray it acknowledged, with the money invariants intact
//! (`spray audit`). The writes are group-committed (`store/batch.rs`); the test checks
//! that batches of several writes were being committed when the kill came.

mod common;

use common::process::*;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::timeout;

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
/// New sprays created while the receipts are in flight, each by its own sprayer in its
/// own room (users and rooms no receiver uses).
const SPRAYERS: i64 = 100;
const FIRST_SPRAYER: i64 = 100_000;

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
    /// Sprays acknowledged with 201: their sprayer and token.
    sprays: Vec<(i64, String)>,
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

/// One sprayer: POST /api/v1/spray in a room of its own, and record what came back.
async fn spray(client: reqwest::Client, url: String, sprayer: i64, outcomes: Arc<Mutex<Outcomes>>) {
    let answer = client
        .post(url)
        .header("x-user-id", sprayer.to_string())
        .header("x-room-id", format!("room-{sprayer}"))
        .json(&json!({ "amount": 1_000, "recipient_count": 5 }))
        .send()
        .await;
    let token = match answer {
        Ok(answer) if answer.status() == reqwest::StatusCode::CREATED => answer
            .json::<Value>()
            .await
            .ok()
            .and_then(|body| body["token"].as_str().map(str::to_owned)),
        _ => None,
    };
    if let Some(token) = token {
        outcomes
            .lock()
            .expect("outcomes lock")
            .sprays
            .push((sprayer, token));
    }
}

/// How many group commits held more than one write, and how many there were, from the
/// server's `spray_store_batch_writes` histogram.
async fn batches(client: &reqwest::Client, server: &Server) -> (f64, f64) {
    let text = client
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("scrape /metrics")
        .text()
        .await
        .expect("the metrics");
    let value = |prefix: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(prefix))
            .and_then(|rest| rest.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let all = value("spray_store_batch_writes_count ");
    let single = value("spray_store_batch_writes_bucket{le=\"1\"} ");
    (all - single, all)
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

/// Every receiver is let in at once (past the default admission bound): this test is about
/// what survives the kill, not about overload.
const ADMIT_ALL: &[&str] = &["--store-concurrency", "1024"];

async fn kill_9_scenario() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let database_url = database_url(dir.path());
    let client = client();

    let mut server = Server::start(dir.path(), &database_url, ADMIT_ALL, &[]).await;
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
    for sprayer in FIRST_SPRAYER..FIRST_SPRAYER + SPRAYERS {
        receivers.spawn(spray(
            client.clone(),
            server.url("/api/v1/spray"),
            sprayer,
            outcomes.clone(),
        ));
    }

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
    let (grouped, all) = batches(&client, &server).await;
    server.kill_9().await;
    assert!(
        grouped >= 1.0,
        "no group commit held more than one write before the kill ({all} commits): the test did not exercise batching"
    );
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
        "acknowledged {} receipts ({acknowledged_at_kill} when killed) and {} sprays, {grouped} of {all} commits held several writes, transport errors {}, other statuses {:?}",
        outcomes.acknowledged.len(),
        outcomes.sprays.len(),
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
    let mut server = Server::start(dir.path(), &database_url, ADMIT_ALL, &[]).await;
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

    // Every spray acknowledged before the kill is there, whole, with its DEBIT (the audit
    // below checks the ledger).
    for (sprayer, token) in &outcomes.sprays {
        let lookup = client
            .get(server.url(&format!("/api/v1/spray/{token}")))
            .header("x-user-id", sprayer.to_string())
            .header("x-room-id", format!("room-{sprayer}"))
            .send()
            .await
            .expect("look an acknowledged spray up");
        assert_eq!(
            lookup.status(),
            reqwest::StatusCode::OK,
            "the spray {token} acknowledged to {sprayer} was lost by kill -9"
        );
        let found: Value = lookup.json().await.expect("the lookup answer");
        assert_eq!(json_u64(&found["total_amount"], "total_amount"), 1_000);
        assert_eq!(json_u64(&found["recipient_count"], "recipient_count"), 5);
    }

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

    let audit = run_spray(
        dir.path(),
        "audit",
        &["audit", "--database-url", &database_url],
        &[],
        COMMAND_LIMIT,
    )
    .await;
    assert!(
        audit.status.success(),
        "spray audit failed after kill -9 ({}):\n{}\n{}",
        audit.status,
        audit.stdout,
        audit.stderr
    );
    assert!(audit.stdout.contains("audit clean"), "{}", audit.stdout);
}
