//! Databases of their own for experiments (`lab chaos`, `lab bench`).
//!
//! An experiment counts rows, so it must not share tables with a running
//! `lab up` (whose relay would happily publish the experiment's events). It
//! gets a database named for it next to `DATABASE_URL`'s, dropped and
//! created afresh on every run.
//!
//! Dropping it afresh is only safe while nobody else uses it: a second run
//! of the same experiment (two terminals, a test beside a learner's bench)
//! would drop the first one's database under it, and the first would then
//! report losses it never had. So a run holds a Postgres advisory lock named
//! for the database as long as it lives, and a second run is refused with a
//! message that says why, instead of corrupting the first.

use std::time::Duration;

use anyhow::Context;
use sqlx::{ConnectOptions, PgPool, postgres::PgConnectOptions};
use tokio_util::sync::CancellationToken;

/// A scratch database, and the lock that keeps it this run's own until it
/// is dropped.
pub struct Scratch {
    pub pool: PgPool,
    /// The session holding the advisory lock; closing it releases the lock.
    _lock: sqlx::PgConnection,
}

/// A fresh, migrated database called `name` on `database_url`'s server,
/// refused while another run holds it.
pub async fn database(
    database_url: &str,
    name: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Scratch> {
    let options: PgConnectOptions = database_url
        .parse()
        .context("DATABASE_URL is not a Postgres URL")?;
    let mut admin = options
        .clone()
        .database("postgres")
        .connect()
        .await
        .with_context(|| {
            format!(
                "Postgres is not reachable at {}:{}; {}",
                options.get_host(),
                options.get_port(),
                lab_core::config::start_hint("postgres")
            )
        })?;
    let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
        .bind(format!("lab scratch {name}"))
        .fetch_one(&mut admin)
        .await
        .context("cannot take the scratch database's lock")?;
    anyhow::ensure!(
        free,
        "another run is using the scratch database {name} (a `lab bench`, `lab chaos` or a test \
         in another terminal); wait for it to finish or stop it, then run this again"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .with_context(|| format!("cannot drop the scratch database {name}"))?;
    let mut url = url::Url::parse(database_url).context("DATABASE_URL is not a URL")?;
    url.set_path(name);
    let pool = lab_core::postgres::connect(url.as_str(), shutdown.clone())?;
    let ready = lab_core::postgres::dependency(pool.clone());
    for _ in 0..100 {
        if ready.check().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ready.check().await.map_err(|err| anyhow::anyhow!(err))?;
    Ok(Scratch { pool, _lock: admin })
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    /// A second run of an experiment must not drop the first one's database
    /// under it.
    #[tokio::test]
    async fn a_second_run_is_refused_while_the_first_holds_the_database() {
        let shutdown = CancellationToken::new();
        let url = lab_core::config::DEFAULT_DATABASE_URL;
        let name = "lab_scratch_lock_test";
        let first = database(url, name, &shutdown).await.unwrap();
        let second = database(url, name, &shutdown).await;
        let err = second.err().expect("a second run was let in");
        assert!(err.to_string().contains("another run"), "{err:#}");
        sqlx::query("SELECT 1")
            .execute(&first.pool)
            .await
            .expect("the first run's database was dropped");
        drop(first);
        // The server lets go of the lock once it sees the session end.
        let mut again = database(url, name, &shutdown).await;
        for _ in 0..20 {
            if again.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            again = database(url, name, &shutdown).await;
        }
        let again = again.expect("the lock outlived the run that held it");
        again.pool.close().await;
        drop(again);
        let mut admin = PgConnectOptions::from_str(url)
            .unwrap()
            .database("postgres")
            .connect()
            .await
            .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await
        .unwrap();
        shutdown.cancel();
    }
}
