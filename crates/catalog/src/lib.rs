//! # REST vs gRPC: one catalog, two transports
//!
//! The same product catalog is served twice: as JSON over HTTP (axum, port
//! 8080, HTTP/1.1 and HTTP/2 cleartext) and as protobuf over HTTP/2 (tonic,
//! port 50051). Both transports call one domain core ([`domain::Catalog`]),
//! so a product written over one reads back identically over the other, and
//! `lab bench catalog` compares the transports rather than two code bases.
//!
//! Try it: `cargo run -p lab -- up --only catalog`, then the curl and grpcurl
//! lines in docs/labs/catalog.md.

pub mod domain;
pub mod grpc;
pub mod rest;

use std::time::Duration;

use lab_core::{config::Listen, http::Dependency, metrics::Metrics};
use lab_proto::catalog::v1::catalog_service_server::CatalogServiceServer;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

pub use domain::Catalog;

/// The catalog's own settings: where it listens. Shared settings (the
/// database) live in [`lab_core::config`], so `lab up` can flatten several
/// labs side by side.
#[derive(clap::Args, Debug, Clone)]
#[group(id = "catalog_settings")]
pub struct Settings {
    /// REST listen address (HTTP/1.1 and HTTP/2 cleartext).
    #[arg(
        id = "catalog_http_addr",
        value_name = "ADDR",
        long = "catalog-http-addr",
        env = "CATALOG_HTTP_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    pub http_addr: String,
    /// gRPC listen address.
    #[arg(
        id = "catalog_grpc_addr",
        value_name = "ADDR",
        long = "catalog-grpc-addr",
        env = "CATALOG_GRPC_ADDR",
        default_value = "0.0.0.0:50051"
    )]
    pub grpc_addr: String,
}

impl Settings {
    /// The settings as the environment and the defaults give them; callers
    /// change what they need with struct update syntax.
    pub fn from_env() -> anyhow::Result<Self> {
        lab_core::config::from_env()
    }

    pub fn rest(&self) -> Listen {
        Listen::http("catalog REST", &self.http_addr, "CATALOG_HTTP_ADDR")
    }

    pub fn grpc(&self) -> Listen {
        Listen::grpc("catalog gRPC", &self.grpc_addr, "CATALOG_GRPC_ADDR")
    }

    /// Every address the catalog listens on.
    pub fn listeners(&self) -> Vec<Listen> {
        vec![self.rest(), self.grpc()]
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub settings: Settings,
}

/// Runs the catalog until `shutdown` fires, then drains and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = lab_core::postgres::connect(&config.database_url, shutdown.clone())?;
    let http = config.settings.rest().bind().await?;
    let grpc = config.settings.grpc().bind().await?;
    tracing::info!(
        rest = %http.local_addr()?,
        grpc = %grpc.local_addr()?,
        "catalog listening"
    );
    serve(http, grpc, pool, shutdown).await
}

/// Serves both transports on listeners the caller bound (tests bind port 0).
pub async fn serve(
    http: TcpListener,
    grpc: TcpListener,
    pool: PgPool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let catalog = Catalog::new(pool.clone());
    let metrics = Metrics::new("catalog");
    let dependencies = vec![lab_core::postgres::dependency(pool)];

    let router = lab_core::http::service_router(
        rest::routes(catalog.clone()),
        dependencies.clone(),
        metrics.clone(),
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    // The first status is known before the port opens, so a health check
    // made right after start never sees "unknown service".
    let serving = set_health(&health, &dependencies).await;
    tokio::spawn(report_health(
        health,
        serving,
        dependencies,
        shutdown.clone(),
    ));
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(lab_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(lab_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let grpc_server = tonic::transport::Server::builder()
        .layer(metrics.grpc_layer())
        .layer(tower::util::MapResponseLayer::new(
            grpc::decode_errors_are_invalid_argument,
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(grpc::Grpc::server(catalog))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(grpc).with_nodelay(Some(true)),
            shutdown.clone().cancelled_owned(),
        );
    let http_server = lab_core::http::serve(http, router, shutdown.clone());

    lab_core::shutdown::supervise(
        &shutdown,
        vec![
            (
                "REST server",
                Box::pin(async move { Ok(http_server.await?) }),
            ),
            (
                "gRPC server",
                Box::pin(async move { Ok(grpc_server.await?) }),
            ),
        ],
    )
    .await?;
    tracing::info!("catalog stopped");
    Ok(())
}

/// Keeps `grpc.health.v1.Health` in step with `/readyz`: SERVING while
/// Postgres answers, NOT_SERVING while it does not and once shutdown starts.
async fn report_health(
    reporter: tonic_health::server::HealthReporter,
    mut serving: bool,
    dependencies: Vec<Dependency>,
    shutdown: CancellationToken,
) {
    loop {
        // Look again soon while not serving (the database may be migrating),
        // calmly once it is.
        let interval = if serving {
            HEALTH_INTERVAL
        } else {
            HEALTH_INTERVAL / 5
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(interval) => {}
        }
        serving = set_health(&reporter, &dependencies).await;
    }
    for service in ["", SERVICE_NAME] {
        reporter
            .set_service_status(service, ServingStatus::NotServing)
            .await;
    }
}

/// How often the gRPC health status is refreshed from the readiness probes.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

const SERVICE_NAME: &str = <CatalogServiceServer<grpc::Grpc> as tonic::server::NamedService>::NAME;

async fn set_health(
    reporter: &tonic_health::server::HealthReporter,
    dependencies: &[Dependency],
) -> bool {
    let mut ready = true;
    for dependency in dependencies {
        ready &= dependency.check().await.is_ok();
    }
    let status = if ready {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for service in ["", SERVICE_NAME] {
        reporter.set_service_status(service, status).await;
    }
    ready
}
