//! Operations endpoints: liveness and readiness.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::AppState;

/// 200 while the process runs.
pub async fn healthz() -> &'static str {
    "ok"
}

/// 200 when the SQL store answers, else 503; the body says what each store answered.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let sql_up = state.service.store().ping().await.is_ok();
    // Redis down degrades speed, not correctness: it does not make the instance unready.
    let redis = match state.service.gate() {
        None => "disabled",
        Some(gate) if gate.ping().await => "up",
        Some(_) => "down",
    };
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
