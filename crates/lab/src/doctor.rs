//! `lab doctor`: the first command to run when something does not work.
//!
//! It checks that each backing service answers where the configuration says,
//! and that each lab port is either free or already served by the lab, and
//! prints what to do about every problem. It exits 1 when it found one.

use std::time::Duration;

use clap::Args;
use lab_core::config::{Listen, Protocol};

use crate::labs::{Backing, Lab, LabSettings};
use sqlx::{ConnectOptions, postgres::PgConnectOptions};
use tokio::net::{TcpListener, TcpStream};

const TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Args)]
pub struct Doctor {
    #[command(flatten)]
    backing: Backing,
    #[command(flatten)]
    labs: LabSettings,
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
    check_postgres(&mut report, &doctor.backing.postgres.database_url).await;
    check_tcp(&mut report, "redis", &doctor.backing.redis.redis_url, 6379).await;
    check_amqp(&mut report, &doctor.backing.amqp.amqp_url).await;
    check_tcp(
        &mut report,
        "mosquitto",
        &doctor.backing.mqtt.mqtt_url,
        1883,
    )
    .await;

    println!("lab ports");
    for lab in Lab::ALL {
        for listen in lab.listeners(&doctor.labs) {
            check_port(&mut report, &listen).await;
        }
    }

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
            &lab_core::config::how_to_start("postgres"),
        ),
        Err(_) => report.fail(
            "postgres",
            &format!("{place}: no answer within {TIMEOUT:?}"),
            &lab_core::config::how_to_start("postgres"),
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
        Err(err) => report.fail(
            "rabbitmq",
            &err,
            &lab_core::config::how_to_start("rabbitmq"),
        ),
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
            &lab_core::config::how_to_start(service),
        ),
        Err(_) => report.fail(
            service,
            &format!("{host}:{port}: no answer within {TIMEOUT:?}"),
            &lab_core::config::how_to_start(service),
        ),
    }
}

/// A lab port is fine when it is free, or when the lab already serves it.
async fn check_port(report: &mut Report, listen: &Listen) {
    let (what, addr, variable) = (listen.name, listen.addr.as_str(), listen.variable);
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
    let served = match listen.protocol {
        Protocol::Http => http_healthz(port).await,
        Protocol::Grpc => grpc_health(port).await,
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
