//! The relay: outbox rows to RabbitMQ, marked published only once confirmed.
//!
//! One batch is one transaction: select pending rows in id order with
//! `FOR UPDATE SKIP LOCKED`, publish them all (the batch is the window of
//! outstanding publisher confirms: waiting for each confirm in turn would cap
//! the relay at one broker round trip per event), wait for the confirms,
//! mark the confirmed prefix published, commit. A crash anywhere before the
//! commit leaves the rows pending and they are published again: delivery is
//! at least once, and the consumer makes it effectively once.
//!
//! Order on the wire is not a guarantee the relay can give. Confirms are per
//! message: the broker can refuse (nack) or return (no queue bound) event k
//! after it has already delivered k+1 of the same order, and k goes out
//! again later. The relay still marks only the confirmed prefix and keeps
//! one publisher, which keeps reordering rare; the consumer makes it
//! harmless by applying each order's events by their sequence number.
//!
//! **Leadership.** Relays elect a leader, the one holding a Postgres
//! session advisory lock, so one publisher sends each batch once. The lock
//! lives on the connection that runs the batches, so a leader whose session
//! ends loses the lock at the same moment and cannot publish on as a zombie.
//! Standbys retry the lock every `RELAY_LEASE_RETRY_MS`.
//!
//! A leader that dies without a word (its host crashes, or a partition
//! drops its packets) leaves a session Postgres keeps for hours, and the
//! lock with it. So the lock comes with a lease ([`crate::lease`]): the
//! leader speaks on its lock connection at least every quarter
//! `RELAY_LEASE_TTL_MS`, with every statement bounded by half of it, and
//! steps down when Postgres does not answer; a standby that finds the
//! holder's session silent for the whole TTL ends it and leads. **The
//! bound: a standby leads within `RELAY_LEASE_TTL_MS` +
//! `RELAY_LEASE_RETRY_MS` of the leader's last word to Postgres, 11 s with
//! the defaults** (a statement round trip more); the silent leader itself
//! stops within 3/4 TTL. The trade-off: a shorter TTL fails over sooner but
//! deposes a leader that merely stalls, and split brain, when a paused
//! leader wakes next to its successor, costs duplicates the consumer drops,
//! never a lost event.
//!
//! The relay sleeps until a `NOTIFY outbox` says rows committed (the API
//! sends it after its commits, see [`crate::orders`]), or the poll interval
//! passes (NOTIFY is not durable: one sent while the relay was reconnecting
//! is gone, the poll catches what it missed).
//!
//! **Its commits do not wait for the disk** (`synchronous_commit = off` on
//! its session). Marking rows published is the one write whose loss is
//! harmless: a crash of Postgres that loses it makes the relay publish
//! those rows again, duplicates the consumer drops. A durable mark would
//! cost a WAL flush per batch, on the path of every event behind it.
//!
//! lapin does not reconnect by itself, so the relay owns that loop: a broker
//! failure closes the connection, waits with backoff and connects again,
//! keeping the lead (and the lease); events written meanwhile wait in the
//! outbox.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, extract::State, routing::get};
use futures::StreamExt;
use lab_core::{Json, metrics::Metrics};
use lapin::{Channel, Confirmation, Connection, options::ConfirmSelectOptions};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool, postgres::PgListener};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    Settings, events,
    lease::Lease,
    stages::{Probe, Stage},
};
use lab_core::backoff::Backoff;

/// How long to wait for the confirms of one batch before giving up on the
/// connection.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the leader deletes published rows older than the retention.
const CLEANUP_EVERY: Duration = Duration::from_secs(60);
/// Rows deleted per statement, so that no clean-up outlasts the lease's
/// deadline for one statement.
const CLEANUP_BATCH: i64 = 5000;

#[derive(Debug, thiserror::Error)]
enum RelayError {
    /// The database side failed: the lead is lost with the connection.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// The broker side failed: reconnect, keep the lead.
    #[error("{0}")]
    Broker(String),
}

fn broker(err: impl std::fmt::Display) -> RelayError {
    RelayError::Broker(err.to_string())
}

/// What `/status` and the metrics say about one relay.
#[derive(Default)]
pub struct RelayState {
    pub id: Uuid,
    leader: AtomicBool,
    leader_gauge: Gauge,
    broker_connected: Gauge,
    published: Counter,
    batches: Counter,
    retries: AtomicU64,
    last_retry_delay_ms: AtomicU64,
}

/// `GET /status` on the relay's port.
#[derive(Debug, Serialize, Deserialize)]
pub struct RelayStatus {
    pub relay_id: Uuid,
    pub leader: bool,
    pub broker_connected: bool,
    pub published: u64,
    pub batches: u64,
    /// Times the relay lost the lead (or failed to stand by) and waited.
    pub retries: u64,
    /// How long it waited the last time, in ms: the backoff at work.
    pub last_retry_delay_ms: u64,
}

impl RelayState {
    pub fn status(&self) -> RelayStatus {
        RelayStatus {
            relay_id: self.id,
            leader: self.leader.load(Ordering::SeqCst),
            broker_connected: self.broker_connected.get() == 1,
            published: self.published.get(),
            batches: self.batches.get(),
            retries: self.retries.load(Ordering::SeqCst),
            last_retry_delay_ms: self.last_retry_delay_ms.load(Ordering::SeqCst),
        }
    }

    fn retried(&self, delay: Duration) {
        self.retries.fetch_add(1, Ordering::SeqCst);
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.last_retry_delay_ms.store(ms, Ordering::SeqCst);
    }

    fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::SeqCst);
        self.leader_gauge.set(i64::from(leader));
    }
}

#[derive(Clone)]
pub struct Relay {
    pool: PgPool,
    amqp_url: String,
    settings: Arc<Settings>,
    lease: Lease,
    state: Arc<RelayState>,
    probe: Probe,
}

impl Relay {
    pub fn new(pool: PgPool, amqp_url: String, settings: Settings, metrics: &Metrics) -> Self {
        let state = Arc::new(RelayState {
            id: Uuid::now_v7(),
            ..RelayState::default()
        });
        metrics.register(
            "leader",
            "1 while this relay holds the lead and publishes",
            state.leader_gauge.clone(),
        );
        metrics.register(
            "broker_connected",
            "1 while the relay has a RabbitMQ connection",
            state.broker_connected.clone(),
        );
        metrics.register(
            "published",
            "Events published and confirmed by the broker",
            state.published.clone(),
        );
        metrics.register("batches", "Batches committed", state.batches.clone());
        Self {
            pool,
            amqp_url,
            lease: Lease::new(settings.relay_lease_ttl_ms),
            settings: Arc::new(settings),
            state,
            probe: Probe::default(),
        }
    }

    /// Reports when each event is selected, published, confirmed, marked.
    pub fn with_probe(self, probe: Probe) -> Self {
        Self { probe, ..self }
    }

    pub fn state(&self) -> Arc<RelayState> {
        self.state.clone()
    }

    /// Stands by, leads when elected, and starts over after any failure,
    /// until `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut backoff = Backoff::reconnect();
        while !shutdown.is_cancelled() {
            match self.stand_by_then_lead(&shutdown, &mut backoff).await {
                Ok(()) => backoff.reset(),
                Err(err) => {
                    let delay = backoff.next_delay();
                    self.state.retried(delay);
                    tracing::warn!(relay = %self.state.id, "relay lost the lead: {err}; retrying in {delay:?}");
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// Waits for the lock, then leads until shutdown or a failure. Leading
    /// starts the backoff over: a blip hours after the last one costs the
    /// short first wait, not the long one the backoff had reached.
    async fn stand_by_then_lead(
        &self,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), RelayError> {
        // A connection of its own, outside the pool: the lock belongs to it.
        let mut lock = self.pool.acquire().await?.detach();
        self.lease.prepare(&mut lock).await?;
        // A mark lost in a Postgres crash costs a duplicate the consumer
        // drops, never an event: the relay's commits need not wait for the
        // disk, nor wait their turn behind the API's WAL flushes.
        let statement = sqlx::query("SET synchronous_commit = off").execute(&mut lock);
        self.lease.bounded(statement).await?;
        let retry = Duration::from_millis(self.settings.relay_lease_retry_ms);
        while !self.lease.try_acquire(&mut lock).await? {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(retry) => {}
            }
        }
        tracing::info!(relay = %self.state.id, "relay leads");
        self.state.set_leader(true);
        backoff.reset();
        let result = self.lead(&mut lock, shutdown).await;
        self.state.set_leader(false);
        // Closing the session releases the lock for a standby. On a silent
        // connection the goodbye goes nowhere: do not wait for it (a
        // standby ends that session once its lease runs out).
        let _ = tokio::time::timeout(self.lease.grace(), sqlx::Connection::close(lock)).await;
        result
    }

    async fn lead(
        &self,
        lock: &mut PgConnection,
        shutdown: &CancellationToken,
    ) -> Result<(), RelayError> {
        let lease = self.lease;
        let mut listener = lease.bounded(PgListener::connect_with(&self.pool)).await?;
        lease.bounded(listener.listen("outbox")).await?;
        let mut backoff = Backoff::reconnect();
        loop {
            // Waiting on the broker, the leader still proves it is alive.
            let connected = lease.keep(lock, self.connect()).await?;
            let failure = match connected {
                Ok((connection, channel)) => {
                    self.state.broker_connected.set(1);
                    backoff.reset();
                    let result = self
                        .publish_until_broken(lock, &mut listener, &connection, &channel, shutdown)
                        .await;
                    self.state.broker_connected.set(0);
                    lab_core::amqp::close(&connection, "relay stopping").await;
                    match result {
                        Ok(()) => return Ok(()),
                        Err(RelayError::Broker(err)) => err,
                        Err(err) => return Err(err),
                    }
                }
                Err(err) => err,
            };
            let delay = backoff.next_delay();
            tracing::warn!(relay = %self.state.id, "{failure}; reconnecting in {delay:?}");
            let waited = lease.keep(lock, async {
                tokio::select! {
                    () = shutdown.cancelled() => false,
                    () = tokio::time::sleep(delay) => true,
                }
            });
            if !waited.await? {
                return Ok(());
            }
        }
    }

    async fn connect(&self) -> Result<(Connection, Channel), String> {
        use lab_core::amqp::bounded;
        let connection = lab_core::amqp::connect(&self.amqp_url, "outbox-relay").await?;
        let channel = bounded(connection.create_channel()).await?;
        bounded(channel.confirm_select(ConfirmSelectOptions::default())).await?;
        bounded(events::declare_exchange(&channel, &self.settings.exchange)).await?;
        tracing::info!(relay = %self.state.id, broker = %lab_core::amqp::where_is(&self.amqp_url), "relay connected to RabbitMQ");
        Ok((connection, channel))
    }

    async fn publish_until_broken(
        &self,
        lock: &mut PgConnection,
        listener: &mut PgListener,
        connection: &Connection,
        channel: &Channel,
        shutdown: &CancellationToken,
    ) -> Result<(), RelayError> {
        // Each round is also the lease's heartbeat.
        let poll =
            Duration::from_millis(self.settings.relay_poll_interval_ms).min(self.lease.heartbeat());
        let mut last_cleanup: Option<Instant> = None;
        // An idle relay sends nothing, so without listening it would learn of
        // a lost broker only at its next publish, and `/status` would say
        // connected all the while. (A connection closed or reset shows here at
        // once; one that went silent shows when lapin's heartbeat fails.)
        let mut broker_events = std::pin::pin!(connection.events_listener());
        let mut woke = Instant::now();
        loop {
            if !connection.status().connected() {
                return Err(broker("the connection to RabbitMQ is closed"));
            }
            // Every notification already waiting is covered by the drain
            // below, so take them all now: under a burst of commits, waking
            // once per notification would run one near-empty batch per event
            // (and a backlog of stale wake-ups would outlive the burst). One
            // arriving during the drain wakes the next round.
            while let Ok(Ok(_)) = tokio::time::timeout(Duration::ZERO, listener.recv()).await {}
            while self.publish_batch(lock, channel, woke).await?
                == self.settings.relay_batch_size as usize
                && !shutdown.is_cancelled()
            {
                woke = Instant::now();
            }
            if last_cleanup.is_none_or(|at| at.elapsed() >= CLEANUP_EVERY) {
                self.clean_up(lock).await?;
                last_cleanup = Some(Instant::now());
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                notification = listener.recv() => { notification?; }
                event = broker_events.next() => match event {
                    Some(lapin::Event::Error(err)) => return Err(broker(err)),
                    None => return Err(broker("the connection to RabbitMQ ended")),
                    Some(_) => {}
                },
                () = tokio::time::sleep(poll) => {}
            }
            woke = Instant::now();
        }
    }

    /// One batch, one transaction. Returns how many rows it marked published.
    async fn publish_batch(
        &self,
        lock: &mut PgConnection,
        channel: &Channel,
        woke: Instant,
    ) -> Result<usize, RelayError> {
        let lease = self.lease;
        let mut tx = lease.bounded(sqlx::Connection::begin(&mut *lock)).await?;
        let select = sqlx::query_as(
            "SELECT id, event_id, aggregate_id, event_type, payload::text FROM outbox \
             WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(self.settings.relay_batch_size)
        .fetch_all(&mut *tx);
        let rows: Vec<Row> = lease.bounded(select).await?;
        if rows.is_empty() {
            lease.bounded(tx.commit()).await?;
            return Ok(0);
        }
        let ids = || rows.iter().map(|row| row.1);
        self.probe.stamp(Stage::Woke, woke, ids);
        self.probe.stamp(Stage::Selected, Instant::now(), ids);
        // The broker may take its time: the lease is kept meanwhile, on the
        // batch's own transaction.
        let confirmations = lease.keep(&mut tx, self.publish(channel, &rows)).await??;
        let (confirmed, problem) = self.confirmed_prefix(&rows, confirmations);
        if !confirmed.is_empty() {
            let mark = sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)")
                .bind(&confirmed)
                .execute(&mut *tx);
            lease.bounded(mark).await?;
        }
        lease.bounded(tx.commit()).await?;
        let marked = || rows[..confirmed.len()].iter().map(|row| row.1);
        self.probe.stamp(Stage::Marked, Instant::now(), marked);
        self.state.published.inc_by(confirmed.len() as u64);
        self.state.batches.inc();
        match problem {
            Some(problem) => Err(RelayError::Broker(problem)),
            None => Ok(confirmed.len()),
        }
    }

    /// Publishes every row, then waits for all their confirms: every
    /// message is in flight at once. Each publish is polled once, in id
    /// order, before any is awaited: that first poll queues its frames, so
    /// they leave in id order, and the batch waits for the connection to
    /// write them once, not once per message (500 hand-offs to lapin's
    /// writer, one after another, took longer than the broker's confirms).
    async fn publish(
        &self,
        channel: &Channel,
        rows: &[Row],
    ) -> Result<Vec<Confirmation>, RelayError> {
        let mut sends: Vec<_> = rows
            .iter()
            .map(|(_, event_id, aggregate_id, event_type, payload)| {
                futures::future::maybe_done(Box::pin(events::publish(
                    channel,
                    &self.settings.exchange,
                    *event_id,
                    event_type,
                    *aggregate_id,
                    payload.as_bytes(),
                    true, // an unroutable event comes back rather than vanishing
                )))
            })
            .collect();
        for send in &mut sends {
            let _ = futures::poll!(send);
        }
        futures::future::join_all(sends.iter_mut()).await;
        let confirms = sends
            .into_iter()
            .map(|mut send| {
                std::pin::Pin::new(&mut send)
                    .take_output()
                    .expect("every publish was awaited")
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(broker)?;
        let ids = || rows.iter().map(|row| row.1);
        self.probe.stamp(Stage::Published, Instant::now(), ids);
        let confirmations =
            tokio::time::timeout(CONFIRM_TIMEOUT, futures::future::try_join_all(confirms))
                .await
                .map_err(|_| broker(format!("no publisher confirms within {CONFIRM_TIMEOUT:?}")))?
                .map_err(broker)?;
        self.probe.stamp(Stage::Confirmed, Instant::now(), ids);
        Ok(confirmations)
    }

    /// The ids of the confirmed prefix of `rows`, and what stopped it. Only
    /// the prefix is marked: the rows from the first failure on go out again,
    /// in id order (the consumer orders each order's events by sequence
    /// anyway, so this keeps the outbox simple rather than correct).
    fn confirmed_prefix(
        &self,
        rows: &[Row],
        confirmations: Vec<Confirmation>,
    ) -> (Vec<i64>, Option<String>) {
        let mut confirmed = Vec::with_capacity(rows.len());
        for (row, confirmation) in rows.iter().zip(confirmations) {
            let problem = match confirmation {
                Confirmation::Ack(None) => {
                    confirmed.push(row.0);
                    continue;
                }
                Confirmation::Ack(Some(_)) => format!(
                    "RabbitMQ had no queue bound for {:?} on exchange {:?} (is the consumer running?)",
                    row.3, self.settings.exchange
                ),
                Confirmation::Nack(_) => "RabbitMQ refused a message (nack)".into(),
                Confirmation::NotRequested => "the channel is not in confirm mode".into(),
            };
            return (confirmed, Some(problem));
        }
        (confirmed, None)
    }

    /// Deletes published rows past the retention period, a bounded number
    /// per statement.
    async fn clean_up(&self, lock: &mut PgConnection) -> Result<(), RelayError> {
        loop {
            let delete = sqlx::query(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox \
                   WHERE published_at < now() - make_interval(secs => $1) LIMIT $2)",
            )
            .bind(self.settings.retention_secs as f64)
            .bind(CLEANUP_BATCH)
            .execute(&mut *lock);
            let deleted = self.lease.bounded(delete).await?.rows_affected();
            if deleted > 0 {
                tracing::info!(deleted, "outbox rows past retention deleted");
            }
            if deleted < CLEANUP_BATCH as u64 {
                return Ok(());
            }
        }
    }
}

/// An outbox row as the relay reads it: id, event id, aggregate id, event
/// type, payload.
type Row = (i64, Uuid, Uuid, String, String);

async fn status(State(state): State<Arc<RelayState>>) -> Json<RelayStatus> {
    Json(state.status())
}

/// Runs a relay, with `/status`, `/healthz`, `/readyz` and `/metrics` on
/// `listener`.
pub async fn serve(
    listener: TcpListener,
    pool: PgPool,
    amqp_url: String,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // A batch of 0 selects nothing, forever: the relay would spin without
    // publishing. (clap refuses it from the environment; this refuses it
    // from a caller that builds Settings by hand.)
    anyhow::ensure!(
        settings.relay_batch_size >= 1,
        "RELAY_BATCH_SIZE must be 1 or more, not {}",
        settings.relay_batch_size
    );
    let metrics = Metrics::new("outbox_relay");
    let relay = Relay::new(pool.clone(), amqp_url.clone(), settings, &metrics);
    let routes = Router::new()
        .route("/status", get(status))
        .with_state(relay.state());
    let worker = relay.run(shutdown.clone());
    let worker = crate::Worker::new("the publishing loop", worker, pool, amqp_url, metrics);
    worker.serve(listener, routes, shutdown).await
}
