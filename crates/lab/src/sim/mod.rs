//! `lab sim …`: simulated clients that drive a lab.

mod chat;

use clap::{Args, Subcommand};
use lab_core::config::MqttConfig;

#[derive(Subcommand)]
pub enum Sim {
    /// Simulated thermostats publishing to the telemetry lab's broker until Ctrl-C.
    Devices(Devices),
    /// A busy room on the running chat lab; `--slow-reader` adds a member
    /// who stops reading, and says how the server cut it.
    Chat(chat::ChatSim),
}

#[derive(Args)]
pub struct Devices {
    #[command(flatten)]
    mqtt: MqttConfig,
    #[command(flatten)]
    settings: telemetry::sim::SimSettings,
}

impl Sim {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Sim::Devices(args) => {
                let shutdown = lab_core::shutdown::on_signal();
                telemetry::sim::run(&args.mqtt.mqtt_url, args.settings, shutdown).await
            }
            Sim::Chat(args) => chat::run(args).await,
        }
    }
}
