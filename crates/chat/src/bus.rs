//! How events travel: through Redis when it answers, locally when not.
//!
//! Every instance subscribes to every room's channel (one `PSUBSCRIBE`)
//! and hands what arrives to its [`Hub`](crate::hub::Hub). A message said on
//! instance A goes A → Redis → A and B alike, so both deliver it in the
//! order Redis published it. (Hearing every room keeps this simple; with
//! many instances and thousands of rooms, an instance would `SUBSCRIBE` to
//! a room when its first member there arrives.)
//!
//! Pub/sub delivers at most once, to whoever is subscribed at that moment:
//! what is published while an instance's subscription is down never
//! reaches it. History in the room's stream is what makes up for it. A
//! (re)joining client catches up from its welcome; an instance that
//! subscribes again catches up each of its rooms before it counts as
//! subscribed: it reads the room's stream after the last message it
//! delivered there and delivers the rest. It subscribes first and reads
//! second, so nothing falls between the two; a message that comes both
//! ways is delivered once, because the [`Hub`](crate::hub::Hub) drops ids
//! a room already had. (A member who joined while Redis was down has no
//! place in the stream to catch up from; nor are `joined`/`left` events
//! replayed: the next one carries the whole member list.)
//!
//! When Redis is down the instance keeps serving the members it holds:
//! messages go straight to this instance's hub, with `local-…` ids and no
//! history, and every connection is told so with an `error` frame.
//!
//! When Redis is back, the instance writes all its presence again before
//! it counts as subscribed (and says so with a `notice`): a Redis that
//! restarted empty, or swept this instance's members while it could not
//! refresh them, has them back at once, the rooms listed again, and one
//! `members` frame per room naming who is back (see
//! [`protocol`](crate::protocol): a `joined` each would flood a big room).
//! The alternative, leaving it to
//! the next periodic refresh (20 s), was a window in which a newcomer's
//! welcome listed only itself and a member who left was never announced,
//! as its leave found no entry to remove; and a refresh that failed once
//! (the first command on a connection Redis had closed fails) made it 40 s.
//! A refresh that fails is retried within seconds, not at the next tick.

use std::{
    ops::ControlFlow,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use futures::StreamExt;
use lab_core::backoff::Backoff;
use tokio_util::sync::CancellationToken;

use crate::{
    App,
    hub::Outbound,
    protocol::{self, BusEvent, FrameError, MessageId, ServerEvent, message},
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
                Ok(snapshot) => {
                    let newest = snapshot.history.last().map(|m| m.id.as_str());
                    let end = newest.and_then(MessageId::parse);
                    self.hub.joined_at(room, end.unwrap_or(MessageId::ZERO));
                    return (snapshot, None);
                }
                Err(err) => self.redis_failed("join", &err),
            }
        }
        let members = self.hub.members(room);
        let joined = ServerEvent::Joined {
            room,
            name,
            members: &members,
            at: &protocol::now(),
        };
        let out = Outbound {
            frame: joined.frame(),
            joined: Some(conn.into()),
            keep_for_late_joiners: false,
        };
        // Only the joining connection waits for it if the name was here
        // already (the connection is in the hub by now: count it out).
        let again = self.hub.count_name(room, name) > 1;
        let delivery = if again {
            self.hub.deliver_to(room, conn, &out)
        } else {
            self.hub.deliver(room, &out)
        };
        self.stats.delivered(delivery);
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

    /// Takes a connection (already out of the hub) out of its room's
    /// presence, and announces the leave if it was its name's last.
    pub(crate) async fn leave(&self, room: &str, name: &str, conn: &str) {
        if self.redis_up() {
            match self.store.leave(room, name, conn).await {
                Ok(()) => return,
                // Its presence entry stays in Redis until it expires and a
                // sweep announces the leave there.
                Err(err) => self.redis_failed("leave", &err),
            }
        }
        if self.hub.count_name(room, name) > 0 {
            return;
        }
        let members = self.hub.members(room);
        let left = ServerEvent::Left {
            room,
            name,
            members: &members,
            at: &protocol::now(),
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
        let (joined, again) = match &event {
            BusEvent::Joined { conn, again, .. } => (conn.as_deref().map(Arc::from), *again),
            _ => (None, false),
        };
        let out = Outbound {
            frame: event.frame(),
            joined,
            keep_for_late_joiners: false,
        };
        let delivery = match (&event, &out.joined) {
            (BusEvent::Message { id, .. }, _) => match MessageId::parse(id) {
                Some(id) => self.hub.deliver_message(event.room(), id, &out),
                None => self.hub.deliver(event.room(), &out),
            },
            // A second tab of a present name: news to that tab alone.
            (_, Some(conn)) if again => self.hub.deliver_to(event.room(), conn, &out),
            _ => self.hub.deliver(event.room(), &out),
        };
        self.stats.delivered(delivery);
    }

    /// Delivers to each room here what it missed while the subscription
    /// was down: its stream after the last message it had.
    ///
    /// At most half a queue's worth per room, the newest, after a notice
    /// saying more were missed: a catch-up longer than a connection's
    /// queue would cut every member of the room off as too slow.
    async fn catch_up(&self) -> redis::RedisResult<()> {
        let limit = (self.settings.outbound_queue / 2).max(1);
        for (room, after) in self.hub.positions() {
            let mut missed = self.store.history_after(&room, after, limit + 1).await?;
            if missed.is_empty() {
                continue;
            }
            tracing::info!(room, messages = missed.len(), "chat bus: catching up");
            if missed.len() > limit {
                missed.remove(0);
                let message = format!(
                    "more messages were said here while this instance ({}) could not hear \
                     Redis than it replays; the newest {limit} follow, GET /rooms/{room}/messages \
                     has the others",
                    self.settings.instance
                );
                let notice = ServerEvent::Notice {
                    code: "messages_missed",
                    message: &message,
                };
                self.deliver(&room, &Outbound::notice(notice.frame()));
            }
            for message in &missed {
                let Some(id) = MessageId::parse(&message.id) else {
                    continue;
                };
                let out = Outbound::event(ServerEvent::Message(message).frame());
                let delivery = self.hub.deliver_message(&room, id, &out);
                self.stats.delivered(delivery);
            }
        }
        Ok(())
    }
}

/// Subscribes to every room's channel and feeds the hub, reconnecting with
/// backoff whenever the subscription breaks.
pub async fn subscribe(app: App, stop: CancellationToken) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(Duration::from_millis(100), BACKOFF_MAX);
    loop {
        let connected = tokio::select! {
            connected = connect(&app) => connected,
            () = stop.cancelled() => return Ok(()),
        };
        match connected {
            Ok(pubsub) => {
                backoff.reset();
                if listen(&app, pubsub, &stop).await.is_break() {
                    return Ok(());
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

/// Subscribes, catches every room up (what is published meanwhile waits in
/// the subscription, behind what the catch-up delivers), writes this
/// instance's presence again, and only then counts as up.
async fn connect(app: &App) -> redis::RedisResult<redis::aio::PubSub> {
    let mut pubsub =
        tokio::time::timeout(Duration::from_secs(2), app.redis_client.get_async_pubsub())
            .await
            .map_err(|_| {
                redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
            })??;
    pubsub.psubscribe(app.store.pattern()).await?;
    app.catch_up().await?;
    // Under the presence lock until it counts as up: a member joining
    // meanwhile is either in this write or joins through Redis after it.
    let _presence = app.presence.lock().await;
    app.write_presence().await?;
    app.set_redis_up(true);
    Ok(pubsub)
}

/// Hands what the subscription delivers to the hub until it breaks
/// (`Continue`: subscribe again) or the bus stops (`Break`).
async fn listen(
    app: &App,
    pubsub: redis::aio::PubSub,
    stop: &CancellationToken,
) -> ControlFlow<()> {
    let (mut sink, mut messages) = pubsub.split();
    // A subscriber only listens, so a connection that died without a word
    // (a dropped NAT entry, a pulled cable) looks like a quiet one: the
    // instance would go deaf to every other instance until TCP gave up,
    // hours later. A PING that has no answer by the next one ends the
    // subscription; a new one replaces it.
    let mut ping = tokio::time::interval(Duration::from_millis(app.settings.ping_interval_ms));
    ping.reset(); // the first tick waits a whole interval
    loop {
        tokio::select! {
            msg = messages.next() => match msg {
                Some(msg) => app.on_bus_message(&msg),
                None => return ControlFlow::Continue(()),
            },
            _ = ping.tick() => {
                let answered = tokio::select! {
                    answered = tokio::time::timeout(ping.period(), sink.ping::<()>()) => answered,
                    () = stop.cancelled() => return ControlFlow::Break(()),
                };
                if !matches!(answered, Ok(Ok(()))) {
                    tracing::warn!("chat bus: Redis did not answer a PING on the subscription; subscribing again");
                    // The commands' connection most likely went the same
                    // way: do not wait for its timeouts.
                    app.store.redis().reconnect();
                    return ControlFlow::Continue(());
                }
            }
            () = stop.cancelled() => return ControlFlow::Break(()),
        }
    }
}

/// Keeps this instance's connections present in Redis, and sweeps out
/// entries nobody refreshes any more (their instance died). A refresh that
/// fails is tried again after a short backoff, not at the next tick: the
/// entries must not expire meanwhile.
pub async fn keep_presence(app: App, stop: CancellationToken) -> anyhow::Result<()> {
    let ping = Duration::from_millis(app.settings.ping_interval_ms);
    let mut refresh = tokio::time::interval(ping);
    let mut sweep = tokio::time::interval(app.settings.sweep_interval());
    for timer in [&mut refresh, &mut sweep] {
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    let mut backoff = Backoff::new(Duration::from_millis(100), BACKOFF_MAX);
    let retry = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(retry);
    let mut failing = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            _ = refresh.tick() => {}
            () = &mut retry, if failing => {}
            _ = sweep.tick() => {
                sweep_ghosts(&app).await;
                continue;
            }
        }
        // While Redis is down the bus writes everything again once it is back.
        failing = false;
        if !app.redis_up() {
            continue;
        }
        // Under the presence lock: a connection cannot leave between the
        // snapshot and the refresh, and so cannot be put back as a ghost.
        let written = {
            let _presence = app.presence.lock().await;
            app.write_presence().await
        };
        match written {
            Ok(()) => backoff.reset(),
            Err(err) => {
                let delay = backoff.next_delay();
                tracing::warn!(%err, ?delay, "presence refresh failed; trying again");
                retry.as_mut().reset(tokio::time::Instant::now() + delay);
                failing = true;
            }
        }
    }
}

async fn sweep_ghosts(app: &App) {
    if !app.redis_up() {
        return;
    }
    match app.store.sweep().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            ghosts = n,
            "swept members whose instance stopped refreshing them"
        ),
        Err(err) => tracing::warn!(%err, "presence sweep failed"),
    }
}

impl App {
    /// Writes every connection of this instance into Redis's presence,
    /// putting back any entry Redis lost. The caller holds the presence lock.
    async fn write_presence(&self) -> redis::RedisResult<()> {
        for (room, entries) in self.hub.presence() {
            self.store.refresh(&room, &entries).await?;
        }
        Ok(())
    }
}
