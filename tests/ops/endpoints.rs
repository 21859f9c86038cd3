//! The operations endpoints: health, readiness, metrics, the OpenAPI document and the
//! Swagger UI, driven through the real router.

use crate::common::{TestApp, plain_get};
use serde_json::Value;

#[tokio::test]
async fn health_answers_ok_while_the_process_runs() {
    let app = TestApp::new().await;
    let answer = app.send(plain_get("/healthz")).await;
    answer.assert_status(200);
    assert_eq!(answer.raw, b"ok");
}

#[tokio::test]
async fn readiness_says_what_each_store_answered() {
    let app = TestApp::new().await;
    let answer = app.send(plain_get("/readyz")).await;
    answer.assert_status(200);
    assert_eq!(answer.body["ready"], true);
    assert_eq!(answer.body["sql"], "up");
    assert!(answer.body["redis"].is_string());
}

#[tokio::test]
async fn readiness_fails_when_the_sql_store_is_gone() {
    let app = TestApp::new().await;
    app.store.close().await;
    let answer = app.send(plain_get("/readyz")).await;
    answer.assert_status(503);
    assert_eq!(answer.body["ready"], false);
    assert_eq!(answer.body["sql"], "down");
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let app = TestApp::new().await;
    app.send(plain_get("/healthz")).await.assert_status(200);
    let answer = app.send(plain_get("/metrics")).await;
    answer.assert_status(200);
    assert!(
        answer.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{:?}",
        answer.headers
    );
    let text = String::from_utf8(answer.raw).unwrap();
    assert!(text.contains("# TYPE http_requests_total counter"), "{text}");
    assert!(
        text.contains("# TYPE http_request_duration_seconds histogram"),
        "{text}"
    );
    assert!(text.contains(r#"route="/healthz""#), "{text}");
}

#[tokio::test]
async fn the_operations_endpoints_stay_open_behind_a_gateway_secret() {
    let settings = spray::config::Settings {
        gateway_secret: Some("s3cret".into()),
        ..Default::default()
    };
    let app = TestApp::with_settings(settings).await;
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs/"] {
        app.send(plain_get(path)).await.assert_status(200);
    }
    app.send(plain_get("/api/v1/spray/abc"))
        .await
        .assert_problem(401, "INVALID_GATEWAY");
}

#[tokio::test]
async fn the_docs_page_is_served_from_the_binary() {
    let app = TestApp::new().await;
    let answer = app.send(plain_get("/docs")).await;
    answer.assert_status(303);
    // Relative, so that behind a path prefix `/p/docs` leads to `/p/docs/`.
    assert_eq!(answer.headers["location"], "docs/");
    let page = app.send(plain_get("/docs/")).await;
    page.assert_status(200);
    let html = String::from_utf8(page.raw).unwrap();
    assert!(html.contains("swagger-ui-bundle.js"), "{html}");
    // Every asset comes from the binary, none from a CDN.
    assert!(!html.contains("http://") && !html.contains("https://"), "{html}");
    for asset in ["swagger-ui-bundle.js", "swagger-ui.css", "swagger-initializer.js"] {
        let answer = app.send(plain_get(&format!("/docs/{asset}"))).await;
        answer.assert_status(200);
        assert!(answer.raw.len() > 100, "{asset} is empty");
    }
    app.send(plain_get("/docs/no-such-file.js"))
        .await
        .assert_problem(404, "NOT_FOUND");
}

/// The page calls nothing outside the service (Swagger UI's validator badge would send
/// the document's address to validator.swagger.io), and reads the document by a URL
/// relative to itself, so it works behind a proxy that mounts the service under a prefix.
#[tokio::test]
async fn the_docs_page_calls_no_outside_service_and_finds_the_document_relatively() {
    let app = TestApp::new().await;
    let initializer = app.send(plain_get("/docs/swagger-initializer.js")).await;
    initializer.assert_status(200);
    let script = String::from_utf8(initializer.raw).unwrap();
    assert!(script.contains(r#""validatorUrl": "none""#), "{script}");
    assert!(script.contains(r#""url": "../openapi.json""#), "{script}");
    assert!(!script.contains("\"/openapi.json\""), "{script}");
    assert!(
        !script.contains("http://") && !script.contains("https://"),
        "{script}"
    );
    // The relative URL, resolved from the page, is the document.
    app.send(plain_get("/openapi.json")).await.assert_status(200);
}

/// The bundle is sent gzipped to a browser that accepts it and may be cached; the page and
/// its initializer (which carries the settings) are revalidated on every load.
#[tokio::test]
async fn the_docs_assets_are_compressed_and_cacheable() {
    let app = TestApp::new().await;
    let get = |path: &str, gzip: bool| {
        let mut request = axum::http::Request::builder().uri(path);
        if gzip {
            request = request.header("accept-encoding", "gzip");
        }
        request.body(axum::body::Body::empty()).unwrap()
    };
    let plain = app.send(get("/docs/swagger-ui-bundle.js", false)).await;
    plain.assert_status(200);
    assert!(
        plain.headers.get("content-encoding").is_none(),
        "{:?}",
        plain.headers
    );
    let zipped = app.send(get("/docs/swagger-ui-bundle.js", true)).await;
    zipped.assert_status(200);
    assert_eq!(zipped.headers["content-encoding"], "gzip");
    assert!(
        zipped.raw.len() * 2 < plain.raw.len(),
        "gzip: {} bytes, plain: {}",
        zipped.raw.len(),
        plain.raw.len()
    );
    for asset in ["swagger-ui-bundle.js", "swagger-ui.css"] {
        let answer = app.send(get(&format!("/docs/{asset}"), true)).await;
        assert_eq!(
            answer.headers["cache-control"], "public, max-age=86400",
            "{asset}"
        );
    }
    for page in ["/docs/", "/docs/swagger-initializer.js"] {
        let answer = app.send(get(page, true)).await;
        assert_eq!(answer.headers["cache-control"], "no-cache", "{page}");
    }
}

/// An operation of the contract: method, path, and its answers as status and problem
/// code ("" for an answer that is not a problem).
type Operation = (&'static str, &'static str, &'static [(u16, &'static str)]);

const CONTRACT: &[Operation] = &[
    (
        "post",
        "/api/v1/spray",
        &[
            (201, ""),
            (400, "INVALID_REQUEST"),
            (401, "INVALID_USER"),
            (401, "INVALID_GATEWAY"),
            (409, "IDEMPOTENCY_IN_PROGRESS"),
            (413, "PAYLOAD_TOO_LARGE"),
            (415, "UNSUPPORTED_MEDIA_TYPE"),
            (422, "IDEMPOTENCY_KEY_REUSED"),
            (503, "UNAVAILABLE"),
        ],
    ),
    (
        "post",
        "/api/v1/receive",
        &[
            (200, ""),
            (400, "INVALID_REQUEST"),
            (401, "INVALID_USER"),
            (401, "INVALID_GATEWAY"),
            (403, "OWN_SPRAY"),
            (404, "SPRAY_NOT_FOUND"),
            (409, "ALREADY_RECEIVED"),
            (409, "SPRAY_EXHAUSTED"),
            (409, "IDEMPOTENCY_IN_PROGRESS"),
            (410, "RECEIVE_EXPIRED"),
            (413, "PAYLOAD_TOO_LARGE"),
            (415, "UNSUPPORTED_MEDIA_TYPE"),
            (422, "IDEMPOTENCY_KEY_REUSED"),
            (503, "UNAVAILABLE"),
        ],
    ),
    (
        "get",
        "/api/v1/spray/{token}",
        &[
            (200, ""),
            (400, "INVALID_REQUEST"),
            (401, "INVALID_USER"),
            (401, "INVALID_GATEWAY"),
            (403, "NOT_OWNER"),
            (404, "SPRAY_NOT_FOUND"),
            (410, "LOOKUP_EXPIRED"),
            (503, "UNAVAILABLE"),
        ],
    ),
    ("get", "/healthz", &[(200, "")]),
    ("get", "/readyz", &[(200, ""), (503, "")]),
    ("get", "/metrics", &[(200, "")]),
    ("get", "/openapi.json", &[(200, "")]),
    ("get", "/docs", &[(303, "")]),
];

async fn document() -> Value {
    let app = TestApp::new().await;
    let answer = app.send(plain_get("/openapi.json")).await;
    answer.assert_status(200);
    assert_eq!(answer.headers["content-type"], "application/json");
    assert!(answer.body.is_object(), "not JSON");
    answer.body
}

#[tokio::test]
async fn the_openapi_document_lists_every_path_status_and_problem_code_of_the_contract() {
    let doc = document().await;
    assert_eq!(doc["openapi"], "3.1.0");
    for (method, path, answers) in CONTRACT {
        let operation = &doc["paths"][path][method];
        assert!(operation.is_object(), "{method} {path} is not documented");
        for (status, code) in *answers {
            let response = &operation["responses"][status.to_string()];
            assert!(response.is_object(), "{method} {path}: no {status}");
            if code.is_empty() {
                continue;
            }
            let problem = &response["content"]["application/problem+json"];
            assert_eq!(
                problem["schema"]["$ref"], "#/components/schemas/Problem",
                "{method} {path} {status}"
            );
            let example = &problem["examples"][code]["value"];
            assert_eq!(
                example["code"], *code,
                "{method} {path} {status}: no {code} example"
            );
            assert_eq!(example["status"], *status, "{method} {path} {code}");
            assert_eq!(example["type"], "about:blank");
            assert!(
                response["description"].as_str().unwrap().contains(code),
                "{method} {path} {status}: {code} not described"
            );
        }
    }
    let codes = doc["components"]["schemas"]["Problem"]["properties"]["code"]["enum"]
        .as_array()
        .unwrap();
    for (_, _, answers) in CONTRACT {
        for (_, code) in answers.iter().filter(|(_, code)| !code.is_empty()) {
            assert!(
                codes.contains(&Value::from(*code)),
                "{code} missing from Problem.code"
            );
        }
    }
}

#[tokio::test]
async fn the_openapi_document_describes_headers_bodies_and_security() {
    let doc = document().await;
    let parameter = |method: &str, path: &str, name: &str| -> Value {
        doc["paths"][path][method]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{method} {path}: no parameter {name}"))
    };
    for (method, path) in [
        ("post", "/api/v1/spray"),
        ("post", "/api/v1/receive"),
        ("get", "/api/v1/spray/{token}"),
    ] {
        let user = parameter(method, path, "X-USER-ID");
        assert_eq!((&user["in"], &user["required"]), (&"header".into(), &true.into()));
        let room = parameter(method, path, "X-ROOM-ID");
        assert_eq!(
            (&room["in"], &room["required"]),
            (&"header".into(), &false.into())
        );
        // The gateway's bearer is optional: it depends on the deployment.
        let security = doc["paths"][path][method]["security"].as_array().unwrap();
        assert!(security.contains(&serde_json::json!({})));
        assert!(security.contains(&serde_json::json!({"gateway": []})));
        let unavailable = &doc["paths"][path][method]["responses"]["503"];
        assert!(unavailable["headers"]["Retry-After"].is_object(), "{path}");
    }
    for path in ["/api/v1/spray", "/api/v1/receive"] {
        let key = parameter("post", path, "Idempotency-Key");
        assert_eq!(key["in"], "header");
        let body = &doc["paths"][path]["post"]["requestBody"];
        assert_eq!(body["required"], true);
        assert!(body["content"]["application/json"]["schema"]["$ref"].is_string());
    }
    assert_eq!(parameter("get", "/api/v1/spray/{token}", "token")["in"], "path");
    assert_eq!(
        parameter("get", "/api/v1/spray/{token}", "room_id")["in"],
        "query"
    );
    let created = &doc["paths"]["/api/v1/spray"]["post"]["responses"]["201"];
    assert!(created["headers"]["Location"].is_object());
    let scheme = &doc["components"]["securitySchemes"]["gateway"];
    assert_eq!(
        (&scheme["type"], &scheme["scheme"]),
        (&"http".into(), &"bearer".into())
    );

    let schemas = &doc["components"]["schemas"];
    let request = &schemas["SprayRequest"];
    assert_eq!(request["additionalProperties"], false);
    let required: Vec<&str> = request["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(required, ["amount", "recipient_count"]);
    assert_eq!(
        schemas["SplitMode"]["enum"],
        serde_json::json!(["even", "random"])
    );
    assert_eq!(
        schemas["SprayStatus"]["enum"],
        serde_json::json!(["active", "completed", "expired"])
    );
    for schema in [
        "SprayRequest",
        "SprayCreated",
        "ReceiveRequest",
        "Received",
        "SprayDetails",
        "Problem",
    ] {
        assert!(schemas[schema]["example"].is_object(), "{schema} has no example");
    }
    assert_eq!(
        schemas["SprayCreated"]["properties"]["created_at"]["format"],
        "date-time"
    );
}

#[tokio::test]
async fn the_openapi_document_shows_the_limits_this_instance_runs_with() {
    let settings = spray::config::Settings {
        max_amount: 5000,
        max_recipients: 7,
        ..Default::default()
    };
    let app = TestApp::with_settings(settings).await;
    let doc = app.send(plain_get("/openapi.json")).await.body;
    let properties = &doc["components"]["schemas"]["SprayRequest"]["properties"];
    assert_eq!(properties["amount"]["maximum"], 5000);
    assert_eq!(properties["recipient_count"]["maximum"], 7);
}
