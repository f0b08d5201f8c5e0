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
//! The connection itself (the session, its subscriptions, reconnecting
//! after a broker restart, leaving on shutdown) is [`crate::session`].

use std::{collections::BTreeMap, sync::atomic::Ordering, time::Duration};

use chrono::{DateTime, Utc};
use lab_core::backoff::Backoff;
use rumqttc::v5::mqttbytes::QoS;
use sqlx::{Postgres, Transaction};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    App, Topics,
    inbox::{self, Delivery},
    mqtt::{Kind, check_device_id},
    payload::{Ack, Alert, Reading, Status, parse_status},
    rejects::{self, Reject},
};

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
    statuses: BTreeMap<String, Status>,
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
            refused_acks,
            refused_readings,
        }) = self.write_all(decoded, stop).await
        else {
            // Unacknowledged: the broker sends it again later, to this
            // client id, so its session is kept.
            self.keep_session.store(true, Ordering::SeqCst);
            return;
        };
        self.stats.batches.inc();
        self.stats.rejected.inc_by(refused_acks);
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
        let refused = acknowledge_commands(&mut tx, &self.topics, &d.acks).await?;
        rejects::insert(&mut tx, &d.rejects).await?;
        rejects::insert(&mut tx, &refused).await?;
        let alerts = self.raise_alerts(&mut tx, &d.readings).await?;
        tx.commit().await?;
        Ok(Written {
            stored,
            alerts,
            refused_acks: refused.len() as u64,
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
    /// Acks refused (another device's command, or an expired one), kept
    /// as rejects.
    refused_acks: u64,
    /// Readings Postgres refused, kept as rejects.
    refused_readings: u64,
}

impl Written {
    fn add(&mut self, other: Written) {
        self.stored += other.stored;
        self.alerts.extend(other.alerts);
        self.refused_acks += other.refused_acks;
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
    Status(String, Status),
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
            Unit::Status(id, status) => (topics.status(&id), status.as_str().into()),
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
            .map(|(id, status)| Unit::Status(id, status));
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
                Unit::Status(id, status) => {
                    d.statuses.insert(id, status);
                }
                Unit::Ack(a) => d.acks.push(a),
                Unit::Reject(r) => d.rejects.push(r),
            }
        }
        d.accepted = d.readings.len();
        d
    }
}

/// Marks commands acknowledged, each by its own device only and only
/// before it expires: the ack's device (checked against its topic) must be
/// the command's, else any device could acknowledge any command whose id
/// it learned; and an expired command stays expired (its sender was told
/// so, and may have sent another). Returns the acks refused for either
/// reason, as rejects.
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
         WHERE c.id = a.id AND c.device_id = a.device_id AND c.status = 'pending' \
           AND c.expires_at > now()",
    )
    .bind(&ids)
    .bind(&devices)
    .execute(&mut **tx)
    .await?;
    let refused: Vec<(uuid::Uuid, String, bool)> = sqlx::query_as(
        "SELECT a.id, a.device_id, c.device_id <> a.device_id \
         FROM UNNEST($1::uuid[], $2::text[]) AS a(id, device_id) JOIN commands c ON c.id = a.id \
         WHERE c.device_id <> a.device_id OR (c.status = 'pending' AND c.expires_at <= now())",
    )
    .bind(&ids)
    .bind(&devices)
    .fetch_all(&mut **tx)
    .await?;
    Ok(refused
        .into_iter()
        .map(|(id, device, foreign)| {
            let ack = acks
                .iter()
                .find(|a| a.command_id == id && a.device_id == device);
            let payload = ack.map(|a| serde_json::to_vec(a).expect("acks serialise"));
            let reason = if foreign {
                format!("ack for command {id}, which was sent to another device")
            } else {
                format!("ack for command {id}, which had expired")
            };
            Reject::new(
                topics.acks(&device).as_bytes(),
                &payload.unwrap_or_default(),
                &reason,
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
    statuses: &BTreeMap<String, Status>,
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
        "INSERT INTO devices AS d (id, online, status, status_at, last_seen, last_seq, last_ts, \
                                   last_temperature_c, last_humidity_pct, last_battery_pct) \
         SELECT id, coalesce(status = 'online', false), coalesce(status, 'offline'), \
                CASE WHEN status IS NULL THEN NULL ELSE now() END, \
                CASE WHEN seq IS NULL THEN NULL ELSE now() END, seq, ts, t, h, b \
         FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::timestamptz[], $5::float8[], $6::float8[], $7::float8[]) \
              AS u(id, status, seq, ts, t, h, b) \
         ON CONFLICT (id) DO UPDATE SET \
           online = CASE WHEN EXCLUDED.status_at IS NULL THEN d.online ELSE EXCLUDED.online END, \
           status = CASE WHEN EXCLUDED.status_at IS NULL THEN d.status ELSE EXCLUDED.status END, \
           status_at = coalesce(EXCLUDED.status_at, d.status_at), \
           last_seen = coalesce(EXCLUDED.last_seen, d.last_seen), \
           last_seq = CASE WHEN EXCLUDED.last_seq > coalesce(d.last_seq, -1) THEN EXCLUDED.last_seq ELSE d.last_seq END, \
           last_ts = CASE WHEN EXCLUDED.last_seq > coalesce(d.last_seq, -1) THEN EXCLUDED.last_ts ELSE d.last_ts END, \
           last_temperature_c = CASE WHEN EXCLUDED.last_seq > coalesce(d.last_seq, -1) THEN EXCLUDED.last_temperature_c ELSE d.last_temperature_c END, \
           last_humidity_pct = CASE WHEN EXCLUDED.last_seq > coalesce(d.last_seq, -1) THEN EXCLUDED.last_humidity_pct ELSE d.last_humidity_pct END, \
           last_battery_pct = CASE WHEN EXCLUDED.last_seq > coalesce(d.last_seq, -1) THEN EXCLUDED.last_battery_pct ELSE d.last_battery_pct END",
    )
    .bind(&ids)
    .bind(ids.iter().map(|id| statuses.get(*id).map(|s| s.as_str())).collect::<Vec<_>>())
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
