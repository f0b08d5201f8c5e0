//! A Redis connection for the labs.
//!
//! redis-rs's `MultiplexedConnection` never reconnects: after Redis restarts
//! every command fails until the process does. `ConnectionManager` reconnects
//! by itself (the command in flight when the connection broke still fails,
//! which the labs treat as "Redis is down right now"). It is one multiplexed
//! connection shared by every task: Redis is single-threaded, so a pool of
//! connections buys nothing but more sockets.
//!
//! The connection is lazy, so a service starts while Redis is down and
//! `/readyz` names it until it answers. Short timeouts turn a dead Redis into
//! a quick error instead of a hung request.
//!
//! `ConnectionManager` reconnects when its connection breaks, not when it
//! merely goes silent (a dropped NAT entry, a partition): then every command
//! times out for as long as TCP keeps the dead socket, which can be many
//! minutes. [`Redis`] wraps it and starts a fresh connection whenever a reply
//! times out.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use redis::{
    Cmd, Pipeline, RedisFuture, RedisResult, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
};

use crate::{config::start_hint, http::Dependency};

pub fn connect(url: &str) -> anyhow::Result<Redis> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(1)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    let client = client(url)?;
    let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
        .context("cannot set up the Redis connection")?;
    Ok(Redis {
        shared: Arc::new(Shared {
            client,
            config,
            current: Mutex::new((0, manager)),
        }),
    })
}

/// A shared Redis connection (cheap to clone, like `ConnectionManager`)
/// that is replaced when a reply times out. Use it as any connection:
/// `AsyncCommands`, `query_async`, scripts.
#[derive(Clone)]
pub struct Redis {
    shared: Arc<Shared>,
}

struct Shared {
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// The connection in use and its generation, so that several commands
    /// timing out on one dead connection replace it once.
    current: Mutex<(u64, ConnectionManager)>,
}

impl Redis {
    fn current(&self) -> (u64, ConnectionManager) {
        let current = self
            .shared
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        (current.0, current.1.clone())
    }

    /// Starts a fresh connection for the commands that follow, for when
    /// something else (a subscription that stopped answering, say) shows
    /// the way to Redis is broken.
    pub fn reconnect(&self) {
        let generation = self.current().0;
        self.replace(generation);
    }

    /// Called with each reply. (A caller that drops a command before its
    /// reply or its timeout never gets here; the next command's timeout
    /// then does the replacing.)
    fn after<T>(&self, generation: u64, result: &RedisResult<T>) {
        if let Err(err) = result
            && err.is_timeout()
        {
            self.replace(generation);
        }
        // A broken connection the manager replaces by itself.
    }

    fn replace(&self, generation: u64) {
        let mut current = self
            .shared
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if current.0 != generation {
            return; // replaced already
        }
        let fresh = ConnectionManager::new_lazy_with_config(
            self.shared.client.clone(),
            self.shared.config.clone(),
        );
        if let Ok(fresh) = fresh {
            tracing::warn!("Redis did not answer in time; using a new connection");
            *current = (generation + 1, fresh);
        }
    }
}

impl ConnectionLike for Redis {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let (generation, mut conn) = self.current();
        Box::pin(async move {
            let result = conn.req_packed_command(cmd).await;
            self.after(generation, &result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let (generation, mut conn) = self.current();
        Box::pin(async move {
            let result = conn.req_packed_commands(pipeline, offset, count).await;
            self.after(generation, &result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.current().1.get_db()
    }
}

/// A client for connections of their own (a pub/sub subscriber, say), with
/// the same settings as [`connect`].
pub fn client(url: &str) -> anyhow::Result<redis::Client> {
    use redis::IntoConnectionInfo;
    let info = url
        .into_connection_info()
        .with_context(|| {
            format!(
                "REDIS_URL is not a valid Redis URL: {}",
                crate::config::redact(url)
            )
        })?
        // redis-rs leaves Nagle's algorithm on by default: a small command
        // can then wait for the ACK of the previous packet, which delayed
        // ACKs stretch (measured here: a cache hit at ~570 µs p50 instead of
        // ~260). A cache exists to be fast; turn Nagle off.
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    redis::Client::open(info).context("cannot set up the Redis client")
}

/// The `/readyz` check: Redis answers PING.
pub fn dependency(conn: Redis, url: &str) -> Dependency {
    let place = where_is(url);
    Dependency::new("redis", move || {
        let mut conn = conn.clone();
        let place = place.clone();
        async move {
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map(|_| ())
                .map_err(|err| describe(&place, &err))
        }
    })
}

/// `host:port` of a Redis URL, for messages (never the password).
pub fn where_is(url: &str) -> String {
    match redis::Client::open(url) {
        Ok(client) => match &client.get_connection_info().addr() {
            redis::ConnectionAddr::Tcp(host, port)
            | redis::ConnectionAddr::TcpTls { host, port, .. } => {
                format!("{host}:{port}")
            }
            other => format!("{other:?}"),
        },
        Err(_) => crate::config::redact(url),
    }
}

/// Says what went wrong and, when Redis cannot be reached, how to start it.
pub fn describe(place: &str, err: &redis::RedisError) -> String {
    if is_unavailable(err) {
        format!(
            "Redis is not reachable at {place} ({err}); {}",
            start_hint("redis")
        )
    } else {
        format!("Redis at {place}: {err}")
    }
}

/// True when the error means "Redis is down, starting, or the connection
/// broke": worth a 503, not a 500.
pub fn is_unavailable(err: &redis::RedisError) -> bool {
    if matches!(
        err.code(),
        Some("LOADING" | "TRYAGAIN" | "MASTERDOWN" | "READONLY" | "CLUSTERDOWN")
    ) {
        return true;
    }
    err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
}
