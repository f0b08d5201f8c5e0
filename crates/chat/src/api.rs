//! The HTTP side of a chat instance: the page, the WebSocket door, and two
//! plain reads of what Redis holds.
//!
//! - `GET /` (with `/chat.js` and `/chat.css`): the chat page.
//! - `GET /ws?room=…&name=…`: checks both names, then upgrades; from there
//!   the socket belongs to [`connection`].
//! - `GET /rooms`, `GET /rooms/{room}/messages?limit=`: every room with its
//!   member count, and a room's newest messages, across all instances.
//!
//! Everything that can go wrong before a socket exists is an [`Error`],
//! mapped once to the lab's JSON error body. The upgrade is the last
//! moment a client can be told why in a body it can read: after it, the
//! only words left are close codes. So a bad name is a 400 here, not a
//! 1008 after the upgrade.

use axum::{
    Router,
    extract::{Path, State, WebSocketUpgrade, ws::rejection::WebSocketUpgradeRejection},
    http::header,
    response::{IntoResponse, Response},
    routing::get,
};
use lab_core::{ApiError, Json, Query, error::DependencyError};
use serde::{Deserialize, Serialize};

use crate::{App, connection, protocol, store};

pub fn routes(app: App) -> Router {
    Router::new()
        .route("/", get(page::index))
        .route("/chat.js", get(page::script))
        .route("/chat.css", get(page::style))
        .route("/ws", get(join))
        .route("/rooms", get(rooms))
        .route("/rooms/{room}/messages", get(history))
        .with_state(app)
}

/// Everything the HTTP side can answer with besides success, mapped once to
/// the lab's JSON error body.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A room or member name that breaks the naming rule (400).
    #[error("{0}")]
    Malformed(String),
    /// A history `limit` outside 1–1000 (422).
    #[error("limit: must be 1–1000")]
    InvalidLimit,
    /// The instance is draining; a new member should go elsewhere (503).
    #[error("shutting down; connect again")]
    ShuttingDown,
    /// `/ws` asked without a WebSocket upgrade: axum's status, our body.
    #[error(transparent)]
    NotWebSocket(#[from] WebSocketUpgradeRejection),
    /// Redis is down (503), or a command failed (500).
    #[error(transparent)]
    Dependency(#[from] DependencyError),
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match err {
            Error::Malformed(message) => ApiError::malformed(message),
            Error::InvalidLimit => ApiError::invalid("limit", "must be 1–1000"),
            Error::ShuttingDown => ApiError::unavailable(err.to_string()),
            Error::NotWebSocket(rejection) => {
                ApiError::new(rejection.status(), "not_websocket", rejection.body_text())
            }
            Error::Dependency(err) => err.into(),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        ApiError::from(self).into_response()
    }
}

/// A room or member name, checked.
fn check_name(field: &str, value: &str) -> Result<(), Error> {
    protocol::check_name(field, value).map_err(Error::Malformed)
}

#[derive(Deserialize)]
struct JoinParams {
    room: Option<String>,
    name: Option<String>,
}

/// `GET /ws?room=…&name=…`: checks the names, then upgrades. A bad name is
/// a 400 here, before the upgrade, where the client can still read why.
async fn join(
    State(app): State<App>,
    Query(params): Query<JoinParams>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, Error> {
    if app.shutdown.is_cancelled() {
        return Err(Error::ShuttingDown);
    }
    let room = params.room.unwrap_or_default();
    let name = params.name.unwrap_or_default();
    check_name("room", &room)?;
    check_name("name", &name)?;
    let upgrade = upgrade?;
    // Taken before the upgrade completes, so shutdown waits for this
    // connection even if it is still being upgraded.
    let token = app.tracker.token();
    Ok(connection::limits(upgrade)
        .on_upgrade(move |socket| async move {
            connection::serve(socket, app, room, name).await;
            drop(token);
        })
        .into_response())
}

#[derive(Serialize)]
struct Rooms {
    rooms: Vec<store::RoomInfo>,
}

/// `GET /rooms`: every room and its member count, across all instances.
async fn rooms(State(app): State<App>) -> Result<Json<Rooms>, Error> {
    let rooms = app
        .store
        .rooms()
        .await
        .map_err(|err| DependencyError::redis(&app.redis_place, &err))?;
    Ok(Json(Rooms { rooms }))
}

#[derive(Deserialize)]
struct HistoryParams {
    limit: Option<usize>,
}

#[derive(Serialize)]
struct History {
    room: String,
    messages: Vec<protocol::Message>,
}

/// `GET /rooms/{room}/messages?limit=`: the newest messages, oldest first.
async fn history(
    State(app): State<App>,
    Path(room): Path<String>,
    Query(params): Query<HistoryParams>,
) -> Result<Json<History>, Error> {
    check_name("room", &room)?;
    let limit = params.limit.unwrap_or(protocol::HISTORY_ON_JOIN);
    if !(1..=1000).contains(&limit) {
        return Err(Error::InvalidLimit);
    }
    let messages = app
        .store
        .history(&room, limit)
        .await
        .map_err(|err| DependencyError::redis(&app.redis_place, &err))?;
    Ok(Json(History { room, messages }))
}

/// The chat page: plain HTML, CSS and JavaScript, compiled into the binary.
mod page {
    use super::*;

    pub async fn index() -> Response {
        serve(
            "text/html; charset=utf-8",
            include_str!("../static/index.html"),
        )
    }

    pub async fn script() -> Response {
        serve(
            "text/javascript; charset=utf-8",
            include_str!("../static/chat.js"),
        )
    }

    pub async fn style() -> Response {
        serve(
            "text/css; charset=utf-8",
            include_str!("../static/chat.css"),
        )
    }

    fn serve(content_type: &'static str, body: &'static str) -> Response {
        ([(header::CONTENT_TYPE, content_type)], body).into_response()
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::*;

    #[test]
    fn each_error_keeps_its_status_and_code() {
        let cases = [
            (Error::Malformed("room: bad".into()), 400, "malformed"),
            (Error::InvalidLimit, 422, "invalid"),
            (Error::ShuttingDown, 503, "unavailable"),
            (Error::Dependency(DependencyError::Bug), 500, "internal"),
        ];
        for (err, status, code) in cases {
            let api = ApiError::from(err);
            assert_eq!(
                (api.status, api.code),
                (StatusCode::from_u16(status).unwrap(), code)
            );
        }
        let limit = ApiError::from(Error::InvalidLimit);
        assert_eq!(limit.message, "limit: must be 1–1000");
        let down = ApiError::from(Error::ShuttingDown);
        assert_eq!(down.message, "shutting down; connect again");
    }
}
