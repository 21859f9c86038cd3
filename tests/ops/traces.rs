//! Traces: a W3C `traceparent` is honoured (its trace id in the answer and in every log
//! line of the request), a missing or malformed one starts a fresh trace, and with
//! `--otlp-endpoint` the request spans reach a collector, flushed at shutdown, without a
//! collector that is down ever holding a request up.
//!
//! The answers are checked through the router; the log lines and the export through the
//! real binary, whose subscriber is the one production installs (a subscriber installed
//! in this test binary would race with its other tests, see `ops_logging.rs`).

use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use serde_json::{Value, json};

use crate::common::process::{Server, assert_refuses_to_start, client, database_url, free_port};
use crate::common::{OWNER, ROOM, TestApp};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn traceparent(flags: &str) -> String {
    format!("00-{TRACE}-{CALLER_SPAN}-{flags}")
}

/// The answer's `traceparent`, split into trace id, span id and flags.
fn echoed(headers: &HeaderMap) -> (String, String, String) {
    let value = headers["traceparent"].to_str().unwrap();
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!(parts[0], "00", "{value}");
    (parts[1].to_owned(), parts[2].to_owned(), parts[3].to_owned())
}

fn is_hex_id(id: &str, len: usize) -> bool {
    id.len() == len
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && id.bytes().any(|b| b != b'0')
}

fn get_with(path: &str, traceparent: &str) -> Request<Body> {
    Request::builder()
        .uri(path)
        .header("traceparent", traceparent)
        .header("x-user-id", OWNER.to_string())
        .header("x-room-id", ROOM)
        .body(Body::empty())
        .unwrap()
}

#[tokio::test]
async fn a_traceparent_is_answered_with_its_trace_id_and_a_server_span_of_its_own() {
    let app = TestApp::new().await;
    for path in ["/healthz", "/api/v1/spray/abc", "/nowhere"] {
        for flags in ["01", "00"] {
            let answer = app.send(get_with(path, &traceparent(flags))).await;
            assert_eq!(answer.headers["x-trace-id"], TRACE, "{path}");
            let (trace, span, echoed_flags) = echoed(&answer.headers);
            assert_eq!(trace, TRACE, "{path}");
            assert!(is_hex_id(&span, 16), "{path}: {span}");
            assert_ne!(span, CALLER_SPAN, "{path}: the caller's span is not ours");
            // The caller's sampling decision stands.
            assert_eq!(echoed_flags, flags, "{path}");
        }
    }
}

#[tokio::test]
async fn a_request_without_a_traceparent_starts_a_fresh_trace() {
    let app = TestApp::new().await;
    let first = app.get("/api/v1/spray/abc", OWNER, Some(ROOM)).await;
    let second = app.get("/api/v1/spray/abc", OWNER, Some(ROOM)).await;
    for answer in [&first, &second] {
        let id = answer.headers["x-trace-id"].to_str().unwrap();
        assert!(is_hex_id(id, 32), "{id}");
        assert_eq!(echoed(&answer.headers).0, id);
    }
    assert_ne!(first.headers["x-trace-id"], second.headers["x-trace-id"]);
}

#[tokio::test]
async fn a_malformed_traceparent_is_ignored_and_the_request_served_as_usual() {
    let app = TestApp::new().await;
    let long = format!("00-{TRACE}-{CALLER_SPAN}-01{}", "0".repeat(5000));
    let malformed = [
        "garbage",
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-+4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
        long.as_str(),
    ];
    for (i, bad) in malformed.into_iter().enumerate() {
        let request = Request::builder()
            .method("POST")
            .uri("/api/v1/spray")
            .header("content-type", "application/json")
            .header("x-user-id", OWNER.to_string())
            .header("x-room-id", format!("ROOM-{i}"))
            .header("traceparent", bad)
            .header("tracestate", "vendor=value")
            .body(Body::from(
                json!({"amount": 100, "recipient_count": 2}).to_string(),
            ))
            .unwrap();
        app.tokens.push("IEY");
        let answer = app.send(request).await;
        answer.assert_status(201);
        let id = answer.headers["x-trace-id"].to_str().unwrap();
        assert!(is_hex_id(id, 32), "{bad:?}: {id}");
        assert!(
            !id.contains("4bf92f3577b34da6a3ce929d0e0e47"),
            "{bad:?} was taken: {id}"
        );
        // A fresh trace that nobody records says so, and the caller's state went with its
        // parent.
        assert_eq!(echoed(&answer.headers).2, "00", "{bad:?}");
        assert!(!answer.headers.contains_key("tracestate"), "{bad:?}");
    }
}

/// The lines of `log` that parse as JSON.
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

async fn post_spray(
    client: &reqwest::Client,
    server: &Server,
    room: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = client
        .post(server.url("/api/v1/spray"))
        .header("x-user-id", "1")
        .header("x-room-id", room)
        .json(&json!({"amount": 1000, "recipient_count": 3}));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let answer = request.send().await.unwrap();
    assert_eq!(answer.status(), 201);
    answer
}

/// A receive by user 2; its answer's trace id.
async fn receive(
    client: &reqwest::Client,
    server: &Server,
    room: &str,
    token: &str,
    headers: &[(&str, &str)],
) -> String {
    let mut request = client
        .post(server.url("/api/v1/receive"))
        .header("x-user-id", "2")
        .header("x-room-id", room)
        .json(&json!({ "token": token }));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let answer = request.send().await.unwrap();
    assert_eq!(answer.status(), 200);
    answer.headers()["x-trace-id"].to_str().unwrap().to_owned()
}

async fn token_of(answer: reqwest::Response) -> String {
    let body: Value = answer.json().await.unwrap();
    body["token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn the_trace_id_is_in_every_log_line_of_its_request_in_json_and_in_text() {
    let dir = tempfile::tempdir().unwrap();
    let client = client();
    // A Redis that is not there: the spray's write, in a task of its own, logs that the
    // gate is unavailable, so that request logs more than its `answered` line.
    let no_redis = format!("redis://127.0.0.1:{}", free_port());
    let traced = traceparent("01");
    for format in ["json", "text"] {
        let server = Server::start(
            dir.path(),
            &format!("sqlite://{}", dir.path().join(format!("{format}.db")).display()),
            &["--log-format", format, "--redis-url", &no_redis],
            &[],
        )
        .await;
        let traced_id = format!("spray-{format}");
        let spray = post_spray(
            &client,
            &server,
            ROOM,
            &[("traceparent", &traced), ("x-request-id", &traced_id)],
        )
        .await;
        let token = token_of(spray).await;
        let fresh_id = format!("receive-{format}");
        let fresh_trace = receive(&client, &server, ROOM, &token, &[("x-request-id", &fresh_id)]).await;

        let log = server.log_text();
        for (request_id, trace, at_least) in [(&traced_id, TRACE, 2), (&fresh_id, fresh_trace.as_str(), 1)] {
            let lines: Vec<String> = if format == "json" {
                json_lines(&log)
                    .into_iter()
                    .filter(|line| line["span"]["request_id"] == request_id.as_str())
                    .inspect(|line| assert_eq!(line["span"]["trace_id"], trace, "{line}"))
                    .map(|line| line.to_string())
                    .collect()
            } else {
                log.lines()
                    .filter(|line| line.contains(&format!("request_id=\"{request_id}\"")))
                    .inspect(|line| assert!(line.contains(&format!(" trace_id={trace}")), "{line}"))
                    .map(str::to_owned)
                    .collect()
            };
            assert!(
                lines.len() >= at_least,
                "{format} {request_id}: {lines:#?}\n{log}"
            );
        }
        // The gate's line, logged in the write's own task, is the spray's.
        assert!(
            log.lines()
                .any(|line| line.contains("redis gate unavailable") && line.contains(&traced_id)),
            "{log}"
        );
    }
}

/// A stand-in OpenTelemetry collector: records every OTLP/HTTP traces post.
struct Collector {
    url: String,
    posts: Arc<Mutex<Vec<Bytes>>>,
}

impl Collector {
    async fn start() -> Collector {
        let posts = Arc::new(Mutex::new(Vec::new()));
        let kept = posts.clone();
        let router = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: Bytes| {
                let kept = kept.clone();
                async move {
                    kept.lock().unwrap().push(body);
                    // An empty ExportTraceServiceResponse: everything accepted.
                    ([("content-type", "application/x-protobuf")], Bytes::new())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        Collector { url, posts }
    }

    fn spans(&self) -> Vec<Span> {
        self.posts
            .lock()
            .unwrap()
            .iter()
            .flat_map(|body| {
                ExportTraceServiceRequest::decode(body.clone())
                    .expect("an OTLP protobuf body")
                    .resource_spans
            })
            .inspect(|resource| {
                let service = resource
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| kv.value.as_ref()?.value.clone());
                assert_eq!(service, Some(AnyValue::StringValue("spray".into())));
            })
            .flat_map(|resource| resource.scope_spans)
            .flat_map(|scope| scope.spans)
            .collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn with_otlp_export_on_request_spans_reach_the_collector_by_shutdown() {
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(
        dir.path(),
        &database_url(dir.path()),
        &["--otlp-endpoint", &collector.url],
        &[],
    )
    .await;
    let client = client();
    let traced = post_spray(&client, &server, ROOM, &[("traceparent", &traceparent("01"))]).await;
    let (_, server_span, flags) = echoed(traced.headers());
    assert_eq!(flags, "01");
    let fresh = post_spray(&client, &server, "ROOM-2", &[]).await;
    let fresh_trace = fresh.headers()["x-trace-id"].to_str().unwrap().to_owned();
    // A caller that does not sample: its trace is kept, its span not exported.
    let unsampled = post_spray(&client, &server, "ROOM-3", &[("traceparent", &traceparent("00"))]).await;
    let (_, unsampled_span, flags) = echoed(unsampled.headers());
    assert_eq!(flags, "00");
    // Well before the batch's scheduled export (5 s): what arrives was flushed at shutdown.
    assert!(server.terminate().await.success(), "{}", server.log_text());

    let spans = collector.spans();
    let span = spans
        .iter()
        .find(|span| hex(&span.span_id) == server_span)
        .unwrap_or_else(|| panic!("no span {server_span} in {spans:#?}"));
    assert_eq!(hex(&span.trace_id), TRACE);
    assert_eq!(hex(&span.parent_span_id), CALLER_SPAN);
    assert_eq!(span.name, "POST /api/v1/spray");
    assert_eq!(span.kind, i32::from(SpanKind::Server));
    // The request span's fields are attributes, its log lines events.
    let route = span
        .attributes
        .iter()
        .find(|kv| kv.key == "route")
        .and_then(|kv| kv.value.as_ref()?.value.clone());
    assert_eq!(route, Some(AnyValue::StringValue("/api/v1/spray".into())));
    assert!(
        span.events.iter().any(|event| event.name == "answered"),
        "{span:#?}"
    );
    let fresh_span = spans
        .iter()
        .find(|span| hex(&span.trace_id) == fresh_trace)
        .unwrap_or_else(|| panic!("no span of trace {fresh_trace} in {spans:#?}"));
    assert!(fresh_span.parent_span_id.is_empty(), "{fresh_span:#?}");
    assert!(
        !spans.iter().any(|span| hex(&span.span_id) == unsampled_span),
        "an unsampled span was exported"
    );
}

#[tokio::test]
async fn a_collector_that_is_down_or_silent_never_holds_a_request_up() {
    // One refuses connections; the other accepts them and never answers.
    let refused = format!("http://127.0.0.1:{}", free_port());
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let held = Arc::new(Mutex::new(Vec::new()));
    let holding = held.clone();
    tokio::spawn(async move {
        while let Ok((connection, _)) = silent.accept().await {
            holding.lock().unwrap().push(connection);
        }
    });
    let client = client();
    for endpoint in [refused, silent_url] {
        let dir = tempfile::tempdir().unwrap();
        let mut server = Server::start(
            dir.path(),
            &database_url(dir.path()),
            &["--otlp-endpoint", &endpoint],
            &[],
        )
        .await;
        for room in ["R-1", "R-2", "R-3"] {
            let started = std::time::Instant::now();
            post_spray(&client, &server, room, &[("traceparent", &traceparent("01"))]).await;
            assert!(
                started.elapsed() < std::time::Duration::from_secs(2),
                "{endpoint}: a spray took {:?}",
                started.elapsed()
            );
        }
        // Shutdown gives up on the collector within its bound (terminate() fails the test
        // past 20 s) and exits cleanly.
        assert!(
            server.terminate().await.success(),
            "{endpoint}: {}",
            server.log_text()
        );
    }
}

#[tokio::test]
async fn an_otlp_endpoint_that_cannot_be_used_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    for endpoint in ["collector:4318", "https://collector:4318", "http://"] {
        assert_refuses_to_start(
            dir.path(),
            &format!("--otlp-endpoint {endpoint}"),
            &["--otlp-endpoint", endpoint],
            &[],
            "--otlp-endpoint",
        )
        .await;
    }
    // The environment variable is the same setting.
    assert_refuses_to_start(
        dir.path(),
        "SPRAY_OTLP_ENDPOINT",
        &[],
        &[("SPRAY_OTLP_ENDPOINT", "ftp://collector")],
        "--otlp-endpoint",
    )
    .await;
}
