//! The wire protocol: JSON text frames, one object each, tagged by `type`.
//!
//! A client sends `{"type":"say","text":"…"}`. The server sends `welcome`
//! once, then `message`, `joined`, `left`, `members`, `notice`, and `error`
//! for a frame it could not use (the connection stays open: one bad frame
//! is the client's mistake, not a reason to drop everything else it was
//! doing).
//!
//! Presence is per name: `joined` comes with a name's first connection
//! and `left` with its last, so two tabs with one name are one member. Each
//! carries the whole member list, and `at`, when it happened by Redis's
//! clock (the instance's own while Redis is down).
//!
//! What changes many names at once is one `members` frame per room, with
//! the whole list and the names changed: `back`, members an instance put
//! back after Redis lost them (it restarted empty, or swept them while
//! their instance could not reach it); `gone`, members swept out because
//! their instance stopped refreshing them (it crashed), `at` showing how
//! long after the crash that was. A `joined` or `left` per name would send
//! every member of a room of N, at once, N lists of up to N names: more
//! than its queue holds, so all of them would be cut as too slow.
//!
//! The same events travel between instances over Redis pub/sub as
//! [`BusEvent`]s, which carry fields the clients never see: the connection
//! id of a `joined`, so a joining connection can recognise its own (see
//! `connection`), and whether its name was here already.

use axum::extract::ws::Utf8Bytes;
use serde::{Deserialize, Deserializer, Serialize};

/// A frame larger than this closes the connection with 1009 (message too big).
pub const MAX_FRAME_BYTES: usize = 16 * 1024;
/// The longest `say`, in characters (not bytes: "héllo" is 5).
pub const MAX_TEXT_CHARS: usize = 2000;
/// How many past messages a `welcome` carries.
pub const HISTORY_ON_JOIN: usize = 50;

/// Room and member names: 1–32 letters, digits, `-` or `_`. Narrow on
/// purpose: they become parts of Redis keys and channel names, and of the
/// page's DOM, so nothing in them needs escaping anywhere.
pub fn check_name(field: &str, value: &str) -> Result<(), String> {
    if lab_core::error::is_name(value, 32, b"") {
        Ok(())
    } else {
        Err(format!(
            "{field}: must be 1–32 letters, digits, '-' or '_' (got {value:?})"
        ))
    }
}

/// Why a client frame was refused; sent back as an `error` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: &'static str,
    pub message: String,
}

impl FrameError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Reads one text frame from a client: the text of a `say`, or why not.
pub fn parse_say(frame: &str) -> Result<String, FrameError> {
    let value: serde_json::Value = serde_json::from_str(frame)
        .map_err(|err| FrameError::new("invalid_json", format!("not JSON: {err}")))?;
    let Some(kind) = value.get("type").and_then(|t| t.as_str()) else {
        return Err(FrameError::new(
            "invalid_json",
            r#"expected an object with a "type", like {"type":"say","text":"hi"}"#,
        ));
    };
    if kind != "say" {
        return Err(FrameError::new(
            "unknown_type",
            format!(r#"unknown type {kind:?}; the only one a client sends is "say""#),
        ));
    }
    let Some(text) = value.get("text").and_then(|t| t.as_str()) else {
        return Err(FrameError::new("invalid_text", "text: must be a string"));
    };
    if text.trim().is_empty() {
        return Err(FrameError::new("empty_text", "text: must not be empty"));
    }
    let chars = text.chars().count();
    if chars > MAX_TEXT_CHARS {
        return Err(FrameError::new(
            "text_too_long",
            format!("text: {chars} characters; at most {MAX_TEXT_CHARS}"),
        ));
    }
    Ok(text.to_owned())
}

/// A chat message as clients see it, live and in history alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Message {
    /// The Redis Stream id of the history entry (`<ms>-<seq>`): ordered
    /// within a room and the same on every instance. (Live messages said
    /// while Redis was down have `local-…` ids and are never in history.)
    #[schema(example = "1763900000123-0")]
    pub id: String,
    #[schema(pattern = "^[A-Za-z0-9_-]{1,32}$", min_length = 1, max_length = 32)]
    pub room: String,
    #[schema(pattern = "^[A-Za-z0-9_-]{1,32}$", min_length = 1, max_length = 32)]
    pub name: String,
    /// 1–2000 characters, not all blank.
    #[schema(min_length = 1, max_length = 2000)]
    pub text: String,
    /// When Redis stored it (RFC 3339, UTC), read from the id.
    #[schema(format = DateTime, example = "2025-11-23T12:13:20.123Z")]
    pub ts: String,
}

/// Everything the server sends to a client.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerEvent<'a> {
    Welcome {
        room: &'a str,
        name: &'a str,
        /// Which instance serves this connection: behind the load balancer
        /// two clients may land on different ones and still talk.
        instance: &'a str,
        members: &'a [String],
        history: &'a [Message],
    },
    Message(&'a Message),
    Joined {
        room: &'a str,
        name: &'a str,
        members: &'a [String],
        /// When, by the server's clock (RFC 3339, UTC).
        at: &'a str,
    },
    Left {
        room: &'a str,
        name: &'a str,
        members: &'a [String],
        /// When, by the server's clock (RFC 3339, UTC).
        at: &'a str,
    },
    /// Many names changed at once: the whole list, and which came back
    /// and which went (either may be empty).
    Members {
        room: &'a str,
        members: &'a [String],
        back: &'a [String],
        gone: &'a [String],
        /// When, by the server's clock (RFC 3339, UTC).
        at: &'a str,
    },
    Error {
        code: &'a str,
        message: &'a str,
    },
    /// Not an error: a change the client may want to show (Redis is back).
    Notice {
        code: &'a str,
        message: &'a str,
    },
}

impl ServerEvent<'_> {
    pub fn frame(&self) -> Utf8Bytes {
        serde_json::to_string(self)
            .expect("server events always serialise")
            .into()
    }
}

/// An event as it travels between instances over Redis pub/sub. The Lua
/// scripts write these with `cjson`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BusEvent {
    Message {
        id: String,
        room: String,
        name: String,
        text: String,
    },
    Joined {
        room: String,
        name: String,
        /// The joining connection, which waits for this event. (join.lua
        /// always writes it; members a refresh puts back come in a
        /// `members` event.)
        #[serde(default)]
        conn: Option<String>,
        /// The name was present already (another tab): news to `conn`
        /// alone.
        #[serde(default)]
        again: bool,
        #[serde(deserialize_with = "list")]
        members: Vec<String>,
        /// Redis's clock, in milliseconds since the epoch.
        at: i64,
    },
    Left {
        room: String,
        name: String,
        #[serde(deserialize_with = "list")]
        members: Vec<String>,
        at: i64,
    },
    /// Written by a refresh (`back`) or a sweep (`gone`); the other list
    /// is absent.
    Members {
        room: String,
        #[serde(deserialize_with = "list")]
        members: Vec<String>,
        #[serde(default, deserialize_with = "list")]
        back: Vec<String>,
        #[serde(default, deserialize_with = "list")]
        gone: Vec<String>,
        at: i64,
    },
}

impl BusEvent {
    pub fn room(&self) -> &str {
        match self {
            BusEvent::Message { room, .. }
            | BusEvent::Joined { room, .. }
            | BusEvent::Left { room, .. }
            | BusEvent::Members { room, .. } => room,
        }
    }

    /// The frame clients get for this event.
    pub fn frame(&self) -> Utf8Bytes {
        match self {
            BusEvent::Message {
                id,
                room,
                name,
                text,
            } => ServerEvent::Message(&message(id, room, name, text)).frame(),
            BusEvent::Joined {
                room,
                name,
                members,
                at,
                ..
            } => ServerEvent::Joined {
                room,
                name,
                members,
                at: &rfc3339(*at),
            }
            .frame(),
            BusEvent::Left {
                room,
                name,
                members,
                at,
            } => ServerEvent::Left {
                room,
                name,
                members,
                at: &rfc3339(*at),
            }
            .frame(),
            BusEvent::Members {
                room,
                members,
                back,
                gone,
                at,
            } => ServerEvent::Members {
                room,
                members,
                back,
                gone,
                at: &rfc3339(*at),
            }
            .frame(),
        }
    }
}

/// Lua's cjson writes an empty table as `{}`: an empty member list arrives
/// as an object, not an array.
fn list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrEmpty {
        List(Vec<String>),
        Empty(serde::de::IgnoredAny),
    }
    Ok(match ListOrEmpty::deserialize(deserializer)? {
        ListOrEmpty::List(names) => names,
        ListOrEmpty::Empty(_) => Vec::new(),
    })
}

/// A message id as Redis Streams make it, `<ms>-<seq>`: ordered within a
/// room, so an instance can tell which messages a room has had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MessageId {
    ms: u64,
    seq: u64,
}

impl MessageId {
    /// Before every message: where a room whose history was empty stands.
    pub const ZERO: Self = Self { ms: 0, seq: 0 };

    /// `None` for a `local-…` id (a message that never reached Redis).
    pub fn parse(id: &str) -> Option<Self> {
        let (ms, seq) = id.split_once('-')?;
        Some(Self {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// A message from its stream id and fields; the timestamp comes from the id.
pub fn message(id: &str, room: &str, name: &str, text: &str) -> Message {
    Message {
        id: id.to_owned(),
        room: room.to_owned(),
        name: name.to_owned(),
        text: text.to_owned(),
        ts: timestamp(id),
    }
}

/// `1763900000123-0` → `2025-11-23T12:13:20.123Z`.
fn timestamp(id: &str) -> String {
    let millis = id.split('-').next().and_then(|ms| ms.parse::<i64>().ok());
    rfc3339(millis.unwrap_or_else(|| chrono::Utc::now().timestamp_millis()))
}

/// Milliseconds since the epoch → `2025-11-23T12:13:20.123Z`.
pub fn rfc3339(millis: i64) -> String {
    let time = chrono::DateTime::from_timestamp_millis(millis).unwrap_or_else(chrono::Utc::now);
    time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Now, by this instance's clock: for what happens while Redis is down.
pub fn now() -> String {
    rfc3339(chrono::Utc::now().timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_and_plain() {
        for good in ["lobby", "a", "room-1", "Team_B", &"x".repeat(32)] {
            assert!(check_name("room", good).is_ok(), "{good}");
        }
        for bad in ["", &"x".repeat(33), "two words", "a/b", "é", "a*", "a:b"] {
            assert!(check_name("room", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bad_frames_get_their_own_code() {
        let code = |frame: &str| parse_say(frame).unwrap_err().code;
        assert_eq!(code("not json"), "invalid_json");
        assert_eq!(code("[1,2]"), "invalid_json");
        assert_eq!(code(r#"{"type":"shout","text":"hi"}"#), "unknown_type");
        assert_eq!(code(r#"{"type":"say"}"#), "invalid_text");
        assert_eq!(code(r#"{"type":"say","text":7}"#), "invalid_text");
        assert_eq!(code(r#"{"type":"say","text":"  "}"#), "empty_text");
        let long = format!(r#"{{"type":"say","text":"{}"}}"#, "é".repeat(2001));
        assert_eq!(code(&long), "text_too_long");
        let max = format!(r#"{{"type":"say","text":"{}"}}"#, "é".repeat(2000));
        assert_eq!(parse_say(&max).unwrap().chars().count(), 2000);
    }

    #[test]
    fn message_ids_order_as_the_stream_does() {
        let id = |s: &str| MessageId::parse(s);
        assert!(id("1763900000123-4") < id("1763900000123-10"));
        assert!(id("999-9") < id("1000-0"));
        assert!(MessageId::ZERO < id("0-1").unwrap());
        assert_eq!(id("17-3").unwrap().to_string(), "17-3");
        for bad in ["local-0190a1b2", "17", "-3", "17-", "a-b"] {
            assert_eq!(id(bad), None, "{bad}");
        }
    }

    #[test]
    fn bus_events_read_what_the_scripts_write() {
        // cjson escapes '/' and writes an empty list as an object.
        let left: BusEvent = serde_json::from_str(
            r#"{"type":"left","room":"r","name":"a\/b","members":{},"at":1763900000123}"#,
        )
        .unwrap();
        assert_eq!(
            left,
            BusEvent::Left {
                room: "r".into(),
                name: "a/b".into(),
                members: vec![],
                at: 1763900000123,
            }
        );
        let frame: serde_json::Value = serde_json::from_str(&left.frame()).unwrap();
        assert_eq!(frame["at"], "2025-11-23T12:13:20.123Z");
        // Members put back by a refresh: one event, the list of who.
        let back: BusEvent = serde_json::from_str(
            r#"{"type":"members","room":"r","members":["a","b"],"back":["a","b"],"at":1}"#,
        )
        .unwrap();
        let frame: serde_json::Value = serde_json::from_str(&back.frame()).unwrap();
        assert_eq!(
            frame,
            serde_json::json!({"type":"members","room":"r","members":["a","b"],
                "back":["a","b"],"gone":[],"at":"1970-01-01T00:00:00.001Z"})
        );
        // The last members swept out: cjson writes the empty list as `{}`.
        let gone: BusEvent = serde_json::from_str(
            r#"{"type":"members","room":"r","members":{},"gone":["a"],"at":1}"#,
        )
        .unwrap();
        assert!(matches!(
            gone,
            BusEvent::Members { members, back, gone, .. }
                if members.is_empty() && back.is_empty() && gone == ["a"]
        ));
        let said: BusEvent = serde_json::from_str(
            r#"{"type":"message","id":"1763900000123-4","room":"r","name":"ada","text":"hi"}"#,
        )
        .unwrap();
        let frame: serde_json::Value = serde_json::from_str(&said.frame()).unwrap();
        assert_eq!(
            frame,
            serde_json::json!({"type":"message","id":"1763900000123-4","room":"r",
                "name":"ada","text":"hi","ts":"2025-11-23T12:13:20.123Z"})
        );
    }
}
