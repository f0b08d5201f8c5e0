//! What travels through RabbitMQ, and the topology it travels through.
//!
//! Every event is one JSON envelope, the same whichever path sent it:
//! `{"event_id","event_type","aggregate_id","sequence","occurred_at","data"}`.
//! `sequence` numbers one order's events 1, 2, …, assigned in the order's
//! transaction: the consumer applies them in that order whatever order the
//! broker delivers them in (see [`crate::consumer`]). The
//! AMQP properties repeat what a router or a consumer needs without parsing
//! the body: `message_id` is the event id (the consumer's idempotency key),
//! the headers carry the aggregate id and event type.
//!
//! Topology: a durable topic exchange (routing key = event type), and the
//! consumer's durable queue bound to `order.*`. The queue is a quorum queue
//! because RabbitMQ then counts deliveries itself: after `x-delivery-limit`
//! attempts a message is dead-lettered to `<queue>.dlq` instead of looping.

use chrono::{DateTime, SubsecRound, Utc};
use lapin::{
    BasicProperties, Channel, ExchangeKind, PublisherConfirm,
    options::{
        BasicPublishOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, ShortString},
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub const ORDER_CREATED: &str = "order.created";
pub const ORDER_CANCELLED: &str = "order.cancelled";

/// The envelope every event travels in.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub event_id: Uuid,
    pub event_type: String,
    pub aggregate_id: Uuid,
    /// This event's place among its aggregate's events: 1, 2, … (the
    /// aggregate's version after the change, taken under its row lock).
    pub sequence: i64,
    pub occurred_at: DateTime<Utc>,
    pub data: serde_json::Value,
}

impl Event {
    pub fn new(
        event_type: &str,
        aggregate_id: Uuid,
        sequence: i64,
        data: serde_json::Value,
    ) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            event_type: event_type.to_owned(),
            aggregate_id,
            sequence,
            occurred_at: Utc::now().trunc_subsecs(6), // as Postgres will store it
            data,
        }
    }
}

/// Publishes one event body with the properties the lab promises. The
/// returned confirm resolves when the broker has taken responsibility for
/// the message (on a channel in confirm mode). `mandatory` makes an
/// unroutable message come back instead of vanishing.
pub async fn publish(
    channel: &Channel,
    exchange: &str,
    event_id: Uuid,
    event_type: &str,
    aggregate_id: Uuid,
    body: &[u8],
    mandatory: bool,
) -> lapin::Result<PublisherConfirm> {
    let mut headers = FieldTable::default();
    headers.insert(
        "aggregate_id".into(),
        AMQPValue::LongString(aggregate_id.to_string().into()),
    );
    headers.insert(
        "event_type".into(),
        AMQPValue::LongString(event_type.into()),
    );
    let properties = BasicProperties::default()
        .with_delivery_mode(2) // persistent: survives a broker restart
        .with_message_id(event_id.to_string().into())
        .with_content_type("application/json".into())
        .with_type(event_type.into())
        .with_headers(headers);
    channel
        .basic_publish(
            ShortString::from(exchange),
            ShortString::from(event_type),
            BasicPublishOptions {
                mandatory,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        )
        .await
}

/// Declares the durable topic exchange (idempotent).
pub async fn declare_exchange(channel: &Channel, exchange: &str) -> lapin::Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// The dead-letter queue's name for `queue`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// Declares the exchange, the consumer's queue bound to `order.*`, and its
/// dead-letter queue (all idempotent).
pub async fn declare_queues(
    channel: &Channel,
    exchange: &str,
    queue: &str,
    max_attempts: u32,
) -> lapin::Result<()> {
    declare_exchange(channel, exchange).await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let dlq = dead_letter_queue(queue);
    channel
        .queue_declare(dlq.as_str().into(), durable, FieldTable::default())
        .await?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    // Dead letters go through the default exchange straight to the DLQ.
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(dlq.as_str().into()),
    );
    arguments.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(max_attempts.saturating_sub(1).min(i32::MAX as u32) as i32),
    );
    channel
        .queue_declare(queue.into(), durable, arguments)
        .await?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "order.*".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Deletes the queue, its dead-letter queue and the exchange: for tests and
/// experiments that made their own.
pub async fn delete_topology(channel: &Channel, exchange: &str, queue: &str) -> lapin::Result<()> {
    for queue in [queue.to_owned(), dead_letter_queue(queue)] {
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    channel
        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await
}
