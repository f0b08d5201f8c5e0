//! The catalog lab: one domain core behind REST and gRPC.
//!
//! Run one: `cargo test -p workshop --test catalog <name>`.
//! Each test gets a fresh database from `#[sqlx::test]` and a catalog served
//! in-process on ephemeral ports, reached with real HTTP and gRPC clients.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use catalog::domain::Product;
use lab_proto::catalog::v1::{self as pb, catalog_service_client::CatalogServiceClient};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use tonic::{Code, transport::Channel};
use workshop::{CatalogApp, closed_port};

/// Timestamps compared as text: prost-types renders a Timestamp as RFC 3339.
fn rfc3339(ts: &prost_types::Timestamp) -> String {
    ts.to_string()
}

fn mug(sku: &str) -> Value {
    json!({
        "sku": sku,
        "name": "Mug",
        "description": "Holds coffee",
        "price_cents": 1299,
        "currency": "EUR",
        "tags": ["kitchen", "ceramic"]
    })
}

fn grpc_mug(sku: &str) -> pb::CreateProductRequest {
    pb::CreateProductRequest {
        sku: sku.into(),
        name: "Mug".into(),
        description: "Holds coffee".into(),
        price_cents: Some(1299),
        currency: "EUR".into(),
        tags: vec!["kitchen".into(), "ceramic".into()],
    }
}

async fn post(app: &CatalogApp, body: &Value) -> reqwest::Response {
    app.http
        .post(app.url("/v1/products"))
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn create(app: &CatalogApp, sku: &str) -> Product {
    let response = post(app, &mug(sku)).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    response.json().await.unwrap()
}

async fn get(app: &CatalogApp, path: &str) -> reqwest::Response {
    app.http.get(app.url(path)).send().await.unwrap()
}

/// GET `path` and parse the body as `T`.
async fn get_body<T: serde::de::DeserializeOwned>(app: &CatalogApp, path: &str) -> T {
    get(app, path).await.json().await.unwrap()
}

/// The REST error body: `{"error":{"code","message"}}`.
async fn error_of(response: reqwest::Response) -> (StatusCode, String, String) {
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    (
        status,
        body["error"]["code"].as_str().unwrap().to_owned(),
        body["error"]["message"].as_str().unwrap().to_owned(),
    )
}

/// The same product as the REST JSON would show it, field for field.
fn as_json(p: &pb::Product) -> Value {
    let created = p.created_at.as_ref().unwrap();
    let updated = p.updated_at.as_ref().unwrap();
    json!({
        "id": p.id, "sku": p.sku, "name": p.name, "description": p.description,
        "price_cents": p.price_cents, "currency": p.currency, "tags": p.tags,
        "created_at": rfc3339(created), "updated_at": rfc3339(updated),
    })
}

/// A REST product in the same shape, its timestamps rendered the same way.
fn rest_json(p: &Product) -> Value {
    let mut v = serde_json::to_value(p).unwrap();
    for key in ["created_at", "updated_at"] {
        let ts = match key {
            "created_at" => p.created_at,
            _ => p.updated_at,
        };
        let proto = prost_types::Timestamp {
            seconds: ts.timestamp(),
            nanos: ts.timestamp_subsec_nanos() as i32,
        };
        v[key] = json!(rfc3339(&proto));
    }
    v
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn over_rest_each_write_reads_back_and_a_patch_changes_only_what_it_names(pool: PgPool) {
    let app = CatalogApp::start(pool).await;

    let response = post(&app, &mug("MUG-1")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let created: Product = response.json().await.unwrap();
    assert_eq!(location, format!("/v1/products/{}", created.id));
    assert_eq!(created.sku, "MUG-1");
    assert_eq!(created.tags, ["kitchen", "ceramic"]);

    let read: Product = get_body(&app, &location).await;
    assert_eq!(read, created);

    let response = app
        .http
        .patch(app.url(&location))
        .json(&json!({"price_cents": 999, "tags": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let updated: Product = response.json().await.unwrap();
    assert_eq!(updated.price_cents, 999);
    assert!(updated.tags.is_empty());
    assert_eq!(updated.name, "Mug", "fields absent from the patch stay");
    assert!(updated.updated_at > created.updated_at);

    let page: Value = get_body(&app, "/v1/products").await;
    assert_eq!(page["products"].as_array().unwrap().len(), 1);
    assert_eq!(page["next_page_token"], Value::Null);

    let response = app.http.delete(app.url(&location)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(get(&app, &location).await.status(), StatusCode::NOT_FOUND);
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn over_grpc_each_write_reads_back_and_an_update_changes_only_what_it_names(pool: PgPool) {
    let app = CatalogApp::start(pool).await;
    let mut grpc = app.grpc().await;

    let created = grpc
        .create_product(grpc_mug("MUG-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.sku, "MUG-1");
    let read = grpc
        .get_product(pb::GetProductRequest {
            id: created.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read, created);

    let updated = grpc
        .update_product(pb::UpdateProductRequest {
            id: created.id.clone(),
            price_cents: Some(999),
            tags: Some(pb::TagList { tags: vec![] }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.price_cents, 999);
    assert!(updated.tags.is_empty());
    assert_eq!(updated.name, "Mug", "fields absent from the update stay");

    let page = grpc
        .list_products(pb::ListProductsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.products, [updated]);
    assert_eq!(page.next_page_token, "");

    grpc.delete_product(pb::DeleteProductRequest {
        id: created.id.clone(),
    })
    .await
    .unwrap();
    let gone = grpc
        .get_product(pb::GetProductRequest { id: created.id })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn written_over_one_transport_reads_back_identically_over_the_other(pool: PgPool) {
    let app = CatalogApp::start(pool).await;
    let mut grpc = app.grpc().await;

    // REST → gRPC
    let over_rest = create(&app, "REST-WRITTEN").await;
    let via_grpc = grpc
        .get_product(pb::GetProductRequest {
            id: over_rest.id.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(as_json(&via_grpc), rest_json(&over_rest));

    // gRPC → REST
    let over_grpc = grpc
        .create_product(grpc_mug("GRPC-WRITTEN"))
        .await
        .unwrap()
        .into_inner();
    let via_rest: Product = get_body(&app, &format!("/v1/products/{}", over_grpc.id)).await;
    assert_eq!(rest_json(&via_rest), as_json(&over_grpc));
}

/// Each invalid value, over REST and over gRPC: 422 `invalid` and
/// INVALID_ARGUMENT, the message starting with the field's name.
async fn each_invalid_value_is_named_over_both_transports(
    app: &CatalogApp,
    grpc: &mut CatalogServiceClient<Channel>,
) {
    let cases: Vec<(&str, Value)> = vec![
        ("sku", json!("lower-case")),
        ("sku", json!("")),
        ("name", json!("")),
        ("name", json!("x".repeat(201))),
        ("description", json!("x".repeat(2001))),
        ("price_cents", json!(-1)),
        ("price_cents", json!(1_000_000_001)),
        ("currency", json!("eur")),
        ("tags", json!(vec!["t"; 21])),
        ("tags", json!([""])),
        ("tags", json!(["x".repeat(33)])),
    ];
    for (field, bad) in cases {
        let mut body = mug("GOOD-SKU");
        body[field] = bad.clone();
        let (status, code, message) = error_of(post(app, &body).await).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{field}={bad}");
        assert_eq!(code, "invalid");
        assert!(
            message.starts_with(field),
            "{message:?} should name {field}"
        );

        let request: pb::CreateProductRequest = pb::CreateProductRequest {
            sku: body["sku"].as_str().unwrap().into(),
            name: body["name"].as_str().unwrap().into(),
            description: body["description"].as_str().unwrap().into(),
            price_cents: body["price_cents"].as_i64(),
            currency: body["currency"].as_str().unwrap().into(),
            tags: serde_json::from_value(body["tags"].clone()).unwrap(),
        };
        let status = grpc.create_product(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}={bad}");
        assert!(
            status.message().starts_with(field),
            "{:?} should name {field}",
            status.message()
        );
    }
}

/// Wrong types and unknown fields are 422 too, naming the field; not JSON
/// at all is 400.
async fn wrong_types_unknown_fields_and_broken_json_are_refused(app: &CatalogApp) {
    let mut body = mug("GOOD-SKU");
    body["price_cents"] = json!("12.99");
    let (status, _, message) = error_of(post(app, &body).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(message.contains("price_cents"), "{message}");
    let mut body = mug("GOOD-SKU");
    body["colour"] = json!("blue");
    let (status, _, message) = error_of(post(app, &body).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(message.contains("colour"), "{message}");

    let response = app
        .http
        .post(app.url("/v1/products"))
        .header("content-type", "application/json")
        .body("{\"sku\": ")
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_of(response).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "malformed")
    );
}

/// A bad id, page token or page size is named as well.
async fn bad_ids_and_paging_parameters_are_named(
    app: &CatalogApp,
    grpc: &mut CatalogServiceClient<Channel>,
) {
    for (path, field) in [
        ("/v1/products/42", "id"),
        ("/v1/products?page_token=nope", "page_token"),
        ("/v1/products?page_size=1001", "page_size"),
    ] {
        let (status, _, message) = error_of(get(app, path).await).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(message.starts_with(field), "{message}");
    }
    let status = grpc
        .list_products(pb::ListProductsRequest {
            page_size: Some(5000),
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("page_size"));
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn each_invalid_field_is_named_with_422_and_invalid_argument(pool: PgPool) {
    let app = CatalogApp::start(pool).await;
    let mut grpc = app.grpc().await;
    each_invalid_value_is_named_over_both_transports(&app, &mut grpc).await;
    wrong_types_unknown_fields_and_broken_json_are_refused(&app).await;
    bad_ids_and_paging_parameters_are_named(&app, &mut grpc).await;

    // Nothing invalid was stored.
    let page: Value = get_body(&app, "/v1/products").await;
    assert_eq!(page["products"], json!([]));
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn an_unknown_id_is_404_and_not_found(pool: PgPool) {
    let app = CatalogApp::start(pool).await;
    let mut grpc = app.grpc().await;
    let id = uuid::Uuid::now_v7();
    let path = format!("/v1/products/{id}");

    let (status, code, message) = error_of(get(&app, &path).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    assert!(message.contains(&id.to_string()));
    let response = app
        .http
        .patch(app.url(&path))
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = app.http.delete(app.url(&path)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    let get = grpc
        .get_product(pb::GetProductRequest { id: id.to_string() })
        .await
        .unwrap_err();
    assert_eq!(get.code(), Code::NotFound);
    let update = grpc
        .update_product(pb::UpdateProductRequest {
            id: id.to_string(),
            name: Some("x".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(update.code(), Code::NotFound);
    let delete = grpc
        .delete_product(pb::DeleteProductRequest { id: id.to_string() })
        .await
        .unwrap_err();
    assert_eq!(delete.code(), Code::NotFound);
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn a_duplicate_sku_is_409_and_already_exists(pool: PgPool) {
    let app = CatalogApp::start(pool).await;
    let mut grpc = app.grpc().await;
    let first = create(&app, "ONLY-ONE").await;

    let (status, code, message) = error_of(post(&app, &mug("ONLY-ONE")).await).await;
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "conflict"));
    assert!(message.contains("ONLY-ONE"));
    let status = grpc.create_product(grpc_mug("ONLY-ONE")).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);

    // Renaming another product onto a taken sku is a conflict as well.
    let second = create(&app, "ANOTHER").await;
    let response = app
        .http
        .patch(app.url(&format!("/v1/products/{}", second.id)))
        .json(&json!({"sku": "ONLY-ONE"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);

    let read: Product = get_body(&app, &format!("/v1/products/{}", first.id)).await;
    assert_eq!(read, first, "the original is untouched");
}

/// Pages through the whole catalog over REST with a small page size.
async fn page_through_rest(app: &CatalogApp, page_size: u32) -> Vec<String> {
    let mut ids = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut url = app.url(&format!("/v1/products?page_size={page_size}"));
        if let Some(t) = &token {
            url.push_str(&format!("&page_token={t}"));
        }
        let page: Value = app
            .http
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for p in page["products"].as_array().unwrap() {
            ids.push(p["id"].as_str().unwrap().to_owned());
        }
        match page["next_page_token"].as_str() {
            Some(t) => token = Some(t.to_owned()),
            None => return ids,
        }
    }
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn paging_returns_every_product_exactly_once_while_others_are_inserted(pool: PgPool) {
    let app = CatalogApp::start(pool).await;
    let mut before = HashSet::new();
    for i in 0..120 {
        before.insert(create(&app, &format!("BEFORE-{i}")).await.id.to_string());
    }

    // Insert more products while two readers page through, one per transport.
    let writer = {
        let (http, url) = (app.http.clone(), app.url("/v1/products"));
        tokio::spawn(async move {
            for i in 0..80 {
                let response = http
                    .post(&url)
                    .json(&mug(&format!("DURING-{i}")))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), StatusCode::CREATED);
            }
        })
    };
    let rest_ids = page_through_rest(&app, 7).await;
    let mut grpc = app.grpc().await;
    let mut grpc_ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = grpc
            .list_products(pb::ListProductsRequest {
                page_size: Some(9),
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        grpc_ids.extend(page.products.into_iter().map(|p| p.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    writer.await.unwrap();

    for (transport, ids) in [("REST", rest_ids), ("gRPC", grpc_ids)] {
        let unique: HashSet<String> = ids.iter().cloned().collect();
        assert_eq!(
            unique.len(),
            ids.len(),
            "{transport} served a product twice"
        );
        let missing = before.difference(&unique).count();
        assert_eq!(
            missing, 0,
            "{transport} skipped {missing} products that existed before paging"
        );
    }
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn stream_products_returns_the_same_set_as_paging(pool: PgPool) {
    let app = CatalogApp::start(pool).await;
    // More than one internal stream batch (500), to cross a batch boundary.
    let mut grpc = app.grpc().await;
    for i in 0..620 {
        grpc.create_product(grpc_mug(&format!("S-{i}")))
            .await
            .unwrap();
    }
    let mut stream = grpc
        .stream_products(pb::StreamProductsRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut streamed = Vec::new();
    while let Some(product) = stream.message().await.unwrap() {
        streamed.push(product.id);
    }
    let paged = page_through_rest(&app, 100).await;
    assert_eq!(streamed.len(), 620);
    assert_eq!(streamed, paged, "same products in the same (id) order");
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn a_body_over_64_kib_is_refused(pool: PgPool) {
    let app = CatalogApp::start(pool).await;
    let mut body = mug("BIG");
    body["description"] = json!("x".repeat(65 * 1024));
    let (status, code, _) = error_of(post(&app, &body).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "too_large")
    );

    // gRPC has the same limit; tonic reports an oversized message as OUT_OF_RANGE.
    let mut grpc = app.grpc().await;
    let mut request = grpc_mug("BIG");
    request.description = "x".repeat(65 * 1024);
    let status = grpc.create_product(request).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    // The service is fine afterwards.
    create(&app, "SMALL").await;
}

#[tokio::test]
async fn readyz_names_postgres_when_its_port_is_closed() {
    let port = closed_port().await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let url = format!("postgres://postgres:secret@127.0.0.1:{port}/lab");
    let pool = lab_core::postgres::connect(&url, shutdown.clone()).unwrap();
    let app = CatalogApp::start(pool).await;

    let response = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["checks"][0]["name"], "postgres");
    assert_eq!(body["checks"][0]["ok"], false);
    let error = body["checks"][0]["error"].as_str().unwrap();
    assert!(error.contains(&format!("127.0.0.1:{port}")), "{error}");
    assert!(
        error.contains("docker compose up -d postgres"),
        "says how to start it: {error}"
    );
    assert!(
        !error.contains("secret"),
        "never shows the password: {error}"
    );

    // A request that needs the database gets 503, not a hang or a 500.
    let response = app.http.get(app.url("/v1/products")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    // Liveness is not readiness: the process itself is fine.
    let response = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    shutdown.cancel();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn readyz_is_200_when_postgres_is_up(pool: PgPool) {
    let app = CatalogApp::start(pool).await;
    let response = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["checks"], json!([{"name": "postgres", "ok": true}]));
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn metrics_count_the_requests_made(pool: PgPool) {
    let app = CatalogApp::start(pool).await;
    let product = create(&app, "COUNTED").await;
    let path = format!("/v1/products/{}", product.id);
    for _ in 0..3 {
        app.http.get(app.url(&path)).send().await.unwrap();
    }
    let unknown = format!("/v1/products/{}", uuid::Uuid::now_v7());
    app.http.get(app.url(&unknown)).send().await.unwrap();
    let mut grpc = app.grpc().await;
    grpc.get_product(pb::GetProductRequest {
        id: product.id.to_string(),
    })
    .await
    .unwrap();
    let missing = grpc
        .get_product(pb::GetProductRequest {
            id: uuid::Uuid::now_v7().to_string(),
        })
        .await;
    assert_eq!(missing.unwrap_err().code(), Code::NotFound);

    let text = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let count = |labels: &str| -> Option<String> {
        text.lines()
            .find(|l| l.starts_with(&format!("catalog_http_requests_total{{{labels}}}")))
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
    };
    assert_eq!(
        count(r#"method="GET",route="/v1/products/{id}",status="200""#).as_deref(),
        Some("3"),
        "{text}"
    );
    assert_eq!(
        count(r#"method="GET",route="/v1/products/{id}",status="404""#).as_deref(),
        Some("1"),
        "{text}"
    );
    assert_eq!(
        count(r#"method="POST",route="/v1/products",status="201""#).as_deref(),
        Some("1"),
        "{text}"
    );
    // gRPC is labelled by grpc-status: 0 is OK, 5 is NOT_FOUND.
    for status in ["0", "5"] {
        let labels = format!(
            r#"method="POST",route="/lab.catalog.v1.CatalogService/GetProduct",status="{status}""#
        );
        assert_eq!(count(&labels).as_deref(), Some("1"), "{text}");
    }
    assert!(
        text.contains("catalog_http_request_duration_seconds_bucket"),
        "latency histograms exported"
    );
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn graceful_shutdown_lets_an_in_flight_request_finish(pool: PgPool) {
    let app = CatalogApp::start(pool.clone()).await;
    let product = create(&app, "LOCKED").await;

    // Hold the product's row lock so the PATCH below has to wait in Postgres.
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM products WHERE id = $1 FOR UPDATE")
        .bind(product.id)
        .execute(&mut *blocker)
        .await
        .unwrap();
    let in_flight = tokio::spawn({
        let (http, url) = (
            app.http.clone(),
            app.url(&format!("/v1/products/{}", product.id)),
        );
        async move {
            http.patch(url)
                .json(&json!({"name": "Renamed during shutdown"}))
                .send()
                .await
        }
    });
    // Wait until the PATCH is really blocked on the lock (not merely sent).
    let mut polls = 0;
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        polls += 1;
        assert!(polls < 1000, "the PATCH never reached Postgres");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    app.trigger_shutdown();
    // New connections are refused once shutdown has begun…
    let mut refused = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(app.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(refused, "the listener should close when shutdown starts");

    // …but the request already in flight completes once the lock is released.
    blocker.commit().await.unwrap();
    let response = in_flight
        .await
        .unwrap()
        .expect("the in-flight request gets its answer");
    assert_eq!(response.status(), StatusCode::OK);
    let renamed: Product = response.json().await.unwrap();
    assert_eq!(renamed.name, "Renamed during shutdown");
    app.stop()
        .await
        .expect("serve returns cleanly after draining");
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn grpc_health_and_reflection_are_served(pool: PgPool) {
    let app = CatalogApp::start(pool).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let reply = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "lab.catalog.v1.CatalogService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        replies.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"lab.catalog.v1.CatalogService".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
}

/// Calls a unary gRPC method with `message` as its raw body (not necessarily
/// protobuf): the grpc-status and grpc-message the server answers with.
async fn raw_grpc(app: &CatalogApp, method: &str, message: &[u8]) -> (String, String) {
    let path = format!("/lab.catalog.v1.CatalogService/{method}");
    let response = raw_grpc_path(app, &path, message).await.unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    // An error comes "trailers-only", its status in the head; a success
    // sends its message first and its status in the trailers.
    let status = header("grpc-status");
    let status = if status.is_empty() && response.status() == StatusCode::OK {
        "0".to_owned()
    } else {
        status
    };
    (status, header("grpc-message"))
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn undecodable_protobuf_is_invalid_argument_like_rests_400(pool: PgPool) {
    let app = CatalogApp::start(pool).await;
    // Field 1 (sku) as a length-delimited string of one byte that is not UTF-8.
    let bad_utf8 = [0x0a, 0x01, 0xff];
    // A length prefix that runs past the end of the message.
    let truncated = [0x0a, 0x10, b'M'];
    for (what, message) in [
        ("invalid UTF-8", &bad_utf8[..]),
        ("truncated", &truncated[..]),
    ] {
        let (status, message) = raw_grpc(&app, "CreateProduct", message).await;
        assert_eq!(
            status, "3",
            "{what}: INVALID_ARGUMENT expected, got {status} {message}"
        );
        assert!(message.contains("decode"), "{what}: {message}");
    }
    let metrics = app
        .http
        .get(format!("http://{}/metrics", app.addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !metrics.contains(r#"status="13""#),
        "a client's garbage is not counted as a server error:\n{metrics}"
    );
    app.stop().await.unwrap();
}

/// proto3 cannot tell "absent" from zero unless a field says `optional`:
/// both transports must refuse what the other refuses.
#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn rest_and_grpc_refuse_the_same_missing_and_zero_fields(pool: PgPool) {
    let app = CatalogApp::start(pool).await;
    // REST: a product without a price, and a page of 0.
    let response = post(&app, &json!({"sku": "P-1", "name": "x", "currency": "EUR"})).await;
    let (status, _, message) = error_of(response).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(message.contains("price_cents"), "{message}");
    let (status, _, message) = error_of(get(&app, "/v1/products?page_size=0").await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{message}");

    // gRPC, as raw protobuf: sku "P-1", name "x", currency "EUR", no field 4.
    let no_price = [
        0x0a, 0x03, b'P', b'-', b'1', 0x12, 0x01, b'x', 0x2a, 0x03, b'E', b'U', b'R',
    ];
    let (status, message) = raw_grpc(&app, "CreateProduct", &no_price).await;
    assert_eq!(status, "3", "no price: {message}");
    assert!(message.contains("price_cents"), "{message}");
    // page_size present and 0.
    let (status, message) = raw_grpc(&app, "ListProducts", &[0x08, 0x00]).await;
    assert_eq!(status, "3", "page_size 0: {message}");
    assert!(message.contains("page_size"), "{message}");
    // Absent, it means the default, as on REST.
    let (status, message) = raw_grpc(&app, "ListProducts", &[]).await;
    assert_eq!(status, "0", "no page_size: {message}");
    app.stop().await.unwrap();
}

/// What keyset paging promises here, checked under 16 concurrent writers:
/// a listing is one snapshot, taken by its first page. Every product
/// committed before the first page is served exactly once, however ids and
/// commits interleave; no product created after the first page is served.
#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn paging_serves_exactly_the_products_committed_before_its_first_page(pool: PgPool) {
    use std::sync::{Arc, Mutex};
    let app = CatalogApp::start(pool).await;
    for i in 0..100 {
        create(&app, &format!("SEED-{i}")).await;
    }
    // Each create: (when it was sent, when it answered, its id).
    let log: Arc<Mutex<Vec<(Instant, Instant, String)>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let (http, url, log, stop) = (
                app.http.clone(),
                app.url("/v1/products"),
                log.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                for i in 0..400 {
                    if stop.is_cancelled() {
                        break;
                    }
                    let sent = Instant::now();
                    let response = http
                        .post(&url)
                        .json(&mug(&format!("W{w}-{i}")))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), StatusCode::CREATED);
                    let product: Product = response.json().await.unwrap();
                    log.lock()
                        .unwrap()
                        .push((sent, Instant::now(), product.id.to_string()));
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await; // writers in full flow
    let first_sent = Instant::now();
    let (served, first_answered) = page_through_rest_timed(&app, 10).await;
    stop.cancel();
    for writer in writers {
        writer.await.unwrap();
    }
    let log = log.lock().unwrap();
    let unique: HashSet<&String> = served.iter().collect();
    assert_eq!(unique.len(), served.len(), "a product was served twice");
    let committed_before: Vec<&String> = log
        .iter()
        .filter(|(_, answered, _)| *answered < first_sent)
        .map(|(_, _, id)| id)
        .collect();
    let created_after: Vec<&String> = log
        .iter()
        .filter(|(sent, _, _)| *sent > first_answered)
        .map(|(_, _, id)| id)
        .collect();
    assert!(
        !committed_before.is_empty() && !created_after.is_empty(),
        "writers were not concurrent"
    );
    let skipped = committed_before
        .iter()
        .filter(|id| !unique.contains(**id))
        .count();
    let late = created_after
        .iter()
        .filter(|id| unique.contains(**id))
        .count();
    assert_eq!(
        skipped, 0,
        "{skipped} products committed before the first page were skipped"
    );
    assert_eq!(
        late, 0,
        "{late} products created after the first page were served"
    );
    assert!(served.len() >= 100 + committed_before.len());
}

/// Pages through REST to the end; the ids and when the first page answered.
async fn page_through_rest_timed(app: &CatalogApp, page_size: u32) -> (Vec<String>, Instant) {
    let mut ids = Vec::new();
    let mut token: Option<String> = None;
    let mut first_answered = None;
    loop {
        let path = match &token {
            Some(t) => format!("/v1/products?page_size={page_size}&page_token={t}"),
            None => format!("/v1/products?page_size={page_size}"),
        };
        let page: Value = get_body(app, &path).await;
        first_answered.get_or_insert_with(Instant::now);
        for p in page["products"].as_array().unwrap() {
            ids.push(p["id"].as_str().unwrap().to_owned());
        }
        match page["next_page_token"].as_str() {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
    }
    (ids, first_answered.unwrap())
}

/// The document is the contract fuzzers and client generators read: it
/// names every status an operation answers with and the limits the code
/// enforces.
#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn the_openapi_document_carries_the_real_limits_and_statuses(pool: PgPool) {
    let app = CatalogApp::start(pool).await;
    let doc: Value = get_body(&app, "/openapi.json").await;
    let delete = &doc["paths"]["/v1/products/{id}"]["delete"]["responses"];
    assert!(delete.get("422").is_some(), "DELETE lists 422: {delete}");
    let new = &doc["components"]["schemas"]["NewProduct"]["properties"];
    assert_eq!(new["sku"]["maxLength"], 64, "{new}");
    assert_eq!(new["name"]["maxLength"], 200, "{new}");
    assert_eq!(new["price_cents"]["maximum"], 1_000_000_000, "{new}");
    assert_eq!(new["tags"]["maxItems"], 20, "{new}");
    app.stop().await.unwrap();
}

/// Any label a client controls is bounded on the gRPC port too: a thousand
/// made-up paths share one series.
#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn made_up_grpc_paths_add_no_metric_series(pool: PgPool) {
    let app = CatalogApp::start(pool).await;
    let series = || async {
        let text = app
            .http
            .get(format!("http://{}/metrics", app.addr))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines().filter(|l| !l.starts_with('#')).count()
    };
    // One of each kind first, so each kind's own series exist.
    for path in [
        "/zz/first",
        "/zzfirst",
        "/lab.catalog.v1.CatalogService/ZzFirst",
    ] {
        let _ = raw_grpc_path(&app, path, &[]).await;
    }
    series().await; // the scrape's own series, once
    let before = series().await;
    for i in 0..200 {
        let _ = raw_grpc_path(&app, &format!("/zz{i}"), &[]).await;
        let made_up = format!("/lab.catalog.v1.CatalogService/Zz{i}");
        let _ = raw_grpc_path(&app, &made_up, &[]).await;
    }
    let after = series().await;
    assert!(
        after - before < 10,
        "{before} series before, {after} after 400 made-up paths"
    );
    app.stop().await.unwrap();
}

/// POSTs one length-prefixed gRPC message (any bytes) to `path`.
async fn raw_grpc_path(
    app: &CatalogApp,
    path: &str,
    message: &[u8],
) -> reqwest::Result<reqwest::Response> {
    let mut body = vec![0u8];
    body.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    body.extend_from_slice(message);
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    client
        .post(format!("http://{}{path}", app.grpc_addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .send()
        .await
}
