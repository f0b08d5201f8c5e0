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
//! Messages are handled in `CONSUMER_LANES` lanes at once, chosen by the
//! aggregate id header, so events of one order stay in one lane while
//! different orders proceed side by side. A message that can never be
//! handled (malformed JSON, an unknown event type) is rejected to the
//! dead-letter queue at once; one that fails for another reason is
//! requeued (a reject with requeue, not a nack: RabbitMQ 4.3 and later
//! count only rejects toward the limit), and RabbitMQ dead-letters it after
//! `CONSUMER_MAX_ATTEMPTS` deliveries. While Postgres is down the consumer
//! waits rather than burning attempts.
//!
//! **Batches.** A lane acts on every delivery waiting for it, up to
//! `CONSUMER_BATCH_SIZE`, in one transaction: one statement locks the
//! batch's orders (in order of order id, so two consumers' batches never
//! wait for each other in a circle), the next reads which of them have
//! parked events (after the locks: see `lock_progress`), one statement per
//! event applies it, and the acks go after the commit. One event per
//! transaction paid a durable commit (a WAL flush) and five round trips per
//! event, and under load the queue in front of the consumer grew without
//! bound: `lab bench outbox` measured the API committing more than the
//! consumer could handle.
//! A batch changes none of the guarantees: an effect and its
//! `processed_events` row commit together and before the ack, and a crash
//! mid-batch rolls the whole batch back for redelivery. A batch waits for
//! nothing: it is what queued up while the last one ran, so a lone event
//! still goes at once. An event whose statement fails is taken out and
//! requeued, and the rest of its batch goes again without it. A batch whose
//! transaction fails with no statement to blame (its commit refused by a
//! deferred constraint, say) goes again one event per transaction, and
//! only the one that still fails is requeued: one bad event costs its own
//! attempt, not its neighbours'. Rejected: more lanes instead
//! (16 lanes of one event drained a third of what 4 lanes of 64 did), and a
//! prefetch smaller than lanes × batch size, which leaves the lanes sharing
//! a batch's worth of messages (hence `CONSUMER_PREFETCH` 256).

use std::{
    collections::{HashMap, HashSet},
    hash::{Hash, Hasher},
    sync::Arc,
    time::Instant,
};

use axum::{Router, extract::State, routing::get};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use lab_core::{Json, Query, metrics::Metrics};
use lapin::{
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions,
        BasicRejectOptions,
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
    stages::{Probe, Stage},
};
use lab_core::backoff::Backoff;
use lab_core::openapi::ErrorBody;
use utoipa::{IntoParams, OpenApi, ToSchema};

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
    /// Applied, with the parked successors it released (their event ids).
    Handled(Vec<Uuid>),
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
    probe: Probe,
}

/// A delivery that parsed, on its way through a lane's batch.
struct Item {
    delivery: Delivery,
    event: Event,
    order: OrderData,
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
            probe: Probe::default(),
        }
    }

    /// Reports when each event is delivered and when its transaction commits.
    pub fn with_probe(self, probe: Probe) -> Self {
        Self { probe, ..self }
    }

    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.stats.clone()
    }

    /// Consumes until `shutdown` fires, reconnecting with backoff whenever
    /// the broker connection breaks.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        // To RabbitMQ a prefetch of 0 means no limit, and the lanes' queues
        // cannot be 0 long. (clap refuses it from the environment; this
        // refuses it from a caller that builds Settings by hand.)
        anyhow::ensure!(
            self.settings.consumer_prefetch >= 1,
            "CONSUMER_PREFETCH must be 1 or more, not {}",
            self.settings.consumer_prefetch
        );
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

        let (lanes, mut workers) = self.spawn_lanes(shutdown);
        let result = loop {
            tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                next = deliveries.next() => match next {
                    Some(Ok(delivery)) => {
                        self.probe.stamp(Stage::Delivered, Instant::now(), || event_id(&delivery));
                        let lane = lane_of(&delivery, lanes.len());
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

    /// Starts the lanes: each takes what waits for it, up to a batch, and
    /// acts on it in one transaction. Bounded: when they are full, the
    /// dispatcher stops reading, and the prefetch limit stops the broker.
    fn spawn_lanes(
        &self,
        shutdown: &CancellationToken,
    ) -> (Vec<mpsc::Sender<Delivery>>, JoinSet<()>) {
        let lanes = usize::from(self.settings.consumer_lanes.max(1));
        let batch = usize::from(self.settings.consumer_batch_size.max(1));
        let mut senders = Vec::with_capacity(lanes);
        let mut workers = JoinSet::new();
        for _ in 0..lanes {
            let (tx, mut rx) = mpsc::channel::<Delivery>(self.settings.consumer_prefetch.into());
            senders.push(tx);
            let (me, shutdown) = (self.clone(), shutdown.clone());
            workers.spawn(async move {
                let mut deliveries = Vec::with_capacity(batch);
                while rx.recv_many(&mut deliveries, batch).await > 0 {
                    me.handle(std::mem::take(&mut deliveries), &shutdown).await;
                }
            });
        }
        (senders, workers)
    }

    /// One lane's batch: poison is rejected at once, the rest is acted on
    /// in one transaction, then every delivery is settled with the broker.
    async fn handle(&self, deliveries: Vec<Delivery>, shutdown: &CancellationToken) {
        let mut batch = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match parse(&delivery.data) {
                Ok((event, order)) => batch.push(Item {
                    delivery,
                    event,
                    order,
                }),
                Err(reason) => self.settle(&delivery, Outcome::Poison(reason)).await,
            }
        }
        let outcomes = self.record(&batch, shutdown).await;
        // Applied: the events handled now, and the parked ones they released.
        self.probe.stamp(Stage::Committed, Instant::now(), || {
            let applied = batch.iter().zip(&outcomes).filter_map(|(item, outcome)| {
                let Outcome::Handled(released) = outcome else {
                    return None;
                };
                Some(std::iter::once(item.event.event_id).chain(released.iter().copied()))
            });
            applied.flatten()
        });
        let settled = batch
            .iter()
            .zip(outcomes)
            .map(|(item, outcome)| self.settle(&item.delivery, outcome));
        futures::future::join_all(settled).await;
    }

    /// Tells the broker what became of a delivery, and counts it.
    async fn settle(&self, delivery: &Delivery, outcome: Outcome) {
        use lab_core::amqp::bounded;
        let acked = match outcome {
            Outcome::Handled(released) => {
                self.stats.handled.inc_by(1 + released.len() as u64);
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
                // A reject, not a nack: RabbitMQ 4.3 and later count only a
                // reject as a failed delivery toward `x-delivery-limit` (a
                // nack would requeue a failing event forever); before 4.3
                // both count.
                bounded(delivery.reject(BasicRejectOptions { requeue: true })).await
            }
            Outcome::Abandoned => return,
        };
        if let Err(err) = acked {
            // The connection broke: the broker redelivers, processed_events
            // recognises it.
            tracing::debug!(%err, "acknowledgement not sent");
        }
    }

    /// Acts on the batch in one transaction, retrying while Postgres is
    /// unreachable. An event whose statement fails is taken out (requeued)
    /// and the others go again without it. A transaction that fails as a
    /// whole (its commit refused, say) names no culprit: its events go
    /// again one per transaction, so that only the culprit fails.
    async fn record(&self, batch: &[Item], shutdown: &CancellationToken) -> Vec<Outcome> {
        let mut outcomes: Vec<Option<Outcome>> = batch.iter().map(|_| None).collect();
        let mut backoff = Backoff::reconnect();
        let mut one_at_a_time = false;
        loop {
            let mut todo: Vec<usize> = (0..batch.len())
                .filter(|&i| outcomes[i].is_none())
                .collect();
            if todo.is_empty() {
                break;
            }
            if one_at_a_time {
                todo.truncate(1);
            }
            match self.record_once(todo.iter().map(|&i| &batch[i])).await {
                Ok(recorded) => {
                    for (i, recorded) in todo.into_iter().zip(recorded) {
                        outcomes[i] = Some(recorded.outcome(&batch[i].order));
                    }
                }
                Err((_, err)) if lab_core::postgres::is_unavailable(&err) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        "{}; retrying in {delay:?}",
                        lab_core::postgres::describe(&self.pool, &err)
                    );
                    tokio::select! {
                        () = shutdown.cancelled() => {
                            todo.iter().for_each(|&i| outcomes[i] = Some(Outcome::Abandoned));
                        }
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                Err((Some(failed), err)) => {
                    outcomes[todo[failed]] = Some(Outcome::Failed(err.to_string()))
                }
                Err((None, err)) if todo.len() > 1 => {
                    tracing::warn!("a batch of {} failed ({err}): one at a time", todo.len());
                    one_at_a_time = true;
                }
                Err((None, err)) => outcomes[todo[0]] = Some(Outcome::Failed(err.to_string())),
            }
        }
        outcomes.into_iter().flatten().collect()
    }

    /// One transaction for `items`. A failure names the item whose
    /// statement failed, or none (the transaction itself failed).
    async fn record_once<'a>(
        &self,
        items: impl Iterator<Item = &'a Item> + Clone,
    ) -> Result<Vec<Recorded>, (Option<usize>, sqlx::Error)> {
        let mut tx = self.pool.begin().await.map_err(|err| (None, err))?;
        let orders = items.clone().map(|item| item.event.aggregate_id);
        let mut progress = lock_progress(&mut tx, orders)
            .await
            .map_err(|err| (None, err))?;
        let mut recorded = Vec::new();
        for (k, item) in items.enumerate() {
            let order = progress.entry(item.event.aggregate_id).or_default();
            let one = record_one(&mut tx, order, &item.event, &item.order).await;
            recorded.push(one.map_err(|err| (Some(k), err))?);
        }
        tx.commit().await.map_err(|err| (None, err))?;
        Ok(recorded)
    }
}

/// Where one order stands, as its locked progress row says.
#[derive(Default, sqlx::FromRow)]
struct Progress {
    /// The last sequence applied.
    applied: i64,
    /// Whether events of it wait in `parked_events`.
    parked: bool,
}

/// Applies the event if it is its order's next one (and every parked
/// successor it releases), parks it if it is early, in the caller's
/// transaction, which holds the order's progress row locked.
async fn record_one(
    tx: &mut PgConnection,
    progress: &mut Progress,
    event: &Event,
    order: &OrderData,
) -> sqlx::Result<Recorded> {
    if event.sequence <= progress.applied {
        // The order is past it: applied before, this is a redelivery.
        return Ok(Recorded::Before);
    }
    if event.sequence > progress.applied + 1 {
        // A redelivery of an event already parked parks nothing new.
        let parked = park(tx, event).await?;
        progress.parked |= parked;
        return Ok(if parked {
            Recorded::Parked
        } else {
            Recorded::Before
        });
    }
    if !apply(tx, event, order).await? {
        return Ok(Recorded::Before);
    }
    progress.applied = event.sequence;
    let released = if progress.parked {
        release_parked(tx, event.aggregate_id, progress).await?
    } else {
        Vec::new()
    };
    Ok(Recorded::Applied(released))
}

/// What one transaction did with an event.
enum Recorded {
    /// Applied now, and these parked successors (their event ids) with it.
    Applied(Vec<Uuid>),
    /// Arrived before its predecessor: parked.
    Parked,
    /// Applied or parked before: a redelivery.
    Before,
}

impl Recorded {
    fn outcome(self, order: &OrderData) -> Outcome {
        match self {
            Recorded::Applied(released) => Outcome::Handled(released),
            Recorded::Parked => Outcome::Parked,
            Recorded::Before => {
                Outcome::Duplicate(order.delivery.clone().unwrap_or_else(|| "unknown".into()))
            }
        }
    }
}

/// Locks the progress rows of `orders` (creating those seen for the first
/// time) and says where each stands. The lock makes one order's events
/// take turns, so an event parked by one consumer cannot be missed by
/// another that applies its predecessor at the same moment. Rows are
/// locked in order of order id, whatever the batch, so two consumers'
/// batches never wait for each other in a circle (a deadlock).
///
/// The parked events are read by a second statement, once the locks are
/// held. Asked in the locking statement, the question would be answered
/// from that statement's snapshot, taken *before* it waited for a lock:
/// a consumer that parked an event and committed while this one waited
/// would leave `applied` current (it is read from the locked row) but the
/// parked event unseen, and this one would apply the predecessor without
/// releasing it, leaving it parked for good.
async fn lock_progress(
    tx: &mut PgConnection,
    orders: impl Iterator<Item = Uuid>,
) -> sqlx::Result<HashMap<Uuid, Progress>> {
    let mut orders: Vec<Uuid> = orders.collect();
    orders.sort_unstable();
    orders.dedup();
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(
        "INSERT INTO order_progress (order_id, applied) \
         SELECT order_id, 0 FROM unnest($1::uuid[]) AS o (order_id) ORDER BY order_id \
         ON CONFLICT (order_id) DO UPDATE SET applied = order_progress.applied \
         RETURNING order_id, applied",
    )
    .bind(&orders)
    .fetch_all(&mut *tx)
    .await?;
    let parked: HashSet<Uuid> =
        sqlx::query_scalar("SELECT DISTINCT order_id FROM parked_events WHERE order_id = ANY($1)")
            .bind(&orders)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
    let progress = |(order, applied)| {
        let parked = parked.contains(&order);
        (order, Progress { applied, parked })
    };
    Ok(rows.into_iter().map(progress).collect())
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

/// The side effect, the memory of it and the order's progress, in the
/// caller's transaction, in one statement. False: this event id was acted
/// on before (and nothing was written).
async fn apply(tx: &mut PgConnection, event: &Event, order: &OrderData) -> sqlx::Result<bool> {
    let inserted = sqlx::query(
        "WITH first_time AS (INSERT INTO processed_events (event_id) VALUES ($1) \
                               ON CONFLICT DO NOTHING RETURNING event_id), \
              progress AS (UPDATE order_progress SET applied = $7 \
                             WHERE order_id = $6 AND EXISTS (SELECT FROM first_time)) \
         INSERT INTO notifications (event_id, order_id, event_type, message, occurred_at) \
         SELECT event_id, $2, $3, $4, $5 FROM first_time",
    )
    .bind(event.event_id)
    .bind(order.id)
    .bind(&event.event_type)
    .bind(message(&event.event_type, order))
    .bind(event.occurred_at)
    .bind(event.aggregate_id)
    .bind(event.sequence)
    .execute(tx)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// Applies each parked event that now comes next, in turn. Returns the ids
/// of those it applied.
async fn release_parked(
    tx: &mut PgConnection,
    order_id: Uuid,
    progress: &mut Progress,
) -> sqlx::Result<Vec<Uuid>> {
    let mut released = Vec::new();
    loop {
        let next: Option<sqlx::types::Json<Event>> = sqlx::query_scalar(
            "DELETE FROM parked_events WHERE order_id = $1 AND sequence = $2 + 1 \
             RETURNING envelope",
        )
        .bind(order_id)
        .bind(progress.applied)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(sqlx::types::Json(event)) = next else {
            return Ok(released);
        };
        // Parked only once parsed, and never applied (it was not next).
        let order: OrderData = serde_json::from_value(event.data.clone())
            .map_err(|err| sqlx::Error::Decode(Box::new(err)))?;
        if apply(tx, &event, &order).await? {
            released.push(event.event_id);
        } else {
            // Acted on before, somehow: the order is past it all the same.
            sqlx::query("UPDATE order_progress SET applied = $2 WHERE order_id = $1")
                .bind(order_id)
                .bind(event.sequence)
                .execute(&mut *tx)
                .await?;
        }
        progress.applied = event.sequence;
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

/// The event id a delivery carries as its message id, if any.
fn event_id(delivery: &Delivery) -> Option<Uuid> {
    delivery
        .properties
        .message_id()
        .as_ref()?
        .as_str()
        .parse()
        .ok()
}

/// Events of one aggregate always go to the same lane, so stay in order.
fn lane_of(delivery: &Delivery, lanes: usize) -> usize {
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
    (hasher.finish() % lanes as u64) as usize
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: crate::Settings,
    }

    #[test]
    fn a_prefetch_below_one_is_refused_by_the_settings() {
        let parse =
            |prefetch: &str| Cli::try_parse_from(["outbox", "--consumer-prefetch", prefetch]);
        assert!(parse("0").is_err(), "CONSUMER_PREFETCH=0 was accepted");
        assert_eq!(parse("1").unwrap().settings.consumer_prefetch, 1);
    }
}
