//! The connections on this instance, by room, and the fan-out to them.
//!
//! Fan-out never waits for a client. Each connection has a bounded queue
//! that its own writer task drains; the hub only ever `try_send`s into it.
//! A client that stops reading fills its queue, and the next delivery finds
//! it full: that connection is stopped with 1008 and dropped from the room,
//! and the delivery moves on. The alternative, awaiting each send, lets one
//! slow phone stall a room of a thousand; an unbounded queue lets it grow
//! the server's memory until the process dies.
//!
//! The hub knows nothing of sockets: a member is its queue and its
//! [`Stop`]. [`connection`](crate::connection) uses the hub, never the
//! other way round.
//!
//! It also remembers, per room, the newest message delivered there, so
//! that after the subscription was down the [`bus`](crate::bus) can catch
//! the room up from its history, and a message that then also arrives live
//! is delivered once.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, OnceLock},
};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::protocol::MessageId;

/// One frame on its way to the connections of a room. Cloning is cheap:
/// the frame is serialised once and its bytes shared.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub frame: Utf8Bytes,
    /// For a `joined` event, the connection that joined: a joining
    /// connection waits for its own (see `connection`).
    pub joined: Option<Arc<str>>,
    /// Whether a connection still waiting for its welcome keeps this frame
    /// for after it (a notice, a local message), rather than dropping it
    /// as already covered by the welcome (a bus event, a presence change).
    pub keep_for_late_joiners: bool,
}

impl Outbound {
    /// A frame from the Redis bus, or about presence: the welcome covers it.
    pub fn event(frame: Utf8Bytes) -> Self {
        Self {
            frame,
            joined: None,
            keep_for_late_joiners: false,
        }
    }

    /// A frame the welcome does not contain.
    pub fn notice(frame: Utf8Bytes) -> Self {
        Self {
            frame,
            joined: None,
            keep_for_late_joiners: true,
        }
    }
}

/// Why and how a connection ends: set once, by whoever notices first (the
/// hub finding its queue full, its reader, its writer, shutdown). It lives
/// here, with the queue, because those two are all the hub holds of a
/// connection: something to fill and something to pull.
#[derive(Debug, Default)]
pub struct Stop {
    token: CancellationToken,
    /// `None`: end without a close frame (the client already closed or
    /// vanished).
    reason: OnceLock<Option<(u16, &'static str)>>,
}

impl Stop {
    /// Ends the connection with this close code.
    pub fn close(&self, code: u16, reason: &'static str) {
        let _ = self.reason.set(Some((code, reason)));
        self.token.cancel();
    }

    /// Ends the connection without sending a close frame.
    pub fn quietly(&self) {
        let _ = self.reason.set(None);
        self.token.cancel();
    }

    pub fn reason(&self) -> Option<(u16, &'static str)> {
        self.reason.get().copied().flatten()
    }

    /// Waits until the connection is told to end.
    pub async fn stopped(&self) {
        self.token.cancelled().await;
    }
}

struct Member {
    name: Arc<str>,
    queue: mpsc::Sender<Outbound>,
    stop: Arc<Stop>,
}

/// What fan-out did with one frame.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub queued: u64,
    /// Connections stopped because their queue was full.
    pub kicked: u64,
}

/// A room's members on this instance, and where the room stands in its
/// history stream.
#[derive(Default)]
struct Room {
    members: HashMap<Arc<str>, Member>,
    /// The newest message from the stream delivered here.
    delivered: Option<MessageId>,
    /// The newest message in the history when the room's first member
    /// joined through Redis: where it stands while nothing was delivered.
    /// (Neither is known for a room whose members joined while Redis was
    /// down: they never had a place in the stream, and no catch-up.)
    joined_at: Option<MessageId>,
}

#[derive(Default)]
pub struct Hub {
    rooms: Mutex<HashMap<String, Room>>,
}

impl Hub {
    pub fn add(
        &self,
        room: &str,
        conn: Arc<str>,
        name: Arc<str>,
        queue: mpsc::Sender<Outbound>,
        stop: Arc<Stop>,
    ) {
        let member = Member { name, queue, stop };
        self.lock()
            .entry(room.to_owned())
            .or_default()
            .members
            .insert(conn, member);
    }

    /// Takes a connection out of its room; false if it was not there (the
    /// hub already dropped it as too slow).
    pub fn remove(&self, room: &str, conn: &str) -> bool {
        let mut rooms = self.lock();
        let Some(members) = rooms.get_mut(room).map(|r| &mut r.members) else {
            return false;
        };
        let removed = members.remove(conn).is_some();
        if members.is_empty() {
            rooms.remove(room);
        }
        removed
    }

    /// Queues `out` for every connection in `room` on this instance.
    pub fn deliver(&self, room: &str, out: &Outbound) -> Delivery {
        self.in_room(room, |r| offer(&mut r.members, out))
    }

    /// Queues `out` for one connection, if it is in `room` here.
    pub fn deliver_to(&self, room: &str, conn: &str, out: &Outbound) -> Delivery {
        self.in_room(room, |r| {
            let mut delivery = Delivery::default();
            if let Some(member) = r.members.get(conn)
                && !queue(member, out, &mut delivery)
            {
                r.members.remove(conn);
            }
            delivery
        })
    }

    /// Queues message `id` of the room's stream, unless the room has had it
    /// already: a catch-up and the live subscription overlap.
    pub fn deliver_message(&self, room: &str, id: MessageId, out: &Outbound) -> Delivery {
        self.in_room(room, |r| {
            if r.delivered.is_some_and(|last| id <= last) {
                return Delivery::default();
            }
            r.delivered = Some(id);
            offer(&mut r.members, out)
        })
    }

    /// Records where the history ended when a member joined through Redis;
    /// only the room's first such member counts.
    pub fn joined_at(&self, room: &str, id: MessageId) {
        self.in_room(room, |r| {
            r.joined_at.get_or_insert(id);
        });
    }

    /// Every room with a place in its stream, and that place: where a
    /// catch-up starts.
    pub fn positions(&self) -> Vec<(String, MessageId)> {
        self.lock()
            .iter()
            .filter_map(|(room, r)| Some((room.clone(), r.delivered.or(r.joined_at)?)))
            .collect()
    }

    /// Runs `f` on `room` if it has members here, and forgets the room if
    /// it has none after.
    fn in_room<R: Default>(&self, room: &str, f: impl FnOnce(&mut Room) -> R) -> R {
        let mut rooms = self.lock();
        let Some(r) = rooms.get_mut(room) else {
            return R::default();
        };
        let result = f(r);
        if r.members.is_empty() {
            rooms.remove(room);
        }
        result
    }

    /// Queues `out` for every connection on this instance, in every room.
    pub fn broadcast(&self, out: &Outbound) -> Delivery {
        let mut rooms = self.lock();
        let mut total = Delivery::default();
        for room in rooms.values_mut() {
            let d = offer(&mut room.members, out);
            total.queued += d.queued;
            total.kicked += d.kicked;
        }
        rooms.retain(|_, room| !room.members.is_empty());
        total
    }

    /// How many connections with this name are in the room here.
    pub fn count_name(&self, room: &str, name: &str) -> usize {
        let rooms = self.lock();
        rooms.get(room).map_or(0, |r| {
            r.members.values().filter(|m| &*m.name == name).count()
        })
    }

    /// The distinct names in a room on this instance, sorted.
    pub fn members(&self, room: &str) -> Vec<String> {
        let rooms = self.lock();
        let names: BTreeSet<String> = rooms
            .get(room)
            .map(|r| r.members.values().map(|m| m.name.to_string()).collect())
            .unwrap_or_default();
        names.into_iter().collect()
    }

    /// Every connection, as `(name, connection id)` by room: what this
    /// instance must keep present in Redis.
    pub fn presence(&self) -> Vec<(String, Vec<(String, String)>)> {
        self.lock()
            .iter()
            .map(|(room, r)| {
                let entries = r
                    .members
                    .iter()
                    .map(|(conn, m)| (m.name.to_string(), conn.to_string()))
                    .collect();
                (room.clone(), entries)
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Room>> {
        self.rooms.lock().expect("hub lock poisoned")
    }
}

fn offer(members: &mut HashMap<Arc<str>, Member>, out: &Outbound) -> Delivery {
    let mut delivery = Delivery::default();
    members.retain(|_, member| queue(member, out, &mut delivery));
    delivery
}

/// Queues `out` for one member, never waiting; false if its queue was full
/// and it is now stopped, to be dropped from the room.
fn queue(member: &Member, out: &Outbound, delivery: &mut Delivery) -> bool {
    match member.queue.try_send(out.clone()) {
        Ok(()) => {
            delivery.queued += 1;
            true
        }
        Err(mpsc::error::TrySendError::Full(_)) => {
            member
                .stop
                .close(1008, "too slow: the outbound queue is full");
            delivery.kicked += 1;
            false
        }
        // The connection is on its way out and removes itself.
        Err(mpsc::error::TrySendError::Closed(_)) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_stops_only_its_own_connection() {
        let hub = Hub::default();
        let (slow_tx, _slow_rx) = mpsc::channel(2);
        let (fast_tx, mut fast_rx) = mpsc::channel(100);
        let slow_stop = Arc::new(Stop::default());
        hub.add("r", "slow".into(), "s".into(), slow_tx, slow_stop.clone());
        hub.add("r", "fast".into(), "f".into(), fast_tx, Arc::default());

        let out = Outbound::event("x".into());
        let deliveries: Vec<Delivery> = (0..5).map(|_| hub.deliver("r", &out)).collect();
        assert_eq!(
            deliveries[1],
            Delivery {
                queued: 2,
                kicked: 0
            }
        );
        assert_eq!(
            deliveries[2],
            Delivery {
                queued: 1,
                kicked: 1
            }
        );
        assert_eq!(
            deliveries[4],
            Delivery {
                queued: 1,
                kicked: 0
            }
        );
        assert_eq!(slow_stop.reason().map(|r| r.0), Some(1008));
        assert_eq!(hub.members("r"), vec!["f".to_owned()]);
        let mut got = 0;
        while fast_rx.try_recv().is_ok() {
            got += 1;
        }
        assert_eq!(got, 5);
    }

    #[test]
    fn a_name_can_have_several_connections_and_one_can_be_told_alone() {
        let hub = Hub::default();
        let (first_tx, mut first_rx) = mpsc::channel(8);
        let (second_tx, mut second_rx) = mpsc::channel(8);
        let (bob_tx, mut bob_rx) = mpsc::channel(8);
        hub.add("r", "a1".into(), "ann".into(), first_tx, Arc::default());
        hub.add("r", "a2".into(), "ann".into(), second_tx, Arc::default());
        hub.add("r", "b".into(), "bob".into(), bob_tx, Arc::default());
        assert_eq!(hub.count_name("r", "ann"), 2);
        assert_eq!(hub.members("r"), ["ann", "bob"]);

        let out = Outbound::event("x".into());
        assert_eq!(hub.deliver_to("r", "a2", &out).queued, 1);
        assert_eq!(hub.deliver_to("r", "nobody", &out).queued, 0);
        assert!(second_rx.try_recv().is_ok());
        assert!(first_rx.try_recv().is_err() && bob_rx.try_recv().is_err());

        hub.remove("r", "a1");
        assert_eq!(hub.count_name("r", "ann"), 1);
    }

    #[test]
    fn a_message_is_delivered_once_and_the_room_remembers_where_it_stands() {
        let hub = Hub::default();
        let (tx, mut rx) = mpsc::channel(100);
        hub.add("r", "c".into(), "n".into(), tx, Arc::default());
        let id = |s: &str| MessageId::parse(s).unwrap();
        assert!(hub.positions().is_empty(), "joined while Redis was down");
        hub.joined_at("r", id("5-0"));
        hub.joined_at("r", id("7-0"));
        assert_eq!(hub.positions(), [("r".to_owned(), id("5-0"))]);

        let out = Outbound::event("x".into());
        let queued = |d: Delivery| d.queued;
        assert_eq!(queued(hub.deliver_message("r", id("6-0"), &out)), 1);
        assert_eq!(queued(hub.deliver_message("r", id("6-1"), &out)), 1);
        // A catch-up overlapping the live subscription.
        assert_eq!(queued(hub.deliver_message("r", id("6-0"), &out)), 0);
        assert_eq!(queued(hub.deliver_message("r", id("6-1"), &out)), 0);
        assert_eq!(queued(hub.deliver_message("r", id("10-0"), &out)), 1);
        assert_eq!(hub.positions(), [("r".to_owned(), id("10-0"))]);
        let mut got = 0;
        while rx.try_recv().is_ok() {
            got += 1;
        }
        assert_eq!(got, 3);

        hub.remove("r", "c");
        assert!(hub.positions().is_empty(), "forgotten with its last member");
    }
}
