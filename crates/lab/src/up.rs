//! `lab up`: every lab service in one process, each on its default port,
//! against backing services on localhost. One Ctrl-C drains them all.

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use lab_core::config::{AmqpConfig, MqttConfig, PostgresConfig, RedisConfig};
use tokio::task::JoinSet;

#[derive(Args)]
pub struct Up {
    /// Run only these labs (comma-separated); all of them when absent.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Lab>,
    #[command(flatten)]
    postgres: PostgresConfig,
    #[command(flatten)]
    redis: RedisConfig,
    #[command(flatten)]
    amqp: AmqpConfig,
    #[command(flatten)]
    mqtt: MqttConfig,
    #[command(flatten)]
    catalog: catalog::Addrs,
    #[command(flatten)]
    caching: caching::Settings,
    #[command(flatten)]
    outbox: outbox::Settings,
    #[command(flatten)]
    chat: chat::Settings,
    #[command(flatten)]
    telemetry: telemetry::Settings,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Lab {
    Catalog,
    Caching,
    Outbox,
    Chat,
    Telemetry,
}

pub async fn run(up: Up) -> anyhow::Result<()> {
    let wanted = |lab: Lab| up.only.is_empty() || up.only.contains(&lab);
    let shutdown = lab_core::shutdown::on_signal();
    let mut labs = JoinSet::new();

    if wanted(Lab::Catalog) {
        let config = catalog::Config {
            database_url: up.postgres.database_url.clone(),
            addrs: up.catalog.clone(),
        };
        let token = shutdown.child_token();
        labs.spawn(async move { catalog::run(config, token).await.context("catalog") });
    }
    if wanted(Lab::Caching) {
        let config = caching::Config {
            database_url: up.postgres.database_url.clone(),
            redis_url: up.redis.redis_url.clone(),
            settings: up.caching.clone(),
        };
        let token = shutdown.child_token();
        labs.spawn(async move { caching::run(config, token).await.context("caching") });
    }
    if wanted(Lab::Outbox) {
        let config = outbox::Config {
            database_url: up.postgres.database_url.clone(),
            amqp_url: up.amqp.amqp_url.clone(),
            settings: up.outbox.clone(),
            roles: vec![outbox::Role::All],
        };
        let token = shutdown.child_token();
        labs.spawn(async move { outbox::run(config, token).await.context("outbox") });
    }
    if wanted(Lab::Chat) {
        let config = chat::Config {
            redis_url: up.redis.redis_url.clone(),
            settings: up.chat.clone(),
        };
        let token = shutdown.child_token();
        labs.spawn(async move { chat::run(config, token).await.context("chat") });
    }
    if wanted(Lab::Telemetry) {
        let config = telemetry::Config {
            database_url: up.postgres.database_url.clone(),
            mqtt_url: up.mqtt.mqtt_url.clone(),
            settings: up.telemetry.clone(),
        };
        let token = shutdown.child_token();
        labs.spawn(async move { telemetry::run(config, token).await.context("telemetry") });
    }
    if labs.is_empty() {
        bail!("no lab selected");
    }

    // The first lab to fail stops the others: a half-running lab misleads.
    let mut failure = None;
    while let Some(joined) = labs.join_next().await {
        let result = joined.context("a lab task panicked").and_then(|r| r);
        if let Err(err) = result {
            tracing::error!("{err:#}");
            shutdown.cancel();
            failure.get_or_insert(err);
        }
    }
    match failure {
        Some(err) => Err(err),
        None => Ok(()),
    }
}
