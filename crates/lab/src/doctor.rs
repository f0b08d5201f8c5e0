//! `lab doctor`: the first command to run when something does not work.
//!
//! It checks that each backing service answers where the configuration says,
//! and that each lab port is either free or already served by the lab, and
//! prints what to do about every problem. It exits 1 when it found one.

use std::time::Duration;

use clap::Args;
use lab_core::config::{AmqpConfig, MqttConfig, PostgresConfig, RedisConfig};
use sqlx::{ConnectOptions, postgres::PgConnectOptions};
use tokio::net::{TcpListener, TcpStream};

const TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Args)]
pub struct Doctor {
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

/// How to start each backing service: with compose, or natively (the
/// commands scripts/services uses).
fn start_hint(service: &str) -> String {
    let native = match service {
        "postgres" => "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
        "redis" => {
            "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save \"\" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log"
        }
        "rabbitmq" => "rabbitmq-server -detached",
        _ => "mosquitto -d -c /etc/mosquitto/mosquitto.conf",
    };
    format!("start it with `docker compose up -d {service}`, or natively: {native}")
}

struct Report {
    problems: usize,
}

impl Report {
    fn ok(&self, what: &str, detail: &str) {
        println!("  ok    {what:<14} {detail}");
    }
    fn fail(&mut self, what: &str, detail: &str, fix: &str) {
        self.problems += 1;
        println!("  FAIL  {what:<14} {detail}");
        println!("        -> {fix}");
    }
}

pub async fn run(doctor: Doctor) -> anyhow::Result<()> {
    let mut report = Report { problems: 0 };

    println!("backing services");
    check_postgres(&mut report, &doctor.postgres.database_url).await;
    check_tcp(&mut report, "redis", &doctor.redis.redis_url, 6379).await;
    check_amqp(&mut report, &doctor.amqp.amqp_url).await;
    check_tcp(&mut report, "mosquitto", &doctor.mqtt.mqtt_url, 1883).await;

    println!("lab ports");
    check_port(
        &mut report,
        "catalog REST",
        &doctor.catalog.http_addr,
        "CATALOG_HTTP_ADDR",
        Probe::Http,
    )
    .await;
    check_port(
        &mut report,
        "catalog gRPC",
        &doctor.catalog.grpc_addr,
        "CATALOG_GRPC_ADDR",
        Probe::Grpc,
    )
    .await;
    check_port(
        &mut report,
        "caching",
        &doctor.caching.http_addr,
        "CACHING_HTTP_ADDR",
        Probe::Http,
    )
    .await;
    for (what, addr, variable) in [
        ("outbox API", &doctor.outbox.http_addr, "OUTBOX_HTTP_ADDR"),
        (
            "outbox relay",
            &doctor.outbox.relay_addr,
            "OUTBOX_RELAY_ADDR",
        ),
        (
            "outbox consumer",
            &doctor.outbox.consumer_addr,
            "OUTBOX_CONSUMER_ADDR",
        ),
    ] {
        check_port(&mut report, what, addr, variable, Probe::Http).await;
    }
    check_port(
        &mut report,
        "chat",
        &doctor.chat.http_addr,
        "CHAT_HTTP_ADDR",
        Probe::Http,
    )
    .await;
    check_port(
        &mut report,
        "telemetry",
        &doctor.telemetry.http_addr,
        "TELEMETRY_HTTP_ADDR",
        Probe::Http,
    )
    .await;

    match report.problems {
        0 => {
            println!("no problems found");
            Ok(())
        }
        n => {
            println!("{n} problem(s) found");
            std::process::exit(1);
        }
    }
}

async fn check_postgres(report: &mut Report, url: &str) {
    let options: PgConnectOptions = match url.parse() {
        Ok(options) => options,
        Err(err) => {
            return report.fail(
                "postgres",
                &format!("DATABASE_URL is not a Postgres URL: {err}"),
                "fix DATABASE_URL",
            );
        }
    };
    let place = format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("postgres")
    );
    match tokio::time::timeout(TIMEOUT, options.connect()).await {
        Ok(Ok(_)) => report.ok("postgres", &format!("{place} answers")),
        // The services create their database at start; a missing one is fine.
        Ok(Err(sqlx::Error::Database(db))) if db.code().as_deref() == Some("3D000") => report.ok(
            "postgres",
            &format!("{place}: server answers; the database is created when a lab starts"),
        ),
        Ok(Err(err)) => report.fail(
            "postgres",
            &format!("{place}: {err}"),
            &start_hint("postgres"),
        ),
        Err(_) => report.fail(
            "postgres",
            &format!("{place}: no answer within {TIMEOUT:?}"),
            &start_hint("postgres"),
        ),
    }
}

/// RabbitMQ: a real AMQP handshake, so wrong credentials or vhost show too.
async fn check_amqp(report: &mut Report, url: &str) {
    let place = lab_core::amqp::where_is(url);
    match lab_core::amqp::connect(url, "lab-doctor").await {
        Ok(connection) => {
            let _ = connection.close(200, "doctor done".into()).await;
            report.ok("rabbitmq", &format!("{place} accepts AMQP connections"));
        }
        Err(err) => report.fail("rabbitmq", &err, &start_hint("rabbitmq")),
    }
}

/// Redis and Mosquitto: does something accept connections where the URL
/// points?
async fn check_tcp(report: &mut Report, service: &str, url: &str, default_port: u16) {
    let (host, port) = match url::Url::parse(url) {
        Ok(parsed) => (
            parsed.host_str().unwrap_or("localhost").to_owned(),
            parsed.port().unwrap_or(default_port),
        ),
        Err(err) => {
            return report.fail(
                service,
                &format!("{url:?} is not a URL: {err}"),
                "fix the URL",
            );
        }
    };
    match tokio::time::timeout(TIMEOUT, TcpStream::connect((host.as_str(), port))).await {
        Ok(Ok(_)) => report.ok(service, &format!("{host}:{port} accepts connections")),
        Ok(Err(err)) => report.fail(
            service,
            &format!("{host}:{port}: {err}"),
            &start_hint(service),
        ),
        Err(_) => report.fail(
            service,
            &format!("{host}:{port}: no answer within {TIMEOUT:?}"),
            &start_hint(service),
        ),
    }
}

enum Probe {
    Http,
    Grpc,
}

/// A lab port is fine when it is free, or when the lab already serves it.
async fn check_port(report: &mut Report, what: &str, addr: &str, variable: &str, probe: Probe) {
    let Some(port) = addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()) else {
        return report.fail(
            what,
            &format!("{addr:?} is not host:port"),
            &format!("fix {variable}"),
        );
    };
    if TcpListener::bind(addr).await.is_ok() {
        return report.ok(what, &format!(":{port} is free"));
    }
    let served = match probe {
        Probe::Http => http_healthz(port).await,
        Probe::Grpc => grpc_health(port).await,
    };
    if served {
        report.ok(
            what,
            &format!(":{port} is served by the lab (health check answered)"),
        );
    } else {
        report.fail(
            what,
            &format!(":{port} is taken by another process"),
            &format!("stop that process (`ss -ltnp 'sport = :{port}'` shows it), or set {variable} to another address"),
        );
    }
}

async fn http_healthz(port: u16) -> bool {
    let Ok(client) = reqwest::Client::builder().timeout(TIMEOUT).build() else {
        return false;
    };
    match client
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
    {
        Ok(response) => response.status().is_success(),
        Err(_) => false,
    }
}

async fn grpc_health(port: u16) -> bool {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
    else {
        return false;
    };
    let Ok(Ok(channel)) = tokio::time::timeout(TIMEOUT, endpoint.connect()).await else {
        return false;
    };
    let mut client = HealthClient::new(channel);
    let check = client.check(HealthCheckRequest {
        service: String::new(),
    });
    matches!(tokio::time::timeout(TIMEOUT, check).await, Ok(Ok(_)))
}
