//! `lab bench caching`: what a cache buys, side by side in one run.
//!
//! - `postgres`: a profile read that skips the cache (`?cache=skip`);
//! - `hit`: the same reads served from Redis;
//! - `miss`: first reads of profiles never read before (Redis, then
//!   Postgres, then a write back to Redis): the price of a cold cache.
//!
//! Then a stampede: two caching services are started in this process, one
//! with single-flight protection and one without, and N readers hit the same
//! cold key at once on each. It prints how many Postgres reads each caused.

use std::sync::Arc;

use anyhow::{Context, ensure};
use lab_core::config::{PostgresConfig, RedisConfig};
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{Load, Row, measure, print_table, progress};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The caching service's base URL.
    #[arg(long, default_value = "http://localhost:8081")]
    target: String,
    /// Profiles to read in the postgres and hit variants.
    #[arg(long, default_value_t = 100)]
    profiles: usize,
    /// Never-read profiles for the miss variant (one miss each).
    #[arg(long, env = "LAB_BENCH_FRESH", default_value_t = 2000)]
    fresh: usize,
    /// Concurrent readers of one cold key in the stampede run.
    #[arg(long, default_value_t = 200)]
    readers: usize,
    /// The stampede services use this database and Redis.
    #[command(flatten)]
    postgres: PostgresConfig,
    #[command(flatten)]
    redis: RedisConfig,
    #[command(flatten)]
    load: Load,
}

#[derive(Serialize)]
struct Report {
    reads: Vec<Row>,
    stampede: Vec<Stampede>,
}

#[derive(Serialize)]
struct Stampede {
    protection: &'static str,
    readers: usize,
    postgres_reads: u64,
}

async fn create_profiles(
    http: &reqwest::Client,
    target: &str,
    n: usize,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let created: Value = http
            .post(format!("{target}/profiles"))
            .json(&serde_json::json!({"name": format!("Bench reader {i}"), "email": "bench@example.com", "bio": "A profile made by lab bench caching."}))
            .send()
            .await
            .with_context(|| format!("the caching service is not reachable at {target}; start it with `cargo run -p lab -- up`"))?
            .error_for_status()?
            .json()
            .await?;
        ids.push(created["id"].as_str().context("no id")?.to_owned());
    }
    Ok(ids)
}

async fn read(http: &reqwest::Client, url: String, want: &str) -> anyhow::Result<usize> {
    let response = http.get(url).send().await?.error_for_status()?;
    let cache = response
        .headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let bytes = response.bytes().await?.len();
    ensure!(cache == want, "expected X-Cache: {want}, got {cache:?}");
    Ok(bytes)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1024)
        .build()?;
    let (warm, fresh) = prepare(&http, &args).await?;

    let cells = (3 * args.load.concurrency.len()) as u64 + 2;
    let bar = progress(cells);
    let mut rows = Vec::new();
    let mut fresh_used = 0;
    for &concurrency in &args.load.concurrency {
        for (variant, query, want) in [("postgres", "?cache=skip", "bypass"), ("hit", "", "hit")] {
            bar.set_message(format!("{variant} c={concurrency}"));
            rows.push(warm_reads(&args, &http, &warm, concurrency, (variant, query, want)).await?);
            bar.inc(1);
        }
        // Each miss needs a profile nobody has read: split the fresh ones.
        let share = args.fresh / args.load.concurrency.len();
        let ids: Arc<[String]> = fresh[fresh_used..fresh_used + share].into();
        fresh_used += share;
        bar.set_message(format!("miss c={concurrency}"));
        rows.push(first_reads(&args, &http, ids, concurrency).await?);
        bar.inc(1);
    }

    let mut stampedes = Vec::new();
    for protection in [caching::Switch::On, caching::Switch::Off] {
        bar.set_message(format!("stampede {protection:?}"));
        stampedes.push(stampede(&args, protection).await?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    report(&args, rows, stampedes)
}

/// Creates the warm profiles (and reads each once, so the cache holds
/// them) and the fresh ones, never read.
async fn prepare(
    http: &reqwest::Client,
    args: &Args,
) -> anyhow::Result<(Arc<[String]>, Arc<[String]>)> {
    eprintln!("creating {} + {} profiles…", args.profiles, args.fresh);
    let warm: Arc<[String]> = create_profiles(http, &args.target, args.profiles)
        .await?
        .into();
    let fresh: Arc<[String]> = create_profiles(http, &args.target, args.fresh)
        .await?
        .into();
    for id in warm.iter() {
        // Fill the cache for the hit variant.
        http.get(format!("{}/profiles/{id}", args.target))
            .send()
            .await?
            .error_for_status()?;
    }
    Ok((warm, fresh))
}

/// One cell of reads over the warm profiles: `query` picks the path, and
/// every answer must carry `X-Cache: want`.
async fn warm_reads(
    args: &Args,
    http: &reqwest::Client,
    warm: &Arc<[String]>,
    concurrency: usize,
    (variant, query, want): (&'static str, &'static str, &'static str),
) -> anyhow::Result<Row> {
    let (http, warm, target) = (http.clone(), warm.clone(), args.target.clone());
    measure(
        &args.load,
        concurrency,
        variant,
        "profile",
        move |worker, n| {
            let url = format!(
                "{target}/profiles/{}{query}",
                warm[(n as usize + worker) % warm.len()]
            );
            let http = http.clone();
            async move { read(&http, url, want).await }
        },
    )
    .await
}

/// The miss cell: one first read of each of `ids`, no warm-up.
async fn first_reads(
    args: &Args,
    http: &reqwest::Client,
    ids: Arc<[String]>,
    concurrency: usize,
) -> anyhow::Result<Row> {
    let once = Load {
        warmup: std::time::Duration::ZERO,
        requests: Some(ids.len() as u64),
        ..args.load.clone()
    };
    let (http, target) = (http.clone(), args.target.clone());
    measure(&once, concurrency, "miss", "profile", move |_, n| {
        let url = format!("{target}/profiles/{}", ids[n as usize]);
        let http = http.clone();
        async move { read(&http, url, "miss").await }
    })
    .await
}

/// Prints the table and the stampede lines (or JSON), and draws the plot.
fn report(args: &Args, rows: Vec<Row>, stampedes: Vec<Stampede>) -> anyhow::Result<()> {
    if args.load.json {
        let report = Report {
            reads: rows,
            stampede: stampedes,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print_table(&rows, "postgres");
    println!();
    for s in &stampedes {
        println!(
            "stampede: {} readers of one cold key, protection {:<3} -> {} Postgres read(s)",
            s.readers, s.protection, s.postgres_reads
        );
    }
    if let Some(path) = &args.load.plot {
        crate::plot::latency_by_concurrency(path, "caching: profile read latency", &rows)?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}

/// Starts a caching service in this process with its own key prefix, makes
/// `readers` concurrent first reads of one profile, and returns how many
/// Postgres reads that took.
async fn stampede(args: &Args, protection: caching::Switch) -> anyhow::Result<Stampede> {
    let shutdown = CancellationToken::new();
    let pool = lab_core::postgres::connect(&args.postgres.database_url, shutdown.clone())?;
    let redis = lab_core::redis::connect(&args.redis.redis_url)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let settings = caching::Settings {
        http_addr: "127.0.0.1:0".into(),
        key_prefix: format!("bench:stampede:{}:", uuid::Uuid::now_v7().simple()),
        stampede_protection: protection,
        ..caching::Settings::from_env()?
    };
    let server = tokio::spawn(caching::serve(
        listener,
        pool,
        redis,
        args.redis.redis_url.clone(),
        settings,
        shutdown.clone(),
    ));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.readers)
        .build()?;
    // Wait until it is ready (the database may need its migrations).
    for _ in 0..100 {
        if http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let id = create_profiles(&http, &base, 1).await?.remove(0);
    let before = postgres_reads(&http, &base).await?;
    let barrier = Arc::new(tokio::sync::Barrier::new(args.readers));
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..args.readers {
        let (http, url, barrier) = (
            http.clone(),
            format!("{base}/profiles/{id}"),
            barrier.clone(),
        );
        readers.spawn(async move {
            barrier.wait().await;
            http.get(url).send().await?.error_for_status()?;
            anyhow::Ok(())
        });
    }
    while let Some(done) = readers.join_next().await {
        done??;
    }
    let reads = postgres_reads(&http, &base).await? - before;
    shutdown.cancel();
    server.await??;
    Ok(Stampede {
        protection: match protection {
            caching::Switch::On => "on",
            caching::Switch::Off => "off",
        },
        readers: args.readers,
        postgres_reads: reads,
    })
}

async fn postgres_reads(http: &reqwest::Client, base: &str) -> anyhow::Result<u64> {
    let stats: Value = http
        .get(format!("{base}/stats"))
        .send()
        .await?
        .json()
        .await?;
    stats["postgres"]["reads"]
        .as_u64()
        .context("no postgres.reads in /stats")
}
