//! `lab broker` runs the telemetry lab's own Mosquitto: the lab's logins
//! and ACL, a session that survives `kill -9` (a snapshot every second),
//! `--fresh` that forgets it, and a SIGTERM that stops the broker with it.
//! Driven with the real mosquitto_pub and mosquitto_sub, as the workshop's
//! exercises 5.3 and 5.5 drive it.

mod support;

use std::{
    io::Read,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use support::{free_port, has_tool};

struct Broker {
    child: Child,
    log: PathBuf,
}

impl Broker {
    fn start(port: u16, dir: &Path, extra: &[&str]) -> Self {
        let log = dir.with_file_name(format!(
            "{}-{}.log",
            dir.file_name().unwrap().to_string_lossy(),
            uuid::Uuid::now_v7().simple()
        ));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_lab"))
            .args(["broker", "--port", &port.to_string(), "--dir"])
            .arg(dir)
            .args(extra)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start lab broker");
        let broker = Self { child, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "lab broker did not listen on {port} within 10 s; its output:\n{}",
                broker.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        broker
    }

    fn output(&self) -> String {
        let mut text = String::new();
        let _ = std::fs::File::open(&self.log).and_then(|mut f| f.read_to_string(&mut text));
        text
    }

    /// The pid of the mosquitto it runs, from its banner.
    fn mosquitto_pid(&self) -> String {
        let output = self.output();
        let pid = output
            .split("pid ")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .unwrap_or_else(|| panic!("no pid in the banner:\n{output}"));
        pid.to_owned()
    }

    /// Waits for `lab broker` to exit (10 s at most).
    fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "lab broker did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // Only a child still running: a pid already waited for may be reused.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The broker's folder, removed however the test ends.
struct Folder(PathBuf);

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits (10 s at most) for the broker to write a snapshot after `since`:
/// what it holds now then survives a kill.
fn wait_for_snapshot(dir: &Path, since: std::time::SystemTime) {
    let snapshot = dir.join("data/mosquitto.db");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&snapshot)
        .and_then(|m| m.modified())
        .is_ok_and(|written| written <= since)
        || !snapshot.exists()
    {
        assert!(Instant::now() < deadline, "no snapshot within 10 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn publish(port: u16, login: Option<(&str, &str)>, id: &str, topic: &str) -> Output {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(["-p", &port.to_string(), "-i", id, "-q", "1"]);
    cmd.args(["-t", topic, "-m", "21.5"]);
    if let Some((user, password)) = login {
        cmd.args(["-u", user, "-P", password]);
    }
    cmd.stdin(Stdio::null()).output().unwrap()
}

/// The `keeper` ingest session: subscribes with a session that outlives
/// the connection (`-c`), and returns what arrived within `wait`.
fn keeper(port: u16, wait: &str) -> Output {
    Command::new("mosquitto_sub")
        .args([
            "-p",
            &port.to_string(),
            "-u",
            "ingest",
            "-P",
            "ingest-secret",
        ])
        .args(["-i", "keeper", "-c", "-q", "1", "-t", "devices/+/telemetry"])
        .args(["-v", "-C", "1", "-W", wait])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Sends SIGTERM to `lab broker` itself (not to its mosquitto), as a
/// service manager would, and checks that both stop.
fn stop(mut broker: Broker, port: u16) {
    let pid = broker.child.id().to_string();
    assert!(Command::new("kill").arg(&pid).status().unwrap().success());
    assert!(broker.wait().success(), "{}", broker.output());
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "mosquitto outlived the SIGTERM sent to lab broker"
    );
}

#[test]
fn the_lab_broker_keeps_its_logins_survives_a_kill_and_forgets_when_fresh() {
    telemetry::broker::mosquitto().expect("the broker");
    for tool in ["mosquitto_pub", "mosquitto_sub"] {
        assert!(
            has_tool(tool),
            "{tool} is not installed (Debian: mosquitto-clients)"
        );
    }
    let port = free_port();
    let folder =
        Folder(std::env::temp_dir().join(format!("lab-broker-test-{}", std::process::id())));
    let dir = folder.0.as_path();
    let _ = std::fs::remove_dir_all(dir);
    let mut broker = Broker::start(port, dir, &[]);

    // The lab's door: no login, no entry; a device only under its own id.
    let anonymous = publish(port, None, "d1", "devices/d1/telemetry");
    assert!(!anonymous.status.success(), "an anonymous client got in");
    let device = Some(("device", "device-secret"));
    let own = publish(port, device, "d1", "devices/d1/telemetry");
    assert!(own.status.success(), "{own:?}\n{}", broker.output());

    // A session with a subscription, then a reading queued for it while
    // it is away, then a snapshot (every 2 s), then a crash.
    let first = keeper(port, "1");
    assert_eq!(first.status.code(), Some(27), "{first:?}");
    let queued_at = std::time::SystemTime::now();
    let queued = publish(port, device, "d2", "devices/d2/telemetry");
    assert!(queued.status.success(), "{queued:?}");
    wait_for_snapshot(dir, queued_at);
    let pid = broker.mosquitto_pid();
    assert!(
        Command::new("kill")
            .args(["-9", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(
        !broker.wait().success(),
        "lab broker hid its broker's crash"
    );
    let said = broker.output();
    assert!(
        said.contains("Run the same command to start it again"),
        "{said}"
    );
    drop(broker);

    let broker = Broker::start(port, dir, &[]);
    let after_kill = keeper(port, "5");
    let got = String::from_utf8_lossy(&after_kill.stdout);
    assert_eq!(
        got.trim(),
        "devices/d2/telemetry 21.5",
        "the reading queued before the kill; broker:\n{}",
        broker.output()
    );
    // Queued again, then forgotten by a fresh start.
    let queued = publish(port, device, "d3", "devices/d3/telemetry");
    assert!(queued.status.success(), "{queued:?}");
    stop(broker, port);

    let broker = Broker::start(port, dir, &["--fresh"]);
    let fresh = keeper(port, "2");
    let said = broker.output();
    assert_eq!(
        fresh.status.code(),
        Some(27),
        "a fresh broker kept the session: {fresh:?}\n{said}"
    );
}
