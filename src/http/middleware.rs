//! What wraps every request: its span, request id and metrics ([`observe`]), and the
//! protection from slow and flooding clients ([`protect`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;
use tracing::field::Empty;

use super::error::{ApiError, ProblemCode};
use crate::telemetry::metrics as measure;
use crate::telemetry::trace::RequestTrace;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest request id we take from a client; a longer one is replaced.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// The route label of a request no route matched: never the raw path, which a scanner
/// could turn into one time series per URL it tries.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// The outermost layer: gives the request an id (the client's `X-Request-Id` when it is
/// sane, else a fresh UUID) and a trace (the caller's W3C `traceparent` when it is
/// well-formed, else a fresh one), runs it inside one span, echoes the id and the trace
/// back, logs the outcome and records the request's metrics.
pub async fn observe(mut request: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = measure::method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED_ROUTE, MatchedPath::as_str)
        .to_owned();
    let request_id = request
        .headers()
        .get(&X_REQUEST_ID)
        .filter(|id| is_sane_request_id(id))
        .cloned()
        .unwrap_or_else(new_request_id);
    request
        .headers_mut()
        .insert(X_REQUEST_ID.clone(), request_id.clone());

    let id = request_id.to_str().unwrap_or_default();
    // Health checks and scrapes come every few seconds: keep them out of the info log.
    let quiet = is_quiet(&route);
    let span = if quiet {
        tracing::debug_span!(
            "request",
            method,
            route = route.as_str(),
            request_id = id,
            trace_id = Empty,
            user_id = Empty,
            token = Empty,
            otel.name = Empty,
            otel.kind = Empty
        )
    } else {
        tracing::info_span!(
            "request",
            method,
            route = route.as_str(),
            request_id = id,
            trace_id = Empty,
            user_id = Empty,
            token = Empty,
            otel.name = Empty,
            otel.kind = Empty
        )
    };
    let trace = RequestTrace::start(&span, request.headers(), || format!("{method} {route}"));

    let in_flight = measure::InFlight::start();
    let mut response = next.run(request).instrument(span.clone()).await;
    drop(in_flight);

    let elapsed = start.elapsed();
    let status = response.status();
    let code = response.extensions().get::<ProblemCode>().map(|code| code.0);
    if let Some(code) = code {
        measure::record_rejection(code);
    }
    measure::record_request(method, &route, status.as_u16(), elapsed);
    // Whole microseconds, so the log shows 0.757 rather than 0.7568889999999999.
    let latency_ms = f64::from(u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX)) / 1000.0;
    trace.answered(&span, status.as_u16());
    span.in_scope(|| {
        let status = status.as_u16();
        if status >= 500 {
            tracing::warn!(status, code, latency_ms, "answered");
        } else if quiet {
            tracing::debug!(status, code, latency_ms, "answered");
        } else {
            tracing::info!(status, code, latency_ms, "answered");
        }
    });
    response.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
    trace.write_headers(response.headers_mut());
    response
}

/// Routes whose requests are logged at debug, not info.
fn is_quiet(route: &str) -> bool {
    matches!(route, "/healthz" | "/readyz" | "/metrics") || route.starts_with("/docs")
}

/// 1 to 128 visible ASCII characters: anything else would be a log-injection or
/// cardinality risk, and is replaced by a fresh id.
fn is_sane_request_id(id: &HeaderValue) -> bool {
    let bytes = id.as_bytes();
    (1..=MAX_REQUEST_ID_LEN).contains(&bytes.len()) && bytes.iter().all(|b| (0x21..=0x7E).contains(b))
}

/// A random (version 4) UUID. Its bytes come from the thread's CSPRNG (`rand::random`),
/// not from a system call each: an id only tells requests apart in the logs, and asking
/// the OS for each (`Uuid::new_v4`) was one `getrandom` call on every request, whatever
/// its route.
fn new_request_id() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    // A hyphenated UUID is 36 ASCII characters: always a valid header value.
    HeaderValue::from_str(&id.to_string()).unwrap_or(HeaderValue::from_static("-"))
}

/// The protection settings.
#[derive(Debug, Clone)]
pub struct Limits {
    /// API requests served at once; past it, 503 at once (see [`shed`]).
    pub max_concurrent_requests: usize,
    /// How long a request may run before its effect begins (see [`protect`]).
    pub timeout: Duration,
}

impl Limits {
    pub fn new(max_concurrent_requests: usize, timeout: Duration) -> Limits {
        Limits {
            max_concurrent_requests,
            timeout,
        }
    }
}

/// The answer to an API request refused by tower's load-shedding layer because
/// `--max-concurrent-requests` are in flight (a client told "503, retry after 1 s" does
/// better than one that waits in an unbounded queue). The layers are put on the API routes
/// only: the operations endpoints must keep answering when the API is saturated, or an
/// orchestrator would kill a busy but healthy instance.
pub async fn shed(_overloaded: tower::BoxError) -> ApiError {
    measure::record_shed();
    tracing::warn!("at --max-concurrent-requests: shedding the request");
    ApiError::Unavailable("the service is at capacity; try again shortly")
}

/// Put in every request's extensions by [`protect`]; a handler marks it when its effect
/// (a spray's or a claim's write) begins. From then on the request's outcome is the
/// store's to tell, and the time-out waits for it instead of answering 503 for work that
/// may have been done: a 5xx must mean nothing changed. The effect itself is bounded by
/// the store's own limits (pool wait, Redis call time-out, the commit check).
#[derive(Debug, Clone, Default)]
pub struct EffectStarted(Arc<AtomicBool>);

impl EffectStarted {
    pub fn mark(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn is_marked(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Answers a request that runs past the timeout before its effect began with a clean
/// 503. Hand-written rather than tower's timeout layer, which would cut every request
/// alike: a request whose effect has begun is never cut (see [`EffectStarted`]), it is
/// answered with what really happened, however long the store takes to say.
pub async fn protect(State(limits): State<Limits>, mut request: Request, next: Next) -> Response {
    let effect = EffectStarted::default();
    request.extensions_mut().insert(effect.clone());
    let mut served = std::pin::pin!(next.run(request));
    match tokio::time::timeout(limits.timeout, served.as_mut()).await {
        Ok(response) => response,
        Err(_) if effect.is_marked() => {
            tracing::warn!(timeout = ?limits.timeout, "past --request-timeout with its effect under way: waiting for its outcome");
            served.await
        }
        Err(_) => {
            measure::record_timeout();
            tracing::warn!(timeout = ?limits.timeout, "the request ran past --request-timeout");
            ApiError::Unavailable("the request took too long; try again shortly").into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::Body;
    use axum::extract::Extension;
    use axum::routing::post;
    use tokio::sync::{Mutex, oneshot};
    use tower::ServiceExt;

    use super::*;

    /// A router whose one API route waits for `finish`, after marking its effect begun
    /// when `marks` is set; the time-out is one second.
    fn waiting_app(marks: bool) -> (Router, oneshot::Sender<()>) {
        let (finish, finished) = oneshot::channel::<()>();
        let finished = Arc::new(Mutex::new(Some(finished)));
        let handler = move |Extension(effect): Extension<EffectStarted>| {
            let finished = finished.clone();
            async move {
                if marks {
                    effect.mark();
                }
                if let Some(finished) = finished.lock().await.take() {
                    let _ = finished.await;
                }
                "done"
            }
        };
        let limits = Limits::new(8, Duration::from_secs(1));
        let app = Router::new()
            .route("/api/effect", post(handler))
            .layer(axum::middleware::from_fn_with_state(limits, protect));
        (app, finish)
    }

    fn request() -> Request {
        Request::builder()
            .method("POST")
            .uri("/api/effect")
            .body(Body::empty())
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_whose_effect_began_is_answered_with_its_outcome_past_the_timeout() {
        let (app, finish) = waiting_app(true);
        let answer = tokio::spawn(app.oneshot(request()));
        // Paused time: this jumps far past the one-second time-out at once.
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(
            !answer.is_finished(),
            "the time-out cut a request whose effect had begun"
        );
        finish.send(()).unwrap();
        let answer = answer.await.unwrap().unwrap();
        assert_eq!(answer.status(), axum::http::StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_whose_effect_has_not_begun_is_cut_at_the_timeout() {
        let (app, _finish) = waiting_app(false);
        let begun = tokio::time::Instant::now();
        let answer = app.oneshot(request()).await.unwrap();
        assert_eq!(answer.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(begun.elapsed(), Duration::from_secs(1));
    }

    #[test]
    fn request_ids_are_visible_ascii_of_sane_length() {
        assert!(is_sane_request_id(&HeaderValue::from_static("abc-123")));
        assert!(!is_sane_request_id(&HeaderValue::from_static("")));
        assert!(!is_sane_request_id(&HeaderValue::from_static("a b")));
        let long = "x".repeat(MAX_REQUEST_ID_LEN + 1);
        assert!(!is_sane_request_id(&HeaderValue::from_str(&long).unwrap()));
        assert_eq!(new_request_id().len(), 36);
    }

    #[test]
    fn fresh_request_ids_are_distinct_version_4_uuids() {
        let ids: std::collections::HashSet<String> = (0..1000)
            .map(|_| new_request_id().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            let id = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(id.get_version_num(), 4, "{id}");
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122, "{id}");
        }
    }
}
