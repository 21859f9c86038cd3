//! The three API endpoints: request and answer shapes, and the handlers that translate
//! between them and the service.

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use axum::{Extension, Json};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};
use utoipa::ToSchema;

use super::error::ApiError;
use super::extract::{Caller, JsonRequest, LookupQuery, present};
use super::idempotency::respond;
use super::middleware::EffectStarted;
use super::openapi::{IdempotencyHeader, IdentityHeaders};
use crate::domain::{Amount, SplitMode, SprayCommand, SprayStatus, Token, UserId};
use crate::service::{CreatedSpray, SprayService};
use crate::store::{Effect, PendingKey, StoredAnswer};

/// `POST /api/v1/spray`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"amount": 4000, "recipient_count": 3, "mode": "even", "room_id": "TEST-ROOM-1"}))]
pub struct SprayRequest {
    /// The amount to split, in the smallest currency unit: 1 to `--max-amount`
    /// (1,000,000,000 by default), and at least `recipient_count`. `total_amount` is
    /// accepted instead, as an alias (never both).
    #[serde(alias = "total_amount")]
    #[schema(minimum = 1, example = 4000)]
    pub amount: u64,
    /// How many shares: 1 to `--max-recipients` (1,000 by default).
    #[schema(minimum = 1, example = 3)]
    pub recipient_count: u64,
    /// `even` (the default) or `random` (the "double mean" rule).
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable = false)]
    pub mode: Option<SplitMode>,
    /// The room, when the `X-ROOM-ID` header is not sent; both sent must agree.
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable = false, pattern = r"^[\x21-\x7E]{1,64}$", example = "TEST-ROOM-1")]
    pub room_id: Option<String>,
}

/// A new spray: its token and its windows.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"token": "IEY", "created_at": "2024-02-21T09:33:10.123Z",
    "receive_until": "2024-02-21T09:43:10.123Z", "lookup_until": "2024-02-28T09:33:10.123Z"}))]
pub struct SprayCreated {
    /// 3 characters of `[A-Za-z0-9]`, case-sensitive.
    #[schema(value_type = String, pattern = "^[A-Za-z0-9]{3}$", example = "IEY")]
    pub token: Token,
    /// RFC 3339, UTC, milliseconds.
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime, example = "2024-02-21T09:33:10.123Z")]
    pub created_at: DateTime<Utc>,
    /// Members may receive until this moment (excluded).
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime, example = "2024-02-21T09:43:10.123Z")]
    pub receive_until: DateTime<Utc>,
    /// The sprayer may look the spray up until this moment (excluded).
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime, example = "2024-02-28T09:33:10.123Z")]
    pub lookup_until: DateTime<Utc>,
}

/// `POST /api/v1/receive`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"token": "IEY", "room_id": "TEST-ROOM-1"}))]
pub struct ReceiveRequest {
    /// The spray's token: 3 characters of `[A-Za-z0-9]`.
    #[schema(pattern = "^[A-Za-z0-9]{3}$", example = "IEY")]
    pub token: String,
    /// The room, when the `X-ROOM-ID` header is not sent; both sent must agree.
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable = false, pattern = r"^[\x21-\x7E]{1,64}$", example = "TEST-ROOM-1")]
    pub room_id: Option<String>,
}

/// The share the caller received.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"received_amount": 1333}))]
pub struct Received {
    #[schema(value_type = u64, minimum = 1, example = 1333)]
    pub received_amount: Amount,
}

/// `GET /api/v1/spray/{token}`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "token": "IEY", "room_id": "TEST-ROOM-1",
    "created_at": "2024-02-21T09:33:10.123Z", "receive_until": "2024-02-21T09:43:10.123Z",
    "lookup_until": "2024-02-28T09:33:10.123Z", "status": "active",
    "total_amount": 4000, "recipient_count": 3, "received_amount": 1333, "refunded_amount": 0,
    "recipients": [{"user_id": 2, "amount": 1333, "received_at": "2024-02-21T09:33:15.456Z"}]
}))]
pub struct SprayDetails {
    #[schema(value_type = String, pattern = "^[A-Za-z0-9]{3}$", example = "IEY")]
    pub token: Token,
    #[schema(example = "TEST-ROOM-1")]
    pub room_id: String,
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub receive_until: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub lookup_until: DateTime<Utc>,
    pub status: SprayStatus,
    #[schema(value_type = u64, minimum = 1)]
    pub total_amount: Amount,
    #[schema(minimum = 1)]
    pub recipient_count: u32,
    /// The sum of the shares received so far.
    #[schema(value_type = u64)]
    pub received_amount: Amount,
    /// What went back to the sprayer when the window closed unfinished, 0 before.
    #[schema(value_type = u64)]
    pub refunded_amount: Amount,
    /// In order of receipt.
    pub recipients: Vec<Recipient>,
}

/// One received share.
#[derive(Debug, Serialize, ToSchema)]
pub struct Recipient {
    #[schema(value_type = i64, minimum = 1, example = 2)]
    pub user_id: UserId,
    #[schema(value_type = u64, minimum = 1, example = 1333)]
    pub amount: Amount,
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime, example = "2024-02-21T09:33:15.456Z")]
    pub received_at: DateTime<Utc>,
}

/// RFC 3339 in UTC with millisecond precision and a `Z` suffix.
fn rfc3339<S: Serializer>(t: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

fn parse_token(text: &str) -> Result<Token, ApiError> {
    Token::parse(text).ok_or_else(|| ApiError::invalid("token must be exactly 3 characters of A-Z, a-z, 0-9"))
}

/// The answer to an effect, as sent the first time and to every retry under its
/// idempotency key: the same bytes.
pub(super) fn effect_answer(effect: &Effect) -> StoredAnswer {
    match effect {
        Effect::Sprayed(created) => spray_answer(created),
        Effect::Received(amount) => received_answer(*amount),
    }
}

/// The answer to a spray.
fn spray_answer(created: &CreatedSpray) -> StoredAnswer {
    let body = SprayCreated {
        token: created.token.clone(),
        created_at: created.created_at,
        receive_until: created.receive_until,
        lookup_until: created.lookup_until,
    };
    StoredAnswer {
        status: StatusCode::CREATED.as_u16(),
        content_type: "application/json".to_owned(),
        location: Some(format!("/api/v1/spray/{}", created.token)),
        body: serde_json::to_vec(&body).unwrap_or_default(),
    }
}

/// The answer to a receive.
fn received_answer(received_amount: Amount) -> StoredAnswer {
    StoredAnswer {
        status: StatusCode::OK.as_u16(),
        content_type: "application/json".to_owned(),
        location: None,
        body: serde_json::to_vec(&Received { received_amount }).unwrap_or_default(),
    }
}

/// Spray money into a room
///
/// Splits `amount` into `recipient_count` shares, drawn now in the order they will be
/// received, and answers a fresh 3-character token that members of the room use to
/// receive a share within the receive window.
//
// `idempotency` is the pending `Idempotency-Key` row this request holds, if it sent a key
// (put there by the idempotency middleware): the answer is kept in the effect's transaction.
#[utoipa::path(
    post,
    path = "/api/v1/spray",
    tag = "spray",
    params(IdentityHeaders, IdempotencyHeader),
    request_body(content = SprayRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "The spray is created.", body = SprayCreated,
            headers(
                ("Location" = String, description = "`/api/v1/spray/{token}`: where the sprayer looks it up."),
                ("Idempotent-Replayed" = String, description = "`true` when this is the stored answer to an earlier request with the same Idempotency-Key.")
            )),
    )
)]
pub async fn create_spray(
    State(service): State<Arc<SprayService>>,
    idempotency: Option<Extension<PendingKey>>,
    effect: Option<Extension<EffectStarted>>,
    request: JsonRequest<SprayRequest>,
) -> Result<Response, ApiError> {
    let JsonRequest { caller, body } = request;
    let room = caller.required_room(body.room_id.as_deref(), "room_id")?;
    let command = SprayCommand::parse(
        caller.user,
        room,
        body.amount,
        body.recipient_count,
        body.mode.unwrap_or_default(),
        service.policy(),
    )
    .map_err(ApiError::InvalidRequest)?;
    let mode = command.mode();
    let kept = idempotency.map(|Extension(pending)| pending);
    if let Some(Extension(effect)) = effect {
        effect.mark();
    }
    let created = service.spray(command, kept).await?;
    tracing::Span::current().record("token", created.token.as_str());
    crate::telemetry::record_spray_created(mode);
    respond(effect_answer(&Effect::Sprayed(created)), false)
}

/// Receive a share
///
/// Gives the caller one share not yet given to anyone. The rules, in this order: the
/// spray must exist in the caller's room, the caller must not be the sprayer, a user
/// receives at most once, the receive window must be open, a share must be left.
#[utoipa::path(
    post,
    path = "/api/v1/receive",
    tag = "spray",
    params(IdentityHeaders, IdempotencyHeader),
    request_body(content = ReceiveRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The caller received this share.", body = Received,
            headers(
                ("Idempotent-Replayed" = String, description = "`true` when this is the stored answer to an earlier request with the same Idempotency-Key.")
            )),
    )
)]
// `idempotency`: see `create_spray`.
pub async fn receive(
    State(service): State<Arc<SprayService>>,
    idempotency: Option<Extension<PendingKey>>,
    effect: Option<Extension<EffectStarted>>,
    request: JsonRequest<ReceiveRequest>,
) -> Result<Response, ApiError> {
    let JsonRequest { caller, body } = request;
    let room = caller.required_room(body.room_id.as_deref(), "room_id")?;
    let token = parse_token(&body.token)?;
    tracing::Span::current().record("token", token.as_str());
    let kept = idempotency.map(|Extension(pending)| pending);
    if let Some(Extension(effect)) = effect {
        effect.mark();
    }
    let received_amount = service.receive(caller.user, room, token, kept).await?;
    crate::telemetry::record_claim();
    respond(effect_answer(&Effect::Received(received_amount)), false)
}

/// Look a spray up (the sprayer only)
///
/// Found by `(room, token)` when a room is given, else among the caller's own sprays.
/// Anyone but the sprayer gets `403 NOT_OWNER` (room given) or `404 SPRAY_NOT_FOUND`
/// (no room). After the lookup window: `410 LOOKUP_EXPIRED`.
#[utoipa::path(
    get,
    path = "/api/v1/spray/{token}",
    tag = "spray",
    params(
        IdentityHeaders,
        ("token" = String, Path, description = "The spray's token: 3 characters of `[A-Za-z0-9]`.", pattern = "^[A-Za-z0-9]{3}$", example = "IEY"),
        ("room_id" = Option<String>, Query, description = "The room, when the `X-ROOM-ID` header is not sent; both sent must agree.", pattern = r"^[\x21-\x7E]{1,64}$", example = "TEST-ROOM-1"),
    ),
    responses(
        (status = 200, description = "The spray, as its sprayer sees it.", body = SprayDetails),
    )
)]
pub async fn lookup_spray(
    State(service): State<Arc<SprayService>>,
    caller: Caller,
    uri: Uri,
    token: Result<Path<String>, PathRejection>,
) -> Result<Json<SprayDetails>, ApiError> {
    let Path(token) = token.map_err(|_| ApiError::invalid("the token in the path is not valid"))?;
    let query = LookupQuery::from_uri(&uri)?;
    let room = caller.room(query.room_id.as_deref(), "the room_id query parameter")?;
    let token = parse_token(&token)?;
    tracing::Span::current().record("token", token.as_str());
    let (record, state) = service.lookup(caller.user, room, token).await?;
    Ok(Json(SprayDetails {
        token: record.token,
        room_id: record.room.as_str().to_owned(),
        created_at: record.created_at,
        receive_until: record.receive_until,
        lookup_until: record.lookup_until,
        status: state.status,
        total_amount: record.total_amount,
        recipient_count: record.recipient_count,
        received_amount: state.received_amount,
        refunded_amount: state.refunded_amount,
        recipients: record
            .receipts
            .into_iter()
            .map(|r| Recipient {
                user_id: r.user,
                amount: r.amount,
                received_at: r.received_at,
            })
            .collect(),
    }))
}
