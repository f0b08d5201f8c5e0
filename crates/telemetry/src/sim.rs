//! `lab sim devices`: a fleet of simulated thermostats, as a service.
//!
//! Compose runs it next to the ingest so the dashboard has something to
//! show; tests and `lab bench telemetry` start devices directly. It serves
//! `/healthz`, `/readyz` (every device has connected) and `/metrics`.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use axum::Router;
use lab_core::{
    http::{Dependency, bind},
    metrics::Metrics,
};
use prometheus_client::metrics::gauge::Gauge;
use rumqttc::QoS;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    Broker, Topics,
    device::{Counters, Device, Spec},
};

#[derive(clap::Args, Debug, Clone)]
#[group(id = "sim_settings")]
pub struct SimSettings {
    /// Health and metrics listen address.
    #[arg(
        id = "sim_http_addr",
        long = "sim-http-addr",
        env = "SIM_HTTP_ADDR",
        default_value = "0.0.0.0:9084"
    )]
    pub http_addr: String,
    /// How many devices.
    #[arg(
        id = "sim_devices",
        long = "devices",
        env = "SIM_DEVICES",
        default_value_t = 10
    )]
    pub devices: usize,
    /// Readings per second, per device.
    #[arg(
        id = "sim_rate",
        long = "rate",
        env = "SIM_RATE",
        default_value_t = 1.0
    )]
    pub rate: f64,
    /// QoS of the readings: 0 or 1.
    #[arg(
        id = "sim_qos",
        long = "qos",
        env = "SIM_QOS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u8).range(0..=1)
    )]
    pub qos: u8,
    /// Device ids are this followed by a number: thermo-0001, thermo-0002, …
    #[arg(
        id = "sim_id_prefix",
        long = "id-prefix",
        env = "SIM_ID_PREFIX",
        default_value = "thermo-"
    )]
    pub id_prefix: String,
    /// Each device stops after this many readings; 0 runs until stopped.
    #[arg(
        id = "sim_readings",
        long = "readings",
        env = "SIM_READINGS",
        default_value_t = 0
    )]
    pub readings: u64,
    /// Prepended to every topic (the ingest's TELEMETRY_TOPIC_PREFIX).
    #[arg(
        id = "sim_topic_prefix",
        long = "topic-prefix",
        env = "TELEMETRY_TOPIC_PREFIX",
        default_value = ""
    )]
    pub topic_prefix: String,
}

/// Runs the fleet until `shutdown` fires, or until every device has sent
/// its `--readings`.
pub async fn run(
    mqtt_url: &str,
    settings: SimSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(settings.rate > 0.0, "--rate must be positive");
    anyhow::ensure!(settings.devices > 0, "--devices must be at least 1");
    let broker = Broker::parse(mqtt_url)?;
    let topics = Topics::new(&settings.topic_prefix);
    let listener = bind(&settings.http_addr, "SIM_HTTP_ADDR").await?;
    tracing::info!(http = %listener.local_addr()?, devices = settings.devices, broker = %broker.place(), "device simulator");

    let counters = Arc::new(Counters::default());
    let (router, connected) = health_router(&counters, settings.devices as u64, broker.place());
    let http_stop = shutdown.child_token();
    let http = tokio::spawn(lab_core::http::serve(listener, router, http_stop.clone()));
    let devices = start_fleet(&broker, &topics, &settings, &counters, &shutdown).await;
    let gauge = mirror_connected(counters.clone(), connected);

    // Devices with a count end by themselves; shutdown ends the others
    // (their tokens are children of `shutdown`).
    futures::future::join_all(devices.into_iter().map(Device::finished)).await;
    gauge.abort();
    http_stop.cancel();
    http.await??;
    tracing::info!(
        published = counters.published.load(Ordering::Relaxed),
        "device simulator stopped"
    );
    Ok(())
}

/// `/healthz`, `/readyz` (ready once `wanted` devices are connected to the
/// broker at `place`) and `/metrics`, with the gauge of connected devices.
fn health_router(counters: &Arc<Counters>, wanted: u64, place: String) -> (Router, Gauge) {
    let metrics = Metrics::new("sim");
    let connected: Gauge = Gauge::default();
    metrics.register(
        "devices_connected",
        "Connections made by the fleet's devices",
        connected.clone(),
    );
    let mosquitto = {
        let counters = counters.clone();
        Dependency::new("mosquitto", move || {
            let n = counters.connected.load(Ordering::Relaxed);
            let result = if n >= wanted {
                Ok(())
            } else {
                Err(format!("{n} of {wanted} devices connected to {place}"))
            };
            async move { result }
        })
    };
    let router = lab_core::http::service_router(Router::new(), vec![mosquitto], metrics);
    (router, connected)
}

/// Starts every device, a few at a time.
async fn start_fleet(
    broker: &Broker,
    topics: &Topics,
    settings: &SimSettings,
    counters: &Arc<Counters>,
    shutdown: &CancellationToken,
) -> Vec<Device> {
    let interval = Duration::from_secs_f64(1.0 / settings.rate);
    // A real device keeps its counter across restarts (in flash). These
    // start from the clock instead, in milliseconds: a restarted fleet
    // carries on above its last run's seqs (below 1,000 readings/s), rather
    // than repeating them and being dropped as duplicates.
    let first_seq = chrono::Utc::now().timestamp_millis();
    let mut devices = Vec::new();
    for n in 1..=settings.devices {
        let spec = Spec {
            id: format!("{}{n:04}", settings.id_prefix),
            qos: if settings.qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            },
            interval,
            readings: (settings.readings > 0).then_some(settings.readings),
            temperature_c: 18.0 + (n % 7) as f64,
            first_seq,
        };
        devices.push(Device::start(
            broker,
            topics,
            spec,
            counters.clone(),
            shutdown,
        ));
        // A thousand devices do not all connect in the same millisecond.
        if n % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    devices
}

/// Copies the fleet's connected count into the gauge twice a second, until
/// aborted.
fn mirror_connected(counters: Arc<Counters>, connected: Gauge) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            connected.set(counters.connected.load(Ordering::Relaxed) as i64);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}
