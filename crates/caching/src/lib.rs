//! # Caching: three strategies, each on the data it suits
//!
//! - **Cache-aside** for user profiles ([`profiles`]): read-heavy, a short
//!   staleness is fine. Reads fill the cache, writes delete from it.
//! - **Write-through** for inventory ([`inventory`]): a read must see the
//!   latest write, so every write updates Postgres and Redis together.
//! - **Write-behind** for page views ([`views`]): write-heavy, so a view is
//!   acknowledged once Redis has it and a flusher moves views to Postgres in
//!   batches. An acknowledged view is then exactly as durable as Redis's
//!   persistence mode ([`durability`]); the immediate count is rebuilt from
//!   Postgres plus what is pending when Redis forgets it ([`counts`]).
//!
//! Each strategy also shows how it fails: a cache stampede when protection is
//! off, eviction under `maxmemory`, what each one does while Redis is down,
//! and what write-behind loses when Redis restarts. `GET /stats` shows the
//! counters that make this visible.
//!
//! Try it: `cargo run -p lab -- up --only caching`, then the curl lines in
//! docs/labs/caching.md.

pub mod counts;
pub mod durability;
pub mod inventory;
pub mod profiles;
pub mod stats;
pub mod views;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    routing::{get, post},
};
pub use lab_core::config::Switch;
use lab_core::redis::Redis;
use lab_core::{ApiError, config::Listen, error::DependencyError, metrics::Metrics};
use redis::AsyncCommands;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The caching lab's own settings; the database and Redis URLs are shared
/// with other labs and live in [`lab_core::config`].
#[derive(clap::Args, Debug, Clone)]
pub struct Settings {
    /// HTTP listen address.
    #[arg(
        id = "caching_http_addr",
        value_name = "ADDR",
        long = "caching-http-addr",
        env = "CACHING_HTTP_ADDR",
        default_value = "0.0.0.0:8081"
    )]
    pub http_addr: String,
    /// How long a cache-aside entry lives; each key gets ±10% random jitter.
    #[arg(long = "cache-ttl-secs", env = "CACHE_TTL_SECS", default_value_t = 60)]
    pub ttl_secs: u64,
    /// Prepended to every Redis key, so several labs or tests share one Redis.
    #[arg(
        long = "cache-key-prefix",
        env = "CACHE_KEY_PREFIX",
        default_value = "lab:caching:"
    )]
    pub key_prefix: String,
    /// Single-flight on cache misses: `off` lets every miss hit Postgres.
    #[arg(long = "cache-stampede-protection", env = "CACHE_STAMPEDE_PROTECTION", value_enum, default_value_t = Switch::On)]
    pub stampede_protection: Switch,
    /// The write-behind flusher runs at least this often.
    #[arg(
        long = "flush-interval-ms",
        env = "FLUSH_INTERVAL_MS",
        default_value_t = 1000
    )]
    pub flush_interval_ms: u64,
    /// At most this many views per flush; a full batch is flushed at once.
    #[arg(
        long = "flush-batch-size",
        env = "FLUSH_BATCH_SIZE",
        default_value_t = 500
    )]
    pub flush_batch_size: usize,
    /// A stream entry read but not acknowledged for this long belongs to a
    /// flusher that died; a live flusher claims and applies it.
    #[arg(
        long = "flush-claim-idle-ms",
        env = "FLUSH_CLAIM_IDLE_MS",
        default_value_t = 10_000
    )]
    pub flush_claim_idle_ms: u64,
    /// How often keys whose invalidation failed are retried while Redis is away.
    #[arg(
        long = "cache-invalidation-retry-ms",
        env = "CACHE_INVALIDATION_RETRY_MS",
        default_value_t = 200
    )]
    pub invalidation_retry_ms: u64,
}

impl Settings {
    /// The settings as the environment and the defaults give them; callers
    /// change what they need with struct update syntax.
    pub fn from_env() -> anyhow::Result<Self> {
        lab_core::config::from_env()
    }

    pub fn http(&self) -> Listen {
        Listen::http("caching", &self.http_addr, "CACHING_HTTP_ADDR")
    }

    /// Every address the caching lab listens on.
    pub fn listeners(&self) -> Vec<Listen> {
        vec![self.http()]
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub redis_url: String,
    pub settings: Settings,
}

/// Everything that can go wrong, mapped once to HTTP in `From<Error> for ApiError`.
/// `Clone` because one Postgres read may answer many waiting requests.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// Redis or Postgres is down (503), or a command failed (500).
    #[error(transparent)]
    Dependency(#[from] DependencyError),
    /// A bug of the lab's own (a load task that panicked).
    #[error("internal error")]
    Internal,
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match err {
            Error::Invalid { field, message } => ApiError::invalid(field, message),
            Error::NotFound(m) => ApiError::not_found(m),
            Error::Conflict(m) => ApiError::conflict(m),
            Error::Dependency(err) => err.into(),
            Error::Internal => ApiError::internal(),
        }
    }
}

impl axum::response::IntoResponse for Error {
    fn into_response(self) -> axum::response::Response {
        ApiError::from(self).into_response()
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Error {
    Error::Invalid {
        field,
        message: message.into(),
    }
}

/// Shared state of one caching service.
#[derive(Clone)]
pub struct App {
    pub(crate) pool: PgPool,
    pub(crate) redis: Redis,
    pub(crate) redis_place: Arc<str>,
    pub(crate) settings: Arc<Settings>,
    pub(crate) stats: Arc<stats::Stats>,
    /// Loads in flight, by profile id, each with its generation number.
    pub(crate) flights: Arc<Mutex<HashMap<uuid::Uuid, (u64, profiles::Flight)>>>,
    /// Cache-aside keys whose invalidation failed while Redis was down.
    pub(crate) stale: Arc<Mutex<HashSet<String>>>,
    /// Whether this process has read the inventory keys recorded for repair
    /// (by it or a process before it). Until then no inventory read trusts
    /// Redis: any key might be one of them.
    pub(crate) repairs_known: Arc<AtomicBool>,
    /// Redis's persistence mode, and whether Redis restarted.
    pub(crate) durability: Arc<durability::Durability>,
}

impl App {
    pub fn new(
        pool: PgPool,
        redis: Redis,
        redis_url: &str,
        settings: Settings,
        metrics: &Metrics,
    ) -> Self {
        Self {
            pool,
            redis,
            redis_place: lab_core::redis::where_is(redis_url).into(),
            settings: Arc::new(settings),
            stats: Arc::new(stats::Stats::new(metrics)),
            flights: Arc::default(),
            stale: Arc::default(),
            repairs_known: Arc::default(),
            durability: Arc::default(),
        }
    }

    /// Remembers a key whose Redis copy may be wrong (its invalidation
    /// failed); reads bypass it until `profiles::retry_invalidations` deletes it.
    pub(crate) fn mark_stale(&self, key: String) {
        self.stale.lock().expect("stale set poisoned").insert(key);
    }

    fn forget_stale(&self, keys: &[String]) {
        let mut stale = self.stale.lock().expect("stale set poisoned");
        for key in keys {
            stale.remove(key);
        }
    }

    pub(crate) fn is_stale(&self, key: &str) -> bool {
        self.stale.lock().expect("stale set poisoned").contains(key)
    }

    pub(crate) fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.settings.key_prefix)
    }

    pub(crate) fn redis_error(&self, err: &redis::RedisError) -> Error {
        DependencyError::redis(&self.redis_place, err).into()
    }

    pub(crate) fn pg_error(&self, err: sqlx::Error) -> Error {
        DependencyError::postgres(&self.pool, &err).into()
    }
}

/// The caching lab's HTTP API, as served at `GET /openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "System Design Lab: caching",
        description = "Cache-aside profiles, write-through inventory and write-behind page views, on Redis in front of Postgres."
    ),
    paths(
        profiles::create,
        profiles::get,
        profiles::update,
        profiles::delete,
        inventory::get,
        inventory::set,
        inventory::reserve,
        views::record,
        views::get,
        stats::get
    ),
    components(schemas(lab_core::openapi::ErrorBody, lab_core::openapi::ErrorDetail))
)]
pub struct ApiDoc;

pub fn routes(app: App) -> Router {
    use utoipa::OpenApi;
    let routes = Router::new()
        .route("/profiles", post(profiles::create))
        .route(
            "/profiles/{id}",
            get(profiles::get)
                .put(profiles::update)
                .delete(profiles::delete),
        )
        .route("/inventory/{sku}", get(inventory::get).put(inventory::set))
        .route("/inventory/{sku}/reserve", post(inventory::reserve))
        .route("/pages/{page}/views", get(views::get).post(views::record))
        .route("/stats", get(stats::get))
        .with_state(app);
    lab_core::openapi::with_docs(routes, ApiDoc::openapi())
}

/// Runs the caching lab until `shutdown` fires; the write-behind flusher
/// drains what Redis holds before `run` returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = lab_core::postgres::connect(&config.database_url, shutdown.clone())?;
    let redis = lab_core::redis::connect(&config.redis_url)?;
    let listener = config.settings.http().bind().await?;
    tracing::info!(http = %listener.local_addr()?, "caching listening");
    serve(
        listener,
        pool,
        redis,
        config.redis_url,
        config.settings,
        shutdown,
    )
    .await
}

/// Serves on a listener the caller bound (tests bind port 0).
pub async fn serve(
    listener: TcpListener,
    pool: PgPool,
    redis: Redis,
    redis_url: String,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Metrics::new("caching");
    let app = App::new(pool.clone(), redis.clone(), &redis_url, settings, &metrics);
    let durable = app.durability.clone();
    let dependencies = vec![
        lab_core::postgres::dependency(pool),
        // Ready either way, but warned while Redis forgets what write-behind
        // acknowledged.
        lab_core::redis::dependency(redis, &redis_url).with_warning(move || durable.warning()),
    ];
    let router = lab_core::http::service_router(routes(app.clone()), dependencies, metrics);

    // The flusher stops only after the HTTP server has stopped accepting
    // views, so its final drain sees every view that was acknowledged.
    let flush_stop = CancellationToken::new();
    let http = {
        let (shutdown, flush_stop) = (shutdown.clone(), flush_stop.clone());
        async move {
            let result = lab_core::http::serve(listener, router, shutdown).await;
            flush_stop.cancel();
            Ok(result?)
        }
    };
    let flusher = views::Flusher::new(app.clone()).run(flush_stop);
    // Before the first request: a key a previous process left to repair is
    // bypassed from the start (the loop finds it too, if Postgres is late).
    remember_recorded_repairs(&app).await;
    // Likewise Redis's persistence mode, for the first /stats and /readyz.
    let _ = tokio::time::timeout(Duration::from_secs(2), durability::check(&app)).await;
    let watcher = durability::watch(app.clone(), shutdown.clone());
    let invalidator = retry_invalidations(app, shutdown.clone());
    lab_core::shutdown::supervise(
        &shutdown,
        vec![
            ("HTTP server", Box::pin(http)),
            ("write-behind flusher", Box::pin(flusher)),
            ("invalidator", Box::pin(invalidator)),
            ("durability watcher", Box::pin(watcher)),
        ],
    )
    .await?;
    tracing::info!("caching stopped");
    Ok(())
}

/// The TTL in milliseconds, with ±10% random jitter: keys written together
/// (after a deploy, a bulk import) would otherwise expire together, a
/// stampede of their own. Milliseconds, not seconds: rounded to whole
/// seconds, a 5 s TTL would get no jitter at all, and a 60 s one 13 values.
pub(crate) fn jittered_ttl_ms(ttl_secs: u64) -> u64 {
    use rand::Rng;
    let ttl_ms = ttl_secs.saturating_mul(1000) as f64;
    let spread = ttl_ms * 0.1;
    let ttl = ttl_ms + rand::rng().random_range(-spread..=spread);
    (ttl.round() as u64).max(1)
}

/// Puts right the keys whose Redis copy may be wrong, as soon as Redis
/// answers: deletes the profiles whose invalidation failed, and repairs the
/// inventory keys a failed write-through may have left uncommitted (see
/// [`inventory`]), including those a previous process recorded.
pub async fn retry_invalidations(app: App, shutdown: CancellationToken) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(Duration::from_millis(app.settings.invalidation_retry_ms)) => {}
        }
        remember_recorded_repairs(&app).await;
        let keys: Vec<String> = app
            .stale
            .lock()
            .expect("stale set poisoned")
            .iter()
            .cloned()
            .collect();
        if keys.is_empty() {
            continue;
        }
        let stock_prefix = app.key("stock:");
        let (stock, profiles): (Vec<String>, Vec<String>) = keys
            .into_iter()
            .partition(|key| key.starts_with(&stock_prefix));
        for key in stock {
            let sku = &key[stock_prefix.len()..];
            match inventory::repair(&app, sku).await {
                Ok(()) => app.forget_stale(std::slice::from_ref(&key)),
                Err(err) => tracing::debug!(%err, sku, "inventory key not repaired yet"),
            }
        }
        let mut conn = app.redis.clone();
        if !profiles.is_empty() && conn.del::<_, ()>(&profiles).await.is_ok() {
            app.forget_stale(&profiles);
            tracing::info!(
                keys = profiles.len(),
                "stale cache keys deleted after Redis came back"
            );
        }
    }
}

/// Marks stale the inventory keys recorded for repair in Postgres, so a
/// restarted service keeps reads off them too.
async fn remember_recorded_repairs(app: &App) {
    if let Ok(skus) = inventory::recorded_repairs(app).await {
        for sku in skus {
            app.mark_stale(app.key(&format!("stock:{sku}")));
        }
        app.repairs_known.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::jittered_ttl_ms;

    #[test]
    fn the_openapi_document_describes_stats_and_its_durability() {
        use utoipa::OpenApi;
        let doc = serde_json::to_value(super::ApiDoc::openapi()).unwrap();
        let schemas = &doc["components"]["schemas"];
        let durability = &schemas["Durability"]["properties"];
        assert!(durability["mode"].is_object(), "{durability}");
        assert!(
            schemas["PersistenceMode"]["enum"]
                .as_array()
                .is_some_and(|modes| {
                    ["none", "snapshots", "everysec", "always"]
                        .iter()
                        .all(|m| modes.contains(&(*m).into()))
                })
        );
        let stats = &schemas["WriteBehind"]["properties"];
        assert!(stats["durability"].is_object(), "{stats}");
    }

    #[test]
    fn ttl_jitter_spreads_over_ten_percent_to_the_millisecond() {
        let ttls: Vec<u64> = (0..1000).map(|_| jittered_ttl_ms(5)).collect();
        assert!(
            ttls.iter().all(|ttl| (4500..=5500).contains(ttl)),
            "{ttls:?}"
        );
        let (min, max) = (ttls.iter().min().unwrap(), ttls.iter().max().unwrap());
        assert!(max - min > 900, "from {min} to {max} ms");
        assert_eq!(jittered_ttl_ms(0), 1, "never zero: SET PX 0 is an error");
    }
}
