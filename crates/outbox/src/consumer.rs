//! The consumer: at-least-once in, effectively-once and in order out.
//!
//! The relay may publish an event twice (it crashed after the broker
//! confirmed but before it marked the row), and the broker redelivers every
//! message that was not acknowledged when a connection broke. So the
//! consumer records each event id it acts on in `processed_events`, in the
//! same transaction as its side effect (a row in `notifications`). A
//! redelivered event finds its id there, and is acknowledged without acting
//! twice. The ack is sent only after the commit: a crash between the two
//! means one more redelivery, never a lost event.
//!
//! **Order is kept here, not on the wire.** The broker can deliver an
//! order's `order.cancelled` before its `order.created`: the relay's
//! confirms are per message, so the broker can refuse or return the
//! creation (a nack, or no queue bound for it) after it has already
//! delivered the cancellation, and the relay publishes the creation again
//! later; and when this consumer fails on the creation and requeues it, the
//! cancellation may already be in its hands (prefetched). So every event
//! carries its order's `sequence` (1, 2, …, given in the order's
//! transaction), and `order_progress` holds the last sequence applied per
//! order, its row lock taking one order's events in turn across consumers.
//! An event applies only as the successor of the last one applied. One that
//! arrives early is *parked*: written to `parked_events` and acknowledged.
//! When its predecessor is applied, the same transaction applies every
//! parked successor that now follows.
//!
//! Rejected: requeueing an early event until its predecessor is there. A
//! requeue comes straight back, so it spins, and each spin is a delivery
//! attempt: after `CONSUMER_MAX_ATTEMPTS` the broker dead-letters the event,
//! and its effect is lost while the predecessor may be a second away. Also
//! rejected: holding it in memory, unacknowledged, which fills the prefetch
//! window with waiting messages and is lost with the process. The price of
//! parking: a successor whose predecessor never comes (lost by the
//! dual-write path, or dead-lettered) waits in `parked_events` for good, in
//! plain sight (`/stats` counts parked events), never applied out of order.
//!
//! Messages are handled in a few lanes at once, chosen by the aggregate id
//! header, so events of one order stay in one lane while different orders
//! proceed side by side. A message that can never be handled (malformed
//! JSON, an unknown event type) is rejected to the dead-letter queue at
//! once; one that fails for another reason is requeued, and RabbitMQ
//! dead-letters it after `CONSUMER_MAX_ATTEMPTS` deliveries. While Postgres
//! is down the consumer waits rather than burning attempts.

use std::{
    hash::{Hash, Hasher},
    sync::Arc,
};

use axum::{Router, extract::State, routing::get};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use lab_core::{Json, Query, metrics::Metrics};
use lapin::{
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
        BasicQosOptions, BasicRejectOptions,
    },
    types::{AMQPValue, FieldTable},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use tokio::{net::TcpListener, sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    Settings,
    events::{self, Event, ORDER_CANCELLED, ORDER_CREATED},
};
use lab_core::backoff::Backoff;
use lab_core::openapi::ErrorBody;
use utoipa::{IntoParams, OpenApi, ToSchema};

/// Deliveries handled side by side (one order's events always share a lane).
const LANES: usize = 4;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabel {
    delivery: String,
}

/// The consumer's counters, also served as JSON on `GET /stats`.
#[derive(Default)]
pub struct ConsumerStats {
    handled: Counter,
    duplicates: Family<PathLabel, Counter>,
    dead_lettered: Counter,
    requeued: Counter,
    parked: Counter,
    connected: Gauge,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StatsBody {
    pub broker_connected: bool,
    pub handled: u64,
    pub duplicates_suppressed: u64,
    pub dead_lettered: u64,
    pub requeued: u64,
    /// Events that arrived before their predecessor and waited for it.
    pub parked: u64,
}

impl ConsumerStats {
    /// Redeliveries suppressed for orders whose events took `delivery` path.
    pub fn duplicates(&self, delivery: &str) -> u64 {
        self.duplicates
            .get_or_create(&PathLabel {
                delivery: delivery.to_owned(),
            })
            .get()
    }

    /// True while connected to the broker with the queue declared.
    pub fn connected(&self) -> bool {
        self.connected.get() == 1
    }

    pub fn body(&self) -> StatsBody {
        StatsBody {
            broker_connected: self.connected(),
            handled: self.handled.get(),
            duplicates_suppressed: ["outbox", "dual-write", "unknown"]
                .iter()
                .map(|path| self.duplicates(path))
                .sum(),
            dead_lettered: self.dead_lettered.get(),
            requeued: self.requeued.get(),
            parked: self.parked.get(),
        }
    }
}

/// The part of an order event's `data` the consumer needs.
#[derive(Deserialize)]
struct OrderData {
    id: Uuid,
    customer_id: String,
    total_cents: i64,
    items: Vec<serde_json::Value>,
    #[serde(default)]
    delivery: Option<String>,
}

enum Outcome {
    /// Applied, with this many parked successors it released.
    Handled(u64),
    Duplicate(String),
    /// Arrived before its predecessor: kept in `parked_events`.
    Parked,
    /// Can never succeed: straight to the dead-letter queue.
    Poison(String),
    /// Failed this time: requeue (RabbitMQ bounds the attempts).
    Failed(String),
    /// Shutting down while Postgres is away: leave it unacknowledged, the
    /// broker delivers it again to whoever consumes next.
    Abandoned,
}

#[derive(Clone)]
pub struct Consumer {
    pool: PgPool,
    amqp_url: String,
    settings: Arc<Settings>,
    stats: Arc<ConsumerStats>,
}

impl Consumer {
    pub fn new(pool: PgPool, amqp_url: String, settings: Settings, metrics: &Metrics) -> Self {
        let stats = Arc::new(ConsumerStats::default());
        metrics.register("handled", "Events acted on", stats.handled.clone());
        metrics.register(
            "duplicates_suppressed",
            "Redelivered events acknowledged without acting twice, by the order's delivery path",
            stats.duplicates.clone(),
        );
        metrics.register(
            "dead_lettered",
            "Messages sent to the dead-letter queue",
            stats.dead_lettered.clone(),
        );
        metrics.register(
            "requeued",
            "Messages that failed and were requeued",
            stats.requeued.clone(),
        );
        metrics.register(
            "parked",
            "Events that arrived before their predecessor and were kept until it was applied",
            stats.parked.clone(),
        );
        metrics.register(
            "broker_connected",
            "1 while the consumer has a RabbitMQ connection",
            stats.connected.clone(),
        );
        Self {
            pool,
            amqp_url,
            settings: Arc::new(settings),
            stats,
        }
    }

    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.stats.clone()
    }

    /// Consumes until `shutdown` fires, reconnecting with backoff whenever
    /// the broker connection breaks.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut backoff = Backoff::reconnect();
        while !shutdown.is_cancelled() {
            let mut connected = false;
            match self.consume_until_broken(&shutdown, &mut connected).await {
                Ok(()) => return Ok(()),
                Err(err) => {
                    if connected {
                        // It worked until it broke: start the backoff over.
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!("consumer: {err}; reconnecting in {delay:?}");
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        Ok(())
    }

    async fn consume_until_broken(
        &self,
        shutdown: &CancellationToken,
        connected: &mut bool,
    ) -> Result<(), String> {
        use lab_core::amqp::bounded;
        let connection = lab_core::amqp::connect(&self.amqp_url, "outbox-consumer").await?;
        let channel = bounded(connection.create_channel()).await?;
        let prefetch = self.settings.consumer_prefetch;
        bounded(channel.basic_qos(prefetch, BasicQosOptions::default())).await?;
        bounded(events::declare_queues(
            &channel,
            &self.settings.exchange,
            &self.settings.queue,
            self.settings.consumer_max_attempts,
        ))
        .await?;
        let mut deliveries = bounded(channel.basic_consume(
            self.settings.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(), // manual acks
            FieldTable::default(),
        ))
        .await?;
        self.stats.connected.set(1);
        *connected = true;
        tracing::info!(queue = %self.settings.queue, "consumer connected to RabbitMQ");

        // Bounded lanes: when they are full, we stop reading, and the
        // prefetch limit stops the broker from sending more.
        let mut lanes = Vec::with_capacity(LANES);
        let mut workers = JoinSet::new();
        for _ in 0..LANES {
            let (tx, mut rx) = mpsc::channel::<Delivery>(self.settings.consumer_prefetch.into());
            lanes.push(tx);
            let (me, shutdown) = (self.clone(), shutdown.clone());
            workers.spawn(async move {
                while let Some(delivery) = rx.recv().await {
                    me.handle(delivery, &shutdown).await;
                }
            });
        }

        let result = loop {
            tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                next = deliveries.next() => match next {
                    Some(Ok(delivery)) => {
                        let lane = lane_of(&delivery);
                        if lanes[lane].send(delivery).await.is_err() {
                            break Err("a consumer lane stopped".to_owned());
                        }
                    }
                    Some(Err(err)) => break Err(err.to_string()),
                    None => break Err("the broker cancelled the consumer".to_owned()),
                },
            }
        };
        // Say so at once: the teardown below can take seconds, and a
        // consumer that still claimed to be connected meanwhile would look
        // idle rather than broken.
        self.stats.connected.set(0);
        // Stop the flow (on a live connection: on a broken one the cancel
        // would only wait out its deadline), then let the lanes finish what
        // they hold.
        if connection.status().connected() {
            let _ = bounded(channel.basic_cancel(deliveries.tag(), BasicCancelOptions::default()))
                .await;
        }
        drop(lanes);
        while workers.join_next().await.is_some() {}
        lab_core::amqp::close(&connection, "consumer stopping").await;
        result
    }

    async fn handle(&self, delivery: Delivery, shutdown: &CancellationToken) {
        use lab_core::amqp::bounded;
        let outcome = match parse(&delivery.data) {
            Err(reason) => Outcome::Poison(reason),
            Ok((event, order)) => self.record(&event, &order, shutdown).await,
        };
        let acked = match outcome {
            Outcome::Handled(released) => {
                self.stats.handled.inc_by(1 + released);
                bounded(delivery.ack(BasicAckOptions::default())).await
            }
            Outcome::Parked => {
                self.stats.parked.inc();
                bounded(delivery.ack(BasicAckOptions::default())).await
            }
            Outcome::Duplicate(path) => {
                self.stats
                    .duplicates
                    .get_or_create(&PathLabel { delivery: path })
                    .inc();
                bounded(delivery.ack(BasicAckOptions::default())).await
            }
            Outcome::Poison(reason) => {
                self.stats.dead_lettered.inc();
                tracing::warn!(
                    message_id = ?delivery.properties.message_id(),
                    "dead-lettering a message that cannot be handled: {reason}"
                );
                bounded(delivery.reject(BasicRejectOptions { requeue: false })).await
            }
            Outcome::Failed(reason) => {
                self.stats.requeued.inc();
                tracing::error!(
                    message_id = ?delivery.properties.message_id(),
                    "handling failed, requeueing: {reason}"
                );
                bounded(delivery.nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                }))
                .await
            }
            Outcome::Abandoned => return,
        };
        if let Err(err) = acked {
            // The connection broke: the broker redelivers, processed_events
            // recognises it.
            tracing::debug!(%err, "acknowledgement not sent");
        }
    }

    /// Acts on the event once, retrying while Postgres is unreachable.
    async fn record(
        &self,
        event: &Event,
        order: &OrderData,
        shutdown: &CancellationToken,
    ) -> Outcome {
        let mut backoff = Backoff::reconnect();
        loop {
            match self.record_once(event, order).await {
                Ok(Recorded::Applied(released)) => return Outcome::Handled(released),
                Ok(Recorded::Parked) => return Outcome::Parked,
                Ok(Recorded::Before) => {
                    return Outcome::Duplicate(
                        order.delivery.clone().unwrap_or_else(|| "unknown".into()),
                    );
                }
                Err(err) if lab_core::postgres::is_unavailable(&err) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        "{}; retrying in {delay:?}",
                        lab_core::postgres::describe(&self.pool, &err)
                    );
                    tokio::select! {
                        () = shutdown.cancelled() => return Outcome::Abandoned,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                Err(err) => return Outcome::Failed(err.to_string()),
            }
        }
    }

    /// One transaction: apply the event if it is its order's next one (and
    /// every parked successor it releases), park it if it is early.
    async fn record_once(&self, event: &Event, order: &OrderData) -> sqlx::Result<Recorded> {
        let mut tx = self.pool.begin().await?;
        let applied = lock_progress(&mut tx, event.aggregate_id).await?;
        if event.sequence <= applied {
            // The order is past it: applied before, this is a redelivery.
            return Ok(Recorded::Before); // rolls back on drop
        }
        if event.sequence > applied + 1 {
            let parked = park(&mut tx, event).await?;
            tx.commit().await?;
            // A redelivery of an event already parked parks nothing new.
            return Ok(if parked {
                Recorded::Parked
            } else {
                Recorded::Before
            });
        }
        if !apply(&mut tx, event, order).await? {
            return Ok(Recorded::Before);
        }
        let released = release_parked(&mut tx, event.aggregate_id, event.sequence).await?;
        tx.commit().await?;
        Ok(Recorded::Applied(released))
    }
}

/// What one transaction did with an event.
enum Recorded {
    /// Applied now, and this many parked successors with it.
    Applied(u64),
    /// Arrived before its predecessor: parked.
    Parked,
    /// Applied or parked before: a redelivery.
    Before,
}

/// Locks the order's progress row (creating it at the order's first event)
/// and returns the last sequence applied. The lock makes one order's events
/// take turns, so an event parked by one consumer cannot be missed by
/// another that applies its predecessor at the same moment.
async fn lock_progress(tx: &mut PgConnection, order_id: Uuid) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "INSERT INTO order_progress (order_id, applied) VALUES ($1, 0) \
         ON CONFLICT (order_id) DO UPDATE SET applied = order_progress.applied \
         RETURNING applied",
    )
    .bind(order_id)
    .fetch_one(tx)
    .await
}

/// Keeps an early event until its predecessor is applied. False: it was
/// parked already.
async fn park(tx: &mut PgConnection, event: &Event) -> sqlx::Result<bool> {
    let envelope = serde_json::to_value(event).expect("events serialize");
    let inserted = sqlx::query(
        "INSERT INTO parked_events (event_id, order_id, sequence, envelope) \
         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    )
    .bind(event.event_id)
    .bind(event.aggregate_id)
    .bind(event.sequence)
    .bind(envelope)
    .execute(tx)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// The side effect and the memory of it, in the caller's transaction.
/// False: this event id was acted on before.
async fn apply(tx: &mut PgConnection, event: &Event, order: &OrderData) -> sqlx::Result<bool> {
    let first_time =
        sqlx::query("INSERT INTO processed_events (event_id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(event.event_id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
    if !first_time {
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO notifications (event_id, order_id, event_type, message, occurred_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(event.event_id)
    .bind(order.id)
    .bind(&event.event_type)
    .bind(message(&event.event_type, order))
    .bind(event.occurred_at)
    .execute(tx)
    .await?;
    Ok(true)
}

/// Records `applied` as the order's progress and applies each parked event
/// that now comes next. Returns how many it applied.
async fn release_parked(tx: &mut PgConnection, order_id: Uuid, applied: i64) -> sqlx::Result<u64> {
    let (mut applied, mut released) = (applied, 0);
    loop {
        let next: Option<sqlx::types::Json<Event>> = sqlx::query_scalar(
            "WITH progress AS (UPDATE order_progress SET applied = $2 WHERE order_id = $1) \
             DELETE FROM parked_events WHERE order_id = $1 AND sequence = $2 + 1 \
             RETURNING envelope",
        )
        .bind(order_id)
        .bind(applied)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(sqlx::types::Json(event)) = next else {
            return Ok(released);
        };
        // Parked only once parsed, and never applied (it was not next).
        let order: OrderData = serde_json::from_value(event.data.clone())
            .map_err(|err| sqlx::Error::Decode(Box::new(err)))?;
        if apply(tx, &event, &order).await? {
            released += 1;
        }
        applied = event.sequence;
    }
}

/// The envelope and its order, or why this message can never be handled.
fn parse(body: &[u8]) -> Result<(Event, OrderData), String> {
    let event: Event =
        serde_json::from_slice(body).map_err(|err| format!("not an event envelope: {err}"))?;
    if ![ORDER_CREATED, ORDER_CANCELLED].contains(&event.event_type.as_str()) {
        return Err(format!("unknown event type {:?}", event.event_type));
    }
    if event.sequence < 1 {
        return Err(format!("sequence {} (they start at 1)", event.sequence));
    }
    let order: OrderData = serde_json::from_value(event.data.clone())
        .map_err(|err| format!("{} without a valid order: {err}", event.event_type))?;
    Ok((event, order))
}

fn message(event_type: &str, order: &OrderData) -> String {
    let total = format!("{}.{:02}", order.total_cents / 100, order.total_cents % 100);
    if event_type == ORDER_CANCELLED {
        format!("Order {} for {} was cancelled", order.id, order.customer_id)
    } else {
        format!(
            "Order {} confirmed for {}: {} item(s), total {total}",
            order.id,
            order.customer_id,
            order.items.len()
        )
    }
}

/// Events of one aggregate always go to the same lane, so stay in order.
fn lane_of(delivery: &Delivery) -> usize {
    let aggregate = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get("aggregate_id"))
        .and_then(|value| match value {
            AMQPValue::LongString(s) => Some(s.to_string()),
            _ => None,
        });
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    match aggregate {
        Some(id) => id.hash(&mut hasher),
        None => delivery.delivery_tag.hash(&mut hasher),
    }
    (hasher.finish() % LANES as u64) as usize
}

/// One row of `GET /notifications`.
#[derive(Debug, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
pub struct Notification {
    pub id: i64,
    pub event_id: Uuid,
    pub order_id: Uuid,
    pub event_type: String,
    pub message: String,
    pub occurred_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct NotificationQuery {
    /// Only this order's notifications.
    order_id: Option<Uuid>,
    /// 1–1000, default 50: the latest this many.
    #[serde(default = "default_limit")]
    #[param(minimum = 1, maximum = 1000)]
    limit: i64,
}

fn default_limit() -> i64 {
    50
}

#[derive(Clone)]
struct Api {
    pool: PgPool,
    stats: Arc<ConsumerStats>,
}

/// `GET /notifications?order_id=&limit=`: what the consumer did, newest
/// last for one order, the latest `limit` otherwise.
#[utoipa::path(
    get, path = "/notifications", params(NotificationQuery),
    responses(
        (status = 200, body = Vec<Notification>), (status = 422, body = ErrorBody),
        (status = 503, description = "Postgres is down", body = ErrorBody),
    )
)]
async fn notifications(
    State(api): State<Api>,
    Query(query): Query<NotificationQuery>,
) -> crate::Result<Json<Vec<Notification>>> {
    if !(1..=1000).contains(&query.limit) {
        return Err(crate::invalid("limit", "must be between 1 and 1000"));
    }
    let rows = sqlx::query_as(
        "SELECT * FROM (SELECT * FROM notifications \
           WHERE $1::uuid IS NULL OR order_id = $1 ORDER BY id DESC LIMIT $2) latest \
         ORDER BY id",
    )
    .bind(query.order_id)
    .bind(query.limit)
    .fetch_all(&api.pool)
    .await
    .map_err(|err| crate::pg_error(&api.pool, err))?;
    Ok(Json(rows))
}

/// What the consumer has done since it started.
#[utoipa::path(get, path = "/stats", responses((status = 200, body = StatsBody)))]
async fn stats(State(api): State<Api>) -> Json<StatsBody> {
    Json(api.stats.body())
}

/// The consumer's HTTP API, as served at `GET /openapi.json` on its port.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "System Design Lab: outbox (consumer)",
        description = "What the idempotent consumer did with the events it received."
    ),
    paths(notifications, stats),
    components(schemas(ErrorBody, lab_core::openapi::ErrorDetail))
)]
pub struct ApiDoc;

/// Runs a consumer, with `/notifications`, `/stats`, `/healthz`, `/readyz`
/// and `/metrics` on `listener`.
pub async fn serve(
    listener: TcpListener,
    pool: PgPool,
    amqp_url: String,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Metrics::new("outbox_consumer");
    let consumer = Consumer::new(pool.clone(), amqp_url.clone(), settings, &metrics);
    let routes = Router::new()
        .route("/notifications", get(notifications))
        .route("/stats", get(stats))
        .with_state(Api {
            pool: pool.clone(),
            stats: consumer.stats(),
        });
    let routes = lab_core::openapi::with_docs(routes, ApiDoc::openapi());
    let worker = consumer.run(shutdown.clone());
    let worker = crate::Worker::new("the consuming loop", worker, pool, amqp_url, metrics);
    worker.serve(listener, routes, shutdown).await
}
