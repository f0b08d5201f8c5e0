//! `lab bench chat`: what a room of WebSocket members costs, on one
//! instance and on two sharing rooms through Redis, in one run.
//!
//! Each variant starts its chat instances as child processes (`lab up
//! --only chat`), so their memory can be read on its own, with a key prefix
//! of the bench's own. Then it opens `--clients` real WebSocket connections
//! spread over `--rooms` rooms (and over the instances), lets `--senders` of
//! them say `--rate` messages a second each, and every member records, for
//! each message, the time from the sender's `send` to its own receipt.
//!
//! Next to them, the floor: the same message rate through bare Redis
//! pub/sub, one publisher and one subscriber, measured in the same run.
//! Every chat message crosses Redis pub/sub once on its way to each
//! instance, so no fan-out can beat that.

use std::{
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt, stream};
use hdrhistogram::Histogram;
use lab_core::config::RedisConfig;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as Frame;

use super::{micros, ratio};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// WebSocket connections, spread evenly over the rooms and instances.
    #[arg(long, env = "LAB_BENCH_CLIENTS", default_value_t = 1000)]
    clients: usize,
    /// Rooms the clients are spread over.
    #[arg(long, default_value_t = 10)]
    rooms: usize,
    /// How many of the clients talk; the rest only listen.
    #[arg(long, env = "LAB_BENCH_SENDERS", default_value_t = 20)]
    senders: usize,
    /// Messages a second from each sender (the chat allows 10, bursts of 20).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Measured time per variant (e.g. 20s).
    #[arg(long, env = "LAB_BENCH_DURATION", value_parser = humantime::parse_duration, default_value = "20s")]
    duration: Duration,
    /// Unmeasured time before each measurement, once every client is in.
    #[arg(long, env = "LAB_BENCH_WARMUP", value_parser = humantime::parse_duration, default_value = "2s")]
    warmup: Duration,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    redis: RedisConfig,
}

#[derive(Debug, Serialize)]
struct Variant {
    variant: String,
    instances: usize,
    clients: usize,
    /// Connections opened (upgrade + welcome) per second, 64 at a time.
    setup_per_sec: f64,
    messages_sent: u64,
    /// Frames carrying a measured message, received by all members together.
    delivered: u64,
    delivered_per_sec: f64,
    /// Deliveries expected (every member of the sender's room) but not seen.
    lost: u64,
    /// Frames refused by the chat (rate limits, errors); 0 in a healthy run.
    errors: u64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    /// Growth of the instances' resident memory, per open connection.
    rss_bytes_per_connection: f64,
}

#[derive(Debug, Serialize)]
struct Floor {
    messages: u64,
    delivered_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    clients: usize,
    rooms: usize,
    senders: usize,
    rate_per_sender: f64,
    duration_secs: f64,
    redis_pubsub_floor: Floor,
    variants: Vec<Variant>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.rooms > 0 && args.clients >= args.rooms,
        "need at least one client per room"
    );
    anyhow::ensure!(
        args.senders <= args.clients,
        "--senders must not exceed --clients"
    );
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    // Each connection is a file descriptor here and in an instance; the
    // common soft limit of 1024 stops a thousand clients.
    if let Err(err) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(%err, "cannot raise the open-file limit");
    }
    let bar = super::phase_bar();

    let floor = redis_floor(&args, &bar).await?;
    let mut variants = Vec::new();
    for instances in [1, 2] {
        variants.push(measure(&args, instances, &bar).await?);
    }
    bar.finish_and_clear();
    let report = Report {
        clients: args.clients,
        rooms: args.rooms,
        senders: args.senders,
        rate_per_sender: args.rate,
        duration_secs: args.duration.as_secs_f64(),
        redis_pubsub_floor: floor,
        variants,
    };
    super::emit(args.json, &report, print)
}

fn print(report: &Report) {
    println!(
        "{} clients in {} rooms, {} senders × {} msg/s, {:.0} s measured per variant",
        report.clients, report.rooms, report.senders, report.rate_per_sender, report.duration_secs
    );
    println!(
        "{:<16} {:>9} {:>12} {:>10} {:>10} {:>10} {:>6} {:>6} {:>10} {:>11}",
        "variant",
        "setup/s",
        "delivered/s",
        "p50",
        "p99",
        "p999",
        "lost",
        "errors",
        "RSS/conn",
        "deliv/s ×"
    );
    let f = &report.redis_pubsub_floor;
    println!(
        "{:<16} {:>9} {:>12.0} {:>10} {:>10} {:>10} {:>6} {:>6} {:>10} {:>11}",
        "redis pub/sub",
        "-",
        f.delivered_per_sec,
        micros(f.p50_us),
        micros(f.p99_us),
        micros(f.p999_us),
        "-",
        "-",
        "-",
        "-"
    );
    let base = report.variants.first();
    for v in &report.variants {
        println!(
            "{:<16} {:>9.0} {:>12.0} {:>10} {:>10} {:>10} {:>6} {:>6} {:>8.1} KiB {:>11}",
            v.variant,
            v.setup_per_sec,
            v.delivered_per_sec,
            micros(v.p50_us),
            micros(v.p99_us),
            micros(v.p999_us),
            v.lost,
            v.errors,
            v.rss_bytes_per_connection / 1024.0,
            base.map_or("-".into(), |b| ratio(
                v.delivered_per_sec,
                b.delivered_per_sec
            )),
        );
    }
    if let (Some(one), Some(two)) = (report.variants.first(), report.variants.get(1)) {
        println!(
            "fan-out p50 is {} × the Redis pub/sub floor on one instance, {} × on two",
            ratio(one.p50_us as f64, f.p50_us as f64),
            ratio(two.p50_us as f64, f.p50_us as f64),
        );
    }
}

/// One chat instance as a child process, stopped with SIGTERM when dropped.
struct Instance {
    child: Child,
    port: u16,
}

impl Instance {
    async fn start(redis_url: &str, prefix: &str, name: &str) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(std::env::current_exe()?)
            .args(["up", "--only", "chat"])
            .env("CHAT_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("CHAT_KEY_PREFIX", prefix)
            .env("CHAT_INSTANCE", name)
            .env("REDIS_URL", redis_url)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("start a chat instance (lab up --only chat)")?;
        let instance = Self { child, port };
        // Ready: Redis answers and the instance is on the pub/sub bus.
        super::wait_ready(&format!("http://127.0.0.1:{port}"))
            .await
            .with_context(|| format!("Redis at {}", lab_core::redis::where_is(redis_url)))?;
        Ok(instance)
    }

    /// Resident memory, from /proc (Linux only).
    fn rss_bytes(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .context("read /proc/<pid>/status (the memory column needs Linux)")?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in /proc/<pid>/status")?;
        Ok(kib * 1024)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Deserialize)]
struct Incoming {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

/// What the members of one run saw, shared by their reader tasks.
struct Tally {
    epoch: Instant,
    /// Messages sent at or after this many µs since `epoch` are measured.
    from_us: AtomicU64,
    /// … and before this.
    until_us: AtomicU64,
    latency_us: Mutex<Histogram<u64>>,
    delivered: AtomicU64,
    errors: AtomicU64,
}

impl Tally {
    fn new() -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            epoch: Instant::now(),
            from_us: AtomicU64::new(u64::MAX),
            until_us: AtomicU64::new(u64::MAX),
            latency_us: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
            delivered: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }))
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn measured(&self, sent_us: u64) -> bool {
        sent_us >= self.from_us.load(Ordering::Relaxed)
            && sent_us < self.until_us.load(Ordering::Relaxed)
    }

    /// Records one received frame.
    fn receive(&self, frame: &str) {
        let Ok(incoming) = serde_json::from_str::<Incoming>(frame) else {
            return;
        };
        match incoming.kind.as_str() {
            "message" => {
                // text = "<sender> <seq> <sent µs>"
                let sent_us = incoming
                    .text
                    .as_deref()
                    .and_then(|t| t.rsplit(' ').next())
                    .and_then(|us| us.parse::<u64>().ok());
                if let Some(sent_us) = sent_us
                    && self.measured(sent_us)
                {
                    let latency = self.now_us().saturating_sub(sent_us).max(1);
                    self.latency_us
                        .lock()
                        .expect("histogram lock")
                        .saturating_record(latency);
                    self.delivered.fetch_add(1, Ordering::Relaxed);
                }
            }
            "error" => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

async fn measure(
    args: &Args,
    instances: usize,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Variant> {
    let variant = match instances {
        1 => "1 instance".to_owned(),
        n => format!("{n} instances"),
    };
    let prefix = format!("lab:bench:chat:{}:{instances}:", std::process::id());
    let redis_url = &args.redis.redis_url;
    let mut servers = Vec::new();
    for i in 0..instances {
        servers.push(Instance::start(redis_url, &prefix, &format!("bench-{}", i + 1)).await?);
    }
    let result = run_variant(args, &variant, &servers, bar).await;
    drop(servers);
    let mut redis = lab_core::redis::connect(redis_url)?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query_async(&mut redis).await;
    }
    result
}

async fn run_variant(
    args: &Args,
    variant: &str,
    servers: &[Instance],
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Variant> {
    let rss_before = total_rss(servers)?;
    let tally = Tally::new()?;
    let (sockets, setup_secs) = connect_all(args, variant, servers, bar).await?;
    // Let the instances settle (joins announced, buffers allocated) first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = total_rss(servers)?;

    let stop = tokio_util::sync::CancellationToken::new();
    let (mut tasks, sent) = start_traffic(args, sockets, &tally, &stop);
    let measured_secs = measure_window(args, variant, &tally, bar).await;
    // Messages still in flight get a moment to arrive.
    bar.set_message(format!("{variant}: draining"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    while tasks.join_next().await.is_some() {}

    let per_room =
        |room: usize| (0..args.clients).filter(|i| i % args.rooms == room).count() as u64;
    let messages_sent: u64 = sent.iter().map(|(_, c)| c.load(Ordering::Relaxed)).sum();
    let expected: u64 = sent
        .iter()
        .map(|(room, c)| c.load(Ordering::Relaxed) * per_room(*room))
        .sum();
    let delivered = tally.delivered.load(Ordering::Relaxed);
    let latency = tally.latency_us.lock().expect("histogram lock");
    Ok(Variant {
        variant: variant.to_owned(),
        instances: servers.len(),
        clients: args.clients,
        setup_per_sec: args.clients as f64 / setup_secs,
        messages_sent,
        delivered,
        delivered_per_sec: delivered as f64 / measured_secs,
        lost: expected.saturating_sub(delivered),
        errors: tally.errors.load(Ordering::Relaxed),
        p50_us: latency.value_at_quantile(0.50),
        p99_us: latency.value_at_quantile(0.99),
        p999_us: latency.value_at_quantile(0.999),
        rss_bytes_per_connection: rss_after.saturating_sub(rss_before) as f64 / args.clients as f64,
    })
}

/// The instances' resident memory, together.
fn total_rss(servers: &[Instance]) -> anyhow::Result<u64> {
    servers.iter().map(Instance::rss_bytes).sum()
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects everyone, 64 at a time, each counted once its welcome is in;
/// returns the sockets in client order and the seconds it took.
async fn connect_all(
    args: &Args,
    variant: &str,
    servers: &[Instance],
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<(Vec<(usize, Socket)>, f64)> {
    bar.set_message(format!("{variant}: connecting"));
    bar.set_length(args.clients as u64);
    bar.set_position(0);
    let started = Instant::now();
    let mut sockets = stream::iter(0..args.clients)
        .map(|i| {
            let port = servers[i % servers.len()].port;
            let room = i % args.rooms;
            async move {
                let url = format!("ws://127.0.0.1:{port}/ws?room=bench-{room}&name=c{i}");
                anyhow::Ok((i, join_room(&url).await?))
            }
        })
        .buffer_unordered(64)
        .inspect(|_| bar.inc(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    let setup_secs = started.elapsed().as_secs_f64();
    sockets.sort_by_key(|(i, _)| *i);
    Ok((sockets, setup_secs))
}

/// Opens one connection and waits for its welcome.
async fn join_room(url: &str) -> anyhow::Result<Socket> {
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .with_context(|| format!("connect {url} (too many open files? raise `ulimit -n`)"))?;
    loop {
        match ws.next().await {
            Some(Ok(Frame::Text(text))) if text.contains(r#""type":"welcome""#) => {
                return Ok(ws);
            }
            Some(Ok(_)) => continue,
            other => bail!("{url}: no welcome: {other:?}"),
        }
    }
}

/// Messages a sender sent in the measured window, with its room.
type Sent = Vec<(usize, Arc<AtomicU64>)>;

/// Every client reads; the first `--senders` also write. Senders are spread
/// over rooms and instances: client i is in room i % rooms.
fn start_traffic(
    args: &Args,
    sockets: Vec<(usize, Socket)>,
    tally: &Arc<Tally>,
    stop: &tokio_util::sync::CancellationToken,
) -> (tokio::task::JoinSet<()>, Sent) {
    let mut tasks = tokio::task::JoinSet::new();
    let mut sent = Vec::new();
    for (i, ws) in sockets {
        let (sink, stream) = ws.split();
        tasks.spawn(read_frames(stream, tally.clone(), stop.clone()));
        if i < args.senders {
            let count = Arc::new(AtomicU64::new(0));
            sent.push((i % args.rooms, count.clone()));
            // Senders are spread over the period, as people are: started
            // together they would say everything in lockstep bursts.
            let period = Duration::from_secs_f64(1.0 / args.rate);
            let offset = period.mul_f64(i as f64 / args.senders as f64);
            let sender = Sender {
                client: i,
                offset,
                period,
                count,
            };
            tasks.spawn(sender.run(sink, tally.clone(), stop.clone()));
        }
    }
    (tasks, sent)
}

/// A member's reader: records every frame until stopped.
async fn read_frames(
    mut stream: futures::stream::SplitStream<Socket>,
    tally: Arc<Tally>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            frame = stream.next() => match frame {
                Some(Ok(Frame::Text(text))) => tally.receive(&text),
                Some(Ok(_)) => {}
                _ => break,
            },
            () = stop.cancelled() => break,
        }
    }
}

/// One talking client: says a numbered, timestamped message every period.
struct Sender {
    client: usize,
    offset: Duration,
    period: Duration,
    /// Messages sent in the measured window.
    count: Arc<AtomicU64>,
}

impl Sender {
    async fn run(
        self,
        mut sink: futures::stream::SplitSink<Socket, Frame>,
        tally: Arc<Tally>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let i = self.client;
        let mut tick = tokio::time::interval_at(Instant::now() + self.offset, self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for seq in 0u64.. {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => break,
            }
            let sent_us = tally.now_us();
            let say = format!(r#"{{"type":"say","text":"c{i} {seq} {sent_us}"}}"#);
            if sink.send(Frame::text(say)).await.is_err() {
                break;
            }
            if tally.measured(sent_us) {
                self.count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Warms up, then opens the measured window for `--duration`; returns the
/// seconds it was open.
async fn measure_window(
    args: &Args,
    variant: &str,
    tally: &Tally,
    bar: &indicatif::ProgressBar,
) -> f64 {
    bar.set_message(format!("{variant}: warming up"));
    tokio::time::sleep(args.warmup).await;
    tally.from_us.store(tally.now_us(), Ordering::Relaxed);
    bar.set_message(format!("{variant}: measuring"));
    let seconds = args.duration.as_secs().max(1);
    bar.set_length(seconds);
    bar.set_position(0);
    let measuring = Instant::now();
    for second in 1..=seconds {
        let due = measuring + args.duration.mul_f64(second as f64 / seconds as f64);
        tokio::time::sleep_until(due).await;
        bar.inc(1);
    }
    tally.until_us.store(tally.now_us(), Ordering::Relaxed);
    measuring.elapsed().as_secs_f64()
}

/// Bare Redis pub/sub at the senders' total rate: one publisher, one
/// subscriber, the time from PUBLISH to receipt.
async fn redis_floor(args: &Args, bar: &indicatif::ProgressBar) -> anyhow::Result<Floor> {
    bar.set_message("redis pub/sub floor");
    let url = &args.redis.redis_url;
    let channel = format!("lab:bench:chat:{}:floor", std::process::id());
    let client = lab_core::redis::client(url)?;
    let mut subscriber = client.get_async_pubsub().await.map_err(|err| {
        anyhow::anyhow!(lab_core::redis::describe(
            &lab_core::redis::where_is(url),
            &err
        ))
    })?;
    subscriber.subscribe(&channel).await?;
    let mut publisher = lab_core::redis::connect(url)?;
    let tally = Tally::new()?;
    let reader = {
        let tally = tally.clone();
        tokio::spawn(async move {
            let mut messages = subscriber.into_on_message();
            while let Some(msg) = messages.next().await {
                let text: String = msg.get_payload().unwrap_or_default();
                if text == "stop" {
                    break;
                }
                tally.receive(&text);
            }
        })
    };
    let published = publish_floor(args, &mut publisher, &channel, &tally, bar).await?;
    redis::cmd("PUBLISH")
        .arg(&channel)
        .arg("stop")
        .query_async::<i64>(&mut publisher)
        .await?;
    tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .context("the floor's subscriber did not finish")??;
    let latency = tally.latency_us.lock().expect("histogram lock");
    Ok(Floor {
        messages: published,
        delivered_per_sec: tally.delivered.load(Ordering::Relaxed) as f64
            / args.duration.as_secs_f64(),
        p50_us: latency.value_at_quantile(0.50),
        p99_us: latency.value_at_quantile(0.99),
        p999_us: latency.value_at_quantile(0.999),
    })
}

/// Publishes timestamped messages at the senders' total rate, through the
/// warm-up and the measured window; returns how many were measured.
async fn publish_floor(
    args: &Args,
    publisher: &mut lab_core::redis::Redis,
    channel: &str,
    tally: &Tally,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<u64> {
    let seconds = args.duration.as_secs().max(1);
    bar.set_length(seconds);
    bar.set_position(0);
    let rate = args.rate * args.senders.max(1) as f64;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let warm_until = started + args.warmup;
    let end = warm_until + args.duration;
    let mut published = 0u64;
    for seq in 0u64.. {
        if Instant::now() >= end {
            break;
        }
        tick.tick().await;
        if tally.from_us.load(Ordering::Relaxed) == u64::MAX && Instant::now() >= warm_until {
            tally.from_us.store(tally.now_us(), Ordering::Relaxed);
        }
        let sent_us = tally.now_us();
        let payload = format!(r#"{{"type":"message","text":"floor {seq} {sent_us}"}}"#);
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async::<i64>(publisher)
            .await?;
        if tally.measured(sent_us) {
            published += 1;
        }
        let done = (Instant::now()
            .saturating_duration_since(warm_until)
            .as_secs_f64()
            / args.duration.as_secs_f64()
            * seconds as f64) as u64;
        bar.set_position(done.min(seconds));
    }
    tally.until_us.store(tally.now_us(), Ordering::Relaxed);
    Ok(published)
}
