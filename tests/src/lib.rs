//! Helpers for the workshop tests: start a lab service in this process on
//! port 0 against the real backing services, and talk to it with real
//! clients. Each test gets its own database from `#[sqlx::test]`.

use std::net::SocketAddr;

use lab_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use sqlx::PgPool;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// A catalog served in-process on two ephemeral ports.
pub struct CatalogApp {
    pub rest: String,
    pub grpc_addr: SocketAddr,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl CatalogApp {
    /// Starts the catalog on `pool` (a fresh database from `#[sqlx::test]`).
    pub async fn start(pool: PgPool) -> Self {
        let http_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let rest = format!("http://{}", http_listener.local_addr().unwrap());
        let grpc_addr = grpc_listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(catalog::serve(
            http_listener,
            grpc_listener,
            pool,
            shutdown.clone(),
        ));
        Self {
            rest,
            grpc_addr,
            http: reqwest::Client::new(),
            shutdown,
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.rest)
    }

    pub async fn grpc(&self) -> CatalogServiceClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.grpc_addr))
            .unwrap()
            .connect()
            .await
            .expect("connect to the catalog's gRPC port");
        CatalogServiceClient::new(channel)
    }

    /// Fires the shutdown token, the way SIGTERM does in the binary.
    pub fn trigger_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Triggers shutdown and waits for `serve` to drain and return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.take().expect("stopped once").await?
    }
}

impl Drop for CatalogApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A local port with nothing listening on it.
pub async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}
