//! The one error body every lab answers with:
//! `{"error":{"code":"not_found","message":"…"}}`.
//!
//! Each lab keeps its own error enum (what can go wrong in *its* domain) and
//! converts it into [`ApiError`] once, at the HTTP boundary. Server errors get
//! an opaque message; the detail goes to the log, never to the client.

use axum::{
    extract::{
        FromRequest, FromRequestParts, Request,
        rejection::{JsonRejection, PathRejection, QueryRejection},
    },
    http::{StatusCode, request::Parts},
    response::{IntoResponse, Response},
};
use serde::{Serialize, de::DeserializeOwned};

/// True for 1 to `max_len` ASCII letters, digits, `-`, `_` and the bytes in
/// `also`: the names labs take from paths, queries and topics (rooms, device
/// ids, cache pages), safe as a Redis key part, a topic level and in the DOM.
pub fn is_name(value: &str, max_len: usize, also: &[u8]) -> bool {
    (1..=max_len).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || also.contains(&b))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    /// 400: the request could not be parsed at all.
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed", message)
    }
    /// 422: parsed, but a field breaks a rule. The message names the field.
    pub fn invalid(field: &str, message: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("{field}: {message}"),
        )
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
    /// 503: a backing service is down. The message names it.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
    /// 500 with an opaque body; log the cause where you create it.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the service log",
        )
    }
}

/// A call to a backing service failed, sorted once for every lab: either
/// the service is down (503, and the message names it and says how to start
/// it) or the call itself went wrong (500 with an opaque body; the cause is
/// logged here, once). A lab's error enum wraps it, so no lab decides again
/// which sqlx or redis errors mean "down".
#[derive(Debug, Clone, thiserror::Error)]
pub enum DependencyError {
    #[error("{0}")]
    Down(String),
    #[error("internal error")]
    Bug,
}

impl DependencyError {
    /// Sorts a Postgres error.
    pub fn postgres(pool: &sqlx::PgPool, err: &sqlx::Error) -> Self {
        if crate::postgres::is_unavailable(err) {
            Self::Down(crate::postgres::describe(pool, err))
        } else {
            tracing::error!(%err, "postgres query failed");
            Self::Bug
        }
    }

    /// Sorts a Redis error; `place` is `host:port` ([`crate::redis::where_is`]).
    pub fn redis(place: &str, err: &redis::RedisError) -> Self {
        if crate::redis::is_unavailable(err) {
            Self::Down(crate::redis::describe(place, err))
        } else {
            tracing::error!(%err, "redis command failed");
            Self::Bug
        }
    }
}

impl DependencyError {
    /// Says first what could not be done, when the service is down.
    pub fn explain(self, what: &str) -> Self {
        match self {
            Self::Down(message) => Self::Down(format!("{what}: {message}")),
            Self::Bug => Self::Bug,
        }
    }
}

impl From<DependencyError> for ApiError {
    fn from(err: DependencyError) -> Self {
        match err {
            DependencyError::Down(message) => ApiError::unavailable(message),
            DependencyError::Bug => ApiError::internal(),
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Inner {
                code: self.code,
                message: &self.message,
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

/// axum's own rejections, in the lab's error format: malformed JSON is 400, a
/// well-formed body with a wrong field is 422 naming the field (serde's path),
/// a body over the limit is 413, a missing content type is 415.
impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let status = rejection.status();
        let detail = rejection.body_text();
        match rejection {
            JsonRejection::JsonDataError(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                // "Failed to deserialize the JSON body into the target type: price_cents: invalid type…"
                detail
                    .split_once("target type: ")
                    .map_or(detail.clone(), |(_, rest)| rest.to_owned()),
            ),
            JsonRejection::JsonSyntaxError(_) => Self::malformed(detail),
            JsonRejection::MissingJsonContentType(_) => {
                Self::new(status, "unsupported_media_type", detail)
            }
            _ if status == StatusCode::PAYLOAD_TOO_LARGE => Self::new(
                status,
                "too_large",
                format!(
                    "request body is larger than {} bytes",
                    crate::http::BODY_LIMIT
                ),
            ),
            _ => Self::new(status, "malformed", detail),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        let detail = rejection.body_text();
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            detail
                .split_once("query string: ")
                .map_or(detail.clone(), |(_, rest)| rest.to_owned()),
        )
    }
}

/// A path parameter that does not parse (`/orders/not-a-uuid`) is 422 like
/// any other invalid field, naming it; one that is not UTF-8 at all is 400.
impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        use axum::extract::path::ErrorKind;
        let detail = rejection.body_text();
        let detail = detail.strip_prefix("Invalid URL: ").unwrap_or(&detail);
        match &rejection {
            PathRejection::FailedToDeserializePathParams(inner) => match inner.kind() {
                ErrorKind::InvalidUtf8InPathParam { .. } => Self::malformed(detail),
                ErrorKind::ParseErrorAtKey { key, value, .. } => {
                    Self::invalid(key, format!("{value:?} is not valid here"))
                }
                _ => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", detail),
            },
            _ => Self::internal(),
        }
    }
}

/// `axum::extract::Path`, but its rejections answer in the lab's error format.
#[derive(Debug, Clone, Copy, Default)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(value) =
            axum::extract::Path::<T>::from_request_parts(parts, state).await?;
        Ok(Self(value))
    }
}

/// `axum::Json`, but its rejections answer in the lab's error format.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(Self::Rejection::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Expected request with `Content-Type: application/json`",
            ));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|rejection| match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!(
                        "request body is larger than {} bytes",
                        crate::http::BODY_LIMIT
                    ),
                ),
                _ => ApiError::malformed(rejection.body_text()),
            })?;
        let axum::Json(value) = axum::Json::<T>::from_bytes(&bytes)?;
        // serde reads a struct from a JSON array too, by position
        // (`["MUG-1","Mug",...]`, or `"items":[["SKU-1",1,100]]` one level
        // down): a request body is an object, and since no lab's schema has
        // a tuple, an array inside an array is a struct sent by position.
        let shape: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|err| ApiError::malformed(err.to_string()))?;
        if !shape.is_object() {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                "the body must be a JSON object",
            ));
        }
        if has_array_in_array(&shape) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                "an array where an object belongs: send objects with named fields",
            ));
        }
        Ok(Self(value))
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

fn has_array_in_array(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::Array(items) => items
            .iter()
            .any(|item| item.is_array() || has_array_in_array(item)),
        Value::Object(fields) => fields.values().any(has_array_in_array),
        _ => false,
    }
}

/// `application/json`, or any `application/<something>+json`.
fn is_json(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let essence = essence.to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// `axum::extract::Query`, but its rejections answer in the lab's error format.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Query(value) =
            axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(Self(value))
    }
}

#[cfg(test)]
mod tests {
    use axum::{Router, body::Body, http::Request, routing};
    use serde::Deserialize;
    use tower::ServiceExt;

    use super::*;

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Product {
        sku: String,
        price_cents: i64,
    }

    async fn post(content_type: &str, body: &str) -> (StatusCode, String) {
        let router = Router::new().route(
            "/",
            routing::post(|Json(_): Json<Product>| async { "created" }),
        );
        let request = Request::post("/")
            .header("content-type", content_type)
            .body(Body::from(body.to_owned()))
            .unwrap();
        let response = router.oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    /// serde fills a struct from a JSON array by position; a request body
    /// must be an object, as the documents say.
    #[tokio::test]
    async fn a_json_array_is_refused_where_an_object_is_expected() {
        let (status, body) = post("application/json", r#"["MUG-1", 100]"#).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(body.contains("must be a JSON object"), "{body}");
        let (status, _) = post("application/json", r#" {"sku":"MUG-1","price_cents":100}"#).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Order {
        customer_id: String,
        items: Vec<Item>,
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Item {
        sku: String,
        quantity: i64,
    }

    /// The same by position, one level down: `[["SKU-1", 1]]` for a list of
    /// item objects.
    #[tokio::test]
    async fn a_json_array_is_refused_where_a_nested_object_is_expected() {
        let router = Router::new().route(
            "/",
            routing::post(|Json(_): Json<Order>| async { "created" }),
        );
        let send = |body: &'static str| {
            let router = router.clone();
            async move {
                let request = Request::post("/")
                    .header("content-type", "application/json")
                    .body(Body::from(body))
                    .unwrap();
                router.oneshot(request).await.unwrap().status()
            }
        };
        let nested = send(r#"{"customer_id":"c","items":[["SKU-1",1]]}"#).await;
        assert_eq!(nested, StatusCode::UNPROCESSABLE_ENTITY);
        let fine = send(r#"{"customer_id":"c","items":[{"sku":"SKU-1","quantity":1}]}"#).await;
        assert_eq!(fine, StatusCode::OK);
    }

    /// The other rejections keep their statuses and codes.
    #[tokio::test]
    async fn each_json_rejection_keeps_its_status_and_code() {
        let cases = [
            (
                "text/plain",
                r#"{"sku":"A","price_cents":1}"#,
                415,
                "unsupported_media_type",
            ),
            ("application/json", r#"{"sku":"#, 400, "malformed"),
            (
                "application/json",
                r#"{"sku":"A","price_cents":"x"}"#,
                422,
                "price_cents",
            ),
            (
                "application/problem+json",
                r#"{"sku":"A","price_cents":1}"#,
                200,
                "created",
            ),
        ];
        for (content_type, body, status, needle) in cases {
            let (got, text) = post(content_type, body).await;
            assert_eq!(got.as_u16(), status, "{content_type} {body}: {text}");
            assert!(text.contains(needle), "{content_type} {body}: {text}");
        }
    }
}
