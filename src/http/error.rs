//! One error type for the HTTP boundary, answered as an RFC 9457 problem document.
//!
//! A 5xx answer says nothing internal: its cause goes to the log, inside the request's
//! span, and the client gets a generic detail.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::domain::{LookupRefusal, ReceiveRefusal};
use crate::service::ServiceError;
use crate::store::StoreError;

/// The largest request body, in bytes (the contract's 16 KiB): past it, `413
/// PAYLOAD_TOO_LARGE`. Defined beside the error that reports it, so that the extractors
/// depend on the errors and not the other way round.
pub const BODY_LIMIT: usize = 16 * 1024;

/// Seconds a client should wait before retrying a 503.
pub const RETRY_AFTER_SECONDS: u32 = 1;

#[derive(Debug)]
pub enum ApiError {
    /// 400 `INVALID_REQUEST`: malformed or out-of-range input; the detail says which.
    InvalidRequest(String),
    /// 401 `INVALID_USER`: `X-USER-ID` missing or invalid.
    InvalidUser,
    /// 401 `INVALID_GATEWAY`: the gateway secret is missing or wrong.
    InvalidGateway,
    /// 403 `OWN_SPRAY`: the sprayer tried to receive from their own spray.
    OwnSpray,
    /// 403 `NOT_OWNER`: someone other than the sprayer looked the spray up.
    NotOwner,
    /// 404 `SPRAY_NOT_FOUND`.
    SprayNotFound,
    /// 409 `ALREADY_RECEIVED`.
    AlreadyReceived,
    /// 409 `SPRAY_EXHAUSTED`.
    SprayExhausted { shares: u32 },
    /// 410 `RECEIVE_EXPIRED`.
    ReceiveExpired,
    /// 410 `LOOKUP_EXPIRED`.
    LookupExpired,
    /// 413 `PAYLOAD_TOO_LARGE`.
    PayloadTooLarge,
    /// 415 `UNSUPPORTED_MEDIA_TYPE`.
    UnsupportedMediaType,
    /// 404 `NOT_FOUND`: no such route (not in the contract's table; see the README).
    RouteNotFound,
    /// 405 `METHOD_NOT_ALLOWED`: the route exists, the method does not.
    MethodNotAllowed,
    /// 503 `UNAVAILABLE` with `Retry-After`; the detail is safe to show.
    Unavailable(&'static str),
    /// 500 `INTERNAL`: a bug or a corrupt store; details only in the log.
    Internal,
    /// 422 `IDEMPOTENCY_KEY_REUSED`: the key was used with a different request.
    IdempotencyKeyReused,
    /// 409 `IDEMPOTENCY_IN_PROGRESS`: the first request with this key is still running.
    IdempotencyInProgress,
}

/// The problem code of an error answer, left in the response's extensions so that the
/// outer middleware can count rejections by code without parsing the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProblemCode(pub &'static str);

#[derive(Serialize)]
struct Problem<'a> {
    r#type: &'static str,
    title: &'static str,
    status: u16,
    code: &'static str,
    detail: &'a str,
}

impl ApiError {
    pub fn invalid(detail: impl Into<String>) -> ApiError {
        ApiError::InvalidRequest(detail.into())
    }

    /// Status, stable code and title.
    pub fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        use ApiError::*;
        match self {
            InvalidRequest(_) => (StatusCode::BAD_REQUEST, "INVALID_REQUEST", "Invalid request"),
            InvalidUser => (StatusCode::UNAUTHORIZED, "INVALID_USER", "Invalid user"),
            InvalidGateway => (
                StatusCode::UNAUTHORIZED,
                "INVALID_GATEWAY",
                "Invalid gateway credentials",
            ),
            OwnSpray => (StatusCode::FORBIDDEN, "OWN_SPRAY", "Own spray"),
            NotOwner => (StatusCode::FORBIDDEN, "NOT_OWNER", "Not the owner"),
            SprayNotFound => (StatusCode::NOT_FOUND, "SPRAY_NOT_FOUND", "Spray not found"),
            AlreadyReceived => (StatusCode::CONFLICT, "ALREADY_RECEIVED", "Already received"),
            SprayExhausted { .. } => (StatusCode::CONFLICT, "SPRAY_EXHAUSTED", "Spray exhausted"),
            ReceiveExpired => (StatusCode::GONE, "RECEIVE_EXPIRED", "Receive window closed"),
            LookupExpired => (StatusCode::GONE, "LOOKUP_EXPIRED", "Lookup window closed"),
            PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "PAYLOAD_TOO_LARGE",
                "Payload too large",
            ),
            UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UNSUPPORTED_MEDIA_TYPE",
                "Unsupported media type",
            ),
            RouteNotFound => (StatusCode::NOT_FOUND, "NOT_FOUND", "Not found"),
            MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "METHOD_NOT_ALLOWED",
                "Method not allowed",
            ),
            Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "Service unavailable",
            ),
            Internal => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "Internal error"),
            IdempotencyKeyReused => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "IDEMPOTENCY_KEY_REUSED",
                "Idempotency key reused",
            ),
            IdempotencyInProgress => (
                StatusCode::CONFLICT,
                "IDEMPOTENCY_IN_PROGRESS",
                "Request in progress",
            ),
        }
    }

    /// The human-readable explanation; safe to show (a 5xx says nothing internal).
    pub fn detail(&self) -> String {
        use ApiError::*;
        match self {
            InvalidRequest(detail) => detail.clone(),
            InvalidUser => "X-USER-ID must be a decimal integer from 1 to 9223372036854775807".into(),
            InvalidGateway => "this service only accepts requests from its gateway".into(),
            OwnSpray => "the sprayer cannot receive from their own spray".into(),
            NotOwner => "only the sprayer can look a spray up".into(),
            SprayNotFound => "no spray with this token here".into(),
            AlreadyReceived => "you have already received a share of this spray".into(),
            SprayExhausted { shares } => format!("all {shares} shares have been received"),
            ReceiveExpired => "the receive window of this spray has closed".into(),
            LookupExpired => "the lookup window of this spray has closed".into(),
            PayloadTooLarge => format!("the request body is over {BODY_LIMIT} bytes"),
            UnsupportedMediaType => "the request body must be application/json".into(),
            RouteNotFound => "no such endpoint".into(),
            MethodNotAllowed => "this endpoint does not accept this method".into(),
            Unavailable(detail) => (*detail).into(),
            Internal => "something went wrong on our side; it has been logged".into(),
            IdempotencyKeyReused => "this Idempotency-Key was already used with a different request".into(),
            IdempotencyInProgress => {
                "a request with this Idempotency-Key is still being processed; retry shortly".into()
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, title) = self.parts();
        let detail = self.detail();
        let body = Problem {
            r#type: "about:blank",
            title,
            status: status.as_u16(),
            code,
            detail: &detail,
        };
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = (status, body).into_response();
        response.extensions_mut().insert(ProblemCode(code));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        response
    }
}

impl From<ServiceError> for ApiError {
    fn from(error: ServiceError) -> ApiError {
        match error {
            ServiceError::Invalid(detail) => ApiError::InvalidRequest(detail),
            ServiceError::Receive(refusal) => match refusal {
                ReceiveRefusal::NotFound => ApiError::SprayNotFound,
                ReceiveRefusal::OwnSpray => ApiError::OwnSpray,
                ReceiveRefusal::AlreadyReceived => ApiError::AlreadyReceived,
                ReceiveRefusal::Expired => ApiError::ReceiveExpired,
                ReceiveRefusal::Exhausted { shares } => ApiError::SprayExhausted { shares },
            },
            ServiceError::Lookup(refusal) => match refusal {
                LookupRefusal::NotFound => ApiError::SprayNotFound,
                LookupRefusal::NotOwner => ApiError::NotOwner,
                LookupRefusal::Expired => ApiError::LookupExpired,
            },
            ServiceError::Task(cause) => {
                tracing::error!(%cause, "an effect's task failed");
                ApiError::Internal
            }
            ServiceError::NoToken(cause) => {
                tracing::warn!(%cause, "no free token");
                ApiError::Unavailable("could not find a free token for this room and sprayer; try again")
            }
            ServiceError::Store(StoreError::Unavailable(cause) | StoreError::Conflict(cause)) => {
                tracing::warn!(%cause, "store unavailable");
                ApiError::Unavailable("the database is unavailable; try again shortly")
            }
            ServiceError::Store(StoreError::TokenTaken) => {
                ApiError::Unavailable("could not find a free token for this room and sprayer; try again")
            }
            ServiceError::Store(cause) => {
                tracing::error!(%cause, "store error");
                ApiError::Internal
            }
        }
    }
}
