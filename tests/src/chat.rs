//! Chat instances served in-process on ephemeral ports; instances that
//! share a key prefix share rooms, as compose's two instances do.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    common::{redis_connection, redis_url, unique_prefix, wait_ready},
    running::{RedisKeys, Running},
};

/// What the harness keeps beside a running chat instance.
pub struct Chat {
    pub prefix: String,
}

pub type ChatApp = Running<Chat>;

impl RedisKeys for Chat {
    fn key_prefix(&self) -> &str {
        &self.prefix
    }
}

fn ws_url(addr: SocketAddr, room: &str, name: &str) -> String {
    format!("ws://{addr}/ws?room={room}&name={name}")
}

impl Running<Chat> {
    /// Test settings: a fresh prefix, the production limits and timings.
    pub fn settings() -> chat::Settings {
        chat::Settings {
            instance: "test".into(),
            key_prefix: unique_prefix("chat"),
            ..chat::Settings::from_env().expect("chat settings")
        }
    }

    pub async fn start(settings: chat::Settings) -> Self {
        Self::start_at("127.0.0.1:0", settings, &redis_url()).await
    }

    /// Starts the service against `service_redis_url` (a proxy, say).
    pub async fn start_with_redis(settings: chat::Settings, service_redis_url: &str) -> Self {
        Self::start_at("127.0.0.1:0", settings, service_redis_url).await
    }

    /// Starts the service on `addr`: a restart on the port it had before.
    pub async fn start_at(addr: &str, settings: chat::Settings, service_redis_url: &str) -> Self {
        redis_connection(&redis_url()).await; // fail early, saying how to start Redis
        let listener = TcpListener::bind(addr).await.unwrap();
        let app = Chat {
            prefix: settings.key_prefix.clone(),
        };
        let redis = service_redis_url.to_owned();
        let running = Running::spawn(listener, app, |listener, shutdown| async move {
            chat::serve(listener, &redis, settings, shutdown).await
        });
        // Ready means Redis answers and the pub/sub bus is subscribed, so
        // a test's first join goes through Redis.
        running.wait_until_ready().await;
        running
    }

    pub fn ws_url(&self, room: &str, name: &str) -> String {
        ws_url(self.addr, room, name)
    }
}

/// A chat instance on a runtime of its own, which a test can crash: the
/// runtime is dropped with every task on it, so no connection closes
/// cleanly and no member leaves; the process just stops answering, as a
/// killed pod would.
pub struct CrashableChat {
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl CrashableChat {
    /// Starts it and waits until it is subscribed to the rooms' channels.
    pub async fn start(settings: chat::Settings) -> Self {
        Self::start_with_redis(settings, &redis_url()).await
    }

    /// Starts it against `service_redis_url` (a proxy, say).
    pub async fn start_with_redis(settings: chat::Settings, service_redis_url: &str) -> Self {
        redis_connection(&redis_url()).await; // fail early, saying how to start Redis
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let redis = service_redis_url.to_owned();
        runtime.spawn(async move {
            let listener = TcpListener::from_std(listener)?;
            chat::serve(listener, &redis, settings, CancellationToken::new()).await
        });
        let chat = Self {
            addr,
            runtime: Some(runtime),
        };
        wait_ready(&format!("http://{addr}")).await;
        chat
    }

    pub fn ws_url(&self, room: &str, name: &str) -> String {
        ws_url(self.addr, room, name)
    }

    /// Drops the runtime: see [`CrashableChat`].
    pub fn crash(self) {
        drop(self);
    }
}

impl Drop for CrashableChat {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
