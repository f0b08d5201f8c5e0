//! Write-behind is exactly as durable as Redis.
//!
//! A page view is acknowledged (202) once Redis has it; until the flusher
//! has moved it to Postgres, Redis holds the only copy. What a Redis crash
//! or restart then loses is decided by Redis's persistence mode, not by this
//! service:
//!
//! | mode | Redis runs with | a Redis crash or restart loses |
//! |---|---|---|
//! | `none` | `appendonly no`, `save ""` | every view not yet flushed |
//! | `snapshots` | `appendonly no`, `save …` | every view since the last snapshot not yet flushed; the snapshot also brings back entries that may be in Postgres already |
//! | `no-fsync` | `appendonly yes`, `appendfsync no` | nothing if only Redis dies; what the OS had not written (often 30 s) if the machine does |
//! | `everysec` | `appendonly yes`, `appendfsync everysec` | nothing, usually, if only Redis dies (a write reaches the kernel before its reply); up to about a second (two at worst) if the machine does |
//! | `always` | `appendonly yes`, `appendfsync always` | nothing: each write is on disk before its reply |
//!
//! Measured in the workshop tests (Redis killed with SIGKILL and started
//! again under ~50 views/s, flushing every second): without an append-only
//! file about 50 of ~105 acknowledged views were gone, every one not yet
//! flushed; with `always` (and, in a trial, `everysec`) none.
//!
//! What the service does about it: it asks Redis (`CONFIG GET appendonly`,
//! `appendfsync`, `save`; `INFO persistence` where `CONFIG` is disabled) at
//! start and every second after, so a `CONFIG SET`, a restart with other
//! flags or a reconnect to another server all show. `/stats` reports the
//! mode and its contract (`write_behind.durability`), and `/readyz` adds a
//! `warning` to its `redis` check while the mode forgets. A change of
//! Redis's `run_id` means Redis restarted (`restarts_seen`). Each look also
//! compares the `run_id` with the one Redis keeps beside the immediate
//! counts, which were built under it: when they differ, whether or not this
//! process saw the restart, the counts are forgotten and rebuilt from the
//! truth ([`crate::counts`]).
//!
//! Rejected: failing readiness (503) on a Redis that forgets. Readiness says
//! whether to send traffic; the service works, and a config choice the
//! operator may have made knowingly (a cache of view counts can afford a
//! lost second) should not take it out of the load balancer. A warning
//! states the fact where the operator looks. Rejected too: waiting for each
//! view's fsync from the service (`WAITAOF 1 0`, Redis 7.2): that is
//! `appendfsync always` paid per request, and on a Redis without an
//! append-only file it cannot be had at all.

use std::{sync::Mutex, time::Duration};

use lab_core::redis::Redis;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::{App, counts};

/// How often the service asks Redis again.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Redis's persistence mode, as far as write-behind is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
#[schema(as = PersistenceMode)]
pub enum Mode {
    /// Not asked yet: Redis has not answered since the service started.
    Unknown,
    None,
    Snapshots,
    NoFsync,
    Everysec,
    Always,
    /// The append-only file is on, but `CONFIG` is disabled, so the fsync
    /// policy is unknown: count on no more than `no-fsync`.
    Aof,
}

impl Mode {
    /// What a crash or restart of Redis loses, in one line.
    pub fn loses(self) -> &'static str {
        match self {
            Mode::Unknown => "not known yet: Redis has not answered",
            Mode::None => "every acknowledged view not yet flushed to Postgres",
            Mode::Snapshots => {
                "every acknowledged view since the last snapshot not yet flushed to Postgres"
            }
            Mode::NoFsync | Mode::Aof => {
                "nothing if only Redis dies; what the OS had not written yet if the machine does"
            }
            Mode::Everysec => {
                "nothing, usually, if only Redis dies; up to about a second of views if the machine does"
            }
            Mode::Always => "nothing: each view is on disk before its 202",
        }
    }

    /// True for a Redis that forgets acknowledged views when it restarts.
    pub fn forgets(self) -> bool {
        matches!(self, Mode::None | Mode::Snapshots)
    }

    /// From the values of `CONFIG GET appendonly`, `appendfsync` and `save`.
    pub fn from_config(appendonly: &str, appendfsync: &str, save: &str) -> Self {
        match (appendonly, appendfsync) {
            ("yes", "always") => Mode::Always,
            ("yes", "everysec") => Mode::Everysec,
            ("yes", _) => Mode::NoFsync,
            _ if save.trim().is_empty() => Mode::None,
            _ => Mode::Snapshots,
        }
    }

    /// From `INFO persistence`, for a Redis whose `CONFIG` is disabled.
    pub fn from_info(info: &str) -> Self {
        match info_field(info, "aof_enabled") {
            Some("1") => Mode::Aof,
            _ => Mode::None,
        }
    }
}

fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// What `/stats` says under `write_behind.durability`.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(as = Durability)]
pub struct Report {
    /// Redis's persistence mode.
    pub mode: Mode,
    /// What a crash or restart of Redis loses in this mode.
    pub a_redis_crash_loses: &'static str,
    /// `CONFIG GET` or `INFO persistence`; null until Redis has answered.
    pub checked_with: Option<&'static str>,
    /// Redis restarts this service has seen (Redis's `run_id` changed).
    pub restarts_seen: u64,
}

/// What the service knows about Redis's persistence.
pub struct Durability {
    state: Mutex<Known>,
}

struct Known {
    mode: Mode,
    checked_with: Option<&'static str>,
    run_id: Option<String>,
    restarts_seen: u64,
}

impl Default for Durability {
    fn default() -> Self {
        Self {
            state: Mutex::new(Known {
                mode: Mode::Unknown,
                checked_with: None,
                run_id: None,
                restarts_seen: 0,
            }),
        }
    }
}

impl Durability {
    fn state(&self) -> std::sync::MutexGuard<'_, Known> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Redis's `run_id` when it last answered; `None` until it has.
    pub fn run_id(&self) -> Option<String> {
        self.state().run_id.clone()
    }

    pub fn report(&self) -> Report {
        let state = self.state();
        Report {
            mode: state.mode,
            a_redis_crash_loses: state.mode.loses(),
            checked_with: state.checked_with,
            restarts_seen: state.restarts_seen,
        }
    }

    /// The warning `/readyz` carries while Redis forgets.
    pub fn warning(&self) -> Option<String> {
        let mode = self.state().mode;
        mode.forgets().then(|| {
            format!(
                "write-behind acknowledges views only Redis holds, and this Redis runs with \
                 appendonly no ({}): a Redis restart loses {}. Run Redis with \
                 --appendonly yes --appendfsync everysec (or always)",
                if mode == Mode::None {
                    "and no snapshots"
                } else {
                    "and snapshots"
                },
                mode.loses()
            )
        })
    }

    /// Records what Redis said; returns the mode before, and whether Redis
    /// restarted since the last answer.
    fn observe(&self, run_id: String, mode: Mode, checked_with: &'static str) -> (Mode, bool) {
        let mut state = self.state();
        let before = state.mode;
        let restarted = state.run_id.as_ref().is_some_and(|known| *known != run_id);
        if restarted {
            state.restarts_seen += 1;
        }
        state.run_id = Some(run_id);
        state.mode = mode;
        state.checked_with = Some(checked_with);
        (before, restarted)
    }
}

/// Asks Redis for its persistence mode and `run_id`.
async fn ask(conn: &mut Redis) -> redis::RedisResult<(String, Mode, &'static str)> {
    let server: String = redis::cmd("INFO").arg("server").query_async(conn).await?;
    let run_id = info_field(&server, "run_id").unwrap_or_default().to_owned();
    let get = |name| redis::cmd("CONFIG").arg("GET").arg(name).clone();
    let config: redis::RedisResult<(Vec<String>, Vec<String>, Vec<String>)> = redis::pipe()
        .add_command(get("appendonly"))
        .add_command(get("appendfsync"))
        .add_command(get("save"))
        .query_async(conn)
        .await;
    let value = |pair: &[String]| pair.get(1).cloned().unwrap_or_default();
    match config {
        Ok((aof, fsync, save)) => {
            let mode = Mode::from_config(&value(&aof), &value(&fsync), &value(&save));
            Ok((run_id, mode, "CONFIG GET"))
        }
        Err(err) if lab_core::redis::is_unavailable(&err) => Err(err),
        // CONFIG renamed away or refused by an ACL, as managed Redis does.
        Err(_) => {
            let info: String = redis::cmd("INFO")
                .arg("persistence")
                .query_async(conn)
                .await?;
            Ok((run_id, Mode::from_info(&info), "INFO persistence"))
        }
    }
}

/// One look at Redis: its mode, whether it restarted, and the immediate
/// counts forgotten if they were built under another run of Redis (they are
/// rebuilt on their next use).
pub async fn check(app: &App) {
    let mut conn = app.redis.clone();
    let (run_id, mode, checked_with) = match ask(&mut conn).await {
        Ok(answer) => answer,
        Err(err) => {
            tracing::debug!(%err, "cannot ask Redis for its persistence mode yet");
            return;
        }
    };
    let (before, restarted) = app.durability.observe(run_id.clone(), mode, checked_with);
    if restarted {
        tracing::warn!(mode = ?mode, "Redis restarted; in this mode a restart loses {}", mode.loses());
    } else if before != mode && mode.forgets() {
        tracing::warn!(mode = ?mode, "write-behind runs on a Redis that forgets: a restart loses {}", mode.loses());
    } else if before != mode {
        tracing::info!(mode = ?mode, "Redis persistence: a crash loses {}", mode.loses());
    }
    match counts::forget_if_built_elsewhere(app, &run_id).await {
        Ok(Some(n)) => tracing::info!(
            counts = n,
            "immediate counts built under another run of Redis forgotten; \
             each is rebuilt from Postgres plus pending"
        ),
        Ok(None) => {}
        Err(err) => tracing::debug!(%err, "counts not checked yet"),
    }
}

/// Asks Redis every second until `shutdown`.
pub async fn watch(app: App, shutdown: CancellationToken) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(CHECK_EVERY) => check(&app).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Mode;

    #[test]
    fn the_mode_follows_appendonly_appendfsync_and_save() {
        assert_eq!(Mode::from_config("no", "everysec", ""), Mode::None);
        assert_eq!(
            Mode::from_config("no", "everysec", "3600 1 300 100"),
            Mode::Snapshots
        );
        assert_eq!(Mode::from_config("yes", "no", ""), Mode::NoFsync);
        assert_eq!(Mode::from_config("yes", "everysec", ""), Mode::Everysec);
        assert_eq!(Mode::from_config("yes", "always", "3600 1"), Mode::Always);
        assert!(Mode::None.forgets() && Mode::Snapshots.forgets());
        assert!(!Mode::Everysec.forgets() && !Mode::Unknown.forgets());
    }

    #[test]
    fn without_config_info_persistence_tells_whether_the_aof_is_on() {
        let info = "# Persistence\r\nloading:0\r\naof_enabled:1\r\naof_rewrite_in_progress:0\r\n";
        assert_eq!(Mode::from_info(info), Mode::Aof);
        assert_eq!(
            Mode::from_info(&info.replace("aof_enabled:1", "aof_enabled:0")),
            Mode::None
        );
        assert_eq!(Mode::from_info(""), Mode::None);
    }
}
