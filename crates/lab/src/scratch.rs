//! Databases of their own for experiments (`lab chaos`, `lab bench`).
//!
//! An experiment counts rows, so it must not share tables with a running
//! `lab up` (whose relay would happily publish the experiment's events). It
//! gets a database named for it next to `DATABASE_URL`'s, dropped and
//! created afresh on every run.

use std::time::Duration;

use anyhow::Context;
use sqlx::{ConnectOptions, PgPool, postgres::PgConnectOptions};
use tokio_util::sync::CancellationToken;

/// A fresh, migrated database called `name` on `database_url`'s server.
pub async fn database(
    database_url: &str,
    name: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<PgPool> {
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
            return Ok(pool);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ready
        .check()
        .await
        .map_err(|err| anyhow::anyhow!(err))
        .map(|()| pool)
}
