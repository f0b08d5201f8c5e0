//! `lab bench outbox`: where an event's time goes, next to its floors.
//!
//! Floors, the bare operations the path is made of, measured in the same
//! run with N in flight:
//!
//! - `rabbitmq`: publish a message to a transient (exclusive) classic
//!   queue and wait for its confirm (N in flight on one channel: a confirm
//!   window): the broker's round trip, confirmed from memory, no disk.
//! - `quorum`: the same to a quorum queue, the kind the consumer's queue
//!   is: its confirm waits for the broker's disk.
//! - `pg commit`: a one-row insert committed by N clients: one durable
//!   Postgres commit, which the API and the consumer each pay.
//!
//! The path: orders committed by N clients with the relay and the consumer
//! running in this process, one row per way of waking the relay:
//! `notify=on` (the API sends a NOTIFY after its commits), `notify=trigger`
//! (the outbox trigger sends one inside each transaction), `poll=10ms` and
//! `notify=off` (no NOTIFY; the relay polls every 10 ms, or every second).
//! Each row has the commit throughput and latency, and the end-to-end
//! latency: from the instant the order's commit returned to the instant
//! the consumer's transaction acting on its event committed. The second
//! table breaks that down: the instant the relay and the consumer report
//! each [stage](outbox::stages) of the event's way, all on this process's
//! monotonic clock, measured, none estimated. (Postgres's `now()` is when a
//! transaction *began*, so no difference of stored timestamps is used.)
//!
//! Then the drains: a backlog written while no relay runs, published by one
//! relay with the consumer stopped (the relay's own throughput, with where
//! each batch spends its time) and with the consumer running beside it (on
//! two cores, what the pair does); and consumers of different shapes
//! (lanes × batch size), each draining events published to its queue for it.
//!
//! Everything runs in this process against its own database
//! (`lab_bench_outbox`) and its own exchange and queues, so a running
//! `lab up` is not disturbed. It does share the server's CPU, its WAL and
//! its NOTIFY lock with whatever else runs, so measure with the lab idle.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use hdrhistogram::Histogram;
use lab_core::{
    config::{AmqpConfig, PostgresConfig},
    metrics::Metrics,
};
use lapin::{
    BasicProperties, Confirmation,
    options::{
        BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
        QueuePurgeOptions,
    },
    types::{AMQPValue, FieldTable},
};
use outbox::{
    Notify,
    consumer::Consumer,
    events::{Event, ORDER_CREATED},
    orders::{Delivery, Item, NewOrder, Orders},
    relay::Relay,
    stages::{Probe, Stage, Stamp},
};
use serde::Serialize;
use sqlx::PgPool;
use tokio::{sync::mpsc::UnboundedReceiver, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Load, measure, micros, progress, ratio};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Events written before the relay starts, for the drain measurements.
    #[arg(long, env = "LAB_BENCH_BACKLOG", default_value_t = 20_000)]
    backlog: usize,
    #[command(flatten)]
    postgres: PostgresConfig,
    #[command(flatten)]
    amqp: AmqpConfig,
    #[command(flatten)]
    load: Load,
}

/// One way of waking the relay: a row of the table at each concurrency.
#[derive(Clone, Copy)]
struct Wake {
    name: &'static str,
    notify: Notify,
    poll_ms: u64,
}

const WAKES: [Wake; 4] = [
    Wake {
        name: "notify=on",
        notify: Notify::On,
        poll_ms: 1000,
    },
    Wake {
        name: "notify=trigger",
        notify: Notify::Trigger,
        poll_ms: 1000,
    },
    Wake {
        name: "poll=10ms",
        notify: Notify::Off,
        poll_ms: 10,
    },
    Wake {
        name: "notify=off",
        notify: Notify::Off,
        poll_ms: 1000,
    },
];

/// The consumer shapes the consumer drain compares: (lanes, batch size,
/// prefetch). The first is the consumer as it was: one event per
/// transaction.
const CONSUMER_SHAPES: [(u16, u16, u16); 6] = [
    (4, 1, 64),
    (16, 1, 64),
    (4, 16, 64),
    (4, 64, 64),
    (4, 64, 256),
    (8, 32, 256),
];

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
    /// For each stage, p50 and p99 of the time from commit to reaching it.
    stages: Vec<StageTime>,
}

#[derive(Debug, Serialize)]
struct StageTime {
    stage: &'static str,
    p50_us: u64,
    p99_us: u64,
}

#[derive(Debug, Serialize)]
struct Drain {
    consumer_running: bool,
    events: usize,
    seconds: f64,
    events_per_sec: f64,
    batches: usize,
    /// Of the relay's time in its batches: (step, share).
    batch_time: Vec<(&'static str, f64)>,
    /// With the consumer running: when it had handled them all.
    consumer_seconds: Option<f64>,
}

#[derive(Debug, Serialize)]
struct ConsumerDrain {
    lanes: u16,
    prefetch: u16,
    batch_size: u16,
    events: u64,
    seconds: f64,
    events_per_sec: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    cells: Vec<Cell>,
    relay_drains: Vec<Drain>,
    consumer_drains: Vec<ConsumerDrain>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let scratch =
        crate::scratch::database(&args.postgres.database_url, "lab_bench_outbox", &stop).await?;
    let pool = scratch.pool.clone();
    let settings = outbox::Settings {
        exchange: "lab.bench.events".into(),
        queue: "lab.bench.notifications".into(),
        relay_lease_retry_ms: 50,
        ..outbox::Settings::from_env()?
    };
    // What a run killed mid-way left: its queues, with their backlog.
    crate::chaos::clean_up(&args.amqp.amqp_url, &settings).await;
    let (probe, stamps) = Probe::channel();
    let mut bench = Bench {
        pool,
        amqp: args.amqp.amqp_url.clone(),
        settings,
        probe,
        timeline: Timeline::new(stamps),
    };
    let result = bench.all(&args).await;
    crate::chaos::clean_up(&bench.amqp, &bench.settings).await;
    let report = result?;
    if args.load.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, bench.settings.relay_batch_size);
    }
    Ok(())
}

/// The pipeline under measurement and what it reports.
struct Bench {
    pool: PgPool,
    amqp: String,
    settings: outbox::Settings,
    probe: Probe,
    timeline: Timeline,
}

/// A relay or a consumer running in this process.
struct Running {
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    fn spawn(work: impl FnOnce(CancellationToken) -> BoxedRun) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn(work(stop.clone()));
        Self { stop, task }
    }

    /// Stops it and waits until it has let go (of the lead, of its queue).
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

type BoxedRun = futures::future::BoxFuture<'static, anyhow::Result<()>>;

impl Bench {
    async fn all(&mut self, args: &Args) -> anyhow::Result<Report> {
        let load = &args.load;
        let per_concurrency = 3 + WAKES.len() as u64;
        let bar = progress(load.concurrency.len() as u64 * per_concurrency + 3);
        let consumer = self.start_consumer(&self.settings.clone()).await?;
        let mut cells = Vec::new();
        for &concurrency in &load.concurrency {
            for wake in WAKES {
                bar.set_message(format!("{}, {concurrency} clients", wake.name));
                cells.push(self.commits(load, concurrency, wake).await?);
                bar.inc(1);
            }
            // The floors come after the path, whose cells each end with the
            // pipeline idle: a quorum queue just deleted, or a burst of
            // commits, would still be on the disk while the next cell ran.
            for quorum in [false, true] {
                bar.set_message(format!("rabbitmq, {concurrency} in flight"));
                cells.push(raw_confirms(load, &self.amqp, concurrency, quorum).await?);
                bar.inc(1);
            }
            bar.set_message(format!("pg commit, {concurrency} clients"));
            cells.push(commit_floor(load, &self.pool, concurrency).await?);
            bar.inc(1);
        }
        // Printed floors first.
        cells.sort_by_key(|cell| (cell.concurrency, !cell.stages.is_empty()));
        bar.set_message(format!("relay drain of {}, consumer running", args.backlog));
        let mut relay_drains = vec![self.relay_drain(args.backlog, true).await?];
        bar.inc(1);
        consumer.stop().await;
        bar.set_message(format!("relay drain of {}, consumer stopped", args.backlog));
        relay_drains.push(self.relay_drain(args.backlog, false).await?);
        bar.inc(1);
        bar.set_message("consumer drains");
        let consumer_drains = self
            .consumer_drains(args.backlog / CONSUMER_SHAPES.len())
            .await?;
        bar.finish_and_clear();
        Ok(Report {
            cells,
            relay_drains,
            consumer_drains,
        })
    }

    /// Starts a consumer with `settings` and waits until it consumes.
    async fn start_consumer(&self, settings: &outbox::Settings) -> anyhow::Result<Running> {
        let consumer = Consumer::new(
            own_pool(&self.pool),
            self.amqp.clone(),
            settings.clone(),
            &Metrics::new("outbox_bench"),
        )
        .with_probe(self.probe.clone());
        let stats = consumer.stats();
        let running = Running::spawn(|stop| Box::pin(consumer.run(stop)));
        let connected = wait_for(Duration::from_secs(5), || async { stats.connected() }).await;
        anyhow::ensure!(
            connected,
            "{}",
            lab_core::amqp::describe(&self.amqp, "the consumer did not connect within 5 s")
        );
        Ok(running)
    }

    /// Starts a relay polling every `poll_ms` and waits until it leads.
    async fn start_relay(&self, poll_ms: u64) -> anyhow::Result<Running> {
        let settings = outbox::Settings {
            relay_poll_interval_ms: poll_ms,
            ..self.settings.clone()
        };
        let relay = Relay::new(
            own_pool(&self.pool),
            self.amqp.clone(),
            settings,
            &Metrics::new("outbox_bench"),
        )
        .with_probe(self.probe.clone());
        let state = relay.state();
        let running = Running::spawn(|stop| Box::pin(relay.run(stop)));
        let leads = wait_for(Duration::from_secs(10), || async {
            let status = state.status();
            status.leader && status.broker_connected
        })
        .await;
        anyhow::ensure!(leads, "the bench's relay did not lead within 10 s");
        Ok(running)
    }

    /// Orders committed by `concurrency` clients, woken as `wake` says;
    /// then, once the consumer has committed every one, their way through.
    async fn commits(
        &mut self,
        load: &Load,
        concurrency: usize,
        wake: Wake,
    ) -> anyhow::Result<Cell> {
        let relay = self.start_relay(wake.poll_ms).await?;
        let settings = outbox::Settings {
            notify: wake.notify,
            ..self.settings.clone()
        };
        let metrics = Metrics::new("outbox_bench");
        let orders = Orders::new(own_pool(&self.pool), self.amqp.clone(), &settings, &metrics);
        let commits = Arc::new(Mutex::new(Vec::new()));
        let measured_from = Instant::now() + load.warmup;
        let record = commits.clone();
        let row = measure(load, concurrency, wake.name, "commit", move |_, n| {
            let (orders, record) = (orders.clone(), record.clone());
            async move {
                let (order, _) = orders
                    .create(sample(n as usize), Delivery::Outbox, None)
                    .await?;
                let committed = Instant::now();
                record
                    .lock()
                    .expect("not poisoned")
                    .push((order.id, committed));
                Ok(0)
            }
        })
        .await?;
        let commits: Vec<(Uuid, Instant)> =
            std::mem::take(&mut *commits.lock().expect("not poisoned"));
        let events = self.events_of(&commits).await?;
        self.timeline.wait_until_consumed(events.values()).await?;
        relay.stop().await;
        let measured = commits.iter().filter(|(_, at)| *at >= measured_from);
        let ways = measured.filter_map(|(order, at)| Some((events.get(order)?, *at)));
        let (e2e, stages) = self.timeline.ways(ways)?;
        self.timeline.forget();
        // The next cell starts from empty tables, as this one did.
        sqlx::query("TRUNCATE notifications, processed_events, order_progress")
            .execute(&self.pool)
            .await?;
        Ok(Cell {
            variant: wake.name.to_owned(),
            concurrency,
            ops_per_sec: row.requests_per_sec,
            p50_us: row.p50_us,
            p99_us: row.p99_us,
            errors: row.errors,
            e2e_p50_us: (!e2e.is_empty()).then(|| e2e.value_at_quantile(0.50)),
            e2e_p99_us: (!e2e.is_empty()).then(|| e2e.value_at_quantile(0.99)),
            stages,
        })
    }

    /// The event id of each order's `order.created`.
    async fn events_of(&self, commits: &[(Uuid, Instant)]) -> anyhow::Result<HashMap<Uuid, Uuid>> {
        let orders: Vec<Uuid> = commits.iter().map(|(order, _)| *order).collect();
        let rows: Vec<(Uuid, Uuid)> = sqlx::query_as(
            "SELECT aggregate_id, event_id FROM outbox WHERE aggregate_id = ANY($1)",
        )
        .bind(&orders)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }

    /// With no relay running, writes `backlog` orders through the outbox;
    /// then starts one relay and times how long it takes to publish them
    /// all (and, if the consumer runs, how long until it has handled them).
    async fn relay_drain(
        &mut self,
        backlog: usize,
        consumer_running: bool,
    ) -> anyhow::Result<Drain> {
        let event_ids = self.write_backlog(backlog).await?;
        let started = Instant::now();
        let relay = self
            .start_relay(self.settings.relay_poll_interval_ms)
            .await?;
        wait_until_published(&self.pool, Duration::from_secs(120)).await?;
        let seconds = started.elapsed().as_secs_f64();
        relay.stop().await;
        let consumer_seconds = if consumer_running {
            self.timeline.wait_until_consumed(event_ids.iter()).await?;
            let last = self.timeline.last(Stage::Committed, event_ids.iter());
            last.map(|at| at.saturating_duration_since(started).as_secs_f64())
        } else {
            None
        };
        let (batches, batch_time) = self.timeline.batch_time();
        self.timeline.forget();
        Ok(Drain {
            consumer_running,
            events: backlog,
            seconds,
            events_per_sec: backlog as f64 / seconds,
            batches,
            batch_time,
            consumer_seconds,
        })
    }

    /// Writes `backlog` orders from 16 clients; returns their event ids.
    async fn write_backlog(&self, backlog: usize) -> anyhow::Result<Vec<Uuid>> {
        let settings = outbox::Settings {
            notify: Notify::Off,
            ..self.settings.clone()
        };
        let metrics = Metrics::new("outbox_bench");
        let orders = Orders::new(own_pool(&self.pool), self.amqp.clone(), &settings, &metrics);
        let before: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM outbox")
            .fetch_one(&self.pool)
            .await?;
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
        Ok(
            sqlx::query_scalar("SELECT event_id FROM outbox WHERE id > $1")
                .bind(before)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Consumers of each shape in turn, each draining `events` order events
    /// queued for it: events per second, from start to the last one.
    async fn consumer_drains(&mut self, events: usize) -> anyhow::Result<Vec<ConsumerDrain>> {
        let mut drains = Vec::new();
        for (lanes, batch_size, prefetch) in CONSUMER_SHAPES {
            self.queue_events(events).await?;
            let settings = outbox::Settings {
                consumer_lanes: lanes,
                consumer_batch_size: batch_size,
                consumer_prefetch: prefetch,
                ..self.settings.clone()
            };
            let consumer = Consumer::new(
                own_pool(&self.pool),
                self.amqp.clone(),
                settings,
                &Metrics::new("outbox_bench"),
            );
            let stats = consumer.stats();
            let started = Instant::now();
            let running = Running::spawn(|stop| Box::pin(consumer.run(stop)));
            let handled = || stats.body().handled;
            let all = events as u64;
            let done = wait_for(Duration::from_secs(120), || async { handled() >= all }).await;
            let seconds = started.elapsed().as_secs_f64();
            running.stop().await;
            anyhow::ensure!(
                done,
                "a consumer handled {} of {all} events in 120 s",
                handled()
            );
            drains.push(ConsumerDrain {
                lanes,
                prefetch,
                batch_size,
                events: all,
                seconds,
                events_per_sec: all as f64 / seconds,
            });
        }
        Ok(drains)
    }

    /// Empties the consumer's queue, then publishes `n` new orders' events
    /// to it, as the relay would.
    async fn queue_events(&self, n: usize) -> anyhow::Result<()> {
        let connection = lab_core::amqp::connect(&self.amqp, "lab-bench-queue")
            .await
            .map_err(anyhow::Error::msg)?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let queue = self.settings.queue.as_str();
        channel
            .queue_purge(queue.into(), QueuePurgeOptions::default())
            .await?;
        let events: Vec<Event> = (0..n).map(queued_event).collect::<anyhow::Result<_>>()?;
        for window in events.chunks(500) {
            let mut confirms = Vec::with_capacity(window.len());
            for event in window {
                let body = serde_json::to_vec(event)?;
                let exchange = &self.settings.exchange;
                let (id, kind, order) = (event.event_id, &event.event_type, event.aggregate_id);
                let publish =
                    outbox::events::publish(&channel, exchange, id, kind, order, &body, true);
                confirms.push(publish.await?);
            }
            for confirmation in futures::future::try_join_all(confirms).await? {
                anyhow::ensure!(
                    matches!(confirmation, Confirmation::Ack(None)),
                    "RabbitMQ did not take an event for {queue}: {confirmation:?}"
                );
            }
        }
        lab_core::amqp::close(&connection, "bench queued its events").await;
        Ok(())
    }
}

/// A new order's `order.created`, as the relay would publish it.
fn queued_event(i: usize) -> anyhow::Result<Event> {
    let new = sample(i);
    let now = chrono::Utc::now();
    let order = outbox::orders::Order {
        id: Uuid::now_v7(),
        customer_id: new.customer_id,
        total_cents: new
            .items
            .iter()
            .map(|item| item.quantity * item.price_cents)
            .sum(),
        items: new.items,
        status: "created".into(),
        delivery: Delivery::Outbox.as_str().into(),
        created_at: now,
        updated_at: now,
    };
    Ok(Event::new(
        ORDER_CREATED,
        order.id,
        1,
        serde_json::to_value(&order)?,
    ))
}

/// A pool of its own for one part of the pipeline, as each part has in
/// compose: no part waits for a connection another part holds.
fn own_pool(pool: &PgPool) -> PgPool {
    lab_core::postgres::pool((*pool.connect_options()).clone())
}

/// Polls `ready` every 10 ms for up to `limit`; whether it became true.
async fn wait_for<F, Fut>(limit: Duration, ready: F) -> bool
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ready().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ready().await
}

/// The stamps the relay and the consumer sent, by event.
struct Timeline {
    stamps: UnboundedReceiver<Stamp>,
    /// The first instant each event reached each stage.
    events: HashMap<Uuid, [Option<Instant>; Stage::ALL.len()]>,
    /// The relay's batches: each stage's instant, by the batch's first event.
    batches: Vec<(Stage, Instant, Uuid)>,
}

impl Timeline {
    fn new(stamps: UnboundedReceiver<Stamp>) -> Self {
        Self {
            stamps,
            events: HashMap::new(),
            batches: Vec::new(),
        }
    }

    fn absorb(&mut self) {
        while let Ok(stamp) = self.stamps.try_recv() {
            let relay_batch = stamp.stage <= Stage::Marked;
            if let (true, Some(first)) = (relay_batch, stamp.event_ids.first()) {
                self.batches.push((stamp.stage, stamp.at, *first));
            }
            for id in stamp.event_ids {
                let slot = &mut self.events.entry(id).or_default()[stamp.stage as usize];
                slot.get_or_insert(stamp.at);
            }
        }
    }

    fn forget(&mut self) {
        self.absorb();
        self.events.clear();
        self.batches.clear();
    }

    fn at(&self, id: &Uuid, stage: Stage) -> Option<Instant> {
        self.events.get(id)?[stage as usize]
    }

    /// Waits (up to 60 s) until the consumer has committed every one of
    /// `ids`.
    async fn wait_until_consumed<'a>(
        &mut self,
        ids: impl Iterator<Item = &'a Uuid> + Clone,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.absorb();
            let left = ids
                .clone()
                .filter(|id| self.at(id, Stage::Committed).is_none())
                .count();
            if left == 0 {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the consumer had not committed {left} events after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn last<'a>(&self, stage: Stage, ids: impl Iterator<Item = &'a Uuid>) -> Option<Instant> {
        ids.filter_map(|id| self.at(id, stage)).max()
    }

    /// From each commit instant, the end-to-end latency (to the consumer's
    /// commit) and the time to each stage: p50 and p99 of each.
    fn ways<'a>(
        &self,
        ways: impl Iterator<Item = (&'a Uuid, Instant)>,
    ) -> anyhow::Result<(Histogram<u64>, Vec<StageTime>)> {
        let new = || Histogram::<u64>::new_with_bounds(1, 600_000_000, 3);
        let mut by_stage = Vec::new();
        for _ in Stage::ALL {
            by_stage.push(new()?);
        }
        for (id, committed) in ways {
            for stage in Stage::ALL {
                if let Some(at) = self.at(id, stage) {
                    // A wake-up can come before the client sees its commit
                    // return: that counts as no time at all.
                    let us = at.saturating_duration_since(committed).as_micros() as u64;
                    by_stage[stage as usize].saturating_record(us.max(1));
                }
            }
        }
        let stages = Stage::ALL
            .iter()
            .zip(&by_stage)
            .map(|(stage, h)| StageTime {
                stage: stage.name(),
                p50_us: h.value_at_quantile(0.50),
                p99_us: h.value_at_quantile(0.99),
            })
            .collect();
        let e2e = by_stage.swap_remove(Stage::Committed as usize);
        Ok((e2e, stages))
    }

    /// How many batches the relay ran, and what share of their time each
    /// step took: select, publish, confirm, mark.
    fn batch_time(&mut self) -> (usize, Vec<(&'static str, f64)>) {
        self.absorb();
        let mut steps: HashMap<Uuid, [Option<Instant>; 5]> = HashMap::new();
        for (stage, at, first) in &self.batches {
            steps.entry(*first).or_default()[*stage as usize].get_or_insert(*at);
        }
        let names = ["select", "publish", "confirm", "mark"];
        let mut totals = [0f64; 4];
        for instants in steps.values() {
            for (step, total) in totals.iter_mut().enumerate() {
                if let (Some(from), Some(to)) = (instants[step], instants[step + 1]) {
                    *total += to.saturating_duration_since(from).as_secs_f64();
                }
            }
        }
        let sum: f64 = totals.iter().sum::<f64>().max(f64::EPSILON);
        let shares = names.into_iter().zip(totals.map(|t| t / sum)).collect();
        (steps.len(), shares)
    }
}

/// The quorum floor's queue (one run at a time holds `lab_bench_outbox`'s
/// lock, so the name need not be unique).
const QUORUM_FLOOR: &str = "lab.bench.quorum-floor";

/// Publish and wait for the confirm, with `concurrency` publishes in
/// flight on one channel: to an exclusive classic queue, or to a quorum
/// queue like the consumer's.
async fn raw_confirms(
    load: &Load,
    amqp: &str,
    concurrency: usize,
    quorum: bool,
) -> anyhow::Result<Cell> {
    let connection = lab_core::amqp::connect(amqp, "lab-bench-raw")
        .await
        .map_err(anyhow::Error::msg)?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    // A run killed mid-way leaves its durable queue behind, backlog and all.
    let _ = channel
        .queue_delete(QUORUM_FLOOR.into(), QueueDeleteOptions::default())
        .await;
    let (name, options, arguments) = if quorum {
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        (QUORUM_FLOOR, durable, arguments)
    } else {
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        };
        ("", exclusive, FieldTable::default())
    };
    let queue = channel
        .queue_declare(name.into(), options, arguments)
        .await?;
    let queue = queue.name().to_string();
    let body = vec![b'x'; 400]; // about the size of an order event
    let variant = if quorum { "quorum" } else { "rabbitmq" };
    let publisher = channel.clone();
    let row = measure(load, concurrency, variant, "confirm", move |_, _| {
        let (channel, queue, body) = (publisher.clone(), queue.clone(), body.clone());
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
    if quorum {
        channel
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await?;
    }
    lab_core::amqp::close(&connection, "bench done").await;
    Ok(floor_cell(row))
}

/// One-row inserts, each its own durable commit, from `concurrency` clients.
async fn commit_floor(load: &Load, pool: &PgPool, concurrency: usize) -> anyhow::Result<Cell> {
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_commit_floor (id bigserial PRIMARY KEY)")
        .execute(pool)
        .await?;
    let pool = own_pool(pool);
    let row = measure(load, concurrency, "pg commit", "commit", move |_, _| {
        let pool = pool.clone();
        async move {
            sqlx::query("INSERT INTO bench_commit_floor DEFAULT VALUES")
                .execute(&pool)
                .await?;
            Ok(0)
        }
    })
    .await?;
    Ok(floor_cell(row))
}

fn floor_cell(row: super::Row) -> Cell {
    Cell {
        variant: row.variant,
        concurrency: row.concurrency,
        ops_per_sec: row.requests_per_sec,
        p50_us: row.p50_us,
        p99_us: row.p99_us,
        errors: row.errors,
        e2e_p50_us: None,
        e2e_p99_us: None,
        stages: Vec::new(),
    }
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

fn print_report(report: &Report, relay_batch_size: i64) {
    print_cells(&report.cells);
    println!();
    print_stages(&report.cells);
    println!();
    print_drains(report, relay_batch_size);
    println!();
    print_goals(&report.cells);
}

/// The first table: throughput, latency, end to end; `×off` is commit
/// throughput next to `notify=off`'s, `e2e ×raw` the end-to-end p50 next
/// to the raw confirm's, at the same concurrency.
fn print_cells(cells: &[Cell]) {
    println!(
        "{:<14} {:>4} {:>8} {:>9} {:>9} {:>9} {:>9} {:>6} {:>5} {:>8}",
        "variant",
        "conc",
        "ops/s",
        "p50",
        "p99",
        "e2e p50",
        "e2e p99",
        "errors",
        "×off",
        "e2e ×raw"
    );
    let find = |variant: &str, concurrency| {
        cells
            .iter()
            .find(|c| c.variant == variant && c.concurrency == concurrency)
    };
    for cell in cells {
        let e2e = |v: Option<u64>| v.map_or("-".into(), micros);
        let off = find("notify=off", cell.concurrency)
            .filter(|_| cell.e2e_p50_us.is_some())
            .map_or("-".into(), |off| ratio(cell.ops_per_sec, off.ops_per_sec));
        let raw = match (cell.e2e_p50_us, find("rabbitmq", cell.concurrency)) {
            (Some(e2e), Some(raw)) => ratio(e2e as f64, raw.p50_us as f64),
            _ => "-".into(),
        };
        println!(
            "{:<14} {:>4} {:>8.0} {:>9} {:>9} {:>9} {:>9} {:>6} {:>5} {:>8}",
            cell.variant,
            cell.concurrency,
            cell.ops_per_sec,
            micros(cell.p50_us),
            micros(cell.p99_us),
            e2e(cell.e2e_p50_us),
            e2e(cell.e2e_p99_us),
            cell.errors,
            off,
            raw,
        );
    }
}

/// The second table: p50 of the time from commit to each stage.
fn print_stages(cells: &[Cell]) {
    print!("{:<16} {:>4}", "p50 after commit", "conc");
    for stage in Stage::ALL {
        print!(" {:>9}", stage.name());
    }
    println!();
    for cell in cells.iter().filter(|c| !c.stages.is_empty()) {
        print!("{:<16} {:>4}", cell.variant, cell.concurrency);
        for stage in &cell.stages {
            print!(" {:>9}", micros(stage.p50_us));
        }
        println!();
    }
}

fn print_drains(report: &Report, relay_batch_size: i64) {
    let windowed = report
        .cells
        .iter()
        .filter(|c| c.variant == "rabbitmq")
        .max_by_key(|c| c.concurrency);
    for d in &report.relay_drains {
        let consumer = if d.consumer_running {
            "running"
        } else {
            "stopped"
        };
        let shares: Vec<String> = d
            .batch_time
            .iter()
            .map(|(step, share)| format!("{step} {:.0}%", share * 100.0))
            .collect();
        let versus = windowed.map_or("-".into(), |raw| {
            format!(
                "{}× rabbitmq at {} in flight",
                ratio(d.events_per_sec, raw.ops_per_sec),
                raw.concurrency
            )
        });
        println!(
            "relay drain, consumer {consumer}: {} events in {:.2} s = {:.0} events/s = {versus}; \
             {} batches (of up to {relay_batch_size}): {}",
            d.events,
            d.seconds,
            d.events_per_sec,
            d.batches,
            shares.join(", ")
        );
        if let Some(seconds) = d.consumer_seconds {
            println!(
                "  the consumer had handled them all {seconds:.2} s after the relay started = {:.0} events/s",
                d.events as f64 / seconds
            );
        }
    }
    for d in &report.consumer_drains {
        println!(
            "consumer drain, {:>2} lanes, batches of up to {:>2}, prefetch {:>3}: \
             {} events in {:.2} s = {:.0} events/s",
            d.lanes, d.batch_size, d.prefetch, d.events, d.seconds, d.events_per_sec
        );
    }
}

/// The ratios the path is judged by, per way of waking the relay, at the
/// lowest and the highest concurrency: end to end next to the raw confirm
/// and next to itself at the lowest, commits next to `notify=off`'s. And
/// the floor of the path: a quorum confirm and a durable commit.
fn print_goals(cells: &[Cell]) {
    let find = |variant: &str, concurrency| {
        cells
            .iter()
            .find(|c| c.variant == variant && c.concurrency == concurrency)
    };
    let (Some(low), Some(high)) = (
        cells.iter().map(|c| c.concurrency).min(),
        cells.iter().map(|c| c.concurrency).max(),
    ) else {
        return;
    };
    let us = |variant, concurrency| find(variant, concurrency).map(|c: &Cell| c.p50_us as f64);
    let e2e = |variant, concurrency| find(variant, concurrency)?.e2e_p50_us.map(|v| v as f64);
    let ops = |variant, concurrency| find(variant, concurrency).map(|c: &Cell| c.ops_per_sec);
    let show = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => ratio(a, b),
        _ => "-".into(),
    };
    println!(
        "{:<14} {:>12} {:>14} {:>13} {:>13}",
        "ratios",
        format!("e2e/raw @{low}"),
        format!("e2e @{high}/@{low}"),
        format!("commits/off @{low}"),
        format!("@{high}")
    );
    for wake in WAKES.iter().map(|w| w.name).filter(|&n| n != "notify=off") {
        println!(
            "{:<14} {:>12} {:>14} {:>13} {:>13}",
            wake,
            show(e2e(wake, low), us("rabbitmq", low)),
            show(e2e(wake, high), e2e(wake, low)),
            show(ops(wake, low), ops("notify=off", low)),
            show(ops(wake, high), ops("notify=off", high)),
        );
    }
    if let (Some(quorum), Some(commit), Some(raw)) =
        (us("quorum", low), us("pg commit", low), us("rabbitmq", low))
    {
        println!(
            "the path's floor at {low}: a quorum confirm + a durable commit, p50 {} = {}× the raw confirm",
            micros((quorum + commit) as u64),
            ratio(quorum + commit, raw)
        );
    }
}
