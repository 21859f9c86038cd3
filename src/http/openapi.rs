//! The OpenAPI 3.1 document (`GET /openapi.json`) and the Swagger UI (`GET /docs`).
//!
//! Paths, parameters and the success answers come from the `#[utoipa::path]` of each
//! handler, and the schemas from the request and answer types. What the handlers share
//! is added here once: the problem answers of each operation (the contract's error
//! table), the gateway's bearer scheme on `/api/`, and the `503` that the timeout and the
//! concurrency bound can give any route.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde_json::json;
use utoipa::openapi::example::ExampleBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{HttpMethod, Operation, OperationBuilder, PathItemBuilder};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, ResponseBuilder, Schema};
use utoipa::{IntoParams, OpenApi as _, PartialSchema, ToSchema};
use utoipa_swagger_ui::Config;

use super::error::ApiError;
use crate::domain::Policy;

pub const OPENAPI_PATH: &str = "/openapi.json";
pub const DOCS_PATH: &str = "/docs";
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The parts of the document that are not tied to one handler.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "spray",
        description = "Spray money into a chat room: split an amount into shares that room members claim.\n\n\
            Identity comes from a trusted gateway in the `X-USER-ID` and `X-ROOM-ID` headers. Every error \
            is an RFC 9457 problem document (`application/problem+json`) with a stable `code`.",
        license(name = "MIT", identifier = "MIT")
    ),
    tags(
        (name = "spray", description = "Spray money, receive a share, look a spray up."),
        (name = "operations", description = "Health, readiness, metrics and this document.")
    ),
    components(schemas(Problem))
)]
struct ApiDoc;

/// The base document, before the routes add their paths.
pub fn base() -> OpenApi {
    ApiDoc::openapi()
}

/// An RFC 9457 problem document: the body of every error answer.
#[derive(ToSchema)]
#[schema(example = json!({
    "type": "about:blank", "title": "Spray exhausted", "status": 409,
    "code": "SPRAY_EXHAUSTED", "detail": "all 3 shares have been received"
}))]
#[allow(dead_code)] // only its schema is used: the answers are written by `ApiError`
pub struct Problem {
    /// Always `about:blank`: the `code` says what happened.
    #[schema(rename = "type", example = "about:blank")]
    kind: String,
    /// A short summary for people.
    title: String,
    /// The HTTP status, repeated.
    #[schema(minimum = 400, maximum = 599)]
    status: u16,
    /// Stable and machine-readable.
    #[schema(schema_with = problem_code_schema)]
    code: String,
    /// What went wrong in this case, for people. A 5xx says nothing internal.
    detail: String,
}

/// The identity headers the gateway sets on every API request.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // documentation only: `extract::Caller` reads these headers
pub struct IdentityHeaders {
    /// The calling user, set by the trusted gateway: a decimal integer from 1 to
    /// 2^63-1, without sign or leading zeros. Missing or invalid: `401 INVALID_USER`.
    #[param(rename = "X-USER-ID", pattern = r"^[1-9][0-9]{0,18}$", example = "1")]
    x_user_id: String,
    /// The caller's chat room: 1 to 64 visible ASCII characters. It may instead be sent
    /// as `room_id` in the JSON body (POST) or the query (GET); when both are sent they
    /// must name the same room. Invalid or conflicting: `400 INVALID_REQUEST`.
    #[param(
        rename = "X-ROOM-ID",
        pattern = r"^[\x21-\x7E]{1,64}$",
        example = "TEST-ROOM-1",
        nullable = false
    )]
    x_room_id: Option<String>,
}

/// The idempotency header of the POST endpoints.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // documentation only
pub struct IdempotencyHeader {
    /// 1 to 255 visible ASCII characters, scoped to the caller and the endpoint and kept
    /// at least 24 hours. A retry with the same key and the same body gets the first
    /// answer again (with `Idempotent-Replayed: true`); the same key with another body
    /// is `422 IDEMPOTENCY_KEY_REUSED`; a retry while the first still runs is
    /// `409 IDEMPOTENCY_IN_PROGRESS`. Invalid: `400 INVALID_REQUEST`.
    #[param(
        rename = "Idempotency-Key",
        pattern = r"^[\x21-\x7E]{1,255}$",
        example = "3f1c9a2e-spray-1",
        nullable = false
    )]
    idempotency_key: Option<String>,
}

/// One problem of the contract, as the document shows it.
#[derive(Debug, Clone)]
pub struct ProblemDoc {
    pub status: StatusCode,
    pub code: &'static str,
    pub title: &'static str,
    pub detail: String,
    /// When it is answered, from the contract's error table.
    pub when: &'static str,
}

impl ProblemDoc {
    fn of(error: ApiError, when: &'static str) -> ProblemDoc {
        let (status, code, title) = error.parts();
        ProblemDoc {
            status,
            code,
            title,
            detail: error.detail(),
            when,
        }
    }

    fn example(&self) -> serde_json::Value {
        json!({
            "type": "about:blank",
            "title": self.title,
            "status": self.status.as_u16(),
            "code": self.code,
            "detail": self.detail,
        })
    }
}

/// Every problem code the service answers. The titles and details of the examples are
/// the ones `ApiError` writes, so the document cannot drift from the answers.
pub fn problems() -> Vec<ProblemDoc> {
    use ApiError::*;
    vec![
        ProblemDoc::of(
            ApiError::invalid("recipient_count must be between 1 and 1000"),
            "malformed JSON, wrong JSON types, a missing, unknown or null field, a value out of \
             range, amount < recipient_count, a malformed token or Idempotency-Key, a bad or \
             conflicting room",
        ),
        ProblemDoc::of(InvalidUser, "X-USER-ID missing or not a valid user id"),
        ProblemDoc::of(
            InvalidGateway,
            "a gateway secret is configured and the request does not carry it as a bearer token",
        ),
        ProblemDoc::of(OwnSpray, "the sprayer tries to receive from their own spray"),
        ProblemDoc::of(NotOwner, "someone other than the sprayer looks a spray up"),
        ProblemDoc::of(
            SprayNotFound,
            "no spray with this token in this room (or, without a room, among the caller's own sprays)",
        ),
        ProblemDoc::of(
            AlreadyReceived,
            "this user already received a share of this spray",
        ),
        ProblemDoc::of(SprayExhausted { shares: 3 }, "every share has been received"),
        ProblemDoc::of(
            ReceiveExpired,
            "the receive window (10 minutes by default) has closed",
        ),
        ProblemDoc::of(LookupExpired, "the lookup window (7 days by default) has closed"),
        ProblemDoc::of(PayloadTooLarge, "request body over 16 KiB"),
        ProblemDoc::of(UnsupportedMediaType, "a POST body that is not application/json"),
        ProblemDoc::of(
            IdempotencyKeyReused,
            "an Idempotency-Key reused with a different request",
        ),
        ProblemDoc::of(
            IdempotencyInProgress,
            "a request with the same Idempotency-Key is still being processed",
        ),
        ProblemDoc::of(
            Unavailable("the database is unavailable; try again shortly"),
            "a backing store is unreachable, the instance is at its concurrency bound, or the \
             request ran past the request timeout; carries Retry-After",
        ),
        ProblemDoc::of(
            Internal,
            "a bug; the cause is in the service's log, never in the answer",
        ),
        ProblemDoc::of(RouteNotFound, "no such endpoint"),
        ProblemDoc::of(MethodNotAllowed, "the endpoint does not accept this method"),
    ]
}

/// The problem codes each operation can answer, in the contract's order of defects.
fn problems_of(operation_id: &str) -> &'static [&'static str] {
    const REQUEST: [&str; 5] = [
        "INVALID_GATEWAY",
        "PAYLOAD_TOO_LARGE",
        "UNSUPPORTED_MEDIA_TYPE",
        "INVALID_USER",
        "INVALID_REQUEST",
    ];
    match operation_id {
        "create_spray" => &[
            REQUEST[0],
            REQUEST[1],
            REQUEST[2],
            REQUEST[3],
            REQUEST[4],
            "IDEMPOTENCY_KEY_REUSED",
            "IDEMPOTENCY_IN_PROGRESS",
            "UNAVAILABLE",
            "INTERNAL",
        ],
        "receive" => &[
            REQUEST[0],
            REQUEST[1],
            REQUEST[2],
            REQUEST[3],
            REQUEST[4],
            "SPRAY_NOT_FOUND",
            "OWN_SPRAY",
            "ALREADY_RECEIVED",
            "RECEIVE_EXPIRED",
            "SPRAY_EXHAUSTED",
            "IDEMPOTENCY_KEY_REUSED",
            "IDEMPOTENCY_IN_PROGRESS",
            "UNAVAILABLE",
            "INTERNAL",
        ],
        "lookup_spray" => &[
            "INVALID_GATEWAY",
            "INVALID_USER",
            "INVALID_REQUEST",
            "NOT_OWNER",
            "SPRAY_NOT_FOUND",
            "LOOKUP_EXPIRED",
            "UNAVAILABLE",
            "INTERNAL",
        ],
        // The operations endpoints: only the timeout can refuse them.
        _ => &["UNAVAILABLE"],
    }
}

fn problem_code_schema() -> impl Into<RefOr<Schema>> {
    let codes: Vec<&'static str> = problems().iter().map(|p| p.code).collect();
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(codes))
        .examples([json!("SPRAY_EXHAUSTED")])
}

/// Completes the document the routes built: problem answers, the gateway scheme, the
/// Swagger UI page, and the limits this instance was started with.
pub fn complete(mut doc: OpenApi, policy: &Policy) -> OpenApi {
    set_maximum(&mut doc, "SprayRequest", "amount", policy.max_amount.units());
    set_maximum(
        &mut doc,
        "SprayRequest",
        "recipient_count",
        u64::from(policy.max_recipients),
    );
    let catalogue = problems();
    let components = doc.components.get_or_insert_with(Default::default);
    components.security_schemes.insert(
        "gateway".into(),
        RefOr::T(SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "Only when the service runs with --gateway-secret: every /api/ request must \
                     then carry `Authorization: Bearer <secret>`, else 401 INVALID_GATEWAY.",
                ))
                .build(),
        )),
    );
    for (path, item) in doc.paths.paths.iter_mut() {
        let is_api = path.starts_with("/api/");
        for operation in operations(item) {
            let id = operation.operation_id.clone().unwrap_or_default();
            add_problems(operation, problems_of(&id), &catalogue);
            if is_api {
                // Either no credentials (no secret configured) or the gateway's bearer.
                operation.security = Some(vec![
                    SecurityRequirement::default(),
                    SecurityRequirement::new("gateway", Vec::<String>::new()),
                ]);
            }
        }
    }
    doc.paths.paths.insert(DOCS_PATH.into(), docs_path_item());
    doc
}

/// The largest value this instance accepts for `schema.property`, so that the document
/// tells clients (and schemathesis) the limits actually in force.
fn set_maximum(doc: &mut OpenApi, schema: &str, property: &str, maximum: u64) {
    let Some(components) = doc.components.as_mut() else {
        return;
    };
    let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut(schema) else {
        return;
    };
    if let (Some(RefOr::T(Schema::Object(field))), Ok(maximum)) =
        (object.properties.get_mut(property), usize::try_from(maximum))
    {
        field.maximum = Some(utoipa::Number::UInt(maximum));
    }
}

fn operations(item: &mut utoipa::openapi::PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        item.get.as_mut(),
        item.post.as_mut(),
        item.put.as_mut(),
        item.delete.as_mut(),
        item.patch.as_mut(),
    ]
    .into_iter()
    .flatten()
}

/// Adds one response per status, each with an example per problem code; a status the
/// handler already documents (the readiness 503) gets the problem content beside its own.
fn add_problems(operation: &mut Operation, codes: &[&str], catalogue: &[ProblemDoc]) {
    let mut by_status: BTreeMap<u16, Vec<&ProblemDoc>> = BTreeMap::new();
    for code in codes {
        if let Some(problem) = catalogue.iter().find(|p| p.code == *code) {
            by_status
                .entry(problem.status.as_u16())
                .or_default()
                .push(problem);
        }
    }
    for (status, problems) in by_status {
        let content = ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("Problem")))
            .examples_from_iter(problems.iter().map(|p| {
                (
                    p.code,
                    ExampleBuilder::new()
                        .summary(format!("{} {}", status, p.code))
                        .description(p.when)
                        .value(Some(p.example())),
                )
            }))
            .build();
        let description = problems
            .iter()
            .map(|p| format!("`{}`: {}.", p.code, p.when))
            .collect::<Vec<_>>()
            .join("\n\n");
        let key = status.to_string();
        match operation.responses.responses.get_mut(&key) {
            Some(RefOr::T(existing)) => {
                existing.content.insert(PROBLEM_JSON.into(), RefOr::T(content));
                existing.description = format!("{}\n\n{description}", existing.description);
            }
            _ => {
                let mut response = ResponseBuilder::new()
                    .description(description)
                    .content(PROBLEM_JSON, content);
                if status == StatusCode::SERVICE_UNAVAILABLE.as_u16() {
                    response = response.header(
                        "Retry-After",
                        HeaderBuilder::new()
                            .schema(Some(u32::schema()))
                            .description(Some("Seconds to wait before retrying."))
                            .build(),
                    );
                }
                operation
                    .responses
                    .responses
                    .insert(key, RefOr::T(response.build()));
            }
        }
    }
}

/// `GET /docs`: the Swagger UI page lives under `/docs/`, where its relative asset links
/// resolve; `/docs` sends the browser there.
fn docs_path_item() -> utoipa::openapi::PathItem {
    let operation = OperationBuilder::new()
        .tag("operations")
        .operation_id(Some("docs"))
        .summary(Some(
            "The interactive API page (Swagger UI), served from the binary",
        ))
        .response(
            "303",
            ResponseBuilder::new()
                .description("The page is at `/docs/`.")
                .header(
                    "Location",
                    HeaderBuilder::new().schema(Some(String::schema())).build(),
                )
                .build(),
        )
        .response(
            "200",
            ResponseBuilder::new()
                .description("The Swagger UI page, when the client follows the redirect.")
                .content(
                    "text/html",
                    ContentBuilder::new().schema(Some(String::schema())).build(),
                )
                .build(),
        )
        .build();
    PathItemBuilder::new()
        .operation(HttpMethod::Get, operation)
        .build()
}

/// Where the Swagger UI page fetches the document: relative to the page (`/docs/`), so
/// that behind a proxy that mounts the service under a path prefix (`/spray/docs/`) the
/// page still finds it (`/spray/openapi.json`).
const DOCUMENT_FROM_DOCS: &str = "../openapi.json";

/// The Swagger UI router: `/docs` redirects to `/docs/`, which reads the document.
///
/// Written here rather than taken from `utoipa-swagger-ui`'s router, whose redirect names
/// the absolute `/docs/` (wrong behind a path prefix) and whose answers carry no caching
/// headers. The files still come from that crate, inside the binary. The page makes no
/// call outside this service: Swagger UI's default validator badge fetches
/// `validator.swagger.io` with the document's URL on any host but localhost, so it is
/// turned off (`validatorUrl: "none"`). Assets are compressed by the router's layer.
pub fn swagger_ui<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    use axum::routing::get;
    let config = Arc::new(
        Config::from(DOCUMENT_FROM_DOCS)
            .try_it_out_enabled(true)
            .display_operation_id(true)
            .validator_url("none"),
    );
    let page = {
        let config = config.clone();
        move || std::future::ready(docs_file("", &config))
    };
    let asset = move |Path(tail): Path<String>| std::future::ready(docs_file(&tail, &config));
    axum::Router::new()
        // Relative, so `/prefix/docs` goes to `/prefix/docs/`.
        .route(DOCS_PATH, get(|| async { Redirect::to("docs/") }))
        .route(&format!("{DOCS_PATH}/"), get(page))
        .route(&format!("{DOCS_PATH}/{{*tail}}"), get(asset))
}

/// One file of the Swagger UI. The page and its initializer (which holds the settings
/// above) are revalidated on every load, so a new version of the service is seen at once;
/// the bundle, the style sheet and the icons change only with the crate, and are kept a day.
fn docs_file(tail: &str, config: &Arc<Config<'static>>) -> Response {
    let file = match utoipa_swagger_ui::serve(tail, config.clone()) {
        Ok(Some(file)) => file,
        Ok(None) => return ApiError::RouteNotFound.into_response(),
        Err(error) => {
            tracing::error!(%error, tail, "the Swagger UI file could not be prepared");
            return ApiError::Internal.into_response();
        }
    };
    let cache = if tail.is_empty() || tail == "index.html" || tail == "swagger-initializer.js" {
        "no-cache"
    } else {
        "public, max-age=86400"
    };
    let mut headers = vec![
        (header::CONTENT_TYPE, file.content_type),
        (header::CACHE_CONTROL, cache.to_owned()),
    ];
    // The vendored files are plain unless utoipa-swagger-ui's `gzip` feature is on.
    if file.gzpipped {
        headers.push((header::CONTENT_ENCODING, "gzip".to_owned()));
    }
    let mut response = file.bytes.into_owned().into_response();
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::try_from(value) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}
