//! `telemetry`: the ingest service as its own process (compose runs two).

use clap::Parser;
use lab_core::config::{LogConfig, MqttConfig, PostgresConfig};

#[derive(Parser)]
#[command(about = "Telemetry ingest: MQTT readings into Postgres, REST and a dashboard on :8084")]
struct Cli {
    #[command(flatten)]
    log: LogConfig,
    #[command(flatten)]
    postgres: PostgresConfig,
    #[command(flatten)]
    mqtt: MqttConfig,
    #[command(flatten)]
    settings: telemetry::Settings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    lab_core::logging::init_tracing(&cli.log);
    let config = telemetry::Config {
        database_url: cli.postgres.database_url,
        mqtt_url: cli.mqtt.mqtt_url,
        settings: cli.settings,
    };
    telemetry::run(config, lab_core::shutdown::on_signal()).await
}
