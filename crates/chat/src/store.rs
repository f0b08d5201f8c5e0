//! What the instances share, in Redis: history, presence and the event bus.
//!
//! - History is a capped Stream per room (`XADD MAXLEN ~`): its entry ids
//!   (`<ms>-<seq>`) are the message ids, ordered and the same everywhere.
//! - Presence is a sorted set per room, one entry per connection, scored by
//!   when it expires; each instance keeps its own entries fresh, and any
//!   instance sweeps out the ones whose instance died.
//! - Events go out on one pub/sub channel per room.
//!
//! Each change is a Lua script, so the write and its announcement happen in
//! one atomic step. That is what makes the order the same on every
//! instance: were `XADD` and `PUBLISH` two commands, two instances saying
//! at once could store A before B and publish B before A.
//!
//! A room exists while someone is in it: when its last member leaves (or
//! is swept), it leaves `rooms` and its history expires a day later unless
//! someone joins again. Members swept while their instance could not reach
//! Redis come back with its next refresh, and bring the room back too:
//! listed (so its ghosts are swept if that instance dies) and its history
//! kept.
//!
//! Key layout (prefix `lab:chat:` by default, configurable for tests):
//! `<prefix>rooms` (set), `<prefix>room:<room>:members` (zset),
//! `<prefix>room:<room>:history` (stream), channel `<prefix>room:<room>`.

use std::sync::{Arc, LazyLock};

use lab_core::redis::Redis;
use redis::{
    Script,
    streams::{StreamId, StreamRangeReply},
};

use crate::protocol::{HISTORY_ON_JOIN, Message, MessageId, message};

macro_rules! script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("lua/prelude.lua"),
                include_str!(concat!("lua/", $file))
            ))
        })
    };
}

static JOIN: LazyLock<Script> = script!("join.lua");
static SAY: LazyLock<Script> = script!("say.lua");
static LEAVE: LazyLock<Script> = script!("leave.lua");
static REFRESH: LazyLock<Script> = script!("refresh.lua");
static SWEEP: LazyLock<Script> = script!("sweep.lua");
static ROOMS: LazyLock<Script> = script!("rooms.lua");

/// How long the history of a room nobody is in is kept.
const EMPTY_ROOM_HISTORY_MS: u64 = 24 * 60 * 60 * 1000;

/// What a joining connection is told: who is here and what was said.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub members: Vec<String>,
    pub history: Vec<Message>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct RoomInfo {
    #[schema(pattern = "^[A-Za-z0-9_-]{1,32}$", min_length = 1, max_length = 32)]
    pub room: String,
    /// Distinct names present, on every instance together.
    pub members: u64,
}

#[derive(Clone)]
pub struct Store {
    redis: Redis,
    prefix: Arc<str>,
    /// A presence entry lives this long unless refreshed.
    presence_ttl_ms: u64,
    /// Messages kept per room.
    history_len: usize,
}

impl Store {
    pub fn new(redis: Redis, prefix: &str, presence_ttl_ms: u64, history_len: usize) -> Self {
        Self {
            redis,
            prefix: prefix.into(),
            presence_ttl_ms,
            history_len,
        }
    }

    /// The shared connection, for `/readyz`.
    pub fn redis(&self) -> Redis {
        self.redis.clone()
    }

    fn rooms_key(&self) -> String {
        format!("{}rooms", self.prefix)
    }

    fn members_key(&self, room: &str) -> String {
        format!("{}room:{room}:members", self.prefix)
    }

    fn history_key(&self, room: &str) -> String {
        format!("{}room:{room}:history", self.prefix)
    }

    fn channel(&self, room: &str) -> String {
        format!("{}room:{room}", self.prefix)
    }

    /// The pattern that matches every room's channel.
    pub fn pattern(&self) -> String {
        // The prefix is configuration; keep glob characters in it literal.
        let mut pattern = String::new();
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push_str("room:*");
        pattern
    }

    pub async fn join(&self, room: &str, name: &str, conn: &str) -> redis::RedisResult<Snapshot> {
        let (members, newest_first): (Vec<String>, StreamRangeReply) = JOIN
            .key(self.members_key(room))
            .key(self.history_key(room))
            .key(self.rooms_key())
            .arg(self.channel(room))
            .arg(room)
            .arg(name)
            .arg(conn)
            .arg(self.presence_ttl_ms)
            .arg(HISTORY_ON_JOIN)
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(Snapshot {
            members,
            history: oldest_first(room, newest_first.ids),
        })
    }

    /// Stores and publishes a message; returns its id.
    pub async fn say(&self, room: &str, name: &str, text: &str) -> redis::RedisResult<String> {
        SAY.key(self.history_key(room))
            .arg(self.channel(room))
            .arg(room)
            .arg(name)
            .arg(text)
            .arg(self.history_len)
            .invoke_async(&mut self.redis.clone())
            .await
    }

    pub async fn leave(&self, room: &str, name: &str, conn: &str) -> redis::RedisResult<()> {
        LEAVE
            .key(self.members_key(room))
            .key(self.history_key(room))
            .key(self.rooms_key())
            .arg(self.channel(room))
            .arg(room)
            .arg(name)
            .arg(conn)
            .arg(EMPTY_ROOM_HISTORY_MS)
            .invoke_async::<i64>(&mut self.redis.clone())
            .await
            .map(drop)
    }

    /// Keeps this instance's connections in a room present, putting back
    /// any entry that expired meanwhile, and the room into the list.
    pub async fn refresh(
        &self,
        room: &str,
        entries: &[(String, String)],
    ) -> redis::RedisResult<()> {
        let mut call = REFRESH.key(self.members_key(room));
        call.key(self.history_key(room)).key(self.rooms_key());
        call.arg(self.channel(room))
            .arg(room)
            .arg(self.presence_ttl_ms);
        for (name, conn) in entries {
            call.arg(name).arg(conn);
        }
        call.invoke_async::<i64>(&mut self.redis.clone())
            .await
            .map(drop)
    }

    /// Removes and announces expired presence entries in every room;
    /// returns how many.
    pub async fn sweep(&self) -> redis::RedisResult<u64> {
        let mut redis = self.redis.clone();
        let rooms: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.rooms_key())
            .query_async(&mut redis)
            .await?;
        let mut swept = 0;
        for room in rooms {
            swept += SWEEP
                .key(self.members_key(&room))
                .key(self.history_key(&room))
                .key(self.rooms_key())
                .arg(self.channel(&room))
                .arg(&room)
                .arg(EMPTY_ROOM_HISTORY_MS)
                .invoke_async::<u64>(&mut redis)
                .await?;
        }
        Ok(swept)
    }

    pub async fn rooms(&self) -> redis::RedisResult<Vec<RoomInfo>> {
        let rows: Vec<(String, u64)> = ROOMS
            .key(self.rooms_key())
            .arg(&*self.prefix)
            .invoke_async(&mut self.redis.clone())
            .await?;
        let mut rooms: Vec<RoomInfo> = rows
            .into_iter()
            .map(|(room, members)| RoomInfo { room, members })
            .collect();
        rooms.sort_by(|a, b| a.room.cmp(&b.room));
        Ok(rooms)
    }

    /// The newest `limit` messages of a room, oldest first.
    pub async fn history(&self, room: &str, limit: usize) -> redis::RedisResult<Vec<Message>> {
        let newest_first: StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(self.history_key(room))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(oldest_first(room, newest_first.ids))
    }

    /// The newest `count` messages of a room after `after`, oldest first:
    /// what a room missed while this instance was not subscribed.
    pub async fn history_after(
        &self,
        room: &str,
        after: MessageId,
        count: usize,
    ) -> redis::RedisResult<Vec<Message>> {
        let newest_first: StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(self.history_key(room))
            .arg("+")
            .arg(format!("({after}")) // exclusive (Redis 6.2)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(oldest_first(room, newest_first.ids))
    }
}

fn oldest_first(room: &str, newest_first: Vec<StreamId>) -> Vec<Message> {
    newest_first
        .into_iter()
        .rev()
        .map(|entry| {
            let field = |key: &str| entry.get::<String>(key).unwrap_or_default();
            message(&entry.id, room, &field("name"), &field("text"))
        })
        .collect()
}
