//! The immediate count of a page's views, and how it comes back when Redis
//! forgets it.
//!
//! Each view bumps a Redis counter in the same script that appends it to
//! the write-behind stream, so `GET /pages/{page}/views` answers from
//! memory. The counter is a copy: the truth is Postgres plus the entries
//! still waiting in the stream. A Redis restart without persistence loses
//! the counter; a bare `INCR` then starts it again from zero, and it stays
//! short by everything flushed before, for good (measured before this
//! module: 1,042 against 1,521 in Postgres after a 6 s restart). A snapshot,
//! or the last second `everysec` can lose, leaves a counter that disagrees
//! with Postgres just the same.
//!
//! So the record script bumps only a counter that exists; a missing one is
//! rebuilt from the truth, and every counter is forgotten when the service
//! sees Redis restart ([`crate::durability`]).
//!
//! The rebuild races the flusher: an entry seen in the stream may be
//! committed to Postgres a moment later (counted twice), or committed and
//! deleted from the stream before the count looks (counted not at all). So
//! the rebuild holds an exclusive advisory lock that each flush's
//! transaction takes shared: while it counts, no batch commits. Under the
//! lock it adds Postgres's count, the stream's entries (up to the last id
//! it read) that Postgres has not applied, and, in the script that sets the
//! counter, the entries added after that id.
//!
//! A page nobody has viewed has no counter either, so each read of it takes
//! this path too: one Postgres read, and a moment in which no batch commits.
//!
//! Rejected: rebuilding from Postgres alone (the views still pending would
//! never be counted: the flusher does not touch the counter), and resetting
//! every counter to Postgres plus pending after each flush (a view recorded
//! between the read and the reset would vanish from the count).

use redis::{AsyncCommands, Script, streams::StreamRangeReply};

use crate::{
    App, Result,
    views::{counter_key, stream_key},
};

/// Appends a view to the stream and bumps its counter if the counter
/// exists; -1 when it does not (Redis forgot it: rebuild it).
const RECORD: &str = r"
redis.call('XADD', KEYS[1], '*', 'page', ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  return redis.call('INCR', KEYS[2])
end
return -1
";

/// Sets a missing counter to `ARGV[3]` (the count up to stream id
/// `ARGV[2]`) plus the page's entries after that id; returns the counter.
const SET_MISSING: &str = r"
local current = redis.call('GET', KEYS[2])
if current then return tonumber(current) end
local n = tonumber(ARGV[3])
local start = '-'
if ARGV[2] ~= '' then start = '(' .. ARGV[2] end
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], start, '+')) do
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'page' and fields[i + 1] == ARGV[1] then n = n + 1 end
  end
end
if n > 0 then redis.call('SET', KEYS[2], n) end
return n
";

/// The lock a rebuild takes exclusive and each flush takes shared, one per
/// stream (transaction-level: a pooled connection never keeps it).
const LOCK_EXCLUSIVE: &str =
    "SELECT pg_advisory_xact_lock(hashtext('caching.views'), hashtext($1))";
const LOCK_SHARED: &str =
    "SELECT pg_advisory_xact_lock_shared(hashtext('caching.views'), hashtext($1))";

/// Records a view: appends it to the stream and returns the page's count,
/// or `None` when the count had to be rebuilt and Postgres could not be
/// read (the view is taken either way). A Redis error means it was not.
pub(crate) async fn record(app: &App, page: &str) -> redis::RedisResult<Option<i64>> {
    let mut conn = app.redis.clone();
    let count: i64 = Script::new(RECORD)
        .key(stream_key(app))
        .key(counter_key(app, page))
        .arg(page)
        .invoke_async(&mut conn)
        .await?;
    if count >= 0 {
        return Ok(Some(count));
    }
    match rebuild(app, page).await {
        Ok(count) => Ok(Some(count)),
        Err(err) => {
            tracing::warn!(page, %err, "view taken; its count could not be rebuilt");
            Ok(None)
        }
    }
}

/// The page's immediate count, rebuilt first if Redis forgot it.
pub(crate) async fn get(app: &App, page: &str) -> Result<i64> {
    let mut conn = app.redis.clone();
    let count: Option<i64> = conn
        .get(counter_key(app, page))
        .await
        .map_err(|err| app.redis_error(&err))?;
    match count {
        Some(count) => Ok(count),
        None => rebuild(app, page).await,
    }
}

/// Counts the page's views from the truth and sets its counter, unless
/// another request did first.
async fn rebuild(app: &App, page: &str) -> Result<i64> {
    let (stream, counter) = (stream_key(app), counter_key(app, page));
    let mut tx = app.pool.begin().await.map_err(|err| app.pg_error(err))?;
    sqlx::query(LOCK_EXCLUSIVE)
        .bind(&stream)
        .execute(&mut *tx)
        .await
        .map_err(|err| app.pg_error(err))?;
    let mut conn = app.redis.clone();
    let rebuilt: Option<i64> = conn
        .get(&counter)
        .await
        .map_err(|err| app.redis_error(&err))?;
    if let Some(count) = rebuilt {
        return Ok(count); // by the request we waited for
    }
    let (waiting, last_id) = waiting_entries(app, page).await?;
    app.stats.postgres_reads.inc();
    let base: i64 = sqlx::query_scalar(
        "SELECT coalesce((SELECT views FROM page_views WHERE page = $1), 0)
              + (SELECT count(*) FROM unnest($2::text[]) AS w(entry)
                 WHERE NOT EXISTS (SELECT 1 FROM page_view_entries e WHERE e.entry = w.entry))",
    )
    .bind(page)
    .bind(&waiting)
    .fetch_one(&mut *tx)
    .await
    .map_err(|err| app.pg_error(err))?;
    let count: i64 = Script::new(SET_MISSING)
        .key(&stream)
        .key(&counter)
        .arg(page)
        .arg(last_id.unwrap_or_default())
        .arg(base)
        .invoke_async(&mut conn)
        .await
        .map_err(|err| app.redis_error(&err))?;
    tx.commit().await.map_err(|err| app.pg_error(err))?;
    tracing::info!(
        page,
        count,
        "immediate count rebuilt from Postgres plus pending"
    );
    Ok(count)
}

/// The page's entries in the stream, as `page_view_entries` names them,
/// and the last id read (of any page).
async fn waiting_entries(app: &App, page: &str) -> Result<(Vec<String>, Option<String>)> {
    let stream = stream_key(app);
    let mut conn = app.redis.clone();
    let (mut mine, mut last): (Vec<String>, Option<String>) = (Vec::new(), None);
    loop {
        let start = last.as_ref().map_or("-".to_owned(), |id| format!("({id}"));
        let reply: StreamRangeReply = conn
            .xrange_count(&stream, start, "+", 1000)
            .await
            .map_err(|err| app.redis_error(&err))?;
        let Some(tail) = reply.ids.last() else {
            return Ok((mine, last));
        };
        last = Some(tail.id.clone());
        for entry in &reply.ids {
            if entry.get::<String>("page").as_deref() == Some(page) {
                mine.push(format!("{stream} {}", entry.id));
            }
        }
    }
}

/// Takes the flushers' side of the rebuild lock inside a flush's
/// transaction.
pub(crate) async fn lock_shared(
    app: &App,
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
) -> Result<()> {
    sqlx::query(LOCK_SHARED)
        .bind(stream_key(app))
        .execute(&mut **tx)
        .await
        .map_err(|err| app.pg_error(err))?;
    Ok(())
}

/// Deletes every immediate count, after Redis restarted: each is rebuilt on
/// its next use. Returns how many there were.
pub(crate) async fn forget_all(app: &App) -> redis::RedisResult<usize> {
    let mut conn = app.redis.clone();
    let pattern = format!("{}*", counter_key(app, ""));
    let mut keys: Vec<String> = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    if !keys.is_empty() {
        let () = conn.del(&keys).await?;
    }
    Ok(keys.len())
}
