//! The telemetry ingest served in-process on an ephemeral port.

use sqlx::PgPool;

use crate::{
    common::ephemeral_listener, mqtt::require_broker, mqtt::unique_topic_prefix, running::Running,
};

/// What the harness keeps beside a running ingest.
pub struct Telemetry {
    pub settings: telemetry::Settings,
}

pub type TelemetryApp = Running<Telemetry>;

impl Running<Telemetry> {
    /// Test settings: a fresh topic prefix and client id, quick batches.
    pub fn settings() -> telemetry::Settings {
        telemetry::Settings {
            client_id: format!("ingest-{}", uuid::Uuid::now_v7().simple()),
            topic_prefix: unique_topic_prefix(),
            batch_interval_ms: 50,
            session_expiry_secs: 600,
            ..telemetry::Settings::from_env().expect("telemetry settings")
        }
    }

    /// Starts the ingest against `mqtt_url` and waits until it is ready
    /// (Postgres migrated, broker connected, subscribed).
    pub async fn start(pool: PgPool, settings: telemetry::Settings, mqtt_url: &str) -> Self {
        require_broker(mqtt_url).await;
        let app = Self::start_without_waiting(pool, settings, mqtt_url).await;
        app.wait_until_ready().await;
        app
    }

    /// Starts the ingest and returns at once, ready or not: for a test of
    /// what an ingest that cannot reach its broker says.
    pub async fn start_without_waiting(
        pool: PgPool,
        settings: telemetry::Settings,
        mqtt_url: &str,
    ) -> Self {
        let app = Telemetry {
            settings: settings.clone(),
        };
        let url = mqtt_url.to_owned();
        Running::spawn(
            ephemeral_listener().await,
            app,
            |listener, shutdown| async move {
                telemetry::serve(listener, pool, &url, settings, shutdown).await
            },
        )
    }

    pub fn topics(&self) -> telemetry::Topics {
        telemetry::Topics::new(&self.settings.topic_prefix)
    }

    /// A counter or gauge from `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> u64 {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .map_or(0, |v| v.trim().parse().unwrap())
    }
}

/// A pool that reaches `pool`'s database through a proxy the test can cut,
/// for the ingest; the test keeps `pool` itself, direct.
pub async fn pool_through_proxy(pool: &PgPool) -> (lab_core::proxy::Proxy, PgPool) {
    let options = pool.connect_options();
    let proxy =
        lab_core::proxy::Proxy::start(&format!("{}:{}", options.get_host(), options.get_port()))
            .await
            .unwrap();
    let through_proxy = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_secs(2))
        .connect_lazy_with((*options).clone().host("127.0.0.1").port(proxy.addr.port()));
    (proxy, through_proxy)
}
