//! The REST side of the ingest, and the live dashboard.
//!
//! Everything here reads Postgres, not the ingest's memory: with two
//! instances splitting the stream, neither has seen everything, but the
//! table has.

use std::{convert::Infallible, time::Duration};

use axum::{
    Router,
    extract::{Path, State},
    http::{StatusCode, header},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use lab_core::{ApiError, Json, Query, error::DependencyError};
use rumqttc::v5::mqttbytes::QoS;
use serde::{Deserialize, Serialize};

use crate::{App, mqtt::check_device_id, payload::Command};

pub fn routes(app: App) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/dashboard.js", get(dashboard_script))
        .route("/events", get(events))
        .route("/devices", get(devices))
        .route("/devices/{id}/readings", get(readings))
        .route("/devices/{id}/stats", get(stats))
        .route("/devices/{id}/commands", post(send_command))
        .route("/commands/{id}", get(command))
        .route("/alerts", get(alerts))
        .with_state(app)
}

/// Everything the API can answer with besides success, mapped once to the
/// lab's JSON error body.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    NotFound(String),
    /// The command could not be sent (the broker is away, the client busy).
    #[error("{0}")]
    NotSent(String),
    /// Postgres is down (503), or a query failed (500).
    #[error(transparent)]
    Dependency(#[from] DependencyError),
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match err {
            Error::Invalid { field, message } => ApiError::invalid(field, message),
            Error::NotFound(message) => ApiError::not_found(message),
            Error::NotSent(message) => ApiError::unavailable(message),
            Error::Dependency(err) => err.into(),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        ApiError::from(self).into_response()
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> Error {
    Error::Invalid {
        field,
        message: message.into(),
    }
}

impl App {
    fn db_error(&self, err: sqlx::Error) -> Error {
        DependencyError::postgres(&self.pool, &err).into()
    }

    /// 404 unless the device has reported (a status or a reading).
    async fn known_device(&self, id: &str) -> Result<(), Error> {
        check_device_id(id).map_err(|m| invalid("id", m))?;
        let known: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM devices WHERE id = $1)")
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.db_error(e))?;
        if known {
            Ok(())
        } else {
            Err(Error::NotFound(format!("no device {id:?} has reported")))
        }
    }
}

#[derive(Debug, Serialize, sqlx::FromRow)]
struct LastReading {
    seq: i64,
    ts: DateTime<Utc>,
    temperature_c: f64,
    humidity_pct: f64,
    battery_pct: f64,
}

#[derive(Debug, Serialize)]
struct Device {
    id: String,
    online: bool,
    last_seen: Option<DateTime<Utc>>,
    last_reading: Option<LastReading>,
}

type DeviceRow = (
    String,
    bool,
    Option<DateTime<Utc>>,
    Option<i64>,
    Option<DateTime<Utc>>,
    Option<f64>,
    Option<f64>,
    Option<f64>,
);

async fn load_devices(app: &App) -> Result<Vec<Device>, sqlx::Error> {
    let rows: Vec<DeviceRow> = sqlx::query_as(
        "SELECT id, online, last_seen, last_seq, last_ts, last_temperature_c, \
                last_humidity_pct, last_battery_pct FROM devices ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, online, last_seen, seq, ts, t, h, b)| Device {
            id,
            online,
            last_seen,
            last_reading: match (seq, ts, t, h, b) {
                (Some(seq), Some(ts), Some(t), Some(h), Some(b)) => Some(LastReading {
                    seq,
                    ts,
                    temperature_c: t,
                    humidity_pct: h,
                    battery_pct: b,
                }),
                _ => None,
            },
        })
        .collect())
}

/// `GET /devices`: every device that has reported, with its latest reading.
async fn devices(State(app): State<App>) -> Result<Json<Vec<Device>>, Error> {
    Ok(Json(load_devices(&app).await.map_err(|e| app.db_error(e))?))
}

#[derive(Deserialize)]
struct ReadingsParams {
    since: Option<DateTime<Utc>>,
    limit: Option<i64>,
}

/// `GET /devices/{id}/readings?since=&limit=`: oldest first.
async fn readings(
    State(app): State<App>,
    Path(id): Path<String>,
    Query(params): Query<ReadingsParams>,
) -> Result<Json<Vec<LastReading>>, Error> {
    app.known_device(&id).await?;
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(invalid("limit", "must be 1–1000"));
    }
    let rows: Vec<LastReading> = sqlx::query_as(
        "SELECT seq, ts, temperature_c, humidity_pct, battery_pct FROM readings \
         WHERE device_id = $1 AND ts >= coalesce($2, '-infinity') ORDER BY seq LIMIT $3",
    )
    .bind(&id)
    .bind(params.since)
    .bind(limit)
    .fetch_all(&app.pool)
    .await
    .map_err(|e| app.db_error(e))?;
    Ok(Json(rows))
}

#[derive(Deserialize)]
struct StatsParams {
    window_secs: Option<i64>,
}

#[derive(Serialize)]
struct Stats {
    device_id: String,
    window_secs: i64,
    count: i64,
    min_c: Option<f64>,
    max_c: Option<f64>,
    mean_c: Option<f64>,
}

/// `GET /devices/{id}/stats?window_secs=`: temperature over readings taken
/// (by the device's clock) in the last `window_secs`.
async fn stats(
    State(app): State<App>,
    Path(id): Path<String>,
    Query(params): Query<StatsParams>,
) -> Result<Json<Stats>, Error> {
    app.known_device(&id).await?;
    let window_secs = params.window_secs.unwrap_or(300);
    if !(1..=30 * 86_400).contains(&window_secs) {
        return Err(invalid("window_secs", "must be 1–2592000 (30 days)"));
    }
    let (count, min_c, max_c, mean_c): (i64, Option<f64>, Option<f64>, Option<f64>) =
        sqlx::query_as(
            "SELECT count(*), min(temperature_c), max(temperature_c), avg(temperature_c) \
             FROM readings WHERE device_id = $1 AND ts >= now() - make_interval(secs => $2)",
        )
        .bind(&id)
        .bind(window_secs as f64)
        .fetch_one(&app.pool)
        .await
        .map_err(|e| app.db_error(e))?;
    Ok(Json(Stats {
        device_id: id,
        window_secs,
        count,
        min_c,
        max_c,
        mean_c,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewCommand {
    setpoint_c: f64,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
struct CommandView {
    command_id: uuid::Uuid,
    device_id: String,
    setpoint_c: f64,
    status: String,
    created_at: DateTime<Utc>,
    acked_at: Option<DateTime<Utc>>,
}

/// A thermostat takes setpoints from 5 to 35 °C.
const SETPOINT_RANGE: std::ops::RangeInclusive<f64> = 5.0..=35.0;

/// `POST /devices/{id}/commands`: stored, then published (QoS 1) to the
/// device; 202, since the device has not acted on it yet.
async fn send_command(
    State(app): State<App>,
    Path(id): Path<String>,
    Json(body): Json<NewCommand>,
) -> Result<Response, Error> {
    if !SETPOINT_RANGE.contains(&body.setpoint_c) {
        return Err(invalid("setpoint_c", "must be 5–35"));
    }
    app.known_device(&id).await?;
    let command = Command {
        command_id: uuid::Uuid::now_v7(),
        setpoint_c: body.setpoint_c,
    };
    sqlx::query("INSERT INTO commands (id, device_id, setpoint_c) VALUES ($1, $2, $3)")
        .bind(command.command_id)
        .bind(&id)
        .bind(command.setpoint_c)
        .execute(&app.pool)
        .await
        .map_err(|e| app.db_error(e))?;
    // Accepted means on its way: with the broker away it would wait in
    // the client's memory, and be gone with a restart. So 503 instead, and
    // the row stays `pending` (never sent) for the record.
    if !app.mqtt_up() {
        return Err(Error::NotSent(format!(
            "the command was not sent: the broker at {} is not reachable",
            app.broker.place()
        )));
    }
    let payload = serde_json::to_vec(&command).expect("commands serialise");
    app.client
        .try_publish(app.topics.commands(&id), QoS::AtLeastOnce, false, payload)
        .map_err(|err| {
            tracing::warn!(%err, "cannot queue a command");
            Error::NotSent("the command was not sent: the MQTT client is busy; try again".into())
        })?;
    let body = serde_json::json!({"command_id": command.command_id, "status": "pending"});
    Ok((StatusCode::ACCEPTED, axum::Json(body)).into_response())
}

/// `GET /commands/{id}`: pending or acknowledged.
async fn command(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Json<CommandView>, Error> {
    let id: uuid::Uuid = id
        .parse()
        .map_err(|_| invalid("id", "not a command id (a UUID)"))?;
    sqlx::query_as(
        "SELECT id AS command_id, device_id, setpoint_c, status, created_at, acked_at \
         FROM commands WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&app.pool)
    .await
    .map_err(|e| app.db_error(e))?
    .map(Json)
    .ok_or_else(|| Error::NotFound(format!("no command {id}")))
}

#[derive(Debug, Serialize, sqlx::FromRow)]
struct AlertView {
    device_id: String,
    seq: i64,
    temperature_c: f64,
    threshold_c: f64,
    readings: i32,
    ts: DateTime<Utc>,
    created_at: DateTime<Utc>,
}

/// `GET /alerts`: newest first, the last 100.
async fn alerts(State(app): State<App>) -> Result<Json<Vec<AlertView>>, Error> {
    let rows = sqlx::query_as(
        "SELECT device_id, seq, temperature_c, threshold_c, readings, ts, created_at \
         FROM alerts ORDER BY created_at DESC, id DESC LIMIT 100",
    )
    .fetch_all(&app.pool)
    .await
    .map_err(|e| app.db_error(e))?;
    Ok(Json(rows))
}

/// `GET /events`: the device table once a second, as server-sent events,
/// until the client goes or the service stops.
async fn events(State(app): State<App>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let shutdown = app.shutdown.clone();
    let ticks =
        tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(Duration::from_secs(1)));
    let stream = ticks
        .then(move |_| {
            let app = app.clone();
            async move {
                let event = match load_devices(&app).await {
                    Ok(devices) => Event::default()
                        .event("devices")
                        .json_data(devices)
                        .expect("devices serialise"),
                    Err(err) => {
                        tracing::warn!(%err, "dashboard events");
                        Event::default()
                            .event("error")
                            .data("the database is not answering")
                    }
                };
                Ok(event)
            }
        })
        .take_until(shutdown.cancelled_owned());
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn dashboard() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("../static/dashboard.html"),
    )
        .into_response()
}

async fn dashboard_script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../static/dashboard.js"),
    )
        .into_response()
}
