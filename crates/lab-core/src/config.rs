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
/// (`lab bench`, `lab chaos`, the workshop tests). A bad value in the
/// environment is an error that names the variable, never a process exit
/// from inside a library.
pub fn from_env<T: Args>() -> anyhow::Result<T> {
    use clap::Command;
    let matches = T::augment_args(Command::new("lab"))
        .try_get_matches_from(["lab"])
        .map_err(|err| anyhow::anyhow!("{}", err.render().to_string().trim_end()))?;
    Ok(T::from_arg_matches(&matches)?)
}

/// One address a lab listens on, with the variable that moves it, so that
/// `lab up` can bind it, `lab doctor` can check it, and an error can say
/// which setting to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// What listens here, for people: "catalog gRPC", "outbox relay".
    pub name: &'static str,
    pub addr: String,
    /// The environment variable that sets `addr`.
    pub variable: &'static str,
    pub protocol: Protocol,
}

/// What a port speaks, so `lab doctor` knows how to ask it who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Grpc,
}

impl Listen {
    pub fn http(name: &'static str, addr: &str, variable: &'static str) -> Self {
        Self {
            name,
            addr: addr.to_owned(),
            variable,
            protocol: Protocol::Http,
        }
    }

    pub fn grpc(name: &'static str, addr: &str, variable: &'static str) -> Self {
        Self {
            protocol: Protocol::Grpc,
            ..Self::http(name, addr, variable)
        }
    }

    /// Binds the address, saying which setting to change when the port is taken.
    pub async fn bind(&self) -> anyhow::Result<tokio::net::TcpListener> {
        crate::http::bind(&self.addr, self.variable).await
    }
}

/// How to start a backing service, for "not reachable" messages.
pub fn start_hint(service: &str) -> String {
    format!(
        "{}; then check with `cargo run -p lab -- doctor`",
        how_to_start(service)
    )
}

/// "start it with `docker compose up -d X`, or natively: …", for `lab doctor`.
pub fn how_to_start(service: &str) -> String {
    format!(
        "start it with `docker compose up -d {service}`, or natively: {}",
        native_start(service)
    )
}

/// The command that starts a backing service natively from its Debian
/// package (what scripts/services runs).
pub fn native_start(service: &str) -> &'static str {
    match service {
        "postgres" => "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
        "redis" => {
            "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save \"\" \
             --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log"
        }
        "rabbitmq" => "rabbitmq-server -detached",
        "mosquitto" => "mosquitto -d -c /etc/mosquitto/mosquitto.conf",
        _ => "see the README's \"Backing services\"",
    }
}

/// The URL with its password replaced by `***`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Args, Debug)]
    struct Good {
        #[arg(
            long = "probe-number",
            env = "LAB_CORE_PROBE_NUMBER",
            default_value_t = 7
        )]
        number: u32,
    }

    /// The same setting with a value that does not parse, as a typo in the
    /// environment would give it.
    #[derive(Args, Debug)]
    struct Bad {
        #[arg(
            long = "probe-number",
            env = "LAB_CORE_PROBE_NUMBER",
            default_value = "seven"
        )]
        #[allow(dead_code)]
        number: u32,
    }

    #[test]
    fn a_bad_setting_is_an_error_naming_it_not_an_exit() {
        assert_eq!(from_env::<Good>().unwrap().number, 7);
        let err = from_env::<Bad>().unwrap_err().to_string();
        assert!(
            err.contains("'seven'") && err.contains("--probe-number"),
            "{err}"
        );
    }

    #[test]
    fn redact_hides_the_password_only() {
        assert_eq!(
            redact("postgres://postgres:secret@db:5432/lab"),
            "postgres://postgres:***@db:5432/lab"
        );
        assert_eq!(redact("postgres://db:5432/lab"), "postgres://db:5432/lab");
        assert_eq!(
            redact("postgres://user@db:5432/lab"),
            "postgres://user@db:5432/lab"
        );
    }
}
