//! The HTTP side of a chat instance: the page, the WebSocket door, and two
//! plain reads of what Redis holds.
//!
//! - `GET /` (with `/chat.js` and `/chat.css`): the chat page.
//! - `GET /ws?room=…&name=…`: checks both names, then upgrades; from there
//!   the socket belongs to [`connection`].
//! - `GET /rooms`, `GET /rooms/{room}/messages?limit=`: every room with its
//!   member count, and a room's newest messages, across all instances.
//!
//! The three are described by an OpenAPI document ([`ApiDoc`], served at
//! `GET /openapi.json`, browsable at `/docs/`), limits included; the page
//! is not in it.
//!
//! Everything that can go wrong before a socket exists is an [`Error`],
//! mapped once to the lab's JSON error body. The upgrade is the last
//! moment a client can be told why in a body it can read: after it, the
//! only words left are close codes. So a bad name is a 400 here, not a
//! 1008 after the upgrade.

use axum::{
    Extension, Router,
    extract::{ConnectInfo, State, WebSocketUpgrade, ws::rejection::WebSocketUpgradeRejection},
    http::header,
    response::{IntoResponse, Response},
    routing::get,
};
use lab_core::{ApiError, Json, Path, Query, error::DependencyError, openapi::ErrorBody};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::{App, connection, protocol, socket::Socket, store};

/// The chat lab's HTTP API, as served at `GET /openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "System Design Lab: chat",
        description = "WebSocket rooms shared by several instances through Redis pub/sub; \
            the rooms and their history as JSON. The WebSocket protocol itself (JSON text \
            frames) is described in docs/labs/chat.md."
    ),
    paths(join, rooms, history),
    components(schemas(lab_core::openapi::ErrorBody, lab_core::openapi::ErrorDetail))
)]
pub struct ApiDoc;

pub fn routes(app: App) -> Router {
    use utoipa::OpenApi;
    let routes = Router::new()
        .route("/", get(page::index))
        .route("/chat.js", get(page::script))
        .route("/chat.css", get(page::style))
        .route("/ws", get(join))
        .route("/rooms", get(rooms))
        .route("/rooms/{room}/messages", get(history))
        .with_state(app);
    lab_core::openapi::with_docs(routes, ApiDoc::openapi())
}

/// Everything the HTTP side can answer with besides success, mapped once to
/// the lab's JSON error body.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A room or member name that breaks the naming rule: 422, as an invalid
    /// field is in every lab (the message names the field).
    #[error("{0}")]
    InvalidName(String),
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
            Error::InvalidName(message) => ApiError::new(
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                message,
            ),
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
    protocol::check_name(field, value).map_err(Error::InvalidName)
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct JoinParams {
    /// The room to join (created by naming it).
    #[param(
        required = true,
        value_type = String,
        pattern = "^[A-Za-z0-9_-]{1,32}$",
        min_length = 1,
        max_length = 32
    )]
    room: Option<String>,
    /// The member's name, shown to the others.
    #[param(
        required = true,
        value_type = String,
        pattern = "^[A-Za-z0-9_-]{1,32}$",
        min_length = 1,
        max_length = 32
    )]
    name: Option<String>,
}

/// Join a room over a WebSocket.
///
/// After the upgrade the client sends `{"type":"say","text":"…"}` (1–2000
/// characters, frames up to 16 KiB) and receives `welcome`, `message`,
/// `joined`, `left`, `members`, `error` and `notice` frames. The names are checked
/// before the upgrade, where the client can still read why one is refused.
#[utoipa::path(
    get, path = "/ws", params(JoinParams),
    responses(
        (status = 101, description = "Switching Protocols: the connection is now a WebSocket"),
        (status = 400, description = "A request that is not a WebSocket upgrade (`not_websocket`)", body = ErrorBody),
        (status = 422, description = "A room or name that breaks the rule, or a query string that does not parse", body = ErrorBody),
        (status = 426, description = "The connection cannot be upgraded (`not_websocket`)", body = ErrorBody),
        (status = 503, description = "The instance is shutting down; connect again", body = ErrorBody),
    )
)]
async fn join(
    State(app): State<App>,
    socket: Option<Extension<ConnectInfo<Socket>>>,
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
    // Served without `serve_with_connect_info` (a test's own router), the socket
    // keeps the kernel's defaults.
    let tcp = socket
        .map(|Extension(ConnectInfo(tcp))| tcp)
        .unwrap_or_default();
    Ok(connection::limits(upgrade)
        .on_upgrade(move |ws| async move {
            connection::serve(ws, tcp, app, room, name).await;
            drop(token);
        })
        .into_response())
}

#[derive(Serialize, ToSchema)]
struct Rooms {
    /// Every room someone is in, by name.
    rooms: Vec<store::RoomInfo>,
}

/// Every room someone is in, with its member count, across all instances.
#[utoipa::path(
    get, path = "/rooms",
    responses(
        (status = 200, body = Rooms),
        (status = 503, description = "Redis is down", body = ErrorBody),
    )
)]
async fn rooms(State(app): State<App>) -> Result<Json<Rooms>, Error> {
    let rooms = app
        .store
        .rooms()
        .await
        .map_err(|err| DependencyError::redis(&app.redis_place, &err))?;
    Ok(Json(Rooms { rooms }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct HistoryParams {
    /// How many of the newest messages (default 50).
    #[param(value_type = u32, required = false, minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

#[derive(Serialize, ToSchema)]
struct History {
    #[schema(pattern = "^[A-Za-z0-9_-]{1,32}$", min_length = 1, max_length = 32)]
    room: String,
    /// Oldest first.
    #[schema(max_items = 1000)]
    messages: Vec<protocol::Message>,
}

/// A room's newest messages, oldest first, from its history in Redis.
#[utoipa::path(
    get, path = "/rooms/{room}/messages",
    params(
        ("room" = String, Path, description = "A room name",
            pattern = "^[A-Za-z0-9_-]{1,32}$", min_length = 1, max_length = 32),
        HistoryParams
    ),
    responses(
        (status = 200, body = History),
        (status = 400, description = "A room that is not UTF-8", body = ErrorBody),
        (status = 422, description = "A room name that breaks the rule, or a `limit` outside 1–1000", body = ErrorBody),
        (status = 503, description = "Redis is down", body = ErrorBody),
    )
)]
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
    use utoipa::OpenApi;

    use super::*;

    #[test]
    fn the_document_states_the_limits_the_code_enforces() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let param = |path: &str, i: usize| doc["paths"][path]["get"]["parameters"][i].clone();
        for i in 0..2 {
            let name = param("/ws", i);
            assert_eq!(
                (&name["in"], &name["required"]),
                (&"query".into(), &true.into())
            );
            assert_eq!(name["schema"]["pattern"], "^[A-Za-z0-9_-]{1,32}$");
        }
        let room = param("/rooms/{room}/messages", 0);
        assert_eq!(room["schema"]["pattern"], "^[A-Za-z0-9_-]{1,32}$");
        let limit = param("/rooms/{room}/messages", 1);
        assert_eq!(
            (&limit["in"], &limit["required"]),
            (&"query".into(), &false.into())
        );
        let range = (&limit["schema"]["minimum"], &limit["schema"]["maximum"]);
        assert_eq!(range, (&1.into(), &1000.into()));
        let text = &doc["components"]["schemas"]["Message"]["properties"]["text"];
        assert_eq!(text["maxLength"], protocol::MAX_TEXT_CHARS);
    }

    #[test]
    fn each_error_keeps_its_status_and_code() {
        let cases = [
            (Error::InvalidName("room: bad".into()), 422, "invalid"),
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
