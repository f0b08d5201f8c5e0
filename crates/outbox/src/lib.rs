//! # Outbox: saving a change and announcing it, without losing either
//!
//! An order service must save an order and tell the rest of the system about
//! it. "Insert, commit, then publish to RabbitMQ" is two writes to two
//! systems, and any crash, timeout or network cut between them leaves an
//! order nobody hears about. That naive path is kept on purpose
//! (`POST /orders?delivery=dual-write`) so you can watch it lose events.
//!
//! The fix has three parts, one process each in compose:
//!
//! - [`orders`] — the API writes the order *and* an event row into the
//!   `outbox` table in one Postgres transaction: both or neither.
//! - [`relay`] — publishes outbox rows to RabbitMQ and marks them published
//!   only after the broker confirms them. One relay leads (a Postgres
//!   advisory lock with a [`lease`], so a leader that dies silently is
//!   replaced in seconds); others wait as hot standbys.
//! - [`consumer`] — delivery is at least once, so the consumer remembers the
//!   event ids it has acted on and acknowledges a redelivery without acting
//!   twice, and applies each order's events in their sequence, whatever order
//!   they arrive in. Poison messages go to a dead-letter queue.
//!
//! [`chaos`] runs both paths through a TCP proxy that cuts the broker
//! connection and counts what arrived. Try it:
//! `cargo run -p lab -- chaos outbox --orders 2000`. [`stages`] lets the
//! relay and the consumer say when each event passed each step of its way,
//! which `cargo run --release -p lab -- bench outbox` prints.

pub mod chaos;
pub mod consumer;
pub mod events;
pub mod lease;
pub mod orders;
pub mod relay;
pub mod stages;

use clap::ValueEnum;
use futures::future::BoxFuture;
use lab_core::{ApiError, config::Listen, error::DependencyError};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The outbox lab's settings; the database and broker URLs are shared with
/// other labs and live in [`lab_core::config`].
#[derive(clap::Args, Debug, Clone)]
#[group(id = "outbox_settings")]
pub struct Settings {
    /// Orders API listen address.
    #[arg(
        id = "outbox_http_addr",
        value_name = "ADDR",
        long = "outbox-http-addr",
        env = "OUTBOX_HTTP_ADDR",
        default_value = "0.0.0.0:8082"
    )]
    pub http_addr: String,
    /// Relay health and metrics listen address.
    #[arg(
        long = "outbox-relay-addr",
        env = "OUTBOX_RELAY_ADDR",
        default_value = "0.0.0.0:9082"
    )]
    pub relay_addr: String,
    /// Consumer health, metrics and notifications listen address.
    #[arg(
        long = "outbox-consumer-addr",
        env = "OUTBOX_CONSUMER_ADDR",
        default_value = "0.0.0.0:9083"
    )]
    pub consumer_addr: String,
    /// The topic exchange events are published to (routing key = event type).
    #[arg(
        long = "outbox-exchange",
        env = "OUTBOX_EXCHANGE",
        default_value = "lab.events"
    )]
    pub exchange: String,
    /// The consumer's queue, bound to `order.*`; its dead letters go to `<queue>.dlq`.
    #[arg(
        long = "outbox-queue",
        env = "OUTBOX_QUEUE",
        default_value = "lab.notifications"
    )]
    pub queue: String,
    /// How the relay hears of a commit: `on`, a NOTIFY the API sends after
    /// its commits; `trigger`, one the outbox trigger sends inside each
    /// transaction; `off`, none (the relay polls only).
    #[arg(long = "outbox-notify", env = "OUTBOX_NOTIFY", value_enum, default_value_t = Notify::On)]
    pub notify: Notify,
    /// At most this many events per relay batch (and publisher-confirm window); 1 or more.
    #[arg(
        long = "relay-batch-size",
        env = "RELAY_BATCH_SIZE",
        default_value_t = 500,
        value_parser = clap::value_parser!(i64).range(1..)
    )]
    pub relay_batch_size: i64,
    /// The relay looks for events at least this often, NOTIFY or not.
    #[arg(
        long = "relay-poll-interval-ms",
        env = "RELAY_POLL_INTERVAL_MS",
        default_value_t = 1000
    )]
    pub relay_poll_interval_ms: u64,
    /// How often a standby relay tries to take the lead.
    #[arg(
        long = "relay-lease-retry-ms",
        env = "RELAY_LEASE_RETRY_MS",
        default_value_t = 1000
    )]
    pub relay_lease_retry_ms: u64,
    /// A leader whose lock session shows no sign of life for this long is
    /// replaced: a standby ends that session and takes the lead. 1000 or more.
    #[arg(
        long = "relay-lease-ttl-ms",
        env = "RELAY_LEASE_TTL_MS",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(1000..)
    )]
    pub relay_lease_ttl_ms: u64,
    /// Published outbox rows are deleted after this long.
    #[arg(
        long = "outbox-retention-secs",
        env = "OUTBOX_RETENTION_SECS",
        default_value_t = 3600
    )]
    pub retention_secs: u64,
    /// Unacknowledged messages the broker may push to the consumer at once;
    /// 1 or more. The default, 256, is the default lanes × batch size, so
    /// that every lane can fill a batch; set it again when you change those.
    #[arg(
        long = "consumer-prefetch",
        env = "CONSUMER_PREFETCH",
        default_value_t = 256,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub consumer_prefetch: u16,
    /// Transactions the consumer runs side by side (one order's events
    /// always share one); 1 or more.
    #[arg(
        long = "consumer-lanes",
        env = "CONSUMER_LANES",
        default_value_t = 4,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub consumer_lanes: u16,
    /// At most this many deliveries acted on in one consumer transaction; 1 or more.
    #[arg(
        long = "consumer-batch-size",
        env = "CONSUMER_BATCH_SIZE",
        default_value_t = 64,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub consumer_batch_size: u16,
    /// Deliveries of one message before it is dead-lettered.
    #[arg(
        long = "consumer-max-attempts",
        env = "CONSUMER_MAX_ATTEMPTS",
        default_value_t = 5
    )]
    pub consumer_max_attempts: u32,
}

impl Settings {
    /// The settings as the environment and the defaults give them; callers
    /// change what they need with struct update syntax.
    pub fn from_env() -> anyhow::Result<Self> {
        lab_core::config::from_env()
    }

    pub fn api(&self) -> Listen {
        Listen::http("outbox API", &self.http_addr, "OUTBOX_HTTP_ADDR")
    }

    pub fn relay(&self) -> Listen {
        Listen::http("outbox relay", &self.relay_addr, "OUTBOX_RELAY_ADDR")
    }

    pub fn consumer(&self) -> Listen {
        Listen::http(
            "outbox consumer",
            &self.consumer_addr,
            "OUTBOX_CONSUMER_ADDR",
        )
    }

    /// Every address the outbox lab listens on (all three roles).
    pub fn listeners(&self) -> Vec<Listen> {
        vec![self.api(), self.relay(), self.consumer()]
    }
}

/// How the relay learns that events committed (see [`orders`]).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notify {
    /// The API sends `NOTIFY outbox` after its commits, several commits to
    /// one NOTIFY.
    On,
    /// The outbox trigger sends it inside every business transaction,
    /// whose commit then holds a lock over the whole server until it is on disk.
    Trigger,
    /// No NOTIFY: the relay finds events at its next poll.
    Off,
}

/// One part of the lab. Compose runs each in its own process; `lab up` runs
/// all three in one.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Api,
    Relay,
    Consumer,
    /// API, relay and consumer in one process.
    All,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub amqp_url: String,
    pub settings: Settings,
    pub roles: Vec<Role>,
}

/// What can go wrong in the orders API, mapped once to HTTP.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// Postgres is down (503), or a query failed (500).
    #[error(transparent)]
    Dependency(#[from] DependencyError),
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match err {
            Error::Invalid { field, message } => ApiError::invalid(field, message),
            Error::NotFound(m) => ApiError::not_found(m),
            Error::Conflict(m) => ApiError::conflict(m),
            Error::Dependency(err) => err.into(),
        }
    }
}

impl axum::response::IntoResponse for Error {
    fn into_response(self) -> axum::response::Response {
        ApiError::from(self).into_response()
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Error {
    Error::Invalid {
        field,
        message: message.into(),
    }
}

/// Maps a Postgres error: down is 503, anything else is logged and opaque.
pub(crate) fn pg_error(pool: &PgPool, err: sqlx::Error) -> Error {
    DependencyError::postgres(pool, &err).into()
}

/// Runs the chosen parts until `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = lab_core::postgres::connect(&config.database_url, shutdown.clone())?;
    let all = config.roles.contains(&Role::All);
    let wants = |role| all || config.roles.contains(&role);
    let settings = config.settings;
    let mut tasks: Vec<(&'static str, futures::future::BoxFuture<'static, _>)> = Vec::new();
    if wants(Role::Api) {
        let listener = settings.api().bind().await?;
        tracing::info!(http = %listener.local_addr()?, "outbox API listening");
        let api = orders::serve(
            listener,
            pool.clone(),
            config.amqp_url.clone(),
            settings.clone(),
            shutdown.clone(),
        );
        tasks.push(("orders API", Box::pin(api)));
    }
    if wants(Role::Relay) {
        let listener = settings.relay().bind().await?;
        tracing::info!(http = %listener.local_addr()?, "outbox relay listening");
        let relay = relay::serve(
            listener,
            pool.clone(),
            config.amqp_url.clone(),
            settings.clone(),
            shutdown.clone(),
        );
        tasks.push(("relay", Box::pin(relay)));
    }
    if wants(Role::Consumer) {
        let listener = settings.consumer().bind().await?;
        tracing::info!(http = %listener.local_addr()?, "outbox consumer listening");
        let consumer = consumer::serve(
            listener,
            pool.clone(),
            config.amqp_url.clone(),
            settings.clone(),
            shutdown.clone(),
        );
        tasks.push(("consumer", Box::pin(consumer)));
    }
    lab_core::shutdown::supervise(&shutdown, tasks).await?;
    tracing::info!("outbox stopped");
    Ok(())
}

/// The `/readyz` check for RabbitMQ: a connection opens (and is closed again).
/// The relay or the consumer: a loop that talks to Postgres and RabbitMQ,
/// served next to an HTTP port of its own (its routes, `/healthz`, `/readyz`
/// naming both, `/metrics`) and supervised with it: a failure of either
/// stops both.
pub(crate) struct Worker {
    name: &'static str,
    work: BoxFuture<'static, anyhow::Result<()>>,
    dependencies: Vec<lab_core::http::Dependency>,
    metrics: std::sync::Arc<lab_core::metrics::Metrics>,
}

impl Worker {
    pub(crate) fn new(
        name: &'static str,
        work: impl Future<Output = anyhow::Result<()>> + Send + 'static,
        pool: PgPool,
        amqp_url: String,
        metrics: std::sync::Arc<lab_core::metrics::Metrics>,
    ) -> Self {
        Self {
            name,
            work: Box::pin(work),
            dependencies: vec![
                lab_core::postgres::dependency(pool),
                broker_dependency(amqp_url),
            ],
            metrics,
        }
    }

    pub(crate) async fn serve(
        self,
        listener: tokio::net::TcpListener,
        routes: axum::Router,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let router = lab_core::http::service_router(routes, self.dependencies, self.metrics);
        let http = lab_core::http::serve(listener, router, shutdown.clone());
        lab_core::shutdown::supervise(
            &shutdown,
            vec![
                ("its HTTP server", Box::pin(async move { Ok(http.await?) })),
                (self.name, self.work),
            ],
        )
        .await
    }
}

/// The `/readyz` check: a connection to RabbitMQ opens (and is closed).
pub(crate) fn broker_dependency(amqp_url: String) -> lab_core::http::Dependency {
    lab_core::http::Dependency::new("rabbitmq", move || {
        let url = amqp_url.clone();
        async move {
            let connection = lab_core::amqp::connect(&url, "outbox-readyz").await?;
            lab_core::amqp::close(&connection, "readiness probe done").await;
            Ok(())
        }
    })
}
