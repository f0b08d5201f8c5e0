//! What travels on the topics, and what the ingest accepts.
//!
//! A device is not trusted: its payload may be cut short, from an older
//! firmware, or simply wrong (a sensor reading 900 °C). Each one is checked
//! here; one that fails goes to the `rejects` table with the reason, and the
//! loop carries on.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// `devices/{id}/telemetry`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reading {
    pub device_id: String,
    /// Rises by one per reading of a device: with the device id, the
    /// identity that makes a QoS 1 redelivery a duplicate.
    pub seq: i64,
    pub ts: DateTime<Utc>,
    pub temperature_c: f64,
    pub humidity_pct: f64,
    pub battery_pct: f64,
}

/// What a thermostat's sensor can report.
pub const TEMPERATURE_RANGE: std::ops::RangeInclusive<f64> = -40.0..=85.0;
/// How far ahead of the ingest's clock a device's clock may run.
const MAX_CLOCK_SKEW: chrono::TimeDelta = chrono::TimeDelta::minutes(5);
/// Seqs above this are refused: far beyond any device's lifetime, and far
/// from `i64::MAX`, so arithmetic on them cannot overflow.
pub const MAX_SEQ: i64 = 1 << 53;

impl Reading {
    /// Parses and checks a telemetry payload from `topic_device`'s topic.
    pub fn parse(topic_device: &str, payload: &[u8]) -> Result<Self, String> {
        let reading: Reading =
            serde_json::from_slice(payload).map_err(|err| format!("malformed: {err}"))?;
        if reading.device_id != topic_device {
            return Err(format!(
                "device_id {:?} does not match the topic's device {topic_device:?}",
                reading.device_id
            ));
        }
        if !(0..=MAX_SEQ).contains(&reading.seq) {
            return Err(format!("seq {} is out of range 0..={MAX_SEQ}", reading.seq));
        }
        let in_range = |name: &str, value: f64, range: std::ops::RangeInclusive<f64>| {
            if range.contains(&value) {
                Ok(())
            } else {
                Err(format!(
                    "{name} {value} is out of range {}..={}",
                    range.start(),
                    range.end()
                ))
            }
        };
        in_range("temperature_c", reading.temperature_c, TEMPERATURE_RANGE)?;
        in_range("humidity_pct", reading.humidity_pct, 0.0..=100.0)?;
        in_range("battery_pct", reading.battery_pct, 0.0..=100.0)?;
        if reading.ts > Utc::now() + MAX_CLOCK_SKEW {
            return Err(format!("ts {} is in the future", reading.ts));
        }
        // Postgres's timestamptz starts at 4713 BC; a year -5000 would fail
        // the whole batch's insert, again on every redelivery.
        if reading.ts.timestamp() < 0 {
            return Err(format!("ts {} is before 1970", reading.ts));
        }
        Ok(reading)
    }
}

/// `devices/{id}/commands`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub command_id: uuid::Uuid,
    pub setpoint_c: f64,
}

/// `devices/{id}/acks`: the device applied a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub command_id: uuid::Uuid,
    pub device_id: String,
    pub setpoint_c: f64,
}

/// `alerts/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub device_id: String,
    /// The reading that completed the run of high ones.
    pub seq: i64,
    pub temperature_c: f64,
    pub threshold_c: f64,
    /// How many consecutive readings were above the threshold.
    pub readings: i32,
    pub ts: DateTime<Utc>,
}

/// `devices/{id}/status`, retained: how the device is, or how it left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Connected (the device says so on every connect).
    Online,
    /// Said goodbye: the device published this itself, then disconnected.
    Offline,
    /// Vanished: the broker published the device's last will for it.
    Lost,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Online => "online",
            Status::Offline => "offline",
            Status::Lost => "lost",
        }
    }
}

pub fn parse_status(payload: &[u8]) -> Result<Status, String> {
    match payload {
        b"online" => Ok(Status::Online),
        b"offline" => Ok(Status::Offline),
        b"lost" => Ok(Status::Lost),
        other => Err(format!(
            "status must be online, offline or lost (got {:?})",
            String::from_utf8_lossy(other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(fields: &str) -> Vec<u8> {
        format!(r#"{{"device_id":"d1","seq":7,"ts":"2026-01-01T00:00:00Z",{fields}}}"#).into_bytes()
    }

    #[test]
    fn readings_are_checked_field_by_field() {
        let ok = payload(r#""temperature_c":21.5,"humidity_pct":40,"battery_pct":99"#);
        assert_eq!(Reading::parse("d1", &ok).unwrap().seq, 7);
        assert!(
            Reading::parse("d2", &ok)
                .unwrap_err()
                .contains("does not match")
        );
        let hot = payload(r#""temperature_c":900,"humidity_pct":40,"battery_pct":99"#);
        assert!(
            Reading::parse("d1", &hot)
                .unwrap_err()
                .contains("temperature_c 900")
        );
        let wet = payload(r#""temperature_c":20,"humidity_pct":101,"battery_pct":99"#);
        assert!(
            Reading::parse("d1", &wet)
                .unwrap_err()
                .contains("humidity_pct")
        );
        let short = payload(r#""temperature_c":20"#);
        assert!(
            Reading::parse("d1", &short)
                .unwrap_err()
                .starts_with("malformed")
        );
        assert!(
            Reading::parse("d1", b"not json")
                .unwrap_err()
                .starts_with("malformed")
        );
    }

    #[test]
    fn status_is_online_offline_or_lost() {
        for status in [Status::Online, Status::Offline, Status::Lost] {
            assert_eq!(parse_status(status.as_str().as_bytes()), Ok(status));
        }
        assert!(parse_status(b"maybe").is_err());
    }
}
