//! Every kind of bad request, in every lab, gets the documented JSON error
//! with the same status: the contract in the README's "Every service has".
//!
//! The extractors (path, query, JSON body, headers) each refuse input
//! before a handler runs; axum's own rejections are plain text, so each lab
//! uses lab-core's versions. This table is what keeps one lab from slipping
//! back: each row is a request that must be refused, the status and the code.

mod support;

use reqwest::Method;
use serde_json::Value;
use support::ScratchLab;

/// (what, method, path, content type, body, status, code)
type Case = (
    &'static str,
    Method,
    &'static str,
    Option<&'static str>,
    &'static str,
    u16,
    &'static str,
);

fn cases(lab: &str) -> Vec<Case> {
    let post = Method::POST;
    let get = Method::GET;
    let json = Some("application/json");
    let common = |path: &'static str| -> Vec<Case> {
        vec![
            (
                "malformed JSON",
                post.clone(),
                path,
                json,
                "{",
                400,
                "malformed",
            ),
            (
                "an array for an object",
                post.clone(),
                path,
                json,
                "[\"x\", 1]",
                422,
                "invalid",
            ),
            (
                "a field of the wrong type",
                post.clone(),
                path,
                json,
                "{\"quantity\":\"lots\",\"setpoint_c\":\"hot\",\"price_cents\":\"cheap\",\"customer_id\":7}",
                422,
                "invalid",
            ),
            (
                "no JSON content type",
                post.clone(),
                path,
                Some("text/plain"),
                "{}",
                415,
                "unsupported_media_type",
            ),
        ]
    };
    let mut cases = match lab {
        "catalog" => {
            let mut c = common("/v1/products");
            c.extend([
                (
                    "an id that is not a UUID",
                    get.clone(),
                    "/v1/products/not-a-uuid",
                    None,
                    "",
                    422,
                    "invalid",
                ),
                (
                    "a path that is not UTF-8",
                    get.clone(),
                    "/v1/products/%C3%28",
                    None,
                    "",
                    400,
                    "malformed",
                ),
                (
                    "a query value of the wrong type",
                    get.clone(),
                    "/v1/products?page_size=many",
                    None,
                    "",
                    422,
                    "invalid",
                ),
                (
                    "an unknown query parameter",
                    get.clone(),
                    "/v1/products?colour=red",
                    None,
                    "",
                    422,
                    "invalid",
                ),
            ]);
            c
        }
        "caching" => {
            let mut c = common("/inventory/BOLT/reserve");
            c.extend([
                (
                    "an id that is not a UUID",
                    get.clone(),
                    "/profiles/not-a-uuid",
                    None,
                    "",
                    422,
                    "invalid",
                ),
                (
                    "a path that is not UTF-8",
                    get.clone(),
                    "/profiles/%C3%28",
                    None,
                    "",
                    400,
                    "malformed",
                ),
                (
                    "an unknown query parameter",
                    get.clone(),
                    "/pages/home/views?colour=red",
                    None,
                    "",
                    422,
                    "invalid",
                ),
            ]);
            c
        }
        "outbox API" => {
            let mut c = common("/orders");
            c.extend([
                (
                    "an array for a nested object",
                    post.clone(),
                    "/orders",
                    json,
                    r#"{"customer_id":"c","items":[["SKU-1",1,100]]}"#,
                    422,
                    "invalid",
                ),
                (
                    "an id that is not a UUID",
                    get.clone(),
                    "/orders/not-a-uuid",
                    None,
                    "",
                    422,
                    "invalid",
                ),
                (
                    "an id that is not a UUID",
                    post.clone(),
                    "/orders/not-a-uuid/cancel",
                    None,
                    "",
                    422,
                    "invalid",
                ),
                (
                    "a path that is not UTF-8",
                    get.clone(),
                    "/orders/%C3%28",
                    None,
                    "",
                    400,
                    "malformed",
                ),
                (
                    "a query value of the wrong type",
                    post.clone(),
                    "/orders?delivery=pigeon",
                    json,
                    "{}",
                    422,
                    "invalid",
                ),
            ]);
            c
        }
        "outbox consumer" => vec![
            (
                "a query value of the wrong type",
                get.clone(),
                "/notifications?limit=many",
                None,
                "",
                422,
                "invalid",
            ),
            (
                "an unknown query parameter",
                get.clone(),
                "/notifications?colour=red",
                None,
                "",
                422,
                "invalid",
            ),
        ],
        "chat" => vec![
            (
                "a query value of the wrong type",
                get.clone(),
                "/rooms/lobby/messages?limit=many",
                None,
                "",
                422,
                "invalid",
            ),
            (
                "a path that is not UTF-8",
                get.clone(),
                "/rooms/%C3%28/messages",
                None,
                "",
                400,
                "malformed",
            ),
        ],
        "telemetry" => {
            let mut c = common("/devices/t-1/commands");
            c.extend([
                (
                    "a query value of the wrong type",
                    get.clone(),
                    "/devices/t-1/readings?limit=many",
                    None,
                    "",
                    422,
                    "invalid",
                ),
                (
                    "a path that is not UTF-8",
                    get.clone(),
                    "/devices/%C3%28/readings",
                    None,
                    "",
                    400,
                    "malformed",
                ),
                (
                    "an id that is not a UUID",
                    get.clone(),
                    "/commands/not-a-uuid",
                    None,
                    "",
                    422,
                    "invalid",
                ),
            ]);
            c
        }
        _ => unreachable!(),
    };
    cases.extend([
        (
            "an unknown route",
            get.clone(),
            "/no/such/route",
            None,
            "",
            404,
            "not_found",
        ),
        (
            "a method the route does not take",
            Method::DELETE,
            "/healthz",
            None,
            "",
            405,
            "method_not_allowed",
        ),
        (
            "a made-up method",
            Method::from_bytes(b"ZZMETH").unwrap(),
            "/healthz",
            None,
            "",
            405,
            "method_not_allowed",
        ),
    ]);
    cases
}

const LABS: &[(&str, &str)] = &[
    ("catalog", "CATALOG_HTTP_ADDR"),
    ("caching", "CACHING_HTTP_ADDR"),
    ("outbox API", "OUTBOX_HTTP_ADDR"),
    ("outbox consumer", "OUTBOX_CONSUMER_ADDR"),
    ("chat", "CHAT_HTTP_ADDR"),
    ("telemetry", "TELEMETRY_HTTP_ADDR"),
];

#[tokio::test(flavor = "multi_thread")]
async fn every_refused_request_gets_the_json_error_with_one_status_per_kind() {
    let lab = tokio::task::spawn_blocking(|| ScratchLab::start("errors"))
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let mut problems = Vec::new();
    for (name, variable) in LABS {
        let port = lab.port(variable);
        for (what, method, path, content_type, body, status, code) in cases(name) {
            let mut request = http
                .request(method.clone(), format!("http://127.0.0.1:{port}{path}"))
                .body(body);
            if let Some(content_type) = content_type {
                request = request.header("content-type", content_type);
            }
            let response = request.send().await.unwrap();
            let got = response.status().as_u16();
            let kind = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let text = response.text().await.unwrap();
            let parsed: Option<Value> = serde_json::from_str(&text).ok();
            let got_code = parsed
                .as_ref()
                .and_then(|v| v["error"]["code"].as_str())
                .unwrap_or_default()
                .to_owned();
            if got != status || got_code != code || !kind.starts_with("application/json") {
                problems.push(format!(
                    "{name}: {what} ({method} {path}): expected {status} {code}, got {got} {kind}: {text}"
                ));
            }
        }
    }
    let status = tokio::task::spawn_blocking(move || lab.stop())
        .await
        .unwrap();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(status.success(), "lab up exited with {status}");
}
