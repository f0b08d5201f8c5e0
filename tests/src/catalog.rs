//! The catalog served in-process on two ephemeral ports, REST and gRPC.

use std::net::SocketAddr;

use lab_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use sqlx::PgPool;
use tonic::transport::Channel;

use crate::{common::ephemeral_listener, running::Running};

/// What the harness keeps beside a running catalog.
pub struct Catalog {
    pub http: reqwest::Client,
    pub grpc_addr: SocketAddr,
}

/// A catalog served in-process; `addr` is its REST port.
pub type CatalogApp = Running<Catalog>;

impl Running<Catalog> {
    /// Starts the catalog on `pool` (a fresh database from `#[sqlx::test]`).
    pub async fn start(pool: PgPool) -> Self {
        let grpc_listener = ephemeral_listener().await;
        let app = Catalog {
            http: reqwest::Client::new(),
            grpc_addr: grpc_listener.local_addr().unwrap(),
        };
        Running::spawn(ephemeral_listener().await, app, |http, shutdown| {
            catalog::serve(http, grpc_listener, pool, shutdown)
        })
    }

    pub async fn grpc(&self) -> CatalogServiceClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.grpc_addr))
            .unwrap()
            .connect()
            .await
            .expect("connect to the catalog's gRPC port");
        CatalogServiceClient::new(channel)
    }
}
