//! What the `lab` binary's own tests share: running `lab up` as a child
//! process, polling its ports, and a scratch database.

#![allow(dead_code)] // each test file uses its own part

use std::{
    io::Read,
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus},
    time::{Duration, Instant},
};

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `lab up` as a child process, killed when dropped.
pub struct LabUp {
    child: Child,
    log: PathBuf,
}

impl LabUp {
    /// Starts `bin up` with `envs` and waits until every port in `ready`
    /// answers `/readyz` with 200 (at most 60 s), failing with its log.
    pub fn start(bin: &Path, envs: &[(String, String)], ready: &[u16], log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin)
            .arg("up")
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start lab up");
        let lab = Self { child, log };
        lab.wait_ready(ready);
        lab
    }

    fn wait_ready(&self, ports: &[u16]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if ports
                .iter()
                .all(|port| http_get_status(*port, "/readyz") == Some(200))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "lab up did not become ready within 60 s; its log:\n{}",
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit status: the graceful-shutdown contract.
    pub fn stop(mut self) -> ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "lab up did not exit within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for LabUp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.0 GET, enough to poll /readyz without another client.
pub fn http_get_status(port: u16, path: &str) -> Option<u16> {
    use std::io::Write;
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

/// True when `tool` is on PATH.
pub fn has_tool(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub fn drop_database(url: &str) {
    use sqlx::migrate::MigrateDatabase;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    if let Err(err) = runtime.block_on(sqlx::Postgres::force_drop_database(url)) {
        eprintln!("could not drop the scratch database: {err}");
    }
}

/// Every listen address `lab up` has, by its variable.
pub const ADDRS: &[&str] = &[
    "CATALOG_HTTP_ADDR",
    "CATALOG_GRPC_ADDR",
    "CACHING_HTTP_ADDR",
    "OUTBOX_HTTP_ADDR",
    "OUTBOX_RELAY_ADDR",
    "OUTBOX_CONSUMER_ADDR",
    "CHAT_HTTP_ADDR",
    "TELEMETRY_HTTP_ADDR",
];

/// `lab up` with every address on a free port, a scratch database and its
/// own keys, queues and topics, so it runs beside a learner's `lab up` and
/// beside other tests. Dropping the database is the caller's (`stop`).
pub struct ScratchLab {
    pub lab: LabUp,
    pub ports: Vec<(&'static str, u16)>,
    pub database_url: String,
}

impl ScratchLab {
    pub fn start(name: &str) -> Self {
        let id = format!("{name}_{}", std::process::id());
        let ports: Vec<(&'static str, u16)> = ADDRS.iter().map(|v| (*v, free_port())).collect();
        let database_url = format!("postgres://postgres:postgres@localhost:5432/lab_{id}");
        let mut envs: Vec<(String, String)> = ports
            .iter()
            .map(|(v, p)| (v.to_string(), format!("127.0.0.1:{p}")))
            .collect();
        envs.extend(
            [
                ("DATABASE_URL", database_url.clone()),
                ("CACHE_KEY_PREFIX", format!("lab:{id}:caching:")),
                ("CHAT_KEY_PREFIX", format!("lab:{id}:chat:")),
                ("OUTBOX_EXCHANGE", format!("lab.{name}.events")),
                ("OUTBOX_QUEUE", format!("lab.{name}.notifications")),
                ("TELEMETRY_CLIENT_ID", format!("lab-{id}")),
                ("TELEMETRY_SHARE_GROUP", format!("lab-{id}")),
                ("TELEMETRY_TOPIC_PREFIX", format!("{id}/")),
                ("INGEST_SESSION_EXPIRY_SECS", "60".into()),
                ("RUST_LOG", "warn".into()),
            ]
            .map(|(k, v)| (k.to_owned(), v)),
        );
        let work = std::env::temp_dir().join(format!("lab-{id}"));
        std::fs::create_dir_all(&work).unwrap();
        let ready: Vec<u16> = ports
            .iter()
            .filter(|(v, _)| *v != "CATALOG_GRPC_ADDR")
            .map(|(_, p)| *p)
            .collect();
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_lab"));
        let lab = LabUp::start(&bin, &envs, &ready, work.join("lab-up.log"));
        Self {
            lab,
            ports,
            database_url,
        }
    }

    pub fn port(&self, variable: &str) -> u16 {
        self.ports.iter().find(|(v, _)| *v == variable).unwrap().1
    }

    /// SIGTERM, the exit status, and the database dropped.
    pub fn stop(self) -> ExitStatus {
        let status = self.lab.stop();
        drop_database(&self.database_url);
        status
    }
}
