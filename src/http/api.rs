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

use super::error::ApiError;
use super::extract::{Caller, JsonRequest, LookupQuery, present};
use super::idempotency::respond;
use crate::domain::{Amount, SplitMode, SprayStatus, Token, UserId};
use crate::service::{CreatedSpray, RenderSpray, SprayCommand, SprayService};
use crate::store::{IdempotencySlot, IdempotencyWrite, StoredAnswer};

/// `POST /api/v1/spray`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SprayRequest {
    #[serde(alias = "total_amount")]
    pub amount: u64,
    pub recipient_count: u64,
    #[serde(default, deserialize_with = "present")]
    pub mode: Option<SplitMode>,
    #[serde(default, deserialize_with = "present")]
    pub room_id: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct SprayCreated {
    pub token: Token,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    pub receive_until: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    pub lookup_until: DateTime<Utc>,
}

/// `POST /api/v1/receive`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveRequest {
    pub token: String,
    #[serde(default, deserialize_with = "present")]
    pub room_id: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Received {
    pub received_amount: Amount,
}

/// `GET /api/v1/spray/{token}`.
#[derive(Debug, Serialize)]
pub struct SprayDetails {
    pub token: Token,
    pub room_id: String,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    pub receive_until: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    pub lookup_until: DateTime<Utc>,
    pub status: SprayStatus,
    pub total_amount: Amount,
    pub recipient_count: u32,
    pub received_amount: Amount,
    pub refunded_amount: Amount,
    pub recipients: Vec<Recipient>,
}

#[derive(Debug, Serialize)]
pub struct Recipient {
    pub user_id: UserId,
    pub amount: Amount,
    #[serde(serialize_with = "rfc3339")]
    pub received_at: DateTime<Utc>,
}

/// RFC 3339 in UTC with millisecond precision and a `Z` suffix.
fn rfc3339<S: Serializer>(t: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

fn parse_token(text: &str) -> Result<Token, ApiError> {
    Token::parse(text).ok_or_else(|| ApiError::invalid("token must be exactly 3 characters of A-Z, a-z, 0-9"))
}

/// The answer to a spray, as sent and as kept for idempotent retries: the same bytes.
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

/// The answer to a receive, as sent and as kept for idempotent retries: the same bytes.
fn received_answer(received_amount: Amount) -> StoredAnswer {
    StoredAnswer {
        status: StatusCode::OK.as_u16(),
        content_type: "application/json".to_owned(),
        location: None,
        body: serde_json::to_vec(&Received { received_amount }).unwrap_or_default(),
    }
}

/// `idempotency` is the pending `Idempotency-Key` row this request holds, if it sent a key
/// (put there by the idempotency middleware): the answer is kept in the effect's transaction.
pub async fn create_spray(
    State(service): State<Arc<SprayService>>,
    idempotency: Option<Extension<IdempotencySlot>>,
    request: JsonRequest<SprayRequest>,
) -> Result<Response, ApiError> {
    let JsonRequest { caller, body, .. } = request;
    let room = caller.required_room(body.room_id.as_deref(), "room_id")?;
    let policy = service.policy();
    if body.amount < 1 || body.amount > policy.max_amount.units() {
        return Err(ApiError::invalid(format!(
            "amount must be between 1 and {}",
            policy.max_amount
        )));
    }
    let recipient_count = u32::try_from(body.recipient_count)
        .ok()
        .filter(|n| (1..=policy.max_recipients).contains(n))
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "recipient_count must be between 1 and {}",
                policy.max_recipients
            ))
        })?;
    let command = SprayCommand {
        owner: caller.user,
        room,
        amount: Amount::new(body.amount),
        recipient_count,
        mode: body.mode.unwrap_or_default(),
    };
    let render: RenderSpray<'_> = &spray_answer;
    let kept = idempotency.as_ref().map(|Extension(slot)| (slot, render));
    let created = service.spray(command, kept).await?;
    respond(spray_answer(&created), false)
}

/// `idempotency`: see [`create_spray`].
pub async fn receive(
    State(service): State<Arc<SprayService>>,
    idempotency: Option<Extension<IdempotencySlot>>,
    request: JsonRequest<ReceiveRequest>,
) -> Result<Response, ApiError> {
    let JsonRequest { caller, body, .. } = request;
    let room = caller.required_room(body.room_id.as_deref(), "room_id")?;
    let token = parse_token(&body.token)?;
    let kept = idempotency.as_ref().map(|Extension(slot)| IdempotencyWrite {
        slot,
        render: &received_answer,
    });
    let received_amount = service.receive(caller.user, room, token, kept.as_ref()).await?;
    respond(received_answer(received_amount), false)
}

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
