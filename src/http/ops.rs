//! Operations endpoints: liveness, readiness, metrics and the API document.

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;

/// Liveness: 200 while the process runs
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The process runs.", body = String, content_type = "text/plain", example = "ok"))
)]
pub async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: 200 when the SQL store answers, else 503
///
/// The body says what each store answered. A Redis outage alone degrades speed, not
/// correctness, so it does not make the instance unready.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "The SQL store answers: the instance can serve.", body = Object, content_type = "application/json",
            example = json!({"ready": true, "sql": "up", "redis": "disabled"})),
        (status = 503, description = "The SQL store does not answer: take the instance out of service.", body = Object, content_type = "application/json",
            example = json!({"ready": false, "sql": "down", "redis": "disabled"})),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let sql_up = state.service.store().ping().await.is_ok();
    // Redis down degrades speed, not correctness: it does not make the instance unready.
    let redis = state.service.claims().redis_status().await.as_str();
    let status = if sql_up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": sql_up,
        "sql": if sql_up { "up" } else { "down" },
        "redis": redis,
    });
    (status, Json(body))
}

/// The Prometheus text exposition format, version 0.0.4.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Prometheus metrics
///
/// Request counts and latency histograms by matched route, method and status; sprays,
/// claims, rejections by problem code, refunds; Redis gate events; store latency.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Every metric, in the Prometheus text format.", body = String, content_type = "text/plain"))
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    // The dependencies are asked at each scrape, each within a bound, so that a stalled
    // database makes the scrape say "down" instead of timing it out (no data at all).
    let bound = std::time::Duration::from_secs(1);
    let (sql, redis) = tokio::join!(
        tokio::time::timeout(bound, state.service.store().ping()),
        tokio::time::timeout(bound, state.service.claims().redis_status()),
    );
    let redis = redis.unwrap_or(crate::claim::RedisStatus::Down);
    crate::telemetry::metrics::record_dependencies(matches!(sql, Ok(Ok(()))), redis);
    let pool = state.service.store().pool_use();
    crate::telemetry::record_pool_use(pool.backend, pool.open, pool.idle);
    let text = crate::telemetry::metrics::render();
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(PROMETHEUS_TEXT))],
        text,
    )
        .into_response()
}

/// The OpenAPI document, serialized once when the router is built.
#[derive(Clone)]
pub struct OpenApiJson(pub axum::body::Bytes);

/// This OpenAPI 3.1 document, generated from the code
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API.", body = Object, content_type = "application/json"))
)]
pub async fn openapi_json(Extension(document): Extension<OpenApiJson>) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        document.0,
    )
        .into_response()
}
