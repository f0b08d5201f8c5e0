//! The caching lab: cache-aside, write-through and write-behind.
//!
//! Run one: `cargo test -p workshop --test caching <name>`.
//! Each test gets a fresh database from `#[sqlx::test]` and its own key
//! prefix in the shared Redis; outages go through a proxy the test cuts.
//! A Redis crash, and Redis's persistence modes, happen on a private Redis
//! of the test's own ([`PrivateRedis`]).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::{StreamExt, future::join_all, stream};
use lab_core::proxy::Proxy;
use redis::AsyncCommands;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use workshop::{CachingApp, Persistence, PrivateRedis, eventually, redis_url};

async fn create_profile(app: &CachingApp, name: &str) -> String {
    let response = app
        .http
        .post(app.url("/profiles"))
        .json(&json!({"name": name, "email": "ada@example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    body["id"].as_str().unwrap().to_owned()
}

/// GET a profile: (status, X-Cache, body).
async fn read_profile(app: &CachingApp, id: &str) -> (StatusCode, String, Value) {
    let response = app
        .http
        .get(app.url(&format!("/profiles/{id}")))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let cache = response
        .headers()
        .get("x-cache")
        .map_or(format!("status {}", response.status()), |v| {
            v.to_str().unwrap().to_owned()
        });
    (status, cache, response.json().await.unwrap())
}

async fn postgres_reads(app: &CachingApp) -> u64 {
    app.stats().await["postgres"]["reads"].as_u64().unwrap()
}

async fn db_views(app: &CachingApp, page: &str) -> i64 {
    let body = app
        .get_json(&format!("/pages/{page}/views?source=db"))
        .await;
    body["views"].as_i64().unwrap()
}

async fn put_inventory(app: &CachingApp, sku: &str, quantity: i64) -> reqwest::Response {
    app.http
        .put(app.url(&format!("/inventory/{sku}")))
        .json(&json!({"quantity": quantity}))
        .send()
        .await
        .unwrap()
}

/// Posts `n` views of `page`, each of them accepted.
async fn post_views(app: &CachingApp, page: &str, n: usize) {
    for _ in 0..n {
        let response = app
            .http
            .post(app.url(&format!("/pages/{page}/views")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
}

/// Polls the Postgres count until it reaches `want` (bounded), then returns it.
async fn wait_for_db_views(app: &CachingApp, page: &str, want: i64) -> i64 {
    for _ in 0..300 {
        let n = db_views(app, page).await;
        if n >= want {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    db_views(app, page).await
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn first_read_misses_and_second_hits(pool: PgPool) {
    let app = CachingApp::start(pool, CachingApp::settings()).await;
    let id = create_profile(&app, "Ada").await;

    let (status, cache, first) = read_profile(&app, &id).await;
    assert_eq!((status, cache.as_str()), (StatusCode::OK, "miss"));
    let (status, cache, second) = read_profile(&app, &id).await;
    assert_eq!((status, cache.as_str()), (StatusCode::OK, "hit"));
    assert_eq!(first, second);
    assert_eq!(
        postgres_reads(&app).await,
        1,
        "the hit did not touch Postgres"
    );

    let stats = app.stats().await;
    assert_eq!(stats["cache"]["hits"], 1);
    assert_eq!(stats["cache"]["misses"], 1);
    app.finish().await.unwrap();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn a_write_invalidates_so_the_next_read_returns_the_new_value(pool: PgPool) {
    let app = CachingApp::start(pool, CachingApp::settings()).await;
    let id = create_profile(&app, "Ada").await;
    read_profile(&app, &id).await;
    assert_eq!(read_profile(&app, &id).await.1, "hit");

    let response = app
        .http
        .put(app.url(&format!("/profiles/{id}")))
        .json(&json!({"name": "Ada Lovelace", "email": "ada@example.com", "bio": "Notes on the engine"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let (_, cache, body) = read_profile(&app, &id).await;
    assert_eq!(cache, "miss", "the write deleted the key");
    assert_eq!(body["name"], "Ada Lovelace");
    assert_eq!(read_profile(&app, &id).await.2["name"], "Ada Lovelace");

    let response = app
        .http
        .delete(app.url(&format!("/profiles/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(read_profile(&app, &id).await.0, StatusCode::NOT_FOUND);
    app.finish().await.unwrap();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn an_entry_expires_after_its_ttl_and_the_next_read_reloads_from_postgres(pool: PgPool) {
    let mut settings = CachingApp::settings();
    settings.ttl_secs = 1;
    let app = CachingApp::start(pool, settings).await;
    let id = create_profile(&app, "Ada").await;
    assert_eq!(read_profile(&app, &id).await.1, "miss");
    assert_eq!(read_profile(&app, &id).await.1, "hit");

    let key = format!("{}profile:{id}", app.prefix);
    let mut redis = app.redis.clone();
    let ttl_ms: i64 = redis.pttl(&key).await.unwrap();
    assert!(
        (1..=1100).contains(&ttl_ms),
        "a 1 s TTL (±10%), got {ttl_ms} ms"
    );

    // Wait for Redis to expire the key (bounded), then read again.
    for _ in 0..40 {
        if !redis.exists::<_, bool>(&key).await.unwrap() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        read_profile(&app, &id).await.1,
        "miss",
        "expired, so reloaded"
    );
    assert_eq!(postgres_reads(&app).await, 2);
    app.finish().await.unwrap();
}

/// Keys written together expire apart: each gets its own TTL within ±10%,
/// to the millisecond (whole seconds would round a 5 s TTL to 5 s every time).
#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn keys_written_together_get_ttls_spread_over_ten_percent(pool: PgPool) {
    let settings = caching::Settings {
        ttl_secs: 5,
        ..CachingApp::settings()
    };
    let app = CachingApp::start(pool, settings).await;
    let mut redis = app.redis.clone();
    let mut ttls = Vec::new();
    for i in 0..40 {
        let id = create_profile(&app, &format!("Reader {i}")).await;
        let written = std::time::Instant::now();
        assert_eq!(read_profile(&app, &id).await.1, "miss");
        let ttl: i64 = redis
            .pttl(format!("{}profile:{id}", app.prefix))
            .await
            .unwrap();
        let elapsed = written.elapsed().as_millis() as i64;
        assert!(
            ttl <= 5_500 && ttl + elapsed >= 4_500,
            "PTTL {ttl} ms, {elapsed} ms after the write: outside 5 s ± 10%"
        );
        ttls.push(ttl);
    }
    let (min, max) = (ttls.iter().min().unwrap(), ttls.iter().max().unwrap());
    println!("40 keys with CACHE_TTL_SECS=5: PTTL from {min} to {max} ms");
    assert!(
        max - min > 300,
        "PTTLs from {min} to {max} ms: no jitter to speak of"
    );
    app.finish().await.unwrap();
}

/// 200 readers miss the same cold key at once.
async fn stampede(pool: PgPool, protection: caching::Switch) -> u64 {
    let mut settings = CachingApp::settings();
    settings.stampede_protection = protection;
    let app = CachingApp::start(pool, settings).await;
    let id = create_profile(&app, "Popular").await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(200)
        .build()
        .unwrap();
    let url = app.url(&format!("/profiles/{id}"));
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(200));
    let readers = (0..200).map(|_| {
        let (client, url, barrier) = (client.clone(), url.clone(), barrier.clone());
        tokio::spawn(async move {
            barrier.wait().await;
            client.get(url).send().await.unwrap().status()
        })
    });
    for status in join_all(readers).await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    let stats = app.stats().await;
    app.finish().await.unwrap();
    // A Redis timeout would turn a read into a bypass and add a Postgres
    // read that has nothing to do with stampedes; say so if it happens.
    assert_eq!(stats["cache"]["bypasses"], 0, "{stats}");
    stats["postgres"]["reads"].as_u64().unwrap()
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn two_hundred_concurrent_misses_make_one_postgres_read_with_stampede_protection(
    pool: PgPool,
) {
    assert_eq!(stampede(pool, caching::Switch::On).await, 1);
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn without_stampede_protection_concurrent_misses_each_read_postgres(pool: PgPool) {
    let reads = stampede(pool, caching::Switch::Off).await;
    assert!(
        reads > 1,
        "expected a stampede, got {reads} Postgres read(s)"
    );
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn concurrent_reservations_never_oversell(pool: PgPool) {
    let app = CachingApp::start(pool.clone(), CachingApp::settings()).await;
    let response = put_inventory(&app, "WIDGET-1", 50).await;
    assert_eq!(response.status(), StatusCode::OK);

    let attempts = (0..100).map(|_| {
        let (http, url) = (app.http.clone(), app.url("/inventory/WIDGET-1/reserve"));
        tokio::spawn(async move {
            http.post(url)
                .json(&json!({"quantity": 1}))
                .send()
                .await
                .unwrap()
                .status()
        })
    });
    let statuses: Vec<StatusCode> = join_all(attempts)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let conflicts = statuses
        .iter()
        .filter(|s| **s == StatusCode::CONFLICT)
        .count();
    assert_eq!((ok, conflicts), (50, 50), "{statuses:?}");

    let stock = app.get_json("/inventory/WIDGET-1").await;
    assert_eq!(stock["quantity"], 0, "Redis agrees with the last write");
    let in_db: i64 = sqlx::query_scalar("SELECT quantity FROM inventory WHERE sku = 'WIDGET-1'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(in_db, 0);
    app.finish().await.unwrap();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn ten_thousand_views_posted_are_ten_thousand_in_postgres(pool: PgPool) {
    let app = CachingApp::start(pool, CachingApp::settings()).await;
    let url = app.url("/pages/home/views");
    let statuses: Vec<StatusCode> = stream::iter(0..10_000)
        .map(|_| {
            let (http, url) = (app.http.clone(), url.clone());
            async move { http.post(url).send().await.unwrap().status() }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == StatusCode::ACCEPTED));

    let redis = app.get_json("/pages/home/views").await;
    assert_eq!(redis["views"], 10_000, "Redis counts at once");
    assert_eq!(wait_for_db_views(&app, "home", 10_000).await, 10_000);
    // One more flush interval: still exactly 10,000, nothing counted twice.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(db_views(&app, "home").await, 10_000);
    assert_eq!(app.stats().await["write_behind"]["pending"], 0);
    app.finish().await.unwrap();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn a_flusher_killed_mid_batch_and_restarted_still_counts_every_view_once(pool: PgPool) {
    // A service whose own flusher waits an hour between flushes, so the
    // views stay in the stream for the "dead" flushers below.
    let mut settings = CachingApp::settings();
    settings.flush_interval_ms = 3_600_000;
    let prefix = settings.key_prefix.clone();
    let first = CachingApp::start(pool.clone(), settings.clone()).await;
    post_views(&first, "docs", 1000).await;

    let stream_key = format!("{prefix}views:stream");
    let redis = first.redis.clone();
    let read = |consumer: &'static str, count: usize| {
        let (mut redis, stream_key) = (redis.clone(), stream_key.clone());
        async move {
            let options = redis::streams::StreamReadOptions::default()
                .group("flushers", consumer)
                .count(count);
            let reply: redis::streams::StreamReadReply = redis
                .xread_options(&[&stream_key], &[">"], &options)
                .await
                .unwrap();
            reply
                .keys
                .into_iter()
                .flat_map(|k| k.ids)
                .collect::<Vec<_>>()
        }
    };
    // Flusher A read 400 views and died before committing them.
    assert_eq!(read("dead-a", 400).await.len(), 400);
    // Flusher B read 300, committed them, and died before XACK.
    let committed = read("dead-b", 300).await;
    let metrics = lab_core::metrics::Metrics::new("test");
    let b = caching::App::new(
        pool.clone(),
        redis.clone(),
        &redis_url(),
        settings.clone(),
        &metrics,
    );
    assert_eq!(caching::views::apply(&b, &committed).await.unwrap(), 300);
    // What the first service's own flusher took before its hour-long nap
    // (a view or two that arrived during its first flush, if any).
    let early = first.stats().await["write_behind"]["flushed_views"]
        .as_u64()
        .unwrap();
    // The service itself dies too, without draining.
    first.kill();

    // A new flusher starts: it claims A's entries, re-applies B's (counted
    // once), and flushes the rest.
    settings.flush_interval_ms = 100;
    let second = CachingApp::start(pool, settings).await;
    assert_eq!(wait_for_db_views(&second, "docs", 1000).await, 1000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        db_views(&second, "docs").await,
        1000,
        "nothing counted twice"
    );
    // The new flusher counted A's 400 and the 300 nobody had read; B's 300
    // came round again and were recognised as counted already.
    let stats = second.stats().await;
    assert_eq!(
        stats["write_behind"]["flushed_views"],
        700 - early,
        "{stats}"
    );
    assert_eq!(stats["write_behind"]["pending"], 0, "{stats}");
    second.finish().await.unwrap();
}

/// While Redis is cut, each pattern does what the lab says: cache-aside
/// reads bypass and writes succeed, write-through refuses writes and reads
/// Postgres, write-behind refuses views, and readiness names Redis.
async fn each_pattern_degrades_as_documented_while_redis_is_cut(app: &CachingApp, id: &str) {
    // Cache-aside reads are served from Postgres.
    let (status, cache, body) = read_profile(app, id).await;
    assert_eq!((status, cache.as_str()), (StatusCode::OK, "bypass"));
    assert_eq!(body["name"], "Before");
    // Cache-aside writes still succeed; the cached copy is now stale.
    let response = app
        .http
        .put(app.url(&format!("/profiles/{id}")))
        .json(&json!({"name": "During", "email": "ada@example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Write-through refuses, and writes nothing.
    let response = put_inventory(app, "BOLT", 99).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let error: Value = response.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Redis"),
        "{error}"
    );
    let response = app
        .http
        .post(app.url("/inventory/BOLT/reserve"))
        .json(&json!({"quantity": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    // Write-through reads fall back to Postgres, which is the truth.
    let response = app
        .http
        .get(app.url("/inventory/BOLT"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-cache"], "bypass");
    assert_eq!(response.json::<Value>().await.unwrap()["quantity"], 10);
    // Write-behind cannot accept a view it could not keep.
    let response = app
        .http
        .post(app.url("/pages/blog/views"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    // Readiness names Redis.
    let response = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let ready: Value = response.json().await.unwrap();
    let redis_check = ready["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "redis")
        .unwrap();
    assert_eq!(redis_check["ok"], false, "{ready}");
}

/// Once Redis is back it still holds the copy from before the write made
/// during the outage: reads go around it until the retry deletes it.
async fn the_stale_entry_is_bypassed_until_the_retry_deletes_it(app: &CachingApp, id: &str) {
    // Redis is back and still holds the stale "Before"…
    let mut redis = app.redis.clone();
    let key = format!("{}profile:{id}", app.prefix);
    let cached: Option<String> = redis.get(&key).await.unwrap();
    assert!(
        cached.as_deref().is_some_and(|c| c.contains("Before")),
        "{cached:?}"
    );
    // …yet a read serves "During", around the stale key.
    let (status, cache, body) = read_profile(app, id).await;
    assert_eq!((status, cache.as_str()), (StatusCode::OK, "bypass"));
    assert_eq!(body["name"], "During", "a stale cache entry was served");
    // The retry deletes the stale key; reads go back through the cache.
    let mut gone = false;
    for _ in 0..100 {
        if !redis.exists::<_, bool>(&key).await.unwrap() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the stale key was never deleted");
    let (_, cache, body) = read_profile(app, id).await;
    assert_eq!((cache.as_str(), &body["name"]), ("miss", &json!("During")));
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn with_redis_cut_reads_bypass_writes_through_fail_and_nothing_acknowledged_is_lost(
    pool: PgPool,
) {
    let target = redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let proxy = Proxy::start(&target).await.unwrap();
    let mut settings = CachingApp::settings();
    // Views stay in Redis until the shutdown drain, so the outage really
    // holds acknowledged views; stale keys are retried slowly, so the reads
    // after the outage really meet the stale copy.
    settings.flush_interval_ms = 3_600_000;
    settings.invalidation_retry_ms = 3_000;
    let app = CachingApp::start_with_redis(pool.clone(), settings, &proxy.url("redis")).await;

    let id = create_profile(&app, "Before").await;
    assert_eq!(read_profile(&app, &id).await.1, "miss");
    assert_eq!(read_profile(&app, &id).await.1, "hit");
    assert_eq!(
        put_inventory(&app, "BOLT", 10).await.status(),
        StatusCode::OK
    );
    post_views(&app, "blog", 50).await;

    proxy.cut();
    each_pattern_degrades_as_documented_while_redis_is_cut(&app, &id).await;

    proxy.restore();
    app.wait_until_ready().await;
    the_stale_entry_is_bypassed_until_the_retry_deletes_it(&app, &id).await;

    // The refused write did not happen; every acknowledged view arrives.
    let quantity: i64 = sqlx::query_scalar("SELECT quantity FROM inventory WHERE sku = 'BOLT'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(quantity, 10);
    app.finish().await.unwrap();
    let views: i64 = sqlx::query_scalar("SELECT views FROM page_views WHERE page = 'blog'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        views, 50,
        "every view acknowledged before the outage reached Postgres"
    );
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn bad_input_gets_the_documented_error(pool: PgPool) {
    use reqwest::Method;
    let app = CachingApp::start(pool, CachingApp::settings()).await;
    // (method, path, body, status, what the message must name)
    let cases = [
        (
            Method::PUT,
            "/inventory/NUT",
            Some(json!({"quantity": "ten"})),
            422,
            "quantity",
        ),
        (
            Method::PUT,
            "/inventory/NUT",
            Some(json!({"quantity": -1})),
            422,
            "quantity",
        ),
        (
            Method::PUT,
            "/inventory/nut",
            Some(json!({"quantity": 1})),
            422,
            "sku",
        ),
        (
            Method::POST,
            "/inventory/NOPE/reserve",
            Some(json!({"quantity": 1})),
            404,
            "NOPE",
        ),
        (
            Method::POST,
            "/inventory/NUT/reserve",
            Some(json!({"quantity": 0})),
            422,
            "quantity",
        ),
        (
            Method::POST,
            "/profiles",
            Some(json!({"name": "Ada", "email": "nope"})),
            422,
            "email",
        ),
        (
            Method::POST,
            "/profiles",
            Some(json!({"name": "A\0", "email": "a@b.c"})),
            422,
            "name",
        ),
        (Method::GET, "/profiles/42", None, 422, "id"),
        (Method::POST, "/pages/a%20b/views", None, 422, "page"),
        (
            Method::POST,
            "/profiles",
            Some(json!({"name": "x".repeat(65 * 1024), "email": "a@b.c"})),
            413,
            "bytes",
        ),
    ];
    for (method, path, body, status, names) in cases {
        let mut request = app.http.request(method.clone(), app.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{method} {path}");
        let body: Value = response.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(names),
            "{method} {path}: {message:?} should name {names}"
        );
    }
    app.finish().await.unwrap();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn stats_show_redis_and_readyz_checks_both_backends(pool: PgPool) {
    let app = CachingApp::start(pool, CachingApp::settings()).await;
    let ready = app.get_json("/readyz").await;
    let checks: Vec<(Value, Value)> = ready["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].clone(), c["ok"].clone()))
        .collect();
    assert_eq!(
        checks,
        [
            (json!("postgres"), json!(true)),
            (json!("redis"), json!(true))
        ],
        "{ready}"
    );
    let stats = app.stats().await;
    assert!(stats["redis"]["keys"].is_u64(), "{stats}");
    assert!(stats["redis"]["evicted_keys"].is_u64(), "{stats}");
    assert!(stats["redis"]["maxmemory_policy"].is_string(), "{stats}");
    // Whatever the shared Redis runs with, the service says which mode it is.
    let mode = &stats["write_behind"]["durability"]["mode"];
    assert!(mode.is_string() && mode != "unknown", "{stats}");
    app.finish().await.unwrap();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn shutdown_drains_the_write_behind_buffer(pool: PgPool) {
    // A flusher that would wait an hour: only the shutdown drain can move these.
    let mut settings = CachingApp::settings();
    settings.flush_interval_ms = 3_600_000;
    let prefix = settings.key_prefix.clone();
    let app = CachingApp::start(pool.clone(), settings).await;
    post_views(&app, "drain", 250).await;
    let mut redis = app.redis.clone();
    app.stop().await.expect("a clean stop");

    let in_db: i64 = sqlx::query_scalar("SELECT views FROM page_views WHERE page = 'drain'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        in_db, 250,
        "every acknowledged view reached Postgres before exit"
    );
    let left: u64 = redis.xlen(format!("{prefix}views:stream")).await.unwrap();
    assert_eq!(left, 0, "the stream was drained");
    workshop::delete_keys(&mut redis, &prefix).await;
}

/// A caching service whose Redis is reached through a proxy the test holds.
async fn caching_behind_a_proxy(pool: &PgPool, settings: caching::Settings) -> (Proxy, CachingApp) {
    let target = redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let proxy = Proxy::start(&target).await.unwrap();
    let app = CachingApp::start_with_redis(pool.clone(), settings, &proxy.url("redis")).await;
    (proxy, app)
}

async fn read_stock(app: &CachingApp, sku: &str) -> (String, Value) {
    let response = app
        .http
        .get(app.url(&format!("/inventory/{sku}")))
        .send()
        .await
        .unwrap();
    let cache = response
        .headers()
        .get("x-cache")
        .map_or(format!("status {}", response.status()), |v| {
            v.to_str().unwrap().to_owned()
        });
    (cache, response.json().await.unwrap())
}

/// The committed quantity, and what reads keep answering once things settle:
/// never a quantity that was not committed, however late the held write lands.
async fn reads_settle_on(app: &CachingApp, sku: &str, committed: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (cache, body) = read_stock(app, sku).await;
        if cache == "hit" && body["quantity"] == committed {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "reads never settled on the committed {committed}: {cache} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Settled: several reads in a row, all committed.
    for _ in 0..20 {
        let (_, body) = read_stock(app, sku).await;
        assert_eq!(
            body["quantity"], committed,
            "served an uncommitted quantity"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn a_write_through_that_timed_out_and_landed_late_is_never_served(pool: PgPool) {
    let settings = caching::Settings {
        invalidation_retry_ms: 100,
        ..CachingApp::settings()
    };
    let (proxy, app) = caching_behind_a_proxy(&pool, settings).await;
    assert_eq!(
        put_inventory(&app, "NUT", 10).await.status(),
        StatusCode::OK
    );
    assert_eq!(read_stock(&app, "NUT").await.1["quantity"], 10);

    // The write's Redis script waits in the network; the service gives up
    // on it (503), rolls Postgres back, and repairs the key on a new
    // connection. Then the held script arrives, after all of that.
    proxy.hold();
    let refused = put_inventory(&app, "NUT", 20).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    eventually(
        "the service repairs the key",
        Duration::from_secs(10),
        || async { (app.stats().await["cache"]["stale_keys_waiting"] == 0).then_some(()) },
    )
    .await;
    proxy.release();

    reads_settle_on(&app, "NUT", 10).await;
    app.finish().await.unwrap();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn a_write_through_that_timed_out_is_repaired_after_a_restart(pool: PgPool) {
    let settings = CachingApp::settings();
    let (proxy, app) = caching_behind_a_proxy(&pool, settings.clone()).await;
    assert_eq!(
        put_inventory(&app, "WASHER", 10).await.status(),
        StatusCode::OK
    );

    proxy.hold();
    let refused = put_inventory(&app, "WASHER", 20).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    // The service dies before it could repair anything; then the held
    // script lands.
    app.kill();
    proxy.release();

    let app = CachingApp::start(pool.clone(), settings).await;
    reads_settle_on(&app, "WASHER", 10).await;
    drop(proxy);
    app.finish().await.unwrap();
}

/// A restarted service that cannot reach Postgres yet cannot know which
/// keys a previous process left to repair: until it has read that list, it
/// serves no inventory hit (a miss goes to Postgres, which answers 503).
#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn a_service_restarted_while_postgres_is_down_serves_no_unrepaired_hit(pool: PgPool) {
    let settings = CachingApp::settings();
    let (redis_proxy, app) = caching_behind_a_proxy(&pool, settings.clone()).await;
    assert_eq!(
        put_inventory(&app, "PIN", 10).await.status(),
        StatusCode::OK
    );
    redis_proxy.hold();
    assert_eq!(
        put_inventory(&app, "PIN", 20).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    app.kill();
    redis_proxy.release(); // the uncommitted 20 lands in Redis

    // The next process starts while Postgres is out of reach.
    let options = pool.connect_options();
    let pg_proxy = Proxy::start(&format!("{}:{}", options.get_host(), options.get_port()))
        .await
        .unwrap();
    pg_proxy.cut();
    let url = format!(
        "postgres://postgres:postgres@{}/{}",
        pg_proxy.addr,
        options.get_database().unwrap()
    );
    let unreachable = lab_core::postgres::pool(url.parse().unwrap());
    let app = CachingApp::start(unreachable, settings).await;
    for _ in 0..5 {
        let (cache, body) = read_stock(&app, "PIN").await;
        assert_ne!(
            body["quantity"], 20,
            "served the uncommitted quantity ({cache}) before knowing what to repair"
        );
    }
    pg_proxy.restore();
    reads_settle_on(&app, "PIN", 10).await;
    app.finish().await.unwrap();
}

/// The last bound: an inventory key lives at most CACHE_TTL_SECS (±10%),
/// so even a wrong copy nothing recorded (Postgres down when the write
/// failed, and a restart before it returned) is gone within the TTL.
#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn an_inventory_key_lives_at_most_its_ttl(pool: PgPool) {
    let settings = caching::Settings {
        ttl_secs: 30,
        ..CachingApp::settings()
    };
    let app = CachingApp::start(pool, settings).await;
    assert_eq!(
        put_inventory(&app, "CLIP", 3).await.status(),
        StatusCode::OK
    );
    let mut redis = app.redis.clone();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("{}stock:CLIP", app.prefix))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!((1..=33_000).contains(&ttl), "PTTL {ttl}");
    app.finish().await.unwrap();
}

/// A steady stream of views of one page, about a hundred a second, one after
/// another, counting what was acknowledged (202) and what was not.
struct ViewStream {
    acked: Arc<AtomicU64>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<(u64, u64)>,
}

impl ViewStream {
    fn start(app: &CachingApp, page: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .unwrap();
        let url = app.url(&format!("/pages/{page}/views"));
        let (acked, stop) = (Arc::new(AtomicU64::new(0)), CancellationToken::new());
        let task = tokio::spawn({
            let (acked, stop) = (acked.clone(), stop.clone());
            async move {
                let mut failed = 0;
                while !stop.is_cancelled() {
                    match http.post(&url).send().await {
                        Ok(r) if r.status() == StatusCode::ACCEPTED => {
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => failed += 1,
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                (acked.load(Ordering::SeqCst), failed)
            }
        });
        Self { acked, stop, task }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// Stops the stream: (acknowledged, not acknowledged).
    async fn stop(self) -> (u64, u64) {
        self.stop.cancel();
        self.task.await.unwrap()
    }
}

/// What a Redis crash in the middle of a stream of views left behind.
#[derive(Debug)]
struct AfterCrash {
    acked: u64,
    failed: u64,
    in_postgres: i64,
    immediate: i64,
}

impl AfterCrash {
    /// Acknowledged views that never reached Postgres.
    fn lost(&self) -> u64 {
        self.acked.saturating_sub(self.in_postgres as u64)
    }
}

/// Streams views of `page`; once some are in Postgres, kills Redis (SIGKILL,
/// as a crash) and starts it again; once more views have been acknowledged,
/// stops, lets the flusher empty the stream, and reads both counts.
async fn crash_redis_under_a_stream_of_views(
    app: &CachingApp,
    redis: &mut PrivateRedis,
    page: &str,
) -> AfterCrash {
    let views = ViewStream::start(app, page);
    let limit = Duration::from_secs(30);
    eventually("views flushed before the crash", limit, || async {
        (views.acked() >= 50 && db_views(app, page).await > 0).then_some(())
    })
    .await;
    redis.kill();
    redis.start_again().await;
    let at_restart = views.acked();
    eventually("views acknowledged after the restart", limit, || async {
        (views.acked() >= at_restart + 50).then_some(())
    })
    .await;
    let (acked, failed) = views.stop().await;
    eventually("the flusher empties the stream", limit, || async {
        (app.stats().await["write_behind"]["pending"] == 0).then_some(())
    })
    .await;
    let immediate = app.get_json(&format!("/pages/{page}/views")).await;
    AfterCrash {
        acked,
        failed,
        in_postgres: db_views(app, page).await,
        immediate: immediate["views"].as_i64().unwrap(),
    }
}

/// The `redis` entry of `/readyz`.
async fn redis_readiness(app: &CachingApp) -> Value {
    let ready = app.get_json("/readyz").await;
    ready["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "redis")
        .cloned()
        .unwrap_or_else(|| panic!("no redis check: {ready}"))
}

/// Waits until `/stats` reports `mode`, then returns the durability section.
async fn durability_reported(app: &CachingApp, mode: &str) -> Value {
    eventually(
        &format!("/stats reports Redis persistence {mode:?}"),
        Duration::from_secs(10),
        || async {
            let durability = app.stats().await["write_behind"]["durability"].clone();
            (durability["mode"] == mode).then_some(durability)
        },
    )
    .await
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn with_aof_always_a_redis_crash_loses_no_acknowledged_view(pool: PgPool) {
    let mut redis = PrivateRedis::start(Persistence::Always).await;
    let settings = caching::Settings {
        flush_interval_ms: 1000,
        ..CachingApp::settings()
    };
    let app = CachingApp::start_on_redis(pool, settings, &redis.url()).await;

    let after = crash_redis_under_a_stream_of_views(&app, &mut redis, "steady").await;
    println!("appendfsync always: {after:?}, lost {}", after.lost());
    assert_eq!(after.lost(), 0, "acknowledged views lost: {after:?}");
    assert!(
        after.in_postgres as u64 <= after.acked + after.failed,
        "counted views nobody posted: {after:?}"
    );
    assert_eq!(after.immediate, after.in_postgres, "{after:?}");

    let durability = durability_reported(&app, "always").await;
    assert!(
        durability["restarts_seen"].as_u64() >= Some(1),
        "{durability}"
    );
    let ready = redis_readiness(&app).await;
    assert!(ready.get("warning").is_none(), "{ready}");
    app.finish().await.unwrap();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn without_aof_a_redis_crash_loses_unflushed_views_and_the_service_says_so(pool: PgPool) {
    let mut redis = PrivateRedis::start(Persistence::None).await;
    let settings = caching::Settings {
        flush_interval_ms: 1000,
        ..CachingApp::settings()
    };
    let app = CachingApp::start_on_redis(pool, settings, &redis.url()).await;

    let after = crash_redis_under_a_stream_of_views(&app, &mut redis, "steady").await;
    // Whatever was still in Redis at the crash is gone: how much depends on
    // where the flusher was (up to FLUSH_INTERVAL_MS of views).
    println!("no append-only file: {after:?}, lost {}", after.lost());
    assert!(
        after.in_postgres as u64 <= after.acked + after.failed,
        "counted views nobody posted: {after:?}"
    );
    assert_eq!(
        after.immediate, after.in_postgres,
        "the immediate count is rebuilt from Postgres plus what is pending, \
         not restarted from zero: {after:?}"
    );

    // The service says what it runs on and what that costs.
    let durability = durability_reported(&app, "none").await;
    assert!(
        durability["restarts_seen"].as_u64() >= Some(1),
        "{durability}"
    );
    let ready = redis_readiness(&app).await;
    assert_eq!(ready["ok"], true, "a warning, not a failure: {ready}");
    let warning = ready["warning"].as_str().unwrap_or_default();
    assert!(
        warning.contains("appendonly") && warning.contains("lose"),
        "{ready}"
    );
    app.finish().await.unwrap();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn the_persistence_mode_is_checked_again_while_the_service_runs(pool: PgPool) {
    let redis = PrivateRedis::start(Persistence::None).await;
    let app = CachingApp::start_on_redis(pool, CachingApp::settings(), &redis.url()).await;
    durability_reported(&app, "none").await;

    let mut conn = app.redis.clone();
    for (name, value) in [("appendfsync", "always"), ("appendonly", "yes")] {
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    durability_reported(&app, "always").await;
    let ready = redis_readiness(&app).await;
    assert!(ready.get("warning").is_none(), "{ready}");
    app.finish().await.unwrap();
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn an_immediate_count_redis_lost_is_rebuilt_from_postgres_plus_pending(pool: PgPool) {
    // 30 views reach Postgres; the service drains and stops.
    let settings = CachingApp::settings();
    let first = CachingApp::start(pool.clone(), settings.clone()).await;
    post_views(&first, "lost", 30).await;
    first.stop().await.unwrap();

    // 20 more go to a service that flushes once an hour: after the flush it
    // makes as it starts (which may catch a few), the rest wait in the stream.
    let app = CachingApp::start(
        pool.clone(),
        caching::Settings {
            flush_interval_ms: 3_600_000,
            ..settings
        },
    )
    .await;
    post_views(&app, "lost", 20).await;

    // Redis forgets the counter (as a restart without persistence does).
    let mut redis = app.redis.clone();
    let () = redis
        .del(format!("{}views:count:lost", app.prefix))
        .await
        .unwrap();
    let immediate = app.get_json("/pages/lost/views").await;
    assert_eq!(immediate["views"], 50, "Postgres plus pending: {immediate}");
    post_views(&app, "lost", 1).await;
    assert_eq!(app.get_json("/pages/lost/views").await["views"], 51);
    app.finish().await.unwrap();
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT views FROM page_views WHERE page = 'lost'")
            .fetch_one(&pool)
            .await
            .unwrap(),
        51
    );
}

#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn shutdown_drains_views_taken_after_redis_restarted_empty(pool: PgPool) {
    // A flusher that would wait an hour: only the shutdown drain moves views.
    let mut redis = PrivateRedis::start(Persistence::None).await;
    let settings = caching::Settings {
        flush_interval_ms: 3_600_000,
        ..CachingApp::settings()
    };
    let app = CachingApp::start_on_redis(pool.clone(), settings, &redis.url()).await;
    post_views(&app, "gone", 5).await;
    // Redis comes back empty: the stream and its group are gone, and with
    // them the views the flusher had not taken as it started.
    redis.kill();
    redis.start_again().await;
    app.wait_until_ready().await;
    post_views(&app, "after", 7).await;
    app.stop().await.expect("a clean stop");

    let after: i64 = sqlx::query_scalar("SELECT views FROM page_views WHERE page = 'after'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(after, 7, "the drain made the group again");
}

/// A Redis that comes back from a snapshot brings its counters back as they
/// were at the snapshot. A service started after that (it never saw the
/// Redis before) must not trust them: they were built under another run of
/// Redis.
#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn a_count_a_snapshot_brought_back_is_rebuilt_by_a_service_started_after_it(pool: PgPool) {
    let mut redis = PrivateRedis::start(Persistence::None).await;
    let settings = CachingApp::settings();
    let first = CachingApp::start_on_redis(pool.clone(), settings.clone(), &redis.url()).await;
    post_views(&first, "snap", 20).await;
    assert_eq!(wait_for_db_views(&first, "snap", 20).await, 20);
    // A snapshot (as `save 3600 1` would take), then 30 more views flushed.
    let mut conn = first.redis.clone();
    let () = redis::cmd("SAVE").query_async(&mut conn).await.unwrap();
    post_views(&first, "snap", 30).await;
    assert_eq!(wait_for_db_views(&first, "snap", 50).await, 50);
    first.stop().await.unwrap();

    // The machine goes down: Redis comes back from the snapshot, and a new
    // service starts on it.
    redis.kill();
    redis.start_again().await;
    let second = CachingApp::start_on_redis(pool, settings, &redis.url()).await;
    let immediate = second.get_json("/pages/snap/views").await;
    assert_eq!(
        immediate["views"], 50,
        "the count is Postgres plus pending, not the snapshot's: {immediate}"
    );
    post_views(&second, "snap", 5).await;
    assert_eq!(second.get_json("/pages/snap/views").await["views"], 55);
    assert_eq!(wait_for_db_views(&second, "snap", 55).await, 55);
    second.finish().await.unwrap();
}

/// The calls Redis has served of `command` since the last `CONFIG RESETSTAT`
/// (those made from scripts included).
async fn calls_of(conn: &mut lab_core::redis::Redis, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// A page nobody viewed has no counter, and neither does one whose first
/// view is being posted. Either costs a look at what the page has pending,
/// not a walk through every view waiting in the stream: any client can pick
/// new page names.
#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn a_new_page_costs_no_walk_through_the_backlog(pool: PgPool) {
    let redis = PrivateRedis::start(Persistence::None).await;
    let settings = caching::Settings {
        flush_interval_ms: 3_600_000,
        ..CachingApp::settings()
    };
    let app = CachingApp::start_on_redis(pool, settings, &redis.url()).await;
    // 10,000 views wait in the stream: the flusher naps for an hour.
    let url = app.url("/pages/popular/views");
    let posted = stream::iter(0..10_000)
        .map(|_| {
            let (http, url) = (app.http.clone(), url.clone());
            async move { http.post(url).send().await.unwrap().status() }
        })
        .buffer_unordered(32)
        .filter(|status| std::future::ready(*status == StatusCode::ACCEPTED))
        .count()
        .await;
    assert_eq!(posted, 10_000);

    let mut conn = app.redis.clone();
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    let reads = join_all((0..10).map(|i| {
        let url = app.url(&format!("/pages/never-{i}/views"));
        async move { workshop::get_json(&url).await }
    }));
    let firsts = join_all((0..10).map(|i| {
        let (http, url) = (
            app.http.clone(),
            app.url(&format!("/pages/first-{i}/views")),
        );
        async move {
            http.post(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    }));
    let (reads, firsts) = tokio::join!(reads, firsts);
    assert!(reads.iter().all(|r| r["views"] == 0), "{reads:?}");
    assert!(firsts.iter().all(|r| r["views"] == 1), "{firsts:?}");
    let walked = calls_of(&mut conn, "xrange").await;
    println!("20 new pages over a 10,000-view backlog: {walked} XRANGE calls");
    // Per page, one read of what arrived meanwhile and one in the script
    // that sets the counter (a third if more than a thousand arrived); a
    // walk through 10,000 entries takes eleven.
    assert!(
        walked <= 60,
        "{walked} XRANGE calls for 20 new pages: the backlog was walked"
    );

    // A page with views waiting still counts them all when its counter is lost.
    let () = conn
        .del(format!("{}views:count:popular", app.prefix))
        .await
        .unwrap();
    assert_eq!(app.get_json("/pages/popular/views").await["views"], 10_000);
    app.finish().await.unwrap();
}

/// Three views from an hour ago in `settings`' stream, counted into
/// Postgres half an hour ago by a flusher that died before acknowledging.
async fn counted_half_an_hour_ago_never_acknowledged(
    pool: &PgPool,
    redis: &lab_core::redis::Redis,
    settings: &caching::Settings,
) {
    let stream_key = format!("{}views:stream", settings.key_prefix);
    let mut redis = redis.clone();
    let hour_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        - 3_600_000;
    let () = redis
        .xgroup_create_mkstream(&stream_key, "flushers", "0")
        .await
        .unwrap();
    for seq in 1..=3 {
        let _: String = redis
            .xadd(
                &stream_key,
                format!("{hour_ago}-{seq}"),
                &[("page", "kept")],
            )
            .await
            .unwrap();
    }
    let options = redis::streams::StreamReadOptions::default()
        .group("flushers", "dead")
        .count(10);
    let reply: redis::streams::StreamReadReply = redis
        .xread_options(&[&stream_key], &[">"], &options)
        .await
        .unwrap();
    let entries: Vec<_> = reply.keys.into_iter().flat_map(|k| k.ids).collect();
    assert_eq!(entries.len(), 3);
    let metrics = lab_core::metrics::Metrics::new("test");
    let dead = caching::App::new(
        pool.clone(),
        redis.clone(),
        &redis_url(),
        settings.clone(),
        &metrics,
    );
    assert_eq!(caching::views::apply(&dead, &entries).await.unwrap(), 3);
    sqlx::query(
        "UPDATE page_view_entries SET applied_at = now() - interval '30 minutes'
         WHERE starts_with(entry, $1)",
    )
    .bind(&stream_key)
    .execute(pool)
    .await
    .unwrap();
}

/// Two caching services may share a database (exercises 2.2 and 2.5 run a
/// second one): each forgets only its own stream's entry ids, so the other
/// still recognises a batch it already counted.
#[sqlx::test(migrator = "lab_core::postgres::MIGRATOR")]
async fn a_second_service_on_the_database_never_makes_the_first_count_twice(pool: PgPool) {
    let settings = CachingApp::settings();
    let other = CachingApp::start(pool.clone(), CachingApp::settings()).await;

    // The first service is down; its stream holds three views from an hour
    // ago that its flusher counted half an hour ago and died before
    // acknowledging.
    let stream_key = format!("{}views:stream", settings.key_prefix);
    counted_half_an_hour_ago_never_acknowledged(&pool, &other.redis, &settings).await;

    // The other service flushes a view of its own, and tidies up after it
    // (done once its next batch is in: one flush at a time).
    post_views(&other, "elsewhere", 1).await;
    assert_eq!(wait_for_db_views(&other, "elsewhere", 1).await, 1);
    post_views(&other, "elsewhere", 1).await;
    assert_eq!(wait_for_db_views(&other, "elsewhere", 2).await, 2);
    let remembered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM page_view_entries WHERE starts_with(entry, $1)")
            .bind(&stream_key)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        remembered, 3,
        "the other service forgot this one's entry ids"
    );

    // The first service comes back; its flusher claims the dead one's views.
    let first = CachingApp::start(pool, settings).await;
    eventually("the stream is empty", Duration::from_secs(10), || async {
        (first.stats().await["write_behind"]["pending"] == 0).then_some(())
    })
    .await;
    assert_eq!(db_views(&first, "kept").await, 3, "counted once");
    first.finish().await.unwrap();
    other.finish().await.unwrap();
}
