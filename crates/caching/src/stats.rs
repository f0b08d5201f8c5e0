//! `GET /stats`: the numbers that make each strategy visible — hits and
//! misses, Postgres reads and writes, what the write-behind buffer holds and
//! how far the flusher lags — next to what Redis itself reports (keys,
//! evictions). The counters are Prometheus counters, so `/metrics` exports
//! the same numbers.

use axum::extract::State;
use lab_core::Json;
use prometheus_client::metrics::counter::Counter;
use serde_json::{Value, json};

use crate::{App, views};

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

/// What the cache has been doing: hits, misses and bypasses, Postgres reads
/// and writes, the write-behind backlog, and what Redis says about itself.
#[utoipa::path(
    get, path = "/stats",
    responses((status = 200, description = "Counters since start", body = Object))
)]
pub async fn get(State(app): State<App>) -> Json<Value> {
    let s = &app.stats;
    let write_behind = match views::backlog(&app).await {
        Ok((pending, lag_ms)) => json!({
            "flushes": s.flushes.get(),
            "flushed_views": s.flushed_views.get(),
            "pending": pending,
            "lag_ms": lag_ms,
        }),
        Err(err) => json!({
            "flushes": s.flushes.get(),
            "flushed_views": s.flushed_views.get(),
            "error": err.to_string(),
        }),
    };
    Json(json!({
        "cache": {
            "hits": s.hits.get(),
            "misses": s.misses.get(),
            "bypasses": s.bypasses.get(),
            "stale_keys_waiting": app.stale.lock().expect("stale set poisoned").len(),
        },
        "postgres": { "reads": s.postgres_reads.get(), "writes": s.postgres_writes.get() },
        "write_behind": write_behind,
        "redis": redis_report(&app).await,
    }))
}

/// What Redis says about itself: every key in the database (all labs and
/// prefixes), evictions since it started, and its eviction policy.
async fn redis_report(app: &App) -> Value {
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
            json!({
                "keys": keys,
                "evicted_keys": field("evicted_keys").and_then(|v| v.parse::<u64>().ok()),
                "maxmemory_policy": field("maxmemory_policy"),
                "used_memory": field("used_memory_human"),
            })
        }
        (Err(err), _) | (_, Err(err)) => json!({ "error": app.redis_error(&err).to_string() }),
    }
}
