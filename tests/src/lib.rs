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

/// A TCP proxy in front of a backing service, which a test can cut and
/// restore, to break the network path without touching the shared server.
pub mod proxy {
    use std::{
        net::SocketAddr,
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
    };

    use tokio::{
        net::{TcpListener, TcpStream},
        sync::watch,
    };

    pub struct Proxy {
        pub addr: SocketAddr,
        up: Arc<AtomicBool>,
        cuts: watch::Sender<u64>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Proxy {
        /// Listens on 127.0.0.1:0 and forwards every connection to `target`.
        pub async fn start(target: &str) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let up = Arc::new(AtomicBool::new(true));
            let (cuts, _) = watch::channel(0u64);
            let task = tokio::spawn({
                let (up, cuts, target) = (up.clone(), cuts.clone(), target.to_owned());
                async move {
                    while let Ok((mut client, _)) = listener.accept().await {
                        if !up.load(Ordering::SeqCst) {
                            continue; // dropped: the client sees the connection close
                        }
                        let mut cut = cuts.subscribe();
                        let target = target.clone();
                        tokio::spawn(async move {
                            let Ok(mut server) = TcpStream::connect(&target).await else {
                                return;
                            };
                            let _ = client.set_nodelay(true);
                            let _ = server.set_nodelay(true);
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                                _ = cut.changed() => {}
                            }
                        });
                    }
                }
            });
            Self {
                addr,
                up,
                cuts,
                task,
            }
        }

        /// Closes every open connection and refuses new ones.
        pub fn cut(&self) {
            self.up.store(false, Ordering::SeqCst);
            self.cuts.send_modify(|n| *n += 1);
        }

        /// Lets connections through again.
        pub fn restore(&self) {
            self.up.store(true, Ordering::SeqCst);
        }

        /// `redis://127.0.0.1:<port>` and friends: the target's URL via the proxy.
        pub fn url(&self, scheme: &str) -> String {
            format!("{scheme}://{}", self.addr)
        }
    }

    impl Drop for Proxy {
        fn drop(&mut self) {
            self.task.abort();
            self.cut();
        }
    }
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
