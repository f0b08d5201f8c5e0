//! The one list of labs. `lab up` runs them, `lab doctor` checks their
//! ports and `lab reset` empties them from here; adding a lab means one
//! variant, one arm in [`Lab::run`], [`Lab::listeners`] and [`Lab::kept`],
//! and its settings in [`LabSettings`].
//!
//! Each lab's settings name their own listen addresses (`Settings::listeners`),
//! so nothing here repeats a port or a variable name.

use clap::{Args, ValueEnum};
use futures::future::BoxFuture;
use lab_core::config::{AmqpConfig, Listen, MqttConfig, PostgresConfig, RedisConfig};
use tokio_util::sync::CancellationToken;

use crate::reset::Kept;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lab {
    Catalog,
    Caching,
    Outbox,
    Chat,
    Telemetry,
}

/// Where the backing services live: flattened once, shared by every lab.
#[derive(Args, Debug, Clone)]
pub struct Backing {
    #[command(flatten)]
    pub postgres: PostgresConfig,
    #[command(flatten)]
    pub redis: RedisConfig,
    #[command(flatten)]
    pub amqp: AmqpConfig,
    #[command(flatten)]
    pub mqtt: MqttConfig,
}

/// Every lab's own settings side by side (each names its variables with its
/// lab's prefix, so they flatten into one command without clashing).
#[derive(Args, Debug, Clone)]
pub struct LabSettings {
    #[command(flatten)]
    pub catalog: catalog::Settings,
    #[command(flatten)]
    pub caching: caching::Settings,
    #[command(flatten)]
    pub outbox: outbox::Settings,
    #[command(flatten)]
    pub chat: chat::Settings,
    #[command(flatten)]
    pub telemetry: telemetry::Settings,
}

impl Lab {
    pub const ALL: [Lab; 5] = [
        Lab::Catalog,
        Lab::Caching,
        Lab::Outbox,
        Lab::Chat,
        Lab::Telemetry,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Lab::Catalog => "catalog",
            Lab::Caching => "caching",
            Lab::Outbox => "outbox",
            Lab::Chat => "chat",
            Lab::Telemetry => "telemetry",
        }
    }

    /// The addresses this lab listens on.
    pub fn listeners(self, settings: &LabSettings) -> Vec<Listen> {
        match self {
            Lab::Catalog => settings.catalog.listeners(),
            Lab::Caching => settings.caching.listeners(),
            Lab::Outbox => settings.outbox.listeners(),
            Lab::Chat => settings.chat.listeners(),
            Lab::Telemetry => settings.telemetry.listeners(),
        }
    }

    /// What the lab keeps in the backing services: what `lab reset`
    /// empties. A unit test checks that every table the migrations create
    /// belongs to exactly one lab.
    pub fn kept(self, settings: &LabSettings) -> Kept {
        let (tables, redis_prefix, queues): (&'static [&'static str], _, _) = match self {
            Lab::Catalog => (&["products"], None, vec![]),
            Lab::Caching => (
                &[
                    "profiles",
                    "inventory",
                    "inventory_cache_repairs",
                    "page_views",
                    "page_view_entries",
                ],
                Some(settings.caching.key_prefix.clone()),
                vec![],
            ),
            Lab::Outbox => (
                &[
                    "orders",
                    "idempotency_keys",
                    "outbox",
                    "order_progress",
                    "processed_events",
                    "parked_events",
                    "notifications",
                ],
                None,
                vec![
                    settings.outbox.queue.clone(),
                    format!("{}.dlq", settings.outbox.queue),
                ],
            ),
            Lab::Chat => (&[], Some(settings.chat.key_prefix.clone()), vec![]),
            Lab::Telemetry => (
                &["devices", "readings", "rejects", "commands", "alerts"],
                None,
                vec![],
            ),
        };
        Kept {
            tables,
            redis_prefix,
            queues,
        }
    }

    /// The lab's `run(config, shutdown)`, with its config built from the
    /// shared backing services and its own settings.
    pub fn run(
        self,
        backing: &Backing,
        settings: &LabSettings,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, anyhow::Result<()>> {
        let database_url = backing.postgres.database_url.clone();
        let redis_url = backing.redis.redis_url.clone();
        match self {
            Lab::Catalog => Box::pin(catalog::run(
                catalog::Config {
                    database_url,
                    settings: settings.catalog.clone(),
                },
                shutdown,
            )),
            Lab::Caching => Box::pin(caching::run(
                caching::Config {
                    database_url,
                    redis_url,
                    settings: settings.caching.clone(),
                },
                shutdown,
            )),
            Lab::Outbox => Box::pin(outbox::run(
                outbox::Config {
                    database_url,
                    amqp_url: backing.amqp.amqp_url.clone(),
                    settings: settings.outbox.clone(),
                    roles: vec![outbox::Role::All],
                },
                shutdown,
            )),
            Lab::Chat => Box::pin(chat::run(
                chat::Config {
                    redis_url,
                    settings: settings.chat.clone(),
                },
                shutdown,
            )),
            Lab::Telemetry => Box::pin(telemetry::run(
                telemetry::Config {
                    database_url,
                    mqtt_url: backing.mqtt.mqtt_url.clone(),
                    settings: settings.telemetry.clone(),
                },
                shutdown,
            )),
        }
    }
}
