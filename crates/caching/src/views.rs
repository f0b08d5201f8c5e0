//! Write-behind for page views: acknowledge once Redis has the view, move
//! views to Postgres later, in batches.
//!
//! `POST /pages/{page}/views` appends an entry to a Redis Stream and bumps a
//! Redis counter (and the page's count of pending entries) in one script,
//! then answers 202 at once. A flusher reads the stream through a consumer
//! group and commits batches to Postgres. The stream is what makes it safe,
//! where a bare `INCR` would not be:
//!
//! - A flusher that dies after reading a batch, before committing it, leaves
//!   the entries pending in the group; a live flusher claims them
//!   (`XAUTOCLAIM`) once they have been idle for `FLUSH_CLAIM_IDLE_MS`.
//! - A flusher that dies after committing, before acknowledging (`XACK`),
//!   will see the batch again. Each entry id is recorded in Postgres in the
//!   same transaction as the counts, so applying it twice counts it once.
//! - On shutdown the HTTP server stops first, then the flusher drains what
//!   the stream still holds.
//!
//! What none of this helps with: until a view is flushed, Redis holds its
//! only copy, so a 202 is exactly as durable as Redis's persistence mode
//! ([`crate::durability`]). A Redis that restarts without an append-only
//! file loses every view not yet flushed; the stream, its group and the
//! counters start again empty, and the flusher creates the group again.
//!
//! The price of write-behind shows in `GET /pages/{page}/views`: the Redis
//! count is immediate ([`crate::counts`] keeps it right across a restart),
//! `?source=db` lags by up to a flush interval.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::{extract::State, http::StatusCode};
use lab_core::{Json, Path, Query, error::DependencyError, openapi::ErrorBody};
use redis::{
    AsyncCommands, Script,
    streams::{
        StreamAutoClaimOptions, StreamAutoClaimReply, StreamId, StreamReadOptions, StreamReadReply,
    },
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use utoipa::{IntoParams, ToSchema};

use crate::{App, Result, counts, invalid};

const GROUP: &str = "flushers";

fn validate_page(page: &str) -> Result<()> {
    if lab_core::error::is_name(page, 100, b".") {
        Ok(())
    } else {
        Err(invalid(
            "page",
            "must be 1-100 characters of letters, digits, -, _ and .",
        ))
    }
}

pub(crate) fn stream_key(app: &App) -> String {
    app.key("views:stream")
}

pub(crate) fn counter_key(app: &App, page: &str) -> String {
    app.key(&format!("views:count:{page}"))
}

/// A hash of how many entries each page has in the stream, kept in the
/// scripts that add and delete them ([`crate::counts`] reads it).
pub(crate) fn pending_key(app: &App) -> String {
    app.key("views:pending")
}

/// Acknowledges and deletes entries (`ARGV[2..]`: id, page, id, page …) in
/// one go, and takes each one deleted off its page's pending count. An
/// entry acknowledged but left in the stream would count as backlog for
/// ever; one deleted twice (two flushers applied it) is taken off once.
const ACKNOWLEDGE: &str = r"
for i = 2, #ARGV, 2 do
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 and ARGV[i + 1] ~= '' then
    if redis.call('HINCRBY', KEYS[2], ARGV[i + 1], -1) <= 0 then
      redis.call('HDEL', KEYS[2], ARGV[i + 1])
    end
  end
end
return 0
";

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Views {
    pub page: String,
    /// Null only in a 202 whose count Redis had forgotten and Postgres could
    /// not be read to rebuild: the view was taken all the same.
    pub views: Option<i64>,
    /// `redis` (immediate) or `db` (as of the last flush).
    pub source: String,
}

/// `POST /pages/{page}/views`: counted in Redis at once (202), stored in
/// Postgres by the flusher.
#[utoipa::path(
    post, path = "/pages/{page}/views",
    params(("page" = String, Path, description = "1–100 of A-Z a-z 0-9 - _ .")),
    responses(
        (status = 202, description = "Redis has the view: as durable as Redis's persistence mode (`write_behind.durability` in /stats)", body = Views),
        (status = 422, body = ErrorBody),
        (status = 503, description = "Redis is down, or did not answer in time (then the view may still land)", body = ErrorBody),
    )
)]
pub async fn record(
    State(app): State<App>,
    Path(page): Path<String>,
) -> Result<(StatusCode, Json<Views>)> {
    validate_page(&page)?;
    let views = counts::record(&app, &page).await.map_err(|err| {
        DependencyError::redis(&app.redis_place, &err)
            .explain("write-behind needs Redis to accept a view")
    })?;
    let body = Views {
        page,
        views,
        source: "redis".into(),
    };
    Ok((StatusCode::ACCEPTED, Json(body)))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// `redis` (the default: the immediate count) or `db` (as of the last flush).
    source: Option<String>,
}

/// `GET /pages/{page}/views[?source=db]`
#[utoipa::path(
    get, path = "/pages/{page}/views",
    params(("page" = String, Path, description = "1–100 of A-Z a-z 0-9 - _ ."), Source),
    responses(
        (status = 200, body = Views), (status = 422, body = ErrorBody),
        (status = 503, description = "Redis (or, with source=db, Postgres) is down", body = ErrorBody),
    )
)]
pub async fn get(
    State(app): State<App>,
    Path(page): Path<String>,
    Query(params): Query<Source>,
) -> Result<Json<Views>> {
    validate_page(&page)?;
    let views = match params.source.as_deref() {
        None | Some("redis") => {
            return Ok(Json(Views {
                views: Some(counts::get(&app, &page).await?),
                page,
                source: "redis".into(),
            }));
        }
        Some("db") => {
            app.stats.postgres_reads.inc();
            sqlx::query_scalar::<_, i64>("SELECT views FROM page_views WHERE page = $1")
                .bind(&page)
                .fetch_optional(&app.pool)
                .await
                .map_err(|err| app.pg_error(err))?
                .unwrap_or(0)
        }
        Some(other) => return Err(invalid("source", format!("{other:?}: use redis or db"))),
    };
    Ok(Json(Views {
        page,
        views: Some(views),
        source: "db".into(),
    }))
}

/// Entries waiting in the stream, and the age of the oldest one in ms.
pub async fn backlog(app: &App) -> Result<(u64, u64)> {
    let mut conn = app.redis.clone();
    let pending: u64 = conn
        .xlen(stream_key(app))
        .await
        .map_err(|err| app.redis_error(&err))?;
    let lag_ms = oldest_entry_ms(app)
        .await?
        .map_or(0, |ms| now_ms().saturating_sub(ms));
    Ok((pending, lag_ms))
}

/// When the oldest entry still in the stream was added (a stream id is
/// `<ms>-<seq>`), or `None` when the stream is empty.
async fn oldest_entry_ms(app: &App) -> Result<Option<u64>> {
    let mut conn = app.redis.clone();
    let oldest: redis::streams::StreamRangeReply = conn
        .xrange_count(stream_key(app), "-", "+", 1)
        .await
        .map_err(|err| app.redis_error(&err))?;
    Ok(oldest
        .ids
        .first()
        .and_then(|entry| entry.id.split_once('-'))
        .and_then(|(ms, _)| ms.parse::<u64>().ok()))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Moves views from the Redis Stream into Postgres.
pub struct Flusher {
    app: App,
    consumer: String,
}

impl Flusher {
    pub fn new(app: App) -> Self {
        // Each process is its own consumer; a dead one's entries are claimed.
        let consumer = format!("flusher-{}", uuid::Uuid::now_v7().simple());
        Self { app, consumer }
    }

    /// Flushes every interval, or at once while full batches keep coming,
    /// until `stop`; then drains the stream and returns.
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        let interval = Duration::from_millis(self.app.settings.flush_interval_ms);
        let batch = self.app.settings.flush_batch_size;
        let mut group_ready = false;
        loop {
            if stop.is_cancelled() {
                return self.drain().await;
            }
            if !group_ready {
                group_ready = self.create_group().await.is_ok();
            }
            let flushed = if group_ready {
                self.step().await
            } else {
                Ok(0)
            };
            let wait = match flushed {
                Ok(n) if n >= batch => continue,
                Ok(_) => interval,
                Err(err) => {
                    tracing::warn!("write-behind flush failed, will retry: {err}");
                    // A Redis that restarted without persistence has lost the
                    // stream and its group (NOGROUP): create them again.
                    group_ready = false;
                    interval
                }
            };
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Moves what the stream holds, after the HTTP server has stopped. The
    /// group is created first whatever the loop knew: a Redis that restarted
    /// without persistence since the last flush has lost it.
    async fn drain(&self) -> anyhow::Result<()> {
        if self.create_group().await.is_err() {
            tracing::warn!("Redis is down; unflushed views stay in the stream for the next start");
            return Ok(());
        }
        loop {
            match self.step().await {
                Ok(0) => {
                    tracing::info!("write-behind flusher drained");
                    return Ok(());
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(
                        "stopping with views still in the stream (they are kept for the next start): {err}"
                    );
                    return Ok(());
                }
            }
        }
    }

    async fn create_group(&self) -> Result<()> {
        let mut conn = self.app.redis.clone();
        let created: redis::RedisResult<()> = conn
            .xgroup_create_mkstream(stream_key(&self.app), GROUP, "0")
            .await;
        match created {
            Ok(()) => Ok(()),
            Err(err) if err.code() == Some("BUSYGROUP") => Ok(()),
            Err(err) => Err(self.app.redis_error(&err)),
        }
    }

    /// One batch: our own pending entries first (a failed commit), then
    /// entries a dead flusher left, then new ones. Returns how many it applied.
    pub async fn step(&self) -> Result<usize> {
        let app = &self.app;
        let key = stream_key(app);
        let batch = app.settings.flush_batch_size;
        let mut conn = app.redis.clone();
        let mut entries: Vec<StreamId> = Vec::new();

        let ours: StreamReadReply = conn
            .xread_options(
                &[&key],
                &["0"],
                &StreamReadOptions::default()
                    .group(GROUP, &self.consumer)
                    .count(batch),
            )
            .await
            .map_err(|err| app.redis_error(&err))?;
        entries.extend(ours.keys.into_iter().flat_map(|k| k.ids));

        if entries.len() < batch {
            let abandoned: StreamAutoClaimReply = conn
                .xautoclaim_options(
                    &key,
                    GROUP,
                    &self.consumer,
                    app.settings.flush_claim_idle_ms,
                    "0-0",
                    StreamAutoClaimOptions::default().count(batch - entries.len()),
                )
                .await
                .map_err(|err| app.redis_error(&err))?;
            if !abandoned.claimed.is_empty() {
                tracing::info!(
                    entries = abandoned.claimed.len(),
                    "claimed views a dead flusher left behind"
                );
            }
            entries.extend(abandoned.claimed);
        }
        if entries.len() < batch {
            let fresh: StreamReadReply = conn
                .xread_options(
                    &[&key],
                    &[">"],
                    &StreamReadOptions::default()
                        .group(GROUP, &self.consumer)
                        .count(batch - entries.len()),
                )
                .await
                .map_err(|err| app.redis_error(&err))?;
            entries.extend(fresh.keys.into_iter().flat_map(|k| k.ids));
        }
        if entries.is_empty() {
            return Ok(0);
        }
        apply(app, &entries).await?;
        let acknowledge = Script::new(ACKNOWLEDGE);
        let mut invocation = acknowledge.key(&key);
        invocation.key(pending_key(app)).arg(GROUP);
        for entry in &entries {
            let page = entry.get::<String>("page").unwrap_or_default();
            invocation.arg(&entry.id).arg(page);
        }
        let _: i64 = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|err| app.redis_error(&err))?;
        forget_old_entries(app).await?;
        Ok(entries.len())
    }
}

/// Entry ids are remembered only while the entry could still come back: as
/// long as it, or anything older, is still in the stream. Everything applied
/// before the oldest entry left in the stream (a minute of margin for clocks)
/// can go.
async fn forget_old_entries(app: &App) -> Result<()> {
    let horizon_ms = oldest_entry_ms(app).await?.unwrap_or_else(now_ms);
    // Only this stream's: a service with another key prefix on the same
    // database has a stream, and a horizon, of its own.
    sqlx::query(
        "DELETE FROM page_view_entries
         WHERE applied_at < to_timestamp($1::float8 / 1000) - interval '1 minute'
           AND starts_with(entry, $2 || ' ')",
    )
    .bind(horizon_ms as f64)
    .bind(stream_key(app))
    .execute(&app.pool)
    .await
    .map_err(|err| app.pg_error(err))?;
    Ok(())
}

/// Commits a batch of stream entries to Postgres, counting each entry id at
/// most once however often it is applied. Public so tests can play a flusher
/// that commits and then dies before XACK.
pub async fn apply(app: &App, entries: &[StreamId]) -> Result<u64> {
    let key = stream_key(app);
    let mut ids = Vec::with_capacity(entries.len());
    let mut pages = Vec::with_capacity(entries.len());
    for entry in entries {
        match entry.get::<String>("page") {
            Some(page) => {
                ids.push(format!("{key} {}", entry.id));
                pages.push(page);
            }
            None => tracing::warn!(id = %entry.id, "stream entry without a page; skipped"),
        }
    }
    let mut tx = app.pool.begin().await.map_err(|err| app.pg_error(err))?;
    // No batch commits while an immediate count is being rebuilt.
    counts::lock_shared(app, &mut tx).await?;
    // Only entries not seen before survive the ON CONFLICT; count just those.
    let counted: u64 = sqlx::query_scalar(
        "WITH batch AS (
             SELECT DISTINCT * FROM unnest($1::text[], $2::text[]) AS b(entry, page)
         ), fresh AS (
             INSERT INTO page_view_entries (entry)
             SELECT entry FROM batch ORDER BY entry  -- one lock order for every flusher
             ON CONFLICT DO NOTHING
             RETURNING entry
         ), counts AS (
             SELECT b.page, count(*) AS n FROM batch b JOIN fresh f USING (entry) GROUP BY b.page
         ), upserted AS (
             INSERT INTO page_views (page, views)
             SELECT page, n FROM counts ORDER BY page
             ON CONFLICT (page) DO UPDATE
               SET views = page_views.views + EXCLUDED.views, updated_at = now()
             RETURNING 1
         )
         SELECT coalesce(sum(n), 0)::bigint FROM counts",
    )
    .bind(&ids)
    .bind(&pages)
    .fetch_one(&mut *tx)
    .await
    .map(|n: i64| n as u64)
    .map_err(|err| app.pg_error(err))?;
    tx.commit().await.map_err(|err| app.pg_error(err))?;
    app.stats.flushes.inc();
    app.stats.flushed_views.inc_by(counted);
    Ok(counted)
}
