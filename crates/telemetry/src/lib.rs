//! # Telemetry: many small, flaky devices over MQTT
//!
//! Thermostats publish readings to Mosquitto; an ingest service stores them
//! in Postgres. MQTT's features exist for exactly this kind of fleet, and
//! each one shows here:
//!
//! - **QoS 1** and **persistent sessions**: a reading is delivered at least
//!   once, even across an ingest restart or a network cut ([`ingest`]),
//!   and acknowledged only after commit, on the connection it came on.
//! - **QoS 0** (`TELEMETRY_QOS=0`): at most once, and the ingest says how
//!   often it was none: beyond `INGEST_QOS0_INBOX` waiting messages it sheds
//!   them and counts them (the `inbox` module says why not refuse QoS 0).
//! - **Retained status and last will**: `devices/{id}/status` says `online`
//!   when a device connects, `offline` when it says goodbye, and the broker
//!   says `lost` for it when it vanishes without one ([`device`]).
//! - **Shared subscriptions** (`$share/ingest/…`): several ingest instances
//!   split the stream between them; one stopped cleanly leaves the group
//!   and ends its session, one that crashed keeps its share for its return.
//!   One ingest alone subscribes plainly, which Mosquitto keeps across its
//!   own restart, as it does not keep a shared one ([`session`]).
//! - **Commands back** to a device on `devices/{id}/commands`, acknowledged
//!   on `devices/{id}/acks` by that device only, or expired when it does not
//!   in time (the `commands` module); **alerts** on `alerts/{id}`.
//! - **Untrusted topics**: the device id in a topic is checked like one in
//!   a path; what fails a check is kept, for a while, as a reject, for
//!   people to read at `GET /rejects` (the `rejects` module).
//!
//! Try it: `cargo run -p lab -- up --only telemetry`, then
//! `cargo run -p lab -- sim devices`, then <http://localhost:8084/>. The
//! lab's own broker, to stop and kill, runs natively with
//! `cargo run -p lab -- broker` ([`broker`]).

pub mod api;
pub mod broker;
mod commands;
pub mod device;
mod inbox;
pub mod ingest;
pub mod mqtt;
pub mod payload;
mod rejects;
pub mod session;
pub mod sim;

use std::{
    ops::Deref,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use lab_core::{config::Listen, http::Dependency, metrics::Metrics};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};
use rumqttc::v5::{AsyncClient, mqttbytes::QoS};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use crate::mqtt::{Broker, Topics};

/// The ingest's own settings; the database and broker URLs are shared with
/// other labs and live in [`lab_core::config`].
#[derive(clap::Args, Debug, Clone)]
#[group(id = "telemetry_settings")]
pub struct Settings {
    /// HTTP listen address (REST and the dashboard).
    #[arg(
        id = "telemetry_http_addr",
        value_name = "ADDR",
        long = "telemetry-http-addr",
        env = "TELEMETRY_HTTP_ADDR",
        default_value = "0.0.0.0:8084"
    )]
    pub http_addr: String,
    /// This instance's MQTT client id: the broker keeps its session under it,
    /// so each instance needs its own, and the same one after a restart.
    #[arg(
        id = "telemetry_client_id",
        long = "telemetry-client-id",
        env = "TELEMETRY_CLIENT_ID",
        default_value = "ingest-1"
    )]
    pub client_id: String,
    /// Prepended to every topic, so tests (and several labs) share one broker.
    #[arg(
        id = "telemetry_topic_prefix",
        long = "telemetry-topic-prefix",
        env = "TELEMETRY_TOPIC_PREFIX",
        default_value = ""
    )]
    pub topic_prefix: String,
    /// The shared-subscription group: instances in one group split the
    /// stream. Empty (the default, for one instance): plain subscriptions,
    /// which the broker keeps in the session across its own restart (a
    /// shared one, Mosquitto 2.0 does not; see `ingest`).
    #[arg(
        id = "telemetry_share_group",
        long = "telemetry-share-group",
        env = "TELEMETRY_SHARE_GROUP",
        default_value = ""
    )]
    pub share_group: String,
    /// QoS of the telemetry subscription: 1 (at least once) or 0 (at most once).
    #[arg(
        id = "telemetry_qos",
        long = "telemetry-qos",
        env = "TELEMETRY_QOS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u8).range(0..=1)
    )]
    pub qos: u8,
    /// At QoS 0, messages the inbox holds at most while the batcher is busy
    /// (Postgres slow or down); beyond that they are dropped and counted in
    /// `telemetry_shed_total`. QoS 1 needs no such bound: the broker's
    /// receive maximum is one.
    #[arg(
        id = "ingest_qos0_inbox",
        long = "ingest-qos0-inbox",
        env = "INGEST_QOS0_INBOX",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub qos0_inbox: u64,
    /// Readings written per transaction at most.
    #[arg(
        id = "ingest_batch_size",
        long = "ingest-batch-size",
        env = "INGEST_BATCH_SIZE",
        default_value_t = 500
    )]
    pub batch_size: usize,
    /// A batch is written at the latest this long after its first reading.
    #[arg(
        id = "ingest_batch_interval_ms",
        long = "ingest-batch-interval-ms",
        env = "INGEST_BATCH_INTERVAL_MS",
        default_value_t = 200
    )]
    pub batch_interval_ms: u64,
    /// How long the broker keeps the ingest's session (and queues its share
    /// for it) after a crash. A clean stop ends the session at once. Five
    /// minutes: longer than a restart takes (compose's restart, Kubernetes'
    /// longest crash-loop back-off), short enough that the share of an
    /// instance that never returns waits minutes, not an hour.
    #[arg(
        id = "ingest_session_expiry_secs",
        long = "ingest-session-expiry-secs",
        env = "INGEST_SESSION_EXPIRY_SECS",
        default_value_t = 300
    )]
    pub session_expiry_secs: u32,
    /// Rejected payloads older than this are deleted (by every ingest
    /// instance, every tenth of it, at most hourly): a fleet that sends
    /// garbage must not grow the table without end.
    #[arg(
        id = "telemetry_rejects_retention_secs",
        long = "telemetry-rejects-retention-secs",
        env = "TELEMETRY_REJECTS_RETENTION_SECS",
        default_value_t = 7 * 86_400,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub rejects_retention_secs: u64,
    /// A reading above this is high.
    #[arg(
        id = "alert_threshold_c",
        long = "alert-threshold-c",
        env = "ALERT_THRESHOLD_C",
        default_value_t = 30.0
    )]
    pub alert_threshold_c: f64,
    /// This many high readings in a row raise an alert.
    #[arg(
        id = "alert_consecutive",
        long = "alert-consecutive",
        env = "ALERT_CONSECUTIVE",
        default_value_t = 3
    )]
    pub alert_consecutive: u32,
}

impl Settings {
    /// The settings as the environment and the defaults give them; callers
    /// change what they need with struct update syntax.
    pub fn from_env() -> anyhow::Result<Self> {
        lab_core::config::from_env()
    }

    pub fn http(&self) -> Listen {
        Listen::http("telemetry", &self.http_addr, "TELEMETRY_HTTP_ADDR")
    }

    /// Every address the ingest listens on.
    pub fn listeners(&self) -> Vec<Listen> {
        vec![self.http()]
    }

    fn qos(&self) -> QoS {
        if self.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        }
    }

    /// Unacknowledged QoS 1 messages the broker may send at once: two
    /// batches, so one can be written while the next fills.
    fn receive_maximum(&self) -> u16 {
        (self.batch_size.max(1) * 2).min(u16::MAX as usize) as u16
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub mqtt_url: String,
    pub settings: Settings,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionLabel {
    session: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// The ingest's Prometheus metrics.
pub(crate) struct Stats {
    mqtt_connected: Gauge,
    received: Family<KindLabel, Counter>,
    stored: Counter,
    duplicates: Counter,
    rejected: Counter,
    batches: Counter,
    alerts: Counter,
    connects: Family<SessionLabel, Counter>,
    acks_withheld: Counter,
    inbox: Arc<inbox::Counts>,
}

impl Stats {
    fn new(metrics: &Metrics) -> Self {
        let stats = Self {
            mqtt_connected: Gauge::default(),
            received: Family::default(),
            stored: Counter::default(),
            duplicates: Counter::default(),
            rejected: Counter::default(),
            batches: Counter::default(),
            alerts: Counter::default(),
            connects: Family::default(),
            acks_withheld: Counter::default(),
            inbox: Arc::default(),
        };
        metrics.register(
            "mqtt_connected",
            "Whether the ingest is connected to the broker (1) or not (0)",
            stats.mqtt_connected.clone(),
        );
        metrics.register(
            "messages_received",
            "Publishes received, by kind",
            stats.received.clone(),
        );
        metrics.register(
            "readings_stored",
            "Readings written (new rows)",
            stats.stored.clone(),
        );
        metrics.register(
            "duplicates",
            "Readings already stored (QoS 1 redeliveries), dropped",
            stats.duplicates.clone(),
        );
        metrics.register(
            "rejected",
            "Payloads refused and kept in the rejects table",
            stats.rejected.clone(),
        );
        metrics.register("batches", "Transactions written", stats.batches.clone());
        metrics.register("alerts", "Alerts raised", stats.alerts.clone());
        metrics.register(
            "connects",
            "Connections to the broker, by whether it still had the ingest's session (resumed) or not (new)",
            stats.connects.clone(),
        );
        metrics.register(
            "acks_withheld",
            "Acks not sent because their message came on an earlier connection (the broker sends it again if it kept the session)",
            stats.acks_withheld.clone(),
        );
        metrics.register(
            "inbox",
            "Messages received and waiting for the batcher",
            stats.inbox.waiting.clone(),
        );
        metrics.register(
            "shed",
            "QoS 0 messages dropped because the inbox held INGEST_QOS0_INBOX already",
            stats.inbox.shed.clone(),
        );
        stats
    }

    fn connected(&self, session: &str) {
        self.connects
            .get_or_create(&SessionLabel {
                session: session.into(),
            })
            .inc();
    }

    /// Readings (telemetry publishes) received by this instance.
    fn received_readings(&self) -> u64 {
        self.received
            .get_or_create(&KindLabel {
                kind: "telemetry".into(),
            })
            .get()
    }

    fn received(&self, kind: &str) {
        self.received
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }
}

/// One ingest instance.
#[derive(Clone)]
pub struct App(Arc<Inner>);

pub struct Inner {
    settings: Settings,
    pool: PgPool,
    client: AsyncClient,
    broker: Broker,
    topics: Topics,
    mqtt_up: AtomicBool,
    /// Something taken from the broker was not stored: on a clean stop the
    /// session is kept (not ended) so that it is sent again.
    keep_session: AtomicBool,
    /// The broker connection messages arrive on now: a number the client
    /// task raises each time a connection ends. Held while an ack is queued,
    /// so that no ack for one connection is queued once the next has begun
    /// (see [`ingest`]).
    connection: Mutex<u64>,
    /// Why the broker is not reachable, for `/readyz`.
    mqtt_error: Mutex<Option<String>>,
    stats: Stats,
    shutdown: CancellationToken,
}

impl Deref for App {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl App {
    fn mqtt_up(&self) -> bool {
        self.mqtt_up.load(Ordering::SeqCst)
    }

    fn set_mqtt_up(&self, up: bool, error: Option<String>) {
        self.mqtt_up.store(up, Ordering::SeqCst);
        self.stats.mqtt_connected.set(i64::from(up));
        *self.mqtt_error.lock().expect("mqtt error lock") = error;
    }

    /// The `/readyz` check: connected and subscribed, or why not.
    fn mosquitto(&self) -> Dependency {
        let app = self.clone();
        Dependency::new("mosquitto", move || {
            let result = if app.mqtt_up() {
                Ok(())
            } else {
                Err(app
                    .mqtt_error
                    .lock()
                    .expect("mqtt error lock")
                    .clone()
                    .unwrap_or_else(|| "not connected".into()))
            };
            async move { result }
        })
    }
}

/// Runs the ingest until `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = lab_core::postgres::connect(&config.database_url, shutdown.clone())?;
    let listener = config.settings.http().bind().await?;
    tracing::info!(http = %listener.local_addr()?, client_id = %config.settings.client_id, "telemetry ingest listening");
    serve(listener, pool, &config.mqtt_url, config.settings, shutdown).await
}

/// Serves on a listener the caller bound (tests bind port 0). On shutdown
/// the batch in hand is written and acknowledged before the client
/// disconnects.
pub async fn serve(
    listener: TcpListener,
    pool: PgPool,
    mqtt_url: &str,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let broker = Broker::parse(mqtt_url)?;
    let (client, eventloop) = session::client(&broker, &settings);
    let metrics = Metrics::new("telemetry");
    let qos0_max = usize::try_from(settings.qos0_inbox).unwrap_or(usize::MAX);
    let app = App(Arc::new(Inner {
        topics: Topics::new(&settings.topic_prefix),
        settings,
        pool: pool.clone(),
        client,
        broker,
        mqtt_up: AtomicBool::new(false),
        keep_session: AtomicBool::new(false),
        connection: Mutex::new(0),
        mqtt_error: Mutex::new(Some("not connected yet".into())),
        stats: Stats::new(&metrics),
        shutdown: shutdown.clone(),
    }));
    let (inbox_tx, inbox) = inbox::channel(app.stats.inbox.clone(), qos0_max);
    let dependencies = vec![lab_core::postgres::dependency(pool), app.mosquitto()];
    let router = lab_core::http::service_router(api::routes(app.clone()), dependencies, metrics);

    // On shutdown the client leaves the share group first (`unsubscribed`),
    // then the batcher stores what came, and the client outlives it, so the
    // last batch's acks go out.
    let unsubscribed = CancellationToken::new();
    let client_stop = CancellationToken::new();
    let http = lab_core::http::serve(listener, router, shutdown.clone());
    let batcher = {
        let (app, client_stop, shutdown) = (app.clone(), client_stop.clone(), shutdown.clone());
        let unsubscribed = unsubscribed.clone();
        async move {
            let result = ingest::run_batcher(app, inbox, unsubscribed, shutdown).await;
            // Let the acks queued by the last batch reach the event loop.
            tokio::time::sleep(Duration::from_millis(100)).await;
            client_stop.cancel();
            result
        }
    };
    lab_core::shutdown::supervise(
        &shutdown,
        vec![
            ("HTTP server", Box::pin(async move { Ok(http.await?) })),
            (
                "MQTT client",
                Box::pin(session::run_client(
                    app.clone(),
                    eventloop,
                    inbox_tx,
                    unsubscribed,
                    client_stop,
                )),
            ),
            ("batcher", Box::pin(batcher)),
            (
                "rejects pruner",
                Box::pin(rejects::run_pruner(app.clone(), shutdown.clone())),
            ),
        ],
    )
    .await?;
    tracing::info!("telemetry ingest stopped");
    Ok(())
}
