//! The ingest: MQTT in, Postgres out, acknowledged only after commit.
//!
//! Two tasks. The **client** task owns the MQTT event loop and does nothing
//! else: it hands each incoming publish to the batcher, and anything that
//! would wait on rumqttc's request channel (a subscription) is spawned, since
//! that channel is drained by this very loop. The **batcher** collects publishes until it has
//! `INGEST_BATCH_SIZE` or `INGEST_BATCH_INTERVAL_MS` has passed, writes
//! them in one transaction, and only then acknowledges them (manual acks).
//! A crash before the commit leaves them unacknowledged, and the broker
//! sends them again; the primary key `(device_id, seq)` turns that second
//! copy into a no-op. At least once in, exactly once stored.
//!
//! **An ack is valid only on the connection its message came on.** A PUBACK
//! names a packet id, and packet ids are per session: after a broker that
//! lost its state comes back, the new session numbers its messages from 1
//! again. An ack for a batch that was in flight across the restart, sent on
//! the new connection, acknowledged *another* message, not yet stored; a
//! crash then lost it (the test that shows it lost 20 of 60 readings). So
//! each message carries the number of its connection, and the batcher acks
//! only while that connection is the current one; the rest are withheld
//! (`telemetry_acks_withheld_total`): a broker that kept the session sends
//! them again, and one that did not has forgotten them. The check and the
//! queueing of the ack happen under one lock that the client task takes to
//! end a connection, and two leftovers of the old connection inside
//! rumqttc are cleared then: publishes read in the same burst as the failure
//! (handed out after the reconnect, they would look new) and acks queued
//! in its request channel. Rejected: acking by packet id whatever the
//! connection (the bug), and routing acks through the client task's
//! `select!`, which would cancel `EventLoop::poll` mid-write.
//!
//! **Postgres down is retried; Postgres refusing the data is not.** A
//! batch that fails because Postgres is unreachable is retried, with
//! backoff, and acknowledged once stored. One it refuses for what it holds
//! (SQLSTATE classes 22, 23 and 54: [`is_refused`]) would be refused on
//! every retry, and every later reading would queue behind it (a device id
//! of 3,000 random characters did that, before ids were checked). So such a
//! batch is split in halves, down to the message Postgres refuses, which
//! becomes a reject with Postgres's reason; the rest is stored and the
//! whole batch acknowledged. Statuses and acks are split the same way.
//! Rejected: one row at a time from the start (a transaction per message
//! in the common case), and skipping the whole batch (losing the good
//! readings in it).
//!
//! The session is persistent (clean start off, a session expiry): while the
//! ingest is away the broker queues its QoS 1 messages. When the broker has
//! no session for it (first start, or a broker that lost its state), the
//! subscriptions are gone too. rumqttc reconnects by itself but never
//! re-subscribes: an ingest can be "connected" and hear nothing. So the
//! client subscribes on every connection, session or not: subscribing again
//! is harmless, and a resumed session may hold the subscriptions of another
//! configuration (seen here: a session kept from a run with a topic prefix
//! left one instance deaf to the unprefixed topics).
//!
//! **A clean stop leaves the share group; a crash keeps the session.** A
//! kept session stays a member of `$share/…` and is handed its share of
//! the stream, queued, while the instance is away: an ingest stopped with
//! SIGTERM held every other reading until it returned or its session
//! expired (20 of 40 in the test). So on shutdown the client unsubscribes,
//! the batcher stores what arrived before the UNSUBACK, and the client
//! disconnects and ends the session ([`leave`]), unless something taken
//! was not stored, which the kept session holds for this client id's
//! return. A crash sends no DISCONNECT: the session, with its share, is
//! kept for `INGEST_SESSION_EXPIRY_SECS` and delivered when the instance
//! returns under the same client id. Rejected: session expiry 0 at
//! connect (a crash would lose the batch in hand) and keeping the session
//! on a clean stop (the bug).

use std::{collections::BTreeMap, sync::atomic::Ordering, time::Duration};

use chrono::{DateTime, Utc};
use rumqttc::v5::{
    Event, EventLoop,
    mqttbytes::{
        QoS,
        v5::{Filter, Packet, Publish, SubscribeReasonCode},
    },
};
use sqlx::{Postgres, Transaction};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use lab_core::backoff::Backoff;
use rumqttc::v5::AsyncClient;

use crate::{
    App, Broker, Settings, Topics,
    inbox::{self, Delivery, Offered},
    mqtt::{Kind, check_device_id},
    payload::{Ack, Alert, Reading, parse_status},
    rejects::{self, Reject},
};

/// The ingest's MQTT client: a persistent session (clean start off, kept
/// by the broker for `INGEST_SESSION_EXPIRY_SECS` while the ingest is away),
/// manual acks (sent by the batcher after commit), and a receive maximum
/// that bounds how many unacknowledged QoS 1 messages the broker sends.
pub(crate) fn client(broker: &Broker, settings: &Settings) -> (AsyncClient, EventLoop) {
    let mut options = broker.v5_options(&settings.client_id);
    let receive_maximum = settings.receive_maximum();
    options
        .set_clean_start(false)
        .set_session_expiry_interval(Some(settings.session_expiry_secs))
        .set_receive_maximum(Some(receive_maximum))
        .set_manual_acks(true);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    options.set_network_options(network);
    // Acks, alerts and commands wait in this channel for the event loop.
    AsyncClient::new(options, usize::from(receive_maximum) + 100)
}

/// The subscriptions: telemetry and acks shared by every ingest instance
/// (each message goes to one of them), statuses heard by all (retained
/// messages are not sent to shared subscriptions).
fn filters(app: &App) -> Vec<Filter> {
    let group = &app.settings.share_group;
    let qos = app.settings.qos();
    vec![
        Filter::new(
            format!("$share/{group}/{}", app.topics.every(Kind::Telemetry)),
            qos,
        ),
        Filter::new(
            format!("$share/{group}/{}", app.topics.every(Kind::Acks)),
            QoS::AtLeastOnce,
        ),
        Filter::new(app.topics.every(Kind::Status), QoS::AtLeastOnce),
    ]
}

/// Polls the MQTT event loop until `stop`. On shutdown it first leaves the
/// share group (unsubscribes, and fires `unsubscribed` once the broker
/// confirms, or the connection is gone), so the batcher's last batch is the
/// last that arrives; then [`leave`] ends the session.
pub(crate) async fn run_client(
    app: App,
    mut eventloop: EventLoop,
    inbox: inbox::Sender,
    unsubscribed: CancellationToken,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::reconnect();
    let mut leaving = Leaving::default();
    loop {
        let event = tokio::select! {
            event = eventloop.poll() => event,
            () = app.shutdown.cancelled(), if !leaving.started => {
                leaving.start(&app, &unsubscribed);
                continue;
            }
            () = stop.cancelled() => break,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                backoff.reset();
                app.connected(connack.session_present);
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                // Never a wait here: this loop is also what delivers the
                // batcher's acks. The inbox never waits; see `inbox` for
                // what bounds it at each QoS.
                if app.take(&inbox, publish) == Offered::Closed {
                    // The batcher has stopped: this one is not stored.
                    app.keep_session.store(true, Ordering::SeqCst);
                    break;
                }
            }
            Ok(Event::Incoming(Packet::SubAck(suback))) => app.subscribed(&suback.return_codes),
            Ok(Event::Incoming(Packet::UnsubAck(_))) => leaving.unsubscribed(&unsubscribed),
            Ok(_) => {}
            Err(err) => {
                app.connection_lost(&mut eventloop, &inbox);
                let message = app.broker.describe(&err);
                if app.mqtt_up() {
                    tracing::warn!("{message}");
                }
                app.set_mqtt_up(false, Some(message));
                // Nothing more arrives on a connection that is gone.
                if leaving.started {
                    unsubscribed.cancel();
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                    () = stop.cancelled() => break,
                }
            }
        }
    }
    leave(&app, &mut eventloop).await;
    Ok(())
}

/// Leaving the share group on shutdown: the unsubscriptions sent, and how
/// many the broker has confirmed.
#[derive(Default)]
struct Leaving {
    started: bool,
    sent: usize,
    confirmed: usize,
}

impl Leaving {
    /// Unsubscribes from every filter (from a task of its own: the request
    /// channel is drained by the event loop). Not connected, nothing more
    /// arrives: `unsubscribed` at once. An UnsubAck that never comes is
    /// waited for 5 s at most.
    fn start(&mut self, app: &App, unsubscribed: &CancellationToken) {
        self.started = true;
        let filters: Vec<String> = filters(app).into_iter().map(|f| f.path).collect();
        self.sent = filters.len();
        if !app.mqtt_up() {
            unsubscribed.cancel();
            return;
        }
        let (client, unsubscribed) = (app.client.clone(), unsubscribed.clone());
        tokio::spawn(async move {
            for filter in filters {
                if client.unsubscribe(filter).await.is_err() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
            unsubscribed.cancel();
        });
    }

    fn unsubscribed(&mut self, unsubscribed: &CancellationToken) {
        self.confirmed += 1;
        if self.started && self.confirmed >= self.sent {
            unsubscribed.cancel();
        }
    }
}

/// The last step of a clean stop. Connected: DISCONNECT, then, when every
/// reading taken was stored, the session is ended, so the broker keeps no
/// queue (and no share) for an instance that is gone. rumqttc 0.25 sends
/// its DISCONNECT without properties (no session expiry 0), so the session
/// is ended by a second connection under the same client id with clean
/// start on and session expiry 0. Something taken and not stored (Postgres
/// down): the session stays, out of the group, holding only those
/// unacknowledged readings for this client id's return.
async fn leave(app: &App, eventloop: &mut EventLoop) {
    let connected = app.mqtt_up();
    if connected {
        let _ = app.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(event) = eventloop.poll().await {
                if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
    // No connection any more: an ack still being retried gives up.
    *app.connection.lock().expect("connection lock") += 1;
    app.set_mqtt_up(false, Some("stopped".into()));
    if !connected {
        tracing::warn!(
            expiry_secs = app.settings.session_expiry_secs,
            "stopped while not connected: the broker keeps the session, and its share, until it expires"
        );
    } else if app.keep_session.load(Ordering::SeqCst) {
        tracing::warn!(
            expiry_secs = app.settings.session_expiry_secs,
            "readings taken but not stored: the session is kept for them"
        );
    } else if let Err(err) = end_session(&app.broker, &app.settings.client_id).await {
        tracing::warn!(%err, "could not end the session; the broker keeps it until it expires");
    } else {
        tracing::info!("left the share group; session ended");
    }
}

/// Connects as `client_id` with clean start on (the broker discards the
/// session it kept) and session expiry 0 (none is kept after this one).
pub async fn end_session(broker: &Broker, client_id: &str) -> anyhow::Result<()> {
    let mut options = broker.v5_options(client_id);
    options
        .set_clean_start(true)
        .set_session_expiry_interval(Some(0));
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await? {
                Event::Incoming(Packet::ConnAck(_)) => client.try_disconnect()?,
                Event::Outgoing(rumqttc::Outgoing::Disconnect) => return Ok(()),
                _ => {}
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("no answer within 5 s"))?
}

/// Collects publishes into batches and stores them until `unsubscribed`
/// (nothing more arrives); then stores what is already in the inbox and
/// returns. A batch Postgres refuses after `stop` is given up, not
/// acknowledged, and the session kept for it.
pub(crate) async fn run_batcher(
    app: App,
    mut inbox: inbox::Receiver,
    unsubscribed: CancellationToken,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let size = app.settings.batch_size.max(1);
    let interval = Duration::from_millis(app.settings.batch_interval_ms);
    loop {
        let first = tokio::select! {
            first = inbox.recv() => first,
            () = unsubscribed.cancelled() => None,
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        let deadline = Instant::now() + interval;
        while batch.len() < size {
            tokio::select! {
                next = inbox.recv() => match next {
                    Some(next) => batch.push(next),
                    None => break,
                },
                () = tokio::time::sleep_until(deadline) => break,
                () = unsubscribed.cancelled() => break,
            }
        }
        app.store(batch, &stop).await;
    }
    // Shutdown: what already arrived is stored and acknowledged.
    let mut rest = Vec::new();
    while let Some(delivery) = inbox.try_recv() {
        rest.push(delivery);
    }
    if !rest.is_empty() {
        app.store(rest, &CancellationToken::new()).await;
    }
    Ok(())
}

/// One batch, decoded.
#[derive(Default)]
struct Decoded {
    readings: Vec<Reading>,
    /// Readings that passed the checks, before copies within the batch were
    /// dropped.
    accepted: usize,
    /// The newest status per device in the batch.
    statuses: BTreeMap<String, bool>,
    acks: Vec<Ack>,
    rejects: Vec<Reject>,
}

impl Decoded {
    /// Checks one message from `device` (its id already checked) and
    /// keeps what it says.
    fn take(&mut self, kind: Kind, device: &str, payload: &[u8]) -> Result<(), String> {
        match kind {
            Kind::Telemetry => {
                self.readings.push(Reading::parse(device, payload)?);
            }
            Kind::Status => {
                self.statuses
                    .insert(device.to_owned(), parse_status(payload)?);
            }
            Kind::Acks => {
                let ack: Ack = serde_json::from_slice(payload)
                    .map_err(|err| format!("malformed ack: {err}"))?;
                if ack.device_id != device {
                    return Err(format!(
                        "ack from {:?} on {device:?}'s topic",
                        ack.device_id
                    ));
                }
                self.acks.push(ack);
            }
            Kind::Commands => return Err("not a topic the ingest reads".to_owned()),
        }
        Ok(())
    }
}

fn decode(app: &App, batch: &[Delivery]) -> Decoded {
    let mut decoded = Decoded::default();
    for Delivery { publish, .. } in batch {
        let topic = String::from_utf8_lossy(&publish.topic);
        let payload = &publish.payload[..];
        let result = match app.topics.parse(&topic) {
            Some((device, kind)) if kind != Kind::Commands => {
                app.stats.received(match kind {
                    Kind::Telemetry => "telemetry",
                    Kind::Status => "status",
                    _ => "ack",
                });
                // The topic's id is checked before anything is kept under it.
                check_device_id(device).and_then(|()| decoded.take(kind, device, payload))
            }
            _ => Err("not a topic the ingest reads".to_owned()),
        };
        if let Err(reason) = result {
            app.stats.rejected.inc();
            decoded
                .rejects
                .push(Reject::new(topic.as_bytes(), payload, &reason));
        }
    }
    decoded.accepted = decoded.readings.len();
    decoded
        .readings
        .sort_by(|a, b| (&a.device_id, a.seq).cmp(&(&b.device_id, b.seq)));
    decoded
        .readings
        .dedup_by(|a, b| a.device_id == b.device_id && a.seq == b.seq);
    decoded
}

impl App {
    /// On every ConnAck, resumed session or not: subscribe (again).
    fn connected(&self, session_present: bool) {
        // Ready only once the subscriptions are confirmed (SubAck):
        // connected and deaf is not ready.
        self.set_mqtt_up(
            false,
            Some("connected; waiting for the subscriptions".into()),
        );
        tracing::info!(
            broker = %self.broker.place(),
            session_present,
            "ingest connected"
        );
        self.stats
            .connected(if session_present { "resumed" } else { "new" });
        if self.shutdown.is_cancelled() {
            return; // leaving the share group: not joining it again
        }
        // Not from inside the event loop: a full request channel would wait
        // for the very loop that drains it.
        let (client, filters) = (self.client.clone(), filters(self));
        tokio::spawn(async move {
            if let Err(err) = client.subscribe_many(filters).await {
                tracing::error!(%err, "cannot subscribe");
            }
        });
    }

    /// Ready once every subscription is granted.
    fn subscribed(&self, codes: &[SubscribeReasonCode]) {
        let refused: Vec<_> = codes
            .iter()
            .filter(|code| !matches!(code, SubscribeReasonCode::Success(_)))
            .collect();
        if refused.is_empty() {
            self.set_mqtt_up(true, None);
        } else {
            let message = format!("the broker refused subscriptions: {refused:?}");
            tracing::error!("{message}");
            self.set_mqtt_up(false, Some(message));
        }
    }

    /// Hands a publish to the batcher, tagged with the connection it came on.
    fn take(&self, inbox: &inbox::Sender, publish: Publish) -> Offered {
        let connection = *self.connection.lock().expect("connection lock");
        inbox.offer(Delivery {
            publish,
            connection,
        })
    }

    /// The connection is gone: from now on an ack for what came on it
    /// would land on the next one, where its packet id names another
    /// message. Called with the event loop's error, before it reconnects.
    fn connection_lost(&self, eventloop: &mut EventLoop, inbox: &inbox::Sender) {
        // Publishes read in the same burst as the failure are still queued
        // in the event loop, which would hand them out after the reconnect
        // as if they came on the new connection.
        let buffered: Vec<Publish> = eventloop
            .state
            .events
            .drain(..)
            .filter_map(|event| match event {
                Event::Incoming(Packet::Publish(publish)) => Some(publish),
                _ => None,
            })
            .collect();
        for publish in buffered {
            let _ = self.take(inbox, publish);
        }
        *self.connection.lock().expect("connection lock") += 1;
        // rumqttc dropped the acks waiting in its request channel when the
        // connection failed; one queued since (before the line above) would
        // still go out on the next connection. `clean` drops it too.
        eventloop.clean();
    }

    /// Acknowledges a committed batch's QoS 1 messages, each on the
    /// connection it came on and nowhere else. One from an earlier
    /// connection is withheld: if the broker kept the session it sends the
    /// message again (a duplicate, dropped and then acknowledged); if not,
    /// it has forgotten it.
    async fn acknowledge(&self, batch: &[Delivery]) {
        let mut withheld = 0;
        for delivery in batch.iter().filter(|d| d.publish.qos != QoS::AtMostOnce) {
            loop {
                // Held while queueing, so the client task cannot begin a new
                // connection between the check and the queueing.
                let queued = {
                    let current = self.connection.lock().expect("connection lock");
                    if *current != delivery.connection {
                        withheld += 1;
                        break;
                    }
                    self.client.try_ack(&delivery.publish)
                };
                if queued.is_ok() {
                    break;
                }
                // The request channel is full (never waited on under the
                // lock, which the event loop's task needs): let it drain.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        if withheld > 0 {
            self.stats.acks_withheld.inc_by(withheld);
            tracing::info!(
                withheld,
                "acks withheld: their messages came on an earlier connection"
            );
        }
    }

    /// Stores a batch (retrying while Postgres is down, splitting it where
    /// Postgres refuses part of it), then acknowledges it to the broker,
    /// then publishes the alerts it raised.
    async fn store(&self, batch: Vec<Delivery>, stop: &CancellationToken) {
        let decoded = decode(self, &batch);
        let accepted = decoded.accepted as u64;
        let Some(Written {
            stored,
            alerts,
            foreign_acks,
            refused_readings,
        }) = self.write_all(decoded, stop).await
        else {
            // Unacknowledged: the broker sends it again later, to this
            // client id, so its session is kept.
            self.keep_session.store(true, Ordering::SeqCst);
            return;
        };
        self.stats.batches.inc();
        self.stats.rejected.inc_by(foreign_acks);
        self.stats.stored.inc_by(stored);
        self.stats
            .duplicates
            .inc_by(accepted.saturating_sub(stored + refused_readings));
        self.acknowledge(&batch).await;
        for alert in alerts {
            self.stats.alerts.inc();
            tracing::info!(device = %alert.device_id, seq = alert.seq, "alert");
            let payload = serde_json::to_vec(&alert).expect("alerts serialise");
            let topic = self.topics.alert(&alert.device_id);
            if let Err(err) = self
                .client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
            {
                tracing::warn!(%err, "alert stored but not published");
            }
        }
    }

    /// Writes `decoded`, in parts if need be. Postgres down (or any error
    /// that is not about the data): the part is retried, with backoff, until
    /// `stop` (then `None`). Postgres refusing the data ([`is_refused`]):
    /// the part is split in two, down to the one message it refuses, which
    /// becomes a reject with Postgres's reason; the rest is stored.
    async fn write_all(&self, decoded: Decoded, stop: &CancellationToken) -> Option<Written> {
        let mut total = Written::default();
        let mut pending = vec![decoded];
        let mut backoff = Backoff::reconnect();
        while let Some(part) = pending.pop() {
            match self.write(&part).await {
                Ok(written) => total.add(written),
                Err(err) if is_refused(&err) => self.split(part, &err, &mut pending, &mut total),
                Err(err) => {
                    if lab_core::postgres::is_unavailable(&err) {
                        tracing::warn!("{}", lab_core::postgres::describe(&self.pool, &err));
                    } else {
                        tracing::error!(%err, "storing a batch failed; retrying");
                    }
                    pending.push(part);
                    tokio::select! {
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                        () = stop.cancelled() => return None,
                    }
                }
            }
        }
        Some(total)
    }

    /// A part Postgres refused: its halves go back to `pending`, or, for
    /// one message, a reject in its place. A reject Postgres refuses is
    /// logged and dropped: nothing is left to split.
    fn split(
        &self,
        part: Decoded,
        err: &sqlx::Error,
        pending: &mut Vec<Decoded>,
        total: &mut Written,
    ) {
        if part.len() > 1 {
            let (front, back) = part.halves();
            pending.push(back);
            pending.push(front);
            return;
        }
        let Some(unit) = part.into_units().pop() else {
            return;
        };
        let reason = match err {
            sqlx::Error::Database(db) => format!(
                "Postgres refused it: {} (SQLSTATE {})",
                db.message(),
                db.code().unwrap_or_default()
            ),
            _ => format!("Postgres refused it: {err}"),
        };
        if matches!(unit, Unit::Reading(_)) {
            total.refused_readings += 1;
        }
        match unit.into_reject(&self.topics, &reason) {
            Some(reject) => {
                tracing::warn!(topic = %reject.topic, %reason, "rejected by Postgres");
                self.stats.rejected.inc();
                pending.push(Decoded {
                    rejects: vec![reject],
                    ..Decoded::default()
                });
            }
            None => tracing::error!(%reason, "a reject was refused by Postgres; dropped"),
        }
    }

    /// Writes one batch, and the alerts it completes, in one transaction. Alerts in the same transaction: were they judged
    /// after the acks, a crash in between would lose them for good.
    async fn write(&self, d: &Decoded) -> Result<Written, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let stored = insert_readings(&mut tx, &d.readings).await?;
        update_devices(&mut tx, &d.readings, &d.statuses).await?;
        let foreign = acknowledge_commands(&mut tx, &self.topics, &d.acks).await?;
        rejects::insert(&mut tx, &d.rejects).await?;
        rejects::insert(&mut tx, &foreign).await?;
        let alerts = self.raise_alerts(&mut tx, &d.readings).await?;
        tx.commit().await?;
        Ok(Written {
            stored,
            alerts,
            foreign_acks: foreign.len() as u64,
            refused_readings: 0,
        })
    }

    /// Raises an alert where `ALERT_CONSECUTIVE` readings in a row (by seq)
    /// are above `ALERT_THRESHOLD_C`. With two instances a device's readings
    /// are split between them and may be stored out of order, so the run is
    /// judged from the table, under a per-device advisory lock (held to the
    /// commit, so the other instance's evaluation sees these readings), not
    /// from what one instance happened to see.
    async fn raise_alerts(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        readings: &[Reading],
    ) -> Result<Vec<Alert>, sqlx::Error> {
        let threshold = self.settings.alert_threshold_c;
        let run = i64::from(self.settings.alert_consecutive.max(1));
        // Devices with a high reading in this batch, with the seqs to look
        // around (seqs are at most MAX_SEQ, so this cannot overflow).
        let mut hot: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
        for r in readings.iter().filter(|r| r.temperature_c > threshold) {
            let span = hot.entry(&r.device_id).or_insert((r.seq, r.seq));
            span.0 = span.0.min(r.seq);
            span.1 = span.1.max(r.seq);
        }
        let mut raised = Vec::new();
        for (device, (low, high)) in hot {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext('telemetry-alert:' || $1))")
                .bind(device)
                .execute(&mut **tx)
                .await?;
            let from = low - run;
            let window: Vec<(i64, f64, DateTime<Utc>)> = sqlx::query_as(
                "SELECT seq, temperature_c, ts FROM readings \
                 WHERE device_id = $1 AND seq BETWEEN $2 AND $3 ORDER BY seq",
            )
            .bind(device)
            .bind(from)
            .bind(high + run)
            .fetch_all(&mut **tx)
            .await?;
            for (end, block) in completed_runs(&window, from, threshold, run) {
                let (seq, temperature_c, ts) = window[end];
                // One alert per run of high readings, wherever in the run an
                // earlier evaluation (out of order) placed it.
                let inserted: Option<i64> = sqlx::query_scalar(
                    "INSERT INTO alerts (device_id, seq, temperature_c, threshold_c, readings, ts) \
                     SELECT $1, $2, $3, $4, $5, $6 \
                     WHERE NOT EXISTS (SELECT 1 FROM alerts WHERE device_id = $1 \
                                       AND seq BETWEEN $7 AND $8) \
                     ON CONFLICT (device_id, seq) DO NOTHING RETURNING id",
                )
                .bind(device)
                .bind(seq)
                .bind(temperature_c)
                .bind(threshold)
                .bind(run as i32)
                .bind(ts)
                .bind(block.0)
                .bind(block.1)
                .fetch_optional(&mut **tx)
                .await?;
                if inserted.is_some() {
                    raised.push(Alert {
                        device_id: device.to_owned(),
                        seq,
                        temperature_c,
                        threshold_c: threshold,
                        readings: run as i32,
                        ts,
                    });
                }
            }
        }
        Ok(raised)
    }
}

/// Where, in `window` (one device's readings from seq `from`, by seq), a
/// run of exactly `run` consecutive seqs above `threshold` is completed:
/// readings `end-run+1..=end` are all there and high, and the one before
/// them is not high, or not there. Each comes with the seqs of its whole
/// block of consecutive high readings, as far as the window shows it.
///
/// A block that begins at the window's first seq may begin earlier: its
/// predecessor was not fetched. Its run was judged when the reading that
/// completed it was stored, so it is skipped here; without that, a device
/// that stays hot would raise an alert every `run` readings.
fn completed_runs(
    window: &[(i64, f64, DateTime<Utc>)],
    from: i64,
    threshold: f64,
    run: i64,
) -> Vec<(usize, (i64, i64))> {
    let mut ends = Vec::new();
    let mut length = 0i64;
    let mut unknown_start = false;
    for (i, &(seq, temperature, _)) in window.iter().enumerate() {
        let follows = i > 0 && window[i - 1].0 == seq - 1;
        if temperature <= threshold {
            length = 0;
            continue;
        }
        if follows && length > 0 {
            length += 1;
        } else {
            length = 1;
            unknown_start = seq == from;
        }
        if length == run && !unknown_start {
            ends.push(i);
        }
    }
    // Each block's extent, for the completed runs in it.
    ends.into_iter()
        .map(|end| {
            let mut first = end;
            while first > 0
                && window[first - 1].0 == window[first].0 - 1
                && window[first - 1].1 > threshold
            {
                first -= 1;
            }
            let mut last = end;
            while last + 1 < window.len()
                && window[last + 1].0 == window[last].0 + 1
                && window[last + 1].1 > threshold
            {
                last += 1;
            }
            (end, (window[first].0, window[last].0))
        })
        .collect()
}

/// What one batch's transactions did.
#[derive(Default)]
struct Written {
    /// Readings that were new (the rest were redeliveries).
    stored: u64,
    alerts: Vec<Alert>,
    /// Acks that named another device's command, kept as rejects.
    foreign_acks: u64,
    /// Readings Postgres refused, kept as rejects.
    refused_readings: u64,
}

impl Written {
    fn add(&mut self, other: Written) {
        self.stored += other.stored;
        self.alerts.extend(other.alerts);
        self.foreign_acks += other.foreign_acks;
        self.refused_readings += other.refused_readings;
    }
}

/// What Postgres refuses because of the data itself, and would refuse again
/// however often it were sent: data exceptions (SQLSTATE class 22),
/// integrity violations (23), and limits exceeded (54: a B-tree entry over
/// ~2,700 bytes). Retried, such a batch would stall the stream for good.
fn is_refused(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db)
        if db.code().is_some_and(|code| ["22", "23", "54"].iter().any(|class| code.starts_with(class))))
}

/// One message of a batch, as decoded: what a refused batch is split into.
enum Unit {
    Reading(Reading),
    Status(String, bool),
    Ack(Ack),
    Reject(Reject),
}

impl Unit {
    /// This message as a reject with `reason`; a reject has none.
    fn into_reject(self, topics: &Topics, reason: &str) -> Option<Reject> {
        let (topic, payload) = match self {
            Unit::Reading(r) => (
                topics.telemetry(&r.device_id),
                serde_json::to_vec(&r).expect("readings serialise"),
            ),
            Unit::Status(id, online) => (
                topics.status(&id),
                if online { "online" } else { "offline" }.into(),
            ),
            Unit::Ack(a) => (
                topics.acks(&a.device_id),
                serde_json::to_vec(&a).expect("acks serialise"),
            ),
            Unit::Reject(_) => return None,
        };
        Some(Reject::new(topic.as_bytes(), &payload, reason))
    }
}

impl Decoded {
    /// How many messages it writes.
    fn len(&self) -> usize {
        self.readings.len() + self.statuses.len() + self.acks.len() + self.rejects.len()
    }

    fn into_units(self) -> Vec<Unit> {
        let readings = self.readings.into_iter().map(Unit::Reading);
        let statuses = self
            .statuses
            .into_iter()
            .map(|(id, on)| Unit::Status(id, on));
        let acks = self.acks.into_iter().map(Unit::Ack);
        let rejects = self.rejects.into_iter().map(Unit::Reject);
        readings
            .chain(statuses)
            .chain(acks)
            .chain(rejects)
            .collect()
    }

    /// Two parts of about half each, in order (readings stay sorted).
    fn halves(self) -> (Decoded, Decoded) {
        let mut front = self.into_units();
        let back = front.split_off(front.len() / 2);
        (Decoded::from_units(front), Decoded::from_units(back))
    }

    fn from_units(units: Vec<Unit>) -> Decoded {
        let mut d = Decoded::default();
        for unit in units {
            match unit {
                Unit::Reading(r) => d.readings.push(r),
                Unit::Status(id, online) => {
                    d.statuses.insert(id, online);
                }
                Unit::Ack(a) => d.acks.push(a),
                Unit::Reject(r) => d.rejects.push(r),
            }
        }
        d.accepted = d.readings.len();
        d
    }
}

/// Marks commands acknowledged, each by its own device only: the ack's
/// device (checked against its topic) must be the command's. Without that
/// filter any device could acknowledge any command whose id it learned.
/// Returns the acks that named another device's command, as rejects.
async fn acknowledge_commands(
    tx: &mut Transaction<'_, Postgres>,
    topics: &Topics,
    acks: &[Ack],
) -> Result<Vec<Reject>, sqlx::Error> {
    if acks.is_empty() {
        return Ok(vec![]);
    }
    let ids: Vec<uuid::Uuid> = acks.iter().map(|a| a.command_id).collect();
    let devices: Vec<&str> = acks.iter().map(|a| a.device_id.as_str()).collect();
    sqlx::query(
        "UPDATE commands c SET status = 'acknowledged', acked_at = now() \
         FROM UNNEST($1::uuid[], $2::text[]) AS a(id, device_id) \
         WHERE c.id = a.id AND c.device_id = a.device_id AND c.status = 'pending'",
    )
    .bind(&ids)
    .bind(&devices)
    .execute(&mut **tx)
    .await?;
    let foreign: Vec<(uuid::Uuid, String)> = sqlx::query_as(
        "SELECT a.id, a.device_id FROM UNNEST($1::uuid[], $2::text[]) AS a(id, device_id) \
         JOIN commands c ON c.id = a.id WHERE c.device_id <> a.device_id",
    )
    .bind(&ids)
    .bind(&devices)
    .fetch_all(&mut **tx)
    .await?;
    Ok(foreign
        .into_iter()
        .map(|(id, device)| {
            let ack = acks
                .iter()
                .find(|a| a.command_id == id && a.device_id == device);
            let payload = ack.map(|a| serde_json::to_vec(a).expect("acks serialise"));
            Reject::new(
                topics.acks(&device).as_bytes(),
                &payload.unwrap_or_default(),
                &format!("ack for command {id}, which was sent to another device"),
            )
        })
        .collect())
}

async fn insert_readings(
    tx: &mut Transaction<'_, Postgres>,
    readings: &[Reading],
) -> Result<u64, sqlx::Error> {
    if readings.is_empty() {
        return Ok(0);
    }
    let result = sqlx::query(
        "INSERT INTO readings (device_id, seq, ts, temperature_c, humidity_pct, battery_pct) \
         SELECT * FROM UNNEST($1::text[], $2::int8[], $3::timestamptz[], $4::float8[], $5::float8[], $6::float8[]) \
         ON CONFLICT (device_id, seq) DO NOTHING",
    )
    .bind(readings.iter().map(|r| r.device_id.clone()).collect::<Vec<_>>())
    .bind(readings.iter().map(|r| r.seq).collect::<Vec<_>>())
    .bind(readings.iter().map(|r| r.ts).collect::<Vec<_>>())
    .bind(readings.iter().map(|r| r.temperature_c).collect::<Vec<_>>())
    .bind(readings.iter().map(|r| r.humidity_pct).collect::<Vec<_>>())
    .bind(readings.iter().map(|r| r.battery_pct).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(result.rows_affected())
}

/// One upsert per device, in id order (two instances writing the same
/// devices lock them in the same order, so they cannot deadlock): the
/// newest reading (if newer than the stored one) and the status.
async fn update_devices(
    tx: &mut Transaction<'_, Postgres>,
    readings: &[Reading],
    statuses: &BTreeMap<String, bool>,
) -> Result<(), sqlx::Error> {
    let mut newest: BTreeMap<&str, &Reading> = BTreeMap::new();
    for r in readings {
        newest.insert(&r.device_id, r); // sorted by seq: the last one wins
    }
    let mut ids: Vec<&str> = newest.keys().copied().collect();
    ids.extend(statuses.keys().map(String::as_str));
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Ok(());
    }
    let reading = |id: &str| newest.get(id).copied();
    sqlx::query(
        "INSERT INTO devices AS d (id, online, status_at, last_seen, last_seq, last_ts, \
                                   last_temperature_c, last_humidity_pct, last_battery_pct) \
         SELECT id, coalesce(online, false), CASE WHEN online IS NULL THEN NULL ELSE now() END, \
                CASE WHEN seq IS NULL THEN NULL ELSE now() END, seq, ts, t, h, b \
         FROM UNNEST($1::text[], $2::bool[], $3::int8[], $4::timestamptz[], $5::float8[], $6::float8[], $7::float8[]) \
              AS u(id, online, seq, ts, t, h, b) \
         ON CONFLICT (id) DO UPDATE SET \
           online = CASE WHEN EXCLUDED.status_at IS NULL THEN d.online ELSE EXCLUDED.online END, \
           status_at = coalesce(EXCLUDED.status_at, d.status_at), \
           last_seen = coalesce(EXCLUDED.last_seen, d.last_seen), \
           last_seq = CASE WHEN EXCLUDED.last_seq > coalesce(d.last_seq, -1) THEN EXCLUDED.last_seq ELSE d.last_seq END, \
           last_ts = CASE WHEN EXCLUDED.last_seq > coalesce(d.last_seq, -1) THEN EXCLUDED.last_ts ELSE d.last_ts END, \
           last_temperature_c = CASE WHEN EXCLUDED.last_seq > coalesce(d.last_seq, -1) THEN EXCLUDED.last_temperature_c ELSE d.last_temperature_c END, \
           last_humidity_pct = CASE WHEN EXCLUDED.last_seq > coalesce(d.last_seq, -1) THEN EXCLUDED.last_humidity_pct ELSE d.last_humidity_pct END, \
           last_battery_pct = CASE WHEN EXCLUDED.last_seq > coalesce(d.last_seq, -1) THEN EXCLUDED.last_battery_pct ELSE d.last_battery_pct END",
    )
    .bind(&ids)
    .bind(ids.iter().map(|id| statuses.get(*id).copied()).collect::<Vec<Option<bool>>>())
    .bind(ids.iter().map(|id| reading(id).map(|r| r.seq)).collect::<Vec<_>>())
    .bind(ids.iter().map(|id| reading(id).map(|r| r.ts)).collect::<Vec<_>>())
    .bind(ids.iter().map(|id| reading(id).map(|r| r.temperature_c)).collect::<Vec<_>>())
    .bind(ids.iter().map(|id| reading(id).map(|r| r.humidity_pct)).collect::<Vec<_>>())
    .bind(ids.iter().map(|id| reading(id).map(|r| r.battery_pct)).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::completed_runs;

    #[test]
    fn a_run_completes_once_at_exactly_n() {
        let t = chrono::Utc::now();
        let w = |temps: &[(i64, f64)]| -> Vec<(i64, f64, chrono::DateTime<chrono::Utc>)> {
            temps.iter().map(|&(s, c)| (s, c, t)).collect()
        };
        let ends = |temps: &[(i64, f64)], from: i64| -> Vec<i64> {
            let window = w(temps);
            completed_runs(&window, from, 30.0, 3)
                .into_iter()
                .map(|(end, _)| window[end].0)
                .collect()
        };
        // 31 at seqs 1..4: a run of three completes at seq 3 only.
        assert_eq!(
            ends(&[(1, 31.0), (2, 31.0), (3, 31.0), (4, 31.0)], 0),
            vec![3]
        );
        // Two high, a normal one, three high: only the second run.
        let mixed = [
            (1, 31.0),
            (2, 31.0),
            (3, 20.0),
            (4, 31.0),
            (5, 31.0),
            (6, 31.0),
        ];
        assert_eq!(ends(&mixed, 0), vec![6]);
        // A gap in the seqs breaks the run.
        assert!(ends(&[(1, 31.0), (2, 31.0), (4, 31.0)], 0).is_empty());
        // Exactly at the threshold is not above it.
        assert!(ends(&[(1, 30.0), (2, 30.0), (3, 30.0)], 0).is_empty());
        // Still hot: a window that starts inside the run (seq 7 arrived,
        // window from 4) must not see a new run at 6.
        let hot: Vec<(i64, f64)> = (4..=10).map(|s| (s, 31.0)).collect();
        assert!(ends(&hot, 4).is_empty());
        // The block reaches as far as the window shows it.
        let window = w(&[(1, 31.0), (2, 31.0), (3, 31.0), (4, 31.0), (5, 20.0)]);
        assert_eq!(completed_runs(&window, 0, 30.0, 3), vec![(2, (1, 4))]);
    }
}
