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
//!
//! Each message carries the instant it was sent, so the reader measures
//! fan-out latency (said → delivered, one clock: this process's) the whole
//! time; `--plot` draws it over time, the line a learner looks at to see
//! that the stalled member does not slow the room.

use std::time::{Duration, Instant};

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
    /// Characters per message (the server takes 2,000 at most, and each
    /// message starts with ~25 of its own: sender, count, send time).
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u16).range(1..=1950))]
    size: u16,
    /// How long the room talks.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Add a member who joins and reads nothing until the end.
    #[arg(long)]
    slow_reader: bool,
    /// Draw the reader's fan-out latency over time into this SVG file.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
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
    let origin = Instant::now();
    let counting = tokio::spawn(count_messages(reader, origin, stop.clone()));
    let mut senders = tokio::task::JoinSet::new();
    for i in 0..sim.senders {
        let ws = join(&url(&format!("sender-{i}"))?).await?;
        let period = Duration::from_secs_f64(1.0 / sim.rate);
        let offset = period.mul_f64(i as f64 / sim.senders as f64);
        let pace = Pace {
            period,
            offset,
            duration: sim.duration,
        };
        senders.spawn(talk(ws, i, usize::from(sim.size), pace, origin));
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
    let arrivals = counting.await??;
    let read = arrivals.len() as u64;
    let latencies: Vec<(f64, f64)> = arrivals
        .into_iter()
        .filter_map(|(t, latency)| Some((t, latency?)))
        .collect();
    if read == said {
        println!("said {said}; the reader got every one");
    } else {
        println!("said {said}; the reader got only {read}");
    }
    print_latency(&latencies);
    if let Some(path) = &sim.plot {
        plot_latency(path, &latencies)?;
        eprintln!("plot written to {}", path.display());
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

/// When a sender talks: every `period`, starting `offset` in, for `duration`.
struct Pace {
    period: Duration,
    offset: Duration,
    duration: Duration,
}

/// Says a message at the given pace; returns how many it said. Each text
/// starts with the sender, its count, and the microseconds since `origin`
/// at which it was said. Reads (and drops) what it is sent, as a person's
/// page does.
async fn talk(
    ws: Socket,
    i: usize,
    size: usize,
    pace: Pace,
    origin: Instant,
) -> anyhow::Result<u64> {
    let (mut sink, mut stream) = ws.split();
    let drain = tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
    let end = tokio::time::Instant::now() + pace.duration;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + pace.offset, pace.period);
    let text = "x".repeat(size);
    let mut said = 0;
    while tick.tick().await < end {
        let at = origin.elapsed().as_micros();
        let say = serde_json::json!({"type": "say", "text": format!("{i} {said} {at} {text}")});
        sink.send(Frame::text(say.to_string())).await?;
        said += 1;
    }
    let _ = sink.close().await;
    drain.abort();
    Ok(said)
}

/// Reads `message` frames until stopped; for each, when it arrived and
/// how long after it was said, when it says (seconds since `origin`,
/// milliseconds).
async fn count_messages(
    mut ws: Socket,
    origin: Instant,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<Vec<(f64, Option<f64>)>> {
    let mut latencies = Vec::new();
    loop {
        tokio::select! {
            frame = ws.next() => match frame {
                Some(Ok(Frame::Text(text))) if text.contains(r#""type":"message""#) => {
                    let now = origin.elapsed();
                    // Someone else in the room (a person, another run) says
                    // things with no send time: counted, not timed.
                    let latency = said_at(&text)
                        .map(|said| now.saturating_sub(said).as_secs_f64() * 1000.0);
                    latencies.push((now.as_secs_f64(), latency));
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => bail!("the reader's connection broke: {err}"),
                None => bail!("the reader's connection ended"),
            },
            () = stop.cancelled() => return Ok(latencies),
        }
    }
}

/// The send instant a sender put in a message frame's text.
fn said_at(frame: &str) -> Option<Duration> {
    let frame: serde_json::Value = serde_json::from_str(frame).ok()?;
    let micros = frame["text"].as_str()?.split(' ').nth(2)?.parse().ok()?;
    Some(Duration::from_micros(micros))
}

/// The reader's fan-out latency, summed up.
fn print_latency(latencies: &[(f64, f64)]) {
    let mut ms: Vec<f64> = latencies.iter().map(|&(_, ms)| ms).collect();
    if ms.is_empty() {
        return;
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    println!(
        "fan-out to the reader: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

/// Draws the reader's fan-out latency over time: the median and the
/// largest of each quarter second.
fn plot_latency(path: &std::path::Path, latencies: &[(f64, f64)]) -> anyhow::Result<()> {
    let mut windows: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
    for &(t, ms) in latencies {
        windows.entry((t * 4.0) as u64).or_default().push(ms);
    }
    let (mut p50, mut max) = (Vec::new(), Vec::new());
    for (window, mut ms) in windows {
        ms.sort_by(f64::total_cmp);
        let t = window as f64 / 4.0;
        p50.push((t, ms[ms.len() / 2]));
        max.push((t, ms[ms.len() - 1]));
    }
    let panel = crate::plot::Panel {
        title: "fan-out latency to a reader that keeps up".into(),
        unit: "ms".into(),
        lines: vec![("p50".into(), p50), ("max".into(), max)],
    };
    crate::plot::over_time(path, "lab sim chat", &[panel])
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
