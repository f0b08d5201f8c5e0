//! `lab broker`: the telemetry lab's own Mosquitto, run natively in the
//! foreground, for the exercises that stop, kill or restart a broker.
//!
//! The machine's Mosquitto on 1883 serves every lab and every test, and
//! runs with a package's defaults. This one runs the lab's configuration
//! (`deploy/mosquitto/mosquitto.conf`, as compose does: logins, ACL, a
//! queue of 100,000 per client, a snapshot every 2 s) on a port of its
//! own, so it can be broken without breaking anything else. Ctrl-C stops it
//! cleanly (it saves its sessions first); `kill -9` on the `mosquitto` it
//! names is the crash; `--persistence off` or `--fresh` starts it with no
//! memory of earlier sessions.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use lab_core::config::Switch;
use nix::{sys::signal, unistd::Pid};
use telemetry::broker::LabBroker;

#[derive(Args)]
pub struct Broker {
    /// The port to listen on, at 127.0.0.1.
    #[arg(long, default_value_t = 1885)]
    port: u16,
    /// `off` keeps nothing across a restart: every session, subscription
    /// and queued message is gone when the broker comes back.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    persistence: Switch,
    /// Forget what an earlier run saved before starting.
    #[arg(long)]
    fresh: bool,
    /// Where the config and the saved sessions live (default: a folder per
    /// user and port in the temporary directory, kept between runs).
    #[arg(long)]
    dir: Option<PathBuf>,
}

pub async fn run(args: Broker) -> anyhow::Result<()> {
    let dir = args.dir.unwrap_or_else(|| {
        let user = nix::unistd::getuid();
        std::env::temp_dir().join(format!("lab-broker-{user}-{}", args.port))
    });
    let mut broker = LabBroker::new(dir, args.port);
    broker.persistence = args.persistence;
    if let Err(err) = std::net::TcpListener::bind(("127.0.0.1", args.port)) {
        bail!(
            "cannot listen on 127.0.0.1:{} ({err}): is a `lab broker` already running? \
             Choose another port with --port",
            args.port
        );
    }
    if args.fresh || broker.persistence == Switch::Off {
        broker
            .forget()
            .context("cannot empty the broker's data folder")?;
    }
    let command = broker
        .command()
        .with_context(|| format!("cannot start mosquitto from {}", broker.dir.display()))?;
    // Listening before mosquitto runs: a SIGTERM from now on stops both.
    let shutdown = lab_core::shutdown::on_signal();
    let mut child = tokio::process::Command::from(command)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start mosquitto")?;
    let pid = child.id().context("mosquitto exited at once")?;
    print_banner(&broker, pid);
    tokio::select! {
        status = child.wait() => {
            let status = status?;
            // Ctrl-C in a terminal reaches mosquitto too, which may stop
            // (cleanly, exit 0) before this process sees the signal.
            if status.success() {
                println!("mosquitto stopped ({status})");
                return Ok(());
            }
            bail!(
                "mosquitto exited ({status}). Run the same command to start it again: it comes \
                 back with what it last saved"
            )
        }
        () = shutdown.cancelled() => {}
    }
    // A SIGTERM sent to this process only does not reach mosquitto: pass
    // it on. Either way mosquitto saves its sessions and exits.
    let _ = signal::kill(Pid::from_raw(pid as i32), signal::Signal::SIGTERM);
    let status = child.wait().await?;
    println!("mosquitto stopped ({status})");
    Ok(())
}

fn print_banner(broker: &LabBroker, pid: u32) {
    let ingest = broker.url("ingest").unwrap_or_default();
    let device = broker.url("device").unwrap_or_default();
    let persistence = match broker.persistence {
        Switch::On => format!(
            "saved every 2 s and on a clean stop, in {}",
            broker.dir.join("data").display()
        ),
        Switch::Off => "off: a restart forgets every session".to_owned(),
    };
    println!(
        "The lab's broker listens on 127.0.0.1:{port} (mosquitto, pid {pid}); sessions {persistence}.\n\
         Point the lab and its devices at it:\n\
         \x20   MQTT_URL={ingest} cargo run -p lab -- up --only telemetry\n\
         \x20   MQTT_URL={device} cargo run -p lab -- sim devices\n\
         Watch it: mosquitto_sub -p {port} -u ingest -P ingest-secret -t 'devices/+/status' -v\n\
         Crash it: kill -9 {pid}   Stop it cleanly: Ctrl-C",
        port = broker.port,
    );
}
