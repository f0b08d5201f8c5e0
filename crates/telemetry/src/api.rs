//! The REST side of the ingest, and the live dashboard.
//!
//! Everything here reads Postgres, not the ingest's memory: with two
//! instances splitting the stream, neither has seen everything, but the
//! table has. (`GET /ingest` is the exception: it says what *this* instance
//! holds and shed.) The OpenAPI document is generated from these handlers
//! (`GET /openapi.json`, browsable at `/docs/`), with the limits the
//! handlers enforce written into its schemas; `GET /events`, a stream that
//! never ends, is left out of it, so a fuzzer does not wait on it forever.

use std::{convert::Infallible, time::Duration};

use axum::{
    Router,
    extract::State,
    http::header,
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use lab_core::{
    ApiError, Json, Path, Query,
    error::DependencyError,
    openapi::{ErrorBody, ErrorDetail},
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::{App, commands, mqtt::check_device_id, rejects};

/// The telemetry API, as served at `GET /openapi.json`.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "System Design Lab: telemetry",
        description = "What the MQTT ingest stored in Postgres: devices, readings, stats, alerts, rejects; commands back to a device; this instance's inbox. `GET /events` (server-sent events: `devices` and `ingest` once a second) and the dashboard at `GET /` are not described here."
    ),
    paths(
        devices,
        readings,
        stats,
        commands::send,
        commands::get,
        alerts,
        rejects::list,
        ingest
    ),
    components(schemas(ErrorBody, ErrorDetail))
)]
pub struct ApiDoc;

pub fn routes(app: App) -> Router {
    let routes = Router::new()
        .route("/", get(dashboard))
        .route("/dashboard.js", get(dashboard_script))
        .route("/events", get(events))
        .route("/devices", get(devices))
        .route("/devices/{id}/readings", get(readings))
        .route("/devices/{id}/stats", get(stats))
        .route("/devices/{id}/commands", post(commands::send))
        .route("/commands/{id}", get(commands::get))
        .route("/alerts", get(alerts))
        .route("/rejects", get(rejects::list))
        .route("/ingest", get(ingest))
        .with_state(app);
    lab_core::openapi::with_docs(routes, ApiDoc::openapi())
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

/// The `{id}` of a device's paths, for the document.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // the document's view of the `{id}` the handlers take
pub(crate) struct DevicePath {
    /// The device id: 1–64 letters, digits, `-` or `_`.
    #[param(min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    id: String,
}

pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Error {
    Error::Invalid {
        field,
        message: message.into(),
    }
}

impl App {
    pub(crate) fn db_error(&self, err: sqlx::Error) -> Error {
        DependencyError::postgres(&self.pool, &err).into()
    }

    /// 404 unless the device has reported (a status or a reading).
    pub(crate) async fn known_device(&self, id: &str) -> Result<(), Error> {
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

/// One stored reading (by the device's clock).
#[derive(Debug, Serialize, sqlx::FromRow, ToSchema)]
struct StoredReading {
    seq: i64,
    ts: DateTime<Utc>,
    temperature_c: f64,
    humidity_pct: f64,
    battery_pct: f64,
}

/// A device that has reported, with its retained status and latest reading.
#[derive(Debug, Serialize, ToSchema)]
struct Device {
    #[schema(pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    id: String,
    online: bool,
    /// `online`; `offline` if it said goodbye; `lost` if the broker
    /// published its last will (it vanished without a word).
    #[schema(pattern = "^(online|offline|lost)$")]
    status: String,
    /// When the ingest last stored a reading from it.
    last_seen: Option<DateTime<Utc>>,
    last_reading: Option<StoredReading>,
}

type DeviceRow = (
    String,
    bool,
    String,
    Option<DateTime<Utc>>,
    Option<i64>,
    Option<DateTime<Utc>>,
    Option<f64>,
    Option<f64>,
    Option<f64>,
);

async fn load_devices(app: &App) -> Result<Vec<Device>, sqlx::Error> {
    let rows: Vec<DeviceRow> = sqlx::query_as(
        "SELECT id, online, status, last_seen, last_seq, last_ts, last_temperature_c, \
                last_humidity_pct, last_battery_pct FROM devices ORDER BY id",
    )
    .fetch_all(&app.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, online, status, last_seen, seq, ts, t, h, b)| Device {
            id,
            online,
            status,
            last_seen,
            last_reading: match (seq, ts, t, h, b) {
                (Some(seq), Some(ts), Some(t), Some(h), Some(b)) => Some(StoredReading {
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

/// Every device that has reported, with its latest reading.
#[utoipa::path(
    get, path = "/devices",
    responses(
        (status = 200, body = Vec<Device>),
        (status = 503, description = "Postgres is down", body = ErrorBody),
    )
)]
async fn devices(State(app): State<App>) -> Result<Json<Vec<Device>>, Error> {
    Ok(Json(load_devices(&app).await.map_err(|e| app.db_error(e))?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ReadingsParams {
    /// Only readings taken at or after this time (RFC 3339).
    since: Option<DateTime<Utc>>,
    /// 1–1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// One device's readings, oldest first.
#[utoipa::path(
    get, path = "/devices/{id}/readings",
    params(DevicePath, ReadingsParams),
    responses(
        (status = 200, body = Vec<StoredReading>),
        (status = 400, description = "A path that is not UTF-8", body = ErrorBody),
        (status = 404, description = "No such device has reported", body = ErrorBody),
        (status = 422, description = "A bad id, limit or since", body = ErrorBody),
        (status = 503, description = "Postgres is down", body = ErrorBody),
    )
)]
async fn readings(
    State(app): State<App>,
    Path(id): Path<String>,
    Query(params): Query<ReadingsParams>,
) -> Result<Json<Vec<StoredReading>>, Error> {
    app.known_device(&id).await?;
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(invalid("limit", "must be 1–1000"));
    }
    // No reading is before 1970 (the ingest refuses them), so an earlier
    // `since` is no bound at all, and Postgres, whose calendar starts in
    // 4713 BC, never sees a year it cannot hold (that was a 500).
    let since = params.since.filter(|since| since.timestamp() >= 0);
    let rows: Vec<StoredReading> = sqlx::query_as(
        "SELECT seq, ts, temperature_c, humidity_pct, battery_pct FROM readings \
         WHERE device_id = $1 AND ts >= coalesce($2, '-infinity') ORDER BY seq LIMIT $3",
    )
    .bind(&id)
    .bind(since)
    .bind(limit)
    .fetch_all(&app.pool)
    .await
    .map_err(|e| app.db_error(e))?;
    Ok(Json(rows))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct StatsParams {
    /// 1–2592000 (30 days), default 300.
    #[param(minimum = 1, maximum = 2_592_000)]
    window_secs: Option<i64>,
}

/// Temperature over a device's recent readings; the figures are null when
/// there are none in the window.
#[derive(Serialize, ToSchema)]
struct Stats {
    device_id: String,
    window_secs: i64,
    count: i64,
    min_c: Option<f64>,
    max_c: Option<f64>,
    mean_c: Option<f64>,
}

/// Temperature over the readings a device took (by its clock) in the last
/// `window_secs`.
#[utoipa::path(
    get, path = "/devices/{id}/stats",
    params(DevicePath, StatsParams),
    responses(
        (status = 200, body = Stats),
        (status = 400, description = "A path that is not UTF-8", body = ErrorBody),
        (status = 404, description = "No such device has reported", body = ErrorBody),
        (status = 422, description = "A bad id or window_secs", body = ErrorBody),
        (status = 503, description = "Postgres is down", body = ErrorBody),
    )
)]
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

/// A run of `ALERT_CONSECUTIVE` readings above `ALERT_THRESHOLD_C`.
#[derive(Debug, Serialize, sqlx::FromRow, ToSchema)]
struct AlertView {
    device_id: String,
    seq: i64,
    temperature_c: f64,
    threshold_c: f64,
    readings: i32,
    ts: DateTime<Utc>,
    created_at: DateTime<Utc>,
}

/// The last 100 alerts, newest first.
#[utoipa::path(
    get, path = "/alerts",
    responses(
        (status = 200, body = Vec<AlertView>),
        (status = 503, description = "Postgres is down", body = ErrorBody),
    )
)]
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

/// What this instance (not the fleet of instances) is doing.
#[derive(Debug, Serialize, ToSchema)]
struct IngestView {
    /// The instance's MQTT client id.
    client_id: String,
    /// The QoS of its telemetry subscription.
    qos: u8,
    /// Connected to the broker and subscribed.
    connected: bool,
    /// Messages received and waiting for the batcher.
    inbox: u64,
    /// At QoS 0, the most the inbox holds before it sheds.
    qos0_inbox: u64,
    /// QoS 0 messages dropped because the inbox was full.
    shed: u64,
    /// Readings this instance received from the broker: its share of the
    /// stream (each instance of a share group answers for itself).
    received: u64,
    /// Readings this instance stored (new rows; redeliveries not counted).
    stored: u64,
}

impl App {
    fn ingest_view(&self) -> IngestView {
        IngestView {
            client_id: self.settings.client_id.clone(),
            qos: self.settings.qos,
            connected: self.mqtt_up(),
            inbox: self.stats.inbox.waiting(),
            qos0_inbox: self.settings.qos0_inbox,
            shed: self.stats.inbox.shed.get(),
            received: self.stats.received_readings(),
            stored: self.stats.stored.get(),
        }
    }
}

/// This instance's inbox, and the QoS 0 readings it shed.
#[utoipa::path(get, path = "/ingest", responses((status = 200, body = IngestView)))]
async fn ingest(State(app): State<App>) -> Json<IngestView> {
    Json(app.ingest_view())
}

/// `GET /events`: the device table once a second, as server-sent events
/// (`devices`), and this instance's `ingest` state, until the client goes
/// or the service stops.
async fn events(State(app): State<App>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let shutdown = app.shutdown.clone();
    let ticks =
        tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(Duration::from_secs(1)));
    let stream = ticks
        .then(move |_| {
            let app = app.clone();
            async move {
                let ingest = Event::default()
                    .event("ingest")
                    .json_data(app.ingest_view())
                    .expect("the ingest view serialises");
                let devices = match load_devices(&app).await {
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
                futures::stream::iter([Ok(ingest), Ok(devices)])
            }
        })
        .flatten()
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
