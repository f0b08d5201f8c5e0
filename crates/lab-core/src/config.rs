//! Configuration pieces shared by several labs.
//!
//! Every setting is an environment variable with a default that works when the
//! backing services listen on localhost. Each lab flattens the pieces it needs
//! into its own `clap` struct, so `--help` lists every variable and its default,
//! and `lab up` can flatten all the labs' structs into one command.

use clap::{Args, ValueEnum};

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres:postgres@localhost:5432/lab";
pub const DEFAULT_REDIS_URL: &str = "redis://localhost:6379";
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@localhost:5672/%2f";
pub const DEFAULT_MQTT_URL: &str = "mqtt://localhost:1883";

/// Where the lab's Postgres lives.
#[derive(Args, Debug, Clone)]
pub struct PostgresConfig {
    /// Postgres connection URL; the database is created if it does not exist.
    #[arg(long = "database-url", env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
}

/// Where the lab's Redis lives.
#[derive(Args, Debug, Clone)]
pub struct RedisConfig {
    /// Redis connection URL.
    #[arg(long = "redis-url", env = "REDIS_URL", default_value = DEFAULT_REDIS_URL)]
    pub redis_url: String,
}

/// Where the lab's RabbitMQ lives.
#[derive(Args, Debug, Clone)]
pub struct AmqpConfig {
    /// RabbitMQ connection URL (AMQP 0.9.1).
    #[arg(long = "amqp-url", env = "AMQP_URL", default_value = DEFAULT_AMQP_URL)]
    pub amqp_url: String,
}

/// Where the lab's MQTT broker lives.
#[derive(Args, Debug, Clone)]
pub struct MqttConfig {
    /// MQTT broker URL.
    #[arg(long = "mqtt-url", env = "MQTT_URL", default_value = DEFAULT_MQTT_URL)]
    pub mqtt_url: String,
}

/// How logs are written.
#[derive(Args, Debug, Clone)]
pub struct LogConfig {
    /// `text` for people, `json` for log collectors (compose sets json).
    #[arg(long = "log-format", env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Which logs to keep, as a tracing filter (`info`, `catalog=debug,sqlx=warn`).
    #[arg(long = "log", env = "RUST_LOG", default_value = "info")]
    pub filter: String,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// An `on`/`off` setting, for behaviour a lab lets you switch off to see
/// what it was for.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    On,
    Off,
}

/// A lab's settings as the environment and the defaults give them, for
/// programs that run a lab's parts without parsing a command line
/// (`lab bench`, `lab chaos`).
pub fn from_env<T: Args>() -> T {
    use clap::Command;
    let matches = T::augment_args(Command::new("lab")).get_matches_from(["lab"]);
    T::from_arg_matches(&matches).expect("defaults and the environment make valid settings")
}
