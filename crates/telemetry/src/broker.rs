//! The lab's Mosquitto, run natively from the lab's own configuration.
//!
//! `docker-compose.yml` mounts `deploy/mosquitto/` into the broker's
//! container; on a machine without Docker the same files, rewritten for a
//! directory and a port of their own, start the same broker: logins, ACL,
//! the raised queue, a snapshot every 2 s. `lab broker` runs it for the
//! workshop's broker exercises (a broker to stop, kill, or restart without
//! persistence), and the telemetry tests run one of their own per test.
//!
//! The machine's shared Mosquitto on 1883 is not that broker: it is a
//! package's default (anonymous, a queue of 1,000 per client, no
//! persistence), and stopping it would stop every lab and test using it.
//!
//! Started as root, Mosquitto drops to its own user before it reads its
//! password file or saves a snapshot, so the folder and the files written
//! here are readable by everyone and the data directory writable by
//! everyone: a folder it cannot enter stops it at once ("Unable to open
//! pwfile"), and a data directory only root may write leaves persistence
//! off without a word but one log line per save ("Permission denied"), so
//! that every restart starts empty. (The logins are the lab's published
//! ones; nothing here is secret.)
//!
//! Debian installs the broker as `/usr/sbin/mosquitto`, which is not on an
//! ordinary user's `PATH`; [`mosquitto`] looks there too.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use lab_core::config::Switch;

/// The lab's broker configuration, as compose mounts it.
const CONFIG: &str = include_str!("../../../deploy/mosquitto/mosquitto.conf");
/// The lab's logins (`ingest`, `device`), hashed by `mosquitto_passwd`.
const PASSWD: &str = include_str!("../../../deploy/mosquitto/passwd");
/// What each login may publish and subscribe to.
const ACL: &str = include_str!("../../../deploy/mosquitto/acl");

/// The lab's broker, described for a directory and a port.
pub struct LabBroker {
    /// Holds the config, the logins, the ACL, and `data/` for persistence.
    pub dir: PathBuf,
    /// Listened on at 127.0.0.1 only.
    pub port: u16,
    /// Keep sessions and queued messages across a restart (`On`), or not.
    pub persistence: Switch,
    /// Lines appended to the config (say, `log_type information`).
    pub extra: String,
}

impl LabBroker {
    pub fn new(dir: impl Into<PathBuf>, port: u16) -> Self {
        Self {
            dir: dir.into(),
            port,
            persistence: Switch::On,
            extra: String::new(),
        }
    }

    /// Writes the config, the logins and the ACL into `dir`, makes `data/`,
    /// and returns the config's path, for `mosquitto -c`.
    pub fn write(&self) -> std::io::Result<PathBuf> {
        let data = self.dir.join("data");
        std::fs::create_dir_all(&data)?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777))?;
        for (name, text) in [("passwd", PASSWD), ("acl", ACL)] {
            write_readable(&self.dir.join(name), text)?;
        }
        let path = self.dir.join("mosquitto.conf");
        write_readable(&path, &self.config())?;
        Ok(path)
    }

    /// Writes the files ([`write`](Self::write)) and returns the command
    /// that runs the broker on them: `mosquitto -c <dir>/mosquitto.conf`.
    pub fn command(&self) -> std::io::Result<std::process::Command> {
        let config = self.write()?;
        let mut command = std::process::Command::new(mosquitto()?);
        command.arg("-c").arg(config);
        Ok(command)
    }

    /// The lab's config, pointed at this broker's port and files.
    pub fn config(&self) -> String {
        let dir = self.dir.display();
        let mut config = CONFIG
            .replace(
                "listener 1883\n",
                &format!("listener {} 127.0.0.1\n", self.port),
            )
            .replace("/mosquitto/config/", &format!("{dir}/"))
            .replace("/mosquitto/data/", &format!("{dir}/data/"));
        if self.persistence == Switch::Off {
            config = config.replace("persistence true\n", "persistence false\n");
        }
        format!("{config}\n{}", self.extra)
    }

    /// Forgets every saved session and queued message.
    pub fn forget(&self) -> std::io::Result<()> {
        match std::fs::remove_dir_all(self.dir.join("data")) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
            _ => Ok(()),
        }
    }

    /// `mqtt://user:password@127.0.0.1:<port>` for one of the lab's logins
    /// (`ingest` or `device`), as the docs publish them.
    pub fn url(&self, user: &str) -> Option<String> {
        let password = match user {
            "ingest" => "ingest-secret",
            "device" => "device-secret",
            _ => return None,
        };
        Some(format!("mqtt://{user}:{password}@127.0.0.1:{}", self.port))
    }
}

/// The `mosquitto` binary: on `PATH`, or where the packages put it.
pub fn mosquitto() -> std::io::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let sbin = ["/usr/sbin", "/usr/local/sbin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(sbin)
        .map(|dir| dir.join("mosquitto"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "mosquitto is not on PATH, nor in /usr/sbin: install it (Debian: apt-get install \
                 mosquitto)",
            )
        })
}

/// Whether something accepts connections on 127.0.0.1:`port` within
/// `within`: a broker just started, ready for its clients.
pub async fn listening(port: u16, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn write_readable(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rewriting depends on lines of the deploy file: a change there
    /// that the rewriting misses would run a broker on the wrong port, or
    /// reading files that do not exist here.
    #[test]
    fn the_config_points_at_this_brokers_port_and_files_only() {
        let mut broker = LabBroker::new("/tmp/lab-broker-test", 18830);
        let config = broker.config();
        assert!(config.contains("listener 18830 127.0.0.1\n"), "{config}");
        assert!(!config.contains("listener 1883\n"), "{config}");
        assert!(!config.contains("/mosquitto/"), "{config}");
        assert!(config.contains("password_file /tmp/lab-broker-test/passwd\n"));
        assert!(config.contains("persistence_location /tmp/lab-broker-test/data/\n"));
        assert!(config.contains("persistence true\n"));
        broker.persistence = Switch::Off;
        let config = broker.config();
        assert!(config.contains("persistence false\n") && !config.contains("persistence true"));
    }
}
