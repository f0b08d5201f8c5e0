//! `lab chaos …`: break something on purpose and count what survived.

use std::time::Duration;

use clap::Subcommand;
use lab_core::config::{AmqpConfig, PostgresConfig};
use outbox::chaos::{Progress, Report, Scenario};

#[derive(Subcommand)]
pub enum Chaos {
    /// Cut RabbitMQ under the dual-write and outbox paths; count lost events.
    Outbox(OutboxArgs),
}

impl Chaos {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Chaos::Outbox(args) => outbox(args).await,
        }
    }
}

#[derive(clap::Args)]
pub struct OutboxArgs {
    /// Orders to create, half through each path.
    #[arg(long, env = "LAB_CHAOS_ORDERS", default_value_t = 10_000)]
    orders: usize,
    /// Orders per second.
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// How many times the broker connection is cut.
    #[arg(long, default_value_t = 3)]
    cuts: usize,
    /// How long each cut lasts (e.g. 2s, 500ms).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    outage: Duration,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// The experiment gets its own database, `lab_chaos_outbox`, on this server.
    #[command(flatten)]
    postgres: PostgresConfig,
    #[command(flatten)]
    amqp: AmqpConfig,
}

async fn outbox(args: OutboxArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.orders >= 2, "--orders must be at least 2");
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    let stop = tokio_util::sync::CancellationToken::new();
    let scratch =
        crate::scratch::database(&args.postgres.database_url, "lab_chaos_outbox", &stop).await?;
    let pool = scratch.pool.clone();
    // Its own exchange and queue: a running `lab up` sees none of this.
    let settings = outbox::Settings {
        exchange: "lab.chaos.events".into(),
        queue: "lab.chaos.notifications".into(),
        relay_poll_interval_ms: 200,
        relay_lease_retry_ms: 200,
        ..outbox::Settings::from_env()?
    };
    let scenario = Scenario {
        orders: args.orders,
        rate: args.rate,
        cuts: args.cuts,
        outage: args.outage,
        settle_timeout: Duration::from_secs(60),
    };
    let bar = indicatif::ProgressBar::new(args.orders as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} orders  {elapsed}  {msg}")
            .expect("valid template"),
    );
    let report =
        outbox::chaos::run(
            pool,
            &args.amqp.amqp_url,
            settings.clone(),
            scenario,
            |p| match p {
                Progress::Created(n) => bar.set_position(n as u64),
                Progress::Cut(n) => bar.set_message(format!("broker cut ({n}/{})", args.cuts)),
                Progress::Restored(n) => {
                    bar.set_message(format!("broker back ({n}/{})", args.cuts))
                }
                Progress::Settling { pending } => {
                    bar.set_message(format!("settling: {pending} events pending in the outbox"))
                }
            },
        )
        .await;
    bar.finish_and_clear();
    clean_up(&args.amqp.amqp_url, &settings).await;
    stop.cancel();
    let report = report?;

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    let outbox = report.path("outbox");
    anyhow::ensure!(
        outbox.lost == 0,
        "the outbox path lost {} events: that is a bug, not the lesson",
        outbox.lost
    );
    Ok(())
}

fn print_report(report: &Report) {
    println!(
        "{} orders, {} broker cuts of {} ms, {:.1} s",
        report.paths.iter().map(|p| p.committed).sum::<i64>(),
        report.cuts,
        report.outage_ms,
        report.elapsed_ms as f64 / 1000.0
    );
    println!(
        "{:<12}{:>10}{:>11}{:>7}{:>12}",
        "path", "committed", "delivered", "lost", "duplicates"
    );
    for p in &report.paths {
        println!(
            "{:<12}{:>10}{:>11}{:>7}{:>12}",
            p.path, p.committed, p.delivered, p.lost, p.duplicates_suppressed
        );
    }
    println!("(duplicates: redeliveries the consumer recognised and did not act on)");
}

pub async fn clean_up(amqp_url: &str, settings: &outbox::Settings) {
    let Ok(connection) = lab_core::amqp::connect(amqp_url, "lab-chaos-cleanup").await else {
        return;
    };
    if let Ok(channel) = connection.create_channel().await {
        let _ =
            outbox::events::delete_topology(&channel, &settings.exchange, &settings.queue).await;
    }
    lab_core::amqp::close(&connection, "chaos done").await;
}
