//! `caching`: the caching lab as its own process (compose runs it this way).

use clap::Parser;
use lab_core::config::{LogConfig, PostgresConfig, RedisConfig};

#[derive(Parser)]
#[command(about = "Caching: cache-aside, write-through and write-behind on :8081")]
struct Cli {
    #[command(flatten)]
    log: LogConfig,
    #[command(flatten)]
    postgres: PostgresConfig,
    #[command(flatten)]
    redis: RedisConfig,
    #[command(flatten)]
    settings: caching::Settings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    lab_core::logging::init_tracing(&cli.log);
    let config = caching::Config {
        database_url: cli.postgres.database_url,
        redis_url: cli.redis.redis_url,
        settings: cli.settings,
    };
    caching::run(config, lab_core::shutdown::on_signal()).await
}
