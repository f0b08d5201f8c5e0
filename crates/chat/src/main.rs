//! `chat`: one chat instance as its own process (compose runs two).

use clap::Parser;
use lab_core::config::{LogConfig, RedisConfig};

#[derive(Parser)]
#[command(about = "Chat: WebSocket rooms on :8083, shared across instances through Redis")]
struct Cli {
    #[command(flatten)]
    log: LogConfig,
    #[command(flatten)]
    redis: RedisConfig,
    #[command(flatten)]
    settings: chat::Settings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    lab_core::logging::init_tracing(&cli.log);
    let config = chat::Config {
        redis_url: cli.redis.redis_url,
        settings: cli.settings,
    };
    chat::run(config, lab_core::shutdown::on_signal()).await
}
