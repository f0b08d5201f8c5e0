//! Write-through for inventory: a read must see the latest acknowledged write.
//!
//! Every write changes Postgres and Redis in the same request, so reads can
//! be served from Redis without going stale. The order matters, and this lab
//! chose: **update the row, update Redis, then commit**, all while holding
//! the row lock.
//!
//! - Redis is written while the row lock is held, so two concurrent writes
//!   reach Redis in the same order as they commit. Writing Redis *after*
//!   commit lets a slower first writer overwrite a faster second one, leaving
//!   Redis older than Postgres.
//! - If Redis fails, the transaction rolls back and the client gets 503:
//!   nothing was written, and a retry is safe. (Commit-then-Redis would have
//!   to answer 503 for a write that did happen.)
//! - If the commit fails after Redis was updated, or the Redis call timed
//!   out (it may have run, or may still arrive, late, on the old
//!   connection), Redis may hold a quantity that was never committed. The
//!   key is **repaired, not deleted**: the row's version is bumped in
//!   Postgres (past any version the failed write drew) and the committed
//!   quantity is written to Redis with it. A late script then carries a
//!   lower version and is refused, whichever arrives first. A delete would
//!   not do: sent on a new connection, it can overtake the old one's
//!   script, which then lands on an empty key and is served as a hit until
//!   the next write. Until the repair is done the sku is in a table
//!   (`inventory_cache_repairs`) as well as in memory, so reads bypass it
//!   and a restarted service repairs it too.
//! - Every cached value carries the row's version, drawn from a sequence, and
//!   Redis only accepts a higher one (a small Lua script), so a read that
//!   loaded an old row cannot overwrite a newer value a write just put there,
//!   and a version seen only by a rolled-back write is never reused.
//! - A concurrent reader may see the new value in Redis a moment before the
//!   commit lands: early, never stale.
//!
//! Reservations take stock atomically in SQL (`quantity >= n` in the UPDATE's
//! WHERE), so concurrent reservations never oversell. While Redis is down,
//! writes answer 503 and reads fall back to Postgres (`X-Cache: bypass`).

use axum::{
    extract::State,
    http::{HeaderName, HeaderValue},
    response::{IntoResponse, Response},
};
use lab_core::{Json, Path, error::DependencyError, openapi::ErrorBody};
use redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};

use utoipa::ToSchema;

use crate::{App, Error, Result, invalid};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Stock {
    pub sku: String,
    pub quantity: i64,
    /// Rises with every write; the cache only ever moves forward.
    pub version: i64,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetQuantity {
    #[schema(minimum = 0)]
    quantity: i64,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Reserve {
    #[schema(minimum = 1)]
    quantity: i64,
}

/// Sets KEYS[1] to "version:quantity" for ARGV[3] milliseconds unless it
/// already holds a version at least as new. Returns 1 when it wrote. The
/// TTL is the last bound on a wrong copy: one that nothing recorded for
/// repair (Postgres was down when the write failed, and the process
/// restarted before it came back) is gone within it.
const SET_IF_NEWER: &str = r"
local current = redis.call('GET', KEYS[1])
if current then
  local version = tonumber(string.match(current, '^(%d+):'))
  if version and version >= tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[2], 'PX', ARGV[3])
return 1
";

fn validate_sku(sku: &str) -> Result<()> {
    let ok = !sku.is_empty()
        && sku.len() <= 64
        && sku
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid("sku", "must be 1-64 characters of A-Z, 0-9 and -"))
    }
}

fn key(app: &App, sku: &str) -> String {
    app.key(&format!("stock:{sku}"))
}

async fn cache_set(app: &App, stock: &Stock) -> redis::RedisResult<()> {
    let mut conn = app.redis.clone();
    Script::new(SET_IF_NEWER)
        .key(key(app, &stock.sku))
        .arg(stock.version)
        .arg(stock.quantity)
        .arg(crate::jittered_ttl_ms(app.settings.ttl_secs))
        .invoke_async::<i64>(&mut conn)
        .await
        .map(|_| ())
}

/// `PUT /inventory/{sku}`: set the quantity (creating the record if new).
#[utoipa::path(
    put, path = "/inventory/{sku}", request_body = SetQuantity,
    params(("sku" = String, Path, description = "1–64 of A-Z, 0-9, -")),
    responses(
        (status = 200, body = Stock), (status = 400, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 422, body = ErrorBody),
        (status = 503, description = "Postgres or Redis is down; nothing was written", body = ErrorBody),
    )
)]
pub async fn set(
    State(app): State<App>,
    Path(sku): Path<String>,
    Json(body): Json<SetQuantity>,
) -> Result<Json<Stock>> {
    validate_sku(&sku)?;
    if body.quantity < 0 {
        return Err(invalid("quantity", "must be 0 or more"));
    }
    let mut tx = app.pool.begin().await.map_err(|err| app.pg_error(err))?;
    let (quantity, version): (i64, i64) = sqlx::query_as(
        "INSERT INTO inventory (sku, quantity) VALUES ($1, $2)
         ON CONFLICT (sku) DO UPDATE
           SET quantity = EXCLUDED.quantity, version = nextval('inventory_version_seq'), updated_at = now()
         RETURNING quantity, version",
    )
    .bind(&sku)
    .bind(body.quantity)
    .fetch_one(&mut *tx)
    .await
    .map_err(|err| app.pg_error(err))?;
    let stock = Stock {
        sku,
        quantity,
        version,
    };
    write_through(&app, tx, &stock).await?;
    Ok(Json(stock))
}

/// `POST /inventory/{sku}/reserve`: take stock, or 409 when there is not enough.
#[utoipa::path(
    post, path = "/inventory/{sku}/reserve", request_body = Reserve,
    params(("sku" = String, Path, description = "1–64 of A-Z, 0-9, -")),
    responses(
        (status = 200, body = Stock), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 422, body = ErrorBody),
        (status = 503, description = "Postgres or Redis is down; nothing was written", body = ErrorBody),
    )
)]
pub async fn reserve(
    State(app): State<App>,
    Path(sku): Path<String>,
    Json(body): Json<Reserve>,
) -> Result<Json<Stock>> {
    validate_sku(&sku)?;
    if body.quantity <= 0 {
        return Err(invalid("quantity", "must be 1 or more"));
    }
    let mut tx = app.pool.begin().await.map_err(|err| app.pg_error(err))?;
    let taken: Option<(i64, i64)> = sqlx::query_as(
        "UPDATE inventory SET quantity = quantity - $2, version = nextval('inventory_version_seq'), updated_at = now()
         WHERE sku = $1 AND quantity >= $2
         RETURNING quantity, version",
    )
    .bind(&sku)
    .bind(body.quantity)
    .fetch_optional(&mut *tx)
    .await
    .map_err(|err| app.pg_error(err))?;
    let Some((quantity, version)) = taken else {
        let available: Option<i64> =
            sqlx::query_scalar("SELECT quantity FROM inventory WHERE sku = $1")
                .bind(&sku)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|err| app.pg_error(err))?;
        return Err(match available {
            None => Error::NotFound(format!("no stock record for sku {sku}")),
            Some(left) => Error::Conflict(format!(
                "not enough stock for {sku}: {left} left, {} asked",
                body.quantity
            )),
        });
    };
    let stock = Stock {
        sku,
        quantity,
        version,
    };
    write_through(&app, tx, &stock).await?;
    Ok(Json(stock))
}

/// Redis first (inside the transaction, under the row lock), then commit.
async fn write_through(
    app: &App,
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    stock: &Stock,
) -> Result<()> {
    if let Err(err) = cache_set(app, stock).await {
        // Dropping `tx` rolls it back: Postgres keeps the old value. The
        // script may still have run, or arrive later (a timeout, not a
        // refusal), so Redis may hold a value that was never committed.
        drop(tx);
        suspect(app, &stock.sku).await;
        let failure = DependencyError::redis(&app.redis_place, &err);
        return Err(failure
            .explain("write-through needs Redis and nothing was written")
            .into());
    }
    if let Err(err) = tx.commit().await {
        // Redis now holds a value Postgres never committed.
        suspect(app, &stock.sku).await;
        return Err(app.pg_error(err));
    }
    app.stats.postgres_writes.inc();
    Ok(())
}

/// Keeps reads off `sku` until [`repair`] has run: in memory at once, and in
/// Postgres when it answers (the repair loop records it later otherwise).
async fn suspect(app: &App, sku: &str) {
    app.mark_stale(key(app, sku));
    let recorded =
        sqlx::query("INSERT INTO inventory_cache_repairs (sku) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(sku)
            .execute(&app.pool)
            .await;
    if let Err(err) = recorded {
        tracing::warn!(%err, sku, "cannot record an inventory key to repair; repairing from memory");
    }
}

/// The skus recorded for repair (by this process or one before it).
pub(crate) async fn recorded_repairs(app: &App) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar("SELECT sku FROM inventory_cache_repairs")
        .fetch_all(&app.pool)
        .await
}

/// Makes Redis's copy of `sku` the committed one, for good: bumps the row's
/// version past any a failed write drew, and writes the committed quantity
/// with it (or, for a sku with no row, a tombstone that reads treat as a
/// miss). Then forgets the sku. Any error leaves it for the next round.
pub(crate) async fn repair(app: &App, sku: &str) -> anyhow::Result<()> {
    let mut tx = app.pool.begin().await?;
    sqlx::query("INSERT INTO inventory_cache_repairs (sku) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(sku)
        .execute(&mut *tx)
        .await?;
    let bumped: Option<(i64, i64)> = sqlx::query_as(
        "UPDATE inventory SET version = nextval('inventory_version_seq') WHERE sku = $1
         RETURNING quantity, version",
    )
    .bind(sku)
    .fetch_optional(&mut *tx)
    .await?;
    let (quantity, version) = match bumped {
        Some((quantity, version)) => (quantity.to_string(), version),
        None => {
            let version: i64 = sqlx::query_scalar("SELECT nextval('inventory_version_seq')")
                .fetch_one(&mut *tx)
                .await?;
            (TOMBSTONE.to_owned(), version)
        }
    };
    // Under the row lock, as every write-through: a concurrent write waits.
    let mut conn = app.redis.clone();
    Script::new(SET_IF_NEWER)
        .key(key(app, sku))
        .arg(version)
        .arg(quantity)
        .arg(crate::jittered_ttl_ms(app.settings.ttl_secs))
        .invoke_async::<i64>(&mut conn)
        .await?;
    sqlx::query("DELETE FROM inventory_cache_repairs WHERE sku = $1")
        .bind(sku)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// What a repaired key holds when its sku has no row: a version, no quantity.
const TOMBSTONE: &str = "-";

/// `GET /inventory/{sku}`: from Redis; on a miss from Postgres, filling Redis.
#[utoipa::path(
    get, path = "/inventory/{sku}",
    params(("sku" = String, Path, description = "1–64 of A-Z, 0-9, -")),
    responses(
        (status = 200, body = Stock), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody),
        (status = 503, description = "Postgres is down", body = ErrorBody),
    )
)]
pub async fn get(State(app): State<App>, Path(sku): Path<String>) -> Result<Response> {
    validate_sku(&sku)?;
    let repairs_known = app.repairs_known.load(std::sync::atomic::Ordering::SeqCst);
    if !repairs_known || app.is_stale(&key(&app, &sku)) {
        app.stats.bypasses.inc();
        let stock = load(&app, &sku, false).await?;
        return Ok(respond(&sku, stock, "bypass"));
    }
    let mut conn = app.redis.clone();
    let (stock, outcome) = match conn.get::<_, Option<String>>(key(&app, &sku)).await {
        Ok(Some(cached)) => match parse(&sku, &cached) {
            Some(stock) => {
                app.stats.hits.inc();
                (Some(stock), "hit")
            }
            None => (load(&app, &sku, true).await?, "miss"),
        },
        Ok(None) => {
            app.stats.misses.inc();
            (load(&app, &sku, true).await?, "miss")
        }
        Err(_) => {
            // Postgres is the source of truth; reading it directly is correct.
            app.stats.bypasses.inc();
            (load(&app, &sku, false).await?, "bypass")
        }
    };
    Ok(respond(&sku, stock, outcome))
}

fn respond(sku: &str, stock: Option<Stock>, outcome: &'static str) -> Response {
    let header = (
        HeaderName::from_static("x-cache"),
        HeaderValue::from_static(outcome),
    );
    let body = match stock {
        Some(stock) => Json(stock).into_response(),
        None => Error::NotFound(format!("no stock record for sku {sku}")).into_response(),
    };
    ([header], body).into_response()
}

fn parse(sku: &str, cached: &str) -> Option<Stock> {
    let (version, quantity) = cached.split_once(':')?;
    Some(Stock {
        sku: sku.to_owned(),
        quantity: quantity.parse().ok()?,
        version: version.parse().ok()?,
    })
}

async fn load(app: &App, sku: &str, fill: bool) -> Result<Option<Stock>> {
    app.stats.postgres_reads.inc();
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT quantity, version FROM inventory WHERE sku = $1")
            .bind(sku)
            .fetch_optional(&app.pool)
            .await
            .map_err(|err| app.pg_error(err))?;
    let stock = row.map(|(quantity, version)| Stock {
        sku: sku.to_owned(),
        quantity,
        version,
    });
    if let (Some(stock), true) = (&stock, fill) {
        // Versioned: if a write got there first, its newer value stays.
        if let Err(err) = cache_set(app, stock).await {
            tracing::debug!(%err, "could not fill the cache");
        }
    }
    Ok(stock)
}
