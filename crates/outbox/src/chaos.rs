//! The lab's experiment: both paths, the same outages, and a count.
//!
//! Orders are created at a steady rate, alternating between the outbox path
//! and the naive dual write, while the connection to RabbitMQ is cut and
//! restored a few times. The cut happens in a TCP proxy this scenario runs in
//! front of the broker: the API's dual-write publisher, the relay and the
//! consumer all reach RabbitMQ through it, and the shared broker itself is
//! never touched. When everything has settled, it counts, per path, orders
//! committed against orders whose `order.created` reached the consumer.
//!
//! `lab chaos outbox` prints the result; the workshop test
//! `chaos_dual_write_loses_events_the_outbox_loses_none` asserts it.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use lab_core::{metrics::Metrics, proxy::Proxy};
use lapin::{options::QueueDeclareOptions, types::FieldTable};
use serde::Serialize;
use sqlx::PgPool;
use tokio::{
    sync::mpsc,
    task::{JoinHandle, JoinSet},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    Settings,
    consumer::{Consumer, ConsumerStats},
    orders::{Delivery, Item, NewOrder, Orders},
    relay::Relay,
};

#[derive(Debug, Clone)]
pub struct Scenario {
    /// Orders to create, half through each path.
    pub orders: usize,
    /// Orders created per second.
    pub rate: f64,
    /// How many times the broker connection is cut.
    pub cuts: usize,
    /// How long each cut lasts.
    pub outage: Duration,
    /// How long to wait, after the last order, for the pipeline to drain.
    pub settle_timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct PathReport {
    pub path: &'static str,
    pub committed: i64,
    pub delivered: i64,
    pub lost: i64,
    pub duplicates_suppressed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub paths: Vec<PathReport>,
    pub cuts: usize,
    pub outage_ms: u128,
    pub failed_requests: usize,
    pub elapsed_ms: u128,
}

impl Report {
    pub fn path(&self, path: &str) -> &PathReport {
        self.paths
            .iter()
            .find(|p| p.path == path)
            .expect("both paths are reported")
    }
}

/// What the scenario is doing, for a progress display.
#[derive(Debug, Clone, Copy)]
pub enum Progress {
    Created(usize),
    Cut(usize),
    Restored(usize),
    Settling { pending: i64 },
}

/// Runs the scenario on `pool` (an otherwise unused database) against the
/// broker at `amqp_url`, on `settings.exchange` and `settings.queue`.
pub async fn run(
    pool: PgPool,
    amqp_url: &str,
    settings: Settings,
    scenario: Scenario,
    progress: impl Fn(Progress),
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let (proxy, proxied) = proxy_to(amqp_url).await?;

    let metrics = Metrics::new("outbox_chaos");
    let stop = CancellationToken::new();
    let orders = Orders::new(pool.clone(), proxied.clone(), &settings, &metrics);
    let relay = Relay::new(pool.clone(), proxied.clone(), settings.clone(), &metrics);
    let consumer = Consumer::new(pool.clone(), proxied.clone(), settings.clone(), &metrics);
    let consumer_stats = consumer.stats();
    let mut services = JoinSet::new();
    services.spawn(relay.run(stop.clone()));
    services.spawn(consumer.run(stop.clone()));
    let _stop_on_exit = stop.clone().drop_guard();
    wait_for_consumer(&consumer_stats, amqp_url).await?;

    let proxy = Arc::new(proxy);
    let (cutter, mut cut_rx) = spawn_cutter(proxy.clone(), &scenario);
    let failed_requests = create_orders(&orders, &scenario, &mut cut_rx, &progress).await;
    cutter.await.context("the proxy cutter panicked")?;
    while let Ok(event) = cut_rx.try_recv() {
        progress(event);
    }
    proxy.restore();

    let inspector = settle(
        &pool,
        amqp_url,
        &settings,
        &scenario,
        &consumer_stats,
        &progress,
    )
    .await?;
    let paths = count_paths(&pool, &consumer_stats).await?;
    lab_core::amqp::close(&inspector, "chaos settled").await;
    stop.cancel();
    while services.join_next().await.is_some() {}
    Ok(Report {
        paths,
        cuts: scenario.cuts,
        outage_ms: scenario.outage.as_millis(),
        failed_requests,
        elapsed_ms: started.elapsed().as_millis(),
    })
}

/// Starts the TCP proxy in front of the broker; returns it and `amqp_url`
/// pointed at it.
async fn proxy_to(amqp_url: &str) -> anyhow::Result<(Proxy, String)> {
    let broker = url::Url::parse(amqp_url).context("AMQP_URL is not a URL")?;
    let target = lab_core::amqp::where_is(amqp_url);
    let proxy = Proxy::start(&target)
        .await
        .context("cannot start the proxy")?;
    let mut proxied = broker.clone();
    proxied
        .set_host(Some("127.0.0.1"))
        .and_then(|()| {
            proxied
                .set_port(Some(proxy.addr.port()))
                .map_err(|()| url::ParseError::InvalidPort)
        })
        .context("cannot point AMQP_URL at the proxy")?;
    Ok((proxy, proxied.to_string()))
}

/// Until the consumer's queue exists, published events have nowhere to go.
async fn wait_for_consumer(consumer: &ConsumerStats, amqp_url: &str) -> anyhow::Result<()> {
    let ready_by = Instant::now() + Duration::from_secs(10);
    while !consumer.connected() {
        anyhow::ensure!(
            Instant::now() < ready_by,
            "{}",
            lab_core::amqp::describe(amqp_url, "the consumer did not connect within 10 s")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The outages, spread evenly over the run; each cut and restore is also
/// sent on the returned channel, for the progress display.
fn spawn_cutter(
    proxy: Arc<Proxy>,
    scenario: &Scenario,
) -> (JoinHandle<()>, mpsc::UnboundedReceiver<Progress>) {
    let run_for = Duration::from_secs_f64(scenario.orders as f64 / scenario.rate);
    let (cut_tx, cut_rx) = mpsc::unbounded_channel();
    let scenario = scenario.clone();
    let cutter = tokio::spawn(async move {
        let begin = Instant::now();
        for n in 1..=scenario.cuts {
            let at = run_for.mul_f64(n as f64 / (scenario.cuts + 1) as f64);
            let at = at.saturating_sub(scenario.outage / 2);
            tokio::time::sleep_until(begin + at).await;
            proxy.cut();
            let _ = cut_tx.send(Progress::Cut(n));
            tokio::time::sleep(scenario.outage).await;
            proxy.restore();
            let _ = cut_tx.send(Progress::Restored(n));
        }
    });
    (cutter, cut_rx)
}

/// Creates the orders at the scenario's rate, alternating the two paths,
/// and waits for every request; returns how many failed.
async fn create_orders(
    orders: &Orders,
    scenario: &Scenario,
    cut_rx: &mut mpsc::UnboundedReceiver<Progress>,
    progress: &impl Fn(Progress),
) -> usize {
    let mut requests = JoinSet::new();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / scenario.rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..scenario.orders {
        ticker.tick().await;
        while let Ok(event) = cut_rx.try_recv() {
            progress(event);
        }
        let delivery = if i % 2 == 0 {
            Delivery::Outbox
        } else {
            Delivery::DualWrite
        };
        let orders = orders.clone();
        requests.spawn(async move { orders.create(sample_order(i), delivery, None).await });
        if (i + 1) % 100 == 0 || i + 1 == scenario.orders {
            progress(Progress::Created(i + 1));
        }
    }
    let mut failed_requests = 0;
    while let Some(done) = requests.join_next().await {
        if !matches!(done, Ok(Ok(_))) {
            failed_requests += 1;
        }
    }
    failed_requests
}

/// Waits until the pipeline has settled: nothing pending in the outbox,
/// nothing waiting in the queue (asked of the broker directly, not through
/// the proxy), the consumer connected (a reconnecting consumer leaves its
/// queue untouched) and quiet for a second. Returns the inspector's
/// connection, for the caller to close.
async fn settle(
    pool: &PgPool,
    amqp_url: &str,
    settings: &Settings,
    scenario: &Scenario,
    consumer: &ConsumerStats,
    progress: &impl Fn(Progress),
) -> anyhow::Result<lapin::Connection> {
    let inspector = lab_core::amqp::connect(amqp_url, "outbox-chaos-inspector")
        .await
        .map_err(anyhow::Error::msg)?;
    let inspect = lab_core::amqp::bounded(inspector.create_channel())
        .await
        .map_err(anyhow::Error::msg)?;
    let deadline = Instant::now() + scenario.settle_timeout;
    let mut last = (-1, -1);
    let mut quiet_since = Instant::now();
    loop {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(pool)
                .await?;
        let handled: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications")
            .fetch_one(pool)
            .await?;
        let queued = queued_messages(&inspect, &settings.queue).await?;
        progress(Progress::Settling { pending });
        if (pending, handled) != last {
            last = (pending, handled);
            quiet_since = Instant::now();
        } else if pending == 0
            && queued == 0
            && consumer.connected()
            && quiet_since.elapsed() >= Duration::from_secs(1)
        {
            break;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                pending,
                "the pipeline did not settle in time; counting anyway"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(inspector)
}

/// How many messages wait in `queue`, by a passive declare.
async fn queued_messages(inspect: &lapin::Channel, queue: &str) -> anyhow::Result<u32> {
    Ok(lab_core::amqp::bounded(inspect.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    ))
    .await
    .map_err(anyhow::Error::msg)?
    .message_count())
}

/// Per path: orders committed, and how many of them reached the consumer.
async fn count_paths(pool: &PgPool, consumer: &ConsumerStats) -> anyhow::Result<Vec<PathReport>> {
    let mut paths = Vec::new();
    for delivery in [Delivery::DualWrite, Delivery::Outbox] {
        let path = delivery.as_str();
        let (committed, delivered): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE EXISTS ( \
                 SELECT 1 FROM notifications n \
                 WHERE n.order_id = o.id AND n.event_type = 'order.created')) \
             FROM orders o WHERE o.delivery = $1",
        )
        .bind(path)
        .fetch_one(pool)
        .await?;
        paths.push(PathReport {
            path,
            committed,
            delivered,
            lost: committed - delivered,
            duplicates_suppressed: consumer.duplicates(path),
        });
    }
    Ok(paths)
}

fn sample_order(i: usize) -> NewOrder {
    NewOrder {
        customer_id: format!("chaos-{}", i % 50),
        items: vec![Item {
            sku: format!("SKU-{}", i % 7),
            quantity: 1 + (i % 3) as i64,
            price_cents: 1999,
        }],
    }
}
