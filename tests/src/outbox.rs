//! The outbox lab's three services (API, relay, consumer), each served
//! in-process on an ephemeral port, and a topology of the test's own on the
//! shared broker.

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    common::{amqp_url, ephemeral_listener},
    running::Running,
};

/// One part of the outbox lab: the harness keeps nothing beside it.
pub struct OutboxPart;

/// One in-process service of the outbox lab (API, relay or consumer).
pub type Service = Running<OutboxPart>;

type Serve<F> = fn(TcpListener, PgPool, String, outbox::Settings, CancellationToken) -> F;

impl Running<OutboxPart> {
    async fn start<F>(
        serve: Serve<F>,
        pool: PgPool,
        amqp_url: &str,
        settings: &outbox::Settings,
    ) -> Self
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (amqp_url, settings) = (amqp_url.to_owned(), settings.clone());
        Running::spawn(
            ephemeral_listener().await,
            OutboxPart,
            |listener, shutdown| serve(listener, pool, amqp_url, settings, shutdown),
        )
    }

    pub async fn api(pool: PgPool, amqp_url: &str, settings: &outbox::Settings) -> Self {
        Self::start(outbox::orders::serve, pool, amqp_url, settings).await
    }

    pub async fn relay(pool: PgPool, amqp_url: &str, settings: &outbox::Settings) -> Self {
        Self::start(outbox::relay::serve, pool, amqp_url, settings).await
    }

    pub async fn consumer(pool: PgPool, amqp_url: &str, settings: &outbox::Settings) -> Self {
        Self::start(outbox::consumer::serve, pool, amqp_url, settings).await
    }
}

/// `host:port` of the test's Postgres, for a proxy to stand in front of.
pub fn postgres_addr(pool: &PgPool) -> String {
    let options = pool.connect_options();
    format!("{}:{}", options.get_host(), options.get_port())
}

/// A pool to the test's own database that goes through `proxy`: give it to
/// one relay, and the proxy can cut or silence that relay's sessions alone.
pub fn pool_through(pool: &PgPool, proxy: &lab_core::proxy::Proxy) -> PgPool {
    let options = (*pool.connect_options())
        .clone()
        .host(&proxy.addr.ip().to_string())
        .port(proxy.addr.port());
    lab_core::postgres::pool(options)
}

/// Outbox settings for one test: its own exchange and queue, quick polls
/// and quick takeovers. Deletes them from the shared broker when dropped.
pub struct OutboxTopology {
    pub settings: outbox::Settings,
}

impl OutboxTopology {
    pub fn new() -> Self {
        let name = format!("test.outbox.{}", uuid::Uuid::now_v7().simple());
        Self {
            settings: outbox::Settings {
                exchange: format!("{name}.events"),
                queue: format!("{name}.notifications"),
                relay_poll_interval_ms: 200,
                relay_lease_retry_ms: 200,
                consumer_max_attempts: 3,
                ..outbox::Settings::from_env().expect("outbox settings")
            },
        }
    }
}

impl Default for OutboxTopology {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for OutboxTopology {
    fn drop(&mut self) {
        // Drop cannot await, and may run inside a runtime: clean up on a
        // thread of its own.
        let settings = self.settings.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let Ok(connection) = lab_core::amqp::connect(&amqp_url(), "workshop-cleanup").await
                else {
                    return;
                };
                if let Ok(channel) = connection.create_channel().await {
                    let (exchange, queue) = (&settings.exchange, &settings.queue);
                    let _ = outbox::events::delete_topology(&channel, exchange, queue).await;
                }
                lab_core::amqp::close(&connection, "cleaned up").await;
            });
        })
        .join();
    }
}
