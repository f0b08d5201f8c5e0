//! The ingest's connection to the broker: its session, its subscriptions,
//! getting them back after a broker restart, and leaving on shutdown.
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
//!
//! **A broker restart: the subscription must be back before the devices
//! are.** A device's reading is acknowledged by the broker once it has
//! routed it, and routed to nobody, it is acknowledged all the same and
//! dropped (MQTT 3.1.1 has no way to say "no subscriber"). After a restart
//! the devices reconnect and flush what they buffered: whatever arrives
//! before the ingest's subscription exists again is gone. The broker keeps
//! the subscriptions of a persistent session in its snapshot, but
//! Mosquitto 2.0 (2.0.11 here, measured; the 2.0 series' snapshot code
//! writes plain subscriptions only) restores a session without its shared
//! ones: the group has no member until an ingest subscribes again. With
//! the ingest waiting as the devices do (up to 5 s), three devices at 50
//! readings a second lost 21–368 acknowledged readings in 12 of 18 runs.
//! So:
//! - **one ingest subscribes plainly** (`TELEMETRY_SHARE_GROUP` empty, the
//!   default): its subscription is in the snapshot and comes back with the
//!   session, and what devices flush before the ingest returns is queued
//!   for it. Measured: nothing lost across a `kill -9` of the broker. (The
//!   snapshot must have been taken since the subscription: every 2 s with
//!   the lab's `autosave_interval 1`, every 30 min by default.)
//! - **a share group** (compose's two ingests) cannot get that from
//!   Mosquitto 2.0; the ingest retries every ~100 ms ([`retry`]), not on
//!   the devices' schedule, so the group is empty for one reconnect and
//!   subscribe at most. Measured: 102 readings lost in 1 of 18 runs (one
//!   device back within that window).
//!
//! Rejected: a plain subscription for several instances (each would get
//! every reading: the work done twice, the split gone); devices that keep
//! a reading when MQTT 5's PUBACK says "no matching subscribers" (the
//! lab's devices speak 3.1.1, as most small devices do); and waiting for
//! the broker to keep shared subscriptions (2.1 rewrote its persistence;
//! unverified here).

use std::{sync::atomic::Ordering, time::Duration};

use lab_core::backoff::Backoff;
use rumqttc::v5::{
    AsyncClient, Event, EventLoop,
    mqttbytes::{
        QoS,
        v5::{Filter, Packet, Publish, SubscribeReasonCode},
    },
};
use tokio_util::sync::CancellationToken;

use crate::{
    App, Broker, Settings,
    inbox::{self, Delivery, Offered},
    mqtt::Kind,
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

/// The subscriptions: telemetry and acks, shared by the instances of a
/// share group (each message goes to one of them) or, with no group, plain;
/// statuses heard by all (retained messages are not sent to shared
/// subscriptions).
fn filters(app: &App) -> Vec<Filter> {
    let split = |filter: String| match app.settings.share_group.as_str() {
        "" => filter,
        group => format!("$share/{group}/{filter}"),
    };
    vec![
        Filter::new(split(app.topics.every(Kind::Telemetry)), app.settings.qos()),
        Filter::new(split(app.topics.every(Kind::Acks)), QoS::AtLeastOnce),
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
    let mut backoff = retry();
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

/// The ingest's wait before it connects again: 20 ms, doubling, up to
/// 100 ms, far shorter than the devices' 5 s. After a broker restart every
/// moment the ingest is away is a moment its share group has no member,
/// and the broker drops what the devices send meanwhile. The jitter and the
/// long cap that keep thousands of devices from storming a broker that
/// comes back are not needed by one or two ingests.
fn retry() -> Backoff {
    Backoff::new(Duration::from_millis(20), Duration::from_millis(100))
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
    } else if app.settings.share_group.is_empty() {
        tracing::info!("session ended");
    } else {
        tracing::info!(group = %app.settings.share_group, "left the share group; session ended");
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
}
