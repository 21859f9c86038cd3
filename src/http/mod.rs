//! The HTTP layer: routes, the gateway check, identity extraction and problem+json.

pub mod api;
pub mod error;
pub mod extract;
pub mod idempotency;
mod ops;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use subtle::ConstantTimeEq;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::service::SprayService;
use error::ApiError;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub service: Arc<SprayService>,
    /// When set, `/api/` requests must carry `Authorization: Bearer <secret>`.
    pub gateway_secret: Option<Arc<str>>,
}

impl axum::extract::FromRef<AppState> for Arc<SprayService> {
    fn from_ref(state: &AppState) -> Arc<SprayService> {
        state.service.clone()
    }
}

/// The whole application as a router, ready to serve or to be driven by `oneshot` in tests.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/v1/spray", post(api::create_spray))
        .route("/api/v1/spray/{token}", get(api::lookup_spray))
        .route("/api/v1/receive", post(api::receive));
    // `Idempotency-Key` on the POST endpoints, inside the gateway check (see idempotency.rs).
    let api = api.layer(middleware::from_fn_with_state(state.clone(), idempotency::guard));
    Router::new()
        .merge(api)
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(state.clone(), require_gateway))
        .layer(TraceLayer::new_for_http())
        // A panic is a bug, but it must not take the connection down with a bare 500:
        // answer problem+json and log it.
        .layer(CatchPanicLayer::custom(|_panic| {
            tracing::error!("a request handler panicked");
            ApiError::Internal.into_response()
        }))
        .with_state(state)
}

/// The first check of every `/api/` request when a gateway secret is configured; the
/// operations endpoints stay open.
async fn require_gateway(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(secret) = &state.gateway_secret
        && request.uri().path().starts_with("/api/")
    {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        // Constant time, so the secret cannot be guessed byte by byte from timings.
        if !bool::from(presented.ct_eq(secret.as_bytes())) {
            return ApiError::InvalidGateway.into_response();
        }
    }
    next.run(request).await
}
