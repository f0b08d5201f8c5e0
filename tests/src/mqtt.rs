//! MQTT for the telemetry tests: the shared broker, a private Mosquitto
//! run from the lab's own config, a bare client that publishes what the
//! test says and collects what arrives, and a device that knows which of
//! its readings the broker acknowledged.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use rumqttc::{
    ConnectReturnCode, Packet, QoS,
    mqttbytes::{Error as FrameError, v4::Connect, v4::Publish},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};
use tokio_util::bytes::BytesMut;

use crate::common::closed_port;

/// The MQTT broker the tests use: `MQTT_URL`, or the lab's default.
pub fn mqtt_url() -> String {
    std::env::var("MQTT_URL").unwrap_or_else(|_| lab_core::config::DEFAULT_MQTT_URL.to_owned())
}

/// A topic prefix no other test uses.
pub fn unique_topic_prefix() -> String {
    format!("test/{}/", uuid::Uuid::now_v7().simple())
}

/// Fails the test, saying how to start Mosquitto, when `url` does not answer.
pub async fn require_broker(url: &str) {
    let broker = telemetry::Broker::parse(url).unwrap();
    let addr = (broker.host.as_str(), broker.port);
    if let Err(err) = tokio::net::TcpStream::connect(addr).await {
        panic!("{}", broker.describe(&err));
    }
}

/// A Mosquitto of the test's own, run from the lab's config file
/// (`deploy/mosquitto/mosquitto.conf`: logins, ACL, raised queue,
/// persistence) on a free port. For what the shared broker must not see
/// or cannot do: the ACL, more than 1000 queued messages for one client,
/// a broker restart.
pub struct PrivateBroker {
    pub port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl PrivateBroker {
    pub async fn start() -> Self {
        let port = closed_port().await;
        let dir =
            std::env::temp_dir().join(format!("lab-mosquitto-{}", uuid::Uuid::now_v7().simple()));
        let mut broker = Self {
            port,
            dir,
            child: None,
        };
        broker.spawn().await;
        broker
    }

    async fn spawn(&mut self) {
        let mut lab_broker = telemetry::broker::LabBroker::new(&self.dir, self.port);
        // `snapshot()` waits for a save by its log line, at `information`.
        lab_broker.extra = "log_type information\n".into();
        let mut command = lab_broker
            .command()
            .unwrap_or_else(|err| panic!("cannot start mosquitto: {err}"));
        // Appended to: a restarted broker's log follows the killed one's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("mosquitto.log"))
            .unwrap();
        let child = command
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start mosquitto: {err}"));
        self.child = Some(child);
        if telemetry::broker::listening(self.port, Duration::from_secs(5)).await {
            return;
        }
        panic!(
            "the private mosquitto did not listen on {} within 5 s; its log:\n{}",
            self.port,
            std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
        );
    }

    /// `mqtt://user:password@127.0.0.1:<port>` for one of the lab's logins.
    pub fn url(&self, user: &str) -> String {
        telemetry::broker::LabBroker::new(&self.dir, self.port)
            .url(user)
            .unwrap_or_else(|| panic!("the lab's broker has no login {user:?}"))
    }

    pub fn anonymous_url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the broker and starts a fresh one on the same port, with
    /// nothing persisted: every session, and every subscription, is gone.
    pub async fn restart_empty(&mut self) {
        self.kill();
        telemetry::broker::LabBroker::new(&self.dir, self.port)
            .forget()
            .unwrap();
        self.spawn().await;
    }

    /// Kills the broker (SIGKILL: no last save, no goodbye to anyone),
    /// waits `down`, and starts it again on the same port from what it had
    /// saved in its data directory.
    pub async fn kill_and_restart(&mut self, down: Duration) {
        self.kill();
        tokio::time::sleep(down).await;
        self.spawn().await;
    }

    /// Waits (5 s at most) for the broker to write its next snapshot, so
    /// that what it holds now (sessions, subscriptions, queues) survives a
    /// kill, as it has long since for a broker that has run a while.
    pub async fn snapshot(&self) {
        let saves = || self.log().matches("Saving in-memory database").count();
        let before = saves();
        for _ in 0..100 {
            if saves() > before {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no snapshot within 5 s; the log:\n{}", self.log());
    }

    /// What the broker logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A bare MQTT 3.1.1 client for a test: publish what the test says, and
/// collect what arrives on its subscriptions.
pub struct MqttClient {
    pub client: rumqttc::AsyncClient,
    pub received: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>, bool)>,
    subacks: tokio::sync::mpsc::UnboundedReceiver<()>,
    task: JoinHandle<()>,
}

impl MqttClient {
    /// Connects as `client_id` and waits for the broker's answer.
    pub async fn connect(url: &str, client_id: &str) -> Self {
        let broker = telemetry::Broker::parse(url).unwrap();
        let (client, mut eventloop) = rumqttc::AsyncClient::new(broker.v4_options(client_id), 1000);
        let (tx, received) = tokio::sync::mpsc::unbounded_channel();
        let (suback_tx, subacks) = tokio::sync::mpsc::unbounded_channel();
        let (connected_tx, connected) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut connected_tx = Some(connected_tx);
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        if let Some(tx) = connected_tx.take() {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let topic = p.topic.clone();
                        let _ = tx.send((topic, p.payload.to_vec(), p.retain));
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = suback_tx.send(());
                    }
                    Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(err) => {
                        if let Some(tx) = connected_tx.take() {
                            let _ = tx.send(Err(err.to_string()));
                            return;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        });
        match tokio::time::timeout(std::time::Duration::from_secs(5), connected).await {
            Ok(Ok(Ok(()))) => Self {
                client,
                received,
                subacks,
                task,
            },
            other => panic!(
                "MQTT client {client_id} could not connect to {}: {other:?}",
                broker.place()
            ),
        }
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, qos: rumqttc::QoS) {
        self.client
            .publish(topic, qos, false, payload.into())
            .await
            .unwrap();
    }

    /// Subscribes and waits for the broker's SubAck.
    pub async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), self.subacks.recv())
            .await
            .unwrap_or_else(|_| panic!("no SubAck for {filter} within 5 s"));
    }

    /// The next message, within `limit`.
    pub async fn next(&mut self, limit: std::time::Duration) -> Option<(String, Vec<u8>, bool)> {
        tokio::time::timeout(limit, self.received.recv())
            .await
            .ok()
            .flatten()
    }

    /// Disconnects cleanly, after what was published has gone out.
    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.task).await;
    }
}

/// Whether the broker at `url` still keeps a session for `client_id`: a
/// connection that asks to resume it (clean start off) and leaves none of
/// its own behind (session expiry 0). Ends the session it finds.
pub async fn session_kept(url: &str, client_id: &str) -> bool {
    use rumqttc::v5::{Event, mqttbytes::v5::Packet};
    let broker = telemetry::Broker::parse(url).unwrap();
    let mut options = broker.v5_options(client_id);
    options
        .set_clean_start(false)
        .set_session_expiry_interval(Some(0));
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 10);
    let connack = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(connack))) => return connack,
                Ok(_) => {}
                Err(err) => panic!("probing {client_id}'s session: {err}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no ConnAck for {client_id} within 5 s"));
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        while let Ok(event) = eventloop.poll().await {
            if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    connack.session_present
}

/// A device that knows which of its readings the broker acknowledged.
///
/// Its own MQTT 3.1.1 connection with a persistent session (clean session
/// off), written packet by packet so that each reading's packet id is its
/// seq: a PUBACK then names the reading it acknowledges, which rumqttc's
/// client, numbering packets itself, does not tell its caller. It takes a
/// reading every interval, connected or not; what is not acknowledged is
/// kept and sent again on the next connection, as a device that stores and
/// forwards does (so a broker restart makes it flush a burst).
pub struct AckedDevice {
    pub id: String,
    acked: Acked,
    task: JoinHandle<()>,
}

impl AckedDevice {
    /// Starts a device taking readings 1..=`readings`, one every `interval`,
    /// publishing them at QoS 1 under `devices/{id}/telemetry`.
    pub fn start(url: &str, id: &str, readings: u16, interval: Duration) -> Self {
        let device = Forwarder {
            broker: telemetry::Broker::parse(url).unwrap(),
            id: id.to_owned(),
            topic: telemetry::Topics::new("").telemetry(id),
            readings,
            interval,
            started: tokio::time::Instant::now(),
            taken: 0,
            unacked: BTreeMap::new(),
            acked: Arc::default(),
        };
        let acked = device.acked.clone();
        Self {
            id: id.to_owned(),
            acked,
            task: tokio::spawn(device.run()),
        }
    }

    /// How many readings the broker has acknowledged so far.
    pub fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits, `limit` at most, until every reading is taken and acknowledged
    /// and the device has disconnected; returns the acknowledged seqs, each
    /// with when it was last sent before its PUBACK came (a PUBACK is read
    /// late when it comes during a burst; the broker surely had the reading
    /// no sooner than it was sent).
    pub async fn finish(self, limit: Duration) -> BTreeMap<i64, tokio::time::Instant> {
        let abort = self.task.abort_handle();
        if tokio::time::timeout(limit, self.task).await.is_err() {
            abort.abort();
        }
        self.acked.lock().unwrap().clone()
    }
}

/// The state of an [`AckedDevice`] across its connections.
struct Forwarder {
    broker: telemetry::Broker,
    id: String,
    topic: String,
    readings: u16,
    interval: Duration,
    started: tokio::time::Instant,
    taken: u16,
    /// Readings taken and not yet acknowledged, by seq, with when each was
    /// last sent (`None`: not yet).
    unacked: BTreeMap<u16, (Publish, Option<tokio::time::Instant>)>,
    acked: Acked,
}

/// Acknowledged seqs, and when each was last sent.
type Acked = Arc<Mutex<BTreeMap<i64, tokio::time::Instant>>>;

impl Forwarder {
    async fn run(mut self) {
        // The lab's devices' schedule: 100 ms, doubling, up to 5 s.
        let mut backoff = lab_core::backoff::Backoff::reconnect();
        while self.connection(&mut backoff).await.is_err() {
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// Takes the readings due by now (one per interval since the start).
    fn take_due(&mut self) {
        let due = (self.started.elapsed().as_millis() / self.interval.as_millis().max(1)) as u64;
        let due = due.min(u64::from(self.readings)) as u16;
        while self.taken < due {
            self.taken += 1;
            let seq = self.taken;
            let payload = serde_json::json!({
                "device_id": self.id, "seq": seq, "ts": chrono::Utc::now(),
                "temperature_c": 20.0, "humidity_pct": 40.0, "battery_pct": 90.0
            });
            let mut publish = Publish::new(&self.topic, QoS::AtLeastOnce, payload.to_string());
            publish.pkid = seq;
            self.unacked.insert(seq, (publish, None));
        }
    }

    /// Sends the readings not yet sent, or (`again`) every one not yet
    /// acknowledged, a second sending marked as such (DUP).
    async fn send_unacked(&mut self, stream: &mut TcpStream, again: bool) -> anyhow::Result<()> {
        for (publish, sent) in self.unacked.values_mut() {
            if sent.is_some() && !again {
                continue;
            }
            let mut publish = publish.clone();
            publish.dup = sent.is_some();
            send(stream, Packet::Publish(publish)).await?;
            *sent = Some(tokio::time::Instant::now());
        }
        Ok(())
    }

    fn done(&self) -> bool {
        self.taken == self.readings && self.unacked.is_empty()
    }

    /// One connection: everything unacknowledged is sent again, then each
    /// reading as it falls due. Ok once all are acknowledged (after a
    /// DISCONNECT); an error when the connection fails.
    async fn connection(&mut self, backoff: &mut lab_core::backoff::Backoff) -> anyhow::Result<()> {
        let mut stream = TcpStream::connect((self.broker.host.as_str(), self.broker.port)).await?;
        let mut connect = Connect::new(&self.id);
        connect.clean_session = false;
        connect.keep_alive = 30;
        if let Some(user) = &self.broker.username {
            connect.set_login(user, self.broker.password.clone().unwrap_or_default());
        }
        let mut buf = BytesMut::new();
        send(&mut stream, Packet::Connect(connect)).await?;
        match next_packet(&mut stream, &mut buf).await? {
            Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {}
            other => anyhow::bail!("{} was refused: {other:?}", self.id),
        }
        backoff.reset();
        self.send_unacked(&mut stream, true).await?;
        let mut tick = tokio::time::interval(self.interval);
        loop {
            self.take_due();
            self.send_unacked(&mut stream, false).await?;
            if self.done() {
                send(&mut stream, Packet::Disconnect).await?;
                return Ok(());
            }
            tokio::select! {
                _ = tick.tick() => {}
                packet = next_packet(&mut stream, &mut buf) => {
                    if let Packet::PubAck(ack) = packet?
                        && let Some((_, Some(sent))) = self.unacked.remove(&ack.pkid)
                    {
                        self.acked.lock().unwrap().insert(i64::from(ack.pkid), sent);
                    }
                }
            }
        }
    }
}

const MAX_PACKET: usize = 1 << 20;

async fn send(stream: &mut TcpStream, packet: Packet) -> anyhow::Result<()> {
    let mut buf = BytesMut::new();
    packet.write(&mut buf, MAX_PACKET)?;
    stream.write_all(&buf).await?;
    Ok(())
}

/// The next packet from `stream`; what is read beyond it stays in `buf`.
/// Cancel-safe: bytes are only ever added to `buf` by a completed read.
async fn next_packet(stream: &mut TcpStream, buf: &mut BytesMut) -> anyhow::Result<Packet> {
    loop {
        match Packet::read(buf, MAX_PACKET) {
            Ok(packet) => return Ok(packet),
            Err(FrameError::InsufficientBytes(_)) => {
                if stream.read_buf(buf).await? == 0 {
                    anyhow::bail!("the broker closed the connection");
                }
            }
            Err(err) => return Err(err.into()),
        }
    }
}
