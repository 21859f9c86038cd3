//! Turning a raw request into a caller and a parsed body, in the contract's order of
//! defects: `PAYLOAD_TOO_LARGE`, `UNSUPPORTED_MEDIA_TYPE`, `INVALID_USER`, then
//! `INVALID_REQUEST` (`INVALID_GATEWAY` comes first, in a middleware). A POST body is read
//! and checked once, by [`check_json_body`], the outermost layer of the two POST routes.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Deserializer};

use super::error::{ApiError, BODY_LIMIT};
use crate::domain::{RoomId, UserId};

pub static X_USER_ID: HeaderName = HeaderName::from_static("x-user-id");
pub static X_ROOM_ID: HeaderName = HeaderName::from_static("x-room-id");

/// Who is calling, from the gateway's headers.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: UserId,
    /// The room from `X-ROOM-ID`, if the header was sent.
    pub header_room: Option<RoomId>,
}

impl Caller {
    fn from_headers(headers: &HeaderMap) -> Result<Caller, ApiError> {
        let user = single_header(headers, &X_USER_ID)
            .ok()
            .flatten()
            .and_then(UserId::parse)
            .ok_or(ApiError::InvalidUser)?;
        // Into the request's span, so every line logged from here on names the caller.
        tracing::Span::current().record("user_id", user.get());
        let header_room = match single_header(headers, &X_ROOM_ID) {
            Ok(None) => None,
            Ok(Some(text)) => Some(RoomId::parse(text).ok_or_else(|| invalid_room("X-ROOM-ID"))?),
            Err(()) => return Err(invalid_room("X-ROOM-ID")),
        };
        Ok(Caller { user, header_room })
    }

    /// The effective room: the header's, the body's or the query's; both given and
    /// different is refused, since we cannot tell which one the client meant.
    pub fn room(&self, other: Option<&str>, other_name: &str) -> Result<Option<RoomId>, ApiError> {
        let other = other
            .map(|text| RoomId::parse(text).ok_or_else(|| invalid_room(other_name)))
            .transpose()?;
        match (&self.header_room, other) {
            (Some(header), Some(other)) if *header != other => Err(ApiError::invalid(format!(
                "X-ROOM-ID and {other_name} name different rooms"
            ))),
            (Some(header), _) => Ok(Some(header.clone())),
            (None, other) => Ok(other),
        }
    }

    /// Like [`Caller::room`], for endpoints that cannot work without a room.
    pub fn required_room(&self, other: Option<&str>, other_name: &str) -> Result<RoomId, ApiError> {
        self.room(other, other_name)?.ok_or_else(|| {
            ApiError::invalid(format!(
                "a room is required: send the X-ROOM-ID header or {other_name}"
            ))
        })
    }
}

fn invalid_room(source: &str) -> ApiError {
    ApiError::invalid(format!("{source} must be 1 to 64 visible ASCII characters"))
}

/// The value of a header sent at most once, as visible ASCII. `Err` when it is sent
/// twice or is not visible ASCII.
fn single_header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Result<Option<&'a str>, ()> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(());
    }
    first.map(|v| v.to_str().map_err(|_| ())).transpose()
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Caller::from_headers(&parts.headers)
    }
}

/// A POST body, read once and checked by [`check_json_body`] in the contract's order of
/// defects, up to and including JSON syntax: the caller, and the body's bytes (valid JSON).
/// The idempotency layer fingerprints it and the handler's [`JsonRequest`] parses it, so
/// neither reads or checks the body again.
#[derive(Debug, Clone)]
pub struct CheckedBody {
    pub caller: Caller,
    pub bytes: Bytes,
}

/// The first layer of the two POST routes: reads the body once, bounded by
/// [`BODY_LIMIT`], and answers its defects in the contract's order (`PAYLOAD_TOO_LARGE`,
/// `UNSUPPORTED_MEDIA_TYPE`, `INVALID_USER`, then `INVALID_REQUEST` for a body that is not
/// JSON); puts the [`CheckedBody`] in the request's extensions for the layers and handler
/// inside.
pub async fn check_json_body(request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    match read_checked(&parts.headers, body).await {
        Ok(checked) => {
            parts.extensions.insert(checked);
            next.run(Request::from_parts(parts, Body::empty())).await
        }
        Err(error) => error.into_response(),
    }
}

async fn read_checked(headers: &HeaderMap, body: Body) -> Result<CheckedBody, ApiError> {
    let declared_too_large = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|len| len > u64::try_from(BODY_LIMIT).unwrap_or(u64::MAX));
    if declared_too_large {
        return Err(ApiError::PayloadTooLarge);
    }
    let bytes = axum::body::to_bytes(body, BODY_LIMIT).await.map_err(|error| {
        if is_length_limit(&error) {
            ApiError::PayloadTooLarge
        } else {
            ApiError::invalid("the request body could not be read")
        }
    })?;
    if !is_json(headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let caller = Caller::from_headers(headers)?;
    serde_json::from_slice::<IgnoredAny>(&bytes)
        .map_err(|e| ApiError::invalid(format!("the JSON body is not valid: {e}")))?;
    // serde reads a struct from a JSON array too (`[10, 2]` would be a spray of 10 over 2
    // shares), so anything but an object is refused here, before any layer reads it.
    if !is_json_object(&bytes) {
        return Err(ApiError::invalid(
            "the JSON body must be an object, not an array, a string, a number, a boolean or null",
        ));
    }
    Ok(CheckedBody { caller, bytes })
}

/// Whether `bytes`, already known to be one valid JSON value, is an object: a valid value
/// is an object exactly when its first character past the whitespace JSON allows is `{`.
fn is_json_object(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .is_some_and(|b| *b == b'{')
}

/// A POST with a JSON body: the caller and the body parsed into `T` (wrong types, unknown,
/// missing or repeated fields are `INVALID_REQUEST`), from the [`CheckedBody`].
#[derive(Debug)]
pub struct JsonRequest<T> {
    pub caller: Caller,
    pub body: T,
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for JsonRequest<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Some(CheckedBody { caller, bytes }) = parts.extensions.remove::<CheckedBody>() else {
            tracing::error!("a JSON route without the check_json_body layer");
            return Err(ApiError::Internal);
        };
        let body = serde_json::from_slice::<T>(&bytes)
            .map_err(|e| ApiError::invalid(format!("the JSON body is not valid: {e}")))?;
        Ok(JsonRequest { caller, body })
    }
}

pub(super) fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// `Content-Type: application/json`, parameters such as `charset=utf-8` allowed.
pub(super) fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// The query of `GET /api/v1/spray/{token}`: only `room_id` is read; other parameters
/// (cache busters) are ignored, a repeated `room_id` is refused.
#[derive(Debug, Default, Deserialize)]
pub struct LookupQuery {
    pub room_id: Option<String>,
}

impl LookupQuery {
    pub fn from_uri(uri: &Uri) -> Result<LookupQuery, ApiError> {
        axum::extract::Query::<LookupQuery>::try_from_uri(uri)
            .map(|query| query.0)
            .map_err(|_| ApiError::invalid("the query string is not valid (room_id given twice?)"))
    }
}

/// For optional JSON fields: absent is `None`, but an explicit `null` is refused
/// (the contract gives `null` no meaning).
pub fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(deserializer).map(Some)
}
