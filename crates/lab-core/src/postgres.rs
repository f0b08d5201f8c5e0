//! Getting a Postgres pool that is ready for a lab.
//!
//! A service starts serving at once and brings its database up in the
//! background: create the database if it is missing, then apply the
//! workspace's migrations, retrying with backoff while Postgres is not
//! reachable. Until that is done `/readyz` answers 503 naming Postgres, so
//! the order in which compose (or a person) starts things does not matter.
//!
//! The pool waits at most two seconds for a connection. sqlx's default is 30
//! seconds, which turns a dead database into half-minute hangs; a lab should
//! answer 503 quickly instead.

use std::time::Duration;

use anyhow::Context;
use sqlx::{
    ConnectOptions, PgPool, Postgres,
    migrate::{MigrateDatabase, Migrator},
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{redact, start_hint},
    http::Dependency,
};

/// Every lab's tables, from the workspace's one `migrations/` folder.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// A lazily connecting pool for `url`; a background task creates the database
/// and runs the migrations as soon as Postgres answers.
pub fn connect(url: &str, shutdown: CancellationToken) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url
        .parse()
        .with_context(|| format!("DATABASE_URL is not a valid Postgres URL: {}", redact(url)))?;
    let pool = pool(options);
    let url = url.to_owned();
    let migrating = pool.clone();
    tokio::spawn(async move {
        let mut backoff =
            crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            let delay = backoff.next_delay();
            match prepare(&url, &migrating).await {
                Ok(()) => {
                    tracing::info!(database = %where_is(&migrating), "database ready, migrations applied");
                    return;
                }
                Err(err) => {
                    tracing::warn!("{}; retrying in {delay:?}", describe(&migrating, &err))
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    });
    Ok(pool)
}

/// A lazily connecting pool with the labs' options: at most 16 connections,
/// and a two-second wait for one, so a dead database gives a quick 503.
pub fn pool(options: PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy_with(options.log_statements(tracing::log::LevelFilter::Debug))
}

async fn prepare(url: &str, pool: &PgPool) -> Result<(), sqlx::Error> {
    if !Postgres::database_exists(url).await? {
        match Postgres::create_database(url).await {
            Ok(()) => tracing::info!(database = %where_is(pool), "created database"),
            // Another service created it between our check and our create.
            Err(sqlx::Error::Database(err)) if err.code().as_deref() == Some("42P04") => {}
            Err(err) => return Err(err),
        }
    }
    MIGRATOR.run(pool).await.map_err(|err| match err {
        sqlx::migrate::MigrateError::Execute(err) => err,
        other => sqlx::Error::Protocol(other.to_string()),
    })
}

/// The `/readyz` check: Postgres answers and the lab's migrations are applied.
pub fn dependency(pool: PgPool) -> Dependency {
    Dependency::new("postgres", move || {
        let pool = pool.clone();
        async move {
            let needed = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
            let applied: Option<i64> =
                sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                    .fetch_one(&pool)
                    .await
                    .map_err(|err| describe(&pool, &err))?;
            match applied {
                Some(v) if v >= needed => Ok(()),
                _ => Err(format!(
                    "Postgres at {} answers but migrations are not applied yet",
                    where_is(&pool)
                )),
            }
        }
    })
}

/// Says what went wrong, where, and, when Postgres cannot be reached, how to
/// start it. Never includes the password.
pub fn describe(pool: &PgPool, err: &sqlx::Error) -> String {
    let place = where_is(pool);
    match err {
        sqlx::Error::PoolTimedOut => format!(
            "no Postgres connection to {place} within 2 s: Postgres is not reachable, or every \
             pooled connection is busy; {}",
            start_hint("postgres")
        ),
        sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("42P01" | "3D000")) => {
            format!("Postgres at {place} answers but the lab's database is not ready yet ({db})")
        }
        _ if is_unavailable(err) => format!(
            "Postgres is not reachable at {place} ({err}); {}",
            start_hint("postgres")
        ),
        _ => format!("Postgres at {place}: {err}"),
    }
}

/// `host:port/database`, for messages.
pub fn where_is(pool: &PgPool) -> String {
    let options = pool.connect_options();
    format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("postgres")
    )
}

/// True when the error means "the database is down or out of connections",
/// which services answer with 503 rather than 500.
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_) => true,
        // Connection exceptions (class 08), too many connections (53300),
        // the server shutting down (57P01..57P03), and a database still being
        // prepared in the background: not created yet (3D000) or not
        // migrated yet (42P01).
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08")
                || code == "53300"
                || code.starts_with("57P0")
                || code == "3D000"
                || code == "42P01"
        }),
        _ => false,
    }
}
