//! A Redis of the test's own, for what the shared Redis must not see: a
//! restart, and the persistence modes write-behind depends on. It runs
//! `redis-server` on a free port with a config the test chooses, in a
//! directory of its own, and can be killed and started again on the same
//! port with the same directory, so what it persisted comes back and what
//! it did not is gone.

use std::{path::PathBuf, process::Child, time::Duration};

use crate::common::closed_port;

/// How the private Redis keeps its data across a restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persistence {
    /// No append-only file, no snapshots: a restart forgets everything.
    None,
    /// `appendonly yes`, `appendfsync everysec`: a crash can lose up to
    /// about a second of writes.
    EverySec,
    /// `appendonly yes`, `appendfsync always`: every acknowledged write is
    /// on disk before the reply.
    Always,
}

impl Persistence {
    fn config(self) -> &'static str {
        match self {
            Persistence::None => "appendonly no\nsave \"\"\n",
            Persistence::EverySec => "appendonly yes\nappendfsync everysec\nsave \"\"\n",
            Persistence::Always => "appendonly yes\nappendfsync always\nsave \"\"\n",
        }
    }
}

pub struct PrivateRedis {
    pub port: u16,
    pub persistence: Persistence,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateRedis {
    pub async fn start(persistence: Persistence) -> Self {
        let port = closed_port().await;
        let dir = std::env::temp_dir().join(format!("lab-redis-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "port {port}\nbind 127.0.0.1\ndir {}\n{}",
            dir.display(),
            persistence.config()
        );
        std::fs::write(dir.join("redis.conf"), config).unwrap();
        let mut redis = Self {
            port,
            persistence,
            dir,
            child: None,
        };
        redis.spawn().await;
        redis
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.join("redis.log")).unwrap();
        let child = std::process::Command::new("redis-server")
            .arg(self.dir.join("redis.conf"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| {
                panic!("cannot start redis-server ({err}): install it with `apt-get install redis-server`")
            });
        self.child = Some(child);
        for _ in 0..100 {
            if self.answers().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the private redis did not answer on {} within 5 s; its log:\n{}",
            self.port,
            std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
        );
    }

    /// True once the server answers PING (not only accepts connections: a
    /// Redis loading its append-only file accepts and answers LOADING).
    async fn answers(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            return false;
        };
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok()
    }

    /// Kills the server the way a crash does (SIGKILL: no shutdown save).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and directory after
    /// [`kill`](Self::kill): it comes back with what its persistence mode
    /// kept.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "kill the private redis first");
        self.spawn().await;
    }

    /// Kills the server, waits `down`, and starts it again.
    pub async fn restart(&mut self, down: Duration) {
        self.kill();
        tokio::time::sleep(down).await;
        self.start_again().await;
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
