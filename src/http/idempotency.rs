//! `Idempotency-Key` on the two POST endpoints (`docs/contract.md` section 6; `docs/design.md` section 9).
//!
//! A layer of the two POST routes, inside the one that reads and checks the body
//! (`extract::check_json_body`): the defects the contract ranks before `INVALID_REQUEST`
//! (too large, not JSON, no valid user) and a body that is not JSON at all are answered
//! there, as without a key, and are not kept: such a request cannot be scoped to a user or
//! compared as a JSON value. For a request that sends a key, this layer:
//! 1. refuses a malformed key with `400 INVALID_REQUEST`, not kept either;
//! 2. fingerprints the request (its body as a canonical JSON value, plus its effective
//!    room) and begins it in the store, which answers at once with a replay, `422
//!    IDEMPOTENCY_KEY_REUSED` or `409 IDEMPOTENCY_IN_PROGRESS`, or lets it run holding a
//!    pending row;
//! 3. runs the handler with the pending row's [`PendingKey`] in the request's
//!    extensions. A handler whose effect succeeds keeps its answer in the effect's own
//!    transaction (so the money and the answer a retry gets commit together); any other
//!    answer is dealt with here: a 4xx (no effect) is kept in its own transaction, a 5xx
//!    releases the row so the retry runs afresh. A request cancelled mid-way (the client
//!    went away) releases its row too, unless its effect already committed.
//!
//! The row is fenced by a random lease: only the request holding the current lease can
//! complete or release it. A pending row untouched for the lease's duration
//! (`--idempotency-lease`, 10 s by default, by the service clock) was abandoned: its
//! request ended without an answer (a 5xx whose release failed, a crash) or is very slow.
//! The next retry takes it over under a new lease; the old holder, if it was merely slow,
//! can no longer commit its effect (its transaction rolls back and it answers 503, which
//! is then true).
//!
//! A release that fails (the database is down at that moment) is tried again in the
//! background until the store answers, for at most the lease: the key is free again as
//! soon as the store is back, and never blocked for longer than the lease.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::Semaphore;

use super::AppState;
use super::error::ApiError;
use super::extract::CheckedBody;
use crate::domain::{Endpoint, Fingerprint, IdempotencyKey};
use crate::service::ServiceError;
use crate::store::{Begin, IdempotentRequest, Kept, PendingKey, Store, StoredAnswer};

pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
pub static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Failed releases retried in the background at once, across the process. Past it a
/// failed release is left to the lease: the key is then blocked for at most the lease,
/// which is the promise anyway; the bound only keeps an outage from piling up tasks.
const RELEASE_RETRIES: usize = 4_096;
static RELEASES_RETRYING: Semaphore = Semaphore::const_new(RELEASE_RETRIES);
/// The first pause before a failed release is tried again; it doubles up to the second.
/// Short, so that a key is free again within about a second of the store coming back.
const RELEASE_RETRY_FIRST_PAUSE: Duration = Duration::from_millis(50);
const RELEASE_RETRY_MAX_PAUSE: Duration = Duration::from_secs(1);

/// The largest 4xx body kept for replay; ours are small problem documents.
const KEPT_BODY_LIMIT: usize = 64 * 1024;

/// The layer; see the module doc. `endpoint` is the route it was put on.
pub async fn guard(
    State((state, endpoint)): State<(AppState, Endpoint)>,
    request: Request,
    next: Next,
) -> Response {
    if !request.headers().contains_key(&IDEMPOTENCY_KEY) {
        return next.run(request).await;
    }
    let Some(CheckedBody { caller, bytes }) = request.extensions().get::<CheckedBody>().cloned() else {
        tracing::error!("the idempotency layer without the check_json_body layer");
        return ApiError::Internal.into_response();
    };
    let Some(key) = idempotency_key(request.headers()) else {
        return ApiError::invalid("Idempotency-Key must be sent once, as 1 to 255 visible ASCII characters")
            .into_response();
    };
    let Ok(value) = serde_json::from_slice::<Value>(&bytes) else {
        // Cannot happen: the body was checked to be JSON. Answered without a key.
        return next.run(request).await;
    };
    // The effective room: the header's, else the body's (when both are given and differ,
    // the handler refuses the request; the header's then stands for it).
    let room = caller
        .header_room
        .as_ref()
        .map(|room| room.as_str())
        .or_else(|| value.get("room_id").and_then(Value::as_str));
    let fingerprint = Fingerprint::of(&value, room);

    let service = &state.service;
    let store = service.store().clone();
    let now = service.clock().now();
    let lease = service.policy().idempotency_lease;
    let begin = IdempotentRequest {
        user: caller.user,
        endpoint,
        key: key.clone(),
        fingerprint,
        now,
        abandoned_before: now.checked_sub_signed(lease).unwrap_or(DateTime::<Utc>::MIN_UTC),
        lease: rand::random(),
    };
    let retry_for = lease.to_std().unwrap_or(crate::config::DEFAULT_IDEMPOTENCY_LEASE);
    // Held from before the row is written, so that a request cancelled while its insert
    // is on the way back still releases the row it may have written. The release is
    // conditional on this request's own lease: it can never touch another request's row.
    let mut held = Held {
        store: Some(store.clone()),
        pending: PendingKey {
            user: caller.user,
            endpoint,
            key,
            lease: begin.lease,
        },
        retry_for,
    };
    let refused = match store.begin_idempotent(&begin).await {
        Ok(Begin::Run(_)) => None,
        Ok(Begin::Replay(kept)) => {
            let answer = match kept {
                Kept::Effect(effect) => super::api::effect_answer(&effect),
                Kept::Answer(answer) => answer,
            };
            Some(respond(answer, true).unwrap_or_else(IntoResponse::into_response))
        }
        Ok(Begin::KeyReused) => Some(ApiError::IdempotencyKeyReused.into_response()),
        Ok(Begin::InProgress) => Some(ApiError::IdempotencyInProgress.into_response()),
        // The insert may have committed before the error reached us: `held` releases it.
        Err(e) => return ApiError::from(ServiceError::Store(e)).into_response(),
    };
    if let Some(answer) = refused {
        held.done(); // the row is another request's
        return answer;
    }

    let mut request = request;
    request.extensions_mut().insert(held.pending.clone());
    let response = next.run(request).await;
    let status = response.status();
    let response = if status.is_client_error() {
        keep(&store, &held.pending, retry_for, response, service.clock().now()).await
    } else if status.is_server_error() {
        release(&store, &held.pending, retry_for).await;
        response
    } else {
        // A success: the effect's transaction kept the answer.
        response
    };
    held.done();
    response
}

/// The key, sent exactly once and well-formed.
fn idempotency_key(headers: &HeaderMap) -> Option<IdempotencyKey> {
    let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    first.to_str().ok().and_then(IdempotencyKey::parse)
}

/// An answer, as sent the first time or replayed (with `Idempotent-Replayed: true`).
pub fn respond(answer: StoredAnswer, replayed: bool) -> Result<Response, ApiError> {
    let status = StatusCode::from_u16(answer.status).map_err(|_| ApiError::Internal)?;
    let mut response = (status, answer.body).into_response();
    let headers = response.headers_mut();
    let content_type = HeaderValue::try_from(answer.content_type).map_err(|_| ApiError::Internal)?;
    headers.insert(header::CONTENT_TYPE, content_type);
    if let Some(location) = answer.location {
        let location = HeaderValue::try_from(location).map_err(|_| ApiError::Internal)?;
        headers.insert(header::LOCATION, location);
    }
    if replayed {
        headers.insert(IDEMPOTENT_REPLAYED.clone(), HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// Keeps a 4xx answer for replay, in its own transaction, and sends it on.
async fn keep(
    store: &Arc<dyn Store>,
    pending: &PendingKey,
    retry_for: Duration,
    response: Response,
    now: DateTime<Utc>,
) -> Response {
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, KEPT_BODY_LIMIT).await else {
        tracing::error!("a 4xx answer could not be read back to be kept");
        release(store, pending, retry_for).await;
        return ApiError::Internal.into_response();
    };
    let header_text = |name: &HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let answer = StoredAnswer {
        status: parts.status.as_u16(),
        content_type: header_text(&header::CONTENT_TYPE)
            .unwrap_or_else(|| "application/problem+json".to_owned()),
        location: header_text(&header::LOCATION),
        body: bytes.to_vec(),
    };
    match store.finish_idempotent(pending, &answer, now).await {
        Ok(true) => {}
        // Taken over by a retry after the lease: the retry's answer stands.
        Ok(false) => {
            tracing::warn!(endpoint = %pending.endpoint, "idempotency row taken over before its answer was kept")
        }
        // The answer is still true; without it kept, the retry will run afresh.
        Err(e) => {
            tracing::warn!(error = %e, "a 4xx answer could not be kept for replay");
            release(store, pending, retry_for).await;
        }
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// Releases the pending row so that a retry runs afresh. When the store cannot take the
/// release now, it is tried again in the background (see [`release_later`]).
async fn release(store: &Arc<dyn Store>, pending: &PendingKey, retry_for: Duration) {
    if let Err(e) = store.release_idempotent(pending).await {
        tracing::warn!(error = %e, "a pending idempotency row could not be released; retrying in the background");
        release_later(store.clone(), pending.clone(), retry_for);
    }
}

/// Tries a failed release again, pausing a little longer each time, until the store takes
/// it or `retry_for` (the lease) has passed: after the lease a retry of the request takes
/// the key over anyway, so retrying longer would add nothing. Retrying is always safe: the
/// release deletes the row only while it is still pending under this request's lease, so
/// it can never touch a kept answer or another request's row.
fn release_later(store: Arc<dyn Store>, pending: PendingKey, retry_for: Duration) {
    let Ok(permit) = RELEASES_RETRYING.try_acquire() else {
        tracing::warn!("too many releases waiting for the store; this key is freed by its lease");
        return;
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let _permit = permit;
        let give_up = tokio::time::Instant::now() + retry_for;
        let mut pause = RELEASE_RETRY_FIRST_PAUSE;
        loop {
            tokio::time::sleep(pause).await;
            match store.release_idempotent(&pending).await {
                Ok(()) => {
                    tracing::info!(endpoint = %pending.endpoint, "a pending idempotency row was released once the store answered");
                    return;
                }
                Err(e) if tokio::time::Instant::now() + pause < give_up => {
                    tracing::debug!(error = %e, "releasing a pending idempotency row failed again");
                    pause = (pause * 2).min(RELEASE_RETRY_MAX_PAUSE);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "gave up releasing a pending idempotency row; its lease frees the key");
                    return;
                }
            }
        }
    });
}

/// The pending row a running request holds. Dropped before [`Held::done`] (the request
/// was cancelled: the client went away), it releases the row in the background. That is
/// safe even if the effect's transaction is still in flight: the release only deletes a
/// row still pending under this lease, so it waits for that transaction and then either
/// finds the answer kept (committed) or the row pending (rolled back).
struct Held {
    store: Option<Arc<dyn Store>>,
    pending: PendingKey,
    /// How long a failed release is retried: the lease.
    retry_for: Duration,
}

impl Held {
    fn done(&mut self) {
        self.store = None;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let Some(store) = self.store.take() else {
            return;
        };
        let pending = self.pending.clone();
        let retry_for = self.retry_for;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { release(&store, &pending, retry_for).await });
        }
    }
}
