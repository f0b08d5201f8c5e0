//! The broker `lab bench telemetry` measures: a Mosquitto of its own run
//! from the lab's config, or the shared one at `MQTT_URL`; and what that
//! broker says it dropped.
//!
//! Mosquitto drops a QoS 1 message for a subscriber whose queue is full
//! (`max_queued_messages`: 1,000 by default, 100,000 in the lab's config)
//! and counts it in `$SYS/broker/publish/messages/dropped`, a retained
//! topic it refreshes every `sys_interval` (10 s by default; 1 s on the
//! bench's own broker). The count is the broker's, for all its clients.

use std::{path::PathBuf, process::Stdio, time::Duration};

use anyhow::Context;
use rumqttc::{Event, Packet, QoS};
use telemetry::{Broker, broker::LabBroker};

/// Where one variant's clients connect, and the broker it started, if any.
pub struct Brokers {
    /// For the devices (the lab's `device` login on its own broker).
    pub devices: Broker,
    /// For the ingest (the lab's `ingest` login on its own broker).
    pub ingest_url: String,
    /// For the bare subscriber and `$SYS` (the ingest's login).
    pub readers: Broker,
    /// Topic prefix: none on a broker of its own, a unique one on a shared one.
    pub prefix: String,
    /// How often the broker refreshes `$SYS`.
    pub sys_interval: Duration,
    /// Held for its `Drop`, which stops the broker and removes its files.
    _own: Option<OwnBroker>,
}

impl Brokers {
    /// The shared broker at `url`, under a prefix no one else uses.
    pub fn shared(url: &str, prefix: String) -> anyhow::Result<Self> {
        Ok(Self {
            devices: Broker::parse(url)?,
            ingest_url: url.to_owned(),
            readers: Broker::parse(url)?,
            prefix,
            sys_interval: Duration::from_secs(10),
            _own: None,
        })
    }

    /// A Mosquitto of its own from the lab's config, on a free port.
    pub async fn own(name: &str) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = std::env::temp_dir().join(format!("lab-bench-{name}-{}", std::process::id()));
        let mut lab = LabBroker::new(&dir, port);
        lab.extra = "sys_interval 1\n".into();
        lab.forget()?;
        let mut command = lab
            .command()
            .context("cannot start the bench's mosquitto")?;
        let log = std::fs::File::create(dir.join("mosquitto.log"))?;
        command.stdout(Stdio::null()).stderr(log);
        let child = tokio::process::Command::from(command)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the bench's mosquitto")?;
        let own = OwnBroker { child, dir };
        anyhow::ensure!(
            telemetry::broker::listening(port, Duration::from_secs(5)).await,
            "the bench's mosquitto did not listen within 5 s: {}",
            std::fs::read_to_string(own.dir.join("mosquitto.log")).unwrap_or_default()
        );
        let url = |user| lab.url(user).expect("the lab's logins");
        Ok(Self {
            devices: Broker::parse(&url("device"))?,
            ingest_url: url("ingest"),
            readers: Broker::parse(&url("ingest"))?,
            prefix: String::new(),
            sys_interval: Duration::from_secs(1),
            _own: Some(own),
        })
    }

    /// The broker's dropped-message count now, read from its retained
    /// `$SYS` topic after waiting one refresh; `None` if it says nothing.
    /// Mosquitto 2.0 may leave the counter out while it is zero (the
    /// machine's broker did), so a broker that answers
    /// (`$SYS/broker/version`) without one has dropped nothing.
    pub async fn dropped(&self) -> Option<u64> {
        tokio::time::sleep(self.sys_interval + Duration::from_millis(500)).await;
        let id = format!("lab-bench-sys-{}", uuid::Uuid::now_v7().simple());
        let (client, mut eventloop) = rumqttc::AsyncClient::new(self.readers.v4_options(&id), 10);
        client.subscribe(DROPPED, QoS::AtMostOnce).await.ok()?;
        client.subscribe(VERSION, QoS::AtMostOnce).await.ok()?;
        let (mut dropped, mut answered) = (None, false);
        // Retained messages come right after the subscription; a second is
        // plenty on loopback.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(event) = eventloop.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = event {
                    let text = String::from_utf8_lossy(&p.payload);
                    match p.topic.as_str() {
                        DROPPED => dropped = text.trim().parse().ok(),
                        _ => answered = true,
                    }
                }
                if dropped.is_some() && answered {
                    break;
                }
            }
        })
        .await;
        let _ = client.disconnect().await;
        dropped.or(answered.then_some(0))
    }
}

const DROPPED: &str = "$SYS/broker/publish/messages/dropped";
const VERSION: &str = "$SYS/broker/version";

/// The bench's own Mosquitto: killed and its files removed when dropped.
struct OwnBroker {
    child: tokio::process::Child,
    dir: PathBuf,
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
