//! Commands back to a device, and how long they are worth applying.
//!
//! `POST /devices/{id}/commands` stores a setpoint and publishes it (QoS 1)
//! on `devices/{id}/commands`; the device applies it and acknowledges on
//! `devices/{id}/acks`, which marks it `acknowledged`.
//!
//! **A command goes stale.** A device that is away does not hear it: the
//! lab's devices keep no session, so the broker drops a command nobody is
//! subscribed to, and the row stayed `pending` forever, its sender left
//! polling. A device that does keep a session would be worse off: it would
//! apply a setpoint chosen an hour ago the moment it returned. So each
//! command has a time to live (`ttl_secs`, 60 s unless the request says, up
//! to a day), in two places: the row's `expires_at`, past which a pending
//! command reads `expired` and an ack no longer counts (it is kept as a
//! reject); and the MQTT message's expiry interval, past which the broker
//! drops it instead of delivering it late. `expired` is final: the sender
//! was told, and may have sent another setpoint since.
//!
//! `expired` is not written by a job: a pending command past `expires_at`
//! *is* expired, and every read says so. Rejected: a sweeper that flips
//! rows every so often (a job to run, and between its runs a command reads
//! `pending` past its time, while an ack could still land), and an expiry
//! kept by the broker alone (the row would still say `pending`).

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use lab_core::{Json, Path, openapi::ErrorBody};
use rumqttc::v5::mqttbytes::{QoS, v5::PublishProperties};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    App,
    api::{DevicePath, Error, invalid},
    payload::Command,
};

/// A thermostat takes setpoints from 5 to 35 °C.
const SETPOINT_RANGE: std::ops::RangeInclusive<f64> = 5.0..=35.0;
/// How long a command is worth applying, unless the request says.
const DEFAULT_TTL_SECS: u32 = 60;
/// A command's time to live: one second to a day.
const TTL_RANGE: std::ops::RangeInclusive<u32> = 1..=86_400;

/// A new setpoint for a thermostat.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewCommand {
    #[schema(minimum = 5.0, maximum = 35.0)]
    setpoint_c: f64,
    /// Seconds the command is worth applying (default 60): unacknowledged
    /// by then, it is `expired`, and the broker no longer delivers it.
    #[schema(minimum = 1, maximum = 86_400)]
    ttl_secs: Option<u32>,
}

/// A command: sent to the device, and acknowledged once it applied it, or
/// expired if it did not say so in time.
#[derive(Debug, Serialize, sqlx::FromRow, ToSchema)]
pub(crate) struct CommandView {
    command_id: uuid::Uuid,
    device_id: String,
    setpoint_c: f64,
    #[schema(pattern = "^(pending|acknowledged|expired)$")]
    status: String,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    acked_at: Option<DateTime<Utc>>,
}

/// The answer to a command sent: on its way, not yet applied.
#[derive(Serialize, ToSchema)]
pub(crate) struct CommandSent {
    command_id: uuid::Uuid,
    #[schema(pattern = "^pending$")]
    status: &'static str,
    /// Unacknowledged by then, it is `expired`.
    expires_at: DateTime<Utc>,
}

/// Send a setpoint to a device: stored, then published (QoS 1, with the
/// command's expiry) on `devices/{id}/commands`; 202, since the device has
/// not acted on it yet.
#[utoipa::path(
    post, path = "/devices/{id}/commands", request_body = NewCommand,
    params(DevicePath),
    responses(
        (status = 202, description = "Sent; poll `GET /commands/{command_id}`", body = CommandSent),
        (status = 400, description = "Malformed JSON, or a path that is not UTF-8", body = ErrorBody),
        (status = 404, description = "No such device has reported", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "Not application/json", body = ErrorBody),
        (status = 422, description = "A bad id, setpoint_c or ttl_secs", body = ErrorBody),
        (status = 503, description = "Postgres or the broker is down", body = ErrorBody),
    )
)]
pub(crate) async fn send(
    State(app): State<App>,
    Path(id): Path<String>,
    Json(body): Json<NewCommand>,
) -> Result<Response, Error> {
    if !SETPOINT_RANGE.contains(&body.setpoint_c) {
        return Err(invalid("setpoint_c", "must be 5–35"));
    }
    let ttl = body.ttl_secs.unwrap_or(DEFAULT_TTL_SECS);
    if !TTL_RANGE.contains(&ttl) {
        return Err(invalid("ttl_secs", "must be 1–86400 (a day)"));
    }
    app.known_device(&id).await?;
    let command = Command {
        command_id: uuid::Uuid::now_v7(),
        setpoint_c: body.setpoint_c,
    };
    let expires_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO commands (id, device_id, setpoint_c, expires_at) \
         VALUES ($1, $2, $3, now() + make_interval(secs => $4)) RETURNING expires_at",
    )
    .bind(command.command_id)
    .bind(&id)
    .bind(command.setpoint_c)
    .bind(f64::from(ttl))
    .fetch_one(&app.pool)
    .await
    .map_err(|e| app.db_error(e))?;
    // Accepted means on its way: with the broker away it would wait in
    // the client's memory, and be gone with a restart. So 503 instead, and
    // the row (never sent) expires in its time.
    if !app.mqtt_up() {
        return Err(Error::NotSent(format!(
            "the command was not sent: the broker at {} is not reachable",
            app.broker.place()
        )));
    }
    let payload = serde_json::to_vec(&command).expect("commands serialise");
    let properties = PublishProperties {
        message_expiry_interval: Some(ttl),
        ..PublishProperties::default()
    };
    let topic = app.topics.commands(&id);
    app.client
        .try_publish_with_properties(topic, QoS::AtLeastOnce, false, payload, properties)
        .map_err(|err| {
            tracing::warn!(%err, "cannot queue a command");
            Error::NotSent("the command was not sent: the MQTT client is busy; try again".into())
        })?;
    let body = CommandSent {
        command_id: command.command_id,
        status: "pending",
        expires_at,
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// A command: pending, acknowledged, or expired.
#[utoipa::path(
    get, path = "/commands/{id}",
    params(("id" = uuid::Uuid, Path, description = "The command id, from `POST /devices/{id}/commands`")),
    responses(
        (status = 200, body = CommandView),
        (status = 400, description = "A path that is not UTF-8", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 422, description = "Not a UUID", body = ErrorBody),
        (status = 503, description = "Postgres is down", body = ErrorBody),
    )
)]
pub(crate) async fn get(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Json<CommandView>, Error> {
    let id: uuid::Uuid = id
        .parse()
        .map_err(|_| invalid("id", "not a command id (a UUID)"))?;
    sqlx::query_as(
        "SELECT id AS command_id, device_id, setpoint_c, \
                CASE WHEN status = 'pending' AND expires_at <= now() THEN 'expired' \
                     ELSE status END AS status, \
                created_at, expires_at, acked_at \
         FROM commands WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&app.pool)
    .await
    .map_err(|e| app.db_error(e))?
    .map(Json)
    .ok_or_else(|| Error::NotFound(format!("no command {id}")))
}
