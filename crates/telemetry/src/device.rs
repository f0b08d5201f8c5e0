//! Simulated thermostats: the other end of the lab.
//!
//! Each device is its own MQTT 3.1.1 connection, as a real one would be. On
//! connect it publishes a retained `online` to its status topic, having left
//! the broker a last will that publishes a retained `lost` for it if it
//! vanishes without a goodbye; a goodbye says `offline` itself. Two words,
//! not one: "stopped" and "vanished" are different news (a will that said
//! `offline` too made a power cut print like a clean stop). It reports a reading every interval, with a
//! `seq` that rises by one. A command (`{"command_id","setpoint_c"}`) moves
//! its setpoint; its readings drift toward it, and it acknowledges on its
//! acks topic.
//!
//! The event loop runs in a task of its own and is never blocked: readings
//! are published from another task, and anything done in answer to an
//! incoming packet (a subscription, an ack) is spawned.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use lab_core::backoff::Backoff;
use rand::Rng;
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, Packet, QoS};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    Broker, Topics,
    payload::{Ack, Command, Reading},
};

/// One device to simulate.
#[derive(Debug, Clone)]
pub struct Spec {
    pub id: String,
    pub qos: QoS,
    /// Time between readings.
    pub interval: Duration,
    /// Stop (and say `offline`) after this many readings; `None` runs until stopped.
    pub readings: Option<u64>,
    /// Where the temperature starts.
    pub temperature_c: f64,
    /// The first reading's `seq`.
    pub first_seq: i64,
}

/// Counters shared by a fleet's devices.
#[derive(Debug, Default)]
pub struct Counters {
    pub published: AtomicU64,
    /// Devices connected right now.
    pub connected: AtomicU64,
    pub commands: AtomicU64,
}

/// How a device ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Says `offline` and disconnects cleanly.
    Goodbye,
    /// Drops its connection without a word: the broker publishes its last will.
    Vanish,
}

/// A running device; [`Device::stop`] or [`Device::vanish`] ends it.
pub struct Device {
    pub id: String,
    stop: CancellationToken,
    ending: Arc<Mutex<Ending>>,
    task: JoinHandle<()>,
}

impl Device {
    /// Starts a device; it stops when [`Device::stop`] is called or when
    /// `parent` is cancelled.
    pub fn start(
        broker: &Broker,
        topics: &Topics,
        spec: Spec,
        counters: Arc<Counters>,
        parent: &CancellationToken,
    ) -> Self {
        let stop = parent.child_token();
        let ending = Arc::new(Mutex::new(Ending::Goodbye));
        let id = spec.id.clone();
        let task = tokio::spawn(run(
            broker.clone(),
            topics.clone(),
            spec,
            counters,
            stop.clone(),
            ending.clone(),
        ));
        Self {
            id,
            stop,
            ending,
            task,
        }
    }

    /// Says `offline`, disconnects, and waits for it.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }

    /// Drops the connection without a DISCONNECT, as a device losing power
    /// would.
    pub async fn vanish(self) {
        *self.ending.lock().expect("ending lock") = Ending::Vanish;
        self.stop.cancel();
        let _ = self.task.await;
    }

    /// Waits until the device has ended: after its readings (when it has a
    /// count), or once stopped.
    pub async fn finished(self) {
        let _ = self.task.await;
    }
}

async fn run(
    broker: Broker,
    topics: Topics,
    spec: Spec,
    counters: Arc<Counters>,
    stop: CancellationToken,
    ending: Arc<Mutex<Ending>>,
) {
    let status = topics.status(&spec.id);
    let (client, eventloop) = connect(&broker, &spec.id, &status);
    let events = Events {
        client: client.clone(),
        topics: topics.clone(),
        id: spec.id.clone(),
        counters: counters.clone(),
        setpoint: Arc::new(Mutex::new(21.0_f64)),
    };
    let setpoint = events.setpoint.clone();
    let poll = tokio::spawn(events.poll(eventloop));
    send_readings(&client, &topics, &spec, &counters, &setpoint, &stop).await;
    let ending = *ending.lock().expect("ending lock");
    end(ending, &client, status, poll).await;
}

/// The device's MQTT client, with its last will: a retained `lost` on its
/// status topic.
fn connect(broker: &Broker, id: &str, status: &str) -> (AsyncClient, EventLoop) {
    let mut options = broker.v4_options(id);
    options.set_last_will(LastWill::new(status, "lost", QoS::AtLeastOnce, true));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    (client, eventloop)
}

/// What the event loop's task needs to answer incoming packets.
struct Events {
    client: AsyncClient,
    topics: Topics,
    id: String,
    counters: Arc<Counters>,
    /// Where commands move the temperature to; readings drift toward it.
    setpoint: Arc<Mutex<f64>>,
}

impl Events {
    /// Polls the event loop until the device disconnects, reconnecting with
    /// backoff after a failure (rumqttc reconnects on the next poll).
    async fn poll(self, mut eventloop: EventLoop) {
        let mut backoff = Backoff::reconnect();
        let mut connected = false;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff.reset();
                    if !connected {
                        connected = true;
                        self.counters.connected.fetch_add(1, Ordering::Relaxed);
                    }
                    self.on_connected();
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => self.on_command(&publish.payload),
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                    if connected {
                        self.counters.connected.fetch_sub(1, Ordering::Relaxed);
                    }
                    drain(&mut eventloop).await;
                    break;
                }
                Ok(_) => {}
                Err(err) => {
                    if connected {
                        connected = false;
                        self.counters.connected.fetch_sub(1, Ordering::Relaxed);
                    }
                    tracing::debug!(device = %self.id, %err, "device connection failed");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    /// Says `online` and subscribes to its commands, on every connect: the
    /// session is not kept, so neither is the subscription.
    fn on_connected(&self) {
        let (client, status, commands) = (
            self.client.clone(),
            self.topics.status(&self.id),
            self.topics.commands(&self.id),
        );
        tokio::spawn(async move {
            let _ = client
                .publish(status, QoS::AtLeastOnce, true, "online")
                .await;
            let _ = client.subscribe(commands, QoS::AtLeastOnce).await;
        });
    }

    /// Moves the setpoint and acknowledges, from a task of its own.
    fn on_command(&self, payload: &[u8]) {
        let Ok(command) = serde_json::from_slice::<Command>(payload) else {
            tracing::warn!(device = %self.id, "ignoring a malformed command");
            return;
        };
        *self.setpoint.lock().expect("setpoint lock") = command.setpoint_c;
        self.counters.commands.fetch_add(1, Ordering::Relaxed);
        let ack = Ack {
            command_id: command.command_id,
            device_id: self.id.clone(),
            setpoint_c: command.setpoint_c,
        };
        let (client, topic) = (self.client.clone(), self.topics.acks(&self.id));
        tokio::spawn(async move {
            let payload = serde_json::to_vec(&ack).expect("acks serialise");
            let _ = client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await;
        });
    }
}

/// After the DISCONNECT, reads until the broker closes the connection (1 s
/// at most). Dropped at once, the socket still held unread bytes (the
/// PUBACK of the goodbye `offline`), and a socket closed with unread bytes
/// is reset, not closed: the broker took the reset for a device that
/// vanished and published its will, `lost`, over the goodbye (every
/// simulated device's clean stop did this, unseen while the will said
/// `offline` too).
async fn drain(eventloop: &mut EventLoop) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

/// Publishes a reading every interval until the count is reached, the
/// device is stopped, or the client is gone.
async fn send_readings(
    client: &AsyncClient,
    topics: &Topics,
    spec: &Spec,
    counters: &Counters,
    setpoint: &Mutex<f64>,
    stop: &CancellationToken,
) {
    let mut temperature = spec.temperature_c;
    let mut battery = 100.0_f64;
    let mut tick = tokio::time::interval(spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent = 0u64;
    loop {
        if spec.readings.is_some_and(|n| sent >= n) {
            break;
        }
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        let seq = spec.first_seq + sent as i64;
        sent += 1;
        let target = *setpoint.lock().expect("setpoint lock");
        let noise: f64 = rand::rng().random_range(-0.1..0.1);
        temperature += (target - temperature) * 0.2 + noise;
        battery = (battery - 0.01).max(0.0);
        let reading = Reading {
            device_id: spec.id.clone(),
            seq,
            ts: chrono::Utc::now(),
            temperature_c: (temperature * 100.0).round() / 100.0,
            humidity_pct: 40.0 + rand::rng().random_range(-2.0..2.0),
            battery_pct: (battery * 100.0).round() / 100.0,
        };
        let payload = serde_json::to_vec(&reading).expect("readings serialise");
        if client
            .publish(topics.telemetry(&spec.id), spec.qos, false, payload)
            .await
            .is_err()
        {
            break;
        }
        counters.published.fetch_add(1, Ordering::Relaxed);
    }
}

/// Ends the device: a goodbye (`offline`, then DISCONNECT), or vanishing,
/// which leaves the broker to publish the last will.
async fn end(ending: Ending, client: &AsyncClient, status: String, poll: JoinHandle<()>) {
    match ending {
        Ending::Vanish => poll.abort(),
        Ending::Goodbye => {
            // A clean DISCONNECT discards the will, so say it ourselves.
            let _ = client
                .publish(status, QoS::AtLeastOnce, true, "offline")
                .await;
            let _ = client.disconnect().await;
            // The poll task sends what is queued, then the DISCONNECT.
            let abort = poll.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), poll)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}
