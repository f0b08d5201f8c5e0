//! Connecting to RabbitMQ, with errors that say where and what to do.
//!
//! lapin does not reconnect unless asked to (its `enable_auto_recover` is
//! opt-in, and in-flight publisher confirms are lost on recovery either way),
//! so every long-lived user of a connection owns a loop: connect, work until
//! the connection breaks, wait with backoff, connect again. That loop is the
//! lesson of the outbox lab, so it lives there; this module only opens a
//! connection, bounded in time, and names the broker when it cannot.
//!
//! lapin sets TCP_NODELAY on its sockets itself.

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

use crate::config::{redact, start_hint};

/// How long opening a connection (TCP, AMQP handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Opens a connection to `url`, naming itself `name` in RabbitMQ's
/// management UI. The error says where the broker was expected and how to
/// start it; it never contains the password.
pub async fn connect(url: &str, name: &str) -> Result<Connection, String> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, properties)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(err)) => Err(describe(url, &err.to_string())),
        Err(_) => Err(describe(
            url,
            &format!("no answer within {CONNECT_TIMEOUT:?}"),
        )),
    }
}

/// Closes a connection politely, but gives up after a second: on a
/// connection that has already broken, lapin's close can wait forever for a
/// reply that will never come.
pub async fn close(connection: &Connection, reason: &str) {
    if !connection.status().connected() {
        return; // broken or closed already: nobody is there to answer
    }
    let closing = connection.close(200, reason.into());
    let _ = tokio::time::timeout(Duration::from_secs(1), closing).await;
}

/// Runs one broker operation (declare, channel, cancel) with the same
/// deadline as connecting: an operation on a half-dead connection must fail,
/// not hang.
pub async fn bounded<T>(
    operation: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(CONNECT_TIMEOUT, operation).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!(
            "RabbitMQ did not answer within {CONNECT_TIMEOUT:?}"
        )),
    }
}

/// "RabbitMQ is not reachable at host:port (why); start it with …".
pub fn describe(url: &str, why: &str) -> String {
    format!(
        "RabbitMQ is not reachable at {} ({why}); {}",
        where_is(url),
        start_hint("rabbitmq")
    )
}

/// `host:port`, for messages.
pub fn where_is(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(parsed) => format!(
            "{}:{}",
            parsed.host_str().unwrap_or("localhost"),
            parsed.port().unwrap_or(5672)
        ),
        Err(_) => redact(url),
    }
}

#[cfg(test)]
mod tests {
    use super::where_is;

    #[test]
    fn where_is_names_host_and_port_never_the_password() {
        assert_eq!(
            where_is("amqp://guest:secret@rabbitmq:5672/%2f"),
            "rabbitmq:5672"
        );
        assert_eq!(where_is("amqp://localhost"), "localhost:5672");
    }
}
