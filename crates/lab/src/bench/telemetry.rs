//! `lab bench telemetry`: what the ingest keeps up with, at QoS 0 and QoS 1,
//! next to a bare subscriber counting the same stream.
//!
//! For each QoS, in this process: an ingest with its own database
//! (`lab_bench_telemetry`) and topic prefix, a bare MQTT subscriber on the
//! same topics (the broker's own ceiling: what arrives with no database
//! behind it), and `--devices` simulated devices each publishing `--rate`
//! readings a second. Each device sends a warm-up, then exactly
//! `rate × duration` measured readings (by seq), then stops; so the
//! measured readings are known, and what did not arrive is loss.
//! Ingest latency is from the device's timestamp to the row's `stored_at`
//! (written just before commit); the subscriber's is to its receipt.
//!
//! The broker is the lab's own (`--broker lab`, the default): a Mosquitto
//! this bench starts for each QoS from `deploy/mosquitto/` on a free port,
//! with the lab's logins, ACL and queue of 100,000 per client, so the lab's
//! settings are what is measured. `--broker shared` uses `MQTT_URL` (the
//! machine's broker, with its defaults) under a topic prefix of its own.
//! A reading that did not arrive was either dropped by the broker, which
//! counts it in `$SYS/broker/publish/messages/dropped` (a queue full, for
//! one of its clients), or lost on the way without the broker knowing: the
//! report keeps the two apart.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use hdrhistogram::Histogram;
use lab_core::config::{MqttConfig, PostgresConfig};
use rumqttc::QoS;
use serde::Serialize;
use sqlx::PgPool;
use telemetry::{
    Broker, Topics,
    device::{Counters, Device, Spec},
    payload::Reading,
};
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{brokers::Brokers, micros, ratio};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Simulated devices, each its own MQTT connection.
    #[arg(long, env = "LAB_BENCH_DEVICES", default_value_t = 1000)]
    devices: usize,
    /// Readings per second, per device.
    #[arg(long, default_value_t = 5.0)]
    rate: f64,
    /// Measured time per QoS (e.g. 30s).
    #[arg(long, env = "LAB_BENCH_DURATION", value_parser = humantime::parse_duration, default_value = "30s")]
    duration: Duration,
    /// How long each device reports, unmeasured, before its measured readings.
    #[arg(long, env = "LAB_BENCH_WARMUP", value_parser = humantime::parse_duration, default_value = "3s")]
    warmup: Duration,
    /// `lab`: a Mosquitto of its own with the lab's config; `shared`:
    /// the one at `MQTT_URL`.
    #[arg(long, value_enum, default_value_t = BrokerKind::Lab)]
    broker: BrokerKind,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    postgres: PostgresConfig,
    #[command(flatten)]
    mqtt: MqttConfig,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum BrokerKind {
    Lab,
    Shared,
}

#[derive(Debug, Serialize)]
struct Side {
    /// Measured readings that arrived (stored, for the ingest).
    arrived: u64,
    per_sec: f64,
    /// Measured readings that did not arrive.
    missing: u64,
    p50_us: u64,
    p99_us: u64,
}

#[derive(Debug, Serialize)]
struct Variant {
    qos: u8,
    /// Measured readings the devices published.
    published: u64,
    subscriber: Side,
    ingest: Side,
    /// Readings the ingest dropped as already stored (QoS 1 redeliveries).
    duplicates: i64,
    /// Messages the broker dropped meanwhile, for any of its clients
    /// (`$SYS/broker/publish/messages/dropped`); `None` if it never said.
    broker_dropped: Option<u64>,
}

#[derive(Debug, Serialize)]
struct Report {
    broker: BrokerKind,
    devices: usize,
    rate_per_device: f64,
    offered_per_sec: f64,
    duration_secs: f64,
    variants: Vec<Variant>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.devices > 0 && args.rate > 0.0,
        "need devices and a positive rate"
    );
    if let Err(err) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(%err, "cannot raise the open-file limit");
    }
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    if args.broker == BrokerKind::Shared {
        let broker = Broker::parse(&args.mqtt.mqtt_url)?;
        tokio::net::TcpStream::connect((broker.host.as_str(), broker.port))
            .await
            .map_err(|err| anyhow::anyhow!(broker.describe(&err)))?;
    }
    let scratch =
        crate::scratch::database(&args.postgres.database_url, "lab_bench_telemetry", &stop).await?;
    let pool = scratch.pool.clone();

    let bar = super::phase_bar();
    let mut variants = Vec::new();
    for qos in [0u8, 1] {
        // A broker per QoS: each starts with no session and no backlog.
        let brokers = match args.broker {
            BrokerKind::Lab => Brokers::own(&format!("telemetry-qos{qos}")).await?,
            BrokerKind::Shared => Brokers::shared(
                &args.mqtt.mqtt_url,
                format!("lab/bench/{}/qos{qos}/", std::process::id()),
            )?,
        };
        variants.push(measure(&args, qos, &pool, &brokers, &bar).await?);
    }
    bar.finish_and_clear();
    let report = Report {
        broker: args.broker,
        devices: args.devices,
        rate_per_device: args.rate,
        offered_per_sec: args.devices as f64 * args.rate,
        duration_secs: args.duration.as_secs_f64(),
        variants,
    };
    super::emit(args.json, &report, print)
}

fn print(report: &Report) {
    let broker = match report.broker {
        BrokerKind::Lab => "the bench's own Mosquitto, the lab's config",
        BrokerKind::Shared => "the shared broker at MQTT_URL",
    };
    println!(
        "{} devices × {} readings/s = {:.0} offered/s, {:.0} s measured per QoS, on {broker}",
        report.devices, report.rate_per_device, report.offered_per_sec, report.duration_secs
    );
    println!(
        "{:<4} {:<11} {:>9} {:>9} {:>8} {:>8} {:>10} {:>10} {:>6} {:>8} {:>7}",
        "qos",
        "receiver",
        "published",
        "arrived",
        "msgs/s",
        "missing",
        "p50",
        "p99",
        "dups",
        "msgs/s ×",
        "dropped"
    );
    for v in &report.variants {
        let dropped = v.broker_dropped.map_or("?".to_owned(), |d| d.to_string());
        for (name, side, dups) in [
            ("subscriber", &v.subscriber, "-".to_owned()),
            ("ingest", &v.ingest, v.duplicates.to_string()),
        ] {
            println!(
                "{:<4} {:<11} {:>9} {:>9} {:>8.0} {:>8} {:>10} {:>10} {:>6} {:>8} {:>7}",
                v.qos,
                name,
                v.published,
                side.arrived,
                side.per_sec,
                side.missing,
                micros(side.p50_us),
                micros(side.p99_us),
                dups,
                ratio(side.per_sec, v.subscriber.per_sec),
                dropped,
            );
        }
    }
    println!(
        "missing: measured readings that never arrived at that receiver; dropped: messages the \
         broker counted as dropped meanwhile ($SYS/broker/publish/messages/dropped, all its \
         clients: a full queue); ? when it did not say"
    );
}

/// Which seqs each device sends: a warm-up, then the measured readings.
#[derive(Debug, Clone, Copy)]
struct Seqs {
    warmup: i64,
    measured: i64,
}

impl Seqs {
    fn new(args: &Args) -> Self {
        Self {
            warmup: (args.rate * args.warmup.as_secs_f64()).ceil() as i64,
            measured: (args.rate * args.duration.as_secs_f64()).ceil().max(1.0) as i64,
        }
    }

    fn first_measured(&self) -> i64 {
        self.warmup + 1
    }

    fn last_measured(&self) -> i64 {
        self.warmup + self.measured
    }
}

async fn measure(
    args: &Args,
    qos: u8,
    pool: &PgPool,
    brokers: &Brokers,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Variant> {
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    sqlx::query("TRUNCATE readings, devices, rejects, alerts")
        .execute(pool)
        .await?;
    let topics = Topics::new(&brokers.prefix);
    let seqs = Seqs::new(args);
    let (ingest, ingest_url) = start_ingest(qos, pool, brokers, &stop).await?;

    // The bare subscriber: what the broker delivers with nothing behind it.
    let subscriber = Subscriber::start(
        &brokers.readers,
        &topics,
        qos,
        seqs.first_measured(),
        seqs.last_measured(),
    )
    .await?;
    bar.set_message(format!("QoS {qos}: reading the broker's $SYS"));
    let dropped_before = brokers.dropped().await;
    run_fleet(args, qos, &brokers.devices, &topics, seqs, &stop, bar).await;

    bar.set_message(format!("QoS {qos}: draining"));
    let expected = args.devices as i64 * seqs.measured;
    drain(pool, seqs, expected).await?;

    let published = expected as u64;
    let sub = subscriber.finish(published, args.duration);
    let ingest_side = stored(pool, seqs, published, args.duration).await?;
    let duplicates = super::metric(&ingest_url, "telemetry_duplicates_total")
        .await
        .unwrap_or(0.0) as i64;
    let dropped_after = brokers.dropped().await;
    stop.cancel();
    ingest.await??;
    Ok(Variant {
        qos,
        published,
        subscriber: sub,
        ingest: ingest_side,
        duplicates,
        broker_dropped: dropped_after
            .zip(dropped_before)
            .map(|(after, before)| after.saturating_sub(before)),
    })
}

/// The ingest, in this process, on a port of its own; returns its task
/// and its base URL once it is ready.
async fn start_ingest(
    qos: u8,
    pool: &PgPool,
    brokers: &Brokers,
    stop: &CancellationToken,
) -> anyhow::Result<(JoinHandle<anyhow::Result<()>>, String)> {
    let settings = telemetry::Settings {
        http_addr: "127.0.0.1:0".into(),
        client_id: format!("lab-bench-ingest-{}-{qos}", std::process::id()),
        topic_prefix: brokers.prefix.clone(),
        qos,
        // A session that outlives nothing: each run starts clean.
        session_expiry_secs: 60,
        ..telemetry::Settings::from_env()?
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let ingest_url = format!("http://{}", listener.local_addr()?);
    let ingest = tokio::spawn({
        let (pool, url, stop) = (pool.clone(), brokers.ingest_url.clone(), stop.clone());
        async move { telemetry::serve(listener, pool, &url, settings, stop).await }
    });
    super::wait_ready(&ingest_url).await?;
    Ok((ingest, ingest_url))
}

/// Starts `--devices` devices, a few at a time, and waits until each has
/// sent all its readings.
async fn run_fleet(
    args: &Args,
    qos: u8,
    broker: &Broker,
    topics: &Topics,
    seqs: Seqs,
    stop: &CancellationToken,
    bar: &indicatif::ProgressBar,
) {
    bar.set_message(format!("QoS {qos}: connecting devices"));
    bar.set_length(args.devices as u64);
    bar.set_position(0);
    let counters = Arc::new(Counters::default());
    let mut fleet = Vec::new();
    for n in 0..args.devices {
        let spec = Spec {
            id: format!("bench-{n:05}"),
            qos: if qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            },
            interval: Duration::from_secs_f64(1.0 / args.rate),
            readings: Some((seqs.warmup + seqs.measured) as u64),
            temperature_c: 20.0,
            first_seq: 1,
        };
        fleet.push(Device::start(broker, topics, spec, counters.clone(), stop));
        if n % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bar.set_position(counters.connected.load(Ordering::Relaxed));
    }
    bar.set_message(format!("QoS {qos}: publishing"));
    let total = (args.devices as i64 * (seqs.warmup + seqs.measured)) as u64;
    bar.set_length(total);
    let finished = futures::future::join_all(fleet.into_iter().map(Device::finished));
    tokio::pin!(finished);
    loop {
        tokio::select! {
            _ = &mut finished => break,
            () = tokio::time::sleep(Duration::from_millis(250)) => {
                bar.set_position(counters.published.load(Ordering::Relaxed));
            }
        }
    }
}

/// Lets what is in flight land: waits until `expected` readings are stored,
/// or the stored count stops growing for 3 s, or a minute has passed.
async fn drain(pool: &PgPool, seqs: Seqs, expected: i64) -> anyhow::Result<()> {
    let mut last = -1;
    let mut quiet_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stored = stored_in_window(pool, seqs.first_measured(), seqs.last_measured()).await?;
        if stored >= expected || Instant::now() > deadline {
            return Ok(());
        }
        if stored != last {
            last = stored;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() > Duration::from_secs(3) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The ingest's side, from the rows it stored: how many of the measured
/// readings, how fast, and their latency from device timestamp to
/// `stored_at`.
async fn stored(
    pool: &PgPool,
    seqs: Seqs,
    published: u64,
    duration: Duration,
) -> anyhow::Result<Side> {
    let (arrived, p50, p99, first, last_stored): (i64, Option<f64>, Option<f64>, Option<f64>, Option<f64>) =
        sqlx::query_as(
            "SELECT count(*), \
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM stored_at - ts)), \
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM stored_at - ts)), \
                    extract(epoch FROM min(stored_at))::float8, extract(epoch FROM max(stored_at))::float8 \
             FROM readings WHERE seq BETWEEN $1 AND $2",
        )
        .bind(seqs.first_measured())
        .bind(seqs.last_measured())
        .fetch_one(pool)
        .await
        .context("reading the ingest's results")?;
    let span = match (first, last_stored) {
        (Some(a), Some(b)) if b > a => b - a,
        _ => duration.as_secs_f64(),
    };
    let us = |s: Option<f64>| s.map_or(0, |s| (s.max(0.0) * 1e6) as u64);
    Ok(Side {
        arrived: arrived as u64,
        per_sec: arrived as f64 / span.max(duration.as_secs_f64() * 0.5),
        missing: published.saturating_sub(arrived as u64),
        p50_us: us(p50),
        p99_us: us(p99),
    })
}

async fn stored_in_window(pool: &PgPool, first: i64, last: i64) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM readings WHERE seq BETWEEN $1 AND $2")
            .bind(first)
            .bind(last)
            .fetch_one(pool)
            .await?,
    )
}

/// A plain MQTT subscriber counting the measured readings it receives.
struct Subscriber {
    arrived: Arc<AtomicU64>,
    latency_us: Arc<Mutex<Histogram<u64>>>,
    first_last: Arc<Mutex<Option<(Instant, Instant)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    async fn start(
        broker: &Broker,
        topics: &Topics,
        qos: u8,
        first: i64,
        last: i64,
    ) -> anyhow::Result<Self> {
        let mut options = broker.v4_options(&format!("lab-bench-sub-{}-{qos}", std::process::id()));
        options.set_clean_session(true);
        // Mosquitto lets a client have 20 unacknowledged QoS 1 messages in
        // flight by default; this subscriber acks as fast as it reads.
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 100);
        let qos = if qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        client
            .subscribe(topics.every(telemetry::mqtt::Kind::Telemetry), qos)
            .await?;
        let arrived = Arc::new(AtomicU64::new(0));
        let latency_us = Arc::new(Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3)?));
        let first_last = Arc::new(Mutex::new(None));
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let task = tokio::spawn({
            let (arrived, latency_us, first_last) =
                (arrived.clone(), latency_us.clone(), first_last.clone());
            async move {
                let mut ready_tx = Some(ready_tx);
                loop {
                    match eventloop.poll().await {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                            if let Some(tx) = ready_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                            let Ok(reading) = serde_json::from_slice::<Reading>(&p.payload) else {
                                continue;
                            };
                            if reading.seq < first || reading.seq > last {
                                continue;
                            }
                            let now = Instant::now();
                            let age = chrono::Utc::now() - reading.ts;
                            let us = age.num_microseconds().unwrap_or(0).max(1) as u64;
                            latency_us.lock().expect("histogram").saturating_record(us);
                            arrived.fetch_add(1, Ordering::Relaxed);
                            let mut span = first_last.lock().expect("span");
                            *span = Some(span.map_or((now, now), |(a, _)| (a, now)));
                        }
                        Ok(_) => {}
                        Err(err) => {
                            tracing::warn!(%err, "bench subscriber");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .context("the bench subscriber was not subscribed within 10 s")??;
        Ok(Self {
            arrived,
            latency_us,
            first_last,
            task,
        })
    }

    fn finish(self, published: u64, duration: Duration) -> Side {
        self.task.abort();
        let arrived = self.arrived.load(Ordering::Relaxed);
        let latency = self.latency_us.lock().expect("histogram");
        let span = self
            .first_last
            .lock()
            .expect("span")
            .map_or(duration.as_secs_f64(), |(a, b)| (b - a).as_secs_f64());
        Side {
            arrived,
            per_sec: arrived as f64 / span.max(duration.as_secs_f64() * 0.5),
            missing: published.saturating_sub(arrived),
            p50_us: latency.value_at_quantile(0.5),
            p99_us: latency.value_at_quantile(0.99),
        }
    }
}
