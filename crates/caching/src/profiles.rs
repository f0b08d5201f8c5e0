//! Cache-aside for user profiles.
//!
//! Read: look in Redis; on a miss load the row from Postgres and put it in
//! Redis with a TTL. Write: update Postgres, then delete the key, so the next
//! read loads the new row. The application owns the cache logic; Redis is
//! only a fast, forgetful copy. Every read says what happened in `X-Cache`:
//! `hit`, `miss`, or `bypass` (served from Postgres because Redis is down).
//!
//! Two failure modes shown here:
//! - **Stampede**: when a popular key expires, every request that misses at
//!   that moment goes to Postgres. With protection on, misses on the same key
//!   share one load (single-flight, within this process); with
//!   `CACHE_STAMPEDE_PROTECTION=off` each miss reads Postgres itself.
//! - **Redis down**: reads fall back to Postgres and writes still succeed. A
//!   write whose key could not be deleted would leave a stale copy in Redis
//!   for when it returns, so the key is remembered as stale: reads bypass it
//!   and a background task deletes it as soon as Redis answers. (The set lives
//!   in memory; if the process dies meanwhile, the TTL bounds the staleness.)
//!
//! A known race, left in on purpose because it is cache-aside's: a read that
//! misses, loads the old row, and writes it to Redis *after* a concurrent
//! write deleted the key, caches the old row until the TTL ends. The TTL is
//! what bounds staleness in cache-aside; keep it short for data that changes.

use axum::{
    extract::State,
    http::{HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use std::sync::atomic::{AtomicU64, Ordering};

use futures::{FutureExt, future::Shared};
use lab_core::{Json, Path, Query, openapi::ErrorBody};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use utoipa::{IntoParams, ToSchema};

use crate::{App, Error, Result, Switch, invalid, jittered_ttl_ms};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
pub struct Profile {
    pub id: Uuid,
    pub name: String,
    pub email: String,
    pub bio: String,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfileInput {
    /// 1–100 characters, not all blank.
    #[schema(min_length = 1, max_length = 100)]
    pub name: String,
    /// Looks like name@example.com; at most 254 bytes.
    #[schema(min_length = 3, max_length = 254)]
    pub email: String,
    /// At most 1000 characters.
    #[serde(default)]
    #[schema(max_length = 1000)]
    pub bio: String,
}

impl ProfileInput {
    fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("name", &self.name),
            ("email", &self.email),
            ("bio", &self.bio),
        ] {
            if value.contains('\0') {
                return Err(invalid(field, "must not contain NUL characters"));
            }
        }
        let name = self.name.chars().count();
        if name == 0 || name > 100 || self.name.trim().is_empty() {
            return Err(invalid("name", "must be 1-100 characters, not all blank"));
        }
        let at = self.email.find('@');
        if self.email.len() > 254 || !matches!(at, Some(i) if i > 0 && i + 1 < self.email.len()) {
            return Err(invalid("email", "must look like name@example.com"));
        }
        if self.bio.chars().count() > 1000 {
            return Err(invalid("bio", "must be at most 1000 characters"));
        }
        Ok(())
    }
}

/// Where a read was served from, for the `X-Cache` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Bypass,
}

impl Outcome {
    fn header(self) -> (HeaderName, HeaderValue) {
        let value = match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Bypass => "bypass",
        };
        (
            HeaderName::from_static("x-cache"),
            HeaderValue::from_static(value),
        )
    }
}

/// One Postgres load shared by every request that missed the same key.
pub type Flight = Shared<futures::future::BoxFuture<'static, Result<Option<Profile>>>>;

fn parse_id(id: &str) -> Result<Uuid> {
    Uuid::parse_str(id).map_err(|_| invalid("id", format!("{id:?} is not a UUID")))
}

fn cache_key(app: &App, id: Uuid) -> String {
    app.key(&format!("profile:{id}"))
}

/// Create a profile (Postgres only; the cache fills on the first read).
#[utoipa::path(
    post, path = "/profiles", request_body = ProfileInput,
    responses(
        (status = 201, description = "Created; `Location` names it", body = Profile),
        (status = 400, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 503, description = "Postgres is down", body = ErrorBody),
    )
)]
pub async fn create(
    State(app): State<App>,
    Json(input): Json<ProfileInput>,
) -> Result<impl IntoResponse> {
    input.validate()?;
    let profile: Profile = sqlx::query_as(
        "INSERT INTO profiles (id, name, email, bio) VALUES ($1, $2, $3, $4)
         RETURNING id, name, email, bio, updated_at",
    )
    .bind(Uuid::now_v7())
    .bind(&input.name)
    .bind(&input.email)
    .bind(&input.bio)
    .fetch_one(&app.pool)
    .await
    .map_err(|err| app.pg_error(err))?;
    app.stats.postgres_writes.inc();
    let location = format!("/profiles/{}", profile.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(profile),
    ))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ReadParams {
    /// `skip` reads Postgres directly (the benchmark's baseline).
    cache: Option<String>,
}

/// Read a profile, cache-aside; `X-Cache` says hit, miss or bypass.
#[utoipa::path(
    get, path = "/profiles/{id}",
    params(("id" = String, Path, description = "Profile id (UUID)"), ReadParams),
    responses(
        (status = 200, body = Profile), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody),
        (status = 503, description = "Postgres is down", body = ErrorBody),
    )
)]
pub async fn get(
    State(app): State<App>,
    Path(id): Path<String>,
    Query(params): Query<ReadParams>,
) -> Result<Response> {
    let id = parse_id(&id)?;
    let (profile, outcome) = match params.cache.as_deref() {
        None => read(&app, id).await?,
        Some("skip") => {
            app.stats.bypasses.inc();
            (load(&app, id).await?, Outcome::Bypass)
        }
        Some(other) => {
            return Err(invalid(
                "cache",
                format!("{other:?}: the only value is skip"),
            ));
        }
    };
    let body = match profile {
        Some(profile) => Json(profile).into_response(),
        None => Error::NotFound(format!("no profile with id {id}")).into_response(),
    };
    Ok(([outcome.header()], body).into_response())
}

/// The cache-aside read.
pub async fn read(app: &App, id: Uuid) -> Result<(Option<Profile>, Outcome)> {
    let key = cache_key(app, id);
    if app.is_stale(&key) {
        app.stats.bypasses.inc();
        return Ok((load(app, id).await?, Outcome::Bypass));
    }
    let mut conn = app.redis.clone();
    match conn.get::<_, Option<String>>(&key).await {
        Ok(Some(json)) => match serde_json::from_str(&json) {
            Ok(profile) => {
                app.stats.hits.inc();
                return Ok((Some(profile), Outcome::Hit));
            }
            Err(err) => tracing::warn!(%key, %err, "unreadable cache entry; reloading"),
        },
        Ok(None) => {}
        Err(err) => {
            // Redis down: serve from Postgres, do not fail the read.
            tracing::debug!(%err, "redis unavailable; bypassing the cache");
            app.stats.bypasses.inc();
            return Ok((load(app, id).await?, Outcome::Bypass));
        }
    }
    app.stats.misses.inc();
    let profile = match app.settings.stampede_protection {
        Switch::On => single_flight(app, id, key).await?,
        Switch::Off => load_and_fill(app, id, &key).await?,
    };
    Ok((profile, Outcome::Miss))
}

/// Joins the load already in flight for this id, or starts one. The load
/// runs in its own task, so it finishes (and fills the cache) even if every
/// waiting client gives up.
async fn single_flight(app: &App, id: Uuid, key: String) -> Result<Option<Profile>> {
    let flight = {
        let mut flights = app.flights.lock().expect("flights poisoned");
        if let Some((_, flight)) = flights.get(&id) {
            flight.clone()
        } else {
            let generation = NEXT_FLIGHT.fetch_add(1, Ordering::Relaxed);
            let app = app.clone();
            let task = tokio::spawn(async move {
                // Leaves the map however the task ends, panics included.
                let _landed = Landed {
                    app: app.clone(),
                    id,
                    generation,
                };
                // Our GET missed, but a flight that just ended may have
                // filled the key since: look again before going to Postgres.
                let mut conn = app.redis.clone();
                let cached = conn.get::<_, Option<String>>(&key).await.ok().flatten();
                if let Some(profile) = cached.and_then(|json| serde_json::from_str(&json).ok()) {
                    return Ok(Some(profile));
                }
                let profile = load(&app, id).await?;
                // A write that landed while we read invalidated this flight:
                // our row may be older than it, so do not cache it.
                if is_current(&app, id, generation) {
                    fill(&app, &key, profile.as_ref()).await;
                }
                Ok(profile)
            });
            let flight = async move { task.await.unwrap_or(Err(Error::Internal)) }
                .boxed()
                .shared();
            flights.insert(id, (generation, flight.clone()));
            flight
        }
    };
    flight.await
}

/// Numbers the flights, so a finished or invalidated one never removes or
/// outlives its successor.
static NEXT_FLIGHT: AtomicU64 = AtomicU64::new(0);

struct Landed {
    app: App,
    id: Uuid,
    generation: u64,
}

impl Drop for Landed {
    fn drop(&mut self) {
        let mut flights = self.app.flights.lock().expect("flights poisoned");
        if flights
            .get(&self.id)
            .is_some_and(|(g, _)| *g == self.generation)
        {
            flights.remove(&self.id);
        }
    }
}

fn is_current(app: &App, id: Uuid, generation: u64) -> bool {
    let flights = app.flights.lock().expect("flights poisoned");
    flights.get(&id).is_some_and(|(g, _)| *g == generation)
}

async fn load_and_fill(app: &App, id: Uuid, key: &str) -> Result<Option<Profile>> {
    let profile = load(app, id).await?;
    fill(app, key, profile.as_ref()).await;
    Ok(profile)
}

/// Filling the cache is best effort: the reader has its row either way.
async fn fill(app: &App, key: &str, profile: Option<&Profile>) {
    let Some(profile) = profile else { return };
    let json = serde_json::to_string(profile).expect("a profile serialises");
    let ttl_ms = jittered_ttl_ms(app.settings.ttl_secs);
    let mut conn = app.redis.clone();
    if let Err(err) = conn.pset_ex::<_, _, ()>(key, json, ttl_ms).await {
        tracing::debug!(%err, "could not fill the cache");
    }
}

async fn load(app: &App, id: Uuid) -> Result<Option<Profile>> {
    app.stats.postgres_reads.inc();
    sqlx::query_as("SELECT id, name, email, bio, updated_at FROM profiles WHERE id = $1")
        .bind(id)
        .fetch_optional(&app.pool)
        .await
        .map_err(|err| app.pg_error(err))
}

/// Replace a profile, then delete its cache entry.
#[utoipa::path(
    put, path = "/profiles/{id}", request_body = ProfileInput,
    params(("id" = String, Path, description = "Profile id (UUID)")),
    responses(
        (status = 200, body = Profile), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 503, description = "Postgres is down", body = ErrorBody),
    )
)]
pub async fn update(
    State(app): State<App>,
    Path(id): Path<String>,
    Json(input): Json<ProfileInput>,
) -> Result<Json<Profile>> {
    let id = parse_id(&id)?;
    input.validate()?;
    let profile: Profile = sqlx::query_as(
        "UPDATE profiles SET name = $2, email = $3, bio = $4, updated_at = now() WHERE id = $1
         RETURNING id, name, email, bio, updated_at",
    )
    .bind(id)
    .bind(&input.name)
    .bind(&input.email)
    .bind(&input.bio)
    .fetch_optional(&app.pool)
    .await
    .map_err(|err| app.pg_error(err))?
    .ok_or_else(|| Error::NotFound(format!("no profile with id {id}")))?;
    app.stats.postgres_writes.inc();
    invalidate(&app, id).await;
    Ok(Json(profile))
}

/// Delete a profile, then its cache entry.
#[utoipa::path(
    delete, path = "/profiles/{id}",
    params(("id" = String, Path, description = "Profile id (UUID)")),
    responses(
        (status = 204, description = "Deleted"), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody),
        (status = 503, description = "Postgres is down", body = ErrorBody),
    )
)]
pub async fn delete(State(app): State<App>, Path(id): Path<String>) -> Result<StatusCode> {
    let id = parse_id(&id)?;
    let done = sqlx::query("DELETE FROM profiles WHERE id = $1")
        .bind(id)
        .execute(&app.pool)
        .await
        .map_err(|err| app.pg_error(err))?;
    if done.rows_affected() == 0 {
        return Err(Error::NotFound(format!("no profile with id {id}")));
    }
    app.stats.postgres_writes.inc();
    invalidate(&app, id).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes the key after a write, and detaches any load in flight for it
/// (it may have read the row before the write), so the next miss loads anew.
/// The write is committed already, so a Redis failure here must not fail the
/// request: the key is remembered as stale instead, and reads bypass it until
/// it is gone.
async fn invalidate(app: &App, id: Uuid) {
    app.flights.lock().expect("flights poisoned").remove(&id);
    let key = cache_key(app, id);
    let mut conn = app.redis.clone();
    if let Err(err) = conn.del::<_, ()>(&key).await {
        tracing::warn!(%key, %err, "could not invalidate; serving around it until Redis is back");
        app.mark_stale(key);
    }
}
