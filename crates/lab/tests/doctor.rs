//! `lab doctor` tells a stopped backing service from a running one, and a lab
//! port taken by a stranger from a free one.

use std::{net::TcpListener, process::Command};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn doctor(envs: &[(&str, String)]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_lab"))
        .arg("doctor")
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// The lab ports moved to free ephemeral ports, so a running `lab up` on the
/// default ports does not change the verdict.
fn free_lab_ports() -> Vec<(&'static str, String)> {
    vec![
        ("CATALOG_HTTP_ADDR", format!("127.0.0.1:{}", free_port())),
        ("CATALOG_GRPC_ADDR", format!("127.0.0.1:{}", free_port())),
        ("CACHING_HTTP_ADDR", format!("127.0.0.1:{}", free_port())),
        ("OUTBOX_HTTP_ADDR", format!("127.0.0.1:{}", free_port())),
        ("OUTBOX_RELAY_ADDR", format!("127.0.0.1:{}", free_port())),
        ("OUTBOX_CONSUMER_ADDR", format!("127.0.0.1:{}", free_port())),
        ("CHAT_HTTP_ADDR", format!("127.0.0.1:{}", free_port())),
        ("TELEMETRY_HTTP_ADDR", format!("127.0.0.1:{}", free_port())),
    ]
}

#[test]
fn doctor_reports_a_stopped_backing_service_and_how_to_start_it() {
    let closed = free_port();
    let mut envs = free_lab_ports();
    envs.push((
        "DATABASE_URL",
        format!("postgres://postgres@127.0.0.1:{closed}/lab"),
    ));
    let (code, out) = doctor(&envs);
    assert_eq!(code, 1, "{out}");
    let line = out.lines().find(|l| l.contains("postgres")).unwrap();
    assert!(
        line.contains("FAIL") && line.contains(&format!("127.0.0.1:{closed}")),
        "{out}"
    );
    assert!(out.contains("docker compose up -d postgres"), "{out}");
    assert!(out.contains("1 problem(s) found"), "{out}");
    for running in ["redis", "rabbitmq", "mosquitto"] {
        let line = out.lines().find(|l| l.contains(running)).unwrap();
        assert!(line.trim_start().starts_with("ok"), "{running}: {out}");
    }
}

#[test]
fn doctor_is_happy_when_everything_answers() {
    let (code, out) = doctor(&free_lab_ports());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("no problems found"), "{out}");
}

#[test]
fn doctor_names_a_lab_port_taken_by_another_process() {
    let stranger = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = stranger.local_addr().unwrap().port();
    let mut envs = free_lab_ports();
    envs[0].1 = format!("127.0.0.1:{port}");
    let (code, out) = doctor(&envs);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(":{port} is taken by another process")),
        "{out}"
    );
    assert!(
        out.contains("CATALOG_HTTP_ADDR"),
        "says which setting moves the lab: {out}"
    );
}
