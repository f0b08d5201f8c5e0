//! Helpers for the workshop tests: start a lab service in this process on
//! port 0 against the real backing services, and talk to it with real
//! clients. Each test gets its own database from `#[sqlx::test]`.

use std::net::SocketAddr;

use lab_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use sqlx::PgPool;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// A catalog served in-process on two ephemeral ports.
pub struct CatalogApp {
    pub rest: String,
    pub grpc_addr: SocketAddr,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl CatalogApp {
    /// Starts the catalog on `pool` (a fresh database from `#[sqlx::test]`).
    pub async fn start(pool: PgPool) -> Self {
        let http_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let rest = format!("http://{}", http_listener.local_addr().unwrap());
        let grpc_addr = grpc_listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(catalog::serve(
            http_listener,
            grpc_listener,
            pool,
            shutdown.clone(),
        ));
        Self {
            rest,
            grpc_addr,
            http: reqwest::Client::new(),
            shutdown,
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.rest)
    }

    pub async fn grpc(&self) -> CatalogServiceClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.grpc_addr))
            .unwrap()
            .connect()
            .await
            .expect("connect to the catalog's gRPC port");
        CatalogServiceClient::new(channel)
    }

    /// Fires the shutdown token, the way SIGTERM does in the binary.
    pub fn trigger_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Triggers shutdown and waits for `serve` to drain and return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.take().expect("stopped once").await?
    }
}

impl Drop for CatalogApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A local port with nothing listening on it.
pub async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

/// The Redis the tests use: `REDIS_URL`, or the lab's default.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| lab_core::config::DEFAULT_REDIS_URL.to_owned())
}

/// A Redis connection for a test, failing with what to do when Redis is down.
pub async fn redis_connection(url: &str) -> redis::aio::ConnectionManager {
    let mut conn = lab_core::redis::connect(url).unwrap();
    if let Err(err) = redis::cmd("PING").query_async::<String>(&mut conn).await {
        panic!(
            "{}",
            lab_core::redis::describe(&lab_core::redis::where_is(url), &err)
        );
    }
    conn
}

/// A key prefix no other test uses.
pub fn unique_prefix(lab: &str) -> String {
    format!("test:{lab}:{}:", uuid::Uuid::now_v7().simple())
}

/// Deletes every key under `prefix`.
pub async fn delete_keys(conn: &mut redis::aio::ConnectionManager, prefix: &str) {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(conn)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query_async(conn).await;
    }
}

/// The caching lab served in-process on an ephemeral port, with its own key
/// prefix in the shared Redis and its own database.
pub struct CachingApp {
    pub base: String,
    pub http: reqwest::Client,
    pub prefix: String,
    /// A direct connection to the real Redis (not through any proxy).
    pub redis: redis::aio::ConnectionManager,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl CachingApp {
    /// Test settings: a fresh prefix, fast flushes and claims.
    pub fn settings() -> caching::Settings {
        caching::Settings {
            http_addr: "127.0.0.1:0".into(),
            ttl_secs: 60,
            key_prefix: unique_prefix("caching"),
            stampede_protection: caching::Switch::On,
            flush_interval_ms: 100,
            flush_batch_size: 500,
            flush_claim_idle_ms: 300,
            invalidation_retry_ms: 200,
        }
    }

    pub async fn start(pool: PgPool, settings: caching::Settings) -> Self {
        Self::start_with_redis(pool, settings, &redis_url()).await
    }

    /// Starts the service against `service_redis_url` (a proxy, say), while
    /// the test keeps a direct connection to the real Redis.
    pub async fn start_with_redis(
        pool: PgPool,
        settings: caching::Settings,
        service_redis_url: &str,
    ) -> Self {
        let redis = redis_connection(&redis_url()).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let service_redis = lab_core::redis::connect(service_redis_url).unwrap();
        let prefix = settings.key_prefix.clone();
        let task = tokio::spawn(caching::serve(
            listener,
            pool,
            service_redis,
            service_redis_url.to_owned(),
            settings,
            shutdown.clone(),
        ));
        Self {
            base,
            http: reqwest::Client::new(),
            prefix,
            redis,
            shutdown,
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn stats(&self) -> serde_json::Value {
        self.http
            .get(self.url("/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Triggers shutdown and waits for the drain (the flusher empties the stream).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.take().expect("stopped once").await?
    }

    /// Stops, then deletes the test's keys from the shared Redis.
    pub async fn finish(self) -> anyhow::Result<()> {
        let (mut redis, prefix) = (self.redis.clone(), self.prefix.clone());
        let result = self.stop().await;
        delete_keys(&mut redis, &prefix).await;
        result
    }

    /// Kills the service mid-flight, the way a crash would: no drain.
    pub fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for CachingApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
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

/// One in-process service of the outbox lab (API, relay or consumer) on an
/// ephemeral port.
pub struct Service {
    pub base: String,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

type Serve<F> = fn(TcpListener, PgPool, String, outbox::Settings, CancellationToken) -> F;

impl Service {
    async fn start<F>(
        serve: Serve<F>,
        pool: PgPool,
        amqp_url: &str,
        settings: &outbox::Settings,
    ) -> Self
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            pool,
            amqp_url.to_owned(),
            settings.clone(),
            shutdown.clone(),
        ));
        Self {
            base,
            shutdown,
            task: Some(task),
        }
    }

    pub async fn api(pool: PgPool, amqp_url: &str, settings: &outbox::Settings) -> Self {
        Self::start(outbox::orders::serve, pool, amqp_url, settings).await
    }

    pub async fn relay(pool: PgPool, amqp_url: &str, settings: &outbox::Settings) -> Self {
        Self::start(outbox::relay::serve, pool, amqp_url, settings).await
    }

    pub async fn consumer(pool: PgPool, amqp_url: &str, settings: &outbox::Settings) -> Self {
        Self::start(outbox::consumer::serve, pool, amqp_url, settings).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET `path` and parse the JSON body, whatever the status.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        reqwest::get(self.url(path))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Triggers shutdown and waits for the drain.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.take().expect("stopped once").await?
    }

    /// Kills the service mid-flight, the way a crash would: its tasks are
    /// dropped, its connections closed, nothing drains.
    pub fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Outbox settings for one test: its own exchange and queue, quick polls
/// and quick takeovers. Deletes them from the shared broker when dropped.
pub struct OutboxTopology {
    pub settings: outbox::Settings,
}

impl OutboxTopology {
    pub fn new() -> Self {
        let name = format!("test.outbox.{}", uuid::Uuid::now_v7().simple());
        Self {
            settings: outbox::Settings {
                http_addr: "127.0.0.1:0".into(),
                relay_addr: "127.0.0.1:0".into(),
                consumer_addr: "127.0.0.1:0".into(),
                exchange: format!("{name}.events"),
                queue: format!("{name}.notifications"),
                notify: outbox::Switch::On,
                relay_batch_size: 500,
                relay_poll_interval_ms: 200,
                relay_lease_retry_ms: 200,
                retention_secs: 3600,
                consumer_prefetch: 64,
                consumer_max_attempts: 3,
            },
        }
    }
}

impl Default for OutboxTopology {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for OutboxTopology {
    fn drop(&mut self) {
        // Drop cannot await, and may run inside a runtime: clean up on a
        // thread of its own.
        let settings = self.settings.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let Ok(connection) = lab_core::amqp::connect(&amqp_url(), "workshop-cleanup").await
                else {
                    return;
                };
                if let Ok(channel) = connection.create_channel().await {
                    let (exchange, queue) = (&settings.exchange, &settings.queue);
                    let _ = outbox::events::delete_topology(&channel, exchange, queue).await;
                }
                lab_core::amqp::close(&connection, "cleaned up").await;
            });
        })
        .join();
    }
}
