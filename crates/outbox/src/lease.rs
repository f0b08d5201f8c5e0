//! The relay leader's lease: how a standby tells a dead leader from a quiet
//! one, in seconds rather than hours.
//!
//! The leader holds a session advisory lock, and Postgres releases it only
//! when the session ends. After a host crash or a network partition nobody
//! ends it: no FIN or RST ever reaches Postgres, the session sits idle, and
//! the kernel gives up on the socket only when TCP keepalive does, about two
//! hours by default. Every standby waits that long.
//!
//! So the lock comes with a lease of `RELAY_LEASE_TTL_MS`, kept on the very
//! connection that holds it and judged by Postgres's own record of that
//! session (`pg_stat_activity.state_change`, on the server's clock, so no
//! two machines' clocks are compared):
//!
//! - **The leader proves it is alive** by talking on its lock connection at
//!   least every quarter TTL: each round of the relay, and a `SELECT 1`
//!   heartbeat while it waits on the broker. Each statement must answer
//!   within half the TTL (a client-side deadline, and `statement_timeout` on
//!   the server); when one does not, the leader steps down. So a leader that
//!   cannot reach Postgres stops within 3/4 TTL of its last proof.
//! - **A standby that finds the lock taken** looks at the holder's session:
//!   silent for a whole TTL means its leader is gone, and the standby ends
//!   that session with `pg_terminate_backend` (which releases the lock and
//!   rolls back any batch it had open) and takes the lock.
//!
//! The quarter TTL between "the leader stops" and "a standby may start" is
//! the margin for scheduling delays. A leader paused longer than that (a
//! frozen VM) can wake up and publish part of a batch next to the new
//! leader: split brain. Here it costs duplicates, never loss or disorder:
//! its rows are marked published only after its broker confirms *and* an
//! `UPDATE` on its lock session, which is gone, so the new leader publishes
//! them again, the consumer drops the repeats by event id and applies each
//! order's events by sequence. The TTL is the trade-off: shorter fails over
//! sooner but deposes a leader that merely stalls (each time, one batch
//! published twice).
//!
//! Rejected: TCP keepalives and `tcp_user_timeout` alone. They are set here
//! too, and on a real dead link they free the lock without any standby. But
//! they only see a dead *kernel*: a stateful middlebox (a NAT, a proxy, the
//! lab's own TCP proxy) that keeps answering probes for a peer that is gone
//! hides the death from them for good. Also rejected: a lease row the leader
//! renews with `UPDATE … SET expires_at`: it needs a table and writes WAL on
//! every heartbeat, and a renewal inside a batch's transaction is invisible
//! until commit; Postgres already records when each session last spoke.
//! The price of reading `pg_stat_activity`: relays must connect as one role
//! (or one with `pg_read_all_stats` and `pg_signal_backend`), and
//! `track_activities` must stay on (the default).

use std::{future::Future, io, time::Duration};

use sqlx::PgConnection;

/// The advisory lock key all relays of one database contend for ("outbox").
const LEADER_LOCK: i64 = 0x6f75_7462_6f78;

/// The lease terms every relay of one database must share.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lease {
    ttl: Duration,
}

impl Lease {
    pub(crate) fn new(ttl_ms: u64) -> Self {
        Self {
            ttl: Duration::from_millis(ttl_ms),
        }
    }

    /// How long one statement on the lock connection may take.
    pub(crate) fn grace(&self) -> Duration {
        self.ttl / 2
    }

    /// How often a leader speaks on its lock connection, at the least.
    pub(crate) fn heartbeat(&self) -> Duration {
        self.ttl / 4
    }

    /// Runs one statement on the lock connection, which must answer within
    /// the grace: a connection that went silent fails here, it never hangs.
    pub(crate) async fn bounded<T>(
        &self,
        statement: impl Future<Output = sqlx::Result<T>>,
    ) -> sqlx::Result<T> {
        tokio::time::timeout(self.grace(), statement)
            .await
            .unwrap_or_else(|_| {
                Err(sqlx::Error::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "Postgres did not answer on the leader-lock connection within {:?}",
                        self.grace()
                    ),
                )))
            })
    }

    /// The server side of the lock connection: no statement outlives the
    /// client's deadline, no transaction is left open past the TTL, and a
    /// dead peer is noticed by TCP itself where it can be.
    pub(crate) async fn prepare(&self, lock: &mut PgConnection) -> sqlx::Result<()> {
        let secs = |d: Duration| d.as_secs().max(1).to_string();
        let millis = |d: Duration| d.as_millis().to_string();
        let statement = sqlx::query(
            "SELECT set_config('statement_timeout', $1, false), \
                    set_config('idle_in_transaction_session_timeout', $2, false), \
                    set_config('tcp_user_timeout', $2, false), \
                    set_config('tcp_keepalives_idle', $3, false), \
                    set_config('tcp_keepalives_interval', $4, false), \
                    set_config('tcp_keepalives_count', '3', false)",
        )
        .bind(millis(self.grace()))
        .bind(millis(self.ttl))
        .bind(secs(self.heartbeat()))
        .bind(secs(self.heartbeat() / 2))
        .execute(lock);
        self.bounded(statement).await.map(drop)
    }

    /// One attempt at the lead: take the lock, or, when its holder's session
    /// has been silent for the whole TTL, end that session and take it.
    pub(crate) async fn try_acquire(&self, lock: &mut PgConnection) -> sqlx::Result<bool> {
        if self.bounded(try_lock(&mut *lock)).await? {
            return Ok(true);
        }
        let Some(pid) = self.bounded(self.end_silent_holder(&mut *lock)).await? else {
            return Ok(false);
        };
        tracing::warn!(
            pid,
            "the leader's session was silent for over {:?}: ended it to take the lead",
            self.ttl
        );
        self.bounded(try_lock(lock)).await
    }

    /// Ends the session holding the lock if it has not spoken for the TTL,
    /// and waits (a little) for it to be gone. Returns its pid if it ended.
    async fn end_silent_holder(&self, lock: &mut PgConnection) -> sqlx::Result<Option<i32>> {
        // A bigint advisory key shows in pg_locks as two halves; advisory
        // locks belong to one database, like the relays that share them.
        let ended: Option<(i32, bool)> = sqlx::query_as(
            "SELECT a.pid, pg_terminate_backend(a.pid, $4) \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
               AND l.classid::bigint = $1 AND l.objid::bigint = $2 \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND a.pid <> pg_backend_pid() \
               AND a.state_change < clock_timestamp() - make_interval(secs => $3)",
        )
        .bind(LEADER_LOCK >> 32)
        .bind(LEADER_LOCK & 0xffff_ffff)
        .bind(self.ttl.as_secs_f64())
        .bind(i64::try_from(self.heartbeat().as_millis()).unwrap_or(i64::MAX))
        .fetch_optional(lock)
        .await?;
        Ok(ended.and_then(|(pid, ended)| ended.then_some(pid)))
    }

    /// Runs `work`, which does not use the lock connection, while keeping
    /// the lease: a heartbeat on `lock` every quarter TTL. Fails (and drops
    /// the work) when a heartbeat goes unanswered.
    pub(crate) async fn keep<T>(
        &self,
        lock: &mut PgConnection,
        work: impl Future<Output = T>,
    ) -> sqlx::Result<T> {
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return Ok(out),
                () = tokio::time::sleep(self.heartbeat()) => {
                    self.bounded(sqlx::query("SELECT 1").execute(&mut *lock)).await?;
                }
            }
        }
    }
}

async fn try_lock(lock: &mut PgConnection) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(LEADER_LOCK)
        .fetch_one(lock)
        .await
}
