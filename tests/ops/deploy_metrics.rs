//! What an operator installs beside spray reads metrics that a real `spray serve` shows:
//! every metric named by the Grafana dashboard (`deploy/grafana/spray.json`) and by the
//! alert rules (`deploy/prometheus/alerts.yml`) is in `/metrics` after a short workload,
//! read out of their PromQL so that the files and the service cannot drift apart; no
//! series carries a user, a token or a room; and the series the README's Metrics table
//! documents are all there, at 0, on the first scrape of a fresh server.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Value, json};
use spray::telemetry::metrics::{GATE_EVENTS, PROBLEM_CODES, STORE_OPERATIONS, SWEEPERS};

use crate::common::metrics::{Sample, parse, value};
use crate::common::process::{Server, client, database_url};
use crate::common::{MySqlDatabase, redis_prefix, redis_url};

/// Metrics the rules read that another exporter provides, not spray, with the reason.
const EXTERNAL_METRICS: &[&str] = &[
    // kube-state-metrics: the audit CronJob's failed Jobs (SprayAuditFailed).
    "kube_job_status_failed",
];

/// PromQL words that are not metric names: functions, aggregations, operators, keywords.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "rate",
    "increase",
    "irate",
    "histogram_quantile",
    "time",
    "absent",
    "by",
    "without",
    "or",
    "and",
    "unless",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
];

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {}: {e}", full.display()))
}

/// The metric names a PromQL expression reads: its identifiers, once the label matchers
/// (`{...}`), ranges (`[5m]`), groupings (`by (le)`), strings and numbers are taken out.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut plain = String::new();
    let mut depth = 0u32;
    let mut after_grouping = false;
    let mut quoted = false;
    for c in expr.chars() {
        match c {
            '"' => quoted = !quoted,
            _ if quoted => {}
            '{' | '[' => depth += 1,
            '}' | ']' => depth = depth.saturating_sub(1),
            // Only a grouping's parenthesis counts: inside `{}` and `[]` a `)` is quoted.
            '(' if after_grouping => depth += 1,
            ')' if depth > 0 => {
                depth -= 1;
                // Ends the grouping: what follows `by (le) ` is not another grouping.
                if depth == 0 {
                    plain.push_str(" ; ");
                }
            }
            _ if depth > 0 => {}
            c => plain.push(if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                ' '
            }),
        }
        // `by (...)` and `without (...)` list labels, not metrics.
        let last_word = plain.split_whitespace().last().unwrap_or("");
        after_grouping =
            depth == 0 && !quoted && (last_word == "by" || last_word == "without") && plain.ends_with(' ');
    }
    plain
        .split_whitespace()
        .filter(|word| word.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_' || c == ':'))
        .filter(|word| !PROMQL_WORDS.contains(word))
        .map(str::to_owned)
        .collect()
}

/// Every `expr` of the dashboard's panels.
fn dashboard_exprs() -> Vec<String> {
    let dashboard: Value = serde_json::from_str(&repo_file("deploy/grafana/spray.json")).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    exprs
}

/// Every `expr` of the alert rules: one line (`expr: ...`) or a block (`expr: |` and the
/// lines indented under it).
fn alert_exprs() -> Vec<String> {
    let text = repo_file("deploy/prometheus/alerts.yml");
    let lines: Vec<&str> = text.lines().collect();
    let indent = |line: &str| line.len() - line.trim_start().len();
    let mut exprs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest == "|" || rest == ">" {
            let block: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|next| next.trim().is_empty() || indent(next) > indent(line))
                .copied()
                .collect();
            exprs.push(block.join("\n"));
        } else {
            exprs.push(rest.to_owned());
        }
    }
    exprs
}

async fn scrape(server: &Server) -> (String, Vec<Sample>) {
    let answer = client().get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    let text = answer.text().await.unwrap();
    let samples = parse(&text);
    (text, samples)
}

async fn post(server: &Server, path: &str, user: &str, room: &str, body: Value) -> (u16, Value) {
    let answer = client()
        .post(server.url(path))
        .header("X-USER-ID", user)
        .header("X-ROOM-ID", room)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

#[test]
fn the_promql_reader_finds_metrics_and_nothing_else() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le, route) (rate(http_request_duration_seconds_bucket{job="spray", route=~"/api/.*"}[5m]))) > 1"#,
    );
    assert_eq!(
        names,
        BTreeSet::from(["http_request_duration_seconds_bucket".to_owned()])
    );
    let names = metric_names(
        "time() - max(spray_sweeper_last_success_timestamp_seconds{sweeper=\"settle\"}) > 600\n or max(spray_settlement_overdue_sprays) > 0",
    );
    assert_eq!(
        names,
        BTreeSet::from([
            "spray_settlement_overdue_sprays".to_owned(),
            "spray_sweeper_last_success_timestamp_seconds".to_owned()
        ])
    );
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alerts_read_is_served_and_no_series_names_a_user_token_or_room() {
    let dir = tempfile::tempdir().unwrap();
    let database = MySqlDatabase::create().await;
    let prefix = redis_prefix();
    let redis = redis_url();
    let server = Server::start(
        dir.path(),
        &database.url,
        &["--redis-url", &redis, "--redis-key-prefix", &prefix],
        &[],
    )
    .await;

    // A short scripted workload, with users, rooms and tokens that would stand out in a
    // label: sprays of both modes, receipts, each refusal of the receive rules, lookups,
    // an idempotent retry, a bad request and a scanner's path.
    let (owner, room) = ("7345917", "ROOM-zq7xkw");
    let (other_room, users) = ("ROOM-pl4vnb", ["8812345", "8812346", "8812347"]);
    let mut tokens = Vec::new();
    for body in [
        json!({"amount": 3000, "recipient_count": 2, "mode": "even"}),
        json!({"amount": 5000, "recipient_count": 3, "mode": "random"}),
    ] {
        let (status, answer) = post(&server, "/api/v1/spray", owner, room, body).await;
        assert_eq!(status, 201, "{answer}");
        tokens.push(answer["token"].as_str().unwrap().to_owned());
    }
    let token = tokens[0].clone();
    for (user, user_room, want) in [
        (users[0], room, 200),
        (users[1], room, 200),
        (users[2], room, 409),       // exhausted
        (users[0], room, 409),       // already received
        (owner, room, 403),          // own spray
        (users[2], other_room, 404), // another room
    ] {
        let (status, answer) = post(
            &server,
            "/api/v1/receive",
            user,
            user_room,
            json!({"token": token}),
        )
        .await;
        assert_eq!(status, want, "{user} in {user_room}: {answer}");
    }
    let lookup = |user: &'static str| {
        client()
            .get(server.url(&format!("/api/v1/spray/{token}")))
            .header("X-USER-ID", user)
            .header("X-ROOM-ID", room)
            .send()
    };
    assert_eq!(lookup(owner).await.unwrap().status(), 200);
    assert_eq!(lookup(users[0]).await.unwrap().status(), 403);
    for _ in 0..2 {
        let answer = client()
            .post(server.url("/api/v1/spray"))
            .header("X-USER-ID", owner)
            .header("X-ROOM-ID", room)
            .header("Idempotency-Key", "key-qq81zz")
            .json(&json!({"amount": 10, "recipient_count": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 201);
        tokens.push(
            answer.json::<Value>().await.unwrap()["token"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let (status, _) = post(
        &server,
        "/api/v1/spray",
        owner,
        room,
        json!({"amount": 1, "recipient_count": 2}),
    )
    .await;
    assert_eq!(status, 400);
    let scanner = client()
        .get(server.url("/wp-admin/setup-x9q.php"))
        .send()
        .await
        .unwrap();
    assert_eq!(scanner.status(), 404);
    client().get(server.url("/readyz")).send().await.unwrap();

    let (text, samples) = scrape(&server).await;
    let served: BTreeSet<&str> = samples.iter().map(|s| s.name.as_str()).collect();

    // Every metric the dashboard and the rules read.
    let dashboard = dashboard_exprs();
    let alerts = alert_exprs();
    assert!(
        dashboard.len() >= 20 && alerts.len() >= 8,
        "too few expressions read: {dashboard:?} {alerts:?}"
    );
    let mut missing = Vec::new();
    let mut read = BTreeSet::new();
    for (file, expr) in dashboard
        .iter()
        .map(|e| ("spray.json", e))
        .chain(alerts.iter().map(|e| ("alerts.yml", e)))
    {
        for name in metric_names(expr) {
            if !served.contains(name.as_str()) && !EXTERNAL_METRICS.contains(&name.as_str()) {
                missing.push(format!("{file}: {name} in {expr}"));
            }
            read.insert(name);
        }
    }
    assert!(missing.is_empty(), "not in /metrics:\n{}", missing.join("\n"));
    for needed in [
        "http_requests_total",
        "spray_rejections_total",
        "spray_gate_events_total",
        "spray_store_pool_connections",
        "spray_dependency_up",
        "process_resident_memory_bytes",
        "spray_sweeper_last_success_timestamp_seconds",
    ] {
        assert!(
            read.contains(needed),
            "the dashboard and alerts no longer read {needed}: {read:?}"
        );
    }
    // The workload moved what it should have (so the series above are real, not stubs).
    assert_eq!(value(&samples, "spray_claims_total", &[]), 2.0);
    assert!(value(&samples, "spray_gate_events_total", &[("event", "hit")]) >= 2.0);
    assert_eq!(
        value(&samples, "spray_dependency_up", &[("dependency", "redis")]),
        1.0
    );
    assert_eq!(
        value(&samples, "spray_dependency_up", &[("dependency", "sql")]),
        1.0
    );
    assert!(value(&samples, "spray_store_pool_connections", &[("backend", "mysql")]) >= 1.0);

    // No label value is a user, a room, a token, a key or a raw path of the workload.
    let mut secrets: Vec<String> = [owner, room, other_room, "key-qq81zz", "setup-x9q"]
        .iter()
        .chain(users.iter())
        .map(|s| (*s).to_owned())
        .collect();
    secrets.extend(tokens.iter().map(|t| format!("/{t}")));
    for sample in &samples {
        for label in sample.labels.values() {
            for secret in &secrets {
                assert!(!label.contains(secret.as_str()), "{secret} in {sample:?}");
            }
            assert!(!tokens.contains(label), "a token as a label: {sample:?}");
        }
    }
    // Nor a help or type line (sample values are numbers that could contain the digits).
    for line in text.lines().filter(|line| line.starts_with('#')) {
        for secret in &secrets {
            assert!(!line.contains(secret.as_str()), "{secret} in {line}");
        }
    }
}

#[tokio::test]
async fn a_fresh_server_shows_every_documented_series_at_zero_on_its_first_scrape() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &database_url(dir.path()), &[], &[]).await;
    let (_, samples) = scrape(&server).await;
    let has = |name: &str, labels: &[(&str, &str)]| {
        samples.iter().any(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    };

    // Every metric the README's Metrics table documents.
    let readme = repo_file("README.md");
    let table = readme
        .split("### Metrics")
        .nth(1)
        .and_then(|rest| rest.split("\n### ").next())
        .expect("the README's Metrics section");
    let mut documented = 0;
    for row in table.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let kind = cells[2];
        for name in cells[1].split(',').map(|n| n.trim().trim_matches('`')) {
            let shown = if kind == "histogram" {
                format!("{name}_count")
            } else {
                name.to_owned()
            };
            assert!(
                has(&shown, &[]),
                "{name} ({kind}) documented but not on the first scrape"
            );
            documented += 1;
        }
    }
    assert!(
        documented >= 20,
        "only {documented} metrics read from the README's table"
    );

    // With every known label value, at 0 where only requests move it.
    let zero = |name: &str, labels: &[(&str, &str)]| {
        assert!(has(name, labels), "{name} {labels:?} missing on the first scrape");
        assert_eq!(value(&samples, name, labels), 0.0, "{name} {labels:?}");
    };
    for code in PROBLEM_CODES {
        zero("spray_rejections_total", &[("code", code)]);
    }
    for event in GATE_EVENTS {
        zero("spray_gate_events_total", &[("event", event)]);
    }
    for mode in ["even", "random"] {
        zero("spray_sprays_created_total", &[("mode", mode)]);
    }
    for operation in STORE_OPERATIONS {
        for outcome in ["ok", "error"] {
            let labels = [("operation", *operation), ("outcome", outcome)];
            assert!(has("spray_store_duration_seconds_count", &labels), "{labels:?}");
        }
    }
    for operation in ["insert_spray", "claim_share", "find_spray"] {
        zero("spray_store_duration_seconds_count", &[("operation", operation)]);
    }
    for route in ["/api/v1/spray", "/api/v1/receive", "/api/v1/spray/{token}"] {
        zero("http_requests_total", &[("route", route)]);
        zero("http_request_duration_seconds_count", &[("route", route)]);
    }
    zero(
        "http_requests_total",
        &[("route", "/api/v1/receive"), ("status", "503")],
    );
    for sweeper in SWEEPERS {
        for outcome in ["ok", "error"] {
            assert!(has(
                "spray_sweeper_passes_total",
                &[("sweeper", sweeper), ("outcome", outcome)]
            ));
        }
        assert!(has(
            "spray_sweeper_last_success_timestamp_seconds",
            &[("sweeper", sweeper)]
        ));
    }
    zero("spray_settlement_overdue_sprays", &[]);
    // Read at the scrape: the pool, the dependencies, the process (Prometheus' names).
    assert!(value(&samples, "spray_store_pool_connections", &[("backend", "sqlite")]) >= 1.0);
    assert_eq!(
        value(&samples, "spray_dependency_up", &[("dependency", "sql")]),
        1.0
    );
    assert!(
        !has("spray_dependency_up", &[("dependency", "redis")]),
        "no Redis is configured"
    );
    for name in [
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(has(name, &[]), "{name}");
    }
    assert!(value(&samples, "process_resident_memory_bytes", &[]) > 1_000_000.0);
    assert!(value(&samples, "process_open_fds", &[]) >= 3.0);
}
