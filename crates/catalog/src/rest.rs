//! The REST door into the catalog: JSON over HTTP/1.1, or HTTP/2 cleartext
//! on the same port. Handlers only translate: path and body in, domain call,
//! status and JSON out. The OpenAPI document is generated from these
//! handlers (`GET /openapi.json`) and shown by Swagger UI at `GET /docs`.

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use lab_core::{
    ApiError, Json, Path, Query,
    openapi::{ErrorBody, ErrorDetail},
};
use serde::Deserialize;
use utoipa::{IntoParams, OpenApi};

use crate::domain::{Catalog, Error, NewProduct, Page, Product, ProductPatch};

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match err {
            Error::Invalid { field, message } => ApiError::invalid(field, message),
            Error::NotFound(_) => ApiError::not_found(err.to_string()),
            Error::DuplicateSku(_) => ApiError::conflict(err.to_string()),
            Error::Dependency(err) => err.into(),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        ApiError::from(self).into_response()
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "System Design Lab: catalog",
        description = "One product catalog, served over REST (this document) and gRPC (lab.catalog.v1.CatalogService) from one domain core."
    ),
    paths(
        create_product,
        list_products,
        get_product,
        update_product,
        delete_product
    ),
    components(schemas(Product, NewProduct, ProductPatch, Page, ErrorBody, ErrorDetail))
)]
pub struct ApiDoc;

pub fn routes(catalog: Catalog) -> Router {
    let routes = Router::new()
        .route("/v1/products", get(list_products).post(create_product))
        .route(
            "/v1/products/{id}",
            get(get_product)
                .patch(update_product)
                .delete(delete_product),
        )
        .with_state(catalog);
    lab_core::openapi::with_docs(routes, ApiDoc::openapi())
}

/// Create a product.
#[utoipa::path(
    post, path = "/v1/products", request_body = NewProduct,
    responses(
        (status = 201, description = "Created; `Location` names the new product", body = Product),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 409, description = "The sku is taken", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 422, description = "A field is invalid; the message names it", body = ErrorBody),
    )
)]
async fn create_product(
    State(catalog): State<Catalog>,
    Json(new): Json<NewProduct>,
) -> Result<impl IntoResponse, Error> {
    let product = catalog.create(new).await?;
    let location = format!("/v1/products/{}", product.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(product),
    ))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListParams {
    /// 1-1000, default 50.
    page_size: Option<u32>,
    /// `next_page_token` from the previous page.
    page_token: Option<String>,
}

/// List products, oldest first, one page at a time.
#[utoipa::path(
    get, path = "/v1/products", params(ListParams),
    responses(
        (status = 200, body = Page),
        (status = 422, description = "Bad page_size or page_token", body = ErrorBody),
    )
)]
async fn list_products(
    State(catalog): State<Catalog>,
    Query(params): Query<ListParams>,
) -> Result<Json<Page>, Error> {
    let page = catalog
        .list(params.page_size, params.page_token.as_deref())
        .await?;
    Ok(Json(page))
}

/// Read one product.
#[utoipa::path(
    get, path = "/v1/products/{id}",
    params(("id" = String, Path, description = "Product id (UUID)")),
    responses((status = 200, body = Product), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody))
)]
async fn get_product(
    State(catalog): State<Catalog>,
    Path(id): Path<String>,
) -> Result<Json<Product>, Error> {
    Ok(Json(catalog.get(&id).await?))
}

/// Change some fields of a product; absent fields stay as they are.
#[utoipa::path(
    patch, path = "/v1/products/{id}", request_body = ProductPatch,
    params(("id" = String, Path, description = "Product id (UUID)")),
    responses(
        (status = 200, body = Product),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody),
    )
)]
async fn update_product(
    State(catalog): State<Catalog>,
    Path(id): Path<String>,
    Json(patch): Json<ProductPatch>,
) -> Result<Json<Product>, Error> {
    Ok(Json(catalog.update(&id, patch).await?))
}

/// Delete a product.
#[utoipa::path(
    delete, path = "/v1/products/{id}",
    params(("id" = String, Path, description = "Product id (UUID)")),
    responses(
        (status = 204, description = "Deleted"), (status = 404, body = ErrorBody),
        (status = 422, description = "The id is not a UUID", body = ErrorBody),
        (status = 503, description = "Postgres is down", body = ErrorBody),
    )
)]
async fn delete_product(
    State(catalog): State<Catalog>,
    Path(id): Path<String>,
) -> Result<StatusCode, Error> {
    catalog.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
