//! `lab`: the one command a workshop needs.
//!
//! - `lab up` runs the lab services natively, each on its default port.
//! - `lab bench <lab>` measures a running lab and prints ratios side by side.
//! - `lab doctor` checks what a lab needs and says what to fix.

mod bench;
mod doctor;
mod up;

use clap::{Parser, Subcommand};
use lab_core::config::LogConfig;

#[derive(Parser)]
#[command(
    name = "lab",
    version,
    about = "System Design Lab: run, measure and break small real services"
)]
struct Cli {
    #[command(flatten)]
    log: LogConfig,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the lab services in this process until Ctrl-C.
    Up(up::Up),
    /// Measure a running lab.
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Check the backing services and the lab ports, and say what to fix.
    Doctor(doctor::Doctor),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    lab_core::telemetry::init_tracing(&cli.log);
    match cli.command {
        Command::Up(up) => up::run(up).await,
        Command::Bench(bench) => bench.run().await,
        Command::Doctor(doctor) => doctor::run(doctor).await,
    }
}
