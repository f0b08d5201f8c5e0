//! One WebSocket connection: a reader, a writer, and how it ends.
//!
//! HTTP answers and forgets; a WebSocket is a long-lived, stateful thing the
//! server must look after. Each connection runs two halves side by side:
//!
//! - the **reader** takes the client's frames: a good `say` goes to the
//!   room, a bad one gets an `error` frame and the connection stays open;
//!   more than the rate allows gets `rate_limited`; a frame over 16 KiB
//!   closes with 1009.
//! - the **writer** drains the connection's bounded queue (filled by the
//!   hub) to the socket, pings every 20 s, and closes a connection silent
//!   for 60 s: a phone that lost its network sends no FIN, and without the
//!   timeout it would stay "present" forever.
//!
//! Whoever decides the connection must end (the hub finding the queue
//! full, the reader, shutdown, the idle timer) calls
//! [`Stop::close`](crate::hub::Stop::close) with a close code; the writer
//! stops writing data, makes room in the kernel's send buffer and sends that
//! close frame (see [`socket`](crate::socket): otherwise a slow client's
//! close frame waits behind megabytes and never leaves), the reader waits
//! briefly for the client's answer, and the connection leaves the room,
//! exactly once.
//!
//! A connection uses the [`hub`](crate::hub) (it joins a room there and
//! takes its frames from the queue the hub fills); the hub never calls back
//! into a connection, it only pulls its [`Stop`].

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::{sync::mpsc, time::Instant};

use crate::{
    App,
    hub::{Outbound, Stop},
    protocol::{FrameError, MAX_FRAME_BYTES, ServerEvent, parse_say},
    socket::Socket,
};

/// How long a closing connection waits for its close frame to go out and
/// for the client's answer.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long a joining connection waits for its own `joined` to come back
/// through Redis before it sends the welcome anyway.
const JOIN_ECHO_WAIT: Duration = Duration::from_secs(2);
/// Replies to this connection alone (error frames) waiting to be written.
const REPLY_QUEUE: usize = 32;
/// tungstenite's read buffer per connection.
const READ_BUFFER_BYTES: usize = 4 * 1024;

/// What both halves of one connection share.
struct Conn {
    app: App,
    id: Arc<str>,
    room: String,
    name: Arc<str>,
    stop: Arc<Stop>,
    replies: mpsc::Sender<Utf8Bytes>,
    started: Instant,
    /// Milliseconds after `started` when the client last sent anything
    /// (a frame or a pong).
    last_heard_ms: AtomicU64,
}

impl Conn {
    fn heard(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_heard_ms.store(ms, Ordering::Relaxed);
    }

    fn last_heard(&self) -> Instant {
        self.started + Duration::from_millis(self.last_heard_ms.load(Ordering::Relaxed))
    }

    /// Queues an `error` frame for this client alone.
    fn reply(&self, err: &FrameError) {
        self.app.stats.rejected(err.code);
        let frame = ServerEvent::Error {
            code: err.code,
            message: &err.message,
        }
        .frame();
        if self.replies.try_send(frame).is_err() {
            // It sends bad frames faster than it reads our answers.
            self.stop.close(1008, "too slow: replies are piling up");
        }
    }
}

/// Serves one upgraded connection until it ends, then takes the member out
/// of the room.
pub async fn serve(ws: WebSocket, tcp: Socket, app: App, room: String, name: String) {
    tcp.bound_send_buffer();
    let (queue_tx, queue_rx) = mpsc::channel(app.settings.outbound_queue);
    let (replies_tx, replies_rx) = mpsc::channel(REPLY_QUEUE);
    let conn = Conn {
        id: uuid::Uuid::now_v7().simple().to_string().into(),
        app: app.clone(),
        room,
        name: name.into(),
        stop: Arc::default(),
        replies: replies_tx,
        started: Instant::now(),
        last_heard_ms: AtomicU64::new(0),
    };
    // In the room before the join is announced, so nothing said after the
    // announcement can miss this connection.
    let (snapshot, warning) = {
        let _presence = app.presence.lock().await;
        app.hub.add(
            &conn.room,
            conn.id.clone(),
            conn.name.clone(),
            queue_tx,
            conn.stop.clone(),
        );
        app.join(&conn.room, &conn.name, &conn.id).await
    };
    app.stats.connections.inc();
    let welcome = ServerEvent::Welcome {
        room: &conn.room,
        name: &conn.name,
        instance: &app.settings.instance,
        members: &snapshot.members,
        history: &snapshot.history,
    }
    .frame();
    tracing::debug!(room = %conn.room, name = %conn.name, conn = %conn.id, "joined");

    let (sink, stream) = ws.split();
    tokio::join!(
        read(stream, &conn),
        write(sink, &tcp, queue_rx, replies_rx, welcome, warning, &conn)
    );
    drop(tcp); // the socket closes now, not after the leave

    {
        let _presence = app.presence.lock().await;
        app.hub.remove(&conn.room, &conn.id);
        app.leave(&conn.room, &conn.name, &conn.id).await;
    }
    app.stats.connections.dec();
    tracing::debug!(
        room = %conn.room, name = %conn.name, conn = %conn.id,
        close = ?conn.stop.reason(), "left"
    );
}

async fn read(mut stream: SplitStream<WebSocket>, conn: &Conn) {
    let settings = &conn.app.settings;
    let limiter: DefaultDirectRateLimiter = RateLimiter::direct(
        Quota::per_second(settings.rate_per_sec).allow_burst(settings.rate_burst),
    );
    // Once the connection is stopping, keep reading (and ignoring) until
    // the client answers the close or the grace period ends: closing a
    // socket with unread data makes the kernel send a reset, and the client
    // may lose our close frame with it.
    let mut closing: Option<Instant> = None;
    loop {
        let next = tokio::select! {
            next = stream.next() => next,
            () = conn.stop.stopped(), if closing.is_none() => {
                closing = Some(Instant::now() + CLOSE_GRACE);
                continue;
            }
            () = tokio::time::sleep_until(closing.unwrap_or_else(Instant::now)), if closing.is_some() => break,
        };
        let Some(next) = next else {
            conn.stop.quietly(); // the client went away
            break;
        };
        conn.heard();
        if closing.is_some() {
            continue;
        }
        match next {
            Ok(Message::Text(text)) => {
                if limiter.check().is_err() {
                    conn.reply(&FrameError::new(
                        "rate_limited",
                        format!(
                            "more than {} messages a second (bursts of {}); this one was dropped",
                            settings.rate_per_sec, settings.rate_burst
                        ),
                    ));
                    continue;
                }
                match parse_say(&text) {
                    Ok(text) => {
                        if let Err(warning) = conn.app.say(&conn.room, &conn.name, &text).await {
                            conn.reply(&warning);
                        }
                    }
                    Err(err) => conn.reply(&err),
                }
            }
            Ok(Message::Binary(_)) => conn.reply(&FrameError::new(
                "binary_frame",
                "binary frames are not supported; send JSON text frames",
            )),
            Ok(Message::Ping(_) | Message::Pong(_)) => {}
            Ok(Message::Close(_)) => conn.stop.quietly(), // tungstenite answers it
            Err(err) if too_big(&err) => conn.stop.close(1009, "frame larger than 16 KiB"),
            Err(err) => {
                tracing::debug!(%err, conn = %conn.id, "connection broke");
                conn.stop.quietly();
                break;
            }
        }
    }
}

/// The writer: the welcome first, then the queue, replies and pings, until
/// the connection stops; then its close frame.
async fn write(
    mut sink: SplitSink<WebSocket, Message>,
    tcp: &Socket,
    mut queue: mpsc::Receiver<Outbound>,
    replies: mpsc::Receiver<Utf8Bytes>,
    welcome: Utf8Bytes,
    warning: Option<FrameError>,
    conn: &Conn,
) {
    let kept = await_own_join(&mut queue, conn).await;
    let first = first_frames(welcome, warning.as_ref(), kept);
    pump(&mut sink, queue, replies, first, conn).await;
    if let Some((code, reason)) = conn.stop.reason() {
        let close = Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }));
        // The send buffer is full when a client is cut for not reading:
        // grown, it takes the rest of the frame being written and the close
        // frame at once, and the kernel delivers them whenever the client
        // reads again. Only a frame too big for even that waits out the
        // grace period.
        tcp.make_room_to_close();
        let _ = tokio::time::timeout(CLOSE_GRACE, sink.send(close)).await;
    }
}

/// Waits (up to [`JOIN_ECHO_WAIT`]) for this connection's own `joined` to
/// come back through the bus; returns the frames queued before it that the
/// welcome does not cover.
///
/// Events published before our own `joined` are already reflected in the
/// welcome (its history and member list came from the same atomic
/// script); drop them, or the client would see them twice, or see an
/// older member list after a newer one. Frames the welcome does not
/// cover (a notice that Redis went down, a local message) are kept.
async fn await_own_join(queue: &mut mpsc::Receiver<Outbound>, conn: &Conn) -> Vec<Message> {
    let mut kept = Vec::new();
    let waited = tokio::time::timeout(JOIN_ECHO_WAIT, async {
        while let Some(out) = queue.recv().await {
            if out.joined.as_deref() == Some(&*conn.id) {
                return;
            }
            if out.keep_for_late_joiners {
                kept.push(Message::Text(out.frame));
            }
        }
    });
    tokio::select! {
        result = waited => if result.is_err() {
            tracing::warn!(conn = %conn.id, "own join not seen on the bus; welcoming anyway");
        },
        () = conn.stop.stopped() => {}
    }
    kept
}

/// The welcome, then the warning that came with it (Redis down), then the
/// frames kept while waiting for our own join.
fn first_frames(
    welcome: Utf8Bytes,
    warning: Option<&FrameError>,
    kept: Vec<Message>,
) -> Vec<Message> {
    let mut first = vec![Message::Text(welcome)];
    if let Some(warning) = warning {
        first.push(Message::Text(
            ServerEvent::Error {
                code: warning.code,
                message: &warning.message,
            }
            .frame(),
        ));
    }
    first.extend(kept);
    first
}

/// Writes `first`, then whatever comes next (a reply, a queued frame, a
/// ping) until the connection stops, the server shuts down (1001), or the
/// client has been silent for the idle timeout (1000).
async fn pump(
    sink: &mut SplitSink<WebSocket, Message>,
    mut queue: mpsc::Receiver<Outbound>,
    mut replies: mpsc::Receiver<Utf8Bytes>,
    first: Vec<Message>,
    conn: &Conn,
) {
    let settings = &conn.app.settings;
    let shutdown = &conn.app.shutdown;
    let mut pending = first.into_iter();
    let ping_every = Duration::from_millis(settings.ping_interval_ms);
    let idle_limit = Duration::from_millis(settings.idle_timeout_ms);
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    let idle = tokio::time::sleep(idle_limit);
    tokio::pin!(idle);
    loop {
        let message = if let Some(message) = pending.next() {
            message
        } else {
            tokio::select! {
                biased;
                () = conn.stop.stopped() => break,
                () = shutdown.cancelled() => {
                    conn.stop.close(1001, "server shutting down");
                    break;
                }
                () = &mut idle => {
                    let due = conn.last_heard() + idle_limit;
                    if due <= Instant::now() {
                        conn.stop.close(1000, "idle: nothing heard for too long");
                        break;
                    }
                    idle.as_mut().reset(due);
                    continue;
                }
                Some(reply) = replies.recv() => Message::Text(reply),
                out = queue.recv() => match out {
                    Some(out) if out.joined.as_deref() == Some(&*conn.id) => continue,
                    Some(out) => Message::Text(out.frame),
                    None => break,
                },
                _ = ping.tick() => Message::Ping(Default::default()),
            }
        };
        if !send(sink, message, conn).await {
            break;
        }
    }
}

/// Sends one message; false once the connection is stopping or the socket
/// is gone. A send waits while the client is not reading; a stop must still
/// get through, so the send races it.
async fn send(sink: &mut SplitSink<WebSocket, Message>, message: Message, conn: &Conn) -> bool {
    tokio::select! {
        sent = sink.send(message) => if sent.is_err() {
            conn.stop.quietly();
            false
        } else {
            true
        },
        () = conn.stop.stopped() => false,
    }
}

/// tungstenite refuses a frame over `max_frame_size` (or a message over
/// `max_message_size`) with a capacity error.
fn too_big(err: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(tokio_tungstenite::tungstenite::Error::Capacity(_)) =
            e.downcast_ref::<tokio_tungstenite::tungstenite::Error>()
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// The limits a connection is upgraded with.
pub fn limits(upgrade: axum::extract::WebSocketUpgrade) -> axum::extract::WebSocketUpgrade {
    upgrade
        .max_frame_size(MAX_FRAME_BYTES)
        .max_message_size(MAX_FRAME_BYTES)
        // tungstenite allocates its whole read buffer (128 KiB by default)
        // per connection and zero-fills it before each read, so every idle
        // member kept 128 KiB resident (`lab bench chat` measured ~150 KiB
        // per connection). Chat frames are small; the buffer still grows to
        // fit a 16 KiB one.
        .read_buffer_size(READ_BUFFER_BYTES)
        // tungstenite's default is unbounded: a client that does not read
        // would grow it without limit. Our queue bounds it well before this.
        .max_write_buffer_size(1024 * 1024)
}
