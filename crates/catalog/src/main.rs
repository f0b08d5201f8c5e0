//! `catalog`: the REST vs gRPC lab as its own process (compose runs it this way).

use clap::Parser;
use lab_core::config::{LogConfig, PostgresConfig};

#[derive(Parser)]
#[command(about = "REST vs gRPC: the product catalog on :8080 (REST) and :50051 (gRPC)")]
struct Cli {
    #[command(flatten)]
    log: LogConfig,
    #[command(flatten)]
    postgres: PostgresConfig,
    #[command(flatten)]
    settings: catalog::Settings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    lab_core::logging::init_tracing(&cli.log);
    let config = catalog::Config {
        database_url: cli.postgres.database_url,
        settings: cli.settings,
    };
    catalog::run(config, lab_core::shutdown::on_signal()).await
}
