//! What the labs' tests share: waiting and polling, reading JSON, a port or
//! a prefix of a test's own, and a direct connection to each backing
//! service that fails, saying how to start it, when the service is down.
//! (The MQTT broker's helpers are in [`crate::mqtt`].)

use std::{future::Future, time::Duration};

use sqlx::PgPool;
use tokio::net::TcpListener;

/// Waits until `base`'s `/readyz` answers 200 (for at most 10 s), failing
/// with what it says otherwise.
pub async fn wait_ready(base: &str) {
    let url = format!("{base}/readyz");
    for _ in 0..200 {
        if let Ok(response) = reqwest::get(&url).await
            && response.status() == reqwest::StatusCode::OK
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{base} was not ready within 10 s: {}", get_json(&url).await);
}

/// GET `url` and parse the JSON body, whatever the status.
pub async fn get_json(url: &str) -> serde_json::Value {
    let response = reqwest::get(url)
        .await
        .unwrap_or_else(|err| panic!("GET {url}: {err}"));
    response
        .json()
        .await
        .unwrap_or_else(|err| panic!("GET {url}: not JSON: {err}"))
}

/// Polls `probe` every 50 ms until it returns `Some`, for at most `limit`;
/// fails naming `what` otherwise.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The number a `SELECT count(*) …` returns.
pub async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// A listener on a free local port, for a service the test starts.
pub async fn ephemeral_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// A local port with nothing listening on it.
pub async fn closed_port() -> u16 {
    ephemeral_listener().await.local_addr().unwrap().port()
}

/// A key prefix no other test uses.
pub fn unique_prefix(lab: &str) -> String {
    format!("test:{lab}:{}:", uuid::Uuid::now_v7().simple())
}

/// The Redis the tests use: `REDIS_URL`, or the lab's default.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| lab_core::config::DEFAULT_REDIS_URL.to_owned())
}

/// A Redis connection for a test, failing with what to do when Redis is down.
pub async fn redis_connection(url: &str) -> lab_core::redis::Redis {
    let mut conn = lab_core::redis::connect(url).unwrap();
    if let Err(err) = redis::cmd("PING").query_async::<String>(&mut conn).await {
        panic!(
            "{}",
            lab_core::redis::describe(&lab_core::redis::where_is(url), &err)
        );
    }
    conn
}

/// Deletes every key under `prefix`.
pub async fn delete_keys(conn: &mut lab_core::redis::Redis, prefix: &str) {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(conn)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query_async(conn).await;
    }
}

/// The RabbitMQ the tests use: `AMQP_URL`, or the lab's default.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| lab_core::config::DEFAULT_AMQP_URL.to_owned())
}

/// A channel on a direct connection to the real RabbitMQ, failing with what
/// to do when it is down. The connection lives as long as the channel.
pub async fn amqp_channel() -> lapin::Channel {
    let url = amqp_url();
    let connection = lab_core::amqp::connect(&url, "workshop-test")
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    connection.create_channel().await.unwrap()
}
