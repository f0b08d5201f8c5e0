//! MQTT for the telemetry tests: the shared broker, a private Mosquitto
//! run from the lab's own config, and a bare client that publishes what
//! the test says and collects what arrives.

use tokio::task::JoinHandle;

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
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let mut broker = Self {
            port,
            dir,
            child: None,
        };
        broker.spawn().await;
        broker
    }

    async fn spawn(&mut self) {
        let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/mosquitto")
            .canonicalize()
            .unwrap();
        let config = std::fs::read_to_string(deploy.join("mosquitto.conf")).unwrap();
        assert!(config.contains("listener 1883\n") && config.contains("/mosquitto/config/"));
        let config = config
            .replace(
                "listener 1883\n",
                &format!("listener {} 127.0.0.1\n", self.port),
            )
            .replace("/mosquitto/config/", &format!("{}/", deploy.display()))
            .replace(
                "/mosquitto/data/",
                &format!("{}/", self.dir.join("data").display()),
            );
        let path = self.dir.join("mosquitto.conf");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(self.dir.join("mosquitto.log")).unwrap();
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot start mosquitto ({err}): install it with `apt-get install mosquitto`"
                )
            });
        self.child = Some(child);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!(
            "the private mosquitto did not listen on {} within 5 s; its log:\n{}",
            self.port,
            std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
        );
    }

    /// `mqtt://user:password@127.0.0.1:<port>` for one of the lab's logins.
    pub fn url(&self, user: &str) -> String {
        let password = match user {
            "ingest" => "ingest-secret",
            "device" => "device-secret",
            other => panic!("the lab's broker has no login {other:?}"),
        };
        format!("mqtt://{user}:{password}@127.0.0.1:{}", self.port)
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
        let _ = std::fs::remove_dir_all(self.dir.join("data"));
        std::fs::create_dir_all(self.dir.join("data")).unwrap();
        self.spawn().await;
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
