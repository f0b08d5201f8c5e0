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
//! or the last second `everysec` can lose, brings back a counter that
//! disagrees with Postgres just the same (measured: 20 against 50, and 25
//! against 55 five views later, for good).
//!
//! So the record script bumps only a counter that exists; a missing one is
//! rebuilt from the truth. And counters are trusted only under the run of
//! Redis that built them: Redis keeps, next to them, the `run_id` they were
//! built under, and when the service finds Redis's `run_id` is another (a
//! restart, or a failover, whether it saw it happen or started after it) it
//! forgets every counter (`forget_if_built_elsewhere`, every second from
//! [`crate::durability`], and before the first request), so a counter
//! brought back wrong is served for a second at most. A counter may be set
//! only while that mark names the run the rebuild began under, so a rebuild
//! that straddles a restart leaves none behind. Rejected: remembering the
//! `run_id` in the process, as this module first did: a service started
//! after the restart has nothing to compare with, and kept the snapshot's
//! counters.
//!
//! The rebuild races the flusher: an entry seen in the stream may be
//! committed to Postgres a moment later (counted twice), or committed and
//! deleted from the stream before the count looks (counted not at all). So
//! the rebuild reads Postgres in one statement, its count and which of the
//! page's entries the rebuild saw in the stream it has applied, and sets the
//! counter, under an exclusive advisory lock that each flush's transaction
//! takes shared: meanwhile no batch commits, and the script that sets the
//! counter adds the page's entries after the last one the rebuild read. An
//! entry committed before the lock is either still in the stream (seen, and
//! found applied) or deleted after its commit (in Postgres's count).
//!
//! Which entries of the stream are the page's? Walking the stream to find
//! out reads every view waiting, of every page, and a page nobody viewed
//! has no counter either, so any client could make the service walk it by
//! asking for new names. It did, under the lock: with 200,000 views waiting
//! (`FLUSH_INTERVAL_MS=3600000`, debug build) a GET of a new page took
//! about a second, and ten at once answered one after another, 1.1 to
//! 10.9 s, with no flush meanwhile. So Redis keeps, in the same scripts that
//! add entries to the stream and delete them from it, how many entries each
//! page has there (`views:pending`). A page with none (a new page, a page
//! whose views are all flushed) costs one Postgres read and the lock held
//! for it, and so does a page whose only entry is the view being recorded:
//! the same GET now takes 8 to 26 ms, ten at once 43 to 168 ms. Only a page
//! with views waiting and no counter (after a Redis restart) walks the
//! stream (2.4 s for those 200,000), before it takes the lock, so flushes
//! and other pages go on meanwhile; under the lock it reads only what
//! arrived during the walk. `a_new_page_costs_no_walk_through_the_backlog`
//! counts it: 20 new pages over 10,000 waiting views, 240 `XRANGE` calls
//! before, 40 now. The pending counts are right only if every entry went in
//! through `record`: a stream left unflushed by a version of the service
//! older than them (the shutdown drain empties it) is counted short until
//! it is flushed.
//!
//! Rejected: rebuilding from Postgres alone (the views still pending would
//! never be counted: the flusher does not touch the counter), resetting
//! every counter to Postgres plus pending after each flush (a view recorded
//! between the read and the reset would vanish from the count), and
//! trusting the pending counts without the walk after a restart (a snapshot
//! brings back entries Postgres has applied since, which only a look at
//! each one finds).

use redis::{AsyncCommands, Script, streams::StreamRangeReply};

use crate::{
    App, Result,
    views::{counter_key, pending_key, stream_key},
};

/// Appends a view to the stream, counts it among the page's pending
/// entries, and bumps its counter if the counter exists. Returns the
/// counter (-1 when it does not exist: rebuild it), the entry's id, and the
/// page's entries now in the stream.
const RECORD: &str = r"
local id = redis.call('XADD', KEYS[1], '*', 'page', ARGV[1])
local pending = redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
local count = -1
if redis.call('EXISTS', KEYS[2]) == 1 then count = redis.call('INCR', KEYS[2]) end
return {count, id, pending}
";

/// The page's entries in the stream, and the id of the stream's last entry
/// ('' when it is empty).
const LOOK: &str = r"
local pending = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
return {pending, last and last[1] or ''}
";

/// Sets a missing counter to `ARGV[3]` (the count up to stream id
/// `ARGV[2]`) plus the page's entries after that id, if the counters are
/// still those of the Redis run `ARGV[4]`; returns the count either way.
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
if n > 0 and redis.call('GET', KEYS[3]) == ARGV[4] then redis.call('SET', KEYS[2], n) end
return n
";

/// The lock a rebuild takes exclusive and each flush takes shared, one per
/// stream (transaction-level: a pooled connection never keeps it).
const LOCK_EXCLUSIVE: &str =
    "SELECT pg_advisory_xact_lock(hashtext('caching.views'), hashtext($1))";
const LOCK_SHARED: &str =
    "SELECT pg_advisory_xact_lock_shared(hashtext('caching.views'), hashtext($1))";

/// Where the `run_id` of the Redis run the counters were built under is kept.
fn built_under_key(app: &App) -> String {
    app.key("views:counts-built-under")
}

/// What a rebuild knows of the stream before it takes the lock: the page's
/// entries (as `page_view_entries` names them) up to `last`, the id of the
/// last entry it read (`None`: it read none).
struct Seen {
    mine: Vec<String>,
    last: Option<String>,
}

/// Records a view: appends it to the stream and returns the page's count,
/// or `None` when the count had to be rebuilt and Postgres could not be
/// read (the view is taken either way). A Redis error means it was not.
pub(crate) async fn record(app: &App, page: &str) -> redis::RedisResult<Option<i64>> {
    let mut conn = app.redis.clone();
    let (count, id, pending): (i64, String, i64) = Script::new(RECORD)
        .key(stream_key(app))
        .key(counter_key(app, page))
        .key(pending_key(app))
        .arg(page)
        .invoke_async(&mut conn)
        .await?;
    if count >= 0 {
        return Ok(Some(count));
    }
    // The page's only entry in the stream is this one: nothing to look for.
    let seen = (pending == 1).then(|| Seen {
        mine: vec![format!("{} {id}", stream_key(app))],
        last: Some(id),
    });
    match rebuild(app, page, seen).await {
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
        None => rebuild(app, page, None).await,
    }
}

/// Counts the page's views from the truth and sets its counter, unless
/// another request did first.
async fn rebuild(app: &App, page: &str, seen: Option<Seen>) -> Result<i64> {
    // The run first: a restart from here on leaves the counter unset.
    let run_id = app.durability.run_id();
    let (stream, counter) = (stream_key(app), counter_key(app, page));
    let seen = match seen {
        Some(seen) => seen,
        None => look(app, page).await?,
    };
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
    // What arrived while we looked, without the lock (a moment's worth).
    let Seen { mut mine, last } = seen;
    let tail = entries_after(app, page, last).await?;
    mine.extend(tail.mine);
    app.stats.postgres_reads.inc();
    let base: i64 = sqlx::query_scalar(
        "SELECT coalesce((SELECT views FROM page_views WHERE page = $1), 0)
              + (SELECT count(*) FROM unnest($2::text[]) AS w(entry)
                 WHERE NOT EXISTS (SELECT 1 FROM page_view_entries e WHERE e.entry = w.entry))",
    )
    .bind(page)
    .bind(&mine)
    .fetch_one(&mut *tx)
    .await
    .map_err(|err| app.pg_error(err))?;
    let count: i64 = Script::new(SET_MISSING)
        .key(&stream)
        .key(&counter)
        .key(built_under_key(app))
        .arg(page)
        .arg(tail.last.unwrap_or_default())
        .arg(base)
        // A run_id is 40 hex digits: before Redis first answered, no match.
        .arg(run_id.as_deref().unwrap_or("not known"))
        .invoke_async(&mut conn)
        .await
        .map_err(|err| app.redis_error(&err))?;
    tx.commit().await.map_err(|err| app.pg_error(err))?;
    tracing::debug!(
        page,
        count,
        "immediate count rebuilt from Postgres plus pending"
    );
    Ok(count)
}

/// The page's entries in the stream and the last id, without the lock:
/// a walk through the stream only if the page has entries there.
async fn look(app: &App, page: &str) -> Result<Seen> {
    let mut conn = app.redis.clone();
    let (pending, last): (i64, String) = Script::new(LOOK)
        .key(stream_key(app))
        .key(pending_key(app))
        .arg(page)
        .invoke_async(&mut conn)
        .await
        .map_err(|err| app.redis_error(&err))?;
    if pending > 0 {
        return entries_after(app, page, None).await;
    }
    Ok(Seen {
        mine: Vec::new(),
        last: (!last.is_empty()).then_some(last),
    })
}

/// The page's entries in the stream after id `after` (from the start when
/// `None`), as `page_view_entries` names them, and the last id read (of
/// any page; `after` when there was nothing to read).
async fn entries_after(app: &App, page: &str, after: Option<String>) -> Result<Seen> {
    let stream = stream_key(app);
    let mut conn = app.redis.clone();
    let (mut mine, mut last) = (Vec::new(), after);
    loop {
        let start = last.as_ref().map_or("-".to_owned(), |id| format!("({id}"));
        let reply: StreamRangeReply = conn
            .xrange_count(&stream, start, "+", 1000)
            .await
            .map_err(|err| app.redis_error(&err))?;
        if let Some(tail) = reply.ids.last() {
            last = Some(tail.id.clone());
        }
        for entry in &reply.ids {
            if entry.get::<String>("page").as_deref() == Some(page) {
                mine.push(format!("{stream} {}", entry.id));
            }
        }
        if reply.ids.len() < 1000 {
            return Ok(Seen { mine, last }); // the end, for now
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

/// Forgets every immediate count unless they were built under Redis's
/// current run (`run_id`); each is rebuilt on its next use. Returns how many
/// were forgotten, `None` when they were kept. The mark is cleared first, so
/// no rebuild sets a counter while the old ones go, and set last, so a
/// failure halfway is tried again.
pub(crate) async fn forget_if_built_elsewhere(
    app: &App,
    run_id: &str,
) -> redis::RedisResult<Option<usize>> {
    let mut conn = app.redis.clone();
    let mark = built_under_key(app);
    let built_under: Option<String> = conn.get(&mark).await?;
    if built_under.as_deref() == Some(run_id) {
        return Ok(None);
    }
    let () = conn.del(&mark).await?;
    let forgotten = forget_all(app).await?;
    let () = conn.set(&mark, run_id).await?;
    Ok(Some(forgotten))
}

/// Deletes every immediate count. Returns how many there were.
async fn forget_all(app: &App) -> redis::RedisResult<usize> {
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
