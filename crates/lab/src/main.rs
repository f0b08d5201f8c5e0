//! `lab`: the one command a workshop needs.
//!
//! - `lab up` runs the lab services natively, each on its default port.
//! - `lab bench <lab>` measures a running lab and prints ratios side by side.
//! - `lab chaos <lab>` breaks something on purpose and counts what survived.
//! - `lab doctor` checks what a lab needs and says what to fix.
//! - `lab reset` empties a lab's tables, keys and queues for a clean start.
//! - `lab watch <lab>` prints a lab's key counters as a live table.
//! - `lab sim devices` runs a fleet of simulated thermostats.

mod bench;
mod broker;
mod chaos;
mod doctor;
mod labs;
mod plot;
mod reset;
mod scratch;
mod sim;
mod up;
mod watch;

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
    /// Run the telemetry lab's own Mosquitto (its config, its logins) on a
    /// port of its own, to stop, kill and restart.
    Broker(broker::Broker),
    /// Break something on purpose and count what survived.
    #[command(subcommand)]
    Chaos(chaos::Chaos),
    /// Check the backing services and the lab ports, and say what to fix.
    Doctor(doctor::Doctor),
    /// Empty a lab's tables, Redis keys and queues (the lab must be stopped).
    Reset(reset::Reset),
    /// Follow a running lab's key counters, one row per second.
    Watch(watch::Watch),
    /// Drive a lab with simulated clients.
    #[command(subcommand)]
    Sim(sim::Sim),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    if matches!(cli.command, Command::Chaos(_) | Command::Bench(_))
        && std::env::var_os("RUST_LOG").is_none()
    {
        // Experiments break connections on purpose; the services inside them
        // would log every failure. The report is the output; RUST_LOG=info
        // brings the logs back.
        cli.log.filter = "error,lapin=off,outbox=off".into();
    }
    lab_core::logging::init_tracing(&cli.log);
    match cli.command {
        Command::Up(up) => up::run(up).await,
        Command::Bench(bench) => bench.run().await,
        Command::Broker(broker) => broker::run(broker).await,
        Command::Chaos(chaos) => chaos.run().await,
        Command::Doctor(doctor) => doctor::run(doctor).await,
        Command::Reset(reset) => reset::run(reset).await,
        Command::Sim(sim) => sim.run().await,
        Command::Watch(watch) => watch::run(watch).await,
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser, error::ErrorKind};

    /// Labs flatten their settings into `lab up` and `lab doctor` side by
    /// side; building every subcommand here, rather than at a user's first
    /// run, is what catches two settings with the same name.
    #[test]
    fn every_lab_setting_has_its_own_name() {
        super::Cli::command().debug_assert();
        let mut paths: Vec<Vec<String>> = Vec::new();
        for sub in super::Cli::command().get_subcommands() {
            let name = sub.get_name().to_owned();
            paths.push(vec![name.clone()]);
            for nested in sub.get_subcommands() {
                paths.push(vec![name.clone(), nested.get_name().to_owned()]);
            }
        }
        assert!(paths.len() >= 4, "{paths:?}");
        for path in paths {
            let args = ["lab".to_owned()]
                .into_iter()
                .chain(path.clone())
                .chain(["--help".to_owned()]);
            let err = match super::Cli::try_parse_from(args) {
                Err(err) => err,
                Ok(_) => panic!("`lab {} --help` parsed as a command", path.join(" ")),
            };
            assert!(
                matches!(
                    err.kind(),
                    ErrorKind::DisplayHelp | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                ),
                "lab {}: {err}",
                path.join(" ")
            );
        }
    }
}
