//! The gRPC door into the catalog: protobuf over HTTP/2, with the standard
//! health service and server reflection beside it, so `grpcurl` can list and
//! describe the API without the .proto files.

use chrono::{DateTime, Utc};
use futures::{StreamExt, stream::BoxStream};
use lab_proto::catalog::v1::{
    self as pb,
    catalog_service_server::{CatalogService, CatalogServiceServer},
};
use tonic::{Request, Response, Status};

use lab_core::error::DependencyError;

use crate::domain::{Catalog, Error, NewProduct, Product, ProductPatch};

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Invalid { .. } => Status::invalid_argument(err.to_string()),
            Error::NotFound(_) => Status::not_found(err.to_string()),
            Error::DuplicateSku(_) => Status::already_exists(err.to_string()),
            Error::Dependency(DependencyError::Down(message)) => Status::unavailable(message),
            Error::Dependency(DependencyError::Bug) => {
                Status::internal("internal error; see the service log")
            }
        }
    }
}

/// Answers a request that does not decode as its message with
/// INVALID_ARGUMENT rather than tonic's INTERNAL.
///
/// gRPC's status-code table lists "error parsing request proto" as INTERNAL,
/// and tonic follows it. This lab departs from it on purpose: the bytes came
/// from the client, so the fault is the client's, as REST's 400 says for
/// broken JSON; INTERNAL would count every scanner's garbage as a server
/// error in the metrics and page whoever watches them. Only a response that
/// tonic's decoder produced is rewritten (INTERNAL whose message starts
/// "failed to decode"); a real INTERNAL stays INTERNAL.
pub fn decode_errors_are_invalid_argument<B>(
    mut response: axum::http::Response<B>,
) -> axum::http::Response<B> {
    let headers = response.headers_mut();
    let from_decoder = headers.get("grpc-status").is_some_and(|s| s == "13")
        && headers
            .get("grpc-message")
            .is_some_and(|m| m.as_bytes().starts_with(b"failed%20to%20decode"));
    if from_decoder {
        let code = tonic::Code::InvalidArgument as i32;
        headers.insert("grpc-status", code.into());
    }
    response
}

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

impl From<Product> for pb::Product {
    fn from(p: Product) -> Self {
        Self {
            id: p.id.to_string(),
            sku: p.sku,
            name: p.name,
            description: p.description,
            price_cents: p.price_cents,
            currency: p.currency,
            tags: p.tags,
            created_at: Some(timestamp(p.created_at)),
            updated_at: Some(timestamp(p.updated_at)),
        }
    }
}

impl TryFrom<pb::CreateProductRequest> for NewProduct {
    type Error = Error;

    /// A price is required, as REST's JSON requires it; `optional` in the
    /// .proto is what lets the server tell it is missing.
    fn try_from(r: pb::CreateProductRequest) -> Result<Self, Error> {
        let price_cents = r.price_cents.ok_or_else(|| Error::Invalid {
            field: "price_cents",
            message: "is required".into(),
        })?;
        Ok(Self {
            sku: r.sku,
            name: r.name,
            description: r.description,
            price_cents,
            currency: r.currency,
            tags: r.tags,
        })
    }
}

/// The `CatalogService` implementation: every method is one domain call.
pub struct Grpc {
    catalog: Catalog,
}

impl Grpc {
    pub fn server(catalog: Catalog) -> CatalogServiceServer<Self> {
        CatalogServiceServer::new(Self { catalog })
            // The same limit as the REST side; tonic answers larger messages with OUT_OF_RANGE.
            .max_decoding_message_size(lab_core::http::BODY_LIMIT)
    }
}

#[tonic::async_trait]
impl CatalogService for Grpc {
    async fn create_product(
        &self,
        request: Request<pb::CreateProductRequest>,
    ) -> Result<Response<pb::Product>, Status> {
        let new = NewProduct::try_from(request.into_inner())?;
        let product = self.catalog.create(new).await?;
        Ok(Response::new(product.into()))
    }

    async fn get_product(
        &self,
        request: Request<pb::GetProductRequest>,
    ) -> Result<Response<pb::Product>, Status> {
        let product = self.catalog.get(&request.into_inner().id).await?;
        Ok(Response::new(product.into()))
    }

    async fn list_products(
        &self,
        request: Request<pb::ListProductsRequest>,
    ) -> Result<Response<pb::ListProductsResponse>, Status> {
        let r = request.into_inner();
        // Absent means the default; a present 0 is refused by the domain, as
        // REST's page_size=0 is.
        let page = self.catalog.list(r.page_size, Some(&r.page_token)).await?;
        Ok(Response::new(pb::ListProductsResponse {
            products: page.products.into_iter().map(Into::into).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    type StreamProductsStream = BoxStream<'static, Result<pb::Product, Status>>;

    async fn stream_products(
        &self,
        _request: Request<pb::StreamProductsRequest>,
    ) -> Result<Response<Self::StreamProductsStream>, Status> {
        let stream = self
            .catalog
            .stream_all()
            .map(|item| item.map(Into::into).map_err(Status::from))
            .boxed();
        Ok(Response::new(stream))
    }

    async fn update_product(
        &self,
        request: Request<pb::UpdateProductRequest>,
    ) -> Result<Response<pb::Product>, Status> {
        let r = request.into_inner();
        let patch = ProductPatch {
            sku: r.sku,
            name: r.name,
            description: r.description,
            price_cents: r.price_cents,
            currency: r.currency,
            tags: r.tags.map(|t| t.tags),
        };
        let product = self.catalog.update(&r.id, patch).await?;
        Ok(Response::new(product.into()))
    }

    async fn delete_product(
        &self,
        request: Request<pb::DeleteProductRequest>,
    ) -> Result<Response<pb::DeleteProductResponse>, Status> {
        self.catalog.delete(&request.into_inner().id).await?;
        Ok(Response::new(pb::DeleteProductResponse {}))
    }
}
