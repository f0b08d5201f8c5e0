//! The chat lab: WebSocket rooms shared across instances through Redis.
//!
//! Run one: `cargo test -p workshop --test chat <name>`.
//! Each test has its own Redis key prefix; instances that share a prefix
//! share rooms. Clients are real WebSocket clients (tokio-tungstenite).

use std::time::Duration;

use futures::{SinkExt, StreamExt, stream::SplitStream};
use lab_core::proxy::Proxy;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::{net::TcpStream, sync::watch, task::JoinHandle};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{
        Message as Frame,
        protocol::{CloseFrame, frame::coding::CloseCode},
    },
};
use workshop::{ChatApp, CrashableChat};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a test waits for a frame it expects.
const WAIT: Duration = Duration::from_secs(10);

/// A real WebSocket client in a room.
struct Member {
    ws: Ws,
    /// The member list of the last frame that carried one: what this
    /// client's page would show.
    view: Vec<String>,
}

impl Member {
    /// Connects and returns the member with its welcome frame.
    async fn join(url: &str) -> (Self, Value) {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .unwrap_or_else(|err| panic!("connect {url}: {err}"));
        let mut member = Self {
            ws,
            view: Vec::new(),
        };
        let welcome = member.next().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (member, welcome)
    }

    async fn say(&mut self, text: &str) {
        self.send(Frame::text(
            json!({"type": "say", "text": text}).to_string(),
        ))
        .await;
    }

    async fn send(&mut self, frame: Frame) {
        self.ws.send(frame).await.expect("send a frame");
    }

    /// The next JSON frame (pings are answered by tungstenite meanwhile).
    async fn next(&mut self) -> Value {
        // One deadline for the whole wait: pings arriving meanwhile must not
        // extend it.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("a frame within 10 s")
                .expect("the connection is open")
                .expect("a good frame");
            match frame {
                Frame::Text(text) => {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    if frame.get("members").is_some() {
                        self.view = members(&frame).into_iter().map(String::from).collect();
                    }
                    return frame;
                }
                Frame::Close(close) => panic!("closed by the server: {close:?}"),
                _ => continue,
            }
        }
    }

    /// The next frame of type `kind`, skipping others.
    async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.next().await;
            if frame["type"] == kind {
                return frame;
            }
        }
    }

    /// Reads until the server's close frame; returns it and the number of
    /// messages read on the way.
    async fn closed(&mut self) -> (Option<CloseFrame>, usize) {
        let mut messages = 0;
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a close within 10 s")
            {
                Some(Ok(Frame::Close(close))) => return (close, messages),
                Some(Ok(Frame::Text(_))) => messages += 1,
                Some(Ok(_)) => {}
                Some(Err(err)) => panic!("connection broke without a close frame: {err}"),
                None => panic!("connection ended without a close frame"),
            }
        }
    }
}

fn members(frame: &Value) -> Vec<&str> {
    frame["members"]
        .as_array()
        .unwrap_or_else(|| panic!("no members in {frame}"))
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect()
}

/// `1795436670774-3` → (1795436670774, 3), to compare ids in order.
fn stream_id(id: &Value) -> (u64, u64) {
    let (ms, seq) = id.as_str().unwrap().split_once('-').unwrap();
    (ms.parse().unwrap(), seq.parse().unwrap())
}

#[tokio::test]
async fn join_gets_a_welcome_with_members_and_history() {
    let app = ChatApp::start(ChatApp::settings()).await;
    let (mut ada, welcome) = Member::join(&app.ws_url("lobby", "ada")).await;
    assert_eq!(welcome["room"], "lobby");
    assert_eq!(welcome["name"], "ada");
    assert_eq!(members(&welcome), ["ada"]);
    assert_eq!(welcome["history"], json!([]));

    for text in ["one", "two", "three"] {
        ada.say(text).await;
        assert_eq!(ada.next_of("message").await["text"], text);
    }
    let (_bob, welcome) = Member::join(&app.ws_url("lobby", "bob")).await;
    assert_eq!(members(&welcome), ["ada", "bob"]);
    let history = welcome["history"].as_array().unwrap();
    let texts: Vec<&str> = history
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["one", "two", "three"], "oldest first");
    assert!(
        history
            .iter()
            .all(|m| m["name"] == "ada" && m["room"] == "lobby")
    );
    assert!(stream_id(&history[0]["id"]) < stream_id(&history[2]["id"]));

    let joined = ada.next_of("joined").await;
    assert_eq!(joined["name"], "bob");
    assert_eq!(members(&joined), ["ada", "bob"]);

    // The REST view of the same history.
    let body = app.get_json("/rooms/lobby/messages?limit=2").await;
    let texts: Vec<&str> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["two", "three"]);
    app.finish().await.unwrap();
}

#[tokio::test]
async fn the_welcome_carries_only_the_last_50_messages() {
    let mut settings = ChatApp::settings();
    settings.rate_burst = std::num::NonZeroU32::new(100).unwrap();
    let app = ChatApp::start(settings).await;
    let (mut ada, _) = Member::join(&app.ws_url("lobby", "ada")).await;
    for i in 0..60 {
        ada.say(&format!("m{i}")).await;
    }
    for _ in 0..60 {
        ada.next_of("message").await;
    }
    let (_bob, welcome) = Member::join(&app.ws_url("lobby", "bob")).await;
    let history = welcome["history"].as_array().unwrap();
    assert_eq!(history.len(), 50);
    assert_eq!(history[0]["text"], "m10");
    assert_eq!(history[49]["text"], "m59");
    app.finish().await.unwrap();
}

#[tokio::test]
async fn a_message_reaches_every_member_of_the_room_and_no_one_outside_it() {
    let app = ChatApp::start(ChatApp::settings()).await;
    let (mut ada, _) = Member::join(&app.ws_url("kitchen", "ada")).await;
    let (mut bob, _) = Member::join(&app.ws_url("kitchen", "bob")).await;
    let (mut cy, _) = Member::join(&app.ws_url("kitchen", "cy")).await;
    let (mut dee, _) = Member::join(&app.ws_url("garden", "dee")).await;
    let (mut eve, _) = Member::join(&app.ws_url("garden", "eve")).await;

    ada.say("soup is ready").await;
    for member in [&mut ada, &mut bob, &mut cy] {
        let message = member.next_of("message").await;
        assert_eq!(
            (&message["name"], &message["text"], &message["room"]),
            (&json!("ada"), &json!("soup is ready"), &json!("kitchen"))
        );
    }
    // Frames on one connection arrive in order: if dee had been sent ada's
    // message, it would come before eve's.
    eve.say("roses are out").await;
    let message = dee.next_of("message").await;
    assert_eq!(
        (&message["name"], &message["text"]),
        (&json!("eve"), &json!("roses are out"))
    );
    app.finish().await.unwrap();
}

#[tokio::test]
async fn two_instances_share_a_room_in_the_same_order() {
    let settings = ChatApp::settings();
    let a = ChatApp::start(settings.clone()).await;
    let b = ChatApp::start(chat::Settings {
        instance: "other".into(),
        ..settings
    })
    .await;
    let (mut ada, welcome) = Member::join(&a.ws_url("lobby", "ada")).await;
    assert_eq!(welcome["instance"], "test");
    let (mut bob, welcome) = Member::join(&b.ws_url("lobby", "bob")).await;
    assert_eq!(welcome["instance"], "other");
    assert_eq!(members(&welcome), ["ada", "bob"], "b sees a's member");
    assert_eq!(members(&ada.next_of("joined").await), ["ada", "bob"]);
    let (mut cy, welcome) = Member::join(&a.ws_url("lobby", "cy")).await;
    assert_eq!(members(&welcome), ["ada", "bob", "cy"]);

    // Both instances' members talk at once; every member, on either
    // instance, must see the same messages in the same order.
    const EACH: usize = 15;
    let (ada_says, bob_says) = tokio::join!(
        async {
            for i in 0..EACH {
                ada.say(&format!("a{i}")).await;
            }
            ada
        },
        async {
            for i in 0..EACH {
                bob.say(&format!("b{i}")).await;
            }
            bob
        }
    );
    let (mut ada, mut bob) = (ada_says, bob_says);
    let mut seen = Vec::new();
    for member in [&mut ada, &mut bob, &mut cy] {
        let mut ids = Vec::new();
        for _ in 0..2 * EACH {
            let message = member.next_of("message").await;
            ids.push((stream_id(&message["id"]), message["text"].clone()));
        }
        assert!(ids.windows(2).all(|w| w[0].0 < w[1].0), "ids rise: {ids:?}");
        seen.push(ids);
    }
    assert_eq!(seen[0], seen[1], "a's member and b's member agree");
    assert_eq!(seen[0], seen[2]);

    let rooms = b.get_json("/rooms").await;
    assert_eq!(rooms, json!({"rooms": [{"room": "lobby", "members": 3}]}));
    a.stop().await.unwrap();
    b.finish().await.unwrap();
}

#[tokio::test]
async fn bad_frames_get_error_frames_and_the_connection_survives() {
    let app = ChatApp::start(ChatApp::settings()).await;
    let (mut ada, _) = Member::join(&app.ws_url("lobby", "ada")).await;
    let long = "x".repeat(2001);
    let cases = [
        (Frame::text("hello"), "invalid_json"),
        (Frame::text("[1,2,3]"), "invalid_json"),
        (
            Frame::text(r#"{"type":"shout","text":"hi"}"#),
            "unknown_type",
        ),
        (Frame::text(r#"{"type":"say"}"#), "invalid_text"),
        (Frame::text(r#"{"type":"say","text":""}"#), "empty_text"),
        (
            Frame::text(json!({"type":"say","text": long}).to_string()),
            "text_too_long",
        ),
        (Frame::binary(vec![1, 2, 3]), "binary_frame"),
    ];
    for (frame, code) in cases {
        ada.send(frame).await;
        let error = ada.next().await;
        assert_eq!(
            (&error["type"], &error["code"]),
            (&json!("error"), &json!(code))
        );
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    ada.say("still here").await;
    assert_eq!(ada.next().await["text"], "still here");
    let history = app.get_json("/rooms/lobby/messages").await;
    assert_eq!(
        history["messages"].as_array().unwrap().len(),
        1,
        "{history}"
    );
    app.finish().await.unwrap();
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009() {
    let app = ChatApp::start(ChatApp::settings()).await;
    let (mut ada, _) = Member::join(&app.ws_url("lobby", "ada")).await;
    let (mut bob, _) = Member::join(&app.ws_url("lobby", "bob")).await;
    let just_fits = format!(r#"{{"type":"say","text":"{}"}}"#, "y".repeat(1990));
    assert!(just_fits.len() < 16 * 1024);
    ada.send(Frame::text(just_fits)).await;
    assert_eq!(ada.next_of("message").await["name"], "ada");

    ada.send(Frame::text("z".repeat(16 * 1024 + 1))).await;
    let (close, _) = ada.closed().await;
    assert_eq!(close.map(|c| c.code), Some(CloseCode::Size), "1009");
    let left = bob.next_of("left").await;
    assert_eq!(
        (&left["name"], members(&left)),
        (&json!("ada"), vec!["bob"])
    );
    app.finish().await.unwrap();
}

/// How long the server waits for a close frame to go out (and for the
/// client's answer) before it drops the socket: `connection::CLOSE_GRACE`.
const SERVER_CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Waits until the server has counted `n` slow disconnects: the server's
/// own word that it cut a client, whatever that client sees.
async fn slow_disconnects_reach(app: &ChatApp, n: u64) {
    let line = format!("chat_slow_disconnects_total {n}");
    workshop::eventually(&format!("{n} slow disconnects counted"), WAIT, || async {
        let metrics = reqwest::get(app.url("/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        metrics.lines().any(|l| l == line).then_some(())
    })
    .await;
}

/// On a task: reads until `reader` has every one of `count` messages,
/// checking they come in order, and counts them on `read` as they come.
/// Only the slow member may leave meanwhile.
fn read_every_message(
    mut reader: Member,
    count: usize,
    read: watch::Sender<usize>,
) -> JoinHandle<usize> {
    tokio::spawn(async move {
        let mut got = 0;
        while got < count {
            let frame = reader.next().await;
            if frame["type"] == "message" {
                assert_eq!(
                    frame["text"].as_str().unwrap()[..5],
                    format!("{got:05}"),
                    "the reader gets every message, in order"
                );
                got += 1;
                read.send_replace(got);
            } else if frame["type"] == "left" {
                assert_eq!(frame["name"], "slow");
                assert_eq!(members(&frame), ["reader", "sender"]);
            }
        }
        got
    })
}

/// On a task: counts the `count` echoes of what the sender said on
/// `echoed` as they come.
fn count_echoes(
    mut echoes: SplitStream<Ws>,
    count: usize,
    echoed: watch::Sender<usize>,
) -> JoinHandle<usize> {
    tokio::spawn(async move {
        let mut got = 0;
        while got < count {
            match tokio::time::timeout(WAIT, echoes.next()).await {
                Ok(Some(Ok(Frame::Text(text)))) if text.contains(r#""type":"message""#) => {
                    got += 1;
                    echoed.send_replace(got);
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("the sender's connection ended: {other:?}"),
            }
        }
        got
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_with_1008_and_the_others_get_everything() {
    let mut settings = ChatApp::settings();
    // The sender is a test harness, not a person: let it go fast.
    settings.rate_per_sec = std::num::NonZeroU32::new(100_000).unwrap();
    settings.rate_burst = std::num::NonZeroU32::new(100_000).unwrap();
    settings.outbound_queue = 128;
    let app = ChatApp::start(settings).await;

    // A plain client, with the receive buffer its kernel gives it.
    let (mut slow, _) = Member::join(&app.ws_url("lobby", "slow")).await;
    let (mut reader, _) = Member::join(&app.ws_url("lobby", "reader")).await;
    let (sender, _) = Member::join(&app.ws_url("lobby", "sender")).await;
    assert_eq!(reader.next_of("joined").await["name"], "sender");

    const COUNT: usize = 3000;
    let (read_count, mut read_so_far) = watch::channel(0);
    let reads_everything = read_every_message(reader, COUNT, read_count);
    // The sender reads its own echoes as it goes, and keeps at most 32
    // messages ahead of them and of the reader: both are fast clients, and
    // neither may fall 128 frames behind on a busy machine.
    let (mut sink, echoes) = sender.ws.split();
    let (echo_count, mut echoed_so_far) = watch::channel(0);
    let echoed = count_echoes(echoes, COUNT, echo_count);
    let text = "w".repeat(1500);
    for i in 0..COUNT {
        echoed_so_far.wait_for(|n| n + 32 > i).await.unwrap();
        read_so_far.wait_for(|n| n + 32 > i).await.unwrap();
        let say = json!({"type": "say", "text": format!("{i:05} {text}")});
        sink.send(Frame::text(say.to_string())).await.unwrap();
    }
    assert_eq!(reads_everything.await.unwrap(), COUNT);
    assert_eq!(echoed.await.unwrap(), COUNT);

    slow_disconnects_reach(&app, 1).await;
    // It still reads nothing for longer than the server waits for its close
    // frame to go out; then it reads what it was sent: part of the stream,
    // then 1008.
    tokio::time::sleep(SERVER_CLOSE_GRACE + Duration::from_secs(1)).await;
    let (close, read) = slow.closed().await;
    let close = close.expect("a close frame");
    assert_eq!(close.code, CloseCode::Policy, "1008: {close:?}");
    assert!(read < COUNT, "it was cut before the end ({read} read)");
    app.finish().await.unwrap();
}

/// On a task: reads `member`'s frames `per_sec` a second, or as fast as
/// they come once `hurry` is true; returns the close frame it ends with.
fn read_slowly(
    mut member: Member,
    per_sec: u32,
    hurry: watch::Receiver<bool>,
) -> JoinHandle<Option<CloseFrame>> {
    tokio::spawn(async move {
        loop {
            let frame = tokio::time::timeout(WAIT, member.ws.next())
                .await
                .expect("a frame within 10 s");
            match frame {
                Some(Ok(Frame::Close(close))) => return close,
                Some(Ok(_)) => {}
                Some(Err(err)) => panic!("connection broke without a close frame: {err}"),
                None => panic!("connection ended without a close frame"),
            }
            if !*hurry.borrow() {
                tokio::time::sleep(Duration::from_secs(1) / per_sec).await;
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_slowly_is_cut_with_1008_and_gets_the_close_frame() {
    let mut settings = ChatApp::settings();
    // One sender stands for a busy room (thirty people at ten messages a
    // second): let it go fast.
    settings.rate_per_sec = std::num::NonZeroU32::new(100_000).unwrap();
    settings.rate_burst = std::num::NonZeroU32::new(100_000).unwrap();
    settings.outbound_queue = 128;
    // No pings: a pong the slow client sent after the server let go of the
    // socket would be answered with a reset.
    settings.ping_interval_ms = 600_000;
    settings.idle_timeout_ms = 1_200_000;
    let app = ChatApp::start(settings).await;

    let (slow, _) = Member::join(&app.ws_url("lobby", "slow")).await;
    let (sender, _) = Member::join(&app.ws_url("lobby", "sender")).await;
    let (hurry, hurried) = watch::channel(false);
    // 50 frames a second of 1.5 KB: 75 KB/s, far less than the room says.
    let reads = read_slowly(slow, 50, hurried);

    const MOST: usize = 20_000;
    let (mut sink, echoes) = sender.ws.split();
    let (echo_count, mut echoed_so_far) = watch::channel(0);
    let _echoes = count_echoes(echoes, MOST, echo_count);
    let text = "w".repeat(1500);
    let cut = async {
        let mut i = 0;
        loop {
            echoed_so_far.wait_for(|n| n + 32 > i).await.unwrap();
            let say = json!({"type": "say", "text": format!("{i:05} {text}")});
            sink.send(Frame::text(say.to_string())).await.unwrap();
            i += 1;
            assert!(i < MOST, "the slow reader was not cut after {i} messages");
        }
    };
    tokio::select! {
        () = slow_disconnects_reach(&app, 1) => {}
        () = cut => {}
    }
    // It keeps its pace for longer than the server waits for the close frame
    // to go out, then reads the rest as fast as it can: the last frame is
    // the server's 1008.
    tokio::time::sleep(SERVER_CLOSE_GRACE + Duration::from_secs(1)).await;
    hurry.send_replace(true);
    let close = reads.await.unwrap().expect("a close frame with a code");
    assert_eq!(close.code, CloseCode::Policy, "1008: {close:?}");
    app.finish().await.unwrap();
}

#[tokio::test]
async fn more_than_the_rate_gets_rate_limited_errors() {
    let app = ChatApp::start(ChatApp::settings()).await;
    let (mut ada, _) = Member::join(&app.ws_url("lobby", "ada")).await;
    // Burst 20, then 10 a second: 40 frames sent at once mostly exceed it.
    for i in 0..40 {
        ada.say(&format!("m{i}")).await;
    }
    let (mut accepted, mut limited) = (0, 0);
    for _ in 0..40 {
        let frame = ada.next().await;
        match (frame["type"].as_str(), frame["code"].as_str()) {
            (Some("message"), _) => accepted += 1,
            (Some("error"), Some("rate_limited")) => limited += 1,
            other => panic!("unexpected {other:?}: {frame}"),
        }
    }
    assert!((20..30).contains(&accepted), "{accepted} accepted");
    assert_eq!(accepted + limited, 40);

    // A second later the bucket has refilled by about ten.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ada.say("after a pause").await;
    assert_eq!(ada.next().await["text"], "after a pause");
    app.finish().await.unwrap();
}

#[tokio::test]
async fn presence_is_right_after_clean_and_abrupt_disconnects() {
    // The default timings here (a 60 s idle timeout): a leave seen within
    // the test's 10 s wait came from the close or the dropped socket, not
    // from the idle timer.
    let app = ChatApp::start(ChatApp::settings()).await;
    let (mut ada, _) = Member::join(&app.ws_url("lobby", "ada")).await;
    let (mut bob, _) = Member::join(&app.ws_url("lobby", "bob")).await;
    let (cy, _) = Member::join(&app.ws_url("lobby", "cy")).await;
    let rooms = || async {
        let body = app.get_json("/rooms").await;
        body["rooms"][0]["members"].as_u64().unwrap()
    };
    assert_eq!(rooms().await, 3);

    // Clean: a close frame.
    bob.ws.close(None).await.unwrap();
    let left = ada.next_of("left").await;
    assert_eq!(
        (&left["name"], members(&left)),
        (&json!("bob"), vec!["ada", "cy"])
    );

    // Abrupt: the TCP connection just goes, no close frame.
    drop(cy);
    let left = ada.next_of("left").await;
    assert_eq!((&left["name"], members(&left)), (&json!("cy"), vec!["ada"]));

    // Quick timings on a second instance sharing the rooms, for what only
    // time reveals.
    let quick_settings = chat::Settings {
        key_prefix: app.prefix.clone(),
        ping_interval_ms: 200,
        idle_timeout_ms: 1000,
        ..ChatApp::settings()
    };
    let quick = ChatApp::start(quick_settings.clone()).await;

    // Silent: the socket stays open but nothing comes back, not even a pong
    // (dee never reads, so tungstenite never answers a ping).
    let (dee, _) = Member::join(&quick.ws_url("lobby", "dee")).await;
    assert_eq!(members(&ada.next_of("joined").await), ["ada", "dee"]);
    let left = ada.next_of("left").await;
    assert_eq!(
        (&left["name"], members(&left)),
        (&json!("dee"), vec!["ada"])
    );
    drop(dee);

    // Crash: a whole instance dies with its members still "present"; the
    // quick instance sweeps them out.
    let doomed = CrashableChat::start(quick_settings).await;
    let (_eve, _) = Member::join(&doomed.ws_url("lobby", "eve")).await;
    let joined = ada.next_of("joined").await;
    assert_eq!(members(&joined), ["ada", "eve"]);
    doomed.crash();
    let swept = ada.next_of("members").await;
    assert_eq!(
        (&swept["gone"], &swept["back"], members(&swept)),
        (&json!(["eve"]), &json!([]), vec!["ada"])
    );
    assert_eq!(rooms().await, 1);
    quick.stop().await.unwrap();
    app.finish().await.unwrap();
}

#[tokio::test]
async fn shutdown_closes_connections_with_1001_and_they_leave() {
    let app = ChatApp::start(ChatApp::settings()).await;
    let (mut ada, _) = Member::join(&app.ws_url("lobby", "ada")).await;
    let (mut bob, _) = Member::join(&app.ws_url("lobby", "bob")).await;
    let other = ChatApp::start(chat::Settings {
        key_prefix: app.prefix.clone(),
        ..ChatApp::settings()
    })
    .await;
    let (mut cy, _) = Member::join(&other.ws_url("lobby", "cy")).await;

    let stopped = tokio::spawn(app.stop());
    for member in [&mut ada, &mut bob] {
        let (close, _) = member.closed().await;
        assert_eq!(close.map(|c| c.code), Some(CloseCode::Away), "1001");
    }
    stopped.await.unwrap().unwrap();
    // Both left before the instance finished stopping: no ghosts.
    let mut gone = Vec::new();
    while gone.len() < 2 {
        let left = cy.next_of("left").await;
        gone.push(left["name"].as_str().unwrap().to_owned());
        if gone.len() == 2 {
            assert_eq!(members(&left), ["cy"]);
        }
    }
    gone.sort();
    assert_eq!(gone, ["ada", "bob"]);
    other.finish().await.unwrap();
}

#[tokio::test]
async fn with_redis_down_members_on_one_instance_still_talk() {
    let proxy = Proxy::start("127.0.0.1:6379").await.unwrap();
    let app = ChatApp::start_with_redis(ChatApp::settings(), &proxy.url("redis")).await;
    let (mut ada, _) = Member::join(&app.ws_url("lobby", "ada")).await;
    let (mut bob, _) = Member::join(&app.ws_url("lobby", "bob")).await;
    ada.next_of("joined").await;

    proxy.cut();
    for member in [&mut ada, &mut bob] {
        let error = member.next_of("error").await;
        assert_eq!(error["code"], "redis_unavailable", "{error}");
    }
    let ready = reqwest::get(app.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["checks"][0]["name"], "redis");
    assert_eq!(body["checks"][0]["ok"], false);

    ada.say("can you hear me").await;
    let message = bob.next_of("message").await;
    assert_eq!(message["text"], "can you hear me");
    assert!(message["id"].as_str().unwrap().starts_with("local-"));
    let warning = ada.next_of("error").await;
    assert_eq!(warning["code"], "redis_unavailable");

    proxy.restore();
    for member in [&mut ada, &mut bob] {
        let notice = member.next_of("notice").await;
        assert_eq!(notice["code"], "redis_restored");
    }
    // The command connection reconnects on its own schedule: /readyz is
    // 200 again once Redis is back (within 10 s).
    app.wait_until_ready().await;
    bob.say("loud and clear").await;
    let message = ada.next_of("message").await;
    assert_eq!(message["text"], "loud and clear");
    stream_id(&message["id"]); // a Redis stream id again
    app.finish().await.unwrap();
}

#[tokio::test]
async fn a_subscription_gone_silent_is_noticed_and_replaced() {
    let proxy = Proxy::start("127.0.0.1:6379").await.unwrap();
    let settings = chat::Settings {
        ping_interval_ms: 1_000,
        ..ChatApp::settings()
    };
    let a = ChatApp::start_with_redis(settings.clone(), &proxy.url("redis")).await;
    let b = ChatApp::start(chat::Settings {
        instance: "other".into(),
        ..settings
    })
    .await;
    let (mut ada, _) = Member::join(&a.ws_url("lobby", "ada")).await;
    let (mut bob, _) = Member::join(&b.ws_url("lobby", "bob")).await;
    ada.next_of("joined").await;

    // The network drops a's Redis connections without closing them: no
    // error, no EOF, just silence. Only a PING on the subscription can tell.
    proxy.silence();
    let error = ada.next_of("error").await;
    assert_eq!(error["code"], "redis_unavailable", "{error}");
    let notice = ada.next_of("notice").await;
    assert_eq!(notice["code"], "redis_restored");
    bob.say("still there?").await;
    assert_eq!(bob.next_of("message").await["text"], "still there?");
    let message = ada.next_of("message").await;
    assert_eq!(message["text"], "still there?");
    // Commands from a went silent too; timed-out replies replaced their
    // connection, so what ada says and her leaving reach b.
    ada.say("yes").await;
    let message = bob.next_of("message").await;
    assert_eq!(
        (&message["name"], &message["text"]),
        (&json!("ada"), &json!("yes"))
    );
    a.finish().await.unwrap();
    let left = bob.next_of("left").await;
    assert_eq!(left["name"], "ada");
    b.finish().await.unwrap();
}

#[tokio::test]
async fn bad_names_and_plain_http_are_refused_before_the_upgrade() {
    let app = ChatApp::start(ChatApp::settings()).await;
    for query in [
        "room=lobby",
        "name=ada",
        "room=two%20words&name=ada",
        "room=lobby&name=a%2Fb",
        &format!("room={}&name=ada", "r".repeat(33)),
    ] {
        let response = reqwest::get(app.url(&format!("/ws?{query}")))
            .await
            .unwrap();
        // A name that breaks the rule is invalid, 422, as in every lab.
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{query}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid", "{query}: {body}");
    }
    let error = tokio_tungstenite::connect_async(app.ws_url("lobby", "a%20b"))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("422"), "{error}");

    // A good name but no upgrade: a plain GET is not a WebSocket.
    let response = reqwest::get(app.url("/ws?room=lobby&name=ada"))
        .await
        .unwrap();
    assert!(response.status().is_client_error(), "{}", response.status());

    let response = reqwest::get(app.url("/rooms/no%20such/messages"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // Not even UTF-8: still the lab's JSON error, as the document says.
    let response = reqwest::get(app.url("/rooms/%FF/messages")).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "malformed", "{body}");
    let response = reqwest::get(app.url("/rooms/lobby/messages?limit=0"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    app.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_chats_between_two_browsers_and_reconnects_after_a_restart() {
    let settings = ChatApp::settings();
    let app = ChatApp::start(settings.clone()).await;
    let (mut cy, _) = Member::join(&app.ws_url("lobby", "cy")).await;
    cy.say("said before anyone opened the page").await;
    cy.next_of("message").await;

    let driver = workshop::ChromeDriver::start().await;
    let (ada, bob) = tokio::join!(driver.browser(), driver.browser());
    let long = Duration::from_secs(15);
    ada.goto(&app.url("/?room=lobby&name=ada")).await;
    ada.wait_until(
        "document.getElementById('status').textContent.startsWith('in lobby as ada')",
        long,
    )
    .await;
    ada.wait_until(
        "[...document.querySelectorAll('#messages li.message')].some(li => li.textContent.includes('said before anyone opened the page'))",
        WAIT,
    )
    .await;
    bob.goto(&app.url("/?room=lobby&name=bob")).await;
    bob.wait_until(
        "document.getElementById('status').textContent.startsWith('in lobby as bob')",
        long,
    )
    .await;
    let members =
        "[...document.querySelectorAll('#members li')].map(li => li.textContent).join(',')";
    ada.wait_until(&format!("{members} === 'ada,bob,cy'"), WAIT)
        .await;

    bob.type_into("text", "hello from a real browser").await;
    bob.click("send").await;
    let shows = "[...document.querySelectorAll('#messages li.message')].some(li => li.textContent.includes('bob') && li.textContent.includes('hello from a real browser'))";
    ada.wait_until(shows, WAIT).await;
    bob.wait_until(shows, WAIT).await;
    let message = cy.next_of("message").await;
    assert_eq!(
        (&message["name"], &message["text"]),
        (&json!("bob"), &json!("hello from a real browser"))
    );

    // The server restarts on the same port: the pages notice the close,
    // reconnect on their own, and are back in the room.
    let addr = app.addr;
    app.stop().await.unwrap();
    ada.wait_until(
        "document.getElementById('status').textContent.includes('reconnecting')",
        WAIT,
    )
    .await;
    let app = ChatApp::start_at(&addr.to_string(), settings, &workshop::redis_url()).await;
    for page in [&ada, &bob] {
        page.wait_until("document.getElementById('status').className === 'up'", long)
            .await;
    }
    ada.wait_until(&format!("{members} === 'ada,bob'"), WAIT)
        .await;
    ada.type_into("text", "back again").await;
    ada.click("send").await;
    bob.wait_until(
        "[...document.querySelectorAll('#messages li.message')].some(li => li.textContent.includes('back again'))",
        WAIT,
    )
    .await;
    let shown = bob
        .eval("document.querySelectorAll('#messages li.message').length")
        .await;
    assert_eq!(shown, 3, "history after the reconnect was not shown twice");
    ada.close().await;
    bob.close().await;
    app.finish().await.unwrap();
}

#[tokio::test]
async fn an_empty_room_leaves_the_list_and_its_history_expires_unless_someone_returns() {
    let app = ChatApp::start(ChatApp::settings()).await;
    let (mut ada, _) = Member::join(&app.ws_url("attic", "ada")).await;
    ada.say("anyone?").await;
    ada.next_of("message").await;
    assert_eq!(app.get_json("/rooms").await["rooms"][0]["room"], "attic");

    ada.ws.close(None).await.unwrap();
    let mut redis = workshop::redis_connection(&workshop::redis_url()).await;
    let history = format!("{}room:attic:history", app.prefix);
    let ttl = workshop::eventually("the history set to expire", WAIT, || {
        let (mut redis, history) = (redis.clone(), history.clone());
        async move {
            let ttl: i64 = redis::cmd("PTTL")
                .arg(&history)
                .query_async(&mut redis)
                .await
                .ok()?;
            (ttl > 0).then_some(ttl)
        }
    })
    .await;
    assert!(ttl <= 24 * 3600 * 1000, "{ttl}");
    assert_eq!(app.get_json("/rooms").await, json!({"rooms": []}));
    // Still readable meanwhile, and kept again once someone is back.
    let body = app.get_json("/rooms/attic/messages").await;
    assert_eq!(body["messages"][0]["text"], "anyone?");
    let (_bob, welcome) = Member::join(&app.ws_url("attic", "bob")).await;
    assert_eq!(welcome["history"][0]["text"], "anyone?");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&history)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(ttl, -1, "no expiry while someone is in the room");
    app.finish().await.unwrap();
}

/// The PTTL of a key: -1 when it has no expiry, -2 when it does not exist.
async fn pttl(redis: &lab_core::redis::Redis, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut redis.clone())
        .await
        .unwrap()
}

#[tokio::test]
async fn presence_restored_after_an_outage_is_listed_kept_and_swept() {
    // Quick timings: a presence entry lives under a second unrefreshed.
    let quick = chat::Settings {
        ping_interval_ms: 200,
        idle_timeout_ms: 1000,
        ..ChatApp::settings()
    };
    let proxy = Proxy::start("127.0.0.1:6379").await.unwrap();
    let sweeper = ChatApp::start(quick.clone()).await;
    let doomed = CrashableChat::start_with_redis(quick, &proxy.url("redis")).await;
    let (mut ada, _) = Member::join(&doomed.ws_url("attic", "ada")).await;
    ada.say("anyone?").await;
    ada.next_of("message").await;
    // From here on ada only answers pings, as a browser would.
    let _ada = tokio::spawn(async move { while let Some(Ok(_)) = ada.ws.next().await {} });
    let redis = workshop::redis_connection(&workshop::redis_url()).await;
    let history = format!("{}room:attic:history", sweeper.prefix);
    let members = format!("{}room:attic:members", sweeper.prefix);

    // An outage longer than the presence timeout: the other instance
    // sweeps ada out, the room leaves the list, its history is set to expire.
    proxy.cut();
    workshop::eventually("the room forgotten during the outage", WAIT, || async {
        (pttl(&redis, &history).await > 0).then_some(())
    })
    .await;
    assert_eq!(sweeper.get_json("/rooms").await, json!({"rooms": []}));

    // Redis is back: ada's instance puts her back, and the room with her.
    proxy.restore();
    workshop::eventually("ada present again", WAIT, || async {
        let count: u64 = redis::cmd("ZCARD")
            .arg(&members)
            .query_async(&mut redis.clone())
            .await
            .unwrap();
        (count == 1).then_some(())
    })
    .await;
    assert_eq!(
        sweeper.get_json("/rooms").await,
        json!({"rooms": [{"room": "attic", "members": 1}]}),
        "the room is listed again"
    );
    assert_eq!(pttl(&redis, &history).await, -1, "the history is kept");

    // Her instance dies: the ghost it left is swept like any other.
    doomed.crash();
    workshop::eventually("ada swept after her instance died", WAIT, || async {
        let rooms = sweeper.get_json("/rooms").await;
        (rooms == json!({"rooms": []})).then_some(())
    })
    .await;
    assert!(pttl(&redis, &history).await > 0);
    sweeper.finish().await.unwrap();
}

/// On a task: `member` says `<room> 0`, `<room> 1`, … one after another
/// (reading each echo, so its own queue never fills) until `stop`, then
/// `end`; returns what it said.
fn keep_saying(
    mut member: Member,
    room: &'static str,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut said = Vec::new();
        while !*stop.borrow_and_update() {
            let text = format!("{room} {}", said.len());
            member.say(&text).await;
            assert_eq!(member.next_of("message").await["text"], text);
            said.push(text);
            // Paced, so the stream holds everything said (it keeps 1000).
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = stop.changed() => {}
            }
        }
        member.say("end").await;
        said.push("end".into());
        said
    })
}

/// Waits until a room's history holds at least `len` messages; returns how
/// many it holds.
async fn history_reaches(prefix: &str, room: &str, len: u64) -> u64 {
    let redis = workshop::redis_connection(&workshop::redis_url()).await;
    let key = format!("{prefix}room:{room}:history");
    workshop::eventually(&format!("{len} messages in {room}"), WAIT, || {
        let (mut redis, key) = (redis.clone(), key.clone());
        async move {
            let have: u64 = redis::cmd("XLEN")
                .arg(&key)
                .query_async(&mut redis)
                .await
                .ok()?;
            (have >= len).then_some(have)
        }
    })
    .await
}

impl Member {
    /// The texts of the messages that arrive, up to and including `last`.
    async fn messages_until(&mut self, last: &str) -> Vec<String> {
        let mut texts = Vec::new();
        while texts.last().is_none_or(|t| t != last) {
            let message = self.next_of("message").await;
            texts.push(message["text"].as_str().unwrap().to_owned());
        }
        texts
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_while_a_subscription_was_down_reach_its_members_once_in_order() {
    let proxy = Proxy::start("127.0.0.1:6379").await.unwrap();
    let settings = chat::Settings {
        // Room for every message missed: the test reads them at the end.
        outbound_queue: 1024,
        ..ChatApp::settings()
    };
    let a = ChatApp::start_with_redis(settings.clone(), &proxy.url("redis")).await;
    let b = ChatApp::start(chat::Settings {
        instance: "other".into(),
        rate_per_sec: std::num::NonZeroU32::new(1000).unwrap(),
        rate_burst: std::num::NonZeroU32::new(1000).unwrap(),
        ..settings
    })
    .await;
    // On a: the lobby has heard a message before the cut, the garden not.
    let (mut ada, _) = Member::join(&a.ws_url("lobby", "ada")).await;
    let (mut cy, _) = Member::join(&a.ws_url("lobby", "cy")).await;
    let (mut dee, _) = Member::join(&a.ws_url("garden", "dee")).await;
    let (mut bob, _) = Member::join(&b.ws_url("lobby", "bob")).await;
    let (eve, _) = Member::join(&b.ws_url("garden", "eve")).await;
    bob.say("before").await;
    for member in [&mut bob, &mut ada, &mut cy] {
        assert_eq!(member.next_of("message").await["text"], "before");
    }

    proxy.cut();
    for member in [&mut ada, &mut cy, &mut dee] {
        let error = member.next_of("error").await;
        assert_eq!(error["code"], "redis_unavailable", "{error}");
    }
    // b's members talk on through the cut, the resubscription and after
    // it, so some messages land while a catches up.
    let (stop, stopped) = watch::channel(false);
    let lobby = keep_saying(bob, "lobby", stopped.clone());
    let garden = keep_saying(eve, "garden", stopped);
    history_reaches(&a.prefix, "lobby", 1 + 5).await; // "before", then a few a misses
    proxy.restore();
    a.wait_until_ready().await; // subscribed again, and caught up
    let so_far = history_reaches(&a.prefix, "lobby", 0).await;
    history_reaches(&a.prefix, "lobby", so_far + 5).await; // and a few a hears live
    stop.send_replace(true);
    let (lobby, garden) = (lobby.await.unwrap(), garden.await.unwrap());

    for (member, said) in [(&mut ada, &lobby), (&mut cy, &lobby), (&mut dee, &garden)] {
        let got = member.messages_until("end").await;
        assert_eq!(&got, said, "every message once, in order");
    }
    a.finish().await.unwrap();
    b.finish().await.unwrap();
}

#[tokio::test]
async fn a_catch_up_larger_than_a_queue_sends_the_newest_and_says_so() {
    let proxy = Proxy::start("127.0.0.1:6379").await.unwrap();
    let settings = chat::Settings {
        outbound_queue: 8,
        ..ChatApp::settings()
    };
    let a = ChatApp::start_with_redis(settings.clone(), &proxy.url("redis")).await;
    let b = ChatApp::start(chat::Settings {
        instance: "other".into(),
        ..settings
    })
    .await;
    let (mut ada, _) = Member::join(&a.ws_url("lobby", "ada")).await;
    let (mut bob, _) = Member::join(&b.ws_url("lobby", "bob")).await;
    ada.next_of("joined").await;

    proxy.cut();
    assert_eq!(ada.next_of("error").await["code"], "redis_unavailable");
    for i in 0..12 {
        bob.say(&format!("m{i}")).await;
        bob.next_of("message").await;
    }
    proxy.restore();
    // Twelve missed would overflow ada's queue of eight and cut her off as
    // too slow: she gets the newest half a queue's worth, after a notice.
    let mut frames = Vec::new();
    loop {
        let frame = ada.next().await;
        if frame["code"] == "redis_restored" {
            break;
        }
        frames.push(frame);
    }
    let first = frames.first().map(|f| (&f["type"], &f["code"]));
    let notice = (&json!("notice"), &json!("messages_missed"));
    assert_eq!(first, Some(notice), "{frames:?}");
    let texts: Vec<&str> = frames[1..]
        .iter()
        .map(|f| f["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["m8", "m9", "m10", "m11"]);
    bob.say("after").await;
    assert_eq!(ada.next_of("message").await["text"], "after");
    a.finish().await.unwrap();
    b.finish().await.unwrap();
}

impl Member {
    /// Reads frames until this client's own view of the room is `expected`;
    /// fails showing the view it was left with.
    async fn sees_members(&mut self, expected: &[&str]) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.view != expected {
            let Ok(frame) = tokio::time::timeout_at(deadline, self.ws.next()).await else {
                panic!("the view stayed {:?}, not {expected:?}", self.view);
            };
            if let Some(Ok(Frame::Text(text))) = frame {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame.get("members").is_some() {
                    self.view = members(&frame).into_iter().map(String::from).collect();
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_whole_within_seconds_of_a_redis_restart() {
    let mut redis = workshop::PrivateRedis::start(workshop::Persistence::None).await;
    // The production timings: presence is refreshed every 20 s, longer
    // than this test waits for anything.
    let settings = ChatApp::settings();
    let a = ChatApp::start_with_redis(settings.clone(), &redis.url()).await;
    let b = ChatApp::start_with_redis(
        chat::Settings {
            instance: "other".into(),
            ..settings
        },
        &redis.url(),
    )
    .await;
    let (mut ann, _) = Member::join(&a.ws_url("lobby", "ann")).await;

    // A real restart: the new Redis remembers nothing, presence included.
    // While it is down, bob joins on a and cy on b: each instance serves
    // them alone, and b has no member who ever joined through Redis.
    redis.kill();
    assert_eq!(ann.next_of("error").await["code"], "redis_unavailable");
    let (mut bob, welcome) = Member::join(&a.ws_url("lobby", "bob")).await;
    assert_eq!(members(&welcome), ["ann", "bob"]);
    let (mut cy, welcome) = Member::join(&b.ws_url("lobby", "cy")).await;
    assert_eq!(members(&welcome), ["cy"]);
    redis.start_again().await;
    for member in [&mut ann, &mut bob, &mut cy] {
        let notice = member.next_of("notice").await;
        assert_eq!(notice["code"], "redis_restored", "{notice}");
    }
    // Within seconds of Redis answering, each instance has put its members
    // back: the room is listed with all three, and every member's own view
    // holds everyone, itself included.
    workshop::eventually("the lobby listed with its three members", WAIT, || async {
        let rooms = a.get_json("/rooms").await;
        (rooms == json!({"rooms": [{"room": "lobby", "members": 3}]})).then_some(())
    })
    .await;
    for member in [&mut ann, &mut bob, &mut cy] {
        member.sees_members(&["ann", "bob", "cy"]).await;
    }
    // A newcomer sees everyone, and a member who leaves is announced.
    let (mut dee, welcome) = Member::join(&b.ws_url("lobby", "dee")).await;
    assert_eq!(members(&welcome), ["ann", "bob", "cy", "dee"]);
    bob.ws.close(None).await.unwrap();
    for member in [&mut ann, &mut cy, &mut dee] {
        let left = member.next_of("left").await;
        assert_eq!(
            (&left["name"], members(&left)),
            (&json!("bob"), vec!["ann", "cy", "dee"])
        );
    }
    a.finish().await.unwrap();
    b.finish().await.unwrap();
}

/// A member of a crowd: it reads everything on a task of its own, as a
/// page would, and keeps the last frame that carried a member list, as
/// text (a room of hundreds sends megabytes of lists; only the last is
/// read). The task ends, with the close frame if any, only if the
/// connection does.
struct Crowded {
    view: std::sync::Arc<std::sync::Mutex<String>>,
    task: JoinHandle<Option<CloseFrame>>,
}

impl Crowded {
    async fn join(url: String) -> Self {
        let (member, welcome) = Member::join(&url).await;
        let view = std::sync::Arc::new(std::sync::Mutex::new(welcome.to_string()));
        let mut ws = member.ws;
        let last = view.clone();
        let task = tokio::spawn(async move {
            while let Some(frame) = ws.next().await {
                match frame {
                    Ok(Frame::Text(text)) if text.contains(r#""members":"#) => {
                        *last.lock().unwrap() = text.to_string();
                    }
                    Ok(Frame::Close(close)) => return close,
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
            None
        });
        Self { view, task }
    }

    /// Forgets the list seen so far: the next one must come from the server.
    fn forget(&self) {
        *self.view.lock().unwrap() = r#"{"members":[]}"#.into();
    }

    /// How many members this member's page lists.
    fn sees(&self) -> usize {
        let frame: Value = serde_json::from_str(&self.view.lock().unwrap()).unwrap();
        members(&frame).len()
    }
}

async fn slow_disconnects(app: &ChatApp) -> u64 {
    let metrics = reqwest::get(app.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("chat_slow_disconnects_total "))
        .map_or(0, |n| n.parse().unwrap())
}

/// Waits until every member of `crowd` lists all of them, `/rooms` lists
/// the room with them, and nobody was cut; fails saying which of these did
/// not happen.
async fn crowd_whole(app: &ChatApp, room: &str, crowd: &[Crowded], when: &str) {
    let n = crowd.len();
    let listed = json!({"rooms": [{"room": room, "members": n}]});
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let cut = crowd.iter().filter(|m| m.task.is_finished()).count();
        let whole = crowd.iter().filter(|m| m.sees() == n).count();
        let rooms = app.get_json("/rooms").await;
        let slow = slow_disconnects(app).await;
        if cut == 0 && slow == 0 && whole == n && rooms == listed {
            return;
        }
        if cut > 0 || slow > 0 || tokio::time::Instant::now() > deadline {
            panic!(
                "{when}: {cut} of {n} members cut (the server counts {slow} too slow), \
                 {whole} of {n} pages list everyone, /rooms says {rooms}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowded_room_survives_a_redis_restart_with_nobody_cut() {
    const CROWD: usize = 400;
    let mut redis = workshop::PrivateRedis::start(workshop::Persistence::None).await;
    let app = ChatApp::start_with_redis(ChatApp::settings(), &redis.url()).await;
    let crowd: Vec<Crowded> = futures::stream::iter(0..CROWD)
        .map(|i| Crowded::join(app.ws_url("crowd", &format!("m{i:03}"))))
        .buffer_unordered(16)
        .collect()
        .await;
    crowd_whole(&app, "crowd", &crowd, "before the restart").await;

    // Redis restarts empty: the instance puts all 400 back at once. Were
    // that one announcement per name, each carrying the whole list, every
    // member would be sent 400 lists of up to 400 names at once: far more
    // than a queue of 256 frames holds, and everyone would be cut.
    redis.kill();
    // Each page must be told the list again, by a frame from after the
    // restart.
    crowd.iter().for_each(Crowded::forget);
    redis.start_again().await;
    crowd_whole(&app, "crowd", &crowd, "after the restart").await;
    app.finish().await.unwrap();
}

#[tokio::test]
async fn two_connections_with_one_name_are_one_member_until_the_last_leaves() {
    let app = ChatApp::start(ChatApp::settings()).await;
    let (mut ann, _) = Member::join(&app.ws_url("lobby", "ann")).await;
    let (mut bob, _) = Member::join(&app.ws_url("lobby", "bob")).await;
    assert_eq!(ann.next_of("joined").await["name"], "bob");

    // ann again, in a second tab: welcomed, but nobody is told she joined,
    // since she was here already. (bob's next frame is his own message.)
    let (mut ann_again, welcome) = Member::join(&app.ws_url("lobby", "ann")).await;
    assert_eq!(members(&welcome), ["ann", "bob"]);
    bob.say("one").await;
    for member in [&mut bob, &mut ann] {
        let next = member.next().await;
        assert_eq!(
            (&next["type"], &next["text"]),
            (&json!("message"), &json!("one"))
        );
    }

    // One of ann's tabs closes: she is still here, so nobody is told she left.
    ann_again.ws.close(None).await.unwrap();
    let redis = workshop::redis_connection(&workshop::redis_url()).await;
    let entries = format!("{}room:lobby:members", app.prefix);
    workshop::eventually("the closed tab's presence entry removed", WAIT, || async {
        let count: u64 = redis::cmd("ZCARD")
            .arg(&entries)
            .query_async(&mut redis.clone())
            .await
            .unwrap();
        (count == 2).then_some(())
    })
    .await;
    bob.say("two").await;
    let next = bob.next().await;
    assert_eq!(
        (&next["type"], &next["text"]),
        (&json!("message"), &json!("two"))
    );
    assert_eq!(
        app.get_json("/rooms").await,
        json!({"rooms": [{"room": "lobby", "members": 2}]})
    );

    // Her last tab closes: now she has left.
    ann.ws.close(None).await.unwrap();
    let left = bob.next_of("left").await;
    assert_eq!(
        (&left["name"], members(&left)),
        (&json!("ann"), vec!["bob"])
    );
    app.finish().await.unwrap();
}

#[tokio::test]
async fn joined_and_left_say_when_by_the_server_clock() {
    let app = ChatApp::start(ChatApp::settings()).await;
    let (mut ann, _) = Member::join(&app.ws_url("lobby", "ann")).await;
    let (bob, _) = Member::join(&app.ws_url("lobby", "bob")).await;
    let joined = ann.next_of("joined").await;
    drop(bob);
    let left = ann.next_of("left").await;
    let at = |frame: &Value| {
        let at = frame["at"]
            .as_str()
            .unwrap_or_else(|| panic!("no `at` in {frame}"));
        chrono::DateTime::parse_from_rfc3339(at).unwrap_or_else(|err| panic!("{at}: {err}"))
    };
    assert!(at(&joined) <= at(&left), "{joined} {left}");
    let off = (chrono::Utc::now() - at(&left).to_utc()).abs();
    assert!(off < chrono::TimeDelta::minutes(1), "a clock off by {off}");
    app.finish().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_why_the_server_refused_a_join_and_does_not_retry() {
    let app = ChatApp::start(ChatApp::settings()).await;
    let driver = workshop::ChromeDriver::start().await;
    let page = driver.browser().await;
    // A link that skips the form: the server refuses the name.
    page.goto(&app.url("/?room=two%20words&name=x")).await;
    page.wait_until(
        "document.getElementById('status').className === 'refused'",
        Duration::from_secs(15),
    )
    .await;
    let status = page
        .eval("document.getElementById('status').textContent")
        .await;
    let status = status.as_str().unwrap();
    assert!(
        status.contains("room: must be 1–32 letters, digits, '-' or '_'"),
        "the server's reason: {status}"
    );
    assert!(!status.contains("reconnecting"), "{status}");
    // The form is there to fix it: a good room joins.
    page.eval("document.getElementById('room').value = 'lobby'")
        .await;
    page.click("join").await;
    page.wait_until(
        "document.getElementById('status').textContent.startsWith('in lobby as x')",
        Duration::from_secs(15),
    )
    .await;
    page.close().await;
    app.finish().await.unwrap();
}
