//! What the ingest refuses, kept for people to read, for a while.
//!
//! A device is not trusted, and neither is its topic: the device id in
//! `devices/{id}/…` is checked as the API checks one in a path (1–64
//! letters, digits, `-`, `_`). Taken as it came, any device login could
//! create devices without limit, and one id of 3,000 random characters
//! wedged the ingest: Postgres refuses a B-tree entry over ~2,700 bytes, so
//! the batch holding it failed, was retried, and failed again, forever,
//! with every later reading queued behind it. A refused message becomes a
//! row here with the reason, and the loop carries on.
//!
//! The table is for people, so each row is cut to 4 KiB, and rows older
//! than `TELEMETRY_REJECTS_RETENTION_SECS` (7 days) are deleted by every
//! ingest instance, at start and then every tenth of the retention (at most
//! hourly): a fleet sending garbage fills it at its own rate, and a table
//! that only grows is an outage on a timer. Rejected: a cap on the row
//! count, which a burst of garbage would spend on itself, pushing out the
//! rows that explain last week's problem; and deleting in the batch's
//! transaction, which would put a scan of the table in every write.
//!
//! People read them with `GET /rejects`: newest first, a page at a time
//! (`limit`, at most 1,000; `before`, the last `id` of the page read), so
//! a table a noisy fleet has filled is never sent whole. The next page is
//! found by id, not by an offset: rows keep arriving at the top, and an
//! offset counted from there would show some rows twice and skip none the
//! wiser; `id < before` reads from the same place whatever arrived since.

use std::time::Duration;

use axum::extract::State;
use chrono::{DateTime, Utc};
use lab_core::{Json, Query, openapi::ErrorBody};
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use utoipa::{IntoParams, ToSchema};

use crate::{
    App,
    api::{Error, invalid},
};

/// A message the ingest could not use, and why.
#[derive(Debug, Clone)]
pub(crate) struct Reject {
    pub topic: String,
    pub payload: String,
    pub reason: String,
}

impl Reject {
    pub fn new(topic: &[u8], payload: &[u8], reason: &str) -> Self {
        Self {
            topic: printable(topic),
            payload: printable(payload),
            reason: printable(reason.as_bytes()),
        }
    }
}

/// Kept readable and bounded (a reject table is for people), and without
/// NUL, which Postgres refuses in text: one such payload would otherwise
/// fail its batch on every redelivery, and stop the ingest.
fn printable(bytes: &[u8]) -> String {
    let mut text = String::from_utf8_lossy(bytes).replace('\0', "\u{FFFD}");
    if text.len() > 4096 {
        let cut = (0..=4096)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(cut);
    }
    text
}

/// Writes `rejects` in the batch's transaction.
pub(crate) async fn insert(
    tx: &mut Transaction<'_, Postgres>,
    rejects: &[Reject],
) -> Result<(), sqlx::Error> {
    if rejects.is_empty() {
        return Ok(());
    }
    let column = |f: fn(&Reject) -> &String| rejects.iter().map(f).collect::<Vec<_>>();
    sqlx::query(
        "INSERT INTO rejects (topic, payload, reason) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[])",
    )
    .bind(column(|r| &r.topic))
    .bind(column(|r| &r.payload))
    .bind(column(|r| &r.reason))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A payload the ingest refused, and why.
#[derive(Debug, Serialize, sqlx::FromRow, ToSchema)]
pub(crate) struct RejectView {
    /// Rises with each reject: pass the last one read as `before` for the
    /// next page.
    id: i64,
    topic: String,
    /// As it came (cut to 4 KiB, NUL replaced).
    payload: String,
    reason: String,
    received_at: DateTime<Utc>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct RejectsParams {
    /// 1–1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// Only rejects older than this one (its `id`): the next page.
    before: Option<i64>,
}

/// What the ingest refused, newest first, a page at a time; kept for
/// `TELEMETRY_REJECTS_RETENTION_SECS` (7 days).
#[utoipa::path(
    get, path = "/rejects",
    params(RejectsParams),
    responses(
        (status = 200, body = Vec<RejectView>),
        (status = 422, description = "A bad limit or before", body = ErrorBody),
        (status = 503, description = "Postgres is down", body = ErrorBody),
    )
)]
pub(crate) async fn list(
    State(app): State<App>,
    Query(params): Query<RejectsParams>,
) -> Result<Json<Vec<RejectView>>, Error> {
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(invalid("limit", "must be 1–1000"));
    }
    let rows = sqlx::query_as(
        "SELECT id, topic, payload, reason, received_at FROM rejects \
         WHERE id < coalesce($1, 9223372036854775807) ORDER BY id DESC LIMIT $2",
    )
    .bind(params.before)
    .bind(limit)
    .fetch_all(&app.pool)
    .await
    .map_err(|e| app.db_error(e))?;
    Ok(Json(rows))
}

/// How often the retention is applied: a tenth of it, from 1 s to an hour.
fn prune_every(retention_secs: u64) -> Duration {
    Duration::from_secs((retention_secs / 10).clamp(1, 3600))
}

/// Deletes rejects past their retention until `stop`; a failure (Postgres
/// down) is logged and tried again at the next turn.
pub(crate) async fn run_pruner(app: App, stop: CancellationToken) -> anyhow::Result<()> {
    let retention = app.settings.rejects_retention_secs;
    let mut ticks = tokio::time::interval(prune_every(retention));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => return Ok(()),
        }
        let deleted = sqlx::query(
            "DELETE FROM rejects WHERE received_at < now() - make_interval(secs => $1)",
        )
        .bind(retention as f64)
        .execute(&app.pool)
        .await;
        match deleted {
            Ok(done) if done.rows_affected() > 0 => {
                tracing::info!(deleted = done.rows_affected(), "old rejects deleted");
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(%err, "cannot delete old rejects; trying again later"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_are_cut_to_4_kib_without_nul() {
        let r = Reject::new(b"t\0", &[b'x'; 10_000], "why");
        assert_eq!(r.topic, "t\u{FFFD}");
        assert_eq!(r.payload.len(), 4096);
        // A cut never splits a character.
        let long = "é".repeat(3000);
        assert!(printable(long.as_bytes()).len() <= 4096);
    }

    #[test]
    fn the_retention_is_applied_every_tenth_of_it() {
        assert_eq!(prune_every(7 * 86_400), Duration::from_secs(3600));
        assert_eq!(prune_every(600), Duration::from_secs(60));
        assert_eq!(prune_every(1), Duration::from_secs(1));
    }
}
