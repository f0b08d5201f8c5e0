//! Helpers for the workshop tests: start a lab service in this process on
//! port 0 against the real backing services, and talk to it with real
//! clients. Each test gets its own database from `#[sqlx::test]`.
//!
//! - [`common`]: waiting and polling, JSON, ports, prefixes, and direct
//!   connections to Redis and RabbitMQ that say how to start them.
//! - [`running`]: a service running in process, written once for all labs.
//! - one module per lab: [`catalog`], [`caching`], [`outbox`], [`chat`],
//!   [`telemetry`], each the lab's harness on top of [`running::Running`].
//! - [`browser`]: headless Chromium for the pages the labs serve.
//! - [`mqtt`]: the shared broker, a private Mosquitto, a bare MQTT client.
//! - [`redis_server`]: a private Redis with a chosen persistence mode, to
//!   restart.

pub mod browser;
pub mod caching;
pub mod catalog;
pub mod chat;
pub mod common;
pub mod mqtt;
pub mod outbox;
pub mod redis_server;
pub mod running;
pub mod telemetry;

pub use self::{
    browser::{Browser, ChromeDriver},
    caching::CachingApp,
    catalog::CatalogApp,
    chat::{ChatApp, CrashableChat},
    common::{
        amqp_channel, amqp_url, closed_port, count, delete_keys, eventually, get_json,
        redis_connection, redis_url, unique_prefix, wait_ready,
    },
    mqtt::{MqttClient, PrivateBroker, mqtt_url},
    outbox::{OutboxTopology, Service},
    redis_server::{Persistence, PrivateRedis},
    running::Running,
    telemetry::TelemetryApp,
};
