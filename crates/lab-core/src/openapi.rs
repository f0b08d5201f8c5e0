//! Every lab describes its HTTP API with an OpenAPI document, generated from
//! the handlers (utoipa) rather than written beside them, so the document
//! cannot drift from the code. It is served at `GET /openapi.json` and
//! browsable at `/docs/`; CI fuzzes each lab against its document
//! (schemathesis: no 500 anywhere, every response as documented).

use axum::Router;
use utoipa::ToSchema;
use utoipa_swagger_ui::SwaggerUi;

/// The error body every endpoint answers with (what [`crate::ApiError`]
/// writes), for the documents' `components`.
#[derive(ToSchema)]
#[allow(dead_code)] // documents the JSON that `ApiError` writes
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorDetail {
    /// `malformed`, `invalid`, `not_found`, `conflict`, `too_large`,
    /// `unsupported_media_type`, `method_not_allowed`, `unavailable`,
    /// `internal`, or a lab's own.
    code: String,
    message: String,
}

/// `routes` plus `GET /openapi.json` and the browsable `/docs/`.
pub fn with_docs(routes: Router, document: utoipa::openapi::OpenApi) -> Router {
    routes.merge(SwaggerUi::new("/docs").url("/openapi.json", document))
}
