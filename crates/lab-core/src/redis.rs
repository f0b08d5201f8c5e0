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

use std::time::Duration;

use anyhow::Context;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::{http::Dependency, postgres::start_hint};

pub fn connect(url: &str) -> anyhow::Result<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(1)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_lazy_with_config(client(url)?, config)
        .context("cannot set up the Redis connection")
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
                crate::postgres::redact(url)
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
pub fn dependency(conn: ConnectionManager, url: &str) -> Dependency {
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
        Err(_) => crate::postgres::redact(url),
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
