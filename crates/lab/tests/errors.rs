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

/// One bad request and the answer it must get.
#[derive(Clone)]
struct Case {
    what: &'static str,
    method: Method,
    path: &'static str,
    content_type: Option<&'static str>,
    body: &'static str,
    status: u16,
    code: &'static str,
}

/// A request with no body.
fn get(what: &'static str, path: &'static str, status: u16, code: &'static str) -> Case {
    Case {
        what,
        method: Method::GET,
        path,
        content_type: None,
        body: "",
        status,
        code,
    }
}

/// A POST with a JSON body.
fn post(what: &'static str, path: &'static str, body: &'static str, code: &'static str) -> Case {
    let status = if code == "malformed" { 400 } else { 422 };
    Case {
        method: Method::POST,
        content_type: Some("application/json"),
        body,
        ..get(what, path, status, code)
    }
}

/// What every JSON body endpoint must refuse.
fn json_body(path: &'static str) -> Vec<Case> {
    vec![
        post("malformed JSON", path, "{", "malformed"),
        post("an array for an object", path, r#"["x", 1]"#, "invalid"),
        Case {
            content_type: Some("text/plain"),
            status: 415,
            ..post("no JSON content type", path, "{}", "unsupported_media_type")
        },
    ]
}

/// What every service must refuse, on its shared routes.
fn every_service() -> Vec<Case> {
    vec![
        get("an unknown route", "/no/such/route", 404, "not_found"),
        Case {
            method: Method::DELETE,
            ..get(
                "a method the route does not take",
                "/healthz",
                405,
                "method_not_allowed",
            )
        },
        Case {
            method: Method::from_bytes(b"ZZMETH").unwrap(),
            ..get("a made-up method", "/healthz", 405, "method_not_allowed")
        },
    ]
}

fn catalog() -> Vec<Case> {
    [
        json_body("/v1/products"),
        vec![
            post(
                "a wrong type",
                "/v1/products",
                r#"{"price_cents":"cheap"}"#,
                "invalid",
            ),
            get(
                "an id that is not a UUID",
                "/v1/products/not-a-uuid",
                422,
                "invalid",
            ),
            get(
                "a path that is not UTF-8",
                "/v1/products/%C3%28",
                400,
                "malformed",
            ),
            get(
                "a query value of the wrong type",
                "/v1/products?page_size=many",
                422,
                "invalid",
            ),
            get(
                "an unknown query parameter",
                "/v1/products?colour=red",
                422,
                "invalid",
            ),
        ],
    ]
    .concat()
}

fn outbox_consumer() -> Vec<Case> {
    vec![
        get(
            "a query value of the wrong type",
            "/notifications?limit=many",
            422,
            "invalid",
        ),
        get(
            "an unknown query parameter",
            "/notifications?colour=red",
            422,
            "invalid",
        ),
    ]
}

fn telemetry() -> Vec<Case> {
    [
        json_body("/devices/t-1/commands"),
        vec![
            post(
                "a wrong type",
                "/devices/t-1/commands",
                r#"{"setpoint_c":"hot"}"#,
                "invalid",
            ),
            get(
                "a query value of the wrong type",
                "/devices/t-1/readings?limit=many",
                422,
                "invalid",
            ),
            get(
                "a path that is not UTF-8",
                "/devices/%C3%28/readings",
                400,
                "malformed",
            ),
            get(
                "an id that is not a UUID",
                "/commands/not-a-uuid",
                422,
                "invalid",
            ),
        ],
    ]
    .concat()
}

fn caching() -> Vec<Case> {
    [
        json_body("/inventory/BOLT/reserve"),
        vec![
            post(
                "a wrong type",
                "/inventory/BOLT/reserve",
                r#"{"quantity":"lots"}"#,
                "invalid",
            ),
            get(
                "an id that is not a UUID",
                "/profiles/not-a-uuid",
                422,
                "invalid",
            ),
            get(
                "a path that is not UTF-8",
                "/profiles/%C3%28",
                400,
                "malformed",
            ),
            get(
                "an unknown query parameter",
                "/pages/home/views?colour=red",
                422,
                "invalid",
            ),
        ],
    ]
    .concat()
}

fn outbox_api() -> Vec<Case> {
    let nested = r#"{"customer_id":"c","items":[["SKU-1",1,100]]}"#;
    [
        json_body("/orders"),
        vec![
            post("a wrong type", "/orders", r#"{"customer_id":7}"#, "invalid"),
            post("an array for a nested object", "/orders", nested, "invalid"),
            post(
                "a bad query value",
                "/orders?delivery=pigeon",
                "{}",
                "invalid",
            ),
            get(
                "an id that is not a UUID",
                "/orders/not-a-uuid",
                422,
                "invalid",
            ),
            get(
                "a path that is not UTF-8",
                "/orders/%C3%28",
                400,
                "malformed",
            ),
            Case {
                method: Method::POST,
                ..get(
                    "an id that is not a UUID",
                    "/orders/x/cancel",
                    422,
                    "invalid",
                )
            },
        ],
    ]
    .concat()
}

fn chat() -> Vec<Case> {
    vec![
        get(
            "a wrong query type",
            "/rooms/lobby/messages?limit=many",
            422,
            "invalid",
        ),
        get(
            "a path that is not UTF-8",
            "/rooms/%C3%28/messages",
            400,
            "malformed",
        ),
        get(
            "a name that breaks the rule",
            "/rooms/two%20words/messages",
            422,
            "invalid",
        ),
    ]
}

fn cases(lab: &str) -> Vec<Case> {
    let own = match lab {
        "catalog" => catalog(),
        "caching" => caching(),
        "outbox API" => outbox_api(),
        "outbox consumer" => outbox_consumer(),
        "chat" => chat(),
        "telemetry" => telemetry(),
        _ => unreachable!(),
    };
    [own, every_service()].concat()
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
        for Case {
            what,
            method,
            path,
            content_type,
            body,
            status,
            code,
        } in cases(name)
        {
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
