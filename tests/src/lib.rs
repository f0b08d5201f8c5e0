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
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
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

/// A key prefix no other test uses.
pub fn unique_prefix(lab: &str) -> String {
    format!("test:{lab}:{}:", uuid::Uuid::now_v7().simple())
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

/// The caching lab served in-process on an ephemeral port, with its own key
/// prefix in the shared Redis and its own database.
pub struct CachingApp {
    pub base: String,
    pub http: reqwest::Client,
    pub prefix: String,
    /// A direct connection to the real Redis (not through any proxy).
    pub redis: lab_core::redis::Redis,
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
        get_json(&self.url(path)).await
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

/// A chat instance served in-process on an ephemeral port. Instances that
/// share a key prefix share rooms, as compose's two instances do.
pub struct ChatApp {
    pub addr: SocketAddr,
    pub prefix: String,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl ChatApp {
    /// Test settings: a fresh prefix, the production limits and timings.
    pub fn settings() -> chat::Settings {
        chat::Settings {
            http_addr: "127.0.0.1:0".into(),
            instance: "test".into(),
            key_prefix: unique_prefix("chat"),
            history_len: 1000,
            rate_per_sec: std::num::NonZeroU32::new(10).unwrap(),
            rate_burst: std::num::NonZeroU32::new(20).unwrap(),
            outbound_queue: 256,
            ping_interval_ms: 20_000,
            idle_timeout_ms: 60_000,
        }
    }

    pub async fn start(settings: chat::Settings) -> Self {
        Self::start_at("127.0.0.1:0", settings, &redis_url()).await
    }

    /// Starts the service against `service_redis_url` (a proxy, say).
    pub async fn start_with_redis(settings: chat::Settings, service_redis_url: &str) -> Self {
        Self::start_at("127.0.0.1:0", settings, service_redis_url).await
    }

    /// Starts the service on `addr`: a restart on the port it had before.
    pub async fn start_at(addr: &str, settings: chat::Settings, service_redis_url: &str) -> Self {
        redis_connection(&redis_url()).await; // fail early, saying how to start Redis
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let prefix = settings.key_prefix.clone();
        let redis = service_redis_url.to_owned();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { chat::serve(listener, &redis, settings, shutdown).await }
        });
        let app = Self {
            addr,
            prefix,
            shutdown,
            task: Some(task),
        };
        // Ready means Redis answers and the pub/sub bus is subscribed, so
        // a test's first join goes through Redis.
        wait_ready(&app.url("")).await;
        app
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self, room: &str, name: &str) -> String {
        format!("ws://{}/ws?room={room}&name={name}", self.addr)
    }

    /// GET `path` and parse the JSON body, whatever the status.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        get_json(&self.url(path)).await
    }

    /// Triggers shutdown and waits for the drain.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.take().expect("stopped once").await?
    }

    /// Stops, then deletes the test's keys from the shared Redis.
    pub async fn finish(self) -> anyhow::Result<()> {
        let prefix = self.prefix.clone();
        let result = self.stop().await;
        delete_keys(&mut redis_connection(&redis_url()).await, &prefix).await;
        result
    }
}

impl Drop for ChatApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A chat instance on a runtime of its own, which a test can crash: the
/// runtime is dropped with every task on it, so no connection closes
/// cleanly and no member leaves; the process just stops answering, as a
/// killed pod would.
pub struct CrashableChat {
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl CrashableChat {
    /// Starts it and waits until it is subscribed to the rooms' channels.
    pub async fn start(settings: chat::Settings) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let redis = redis_url();
        runtime.spawn(async move {
            let listener = TcpListener::from_std(listener)?;
            chat::serve(listener, &redis, settings, CancellationToken::new()).await
        });
        let chat = Self {
            addr,
            runtime: Some(runtime),
        };
        wait_ready(&format!("http://{addr}")).await;
        chat
    }

    pub fn ws_url(&self, room: &str, name: &str) -> String {
        format!("ws://{}/ws?room={room}&name={name}", self.addr)
    }

    pub fn crash(mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for CrashableChat {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Headless Chromium driven through ChromeDriver (WebDriver), for the pages
/// the labs serve. Each `Browser` is its own browser session, so two of them
/// are two people.
pub struct Browser {
    pub client: fantoccini::Client,
}

/// One ChromeDriver process, stopped when dropped.
pub struct ChromeDriver {
    pub url: String,
    child: std::process::Child,
}

impl ChromeDriver {
    /// Starts `chromedriver` (or `$CHROMEDRIVER`) on a free port. A missing
    /// browser fails the test, saying what to install: a browser test that
    /// quietly skips proves nothing.
    pub async fn start() -> Self {
        let driver = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let port = closed_port().await;
        let child = std::process::Command::new(&driver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot start {driver} ({err}): the browser tests need headless Chromium \
                     and ChromeDriver; install them with `apt-get install chromium \
                     chromium-driver` (or set CHROMEDRIVER and CHROME_BIN)"
                )
            });
        let driver_process = Self {
            url: format!("http://127.0.0.1:{port}"),
            child,
        };
        for _ in 0..100 {
            if reqwest::get(format!("{}/status", driver_process.url))
                .await
                .is_ok()
            {
                return driver_process;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!(
            "{driver} did not answer on {} within 10 s",
            driver_process.url
        );
    }

    /// A new headless browser session.
    pub async fn browser(&self) -> Browser {
        let chrome = std::env::var("CHROME_BIN").unwrap_or_else(|_| "/usr/bin/chromium".into());
        assert!(
            std::path::Path::new(&chrome).exists(),
            "{chrome} not found: install it with `apt-get install chromium` (or set CHROME_BIN)"
        );
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chrome,
                // No sandbox: tests run as root in CI. The rest keeps Chromium
                // from reaching for the network, which this machine refuses.
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--window-size=1000,700"],
            }),
        );
        let client = fantoccini::ClientBuilder::new(
            hyper_util::client::legacy::connect::HttpConnector::new(),
        )
        .capabilities(capabilities)
        .connect(&self.url)
        .await
        .unwrap_or_else(|err| panic!("start a headless Chromium session: {err}"));
        Browser { client }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    /// Evaluates a JavaScript expression in the page.
    pub async fn eval(&self, expression: &str) -> serde_json::Value {
        self.client
            .execute(&format!("return {expression};"), vec![])
            .await
            .unwrap_or_else(|err| panic!("evaluate `{expression}`: {err}"))
    }

    /// Polls `expression` until it is true, for at most `limit`; fails
    /// showing the page's text.
    pub async fn wait_until(&self, expression: &str, limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if self.eval(expression).await == serde_json::Value::Bool(true) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let text = self.eval("document.body.innerText").await;
        panic!("`{expression}` was not true within {limit:?}; the page shows:\n{text}");
    }

    /// Types `text` into the element with this id.
    pub async fn type_into(&self, id: &str, text: &str) {
        let input = self.client.find(fantoccini::Locator::Id(id)).await.unwrap();
        input.send_keys(text).await.unwrap();
    }

    pub async fn click(&self, id: &str) {
        self.client
            .find(fantoccini::Locator::Id(id))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    pub async fn close(self) {
        let _ = self.client.close().await;
    }
}

/// The MQTT broker the tests use: `MQTT_URL`, or the lab's default.
pub fn mqtt_url() -> String {
    std::env::var("MQTT_URL").unwrap_or_else(|_| lab_core::config::DEFAULT_MQTT_URL.to_owned())
}

/// A topic prefix no other test uses.
pub fn unique_topic_prefix() -> String {
    format!("test/{}/", uuid::Uuid::now_v7().simple())
}

/// Fails the test, saying how to start Mosquitto, when `url` does not answer.
pub async fn require_broker(url: &str) {
    let broker = telemetry::Broker::parse(url).unwrap();
    let addr = (broker.host.as_str(), broker.port);
    if let Err(err) = tokio::net::TcpStream::connect(addr).await {
        panic!("{}", broker.describe(&err));
    }
}

/// A Mosquitto of the test's own, run from the lab's config file
/// (`deploy/mosquitto/mosquitto.conf`: logins, ACL, raised queue,
/// persistence) on a free port. For what the shared broker must not see
/// or cannot do: the ACL, more than 1000 queued messages for one client,
/// a broker restart.
pub struct PrivateBroker {
    pub port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl PrivateBroker {
    pub async fn start() -> Self {
        let port = closed_port().await;
        let dir =
            std::env::temp_dir().join(format!("lab-mosquitto-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let mut broker = Self {
            port,
            dir,
            child: None,
        };
        broker.spawn().await;
        broker
    }

    async fn spawn(&mut self) {
        let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/mosquitto")
            .canonicalize()
            .unwrap();
        let config = std::fs::read_to_string(deploy.join("mosquitto.conf")).unwrap();
        assert!(config.contains("listener 1883\n") && config.contains("/mosquitto/config/"));
        let config = config
            .replace(
                "listener 1883\n",
                &format!("listener {} 127.0.0.1\n", self.port),
            )
            .replace("/mosquitto/config/", &format!("{}/", deploy.display()))
            .replace(
                "/mosquitto/data/",
                &format!("{}/", self.dir.join("data").display()),
            );
        let path = self.dir.join("mosquitto.conf");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(self.dir.join("mosquitto.log")).unwrap();
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot start mosquitto ({err}): install it with `apt-get install mosquitto`"
                )
            });
        self.child = Some(child);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!(
            "the private mosquitto did not listen on {} within 5 s; its log:\n{}",
            self.port,
            std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
        );
    }

    /// `mqtt://user:password@127.0.0.1:<port>` for one of the lab's logins.
    pub fn url(&self, user: &str) -> String {
        let password = match user {
            "ingest" => "ingest-secret",
            "device" => "device-secret",
            other => panic!("the lab's broker has no login {other:?}"),
        };
        format!("mqtt://{user}:{password}@127.0.0.1:{}", self.port)
    }

    pub fn anonymous_url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the broker and starts a fresh one on the same port, with
    /// nothing persisted: every session, and every subscription, is gone.
    pub async fn restart_empty(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(self.dir.join("data"));
        std::fs::create_dir_all(self.dir.join("data")).unwrap();
        self.spawn().await;
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The telemetry ingest served in-process on an ephemeral port.
pub struct TelemetryApp {
    pub base: String,
    pub settings: telemetry::Settings,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TelemetryApp {
    /// Test settings: a fresh topic prefix and client id, quick batches.
    pub fn settings() -> telemetry::Settings {
        telemetry::Settings {
            http_addr: "127.0.0.1:0".into(),
            client_id: format!("ingest-{}", uuid::Uuid::now_v7().simple()),
            topic_prefix: unique_topic_prefix(),
            share_group: "ingest".into(),
            qos: 1,
            batch_size: 500,
            batch_interval_ms: 50,
            session_expiry_secs: 600,
            alert_threshold_c: 30.0,
            alert_consecutive: 3,
        }
    }

    pub async fn start(pool: PgPool, settings: telemetry::Settings, mqtt_url: &str) -> Self {
        require_broker(mqtt_url).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let (settings, url, shutdown) =
                (settings.clone(), mqtt_url.to_owned(), shutdown.clone());
            async move { telemetry::serve(listener, pool, &url, settings, shutdown).await }
        });
        let app = Self {
            base,
            settings,
            shutdown,
            task: Some(task),
        };
        app.wait_until_ready().await;
        app
    }

    /// Waits for `/readyz` (Postgres migrated, broker connected).
    pub async fn wait_until_ready(&self) {
        wait_ready(&self.base).await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn topics(&self) -> telemetry::Topics {
        telemetry::Topics::new(&self.settings.topic_prefix)
    }

    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        get_json(&self.url(path)).await
    }

    /// A counter from `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> u64 {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .map_or(0, |v| v.trim().parse().unwrap())
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.take().expect("stopped once").await?
    }
}

impl Drop for TelemetryApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A bare MQTT 3.1.1 client for a test: publish what the test says, and
/// collect what arrives on its subscriptions.
pub struct MqttClient {
    pub client: rumqttc::AsyncClient,
    pub received: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>, bool)>,
    subacks: tokio::sync::mpsc::UnboundedReceiver<()>,
    task: JoinHandle<()>,
}

impl MqttClient {
    /// Connects as `client_id` and waits for the broker's answer.
    pub async fn connect(url: &str, client_id: &str) -> Self {
        let broker = telemetry::Broker::parse(url).unwrap();
        let (client, mut eventloop) = rumqttc::AsyncClient::new(broker.v4_options(client_id), 1000);
        let (tx, received) = tokio::sync::mpsc::unbounded_channel();
        let (suback_tx, subacks) = tokio::sync::mpsc::unbounded_channel();
        let (connected_tx, connected) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut connected_tx = Some(connected_tx);
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        if let Some(tx) = connected_tx.take() {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let topic = p.topic.clone();
                        let _ = tx.send((topic, p.payload.to_vec(), p.retain));
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = suback_tx.send(());
                    }
                    Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(err) => {
                        if let Some(tx) = connected_tx.take() {
                            let _ = tx.send(Err(err.to_string()));
                            return;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        });
        match tokio::time::timeout(std::time::Duration::from_secs(5), connected).await {
            Ok(Ok(Ok(()))) => Self {
                client,
                received,
                subacks,
                task,
            },
            other => panic!(
                "MQTT client {client_id} could not connect to {}: {other:?}",
                broker.place()
            ),
        }
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, qos: rumqttc::QoS) {
        self.client
            .publish(topic, qos, false, payload.into())
            .await
            .unwrap();
    }

    /// Subscribes and waits for the broker's SubAck.
    pub async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), self.subacks.recv())
            .await
            .unwrap_or_else(|_| panic!("no SubAck for {filter} within 5 s"));
    }

    /// The next message, within `limit`.
    pub async fn next(&mut self, limit: std::time::Duration) -> Option<(String, Vec<u8>, bool)> {
        tokio::time::timeout(limit, self.received.recv())
            .await
            .ok()
            .flatten()
    }

    /// Disconnects cleanly, after what was published has gone out.
    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.task).await;
    }
}

/// Polls `probe` every 50 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: std::time::Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
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
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
