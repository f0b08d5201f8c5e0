//! `lab sim chat`: a busy room on the running chat lab, and, with
//! `--slow-reader`, the member who stops reading (workshop exercise 4.3).
//!
//! Senders talk at a steady rate (within the server's per-connection rate
//! limit), a reader reads everything, and the slow reader joins and then
//! reads nothing. Its frames pile up in the server's queue for it and in
//! both kernels' socket buffers; when the queue is full the server cuts it
//! with 1008 and the room goes on. At the end the slow reader reads what
//! reached it, and the report says how its connection ended, how far it
//! got, and whether the reader next to it missed anything.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{Message as Frame, protocol::CloseFrame};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

#[derive(Args)]
pub struct ChatSim {
    /// The room (a new name each run keeps runs apart).
    #[arg(long, default_value = "busy")]
    room: String,
    /// Members who talk.
    #[arg(long, default_value_t = 30)]
    senders: usize,
    /// Messages per second from each sender (the server allows 10 by default).
    #[arg(long, default_value_t = 8.0)]
    rate: f64,
    /// Characters per message.
    #[arg(long, default_value_t = 1500)]
    size: usize,
    /// How long the room talks.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Add a member who joins and reads nothing until the end.
    #[arg(long)]
    slow_reader: bool,
    /// The chat lab's address (what `lab up` listens on).
    #[arg(long, env = "CHAT_HTTP_ADDR", default_value = "127.0.0.1:8083")]
    chat_addr: String,
}

pub async fn run(sim: ChatSim) -> anyhow::Result<()> {
    let base = format!("ws://{}/ws", sim.chat_addr.replace("0.0.0.0", "127.0.0.1"));
    let url = |name: &str| {
        url::Url::parse_with_params(&base, [("room", sim.room.as_str()), ("name", name)])
            .map(String::from)
            .context("the chat address makes no URL")
    };
    let slow = match sim.slow_reader {
        true => Some(join(&url("slow-reader")?).await?),
        false => None,
    };
    let reader = join(&url("reader")?).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let counting = tokio::spawn(count_messages(reader, stop.clone()));
    let mut senders = tokio::task::JoinSet::new();
    for i in 0..sim.senders {
        let ws = join(&url(&format!("sender-{i}"))?).await?;
        let period = Duration::from_secs_f64(1.0 / sim.rate);
        let offset = period.mul_f64(i as f64 / sim.senders as f64);
        senders.spawn(talk(ws, i, sim.size, period, offset, sim.duration));
    }
    println!(
        "room {}: {} senders × {} msg/s of {} bytes for {}",
        sim.room,
        sim.senders,
        sim.rate,
        sim.size,
        humantime::format_duration(sim.duration)
    );
    let mut said = 0;
    while let Some(sent) = senders.join_next().await {
        said += sent??;
    }
    // Let the last messages reach the reader, then stop counting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let read = counting.await??;
    if read == said {
        println!("said {said}; the reader got every one");
    } else {
        println!("said {said}; the reader got only {read}");
    }
    if let Some(slow) = slow {
        report_slow(slow).await;
    }
    Ok(())
}

/// Opens a member's connection and waits for its welcome.
async fn join(url: &str) -> anyhow::Result<Socket> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .with_context(|| {
            format!("connect {url}: is the chat lab running (`lab up --only chat`)?")
        })?;
    match ws.next().await {
        Some(Ok(Frame::Text(text))) if text.contains(r#""type":"welcome""#) => Ok(ws),
        other => bail!("{url}: no welcome: {other:?}"),
    }
}

/// Says a message every `period` until `duration` has passed; returns how
/// many it said. Reads (and drops) what it is sent, as a person's page does.
async fn talk(
    ws: Socket,
    i: usize,
    size: usize,
    period: Duration,
    offset: Duration,
    duration: Duration,
) -> anyhow::Result<u64> {
    let (mut sink, mut stream) = ws.split();
    let drain = tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
    let end = tokio::time::Instant::now() + duration;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
    let text = "x".repeat(size);
    let mut said = 0;
    while tick.tick().await < end {
        let say = serde_json::json!({"type": "say", "text": format!("{i} {said} {text}")});
        sink.send(Frame::text(say.to_string())).await?;
        said += 1;
    }
    let _ = sink.close().await;
    drain.abort();
    Ok(said)
}

/// Counts `message` frames until stopped.
async fn count_messages(
    mut ws: Socket,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<u64> {
    let mut count = 0;
    loop {
        tokio::select! {
            frame = ws.next() => match frame {
                Some(Ok(Frame::Text(text))) if text.contains(r#""type":"message""#) => count += 1,
                Some(Ok(_)) => {}
                Some(Err(err)) => bail!("the reader's connection broke: {err}"),
                None => bail!("the reader's connection ended"),
            },
            () = stop.cancelled() => return Ok(count),
        }
    }
}

/// Reads what reached the slow reader, and says how its connection ended.
async fn report_slow(mut slow: Socket) {
    let mut messages = 0u64;
    let ending = loop {
        match tokio::time::timeout(Duration::from_secs(5), slow.next()).await {
            Ok(Some(Ok(Frame::Text(text)))) => {
                if text.contains(r#""type":"message""#) {
                    messages += 1;
                }
            }
            Ok(Some(Ok(Frame::Close(close)))) => break describe_close(close),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(err))) => {
                break format!("its connection broke without a close frame ({err})");
            }
            Ok(None) => break "its connection ended without a close frame".to_owned(),
            Err(_) => break "still connected: the room was not busy enough to cut it".to_owned(),
        }
    };
    println!("the slow reader read {messages} messages late; {ending}");
}

fn describe_close(close: Option<CloseFrame>) -> String {
    match close {
        Some(frame) => format!(
            "the server closed it with {} ({})",
            u16::from(frame.code),
            frame.reason
        ),
        None => "the server closed it without a code".to_owned(),
    }
}
