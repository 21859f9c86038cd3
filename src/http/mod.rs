//! The HTTP layer: routes, the gateway check, identity extraction and problem+json;
//! the request span, metrics and protection ([`middleware`]); the API document
//! ([`openapi`]).

pub mod api;
pub mod error;
pub mod extract;
pub mod idempotency;
pub mod middleware;
pub mod openapi;
pub mod ops;

use std::sync::Arc;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{Extension, Request, State};
use axum::http::header;
use axum::middleware::{self as axum_middleware, Next};
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::domain::Endpoint;
use crate::service::SprayService;
use error::ApiError;
pub use middleware::Limits;
use middleware::{observe, protect};

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

/// The whole application as a router, with these protection limits: ready to serve, or
/// to be driven by `oneshot` in tests.
pub fn router(state: AppState, limits: Limits) -> Router {
    // Every router of the process shares one recorder; the first one installs it.
    crate::telemetry::metrics::install();
    // Each route is registered together with its documentation, so the document
    // cannot miss a route.
    // The two POST routes: the body read and checked once, then `Idempotency-Key`.
    let json_route = |endpoint: Endpoint, route| {
        OpenApiRouter::new().routes(route).route_layer(
            ServiceBuilder::new()
                .layer(axum_middleware::from_fn(extract::check_json_body))
                .layer(axum_middleware::from_fn_with_state(
                    (state.clone(), endpoint),
                    idempotency::guard,
                )),
        )
    };
    // The API routes, past `--max-concurrent-requests` in flight refused at once. A route
    // layer wraps each route on its own, so the limit is a global one: one semaphore
    // shared by all of them.
    let api = OpenApiRouter::new()
        .merge(json_route(Endpoint::Spray, routes!(api::create_spray)))
        .merge(json_route(Endpoint::Receive, routes!(api::receive)))
        .routes(routes!(api::lookup_spray))
        .route_layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(middleware::shed))
                .load_shed()
                .layer(GlobalConcurrencyLimitLayer::new(limits.max_concurrent_requests)),
        );
    let (routes, document) = OpenApiRouter::with_openapi(openapi::base())
        .merge(api)
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::openapi_json))
        .split_for_parts();
    let document = openapi::complete(document, state.service.policy());
    let document = ops::OpenApiJson(serde_json::to_vec(&document).unwrap_or_default().into());
    Router::new()
        .merge(routes)
        // The Swagger UI bundle is large; gzip it when the browser accepts it.
        .merge(openapi::swagger_ui().layer(CompressionLayer::new()))
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        // One `layer` call for the whole stack, not one a layer: each call boxes every
        // route anew, and each request clones a route's boxes, and clones them again at
        // each `from_fn` below them (measured: a box allocated and freed per layer per
        // level on every request).
        .layer(
            ServiceBuilder::new()
                // Outermost, so that the span, the request id and the metrics cover
                // everything below, the shed and timed-out requests and the panics included.
                .layer(axum_middleware::from_fn(observe))
                // A panic is a bug, but it must not take the connection down with a bare
                // 500: answer problem+json and log it.
                .layer(CatchPanicLayer::custom(|_panic| {
                    tracing::error!("a request handler panicked");
                    ApiError::Internal.into_response()
                }))
                .layer(axum_middleware::from_fn_with_state(limits, protect))
                .layer(axum_middleware::from_fn_with_state(
                    state.clone(),
                    require_gateway,
                ))
                .layer(Extension(document)),
        )
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
