//! `outbox api|relay|consumer`: one part of the outbox lab as its own
//! process (compose runs three), or `outbox all` for the three in one.

use clap::Parser;
use lab_core::config::{AmqpConfig, LogConfig, PostgresConfig};

#[derive(Parser)]
#[command(about = "Outbox: orders API on :8082, relay on :9082, consumer on :9083")]
struct Cli {
    /// Which part to run.
    #[arg(value_enum)]
    role: outbox::Role,
    #[command(flatten)]
    log: LogConfig,
    #[command(flatten)]
    postgres: PostgresConfig,
    #[command(flatten)]
    amqp: AmqpConfig,
    #[command(flatten)]
    settings: outbox::Settings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    lab_core::logging::init_tracing(&cli.log);
    let config = outbox::Config {
        database_url: cli.postgres.database_url,
        amqp_url: cli.amqp.amqp_url,
        settings: cli.settings,
        roles: vec![cli.role],
    };
    outbox::run(config, lab_core::shutdown::on_signal()).await
}
