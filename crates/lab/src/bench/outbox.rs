//! `lab bench outbox`: what the outbox costs, next to its floor.
//!
//! - `rabbitmq`: the raw broker round trip the relay builds on, publish and
//!   wait for the confirm, with N publishes in flight on one channel (N = 1
//!   is one confirm per round trip; a larger N is a confirm window).
//! - `notify=on` / `notify=off`: orders committed (order row + outbox row in
//!   one transaction) by N clients, with the relay woken by the trigger's
//!   NOTIFY or left to its poll. Besides commit latency it reports the
//!   end-to-end latency from commit to the consumer's notification row.
//!   NOTIFY takes a global lock at commit; this is where that shows.
//! - `relay drain`: a backlog of events written with the relay stopped, then
//!   the time one relay takes to publish them all: its throughput.
//!
//! Everything runs in this process against its own database
//! (`lab_bench_outbox`) and its own exchange and queue, so a running
//! `lab up` is not disturbed and does not disturb the numbers.

use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use lab_core::{
    config::{AmqpConfig, PostgresConfig},
    metrics::Metrics,
};
use lapin::{
    BasicProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions},
    types::FieldTable,
};
use outbox::{
    Switch,
    consumer::Consumer,
    orders::{Delivery, Item, NewOrder, Orders},
    relay::Relay,
};
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{Load, measure, micros, progress, ratio};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Events written before the relay starts, for the drain measurement.
    #[arg(long, env = "LAB_BENCH_BACKLOG", default_value_t = 20_000)]
    backlog: usize,
    #[command(flatten)]
    postgres: PostgresConfig,
    #[command(flatten)]
    amqp: AmqpConfig,
    #[command(flatten)]
    load: Load,
}

#[derive(Debug, Serialize)]
struct Cell {
    variant: String,
    concurrency: usize,
    ops_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    errors: u64,
    e2e_p50_us: Option<u64>,
    e2e_p99_us: Option<u64>,
}

#[derive(Debug, Serialize)]
struct Drain {
    events: usize,
    seconds: f64,
    events_per_sec: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    cells: Vec<Cell>,
    relay_drain: Drain,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let pool =
        crate::scratch::database(&args.postgres.database_url, "lab_bench_outbox", &stop).await?;
    let settings = outbox::Settings {
        exchange: "lab.bench.events".into(),
        queue: "lab.bench.notifications".into(),
        ..outbox::Settings::from_env()?
    };
    let amqp = args.amqp.amqp_url.clone();
    let result = bench(&args, &pool, &amqp, &settings, &stop).await;
    crate::chaos::clean_up(&amqp, &settings).await;
    let report = result?;

    if args.load.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{:<11} {:>5} {:>9} {:>10} {:>10} {:>11} {:>11} {:>7} {:>8}",
        "variant", "conc", "ops/s", "p50", "p99", "e2e p50", "e2e p99", "errors", "ops/s ×"
    );
    for cell in &report.cells {
        let base = report
            .cells
            .iter()
            .find(|b| b.variant == "rabbitmq" && b.concurrency == cell.concurrency);
        let e2e = |v: Option<u64>| v.map_or("-".into(), micros);
        println!(
            "{:<11} {:>5} {:>9.0} {:>10} {:>10} {:>11} {:>11} {:>7} {:>8}",
            cell.variant,
            cell.concurrency,
            cell.ops_per_sec,
            micros(cell.p50_us),
            micros(cell.p99_us),
            e2e(cell.e2e_p50_us),
            e2e(cell.e2e_p99_us),
            cell.errors,
            base.map_or("-".into(), |b| ratio(cell.ops_per_sec, b.ops_per_sec)),
        );
    }
    let d = &report.relay_drain;
    println!(
        "relay drain: {} events in {:.2} s = {:.0} events/s (batches of {}, confirms awaited per batch)",
        d.events, d.seconds, d.events_per_sec, settings.relay_batch_size
    );
    Ok(())
}

async fn bench(
    args: &Args,
    pool: &PgPool,
    amqp: &str,
    settings: &outbox::Settings,
    stop: &CancellationToken,
) -> anyhow::Result<Report> {
    let metrics = Metrics::new("outbox_bench");
    let relay_stop = start_pipeline(pool, amqp, settings, &metrics, stop).await?;
    let bar = progress(args.load.concurrency.len() as u64 * 3 + 1);
    let mut cells = Vec::new();
    for &concurrency in &args.load.concurrency {
        bar.set_message(format!("rabbitmq, {concurrency} in flight"));
        cells.push(raw_confirms(&args.load, amqp, concurrency).await?);
        bar.inc(1);
        for notify in [Switch::On, Switch::Off] {
            let variant = match notify {
                Switch::On => "notify=on",
                Switch::Off => "notify=off",
            };
            bar.set_message(format!("{variant}, {concurrency} clients"));
            let writes = outbox::orders::pool_for_writes(pool, notify);
            let orders = Orders::new(writes, amqp.to_owned(), settings.exchange.clone(), &metrics);
            cells.push(commits(&args.load, pool, orders, concurrency, variant).await?);
            bar.inc(1);
        }
    }

    bar.set_message(format!("relay drain of {} events", args.backlog));
    relay_stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let relay_drain = drain(args.backlog, pool, amqp, settings, &metrics, stop).await?;
    bar.finish_and_clear();
    Ok(Report { cells, relay_drain })
}

/// Starts the consumer and a relay, and waits for the consumer to connect.
/// Returns the token that stops that relay.
async fn start_pipeline(
    pool: &PgPool,
    amqp: &str,
    settings: &outbox::Settings,
    metrics: &Metrics,
    stop: &CancellationToken,
) -> anyhow::Result<CancellationToken> {
    let consumer = Consumer::new(pool.clone(), amqp.to_owned(), settings.clone(), metrics);
    let consumer_stats = consumer.stats();
    tokio::spawn(consumer.run(stop.clone()));
    let relay_stop = stop.child_token();
    tokio::spawn(
        Relay::new(pool.clone(), amqp.to_owned(), settings.clone(), metrics)
            .run(relay_stop.clone()),
    );
    for _ in 0..100 {
        if consumer_stats.connected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::ensure!(
        consumer_stats.connected(),
        "{}",
        lab_core::amqp::describe(amqp, "the consumer did not connect within 5 s")
    );
    Ok(relay_stop)
}

/// With no relay running, writes `backlog` orders through the outbox; then
/// starts one relay and times how long it takes to publish them all.
async fn drain(
    backlog: usize,
    pool: &PgPool,
    amqp: &str,
    settings: &outbox::Settings,
    metrics: &Metrics,
    stop: &CancellationToken,
) -> anyhow::Result<Drain> {
    let orders = Orders::new(
        pool.clone(),
        amqp.to_owned(),
        settings.exchange.clone(),
        metrics,
    );
    futures::future::try_join_all((0..16).map(|worker| {
        let orders = orders.clone();
        let share = backlog / 16 + usize::from(worker < backlog % 16);
        async move {
            for i in 0..share {
                orders.create(sample(i), Delivery::Outbox, None).await?;
            }
            anyhow::Ok(())
        }
    }))
    .await?;
    let started = tokio::time::Instant::now();
    tokio::spawn(
        Relay::new(pool.clone(), amqp.to_owned(), settings.clone(), metrics).run(stop.clone()),
    );
    wait_until_published(pool, Duration::from_secs(120)).await?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(Drain {
        events: backlog,
        seconds,
        events_per_sec: backlog as f64 / seconds,
    })
}

/// Publish to a queue of the bench's own and wait for the confirm, with
/// `concurrency` publishes in flight on one channel.
async fn raw_confirms(load: &Load, amqp: &str, concurrency: usize) -> anyhow::Result<Cell> {
    let connection = lab_core::amqp::connect(amqp, "lab-bench-raw")
        .await
        .map_err(anyhow::Error::msg)?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let queue = queue.name().to_string();
    let body = vec![b'x'; 400]; // about the size of an order event
    let row = measure(load, concurrency, "rabbitmq", "confirm", move |_, _| {
        let (channel, queue, body) = (channel.clone(), queue.clone(), body.clone());
        async move {
            let confirmation = channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?
                .await?;
            anyhow::ensure!(confirmation.is_ack(), "nacked");
            Ok(body.len())
        }
    })
    .await?;
    lab_core::amqp::close(&connection, "bench done").await;
    Ok(Cell {
        variant: "rabbitmq".into(),
        concurrency,
        ops_per_sec: row.requests_per_sec,
        p50_us: row.p50_us,
        p99_us: row.p99_us,
        errors: row.errors,
        e2e_p50_us: None,
        e2e_p99_us: None,
    })
}

/// Orders committed by `concurrency` clients; then, once the consumer has
/// caught up, the commit-to-notification latency of the measured ones.
async fn commits(
    load: &Load,
    pool: &PgPool,
    orders: Orders,
    concurrency: usize,
    variant: &str,
) -> anyhow::Result<Cell> {
    let cell_start = chrono::Utc::now();
    let from = cell_start + chrono::Duration::from_std(load.warmup)?;
    let row = measure(load, concurrency, variant, "commit", move |_, n| {
        let orders = orders.clone();
        async move {
            orders
                .create(sample(n as usize), Delivery::Outbox, None)
                .await?;
            Ok(0)
        }
    })
    .await?;
    wait_until_published(pool, Duration::from_secs(60)).await?;
    let expected: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE created_at >= $1")
        .bind(cell_start)
        .fetch_one(pool)
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let handled: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications")
            .fetch_one(pool)
            .await?;
        if handled >= expected {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the consumer handled {handled} of {expected} events within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let latencies: Vec<i64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM created_at - occurred_at) * 1e6)::int8 \
         FROM notifications WHERE occurred_at >= $1",
    )
    .bind(from)
    .fetch_all(pool)
    .await?;
    let mut e2e = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    for us in latencies {
        e2e.saturating_record(us.max(1) as u64);
    }
    // The next cell measures only its own events.
    sqlx::query("TRUNCATE notifications, processed_events")
        .execute(pool)
        .await?;
    let has = !e2e.is_empty();
    Ok(Cell {
        variant: variant.to_owned(),
        concurrency,
        ops_per_sec: row.requests_per_sec,
        p50_us: row.p50_us,
        p99_us: row.p99_us,
        errors: row.errors,
        e2e_p50_us: has.then(|| e2e.value_at_quantile(0.50)),
        e2e_p99_us: has.then(|| e2e.value_at_quantile(0.99)),
    })
}

async fn wait_until_published(pool: &PgPool, limit: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(pool)
                .await
                .context("counting pending events")?;
        if pending == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{pending} events still unpublished after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sample(i: usize) -> NewOrder {
    NewOrder {
        customer_id: format!("bench-{}", i % 100),
        items: vec![Item {
            sku: format!("SKU-{}", i % 13),
            quantity: 1,
            price_cents: 2500,
        }],
    }
}
