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

impl From<pb::CreateProductRequest> for NewProduct {
    fn from(r: pb::CreateProductRequest) -> Self {
        Self {
            sku: r.sku,
            name: r.name,
            description: r.description,
            price_cents: r.price_cents,
            currency: r.currency,
            tags: r.tags,
        }
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
        let product = self.catalog.create(request.into_inner().into()).await?;
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
        // proto3 has no "unset" for scalars: 0 means "the default".
        let size = (r.page_size != 0).then_some(r.page_size);
        let page = self.catalog.list(size, Some(&r.page_token)).await?;
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
