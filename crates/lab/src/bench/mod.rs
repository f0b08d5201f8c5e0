//! `lab bench …`: measurements printed side by side, as ratios, in one run.
//!
//! A number alone says little on a shared two-core machine; the same number
//! next to its neighbours, measured minutes apart under the same load, says a
//! lot. So every bench runs all its variants in one go and prints ratios to a
//! baseline. Latencies go into HDR histograms (exact percentiles, not
//! averages), warm-up is measured but thrown away, and errors are counted,
//! never hidden.

mod brokers;
mod caching;
mod catalog;
mod chat;
mod outbox;
mod telemetry;

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Subcommand;
use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Subcommand)]
pub enum Bench {
    /// REST over HTTP/1.1 and HTTP/2 vs gRPC against a running catalog.
    Catalog(catalog::Args),
    /// Postgres vs cache hit vs miss, and a stampede with protection on and off.
    Caching(caching::Args),
    /// Relay throughput and commit-to-consumer latency, next to raw RabbitMQ confirms.
    Outbox(outbox::Args),
    /// WebSocket fan-out on one instance and on two through Redis, next to bare pub/sub.
    Chat(chat::Args),
    /// MQTT ingest at QoS 0 and 1, next to a bare subscriber on the same stream.
    Telemetry(telemetry::Args),
}

impl Bench {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Bench::Catalog(args) => catalog::run(args).await,
            Bench::Caching(args) => caching::run(args).await,
            Bench::Outbox(args) => outbox::run(args).await,
            Bench::Chat(args) => chat::run(args).await,
            Bench::Telemetry(args) => telemetry::run(args).await,
        }
    }
}

/// How long (or how many requests) each measured cell runs.
#[derive(clap::Args, Debug, Clone)]
pub struct Load {
    /// Concurrent in-flight requests, one cell per value.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub concurrency: Vec<usize>,
    /// Measured time per cell (e.g. 5s, 500ms).
    #[arg(long, env = "LAB_BENCH_DURATION", value_parser = humantime::parse_duration, default_value = "3s")]
    pub duration: Duration,
    /// Stop each cell after this many requests instead of after --duration.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Unmeasured time before each cell: connections open, caches warm.
    #[arg(long, env = "LAB_BENCH_WARMUP", value_parser = humantime::parse_duration, default_value = "500ms")]
    pub warmup: Duration,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also draw latency per variant into this SVG file.
    #[arg(long)]
    pub plot: Option<std::path::PathBuf>,
}

/// One measured cell: a variant of an operation at one concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub variant: String,
    pub op: String,
    pub concurrency: usize,
    pub requests: u64,
    pub errors: u64,
    pub requests_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub mean_response_bytes: f64,
}

/// Runs `op` from `concurrency` tasks: first for the warm-up (discarded),
/// then for the measured duration or request count. `op(worker, n)` does one
/// request and returns the response size in bytes.
pub async fn measure<F, Fut>(
    load: &Load,
    concurrency: usize,
    variant: &str,
    op_name: &str,
    op: F,
) -> anyhow::Result<Row>
where
    F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<usize>> + Send,
{
    if !load.warmup.is_zero() {
        run_workers(concurrency, Stop::After(load.warmup), op.clone()).await?;
    }
    let stop = match load.requests {
        Some(n) => Stop::Count(n),
        None => Stop::After(load.duration),
    };
    let started = Instant::now();
    let result = run_workers(concurrency, stop, op).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let requests = result.latency_us.len();
    Ok(Row {
        variant: variant.to_owned(),
        op: op_name.to_owned(),
        concurrency,
        requests,
        errors: result.errors,
        requests_per_sec: requests as f64 / elapsed,
        p50_us: result.latency_us.value_at_quantile(0.50),
        p99_us: result.latency_us.value_at_quantile(0.99),
        mean_response_bytes: if requests == 0 {
            0.0
        } else {
            result.bytes as f64 / requests as f64
        },
    })
}

#[derive(Clone, Copy)]
enum Stop {
    After(Duration),
    Count(u64),
}

struct Totals {
    latency_us: Histogram<u64>,
    bytes: u64,
    errors: u64,
}

async fn run_workers<F, Fut>(concurrency: usize, stop: Stop, op: F) -> anyhow::Result<Totals>
where
    F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<usize>> + Send,
{
    let deadline = match stop {
        Stop::After(d) => Some(Instant::now() + d),
        Stop::Count(_) => None,
    };
    let issued = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..concurrency.max(1) {
        let op = op.clone();
        let issued = issued.clone();
        workers.spawn(async move {
            // 1 µs to 60 s at 3 significant digits.
            let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let (mut bytes, mut errors, mut first_error) = (0u64, 0u64, None);
            loop {
                let n = issued.fetch_add(1, Ordering::Relaxed);
                match (stop, deadline) {
                    (Stop::Count(max), _) if n >= max => break,
                    (_, Some(deadline)) if Instant::now() >= deadline => break,
                    _ => {}
                }
                let started = Instant::now();
                match op(worker, n).await {
                    Ok(size) => {
                        latency.saturating_record(started.elapsed().as_micros() as u64);
                        bytes += size as u64;
                    }
                    Err(err) => {
                        errors += 1;
                        first_error.get_or_insert(err);
                    }
                }
            }
            anyhow::Ok((latency, bytes, errors, first_error))
        });
    }
    let mut totals = Totals {
        latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        bytes: 0,
        errors: 0,
    };
    let mut first_error = None;
    while let Some(done) = workers.join_next().await {
        let (latency, bytes, errors, err) = done.context("bench worker panicked")??;
        totals.latency_us.add(latency)?;
        totals.bytes += bytes;
        totals.errors += errors;
        if first_error.is_none() {
            first_error = err;
        }
    }
    if let Some(err) = first_error {
        // Errors are part of the result, but the first one is worth seeing.
        tracing::warn!("{} request(s) failed; first: {err:#}", totals.errors);
    }
    Ok(totals)
}

/// Prints rows as a table, each with its ratios to the `baseline` variant
/// of the same operation and concurrency.
pub fn print_table(rows: &[Row], baseline: &str) {
    println!(
        "{:<10} {:<7} {:>5} {:>10} {:>10} {:>10} {:>9} {:>7} {:>8} {:>8}",
        "variant", "op", "conc", "req/s", "p50", "p99", "bytes", "errors", "req/s ×", "p50 ×"
    );
    for row in rows {
        let base = rows
            .iter()
            .find(|b| b.variant == baseline && b.op == row.op && b.concurrency == row.concurrency);
        let (rps_ratio, p50_ratio) = match base {
            Some(b) => (
                ratio(row.requests_per_sec, b.requests_per_sec),
                ratio(row.p50_us as f64, b.p50_us as f64),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<10} {:<7} {:>5} {:>10.0} {:>10} {:>10} {:>9.0} {:>7} {:>8} {:>8}",
            row.variant,
            row.op,
            row.concurrency,
            row.requests_per_sec,
            micros(row.p50_us),
            micros(row.p99_us),
            row.mean_response_bytes,
            row.errors,
            rps_ratio,
            p50_ratio,
        );
    }
}

fn ratio(value: f64, base: f64) -> String {
    if base > 0.0 {
        format!("{:.2}", value / base)
    } else {
        "-".into()
    }
}

fn micros(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{us} µs")
    }
}

/// Prints `report` as JSON with `--json`, otherwise as the bench's table.
pub fn emit<T: Serialize>(json: bool, report: &T, table: impl FnOnce(&T)) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        table(report);
    }
    Ok(())
}

/// A progress bar over the cells of a bench, on stderr so `--json` stays clean.
pub fn progress(cells: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(cells);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} cells  {elapsed}  {msg}")
            .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Waits until a service under measurement answers `/readyz` with 200.
pub async fn wait_ready(base: &str) -> anyhow::Result<()> {
    for _ in 0..300 {
        if let Ok(response) = reqwest::get(format!("{base}/readyz")).await
            && response.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = reqwest::get(format!("{base}/readyz")).await?.text().await?;
    anyhow::bail!("{base} was not ready within 15 s: {body}")
}

/// One unlabelled value from a service's `/metrics`.
pub async fn metric(base: &str, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// A progress bar for benches that go through phases (connecting,
/// publishing, draining), each with its own length; on stderr.
pub fn phase_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:<32} {bar:30} {pos}/{len}  {elapsed}")
            .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
