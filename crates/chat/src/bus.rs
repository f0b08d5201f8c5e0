//! How events travel: through Redis when it answers, locally when not.
//!
//! Every instance subscribes to every room's channel (one `PSUBSCRIBE`)
//! and hands what arrives to its [`Hub`](crate::hub::Hub). A message said on
//! instance A goes A → Redis → A and B alike, so both deliver it in the
//! order Redis published it. (Hearing every room keeps this simple; with
//! many instances and thousands of rooms, an instance would `SUBSCRIBE` to
//! a room when its first member there arrives.)
//!
//! Pub/sub delivers at most once, to whoever is subscribed at that moment;
//! history in the room's stream is what a (re)joining client catches up
//! from.
//!
//! When Redis is down the instance keeps serving the members it holds:
//! messages go straight to this instance's hub, with `local-…` ids and no
//! history, and every connection is told so with an `error` frame. When
//! Redis is back, a `notice` says so and presence is written again.

use std::{sync::atomic::Ordering, time::Duration};

use futures::StreamExt;
use lab_core::backoff::Backoff;
use tokio_util::sync::CancellationToken;

use crate::{
    App,
    hub::Outbound,
    protocol::{BusEvent, FrameError, ServerEvent, message},
    store::Snapshot,
};

const BACKOFF_MAX: Duration = Duration::from_secs(2);

impl App {
    /// Adds a connection to its room and announces it; returns what its
    /// welcome shows, and a warning when that had to be done locally.
    pub(crate) async fn join(
        &self,
        room: &str,
        name: &str,
        conn: &str,
    ) -> (Snapshot, Option<FrameError>) {
        if self.redis_up() {
            match self.store.join(room, name, conn).await {
                Ok(snapshot) => return (snapshot, None),
                Err(err) => self.redis_failed("join", &err),
            }
        }
        let members = self.hub.members(room);
        let joined = ServerEvent::Joined {
            room,
            name,
            members: &members,
        };
        self.hub.deliver(
            room,
            &Outbound {
                frame: joined.frame(),
                joined: Some(conn.into()),
                keep_for_late_joiners: false,
            },
        );
        let snapshot = Snapshot {
            members,
            history: Vec::new(),
        };
        (snapshot, Some(self.redis_down_warning()))
    }

    /// Says `text` in `room`. `Err` is a warning for the sender: the message
    /// reached only the members on this instance, or perhaps nobody.
    pub(crate) async fn say(&self, room: &str, name: &str, text: &str) -> Result<(), FrameError> {
        if self.redis_up() {
            match self.store.say(room, name, text).await {
                Ok(_id) => {
                    self.stats.said("redis");
                    return Ok(());
                }
                // No answer in time: the script may have run. Delivering it
                // locally as well could show it twice; say so instead.
                Err(err) if err.is_timeout() => {
                    self.redis_failed("say", &err);
                    return Err(FrameError::new(
                        "redis_timeout",
                        "Redis did not answer in time: the message may or may not have been sent",
                    ));
                }
                Err(err) => self.redis_failed("say", &err),
            }
        }
        let id = format!("local-{}", uuid::Uuid::now_v7().simple());
        let frame = ServerEvent::Message(&message(&id, room, name, text)).frame();
        self.deliver(room, &Outbound::notice(frame));
        self.stats.said("local");
        Err(self.redis_down_warning())
    }

    /// Takes a connection out of its room's presence and announces it.
    pub(crate) async fn leave(&self, room: &str, name: &str, conn: &str) {
        if self.redis_up() {
            match self.store.leave(room, name, conn).await {
                Ok(()) => return,
                // Its presence entry stays in Redis until it expires and a
                // sweep announces the leave there.
                Err(err) => self.redis_failed("leave", &err),
            }
        }
        let members = self.hub.members(room);
        let left = ServerEvent::Left {
            room,
            name,
            members: &members,
        };
        self.deliver(room, &Outbound::event(left.frame()));
    }

    fn deliver(&self, room: &str, out: &Outbound) {
        let delivery = self.hub.deliver(room, out);
        self.stats.delivered(delivery);
    }

    fn redis_up(&self) -> bool {
        self.redis_up.load(Ordering::SeqCst)
    }

    fn redis_failed(&self, what: &str, err: &redis::RedisError) {
        tracing::warn!(
            "chat {what}: {}",
            lab_core::redis::describe(&self.redis_place, err)
        );
    }

    fn redis_down_warning(&self) -> FrameError {
        FrameError::new(
            "redis_unavailable",
            format!(
                "Redis at {} is not reachable: messages reach only members on this \
                 instance ({}), and are not kept in history",
                self.redis_place, self.settings.instance
            ),
        )
    }

    /// Records whether the bus is subscribed, and tells every connection
    /// when that changes.
    fn set_redis_up(&self, up: bool) {
        let was = self.redis_up.swap(up, Ordering::SeqCst);
        self.stats.redis_up.set(i64::from(up));
        if was == up {
            return;
        }
        let frame = if up {
            tracing::info!(redis = %self.redis_place, "chat bus subscribed");
            self.presence_lost.notify_one();
            ServerEvent::Notice {
                code: "redis_restored",
                message: "Redis is back: messages reach every instance again",
            }
            .frame()
        } else {
            let warning = self.redis_down_warning();
            tracing::warn!("{}", warning.message);
            ServerEvent::Error {
                code: warning.code,
                message: &warning.message,
            }
            .frame()
        };
        let delivery = self.hub.broadcast(&Outbound::notice(frame));
        self.stats.delivered(delivery);
    }

    fn on_bus_message(&self, msg: &redis::Msg) {
        let payload: &[u8] = msg.get_payload_bytes();
        let event: BusEvent = match serde_json::from_slice(payload) {
            Ok(event) => event,
            Err(err) => {
                tracing::warn!(%err, channel = msg.get_channel_name(), "ignoring a bus message");
                return;
            }
        };
        let joined = match &event {
            BusEvent::Joined { conn, .. } => Some(conn.as_str().into()),
            _ => None,
        };
        let out = Outbound {
            frame: event.frame(),
            joined,
            keep_for_late_joiners: false,
        };
        self.deliver(event.room(), &out);
    }
}

/// Subscribes to every room's channel and feeds the hub, reconnecting with
/// backoff whenever the subscription breaks.
pub async fn subscribe(app: App, stop: CancellationToken) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(Duration::from_millis(100), BACKOFF_MAX);
    loop {
        let connect = async {
            let mut pubsub =
                tokio::time::timeout(Duration::from_secs(2), app.redis_client.get_async_pubsub())
                    .await
                    .map_err(|_| {
                        redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
                    })??;
            pubsub.psubscribe(app.store.pattern()).await?;
            redis::RedisResult::Ok(pubsub)
        };
        let connected = tokio::select! {
            connected = connect => connected,
            () = stop.cancelled() => return Ok(()),
        };
        match connected {
            Ok(pubsub) => {
                backoff.reset();
                app.set_redis_up(true);
                let (mut sink, mut messages) = pubsub.split();
                // A subscriber only listens, so a connection that died
                // without a word (a dropped NAT entry, a pulled cable) looks
                // like a quiet one: the instance would go deaf to every other
                // instance until TCP gave up, hours later. A PING that has no
                // answer by the next one ends the subscription; a new one
                // replaces it.
                let mut ping =
                    tokio::time::interval(Duration::from_millis(app.settings.ping_interval_ms));
                ping.reset(); // the first tick waits a whole interval
                loop {
                    tokio::select! {
                        msg = messages.next() => match msg {
                            Some(msg) => app.on_bus_message(&msg),
                            None => break,
                        },
                        _ = ping.tick() => {
                            let answered = tokio::select! {
                                answered = tokio::time::timeout(ping.period(), sink.ping::<()>()) => answered,
                                () = stop.cancelled() => return Ok(()),
                            };
                            if !matches!(answered, Ok(Ok(()))) {
                                tracing::warn!("chat bus: Redis did not answer a PING on the subscription; subscribing again");
                                // The commands' connection most likely went
                                // the same way: do not wait for its timeouts.
                                app.store.redis().reconnect();
                                break;
                            }
                        }
                        () = stop.cancelled() => return Ok(()),
                    }
                }
                app.set_redis_up(false);
            }
            Err(err) => {
                if app.redis_up() {
                    app.set_redis_up(false);
                }
                tracing::debug!(
                    "chat bus: {}",
                    lab_core::redis::describe(&app.redis_place, &err)
                );
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff.next_delay()) => {}
            () = stop.cancelled() => return Ok(()),
        }
    }
}

/// Keeps this instance's connections present in Redis, and sweeps out
/// entries nobody refreshes any more (their instance died).
pub async fn keep_presence(app: App, stop: CancellationToken) -> anyhow::Result<()> {
    let ping = Duration::from_millis(app.settings.ping_interval_ms);
    let mut refresh = tokio::time::interval(ping);
    let mut sweep = tokio::time::interval(app.settings.sweep_interval());
    for timer in [&mut refresh, &mut sweep] {
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            _ = refresh.tick() => {}
            // Redis came back: entries may have been swept meanwhile.
            () = app.presence_lost.notified() => {}
            _ = sweep.tick() => {
                if app.redis_up() {
                    match app.store.sweep().await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(ghosts = n, "swept members whose instance stopped refreshing them"),
                        Err(err) => tracing::warn!(%err, "presence sweep failed"),
                    }
                }
                continue;
            }
        }
        if !app.redis_up() {
            continue;
        }
        // Under the presence lock: a connection cannot leave between the
        // snapshot and the refresh, and so cannot be put back as a ghost.
        let _presence = app.presence.lock().await;
        for (room, entries) in app.hub.presence() {
            if let Err(err) = app.store.refresh(&room, &entries).await {
                tracing::warn!(%err, room, "presence refresh failed");
            }
        }
    }
}
