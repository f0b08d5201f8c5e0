//! Where the broker is and what the topics are called.
//!
//! `MQTT_URL` carries the broker and, for the lab's compose broker, the
//! credentials: `mqtt://ingest:ingest-secret@mosquitto:1883`. The client id
//! is not in it: it is who the client *is* (a device's id; an ingest
//! instance's name, under which the broker keeps its session).

use std::time::Duration;

use anyhow::{Context, bail};

/// A broker to connect to, read from `MQTT_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl Broker {
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let parsed = url::Url::parse(url)
            .with_context(|| format!("MQTT_URL is not a URL: {}", lab_core::config::redact(url)))?;
        if !matches!(parsed.scheme(), "mqtt" | "tcp") {
            bail!(
                "MQTT_URL must start with mqtt:// (got {}://)",
                parsed.scheme()
            );
        }
        let host = parsed
            .host_str()
            .context("MQTT_URL has no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let username = Some(parsed.username())
            .filter(|u| !u.is_empty())
            .map(decode);
        let password = parsed.password().map(decode);
        Ok(Self {
            host,
            port: parsed.port().unwrap_or(1883),
            username,
            password,
        })
    }

    /// `host:port`, for messages (never the password).
    pub fn place(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// MQTT 3.1.1 options (the devices speak 3.1.1, as most small devices do).
    pub fn v4_options(&self, client_id: &str) -> rumqttc::MqttOptions {
        let mut options = rumqttc::MqttOptions::new(client_id, &self.host, self.port);
        options.set_keep_alive(Duration::from_secs(30));
        if let Some(user) = &self.username {
            options.set_credentials(user, self.password.clone().unwrap_or_default());
        }
        options
    }

    /// MQTT 5 options (the ingest needs shared subscriptions and session expiry).
    pub fn v5_options(&self, client_id: &str) -> rumqttc::v5::MqttOptions {
        let mut options = rumqttc::v5::MqttOptions::new(client_id, &self.host, self.port);
        options.set_keep_alive(Duration::from_secs(30));
        if let Some(user) = &self.username {
            options.set_credentials(user, self.password.clone().unwrap_or_default());
        }
        options
    }

    /// Says how to start the broker when it is not reachable.
    pub fn describe(&self, err: &dyn std::fmt::Display) -> String {
        format!(
            "Mosquitto is not reachable at {} ({err}); {}",
            self.place(),
            lab_core::config::start_hint("mosquitto")
        )
    }
}

fn decode(part: &str) -> String {
    url::form_urlencoded::parse(format!("x={part}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| part.to_owned())
}

/// The lab's topics, under an optional prefix (tests give each its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

/// What a topic under `devices/{id}/` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Telemetry,
    Status,
    Acks,
    Commands,
}

impl Topics {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    pub fn telemetry(&self, device: &str) -> String {
        format!("{}devices/{device}/telemetry", self.prefix)
    }

    pub fn status(&self, device: &str) -> String {
        format!("{}devices/{device}/status", self.prefix)
    }

    pub fn commands(&self, device: &str) -> String {
        format!("{}devices/{device}/commands", self.prefix)
    }

    pub fn acks(&self, device: &str) -> String {
        format!("{}devices/{device}/acks", self.prefix)
    }

    pub fn alert(&self, device: &str) -> String {
        format!("{}alerts/{device}", self.prefix)
    }

    /// The filter for one kind of topic of every device.
    pub fn every(&self, kind: Kind) -> String {
        let leaf = match kind {
            Kind::Telemetry => "telemetry",
            Kind::Status => "status",
            Kind::Acks => "acks",
            Kind::Commands => "commands",
        };
        format!("{}devices/+/{leaf}", self.prefix)
    }

    /// `devices/{id}/{kind}` → (id, kind), for topics under this prefix.
    pub fn parse<'a>(&self, topic: &'a str) -> Option<(&'a str, Kind)> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix("devices/")?;
        let (device, leaf) = rest.split_once('/')?;
        let kind = match leaf {
            "telemetry" => Kind::Telemetry,
            "status" => Kind::Status,
            "acks" => Kind::Acks,
            "commands" => Kind::Commands,
            _ => return None,
        };
        Some((device, kind))
    }
}

/// Device ids: 1–64 letters, digits, `-` or `_` (they are topic levels).
pub fn check_device_id(id: &str) -> Result<(), String> {
    if lab_core::error::is_name(id, 64, b"") {
        Ok(())
    } else {
        // A topic may carry an id of any length: quote the start of it.
        let shown: String = id.chars().take(64).collect();
        let cut = if shown.len() < id.len() {
            format!("…, {} bytes", id.len())
        } else {
            String::new()
        };
        Err(format!(
            "device id must be 1–64 letters, digits, '-' or '_' (got {shown:?}{cut})"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_carry_the_broker_and_its_credentials() {
        let b = Broker::parse("mqtt://ingest:s%40cret@mosquitto:1884").unwrap();
        assert_eq!(
            b,
            Broker {
                host: "mosquitto".into(),
                port: 1884,
                username: Some("ingest".into()),
                password: Some("s@cret".into()),
            }
        );
        let b = Broker::parse("mqtt://localhost").unwrap();
        assert_eq!((b.port, b.username), (1883, None));
        assert!(Broker::parse("http://localhost").is_err());
    }

    #[test]
    fn topics_round_trip_under_a_prefix() {
        let t = Topics::new("test/abc/");
        assert_eq!(t.telemetry("d1"), "test/abc/devices/d1/telemetry");
        assert_eq!(
            t.parse("test/abc/devices/d1/acks"),
            Some(("d1", Kind::Acks))
        );
        assert_eq!(t.parse("devices/d1/acks"), None, "another prefix");
        assert_eq!(t.parse("test/abc/devices/d1/other"), None);
        assert_eq!(t.every(Kind::Status), "test/abc/devices/+/status");
    }

    #[test]
    fn a_long_id_is_quoted_short() {
        let message = check_device_id(&"x".repeat(3000)).unwrap_err();
        assert!(message.ends_with("…, 3000 bytes)"), "{message}");
        assert!(message.len() < 200, "{message}");
        assert!(check_device_id("ok-id_1").is_ok());
        assert!(check_device_id("bad.id").is_err());
    }
}
