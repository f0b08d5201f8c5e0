//! # Chat: WebSockets, rooms, and fan-out across instances
//!
//! HTTP asks and answers; a WebSocket stays open and both sides talk. That
//! buys a server that can push, and costs state: every connection is a
//! member of a room, holds memory, and must be looked after when the
//! client is slow, silent, or gone.
//!
//! - [`connection`]: one socket — reader, writer, rate limit, pings, the
//!   idle timeout, close codes; [`socket`] bounds what a slow client can
//!   keep waiting in the kernel, so the close frame that cuts it gets out.
//! - [`hub`]: the connections on this instance, by room, and the fan-out
//!   that never waits for a slow client.
//! - [`bus`]: events travel through Redis pub/sub, so members on two
//!   instances share a room; when Redis is down the instance keeps serving
//!   its own members, and when it is back catches its rooms up from their
//!   history.
//! - [`store`]: history (a capped Redis Stream per room), presence (a
//!   sorted set per room, one entry per connection, announced per name,
//!   or in one frame when many change at once),
//!   and the Lua scripts that change them atomically.
//! - [`protocol`]: the JSON frames.
//! - [`api`]: the HTTP side: the page, the upgrade to a WebSocket, and the
//!   rooms and history as JSON; `stats` counts for `/metrics`.
//!
//! Try it: `cargo run -p lab -- up --only chat`, then open
//! <http://localhost:8083/> or `websocat 'ws://localhost:8083/ws?room=lobby&name=ada'`.

pub mod api;
pub mod bus;
pub mod connection;
pub mod hub;
pub mod protocol;
pub mod socket;
mod stats;
pub mod store;

use std::{
    num::NonZeroU32,
    ops::Deref,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use anyhow::ensure;
use lab_core::{config::Listen, http::Dependency, metrics::Metrics};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{hub::Hub, stats::Stats, store::Store};

/// The chat lab's own settings; the Redis URL is shared with other labs and
/// lives in [`lab_core::config`].
#[derive(clap::Args, Debug, Clone)]
#[group(id = "chat_settings")]
pub struct Settings {
    /// HTTP (and WebSocket) listen address.
    #[arg(
        id = "chat_http_addr",
        value_name = "ADDR",
        long = "chat-http-addr",
        env = "CHAT_HTTP_ADDR",
        default_value = "0.0.0.0:8083"
    )]
    pub http_addr: String,
    /// This instance's name, shown in each welcome (compose runs chat-1 and chat-2).
    #[arg(
        id = "chat_instance",
        long = "chat-instance",
        env = "CHAT_INSTANCE",
        default_value = "chat"
    )]
    pub instance: String,
    /// Prepended to every Redis key and channel, so several labs or tests share one Redis.
    #[arg(
        id = "chat_key_prefix",
        long = "chat-key-prefix",
        env = "CHAT_KEY_PREFIX",
        default_value = "lab:chat:"
    )]
    pub key_prefix: String,
    /// Messages kept per room (the stream is trimmed to about this many).
    #[arg(
        id = "chat_history_len",
        long = "chat-history-len",
        env = "CHAT_HISTORY_LEN",
        default_value_t = 1000
    )]
    pub history_len: usize,
    /// Messages a connection may send per second, on average.
    #[arg(
        id = "chat_rate_per_sec",
        long = "chat-rate-per-sec",
        env = "CHAT_RATE_PER_SEC",
        default_value = "10"
    )]
    pub rate_per_sec: NonZeroU32,
    /// Messages a connection may send at once before the rate applies.
    #[arg(
        id = "chat_rate_burst",
        long = "chat-rate-burst",
        env = "CHAT_RATE_BURST",
        default_value = "20"
    )]
    pub rate_burst: NonZeroU32,
    /// Frames waiting for one client; a client whose queue is full is disconnected (1008).
    #[arg(
        id = "chat_outbound_queue",
        long = "chat-outbound-queue",
        env = "CHAT_OUTBOUND_QUEUE",
        default_value_t = 256
    )]
    pub outbound_queue: usize,
    /// How often the server pings each client and its Redis subscription.
    #[arg(
        id = "chat_ping_interval_ms",
        long = "chat-ping-interval-ms",
        env = "CHAT_PING_INTERVAL_MS",
        default_value_t = 20_000
    )]
    pub ping_interval_ms: u64,
    /// A client silent this long (not even a pong) is disconnected, and a
    /// member whose instance died leaves presence within it.
    #[arg(
        id = "chat_idle_timeout_ms",
        long = "chat-idle-timeout-ms",
        env = "CHAT_IDLE_TIMEOUT_MS",
        default_value_t = 60_000
    )]
    pub idle_timeout_ms: u64,
}

impl Settings {
    /// The settings as the environment and the defaults give them; callers
    /// change what they need with struct update syntax.
    pub fn from_env() -> anyhow::Result<Self> {
        lab_core::config::from_env()
    }

    pub fn http(&self) -> Listen {
        Listen::http("chat", &self.http_addr, "CHAT_HTTP_ADDR")
    }

    /// Every address the chat lab listens on.
    pub fn listeners(&self) -> Vec<Listen> {
        vec![self.http()]
    }

    /// How often an instance sweeps out presence entries nobody refreshes.
    pub fn sweep_interval(&self) -> Duration {
        Duration::from_millis((self.ping_interval_ms / 2).max(50))
    }

    /// How long a presence entry lives unless refreshed: an entry whose
    /// instance died is gone (swept) within the idle timeout.
    fn presence_ttl_ms(&self) -> u64 {
        self.idle_timeout_ms
            .saturating_sub(self.sweep_interval().as_millis() as u64)
    }

    fn check(&self) -> anyhow::Result<()> {
        ensure!(
            self.presence_ttl_ms() > self.ping_interval_ms,
            "CHAT_IDLE_TIMEOUT_MS ({}) must be more than 1.5 × CHAT_PING_INTERVAL_MS ({}): \
             presence is refreshed at every ping and must outlive the gap",
            self.idle_timeout_ms,
            self.ping_interval_ms
        );
        ensure!(
            self.outbound_queue > 0,
            "CHAT_OUTBOUND_QUEUE must be at least 1"
        );
        protocol::check_name("CHAT_INSTANCE", &self.instance).map_err(anyhow::Error::msg)?;
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub redis_url: String,
    pub settings: Settings,
}

/// One chat instance: its settings, its connections, its view of Redis.
#[derive(Clone)]
pub struct App(Arc<Inner>);

pub struct Inner {
    settings: Settings,
    hub: Hub,
    store: Store,
    redis_client: redis::Client,
    redis_place: String,
    /// True while the pub/sub subscription is up and this instance's
    /// presence is written; false means local-only.
    redis_up: AtomicBool,
    /// Held while this instance changes its presence in Redis (a join, a
    /// leave, the refresh, writing it all again when Redis is back), so
    /// they never interleave.
    presence: tokio::sync::Mutex<()>,
    stats: Stats,
    /// Every open WebSocket connection, so shutdown can wait for them.
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Deref for App {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl App {
    fn new(
        redis_url: &str,
        settings: Settings,
        metrics: &Metrics,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let redis = lab_core::redis::connect(redis_url)?;
        let store = Store::new(
            redis,
            &settings.key_prefix,
            settings.presence_ttl_ms(),
            settings.history_len,
        );
        Ok(Self(Arc::new(Inner {
            hub: Hub::default(),
            store,
            redis_client: lab_core::redis::client(redis_url)?,
            redis_place: lab_core::redis::where_is(redis_url),
            redis_up: AtomicBool::new(false),
            presence: tokio::sync::Mutex::new(()),
            stats: Stats::new(metrics),
            tracker: TaskTracker::new(),
            shutdown,
            settings,
        })))
    }
}

/// Runs one chat instance until `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = config.settings.http().bind().await?;
    tracing::info!(
        http = %listener.local_addr()?,
        instance = %config.settings.instance,
        "chat listening"
    );
    serve(listener, &config.redis_url, config.settings, shutdown).await
}

/// Serves on a listener the caller bound (tests bind port 0). On shutdown
/// every connection is closed with 1001 and leaves its room before this
/// returns.
pub async fn serve(
    listener: TcpListener,
    redis_url: &str,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    settings.check()?;
    let metrics = Metrics::new("chat");
    let app = App::new(redis_url, settings, &metrics, shutdown.clone())?;
    let dependencies = vec![
        lab_core::redis::dependency(app.store.redis(), redis_url),
        bus_dependency(app.clone()),
    ];
    let router = lab_core::http::service_router(api::routes(app.clone()), dependencies, metrics);

    // The bus and the presence keeper outlive the connections, so every
    // `left` is still announced while they close.
    let bus_stop = CancellationToken::new();
    // Connections are waited for only once the HTTP server has stopped: an
    // upgrade still in flight takes its tracker token before that.
    let http_done = CancellationToken::new();
    let http = {
        let (shutdown, http_done) = (shutdown.clone(), http_done.clone());
        async move {
            // lab-core's `serve`, plus a handle on each connection's socket.
            let result = lab_core::http::serve_with_connect_info::<socket::Socket>(
                listener, router, shutdown,
            )
            .await;
            http_done.cancel();
            Ok(result?)
        }
    };
    let connections = {
        let (app, bus_stop) = (app.clone(), bus_stop.clone());
        async move {
            http_done.cancelled().await;
            app.tracker.close();
            app.tracker.wait().await;
            bus_stop.cancel();
            anyhow::Ok(())
        }
    };
    lab_core::shutdown::supervise(
        &shutdown,
        vec![
            ("HTTP server", Box::pin(http)),
            ("connections", Box::pin(connections)),
            (
                "pub/sub bus",
                Box::pin(bus::subscribe(app.clone(), bus_stop.clone())),
            ),
            (
                "presence",
                Box::pin(bus::keep_presence(app.clone(), bus_stop)),
            ),
        ],
    )
    .await?;
    tracing::info!("chat stopped");
    Ok(())
}

/// `/readyz`'s second check. Redis answering is not enough: an instance not
/// yet (or no longer) subscribed to the bus serves its members alone, and a
/// load balancer should send new members elsewhere until it is back.
fn bus_dependency(app: App) -> Dependency {
    Dependency::new("redis pub/sub", move || {
        let subscribed = app.redis_up.load(std::sync::atomic::Ordering::SeqCst);
        async move {
            if subscribed {
                Ok(())
            } else {
                Err(
                    "not subscribed to the rooms' channels: members here hear only each other"
                        .into(),
                )
            }
        }
    })
}
