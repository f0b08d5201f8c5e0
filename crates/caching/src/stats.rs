//! `GET /stats`: the numbers that make each strategy visible — hits and
//! misses, Postgres reads and writes, what the write-behind buffer holds and
//! how far the flusher lags, and what a Redis crash would do to it — next to
//! what Redis itself reports (keys, evictions). The counters are Prometheus
//! counters, so `/metrics` exports the same numbers.

use axum::extract::State;
use lab_core::Json;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use utoipa::ToSchema;

use crate::{App, durability, views};

pub struct Stats {
    pub hits: Counter,
    pub misses: Counter,
    pub bypasses: Counter,
    pub postgres_reads: Counter,
    pub postgres_writes: Counter,
    pub flushes: Counter,
    pub flushed_views: Counter,
}

impl Stats {
    pub fn new(metrics: &lab_core::metrics::Metrics) -> Self {
        let stats = Self {
            hits: Counter::default(),
            misses: Counter::default(),
            bypasses: Counter::default(),
            postgres_reads: Counter::default(),
            postgres_writes: Counter::default(),
            flushes: Counter::default(),
            flushed_views: Counter::default(),
        };
        let register =
            |name: &str, help: &str, c: &Counter| metrics.register(name, help, c.clone());
        register("cache_hits", "Reads served from Redis", &stats.hits);
        register("cache_misses", "Reads that missed Redis", &stats.misses);
        register(
            "cache_bypasses",
            "Reads served from Postgres because Redis was down",
            &stats.bypasses,
        );
        register(
            "postgres_reads",
            "Rows read from Postgres to serve a request",
            &stats.postgres_reads,
        );
        register(
            "postgres_writes",
            "Writes committed to Postgres by requests",
            &stats.postgres_writes,
        );
        register(
            "flushes",
            "Write-behind batches committed to Postgres",
            &stats.flushes,
        );
        register(
            "flushed_views",
            "Page views moved from Redis to Postgres",
            &stats.flushed_views,
        );
        stats
    }
}

/// `GET /stats`.
#[derive(Serialize, ToSchema)]
pub struct StatsBody {
    pub cache: CacheCounts,
    pub postgres: PostgresCounts,
    pub write_behind: WriteBehind,
    pub redis: RedisReport,
}

/// Reads of profiles and inventory since start.
#[derive(Serialize, ToSchema)]
pub struct CacheCounts {
    pub bypasses: u64,
    pub hits: u64,
    pub misses: u64,
    /// Keys whose invalidation failed, bypassed until Redis deletes them.
    pub stale_keys_waiting: usize,
}

/// Rows read and written by requests since start.
#[derive(Serialize, ToSchema)]
pub struct PostgresCounts {
    pub reads: u64,
    pub writes: u64,
}

/// The write-behind buffer, and how durable its acknowledgements are.
#[derive(Serialize, ToSchema)]
pub struct WriteBehind {
    /// Batches committed to Postgres since start.
    pub flushes: u64,
    /// Views moved to Postgres since start.
    pub flushed_views: u64,
    /// Views acknowledged and still only in Redis (absent while Redis is down).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending: Option<u64>,
    /// Age of the oldest pending view.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_ms: Option<u64>,
    /// Why `pending` is missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Redis's persistence mode: what a Redis crash does to `pending`.
    pub durability: durability::Report,
}

/// What Redis says about itself, or why it could not be asked.
#[derive(Default, Serialize, ToSchema)]
pub struct RedisReport {
    /// Keys in the whole database (every lab and prefix).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys: Option<u64>,
    /// Keys evicted under `maxmemory` since Redis started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evicted_keys: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maxmemory_policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_memory: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the cache has been doing: hits, misses and bypasses, Postgres reads
/// and writes, the write-behind backlog and its durability, and what Redis
/// says about itself.
#[utoipa::path(
    get, path = "/stats",
    responses((status = 200, description = "Counters since start", body = StatsBody))
)]
pub async fn get(State(app): State<App>) -> Json<StatsBody> {
    let s = &app.stats;
    let backlog = views::backlog(&app).await;
    let (pending, lag_ms, error) = match backlog {
        Ok((pending, lag_ms)) => (Some(pending), Some(lag_ms), None),
        Err(err) => (None, None, Some(err.to_string())),
    };
    let redis = redis_report(&app).await;
    let stale_keys_waiting = app.stale.lock().expect("stale set poisoned").len();
    Json(StatsBody {
        cache: CacheCounts {
            bypasses: s.bypasses.get(),
            hits: s.hits.get(),
            misses: s.misses.get(),
            stale_keys_waiting,
        },
        postgres: PostgresCounts {
            reads: s.postgres_reads.get(),
            writes: s.postgres_writes.get(),
        },
        write_behind: WriteBehind {
            flushes: s.flushes.get(),
            flushed_views: s.flushed_views.get(),
            pending,
            lag_ms,
            error,
            durability: app.durability.report(),
        },
        redis,
    })
}

/// What Redis says about itself: every key in the database (all labs and
/// prefixes), evictions since it started, and its eviction policy.
async fn redis_report(app: &App) -> RedisReport {
    let mut conn = app.redis.clone();
    let keys: Result<u64, _> = redis::cmd("DBSIZE").query_async(&mut conn).await;
    let info: Result<String, _> = redis::cmd("INFO")
        .arg("stats")
        .arg("memory")
        .query_async(&mut conn)
        .await;
    match (keys, info) {
        (Ok(keys), Ok(info)) => {
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}:")))
                    .map(|v| v.trim().to_owned())
            };
            RedisReport {
                keys: Some(keys),
                evicted_keys: field("evicted_keys").and_then(|v| v.parse::<u64>().ok()),
                maxmemory_policy: field("maxmemory_policy"),
                used_memory: field("used_memory_human"),
                error: None,
            }
        }
        (Err(err), _) | (_, Err(err)) => RedisReport {
            error: Some(app.redis_error(&err).to_string()),
            ..RedisReport::default()
        },
    }
}
